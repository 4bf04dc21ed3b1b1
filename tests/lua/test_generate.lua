-- test_generate.lua — model:generate{...} and model:stream{...} (lua/dsrt/dsv4/generate.lua) on the
-- tiny model with its tokenizer.
--
-- What it protects: generate and stream give the same tokens and text; max_tokens, stop strings
-- (the text stops before them, streamed pieces never show them) and on_token (once per token,
-- pieces joining to the text) behave as documented; several prompts at once equal each run alone
-- (greedy and sampled); the pipelined loop (the next step issued before the token is read) equals
-- the plain one, session included; timings are present; bad input is a clear error.
local dsrt = require "dsrt"
local core = require "dsrt.core"
if core.attention == nil then return {} end

local dsv4 = require "dsrt.dsv4"
local h = require "tests.helpers"
local assert_equal, assert_error = h.assert_equal, h.assert_error

local tests, test = h.suite()

local cached
local function model()
  if not cached then cached = dsv4.load(h.make_tiny_model(5, ""), { precision = "fp32" }) end
  return cached
end

test("greedy generate equals stream; on_token once per token, pieces join to the text", function()
  local m = model()
  local pieces, calls = {}, 0
  local r = m:generate { prompt = "The quick brown fox", max_tokens = 8,
                         on_token = function(text, id) calls = calls + 1; pieces[#pieces + 1] = text end }
  assert_equal(#r.ids, 8)
  assert_equal(r.finish_reason, "length")
  assert(calls >= 8, "on_token called " .. calls .. " times for 8 tokens")
  assert_equal(table.concat(pieces), r.text)
  local sids, stext = {}, {}
  for text, id in m:stream { prompt = "The quick brown fox", max_tokens = 8 } do
    if id then sids[#sids + 1] = id end
    stext[#stext + 1] = text
  end
  assert_equal(sids, r.ids)
  assert_equal(table.concat(stext), r.text)
  -- ids in, same continuation
  local tok = m._tokenizer
  local ids = tok:encode("The quick brown fox")
  table.insert(ids, 1, tok.bos_id)
  assert_equal(m:generate { ids = ids, max_tokens = 8 }.ids, r.ids)
end)

test("max_tokens, seeds and timings", function()
  local m = model()
  local r = m:generate { prompt = "hello", max_tokens = 3, temperature = 1, seed = 4 }
  assert_equal(#r.ids, 3)
  assert_equal(m:generate { prompt = "hello", max_tokens = 3, temperature = 1, seed = 4 }.ids, r.ids)
  local other = m:generate { prompt = "hello", max_tokens = 3, temperature = 1, seed = 5 }
  assert(table.concat(other.ids, ",") ~= table.concat(r.ids, ","), "seeds 4 and 5 gave the same tokens")
  local t = r.timings
  for _, k in ipairs { "prompt_tokens", "prompt_seconds", "prompt_tokens_per_s", "decode_tokens",
                       "decode_seconds", "decode_tokens_per_s" } do
    assert(type(t[k]) == "number" and t[k] >= 0, "timings." .. k .. " missing")
  end
  assert_equal(t.prompt_tokens, #m._tokenizer:encode("hello") + 1)
  assert_equal(t.decode_tokens, 3)
  assert(t.prompt_tokens_per_s > 0, "prompt tokens/s is 0")
end)

test("a stop string ends generation; the text stops before it", function()
  local m = model()
  local full = m:generate { prompt = "Once upon", max_tokens = 12 }
  -- a stop string from the middle of the greedy text
  local text = full.text
  local mid = math.max(2, #text // 2)
  local stop = text:sub(mid, mid + 1)
  local at = text:find(stop, 1, true)
  local pieces = {}
  local r = m:generate { prompt = "Once upon", max_tokens = 12, stop = { "\0never", stop },
                         on_token = function(piece) pieces[#pieces + 1] = piece end }
  assert_equal(r.finish_reason, "stop")
  assert_equal(r.text, text:sub(1, at - 1))
  assert_equal(table.concat(pieces), r.text)
  assert(#r.ids < #full.ids or at + #stop - 1 >= #text - 8, "did not stop early")
  local streamed = {}
  for piece in m:stream { prompt = "Once upon", max_tokens = 12, stop = { stop } } do streamed[#streamed + 1] = piece end
  assert_equal(table.concat(streamed), r.text)
end)

test("two prompts at once equal each run alone", function()
  local m = model()
  for _, temperature in ipairs { 0, 0.8 } do
    local opts = { prompts = { "first prompt here", "a second, longer prompt than the first" }, max_tokens = 5,
                   temperature = temperature, seed = 3 }
    local both = m:generate(opts)
    assert_equal(#both, 2)
    for i, p in ipairs(opts.prompts) do
      local alone = m:generate { prompt = p, max_tokens = 5, temperature = temperature, seed = 3 }
      assert_equal(both[i].ids, alone.ids)
      assert_equal(both[i].text, alone.text)
    end
  end
end)

test("a text prompt gets one BOS: added when missing, never a second", function()
  local m = model()
  local tok = dsrt.tokenizer.load(m.dir .. "/tokenizer.json")
  local plain = m:generate{ prompt = "Hello", max_tokens = 1 }
  assert_equal(plain.timings.prompt_tokens, #tok:encode("Hello") + 1)
  local chat = dsv4.chat.encode({ { role = "user", content = "Hello" } })
  local ids = tok:encode(chat)
  assert_equal(ids[1], tok.bos_id)
  assert_equal(m:generate{ prompt = chat, max_tokens = 1 }.timings.prompt_tokens, #ids)
end)

test("scripts/chat.lua keeps the conversation: turn 2's reply is generated from both turns", function()
  local m = model()
  local command = ("printf 'Hello\\nAnd then?\\n/quit\\n' | %s scripts/chat.lua --model %s --max-tokens 4 --precision fp32 "
                   .. "--temperature 0 2>/dev/null"):format(h.shell_quote(h.dsrt_bin()), h.shell_quote(m.dir))
  local p = assert(io.popen(command))
  local out = p:read("a")
  assert(p:close(), "chat.lua failed")
  local replies = {}
  for reply in out:gmatch("> ([^\n]*)\n") do replies[#replies + 1] = reply end
  assert_equal(#replies, 2)
  local first = m:generate{ prompt = dsv4.chat.encode({ { role = "user", content = "Hello" } }), max_tokens = 4 }
  assert_equal(replies[1], first.text)
  local second = m:generate{ prompt = dsv4.chat.encode({ { role = "user", content = "Hello" },
    { role = "assistant", content = first.text }, { role = "user", content = "And then?" } }), max_tokens = 4 }
  assert_equal(replies[2], second.text)
  local bad = io.popen(h.shell_quote(h.dsrt_bin()) .. " scripts/chat.lua 2>&1")
  local message = bad:read("a")
  local _, _, status = bad:close()
  assert(message:find("%-%-model is required") and status == 2, message)
end)

-- runs generate with the model's sessions recorded; returns the result and the last session
local function generate_recording(m, opts)
  local made, session = m.session, nil
  m.session = function(self, o) session = made(self, o) return session end
  local ok, r = pcall(m.generate, m, opts)
  m.session = nil -- back to the class's method
  if not ok then error(r, 0) end
  return r, session
end

test("the pipelined loop gives the plain loop's tokens, text, finish and session", function()
  local m = model()
  local plain = m:generate { prompt = "Once upon", max_tokens = 10, pipeline = false }
  local tok = require("dsrt.tokenizer").load(m.dir .. "/tokenizer.json")
  tok.eos_id = plain.ids[4] -- EOS the 4th greedy token (or an earlier equal one)
  local text = plain.text
  local stop = text:sub(#text // 2, #text // 2 + 1)
  local cases = {
    { max_tokens = 10 },
    { max_tokens = 10, temperature = 0.9, top_p = 0.9, top_k = 20, seed = 7 },
    { max_tokens = 10, tokenizer = tok },
    { max_tokens = 10, stop = { stop } },
    { max_tokens = 10, max_len = #m._tokenizer:encode("Once upon") + 4 }, -- the session fills first
    { max_tokens = 1 },
  }
  local reasons = {}
  for i, case in ipairs(cases) do
    local runs = {}
    for _, pipeline in ipairs { false, true } do
      local opts = { prompt = "Once upon", pipeline = pipeline }
      for k, v in pairs(case) do opts[k] = v end
      local pieces = {}
      opts.on_token = function(piece) pieces[#pieces + 1] = piece end
      local r, session = generate_recording(m, opts)
      runs[#runs + 1] = { r = r, length = session:length(), pieces = table.concat(pieces) }
    end
    local a, b = runs[1], runs[2]
    assert_equal(b.r.ids, a.r.ids, "case " .. i)
    assert_equal(b.r.text, a.r.text, "case " .. i)
    assert_equal(b.pieces, a.pieces, "case " .. i)
    assert_equal(b.r.finish_reason, a.r.finish_reason, "case " .. i)
    assert_equal(b.r.timings.decode_tokens, a.r.timings.decode_tokens, "case " .. i)
    assert_equal(b.length, a.length, "case " .. i .. ": the session's length")
    reasons[a.r.finish_reason] = true
  end
  assert(reasons.eos and reasons.stop and reasons.length, "the cases did not end in each way")
  -- what the pipelined loop does not serve takes the plain one: penalties, several prompts
  local r = m:generate { prompt = "Once upon", max_tokens = 4, repetition_penalty = 1.3, pipeline = true }
  assert_equal(r.ids, m:generate { prompt = "Once upon", max_tokens = 4, repetition_penalty = 1.3, pipeline = false }.ids)
  assert_error(function() m:generate { prompt = "x", pipeline = 1 } end, "pipeline must be a boolean")
end)

test("bad input is a clear error", function()
  local m = model()
  assert_error(function() m:generate { prompt = "" } end, "prompt is empty")
  assert_error(function() m:generate { ids = {} } end, "ids is empty")
  assert_error(function() m:generate { ids = { 1, m.dims.vocab } } end, "outside the vocabulary")
  assert_error(function() m:generate { ids = { 1, -1 } } end, "outside the vocabulary")
  assert_error(function() m:generate { ids = { 1, 2, 3 }, max_len = 3 } end, "max_len")
  assert_error(function() m:generate { prompt = "x", temperature = -1 } end, "temperature must be")
  assert_error(function() m:generate { prompt = "x", top_p = 0 } end, "top_p")
  assert_error(function() m:generate { prompt = "x", max_tokens = 0 } end, "max_tokens")
  assert_error(function() m:generate { prompt = "x", ids = { 1 } } end, "exactly one")
  assert_error(function() m:generate { prompt = "x", stop = { "" } } end, "stop%[1%]")
  assert_error(function() m:stream { prompt = "", max_tokens = 2 } end, "prompt is empty")
  assert_error(function() m:generate { prompts = {} } end, "prompts must be")
end)

return tests
