-- test_attention.lua — dsrt.attention / dsrt.attn_state (runtime/attention.c) on the tiny
-- checkpoint's three attention kinds: layer 0 window only, layer 1 ratio 4 (overlapping compressor
-- + lightning indexer, top-64), layer 2 ratio 128 (SPEC §1.2, §6).
--   - chunked prefill (chunks of 1, a chunk longer than the window, ...) gives exactly what one
--     forward over the whole sequence gives, in both precisions (SPEC §6.9);
--   - truncating by up to `slack` positions and re-running restores exactly the state a shorter
--     run had, across compressor emissions;
--   - attention:advance leaves exactly the state a forward leaves (the forwards after it agree to
--     the bit), in chunks that cross the window and compressor emissions;
--   - fp32 precision against SPEC §6 composed here from dsrt.nn primitives, dsrt.linear and tensor
--     ops, one query at a time with a dense softmax (the sink in the denominator), the compressor
--     pooled window by window, and the indexer's top-k picked by sorting in Lua;
--   - the errors a composer can make are named.
local dsrt = require "dsrt"
local weights = require "dsrt.dsv4.weights"
local h = require "tests.helpers"
local nn = dsrt.nn
local assert_error, assert_equal = h.assert_error, h.assert_equal

local tests, test = h.suite()

local FP32_TOL = 1e-5
local WINDOW, CSA, HCA = 1, 2, 3 -- tiny layer indices (1-based) of each kind

local tiny_cfg, tiny_weights
local function tiny()
  if not tiny_weights then tiny_cfg, tiny_weights = weights.load(h.make_tiny_model(7)) end
  return tiny_cfg, tiny_weights
end

local layers = {} -- one object per layer: its linears dequantise their weights once
local function layer(i)
  local cfg, w = tiny()
  layers[i] = layers[i] or dsrt.attention(cfg.layers[i], cfg.dims, w.layers[i].attn, { dsrt.stream("cpu") })
  return layers[i]
end

-- S normed rows (RMSNorm without weight), as the block gives the layer: bf16 or f32 by precision
local function inputs(S, seed, precision)
  local cfg = tiny()
  return nn.rms_norm(dsrt.randn({ S, cfg.dims.dim }, { seed = seed }), nil, cfg.dims.norm_eps, precision)
end

local function state(att, precision, max_len, slack)
  return dsrt.attn_state(att, { max_len = max_len or 400, slack = slack or 0, precision = precision })
end

-- forward x through st in chunks of the given sizes; returns the outputs' rows as one f32 tensor
local function run_chunks(att, st, x, sizes)
  local S = x:size(1)
  local y = dsrt.zeros({ S, x:size(2) })
  local pos = 1
  for _, n in ipairs(sizes) do
    y:narrow(1, pos, n):copy(att:forward(st, x:narrow(1, pos, n)))
    pos = pos + n
  end
  assert_equal(pos, S + 1)
  return y
end

-- ---- SPEC §6 composed in Lua (fp32) ----

local function linear(t, extra)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  for k, v in pairs(extra or {}) do c[k] = v end
  return dsrt.linear(c)
end

-- The compressor (SPEC §6.5) over the S rows of x: entries [S div r, d] after RMS_w and RoPE at j·r
-- (fp32: no Q8, no Hadamard, no Q4), or nil when no window is complete.
local function lua_compress(c, x, r, d, eps, rope)
  local S, coff = x:size(1), r == 4 and 2 or 1
  local kv = linear(c.wkv, { fp32_math = true }):forward(x, "fp32")
  local g = linear(c.wgate, { fp32_math = true }):forward(x, "fp32")
  for t = 0, S - 1 do
    local row = g:narrow(1, t + 1, 1)
    row:copy(row + c.ape:narrow(1, t % r + 1, 1))
  end
  local n = S // r
  if n == 0 then return nil end
  local E = dsrt.zeros({ n, d })
  for j = 0, n - 1 do
    -- this window's slots: the B half [d, 2d) with overlap, the whole row without
    local gB, cB = g:narrow(1, j * r + 1, r):narrow(2, (coff - 1) * d + 1, d), kv:narrow(1, j * r + 1, r):narrow(2, (coff - 1) * d + 1, d)
    local m = gB:max(1, true)
    local gA, cA
    if coff == 2 and j > 0 then -- the previous window's A halves [0, d)
      gA, cA = g:narrow(1, (j - 1) * r + 1, r):narrow(2, 1, d), kv:narrow(1, (j - 1) * r + 1, r):narrow(2, 1, d)
      m = m:maximum(gA:max(1, true))
    end
    local eB = (gB - m):exp()
    local num, den = (eB * cB):sum(1, true), eB:sum(1, true)
    if gA then
      local eA = (gA - m):exp()
      num, den = num + (eA * cA):sum(1, true), den + eA:sum(1, true)
    end
    E:narrow(1, j + 1, 1):copy(num / den)
  end
  return nn.rope(nn.rms_norm(E, c.norm, eps, "fp32"), dsrt.arange(0, n) * r, rope.theta, rope.yarn or nil, false, "fp32")
end

-- rows idx (0-based entry numbers) of E as a new [#idx, d] tensor
local function gather(E, idx)
  local out = dsrt.zeros({ #idx, E:size(2) })
  for i, j in ipairs(idx) do out:narrow(1, i, 1):copy(E:narrow(1, j + 1, 1)) end
  return out
end

-- The attention layer (SPEC §6.1-6.8) in fp32 on x [S, dim] at positions 0 … S−1.
local function lua_attention(L, d, a, x)
  local P = "fp32"
  local S, H, hd, W, r, eps = x:size(1), d.n_heads, d.head_dim, d.window, L.ratio, d.norm_eps
  local theta, yarn = L.rope.theta, L.rope.yarn or nil
  local pos = dsrt.arange(0, S)
  local qr = nn.rms_norm(linear(a.wq_a):forward(x, P), a.q_norm, eps, P)
  local q = nn.rope(nn.head_rms_norm(linear(a.wq_b):forward(qr, P):view(S, H, hd), eps, P), pos, theta, yarn, false, P)
  local kv = nn.rope(nn.rms_norm(linear(a.wkv):forward(x, P), a.kv_norm, eps, P), pos, theta, yarn, false, P)
  local E = r > 0 and lua_compress(a.compressor, x, r, hd, eps, L.rope)
  local keys, qI, wts
  local IH, ID = d.index_n_heads, d.index_head_dim
  if r == 4 then
    keys = lua_compress(a.indexer.compressor, x, r, ID, eps, L.rope)
    qI = nn.rope(linear(a.indexer.wq_b):forward(qr, P):view(S, IH, ID), pos, theta, yarn, false, P)
    wts = linear(a.indexer.weights_proj):forward(x, P) * (ID ^ -0.5 * IH ^ -0.5)
  end
  local scale, sink = hd ^ -0.5, a.attn_sink:view(H, 1)
  local o = dsrt.zeros({ S, H, hd })
  for t = 0, S - 1 do
    local qt = q:select(1, t + 1)
    local lo = math.max(0, t - W + 1)
    local pools = { kv:narrow(1, lo + 1, t - lo + 1) }
    local visible = r > 0 and (t + 1) // r or 0
    if visible > 0 then
      local chosen = E:narrow(1, 1, visible)
      if r == 4 and visible > d.index_topk then -- SPEC §6.6: Σ_h w_h·ReLU(qI_h·K_j), the top k
        local s = (wts:narrow(1, t + 1, 1):view(IH, 1) * qI:select(1, t + 1):matmul(keys:narrow(1, 1, visible):transpose(1, 2)):relu()):sum(1)
        local score, order = s:totable(), {}
        for j = 1, visible do order[j] = j - 1 end
        table.sort(order, function(i, j) return score[i + 1] > score[j + 1] end)
        chosen = gather(E, { table.unpack(order, 1, d.index_topk) })
      end
      pools[2] = chosen
    end
    local scores, m = {}, sink
    for i, pool in ipairs(pools) do
      scores[i] = qt:matmul(pool:transpose(1, 2)) * scale
      m = m:maximum(scores[i]:max(2, true))
    end
    local num, den = dsrt.zeros({ H, hd }), (sink - m):exp()
    for i, pool in ipairs(pools) do
      local p = (scores[i] - m):exp()
      num, den = num + p:matmul(pool), den + p:sum(2, true)
    end
    o:select(1, t + 1):copy(num / den)
  end
  o = nn.rope(o, pos, theta, yarn, true, P)
  local z = linear(a.wo_a, { groups = d.o_groups }):forward(o:view(S, H * hd), P)
  return linear(a.wo_b):forward(z, P)
end

-- ---- tests ----

test("fp32_matches_spec_composition", function()
  local cfg, w = tiny()
  -- 136 tokens: one ratio-128 entry, and queries past the window; 268: the indexer picks 64 of
  -- up to 67 visible entries
  for _, case in ipairs({ { WINDOW, 136 }, { HCA, 136 }, { CSA, 268 } }) do
    local i, S = case[1], case[2]
    local x = inputs(S, 10 + i, "fp32")
    local att = layer(i)
    local got = att:forward(state(att, "fp32"), x)
    local want = lua_attention(cfg.layers[i], cfg.dims, w.layers[i].attn, x)
    local err = dsrt.rel_error(got, want)
    assert(err <= FP32_TOL, string.format("layer %d (ratio %d): relative error %g", i, cfg.layers[i].ratio, err))
  end
end)

test("chunked_prefill_equals_one_shot_exactly", function()
  local S = 170
  local sizes = { 1, 2, 130, 1, 5, 31 } -- 130 > window 128
  for _, i in ipairs({ WINDOW, CSA, HCA }) do
    local att = layer(i)
    for _, precision in ipairs({ "fp32", "reference" }) do
      local x = inputs(S, 20 + i, precision)
      local whole = att:forward(state(att, precision), x)
      assert_equal(whole.dtype, precision == "fp32" and "f32" or "bf16")
      local st = state(att, precision)
      local chunked = run_chunks(att, st, x, sizes)
      assert_equal(st:length(), S)
      assert_equal(dsrt.max_abs_diff(chunked, whole), 0, string.format("layer %d %s", i, precision))
    end
  end
end)

test("truncate_within_slack_restores_the_state_exactly", function()
  -- 125 + 12 crosses the first ratio-128 emission (position 127) and three ratio-4 ones
  local n0, ahead, slack = 125, 12, 12
  for _, i in ipairs({ WINDOW, CSA, HCA }) do
    local att = layer(i)
    for _, precision in ipairs({ "fp32", "reference" }) do
      local x, other = inputs(n0 + ahead, 30 + i, precision), inputs(ahead, 40 + i, precision)
      local st = state(att, precision, 200, slack)
      att:forward(st, x:narrow(1, 1, n0))
      local first = att:forward(st, x:narrow(1, n0 + 1, ahead))
      st:truncate(n0)
      assert_equal(st:length(), n0)
      local again = att:forward(st, x:narrow(1, n0 + 1, ahead))
      assert_equal(dsrt.max_abs_diff(again, first), 0, string.format("layer %d %s: same tokens", i, precision))
      st:truncate(n0 + ahead - slack)
      st:truncate(n0 + ahead - slack - 0) -- a no-op truncation is allowed
      local fresh = state(att, precision, 200, slack)
      att:forward(fresh, x:narrow(1, 1, n0 + ahead - slack))
      local a = att:forward(st, other)
      local b = att:forward(fresh, other)
      assert_equal(dsrt.max_abs_diff(a, b), 0, string.format("layer %d %s: other tokens", i, precision))
    end
  end
end)

-- advance (the MTP ring fill's call) writes the state a forward writes: the same window rows,
-- compressor states and entries, indexer keys; a later forward cannot tell the two apart
test("advance_leaves_the_state_a_forward_leaves", function()
  local sizes = { 3, 1, 130, 1, 7, 1 } -- 143 positions: past the window and three ratio-4 and one ratio-128 emission
  for _, i in ipairs({ WINDOW, CSA, HCA }) do
    local att = layer(i)
    for _, precision in ipairs({ "fp32", "reference" }) do
      local x, after = inputs(143, 50 + i, precision), inputs(5, 60 + i, precision)
      local by_forward, by_advance = state(att, precision), state(att, precision)
      local pos = 1
      for _, n in ipairs(sizes) do
        att:forward(by_forward, x:narrow(1, pos, n))
        assert_equal(att:advance(by_advance, x:narrow(1, pos, n)), nil)
        pos = pos + n
        assert_equal(by_advance:length(), by_forward:length())
        local a, b = att:forward(by_forward, after:narrow(1, 1, 1)), att:forward(by_advance, after:narrow(1, 1, 1))
        assert_equal(dsrt.max_abs_diff(a, b), 0, string.format("layer %d %s after %d positions", i, precision, pos - 1))
      end
      local a, b = att:forward(by_forward, after:narrow(1, 2, 4)), att:forward(by_advance, after:narrow(1, 2, 4))
      assert_equal(dsrt.max_abs_diff(a, b), 0, string.format("layer %d %s: a chunk after", i, precision))
    end
  end
end)

-- advance may step over what a window-only state drops unread (a long prompt's MTP fill): the state
-- then equals one advanced over every position, and layers with compressors skip nothing
test("advance_skips_only_what_the_ring_drops", function()
  local slack = 8
  for _, precision in ipairs({ "fp32", "reference" }) do
    local att = layer(WINDOW)
    local x, after = inputs(200, 70, precision), inputs(4, 71, precision)
    local whole, skipped = state(att, precision, 400, slack), state(att, precision, 400, slack)
    att:advance(whole, x)
    local skip = skipped:skippable(200)
    assert_equal(skip, 200 - (att.window + slack))
    assert_equal(skipped:skippable(att.window + slack), 0)
    att:advance(skipped, x:narrow(1, skip + 1, 200 - skip), nil, skip)
    assert_equal(skipped:length(), 200)
    for back = 0, slack, slack do -- the ring's slack rows too: a rollback reads them
      whole:truncate(200 - back)
      skipped:truncate(200 - back)
      local a, b = att:forward(whole, after), att:forward(skipped, after)
      assert_equal(dsrt.max_abs_diff(a, b), 0, string.format("%s, %d back", precision, back))
      whole:truncate(200 - back)
      skipped:truncate(200 - back)
    end
  end
  for _, i in ipairs({ CSA, HCA }) do
    local st = state(layer(i), "fp32")
    assert_equal(st:skippable(300), 0)
  end
end)

test("errors_name_the_problem", function()
  local cfg, w = tiny()
  local att, other = layer(HCA), dsrt.attention(cfg.layers[HCA], cfg.dims, w.layers[HCA].attn, {})
  local st = state(att, "fp32", 20, 2)
  assert_error(function() att:forward(st, inputs(3, 1, "fp32"):narrow(2, 1, 64)) end, "must end in the layer's 128 input features")
  assert_error(function() att:forward(st, inputs(6, 1, "fp32"):view(2, 3, 128)) end, "expected %[S, 128%]")
  assert_error(function() other:forward(st, inputs(3, 1, "fp32")) end, "the state was made for another attention layer")
  assert_error(function() att:forward(st, inputs(3, 1, "reference"), "reference") end, "forward in reference precision with a state made for fp32")
  att:forward(st, inputs(10, 1, "fp32"))
  assert_error(function() st:truncate(7) end, "cannot truncate from 10 to 7 positions: .*slack = 2")
  assert_error(function() st:truncate(11) end, "cannot truncate from 10 to 11")
  assert_error(function() att:forward(st, inputs(11, 1, "fp32")) end, "11 new positions after 10 exceed the state's max_len 20")
  assert_error(function() att:advance(st, inputs(11, 1, "fp32")) end, "11 new positions after 10 exceed the state's max_len 20")
  assert_error(function() att:advance(st, inputs(3, 1, "reference"), "reference") end, "advance in reference precision with a state made for fp32")
  assert_error(function() other:advance(st, inputs(3, 1, "fp32")) end, "the state was made for another attention layer")
  assert_error(function() att:advance(st, inputs(3, 1, "fp32"), nil, 1) end,
               "advance cannot skip 1 positions before 3 rows: it may skip only what the state drops unread %(0 here; a layer with compressors keeps every position%)")
  local window = layer(WINDOW)
  local ring = state(window, "fp32", 400, 2)
  assert_error(function() window:advance(ring, inputs(129, 1, "fp32"), nil, 5) end,
               "advance cannot skip 5 positions before 129 rows: .*%(4 here; the ring keeps window %+ slack rows%)")
  assert_error(function() window:advance(ring, inputs(200, 1, "fp32"), nil, -1) end, "advance cannot skip %-1 positions")
  assert_error(function() window:advance(ring, inputs(200, 1, "fp32"), nil, math.maxinteger) end, "advance cannot skip 9223372036854775807 positions")
  assert_error(function() window:advance(ring, inputs(200, 1, "fp32"), nil, 201) end, "401 new positions after 0 exceed the state's max_len 400")
  assert_equal(ring:length(), 0)
  assert_equal(st:length(), 10) -- failed calls leave the state alone
  assert_error(function() dsrt.attn_state(att, { slack = 1 }) end, "'max_len' must be a number")
  local a = w.layers[HCA].attn
  local function build(attn) return function() dsrt.attention(cfg.layers[HCA], cfg.dims, attn, {}) end end
  local broken = {}
  for k, v in pairs(a) do broken[k] = v end
  broken.wkv = a.wq_a
  assert_error(build(broken), "attention: wkv maps 128 %-> 128 features, expected 128 %-> 512")
  broken.wkv, broken.compressor = a.wkv, nil
  assert_error(build(broken), "core.attention: attn: 'compressor' must be a table")
  broken.compressor = w.layers[CSA].attn.compressor
  assert_error(build(broken), "compressor.wkv maps 128 %-> 1024 features, expected 128 %-> 512")
  assert_error(function() dsrt.attention(cfg.layers[WINDOW], cfg.dims, a, {}) end, "a window%-only layer %(ratio 0%) has no compressor")
  local odd = {}
  for k, v in pairs(cfg.dims) do odd[k] = v end
  odd.head_dim = 100
  assert_error(function() dsrt.attention(cfg.layers[HCA], odd, a, {}) end, "attention: head_dim 100 must be a multiple of 8 up to 1024")
end)

return tests
