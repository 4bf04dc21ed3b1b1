-- test_speculative.lua — MTP speculative decoding on the CPU (lua/dsrt/dsv4/speculative.lua,
-- model:verify / model:draft_next, generate{speculative = ...}, core.sample_probs / sample_verify).
--
-- What it protects:
--   - speculative greedy output equals plain greedy output token for token over ~150 tokens that
--     cross the window's wrap (128) and the ratio-128 compressor's entries (127, 255), for k = 1, 2
--     and 3 — with the real MTP drafts (random weights: they are almost never accepted) and with
--     drafts that are the known continuation with wrong tokens planted, so rounds accept 0..k;
--   - verify with the known greedy continuation accepts all; a wrong token at draft j accepts
--     exactly j - 1 (the drafts before it) and gives the target's token there;
--   - after a round (recursive drafts, a verify that rejects, the truncation) the decoder's logits
--     and the MTP's draft logits equal those of a session that never went ahead;
--   - rejection sampling gives the target's processed distribution (chi-square on 8 live ids of a
--     1000-id row, at positions 1 and 2, with dense draft probabilities and with deterministic
--     drafts), and sample_probs is the sampler's distribution (softmax, top_k, penalties, greedy);
--   - bad input is a clear error and leaves the session as it was.
local dsrt = require "dsrt"
local core = require "dsrt.core"
if core.attention == nil or core.sample_verify == nil then return {} end

local dsv4 = require "dsrt.dsv4"
local speculative = require "dsrt.dsv4.speculative"
local h = require "tests.helpers"
local assert_equal, assert_error = h.assert_equal, h.assert_error

local tests, test = h.suite()

local models = {}
local tiny_dir
local function tiny(precision)
  tiny_dir = tiny_dir or h.make_tiny_model(11)
  models[precision] = models[precision] or dsv4.load(tiny_dir, { precision = precision })
  return models[precision]
end

local prompt = h.prompt_ids

local PROMPT, NEW = 110, 100 -- positions 110..210: the window wraps at 128, the ratio-128 entry at 127

local plain_cache = {}
local function plain_greedy(precision, n_prompt, n_new)
  local key = precision .. n_prompt .. "/" .. n_new
  if not plain_cache[key] then
    plain_cache[key] = tiny(precision):generate { ids = prompt(n_prompt, 1), max_tokens = n_new }.ids
  end
  return plain_cache[key]
end

-- generate with speculative.propose replaced: the drafts become the plain continuation, wrong
-- wherever (index + salt) % 5 == 0; with real_chain the real MTP chain runs first (its state must
-- then be undone as always)
local with_planted_drafts = h.with_planted_drafts

test("speculative greedy equals plain greedy over 100 tokens, k = 1, 2, 3 (planted drafts)", function()
  local m, want = tiny("fp32"), plain_greedy("fp32", PROMPT, NEW)
  for k = 1, 3 do
    with_planted_drafts(want, k, k == 3, function()
      local r = m:generate { ids = prompt(PROMPT, 1), max_tokens = NEW, speculative = { k = k } }
      assert_equal(r.ids, want, "k = " .. k)
      local st = r.speculative
      assert_equal(st.k, k)
      assert_equal(#st.acceptance, k)
      assert(st.accepted > 0 and st.accepted < st.drafted, "k = " .. k .. ": planted drafts should be partly accepted")
      assert(st.mean_accepted_length > 1 and st.mean_accepted_length <= k + 1, "mean accepted length " .. st.mean_accepted_length)
      for j = 1, k do assert(st.acceptance[j] >= 0 and st.acceptance[j] <= 1) end
      assert(r.timings.decode_tokens_per_s > 0)
    end)
  end
end)

test("speculative greedy with the real MTP drafts equals plain greedy (fp32 k = 2, reference k = 3)", function()
  local want = plain_greedy("fp32", PROMPT, NEW)
  local r = tiny("fp32"):generate { ids = prompt(PROMPT, 1), max_tokens = 24, speculative = { k = 2 } }
  assert_equal(r.ids, table.move(want, 1, 24, 1, {}))
  assert_equal(r.finish_reason, "length")
  local ref = plain_greedy("reference", 20, 12)
  -- streaming gives the same ids; a max_len that ends the session early ends both alike
  local ids = {}
  for _, id in tiny("reference"):stream { ids = prompt(20, 1), max_tokens = 12, speculative = { k = 3 } } do ids[#ids + 1] = id end
  assert_equal(ids, ref)
  local short = tiny("fp32"):generate { ids = prompt(20, 1), max_tokens = 30, max_len = 27 }
  local short_spec = tiny("fp32"):generate { ids = prompt(20, 1), max_tokens = 30, max_len = 27, speculative = { k = 3 } }
  assert_equal(short_spec.ids, short.ids)
  assert_equal(short_spec.finish_reason, short.finish_reason)
end)

test("sampled speculative generation (temperature > 0) is reproducible and stays in the sampler's candidates", function()
  local m = tiny("fp32")
  local opts = { ids = prompt(20, 2), max_tokens = 8, temperature = 0.8, top_k = 5, seed = 3, speculative = { k = 2 } }
  local r = m:generate(opts)
  assert_equal(#r.ids, 8)
  assert_equal(m:generate(opts).ids, r.ids)
  assert(r.speculative.rounds >= 1 and r.speculative.drafted >= 2, "no speculative round ran")
  -- verify at temperature > 0 with the drafts' own q: every token is among the target's top 5
  local s = m:session { max_len = 40 }
  local ids = prompt(20, 2)
  m:forward(s, ids, { logits = "none" })
  local drafts, q = speculative.propose(m, s, 17, 2, { temperature = 0.8, top_k = 5, history = ids, seed = 1 })
  assert_equal(q.shape, { 2, m.dims.vocab })
  local _, _, info = m:verify(s, { 17, drafts[1], drafts[2] }, { temperature = 0.8, top_k = 5, draft_probs = q, seed = 1 })
  for i, id in ipairs(info.tokens) do
    local p = core.sample_probs(info.logits:narrow(1, i, 1), { temperature = 0.8, top_k = 5 })
    assert(p[1][id + 1]:item() > 0, "token " .. i .. " is outside the target's top_k")
  end
end)

-- a session over the prompt, and the plain greedy continuation after it
local function primed(precision, n_prompt)
  local m = tiny(precision)
  local cont = plain_greedy(precision, n_prompt, 8)
  local s = m:session { max_len = n_prompt + 16 }
  m:forward(s, prompt(n_prompt, 1), { logits = "none" })
  return m, s, cont
end

test("verify: the known continuation is accepted whole; a wrong draft j accepts exactly j - 1", function()
  for _, precision in ipairs { "fp32", "reference" } do
    local m, s, cont = primed(precision, 30)
    local a, next_id, info = m:verify(s, { cont[1], cont[2], cont[3], cont[4] })
    assert_equal(a, 3)
    assert_equal(next_id, cont[5])
    assert_equal(info.tokens, { cont[2], cont[3], cont[4], cont[5] })
    assert_equal(info.logits.shape, { 4, m.dims.vocab })
    assert_equal(s:length(), 34)
    for j = 1, 3 do
      s:truncate(30)
      local ids = { cont[1], cont[2], cont[3], cont[4] }
      ids[j + 1] = (ids[j + 1] + 7) % m.dims.vocab
      local got, nxt, inf = m:verify(s, ids)
      assert_equal(got, j - 1, precision .. " wrong draft " .. j)
      assert_equal(nxt, cont[j + 1])
      assert_equal(#inf.tokens, j)
      assert_equal(s:length(), 30 + j)
    end
    -- no drafts: a plain step
    s:truncate(30)
    local a0, n0 = m:verify(s, { cont[1] })
    assert_equal(a0, 0)
    assert_equal(n0, cont[2])
  end
end)

local assert_rows_close = h.assert_rows_close

test("after drafts, a rejecting verify and its rollback, decoder and MTP equal a session that never went ahead", function()
  -- the round spans positions 125..128: the window wraps and the ratio-128 compressor emits at 127
  local m, s, cont = primed("fp32", 125)
  local d1 = speculative.propose(m, s, cont[1], 3, {})
  assert_equal(#d1, 3)
  local a = m:verify(s, { cont[1], cont[2], (cont[3] + 1) % m.dims.vocab, cont[4] })
  assert_equal(a, 1)
  local straight = m:session { max_len = 141 }
  m:forward(straight, prompt(125, 1), { logits = "none" })
  m:forward(straight, { cont[1], cont[2] }, { logits = "none" })
  assert_equal(s:length(), straight:length())
  -- the MTP's draft logits (its ring, refilled from the decoder), then a chain of drafts
  assert_rows_close(m:draft(s, cont[3]), m:draft(straight, cont[3]), 1e-5, "draft")
  assert_rows_close(m:draft_next(s, 5), m:draft_next(straight, 5), 1e-5, "draft_next")
  assert_rows_close(m:forward(s, { cont[3], cont[4] }), m:forward(straight, { cont[3], cont[4] }), 1e-5, "decoder")
  assert_rows_close(m:draft(s, cont[5]), m:draft(straight, cont[5]), 1e-5, "draft after")
end)

-- ---- the processed distribution and rejection sampling (core) ----

local V = 1000
local LIVE = { 3, 200, 255, 256, 511, 700, 998, 999 } -- 0-based ids, across 256-id draw chunks

local function masked_logits(values)
  local row = {}
  for i = 1, V do row[i] = -math.huge end
  for j, id in ipairs(LIVE) do row[id + 1] = values[j] end
  return row
end

test("sample_probs is the sampler's distribution: softmax, top_k, penalties, greedy one-hot", function()
  local row = masked_logits { 1.0, 0.5, 2.0, -1.0, 0.0, 1.5, 0.25, -0.5 }
  local x = dsrt.tensor({ row })
  local p = core.sample_probs(x, { temperature = 0.7 }):totable()[1]
  local z = 0
  for j = 1, #LIVE do z = z + math.exp((x[1][LIVE[j] + 1]:item() - 2.0) / 0.7) end
  local total = 0
  for i = 1, V do total = total + p[i] end
  h.assert_close(total, 1, 1e-6)
  for j, id in ipairs(LIVE) do h.assert_close(p[id + 1], math.exp((x[1][id + 1]:item() - 2.0) / 0.7) / z, 1e-6) end
  assert_equal(p[2], 0)
  -- top_k 3 keeps ids 255, 700, 3 (logits 2, 1.5, 1)
  local pk = core.sample_probs(x, { temperature = 1, top_k = 3 }):totable()[1]
  local kept = 0
  for i = 1, V do if pk[i] > 0 then kept = kept + 1 end end
  assert_equal(kept, 3)
  assert(pk[256] > pk[701] and pk[701] > pk[4] and pk[4] > 0)
  -- greedy: one-hot at the (penalized) argmax; per-row histories
  local g = core.sample_probs(dsrt.tensor({ row, row }), { repetition_penalty = 4, history = { {}, { 255 } } }):totable()
  assert_equal(g[1][256], 1)
  assert_equal(g[2][701], 1)
  assert_equal(g[2][256], 0)
  -- the draw follows it: sample_ids at many steps lands only on kept ids
  for step = 0, 50 do
    local id = core.sample_ids(x, { temperature = 1, top_k = 3, seed = 3, step = step })[1]
    assert(pk[id + 1] > 0, "drew id " .. id .. " outside top_k")
  end
end)

-- chi-square of counts against probabilities over the live ids; df = 7, 0.1% critical value 24.3
local function assert_distribution(counts, probs, n, what)
  local chi = 0
  for _, id in ipairs(LIVE) do
    local e = probs[id + 1] * n
    if e > 0 then chi = chi + ((counts[id] or 0) - e) ^ 2 / e
    elseif (counts[id] or 0) > 0 then error(what .. ": drew id " .. id .. " of probability 0", 2) end
  end
  for id, c in pairs(counts) do
    if probs[id + 1] == 0 and c > 0 then error(what .. ": drew id " .. id .. " of probability 0", 2) end
  end
  if not (chi < 24.3) then error(string.format("%s: chi-square %.1f >= 24.3 (df 7)", what, chi), 2) end
end

test("rejection sampling gives the target distribution (chi-square, positions 1 and 2, dense and one-hot q)", function()
  local target = dsrt.tensor({ masked_logits { 1.0, 0.5, 2.0, -1.0, 0.0, 1.5, 0.25, -0.5 },
                               masked_logits { -0.3, 1.2, 0.1, 0.9, 2.2, -1.0, 0.4, 0.0 },
                               masked_logits { 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0 } })
  local draft = dsrt.tensor({ masked_logits { 0.2, 1.9, 0.0, 0.3, 1.0, -0.7, 0.0, 0.6 },
                              masked_logits { 1.0, 1.0, 1.0, 1.0, -2.0, 1.0, 0.5, 2.0 } })
  local params = { temperature = 0.9 }
  local p = core.sample_probs(target, params)
  local q = core.sample_probs(draft, params)
  local pt, N = p:totable(), 6000
  local first, second, n_second, accepted = {}, {}, 0, 0
  for t = 0, N - 1 do
    local d = core.sample_ids(draft, { temperature = 0.9, seed = 77, step = t })
    local a, nxt = core.sample_verify(p, d, { q = q, seed = 5, step = 3 * t })
    local out = { d[1], d[2] }
    out[a + 1] = nxt
    first[out[1]] = (first[out[1]] or 0) + 1
    if a >= 1 then second[out[2]] = (second[out[2]] or 0) + 1; n_second = n_second + 1 end
    accepted = accepted + a
  end
  assert_distribution(first, pt[1], N, "position 1")
  assert_distribution(second, pt[2], n_second, "position 2")
  assert(accepted > N / 4 and accepted < 2 * N, "acceptances " .. accepted)
  -- deterministic drafts (q one-hot): a fixed draft id, still the target's distribution
  local only = {}
  for t = 0, N - 1 do
    local a, nxt = core.sample_verify(p:narrow(1, 1, 2), { 200 }, { seed = 6, step = 2 * t })
    local id = a == 1 and 200 or nxt
    only[id] = (only[id] or 0) + 1
  end
  assert_distribution(only, pt[1], N, "one-hot q")
end)

test("sample_verify: reproducible, and the CPU draw is the documented one", function()
  local p = core.sample_probs(dsrt.randn({ 4, 300 }, { seed = 4 }), { temperature = 1 })
  local q = core.sample_probs(dsrt.randn({ 3, 300 }, { seed = 5 }), { temperature = 1 })
  local a1, n1 = core.sample_verify(p, { 1, 2, 3 }, { q = q, seed = 9, step = 11 })
  local a2, n2 = core.sample_verify(p, { 1, 2, 3 }, { q = q, seed = 9, step = 11 })
  assert_equal({ a1, n1 }, { a2, n2 })
  -- drafts of probability 1 under p (one-hot p) are always accepted; the bonus is p's last row's id
  local hot = core.sample_probs(dsrt.tensor({ { 0, 5, 0 }, { 0, 0, 5 }, { 9, 0, 0 } }, { dtype = "f32" }), {})
  assert_equal({ core.sample_verify(hot, { 1, 2 }, { seed = 1 }) }, { 2, 0 })
  assert_equal({ core.sample_verify(hot, { 1, 0 }, { seed = 1 }) }, { 1, 2 })
end)

test("bad input is a clear error and leaves the session as it was", function()
  local m, s, cont = primed("fp32", 20)
  local vocab = m.dims.vocab
  assert_error(function() m:verify(s, {}) end, "at least one id")
  assert_error(function() m:verify(s, { cont[1], vocab }) end, "outside the vocabulary")
  assert_equal(s:length(), 20)
  local ids = { cont[1] }
  for i = 2, 17 do ids[i] = 1 end
  assert_error(function() m:verify(s, ids) end, "slack of at least 17")
  assert_error(function() m:verify(s, { cont[1], 1 }, { temperature = -1 }) end, "temperature")
  assert_error(function() m:verify(s, { cont[1], 1 }, { history = { -1 } }) end, "history%[1%]")
  assert_error(function() m:verify(s, { cont[1], 1 }, { temperature = 1, draft_probs = { 1 } }) end, "draft_probs")
  assert_equal(s:length(), 20)
  local fresh = m:session { max_len = 30 }
  m:forward(fresh, { 1, 2 })
  assert_error(function() m:draft_next(fresh, 3) end, "no draft to continue")
  m:draft(fresh, 3)
  assert_error(function() m:draft_next(fresh, vocab) end, "outside the vocabulary")
  assert_error(function() m:generate { ids = { 1, 2 }, speculative = { k = 0 } } end, "speculative.k")
  assert_error(function() m:generate { ids = { 1, 2 }, speculative = 3 } end, "speculative must be")
  local no_mtp = dsv4.load(tiny_dir, { precision = "fp32", mtp = false })
  assert_error(function() no_mtp:generate { ids = { 1, 2 }, speculative = true } end, "needs the MTP layer")
  assert_error(function() speculative.propose(m, fresh, 3, 0, {}) end, "k must be")
  local p = core.sample_probs(dsrt.randn({ 3, 50 }, { seed = 1 }), { temperature = 1 })
  assert_error(function() core.sample_verify(p, { 1 }) end, "p must be f32 %[k %+ 1, V%] = %[2, V%]")
  assert_error(function() core.sample_verify(p, { 1, 50 }) end, "outside the vocabulary")
  assert_error(function() core.sample_verify(p, { 1, 2 }, { q = p }) end, "q must be f32 %[k, V%]")
  assert_error(function() core.sample_verify(p, { 1, "x" }) end, "not an integer")
  assert_error(function() core.sample_probs(dsrt.tensor({ { 0 / 0, 1 } }), { temperature = 1 }) end, "NaN")
end)

return tests
