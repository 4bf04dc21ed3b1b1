-- test_linear.lua — dsrt.linear (runtime/linear.c) on the tiny checkpoint's real weight sets against
-- compositions written here with dsrt ops: the weight dequantised by dsv4.weights.dequantise, the
-- activation quantisation Q8(x, 128) of SPEC §3.3 built from reductions, powers of two and the
-- e4m3 conversion, then dsrt.matmul. fp32 precision within 1e-5; reference precision within 1e-3
-- (only summation order separates the two, and it can move a bf16 rounding); the Q8 round trip
-- itself exactly, through an identity FP8 weight. Also the grouped wo_a (SPEC §6.8), f32 scales, and
-- the errors a malformed linear table gets.
local dsrt = require "dsrt"
local weights = require "dsrt.dsv4.weights"
local h = require "tests.helpers"
local assert_error, assert_equal = h.assert_error, h.assert_equal

local tests, test = h.suite()

local FP32_TOL = 1e-5
local REFERENCE_TOL = 1e-3
local E4M3_MAX = 448
local ACT_BLOCK = 128

local tiny_cfg, tiny_weights
local function tiny()
  if not tiny_weights then tiny_cfg, tiny_weights = weights.load(h.make_tiny_model(11)) end
  return tiny_cfg, tiny_weights
end

local next_seed = 700
local function input(shape, dtype)
  next_seed = next_seed + 1
  return dsrt.randn(shape, { seed = next_seed, dtype = dtype or "bf16" })
end

local function bf16(t) return t:to("bf16"):to("f32") end

-- Q8(x, 128) round trip of every row of an f32 [rows, n] tensor (SPEC §3.3): per block
-- amax = max(max|x|, 1e-4), s = 2^ceil(log2(amax·(1/448))) (the f32 product), q = e4m3(clamp(x/s)).
local function q8(x)
  local rows, n = x.shape[1], x.shape[2]
  local out = dsrt.zeros({ rows, n })
  for start = 1, n, ACT_BLOCK do
    local block = x:narrow(2, start, math.min(ACT_BLOCK, n - start + 1))
    local amax = block:abs():max(2, true):maximum(1e-4) * (1 / E4M3_MAX)
    local scales = {}
    for r, v in ipairs(amax:totable()) do scales[r] = { 2.0 ^ math.ceil(math.log(v[1], 2)) } end
    local s = dsrt.tensor(scales)
    local codes = (block / s):maximum(-E4M3_MAX):minimum(E4M3_MAX):to("f8e4m3"):to("f32")
    out:narrow(2, start, block.shape[2]):copy(codes * s)
  end
  return out
end

-- The linear by composition: x [rows, in] -> f32 [rows, out] holding what forward should return.
local function composed(lin, x, precision, fp32_math)
  local w = weights.dequantise(lin):transpose(1, 2)
  local xf = x:to("f32")
  if precision == "fp32" or fp32_math then return dsrt.matmul(xf, w) end
  if lin.format ~= "bf16" then xf = q8(xf) end
  return bf16(dsrt.matmul(xf, w))
end

-- Every kind of plain linear the tiny checkpoint has, with whether the model runs it in fp32 math.
local function tiny_linears()
  local _, w = tiny()
  local layer = w.layers[2] -- a CSA layer: it has the compressor and the indexer too
  return {
    { "attn.wq_a (fp8)", layer.attn.wq_a },
    { "attn.wq_b (fp8, 2048 outputs)", layer.attn.wq_b },
    { "attn.wo_b (fp8)", layer.attn.wo_b },
    { "experts.3.w1 (fp4)", layer.ffn.experts[4].w1 },
    { "experts.5.w2 (fp4)", layer.ffn.experts[6].w2 },
    { "shared_experts.w2 (fp8)", layer.ffn.shared_experts.w2 },
    { "indexer.weights_proj (bf16)", layer.attn.indexer.weights_proj },
    { "gate (bf16, fp32 math)", { weight = layer.ffn.gate.weight, format = "bf16" }, true },
    { "compressor.wkv (bf16, fp32 math)", layer.attn.compressor.wkv, true },
  }
end

local function with_options(lin, options)
  local t = {}
  for k, v in pairs(lin) do t[k] = v end
  for k, v in pairs(options) do t[k] = v end
  return t
end

test("forward_matches_dequantised_matmul_in_fp32", function()
  for _, case in ipairs(tiny_linears()) do
    local name, lin, fp32_math = case[1], case[2], case[3]
    local layer = dsrt.linear(with_options(lin, { fp32_math = fp32_math }))
    local x = input({ 7, layer.in_features })
    local y = layer:forward(x, "fp32")
    assert_equal(y.dtype, "f32", name)
    local err = dsrt.rel_error(y, composed(lin, x, "fp32"))
    assert(err <= FP32_TOL, string.format("%s: fp32 relative error %g", name, err))
  end
end)

test("reference_forward_matches_the_q8_composition", function()
  for _, case in ipairs(tiny_linears()) do
    local name, lin, fp32_math = case[1], case[2], case[3]
    local layer = dsrt.linear(with_options(lin, { fp32_math = fp32_math }))
    local x = input({ 9, layer.in_features })
    local y = layer:forward(x, "reference")
    assert_equal(y.dtype, fp32_math and "f32" or "bf16", name)
    local want = composed(lin, x, "reference", fp32_math)
    local err = dsrt.rel_error(y, want)
    assert(err <= (fp32_math and FP32_TOL or REFERENCE_TOL), string.format("%s: reference relative error %g", name, err))
    if lin.format ~= "bf16" then -- the activation quantisation is visible: fp32 math differs by far more
      local plain = dsrt.rel_error(y, composed(lin, x, "fp32"))
      assert(plain > 10 * err and plain > 1e-3, string.format("%s: reference is %g from fp32, %g from Q8", name, plain, err))
    end
  end
end)

test("q8_round_trip_is_exact_through_an_identity_fp8_weight", function()
  local n = 200 -- two activation blocks, the second 72 wide
  local index = dsrt.arange(n)
  local eye = index:view(n, 1):eq(index:view(1, n)):to("f32"):to("f8e4m3")
  local identity = dsrt.linear { weight = eye, scale = dsrt.ones({ 2, 2 }, { dtype = "f8e8m0" }), format = "fp8" }
  -- rows of very different magnitudes (so are their scales), one row of tiny values, one of zeros
  local magnitudes = dsrt.tensor({ { 1 }, { 2 ^ -10 }, { 300 }, { 2 ^ -30 }, { 0 }, { 7.3 } })
  local x = (input({ 6, n }, "f32") * magnitudes):to("bf16")
  local y = identity:forward(x)
  assert_equal(dsrt.max_abs_diff(y, q8(x:to("f32"))), 0)
  assert(dsrt.max_abs_diff(y, x) > 0, "Q8 left the input unchanged")
end)

test("bf16_reference_has_no_activation_quantisation", function()
  local _, w = tiny()
  local lin = w.layers[2].attn.indexer.weights_proj
  local x = input({ 5, 128 })
  local y = dsrt.linear(lin):forward(x)
  local err = dsrt.rel_error(y, dsrt.matmul(x, lin.weight:transpose(1, 2)))
  assert(err <= REFERENCE_TOL, "bf16 linear vs bf16 matmul: " .. err)
  -- 1 + 2^-7 and -3 - 2^-6 are bf16 values e4m3 cannot hold; an identity bf16 weight keeps them
  local eye = dsrt.tensor({ { 1, 0 }, { 0, 1 } }, { dtype = "bf16" })
  local v = dsrt.tensor({ { 1 + 2 ^ -7, -3 - 2 ^ -6 } }, { dtype = "bf16" })
  assert_equal(dsrt.linear({ weight = eye, format = "bf16" }):forward(v):totable(), v:totable())
end)

test("grouped_wo_a_is_one_matmul_per_group_without_quantisation", function()
  local cfg, w = tiny()
  local lin = w.layers[1].attn.wo_a
  local groups, rank = cfg.dims.o_groups, cfg.dims.o_lora_rank
  local width = lin.weight.shape[2]
  local layer = dsrt.linear(with_options(lin, { groups = groups }))
  assert_equal({ layer.in_features, layer.out_features, layer.groups }, { groups * width, groups * rank, groups })
  local o = input({ 2, 3, groups * width })
  local deq = weights.dequantise(lin)
  local flat = o:reshape(6, groups * width):to("f32")
  local want = dsrt.zeros({ 6, groups * rank })
  for g = 1, groups do -- z[g, r] = Σ_c o[g, c]·Wo_a[g·R + r, c] (SPEC §6.8)
    local part = dsrt.matmul(flat:narrow(2, (g - 1) * width + 1, width), deq:narrow(1, (g - 1) * rank + 1, rank):transpose(1, 2))
    want:narrow(2, (g - 1) * rank + 1, rank):copy(part)
  end
  local z32 = layer:forward(o, "fp32")
  assert_equal(z32.shape, { 2, 3, groups * rank })
  local err32 = dsrt.rel_error(z32:reshape(6, groups * rank), want)
  assert(err32 <= FP32_TOL, "grouped fp32: " .. err32)
  local z = layer:forward(o, "reference")
  assert_equal(z.dtype, "bf16")
  local err = dsrt.rel_error(z:reshape(6, groups * rank), bf16(want))
  assert(err <= REFERENCE_TOL, "grouped reference (bf16 GEMM, no Q8): " .. err)
end)

test("f32_scales_give_the_same_outputs_as_e8m0", function()
  local _, w = tiny()
  local lin = w.layers[1].attn.wq_a
  local x = input({ 4, 128 })
  local a = dsrt.linear(lin):forward(x)
  local b = dsrt.linear(with_options(lin, { scale = lin.scale:to("f32") })):forward(x)
  assert_equal(dsrt.max_abs_diff(a, b), 0)
end)

test("outputs_keep_leading_dimensions_and_default_to_reference", function()
  local _, w = tiny()
  local layer = dsrt.linear(w.layers[1].attn.wq_b)
  local x = input({ 2, 3, 128 })
  local y = layer:forward(x)
  assert_equal(y.shape, { 2, 3, layer.out_features })
  assert_equal(y.dtype, "bf16")
  assert_equal(dsrt.max_abs_diff(y, layer:forward(x, "reference")), 0)
  local rows = layer:forward(x:reshape(6, 128), "fp32")
  assert_equal(dsrt.max_abs_diff(layer:forward(x:to("f32"), "fp32"):reshape(6, layer.out_features), rows), 0)
end)

test("fields_and_tostring", function()
  local _, w = tiny()
  local lin = w.layers[1].ffn.experts[1].w2
  local layer = dsrt.linear(lin)
  assert_equal({ layer.format, layer.in_features, layer.out_features, layer.groups, layer.fp32_math },
               { "fp4", 128, 128, 1, false })
  assert_equal(layer.block, { 1, 32 })
  assert(layer.weight.dtype == "fp4e2m1" and layer.scale.dtype == "f8e8m0")
  assert(tostring(layer):find("dsrt.linear(fp4", 1, true), tostring(layer))
  local gate = dsrt.linear { weight = w.layers[1].ffn.gate.weight, format = "bf16", fp32_math = true }
  assert_equal({ gate.block, gate.scale, gate.fp32_math }, { nil, nil, true })
  layer:close()
  assert_error(function() return layer.format end, "linear was closed")
end)

test("construction_errors_name_the_problem", function()
  local _, w = tiny()
  local fp8 = w.layers[1].attn.wq_a
  local fp4 = w.layers[1].ffn.experts[1].w1
  local bf = w.layers[2].attn.indexer.weights_proj
  assert_error(function() dsrt.linear(fp8.weight) end, "expected a linear table")
  assert_error(function() dsrt.linear { format = "fp8", scale = fp8.scale } end, "'weight' must be a userdata, got nil")
  assert_error(function() dsrt.linear { weight = {}, format = "fp8" } end, "'weight' must be a userdata")
  assert_error(function() dsrt.linear(with_options(fp8, { format = "fp16" })) end, "unknown weight format \"fp16\"")
  assert_error(function() dsrt.linear(with_options(fp8, { format = "bf16", scale = false })) end, "'scale' must be a userdata")
  assert_error(function() dsrt.linear(with_options(fp8, { format = "fp4", block = { 1, 32 } })) end,
               "format fp4 needs a fp4e2m1 weight, got f8e4m3")
  assert_error(function() dsrt.linear(with_options(fp4, { weight = fp4.weight:bitcast("i8") })) end, "bitcast")
  assert_error(function() dsrt.linear(with_options(fp8, { scale = fp4.scale })) end, "expected %[1, 1%]")
  assert_error(function() dsrt.linear(with_options(fp8, { scale = fp8.scale:to("bf16") })) end, "must be f8e8m0 or f32")
  assert_error(function() dsrt.linear(with_options(fp4, { scale = fp4.scale:to("f32") })) end, "must be f8e8m0")
  assert_error(function() dsrt.linear { weight = fp8.weight, format = "fp8" } end, "needs a scale")
  assert_error(function() dsrt.linear(with_options(bf, { scale = fp8.scale })) end, "takes no scale")
  assert_error(function() dsrt.linear(with_options(bf, { block = { 128, 128 } })) end, "bf16 linear has no scale blocks")
  assert_error(function() dsrt.linear(with_options(fp8, { block = { 128 } })) end, "'block' must be {rows, cols}")
  assert_error(function() dsrt.linear(with_options(fp8, { groups = 3 })) end, "do not split into 3 groups")
  assert_error(function() dsrt.linear(with_options(fp8, { in_features = 64 })) end, "expected %[128, 64%]")
  assert_error(function() dsrt.linear(with_options(fp8, { group = 2 })) end, "unknown key 'group'")
  assert_error(function() dsrt.linear(with_options(fp8, { fp32_math = 1 })) end, "'fp32_math' must be a boolean")
  assert_error(function() dsrt.linear { weight = dsrt.zeros({ 4 }, { dtype = "bf16" }), format = "bf16" } end, "must be 2%-D")
end)

test("forward_errors_name_the_problem", function()
  local _, w = tiny()
  local layer = dsrt.linear(w.layers[1].attn.wq_a)
  assert_error(function() layer:forward(input({ 3, 127 })) end, "must end in the layer's 128 input features")
  assert_error(function() layer:forward(dsrt.zeros({ 3, 128 }, { dtype = "i32" })) end, "must be bf16 or f32")
  assert_error(function() layer:forward(input({ 3, 128 }), "fp16") end, 'precision %(argument #3%) must be "reference" or "fp32", got "fp16"')
  assert_error(function() layer:forward("x") end, "tensor expected")
end)

return tests
