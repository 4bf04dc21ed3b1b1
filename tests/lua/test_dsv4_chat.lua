-- test_dsv4_chat.lua — dsv4.chat.encode, DeepSeek-V4's prompt text (lua/dsrt/dsv4/chat.lua,
-- FORMATS.md §3 "V4 prompt format").
--
-- What it protects: each rule of the format as exact text (system, user and assistant turns, chat
-- versus thinking mode, finished turns ending with EOS, dropped earlier reasoning, tool results in
-- user turns, the generation prompt), that the ids start with exactly one BOS and carry the turn
-- tokens as single ids when encoded with the DeepSeek tokenizer, and a clear error for each bad
-- input. The tokenizer is the V3 file from tools/fetch_tokenizer.sh, which lacks V4's <think> and
-- </think> tokens, so those are checked only as text.
local dsrt = require "dsrt"
local dsv4 = require "dsrt.dsv4"
local h = require "tests.helpers"
local assert_equal, assert_error = h.assert_equal, h.assert_error

local tests, test = h.suite()
local encode = dsv4.chat.encode

local BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
local U, A = "<｜User｜>", "<｜Assistant｜>"

local tok = h.deepseek_tokenizer

-- Positions (1-based) of id in ids.
local function where(ids, id)
  local at = {}
  for i, v in ipairs(ids) do if v == id then at[#at + 1] = i end end
  return at
end

test("dsv4.chat is the module", function()
  assert_equal(dsv4.chat, require "dsrt.dsv4.chat")
end)

test("system + user, chat mode: BOS, system text, User, Assistant, </think>", function()
  assert_equal(encode{ { role = "system", content = "Be terse." }, { role = "user", content = "Hi" } },
               BOS .. "Be terse." .. U .. "Hi" .. A .. "</think>")
  -- the defaults are thinking = false, add_generation_prompt = true
  assert_equal(encode({ { role = "user", content = "Hi" } }, { thinking = false, add_generation_prompt = true }),
               BOS .. U .. "Hi" .. A .. "</think>")
end)

test("user only, thinking mode opens the assistant with <think>", function()
  assert_equal(encode({ { role = "user", content = "Hi" } }, { thinking = true }), BOS .. U .. "Hi" .. A .. "<think>")
end)

test("several system messages are concatenated verbatim, in place", function()
  assert_equal(encode{ { role = "system", content = "A." }, { role = "system", content = "B." },
                       { role = "user", content = "q" } },
               BOS .. "A.B." .. U .. "q" .. A .. "</think>")
end)

local convo = {
  { role = "system", content = "S" },
  { role = "user", content = "u1" },
  { role = "assistant", content = "a1", reasoning = "r1" },
  { role = "user", content = "u2" },
}

test("multi-turn, chat mode: a finished turn is content + EOS, reasoning never written", function()
  assert_equal(encode(convo), BOS .. "S" .. U .. "u1" .. A .. "</think>a1" .. EOS .. U .. "u2" .. A .. "</think>")
end)

test("multi-turn, thinking mode: earlier reasoning dropped, the last turn opens with <think>", function()
  assert_equal(encode(convo, { thinking = true }),
               BOS .. "S" .. U .. "u1" .. A .. "</think>a1" .. EOS .. U .. "u2" .. A .. "<think>")
end)

test("an assistant turn after the last user keeps its reasoning in thinking mode only", function()
  local done = { { role = "user", content = "u" }, { role = "assistant", content = "a", reasoning = "r" } }
  assert_equal(encode(done, { thinking = true, add_generation_prompt = false }),
               BOS .. U .. "u" .. A .. "<think>r</think>a" .. EOS)
  assert_equal(encode(done, { add_generation_prompt = false }), BOS .. U .. "u" .. A .. "</think>a" .. EOS)
  -- no reasoning given: an empty reasoning part, still closed
  assert_equal(encode({ done[1], { role = "assistant", content = "a" } }, { thinking = true, add_generation_prompt = false }),
               BOS .. U .. "u" .. A .. "<think></think>a" .. EOS)
end)

test("add_generation_prompt = false after a user turn appends nothing", function()
  assert_equal(encode({ { role = "user", content = "u" } }, { add_generation_prompt = false }), BOS .. U .. "u")
end)

test("tool results go into a user turn, joined with blank lines", function()
  local msgs = {
    { role = "user", content = "weather?" },
    { role = "assistant", content = "calling" },
    { role = "tool", content = "sunny" },
    { role = "tool", content = "20C" },
  }
  assert_equal(encode(msgs), BOS .. U .. "weather?" .. A .. "</think>calling" .. EOS ..
               U .. "<tool_result>sunny</tool_result>\n\n<tool_result>20C</tool_result>" .. A .. "</think>")
  -- a user message after tool results joins the same turn; so does a tool message after a user one
  msgs[5] = { role = "user", content = "and tomorrow?" }
  assert_equal(encode(msgs, { thinking = true }), BOS .. U .. "weather?" .. A .. "</think>calling" .. EOS ..
               U .. "<tool_result>sunny</tool_result>\n\n<tool_result>20C</tool_result>\n\nand tomorrow?" .. A .. "<think>")
  assert_equal(encode{ { role = "user", content = "x" }, { role = "tool", content = "y" } },
               BOS .. U .. "x\n\n<tool_result>y</tool_result>" .. A .. "</think>")
end)

test("the ids start with exactly one BOS; turn tokens and EOS are single ids", function()
  local t = tok()
  assert_equal(t:id(BOS), 0); assert_equal(t:id(EOS), 1)
  assert_equal(t:id(U), 128803); assert_equal(t:id(A), 128804)
  for _, thinking in ipairs{ false, true } do
    local ids = t:encode(encode(convo, { thinking = thinking }))
    assert_equal(ids[1], 0)
    assert_equal(where(ids, 0), { 1 })                 -- no second BOS
    local users, assistants, eos = where(ids, 128803), where(ids, 128804), where(ids, 1)
    assert_equal(#users, 2); assert_equal(#assistants, 2); assert_equal(#eos, 1)
    assert(users[1] < assistants[1] and assistants[1] < eos[1] and eos[1] < users[2] and users[2] < assistants[2],
           "turn tokens out of order")
    assert_equal(eos[1] + 1, users[2])                 -- EOS ends the finished turn, the next starts
    -- the text round-trips, so <think>/</think> (plain text in the V3 file) are where the text puts them
    assert_equal(t:decode(ids), encode(convo, { thinking = thinking }))
  end
  -- system + user: BOS, the system text, then User
  local ids = t:encode(encode{ { role = "system", content = "Hi" }, { role = "user", content = "Yo" } })
  assert_equal(ids[1], 0); assert_equal(where(ids, 0), { 1 })
  assert_equal(t:decode({ table.unpack(ids, 2, where(ids, 128803)[1] - 1) }), "Hi")
end)

test("bad input: clear errors naming the message", function()
  local user = { role = "user", content = "u" }
  assert_error(encode, "the message list is empty", {})
  assert_error(encode, "messages must be a list", "hi")
  assert_error(encode, "message 2 is a string", { user, "x" })
  assert_error(encode, 'message 2 has an unknown role "bot"', { user, { role = "bot", content = "x" } })
  assert_error(encode, "message 1 has an unknown role nil", { { content = "x" } })
  assert_error(encode, "message 1 %(user%): content must be a string, got number", { { role = "user", content = 3 } })
  assert_error(encode, "message 1 %(user%): content must be a string, got nil", { { role = "user" } })
  assert_error(encode, "message 2 %(assistant%): reasoning must be a string",
               { user, { role = "assistant", content = "a", reasoning = 1 } }, { add_generation_prompt = false })
  assert_error(encode, "message 1 %(user%): only assistant messages have reasoning",
               { { role = "user", content = "u", reasoning = "r" } })
  assert_error(encode, "message 2 %(assistant%) ends the conversation, but add_generation_prompt",
               { user, { role = "assistant", content = "a" } })
  assert_error(encode, "message 1 %(system%) ends the conversation", { { role = "system", content = "s" } })
  assert_error(encode, "message 2 %(assistant%) must follow a user or tool message",
               { { role = "system", content = "s" }, { role = "assistant", content = "a" } }, { add_generation_prompt = false })
  assert_error(encode, "message 3 %(assistant%) must follow",
               { user, { role = "assistant", content = "a" }, { role = "assistant", content = "b" } }, { add_generation_prompt = false })
  assert_error(encode, "unknown option think", { user }, { think = true })
end)

return tests
