-- generate.lua - stream a continuation of a prompt from a DeepSeek-V4 model folder.
--   build/dsrt scripts/generate.lua --model DIR [--prompt TEXT | stdin] [--max-tokens N]
--       [--temperature T] [--top-k K] [--top-p P] [--min-p P] [--repetition-penalty R]
--       [--presence-penalty P] [--seed S] [--stop TEXT]... [--device cpu|cuda] [--precision reference|fp32]
-- The text goes to stdout as it is generated; timings go to stderr.
local dsv4 = require "dsrt.dsv4"

local USAGE = [[
usage: dsrt scripts/generate.lua --model DIR [options]
  --model DIR               model folder (config.json, safetensors, tokenizer.json)
  --prompt TEXT             the prompt (default: read stdin)
  --max-tokens N            tokens to generate (default 32)
  --temperature T           0 = greedy (default 0)
  --top-k K                 keep the K most likely tokens (0 = off)
  --top-p P                 nucleus sampling, 0 < P <= 1 (1 = off)
  --min-p P                 drop tokens below P * the most likely (0 = off)
  --repetition-penalty R    > 0 (1 = off)
  --presence-penalty P      (0 = off)
  --seed S                  integer (default 1)
  --stop TEXT               a stop string (repeatable)
  --device cpu|cuda         where the model runs (default cpu)
  --precision reference|fp32  numerics (default reference)
  --help                    this text
]]

local NUMBERS = {
  ["--max-tokens"] = { "max_tokens", "integer" }, ["--temperature"] = { "temperature" },
  ["--top-k"] = { "top_k", "integer" }, ["--top-p"] = { "top_p" }, ["--min-p"] = { "min_p" },
  ["--repetition-penalty"] = { "repetition_penalty" }, ["--presence-penalty"] = { "presence_penalty" },
  ["--seed"] = { "seed", "integer" },
}

local function die(msg)
  io.stderr:write("generate.lua: ", msg, "\n")
  os.exit(2)
end

local opts = { max_tokens = 32, stop = {} }
local dir, prompt, device, precision = nil, nil, "cpu", "reference"
local i = 1
while i <= #arg do
  local a, v = arg[i], arg[i + 1]
  if a == "--help" or a == "-h" then io.write(USAGE) os.exit(0) end
  if v == nil then die("missing a value after " .. a .. "\n" .. USAGE) end
  if a == "--model" then dir = v
  elseif a == "--prompt" then prompt = v
  elseif a == "--device" then device = v
  elseif a == "--precision" then precision = v
  elseif a == "--stop" then opts.stop[#opts.stop + 1] = v
  elseif NUMBERS[a] then
    local key, kind = NUMBERS[a][1], NUMBERS[a][2]
    local n = tonumber(v)
    if kind == "integer" then n = math.tointeger(n) end
    if n == nil then die(a .. " needs " .. (kind == "integer" and "an integer" or "a number") .. ", got " .. v) end
    opts[key] = n
  else
    die("unknown option " .. a .. "\n" .. USAGE)
  end
  i = i + 2
end
if not dir then die("--model DIR is required\n" .. USAGE) end
if device ~= "cpu" and device ~= "cuda" and not device:match("^cuda:%d+$") then die("--device must be cpu or cuda") end
if prompt == nil then prompt = io.read("a") end

local ok, err = pcall(function()
  local model = dsv4.load(dir, { device = device, precision = precision })
  opts.prompt = prompt
  opts.on_token = function(text)
    io.write(text)
    io.flush()
  end
  local r = model:generate(opts)
  io.write("\n")
  local t = r.timings
  io.stderr:write(string.format(
    "finish: %s; prompt: %d tokens in %.3f s (%.1f tokens/s); decode: %d tokens in %.3f s (%.1f tokens/s)\n",
    r.finish_reason, t.prompt_tokens, t.prompt_seconds, t.prompt_tokens_per_s, t.decode_tokens, t.decode_seconds,
    t.decode_tokens_per_s))
end)
if not ok then die(tostring(err)) end
