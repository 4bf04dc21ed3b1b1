-- test_errors.lua — every bad input raises a Lua error (never a crash) whose message names the op
-- and the shapes or dtypes involved, and the state stays usable afterwards.
--
-- Each case is {name, function that must fail, plain substrings the message must contain}; after
-- each failure the test runs a few valid ops to show the state still works.
local dsrt = require "dsrt"

local tests = {}

local function still_usable()
  local t = dsrt.tensor({ { 1, 2 }, { 3, 4 } }, { dtype = "f32" })
  local r = (t + 1):matmul(t):sum():item()
  assert(r == 74.0, "the state is not usable after the error: got " .. tostring(r))
  local m = dsrt.memory_stats("cpu")
  assert(m.limit == 0, "a limit was left behind")
end

local function case(name, fn, ...)
  local needles = { ... }
  tests[#tests + 1] = { name, function()
    local ok, err = pcall(fn)
    assert(not ok, "expected an error, got success")
    local msg = tostring(err)
    for _, needle in ipairs(needles) do
      if not msg:find(needle, 1, true) then
        error(string.format("message %q does not contain %q", msg, needle), 0)
      end
    end
    still_usable()
  end }
end

local a23 = function() return dsrt.ones(2, 3) end

-- shapes
case("add_of_shapes_that_do_not_broadcast", function() return a23() + dsrt.ones(3, 2) end,
  "add", "[2, 3]", "[3, 2]")
case("mul_method_of_shapes_that_do_not_broadcast", function() return a23():mul(dsrt.ones(4)) end,
  "mul", "[2, 3]", "[4]")
case("maximum_of_shapes_that_do_not_broadcast", function() return dsrt.maximum(a23(), dsrt.ones(5, 1, 2)) end,
  "maximum", "[2, 3]", "[5, 1, 2]")
case("comparison_of_shapes_that_do_not_broadcast", function() return a23():lt(dsrt.ones(2, 2)) end,
  "lt", "[2, 3]", "[2, 2]")
case("matmul_inner_dimensions_differ", function() return dsrt.matmul(a23(), a23()) end,
  "matmul", "[2, 3]", "inner")
case("matmul_batch_dimensions_differ", function() return dsrt.ones(2, 3, 4):matmul(dsrt.ones(3, 4, 5)) end,
  "matmul", "[2, 3, 4]", "[3, 4, 5]")
case("matmul_of_a_0d_tensor", function() return dsrt.matmul(dsrt.tensor(1.0), dsrt.ones(2)) end, "matmul")
case("copy_of_a_shape_that_does_not_broadcast", function() return a23():copy(dsrt.ones(4)) end,
  "copy", "[2, 3]", "[4]")
case("row_assignment_of_the_wrong_length", function() local t = a23() t[1] = dsrt.ones(4) end, "[4]")
case("expand_to_an_incompatible_shape", function() return a23():expand(4, 4) end, "expand", "[2, 3]", "[4, 4]")

-- dtypes
case("matmul_of_i64", function() return dsrt.matmul(dsrt.ones(2, 3, { dtype = "i64" }), dsrt.ones(3, 2, { dtype = "i64" })) end,
  "matmul", "i64")
case("matmul_of_mixed_dtypes", function() return dsrt.matmul(dsrt.ones(2, 3, { dtype = "bf16" }), dsrt.ones(3, 2)) end,
  "matmul", "bf16", "f32")
case("unknown_dtype_name_in_options", function() return dsrt.zeros({ 2 }, { dtype = "f64" }) end, "unknown dtype", "f64")
case("unknown_dtype_name_in_to", function() return a23():to("float64") end, "float64")
case("dtype_that_is_not_a_string", function() return dsrt.zeros({ 2 }, { dtype = 5 }) end, "dtype")
case("rand_of_an_integer_dtype", function() return dsrt.rand(3, { dtype = "i64" }) end, "rand", "i64")

-- devices
case("unknown_device_name", function() return dsrt.zeros({ 2 }, { device = "tpu" }) end, "unknown device", "tpu")
case("unknown_device_in_to", function() return a23():to("gpu:0") end, "gpu:0")
case("device_index_out_of_range", function() return dsrt.zeros({ 2 }, { device = "cuda:15" }) end, "cuda:15")
case("stream_on_an_unknown_device", function() return dsrt.stream("xpu") end, "unknown device", "xpu")
case("negative_device_number", function() return dsrt.zeros({ 2 }, { device = -1 }) end, "unknown device", "-1")
-- options of the wrong type: the message names the option (not a stack slot like "bad argument #-1")
case("device_option_that_is_not_a_string_or_number", function() return dsrt.zeros({ 2 }, { device = true }) end, "device")
case("dtype_option_that_is_a_boolean", function() return dsrt.zeros({ 2 }, { dtype = true }) end, "dtype")
case("seed_option_that_is_a_string", function() return dsrt.rand({ 2 }, { seed = "x" }) end, "seed")
case("stream_option_that_is_not_a_stream", function() return dsrt.ones(2):to({ stream = 1 }) end, "stream")

-- dimensions and indices
case("reduction_dim_out_of_range", function() return a23():sum(3) end, "dimension 3", "[2, 3]")
case("reduction_dim_zero", function() return a23():max(0) end, "dimension 0", "[2, 3]")
case("transpose_dim_out_of_range", function() return a23():transpose(1, 3) end, "dimension 3", "[2, 3]")
case("narrow_dim_out_of_range", function() return a23():narrow(3, 1, 1) end, "dimension 3", "[2, 3]")
case("narrow_past_the_end", function() return a23():narrow(2, 3, 2) end, "narrow", "[2, 3]")
case("permute_dim_out_of_range", function() return a23():permute(1, 3) end, "permute", "3")
case("permute_repeats_a_dim", function() return a23():permute(2, 2) end, "permute", "twice")
case("permute_wrong_count", function() return a23():permute(1) end, "permute", "2-d")
case("unsqueeze_dim_out_of_range", function() return a23():unsqueeze(5) end, "unsqueeze", "5")
case("squeeze_dim_out_of_range", function() return a23():squeeze(3) end, "dimension 3", "[2, 3]")
case("size_dim_out_of_range", function() return a23():size(4) end, "dimension 4", "[2, 3]")
case("row_index_past_the_end", function() return a23()[3] end, "index 3", "[2, 3]")
case("row_index_zero", function() return a23()[0] end, "index 0", "[2, 3]")
case("negative_row_index_past_the_start", function() return a23()[-3] end, "out of range", "[2, 3]")
case("select_index_out_of_range", function() return a23():select(2, 4) end, "index 4", "dimension 2", "[2, 3]")
case("assignment_to_a_row_out_of_range", function() local t = a23() t[5] = 1 end, "index 5", "[2, 3]")
case("index_of_a_0d_tensor", function() return dsrt.tensor(1.0)[1] end, "0-d")
case("length_of_a_0d_tensor", function() return #dsrt.tensor(1.0) end, "0-d")
case("assignment_to_a_field", function() local t = a23() t.shape = { 3, 2 } end, "read-only")

-- shapes given by the caller
case("view_with_the_wrong_element_count", function() return a23():view(4, 2) end, "view", "[2, 3]", "[4, 2]")
case("view_of_an_incompatible_layout", function() return a23().T:view(6) end, "view", "[3, 2]", "reshape")
case("view_with_two_inferred_dims", function() return dsrt.ones(4, 6):view(-1, -1) end, "view", "-1")
case("reshape_with_the_wrong_element_count", function() return a23():reshape(7) end, "reshape", "[2, 3]", "[7]")
case("negative_size", function() return dsrt.zeros(2, -1) end, "negative", "-1")
case("too_many_dimensions", function() return dsrt.zeros(1, 1, 1, 1, 1, 1, 1, 1, 1) end, "8")
case("non_integer_shape", function() return dsrt.zeros({ 2.5 }) end, "integer")
case("arange_with_zero_step", function() return dsrt.arange(0, 1, 0) end, "arange")
case("arange_without_numbers", function() return dsrt.arange() end, "arange")
case("item_of_a_multi_element_tensor", function() return a23():item() end, "item", "[2, 3]", "6")
case("item_of_an_empty_tensor", function() return dsrt.zeros(0):item() end, "item", "0")
case("max_of_an_empty_dim", function() return dsrt.zeros(3, 0):max(2) end, "max", "empty", "[3, 0]")

-- data from Lua
case("ragged_nested_table", function() return dsrt.tensor({ { 1, 2 }, { 3 } }) end, "ragged")
case("ragged_number_where_a_row_belongs", function() return dsrt.tensor({ { 1, 2 }, 3 }) end, "ragged")
case("ragged_row_where_a_number_belongs", function() return dsrt.tensor({ 1, { 2 } }) end, "ragged")
case("string_element", function() return dsrt.tensor({ 1, "2" }) end, "string")
case("booleans_mixed_with_numbers", function() return dsrt.tensor({ true, 1 }) end, "booleans")
case("nil_data", function() return dsrt.tensor(nil) end, "tensor")
case("string_operand", function() return a23() + "x" end, "add", "string")
case("table_operand", function() return a23() * {} end, "mul", "table")
case("negative_memory_limit", function() return dsrt.set_memory_limit(-1, "cpu") end, "negative")

-- closed objects
local function closed() local t = dsrt.ones(3) t:close() return t end
case("closed_tensor_method", function() return closed():sum() end, "closed")
case("closed_tensor_left_operand", function() return closed() + 1 end, "closed")
case("closed_tensor_right_operand", function() return 1 + closed() end, "closed")
case("closed_tensor_both_operands", function() return closed() * closed() end, "closed")
case("closed_tensor_field", function() return closed().shape end, "closed")
case("closed_tensor_as_an_argument", function() return dsrt.ones(3):add(closed()) end, "closed")
case("closed_tensor_in_matmul", function() return dsrt.matmul(dsrt.ones(3), closed()) end, "closed")
case("closed_tensor_as_copy_source", function() return dsrt.ones(3):copy(closed()) end, "closed")
case("closed_tensor_row_assignment", function() local t = closed() t[1] = 2 end, "closed")
case("closed_tensor_assigned_to_a_row", function() local t = dsrt.ones(2, 3) t[1] = closed() end, "closed")
case("closed_stream", function() local s = dsrt.stream("cpu") s:close() return s:record() end, "closed")
case("closed_stream_in_with_stream", function()
  local s = dsrt.stream("cpu")
  s:close()
  return dsrt.with_stream(s, function() end)
end, "closed")
case("closed_event", function() local e = dsrt.event("cpu") e:close() return e:query() end, "closed")

-- streams and events
case("wait_on_something_that_is_not_an_event", function() return dsrt.stream("cpu"):wait(1) end, "event")
case("elapsed_of_unrecorded_events", function() return dsrt.event("cpu"):elapsed(dsrt.event("cpu")) end,
  "elapsed", "recorded")

-- the memory limit (restored inside, so that still_usable sees no limit)
case("over_the_cpu_memory_limit", function()
  collectgarbage()
  local base = dsrt.memory_stats("cpu").allocated
  dsrt.set_memory_limit(base + 4096, "cpu")
  local ok, err = pcall(dsrt.zeros, 4096)
  dsrt.set_memory_limit(nil, "cpu")
  if not ok then error(err, 0) end
end, "out of memory", "cpu", "limit")

return tests
