-- scripts/bench/linear.lua - the DSV4 linear layers on CUDA (kernels/linear.cu), Flash-sized (SPEC §1.1).
--
-- Decode (1, 2, 4 and 8 rows: one launch, no workspace) is memory-bound: the rate counts the weight bytes that must move (codes plus
-- scales, read once), against the copy ceiling of scripts/bench.lua. Prefill (4096 rows) is
-- compute-bound: TFLOP/s of 2·M·N·K (fp4: dequantise to a bf16 slab, then cuBLAS bf16), next to a bf16 cuBLAS matmul of the same shape (the H200's
-- nominal dense FP8 peak is ~1979 TFLOP/s, bf16 ~989). Weights and inputs are random, never zeros.
return function(ctx)
  local dsrt = require "dsrt"
  local dev, report, time_ms = ctx.dev, ctx.report, ctx.time_ms
  local seed = 500
  local function rnd(shape, opts)
    seed = seed + 1
    opts = opts or {}
    return dsrt.randn(shape, { device = dev, seed = seed, std = opts.std or 1 })
  end
  local function scales(shape)
    seed = seed + 1
    return dsrt.rand(shape, { device = dev, seed = seed, low = 0.002, high = 0.05 }):to("f8e8m0")
  end
  local function layer(format, n_in, n_out, fp32_math)
    if format == "fp8" then
      return dsrt.linear { format = "fp8", weight = rnd({ n_out, n_in }, { std = 2 }):to("f8e4m3"),
                           scale = scales({ (n_out + 127) // 128, (n_in + 127) // 128 }) },
             n_out * n_in + ((n_out + 127) // 128) * ((n_in + 127) // 128)
    elseif format == "fp4" then
      return dsrt.linear { format = "fp4", weight = rnd({ n_out, n_in }, { std = 2 }):to("fp4e2m1"),
                           scale = scales({ n_out, n_in // 32 }) },
             n_out * n_in // 2 + n_out * n_in // 32
    end
    return dsrt.linear { format = "bf16", weight = rnd({ n_out, n_in }, { std = 0.05 }):to("bf16"), fp32_math = fp32_math },
           n_out * n_in * 2
  end

  local decode = {
    { "fp8 wq_b 1024->32768", "fp8", 1024, 32768 },
    { "fp8 wq_a 4096->1024", "fp8", 4096, 1024 },
    { "fp8 wkv 4096->512", "fp8", 4096, 512 },
    { "fp8 wo_b 8192->4096", "fp8", 8192, 4096 },
    { "fp4 expert 4096->2048", "fp4", 4096, 2048 },
    { "fp4 expert 2048->4096", "fp4", 2048, 4096 },
    { "bf16 head 4096->129280 fp32m", "bf16", 4096, 129280, true },
  }
  for _, c in ipairs(decode) do
    local lin, bytes = layer(c[2], c[3], c[4], c[5])
    for _, rows in ipairs { 1, 2, 4, 8 } do
      local x = rnd({ rows, c[3] }):to("bf16")
      report(("linear %s x%d"):format(c[1], rows), time_ms(function() return lin:forward(x) end), bytes)
    end
    lin = nil
    collectgarbage()
  end

  local m = ctx.quick and 1024 or 4096
  for _, c in ipairs { { 4096, 1024 }, { 1024, 32768 } } do
    local n_in, n_out = c[1], c[2]
    local lin = layer("fp8", n_in, n_out)
    local x = rnd({ m, n_in }):to("bf16")
    local flops = 2 * m * n_in * n_out
    report(("linear fp8 prefill %dx%d->%d"):format(m, n_in, n_out), time_ms(function() return lin:forward(x) end), nil, flops)
    local wt = rnd({ n_in, n_out }, { std = 0.05 }):to("bf16")
    report(("  bf16 cuBLAS same shape"), time_ms(function() return dsrt.matmul(x, wt) end), nil, flops)
    local l4 = layer("fp4", n_in, n_out)
    report(("linear fp4 prefill %dx%d->%d (bf16 slab)"):format(m, n_in, n_out), time_ms(function() return l4:forward(x) end, 3),
           nil, flops)
    lin, l4, wt = nil, nil, nil
    collectgarbage()
  end
end
