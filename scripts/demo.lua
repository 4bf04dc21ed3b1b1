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

-- The default tiny model (make demo writes it with scripts/make_tiny_model.lua): a random DSV4
-- checkpoint in the official format, bound to per-layer weight sets in their native formats.
local model_dir = arg[1] or "build/tiny"
local config = require "dsrt.dsv4.config"
local memory = require "dsrt.dsv4.memory"
local weights = require "dsrt.dsv4.weights"
local cfg, w = weights.load(model_dir, {device = device})
local kinds = {}
for _, layer in ipairs(cfg.layers) do kinds[#kinds + 1] = layer.kind .. "/" .. layer.router end
print(("\n%s: %d layers (%s) + %d MTP, dim %d, %d experts"):format(model_dir, #cfg.layers,
  table.concat(kinds, " "), #cfg.mtp, cfg.dims.dim, cfg.dims.n_routed_experts))
local wq = w.layers[1].attn.wq_a
print(("layers.0.attn.wq_a: %s %s + %s scales; experts: %s"):format(wq.format, wq.weight.dtype, wq.scale.dtype,
  w.layers[1].ffn.experts[1].w1.weight.dtype))
local flash = config.load("tests/fixtures/config/flash_published.json")
local e = memory.estimate(flash, {context = 65536, layout = "native"})
print(("DeepSeek-V4-Flash: %s of weights, %s of KV per 64K-token sequence, %s read per decoded token"):format(
  memory.format(e.weight_bytes), memory.format(e.kv_bytes), memory.format(memory.decode_weight_bytes(flash))))

-- The model itself: a greedy continuation of a few token ids (text in and out arrives with the
-- tokenizer and sampling; see `issues`).
local dsv4 = require "dsrt.dsv4"
local model = dsv4.load(model_dir, {device = device, precision = "reference"})
local seq = model:session{max_len = 256}
local ids, next_ids = {0, 3923, 374, 264, 1296}, {}
local logits = model:forward(seq, ids)
for _ = 1, 8 do
  local id = logits[logits.shape[1]]:argmax():item()
  next_ids[#next_ids + 1] = id
  logits = model:forward(seq, {id})
end
print(("greedy continuation of %s: %s (random weights: the ids mean nothing)"):format(
  table.concat(ids, " "), table.concat(next_ids, " ")))
