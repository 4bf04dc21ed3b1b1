-- test_ops.lua — arithmetic, comparisons, unary ops, reductions, matmul and the comparison helpers
-- from Lua, checked against the same computations done in plain Lua on totable() values.
local dsrt = require "dsrt"
local h = require "tests.helpers"
local assert_error, assert_close, assert_equal = h.assert_error, h.assert_close, h.assert_equal

local tests = {}
local function test(name, fn) tests[#tests + 1] = { name, fn } end

-- f32 results against double arithmetic: a few roundings of the operands' size
local F32_TOL = 1e-6

-- applies f elementwise over nested tables (broadcasting a number)
local function map2(a, b, f)
  if type(a) ~= "table" and type(b) ~= "table" then return f(a, b) end
  local n = type(a) == "table" and #a or #b
  local out = {}
  for i = 1, n do
    local x = type(a) == "table" and a[#a == 1 and 1 or i] or a
    local y = type(b) == "table" and b[#b == 1 and 1 or i] or b
    out[i] = map2(x, y, f)
  end
  return out
end

local flat = h.flat

-- ---- arithmetic ----

local binary_cases = {
  { "add", function(x, y) return x + y end, function(a, b) return a + b end },
  { "sub", function(x, y) return x - y end, function(a, b) return a - b end },
  { "mul", function(x, y) return x * y end, function(a, b) return a * b end },
  { "div", function(x, y) return x / y end, function(a, b) return a / b end },
  { "pow", function(x, y) return x ^ y end, function(a, b) return a ^ b end },
  { "idiv", function(x, y) return x // y end, function(a, b) return a // b end },
  { "mod", function(x, y) return x % y end, function(a, b) return a % b end },
}

test("float_metamethods_and_methods_broadcast", function()
  local a = dsrt.rand({ 3, 4 }, { seed = 101, low = 0.5, high = 2 })
  local b = dsrt.rand({ 4 }, { seed = 102, low = 0.5, high = 2 })
  local at, bt = a:totable(), b:totable()
  local bt_rows = { bt } -- [4] broadcasts as one row
  for _, case in ipairs(binary_cases) do
    local name, f, op = case[1], case[2], case[3]
    local want = map2(at, bt_rows, f)
    local got = op(a, b)
    assert_equal(got.shape, { 3, 4 })
    assert_equal(got.dtype, "f32")
    assert_close(got:totable(), want, F32_TOL * 4, name)
    assert_close(a[name](a, b):totable(), want, F32_TOL * 4, name .. " method")
  end
end)

test("scalars_on_both_sides", function()
  local a = dsrt.rand({ 5 }, { seed = 103, low = 0.5, high = 3 })
  local at = a:totable()
  for _, case in ipairs(binary_cases) do
    local name, f, op = case[1], case[2], case[3]
    assert_close(op(a, 1.75):totable(), map2(at, 1.75, f), F32_TOL * 4, name .. " tensor-scalar")
    assert_close(op(1.75, a):totable(), map2(1.75, at, f), F32_TOL * 4, name .. " scalar-tensor")
    assert_close(op(a, 2):totable(), map2(at, 2, f), F32_TOL * 4, name .. " tensor-integer")
  end
  assert_close((-a):totable(), map2(at, -1, function(x, y) return x * y end), 0)
end)

test("column_times_row_is_an_outer_product", function()
  local col = dsrt.tensor({ { 1 }, { 2 }, { 3 } }, { dtype = "f32" })
  local row = dsrt.tensor({ 10, 20 }, { dtype = "f32" })
  assert_equal((col * row):totable(), { { 10, 20 }, { 20, 40 }, { 30, 60 } })
  assert_equal((row - col):totable(), { { 9, 19 }, { 8, 18 }, { 7, 17 } })
  local a = dsrt.ones(2, 1, 3)
  local b = dsrt.ones(4, 1)
  assert_equal((a + b).shape, { 2, 4, 3 })
  assert_equal(dsrt.add(a, b).shape, { 2, 4, 3 })
  assert_equal((dsrt.tensor(5.0) + a).shape, { 2, 1, 3 }) -- 0-d broadcasts
end)

test("integer_arithmetic_stays_integer_and_floors_like_lua", function()
  local xs = { 7, -7, 7, -7, 13, -13, 0, 100 }
  local ys = { 2, 2, -2, -2, 5, 5, 3, -7 }
  local x, y = dsrt.tensor(xs), dsrt.tensor(ys)
  for _, case in ipairs(binary_cases) do
    local name, f, op = case[1], case[2], case[3]
    if name ~= "div" and name ~= "pow" then
      local r = op(x, y)
      assert_equal(r.dtype, "i64")
      assert_equal(r:totable(), map2(xs, ys, f), name)
      assert_equal(op(x, 3):totable(), map2(xs, 3, f), name .. " scalar")
      assert_equal(op(-9, y):totable(), map2(-9, ys, f), name .. " scalar first")
    end
  end
  assert_equal((x / y).dtype, "f32")
  assert_equal((x / 2):totable()[1], 3.5)
  assert_equal((x + 0.5).dtype, "f32")
  assert_equal((x + 0.5):totable()[2], -6.5)
  assert_equal((dsrt.tensor({ 5 }) // dsrt.tensor({ 0 })):totable(), { 0 }) -- no trap
  local i32 = dsrt.tensor({ 1, 2 }, { dtype = "i32" })
  assert_equal((i32 + 1).dtype, "i32")
  assert_equal((i32 + dsrt.tensor({ 1, 1 })).dtype, "i64")
  assert_equal((i32 * 1.5).dtype, "f32")
end)

test("mixed_dtypes_promote", function()
  local b = dsrt.tensor({ 1, 2 }, { dtype = "bf16" })
  assert_equal((b + b).dtype, "bf16")
  assert_equal((b * 2).dtype, "bf16")
  assert_equal((b + dsrt.tensor({ 1.0, 2.0 })).dtype, "f32")
  assert_equal((b + dsrt.tensor({ 1, 2 })).dtype, "bf16")
  assert_equal((b + dsrt.tensor({ 1, 2 }, { dtype = "f16" })).dtype, "f32")
  local f8 = dsrt.tensor({ 1, 2 }, { dtype = "f8e4m3" })
  assert_equal((f8 + f8).dtype, "f32")
  assert_equal((f8 + f8):totable(), { 2, 4 })
  -- bf16 arithmetic rounds its result once
  assert_equal((dsrt.tensor({ 1 }, { dtype = "bf16" }) + 2 ^ -8):totable(), { 1.0 })
end)

test("maximum_minimum", function()
  local a = dsrt.tensor({ 1, 5, -2, 0 / 0 })
  local b = dsrt.tensor({ 3, 4, -2, 1 })
  local mx, mn = a:maximum(b):totable(), dsrt.minimum(a, b):totable()
  assert_equal({ mx[1], mx[2], mx[3] }, { 3, 5, -2 })
  assert_equal({ mn[1], mn[2], mn[3] }, { 1, 4, -2 })
  assert(mx[4] ~= mx[4] and mn[4] ~= mn[4], "NaN propagates")
  assert_equal(dsrt.maximum(dsrt.tensor({ 1, 9 }), 4):totable(), { 4, 9 })
end)

-- ---- comparisons ----

test("comparisons_give_bool", function()
  local xs, ys = { 1, 2, 3, 0 / 0 }, { 2, 2, 2, 1 }
  local x = dsrt.tensor(xs)
  local y = dsrt.tensor(ys, { dtype = "f32" })
  local cases = {
    eq = function(p, q) return p == q end, ne = function(p, q) return p ~= q end,
    lt = function(p, q) return p < q end, le = function(p, q) return p <= q end,
    gt = function(p, q) return p > q end, ge = function(p, q) return p >= q end,
  }
  for name, f in pairs(cases) do
    local r = x[name](x, y)
    assert_equal(r.dtype, "bool")
    assert_equal(r:totable(), map2(xs, ys, f), name)
    assert_equal(x[name](x, 2):totable(), map2(xs, 2, f), name .. " scalar")
  end
  -- integers compare exactly, even beyond f32 precision
  local big = dsrt.tensor({ (1 << 40) + 1 })
  assert_equal(big:eq(dsrt.tensor({ 1 << 40 })):totable(), { false })
end)

-- ---- unary ----

local function tanh(x) local e = math.exp(2 * x) return (e - 1) / (e + 1) end
local unary_cases = {
  neg = function(x) return -x end, abs = math.abs, exp = math.exp, log = math.log, sqrt = math.sqrt,
  rsqrt = function(x) return 1 / math.sqrt(x) end, sin = math.sin, cos = math.cos, tanh = tanh,
  sigmoid = function(x) return 1 / (1 + math.exp(-x)) end, silu = function(x) return x / (1 + math.exp(-x)) end,
  relu = function(x) return x > 0 and x or 0.0 end,
}

test("unary_ops_match_lua_math", function()
  local pos = dsrt.rand({ 64 }, { seed = 104, low = 0.01, high = 4 })
  local any = dsrt.randn({ 64 }, { seed = 105, std = 2 })
  for name, f in pairs(unary_cases) do
    local x = (name == "log" or name == "sqrt" or name == "rsqrt") and pos or any
    local got, want = x[name](x), {}
    assert_equal(got.dtype, "f32")
    for i, v in ipairs(x:totable()) do want[i] = f(v) end
    assert_close(got:totable(), want, 4e-6, name)
  end
end)

test("unary_ops_on_integers_and_bf16", function()
  local i = dsrt.tensor({ -3, 0, 4 })
  assert_equal(i:abs():totable(), { 3, 0, 4 })
  assert_equal(i:abs().dtype, "i64")
  assert_equal(i:neg():totable(), { 3, 0, -4 })
  assert_equal(i:relu():totable(), { 0, 0, 4 })
  assert_equal(i:exp().dtype, "f32")
  assert_close(i:exp():totable(), { math.exp(-3), 1, math.exp(4) }, 1e-6)
  local b = dsrt.tensor({ 0.5, 2 }, { dtype = "bf16" })
  assert_equal(b:sqrt().dtype, "bf16")
  assert_close(b:sqrt():totable(), { math.sqrt(0.5), math.sqrt(2) }, 2 ^ -8)
  local n = dsrt.tensor({ -1.0, 0 / 0 }):sqrt():totable()
  assert(n[1] ~= n[1] and n[2] ~= n[2])
end)

-- ---- reductions ----

-- reduces a nested 3-d table along dim (1-based) with f(list) -> value
local function reduce3(t, dim, f)
  local n = { #t, #t[1], #t[1][1] }
  local out = {}
  local other = {}
  for d = 1, 3 do if d ~= dim then other[#other + 1] = d end end
  for i = 1, n[other[1]] do
    out[i] = {}
    for j = 1, n[other[2]] do
      local list = {}
      for k = 1, n[dim] do
        local idx = {}
        idx[dim], idx[other[1]], idx[other[2]] = k, i, j
        list[k] = t[idx[1]][idx[2]][idx[3]]
      end
      out[i][j] = f(list)
    end
  end
  return out
end

local function first_best(better)
  return function(list)
    local best, pos = list[1], 0
    for k = 2, #list do if better(list[k], best) then best, pos = list[k], k - 1 end end
    return pos
  end
end

local reducers = {
  sum = function(l) local s = 0 for _, v in ipairs(l) do s = s + v end return s end,
  mean = function(l) local s = 0 for _, v in ipairs(l) do s = s + v end return s / #l end,
  max = function(l) return math.max(table.unpack(l)) end,
  min = function(l) return math.min(table.unpack(l)) end,
  argmax = first_best(function(a, b) return a > b end),
  argmin = first_best(function(a, b) return a < b end),
}

test("reductions_along_every_dim_with_keepdim", function()
  local x = dsrt.randn({ 3, 4, 5 }, { seed = 106 })
  local xt = x:totable()
  for name, f in pairs(reducers) do
    for dim = 1, 3 do
      local want = reduce3(xt, dim, f)
      local r = x[name](x, dim)
      local shape = { 3, 4, 5 }
      table.remove(shape, dim)
      assert_equal(r.shape, shape, name .. " dim " .. dim)
      if name == "argmax" or name == "argmin" then
        assert_equal(r.dtype, "i64")
        assert_equal(r:totable(), want, name .. " dim " .. dim)
      else
        assert_close(r:totable(), want, F32_TOL * 4, name .. " dim " .. dim)
      end
      local k = x[name](x, dim, true)
      local kshape = { 3, 4, 5 }
      kshape[dim] = 1
      assert_equal(k.shape, kshape, name .. " keepdim " .. dim)
      assert_equal(flat(k:totable()), flat(r:totable()))
    end
  end
end)

test("reductions_of_everything_and_negative_dims", function()
  local x = dsrt.tensor({ { 1, 9, 3 }, { -4, 5, 9 } }, { dtype = "f32" })
  assert_equal(x:sum():item(), 23.0)
  assert_equal(x:sum().shape, {})
  assert_close(x:mean():item(), 23 / 6, 1e-6)
  assert_equal(x:max():item(), 9.0)
  assert_equal(x:min():item(), -4.0)
  assert_equal(x:argmax():item(), 1) -- 0-based flat position, first of the tied maxima
  assert_equal(x:argmin():item(), 3)
  assert_equal(x:sum(-1):totable(), { 13, 10 })
  assert_equal(x:argmax(-1):totable(), { 1, 2 })
  assert_equal(x:argmax(1):totable(), { 0, 0, 1 })
  local i = dsrt.tensor({ { 1, 2 }, { 3, 4 } })
  assert_equal(i:sum(1).dtype, "i64")
  assert_equal(i:sum(1):totable(), { 4, 6 })
  assert_equal(i:mean().dtype, "f32")
  assert_equal(i:max(2):totable(), { 2, 4 })
end)

test("argmax_ties_and_nan", function()
  assert_equal(dsrt.tensor({ 1, 3, 3, 2 }, { dtype = "f32" }):argmax():item(), 1)
  assert_equal(dsrt.tensor({ 2, 1, 1, 2 }):argmin():item(), 1)
  local n = dsrt.tensor({ 1, 0 / 0, 5 })
  assert_equal(n:argmax():item(), 1) -- NaN counts as the maximum, as torch
  local m = n:max():item()
  assert(m ~= m, "max with NaN is NaN")
  local s = n:sum():item()
  assert(s ~= s, "sum with NaN is NaN")
end)

-- ---- matmul ----

local function naive_matmul(a, b)
  local c = {}
  for i = 1, #a do
    c[i] = {}
    for j = 1, #b[1] do
      local s = 0
      for k = 1, #b do s = s + a[i][k] * b[k][j] end
      c[i][j] = s
    end
  end
  return c
end

test("matmul_2d_at_odd_sizes", function()
  for _, size in ipairs({ { 1, 1, 1 }, { 7, 13, 5 }, { 33, 65, 17 } }) do
    local m, k, n = size[1], size[2], size[3]
    local a = dsrt.randn({ m, k }, { seed = 107 + m })
    local b = dsrt.randn({ k, n }, { seed = 108 + n })
    local c = dsrt.matmul(a, b)
    assert_equal(c.shape, { m, n })
    assert_close(c:totable(), naive_matmul(a:totable(), b:totable()), 1e-5, m .. "x" .. k .. "x" .. n)
    assert_close(a:matmul(b):totable(), c:totable(), 0)
  end
end)

test("matmul_1d_operands", function()
  local v = dsrt.tensor({ 1, 2, 3 }, { dtype = "f32" })
  local m = dsrt.tensor({ { 1, 0 }, { 0, 1 }, { 1, 1 } }, { dtype = "f32" })
  local vm = dsrt.matmul(v, m)
  assert_equal(vm.shape, { 2 })
  assert_equal(vm:totable(), { 4, 5 })
  local mv = dsrt.matmul(m.T, v)
  assert_equal(mv.shape, { 2 })
  assert_equal(mv:totable(), { 4, 5 })
  local dot = dsrt.matmul(v, v)
  assert_equal(dot.shape, {})
  assert_equal(dot:item(), 14.0)
end)

test("matmul_batched_and_broadcast", function()
  local a = dsrt.randn({ 2, 1, 3, 4 }, { seed = 109 })
  local b = dsrt.randn({ 5, 4, 2 }, { seed = 110 })
  local c = a:matmul(b)
  assert_equal(c.shape, { 2, 5, 3, 2 })
  for i = 1, 2 do
    for j = 1, 5 do
      assert_close(c[i][j]:totable(), naive_matmul(a[i][1]:totable(), b[j]:totable()), 1e-5)
    end
  end
  local w = dsrt.randn({ 4, 6 }, { seed = 111 }) -- shared by every batch
  local cw = dsrt.matmul(a, w)
  assert_equal(cw.shape, { 2, 1, 3, 6 })
  assert_close(cw[2][1]:totable(), naive_matmul(a[2][1]:totable(), w:totable()), 1e-5)
end)

test("matmul_of_views_and_bf16", function()
  local a = dsrt.randn({ 6, 9 }, { seed = 112 })
  local b = dsrt.randn({ 4, 6 }, { seed = 113 })
  local c = dsrt.matmul(a.T, b.T) -- [9, 6] @ [6, 4], both transposed views
  assert_close(c:totable(), naive_matmul(a.T:totable(), b.T:totable()), 1e-5)
  local ab, bb = a.T:to("bf16"), b.T:to("bf16")
  local cb = dsrt.matmul(ab, bb)
  assert_equal(cb.dtype, "bf16")
  -- the exact product of the bf16 inputs, rounded once to bf16
  local want = dsrt.tensor(naive_matmul(ab:totable(), bb:totable()), { dtype = "f32" }):to("bf16")
  assert(dsrt.max_abs_diff(cb, want) <= 2 ^ -7 * dsrt.max_abs_diff(want, 0), "bf16 matmul")
end)

-- ---- comparison helpers ----

test("allclose_max_abs_diff_rel_error", function()
  local a = dsrt.tensor({ 1, 2, 3, 4 }, { dtype = "f32" })
  local b = dsrt.tensor({ 1, 2, 3, 4.5 }, { dtype = "f32" })
  assert(dsrt.allclose(a, a))
  assert(not dsrt.allclose(a, b))
  assert(dsrt.allclose(a, b, 0.2))
  assert(dsrt.allclose(a, b, 0, 0.5))
  assert_equal(dsrt.max_abs_diff(a, b), 0.5)
  assert_equal(dsrt.max_abs_diff(a, a), 0.0)
  assert_close(dsrt.rel_error(a, b), 0.5 / math.sqrt(1 + 4 + 9 + 4.5 ^ 2), 1e-6)
  assert_equal(dsrt.rel_error(a, a), 0.0)
  assert_equal(dsrt.rel_error(dsrt.zeros(3), dsrt.zeros(3)), 0)
  -- scalars and mixed dtypes
  assert_equal(dsrt.max_abs_diff(a, 2), 2.0)
  assert(dsrt.allclose(a:to("bf16"), a))
  assert(dsrt.allclose(dsrt.tensor({ 1, 2 }), dsrt.tensor({ 1.0, 2.0 })))
end)

test("comparison_helpers_never_pass_nan", function()
  local a = dsrt.tensor({ 1, 0 / 0 })
  local b = dsrt.tensor({ 1, 2 })
  assert(not dsrt.allclose(a, b))
  assert(not dsrt.allclose(a, a), "NaN is not close to NaN")
  local d = dsrt.max_abs_diff(a, b)
  assert(d ~= d, "max_abs_diff with NaN")
  local r = dsrt.rel_error(a, b)
  assert(r ~= r, "rel_error with NaN")
  assert(not (dsrt.rel_error(b, a) <= 1e-5))
  assert(not (dsrt.rel_error(dsrt.tensor({ 1 / 0 }), dsrt.tensor({ 1 / 0 })) <= 1e-5), "inf - inf is NaN")
end)

return tests
