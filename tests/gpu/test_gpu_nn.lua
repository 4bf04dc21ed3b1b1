-- test_gpu_nn.lua — DeepSeek-V4's numerical primitives (runtime/nn.h) on CUDA (kernels/norm.cu,
-- kernels/hc.cu) against their C implementations, on fresh random inputs at odd sizes that cross the
-- kernels' tiles and paths (RMSNorm's warp-per-row and block-per-row register paths and the generic one;
-- the round trips' 16-byte path with short last blocks; RoPE's vector and scalar paths split over several
-- blocks a position; the hc GEMM's 256-column splits and 16-token groups below 64 tokens, the tensor-core
-- GEMM's 128-token tiles and 1024-column splits from 64, with 1, 2 and 3 n-tiles of mixes; the collapse's
-- 1024-column parts; Sinkhorn in one warp (hc <= 5) or a block), in both precisions, from contiguous,
-- strided and misaligned (offset) inputs.
--
-- Results of new tensors come from an allocator cache stocked with freed 0xff blocks (NaN in every
-- float format); in-place round trips run on copies of one input. Thresholds, by what the arithmetic
-- allows (kernels' file comments say why):
--   exact   the round trips (quant.h's shared code), Hadamard, hc_post, hc_expand, RMSNorm and the
--           head norm (double sums on both sides, rounded once to fp32);
--   close   RoPE (cos/sin), Sinkhorn (e^x), hc_pre/hc_head (the fp32 GEMM summed in another order):
--           f32 rel_error <= 1e-5; bf16 outputs within one bf16 ulp of the CPU everywhere, and equal
--           bits for all but 1 % of the elements.
-- NaN never passes. Run on the GPU machine: build/dsrt tests/run.lua tests/gpu/test_gpu_nn.lua
local dsrt = require "dsrt"
local h = require "tests.helpers"
local assert_error, assert_equal = h.assert_error, h.assert_equal

local nn = dsrt.nn
local tests, test = h.suite{ gpu = true }
local PRECS = { "reference", "fp32" }
local FLASH_YARN = { factor = 16, original_seq_len = 65536, beta_fast = 32, beta_slow = 1 }

local seed = 31000
local function next_seed() seed = seed + 1 return seed end

local function numel(shape) local n = 1 for _, d in ipairs(shape) do n = n * d end return n end

-- a CPU tensor of random values (never zeros): std 1 unless told
local function randn(shape, dtype, std)
  return dsrt.randn(shape, { seed = next_seed(), dtype = dtype or "f32", std = std })
end

local poison_cache = h.poison_cuda_cache
local function poison_for(shape, dtype) poison_cache(numel(shape) * (dtype == "bf16" and 2 or 4)) end

local function out_dtype(prec) return prec == "reference" and "bf16" or "f32" end

local function check_meta(got, want, what)
  if not dsrt.is_tensor(got) or not got.device:match("^cuda") then error(what .. ": the result is not a CUDA tensor", 3) end
  if got.dtype ~= want.dtype then error(string.format("%s: dtype %s on cuda, %s on cpu", what, got.dtype, want.dtype), 3) end
  local ok, err = pcall(assert_equal, got.shape, want.shape, "shape")
  if not ok then error(what .. ": " .. err, 3) end
end

-- the number of NaNs in a CPU f32 tensor
local function nans(t) return t:numel() == 0 and 0 or t:ne(t):sum():item() end

-- bit-exact (as values; NaN fails)
local function check_exact(got, want, what)
  check_meta(got, want, what)
  if want:numel() == 0 then return end
  local g, w = got:to("cpu"):to("f32"), want:to("f32")
  if nans(g) > 0 then error(what .. ": NaN in the CUDA result", 2) end
  local diff = g:ne(w):sum():item()
  if diff > 0 then
    local d = (g - w):abs():view(-1)
    local i = d:argmax(1):item() + 1
    error(string.format("%s: %d of %d elements differ; element %d is %.9g on cuda, %.9g on cpu", what, diff,
                        w:numel(), i, g:view(-1)[i]:item(), w:view(-1)[i]:item()), 2)
  end
end

-- f32: rel_error <= tol; bf16: within one bf16 ulp everywhere, equal bits for >= 99 % of the elements
local function check_close(got, want, what, tol)
  check_meta(got, want, what)
  if want:numel() == 0 then return end
  local g, w = got:to("cpu"):to("f32"), want:to("f32")
  if nans(g) > 0 then error(what .. ": NaN in the CUDA result", 2) end
  if want.dtype == "f32" then
    local r = dsrt.rel_error(g, w)
    if not (r <= (tol or 1e-5)) then error(string.format("%s: rel_error %g > %g", what, r, tol or 1e-5), 2) end
    return
  end
  local floor = w:abs():max():item() * 2 ^ -20 -- values cancelled to near zero
  local bound = w:abs() * 2 ^ -7 + floor        -- at least one bf16 ulp of the CPU's value
  local far = (g - w):abs():gt(bound):sum():item()
  local differ = g:ne(w):sum():item()
  if far > 0 or differ > 0.01 * w:numel() then
    error(string.format("%s: %d elements beyond one bf16 ulp, %d of %d differ", what, far, differ, w:numel()), 2)
  end
end

-- a strided (non-contiguous) CUDA copy of a CPU tensor of shape [a, b]: the transpose of [b, a]
local function strided_cuda(t)
  assert(t:dim() == 2)
  return t:transpose(1, 2):contiguous():to("cuda"):transpose(1, 2)
end

-- a contiguous CUDA copy of a CPU tensor that starts one element into its storage: no 16-byte
-- alignment, so the kernels take their generic paths
local function offset_cuda(t)
  local flat = dsrt.zeros({ t:numel() + 1 }, { dtype = t.dtype }):to("cuda")
  local view = flat:narrow(1, 2, t:numel()):view(table.unpack(t.shape))
  view:copy(t:to("cuda"))
  return view
end

-- ---- norms ----

test("rms_norm_matches_cpu", function()
  for _, dt in ipairs({ "bf16", "f32" }) do
    for _, size in ipairs({ { 1, 4096 }, { 3, 1 }, { 17, 31 }, { 5, 1000 }, { 2, 4097 }, { 2, 3, 257 }, { 37, 512 },
                            { 4, 264 }, { 9, 64 }, { 3, 2048 }, { 2, 8192 }, { 2, 8200 }, { 11, 2, 2056 } }) do
      local x = randn(size, dt, 3)
      local d = size[#size]
      for _, wdt in ipairs({ "none", "bf16", "f32" }) do
        local w = wdt ~= "none" and randn({ d }, wdt) or nil
        local xc, wc = x:to("cuda"), w and w:to("cuda")
        for _, prec in ipairs(PRECS) do
          poison_for(size, out_dtype(prec))
          local what = string.format("rms_norm %s x%s w %s %s", dt, table.concat(size, "x"), wdt, prec)
          check_exact(nn.rms_norm(xc, wc, 1e-6, prec), nn.rms_norm(x, w, 1e-6, prec), what)
        end
      end
    end
  end
  -- a strided input, a misaligned one
  local x = randn({ 7, 600 }, "bf16")
  local w = randn({ 600 }, "f32")
  for _, prec in ipairs(PRECS) do
    check_exact(nn.rms_norm(strided_cuda(x), nil, 1e-6, prec), nn.rms_norm(x, nil, 1e-6, prec), "rms_norm strided")
    check_exact(nn.rms_norm(offset_cuda(x), w:to("cuda"), 1e-6, prec), nn.rms_norm(x, w, 1e-6, prec), "rms_norm offset")
  end
end)

test("head_rms_norm_matches_cpu", function()
  for _, dt in ipairs({ "bf16", "f32" }) do
    for _, size in ipairs({ { 1, 64, 512 }, { 3, 5, 512 }, { 2, 3, 33 }, { 7, 1 }, { 37, 3, 128 }, { 2, 1000 } }) do
      local q = randn(size, dt, 2)
      for _, prec in ipairs(PRECS) do
        poison_for(size, out_dtype(prec))
        check_exact(nn.head_rms_norm(q:to("cuda"), 1e-6, prec), nn.head_rms_norm(q, 1e-6, prec),
                    string.format("head_rms_norm %s %s %s", dt, table.concat(size, "x"), prec))
      end
    end
  end
end)

-- ---- round trips ----

test("quant_roundtrip_q8_is_bit_exact", function()
  local cases = { -- shape, blk, first (1-based), count
    { { 5, 512 }, 64, 1, 448 }, { { 3, 130 }, 7, 4, 100 }, { { 2, 2, 256 }, 128, 1, 256 }, { { 4, 65 }, 64, 1, 65 },
    { { 1, 9 }, 1, 2, 8 }, { { 7, 520 }, 64, 9, 504 }, { { 3, 96 }, 16, 17, 80 }, { { 5, 64 }, 8, 1, 64 },
    { { 2, 3, 384 }, 32, 1, 384 }, { { 33, 512 }, 64, 1, 512 },
  }
  for _, dt in ipairs({ "bf16", "f32" }) do
    for _, c in ipairs(cases) do
      local x = randn(c[1], dt, 4)
      -- a few tiny, zero and large values: the scale's floor, e4m3's subnormals and its clamp
      local flat = x:view(-1)
      flat[2], flat[3], flat[5] = 0.0, 1e-7, 3000
      local want, got = x:clone(), x:to("cuda")
      nn.quant_roundtrip_q8(want, c[2], c[3], c[4], "reference")
      local r = nn.quant_roundtrip_q8(got, c[2], c[3], c[4], "reference")
      assert(rawequal(r, got), "returns its argument")
      check_exact(got, want, string.format("q8 %s %s blk %d", dt, table.concat(c[1], "x"), c[2]))
      -- fp32 leaves it alone
      local same = x:to("cuda")
      nn.quant_roundtrip_q8(same, c[2], c[3], c[4], "fp32")
      check_exact(same, x, "q8 fp32 is the identity")
    end
  end
  -- a strided x is rewritten in place through a copy
  local x = randn({ 6, 200 }, "bf16", 4)
  local want, got = x:clone(), strided_cuda(x)
  nn.quant_roundtrip_q8(want, 64, 1, 200, "reference")
  nn.quant_roundtrip_q8(got, 64, 1, 200, "reference")
  check_exact(got:contiguous(), want, "q8 strided")
  -- a misaligned x takes the generic kernel
  want, got = x:clone(), offset_cuda(x)
  nn.quant_roundtrip_q8(want, 64, 1, 192, "reference")
  nn.quant_roundtrip_q8(got, 64, 1, 192, "reference")
  check_exact(got, want, "q8 offset")
end)

test("quant_roundtrip_q4_is_bit_exact", function()
  for _, dt in ipairs({ "bf16", "f32" }) do
    for _, size in ipairs({ { 3, 128 }, { 2, 5, 128 }, { 7, 33 }, { 1, 1 }, { 64, 64, 128 }, { 3, 200 }, { 5, 40 } }) do
      local x = randn(size, dt, 2)
      local flat = x:view(-1)
      flat[1] = 0.0
      if flat:numel() > 4 then flat[4] = 1e-30 end
      local want, got = x:clone(), x:to("cuda")
      nn.quant_roundtrip_q4(want, "reference")
      nn.quant_roundtrip_q4(got, "reference")
      check_exact(got, want, string.format("q4 %s %s", dt, table.concat(size, "x")))
    end
  end
  local x = randn({ 9, 128 }, "f32")
  local want, got = x:clone(), strided_cuda(x)
  nn.quant_roundtrip_q4(want, "reference")
  nn.quant_roundtrip_q4(got, "reference")
  check_exact(got:contiguous(), want, "q4 strided")
end)

-- ---- RoPE and Hadamard ----

test("rope_matches_cpu", function()
  for _, dt in ipairs({ "bf16", "f32" }) do
    for _, size in ipairs({ { 1, 64, 512 }, { 5, 3, 64 }, { 33, 192 }, { 4, 2, 100 }, { 300, 2, 72 }, { 1, 40, 100 } }) do
      local S = size[1]
      local x = randn(size, dt)
      for _, pdt in ipairs({ "i32", "i64" }) do
        local pos = (dsrt.rand({ S }, { seed = next_seed() }) * 200000):to(pdt)
        pos[1] = 0
        for _, yarn in ipairs({ false, true }) do
          for _, inverse in ipairs({ false, true }) do
            for _, prec in ipairs(PRECS) do
              local theta = yarn and 160000 or 10000
              local y_cfg = yarn and FLASH_YARN or nil
              poison_for(size, out_dtype(prec))
              check_close(nn.rope(x:to("cuda"), pos:to("cuda"), theta, y_cfg, inverse, prec),
                          nn.rope(x, pos, theta, y_cfg, inverse, prec),
                          string.format("rope %s %s pos %s yarn %s inverse %s %s", dt, table.concat(size, "x"), pdt,
                                        tostring(yarn), tostring(inverse), prec))
            end
          end
        end
      end
    end
  end
  local x, pos = randn({ 9, 70 }, "bf16"), dsrt.tensor({ 3, 1000, 7, 65535, 0, 12, 99, 100000, 5 })
  check_close(nn.rope(strided_cuda(x), pos:to("cuda"), 10000, nil, false, "reference"),
              nn.rope(x, pos, 10000, nil, false, "reference"), "rope strided")
  local xa = randn({ 9, 72 }, "f32")
  check_close(nn.rope(offset_cuda(xa), pos:to("cuda"), 10000, nil, true, "fp32"),
              nn.rope(xa, pos, 10000, nil, true, "fp32"), "rope offset")
end)

test("hadamard128_is_bit_exact", function()
  for _, dt in ipairs({ "bf16", "f32" }) do
    for _, size in ipairs({ { 128 }, { 3, 128 }, { 9, 64, 128 }, { 1000, 128 } }) do
      local x = randn(size, dt)
      for _, prec in ipairs(PRECS) do
        poison_for(size, out_dtype(prec))
        check_exact(nn.hadamard128(x:to("cuda"), prec), nn.hadamard128(x, prec),
                    string.format("hadamard128 %s %s %s", dt, table.concat(size, "x"), prec))
      end
    end
  end
  local x = randn({ 5, 128 }, "f32")
  check_exact(nn.hadamard128(strided_cuda(x), "fp32"), nn.hadamard128(x, "fp32"), "hadamard128 strided")
  for _, dt in ipairs({ "bf16", "f32" }) do
    local xo = randn({ 7, 128 }, dt)
    for _, prec in ipairs(PRECS) do
      check_exact(nn.hadamard128(offset_cuda(xo), prec), nn.hadamard128(xo, prec), "hadamard128 offset " .. dt .. " " .. prec)
    end
  end
end)

-- ---- hyper-connections ----

-- hc parameters of the model's shapes: fn [M, hc·d] scaled so that the mixes are O(1)
local function hc_params(hc, d, head, dt)
  local M = head and hc or (2 + hc) * hc
  return randn({ M, hc * d }, dt, 2 / math.sqrt(hc * d)), randn({ head and 1 or 3 }, dt, 0.5):abs() + 0.5,
         randn({ M }, dt, 0.5)
end

local function cuda_all(...)
  local out = {}
  for i, t in ipairs({ ... }) do out[i] = t:to("cuda") end
  return table.unpack(out)
end

test("sinkhorn_matches_cpu", function()
  for _, hc in ipairs({ 4, 1, 3, 7 }) do
    for _, T in ipairs({ 1, 5, 130 }) do
      for _, dt in ipairs({ "f32", "bf16" }) do
        local M = (2 + hc) * hc
        local mixes, scale, base = randn({ T, M }, dt, 1.5), randn({ 3 }, dt):abs() + 0.5, randn({ M }, dt)
        -- eps 1e-30 lies below the range of the loop's fast division: the exact one's path
        for _, iters_eps in ipairs({ { 20, 1e-6 }, { 1, 1e-6 }, { 3, 1e-6 }, { 20, 1e-30 } }) do
          local iters, eps = iters_eps[1], iters_eps[2]
          poison_for({ T, hc, hc }, "f32")
          local p, q, c = nn.sinkhorn(mixes:to("cuda"), scale:to("cuda"), base:to("cuda"), hc, iters, eps)
          local pw, qw, cw = nn.sinkhorn(mixes, scale, base, hc, iters, eps)
          local what = string.format("sinkhorn hc %d T %d %s iters %d eps %g", hc, T, dt, iters, eps)
          check_close(p, pw, what .. " pre")
          check_close(q, qw, what .. " post")
          check_close(c, cw, what .. " comb")
        end
      end
    end
  end
end)

test("hc_pre_matches_cpu", function()
  -- T < 64: the split GEMM's token counts (1, 2, 4, 8, 16 a block, then groups of 16), hc·d crossing its
  -- 256-column splits, the collapse's 1024-column parts. T >= 64 with bf16 X and hc·d % 32 == 0: the
  -- tensor-core GEMM (1024-column splits, the last one short; 128-token tiles, the last one partial;
  -- 1, 2, 3 n-tiles for hc 2, 3, 4); else (f32 X, hc·d % 32 ~= 0, hc > 4) the split GEMM in groups.
  -- One token of 4 streams, d = 256·C with C <= 16 (4096, 768, 256): a cluster of C blocks does it all.
  for _, case in ipairs({ { 1, 4, 4096 }, { 1, 4, 768 }, { 1, 4, 256 }, { 3, 4, 1100 }, { 16, 4, 129 }, { 70, 4, 300 },
                          { 2, 3, 1 }, { 5, 1, 700 },
                          { 9, 6, 77 }, { 2, 4, 64 }, { 40, 4, 520 }, { 64, 4, 256 }, { 130, 4, 264 }, { 300, 4, 1024 },
                          { 77, 3, 64 }, { 100, 2, 48 }, { 200, 6, 64 } }) do
    local T, hc, d = case[1], case[2], case[3]
    for _, dt in ipairs({ "bf16", "f32" }) do
      local X = randn({ T, hc, d }, dt, 2)
      local fn, scale, base = hc_params(hc, d, false, "f32")
      local Xc, fnc, sc, bc = cuda_all(X, fn, scale, base)
      for _, prec in ipairs(PRECS) do
        poison_for({ T, d }, out_dtype(prec))
        local u, post, comb = nn.hc_pre(Xc, fnc, sc, bc, 1e-6, 1e-6, 20, prec)
        local uw, pw, cw = nn.hc_pre(X, fn, scale, base, 1e-6, 1e-6, 20, prec)
        local what = string.format("hc_pre T %d hc %d d %d %s %s", T, hc, d, dt, prec)
        check_close(u, uw, what .. " u")
        check_close(post, pw, what .. " post")
        check_close(comb, cw, what .. " comb")
      end
    end
  end
  -- bf16 weights and a strided X
  local X = randn({ 6, 4, 200 }, "bf16")
  local fn, scale, base = hc_params(4, 200, false, "bf16")
  local Xs = X:transpose(1, 2):contiguous():to("cuda"):transpose(1, 2)
  local fnc, sc, bc = cuda_all(fn, scale, base)
  local u, post, comb = nn.hc_pre(Xs, fnc, sc, bc, 1e-6, 1e-6, 20, "reference")
  local uw, pw, cw = nn.hc_pre(X, fn, scale, base, 1e-6, 1e-6, 20, "reference")
  check_close(u, uw, "hc_pre strided u")
  check_close(post, pw, "hc_pre strided post")
  check_close(comb, cw, "hc_pre strided comb")
  -- a misaligned X of many tokens: the split GEMM, the scalar collapse
  X = randn({ 70, 4, 64 }, "bf16")
  fn, scale, base = hc_params(4, 64, false, "f32")
  fnc, sc, bc = cuda_all(fn, scale, base)
  u, post, comb = nn.hc_pre(offset_cuda(X), fnc, sc, bc, 1e-6, 1e-6, 20, "reference")
  uw, pw, cw = nn.hc_pre(X, fn, scale, base, 1e-6, 1e-6, 20, "reference")
  check_close(u, uw, "hc_pre offset u")
  check_close(post, pw, "hc_pre offset post")
  check_close(comb, cw, "hc_pre offset comb")
end)

test("hc_head_matches_cpu", function()
  for _, case in ipairs({ { 1, 4, 4096 }, { 1, 4, 768 }, { 5, 4, 1100 }, { 70, 4, 129 }, { 3, 3, 5 }, { 100, 4, 256 },
                          { 65, 3, 96 } }) do
    local T, hc, d = case[1], case[2], case[3]
    for _, dt in ipairs({ "bf16", "f32" }) do
      local X = randn({ T, hc, d }, dt, 2)
      local fn, scale, base = hc_params(hc, d, true, dt)
      for _, prec in ipairs(PRECS) do
        poison_for({ T, d }, out_dtype(prec))
        check_close(nn.hc_head(X:to("cuda"), fn:to("cuda"), scale:to("cuda"), base:to("cuda"), 1e-6, 1e-6, prec),
                    nn.hc_head(X, fn, scale, base, 1e-6, 1e-6, prec),
                    string.format("hc_head T %d hc %d d %d %s %s", T, hc, d, dt, prec))
      end
    end
  end
end)

test("hc_ops_with_a_norm_weight_equal_the_ops_then_rms_norm", function()
  -- The collapse's kernel normalising its own row (d a multiple of 8 up to 4096) gives rms_norm's
  -- bits on the same device; other widths and a misaligned X take the collapse then rms_norm in
  -- place. From 64 tokens the normed hc_pre runs Sinkhorn in a launch of its own, a warp a token
  -- (hc 4), the plain one in a block a token beside the collapse: post and comb the same bits, of
  -- hc_pre and of hc_post_pre alike (T 70, 100: the tensor-core GEMM's partials for bf16 X,
  -- split_kernel's for f32). Against the CPU's norm of the same u: close, as every norm.
  local function same(got, want, what) check_exact(got, want:to("cpu"), what) end
  for _, case in ipairs({ { 1, 4, 4096 }, { 3, 4, 4096 }, { 2, 4, 136 }, { 1, 4, 2056 }, { 5, 3, 1000 },
                          { 70, 4, 264 }, { 100, 4, 4096 }, { 2, 4, 8192 }, { 1, 2, 30 } }) do
    local T, hc, d = case[1], case[2], case[3]
    for _, dt in ipairs({ "bf16", "f32" }) do
      local X, f = randn({ T, hc, d }, dt, 2), randn({ T, d }, dt)
      local fn, scale, base = hc_params(hc, d, false, "f32")
      local hfn, hscale, hbase = hc_params(hc, d, true, "f32")
      local w = randn({ d }, "bf16", 0.5):abs() + 0.5
      local Xc, fc, fnc, sc, bc, hfnc, hsc, hbc, wc = cuda_all(X, f, fn, scale, base, hfn, hscale, hbase, w)
      for _, prec in ipairs(PRECS) do
        local what = string.format("T %d hc %d d %d %s %s", T, hc, d, dt, prec)
        poison_for({ T, d }, out_dtype(prec))
        local u, p, c = nn.hc_pre(Xc, fnc, sc, bc, 1e-6, 1e-5, 20, prec)
        local x, pn, cn = nn.hc_pre(Xc, fnc, sc, bc, 1e-6, 1e-5, 20, prec, wc)
        same(x, nn.rms_norm(u, wc, 1e-5, prec), "hc_pre normed " .. what)
        same(pn, p, "hc_pre normed post " .. what)
        same(cn, c, "hc_pre normed comb " .. what)
        check_close(x, nn.rms_norm(u:to("cpu"), w, 1e-5, prec), "hc_pre normed vs the cpu's norm " .. what)
        poison_for({ T, d }, out_dtype(prec))
        local Xa, ua, pa, ca = nn.hc_post_pre(fc, Xc, p, c, fnc, sc, bc, 1e-6, 1e-5, 20, prec)
        local Xb, xb, pb, cb = nn.hc_post_pre(fc, Xc, p, c, fnc, sc, bc, 1e-6, 1e-5, 20, prec, wc)
        same(Xb, Xa, "hc_post_pre normed X' " .. what)
        same(xb, nn.rms_norm(ua, wc, 1e-5, prec), "hc_post_pre normed " .. what)
        same(pb, pa, "hc_post_pre normed post' " .. what)
        same(cb, ca, "hc_post_pre normed comb' " .. what)
        poison_for({ T, d }, out_dtype(prec))
        local y = nn.hc_head(Xc, hfnc, hsc, hbc, 1e-6, 1e-5, prec)
        same(nn.hc_head(Xc, hfnc, hsc, hbc, 1e-6, 1e-5, prec, wc), nn.rms_norm(y, wc, 1e-5, prec),
                    "hc_head normed " .. what)
        -- hc_post_head: hc_post's X' (hc_post_pre's) and the head of it, with the norm or without;
        -- against the CPU's composition, close (without the norm, whose rounding after the GEMM's
        -- other order can move a value two bf16 ulps: T 70, d 264 did)
        poison_for({ T, d }, out_dtype(prec))
        local Xh, yh = nn.hc_post_head(fc, Xc, p, c, hfnc, hsc, hbc, 1e-6, 1e-5, prec)
        local Xhn, yhn = nn.hc_post_head(fc, Xc, p, c, hfnc, hsc, hbc, 1e-6, 1e-5, prec, wc)
        same(Xh, Xa, "hc_post_head X' " .. what)
        same(Xhn, Xa, "hc_post_head normed X' " .. what)
        same(yh, nn.hc_head(Xa, hfnc, hsc, hbc, 1e-6, 1e-5, prec), "hc_post_head " .. what)
        same(yhn, nn.rms_norm(yh, wc, 1e-5, prec), "hc_post_head normed " .. what)
        local _, ycpu = nn.hc_post_head(f, X, p:to("cpu"), c:to("cpu"), hfn, hscale, hbase, 1e-6, 1e-5, prec)
        check_close(yh, ycpu, "hc_post_head vs the cpu's " .. what)
      end
    end
  end
  -- a misaligned X: the scalar collapse, then the norm
  local X = randn({ 2, 4, 64 }, "bf16")
  local fn, scale, base = hc_params(4, 64, false, "f32")
  local w = randn({ 64 }, "bf16")
  local fnc, sc, bc, wc = cuda_all(fn, scale, base, w)
  local u = nn.hc_pre(offset_cuda(X), fnc, sc, bc, 1e-6, 1e-5, 20, "reference")
  same(nn.hc_pre(offset_cuda(X), fnc, sc, bc, 1e-6, 1e-5, 20, "reference", wc), nn.rms_norm(u, wc, 1e-5, "reference"),
              "hc_pre normed offset")
end)

test("hc_ops_of_a_few_tokens_equal_the_rows_of_a_batch", function()
  -- A decode step's token (and a verify's 2-4) must get the bits it gets inside a longer batch: the
  -- split GEMM's blocks of 1, 2 and 4 tokens against its block of 16, then the collapse with the
  -- norm. hc·d: one split (hc 1, d 8), a short last split (800), M = 15 (hc 3), 33 splits (8224),
  -- Flash's 64; fn f32 and bf16, X bf16 and f32. One token of 4 streams with d = 256·C (4096, 768,
  -- 256) is a cluster's (hc.cu pre_cluster_kernel): the same bits as the batch's split GEMM and
  -- pre_kernel.
  local B = 9
  local function rows(t, first, n) return t:narrow(1, first, n):contiguous() end
  for _, case in ipairs({ { 4, 4096, "f32" }, { 4, 200, "bf16" }, { 3, 1000, "f32" }, { 4, 2056, "bf16" }, { 1, 8, "f32" },
                          { 4, 768, "f32" }, { 4, 256, "bf16" } }) do
    local hc, d, fdt = case[1], case[2], case[3]
    for _, dt in ipairs({ "bf16", "f32" }) do
      local X, f = randn({ B, hc, d }, dt, 2), randn({ B, d }, dt)
      local post, comb = randn({ B, hc }):abs(), randn({ B, hc, hc }):abs()
      local fn, scale, base = hc_params(hc, d, false, fdt)
      local hfn, hscale, hbase = hc_params(hc, d, true, fdt)
      local w = randn({ d }, "bf16", 0.5):abs() + 0.5
      local Xc, fc, pc, cc, fnc, sc, bc, hfnc, hsc, hbc, wc =
        cuda_all(X, f, post, comb, fn, scale, base, hfn, hscale, hbase, w)
      for _, prec in ipairs(PRECS) do
        local u, p, c = nn.hc_pre(Xc, fnc, sc, bc, 1e-6, 1e-5, 20, prec, wc)
        local Xn, un, pn, cn = nn.hc_post_pre(fc, Xc, pc, cc, fnc, sc, bc, 1e-6, 1e-5, 20, prec, wc)
        local y = nn.hc_head(Xc, hfnc, hsc, hbc, 1e-6, 1e-5, prec, wc)
        local _, yh = nn.hc_post_head(fc, Xc, pc, cc, hfnc, hsc, hbc, 1e-6, 1e-5, prec, wc)
        for _, span in ipairs({ { 1, 1 }, { 9, 1 }, { 2, 2 }, { 4, 3 }, { 5, 4 } }) do
          local first, n = span[1], span[2]
          local what = string.format("rows %d..%d of %d, hc %d d %d, fn %s, X %s, %s", first, first + n - 1, B, hc, d,
                                     fdt, dt, prec)
          local function same(got, batch, name) check_exact(got, rows(batch, first, n):to("cpu"), name .. " " .. what) end
          local x = rows(Xc, first, n)
          poison_for({ n, hc, d }, "f32")
          local su, sp, sc_ = nn.hc_pre(x, fnc, sc, bc, 1e-6, 1e-5, 20, prec, wc)
          same(su, u, "hc_pre u")
          same(sp, p, "hc_pre post")
          same(sc_, c, "hc_pre comb")
          poison_for({ n, hc, d }, "f32")
          local sX, su2, sp2, sc2 = nn.hc_post_pre(rows(fc, first, n), x, rows(pc, first, n), rows(cc, first, n), fnc, sc,
                                                   bc, 1e-6, 1e-5, 20, prec, wc)
          same(sX, Xn, "hc_post_pre X'")
          same(su2, un, "hc_post_pre u")
          same(sp2, pn, "hc_post_pre post")
          same(sc2, cn, "hc_post_pre comb")
          poison_for({ n, d }, "f32")
          same(nn.hc_head(x, hfnc, hsc, hbc, 1e-6, 1e-5, prec, wc), y, "hc_head")
          poison_for({ n, hc, d }, "f32")
          local hX, hy = nn.hc_post_head(rows(fc, first, n), x, rows(pc, first, n), rows(cc, first, n), hfnc, hsc, hbc,
                                         1e-6, 1e-5, prec, wc)
          same(hX, Xn, "hc_post_head X'")
          same(hy, yh, "hc_post_head y")
        end
      end
    end
  end
end)

test("hc_post_is_bit_exact", function()
  for _, case in ipairs({ { 1, 4, 4096 }, { 3, 4, 1001 }, { 17, 3, 33 }, { 2, 1, 5 }, { 4, 7, 300 }, { 9, 4, 264 } }) do
    local T, hc, d = case[1], case[2], case[3]
    for _, dt in ipairs({ "bf16", "f32" }) do
      local f, X = randn({ T, d }, dt), randn({ T, hc, d }, dt)
      local post, comb = randn({ T, hc }, "f32"):abs(), randn({ T, hc, hc }, "f32"):abs()
      for _, prec in ipairs(PRECS) do
        poison_for({ T, hc, d }, out_dtype(prec))
        check_exact(nn.hc_post(f:to("cuda"), X:to("cuda"), post:to("cuda"), comb:to("cuda"), prec),
                    nn.hc_post(f, X, post, comb, prec), string.format("hc_post T %d hc %d d %d %s %s", T, hc, d, dt, prec))
      end
    end
  end
  -- strided f and comb
  local f, X, post, comb = randn({ 3, 300 }), randn({ 3, 4, 300 }), randn({ 3, 4 }), randn({ 3, 4, 4 })
  check_exact(nn.hc_post(strided_cuda(f), X:to("cuda"), post:to("cuda"), comb:to("cuda"):transpose(2, 3), "fp32"),
              nn.hc_post(f, X, post, comb:transpose(2, 3):contiguous(), "fp32"), "hc_post strided")
  -- a misaligned X: the generic kernel
  check_exact(nn.hc_post(f:to("cuda"), offset_cuda(X), post:to("cuda"), comb:to("cuda"), "reference"),
              nn.hc_post(f, X, post, comb, "reference"), "hc_post offset")
end)

test("hc_expand_on_cuda", function()
  for _, dt in ipairs({ "bf16", "f32" }) do
    local e = randn({ 3, 77 }, dt)
    check_exact(nn.hc_expand(e:to("cuda"), 4), nn.hc_expand(e, 4), "hc_expand " .. dt)
  end
end)

test("hc_post_pre_equals_the_two_calls", function()
  -- T crosses the split GEMM's token groups, hc·d its K chunks (the fused kernel computes X' there);
  -- from 64 tokens with hc·d % 32 == 0 hc_post's kernel runs first, then the tensor-core GEMM
  for _, case in ipairs({ { 1, 4, 4096 }, { 5, 4, 130 }, { 70, 4, 257 }, { 3, 3, 1000 }, { 17, 4, 64 }, { 100, 4, 256 },
                          { 130, 4, 264 } }) do
    local T, hc, d = case[1], case[2], case[3]
    local f, X = randn({ T, d }, "bf16"), randn({ T, hc, d }, "bf16")
    local post, comb = randn({ T, hc }):abs(), randn({ T, hc, hc }):abs()
    local fn, scale, base = hc_params(hc, d, false, "f32")
    for _, prec in ipairs(PRECS) do
      for _, dev in ipairs({ "cpu", "cuda" }) do
        local a = { f:to(dev), X:to(dev), post:to(dev), comb:to(dev), fn:to(dev), scale:to(dev), base:to(dev) }
        local Xn, u, pn, cn = nn.hc_post_pre(a[1], a[2], a[3], a[4], a[5], a[6], a[7], 1e-6, 1e-6, 20, prec)
        local Xw = nn.hc_post(a[1], a[2], a[3], a[4], prec)
        local uw, pw, cw = nn.hc_pre(Xw, a[5], a[6], a[7], 1e-6, 1e-6, 20, prec)
        for i, pair in ipairs({ { Xn, Xw }, { u, uw }, { pn, pw }, { cn, cw } }) do
          local g, w = pair[1]:to("cpu"), pair[2]:to("cpu")
          assert_equal(g.dtype, w.dtype)
          assert_equal(g:ne(g):sum():item(), 0)
          assert_equal(g:ne(w):sum():item(), 0, string.format("hc_post_pre %s %s result %d", dev, prec, i))
        end
      end
    end
  end
end)

-- ---- errors ----

test("errors_on_cuda_name_the_function_and_the_shapes", function()
  local x = randn({ 3, 8 }, "bf16"):to("cuda")
  assert_error(nn.rms_norm, "nn.rms_norm: weight is f32%[8%] on cpu, not on the stream's device", x,
               dsrt.ones({ 8 }), 1e-6, "fp32")
  assert_error(nn.rms_norm, "nn.rms_norm: weight is f32%[4%] on cuda.-expected shape %[8%]", x,
               dsrt.ones({ 4 }, { device = "cuda" }), 1e-6, "fp32")
  assert_error(nn.rms_norm, "nn.rms_norm: x is i64", dsrt.tensor({ 1, 2 }):to("cuda"), nil, 1e-6, "fp32")
  assert_error(nn.hadamard128, "nn.hadamard128: x is bf16%[3, 8%] on cuda.-expected %[..., 128%]", x, "fp32")
  assert_error(nn.rope, "nn.rope: positions is i64%[2%] on cpu, not on the stream's device", randn({ 2, 64 }):to("cuda"),
               dsrt.tensor({ 0, 1 }), 10000, nil, false, "fp32")
  assert_error(nn.rope, "nn.rope: positions is f32", randn({ 2, 64 }):to("cuda"), dsrt.zeros({ 2 }, { device = "cuda" }),
               10000, nil, false, "fp32")
  assert_error(nn.quant_roundtrip_q8, "nn.quant_roundtrip_q8: columns %[0, 9%) are not within the 8", x, 64, 1, 9,
               "reference")
  local X = randn({ 2, 4, 16 }):to("cuda")
  local fn, scale, base = hc_params(4, 16, false, "f32")
  assert_error(nn.hc_pre, "nn.hc_pre: fn is f32%[24, 64%] on cpu, not on the stream's device", X, fn, scale, base,
               1e-6, 1e-6, 20, "fp32")
  assert_error(nn.hc_pre, "nn.hc_pre: fn is f32%[24, 60%] on cuda.-expected shape %[24, 64%]", X,
               randn({ 24, 60 }):to("cuda"), scale:to("cuda"), base:to("cuda"), 1e-6, 1e-6, 20, "fp32")
  assert_error(nn.hc_post, "nn.hc_post: X is f32%[2, 4, 16%] on cuda.-not on the stream's device", randn({ 2, 16 }), X,
               randn({ 2, 4 }), randn({ 2, 4, 4 }), "fp32")
  assert_error(nn.hc_post, "nn.hc_post: comb is f32%[2, 4, 3%] on cuda.-expected shape %[2, 4, 4%]",
               randn({ 2, 16 }):to("cuda"), X, randn({ 2, 4 }):to("cuda"), randn({ 2, 4, 3 }):to("cuda"), "fp32")
  assert_error(nn.hc_post_pre, "nn.hc_post_pre: comb is f32%[2, 4, 3%] on cuda.-expected shape %[2, 4, 4%]",
               randn({ 2, 16 }):to("cuda"), X, randn({ 2, 4 }):to("cuda"), randn({ 2, 4, 3 }):to("cuda"), fn:to("cuda"),
               scale:to("cuda"), base:to("cuda"), 1e-6, 1e-6, 20, "fp32")
  assert_error(nn.hc_post_pre, "nn.hc_post_pre: fn is f32%[24, 64%] on cpu, not on the stream's device",
               randn({ 2, 16 }):to("cuda"), X, randn({ 2, 4 }):to("cuda"), randn({ 2, 4, 4 }):to("cuda"), fn,
               scale:to("cuda"), base:to("cuda"), 1e-6, 1e-6, 20, "fp32")
  -- the kernels' own limit: at most 32 streams
  local big = randn({ 1, 33, 2 }):to("cuda")
  local bfn, bs, bb = hc_params(33, 2, false, "f32")
  assert_error(nn.hc_pre, "nn.hc_pre: hc = 33, the CUDA kernels take 1..32 streams", big, bfn:to("cuda"), bs:to("cuda"),
               bb:to("cuda"), 1e-6, 1e-6, 20, "fp32")
  assert_error(nn.sinkhorn, "nn.sinkhorn: hc = 33", randn({ 1, 35 * 33 }):to("cuda"), bs:to("cuda"), bb:to("cuda"), 33,
               20, 1e-6)
end)

test("work_follows_the_current_stream", function()
  local s = dsrt.stream("cuda")
  local x = randn({ 9, 4096 }, "bf16")
  local xc = x:to("cuda")
  local y = dsrt.with_stream(s, function() return nn.rms_norm(xc, nil, 1e-6, "reference") end)
  s:synchronize()
  check_exact(y, nn.rms_norm(x, nil, 1e-6, "reference"), "rms_norm on a side stream")
end)

return tests
