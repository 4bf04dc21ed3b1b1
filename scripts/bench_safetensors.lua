-- bench_safetensors.lua - how fast dsrt.safetensors reads a large file and opens a sharded folder.
--
--   build/dsrt scripts/bench_safetensors.lua [--quick]
--
-- Writes a ~1 GB file (16 f32 tensors of 64 MiB; half that with --quick) into a temporary folder,
-- then times open + get + a checksum of every tensor's bytes (an integer sum, so every byte is
-- read), and reports GB/s of tensor bytes; with a GPU, open + get + a copy of every tensor to it
-- (what loading a checkpoint does) as well. The read is timed twice: right after writing (the
-- file is in the page cache) and after `dd iflag=nocache` asked the kernel to drop the file's
-- cached pages (when dd supports it; the disk then shows through). The checksum alone, on
-- memory already in RAM, is timed too: it bounds what the read can show. Then a folder of 46
-- shards with 1,500 entries each (a checkpoint of DeepSeek-V4's size: tens of thousands of
-- tensors) is opened, which checks every header. Everything written is removed at the end. Wall times, from
-- CPU events; the median of 3 runs.
local dsrt = require "dsrt"
local st = dsrt.safetensors

local quick = arg[1] == "--quick"
local TENSORS, ROWS, COLS = 16, quick and 2048 or 4096, 4096
local SHARDS, ENTRIES_PER_SHARD = 46, 1500

local function shell_quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

local folder = os.tmpname()
assert(os.remove(folder))
assert(os.execute("mkdir " .. shell_quote(folder)))

local function median(xs)
  table.sort(xs)
  return xs[(#xs + 1) // 2]
end

-- wall milliseconds of fn(), median of `runs`; `before` runs ahead of each run, untimed
local function time_ms(fn, runs, before)
  local start, stop = dsrt.event("cpu", { timing = true }), dsrt.event("cpu", { timing = true })
  local samples = {}
  for i = 1, runs do
    collectgarbage() -- unmaps the previous run's file, so that `before` can drop its pages
    if before then before() end
    start:record()
    fn()
    stop:record()
    samples[i] = start:elapsed(stop)
  end
  return median(samples)
end

local function checksum(t) return t:bitcast("i32"):sum():item() end

local rows = {}
local function report(what, ms, bytes)
  rows[#rows + 1] = string.format("%-46s %10.1f ms %s", what, ms, bytes and string.format("%8.2f GB/s", bytes / ms / 1e6) or "")
end

local ok, err = pcall(function()
  local path = folder .. "/big.safetensors"
  local tensors, bytes, expected = {}, 0, 0
  for i = 1, TENSORS do
    local t = dsrt.full({ ROWS, COLS }, i, { dtype = "f32" })
    tensors[string.format("layers.%d.weight", i)] = t
    bytes = bytes + t:nbytes()
    expected = expected + checksum(t)
  end
  report(string.format("save %d x f32[%d, %d] (incl. fsync)", TENSORS, ROWS, COLS),
         time_ms(function() st.save(path, tensors) end, 1), bytes)
  local in_ram = tensors["layers.1.weight"]
  report("checksum alone, memory in RAM", time_ms(function() checksum(in_ram) end, 3) * TENSORS, bytes)
  tensors, in_ram = nil, nil

  local function read_all()
    local file <close> = st.open(path)
    local sum = 0
    for _, name in ipairs(file:names()) do sum = sum + checksum(file:get(name)) end
    assert(sum == expected, "checksum mismatch")
  end
  report("open + get + checksum, page cache warm", time_ms(read_all, 3), bytes)
  if dsrt.cuda.available() then
    report("open + get + copy to the GPU, page cache warm", time_ms(function()
      local file <close> = st.open(path)
      for _, name in ipairs(file:names()) do file:get(name):to("cuda") end
    end, 3), bytes)
  end
  local dd_drops = os.execute("dd if=" .. shell_quote(path) .. " iflag=nocache count=0 status=none 2>/dev/null")
  if dd_drops then
    local function drop() assert(os.execute("dd if=" .. shell_quote(path) .. " iflag=nocache count=0 status=none")) end
    report("open + get + checksum, file dropped from cache", time_ms(read_all, 3, drop), bytes)
  end
  os.remove(path)

  local shards = folder .. "/shards"
  assert(os.execute("mkdir " .. shell_quote(shards)))
  local tiny = dsrt.ones({ 2, 2 }, { dtype = "bf16" })
  local map = {}
  for s = 1, SHARDS do
    local file = string.format("model-%05d-of-%05d.safetensors", s, SHARDS)
    local group = {}
    for e = 1, ENTRIES_PER_SHARD do
      local name = string.format("layers.%d.ffn.experts.%d.w%d.weight", s, e // 3, e % 3 + 1)
      group[name] = tiny
      map[#map + 1] = string.format("%q: %q", name, file)
    end
    st.save(shards .. "/" .. file, group, { format = "pt" })
  end
  local index = assert(io.open(shards .. "/model.safetensors.index.json", "w"))
  assert(index:write('{"metadata": {}, "weight_map": {', table.concat(map, ",\n"), "}}\n"))
  assert(index:close())
  report(string.format("open %d shards, %d entries", SHARDS, SHARDS * ENTRIES_PER_SHARD),
         time_ms(function() st.open(shards):close() end, 3))
end)
assert(os.execute("rm -rf " .. shell_quote(folder)))
if not ok then error(err, 0) end

print("dsrt.safetensors on the CPU: " .. (quick and "--quick, " or "") .. "median of 3 wall-clock runs")
for _, row in ipairs(rows) do print(row) end
