-- chat.lua - an interactive terminal chat with a DeepSeek-V4 model folder, keeping the conversation.
--   build/dsrt scripts/chat.lua --model DIR [--system TEXT] [--thinking] [--max-tokens N]
--       [--temperature T] [--top-p P] [--seed S] [--device cpu|cuda] [--precision reference|fp32]
-- Each line typed is a user turn; the reply streams as it is generated and joins the conversation,
-- which dsv4.chat.encode turns into the prompt of the next turn. Commands: /reset forgets the
-- conversation, /quit (or end of input) leaves. Reads plain lines from stdin, so it can be piped.
local dsv4 = require "dsrt.dsv4"

local USAGE = [[
usage: dsrt scripts/chat.lua --model DIR [options]
  --model DIR               model folder (config.json, safetensors, tokenizer.json)
  --system TEXT             a system prompt
  --thinking                thinking mode (<think>) instead of chat mode (</think>)
  --max-tokens N            tokens per reply (default 256)
  --temperature T           0 = greedy (default 0.7)
  --top-p P                 nucleus sampling (default 0.95)
  --seed S                  integer (default 1)
  --device cpu|cuda         where the model runs (default cpu)
  --precision reference|fp32  numerics (default reference)
  --help                    this text
]]

local function die(msg)
  io.stderr:write("chat.lua: ", msg, "\n", USAGE)
  os.exit(2)
end

local settings = { max_tokens = 256, temperature = 0.7, top_p = 0.95, seed = 1 }
local numbers = { ["--max-tokens"] = "max_tokens", ["--temperature"] = "temperature", ["--top-p"] = "top_p",
                  ["--seed"] = "seed" }
local dir, system, thinking, device, precision = nil, nil, false, "cpu", "reference"
local i = 1
while i <= #arg do
  local flag, value = arg[i], arg[i + 1]
  if flag == "--help" then io.write(USAGE) os.exit(0)
  elseif flag == "--thinking" then thinking = true i = i - 1
  elseif value == nil then die("missing value after " .. flag)
  elseif flag == "--model" then dir = value
  elseif flag == "--system" then system = value
  elseif flag == "--device" then device = value
  elseif flag == "--precision" then precision = value
  elseif numbers[flag] then settings[numbers[flag]] = tonumber(value) or die(flag .. " needs a number")
  else die("unknown option " .. flag) end
  i = i + 2
end
if not dir then die("--model is required") end

local ok, model = pcall(dsv4.load, dir, { device = device, precision = precision, mtp = false })
if not ok then die(tostring(model)) end

local function fresh_conversation()
  return system and { { role = "system", content = system } } or {}
end

local conversation, turn = fresh_conversation(), 0
io.stderr:write("chat with ", dir, " (", precision, " on ", device, "); /reset, /quit\n")
while true do
  io.write("> ")
  io.flush()
  local line = io.read("l")
  if not line or line == "/quit" then break end
  if line == "/reset" then
    conversation = fresh_conversation()
  elseif line:match("%S") then
    conversation[#conversation + 1] = { role = "user", content = line }
    turn = turn + 1
    local prompt = dsv4.chat.encode(conversation, { thinking = thinking })
    local reply = model:generate{ prompt = prompt, max_tokens = settings.max_tokens,
                                  temperature = settings.temperature, top_p = settings.top_p,
                                  seed = settings.seed + turn,
                                  on_token = function(text) io.write(text) io.flush() end }
    io.write("\n")
    conversation[#conversation + 1] = { role = "assistant", content = reply.text }
  end
end
