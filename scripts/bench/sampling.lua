-- scripts/bench/sampling.lua - the CUDA sampler (kernels/sampling.cu) at the DSV4 vocabulary.
--
-- One call = what generation does per step: core.sample_ids on CUDA logits, ids back on the
-- host (the call waits for them). Rows: greedy (one read of the logits: memory-bound, so GB/s of
-- logits read is the figure to watch) and temperature 0.7 with top_p 0.9 (the radix sort of all
-- candidates and the in-order double sums, which the exact CPU agreement costs; the GB/s there
-- still counts only the logits read). The time includes the launch and the copy back of B ids.
local dsrt = require "dsrt"
local core = require "dsrt.core"

return function(ctx)
  local V = 129280
  for _, B in ipairs({ 1, 32 }) do
    local x = dsrt.randn({ B, V }, { device = ctx.dev, seed = 40 + B, std = 3 })
    local bytes = 4 * B * V
    local step = 0
    ctx.report(("sample greedy B=%d V=%d"):format(B, V), ctx.time_ms(function()
      return core.sample_ids(x, {})
    end), bytes)
    ctx.report(("sample greedy+penalties B=%d"):format(B), ctx.time_ms(function()
      return core.sample_ids(x, { repetition_penalty = 1.1, presence_penalty = 0.2, history = { 1, 5, 77, 1000, 4096 } })
    end), bytes)
    ctx.report(("sample T=0.7 top_p=0.9 B=%d"):format(B), ctx.time_ms(function()
      step = step + 1
      return core.sample_ids(x, { temperature = 0.7, top_p = 0.9, seed = 1, step = step })
    end), bytes)
    ctx.report(("sample T=0.7 top_k=50 B=%d"):format(B), ctx.time_ms(function()
      step = step + 1
      return core.sample_ids(x, { temperature = 0.7, top_k = 50, seed = 1, step = step })
    end), bytes)
  end
end
