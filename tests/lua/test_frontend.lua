-- test_frontend.lua — the `dsrt` program seen from outside: it is run as a user would run it and
-- judged by its output and exit status, which is what scripts and people depend on. The REPL is
-- driven through a pipe with -i, where it reads plain lines.
--
-- The program tested is DSRT_BIN, else the dsrt running these tests (so `make asan` tests the
-- sanitized build), else build/dsrt.

local h = require "tests.helpers"

local interpreter = arg and arg[-1]
local BIN = os.getenv("DSRT_BIN")
            or (interpreter and interpreter:find("dsrt$") and interpreter)
            or "build/dsrt"

local function shell_quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

if os.execute("test -x " .. shell_quote(BIN)) ~= true then
  error("no program " .. BIN .. " to test: build it, or set DSRT_BIN")
end

local function write_file(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

local function read_file(path)
  local f = assert(io.open(path, "rb"))
  local text = f:read("a")
  f:close()
  return text
end

-- Runs `env dsrt args` with stdin from `input` (empty when nil); returns stdout, stderr, status.
local function dsrt(args, input, env)
  local in_path, err_path = os.tmpname(), os.tmpname()
  write_file(in_path, input or "")
  local command = string.format("%s %s %s <%s 2>%s", env or "", shell_quote(BIN), args,
                                shell_quote(in_path), shell_quote(err_path))
  local pipe = assert(io.popen(command))
  local out = pipe:read("a")
  local _, _, status = pipe:close()
  local err = read_file(err_path)
  os.remove(in_path)
  os.remove(err_path)
  return out, err, status
end

local function temporary_script(text)
  local path = os.tmpname()
  write_file(path, text)
  return path
end

local function assert_contains(text, piece)
  if not text:find(piece, 1, true) then
    error(string.format("%q does not contain %q", text, piece), 2)
  end
end

return {
  { "-e runs code and prints", function()
    local out, err, status = dsrt("-e 'print(1 + 1)'")
    h.assert_equal(out, "2\n")
    h.assert_equal(err, "")
    h.assert_equal(status, 0)
  end },

  { "several -e run in order", function()
    local out = dsrt("-e 'x = 20' -e 'x = x + 1' -e 'print(x * 2)'")
    h.assert_equal(out, "42\n")
  end },

  { "a script sees arg and ... like lua", function()
    local script = temporary_script([[
      print(arg[-3] ~= nil, arg[-2], arg[-1], arg[0] == SCRIPT, arg[1], arg[2], #arg)
      print(select("#", ...), ...)
    ]])
    local out, err, status = dsrt("-e " .. shell_quote("SCRIPT = " .. string.format("%q", script))
                                  .. " " .. shell_quote(script) .. " one 'two words'")
    os.remove(script)
    h.assert_equal(err, "")
    h.assert_equal(status, 0)
    h.assert_equal(out, "true\t-e\tSCRIPT = " .. string.format("%q", script)
                        .. "\ttrue\tone\ttwo words\t2\n2\tone\ttwo words\n")
  end },

  { "a failing script exits 1 with a message and a traceback", function()
    local script = temporary_script("local function inner() error('boom') end\ninner()\n")
    local out, err, status = dsrt(shell_quote(script))
    os.remove(script)
    h.assert_equal(out, "")
    h.assert_equal(status, 1)
    h.assert_equal(err:sub(1, 6), "dsrt: ")
    assert_contains(err, ":1: boom\nstack traceback:")
    assert_contains(err, "in local 'inner'")
  end },

  { "a script with a syntax error exits 1", function()
    local script = temporary_script("x = = 1\n")
    local _, err, status = dsrt(shell_quote(script))
    os.remove(script)
    h.assert_equal(status, 1)
    assert(err:find("^dsrt: .*:1: unexpected symbol near '='"), err)
  end },

  { "a missing script exits 1", function()
    local _, err, status = dsrt("/nonexistent/script.lua")
    h.assert_equal(status, 1)
    assert_contains(err, "dsrt: cannot open /nonexistent/script.lua")
  end },

  { "os.exit sets the exit status", function()
    local _, _, status = dsrt("-e 'os.exit(3)'")
    h.assert_equal(status, 3)
  end },

  { "-v and --version print the version", function()
    for _, option in ipairs({ "-v", "--version" }) do
      local out, _, status = dsrt(option)
      assert(out:find("^dsrt %d+%.%d+%.%d+ %(Lua 5%.4"), out)
      h.assert_equal(status, 0)
    end
  end },

  { "-h prints usage and runs nothing", function()
    local out, err, status = dsrt("-h -e 'print(1)'")
    assert(out:find("^usage: dsrt"), out)
    h.assert_equal(err, "")
    h.assert_equal(status, 0)
  end },

  { "an unknown option prints usage on stderr and exits 1", function()
    local out, err, status = dsrt("-x -e 'print(1)'")
    h.assert_equal(out, "")
    assert_contains(err, "unrecognized option '-x'")
    assert_contains(err, "usage: dsrt")
    h.assert_equal(status, 1)
  end },

  { "-e without its code is an error", function()
    local _, err, status = dsrt("-e")
    assert_contains(err, "'-e'")
    h.assert_equal(status, 1)
  end },

  { "with no arguments and piped stdin, stdin is the script", function()
    local out, _, status = dsrt("", "print('from stdin', select('#', ...))\n")
    h.assert_equal(out, "from stdin\t0\n")
    h.assert_equal(status, 0)
  end },

  { "- runs stdin with the arguments that follow", function()
    local out = dsrt("- a b", "print(arg[0], ...)\n")
    h.assert_equal(out, "-\ta\tb\n")
  end },

  { "-l loads a module into a global", function()
    local out = dsrt("-l cjson -l json=cjson -e 'print(json == cjson, json.encode({1, 2}))'")
    h.assert_equal(out, "true\t[1,2]\n")
  end },

  { "LUA_INIT runs first, and -E ignores it", function()
    h.assert_equal(dsrt("-e 'print(z)'", nil, "LUA_INIT='z = 5'"), "5\n")
    h.assert_equal(dsrt("-E -e 'print(z)'", nil, "LUA_INIT='z = 5'"), "nil\n")
  end },

  { "the checkout's lua/ is searched first, the embedded library last", function()
    local out = dsrt("-e 'print(package.path)' -e 'print(#package.searchers)' "
                     .. "-e 'print(select(2, pcall(require, \"no.such.module\")))'")
    local first_path, searchers, message = out:match("^([^;\n]*);[^\n]*\n(%d+)\n(.*)$")
    assert(first_path and first_path:find("/lua/%?%.lua$"), out)
    h.assert_equal(searchers, "5")
    assert_contains(message, "no embedded module 'no.such.module'")
  end },

  { "dsrt.core and cjson are preloaded", function()
    local out = dsrt("-e 'print(type(package.preload[\"dsrt.core\"]), "
                     .. "require(\"cjson\").encode({7}))'")
    h.assert_equal(out, "function\t[7]\n")
  end },

  { "Ctrl-C interrupts a running chunk", function()
    -- the chunk makes a file once it runs (so the handler is in place), then spins for at most
    -- 20 s: a failed interrupt shows as a wrong status, never a hung test; the wait for the file
    -- ends too if the program died before making it
    local ready = os.tmpname()
    os.remove(ready)
    local chunk = string.format("io.open(%q, 'w'):close() "
                                .. "local t = os.time() while os.time() - t < 20 do end", ready)
    local shell = string.format("%s -e %s 2>&1 & pid=$!; "
                                .. "while [ ! -e %s ] && kill -0 $pid 2>/dev/null; do sleep 0.05; done; "
                                .. "kill -INT $pid; wait $pid; echo \"status $?\"",
                                shell_quote(BIN), shell_quote(chunk), shell_quote(ready))
    local pipe = assert(io.popen("sh -c " .. shell_quote(shell)))
    local out = pipe:read("a")
    pipe:close()
    os.remove(ready)
    assert_contains(out, "interrupted!")
    assert_contains(out, "status 1")
  end },

  { "REPL: an expression prints its value, = works too", function()
    local out, _, status = dsrt("-i", "1 + 2\n=10\n'a' .. 'b', nil, 4\n")
    assert(out:find("^dsrt [^\n]*\n"), out)
    assert_contains(out, "> 3\n")
    assert_contains(out, "> 10\n")
    assert_contains(out, "> ab\tnil\t4\n")
    h.assert_equal(status, 0)
  end },

  { "REPL: a statement prints nothing", function()
    local out = dsrt("-i", "x = nil\nlocal y = 1\n")
    assert(out:find("\n> > > \n$"), out)
  end },

  { "REPL: an unfinished statement continues on the next line", function()
    local out = dsrt("-i", "function f(x)\nreturn x * 2\nend\nf(21)\nt = {\n1, 2,\n3}\n#t\n")
    assert_contains(out, "> >> >> > 42\n")
    assert_contains(out, "> >> >> > 3\n")
  end },

  { "REPL: an error prints a traceback and the REPL goes on", function()
    local out, err, status = dsrt("-i", "error('oops')\nprint('after')\n")
    assert_contains(err, "stdin:1: oops\nstack traceback:")
    assert_contains(out, "> after\n")
    h.assert_equal(status, 0)
  end },

  { "REPL: input that ends unfinished is reported", function()
    local _, err = dsrt("-i", "local a =\n")
    assert_contains(err, "stdin:1: unexpected symbol near <eof>")
  end },

  { "REPL: -i runs the script first", function()
    local script = temporary_script("greeting = 'hi from script'\n")
    local out = dsrt("-i " .. shell_quote(script), "greeting\n")
    os.remove(script)
    assert_contains(out, "> hi from script\n")
  end },
}
