-- test_stream.lua — streams, events and the current stream on the CPU (where work is synchronous
-- but the objects behave as on a GPU), memory statistics and limits, and the CUDA queries on a
-- machine without CUDA.
local dsrt = require "dsrt"
local h = require "tests.helpers"
local assert_error, assert_equal = h.assert_error, h.assert_equal

local tests, test = h.suite()

-- ---- streams and events ----

test("cpu_streams_are_objects", function()
  local s = dsrt.stream("cpu")
  assert_equal(s.device, "cpu")
  assert_equal(tostring(s), "dsrt.stream(cpu)")
  local t = dsrt.stream("cpu")
  assert(not rawequal(s, t), "every dsrt.stream() is a new stream")
  assert_equal(dsrt.current_stream("cpu").device, "cpu")
  assert(rawequal(dsrt.current_stream("cpu"), dsrt.current_stream("cpu")), "the current stream is one object")
  if not dsrt.cuda.available() then
    assert_equal(dsrt.stream().device, "cpu") -- the default device without CUDA
    assert(rawequal(dsrt.current_stream(), dsrt.current_stream("cpu")))
  end
end)

test("record_wait_synchronize_query", function()
  local s = dsrt.stream("cpu")
  local ev = s:record()
  assert_equal(tostring(ev), "dsrt.event(cpu)")
  assert_equal(ev:query(), true) -- CPU work is done when it is recorded
  ev:synchronize()
  local cur = dsrt.current_stream("cpu")
  assert(rawequal(cur:wait(ev), cur), "wait returns its stream")
  s:synchronize()
  dsrt.synchronize("cpu")
  local e2 = dsrt.event("cpu")
  assert_equal(e2:query(), true) -- never recorded: nothing to wait for
  assert(rawequal(s:record(e2), e2), "record into a given event returns it")
  assert(rawequal(e2:record(s), e2))
  e2:record() -- on the current stream
end)

test("event_elapsed_on_cpu", function()
  local s = dsrt.stream("cpu")
  local a, b = dsrt.event("cpu", { timing = true }), dsrt.event("cpu", { timing = true })
  a:record(s)
  local x = dsrt.randn({ 200, 200 }, { seed = 201 })
  local y = x:matmul(x)
  b:record(s)
  local ms = a:elapsed(b)
  assert(type(ms) == "number" and ms >= 0, "elapsed " .. tostring(ms))
  assert(ms < 60000)
  assert(y:numel() == 40000)
  assert(a:elapsed(a) == 0)
  assert_error(function() return dsrt.event("cpu"):elapsed(b) end, "never recorded")
end)

test("ops_run_on_a_set_stream", function()
  local s = dsrt.stream("cpu")
  local previous = dsrt.set_stream(s)
  local ok, err = pcall(function()
    assert(rawequal(dsrt.current_stream("cpu"), s))
    assert_equal((dsrt.ones(3) * 2):sum():item(), 6.0)
  end)
  dsrt.set_stream(previous)
  assert(ok, err)
  assert(rawequal(dsrt.current_stream("cpu"), previous))
end)

test("with_stream_sets_restores_and_passes_results", function()
  local s = dsrt.stream("cpu")
  local before = dsrt.current_stream("cpu")
  local a, b, c = dsrt.with_stream(s, function(x, y)
    assert(rawequal(dsrt.current_stream("cpu"), s), "s is current inside")
    return x + y, nil, (dsrt.ones(2) + 1):sum():item()
  end, 40, 2)
  assert_equal(a, 42)
  assert_equal(b, nil)
  assert_equal(c, 4.0)
  assert(rawequal(dsrt.current_stream("cpu"), before), "restored after")
  assert_equal(select("#", dsrt.with_stream(s, function() return 1, nil, nil end)), 3)
end)

test("with_stream_restores_after_an_error", function()
  local s = dsrt.stream("cpu")
  local before = dsrt.current_stream("cpu")
  local msg = assert_error(function() dsrt.with_stream(s, function() error("boom in stream") end) end, "boom in stream")
  assert(rawequal(dsrt.current_stream("cpu"), before), "restored after an error")
  -- a dsrt error inside passes through too
  assert_error(function() dsrt.with_stream(s, function() return dsrt.ones(2) + dsrt.ones(3) end) end, "add")
  assert(rawequal(dsrt.current_stream("cpu"), before))
  -- non-string error values pass through unchanged
  local value = {}
  local ok, err = pcall(dsrt.with_stream, s, function() error(value) end)
  assert(not ok and rawequal(err, value))
  assert(msg)
end)

test("with_stream_nests", function()
  local s1, s2 = dsrt.stream("cpu"), dsrt.stream("cpu")
  local before = dsrt.current_stream("cpu")
  dsrt.with_stream(s1, function()
    dsrt.with_stream(s2, function() assert(rawequal(dsrt.current_stream("cpu"), s2)) end)
    assert(rawequal(dsrt.current_stream("cpu"), s1))
    pcall(dsrt.with_stream, s2, function() error("x") end)
    assert(rawequal(dsrt.current_stream("cpu"), s1))
  end)
  assert(rawequal(dsrt.current_stream("cpu"), before))
end)

test("close_a_stream_with_a_to_be_closed_variable", function()
  local kept
  do
    local s <close> = dsrt.stream("cpu")
    kept = s
    s:synchronize()
  end
  assert_equal(tostring(kept), "dsrt.stream(closed)")
  assert_error(function() kept:synchronize() end, "closed")
  do
    local e <close> = dsrt.event("cpu")
    kept = e
  end
  assert_equal(tostring(kept), "dsrt.event(closed)")
  assert_error(function() kept:query() end, "closed")
end)

test("a_closed_current_stream_falls_back_to_the_default", function()
  local before = dsrt.current_stream("cpu")
  local s = dsrt.stream("cpu")
  dsrt.set_stream(s)
  s:close()
  assert_equal((dsrt.ones(2) + 1):sum():item(), 4.0) -- ops still run
  local now = dsrt.current_stream("cpu")
  assert_equal(tostring(now), "dsrt.stream(cpu)")
  dsrt.set_stream(before)
end)

test("the_default_stream_cannot_be_closed", function()
  local d = dsrt.current_stream("cpu")
  d:close()
  assert_equal(tostring(dsrt.current_stream("cpu")), "dsrt.stream(cpu)")
  d:synchronize()
  assert_equal(dsrt.ones(2):sum():item(), 2.0)
end)

-- ---- memory ----

test("memory_stats_fields_and_accounting", function() h.without_gc(function()
  local m = dsrt.memory_stats("cpu")
  for _, k in ipairs({ "allocated", "reserved", "peak_allocated", "limit", "allocations", "cache_hits", "device_mallocs" }) do
    assert(math.type(m[k]) == "integer", k)
  end
  assert_equal(m.device, "cpu")
  local t = dsrt.empty(1000, 1000)
  local m2 = dsrt.memory_stats("cpu")
  assert(m2.allocated >= m.allocated + 4e6, "allocated grows")
  assert_equal(m2.allocations, m.allocations + 1)
  assert(m2.peak_allocated >= m2.allocated)
  t:close()
  local m3 = dsrt.memory_stats("cpu")
  assert_equal(m3.allocated, m.allocated)
  assert(m3.peak_allocated >= m2.allocated)
end) end)

test("cpu_memory_limit_raises_out_of_memory_and_recovers", function() h.without_gc(function()
  local base = dsrt.memory_stats("cpu").allocated
  dsrt.set_memory_limit(base + 2 ^ 20, "cpu")
  local ok, err = pcall(function()
    assert_equal(dsrt.memory_stats("cpu").limit, base + 2 ^ 20)
    local small = dsrt.zeros(1000) -- fits
    assert_error(function() return dsrt.zeros(1024, 1024) end, "out of memory")
    assert_error(function() return small + dsrt.ones(512, 1024) end, "out of memory")
    assert_equal(small:sum():item(), 0.0) -- the state is usable
    assert_equal((small + 1):sum():item(), 1000.0)
  end)
  dsrt.set_memory_limit(nil, "cpu")
  assert(ok, err)
  assert_equal(dsrt.memory_stats("cpu").limit, 0)
  assert_equal(dsrt.zeros(1024, 1024):sum():item(), 0.0)
end) end)

test("empty_cache_on_cpu_is_harmless", function()
  dsrt.empty_cache("cpu")
  assert_equal(dsrt.ones(3):sum():item(), 3.0)
end)

-- ---- CUDA on a machine without it ----

test("cuda_is_not_available_here", function()
  if dsrt.cuda.device_count() > 0 then return end -- a GPU machine: tests/gpu covers it
  assert_equal(dsrt.cuda.available(), false)
  assert_equal(dsrt.cuda.device_count(), 0)
  assert_error(function() return dsrt.zeros(2, { device = "cuda" }) end, "cuda:0.*not available")
  assert_error(function() return dsrt.zeros(2, { device = 0 }) end, "cuda:0.*not available") -- a bare N is cuda:N
  assert_error(function() return dsrt.zeros(2, { device = "cuda:1" }) end, "cuda:1")
  assert_error(function() return dsrt.tensor({ 1, 2 }, { device = "cuda" }) end, "not available")
  assert_error(function() return dsrt.ones(2):to("cuda") end, "not available")
  assert_error(function() return dsrt.ones(2):cuda() end, "not available")
  assert_error(function() return dsrt.stream("cuda") end, "not available")
  assert_error(function() return dsrt.memory_stats("cuda") end, "not available")
  assert_error(function() return dsrt.cuda.device_info(0) end)
  assert_error(function() return dsrt.cuda.profiler(true, "cpu") end, "not a CUDA device")
  assert_error(function() return dsrt.cuda.profiler("on") end, "boolean expected")
  assert_equal(dsrt.ones(2):sum():item(), 2.0)
end)

test("module_fields", function()
  assert(type(dsrt.version) == "string" and dsrt.version:match("^%d+%.%d+%.%d+"), "version")
  for _, name in ipairs({ "tensor", "zeros", "ones", "full", "empty", "arange", "rand", "randn", "manual_seed",
                          "matmul", "stream", "event", "current_stream", "set_stream", "with_stream", "synchronize",
                          "memory_stats", "set_memory_limit", "empty_cache", "allclose", "max_abs_diff",
                          "rel_error", "is_tensor" }) do
    assert(type(dsrt[name]) == "function", "dsrt." .. name)
  end
  assert(type(dsrt.cuda.available) == "function" and type(dsrt.cuda.device_count) == "function")
end)

return tests
