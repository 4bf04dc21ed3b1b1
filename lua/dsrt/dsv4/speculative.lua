-- dsrt.dsv4.speculative — MTP speculative decoding: drafts from the predictor, ONE verifying forward
-- of the decoder, exact rollback (SPEC §8.2, §6.9).
--
--   local spec = require "dsrt.dsv4.speculative"
--   -- next_id: the token just chosen (not yet forwarded); history: every id so far, next_id included
--   local drafts, q = spec.propose(model, seq, next_id, 2, {temperature = 0.8, history = h, seed = 1, step = t})
--   local accepted, next_id2, info = model:verify(seq, {next_id, drafts[1], drafts[2]},
--                                                 {temperature = 0.8, history = h, draft_probs = q, seed = 1, step = t})
--   -- info.tokens = the drafts accepted, then next_id2; seq now holds next_id and the accepted drafts
--
-- What it protects:
--   - The output distribution is the target's: greedy (temperature 0 or absent) accepts the longest
--     prefix of drafts equal to the target's argmax at their position and adds the target's token
--     after it, so the output is plain greedy decoding's token for token; with temperature > 0 it
--     is the standard rejection sampling (accept d_i with probability min(1, p(d_i)/q(d_i)); on a
--     rejection draw from normalise(max(0, p - q)); after k acceptances the bonus token from the
--     last row), where p and q are the sampler's PROCESSED distributions (penalties, temperature,
--     top-k/p, min-p: core.sample_probs), so every filter the user set holds for the output too.
--     Drafts brought without probabilities are deterministic proposals (q one-hot at the draft).
--   - Penalties see the history as plain decoding would: row i of the verify (the token after
--     draft i) is penalized over history + d_1..d_i.
--   - Proposals are sampled with the target's sampler settings (greedy when temperature is 0; a
--     greedy proposal at temperature 1 would kill acceptance).
--   - After verify the decoder AND the MTP layer are exactly where plain decoding of the accepted
--     tokens leaves them (session:truncate; dsrt.dsv4.mtp undoes the recursive drafts' positions and
--     refills them from the decoder's residuals).
--   - Reproducible randomness (numeric.h Philox), counters documented: with the generation seed s
--     and step t = the index (0-based, among generated tokens) of the token that verify's row 0
--     decides: draft j (1-based) is core.sample_ids(draft logits, {seed = s ~ DRAFT_SALT, step = t + j - 1});
--     verify's acceptance uniforms and residual/bonus draw are dsrt_sample_verify's (sampling.h)
--     with seed s ~ VERIFY_SALT and that step: counters 2(t + i) and 2(t + a) + 1, never reused
--     within a generation (each round starts at the index after the last token it produced).
-- On the GPU the logits never come to the host: sample_ids / sample_probs / sample_verify run where
-- they lie, and only ids (and the accepted count) cross.
local dsrt = require "dsrt"
local core = require "dsrt.core"

local spec = {}

spec.DRAFT_SALT = 0x4D5450447261667 -- "MTPDraf": proposal draws, apart from the plain sampler's
spec.VERIFY_SALT = 0x5370656356657269 -- "SpecVeri": acceptance and residual draws
spec.MAX_K = 32                     -- sampling.h DSRT_VERIFY_MAX_K

local SAMPLING = { "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty" }

local function fail(what, fmt, ...) error(string.format("dsv4.model." .. what .. ": " .. fmt, ...), 4) end

-- the sampler parameters of opts (a fresh table), and whether they sample (temperature > 0)
local function sampler_params(opts, what)
  local params = {}
  for _, k in ipairs(SAMPLING) do
    local v = opts[k]
    if v ~= nil and type(v) ~= "number" then fail(what, "%s must be a number, got %s", k, type(v)) end
    params[k] = v
  end
  return params, (params.temperature or 0) > 0
end

local function penalized(params)
  return (params.repetition_penalty or 1) ~= 1 or (params.presence_penalty or 0) ~= 0
end

local function checked_history(opts, vocab, what)
  local history = opts.history or {}
  if type(history) ~= "table" then fail(what, "history must be a list of ids, got %s", type(history)) end
  for i, id in ipairs(history) do
    if math.type(id) ~= "integer" or id < 0 or id >= vocab then
      fail(what, "history[%d] = %s is outside the vocabulary [0, %d)", i, tostring(id), vocab)
    end
  end
  return history
end

local function checked_integer(opts, key, default, what, min)
  local v = opts[key]
  if v == nil then return default end
  if math.type(v) ~= "integer" or (min and v < min) then
    fail(what, "%s must be an integer%s, got %s", key, min and (" >= " .. min) or "", tostring(v))
  end
  return v
end

--- k drafts from the MTP predictor after next_id (SPEC §8.2): the first from the decoder's residual
--- at the session's last position and next_id, each further one from the previous draft's own
--- residual and the token drafted from it. opts: the sampler options (temperature, top_k, top_p,
--- min_p, penalties), history (every id so far, next_id included), seed, step (the index of the
--- token the first draft proposes). Returns the drafts (a Lua list) and, when temperature > 0,
--- their processed distributions q f32 [k, vocab] on the model's device (nil when greedy: the
--- proposal is then deterministic, which verify treats as q one-hot).
function spec.propose(model, session, next_id, k, opts)
  opts = opts or {}
  local what = "propose"
  if not model.mtp then fail(what, "the model was loaded without its MTP layers (mtp = false)") end
  if math.type(k) ~= "integer" or k < 1 or k > spec.MAX_K then
    fail(what, "k must be an integer in [1, %d], got %s", spec.MAX_K, tostring(k))
  end
  local params, sampling = sampler_params(opts, what)
  local vocab = model.dims.vocab
  local history = { table.unpack(checked_history(opts, vocab, what)) }
  local seed, step = checked_integer(opts, "seed", 1, what), checked_integer(opts, "step", 0, what, 0)
  local drafts, q = {}, nil
  for j = 1, k do
    local logits = j == 1 and model:draft(session, next_id) or model:draft_next(session, drafts[j - 1])
    local row = {}
    for key, v in pairs(params) do row[key] = v end
    row.history = penalized(params) and history or nil
    row.seed, row.step = seed ~ spec.DRAFT_SALT, step + j - 1
    drafts[j] = core.sample_ids(logits, row)[1]
    if sampling then
      q = q or dsrt.empty({ k, vocab }, { dtype = "f32", device = logits.device })
      local probs, q_row = core.sample_probs(logits, row), q:narrow(1, j, 1)
      q_row:copy(probs)
      probs:close()
      q_row:close()
    end
    logits:close() -- device memory back to the cache now, not at the next garbage collection
    history[#history + 1] = drafts[j]
  end
  return drafts, q
end

-- q as one f32 [k, vocab] tensor: given as one, or as a list of k rows ([vocab] or [1, vocab])
local function stacked_q(q, k, vocab, device, what)
  if q == nil then return nil end
  if dsrt.is_tensor(q) then return q end
  if type(q) ~= "table" or #q ~= k then
    fail(what, "draft_probs must be an f32 [%d, %d] tensor or a list of %d rows", k, vocab, k)
  end
  local out = dsrt.empty({ k, vocab }, { dtype = "f32", device = device })
  for i, row in ipairs(q) do
    if not dsrt.is_tensor(row) or row:numel() ~= vocab or row.dtype ~= "f32" then
      fail(what, "draft_probs[%d] must be an f32 tensor of %d probabilities", i, vocab)
    end
    out:narrow(1, i, 1):copy(row:reshape({ 1, vocab }))
  end
  return out
end

--- model:verify(session, ids, opts) (dsrt.dsv4.model): ids = {the last accepted token (not yet
--- forwarded), d_1, ..., d_k}, 0 <= k <= min(32, session slack - 1). ONE forward of the k + 1 ids, then
--- acceptance (the header above) and session:truncate to the accepted length, so the session holds
--- ids[1] and the accepted drafts. opts: the sampler options, history (the ids the penalties see
--- for row 0: every id so far, ids[1] included), draft_probs (q: f32 [k, vocab] or a list of k
--- rows, on the model's device; only read when temperature > 0), seed (default 1), step (default 0).
--- Returns accepted (0..k), next_id (the token after them, not forwarded: the next round's ids[1])
--- and {tokens = {d_1, ..., d_accepted, next_id}, logits = the forward's f32 [k + 1, vocab]}.
function spec.verify(model, session, ids, opts)
  opts = opts or {}
  local what = "verify"
  if type(ids) ~= "table" or #ids < 1 then
    fail(what, "ids must be a list {last accepted token, drafts...} of at least one id")
  end
  local k = #ids - 1
  if k > spec.MAX_K then fail(what, "%d drafts; one verification takes at most %d", k, spec.MAX_K) end
  if type(session) ~= "table" or math.type(session.slack) ~= "integer" then
    fail(what, "session must come from this model's :session{...}")
  end
  if k + 1 > session.slack then -- the forward of k + 1 positions must be undoable whole
    fail(what, "%d drafts need a session slack of at least %d (the session has %d)", k, k + 1, session.slack)
  end
  local params, sampling = sampler_params(opts, what)
  local vocab = model.dims.vocab
  local history = checked_history(opts, vocab, what)
  local seed, step = checked_integer(opts, "seed", 1, what), checked_integer(opts, "step", 0, what, 0)
  -- a bad sampler option fails before the session moves
  local probe = dsrt.tensor({ 0.0 }, { dtype = "f32" })
  local ok, sampled = pcall(core.sample, probe, params)
  probe:close()
  if not ok then fail(what, "%s", tostring(sampled)) end
  sampled:close()
  local q = sampling and stacked_q(opts.draft_probs, k, vocab, model.device, what) or nil

  local first = session:length()
  local logits = model:forward(session, ids) -- checks the ids and the room; [k + 1, vocab]
  -- row i (0-based) decides the token after d_i: its penalties see history + d_1..d_i
  if penalized(params) then
    local rows, h = {}, { table.unpack(history) }
    for i = 0, k do
      if i > 0 then h[#h + 1] = ids[i + 1] end
      rows[i + 1] = { table.unpack(h) }
    end
    params.history = rows
  end
  local accepted, next_id
  local drafts = { table.unpack(ids, 2) }
  local pcall_ok, perr = pcall(function()
    if not sampling then
      local targets = core.sample_ids(logits, params)
      accepted = 0
      while accepted < k and drafts[accepted + 1] == targets[accepted + 1] do accepted = accepted + 1 end
      next_id = targets[accepted + 1]
    else
      local p = core.sample_probs(logits, params)
      accepted, next_id = core.sample_verify(p, drafts, { q = q, seed = seed ~ spec.VERIFY_SALT, step = step })
    end
  end)
  if not pcall_ok then
    session:truncate(first) -- the session as it was: a failed verify moves nothing
    error(perr, 2)
  end
  session:truncate(first + accepted + 1)
  local tokens = { table.unpack(drafts, 1, accepted) }
  tokens[#tokens + 1] = next_id
  return accepted, next_id, { tokens = tokens, logits = logits }
end

return spec
