-- test_gpu_attention.lua — the DSV4 attention layer on CUDA (runtime/attention.c's CUDA path,
-- kernels/attention.cu) against the same layer on the CPU, on the tiny checkpoint's three kinds:
-- layer 1 window only, layer 2 ratio 4 (overlapping compressor + lightning indexer, top-64),
-- layer 3 ratio 128 (SPEC §1.2, §6).
--   - a prefill of odd length crossing the window (128), the ratio-128 emission at position 127
--     and the top-k boundary (64 of > 64 visible entries from 256 tokens), decode steps, a
--     truncation by <= slack and more steps: every output of the CUDA layer against the CPU's, in
--     both precisions (fp32: relative error <= 1e-4; reference: <= 5e-2 and every element within
--     8% of the output's largest magnitude, so near-tied indexer picks may differ, nothing more);
--   - chunked prefill against one-shot on the GPU (cuBLAS may pick another kernel for another row
--     count, so within fp32 / bf16 rounding rather than bit-equal as on the CPU);
--   - a layer with 3 aux streams and one with none over the same weights give bit-equal outputs
--     (SPEC §10: only the streams differ, never the arithmetic);
--   - more than 4096 visible indexer entries (the top-k's radix-select path), fp32;
--   - errors: mixed devices, a state or input on the wrong device, a wrong aux stream list.
-- Outputs come from a cache stocked with NaN blocks (poison), so an element a kernel forgot to
-- write fails; NaN never passes (rel_error is NaN then).
--
-- Run on the GPU machine: build/dsrt tests/run.lua tests/gpu/test_gpu_attention.lua
local dsrt = require "dsrt"
local weights = require "dsrt.dsv4.weights"
local h = require "tests.helpers"
local nn = dsrt.nn
local assert_error, assert_equal = h.assert_error, h.assert_equal

local tests, test = h.suite{ gpu = true }

local WINDOW, CSA, HCA = 1, 2, 3 -- tiny layer indices (1-based) of each kind
local KINDS = { WINDOW, CSA, HCA }
local PRECISIONS = { "fp32", "reference" }

local folder, cfg, w_cpu, w_cuda
local function tiny()
  if not w_cuda then
    folder = h.make_tiny_model(11)
    cfg, w_cpu = weights.load(folder)
    local _, wc = weights.load(folder, { device = "cuda" })
    w_cuda = wc
  end
  return cfg, w_cpu, w_cuda
end

local aux_streams
local function aux()
  aux_streams = aux_streams or { dsrt.stream("cuda"), dsrt.stream("cuda"), dsrt.stream("cuda") }
  return aux_streams
end

local cpu_layers, cuda_layers, cuda_aux_layers = {}, {}, {}
local function cpu_layer(i)
  local c, w = tiny()
  cpu_layers[i] = cpu_layers[i] or dsrt.attention(c.layers[i], c.dims, w.layers[i].attn, {})
  return cpu_layers[i]
end
local function cuda_layer(i, with_aux)
  local c, _, w = tiny()
  local cache = with_aux and cuda_aux_layers or cuda_layers
  cache[i] = cache[i] or dsrt.attention(c.layers[i], c.dims, w.layers[i].attn, with_aux and aux() or {})
  return cache[i]
end

local function state(att, precision, device, max_len, slack)
  return dsrt.attn_state(att, { max_len = max_len or 400, slack = slack or 0, precision = precision, device = device })
end

-- S normed rows on the CPU, as the block gives the layer: bf16 or f32 by precision
local seed = 9100
local function inputs(S, precision)
  seed = seed + 1
  local c = tiny()
  return nn.rms_norm(dsrt.randn({ S, c.dims.dim }, { seed = seed }), nil, c.dims.norm_eps, precision)
end

-- stocks the CUDA cache with freed blocks of NaN in the size classes the layer allocates from
local function poison() h.poison_cuda_cache({ 1 << 12, 1 << 16, 1 << 20, 1 << 22 }) end

local function check_close(got, want, precision, what)
  assert(got.device:match("^cuda"), what .. ": the result is not a CUDA tensor")
  assert_equal(got.dtype, want.dtype, what .. ": dtype")
  got = got:to("cpu"):to("f32")
  want = want:to("f32")
  local err = dsrt.rel_error(got, want)
  if precision == "fp32" then
    assert(err <= 1e-4, string.format("%s: relative error %g", what, err))
  else
    -- a single layer in reference precision passes the GPU's fp32 rounding differences through
    -- bf16 outputs and the KV latent's Q8 (an e4m3 step is 1/8 relative), so flips at those
    -- rounding points move a random-weight layer by a few percent; the model-level test holds
    -- the issue's 2e-2 on the logits (test_gpu_model.lua) and fp32 above holds the arithmetic
    assert(err <= 5e-2, string.format("%s: relative error %g", what, err))
    local worst, scale = dsrt.max_abs_diff(got, want), want:abs():max():item()
    assert(worst <= 0.08 * scale, string.format("%s: worst element off by %g (largest %g)", what, worst, scale))
  end
end

-- the same steps through a CPU state and a CUDA state: a list of chunk sizes, with
-- {truncate = n} entries rolling both back to length n
local function compare_steps(i, precision, steps, max_len, slack, with_aux)
  local cl, gl = cpu_layer(i), cuda_layer(i, with_aux)
  local cs, gs = state(cl, precision, "cpu", max_len, slack), state(gl, precision, "cuda", max_len, slack)
  for k, step in ipairs(steps) do
    if type(step) == "table" then
      cs:truncate(step.truncate)
      gs:truncate(step.truncate)
    else
      local x = inputs(step, precision)
      poison()
      local want = cl:forward(cs, x)
      local got = gl:forward(gs, x:to("cuda"))
      check_close(got, want, precision, string.format("layer %d %s step %d (S %d, length %d)", i, precision, k, step, gs:length()))
    end
    assert_equal(gs:length(), cs:length())
  end
end

-- ---- tests ----

test("cuda_layer_matches_cpu_prefill_decode_truncate", function()
  -- 131: past the window and the ratio-128 emission at 127; 267 + steps: the indexer picks 64 of
  -- 66+ visible entries; truncation by 5 <= slack 6 re-emits compressed entries
  for _, i in ipairs(KINDS) do
    local n0 = i == CSA and 267 or 131
    for _, precision in ipairs(PRECISIONS) do
      compare_steps(i, precision, { n0, 1, 1, 1, 1, 1, { truncate = n0 }, 1, 3, 1, 9, { truncate = n0 + 10 }, 2 },
                    400, 6, false)
    end
  end
end)

test("cuda_layer_with_aux_streams_matches_cpu", function()
  for _, i in ipairs(KINDS) do
    compare_steps(i, "reference", { 133, 1, 1, 4 }, 300, 0, true)
  end
end)

test("chunked_prefill_matches_one_shot_on_cuda", function()
  local S, sizes = 170, { 1, 2, 130, 1, 5, 31 } -- 130 > window 128
  for _, i in ipairs(KINDS) do
    local att = cuda_layer(i, false)
    for _, precision in ipairs(PRECISIONS) do
      local x = inputs(S, precision):to("cuda")
      poison()
      local whole = att:forward(state(att, precision, "cuda"), x)
      local st = state(att, precision, "cuda")
      local chunked, pos = dsrt.zeros({ S, x:size(2) }), 1
      for _, n in ipairs(sizes) do
        chunked:narrow(1, pos, n):copy(att:forward(st, x:narrow(1, pos, n)):to("cpu"))
        pos = pos + n
      end
      assert_equal(st:length(), S)
      check_close(whole, chunked:to(whole.dtype), precision, string.format("layer %d %s chunked", i, precision))
    end
  end
end)

test("aux_streams_give_bit_equal_results", function()
  for _, i in ipairs(KINDS) do
    local plain, fanned = cuda_layer(i, false), cuda_layer(i, true)
    for _, precision in ipairs(PRECISIONS) do
      local a, b = state(plain, precision, "cuda", 300, 4), state(fanned, precision, "cuda", 300, 4)
      for k, n in ipairs({ 141, 1, 1, 2, 1, 7 }) do
        local x = inputs(n, precision):to("cuda")
        poison()
        local ya, yb = plain:forward(a, x), fanned:forward(b, x)
        assert_equal(dsrt.max_abs_diff(ya:to("cpu"), yb:to("cpu")), 0,
                     string.format("layer %d %s step %d: aux streams change the result", i, precision, k))
        if k == 3 then
          a:truncate(a:length() - 2)
          b:truncate(b:length() - 2)
        end
      end
    end
  end
end)

test("indexer_top_k_beyond_shared_memory_matches_cpu", function()
  -- 16400 positions: 4100 visible entries, more than the 4096 the shared-memory sort holds, so
  -- the top-k takes its radix-select path (then three decode steps on it)
  compare_steps(CSA, "fp32", { 16400, 1, 1, 1 }, 16500, 0, false)
end)

test("errors_name_the_problem", function()
  local c, wc, wg = tiny()
  local att = cuda_layer(HCA, false)
  assert_error(function() state(att, "fp32", "cpu") end, "a state on cpu for a layer whose weights are on cuda:0")
  assert_error(function() state(cpu_layer(HCA), "fp32", "cuda") end, "a state on cuda:0 for a layer whose weights are on cpu")
  local st = state(att, "fp32", "cuda", 50, 2)
  assert_error(function() att:forward(st, inputs(3, "fp32")) end, "must be on one device")
  assert_error(function() cpu_layer(HCA):forward(st, inputs(3, "fp32")) end, "the state was made for another attention layer")
  att:forward(st, inputs(10, "fp32"):to("cuda"))
  assert_error(function() att:forward(st, inputs(41, "fp32"):to("cuda")) end, "41 new positions after 10 exceed the state's max_len 50")
  assert_error(function() st:truncate(7) end, "cannot truncate from 10 to 7 positions")
  assert_equal(st:length(), 10)
  -- mixed devices in the weights
  local mixed = {}
  for k, v in pairs(wg.layers[HCA].attn) do mixed[k] = v end
  mixed.wkv = wc.layers[HCA].attn.wkv
  assert_error(function() dsrt.attention(c.layers[HCA], c.dims, mixed, {}) end, "wkv is on cpu, the layer's weights %(wq_a%) on cuda:0")
  mixed.wkv, mixed.attn_sink = wg.layers[HCA].attn.wkv, wc.layers[HCA].attn.attn_sink
  assert_error(function() dsrt.attention(c.layers[HCA], c.dims, mixed, {}) end, "attn_sink .* on cuda:0")
  -- aux stream lists
  assert_error(function() dsrt.attention(c.layers[HCA], c.dims, wg.layers[HCA].attn, { dsrt.stream("cuda") }) end,
               "a CUDA layer takes 3 aux streams %(or none%), got 1")
  assert_error(function()
    dsrt.attention(c.layers[HCA], c.dims, wg.layers[HCA].attn, { dsrt.stream("cpu"), dsrt.stream("cuda"), dsrt.stream("cuda") })
  end, "aux stream 1 is missing or not on cuda:0")
end)

return tests
