-- bench_dsv4.lua — DeepSeek-V4 on the GPU: a Flash-shaped slice with random weights, decode step and
-- prefill timed against the card's own ceilings.
--
--   build/dsrt scripts/bench_dsv4.lua [--quick] [--context N] [--steps N] [--precision reference|fp32]
--                                     [--device cuda|cpu] [--config DIR]
--
-- The slice (the whole 149 GB Flash does not fit one H200): Flash's config (SPEC §1.1) cut to its first
-- four layers — 0 and 1 window-only with hash routing, 2 ratio-4 (CSA, lightning indexer; hash-routed,
-- as layer 2 of Flash is), 3 ratio-128 (HCA, learned routing) — and the MTP layer, with the real
-- 129280 × 4096 embedding and LM head and all 256 experts per layer; ≈20 GB of random weights drawn on
-- the device (dsv4.load{weights = "random"}). --config DIR benchmarks another model folder's config
-- instead (the tiny model, with --device cpu, is how this script is dry-run without a GPU).
--
-- What is measured, in this order:
--   - the ceilings: a device-to-device copy of 1 GiB (bytes read + written per ms, the bandwidth a
--     weight read can reach) and an FP8 dsrt.linear at 8192³ (tensor-core rate, activation
--     quantisation included), next to the card's nominal dense FP8 rate;
--   - prefill: one forward of `context` tokens (default 4096) on a fresh session, logits of the last
--     position only (as the reference: SPEC §4 step 6), timed with CUDA events; tokens/s, and TFLOP/s
--     against the FP8 ceiling — FLOPs counted per token as 2 × every linear weight a token multiplies
--     (activated experts only) plus the attention's QKᵀ and PV over the keys each position sees, the
--     indexer's scoring of the compressed keys, and the LM head once;
--   - decode at batch 1 after that prefill, as generation runs it (generate{}'s pipelined loop):
--     3 warm-up steps, then `steps` steps (20; --quick 5) through a benchmark-only loop that mirrors
--     Model:forward_batch for one session (embedding, the blocks, HC head + norm + LM head of the
--     last row), then the greedy draw (dsrt.sample_async), whose device ids are the next step's
--     input; the host issues step t + 1 before it reads step t's token. The headline step is their
--     mean between two CUDA events; `steps` more steps with an event after each part (read at the
--     end; each event between kernels costs the chain of dependent launches ~3 us) give medians per
--     part: per layer kind (window+hash, ratio-4 + indexer, ratio-128), the head and the draw, each
--     against its floor: the weight bytes it must read per step (dsv4.memory's decode_weight_bytes,
--     SPEC §11.2) ÷ the measured copy bandwidth. The session is plain decoding's (made with
--     mtp = false, as generate{} without speculation makes: no MTP ring fill);
--   - the same steps with the host waiting for each before issuing the next (no draw), on a
--     session that drafts: the step without and with its MTP ring fill;
--   - the MTP draft step (model:draft), against its floor (decode_weight_bytes' mtp_step);
--   - an estimate for the whole 43-layer Flash decode step: 2 window + 21 CSA + 20 HCA layers at the
--     measured per-kind times, plus the head (KV traffic at 4K context is ~1% of the weight bytes).
-- Prints a table last. Random weights: routing is data-dependent, but hash routing spreads tokens as
-- the real tid2eid does and learned routing over random gates is near uniform.
local dsrt = require "dsrt"
local core = require "dsrt.core"
local dsv4 = require "dsrt.dsv4"
local config = require "dsrt.dsv4.config"
local memory = require "dsrt.dsv4.memory"
local decoder = require "dsrt.dsv4.model"

-- ---- options ----

local opts = dofile("scripts/bench_options.lua")("bench_dsv4", arg,
  { quick = "flag", context = "int", steps = "int", precision = "string", device = "string", config = "string" },
  { precision = "reference", device = "cuda" })
opts.context = opts.context or (opts.quick and 1024 or 4096)
opts.steps = opts.steps or (opts.quick and 5 or 20)
if not opts.context or opts.context < 2 then error("bench_dsv4: --context must be an integer >= 2", 0) end
if not opts.steps or opts.steps < 1 then error("bench_dsv4: --steps must be a positive integer", 0) end
local dev = opts.device
local on_gpu = dev:match("^cuda") ~= nil
if on_gpu and not dsrt.cuda.available() then
  io.stderr:write("bench_dsv4: no CUDA device\n")
  os.exit(1)
end

local function median(xs)
  local c = { table.unpack(xs) }
  table.sort(c)
  return c[(#c + 1) // 2]
end

-- CUDA events (on the CPU they time the wall clock)
local function event() return dsrt.event(dev, { timing = true }) end

local function time_ms(fn, runs)
  runs = runs or (opts.quick and 3 or 10)
  fn()
  local a, b, samples = event(), event(), {}
  for r = 1, runs do
    a:record()
    fn()
    b:record()
    b:synchronize()
    samples[r] = a:elapsed(b)
    collectgarbage("step")
  end
  return median(samples)
end

-- ---- the model ----

local folder = opts.config or dofile("scripts/flash_slice.lua")()
local cfg = config.load(folder)
local d = cfg.dims
local info = on_gpu and dsrt.cuda.device_info() or { name = "cpu" }
io.stderr:write(("bench_dsv4: %d layers + %d MTP of %s, %s precision, on %s\n"):format(
  #cfg.layers, #cfg.mtp, opts.config or "the Flash slice", opts.precision, info.name))

local rows = {}
local function row(name, ms, floor_ms, extra)
  rows[#rows + 1] = { name = name, ms = ms, floor = floor_ms, extra = extra or "" }
end

-- ---- ceilings ----

local copy_elems = opts.quick and (1 << 26) or (1 << 28) -- bf16: 128 MiB / 512 MiB
local big = dsrt.randn({ copy_elems }, { device = dev, dtype = "bf16", seed = 1 })
local copy_ms = time_ms(function() return big:clone() end)
local copy_gbs = 2 * big:nbytes() / copy_ms / 1e6 -- GB/s, bytes read + written
big = nil
collectgarbage()

-- an FP8 linear [n, n] with e8m0 block scales over bf16 activations [n, n] (reference precision:
-- the activations are quantised to e4m3 per 128, as every FP8 GEMM of the model)
local n8 = on_gpu and (opts.quick and 4096 or 8192) or 512
local fp8 = dsrt.linear {
  weight = dsrt.randn({ n8, n8 }, { device = dev, seed = 2 }):to("f8e4m3"),
  scale = dsrt.full({ n8 // 128, n8 // 128 }, 2 ^ -7, { device = dev, dtype = "f8e8m0" }),
  format = "fp8",
}
local act = dsrt.randn({ n8, n8 }, { device = dev, dtype = "bf16", seed = 3 })
local fp8_ms = time_ms(function() return fp8:forward(act, "reference") end)
local fp8_tflops = 2 * n8 ^ 3 / fp8_ms / 1e9
fp8, act = nil, nil
collectgarbage()
-- nominal dense FP8 rates (no sparsity) of the cards this runs on
local NOMINAL_FP8 = { H200 = 1979, H100 = 1979 }
local nominal = nil
for card, rate in pairs(NOMINAL_FP8) do if info.name:find(card) then nominal = rate end end

-- ---- FLOPs of the forward (for the prefill rate) ----

-- 2 × the logical weights a token multiplies: every linear of the blocks (activated experts only,
-- fp4 bytes hold two weights), the HC mixes; the embedding is a gather and the head runs once
local function linear_flops_per_token(with_mtp)
  local total = 0
  for _, t in ipairs(memory.tensors(cfg, with_mtp)) do
    local name = t.name
    local is_weight = #t.shape == 2 and (name:match("%.weight$") or name:match("_fn$"))
    local skip = name == "embed.weight" or name == "head.weight" or name:match("%.tid2eid$") or name:match("^mtp")
    if is_weight and not skip then
      local n = t.shape[1] * t.shape[2] * (t.dtype == "I8" and 2 or 1)
      if t.decode == "activated" then n = n * d.n_activated_experts else n = n * t.count end
      total = total + 2 * n
    end
  end
  return total
end

-- attention at the position `pos` (0-based): QKᵀ and PV over the keys it sees, and on CSA layers the
-- indexer's scores over every compressed key (SPEC §6.4–6.7)
local function attention_flops(pos)
  local total, per_key = 0, 2 * 2 * d.n_heads * d.head_dim
  for _, layer in ipairs(cfg.layers) do
    local keys = math.min(pos + 1, d.window)
    if layer.kind ~= "window" then
      local entries = (pos + 1) // layer.ratio
      if layer.indexer then
        total = total + 2 * d.index_n_heads * d.index_head_dim * entries
        entries = math.min(entries, d.index_topk)
      end
      keys = keys + entries
    end
    total = total + per_key * keys
  end
  return total
end

local function prefill_flops(tokens)
  local total = linear_flops_per_token(false) * tokens + 2 * d.vocab * d.dim
  for pos = 0, tokens - 1 do total = total + attention_flops(pos) end
  return total
end

-- ---- load ----

local t0 = core.wall_time()
local model = dsv4.load(folder, { device = dev, precision = opts.precision, weights = "random", seed = 1, mtp = true })
dsrt.synchronize(dev)
io.stderr:write(("bench_dsv4: random weights drawn in %.1f s\n"):format(core.wall_time() - t0))

local function ids_of(n, seed)
  local ids, x = {}, seed
  for i = 1, n do
    x = (x * 1103515245 + 12345) % 2147483648
    ids[i] = x % d.vocab
  end
  return ids
end

-- ---- prefill ----

local prompt = ids_of(opts.context, 7)
local max_len = opts.context + 2 * opts.steps + 16 -- the generation loop's two runs and warm-up
local function prefill(seq)
  local a, b = event(), event()
  a:record()
  local logits = model:forward(seq, prompt, { logits = "last" })
  b:record()
  b:synchronize()
  return a:elapsed(b), logits
end
local seq = model:session{ max_len = max_len }
prefill(seq) -- the first also warms up: its session is the one the drafting steps continue
-- plain decoding's session (no MTP state, as generate{} without speculation makes): the prefill
-- timed warm, and the session the generation loop continues from its logits
local plain_seq = model:session{ max_len = max_len, mtp = false }
local prefill_ms, prompt_logits = prefill(plain_seq)
collectgarbage()
local pf_flops = prefill_flops(opts.context)
row(("prefill %d tokens"):format(opts.context), prefill_ms, nil,
    ("%.0f tok/s, %.1f TFLOP/s = %.0f%% of FP8 dsrt.linear"):format(opts.context / prefill_ms * 1e3,
      pf_flops / prefill_ms / 1e9, 100 * pf_flops / prefill_ms / 1e9 / fp8_tflops))

-- ---- decode: the benchmark-only mirror of Model:forward_batch for one session ----

-- the parts of a step between its events marks[p] and marks[p + 1]: p = 1 embedding, 1 + i block i,
-- 2 + #blocks the MTP ring fill (a session that drafts), 3 + #blocks HC head + norm + LM head; the
-- generation loop's 4 + #blocks is the greedy draw. id: a token id, or the device ids of a draw.
local n_layers = #model.blocks
local function decode_step(session, id, marks)
  local precision, dims = model.precision, model.dims
  local first = session.positions
  marks[1]:record()
  local token_ids = dsrt.is_tensor(id) and id or decoder.ids({ id }, dev)
  local X = decoder.embed(model.weights.embed, token_ids, precision, dims.hc_mult)
  marks[2]:record()
  -- each block's last hc_post runs fused into the next block's first hc_pre; the last one's into
  -- the HC head (its part's), or alone where the MTP ring fill reads the settled rows
  local carry
  for i, block in ipairs(model.blocks) do
    X, carry = decoder.block_forward(dims, block, session.states[i], X, carry, token_ids, precision)
    if i == n_layers and session.mtp then X = decoder.settle(X, carry, precision) end
    marks[2 + i]:record()
  end
  session.positions = first + 1
  if session.mtp then model.mtp:advance(session, X, { id }, first) end
  marks[3 + n_layers]:record()
  local logits
  if session.mtp then
    logits = decoder.logits(dims, model.weights.hc_head, model.weights.norm, model.head, X, precision)
  else
    X, logits = decoder.settle_logits(dims, model.weights.hc_head, model.weights.norm, model.head, X, carry, precision)
  end
  marks[4 + n_layers]:record()
  decoder.close(X)
  if token_ids ~= id then decoder.close(token_ids) end
  return logits
end

local function new_marks(n)
  local marks = {}
  for i = 1, n do marks[i] = event() end
  return marks
end

-- Decode as generation runs it (generate{}'s pipelined loop): each step's greedy draw stays on the
-- device (dsrt.sample_async) and is the next step's input, and the host issues step t + 1 before it
-- reads step t's token, so it never waits for the GPU before issuing. Timed twice: `steps` steps
-- between two events only (an event between kernels costs the chain of dependent launches ~1-2 us:
-- the headline step), then the same with an event after each part, read at the end (part_samples[p]:
-- the steps' times of part p; .total: a step with its draw).
local warm = 3
local unmarked = setmetatable({}, { __index = function() return { record = function() end } end })
local ids, pending = dsrt.sample_async(prompt_logits, {})
decoder.close(prompt_logits)
local function generation_steps(n, marks_of)
  for step = 1, n do
    local marks = marks_of(step)
    local logits = decode_step(plain_seq, ids, marks)
    local next_ids, next_pending = dsrt.sample_async(logits, {})
    marks[5 + n_layers]:record()
    decoder.close(logits)
    pending:wait() -- the token before, read while this step runs
    decoder.close(ids)
    ids, pending = next_ids, next_pending
  end
end
generation_steps(warm, function() return unmarked end)
local gen_a, gen_b = event(), event()
gen_a:record()
generation_steps(opts.steps, function() return unmarked end)
gen_b:record()
local all_marks = {}
for step = 1, opts.steps do all_marks[step] = new_marks(5 + n_layers) end
generation_steps(opts.steps, function(step) return all_marks[step] end)
pending:wait()
decoder.close(ids)
local gen_step_ms = gen_a:elapsed(gen_b) / opts.steps
local part_samples = { total = {} }
for step = 1, opts.steps do
  local marks = all_marks[step]
  marks[#marks]:synchronize()
  for p = 1, #marks - 1 do
    part_samples[p] = part_samples[p] or {}
    part_samples[p][#part_samples[p] + 1] = marks[p]:elapsed(marks[p + 1])
  end
  part_samples.total[#part_samples.total + 1] = marks[1]:elapsed(marks[#marks])
end

-- The same steps with the host waiting for each before it issues the next (the plain loop of a
-- sequence that drafts: model:draft needs the token on the host), on the session with MTP state:
-- the step without and with its MTP ring fill, and the draft after it.
local sync_samples, sync_drafting, draft_samples = {}, {}, {}
local marks = new_marks(4 + n_layers)
local draft_a, draft_b = event(), event()
local step_ids = ids_of(opts.steps + warm, 11)
for step = 1, opts.steps + warm do
  local logits = decode_step(seq, step_ids[step], marks)
  marks[#marks]:synchronize()
  -- the draft for the position after next, from the token just "sampled" (undone by the next step)
  draft_a:record()
  decoder.close(logits, model:draft(seq, step_ids[step] % d.vocab))
  draft_b:record()
  draft_b:synchronize()
  if step > warm then
    local total = marks[1]:elapsed(marks[#marks])
    sync_drafting[#sync_drafting + 1] = total
    sync_samples[#sync_samples + 1] = total - marks[2 + n_layers]:elapsed(marks[3 + n_layers])
    part_samples.ring = part_samples.ring or {}
    part_samples.ring[#part_samples.ring + 1] = marks[2 + n_layers]:elapsed(marks[3 + n_layers])
    draft_samples[#draft_samples + 1] = draft_a:elapsed(draft_b)
  end
end

local total_bytes, detail = memory.decode_weight_bytes(cfg)
local function floor_ms(bytes) return bytes / copy_gbs / 1e6 end
local function ms_of(part) return median(part_samples[part]) end

-- per layer kind: the mean over the layers of that kind (a median step each)
local kinds, kind_order = {}, {}
for i, layer in ipairs(cfg.layers) do
  local key = layer.kind == "window" and "window" or layer.kind
  local label = ({ window = "window", csa = "ratio-4 + indexer", hca = "ratio-128" })[layer.kind]
  label = label .. (layer.router == "hash" and " (hash)" or " (learned)")
  key = key .. "/" .. layer.router
  if not kinds[key] then
    kinds[key] = { label = label, ms = 0, bytes = 0, count = 0, kind = layer.kind }
    kind_order[#kind_order + 1] = key
  end
  local k = kinds[key]
  k.ms, k.bytes, k.count = k.ms + ms_of(1 + i), k.bytes + detail.layers[i], k.count + 1
end
for _, key in ipairs(kind_order) do
  local k = kinds[key]
  row(("decode: %s layer"):format(k.label), k.ms / k.count, floor_ms(k.bytes / k.count),
      k.count > 1 and ("mean of %d layers"):format(k.count) or "")
end
local head_ms = ms_of(1) + ms_of(3 + n_layers)
row("decode: embedding + HC head + norm + LM head", head_ms, floor_ms(detail.global))
row("decode: greedy draw (dsrt.sample_async)", ms_of(4 + n_layers), nil)
row(("decode step at context %d, generation loop"):format(opts.context), gen_step_ms, floor_ms(total_bytes),
    ("%.1f tok/s, mean of %d steps"):format(1e3 / gen_step_ms, opts.steps))
row("the same with an event after each part", median(part_samples.total), floor_ms(total_bytes), "")
row("decode step, host waiting for each (no draw)", median(sync_samples), floor_ms(total_bytes), "")
if model.mtp then
  row("decode: MTP ring fill (a session that drafts)", median(part_samples.ring), nil)
  row("decode step of a session that drafts (+ ring fill)", median(sync_drafting), nil, "")
end
if model.mtp and detail.mtp_step then
  row("MTP draft step (block + LM head)", median(draft_samples), floor_ms(detail.mtp_step))
end

-- the whole Flash decode step from the per-kind times (Flash: 2 window, 21 CSA, 20 HCA layers)
if not opts.config then
  local flash = config.load("tests/fixtures/config/flash_published.json")
  local flash_bytes = memory.decode_weight_bytes(flash)
  local per = {}
  for _, key in ipairs(kind_order) do
    local k = kinds[key]
    per[k.kind] = per[k.kind] or k.ms / k.count
  end
  local count = { window = 0, csa = 0, hca = 0 }
  for _, layer in ipairs(flash.layers) do count[layer.kind] = count[layer.kind] + 1 end
  local est = head_ms
  for kind, c in pairs(count) do est = est + c * (per[kind] or 0) end
  row(("Flash decode step, estimated (%d+%d+%d layers)"):format(count.window, count.csa, count.hca), est,
      floor_ms(flash_bytes), ("%.1f tok/s"):format(1e3 / est))
end

-- ---- the table ----

print(("\ndsrt %s DeepSeek-V4 benchmark on %s, %s; %s precision, %s, context %d, %d decode steps"):format(
  dsrt.version, info.name, os.date("%Y-%m-%d"), opts.precision, opts.config or "Flash slice (layers 0-3 + MTP)",
  opts.context, opts.steps))
print(("ceilings: copy %.0f GB/s (read + write), FP8 dsrt.linear %d^3 %.0f TFLOP/s%s"):format(copy_gbs, n8,
  fp8_tflops, nominal and (" (nominal dense FP8 %d TFLOP/s)"):format(nominal) or ""))
print(("%-50s %10s %10s %8s  %s"):format("what", "ms", "floor ms", "% floor", "notes"))
for _, r in ipairs(rows) do
  print(("%-50s %10.3f %10s %8s  %s"):format(r.name, r.ms, r.floor and ("%.3f"):format(r.floor) or "",
    r.floor and ("%.0f%%"):format(100 * r.floor / r.ms) or "", r.extra))
end
if not opts.config then os.execute("rm -rf " .. folder) end
