-- test_dsv4_weights.lua — dsrt.dsv4.weights and dsrt.dsv4.random on the CPU: the tiny checkpoint
-- written by scripts/make_tiny_model.lua (run as a user runs it) binds with every format where the
-- real one has it and gives back exactly the random weights it was made from; the same seed writes
-- the same bytes; broken checkpoints are refused with ONE message naming every problem; the
-- Flash-Base and bf16-only variants bind; random weights are deterministic by seed and name and
-- have the documented magnitudes. Run by tests/run.lua.
--
-- Fast on two cores: the script runs twice (the byte-identity check); everything else uses the
-- checkpoint made once, or configs with a small vocabulary (the 129280-row embedding and head are
-- what costs time to draw).
local dsrt = require "dsrt"
local cjson = require "cjson"
local config = require "dsrt.dsv4.config"
local memory = require "dsrt.dsv4.memory"
local random = require "dsrt.dsv4.random"
local weights = require "dsrt.dsv4.weights"
local h = require "tests.helpers"
local assert_error, assert_equal = h.assert_error, h.assert_equal

local tests = {}
local function test(name, fn) tests[#tests + 1] = { name, fn } end

local SEED = 3
local FIXTURES = "tests/fixtures/config/"

local BIN, shell_quote, read_file, new_folder, make_tiny_model =
  h.dsrt_bin(), h.shell_quote, h.read_file, h.temp_folder, h.make_tiny_model

-- The tiny checkpoint, made once for the tests that read it.
local tiny_folder
local function tiny()
  tiny_folder = tiny_folder or make_tiny_model(SEED)
  return tiny_folder
end

local function tiny_raw_config() return cjson.decode(read_file(tiny() .. "/config.json")) end

-- The tiny config with a small vocabulary, optionally edited: cheap random weights.
local function small_config(edit)
  local raw = tiny_raw_config()
  raw.vocab_size = 512
  if edit then edit(raw) end
  return config.parse(raw, "small"), raw
end

local function same_bytes(a, b)
  if a.dtype ~= b.dtype or not pcall(assert_equal, a.shape, b.shape) then return false end
  return a:bitcast("u8"):ne(b:bitcast("u8")):sum():item() == 0
end

-- Every stored tensor of a checkpoint folder, as a table {name = CPU view}.
local function stored_tensors(folder)
  local st = dsrt.safetensors.open(folder)
  local map = {}
  for _, name in ipairs(st:names()) do map[name] = st:get(name) end
  st:close()
  return map
end

local function copy(map)
  local out = {}
  for k, v in pairs(map) do out[k] = v end
  return out
end

local function literally(s) return (s:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0")) end

-- ---- the tiny checkpoint ----

test("tiny_model_is_an_official_folder_of_two_shards", function()
  local folder = tiny()
  local raw = tiny_raw_config()
  assert_equal(raw.compress_ratios, { 0, 4, 128, 4, 0 })
  assert_equal(raw.vocab_size, 129280)
  local index = cjson.decode(read_file(folder .. "/model.safetensors.index.json"))
  local shards, total = {}, 0
  for _, shard in pairs(index.weight_map) do shards[shard] = true end
  assert_equal(shards, { ["model-00001-of-00002.safetensors"] = true, ["model-00002-of-00002.safetensors"] = true })
  local st = dsrt.safetensors.open(folder)
  for _, name in ipairs(st:names()) do total = total + st:info(name).nbytes end
  assert_equal(math.tointeger(index.metadata.total_size), total)
  -- stored dtypes as in the real checkpoint (SPEC §2.1)
  assert_equal(st:info("layers.0.attn.wq_a.weight").dtype, "f8e4m3")
  assert_equal(st:info("layers.0.attn.wq_a.scale").dtype, "f8e8m0")
  assert_equal(st:info("layers.0.ffn.experts.7.w2.weight").dtype, "i8")
  assert_equal(st:info("layers.0.ffn.experts.7.w2.weight").shape, { 128, 64 })
  assert_equal(st:info("layers.0.ffn.experts.7.w2.scale").shape, { 128, 4 })
  assert_equal(st:info("layers.1.ffn.gate.tid2eid").dtype, "i64")
  assert_equal(st:info("mtp.0.e_proj.weight").dtype, "f8e4m3")
  assert(total < 100e6, "the tiny checkpoint stays small: " .. total .. " bytes")
  st:close()
end)

test("tiny_model_binds_every_layer_kind", function()
  local cfg, w = weights.load(tiny())
  assert_equal(w.device, "cpu")
  assert_equal(#w.layers, 4)
  assert_equal(#w.mtp, 1)
  assert(w.mtp_bound)
  local kinds, routers = {}, {}
  for i, layer in ipairs(cfg.layers) do
    local b = w.layers[i]
    kinds[i], routers[i] = layer.kind, layer.router
    assert_equal(b.attn.compressor ~= nil, layer.kind ~= "window", "compressor of layer " .. i)
    assert_equal(b.attn.indexer ~= nil, layer.kind == "csa", "indexer of layer " .. i)
    assert_equal(b.ffn.gate.tid2eid ~= nil, layer.router == "hash")
    assert_equal(b.ffn.gate.bias ~= nil, layer.router == "learned")
    assert_equal(#b.ffn.experts, 8)
  end
  assert_equal(kinds, { "window", "csa", "hca", "csa" })
  assert_equal(routers, { "hash", "hash", "learned", "learned" })
  local m = w.mtp[1]
  assert(m.ffn.gate.bias and not m.ffn.gate.tid2eid and not m.attn.compressor)
  assert(m.e_proj and m.h_proj and m.enorm and m.hnorm and m.norm and m.hc_head.fn)
  -- every stored tensor is in w.tensors, once
  local count = 0
  for _ in pairs(w.tensors) do count = count + 1 end
  assert_equal(count, #dsrt.safetensors.open(tiny()))
  -- the CPU tensors are views of the mapping, not copies
  assert_equal(w.embed.shape, { 129280, 128 })
end)

-- The format of every linear and the dtype of every other tensor, as SPEC §2 gives them.
test("formats_are_told_from_the_dtypes", function()
  local cfg, w = weights.load(tiny())
  local d = cfg.dims
  local function check_linear(lin, format, out_features, in_features, where)
    assert_equal(lin.format, format, where)
    local weight_dtype = ({ fp8 = "f8e4m3", fp4 = "fp4e2m1", bf16 = "bf16" })[format]
    assert_equal(lin.weight.dtype, weight_dtype, where)
    assert_equal(lin.weight.shape, { out_features, in_features }, where)
    if format == "fp8" then
      assert_equal(lin.scale.dtype, "f8e8m0", where)
      assert_equal(lin.scale.shape, { (out_features + 127) // 128, (in_features + 127) // 128 }, where)
      assert_equal(lin.block, { 128, 128 }, where)
    elseif format == "fp4" then
      assert_equal(lin.scale.dtype, "f8e8m0", where)
      assert_equal(lin.scale.shape, { out_features, in_features // 32 }, where)
      assert_equal(lin.block, { 1, 32 }, where)
    else
      assert_equal({ lin.scale, lin.block }, {}, where)
    end
  end
  local function check_compressor(c, width, coff, ratio, where)
    check_linear(c.wkv, "bf16", coff * width, d.dim, where .. ".wkv")
    check_linear(c.wgate, "bf16", coff * width, d.dim, where .. ".wgate")
    assert_equal({ c.ape.dtype, c.ape.shape }, { "f32", { ratio, coff * width } }, where)
    assert_equal({ c.norm.dtype, c.norm.shape }, { "bf16", { width } }, where)
  end
  local function check_block(b, layer)
    local p = layer.prefix
    for _, norm in ipairs({ b.attn_norm, b.ffn_norm }) do assert_equal({ norm.dtype, norm.shape }, { "bf16", { d.dim } }) end
    for _, hc in ipairs({ b.hc_attn, b.hc_ffn }) do
      assert_equal({ hc.fn.dtype, hc.fn.shape, hc.base.shape, hc.scale.shape }, { "f32", { 24, 512 }, { 24 }, { 3 } })
    end
    local a = b.attn
    assert_equal({ a.attn_sink.dtype, a.attn_sink.shape }, { "f32", { 4 } })
    check_linear(a.wq_a, "fp8", 128, 128, p .. "wq_a")
    check_linear(a.wq_b, "fp8", 4 * 512, 128, p .. "wq_b")
    check_linear(a.wkv, "fp8", 512, 128, p .. "wkv")
    check_linear(a.wo_a, "fp8", 2 * 128, 2 * 512, p .. "wo_a")
    check_linear(a.wo_b, "fp8", 128, 2 * 128, p .. "wo_b")
    if a.compressor then check_compressor(a.compressor, 512, layer.coff, layer.ratio, p .. "compressor") end
    if a.indexer then
      check_linear(a.indexer.wq_b, "fp8", 8 * 128, 128, p .. "indexer.wq_b")
      check_linear(a.indexer.weights_proj, "bf16", 8, 128, p .. "weights_proj")
      check_compressor(a.indexer.compressor, 128, 2, 4, p .. "indexer.compressor")
    end
    local gate = b.ffn.gate
    assert_equal({ gate.weight.dtype, gate.weight.shape }, { "bf16", { 8, 128 } })
    if gate.tid2eid then assert_equal({ gate.tid2eid.dtype, gate.tid2eid.shape }, { "i32", { 129280, 2 } }) end
    if gate.bias then assert_equal({ gate.bias.dtype, gate.bias.shape }, { "f32", { 8 } }) end
    for e, expert in ipairs(b.ffn.experts) do
      local where = p .. "experts." .. (e - 1)
      check_linear(expert.w1, "fp4", 128, 128, where .. ".w1")
      check_linear(expert.w3, "fp4", 128, 128, where .. ".w3")
      check_linear(expert.w2, "fp4", 128, 128, where .. ".w2")
    end
    for _, role in ipairs({ "w1", "w3" }) do check_linear(b.ffn.shared_experts[role], "fp8", 128, 128, p .. role) end
    check_linear(b.ffn.shared_experts.w2, "fp8", 128, 128, p .. "shared w2")
  end
  for i, layer in ipairs(cfg.layers) do check_block(w.layers[i], layer) end
  check_block(w.mtp[1], cfg.mtp[1])
  check_linear(w.mtp[1].e_proj, "fp8", 128, 128, "e_proj")
  check_linear(w.mtp[1].h_proj, "fp8", 128, 128, "h_proj")
  assert_equal({ w.embed.dtype, w.head.dtype, w.norm.dtype, w.hc_head.fn.dtype }, { "bf16", "bf16", "bf16", "f32" })
  assert_equal({ w.hc_head.fn.shape, w.hc_head.base.shape, w.hc_head.scale.shape }, { { 4, 512 }, { 4 }, { 1 } })
  -- the FP4 codes are the I8 bytes read as e2m1, low nibble first (SPEC §2.1)
  local expert = w.layers[1].ffn.experts[1].w1
  assert_equal(expert.weight:bitcast("i8"):totable(), w.tensors["layers.0.ffn.experts.0.w1.weight"]:totable())
end)

test("loading_gives_back_the_random_weights_the_file_was_made_from", function()
  local cfg, loaded = weights.load(tiny())
  local generated = weights.random(cfg, { seed = SEED })
  local names = 0
  for name, t in pairs(generated.tensors) do
    names = names + 1
    assert(same_bytes(loaded.tensors[name], t), name .. " differs between the file and weights.random")
  end
  assert_equal(names, #dsrt.safetensors.open(tiny()))
end)

test("the_same_seed_writes_byte_identical_files_and_the_tokenizer_is_copied", function()
  local fake = new_folder() .. "/tokenizer.json"
  local f = assert(io.open(fake, "wb"))
  f:write('{"model": {}}')
  f:close()
  local again = make_tiny_model(SEED, "--tokenizer " .. shell_quote(fake))
  for _, file in ipairs({ "config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                          "model-00002-of-00002.safetensors" }) do
    assert(read_file(tiny() .. "/" .. file) == read_file(again .. "/" .. file), file .. " differs between two runs")
  end
  assert_equal(read_file(again .. "/tokenizer.json"), '{"model": {}}')
  local ok, _, status = os.execute(string.format("%s scripts/make_tiny_model.lua --seed x 2>/dev/null", shell_quote(BIN)))
  assert(not ok and status == 2, "bad arguments exit with status 2")
end)

-- ---- broken checkpoints ----

-- Each case edits the tiny checkpoint's tensors; bind must refuse it with one message holding
-- every listed fragment (and the problem count).
local BROKEN = {
  {
    what = "two tensors removed and one added",
    edit = function(t, base)
      t["layers.2.attn.wq_b.scale"] = nil
      t["layers.0.ffn.experts.5.w3.weight"] = nil
      t["layers.0.ffn.experts.8.w1.weight"] = base["layers.0.ffn.experts.7.w1.weight"]
    end,
    expect = { "3 problems", "missing (2): layers.0.ffn.experts.5.w3.weight, layers.2.attn.wq_b.scale",
               "unexpected (1): layers.0.ffn.experts.8.w1.weight" },
  },
  {
    what = "a wrong shape",
    edit = function(t) t["layers.1.attn.wkv.weight"] = t["layers.1.attn.wkv.weight"]:narrow(1, 1, 256) end,
    expect = { "1 problem\n", "wrong shape (1): layers.1.attn.wkv.weight [256, 128] (expected [512, 128])" },
  },
  {
    what = "a wrong dtype",
    edit = function(t) t["layers.3.attn.wq_a.weight"] = t["layers.3.attn.wq_a.weight"]:to("bf16") end,
    expect = { "wrong dtype (1): layers.3.attn.wq_a.weight bf16 (expected f8e4m3)" },
  },
  {
    what = "a wrong scale dtype for an FP4 expert (only FP8 scales may be f32)",
    edit = function(t) t["layers.0.ffn.experts.0.w2.scale"] = t["layers.0.ffn.experts.0.w2.scale"]:to("f32") end,
    expect = { "wrong dtype (1): layers.0.ffn.experts.0.w2.scale f32 (expected f8e8m0)" },
  },
  {
    what = "tid2eid out of range",
    edit = function(t)
      local ids = t["layers.0.ffn.gate.tid2eid"]:clone()
      ids[7] = 8 -- n_routed_experts: one past the last expert
      ids[9][2] = -1
      t["layers.0.ffn.gate.tid2eid"] = ids
    end,
    expect = { "bad values (1): layers.0.ffn.gate.tid2eid holds expert ids from -1 to 8, outside [0, 8)" },
  },
  {
    what = "f32 scales that are not powers of two",
    edit = function(t)
      local s = t["layers.2.attn.wo_b.scale"]:to("f32")
      s[1][1] = 0.75
      s[1][2] = -0.5
      t["layers.2.attn.wo_b.scale"] = s
    end,
    expect = { "bad values (1): layers.2.attn.wo_b.scale has 2 f32 scales that are not powers of two" },
  },
  {
    what = "every kind at once",
    edit = function(t, base)
      t["norm.weight"] = nil
      t["extra.weight"] = base["norm.weight"]
      t["hc_head_fn"] = t["hc_head_fn"]:narrow(2, 1, 100)
      t["head.weight"] = t["head.weight"]:to("f32")
      local ids = t["layers.1.ffn.gate.tid2eid"]:to("i32")
      ids[1][1] = 100
      t["layers.1.ffn.gate.tid2eid"] = ids
    end,
    expect = { "5 problems", "missing (1): norm.weight", "unexpected (1): extra.weight",
               "wrong shape (1): hc_head_fn [4, 100] (expected [4, 512])",
               "wrong dtype (1): head.weight f32 (expected bf16)",
               "bad values (1): layers.1.ffn.gate.tid2eid holds expert ids from 0 to 100" },
  },
  {
    what = "a whole layer missing: 20 names listed, the rest counted",
    edit = function(t)
      for name in pairs(copy(t)) do
        if name:find("^layers%.3%.") then t[name] = nil end
      end
    end,
    expect = { "missing (", ", and ", " more" },
  },
}

test("broken_checkpoints_are_refused_with_every_problem_in_one_message", function()
  local cfg = config.load(tiny())
  local base = stored_tensors(tiny())
  for _, case in ipairs(BROKEN) do
    local t = copy(base)
    case.edit(t, base)
    local message = assert_error(weights.bind, nil, cfg, t)
    for _, fragment in ipairs(case.expect) do
      if not message:find(fragment, 1, true) then
        error(string.format("%s: message lacks %q:\n%s", case.what, fragment, message))
      end
    end
    assert(message:find("^dsv4%.weights: the tensors given against the config " .. literally(cfg.source)), message)
  end
  -- the listing of a kind stops at 20 names
  local t = copy(base)
  BROKEN[#BROKEN].edit(t)
  local message = assert_error(weights.bind, nil, cfg, t)
  local listed = message:match("missing %(%d+%): ([^\n]*), and %d+ more")
  local _, commas = listed:gsub(", ", "")
  assert_equal(commas + 1, 20)
end)

test("a_broken_folder_names_its_file_and_every_problem", function()
  local cfg = config.load(tiny())
  local t = stored_tensors(tiny())
  t["layers.0.attn.wq_a.weight"], t["mtp.0.hnorm.weight"] = nil, nil
  local folder = new_folder()
  weights.save(folder, tiny_raw_config(), t, { shards = 3 })
  local message = assert_error(weights.load, nil, folder)
  assert(message:find(folder .. " against the config " .. folder .. "/config.json: 2 problems", 1, true), message)
  assert(message:find("missing (2): layers.0.attn.wq_a.weight, mtp.0.hnorm.weight", 1, true), message)
  -- without MTP, mtp.* is ignored and the rest still reports its problem
  local without_mtp = assert_error(weights.load, nil, folder, { mtp = false })
  assert(without_mtp:find("1 problem\n  missing (1): layers.0.attn.wq_a.weight", 1, true), without_mtp)
  assert(cfg)
end)

test("int32_tid2eid_is_accepted_and_kept_as_int32", function()
  local cfg = config.load(tiny())
  local t = stored_tensors(tiny())
  local original = t["layers.1.ffn.gate.tid2eid"]
  t["layers.1.ffn.gate.tid2eid"] = original:to("i32")
  local w = weights.bind(cfg, t)
  local ids = w.layers[2].ffn.gate.tid2eid
  assert_equal(ids.dtype, "i32")
  assert(same_bytes(ids, original:to("i32")))
  -- the i64 one is converted exactly too
  assert(same_bytes(w.layers[1].ffn.gate.tid2eid, t["layers.0.ffn.gate.tid2eid"]:to("i32")))
  assert_equal(w.layers[1].ffn.gate.tid2eid:to("i64"):ne(t["layers.0.ffn.gate.tid2eid"]):sum():item(), 0)
end)

test("fp8_scales_stored_as_f32_powers_of_two_are_accepted", function()
  local cfg = config.load(tiny())
  local t = stored_tensors(tiny())
  t["layers.0.attn.wo_a.scale"] = t["layers.0.attn.wo_a.scale"]:to("f32")
  local w = weights.bind(cfg, t)
  assert_equal(w.layers[1].attn.wo_a.scale.dtype, "f32")
  assert_equal(w.layers[1].attn.wo_a.format, "fp8")
end)

test("mtp_binding_follows_the_option_and_the_source", function()
  local cfg = config.load(tiny())
  local t = stored_tensors(tiny())
  assert_equal(#weights.bind(cfg, t, { mtp = false }).mtp, 0)
  local no_mtp = copy(t)
  for name in pairs(t) do
    if name:find("^mtp%.") then no_mtp[name] = nil end
  end
  local w = weights.bind(cfg, no_mtp)
  assert_equal({ #w.mtp, w.mtp_bound }, { 0, false })
  local message = assert_error(weights.bind, nil, cfg, no_mtp, { mtp = true })
  assert(message:find("missing (", 1, true) and message:find("mtp.0.e_proj.weight", 1, true), message)
  local plain = small_config(function(raw)
    raw.num_nextn_predict_layers = 0
    raw.compress_ratios = { 0, 4, 128, 4 }
  end)
  assert_error(weights.random, "mtp = true, but the config has no MTP layers", plain, { mtp = true })
  assert_error(weights.bind, "must be a safetensors handle or a table of tensors", cfg, "folder")
  assert_error(weights.bind, "'x' is a number, not a tensor", cfg, { x = 1 })
end)

-- ---- random weights ----

test("random_weights_are_deterministic_by_seed_and_name", function()
  local cfg = small_config()
  local a = random.tensors(cfg, { seed = 11 })
  local b = random.tensors(cfg, { seed = 11 })
  local c = random.tensors(cfg, { seed = 12 })
  local drawn = 0
  for name, t in pairs(a) do
    assert(same_bytes(t, b[name]), name .. " differs for the same seed")
    -- everything drawn differs with the seed; constants (norms, HC base/scale, sinks) do not, and
    -- tensors of a few elements (the single scale of a 128×128 weight) may agree by chance
    local constant = t:to("f32"):eq(t:to("f32"):flatten()[1]):sum():item() == t:numel()
    if not constant and t:numel() >= 64 then
      drawn = drawn + 1
      assert(not same_bytes(t, c[name]), name .. " is the same for another seed")
    end
  end
  assert(drawn > 300, "most tensors are drawn: " .. drawn)
  -- different names give different numbers, experts of one batch included
  assert(not same_bytes(a["layers.0.attn.wq_a.weight"], a["layers.1.attn.wq_a.weight"]))
  assert(not same_bytes(a["layers.2.ffn.experts.0.w1.weight"], a["layers.2.ffn.experts.1.w1.weight"]))
  assert(not same_bytes(a["layers.2.ffn.experts.0.w1.scale"], a["layers.2.ffn.experts.1.w1.scale"]))
  -- a tensor depends on its name and the seed only, not on the rest of the config
  local other = small_config(function(raw) raw.num_hidden_layers, raw.compress_ratios = 2, { 0, 4, 0 } end)
  local d = random.tensors(other, { seed = 11, mtp = false })
  assert(same_bytes(d["layers.1.attn.indexer.wq_b.weight"], a["layers.1.attn.indexer.wq_b.weight"]))
  assert_equal(d["mtp.0.e_proj.weight"], nil)
  -- the per-tensor seed: 63 bits, changing with the seed and the name
  local s = random.tensor_seed(11, "embed.weight")
  assert(s >= 0 and s ~= random.tensor_seed(12, "embed.weight") and s ~= random.tensor_seed(11, "head.weight"))
  -- pinned (computed independently in Python): a change here changes every random weight
  assert_equal(random.tensor_seed(0, "embed.weight"), 2344049292952389920)
  assert_equal(random.tensor_seed(11, "layers.0.attn.wq_a.weight"), 2227184783519174115)
end)

-- Dequantised RMS of every linear near 1/√in (tiles scale by 2^0 or 2^1 around it: per matrix
-- between 0.63 and 1.26 of it, FP4 a little less where codes saturate at ±6); FP8 codes well
-- inside ±448; the documented constants; distinct in-range tid2eid rows.
test("random_weights_have_the_documented_magnitudes", function()
  local cfg = small_config()
  local w = weights.random(cfg, { seed = 5 })
  local function each_linear(fn)
    local function walk(node, path)
      if type(node) ~= "table" then return end
      if node.format then return fn(node, path) end
      for k, v in pairs(node) do
        if k ~= "tensors" then walk(v, path .. "." .. tostring(k)) end
      end
    end
    walk(w, "w")
  end
  local checked = 0
  each_linear(function(lin, path)
    local d = weights.dequantise(lin)
    local rms = math.sqrt((d * d):mean():item()) * math.sqrt(d.shape[2])
    assert(rms > 0.5 and rms < 1.4, string.format("%s: RMS·√in = %.3f", path, rms))
    if lin.format == "fp8" then
      local codes = lin.weight:to("f32"):abs()
      assert(codes:max():item() <= 388, path) -- 8.57 σ with σ ≤ 32√2, rounded to e4m3
      assert(codes:ne(codes):sum():item() == 0, path .. " has NaN codes")
    end
    if lin.format ~= "bf16" then
      -- two exponents per tensor, one apart
      local s = lin.scale:to("f32")
      local ratio = s:max():item() / s:min():item()
      assert(ratio == 1 or ratio == 2, path .. " scale spread " .. ratio)
    end
    checked = checked + 1
  end)
  assert(checked > 100, "linears checked: " .. checked)
  local b = w.layers[2]
  assert_equal(b.attn_norm:to("f32"):eq(1):sum():item(), 128)
  assert_equal(b.hc_attn.base:abs():sum():item(), 0)
  assert_equal(b.hc_attn.scale:totable(), { 1, 1, 1 })
  assert_equal(b.attn.attn_sink:abs():sum():item(), 0)
  local fn_std = math.sqrt((b.hc_attn.fn * b.hc_attn.fn):mean():item()) * math.sqrt(512)
  assert(fn_std > 0.9 and fn_std < 1.1, "hc fn std·√(hc·dim) " .. fn_std)
  local ids = w.layers[1].ffn.gate.tid2eid
  assert(ids:min():item() >= 0 and ids:max():item() < 8)
  assert_equal(ids:select(2, 1):eq(ids:select(2, 2)):sum():item(), 0)
  local embed_std = math.sqrt((w.embed:to("f32") ^ 2):mean():item())
  assert(embed_std > 0.95 and embed_std < 1.05, "embed std " .. embed_std)
end)

-- gain scales every linear exactly (FP8/FP4 through the scale exponent, bf16 through the std) and
-- leaves every other tensor as it was
test("random_weights_gain_scales_the_linears_only", function()
  local cfg = small_config()
  local a, b = weights.random(cfg, { seed = 5 }), weights.random(cfg, { seed = 5, gain = 0.5 })
  local function walk(x, y, path, counts)
    if dsrt.is_tensor(x) and (path:match("%.head$") or path:match("%.gate%.weight$")) then
      -- bf16 linears held as plain tensors (the head, the router gate)
      assert_equal(dsrt.max_abs_diff(x:to("f32") * 0.5, y:to("f32")), 0, path)
      counts.linear = counts.linear + 1
    elseif dsrt.is_tensor(x) then
      assert(same_bytes(x, y), path .. " changed with the gain")
      counts.other = counts.other + 1
    elseif type(x) == "table" and x.format then
      local dx, dy = weights.dequantise(x), weights.dequantise(y)
      assert_equal(dsrt.max_abs_diff(dx * 0.5, dy), 0, path)
      counts.linear = counts.linear + 1
    elseif type(x) == "table" then
      for k, v in pairs(x) do
        if k ~= "tensors" then walk(v, y[k], path .. "." .. tostring(k), counts) end
      end
    end
  end
  local counts = { linear = 0, other = 0 }
  walk(a, b, "w", counts)
  assert(counts.linear > 100 and counts.other > 50, counts.linear .. " linears, " .. counts.other .. " others")
  assert_error(random.tensors, "gain must be a number in %(0, 4%]", cfg, { gain = 0 })
end)

test("flash_base_and_bf16_only_variants_bind", function()
  -- Flash-Base: FP8 experts with f32 power-of-two scales (SPEC §1.4)
  local base_cfg, base_raw = small_config(function(raw) raw.expert_dtype = "fp8" end)
  local w = weights.random(base_cfg, { seed = 2 })
  local expert = w.layers[1].ffn.experts[1].w1
  assert_equal({ expert.format, expert.weight.dtype, expert.scale.dtype }, { "fp8", "f8e4m3", "f32" })
  assert_equal(expert.scale.shape, { 1, 1 })
  -- through a folder too
  local folder = new_folder()
  weights.save(folder, base_raw, random.tensors(base_cfg, { seed = 2 }), { shards = 2 })
  local _, loaded = weights.load(folder)
  assert(same_bytes(loaded.layers[1].ffn.experts[1].w1.scale, expert.scale))
  -- no quantization_config: every linear bf16, no scales
  local plain_cfg = small_config(function(raw) raw.quantization_config, raw.expert_dtype = nil, nil end)
  local plain = weights.random(plain_cfg, { seed = 2 })
  local lins = { plain.layers[2].attn.wq_b, plain.layers[2].ffn.experts[3].w2, plain.mtp[1].h_proj,
                 plain.layers[3].ffn.shared_experts.w1 }
  for _, lin in ipairs(lins) do
    assert_equal({ lin.format, lin.weight.dtype, lin.scale }, { "bf16", "bf16", nil })
  end
  -- a bf16 checkpoint offered to an FP8 config is refused, naming the dtypes
  local message = assert_error(weights.bind, nil, small_config(), random.tensors(plain_cfg, { seed = 2 }))
  assert(message:find("layers.0.attn.wq_a.weight bf16 (expected f8e4m3)", 1, true), message)
  assert(message:find("missing (", 1, true) and message:find("layers.0.attn.wq_a.scale", 1, true), message)
end)

-- The config the GPU test generates at full size (tests/gpu/test_gpu_weights.lua): Flash with its
-- first four layers and the MTP layer. Here only its shape is checked; drawing 20 GB needs a GPU.
test("the_flash_slice_config_covers_every_layer_kind", function()
  local raw = cjson.decode(read_file(FIXTURES .. "flash_published.json"))
  raw.num_hidden_layers = 4
  raw.compress_ratios = { 0, 0, 4, 128, 0 }
  local cfg = config.parse(raw, "flash slice")
  local kinds = {}
  for i, layer in ipairs(cfg.layers) do kinds[i] = layer.kind .. "/" .. layer.router end
  assert_equal(kinds, { "window/hash", "window/hash", "csa/hash", "hca/learned" })
  assert_equal({ cfg.mtp[1].kind, cfg.mtp[1].router }, { "window", "learned" })
  local bytes = memory.estimate(cfg, { mtp = true }).weight_bytes
  assert(bytes > 19e9 and bytes < 21e9, "flash slice bytes " .. bytes)
end)

test("dequantise_and_save_check_their_input", function()
  -- an FP8 tile covers 128 rows and columns even when the matrix has fewer
  local lin = { weight = dsrt.full({ 3, 130 }, 2, { dtype = "f8e4m3" }), format = "fp8", block = { 128, 128 },
                scale = dsrt.tensor({ { 0.5, 4 } }):to("f8e8m0") }
  local d = weights.dequantise(lin, "bf16")
  assert_equal({ d.dtype, d.shape }, { "bf16", { 3, 130 } })
  assert_equal({ d[3][128]:item(), d[3][129]:item() }, { 1.0, 8.0 })
  local fp4 = { weight = dsrt.full({ 2, 64 }, 1.5, { dtype = "fp4e2m1" }), format = "fp4", block = { 1, 32 },
                scale = dsrt.tensor({ { 1, 2 }, { 4, 8 } }):to("f8e8m0") }
  assert_equal(weights.dequantise(fp4)[2][33]:item(), 12.0)
  local folder = new_folder()
  assert_error(weights.save, "shards must be an integer from 1 to the number of tensors", folder, {}, { x = dsrt.ones(2) },
               { shards = 2 })
  weights.save(folder, { a = 1.5, b = { 2, 3 }, c = "x", d = 1e-6, e = true, f = 10.0 }, { x = dsrt.ones(2) })
  assert_equal(read_file(folder .. "/config.json"),
               '{\n  "a": 1.5,\n  "b": [\n    2,\n    3\n  ],\n  "c": "x",\n  "d": 1e-06,\n  "e": true,\n  "f": 10\n}\n')
end)

return tests
