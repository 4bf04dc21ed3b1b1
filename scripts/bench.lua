-- bench.lua - throughput of the core ops on a CUDA device, against the card's own ceilings.
--
--   build/dsrt scripts/bench.lua [--quick]
--
-- Each op is timed with CUDA events after warm-up; the median of the runs is reported with the
-- bytes it must move (each input read once, each output written once) or the FLOPs it must do,
-- over the measured ceilings: a device-to-device copy for bandwidth (bytes read + written) and
-- bf16 cuBLAS at 8192^3 for matrix rate. Inputs are random, never zeros.
local dsrt = require "dsrt"

if not dsrt.cuda.available() then
  io.stderr:write("bench: no CUDA device\n")
  os.exit(1)
end
local quick = arg[1] == "--quick"
local dev = "cuda"

local function median(xs)
  table.sort(xs)
  return xs[(#xs + 1) // 2]
end

-- milliseconds per call of fn, median over runs, after warm-up
local function time_ms(fn, runs)
  runs = runs or (quick and 5 or 20)
  for _ = 1, 3 do fn() end
  local start, stop = dsrt.event(dev, {timing = true}), dsrt.event(dev, {timing = true})
  local samples = {}
  for i = 1, runs do
    start:record()
    fn()
    stop:record()
    stop:synchronize()
    samples[i] = start:elapsed(stop)
    collectgarbage("step") -- return freed tensors to the cache between runs
  end
  return median(samples)
end

local rows = {}
-- against_copy = false for rates whose ceiling is not device memory (the host link)
local function report(name, ms, bytes, flops, against_copy)
  rows[#rows + 1] = {name = name, ms = ms, gbs = bytes and bytes / ms / 1e6, tflops = flops and flops / ms / 1e9,
                     of_copy = bytes and against_copy ~= false}
end

local info = dsrt.cuda.device_info()
local n = quick and (1 << 24) or (1 << 27) -- elements: 512 MiB of f32, far beyond L2
local x = dsrt.randn({n}, {device = dev, seed = 1})
local y = dsrt.randn({n}, {device = dev, seed = 2})
local xb = x:to("bf16")
local yb = y:to("bf16")

report("copy f32 (memcpy, ceiling)", time_ms(function() return x:clone() end), 8 * n)
report("copy f32 strided (transpose)", time_ms(function() return x:view(8192, -1):transpose(1, 2):contiguous() end), 8 * n)
report("convert f32 -> bf16", time_ms(function() return x:to("bf16") end), 6 * n)
report("convert f32 -> f8e4m3", time_ms(function() return x:to("f8e4m3") end), 5 * n)
report("convert bf16 -> fp4e2m1", time_ms(function() return xb:to("fp4e2m1") end), 2.5 * n)
report("add f32", time_ms(function() return x + y end), 12 * n)
report("mul bf16", time_ms(function() return xb * yb end), 6 * n)
report("add f32 broadcast row", time_ms(function() return x:view(-1, 4096) + y:narrow(1, 1, 4096) end), 8 * n)
report("silu bf16", time_ms(function() return xb:silu() end), 4 * n)
report("randn f32", time_ms(function() return dsrt.randn({n}, {device = dev, seed = 3}) end), 4 * n)
report("sum f32 rows of 4096", time_ms(function() return x:view(-1, 4096):sum(2) end), 4 * n)
report("sum f32 columns", time_ms(function() return x:view(-1, 4096):sum(1) end), 4 * n)
report("argmax f32 rows of 129280", time_ms(function() return x:narrow(1, 1, 129280 * 64):view(64, 129280):argmax(2) end), 4 * 129280 * 64)

local host = dsrt.full({quick and (1 << 26) or (1 << 29)}, 1.5) -- 2 GiB of pageable host memory
report("upload host -> cuda (PCIe)", time_ms(function() return dsrt.upload({host}, dev, {progress = false}) end, 3),
       host:nbytes(), nil, false)
host = nil

local m = quick and 2048 or 8192
local a, b = dsrt.randn({m, m}, {device = dev, dtype = "bf16", seed = 4}), dsrt.randn({m, m}, {device = dev, dtype = "bf16", seed = 5})
report(("matmul bf16 %d^3 (ceiling)"):format(m), time_ms(function() return dsrt.matmul(a, b) end), nil, 2 * m ^ 3)
local mf = quick and 1024 or 4096
local af, bf = dsrt.randn({mf, mf}, {device = dev, seed = 6}), dsrt.randn({mf, mf}, {device = dev, seed = 7})
report(("matmul f32 %d^3 (no TF32)"):format(mf), time_ms(function() return dsrt.matmul(af, bf) end), nil, 2 * mf ^ 3)
local bat = dsrt.randn({64, 512, 512}, {device = dev, dtype = "bf16", seed = 8})
report("matmul bf16 batched 64x512^3", time_ms(function() return dsrt.matmul(bat, bat) end), nil, 2 * 64 * 512 ^ 3)

-- Kernel families add their rows from scripts/bench/<family>.lua: each file returns a function
-- taking {report = report, time_ms = time_ms, quick = quick, dev = dev}.
for _, family in ipairs { "sampling", "nn", "linear", "moe", "attention" } do
  local path = "scripts/bench/" .. family .. ".lua"
  local f = io.open(path)
  if f then
    f:close()
    dofile(path) { report = report, time_ms = time_ms, quick = quick, dev = dev }
    collectgarbage()
  end
end

local copy_gbs, mm_tflops = rows[1].gbs, nil
for _, r in ipairs(rows) do if r.name:find("ceiling") and r.tflops then mm_tflops = r.tflops end end
print(("\ndsrt %s core benchmark on %s, %s"):format(dsrt.version, info.name, os.date("%Y-%m-%d")))
print(("%-34s %10s %10s %8s %10s %8s"):format("op", "ms", "GB/s", "% copy", "TFLOP/s", "% bf16"))
for _, r in ipairs(rows) do
  print(("%-34s %10.3f %10s %8s %10s %8s"):format(r.name, r.ms,
    r.gbs and ("%.0f"):format(r.gbs) or "", r.of_copy and ("%.0f%%"):format(100 * r.gbs / copy_gbs) or "",
    r.tflops and ("%.1f"):format(r.tflops) or "", r.tflops and ("%.0f%%"):format(100 * r.tflops / mm_tflops) or ""))
end
