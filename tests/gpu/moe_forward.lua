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
local function linear(format, rows, cols) return helpers.moe_linear(format, rows, cols, next_seed) end
local function swiglu(format, dim, inter)
  return { w1 = linear(format, inter, dim), w2 = linear(format, dim, inter), w3 = linear(format, inter, dim) }
end

local dim, n, k, vocab, checked = 512, 8, 3, 1000, 0
for _, case in ipairs({ { inter = 256, shared = 512, routing = "learned" },
                        { inter = 512, shared = 256, routing = "hash", f32_scales = true } }) do
  local experts = {}
  for e = 1, n do experts[e] = swiglu("fp4", dim, case.inter) end
  local gate = { weight = dsrt.randn({ n, dim }, { seed = next_seed(), std = 2 / math.sqrt(dim) }):to("bf16") }
  if case.routing == "hash" then
    gate.tid2eid = (dsrt.rand({ vocab, k }, { seed = next_seed(), high = n }) // 1):to("i32")
  else
    gate.bias = dsrt.randn({ n }, { seed = next_seed(), std = 0.05 })
  end
  local shared = swiglu("fp8", dim, case.shared)
  if case.f32_scales then for _, w in pairs(shared) do w.scale = w.scale:to("f32") end end
  local ffn = helpers.to_cuda({ gate = gate, experts = experts, shared_experts = shared })
  local dims = { n_routed_experts = n, n_activated_experts = k, score_func = "sqrtsoftplus", route_scale = 1.5,
                 swiglu_limit = 10 }
  local moe = dsrt.moe(dims, ffn, { dsrt.stream("cuda"), dsrt.stream("cuda"), dsrt.stream("cuda") })
  for _, rows in ipairs({ 1, 3, 9, 40 }) do
    local x = dsrt.randn({ rows, dim }, { seed = next_seed(), dtype = "bf16" }):to("cuda")
    local ids = case.routing == "hash" and (dsrt.rand({ rows }, { seed = next_seed(), high = vocab }) // 1):to("i64"):to("cuda") or nil
    local y = moe:forward(x, ids, "reference")
    dsrt.synchronize("cuda")
    local bad = y:ne(y):sum():item()
    if bad > 0 then error(("moe_forward: %d NaN outputs at %d tokens (%s)"):format(bad, rows, case.routing)) end
    checked = checked + rows
  end
end
print(("moe_forward: %d tokens through the MoE on %s, finite"):format(checked, dsrt.cuda.device_info().name))
