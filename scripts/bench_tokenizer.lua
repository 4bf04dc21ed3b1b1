-- bench_tokenizer.lua — encode speed of dsrt.tokenizer on the test corpus, in MB/s of UTF-8 input.
--
--   build/dsrt scripts/bench_tokenizer.lua [tokenizer.json]     (default: tools/fetch_tokenizer.sh)
--
-- Measures the corpus string by string (12,000 short strings: per-call overhead counts) and joined
-- into one text (throughput on long input). The reference's figures on the same machine come from
-- `node tests/oracle/tokenizer_reference.mjs TOKENIZER_JSON --bench tests/fixtures/tokenizer/corpus.json`
-- (see that file for NODE_PATH); issue 5 asks for both side by side.
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local dsrt = require "dsrt"
local cjson = require "cjson"

local path = arg[1]
if not path then
  local pipe = assert(io.popen("tools/fetch_tokenizer.sh"))
  path = pipe:read("l")
  assert(pipe:close() and path, "tools/fetch_tokenizer.sh failed")
end
local tok = dsrt.tokenizer.load(path)
local f = assert(io.open("tests/fixtures/tokenizer/corpus.json", "rb"))
local corpus = cjson.decode(f:read("a"))
f:close()
local bytes = 0
for _, s in ipairs(corpus) do bytes = bytes + #s end

local function best_of(n, fn)
  local best = math.huge
  for _ = 1, n do
    local t0 = os.clock()
    fn()
    best = math.min(best, os.clock() - t0)
  end
  return best
end

local per_string = best_of(5, function() for _, s in ipairs(corpus) do tok:encode(s) end end)
local joined = table.concat(corpus, "\n")
local one = best_of(5, function() tok:encode(joined) end)
print(string.format("dsrt: %.2f MB in %d strings: %.2f MB/s; as one string: %.2f MB/s",
                    bytes / 1e6, #corpus, bytes / 1e6 / per_string, #joined / 1e6 / one))
