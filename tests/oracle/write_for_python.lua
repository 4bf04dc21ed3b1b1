-- write_for_python.lua — the dsrt side of the safetensors interop check:
--
--   build/dsrt tests/oracle/write_for_python.lua FOLDER
--   python3 tests/oracle/safetensors_oracle.py check FOLDER/dsrt_written.safetensors
--
-- Writes FOLDER/dsrt_written.safetensors with dsrt.safetensors.save, holding every dtype dsrt
-- writes (F4 included), a 0-d and a zero-size tensor, a non-contiguous view, names that need JSON
-- escapes, and metadata; and FOLDER/dsrt_written.json with what the Python library must find:
-- each tensor's safetensors dtype, shape and raw bytes (hex), and the metadata.
local dsrt = require "dsrt"
local cjson = require "cjson"

local folder = arg[1]
if not folder then
  io.stderr:write("usage: dsrt tests/oracle/write_for_python.lua FOLDER\n")
  os.exit(2)
end

local FORMAT = { bf16 = "BF16", f16 = "F16", f32 = "F32", i8 = "I8", u8 = "U8", i32 = "I32", i64 = "I64",
                 bool = "BOOL", f8e4m3 = "F8_E4M3", f8e8m0 = "F8_E8M0", fp4e2m1 = "F4" }

local function hex_of(t)
  local bytes = t:contiguous():reshape(t:numel()):bitcast("u8"):totable()
  for i, b in ipairs(bytes) do bytes[i] = string.format("%02x", b) end
  return table.concat(bytes)
end

local grid = dsrt.arange(24, { dtype = "f32" }):view(4, 6) * 0.75 - 3
local tensors = {
  ["bf16"] = grid:to("bf16"),
  ["f16"] = grid:to("f16"),
  ["f32.transposed"] = grid:transpose(1, 2),
  ["f32.scalar"] = dsrt.tensor(-1.25, { dtype = "f32" }),
  ["f32.empty"] = dsrt.zeros({ 2, 0 }, { dtype = "f32" }),
  ["i8"] = dsrt.arange(-20, 20, 3, { dtype = "i8" }),
  ["u8"] = dsrt.arange(0, 256, 17, { dtype = "u8" }),
  ["i32"] = dsrt.tensor({ -2147483648, 2147483647, 0, 7 }, { dtype = "i32" }),
  ["i64"] = dsrt.tensor({ { -(1 << 62), (1 << 53) - 1 }, { -1, 1 << 40 } }, { dtype = "i64" }),
  ["bool"] = dsrt.tensor({ true, false, true }),
  ["f8e4m3"] = grid:to("f8e4m3"),
  ["f8e8m0"] = dsrt.tensor({ 1, 2, 0.5, 2 ^ 100, 2 ^ -100 }, { dtype = "f8e8m0" }),
  ["fp4e2m1"] = dsrt.tensor({ { 0, 0.5, 1, 1.5 }, { 2, 3, -4, -6 } }, { dtype = "fp4e2m1" }),
  ['layers.0."quoted"\\name'] = dsrt.ones(2, { dtype = "bf16" }),
  ["ünïcödé"] = dsrt.ones(1, { dtype = "u8" }),
}
local metadata = { format = "pt", producer = "tests/oracle/write_for_python.lua", ['with "quotes"'] = "line\nbreak" }

dsrt.safetensors.save(folder .. "/dsrt_written.safetensors", tensors, metadata)

local expected = { metadata = metadata, tensors = {} }
for name, t in pairs(tensors) do
  expected.tensors[name] = { dtype = FORMAT[t.dtype], shape = t.shape, hex = hex_of(t) }
end
local f = assert(io.open(folder .. "/dsrt_written.json", "w"))
assert(f:write(cjson.encode(expected), "\n"))
assert(f:close())
print("wrote " .. folder .. "/dsrt_written.safetensors and dsrt_written.json")
