-- bench_options.lua - the command line of the GPU benchmark scripts (bench_dsv4.lua,
-- bench_speculative.lua): flags and valued options, checked, with the same messages in both.
--
--   local opts = dofile("scripts/bench_options.lua")("bench_dsv4", arg,
--     { quick = "flag", context = "int", steps = "int", precision = "string", device = "string", config = "string" },
--     { precision = "reference", device = "cuda" })
return function(name, args, spec, defaults)
  local opts, usage = {}, {}
  for k, v in pairs(defaults or {}) do opts[k] = v end
  for key, kind in pairs(spec) do
    usage[#usage + 1] = "--" .. key .. (kind == "flag" and "" or kind == "int" and " N" or " V")
    if kind == "flag" then opts[key] = opts[key] or false end
  end
  table.sort(usage)
  local i = 1
  while i <= #args do
    local a = args[i]
    local key = a:match("^%-%-(.+)$")
    local kind = key and spec[key]
    if not kind then error(name .. ": unknown option " .. a .. " (" .. table.concat(usage, ", ") .. ")", 0) end
    if kind == "flag" then
      opts[key] = true
    else
      i = i + 1
      if args[i] == nil then error(name .. ": " .. a .. " needs a value", 0) end
      if kind == "int" then opts[key] = math.tointeger(tonumber(args[i])) else opts[key] = args[i] end -- nil: not an integer, the caller says so
    end
    i = i + 1
  end
  return opts
end
