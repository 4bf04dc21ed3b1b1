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

-- The model itself: a streamed generation from a chat prompt (random weights: the text is noise,
-- but every step - tokenizer, chat format, forward pass, sampler, streaming decoder - is real).
local dsv4 = require "dsrt.dsv4"
local model = dsv4.load(model_dir, {device = device, precision = "reference"})
local prompt = dsv4.chat.encode({{role = "user", content = "Hello! Who are you?"}})
io.write(("\nprompt %q\nreply: "):format(prompt))
local result = model:generate{prompt = prompt, max_tokens = 16, temperature = 0.8, seed = 1,
                              on_token = function(text) io.write(text) io.flush() end}
print(("\n(%s after %d tokens; prompt %.0f tokens/s, decode %.1f tokens/s on %s)"):format(result.finish_reason,
  #result.ids, result.timings.prompt_tokens_per_s, result.timings.decode_tokens_per_s, device))
