-- demo.lua - a short tour of what dsrt runs today: tensors, conversions, streams, the GPU if any.
--   build/dsrt scripts/demo.lua
local dsrt = require "dsrt"

local device = dsrt.cuda.available() and "cuda" or "cpu"
print(("dsrt %s, %d CUDA device(s); running on %s"):format(dsrt.version, dsrt.cuda.device_count(), device))

local t = dsrt.tensor({{1, 2}, {3, 4}}, {dtype = "f32", device = device})
print(t)
print("t @ t^T =", dsrt.matmul(t, t:transpose(1, 2)))

local x = dsrt.randn({4, 6}, {seed = 1, device = device})
print("randn, seed 1:", x)
print("as FP8 e4m3 and back, max error:", dsrt.max_abs_diff(x:to("f8e4m3"):to("f32"), x))
print("as FP4 e2m1 and back, max error:", dsrt.max_abs_diff(x:to("fp4e2m1"):to("f32"), x))

-- work on a side stream, joined back with an event, as the DSV4 layers do with their aux streams
local main, side = dsrt.current_stream(device), dsrt.stream(device)
side:wait(main:record())            -- fan out: x is ready before the side stream reads it
local y = dsrt.with_stream(side, function() return (x * 2):sum(2) end)
main:wait(side:record())            -- join
print("row sums of 2x on a side stream:", y)
print("memory:", ("%d bytes in use on %s"):format(dsrt.memory_stats(device).allocated, device))
