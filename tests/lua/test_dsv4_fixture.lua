-- test_dsv4_fixture.lua — the transformers oracle fixture is one dsrt can use. tests/fixtures/dsv4_tiny/
-- is written on the GPU image by tests/oracle/dsv4_oracle.py (transformers 5.17 in fp32, SPEC §9.2–9.3);
-- these tests check, on the CPU, that its config.json parses with every layer kind, that its
-- checkpoint binds in the official formats (FP8 + e8m0 tiles, FP4 experts, i64 tid2eid, SPEC §2), that
-- expected.safetensors holds what meta.json describes, and that the oracle's own checks all passed
-- (decision margins, transformers' prefill/chunked/decode agreement, every component visible).
--
-- Without the folder this file defines no tests, so nothing passes for a fixture that is not there.
--
-- The logits comparison: dsv4.load(FIXTURE, {device = "cpu", precision = "fp32"}) and, for each run
-- of meta.json:
--   a: one forward of a.tokens on a fresh session                       -> compare with a.logits
--   b: one forward per chunk of b.chunks, in order, on one session       -> rows concatenated vs b.logits
--   c: a forward of the first c.prefill tokens, then one token per call  -> the step rows vs c.logits
-- holding every position to max|dsrt - expected| / max|expected| <= meta.compare.tolerance (1e-4);
-- and precision "reference" close to (not equal to) fp32: its FP8/FP4 round trips move the logits.
-- Where it fails, a.router.layers.<i> (experts chosen) and a.indexer.layers.<i> (top-k picks) of run a
-- tell whether routing or the indexer diverged first.
local dsrt = require "dsrt"
local cjson = require "cjson"
local config = require "dsrt.dsv4.config"
local weights = require "dsrt.dsv4.weights"
local h = require "tests.helpers"
local assert_equal = h.assert_equal

local FIXTURE = "tests/fixtures/dsv4_tiny"

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

if not exists(FIXTURE .. "/config.json") then return {} end

local tests = {}
local function test(name, fn) tests[#tests + 1] = { name, fn } end

local function meta() return cjson.decode(h.read_file(FIXTURE .. "/meta.json")) end

local function finite(t)
  return t:ne(t):sum():item() == 0 and t:abs():max():item() < math.huge
end

test("the_oracle_passed_its_own_checks", function()
  local m = meta()
  local failed = {}
  for name, check in pairs(m.checks) do
    if check.ok ~= true then failed[#failed + 1] = name end
  end
  table.sort(failed)
  assert(m.ok == true and #failed == 0, "meta.json: the oracle's checks failed: " .. table.concat(failed, ", "))
  assert(m.failure == nil, "meta.json: the oracle stopped: " .. tostring(m.failure))
  assert(type(m.versions.transformers) == "string", "meta.json names the transformers version")
  for _, kind in ipairs({ "router", "indexer" }) do
    local margin = m.margins[kind]
    assert(margin.decisions > 0 and margin.min >= m.margins.required, kind .. " decisions and their margin")
  end
  assert_equal({ m.compare.precision, m.compare.tolerance }, { "fp32", 1e-4 })
end)

test("config_has_every_layer_kind_and_both_routings", function()
  local cfg, m = config.load(FIXTURE), meta()
  local d, n = cfg.dims, m.sequence_length
  assert_equal(cfg.form, "published")
  local kinds, routers = {}, {}
  for _, layer in ipairs(cfg.layers) do
    kinds[layer.kind], routers[layer.router] = true, true
    if layer.kind == "csa" then
      -- the indexer really selects: fewer picks than entries, and enough heads for no score ties
      assert(d.index_topk < n // layer.ratio, "index_topk below the compressed entries of the sequence")
      assert(d.index_n_heads >= 8, "8+ indexer heads")
    elseif layer.kind == "hca" then
      assert(n // layer.ratio >= 2, "several ratio-" .. layer.ratio .. " entries")
    end
    -- YaRN on compressed layers only (SPEC §1.2)
    assert_equal(layer.rope.yarn ~= false, layer.kind ~= "window", "YaRN of layer " .. layer.id)
  end
  assert_equal(kinds, { window = true, csa = true, hca = true })
  assert_equal(routers, { hash = true, learned = true })
  assert(d.window < n, "the sequence is longer than the window")
  assert_equal({ d.hc_mult, #cfg.mtp, cfg.formats.linear, cfg.formats.expert }, { 4, 1, "fp8", "fp4" })
end)

test("checkpoint_binds_in_the_official_formats", function()
  local cfg, w = weights.load(FIXTURE)
  assert(w.mtp_bound, "mtp.0.* is in the checkpoint and bound")
  local st <close> = dsrt.safetensors.open(FIXTURE)
  local function formats(list, format, where)
    for _, lin in ipairs(list) do assert_equal(lin.format, format, where) end
  end
  local function check_block(b, layer)
    local a, p = b.attn, layer.prefix
    formats({ a.wq_a, a.wq_b, a.wkv, a.wo_a, a.wo_b }, "fp8", p .. "attn")
    if a.compressor then formats({ a.compressor.wkv, a.compressor.wgate }, "bf16", p .. "compressor") end
    if a.indexer then
      formats({ a.indexer.wq_b }, "fp8", p .. "indexer.wq_b")
      formats({ a.indexer.weights_proj, a.indexer.compressor.wkv }, "bf16", p .. "indexer")
    end
    for e, expert in ipairs(b.ffn.experts) do
      formats({ expert.w1, expert.w2, expert.w3 }, "fp4", p .. "expert " .. e)
    end
    local shared = b.ffn.shared_experts
    formats({ shared.w1, shared.w2, shared.w3 }, "fp8", p .. "shared_experts")
    if layer.router == "hash" then
      assert_equal(st:info(p .. "ffn.gate.tid2eid").dtype, "i64", p .. "tid2eid as stored")
      assert_equal(b.ffn.gate.tid2eid.dtype, "i32", p .. "tid2eid as bound")
    else
      assert_equal(b.ffn.gate.bias.dtype, "f32", p .. "gate.bias")
    end
  end
  for i, layer in ipairs(cfg.layers) do check_block(w.layers[i], layer) end
  check_block(w.mtp[1], cfg.mtp[1])
  formats({ w.mtp[1].e_proj, w.mtp[1].h_proj }, "fp8", "mtp projections")
end)

test("expected_holds_the_runs_meta_describes", function()
  local m, cfg = meta(), config.load(FIXTURE)
  local st <close> = dsrt.safetensors.open(FIXTURE .. "/expected.safetensors")
  local n, vocab = m.sequence_length, cfg.dims.vocab
  local described = {}
  local function get(name)
    described[name] = true
    return st:get(name)
  end
  for name, run in pairs(m.runs) do
    local tokens, logits = get(run.tokens), get(run.logits)
    assert_equal({ tokens.dtype, tokens.shape }, { "i32", { n } }, name .. " tokens")
    assert(tokens:min():item() >= 0 and tokens:max():item() < vocab, name .. " tokens in the vocabulary")
    assert_equal({ logits.dtype, logits.shape }, { "f32", run.logits_shape }, name .. " logits")
    assert(finite(logits), name .. " logits are finite")
  end
  assert_equal({ m.runs.a.logits_shape, m.runs.b.logits_shape }, { { n, vocab }, { n, vocab } })
  local chunks, total = get(m.runs.b.chunks_tensor):totable(), 0
  assert_equal(chunks, m.runs.b.chunks)
  for _, size in ipairs(chunks) do total = total + size end
  assert_equal(total, n, "the chunks cover the sequence")
  local prefill, positions = m.runs.c.prefill, get(m.runs.c.positions_tensor):totable()
  assert_equal(m.runs.c.logits_shape, { n - prefill, vocab })
  for i, position in ipairs(positions) do assert_equal(position, prefill + i - 1, "c position " .. i) end
  -- run a's selections: [positions, k], experts in range, indexer picks visible or -1
  for kind, k in pairs({ router = cfg.dims.n_activated_experts, indexer = cfg.dims.index_topk }) do
    local count = 0
    for _, name in pairs(m.selections[kind]) do
      local picks = get(name)
      assert_equal({ picks.dtype, picks.shape }, { "i32", { n, k } }, name)
      local high = kind == "router" and cfg.dims.n_routed_experts or n // 4
      assert(picks:min():item() >= -1 and picks:max():item() < high, name .. " values in range")
      count = count + 1
    end
    assert(count > 0, "selections of " .. kind)
  end
  for _, name in ipairs(st:names()) do assert(described[name], name .. " is not described by meta.json") end
end)

-- ---- dsrt's CPU model against transformers ----

local dsv4 = require "dsrt.dsv4"
local expected = dsrt.safetensors.open(FIXTURE .. "/expected.safetensors")

local function ids_of(name, first, last)
  local all = expected:get(name):to("i64"):totable()
  return table.move(all, first or 1, last or #all, 1, {})
end

-- every row of got within tolerance of want, relative to the row's largest expected logit
local function assert_rows_close(got, want, tolerance, what)
  assert_equal(got.shape, want.shape)
  local err = (got - want):abs():max(2) / want:abs():max(2)
  local worst = err:max():item()
  assert(worst <= tolerance, ("%s: position %d is off by %.3e of its largest logit (limit %.0e)"):format(
    what, err:argmax():item(), worst, tolerance))
end

local function fp32_model() return dsv4.load(FIXTURE, { precision = "fp32", mtp = false }) end

test("fp32_one_shot_prefill_matches_transformers", function()
  local model = fp32_model()
  local logits = model:forward(model:session{ max_len = 512 }, ids_of("a.tokens"))
  assert_rows_close(logits, expected:get("a.logits"), meta().compare.tolerance, "run a")
end)

test("fp32_chunked_prefill_matches_transformers", function()
  local model = fp32_model()
  local seq, ids, rows, at = model:session{ max_len = 512 }, ids_of("b.tokens"), {}, 1
  for _, n in ipairs(expected:get("b.chunks"):totable()) do
    local out = model:forward(seq, table.move(ids, at, at + n - 1, 1, {}))
    for r = 1, n do rows[#rows + 1] = out[r] end
    at = at + n
  end
  local got = dsrt.empty({ #rows, rows[1]:numel() })
  for r, row in ipairs(rows) do got[r] = row end
  assert_rows_close(got, expected:get("b.logits"), meta().compare.tolerance, "run b")
end)

test("fp32_decode_steps_match_transformers", function()
  local model, m = fp32_model(), meta()
  local seq, ids = model:session{ max_len = 512 }, ids_of("c.tokens")
  model:forward(seq, table.move(ids, 1, m.runs.c.prefill, 1, {}))
  local want = expected:get("c.logits")
  local got = dsrt.empty(want.shape)
  for step = 1, want.shape[1] do
    got[step] = model:forward(seq, { ids[m.runs.c.prefill + step] })[1]
  end
  assert_rows_close(got, want, m.compare.tolerance, "run c (decode steps across the window wrap and compressions)")
end)

test("reference_precision_is_close_to_fp32_but_not_equal", function()
  local tokens = ids_of("a.tokens", 1, 160)
  local exact = fp32_model()
  local fp32 = exact:forward(exact:session{ max_len = 512 }, tokens)
  local model = dsv4.load(FIXTURE, { precision = "reference", mtp = false })
  local reference = model:forward(model:session{ max_len = 512 }, tokens)
  local err = dsrt.rel_error(reference, fp32)
  local agree = reference:argmax(2):eq(fp32:argmax(2)):sum():item() / #tokens
  assert(err > 1e-4, ("the round trips must show (relative difference %.2e)"):format(err))
  -- measured 0.181 and 79%: the fixture's weights make every component matter, and each FP8 round trip
  -- of an activation (3 mantissa bits) moves a linear's output by about 2%, compounding over the stack
  assert(err < 0.3 and agree >= 0.7, ("reference strays from fp32: relative %.3f, argmax agreement %.0f%%"):format(
    err, 100 * agree))
end)

return tests
