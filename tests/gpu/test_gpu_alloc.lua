-- test_gpu_alloc.lua — the caching allocator seen from Lua on a CUDA device: reuse of freed blocks,
-- and a stress loop of random sizes on several streams in which every live tensor must keep its
-- own value (a block handed out twice, or reused while queued work still writes it, shows up as
-- a changed value). Run on the GPU machine: build/dsrt tests/run.lua tests/gpu
local dsrt = require "dsrt"
local h = require "tests.helpers"
local assert_error, assert_equal = h.assert_error, h.assert_equal

local tests, test = h.suite{ gpu = true }

local MiB = 2 ^ 20

test("cache_hits_grow_across_repeated_allocations_of_one_size", function() h.without_gc(function()
  local first = dsrt.empty({ 3 * MiB // 4 + 1 }, { device = "cuda" }) -- a 4 MiB size class
  first:close()
  local m0 = dsrt.memory_stats("cuda")
  for i = 1, 50 do
    local t = dsrt.empty({ 3 * MiB // 4 + 1 }, { device = "cuda" })
    t:fill(i)
    t:close()
  end
  local m1 = dsrt.memory_stats("cuda")
  assert_equal(m1.cache_hits - m0.cache_hits, 50)
  assert_equal(m1.device_mallocs, m0.device_mallocs)
  assert_equal(m1.allocations - m0.allocations, 50)
  assert_equal(m1.allocated, m0.allocated)
  assert_equal(m1.reserved, m0.reserved)
end) end)

test("garbage_collected_tensors_return_to_the_cache", function()
  collectgarbage()
  local m0 = dsrt.memory_stats("cuda")
  for _ = 1, 20 do
    local _ = dsrt.zeros(512, 1024, { device = "cuda" }) -- dropped without close
  end
  collectgarbage()
  collectgarbage()
  local m1 = dsrt.memory_stats("cuda")
  assert_equal(m1.allocated, m0.allocated)
  assert(m1.device_mallocs - m0.device_mallocs <= 20)
  assert(m1.cache_hits - m0.cache_hits >= 0)
end)

test("freed_block_reused_on_another_stream_keeps_results_correct", function()
  local s1, s2 = dsrt.stream("cuda"), dsrt.stream("cuda")
  for round = 1, 5 do
    local m0 = dsrt.memory_stats("cuda")
    local x = dsrt.with_stream(s1, function()
      local t = dsrt.empty({ 16 * MiB }, { device = "cuda" }) -- 64 MiB
      for _ = 1, 100 do t:fill(-1) end -- keeps s1 busy after the free below
      return t
    end)
    x:close()
    local y = dsrt.with_stream(s2, function()
      local t = dsrt.empty({ 16 * MiB }, { device = "cuda" })
      t:fill(round)
      return t
    end)
    local m1 = dsrt.memory_stats("cuda")
    assert(m1.cache_hits >= m0.cache_hits + 1, "the block was reused")
    dsrt.current_stream("cuda"):wait(s2:record())
    assert_equal(y:min():item(), round + 0.0)
    assert_equal(y:max():item(), round + 0.0)
    y:close()
  end
  s1:synchronize()
  s2:synchronize()
end)

test("small_blocks_stay_with_their_stream_unless_memory_is_short", function() h.without_gc(function()
  -- a small block taken by another stream would make it wait for everything its home stream has
  -- queued (alloc.c, MOVE_MIN): each stream keeps its own, and a block moves only under the limit
  local s1, s2 = dsrt.stream("cuda"), dsrt.stream("cuda")
  local function on(s, n, v)
    return dsrt.with_stream(s, function() return dsrt.full({ n }, v, { device = "cuda" }) end)
  end
  local n = 7777 -- a 31232-byte class no other test leaves cached
  on(s1, n, 1):close()
  local m0 = dsrt.memory_stats("cuda")
  local b = on(s2, n, 2)
  local m1 = dsrt.memory_stats("cuda")
  assert_equal(m1.device_mallocs - m0.device_mallocs, 1, "s2 gets a block of its own")
  local a = on(s1, n, 3)
  local m2 = dsrt.memory_stats("cuda")
  assert_equal(m2.device_mallocs, m1.device_mallocs, "s1 reuses its own block")
  assert_equal(m2.cache_hits - m1.cache_hits, 1)
  local main = dsrt.current_stream("cuda")
  main:wait(s1:record())
  main:wait(s2:record())
  assert_equal(a:max():item(), 3.0)
  assert_equal(b:max():item(), 2.0)
  b:close()
  -- under a limit with no room for a fresh block, s1 takes s2's block (ordered after its use)
  dsrt.set_memory_limit(dsrt.memory_stats("cuda").reserved, "cuda")
  local ok, err = pcall(function()
    local m3 = dsrt.memory_stats("cuda")
    local c = on(s1, n, 4)
    local m4 = dsrt.memory_stats("cuda")
    assert_equal(m4.device_mallocs, m3.device_mallocs)
    assert_equal(m4.cache_hits - m3.cache_hits, 1)
    main:wait(s1:record())
    assert_equal(c:min():item(), 4.0)
    c:close()
  end)
  dsrt.set_memory_limit(nil, "cuda")
  assert(ok, err)
  a:close()
  s1:synchronize()
  s2:synchronize()
end) end)

test("stress_random_sizes_on_three_streams", function()
  local streams = { dsrt.stream("cuda"), dsrt.stream("cuda"), dsrt.current_stream("cuda") }
  local dtypes = { "f32", "bf16", "u8", "i64", "i32", "f16" }
  local rng = 12345
  local function random(n) -- a small LCG: the same sequence on every run and machine
    rng = (rng * 1103515245 + 12345) % 2147483648
    return rng % n + 1
  end
  collectgarbage()
  collectgarbage()
  local m0 = dsrt.memory_stats("cuda")
  local live = {}
  local function verify(entry, when)
    dsrt.synchronize("cuda")
    for _, s in ipairs(streams) do s:synchronize() end
    local lo, hi = entry.t:min():item(), entry.t:max():item()
    if lo ~= entry.v or hi ~= entry.v then
      error(string.format("%s: a %s tensor of %d elements filled with %d now holds %s..%s", when, entry.t.dtype,
        entry.t:numel(), entry.v, tostring(lo), tostring(hi)), 0)
    end
  end
  for i = 1, 400 do
    local s = streams[random(3)]
    local dt = dtypes[random(#dtypes)]
    local n = random(8) <= 6 and random(40000) or random(3 * MiB) -- mostly small, some of a few MiB
    local v = random(100)
    local t = dsrt.with_stream(s, function()
      local t = dsrt.empty({ n }, { dtype = dt, device = "cuda" })
      t:fill(v)
      return t
    end)
    live[#live + 1] = { t = t, v = v }
    if #live > 30 or random(3) == 1 then -- free a random live tensor
      local k = random(#live)
      live[k].t:close()
      table.remove(live, k)
    end
    if i % 50 == 0 then verify(live[random(#live)], "iteration " .. i) end
  end
  for _, entry in ipairs(live) do verify(entry, "at the end") end
  for _, entry in ipairs(live) do entry.t:close() end
  for _, s in ipairs(streams) do s:synchronize() end
  collectgarbage() -- the 0-d results of min/max above
  collectgarbage()
  local m1 = dsrt.memory_stats("cuda")
  assert_equal(m1.allocated, m0.allocated)
  assert(m1.cache_hits > m0.cache_hits + 100, "the cache served most requests")
  assert(m1.peak_allocated >= m1.allocated)
  dsrt.empty_cache("cuda")
  local m2 = dsrt.memory_stats("cuda")
  assert_equal(m2.reserved, m2.allocated)
end)

test("stress_under_a_limit_fails_cleanly_and_recovers", function() h.without_gc(function()
  dsrt.empty_cache("cuda")
  local base = dsrt.memory_stats("cuda")
  local limit = base.reserved + 256 * MiB
  dsrt.set_memory_limit(limit, "cuda")
  local ok, err = pcall(function()
    local held, failures = {}, 0
    for i = 1, 200 do
      local size = (i % 7 + 1) * 2 * MiB // 4 -- 2..14 MiB of f32, several size classes
      local okay, t = pcall(dsrt.full, { size }, i, { device = "cuda" })
      if okay then
        held[#held + 1] = { t = t, v = i }
      else
        failures = failures + 1
        assert(tostring(t):find("out of memory", 1, true), tostring(t))
        -- free half of what is held and go on
        for k = #held, 1, -2 do
          held[k].t:close()
          table.remove(held, k)
        end
      end
      assert(dsrt.memory_stats("cuda").reserved <= limit, "reserved stays under the limit")
    end
    assert(failures > 0, "the limit was never reached")
    for _, e in ipairs(held) do
      assert_equal(e.t:min():item(), e.v + 0.0)
      assert_equal(e.t:max():item(), e.v + 0.0)
      e.t:close()
    end
  end)
  dsrt.set_memory_limit(nil, "cuda")
  assert(ok, err)
  local big = dsrt.full({ 128 * MiB }, 2, { device = "cuda" }) -- 512 MiB works again
  assert_equal(big:max():item(), 2.0)
  big:close()
  assert_error(function() return dsrt.set_memory_limit(-1, "cuda") end, "negative")
end) end)

return tests
