-- profile_decode.lua - decode steps of the Flash slice (scripts/flash_slice.lua: layers 0-3 + MTP,
-- reference precision, batch 1) after a prefill, inside dsrt.cuda.profiler, for a profiler started
-- with its collection off: tools/profile_decode.sh runs it under ncu (one step, kernels summed by
-- name) and tools/timeline.sh under tools/kernel_timeline.c (several steps as they really run).
--
--   build/dsrt scripts/profile_decode.lua [--context N] [--positions N] [--steps N] [--plain] [--generate]
--
-- Each profiled step is model:forward of `positions` tokens (default 1; more: every row's logits,
-- the forward of a speculative verify of positions - 1 drafts), then a wait for the GPU, as a
-- decoding loop that samples on the host runs them (bench_dsv4.lua times its steps so too).
-- --plain: a session made with mtp = false (plain decoding, no MTP ring fill), as the benchmark's
-- headline step; otherwise the session drafts and each step fills the MTP ring. --generate (with
-- --plain): the steps as generate{}'s pipelined loop runs them, each with its greedy draw
-- (dsrt.sample_async) feeding the next, issued before the token is read, waited for only at the
-- end: tools/timeline.sh then shows them as one step.
package.path = "lua/?.lua;lua/?/init.lua;./?.lua;" .. package.path
local dsrt = require "dsrt"
local dsv4 = require "dsrt.dsv4"
local core = require "dsrt.core"

local opts = dofile("scripts/bench_options.lua")("profile_decode", arg,
  { context = "int", positions = "int", steps = "int", plain = "flag", generate = "flag" },
  { context = 4096, positions = 1, steps = 1 })
if opts.generate and (opts.positions ~= 1 or not opts.plain) then
  error("profile_decode: --generate takes --plain and one position (generation's pipelined loop)", 0)
end
if not opts.context or opts.context < 1 then error("profile_decode: --context must be a positive integer", 0) end
if not opts.positions or opts.positions < 1 or opts.positions > 32 then error("profile_decode: --positions must be 1..32", 0) end
if not opts.steps or opts.steps < 1 then error("profile_decode: --steps must be a positive integer", 0) end
local folder = dofile("scripts/flash_slice.lua")()
local model = dsv4.load(folder, { device = "cuda", precision = "reference", weights = "random", seed = 1, mtp = true })
os.remove(folder .. "/config.json")
os.remove(folder)
local seq = model:session { max_len = opts.context + 64 + opts.positions * (opts.steps + 1), mtp = not opts.plain }
local prompt = {}
for i = 1, opts.context do prompt[i] = (i * 7919) % 129280 end
model:forward(seq, prompt, { logits = "none" })
for i = 1, 3 do model:forward(seq, { i }, { logits = "last" }) end -- warm: every kernel loaded, caches stocked
dsrt.synchronize("cuda")
local n, t0 = 10, core.wall_time()
for i = 1, n do model:forward(seq, { 100 + i }, { logits = "last" }) end
dsrt.synchronize("cuda")
print(("profile_decode: decode step %.3f ms host-timed at context %d"):format((core.wall_time() - t0) / n * 1e3, opts.context))
local logits = opts.positions == 1 and "last" or "all"
local function ids_of(step)
  local ids = {}
  for i = 1, opts.positions do ids[i] = 7 + 1000 * (i - 1) + step end
  return ids
end
model:forward(seq, ids_of(0), { logits = logits }) -- warm at this width
dsrt.synchronize("cuda")
dsrt.cuda.profiler(true)
if opts.generate then
  -- the pipelined loop: the greedy draw's device ids are the next step's input, and the host reads
  -- a step's token after issuing the next step; one synchronize at the end
  local ids, pending = dsrt.sample_async(model:forward(seq, ids_of(0), { logits = "last" }), {})
  for _ = 1, opts.steps do
    local next_ids, next_pending = dsrt.sample_async(model:forward(seq, ids, { logits = "last" }), {})
    pending:wait()
    ids, pending = next_ids, next_pending
  end
  pending:wait()
  dsrt.synchronize("cuda")
else
  for step = 1, opts.steps do
    model:forward(seq, ids_of(step), { logits = logits })
    dsrt.synchronize("cuda")
  end
end
dsrt.cuda.profiler(false)
