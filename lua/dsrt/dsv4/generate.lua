-- dsrt.dsv4.generate — the generation loop: model:generate{...} and model:stream{...}.
--
--   local r = model:generate{prompt = "Hello", max_tokens = 32, temperature = 0.7, top_p = 0.9, seed = 1,
--                            stop = {"\n\n"}, on_token = function(text, id) io.write(text) end}
--   print(r.text, #r.ids, r.finish_reason, r.timings.decode_tokens_per_s)
--   for text, id in model:stream{prompt = "Hello"} do io.write(text) end
--   local rs = model:generate{prompts = {"a", "b"}}   -- a list of results, one per prompt
--
-- Options: prompt (text) | ids (a list of token ids) | prompts (a list of texts or id lists);
-- max_tokens (default 32); temperature (default 0: greedy), top_k, top_p, min_p,
-- repetition_penalty, presence_penalty (dsrt.core.sample); seed (default 1); stop (a list of
-- strings); tokenizer (default: <model folder>/tokenizer.json, needed for text in or out);
-- on_token(text, id); max_len (the session's length, default: prompt + max_tokens); bos (default
-- true: a text prompt not already starting with it is preceded by tok.bos_id; id prompts are
-- taken as they are).
--
-- Decisions:
--   - finish_reason: "eos" (tok.eos_id sampled: it is not in ids or text), "stop" (a stop string
--     appeared: text ends before it; ids keep the token that completed it), "length" (max_tokens,
--     or the session is full).
--   - Text that might begin a stop string is held back until it is known not to: on_token (and
--     the stream) may get "" for a token and the held text with a later one; the concatenated
--     pieces always equal r.text. Text still held when generation ends (an incomplete UTF-8 tail)
--     comes as a last call with id nil.
--   - Ids the model has past the tokenizer's vocabulary (padding rows of the embedding) decode to
--     "" (they stay in ids).
--   - Sampling: token t of a sequence is drawn with core.sample_ids(row, {seed = seed, step = t - 1})
--     over that sequence's own logits row, penalties over its prompt and generated ids; so a
--     prompt gives the same tokens alone or among several. The row is sampled where the model
--     put it: on CUDA only the id comes back to the host, and it is the id the CPU would draw.
--   - Several prompts: each has its own session; each step forwards every unfinished sequence in
--     one model:forward_batch (row-wise work once over all rows, attention per sequence), which
--     gives each sequence exactly what it would get alone.
--   - timings: prompt_seconds is the prefill forward; decode_seconds the rest (later forwards and
--     all sampling but the first token's); decode_tokens the tokens sampled (an EOS included), and
--     decode_tokens_per_s = (decode_tokens - 1) / decode_seconds (the first came with the prompt).
--   - speculative = {k = 2} (or true: k = 2): MTP speculative decoding (dsrt.dsv4.speculative).
--     After the prefill's token, each round drafts k' = min(k, tokens still wanted - 1, session room
--     - 1) tokens with the MTP layer, verifies them in one forward and takes the accepted drafts and
--     the next token (a round with k' = 0 is a plain step). Greedy output equals plain greedy
--     output token for token; with temperature > 0 the tokens follow the same distribution as plain
--     sampling (rejection sampling), not the same draws. Each token goes through the same EOS,
--     stop-string and length checks as a plain one; tokens after the one that ends generation are
--     dropped. Sessions get slack max(16, k + 1). Several prompts run one after another (each
--     alone). The result gets r.speculative = {k, rounds, drafted, accepted, acceptance = {rate of
--     draft position j accepted when proposed, j = 1..k}, mean_accepted_length = tokens per round
--     (accepted drafts + 1, as vLLM reports it)}.
local core = require "dsrt.core"
local tokenizer = require "dsrt.tokenizer"
local speculative = require "dsrt.dsv4.speculative"

local generate = {}

local SAMPLING = { "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty" }

local function fail(what, fmt, ...) error(string.format("model:" .. what .. ": " .. fmt, ...), 4) end

local function file_exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

local function get_tokenizer(model, opts, what, needed)
  if opts.tokenizer ~= nil then return opts.tokenizer end
  if model._tokenizer then return model._tokenizer end
  local path = model.dir and (model.dir .. "/tokenizer.json")
  if path and file_exists(path) then
    model._tokenizer = tokenizer.load(path)
    return model._tokenizer
  end
  if needed then
    fail(what, "a text prompt or text output needs a tokenizer (opts.tokenizer, or tokenizer.json in the model folder)")
  end
  return nil
end

-- the checked options and the list of prompts (as id lists)
local function prepare(model, opts, what)
  if type(opts) ~= "table" then fail(what, "expected an options table, got %s", type(opts)) end
  local given = (opts.prompt ~= nil and 1 or 0) + (opts.ids ~= nil and 1 or 0) + (opts.prompts ~= nil and 1 or 0)
  if given ~= 1 then fail(what, "give exactly one of prompt (text), ids (a list of token ids), prompts (a list)") end
  local raw
  if opts.prompts ~= nil then
    if type(opts.prompts) ~= "table" or #opts.prompts == 0 then fail(what, "prompts must be a non-empty list") end
    raw = opts.prompts
  else
    raw = { opts.prompt ~= nil and opts.prompt or opts.ids }
  end
  local max_tokens = opts.max_tokens or 32
  if math.type(max_tokens) ~= "integer" or max_tokens < 1 then
    fail(what, "max_tokens must be a positive integer, got %s", tostring(max_tokens))
  end
  local seed = opts.seed or 1
  if math.type(seed) ~= "integer" then fail(what, "seed must be an integer, got %s", tostring(seed)) end
  local stop = opts.stop or {}
  if type(stop) == "string" then stop = { stop } end
  if type(stop) ~= "table" then fail(what, "stop must be a list of strings") end
  for i, s in ipairs(stop) do
    if type(s) ~= "string" or s == "" then fail(what, "stop[%d] must be a non-empty string", i) end
  end
  if opts.on_token ~= nil and type(opts.on_token) ~= "function" then fail(what, "on_token must be a function") end
  local params = {}
  for _, k in ipairs(SAMPLING) do
    local v = opts[k]
    if v ~= nil and type(v) ~= "number" then fail(what, "%s must be a number, got %s", k, type(v)) end
    params[k] = v
  end
  -- check the sampling parameters now, on a dummy row, so a bad one fails before any work
  local ok, err = pcall(core.sample, core.tensor({ 0.0 }, { dtype = "f32" }), params)
  if not ok then fail(what, "%s", tostring(err)) end

  local spec = opts.speculative
  if spec == true then spec = {} end
  if spec == false then spec = nil end
  if spec ~= nil then
    if type(spec) ~= "table" then fail(what, "speculative must be a table {k = n} or true, got %s", type(spec)) end
    local k = spec.k == nil and 2 or spec.k
    if math.type(k) ~= "integer" or k < 1 or k > speculative.MAX_K then
      fail(what, "speculative.k must be an integer in [1, %d], got %s", speculative.MAX_K, tostring(spec.k))
    end
    if not model.mtp then fail(what, "speculative decoding needs the MTP layer (the model was loaded with mtp = false)") end
    spec = { k = k }
  end

  local any_text = false
  for _, p in ipairs(raw) do if type(p) == "string" then any_text = true end end
  local tok = get_tokenizer(model, opts, what, any_text)
  local vocab = model.dims.vocab
  local prompts = {}
  for i, p in ipairs(raw) do
    local ids
    local label = #raw > 1 and string.format("prompts[%d]", i) or (type(p) == "string" and "prompt" or "ids")
    if type(p) == "string" then
      if p == "" then fail(what, "%s is empty", label) end
      ids = tok:encode(p)
      -- never a second BOS: a chat-encoded prompt starts with one already (FORMATS.md §3)
      if opts.bos ~= false and tok.bos_id and ids[1] ~= tok.bos_id then table.insert(ids, 1, tok.bos_id) end
    elseif type(p) == "table" then
      ids = {}
      for j, id in ipairs(p) do ids[j] = id end
    else
      fail(what, "%s must be a string or a list of token ids, got %s", label, type(p))
    end
    if #ids == 0 then fail(what, "%s is empty", label) end
    for j, id in ipairs(ids) do
      if math.type(id) ~= "integer" or id < 0 or id >= vocab then
        fail(what, "%s: id %s at %d is outside the vocabulary [0, %d)", label, tostring(id), j, vocab)
      end
    end
    local max_len = opts.max_len or (#ids + max_tokens)
    if math.type(max_len) ~= "integer" or max_len < 1 then fail(what, "max_len must be a positive integer") end
    if #ids >= max_len then
      fail(what, "%s has %d tokens, more than the session's max_len %d leaves room for (at least one new token)",
           label, #ids, max_len)
    end
    prompts[i] = { ids = ids, max_len = max_len }
  end
  if opts.pipeline ~= nil and type(opts.pipeline) ~= "boolean" then
    fail(what, "pipeline must be a boolean, got %s", type(opts.pipeline))
  end
  return {
    prompts = prompts, max_tokens = max_tokens, seed = seed, stop = stop, params = params, tok = tok,
    on_token = opts.on_token, batched = opts.prompts ~= nil, spec = spec, pipeline = opts.pipeline,
  }
end

-- the length of the longest suffix of s that is a proper prefix of some stop string
local function held_suffix(s, stop)
  local best = 0
  for _, st in ipairs(stop) do
    for k = math.min(#st - 1, #s), best + 1, -1 do
      if s:sub(#s - k + 1) == st:sub(1, k) then best = k break end
    end
  end
  return best
end

local function new_sequence(model, p, o)
  local eos = o.tok and o.tok.eos_id
  return {
    prompt = p.ids, history = { table.unpack(p.ids) }, ids = {}, pending = p.ids,
    -- the MTP layer's state only when this sequence drafts: plain decoding skips its fill
    session = model:session { max_len = p.max_len, slack = o.spec and math.max(16, o.spec.k + 1) or nil,
                              mtp = o.spec ~= nil },
    max_len = p.max_len,
    decoder = o.tok and o.tok:decoder(), tok_n = o.tok and o.tok:vocab_size() or 0, full = "", emitted = 0, eos = eos, done = false,
    prompt_seconds = 0, decode_seconds = 0, sampled = 0,
  }
end

-- Takes token id (the seq.sampled-th) and emits its text: emit(seq, text, id) is called for every
-- token kept and for the last text (id nil). `length`: the session length plain decoding would
-- have when this token was sampled (default: the session's; a speculative round takes several
-- tokens after one forward).
local function take(seq, id, o, emit, length)
  length = length or seq.session:length()
  if id == seq.eos then seq.finish = "eos"
  else
    seq.ids[#seq.ids + 1] = id
    seq.history[#seq.history + 1] = id
    seq.pending = { id }
    -- ids past the tokenizer's vocabulary (the model's padding rows) have no text
    local piece = seq.decoder and id < seq.tok_n and seq.decoder:push(id) or ""
    seq.full = seq.full .. piece
    local cut
    for _, st in ipairs(o.stop) do
      local at = seq.full:find(st, math.max(1, seq.emitted - #st + 2), true)
      if at and (not cut or at < cut) then cut = at end
    end
    if cut then
      seq.full = seq.full:sub(1, cut - 1)
      seq.finish = "stop"
      emit(seq, seq.full:sub(seq.emitted + 1), id)
      seq.emitted = #seq.full
    else
      local upto = #seq.full - held_suffix(seq.full, o.stop)
      emit(seq, seq.full:sub(seq.emitted + 1, upto), id)
      seq.emitted = math.max(seq.emitted, upto)
      if #seq.ids >= o.max_tokens or length + 1 > seq.max_len then seq.finish = "length" end
    end
  end
  if seq.finish then
    seq.done = true
    if seq.finish ~= "stop" and seq.decoder then
      seq.full = seq.full .. seq.decoder:flush()
      if #seq.full > seq.emitted then emit(seq, seq.full:sub(seq.emitted + 1), nil) end
      seq.emitted = #seq.full
    end
  end
end

-- Samples seq's next token from its logits (the forward took `seconds`) and takes it.
local function step(seq, logits, seconds, o, emit)
  local t0 = core.wall_time()
  local row = logits:select(1, -1)
  local params = { seed = o.seed, step = seq.sampled, history = seq.history }
  for k, v in pairs(o.params) do params[k] = v end
  local id = core.sample_ids(row, params)[1]
  row:close() -- device memory back to the cache now, not at the next garbage collection
  logits:close()
  seq.sampled = seq.sampled + 1
  local took = seconds + core.wall_time() - t0
  if seq.sampled == 1 then seq.prompt_seconds = took else seq.decode_seconds = seq.decode_seconds + took end
  take(seq, id, o, emit)
end

-- One speculative round for seq (its pending token sampled, not yet forwarded): draft, verify,
-- take the accepted drafts and the next token.
local function spec_round(model, seq, o, emit)
  local t0 = core.wall_time()
  local session, stats = seq.session, seq.spec
  local length = session:length()
  local k = math.min(o.spec.k, o.max_tokens - #seq.ids - 1, seq.max_len - length - 1)
  if k < 1 then
    local logits = model:forward(session, seq.pending)
    step(seq, logits, core.wall_time() - t0, o, emit)
    return
  end
  local opts = { history = seq.history, seed = o.seed, step = seq.sampled }
  for key, v in pairs(o.params) do opts[key] = v end
  local n = seq.pending[1]
  local drafts, q = speculative.propose(model, session, n, k, opts)
  opts.draft_probs = q
  local ids = { n, table.unpack(drafts) }
  local accepted, _, info = speculative.verify(model, session, ids, opts)
  info.logits:close() -- device memory back to the cache now, not at the next garbage collection
  if q then q:close() end
  seq.decode_seconds = seq.decode_seconds + core.wall_time() - t0
  stats.rounds, stats.drafted, stats.accepted = stats.rounds + 1, stats.drafted + k, stats.accepted + accepted
  stats.tokens = stats.tokens + accepted + 1
  for j = 1, k do
    stats.proposed_at[j] = stats.proposed_at[j] + 1
    if j <= accepted then stats.accepted_at[j] = stats.accepted_at[j] + 1 end
  end
  for j, id in ipairs(info.tokens) do
    if seq.done then break end
    seq.sampled = seq.sampled + 1
    take(seq, id, o, emit, length + j)
  end
end

local function result(seq)
  local pt, ps, dt, ds = #seq.prompt, seq.prompt_seconds, seq.sampled, seq.decode_seconds
  return {
    text = seq.full, ids = seq.ids, finish_reason = seq.finish,
    timings = {
      prompt_tokens = pt, prompt_seconds = ps, prompt_tokens_per_s = ps > 0 and pt / ps or 0,
      decode_tokens = dt, decode_seconds = ds, decode_tokens_per_s = ds > 0 and (dt - 1) / ds or 0,
    },
    speculative = seq.spec and (function(st)
      local rates = {}
      for j = 1, #st.proposed_at do rates[j] = st.proposed_at[j] > 0 and st.accepted_at[j] / st.proposed_at[j] or 0 end
      return { k = #st.proposed_at, rounds = st.rounds, drafted = st.drafted, accepted = st.accepted,
               acceptance = rates, mean_accepted_length = st.rounds > 0 and st.tokens / st.rounds or 0 }
    end)(seq.spec) or nil,
  }
end

-- speculative decoding: each sequence alone, prefill and first token as plain, then rounds
local function run_speculative(model, o, emit)
  local results = {}
  for i, p in ipairs(o.prompts) do
    local seq = new_sequence(model, p, o)
    seq.index = i
    seq.spec = { rounds = 0, drafted = 0, accepted = 0, tokens = 0, proposed_at = {}, accepted_at = {} }
    for j = 1, o.spec.k do seq.spec.proposed_at[j], seq.spec.accepted_at[j] = 0, 0 end
    local t0 = core.wall_time()
    local logits = model:forward(seq.session, seq.pending, { logits = "last" })
    step(seq, logits, core.wall_time() - t0, o, emit)
    while not seq.done do spec_round(model, seq, o, emit) end
    results[i] = result(seq)
  end
  return o.batched and results or results[1]
end

-- One sequence with the next step always issued before this one's token is read: the draw stays
-- on the device (core.sample_async) and the next forward takes it there, so the host queues step
-- t + 1 while the GPU still runs step t and never waits for the GPU before issuing. A step is issued
-- only when a length limit cannot end generation at the token in flight; when that token ends it
-- (EOS, a stop string) the step issued for it is undone (session:truncate), so the session, the
-- tokens, the text and the draws (token t drawn with step t - 1) are the plain loop's.
local function run_pipelined(model, o, emit)
  local seq = new_sequence(model, o.prompts[1], o)
  seq.index = 1
  local session = seq.session
  local function draw(logits, t) -- token t's draw, not waited for
    local row = logits:select(1, -1)
    local params = { seed = o.seed, step = t - 1 }
    for k, v in pairs(o.params) do params[k] = v end
    local ids, pending = core.sample_async(row, params)
    row:close()
    logits:close()
    return ids, pending
  end
  local t0 = core.wall_time()
  local ids, pending = draw(model:forward(session, seq.pending, { logits = "last" }), 1)
  local t = 1 -- the token in flight
  while true do
    local next_ids, next_pending
    if t < o.max_tokens and session:length() + 1 <= seq.max_len then
      next_ids, next_pending = draw(model:forward(session, ids, { logits = "last" }), t + 1)
    end
    local id = pending:wait()[1]
    ids:close()
    local now = core.wall_time()
    if t == 1 then seq.prompt_seconds = now - t0 else seq.decode_seconds = seq.decode_seconds + now - t0 end
    t0 = now
    seq.sampled = t
    take(seq, id, o, emit, session:length() - (next_ids and 1 or 0))
    if seq.done then
      if next_ids then
        session:truncate(session:length() - 1)
        next_ids:close()
        next_pending:close()
      end
      break
    end
    ids, pending, t = next_ids, next_pending, t + 1
  end
  return result(seq)
end

-- the pipelined loop serves one sequence without speculation or penalties (a penalty needs the
-- token in flight); opts.pipeline: true or false, else where it pays, on a GPU
local function pipelined(model, o)
  if o.spec or o.batched or (o.params.repetition_penalty or 1) ~= 1 or (o.params.presence_penalty or 0) ~= 0 then
    return false
  end
  if o.pipeline ~= nil then return o.pipeline end
  return model.device ~= "cpu"
end

-- runs all sequences to their end; emit as in step
local function run(model, o, emit)
  if o.spec then return run_speculative(model, o, emit) end
  if pipelined(model, o) then return run_pipelined(model, o, emit) end
  local seqs = {}
  for i, p in ipairs(o.prompts) do
    seqs[i] = new_sequence(model, p, o)
    seqs[i].index = i
  end
  while true do
    local running, sessions, pending = {}, {}, {}
    for _, seq in ipairs(seqs) do
      if not seq.done then
        running[#running + 1], sessions[#sessions + 1], pending[#pending + 1] = seq, seq.session, seq.pending
      end
    end
    if #running == 0 then break end
    local t0 = core.wall_time()
    local logits = model:forward_batch(sessions, pending) -- every unfinished sequence in one pass
    local seconds = core.wall_time() - t0
    for k, seq in ipairs(running) do step(seq, logits[k], seconds, o, emit) end
  end
  local results = {}
  for i, seq in ipairs(seqs) do results[i] = result(seq) end
  return o.batched and results or results[1]
end

--- model:generate{...} -> {text, ids, finish_reason, timings} (a list of them for prompts = {...})
function generate.generate(model, opts)
  local o = prepare(model, opts, "generate")
  local emit = function() end
  if o.on_token then
    emit = function(seq, text, id)
      if o.batched then o.on_token(text, id, seq.index) else o.on_token(text, id) end
    end
  end
  return run(model, o, emit)
end

--- for text, id in model:stream{...} do ... end: one token at a time (prompts = {...}: text, id,
--- index of the prompt). The iterator's generation runs inside a coroutine; errors propagate.
function generate.stream(model, opts)
  local o = prepare(model, opts, "stream")
  local user = o.on_token
  local co = coroutine.create(function()
    run(model, o, function(seq, text, id)
      if user then user(text, id) end
      coroutine.yield(text, id, seq.index)
    end)
  end)
  return function()
    if coroutine.status(co) == "dead" then return nil end
    local res = table.pack(coroutine.resume(co))
    if not res[1] then error(res[2], 2) end
    if coroutine.status(co) == "dead" then return nil end
    return res[2], res[3], res[4]
  end
end

--- Attaches :generate and :stream to a model's class, and remembers its folder (for tokenizer.json).
function generate.attach(model, dir)
  local class = getmetatable(model)
  class.generate, class.stream = generate.generate, generate.stream
  model.dir = dir
  return model
end

return generate
