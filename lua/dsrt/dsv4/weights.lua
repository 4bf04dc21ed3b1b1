-- dsrt.dsv4.weights — a DeepSeek-V4 checkpoint bound to per-layer weight sets, in native formats.
--
--   local weights = require "dsrt.dsv4.weights"
--   local cfg, w = weights.load("model_dir", {device = "cuda"})   -- config + safetensors + bind
--   local w = weights.bind(cfg, dsrt.safetensors.open("model_dir"), {device = "cpu", mtp = false})
--   local w = weights.random(cfg, {device = "cuda", seed = 1})     -- same structure, no files
--   weights.save("out_dir", raw_config, tensors, {shards = 2})     -- an official-format folder
--   local f32 = weights.dequantise(w.layers[1].attn.wo_a)         -- reference f32 copy of a linear
--
-- What it protects:
--   - A checkpoint is checked whole before anything is used: every tensor memory.tensors expects
--     for the config (the one list of names, dtypes and stored shapes, SPEC §2) is there with its
--     shape and dtype, nothing unexpected is there, and the values the runtime indexes with are in
--     range. All problems come in ONE error, sorted and counted by kind (missing, unexpected, wrong
--     shape, wrong dtype, bad values), so a wrong or half-copied checkpoint is diagnosed in one
--     run, not one tensor per run.
--   - Weights stay in their native formats, never dequantised copies: FP8 e4m3 + per-128×128 scales,
--     FP4 e2m1 codes + e8m0 per 32 inputs, bf16, f32 (SPEC §2.1). The format of each linear is read
--     from its dtypes, so a checkpoint with plain bf16 linears and no quantization_config binds too.
--   - Names match the official checkpoint (SPEC §2) level by level, so the layer constructors take
--     their pieces from here without a translation table.
--   - Placement on a GPU is one dsrt.upload call (label "weights": pinned staging, reading and DMA
--     overlapped, a progress bar), in file order so a cold read is sequential.
--
-- Accepted beyond the config's own dtypes (each a real variant):
--   - ffn.gate.tid2eid as I64 (the checkpoint) or I32; kept as i32 (ids < n_routed_experts, the
--     conversion is exact, SPEC §2.1), every value checked to be in [0, n_routed_experts).
--   - any FP8 weight's `.scale` as F8_E8M0 (Flash) or F32 (Flash-Base, SPEC §1.4: power-of-two
--     values stored as f32; the config cannot say whether only the experts' or all scales are).
--     F32 scales are checked, every one of them, to be exact powers of two that e8m0 can hold
--     (round trip through e8m0 unchanged; negative, zero, NaN and infinity fail): the kernels
--     convert them to e8m0 or use them as exponents. This costs ~30 µs per scale tensor on the CPU
--     (≈1 s for Flash-Base's 33k expert scales), small next to reading 160 GB. e8m0 scales are not
--     scanned (8.9 GB for Flash): their only invalid byte, 0xFF (NaN), no exporter writes.
--
-- The weight set (`w`), Lua arrays 1-based as cfg.layers/cfg.mtp (w.layers[i] is official
-- layers.{i-1}., w.layers[i].ffn.experts[e] is experts.{e-1}.):
--   w.device, w.mtp_bound (whether mtp.* was bound), w.tensors (official name -> tensor as
--   placed: stored dtype and shape, FP4 experts as i8 [out, in/2], tid2eid as i32)
--   w.embed, w.head (the embed tensor when tie_word_embeddings), w.norm, w.hc_head = {fn, base, scale}
--   w.layers[i] = block:
--     attn_norm, ffn_norm                                 norm weights (bf16 tensors)
--     hc_attn = {fn, base, scale}, hc_ffn = {fn, base, scale}
--     attn = {attn_sink, wq_a, q_norm, wq_b, wkv, kv_norm, wo_a, wo_b,
--             compressor = {wkv, wgate, ape, norm} (ratio > 0, else nil),
--             indexer = {wq_b, weights_proj, compressor = {wkv, wgate, ape, norm}} (csa, else nil)}
--     ffn = {gate = {weight, bias (learned routing) or tid2eid (hash routing)},
--            experts = {[e] = {w1, w2, w3}}, shared_experts = {w1, w2, w3}}
--   w.mtp[k] = block plus e_proj, h_proj (linears), enorm, hnorm, norm, hc_head = {fn, base, scale}
-- Every linear (a `.weight` of a Linear in the reference, with its `.scale`) is
--   {weight =, scale =, format =, block =}: format "fp8" (weight f8e4m3 [out, in], scale f8e8m0 or
--   f32 [ceil(out/128), ceil(in/128)], block {128, 128} = cfg.formats.fp8_block), "fp4" (weight
--   fp4e2m1 [out, in], the I8 bytes read as codes, scale f8e8m0 [out, in/32], block {1, 32}) or
--   "bf16" (weight bf16 [out, in], scale and block nil). block = {rows, cols} one scale covers.
local dsrt = require "dsrt"
local cjson = require "cjson"
local config = require "dsrt.dsv4.config"
local memory = require "dsrt.dsv4.memory"
local random = require "dsrt.dsv4.random"

local weights = {}

-- dsrt's dtype name of each safetensors dtype memory.tensors uses
local STORED_DTYPE = { BF16 = "bf16", F32 = "f32", F8_E4M3 = "f8e4m3", F8_E8M0 = "f8e8m0", I8 = "i8", I64 = "i64" }
local FORMAT_OF_WEIGHT = { f8e4m3 = "fp8", i8 = "fp4", bf16 = "bf16" }
local LISTED_PER_KIND = 20
local MTP_PREFIX = "mtp."

-- ---- the checkpoint as a source of tensors ----

-- A safetensors handle, or a table {name = tensor} (random weights, tests), behind one interface:
-- names() sorted, info(name) -> {dtype, shape, file?, offset?}, get(name).
local function as_source(source)
  if type(source) ~= "table" then
    error("dsv4.weights.bind: source must be a safetensors handle or a table of tensors, got " .. type(source), 3)
  end
  if type(source.names) == "function" then
    return {
      description = source.path or tostring(source),
      names = function() return source:names() end,
      info = function(name) return source:info(name) end,
      get = function(name) return source:get(name) end,
    }
  end
  local names = {}
  for name, t in pairs(source) do
    if not dsrt.is_tensor(t) then
      error(string.format("dsv4.weights.bind: '%s' is a %s, not a tensor", tostring(name), type(t)), 3)
    end
    names[#names + 1] = name
  end
  table.sort(names)
  return {
    description = "the tensors given",
    names = function() return names end,
    info = function(name) return { dtype = source[name].dtype, shape = source[name].shape } end,
    get = function(name) return source[name] end,
  }
end

-- "cuda" is device 0, as tensors name it
local function device_name(device)
  if device == "cuda" then return "cuda:0" end
  if math.type(device) == "integer" then return "cuda:" .. device end
  return device
end

-- ---- what the config expects ----

-- Every tensor name with its dtype and shape, expanded from memory.tensors ("{e}" per expert), and
-- the dtypes accepted for it (see the top of the file).
local function expected_tensors(cfg, with_mtp)
  local list, by_name = {}, {}
  local entries = memory.tensors(cfg, with_mtp)
  local weight_dtype = {}
  for _, entry in ipairs(entries) do weight_dtype[entry.name] = entry.dtype end
  for _, entry in ipairs(entries) do
    local dtype = STORED_DTYPE[entry.dtype]
    local accepted = { [dtype] = true }
    if entry.name:match("%.tid2eid$") then accepted.i32 = true end
    if entry.name:match("%.scale$") and weight_dtype[entry.name:gsub("%.scale$", ".weight")] == "F8_E4M3" then
      accepted.f8e8m0, accepted.f32 = true, true
    end
    for e = 1, entry.count do
      local name = entry.count == 1 and entry.name or entry.name:gsub("{e}", tostring(e - 1))
      local expected = { name = name, shape = entry.shape, accepted = accepted }
      list[#list + 1], by_name[name] = expected, expected
    end
  end
  return list, by_name
end

-- Whether to bind mtp.*: opts.mtp, else when the config has MTP layers and the source has them.
local function resolve_mtp(cfg, names, requested)
  if requested == true and #cfg.mtp == 0 then
    error("dsv4.weights.bind: mtp = true, but the config has no MTP layers (num_nextn_predict_layers = 0)", 3)
  end
  if requested ~= nil then return requested end
  if #cfg.mtp == 0 then return false end
  for _, name in ipairs(names) do
    if name:sub(1, #MTP_PREFIX) == MTP_PREFIX then return true end
  end
  return false
end

-- ---- collecting problems ----

local PROBLEM_KINDS = {
  { key = "missing", title = "missing" },
  { key = "unexpected", title = "unexpected" },
  { key = "shape", title = "wrong shape" },
  { key = "dtype", title = "wrong dtype" },
  { key = "values", title = "bad values" },
}

local function shape_text(shape) return "[" .. table.concat(shape, ", ") .. "]" end

local function same_shape(a, b)
  if #a ~= #b then return false end
  for i = 1, #a do
    if a[i] ~= b[i] then return false end
  end
  return true
end

local function accepted_text(accepted)
  local list = {}
  for dtype in pairs(accepted) do list[#list + 1] = dtype end
  table.sort(list)
  return table.concat(list, " or ")
end

-- One message for every problem: per kind, a count and at most LISTED_PER_KIND sorted entries.
local function problem_report(problems, source, cfg)
  local lines, total = {}, 0
  for _, kind in ipairs(PROBLEM_KINDS) do
    local list = problems[kind.key]
    if #list > 0 then
      table.sort(list)
      total = total + #list
      local shown = table.move(list, 1, math.min(#list, LISTED_PER_KIND), 1, {})
      local more = #list > LISTED_PER_KIND and string.format(", and %d more", #list - LISTED_PER_KIND) or ""
      lines[#lines + 1] = string.format("  %s (%d): %s%s", kind.title, #list, table.concat(shown, ", "), more)
    end
  end
  if total == 0 then return nil end
  return string.format("dsv4.weights: %s against the config %s: %d problem%s\n%s", source.description,
                       cfg.source, total, total == 1 and "" or "s", table.concat(lines, "\n"))
end

-- Values the runtime relies on, of a tensor already known to have the right shape and dtype.
local function value_problem(cfg, name, t)
  if name:match("%.tid2eid$") then
    local low, high = t:min():item(), t:max():item()
    local n = cfg.dims.n_routed_experts
    if low < 0 or high >= n then
      return string.format("%s holds expert ids from %d to %d, outside [0, %d)", name, low, high, n)
    end
  elseif name:match("%.scale$") and t.dtype == "f32" then
    local round_trip <close> = t:to("f8e8m0"):to("f32")
    local differ <close> = round_trip:ne(t)
    local bad = differ:sum():item()
    if bad > 0 then
      return string.format("%s has %d f32 scale%s that are not powers of two e8m0 can hold", name, bad,
                           bad == 1 and "" or "s")
    end
  end
end

-- ---- placing ----

-- The tensors on `device`: the CPU ones through one dsrt.upload, in file order when the source
-- knows it (a cold page cache then reads sequentially); others moved with :to.
local function place(stored, order, device, progress)
  if device == "cpu" then
    for name, t in pairs(stored) do
      if t.device ~= "cpu" then stored[name] = t:to("cpu") end
    end
    return stored
  end
  local host_names, host_tensors = {}, {}
  for _, name in ipairs(order) do
    local t = stored[name]
    if t.device == "cpu" then
      host_names[#host_names + 1], host_tensors[#host_tensors + 1] = name, t
    elseif t.device ~= device then
      stored[name] = t:to(device)
    end
  end
  if #host_tensors > 0 then
    local on_device = dsrt.upload(host_tensors, device, { label = "weights", progress = progress })
    for i, name in ipairs(host_names) do stored[name] = on_device[i] end
  end
  return stored
end

-- ---- the structure ----

-- Builds the weight set from placed tensors, taking each exactly once; a tensor left over means
-- memory.tensors lists something this function does not place, a bug caught here, not later.
local function assemble(cfg, with_mtp, placed)
  local taken = {}
  local function take(name)
    local t = placed[name]
    if t == nil then error("dsv4.weights: internal: no tensor " .. name .. " to place", 0) end
    taken[name] = true
    return t
  end
  local f = cfg.formats
  local function linear(name)
    local weight = take(name .. ".weight")
    local format = FORMAT_OF_WEIGHT[weight.dtype]
    if format == "bf16" then return { weight = weight, format = format } end
    if format == "fp4" then
      return { weight = weight:bitcast("fp4e2m1"), scale = take(name .. ".scale"), format = format,
               block = { 1, f.fp4_block } }
    end
    return { weight = weight, scale = take(name .. ".scale"), format = format, block = f.fp8_block }
  end
  local function hc(prefix)
    return { fn = take(prefix .. "fn"), base = take(prefix .. "base"), scale = take(prefix .. "scale") }
  end
  local function compressor(prefix)
    return { wkv = linear(prefix .. "wkv"), wgate = linear(prefix .. "wgate"), ape = take(prefix .. "ape"),
             norm = take(prefix .. "norm.weight") }
  end
  local function swiglu(prefix)
    return { w1 = linear(prefix .. "w1"), w2 = linear(prefix .. "w2"), w3 = linear(prefix .. "w3") }
  end
  local function block(layer)
    local p, d = layer.prefix, cfg.dims
    local attn = {
      attn_sink = take(p .. "attn.attn_sink"),
      wq_a = linear(p .. "attn.wq_a"), q_norm = take(p .. "attn.q_norm.weight"), wq_b = linear(p .. "attn.wq_b"),
      wkv = linear(p .. "attn.wkv"), kv_norm = take(p .. "attn.kv_norm.weight"),
      wo_a = linear(p .. "attn.wo_a"), wo_b = linear(p .. "attn.wo_b"),
    }
    if layer.kind ~= "window" then attn.compressor = compressor(p .. "attn.compressor.") end
    if layer.indexer then
      attn.indexer = { wq_b = linear(p .. "attn.indexer.wq_b"), weights_proj = linear(p .. "attn.indexer.weights_proj"),
                       compressor = compressor(p .. "attn.indexer.compressor.") }
    end
    local gate = { weight = take(p .. "ffn.gate.weight") }
    if layer.has_gate_bias then gate.bias = take(p .. "ffn.gate.bias") else gate.tid2eid = take(p .. "ffn.gate.tid2eid") end
    local experts = {}
    for e = 1, d.n_routed_experts do experts[e] = swiglu(p .. "ffn.experts." .. (e - 1) .. ".") end
    return {
      attn_norm = take(p .. "attn_norm.weight"), ffn_norm = take(p .. "ffn_norm.weight"),
      hc_attn = hc(p .. "hc_attn_"), hc_ffn = hc(p .. "hc_ffn_"),
      attn = attn,
      ffn = { gate = gate, experts = experts, shared_experts = swiglu(p .. "ffn.shared_experts.") },
    }
  end

  local w = { tensors = placed, mtp_bound = with_mtp, layers = {}, mtp = {} }
  w.embed = take("embed.weight")
  w.head = cfg.dims.tie_word_embeddings and w.embed or take("head.weight")
  w.norm = take("norm.weight")
  w.hc_head = hc("hc_head_")
  for i, layer in ipairs(cfg.layers) do w.layers[i] = block(layer) end
  if with_mtp then
    for k, layer in ipairs(cfg.mtp) do
      local b, p = block(layer), layer.prefix
      b.e_proj, b.h_proj = linear(p .. "e_proj"), linear(p .. "h_proj")
      b.enorm, b.hnorm, b.norm = take(p .. "enorm.weight"), take(p .. "hnorm.weight"), take(p .. "norm.weight")
      b.hc_head = hc(p .. "hc_head_")
      w.mtp[k] = b
    end
  end
  for name in pairs(placed) do
    if not taken[name] then error("dsv4.weights: internal: tensor " .. name .. " was not placed in the structure", 0) end
  end
  return w
end

-- ---- binding ----

--- Checks `source` (a safetensors handle, or a table {name = tensor}) against cfg and returns the
--- weight set (see the top of the file). opts: device ("cpu" default: views of the file mapping,
--- which keep it alive; "cuda" / "cuda:N": one dsrt.upload), mtp (default: bind mtp.* when the
--- config has MTP layers and the source has them; false ignores mtp.* tensors), progress (false
--- silences the upload's progress bar).
function weights.bind(cfg, source, opts)
  opts = opts or {}
  source = as_source(source)
  local device = device_name(opts.device or "cpu")
  local names = source.names()
  local with_mtp = resolve_mtp(cfg, names, opts.mtp)
  local expected, expected_by_name = expected_tensors(cfg, with_mtp)

  local problems = { missing = {}, unexpected = {}, shape = {}, dtype = {}, values = {} }
  local present = {}
  for _, name in ipairs(names) do
    present[name] = true
    if not expected_by_name[name] and not (not with_mtp and name:sub(1, #MTP_PREFIX) == MTP_PREFIX) then
      table.insert(problems.unexpected, name)
    end
  end
  local stored, order = {}, {}
  for _, want in ipairs(expected) do
    local name = want.name
    if not present[name] then
      table.insert(problems.missing, name)
    else
      local info = source.info(name)
      local ok = true
      if not same_shape(info.shape, want.shape) then
        table.insert(problems.shape, string.format("%s %s (expected %s)", name, shape_text(info.shape), shape_text(want.shape)))
        ok = false
      end
      if not want.accepted[info.dtype] then
        table.insert(problems.dtype, string.format("%s %s (expected %s)", name, info.dtype, accepted_text(want.accepted)))
        ok = false
      end
      if ok then
        local t = source.get(name)
        local bad = value_problem(cfg, name, t)
        if bad then table.insert(problems.values, bad) end
        if t.dtype == "i64" then t = t:to("i32") end -- tid2eid, in range, so exact
        stored[name] = t
        order[#order + 1] = { name = name, file = info.file or "", offset = info.offset or 0 }
      end
    end
  end
  local report = problem_report(problems, source, cfg)
  if report then error(report, 0) end

  table.sort(order, function(a, b)
    if a.file ~= b.file then return a.file < b.file end
    if a.offset ~= b.offset then return a.offset < b.offset end
    return a.name < b.name
  end)
  local order_names = {}
  for i, o in ipairs(order) do order_names[i] = o.name end
  local w = assemble(cfg, with_mtp, place(stored, order_names, device, opts.progress))
  w.device = device
  return w
end

--- config.load(path) + safetensors.open(path) + bind: returns cfg, weights. On a GPU the file
--- mapping is released once the upload is done; CPU tensors keep it alive themselves.
function weights.load(path, opts)
  local cfg = config.load(path)
  local st = dsrt.safetensors.open(path)
  local ok, w = pcall(weights.bind, cfg, st, opts)
  if not ok or w.device ~= "cpu" then st:close() end
  if not ok then error(w, 0) end
  return cfg, w
end

--- Deterministic random weights of any config (dsrt.dsv4.random: magnitudes, seeding), generated on
--- opts.device and bound like a checkpoint. opts: device, seed, mtp (default: when the config has
--- MTP layers).
function weights.random(cfg, opts)
  opts = opts or {}
  return weights.bind(cfg, random.tensors(cfg, opts), { device = opts.device, mtp = opts.mtp })
end

--- A linear's weight dequantised to f32 (or `dtype`), [out, in], on its device: e4m3 or e2m1 codes
--- times their block scales (SPEC §2.1). A reference for tests and for the bf16 wo_a the reference
--- model runs (SPEC §6.8); the weight set itself never holds such copies.
function weights.dequantise(lin, dtype)
  local w = lin.weight:to("f32")
  if lin.format ~= "bf16" then
    local out_features, in_features = w.shape[1], w.shape[2]
    local s = lin.scale:to("f32")
    local rows, cols = s.shape[1], s.shape[2]
    local block_rows, block_cols = lin.block[1], lin.block[2]
    local expanded = s:view(rows, 1, cols, 1):expand(rows, block_rows, cols, block_cols)
                      :reshape(rows * block_rows, cols * block_cols)
                      :narrow(1, 1, out_features):narrow(2, 1, in_features)
    w = w * expanded
  end
  return dtype and w:to(dtype) or w
end

-- ---- writing an official-format folder ----

-- JSON with keys sorted and two-space indents, like a published config.json, and the same bytes
-- every run (lua-cjson follows Lua's table order, which varies between runs). Whole numbers are
-- written as integers (lua-cjson decodes every number as a float, so a config read and written
-- back keeps "hidden_size": 4096), others with the fewest digits that read back exactly.
local function json_number(v)
  if v ~= v or v == math.huge or v == -math.huge then error("dsv4.weights.save: JSON has no " .. tostring(v), 0) end
  local whole = math.tointeger(v)
  if whole then return string.format("%d", whole) end
  for digits = 15, 17 do
    local text = string.format("%." .. digits .. "g", v)
    if tonumber(text) == v then return text end
  end
end

local function json_encode(value, indent)
  indent = indent or ""
  local kind = type(value)
  if value == cjson.null then return "null" end
  if kind == "string" then return cjson.encode(value) end
  if kind == "number" then return json_number(value) end
  if kind == "boolean" then return tostring(value) end
  if kind ~= "table" then error("dsv4.weights.save: cannot write a " .. kind .. " as JSON", 0) end
  local inner, parts = indent .. "  ", {}
  if #value > 0 or next(value) == nil then
    for i, v in ipairs(value) do parts[i] = inner .. json_encode(v, inner) end
    if #parts == 0 then return "[]" end
    return "[\n" .. table.concat(parts, ",\n") .. "\n" .. indent .. "]"
  end
  local keys = {}
  for k in pairs(value) do keys[#keys + 1] = k end
  table.sort(keys)
  for i, k in ipairs(keys) do parts[i] = inner .. cjson.encode(k) .. ": " .. json_encode(value[k], inner) end
  return "{\n" .. table.concat(parts, ",\n") .. "\n" .. indent .. "}"
end

local function write_text(path, text)
  local f, err = io.open(path, "wb")
  if not f then error("dsv4.weights.save: " .. err, 0) end
  local ok, write_err = f:write(text)
  f:close()
  if not ok then error("dsv4.weights.save: " .. path .. ": " .. tostring(write_err), 0) end
end

--- Writes `tensors` ({official name = tensor as stored}, any device) into the existing folder
--- `dir` as a published checkpoint: config.json (raw_config, the JSON table), the tensors in
--- opts.shards files (default 1) model-0000k-of-0000n.safetensors cut at equal bytes in name order,
--- and model.safetensors.index.json. The same input gives the same bytes. Returns the file paths.
function weights.save(dir, raw_config, tensors, opts)
  opts = opts or {}
  local shards = opts.shards or 1
  local names, total = {}, 0
  for name, t in pairs(tensors) do
    names[#names + 1] = name
    total = total + t:nbytes()
  end
  table.sort(names)
  if math.type(shards) ~= "integer" or shards < 1 or shards > math.max(#names, 1) then
    error("dsv4.weights.save: shards must be an integer from 1 to the number of tensors, got " .. tostring(shards), 2)
  end
  write_text(dir .. "/config.json", json_encode(raw_config) .. "\n")
  local files, weight_map = { dir .. "/config.json" }, {}
  local shard, shard_tensors, written = 1, {}, 0
  local function flush()
    local file = string.format("model-%05d-of-%05d.safetensors", shard, shards)
    dsrt.safetensors.save(dir .. "/" .. file, shard_tensors, { format = "pt" })
    for name in pairs(shard_tensors) do weight_map[name] = file end
    files[#files + 1] = dir .. "/" .. file
    shard, shard_tensors = shard + 1, {}
  end
  for i, name in ipairs(names) do
    shard_tensors[name] = tensors[name]
    written = written + tensors[name]:nbytes()
    -- a shard ends once its running total reaches its share, leaving a tensor for each later one
    local remaining_names, remaining_shards = #names - i, shards - shard
    if shard < shards and (written >= total * shard / shards or remaining_names == remaining_shards) then flush() end
  end
  flush()
  local index = { metadata = { total_size = total }, weight_map = weight_map }
  write_text(dir .. "/model.safetensors.index.json", json_encode(index) .. "\n")
  files[#files + 1] = dir .. "/model.safetensors.index.json"
  return files
end

return weights
