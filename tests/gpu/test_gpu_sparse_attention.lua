-- test_gpu_sparse_attention.lua — nn.sparse_attention on CUDA (kernels/sparse_attention.cu) against
-- its C implementation (runtime/nn.c attend()), on fresh random inputs.
--   - shapes: S in {1, 3, 17, 130, 140}, H in {1, 3, 19, 40, 64}, D in {5, 36, 64, 96, 128, 192, 512},
--     K in {1, 63, 64, 65, 130, 640, 700, 2100}: across the 64-entry blocks, the 8- and 32-head
--     groups, the 4-column slices of the score loop, rows of 16-byte multiples (cp.async) and not,
--     and the four launch shapes (few rows x groups: the cluster kernel where a CTA takes at most
--     two chunks of rows of 16-byte multiples (K up to 256: clusters of 5 to 8 CTAs, a CTA's two
--     chunks in two blocks, empty chunks, a bad index in one CTA), else the split path with its
--     workspace and its last-CTA combine, more than 32 blocks too; many rows in reference
--     precision with bf16 q and pool and D a multiple of 64: the tensor-core kernel, odd and even
--     n-tiles per warp, pool rows not 16-byte aligned; D = 512 and whole groups of 64 heads: the
--     wgmma kernel; many rows otherwise: the fused kernel);
--   - indices: -1 scattered (~1 in 6), a whole row of -1 (zeros out, exactly), a whole 64-entry
--     block of -1 inside a row (a skipped block), i32 and i64;
--   - both precisions, q / pool in bf16 and f32 (mixed too), sink in f32 and bf16;
--   - thresholds: fp32 rel_error <= 2e-5 (the GPU's dot products are fp32, the CPU's double);
--     reference rel_error <= 4e-3 and every element within 1/64 of the largest output (one bf16
--     rounding of the output, and a rare flip of one bf16-rounded p);
--   - a bad index value gives NaN (the CUDA path cannot raise without a synchronisation);
--   - errors: mixed devices, bad shapes and dtypes raise Lua errors naming the function.
-- Outputs come from a cache stocked with freed NaN blocks (poison); NaN never passes.
--
-- Run on the GPU machine: build/dsrt tests/run.lua tests/gpu/test_gpu_sparse_attention.lua
local dsrt = require "dsrt"
local h = require "tests.helpers"
local nn = dsrt.nn
local assert_error, assert_equal = h.assert_error, h.assert_equal

local tests, test = h.suite{ gpu = true }

local seed = 13100
local function next_seed() seed = seed + 1 return seed end

-- stocks the CUDA cache with freed blocks of 0xff bytes (NaN) in the classes outputs come from
local function poison(bytes) h.poison_cuda_cache({ 1 << 12, 1 << 16, 1 << 20, bytes }) end

-- indices [S, K] into a pool of N rows: random rows, -1 scattered, row 2 all -1 (when S > 1), and
-- entries 65..128 of the last row -1 (a block without a valid entry, when K > 128)
local function make_indices(S, K, N, dtype)
  local s = next_seed()
  local u = dsrt.rand({ S, K }, { seed = s }):totable()
  local rows = {}
  for t = 1, S do
    local r = {}
    for k = 1, K do
      local x = u[t][k]
      if x < 1 / 6 or (S > 1 and t == 2) or (t == S and K > 128 and k > 64 and k <= 128) then r[k] = -1
      else r[k] = math.min(N - 1, math.floor((x - 1 / 6) / (5 / 6) * N)) end
    end
    rows[t] = r
  end
  return dsrt.tensor(rows, { dtype = dtype })
end

local function check(got, want, precision, what)
  assert(got.device:match("^cuda"), what .. ": the result is not a CUDA tensor")
  assert_equal(got.dtype, want.dtype, what .. ": dtype")
  assert_equal(got.shape, want.shape, what .. ": shape")
  local g, w = got:to("cpu"):to("f32"), want:to("f32")
  local err = dsrt.rel_error(g, w)
  local tol = precision == "fp32" and 2e-5 or 4e-3
  if not (err <= tol) then error(string.format("%s: rel_error %g > %g", what, err, tol), 2) end
  local worst, scale = dsrt.max_abs_diff(g, w), w:abs():max():item()
  local limit = precision == "fp32" and 1e-4 * scale or scale / 64
  if not (worst <= limit) then error(string.format("%s: worst element off by %g (largest %g)", what, worst, scale), 2) end
  return g
end

-- one case: CPU vs CUDA on the same inputs, both precisions, the given dtypes
local function case(S, H, D, K, opts)
  opts = opts or {}
  local N = opts.N or math.max(1, K + 37)
  local q32 = dsrt.randn({ S, H, D }, { seed = next_seed() })
  local pool32 = dsrt.randn({ N, D }, { seed = next_seed() })
  local sink32 = dsrt.randn({ H }, { seed = next_seed(), std = 2 })
  local idx = make_indices(S, K, N, opts.index_dtype or "i64")
  local scale = 1 / math.sqrt(D)
  local combos = opts.combos or {
    { "reference", "bf16", "bf16", "f32" }, { "reference", "f32", "bf16", "bf16" },
    { "fp32", "f32", "f32", "f32" }, { "fp32", "bf16", "f32", "bf16" },
  }
  for _, c in ipairs(combos) do
    local precision, qd, pd, sd = c[1], c[2], c[3], c[4]
    local q, pool, sink = q32:to(qd), pool32:to(pd), sink32:to(sd)
    local want = nn.sparse_attention(q, pool, idx, sink, scale, precision)
    poison(S * H * D * 4)
    local got = nn.sparse_attention(q:to("cuda"), pool:to("cuda"), idx:to("cuda"), sink:to("cuda"), scale, precision)
    local what = string.format("S=%d H=%d D=%d K=%d %s q %s pool %s sink %s", S, H, D, K, precision, qd, pd, sd)
    local g = check(got, want, precision, what)
    if S > 1 then -- row 2 has no valid index: exact zeros
      assert_equal(g:narrow(1, 2, 1):abs():max():item(), 0, what .. ": the row without indices")
    end
  end
end

test("decode_flash_shape", function()
  case(1, 64, 512, 640)
  case(1, 64, 512, 700)
end)

test("few_rows_split_path", function()
  case(3, 64, 512, 65)
  case(3, 3, 96, 700)
  case(1, 1, 64, 64)
  case(3, 3, 5, 65, { index_dtype = "i32" })
  case(17, 1, 36, 130)
end)

test("many_rows_fused_path", function()
  case(17, 64, 64, 65)
  case(130, 64, 64, 63, { index_dtype = "i32" })
  case(130, 64, 96, 130)
  case(17, 3, 512, 1)
  case(130, 3, 36, 640, { combos = { { "reference", "bf16", "bf16", "f32" }, { "fp32", "f32", "f32", "f32" } } })
end)

test("many_rows_tensor_core_path", function()
  local mma = { { "reference", "bf16", "bf16", "f32" }, { "reference", "bf16", "bf16", "bf16" } }
  case(140, 19, 128, 200, { combos = mma })          -- 1 group of 32 heads, its second m-tile partial
  case(140, 40, 128, 200, { combos = mma })          -- 2 groups, the second's first m-tile partial, its second empty
  case(140, 64, 192, 65, { combos = mma, index_dtype = "i32" }) -- 3 n-tiles per warp
  case(140, 3, 512, 700, { combos = mma, N = 5000 })  -- a skipped block, many blocks
  case(17, 64, 64, 640, { combos = mma })             -- 1 n-tile per warp
  -- D = 512 with whole groups of 64 heads: the wgmma kernel (two warpgroups, a block's rows in
  -- two stages): many blocks with a skipped one, K not a multiple of 64, two head groups, one entry
  case(140, 64, 512, 700, { combos = mma, N = 5000 })
  case(33, 128, 512, 130, { combos = mma, index_dtype = "i32" })
  case(17, 64, 512, 1, { combos = mma, N = 2 })
  -- pool rows at an odd offset (no cp.async), still bf16 and contiguous once the core copies them
  local S, H, D, K, N = 140, 16, 128, 130, 300
  local q = dsrt.randn({ S, H, D }, { seed = next_seed(), dtype = "bf16" })
  local wide = dsrt.randn({ N * D + 1 }, { seed = next_seed(), dtype = "bf16" })
  local idx = make_indices(S, K, N, "i64")
  local sink = dsrt.randn({ H }, { seed = next_seed() })
  local want = nn.sparse_attention(q, wide:narrow(1, 2, N * D):view(N, D), idx, sink, 0.1, "reference")
  local gwide = wide:to("cuda")
  poison(S * H * D * 4)
  local got = nn.sparse_attention(q:to("cuda"), gwide:narrow(1, 2, N * D):view(N, D), idx:to("cuda"), sink:to("cuda"), 0.1,
                                  "reference")
  check(got, want, "reference", "tensor cores, pool at an odd offset")
end)

test("decode_many_blocks_and_repeated_calls", function()
  -- 33 blocks (132 chunks): the split path's maxima loops wrap the 32 lanes; its workspace is reused
  case(1, 64, 512, 2100, { combos = { { "reference", "bf16", "bf16", "f32" }, { "fp32", "f32", "f32", "f32" } } })
  local q = dsrt.randn({ 1, 8, 64 }, { seed = next_seed(), dtype = "bf16" })
  local pool = dsrt.randn({ 500, 64 }, { seed = next_seed(), dtype = "bf16" })
  local idx = make_indices(1, 300, 500, "i64")
  local sink = dsrt.randn({ 8 }, { seed = next_seed() })
  local want = nn.sparse_attention(q, pool, idx, sink, 0.125, "reference")
  local gq, gp, gi, gs = q:to("cuda"), pool:to("cuda"), idx:to("cuda"), sink:to("cuda")
  for k = 1, 3 do
    poison(8 * 64 * 4)
    check(nn.sparse_attention(gq, gp, gi, gs, 0.125, "reference"), want, "reference", "repeated call " .. k)
  end
end)

test("split_path_window_decode_and_empty_chunks", function()
  case(1, 64, 512, 128) -- the window layer's decode: 2 blocks, 8 chunks of 16 (a cluster of 8)
  case(1, 64, 512, 160) -- the ratio-128 layer's: 10 chunks over 8 CTAs, two of them two chunks
  case(2, 9, 40, 129)   -- one entry in the last chunk, a partial second head group
  -- chunks without a valid entry inside blocks that have some (the running max skips them, the
  -- chunks after them in the block still use the block's max), and a block of one valid entry
  local S, H, D, K, N = 2, 11, 64, 200, 300
  local q32 = dsrt.randn({ S, H, D }, { seed = next_seed() })
  local pool32 = dsrt.randn({ N, D }, { seed = next_seed() })
  local sink = dsrt.randn({ H }, { seed = next_seed(), std = 2 })
  local u = dsrt.rand({ S, K }, { seed = next_seed() }):totable()
  local rows = {}
  for t = 1, S do
    rows[t] = {}
    for k = 1, K do
      local empty = (k <= 16) or (k > 96 and k <= 112) or (k > 128 and k ~= 150 and k <= 192)
      rows[t][k] = empty and -1 or math.floor(u[t][k] * (N - 1))
    end
  end
  local idx = dsrt.tensor(rows, { dtype = "i32" })
  for _, c in ipairs({ { "reference", "bf16" }, { "fp32", "f32" } }) do
    local q, pool = q32:to(c[2]), pool32:to(c[2])
    local want = nn.sparse_attention(q, pool, idx, sink, 0.125, c[1])
    poison(S * H * D * 4)
    local got = nn.sparse_attention(q:to("cuda"), pool:to("cuda"), idx:to("cuda"), sink:to("cuda"), 0.125, c[1])
    check(got, want, c[1], "empty chunks " .. c[1])
  end
end)

test("trailing_invalid_entries_change_no_bit", function()
  -- An index list padded with -1 at its end gives the same bits: attend() skips blocks without a
  -- valid entry, the split path skips such chunks, and the cluster kernel (K <= 256 here) sums
  -- by chunk as the split path does (K = 420: 27 chunks, the split path), so a speculative
  -- session rolled back attends exactly as one that never went ahead. Both precisions, with and
  -- without the inverse RoPE, q and pool f32 and bf16.
  for _, c in ipairs({ { 1, 64, 512, 128 }, { 1, 64, 512, 160 }, { 3, 11, 64, 200 }, { 2, 4, 512, 70 }, { 130, 64, 512, 200 } }) do
    local S, H, D, K = c[1], c[2], c[3], c[4]
    local N = K + 37
    local idx = make_indices(S, K, N, "i32")
    local rows = idx:totable()
    for t = 1, S do for k = K + 1, 420 do rows[t][k] = -1 end end
    local padded = dsrt.tensor(rows, { dtype = "i32", device = "cuda" })
    idx = idx:to("cuda")
    for _, dt in ipairs({ "f32", "bf16" }) do
      local q = dsrt.randn({ S, H, D }, { seed = next_seed(), dtype = dt, device = "cuda" })
      local pool = dsrt.randn({ N, D }, { seed = next_seed(), dtype = dt, device = "cuda" })
      local sink = dsrt.randn({ H }, { seed = next_seed(), device = "cuda" })
      for _, precision in ipairs({ "reference", "fp32" }) do
        local what = string.format("S=%d H=%d D=%d K=%d %s %s", S, H, D, K, dt, precision)
        local function same(a, b, how)
          local x, y = a:to("cpu"):to("f32"), b:to("cpu"):to("f32")
          assert_equal(x:ne(x):sum():item(), 0, what .. how .. ": NaN")
          assert_equal(x:ne(y):sum():item(), 0, what .. how .. ": elements differ")
        end
        poison(S * H * D * 4)
        same(nn.sparse_attention(q, pool, idx, sink, 0.05, precision),
             nn.sparse_attention(q, pool, padded, sink, 0.05, precision), "")
        same(nn.sparse_attention_inverse_rope(q, pool, idx, sink, 0.05, 7, 1, 10000, nil, precision),
             nn.sparse_attention_inverse_rope(q, pool, padded, sink, 0.05, 7, 1, 10000, nil, precision), " inverse RoPE")
      end
    end
  end
end)

test("single_block_and_tiny_pools", function()
  case(3, 64, 512, 1, { N = 1 })
  case(17, 64, 64, 64, { N = 3 })
  case(130, 1, 512, 700, { combos = { { "reference", "bf16", "bf16", "f32" }, { "fp32", "f32", "f32", "f32" } } })
end)

test("strided_inputs", function()
  -- q as a transposed view, pool as a column slice: the CUDA branch makes them contiguous
  local S, H, D, K, N = 3, 5, 64, 130, 90
  local qt = dsrt.randn({ H, S, D }, { seed = next_seed(), dtype = "bf16" }):transpose(1, 2)
  local wide = dsrt.randn({ N, D + 7 }, { seed = next_seed(), dtype = "bf16" })
  local pool = wide:narrow(2, 4, D)
  local idx = make_indices(S, K, N, "i64")
  local sink = dsrt.randn({ H }, { seed = next_seed() })
  for _, precision in ipairs({ "reference", "fp32" }) do
    local want = nn.sparse_attention(qt, pool, idx, sink, 0.125, precision)
    poison(S * H * D * 4)
    local got = nn.sparse_attention(qt:to("cuda"), pool:to("cuda"), idx:to("cuda"), sink:to("cuda"), 0.125, precision)
    check(got, want, precision, "strided " .. precision)
  end
end)

test("a_bad_index_gives_nan_on_the_wgmma_path", function()
  -- many rows, bf16, D = 512, 64 heads: the wgmma kernel; row 5's last index is out of range
  local S, H, D, K, N = 140, 64, 512, 130, 300
  local q = dsrt.randn({ S, H, D }, { seed = next_seed(), dtype = "bf16", device = "cuda" })
  local pool = dsrt.randn({ N, D }, { seed = next_seed(), dtype = "bf16", device = "cuda" })
  local sink = dsrt.zeros({ H }, { device = "cuda" })
  local rows = make_indices(S, K, N, "i64"):totable()
  rows[5][K] = N
  local o = nn.sparse_attention(q, pool, dsrt.tensor(rows, { dtype = "i64", device = "cuda" }), sink, 0.125, "reference")
  o = o:to("cpu"):to("f32")
  assert_equal(o:narrow(1, 5, 1):ne(o:narrow(1, 5, 1)):sum():item(), H * D, "the bad row is NaN")
  assert_equal(o:ne(o):sum():item(), H * D, "only the bad row is NaN")
end)

test("a_bad_index_gives_nan", function()
  local S, H, D, N = 2, 3, 64, 10
  local q = dsrt.randn({ S, H, D }, { seed = next_seed(), device = "cuda" })
  local pool = dsrt.randn({ N, D }, { seed = next_seed(), device = "cuda" })
  local sink = dsrt.zeros({ H }, { device = "cuda" })
  for _, bad in ipairs({ N, -2 }) do
    for _, K in ipairs({ 3, 200 }) do -- fused and split paths
      local rows = { {}, {} }
      for k = 1, K do rows[1][k], rows[2][k] = k % N, (k + 1) % N end
      rows[2][K] = bad
      local idx = dsrt.tensor(rows, { dtype = "i64", device = "cuda" })
      local o = nn.sparse_attention(q, pool, idx, sink, 0.125, "fp32"):to("cpu")
      for _, v in ipairs(h.flat(o:narrow(1, 1, 1):totable())) do assert(v == v, "a good row is NaN") end
      for _, v in ipairs(h.flat(o:narrow(1, 2, 1):totable())) do assert(v ~= v, "the row with a bad index is not NaN") end
    end
  end
end)

test("errors", function()
  local q = dsrt.randn({ 2, 3, 8 }, { seed = next_seed(), device = "cuda", dtype = "bf16" })
  local pool = dsrt.randn({ 5, 8 }, { seed = next_seed(), device = "cuda", dtype = "bf16" })
  local idx = dsrt.tensor({ { 0, 1 }, { 4, -1 } }, { device = "cuda" })
  local sink = dsrt.zeros({ 3 }, { device = "cuda" })
  assert_error(nn.sparse_attention, "nn.sparse_attention: pool is bf16%[5, 8%] on cpu, not on the stream's device cuda",
               q, pool:to("cpu"), idx, sink, 0.3, "fp32")
  assert_error(nn.sparse_attention, "nn.sparse_attention: sink is f32%[3%] on cpu, not on the stream's device cuda",
               q, pool, idx, sink:to("cpu"), 0.3, "reference")
  assert_error(nn.sparse_attention, "nn.sparse_attention: indices is i64%[2, 2%] on cuda:0, not on the stream's device cpu",
               q:to("cpu"), pool:to("cpu"), idx, sink:to("cpu"), 0.3, "fp32")
  assert_error(nn.sparse_attention, "nn.sparse_attention: pool is bf16%[5, 7%] on cuda:0, expected shape %[%*, 8%]",
               q, pool:narrow(2, 1, 7), idx, sink, 0.3, "fp32")
  assert_error(nn.sparse_attention, "nn.sparse_attention: indices is i64%[3, 2%] on cuda:0, expected shape %[2, %*%]",
               q, pool, dsrt.zeros({ 3, 2 }, { dtype = "i64", device = "cuda" }), sink, 0.3, "fp32")
  assert_error(nn.sparse_attention, "nn.sparse_attention: indices is f32%[2, 2%] on cuda:0, expected i32 or i64",
               q, pool, idx:to("f32"), sink, 0.3, "fp32")
  assert_error(nn.sparse_attention, "nn.sparse_attention: sink is f32%[4%] on cuda:0, expected shape %[3%]",
               q, pool, idx, dsrt.zeros({ 4 }, { device = "cuda" }), 0.3, "fp32")
  assert_error(nn.sparse_attention, "nn.sparse_attention: q is f16%[2, 3, 8%] on cuda:0, expected bf16 or f32",
               q:to("f16"), pool, idx, sink, 0.3, "fp32")
end)

return tests
