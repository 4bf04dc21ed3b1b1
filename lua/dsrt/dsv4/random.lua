-- dsrt.dsv4.random — deterministic random DeepSeek-V4 weights, in the checkpoint's own formats.
--
--   local random = require "dsrt.dsv4.random"
--   local tensors = random.tensors(cfg, {seed = 1, device = "cuda", mtp = true})
--   -- tensors["layers.0.attn.wq_a.weight"]: f8e4m3 [1024, 4096] on cuda:0, its ".scale" f8e8m0 [8, 32],
--   -- tensors["layers.3.ffn.experts.17.w1.weight"]: i8 [2048, 2048] (packed FP4), and so on
--
-- Usually reached through `weights.random(cfg, opts)` (dsrt.dsv4.weights), which binds these
-- tensors into the same structure a checkpoint gives.
--
-- What it protects:
--   - Full-size benchmarks need no files: every tensor of any config is generated directly on the
--     device it will live on, one kernel per tensor (the routed experts of a layer as one batched
--     [n_routed_experts, out, in] tensor, handed out as views), so the 20 GB of a four-layer Flash
--     slice take a fraction of a second on an H200, not tens of thousands of tiny launches.
--   - The result is exactly what a checkpoint of that config holds (memory.tensors is the one list
--     of names, dtypes and stored shapes), so the tiny test checkpoint is these tensors written out
--     (scripts/make_tiny_model.lua) and loading it gives back the same bytes.
--   - Determinism: tensor `name` is drawn from dsrt's counter-based generator with the seed
--     FNV-1a-64(seed, name) (63 bits), so it depends on the seed and its own name only — not on
--     the device, the order of generation, or which other tensors exist — and the same seed gives
--     the same bytes on the CPU and on every GPU (dsrt's RNG and conversions are bit-identical).
--   - Activations stay finite through every layer, with the real checkpoint's storage conventions
--     (SPEC §2.1), see MAGNITUDES below.
--
-- MAGNITUDES (why each value):
--   FP8 linears (e4m3 + one power-of-two scale per 128×128 tile): dequantised weights have an RMS
--     of 1/√in, so a unit-RMS input gives unit-RMS outputs through any depth. Each tile's exponent
--     is E or E+1 at random (not one constant), so that a kernel reading the wrong scale tile gives
--     a wrong answer instead of the right one by luck; the codes are N(0, σ²) with
--     σ = 1/(√in · 2^E · √2.5) (√2.5 = the RMS of 2^0 and 2^1) and E chosen so that σ is within √2
--     of 32. A tile's std is then 0.63/√in or 1.26/√in, the whole matrix's 1/√in when it has many
--     tiles. Box–Muller from 53-bit uniforms never exceeds 8.57 standard deviations, so no code
--     exceeds 8.57 · 32√2 = 388 < 448: the e4m3 conversion never saturates and never makes a NaN.
--     Like the real checkpoint's (|code| up to 448), the codes use most of the e4m3 range.
--   FP4 experts (e2m1 codes + an e8m0 scale per 32 inputs of a row): the same rule with σ within √2
--     of 2, so the codes spread over all of 0 … ±6 as the real ones do (a real block scale is
--     amax/6); codes beyond ±6 saturate there, as e2m1 conversion does, which shrinks the RMS by a
--     few percent. The codes are drawn as bf16 and then converted (the contiguous bf16→fp4
--     conversion writes whole bytes; drawing into fp4 directly would update nibbles atomically).
--   bf16 linears (compressor wkv/wgate, indexer weights_proj, gate.weight, head, and every linear of
--     a checkpoint without quantization_config): N(0, 1/in), the same unit-RMS rule.
--   Flash-Base's FP8 scales stored as f32: the same powers of two, as f32.
--   Norm weights (attn_norm, ffn_norm, q_norm, kv_norm, compressor norms, enorm, hnorm, norm): 1, so
--     RMS_w (SPEC §3.1) leaves unit-RMS activations.
--   embed: N(0, 1) bf16. The first block sees it only through hc_pre's RMS normalisation and
--     attn_norm (SPEC §4–5), so its scale is free; 1 keeps the residual streams of the same order
--     as the sub-layer outputs added to them.
--   hc_*_fn [mix_hc or hc, hc·dim]: N(0, 1/(hc·dim)). hc_pre multiplies by rsqrt(mean(x²)) (SPEC §5),
--     so the mixes are N(0, 1): pre = σ(·) ∈ (0.27, 0.73) typically, post = 2σ(·) ∈ (0.5, 1.5), and
--     the Sinkhorn input logits have unit spread — a softmax far from one-hot, so the 20
--     normalisations converge and no ε dominates (SPEC §3.9). hc_*_base: 0 and hc_*_scale: 1, so
--     the mixes alone set those values. hc_head the same (SPEC §4 step 4).
--   attn_sink: 0, a sink weighing like one key with score 0 (SPEC §3.8).
--   ffn.gate.bias: N(0, 0.01²): small next to the spread of the router scores (sqrtsoftplus of
--     unit-variance logits), so it changes a few selections, which shows whether a kernel adds
--     it for selection and leaves it out of the weights (SPEC §7.1).
--   ffn.gate.tid2eid: n_activated_experts distinct expert ids per token, uniform (the top-k of
--     uniform keys, picked by repeated argmax), stored i64 as in the checkpoint (SPEC §2.1).
--   compressor ape: N(0, 0.1²): a position bias small next to the unit-spread gate logits it is
--     added to (SPEC §6.5).
local dsrt = require "dsrt"
local memory = require "dsrt.dsv4.memory"

local random = {}

-- Per-tensor seed: FNV-1a 64 over the 8 bytes of the seed (little-endian), then the name; the top
-- bit cleared so that the seed reads the same as a signed and as an unsigned integer. Lua integer
-- arithmetic wraps around, which is the mod-2^64 arithmetic FNV needs.
local FNV_OFFSET_BASIS = 0xcbf29ce484222325
local FNV_PRIME = 0x100000001b3

function random.tensor_seed(seed, name)
  local h = FNV_OFFSET_BASIS
  for i = 0, 7 do h = (h ~ ((seed >> (8 * i)) & 0xff)) * FNV_PRIME end
  for i = 1, #name do h = (h ~ name:byte(i)) * FNV_PRIME end
  return h & 0x7fffffffffffffff
end

-- Codes of a block-scaled linear: std ≈ NOMINAL_CODE_STD (within √2) for its format.
local NOMINAL_CODE_STD = { fp8 = 32, fp4 = 2 }
-- Each scale tile's exponent is E + k, k uniform in 0 … SCALE_EXPONENT_SPREAD-1; SCALE_RMS is the
-- RMS of those 2^k.
local SCALE_EXPONENT_SPREAD = 2
local SCALE_RMS = math.sqrt((1 + 4) / 2)
local E8M0_BIAS = 127                                  -- e8m0 byte b is 2^(b - 127) (SPEC §2.1)

local GATE_BIAS_STD = 0.01
local APE_STD = 0.1

-- The quantisation of a block-scaled weight entry (memory.tensors form): the centre exponent E
-- of its scales and the std of its codes, so that the dequantised RMS is 1/√in.
local function quantisation(weight, gain)
  local format = weight.dtype == "I8" and "fp4" or "fp8"
  local in_features = format == "fp4" and 2 * weight.shape[2] or weight.shape[2]
  local target = gain * in_features ^ -0.5
  local exponent = math.floor(math.log(target / (NOMINAL_CODE_STD[format] * SCALE_RMS), 2) + 0.5)
  return { exponent = exponent, code_std = target / (2.0 ^ exponent * SCALE_RMS) }
end

-- Scales 2^E or 2^(E+1), drawn as exponent bytes and read as e8m0 (f32 when the checkpoint
-- stores them so, Flash-Base). Integer arithmetic on floats below 2^24 is exact on every device,
-- so the bytes are too.
local function block_scales(shape, q, dtype, rng)
  local uniform <close> = dsrt.rand(shape, { seed = rng.seed, high = SCALE_EXPONENT_SPREAD, device = rng.device })
  local offsets <close> = uniform // 1
  local bytes <close> = offsets + (E8M0_BIAS + q.exponent)
  local scales = bytes:to("u8"):bitcast("f8e8m0")
  if dtype == "F32" then return scales:to("f32") end
  return scales
end

-- e2m1 codes, two per byte (low nibble first), as the checkpoint's I8 [.., out, in/2].
local function fp4_codes(shape, q, rng)
  local logical = table.move(shape, 1, #shape, 1, {})
  logical[#logical] = 2 * logical[#logical]
  local drawn <close> = dsrt.randn(logical, { seed = rng.seed, std = q.code_std, dtype = "bf16", device = rng.device })
  return drawn:to("fp4e2m1"):bitcast("i8")
end

-- [rows, k] distinct expert ids per row, uniform: k rounds of argmax over uniform keys, the key
-- of each picked expert pushed below every other (keys are in [0, 1)) so it cannot win again.
local function distinct_expert_ids(n_experts, shape, rng)
  local rows, k = shape[1], shape[2]
  local keys = dsrt.rand({ rows, n_experts }, { seed = rng.seed, device = rng.device })
  local experts <close> = dsrt.arange(n_experts, { device = rng.device })
  local ids = dsrt.empty({ rows, k }, { dtype = "i64", device = rng.device })
  for j = 1, k do
    local pick <close> = keys:argmax(2)
    ids:select(2, j):copy(pick)
    local picked <close> = experts:eq(pick:view(rows, 1))
    local pushed <close> = picked * 2
    local next_keys = keys - pushed
    keys:close()
    keys = next_keys
  end
  keys:close()
  return ids
end

local function normal(shape, std, dtype, rng)
  return dsrt.randn(shape, { seed = rng.seed, std = std, dtype = dtype, device = rng.device })
end

-- The tensor of one memory.tensors entry, in `shape` (the stored shape, with the expert count in
-- front for batched experts). `entries` finds a scale's weight by name.
local function generate(cfg, entry, entries, shape, rng, gain)
  local name, dtype = entry.name, entry.dtype
  local function constant(value, dt) return dsrt.full(shape, value, { dtype = dt, device = rng.device }) end
  if name:match("%.scale$") then
    return block_scales(shape, quantisation(entries[name:gsub("%.scale$", ".weight")], gain), dtype, rng)
  elseif dtype == "F8_E4M3" then
    return normal(shape, quantisation(entry, gain).code_std, "f8e4m3", rng)
  elseif dtype == "I8" then
    return fp4_codes(shape, quantisation(entry, gain), rng)
  elseif name:match("norm%.weight$") then
    return constant(1, "bf16")
  elseif name:match("hc_%a+_fn$") then
    return normal(shape, entry.shape[2] ^ -0.5, "f32", rng)
  elseif name:match("hc_%a+_base$") or name:match("attn_sink$") then
    return constant(0, "f32")
  elseif name:match("hc_%a+_scale$") then
    return constant(1, "f32")
  elseif name:match("gate%.bias$") then
    return normal(shape, GATE_BIAS_STD, "f32", rng)
  elseif name:match("gate%.tid2eid$") then
    return distinct_expert_ids(cfg.dims.n_routed_experts, shape, rng)
  elseif name:match("%.ape$") then
    return normal(shape, APE_STD, "f32", rng)
  elseif name == "embed.weight" then
    return normal(shape, 1, "bf16", rng)
  elseif dtype == "BF16" and name:match("%.weight$") then
    return normal(shape, gain * entry.shape[2] ^ -0.5, "bf16", rng)
  end
  -- a tensor memory.tensors lists that this file has no rule for is a bug here, not a config problem
  error(string.format("dsv4.random: no rule for tensor %s (%s)", name, dtype), 0)
end

--- Every tensor of the config's checkpoint (MTP included when opts.mtp, default: when the config
--- has MTP layers), by official name, generated on opts.device (default "cpu") from opts.seed
--- (default 0), in the dtype and stored shape a checkpoint holds it (memory.tensors): FP4 experts
--- as i8 [out, in/2], tid2eid as i64. Routed experts are views of one tensor per layer and role.
--- opts.gain (default 1) scales every linear weight's RMS (to gain/√in): below 1 each sub-layer
--- adds less to the residual streams, so the logits depend smoothly on rounding (a model whose
--- reference-precision logits can be compared across devices at a bf16-level tolerance).
function random.tensors(cfg, opts)
  opts = opts or {}
  local seed, device, gain = opts.seed or 0, opts.device or "cpu", opts.gain or 1
  if math.type(seed) ~= "integer" then
    error("dsv4.random: seed must be an integer, got " .. tostring(seed), 2)
  end
  if type(gain) ~= "number" or not (gain > 0 and gain <= 4) then
    error("dsv4.random: gain must be a number in (0, 4], got " .. tostring(gain), 2)
  end
  local with_mtp = opts.mtp
  if with_mtp == nil then with_mtp = #cfg.mtp > 0 end
  local list = memory.tensors(cfg, with_mtp)
  local entries = {}
  for _, entry in ipairs(list) do entries[entry.name] = entry end
  local tensors = {}
  for _, entry in ipairs(list) do
    local rng = { seed = random.tensor_seed(seed, entry.name), device = device }
    if entry.count == 1 then
      tensors[entry.name] = generate(cfg, entry, entries, entry.shape, rng, gain)
    else
      local batch = generate(cfg, entry, entries, { entry.count, table.unpack(entry.shape) }, rng, gain)
      for e = 1, entry.count do
        tensors[(entry.name:gsub("{e}", tostring(e - 1)))] = batch[e]
      end
    end
  end
  return tensors
end

return random
