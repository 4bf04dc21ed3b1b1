-- bench_load.lua — how fast a DeepSeek-V4 checkpoint goes from files to GPU memory.
--
--   build/dsrt scripts/bench_load.lua DIR [--layers N] [--runs R]
--
-- Writes (once: an existing checkpoint of the same shape in DIR is reused) a random checkpoint
-- of the Flash config cut to its first N layers (default 4: window, window, CSA, HCA) plus the MTP
-- layer, with the real 129280 × 4096 embedding and head — 20 GB for N = 4 — in ~4 GB shards like
-- the published ones. Then times weights.load(DIR, {device = "cuda"}) end to end (config, opening
-- and checking every shard, binding, the upload through pinned staging buffers) and reports file
-- bytes / seconds:
--   warm  the page cache holds the files (they were just written or read): R runs (default 2),
--         the best one; this is the host-to-device rate with the mapping's page faults
--   cold  after `sync; echo 3 > /proc/sys/vm/drop_caches` (needs root, and a VM may refuse): the
--         disk's rate; reported as unavailable when the caches cannot be dropped
-- Device memory is returned to the driver between runs (dsrt.empty_cache), so every run pays
-- its allocations as a first load does. Time is measured with CUDA events around the whole call
-- (the GPU is idle before it, so they mark wall-clock time). The last line is a one-line table.
local dsrt = require "dsrt"
local cjson = require "cjson"
local config = require "dsrt.dsv4.config"
local random = require "dsrt.dsv4.random"
local weights = require "dsrt.dsv4.weights"

local SHARD_BYTES = 4e9
local FLASH_CONFIG = "tests/fixtures/config/flash_published.json"

local function usage(message)
  io.stderr:write("bench_load: " .. message .. "\n", "usage: build/dsrt scripts/bench_load.lua DIR [--layers N] [--runs R]\n")
  os.exit(2)
end

local dir, layers, runs = nil, 4, 2
local i = 1
while i <= #arg do
  local a = arg[i]
  if a == "--layers" or a == "--runs" then
    local n = math.tointeger(tonumber(arg[i + 1] or ""))
    if not n or n < 1 then usage(a .. " needs a positive integer") end
    if a == "--layers" then layers = n else runs = n end
    i = i + 1
  elseif a:sub(1, 2) == "--" or dir then
    usage("unexpected argument " .. a)
  else
    dir = a
  end
  i = i + 1
end
if not dir then usage("no DIR") end
if not dsrt.cuda.available() then
  io.stderr:write("bench_load: no CUDA device\n")
  os.exit(1)
end

local function shell_quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local text = f:read("a")
  f:close()
  return text
end

-- The Flash config with its first `layers` layers and its MTP layer.
local root = (arg[0]:match("^(.*)/scripts/[^/]*$")) or "."
local raw = cjson.decode((assert(read_file(root .. "/" .. FLASH_CONFIG), "cannot read " .. FLASH_CONFIG)))
local ratios = {}
for layer = 1, layers do ratios[layer] = raw.compress_ratios[layer] end
for k = 1, raw.num_nextn_predict_layers do ratios[layers + k] = raw.compress_ratios[raw.num_hidden_layers + k] end
raw.num_hidden_layers, raw.compress_ratios = layers, ratios
raw.num_hash_layers = math.min(raw.num_hash_layers, layers) -- the config refuses more hash layers than layers
local cfg = config.parse(raw, "flash, " .. layers .. " layers")

local function elapsed_seconds(fn)
  local start, stop = dsrt.event("cuda", { timing = true }), dsrt.event("cuda", { timing = true })
  start:record()
  fn()
  stop:record()
  stop:synchronize()
  return start:elapsed(stop) / 1000
end

-- ---- the checkpoint ----

local existing = read_file(dir .. "/config.json")
local reusable = existing and read_file(dir .. "/model.safetensors.index.json")
                 and cjson.decode(existing).num_hidden_layers == layers
if reusable then
  print(string.format("bench_load: reusing the %d-layer checkpoint in %s", layers, dir))
else
  assert(os.execute("mkdir -p " .. shell_quote(dir)), "cannot create " .. dir)
  local seconds = elapsed_seconds(function()
    local tensors = random.tensors(cfg, { seed = 1, device = "cuda" })
    local total = 0
    for _, t in pairs(tensors) do total = total + t:nbytes() end
    weights.save(dir, raw, tensors, { shards = math.max(1, math.ceil(total / SHARD_BYTES)) })
  end)
  collectgarbage()
  dsrt.empty_cache("cuda")
  print(string.format("bench_load: wrote a random %d-layer Flash checkpoint to %s in %.1f s", layers, dir, seconds))
end

local index = cjson.decode(read_file(dir .. "/model.safetensors.index.json"))
local files, file_bytes = {}, 0
for _, file in pairs(index.weight_map) do files[file] = true end
local shard_count = 0
for file in pairs(files) do
  local f = assert(io.open(dir .. "/" .. file, "rb"))
  file_bytes = file_bytes + f:seek("end")
  f:close()
  shard_count = shard_count + 1
end

-- ---- loading ----

local function timed_load()
  local seconds = elapsed_seconds(function()
    local _, w = weights.load(dir, { device = "cuda" })
    assert(w.device == "cuda:0")
  end)
  collectgarbage()
  collectgarbage()
  dsrt.empty_cache("cuda")
  return seconds
end

-- make the page cache hold every shard, whatever happened before
assert(os.execute("cat " .. shell_quote(dir) .. "/*.safetensors > /dev/null"))
local warm = math.huge
for run = 1, runs do
  local seconds = timed_load()
  print(string.format("bench_load: warm run %d: %.2f s, %.2f GB/s", run, seconds, file_bytes / 1e9 / seconds))
  warm = math.min(warm, seconds)
end

local drop = io.popen("{ sync && echo 3 > /proc/sys/vm/drop_caches; } 2>&1 && echo dropped")
local drop_output = drop:read("a")
drop:close()
local cold, cold_note
if drop_output:find("dropped\n$") then
  cold = timed_load()
  print(string.format("bench_load: cold run: %.2f s, %.2f GB/s", cold, file_bytes / 1e9 / cold))
else
  cold_note = "cold n/a (drop_caches: " .. (drop_output:gsub("%s+$", ""):gsub("\n", " ")) .. ")"
  print("bench_load: the page cache could not be dropped, so no cold run: " .. drop_output)
end

print(string.format("| load %s | %d layers + MTP | %.2f GB in %d shards | warm %.2f s %.2f GB/s | %s |",
                    dsrt.cuda.device_info().name, layers, file_bytes / 1e9, shard_count, warm, file_bytes / 1e9 / warm,
                    cold and string.format("cold %.2f s %.2f GB/s", cold, file_bytes / 1e9 / cold) or cold_note))
