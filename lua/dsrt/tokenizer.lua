-- dsrt.tokenizer: Hugging Face byte-level BPE tokenizer.json files (DeepSeek V3/V4; FORMATS.md §3).
--
--   local tok = dsrt.tokenizer.load(path)        -- tokenizer.json
--   tok:encode(text [, {special = true}])         -- Lua array of ids
--   tok:decode(ids [, {skip_special = false}])    -- text
--   local d = tok:decoder([{skip_special}]) ; d:push(id) -> text ; d:flush() -> text
--   tok:id(token) / tok:token(id) / #tok / tok:vocab_size() / tok.bos_id / tok.eos_id
--
-- What it protects: the ids must be the `tokenizers` library's, so this file refuses every part of
-- a tokenizer.json it does not implement (another model type, a normalizer, an unknown
-- pre-tokenizer, byte fallback...) with an error naming it, rather than encoding differently. The
-- per-character work is C (runtime/tokenizer.c); this file reads the JSON and hands the pieces over.
--
-- Behaviour worth knowing:
--  * encode adds no BOS: the DeepSeek post-processor adds none, and chat text carries its own.
--  * special = true (default) matches every added token in the text, as the library always does;
--    special = false encodes the special ones (<｜begin▁of▁sentence｜>...) as plain text, like the
--    library's encode_special_tokens, while non-special added tokens (<｜User｜>...) still match.
--  * Invalid UTF-8 in the text: each maximal invalid subsequence becomes U+FFFD first (Rust's
--    String::from_utf8_lossy), then the text is encoded; decode(encode(s)) is that repaired text.
--  * decode, like the library's ByteLevel decoder, repairs invalid UTF-8 in the joined bytes the
--    same way; the streaming decoder holds back an incomplete trailing character until the next
--    push completes it (or flush repairs it), so it never yields half a character and its pieces
--    join to exactly decode's text.
local core = require("dsrt.core").tokenizer

local tokenizer = {}

local Tokenizer = {}
Tokenizer.__index = Tokenizer
local Decoder = {}
Decoder.__index = Decoder

-- ByteLevel with use_regex = true splits with GPT-2's pattern first (tokenizers' byte_level.rs)
local GPT2_SPLIT = [['s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+]]

local function fail(path, fmt, ...)
  error(string.format("tokenizer %s: " .. fmt, path, ...), 0)
end

local function read_file(path)
  local f, err = io.open(path, "rb")
  if not f then error("tokenizer: cannot open " .. tostring(err), 0) end
  local text = f:read("a")
  f:close()
  return text
end

local json
local function decode_json(path, text)
  if not json then
    local ok, cjson = pcall(require, "cjson")
    if not ok then error("tokenizer: reading tokenizer.json needs lua-cjson, which did not load: " .. tostring(cjson), 0) end
    json = cjson.new()
    json.decode_invalid_numbers(false)
    json.decode_max_depth(64)
  end
  local ok, value = pcall(json.decode, text)
  if not ok then fail(path, "is not valid JSON (%s)", tostring(value)) end
  return value
end

local function is_null(v) return v == nil or v == json.null end

local function integer_id(path, what, v)
  local id = type(v) == "number" and math.tointeger(v)
  if not id or id < 0 or id > 0x7fffffff then fail(path, "%s has id %s, not a non-negative integer", what, tostring(v)) end
  return id
end

-- the pre-tokenizers, flattened, as a list of Split regexes in application order
local function split_patterns(path, pre)
  if is_null(pre) then fail(path, "has no pre_tokenizer; a byte-level BPE needs ByteLevel") end
  local list = pre.type == "Sequence" and pre.pretokenizers or { pre }
  if type(list) ~= "table" then fail(path, "pre_tokenizer Sequence has no pretokenizers list") end
  local patterns, byte_level = {}, false
  for i, p in ipairs(list) do
    if type(p) ~= "table" then fail(path, "pre_tokenizer %d is not an object", i) end
    if p.type == "Split" then
      local regex = type(p.pattern) == "table" and p.pattern.Regex
      if type(regex) ~= "string" then fail(path, "pre_tokenizer %d (Split) has no pattern.Regex (String patterns are not supported)", i) end
      if p.behavior ~= "Isolated" then fail(path, "pre_tokenizer %d (Split) has behavior %s; only Isolated is supported", i, tostring(p.behavior)) end
      if p.invert then fail(path, "pre_tokenizer %d (Split) has invert = true, which is not supported", i) end
      if byte_level then fail(path, "pre_tokenizer %d (Split) comes after ByteLevel, which is not supported", i) end
      patterns[#patterns + 1] = regex
    elseif p.type == "ByteLevel" then
      if p.add_prefix_space then fail(path, "pre_tokenizer %d (ByteLevel) has add_prefix_space = true, which is not supported", i) end
      if p.use_regex ~= false then patterns[#patterns + 1] = GPT2_SPLIT end
      byte_level = true
    else
      fail(path, "has an unsupported pre_tokenizer type %s (pre_tokenizer %d)", tostring(p.type), i)
    end
  end
  if not byte_level then fail(path, "has no ByteLevel pre_tokenizer; only byte-level BPE is supported") end
  return patterns
end

local function check_model(path, model)
  if type(model) ~= "table" then fail(path, "has no model") end
  if model.type ~= "BPE" then fail(path, "has model type %s; only BPE is supported", tostring(model.type)) end
  if type(model.vocab) ~= "table" then fail(path, "has no model.vocab") end
  if type(model.merges) ~= "table" then fail(path, "has no model.merges") end
  if model.byte_fallback == true then fail(path, "uses byte_fallback, which is not supported") end
  if model.ignore_merges == true then fail(path, "uses ignore_merges, which is not supported") end
  for _, key in ipairs { "continuing_subword_prefix", "end_of_word_suffix", "dropout" } do
    if not is_null(model[key]) then fail(path, "sets model.%s, which is not supported", key) end
  end
end

local function check_normalizer(path, n)
  if is_null(n) then return end
  if n.type == "Sequence" and type(n.normalizers) == "table" and #n.normalizers == 0 then return end
  fail(path, "has a normalizer (%s), which is not supported", tostring(n.type))
end

-- bos/eos from a tokenizer_config.json beside the file, else DeepSeek's names
local function special_ids(path, tok)
  local config_path = path:gsub("[^/]*$", "tokenizer_config.json")
  local f = io.open(config_path, "rb")
  local config = {}
  if f then
    local text = f:read("a")
    f:close()
    local ok, value = pcall(json.decode, text)
    if ok and type(value) == "table" then config = value end
  end
  local function name(v, default)
    if type(v) == "table" then v = v.content end
    return type(v) == "string" and v or default
  end
  tok.bos_id = tok:id(name(config.bos_token, "<｜begin▁of▁sentence｜>"))
  tok.eos_id = tok:id(name(config.eos_token, "<｜end▁of▁sentence｜>"))
end

--- Loads a tokenizer.json; every unsupported or malformed part is an error naming it.
function tokenizer.load(path)
  if type(path) ~= "string" then error("tokenizer.load: expected a path, got " .. type(path), 2) end
  local spec = decode_json(path, read_file(path))
  if type(spec) ~= "table" or #spec > 0 then fail(path, "is not a JSON object") end
  check_model(path, spec.model)
  check_normalizer(path, spec.normalizer)
  local patterns = split_patterns(path, spec.pre_tokenizer)
  if not is_null(spec.decoder) and spec.decoder.type ~= "ByteLevel" then
    fail(path, "has decoder type %s; only ByteLevel is supported", tostring(spec.decoder.type))
  end
  local added = is_null(spec.added_tokens) and {} or spec.added_tokens
  if type(added) ~= "table" then fail(path, "added_tokens is not a list") end

  local ids, tokens, n_ids = {}, {}, 0
  for token, v in pairs(spec.model.vocab) do
    local id = integer_id(path, string.format("vocab token %q", token), v)
    ids[token], tokens[id] = id, token
    if id >= n_ids then n_ids = id + 1 end
  end
  for i, a in ipairs(added) do
    if type(a) ~= "table" or type(a.content) ~= "string" or a.content == "" then fail(path, "added token %d has no content", i) end
    for _, key in ipairs { "lstrip", "rstrip", "single_word" } do
      if a[key] then fail(path, "added token %q sets %s, which is not supported", a.content, key) end
    end
    local id = integer_id(path, string.format("added token %q", a.content), a.id)
    if id >= n_ids then n_ids = id + 1 end
  end
  if n_ids == 0 then fail(path, "has an empty vocabulary") end

  local c = core.new(n_ids)
  for token, id in pairs(ids) do c:set_token(id, token, true) end
  for i, m in ipairs(spec.model.merges) do
    local a, b
    if type(m) == "string" then a, b = m:match("^([^ ]+) ([^ ]+)$")
    elseif type(m) == "table" then a, b = m[1], m[2] end
    if type(a) ~= "string" or type(b) ~= "string" then fail(path, "merge %d is not \"a b\" or [a, b]", i) end
    local l, r, merged = ids[a], ids[b], ids[a .. b]
    if not (l and r and merged) then
      fail(path, "merge %d (%s %s): %q is not in the vocabulary", i, a, b, not l and a or not r and b or a .. b)
    end
    c:add_merge(l, r, merged)
  end
  for _, a in ipairs(added) do
    local id = math.tointeger(a.id)
    c:set_token(id, a.content, false)
    c:add_added(a.content, id, a.special == true, a.normalized == true)
    ids[a.content], tokens[id] = id, a.content
  end
  for _, p in ipairs(patterns) do
    local ok, err = pcall(c.add_split, c, p)
    if not ok then fail(path, "%s", err) end
  end

  local tok = setmetatable({ _core = c, _ids = ids, _tokens = tokens, _n = n_ids, path = path }, Tokenizer)
  special_ids(path, tok)
  return tok
end

--- Ids of text (no BOS added); opts.special (default true): match special tokens in the text.
function Tokenizer:encode(text, opts)
  if type(text) ~= "string" then error("tokenizer:encode: expected a string, got " .. type(text), 2) end
  local special = true
  if opts ~= nil and opts.special ~= nil then special = opts.special and true or false end
  return self._core:encode(text, special)
end

--- Text of ids; opts.skip_special drops special added tokens. Unknown ids are an error.
function Tokenizer:decode(ids, opts)
  if type(ids) ~= "table" then error("tokenizer:decode: expected a list of ids, got " .. type(ids), 2) end
  return self._core:decode(ids, opts ~= nil and opts.skip_special and true or false)
end

--- A streaming decoder: push(id) returns the text that is complete so far, flush() the rest.
function Tokenizer:decoder(opts)
  return setmetatable({ _tok = self, _pending = "", _skip = opts ~= nil and opts.skip_special and true or false }, Decoder)
end

function Tokenizer:id(token) return self._ids[token] end
function Tokenizer:token(id) return self._tokens[id] end
function Tokenizer:vocab_size() return self._n end -- ids 0 .. vocab_size-1 (added tokens included)
Tokenizer.__len = Tokenizer.vocab_size

function Decoder:push(id)
  local c = self._tok._core
  if math.type(id) ~= "integer" then error("decoder:push: expected an integer id, got " .. tostring(id), 2) end
  local bytes = c:bytes(id)
  if self._skip and c:is_special(id) then bytes = "" end
  local pending = self._pending .. bytes
  local keep = core.utf8_incomplete_tail(pending)
  self._pending = pending:sub(#pending - keep + 1)
  return core.utf8_lossy(pending:sub(1, #pending - keep))
end

function Decoder:flush()
  local rest = self._pending
  self._pending = ""
  return core.utf8_lossy(rest)
end

return tokenizer
