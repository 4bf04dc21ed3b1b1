-- profile_decode.lua - one decode step of the Flash slice (scripts/flash_slice.lua: layers 0-3 + MTP,
-- reference precision, context 4096, batch 1) inside dsrt.cuda.profiler, for a kernel profiler started
-- with its collection off; tools/profile_decode.sh runs it under ncu and sums the kernels by name.
--
--   ncu --profile-from-start off ... build/dsrt scripts/profile_decode.lua [context]
package.path = "lua/?.lua;lua/?/init.lua;./?.lua;" .. package.path
local dsrt = require "dsrt"
local dsv4 = require "dsrt.dsv4"
local core = require "dsrt.core"

local context = tonumber(arg and arg[1]) or 4096
local folder = dofile("scripts/flash_slice.lua")()
local model = dsv4.load(folder, { device = "cuda", precision = "reference", weights = "random", seed = 1, mtp = true })
os.remove(folder .. "/config.json")
os.remove(folder)
local seq = model:session { max_len = context + 64 }
local prompt = {}
for i = 1, context do prompt[i] = (i * 7919) % 129280 end
model:forward(seq, prompt, { logits = "none" })
for i = 1, 3 do model:forward(seq, { i }, { logits = "last" }) end -- warm: every kernel loaded, caches stocked
dsrt.synchronize("cuda")
local n, t0 = 10, core.wall_time()
for i = 1, n do model:forward(seq, { 100 + i }, { logits = "last" }) end
dsrt.synchronize("cuda")
print(("profile_decode: decode step %.3f ms host-timed at context %d"):format((core.wall_time() - t0) / n * 1e3, context))
dsrt.cuda.profiler(true)
model:forward(seq, { 7 }, { logits = "last" })
dsrt.synchronize("cuda")
dsrt.cuda.profiler(false)
