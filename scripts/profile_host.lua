-- profile_host.lua - decode steps of the Flash slice (scripts/flash_slice.lua: layers 0-3 + MTP,
-- reference precision, context 4096, batch 1, plain decoding) with tools/host_sampler.c's sampling
-- switched on around them, as a generation loop runs them (each step's logits closed; the greedy
-- sample left out, so the step's own host work is what shows); tools/host_profile.sh runs it.
--
--   build/dsrt scripts/profile_host.lua [steps] [context]
package.path = "lua/?.lua;lua/?/init.lua;./?.lua;" .. package.path
local dsrt = require "dsrt"
local dsv4 = require "dsrt.dsv4"
local core = require "dsrt.core"

local steps, context = tonumber(arg and arg[1]) or 100, tonumber(arg and arg[2]) or 4096
local folder = dofile("scripts/flash_slice.lua")()
local model = dsv4.load(folder, { device = "cuda", precision = "reference", weights = "random", seed = 1, mtp = true })
os.remove(folder .. "/config.json")
os.remove(folder)
local seq = model:session { max_len = context + steps + 64, mtp = false }
local prompt = {}
for i = 1, context do prompt[i] = (i * 7919) % 129280 end
model:forward(seq, prompt, { logits = "none" })
for i = 1, 20 do model:forward(seq, { i }, { logits = "last" }):close() end -- warm: kernels loaded, caches stocked
dsrt.synchronize("cuda")
os.execute("kill -USR1 $PPID") -- the sampler's start (the shell's parent is this process)
local t0 = core.wall_time()
for i = 1, steps do model:forward(seq, { 100 + i }, { logits = "last" }):close() end
dsrt.synchronize("cuda")
local took = core.wall_time() - t0
os.execute("kill -USR2 $PPID")
print(("profile_host: %d decode steps, %.3f ms a step (sampled) at context %d"):format(steps, took / steps * 1e3, context))
