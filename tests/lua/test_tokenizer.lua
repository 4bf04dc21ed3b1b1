-- test_tokenizer.lua — dsrt.tokenizer against Hugging Face `tokenizers` on the DeepSeek tokenizer.
--
-- What it protects: the ids. tests/fixtures/tokenizer/corpus.json holds 12,000 strings (English,
-- CJK, Korean, code, emoji/ZWJ, combining marks, digit, whitespace and CRLF runs, added tokens
-- inside text, random code points from many blocks) and expected.json the ids the Rust library
-- gave for each (tests/oracle/tokenizer_reference.mjs, @anush008/tokenizers 0.6.0 = tokenizers
-- 0.22.2, add_special_tokens false); every one must match exactly. Also: decode(encode(s)) == s,
-- the streaming decoder (never half a character, pieces join to decode's text), the documented
-- invalid-UTF-8 repair, special = false, and a clear error for each malformed tokenizer.json.
--
-- The tokenizer.json comes from tools/fetch_tokenizer.sh (npm the first time, then a cache); when
-- it cannot be fetched, the tests fail and say why rather than pass without checking anything.
local dsrt = require "dsrt"
local cjson = require "cjson"
local h = require "tests.helpers"
local assert_equal, assert_error = h.assert_equal, h.assert_error

local tests, test = h.suite()

local tok = h.deepseek_tokenizer

local function read_json(path) return cjson.decode(h.read_file(path)) end
local corpus = read_json("tests/fixtures/tokenizer/corpus.json")
local expected = read_json("tests/fixtures/tokenizer/expected.json")

local function show(s) return (string.format("%q", s):gsub("\\\n", "\\n")) end

local function same(a, b)
  if #a ~= #b then return false end
  for i = 1, #b do if a[i] ~= b[i] then return false end end
  return true
end

test("the corpus is the committed one", function()
  assert(#corpus >= 10000 and #corpus == #expected, "corpus.json and expected.json disagree in length")
end)

test("every corpus string encodes to the reference ids", function()
  local t = tok()
  local bad = {}
  for i, s in ipairs(corpus) do
    local want = {}
    for k, v in ipairs(expected[i]) do want[k] = math.tointeger(v) end
    local got = t:encode(s)
    if not same(got, want) then
      bad[#bad + 1] = i
      if #bad <= 5 then
        print(string.format("  mismatch %d: %s\n    dsrt:      %s\n    reference: %s", i, show(s),
                            table.concat(got, " "), table.concat(want, " ")))
      end
    end
  end
  assert(#bad == 0, string.format("%d of %d strings differ from the reference (first: %d)", #bad, #corpus, bad[1] or 0))
end)

test("decode(encode(s)) == s for the corpus", function()
  local t = tok()
  for i, s in ipairs(corpus) do
    local back = t:decode(t:encode(s))
    if back ~= s then error(string.format("string %d %s decodes to %s", i, show(s), show(back))) end
  end
end)

test("the streaming decoder joins to decode's text and never yields half a character", function()
  local t = tok()
  local function check(ids, where)
    local d = t:decoder()
    local parts = {}
    for _, id in ipairs(ids) do
      local piece = d:push(id)
      assert(utf8.len(piece), where .. ": push yielded invalid UTF-8 " .. show(piece))
      parts[#parts + 1] = piece
    end
    parts[#parts + 1] = d:flush()
    assert_equal(table.concat(parts), t:decode(ids), where)
  end
  for i, s in ipairs(corpus) do check(t:encode(s), "string " .. i) end
  -- ids that cut characters: the single-byte tokens of 😀 (F0 9F 98 80), one per push
  local byte_token = {}
  for id = 0, #t - 1 do
    local raw = t._core:bytes(id) -- its bytes before decode repairs them
    if #raw == 1 then byte_token[raw:byte()] = id end
  end
  local d = t:decoder()
  local ids = {}
  for i = 1, 4 do ids[i] = byte_token[("😀"):byte(i)] end
  assert_equal(#ids, 4, "byte tokens of 😀")
  assert_equal({ d:push(ids[1]), d:push(ids[2]), d:push(ids[3]), d:push(ids[4]), d:flush() }, { "", "", "", "😀", "" })
  -- an incomplete character at the end is repaired by flush, as decode repairs it
  assert_equal({ d:push(ids[1]), d:push(ids[2]), d:flush() }, { "", "", "\u{FFFD}" })
  assert_equal(t:decode({ ids[1], ids[2] }), "\u{FFFD}")
  -- a broken sequence is repaired as soon as it is known to be broken
  local a = t:encode("A")[1]
  assert_equal({ d:push(ids[1]), d:push(a) }, { "", "\u{FFFD}A" })
  assert_equal(t:decode({ ids[1], a, ids[2] }), "\u{FFFD}A\u{FFFD}")
  local skip = t:decoder { skip_special = true }
  assert_equal(skip:push(t.bos_id) .. skip:push(a) .. skip:flush(), "A")
  check({ ids[1], a, ids[1], ids[2], ids[3], ids[4], ids[4] }, "cut characters")
end)

test("invalid UTF-8 is repaired to U+FFFD before encoding (maximal subparts, as from_utf8_lossy)", function()
  local t = tok()
  local cases = {
    { "a\xffb", "a\u{FFFD}b" },                -- a byte that never starts a character
    { "\xe2\x82", "\u{FFFD}" },                -- a truncated character: one replacement
    { "\xf0\x9f\x98 x", "\u{FFFD} x" },
    { "\xed\xa0\x80", "\u{FFFD}\u{FFFD}\u{FFFD}" }, -- a surrogate: each byte on its own
    { "\xc0\xaf", "\u{FFFD}\u{FFFD}" },        -- an overlong form
    { "\xf4\x90\x80\x80", "\u{FFFD}\u{FFFD}\u{FFFD}\u{FFFD}" }, -- above U+10FFFF
    { "ok\x80\x80ok", "ok\u{FFFD}\u{FFFD}ok" },
  }
  for _, c in ipairs(cases) do
    local ids = t:encode(c[1])
    assert_equal(ids, t:encode(c[2]), show(c[1]))
    assert_equal(t:decode(ids), c[2], show(c[1]))
  end
end)

test("added tokens: matched in text by default, special = false encodes special ones as text", function()
  local t = tok()
  assert_equal(t:encode("Hi"), { 23166 })
  assert_equal(t:encode("<｜begin▁of▁sentence｜>Hi"), { 0, 23166 })
  local plain = t:encode("<｜begin▁of▁sentence｜>Hi", { special = false })
  assert(#plain > 2 and plain[1] ~= 0, "special = false still matched the BOS token")
  assert_equal(t:decode(plain), "<｜begin▁of▁sentence｜>Hi")
  -- <｜User｜> is an added token with special = false: matched either way, as in the library
  assert_equal(t:encode("<｜User｜>", { special = false }), { 128803 })
  assert_equal(t:encode("x<｜User｜>y<｜Assistant｜>"), { t:encode("x")[1], 128803, t:encode("y")[1], 128804 })
  assert_equal(t:decode({ 0, 23166, 1 }, { skip_special = true }), "Hi")
  assert_equal(t:decode({ 0, 23166, 128803 }, { skip_special = true }), "Hi<｜User｜>")
  assert_equal(t:decode({ 0, 23166 }), "<｜begin▁of▁sentence｜>Hi")
end)

test("a 200,000-letter piece encodes in linear time (BPE by heap, not by rescanning)", function()
  local t = tok()
  local letters, state = {}, 1
  for i = 1, 200000 do
    state = (state * 1103515245 + 12345) % 2147483648
    letters[i] = string.char(97 + state % 26)
  end
  local text = table.concat(letters)
  local t0 = os.clock()
  local ids = t:encode(text)
  local seconds = os.clock() - t0
  assert(seconds < 2, string.format("took %.2f s", seconds)) -- about 0.06 s; quadratic would be minutes
  assert_equal(t:decode(ids), text)
end)

test("vocabulary lookups", function()
  local t = tok()
  assert_equal(#t, 128815)
  assert_equal(t:vocab_size(), 128815)
  assert_equal(t.bos_id, 0)
  assert_equal(t.eos_id, 1)
  assert_equal(t:id("<｜User｜>"), 128803)
  assert_equal(t:token(128804), "<｜Assistant｜>")
  assert_equal(t:token(23166), "Hi")
  assert_equal(t:id("Hi"), 23166)
  assert_equal(t:id("no such token"), nil)
  assert_equal(t:encode(""), {})
  assert_equal(t:decode({}), "")
end)

test("unknown ids and bad arguments are errors", function()
  local t = tok()
  assert_error(function() t:decode({ 1, 128815 }) end, "unknown token id 128815")
  assert_error(function() t:decode({ -1 }) end, "unknown token id %-1")
  assert_error(function() t:decode({ 1.5 }) end, "not an integer")
  assert_error(function() t:decoder():push(999999) end, "unknown token id 999999")
  assert_error(function() t:encode(42) end, "expected a string")
end)

-- a minimal valid byte-level BPE tokenizer.json, changed by `edit`, written to a temporary file
local function write_spec(edit)
  local vocab = {}
  for b = 33, 126 do vocab[string.char(b)] = b - 33 end
  vocab["ab"] = 94
  local spec = {
    model = { type = "BPE", vocab = vocab, merges = { "a b" } },
    normalizer = cjson.null,
    pre_tokenizer = { type = "Sequence", pretokenizers = {
      { type = "Split", pattern = { Regex = "\\p{N}{1,3}" }, behavior = "Isolated", invert = false },
      { type = "ByteLevel", add_prefix_space = false, use_regex = false } } },
    decoder = { type = "ByteLevel" },
    added_tokens = { { id = 95, content = "<s>", special = true } },
  }
  if edit then spec = edit(spec) or spec end
  local path = h.temp_folder() .. "/tokenizer.json"
  local f = assert(io.open(path, "wb"))
  f:write(type(spec) == "table" and cjson.encode(spec) or spec)
  f:close()
  return path
end

test("a small tokenizer.json loads and merges", function()
  local t = dsrt.tokenizer.load(write_spec())
  assert_equal(t:encode("ab<s>ba123"), { 94, 95, 65, 64, 16, 17, 18 })
  assert_equal(t:decode({ 94, 95 }), "ab<s>")
  -- Oniguruma's \h is a hex digit (PCRE2's would be a space): "a" and "b" become pieces of their own
  local hex = dsrt.tokenizer.load(write_spec(function(s) s.pre_tokenizer.pretokenizers[1].pattern.Regex = "\\h" end))
  assert_equal(hex:encode("ab"), { 64, 65 })
end)

test("malformed tokenizer.json files are refused with the reason", function()
  local function refused(pattern, edit)
    assert_error(function() dsrt.tokenizer.load(write_spec(edit)) end, pattern)
  end
  assert_error(function() dsrt.tokenizer.load("/nonexistent/tokenizer.json") end, "cannot open")
  local path = h.temp_folder() .. "/bad.json"
  local f = assert(io.open(path, "wb")) f:write("{not json") f:close()
  assert_error(function() dsrt.tokenizer.load(path) end, "is not valid JSON")
  refused("only BPE is supported", function(s) s.model.type = "WordPiece" end)
  refused("has no model.merges", function(s) s.model.merges = nil end)
  refused("has no model.vocab", function(s) s.model.vocab = nil end)
  refused('merge 1 %(a c%): "c" is not in the vocabulary', function(s) s.model.vocab.c = nil s.model.merges = { "a c" } end)
  refused("unsupported pre_tokenizer type Whitespace", function(s) s.pre_tokenizer.pretokenizers[1] = { type = "Whitespace" } end)
  refused("only Isolated is supported", function(s) s.pre_tokenizer.pretokenizers[1].behavior = "Removed" end)
  refused("does not compile", function(s) s.pre_tokenizer.pretokenizers[1].pattern.Regex = "(" end)
  refused("has a normalizer %(NFC%)", function(s) s.normalizer = { type = "NFC" } end)
  refused("has no ByteLevel pre_tokenizer", function(s) table.remove(s.pre_tokenizer.pretokenizers, 2) end)
  refused("uses byte_fallback", function(s) s.model.byte_fallback = true end)
  refused("decoder type Metaspace", function(s) s.decoder = { type = "Metaspace" } end)
  refused("added token 1 has no content", function(s) s.added_tokens[1].content = "" end)
  refused("is not a JSON object", function() return "[1]" end)
  refused("is not a JSON object", function() return '"text"' end)
end)

return tests
