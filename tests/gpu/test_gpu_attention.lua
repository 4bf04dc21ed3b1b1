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
--   - attention:advance (the MTP ring fill) leaves the bits of the state a forward leaves, with and
--     without aux streams (a forward of a layer with a compressor fans out, an advance never does);
--   - more than 4096 visible indexer entries (the top-k's radix-select path), fp32;
--   - random q_norm and kv_norm weights (the checkpoints' are 1), each kind, both precisions;
--   - Flash's 64 indexer heads (random indexer weights on the CSA layer), every warp of the
--     prefill's score kernel;
--   - errors: mixed devices, a state or input on the wrong device, a wrong aux stream list;
--   - the fused passes the layer runs (nn.norm_rope: the KV row's norm, RoPE and Q8, the query's
--     head norm and RoPE, a compressed entry's, the indexer's RoPE, Hadamard and Q4; nn.q_kv_norm:
--     q_norm in the KV row's launch; nn.sparse_attention_inverse_rope: the output's inverse RoPE
--     inside the attention kernels) give the bits of the separate CUDA ops they replace, on fresh
--     random inputs at odd sizes, in every launch shape, both precisions; misaligned and strided
--     inputs too.
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
local FLASH_YARN = { factor = 16, original_seq_len = 65536, beta_fast = 32, beta_slow = 1 }

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

test("advance_leaves_the_state_a_forward_leaves", function()
  for _, i in ipairs(KINDS) do
    for _, with_aux in ipairs({ false, true }) do
      local att = cuda_layer(i, with_aux)
      for _, precision in ipairs(PRECISIONS) do
        local by_forward, by_advance = state(att, precision, "cuda", 300, 0), state(att, precision, "cuda", 300, 0)
        local after = inputs(1, precision):to("cuda")
        for k, n in ipairs({ 141, 1, 2, 70, 1 }) do
          local x = inputs(n, precision):to("cuda")
          att:forward(by_forward, x)
          att:advance(by_advance, x)
          poison()
          local ya, yb = att:forward(by_forward, after), att:forward(by_advance, after)
          assert_equal(dsrt.max_abs_diff(ya:to("cpu"), yb:to("cpu")), 0,
                       string.format("layer %d %s%s step %d: advance left another state", i, precision,
                                     with_aux and " (aux streams)" or "", k))
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

test("indexer_with_flash_64_heads_matches_cpu", function()
  -- the tiny checkpoint's indexer has 8 heads; Flash's 64 fill every warp of the prefill score
  -- kernel (attention.cu score_dmma_kernel: 4 warps of 16 heads, FP64 tensor cores, the CPU's
  -- bits when the dots are exact). Random 64-head wq_b / weights_proj on the CSA layer; 600
  -- positions: 150 visible entries, 64 picked, then decode steps. fp32 holds the picks to the
  -- CPU's (a different pick moves the output far past 1e-4). Not reference precision: there the
  -- indexer's inputs pass Q8/FP4 rounding points after the GPU's reordered GEMMs, and with 64
  -- random heads near-tied picks flip often enough to move a random layer's output past 8%.
  local c, w = tiny()
  local dims = {}
  for k, v in pairs(c.dims) do dims[k] = v end
  dims.index_n_heads = 64
  local attn = {}
  for k, v in pairs(w.layers[CSA].attn) do attn[k] = v end
  attn.indexer = {
    wq_b = { format = "fp8", weight = dsrt.randn({ 64 * 128, c.dims.q_lora_rank }, { seed = 9650, std = 8 }):to("f8e4m3"),
             scale = (dsrt.zeros({ 64, 1 }) + 1 / 16):to("f8e8m0") },
    weights_proj = { format = "bf16", weight = dsrt.randn({ 64, c.dims.dim }, { seed = 9651, std = 0.1 }):to("bf16") },
    compressor = w.layers[CSA].attn.indexer.compressor,
  }
  local cl = dsrt.attention(c.layers[CSA], dims, attn, {})
  local gl = dsrt.attention(c.layers[CSA], dims, h.to_cuda(attn), {})
  do
    local precision = "fp32"
    local cs, gs = state(cl, precision, "cpu", 700), state(gl, precision, "cuda", 700)
    for k, step in ipairs({ 600, 1, 1 }) do
      local x = inputs(step, precision)
      poison()
      check_close(gl:forward(gs, x:to("cuda")), cl:forward(cs, x), precision,
                  string.format("64 indexer heads %s step %d (S %d)", precision, k, step))
    end
  end
end)

test("cuda_layer_with_random_norm_weights_matches_cpu", function()
  -- the checkpoints' norm weights are 1 (dsv4.random), where a norm that skipped its weight would
  -- pass (a fused decode norm did, once, in a build not kept): random q_norm and kv_norm in
  -- 0.5 .. 1.5, each kind of layer, prefill and decode, both precisions
  local c, w = tiny()
  for k, i in ipairs(KINDS) do
    local attn = {}
    for key, v in pairs(w.layers[i].attn) do attn[key] = v end
    for j, name in ipairs({ "q_norm", "kv_norm" }) do
      local n = attn[name]:numel()
      attn[name] = dsrt.rand({ n }, { seed = 9600 + 2 * k + j, low = 0.5, high = 1.5 }):to(attn[name].dtype)
    end
    local cl = dsrt.attention(c.layers[i], c.dims, attn, {})
    local gl = dsrt.attention(c.layers[i], c.dims, h.to_cuda(attn), {})
    for _, precision in ipairs(PRECISIONS) do
      local cs, gs = state(cl, precision, "cpu", 300), state(gl, precision, "cuda", 300)
      for step_no, step in ipairs({ 140, 1, 1, 3 }) do
        local x = inputs(step, precision)
        poison()
        check_close(gl:forward(gs, x:to("cuda")), cl:forward(cs, x), precision,
                    string.format("layer %d random norms %s step %d (S %d)", i, precision, step_no, step))
      end
    end
  end
end)

-- ---- the layer's fused passes against the separate ops they replace, bit for bit ----

local fused_seed = 9700
local function fused_randn(shape, dtype, std)
  fused_seed = fused_seed + 1
  return dsrt.randn(shape, { seed = fused_seed, dtype = dtype or "f32", std = std })
end

-- positions first, first + step, ... for S rows on the GPU, as nn.rope takes them
local function positions(S, first, step) return h.progression(S, first, step, "cuda") end

-- equal values (as the CUDA results' f32 widening shows them), no NaN in the fused result
local function check_bits(got, want, what)
  assert(got.device:match("^cuda"), what .. ": the fused result is not a CUDA tensor")
  assert_equal(got.dtype, want.dtype, what .. ": dtype")
  assert_equal(got.shape, want.shape, what .. ": shape")
  local g, w = got:to("cpu"):to("f32"), want:to("cpu"):to("f32")
  local nan = g:ne(g):sum():item()
  if nan > 0 then error(string.format("%s: %d NaN in the fused result", what, nan), 2) end
  local differ = g:ne(w):sum():item()
  if differ > 0 then
    local d = (g - w):abs():view(-1)
    local i = d:argmax(1):item() + 1
    error(string.format("%s: %d of %d elements differ; element %d is %.9g fused, %.9g by the separate ops", what, differ,
                        w:numel(), i, g:view(-1)[i]:item(), w:view(-1)[i]:item()), 2)
  end
end

local norm_rope_by_steps = h.norm_rope_by_steps

-- values that reach the kernels' corners: a zero row (1/rms of eps alone), a row with one huge and
-- one tiny element (squares over ~20 binades: the double sum's order matters), exact zeros
local function norm_rope_input(shape, dtype)
  local x = fused_randn(shape, "f32", 3)
  local w = shape[#shape]
  local rows = x:view(-1, w)
  if rows:size(1) > 1 then rows:narrow(1, 2, 1):fill(0) end
  local flat = x:view(-1)
  flat[1], flat[2], flat[3] = 3000, 1e-4, 0
  return x:to(dtype)
end

local FUSED_ROPES = { -- theta, yarn, first, step: decode-like, a compressor's j·r (YaRN), far positions
  { 10000, nil, 0, 1 }, { 160000, FLASH_YARN, 260, 4 }, { 10000, nil, 1000003, 1 }, { 160000, FLASH_YARN, 65408, 128 },
}

test("norm_rope_gives_the_bits_of_the_separate_ops", function()
  -- the layer's rows ([1, 512] decode KV, [S, H, 512] queries, [n, 512 | 128] entries, [S, IH, 128]
  -- indexer queries) and odd ones: short last Q8 blocks (200, 1000), no Q8 column (64), 2 and 4
  -- vectors a lane (1000), warps past the last row (rows not a multiple of 8)
  local shapes = { { 1, 512 }, { 1, 7, 512 }, { 3, 64, 512 }, { 37, 512 }, { 5, 3, 128 }, { 9, 128 }, { 4, 200 },
                   { 3, 1000 }, { 2, 64 }, { 6, 3, 72 } }
  local norms = { { "rms", "bf16" }, { "rms", "f32" }, { "rms", nil }, { "head", nil }, { "none", nil } }
  local k = 0
  for _, shape in ipairs(shapes) do
    local w = shape[#shape]
    local posts = w == 128 and { "none", "q8", "hadamard_q4" } or { "none", "q8" }
    for _, dt in ipairs({ "bf16", "f32" }) do
      local x = norm_rope_input(shape, dt):to("cuda")
      for _, nm in ipairs(norms) do
        local weight = nm[2] and fused_randn({ w }, nm[2]):to("cuda") or nil
        for _, post in ipairs(posts) do
          for _, prec in ipairs(PRECISIONS) do
            k = k + 1
            local rope = FUSED_ROPES[k % #FUSED_ROPES + 1]
            local theta, yarn, first, step = rope[1], rope[2], rope[3], rope[4]
            local want = norm_rope_by_steps(x, weight, nm[1], 1e-6, first, step, theta, yarn, post, prec)
            h.poison_cuda_cache(x:numel() * 4)
            local got = nn.norm_rope(x, weight, nm[1], 1e-6, first, step, theta, yarn, post, prec)
            local what = string.format("norm_rope %s %s %s w %s %s %s pos %d+%d", table.concat(shape, "x"), dt, nm[1],
                                       tostring(nm[2]), post, prec, first, step)
            check_bits(got, want, what)
            if prec == "reference" then -- stored as bf16 by the kernel itself: the same values
              h.poison_cuda_cache(x:numel() * 4)
              local got16 = nn.norm_rope(x, weight, nm[1], 1e-6, first, step, theta, yarn, post, prec, "bf16")
              assert_equal(got16.dtype, "bf16", what)
              check_bits(got16:to("f32"), want, what .. " as bf16")
            end
          end
        end
      end
    end
  end
end)

test("norm_rope_prefill_queries_eight_rows_a_warp", function()
  -- a prefill's [S, 64, 512] queries (S·heads >= 65536): a warp takes 8 heads of a position and
  -- their cos and sin once; S odd, so the last block has warps past the last row
  local shape = { 1027, 64, 512 }
  for _, dt in ipairs({ "bf16", "f32" }) do
    local x = norm_rope_input(shape, dt):to("cuda")
    for _, nm in ipairs({ { "head", nil }, { "rms", "bf16" } }) do
      local weight = nm[2] and fused_randn({ 512 }, nm[2]):to("cuda") or nil
      for _, post in ipairs({ "none", "q8" }) do
        for k, prec in ipairs(PRECISIONS) do
          local rope = FUSED_ROPES[k + 1]
          local theta, yarn, first, step = rope[1], rope[2], rope[3], rope[4]
          local want = norm_rope_by_steps(x, weight, nm[1], 1e-6, first, step, theta, yarn, post, prec)
          h.poison_cuda_cache(x:numel() * 4)
          local got = nn.norm_rope(x, weight, nm[1], 1e-6, first, step, theta, yarn, post, prec)
          check_bits(got, want, string.format("norm_rope prefill %s %s %s %s", dt, nm[1], post, prec))
        end
      end
    end
  end
  -- the indexer's queries [S, 64, 128]: Hadamard + Q4 (fp4_round_trip against quant.h's codec)
  local xi = norm_rope_input({ 1025, 64, 128 }, "bf16"):to("cuda")
  for k, prec in ipairs(PRECISIONS) do
    local want = norm_rope_by_steps(xi, nil, "none", 1e-6, 7, 1, 10000, nil, "hadamard_q4", prec)
    h.poison_cuda_cache(xi:numel() * 4)
    check_bits(nn.norm_rope(xi, nil, "none", 1e-6, 7, 1, 10000, nil, "hadamard_q4", prec), want,
               "norm_rope prefill indexer queries " .. prec)
  end
end)

test("norm_rope_from_misaligned_and_strided_inputs", function()
  -- a strided x is made dense (the fused kernel), a misaligned one goes through the separate ops:
  -- the bits of the separate ops on the aligned x either way
  for _, prec in ipairs(PRECISIONS) do
    for _, c in ipairs({ { { 5, 512 }, "rms", "q8" }, { { 7, 128 }, "none", "hadamard_q4" }, { { 3, 200 }, "head", "none" } }) do
      local shape, norm, post = c[1], c[2], c[3]
      local x = norm_rope_input(shape, "bf16")
      local want = norm_rope_by_steps(x:to("cuda"), nil, norm, 1e-6, 11, 1, 10000, nil, post, prec)
      local flat = dsrt.zeros({ x:numel() + 1 }, { dtype = "bf16" }):to("cuda")
      local offset = flat:narrow(1, 2, x:numel()):view(table.unpack(shape))
      offset:copy(x:to("cuda"))
      local strided = x:transpose(1, 2):contiguous():to("cuda"):transpose(1, 2)
      h.poison_cuda_cache(x:numel() * 4)
      check_bits(nn.norm_rope(offset, nil, norm, 1e-6, 11, 1, 10000, nil, post, prec), want, "norm_rope misaligned " .. prec)
      h.poison_cuda_cache(x:numel() * 4)
      check_bits(nn.norm_rope(strided, nil, norm, 1e-6, 11, 1, 10000, nil, post, prec), want, "norm_rope strided " .. prec)
    end
  end
end)

test("q_kv_norm_gives_the_bits_of_the_two_norms", function()
  -- qa rows of 1024 (Flash's q_lora_rank: 4 vectors a lane), 200, 64 in the KV row's launch, with
  -- other row counts than kv's; 1536 (too wide for a warp) and misaligned data through the two ops
  local cases = { -- qa shape, kv shape, q weight dtype, kv weight dtype, post
    { { 1, 1024 }, { 1, 512 }, "bf16", "bf16", "q8" }, { { 37, 1024 }, { 37, 512 }, "f32", nil, "q8" },
    { { 5, 200 }, { 3, 2, 128 }, nil, "f32", "hadamard_q4" }, { { 9, 64 }, { 1, 512 }, "bf16", "bf16", "none" },
    { { 2, 1536 }, { 2, 512 }, "bf16", "bf16", "q8" },
  }
  for k, c in ipairs(cases) do
    local qshape, kshape, qwd, kwd, post = c[1], c[2], c[3], c[4], c[5]
    for _, dt in ipairs({ "bf16", "f32" }) do
      local qa, kv = norm_rope_input(qshape, dt):to("cuda"), norm_rope_input(kshape, dt):to("cuda")
      local qw = qwd and fused_randn({ qshape[#qshape] }, qwd):to("cuda") or nil
      local kw = kwd and fused_randn({ kshape[#kshape] }, kwd):to("cuda") or nil
      for j, prec in ipairs(PRECISIONS) do
        local rope = FUSED_ROPES[(k + j) % #FUSED_ROPES + 1]
        local theta, yarn, first, step = rope[1], rope[2], rope[3], rope[4]
        local want_q = nn.rms_norm(qa, qw, 1e-6, prec)
        local want_kv = norm_rope_by_steps(kv, kw, "rms", 1e-6, first, step, theta, yarn, post, prec)
        h.poison_cuda_cache({ qa:numel() * 4, kv:numel() * 4 })
        local qr, got_kv = nn.q_kv_norm(qa, qw, kv, kw, 1e-6, first, step, theta, yarn, post, prec)
        local what = string.format("q_kv_norm qa %s kv %s %s %s", table.concat(qshape, "x"), table.concat(kshape, "x"), dt, prec)
        check_bits(qr, want_q, what .. ": qr")
        check_bits(got_kv, want_kv, what .. ": kv")
      end
    end
  end
  -- a misaligned qa
  local qa, kv = norm_rope_input({ 3, 1024 }, "bf16"), norm_rope_input({ 3, 512 }, "bf16"):to("cuda")
  local flat = dsrt.zeros({ qa:numel() + 1 }, { dtype = "bf16" }):to("cuda")
  local offset = flat:narrow(1, 2, qa:numel()):view(3, 1024)
  offset:copy(qa:to("cuda"))
  for _, prec in ipairs(PRECISIONS) do
    local qr, got_kv = nn.q_kv_norm(offset, nil, kv, nil, 1e-6, 4, 1, 10000, nil, "q8", prec)
    check_bits(qr, nn.rms_norm(qa:to("cuda"), nil, 1e-6, prec), "q_kv_norm misaligned qa " .. prec)
    check_bits(got_kv, norm_rope_by_steps(kv, nil, "rms", 1e-6, 4, 1, 10000, nil, "q8", prec), "q_kv_norm misaligned kv " .. prec)
  end
end)

-- indices [S, K] into N rows: random rows, ~1 in 6 unused, row 2 all unused (zeros out)
local function attention_indices(S, K, N)
  local u = fused_randn({ S, K }):totable()
  local rows = {}
  for t = 1, S do
    local r = {}
    for j = 1, K do
      local p = 0.5 * (1 + math.tanh(u[t][j])) -- in (0, 1)
      r[j] = (p < 1 / 6 or (S > 1 and t == 2)) and -1 or math.min(N - 1, math.floor((p - 1 / 6) / (5 / 6) * N))
    end
    rows[t] = r
  end
  return dsrt.tensor(rows, { dtype = "i64" })
end

test("sparse_attention_inverse_rope_gives_the_bits_of_the_two_ops", function()
  -- each launch shape of kernels/sparse_attention.cu: split (few rows: decode), fused (K <= 64 or
  -- many rows x head groups), tensor cores (many rows, reference, bf16 q and pool, D % 64 == 0; at
  -- D = 512 and 64 heads the wgmma kernel, which derotates in warpgroup 1's registers); odd
  -- D = 65 and 97 put the rotated pairs at odd columns
  local cases = { -- S, H, D, K, q and pool dtype
    { 1, 64, 512, 640, "f32" }, { 1, 64, 512, 200, "bf16" }, { 3, 3, 96, 700, "f32" }, { 1, 5, 65, 130, "f32" },
    { 17, 64, 64, 65, "f32" }, { 5, 3, 97, 40, "bf16" }, { 140, 3, 97, 130, "f32" },
    { 140, 19, 128, 200, "bf16" }, { 140, 3, 512, 700, "bf16" }, { 140, 64, 512, 200, "bf16" },
  }
  for _, c in ipairs(cases) do
    local S, H, D, K, dt = c[1], c[2], c[3], c[4], c[5]
    local N = K + 37
    local q = fused_randn({ S, H, D }, dt):to("cuda")
    local pool = fused_randn({ N, D }, dt):to("cuda")
    local sink = fused_randn({ H }, "f32", 2):to("cuda")
    local idx = attention_indices(S, K, N):to("cuda")
    for k, prec in ipairs(PRECISIONS) do
      local rope = FUSED_ROPES[(S + k) % #FUSED_ROPES + 1]
      local theta, yarn, first, step = rope[1], rope[2], rope[3], rope[4]
      local scale = 1 / math.sqrt(D)
      local o = nn.sparse_attention(q, pool, idx, sink, scale, prec)
      local want = nn.rope(o, positions(S, first, step), theta, yarn, true, prec)
      h.poison_cuda_cache(S * H * D * 4)
      local got = nn.sparse_attention_inverse_rope(q, pool, idx, sink, scale, first, step, theta, yarn, prec)
      check_bits(got, want, string.format("sparse_attention_inverse_rope S=%d H=%d D=%d K=%d %s %s", S, H, D, K, dt, prec))
    end
  end
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

-- last: the inputs it draws would shift the seeds of the tests above
test("advance_skips_what_the_ring_drops_as_on_the_cpu", function()
  -- a window-only state steps over the positions its ring drops (a long prompt's MTP fill): a
  -- forward after it, and after a rollback into the ring's slack, equals one after every position
  local att = cuda_layer(KINDS[1], false)
  for _, precision in ipairs(PRECISIONS) do
    local whole, skipped = state(att, precision, "cuda", 300, 6), state(att, precision, "cuda", 300, 6)
    local x, after = inputs(200, precision):to("cuda"), inputs(2, precision):to("cuda")
    local skip = skipped:skippable(200)
    assert_equal(skip, 200 - (att.window + 6))
    att:advance(whole, x)
    att:advance(skipped, x:narrow(1, skip + 1, 200 - skip), nil, skip)
    for _, length in ipairs({ 200, 194 }) do
      whole:truncate(length)
      skipped:truncate(length)
      poison()
      local ya, yb = att:forward(whole, after), att:forward(skipped, after)
      assert_equal(dsrt.max_abs_diff(ya:to("cpu"), yb:to("cpu")), 0, string.format("%s at %d", precision, length))
      whole:truncate(length)
      skipped:truncate(length)
    end
  end
end)

return tests
