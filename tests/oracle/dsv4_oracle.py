#!/usr/bin/env python3
"""dsv4_oracle.py - transformers' DeepseekV4ForCausalLM, run in fp32, as the independent oracle for
dsrt's DeepSeek-V4 forward pass.

    python3 tests/oracle/dsv4_oracle.py OUT_DIR [--seed 1] [--search 50] [--margin 1e-4] [--device cuda]

Runs on the GPU test image (python 3.12, torch 2.11, transformers 5.17.0, safetensors 0.8.0, numpy; no
network), never in CI. It writes into OUT_DIR (tests/fixtures/dsv4_tiny for the committed fixture):

    config.json            the tiny model in the PUBLISHED form (compress_ratios with the MTP entry,
                           num_hash_layers, flat rope_scaling, qk_rope_head_dim, quantization_config,
                           expert_dtype; SPEC §1.1), what lua/dsrt/dsv4/config.lua reads
    model.safetensors      the checkpoint under the official names and in the official formats (SPEC §2):
                           FP8 e4m3 + e8m0 128x128 block scales, FP4 experts as I8 nibbles (low = even
                           column) + e8m0 per-32 scales, bf16, f32, int64 tid2eid, and mtp.0.* (which
                           transformers drops, but an official checkpoint has)
    expected.safetensors   per run its token ids and the f32 logits transformers computed, plus the
                           router's and the indexer's selections of run a (for locating a divergence)
    meta.json              seed, versions, decision margins, transformers' own consistency, what each
                           component changes, every check with its value, limit and verdict ("ok")
    oracle.log             everything printed, state_dict keys and config included

What it protects: dsrt's precision = "fp32" forward is compared with these logits (relative error
<= 1e-4 at every position), so they must come from an implementation that shares no code with dsrt,
fed with exactly the weights dsrt reads. Hence:
  - The checkpoint is made here in the official format, dequantised EXACTLY to fp32 (e4m3 or e2m1
    code x power-of-two scale is exact in fp32) and loaded into transformers through the SPEC §2.7 name
    mapping, every parameter assigned exactly once and every non-MTP tensor used; the loaded values are
    read back and compared bit for bit.
  - transformers runs in fp32 (bf16 crashes there and rounds differently, SPEC §9.2), TF32 off, eager
    attention (the sinks need it) and eager experts.
  - The tiny config has every layer kind (SPEC §1.2): window-only, CSA (ratio 4, lightning indexer with
    8 heads, index_topk 72 < the 96 compressed entries of 384 tokens: it drops up to 24 from position
    291 on) and HCA (ratio 128, three entries); hash routing (layers 0, 1, 2 as in Flash) and learned
    routing (3, 4); hc_mult 4; YaRN on the compressed layers only; a window-only MTP layer. Every
    layer's type is asserted in the model.
  - Discrete decisions must not flip between two correct fp32 implementations: with few indexer heads
    many entries score exactly 0 and top-k ties are implementation-defined (hence 8 heads), and any
    near-tie flips under rounding. Seeds --seed, --seed+1, ... are tried (at most --search) until every
    decision of run a has a margin >= --margin (else the best seed is kept and the check fails). A
    margin is the gap between the k-th and (k+1)-th candidate (router: sqrtsoftplus score + bias,
    SPEC §7.1; indexer: index score among the visible entries, SPEC §6.6) over the largest |candidate|
    of that row; 1e-4 is ~1000 fp32 roundings, and every decision of runs a, b and c is held to it.
  - Three runs, whose agreement is transformers' own cache logic checked (SPEC §6.9): (a) one-shot
    prefill of 384 tokens (longer than the 128 window); (b) the same tokens as a chunked prefill
    99 + 58 + 143 + 84 (chunk ends off the 4- and 128-boundaries, one chunk longer than the window);
    (c) a prefill of 90 tokens, then one token per step up to 383 (teacher forced), crossing the
    window wrap 127 -> 128, the HCA emissions at 127, 255, 383 and every CSA emission ((t+1) mod 4 == 0).
    b and c must equal a to 1e-5 and make the same selections at every position.
  - Magnitudes are chosen so that every component visibly changes the logits, and that is measured:
    each is neutralised in turn (sinks to -1e4, ape to 0, router bias to 0, SwiGLU clamp off,
    index_topk to everything, YaRN off) and must move the logits by >= 1e-2 of their largest value.

Magnitudes (the stored values; D = hidden_size; "unit gain" = dequantised RMS gain/sqrt(in)):
  embed N(0,1) bf16; head N(0, 4/D) bf16 (logits of std ~2); norm weights U(0.5, 1.5) bf16 (a
  missing multiply shows); hc fn N(0, 1/(hc*D)) f32 (mixes ~N(0,1)), hc base N(0, 0.5^2), hc scale
  U(0.5, 1.5); attn_sink U(-1, 4) f32 (between 0.2 % and 20 % of the softmax mass of 128 keys);
  FP8 linears unit gain: codes N(0, ~32^2) in e4m3, per tile 2^E or 2^(E+1) at random so a wrong tile
  is wrong (dsrt's random.lua rule); FP4 experts the same with codes of std ~2 in e2m1; expert and
  shared-expert w1/w3 gain 1.5 with swiglu_limit 2 (the clamp cuts ~9 % of gate, ~18 % of up values);
  compressor wkv N(0, 1/D), wgate N(0, 4/D) bf16 (gate logits of std 2), ape N(0, 1) f32; indexer
  weights_proj N(0, 1/D); router gate N(0, 4/D) bf16 (logits of std 2), bias N(0, 0.3^2) f32 (it
  changes selections); tid2eid distinct uniform experts; YaRN original_max_position_embeddings 256
  (factor 16), so YaRN bends dims 1..31 within 384 tokens.

Failures: structural problems (a missing transformers feature, a parameter the mapping misses, a
layer of the wrong type, a wrong RoPE table) stop the script with a message naming them; the files
written so far stay. Quality checks (margins, consistency, visibility, size) are all evaluated; the
files are written anyway for inspection, meta.json says "ok": false, the script exits 1, and
tests/lua/test_dsv4_fixture.lua refuses such a fixture.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import struct
import sys
import time
import traceback

import numpy as np
import torch

# ---- the tiny model (SPEC §1) ----

TINY_CONFIG = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "model_type": "deepseek_v4",
    "vocab_size": 128,
    "hidden_size": 128,
    "num_hidden_layers": 5,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 128,
    "qk_rope_head_dim": 64,
    "q_lora_rank": 128,
    "o_lora_rank": 64,
    "o_groups": 2,
    "sliding_window": 128,
    # window/hash, CSA/hash, HCA/hash, CSA/learned, window/learned; MTP window/learned (SPEC §1.2)
    "compress_ratios": [0, 4, 128, 4, 0, 0],
    "num_hash_layers": 3,
    "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0,
    "rope_scaling": {"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 256,
                     "beta_fast": 32, "beta_slow": 1},
    "max_position_embeddings": 4096,  # = factor x original, the ratio transformers' YaRN takes
    "index_n_heads": 8,
    "index_head_dim": 128,
    "index_topk": 72,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "scoring_func": "sqrtsoftplus",
    "routed_scaling_factor": 1.5,
    "norm_topk_prob": True,
    "topk_method": "noaux_tc",
    "swiglu_limit": 2.0,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                            "weight_block_size": [128, 128], "activation_scheme": "dynamic"},
    "expert_dtype": "fp4",
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "bfloat16",
}

SEQ_LEN = 384                # three windows of 128: HCA emits 3 entries, CSA 96 (> index_topk 72)
CHUNKS = (99, 58, 143, 84)   # run b: ends at 99, 157, 300, 384
DECODE_FROM = 90             # run c: prefill 90 (2 tokens left in the compressor buffers), then 1 per step

INDEXER_RATIO = 4            # the reference builds the indexer (and overlapping windows) for ratio 4 only
LAYER_TYPE_OF_RATIO = {0: "sliding_attention", 4: "compressed_sparse_attention",
                       128: "heavily_compressed_attention"}
COMPRESSOR_CLASS_OF_RATIO = {0: None, 4: "DeepseekV4CSACompressor", 128: "DeepseekV4HCACompressor"}

CONSISTENCY_LIMIT = 1e-5     # b and c against a: transformers against itself, fp32 rounding only
VISIBLE_EFFECT = 1e-2        # a neutralised component must move the logits at least this much
DSRT_TOLERANCE = 1e-4        # what dsrt's fp32 logits will be held to (recorded in meta.json)
FIXTURE_BYTES_LIMIT = 4 * 1024 * 1024
NEUTRAL_SINK = -1.0e4        # e^(sink - max) underflows to 0: the sink drops out of the softmax

# ---- number formats (SPEC §2.1), exact, in numpy ----

FP8_BLOCK = 128              # one e8m0 scale per 128x128 tile of an FP8 weight
FP4_BLOCK = 32               # one e8m0 scale per 32 inputs of an FP4 row
E8M0_BIAS = 127              # byte b is 2^(b - 127)
NOMINAL_CODE_STD = {"fp8": 32.0, "fp4": 2.0}
SCALE_RMS = math.sqrt((1 + 4) / 2)   # a tile's exponent is E or E+1: RMS of 2^0 and 2^1


def e4m3_table():
    """Value of every e4m3fn byte (bias 7, subnormals, max 448, 0x7F/0xFF NaN)."""
    b = np.arange(256)
    exponent, mantissa = (b >> 3) & 15, b & 7
    magnitude = np.where(exponent == 0, mantissa * 2.0 ** -9, (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    values = np.where(b >= 128, -magnitude, magnitude)
    values[(exponent == 15) & (mantissa == 7)] = np.nan
    return values


E4M3_VALUES = e4m3_table()
E4M3_MAX = 448.0
E2M1_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
E2M1_VALUES = np.concatenate([E2M1_MAGNITUDES, -E2M1_MAGNITUDES])  # code 8..15: bit 3 is the sign


def nearest_code(x, magnitudes, sign_bit):
    """Codes of the representable magnitudes (sorted, increasing) nearest to x, saturating, sign
    in sign_bit; 0 stays the positive code."""
    mag = np.minimum(np.abs(x), magnitudes[-1])
    hi = np.minimum(np.searchsorted(magnitudes, mag), len(magnitudes) - 1)
    lo = np.maximum(hi - 1, 0)
    code = np.where(mag - magnitudes[lo] <= magnitudes[hi] - mag, lo, hi)
    return (code | np.where((x < 0) & (code > 0), sign_bit, 0)).astype(np.uint8)


def encode_e4m3(x):
    return nearest_code(x, E4M3_VALUES[:127], 128)  # bytes 0..126: the finite non-negative values, increasing


def encode_e2m1(x):
    return nearest_code(x, E2M1_MAGNITUDES, 8)


def e8m0_value(b):
    return np.ldexp(1.0, b.astype(np.int64) - E8M0_BIAS)


def bf16_bits(x):
    """Round to nearest even, as uint16 bit patterns (no NaN here)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_value(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def tile_scales(scale, rows, cols, out_features, in_features):
    """Per-element scales of a block-scaled weight."""
    return np.repeat(np.repeat(scale, rows, axis=0), cols, axis=1)[:out_features, :in_features]


def block_quantisation(fmt, in_features, gain):
    """Centre exponent E of the tile scales and the code std that make the dequantised RMS
    gain/sqrt(in) (codes near NOMINAL_CODE_STD, tile scales 2^E or 2^(E+1))."""
    target = gain / math.sqrt(in_features)
    exponent = int(round(math.log2(target / (NOMINAL_CODE_STD[fmt] * SCALE_RMS))))
    return exponent, target / (2.0 ** exponent * SCALE_RMS)


# ---- the checkpoint in the official format (SPEC §2) ----

class Checkpoint:
    """The official tensors as stored (name -> (safetensors dtype, array of the stored bytes' type))
    and, for every tensor transformers takes, its exact value (`exact`; linears dequantised to fp32
    under their .weight name). Each tensor is drawn from its own generator, seeded by the seed and its
    name, so it does not depend on the order of generation."""

    def __init__(self, seed):
        self.seed = seed
        self.stored = {}
        self.exact = {}

    def rng(self, name):
        return np.random.default_rng([self.seed, int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")])

    def normal(self, name, shape, std, mean=0.0):
        return mean + std * self.rng(name).standard_normal(shape)

    def uniform(self, name, shape, low, high):
        return self.rng(name).uniform(low, high, shape)

    def f32(self, name, values):
        values = np.asarray(values, np.float32)
        self.stored[name], self.exact[name] = ("F32", values), values

    def bf16(self, name, values):
        bits = bf16_bits(values)
        self.stored[name], self.exact[name] = ("BF16", bits), bf16_value(bits)

    def tid2eid(self, name, rows, k, n_experts):
        """k distinct uniform experts per token, int64 as in the checkpoint."""
        ids = np.argsort(self.rng(name).random((rows, n_experts)), axis=1)[:, :k].astype(np.int64)
        self.stored[name], self.exact[name] = ("I64", ids), ids

    def fp8_linear(self, name, out_features, in_features, gain=1.0):
        rng = self.rng(name + ".weight")
        exponent, code_std = block_quantisation("fp8", in_features, gain)
        tiles = (-(-out_features // FP8_BLOCK), -(-in_features // FP8_BLOCK))
        scale = (E8M0_BIAS + exponent + rng.integers(0, 2, tiles)).astype(np.uint8)
        codes = encode_e4m3(rng.standard_normal((out_features, in_features)) * code_std)
        self.stored[name + ".weight"] = ("F8_E4M3", codes)
        self.stored[name + ".scale"] = ("F8_E8M0", scale)
        dense = E4M3_VALUES[codes] * tile_scales(e8m0_value(scale), FP8_BLOCK, FP8_BLOCK, out_features, in_features)
        self.exact[name + ".weight"] = dense.astype(np.float32)

    def fp4_linear(self, name, out_features, in_features, gain=1.0):
        rng = self.rng(name + ".weight")
        exponent, code_std = block_quantisation("fp4", in_features, gain)
        scale = (E8M0_BIAS + exponent + rng.integers(0, 2, (out_features, in_features // FP4_BLOCK))).astype(np.uint8)
        codes = encode_e2m1(rng.standard_normal((out_features, in_features)) * code_std)
        packed = codes[:, 0::2] | (codes[:, 1::2] << 4)  # low nibble = even column (SPEC §2.1)
        self.stored[name + ".weight"] = ("I8", packed.astype(np.uint8).view(np.int8))
        self.stored[name + ".scale"] = ("F8_E8M0", scale)
        dense = E2M1_VALUES[codes] * tile_scales(e8m0_value(scale), 1, FP4_BLOCK, out_features, in_features)
        self.exact[name + ".weight"] = dense.astype(np.float32)


def layer_plan(cfg):
    """(prefix, ratio, hash-routed) of every block: the main layers, then the MTP layers, which the
    reference numbers n_layers + k and never hash-routes (SPEC §1.2)."""
    n = cfg["num_hidden_layers"]
    return [(f"layers.{i}." if i < n else f"mtp.{i - n}.", ratio, i < cfg["num_hash_layers"])
            for i, ratio in enumerate(cfg["compress_ratios"])]


def add_hc(ck, prefix, rows, cols, n_scales):
    """Hyper-connection mixing parameters (SPEC §2.2-2.3, §5): fn f32 [rows, cols], base, scale."""
    ck.f32(prefix + "fn", ck.normal(prefix + "fn", (rows, cols), 1.0 / math.sqrt(cols)))
    ck.f32(prefix + "base", ck.normal(prefix + "base", (rows,), 0.5))
    ck.f32(prefix + "scale", ck.uniform(prefix + "scale", (n_scales,), 0.5, 1.5))


def add_norm(ck, name, width):
    ck.bf16(name, ck.uniform(name, (width,), 0.5, 1.5))


def add_compressor(ck, prefix, width, ratio, dim):
    """SPEC §2.4: wkv, wgate [coff*width, dim] bf16, ape [ratio, coff*width] f32, norm [width]."""
    coff = 2 if ratio == INDEXER_RATIO else 1
    ck.bf16(prefix + "wkv.weight", ck.normal(prefix + "wkv.weight", (coff * width, dim), 1.0 / math.sqrt(dim)))
    ck.bf16(prefix + "wgate.weight", ck.normal(prefix + "wgate.weight", (coff * width, dim), 2.0 / math.sqrt(dim)))
    ck.f32(prefix + "ape", ck.normal(prefix + "ape", (ratio, coff * width), 1.0))
    add_norm(ck, prefix + "norm.weight", width)


def add_attention(ck, cfg, prefix, ratio):
    """SPEC §2.3-2.4."""
    d, heads, head_dim, q_rank = cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_dim"], cfg["q_lora_rank"]
    groups, o_rank = cfg["o_groups"], cfg["o_lora_rank"]
    p = prefix + "attn."
    ck.f32(p + "attn_sink", ck.uniform(p + "attn_sink", (heads,), -1.0, 4.0))
    ck.fp8_linear(p + "wq_a", q_rank, d)
    add_norm(ck, p + "q_norm.weight", q_rank)
    ck.fp8_linear(p + "wq_b", heads * head_dim, q_rank)
    ck.fp8_linear(p + "wkv", head_dim, d)
    add_norm(ck, p + "kv_norm.weight", head_dim)
    ck.fp8_linear(p + "wo_a", groups * o_rank, heads * head_dim // groups)
    ck.fp8_linear(p + "wo_b", d, groups * o_rank)
    if ratio > 0:
        add_compressor(ck, p + "compressor.", head_dim, ratio, d)
    if ratio == INDEXER_RATIO:
        index_heads, index_dim = cfg["index_n_heads"], cfg["index_head_dim"]
        ck.fp8_linear(p + "indexer.wq_b", index_heads * index_dim, q_rank)
        ck.bf16(p + "indexer.weights_proj.weight",
                ck.normal(p + "indexer.weights_proj.weight", (index_heads, d), 1.0 / math.sqrt(d)))
        add_compressor(ck, p + "indexer.compressor.", index_dim, INDEXER_RATIO, d)


def add_moe(ck, cfg, prefix, hash_routed):
    """SPEC §2.3: router, routed FP4 experts, FP8 shared expert of the same width."""
    d, experts, inter = cfg["hidden_size"], cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    p = prefix + "ffn."
    ck.bf16(p + "gate.weight", ck.normal(p + "gate.weight", (experts, d), 2.0 / math.sqrt(d)))
    if hash_routed:
        ck.tid2eid(p + "gate.tid2eid", cfg["vocab_size"], cfg["num_experts_per_tok"], experts)
    else:
        ck.f32(p + "gate.bias", ck.normal(p + "gate.bias", (experts,), 0.3))
    for e in range(experts):
        ck.fp4_linear(f"{p}experts.{e}.w1", inter, d, gain=1.5)
        ck.fp4_linear(f"{p}experts.{e}.w3", inter, d, gain=1.5)
        ck.fp4_linear(f"{p}experts.{e}.w2", d, inter)
    ck.fp8_linear(p + "shared_experts.w1", inter, d, gain=1.5)
    ck.fp8_linear(p + "shared_experts.w3", inter, d, gain=1.5)
    ck.fp8_linear(p + "shared_experts.w2", d, inter)


def build_checkpoint(cfg, seed):
    ck = Checkpoint(seed)
    d, hc, vocab = cfg["hidden_size"], cfg["hc_mult"], cfg["vocab_size"]
    mix = (2 + hc) * hc
    ck.bf16("embed.weight", ck.normal("embed.weight", (vocab, d), 1.0))
    ck.bf16("head.weight", ck.normal("head.weight", (vocab, d), 2.0 / math.sqrt(d)))
    add_norm(ck, "norm.weight", d)
    add_hc(ck, "hc_head_", hc, hc * d, 1)
    for prefix, ratio, hash_routed in layer_plan(cfg):
        add_norm(ck, prefix + "attn_norm.weight", d)
        add_norm(ck, prefix + "ffn_norm.weight", d)
        add_hc(ck, prefix + "hc_attn_", mix, hc * d, 3)
        add_hc(ck, prefix + "hc_ffn_", mix, hc * d, 3)
        add_attention(ck, cfg, prefix, ratio)
        add_moe(ck, cfg, prefix, hash_routed)
        if prefix.startswith("mtp."):  # SPEC §2.5
            ck.fp8_linear(prefix + "e_proj", d, d)
            ck.fp8_linear(prefix + "h_proj", d, d)
            for norm in ("enorm", "hnorm", "norm"):
                add_norm(ck, f"{prefix}{norm}.weight", d)
            add_hc(ck, prefix + "hc_head_", hc, hc * d, 1)
    return ck


def make_tokens(cfg, seed):
    return Checkpoint(seed).rng("tokens").integers(0, cfg["vocab_size"], SEQ_LEN).astype(np.int64)


# ---- safetensors, written here so that every byte and dtype is exactly the official one ----

ELEMENT_BYTES = {"F32": 4, "I64": 8, "I32": 4, "BF16": 2, "F8_E4M3": 1, "F8_E8M0": 1, "I8": 1}


def write_safetensors(path, tensors, metadata):
    """tensors: name -> (safetensors dtype, numpy array holding the stored bytes). Laid out like the
    reference library (widest elements first, then by name; header padded to 8 bytes), so every tensor
    is aligned to its element size."""
    order = sorted(tensors, key=lambda name: (-ELEMENT_BYTES[tensors[name][0]], name))
    header, blobs, offset = {"__metadata__": metadata}, [], 0
    for name in order:
        dtype, array = tensors[name]
        data = np.ascontiguousarray(array).tobytes()
        if len(data) != ELEMENT_BYTES[dtype] * array.size:
            raise OracleError(f"internal: {name} holds {len(data)} bytes for {array.size} {dtype} elements")
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for data in blobs:
            f.write(data)
    os.replace(path + ".tmp", path)
    return os.path.getsize(path)


def json_safe(value):
    """JSON has no infinities or NaN: those are written as strings."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(json_safe(value), f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")


# ---- reporting ----

class OracleError(Exception):
    """A structural problem: the oracle cannot be trusted past this point."""


class Log:
    """Prints and keeps a copy in OUT_DIR/oracle.log."""

    def __init__(self, path):
        self.file = open(path, "w")
        self.start = time.time()

    def __call__(self, *lines):
        for line in lines:
            text = str(line)
            print(text, flush=True)
            self.file.write(text + "\n")
        self.file.flush()

    def section(self, title):
        self(f"\n==== {title}  (t = {time.time() - self.start:.1f} s)")


class Checks:
    """Quality checks: every one is evaluated and kept; the fixture is ok when all pass."""

    def __init__(self, log):
        self.log, self.items = log, {}

    def record(self, name, ok, value, limit, note=""):
        ok = bool(ok)
        self.items[name] = {"ok": ok, "value": value, "limit": limit, "note": note}
        self.log(f"  CHECK {'ok  ' if ok else 'FAIL'} {name}: {value} (limit {limit}){' - ' + note if note else ''}")

    def all_ok(self):
        return all(item["ok"] for item in self.items.values())


# ---- transformers: config, model, structure (SPEC §1.3, §2.7, §9.2) ----

# not given to transformers: the quantizer keys (the weights are handed over dequantised; its FP8 path
# needs the `kernels` package), topk_method (no field there: the bias selects only, as noaux_tc means),
# and the keys its constructor does not take as fields
HF_DROPPED_KEYS = ("quantization_config", "expert_dtype", "topk_method", "torch_dtype", "model_type", "architectures")
HF_SCALAR_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                  "q_lora_rank", "o_lora_rank", "o_groups", "sliding_window", "index_n_heads", "index_head_dim",
                  "index_topk", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "scoring_func",
                  "routed_scaling_factor", "swiglu_limit", "hc_mult", "hc_sinkhorn_iters", "hc_eps", "rms_norm_eps",
                  "norm_topk_prob", "tie_word_embeddings", "max_position_embeddings")


def load_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
        from transformers.models.deepseek_v4 import configuration_deepseek_v4, modeling_deepseek_v4
    except ImportError as e:
        raise OracleError(f"transformers has no deepseek_v4 model ({e}); the oracle needs 5.17.0") from e
    return transformers, configuration_deepseek_v4.DeepseekV4Config, modeling_deepseek_v4


def hf_kwargs_published(cfg):
    """The published config.json as a real checkpoint gives it to transformers (less HF_DROPPED_KEYS),
    rope_type added beside the legacy `type`, and the compress rates stated (transformers only builds
    ratios 4 and 128 unless compress_rate_* say otherwise, SPEC §1.3)."""
    kwargs = {k: v for k, v in json.loads(json.dumps(cfg)).items() if k not in HF_DROPPED_KEYS}
    kwargs["rope_scaling"] = dict(cfg["rope_scaling"], rope_type=cfg["rope_scaling"]["type"])
    kwargs["compress_rate_csa"] = INDEXER_RATIO
    kwargs["compress_rate_hca"] = 128
    return kwargs


def hf_kwargs_nested(cfg):
    """The form transformers writes itself (SPEC §1.3): layer_types, mlp_layer_types, compress_rates,
    partial_rotary_factor and nested rope_parameters {main, compress}."""
    legacy = ("compress_ratios", "num_hash_layers", "qk_rope_head_dim", "rope_scaling")
    kwargs = {k: v for k, v in json.loads(json.dumps(cfg)).items() if k not in HF_DROPPED_KEYS + legacy}
    n, n_hash = cfg["num_hidden_layers"], cfg["num_hash_layers"]
    factor = cfg["qk_rope_head_dim"] / cfg["head_dim"]
    yarn = cfg["rope_scaling"]
    kwargs.update(
        layer_types=[LAYER_TYPE_OF_RATIO[r] for r in cfg["compress_ratios"][:n]],
        mlp_layer_types=["hash_moe"] * n_hash + ["moe"] * (n - n_hash),
        compress_rates={"compressed_sparse_attention": INDEXER_RATIO, "heavily_compressed_attention": 128},
        partial_rotary_factor=factor,
        rope_parameters={
            "main": {"rope_type": "default", "rope_theta": cfg["rope_theta"], "partial_rotary_factor": factor},
            "compress": {"rope_type": "yarn", "rope_theta": cfg["compress_rope_theta"], "factor": yarn["factor"],
                         "original_max_position_embeddings": yarn["original_max_position_embeddings"],
                         "beta_fast": yarn["beta_fast"], "beta_slow": yarn["beta_slow"], "attention_factor": 1.0,
                         "partial_rotary_factor": factor},
        })
    return kwargs


def hf_config_problems(config, cfg):
    """What in transformers' reading of the config differs from the model meant."""
    problems = []
    n, n_hash = cfg["num_hidden_layers"], cfg["num_hash_layers"]
    want_types = [LAYER_TYPE_OF_RATIO[r] for r in cfg["compress_ratios"][:n]]
    want_mlp = ["hash_moe"] * n_hash + ["moe"] * (n - n_hash)
    want_rates = {"compressed_sparse_attention": INDEXER_RATIO, "heavily_compressed_attention": 128}
    for key, want in (("layer_types", want_types), ("mlp_layer_types", want_mlp), ("compress_rates", want_rates)):
        got = getattr(config, key, None)
        if got is None or (list(got) if isinstance(want, list) else dict(got)) != want:
            problems.append(f"{key} = {got!r}, expected {want!r}")
    for key in HF_SCALAR_KEYS:
        got = getattr(config, key, None)
        if got != cfg[key]:
            problems.append(f"{key} = {got!r}, expected {cfg[key]!r}")
    rope_dims = int(round(config.head_dim * (getattr(config, "partial_rotary_factor", None) or 0)))
    if rope_dims != cfg["qk_rope_head_dim"]:
        problems.append(f"partial_rotary_factor gives {rope_dims} rope dims, expected {cfg['qk_rope_head_dim']}")
    rope = getattr(config, "rope_parameters", None) or {}
    main, compress = rope.get("main") or {}, rope.get("compress") or {}
    yarn = cfg["rope_scaling"]
    want_main = {"rope_type": "default", "rope_theta": cfg["rope_theta"]}
    want_compress = {"rope_type": "yarn", "rope_theta": cfg["compress_rope_theta"], "factor": yarn["factor"],
                     "original_max_position_embeddings": yarn["original_max_position_embeddings"],
                     "beta_fast": yarn["beta_fast"], "beta_slow": yarn["beta_slow"], "attention_factor": 1.0}
    for label, got, want in (("main", main, want_main), ("compress", compress, want_compress)):
        for key, value in want.items():
            if got.get(key) != value:
                problems.append(f"rope_parameters[{label!r}][{key!r}] = {got.get(key)!r}, expected {value!r}")
    return problems


def build_hf_config(DeepseekV4Config, cfg, log):
    """The published form first (what a real checkpoint's config.json gives); transformers' own nested
    form if transformers reads the published one differently from the model meant."""
    for label, make in (("published form", hf_kwargs_published), ("transformers' nested form", hf_kwargs_nested)):
        try:
            config = DeepseekV4Config(**make(cfg))
            problems = hf_config_problems(config, cfg)
        except Exception as e:  # a version that refuses this form: try the other
            problems = [f"DeepseekV4Config(...) raised {e!r}"]
        if not problems:
            log(f"  transformers reads the config as meant ({label})")
            return config, label
        log(f"  the {label} is read differently from the model meant:", *[f"    {p}" for p in problems])
    raise OracleError("transformers does not read the tiny config as meant in either form (see above)")


def config_text(config):
    try:
        return config.to_json_string()
    except Exception as e:  # only a printout
        return f"(to_json_string failed: {e!r})\n{vars(config)}"


def set_eager(obj, log):
    """Eager attention (the sinks need it, SPEC §9.2) and eager experts (plain fp32 matmuls)."""
    for attr in ("_attn_implementation", "_experts_implementation"):
        try:
            setattr(obj, attr, "eager")
        except Exception as e:  # a version without this switch keeps its default; checked below
            log(f"  cannot set config.{attr}: {e!r}")


def build_model(modeling, config, device, log):
    set_eager(config, log)
    model = modeling.DeepseekV4ForCausalLM(config)
    # the model may pick grouped_mm at construction; the experts read the switch at every forward
    for force in (lambda: model.set_experts_implementation("eager"),
                  lambda: setattr(model.config, "_experts_implementation_internal", "eager")):
        if getattr(model.config, "_experts_implementation", "eager") == "eager":
            break
        try:
            force()
        except Exception as e:  # the next way, then the experts_eager check says what is left
            log(f"  cannot switch the experts to eager: {e!r}")
    attn = getattr(model.config, "_attn_implementation", None)
    experts = getattr(model.config, "_experts_implementation", None)
    log(f"  attention implementation {attn!r}, experts implementation {experts!r}")
    if attn != "eager":
        raise OracleError(f"attention implementation is {attn!r}; the sinks are only in the eager one")
    return model.to(device=device, dtype=torch.float32).eval().requires_grad_(False), experts


def modules_of(model, class_name):
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ == class_name]


def layer_of(module_name):
    return int(re.search(r"layers\.(\d+)\.", module_name + ".").group(1))


def structure_problems(model, cfg, log):
    """Every layer built as meant: its compressor class and rate, indexer, router kind."""
    problems, n = [], cfg["num_hidden_layers"]
    layers = model.model.layers
    if len(layers) != n:
        return [f"{len(layers)} decoder layers, expected {n}"]
    log("  layer  ratio  compressor                 rate  indexer (heads, topk)   router")
    for i, layer in enumerate(layers):
        ratio = cfg["compress_ratios"][i]
        compressor = getattr(layer.self_attn, "compressor", None)
        comp_class = type(compressor).__name__ if compressor is not None else None
        rate = getattr(compressor, "compress_rate", None)
        indexer = getattr(compressor, "indexer", None)
        index_info = (getattr(indexer, "num_heads", None), getattr(indexer, "index_topk", None)) if indexer else None
        router = type(layer.mlp.gate).__name__
        log(f"  {i:5d}  {ratio:5d}  {str(comp_class):25s}  {str(rate):4s}  {str(index_info):22s}  {router}")
        want_router = "DeepseekV4HashRouter" if i < cfg["num_hash_layers"] else "DeepseekV4TopKRouter"
        if comp_class != COMPRESSOR_CLASS_OF_RATIO[ratio]:
            problems.append(f"layer {i}: compressor {comp_class}, expected {COMPRESSOR_CLASS_OF_RATIO[ratio]}")
        if ratio and rate != ratio:
            problems.append(f"layer {i}: compress_rate {rate}, expected {ratio}")
        if (ratio == INDEXER_RATIO) != (indexer is not None):
            problems.append(f"layer {i}: indexer {'missing' if indexer is None else 'unexpected'}")
        if indexer is not None and index_info != (cfg["index_n_heads"], cfg["index_topk"]):
            problems.append(f"layer {i}: indexer (heads, topk) = {index_info}")
        if router != want_router:
            problems.append(f"layer {i}: router {router}, expected {want_router}")
    return problems


def expected_inv_freq(theta, rope_dim, yarn=None):
    """SPEC §3.6: base frequencies, YaRN-blended on compressed layers (no mscale)."""
    f = theta ** (-np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
    if yarn:
        def correction(rotations):
            original = yarn["original_max_position_embeddings"]
            return rope_dim * math.log(original / (2 * math.pi * rotations)) / (2 * math.log(theta))
        low = max(math.floor(correction(yarn["beta_fast"])), 0)
        high = min(math.ceil(correction(yarn["beta_slow"])), rope_dim - 1)
        ramp = np.clip((np.arange(rope_dim // 2) - low) / max(high - low, 1e-3), 0.0, 1.0)
        f = f / yarn["factor"] * ramp + f * (1 - ramp)
    return f


def rope_report(model, cfg):
    """Every rotary table transformers built against SPEC §3.6: (max relative difference, problems,
    transformers' own tables)."""
    want = {"main": expected_inv_freq(cfg["rope_theta"], cfg["qk_rope_head_dim"]),
            "compress": expected_inv_freq(cfg["compress_rope_theta"], cfg["qk_rope_head_dim"], cfg["rope_scaling"])}
    worst, problems, tables = 0.0, [], {}
    rotaries = modules_of(model, "DeepseekV4RotaryEmbedding")
    if not rotaries:
        return math.inf, ["no DeepseekV4RotaryEmbedding module"], tables
    for name, rotary in rotaries:
        for kind, freq in want.items():
            got = getattr(rotary, f"{kind}_inv_freq", None)
            scaling = getattr(rotary, f"{kind}_attention_scaling", None)
            if got is None:
                problems.append(f"{name or 'rotary'}: no {kind}_inv_freq")
                continue
            got = got.detach().double().cpu().numpy()
            tables[kind] = [float(v) for v in got]
            if got.shape != freq.shape:
                problems.append(f"{name}: {kind}_inv_freq has shape {got.shape}, expected {freq.shape}")
                continue
            worst = max(worst, float(np.max(np.abs(got - freq) / freq)))
            if scaling != 1.0:
                problems.append(f"{name}: {kind}_attention_scaling = {scaling}, expected 1.0 (no mscale)")
    return worst, problems, tables


# ---- the name mapping, official -> transformers (SPEC §2.7) ----

TOP_LEVEL_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}
# within layers.{i}. -> model.layers.{i}.; a tuple lists the names of different transformers versions
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "hc_attn_fn": "attn_hc.fn", "hc_attn_base": "attn_hc.base", "hc_attn_scale": "attn_hc.scale",
    "hc_ffn_fn": "ffn_hc.fn", "hc_ffn_base": "ffn_hc.base", "hc_ffn_scale": "ffn_hc.scale",
    "attn.attn_sink": "self_attn.sinks",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_norm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv.weight": "self_attn.kv_proj.weight",
    "attn.kv_norm.weight": "self_attn.kv_norm.weight",
    "attn.wo_a.weight": "self_attn.o_a_proj.weight",
    "attn.wo_b.weight": "self_attn.o_b_proj.weight",
    "attn.compressor.wkv.weight": "self_attn.compressor.kv_proj.weight",
    "attn.compressor.wgate.weight": "self_attn.compressor.gate_proj.weight",
    "attn.compressor.ape": "self_attn.compressor.position_bias",
    "attn.compressor.norm.weight": "self_attn.compressor.kv_norm.weight",
    "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "attn.indexer.weights_proj.weight": ("self_attn.compressor.indexer.scorer.weights_proj.weight",
                                         "self_attn.compressor.indexer.weights_proj.weight"),
    "attn.indexer.compressor.wkv.weight": "self_attn.compressor.indexer.kv_proj.weight",
    "attn.indexer.compressor.wgate.weight": "self_attn.compressor.indexer.gate_proj.weight",
    "attn.indexer.compressor.ape": "self_attn.compressor.indexer.position_bias",
    "attn.indexer.compressor.norm.weight": "self_attn.compressor.indexer.kv_norm.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
}
EXPERT_NAME = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w1|w2|w3)\.weight$")


def hf_name(official, hf_shapes):
    """transformers' key of a (non-expert, non-MTP) official tensor, or None."""
    if official in TOP_LEVEL_NAMES:
        return TOP_LEVEL_NAMES[official]
    m = re.match(r"^layers\.(\d+)\.(.*)$", official)
    if not m or m.group(2) not in LAYER_NAMES:
        return None
    candidates = LAYER_NAMES[m.group(2)]
    candidates = candidates if isinstance(candidates, tuple) else (candidates,)
    keys = [f"model.layers.{m.group(1)}.{c}" for c in candidates]
    return next((k for k in keys if k in hf_shapes), keys[0])


def hf_state(ck, cfg, hf_shapes):
    """transformers' state dict from the official tensors: renamed, the routed experts merged into
    gate_up_proj [E, 2*inter, D] (w1 rows, then w3 rows) and down_proj [E, D, inter], scales consumed
    by the exact dequantisation. Raises OracleError listing every problem at once."""
    state, source, problems, experts = {}, {}, [], {}
    for official, value in ck.exact.items():
        if official.startswith("mtp."):
            continue
        m = EXPERT_NAME.match(official)
        if m:
            experts.setdefault(int(m.group(1)), {}).setdefault(m.group(3), {})[int(m.group(2))] = value
            continue
        key = hf_name(official, hf_shapes)
        if key is None:
            problems.append(f"no mapping for {official}")
        elif key in state:
            problems.append(f"{key} assigned twice ({source[key]} and {official})")
        else:
            state[key], source[key] = value, official
    n_experts = cfg["n_routed_experts"]
    for layer, parts in sorted(experts.items()):
        w1, w2, w3 = ([parts[w][e] for e in range(n_experts)] for w in ("w1", "w2", "w3"))
        prefix = f"model.layers.{layer}.mlp.experts."
        state[prefix + "gate_up_proj"] = np.stack([np.concatenate([a, b], axis=0) for a, b in zip(w1, w3)])
        state[prefix + "down_proj"] = np.stack(w2)
    for key, value in state.items():
        if key not in hf_shapes:
            problems.append(f"{key} (from {source.get(key, 'the experts')}) is not a model key")
        elif tuple(value.shape) != hf_shapes[key]:
            problems.append(f"{key}: shape {tuple(value.shape)}, the model has {hf_shapes[key]}")
    problems += [f"model key {key} {shape} gets no tensor" for key, shape in hf_shapes.items() if key not in state]
    if problems:
        raise OracleError(f"the name mapping does not fit this transformers ({len(problems)} problems):\n  "
                          + "\n  ".join(problems))
    return state


def unused_official(ck, cfg, hf_shapes):
    """Non-MTP official tensors the state leaves out (a scale counts as used with its weight)."""
    used = set()
    for official in ck.exact:
        if not official.startswith("mtp.") and (EXPERT_NAME.match(official) or hf_name(official, hf_shapes)):
            used.add(official)
            used.add(official[: -len(".weight")] + ".scale" if official.endswith(".weight") else official)
    return sorted(name for name in ck.stored if not name.startswith("mtp.") and name not in used)


def load_checkpoint(model, ck, cfg):
    """Loads the exact fp32 values and reads every one of them back."""
    hf_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = hf_state(ck, cfg, hf_shapes)
    unused = unused_official(ck, cfg, hf_shapes)
    if unused:
        raise OracleError(f"official tensors the model does not take: {unused}")
    as_torch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    model.load_state_dict(as_torch, strict=True)
    differ = [k for k, v in model.state_dict().items() if not torch.equal(v.detach().cpu(), as_torch[k].to(v.dtype))]
    if differ:
        raise OracleError(f"after loading, these model tensors differ from what was loaded (tied or cast?): {differ}")
    if model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr():
        raise OracleError("lm_head is tied to embed_tokens although tie_word_embeddings is false")


# ---- decisions and their margins (SPEC §6.6, §7.1) ----

class Decisions:
    """Hooks transformers' routers and indexers and keeps, per call, every decision row: its absolute
    position, its margin (NaN where nothing is decided) and the selection made."""

    def __init__(self, model, cfg):
        self.k_router, self.k_index = cfg["num_experts_per_tok"], cfg["index_topk"]
        self.rows, self.disagreements, self.zero_scores = [], 0, 0
        self.run, self.positions, self.scores, self.handles = None, None, {}, []
        routers = modules_of(model, "DeepseekV4TopKRouter")
        indexers = modules_of(model, "DeepseekV4Indexer")
        scorers = modules_of(model, "DeepseekV4IndexerScorer")
        if not routers or not indexers or len(scorers) != len(indexers):
            raise OracleError(f"cannot watch the decisions: {len(routers)} DeepseekV4TopKRouter, {len(indexers)} "
                              f"DeepseekV4Indexer, {len(scorers)} DeepseekV4IndexerScorer modules (5.17 has a scorer "
                              "per indexer)")
        for name, m in routers:
            self.handles.append(m.register_forward_hook(self.router_hook(layer_of(name))))
        for name, m in scorers:
            self.handles.append(m.register_forward_hook(self.scorer_hook(layer_of(name))))
        for name, m in indexers:
            self.handles.append(m.register_forward_hook(self.indexer_hook(layer_of(name)), with_kwargs=True))
        self.router_layers = sorted(layer_of(n) for n, _ in routers)
        self.indexer_layers = sorted(layer_of(n) for n, _ in indexers)

    def begin(self, run, positions):
        self.run, self.positions = run, positions

    def keep(self, kind, layer, positions, margins, selections):
        self.rows.append({"run": self.run, "kind": kind, "layer": layer, "positions": positions.cpu().numpy(),
                          "margins": margins.cpu().numpy(), "selections": selections.cpu().numpy()})

    def router_hook(self, layer):
        k = self.k_router

        def hook(module, args, output):
            logits, chosen = output[0].detach().float(), output[2].detach()
            biased = module.score_fn(logits) + module.e_score_correction_bias.float()
            top = biased.topk(k + 1, dim=-1)
            margins = (top.values[:, k - 1] - top.values[:, k]) / biased.abs().amax(-1).clamp_min(1e-30)
            theirs = chosen.sort(-1).values
            mine = top.indices[:, :k].sort(-1).values
            self.disagreements += int(((mine != theirs).any(-1) & (margins > 0)).sum())
            self.keep("router", layer, self.positions, margins, theirs)
        return hook

    def scorer_hook(self, layer):
        def hook(module, args, output):
            self.scores[layer] = output.detach().float()
        return hook

    def indexer_hook(self, layer):
        k = self.k_index

        def hook(module, args, kwargs, output):
            position_ids = kwargs.get("position_ids", args[2] if len(args) > 2 else None)
            positions = position_ids[0].detach()
            scores, picks = self.scores.pop(layer)[0], output[0].detach()  # [S, T], [S, min(k, T)]
            entries = scores.shape[-1]
            j = torch.arange(entries, device=scores.device)
            visible = ((positions + 1) // module.compress_rate).clamp(max=entries)  # SPEC §6.4
            hidden = j[None, :] >= visible[:, None]
            decided = visible > k
            selections = torch.where(picks >= 0, picks, entries).sort(-1).values
            selections = torch.where(selections == entries, -1, selections)
            selections = torch.nn.functional.pad(selections, (0, k - selections.shape[1]), value=-1)
            margins = torch.full(visible.shape, float("nan"), device=scores.device)
            expected = torch.where(j[None, :k] < visible[:, None], j[None, :k], -1) if entries >= k else None
            if entries > k:
                masked = scores.masked_fill(hidden, float("-inf"))
                top = masked.topk(k + 1, dim=-1)
                scale = scores.masked_fill(hidden, 0.0).abs().amax(-1).clamp_min(1e-30)
                margins = torch.where(decided, (top.values[:, k - 1] - top.values[:, k]) / scale, margins)
                expected = torch.where(decided[:, None], top.indices[:, :k].sort(-1).values, expected)
                self.zero_scores += int(((scores == 0) & ~hidden & decided[:, None]).sum())
            if expected is None:  # fewer entries than k: every visible one is picked
                expected = torch.where(j[None, :] < visible[:, None], j[None, :], -1)
                expected = torch.nn.functional.pad(expected, (0, k - entries), value=-1)
            self.disagreements += int(((expected != selections).any(-1) & (~decided | (margins > 0))).sum())
            self.keep("indexer", layer, positions, margins, selections)
        return hook

    def of_run(self, run):
        return [r for r in self.rows if r["run"] == run]

    def margin_summary(self, runs):
        """Smallest margin per kind over the given runs, with where it is."""
        out = {}
        for kind in ("router", "indexer"):
            best = {"min": None, "layer": None, "position": None, "run": None, "decisions": 0}
            for r in self.rows:
                if r["run"] not in runs or r["kind"] != kind:
                    continue
                m = r["margins"]
                decided = ~np.isnan(m)
                best["decisions"] += int(decided.sum())
                if decided.any():
                    i = int(np.nanargmin(m))
                    if best["min"] is None or m[i] < best["min"]:
                        best.update(min=float(m[i]), layer=r["layer"], position=int(r["positions"][i]), run=r["run"])
            out[kind] = best
        return out

    @staticmethod
    def worst(summary):
        """The smallest margin of both kinds (None when nothing was decided)."""
        found = [summary[kind]["min"] for kind in ("router", "indexer") if summary[kind]["min"] is not None]
        return min(found) if found else None

    def selections(self, run, kind, layer, length):
        """[length, k] selections of one run, by absolute position (rows never seen stay -2)."""
        rows = [r for r in self.of_run(run) if r["kind"] == kind and r["layer"] == layer]
        width = rows[0]["selections"].shape[1]
        table = np.full((length, width), -2, np.int32)
        for r in rows:
            table[r["positions"]] = r["selections"]
        return table

    def reset(self):
        self.rows, self.disagreements, self.zero_scores = [], 0, 0


# ---- the runs ----

def call(model, tokens, start, stop, cache, use_cache):
    device = next(model.parameters()).device
    ids = torch.as_tensor(tokens[start:stop], device=device)[None]
    positions = torch.arange(start, stop, device=device)[None]
    with torch.inference_mode():
        out = model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=use_cache)
    return out.logits[0].float(), out.past_key_values


def begin(decisions, run, start, stop, device):
    if decisions is not None:
        decisions.begin(run, torch.arange(start, stop, device=device))


def run_one_shot(model, tokens, decisions=None, run="a"):
    """Run a: the whole sequence in one call, no cache."""
    device = next(model.parameters()).device
    begin(decisions, run, 0, len(tokens), device)
    logits, _ = call(model, tokens, 0, len(tokens), None, False)
    return logits.cpu().numpy()


def run_chunked(model, tokens, chunks, decisions):
    """Run b: the same sequence as consecutive chunks through transformers' cache."""
    device = next(model.parameters()).device
    cache, parts, start = None, [], 0
    for size in chunks:
        begin(decisions, "b", start, start + size, device)
        logits, cache = call(model, tokens, start, start + size, cache, True)
        if cache is None:
            raise OracleError("transformers returned no cache (past_key_values) with use_cache=True")
        parts.append(logits.cpu().numpy())
        start += size
    return np.concatenate(parts), cache


def run_decode(model, tokens, prefill, decisions):
    """Run c: a prefill, then one token per step (the sequence's own next token)."""
    device = next(model.parameters()).device
    begin(decisions, "c", 0, prefill, device)
    _, cache = call(model, tokens, 0, prefill, None, True)
    steps = []
    for t in range(prefill, len(tokens)):
        begin(decisions, "c", t, t + 1, device)
        logits, cache = call(model, tokens, t, t + 1, cache, True)
        steps.append(logits.cpu().numpy())
    return np.concatenate(steps), cache


def relative_error(got, ref):
    """Worst over positions of max|got - ref| / max|ref| (the metric dsrt is held to)."""
    return float(np.max(np.max(np.abs(got - ref), axis=-1) / np.max(np.abs(ref), axis=-1)))


def cache_layer_classes(cache):
    return [type(layer).__name__ for layer in getattr(cache, "layers", [])]


# ---- components neutralised one at a time ----

@contextlib.contextmanager
def patched(tensors, attrs):
    """tensors: [(tensor, new value)] copied in place; attrs: [(object, name, value)]; all restored."""
    saved_tensors = [(t, t.detach().clone()) for t, _ in tensors]
    saved_attrs = [(obj, name, getattr(obj, name)) for obj, name, _ in attrs]
    try:
        with torch.no_grad():
            for t, value in tensors:
                t.copy_(value)
        for obj, name, value in attrs:
            setattr(obj, name, value)
        yield
    finally:
        with torch.no_grad():
            for t, value in saved_tensors:
                t.copy_(value)
        for obj, name, value in saved_attrs:
            setattr(obj, name, value)


def component_patches(model, cfg):
    """name -> (tensor patches, attribute patches) neutralising it; empty when not found."""
    def tensors_of(class_names, attr, value_of):
        found = [m for c in class_names for _, m in modules_of(model, c)]
        return [(getattr(m, attr), value_of(getattr(m, attr)))
                for m in found if isinstance(getattr(m, attr, None), torch.Tensor)]

    def attrs_of(class_names, attr, value):
        return [(m, attr, value) for c in class_names for _, m in modules_of(model, c) if hasattr(m, attr)]

    plain = torch.tensor(expected_inv_freq(cfg["compress_rope_theta"], cfg["qk_rope_head_dim"]), dtype=torch.float32)
    return {
        "attn_sink": (tensors_of(["DeepseekV4Attention"], "sinks", lambda t: torch.full_like(t, NEUTRAL_SINK)), []),
        "compressor_ape": (tensors_of(["DeepseekV4CSACompressor", "DeepseekV4HCACompressor", "DeepseekV4Indexer"],
                                      "position_bias", torch.zeros_like), []),
        "router_bias": (tensors_of(["DeepseekV4TopKRouter"], "e_score_correction_bias", torch.zeros_like), []),
        "swiglu_clamp": ([], attrs_of(["DeepseekV4Experts", "DeepseekV4MLP"], "limit", math.inf)),
        "index_topk": ([], attrs_of(["DeepseekV4Indexer"], "index_topk", 10 ** 9)),
        "yarn": (tensors_of(["DeepseekV4RotaryEmbedding"], "compress_inv_freq", lambda t: plain.to(t.device)), []),
    }


def component_effects(model, cfg, tokens, baseline, checks):
    effects = {}
    for name, (tensors, attrs) in component_patches(model, cfg).items():
        if not tensors and not attrs:
            checks.record(f"component_{name}_visible", False, None, VISIBLE_EFFECT, "nothing to neutralise found")
            continue
        with patched(tensors, attrs):
            logits = run_one_shot(model, tokens)
        effects[name] = float(np.max(np.abs(logits - baseline)) / np.max(np.abs(baseline)))
        checks.record(f"component_{name}_visible", effects[name] >= VISIBLE_EFFECT, effects[name], VISIBLE_EFFECT,
                      f"{len(tensors) + len(attrs)} places neutralised")
    restored = relative_error(run_one_shot(model, tokens), baseline)
    checks.record("components_restored", restored <= 1e-6, restored, 1e-6, "run a again after the ablations")
    return effects


# ---- probes of single modules against the SPEC formulas ----

def swiglu(x, w1, w3, w2, limit):
    """SPEC §7.2-7.3 in fp32: SiLU(min(w1 x, limit)) * clamp(w3 x, +-limit), then w2."""
    g = (x @ w1.T).clamp(max=limit)
    u = (x @ w3.T).clamp(min=-limit, max=limit)
    return (torch.nn.functional.silu(g) * u) @ w2.T


def expert_probe(model, ck, cfg, device):
    """Layer 0's routed experts and shared expert, fed large inputs so the clamp acts, against the
    formula on the OFFICIAL w1/w3/w2 (so a swapped gate/up or a missing clamp shows)."""
    mlp, limit, worst = model.model.layers[0].mlp, cfg["swiglu_limit"], 0.0
    x = 4.0 * torch.randn(64, cfg["hidden_size"], generator=torch.Generator().manual_seed(0)).to(device)

    def official(name):
        return torch.from_numpy(ck.exact[name]).to(device)

    with torch.no_grad():
        for e in range(cfg["n_routed_experts"]):
            p = f"layers.0.ffn.experts.{e}."
            index = torch.full((x.shape[0], 1), e, dtype=torch.long, device=device)
            got = mlp.experts(x, index, torch.ones(x.shape[0], 1, device=device))
            want = swiglu(x, official(p + "w1.weight"), official(p + "w3.weight"), official(p + "w2.weight"), limit)
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
        p = "layers.0.ffn.shared_experts."
        got = mlp.shared_experts(x)
        want = swiglu(x, official(p + "w1.weight"), official(p + "w3.weight"), official(p + "w2.weight"), limit)
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    return worst


def format_tables_problems():
    """numpy's decoding here against torch's own dtypes: every e4m3 and e8m0 byte, and bf16 codes."""
    problems = []
    e4m3 = np.array([b for b in range(256) if b not in (0x7F, 0xFF)], np.uint8)
    got = torch.from_numpy(e4m3).view(torch.float8_e4m3fn).float().numpy()
    if not np.array_equal(got, E4M3_VALUES[e4m3].astype(np.float32)):
        problems.append("e4m3 table differs from torch.float8_e4m3fn")
    e8m0 = np.arange(255, dtype=np.uint8)
    got = torch.from_numpy(e8m0).view(torch.float8_e8m0fnu).float().numpy()
    if not np.array_equal(got, e8m0_value(e8m0).astype(np.float32)):
        problems.append("e8m0 values differ from torch.float8_e8m0fnu")
    sample = np.random.default_rng(0).standard_normal(4096) * np.exp(np.random.default_rng(1).uniform(-20, 20, 4096))
    bits = bf16_bits(sample)
    via_torch = torch.from_numpy(sample.astype(np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    if not np.array_equal(bits, via_torch):
        problems.append("bf16 rounding differs from torch's")
    got = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    if not np.array_equal(got, bf16_value(bits)):
        problems.append("bf16 decoding differs from torch's")
    return problems


def use_ieee_fp32(log):
    """No TF32 in fp32 matmuls (the default, set anyway); fp32_matmul_error() says whether it held."""
    for what, apply in (("torch.set_float32_matmul_precision('highest')",
                         lambda: torch.set_float32_matmul_precision("highest")),
                        ("torch.backends.cuda.matmul.allow_tf32 = False",
                         lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", False))):
        try:
            apply()
        except Exception as e:  # a torch that wants its newer switch: the measurement decides
            log(f"  {what}: {e!r}")


def fp32_matmul_error(device):
    """Relative error of an fp32 matmul on the device against float64: ~1e-7 when IEEE, ~1e-3 under TF32."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 512, generator=g), torch.randn(512, 256, generator=g)
    got = (a.to(device) @ b.to(device)).cpu().double()
    want = a.double() @ b.double()
    return float((got - want).abs().max() / want.abs().max())


def readback_problems(path, tensors):
    """The written file through the reference safetensors library: names, dtypes, shapes, bytes."""
    from safetensors import safe_open
    torch_dtypes = {"F32": torch.float32, "I64": torch.int64, "I32": torch.int32, "BF16": torch.bfloat16,
                    "F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": torch.float8_e8m0fnu, "I8": torch.int8}
    problems = []
    with safe_open(path, framework="pt") as f:
        if sorted(f.keys()) != sorted(tensors):
            problems.append(f"{path}: names differ")
        for name in sorted(set(f.keys()) & set(tensors)):
            dtype, array = tensors[name]
            t = f.get_tensor(name)
            raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            if t.dtype != torch_dtypes[dtype] or list(t.shape) != list(array.shape) or raw != array.tobytes():
                problems.append(f"{path}: {name} reads back as {t.dtype} {list(t.shape)} or other bytes")
    return problems


# ---- the fixture ----

def expected_tensors(tokens, logits, decisions, cfg):
    """expected.safetensors: per run its tokens and logits; run a's selections."""
    n = len(tokens)
    as_i32 = tokens.astype(np.int32)
    tensors = {
        "a.tokens": ("I32", as_i32), "a.logits": ("F32", logits["a"].astype(np.float32)),
        "b.tokens": ("I32", as_i32), "b.logits": ("F32", logits["b"].astype(np.float32)),
        "b.chunks": ("I32", np.array(CHUNKS, np.int32)),
        "c.tokens": ("I32", as_i32), "c.logits": ("F32", logits["c"].astype(np.float32)),
        "c.positions": ("I32", np.arange(DECODE_FROM, n, dtype=np.int32)),
    }
    names = {"router": {}, "indexer": {}}
    for kind, layers in (("router", decisions.router_layers), ("indexer", decisions.indexer_layers)):
        for layer in layers:
            name = f"a.{kind}.layers.{layer}"
            tensors[name] = ("I32", decisions.selections("a", kind, layer, n))
            names[kind][str(layer)] = name
    return tensors, names


def runs_meta(n, vocab):
    return {
        "a": {"what": "one-shot prefill of the whole sequence, no cache", "tokens": "a.tokens", "logits": "a.logits",
              "logits_shape": [n, vocab], "positions": [0, n]},
        "b": {"what": "chunked prefill through the cache", "tokens": "b.tokens", "logits": "b.logits",
              "logits_shape": [n, vocab], "chunks": list(CHUNKS), "chunks_tensor": "b.chunks"},
        "c": {"what": "prefill, then one token per step (the sequence's own tokens); logits of the steps",
              "tokens": "c.tokens", "logits": "c.logits", "logits_shape": [n - DECODE_FROM, vocab],
              "prefill": DECODE_FROM, "positions_tensor": "c.positions"},
    }


def search_seeds(model, cfg, first, count, margin, log):
    """Run a for seed first, first+1, ... until every decision has a margin >= `margin`; when no seed
    of the `count` does, the one whose smallest margin is largest."""
    decisions = Decisions(model, cfg)
    log("   seed   router margin (layer@pos)     indexer margin (layer@pos)   zero index scores   seconds")
    best = None
    for seed in range(first, first + count):
        start = time.time()
        ck = build_checkpoint(cfg, seed)
        load_checkpoint(model, ck, cfg)
        decisions.reset()
        run_one_shot(model, make_tokens(cfg, seed), decisions)
        s = decisions.margin_summary({"a"})
        worst = Decisions.worst(s)
        log(f"  {seed:5d}   {shown(s['router']['min'])} ({s['router']['layer']}@{s['router']['position']})"
            f"          {shown(s['indexer']['min'])} ({s['indexer']['layer']}@{s['indexer']['position']})"
            f"          {decisions.zero_scores:5d}               {time.time() - start:.1f}")
        if best is None or (worst is not None and (best[0] is None or worst > best[0])):
            best = (worst, seed, ck)
        if worst is not None and worst >= margin:
            break
    return best[1], best[2], decisions


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=1, help="first seed tried")
    parser.add_argument("--search", type=int, default=50, help="seeds tried at most")
    parser.add_argument("--margin", type=float, default=1e-4, help="smallest decision margin accepted")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv[1:])
    cfg = TINY_CONFIG
    os.makedirs(args.out_dir, exist_ok=True)
    log = Log(os.path.join(args.out_dir, "oracle.log"))
    checks = Checks(log)
    meta = {"generator": "tests/oracle/dsv4_oracle.py", "ok": False, "checks": checks.items,
            "compare": {"precision": "fp32", "tolerance": DSRT_TOLERANCE,
                        "metric": "per position: max|dsrt - expected| / max|expected|"}}
    try:
        run_oracle(args, cfg, log, checks, meta)
        meta["ok"] = checks.all_ok()
    except Exception as e:
        if isinstance(e, OracleError):
            log(f"\nFAILED: {e}")
        else:
            log(f"\nFAILED with an unexpected error:\n{traceback.format_exc()}")
        meta["failure"] = str(e)
    write_json(os.path.join(args.out_dir, "meta.json"), meta)
    summary(log, meta)
    return 0 if meta["ok"] else 1


def run_oracle(args, cfg, log, checks, meta):
    out = args.out_dir
    log.section("versions and device")
    transformers, DeepseekV4Config, modeling = load_transformers()
    device = torch.device(args.device)
    use_ieee_fp32(log)
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
                "numpy": np.__version__}
    if device.type == "cuda":
        versions["device"] = torch.cuda.get_device_name(device)
    log(*[f"  {k}: {v}" for k, v in versions.items()])
    meta["versions"] = versions
    matmul_error = fp32_matmul_error(device)
    checks.record("fp32_matmul_is_ieee", matmul_error < 1e-5, matmul_error, 1e-5, "TF32 would give ~1e-3")
    problems = format_tables_problems()
    if problems:
        raise OracleError("number formats: " + "; ".join(problems))
    log("  e4m3, e8m0 and bf16 tables here agree with torch's dtypes")

    log.section("config and model")
    write_json(os.path.join(out, "config.json"), cfg)
    config, form = build_hf_config(DeepseekV4Config, cfg, log)
    meta["transformers_config_form"] = form
    log("  transformers config:", *[f"    {line}" for line in config_text(config).splitlines()])
    model, experts_impl = build_model(modeling, config, device, log)
    checks.record("experts_eager", experts_impl in (None, "eager"), experts_impl, "eager")
    problems = structure_problems(model, cfg, log)
    if problems:
        raise OracleError("the model is not built as meant:\n  " + "\n  ".join(problems))
    log("  state_dict:", *[f"    {k} {tuple(v.shape)} {v.dtype}" for k, v in model.state_dict().items()])
    rope_error, problems, tables = rope_report(model, cfg)
    if problems:
        raise OracleError("RoPE tables: " + "; ".join(problems))
    checks.record("rope_inv_freq", rope_error <= 1e-6, rope_error, 1e-6, "against SPEC §3.6 (YaRN on compressed only)")
    meta["rope_inv_freq"] = tables

    log.section(f"seed search from {args.seed} (at most {args.search}): run a until every margin >= {args.margin}")
    seed, ck, decisions = search_seeds(model, cfg, args.seed, args.search, args.margin, log)
    log(f"  chosen seed {seed}")
    meta["seed"], meta["first_seed_tried"] = seed, args.seed
    model_bytes = write_safetensors(os.path.join(out, "model.safetensors"), ck.stored,
                                    {"format": "pt", "producer": "tests/oracle/dsv4_oracle.py", "seed": str(seed)})
    log(f"  wrote config.json and model.safetensors ({len(ck.stored)} tensors, {model_bytes} bytes)")
    problems = readback_problems(os.path.join(out, "model.safetensors"), ck.stored)
    checks.record("model_file_reads_back", not problems, len(problems), 0, "; ".join(problems[:5]))

    log.section("runs a, b, c")
    load_checkpoint(model, ck, cfg)
    tokens = make_tokens(cfg, seed)
    decisions.reset()
    logits = {"a": run_one_shot(model, tokens, decisions)}
    logits["b"], cache = run_chunked(model, tokens, CHUNKS, decisions)
    log(f"  cache layers after run b: {cache_layer_classes(cache)}")
    logits["c"], cache = run_decode(model, tokens, DECODE_FROM, decisions)
    for run, value in logits.items():
        log(f"  run {run}: logits {value.shape}, max |logit| {np.max(np.abs(value)):.3f}")
        checks.record(f"run_{run}_finite", bool(np.all(np.isfinite(value))), bool(np.all(np.isfinite(value))), True)
    b_error, c_error = relative_error(logits["b"], logits["a"]), relative_error(logits["c"], logits["a"][DECODE_FROM:])
    checks.record("chunked_equals_one_shot", b_error <= CONSISTENCY_LIMIT, b_error, CONSISTENCY_LIMIT)
    checks.record("decode_equals_one_shot", c_error <= CONSISTENCY_LIMIT, c_error, CONSISTENCY_LIMIT)
    meta["consistency"] = {"b_vs_a": b_error, "c_vs_a": c_error}

    margins = decisions.margin_summary({"a", "b", "c"})
    worst = Decisions.worst(margins)
    for kind in ("router", "indexer"):
        count = margins[kind]["decisions"]
        checks.record(f"{kind}_decides", count > 0, count, "> 0", "decision rows over runs a, b, c")
    checks.record("decision_margins", worst is not None and worst >= args.margin, worst, args.margin,
                  "smallest (k-th - (k+1)-th) / max|candidate| over every decision of runs a, b, c")
    checks.record("hooks_agree_with_transformers", decisions.disagreements == 0, decisions.disagreements, 0,
                  "selections recomputed from the hooked scores")
    mismatches = selection_mismatches(decisions, len(tokens))
    checks.record("selections_agree_across_runs", mismatches == 0, mismatches, 0, "b and c against a, per position")
    meta["margins"] = {"required": args.margin, **margins, "indexer_zero_scores": decisions.zero_scores}
    for handle in decisions.handles:
        handle.remove()

    log.section("modules against the SPEC formulas, components neutralised")
    probe_error = expert_probe(model, ck, cfg, device)
    checks.record("experts_match_spec", probe_error <= 1e-5, probe_error, 1e-5, "layer 0 routed + shared, clamp active")
    meta["component_effects"] = component_effects(model, cfg, tokens, logits["a"], checks)

    log.section("writing the fixture")
    tensors, selection_names = expected_tensors(tokens, logits, decisions, cfg)
    metadata = {"producer": "tests/oracle/dsv4_oracle.py", "seed": str(seed), "transformers": transformers.__version__}
    write_safetensors(os.path.join(out, "expected.safetensors"), tensors, metadata)
    problems = readback_problems(os.path.join(out, "expected.safetensors"), tensors)
    checks.record("expected_file_reads_back", not problems, len(problems), 0, "; ".join(problems[:5]))
    meta["runs"] = runs_meta(len(tokens), cfg["vocab_size"])
    meta["selections"] = {"what": "run a: experts chosen per learned router layer, and indexer picks "
                                  "(ascending, -1 = none) per CSA layer, [positions, k]", **selection_names}
    meta["sequence_length"] = len(tokens)
    write_json(os.path.join(out, "meta.json"), meta)  # the size check below counts it
    sizes = {f: os.path.getsize(os.path.join(out, f)) for f in ("config.json", "model.safetensors",
                                                                 "expected.safetensors", "meta.json")}
    meta["file_bytes"] = sizes
    checks.record("fixture_size", sum(sizes.values()) < FIXTURE_BYTES_LIMIT, sum(sizes.values()), FIXTURE_BYTES_LIMIT)


def selection_mismatches(decisions, length):
    """Positions of runs b and c whose selections differ from run a's."""
    count = 0
    for kind, layers in (("router", decisions.router_layers), ("indexer", decisions.indexer_layers)):
        for layer in layers:
            a = decisions.selections("a", kind, layer, length)
            for run in ("b", "c"):
                other = decisions.selections(run, kind, layer, length)
                seen = other[:, 0] != -2
                count += int(np.any(other[seen] != a[seen], axis=1).sum())
    return count


def shown(value):
    return f"{value:.3e}" if isinstance(value, float) else str(value)


def summary(log, meta):
    log.section("summary")
    log(f"  seed {meta.get('seed')}, transformers {meta.get('versions', {}).get('transformers')}, "
        f"config read in the {meta.get('transformers_config_form')}")
    m = meta.get("margins")
    if m:
        for kind in ("router", "indexer"):
            log(f"  {kind:8s} min margin {shown(m[kind]['min'])} at layer {m[kind]['layer']} position "
                f"{m[kind]['position']} (run {m[kind]['run']}, {m[kind]['decisions']} decisions)")
    for name, value in (meta.get("component_effects") or {}).items():
        log(f"  neutralising {name:15s} moves the logits by {value:.3e} of their largest")
    log(f"  {'check':34s} {'result':6s} {'value':>14s}  limit")
    for name, item in meta["checks"].items():
        log(f"  {name:34s} {'ok' if item['ok'] else 'FAIL':6s} {shown(item['value']):>14s}  {item['limit']}")
    if "failure" in meta:
        log(f"  STOPPED: {(meta['failure'].splitlines() or ['(no message)'])[0]}")
    log(f"  fixture {'OK' if meta['ok'] else 'NOT OK'}")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
