-- test_nn.lua — dsrt.nn (runtime/lnn.c over runtime/nn.c) from Lua: the calling convention (tensors,
-- scalars, then the precision string last), result shapes and dtypes per precision, the in-place
-- round trips, small cases against plain-Lua arithmetic, identities (inverse RoPE, H·H = I, hc_post
-- with the identity mix), the attention layer's fused passes (norm_rope, q_kv_norm,
-- sparse_attention_inverse_rope) equal to the separate ops, bit for bit, and the error messages, which must name the function and
-- the shapes. The numerics in depth are tests/c/test_nn.c's.
local dsrt = require "dsrt"
local h = require "tests.helpers"
local assert_error, assert_close, assert_equal = h.assert_error, h.assert_close, h.assert_equal

local nn = dsrt.nn
local tests, test = h.suite()

local BF16_TOL = 2 ^ -8 -- relative: one bf16 rounding
local FLASH_YARN = { factor = 16, original_seq_len = 65536, beta_fast = 32, beta_slow = 1 }

local next_seed = 900
local function randn(shape, dtype, std)
  next_seed = next_seed + 1
  return dsrt.randn(shape, { seed = next_seed, dtype = dtype or "bf16", std = std })
end

local flat = h.flat

-- ---- calling convention ----

test("precision_is_the_last_argument_and_is_checked", function()
  local x = randn({ 3, 5 })
  assert_equal(nn.rms_norm(x, nil, 1e-6, "reference").dtype, "bf16")
  assert_equal(nn.rms_norm(x, nil, 1e-6, "fp32").dtype, "f32")
  assert_error(nn.rms_norm, 'nn.rms_norm: precision %(argument #4%) must be "reference" or "fp32", got "bf16"',
               x, nil, 1e-6, "bf16")
  assert_error(nn.head_rms_norm, "nn.head_rms_norm: precision %(argument #3%).- got no value", x, 1e-6)
  assert_error(nn.hadamard128, "nn.hadamard128: precision %(argument #2%).- got number", randn({ 128 }), 1)
  assert_error(nn.rms_norm, "number expected", x, nil, "eps", "fp32")
  assert_error(nn.rms_norm, "dsrt.tensor expected", { 1, 2 }, nil, 1e-6, "fp32")
end)

test("errors_name_the_function_and_the_shapes", function()
  local x = randn({ 3, 5 })
  assert_error(nn.rms_norm, "nn.rms_norm: weight is f32%[4%] on cpu, expected shape %[5%]", x, dsrt.ones({ 4 }), 1e-6, "fp32")
  assert_error(nn.rms_norm, "nn.rms_norm: x is i64%[2%] on cpu, expected bf16 or f32", dsrt.tensor({ 1, 2 }), nil, 1e-6, "fp32")
  local q, pool, sink = randn({ 2, 3, 8 }), randn({ 5, 8 }), dsrt.zeros({ 3 })
  local idx = dsrt.tensor({ { 0, 1 }, { 4, 7 } })
  assert_error(nn.sparse_attention, "nn.sparse_attention: indices%[1, 1%] = 7 is not a row of pool bf16%[5, 8%] on cpu",
               q, pool, idx, sink, 0.3, "fp32")
  assert_error(nn.sparse_attention, "nn.sparse_attention: pool is bf16%[5, 7%] on cpu, expected shape %[%*, 8%]",
               q, randn({ 5, 7 }), idx, sink, 0.3, "fp32")
  assert_error(nn.sparse_attention, "nn.sparse_attention: indices is f32%[2, 2%] on cpu, expected i32 or i64",
               q, pool, idx:to("f32"), sink, 0.3, "fp32")
  assert_error(nn.rope, "nn.rope: x is bf16%[3, 5%] on cpu, its vectors are narrower than the 64 rotated dims",
               x, dsrt.tensor({ 0, 1, 2 }), 10000, nil, false, "fp32")
  assert_error(nn.rope, "nn.rope: positions is i64%[2%] on cpu, expected shape %[3%]",
               randn({ 3, 64 }), dsrt.tensor({ 0, 1 }), 10000, nil, false, "fp32")
  assert_error(nn.rope, "nn.rope: yarn.beta_slow must be a number, got nil",
               randn({ 3, 64 }), dsrt.tensor({ 0, 1, 2 }), 160000, { factor = 16, original_seq_len = 65536, beta_fast = 32 },
               false, "fp32")
  assert_error(nn.rope, "inverse", randn({ 3, 64 }), dsrt.tensor({ 0, 1, 2 }), 10000, nil, "yes", "fp32")
  assert_error(nn.hadamard128, "nn.hadamard128: x is bf16%[3, 5%] on cpu, expected %[..., 128%]", x, "fp32")
  assert_error(nn.quant_roundtrip_q8, "nn.quant_roundtrip_q8: columns %[2, 7%) are not within the 5 of x bf16%[3, 5%]",
               x, 4, 3, 5, "reference")
  local X = randn({ 2, 4, 6 })
  assert_error(nn.hc_pre, "nn.hc_pre: fn is f32%[24, 20%] on cpu, expected shape %[24, 24%]",
               X, dsrt.zeros({ 24, 20 }), dsrt.ones({ 3 }), dsrt.zeros({ 24 }), 1e-6, 1e-6, 20, "fp32")
  assert_error(nn.hc_pre, "nn.hc_pre: Sinkhorn needs at least 1 iteration, got 0",
               X, dsrt.zeros({ 24, 24 }), dsrt.ones({ 3 }), dsrt.zeros({ 24 }), 1e-6, 1e-6, 0, "fp32")
  assert_error(nn.hc_head, "nn.hc_head: base is f32%[3%] on cpu, expected shape %[4%]",
               X, dsrt.zeros({ 4, 24 }), dsrt.ones({ 1 }), dsrt.zeros({ 3 }), 1e-6, 1e-6, "fp32")
  assert_error(nn.hc_post, "nn.hc_post: comb is f32%[2, 4%] on cpu, expected shape %[2, 4, 4%]",
               randn({ 2, 6 }), X, dsrt.zeros({ 2, 4 }), dsrt.zeros({ 2, 4 }), "fp32")
  assert_error(nn.sinkhorn, "nn.sinkhorn: mixes is f32%[2, 23%] on cpu, expected shape %[%*, 24%]",
               dsrt.zeros({ 2, 23 }), dsrt.ones({ 3 }), dsrt.zeros({ 24 }), 4, 20, 1e-6)
  assert_error(nn.hc_expand, "nn.hc_expand: hc must be at least 1, got 0", randn({ 2, 6 }), 0)
end)

-- ---- norms ----

test("rms_norm_against_plain_lua", function()
  local x, w = randn({ 4, 7 }, "f32"), randn({ 7 }, "bf16")
  local xs, ws = x:totable(), w:totable()
  local want = {}
  for r = 1, 4 do
    local ms = 0
    for j = 1, 7 do ms = ms + xs[r][j] ^ 2 end
    local inv = 1 / math.sqrt(ms / 7 + 1e-6)
    want[r] = {}
    for j = 1, 7 do want[r][j] = xs[r][j] * inv * ws[j] end
  end
  assert_close(nn.rms_norm(x, w, 1e-6, "fp32"):totable(), want, 1e-5)
  local ref = nn.rms_norm(x, w, 1e-6, "reference")
  assert_equal(ref.shape, { 4, 7 })
  assert_close(ref:totable(), want, BF16_TOL)
  -- the per-head norm of a [S, H, d] q keeps its shape; fp32 mode is the unweighted rms_norm
  local q = randn({ 2, 3, 16 })
  local head = nn.head_rms_norm(q, 1e-6, "fp32")
  assert_equal(head.shape, { 2, 3, 16 })
  assert_close(flat(head:totable()), flat(nn.rms_norm(q, nil, 1e-6, "fp32"):totable()), 1e-6)
  assert_equal(nn.head_rms_norm(q, 1e-6, "reference").dtype, "bf16")
end)

-- ---- round trips ----

test("quant_roundtrips_rewrite_in_place", function()
  -- one block of 3 from column 2 (1-based): amax 17 gives s = 1/16; 17·16 = 272 ties to 256
  local x = dsrt.tensor({ { 449, 1, -3.3, 17 } })
  assert(rawequal(nn.quant_roundtrip_q8(x, 4, 2, 3, "fp32"), x), "returns its argument")
  assert_close(x:totable(), { { 449, 1, -3.3, 17 } }, 1e-7) -- fp32: the identity
  nn.quant_roundtrip_q8(x, 4, 2, 3, "reference")
  assert_equal(x:totable(), { { 449, 1, -3.25, 16 } })
  nn.quant_roundtrip_q8(x, 4, 1, 4, "reference")
  assert_equal(x:totable(), { { 448, 1, -3.25, 16 } })
  -- the KV latent's layout on bf16: 448 quantised dims, the 64 rope dims untouched
  local kv = randn({ 3, 512 })
  local before = kv:totable()
  nn.quant_roundtrip_q8(kv, 64, 1, 448, "reference")
  local after = kv:totable()
  for r = 1, 3 do
    for c = 449, 512 do assert_equal(after[r][c], before[r][c]) end
    assert_close(after[r], before[r], 2 ^ -4 * 8) -- e4m3 keeps 3 bits; values up to ~4 here
  end
  -- Q4 with SPEC §3.4's ties (amax 6, s = 1)
  local row = { 6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5 }
  for i = 9, 32 do row[i] = 0 end
  local y = dsrt.tensor({ row }, { dtype = "bf16" })
  assert(rawequal(nn.quant_roundtrip_q4(y, "reference"), y))
  local want = { 6, 0, 1, 1, 2, 2, 4, 4 }
  for i = 9, 32 do want[i] = 0 end
  assert_equal(y:totable(), { want })
end)

-- ---- RoPE ----

test("rope_freqs_and_rotation", function()
  local window, compressed = nn.rope_freqs(10000), nn.rope_freqs(160000, FLASH_YARN)
  assert_equal(window.shape, { 32 })
  assert_equal(window.dtype, "f32")
  local w, c = window:totable(), compressed:totable()
  assert_close(w[2], 7.498942e-01, 1e-6)
  assert_close(c[2], 6.876560e-01, 1e-6)
  assert_close(c[17], 2.265625e-03, 1e-6)
  assert_close(c[32], 5.680529e-07, 1e-6)
  assert_error(nn.rope_freqs, "nn.rope_freqs: YaRN needs factor", 160000,
               { factor = 0, original_seq_len = 65536, beta_fast = 32, beta_slow = 1 })
  -- inverse ∘ forward restores q [S, H, 128] (the indexer's width) and kv [S, 512]
  local pos = dsrt.tensor({ 0, 5, 300, 70000 })
  for _, shape in ipairs({ { 4, 3, 128 }, { 4, 512 } }) do
    local x = randn(shape, "f32")
    local y = nn.rope(x, pos, 160000, FLASH_YARN, false, "fp32")
    assert_equal(y.shape, shape)
    assert(dsrt.max_abs_diff(y, x) > 0.1, "the rope dims rotate")
    local back = nn.rope(y, pos, 160000, FLASH_YARN, true, "fp32")
    assert(dsrt.max_abs_diff(back, x) < 1e-5, "inverse(forward(x)) = x")
    local ref = nn.rope(x:to("bf16"), pos:to("i32"), 160000, FLASH_YARN, nil, "reference")
    assert_equal(ref.dtype, "bf16")
    assert(dsrt.rel_error(ref, y) < BF16_TOL)
  end
  -- position 0 is the identity
  local x = randn({ 1, 64 })
  assert_equal(nn.rope(x, dsrt.tensor({ 0 }), 10000, nil, false, "reference"):totable(), x:totable())
end)

-- ---- Hadamard ----

test("hadamard128_is_orthonormal", function()
  local x = randn({ 5, 128 }, "f32")
  local y = nn.hadamard128(x, "fp32")
  local sum = 0
  for _, v in ipairs(x:totable()[1]) do sum = sum + v end
  assert_close(y:totable()[1][1], sum / math.sqrt(128), 1e-5) -- the first Sylvester row is all ones
  assert(dsrt.max_abs_diff(nn.hadamard128(y, "fp32"), x) < 1e-5, "H·H = I")
  assert_equal(nn.hadamard128(x:to("bf16"), "reference").dtype, "bf16")
end)

-- ---- attention ----

test("sparse_attention_against_plain_lua", function()
  local S, H, D = 2, 2, 5
  local q, pool = randn({ S, H, D }), randn({ 4, D })
  local idx = dsrt.tensor({ { 0, -1, 3 }, { 2, 1, -1 } }, { dtype = "i32" })
  local sink = dsrt.tensor({ 0.5, -2 })
  local scale = 1 / math.sqrt(D)
  local qs, ps, is, ss = q:totable(), pool:totable(), idx:totable(), sink:totable()
  local want = {}
  for t = 1, S do
    want[t] = {}
    for hh = 1, H do
      local scores, m = {}, -math.huge
      for k = 1, 3 do
        local j = is[t][k]
        if j >= 0 then
          local dot = 0
          for c = 1, D do dot = dot + qs[t][hh][c] * ps[j + 1][c] end
          scores[#scores + 1] = { j = j, s = dot * scale }
          m = math.max(m, dot * scale)
        end
      end
      local den, o = math.exp(ss[hh] - m), {}
      for c = 1, D do o[c] = 0 end
      for _, e in ipairs(scores) do
        local p = math.exp(e.s - m)
        den = den + p
        for c = 1, D do o[c] = o[c] + p * ps[e.j + 1][c] end
      end
      for c = 1, D do o[c] = o[c] / den end
      want[t][hh] = o
    end
  end
  local got = nn.sparse_attention(q, pool, idx, sink, scale, "fp32")
  assert_equal(got.shape, { S, H, D })
  assert_close(got:totable(), want, 1e-5)
  local ref = nn.sparse_attention(q, pool, idx:to("i64"), sink, scale, "reference")
  assert_equal(ref.dtype, "bf16")
  assert_close(ref:totable(), want, 2 * BF16_TOL)
  -- a row without a valid index gives zeros
  local none = nn.sparse_attention(q, pool, dsrt.full({ S, 3 }, -1, { dtype = "i64" }), sink, scale, "fp32")
  assert_equal(none:abs():sum():item(), 0)
end)

-- ---- the attention layer's fused passes ----

-- positions first, first + step, ... for S rows, as nn.rope takes them
local progression, norm_rope_by_steps = h.progression, h.norm_rope_by_steps

test("norm_rope_is_the_separate_ops", function()
  local cases = { -- shape, norm, weight dtype, post
    { { 3, 512 }, "rms", "f32", "q8" }, { { 2, 5, 512 }, "head", nil, "none" }, { { 4, 2, 128 }, "none", nil, "hadamard_q4" },
    { { 3, 128 }, "rms", "bf16", "hadamard_q4" }, { { 5, 200 }, "rms", nil, "q8" }, { { 1, 64 }, "head", nil, "q8" },
  }
  for _, c in ipairs(cases) do
    local shape, norm, wdt, post = c[1], c[2], c[3], c[4]
    local w = wdt and randn({ shape[#shape] }, wdt) or nil
    for _, dt in ipairs({ "bf16", "f32" }) do
      local x = randn(shape, dt, 3)
      local before = x:to("f32")
      for _, prec in ipairs({ "reference", "fp32" }) do
        for _, rope in ipairs({ { 10000, nil, 0, 1 }, { 160000, FLASH_YARN, 70001, 4 } }) do
          local theta, yarn, first, step = rope[1], rope[2], rope[3], rope[4]
          local got = nn.norm_rope(x, w, norm, 1e-6, first, step, theta, yarn, post, prec)
          local what = string.format("%s %s %s %s %s", table.concat(shape, "x"), dt, norm, post, prec)
          assert_equal(got.dtype, "f32", what)
          assert_equal(got.shape, shape, what)
          local want = norm_rope_by_steps(x, w, norm, 1e-6, first, step, theta, yarn, post, prec)
          assert_equal(got:totable(), want:totable(), what)
          assert_equal(x:to("f32"):totable(), before:totable(), what .. ": x is left as it was")
          if prec == "reference" then -- the same values as bf16 (bf16-exact in reference precision)
            local got16 = nn.norm_rope(x, w, norm, 1e-6, first, step, theta, yarn, post, prec, "bf16")
            assert_equal(got16.dtype, "bf16", what)
            assert_equal(got16:to("f32"):totable(), want:totable(), what .. " as bf16")
          end
        end
      end
    end
  end
  -- bf16 output only in reference precision (fp32's values are not bf16-exact); dtypes by name
  local x64 = randn({ 2, 64 }, "f32", 4)
  assert_error(nn.norm_rope, "nn.norm_rope: output dtype bf16 %(f32, or bf16 in reference precision%)", x64, nil, "rms", 1e-6,
               0, 1, 10000, nil, "none", "fp32", "bf16")
  assert_error(nn.norm_rope, "invalid option 'f16'", x64, nil, "rms", 1e-6, 0, 1, 10000, nil, "none", "reference", "f16")
  -- the steps happen: a normed and rotated row of a [S, w] x has rms 1 and differs from x's
  local x = randn({ 2, 512 }, "f32", 5)
  local y = nn.norm_rope(x, nil, "rms", 1e-6, 3, 1, 10000, nil, "none", "fp32")
  assert_close((y * y):mean():item(), 1, 1e-5)
  -- reference: the Q8 columns hold e4m3 × 2^k values (e4m3 has 3 mantissa bits), the rope dims bf16
  local q8 = nn.norm_rope(x, nil, "rms", 1e-6, 3, 1, 10000, nil, "q8", "reference")
  for _, v in ipairs(q8:narrow(2, 1, 448):contiguous():view(-1):totable()) do
    if v ~= 0 then
      local m = math.abs(v) / 2 ^ math.floor(math.log(math.abs(v), 2))
      assert_equal(m * 8, math.floor(m * 8), "an e4m3 mantissa")
    end
  end
end)

test("q_kv_norm_is_the_two_ops", function()
  for _, c in ipairs({ { { 3, 1024 }, { 3, 512 }, "f32", "bf16", "q8" }, { { 2, 200 }, { 5, 2, 128 }, nil, nil, "hadamard_q4" } }) do
    local qa, kv = randn(c[1], "bf16", 3), randn(c[2], "bf16", 3)
    local qw = c[3] and randn({ c[1][#c[1]] }, c[3]) or nil
    local kw = c[4] and randn({ c[2][#c[2]] }, c[4]) or nil
    for _, prec in ipairs({ "reference", "fp32" }) do
      local qr, k = nn.q_kv_norm(qa, qw, kv, kw, 1e-6, 70001, 1, 160000, FLASH_YARN, c[5], prec)
      assert_equal(qr.dtype, prec == "reference" and "bf16" or "f32")
      assert_equal(k.dtype, "f32")
      assert_equal(qr:totable(), nn.rms_norm(qa, qw, 1e-6, prec):totable(), prec)
      assert_equal(k:totable(), nn.norm_rope(kv, kw, "rms", 1e-6, 70001, 1, 160000, FLASH_YARN, c[5], prec):totable(), prec)
    end
  end
  local qa, kv = randn({ 2, 64 }), randn({ 2, 64 })
  assert_error(nn.q_kv_norm, "nn.q_kv_norm: q_weight is f32%[32%] on cpu, expected shape %[64%]", qa, dsrt.ones({ 32 }), kv,
               nil, 1e-6, 0, 1, 10000, nil, "q8", "fp32")
  assert_error(nn.q_kv_norm, "nn.q_kv_norm: kv is bf16%[2, 60%] on cpu, expected vectors of a multiple of 8", qa, nil,
               randn({ 2, 60 }), nil, 1e-6, 0, 1, 10000, nil, "q8", "fp32")
end)

test("sparse_attention_inverse_rope_is_the_two_ops", function()
  local S, H, D = 3, 2, 96
  local q, pool = randn({ S, H, D }), randn({ 9, D })
  local idx = dsrt.tensor({ { 0, -1, 3, 8 }, { -1, -1, -1, -1 }, { 5, 1, 2, -1 } })
  local sink = dsrt.tensor({ 0.5, -2 })
  for _, prec in ipairs({ "reference", "fp32" }) do
    for _, rope in ipairs({ { 10000, nil, 0, 1 }, { 160000, FLASH_YARN, 131, 1 } }) do
      local got = nn.sparse_attention_inverse_rope(q, pool, idx, sink, 0.1, rope[3], rope[4], rope[1], rope[2], prec)
      local want = nn.rope(nn.sparse_attention(q, pool, idx, sink, 0.1, prec), progression(S, rope[3], rope[4]), rope[1],
                           rope[2], true, prec)
      assert_equal(got.dtype, prec == "reference" and "bf16" or "f32")
      assert_equal(got:totable(), want:totable(), prec)
    end
  end
end)

test("fused_pass_errors_name_the_problem", function()
  local x = randn({ 3, 512 })
  assert_error(nn.norm_rope, "nn.norm_rope: x is bf16%[3, 100%] on cpu, expected vectors of a multiple of 8 from 64 to 1024",
               randn({ 3, 100 }), nil, "rms", 1e-6, 0, 1, 10000, nil, "none", "fp32")
  assert_error(nn.norm_rope, "nn.norm_rope: x is bf16%[3, 512%] on cpu, the Hadamard rotation takes vectors of 128",
               x, nil, "rms", 1e-6, 0, 1, 10000, nil, "hadamard_q4", "fp32")
  assert_error(nn.norm_rope, "nn.norm_rope: only the RMS norm takes a weight", x, dsrt.ones({ 512 }), "head", 1e-6, 0, 1,
               10000, nil, "none", "fp32")
  assert_error(nn.norm_rope, "nn.norm_rope: weight is f32%[500%] on cpu, expected shape %[512%]", x, dsrt.ones({ 500 }),
               "rms", 1e-6, 0, 1, 10000, nil, "none", "fp32")
  assert_error(nn.norm_rope, "nn.norm_rope: the positions first %+ t·step %(first 1, step %-1, t < 3%) include negative ones",
               x, nil, "rms", 1e-6, 1, -1, 10000, nil, "none", "fp32")
  assert_error(nn.norm_rope, "invalid option 'q4'", x, nil, "rms", 1e-6, 0, 1, 10000, nil, "q4", "fp32")
  assert_error(nn.norm_rope, "invalid option 'layer'", x, nil, "layer", 1e-6, 0, 1, 10000, nil, "none", "fp32")
  assert_error(nn.norm_rope, "nn.norm_rope: theta must be > 1", x, nil, "rms", 1e-6, 0, 1, 1, nil, "none", "fp32")
  assert_error(nn.norm_rope, 'nn.norm_rope: precision %(argument #10%)', x, nil, "rms", 1e-6, 0, 1, 10000, nil, "none")
  local q, pool, sink = randn({ 2, 3, 32 }), randn({ 5, 32 }), dsrt.zeros({ 3 })
  local idx = dsrt.tensor({ { 0, 1 }, { 4, -1 } })
  assert_error(nn.sparse_attention_inverse_rope,
               "nn.sparse_attention_inverse_rope: q is bf16%[2, 3, 32%] on cpu, its vectors are narrower than the 64 rotated dims",
               q, pool, idx, sink, 0.3, 0, 1, 10000, nil, "fp32")
  assert_error(nn.sparse_attention_inverse_rope,
               "nn.sparse_attention_inverse_rope: pool is bf16%[5, 32%] on cpu, expected shape %[%*, 64%]",
               randn({ 2, 3, 64 }), pool, idx, sink, 0.3, 0, 1, 10000, nil, "fp32")
  assert_error(nn.sparse_attention_inverse_rope, "nn.sparse_attention_inverse_rope: the positions",
               randn({ 2, 3, 64 }), randn({ 5, 64 }), idx, sink, 0.3, -5, 1, 10000, nil, "fp32")
end)

-- ---- hyper-connections ----

test("hc_ops_with_a_norm_weight_are_the_ops_then_rms_norm", function()
  -- hc_pre, hc_post_pre and hc_head take the following RMSNorm's weight as an optional last argument
  -- (on CUDA the collapse's kernel normalises its own row): the values are the two calls'
  local T, hc, d = 3, 4, 16
  local X, f = randn({ T, hc, d }), randn({ T, d })
  local fn, hfn = randn({ 24, hc * d }, "f32", 0.1), randn({ hc, hc * d }, "f32", 0.1)
  local scale, base, hscale, hbase = dsrt.ones({ 3 }), dsrt.zeros({ 24 }), dsrt.ones({ 1 }), dsrt.zeros({ hc })
  local w = randn({ d }, "bf16")
  for _, prec in ipairs({ "reference", "fp32" }) do
    local u, p, c = nn.hc_pre(X, fn, scale, base, 1e-6, 1e-5, 20, prec)
    local x, pn, cn = nn.hc_pre(X, fn, scale, base, 1e-6, 1e-5, 20, prec, w)
    assert_equal(x:totable(), nn.rms_norm(u, w, 1e-5, prec):totable())
    assert_equal({ pn:totable(), cn:totable() }, { p:totable(), c:totable() })
    local Xa, ua = nn.hc_post_pre(f, X, p, c, fn, scale, base, 1e-6, 1e-5, 20, prec)
    local Xb, xb = nn.hc_post_pre(f, X, p, c, fn, scale, base, 1e-6, 1e-5, 20, prec, w)
    assert_equal(Xb:totable(), Xa:totable())
    assert_equal(xb:totable(), nn.rms_norm(ua, w, 1e-5, prec):totable())
    local y = nn.hc_head(X, hfn, hscale, hbase, 1e-6, 1e-5, prec)
    assert_equal(nn.hc_head(X, hfn, hscale, hbase, 1e-6, 1e-5, prec, w):totable(), nn.rms_norm(y, w, 1e-5, prec):totable())
  end
  assert_error(nn.hc_pre, "nn.hc_pre: norm weight is bf16%[15%] on cpu, expected shape %[16%]",
               X, fn, scale, base, 1e-6, 1e-5, 20, "fp32", randn({ 15 }, "bf16"))
  assert_error(nn.hc_head, "nn.hc_head: norm weight is bf16%[2, 16%] on cpu, expected shape %[16%]",
               X, hfn, hscale, hbase, 1e-6, 1e-5, "fp32", randn({ 2, 16 }))
end)

test("hc_post_head_is_hc_post_then_hc_head", function()
  -- the last sub-layer's hc_post and the HC head in one call (on CUDA, for one token, one launch):
  -- X' and y are the two calls' values, with the final norm's weight or without
  local T, hc, d = 2, 4, 16
  local X, f = randn({ T, hc, d }), randn({ T, d })
  local post, comb = randn({ T, hc }, "f32"):abs(), randn({ T, hc, hc }, "f32"):abs()
  local hfn, hscale, hbase = randn({ hc, hc * d }, "f32", 0.1), dsrt.ones({ 1 }), randn({ hc }, "f32")
  local w = randn({ d }, "bf16")
  for _, prec in ipairs({ "reference", "fp32" }) do
    for _, nw in ipairs({ false, w }) do
      local Xn, y = nn.hc_post_head(f, X, post, comb, hfn, hscale, hbase, 1e-6, 1e-5, prec, nw or nil)
      local want = nn.hc_post(f, X, post, comb, prec)
      assert_equal(Xn:totable(), want:totable())
      assert_equal({ Xn.dtype, y.dtype, y.shape }, { want.dtype, want.dtype, { T, d } })
      assert_equal(y:totable(), nn.hc_head(want, hfn, hscale, hbase, 1e-6, 1e-5, prec, nw or nil):totable())
    end
  end
  assert_error(nn.hc_post_head, "nn.hc_post_head: fn is f32%[24, 64%] on cpu, expected shape %[4, 64%]",
               f, X, post, comb, randn({ 24, hc * d }, "f32"), hscale, hbase, 1e-6, 1e-5, "fp32")
  assert_error(nn.hc_post_head, "nn.hc_post_head: base is f32%[24%] on cpu, expected shape %[4%]",
               f, X, post, comb, hfn, hscale, dsrt.zeros({ 24 }), 1e-6, 1e-5, "fp32")
  assert_error(nn.hc_post, "nn.hc_post: comb", f, X, post, randn({ T, hc }), "fp32")
end)

test("sinkhorn_and_hc_ops", function()
  local T, hc, d = 3, 4, 6
  local mixes = randn({ T, 24 }, "f32")
  local pre, post, comb = nn.sinkhorn(mixes, dsrt.ones({ 3 }), dsrt.zeros({ 24 }), hc, 20, 1e-6)
  assert_equal({ pre.shape, post.shape, comb.shape }, { { T, hc }, { T, hc }, { T, hc, hc } })
  assert_equal({ pre.dtype, post.dtype, comb.dtype }, { "f32", "f32", "f32" })
  for _, v in ipairs(flat(comb:sum(2):totable())) do assert_close(v, 1, 1e-4) end -- columns
  local X = randn({ T, hc, d })
  local fn = randn({ 24, hc * d }, "f32", 0.1)
  for _, prec in ipairs({ "reference", "fp32" }) do
    local u, p, c = nn.hc_pre(X, fn, dsrt.ones({ 3 }), dsrt.zeros({ 24 }), 1e-6, 1e-6, 20, prec)
    assert_equal(u.shape, { T, d })
    assert_equal(u.dtype, prec == "reference" and "bf16" or "f32")
    assert_equal({ p.dtype, c.dtype }, { "f32", "f32" })
    local Xn = nn.hc_post(randn({ T, d }), X, p, c, prec)
    assert_equal(Xn.shape, { T, hc, d })
    local y = nn.hc_head(X, randn({ hc, hc * d }, "f32", 0.1), dsrt.ones({ 1 }), dsrt.zeros({ hc }), 1e-6, 1e-6, prec)
    assert_equal(y.shape, { T, d })
  end
  -- hc_post with post = 0 and comb = I gives X back; with comb = 0 and post = 1, copies of f
  local eye = dsrt.zeros({ T, hc, hc })
  for t = 1, T do for s = 1, hc do eye[t][s][s] = 1 end end
  local f = randn({ T, d })
  assert_equal(nn.hc_post(f, X, dsrt.zeros({ T, hc }), eye, "reference"):totable(), X:totable())
  assert_equal(nn.hc_post(f, X, dsrt.ones({ T, hc }), dsrt.zeros({ T, hc, hc }), "fp32"):totable(),
               nn.hc_expand(f, hc):to("f32"):totable())
  -- hc_expand keeps the dtype; hc_head of identical streams with equal weights gives the stream
  -- back scaled by hc·(σ(0) + eps)
  local e = randn({ T, d })
  local expanded = nn.hc_expand(e, hc)
  assert_equal(expanded.dtype, "bf16")
  local y = nn.hc_head(expanded, dsrt.zeros({ hc, hc * d }), dsrt.ones({ 1 }), dsrt.zeros({ hc }), 1e-6, 1e-6, "fp32")
  assert_close(y:totable(), (e:to("f32") * (hc * (0.5 + 1e-6))):totable(), 1e-6)
end)

return tests
