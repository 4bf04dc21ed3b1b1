#!/usr/bin/env python3
"""safetensors_oracle.py - the Python `safetensors` library as the oracle for dsrt.safetensors.

    python3 tests/oracle/safetensors_oracle.py write [FOLDER]
        Writes FOLDER/python_written.safetensors with safetensors.torch.save_file, and next to it
        python_written.json: for every tensor its dtype, shape, raw bytes (hex) and the values torch
        reads (NaN as null, infinities as "inf"/"-inf"). FOLDER defaults to tests/fixtures/safetensors,
        where tests/lua/test_safetensors.lua looks for them.

    python3 tests/oracle/safetensors_oracle.py check FILE.safetensors [FILE.json]
        Reads a file dsrt wrote (build/dsrt tests/oracle/write_for_python.lua FOLDER makes one) with
        the Python library - raw through safetensors.deserialize, then as torch tensors through
        safe_open and load_file - and compares everything with what dsrt recorded. Exits 1 on any
        difference.

Runs on the GPU image (PyTorch 2.11, safetensors 0.8.0); the Lua test reads the fixture anywhere.
The values are deterministic patterns, so the fixture changes only if this script does. The float8
tensors hold every one of the 256 codes, and the 16-bit float tensors a spread of codes plus the
special ones, so the fixture checks dsrt's decoding of each format against torch's, not only the
file layout.
"""
import json
import os
import sys

import torch
from safetensors import deserialize, safe_open
from safetensors.torch import load_file, save_file

TORCH_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I8": torch.int8,
    "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": torch.float8_e8m0fnu,
}
FORMAT_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
F4_TORCH = getattr(torch, "float4_e2m1fn_x2", None)


def raw_bytes(t):
    """The tensor's bytes in row-major order."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def codes_16bit():
    """A spread of 16-bit codes plus zeros, infinities, NaN, the largest and smallest magnitudes."""
    spread = list(range(0, 65536, 257))
    special = [0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x3C00, 0x7BFF, 0x7C00, 0xFC00, 0x7E00,
               0x7F7F, 0x7F80, 0xFF80, 0x7FC0, 0x0080, 0x3F80]
    codes = torch.tensor(spread + special, dtype=torch.int32)
    return ((codes + 32768) % 65536 - 32768).to(torch.int16)


def every_byte():
    return torch.arange(256, dtype=torch.int32).to(torch.uint8)


def python_tensors():
    return {
        "bf16.codes": codes_16bit().view(torch.bfloat16),
        "f16.codes": codes_16bit().view(torch.float16),
        "f32.values": torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e38, 1.0e-45, float("inf"), float("-inf"),
                                    float("nan"), 0.1, 1 / 3], dtype=torch.float32),
        "f32.matrix": (torch.arange(12, dtype=torch.float32) * 0.25 - 1).reshape(3, 4),
        "f32.scalar": torch.tensor(3.5, dtype=torch.float32),
        "bf16.empty": torch.zeros(0, 3, dtype=torch.bfloat16),
        "i8": torch.arange(-128, 128, 8, dtype=torch.int32).to(torch.int8).reshape(4, 8),
        "u8": torch.arange(0, 256, 5, dtype=torch.int32).to(torch.uint8),
        "i32": torch.tensor([-2**31, 2**31 - 1, 0, -1, 123456789], dtype=torch.int32),
        "i64": torch.tensor([[-2**62, 2**53 - 1], [-1, 1 << 40]], dtype=torch.int64),
        "bool": torch.tensor([True, False, False, True, True], dtype=torch.bool),
        "f8e4m3.codes": every_byte().view(torch.float8_e4m3fn).reshape(16, 16),
        "f8e8m0.codes": every_byte().view(torch.float8_e8m0fnu).reshape(16, 16),
    }


def json_values(t):
    if t.dtype in (torch.bool,) or not t.dtype.is_floating_point:
        return [int(v) for v in t.reshape(-1).tolist()]
    values = []
    for v in t.float().reshape(-1).tolist():
        if v != v:
            values.append(None)
        elif v in (float("inf"), float("-inf")):
            values.append("inf" if v > 0 else "-inf")
        else:
            values.append(v)
    return values


def write(folder):
    os.makedirs(folder, exist_ok=True)
    tensors = python_tensors()
    metadata = {"format": "pt", "producer": "tests/oracle/safetensors_oracle.py"}
    path = os.path.join(folder, "python_written.safetensors")
    save_file(tensors, path, metadata=metadata)
    expected = {"metadata": metadata, "tensors": {
        name: {"dtype": FORMAT_NAMES[t.dtype], "shape": list(t.shape), "hex": raw_bytes(t).hex(),
               "values": json_values(t)}
        for name, t in tensors.items()}}
    with open(os.path.join(folder, "python_written.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes) and python_written.json")


def check(path, expected_path):
    with open(expected_path) as f:
        expected = json.load(f)
    want = expected["tensors"]
    for info in want.values():
        info["shape"] = list(info["shape"] or [])  # lua-cjson writes the empty shape of a 0-d tensor as {}
    problems = []

    def differ(what, got, wanted):
        if got != wanted:
            problems.append(f"{what}: got {got!r}, expected {wanted!r}")

    with open(path, "rb") as f:
        raw = dict(deserialize(f.read()))
    differ("names (deserialize)", sorted(raw), sorted(want))
    for name in sorted(set(raw) & set(want)):
        info = raw[name]
        differ(f"{name}: dtype", str(info["dtype"]), want[name]["dtype"])
        differ(f"{name}: shape", list(info["shape"]), want[name]["shape"])
        differ(f"{name}: bytes", bytes(info["data"]).hex(), want[name]["hex"])

    with safe_open(path, framework="pt") as f:
        differ("metadata", f.metadata(), expected["metadata"])
        for name in sorted(f.keys()):
            if name not in want:
                continue
            dtype = want[name]["dtype"]
            try:
                t = f.get_tensor(name)
                torch_bytes = raw_bytes(t).hex()
            except Exception as e:  # say an F4 tensor with a library or torch without fp4
                problems.append(f"{name}: safe_open cannot give {dtype} as a torch tensor: {e}")
                continue
            differ(f"{name}: torch dtype", t.dtype, F4_TORCH if dtype == "F4" else TORCH_DTYPES[dtype])
            differ(f"{name}: torch bytes", torch_bytes, want[name]["hex"])

    try:
        differ("names (load_file)", sorted(load_file(path)), sorted(want))
    except Exception as e:
        problems.append(f"load_file failed: {e}")

    for p in problems:
        print("MISMATCH", p)
    print(f"{path}: {len(want)} tensors, {len(problems)} mismatches")
    return 1 if problems else 0


def main(argv):
    if len(argv) >= 2 and argv[1] == "write":
        write(argv[2] if len(argv) > 2 else os.path.join("tests", "fixtures", "safetensors"))
        return 0
    if len(argv) >= 3 and argv[1] == "check":
        path = argv[2]
        return check(path, argv[3] if len(argv) > 3 else os.path.splitext(path)[0] + ".json")
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
