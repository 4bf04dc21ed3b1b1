-- test_tensor.lua — tensors from Lua: creation, random numbers, conversion, reading values,
-- printing, views (1-based dims) and in-place writes. Run by tests/run.lua.
local dsrt = require "dsrt"
local h = require "tests.helpers"
local assert_error, assert_close, assert_equal = h.assert_error, h.assert_close, h.assert_equal

local tests, test = h.suite()

-- ---- creation ----

test("tensor_from_nested_integers_is_i64", function()
  local t = dsrt.tensor({ { 1, 2, 3 }, { 4, 5, 6 } })
  assert_equal(t.dtype, "i64")
  assert_equal(t.device, "cpu")
  assert_equal(t.shape, { 2, 3 })
  assert_equal(t:numel(), 6)
  assert_equal(t:dim(), 2)
  assert_equal(t.ndim, 2)
  assert_equal(t:totable(), { { 1, 2, 3 }, { 4, 5, 6 } })
  assert(math.type(t:totable()[2][3]) == "integer")
end)

test("tensor_with_any_float_is_f32", function()
  local t = dsrt.tensor({ { 1, 2 }, { 3, 4.5 } })
  assert_equal(t.dtype, "f32")
  assert_equal(t:totable(), { { 1.0, 2.0 }, { 3.0, 4.5 } })
  assert(math.type(t:totable()[1][1]) == "float")
end)

test("tensor_of_booleans_is_bool", function()
  local t = dsrt.tensor({ true, false, true })
  assert_equal(t.dtype, "bool")
  assert_equal(t:totable(), { true, false, true })
end)

test("tensor_with_explicit_dtype_converts", function()
  local t = dsrt.tensor({ 1.7, -2.7, 300 }, { dtype = "i32" })
  assert_equal(t.dtype, "i32")
  assert_equal(t:totable(), { 1, -2, 300 })
  local b = dsrt.tensor({ 1, 2, 3 }, { dtype = "bf16", device = "cpu" })
  assert_equal(b.dtype, "bf16")
  assert_equal(b:totable(), { 1.0, 2.0, 3.0 })
  local u = dsrt.tensor({ 0, 1, 2 }, { dtype = "bool" })
  assert_equal(u:totable(), { false, true, true })
  assert_equal(dsrt.tensor({ 1 }, { dtype = "bfloat16" }).dtype, "bf16") -- torch spelling
end)

test("tensor_from_a_number_is_0d", function()
  local t = dsrt.tensor(2.5)
  assert_equal(t.shape, {})
  assert_equal(t:dim(), 0)
  assert_equal(t:item(), 2.5)
  assert_equal(dsrt.tensor(7):item(), 7)
  assert_equal(dsrt.tensor(7).dtype, "i64")
  assert_equal(dsrt.tensor(true):item(), true)
end)

test("tensor_of_three_levels", function()
  local t = dsrt.tensor({ { { 1, 2 }, { 3, 4 }, { 5, 6 } }, { { 7, 8 }, { 9, 10 }, { 11, 12 } } })
  assert_equal(t.shape, { 2, 3, 2 })
  assert_equal(t[2][3][1]:item(), 11)
  local e = dsrt.tensor({})
  assert_equal(e.shape, { 0 })
  assert_equal(e:numel(), 0)
end)

test("zeros_ones_full_with_shapes_as_table_or_numbers", function()
  local z = dsrt.zeros({ 2, 3 })
  assert_equal(z.shape, { 2, 3 })
  assert_equal(z.dtype, "f32")
  assert_equal(z:totable(), { { 0, 0, 0 }, { 0, 0, 0 } })
  local o = dsrt.ones(2, 2, { dtype = "i64" })
  assert_equal(o.dtype, "i64")
  assert_equal(o:totable(), { { 1, 1 }, { 1, 1 } })
  local f = dsrt.full({ 3 }, -1.25, { dtype = "bf16" })
  assert_equal(f.dtype, "bf16")
  assert_equal(f:totable(), { -1.25, -1.25, -1.25 })
  local f2 = dsrt.full({ 2 }, 7, { dtype = "u8" })
  assert_equal(f2:totable(), { 7, 7 })
  local s = dsrt.zeros({})
  assert_equal(s.shape, {})
  assert_equal(s:item(), 0.0)
  local n = dsrt.full({ 2 }, 0 / 0)
  local v = n:totable()[1]
  assert(v ~= v, "full with NaN")
end)

test("empty_has_the_shape_and_dtype", function()
  local e = dsrt.empty({ 4, 5 }, { dtype = "f16" })
  assert_equal(e.shape, { 4, 5 })
  assert_equal(e.dtype, "f16")
  assert_equal(e:nbytes(), 40)
  assert_equal(dsrt.empty(3, 0):numel(), 0)
end)

test("arange_forms_and_dtypes", function()
  local a = dsrt.arange(5)
  assert_equal(a.dtype, "i64")
  assert_equal(a:totable(), { 0, 1, 2, 3, 4 })
  assert_equal(dsrt.arange(2, 5):totable(), { 2, 3, 4 })
  assert_equal(dsrt.arange(5, 0, -2):totable(), { 5, 3, 1 })
  local f = dsrt.arange(1, 2, 0.25)
  assert_equal(f.dtype, "f32")
  assert_equal(f:totable(), { 1, 1.25, 1.5, 1.75 })
  assert_equal(dsrt.arange(0, 1, 0.1):numel(), 10)
  assert_equal(dsrt.arange(3, { dtype = "f32" }):totable(), { 0.0, 1.0, 2.0 })
  assert_equal(dsrt.arange(4, 2):numel(), 0)
end)

-- ---- random numbers ----

test("rand_same_seed_same_values_other_seed_other_values", function()
  local a = dsrt.rand({ 100 }, { seed = 11 }):totable()
  local b = dsrt.rand({ 100 }, { seed = 11 }):totable()
  local c = dsrt.rand({ 100 }, { seed = 12 }):totable()
  assert_equal(a, b)
  local same = 0
  for i = 1, 100 do
    assert(a[i] >= 0 and a[i] < 1, "rand in [0, 1)")
    if a[i] == c[i] then same = same + 1 end
  end
  assert(same < 3, "different seeds gave equal values")
end)

test("rand_low_high_and_randn_mean_std", function()
  local r = dsrt.rand({ 20000 }, { seed = 21, low = -3, high = 5 })
  assert(r:min():item() >= -3 and r:max():item() < 5)
  assert_close(r:mean():item(), 1.0, 0.05)
  local n = dsrt.randn({ 20000 }, { seed = 22, mean = 2, std = 3 })
  assert_close(n:mean():item(), 2.0, 0.1)
  local sd = math.sqrt(((n - 2) ^ 2):mean():item())
  assert_close(sd, 3.0, 0.1)
end)

test("randn_deterministic_and_dtype", function()
  local a = dsrt.randn({ 3, 4 }, { seed = 31, dtype = "bf16" })
  assert_equal(a.dtype, "bf16")
  assert_equal(a:totable(), dsrt.randn({ 3, 4 }, { seed = 31, dtype = "bf16" }):totable())
  -- the bf16 values are the f32 draws rounded once
  assert_equal(a:totable(), dsrt.randn({ 3, 4 }, { seed = 31 }):to("bf16"):totable())
end)

test("global_generator_advances_and_manual_seed_restarts_it", function()
  dsrt.manual_seed(41)
  local a = dsrt.rand({ 6 }):totable()
  local b = dsrt.rand({ 6 }):totable()
  assert(a[1] ~= b[1] or a[2] ~= b[2], "two draws without a seed gave the same values")
  dsrt.manual_seed(41)
  assert_equal(dsrt.rand({ 6 }):totable(), a)
  assert_equal(dsrt.rand({ 6 }):totable(), b)
  -- the global stream is the seeded one continued: draw 2 is elements 7..12 of a seeded draw
  local all = dsrt.rand({ 12 }, { seed = 41 }):totable()
  for i = 1, 6 do
    assert_equal(a[i], all[i])
    assert_equal(b[i], all[6 + i])
  end
  -- randn shares the generator
  dsrt.manual_seed(42)
  local n1 = dsrt.randn({ 4 }):totable()
  dsrt.manual_seed(42)
  assert_equal(dsrt.randn({ 4 }):totable(), n1)
end)

-- ---- conversions ----

test("to_bf16_rounds_to_nearest_even", function()
  local fmax = 3.4028234663852886e38 -- the largest f32: past the last bf16 midpoint
  local t = dsrt.tensor({ 1 + 2 ^ -8, 1 + 3 * 2 ^ -8, 1 + 2 ^ -8 + 2 ^ -20, -(1 + 2 ^ -8), fmax, 2 ^ 127 * (1 + 2 ^ -8) })
  local b = t:to("bf16")
  assert_equal(b.dtype, "bf16")
  local v = b:totable()
  assert_equal(v[1], 1.0)
  assert_equal(v[2], 1 + 2 ^ -6)
  assert_equal(v[3], 1 + 2 ^ -7)
  assert_equal(v[4], -1.0)
  assert_equal(v[5], math.huge)
  assert_equal(v[6], 2.0 ^ 127)
  assert_equal(b:to("f32"):totable()[2], 1 + 2 ^ -6)
end)

test("to_f16_ties_and_overflow", function()
  local v = dsrt.tensor({ 65504, 65519, 65520, 2 ^ -24, 2 ^ -25, 3 * 2 ^ -25, 1 + 2 ^ -11 }):to("f16"):totable()
  assert_equal(v[1], 65504.0)
  assert_equal(v[2], 65504.0)
  assert_equal(v[3], math.huge)
  assert_equal(v[4], 2 ^ -24)
  assert_equal(v[5], 0.0)
  assert_equal(v[6], 2 ^ -23)
  assert_equal(v[7], 1.0)
end)

test("to_f8e4m3_saturation_rule_and_e8m0", function()
  local v = dsrt.tensor({ 448, 464, 470, 1.0625, 2 ^ -10, -0.3 }):to("f8e4m3"):totable()
  assert_equal(v[1], 448.0)
  assert_equal(v[2], 448.0)
  assert(v[3] ~= v[3], "above 464 becomes NaN")
  assert_equal(v[4], 1.0)
  assert_equal(v[5], 0.0)
  assert_equal(v[6], -0.3125)
  local e = dsrt.tensor({ 1, 0.25, 1024, 3 }):to("f8e8m0"):totable()
  assert_equal(e, { 1.0, 0.25, 1024.0, 4.0 })
end)

test("to_fp4_rounds_to_even_code_and_saturates", function()
  local v = dsrt.tensor({ 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 7, -7, 0 / 0, 1 / 0 }):to("fp4e2m1")
  assert_equal(v.dtype, "fp4e2m1")
  assert_equal(v:totable(), { 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -6.0, 0.0, 6.0 })
  assert_equal(v:nbytes(), 6)
end)

test("to_integer_truncates_and_wraps", function()
  local t = dsrt.tensor({ 2.9, -2.9, 300, -129 })
  assert_equal(t:to("i64"):totable(), { 2, -2, 300, -129 })
  assert_equal(t:to("i8"):totable(), { 2, -2, 44, 127 })
  assert_equal(t:to("u8"):totable(), { 2, 254, 44, 127 })
  assert_equal(t:to("bool"):totable(), { true, true, true, true })
  assert_equal(dsrt.tensor({ 0.0, 0.5 }):to("bool"):totable(), { false, true })
  local i = dsrt.tensor({ (1 << 32) + 1, -5 }) -- i64 to i32 wraps
  assert_equal(i:to("i32"):totable(), { 1, -5 })
  assert_equal(dsrt.tensor({ (1 << 53) + 1 }):totable(), { (1 << 53) + 1 }) -- i64 keeps every bit
end)

test("to_same_dtype_and_device_forms", function()
  local t = dsrt.tensor({ 1.5, 2.5 })
  assert_equal(t:to("cpu").dtype, "f32")
  assert_equal(t:to("cpu", "bf16").dtype, "bf16")
  assert_equal(t:to({ dtype = "f16" }).dtype, "f16")
  assert_equal(t:to({ device = "cpu", dtype = "i32" }):totable(), { 1, 2 })
  assert_equal(t:cpu():totable(), { 1.5, 2.5 })
  assert_equal(t:to("float32").dtype, "f32")
end)

test("item_and_totable", function()
  local t = dsrt.tensor({ { 1.5, 2.5 }, { 3.5, 4.5 } })
  assert_equal(t[2][1]:item(), 3.5)
  assert_equal(t:sum():item(), 12.0)
  assert_equal(t:narrow(2, 2, 1):totable(), { { 2.5 }, { 4.5 } })
  assert_equal(dsrt.tensor({ 1, 2 }, { dtype = "i32" }):sum():item(), 3)
  assert_equal(dsrt.tensor({ false }):item(), false)
  assert_equal(dsrt.zeros(2, 0):totable(), { {}, {} })
end)

-- ---- printing ----

test("print_2x2_f32", function()
  assert_equal(tostring(dsrt.tensor({ { 1, 2 }, { 3, 4 } }, { dtype = "f32" })),
    "tensor([[1., 2.],\n        [3., 4.]], dtype=f32, device=cpu)")
  assert_equal(tostring(dsrt.tensor({ { 1.5, -2 }, { 3, 4.25 } })),
    "tensor([[ 1.5000, -2.0000],\n        [ 3.0000,  4.2500]], dtype=f32, device=cpu)")
end)

test("print_i64_bool_0d_empty", function()
  assert_equal(tostring(dsrt.tensor({ 1, -20, 300 })), "tensor([  1, -20, 300], dtype=i64, device=cpu)")
  assert_equal(tostring(dsrt.tensor({ true, false })), "tensor([ true, false], dtype=bool, device=cpu)")
  assert_equal(tostring(dsrt.tensor(2.5)), "tensor(2.5000, dtype=f32, device=cpu)")
  assert_equal(tostring(dsrt.tensor(7)), "tensor(7, dtype=i64, device=cpu)")
  assert_equal(tostring(dsrt.zeros(2, 0, 3)), "tensor([], size=[2, 0, 3], dtype=f32, device=cpu)")
  assert_equal(tostring(dsrt.tensor({ 1 / 0, -1 / 0, 0 / 0, 2 })),
    "tensor([ inf, -inf,  nan,   2.], dtype=f32, device=cpu)")
  assert_equal(tostring(dsrt.tensor({ 1e-5, 1 })), "tensor([1.0000e-05, 1.0000e+00], dtype=f32, device=cpu)")
end)

test("print_large_tensor_summarises", function()
  assert_equal(tostring(dsrt.arange(2000)),
    "tensor([   0,    1,    2, ..., 1997, 1998, 1999], dtype=i64, device=cpu)")
  local s = tostring(dsrt.arange(2000):view(20, 100))
  assert(s:find("...,\n", 1, true), "rows are summarised")
  assert(s:find("[1900, 1901, 1902, ..., 1997, 1998, 1999]]", 1, true), s)
  local lines = 0
  for _ in s:gmatch("\n") do lines = lines + 1 end
  assert_equal(lines, 6)
  -- small tensors are printed whole
  assert(not tostring(dsrt.arange(1000)):find("...", 1, true))
end)

test("print_views_3d_and_closed", function()
  local t = dsrt.arange(6):view(2, 3)
  assert_equal(tostring(t.T), "tensor([[0, 3],\n        [1, 4],\n        [2, 5]], dtype=i64, device=cpu)")
  assert_equal(tostring(dsrt.arange(8):view(2, 2, 2)),
    "tensor([[[0, 1],\n         [2, 3]],\n\n        [[4, 5],\n         [6, 7]]], dtype=i64, device=cpu)")
  assert_equal(tostring(dsrt.tensor({ 1, 2 }, { dtype = "bf16" })), "tensor([1., 2.], dtype=bf16, device=cpu)")
  local c = dsrt.ones(2)
  c:close()
  assert_equal(tostring(c), "tensor(closed)")
end)

-- ---- views ----

test("narrow_is_1_based_and_shares_storage", function()
  local t = dsrt.arange(12):view(3, 4)
  local n = t:narrow(2, 2, 2)
  assert_equal(n.shape, { 3, 2 })
  assert_equal(n:totable(), { { 1, 2 }, { 5, 6 }, { 9, 10 } })
  assert_equal(n:stride(), { 4, 1 })
  assert(not n:is_contiguous())
  n:fill(-1)
  assert_equal(t[1]:totable(), { 0, -1, -1, 3 }) -- a view: the write shows in t
  assert_equal(t:narrow(1, 3, 1):totable(), { { 8, -1, -1, 11 } })
  assert_equal(t:narrow(-1, 4, 1).shape, { 3, 1 }) -- negative dims count from the end
end)

test("select_and_index_rows", function()
  local t = dsrt.arange(12):view(3, 4)
  assert_equal(t:select(1, 2):totable(), { 4, 5, 6, 7 })
  assert_equal(t:select(2, 4):totable(), { 3, 7, 11 })
  assert_equal(t[3]:totable(), { 8, 9, 10, 11 })
  assert_equal(t[-1]:totable(), { 8, 9, 10, 11 })
  assert_equal(t[2][3]:item(), 6)
  assert_equal(t[2][3].shape, {})
  assert_equal(#t, 3)
  assert_equal(t:select(-1, -1):totable(), { 3, 7, 11 })
end)

test("transpose_permute_and_T", function()
  local t = dsrt.arange(24):view(2, 3, 4)
  local tr = t:transpose(1, 3)
  assert_equal(tr.shape, { 4, 3, 2 })
  assert_equal(tr:stride(), { 1, 4, 12 })
  assert_equal(tr[4][2][2]:item(), 12 + 4 + 3)
  local p = t:permute(3, 1, 2)
  assert_equal(p.shape, { 4, 2, 3 })
  assert_equal(p[2][2][3]:item(), 12 + 8 + 1)
  assert_equal(t:permute({ 3, 1, 2 }).shape, { 4, 2, 3 })
  local m = dsrt.arange(6):view(2, 3)
  assert_equal(m.T:totable(), { { 0, 3 }, { 1, 4 }, { 2, 5 } })
  assert_equal(m:transpose():totable(), m.T:totable())
  assert_equal(m.T.T:totable(), m:totable())
end)

test("T_reverses_all_dims", function()
  local t = dsrt.arange(24):view(2, 3, 4)
  assert_equal(t.T.shape, { 4, 3, 2 })
  assert_equal(t.T:stride(), { 1, 4, 12 })
  assert_equal(t.T[4][3][2]:item(), t[2][3][4]:item())
  assert_equal(dsrt.arange(5).T:totable(), { 0, 1, 2, 3, 4 })
  assert_equal(dsrt.tensor(3).T:item(), 3)
end)

test("view_reshape_flatten_contiguous", function()
  local t = dsrt.arange(24):view(2, 3, 4)
  assert_equal(t:view(6, 4).shape, { 6, 4 })
  assert_equal(t:view({ -1, 8 }).shape, { 3, 8 })
  assert_equal(t:view(4, -1, 2).shape, { 4, 3, 2 })
  local tr = t:transpose(2, 3) -- [2, 4, 3]
  local r = tr:reshape(2, 12)
  assert_equal(r.shape, { 2, 12 })
  assert_equal(r[1]:totable(), { 0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11 })
  local f = tr:flatten()
  assert_equal(f.shape, { 24 })
  assert_equal(f[13]:item(), 12)
  local c = tr:contiguous()
  assert(c:is_contiguous() and not tr:is_contiguous())
  assert_equal(c:totable(), tr:totable())
  assert_equal(c:stride(), { 12, 3, 1 })
  -- reshape of a contiguous tensor is a view
  local v = t:reshape(24)
  v[1] = 100
  assert_equal(t[1][1][1]:item(), 100)
end)

test("expand_unsqueeze_squeeze", function()
  local col = dsrt.tensor({ { 1 }, { 2 }, { 3 } })
  local e = col:expand(2, 3, 4)
  assert_equal(e.shape, { 2, 3, 4 })
  assert_equal(e:stride(), { 0, 1, 0 })
  assert_equal(e[2][3]:totable(), { 3, 3, 3, 3 })
  assert_equal(col:expand(-1, 2):totable(), { { 1, 1 }, { 2, 2 }, { 3, 3 } })
  local t = dsrt.arange(6):view(2, 3)
  assert_equal(t:unsqueeze(1).shape, { 1, 2, 3 })
  assert_equal(t:unsqueeze(2).shape, { 2, 1, 3 })
  assert_equal(t:unsqueeze(3).shape, { 2, 3, 1 })
  assert_equal(t:unsqueeze(-1).shape, { 2, 3, 1 })
  assert_equal(t:unsqueeze(2):totable(), { { { 0, 1, 2 } }, { { 3, 4, 5 } } })
  local s = dsrt.zeros(1, 3, 1, 2)
  assert_equal(s:squeeze().shape, { 3, 2 })
  assert_equal(s:squeeze(3).shape, { 1, 3, 2 })
  assert_equal(s:squeeze(2).shape, { 1, 3, 1, 2 }) -- a dim that is not 1 stays
  assert_equal(dsrt.ones(1):squeeze().shape, {})
end)

test("size_stride_nbytes", function()
  local t = dsrt.zeros(2, 3, 5, { dtype = "bf16" })
  assert_equal(t:size(), { 2, 3, 5 })
  assert_equal(t:size(2), 3)
  assert_equal(t:size(-1), 5)
  assert_equal(t:stride(), { 15, 5, 1 })
  assert_equal(t:stride(1), 15)
  assert_equal(t:nbytes(), 60)
  assert_equal(dsrt.zeros(7, { dtype = "fp4e2m1" }):nbytes(), 4)
  assert(dsrt.is_tensor(t) and not dsrt.is_tensor({}) and not dsrt.is_tensor(1))
  local closed = dsrt.ones(1)
  closed:close()
  assert(dsrt.is_tensor(closed), "a closed tensor is still a tensor")
end)

test("fp4_views_at_odd_offsets", function()
  local v = { 0.5, -1, 1.5, 2, -3, 4, 6, -0.5, 1 }
  local t = dsrt.tensor(v, { dtype = "fp4e2m1" })
  assert_equal(t:nbytes(), 5)
  local n = t:narrow(1, 4, 5)
  assert(not n:is_contiguous())
  assert_equal(n:totable(), { 2, -3, 4, 6, -0.5 })
  assert_equal(n:contiguous():totable(), { 2, -3, 4, 6, -0.5 })
  assert_equal(n:to("f32"):totable(), { 2, -3, 4, 6, -0.5 })
  n[2] = 1.5
  assert_equal(t:totable(), { 0.5, -1, 1.5, 2, 1.5, 4, 6, -0.5, 1 })
end)

-- ---- writes ----

test("clone_is_a_deep_copy", function()
  local t = dsrt.rand({ 3, 4 }, { seed = 51 })
  local c = t:clone()
  assert_equal(c:totable(), t:totable())
  c:fill(0)
  assert(t:sum():item() > 0, "the original did not change")
  local tc = t.T:clone()
  assert(tc:is_contiguous())
  assert_equal(tc:totable(), t.T:totable())
end)

test("copy_broadcasts_and_converts", function()
  local dst = dsrt.zeros(2, 3, { dtype = "i32" })
  local r = dst:copy(dsrt.tensor({ 1.9, -2.9, 3 }))
  assert(rawequal(r, dst), "copy returns its destination")
  assert_equal(dst:totable(), { { 1, -2, 3 }, { 1, -2, 3 } })
  local b = dsrt.zeros(3, { dtype = "bf16" })
  b:copy(dsrt.tensor({ 1 + 2 ^ -8, 2, 3 }))
  assert_equal(b:totable(), { 1.0, 2.0, 3.0 })
  local t = dsrt.zeros(3, 2)
  t.T:copy(dsrt.tensor({ { 1, 2, 3 }, { 4, 5, 6 } }, { dtype = "f32" }))
  assert_equal(t:totable(), { { 1, 4 }, { 2, 5 }, { 3, 6 } })
end)

test("fill_and_row_assignment", function()
  local t = dsrt.zeros(3, 2)
  assert(rawequal(t:fill(1.5), t))
  assert_equal(t:sum():item(), 9.0)
  t[2] = 7
  t[3] = dsrt.tensor({ 8, 9 })
  t[-3] = dsrt.tensor({ { 5 } }):squeeze() -- a 0-d source broadcasts over the row
  assert_equal(t:totable(), { { 5, 5 }, { 7, 7 }, { 8, 9 } })
  local v = dsrt.zeros(4, { dtype = "i64" })
  v[2] = 3
  v[4] = -1
  assert_equal(v:totable(), { 0, 3, 0, -1 })
end)

test("close_releases_memory_now", function() h.without_gc(function()
  local before = dsrt.memory_stats("cpu").allocated
  local t = dsrt.zeros(1024, 1024)
  assert(dsrt.memory_stats("cpu").allocated >= before + 4 * 2 ^ 20)
  t:close()
  assert_equal(dsrt.memory_stats("cpu").allocated, before)
  assert_error(function() t:close() end, "closed") -- like a closed Lua file: an error, not a crash
  do
    local u <close> = dsrt.zeros(1024, 1024)
    assert(dsrt.memory_stats("cpu").allocated >= before + 4 * 2 ^ 20)
  end
  assert_equal(dsrt.memory_stats("cpu").allocated, before)
  do
    local w <close> = dsrt.zeros(16)
    w:close() -- closed early: leaving the scope closes nothing twice
  end
end) end)

test("a_view_keeps_the_storage_alive", function()
  local t = dsrt.arange(10)
  local v = t:narrow(1, 3, 4)
  t:close()
  collectgarbage()
  assert_equal(v:totable(), { 2, 3, 4, 5 })
end)

test("bitcast_reads_packed_fp4_like_the_checkpoint", function()
  -- I8 [out, in/2]: the low nibble is the even column (SPEC 2.1)
  local packed = dsrt.tensor({ { 0x21, 0x9f }, { 0x70, 0x07 } }, { dtype = "u8" }):bitcast("i8")
  local fp4 = packed:bitcast("fp4e2m1")
  assert_equal(fp4.shape, { 2, 4 })
  assert_equal(fp4:to("f32"):totable(), { { 0.5, 1, -6, -0.5 }, { 0, 6, 6, 0 } })
  assert_equal(fp4:bitcast("u8"):totable(), { { 0x21, 0x9f }, { 0x70, 0x07 } })
  assert_equal(dsrt.tensor({ 1.0, -2.0 }):bitcast("i32"):totable(), { 1065353216, -1073741824 })
  assert_equal(dsrt.tensor({ 1.0 }):bitcast("bf16"):totable(), { 0, 1 })
  assert_error(function() return packed:transpose(1, 2):bitcast("fp4e2m1") end, "bitcast: .*contiguous")
  assert_error(function() return dsrt.zeros({ 3 }, { dtype = "bf16" }):bitcast("f32") end, "bitcast")
end)

test("empty_tensors_are_contiguous_and_huge_empty_shapes_are_refused", function()
  assert_equal(dsrt.zeros({ 2, 0, 3 }):is_contiguous(), true)
  assert_equal(dsrt.zeros({ 2, 0, 3 }):transpose(1, 3):contiguous():is_contiguous(), true)
  assert_error(function() return dsrt.empty({ 0, 1 << 40, 1 << 40 }) end, "shape too large")
end)

return tests
