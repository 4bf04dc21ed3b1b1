-- test_gpu_sampling.lua — the CUDA sampler (kernels/sampling.cu) against the CPU one
-- (runtime/sampling.c): the same seed and step must give the SAME ids, not just the same
-- distribution, on fresh random logits at odd sizes (V = 77, 1000, 2049 and 4097 around the
-- kernels' stage and scan chunk, 129,280 = DSV4's vocabulary; B = 1, 3, 64), for greedy,
-- temperature, top_k, top_p, min_p, penalties and their combinations, on rows with exact ties,
-- -0/+0, -inf and +inf logits. The GPU draws also pass a chi-square test against softmax, and
-- bad inputs are the CPU's errors. sample_async gives the same ids, on the device and at wait(),
-- with a bad row reported by the wait.
--
-- Outputs are poisoned: before every CUDA call the allocator's cache is stocked with freed
-- blocks of 0xff bytes (four) in the size class of the [2B] ids-and-status buffer the call allocates,
-- so an id or status word the kernels forget to write reads -1 (an error "a bug", never a pass).
--
-- Run on the GPU machine: build/dsrt tests/run.lua tests/gpu/test_gpu_sampling.lua
local dsrt = require "dsrt"
local core = require "dsrt.core"
local h = require "tests.helpers"
local assert_error, assert_equal = h.assert_error, h.assert_equal

local tests, test = h.suite{ gpu = true }

local seed = 9100
local function next_seed() seed = seed + 1 return seed end

local function poison_cache(nbytes) h.poison_cuda_cache(nbytes, 4) end

local function rows_of(x) return x:dim() == 2 and x.shape[1] or 1 end

-- the CUDA ids (through both entry points) equal to the CPU's for logits x (CPU) and opts
local function same_ids(x, g, opts, what)
  local want = core.sample(x, opts):totable()
  local B = rows_of(x)
  poison_cache(16 * B)
  local t = core.sample(g, opts)
  if not t.device:match("^cuda") then error(what .. ": core.sample did not return a CUDA tensor", 2) end
  if t.dtype ~= "i64" then error(what .. ": ids are " .. t.dtype, 2) end
  local got = t:totable()
  poison_cache(16 * B)
  local list = core.sample_ids(g, opts)
  for r = 1, B do
    if got[r] ~= want[r] or list[r] ~= want[r] then
      error(string.format("%s: row %d: cuda %s (sample_ids %s), cpu %s", what, r, tostring(got[r]), tostring(list[r]),
                          tostring(want[r])), 2)
    end
  end
  return want
end

local PARAMS = {
  { name = "greedy" },
  { name = "T=1", temperature = 1 },
  { name = "T=0.7", temperature = 0.7 },
  { name = "T=2.5", temperature = 2.5 },
  { name = "top_k=1", temperature = 1, top_k = 1 },
  { name = "top_k=7", temperature = 0.8, top_k = 7 },
  { name = "top_k=3000", temperature = 1.1, top_k = 3000 },
  { name = "top_p=0.9", temperature = 0.7, top_p = 0.9 },
  { name = "top_p=0.3", temperature = 1, top_p = 0.3 },
  { name = "top_p tiny", temperature = 1, top_p = 1e-6 },
  { name = "min_p=0.05", temperature = 1, min_p = 0.05 },
  { name = "min_p=0.5", temperature = 1.5, min_p = 0.5 },
  { name = "min_p=1", temperature = 1, min_p = 1 },
  { name = "top_k+top_p+min_p", temperature = 0.9, top_k = 40, top_p = 0.8, min_p = 0.02 },
  { name = "top_p+min_p", temperature = 1.2, top_p = 0.95, min_p = 0.1 },
  { name = "penalties greedy", repetition_penalty = 1.3, presence_penalty = 0.5, hist = true },
  { name = "penalties T=1", temperature = 1, repetition_penalty = 1.2, presence_penalty = 0.3, hist = true },
  { name = "penalties top_p", temperature = 0.7, top_p = 0.9, repetition_penalty = 0.8, hist = true },
}

-- history lists for B rows over V ids, with repeats (each distinct id is penalized once)
local function histories(B, V, s)
  local hs, state = {}, s
  local function rnd(n) state = (state * 1103515245 + 12345) % 2147483648 return state % n end
  for r = 1, B do
    local l = {}
    for j = 1, 1 + rnd(40) do l[j] = rnd(V) end
    if #l > 2 then l[#l + 1] = l[1] end -- a duplicate
    hs[r] = l
  end
  return hs
end

local function opts_for(p, B, V, s, step)
  local o = { seed = s, step = step }
  for k, v in pairs(p) do if k ~= "name" and k ~= "hist" then o[k] = v end end
  if p.hist then o.history = histories(B, V, s) end
  return o
end

local function check_all(x, what, params, steps)
  local g = x:to("cuda")
  local B, V = rows_of(x), x.shape[x:dim()]
  for _, p in ipairs(params or PARAMS) do
    for step = 0, (steps or 2) - 1 do
      local s = next_seed()
      same_ids(x, g, opts_for(p, B, V, s, step), string.format("%s %s step %d", what, p.name, step))
    end
  end
end

test("random rows, odd sizes: the CPU's ids for every parameter set", function()
  for _, shape in ipairs({ { 1, 77 }, { 3, 1000 }, { 3, 2049 }, { 2, 4097 }, { 1, 1 }, { 5, 2 } }) do
    local x = dsrt.randn(shape, { seed = next_seed(), std = 3 })
    check_all(x, string.format("[%d, %d]", shape[1], shape[2]))
  end
  -- a 1-D row is B = 1
  local x = dsrt.randn({ 333 }, { seed = next_seed(), std = 2 })
  check_all(x, "[333]", nil, 1)
end)

test("the DSV4 vocabulary: V = 129280 at B = 1, 3 and 64", function()
  local V = 129280
  local x1 = dsrt.randn({ 1, V }, { seed = next_seed(), std = 4 })
  check_all(x1, "[1, 129280]", nil, 2)
  local x3 = dsrt.randn({ 3, V }, { seed = next_seed(), std = 2 })
  check_all(x3, "[3, 129280]", nil, 1)
  local x64 = dsrt.randn({ 64, V }, { seed = next_seed(), std = 3 })
  local few = { PARAMS[1], PARAMS[3], PARAMS[8], PARAMS[14], PARAMS[17] }
  check_all(x64, "[64, 129280]", few, 1)
end)

test("per-row parameters and histories in one batch", function()
  local B, V = 6, 3001
  local x = dsrt.randn({ B, V }, { seed = next_seed(), std = 3 })
  local g = x:to("cuda")
  for step = 0, 3 do
    local s = next_seed()
    same_ids(x, g, {
      seed = s, step = step,
      temperature = { 0, 0.7, 1, 1.3, 0, 2 }, top_k = { 0, 0, 50, 0, 3, 1000 },
      top_p = { 1, 0.9, 1, 0.5, 1, 0.99 }, min_p = { 0, 0, 0.1, 0, 0, 0.01 },
      repetition_penalty = { 1.2, 1, 1.1, 1, 2, 1 }, presence_penalty = { 0, 0.5, 0, 0, 1, 0 },
      history = histories(B, V, s),
    }, "per-row step " .. step)
  end
end)

test("ties, signed zeros, -inf and +inf logits", function()
  -- exact ties everywhere: logits on a coarse grid
  local B, V = 4, 1500
  local vals, st = {}, next_seed()
  local function rnd(n) st = (st * 1103515245 + 12345) % 2147483648 return st % n end
  for r = 1, B do
    vals[r] = {}
    for i = 1, V do vals[r][i] = (rnd(9) - 4) * 0.5 end
  end
  vals[2][7], vals[2][8] = 0.0, -0.0
  for i = 1, V, 3 do vals[3][i] = -math.huge end
  vals[4][10], vals[4][900], vals[4][1400] = math.huge, math.huge, math.huge
  local x = dsrt.tensor(vals, { dtype = "f32" })
  check_all(x, "ties", nil, 3)
  -- a row of zeros of both signs
  local z = {}
  for i = 1, 300 do z[i] = (i % 2 == 0) and 0.0 or -0.0 end
  check_all(dsrt.tensor({ z }, { dtype = "f32" }), "signed zeros", nil, 2)
  -- all but one -inf: every filter keeps that one
  local one = {}
  for i = 1, 5000 do one[i] = -math.huge end
  one[4321] = -3
  local x1 = dsrt.tensor({ one }, { dtype = "f32" })
  check_all(x1, "one finite", nil, 1)
  assert_equal(core.sample_ids(x1:to("cuda"), { temperature = 1, seed = 3 }), { 4320 })
end)

test("non-contiguous CUDA logits (a transposed view, a narrow)", function()
  local x = dsrt.randn({ 700, 5 }, { seed = next_seed(), std = 2 })
  local g = x:to("cuda")
  for _, p in ipairs({ PARAMS[1], PARAMS[2], PARAMS[8] }) do
    local s = next_seed()
    same_ids(x:transpose(1, 2):contiguous(), g:transpose(1, 2), opts_for(p, 5, 700, s, 0), "transposed " .. p.name)
    same_ids(x:narrow(1, 3, 600):transpose(1, 2):contiguous(), g:narrow(1, 3, 600):transpose(1, 2),
             opts_for(p, 5, 600, s, 1), "narrowed " .. p.name)
  end
end)

test("GPU draws follow softmax(logits / T) (chi-square)", function()
  local row = { 0.0, 1.0, 2.0, -1.0, 0.5, 1.5, -2.0, 0.3 }
  local B, steps = 2500, 8 -- 20,000 draws: B rows of the same logits, distinct counters
  local rows = {}
  for r = 1, B do rows[r] = row end
  local g = dsrt.tensor(rows, { dtype = "f32", device = "cuda" })
  local function chi2(t, against)
    local counts = {}
    for i = 1, #row do counts[i] = 0 end
    for step = 0, steps - 1 do
      for _, id in ipairs(core.sample_ids(g, { temperature = t, seed = 21, step = step })) do
        counts[id + 1] = counts[id + 1] + 1
      end
    end
    local m, p, z = -math.huge, {}, 0
    for _, v in ipairs(row) do m = math.max(m, v) end
    for i, v in ipairs(row) do p[i] = math.exp((v - m) / against); z = z + p[i] end
    local n, s = B * steps, 0
    for i = 1, #row do local e = n * p[i] / z; s = s + (counts[i] - e) ^ 2 / e end
    return s
  end
  -- 7 degrees of freedom: P(chi2 > 30) ~ 1e-4
  local good = chi2(1, 1)
  assert(good < 30, ("chi-square %.1f against softmax(logits)"):format(good))
  assert(chi2(1, 1.2) > 30, "the test cannot tell temperature 1.2 from 1")
  assert(chi2(0.6, 0.6) < 30, "temperature 0.6 does not follow softmax(logits / 0.6)")
end)

test("sample_async: the CPU's ids on the device and at wait(); a bad row is the wait's error", function()
  for _, B in ipairs { 1, 3 } do
    for _, opts in ipairs { {}, { temperature = 0.9, top_p = 0.9, seed = next_seed(), step = 5 },
                            { temperature = 0.7, top_k = 50, repetition_penalty = 1.3, presence_penalty = 0.5,
                              history = { 3, 9, 4000, 9 } }, { repetition_penalty = 2, history = { 1, 2, 3 } } } do
      local x = dsrt.randn({ B, 4097 }, { seed = next_seed() })
      local want = core.sample(x, opts):totable()
      poison_cache(16 * B)
      local ids, pending = core.sample_async(x:to("cuda"), opts)
      assert(ids.device:match("^cuda"), "sample_async's ids are on " .. ids.device)
      -- later work on the stream: wait() reads the draw's own copy whatever follows it
      local later = dsrt.randn({ 2048, 2048 }, { seed = 1, device = "cuda" })
      later = later:matmul(later)
      assert_equal(pending:wait(), want)
      assert_equal(ids:totable(), want)
    end
  end
  -- more draws in flight than the pool keeps, read in another order than drawn
  local x = dsrt.randn({ 20, 300 }, { seed = next_seed() })
  local want, pendings = core.sample_ids(x, {}), {}
  local g = x:to("cuda")
  for r = 1, 20 do
    local _, p = core.sample_async(g[r], {})
    pendings[r] = p
  end
  for r = 20, 1, -1 do assert_equal(pendings[r]:wait(), { want[r] }) end
  local nan = dsrt.tensor({ { 1, 2, 3 }, { 1, 0 / 0, 0 / 0 } }, { dtype = "f32", device = "cuda" })
  local _, bad = core.sample_async(nan, { temperature = 1 })
  assert_error(function() bad:wait() end, "row 2 has a NaN logit %(id 1%)")
  local _, unread = core.sample_async(g, {})
  unread:close()
  assert_equal(core.sample_ids(g, {}), want)
end)

test("bad inputs are the CPU's errors", function()
  local nan = dsrt.tensor({ { 1, 2, 3 }, { 1, 0 / 0, 0 / 0 } }, { dtype = "f32" })
  local g = nan:to("cuda")
  assert_error(function() core.sample(g, { temperature = 1 }) end, "row 2 has a NaN logit %(id 1%)")
  assert_error(function() core.sample_ids(g, {}) end, "row 2 has a NaN logit %(id 1%)")
  local ninf = dsrt.tensor({ { 1, 2 }, { -math.huge, -math.huge } }, { dtype = "f32", device = "cuda" })
  assert_error(function() core.sample(ninf, { temperature = 1 }) end, "row 2 has no finite logit")
  assert_error(function() core.sample(ninf) end, "row 2 has no finite logit")
  local x = dsrt.randn({ 2, 50 }, { seed = next_seed(), device = "cuda" })
  assert_error(function() core.sample(x:to("bf16")) end, "f32")
  assert_error(function() core.sample(x:view(2, 5, 10)) end, "f32 tensor %[B, V%]")
  assert_error(function() core.sample(x, { history = { 50 } }) end, "outside the vocabulary")
  assert_error(function() core.sample(x, { history = { { 1 }, { -1 } } }) end, "outside the vocabulary")
  assert_error(function() core.sample(x, { temperature = -1 }) end, "temperature must be")
  assert_error(function() core.sample(x, { top_p = { 0.5, 0 } }) end, "top_p must be in %(0, 1%], got 0 %(row 2%)")
  assert_error(function() core.sample(x, { history = { { 1 } } }) end, "history has 1 lists for 2 rows")
  -- after the errors the device still works
  assert_equal(core.sample_ids(x, {}), core.sample_ids(x:to("cpu"), {}))
end)

return tests
