-- model_forward.lua — one full forward of the tiny DeepSeek-V4 model on CUDA, for compute-sanitizer:
--
--   compute-sanitizer --tool memcheck --error-exitcode 1 build/dsrt tests/gpu/model_forward.lua TINY_DIR
--
-- A Lua test cannot run the sanitizer on itself, so `make test-gpu` (target memcheck-gpu) runs this
-- script under it: a prefill of 200 tokens (past the window of 128, a ratio-128 compression and the
-- indexer's top-k), two decode steps and an MTP draft, in both precisions, then a synchronisation, so
-- every kernel of the model has run once under memcheck; then a short pipelined generation, greedy
-- and sampled. It prints one line; errors exit non-zero.
-- Not named test_*.lua: tests/run.lua does not pick it up.
local dsrt = require "dsrt"
local dsv4 = require "dsrt.dsv4"

local dir = assert(arg[1], "usage: dsrt tests/gpu/model_forward.lua TINY_MODEL_DIR")
if not dsrt.cuda.available() then
  io.stderr:write("model_forward: no CUDA device\n")
  os.exit(1)
end

local ids, x = {}, 17
for i = 1, 200 do
  x = (x * 1103515245 + 12345) % 2147483648
  ids[i] = x % 129280
end

local checked = 0
for _, precision in ipairs({ "reference", "fp32" }) do
  local model = dsv4.load(dir, { device = "cuda", precision = precision, mtp = precision == "reference" })
  local seq = model:session{ max_len = 256 }
  local outs = { model:forward(seq, ids), model:forward(seq, { 3 }), model:forward(seq, { 4 }) }
  if model.mtp then outs[#outs + 1] = model:draft(seq, 5) end
  dsrt.synchronize("cuda")
  for _, logits in ipairs(outs) do
    local bad = logits:ne(logits):sum():item()
    if bad > 0 then error(("model_forward (%s): %d NaN logits"):format(precision, bad)) end
    checked = checked + logits.shape[1]
  end
end
-- generation's pipelined loop (dsrt.sample_async: kernels that read the row parameters from pinned
-- host memory and write the ids there too), greedy and sampled
local model = dsv4.load(dir, { device = "cuda", precision = "reference", mtp = false })
local generated = 0
for _, temperature in ipairs({ 0, 0.8 }) do
  generated = generated + #model:generate{ ids = { table.unpack(ids, 1, 20) }, max_tokens = 4, temperature = temperature }.ids
end
print(("model_forward: %d positions of logits on %s, finite; %d tokens generated"):format(checked,
  dsrt.cuda.device_info().name, generated))
