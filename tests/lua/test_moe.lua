-- test_moe.lua — dsrt.moe (runtime/moe.c) on the tiny checkpoint's hash-routed and learned-routed
-- layers against the MoE of SPEC §7 composed here: routing computed in plain Lua from the gate
-- logits (scores, top-k of score + bias or tid2eid[token], renormalisation, route scale), and per
-- token the SwiGLU experts (clamp, silu, the routing weight before w2, bf16 rounding of h in
-- reference precision) plus the shared expert. Projections are dequantised matmuls in fp32
-- precision and dsrt.linear layers (checked by test_linear.lua) in reference precision.
-- Cases are built so that each rule changes the result: a bias that changes the selection,
-- inputs large enough for the clamp, the weight placement (before vs after w2 differ in reference
-- precision), route_scale 0 leaving only the shared expert.
local dsrt = require "dsrt"
local weights = require "dsrt.dsv4.weights"
local h = require "tests.helpers"
local assert_error, assert_equal, assert_close = h.assert_error, h.assert_equal, h.assert_close

local tests, test = h.suite()

local FP32_TOL = 1e-5
local REFERENCE_TOL = 1e-3
local T = 13 -- tokens per test batch

local tiny_cfg, tiny_weights
local function tiny()
  if not tiny_weights then tiny_cfg, tiny_weights = weights.load(h.make_tiny_model(5)) end
  return tiny_cfg, tiny_weights
end

-- layer 1 routes by hash (tid2eid), layer 3 by learned scores with a bias (SPEC §1.2)
local function hash_ffn() return select(2, tiny()).layers[1].ffn end
local function learned_ffn() return select(2, tiny()).layers[3].ffn end

local function dims(changes)
  local d = {}
  for k, v in pairs(tiny_cfg.dims) do d[k] = v end
  for k, v in pairs(changes or {}) do d[k] = v end
  return d
end

local function copy(t, changes)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  for k, v in pairs(changes or {}) do c[k] = v end
  return c
end

local function aux_streams() return { dsrt.stream("cpu"), dsrt.stream("cpu"), dsrt.stream("cpu") } end

local function make_moe(ffn, changes) return dsrt.moe(dims(changes), ffn, aux_streams()) end

local next_seed = 900
local function input(shape, scale)
  next_seed = next_seed + 1
  return dsrt.randn(shape, { seed = next_seed, std = scale or 1, dtype = "bf16" })
end

local function token_ids(n)
  next_seed = next_seed + 1
  return (dsrt.rand({ n }, { seed = next_seed, high = tiny_cfg.dims.vocab }) // 1):to("i64")
end

-- ---- the composition ----

-- Routing in plain Lua (double arithmetic) from the f32 gate logits: 0-based ids and weights per token.
local function lua_routing(d, ffn, x, ids)
  local bias = ffn.gate.bias and ffn.gate.bias:totable()
  local id_list = ids and ids:totable()
  local routes = {}
  for t, score in ipairs(h.moe_scores(d.score_func, ffn, x)) do
    local selected = {}
    if ffn.gate.tid2eid then
      selected = ffn.gate.tid2eid[id_list[t] + 1]:totable()
    else
      local order = {}
      for e = 1, #score do order[e] = e end
      table.sort(order, function(a, b)
        local ka, kb = score[a] + bias[a], score[b] + bias[b]
        return ka > kb or (ka == kb and a < b)
      end)
      for j = 1, d.n_activated_experts do selected[j] = order[j] - 1 end
    end
    local w, sum = {}, 0
    for j, e in ipairs(selected) do w[j] = score[e + 1]; sum = sum + w[j] end
    local norm = d.norm_topk_prob
    if norm == nil then norm = d.score_func ~= "softmax" end
    for j = 1, #w do w[j] = (norm and w[j] / sum or w[j]) * d.route_scale end
    routes[t] = { ids = selected, weights = w }
  end
  return routes
end

local dequantised, layers = {}, {}
local function project(lin, x, precision)
  if precision == "fp32" then
    dequantised[lin] = dequantised[lin] or weights.dequantise(lin):transpose(1, 2):contiguous()
    return dsrt.matmul(x, dequantised[lin])
  end
  layers[lin] = layers[lin] or dsrt.linear(lin)
  return layers[lin]:forward(x, "reference"):to("f32")
end

-- One SwiGLU expert on x f32 [1, dim] (SPEC §7.2); opts.weight_after_w2, opts.no_clamp vary the rules.
local function swiglu(expert, x, weight, d, precision, opts)
  local g, u = project(expert.w1, x, precision), project(expert.w3, x, precision)
  local limit = d.swiglu_limit or 0
  if limit > 0 and not opts.no_clamp then
    u = u:maximum(-limit):minimum(limit)
    g = g:minimum(limit)
  end
  local hidden = g:silu() * u
  if weight and not opts.weight_after_w2 then hidden = hidden * weight end
  if precision == "reference" then hidden = hidden:to("bf16"):to("f32") end
  local y = project(expert.w2, hidden, precision)
  if weight and opts.weight_after_w2 then y = y * weight end
  return y
end

-- The MoE per token: routed experts by ascending id, then the shared expert, summed in f32.
local function composed(d, ffn, x, ids, precision, opts)
  opts = opts or {}
  local routes = lua_routing(d, ffn, x, ids)
  local rows, dim = x.shape[1], x.shape[2]
  local y = dsrt.zeros({ rows, dim })
  for t = 1, rows do
    local xt = x:narrow(1, t, 1):to("f32")
    local acc = dsrt.zeros({ 1, dim })
    local picks = {}
    for j, e in ipairs(routes[t].ids) do picks[j] = { e, routes[t].weights[j] } end
    table.sort(picks, function(a, b) return a[1] < b[1] end)
    for _, pick in ipairs(picks) do
      if not opts.no_routed then acc = acc + swiglu(ffn.experts[pick[1] + 1], xt, pick[2], d, precision, opts) end
    end
    acc = acc + swiglu(ffn.shared_experts, xt, nil, d, precision, opts)
    y[t] = acc[1]
  end
  if precision == "reference" then return y:to("bf16"):to("f32") end
  return y
end

local function assert_near(got, want, tol, what)
  local err = dsrt.rel_error(got, want)
  assert(err <= tol, string.format("%s: relative error %g > %g", what, err, tol))
  return err
end

-- ---- routing ----

test("hash_routing_picks_tid2eid_of_the_token", function()
  local ffn = hash_ffn()
  local moe = make_moe(ffn)
  assert_equal(moe.routing, "hash")
  local x, ids = input({ T, 128 }), token_ids(T)
  local expert_ids, w = moe:route(x, ids)
  assert_equal({ expert_ids.dtype, w.dtype }, { "i64", "f32" })
  assert_equal(expert_ids.shape, { T, 2 })
  local routes = lua_routing(tiny_cfg.dims, ffn, x, ids)
  for t, id in ipairs(ids:totable()) do
    assert_equal(expert_ids[t]:totable(), ffn.gate.tid2eid[id + 1]:totable())
    assert_close(w[t]:totable(), routes[t].weights, 1e-6)
    assert_close(w[t]:sum():item(), tiny_cfg.dims.route_scale, 1e-6) -- renormalised, then scaled
  end
end)

test("learned_routing_uses_the_bias_for_selection_only", function()
  local ffn = learned_ffn()
  local x = input({ T, 128 })
  -- the checkpoint's own bias
  local ids, w = make_moe(ffn):route(x)
  local routes = lua_routing(tiny_cfg.dims, ffn, x)
  for t = 1, T do
    assert_equal(ids[t]:totable(), routes[t].ids)
    assert_close(w[t]:totable(), routes[t].weights, 1e-6)
  end
  -- a bias that forces the expert the scores like least into every selection: the selection
  -- changes, the weights stay the renormalised unbiased scores
  local unbiased = lua_routing(tiny_cfg.dims, copy(ffn, { gate = { weight = ffn.gate.weight, bias = dsrt.zeros({ 8 }) } }), x)
  local score_sum = {}
  for _, route in ipairs(unbiased) do
    for _, e in ipairs(route.ids) do score_sum[e] = (score_sum[e] or 0) + 1 end
  end
  local least = 0
  for e = 0, 7 do if (score_sum[e] or 0) < (score_sum[least] or 0) then least = e end end
  local forced = dsrt.zeros({ 8 })
  forced[least + 1] = 100
  local biased_ffn = copy(ffn, { gate = { weight = ffn.gate.weight, bias = forced } })
  local forced_ids, forced_w = make_moe(biased_ffn):route(x)
  local want = lua_routing(tiny_cfg.dims, biased_ffn, x)
  local changed = 0
  for t = 1, T do
    assert_equal(forced_ids[t][1]:item(), least)
    assert_equal(forced_ids[t]:totable(), want[t].ids)
    assert_close(forced_w[t]:totable(), want[t].weights, 1e-6)
    assert(forced_w[t]:max():item() < tiny_cfg.dims.route_scale, "the bias leaked into the weights")
    if forced_ids[t][1]:item() ~= unbiased[t].ids[1] then changed = changed + 1 end
  end
  assert(changed > 0, "the forced bias changed no selection: the case tests nothing")
end)

test("sigmoid_and_softmax_scores_with_and_without_renormalisation", function()
  local ffn = learned_ffn()
  local x = input({ T, 128 })
  for _, changes in ipairs({
    { score_func = "sigmoid" },
    { score_func = "softmax", norm_topk_prob = false },
    { score_func = "softmax", norm_topk_prob = true, route_scale = 2.5 },
    { score_func = "sqrtsoftplus", norm_topk_prob = false },
  }) do
    local d = dims(changes)
    local moe = dsrt.moe(d, ffn, aux_streams())
    local ids, w = moe:route(x)
    local routes = lua_routing(d, ffn, x)
    for t = 1, T do
      assert_equal(ids[t]:totable(), routes[t].ids, changes.score_func)
      assert_close(w[t]:totable(), routes[t].weights, 1e-6, changes.score_func)
    end
    local sum = w[1]:sum():item()
    if d.norm_topk_prob then
      assert_close(sum, d.route_scale, 1e-6)
    else
      assert(math.abs(sum - d.route_scale) > 1e-3, "weights renormalised although norm_topk_prob is false")
    end
  end
end)

-- ---- the layer ----

test("forward_matches_the_composition_in_fp32", function()
  for _, case in ipairs({ { "hash", hash_ffn() }, { "learned", learned_ffn() } }) do
    local moe = make_moe(case[2])
    local x, ids = input({ T, 128 }), token_ids(T)
    local y = moe:forward(x, ids, "fp32")
    assert_equal({ y.dtype, y.shape }, { "f32", { T, 128 } })
    assert_near(y, composed(tiny_cfg.dims, case[2], x, ids, "fp32"), FP32_TOL, case[1])
  end
end)

test("forward_matches_the_composition_in_reference_precision", function()
  for _, case in ipairs({ { "hash", hash_ffn() }, { "learned", learned_ffn() } }) do
    local moe = make_moe(case[2])
    local x, ids = input({ T, 128 }), token_ids(T)
    local y = moe:forward(x, ids, "reference")
    assert_equal(y.dtype, "bf16")
    local err = assert_near(y, composed(tiny_cfg.dims, case[2], x, ids, "reference"), REFERENCE_TOL, case[1])
    local from_fp32 = dsrt.rel_error(y, moe:forward(x, ids, "fp32"))
    assert(from_fp32 > 10 * err and from_fp32 < 0.1, string.format("%s: reference is %g from fp32", case[1], from_fp32))
  end
end)

test("swiglu_clamp_is_applied_to_large_activations", function()
  local ffn, d = learned_ffn(), tiny_cfg.dims
  local x = input({ T, 128 }, 40) -- unit-RMS weights: the projections are ~40, far past the limit 10
  local up = dsrt.matmul(x:to("f32"), weights.dequantise(ffn.shared_experts.w3):transpose(1, 2))
  local clamped = up:abs():gt(d.swiglu_limit):sum():item()
  assert(clamped > up:numel() / 4, "too few activations beyond the clamp: " .. clamped)
  local y = make_moe(ffn):forward(x, nil, "fp32")
  local err = assert_near(y, composed(d, ffn, x, nil, "fp32"), FP32_TOL, "with the clamp")
  local unclamped = dsrt.rel_error(y, composed(d, ffn, x, nil, "fp32", { no_clamp = true }))
  assert(unclamped > 0.1 and unclamped > 1e4 * err, "the clamp changes little: " .. unclamped)
  -- limit 0 means no clamp, as in the reference
  local free = dsrt.moe(dims({ swiglu_limit = 0 }), ffn, aux_streams()):forward(x, nil, "fp32")
  assert_near(free, composed(dims({ swiglu_limit = 0 }), ffn, x, nil, "fp32"), FP32_TOL, "limit 0")
end)

test("routing_weight_is_applied_before_w2", function()
  local ffn, d = learned_ffn(), tiny_cfg.dims
  local x = input({ T, 128 })
  local y = make_moe(ffn):forward(x, nil, "reference")
  local before = dsrt.rel_error(y, composed(d, ffn, x, nil, "reference"))
  local after = dsrt.rel_error(y, composed(d, ffn, x, nil, "reference", { weight_after_w2 = true }))
  -- bf16(w·h) and Q8 of it differ from w·(w2·bf16(h)): the placement shows in reference precision
  assert(before <= REFERENCE_TOL and after > 1e-3 and after > 10 * before,
         string.format("relative error %g to weight-before-w2, %g to weight-after-w2", before, after))
  -- in fp32 precision the two placements agree (the projection is linear)
  local y32 = make_moe(ffn):forward(x, nil, "fp32")
  assert_near(y32, composed(d, ffn, x, nil, "fp32", { weight_after_w2 = true }), FP32_TOL, "fp32, weight after w2")
end)

test("shared_expert_is_included", function()
  local ffn = hash_ffn()
  local x, ids = input({ T, 128 }), token_ids(T)
  local d = dims({ route_scale = 0 }) -- routed experts weigh 0: only the shared expert remains
  local shared_only = composed(d, ffn, x, ids, "fp32", { no_routed = true })
  for _, precision in ipairs({ "fp32", "reference" }) do
    local y = dsrt.moe(d, ffn, aux_streams()):forward(x, ids, precision)
    local want = precision == "fp32" and shared_only or composed(d, ffn, x, ids, "reference", { no_routed = true })
    assert_near(y, want, precision == "fp32" and FP32_TOL or REFERENCE_TOL, precision .. ", route_scale 0")
  end
  local full = make_moe(ffn):forward(x, ids, "fp32")
  assert(dsrt.rel_error(full, shared_only) > 0.1, "the routed experts add nothing")
end)

test("grouping_by_expert_equals_a_per_token_loop", function()
  for _, case in ipairs({ { "hash", hash_ffn() }, { "learned", learned_ffn() } }) do
    local moe = make_moe(case[2])
    local x, ids = input({ 2, 9, 128 }), token_ids(18):view(2, 9)
    for _, precision in ipairs({ "reference", "fp32" }) do
      local y = moe:forward(x, ids, precision)
      assert_equal(y.shape, { 2, 9, 128 })
      for i = 1, 2 do
        for t = 1, 9 do
          local one = moe:forward(x[i]:narrow(1, t, 1), ids[i]:narrow(1, t, 1), precision)
          assert_equal(dsrt.max_abs_diff(one[1], y[i][t]), 0, case[1] .. " " .. precision)
        end
      end
    end
  end
end)

test("aux_streams_are_kept_and_fields_read", function()
  local aux = aux_streams()
  local moe = dsrt.moe(tiny_cfg, learned_ffn(), aux) -- the whole cfg works as well as cfg.dims
  assert(rawequal(moe.aux_streams, aux), "moe.aux_streams is not the list given")
  assert_equal({ moe.dim, moe.n_routed, moe.n_activated, moe.score_func, moe.routing, moe.norm_topk_prob },
               { 128, 8, 2, "sqrtsoftplus", "learned", true })
  assert_close({ moe.route_scale, moe.swiglu_limit }, { 1.5, 10 })
  assert(tostring(moe):find("learned routing", 1, true), tostring(moe))
  local empty = dsrt.moe(tiny_cfg.dims, learned_ffn(), {})
  assert_equal(#empty.aux_streams, 0)
  moe:close()
  assert_error(function() return moe.dim end, "moe was closed")
end)

test("construction_errors_name_the_problem", function()
  local ffn, hashed = learned_ffn(), hash_ffn()
  local function build(d, f, aux) return function() dsrt.moe(d, f, aux or aux_streams()) end end
  local wq_b = tiny_weights.layers[1].attn.wq_b -- a [2048, 128] FP8 linear, the wrong shape for an expert
  assert_error(build(dims({ score_func = "relu" }), ffn), "unknown score function \"relu\"")
  assert_error(build(dims({ route_scale = "big" }), ffn), "'route_scale' must be a number")
  assert_error(build(copy(dims(), { n_activated_experts = false }), ffn), "'n_activated_experts' must be a number")
  assert_error(build(dims({ n_activated_experts = 9 }), ffn), "9 experts per token of 8 routed experts")
  assert_error(build(dims({ n_routed_experts = 7 }), ffn), "ffn.experts has 8 entries, n_routed_experts is 7")
  assert_error(build(dims(), copy(ffn, { gate = { weight = ffn.gate.weight } })), "needs a bias %(learned routing%) or tid2eid")
  assert_error(build(dims(), copy(ffn, { gate = { weight = ffn.gate.weight, bias = ffn.gate.bias, tid2eid = hashed.gate.tid2eid } })),
               "both a bias")
  assert_error(build(dims(), copy(ffn, { gate = { weight = ffn.gate.weight:to("f32"), bias = ffn.gate.bias } })),
               "gate.weight f32%[8, 128%]")
  assert_error(build(dims(), copy(ffn, { gate = { weight = ffn.gate.weight, bias = dsrt.zeros({ 7 }) } })), "gate.bias f32%[7%]")
  assert_error(build(dims(), copy(hashed, { gate = { weight = hashed.gate.weight, tid2eid = hashed.gate.tid2eid:narrow(2, 1, 1) } })),
               "gate.tid2eid i32%[129280, 1%].*expected i32 or i64 %[vocab, 2%]")
  local experts = copy(ffn.experts)
  experts[3] = copy(experts[3], { w2 = wq_b })
  assert_error(build(dims(), copy(ffn, { experts = experts })), "experts.2.w2 maps 128 %-> 2048 features, expected 128 %-> 128")
  experts[3] = copy(ffn.experts[3], { w1 = copy(ffn.experts[3].w1, { format = "fp9" }) })
  assert_error(build(dims(), copy(ffn, { experts = experts })), "core.moe: experts.2.w1: linear: unknown weight format")
  experts[3] = copy(ffn.experts[3], { w3 = nil })
  experts[3].w3 = nil
  assert_error(build(dims(), copy(ffn, { experts = experts })), "experts.2.w3 is missing")
  assert_error(build(dims(), copy(ffn, { shared_experts = copy(ffn.shared_experts, { w1 = wq_b }) })), "shared_experts.w3 maps")
  assert_error(build(dims(), ffn, { dsrt.stream("cpu"), "stream" }), "aux_streams%[2%] must be a dsrt.stream")
end)

test("nan_inputs_propagate_and_still_select_valid_experts", function()
  local moe = make_moe(learned_ffn())
  local x = dsrt.full({ 3, 128 }, 0 / 0, { dtype = "bf16" })
  local ids = moe:route(x)
  assert(ids:min():item() >= 0 and ids:max():item() < 8, "invalid expert ids for NaN scores")
  local y = moe:forward(x, nil, "fp32")
  assert_equal(y:ne(y):sum():item(), y:numel())
end)

test("forward_errors_name_the_problem", function()
  local hashed, learned = make_moe(hash_ffn()), make_moe(learned_ffn())
  local x = input({ 3, 128 })
  assert_error(function() hashed:forward(x) end, "hash routing %(tid2eid%) needs the token ids")
  assert_error(function() hashed:forward(x, dsrt.tensor({ 1, 2, 129280 })) end, "token id 129280 at position 2 is outside")
  assert_error(function() hashed:forward(x, dsrt.tensor({ 1, 2 })) end, "must have the leading shape of the input")
  assert_error(function() hashed:forward(x, dsrt.tensor({ 1.0, 2.0, 3.0 })) end, "must be i32 or i64")
  assert_error(function() learned:forward(input({ 3, 64 })) end, "must end in the layer's 128 input features")
  assert_error(function() learned:forward(x, nil, "half") end, 'precision %(argument #4%) must be "reference" or "fp32", got "half"')
  assert_equal(learned:forward(x).dtype, "bf16") -- learned routing needs no ids; reference by default
end)

return tests
