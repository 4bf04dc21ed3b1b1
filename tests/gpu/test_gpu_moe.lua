-- test_gpu_moe.lua — the MoE layer on CUDA (kernels/moe.cu) against its C implementation
-- (runtime/moe.c): the same layer built from random CPU weights and from their CUDA copies, on fresh
-- random inputs, in both precisions.
--
-- What is compared: routing (ids exactly, except where two experts' keys are a float rounding
-- apart; weights rel 1e-5) and forward (fp32: rel_error <= 1e-5; reference: bf16 outputs
-- rel_error <= 1e-2 and at least 90% of them bit-equal, which only holds when the rounding points
-- are the CPU's). Sizes cross the kernels' tiles: 8 output features per block, 32-column chunks
-- (a width that is not a multiple of 32 takes the scalar weight path), Q8 blocks of 128, 8 staged
-- rows per batch, 32 picks per step of the grouping, the one-kernel router's limits (8 tokens, 256
-- picks; its results must equal the three-kernel path's bit for bit), and the prefill threshold
-- (moe.c PREFILL_ROWS = 256 tokens: from there on the experts run as GEMMs, straight from the
-- packed weights in reference precision when every matrix is FP4/FP8 at widths that are multiples
-- of 64, else as cuBLAS GEMMs on dequantised copies, bf16 in reference precision when every matrix
-- is FP4/FP8, f32 otherwise). Exact ties of
-- the routing keys must go to the lower expert id on both devices. Outputs come from an allocator
-- cache stocked with NaN blocks; NaN never passes (rel_error is NaN then).
--
-- Run on the GPU machine: build/dsrt tests/run.lua tests/gpu/test_gpu_moe.lua
local dsrt = require "dsrt"
local h = require "tests.helpers"
local assert_error, assert_equal = h.assert_error, h.assert_equal

local tests, test = h.suite{ gpu = true }

local seed = 8100
local function next_seed() seed = seed + 1 return seed end

local FP32_TOL, REFERENCE_TOL, WEIGHT_TOL, TIE_TOL = 1e-5, 1e-2, 1e-5, 1e-5
local VOCAB = 1000

-- ---- random layers ----

-- opts: helpers.moe_layer's
local function random_layer(opts) return h.moe_layer(opts, next_seed) end

local to_cuda = h.to_cuda

local function cpu_streams() return { dsrt.stream("cpu"), dsrt.stream("cpu"), dsrt.stream("cpu") } end
local function cuda_streams() return { dsrt.stream("cuda"), dsrt.stream("cuda"), dsrt.stream("cuda") } end

-- the layer on both devices
local function build(dims, ffn)
  return dsrt.moe(dims, ffn, cpu_streams()), dsrt.moe(dims, to_cuda(ffn), cuda_streams()), dims, ffn
end

local function pair(opts) return build(random_layer(opts)) end

local function input(rows, dim, dtype)
  return dsrt.randn({ rows, dim }, { seed = next_seed(), dtype = dtype or "bf16" })
end

local function token_ids(rows)
  return (dsrt.rand({ rows }, { seed = next_seed(), high = VOCAB }) // 1):to("i64")
end

-- ---- poisoning ----

local poison_cache = h.poison_cuda_cache

-- the output and the layer's scratch buffers of a forward over `rows` tokens
local function poison_forward(rows, dims, dim, width)
  local k, n = dims.n_activated_experts, dims.n_routed_experts
  local all = rows * (k + 1)
  poison_cache({ rows * dim * 2, rows * dim * 4, rows * n * 4, rows * k * 8, rows * k * 4, all * width * 4, all * dim * 4,
                 all * dim * 2, all * width * 2, all * width * 8 })
end

-- ---- checks ----

local function check_device(t, what)
  if not dsrt.is_tensor(t) or not t.device:match("^cuda") then error(what .. ": the result is not a CUDA tensor", 3) end
end

-- The routing keys (score + bias, as moe.h defines them) of every expert, per token, from the CPU's
-- f32 gate logits, in double: for judging whether two experts were a rounding apart.
local function routing_keys(dims, ffn, x)
  local bias = ffn.gate.bias and ffn.gate.bias:totable()
  local keys = h.moe_scores(dims.score_func, ffn, x)
  for _, s in ipairs(keys) do
    for e = 1, #s do s[e] = s[e] + (bias and bias[e] or 0) end
  end
  return keys
end

-- ids equal, but where the two experts at a position have keys a float rounding apart
local function check_ids(got, want, keys, what)
  check_device(got, what)
  assert_equal({ got.dtype, got.shape }, { want.dtype, want.shape }, what)
  local g, w = got:to("cpu"):totable(), want:totable()
  for t = 1, #w do
    for j = 1, #w[t] do
      local a, b = g[t][j], w[t][j]
      if a ~= b then
        local ka, kb = keys and keys[t][a + 1], keys and keys[t][b + 1]
        if not (ka and kb and math.abs(ka - kb) <= TIE_TOL * math.max(1, math.abs(kb))) then
          error(string.format("%s: token %d pick %d is expert %s on cuda, %s on cpu (keys %s, %s)", what, t, j,
                              tostring(a), tostring(b), tostring(ka), tostring(kb)), 2)
        end
      end
    end
  end
end

local function check_rel(got, want, tol, what)
  check_device(got, what)
  assert_equal({ got.dtype, got.shape }, { want.dtype, want.shape }, what)
  local r = dsrt.rel_error(got:to("cpu"), want)
  if not (r <= tol) then error(string.format("%s: rel_error %g > %g", what, r, tol), 2) end
  return r
end

-- reference outputs: close, and mostly bit-equal (the same rounding points): at least `equal_min`
-- of them (0.9 unless given)
local function check_forward(got, want, precision, what, equal_min)
  if precision == "fp32" then return check_rel(got, want, FP32_TOL, what) end
  check_rel(got, want, REFERENCE_TOL, what)
  local g, w = got:to("cpu"):to("f32"), want:to("f32")
  local equal = g:eq(w):sum():item() / w:numel()
  if not (equal >= (equal_min or 0.9)) then
    error(string.format("%s: only %.1f%% of the bf16 outputs equal the CPU's", what, 100 * equal), 2)
  end
end

-- forward on both devices (CUDA output poisoned first) and compare
local function compare_forward(cpu, gpu, dims, x, ids, precision, what, width, equal_min)
  local want = cpu:forward(x, ids, precision)
  poison_forward(x.shape[1], dims, x.shape[2], width)
  local got = gpu:forward(x:to("cuda"), ids and ids:to("cuda"), precision)
  check_forward(got, want, precision, what, equal_min)
  return got, want
end

-- compare_forward in both precisions, what naming the case (the precision is appended)
local function compare_both(cpu, gpu, dims, x, ids, what, width)
  for _, precision in ipairs({ "fp32", "reference" }) do
    compare_forward(cpu, gpu, dims, x, ids, precision, what .. " " .. precision, width)
  end
end

local function compare_route(cpu, gpu, dims, ffn, x, ids, what)
  local want_ids, want_w = cpu:route(x, ids)
  poison_forward(x.shape[1], dims, x.shape[2], 1)
  local got_ids, got_w = gpu:route(x:to("cuda"), ids and ids:to("cuda"))
  check_ids(got_ids, want_ids, not ids and routing_keys(dims, ffn, x), what .. " ids")
  check_rel(got_w, want_w, WEIGHT_TOL, what .. " weights")
end

-- ---- routing ----

test("learned_routing_matches_the_cpu_for_every_score_function", function()
  for _, changes in ipairs({
    { score_func = "sqrtsoftplus" },
    { score_func = "sigmoid" },
    { score_func = "softmax" },
    { score_func = "softmax", norm_topk_prob = true, route_scale = 2.5 },
    { score_func = "sqrtsoftplus", norm_topk_prob = false },
  }) do
    changes.n, changes.k, changes.dim, changes.inter = 40, 6, 200, 32
    local cpu, gpu, dims, ffn = pair(changes)
    for _, rows in ipairs({ 1, 2, 17, 64 }) do
      local x = input(rows, 200)
      compare_route(cpu, gpu, dims, ffn, x, nil, string.format("%s norm %s T=%d", dims.score_func,
                    tostring(changes.norm_topk_prob), rows))
    end
  end
end)

test("routing_over_256_experts_with_f32_input", function()
  local cpu, gpu, dims, ffn = pair({ n = 256, k = 6, dim = 64, inter = 32, shared_inter = 32 })
  for _, rows in ipairs({ 1, 5, 33 }) do
    compare_route(cpu, gpu, dims, ffn, input(rows, 64, "f32"), nil, "256 experts T=" .. rows)
  end
end)

test("hash_routing_matches_the_cpu", function()
  local cpu, gpu, dims, ffn = pair({ routing = "hash", k = 4 })
  for _, rows in ipairs({ 1, 16, 64 }) do
    local x, ids = input(rows, 320), token_ids(rows)
    local want_ids = cpu:route(x, ids)
    local got_ids, got_w = gpu:route(x:to("cuda"), ids:to("cuda"))
    check_ids(got_ids, want_ids, nil, "hash T=" .. rows)
    check_rel(got_w, select(2, cpu:route(x, ids)), WEIGHT_TOL, "hash weights T=" .. rows)
  end
  -- i32 ids, a strided view of them
  local x, ids = input(6, 320), token_ids(12):to("i32"):view(6, 2):select(2, 2)
  check_ids(gpu:route(x:to("cuda"), ids:to("cuda")), cpu:route(x, ids), nil, "hash with strided i32 ids")
  assert_equal(ffn.gate.tid2eid.dtype, "i32")
end)

-- ---- the decode router ----
-- Up to 8 tokens (and 256 picks) route through two kernels (moe.cu moe_gate_kernel, the gate over
-- the whole GPU, then moe_route_one_kernel, one block routing and grouping); more tokens through the gate
-- projection, moe_route_kernel and moe_group_kernel. Both must give the CPU's routing and each
-- other's bits: slices of 1..8 rows of a 24-row batch are checked against the CPU and, exactly,
-- against the batch's rows.

local function exact(got, want, what)
  check_device(got, what)
  assert_equal({ got.dtype, got.shape }, { want.dtype, want.shape }, what)
  local g, w = got:to("cpu"), want:to("cpu")
  if g.dtype == "f32" then g, w = g:bitcast("i32"), w:bitcast("i32") end -- bits: NaN equals only the same NaN
  local same = g:eq(w):sum():item()
  if same ~= w:numel() then error(string.format("%s: %d of %d values differ", what, w:numel() - same, w:numel()), 2) end
end

-- route on both devices: slices of 1..8 rows against the CPU and against the 24-row batch on CUDA
local function check_router_slices(cpu, gpu, dims, ffn, x, ids, what)
  local dim = x.shape[2]
  poison_forward(24, dims, dim, 1)
  local all_ids, all_w = gpu:route(x:to("cuda"), ids and ids:to("cuda"))
  for rows = 1, 8 do
    local first = 1 + (rows * 5) % (25 - rows) -- slices start at odd rows too: x read at an offset
    local xs, is = x:narrow(1, first, rows), ids and ids:narrow(1, first, rows)
    local label = string.format("%s T=%d", what, rows)
    compare_route(cpu, gpu, dims, ffn, xs, is, label)
    poison_forward(rows, dims, dim, 1)
    local got_ids, got_w = gpu:route(xs:to("cuda"), is and is:to("cuda"))
    exact(got_ids, all_ids:narrow(1, first, rows), label .. " ids vs the 24-token path")
    exact(got_w, all_w:narrow(1, first, rows), label .. " weights vs the 24-token path")
  end
end

test("router_at_1_to_8_tokens_matches_the_cpu_and_the_many_token_path", function()
  for _, opts in ipairs({
    { n = 12, k = 3, dim = 320 },                                  -- fewer experts than a warp has lanes
    { n = 37, k = 5, dim = 200, score_func = "sigmoid" },          -- 37 blocks of one gate row
    { n = 9, k = 2, dim = 198, score_func = "softmax" },           -- dim % 32 and % 4: the scalar gate, scalar staging
    { n = 300, k = 7, dim = 96, norm_topk_prob = false },          -- lanes with 9 and 10 experts, 3 rows a block
    { n = 40, k = 6, dim = 512, dtype = "f32", score_func = "softmax", norm_topk_prob = true, route_scale = 2.5 },
    { n = 256, k = 6, dim = 4096 },                                -- Flash's gate
  }) do
    opts.inter, opts.shared_inter = 32, 32
    local cpu, gpu, dims, ffn = pair(opts)
    check_router_slices(cpu, gpu, dims, ffn, input(24, opts.dim, opts.dtype), nil,
                        string.format("n %d k %d dim %d %s", opts.n, opts.k, opts.dim, dims.score_func))
  end
end)

test("router_hash_routing_at_1_to_8_tokens", function()
  local cpu, gpu, dims, ffn = pair({ routing = "hash", n = 40, k = 6, dim = 264, inter = 32, shared_inter = 32 })
  check_router_slices(cpu, gpu, dims, ffn, input(24, 264), token_ids(24), "hash")
  -- i32 ids through a strided view
  local x, ids = input(5, 264), token_ids(10):to("i32"):view(5, 2):select(2, 1)
  check_ids(gpu:route(x:to("cuda"), ids:to("cuda")), cpu:route(x, ids), nil, "hash with strided i32 ids")
end)

-- gate rows repeated R times (copy r of row g is expert r·G + g: copies on the same lane and on
-- others), with equal biases: exact ties, which must go to the lower id on both devices
local function tied_layer(G, R, opts)
  local dims, ffn = random_layer(opts)
  local dim = opts.dim
  local base = dsrt.randn({ 1, G, dim }, { seed = next_seed(), std = 2 / math.sqrt(dim) })
  ffn.gate.weight = base:expand(R, G, dim):reshape(R * G, dim):to("bf16")
  ffn.gate.bias = dsrt.randn({ 1, G }, { seed = next_seed(), std = 0.05 }):expand(R, G):reshape(R * G)
  return dims, ffn
end

test("router_ties_go_to_the_lower_expert_id", function()
  -- n 64 = 16 groups of 4 tied experts, k 6: ties inside the top 6 and across its edge
  local cpu, gpu, dims, ffn = build(tied_layer(16, 4, { n = 64, k = 6, dim = 128, inter = 32, shared_inter = 32 }))
  for rows = 1, 8 do
    local x = input(rows, 128)
    poison_forward(rows, dims, 128, 1)
    local got_ids = gpu:route(x:to("cuda"))
    exact(got_ids, cpu:route(x), "tied groups T=" .. rows)
  end
  check_router_slices(cpu, gpu, dims, ffn, input(24, 128), nil, "tied groups")
  -- sigmoid saturates to 1 for large logits: many experts tie at exactly 1 with a zero bias
  local sat_dims, sat_ffn = random_layer({ n = 80, k = 8, dim = 64, inter = 32, shared_inter = 32, score_func = "sigmoid" })
  sat_ffn.gate.bias = dsrt.zeros({ 80 })
  local c, g = build(sat_dims, sat_ffn)
  for rows = 1, 8 do
    local x = input(rows, 64) * 200
    local want_ids, want_w = c:route(x)
    poison_forward(rows, sat_dims, 64, 1)
    local got_ids, got_w = g:route(x:to("cuda"))
    exact(got_ids, want_ids, "saturated sigmoid T=" .. rows)
    check_rel(got_w, want_w, WEIGHT_TOL, "saturated sigmoid weights T=" .. rows)
  end
end)

test("router_with_more_gate_rows_than_a_block_has_warps", function()
  -- 1100 experts: 9 gate rows a block on a 132-multiprocessor GPU (warps take two); k 32 at 8
  -- tokens is 256 picks, the most the one-kernel router groups, k 33 goes to the three kernels
  for _, k in ipairs({ 32, 33 }) do
    local cpu, gpu, dims, ffn = pair({ n = 1100, k = k, dim = 64, inter = 16, shared_inter = 16 })
    for _, rows in ipairs({ 1, 3, 8 }) do
      local x = input(rows, 64)
      compare_route(cpu, gpu, dims, ffn, x, nil, string.format("1100 experts k %d T=%d", k, rows))
      compare_forward(cpu, gpu, dims, x, nil, "fp32", string.format("1100 experts k %d T=%d forward", k, rows), 16)
    end
  end
end)

test("forward_through_the_router_equals_the_many_token_path_bit_for_bit", function()
  -- inter 128: every matrix on fp8mma.cuh's tensor-core tile in reference precision; 198: the scalar paths
  for _, opts in ipairs({ { n = 40, k = 6 }, { routing = "hash", n = 40, k = 6 }, { n = 40, k = 6, inter = 128, shared_inter = 128 },
                          { n = 9, k = 2, dim = 198, inter = 40 } }) do
    local dim = opts.dim or 320
    local cpu, gpu, dims = pair(opts)
    local x, ids = input(24, dim), opts.routing and token_ids(24)
    for _, precision in ipairs({ "fp32", "reference" }) do
      local all = gpu:forward(x:to("cuda"), ids and ids:to("cuda"), precision)
      for rows = 1, 8 do
        local first = 1 + (rows * 7) % (25 - rows)
        local xs, is = x:narrow(1, first, rows), ids and ids:narrow(1, first, rows)
        local what = string.format("%s n %d T=%d %s", opts.routing or "learned", opts.n, rows, precision)
        local got = compare_forward(cpu, gpu, dims, xs, is, precision, what, 160)
        exact(got, all:narrow(1, first, rows), what .. " vs the 24-token path")
      end
    end
  end
end)

test("hash_rows_that_pick_one_expert_twice", function()
  -- a malformed tid2eid row counts both picks (moe.h): groups of two rows from one token
  local dims, ffn = random_layer({ routing = "hash", n = 12, k = 4 })
  local t = ffn.gate.tid2eid:to("i64"):totable()
  t[1] = { 5, 5, 5, 5 }
  t[2] = { 0, 11, 0, 11 }
  t[3] = { 11, 3, 3, 0 }
  ffn.gate.tid2eid = dsrt.tensor(t, { dtype = "i32" })
  local cpu, gpu = build(dims, ffn)
  for _, rows in ipairs({ 1, 3, 8, 12 }) do
    local ids = dsrt.tensor({ 0, 1, 2, 0, 2, 1, 0, 4, 1, 2, 0, 1 }, { dtype = "i64" }):narrow(1, 1, rows)
    local x = input(rows, 320)
    compare_both(cpu, gpu, dims, x, ids, string.format("repeated picks T=%d", rows), 160)
  end
end)

-- ---- the layer ----

test("forward_matches_the_cpu_at_every_batch_size_in_both_precisions", function()
  local cpu, gpu, dims = pair({})
  for _, rows in ipairs({ 1, 2, 5, 16, 17, 64 }) do
    local x = input(rows, 320)
    compare_both(cpu, gpu, dims, x, nil, string.format("fp4 learned T=%d", rows), 160)
  end
end)

-- Flash's width stages 1-8 rows of 4096 inputs (16 KiB each) in shared memory: 3 rows are exactly
-- the 48 KiB default, which with the kernel's static arrays needs the opt-in (a launch failed there)
test("forward_at_flash_width_for_every_staged_row_count", function()
  local cpu, gpu, dims = pair({ dim = 4096, n = 4, k = 2, inter = 64, shared_inter = 64 })
  for rows = 1, 9 do
    local x = input(rows, 4096)
    compare_forward(cpu, gpu, dims, x, nil, "reference", string.format("dim 4096 T=%d", rows), 4096)
  end
end)

-- Every width a multiple of 256: decode's UP and DOWN run on kernels/wgtile.cuh's warpgroup tile
-- (wgmma on e4m3). Its tensor cores sum each 32 (FP4) or 128 (FP8) products with about 14
-- significant bits, as DeepSeek's own kernels do (SPEC §3.5), not fp32's 24: more bf16 roundings
-- fall the other way than on the mma.sync tile's exact sums, hence the lower share of equal bits
-- (the relative error bound is the same). Routed experts narrower than the shared one take
-- half-height tiles (8 rows a warp) in UP, and the other way round the shared FP8 expert does.
local WG_EQUAL = 0.5
local function wg_layers()
  return { { dim = 512, inter = 256, shared_inter = 512, n = 8, k = 3 },
           { dim = 512, inter = 512, shared_inter = 256, n = 8, k = 3, routing = "hash" } }
end

test("forward_on_the_warpgroup_tile_matches_the_cpu", function()
  for _, opts in ipairs(wg_layers()) do
    local cpu, gpu, dims = pair(opts)
    for _, rows in ipairs({ 1, 2, 3, 8, 9, 17 }) do
      local x, ids = input(rows, opts.dim), opts.routing == "hash" and token_ids(rows) or nil
      local what = string.format("inter %d shared %d T=%d", opts.inter, opts.shared_inter, rows)
      compare_forward(cpu, gpu, dims, x, ids, "reference", what, 2 * opts.dim, WG_EQUAL)
    end
  end
end)

test("warpgroup_tile_with_f32_scales_on_the_shared_expert", function()
  local dims, ffn = random_layer({ dim = 512, inter = 256, shared_inter = 256, n = 4, k = 2 })
  for _, w in pairs(ffn.shared_experts) do w.scale = w.scale:to("f32") end
  local cpu, gpu = build(dims, ffn)
  for _, rows in ipairs({ 1, 5 }) do
    compare_forward(cpu, gpu, dims, input(rows, 512), nil, "reference", "f32 scales T=" .. rows, 1024, WG_EQUAL)
  end
end)

test("warpgroup_tile_batched_equals_token_by_token", function()
  local _, gpu = pair({ dim = 512, inter = 256, shared_inter = 512, n = 8, k = 3, routing = "hash" })
  local x, ids = input(11, 512):to("cuda"), token_ids(11):to("cuda")
  local y = gpu:forward(x, ids, "reference")
  for t = 1, 11 do
    local one = gpu:forward(x:narrow(1, t, 1), ids:narrow(1, t, 1), "reference")
    assert_equal(dsrt.max_abs_diff(one[1]:to("cpu"), y[t]:to("cpu")), 0, "token " .. t)
  end
end)

-- Up to 4 tokens of a hash layer on the warpgroup tile route beside UP (kernels.h
-- dsrtk_moe_route_up: the picks first, the weights from one block of UP's launch, which its other
-- blocks wait for); more tokens run the router and then UP. Both must give the same bits: slices
-- of 1-4 tokens against the rows of a 9-token batch, with a malformed tid2eid row (one expert
-- picked twice), a token outside the vocabulary (NaN row) and calls one after another (the launch's
-- ticket and flag start from zero each time).
test("hash_routing_beside_up_equals_the_router_then_up", function()
  local dims, ffn = random_layer(wg_layers()[2])
  local t = ffn.gate.tid2eid:to("i64"):totable()
  t[4] = { 6, 2, 6 }
  ffn.gate.tid2eid = dsrt.tensor(t, { dtype = "i32" })
  local cpu, gpu = build(dims, ffn)
  local ids = dsrt.tensor({ 3, 17, VOCAB, 3, 999, 40, 5, 3, 0 }, { dtype = "i64" })
  local x = input(9, 512)
  poison_forward(9, dims, 512, 1024)
  local all = gpu:forward(x:to("cuda"), ids:to("cuda"), "reference")
  for rows = 1, 4 do
    for first = 1, 10 - rows, 2 do
      local xs, is = x:narrow(1, first, rows), ids:narrow(1, first, rows)
      local label = string.format("T=%d from row %d", rows, first)
      poison_forward(rows, dims, 512, 1024)
      local got = gpu:forward(xs:to("cuda"), is:to("cuda"), "reference")
      exact(got:to("f32"), all:narrow(1, first, rows):to("f32"), label) -- f32: NaN compared by its bits
    end
  end
  local nan = all:to("cpu")[3]
  assert_equal(nan:ne(nan):sum():item(), 512, "the token outside the vocabulary")
  local valid = dsrt.tensor({ 3, 17, 3, 999 }, { dtype = "i64" })
  compare_forward(cpu, gpu, dims, x:narrow(1, 1, 4), valid, "reference", "T=4 against the CPU", 1024, WG_EQUAL)
end)

-- an e8m0 NaN (0xff) in one FP4 scale of w2 makes that output column NaN for every token routed
-- there (every token: k = n), on both devices, and nothing else
test("warpgroup_tile_nan_scale_poisons_its_rows_only", function()
  local dims, ffn = random_layer({ dim = 512, inter = 256, shared_inter = 256, n = 3, k = 3 })
  ffn.experts[2].w2.scale:narrow(1, 6, 1):narrow(2, 3, 1):copy(dsrt.full({ 1, 1 }, 0 / 0):to("f8e8m0"))
  local cpu, gpu = build(dims, ffn)
  local x = input(4, 512)
  local want, got = cpu:forward(x, nil, "reference"), gpu:forward(x:to("cuda"), nil, "reference"):to("cpu")
  for t = 1, 4 do
    assert_equal({ got[t]:ne(got[t]):sum():item(), want[t]:ne(want[t]):sum():item() }, { 1, 1 }, "NaNs of token " .. t)
    assert(got[t][6]:item() ~= got[t][6]:item(), "token " .. t .. ": column 6 is not NaN")
  end
end)

test("forward_with_hash_routing_and_every_score_function", function()
  local cpu, gpu, dims = pair({ routing = "hash" })
  for _, rows in ipairs({ 1, 16, 17 }) do
    local x, ids = input(rows, 320), token_ids(rows)
    compare_both(cpu, gpu, dims, x, ids, string.format("hash T=%d", rows), 160)
  end
  for _, score_func in ipairs({ "sigmoid", "softmax" }) do
    local c, g, d = pair({ score_func = score_func })
    for _, precision in ipairs({ "fp32", "reference" }) do -- a fresh input for each precision
      compare_forward(c, g, d, input(17, 320), nil, precision, score_func .. " " .. precision, 160)
    end
  end
end)

test("forward_with_fp8_and_bf16_experts", function()
  for _, formats in ipairs({ { "fp8", "fp8" }, { "bf16", "fp8" }, { "fp4", "bf16" } }) do
    local cpu, gpu, dims = pair({ format = formats[1], shared_format = formats[2], inter = 136, shared_inter = 136 })
    for _, rows in ipairs({ 5, 17 }) do
      local x = input(rows, 320, "f32")
      compare_both(cpu, gpu, dims, x, nil, string.format("%s experts, %s shared, T=%d", formats[1], formats[2], rows), 136)
    end
  end
end)

test("prefill_gemms_match_the_cpu_around_the_threshold", function()
  -- 255 tokens: the decode kernels; 256 and 300: gather, dequantise, GEMM, SwiGLU, GEMM, combine
  local cpu, gpu, dims = pair({})
  for _, rows in ipairs({ 255, 256, 300 }) do
    local x = input(rows, 320)
    compare_both(cpu, gpu, dims, x, nil, string.format("prefill T=%d", rows), 160)
  end
  -- hash routing, softmax scores, f32 input
  local c, g, d = pair({ routing = "hash", score_func = "softmax" })
  local x, ids = input(270, 320, "f32"), token_ids(270)
  compare_both(c, g, d, x, ids, "prefill hash softmax", 160)
end)

test("prefill_from_the_packed_weights_matches_the_cpu", function()
  -- every matrix `mma` (widths multiples of 64): reference prefill multiplies straight from the
  -- FP4 / FP8 bytes (moe.cu moe_prefill_gemm_kernel: 128 outputs x a tile of up to 128 of a group's
  -- rows, the wgmma's width the tile's rows rounded up to 32): groups of ~20 to ~110 rows take
  -- every width, the shared expert's 256 / 333 rows split into even tiles, dim 320 leaves DOWN's
  -- last column block short, K runs from one step (inter 64) to five (dim 320), and a narrower
  -- set skips the launch's widest blocks. FP4 scales of 2^-1 .. 2^3 take the two-multiply path
  -- (e >= 128) beside the one-multiply path in the same warps.
  for _, c in ipairs({
    { format = "fp4", shared_format = "fp8", inter = 128, shared_inter = 192 },
    { format = "fp4", shared_format = "fp8", inter = 192, shared_inter = 64 }, -- the FP8 linear's shared expert, narrower
    { format = "fp8", shared_format = "fp8", inter = 64, shared_inter = 128, n = 7, k = 2 },
    { format = "fp4", shared_format = "fp4", inter = 192, shared_inter = 64, routing = "hash", score_func = "softmax" },
    { format = "fp4", shared_format = "fp4", inter = 128, shared_inter = 64, n = 24, k = 2, fp4_scales = { -1, 3 } },
  }) do
    c.dim, c.n, c.k = 320, c.n or 12, c.k or 3
    local cpu, gpu, dims = pair(c)
    for _, rows in ipairs({ 256, 333 }) do
      local x, ids = input(rows, 320), c.routing == "hash" and token_ids(rows) or nil
      compare_forward(cpu, gpu, dims, x, ids, "reference",
                      string.format("packed prefill %s experts, %s shared, inter %d/%d, T=%d", c.format, c.shared_format,
                                    c.inter, c.shared_inter, rows), math.max(c.inter, c.shared_inter))
    end
  end
end)

test("prefill_on_the_aux_streams_equals_one_stream_bit_for_bit", function()
  -- with aux streams the experts' slabs run on two lanes side by side (moe.c cuda_prefill); each
  -- slab is the same calls on another stream, so the result may not change by a bit. 24 experts
  -- and the shared one: 4 slabs of up to 8 groups (DSRTK_MOE_SLAB), the last one short. Widths of
  -- 64s: reference precision multiplies from the packed weights, and the FP8 shared expert runs
  -- through the FP8 linear on an aux stream beside the routed GEMM
  for _, opts in ipairs({ { n = 24, k = 4 }, { n = 24, k = 4, inter = 128, shared_inter = 192 } }) do
    local dims, ffn = random_layer(opts)
    local dev = to_cuda(ffn)
    local lanes, alone = dsrt.moe(dims, dev, cuda_streams()), dsrt.moe(dims, dev, {})
    local width = math.max(opts.inter or 96, opts.shared_inter or 160)
    for _, rows in ipairs({ 256, 333 }) do
      local x = input(rows, 320):to("cuda")
      for _, precision in ipairs({ "fp32", "reference" }) do
        poison_forward(rows, dims, 320, width)
        local a = lanes:forward(x, nil, precision)
        poison_forward(rows, dims, 320, width)
        local b = alone:forward(x, nil, precision)
        local what = string.format("inter %d T=%d %s", opts.inter or 96, rows, precision)
        assert_equal(a:ne(a):sum():item(), 0, what .. ": no NaN from the lanes")
        assert_equal(a:ne(b):sum():item(), 0, what .. ": lanes differ from one stream")
      end
    end
  end
end)

test("prefill_with_bf16_and_fp8_experts_and_odd_widths", function()
  -- bf16 experts: f32 GEMMs in fp32, the decode kernels in reference (the copies would not be exact)
  for _, formats in ipairs({ { "fp8", "fp8" }, { "bf16", "fp8" }, { "fp4", "bf16" } }) do
    local cpu, gpu, dims = pair({ format = formats[1], shared_format = formats[2], inter = 136, shared_inter = 136 })
    local x = input(261, 320)
    compare_both(cpu, gpu, dims, x, nil, string.format("prefill %s experts, %s shared", formats[1], formats[2]), 136)
  end
  -- dim 200, inter 76 / 52: scalar dequantisation, short Q8 blocks, GEMMs on odd leading dimensions
  local cpu, gpu, dims = pair({ dim = 200, inter = 76, shared_inter = 52, k = 2, n = 9 })
  local x = input(290, 200)
  compare_both(cpu, gpu, dims, x, nil, "prefill dim 200", 76)
  -- dim 198: rows no multiple of 4 (the combine's and the row passes' element paths)
  cpu, gpu, dims = pair({ dim = 198, inter = 76, shared_inter = 52, k = 2, n = 9 })
  for _, rows in ipairs({ 5, 290 }) do compare_both(cpu, gpu, dims, input(rows, 198), nil, "dim 198 T=" .. rows, 76) end
end)

test("forward_with_widths_off_the_32_column_chunks", function()
  -- dim 200 and inter 76: every matrix takes the scalar weight path, and Q8 blocks end short
  local cpu, gpu, dims = pair({ dim = 200, inter = 76, shared_inter = 52, k = 2, n = 9 })
  for _, rows in ipairs({ 1, 17, 64 }) do
    local x = input(rows, 200)
    compare_both(cpu, gpu, dims, x, nil, string.format("dim 200 T=%d", rows), 76)
  end
end)

test("clamp_and_route_scale_cases", function()
  -- large inputs push the projections far past the limit; limit 0 means no clamp; 7.3 is no bf16
  -- value (the prefill SwiGLU's table holds bf16 g's exps, a clamped g computes its own); 9 rows
  -- take the decode kernels, 300 the prefill's
  for _, changes in ipairs({ { swiglu_limit = 10 }, { swiglu_limit = 7.3 }, { swiglu_limit = 0 }, { route_scale = 0 } }) do
    local cpu, gpu, dims = pair(changes)
    for _, rows in ipairs({ 9, 300 }) do
      local x = input(rows, 320) * 30
      compare_both(cpu, gpu, dims, x, nil, string.format("limit %s scale %s T=%d", tostring(dims.swiglu_limit),
                                                         tostring(dims.route_scale), rows), 160)
    end
  end
end)

test("batched_forward_equals_token_by_token_on_cuda", function()
  local _, gpu = pair({ routing = "hash" })
  local x, ids = input(7, 320):to("cuda"), token_ids(7):to("cuda")
  for _, precision in ipairs({ "fp32", "reference" }) do
    local y = gpu:forward(x, ids, precision)
    for t = 1, 7 do
      local one = gpu:forward(x:narrow(1, t, 1), ids:narrow(1, t, 1), precision)
      assert_equal(dsrt.max_abs_diff(one[1]:to("cpu"), y[t]:to("cpu")), 0, precision .. " token " .. t)
    end
  end
end)

test("leading_dimensions_and_empty_input", function()
  local cpu, gpu, dims = pair({ routing = "hash" })
  local x, ids = dsrt.randn({ 2, 3, 320 }, { seed = next_seed(), dtype = "bf16" }), token_ids(6):view(2, 3)
  local got = compare_forward(cpu, gpu, dims, x:view(6, 320), ids:view(6), "reference", "flat", 160)
  local shaped = gpu:forward(x:to("cuda"), ids:to("cuda"), "reference")
  assert_equal(shaped.shape, { 2, 3, 320 })
  assert_equal(dsrt.max_abs_diff(shaped:view(6, 320):to("cpu"), got:to("cpu")), 0)
  local e_ids, e_w = gpu:route(x:to("cuda"), ids:to("cuda"))
  assert_equal({ e_ids.shape, e_w.shape }, { { 2, 3, 3 }, { 2, 3, 3 } })
  local empty = gpu:forward(dsrt.zeros({ 0, 320 }, { device = "cuda", dtype = "bf16" }),
                            dsrt.zeros({ 0 }, { device = "cuda", dtype = "i64" }), "fp32")
  assert_equal({ empty.shape, empty.dtype, empty.device }, { { 0, 320 }, "f32", "cuda:0" })
end)

test("nan_inputs_propagate_and_still_select_valid_experts", function()
  local _, gpu = pair({})
  local x = dsrt.full({ 3, 320 }, 0 / 0, { dtype = "bf16", device = "cuda" })
  local ids = gpu:route(x)
  assert(ids:min():item() >= 0 and ids:max():item() < 12, "invalid expert ids for NaN scores")
  local y = gpu:forward(x, nil, "fp32")
  assert_equal(y:ne(y):sum():item(), y:numel())
end)

test("token_ids_outside_the_vocabulary_give_nan_rows", function()
  local _, gpu = pair({ routing = "hash" })
  local x = input(3, 320):to("cuda")
  local y = gpu:forward(x, dsrt.tensor({ 1, VOCAB, 2 }, { dtype = "i64", device = "cuda" }), "fp32"):to("cpu")
  assert_equal(y[2]:ne(y[2]):sum():item(), 320)
  assert_equal(y[1]:ne(y[1]):sum():item() + y[3]:ne(y[3]):sum():item(), 0)
end)

-- ---- errors ----

test("errors_name_the_problem", function()
  local cpu, gpu, dims, ffn = pair({ routing = "hash" })
  local x, ids = input(3, 320), token_ids(3)
  assert_error(function() gpu:forward(x, ids) end, "the weights %(on cuda:0%) and the stream must be on one device")
  assert_error(function() cpu:forward(x:to("cuda"), ids:to("cuda")) end, "the weights %(on cpu%) and the stream")
  assert_error(function() gpu:forward(x:to("cuda"), ids) end, "are on different devices")
  assert_error(function() gpu:forward(input(3, 321):to("cuda"), ids:to("cuda")) end, "must end in the layer's 320 input features")
  assert_error(function() gpu:forward(x:to("cuda")) end, "hash routing %(tid2eid%) needs the token ids")
  assert_error(function() gpu:route(x:to("cuda"), ids:to("cuda"):to("f32")) end, "must be i32 or i64")
  -- weights on two devices
  local mixed = to_cuda(ffn)
  mixed.experts[2] = ffn.experts[2]
  assert_error(function() dsrt.moe(dims, mixed, cuda_streams()) end, "experts.1.w1 is on cpu, the gate on cuda:0")
  assert_error(function() dsrt.moe(dims, to_cuda(ffn), cpu_streams()) end, "aux stream 1 is on cpu")
  -- a tid2eid id outside the experts is refused on first use, before any kernel reads it
  local bad = to_cuda(ffn)
  bad.gate = { weight = bad.gate.weight, tid2eid = dsrt.full({ VOCAB, 3 }, 12, { dtype = "i32", device = "cuda" }) }
  local layer = dsrt.moe(dims, bad, cuda_streams())
  assert_error(function() layer:forward(x:to("cuda"), ids:to("cuda")) end, "holds expert id 12, outside %[0, 12%)")
end)

return tests
