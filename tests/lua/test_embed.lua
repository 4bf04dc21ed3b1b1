-- The embedding example (examples/embed.c) is a host with its own lua_State: require "dsrt" must
-- work there from the library compiled into the binary, with no lua/ folder on any path.
local h = require "tests.helpers"

local bin = (os.getenv("DSRT_BIN") or "build/dsrt"):gsub("dsrt$", "embed_example")

local function run(code)
  local p = assert(io.popen(("cd / && %q %q 2>&1; echo \"exit $?\""):format(
    bin:sub(1, 1) == "/" and bin or os.getenv("PWD") .. "/" .. bin, code)))
  local out = p:read("a")
  p:close()
  return out
end

return {
  {"requires dsrt from the embedded library", function()
    local out = run("local dsrt = require 'dsrt' print(package.searchpath('dsrt', package.path), dsrt.tensor({1, 2}):sum():item())")
    h.assert_equal(out:match("nil\t3\n") ~= nil, true)
    h.assert_equal(out:match("exit 0") ~= nil, true)
  end},
  {"prints the default demo and the version", function()
    local out = run("local dsrt = require 'dsrt' print(dsrt.randn({2}, {seed = 1}))")
    assert(out:find("tensor%(%[%-0%.4139, %-0%.8812%]"), out)
    assert(out:find("dsrt %d+%.%d+%.%d+ embedded"), out)
  end},
  {"a failing script is reported, not a crash", function()
    local out = run("error('boom')")
    assert(out:find("embed: .*boom"), out)
    assert(out:find("exit 1"), out)
  end},
}
