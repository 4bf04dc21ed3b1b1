-- dsrt.dsv4.mtp — the multi-token-prediction (MTP) predictor of DeepSeek-V4 (SPEC §8), composed
-- from the same layer objects as the decoder (dsrt.dsv4.model), and its part of a session.
--
--   model.mtp = require("dsrt.dsv4.mtp").new(model, cfg, w)   -- dsrt.dsv4.load does this
--   local draft = model:draft(seq, next_id)                   -- f32 [1, vocab]
--
-- What it protects:
--   - The wiring DESIGN.md exists for: the predictor makes ONE list of three aux streams
--     (predictor.aux_streams) and hands that same table to every MTP layer's constructor; the
--     layers never make streams. It is a list of its own, not the decoder's.
--   - SPEC §8.1, step by step: e = RMS_w(embed[n]; enorm), h_s = RMS_w(H_s; hnorm) per residual
--     stream, X_s = h_proj(h_s) + e_proj(e), a full block, then the MTP layer's own hc_head, its
--     norm (mtp.k.norm) and the decoder's LM head (shared, as the embedding: SPEC §2.5).
--   - The MTP layer's window ring covers the same positions as the decoder (SPEC §8.2 "it must be
--     filled over the prompt too"): the MTP input at position t needs the main model's residual H_t
--     and the token at t + 1, so whenever the decoder advances, the ring is filled up to the
--     decoder's last position minus one — only the attention half of the block runs there (the
--     ring is the only state; the rest of the block would be thrown away), and only over the
--     positions the ring keeps (window + slack: a 4096-token prompt fills 4095 positions with
--     the inputs of the last 145, Flash's window 128 and a session's slack 16 + 1). The last position's residual waits for draft(). Rollback keeps both in
--     step.
--   - Several drafts (speculative decoding, dsrt.dsv4.speculative) apply the one MTP layer
--     recursively, as vLLM does (SPEC §8.2): draft_next(id) feeds the previous draft's own
--     pre-hc_head residual with the embedding of the token drafted from it, one position further.
--     Those later positions hold MTP residuals, not the decoder's, so the decoder's next forward
--     undoes them (only the first draft's position, whose input was the decoder's own residual and
--     the token the decoder then takes, is kept) and refills them from the decoder's residuals: the
--     MTP state is always what non-speculative decoding would have left.
-- Only the first MTP layer drafts (DeepSeek-V4 has one; chaining several MTP layers, SPEC §8.2,
-- is not done here: draft_next reuses the first). The reference does not zero the embedding at position 0 as vLLM
-- does (SPEC §8.2); neither does this.
local dsrt = require "dsrt"
local core = require "dsrt.core"
local decoder = require "dsrt.dsv4.model"

local nn = core.nn
local close = decoder.close

local mtp = {}

local Predictor = {}
Predictor.__index = Predictor

--- The predictor of cfg.mtp / w.mtp, sharing model's embedding and LM head.
function mtp.new(model, cfg, w)
  local self = setmetatable({ model = model, dims = cfg.dims, precision = model.precision, device = model.device },
                            Predictor)
  self.aux_streams = decoder.aux_streams(self.device)
  self.layers = {}
  for k, layer in ipairs(cfg.mtp) do
    local lw = w.mtp[k]
    self.layers[k] = {
      block = decoder.block(cfg, layer, lw, self.aux_streams),
      e_proj = dsrt.linear(lw.e_proj), h_proj = dsrt.linear(lw.h_proj),
      enorm = lw.enorm, hnorm = lw.hnorm, norm = lw.norm, hc_head = lw.hc_head,
    }
  end
  return self
end

-- SPEC §8.1 steps 1–2: the MTP layer's input X [n, hc, dim] from the main residuals H [n, hc, dim]
-- and the next tokens' ids (a Lua array of n ids).
local function mtp_input(self, layer, H, next_ids)
  local dims, precision = self.dims, self.precision
  local embedded = decoder.embed(self.model.weights.embed, next_ids, precision)
  local e = nn.rms_norm(embedded, layer.enorm, dims.norm_eps, precision)
  local h = nn.rms_norm(H, layer.hnorm, dims.norm_eps, precision)
  local hp, ep = layer.h_proj:forward(h, precision), layer.e_proj:forward(e, precision)
  local ep_rows = ep:unsqueeze(2)
  local X = hp + ep_rows
  close(embedded, e, h, hp, ep, ep_rows)
  return X
end

--- Gives a new session its MTP part: the first layer's attention state (one position more slack
--- than the decoder's, as a draft puts it one position ahead) and the residuals H by position.
function Predictor:attach(session)
  session.mtp = {
    state = core.attn_state(self.layers[1].block.attention, {
      max_len = session.max_len, slack = session.slack + 1, precision = self.precision, device = self.device,
    }),
    residuals = {},   -- position -> the decoder's pre-hc_head residual [hc, dim] there
    drafted_id = nil, -- the next_id of a draft that advanced the state past the decoder's length - 1
    chain = nil,      -- the last draft's pre-hc_head residual X [1, hc, dim] and its MTP position
  }
end

-- Undoes drafts: the MTP state back to `length` positions (when it is longer); forgets the chain.
local function undo_draft(part, length)
  if part.state:length() > length then
    part.state:truncate(length)
  end
  part.drafted_id = nil
  if part.chain then close(part.chain.X) end
  part.chain = nil
end

--- After the decoder forwarded ids at positions [first, first + #ids) with pre-hc_head residuals
--- X [#ids, hc, dim]: fills the MTP ring over every position whose next token is now known.
function Predictor:advance(session, X, ids, first)
  local part, S = session.mtp, #ids
  if part.drafted_id ~= nil then
    -- the first draft (position first - 1) stays when the decoder took its token; every later draft
    -- position was computed from MTP residuals and is refilled below from the decoder's
    undo_draft(part, part.drafted_id == ids[1] and first or first - 1)
  end
  local length, to = part.state:length(), first + S - 2 -- MTP positions length .. to to fill
  if to >= length then
    -- a window-only MTP layer keeps the last window + slack of them: a long prompt's earlier
    -- positions are stepped over, their inputs (h_proj's GEMM over hc·dim columns) never made
    local skip = part.state:skippable(to - length + 1)
    local from, layer = length + skip, self.layers[1]
    -- H: the kept residuals of positions before `first` (the previous call's last, normally), then
    -- rows of X in one block: a view of X when there are none, one block copy otherwise (never a
    -- copy per row: a prefill of S tokens would launch S copies on a GPU)
    local count = to - from + 1
    local older = math.max(0, math.min(to, first - 1) - from + 1)
    local H
    if older == 0 then
      H = X:narrow(1, from - first + 1, count)
    else
      H = dsrt.empty({ count, X.shape[2], X.shape[3] }, { dtype = X.dtype, device = X.device })
      for row = 1, older do H[row] = part.residuals[from + row - 1] end
      if count > older then
        local dst, src = H:narrow(1, older + 1, count - older), X:narrow(1, 1, count - older)
        dst:copy(src)
        close(dst, src)
      end
    end
    local next_ids = {}
    for t = from, to do next_ids[t - from + 1] = ids[t + 1 - first + 1] end
    local X_mtp = mtp_input(self, layer, H, next_ids)
    decoder.attention_advance(self.dims, layer.block, part.state, X_mtp, self.precision, skip)
    close(H, X_mtp)
  end
  -- rollback reaches back `slack` positions, and the residual before them feeds the MTP there: only
  -- the last slack + 1 positions are kept, as rows of one small copy (a view would keep the whole
  -- of X — a long prefill's [S, hc, dim] — alive)
  local keep = math.min(S, session.slack + 1)
  local last_rows = X:narrow(1, S - keep + 1, keep)
  local kept = last_rows:clone()
  close(last_rows) -- a view left to the collector would keep all of X alive until it runs
  for i = 1, keep do part.residuals[first + S - keep + i - 1] = kept[i] end
  close(kept)
  for t = first - session.slack - 1, first + S - session.slack - 2 do
    close(part.residuals[t])
    part.residuals[t] = nil
  end
end

-- The MTP layer's block over one draft position, its last hc_post applied (nothing follows it),
-- and the draft logits of it: the settled X (the chain's next residual) and f32 logits [1, vocab]
local function draft_block(self, layer, part, X, token_ids)
  local dims, precision = self.dims, self.precision
  local carry
  X, carry = decoder.block_forward(dims, layer.block, part.state, X, nil, token_ids, precision)
  return decoder.settle_logits(dims, layer.hc_head, layer.norm, self.model.head, X, carry, precision)
end

--- Draft logits f32 [1, vocab] for the position after next_id (SPEC §8.1), from the decoder's
--- residual at its last position; advances the MTP state by that position until the decoder moves.
function Predictor:draft(session, next_id)
  local vocab, last = self.dims.vocab, session.positions - 1
  if last < 0 then error("dsv4.model.draft: the session is empty; forward a token first", 3) end
  if math.type(next_id) ~= "integer" or next_id < 0 or next_id >= vocab then
    error(string.format("dsv4.model.draft: next_id %s is outside the vocabulary [0, %d)", tostring(next_id), vocab), 3)
  end
  local part, layer = session.mtp, self.layers[1]
  undo_draft(part, last)
  local H = part.residuals[last]:unsqueeze(1)
  local X = mtp_input(self, layer, H, { next_id })
  local token_ids = decoder.ids({ next_id }, self.device)
  local logits
  X, logits = draft_block(self, layer, part, X, token_ids)
  close(H, token_ids)
  part.drafted_id = next_id
  part.chain = { X = X, position = last }
  return logits
end

--- The next draft of a chain (vLLM's recursive MTP, SPEC §8.2): logits f32 [1, vocab] for the
--- position after `id`, the token drafted from the previous draft's logits, from that draft's own
--- pre-hc_head residual at the next MTP position. Advances the MTP state by one more position,
--- which the decoder's next forward undoes (advance).
function Predictor:draft_next(session, id)
  local vocab, part = self.dims.vocab, session.mtp
  if part.chain == nil then
    error("dsv4.model.draft_next: no draft to continue; call model:draft(session, next_id) first", 3)
  end
  if math.type(id) ~= "integer" or id < 0 or id >= vocab then
    error(string.format("dsv4.model.draft_next: id %s is outside the vocabulary [0, %d)", tostring(id), vocab), 3)
  end
  local position = part.chain.position + 1
  if position + 1 > session.max_len then
    error(string.format("dsv4.model.draft_next: a draft at position %d would pass the session's max_len %d",
                        position + 1, session.max_len), 3)
  end
  local layer = self.layers[1]
  local X = mtp_input(self, layer, part.chain.X, { id })
  local token_ids = decoder.ids({ id }, self.device)
  local logits
  X, logits = draft_block(self, layer, part, X, token_ids)
  close(token_ids, part.chain.X)
  part.chain = { X = X, position = position }
  return logits
end

--- The session was truncated to n positions: the MTP state follows to n - 1.
function Predictor:truncate(session, n)
  local part = session.mtp
  undo_draft(part, math.max(n - 1, 0))
  for t, residual in pairs(part.residuals) do
    if t >= n then
      close(residual)
      part.residuals[t] = nil
    end
  end
end

return mtp
