-- dsrt.dsv4 — DeepSeek-V4 in one require: load a model folder into a decoder (dsrt.dsv4.model)
-- with its MTP predictor (dsrt.dsv4.mtp), and the modules it is built from.
--
--   local dsv4 = require "dsrt.dsv4"
--   local model = dsv4.load("model_dir", {device = "cpu", precision = "reference", mtp = true})
--   local seq = model:session{max_len = 8192}
--   local logits = model:forward(seq, {0, 100, 200})   -- f32 [3, vocab] for the new positions
--   model:forward(seq, ids, {logits = "last"})         -- only the last row (a long prefill's choice)
--   local draft = model:draft(seq, 300)                -- MTP logits for the position after 300
--   model:verify(seq, {300, d1, d2})                   -- speculative verification (dsv4.speculative)
--   model:generate{prompt = "Hi", speculative = {k = 2}} -- MTP speculative decoding
--   seq:truncate(2)
--   dsv4.config, dsv4.weights, dsv4.memory             -- the modules themselves
--   dsv4.chat.encode(messages, {thinking = false})     -- the chat prompt text (dsrt.dsv4.chat)
--
-- load options:
--   device     "cpu" (default), "cuda", "cuda:N": where the weights and the work go; the same
--              composition runs on both, only the ids (and sampled ids) cross to and from the host
--   precision  "reference" (the official numerics, SPEC §9.1) or "fp32" (fp32, no round trips: the
--              mode compared with transformers); required, so a model never runs in a mode nobody
--              asked for
--   mtp        true / false: bind and build the MTP predictor; default: when the checkpoint has it
--   weights    "file" (default: the folder's safetensors) or "random" (dsrt.dsv4.weights.random
--              over the folder's config.json, with opts.seed)
--
-- What it protects: one entry point turns a folder into a runnable model, and the checks of each
-- part (the config's, the weight binding's, the layer constructors') run before it is returned.
local config = require "dsrt.dsv4.config"
local weights = require "dsrt.dsv4.weights"
local memory = require "dsrt.dsv4.memory"
local model = require "dsrt.dsv4.model"
local mtp = require "dsrt.dsv4.mtp"

local dsv4 = { config = config, weights = weights, memory = memory }
dsv4.chat = require "dsrt.dsv4.chat"
dsv4.speculative = require "dsrt.dsv4.speculative"

local WEIGHT_SOURCES = { file = true, random = true }

function dsv4.load(dir, opts)
  opts = opts or {}
  local device, source = opts.device or "cpu", opts.weights or "file"
  if not WEIGHT_SOURCES[source] then
    error(string.format("dsv4.load: weights must be \"file\" or \"random\", got %s", tostring(source)), 2)
  end
  local cfg, w
  if source == "file" then
    cfg, w = weights.load(dir, { device = device, mtp = opts.mtp })
  else
    cfg = config.load(dir)
    w = weights.random(cfg, { device = device, seed = opts.seed, mtp = opts.mtp })
  end
  local decoder = model.new(cfg, w, { device = device, precision = opts.precision })
  if w.mtp_bound then decoder.mtp = mtp.new(decoder, cfg, w) end
  require("dsrt.dsv4.generate").attach(decoder, dir) -- :generate{...} and :stream{...} (generate.lua)
  return decoder
end

return dsv4
