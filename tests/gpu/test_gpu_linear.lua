-- test_gpu_linear.lua — dsrt.linear on CUDA (kernels/linear.cu) against the CPU forward of the SAME
-- layer built on CPU copies of the weights (runtime/linear.c, the reference), on fresh random
-- weights, scales and inputs for every format (fp8 with e8m0 and f32 scales, fp4, bf16), fp32_math,
-- the grouped wo_a, both precisions and rows {1, 2, 7, 8, 9, 15, 16, 17, 33, 130}: the decode GEMVs
-- (<= 8 rows: the tensor-core one for FP8/FP4 weights with 64-column chunks, Q8 activations or bf16
-- ones for FP8 (the fp32 rows with bf16 x); bf16 weights with 16384+ outputs on the tensor cores
-- too (bf16 x, or f32 x as three bf16 planes where 8 tokens of them fit the shared memory); the
-- CUDA-core one for the rest: f32 activations unquantised, narrower bf16 weights, widths off the
-- chunks such as fp4 1056), cuBLASLt FP8
-- block scaling (fp8 reference, in % 128 == 0, out % 16 == 0, 9+ rows), cuBLAS over dequantised
-- weight slabs (everything else at 9+ rows: bf16 route, f32 route, f32 route with bf16 output, two
-- slabs for a 65536-wide weight, and the exact fallback when a dequantised fp8 weight is not a bf16
-- value) and the tiled kernel (shapes the GEMV cannot vector-load at <= 8 rows).
--
-- Outputs come from an allocator cache stocked with 0xff blocks (NaN), so an element the kernels
-- never write fails. Thresholds: f32 outputs rel_error <= 1e-5 (only the order of fp32 additions
-- differs); bf16 outputs rel_error <= 1e-2 and every element within one bf16 step of the CPU's (a
-- sum on either side of a rounding boundary). NaN never passes.
--
-- Run on the GPU machine: build/dsrt tests/run.lua tests/gpu/test_gpu_linear.lua
local dsrt = require "dsrt"
local h = require "tests.helpers"
local assert_error = h.assert_error

local tests, test = h.suite{ gpu = true }

local seed = 9100
local function next_seed() seed = seed + 1 return seed end

local ROWS = { 1, 2, 7, 8, 9, 15, 16, 17, 33, 130 }

local poison_cache = h.poison_cuda_cache

-- a random layer description on the CPU: {weight =, scale =, format =, groups =, fp32_math =}
local function random_linear(format, in_features, out_features, opts)
  opts = opts or {}
  local groups = opts.groups or 1
  local cols = in_features // groups
  local t = { format = format, groups = groups > 1 and groups or nil, fp32_math = opts.fp32_math or nil }
  local w = dsrt.randn({ out_features, cols }, { seed = next_seed(), std = format == "bf16" and 0.05 or 2 })
  if format == "fp8" then
    t.weight = w:to("f8e4m3")
    local sshape = { (out_features + 127) // 128, (cols + 127) // 128 }
    local s = dsrt.rand(sshape, { seed = next_seed(), low = 0.002, high = 0.05 })
    -- tiny: 2^-126, where e4m3·S falls below bf16's subnormal grid (the cuBLAS route's exact fallback)
    if opts.tiny_scale then s = dsrt.full(sshape, 2.0 ^ -126) end
    t.scale = opts.f32_scale and s or s:to("f8e8m0")
  elseif format == "fp4" then
    t.weight = w:to("fp4e2m1")
    t.scale = dsrt.rand({ out_features, (cols + 31) // 32 }, { seed = next_seed(), low = 0.002, high = 0.05 }):to("f8e8m0")
  else
    t.weight = w:to("bf16")
  end
  return t
end

local function on_cuda(t)
  local c = {}
  for k, v in pairs(t) do c[k] = dsrt.is_tensor(v) and v:to("cuda") or v end
  return c
end

-- bf16 values: within one bf16 step (of the larger magnitude) everywhere, or, for elements that
-- are small through cancellation, within 2^-9 of the largest output: the GPU sums in another order
-- than the CPU, and cuBLASLt's FP8 tensor cores accumulate each 128-wide block with fewer than
-- fp32's bits before the block scale promotes it (DeepSeek-V3 report §3.3.2; the reference's own
-- FP8 GEMM does the same), so a difference of ~1e-4 of the terms' magnitude is expected there.
local function check_bf16_steps(got, want, what)
  local g, w = got:to("f32"):reshape(-1):totable(), want:to("f32"):reshape(-1):totable()
  local largest = 0
  for i = 1, #w do largest = math.max(largest, math.abs(w[i])) end
  local floor = largest * 2.0 ^ -9
  for i = 1, #w do
    local x, y = g[i], w[i]
    local step = 2.0 ^ (math.floor(math.log(math.max(math.abs(x), math.abs(y), 1e-30), 2)) - 7)
    if not (math.abs(x - y) <= math.max(step, floor)) then
      error(string.format("%s: element %d is %s on cuda, %s on cpu (more than one bf16 step)", what, i,
                          tostring(x), tostring(y)), 3)
    end
  end
end

local function check(got, want, what)
  if not dsrt.is_tensor(got) or not got.device:match("^cuda") then error(what .. ": the result is not a CUDA tensor", 2) end
  if got.dtype ~= want.dtype then error(string.format("%s: dtype %s on cuda, %s on cpu", what, got.dtype, want.dtype), 2) end
  h.assert_equal(got.shape, want.shape, what .. ": shape")
  local r = dsrt.rel_error(got:to("cpu"):to("f32"), want:to("f32"))
  local tol = want.dtype == "f32" and 1e-5 or 1e-2
  if not (r <= tol) then error(string.format("%s: rel_error %g > %g", what, r, tol), 2) end
  if want.dtype == "bf16" then check_bf16_steps(got, want, what) end
end

-- every row count, both precisions, bf16 and f32 inputs: CUDA against the CPU forward
local function compare(desc, what)
  local cpu = dsrt.linear(desc)
  local gpu = dsrt.linear(on_cuda(desc))
  local width = cpu.in_features
  for _, rows in ipairs(ROWS) do
    for _, precision in ipairs { "reference", "fp32" } do
      local xdtype = (rows % 2 == 0) and "f32" or "bf16"
      local x = dsrt.randn({ rows, width }, { seed = next_seed(), dtype = xdtype })
      local want = cpu:forward(x, precision)
      local out_bytes = rows * cpu.out_features * 4
      poison_cache(out_bytes)
      local got = gpu:forward(x:to("cuda"), precision)
      check(got, want, string.format("%s rows %d %s x %s", what, rows, precision, xdtype))
    end
  end
end

local CASES = {
  -- fp8, 128x128 e8m0 blocks: GEMV and cuBLASLt; out % 16 ~= 0 -> tiled at 16+ rows
  { "fp8 384->200", "fp8", 384, 200 },
  { "fp8 384->272 (cuBLASLt, padded k-block rows)", "fp8", 384, 272 },
  { "fp8 320->272 (partial k-block)", "fp8", 320, 272 },
  { "fp8 1024->48", "fp8", 1024, 48 },
  { "fp8 100->72 (tiled only)", "fp8", 100, 72 },
  { "fp8 f32 scales 256->144", "fp8", 256, 144, { f32_scale = true } },
  { "fp8 1536->72 (GEMV in two staged chunks at 5-8 rows)", "fp8", 1536, 72 },
  { "fp8 tiny scales 384->200 (not bf16 values: exact fallback)", "fp8", 384, 200, { tiny_scale = true } },
  -- fp4, 1x32 e8m0 scales
  { "fp4 320->200", "fp4", 320, 200 },
  { "fp4 1056->24", "fp4", 1056, 24 },
  { "fp4 80->40 (tiled only)", "fp4", 80, 40 },
  { "fp4 2048->40 (GEMV in two staged chunks at 5-8 rows)", "fp4", 2048, 40 },
  -- bf16 and fp32_math
  { "bf16 264->200", "bf16", 264, 200 },
  { "bf16 100->30 (tiled only)", "bf16", 100, 30 },
  { "bf16 fp32_math 264->100", "bf16", 264, 100, { fp32_math = true } },
  { "bf16 fp32_math 4096->36", "bf16", 4096, 36, { fp32_math = true } },
  { "bf16 1024->16392 (tensor-core GEMV, f32 x in three planes)", "bf16", 1024, 16392 },
  { "bf16 fp32_math 320->16392 (tensor-core GEMV, a partial super-chunk)", "bf16", 320, 16392, { fp32_math = true } },
  { "bf16 fp32_math 4096->16391 (tensor-core GEMV: bf16 x, f32 x on the CUDA cores)", "bf16", 4096, 16391, { fp32_math = true } },
  -- the grouped wo_a
  { "grouped fp8 4x128->4x64", "fp8", 512, 256, { groups = 4 } },
  { "grouped bf16 4x72->4x20", "bf16", 288, 80, { groups = 4 } },
  { "grouped bf16 2x128->2x16392 (tensor-core GEMV)", "bf16", 256, 32784, { groups = 2 } },
  { "grouped bf16 3x64->3x6 (tiled only)", "bf16", 192, 18, { groups = 3 } },
}

for _, c in ipairs(CASES) do
  test("cuda matches cpu: " .. c[1], function()
    compare(random_linear(c[2], c[3], c[4], c[5]), c[1])
  end)
end

-- e8m0 scale bytes at the ends of the range, which the decode GEMVs decode in a short form
-- (fp8mma.cuh): 2^-127 (byte 0) stays a scale, not zero, and NaN (255) makes its rows NaN, as on
-- the cpu; the other rows as usual. fp4 at 2048 columns reads a step's scales as one word a row
-- (8-byte aligned rows), at 320 a chunk at a time.
test("cuda matches cpu: e8m0 scale bytes 0 and 255 (NaN) in the decode GEMVs", function()
  for _, c in ipairs { { "fp8", 320, 2 }, { "fp4", 320, 77 }, { "fp4", 2048, 77 } } do
    local format, width, nan_row = c[1], c[2], c[3]
    local desc = random_linear(format, width, 200)
    desc.scale[1]:narrow(1, 2, 1):fill(2.0 ^ -127)
    desc.scale[nan_row]:narrow(1, 1, 1):fill(0 / 0)
    local cpu, gpu = dsrt.linear(desc), dsrt.linear(on_cuda(desc))
    for _, rows in ipairs { 1, 3, 8 } do
      local what = string.format("%s %d->200 rows %d", format, width, rows)
      local x = dsrt.randn({ rows, width }, { seed = next_seed(), dtype = "bf16" })
      local want = cpu:forward(x, "reference"):to("f32"):reshape(-1):totable()
      poison_cache(rows * 200 * 4)
      local got = gpu:forward(x:to("cuda"), "reference"):to("cpu"):to("f32"):reshape(-1):totable()
      local nans, err, norm = 0, 0, 0
      for i = 1, #want do
        local w, g = want[i], got[i]
        if w ~= w then
          nans = nans + 1
          if g == g then error(string.format("%s: element %d is %s on cuda, NaN on cpu", what, i, g)) end
        else
          if g ~= g then error(string.format("%s: element %d is NaN on cuda, %s on cpu", what, i, w)) end
          err, norm = err + (g - w) ^ 2, norm + w ^ 2
        end
      end
      assert(nans > 0 and nans < #want, what .. ": the NaN scale gave some NaN rows, not all")
      assert(math.sqrt(err / norm) <= 1e-2, what .. ": rel_error " .. math.sqrt(err / norm))
    end
  end
end)

test("cuda: Flash-sized decode shapes match cpu at 1, 4 and 8 rows", function()
  for _, c in ipairs {
    { "fp8", 1024, 4096 }, { "fp8", 4096, 512 }, { "fp4", 4096, 512 }, { "fp4", 2048, 1024 },
    { "bf16", 4096, 520, { fp32_math = true } },
  } do
    local desc = random_linear(c[1], c[2], c[3], c[4])
    local cpu, gpu = dsrt.linear(desc), dsrt.linear(on_cuda(desc))
    for _, rows in ipairs { 1, 4, 8 } do
      for _, precision in ipairs { "reference", "fp32" } do
        local x = dsrt.randn({ rows, c[2] }, { seed = next_seed(), dtype = "bf16" })
        poison_cache(rows * c[3] * 4)
        check(gpu:forward(x:to("cuda"), precision), cpu:forward(x, precision),
              string.format("%s %d->%d rows %d %s", c[1], c[2], c[3], rows, precision))
      end
    end
  end
end)

-- bf16 weights (16384+ outputs) times f32 x on the tensor cores: x in three bf16 planes cut from its bits
-- (linear.cu's stage_planes), exact at any magnitude; an inf stays an inf (it must not turn the
-- planes below it into NaN) and a NaN a NaN
test("cuda matches cpu: bf16 GEMV of f32 x at extreme magnitudes, inf and NaN", function()
  local desc = random_linear("bf16", 1024, 16392, { fp32_math = true }) -- f32 outputs: rel_error 1e-5 applies
  local cpu, gpu = dsrt.linear(desc), dsrt.linear(on_cuda(desc))
  local x = dsrt.randn({ 5, 1024 }, { seed = next_seed() })
  x[1] = x[1]:mul(2.0 ^ 100)
  x[2] = x[2]:mul(2.0 ^ -100)
  x[3]:narrow(1, 7, 1):fill(3.4e38) -- an f32 that rounds to inf in bf16
  x[4]:narrow(1, 5, 1):fill(math.huge)
  x[5]:narrow(1, 9, 1):fill(0 / 0)
  local want = cpu:forward(x, "reference"):totable()
  poison_cache(5 * 16392 * 4)
  local got = gpu:forward(x:to("cuda"), "reference"):to("cpu"):totable()
  for r = 1, 3 do
    local err, norm = 0, 0
    for i = 1, 16392 do
      local g, w = got[r][i], want[r][i]
      assert(g == g and math.abs(g) < math.huge, string.format("row %d element %d is %s on cuda", r, i, g))
      err, norm = err + (g - w) ^ 2, norm + w ^ 2
    end
    assert(math.sqrt(err / norm) <= 1e-5, string.format("row %d: rel_error %g", r, math.sqrt(err / norm)))
  end
  for i = 1, 16392 do
    h.assert_equal(got[4][i], want[4][i], "row 4 (an inf in x) element " .. i)
    assert(got[5][i] ~= got[5][i], "row 5 (a NaN in x) element " .. i .. " is " .. got[5][i] .. " on cuda")
  end
end)

-- the tensor-core GEMV (kernels/fp8mma.cuh) plans its grid from the shape alone: a token's result
-- must be the same bits whether it comes alone or with up to 7 others (speculative verify relies on
-- it). Its inputs: Q8 activations (reference) and, for FP8 weights, bf16 ones (fp32 precision with
-- bf16 x); bf16 weights of 16384+ outputs (linear.cu's bf16_mma_kernel) take bf16 x (the LM head's)
-- and f32 x (three planes). The CUDA-core GEMV
-- (fp4 in fp32 precision here) sums in an order that depends on the batch size, at the level of
-- fp32 rounding.
test("cuda: tensor-core decode GEMV results do not depend on the batch", function()
  for _, c in ipairs {
    { "fp8", 1024, 4096 }, { "fp8", 4096, 512 }, { "fp4", 4096, 512, nil, { "reference" } },
    { "fp8", 512, 256, { groups = 4 } },
    { "bf16", 4096, 16392, { fp32_math = true } }, { "bf16", 512, 16392, nil, nil, "f32" },
  } do
    local desc = random_linear(c[1], c[2], c[3], c[4])
    local gpu = dsrt.linear(on_cuda(desc))
    local x = dsrt.randn({ 8, c[2] }, { seed = next_seed(), dtype = c[6] or "bf16" }):to("cuda")
    for _, precision in ipairs(c[5] or { "reference", "fp32" }) do
      local all = gpu:forward(x, precision):to("cpu")
      for _, t in ipairs { 1, 3, 8 } do
        local one = gpu:forward(x:narrow(1, t, 1), precision):to("cpu")
        h.assert_equal(dsrt.max_abs_diff(one[1], all[t]), 0,
                       string.format("%s %d->%d %s token %d alone vs in 8", c[1], c[2], c[3], precision, t))
      end
    end
  end
end)

test("cuda: Flash-sized fp4 prefill (cuBLAS bf16 on a dequantised slab) matches cpu", function()
  local desc = random_linear("fp4", 2048, 1024)
  local cpu, gpu = dsrt.linear(desc), dsrt.linear(on_cuda(desc))
  for _, precision in ipairs { "reference", "fp32" } do
    for _, xdtype in ipairs { "bf16", "f32" } do
      local x = dsrt.randn({ 130, 2048 }, { seed = next_seed(), dtype = xdtype })
      poison_cache(130 * 1024 * 4)
      check(gpu:forward(x:to("cuda"), precision), cpu:forward(x, precision),
            string.format("fp4 2048->1024 rows 130 %s x %s", precision, xdtype))
    end
  end
end)

test("cuda: a weight wider than one slab (f32 route in two slabs, bf16 route as stored)", function()
  local desc = random_linear("bf16", 65536, 300, { fp32_math = true })
  local cpu, gpu = dsrt.linear(desc), dsrt.linear(on_cuda(desc))
  for _, xdtype in ipairs { "f32", "bf16" } do
    local x = dsrt.randn({ 17, 65536 }, { seed = next_seed(), dtype = xdtype })
    poison_cache(17 * 300 * 4)
    check(gpu:forward(x:to("cuda")), cpu:forward(x), "bf16 65536->300 rows 17 x " .. xdtype)
  end
end)

test("cuda: inputs of any layout and leading shape", function()
  local desc = random_linear("fp8", 384, 200)
  local cpu, gpu = dsrt.linear(desc), dsrt.linear(on_cuda(desc))
  -- [2, 3, in] and a transposed (non-contiguous) [in, rows] view
  local x3 = dsrt.randn({ 2, 3, 384 }, { seed = next_seed(), dtype = "bf16" })
  check(gpu:forward(x3:to("cuda")), cpu:forward(x3), "3-d input")
  local xt = dsrt.randn({ 384, 20 }, { seed = next_seed() })
  check(gpu:forward(xt:to("cuda"):transpose(1, 2)), cpu:forward(xt:transpose(1, 2)), "transposed input")
  -- an empty batch
  local e = gpu:forward(dsrt.zeros({ 0, 384 }, { device = "cuda" }))
  h.assert_equal(e.shape, { 0, 200 })
end)

test("cuda: errors name the op, the tensors and the devices", function()
  local desc = random_linear("fp8", 256, 144)
  local gpu = dsrt.linear(on_cuda(desc))
  assert_error(function() return gpu:forward(dsrt.randn({ 2, 256 })) end, "one device")
  assert_error(function() return gpu:forward(dsrt.randn({ 2, 255 }, { device = "cuda" })) end, "input features")
  assert_error(function() return gpu:forward(dsrt.ones({ 2, 256 }, { device = "cuda", dtype = "i32" })) end,
               "bf16 or f32")
  local cpu = dsrt.linear(desc)
  assert_error(function() return cpu:forward(dsrt.randn({ 2, 256 }, { device = "cuda" })) end, "one device")
  -- weight on cuda, scale on the cpu
  assert_error(function() return dsrt.linear { weight = desc.weight:to("cuda"), scale = desc.scale, format = "fp8" } end,
               "different devices")
end)

return tests
