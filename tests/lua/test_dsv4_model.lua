-- test_dsv4_model.lua — the DeepSeek-V4 decoder and MTP predictor composed in Lua (dsrt.dsv4:
-- lua/dsrt/dsv4/{init,model,mtp}.lua) on the tiny checkpoint, which has every layer kind.
--
-- What it checks:
--   - continuation at any position: a ~200-token prompt in one call, in chunks (70 + 1 + 129) and
--     token by token gives the same logits at every position (fp32: rel err <= 1e-5; reference:
--     <= 1e-2), and truncate + continue equals never having gone ahead (MTP drafts included);
--   - the logits are finite and differ between positions;
--   - the wiring DESIGN.md exists for: the decoder's aux stream table is one table of three streams
--     given to every attention and MoE object, the predictor's one table (not the decoder's) to
--     every MTP layer — with two MTP layers, from a config that has them;
--   - the decoder and the MTP draft equal SPEC §4/§5/§8.1 composed here by hand from the verified
--     pieces (nn ops, dsrt.linear, dsrt.moe, the attention objects), over a prompt forwarded in
--     chunks and after a draft that the decoder did not take;
--   - bad input raises a clear error before the session moves.
-- The file defines no tests until the attention layer's binding (dsrt.core.attention) exists, so
-- nothing passes without the real layer.
local dsrt = require "dsrt"
local core = require "dsrt.core"

if core.attention == nil then return {} end

local cjson = require "cjson"
local dsv4 = require "dsrt.dsv4"
local decoder = require "dsrt.dsv4.model"
local mtp = require "dsrt.dsv4.mtp"
local h = require "tests.helpers"
local assert_error, assert_equal = h.assert_error, h.assert_equal

local tests, test = h.suite()

local TOLERANCE = { fp32 = 1e-5, reference = 1e-2 }
local PROMPT_LENGTH = 200
local CHUNKS = { 70, 1, 129 }

-- The tiny checkpoint as a model of each precision, with the MTP predictor or without it (the long
-- continuation tests need only the decoder, and run twice as fast without filling the MTP ring).
local tiny_dir
local models = {}
local function tiny_model(precision, with_mtp)
  tiny_dir = tiny_dir or h.make_tiny_model(11)
  local key = precision .. tostring(with_mtp)
  models[key] = models[key] or dsv4.load(tiny_dir, { precision = precision, mtp = with_mtp })
  return models[key]
end

local prompt, slice = h.prompt_ids, h.slice

-- Logits of ids forwarded in chunks of the given sizes, gathered into one [#ids, vocab] tensor.
local function forward_in_chunks(model, ids, sizes)
  local session = model:session { max_len = 256 }
  local all = dsrt.empty({ #ids, model.dims.vocab })
  local done = 0
  for _, size in ipairs(sizes) do
    all:narrow(1, done + 1, size):copy(model:forward(session, slice(ids, done + 1, size)))
    done = done + size
  end
  return all, session
end

-- Every row (position) of actual within tol of expected's, in relative error ||a - b|| / ||b||.
local function assert_rows_close(actual, expected, tol, what)
  assert_equal(actual.shape, expected.shape, what)
  assert(actual:ne(actual):sum():item() == 0, what .. ": NaN logits")
  local per_row = (((actual - expected) ^ 2):sum(2) / (expected ^ 2):sum(2)):sqrt()
  local worst = per_row:argmax():item()
  local err = per_row:max():item()
  if not (err <= tol) then
    error(string.format("%s: position %d differs, rel err %g > %g", what, worst, err, tol), 2)
  end
end

local function ones(n)
  local sizes = {}
  for i = 1, n do sizes[i] = 1 end
  return sizes
end

-- ---- continuation ----

test("fp32: one-shot, chunked (70+1+129) and token-by-token prefill give the same logits", function()
  local model, ids = tiny_model("fp32", false), prompt(PROMPT_LENGTH, 1)
  local one_shot, session = forward_in_chunks(model, ids, { PROMPT_LENGTH })
  assert_equal(one_shot.shape, { PROMPT_LENGTH, model.dims.vocab })
  assert_equal(session:length(), PROMPT_LENGTH)
  assert_rows_close(forward_in_chunks(model, ids, CHUNKS), one_shot, TOLERANCE.fp32, "chunked")
  assert_rows_close(forward_in_chunks(model, ids, ones(PROMPT_LENGTH)), one_shot, TOLERANCE.fp32, "token by token")
end)

test("reference: one-shot and chunked (70+1+129) prefill give the same logits", function()
  local model, ids = tiny_model("reference", false), prompt(PROMPT_LENGTH, 2)
  local one_shot = forward_in_chunks(model, ids, { PROMPT_LENGTH })
  assert_rows_close(forward_in_chunks(model, ids, CHUNKS), one_shot, TOLERANCE.reference, "chunked")
end)

test("logits are finite f32 and differ between positions", function()
  local model = tiny_model("reference", true)
  local logits = model:forward(model:session { max_len = 8 }, { 5, 6, 7 })
  assert_equal(logits.dtype, "f32")
  assert_equal(logits.shape, { 3, model.dims.vocab })
  assert_equal(logits:ne(logits):sum():item(), 0)
  assert(logits:abs():max():item() < math.huge, "infinite logits")
  assert(dsrt.max_abs_diff(logits[1], logits[2]) > 0 and dsrt.max_abs_diff(logits[2], logits[3]) > 0,
         "logits of different positions are equal")
end)

test("truncate + continue equals never having gone ahead, decoder and MTP draft", function()
  -- going ahead crosses the window's wrap and the ratio-128 compressor's first entry (position 127)
  local model = tiny_model("fp32", true)
  local ids, ahead, taken = prompt(124, 3), prompt(8, 4), prompt(5, 5)
  local rolled = model:session { max_len = 256, slack = 16 }
  model:forward(rolled, ids)
  model:forward(rolled, ahead)
  model:draft(rolled, 77)
  rolled:truncate(124)
  assert_equal(rolled:length(), 124)
  local rolled_logits = model:forward(rolled, taken)
  local straight = model:session { max_len = 256 }
  model:forward(straight, ids)
  local straight_logits = model:forward(straight, taken)
  assert_rows_close(rolled_logits, straight_logits, TOLERANCE.fp32, "after truncate")
  assert_rows_close(model:draft(rolled, 123), model:draft(straight, 123), TOLERANCE.fp32, "draft after truncate")
end)

test("a long prompt fills only the MTP ring's rows: drafts as after a chunked fill, rollback included", function()
  -- one call fills positions 0..198 and steps over those the ring (window + slack) drops; the chunks'
  -- last call (129 positions) fits the ring and computes them all
  local model = tiny_model("fp32", true)
  local ids = prompt(PROMPT_LENGTH, 8)
  local one_shot, chunked = model:session { max_len = 256 }, model:session { max_len = 256 }
  model:forward(one_shot, ids)
  assert(one_shot.mtp.state:skippable(PROMPT_LENGTH - 1) > 0, "the one-shot fill skips positions")
  local at = 0
  for _, n in ipairs(CHUNKS) do
    assert_equal(chunked.mtp.state:skippable(n), 0)
    model:forward(chunked, slice(ids, at + 1, n))
    at = at + n
  end
  assert_rows_close(model:draft(one_shot, 5), model:draft(chunked, 5), TOLERANCE.fp32, "draft")
  local back = PROMPT_LENGTH - one_shot.slack -- the MTP ring's oldest rows
  one_shot:truncate(back)
  chunked:truncate(back)
  assert_rows_close(model:draft(one_shot, ids[back + 1]), model:draft(chunked, ids[back + 1]), TOLERANCE.fp32,
                    "draft after truncate")
end)

test("a session made with mtp = false forwards the same logits, skips the MTP state and cannot draft", function()
  local model = tiny_model("fp32", true)
  local ids, more = prompt(60, 6), prompt(3, 7)
  local with, without = model:session { max_len = 128 }, model:session { max_len = 128, mtp = false }
  assert(without.mtp == nil, "no MTP state kept")
  for _, chunk in ipairs({ ids, more }) do
    local a, b = model:forward(with, chunk), model:forward(without, chunk)
    assert_equal(a:ne(b):sum():item(), 0, "logits with and without the MTP state")
  end
  without:truncate(61)
  assert_equal(without:length(), 61)
  assert_error(function() model:draft(without, 5) end, "dsv4.model.draft: the session was made with mtp = false")
  assert_error(function() model:draft_next(without, 5) end, "dsv4.model.draft_next: the session was made with mtp = false")
  assert_error(function() model:session { max_len = 8, mtp = 1 } end, "dsv4.model.session: mtp must be a boolean, got number")
end)

-- ---- aux streams ----

local function assert_one_list_of_three(list, what)
  assert_equal(type(list), "table")
  assert_equal(#list, 3)
  for i = 1, 3 do assert(tostring(list[i]):find("^dsrt%.stream"), what .. ": entry " .. i .. " is not a stream") end
end

-- every layer object of `blocks` holds exactly `list` (attention keeps it when it exposes it)
local function assert_blocks_share(blocks, list, what)
  for i, block in ipairs(blocks) do
    assert(rawequal(block.aux_streams, list), what .. " " .. i .. ": block was given another list")
    assert(rawequal(block.moe.aux_streams, list), what .. " " .. i .. ": moe holds another list")
    local kept = block.attention.aux_streams
    assert(kept == nil or rawequal(kept, list), what .. " " .. i .. ": attention holds another list")
  end
end

test("the decoder hands one list of three aux streams to every layer", function()
  local model = tiny_model("reference", true)
  assert_one_list_of_three(model.aux_streams, "decoder")
  assert_equal(#model.blocks, #model.cfg.layers)
  assert_blocks_share(model.blocks, model.aux_streams, "layer")
end)

test("the MTP predictor hands its own one list to every MTP layer (two MTP layers)", function()
  -- the tiny config with a second MTP layer, bound to the first one's weights
  local tiny = tiny_model("fp32", true)
  local raw = cjson.decode(h.read_file(tiny_dir .. "/config.json"))
  raw.num_nextn_predict_layers = 2
  raw.compress_ratios[#raw.compress_ratios + 1] = 0
  local cfg = dsv4.config.parse(raw, "two MTP layers")
  local w = setmetatable({ mtp = { tiny.weights.mtp[1], tiny.weights.mtp[1] } }, { __index = tiny.weights })
  local model = decoder.new(cfg, w, { precision = "fp32" })
  model.mtp = mtp.new(model, cfg, w)
  assert_one_list_of_three(model.mtp.aux_streams, "mtp")
  assert(not rawequal(model.mtp.aux_streams, model.aux_streams), "the predictor reuses the decoder's list")
  local blocks = {}
  for k, layer in ipairs(model.mtp.layers) do blocks[k] = layer.block end
  assert_equal(#blocks, 2)
  assert_blocks_share(blocks, model.mtp.aux_streams, "MTP layer")
end)

-- ---- composition by hand from the verified pieces ----

-- SPEC §5: one block on residual streams X over a fresh or continued attention state.
local function hand_block(dims, lw, attention, state, X, token_ids, moe, precision)
  local function sub_layer(hc, norm_weight, run)
    local u, post, comb = core.nn.hc_pre(X, hc.fn, hc.scale, hc.base, dims.hc_eps, dims.norm_eps,
                                         dims.hc_sinkhorn_iters, precision)
    X = core.nn.hc_post(run(core.nn.rms_norm(u, norm_weight, dims.norm_eps, precision)), X, post, comb, precision)
  end
  sub_layer(lw.hc_attn, lw.attn_norm, function(x) return attention:forward(state, x, precision) end)
  sub_layer(lw.hc_ffn, lw.ffn_norm, function(x) return moe:forward(x, token_ids, precision) end)
  return X
end

local function hand_logits(dims, hc_head, norm_weight, head, X, precision)
  local y = core.nn.hc_head(X, hc_head.fn, hc_head.scale, hc_head.base, dims.hc_eps, dims.norm_eps, precision)
  return head:forward(core.nn.rms_norm(y, norm_weight, dims.norm_eps, precision), precision)
end

-- embed[ids] as f32 rows, one row per id
local function hand_embed(embed, ids)
  local rows = {}
  for i, id in ipairs(ids) do rows[i] = embed[id + 1]:to("f32"):totable() end
  return dsrt.tensor(rows)
end

-- SPEC §4 over the whole prompt in one call: logits [n, vocab] and the pre-hc_head residual H.
local function hand_decoder(cfg, w, ids, head, aux)
  local dims, precision = cfg.dims, "fp32"
  local token_ids = dsrt.tensor(ids, { dtype = "i64" })
  local X = core.nn.hc_expand(hand_embed(w.embed, ids), dims.hc_mult)
  for i, layer in ipairs(cfg.layers) do
    local attention = core.attention(layer, dims, w.layers[i].attn, aux)
    local state = core.attn_state(attention, { max_len = #ids, slack = 0, precision = precision, device = "cpu" })
    X = hand_block(dims, w.layers[i], attention, state, X, token_ids, dsrt.moe(dims, w.layers[i].ffn, aux), precision)
  end
  return hand_logits(dims, w.hc_head, w.norm, head, X, precision), X
end

-- SPEC §8.1 over every position of H with the next tokens' ids in one call: draft logits [n, vocab].
local function hand_mtp(cfg, w, H, next_ids, head, aux)
  local dims, precision, lw = cfg.dims, "fp32", w.mtp[1]
  local e = core.nn.rms_norm(hand_embed(w.embed, next_ids), lw.enorm, dims.norm_eps, precision)
  local hn = core.nn.rms_norm(H, lw.hnorm, dims.norm_eps, precision)
  local X = dsrt.linear(lw.h_proj):forward(hn, precision) + dsrt.linear(lw.e_proj):forward(e, precision):unsqueeze(2)
  local attention = core.attention(cfg.mtp[1], dims, lw.attn, aux)
  local state = core.attn_state(attention, { max_len = #next_ids, slack = 0, precision = precision, device = "cpu" })
  X = hand_block(dims, lw, attention, state, X, dsrt.tensor(next_ids, { dtype = "i64" }), dsrt.moe(dims, lw.ffn, aux),
                 precision)
  return hand_logits(dims, lw.hc_head, lw.norm, head, X, precision)
end

test("decoder and MTP draft equal SPEC §4/§5/§8.1 composed by hand (fp32)", function()
  local model = tiny_model("fp32", true)
  local cfg, w = model.cfg, model.weights
  local aux = { dsrt.stream("cpu"), dsrt.stream("cpu"), dsrt.stream("cpu") }
  local ids = prompt(21, 6)
  local next_id, other_id = 4242, 99

  local session = model:session { max_len = 64 }
  local logits = dsrt.empty({ 20, cfg.dims.vocab })
  logits:narrow(1, 1, 7):copy(model:forward(session, slice(ids, 1, 7)))
  logits:narrow(1, 8, 13):copy(model:forward(session, slice(ids, 8, 13)))
  local hand_main, H = hand_decoder(cfg, w, slice(ids, 1, 20), model.head, aux)
  assert_rows_close(logits, hand_main, TOLERANCE.fp32, "decoder")

  -- the MTP at position t reads H_t and the token at t + 1 (SPEC §8.1)
  local shifted = slice(ids, 2, 19)
  shifted[20] = next_id
  local hand_draft = hand_mtp(cfg, w, H, shifted, model.head, aux)
  local draft = model:draft(session, next_id)
  assert_equal(draft.shape, { 1, cfg.dims.vocab })
  assert_equal(draft:ne(draft):sum():item(), 0)
  assert(dsrt.rel_error(draft[1], hand_draft[20]) <= TOLERANCE.fp32, "draft")

  -- the decoder takes another token than the one drafted: the MTP ring follows the decoder
  model:forward(session, { ids[21] })
  local _, H21 = hand_decoder(cfg, w, ids, model.head, aux)
  shifted[20], shifted[21] = ids[21], other_id
  hand_draft = hand_mtp(cfg, w, H21, shifted, model.head, aux)
  assert(dsrt.rel_error(model:draft(session, other_id)[1], hand_draft[21]) <= TOLERANCE.fp32, "draft after a rejected one")
end)

-- ---- bad input ----

test("bad input raises a clear error and leaves the session as it was", function()
  local model = tiny_model("reference", true)
  local vocab = model.dims.vocab
  local session = model:session { max_len = 4, slack = 2 }
  model:forward(session, { 1 })
  assert_error(model.forward, "ids is empty", model, session, {})
  assert_error(model.forward, "ids%[2%] = " .. vocab .. " %(position 2%) is outside the vocabulary %[0, " .. vocab .. "%)",
               model, session, { 3, vocab })
  assert_error(model.forward, "ids%[1%] = %-1 %(position 1%)", model, session, { -1 })
  assert_error(model.forward, "ids%[1%] = 2%.5", model, session, { 2.5 })
  assert_error(model.forward, "4 new ids at position 1 would pass the session's max_len 4", model, session, { 1, 2, 3, 4 })
  assert_error(model.forward, "1%-D i64/i32 tensor", model, session, dsrt.zeros({ 2 }))
  assert_equal(session:length(), 1)
  assert_equal(model:forward(session, dsrt.tensor({ 7, 8 }, { dtype = "i64" })).shape, { 2, vocab })
  assert_error(session.truncate, "outside %[1, 3%]", session, 0)
  assert_error(model.draft, "next_id " .. vocab .. " is outside the vocabulary", model, session, vocab)
  assert_error(model.session, "max_len must be a positive integer", model, {})
  assert_error(model.forward, "session must come from this model", tiny_model("fp32", true), session, { 1 })
  assert_error(dsv4.load, "precision must be \"reference\" or \"fp32\", got nil", tiny_dir, {})
  assert_error(dsv4.load, "weights must be \"file\" or \"random\"", tiny_dir, { precision = "fp32", weights = "x" })
end)

test("forward_batch of several sessions equals forwarding each alone, MTP ring included", function()
  for _, precision in ipairs({ "fp32", "reference" }) do
    local model = tiny_model(precision, true)
    local a, b = prompt(140, 3), prompt(9, 4)
    local alone_a = model:forward(model:session { max_len = 256 }, a)
    local sb = model:session { max_len = 256 }
    local alone_b = model:forward(sb, b)
    local draft_alone = model:draft(sb, 17)
    local s1, s2 = model:session { max_len = 256 }, model:session { max_len = 256 }
    local together = model:forward_batch({ s1, s2 }, { a, b })
    assert_equal({ s1:length(), s2:length() }, { 140, 9 })
    assert_equal(dsrt.max_abs_diff(together[1], alone_a), 0)
    assert_equal(dsrt.max_abs_diff(together[2], alone_b), 0)
    assert_equal(dsrt.max_abs_diff(model:draft(s2, 17), draft_alone), 0)
    -- then a step of one token each, as generation does
    local step = model:forward_batch({ s1, s2 }, { { 5 }, { 6 } })
    assert_equal(step[2].shape, { 1, model.dims.vocab })
  end
  local model = tiny_model("fp32", false)
  local s = model:session { max_len = 64 }
  assert_error(model.forward_batch, "a session appears twice", model, { s, s }, { { 1 }, { 2 } })
  assert_error(model.forward_batch, "one list of ids per session", model, { s }, {})
end)

test("decode steps, drafts and verifies close their tensors: no memory waits for the collector", function()
  -- Lua's collector sees only the small userdata, so a tensor left to it holds its memory until its
  -- next cycle (on the GPU, each made the allocator call cudaMalloc for its successor; a view left
  -- to it keeps its whole base). So after each call a full collection must free no tensor memory:
  -- drafts taken, drafts not taken (the MTP ring refilled) and a rejecting verify included.
  local model = tiny_model("reference", true)
  local s = model:session { max_len = 64 }
  local function collected()
    local before = dsrt.memory_stats("cpu").allocated
    collectgarbage()
    collectgarbage()
    return before - dsrt.memory_stats("cpu").allocated
  end
  decoder.close(model:forward(s, prompt(20, 3)))
  collected()
  for i = 1, 4 do
    decoder.close(model:forward(s, { i }, { logits = "last" }))
    assert_equal(collected(), 0, "bytes a full collection freed after forward " .. i)
    decoder.close(model:draft(s, i % 2 == 0 and i + 1 or 40 + i)) -- taken at even steps, not at odd
    decoder.close(model:draft_next(s, 7))
    assert_equal(collected(), 0, "bytes a full collection freed after drafts " .. i)
  end
  local _, _, info = model:verify(s, { 3, 9, 11 })
  decoder.close(info.logits)
  assert_equal(collected(), 0, "bytes a full collection freed after a verify")
end)

test("any compression ratio: ratios 8 and 64 run, and chunked prefill equals one-shot", function()
  -- transformers builds only ratios 4 and 128; dsrt takes whatever compress_ratios says (plain
  -- compressors for every ratio but 4). tiny_ratios.json: [0, 8, 4, 64 | MTP 0, 8], vocab 512.
  -- with the indexer at the SPEC's 128 dims (its Hadamard is 128 wide, SPEC §3.7)
  local raw = cjson.decode(h.read_file("tests/fixtures/config/tiny_ratios.json"))
  raw.index_head_dim = 128
  local path = h.temp_folder() .. "/config.json"
  local f = assert(io.open(path, "w"))
  f:write(cjson.encode(raw))
  f:close()
  local model = dsv4.load(path, { precision = "fp32", weights = "random", seed = 2, mtp = false })
  local ids = {}
  for i, id in ipairs(prompt(150, 5)) do ids[i] = id % 512 end
  local one_shot = forward_in_chunks(model, ids, { 150 })
  assert_rows_close(forward_in_chunks(model, ids, { 7, 1, 57, 64, 21 }), one_shot, TOLERANCE.fp32, "ratios 8/64")
  assert(one_shot:abs():max():item() < math.huge, "finite logits")
end)

return tests
