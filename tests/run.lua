-- run.lua — the Lua test runner: `dsrt tests/run.lua [file or folder ...]` from the repo root
-- (default tests/lua); it runs under a stock lua5.4 too.
--
-- A test file returns its tests, either as a map {name = function} (run in name order) or as an
-- array of {name, function} pairs (run in the order written); a file may use both, the array
-- first. Folders are searched for test_*.lua, sorted. DSRT_TEST_FILTER, a Lua pattern matched
-- against "file:name", runs a subset.
--
-- What it protects: the count is honest. A test passes only by returning; a file that does not
-- load, or returns something that is not a table of tests, counts as a failure, and so does a
-- path that names nothing. Output stays short (one line per file, details only for failures) and
-- ends with exactly "N passed, M failed", the line tools/total.sh adds up; the exit status is 0
-- only when nothing failed.

package.path = "lua/?.lua;lua/?/init.lua;./?.lua;" .. package.path

local filter = os.getenv("DSRT_TEST_FILTER")
local passed, failed = 0, 0

local function shell_quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

local function is_folder(path)
  return os.execute("test -d " .. shell_quote(path)) == true
end

local function test_files(path)
  if not is_folder(path) then return { path } end
  local find = assert(io.popen("find " .. shell_quote(path) .. " -type f -name 'test_*.lua'"))
  local files = {}
  for file in find:lines() do files[#files + 1] = file end
  find:close()
  table.sort(files)
  return files
end

-- The traceback without the frames of this runner, which say nothing about the failure.
local function error_with_traceback(e)
  local trace = debug.traceback(tostring(e), 2)
  return (trace:gsub("\n%s*%[C%]: in function 'xpcall'.*", ""))
end

local function report_failure(where, message)
  failed = failed + 1
  print("FAIL " .. where .. ": " .. message)
end

-- The tests of a suite in the order they run: the array part as written, then named ones sorted.
local function ordered_tests(suite, file)
  local tests, names = {}, {}
  for i, pair in ipairs(suite) do
    if type(pair) ~= "table" or type(pair[1]) ~= "string" or type(pair[2]) ~= "function" then
      report_failure(file .. ":[" .. i .. "]", "not a {name, function} pair")
    else
      tests[#tests + 1] = { name = pair[1], fn = pair[2] }
    end
  end
  for name, fn in pairs(suite) do
    if math.type(name) ~= "integer" or name < 1 or name > #suite then
      if type(fn) ~= "function" then
        report_failure(file .. ":" .. tostring(name), "not a function")
      else
        names[#names + 1] = name
      end
    end
  end
  table.sort(names, function(a, b) return tostring(a) < tostring(b) end)
  for _, name in ipairs(names) do tests[#tests + 1] = { name = tostring(name), fn = suite[name] } end
  return tests
end

local function run_file(file)
  local failed_before, passed_before = failed, passed
  local chunk, load_error = loadfile(file)
  local ok, suite = false, load_error
  if chunk then ok, suite = xpcall(chunk, error_with_traceback, file) end
  if ok and type(suite) ~= "table" then
    ok, suite = false, "returned " .. type(suite) .. ", not a table of tests"
  end
  if not ok then
    report_failure(file, tostring(suite))
  else
    for _, test in ipairs(ordered_tests(suite, file)) do
      local where = file .. ":" .. test.name
      if not filter or where:find(filter) then
        local test_ok, message = xpcall(test.fn, error_with_traceback)
        if test_ok then passed = passed + 1 else report_failure(where, message) end
      end
    end
  end
  local file_passed, file_failed = passed - passed_before, failed - failed_before
  if file_passed + file_failed > 0 then
    print(string.format("%-44s %4d ok %4d failed", file, file_passed, file_failed))
  end
  -- release what the file's tests held (device memory among it) before the next file
  collectgarbage()
  collectgarbage()
end

local paths = { ... }
if #paths == 0 then paths[1] = "tests/lua" end
for _, path in ipairs(paths) do
  for _, file in ipairs(test_files(path)) do run_file(file) end
end
print(string.format("%d passed, %d failed", passed, failed))
os.exit(failed == 0, true)
