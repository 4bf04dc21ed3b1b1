-- test_dsv4_config.lua — dsrt.dsv4.config: both forms of the Flash config.json give one schedule
-- (SPEC §1.2–1.3), the Flash values, the variants (Flash-Base, plain bf16, odd ratios, two MTP
-- layers), and a table of broken configs each refused with a message naming its key.
local cjson = require "cjson"
local config = require "dsrt.dsv4.config"
local h = require "tests.helpers"
local assert_error, assert_close, assert_equal = h.assert_error, h.assert_close, h.assert_equal

local tests = {}
local function test(name, fn) tests[#tests + 1] = { name, fn } end

local FIXTURES = "tests/fixtures/config/"

local function read_json(name)
  local file = assert(io.open(FIXTURES .. name, "rb"))
  local raw = cjson.decode(file:read("a"))
  file:close()
  return raw
end

local function deep_copy(v)
  if type(v) ~= "table" then return v end
  local copy = {}
  for k, x in pairs(v) do copy[k] = deep_copy(x) end
  return copy
end

-- a plain substring as a Lua pattern, so expected messages read as written
local function literally(s) return (s:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0")) end

-- the Flash schedule as SPEC §1.2 states it, for layer id 0…42
local function flash_ratio(id)
  if id < 2 then return 0 end
  return id % 2 == 0 and 4 or 128
end

test("both_flash_forms_parse_to_the_same_model", function()
  local published = config.load(FIXTURES .. "flash_published.json")
  local resaved = config.load(FIXTURES .. "flash_transformers.json")
  assert_equal(published.form, "published")
  assert_equal(resaved.form, "transformers")
  assert_equal(resaved.dims, published.dims)
  assert_equal(resaved.formats, published.formats)
  assert_equal(resaved.derived, published.derived)
  assert_equal(#resaved.layers, 43)
  assert_equal(resaved.layers, published.layers)
  assert_equal(resaved.mtp, published.mtp)
end)

test("flash_schedule_window_csa_hca_routers_and_rope", function()
  local cfg = config.load(FIXTURES .. "flash_published.json")
  local window_rope = { theta = 10000.0, yarn = false }
  local yarn = { factor = 16.0, original_seq_len = 65536, beta_fast = 32.0, beta_slow = 1.0 }
  local compressed_rope = { theta = 160000.0, yarn = yarn }
  assert_equal(#cfg.layers, 43)
  for i, layer in ipairs(cfg.layers) do
    local id = i - 1
    local ratio = flash_ratio(id)
    local kind = ratio == 0 and "window" or ratio == 4 and "csa" or "hca"
    local router = id < 3 and "hash" or "learned"
    assert_equal(layer, {
      id = id, prefix = "layers." .. id .. ".", is_mtp = false,
      ratio = ratio, kind = kind, indexer = kind == "csa", coff = ({ window = 0, csa = 2, hca = 1 })[kind],
      rope = kind == "window" and window_rope or compressed_rope,
      router = router, has_gate_bias = router == "learned",
    }, "layers[" .. i .. "]")
  end
  -- spot checks in SPEC §1.2's words
  assert_equal({ cfg.layers[1].kind, cfg.layers[2].kind, cfg.layers[3].kind, cfg.layers[4].kind,
                 cfg.layers[5].kind, cfg.layers[43].kind }, { "window", "window", "csa", "hca", "csa", "csa" })
  assert_equal(cfg.layers[3].router, "hash")   -- layer 2: CSA yet hash-routed
  assert_equal(cfg.layers[4].router, "learned")
  -- the MTP block is layer_id 43: window only, plain RoPE, learned router with bias, even though
  -- its own index (mtp.0) is below num_hash_layers
  assert_equal(cfg.mtp, { {
    id = 43, prefix = "mtp.0.", is_mtp = true, ratio = 0, kind = "window", indexer = false, coff = 0,
    rope = window_rope, router = "learned", has_gate_bias = true,
  } })
end)

test("flash_dims_and_derived_constants", function()
  local cfg = config.load(FIXTURES .. "flash_published.json")
  assert_equal(cfg.dims, {
    vocab = 129280, dim = 4096, n_layers = 43, n_mtp = 1, n_heads = 64, head_dim = 512, rope_dim = 64,
    nope_dim = 448, q_lora_rank = 1024, o_lora_rank = 1024, o_groups = 8, window = 128,
    index_n_heads = 64, index_head_dim = 128, index_topk = 512, n_routed_experts = 256,
    n_shared_experts = 1, n_activated_experts = 6, moe_inter_dim = 2048, n_hash_layers = 3,
    score_func = "sqrtsoftplus", route_scale = 1.5, norm_topk_prob = true, swiglu_limit = 10.0,
    hc_mult = 4, hc_sinkhorn_iters = 20, hc_eps = 1e-6, norm_eps = 1e-6, rope_theta = 10000.0,
    compress_rope_theta = 160000.0,
    yarn = { factor = 16.0, original_seq_len = 65536, beta_fast = 32.0, beta_slow = 1.0 },
    max_position_embeddings = 1048576, bos_id = 0, eos_ids = { 1 }, tie_word_embeddings = false,
  })
  local dv = cfg.derived
  assert_equal({ dv.mix_hc, dv.hc_dim, dv.heads_per_group, dv.group_width, dv.o_width },
               { 24, 16384, 8, 4096, 8192 })
  assert_close(dv.softmax_scale, 512 ^ -0.5, 1e-15)
  assert_close(1 / dv.index_scale, 90.51, 1e-4) -- SPEC §1.1: 128^-½ · 64^-½ = 1/90.51
  for _, field in ipairs({ "vocab", "dim", "n_layers", "head_dim", "window", "n_hash_layers" }) do
    assert_equal(math.type(cfg.dims[field]), "integer", field)
  end
end)

test("weight_formats_of_flash_flash_base_and_bf16", function()
  assert_equal(config.load(FIXTURES .. "flash_published.json").formats, {
    quantized = true, linear = "fp8", expert = "fp4", fp8_block = { 128, 128 },
    fp8_scale_dtype = "f8e8m0", fp4_block = 32, scale_fmt = "ue8m0",
  })
  -- Flash-Base: FP8 experts, and its FP8 scales stored as fp32 powers of two (SPEC §1.4)
  assert_equal(config.load(FIXTURES .. "flash_base.json").formats, {
    quantized = true, linear = "fp8", expert = "fp8", fp8_block = { 128, 128 },
    fp8_scale_dtype = "f32", fp4_block = 32, scale_fmt = "ue8m0",
  })
  -- no quantization_config: everything plain bf16
  assert_equal(config.load(FIXTURES .. "flash_bf16.json").formats,
               { quantized = false, linear = "bf16", expert = "bf16", fp4_block = 32 })
  -- bf16 linears with FP4 experts, as the reference allows (expert_dtype alone)
  local raw = read_json("flash_bf16.json")
  raw.expert_dtype = "fp4"
  local f = config.parse(raw, "bf16+fp4").formats
  assert_equal({ f.linear, f.expert, f.fp8_scale_dtype }, { "bf16", "fp4", nil })
end)

test("any_compress_ratio_and_several_mtp_layers", function()
  local cfg = config.load(FIXTURES .. "tiny_ratios.json") -- compress_ratios [0, 8, 4, 64, 0, 8]
  local kinds = {}
  for i, layer in ipairs(cfg.layers) do
    kinds[i] = { layer.ratio, layer.kind, layer.coff, layer.indexer, layer.router, layer.rope.theta }
  end
  -- only ratio 4 gets overlapping windows and the indexer (reference Compressor/Attention, SPEC §6.5–6.6)
  assert_equal(kinds, {
    { 0, "window", 0, false, "hash", 10000.0 },
    { 8, "hca", 1, false, "hash", 40000.0 },
    { 4, "csa", 2, true, "learned", 40000.0 },
    { 64, "hca", 1, false, "learned", 40000.0 },
  })
  assert_equal(cfg.layers[2].rope.yarn, { factor = 4.0, original_seq_len = 256, beta_fast = 32.0, beta_slow = 1.0 })
  assert_equal(#cfg.mtp, 2)
  assert_equal({ cfg.mtp[1].id, cfg.mtp[1].prefix, cfg.mtp[1].kind, cfg.mtp[1].rope.yarn },
               { 4, "mtp.0.", "window", false })
  assert_equal({ cfg.mtp[2].id, cfg.mtp[2].prefix, cfg.mtp[2].ratio, cfg.mtp[2].kind, cfg.mtp[2].router },
               { 5, "mtp.1.", 8, "hca", "learned" })
  assert_equal(cfg.mtp[2].rope, cfg.layers[2].rope)
  assert_equal(cfg.dims.eos_ids, { 1, 2 })
end)

test("transformers_form_rates_mtp_and_defaults", function()
  -- compress_rates names the rate of each type; the type decides overlap and indexer
  local raw = read_json("flash_transformers.json")
  raw.compress_rates = { compressed_sparse_attention = 8, heavily_compressed_attention = 64 }
  raw.num_nextn_predict_layers = 3
  local cfg = config.parse(raw, "rates")
  assert_equal({ cfg.layers[3].ratio, cfg.layers[3].kind, cfg.layers[3].coff }, { 8, "csa", 2 })
  assert_equal({ cfg.layers[4].ratio, cfg.layers[4].kind, cfg.layers[4].coff }, { 64, "hca", 1 })
  -- MTP layers are window-only in this form, however many there are
  assert_equal(#cfg.mtp, 3)
  for _, layer in ipairs(cfg.mtp) do assert_equal({ layer.ratio, layer.kind, layer.router }, { 0, "window", "learned" }) end
  -- without compress_rates, transformers' defaults 4 and 128 hold
  raw.compress_rates = nil
  cfg = config.parse(raw, "defaults")
  assert_equal({ cfg.layers[3].ratio, cfg.layers[4].ratio }, { 4, 128 })
  -- compress without yarn: plain RoPE at compress_rope_theta
  raw.rope_parameters.compress = { rope_type = "default", rope_theta = 160000.0 }
  cfg = config.parse(raw, "no yarn")
  assert_equal(cfg.layers[3].rope, { theta = 160000.0, yarn = false })
end)

test("unknown_keys_and_nulls_are_ignored", function()
  local raw = read_json("flash_published.json")
  raw.some_future_key = { nested = true }
  raw.dspark_target_layer_ids = {}
  raw.rope_scaling.mscale = 1.0
  raw.max_position_embeddings = cjson.null
  raw.bos_token_id = cjson.null
  local cfg = config.parse(raw, "extra")
  local reference = config.load(FIXTURES .. "flash_published.json")
  assert_equal(cfg.layers, reference.layers)
  assert_equal({ cfg.dims.max_position_embeddings, cfg.dims.bos_id }, { nil, nil })
end)

test("load_reads_a_folder_or_a_file", function()
  local folder = os.tmpname()
  os.remove(folder)
  assert(os.execute("mkdir " .. folder))
  local source = assert(io.open(FIXTURES .. "tiny_ratios.json", "rb"))
  local target = assert(io.open(folder .. "/config.json", "wb"))
  target:write(source:read("a"))
  source:close()
  target:close()
  local cfg = config.load(folder)
  assert_equal(cfg.source, folder .. "/config.json")
  assert_equal(#cfg.layers, 4)
  -- not JSON
  local broken = assert(io.open(folder .. "/broken.json", "wb"))
  broken:write("{\"vocab_size\": 12,")
  broken:close()
  assert_error(function() config.load(folder .. "/broken.json") end, literally("broken.json: not valid JSON"))
  os.remove(folder .. "/broken.json")
  os.remove(folder .. "/config.json")
  assert_error(function() config.load(folder) end, "neither a config.json nor a folder holding one")
  os.remove(folder)
  assert_error(function() config.load(folder) end, "cannot read")
end)

-- Broken configs: each case starts from one form, breaks it, and names the text the error must
-- contain (the key first). Messages start "dsv4.config: <source>: ".
local broken = {
  { "ratios one short", "published", function(c) table.remove(c.compress_ratios) end,
    "compress_ratios: has 43 entries; expected num_hidden_layers + num_nextn_predict_layers = 43 + 1" },
  { "ratios without the MTP entry are short too", "published",
    function(c) c.num_nextn_predict_layers = 2 end, "compress_ratios: has 44 entries" },
  { "fractional ratio", "published", function(c) c.compress_ratios[5] = 4.5 end,
    "compress_ratios[4]: expected an integer >= 0, got 4.5" },
  { "negative ratio", "published", function(c) c.compress_ratios[2] = -4 end,
    "compress_ratios[1]: expected an integer >= 0, got -4" },
  { "layer_types one short", "transformers", function(c) table.remove(c.layer_types) end,
    "layer_types: has 42 entries; expected num_hidden_layers = 43" },
  { "unknown layer type", "transformers", function(c) c.layer_types[3] = "dense_attention" end,
    "layer_types[2]: unknown layer type \"dense_attention\"" },
  { "layer_types contradicting compress_ratios", "published",
    function(c)
      c.layer_types = {}
      for i = 1, 43 do c.layer_types[i] = "sliding_attention" end
    end, "layer_types[2]: \"sliding_attention\" contradicts compress_ratios[2] = 4" },
  { "mlp_layer_types contradicting num_hash_layers", "transformers", function(c) c.num_hash_layers = 2 end,
    "mlp_layer_types: has 3 hash_moe layers but num_hash_layers is 2" },
  { "hash layer after a learned one", "transformers", function(c) c.mlp_layer_types[6] = "hash_moe" end,
    "mlp_layer_types[5]: hash_moe after a moe layer" },
  { "unknown mlp type", "transformers", function(c) c.mlp_layer_types[1] = "dense" end,
    "mlp_layer_types[0]: unknown MLP type \"dense\"" },
  { "more hash layers than layers", "published", function(c) c.num_hash_layers = 44 end,
    "num_hash_layers: 44 exceeds num_hidden_layers 43" },
  { "rope dims wider than the head", "published", function(c) c.qk_rope_head_dim = 640 end,
    "qk_rope_head_dim: 640 rope dims do not fit head_dim 512" },
  { "odd rope dims", "published", function(c) c.qk_rope_head_dim = 63 end,
    "qk_rope_head_dim: gives 63 rope dims; must be even" },
  { "partial_rotary_factor not a whole number of dims", "transformers",
    function(c) c.partial_rotary_factor = 0.1 end, "partial_rotary_factor: 0.1 × head_dim 512 is not a whole number" },
  { "partial_rotary_factor against qk_rope_head_dim", "transformers",
    function(c) c.qk_rope_head_dim = 32 end, "partial_rotary_factor: gives 64 rope dims but qk_rope_head_dim is 32" },
  { "heads not divisible by groups", "published", function(c) c.o_groups = 7 end,
    "o_groups: num_attention_heads (64) is not divisible by o_groups (7)" },
  { "more experts per token than experts", "published", function(c) c.num_experts_per_tok = 300 end,
    "num_experts_per_tok: 300 experts per token but only 256 routed experts" },
  { "zero size", "published", function(c) c.hidden_size = 0 end, "hidden_size: expected an integer >= 1, got 0" },
  { "negative size", "published", function(c) c.sliding_window = -128 end,
    "sliding_window: expected an integer >= 1, got -128" },
  { "fractional layer count", "published", function(c) c.num_hidden_layers = 43.5 end,
    "num_hidden_layers: expected an integer >= 1, got 43.5" },
  { "size as a string", "published", function(c) c.head_dim = "512" end,
    "head_dim: expected an integer >= 1, got \"512\"" },
  { "negative epsilon", "published", function(c) c.hc_eps = -1e-6 end, "hc_eps: expected a number > 0" },
  { "rope_scaling of another type", "published", function(c) c.rope_scaling.type = "linear" end,
    "rope_scaling.type: expected \"yarn\"" },
  { "yarn without its factor", "published", function(c) c.rope_scaling.factor = nil end,
    "rope_scaling.factor: expected a number > 0, got no value" },
  { "yarn with an mscale factor", "transformers",
    function(c) c.rope_parameters.compress.attention_factor = 1.277 end,
    "rope_parameters.compress.attention_factor: must be 1" },
  { "flat rope_parameters", "transformers",
    function(c) c.rope_parameters = { rope_type = "yarn", factor = 16 } end,
    "rope_parameters: expected the nested form" },
  { "yarn on window layers", "transformers",
    function(c) c.rope_parameters.main.rope_type = "yarn" end, "rope_parameters.main.rope_type: must be \"default\"" },
  { "rope_theta disagreeing with rope_parameters", "transformers", function(c) c.rope_theta = 50000 end,
    "rope_theta: 50000.0 disagrees with rope_parameters.main.rope_theta 10000.0" },
  { "missing keys, all listed", "published",
    function(c) c.hidden_size, c.head_dim, c.compress_ratios, c.qk_rope_head_dim = nil, nil, nil, nil end,
    "missing required keys: hidden_size, head_dim, compress_ratios or layer_types, qk_rope_head_dim or partial_rotary_factor" },
  { "compressed layers without their theta", "published", function(c) c.compress_rope_theta = nil end,
    "missing required keys: compress_rope_theta or rope_parameters.compress.rope_theta" },
  { "unknown score function", "published", function(c) c.scoring_func = "relu" end,
    "scoring_func: unknown score function \"relu\"" },
  { "two shared experts", "published", function(c) c.n_shared_experts = 2 end, "n_shared_experts: must be 1" },
  { "several KV heads", "published", function(c) c.num_key_value_heads = 8 end, "num_key_value_heads: must be 1" },
  { "another model", "published", function(c) c.model_type = "deepseek_v3" end,
    "model_type: expected \"deepseek_v4\", got \"deepseek_v3\"" },
  { "another quantisation", "published", function(c) c.quantization_config.quant_method = "awq" end,
    "quantization_config.quant_method: expected \"fp8\", got \"awq\"" },
  { "one-number block size", "published", function(c) c.quantization_config.weight_block_size = { 128 } end,
    "quantization_config.weight_block_size: expected [rows, cols], got 1 values" },
  { "unknown expert dtype", "published", function(c) c.expert_dtype = "int4" end,
    "expert_dtype: expected \"fp4\", \"fp8\" or \"bf16\", got \"int4\"" },
  { "fp8 experts without a quantization_config", "published",
    function(c) c.quantization_config, c.expert_dtype = nil, "fp8" end, "expert_dtype: \"fp8\" experts need a quantization_config" },
  { "fp4 experts of a width the scales do not cut", "published", function(c) c.moe_intermediate_size = 2000 end,
    "moe_intermediate_size: 2000 is not a multiple of 32" },
  { "indexer narrower than the rope dims", "published", function(c) c.index_head_dim = 32 end,
    "index_head_dim: 32 is smaller than the 64 rope dims" },
  { "ratios not a list", "published", function(c) c.compress_ratios = { csa = 4 } end,
    "compress_ratios: expected a list" },
}

test("broken_configs_are_refused_naming_the_key", function()
  local forms = { published = read_json("flash_published.json"), transformers = read_json("flash_transformers.json") }
  for _, case in ipairs(broken) do
    local name, form, mutate, expected = case[1], case[2], case[3], case[4]
    local raw = deep_copy(forms[form])
    mutate(raw)
    local ok, err = pcall(config.parse, raw, "case.json")
    if ok then error(name .. ": parsed, expected an error containing: " .. expected) end
    if not err:find("^dsv4%.config: case%.json: ") or not err:find(expected, 1, true) then
      error(string.format("%s: error %q does not contain %q", name, err, expected))
    end
  end
  assert(#broken >= 10)
end)

test("a_non_object_is_refused", function()
  assert_error(function() config.parse({ 1, 2 }, "list.json") end,
               literally("dsv4.config: list.json: expected a JSON object"))
  assert_error(function() config.parse("text", "string.json") end, "expected a JSON object")
end)

return tests
