-- dsrt.dsv4.model — the DeepSeek-V4 decoder composed from the layer objects, and its sessions.
--
--   local model = require("dsrt.dsv4.model").new(cfg, w, {device = "cpu", precision = "fp32"})
--   local seq = model:session{max_len = 4096, slack = 16}
--   local logits = model:forward(seq, {0, 17, 42})   -- f32 [3, vocab], one row per new position
--   seq:truncate(2)                                  -- back to 2 positions (by at most `slack`)
--   local n, next_id = model:verify(seq, {last, d1, d2}, opts) -- speculative (dsrt.dsv4.speculative)
--   (dsrt.dsv4.load builds this, and attaches the MTP predictor of dsrt.dsv4.mtp as model.mtp.)
--
-- What it protects:
--   - The wiring DESIGN.md exists for: the decoder makes ONE list of three aux streams
--     (model.aux_streams) and hands that same table to every attention and MoE constructor. No
--     layer makes streams; the composer owns them, so changing the wiring is an edit here.
--   - The model-level forward of SPEC §4 and the block of SPEC §5, written once, in the order the
--     SPEC gives, with the model's precision string handed to every op (never a default), so a
--     model cannot run partly in a mode it did not ask for.
--   - A session holds everything a sequence accumulates (one attention state per layer, the MTP
--     layer's state, the pre-hc_head residuals MTP drafts from) addressed by absolute position, so
--     that forward() continues at any position — a prompt in one call, in chunks or token by token
--     gives the same logits — and truncate() rolls back exactly (SPEC §6.9).
--   - Bad input is refused before any state moves: an empty chunk, an id outside the vocabulary
--     (naming the id and its position), a chunk that would pass max_len.
-- Logits are computed for every new position (the reference computes only the last, SPEC §4 step
-- 6), so chunked prefill can be compared with one-shot prefill position by position.
local dsrt = require "dsrt"
local core = require "dsrt.core"

local nn = core.nn

local decoder = {}

-- SPEC §10: the three auxiliary GEMM groups of an attention layer run on aux streams 0/1/2
local AUX_STREAM_COUNT = 3
local DEFAULT_SLACK = 16
local PRECISIONS = { reference = true, fp32 = true }

-- The model's activation dtype: bf16 in the reference numerics, f32 in fp32 (SPEC §9.1, nn.h).
local function activation_dtype(precision) return precision == "fp32" and "f32" or "bf16" end

--- ONE list of three aux streams on `device`, for every layer of one composed model (DESIGN.md).
function decoder.aux_streams(device)
  local streams = {}
  for i = 1, AUX_STREAM_COUNT do streams[i] = dsrt.stream(device) end
  return streams
end

-- ---- the block of SPEC §5 ----

--- A block (SPEC §5) from a layer of cfg.layers / cfg.mtp and its weights (w.layers[i] / w.mtp[k]):
--- the attention and MoE objects built with the given aux stream list, which the block records as
--- block.aux_streams (the layer objects keep the same table).
function decoder.block(cfg, layer, layer_weights, aux_streams)
  return {
    layer = layer,
    hc_attn = layer_weights.hc_attn, attn_norm = layer_weights.attn_norm,
    attention = core.attention(layer, cfg.dims, layer_weights.attn, aux_streams),
    hc_ffn = layer_weights.hc_ffn, ffn_norm = layer_weights.ffn_norm,
    moe = dsrt.moe(cfg.dims, layer_weights.ffn, aux_streams),
    aux_streams = aux_streams,
  }
end

--- Closes the tensors given (nil ones skipped): their device memory goes back to the allocator's
--- cache now rather than when the garbage collector gets to them. Lua's collector sees only the
--- small userdata, so a decode step's ~35 intermediate tensors piled up between its cycles and the
--- allocator called cudaMalloc for their successors: ~18% of a step's host time on the H200.
function decoder.close(...)
  for i = 1, select("#", ...) do
    local t = select(i, ...)
    if t then t:close() end
  end
end
local close = decoder.close

--- Token ids (a Lua list) as an i64 tensor on `device`. The upload is asynchronous (staged through
--- pinned memory, kernels.h dsrtk_memcpy), so a forward does not wait for the stream to drain first.
function decoder.ids(list, device)
  local host = dsrt.tensor(list, { dtype = "i64" })
  if device == "cpu" then return host end
  local ids = host:to { device = device, async = true }
  host:close()
  return ids
end

-- The sub-layer input RMS_w(u; norm) (SPEC §5) of the residual streams X. With `carry` = {f, post,
-- comb}, the previous sub-layer's output f whose hc_post has not been applied yet, X is first
-- brought up to date: nn.hc_post_pre fuses that hc_post with this hc_pre (on CUDA one launch and
-- one read of X fewer; the same bits as the two calls); the carry and the old X are closed. The hc
-- ops apply the norm themselves (their norm weight argument: nn.rms_norm's bits, on CUDA in the
-- collapse's kernel at decode). Returns the normed input, post, comb and the up-to-date X.
local function sublayer_input(dims, hc, norm_weight, X, carry, precision)
  local x, post, comb
  if carry then
    local new_X
    new_X, x, post, comb = nn.hc_post_pre(carry[1], X, carry[2], carry[3], hc.fn, hc.scale, hc.base, dims.hc_eps,
                                          dims.norm_eps, dims.hc_sinkhorn_iters, precision, norm_weight)
    close(carry[1], carry[2], carry[3], X)
    X = new_X
  else
    x, post, comb = nn.hc_pre(X, hc.fn, hc.scale, hc.base, dims.hc_eps, dims.norm_eps, dims.hc_sinkhorn_iters,
                              precision, norm_weight)
  end
  return x, post, comb, X
end

-- the attention sub-layer's output f, post, comb and the up-to-date X (spans as in block_forward)
local function attention_sublayer(dims, block, state, X, carry, precision, spans)
  local x, post, comb
  x, post, comb, X = sublayer_input(dims, block.hc_attn, block.attn_norm, X, carry, precision)
  local a
  if spans then
    a = dsrt.empty(x.shape, { dtype = x.dtype, device = x.device })
    for k, span in ipairs(spans) do
      local rows, out = x:narrow(1, span[1], span[2]), a:narrow(1, span[1], span[2])
      local part = block.attention:forward(state[k], rows, precision)
      out:copy(part)
      close(rows, out, part)
    end
  else
    a = block.attention:forward(state, x, precision)
  end
  close(x)
  return a, post, comb, X
end

--- SPEC §5 step 1 on residual streams X [S, hc, dim] at positions [state:length(), +S), for the
--- attention state's advance alone (what fills an MTP layer's ring): attention:advance writes the
--- state as a forward would and computes no output, which nothing would read (the query path,
--- the attention and the output projections: about a tenth of a decode step on the GPU). X stays
--- the caller's. skip (default 0): positions before X's rows that the state drops unread
--- (state:skippable), stepped over without their inputs.
function decoder.attention_advance(dims, block, state, X, precision, skip)
  local x, post, comb = sublayer_input(dims, block.hc_attn, block.attn_norm, X, nil, precision)
  block.attention:advance(state, x, precision, skip)
  close(x, post, comb)
end

--- The whole block (SPEC §5) with its last hc_post left to the next block: X [S, hc, dim] and the
--- previous block's carry (nil for the first) -> X, carry. decoder.settle(X, carry) applies the
--- last one; until then X lags one sub-layer behind, so only the next block or settle may read it.
--- X and carry are consumed (closed once used). token_ids i64 [S] (hash routing reads them, SPEC
--- §7.1). Several sequences at once: `state` is a list of states and spans[k] = {first row, rows}
--- says which rows of X are sequence k's; every row-wise op runs once over all of them, attention
--- per sequence on its own state.
function decoder.block_forward(dims, block, state, X, carry, token_ids, precision, spans)
  local a, post, comb
  a, post, comb, X = attention_sublayer(dims, block, state, X, carry, precision, spans)
  local x
  x, post, comb, X = sublayer_input(dims, block.hc_ffn, block.ffn_norm, X, { a, post, comb }, precision)
  local f = block.moe:forward(x, token_ids, precision)
  close(x)
  return X, { f, post, comb }
end

--- X brought up to date with a block's carry (decoder.block_forward); consumes both
function decoder.settle(X, carry, precision)
  local settled = nn.hc_post(carry[1], X, carry[2], carry[3], precision)
  close(carry[1], carry[2], carry[3], X)
  return settled
end

--- HC head collapse, final norm and LM head (SPEC §4 steps 4–6) of X [S, hc, dim] with one
--- hc_head {fn, base, scale} and norm weight: f32 logits [S, vocab] for every row.
function decoder.logits(dims, hc_head, norm_weight, head, X, precision)
  local y = nn.hc_head(X, hc_head.fn, hc_head.scale, hc_head.base, dims.hc_eps, dims.norm_eps, precision, norm_weight)
  local logits = head:forward(y, precision)
  close(y)
  return logits
end

--- decoder.settle, then decoder.logits of the settled X, with the last hc_post and the HC head in
--- one call (nn.hc_post_head: one launch for a decode step's row on CUDA): X, logits; consumes X
--- and carry.
function decoder.settle_logits(dims, hc_head, norm_weight, head, X, carry, precision)
  local settled, y = nn.hc_post_head(carry[1], X, carry[2], carry[3], hc_head.fn, hc_head.scale, hc_head.base,
                                     dims.hc_eps, dims.norm_eps, precision, norm_weight)
  close(carry[1], carry[2], carry[3], X)
  local logits = head:forward(y, precision)
  close(y)
  return settled, logits
end

--- embed[ids] (SPEC §4 step 1, no scaling) as [S, dim] in the model's activation dtype, in one
--- gather (dsrt.embedding) on the weight's device; with `copies` (the decoder's hc_mult) as the
--- residual streams [S, copies, dim] of SPEC §4 step 2, each row repeated in the same launch. ids:
--- a Lua array of 0-based ids (checked on the host and sent up) or a 1-D i64/i32 tensor on the
--- weight's device (already checked: a device gather cannot raise, an id outside the vocabulary
--- gives a row of NaN).
function decoder.embed(embed_weight, ids, precision, copies)
  return dsrt.embedding(embed_weight, ids, activation_dtype(precision), copies)
end

-- ---- the model ----

local Model = {}
Model.__index = Model

--- The decoder of cfg (dsrt.dsv4.config) over the weight set w (dsrt.dsv4.weights).
--- opts: device (default "cpu"), precision ("reference" or "fp32", required).
function decoder.new(cfg, w, opts)
  if not PRECISIONS[opts.precision] then
    error(string.format("dsv4.model: precision must be \"reference\" or \"fp32\", got %s", tostring(opts.precision)), 2)
  end
  local self = setmetatable({
    cfg = cfg, dims = cfg.dims, weights = w, precision = opts.precision, device = opts.device or "cpu",
  }, Model)
  self.aux_streams = decoder.aux_streams(self.device)
  self.blocks = {}
  for i, layer in ipairs(cfg.layers) do
    self.blocks[i] = decoder.block(cfg, layer, w.layers[i], self.aux_streams)
  end
  -- fp32 logits from the bf16 head (SPEC §4 step 6, §9.1), shared with the MTP predictor (SPEC §2.5)
  self.head = dsrt.linear { weight = w.head, format = "bf16", fp32_math = true }
  return self
end

local function check_room(n, first, max_len)
  if first + n > max_len then
    error(string.format("dsv4.model.forward: %d new ids at position %d would pass the session's max_len %d",
                        n, first, max_len), 4)
  end
end

-- ids (a Lua array or a 1-D integer tensor) as a Lua array, checked against the vocabulary and
-- the session's room; `first` is the position of ids[1]. `keep_on_device`: a tensor on a GPU is
-- returned as it is, second, unread (nil first), so that the forward waits for nothing.
local function checked_ids(ids, vocab, first, max_len, keep_on_device)
  if dsrt.is_tensor(ids) then
    if ids:dim() ~= 1 or (ids.dtype ~= "i64" and ids.dtype ~= "i32") then
      error(string.format("dsv4.model.forward: ids must be a 1-D i64/i32 tensor, got %s [%s]", ids.dtype,
                          table.concat(ids.shape, ", ")), 3)
    end
    if keep_on_device and ids.device ~= "cpu" and ids.shape[1] > 0 then
      check_room(ids.shape[1], first, max_len)
      return nil, ids
    end
    ids = ids:totable()
  elseif type(ids) ~= "table" then
    error("dsv4.model.forward: ids must be a Lua array of integers or an integer tensor, got " .. type(ids), 3)
  end
  if #ids == 0 then error("dsv4.model.forward: ids is empty (nothing to forward)", 3) end
  for i, id in ipairs(ids) do
    if math.type(id) ~= "integer" or id < 0 or id >= vocab then
      error(string.format("dsv4.model.forward: ids[%d] = %s (position %d) is outside the vocabulary [0, %d)",
                          i, tostring(id), first + i - 1, vocab), 3)
    end
  end
  check_room(#ids, first, max_len)
  return ids
end

-- a session made by this model's :session{...}; `what` names the caller in the message
local function check_session(model, session, what)
  if type(session) ~= "table" or session.model ~= model then
    error(string.format("dsv4.model.%s: session must come from this model's :session{...}", what), 3)
  end
end

-- a session that keeps the MTP layer's state (not made with mtp = false)
local function check_mtp_state(session, what)
  if not session.mtp then
    error(string.format("dsv4.model.%s: the session was made with mtp = false and keeps no MTP state", what), 3)
  end
end

local LOGITS = { all = true, last = true, none = true }

--- The decoder over ids at positions [session:length(), +#ids): f32 logits [#ids, vocab], one row
--- per new position; advances the session (and fills the MTP layer's ring, dsrt.dsv4.mtp).
--- opts.logits: "all" (default), "last" (only the last position's row, [1, vocab], as the reference
--- computes: a long prefill then skips the head GEMM over every other row and its
--- #ids × vocab × 4 bytes of output) or "none" (no logits, nil: a prefill whose logits nobody reads).
function Model:forward(session, ids, opts)
  return self:forward_batch({ session }, { ids }, opts)[1]
end

--- Several sequences in one pass: ids_list[k] continues sessions[k]. The row-wise work (embedding,
--- HC, norms, every linear and the MoE) runs once over all rows, attention per sequence; returns a
--- list of f32 logits [#ids_list[k], vocab], equal to forwarding each sequence alone (opts.logits
--- as in forward: "last" gives [1, vocab] per sequence, "none" an empty list).
function Model:forward_batch(sessions, ids_list, opts)
  local which = opts and opts.logits or "all"
  if not LOGITS[which] then
    error(string.format("dsv4.model.forward: logits must be \"all\", \"last\" or \"none\", got %s", tostring(which)), 2)
  end
  if type(sessions) ~= "table" or type(ids_list) ~= "table" or #sessions ~= #ids_list or #sessions == 0 then
    error("dsv4.model.forward_batch: give one list of ids per session (two lists of equal, nonzero length)", 2)
  end
  local all, spans, states, checked = {}, {}, {}, {}
  -- one session without MTP state takes device ids as they are: nothing reads them back
  local on_device
  for k, session in ipairs(sessions) do
    check_session(self, session, "forward")
    for j = 1, k - 1 do
      if sessions[j] == session then error("dsv4.model.forward_batch: a session appears twice", 2) end
    end
    local ids, device_ids = checked_ids(ids_list[k], self.dims.vocab, session.positions, session.max_len,
                                        #sessions == 1 and not session.mtp)
    if device_ids then
      on_device, spans[k] = device_ids, { 1, device_ids.shape[1] }
    else
      checked[k] = ids
      spans[k] = { #all + 1, #ids }
      table.move(ids, 1, #ids, #all + 1, all)
    end
  end
  local precision, dims = self.precision, self.dims
  -- the ids go up once, as one small i64 tensor; the embedding gather and hash routing read it there
  local token_ids = on_device or decoder.ids(all, self.device)
  local X = decoder.embed(self.weights.embed, token_ids, precision, dims.hc_mult)
  local batched = #sessions > 1 and spans or nil
  local carry
  for i, block in ipairs(self.blocks) do
    for k, session in ipairs(sessions) do states[k] = session.states[i] end
    X, carry = decoder.block_forward(dims, block, batched and states or states[1], X, carry, token_ids, precision, batched)
  end
  -- one row that nothing but the head reads (no MTP ring to fill): settled and headed in one call
  local one_row
  if which ~= "none" and #sessions == 1 and X.shape[1] == 1 and not sessions[1].mtp then
    X, one_row = decoder.settle_logits(dims, self.weights.hc_head, self.weights.norm, self.head, X, carry, precision)
  else
    X = decoder.settle(X, carry, precision)
  end
  if not on_device then close(token_ids) end
  for k, session in ipairs(sessions) do
    local first = session.positions
    session.positions = first + spans[k][2]
    if session.mtp then
      local rows = X:narrow(1, spans[k][1], spans[k][2])
      self.mtp:advance(session, rows, checked[k], first)
      close(rows)
    end
  end
  if one_row then
    close(X)
    return { one_row }
  end
  local out = {}
  if which == "none" then
    close(X)
    return out
  end
  if which == "last" then
    -- each sequence's last row of X (one row per sequence: a view when there is one sequence)
    local last
    if #spans == 1 then
      last = X:narrow(1, spans[1][1] + spans[1][2] - 1, 1)
    else
      last = dsrt.empty({ #spans, X.shape[2], X.shape[3] }, { dtype = X.dtype, device = X.device })
      for k, span in ipairs(spans) do last[k] = X[span[1] + span[2] - 1] end
    end
    local logits = decoder.logits(dims, self.weights.hc_head, self.weights.norm, self.head, last, precision)
    for k = 1, #spans do out[k] = logits:narrow(1, k, 1) end
    close(last, X, logits)
    return out
  end
  local logits = decoder.logits(dims, self.weights.hc_head, self.weights.norm, self.head, X, precision)
  for k, span in ipairs(spans) do out[k] = logits:narrow(1, span[1], span[2]) end
  close(X, logits)
  return out
end

--- Draft logits (f32 [1, vocab]) for the position after next, from the main model's pre-hc_head
--- residual at the session's last position and next_id, the token that follows it (SPEC §8.1).
function Model:draft(session, next_id)
  if not self.mtp then error("dsv4.model.draft: the model was loaded without its MTP layers (mtp = false)", 2) end
  check_session(self, session, "draft")
  check_mtp_state(session, "draft")
  return self.mtp:draft(session, next_id)
end

--- The next draft of a chain (SPEC §8.2, vLLM's recursive MTP): f32 [1, vocab] for the position
--- after `id`, the token chosen from the previous draft's logits (model:draft or draft_next).
function Model:draft_next(session, id)
  if not self.mtp then error("dsv4.model.draft_next: the model was loaded without its MTP layers (mtp = false)", 2) end
  check_session(self, session, "draft_next")
  check_mtp_state(session, "draft_next")
  return self.mtp:draft_next(session, id)
end

--- Speculative verification (dsrt.dsv4.speculative.verify): ids = {the last accepted token, not
--- yet forwarded, then k drafts}; ONE forward of k + 1 positions, acceptance (greedy or rejection
--- sampling with the sampler options in opts), truncation to the accepted length. Returns the
--- number of drafts accepted, the next token (not forwarded) and {tokens = the new tokens, logits}.
function Model:verify(session, ids, opts)
  check_session(self, session, "verify")
  return require("dsrt.dsv4.speculative").verify(self, session, ids, opts)
end

-- ---- sessions ----

local Session = {}
Session.__index = Session

--- A new sequence: opts.max_len (required) positions, rollback by up to opts.slack (default 16).
--- opts.mtp (default true when the model has its MTP layer): keep the MTP layer's state, filled at
--- every forward, so the session can draft (model:draft, speculative decoding). A session that
--- will never draft says mtp = false and skips that fill: about a tenth of a decode step.
function Model:session(opts)
  opts = opts or {}
  local max_len, slack = opts.max_len, opts.slack or DEFAULT_SLACK
  if opts.mtp ~= nil and type(opts.mtp) ~= "boolean" then
    error("dsv4.model.session: mtp must be a boolean, got " .. type(opts.mtp), 2)
  end
  if math.type(max_len) ~= "integer" or max_len < 1 then
    error("dsv4.model.session: max_len must be a positive integer, got " .. tostring(max_len), 2)
  end
  if math.type(slack) ~= "integer" or slack < 0 then
    error("dsv4.model.session: slack must be a non-negative integer, got " .. tostring(slack), 2)
  end
  local session = setmetatable({ model = self, max_len = max_len, slack = slack, positions = 0, states = {} }, Session)
  for i, block in ipairs(self.blocks) do
    session.states[i] = core.attn_state(block.attention, {
      max_len = max_len, slack = slack, precision = self.precision, device = self.device,
    })
  end
  if self.mtp and opts.mtp ~= false then self.mtp:attach(session) end
  return session
end

function Session:length() return self.positions end

--- Back to n positions, as if the later ones had never been forwarded; n >= length - slack.
function Session:truncate(n)
  if math.type(n) ~= "integer" or n < 0 or n > self.positions or n < self.positions - self.slack then
    error(string.format("dsv4.session.truncate: %s is outside [%d, %d] (length %d, slack %d)", tostring(n),
                        math.max(0, self.positions - self.slack), self.positions, self.positions, self.slack), 2)
  end
  for _, state in ipairs(self.states) do state:truncate(n) end
  self.positions = n
  if self.mtp then self.model.mtp:truncate(self, n) end
end

return decoder
