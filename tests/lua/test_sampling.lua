-- test_sampling.lua — dsrt.core.sample (runtime/sampling.c): greedy, seeded draws, the filters,
-- penalties, and the distribution itself.
--
-- What it protects: greedy is the argmax (first max wins); the same seed and step give the same
-- ids and other seeds other ids; top_k = 1, a tiny top_p and min_p = 1 all reduce to greedy;
-- temperature-1 sampling draws from softmax(logits) (chi-square over 20,000 draws, a threshold
-- that a temperature-1.2 distribution fails); the penalties move the choice as Hugging Face's do;
-- sample_async's tensor and list are sample_ids' ids; each invalid parameter is a clear error.
local dsrt = require "dsrt"
local core = require "dsrt.core"
local h = require "tests.helpers"
local assert_equal, assert_error = h.assert_equal, h.assert_error

local tests, test = h.suite()

local function f32(t) return dsrt.tensor(t, { dtype = "f32" }) end
local function ids(t, opts) return core.sample(t, opts):totable() end

local ROW = { 0.0, 1.0, 2.0, -1.0, 0.5, 1.5, -2.0, 0.3 }

test("greedy is the argmax, the first max wins", function()
  assert_equal(ids(f32({ { 1, 3, 2, 3 }, { 0, 0, 5, 0 }, { -1, -1, -1, -1 } })), { 1, 2, 0 })
  assert_equal(ids(f32({ 4, 9, 2 }), { temperature = 0, seed = 5 }), { 1 })
  local x = dsrt.randn({ 3, 1000 }, { seed = 2 })
  local rows = x:totable()
  local got = ids(x)
  for r = 1, 3 do
    local best = 1
    for i = 2, #rows[r] do if rows[r][i] > rows[r][best] then best = i end end
    assert_equal(got[r], best - 1)
  end
end)

test("same seed and step, same ids; other seeds or steps, other ids", function()
  local x = dsrt.randn({ 16, 500 }, { seed = 3 })
  local a = ids(x, { temperature = 1, seed = 7, step = 3 })
  assert_equal(ids(x, { temperature = 1, seed = 7, step = 3 }), a)
  local b = ids(x, { temperature = 1, seed = 8, step = 3 })
  local c = ids(x, { temperature = 1, seed = 7, step = 4 })
  local diff_b, diff_c = 0, 0
  for i = 1, 16 do
    if a[i] ~= b[i] then diff_b = diff_b + 1 end
    if a[i] ~= c[i] then diff_c = diff_c + 1 end
  end
  assert(diff_b >= 8 and diff_c >= 8, ("seeds/steps barely change the ids: %d, %d of 16"):format(diff_b, diff_c))
end)

test("top_k = 1, a tiny top_p and min_p = 1 are greedy", function()
  local x = dsrt.randn({ 8, 300 }, { seed = 4 })
  local greedy = ids(x)
  for seed = 1, 5 do
    assert_equal(ids(x, { temperature = 1.5, top_k = 1, seed = seed }), greedy)
    assert_equal(ids(x, { temperature = 1.5, top_p = 1e-6, seed = seed }), greedy)
    assert_equal(ids(x, { temperature = 1.5, min_p = 1, seed = seed }), greedy)
  end
end)

test("filters keep only the allowed tokens", function()
  local x = f32(ROW)
  local seen = {}
  for step = 0, 499 do
    local id = ids(x, { temperature = 1, top_k = 3, seed = 1, step = step })[1]
    seen[id] = true
  end
  -- the top 3 are ids 2 (2.0), 5 (1.5), 1 (1.0)
  for id in pairs(seen) do assert(id == 2 or id == 5 or id == 1, "top_k kept id " .. id) end
  assert(seen[2] and seen[5] and seen[1], "top_k = 3 never drew one of the three")
  for step = 0, 499 do
    local id = ids(x, { temperature = 1, min_p = 0.5, seed = 2, step = step })[1]
    assert(id == 2 or id == 5, "min_p 0.5 kept id " .. id) -- exp(-0.5) = 0.61 >= 0.5, exp(-1) < 0.5
  end
end)

local function softmax(row, t)
  local m, p, z = -math.huge, {}, 0
  for _, v in ipairs(row) do m = math.max(m, v) end
  for i, v in ipairs(row) do p[i] = math.exp((v - m) / t); z = z + p[i] end
  for i = 1, #p do p[i] = p[i] / z end
  return p
end

test("temperature-1 draws follow softmax(logits) (chi-square, 20,000 draws)", function()
  local x, n = f32({ ROW }), 20000
  local counts = {}
  for i = 1, #ROW do counts[i] = 0 end
  for step = 0, n - 1 do
    local id = ids(x, { temperature = 1, seed = 11, step = step })[1]
    counts[id + 1] = counts[id + 1] + 1
  end
  local function chi2(p)
    local s = 0
    for i = 1, #p do local e = n * p[i]; s = s + (counts[i] - e) ^ 2 / e end
    return s
  end
  -- 7 degrees of freedom: P(chi2 > 30) ~ 1e-4
  local good, wrong = chi2(softmax(ROW, 1)), chi2(softmax(ROW, 1.2))
  assert(good < 30, ("chi-square %.1f against softmax(logits)"):format(good))
  assert(wrong > 30, ("the test cannot tell temperature 1.2 from 1 (chi-square %.1f)"):format(wrong))
  -- and temperature 2 follows softmax(logits / 2)
  for i = 1, #ROW do counts[i] = 0 end
  for step = 0, n - 1 do
    local id = ids(x, { temperature = 2, seed = 12, step = step })[1]
    counts[id + 1] = counts[id + 1] + 1
  end
  assert(chi2(softmax(ROW, 2)) < 30, "temperature 2 does not follow softmax(logits / 2)")
end)

test("penalties change the choice as expected", function()
  local x = f32({ 2.0, 1.9, -1.0, -1.05 })
  assert_equal(ids(x), { 0 })
  assert_equal(ids(x, { repetition_penalty = 1.1, history = { 0 } }), { 1 })  -- 2.0 / 1.1 < 1.9
  assert_equal(ids(x, { repetition_penalty = 1.01, history = { 0, 0, 0 } }), { 0 }) -- once per id
  assert_equal(ids(x, { presence_penalty = 0.2, history = { 0 } }), { 1 })
  assert_equal(ids(x, { presence_penalty = 0.05, history = { 0 } }), { 0 })
  -- a negative logit is multiplied: -1.0 * 1.1 = -1.1 < -1.05
  local neg = f32({ -1.0, -1.05 })
  assert_equal(ids(neg), { 0 })
  assert_equal(ids(neg, { repetition_penalty = 1.1, history = { 0 } }), { 1 })
  -- per-row histories
  local two = f32({ { 2.0, 1.9 }, { 2.0, 1.9 } })
  assert_equal(ids(two, { presence_penalty = 1, history = { { 0 }, {} } }), { 1, 0 })
  assert_equal(ids(two, { presence_penalty = 1, history = { 0 } }), { 1, 1 })
  -- per-row parameters
  assert_equal(ids(two, { presence_penalty = { 1, 0 }, history = { 0 } }), { 1, 0 })
end)

test("sample_ids returns sample's ids as a list, B = 1 and B > 1", function()
  local x = dsrt.randn({ 5, 700 }, { seed = 9 })
  for _, o in ipairs({ {}, { temperature = 0.8, top_p = 0.9, seed = 3, step = 2 },
                       { temperature = 1, top_k = 5, presence_penalty = 1, history = { { 1 }, {}, { 2, 2 }, {}, { 7 } } } }) do
    assert_equal(core.sample_ids(x, o), core.sample(x, o):totable())
  end
  assert_equal(core.sample_ids(f32({ 4, 9, 2 })), { 1 })
  assert_error(function() core.sample_ids(f32({ 1, 0 / 0 })) end, "NaN")
end)

test("sample_async: the ids as a tensor and, on wait(), as sample_ids' list", function()
  local x = dsrt.randn({ 3, 500 }, { seed = 9 })
  for _, opts in ipairs { {}, { temperature = 0.8, top_p = 0.9, seed = 4, step = 7 } } do
    local want = core.sample_ids(x, opts)
    local t, pending = core.sample_async(x, opts)
    assert_equal(t.dtype, "i64")
    assert_equal(t.shape, { 3 })
    assert_equal(t:totable(), want)
    assert_equal(pending:wait(), want)
    assert_error(function() pending:wait() end, "already read")
  end
  local _, unread = core.sample_async(x[1], {})
  unread:close() -- read or not, closing frees it; closing twice is harmless
  unread:close()
  local bad = x:clone()
  bad[2][3] = 0 / 0
  assert_error(function() core.sample_async(bad, {}) end, "row 2 has a NaN logit") -- the CPU draws at once
  assert_error(function() core.sample_async(x, { temperature = -1 }) end, "temperature")
end)

test("invalid parameters and inputs are clear errors", function()
  local x = f32({ 1, 2, 3 })
  assert_error(function() core.sample(x, { temperature = -1 }) end, "temperature must be a finite number >= 0")
  assert_error(function() core.sample(x, { temperature = 0 / 0 }) end, "temperature")
  assert_error(function() core.sample(x, { temperature = math.huge }) end, "temperature")
  assert_error(function() core.sample(x, { top_k = -1 }) end, "top_k must be")
  assert_error(function() core.sample(x, { top_k = 1.5 }) end, "top_k must be an integer")
  assert_error(function() core.sample(x, { top_p = 0 }) end, "top_p must be in %(0, 1%]")
  assert_error(function() core.sample(x, { top_p = 1.5 }) end, "top_p")
  assert_error(function() core.sample(x, { min_p = -0.1 }) end, "min_p must be in %[0, 1%]")
  assert_error(function() core.sample(x, { repetition_penalty = 0 }) end, "repetition_penalty must be")
  assert_error(function() core.sample(x, { presence_penalty = math.huge }) end, "presence_penalty must be")
  assert_error(function() core.sample(x, { temperature = "hot" }) end, "temperature must be a number")
  assert_error(function() core.sample(x, { history = { 3 } }) end, "outside the vocabulary")
  assert_error(function() core.sample(x, { history = { -1 } }) end, "outside the vocabulary")
  assert_error(function() core.sample(x, { step = -1 }) end, "step must be >= 0")
  assert_error(function() core.sample(dsrt.tensor({ 1, 2 }, { dtype = "i64" })) end, "f32")
  assert_error(function() core.sample(f32({ 1, 0 / 0 }), { temperature = 1 }) end, "NaN")
  assert_error(function() core.sample(f32({ -math.huge, -math.huge }), { temperature = 1 }) end, "no finite logit")
  assert_error(function() core.sample(f32({ { 1, 2 }, { 3, 4 } }), { top_p = { 0.5 } }) end, "list of 1 values for 2 rows")
end)

return tests
