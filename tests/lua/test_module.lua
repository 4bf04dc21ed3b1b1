-- test_module.lua — dsrt as a C module of a stock lua5.4: `require "dsrt"` finds lua/dsrt/init.lua
-- on package.path and the bindings in build*/lua/dsrt/core.so on package.cpath. Run with
--   LUA_PATH='lua/?.lua;lua/?/init.lua;;' LUA_CPATH='build-cpu/lua/?.so;;' lua5.4 tests/run.lua tests/lua/test_module.lua
-- (it passes under the dsrt program too, where dsrt.core is built in).
local dsrt = require "dsrt"

local tests = {}
local function test(name, fn) tests[#tests + 1] = { name, fn } end

test("module_loads_with_its_core", function()
  assert(type(dsrt) == "table")
  assert(package.loaded["dsrt.core"], "dsrt.core is loaded")
  assert(type(dsrt.version) == "string" and dsrt.version ~= "")
  assert(dsrt.version == require("dsrt.core").version)
  assert(type(dsrt.cuda.available()) == "boolean")
  assert(math.type(dsrt.cuda.device_count()) == "integer")
end)

test("makes_a_tensor_and_reads_it_back", function()
  local t = dsrt.tensor({ { 1, 2 }, { 3, 4 } }, { dtype = "f32", device = "cpu" })
  assert(t.shape[1] == 2 and t.shape[2] == 2)
  assert(t.dtype == "f32" and t.device == "cpu" and t:numel() == 4)
  assert(t:totable()[2][1] == 3.0)
  assert(tostring(t):find("^tensor%(%[%[1%., 2%.%],"))
end)

test("matmul", function()
  local t = dsrt.tensor({ { 1, 2 }, { 3, 4 } }, { dtype = "f32" })
  local c = dsrt.matmul(t, t:transpose(1, 2))
  local v = c:totable()
  assert(v[1][1] == 5 and v[1][2] == 11 and v[2][1] == 11 and v[2][2] == 25)
  local r = dsrt.randn({ 16, 8 }, { seed = 301 })
  assert(dsrt.allclose(r:matmul(dsrt.ones(8, 1)):flatten(), r:sum(2), 1e-5, 1e-5))
end)

test("streams_and_events_exist", function()
  local s = dsrt.stream("cpu")
  local ev = s:record()
  dsrt.current_stream("cpu"):wait(ev)
  s:synchronize()
  assert(ev:query() == true)
  local got = dsrt.with_stream(s, function() return (dsrt.ones(3) * 2):sum():item() end)
  assert(got == 6.0)
  assert(type(dsrt.memory_stats("cpu").allocated) == "number")
end)

test("errors_are_lua_errors", function()
  local ok, err = pcall(function() return dsrt.ones(2, 3) + dsrt.ones(3, 2) end)
  assert(not ok and tostring(err):find("add", 1, true), tostring(err))
  assert(dsrt.ones(2):sum():item() == 2.0)
end)

return tests
