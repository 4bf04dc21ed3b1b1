-- bench/attention.lua - the attention family's rows of scripts/bench.lua (Flash sizes, SPEC §1.1).
--
-- Sparse attention with the sink (nn.sparse_attention, kernels/sparse_attention.cu), H = 64 heads
-- of D = 512, K = 640 entries (window 128 + top-k 512) per query row:
--   decode (S = 1) is memory bound: the bytes counted are those that must move, the gathered pool
--   rows (K x D) once, q, the indices and the output; GB/s against the copy ceiling;
--   prefill (S = 4096) is compute bound: 4·S·H·K·D FLOPs (q·kv and p·v), TFLOP/s; bf16 in reference
--   precision runs on the tensor cores (mma.sync), f32 in fp32 precision on the CUDA cores.
local function sparse_rows(ctx)
  local dsrt = require "dsrt"
  local nn = dsrt.nn
  local dev, report, time_ms = ctx.dev, ctx.report, ctx.time_ms
  local H, D, K, N = 64, 512, 640, 65536
  local scale = 1 / math.sqrt(D)
  local sink = dsrt.randn({ H }, { device = dev, seed = 31 })
  local pool32 = dsrt.randn({ N, D }, { device = dev, seed = 32 })
  local pools = { bf16 = pool32:to("bf16"), f32 = pool32 }
  local SIZE = { bf16 = 2, f32 = 4 }
  local function indices(S, seed)
    return (dsrt.rand({ S, K }, { device = dev, seed = seed }) * (N - 1)):to("i32")
  end

  local idx1 = indices(1, 33)
  for _, c in ipairs({ { "bf16", "reference" }, { "f32", "fp32" } }) do
    local dt, precision = c[1], c[2]
    local q = dsrt.randn({ 1, H, D }, { device = dev, seed = 34, dtype = dt })
    local pool = pools[dt]
    local bytes = K * D * SIZE[dt] + 2 * H * D * SIZE[dt] + K * 4
    report(("sparse_attn decode %s K=%d"):format(dt, K),
           time_ms(function() return nn.sparse_attention(q, pool, idx1, sink, scale, precision) end), bytes)
  end

  local S = ctx.quick and 512 or 4096
  local idx = indices(S, 35)
  local q = dsrt.randn({ S, H, D }, { device = dev, seed = 36, dtype = "bf16" })
  report(("sparse_attn prefill bf16 S=%d K=%d"):format(S, K),
         time_ms(function() return nn.sparse_attention(q, pools.bf16, idx, sink, scale, "reference") end, ctx.quick and 3 or 5),
         nil, 4 * S * H * K * D)
  local q32 = q:to("f32")
  report(("sparse_attn prefill f32 S=%d K=%d"):format(S, K),
         time_ms(function() return nn.sparse_attention(q32, pools.f32, idx, sink, scale, "fp32") end, ctx.quick and 3 or 5),
         nil, 4 * S * H * K * D)
end

-- The attention layer (runtime/attention.c, SPEC §6) of the first Flash ratio-4 layer (CSA: the
-- overlapping compressor and the lightning indexer, top-512) on random weights in the checkpoint's
-- formats, one decode step at context 4096 (each run forwards position 4096 and truncates back),
-- with the 3 aux streams of SPEC §10 and without: the time per step, the overlap the streams buy
-- (none at decode, where the layer runs on one stream: runtime/attention.c AUX_MIN_ROWS).
-- Bytes that must move: the layer's weights once, the KV rows attention reads (window 128 + top-k
-- 512 f32 rows of 512) and the indexer keys it scores (1024 f32 rows of 128).
local function layer_rows(ctx)
  local dsrt = require "dsrt"
  local cjson = require "cjson"
  local config = require "dsrt.dsv4.config"
  local weights = require "dsrt.dsv4.weights"
  local f = assert(io.open("tests/fixtures/config/flash_published.json"))
  local raw = cjson.decode(f:read("a"))
  f:close()
  local L -- the first ratio-4 layer (1-based); the config keeps layers 1 … L only
  for i, r in ipairs(raw.compress_ratios) do
    if r == 4 then L = i break end
  end
  local ratios = {}
  for i = 1, L do ratios[i] = raw.compress_ratios[i] end
  for k = 1, raw.num_nextn_predict_layers do ratios[L + k] = raw.compress_ratios[raw.num_hidden_layers + k] end
  raw.num_hidden_layers, raw.compress_ratios = L, ratios
  raw.num_hash_layers = math.min(raw.num_hash_layers, L)
  local cfg = config.parse(raw, "flash, " .. L .. " layers")
  local w = weights.random(cfg, { device = ctx.dev, seed = 5, mtp = false })
  local attn = w.layers[L].attn
  local function nbytes(t)
    if dsrt.is_tensor(t) then return t:nbytes() end
    local n = 0
    if type(t) == "table" then
      for _, v in pairs(t) do n = n + nbytes(v) end
    end
    return n
  end
  local T, d = 4096, cfg.dims
  local bytes = nbytes(attn) + (d.window + d.index_topk) * d.head_dim * 4 + (T // 4) * d.index_head_dim * 4
  local x = dsrt.randn({ T + 1, d.dim }, { device = ctx.dev, seed = 6, dtype = "bf16" })
  local streams = { dsrt.stream(ctx.dev), dsrt.stream(ctx.dev), dsrt.stream(ctx.dev) }
  for _, with_aux in ipairs({ true, false }) do
    local att = dsrt.attention(cfg.layers[L], d, attn, with_aux and streams or {})
    local st = dsrt.attn_state(att, { max_len = T + 1, slack = 1, precision = "reference", device = ctx.dev })
    att:forward(st, x:narrow(1, 1, T))
    local x1 = x:narrow(1, T + 1, 1)
    local ms = ctx.time_ms(function()
      local y = att:forward(st, x1)
      st:truncate(T)
      return y
    end)
    ctx.report(("attention CSA decode @%d %s"):format(T, with_aux and "3 aux" or "no aux"), ms, bytes)
    st:close()
    att:close()
  end
end

return function(ctx)
  sparse_rows(ctx)
  layer_rows(ctx)
end
