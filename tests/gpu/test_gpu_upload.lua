-- test_gpu_upload.lua — dsrt.upload: many host tensors onto the GPU through the pinned staging
-- buffers, bit-exact, including tensors larger than one staging buffer (64 MiB), views that are not
-- contiguous, fp4 and empty tensors. Run on the GPU machine: build/dsrt tests/run.lua tests/gpu
local dsrt = require "dsrt"
local h = require "tests.helpers"
local assert_equal, assert_error = h.assert_equal, h.assert_error

local tests, test = h.suite{ gpu = true }

-- every byte of b equals a's (compared as raw bytes, so NaN payloads count too)
local function same_bytes(a, b)
  local ua, ub = a:contiguous():flatten(), b:contiguous():flatten()
  if a.dtype ~= "fp4e2m1" then
    ua, ub = ua:bitcast("u8"), ub:bitcast("u8")
  end
  assert_equal(ua:to("cpu"):ne(ub:to("cpu")):sum():item(), 0)
end

test("uploads_are_bit_exact_across_chunk_boundaries", function()
  local big = dsrt.randn({ 5, 4 * 1024 * 1024 }, { seed = 11 })          -- 80 MiB: two staging chunks
  local strided = dsrt.randn({ 300, 70 }, { seed = 12 }):transpose(1, 2) -- not contiguous
  local packed = dsrt.rand({ 7, 33 }, { seed = 13, low = -6, high = 6 }):to("fp4e2m1")
  local e4m3 = dsrt.randn({ 129, 257 }, { seed = 14 }):to("f8e4m3")
  local ids = dsrt.arange(1000):view(10, 100)
  local empty = dsrt.empty({ 0, 5 })
  local src = { big, strided, packed, e4m3, ids, empty }
  local out = dsrt.upload(src, "cuda", { progress = false })
  assert_equal(#out, #src)
  for i, t in ipairs(out) do
    assert_equal(t.device, "cuda:0")
    assert_equal(t.dtype, src[i].dtype)
    assert_equal(t.shape, src[i].shape)
    assert(t:is_contiguous())
    if t:numel() > 0 then same_bytes(t, src[i]) end
  end
end)

test("small_async_copies_are_staged_and_do_not_wait_for_the_stream", function()
  -- t:to{device = "cuda", async = true} of up to 64 KiB goes through a ring of 32 pinned slots: the
  -- host bytes are taken at once (the host tensor may change or go right after), the copy lands in
  -- stream order, and the call does not wait for the work queued before it (pageable
  -- cudaMemcpyAsync may). 100 copies wrap the ring three times; 64 KiB and 64 KiB + 8 bytes are
  -- the two sides of the staging limit.
  local m = dsrt.randn({ 4096, 4096 }, { device = "cuda", dtype = "bf16", seed = 5 })
  local busy = dsrt.event("cuda")
  local ups, hosts = {}, {}
  for i = 1, 100 do
    local n = i == 99 and 8192 or i == 100 and 8193 or i
    local host = dsrt.arange(n):add(1000 * i)
    hosts[i] = host:clone()
    if i == 1 then
      for _ = 1, 4 do m:matmul(m):close() end -- ~1 ms of work ahead of the first copy
      busy:record()
    end
    ups[i] = host:to { device = "cuda", async = true }
    if i == 1 then assert(not busy:query(), "the staged copy waited for the work queued before it") end
    host:fill(-1)
    host:close()
  end
  for i, up in ipairs(ups) do
    assert_equal(up.dtype, "i64")
    assert_equal(up:to("cpu"):ne(hosts[i]):sum():item(), 0)
  end
end)

test("upload_errors_name_the_problem", function()
  assert_error(function() return dsrt.upload({ dsrt.ones(3):to("cuda") }, "cuda") end, "not on the CPU")
  assert_error(function() return dsrt.upload({ dsrt.ones(3) }, "cpu") end, "CUDA device")
  assert_error(function() return dsrt.upload({ 42 }, "cuda") end, "tensor expected")
  -- the limit bounds reserved memory: with the cache emptied, a 4 MiB tensor cannot fit in 1 MiB more
  collectgarbage()
  dsrt.empty_cache("cuda")
  dsrt.set_memory_limit(dsrt.memory_stats("cuda").reserved + (1 << 20), "cuda")
  local ok, err = pcall(dsrt.upload, { dsrt.ones(1 << 20) }, "cuda", { progress = false })
  dsrt.set_memory_limit(0, "cuda")
  assert(not ok and tostring(err):find("out of memory"), tostring(err))
  assert_equal(dsrt.upload({ dsrt.ones(4) }, "cuda")[1]:sum():item(), 4.0) -- still usable
end)

return tests
