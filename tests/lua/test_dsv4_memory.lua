-- test_dsv4_memory.lua — dsrt.dsv4.memory against the byte counts of SPEC §2.6 (checkpoint),
-- §11.1 (KV and state per sequence) and §11.2 (weights read per decoded token) for Flash, and
-- against hand-computed sizes for a tiny config with ratios 8 and 64 and two MTP layers.
local cjson = require "cjson"
local config = require "dsrt.dsv4.config"
local memory = require "dsrt.dsv4.memory"
local h = require "tests.helpers"
local assert_error, assert_equal = h.assert_error, h.assert_equal

local tests = {}
local function test(name, fn) tests[#tests + 1] = { name, fn } end

local FIXTURES = "tests/fixtures/config/"
local KiB, MiB, GiB = 2 ^ 10, 2 ^ 20, 2 ^ 30

local flash = config.load(FIXTURES .. "flash_published.json")
local tiny = config.load(FIXTURES .. "tiny_ratios.json")

-- `actual` agrees with a figure the SPEC prints: |actual - stated| <= tolerance
local function assert_near(actual, stated, tolerance, what)
  if math.abs(actual - stated) > tolerance then
    error(string.format("%s: %.6g is not within %g of %g", what, actual, tolerance, stated), 2)
  end
end

local function tensors_by_name(cfg, with_mtp)
  local map = {}
  for _, t in ipairs(memory.tensors(cfg, with_mtp)) do map[t.name] = t end
  return map
end

local function elements(t)
  local n = t.count
  for _, size in ipairs(t.shape) do n = n * size end
  return n
end

-- ---- weights (SPEC §2) ----

test("flash_checkpoint_bytes_and_tensor_count_match_spec_2_6", function()
  assert_equal(memory.estimate(flash, { mtp = true }).weight_bytes, 159609485896)
  assert_equal(memory.estimate(flash, { mtp = false }).weight_bytes, 156015698140)
  local count, mtp_count = 0, 0
  for _, t in ipairs(memory.tensors(flash, true)) do
    count = count + t.count
    if t.name:find("^mtp%.0%.") then mtp_count = mtp_count + t.count end
  end
  assert_equal(count, 69187)
  assert_equal(mtp_count, 1575)
end)

test("flash_bytes_by_dtype_match_spec_2_6", function()
  local bytes = {}
  local size = { BF16 = 2, F32 = 4, F8_E4M3 = 1, F8_E8M0 = 1, I8 = 1, I64 = 8 }
  for _, t in ipairs(memory.tensors(flash, true)) do
    bytes[t.dtype] = (bytes[t.dtype] or 0) + elements(t) * size[t.dtype]
  end
  -- as SPEC §2.6 prints them, in GB / MB
  assert_near(bytes.I8 / 1e9, 141.73, 0.005, "I8 (fp4)")
  assert_near(bytes.F8_E8M0 / 1e9, 8.86, 0.005, "e8m0 scales")
  assert_near(bytes.F8_E4M3 / 1e9, 6.02, 0.005, "fp8")
  assert_near(bytes.BF16 / 1e9, 2.83, 0.005, "bf16")
  assert_near(bytes.F32 / 1e9, 0.145, 0.0005, "fp32")
  assert_near(bytes.I64 / 1e6, 18.6, 0.05, "int64")
end)

test("flash_tensor_shapes_and_dtypes_match_spec_2_2_to_2_5", function()
  local t = tensors_by_name(flash, true)
  local function check(name, dtype, shape, count)
    local entry = t[name]
    if not entry then error("no tensor " .. name, 2) end
    assert_equal({ entry.dtype, entry.shape, entry.count }, { dtype, shape, count or 1 }, name)
  end
  check("embed.weight", "BF16", { 129280, 4096 })
  check("head.weight", "BF16", { 129280, 4096 })
  check("hc_head_fn", "F32", { 4, 16384 })
  check("layers.0.hc_attn_fn", "F32", { 24, 16384 })
  check("layers.0.hc_ffn_scale", "F32", { 3 })
  check("layers.0.attn.wq_a.weight", "F8_E4M3", { 1024, 4096 })
  check("layers.0.attn.wq_a.scale", "F8_E8M0", { 8, 32 })
  check("layers.0.attn.wq_b.scale", "F8_E8M0", { 256, 8 })
  check("layers.0.attn.wo_a.weight", "F8_E4M3", { 8192, 4096 })
  check("layers.0.attn.wo_b.scale", "F8_E8M0", { 32, 64 })
  check("layers.0.ffn.gate.tid2eid", "I64", { 129280, 6 })
  check("layers.2.ffn.gate.tid2eid", "I64", { 129280, 6 })
  check("layers.3.ffn.gate.bias", "F32", { 256 })
  check("layers.3.ffn.experts.{e}.w1.weight", "I8", { 2048, 2048 }, 256)
  check("layers.3.ffn.experts.{e}.w1.scale", "F8_E8M0", { 2048, 128 }, 256)
  check("layers.3.ffn.experts.{e}.w2.weight", "I8", { 4096, 1024 }, 256)
  check("layers.3.ffn.experts.{e}.w2.scale", "F8_E8M0", { 4096, 64 }, 256)
  check("layers.3.ffn.shared_experts.w2.scale", "F8_E8M0", { 32, 16 })
  -- CSA (layer 2) and HCA (layer 3) compressors, the indexer (SPEC §2.4)
  check("layers.2.attn.compressor.wkv.weight", "BF16", { 1024, 4096 })
  check("layers.2.attn.compressor.ape", "F32", { 4, 1024 })
  check("layers.2.attn.indexer.wq_b.scale", "F8_E8M0", { 64, 8 })
  check("layers.2.attn.indexer.weights_proj.weight", "BF16", { 64, 4096 })
  check("layers.2.attn.indexer.compressor.wgate.weight", "BF16", { 256, 4096 })
  check("layers.2.attn.indexer.compressor.ape", "F32", { 4, 256 })
  check("layers.2.attn.indexer.compressor.norm.weight", "BF16", { 128 })
  check("layers.3.attn.compressor.wgate.weight", "BF16", { 512, 4096 })
  check("layers.3.attn.compressor.ape", "F32", { 128, 512 })
  -- MTP (SPEC §2.5): a learned gate, its own projections and head, no embedding or head
  check("mtp.0.ffn.gate.bias", "F32", { 256 })
  check("mtp.0.e_proj.scale", "F8_E8M0", { 32, 32 })
  check("mtp.0.hc_head_scale", "F32", { 1 })
  for _, absent in ipairs({ "layers.3.ffn.gate.tid2eid", "layers.2.ffn.gate.bias", "layers.3.attn.indexer.wq_b.weight",
                            "layers.0.attn.compressor.ape", "mtp.0.ffn.gate.tid2eid", "mtp.0.attn.compressor.ape",
                            "mtp.0.head.weight" }) do
    assert_equal(t[absent], nil, absent)
  end
end)

test("every_format_holds_the_same_logical_parameters", function()
  -- plain bf16 stores each logical parameter once, so its element count is SPEC §2.6's parameter
  -- count: 284.33 B for the main model, 290.94 B with MTP
  local bf16 = config.load(FIXTURES .. "flash_bf16.json")
  local base = config.load(FIXTURES .. "flash_base.json")
  local function parameters(cfg, with_mtp)
    local n = 0
    for _, t in ipairs(memory.tensors(cfg, with_mtp)) do
      if not t.name:find("%.scale$") then n = n + elements(t) * (t.dtype == "I8" and 2 or 1) end
    end
    return n
  end
  assert_near(parameters(bf16, false) / 1e9, 284.33, 0.005, "main parameters")
  assert_near(parameters(bf16, true) / 1e9, 290.94, 0.005, "parameters with MTP")
  for _, cfg in ipairs({ flash, base }) do
    assert_equal(parameters(cfg, true), parameters(bf16, true), cfg.source)
  end
  for _, t in ipairs(memory.tensors(bf16, true)) do
    assert(not t.name:find("%.scale$") and t.dtype ~= "F8_E4M3" and t.dtype ~= "I8", t.name)
  end
  -- Flash-Base: FP8 experts in 128×128 tiles, every FP8 scale stored as fp32 (SPEC §1.4)
  local t = tensors_by_name(base, true)
  assert_equal({ t["layers.3.ffn.experts.{e}.w1.weight"].dtype, t["layers.3.ffn.experts.{e}.w1.weight"].shape },
               { "F8_E4M3", { 2048, 4096 } })
  assert_equal({ t["layers.3.ffn.experts.{e}.w2.scale"].dtype, t["layers.3.ffn.experts.{e}.w2.scale"].shape },
               { "F32", { 32, 16 } })
  assert_equal(t["layers.0.attn.wq_a.scale"].dtype, "F32")
end)

-- ---- KV cache and state (SPEC §11.1) ----

test("flash_reference_kv_matches_spec_11_1", function()
  local e = memory.estimate(flash, { layout = "reference" })
  assert_equal(e.kv_bytes_per_token, 6880)
  -- the table row by row: a 128-slot ring of 1024 B latents on all 43 layers; CSA main state
  -- 2×8×1024×4 and indexer state 2×8×256×4 on 21; HCA state 2×128×512×4 on 20
  local rings = 43 * 128 * 1024
  local csa = 21 * (2 * 8 * 1024 * 4 + 2 * 8 * 256 * 4)
  local hca = 20 * (2 * 128 * 512 * 4)
  assert_equal(e.kv_fixed_bytes, rings + csa + hca)
  assert_near(e.kv_fixed_bytes / MiB, 17.0, 0.05, "fixed MiB")
  assert_equal(e.by_kind.window, { layers = 2, weight_bytes = e.by_kind.window.weight_bytes, kv_bytes_per_token = 0,
                                   kv_fixed_bytes = 2 * 128 * KiB, kv_bytes = 2 * 128 * KiB, kv_read_bytes = 0 })
  assert_equal({ e.by_kind.csa.layers, e.by_kind.csa.kv_bytes_per_token, e.by_kind.csa.kv_fixed_bytes },
               { 21, 21 * 320, 21 * (128 + 64 + 16) * KiB })
  assert_equal({ e.by_kind.hca.layers, e.by_kind.hca.kv_bytes_per_token, e.by_kind.hca.kv_fixed_bytes },
               { 20, 20 * 8, 20 * (128 + 512) * KiB })
  -- the MTP layer adds its own window ring (SPEC §11.1: "2 (+1 MTP)")
  local with_mtp = memory.estimate(flash, { layout = "reference", mtp = true })
  assert_equal(with_mtp.kv_fixed_bytes - e.kv_fixed_bytes, 128 * KiB)
  assert_equal(with_mtp.by_kind.window.layers, 3)
end)

test("flash_native_kv_matches_spec_11_1", function()
  local e = memory.estimate(flash, { layout = "native" })
  assert_equal(e.kv_bytes_per_token, 3514.25)
  assert_equal(e.by_kind.csa.kv_bytes_per_token, 21 * (584 / 4 + 68 / 4))
  assert_equal(e.by_kind.hca.kv_bytes_per_token, 20 * 584 / 128)
  local rings = 43 * 128 * 584
  local states = 21 * 80 * KiB + 20 * 512 * KiB
  assert_equal(e.kv_fixed_bytes, rings + states)
  assert_near(rings / MiB, 3.07, 0.005, "rings MiB")
  assert_near(states / MiB, 11.6, 0.05, "states MiB")
  assert_near(e.kv_fixed_bytes / MiB, 14.7, 0.05, "fixed MiB")
end)

test("flash_kv_per_sequence_examples_of_spec_11_1", function()
  local examples = {
    -- layout, context, the SPEC's figure, its unit
    { "native", 4096, 28, MiB }, { "native", 65536, 234, MiB }, { "native", 1048576, 3.45, GiB },
    { "reference", 4096, 44, MiB }, { "reference", 65536, 447, MiB }, { "reference", 1048576, 6.7, GiB },
  }
  for _, x in ipairs(examples) do
    local layout, context, stated, unit = x[1], x[2], x[3], x[4]
    local e = memory.estimate(flash, { layout = layout, context = context })
    -- every context here is a multiple of 128, so no compressed window is partial
    assert_equal(e.kv_bytes, e.kv_fixed_bytes + e.kv_bytes_per_token * context)
    local what = layout .. " " .. context
    if layout == "native" and context == 4096 then
      -- 28.43 MiB: the SPEC's "≈ 28" is 1.5% off, within its two digits
      assert_near(e.kv_bytes / unit, stated, 0.5, what)
    else
      assert_near(e.kv_bytes / unit, stated, 0.01 * stated, what)
    end
  end
  -- allocation is ceil(L/r) entries: 1000 tokens keep 250 CSA entries (+ indexer keys), 8 HCA ones
  local e = memory.estimate(flash, { layout = "reference", context = 1000 })
  assert_equal(e.kv_bytes, e.kv_fixed_bytes + 21 * 250 * (1024 + 256) + 20 * 8 * 1024)
end)

test("flash_kv_read_per_decoded_token_of_spec_11_1", function()
  -- native: ≈ 11 MB at 4K, 39 MB at 64K, 480 MB at 1M
  for _, x in ipairs({ { 4096, 11, 0.5 }, { 65536, 39, 0.5 }, { 1048576, 480, 5 } }) do
    local e = memory.estimate(flash, { layout = "native", context = x[1] })
    assert_near(e.kv_read_bytes / 1e6, x[2], x[3], "read at " .. x[1])
  end
  -- at 4K exactly: every ring, 1024 indexer keys and 512 latents per CSA layer, 32 latents per HCA one
  local e = memory.estimate(flash, { layout = "native", context = 4096 })
  assert_equal(e.kv_read_bytes, 43 * 128 * 584 + 21 * (1024 * 68 + 512 * 584) + 20 * 32 * 584)
end)

-- ---- weights read per decoded token (SPEC §11.2) ----

test("flash_decode_weight_bytes_match_spec_11_2", function()
  local total, per = memory.decode_weight_bytes(flash)
  assert_equal(total, 11217580396)
  -- the table's rows: attention, 6 routed experts, shared expert, HC, gate, norms (every layer);
  -- compressor + indexer (CSA), compressor (HCA); the gate bias on learned layers and one tid2eid
  -- row (6 × 8 B) on hash layers
  local common = 106961536 + 80216064 + 25167360 + 3145944 + 2097152 + 19456
  assert_equal(per.layers[1], common + 48)                 -- layer 0, window + hash
  assert_equal(per.layers[3], common + 29906688 + 48)      -- layer 2, CSA + hash
  assert_equal(per.layers[5], common + 29906688 + 1024)    -- layer 4, CSA
  assert_equal(per.layers[4], common + 8651776 + 1024)     -- layer 3, HCA
  assert_near(per.layers[1] / 1e6, 217.6, 0.1, "window+hash layer")
  assert_near(per.layers[5] / 1e6, 247.5, 0.1, "CSA layer")
  assert_near(per.layers[4] / 1e6, 226.3, 0.1, "HCA layer")
  assert_near(per.global / 1e6, 1059.1 + 0.28, 0.1, "LM head, embedding row, hc_head, final norm")
  assert_near(per.mtp_step / 1e9, 1.31, 0.005, "MTP draft step")
end)

-- ---- devices ----

test("pipeline_split_over_devices", function()
  local order = { "embed" }
  for id = 0, 42 do order[#order + 1] = "layers." .. id end
  order[#order + 1] = "head"
  order[#order + 1] = "mtp.0"
  for _, devices in ipairs({ 1, 2, 3, 8 }) do
    local e = memory.estimate(flash, { mtp = true, devices = devices, context = 65536 })
    local names, weights, kv, largest_part = {}, 0, 0, 0
    for k = 1, devices do
      assert(#e.device_parts[k] > 0, "device " .. k .. " holds nothing")
      for _, name in ipairs(e.device_parts[k]) do names[#names + 1] = name end
      weights, kv = weights + e.weight_bytes_per_device[k], kv + e.kv_bytes_per_device[k]
    end
    assert_equal(names, order, devices .. " devices")
    assert_equal(weights, e.weight_bytes)
    assert_equal(kv, e.kv_bytes)
    -- by bytes: no device is further from an equal share than one part (≤ 3.6 GB for Flash)
    for k = 1, devices do
      assert(math.abs(e.weight_bytes_per_device[k] - e.weight_bytes / devices) < 3.6e9, "device " .. k)
    end
  end
end)

-- ---- a tiny config: ratios 8 and 64, two MTP layers, the second compressed ----

test("tiny_tensors_follow_the_ratio_of_each_layer", function()
  local t = tensors_by_name(tiny, true)
  local function shape(name) return assert(t[name], name).shape end
  assert_equal(shape("layers.1.attn.compressor.ape"), { 8, 128 })     -- ratio 8: coff 1, head_dim 128
  assert_equal(shape("layers.1.attn.compressor.wkv.weight"), { 128, 256 })
  assert_equal(shape("layers.3.attn.compressor.ape"), { 64, 128 })    -- ratio 64
  assert_equal(shape("layers.2.attn.compressor.wkv.weight"), { 256, 256 })  -- ratio 4: coff 2
  assert_equal(shape("layers.2.attn.indexer.compressor.ape"), { 4, 128 })
  assert_equal(shape("layers.2.attn.indexer.wq_b.scale"), { 1, 1 })
  assert_equal(shape("mtp.1.attn.compressor.ape"), { 8, 128 })
  assert_equal(shape("layers.1.ffn.gate.tid2eid"), { 512, 2 })
  assert_equal(shape("mtp.1.ffn.gate.bias"), { 8 })
  assert_equal(t["layers.1.attn.indexer.wq_b.weight"], nil)
  assert_equal(t["mtp.0.attn.compressor.ape"], nil)
end)

test("tiny_kv_by_hand", function()
  -- reference layout: latent 2·128 = 256 B, indexer key 2·64 = 128 B, ring 16 slots; context 100
  local ring = 16 * 256
  local layer1 = ring + 2 * 8 * 128 * 4 + 13 * 256                                  -- r 8: ceil(100/8) = 13
  local layer2 = ring + 2 * 8 * 256 * 4 + 2 * 8 * 128 * 4 + 25 * (256 + 128)        -- r 4, indexer
  local layer3 = ring + 2 * 64 * 128 * 4 + 2 * 256                                  -- r 64: 2 entries
  local e = memory.estimate(tiny, { context = 100 })
  assert_equal(e.kv_bytes, ring + layer1 + layer2 + layer3)
  assert_equal(e.kv_bytes_per_token, 256 / 8 + (256 + 128) / 4 + 256 / 64)
  -- read by one decoded token: rings, 12 / 1 complete windows, 25 keys and top-8 latents
  assert_equal(e.kv_read_bytes, 4 * ring + 12 * 256 + 25 * 128 + 8 * 256 + 1 * 256)
  local with_mtp = memory.estimate(tiny, { context = 100, mtp = true })
  assert_equal(with_mtp.kv_bytes - e.kv_bytes, ring + layer1)   -- mtp.0 window, mtp.1 like layer 1
  assert_equal(with_mtp.by_kind.hca.layers, 3)
  -- native layout: 64 e4m3 + 64·2 bf16 + 1 e8m0 = 193, padded to 200; the key 32 + 2 = 34
  local native = memory.estimate(tiny, { context = 100, layout = "native" })
  assert_equal(native.kv_bytes_per_token, 200 / 8 + (200 + 34) / 4 + 200 / 64)
end)

test("tied_embeddings_store_and_read_one_matrix", function()
  local raw = cjson.decode(assert(io.open(FIXTURES .. "tiny_ratios.json")):read("a"))
  raw.tie_word_embeddings = true
  local tied = config.parse(raw, "tied")
  local matrix = 512 * 256 * 2
  assert_equal(memory.estimate(tiny).weight_bytes - memory.estimate(tied).weight_bytes, matrix)
  assert_equal(tensors_by_name(tied)["head.weight"], nil)
  assert(tensors_by_name(tiny)["head.weight"])
  local _, untied_per = memory.decode_weight_bytes(tiny)
  local _, tied_per = memory.decode_weight_bytes(tied)
  assert_equal(untied_per.global - tied_per.global, 256 * 2) -- the embedding row no longer read apart
end)

test("estimate_options_are_checked", function()
  assert_error(function() memory.estimate(flash, { context = -1 }) end, "context must be an integer >= 0")
  assert_error(function() memory.estimate(flash, { context = 1.5 }) end, "context must be an integer >= 0")
  assert_error(function() memory.estimate(flash, { layout = "fp8" }) end, 'layout must be "reference" or "native"')
  assert_error(function() memory.estimate(flash, { mtp = "yes" }) end, "mtp must be true or false")
  assert_error(function() memory.estimate(flash, { devices = 0 }) end, "devices must be an integer from 1 to 45")
  assert_error(function() memory.estimate(flash, { devices = 46 }) end, "devices must be an integer from 1 to 45")
  local e = memory.estimate(flash)
  assert_equal({ e.context, e.layout, e.mtp, e.devices, e.kv_bytes }, { 0, "reference", false, 1, e.kv_fixed_bytes })
end)

test("format_for_people", function()
  local cases = {
    { 0, "0 B" }, { 812, "812 B" }, { 74752, "73.0 KiB" }, { 29814784, "28.4 MiB" }, { 245730304, "234 MiB" },
    { 3700378624, "3.45 GiB" }, { 7232045056, "6.74 GiB" }, { 159609485896, "149 GiB" },
  }
  for _, case in ipairs(cases) do assert_equal(memory.format(case[1]), case[2]) end
end)

return tests
