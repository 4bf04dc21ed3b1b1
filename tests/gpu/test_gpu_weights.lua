-- test_gpu_weights.lua — DeepSeek-V4 weights on a GPU: the tiny checkpoint bound on cuda holds
-- exactly the bytes of the CPU binding; random weights drawn on cuda equal those drawn on the CPU
-- (dsrt's RNG and conversions are bit-identical on both); and the Flash-shaped slice the CUDA work
-- benchmarks (layers 0–3 — window, window, CSA, HCA; hash and learned routing — the MTP layer, the
-- real 129280 × 4096 embedding and head: ≈20 GB, as the whole 149 GB Flash does not fit one H200)
-- is generated on the device, finite, with the documented magnitudes, and timed.
--
-- Run on the GPU machine: build/dsrt tests/run.lua tests/gpu (part of make test-gpu).
local dsrt = require "dsrt"
local cjson = require "cjson"
local config = require "dsrt.dsv4.config"
local memory = require "dsrt.dsv4.memory"
local weights = require "dsrt.dsv4.weights"
local h = require "tests.helpers"
local assert_equal = h.assert_equal

local tests, test = h.suite{ gpu = true }

local read_file = h.read_file

-- The tiny checkpoint, made once for the tests that read it.
local tiny_folder
local function tiny()
  tiny_folder = tiny_folder or h.make_tiny_model(5)
  return tiny_folder
end

-- every byte of a (on any device) equals b's
local function assert_same_bytes(a, b, name)
  assert_equal({ a.dtype, a.shape }, { b.dtype, b.shape }, name)
  local differing = a:bitcast("u8"):to("cpu"):ne(b:bitcast("u8"):to("cpu")):sum():item()
  if differing ~= 0 then error(string.format("%s: %d bytes differ", name, differing), 2) end
end

-- Both weight sets hold the same tensors byte for byte, `on_gpu` all on cuda:0, and their
-- structures name the same formats.
local function assert_same_weights(on_gpu, on_cpu)
  assert_equal(on_gpu.device, "cuda:0")
  local count = 0
  for name, t in pairs(on_cpu.tensors) do
    local g = on_gpu.tensors[name]
    assert(g, name .. " is missing on the GPU")
    assert_equal(g.device, "cuda:0", name)
    assert_same_bytes(g, t, name)
    count = count + 1
  end
  for name in pairs(on_gpu.tensors) do assert(on_cpu.tensors[name], name .. " is only on the GPU") end
  for i, block in ipairs(on_cpu.layers) do
    assert_equal(on_gpu.layers[i].ffn.experts[1].w2.format, block.ffn.experts[1].w2.format)
    assert_equal(on_gpu.layers[i].attn.wq_b.weight.dtype, block.attn.wq_b.weight.dtype)
    assert_equal(on_gpu.layers[i].attn.wq_b.weight.device, "cuda:0")
  end
  return count
end

test("tiny_model_on_cuda_is_byte_exact_with_the_cpu_binding", function()
  local _, on_cpu = weights.load(tiny())
  local _, on_gpu = weights.load(tiny(), { device = "cuda", progress = false })
  local count = assert_same_weights(on_gpu, on_cpu)
  assert_equal(count, #dsrt.safetensors.open(tiny()))
  assert_equal(#on_gpu.mtp, 1)
  assert_equal(on_gpu.layers[1].ffn.gate.tid2eid.dtype, "i32")
  assert_equal(on_gpu.layers[2].ffn.experts[8].w1.weight.dtype, "fp4e2m1")
end)

test("random_weights_on_cuda_equal_random_weights_on_cpu", function()
  local cfg = config.load(tiny())
  local on_cpu = weights.random(cfg, { seed = 9 })
  local on_gpu = weights.random(cfg, { seed = 9, device = "cuda" })
  assert_same_weights(on_gpu, on_cpu)
  -- and both equal the file written from seed 5 only when the seed is 5
  local _, from_file = weights.load(tiny())
  assert_same_weights(weights.random(cfg, { seed = 5, device = "cuda" }), from_file)
end)

-- The Flash config cut to its first four layers (every layer kind) and its MTP layer.
local function flash_slice_config()
  local raw = cjson.decode(read_file("tests/fixtures/config/flash_published.json"))
  raw.num_hidden_layers = 4
  raw.compress_ratios = { 0, 0, 4, 128, 0 }
  return config.parse(raw, "flash slice")
end

local function rms_times_sqrt_in(lin)
  local d = weights.dequantise(lin)
  local value = math.sqrt((d * d):mean():item()) * math.sqrt(d.shape[2])
  d:close()
  return value
end

test("flash_slice_random_weights_on_one_gpu_are_finite_and_timed", function()
  local cfg = flash_slice_config()
  local expected_bytes = memory.estimate(cfg, { mtp = true }).weight_bytes
  collectgarbage()
  dsrt.synchronize("cuda")
  local before = dsrt.memory_stats("cuda").allocated
  local start, stop = dsrt.event("cuda", { timing = true }), dsrt.event("cuda", { timing = true })
  start:record()
  local w = weights.random(cfg, { seed = 1, device = "cuda" })
  stop:record()
  stop:synchronize()
  local seconds = start:elapsed(stop) / 1000
  collectgarbage()
  dsrt.synchronize("cuda")
  local held = dsrt.memory_stats("cuda").allocated - before
  -- what is held is the weights (tid2eid i32 instead of the file's i64), not leftover temporaries
  assert(math.abs(held - expected_bytes) < 0.01 * expected_bytes,
         string.format("%d bytes held on the GPU for %d bytes of weights", held, expected_bytes))

  -- finite everywhere: no NaN or infinity in any float tensor (e4m3 and e8m0 have NaN codes;
  -- the FP4 experts, held as i8, and tid2eid have none)
  local checked, floats = 0, 0
  for _, entry in ipairs(memory.tensors(cfg, true)) do
    if entry.dtype ~= "I8" and entry.dtype ~= "I64" then floats = floats + entry.count end
  end
  for name, t in pairs(w.tensors) do
    if t.dtype ~= "i8" and t.dtype ~= "i32" then
      local magnitude = t:abs():max():item()
      assert(magnitude == magnitude and magnitude < math.huge, name .. " is not finite")
      checked = checked + 1
    end
  end
  assert_equal(checked, floats)

  -- dequantised RMS ≈ 1/√in: large matrices average over many scale tiles of 2^E or 2^(E+1)
  local csa, mtp = w.layers[3], w.mtp[1]
  local linears = {
    wq_a = csa.attn.wq_a, wq_b = csa.attn.wq_b, wkv = csa.attn.wkv, wo_a = csa.attn.wo_a, wo_b = csa.attn.wo_b,
    indexer_wq_b = csa.attn.indexer.wq_b, shared_w2 = csa.ffn.shared_experts.w2, e_proj = mtp.e_proj,
    expert_0_w1 = csa.ffn.experts[1].w1, expert_255_w2 = csa.ffn.experts[256].w2, mtp_expert_w3 = mtp.ffn.experts[7].w3,
    compressor_wkv = csa.attn.compressor.wkv, weights_proj = csa.attn.indexer.weights_proj,
  }
  for name, lin in pairs(linears) do
    local value = rms_times_sqrt_in(lin)
    assert(value > 0.8 and value < 1.2, string.format("%s (%s): RMS·√in = %.3f", name, lin.format, value))
  end
  local ids = w.layers[1].ffn.gate.tid2eid
  assert(ids:min():item() >= 0 and ids:max():item() < 256)
  assert_equal(w.embed.shape, { 129280, 4096 })
  assert_equal(w.layers[4].ffn.experts[256].w2.weight.shape, { 4096, 2048 })

  print(string.format("  flash slice (4 layers + MTP): %.2f GB of random weights in %.2f s on %s (%.1f GB/s)",
                      expected_bytes / 1e9, seconds, dsrt.cuda.device_info().name, expected_bytes / 1e9 / seconds))
end)

return tests
