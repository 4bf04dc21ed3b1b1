-- moe_forward.lua — MoE layers on CUDA at widths that take every decode kernel, for compute-sanitizer:
--
--   compute-sanitizer --tool memcheck --error-exitcode 1 build/dsrt tests/gpu/moe_forward.lua
--
-- The tiny model's widths (dim 128, experts of 128) keep its decode MoE on fp8mma.cuh's tile; here
-- widths of 512 and 256 take kernels/wgtile.cuh's warpgroup tile too (full and half-height tiles,
-- FP4 routed experts, the FP8 shared expert with e8m0 and f32 scales), at 1, 3 and 9 tokens (two
-- batches of staged rows), learned and hash routing, then a prefill of 40 tokens. `make test-gpu`
-- (target memcheck-gpu) runs it under memcheck, as model_forward.lua. It prints one line; errors
-- exit non-zero. Not named test_*.lua: tests/run.lua does not pick it up.
local dsrt = require "dsrt"
local helpers = require "tests.helpers"

if not dsrt.cuda.available() then
  io.stderr:write("moe_forward: no CUDA device\n")
  os.exit(1)
end

local seed = 300
local function next_seed() seed = seed + 1 return seed end

local dim, checked = 512, 0
for _, case in ipairs({ { inter = 256, shared = 512, routing = "learned" },
                        { inter = 512, shared = 256, routing = "hash", f32_scales = true } }) do
  local dims, ffn = helpers.moe_layer({ dim = dim, inter = case.inter, shared_inter = case.shared, n = 8, k = 3,
                                        routing = case.routing }, next_seed)
  if case.f32_scales then for _, w in pairs(ffn.shared_experts) do w.scale = w.scale:to("f32") end end
  ffn = helpers.to_cuda(ffn)
  local moe = dsrt.moe(dims, ffn, { dsrt.stream("cuda"), dsrt.stream("cuda"), dsrt.stream("cuda") })
  for _, rows in ipairs({ 1, 3, 9, 40 }) do
    local x = dsrt.randn({ rows, dim }, { seed = next_seed(), dtype = "bf16" }):to("cuda")
    local ids = case.routing == "hash" and (dsrt.rand({ rows }, { seed = next_seed(), high = 1000 }) // 1):to("i64"):to("cuda") or nil
    local y = moe:forward(x, ids, "reference")
    dsrt.synchronize("cuda")
    local bad = y:ne(y):sum():item()
    if bad > 0 then error(("moe_forward: %d NaN outputs at %d tokens (%s)"):format(bad, rows, case.routing)) end
    checked = checked + rows
  end
end
print(("moe_forward: %d tokens through the MoE on %s, finite"):format(checked, dsrt.cuda.device_info().name))
