-- test_embedding.lua — dsrt.embedding(weight, ids [, dtype [, copies]]), the embedding gather of SPEC §4 step 1
-- on the CPU: rows equal the weight's rows (raw bits for equal dtypes, numeric.h conversions for
-- others), any ids shape, i32/i64/Lua-array ids, strided weights, and clear errors. The CUDA kernel
-- is compared with this loop in tests/gpu/test_gpu_model.lua.
local dsrt = require "dsrt"
local h = require "tests.helpers"
local assert_equal, assert_error = h.assert_equal, h.assert_error

local tests, test = h.suite()

-- row i of `rows` equals `weight`[ids[i] + 1] converted to rows' dtype, bit for bit
local function assert_rows(rows, weight, ids)
  for i, id in ipairs(ids) do
    local want = weight[id + 1]:to(rows.dtype):contiguous():bitcast("u8")
    local got = rows[i]:bitcast("u8")
    assert_equal(got:ne(want):sum():item(), 0, "row " .. i .. " (id " .. id .. ")")
  end
end

test("rows_are_the_weights_rows_in_every_dtype", function()
  local w = dsrt.randn({37, 19}, { seed = 3 })
  local ids = { 0, 36, 5, 5, 17 }
  for _, wd in ipairs({ "f32", "bf16", "f16", "f8e4m3" }) do
    local weight = w:to(wd)
    for _, od in ipairs({ "f32", "bf16", "f16" }) do
      local rows = dsrt.embedding(weight, ids, od)
      assert_equal({ rows.dtype, rows.shape, rows.device }, { od, { 5, 19 }, "cpu" }, wd .. " -> " .. od)
      assert_rows(rows, weight, ids)
    end
  end
  -- default dtype: the weight's when it is f32/bf16/f16, else f32
  assert_equal(dsrt.embedding(w:to("bf16"), { 1 }).dtype, "bf16")
  assert_equal(dsrt.embedding(w:to("f8e4m3"), { 1 }).dtype, "f32")
end)

test("ids_as_tensors_of_any_shape_and_strided_weights", function()
  local w = dsrt.randn({50, 24}, { seed = 4 }):to("bf16")
  local ids = dsrt.tensor({ { 1, 2, 3 }, { 49, 0, 7 } }, { dtype = "i32" })
  local rows = dsrt.embedding(w, ids)
  assert_equal(rows.shape, { 2, 3, 24 })
  assert_rows(rows:view(6, 24), w, { 1, 2, 3, 49, 0, 7 })
  assert_rows(dsrt.embedding(w, ids:to("i64"):view(6)), w, { 1, 2, 3, 49, 0, 7 })
  -- a transposed weight and a column slice
  local wt = dsrt.randn({24, 50}, { seed = 5 }):to("bf16"):transpose(1, 2)
  assert_rows(dsrt.embedding(wt, { 4, 0, 49 }, "f32"), wt, { 4, 0, 49 })
  local narrow = w:narrow(2, 3, 17)
  assert_rows(dsrt.embedding(narrow, { 9, 8 }), narrow, { 9, 8 })
  -- non-contiguous ids
  local strided = dsrt.tensor({ 5, 99, 6, 99, 7 }, { dtype = "i64" }):narrow(1, 1, 5):view(5)
  assert_equal(dsrt.embedding(w, strided:narrow(1, 1, 1)).shape, { 1, 24 })
  -- no ids: no rows
  assert_equal(dsrt.embedding(w, dsrt.empty({ 0 }, { dtype = "i64" })).shape, { 0, 24 })
end)

test("copies_repeat_each_row_as_the_residual_streams", function()
  local w = dsrt.randn({ 20, 10 }, { seed = 7 })
  for _, wd in ipairs({ "f32", "bf16", "f8e4m3" }) do
    local weight = w:to(wd)
    for _, od in ipairs({ "f32", "bf16" }) do
      local rows = dsrt.embedding(weight, { 3, 19, 0 }, od, 4)
      assert_equal(rows.shape, { 3, 4, 10 }, wd .. " -> " .. od)
      for c = 1, 4 do assert_rows(rows:narrow(2, c, 1):view(3, 10), weight, { 3, 19, 0 }) end
      -- the same tensor nn.hc_expand makes from the plain gather
      local plain = dsrt.embedding(weight, { 3, 19, 0 }, od)
      assert_equal(rows:bitcast("u8"):ne(require("dsrt.core").nn.hc_expand(plain, 4):bitcast("u8")):sum():item(), 0)
    end
  end
  assert_equal(dsrt.embedding(w, dsrt.tensor({ { 1, 2 } }), nil, 1).shape, { 1, 2, 1, 10 })
  assert_equal(dsrt.embedding(w, dsrt.empty({ 0 }, { dtype = "i64" }), "f32", 3).shape, { 0, 3, 10 })
  assert_error(dsrt.embedding, "embedding: copies must be a positive integer, got 0", w, { 1 }, "f32", 0)
  assert_error(dsrt.embedding, "copies must be a positive integer, got %-2", w, { 1 }, nil, -2)
  assert_error(dsrt.embedding, "number has no integer representation", w, { 1 }, nil, 1.5)
end)

test("nan_payloads_move_unchanged_for_equal_dtypes", function()
  -- little-endian bf16 codes 0x7fa1 (a signalling NaN), 0x3f80 (1), 0xffc3 (a negative NaN), 0xffff
  local bytes = { { 0xa1, 0x7f, 0x80, 0x3f }, { 0xc3, 0xff, 0xff, 0xff } }
  local w = dsrt.tensor(bytes, { dtype = "u8" }):bitcast("bf16")
  local rows = dsrt.embedding(w, { 1, 0 })
  assert_equal(rows:bitcast("u8"):totable(), { bytes[2], bytes[1] })
end)

test("errors_name_the_op_the_id_and_the_shapes", function()
  local w = dsrt.randn({10, 8}, { seed = 1 }):to("bf16")
  assert_error(dsrt.embedding, "embedding: ids%[2%] = 10 is outside the 10 rows of the weight bf16%[10, 8%]", w, { 1, 10 })
  assert_error(dsrt.embedding, "ids%[1%] = %-1 is outside", w, dsrt.tensor({ -1 }))
  assert_error(dsrt.embedding, "ids%[1%] is number, not an integer", w, { 1.5 })
  assert_error(dsrt.embedding, "ids must be a tensor or a Lua array", w, "1")
  assert_error(dsrt.embedding, "ids must be i32 or i64, got f32%[1%]", w, dsrt.tensor({ 1.0 }))
  assert_error(dsrt.embedding, "2%-D float tensor %(not fp4%), got fp4e2m1", w:to("fp4e2m1"), { 1 })
  assert_error(dsrt.embedding, "2%-D float tensor", w[1], { 1 })
  assert_error(dsrt.embedding, "2%-D float tensor", w:to("i32"), { 1 })
  assert_error(dsrt.embedding, "output dtype must be f32, bf16 or f16, got i32", w, { 1 }, "i32")
  assert_error(dsrt.embedding, "unknown dtype 'cuda'", w, { 1 }, "cuda")
end)

-- The decoder's embedding (dsrt.dsv4.model's decoder.embed) is this gather in the activation dtype, and
-- forward's logits option ("last", "none") gives the last row of "all" or nothing.
test("the_decoder_embeds_through_the_gather_and_forward_can_skip_logits", function()
  local decoder = require "dsrt.dsv4.model"
  local w = dsrt.randn({ 30, 12 }, { seed = 6 }):to("bf16")
  assert_equal(decoder.embed(w, { 4, 29 }, "fp32").dtype, "f32")
  assert_rows(decoder.embed(w, dsrt.tensor({ 4, 29 }), "reference"), w, { 4, 29 })
  assert_equal(decoder.embed(w, { 4, 29 }, "reference", 3).shape, { 2, 3, 12 })
  if require("dsrt.core").attention == nil then return end
  local model = require("dsrt.dsv4").load(h.make_tiny_model(3), { precision = "fp32", mtp = true })
  local ids = { 5, 6, 7, 8, 9 }
  local all = model:forward(model:session{ max_len = 8 }, ids)
  local last = model:forward(model:session{ max_len = 8 }, ids, { logits = "last" })
  assert_equal(last.shape, { 1, all.shape[2] })
  assert_equal(dsrt.max_abs_diff(last, all:narrow(1, 5, 1)), 0.0)
  local seq = model:session{ max_len = 8 }
  assert_equal(model:forward(seq, ids, { logits = "none" }), nil)
  assert_equal(seq:length(), 5)
  assert_error(function() model:forward(seq, { 1 }, { logits = "first" }) end, 'logits must be "all", "last" or "none"')
end)

return tests
