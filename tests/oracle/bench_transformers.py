"""bench_transformers.py - the Flash slice of scripts/bench_dsv4.lua through stock transformers, for the
README's comparison table.

    python3 tests/oracle/bench_transformers.py [--quick] [--context N] [--steps N] [--experts default|eager]

The slice is the same as dsrt's: DeepSeek-V4-Flash's published config (tests/fixtures/config/
flash_published.json, SPEC §1.1) cut to its first four layers (window/hash, window/hash, CSA/hash,
HCA/learned; SPEC §1.2) with the real 129280 x 4096 embedding and LM head and 256 experts per layer.
transformers 5.17.0 drops the MTP layer (SPEC §8.3), so there is no draft-step number here. It runs
`DeepseekV4ForCausalLM` on the GPU in bf16 with dense bf16 random weights (transformers' own init;
its FP8 path needs hub kernels the GPU image lacks, SPEC §9.2 item 3, so the weights are what
`dequantize=True` would give: ~14 GB per layer, ~56 GB for the slice), eager attention (the only
implementation with sinks, SPEC §9.2 item 14), and the bf16 norm-dtype workaround of SPEC §9.2: the
norms are taken out of `_keep_in_fp32_modules_strict` (b) and every RMSNorm's output is cast back to
its input's dtype (c) — (b) and (c) give identical results, both are applied so that whichever one this
version's construction path honours, no fp32 norm output reaches a bf16 linear.

Measured, with CUDA events after warm-up:
  - prefill: one forward of `context` tokens (4096; --quick 1024), logits of the last position only
    (logits_to_keep=1 where the version takes it); tokens/s. Eager attention materialises
    [heads, S, S + entries] scores per layer, so if the context does not fit the script halves it until
    it does and SAYS SO in the table;
  - decode at batch 1 after that prefill: `steps` single-token forwards through the model's cache
    (20; --quick 5) after 3 warm-up steps, median ms and tokens/s.
Prints one table line per number (`| transformers 5.17 bf16 ... | value |`) for the README.
"""
import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dsv4_oracle as oracle  # noqa: E402  (the config reading and eager switches the oracle uses)

FLASH_CONFIG = os.path.join(HERE, "..", "fixtures", "config", "flash_published.json")
SLICE_RATIOS = [0, 0, 4, 128, 0]   # layers 0-3 and the MTP entry (SPEC §1.2)
NORMS = ("q_a_norm", "kv_norm", "input_layernorm", "post_attention_layernorm", "norm")


def log(*lines):
    for line in lines:
        print(line, file=sys.stderr)


def slice_config():
    with open(FLASH_CONFIG) as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] = 4
    cfg["compress_ratios"] = SLICE_RATIOS
    return cfg


def patch_norms(modeling):
    """SPEC §9.2 workarounds (b) and (c) for running transformers 5.17.0's DeepSeek-V4 in bf16."""
    pre = modeling.DeepseekV4PreTrainedModel
    keep = getattr(pre, "_keep_in_fp32_modules_strict", None)
    if keep:
        pre._keep_in_fp32_modules_strict = [m for m in keep if m not in NORMS]
    norm = modeling.DeepseekV4RMSNorm
    forward = norm.forward
    if not getattr(forward, "_dsrt_cast_back", False):
        def cast_back(self, hidden_states, *args, **kwargs):
            return forward(self, hidden_states, *args, **kwargs).to(hidden_states.dtype)
        cast_back._dsrt_cast_back = True
        norm.forward = cast_back


def build(args):
    _, DeepseekV4Config, modeling = oracle.load_transformers()
    patch_norms(modeling)
    config, form = oracle.build_hf_config(DeepseekV4Config, slice_config(), log)
    config._attn_implementation = "eager"
    if args.experts == "eager":
        config._experts_implementation = "eager"
    torch.manual_seed(1)
    # built on the device in bf16 directly: in fp32 on the host the slice would need ~230 GB
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = modeling.DeepseekV4ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(device="cuda", dtype=torch.bfloat16).eval().requires_grad_(False)
    if args.experts == "eager":
        try:
            model.set_experts_implementation("eager")
        except Exception as e:  # older switch names: what is used is printed below
            log(f"cannot switch the experts to eager: {e!r}")
    attn = getattr(model.config, "_attn_implementation", None)
    experts = getattr(model.config, "_experts_implementation", None)
    params = sum(p.numel() for p in model.parameters())
    log(f"bench_transformers: {form}, attention {attn!r}, experts {experts!r}, {params / 1e9:.2f} B parameters")
    return model, experts


def forward(model, ids, start, cache, last_only):
    positions = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
    kwargs = dict(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True)
    if last_only:
        kwargs["logits_to_keep"] = 1
    with torch.inference_mode():
        try:
            out = model(**kwargs)
        except TypeError:  # a version without logits_to_keep
            kwargs.pop("logits_to_keep", None)
            out = model(**kwargs)
    return out.logits, out.past_key_values


def timed(fn):
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    result = fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop), result


def median(xs):
    xs = sorted(xs)
    return xs[(len(xs) - 1) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--context", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--experts", choices=("default", "eager"), default="default")
    args = parser.parse_args()
    context = args.context or (1024 if args.quick else 4096)
    steps = args.steps or (5 if args.quick else 20)
    if not torch.cuda.is_available():
        log("bench_transformers: no CUDA device")
        return 1
    import transformers
    name = torch.cuda.get_device_name()
    t0 = time.time()
    model, experts = build(args)
    torch.cuda.synchronize()
    log(f"bench_transformers: built in {time.time() - t0:.1f} s")
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(7)

    # prefill: the longest context up to the asked one that fits, warm-up at a short one first
    warm = torch.randint(0, vocab, (1, 64), generator=gen).cuda()
    forward(model, warm, 0, None, True)
    used, prefill_ms, cache = context, None, None
    while used >= 128:
        ids = torch.randint(0, vocab, (1, used), generator=gen).cuda()
        try:
            prefill_ms, (_, cache) = timed(lambda: forward(model, ids, 0, None, True))
            break
        except torch.OutOfMemoryError:
            cache = None
            torch.cuda.empty_cache()
            log(f"bench_transformers: prefill of {used} tokens ran out of memory; trying {used // 2}")
            used //= 2
    if prefill_ms is None:
        log("bench_transformers: no prefill fits")
        return 1

    samples, position = [], used
    for step in range(steps + 3):
        ids = torch.randint(0, vocab, (1, 1), generator=gen).cuda()
        ms, (_, cache) = timed(lambda: forward(model, ids, position, cache, False))
        position += 1
        if step >= 3:
            samples.append(ms)
    decode_ms = median(samples)

    label = f"transformers {transformers.__version__} bf16 (experts {experts}), Flash slice, {name}"
    note = "" if used == context else f" (asked {context}: did not fit)"
    print(f"\n{label}")
    print(f"| transformers prefill {used} tokens{note} | {prefill_ms:.1f} ms | {used / prefill_ms * 1e3:.0f} tok/s |")
    print(f"| transformers decode step at context {used}, batch 1 | {decode_ms:.2f} ms | {1e3 / decode_ms:.1f} tok/s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
