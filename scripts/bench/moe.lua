-- bench/moe.lua - the Flash-sized MoE layer on CUDA (kernels/moe.cu), for scripts/bench.lua.
--
-- Flash's shapes (SPEC §1.1): dim 4096, 256 routed experts of inter 2048 in FP4 (e2m1 + e8m0 per
-- 32 inputs), 6 active per token, one shared expert in FP8 (e4m3 + e8m0 per 128x128), a bf16 gate,
-- learned routing. Weights are random, made on the device.
--   decode (T = 1, 4): memory-bound; GB/s over the weight bytes a step must read: each distinct
--     selected expert's w1, w2, w3 with their scales, the shared expert's, the gate's;
--   prefill (T = 4096): TFLOP/s over 2 FLOPs per weight per routed or shared row, plus the gate
--     (reference: bf16 tensor-core GEMMs on dequantised copies; fp32: f32 GEMMs, no TF32).
return function(ctx)
  local dsrt = require "dsrt"
  local dev = ctx.dev
  local dim, inter, n, k = 4096, 2048, 256, 6
  local seed = 500
  local function next_seed() seed = seed + 1 return seed end

  local function pow2(shape, lo, hi)
    return (dsrt.rand(shape, { seed = next_seed(), low = lo, high = hi, device = dev }) * math.log(2)):exp():to("f8e8m0")
  end
  local function fp4(rows, cols)
    return { format = "fp4", weight = dsrt.randn({ rows, cols }, { seed = next_seed(), std = 2.5, device = dev }):to("fp4e2m1"),
             scale = pow2({ rows, cols // 32 }, -8, -5) }
  end
  local function fp8(rows, cols)
    return { format = "fp8", weight = dsrt.randn({ rows, cols }, { seed = next_seed(), std = 30, device = dev }):to("f8e4m3"),
             scale = pow2({ (rows + 127) // 128, (cols + 127) // 128 }, -10, -8) }
  end

  local experts = {}
  for e = 1, n do
    experts[e] = { w1 = fp4(inter, dim), w2 = fp4(dim, inter), w3 = fp4(inter, dim) }
    if e % 32 == 0 then collectgarbage() end -- the f32 staging of the conversions goes back to the cache
  end
  local ffn = {
    gate = { weight = dsrt.randn({ n, dim }, { seed = next_seed(), std = 0.03, device = dev }):to("bf16"),
             bias = dsrt.randn({ n }, { seed = next_seed(), std = 0.01, device = dev }) },
    experts = experts,
    shared_experts = { w1 = fp8(inter, dim), w2 = fp8(dim, inter), w3 = fp8(inter, dim) },
  }
  local dims = { n_routed_experts = n, n_activated_experts = k, score_func = "sqrtsoftplus", route_scale = 1.5,
                 swiglu_limit = 10 }
  local moe = dsrt.moe(dims, ffn, { dsrt.stream(dev), dsrt.stream(dev), dsrt.stream(dev) })

  local expert_bytes = 3 * (inter * dim / 2 + inter * dim / 32)       -- fp4 codes + e8m0 scales
  local shared_bytes = 3 * (inter * dim + (inter // 128) * (dim // 128)) -- fp8 codes + scales
  local gate_bytes = n * dim * 2
  local function distinct_experts(x)
    local ids = moe:route(x):to("cpu"):reshape(-1):totable()
    local seen, count = {}, 0
    for _, e in ipairs(ids) do
      if not seen[e] then seen[e], count = true, count + 1 end
    end
    return count
  end

  for _, rows in ipairs({ 1, 4 }) do
    local x = dsrt.randn({ rows, dim }, { seed = next_seed(), device = dev, dtype = "bf16" })
    local bytes = distinct_experts(x) * expert_bytes + shared_bytes + gate_bytes
    for _, precision in ipairs({ "reference", "fp32" }) do
      ctx.report(("moe decode T=%d %s"):format(rows, precision),
                 ctx.time_ms(function() return moe:forward(x, nil, precision) end), bytes)
    end
    ctx.report(("moe route T=%d"):format(rows), ctx.time_ms(function() return moe:route(x) end), gate_bytes)
  end

  local rows = ctx.quick and 512 or 4096
  local x = dsrt.randn({ rows, dim }, { seed = next_seed(), device = dev, dtype = "bf16" })
  local flops = 2 * rows * (k + 1) * 3 * dim * inter + 2 * rows * n * dim
  ctx.report(("moe prefill T=%d reference"):format(rows),
             ctx.time_ms(function() return moe:forward(x, nil, "reference") end, 3), nil, flops)
  ctx.report(("moe prefill T=%d fp32"):format(rows),
             ctx.time_ms(function() return moe:forward(x, nil, "fp32") end, 3), nil, flops)
end
