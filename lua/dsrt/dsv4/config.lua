-- dsrt.dsv4.config — reads a DeepSeek-V4 config.json into one normalised description of the model.
--
--   local config = require "dsrt.dsv4.config"
--   local cfg = config.load("model_dir")            -- a folder holding config.json, or the file itself
--   local cfg = config.parse(decoded_table, "name") -- a table already decoded from JSON
--
-- What it protects: every later step (weight binding, caches, RoPE tables, routing, the memory
-- estimate) reads the model's shape from here and nowhere else, so the two ways the same model's
-- config is written (SPEC §1.3) cannot lead to two different models. The published config gives a
-- ratio per layer (`compress_ratios`, MTP entries included), `num_hash_layers`, a flat
-- `rope_scaling` and `qk_rope_head_dim`; a config re-saved by transformers drops those and carries
-- `layer_types`, `mlp_layer_types`, `compress_rates`, nested `rope_parameters {main, compress}` and
-- `partial_rotary_factor`. Both parse to the same table. A config that contradicts itself, or lacks
-- what the model needs, is refused with an error naming the key ("dsv4.config: <source>: <key>: …");
-- all missing keys are listed in one message. Keys this reader does not know are ignored.
--
-- The normalised table (`cfg`):
--   cfg.source             where the config came from (path or the name given to parse)
--   cfg.form               "published" (compress_ratios …) or "transformers" (layer_types …)
--   cfg.dims               the model's sizes and constants, reference names (SPEC §1.1):
--     vocab, dim, n_layers, n_mtp, n_heads, head_dim, rope_dim (trailing RoPE'd dims), nope_dim,
--     q_lora_rank, o_lora_rank, o_groups, window, index_n_heads, index_head_dim, index_topk,
--     n_routed_experts, n_shared_experts, n_activated_experts, moe_inter_dim, n_hash_layers,
--     score_func, route_scale, norm_topk_prob, swiglu_limit, hc_mult, hc_sinkhorn_iters, hc_eps,
--     norm_eps, rope_theta, compress_rope_theta (nil when no layer is compressed),
--     yarn = {factor, original_seq_len, beta_fast, beta_slow} or false,
--     max_position_embeddings (nil when absent), bos_id (nil when absent),
--     eos_ids (array, possibly empty), tie_word_embeddings
--   cfg.formats            how weights are stored (SPEC §2.1, §1.4):
--     quantized            true when the config has a quantization_config
--     linear               "fp8" or "bf16": attention wq_a/wq_b/wkv/wo_a/wo_b, indexer wq_b, shared
--                          experts, MTP e_proj/h_proj
--     expert               "fp4" (Flash), "fp8" (Flash-Base) or "bf16": the routed experts
--     fp8_block            {rows, cols} of one FP8 scale tile (128×128)
--     fp8_scale_dtype      "f8e8m0" (Flash) or "f32" (Flash-Base: power-of-two values stored as fp32)
--     fp4_block            32: input columns per e8m0 scale of an FP4 expert row
--     scale_fmt            "ue8m0" (power-of-two scales, activations included) or nil
--   cfg.derived            constants that follow from dims (SPEC §1.1 "Derived constants"):
--     mix_hc = (2+hc)·hc, hc_dim = hc·dim, softmax_scale = head_dim^-½,
--     index_scale = index_head_dim^-½ · index_n_heads^-½, heads_per_group = n_heads / o_groups,
--     group_width = heads_per_group·head_dim (wo_a input), o_width = o_groups·o_lora_rank (wo_b input)
--   cfg.layers[i], i = 1…n_layers, and cfg.mtp[k], k = 1…n_mtp, each a layer:
--     id             the official 0-based index: layers.{id}. for main layers; for MTP layers the
--                    reference's layer_id n_layers + k - 1, which indexes compress_ratios (SPEC §1.2)
--     prefix         the tensor-name prefix, "layers.{id}." or "mtp.{k-1}."
--     is_mtp         true for MTP layers
--     ratio          compression ratio: 0 = window only, otherwise any positive integer
--     kind           "window" (ratio 0), "csa" (compressed, overlapping windows + lightning indexer),
--                    "hca" (compressed, no overlap, no indexer)
--     indexer        kind == "csa"
--     coff           compressor width factor: 2 for csa (overlap), 1 for hca, 0 for window (no
--                    compressor)
--     rope           {theta, yarn}: theta and YaRN (the dims.yarn table, or false) of everything
--                    RoPE'd in the layer; layers with the same RoPE share one table
--     router         "hash" (tid2eid lookup) or "learned" (top-k of scores + bias)
--     has_gate_bias  router == "learned"
local cjson = require "cjson"

local config = {}

-- transformers' names of the attention kinds (SPEC §1.3) and its default rates for them
local LAYER_TYPE_KIND = {
  sliding_attention = "window",
  compressed_sparse_attention = "csa",
  heavily_compressed_attention = "hca",
}
local KIND_LAYER_TYPE = {}
for layer_type, kind in pairs(LAYER_TYPE_KIND) do KIND_LAYER_TYPE[kind] = layer_type end
local DEFAULT_COMPRESS_RATES = { compressed_sparse_attention = 4, heavily_compressed_attention = 128 }

-- The ratio the reference builds a lightning indexer and overlapping compressor windows for:
-- `Compressor.overlap = compress_ratio == 4` and `if self.compress_ratio == 4: self.indexer = …` in
-- inference/model.py (SPEC §6.5 "r = 4 with overlap", §6.6 "Lightning indexer (r = 4 layers)").
-- Every other positive ratio compresses without overlap and attends all its entries (SPEC §6.4).
local INDEXER_RATIO = 4

-- Keys both forms must have; a model-dependent value with no safe default, so none is guessed.
local REQUIRED = {
  "vocab_size", "hidden_size", "num_hidden_layers", "num_nextn_predict_layers", "num_attention_heads",
  "head_dim", "q_lora_rank", "o_lora_rank", "o_groups", "sliding_window", "index_n_heads",
  "index_head_dim", "index_topk", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
  "moe_intermediate_size", "scoring_func", "routed_scaling_factor", "swiglu_limit", "hc_mult",
  "hc_sinkhorn_iters", "hc_eps", "rms_norm_eps",
}
-- Facts each form states under its own key: one of each group must be there.
local REQUIRED_ONE_OF = {
  { "compress_ratios", "layer_types" },
  { "num_hash_layers", "mlp_layer_types" },
  { "qk_rope_head_dim", "partial_rotary_factor" },
  { "rope_theta", "rope_parameters.main.rope_theta" },
}

local SCORE_FUNCS = { softmax = true, sigmoid = true, sqrtsoftplus = true }

-- ---- reading typed values, with errors that name the key ----

local function fail(source, key, message, ...)
  error(string.format("dsv4.config: %s: %s: " .. message, source, key, ...), 0)
end

local function show(value)
  if value == nil then return "no value" end
  if type(value) == "string" then return string.format("%q", value) end
  if type(value) == "table" then return "a " .. (#value > 0 and "list" or "table") end
  return tostring(value)
end

-- A view of one JSON object or list, naming its values in messages: `prefix .. key` for an object's
-- keys, `prefix[i]` with the 0-based JSON index for a list's (Lua index i + 1), the way the file and
-- the layer ids count. JSON null reads as absent, as transformers writes null for unset keys.
local function reader(tbl, source, prefix)
  local r = { prefix = prefix or "" }

  function r.name(key)
    if math.type(key) == "integer" then return string.format("%s[%d]", r.prefix, key - 1) end
    return r.prefix .. key
  end

  function r.raw(key)
    local v = tbl[key]
    if v == cjson.null then return nil end
    return v
  end

  function r.has(key) return r.raw(key) ~= nil end

  function r.fail(key, message, ...) fail(source, r.name(key), message, ...) end

  -- an integer >= min (JSON numbers decode as floats; 43.0 reads as 43, 43.5 is refused)
  function r.integer(key, min, default)
    local v = r.raw(key)
    if v == nil and default ~= nil then return default end
    local i = type(v) == "number" and math.tointeger(v) or nil
    if i == nil or i < min then r.fail(key, "expected an integer >= %d, got %s", min, show(v)) end
    return i
  end

  -- a finite number > 0 (or >= 0 when zero_ok)
  function r.number(key, zero_ok, default)
    local v = r.raw(key)
    if v == nil and default ~= nil then return default end
    if type(v) ~= "number" or v ~= v or v == math.huge or v < 0 or (v == 0 and not zero_ok) then
      r.fail(key, "expected a number %s 0, got %s", zero_ok and ">=" or ">", show(v))
    end
    return v + 0.0
  end

  function r.boolean(key, default)
    local v = r.raw(key)
    if v == nil then return default end
    if type(v) ~= "boolean" then r.fail(key, "expected true or false, got %s", show(v)) end
    return v
  end

  function r.string(key)
    local v = r.raw(key)
    if v == nil then return nil end
    if type(v) ~= "string" then r.fail(key, "expected a string, got %s", show(v)) end
    return v
  end

  -- a JSON array (a Lua sequence) of any length, and a reader naming its elements
  function r.list(key)
    local v = r.raw(key)
    local n = type(v) == "table" and #v or 0
    local ok = type(v) == "table"
    if ok then
      for k in pairs(v) do
        if math.type(k) ~= "integer" or k < 1 or k > n then ok = false break end
      end
    end
    if not ok then r.fail(key, "expected a list, got %s", show(v)) end
    return v, reader(v, source, r.name(key))
  end

  -- a nested JSON object, read through its own reader (nil when absent)
  function r.object(key)
    local v = r.raw(key)
    if v == nil then return nil end
    if type(v) ~= "table" or (#v > 0) then r.fail(key, "expected an object, got %s", show(v)) end
    return reader(v, source, r.prefix .. key .. ".")
  end

  return r
end

-- ---- the parts of the config ----

-- Every required key that is absent, all in one message.
local function check_required(raw, source)
  local function present(path)
    local v = raw
    for part in path:gmatch("[^.]+") do
      if type(v) ~= "table" then return false end
      v = v[part]
    end
    return v ~= nil and v ~= cjson.null
  end
  local missing = {}
  for _, key in ipairs(REQUIRED) do
    if not present(key) then missing[#missing + 1] = key end
  end
  for _, group in ipairs(REQUIRED_ONE_OF) do
    local any = false
    for _, key in ipairs(group) do any = any or present(key) end
    if not any then missing[#missing + 1] = table.concat(group, " or ") end
  end
  if #missing > 0 then
    error(string.format("dsv4.config: %s: missing required keys: %s", source,
                        table.concat(missing, ", ")), 0)
  end
end

local function read_dims(r)
  local d = {}
  d.vocab = r.integer("vocab_size", 1)
  d.dim = r.integer("hidden_size", 1)
  d.n_layers = r.integer("num_hidden_layers", 1)
  d.n_mtp = r.integer("num_nextn_predict_layers", 0)
  d.n_heads = r.integer("num_attention_heads", 1)
  d.head_dim = r.integer("head_dim", 1)
  d.q_lora_rank = r.integer("q_lora_rank", 1)
  d.o_lora_rank = r.integer("o_lora_rank", 1)
  d.o_groups = r.integer("o_groups", 1)
  d.window = r.integer("sliding_window", 1)
  d.index_n_heads = r.integer("index_n_heads", 1)
  d.index_head_dim = r.integer("index_head_dim", 1)
  d.index_topk = r.integer("index_topk", 1)
  d.n_routed_experts = r.integer("n_routed_experts", 1)
  d.n_shared_experts = r.integer("n_shared_experts", 0)
  d.n_activated_experts = r.integer("num_experts_per_tok", 1)
  d.moe_inter_dim = r.integer("moe_intermediate_size", 1)
  d.score_func = r.string("scoring_func")
  d.route_scale = r.number("routed_scaling_factor")
  -- every score function but softmax renormalises the top-k weights in the reference (SPEC §1.1)
  d.norm_topk_prob = r.boolean("norm_topk_prob", d.score_func ~= "softmax")
  d.swiglu_limit = r.number("swiglu_limit", true) -- 0 = no clamp, as in the reference
  d.hc_mult = r.integer("hc_mult", 1)
  d.hc_sinkhorn_iters = r.integer("hc_sinkhorn_iters", 1)
  d.hc_eps = r.number("hc_eps")
  d.norm_eps = r.number("rms_norm_eps")
  if r.has("max_position_embeddings") then
    d.max_position_embeddings = r.integer("max_position_embeddings", 1)
  end
  if r.has("bos_token_id") then d.bos_id = r.integer("bos_token_id", 0) end
  d.eos_ids = {}
  if type(r.raw("eos_token_id")) == "table" then
    local eos, ids = r.list("eos_token_id")
    for i = 1, #eos do d.eos_ids[i] = ids.integer(i, 0) end
  elseif r.has("eos_token_id") then
    d.eos_ids[1] = r.integer("eos_token_id", 0)
  end
  d.tie_word_embeddings = r.boolean("tie_word_embeddings", false)

  if not SCORE_FUNCS[d.score_func] then
    r.fail("scoring_func", "unknown score function %s (expected sqrtsoftplus, sigmoid or softmax)",
           show(d.score_func))
  end
  -- the reference builds exactly one shared expert (`assert args.n_shared_experts == 1`, SPEC §7.3)
  if d.n_shared_experts ~= 1 then
    r.fail("n_shared_experts", "must be 1 (one shared expert, SPEC §7.3), got %d", d.n_shared_experts)
  end
  if d.n_activated_experts > d.n_routed_experts then
    r.fail("num_experts_per_tok", "%d experts per token but only %d routed experts (n_routed_experts)",
           d.n_activated_experts, d.n_routed_experts)
  end
  if d.n_heads % d.o_groups ~= 0 then
    r.fail("o_groups", "num_attention_heads (%d) is not divisible by o_groups (%d)", d.n_heads, d.o_groups)
  end
  -- a single latent serves as K and V for every head (SPEC §1.1: KV heads = 1)
  if r.has("num_key_value_heads") and r.integer("num_key_value_heads", 1) ~= 1 then
    r.fail("num_key_value_heads", "must be 1 (one shared K=V latent), got %s", show(r.raw("num_key_value_heads")))
  end
  if r.has("hidden_act") and r.string("hidden_act") ~= "silu" then
    r.fail("hidden_act", "must be \"silu\" (SwiGLU experts), got %s", show(r.raw("hidden_act")))
  end
  if r.has("model_type") and r.string("model_type") ~= "deepseek_v4" then
    r.fail("model_type", "expected \"deepseek_v4\", got %s", show(r.raw("model_type")))
  end
  return d
end

-- RoPE dims: qk_rope_head_dim (published) or head_dim · partial_rotary_factor (transformers).
local function read_rope_dim(r, d)
  local rope_dim, rope_key
  if r.has("qk_rope_head_dim") then
    rope_dim, rope_key = r.integer("qk_rope_head_dim", 1), "qk_rope_head_dim"
  end
  if r.has("partial_rotary_factor") then
    local factor = r.number("partial_rotary_factor")
    local from_factor = math.tointeger(d.head_dim * factor)
    if not from_factor then
      r.fail("partial_rotary_factor", "%s × head_dim %d is not a whole number of dims", show(factor), d.head_dim)
    end
    if rope_dim and rope_dim ~= from_factor then
      r.fail("partial_rotary_factor", "gives %d rope dims but qk_rope_head_dim is %d", from_factor, rope_dim)
    end
    rope_dim, rope_key = from_factor, "partial_rotary_factor"
  end
  if rope_dim > d.head_dim then
    r.fail(rope_key, "%d rope dims do not fit head_dim %d", rope_dim, d.head_dim)
  end
  -- RoPE rotates interleaved pairs (SPEC §3.6)
  if rope_dim % 2 ~= 0 then r.fail(rope_key, "gives %d rope dims; must be even (pairs are rotated)", rope_dim) end
  return rope_dim
end

-- YaRN parameters from a flat rope_scaling (published) or rope_parameters.compress (transformers,
-- where a "default" type means plain RoPE); false when there is no YaRN.
local function read_yarn(y, default_allowed)
  local type_key = y.has("rope_type") and "rope_type" or "type"
  local rope_type = y.string(type_key)
  if default_allowed and (rope_type == nil or rope_type == "default") then return false end
  if rope_type ~= "yarn" then
    y.fail(type_key, "expected \"yarn\" (DeepSeek-V4's scaling on compressed layers, SPEC §1.1), got %s",
           show(rope_type))
  end
  -- the reference never scales cos/sin by YaRN's mscale; transformers pins attention_factor to 1
  if y.has("attention_factor") and y.number("attention_factor") ~= 1 then
    y.fail("attention_factor", "must be 1 (the reference does not scale by mscale), got %s",
           show(y.raw("attention_factor")))
  end
  return {
    factor = y.number("factor"),
    original_seq_len = y.integer("original_max_position_embeddings", 1),
    -- the reference's and transformers' defaults for the correction range
    beta_fast = y.number("beta_fast", false, 32.0),
    beta_slow = y.number("beta_slow", false, 1.0),
  }
end

-- rope_theta, compress_rope_theta and YaRN, from either form. When both the flat keys and the
-- nested rope_parameters are there, they must agree.
local function read_rope(r, d)
  local nested = r.object("rope_parameters")
  local main = nested and nested.object("main")
  local compress = nested and nested.object("compress")
  local theta, compress_theta = nil, nil
  if r.has("rope_theta") then theta = r.number("rope_theta") end
  if r.has("compress_rope_theta") then compress_theta = r.number("compress_rope_theta") end
  if main and compress then
    local main_type = main.string("rope_type") or main.string("type") or "default"
    if main_type ~= "default" then
      main.fail("rope_type", "must be \"default\": window-only layers use plain RoPE (SPEC §1.2), got %s",
                show(main_type))
    end
    local nested_theta = main.number("rope_theta")
    if theta and theta ~= nested_theta then
      r.fail("rope_theta", "%s disagrees with rope_parameters.main.rope_theta %s", show(theta), show(nested_theta))
    end
    theta = nested_theta
    if compress.has("rope_theta") then
      local nested_compress = compress.number("rope_theta")
      if compress_theta and compress_theta ~= nested_compress then
        r.fail("compress_rope_theta", "%s disagrees with rope_parameters.compress.rope_theta %s",
               show(compress_theta), show(nested_compress))
      end
      compress_theta = nested_compress
    end
    d.yarn = read_yarn(compress, true)
  elseif nested then
    r.fail("rope_parameters", "expected the nested form {main = {...}, compress = {...}} (SPEC §1.3)")
  else
    local scaling = r.object("rope_scaling")
    d.yarn = scaling and read_yarn(scaling, false) or false
  end
  d.rope_theta, d.compress_rope_theta = theta, compress_theta
end

-- Hash-routed layer count: num_hash_layers, or the leading hash_moe run of mlp_layer_types.
local function read_hash_layers(r, d)
  local n_hash
  if r.has("mlp_layer_types") then
    local types, entries = r.list("mlp_layer_types")
    if #types ~= d.n_layers then
      r.fail("mlp_layer_types", "has %d entries; expected num_hidden_layers = %d", #types, d.n_layers)
    end
    n_hash = 0
    for i, t in ipairs(types) do
      if t ~= "hash_moe" and t ~= "moe" then
        entries.fail(i, "unknown MLP type %s (expected hash_moe or moe)", show(t))
      end
      if t == "hash_moe" then
        -- the reference routes by hash exactly when layer_id < n_hash_layers (SPEC §1.2)
        if n_hash ~= i - 1 then
          entries.fail(i, "hash_moe after a moe layer; hash-routed layers must come first")
        end
        n_hash = i
      end
    end
  end
  if r.has("num_hash_layers") then
    local declared = r.integer("num_hash_layers", 0)
    if n_hash and n_hash ~= declared then
      r.fail("mlp_layer_types", "has %d hash_moe layers but num_hash_layers is %d", n_hash, declared)
    end
    n_hash = declared
  end
  if n_hash > d.n_layers then
    r.fail("num_hash_layers", "%d exceeds num_hidden_layers %d", n_hash, d.n_layers)
  end
  return n_hash
end

-- The attention schedule: a {ratio, kind} per main layer, then per MTP layer.
local function read_schedule(r, d)
  local schedule = {}
  if r.has("compress_ratios") then
    -- published form: one ratio per main layer, then one per MTP layer, because the reference
    -- builds MTP block k with layer_id = n_layers + k and indexes compress_ratios with it (SPEC §1.2)
    local ratios, entries = r.list("compress_ratios")
    if #ratios ~= d.n_layers + d.n_mtp then
      r.fail("compress_ratios", "has %d entries; expected num_hidden_layers + num_nextn_predict_layers = %d + %d",
             #ratios, d.n_layers, d.n_mtp)
    end
    for i = 1, #ratios do
      local ratio = entries.integer(i, 0)
      local kind = ratio == 0 and "window" or ratio == INDEXER_RATIO and "csa" or "hca"
      schedule[i] = { ratio = ratio, kind = kind }
    end
    if r.has("layer_types") then
      -- both forms at once: they must describe the same layers
      local types, type_entries = r.list("layer_types")
      if #types ~= d.n_layers then
        r.fail("layer_types", "has %d entries; expected num_hidden_layers = %d", #types, d.n_layers)
      end
      for i = 1, d.n_layers do
        if types[i] ~= KIND_LAYER_TYPE[schedule[i].kind] then
          type_entries.fail(i, "%s contradicts compress_ratios[%d] = %d", show(types[i]), i - 1, schedule[i].ratio)
        end
      end
    end
  else
    -- transformers form: a type per main layer, a rate per type; the kind is the type's
    local types, entries = r.list("layer_types")
    if #types ~= d.n_layers then
      r.fail("layer_types", "has %d entries; expected num_hidden_layers = %d", #types, d.n_layers)
    end
    local rates = r.object("compress_rates")
    for i, t in ipairs(types) do
      local kind = LAYER_TYPE_KIND[t]
      if not kind then
        entries.fail(i,
               "unknown layer type %s (expected sliding_attention, compressed_sparse_attention or heavily_compressed_attention)",
               show(t))
      end
      local ratio = 0
      if kind ~= "window" then
        ratio = rates and rates.integer(t, 1, DEFAULT_COMPRESS_RATES[t]) or DEFAULT_COMPRESS_RATES[t]
      end
      schedule[i] = { ratio = ratio, kind = kind }
    end
    -- transformers drops the MTP entries of compress_ratios (SPEC §1.3), so the MTP ratio is not
    -- written anywhere in this form. Every published DSV4 config makes its MTP layers window-only
    -- (Flash: entry 43 = 0, SPEC §1.2; Pro and the 0731 re-release end in 0s, SPEC §1.4), so that
    -- is what is derived here.
    for k = 1, d.n_mtp do schedule[d.n_layers + k] = { ratio = 0, kind = "window" } end
  end
  return schedule
end

local function read_formats(r, d)
  local f = { fp4_block = 32 } -- per-32 e8m0 scales of FP4 rows (SPEC §2.1)
  local q = r.object("quantization_config")
  local expert_dtype = r.string("expert_dtype")
  if q then
    local method = q.string("quant_method")
    if method ~= "fp8" then q.fail("quant_method", "expected \"fp8\", got %s", show(method)) end
    if q.has("fmt") and q.string("fmt") ~= "e4m3" then
      q.fail("fmt", "expected \"e4m3\", got %s", show(q.raw("fmt")))
    end
    f.quantized, f.linear = true, "fp8"
    f.fp8_block = { 128, 128 }
    if q.has("weight_block_size") then
      local block, b = q.list("weight_block_size")
      if #block ~= 2 then q.fail("weight_block_size", "expected [rows, cols], got %d values", #block) end
      f.fp8_block = { b.integer(1, 1), b.integer(2, 1) }
    end
    f.scale_fmt = q.string("scale_fmt")
    if f.scale_fmt ~= nil and f.scale_fmt ~= "ue8m0" then
      q.fail("scale_fmt", "expected \"ue8m0\", got %s", show(f.scale_fmt))
    end
  else
    f.quantized, f.linear = false, "bf16"
  end
  -- expert_dtype names the routed experts' format; absent, they are stored like the other linears
  -- (the reference: `expert_dtype = fp4 if args.expert_dtype == "fp4" else None`, SPEC §2.1)
  f.expert = expert_dtype or f.linear
  if f.expert ~= "fp4" and f.expert ~= "fp8" and f.expert ~= "bf16" then
    r.fail("expert_dtype", "expected \"fp4\", \"fp8\" or \"bf16\", got %s", show(expert_dtype))
  end
  if f.expert == "fp8" and not f.quantized then
    r.fail("expert_dtype", "\"fp8\" experts need a quantization_config (their FP8 block size)")
  end
  if f.expert == "fp4" then
    -- the expert inputs (hidden_size for w1/w3, moe_intermediate_size for w2) are cut into rows of
    -- 32-column scale blocks (SPEC §2.1)
    for key, width in pairs({ hidden_size = d.dim, moe_intermediate_size = d.moe_inter_dim }) do
      if width % f.fp4_block ~= 0 then
        r.fail(key, "%d is not a multiple of %d, as FP4 experts need (one e8m0 scale per %d inputs)",
               width, f.fp4_block, f.fp4_block)
      end
    end
  end
  -- Flash stores FP8 scales as e8m0 (SPEC §2.1); Flash-Base, the checkpoint with FP8 experts, stores
  -- them as fp32 power-of-two values (SPEC §1.4). scale_fmt "ue8m0" says the values are powers of
  -- two in both, not how they are stored, so expert_dtype is the only signal in the config. The
  -- weight binder still takes each scale's dtype from the file.
  if f.linear == "fp8" or f.expert == "fp8" then
    f.fp8_scale_dtype = f.expert == "fp8" and "f32" or "f8e8m0"
  end
  return f
end

-- ---- assembling the normalised table ----

local function make_layer(cfg, index, entry, is_mtp, window_rope, compressed_rope)
  local d = cfg.dims
  local id = index - 1
  local layer = {
    id = id,
    prefix = is_mtp and ("mtp." .. (id - d.n_layers) .. ".") or ("layers." .. id .. "."),
    is_mtp = is_mtp,
    ratio = entry.ratio,
    kind = entry.kind,
    indexer = entry.kind == "csa",
    coff = entry.kind == "csa" and 2 or entry.kind == "hca" and 1 or 0,
    -- YaRN and compress_rope_theta on compressed layers only; window-only layers use rope_theta
    -- without YaRN (reference Attention.__init__, SPEC §1.2)
    rope = entry.kind == "window" and window_rope or compressed_rope,
    -- the reference's rule, `layer_id < n_hash_layers`; MTP layers have layer_id >= n_layers >=
    -- n_hash_layers, so they always route by learned scores, whatever their own index (SPEC §1.2)
    router = id < d.n_hash_layers and "hash" or "learned",
  }
  layer.has_gate_bias = layer.router == "learned"
  return layer
end

--- Normalises a decoded config.json (see the top of this file); source names it in errors.
function config.parse(raw, source)
  source = source or "config"
  if type(raw) ~= "table" or #raw > 0 then
    error(string.format("dsv4.config: %s: expected a JSON object, got %s", source, show(raw)), 0)
  end
  check_required(raw, source)
  local r = reader(raw, source)
  local d = read_dims(r)
  d.rope_dim = read_rope_dim(r, d)
  d.nope_dim = d.head_dim - d.rope_dim
  d.n_hash_layers = read_hash_layers(r, d)
  read_rope(r, d)
  local schedule = read_schedule(r, d)

  local any_compressed, any_indexer = false, false
  for _, entry in ipairs(schedule) do
    any_compressed = any_compressed or entry.kind ~= "window"
    any_indexer = any_indexer or entry.kind == "csa"
  end
  if any_compressed and not d.compress_rope_theta then
    error(string.format("dsv4.config: %s: missing required keys: compress_rope_theta or "
                        .. "rope_parameters.compress.rope_theta (the config has compressed layers)", source), 0)
  end
  if any_indexer and d.rope_dim > d.index_head_dim then
    r.fail("index_head_dim", "%d is smaller than the %d rope dims the indexer rotates", d.index_head_dim, d.rope_dim)
  end

  local cfg = {
    source = source,
    form = r.has("compress_ratios") and "published" or "transformers",
    dims = d,
    formats = read_formats(r, d),
  }
  local heads_per_group = d.n_heads // d.o_groups
  cfg.derived = {
    mix_hc = (2 + d.hc_mult) * d.hc_mult,
    hc_dim = d.hc_mult * d.dim,
    softmax_scale = d.head_dim ^ -0.5,
    index_scale = d.index_head_dim ^ -0.5 * d.index_n_heads ^ -0.5,
    heads_per_group = heads_per_group,
    group_width = heads_per_group * d.head_dim,
    o_width = d.o_groups * d.o_lora_rank,
  }

  local window_rope = { theta = d.rope_theta, yarn = false }
  local compressed_rope = { theta = d.compress_rope_theta, yarn = d.yarn }
  cfg.layers, cfg.mtp = {}, {}
  for i, entry in ipairs(schedule) do
    local is_mtp = i > d.n_layers
    local list = is_mtp and cfg.mtp or cfg.layers
    list[#list + 1] = make_layer(cfg, i, entry, is_mtp, window_rope, compressed_rope)
  end
  return cfg
end

--- Reads and normalises path/config.json, or path itself when it is the file.
function config.load(path)
  local file_path = path .. "/config.json"
  local file = io.open(file_path, "rb")
  if not file then file_path, file = path, io.open(path, "rb") end
  -- a folder opens too, but does not read
  local text = file and file:read("a")
  if file then file:close() end
  if not text then
    error("dsv4.config: cannot read " .. path .. " (neither a config.json nor a folder holding one)", 0)
  end
  local ok, raw = pcall(cjson.decode, text)
  if not ok then error("dsv4.config: " .. file_path .. ": not valid JSON: " .. tostring(raw), 0) end
  return config.parse(raw, file_path)
end

return config
