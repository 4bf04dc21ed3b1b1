/*
 * moe.cu - DeepSeek-V4's mixture-of-experts layer on the GPU (runtime/moe.h): the router (gate
 * logits, scores, top-k or hash selection, weights), the grouping of picks by expert, the SwiGLU
 * experts read straight from their packed FP4 / FP8 / bf16 weights, and the combine.
 *
 * What this file protects: the reference's MoE numerics (moe.h; the readable reference is
 * runtime/moe.c: route_rows, select_top, run_swiglu, combine_experts) computed without a
 * dequantised copy of any weight in device memory and without a host synchronisation inside the
 * layer: expert ids stay on the device, and every kernel is sized for the worst case and reads
 * the real counts from device memory.
 *
 * Numerics against the C implementation:
 *   - the rounding points are the CPU's: projections' outputs bf16-rounded in reference precision,
 *     Q8 round trips (quant.h, the same functions) in front of FP8/FP4 matrices, bf16(h) before
 *     w2, y summed from 0 in f32 over routed rows in ascending expert id then the shared row;
 *   - the routing's arithmetic is the CPU's, in the CPU's order (softmax's sum sequential, the
 *     bias added in f32, top-k ties to the lower id, the weights' sum sequential over k), with
 *     exp and log1p computed in double and rounded once, which nearly always gives glibc's expf /
 *     log1pf bits (CUDA's own expf is up to 2 ulp off);
 *   - dot products are NOT in the CPU's order: each warp splits the input features over its 32
 *     lanes in 32-column chunks and sums the lanes as a fixed tree, so results are fp32
 *     reorderings (~1e-6 relative) of the CPU's, and independent of how tokens are batched
 *     (every row's sum has the same shape whichever batch slot it sits in).
 *
 * The projection kernel (moe_project_kernel) serves the gate, w1/w3 + SwiGLU and w2: a block
 * takes 8 output features (one per warp) of one group of rows (an expert and the rows routed to
 * it), stages up to TB_MAX input rows in shared memory and streams the 8 weight rows once per
 * batch of rows, so at decode (a handful of rows per expert) every selected expert's weights are
 * read once. Per 32-column chunk a lane loads 16 bytes of fp4 (32 of fp8, 64 of bf16) and one
 * scale. Bytes per decode step (Flash, T = 1): 6 routed + 1 shared expert, each w1, w2, w3 of
 * 2048 x 4096: fp4 0.5 B + 1/32 B of scale per weight = 3 x 8.4M x 0.53 B = 13.4 MB per routed
 * expert, the fp8 shared expert 25.2 MB, the bf16 gate 2 MB: ~108 MB, ~25 us at 4.3 TB/s.
 * FLOPs: 2 per weight per row. Staged inputs are laid out with an XOR swizzle of the 16-byte
 * words inside each chunk, so the 32 lanes of a warp (each on its own chunk) read them without
 * bank conflicts.
 */
#include <math.h>
#include "common.cuh"
#include "quant.h"

enum { WARPS = 8, BLOCK = WARPS * 32, TB_MAX = 8, CHUNK = 32 };
enum { ACT_BLOCK = 128 }; /* linear.h's DSRT_ACT_BLOCK: the Q8 block of activations */
/* shared memory for the staged rows: at most this much, so several blocks share a multiprocessor */
static const int STAGE_BYTES = 96 * 1024;

/* ---- element math (the CPU's formulas, moe.c) ---- */

/* glibc's expf and log1pf are (nearly) correctly rounded; double evaluation rounded once matches them */
__device__ __forceinline__ float exp_f32(float x) { return (float)exp((double)x); }
__device__ __forceinline__ float log1p_f32(float x) { return (float)log1p((double)x); }
__device__ __forceinline__ float round_bf16(float v) { return dsrt_bf16_to_f32(dsrt_f32_to_bf16(v)); }
/* opmath.h's DSRT_OP_SILU and DSRT_OP_SIGMOID with exp_f32 */
__device__ __forceinline__ float silu_f32(float x) { return x / (1.0f + exp_f32(-x)); }
__device__ __forceinline__ float sigmoid_f32(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

/* e4m3 code -> f32 without branches (elementwise.cu's e4m3_to_f32, checked there against
 * numeric.h's dsrt_e4m3_to_f32 on all 256 codes) */
__device__ __forceinline__ float e4m3_value(uint32_t b)
{
    uint32_t sign = (b & 0x80u) << 24, em = b & 0x7fu;
    float subnormal = dsrt_bits_f32((121u << 23) | (em << 20)) - 0.015625f; /* m * 2^-9 */
    uint32_t magnitude = em == 0x7fu ? 0x7fc00000u : em < 8u ? dsrt_f32_bits(subnormal) : (em << 20) + (120u << 23);
    return dsrt_bits_f32(sign | magnitude);
}

/* ---- weights ---- */

__device__ __forceinline__ float scale_at(const dsrtk_moe_matrix &m, int64_t row, int64_t col)
{
    int64_t i = m.scale_offset + row / m.block_rows * m.scale_stride0 + col / m.block_cols * m.scale_stride1;
    return dsrt_load_f32(m.scale, m.scale_dtype, i);
}

/* The 32 weights of row `row`, columns 32c .. 32c+31, dequantised exactly as linear.c's
 * dequantise_transposed does (code value, times the scale when there is one); 0 past the last
 * column. */
__device__ __forceinline__ void load_chunk(const dsrtk_moe_matrix &m, int64_t row, int c, const float *lut, float (&w)[CHUNK])
{
    int64_t col0 = (int64_t)c * CHUNK;
    if (m.vector) { /* the host checked: stride1 1, 16-byte aligned rows, cols % 32 == 0, block_cols % 32 == 0 */
        int64_t first = m.offset + row * m.stride0 + col0;
        if (m.dtype == DSRT_FP4E2M1) {
            uint4 v = __ldg((const uint4 *)((const uint8_t *)m.weight + first / 2));
            float s = scale_at(m, row, col0);
            uint32_t word[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int i = 0; i < CHUNK; i++) w[i] = lut[(word[i / 8] >> (4 * (i % 8))) & 15u] * s;
        } else if (m.dtype == DSRT_F8E4M3) {
            const uint4 *p = (const uint4 *)((const uint8_t *)m.weight + first);
            uint4 a = __ldg(p), b = __ldg(p + 1);
            float s = scale_at(m, row, col0);
            uint32_t word[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
            for (int i = 0; i < CHUNK; i++) w[i] = e4m3_value((word[i / 4] >> (8 * (i % 4))) & 0xffu) * s;
        } else { /* bf16: no scale */
            const uint4 *p = (const uint4 *)((const uint16_t *)m.weight + first);
            uint32_t word[16];
#pragma unroll
            for (int q = 0; q < 4; q++) {
                uint4 v = __ldg(p + q);
                word[4 * q] = v.x, word[4 * q + 1] = v.y, word[4 * q + 2] = v.z, word[4 * q + 3] = v.w;
            }
#pragma unroll
            for (int i = 0; i < CHUNK; i++) w[i] = dsrt_bits_f32(i % 2 ? word[i / 2] & 0xffff0000u : word[i / 2] << 16);
        }
        return;
    }
#pragma unroll
    for (int i = 0; i < CHUNK; i++) {
        int64_t col = col0 + i;
        float v = 0.0f;
        if (col < m.cols) {
            v = dsrt_load_f32(m.weight, m.dtype, m.offset + row * m.stride0 + col * m.stride1);
            if (m.scale) v *= scale_at(m, row, col);
        }
        w[i] = v;
    }
}

/* acc[t] += Σ_i w[i]·x[t][32c + i] for the staged rows t < nb; staged word q of chunk c sits at
 * q ^ (c & 7) */
__device__ __forceinline__ void dot_chunk(const float (&w)[CHUNK], const float4 *xs, int c, int per_row, int nb,
                                          float (&acc)[TB_MAX])
{
#pragma unroll
    for (int t = 0; t < TB_MAX; t++) {
        if (t < nb) {
            const float4 *x = xs + t * per_row + c * 8;
            float s = acc[t];
#pragma unroll
            for (int q = 0; q < 8; q++) {
                float4 v = x[q ^ (c & 7)];
                s = fmaf(w[4 * q], v.x, s);
                s = fmaf(w[4 * q + 1], v.y, s);
                s = fmaf(w[4 * q + 2], v.z, s);
                s = fmaf(w[4 * q + 3], v.w, s);
            }
            acc[t] = s;
        }
    }
}

/* a fixed tree: lane 0 ends with the sum, in the same order for every row */
__device__ __forceinline__ float warp_sum(float v)
{
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    return v;
}

/* ---- the grouped projection ---- */

template <int MODE>
__global__ void __launch_bounds__(BLOCK, 2) moe_project_kernel(const __grid_constant__ dsrtk_moe_project_args a, int tb)
{
    extern __shared__ float4 xs[];
    __shared__ float lut[16];
    __shared__ dsrtk_moe_matrix mats[2]; /* the group's matrices, read per chunk: keep them close */
    if (threadIdx.x < 16) lut[threadIdx.x] = dsrt_fp4_to_f32((uint8_t)threadIdx.x);
    int set;
    int64_t first, count;
    if (a.groups) {
        int g = blockIdx.y;
        if (g >= *a.n_groups) return; /* uniform: the whole block leaves */
        set = a.groups[3 * g], first = a.groups[3 * g + 1], count = a.groups[3 * g + 2];
    } else { /* one group, its rows sliced over blockIdx.y */
        int64_t slice = (a.single_rows + gridDim.y - 1) / gridDim.y;
        set = a.single_set, first = blockIdx.y * slice;
        count = a.single_rows - first < slice ? a.single_rows - first : slice;
        if (count <= 0) return; /* uniform */
    }
    const dsrtk_moe_matrix &g0 = a.table[3 * set + (MODE == DSRTK_MOE_DOWN ? 1 : 0)];
    int n_out = g0.rows, k_in = g0.cols, row0 = blockIdx.x * WARPS;
    if (row0 >= n_out) return; /* uniform */
    if (threadIdx.x == 0) mats[0] = g0;
    if (MODE == DSRTK_MOE_UP && threadIdx.x == 32) mats[1] = a.table[3 * set + 2];
    const dsrtk_moe_matrix &m0 = mats[0], &m1 = mats[1]; /* written before the first barrier below */
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, j = row0 + warp;
    bool active = j < n_out;
    int chunks = (k_in + CHUNK - 1) / CHUNK, per_row = chunks * 8;
    /* a bf16 linear takes its input as given; FP8/FP4 ones the Q8 round trip (linear.c) */
    const float *x = a.xq && g0.dtype != DSRT_BF16 ? a.xq : a.x;
    for (int64_t b0 = 0; b0 < count; b0 += tb) {
        int nb = (int)(count - b0 < tb ? count - b0 : tb);
        __syncthreads(); /* the previous batch is consumed (and the lut written) */
        for (int i = threadIdx.x; i < nb * per_row; i += BLOCK) {
            int t = i / per_row, rem = i - t * per_row, c = rem >> 3, q = rem & 7;
            int64_t r = first + b0 + t, xr = a.row_x ? a.row_x[r] : r;
            const float *src = x + xr * a.x_ld;
            int col = c * CHUNK + q * 4;
            float4 v;
            v.x = col < k_in ? src[col] : 0.0f;
            v.y = col + 1 < k_in ? src[col + 1] : 0.0f;
            v.z = col + 2 < k_in ? src[col + 2] : 0.0f;
            v.w = col + 3 < k_in ? src[col + 3] : 0.0f;
            xs[t * per_row + c * 8 + (q ^ (c & 7))] = v;
        }
        __syncthreads();
        if (!active) continue;
        float acc0[TB_MAX], acc1[TB_MAX];
#pragma unroll
        for (int t = 0; t < TB_MAX; t++) acc0[t] = acc1[t] = 0.0f;
        for (int c = lane; c < chunks; c += 32) {
            float w[CHUNK];
            load_chunk(m0, j, c, lut, w);
            dot_chunk(w, xs, c, per_row, nb, acc0);
            if (MODE == DSRTK_MOE_UP) {
                load_chunk(m1, j, c, lut, w);
                dot_chunk(w, xs, c, per_row, nb, acc1);
            }
        }
#pragma unroll
        for (int t = 0; t < TB_MAX; t++) {
            if (t >= nb) break;
            float v0 = warp_sum(acc0[t]), v1 = MODE == DSRTK_MOE_UP ? warp_sum(acc1[t]) : 0.0f;
            if (lane) continue;
            int64_t r = first + b0 + t;
            float out = v0;
            if (MODE == DSRTK_MOE_UP) { /* run_swiglu in moe.c */
                float g = v0, u = v1, limit = a.limit;
                if (a.reference) g = round_bf16(g), u = round_bf16(u); /* w1, w3 return bf16 */
                if (limit > 0) { /* comparisons keep NaN, as torch.clamp does */
                    u = u > limit ? limit : u < -limit ? -limit : u;
                    g = g > limit ? limit : g;
                }
                float h = silu_f32(g) * u;
                if (r < a.n_weighted) h *= a.row_weight[r]; /* before w2, in fp32 (SPEC §7.2) */
                out = a.reference ? round_bf16(h) : h;
            } else if (MODE == DSRTK_MOE_DOWN && a.reference) {
                out = round_bf16(v0);
            }
            a.out[r * a.out_ld + j] = out;
        }
    }
}

template <int MODE>
static int launch_project(int dev, const dsrtk_moe_project_args *a, int tb, int grid_x, int grid_y, size_t smem,
                          cudaStream_t stream)
{
    int st = dsrtk_check(cudaFuncSetAttribute(moe_project_kernel<MODE>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                         "moe: projection shared memory of %zu bytes", smem);
    if (st) return st;
    moe_project_kernel<MODE><<<dim3(grid_x, grid_y), BLOCK, smem, stream>>>(*a, tb);
    return dsrtk_check_launch("moe_project_kernel", dev);
}

int dsrtk_moe_project(int dev, const dsrtk_moe_project_args *a, void *stream)
{
    DSRTK_SET_DEVICE(dev, "moe projection");
    if (!a->table || !a->x || !a->out || a->max_out < 1 || a->max_in < 1 || a->single_rows < 0 ||
        (a->groups && (!a->n_groups || a->max_groups < 1 || a->max_groups > 65535)))
        return dsrtk_fail(DSRTK_ERROR, "moe: projection called with bad arguments (mode %d, %d outputs, %d inputs)", a->mode,
                          a->max_out, a->max_in);
    if (!a->groups && a->single_rows == 0) return DSRTK_OK;
    size_t row_bytes = (size_t)((a->max_in + CHUNK - 1) / CHUNK) * CHUNK * sizeof(float);
    if (row_bytes > (size_t)STAGE_BYTES)
        return dsrtk_fail(DSRTK_ERROR, "moe: inputs of %d features are too wide to stage (at most %d)", a->max_in,
                          STAGE_BYTES / (int)sizeof(float));
    int64_t tb = STAGE_BYTES / (int64_t)row_bytes;
    if (tb > TB_MAX) tb = TB_MAX;
    if (a->single_rows > 0 && tb > a->single_rows) tb = a->single_rows; /* no more than a group holds */
    size_t smem = (size_t)tb * row_bytes;
    int grid_x = (a->max_out + WARPS - 1) / WARPS, grid_y = a->groups ? a->max_groups : 1;
    if (!a->groups) { /* the gate over many rows: slices of 4 batches, enough blocks for every multiprocessor */
        int64_t slices = (a->single_rows + 4 * tb - 1) / (4 * tb);
        grid_y = (int)(slices < 65535 ? slices : 65535);
    }
    cudaStream_t s = (cudaStream_t)stream;
    switch (a->mode) {
    case DSRTK_MOE_GATE: return launch_project<DSRTK_MOE_GATE>(dev, a, (int)tb, grid_x, grid_y, smem, s);
    case DSRTK_MOE_UP: return launch_project<DSRTK_MOE_UP>(dev, a, (int)tb, grid_x, grid_y, smem, s);
    case DSRTK_MOE_DOWN: return launch_project<DSRTK_MOE_DOWN>(dev, a, (int)tb, grid_x, grid_y, smem, s);
    default: return dsrtk_fail(DSRTK_ERROR, "moe: unknown projection mode %d", a->mode);
    }
}

/* ---- Q8 round trips of rows (quant.h's dsrt_q8_roundtrip, a warp per block of 128) ---- */

__global__ void __launch_bounds__(DSRTK_BLOCK) moe_q8_kernel(float *x, int64_t rows, int64_t n, int64_t ld,
                                                             const dsrtk_moe_matrix *table, const int32_t *groups,
                                                             const int32_t *n_groups, int slot)
{
    int lane = threadIdx.x % 32;
    int64_t blocks = (n + ACT_BLOCK - 1) / ACT_BLOCK, total = rows * blocks;
    int64_t warps = (int64_t)gridDim.x * (blockDim.x / 32);
    for (int64_t w = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32; w < total; w += warps) {
        int64_t r = w / blocks, b = w % blocks, len = n;
        if (groups) { /* the row's group (groups are in ascending first row): its matrix decides */
            int lo = 0, hi = *n_groups - 1;
            while (lo < hi) {
                int mid = (lo + hi + 1) / 2;
                if (groups[3 * mid + 1] <= r) lo = mid;
                else hi = mid - 1;
            }
            const dsrtk_moe_matrix &m = table[3 * groups[3 * lo] + slot];
            if (m.dtype == DSRT_BF16) continue;
            len = m.cols;
        }
        len -= b * ACT_BLOCK;
        if (len <= 0) continue;
        if (len > ACT_BLOCK) len = ACT_BLOCK;
        float *p = x + r * ld + b * ACT_BLOCK, v[ACT_BLOCK / 32];
        float amax = 1e-4f; /* dsrt_q8_block: NaN never wins the comparison */
#pragma unroll
        for (int i = 0; i < ACT_BLOCK / 32; i++) {
            int e = lane + 32 * i;
            v[i] = e < len ? p[e] : 0.0f;
            float m = v[i] < 0 ? -v[i] : v[i];
            if (m > amax) amax = m;
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
        float s = dsrt_pow2_ceil(amax * (1.0f / 448.0f));
#pragma unroll
        for (int i = 0; i < ACT_BLOCK / 32; i++) {
            int e = lane + 32 * i;
            if (e >= len) continue;
            float q = v[i] / s;
            q = q > 448.0f ? 448.0f : q < -448.0f ? -448.0f : q;
            p[e] = dsrt_e4m3_to_f32(dsrt_f32_to_e4m3(q)) * s;
        }
    }
}

int dsrtk_moe_q8_rows(int dev, float *x, int64_t rows, int64_t n, int64_t ld, const dsrtk_moe_matrix *table,
                      const int32_t *groups, const int32_t *n_groups, int32_t max_groups, int slot, void *stream)
{
    DSRTK_SET_DEVICE(dev, "moe Q8");
    if (rows == 0 || n == 0) return DSRTK_OK;
    if (!x || (groups && (!table || !n_groups || max_groups < 1 || slot < 0 || slot > 2)))
        return dsrtk_fail(DSRTK_ERROR, "moe: Q8 of %lld rows called with bad arguments", (long long)rows);
    int64_t warps = rows * ((n + ACT_BLOCK - 1) / ACT_BLOCK);
    int grid = dsrtk_grid_for(dev, warps * 32, DSRTK_BLOCK);
    moe_q8_kernel<<<grid, DSRTK_BLOCK, 0, (cudaStream_t)stream>>>(x, rows, n, ld, table, groups, n_groups, slot);
    return dsrtk_check_launch("moe_q8_kernel", dev);
}

/* ---- routing (moe.c: score_row, select_top, route_rows), a warp per token ---- */

__global__ void __launch_bounds__(128) moe_route_kernel(const __grid_constant__ dsrtk_moe_route_args a, int per_block)
{
    extern __shared__ float scores[];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n = a.n_routed, k = a.k;
    int64_t t = (int64_t)blockIdx.x * per_block + warp;
    if (t >= a.rows) return; /* no block-wide barrier below */
    float *row = scores + (size_t)warp * n;
    const float *logits = a.logits + t * n;
    for (int e = lane; e < n; e += 32) row[e] = logits[e];
    __syncwarp();
    if (a.score_func == DSRTK_MOE_SOFTMAX) {
        /* max as the CPU's loop finds it: NaN only when row[0] is NaN, else the largest non-NaN */
        float max = -INFINITY;
        for (int e = lane; e < n; e += 32)
            if (row[e] > max) max = row[e];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) max = fmaxf(max, __shfl_xor_sync(0xffffffffu, max, off));
        if (row[0] != row[0]) max = row[0];
        __syncwarp();
        for (int e = lane; e < n; e += 32) row[e] = exp_f32(row[e] - max);
        __syncwarp();
        float sum = 0;
        if (lane == 0)
            for (int e = 0; e < n; e++) sum += row[e]; /* the CPU's order */
        sum = __shfl_sync(0xffffffffu, sum, 0);
        for (int e = lane; e < n; e += 32) row[e] /= sum;
    } else {
        for (int e = lane; e < n; e += 32) {
            float l = row[e];
            row[e] = a.score_func == DSRTK_MOE_SIGMOID ? sigmoid_f32(l) : sqrtf(l > 20.0f ? l : log1p_f32(exp_f32(l)));
        }
    }
    __syncwarp();
    int64_t *ids = a.ids + t * k;
    float *weights = a.weights + t * k;
    int valid = 1;
    if (a.hash) { /* tid2eid[token] (its ids checked by the host when the table was built) */
        int64_t token = dsrt_load_i64(a.token_ids.data, a.token_ids.dtype, dsrt_view_index(&a.token_ids, t));
        valid = token >= 0 && token < a.tid2eid.shape[0];
        for (int j = lane; j < k; j += 32)
            ids[j] = valid ? dsrt_load_i64(a.tid2eid.data, a.tid2eid.dtype,
                                           a.tid2eid.offset + token * a.tid2eid.stride[0] + j * a.tid2eid.stride[1])
                           : 0;
    } else { /* top k of score + bias, descending, ties to the lower id, NaN as +inf */
        int prev = -1;
        float prev_key = 0;
        for (int j = 0; j < k; j++) {
            int best = -1;
            float best_key = 0;
            for (int e = lane; e < n; e += 32) {
                float key = row[e] + dsrt_load_f32(a.bias.data, a.bias.dtype, a.bias.offset + e * a.bias.stride[0]);
                if (key != key) key = INFINITY;
                bool after_prev = prev < 0 || key < prev_key || (key == prev_key && e > prev);
                if (after_prev && (best < 0 || key > best_key)) best = e, best_key = key;
            }
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) {
                int other = __shfl_xor_sync(0xffffffffu, best, off);
                float other_key = __shfl_xor_sync(0xffffffffu, best_key, off);
                if (other >= 0 && (best < 0 || other_key > best_key || (other_key == best_key && other < best)))
                    best = other, best_key = other_key;
            }
            if (lane == 0) ids[j] = best;
            prev = best, prev_key = best_key;
        }
    }
    __syncwarp();
    if (lane == 0) {
        float sum = 0;
        for (int j = 0; j < k; j++) sum += weights[j] = valid ? row[ids[j]] : NAN;
        for (int j = 0; j < k; j++) {
            float w = weights[j];
            if (a.norm_topk_prob) w /= sum;
            weights[j] = w * a.route_scale;
        }
    }
}

int dsrtk_moe_route(int dev, const dsrtk_moe_route_args *a, void *stream)
{
    DSRTK_SET_DEVICE(dev, "moe routing");
    if (a->rows == 0) return DSRTK_OK;
    if (!a->logits || !a->ids || !a->weights || a->n_routed < 1 || a->k < 1 || a->k > a->n_routed ||
        (a->hash ? !a->tid2eid.data || !a->token_ids.data : !a->bias.data))
        return dsrtk_fail(DSRTK_ERROR, "moe: routing called with bad arguments (%d experts, %d per token)", a->n_routed, a->k);
    int per_block = (size_t)a->n_routed * 4 * sizeof(float) <= 48 * 1024 ? 4 : 1;
    size_t smem = (size_t)per_block * a->n_routed * sizeof(float);
    if (smem > 48 * 1024)
        return dsrtk_fail(DSRTK_ERROR, "moe: routing over %d experts is not supported (at most %d)", a->n_routed,
                          48 * 1024 / (int)sizeof(float));
    int64_t grid = (a->rows + per_block - 1) / per_block;
    if (grid > INT32_MAX) return dsrtk_fail(DSRTK_ERROR, "moe: %lld tokens are too many to route", (long long)a->rows);
    moe_route_kernel<<<(unsigned)grid, 32 * per_block, smem, (cudaStream_t)stream>>>(*a, per_block);
    return dsrtk_check_launch("moe_route_kernel", dev);
}

/* ---- grouping (moe.c: combine_experts' counting sort), one block ---- */

__global__ void __launch_bounds__(DSRTK_BLOCK) moe_group_kernel(const __grid_constant__ dsrtk_moe_group_args a)
{
    extern __shared__ int cursor[];
    int n = a.n_routed, lane = threadIdx.x % 32;
    int64_t picks = a.rows * a.k;
    for (int e = threadIdx.x; e < n; e += blockDim.x) cursor[e] = 0;
    __syncthreads();
    for (int64_t p = threadIdx.x; p < picks; p += blockDim.x) atomicAdd(&cursor[a.ids[p]], 1);
    __syncthreads();
    if (threadIdx.x == 0) { /* counts -> starts, and the groups of the experts that have rows */
        int g = 0, start = 0;
        for (int e = 0; e < n; e++) {
            int count = cursor[e];
            if (count) {
                a.groups[3 * g] = e, a.groups[3 * g + 1] = start, a.groups[3 * g + 2] = count;
                g++;
            }
            cursor[e] = start;
            start += count;
        }
        a.groups[3 * g] = n, a.groups[3 * g + 1] = (int)picks, a.groups[3 * g + 2] = (int)a.rows; /* the shared expert */
        *a.n_groups = g + 1;
    }
    __syncthreads();
    if (threadIdx.x < 32) { /* a stable fill: 32 picks at a time, in order, by one warp */
        for (int64_t base = 0; base < picks; base += 32) {
            int64_t p = base + lane;
            bool valid = p < picks;
            int e = valid ? (int)a.ids[p] : -1 - lane; /* idle lanes match nobody */
            unsigned same = __match_any_sync(0xffffffffu, e);
            int leader = __ffs(same) - 1, rank = __popc(same & ((1u << lane) - 1u));
            int at = valid && lane == leader ? cursor[e] : 0;
            at = __shfl_sync(0xffffffffu, at, leader);
            if (valid) {
                int pos = at + rank;
                a.row_token[pos] = (int)(p / a.k);
                a.row_weight[pos] = a.weights[p];
                a.pos_of_pick[p] = pos;
            }
            __syncwarp();
            if (valid && lane == leader) cursor[e] = at + __popc(same);
            __syncwarp();
        }
    }
    for (int64_t t = threadIdx.x; t < a.rows; t += blockDim.x) a.row_token[picks + t] = (int)t;
}

int dsrtk_moe_group(int dev, const dsrtk_moe_group_args *a, void *stream)
{
    DSRTK_SET_DEVICE(dev, "moe grouping");
    if (a->rows == 0) return DSRTK_OK;
    if (!a->ids || !a->weights || !a->groups || !a->n_groups || !a->row_token || !a->pos_of_pick || !a->row_weight ||
        a->k < 1 || a->n_routed < 1 || a->rows * (a->k + 1) > INT32_MAX)
        return dsrtk_fail(DSRTK_ERROR, "moe: grouping of %lld tokens x %d experts called with bad arguments",
                          (long long)a->rows, a->k);
    size_t smem = (size_t)a->n_routed * sizeof(int);
    if (smem > 48 * 1024)
        return dsrtk_fail(DSRTK_ERROR, "moe: grouping over %d experts is not supported", a->n_routed);
    moe_group_kernel<<<1, DSRTK_BLOCK, smem, (cudaStream_t)stream>>>(*a);
    return dsrtk_check_launch("moe_group_kernel", dev);
}

/* ---- combine (moe.c: add_rows in combine_experts' order), a block per token ---- */

/* experts per token the combine sorts in shared memory (Flash: 6); a fixed array, because a
 * dynamic one sized k*4 bytes drew out-of-bounds vector reads under compute-sanitizer */
#define MOE_COMBINE_MAX_K 64

__global__ void __launch_bounds__(DSRTK_BLOCK) moe_combine_kernel(const float *y, const int32_t *pos_of_pick, int64_t rows,
                                                                  int k, int64_t dim, void *out, int out_dtype)
{
    __shared__ int order[MOE_COMBINE_MAX_K];
    for (int64_t t = blockIdx.x; t < rows; t += gridDim.x) {
        __syncthreads();
        if (threadIdx.x == 0) { /* positions ascending = experts ascending, then picks ascending */
            for (int i = 0; i < k; i++) {
                int v = pos_of_pick[t * k + i], j = i;
                for (; j > 0 && order[j - 1] > v; j--) order[j] = order[j - 1];
                order[j] = v;
            }
        }
        __syncthreads();
        const float *shared_row = y + (rows * k + t) * dim;
        for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
            float acc = 0.0f;
            for (int i = 0; i < k; i++) acc += y[order[i] * dim + c];
            acc += shared_row[c];
            if (out_dtype == DSRT_F32) ((float *)out)[t * dim + c] = acc;
            else ((uint16_t *)out)[t * dim + c] = dsrt_f32_to_bf16(acc);
        }
    }
}

int dsrtk_moe_combine(int dev, const float *y, const int32_t *pos_of_pick, int64_t rows, int32_t k, int64_t dim,
                      void *out, int out_dtype, void *stream)
{
    DSRTK_SET_DEVICE(dev, "moe combine");
    if (rows == 0 || dim == 0) return DSRTK_OK;
    if (!y || !pos_of_pick || !out || k < 1 || (out_dtype != DSRT_F32 && out_dtype != DSRT_BF16))
        return dsrtk_fail(DSRTK_ERROR, "moe: combine called with bad arguments");
    if (k > MOE_COMBINE_MAX_K)
        return dsrtk_fail(DSRTK_ERROR, "moe: combine of %d experts per token (at most %d)", k, MOE_COMBINE_MAX_K);
    int grid = rows < 65535 ? (int)rows : 65535;
    moe_combine_kernel<<<grid, DSRTK_BLOCK, 0, (cudaStream_t)stream>>>(y, pos_of_pick, rows, k, dim,
                                                                                          out, out_dtype);
    return dsrtk_check_launch("moe_combine_kernel", dev);
}
