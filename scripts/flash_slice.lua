-- flash_slice.lua - the config folder the GPU benchmarks (bench_dsv4.lua, bench_speculative.lua) run:
-- Flash's published config (tests/fixtures/config/flash_published.json) cut to layers 0-3 (window/hash
-- x2, ratio 4 + indexer, ratio 128) and the MTP layer (SPEC §1.2), in a new temporary folder.
--
--   local folder = dofile("scripts/flash_slice.lua")()
local cjson = require "cjson"

return function()
  local f = assert(io.open("tests/fixtures/config/flash_published.json", "rb"))
  local raw = cjson.decode(f:read("a"))
  f:close()
  raw.num_hidden_layers = 4
  raw.compress_ratios = { 0, 0, 4, 128, 0 }
  local folder = os.tmpname()
  os.remove(folder)
  assert(os.execute("mkdir " .. folder))
  local out = assert(io.open(folder .. "/config.json", "wb"))
  out:write(cjson.encode(raw))
  out:close()
  return folder
end
