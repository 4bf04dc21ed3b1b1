-- test_gpu_speculative.lua — MTP speculative decoding on CUDA: the kernels of kernels/sampling.cu
-- that it adds (dsrt_sample_probs, dsrt_sample_verify) against their CPU implementations in
-- runtime/sampling.c, and the model-level loop (lua/dsrt/dsv4/speculative.lua) on the tiny model on
-- the GPU.
--
-- What it protects:
--   - core.sample_probs on CUDA equals the CPU's BIT FOR BIT (p_i and z are the same doubles on both
--     sides, the quotient is rounded once) at V = 77, 1000, 4097 (around the scan chunk and the walk
--     stage) and 129,280, B = 1 and 3, greedy / temperature / top_k / top_p / min_p / penalties, on
--     fresh random logits with ties and -inf; the output is poisoned first (0xff bytes are NaN: an
--     entry the kernels forget to write fails);
--   - core.sample_verify on CUDA gives the CPU's accepted count and next id, for dense q and for
--     deterministic drafts, k = 0, 1, 2, 3 and 32, V around the 256-id draw chunks and 1024-chunk
--     limit (77, 1000, 4097, 129,280, 300,001), the empty-residual fallback (a draft of probability
--     0 under p = q), and its 3-word output poisoned;
--   - on the tiny model on CUDA, both precisions: speculative greedy equals plain greedy (CUDA) token
--     for token, with planted drafts (rounds accept 0..k) and with the real MTP drafts; verify of the
--     known continuation accepts all, a wrong draft j accepts j - 1; rollback equals never going
--     ahead (decoder and MTP logits); sampled speculative generation is reproducible;
--   - errors: p and q on different devices, bad shapes, a CPU draft_probs for a CUDA model (the
--     session is left as it was).
--
-- Run on the GPU machine: build/dsrt tests/run.lua tests/gpu/test_gpu_speculative.lua
local dsrt = require "dsrt"
local core = require "dsrt.core"
local h = require "tests.helpers"
local assert_equal, assert_error = h.assert_equal, h.assert_error

local tests, test = h.suite { gpu = true }

local seed = 9700
local function next_seed() seed = seed + 1 return seed end

-- the caching allocator's blocks of nbytes stocked with 0xff (NaN as f32, -1 as i64)
local function poison_cache(nbytes) h.poison_cuda_cache(nbytes, 4) end

-- random logits [B, V] with exact ties and some -inf
local function logits(B, V)
  local x = dsrt.randn({ B, V }, { seed = next_seed() }) * 3
  x = x:to("bf16"):to("f32") -- bf16 rounding makes exact ties common
  local t = x:totable()
  for r = 1, B do
    for i = 1, V, 7 do t[r][i] = -math.huge end
  end
  return dsrt.tensor(t, { dtype = "f32" })
end

local function assert_same(got, want, what)
  assert_equal(got.device:match("^cuda") ~= nil, true, what .. ": not on CUDA")
  local g = got:to("cpu")
  assert_equal(g.shape, want.shape, what)
  if g:ne(g):sum():item() ~= 0 then error(what .. ": NaN (an entry was never written)", 2) end
  local d = dsrt.max_abs_diff(g, want)
  if d ~= 0 then error(string.format("%s: CUDA differs from the CPU by %g", what, d), 2) end
end

local PARAMS = {
  { name = "greedy" },
  { name = "T=1", temperature = 1 },
  { name = "T=0.6", temperature = 0.6 },
  { name = "top_k=5", temperature = 0.9, top_k = 5 },
  { name = "top_k=3000", temperature = 1.1, top_k = 3000 },
  { name = "top_p=0.8", temperature = 0.7, top_p = 0.8 },
  { name = "min_p=0.05", temperature = 1, min_p = 0.05 },
  { name = "all", temperature = 0.9, top_k = 40, top_p = 0.9, min_p = 0.02 },
  { name = "penalties", temperature = 1, repetition_penalty = 1.3, presence_penalty = 0.4, hist = true },
  { name = "penalties greedy", repetition_penalty = 1.3, hist = true },
}

test("sample_probs on CUDA equals the CPU bit for bit (odd V, B = 1 and 3, every filter)", function()
  for _, V in ipairs { 77, 1000, 4097, 129280 } do
    for _, B in ipairs { 1, 3 } do
      local x = logits(B, V)
      local g = x:to("cuda")
      for _, p in ipairs(PARAMS) do
        local opts = {}
        for k, v in pairs(p) do if k ~= "name" and k ~= "hist" then opts[k] = v end end
        if p.hist then
          opts.history = {}
          for r = 1, B do opts.history[r] = { (r * 13) % V, (r * 29) % V, (r * 13) % V } end
        end
        local want = core.sample_probs(x, opts)
        poison_cache(4 * B * V)
        assert_same(core.sample_probs(g, opts), want, string.format("%s V=%d B=%d", p.name, V, B))
      end
    end
  end
end)

-- dense probability rows [n, V] (temperature 1 over random logits, some with top_k)
local function probs(n, V, top_k)
  return core.sample_probs(dsrt.randn({ n, V }, { seed = next_seed() }) * 2, { temperature = 1, top_k = top_k })
end

local function same_verify(p, drafts, opts, what)
  local want = { core.sample_verify(p, drafts, opts) }
  local gopts = {}
  for k, v in pairs(opts) do gopts[k] = v end
  if opts.q then gopts.q = opts.q:to("cuda") end
  poison_cache(24)
  local got = { core.sample_verify(p:to("cuda"), drafts, gopts) }
  if got[1] ~= want[1] or got[2] ~= want[2] then
    error(string.format("%s: CUDA accepted %s next %s, CPU accepted %s next %s", what, tostring(got[1]),
                        tostring(got[2]), tostring(want[1]), tostring(want[2])), 2)
  end
  return want[1]
end

test("sample_verify on CUDA equals the CPU (dense q, one-hot q, k = 0..3 and 32, V across the draw chunks)", function()
  for _, V in ipairs { 77, 1000, 4097, 129280, 300001 } do
    for _, k in ipairs { 0, 1, 2, 3, 32 } do
      if not (k == 32 and V > 5000) then
        local p = probs(k + 1, V, V > 2000 and 50 or nil)
        local q = k > 0 and probs(k, V, V > 2000 and 50 or nil) or nil
        local accepted = {}
        for trial = 1, 6 do
          local drafts = {}
          for j = 1, k do
            -- a mix of likely ids (the draft's argmax) and arbitrary ones
            drafts[j] = trial % 2 == 0 and q and q[j]:argmax():item() or (trial * 7919 + j * 104729) % V
          end
          local s = next_seed()
          local a = same_verify(p, drafts, { q = q, seed = s, step = trial }, string.format("V=%d k=%d dense", V, k))
          accepted[#accepted + 1] = a
          same_verify(p, drafts, { seed = s, step = trial }, string.format("V=%d k=%d one-hot", V, k))
        end
      end
    end
  end
  -- the empty residual: p == q, a draft of probability 0 is rejected and the draw falls back to p
  local p = probs(2, 1000, 10)
  local q = p:narrow(1, 1, 1):clone()
  local zero_id
  local row = p[1]:totable()
  for i = 1, 1000 do if row[i] == 0 then zero_id = i - 1 break end end
  assert_equal(same_verify(p, { zero_id }, { q = q, seed = 3 }, "empty residual"), 0)
end)

-- ---- the tiny model on CUDA ----

local dsv4 = require "dsrt.dsv4"
local speculative = require "dsrt.dsv4.speculative"

local tiny_dir
local models = {}
local function tiny(precision)
  tiny_dir = tiny_dir or h.make_tiny_model(11)
  models[precision] = models[precision] or dsv4.load(tiny_dir, { precision = precision, device = "cuda" })
  return models[precision]
end

local prompt, with_planted_drafts = h.prompt_ids, h.with_planted_drafts

test("speculative greedy equals plain greedy on CUDA, k = 1, 2, 3, both precisions", function()
  for _, precision in ipairs { "fp32", "reference" } do
    local m = tiny(precision)
    local ids = prompt(110, 1)
    local want = m:generate { ids = ids, max_tokens = 150 }.ids
    for k = 1, 3 do
      with_planted_drafts(want, k, true, function()
        local r = m:generate { ids = ids, max_tokens = 150, speculative = { k = k } }
        assert_equal(r.ids, want, precision .. " planted k = " .. k)
        assert(r.speculative.accepted > 0, "no planted draft was accepted")
      end)
      assert_equal(m:generate { ids = ids, max_tokens = 40, speculative = { k = k } }.ids,
                   table.move(want, 1, 40, 1, {}), precision .. " real drafts k = " .. k)
    end
  end
end)

local assert_rows_close = h.assert_rows_close

test("verify on CUDA: the continuation is accepted whole, a wrong draft j accepts j - 1; rollback is exact", function()
  for _, precision in ipairs { "fp32", "reference" } do
    local m = tiny(precision)
    local cont = m:generate { ids = prompt(125, 1), max_tokens = 8 }.ids
    local s = m:session { max_len = 141 }
    m:forward(s, prompt(125, 1), { logits = "none" })
    local a, nxt = m:verify(s, { cont[1], cont[2], cont[3], cont[4] })
    assert_equal({ a, nxt, s:length() }, { 3, cont[5], 129 })
    for j = 1, 3 do
      s:truncate(125)
      local ids = { cont[1], cont[2], cont[3], cont[4] }
      ids[j + 1] = (ids[j + 1] + 7) % m.dims.vocab
      local got, n2 = m:verify(s, ids)
      assert_equal({ got, n2 }, { j - 1, cont[j + 1] }, precision .. " wrong draft " .. j)
    end
    -- a round with recursive drafts, rejected at draft 2, against a session that never went ahead
    s:truncate(125)
    speculative.propose(m, s, cont[1], 3, {})
    assert_equal(m:verify(s, { cont[1], cont[2], (cont[3] + 1) % m.dims.vocab, cont[4] }), 1)
    local straight = m:session { max_len = 141 }
    m:forward(straight, prompt(125, 1), { logits = "none" })
    m:forward(straight, { cont[1], cont[2] }, { logits = "none" })
    local tol = precision == "fp32" and 1e-5 or 1e-2
    assert_rows_close(m:draft(s, cont[3]):to("cpu"), m:draft(straight, cont[3]):to("cpu"), tol, precision .. " draft")
    assert_rows_close(m:forward(s, { cont[3], cont[4] }):to("cpu"), m:forward(straight, { cont[3], cont[4] }):to("cpu"),
                      tol, precision .. " decoder")
  end
end)

test("sampled speculative generation on CUDA is reproducible; drafts' q stay on the device", function()
  local m = tiny("fp32")
  local opts = { ids = prompt(30, 2), max_tokens = 24, temperature = 0.8, top_p = 0.9, seed = 5, speculative = { k = 2 } }
  local r = m:generate(opts)
  assert_equal(#r.ids, 24)
  assert_equal(m:generate(opts).ids, r.ids)
  local s = m:session { max_len = 40 }
  m:forward(s, prompt(30, 2), { logits = "none" })
  local drafts, q = speculative.propose(m, s, 9, 2, { temperature = 0.8, seed = 1 })
  assert(q.device:match("^cuda"), "q is on " .. q.device)
  local _, _, info = m:verify(s, { 9, drafts[1], drafts[2] }, { temperature = 0.8, draft_probs = q, seed = 1 })
  assert(#info.tokens >= 1)
end)

test("errors: mixed devices and bad shapes are clear; a failed verify leaves the session as it was", function()
  local p = probs(3, 50):to("cuda")
  assert_error(function() core.sample_verify(p, { 1, 2 }, { q = probs(2, 50) }) end, "different devices")
  assert_error(function() core.sample_verify(p, { 1 }) end, "p must be f32 %[k %+ 1, V%]")
  assert_error(function() core.sample_verify(p, { 1, 2 }, { q = probs(2, 51):to("cuda") }) end, "q must be")
  assert_error(function() core.sample_verify(p, { 1, 99 }) end, "outside the vocabulary")
  local m = tiny("fp32")
  local s = m:session { max_len = 40 }
  m:forward(s, prompt(10, 3), { logits = "none" })
  local q = dsrt.zeros({ 2, m.dims.vocab }) -- on the CPU
  assert_error(function() m:verify(s, { 1, 2, 3 }, { temperature = 1, draft_probs = q }) end, "different devices")
  assert_equal(s:length(), 10)
end)

return tests
