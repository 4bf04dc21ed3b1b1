-- dsrt: the Lua face of the runtime. The C module dsrt.core holds tensors, streams and devices;
-- this file adds what is easier to say in Lua (scoped streams, comparison helpers) and is the
-- module scripts, tests and the REPL use: `local dsrt = require "dsrt"`.
local core = require "dsrt.core"

local dsrt = {}
for k, v in pairs(core) do dsrt[k] = v end
dsrt.safetensors = require "dsrt.safetensors"
dsrt.tokenizer = require "dsrt.tokenizer"

--- Runs fn(...) with s as the current stream of s's device; the previous current stream is
--- restored even when fn raises, and fn's results (or its error) pass through.
function dsrt.with_stream(s, fn, ...)
  local previous = core.set_stream(s)
  local results = table.pack(pcall(fn, ...))
  core.set_stream(previous)
  if not results[1] then error(results[2], 0) end
  return table.unpack(results, 2, results.n)
end

-- Both operands as f32 on the first one's device, for comparisons.
local function comparable(a, b)
  if not dsrt.is_tensor(b) then b = dsrt.full(a.shape, b, {device = a.device}) end
  return a:to(a.device, "f32"), b:to(a.device, "f32")
end

--- Largest |a - b| (NaN if either holds a NaN where the other does not agree).
function dsrt.max_abs_diff(a, b)
  a, b = comparable(a, b)
  if a:numel() == 0 then return 0 end
  local d = (a - b):abs()
  local nan = d:ne(d):sum():item()
  if nan > 0 then return 0 / 0 end
  return d:max():item()
end

--- ||a - b|| / ||b|| in f32 (0 when both are zero; NaN anywhere makes it NaN).
function dsrt.rel_error(a, b)
  a, b = comparable(a, b)
  local num = ((a - b) ^ 2):sum():item()
  local den = (b ^ 2):sum():item()
  if num ~= num or den ~= den then return 0 / 0 end
  if den == 0 then return num == 0 and 0 or math.huge end
  return math.sqrt(num / den)
end

--- true when |a - b| <= atol + rtol * |b| everywhere and neither has a NaN (torch's rule).
function dsrt.allclose(a, b, rtol, atol)
  rtol, atol = rtol or 1e-5, atol or 1e-8
  a, b = comparable(a, b)
  if a:numel() == 0 then return true end
  local bad = (a - b):abs():gt(b:abs() * rtol + atol):sum():item()
  local nan = a:ne(a):sum():item() + b:ne(b):sum():item()
  return bad == 0 and nan == 0
end

return dsrt
