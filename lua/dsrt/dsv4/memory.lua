-- dsrt.dsv4.memory — how many bytes a DeepSeek-V4 model needs: weights, KV cache and compressor
-- state per sequence, and weight bytes read per decoded token.
--
--   local memory = require "dsrt.dsv4.memory"
--   local e = memory.estimate(cfg, {context = 65536, layout = "native", mtp = false, devices = 2})
--   print(memory.format(e.weight_bytes), memory.format(e.kv_bytes))
--   local bytes, per = memory.decode_weight_bytes(cfg)   -- the decode benchmark's bandwidth floor
--
-- What it protects: the numbers people plan GPUs with, and the floor the decode benchmark reports
-- against, come from the model's exact tensor list (SPEC §2) rather than from rules of thumb, so
-- they are right for every config, not only Flash. One function, memory.tensors, lists every
-- checkpoint tensor of a layer (name, safetensors dtype, stored shape) from the normalised config
-- of dsrt.dsv4.config; weight totals, per-device splits and decode traffic are all sums over it,
-- and for Flash they reproduce SPEC §2.6 and §11.2 to the byte. KV sizes follow SPEC §11.1.
--
-- memory.estimate(cfg, opts) options:
--   context   tokens per sequence (default 0: only what does not grow with the context)
--   layout    "reference" (bf16 latent 2·head_dim B, bf16 indexer key 2·index_head_dim B) or
--             "native" (e4m3 no-rope dims + bf16 rope dims + e8m0 per 64, padded to 8 B; indexer
--             key as MXFP4: e2m1 + e8m0 per 32); fp32 compressor state in both (SPEC §11.1).
--             Default "reference", the layout of precision = "reference".
--   mtp       include the MTP layers (their weights and window rings); default false, so the
--             figures are those of the main model, as SPEC §11 states them
--   devices   split the model over this many GPUs as a pipeline (default 1), see below
-- and returns:
--   weight_bytes              every weight byte of the checkpoint (main model, plus MTP when mtp)
--   weight_bytes_per_device   array, one entry per device
--   kv_bytes_per_device       array: the KV/state bytes (at this context) of each device's layers
--   device_parts              array of arrays of part names ("embed", "layers.0", …, "head", "mtp.0")
--   kv_bytes_per_token        average growth per token: Σ over compressed layers of entry bytes / r
--   kv_fixed_bytes            what one sequence holds whatever its length: the window ring of every
--                             layer and the compressor (and indexer) states
--   kv_bytes                  one sequence at `context`: fixed + ceil(context/r) entries per
--                             compressed layer (and indexer)
--   kv_read_bytes             KV bytes one decoded token reads at this context: its ring, and on a
--                             compressed layer all visible entries (hca) or the indexer's scan of
--                             every key plus its top-k entries (csa)
--   by_kind                   {window=, csa=, hca=}, each {layers, weight_bytes, kv_bytes_per_token,
--                             kv_fixed_bytes, kv_bytes, kv_read_bytes} over the layers of that kind
--   context, layout, mtp, devices   the options as used
--
-- Devices: the model is cut into pipeline parts in forward order — the embedding, each layer, the
-- head (final norm, HC head, LM head), each MTP block with its own projections — and the parts are
-- split into `devices` contiguous runs so that each run's weight bytes are as close as the part
-- boundaries allow to an equal share (by bytes, not by layer count: an HCA layer is 9% lighter
-- than a CSA one, and the embedding and head are 1 GB each). A layer's KV stays on its device.
local memory = {}

-- bytes per element of each safetensors dtype a DSV4 checkpoint uses (SPEC §2.1, FORMATS.md §5)
local DTYPE_BYTES = { BF16 = 2, F32 = 4, F8_E4M3 = 1, F8_E8M0 = 1, I8 = 1, I64 = 8 }
-- safetensors dtype of an FP8 scale, by cfg.formats.fp8_scale_dtype
local SCALE_DTYPE = { f8e8m0 = "F8_E8M0", f32 = "F32" }

local function ceil_div(a, b) return (a + b - 1) // b end

-- ---- the tensor list (SPEC §2) ----
--
-- Each tensor: {name, dtype (safetensors string), shape (as stored), count, decode}. count > 1
-- stands for `count` tensors alike, named with "{e}" for the expert index. decode says what one
-- decoded token reads of it at batch 1 (SPEC §11.2): "whole", "row" (one row: an embedding or a
-- tid2eid lookup) or "activated" (n_activated_experts of the `count` routed experts).

local function add(list, name, dtype, shape, decode, count)
  list[#list + 1] = { name = name, dtype = dtype, shape = shape, decode = decode or "whole", count = count or 1 }
end

-- A linear layer y = x·Wᵀ with W [out, in], stored in `format` (SPEC §2.1): fp8 = e4m3 weight and a
-- scale per fp8_block tile; fp4 = two e2m1 codes per I8 byte and an e8m0 scale per 32 inputs of a
-- row; bf16 = the weight alone.
local function add_linear(list, cfg, name, out_features, in_features, format, decode, count)
  local f = cfg.formats
  if format == "fp8" then
    add(list, name .. ".weight", "F8_E4M3", { out_features, in_features }, decode, count)
    add(list, name .. ".scale", SCALE_DTYPE[f.fp8_scale_dtype],
        { ceil_div(out_features, f.fp8_block[1]), ceil_div(in_features, f.fp8_block[2]) }, decode, count)
  elseif format == "fp4" then
    add(list, name .. ".weight", "I8", { out_features, in_features // 2 }, decode, count)
    add(list, name .. ".scale", "F8_E8M0", { out_features, in_features // f.fp4_block }, decode, count)
  else
    add(list, name .. ".weight", "BF16", { out_features, in_features }, decode, count)
  end
end

-- A compressor (SPEC §2.4, §6.5): wkv and wgate [coff·d, dim] bf16, ape [r, coff·d] fp32, norm [d].
local function add_compressor(list, cfg, prefix, layer, width)
  local dim, cw = cfg.dims.dim, layer.coff * width
  add(list, prefix .. "wkv.weight", "BF16", { cw, dim })
  add(list, prefix .. "wgate.weight", "BF16", { cw, dim })
  add(list, prefix .. "ape", "F32", { layer.ratio, cw })
  add(list, prefix .. "norm.weight", "BF16", { width })
end

-- The tensors of one block (SPEC §2.3–2.5), main or MTP, named with the layer's prefix.
local function block_tensors(cfg, layer)
  local d, dv, f = cfg.dims, cfg.derived, cfg.formats
  local p, list = layer.prefix, {}
  add(list, p .. "attn_norm.weight", "BF16", { d.dim })
  add(list, p .. "ffn_norm.weight", "BF16", { d.dim })
  for _, sub in ipairs({ "attn", "ffn" }) do
    add(list, p .. "hc_" .. sub .. "_fn", "F32", { dv.mix_hc, dv.hc_dim })
    add(list, p .. "hc_" .. sub .. "_base", "F32", { dv.mix_hc })
    add(list, p .. "hc_" .. sub .. "_scale", "F32", { 3 }) -- pre, post and comb scales (SPEC §5)
  end

  -- attention (SPEC §2.3, §6.1–6.8)
  add(list, p .. "attn.attn_sink", "F32", { d.n_heads })
  add_linear(list, cfg, p .. "attn.wq_a", d.q_lora_rank, d.dim, f.linear)
  add(list, p .. "attn.q_norm.weight", "BF16", { d.q_lora_rank })
  add_linear(list, cfg, p .. "attn.wq_b", d.n_heads * d.head_dim, d.q_lora_rank, f.linear)
  add_linear(list, cfg, p .. "attn.wkv", d.head_dim, d.dim, f.linear)
  add(list, p .. "attn.kv_norm.weight", "BF16", { d.head_dim })
  add_linear(list, cfg, p .. "attn.wo_a", dv.o_width, dv.group_width, f.linear)
  add_linear(list, cfg, p .. "attn.wo_b", d.dim, dv.o_width, f.linear)
  if layer.kind ~= "window" then
    add_compressor(list, cfg, p .. "attn.compressor.", layer, d.head_dim)
  end
  if layer.indexer then
    add_linear(list, cfg, p .. "attn.indexer.wq_b", d.index_n_heads * d.index_head_dim, d.q_lora_rank, f.linear)
    add(list, p .. "attn.indexer.weights_proj.weight", "BF16", { d.index_n_heads, d.dim })
    add_compressor(list, cfg, p .. "attn.indexer.compressor.", layer, d.index_head_dim)
  end

  -- MoE (SPEC §2.3, §7): the gate, then a bias (learned) or a token→experts table (hash)
  add(list, p .. "ffn.gate.weight", "BF16", { d.n_routed_experts, d.dim })
  if layer.has_gate_bias then
    add(list, p .. "ffn.gate.bias", "F32", { d.n_routed_experts })
  else
    add(list, p .. "ffn.gate.tid2eid", "I64", { d.vocab, d.n_activated_experts }, "row")
  end
  local experts = p .. "ffn.experts.{e}."
  add_linear(list, cfg, experts .. "w1", d.moe_inter_dim, d.dim, f.expert, "activated", d.n_routed_experts)
  add_linear(list, cfg, experts .. "w3", d.moe_inter_dim, d.dim, f.expert, "activated", d.n_routed_experts)
  add_linear(list, cfg, experts .. "w2", d.dim, d.moe_inter_dim, f.expert, "activated", d.n_routed_experts)
  -- the shared expert has the routed experts' width (SPEC §1.1) and the linear format
  add_linear(list, cfg, p .. "ffn.shared_experts.w1", d.moe_inter_dim, d.dim, f.linear)
  add_linear(list, cfg, p .. "ffn.shared_experts.w3", d.moe_inter_dim, d.dim, f.linear)
  add_linear(list, cfg, p .. "ffn.shared_experts.w2", d.dim, d.moe_inter_dim, f.linear)
  return list
end

-- What an MTP block has beyond a block (SPEC §2.5); it shares embed and head with the main model.
local function mtp_extra_tensors(cfg, layer)
  local d, p, list = cfg.dims, layer.prefix, {}
  add_linear(list, cfg, p .. "e_proj", d.dim, d.dim, cfg.formats.linear)
  add_linear(list, cfg, p .. "h_proj", d.dim, d.dim, cfg.formats.linear)
  for _, norm in ipairs({ "enorm", "hnorm", "norm" }) do add(list, p .. norm .. ".weight", "BF16", { d.dim }) end
  add(list, p .. "hc_head_fn", "F32", { d.hc_mult, cfg.derived.hc_dim })
  add(list, p .. "hc_head_base", "F32", { d.hc_mult })
  add(list, p .. "hc_head_scale", "F32", { 1 })
  return list
end

local function embed_tensors(cfg)
  local list = {}
  -- a decoded token reads its own row, unless the head is this same matrix
  add(list, "embed.weight", "BF16", { cfg.dims.vocab, cfg.dims.dim },
      cfg.dims.tie_word_embeddings and "whole" or "row")
  return list
end

-- The LM head, which MTP shares (SPEC §2.2); a tied head is the embedding, read whole.
local function lm_head_tensors(cfg)
  local d, list = cfg.dims, {}
  if not d.tie_word_embeddings then add(list, "head.weight", "BF16", { d.vocab, d.dim }) end
  return list
end

-- The main model's end: HC collapse, final norm and LM head (SPEC §2.2, §4 steps 4–6).
local function head_tensors(cfg)
  local d, list = cfg.dims, lm_head_tensors(cfg)
  add(list, "hc_head_fn", "F32", { d.hc_mult, cfg.derived.hc_dim })
  add(list, "hc_head_base", "F32", { d.hc_mult })
  add(list, "hc_head_scale", "F32", { 1 })
  add(list, "norm.weight", "BF16", { d.dim })
  return list
end

local function tensor_bytes(t)
  local n = DTYPE_BYTES[t.dtype] * t.count
  for _, size in ipairs(t.shape) do n = n * size end
  return n
end

-- bytes of t one decoded token reads at batch 1 (SPEC §11.2)
local function tensor_read_bytes(cfg, t)
  local bytes = tensor_bytes(t)
  if t.decode == "row" then return bytes // t.shape[1] end
  if t.decode == "activated" then return bytes // t.count * cfg.dims.n_activated_experts end
  return bytes
end

local function sum(cfg, list, read)
  local total = 0
  for _, t in ipairs(list) do total = total + (read and tensor_read_bytes(cfg, t) or tensor_bytes(t)) end
  return total
end

-- The model as pipeline parts in forward order: {name, tensors, layer (for blocks)}.
local function parts(cfg, with_mtp)
  local list = { { name = "embed", tensors = embed_tensors(cfg) } }
  for _, layer in ipairs(cfg.layers) do
    list[#list + 1] = { name = "layers." .. layer.id, tensors = block_tensors(cfg, layer), layer = layer }
  end
  list[#list + 1] = { name = "head", tensors = head_tensors(cfg) }
  if with_mtp then
    for k, layer in ipairs(cfg.mtp) do
      local tensors = block_tensors(cfg, layer)
      for _, t in ipairs(mtp_extra_tensors(cfg, layer)) do tensors[#tensors + 1] = t end
      list[#list + 1] = { name = "mtp." .. (k - 1), tensors = tensors, layer = layer }
    end
  end
  return list
end

--- Every checkpoint tensor of the model (MTP included when with_mtp), in forward order, as
--- {name, dtype, shape, count, decode} (see above; expand "{e}" for count > 1).
function memory.tensors(cfg, with_mtp)
  local all = {}
  for _, part in ipairs(parts(cfg, with_mtp)) do
    for _, t in ipairs(part.tensors) do all[#all + 1] = t end
  end
  return all
end

-- ---- KV cache and compressor state (SPEC §6.3, §11.1) ----

-- Bytes of one cached latent and of one indexer key in a layout.
local function entry_bytes(cfg, layout)
  local d = cfg.dims
  if layout == "reference" then return 2 * d.head_dim, 2 * d.index_head_dim end
  -- native: no-rope dims as e4m3 with an e8m0 scale per 64 (the Q8 round trip of SPEC §6.2), rope
  -- dims bf16, padded to 8 bytes like vLLM (583 → 584 for Flash); the indexer key as the Q4 round
  -- trip stores it: e2m1 pairs and an e8m0 per 32 (SPEC §6.5), 68 bytes for Flash
  local latent = d.nope_dim + 2 * d.rope_dim + ceil_div(d.nope_dim, 64)
  return ceil_div(latent, 8) * 8, d.index_head_dim // 2 + d.index_head_dim // 32
end

-- One layer's cache for one sequence: {per_token, fixed, bytes (at context), read (per decoded token)}.
local function layer_kv(cfg, layer, layout, context)
  local d = cfg.dims
  local latent, key = entry_bytes(cfg, layout)
  -- every layer keeps a ring of the last `window` latents (SPEC §6.3)
  local kv = { per_token = 0, fixed = d.window * latent, stored = 0, read = math.min(context, d.window) * latent }
  if layer.kind ~= "window" then
    local r, coff = layer.ratio, layer.coff
    local entries = ceil_div(context, r)  -- allocated, the last window possibly incomplete
    local visible = context // r          -- complete windows a decoded token may attend (SPEC §6.4)
    -- kv_state and score_state, fp32 [coff·r, coff·d] each (SPEC §6.3)
    local function state(width) return 2 * (coff * r) * (coff * width) * 4 end
    kv.per_token = latent / r
    kv.fixed = kv.fixed + state(d.head_dim)
    kv.stored = entries * latent
    if layer.indexer then
      kv.per_token = kv.per_token + key / r
      kv.fixed = kv.fixed + state(d.index_head_dim)
      kv.stored = kv.stored + entries * key
      -- the indexer scores every visible key, then attention reads its top-k latents (SPEC §6.6)
      kv.read = kv.read + visible * key + math.min(d.index_topk, visible) * latent
    else
      kv.read = kv.read + visible * latent
    end
  end
  kv.bytes = kv.fixed + kv.stored
  return kv
end

-- ---- the estimate ----

-- Indices where each device's run of parts ends: device k ends at the part boundary whose running
-- weight total is nearest k/n of the whole, every device keeping at least one part.
local function split_points(weights, devices)
  local running, total = {}, 0
  for i, w in ipairs(weights) do total = total + w; running[i] = total end
  local ends, previous = {}, 0
  for k = 1, devices - 1 do
    local target = total * k / devices
    local best = previous + 1
    for i = previous + 1, #weights - (devices - k) do
      if math.abs(running[i] - target) < math.abs(running[best] - target) then best = i end
    end
    ends[k], previous = best, best
  end
  ends[devices] = #weights
  return ends
end

local LAYOUTS = { reference = true, native = true }

function memory.estimate(cfg, opts)
  opts = opts or {}
  local context = opts.context or 0
  local layout = opts.layout or "reference"
  local with_mtp = opts.mtp or false
  local devices = opts.devices or 1
  if math.type(context) ~= "integer" or context < 0 then
    error("dsv4.memory.estimate: context must be an integer >= 0, got " .. tostring(context), 2)
  end
  if not LAYOUTS[layout] then
    error("dsv4.memory.estimate: layout must be \"reference\" or \"native\", got " .. tostring(layout), 2)
  end
  if type(with_mtp) ~= "boolean" then
    error("dsv4.memory.estimate: mtp must be true or false, got " .. tostring(with_mtp), 2)
  end
  local model = parts(cfg, with_mtp)
  if math.type(devices) ~= "integer" or devices < 1 or devices > #model then
    error(string.format("dsv4.memory.estimate: devices must be an integer from 1 to %d (the pipeline parts), got %s",
                        #model, tostring(devices)), 2)
  end

  local e = {
    context = context, layout = layout, mtp = with_mtp, devices = devices,
    weight_bytes = 0, kv_bytes_per_token = 0, kv_fixed_bytes = 0, kv_bytes = 0, kv_read_bytes = 0,
    by_kind = {},
  }
  for _, kind in ipairs({ "window", "csa", "hca" }) do
    e.by_kind[kind] = { layers = 0, weight_bytes = 0, kv_bytes_per_token = 0, kv_fixed_bytes = 0, kv_bytes = 0,
                        kv_read_bytes = 0 }
  end
  local part_weights, part_kv = {}, {}
  for i, part in ipairs(model) do
    part_weights[i] = sum(cfg, part.tensors)
    part_kv[i] = 0
    e.weight_bytes = e.weight_bytes + part_weights[i]
    if part.layer then
      local kv = layer_kv(cfg, part.layer, layout, context)
      part_kv[i] = kv.bytes
      local group = e.by_kind[part.layer.kind]
      for _, totals in ipairs({ e, group }) do
        totals.kv_bytes_per_token = totals.kv_bytes_per_token + kv.per_token
        totals.kv_fixed_bytes = totals.kv_fixed_bytes + kv.fixed
        totals.kv_bytes = totals.kv_bytes + kv.bytes
        totals.kv_read_bytes = totals.kv_read_bytes + kv.read
      end
      group.layers = group.layers + 1
      group.weight_bytes = group.weight_bytes + part_weights[i]
    end
  end

  e.weight_bytes_per_device, e.kv_bytes_per_device, e.device_parts = {}, {}, {}
  local first = 1
  for k, last in ipairs(split_points(part_weights, devices)) do
    local weight, kv, names = 0, 0, {}
    for i = first, last do
      weight, kv = weight + part_weights[i], kv + part_kv[i]
      names[#names + 1] = model[i].name
    end
    e.weight_bytes_per_device[k], e.kv_bytes_per_device[k], e.device_parts[k] = weight, kv, names
    first = last + 1
  end
  return e
end

--- Weight bytes one decoded token reads at batch 1, main model (SPEC §11.2): every weight whole,
--- except n_activated_experts of the routed experts, one embedding row and one tid2eid row. Returns
--- the total and {layers = array by cfg.layers index, global = embedding row + HC head + final
--- norm + LM head, mtp_step = one draft step of the first MTP block: its block and projections,
--- one embedding row and the shared LM head (SPEC §8.1, §8.4); nil without MTP}.
function memory.decode_weight_bytes(cfg)
  local embedding_row = sum(cfg, embed_tensors(cfg), true)
  local detail = { layers = {}, global = embedding_row + sum(cfg, head_tensors(cfg), true) }
  local total = detail.global
  for i, layer in ipairs(cfg.layers) do
    detail.layers[i] = sum(cfg, block_tensors(cfg, layer), true)
    total = total + detail.layers[i]
  end
  local draft = cfg.mtp[1]
  if draft then
    detail.mtp_step = embedding_row + sum(cfg, lm_head_tensors(cfg), true)
                      + sum(cfg, block_tensors(cfg, draft), true) + sum(cfg, mtp_extra_tensors(cfg, draft), true)
  end
  return total, detail
end

--- bytes for people: "812 B", "73.0 KiB", "28.4 MiB", "3.45 GiB" (binary units, three digits).
function memory.format(bytes)
  local units = { "B", "KiB", "MiB", "GiB", "TiB", "PiB" }
  local value, unit = bytes, 1
  while math.abs(value) >= 1024 and unit < #units do value, unit = value / 1024, unit + 1 end
  if unit == 1 then return string.format("%d B", math.floor(value)) end
  local digits = math.abs(value) >= 100 and 0 or math.abs(value) >= 10 and 1 or 2
  return string.format("%." .. digits .. "f %s", value, units[unit])
end

return memory
