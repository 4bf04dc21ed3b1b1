-- dsrt.safetensors — checkpoints in the safetensors format: one file, or a folder of shards named
-- by model.safetensors.index.json, as Hugging Face publishes them.
--
--   local st = dsrt.safetensors.open(path)   -- a file, a folder with the index, a folder with
--                                            -- model.safetensors, or the index file itself
--   local w = st:get("embed.weight")         -- a zero-copy CPU view of the file's mapping
--   st:names(); st:has(name); st:info(name); st:metadata([file]); #st; st:close()
--   dsrt.safetensors.save(path, {name = tensor, ...}, {key = "value"})
--
-- What it protects:
--   - A file is checked whole when it is opened, as the reference implementation checks it
--     (safetensors' Metadata::validate, FORMATS.md §5), and refused with a message naming the file
--     and the tensor. The C side (runtime/safetensors.c) bounds-checks everything it touches as
--     well, so a check missed here still cannot read outside the file.
--   - Tensors are views of the mapping, and the mapping lives while any of them does: closing or
--     collecting `st` only drops its own hold. A tensor whose offset in the file is not a multiple
--     of its element size (the format does not promise alignment) is copied instead of viewed.
--   - The index and the shards agree: every tensor the index names is in its shard, and every
--     tensor in a shard is one the index places there. A disagreement means shards from different
--     revisions of the checkpoint, so it is an error rather than something to load around.
--   - save() never leaves a partial file under the final name (the writer renames a finished
--     temporary file), and writes what the Python `safetensors` library reads.
--
-- lua-cjson decodes the header. It is loaded on first use, so `require "dsrt"` works in a host
-- that has no cjson (the embedding example) until that host opens a file.

local core = require "dsrt.core"
local native = core.safetensors

local safetensors = {}

local INDEX_NAME = "model.safetensors.index.json"
local SINGLE_NAME = "model.safetensors"
local MAX_ELEMENTS = 1 << 50 -- dsrt's bound on a tensor's elements (runtime/tensor.c)
local MAX_DIMS = 8

-- Bits per element of every dtype the format defines.
local FORMAT_BITS = {
  BOOL = 8, F4 = 4, F6_E2M3 = 6, F6_E3M2 = 6, U8 = 8, I8 = 8, F8_E5M2 = 8, F8_E4M3 = 8, F8_E8M0 = 8,
  F8_E4M3FNUZ = 8, F8_E5M2FNUZ = 8, I16 = 16, U16 = 16, F16 = 16, BF16 = 16, I32 = 32, U32 = 32,
  F32 = 32, C64 = 64, F64 = 64, I64 = 64, U64 = 64,
}

-- The format's dtypes dsrt holds, by dsrt's name; F4 shapes count 4-bit elements, as fp4e2m1's do.
local DSRT_DTYPE = {
  BF16 = "bf16", F16 = "f16", F32 = "f32", I8 = "i8", U8 = "u8", I32 = "i32", I64 = "i64",
  BOOL = "bool", F8_E4M3 = "f8e4m3", F8_E8M0 = "f8e8m0", F4 = "fp4e2m1",
}
local FORMAT_DTYPE, DSRT_BITS = {}, {}
for format, dtype in pairs(DSRT_DTYPE) do
  FORMAT_DTYPE[dtype], DSRT_BITS[dtype] = format, FORMAT_BITS[format]
end
local SUPPORTED = {}
for format in pairs(DSRT_DTYPE) do SUPPORTED[#SUPPORTED + 1] = format end
table.sort(SUPPORTED)
SUPPORTED = table.concat(SUPPORTED, ", ")

-- A private cjson instance that refuses what JSON does not have (hex numbers, NaN, Infinity),
-- which the shared default instance accepts.
local json
local function decoder()
  if not json then
    local ok, cjson = pcall(require, "cjson")
    if not ok then error("safetensors: reading needs lua-cjson, which did not load: " .. tostring(cjson), 0) end
    json = cjson.new()
    json.decode_invalid_numbers(false)
  end
  return json
end

-- Errors carry no source position: like the C layer's, they describe the file, not the caller.
local function fail(file, fmt, ...)
  error(string.format("safetensors: '%s': " .. fmt, file, ...), 0)
end

local function shape_str(shape)
  return "[" .. table.concat(shape, ", ") .. "]"
end

-- Opening a real shard runs the checks below thousands of times; these are hot enough to keep local.
local next, type, tointeger = next, type, math.tointeger

-- cjson gives every JSON number as a float; an integral one within range becomes an integer.
local function as_integer(v)
  return type(v) == "number" and tointeger(v) or nil
end

-- A decoded JSON array: nothing follows its last element (an object's members would). cjson
-- cannot tell an empty array from an empty object; both pass.
local function is_array(t)
  return type(t) == "table" and next(t, #t > 0 and #t or nil) == nil
end

-- a decoded JSON value as the header wrote it, for messages (cjson turns 2 into 2.0)
local function show(v)
  if v == json.null then return "null" end
  if type(v) == "table" then return is_array(v) and "an array" or "an object" end
  return type(v) == "number" and tointeger(v) or type(v) == "string" and string.format("%q", v) or tostring(v)
end

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

-- "path/" opens only when path is a folder
local function is_folder(path)
  local f = io.open(path .. "/", "rb")
  if f then f:close() end
  return f ~= nil
end

-- The member names of the JSON object in text, decoded, in the order written, and where each
-- value is (json_members' spans). A name given twice is an error, which cjson, keeping the last,
-- would hide.
local function member_names(file, text, what)
  local raw, spans = native.json_members(text)
  local names, seen = {}, {}
  for i, name in ipairs(raw) do
    if name:find("\\", 1, true) then name = decoder().decode('"' .. name .. '"') end
    if seen[name] then fail(file, "%s names '%s' twice", what, name) end
    seen[name], names[i] = true, name
  end
  return names, spans
end

local function member_text(text, names, spans, wanted)
  for i, name in ipairs(names) do
    if name == wanted then return text:sub(spans[2 * i - 1], spans[2 * i]) end
  end
end

local function check_metadata(file, header, names, spans, metadata)
  if metadata == nil then return {} end
  local text = member_text(header, names, spans, "__metadata__")
  if type(metadata) ~= "table" or text:sub(1, 1) ~= "{" then
    fail(file, "__metadata__ is not an object mapping strings to strings")
  end
  member_names(file, text, "__metadata__")
  for key, value in pairs(metadata) do
    if type(value) ~= "string" then
      fail(file, "__metadata__ value of '%s' is %s, not a string", key, show(value))
    end
  end
  return metadata
end

-- One header entry checked on its own; returns what get() needs.
local function check_entry(record, name, info, data_size)
  local file = record.file
  if type(info) ~= "table" or info[1] ~= nil then fail(file, "tensor '%s': its entry is not an object", name) end
  local format = info.dtype
  if type(format) ~= "string" then fail(file, "tensor '%s': no dtype string", name) end
  local bits = FORMAT_BITS[format]
  if not bits then fail(file, "tensor '%s': unknown dtype '%s'", name, format) end
  if not DSRT_DTYPE[format] then
    error(string.format("safetensors: dtype %s of tensor '%s' in file '%s' is not supported by dsrt (it reads %s)",
                        format, name, file, SUPPORTED), 0)
  end
  local shape = info.shape
  if not is_array(shape) then fail(file, "tensor '%s': shape is not an array", name) end
  if #shape > MAX_DIMS then
    fail(file, "tensor '%s': shape has %d dimensions (dsrt holds at most %d)", name, #shape, MAX_DIMS)
  end
  local numel, nonzero = 1, 1
  for d, size in ipairs(shape) do
    local n = as_integer(size)
    if not n or n < 0 then
      fail(file, "tensor '%s': shape element %d (%s) is not a non-negative integer", name, d, show(size))
    end
    shape[d] = n
    if n > 0 then
      if nonzero > MAX_ELEMENTS // n then fail(file, "tensor '%s': shape is too large for dsrt", name) end
      nonzero = nonzero * n
    end
    numel = numel * n
  end
  local offsets = info.data_offsets
  if not is_array(offsets) or #offsets ~= 2 then fail(file, "tensor '%s': data_offsets is not a [begin, end] pair", name) end
  local first, last = as_integer(offsets[1]), as_integer(offsets[2])
  if not first or not last or first < 0 or last < 0 then
    fail(file, "tensor '%s': data_offsets [%s, %s] are not non-negative integers", name, show(offsets[1]),
         show(offsets[2]))
  end
  if first > last then fail(file, "tensor '%s': data_offsets [%d, %d] begin after they end", name, first, last) end
  bits = numel * bits
  if bits % 8 ~= 0 then
    fail(file, "tensor '%s': %s %s is %d bits, not whole bytes", name, format, shape_str(shape), bits)
  end
  if last - first ~= bits // 8 then
    fail(file, "tensor '%s': %s %s is %d bytes, but data_offsets [%d, %d] hold %d", name, format, shape_str(shape),
         bits // 8, first, last, last - first)
  end
  if last > data_size then
    fail(file, "tensor '%s': data_offsets [%d, %d] reach past the end of the %d-byte data buffer (truncated?)", name,
         first, last, data_size)
  end
  return { name = name, dtype = DSRT_DTYPE[format], shape = shape, first = first, last = last, nbytes = bits // 8,
           record = record }
end

-- True when the entries tile the data buffer: each nonempty one starts where another ends (or
-- at 0), the last ends at its end, and each empty one sits on such a boundary. This is the rule
-- the sorted walk below enforces, checked in linear time without sorting, which on a shard of
-- thousands of entries is most of the cost of checking it.
local function tiles_exactly(entries, data_size)
  local starting_at, nonempty = {}, 0
  for _, e in ipairs(entries) do
    if e.last > e.first then
      if starting_at[e.first] then return false end
      starting_at[e.first], nonempty = e, nonempty + 1
    end
  end
  local covered, walked = 0, 0
  while starting_at[covered] do
    covered, walked = starting_at[covered].last, walked + 1
  end
  if covered ~= data_size or walked ~= nonempty then return false end
  for _, e in ipairs(entries) do
    if e.last == e.first and e.first ~= data_size and not starting_at[e.first] then return false end
  end
  return true
end

-- The entries, sorted by offsets, must tile the data buffer: no gap, no overlap, from its first
-- byte to its last (safetensors' Metadata::validate). The sorted walk is the rule as the reference
-- states it; it runs only when the fast check above fails, to name the fault.
local function check_tiling(file, entries, data_size)
  if tiles_exactly(entries, data_size) then return end
  table.sort(entries, function(a, b)
    if a.first ~= b.first then return a.first < b.first end
    if a.last ~= b.last then return a.last < b.last end
    return a.name < b.name
  end)
  local covered, previous = 0, nil
  for _, e in ipairs(entries) do
    if e.first > covered and previous then
      fail(file, "bytes %d..%d of the data buffer belong to no tensor (between '%s' and '%s')", covered, e.first,
           previous.name, e.name)
    elseif e.first > covered then
      fail(file, "the data buffer does not start with a tensor: the first, '%s', begins at byte %d", e.name, e.first)
    elseif e.first < covered then
      fail(file, "tensor '%s' (bytes %d..%d) overlaps tensor '%s' (bytes %d..%d)", e.name, e.first, e.last,
           previous.name, previous.first, previous.last)
    end
    covered, previous = e.last, e
  end
  if covered ~= data_size then
    fail(file, "the last %d bytes of the data buffer belong to no tensor", data_size - covered)
  end
end

-- Maps one file and checks its header; the mapping goes into `opened` at once, so that a caller
-- failing later can release it.
local function read_file(file, opened)
  local mapping, header = native.map(file)
  opened[#opened + 1] = mapping
  local data_start = 8 + #header
  local data_size = mapping:size() - data_start
  if header:sub(1, 1) ~= "{" then fail(file, "the header does not start with '{'") end
  if not utf8.len(header) then fail(file, "the header is not valid UTF-8") end
  local decode = decoder().decode
  local ok, decoded = pcall(decode, header)
  if not ok then fail(file, "the header is not valid JSON (%s)", decoded) end
  local names, spans = member_names(file, header, "the header")
  local record = {
    file = file, mapping = mapping, data_start = data_start, entries = {}, names = {},
    metadata = check_metadata(file, header, names, spans, decoded.__metadata__),
  }
  local tiles = {}
  for _, name in ipairs(names) do
    if name ~= "__metadata__" then
      local e = check_entry(record, name, decoded[name], data_size)
      record.entries[name] = e
      record.names[#record.names + 1] = name
      tiles[#tiles + 1] = e
    end
  end
  check_tiling(file, tiles, data_size)
  return record
end

local function read_index(index, opened)
  local f, open_error = io.open(index, "rb")
  if not f then error("safetensors: cannot open the index: " .. open_error, 0) end
  local text, read_error = f:read("a")
  f:close()
  if not text then fail(index, "cannot read it: %s", read_error) end
  local decode = decoder().decode
  local ok, decoded = pcall(decode, text)
  if not ok then fail(index, "the index is not valid JSON (%s)", decoded) end
  if type(decoded) ~= "table" or not text:match("^%s*{") then fail(index, "the index is not a JSON object") end
  local names, spans = member_names(index, text, "the index")
  local map_text = member_text(text, names, spans, "weight_map")
  if not map_text or map_text:sub(1, 1) ~= "{" then fail(index, "the index has no weight_map object") end
  local weight_map = decoded.weight_map
  local folder = index:match("^(.*)/[^/]*$") or "."
  local shards, shard_names = {}, {}
  for _, name in ipairs((member_names(index, map_text, "weight_map"))) do
    local shard = weight_map[name]
    if type(shard) ~= "string" then fail(index, "weight_map gives tensor '%s' a %s, not a file name", name, type(shard)) end
    if not shards[shard] then shards[shard], shard_names[#shard_names + 1] = {}, shard end
    table.insert(shards[shard], name)
  end
  table.sort(shard_names)
  local records = {}
  for _, shard in ipairs(shard_names) do
    local file = folder .. "/" .. shard
    if not exists(file) then
      fail(index, "names shard '%s' (for tensor '%s'), which does not exist", shard, shards[shard][1])
    end
    local record = read_file(file, opened)
    for _, name in ipairs(record.names) do
      local placed = weight_map[name]
      if placed == nil then
        fail(index, "shard '%s' holds tensor '%s', which the index does not name", shard, name)
      elseif placed ~= shard then
        fail(index, "tensor '%s' is in shard '%s' too, but the index places it in '%s'", name, shard, placed)
      end
    end
    for _, name in ipairs(shards[shard]) do
      if not record.entries[name] then
        fail(index, "places tensor '%s' in shard '%s', which does not hold it", name, shard)
      end
    end
    records[#records + 1] = record
  end
  return records
end

local Checkpoint = {}
local checkpoint_mt = { __index = Checkpoint }

--- Opens a checkpoint: a .safetensors file, a folder holding model.safetensors.index.json (its
--- shards are all opened and checked now), a folder holding model.safetensors, or an index file.
function safetensors.open(path)
  if type(path) ~= "string" then error("safetensors.open: expected a path, got " .. type(path), 0) end
  local index
  if is_folder(path) then
    local folder = path:match("^(.-)/*$")
    if folder == "" then folder = "/" end
    if exists(folder .. "/" .. INDEX_NAME) then
      index = folder .. "/" .. INDEX_NAME
    elseif exists(folder .. "/" .. SINGLE_NAME) then
      path = folder .. "/" .. SINGLE_NAME
    else
      error(string.format("safetensors: folder '%s' holds neither %s nor %s", path, INDEX_NAME, SINGLE_NAME), 0)
    end
  elseif path:match("%.json$") then
    index = path
  end
  -- on an error, release every mapping made so far now rather than at some later collection
  local opened <close> = setmetatable({}, { __close = function(mappings, err)
    if err ~= nil then
      for _, mapping in ipairs(mappings) do mapping:close() end
    end
  end })
  local records = index and read_index(index, opened) or { read_file(path, opened) }
  local self = { path = path, records = records, entries = {}, tensor_count = 0 }
  for _, record in ipairs(records) do
    for _, name in ipairs(record.names) do
      self.entries[name] = record.entries[name]
    end
    self.tensor_count = self.tensor_count + #record.names
  end
  return setmetatable(self, checkpoint_mt)
end

local function entry_of(self, name)
  if self.closed then error(string.format("safetensors: '%s' was closed", self.path), 0) end
  local e = self.entries[name]
  if not e then error(string.format("safetensors: no tensor '%s' in '%s'", tostring(name), self.path), 0) end
  return e
end

--- The tensor as a CPU view of the mapping (a copy when misaligned in the file); it stays valid
--- after st is closed.
function Checkpoint:get(name)
  local e = entry_of(self, name)
  local start = e.record.data_start
  return e.record.mapping:tensor(e.dtype, e.shape, start + e.first, start + e.last)
end

function Checkpoint:has(name) return self.entries[name] ~= nil end

--- All tensor names, sorted (a new table). Sorting waits for the first call: opening a large
--- checkpoint should not pay for it.
function Checkpoint:names()
  if not self.sorted_names then
    local names = {}
    for name in pairs(self.entries) do names[#names + 1] = name end
    table.sort(names)
    self.sorted_names = names
  end
  return table.move(self.sorted_names, 1, #self.sorted_names, 1, {})
end

function Checkpoint:count() return self.tensor_count end

--- {dtype = dsrt's name, shape = {...}, file = path of its file, offset = byte in that file, nbytes =}
function Checkpoint:info(name)
  local e = entry_of(self, name)
  return { dtype = e.dtype, shape = table.move(e.shape, 1, #e.shape, 1, {}), file = e.record.file,
           offset = e.record.data_start + e.first, nbytes = e.nbytes }
end

--- The __metadata__ strings of one file (a path as info().file gives it), or of all files merged;
--- where shards disagree on a key, the shard whose name sorts first wins.
function Checkpoint:metadata(file)
  local merged, found = {}, file == nil
  for i = #self.records, 1, -1 do
    local record = self.records[i]
    if file == nil or record.file == file then
      found = true
      for key, value in pairs(record.metadata) do merged[key] = value end
    end
  end
  if not found then error(string.format("safetensors: '%s' is not a file of '%s'", tostring(file), self.path), 0) end
  return merged
end

--- The paths of the checkpoint's files, in the order of their names.
function Checkpoint:files()
  local files = {}
  for i, record in ipairs(self.records) do files[i] = record.file end
  return files
end

--- Drops this object's hold on the mappings; tensors already taken keep theirs.
function Checkpoint:close()
  for _, record in ipairs(self.records) do record.mapping:close() end
  self.closed = true
end

checkpoint_mt.__close = Checkpoint.close
checkpoint_mt.__len = Checkpoint.count
checkpoint_mt.__tostring = function(self)
  return string.format("safetensors('%s', %d tensors in %d file%s%s)", self.path, self.tensor_count, #self.records,
                       #self.records == 1 and "" or "s", self.closed and ", closed" or "")
end

-- A JSON string literal; names and metadata are checked to be UTF-8 before they get here.
local function json_string(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    if c == '"' or c == "\\" then return "\\" .. c end
    return string.format("\\u%04x", c:byte())
  end) .. '"'
end

local function check_text(what, s)
  if type(s) ~= "string" then error(string.format("safetensors.save: %s must be a string, got %s", what, type(s)), 0) end
  if not utf8.len(s) then error(string.format("safetensors.save: %s %q is not valid UTF-8", what, s), 0) end
end

--- Writes tensors (from any device) and optional string metadata to path. Header names are
--- sorted; the data goes widest dtype first, then by name, so that every tensor starts aligned
--- for its dtype (as the Python library orders it) and dsrt maps it back without copying.
function safetensors.save(path, tensors, metadata)
  check_text("the path", path)
  if type(tensors) ~= "table" then error("safetensors.save: expected a table of tensors, got " .. type(tensors), 0) end
  if metadata ~= nil and type(metadata) ~= "table" then
    error("safetensors.save: metadata must be a table of strings, got " .. type(metadata), 0)
  end
  local items = {}
  for name, t in pairs(tensors) do
    check_text("a tensor name", name)
    if name == "__metadata__" then error("safetensors.save: '__metadata__' is reserved for the metadata", 0) end
    if not core.is_tensor(t) then
      error(string.format("safetensors.save: '%s' is a %s, not a tensor", name, type(t)), 0)
    end
    local bits = t:numel() * DSRT_BITS[t.dtype]
    if bits % 8 ~= 0 then
      error(string.format("safetensors.save: '%s' is %s with an odd number of elements (%d); the format stores "
                          .. "whole bytes, so F4 tensors need an even count", name, t.dtype, t:numel()), 0)
    end
    items[#items + 1] = { name = name, tensor = t, bits = DSRT_BITS[t.dtype], nbytes = bits // 8 }
  end
  local keys = {}
  for key, value in pairs(metadata or {}) do
    check_text("a metadata key", key)
    check_text("metadata value '" .. key .. "'", value)
    keys[#keys + 1] = key
  end
  table.sort(keys)

  table.sort(items, function(a, b)
    if a.bits ~= b.bits then return a.bits > b.bits end
    return a.name < b.name
  end)
  local offset = 0
  for _, item in ipairs(items) do
    item.first, offset = offset, offset + item.nbytes
  end

  local members = {}
  if #keys > 0 then
    local pairs_text = {}
    for i, key in ipairs(keys) do pairs_text[i] = json_string(key) .. ":" .. json_string(metadata[key]) end
    members[1] = '"__metadata__":{' .. table.concat(pairs_text, ",") .. "}"
  end
  local by_name = table.move(items, 1, #items, 1, {})
  table.sort(by_name, function(a, b) return a.name < b.name end)
  for _, item in ipairs(by_name) do
    local t = item.tensor
    members[#members + 1] = string.format('%s:{"dtype":"%s","shape":%s,"data_offsets":[%d,%d]}', json_string(item.name),
                                          FORMAT_DTYPE[t.dtype], "[" .. table.concat(t.shape, ",") .. "]",
                                          item.first, item.first + item.nbytes)
  end
  local header = "{" .. table.concat(members, ",") .. "}"
  header = header .. string.rep(" ", -(8 + #header) % 8) -- the data starts on an 8-byte boundary

  local writer <close> = native.writer(path)
  writer:write(string.pack("<I8", #header) .. header)
  for _, item in ipairs(items) do
    local t = item.tensor
    local host = t.device == "cpu" and t or t:cpu()
    if item.nbytes > 0 and not host:is_contiguous() then host = host:contiguous() end
    writer:write(host)
    -- a copy is dropped at once, so saving from a GPU holds one tensor on the host, not all
    if host ~= t then host:close() end
  end
  writer:commit()
end

return safetensors
