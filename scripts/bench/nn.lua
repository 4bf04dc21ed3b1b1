-- scripts/bench/nn.lua - the DSV4 numerical primitives (runtime/nn.h on kernels/norm.cu and
-- kernels/hc.cu) at Flash sizes (SPEC §1.1: dim 4096, hc 4, 64 heads × 512, index heads × 128),
-- reference precision (bf16 activations), at decode (T = 1, launch-latency bound: the time is the
-- number to read) and prefill (T = 4096, bandwidth bound: GB/s against the copy ceiling).
--
-- Bytes are what must move: every input read once and every output written once (hc_pre reads X
-- once for the GEMM and again for the collapse, but counts it once; fn's re-reads from L2 are free;
-- the double partial sums of the split GEMM, T·splits·25·8 bytes, are not counted either).
-- Called by scripts/bench.lua with ctx = {report, time_ms, quick, dev}.
local dsrt = require "dsrt"
local nn = dsrt.nn

return function(ctx)
  local dev, report, time_ms = ctx.dev, ctx.report, ctx.time_ms
  local DIM, HC, HEADS, HEAD_DIM = 4096, 4, 64, 512
  local M, K = (2 + HC) * HC, HC * DIM
  local function randn(shape, dtype, std, seed)
    return dsrt.randn(shape, { device = dev, dtype = dtype, std = std or 1, seed = seed })
  end
  local weight = randn({ DIM }, "bf16", 0.1, 11) + 1
  local fn = randn({ M, K }, "f32", 2 / math.sqrt(K), 12)
  local scale = dsrt.tensor({ 0.5, 0.5, 0.5 }):to(dev)
  local base = randn({ M }, "f32", 0.5, 13)

  for _, T in ipairs({ 1, 16, 4096 }) do
    local x = randn({ T, DIM }, "bf16", 1, 20 + T)
    report(("nn.rms_norm bf16 T=%d d=%d"):format(T, DIM),
           time_ms(function() return nn.rms_norm(x, weight, 1e-6, "reference") end), 2 * T * DIM * 2 + 2 * DIM)

    local X = randn({ T, HC, DIM }, "bf16", 1, 30 + T)
    local bytes = T * K * 2 + M * K * 4 + T * DIM * 2 + T * (HC + HC * HC) * 4
    report(("nn.hc_pre bf16 T=%d hc=%d d=%d"):format(T, HC, DIM),
           time_ms(function() return nn.hc_pre(X, fn, scale, base, 1e-6, 1e-6, 20, "reference") end), bytes,
           2 * T * M * K)

    local f = randn({ T, DIM }, "bf16", 1, 40 + T)
    local post, comb = randn({ T, HC }, "f32", 1, 50 + T), randn({ T, HC, HC }, "f32", 1, 60 + T)
    report(("nn.hc_post bf16 T=%d hc=%d d=%d"):format(T, HC, DIM),
           time_ms(function() return nn.hc_post(f, X, post, comb, "reference") end),
           T * DIM * 2 + 2 * T * K * 2 + T * (HC + HC * HC) * 4)
    -- the fused pair (the model's step between two sublayers): X' written once, read back only for
    -- many tokens; compare with the two rows above together
    report(("nn.hc_post_pre bf16 T=%d hc=%d d=%d"):format(T, HC, DIM),
           time_ms(function() return nn.hc_post_pre(f, X, post, comb, fn, scale, base, 1e-6, 1e-6, 20, "reference") end),
           T * DIM * 2 + 2 * T * K * 2 + M * K * 4 + T * DIM * 2 + 2 * T * (HC + HC * HC) * 4, 2 * T * M * K)
    X, f, post, comb, x = nil, nil, nil, nil, nil
    collectgarbage()
  end

  -- prefill-sized companions: the q head norm, RoPE of q, the indexer's Hadamard, the KV round trip
  local S = ctx.quick and 512 or 4096
  local q = randn({ S, HEADS, HEAD_DIM }, "bf16", 1, 70)
  report(("nn.head_rms_norm bf16 [%d, %d, %d]"):format(S, HEADS, HEAD_DIM),
         time_ms(function() return nn.head_rms_norm(q, 1e-6, "reference") end), 2 * q:numel() * 2)
  local pos = dsrt.arange(0, S, 1, { dtype = "i64" }):to(dev)
  report(("nn.rope bf16 [%d, %d, %d]"):format(S, HEADS, HEAD_DIM),
         time_ms(function() return nn.rope(q, pos, 10000, nil, false, "reference") end), 2 * q:numel() * 2 + S * 8)
  q = nil
  local iq = randn({ S, 64, 128 }, "bf16", 1, 71)
  report(("nn.hadamard128 bf16 [%d, 64, 128]"):format(S),
         time_ms(function() return nn.hadamard128(iq, "reference") end), 2 * iq:numel() * 2)
  local kv = randn({ S, 512 }, "bf16", 1, 72)
  report(("nn.quant_roundtrip_q8 bf16 [%d, 512]"):format(S),
         time_ms(function() return nn.quant_roundtrip_q8(kv, 64, 1, 448, "reference") end), 2 * S * 448 * 2)
end
