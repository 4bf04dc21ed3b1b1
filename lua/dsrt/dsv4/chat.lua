-- dsrt.dsv4.chat — DeepSeek-V4's chat prompt format: a list of messages to the prompt text.
--
--   local chat = require "dsrt.dsv4.chat"          -- also dsv4.chat
--   local text = chat.encode({
--     { role = "system", content = "You are terse." },
--     { role = "user", content = "Hi" },
--   }, { thinking = false, add_generation_prompt = true })
--   local ids = tok:encode(text)                    -- the tokenizer adds no BOS; the text has one
--
-- messages: { role = "system"|"user"|"assistant"|"tool", content = string,
--             reasoning = string (assistant only, optional) }, ...
-- opts:     thinking (default false): thinking mode, else chat mode
--           add_generation_prompt (default true): end with the opening of the next assistant turn
--
-- What it protects: the model sees exactly the text its own encoder writes. The rules follow
-- DeepSeek-V4's `encoding/encoding_dsv4.py` (FORMATS.md §3, "DeepSeek-V4 vs V3" and "V4 prompt
-- format"), render_message / merge_tool_messages / _drop_thinking_messages with drop_thinking =
-- true and reasoning_effort "low", restricted to plain-text messages:
--
--  1. The text starts with BOS "<｜begin▁of▁sentence｜>", exactly once. tok:encode adds none, so
--     tok:encode(text) starts with id 0 once (the reference generate.py does the same).
--  2. system: its content verbatim, where it stands, with nothing around it (no token, no
--     newline). Several system messages are concatenated in order, as the reference does; a
--     system message need not be first.
--  3. user: "<｜User｜>" .. content.
--  4. tool: V4 has no tool role; a tool result becomes "<tool_result>" .. content ..
--     "</tool_result>" inside a user turn. A run of consecutive user and tool messages is ONE
--     user turn: "<｜User｜>" then the parts (user content as is, tool results wrapped) joined by
--     "\n\n" (merge_tool_messages; a tool message right after a user message joins that turn).
--  5. After a user turn that is followed by an assistant message (or that ends the conversation,
--     when add_generation_prompt is true): "<｜Assistant｜>" then, in chat mode, "</think>"
--     (empty reasoning); in thinking mode "<think>" after the last user turn, and "</think>" after
--     earlier ones (their reasoning is dropped, so they open as chat turns).
--  6. A finished assistant turn: [reasoning "</think>"] content "<｜end▁of▁sentence｜>". The
--     reasoning part is written only in thinking mode and only for assistant turns after the last
--     user turn (for example a turn being scored or continued); earlier turns' reasoning is
--     dropped, and in chat mode reasoning is never written (the turn opened with "</think>").
--  7. add_generation_prompt = true: the conversation must end with a user or tool message, and the
--     text ends with rule 5's "<｜Assistant｜>" + "</think>" | "<think>". With false, nothing is
--     appended; the conversation may then end with anything (a finished assistant turn ends with
--     EOS).
--
-- Stricter than the reference, to catch mistakes early (each error names the message's index):
-- an empty list, an unknown role, non-string content or reasoning, reasoning on a non-assistant
-- message, an assistant message that does not follow a user or tool message, unknown option
-- names. Not supported (the reference has them): tool schemas in the system prompt, assistant
-- tool_calls (DSML), the "developer"/"latest_reminder" roles, tasks, images, and the
-- reasoning-effort prefixes "high"/"max". Content is inserted verbatim: special-token text in it
-- (even BOS) is matched by the tokenizer as that token, as with the reference.
local chat = {}

chat.BOS = "<｜begin▁of▁sentence｜>"
chat.EOS = "<｜end▁of▁sentence｜>"
chat.USER = "<｜User｜>"
chat.ASSISTANT = "<｜Assistant｜>"
chat.THINK_START = "<think>"
chat.THINK_END = "</think>"

local ROLES = { system = true, user = true, assistant = true, tool = true }
local OPTIONS = { thinking = true, add_generation_prompt = true }

local function fail(fmt, ...)
  error("dsv4.chat.encode: " .. string.format(fmt, ...), 0)
end

-- The messages, checked, as turns: { role = "system"|"user"|"assistant", text or parts, index }.
local function turns_of(messages)
  if type(messages) ~= "table" then fail("messages must be a list of tables, got %s", type(messages)) end
  if #messages == 0 then fail("the message list is empty") end
  local turns = {}
  for i, m in ipairs(messages) do
    if type(m) ~= "table" then fail("message %d is a %s, not a table", i, type(m)) end
    local role = m.role
    if not ROLES[role] then
      fail("message %d has an unknown role %s (expected system, user, assistant or tool)", i,
           type(role) == "string" and string.format("%q", role) or tostring(role))
    end
    if type(m.content) ~= "string" then
      fail("message %d (%s): content must be a string, got %s", i, role, type(m.content))
    end
    if m.reasoning ~= nil then
      if role ~= "assistant" then fail("message %d (%s): only assistant messages have reasoning", i, role) end
      if type(m.reasoning) ~= "string" then
        fail("message %d (assistant): reasoning must be a string, got %s", i, type(m.reasoning))
      end
    end
    local part = role == "tool" and ("<tool_result>" .. m.content .. "</tool_result>") or m.content
    local last = turns[#turns]
    if role == "user" or role == "tool" then
      if last and last.role == "user" then
        last.parts[#last.parts + 1] = part
        last.last_index = i
      else
        turns[#turns + 1] = { role = "user", parts = { part }, index = i, last_index = i }
      end
    else
      if role == "assistant" and not (last and last.role == "user") then
        fail("message %d (assistant) must follow a user or tool message", i)
      end
      turns[#turns + 1] = { role = role, content = m.content, reasoning = m.reasoning, index = i, last_index = i }
    end
  end
  return turns
end

--- The prompt text of messages (see the rules above).
function chat.encode(messages, opts)
  opts = opts or {}
  if type(opts) ~= "table" then fail("opts must be a table, got %s", type(opts)) end
  for k in pairs(opts) do
    if not OPTIONS[k] then fail("unknown option %s (expected thinking, add_generation_prompt)", tostring(k)) end
  end
  local thinking = opts.thinking and true or false
  local generation = opts.add_generation_prompt == nil or opts.add_generation_prompt and true or false

  local turns = turns_of(messages)
  local final = turns[#turns]
  if generation and final.role ~= "user" then
    fail("message %d (%s) ends the conversation, but add_generation_prompt needs a user or tool message last",
         final.index, messages[final.index].role)
  end
  local last_user = 0
  for t = #turns, 1, -1 do
    if turns[t].role == "user" then last_user = t; break end
  end

  local out = { chat.BOS }
  for t, turn in ipairs(turns) do
    if turn.role == "system" then
      out[#out + 1] = turn.content
    elseif turn.role == "user" then
      out[#out + 1] = chat.USER .. table.concat(turn.parts, "\n\n")
      local following = turns[t + 1]
      if (following and following.role == "assistant") or (not following and generation) then
        out[#out + 1] = chat.ASSISTANT .. ((thinking and t == last_user) and chat.THINK_START or chat.THINK_END)
      end
    else -- assistant
      if thinking and t > last_user then out[#out + 1] = (turn.reasoning or "") .. chat.THINK_END end
      out[#out + 1] = turn.content .. chat.EOS
    end
  end
  return table.concat(out)
end

return chat
