/*
 * moe.cu - DeepSeek-V4's mixture-of-experts layer on the GPU (runtime/moe.h): the router (gate
 * logits, scores, top-k or hash selection, weights), the grouping of picks by expert, the SwiGLU
 * experts read straight from their packed FP4 / FP8 / bf16 weights (decode, and prefill's tiled
 * tensor-core GEMMs) or through transient copies and cuBLAS GEMMs (the other prefills), and the
 * combine.
 *
 * What this file protects: the reference's MoE numerics (moe.h; the readable reference is
 * runtime/moe.c: route_rows, select_top, run_swiglu, combine_experts) without a host
 * synchronisation inside a decode step: expert ids stay on the device, and every decode kernel is
 * sized for the worst case and reads the real counts from device memory. Prefill (moe.c decides)
 * reads the per-expert counts back once.
 *
 * The router (dsrtk_moe_router) at decode, up to 8 tokens: two launches, both dependent. The bf16
 * gate GEMV runs over every multiprocessor (moe_gate_kernel: a block each, its warps a gate row
 * each, the rows' lines asked of L2 before the producer wait), each lane scoring its token's
 * logit; then one block routes (a warp per token) and groups the picks for the experts
 * (moe_route_one_kernel). It replaced one cooperative kernel (gate, grid barrier, block 0's
 * routing), which cannot be launched dependent (15.6 us after a 1.1 us gap, CUPTI timeline, H200,
 * Flash, T = 1), and before that three launches of 32, 1 and 1 blocks. Hash routing with an
 * element-wise score reads only the picked experts' gate rows, in one block (moe_hash_router_kernel:
 * 48 KB of Flash's 2 MB gate; ncu put it at 10-13 us: the chain ids -> tid2eid -> gate row ->
 * weights -> groups is dependent reads). Before UP on the warpgroup tile
 * (decode of a hash layer, up to 4 tokens) the weights leave that chain altogether:
 * dsrtk_moe_route_up groups the picks first and computes the weights in a block of UP's own
 * launch, which UP's other blocks wait for only at the end of their walk. More tokens still run those
 * three (moe_project_kernel for the gate, moe_route_kernel, moe_group_kernel); both paths share
 * the dot product's order and the routing code, so they give the same bits. From GATE_GEMM_ROWS
 * bf16 tokens on (prefill) the gate is one cuBLAS GEMM instead (gate_gemm).
 *
 * Numerics against the C implementation:
 *   - the rounding points are the CPU's: projections' outputs bf16-rounded in reference precision,
 *     Q8 round trips (quant.h, the same functions) in front of FP8/FP4 matrices, bf16(h) before
 *     w2, y summed from 0 in f32 over routed rows in ascending expert id then the shared row;
 *   - the routing's arithmetic is the CPU's, in the CPU's order (softmax's sum sequential, the
 *     bias added in f32, top-k ties to the lower id, the weights' sum sequential over k), with
 *     exp and log1p computed in double and rounded once, which nearly always gives glibc's expf /
 *     log1pf bits (CUDA's own expf is up to 2 ulp off);
 *   - dot products are NOT in the CPU's order: the decode kernel sums each 32-column chunk of
 *     code values times inputs, multiplies the chunk by its (power-of-two) scale, and sums the
 *     lanes as a fixed tree; cuBLAS sums in its own order. Results are fp32 reorderings (~1e-6
 *     relative) of the CPU's; the decode kernel's are independent of how tokens are batched.
 *   - prefill's bf16 GEMMs are exact in their inputs: Q8 round-tripped rows and FP4/FP8 codes
 *     times e8m0 scales are bf16 values, products are exact in the fp32 accumulator, and the
 *     bf16 outputs are the reference's roundings of fp32 sums.
 *
 * Decode in reference precision, every expert matrix `wgmma` (widths of 256, rows of 64: Flash's):
 * moe_wg_kernel, wgtile.cuh's warpgroup tile (wgmma on e4m3, the weights' loads as its fragments;
 * wg_project says how blocks share the groups). Measured on the H200 (2026-11-29, Flash layer, T =
 * 1, ncu inside a decode step): UP ~43 us, DOWN ~23 us a layer; later (CUPTI timeline, as it runs)
 * UP 38-39 and DOWN 20-22 with the line hint, bound by how memory serves the tile's scattered
 * pieces of rows, not by its instructions (wgtile.cuh's wg_load has the what-ifs).
 *
 * Decode in reference precision, FP8/FP4 experts otherwise (moe_mma_kernel, fp8mma.cuh's
 * tensor-core tile, as linear.cu's decode GEMV): blocks per group walk the group's 16-row tiles in teams, a team w1's
 * tile and then w3's of the same rows, and the SwiGLU once the walk is over (mma_project says why);
 * the shared expert (every row, FP8: twice an FP4 expert's bytes) also takes a spare row of blocks.
 * Measured on the H200 (2026-11-28, Flash layer, T = 1, ncu inside a decode step): UP 47-56 us,
 * DOWN 27-35 us (57-63 and 28-38 before the walk stopped spilling). The FP4 step is bound by issue
 * now: ~116 instructions a lane a 64-column chunk (the FP4 conversion, the scales' promotion),
 * 1.75 instructions a clock a multiprocessor, ~1.3 TB/s.
 *
 * Decode otherwise (moe_project_kernel: the gate, fp32 precision, layouts off the tile) serves the
 * gate, w1/w3 + SwiGLU and w2: a block takes 8 output
 * features (one per warp) of one group of rows (an expert and the rows routed to it), stages up to
 * TB input rows in shared memory (Q8 round trip done while staging) and streams the 8 weight rows
 * once per batch, so at decode every selected expert's weights are read once. Memory parallelism:
 * each lane issues all its 16-byte loads of a round (4 chunks of fp4, 2 of fp8, 1 of bf16: 4 loads)
 * before using any, and blocks are capped at 64 registers a thread so 4 blocks share a
 * multiprocessor. Before staging its inputs, each warp asks L2 to prefetch its whole weight rows
 * (and scale rows): the staging's dependent x reads and the rounds' weight loads then overlap one
 * DRAM latency instead of queueing behind it (profiled before: UP 104 us / DOWN 78 us per Flash
 * layer, ~540 GB/s, latency-bound). ALU per fp4 weight: 1.5 integer ops (byte_perm of pre-shifted nibbles), one
 * shared-memory LUT read, one FMA (the scale once per chunk); fp8: one cvt per 2 weights.
 * Bytes per decode step (Flash, T = 1): 6 routed + 1 shared expert, each w1, w2, w3 of 2048 x
 * 4096: fp4 0.5 B + 1/32 B of scale per weight = 3 x 8.4M x 0.53 B = 13.4 MB per routed expert,
 * the fp8 shared expert 25.2 MB, the bf16 gate 2 MB: ~108 MB, ~27 us at 4 TB/s. FLOPs: 2 per
 * weight per row. Staged inputs are laid out with an XOR swizzle of the 16-byte words inside each
 * chunk, so the 32 lanes of a warp (each on its own chunk) read them without bank conflicts.
 *
 * Prefill (moe.c's cuda_prefill): gather + Q8 the rows by expert (bf16); UP gu = xg·[w1; w3]ᵀ
 * per group; the SwiGLU kernel (weight, bf16, Q8); DOWN yr = h·w2ᵀ; the ordered combine. In
 * reference precision with every matrix `mma` the GEMMs read the packed weights themselves
 * (moe_prefill_gemm_kernel, below); otherwise (fp32 precision, bf16 experts, widths off 64) per
 * slab of up to DSRTK_MOE_SLAB experts one launch dequantises each one's matrices into a scratch
 * and one grouped cuBLAS call runs their GEMMs with fp32 accumulation. FLOPs (Flash, T = 4096):
 * 2 x 7 x 4096 x 3 x 8.4M = 1.4 TFLOP a layer. Measured (H200, make bench, T = 4096): 20.2 ms with
 * the bf16 slabs (~26 GB of copies a layer), 8.9 ms now (162 TFLOP/s; the two GEMMs ~8 ms).
 */
#include <math.h>
#include <atomic>
#include <mutex>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include "common.cuh"
#include "act.cuh"
#include "blas.cuh"
#include "wgtile.cuh"
#include "fp8mma.cuh"

enum { WARPS = 8, BLOCK = WARPS * 32, TB_MAX = 8, CHUNK = 32 };
/* shared memory for the staged rows: at most this much, so several blocks share a multiprocessor */
static const int STAGE_BYTES = 96 * 1024;

/* ---- element math (the CPU's formulas, moe.c) ---- */

/* glibc's expf and log1pf are (nearly) correctly rounded; double evaluation rounded once matches them */
__device__ __forceinline__ float exp_f32(float x) { return (float)exp((double)x); }
__device__ __forceinline__ float log1p_f32(float x) { return (float)log1p((double)x); }
/* opmath.h's DSRT_OP_SILU and DSRT_OP_SIGMOID with exp_f32 */
__device__ __forceinline__ float silu_f32(float x) { return x / (1.0f + exp_f32(-x)); }
__device__ __forceinline__ float sigmoid_f32(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

/* run_swiglu's element (moe.c): g, u the projections (already bf16 values in reference) */
__device__ __forceinline__ float swiglu_f32(float g, float u, float limit)
{
    if (limit > 0) { /* comparisons keep NaN, as torch.clamp does */
        u = u > limit ? limit : u < -limit ? -limit : u;
        g = g > limit ? limit : g;
    }
    return silu_f32(g) * u;
}

/* An input element of x (f32 or bf16) */
__device__ __forceinline__ float load_x(const void *x, int dtype, int64_t i)
{
    return dtype == DSRT_BF16 ? dsrt_bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

/* A projection's input row for group row r: its first element in x (row_x picks it, or r itself) */
__device__ __forceinline__ int64_t x_row(const dsrtk_moe_project_args &a, int64_t r) { return (a.row_x ? a.row_x[r] : r) * a.x_ld; }

/* The Q8 round trip of one block of 128 values held 4 per lane (quant.h's dsrt_q8_roundtrip):
 * fp8mma.cuh's q8_block_warp, the codes not kept. Every lane of the warp must call it. */
__device__ __forceinline__ void q8_warp(float (&v)[4], const bool (&valid)[4])
{
    uint8_t code[4];
    q8_block_warp(v, valid, code);
}

/* ---- weights ---- */

/* scalar path: the scale of weight (row, col) */
__device__ __forceinline__ float scale_at(const dsrtk_moe_matrix &m, int64_t row, int64_t col)
{
    int64_t i = m.scale_offset + row / m.block_rows * m.scale_stride0 + col / m.block_cols * m.scale_stride1;
    return dsrt_load_f32(m.scale, m.scale_dtype, i);
}

/* Weight (row, col) dequantised exactly as linear.c's dequantise_transposed does (code value,
 * times the scale when there is one); 0 past the last column. The path of matrices that are not
 * `vector` (any stride, widths off the chunks). */
__device__ __forceinline__ float weight_at(const dsrtk_moe_matrix &m, int64_t row, int64_t col)
{
    if (col >= m.cols) return 0.0f;
    float v = dsrt_load_f32(m.weight, m.dtype, m.offset + row * m.stride0 + col * m.stride1);
    return m.scale ? v * scale_at(m, row, col) : v;
}

/* fp4 LUT read: `off` is a code times 4 (the byte offset of its value in lut) */
__device__ __forceinline__ float lut_at(const float *lut, uint32_t off)
{
    return *(const float *)((const char *)lut + off);
}

/* p[t] += Σ_i w_i · x[t][4q + i] over the 4 weights of float4 word q of a staged chunk */
template <int TB>
__device__ __forceinline__ void fma4(float w0, float w1, float w2, float w3, const float4 *x, int word, int per_row, int nb,
                                     float (&p)[TB])
{
#pragma unroll
    for (int t = 0; t < TB; t++) {
        if (t < nb) {
            float4 v = x[t * per_row + word];
            float s = p[t];
            s = fmaf(w0, v.x, s);
            s = fmaf(w1, v.y, s);
            s = fmaf(w2, v.z, s);
            s = fmaf(w3, v.w, s);
            p[t] = s;
        }
    }
}

/* acc[t] += s · Σ_i code_i · x[t][32c + i] for one chunk held in 4 (fp4), 8 (fp8) or 16 (bf16,
 * s = 1) words; x points at the chunk's staged words, word q sitting at q ^ sw. */
template <int TB>
__device__ __forceinline__ void chunk_fp4(const uint32_t (&word)[4], float s, const float4 *x, int sw, int per_row, int nb,
                                          const float *lut, float (&acc)[TB])
{
    float p[TB];
#pragma unroll
    for (int t = 0; t < TB; t++) p[t] = 0.0f;
#pragma unroll
    for (int w = 0; w < 4; w++) {
        /* byte b of lo / hi: the LUT offset of nibble 2b / 2b+1 of the word */
        uint32_t lo = (word[w] << 2) & 0x3c3c3c3cu, hi = (word[w] >> 2) & 0x3c3c3c3cu;
#pragma unroll
        for (int half = 0; half < 2; half++) { /* float4 word 2w + half: nibbles 4 half .. 4 half + 3 */
            float w0 = lut_at(lut, __byte_perm(lo, 0, 0x4440u | (2 * half))),
                  w1 = lut_at(lut, __byte_perm(hi, 0, 0x4440u | (2 * half))),
                  w2 = lut_at(lut, __byte_perm(lo, 0, 0x4440u | (2 * half + 1))),
                  w3 = lut_at(lut, __byte_perm(hi, 0, 0x4440u | (2 * half + 1)));
            fma4<TB>(w0, w1, w2, w3, x, (2 * w + half) ^ sw, per_row, nb, p);
        }
    }
#pragma unroll
    for (int t = 0; t < TB; t++) acc[t] = fmaf(p[t], s, acc[t]);
}

__device__ __forceinline__ float2 e4m3x2(uint32_t two)
{
    __half2_raw h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)two, __NV_E4M3); /* exact, NaN kept */
    return __half22float2(*(const __half2 *)&h);
}

template <int TB>
__device__ __forceinline__ void chunk_fp8(const uint32_t (&word)[8], float s, const float4 *x, int sw, int per_row, int nb,
                                          float (&acc)[TB])
{
    float p[TB];
#pragma unroll
    for (int t = 0; t < TB; t++) p[t] = 0.0f;
#pragma unroll
    for (int q = 0; q < 8; q++) {
        float2 a = e4m3x2(word[q] & 0xffffu), b = e4m3x2(word[q] >> 16);
        fma4<TB>(a.x, a.y, b.x, b.y, x, q ^ sw, per_row, nb, p);
    }
#pragma unroll
    for (int t = 0; t < TB; t++) acc[t] = fmaf(p[t], s, acc[t]);
}

template <int TB>
__device__ __forceinline__ void chunk_bf16(const uint32_t (&word)[16], const float4 *x, int sw, int per_row, int nb,
                                           float (&acc)[TB])
{
#pragma unroll
    for (int q = 0; q < 8; q++) {
        uint32_t a = word[2 * q], b = word[2 * q + 1];
        fma4<TB>(dsrt_bits_f32(a << 16), dsrt_bits_f32(a & 0xffff0000u), dsrt_bits_f32(b << 16),
                 dsrt_bits_f32(b & 0xffff0000u), x, q ^ sw, per_row, nb, acc);
    }
}

/* The scale of chunk c of a vector matrix's row (srow: its scale row's first index) */
__device__ __forceinline__ float chunk_scale(const dsrtk_moe_matrix &m, int64_t srow, int c, int chunks_per_block)
{
    if (!m.scale) return 1.0f;
    return dsrt_load_f32(m.scale, m.scale_dtype, srow + (int64_t)((unsigned)c / (unsigned)chunks_per_block) * m.scale_stride1);
}

/* acc[t] += row j of m · staged row t, this lane's chunks (lane, lane + 32, ...). Vector
 * matrices load U chunks per round, all before any is used (several 16-byte loads in flight). */
template <int TB>
__device__ __forceinline__ void dot_row(const dsrtk_moe_matrix &m, int j, int chunks, const float4 *xs, int per_row, int nb,
                                        const float *lut, float (&acc)[TB])
{
    int lane = threadIdx.x % 32;
    if (!m.vector) {
        for (int c = lane; c < chunks; c += 32) {
            const float4 *x = xs + c * 8;
            for (int q = 0; q < 8; q++) { /* 4 weights at a time: few registers on this cold path */
                float w[4];
#pragma unroll
                for (int i = 0; i < 4; i++) w[i] = weight_at(m, j, (int64_t)c * CHUNK + 4 * q + i);
                fma4<TB>(w[0], w[1], w[2], w[3], x, q ^ (c & 7), per_row, nb, acc);
            }
        }
        return;
    }
    /* the host checked: stride1 1, 16-byte aligned rows, cols % 32 == 0, block_cols % 32 == 0 */
    int64_t first = m.offset + (int64_t)j * m.stride0; /* in elements */
    int64_t srow = m.scale ? m.scale_offset + (int64_t)(j / m.block_rows) * m.scale_stride0 : 0;
    int cpb = m.scale ? m.block_cols / CHUNK : 1;
    if (m.dtype == DSRT_FP4E2M1) {
        enum { U = 4 };
        const uint4 *row = (const uint4 *)((const uint8_t *)m.weight + first / 2);
        for (int c0 = lane; c0 < chunks; c0 += 32 * U) {
            uint32_t word[U][4];
            float s[U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                int c = c0 + 32 * u;
                uint4 v = make_uint4(0, 0, 0, 0);
                s[u] = 0.0f;
                if (c < chunks) v = __ldg(row + c), s[u] = chunk_scale(m, srow, c, cpb);
                word[u][0] = v.x, word[u][1] = v.y, word[u][2] = v.z, word[u][3] = v.w;
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                int c = c0 + 32 * u;
                if (c < chunks) chunk_fp4<TB>(word[u], s[u], xs + c * 8, c & 7, per_row, nb, lut, acc);
            }
        }
    } else if (m.dtype == DSRT_F8E4M3) {
        enum { U = 2 };
        const uint4 *row = (const uint4 *)((const uint8_t *)m.weight + first);
        for (int c0 = lane; c0 < chunks; c0 += 32 * U) {
            uint32_t word[U][8];
            float s[U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                int c = c0 + 32 * u;
                uint4 v0 = make_uint4(0, 0, 0, 0), v1 = v0;
                s[u] = 0.0f;
                if (c < chunks) v0 = __ldg(row + 2 * c), v1 = __ldg(row + 2 * c + 1), s[u] = chunk_scale(m, srow, c, cpb);
                word[u][0] = v0.x, word[u][1] = v0.y, word[u][2] = v0.z, word[u][3] = v0.w;
                word[u][4] = v1.x, word[u][5] = v1.y, word[u][6] = v1.z, word[u][7] = v1.w;
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                int c = c0 + 32 * u;
                if (c < chunks) chunk_fp8<TB>(word[u], s[u], xs + c * 8, c & 7, per_row, nb, acc);
            }
        }
    } else { /* bf16: no scale */
        enum { U = 1 };
        const uint4 *row = (const uint4 *)((const uint16_t *)m.weight + first);
        for (int c0 = lane; c0 < chunks; c0 += 32 * U) {
            uint32_t word[U][16];
#pragma unroll
            for (int u = 0; u < U; u++) {
                int c = c0 + 32 * u;
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    uint4 v = make_uint4(0, 0, 0, 0);
                    if (c < chunks) v = __ldg(row + 4 * c + q);
                    word[u][4 * q] = v.x, word[u][4 * q + 1] = v.y, word[u][4 * q + 2] = v.z, word[u][4 * q + 3] = v.w;
                }
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                int c = c0 + 32 * u;
                if (c < chunks) chunk_bf16<TB>(word[u], xs + c * 8, c & 7, per_row, nb, acc);
            }
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

/* ---- the grouped projection (decode) ---- */

/* Stages nb input rows (from row `first`) into xs as chunks of 32 floats (zero past k_in), Q8
 * round-tripped when q8: a warp per block of 128 columns of a row, 4 columns a lane. A warp loads
 * the inputs of 4 of its blocks before rounding any, so their global reads (row_x, then x) are in
 * flight together instead of one dependent round trip per block; each block's values and Q8 are
 * the same as one at a time. */
__device__ __forceinline__ void stage_rows(float4 *xs, const dsrtk_moe_project_args &a, int64_t first, int nb, int k_in,
                                           int chunks, bool q8)
{
    enum { SU = 4 };
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, per_row = chunks * 8;
    int blocks = (k_in + ACT_BLOCK - 1) / ACT_BLOCK, units = nb * blocks;
    for (int base = warp; base < units; base += SU * WARPS) { /* warp-uniform: q8_warp's shuffles see every lane */
        float v[SU][4];
        bool valid[SU][4];
#pragma unroll
        for (int u = 0; u < SU; u++) {
            int unit = base + u * WARPS, t = unit / blocks, b = unit - t * blocks;
            bool live = unit < units;
            int64_t r = first + t, xr = live ? (a.row_x ? a.row_x[r] : r) : 0;
            int col = b * ACT_BLOCK + 4 * lane;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                valid[u][i] = live && col + i < k_in;
                v[u][i] = valid[u][i] ? load_x(a.x, a.x_dtype, xr * a.x_ld + col + i) : 0.0f;
            }
        }
#pragma unroll
        for (int u = 0; u < SU; u++) {
            int unit = base + u * WARPS, t = unit / blocks, b = unit - t * blocks;
            if (unit >= units) break; /* uniform */
            if (q8) q8_warp(v[u], valid[u]);
            int col = b * ACT_BLOCK + 4 * lane, c = col / CHUNK, q = lane & 7;
            if (c < chunks) xs[t * per_row + c * 8 + (q ^ (c & 7))] = make_float4(v[u][0], v[u][1], v[u][2], v[u][3]);
        }
    }
}

/* Starts the DRAM reads of [p, p + bytes) towards L2, one 128-byte line per lane per step: no
 * registers held, nothing waited on (the range lies inside a weight's storage) */
__device__ __forceinline__ void prefetch_l2(const void *p, int64_t bytes, int lane)
{
    uintptr_t end = (uintptr_t)p + (uintptr_t)bytes;
    for (uintptr_t q = ((uintptr_t)p & ~(uintptr_t)127) + 128u * (unsigned)lane; q < end; q += 32u * 128u)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(__cvta_generic_to_global((const void *)q)));
}

/* Row j of a vector matrix and its scale row into L2, so that dot_row's loads after the staging
 * hit L2 instead of each round waiting on DRAM (decode: a warp's whole weight row, 1-8 KB) */
__device__ __forceinline__ void prefetch_row(const dsrtk_moe_matrix &m, int j, int lane)
{
    if (!m.vector) return;
    int64_t first = m.offset + (int64_t)j * m.stride0; /* in elements */
    if (m.dtype == DSRT_FP4E2M1) prefetch_l2((const uint8_t *)m.weight + first / 2, m.cols / 2, lane);
    else if (m.dtype == DSRT_F8E4M3) prefetch_l2((const uint8_t *)m.weight + first, m.cols, lane);
    else prefetch_l2((const uint16_t *)m.weight + first, (int64_t)m.cols * 2, lane);
    if (m.scale && m.block_rows > 0 && m.block_cols > 0 && m.scale_stride1 >= 0) {
        int64_t esize = m.scale_dtype == DSRT_F32 ? 4 : 1, n = (m.cols + m.block_cols - 1) / m.block_cols;
        int64_t srow = m.scale_offset + (int64_t)(j / m.block_rows) * m.scale_stride0;
        prefetch_l2((const uint8_t *)m.scale + srow * esize, ((n - 1) * m.scale_stride1 + 1) * esize, lane);
    }
}

/* The group this block serves: {set, first row, rows} from the device list, or its slice of the
 * single group's rows; false when there is none (the whole block leaves) */
__device__ __forceinline__ bool block_group(const dsrtk_moe_project_args &a, int *set, int64_t *first, int64_t *count)
{
    if (a.groups) {
        const int g = blockIdx.y;
        if (g >= *a.n_groups) return false;
        *set = a.groups[3 * g], *first = a.groups[3 * g + 1], *count = a.groups[3 * g + 2];
        return true;
    }
    const int64_t slice = (a.single_rows + gridDim.y - 1) / gridDim.y;
    *set = a.single_set, *first = blockIdx.y * slice;
    *count = a.single_rows - *first < slice ? a.single_rows - *first : slice;
    return *count > 0;
}

/* Output row r's value from the projection sums (v1: w3's, UP only) */
template <int MODE>
__device__ __forceinline__ float project_out(const dsrtk_moe_project_args &a, int64_t r, float v0, float v1)
{
    if (MODE == DSRTK_MOE_UP) { /* run_swiglu in moe.c */
        float g = v0, u = v1;
        if (a.reference) g = round_bf16(g), u = round_bf16(u); /* w1, w3 return bf16 */
        float h = swiglu_f32(g, u, a.limit);
        if (r < a.n_weighted) h *= __ldcg(a.row_weight + r); /* before w2, in fp32 (SPEC §7.2); L2: see wait_weights */
        return a.reference ? round_bf16(h) : h;
    }
    return MODE == DSRTK_MOE_DOWN && a.reference ? round_bf16(v0) : v0;
}

template <int MODE, int TB>
__global__ void __launch_bounds__(BLOCK, 4) moe_project_kernel(const __grid_constant__ dsrtk_moe_project_args a, int tb)
{
    extern __shared__ float4 xs[];
    __shared__ float lut[16];
    __shared__ dsrtk_moe_matrix mats[2]; /* the group's matrices, read per chunk: keep them close */
    if (threadIdx.x < 16) lut[threadIdx.x] = dsrt_fp4_to_f32((uint8_t)threadIdx.x);
    int set;
    int64_t first, count;
    if (!block_group(a, &set, &first, &count)) return; /* uniform: the whole block leaves */
    const dsrtk_moe_matrix &g0 = a.table[3 * set + (MODE == DSRTK_MOE_DOWN ? 1 : 0)];
    int n_out = g0.rows, k_in = g0.cols, row0 = blockIdx.x * WARPS;
    if (row0 >= n_out) return; /* uniform */
    if (threadIdx.x == 0) mats[0] = g0;
    if (MODE == DSRTK_MOE_UP && threadIdx.x == 32) mats[1] = a.table[3 * set + 2];
    const dsrtk_moe_matrix &m0 = mats[0], &m1 = mats[1]; /* written before the first barrier below */
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, j = row0 + warp;
    bool active = j < n_out;
    if (active) { /* DRAM reads of this warp's weight rows overlap the staging below */
        prefetch_row(g0, j, lane);
        if (MODE == DSRTK_MOE_UP) prefetch_row(a.table[3 * set + 2], j, lane);
    }
    int chunks = (k_in + CHUNK - 1) / CHUNK, per_row = chunks * 8;
    /* a bf16 linear takes its input as given; FP8/FP4 ones the Q8 round trip (linear.c) */
    bool q8 = MODE != DSRTK_MOE_GATE && a.reference && g0.dtype != DSRT_BF16;
    for (int64_t b0 = 0; b0 < count; b0 += tb) {
        int nb = (int)(count - b0 < tb ? count - b0 : tb);
        __syncthreads(); /* the previous batch is consumed (and the lut and mats written) */
        stage_rows(xs, a, first + b0, nb, k_in, chunks, q8);
        __syncthreads();
        if (!active) continue;
        float acc0[TB], acc1[TB];
#pragma unroll
        for (int t = 0; t < TB; t++) acc0[t] = acc1[t] = 0.0f;
        dot_row<TB>(m0, j, chunks, xs, per_row, nb, lut, acc0);
        if (MODE == DSRTK_MOE_UP) dot_row<TB>(m1, j, chunks, xs, per_row, nb, lut, acc1);
#pragma unroll
        for (int t = 0; t < TB; t++) {
            if (t >= nb) break;
            float v0 = warp_sum(acc0[t]), v1 = MODE == DSRTK_MOE_UP ? warp_sum(acc1[t]) : 0.0f;
            if (lane) continue;
            const int64_t r = first + b0 + t;
            a.out[r * a.out_ld + j] = project_out<MODE>(a, r, v0, v1);
        }
    }
}

template <int MODE, int TB>
static int launch_project(int dev, const dsrtk_moe_project_args *a, int tb, int grid_x, int grid_y, size_t smem,
                          cudaStream_t stream)
{
    /* the opt-in counts the kernel's static shared memory (the lookup table and the two matrix
     * descriptors) too: 3 staged rows of 4096 inputs are exactly 48 KiB of dynamic memory and failed
     * without it */
    int st = dsrtk_allow_shared(dev, (const void *)moe_project_kernel<MODE, TB>, smem, "moe_project_kernel");
    if (st) return st;
    moe_project_kernel<MODE, TB><<<dim3(grid_x, grid_y), BLOCK, smem, stream>>>(*a, tb);
    return dsrtk_check_launch("moe_project_kernel", dev);
}

/* the staged-row count as a template: registers for exactly the rows a batch can hold */
template <int MODE>
static int launch_mode(int dev, const dsrtk_moe_project_args *a, int tb, int grid_x, int grid_y, size_t smem, cudaStream_t s)
{
    if (tb <= 1) return launch_project<MODE, 1>(dev, a, tb, grid_x, grid_y, smem, s);
    if (tb <= 2) return launch_project<MODE, 2>(dev, a, tb, grid_x, grid_y, smem, s);
    if (tb <= 4) return launch_project<MODE, 4>(dev, a, tb, grid_x, grid_y, smem, s);
    return launch_project<MODE, TB_MAX>(dev, a, tb, grid_x, grid_y, smem, s);
}

/* ---- the grouped projection on FP8 tensor cores (fp8mma.cuh; reference precision) ---- */

/* moe_mma_kernel's dynamic shared memory */
extern __shared__ uint4 mma_shared[];

/* the shared memory of one block: staged codes (MMA_TOKENS rows, ld apart), their scales, the
 * warps' partial sums */
static size_t mma_smem(int64_t ld, int64_t k_in)
{
    /* MMA_TOKENS + 1: the staging's zero row */
    return (size_t)((MMA_TOKENS + 1) * ld) * 2 + (size_t)((MMA_TOKENS + 1) * ((k_in + ACT_BLOCK - 1) / ACT_BLOCK)) * 4 +
           (size_t)MMA_WARPS * MMA_ROWS * MMA_TOKENS * 4;
}

/* A matrix as the tile walk reads it, resolved once per block into shared memory: rows_of then
 * costs a few 32-bit operations and a shared-memory read per tile, where reading the table's
 * 64-bit fields from global memory kept the two matrix addresses live in registers and the 64-bit
 * arithmetic pushed the walk's own state into local memory (see mma_project) */
struct MmaMatrix {
    const char *weight, *scale; /* offsets applied */
    int row_bytes, block_rows, scale_stride0, scale_stride1; /* scales in elements */
    int chunk_shift, rows;
};

__device__ __forceinline__ void mma_matrix_init(MmaMatrix &d, const dsrtk_moe_matrix &m)
{
    const int bits = m.dtype == DSRT_FP4E2M1 ? 4 : 8, scale_bytes = m.scale_dtype == DSRT_F32 ? 4 : 1;
    d.weight = (const char *)m.weight + m.offset * bits / 8, d.row_bytes = (int)(m.stride0 * bits / 8);
    d.scale = (const char *)m.scale + m.scale_offset * scale_bytes;
    d.block_rows = m.block_rows, d.scale_stride0 = (int)m.scale_stride0, d.scale_stride1 = (int)m.scale_stride1;
    d.chunk_shift = __ffs(m.block_cols / MMA_CHUNK) - 1; /* fp8: a power of two */
    d.rows = m.rows;
}

/* Rows ja (a) and jb (b) of matrix m as fp8mma.cuh reads them (a row past the matrix reads row 0) */
template <int FMT, int SF>
__device__ __forceinline__ MmaRows mma_rows(const MmaMatrix &m, int ja, int jb, int q)
{
    const int na = ja < m.rows ? ja : 0, nb = jb < m.rows ? jb : 0;
    return mma_rows_at<FMT, SF>(m.weight + (int64_t)na * m.row_bytes, m.weight + (int64_t)nb * m.row_bytes, m.scale,
                                (int64_t)(na / m.block_rows) * m.scale_stride0, (int64_t)(nb / m.block_rows) * m.scale_stride0,
                                m.scale_stride1, m.chunk_shift, q);
}

/* One group's projection, its rows in batches of MMA_TOKENS: stage their Q8 codes, then the
 * block's teams walk the group's 16-row tiles (mma_stream). UP's team takes w1's tile and then
 * w3's tile of the same rows, each a walk tile of its own. The first weight loads of a batch go out
 * before its staging.
 *
 * A tile ends in a store and nothing more; UP's SwiGLU runs after the walk. Everything live across
 * the walk must fit the 128 registers of two blocks a multiprocessor, and the SwiGLU's
 * double-precision exp at the end of a tile did not: ptxas moved the walk's counters to local
 * memory, and each step's reload of them queued behind the step's own weight loads (ncu, H200,
 * Flash, T = 1: 14% of UP's stall samples on one such reload), so a warp waited for the loads it
 * had just issued instead of the ones before them. So UP's tiles store their raw sums, w1's at
 * out[r, j] and w3's at out[r, max_out + j], and once the walk is over the team turns each of its
 * pairs into h at out[r, j] (project_out). 64-bit tile arithmetic and the table's matrices read
 * from global memory cost registers the same way, hence 32-bit tile numbers and MmaMatrix. */
template <int MODE, int FMT, int SF>
__device__ __forceinline__ void mma_project(const dsrtk_moe_project_args &a, const dsrtk_moe_matrix &m0,
                                            const dsrtk_moe_matrix &m1, int64_t first, int64_t count, int ks, int slot,
                                            int slots)
{
    __half *xq = (__half *)mma_shared; /* a fixed address: no register holds it across the walk */
    constexpr int U = MmaDepth<FMT>::U, MATS = MODE == DSRTK_MOE_UP ? 2 : 1;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gq = lane >> 2, q = lane & 3;
    const int team = warp / ks, kslot = warp - team * ks, teams = MMA_WARPS / ks;
    const int ld = (int)mma_staged_ld(FMT, a.max_in);
    const int k_in = m0.cols, nblk = (k_in + ACT_BLOCK - 1) / ACT_BLOCK, n_out = m0.rows;
    const int nchunk = k_in / MMA_CHUNK, rounds = ((nchunk + ks - 1) / ks + U - 1) / U;
    /* 32 bits: the grid is at most 65535 x 65535 blocks of 8 warps, a matrix 2^31 rows */
    const int team_id = (slot * (int)gridDim.x + (int)blockIdx.x) * teams + team, n_teams = slots * (int)gridDim.x * teams;
    const int tiles = (n_out + MMA_ROWS - 1) / MMA_ROWS;
    const int my_tiles = team_id < tiles ? (tiles - team_id + n_teams - 1) / n_teams : 0;
    float *xsc = (float *)(xq + (MMA_TOKENS + 1) * ld), *red = xsc + (MMA_TOKENS + 1) * nblk;
    float *team_red = red + team * ks * (MMA_ROWS * MMA_TOKENS);
    __shared__ MmaMatrix mats[MATS];
    if (threadIdx.x < MATS) mma_matrix_init(mats[threadIdx.x], threadIdx.x ? m1 : m0);
    __syncthreads();
    /* walk tile w: matrix w % MATS of the team's row tile w / MATS */
    auto first_row = [&](int w) { return (team_id + w / MATS * n_teams) * MMA_ROWS; };
    auto rows_of = [&](int w) {
        const int j = first_row(w) + gq;
        return mma_rows<FMT, SF>(mats[w % MATS], j, j + 8, q);
    };
    MmaStep<FMT> buf[2][U];
    for (int64_t b0 = 0; b0 < count; b0 += MMA_TOKENS) {
        const int nb = (int)(count - b0 < MMA_TOKENS ? count - b0 : MMA_TOKENS);
        if (my_tiles) mma_load<FMT, SF, U>(rows_of(0), buf[0], kslot * U, nchunk);
        __syncthreads(); /* the previous batch is consumed */
        /* an element an access: the wider loads' addresses cost this kernel a spill (ptxas), and the
         * warpgroup tile is the decode path wherever shapes allow */
        mma_stage<FMT, true>(nb, k_in, ld, xq, xsc, a.x, a.x_dtype, false, [&](int t) { return x_row(a, first + b0 + t); });
        __syncthreads();
        const int t0 = 2 * q, t1 = 2 * q + 1;
        const MmaX x = mma_x(xq + (gq < nb ? gq : nb) * ld, xsc + (t0 < nb ? t0 : nb) * nblk, xsc + (t1 < nb ? t1 : nb) * nblk);
        float *out = a.out + (first + b0) * a.out_ld;
        mma_stream<FMT, SF, U>(buf, my_tiles * MATS, rounds, ks, kslot, nchunk, q, x, rows_of, [&](int w, const float(&acc)[4]) {
            const int r0 = first_row(w), at = w % MATS * a.max_out; /* UP: w3's sums after w1's */
            mma_team_finish(acc, ks, team, kslot, team_red, nb, [&](int rr, int tok, float v) {
                if (r0 + rr < n_out) out[tok * a.out_ld + at + r0 + rr] = MODE == DSRTK_MOE_UP ? v : round_bf16(v);
            });
        });
        if (MODE == DSRTK_MOE_UP) { /* the team's pairs, stored by its own threads (the barrier orders them) */
            asm volatile("bar.sync %0, %1;" ::"r"(team + 1), "r"(ks * 32) : "memory");
            for (int i = kslot * 32 + lane; i < my_tiles * MMA_ROWS * nb; i += ks * 32) {
                const int tok = i % nb, j = first_row(i / nb / MMA_ROWS * MATS) + i / nb % MMA_ROWS;
                float *o = out + tok * a.out_ld + j;
                if (j < n_out) *o = project_out<MODE>(a, first + b0 + tok, o[0], o[a.max_out]);
            }
        }
    }
}

/* The group a block of the tensor-core projections serves: block row y serves group y, and the
 * rows past the groups all serve the last group, the shared expert (it holds every row and, in
 * FP8, twice the bytes of an FP4 expert), as spare slots */
struct ProjectGroup {
    int set, slot, slots;
    int64_t first, count;
};
__device__ __forceinline__ ProjectGroup project_group(const dsrtk_moe_project_args &a, int y = blockIdx.y,
                                                      int rows_y = gridDim.y)
{
    const int n = *a.n_groups, g = y < n ? y : n - 1;
    return {a.groups[3 * g], y - g, g == n - 1 ? rows_y - g : 1, a.groups[3 * g + 1], a.groups[3 * g + 2]};
}

template <int MODE>
__global__ void __launch_bounds__(MMA_WARPS * 32, 2) moe_mma_kernel(const __grid_constant__ dsrtk_moe_project_args a, int ks)
{
    dsrtk_wait_producer(); /* launched dependent (common.cuh); the groups come from the router */
    const ProjectGroup pg = project_group(a);
    const int set = pg.set, slot = pg.slot, slots = pg.slots;
    const int64_t first = pg.first, count = pg.count;
    const dsrtk_moe_matrix &m0 = a.table[3 * set + (MODE == DSRTK_MOE_DOWN ? 1 : 0)], &m1 = a.table[3 * set + 2];
    if (m0.dtype == DSRT_FP4E2M1) mma_project<MODE, MMA_FP4, DSRT_F8E8M0>(a, m0, m1, first, count, ks, slot, slots);
    else if (m0.scale_dtype == DSRT_F32) mma_project<MODE, MMA_FP8, DSRT_F32>(a, m0, m1, first, count, ks, slot, slots);
    else mma_project<MODE, MMA_FP8, DSRT_F8E8M0>(a, m0, m1, first, count, ks, slot, slots);
}

/* ---- the grouped projection on the warpgroup tile (wgtile.cuh; reference precision, every matrix
 * `wgmma`) ---- */

/* moe_wg_kernel's shared memory: the staged atoms (1024-byte aligned inside the window), their
 * scales, the second warpgroup's sums */
static size_t wg_smem(int64_t max_in)
{
    const int64_t steps = (max_in + WG_STEP - 1) / WG_STEP;
    return (size_t)(WG_ATOM + steps * WG_ATOM + WG_TOKENS * steps * 4 + WG_ROWS * WG_TOKENS * 4);
}

/* UP beside the hash router (moe_wg_route_kernel): the block waits until the router's block has
 * published the routing weights that h takes (row_weight, read through L2 by project_out) */
__device__ __forceinline__ void wait_weights(const uint32_t *ready)
{
    if (threadIdx.x == 0) {
        uint32_t v;
        do asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(ready) : "memory");
        while (!v);
    }
    __syncthreads();
}

/* One group's projection, its rows in batches of WG_TOKENS. A block is a team of two warpgroups
 * on the same tiles, warpgroup 0 the first half of the column steps and 1 the second (a fixed
 * split, from the shape only: a row's result does not depend on the batch; and the same step
 * count for both, since ptxas reads a count that differs between them as divergence around the
 * wgmmas and serialises them); at a tile's end 1's sums meet 0's in shared memory and 0 stores
 * them. A tile is 64 rows, or 32 (8 a warp, half) when the group has teams for twice its 64-row
 * tiles: the FP8 shared expert with its spare blocks would otherwise leave them idle and take
 * twice an FP4 expert's time. UP walks w1's tile and then w3's, storing raw sums (w3's at max_out
 * + j) that the block turns into h once the walk is over, as mma_project does. A step's weight
 * loads go out BUFFERS - 1 steps ahead of its use (wgtile.cuh), the batch's first before its
 * staging. The block is block bx of the nx of its block row; with weights_ready (UP beside the
 * hash router) it waits for the routing weights before h. */
template <int MODE, int FMT, int SF>
__device__ __forceinline__ void wg_project(const dsrtk_moe_project_args &a, const dsrtk_moe_matrix &m0,
                                           const dsrtk_moe_matrix &m1, int first, int count, int slot, int slots, int bx,
                                           int nx, const uint32_t *weights_ready)
{
    constexpr int MATS = MODE == DSRTK_MOE_UP ? 2 : 1, ES = SF == DSRT_F32 ? 4 : 1;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wg = warp >> 2, g = lane >> 2, q = lane & 3;
    const int k_in = m0.cols, n_out = m0.rows, steps_all = k_in / WG_STEP, steps = steps_all / 2, step0 = wg * steps;
    const uint32_t window = (uint32_t)__cvta_generic_to_shared(mma_shared);
    unsigned char *xs = (unsigned char *)mma_shared + (WG_ATOM - window % WG_ATOM) % WG_ATOM;
    const int max_steps = (a.max_in + WG_STEP - 1) / WG_STEP;
    float *xsc = (float *)(xs + max_steps * WG_ATOM), *red = xsc + WG_TOKENS * max_steps;
    __shared__ MmaMatrix mats[MATS];
    if (threadIdx.x < MATS) mma_matrix_init(mats[threadIdx.x], threadIdx.x ? m1 : m0);
    __syncthreads();
    const WgStrides sc = {8 * mats[0].row_bytes, 8 * mats[0].scale_stride0, mats[0].scale_stride1 * ES,
                         FMT == WG_FP8 ? mats[0].chunk_shift - 1 : 0}; /* FP8: 128-column steps */
    const int team = slot * nx + bx, n_teams = slots * nx;
    const bool half = 2 * ((n_out + WG_ROWS - 1) / WG_ROWS) <= n_teams;
    const int warp_rows = half ? 8 : 16, tile_rows = 4 * warp_rows, row_tiles = (n_out + tile_rows - 1) / tile_rows;
    const int my_tiles = team < row_tiles ? (row_tiles - team + n_teams - 1) / n_teams : 0;
    /* walk tile w: matrix w % MATS of the team's row tile w / MATS */
    auto first_row = [&](int w) { return (team + w / MATS * n_teams) * tile_rows; };
    auto rows_of = [&](int w) { /* every row of a tile is the matrix's (rows % 64 == 0) */
        const MmaMatrix &m = mats[w % MATS];
        const int lead = first_row(w) + warp_rows * (warp & 3), ja = lead + g;
        const int sr = FMT == WG_FP8 ? lead / m.block_rows : ja; /* FP8: the warp's rows share a scale row */
        return WgRows{m.weight + (int64_t)ja * m.row_bytes + wg_lane(FMT, q), m.scale + (int64_t)sr * m.scale_stride0 * ES};
    };
    const int r = warp_rows * (warp & 3) + g, t0 = 2 * q, t1 = 2 * q + 1; /* the lane's rows r (and r + 8) of a tile */
    WgStep<FMT> buf[WgStep<FMT>::BUFFERS];
    WgRows rows;
    for (int b0 = 0; b0 < count; b0 += WG_TOKENS) {
        const int nb = count - b0 < WG_TOKENS ? count - b0 : WG_TOKENS;
        __syncthreads(); /* the previous batch is consumed */
        if (my_tiles) {
            rows = rows_of(0);
            wg_load<FMT, SF>(buf[0], rows, step0, sc, half);
        }
        wg_stage<FMT>(nb, k_in, xs, xsc, a.x, a.x_dtype, [&](int t) { return x_row(a, first + b0 + t); });
        fence_async_shared(); /* the staged atoms, for wgmma's reads */
        __syncthreads();
        const uint32_t desc = wgmma_desc_sw128_low((uint32_t)__cvta_generic_to_shared(xs));
        const uint32_t x0 = (uint32_t)__cvta_generic_to_shared(xsc + t0 * steps_all); /* token t1's follow */
        float acc[4] = {};
        uint32_t nan[2] = {};
        walk_buffers<WgStep<FMT>::BUFFERS>(
            buf, my_tiles * MATS, steps,
            [&](WgStep<FMT> &st, int w, int round) {
                if (round == 0) rows = rows_of(w);
                wg_load<FMT, SF>(st, rows, step0 + round, sc, half);
            },
            [&](const WgStep<FMT> &st, int w, int round) {
                const int s = step0 + round;
                const float xa = lds_f32(x0 + 4 * s), xb = lds_f32(x0 + 4 * (steps_all + s));
                wg_use<FMT, SF>(st, desc + s * (WG_ATOM >> 4), xa, xb, half, acc, nan);
                if (round < steps - 1) return;
                if (FMT == WG_FP4) wg_nan_rows(acc, nan);
                if (wg) { /* half: rows r + 8 are the next warp's, and these sums duplicates */
                    red[r * WG_TOKENS + t0] = acc[0], red[r * WG_TOKENS + t1] = acc[1];
                    if (!half) red[(r + 8) * WG_TOKENS + t0] = acc[2], red[(r + 8) * WG_TOKENS + t1] = acc[3];
                }
                __syncthreads();
                if (!wg) {
                    float *out = a.out + (int64_t)(first + b0) * a.out_ld; /* here: a register less across the walk */
                    const int r0 = first_row(w), at = w % MATS * a.max_out; /* UP: w3's sums after w1's */
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        const int rr = r + (i >> 1) * 8, tok = i & 1 ? t1 : t0;
                        const float v = acc[i] + red[rr * WG_TOKENS + tok];
                        if (tok < nb && (i < 2 || !half))
                            out[tok * a.out_ld + at + r0 + rr] = MODE == DSRTK_MOE_UP ? v : round_bf16(v);
                    }
                }
                __syncthreads();
                acc[0] = acc[1] = acc[2] = acc[3] = 0.0f;
            });
        if (MODE == DSRTK_MOE_UP && weights_ready && first + b0 < a.n_weighted) /* the shared expert needs none */
            wait_weights(weights_ready);
        if (MODE == DSRTK_MOE_UP) /* the block's pairs (the walk's last barrier orders them) */
            for (int i = threadIdx.x; i < my_tiles * tile_rows * nb; i += blockDim.x) {
                const int tok = i % nb, j = first_row(i / nb / tile_rows * MATS) + i / nb % tile_rows;
                float *o = a.out + (int64_t)(first + b0 + tok) * a.out_ld + j;
                *o = project_out<MODE>(a, first + b0 + tok, o[0], o[a.max_out]);
            }
    }
}

/* Group pg's share of a projection on the warpgroup tile, as block bx of the nx of its block row */
template <int MODE>
__device__ __forceinline__ void wg_group(const dsrtk_moe_project_args &a, const ProjectGroup &pg, int bx, int nx,
                                         const uint32_t *weights_ready)
{
    const dsrtk_moe_matrix &m0 = a.table[3 * pg.set + (MODE == DSRTK_MOE_DOWN ? 1 : 0)], &m1 = a.table[3 * pg.set + 2];
    const int first = (int)pg.first, count = (int)pg.count; /* 32 bits: moe.c's row counts are */
    const int slot = pg.slot, slots = pg.slots;
    if (m0.dtype == DSRT_FP4E2M1)
        wg_project<MODE, WG_FP4, DSRT_F8E8M0>(a, m0, m1, first, count, slot, slots, bx, nx, weights_ready);
    else if (m0.scale_dtype == DSRT_F32)
        wg_project<MODE, WG_FP8, DSRT_F32>(a, m0, m1, first, count, slot, slots, bx, nx, weights_ready);
    else
        wg_project<MODE, WG_FP8, DSRT_F8E8M0>(a, m0, m1, first, count, slot, slots, bx, nx, weights_ready);
}

template <int MODE>
__global__ void __launch_bounds__(MMA_WARPS * 32, 2) moe_wg_kernel(const __grid_constant__ dsrtk_moe_project_args a)
{
    dsrtk_wait_producer(); /* launched dependent (common.cuh); the groups come from the router */
    wg_group<MODE>(a, project_group(a), blockIdx.x, gridDim.x, nullptr);
}

/* blocks a group: two per multiprocessor (the launch bounds, less `reserved` blocks that run beside
 * them) shared by the groups and one spare row of them for the shared expert, no more than a
 * group's `needed` */
static int project_grid(int dev, const dsrtk_moe_project_args *a, int64_t needed, int *per_group, int reserved = 0)
{
    const int rows_y = a->max_groups < 65535 ? a->max_groups + 1 : a->max_groups;
    int64_t n = (2 * (int64_t)dsrtk_multiprocessors(dev) - reserved) / rows_y;
    if (n > needed) n = needed;
    *per_group = n < 1 ? 1 : (int)n;
    return rows_y;
}

template <int MODE>
static int launch_wg(int dev, const dsrtk_moe_project_args *a, cudaStream_t s)
{
    const size_t smem = wg_smem(a->max_in);
    int st = dsrtk_allow_shared(dev, (const void *)moe_wg_kernel<MODE>, smem, "moe_wg_kernel");
    if (st) return st;
    int per_group;
    const int rows_y = project_grid(dev, a, (a->max_out + WG_ROWS - 1) / WG_ROWS, &per_group); /* a block a row tile */
    return dsrtk_check(dsrtk_launch_dependent(moe_wg_kernel<MODE>, dim3((unsigned)per_group, rows_y), dim3(MMA_WARPS * 32),
                                              smem, s, *a),
                       "launch of moe_wg_kernel on cuda:%d", dev);
}

template <int MODE>
static int launch_mma(int dev, const dsrtk_moe_project_args *a, cudaStream_t s)
{
    /* fp8 and fp4 sets share the launch, each with its own staging pitch */
    const int64_t ld8 = mma_staged_ld(MMA_FP8, a->max_in), ld4 = mma_staged_ld(MMA_FP4, a->max_in);
    const size_t smem = mma_smem(ld8 > ld4 ? ld8 : ld4, a->max_in);
    int st = dsrtk_allow_shared(dev, (const void *)moe_mma_kernel<MODE>, smem, "moe_mma_kernel");
    if (st) return st;
    /* teams from the matrix shape only (never the rows), so a row's result does not depend on
     * the batch: ks warps split a tile until a group has 256 warp-tiles (measured on the H200:
     * splitting further costs the teams' reductions more than the extra warps bring) */
    const int64_t tiles = (a->max_out + MMA_ROWS - 1) / MMA_ROWS, nchunk = a->max_in / MMA_CHUNK;
    int ks = 1;
    while (ks < MMA_WARPS && tiles * ks < 256 && ks * 2 <= nchunk) ks *= 2;
    int per_group;
    const int rows_y = project_grid(dev, a, (tiles * ks + MMA_WARPS - 1) / MMA_WARPS, &per_group);
    return dsrtk_check(dsrtk_launch_dependent(moe_mma_kernel<MODE>, dim3((unsigned)per_group, rows_y), dim3(MMA_WARPS * 32),
                                              smem, s, *a, ks),
                       "launch of moe_mma_kernel on cuda:%d", dev);
}

int dsrtk_moe_project(int dev, const dsrtk_moe_project_args *a, void *stream)
{
    DSRTK_SET_DEVICE(dev, "moe projection");
    if (!a->table || !a->x || !a->out || a->max_out < 1 || a->max_in < 1 || a->single_rows < 0 ||
        (a->x_dtype != DSRT_F32 && a->x_dtype != DSRT_BF16) ||
        (a->groups && (!a->n_groups || a->max_groups < 1 || a->max_groups > 65535)) ||
        (a->tensor_cores && a->reference && a->groups && a->mode == DSRTK_MOE_UP && a->out_ld < 2 * (int64_t)a->max_out))
        return dsrtk_fail(DSRTK_ERROR, "moe: projection called with bad arguments (mode %d, %d outputs, %d inputs)", a->mode,
                          a->max_out, a->max_in);
    if (!a->groups && a->single_rows == 0) return DSRTK_OK;
    cudaStream_t s = (cudaStream_t)stream;
    if (a->tensor_cores == DSRTK_MOE_WGMMA && a->reference && a->groups) {
        if (a->mode == DSRTK_MOE_UP) return launch_wg<DSRTK_MOE_UP>(dev, a, s);
        if (a->mode == DSRTK_MOE_DOWN) return launch_wg<DSRTK_MOE_DOWN>(dev, a, s);
    }
    if (a->tensor_cores && a->reference && a->groups) {
        if (a->mode == DSRTK_MOE_UP) return launch_mma<DSRTK_MOE_UP>(dev, a, s);
        if (a->mode == DSRTK_MOE_DOWN) return launch_mma<DSRTK_MOE_DOWN>(dev, a, s);
    }
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
    switch (a->mode) {
    case DSRTK_MOE_GATE: return launch_mode<DSRTK_MOE_GATE>(dev, a, (int)tb, grid_x, grid_y, smem, s);
    case DSRTK_MOE_UP: return launch_mode<DSRTK_MOE_UP>(dev, a, (int)tb, grid_x, grid_y, smem, s);
    case DSRTK_MOE_DOWN: return launch_mode<DSRTK_MOE_DOWN>(dev, a, (int)tb, grid_x, grid_y, smem, s);
    default: return dsrtk_fail(DSRTK_ERROR, "moe: unknown projection mode %d", a->mode);
    }
}

/* ---- routing (moe.c: score_row, select_top, route_rows), a warp per token ----
 * The pieces moe_route_kernel (many tokens) and moe_route_one_kernel (decode) share, so both give the
 * same ids and weights bit for bit. */

/* score_row's element for sqrtsoftplus and sigmoid */
__device__ __forceinline__ float score_of(int score_func, float l)
{
    return score_func == DSRTK_MOE_SIGMOID ? sigmoid_f32(l) : sqrtf(l > 20.0f ? l : log1p_f32(exp_f32(l)));
}

/* score_row's softmax over row [n] in place (the warp's writes of row are done) */
__device__ void softmax_warp(float *row, int n, int lane)
{
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
    __syncwarp();
}

/* A routing key (score + bias) as an unsigned integer that orders as select_top compares: NaN as
 * +inf (torch's topk ranks NaN highest), -0 as +0 (equal keys tie, to the lower id). Every key
 * maps above 0, the mark of a picked expert. */
__device__ __forceinline__ uint32_t order_key(float key)
{
    if (key != key) key = INFINITY;
    if (key == 0.0f) key = 0.0f;
    const uint32_t u = __float_as_uint(key);
    return u >> 31 ? ~u : u | 0x80000000u;
}

/* The best of this lane's experts (lane, lane + 32, ...): the largest key, the lowest id of equal
 * ones; 0 when none is left */
__device__ __forceinline__ void lane_best(const uint32_t *keys, int n, int lane, uint32_t &best, int &best_e)
{
    best = 0, best_e = INT32_MAX;
    for (int e = lane; e < n; e += 32) {
        const uint32_t u = keys[e];
        if (u > best) best = u, best_e = e;
    }
}

/* A round of select_top over the lanes' best keys: the largest key, then the lowest id holding it
 * (two redux instructions, no shuffle tree) */
__device__ __forceinline__ int warp_best(uint32_t best, int best_e)
{
    const uint32_t top = __reduce_max_sync(0xffffffffu, best);
    return (int)__reduce_min_sync(0xffffffffu, best == top ? (unsigned)best_e : 0xffffffffu);
}

/* select_top: sel [k] the experts of the k largest keys [n] (order_key values, consumed), in
 * descending order, ties to the lower id. Each lane holds its experts (lane, lane + 32, ...); a
 * round takes the warp's best (warp_best) and only the lane that held it moves on: up to
 * 32 * TOPK_REGS experts its keys sit sorted in registers and it pops the first, beyond that it
 * looks through its keys in shared memory again. */
enum { TOPK_REGS = 8 };

__device__ void top_k_warp(uint32_t *keys, int n, int k, int lane, int *sel)
{
    if (n <= 32 * TOPK_REGS) {
        uint32_t key[TOPK_REGS];
        int id[TOPK_REGS];
#pragma unroll
        for (int i = 0; i < TOPK_REGS; i++) {
            id[i] = lane + 32 * i;
            key[i] = id[i] < n ? keys[id[i]] : 0;
        }
        /* odd-even transposition, swapping only on a strictly larger key: stable, so equal keys
         * keep their ascending ids */
#pragma unroll
        for (int pass = 0; pass < TOPK_REGS; pass++) {
#pragma unroll
            for (int i = pass & 1; i + 1 < TOPK_REGS; i += 2) {
                const bool swap = key[i + 1] > key[i];
                const uint32_t ka = key[i], kb = key[i + 1];
                const int ia = id[i], ib = id[i + 1];
                key[i] = swap ? kb : ka, key[i + 1] = swap ? ka : kb;
                id[i] = swap ? ib : ia, id[i + 1] = swap ? ia : ib;
            }
        }
        for (int j = 0; j < k; j++) { /* k <= n: every round finds an unpicked expert (its key > 0) */
            const int win = warp_best(key[0], id[0]);
            if (lane == 0) sel[j] = win;
            if ((win & 31) == lane) {
#pragma unroll
                for (int i = 0; i + 1 < TOPK_REGS; i++) key[i] = key[i + 1], id[i] = id[i + 1];
                key[TOPK_REGS - 1] = 0;
            }
        }
    } else {
        uint32_t best;
        int best_e;
        lane_best(keys, n, lane, best, best_e);
        for (int j = 0; j < k; j++) {
            const int win = warp_best(best, best_e);
            if (lane == 0) sel[j] = win;
            if ((win & 31) == lane) {
                keys[win] = 0;
                lane_best(keys, n, lane, best, best_e);
            }
        }
    }
    __syncwarp();
}

/* route_rows' weights of one token from its scores row [n] and picks sel [k]: the sum sequential
 * over the picks, then each weight, as the CPU. ids [k] and weights [k] out (pick_w [k] too when
 * given). An invalid token (hash routing, an id outside the vocabulary) gets NaN weights. */
__device__ void weights_warp(const float *row, const int *sel, int k, bool valid, int norm, float scale, int lane, int64_t *ids,
                             float *weights, float *pick_w)
{
    enum { U = 8 }; /* picks read at once: the sum waits on one round of reads, not on k */
    float sum = 0;
    for (int j0 = 0; j0 < k; j0 += U) {
        float s[U];
#pragma unroll
        for (int u = 0; u < U; u++) s[u] = j0 + u < k ? row[sel[j0 + u]] : 0.0f;
#pragma unroll
        for (int u = 0; u < U; u++)
            if (j0 + u < k) sum += valid ? s[u] : NAN;
    }
    for (int j = lane; j < k; j += 32) {
        float w = valid ? row[sel[j]] : NAN;
        if (norm) w /= sum;
        w *= scale;
        ids[j] = sel[j];
        weights[j] = w;
        if (pick_w) pick_w[j] = w;
    }
}

/* expert j of tid2eid's row for `token` (the host checked every id of the table) */
__device__ __forceinline__ int hash_expert(const dsrtk_moe_route_args &a, int64_t token, int j)
{
    const dsrt_view &t = a.tid2eid;
    return (int)dsrt_load_i64(t.data, t.dtype, t.offset + token * t.stride[0] + j * t.stride[1]);
}

/* Many tokens: a warp per token over the gate's logits */
__global__ void __launch_bounds__(128) moe_route_kernel(const __grid_constant__ dsrtk_moe_route_args a, int per_block)
{
    /* per warp: the n scores, the n keys, the k picked ids (k <= n) */
    extern __shared__ float scores[];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n = a.n_routed, k = a.k;
    int64_t t = (int64_t)blockIdx.x * per_block + warp;
    if (t >= a.rows) return; /* no block-wide barrier below */
    float *row = scores + (size_t)warp * 3 * n;
    uint32_t *keys = (uint32_t *)(row + n);
    int *sel = (int *)(keys + n);
    const float *logits = a.logits + t * n;
    for (int e = lane; e < n; e += 32) row[e] = logits[e];
    __syncwarp();
    if (a.score_func == DSRTK_MOE_SOFTMAX) {
        softmax_warp(row, n, lane);
    } else {
        for (int e = lane; e < n; e += 32) row[e] = score_of(a.score_func, row[e]);
        __syncwarp();
    }
    bool valid = true;
    if (a.hash) { /* tid2eid[token] */
        int64_t token = dsrt_load_i64(a.token_ids.data, a.token_ids.dtype, dsrt_view_index(&a.token_ids, t));
        valid = token >= 0 && token < a.tid2eid.shape[0];
        for (int j = lane; j < k; j += 32) sel[j] = valid ? hash_expert(a, token, j) : 0;
        __syncwarp();
    } else { /* the keys once: the k rounds read shared memory only */
        for (int e = lane; e < n; e += 32)
            keys[e] = order_key(row[e] + dsrt_load_f32(a.bias.data, a.bias.dtype, a.bias.offset + e * a.bias.stride[0]));
        __syncwarp();
        top_k_warp(keys, n, k, lane, sel);
    }
    weights_warp(row, sel, k, valid, a.norm_topk_prob, a.route_scale, lane, a.ids + t * k, a.weights + t * k, nullptr);
}

static int launch_route(int dev, const dsrtk_moe_route_args *a, cudaStream_t stream)
{
    size_t per_warp = (size_t)a->n_routed * 3 * sizeof(float);
    int per_block = per_warp * 4 <= 48 * 1024 ? 4 : 1;
    size_t smem = (size_t)per_block * per_warp;
    if (smem > 48 * 1024)
        return dsrtk_fail(DSRTK_ERROR, "moe: routing over %d experts is not supported (at most %d)", a->n_routed,
                          16 * 1024 / (int)sizeof(float));
    int64_t grid = (a->rows + per_block - 1) / per_block;
    if (grid > INT32_MAX) return dsrtk_fail(DSRTK_ERROR, "moe: %lld tokens are too many to route", (long long)a->rows);
    moe_route_kernel<<<(unsigned)grid, 32 * per_block, smem, stream>>>(*a, per_block);
    return dsrtk_check_launch("moe_route_kernel", dev);
}

/* ---- grouping (moe.c: combine_experts' counting sort): the router's groups, row_token,
 * row_weight and pos_of_pick (kernels.h) from the rows·k picks of ids and weights ---- */
struct GroupArgs {
    const int64_t *ids;
    const float *weights;
    int64_t rows;
    int32_t k, n_routed;
    int32_t *groups, *n_groups, *row_token, *pos_of_pick;
    float *row_weight;
};

/* Many picks, one block of up to 8 warps: warp w owns a contiguous slice of the picks and a row of
 * per-expert counters: it counts its slice, a block-wide scan over experts turns the counters into
 * each (warp, expert)'s first position (experts ascending, then warps ascending = picks
 * ascending), and each warp fills its slice in order with its own cursors. Stable, no cross-warp
 * races, no serial loop over experts. */

/* exclusive scan of (a, b) over the block's threads (blockDim.x <= 1024); totals to *ta, *tb */
__device__ __forceinline__ void block_scan2(int &a, int &b, int *ta, int *tb)
{
    __shared__ int wa[32], wb[32];
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
    int ia = a, ib = b;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        int ua = __shfl_up_sync(0xffffffffu, ia, off), ub = __shfl_up_sync(0xffffffffu, ib, off);
        if (lane >= off) ia += ua, ib += ub;
    }
    if (lane == 31) wa[warp] = ia, wb[warp] = ib;
    __syncthreads();
    if (warp == 0) {
        int sa = lane < warps ? wa[lane] : 0, sb = lane < warps ? wb[lane] : 0;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            int ua = __shfl_up_sync(0xffffffffu, sa, off), ub = __shfl_up_sync(0xffffffffu, sb, off);
            if (lane >= off) sa += ua, sb += ub;
        }
        if (lane < warps) wa[lane] = sa, wb[lane] = sb; /* inclusive over warps */
    }
    __syncthreads();
    int before_a = warp ? wa[warp - 1] : 0, before_b = warp ? wb[warp - 1] : 0;
    *ta = wa[warps - 1], *tb = wb[warps - 1];
    a = before_a + ia - a, b = before_b + ib - b;
}

/* up to 32 warps, each filling its slice of the picks: the fill walks a slice 32 picks at a time,
 * one dependent step after another (8 warps took 107 us for a Flash prefill's 24576 picks, H200) */
enum { GROUP_THREADS = 1024 };

__global__ void __launch_bounds__(GROUP_THREADS) moe_group_kernel(const __grid_constant__ GroupArgs a)
{
    extern __shared__ int cnt[]; /* [warps][n] */
    int n = a.n_routed, lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    int threads = blockDim.x;
    int64_t picks = a.rows * a.k, per = (picks + warps - 1) / warps;
    int64_t p0 = warp * per, p1 = p0 + per < picks ? p0 + per : picks;
    for (int i = threadIdx.x; i < warps * n; i += threads) cnt[i] = 0;
    __syncthreads();
    for (int64_t p = p0 + lane; p < p1; p += 32) atomicAdd(&cnt[warp * n + (int)a.ids[p]], 1);
    __syncthreads();
    /* experts in contiguous runs per thread: rows and groups before each run by a block scan */
    int per_e = (n + threads - 1) / threads, e0 = threadIdx.x * per_e, e1 = e0 + per_e < n ? e0 + per_e : n;
    int rows = 0, groups = 0;
    for (int e = e0; e < e1; e++) {
        int total = 0;
        for (int w = 0; w < warps; w++) total += cnt[w * n + e];
        rows += total, groups += total > 0;
    }
    int all_rows, all_groups;
    block_scan2(rows, groups, &all_rows, &all_groups);
    for (int e = e0; e < e1; e++) { /* counts -> first positions; the groups of the experts with rows */
        int total = 0;
        for (int w = 0; w < warps; w++) {
            int c = cnt[w * n + e];
            cnt[w * n + e] = rows + total;
            total += c;
        }
        if (total) {
            a.groups[3 * groups] = e, a.groups[3 * groups + 1] = rows, a.groups[3 * groups + 2] = total;
            groups++;
        }
        rows += total;
    }
    if (threadIdx.x == 0) { /* the shared expert's group, last */
        a.groups[3 * all_groups] = n, a.groups[3 * all_groups + 1] = all_rows, a.groups[3 * all_groups + 2] = (int)a.rows;
        *a.n_groups = all_groups + 1;
    }
    __syncthreads();
    int *cursor = cnt + warp * n;
    for (int64_t base = p0; base < p1; base += 32) { /* a stable fill: 32 picks at a time, in order */
        int64_t p = base + lane;
        bool valid = p < p1;
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
    for (int64_t t = threadIdx.x; t < a.rows; t += threads) a.row_token[picks + t] = (int)t;
}

static int launch_group(int dev, const GroupArgs *a, cudaStream_t stream)
{
    int warps = (int)((48 * 1024 / sizeof(int)) / (size_t)a->n_routed);
    if (warps > GROUP_THREADS / 32) warps = GROUP_THREADS / 32;
    if (warps < 1) return dsrtk_fail(DSRTK_ERROR, "moe: grouping over %d experts is not supported", a->n_routed);
    size_t smem = (size_t)warps * a->n_routed * sizeof(int);
    moe_group_kernel<<<1, 32 * warps, smem, stream>>>(*a);
    return dsrtk_check_launch("moe_group_kernel", dev);
}

/* ---- the router at decode: the gate, then routing and grouping in one block ----
 * Up to TB_MAX tokens and ROUTER_THREADS picks. Every block of moe_gate_kernel stages x (as
 * moe_project_kernel does) and its warps take a gate row each, a lane per 32-column chunk as
 * dot_row (the same chunks, the same FMA order, the same tree: the same logits bit for bit), so the
 * gate costs one L2 round trip spread over every multiprocessor (one block each: Flash's 256 x 4096
 * bf16 gate is 2 rows a block on the H200) instead of 32 blocks walking 8 rows each. The tree's sum
 * reaches every lane (a butterfly: for lane 0 the very additions of warp_sum, and the other lanes'
 * equal by commutativity), so lane t turns token t's logit into its score at once, spread over the
 * grid too. moe_route_one_kernel then routes (a warp per token: softmax, the top-k and the weights
 * as moe_route_kernel) and groups the few picks (group_few) for the expert kernels. Where a block
 * cannot have the shared memory, the gate projection, moe_route_kernel and moe_group_kernel run
 * instead, with the same results. */

enum {
    ROUTER_WARPS = 8,
    ROUTER_THREADS = ROUTER_WARPS * 32,
    GATE_U = 4, /* gate chunks a lane loads at once */
    SCORE_U = 8 /* scores a thread of block 0 loads at once: Flash's 8 tokens x 256 in one round */
};

__host__ __device__ __forceinline__ size_t align16(size_t bytes) { return (bytes + 15) & ~(size_t)15; }

/* The routers' dynamic shared memory, byte offsets: the staged x at 0 (chunks of it: none where
 * the block stages none), then the routing's: the bias [n], per token the scores [n] and keys [n],
 * the picks' experts and weights [rows·k], the tokens' validity [rows] (hash routing), the
 * grouping's flags */
struct RouterSmem {
    size_t bias, score, keys, pick_e, pick_w, valid, first, total;
};

__host__ __device__ __forceinline__ RouterSmem router_smem(int rows, int chunks, int n, int k)
{
    RouterSmem L;
    L.bias = align16((size_t)rows * chunks * CHUNK * sizeof(float));
    L.score = L.bias + align16((size_t)n * sizeof(float));
    L.keys = L.score + align16((size_t)rows * n * sizeof(float));
    L.pick_e = L.keys + align16((size_t)rows * n * sizeof(uint32_t));
    L.pick_w = L.pick_e + align16((size_t)rows * k * sizeof(int));
    L.valid = L.pick_w + align16((size_t)rows * k * sizeof(float));
    L.first = L.valid + align16((size_t)rows * sizeof(int));
    L.total = L.first + ROUTER_THREADS * sizeof(int);
    return L;
}

/* What the one-block routers start from: the sizes and router_smem's arrays in the block's
 * shared memory (after the staged x where the block stages it) */
struct RouterBlock {
    int n, k, rows, chunks;
    float *bias, *score, *pick_w;
    uint32_t *keys;
    int *pick_e, *valid, *first;
};

__device__ __forceinline__ RouterBlock router_block(const dsrtk_moe_router_args &a, float4 *staged, bool stages_x)
{
    RouterBlock b;
    b.n = a.route.n_routed, b.k = a.route.k, b.rows = (int)a.route.rows, b.chunks = (a.gate.cols + CHUNK - 1) / CHUNK;
    const RouterSmem L = router_smem(b.rows, stages_x ? b.chunks : 0, b.n, b.k);
    char *smem = (char *)staged;
    b.bias = (float *)(smem + L.bias), b.score = (float *)(smem + L.score), b.pick_w = (float *)(smem + L.pick_w);
    b.keys = (uint32_t *)(smem + L.keys);
    b.pick_e = (int *)(smem + L.pick_e), b.valid = (int *)(smem + L.valid), b.first = (int *)(smem + L.first);
    return b;
}

/* x's rows into xs as stage_rows lays them out (f32 chunks of 32 columns, float4 word q of chunk c
 * at q ^ (c & 7), zeros past the last column; the gate takes no Q8), by the whole block, four
 * words a thread loaded before any is stored */
__device__ __forceinline__ void stage_x(float4 *xs, const void *x, int x_dtype, int64_t x_ld, int rows, int cols, int chunks)
{
    enum { SU = 4 };
    const int words = chunks * 8, units = rows * words;
    const int bf16 = x_dtype == DSRT_BF16;
    const uintptr_t esize = bf16 ? 2 : 4;
    /* 4 columns as one 8- or 16-byte load where every row's words lie aligned */
    const bool vec = cols % 4 == 0 && ((uintptr_t)x | (uintptr_t)x_ld * esize) % (4 * esize) == 0;
    for (int u0 = threadIdx.x; u0 < units; u0 += SU * blockDim.x) {
        float4 v[SU];
#pragma unroll
        for (int i = 0; i < SU; i++) {
            const int u = u0 + i * blockDim.x, t = u / words, col = 4 * (u - t * words);
            const int64_t at = t * x_ld + col;
            v[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (u >= units) continue;
            if (!vec) {
                float f[4];
#pragma unroll
                for (int c = 0; c < 4; c++) f[c] = col + c < cols ? load_x(x, x_dtype, at + c) : 0.0f;
                v[i] = make_float4(f[0], f[1], f[2], f[3]);
            } else if (col < cols && bf16) { /* bf16 to f32 is exact: load_x's values */
                const uint2 b = *(const uint2 *)((const uint16_t *)x + at);
                v[i] = make_float4(dsrt_bits_f32(b.x << 16), dsrt_bits_f32(b.x & 0xffff0000u), dsrt_bits_f32(b.y << 16),
                                   dsrt_bits_f32(b.y & 0xffff0000u));
            } else if (col < cols) {
                v[i] = *(const float4 *)((const float *)x + at);
            }
        }
#pragma unroll
        for (int i = 0; i < SU; i++) {
            const int u = u0 + i * blockDim.x, t = u / words, w = u - t * words, c = w / 8, q = w % 8;
            if (u < units) xs[t * words + c * 8 + (q ^ (c & 7))] = v[i];
        }
    }
}

/* The 16-byte words of chunks c0, c0 + 32, ... (GATE_U of them) of gate row j (a vector bf16 matrix) */
__device__ __forceinline__ void load_gate_chunks(const dsrtk_moe_matrix &g, int j, int c0, int chunks,
                                                 uint32_t (&word)[GATE_U][16])
{
    const uint4 *row = (const uint4 *)((const uint16_t *)g.weight + g.offset + (int64_t)j * g.stride0);
#pragma unroll
    for (int u = 0; u < GATE_U; u++) {
        const int c = c0 + 32 * u;
#pragma unroll
        for (int q = 0; q < 4; q++) {
            const uint4 v = c < chunks ? __ldg(row + 4 * c + q) : make_uint4(0, 0, 0, 0);
            word[u][4 * q] = v.x, word[u][4 * q + 1] = v.y, word[u][4 * q + 2] = v.z, word[u][4 * q + 3] = v.w;
        }
    }
}

/* Hash routing's pick i (token i / k, its (i % k)-th expert); ok: whether the token is inside the
 * vocabulary (an invalid token picks expert 0, and gets NaN weights) */
__device__ __forceinline__ int hash_pick(const dsrtk_moe_route_args &a, int i, bool &ok)
{
    const int t = i / a.k;
    const int64_t token = dsrt_load_i64(a.token_ids.data, a.token_ids.dtype, dsrt_view_index(&a.token_ids, t));
    ok = token >= 0 && token < a.tid2eid.shape[0];
    return ok ? hash_expert(a, token, i - t * a.k) : 0;
}

/* What block 0's routing reads besides the scores, into shared memory, by threads i0, i0 + stride, ...:
 * the bias (learned routing) or each token's validity and tid2eid row (hash routing) */
__device__ __forceinline__ void router_inputs(const dsrtk_moe_route_args &a, int i0, int stride, float *bias, int *pick_e,
                                              int *valid)
{
    const int rows = (int)a.rows, k = a.k;
    if (a.hash) {
        for (int i = i0; i < rows * k; i += stride) {
            bool ok;
            pick_e[i] = hash_pick(a, i, ok);
            if (i % k == 0) valid[i / k] = ok;
        }
    } else {
        for (int e = i0; e < a.n_routed; e += stride)
            bias[e] = dsrt_load_f32(a.bias.data, a.bias.dtype, a.bias.offset + e * a.bias.stride[0]);
    }
}

/* moe_group_kernel's result for few picks (rows·k <= the block's threads), a thread per pick: pick
 * p of expert e lands at (picks of lower experts) + (earlier picks of e), the counting sort's
 * stable order, and the first pick of each expert writes its group at (distinct lower experts) */
__device__ __forceinline__ void group_few(const dsrtk_moe_router_args &a, const int *pick_e, const float *pick_w, int *first_s)
{
    const int rows = (int)a.route.rows, k = a.route.k, picks = rows * k, p = threadIdx.x;
    const int e = p < picks ? pick_e[p] : -1;
    int lower = 0, before = 0, count = 0;
    for (int q = 0; q < picks; q++) {
        const int f = pick_e[q];
        lower += f < e;
        count += f == e;
        before += f == e && q < p;
    }
    const bool first = p < picks && before == 0;
    first_s[p] = first;
    const int distinct = __syncthreads_count(first);
    if (p < picks) {
        int groups_below = 0;
        for (int q = 0; q < picks; q++) groups_below += first_s[q] && pick_e[q] < e;
        const int pos = lower + before;
        a.row_token[pos] = p / k;
        if (pick_w) a.row_weight[pos] = pick_w[p];
        a.pos_of_pick[p] = pos;
        if (first) a.groups[3 * groups_below] = e, a.groups[3 * groups_below + 1] = lower, a.groups[3 * groups_below + 2] = count;
    }
    if (p == 0) { /* the shared expert's group, last */
        a.groups[3 * distinct] = a.route.n_routed, a.groups[3 * distinct + 1] = picks, a.groups[3 * distinct + 2] = rows;
        *a.n_groups = distinct + 1;
    }
    if (p < rows) a.row_token[picks + p] = p;
}

/* Gate row j's logits of the staged tokens (rows <= TB), by one warp: lane t returns token t's.
 * loaded: word already holds the row's first GATE_U chunks (loads issued before the staging). */
template <int TB>
__device__ __forceinline__ float gate_logit(const dsrtk_moe_matrix &g, int j, int chunks, const float4 *staged, int rows,
                                            bool loaded, uint32_t (&word)[GATE_U][16])
{
    const int lane = threadIdx.x % 32, per_row = chunks * 8;
    float acc[TB];
#pragma unroll
    for (int t = 0; t < TB; t++) acc[t] = 0.0f;
    if (g.vector) { /* dot_row's bf16 path, GATE_U chunks loaded at once */
        for (int c0 = lane; c0 < chunks; c0 += 32 * GATE_U) {
            if (!loaded || c0 != lane) load_gate_chunks(g, j, c0, chunks, word);
#pragma unroll
            for (int u = 0; u < GATE_U; u++) {
                const int c = c0 + 32 * u;
                if (c < chunks) chunk_bf16<TB>(word[u], staged + c * 8, c & 7, per_row, rows, acc);
            }
        }
    } else {
        dot_row<TB>(g, j, chunks, staged, per_row, rows, nullptr, acc);
    }
    float mine = 0.0f;
#pragma unroll
    for (int t = 0; t < TB; t++) {
        if (t >= rows) break; /* uniform */
        float v = acc[t];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (lane == t) mine = v;
    }
    return mine;
}

/* The gate at decode: per_block gate rows a block, a warp a row, each row's logits of the staged
 * tokens into r.logits (their scores for an element-wise score function: softmax needs the whole
 * row, moe_route_one_kernel scores it). TB: registers for the tokens (rows <= TB). Launched
 * dependent: the block's gate rows go to L2 before the wait. */
template <int TB>
__global__ void __launch_bounds__(ROUTER_THREADS, 1) moe_gate_kernel(const __grid_constant__ dsrtk_moe_router_args a,
                                                                     int per_block)
{
    extern __shared__ float4 staged[];
    const dsrtk_moe_matrix &g = a.gate;
    const dsrtk_moe_route_args &r = a.route;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n = r.n_routed, rows = (int)r.rows;
    const int chunks = (g.cols + CHUNK - 1) / CHUNK;
    const int first = blockIdx.x * per_block, end = first + per_block < n ? first + per_block : n;
    if (g.vector) { /* a row's 128-byte lines, the block's rows over its threads */
        const int lines = (g.cols * 2 + 127) / 128;
        for (int i = threadIdx.x; i < (end - first) * lines; i += ROUTER_THREADS)
            dsrtk_prefetch_l2((const char *)((const uint16_t *)g.weight + g.offset + (int64_t)(first + i / lines) * g.stride0) +
                              128 * (i % lines));
    }
    dsrtk_wait_producer();

    int j = first + warp;
    uint32_t word[GATE_U][16];
    if (g.vector && j < end) load_gate_chunks(g, j, lane, chunks, word); /* in flight during the staging */
    stage_x(staged, a.x, a.x_dtype, a.x_ld, rows, g.cols, chunks);
    __syncthreads();
    for (bool loaded = g.vector; j < end; j += ROUTER_WARPS, loaded = false) {
        const float mine = gate_logit<TB>(g, j, chunks, staged, rows, loaded, word);
        if (lane < rows)
            r.logits[(int64_t)lane * n + j] = r.score_func == DSRTK_MOE_SOFTMAX ? mine : score_of(r.score_func, mine);
    }
}

/* The routing at decode, one block after moe_gate_kernel: the scores [rows, n] and the routing's
 * other inputs into shared memory (router_smem's arrays, no staged x), then a warp a token as
 * moe_route_kernel (softmax, the top-k with the bias, the weights) and the few picks grouped
 * (group_few). Launched dependent. */
__global__ void __launch_bounds__(ROUTER_THREADS) moe_route_one_kernel(const __grid_constant__ dsrtk_moe_router_args a)
{
    extern __shared__ float4 smem[];
    const RouterBlock b = router_block(a, smem, false);
    const dsrtk_moe_route_args &r = a.route;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n = b.n, k = b.k, rows = b.rows;
    float *bias = b.bias, *score = b.score, *pick_w = b.pick_w;
    uint32_t *keys = b.keys;
    int *pick_e = b.pick_e, *valid = b.valid;
    dsrtk_wait_producer();
    router_inputs(r, threadIdx.x, ROUTER_THREADS, bias, pick_e, valid);
    /* the scores, by the whole block with its loads in flight together */
    for (int i0 = threadIdx.x; i0 < rows * n; i0 += SCORE_U * ROUTER_THREADS) {
        float v[SCORE_U];
#pragma unroll
        for (int u = 0; u < SCORE_U; u++) {
            const int i = i0 + u * ROUTER_THREADS;
            v[u] = i < rows * n ? r.logits[i] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < SCORE_U; u++)
            if (i0 + u * ROUTER_THREADS < rows * n) score[i0 + u * ROUTER_THREADS] = v[u];
    }
    __syncthreads();
    if (warp < rows) { /* moe_route_kernel's steps for token `warp` */
        const int t = warp;
        float *row = score + t * n;
        if (r.score_func == DSRTK_MOE_SOFTMAX) softmax_warp(row, n, lane);
        int *sel = pick_e + t * k;
        bool ok = true;
        if (r.hash) {
            ok = valid[t];
        } else {
            uint32_t *key = keys + t * n;
            for (int e = lane; e < n; e += 32) key[e] = order_key(row[e] + bias[e]);
            __syncwarp();
            top_k_warp(key, n, k, lane, sel);
        }
        weights_warp(row, sel, k, ok, r.norm_topk_prob, r.route_scale, lane, r.ids + t * k, r.weights + t * k, pick_w + t * k);
    }
    if (!a.groups) return; /* uniform */
    __syncthreads();
    group_few(a, pick_e, pick_w, b.first);
}

/* Hash routing with an element-wise score (sqrtsoftplus, sigmoid): a token's weights need only the
 * logits of its k picked experts, not the whole gate (Flash: 6 of 256 rows, 48 KB of the 2 MB
 * gate). One block: the picks from tid2eid (a thread a pick, once), then a warp a pick for its
 * gate row's logit, the row's loads in flight while the tokens are staged (gate_logit:
 * moe_gate_kernel's bits), then its weights and the grouping as there. The chain is dependent
 * reads (ids, tid2eid, the gate row): warps that each looked their pick up again, beside
 * router_inputs' lookups, paid two more round trips (1.1 us of ~10, globaltimer marks, H200).
 * Launched dependent: the ids and x come from earlier work. */
template <int TB>
__device__ __forceinline__ RouterBlock hash_route_block(const dsrtk_moe_router_args &a, float4 *staged)
{
    const RouterBlock b = router_block(a, staged, true);
    const dsrtk_moe_matrix &g = a.gate;
    const dsrtk_moe_route_args &r = a.route;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n = b.n, k = b.k, rows = b.rows, chunks = b.chunks;
    float *score = b.score, *pick_w = b.pick_w;
    int *pick_e = b.pick_e, *valid = b.valid;
    router_inputs(r, threadIdx.x, ROUTER_THREADS, nullptr, pick_e, valid);
    __syncthreads();
    /* a warp's first gate row in flight before the staging: the chain of dependent reads is then
     * ids, tid2eid, the gate row, not the staging too */
    uint32_t word[GATE_U][16];
    if (g.vector && warp < rows * k) load_gate_chunks(g, pick_e[warp], lane, chunks, word);
    stage_x(staged, a.x, a.x_dtype, a.x_ld, rows, g.cols, chunks);
    __syncthreads();
    for (int p = warp; p < rows * k; p += ROUTER_WARPS) {
        const int t = p / k, e = pick_e[p];
        const float mine = gate_logit<TB>(g, e, chunks, staged, rows, g.vector && p == warp, word);
        if (lane == t) score[t * n + e] = score_of(r.score_func, mine); /* a token's repeated pick: the same value */
    }
    __syncthreads();
    if (warp < rows)
        weights_warp(score + warp * n, pick_e + warp * k, k, valid[warp], r.norm_topk_prob, r.route_scale, lane,
                     r.ids + warp * k, r.weights + warp * k, pick_w + warp * k);
    __syncthreads();
    return b;
}

template <int TB>
__global__ void __launch_bounds__(ROUTER_THREADS, 1) moe_hash_router_kernel(const __grid_constant__ dsrtk_moe_router_args a)
{
    dsrtk_wait_producer();
    extern __shared__ float4 staged[];
    const RouterBlock b = hash_route_block<TB>(a, staged);
    if (a.groups) group_few(a, b.pick_e, b.pick_w, b.first);
}

/* ---- hash routing beside UP (decode on the warpgroup tile) ----
 * A hash layer's picks and their grouping depend on the token ids only; only the weights need x
 * (the picked gate rows' logits), and UP needs those only for h, at the end of its walk. So
 * moe_hash_picks_kernel writes the picks' grouping first (ids, tid2eid, the grouping: a short
 * chain), and moe_wg_route_kernel starts streaming the experts at once while one of its blocks
 * computes the weights (moe_hash_router_kernel's code, so its bits) and publishes them; UP's
 * blocks wait for them after their walk (wait_weights), which outlasts the weights' ~5 us ~7 times.
 * It takes moe_hash_router_kernel's ~10 us out of a hash layer's chain (CUPTI timeline, H200,
 * Flash decode). Roles go by arrival, an atomic ticket, not by blockIdx: the first block to run
 * takes the router's role, so the one block the others may wait for is resident, whatever else the
 * device runs; the workers take the block rows of moe_wg_kernel<UP>'s grid in ticket order. */

/* The picks and the grouping (no weights), and the kernel's two sync words zeroed: the ticket and
 * the weights' flag */
__global__ void __launch_bounds__(ROUTER_THREADS) moe_hash_picks_kernel(const __grid_constant__ dsrtk_moe_router_args a,
                                                                        uint32_t *sync)
{
    __shared__ int pick_e[ROUTER_THREADS], valid[TB_MAX], first[ROUTER_THREADS];
    dsrtk_wait_producer();
    router_inputs(a.route, threadIdx.x, ROUTER_THREADS, nullptr, pick_e, valid);
    if (threadIdx.x < 2) sync[threadIdx.x] = 0;
    __syncthreads();
    group_few(a, pick_e, nullptr, first);
}

/* The router's role: the weights (ids, weights, row_weight by the picks' positions), then the flag
 * (release: a waiting block that sees it sees the weights) */
template <int TB>
__device__ __noinline__ void route_role(const dsrtk_moe_router_args &a, uint32_t *ready)
{
    const RouterBlock b = hash_route_block<TB>(a, (float4 *)mma_shared);
    for (int p = threadIdx.x; p < b.rows * b.k; p += blockDim.x) a.row_weight[a.pos_of_pick[p]] = b.pick_w[p];
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(ready), "r"(1u) : "memory");
}

/* grid: moe_wg_kernel<UP>'s (nx, rows_y) plus a block row, for the router's block (its other
 * blocks leave at once); sync: the picks kernel's zeroed ticket and flag */
__global__ void __launch_bounds__(MMA_WARPS * 32, 2) moe_wg_route_kernel(const __grid_constant__ dsrtk_moe_project_args up,
                                                                         const __grid_constant__ dsrtk_moe_router_args route,
                                                                         uint32_t *sync)
{
    static_assert(ROUTER_THREADS == MMA_WARPS * 32, "the router's role takes a projection block");
    __shared__ uint32_t ticket;
    dsrtk_wait_producer();
    if (threadIdx.x == 0) ticket = atomicAdd(sync, 1u);
    __syncthreads();
    const int nx = (int)gridDim.x, rows_y = (int)gridDim.y - 1, worker = (int)ticket - 1;
    if (worker < 0) {
        const int rows = (int)route.route.rows;
        if (rows <= 1) route_role<1>(route, sync + 1);
        else if (rows <= 2) route_role<2>(route, sync + 1);
        else route_role<4>(route, sync + 1);
        return;
    }
    if (worker >= nx * rows_y) return;
    wg_group<DSRTK_MOE_UP>(up, project_group(up, worker / nx, rows_y), worker % nx, nx, sync + 1);
}

/* moe_hash_router_kernel for rows <= TB; *launched 0 (and DSRTK_OK) when its shared memory is
 * more than the device gives a block */
template <int TB>
static int launch_hash_router(int dev, const dsrtk_moe_router_args *a, size_t smem, cudaStream_t s, int *launched)
{
    static std::atomic<int> opted[64]; /* the opt-in, once per device: the most a block may have */
    static std::atomic<int> limit[64];
    if (dev >= 64) return DSRTK_OK;
    if (!opted[dev].load(std::memory_order_acquire)) {
        int optin = 0;
        cudaFuncAttributes fa;
        bool ok = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) == cudaSuccess &&
                  cudaFuncGetAttributes(&fa, moe_hash_router_kernel<TB>) == cudaSuccess &&
                  cudaFuncSetAttribute(moe_hash_router_kernel<TB>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       optin - (int)fa.sharedSizeBytes) == cudaSuccess;
        if (!ok) cudaGetLastError();
        limit[dev].store(ok ? optin - (int)fa.sharedSizeBytes : 48 * 1024, std::memory_order_relaxed);
        opted[dev].store(1, std::memory_order_release);
    }
    if (smem > (size_t)limit[dev].load(std::memory_order_relaxed)) return DSRTK_OK;
    *launched = 1;
    return dsrtk_check(dsrtk_launch_dependent(moe_hash_router_kernel<TB>, dim3(1), dim3(ROUTER_THREADS), smem, s, *a),
                       "launch of moe_hash_router_kernel on cuda:%d", dev);
}

/* moe_gate_kernel<TB> for rows <= TB, then moe_route_one_kernel */
template <int TB>
static int launch_gate_route(int dev, const dsrtk_moe_router_args *a, size_t gate_smem, size_t route_smem, cudaStream_t s)
{
    int st = dsrtk_allow_shared(dev, (const void *)moe_gate_kernel<TB>, gate_smem, "moe_gate_kernel");
    if (!st) st = dsrtk_allow_shared(dev, (const void *)moe_route_one_kernel, route_smem, "moe_route_one_kernel");
    if (st) return st;
    /* one block a multiprocessor, each taking its share of the gate rows */
    const int n = a->route.n_routed, sms = dsrtk_multiprocessors(dev), blocks = n < sms ? n : sms;
    const int per_block = (n + blocks - 1) / blocks, grid = (n + per_block - 1) / per_block;
    st = dsrtk_check(dsrtk_launch_dependent(moe_gate_kernel<TB>, dim3((unsigned)grid), dim3(ROUTER_THREADS), gate_smem, s, *a,
                                            per_block),
                     "launch of moe_gate_kernel on cuda:%d", dev);
    if (st) return st;
    return dsrtk_check(dsrtk_launch_dependent(moe_route_one_kernel, dim3(1), dim3(ROUTER_THREADS), route_smem, s, *a),
                       "launch of moe_route_one_kernel on cuda:%d", dev);
}

/* The few-token router (hash routing with an element-wise score: moe_hash_router_kernel, else
 * moe_gate_kernel and moe_route_one_kernel); *launched 0 (and DSRTK_OK) when its shared memory is
 * more than the device gives a block, for the three kernels */
static int launch_router(int dev, const dsrtk_moe_router_args *a, cudaStream_t s, int *launched)
{
    const int64_t rows = a->route.rows;
    const int n = a->route.n_routed, k = a->route.k, chunks = (a->gate.cols + CHUNK - 1) / CHUNK;
    *launched = 0;
    if (rows > TB_MAX || rows * k > ROUTER_THREADS) return DSRTK_OK;
    const RouterSmem L = router_smem((int)rows, chunks, n, k);
    if (a->route.hash && a->route.score_func != DSRTK_MOE_SOFTMAX) {
        int st = rows <= 1 ? launch_hash_router<1>(dev, a, L.total, s, launched)
               : rows <= 2 ? launch_hash_router<2>(dev, a, L.total, s, launched)
               : rows <= 4 ? launch_hash_router<4>(dev, a, L.total, s, launched)
                           : launch_hash_router<TB_MAX>(dev, a, L.total, s, launched);
        if (st || *launched) return st;
    }
    /* the gate kernel's staged x, and the routing block's arrays */
    const size_t gate_smem = L.bias, route_smem = router_smem((int)rows, 0, n, k).total;
    int optin = 0, st = dsrtk_shared_limit(dev, &optin);
    if (st || gate_smem > (size_t)optin || route_smem > (size_t)optin) return st;
    *launched = 1;
    return rows <= 1 ? launch_gate_route<1>(dev, a, gate_smem, route_smem, s)
         : rows <= 2 ? launch_gate_route<2>(dev, a, gate_smem, route_smem, s)
         : rows <= 4 ? launch_gate_route<4>(dev, a, gate_smem, route_smem, s)
                     : launch_gate_route<TB_MAX>(dev, a, gate_smem, route_smem, s);
}

/* The gate of many bf16 tokens as one cuBLAS GEMM: bf16 products are exact in its fp32
 * accumulators, so the logits are fp32 reorderings of the CPU's, as the kernel's are. Measured on
 * the H200 (Flash, T = 4096): moe_project_kernel's gate, which streams the 2 MB gate once per 8
 * tokens, took 2.6 ms a layer. f32 tokens keep the kernel (no f32 copy of the gate is kept). */
enum { GATE_GEMM_ROWS = 64 };

static bool gate_by_gemm(const dsrtk_moe_router_args *a)
{
    const dsrtk_moe_matrix &g = a->gate;
    return a->route.rows >= GATE_GEMM_ROWS && a->x_dtype == DSRT_BF16 && g.stride1 == 1 && g.stride0 >= g.cols &&
           a->x_ld >= g.cols && g.stride0 <= INT32_MAX && a->x_ld <= INT32_MAX && a->route.rows <= INT32_MAX;
}

static int gate_gemm(int dev, const dsrtk_moe_router_args *a, void *stream)
{
    const dsrtk_moe_matrix &g = a->gate;
    const dsrtk_moe_route_args *r = &a->route;
    if (dev < 0 || dev >= BLAS_MAX_DEVICES) return dsrtk_fail(DSRTK_ERROR, "moe: no device cuda:%d", dev);
    std::lock_guard<std::mutex> lock(blas_lock(dev)); /* blas.cuh: the shared handle */
    cublasHandle_t h;
    int st = blas_handle(dev, stream, "moe", &h);
    if (st) return st;
    const float one = 1.0f, zero = 0.0f;
    /* column-major: logitsᵀ [n_routed, rows] = W [n_routed, dim] (stored [dim, n_routed]: op T) · xᵀ */
    return blas_check(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, r->n_routed, (int)r->rows, g.cols, &one,
                                   (const uint16_t *)g.weight + g.offset, CUDA_R_16BF, (int)g.stride0, a->x, CUDA_R_16BF,
                                   (int)a->x_ld, &zero, r->logits, CUDA_R_32F, r->n_routed, CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT),
                      "moe", "cublasGemmEx (gate)", dev);
}

int dsrtk_moe_router(int dev, const dsrtk_moe_router_args *a, void *stream)
{
    DSRTK_SET_DEVICE(dev, "moe router");
    const dsrtk_moe_route_args *r = &a->route;
    if (r->rows == 0) return DSRTK_OK;
    if (!a->table || !a->x || (a->x_dtype != DSRT_F32 && a->x_dtype != DSRT_BF16) || !a->gate.weight ||
        a->gate.dtype != DSRT_BF16 || a->gate.rows != r->n_routed || a->gate.cols < 1 || !r->logits || !r->ids ||
        !r->weights || r->n_routed < 1 || r->k < 1 || r->k > r->n_routed ||
        (r->hash ? !r->tid2eid.data || !r->token_ids.data : !r->bias.data) ||
        (a->groups && (!a->n_groups || !a->row_token || !a->pos_of_pick || !a->row_weight)) ||
        r->rows * (r->k + 1) > INT32_MAX)
        return dsrtk_fail(DSRTK_ERROR, "moe: router of %lld tokens called with bad arguments (%d experts, %d per token)",
                          (long long)r->rows, r->n_routed, r->k);
    cudaStream_t s = (cudaStream_t)stream;
    int launched, st = launch_router(dev, a, s, &launched);
    if (st || launched) return st;
    if (gate_by_gemm(a)) {
        st = gate_gemm(dev, a, stream);
    } else {
        dsrtk_moe_project_args gate = {.mode = DSRTK_MOE_GATE, .table = a->table, .x = a->x, .x_dtype = a->x_dtype,
                                       .x_ld = a->x_ld, .single_set = r->n_routed + 1, .single_rows = r->rows,
                                       .max_out = r->n_routed, .max_in = a->gate.cols, .out = r->logits, .out_ld = r->n_routed};
        st = dsrtk_moe_project(dev, &gate, stream);
    }
    if (st || (st = launch_route(dev, r, s))) return st;
    if (!a->groups) return DSRTK_OK;
    GroupArgs group = {r->ids, r->weights, r->rows, r->k, r->n_routed, a->groups, a->n_groups, a->row_token, a->pos_of_pick,
                       a->row_weight};
    return launch_group(dev, &group, s);
}

int dsrtk_moe_route_up(int dev, const dsrtk_moe_router_args *r, const dsrtk_moe_project_args *up, uint32_t *sync,
                       void *stream, int *launched)
{
    enum { ROUTE_UP_ROWS = 4, ROUTE_UP_SMEM = 100 * 1024 }; /* route_role's TB; room for two blocks a multiprocessor */
    *launched = 0;
    DSRTK_SET_DEVICE(dev, "moe hash routing beside UP");
    const dsrtk_moe_route_args &ro = r->route;
    if (!ro.hash || ro.score_func == DSRTK_MOE_SOFTMAX || !r->groups || ro.rows < 1 || ro.rows > ROUTE_UP_ROWS ||
        ro.rows * ro.k > ROUTER_THREADS || up->mode != DSRTK_MOE_UP || up->tensor_cores != DSRTK_MOE_WGMMA ||
        !up->reference || up->groups != r->groups || up->n_groups != r->n_groups || up->row_weight != r->row_weight)
        return DSRTK_OK;
    const RouterSmem L = router_smem((int)ro.rows, (r->gate.cols + CHUNK - 1) / CHUNK, ro.n_routed, ro.k);
    const size_t smem = L.total > wg_smem(up->max_in) ? L.total : wg_smem(up->max_in);
    if (smem > ROUTE_UP_SMEM) return DSRTK_OK;
    if (!sync || !r->gate.weight || !ro.ids || !ro.weights || !ro.tid2eid.data || !ro.token_ids.data || !r->pos_of_pick ||
        !r->row_token || !up->table || !up->x || !up->out || up->out_ld < 2 * (int64_t)up->max_out || up->max_groups < 1 ||
        up->max_groups > 65534)
        return dsrtk_fail(DSRTK_ERROR, "moe: hash routing beside UP of %lld tokens called with bad arguments",
                          (long long)ro.rows);
    int st = dsrtk_allow_shared(dev, (const void *)moe_wg_route_kernel, smem, "moe_wg_route_kernel");
    if (st) return st;
    cudaStream_t s = (cudaStream_t)stream;
    st = dsrtk_check(dsrtk_launch_dependent(moe_hash_picks_kernel, dim3(1), dim3(ROUTER_THREADS), 0, s, *r, sync),
                     "launch of moe_hash_picks_kernel on cuda:%d", dev);
    if (st) return st;
    int per_group; /* the router's block reserved a slot, so that no worker waits for one */
    const int rows_y = project_grid(dev, up, (up->max_out + WG_ROWS - 1) / WG_ROWS, &per_group, 1);
    st = dsrtk_check(dsrtk_launch_dependent(moe_wg_route_kernel, dim3((unsigned)per_group, rows_y + 1), dim3(MMA_WARPS * 32),
                                            smem, s, *up, *r, sync),
                     "launch of moe_wg_route_kernel on cuda:%d", dev);
    *launched = !st;
    return st;
}

/* ---- combine (moe.c: add_rows in combine_experts' order) ----
 * A grid of (column tiles, tokens): every block orders its token's k positions (k <= 64) and each
 * thread sums one column in that fixed order (ascending positions, then the shared row) from 0 in
 * f32, so results do not depend on the tiling. The positions are loaded by k threads at once and
 * each placed by its rank (they are distinct: a row each), not sorted by one thread load after
 * load; a column's k + 1 values are loaded before they are added. At decode (Flash, T = 1) 16
 * blocks of 256 columns replace one block walking 4096 columns: bytes (k + 1) x dim x 4 read +
 * dim x 4 written = 131 KB, well under 1 us of DRAM. */

/* experts per token the combine orders in shared memory (Flash: 6); fixed arrays, because a
 * dynamic one sized k*4 bytes drew out-of-bounds vector reads under compute-sanitizer */
#define MOE_COMBINE_MAX_K 64
enum { COMBINE_U = 8 /* a column's routed rows loaded at once */ };

/* out row t = the sum of y's rows of token t's picks in `order` (ascending positions), then its
 * shared-expert row. Four columns a thread (one 8- or 16-byte access a row when `vec`; a column a
 * thread took 192 us a Flash layer at 4096 tokens, H200, 2-byte loads). */
__global__ void __launch_bounds__(DSRTK_BLOCK) moe_combine_kernel(const void *y, int y_dtype, const int32_t *pos_of_pick,
                                                                  int64_t rows, int k, int64_t dim, void *out, int out_dtype,
                                                                  bool vec)
{
    dsrtk_wait_producer(); /* launched dependent (common.cuh) */
    __shared__ int pos[MOE_COMBINE_MAX_K], order[MOE_COMBINE_MAX_K];
    const int64_t c = 4 * ((int64_t)blockIdx.x * blockDim.x + threadIdx.x); /* the thread's first column, grid-strided */
    const int i = threadIdx.x;
    for (int64_t t = blockIdx.y; t < rows; t += gridDim.y) {
        __syncthreads(); /* the previous token's order is consumed */
        int mine = 0;
        if (i < k) pos[i] = mine = pos_of_pick[t * k + i];
        __syncthreads();
        if (i < k) { /* positions ascending = experts ascending, then picks ascending */
            int rank = 0;
            for (int j = 0; j < k; j++) rank += pos[j] < mine;
            order[rank] = mine;
        }
        __syncthreads();
        const int64_t shared_row = (rows * k + t) * dim;
        for (int64_t col = c; col < dim; col += 4 * (int64_t)gridDim.x * blockDim.x) {
            float shared[4], acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            bool ok[4];
            ld4_row(y, y_dtype, shared_row, col, dim, vec, shared, ok);
            const bool whole = vec && col + 3 < dim;
            for (int i0 = 0; i0 < k; i0 += COMBINE_U) {
                float v[COMBINE_U][4];
                if (whole) { /* every load first (ld4_all); past k, the last pick's row again, unused */
                    int64_t at[COMBINE_U];
#pragma unroll
                    for (int u = 0; u < COMBINE_U; u++) at[u] = (int64_t)order[i0 + u < k ? i0 + u : k - 1] * dim + col;
                    ld4_all<COMBINE_U>(y, y_dtype, at, v);
                } else {
#pragma unroll
                    for (int u = 0; u < COMBINE_U; u++)
                        if (i0 + u < k) ld4_row(y, y_dtype, (int64_t)order[i0 + u] * dim, col, dim, vec, v[u], ok);
                }
#pragma unroll
                for (int u = 0; u < COMBINE_U; u++)
                    if (i0 + u < k)
#pragma unroll
                        for (int e = 0; e < 4; e++) acc[e] += v[u][e];
            }
#pragma unroll
            for (int e = 0; e < 4; e++) acc[e] += shared[e];
            st4_row(out, out_dtype, t * dim, col, dim, vec, acc);
        }
    }
}

int dsrtk_moe_combine(int dev, const void *y, int y_dtype, const int32_t *pos_of_pick, int64_t rows, int32_t k, int64_t dim,
                      void *out, int out_dtype, void *stream)
{
    DSRTK_SET_DEVICE(dev, "moe combine");
    if (rows == 0 || dim == 0) return DSRTK_OK;
    if (!y || !pos_of_pick || !out || k < 1 || (out_dtype != DSRT_F32 && out_dtype != DSRT_BF16) ||
        (y_dtype != DSRT_F32 && y_dtype != DSRT_BF16))
        return dsrtk_fail(DSRTK_ERROR, "moe: combine called with bad arguments");
    if (k > MOE_COMBINE_MAX_K)
        return dsrtk_fail(DSRTK_ERROR, "moe: combine of %d experts per token (at most %d)", k, MOE_COMBINE_MAX_K);
    /* column tiles of 4·DSRTK_BLOCK (at most 64: wider rows loop) times tokens (at most 65535: more loop) */
    int64_t tiles = (dim + 4 * DSRTK_BLOCK - 1) / (4 * DSRTK_BLOCK);
    int grid_x = tiles < 64 ? (int)tiles : 64, grid_y = rows < 65535 ? (int)rows : 65535;
    const bool vec = act_vec(y, dim) && act_vec(out, dim);
    (void)dsrtk_launch_dependent(moe_combine_kernel, dim3(grid_x, grid_y), dim3(DSRTK_BLOCK), 0, (cudaStream_t)stream, y, y_dtype,
                                 pos_of_pick, rows, k, dim, out, out_dtype, vec);
    return dsrtk_check_launch("moe_combine_kernel", dev);
}

/* ---- prefill: gather, dequantise, GEMM, SwiGLU ---- */

/* gather (+ Q8): a warp per block of 128 columns of an output row, 4 columns a lane */
/* a warp per row, ACT_U blocks of 128 columns in flight at once (act.cuh) */
__global__ void __launch_bounds__(DSRTK_BLOCK) moe_gather_kernel(const void *x, int x_dtype, int64_t x_ld,
                                                                 const int32_t *row_x, int64_t rows, int64_t cols, int q8,
                                                                 void *out, int out_dtype, bool vec_x, bool vec_out)
{
    const int lane = threadIdx.x % 32;
    const int64_t warps = (int64_t)gridDim.x * (blockDim.x / 32);
    for (int64_t r = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32; r < rows; r += warps) { /* warp-uniform */
        const int64_t xr = row_x ? row_x[r] : r;
        for (int64_t c0 = 0; c0 < cols; c0 += ACT_U * ACT_BLOCK) {
            const int64_t row[1] = {xr * x_ld};
            float v[1][ACT_U][4];
            bool valid[ACT_U][4];
            ld4_blocks<1, ACT_U>(x, x_dtype, row, c0, cols, vec_x, v, valid);
#pragma unroll
            for (int u = 0; u < ACT_U; u++) {
                if (q8) q8_warp(v[0][u], valid[u]);
                st4_row(out, out_dtype, r * cols, c0 + u * ACT_BLOCK + 4 * lane, cols, vec_out, v[0][u]);
            }
        }
    }
}

int dsrtk_moe_gather(int dev, const void *x, int x_dtype, int64_t x_ld, const int32_t *row_x, int64_t rows, int64_t cols,
                     int q8, void *out, int out_dtype, void *stream)
{
    DSRTK_SET_DEVICE(dev, "moe gather");
    if (rows == 0 || cols == 0) return DSRTK_OK;
    if (!x || !out || (x_dtype != DSRT_F32 && x_dtype != DSRT_BF16) || (out_dtype != DSRT_F32 && out_dtype != DSRT_BF16))
        return dsrtk_fail(DSRTK_ERROR, "moe: gather of %lld rows called with bad arguments", (long long)rows);
    int grid = dsrtk_grid_for(dev, rows * 32, DSRTK_BLOCK);
    moe_gather_kernel<<<grid, DSRTK_BLOCK, 0, (cudaStream_t)stream>>>(x, x_dtype, x_ld, row_x, rows, cols, q8, out, out_dtype,
                                                                      act_vec(x, x_ld), act_vec(out, cols));
    return dsrtk_check_launch("moe_gather_kernel", dev);
}

/* dequantise: a thread per 32-column chunk of a row; 16-byte loads on vector matrices. Per Flash
 * expert matrix: 4.2 MB of fp4 + scales read, 16.8 MB of bf16 written. Row `row` of m, chunk c,
 * into row orow of out (m.cols wide). */
__device__ __forceinline__ void dequant_chunk(const dsrtk_moe_matrix &m, int64_t row, int c, void *out, int64_t orow,
                                              int out_dtype)
{
    float w[CHUNK];
    if (m.vector && m.dtype == DSRT_FP4E2M1) {
        uint4 v = __ldg((const uint4 *)((const uint8_t *)m.weight + (m.offset + row * m.stride0) / 2) + c);
        float s = m.scale ? scale_at(m, row, (int64_t)c * CHUNK) : 1.0f;
        uint32_t word[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < CHUNK; i++) w[i] = dsrt_fp4_to_f32((uint8_t)((word[i / 8] >> (4 * (i % 8))) & 15u)) * s;
    } else {
#pragma unroll
        for (int i = 0; i < CHUNK; i++) w[i] = weight_at(m, row, (int64_t)c * CHUNK + i);
    }
    int64_t col0 = (int64_t)c * CHUNK;
    bool full = col0 + CHUNK <= m.cols && m.cols % 8 == 0 && (uintptr_t)out % 16 == 0; /* whole 16-byte stores */
    if (out_dtype == DSRT_BF16) {
        uint16_t *o = (uint16_t *)out + orow * m.cols + col0;
        if (full) {
#pragma unroll
            for (int q = 0; q < 4; q++) {
                uint32_t p[4];
#pragma unroll
                for (int i = 0; i < 4; i++)
                    p[i] = dsrt_f32_to_bf16(w[8 * q + 2 * i]) | (uint32_t)dsrt_f32_to_bf16(w[8 * q + 2 * i + 1]) << 16;
                ((uint4 *)o)[q] = make_uint4(p[0], p[1], p[2], p[3]);
            }
        } else {
            for (int i = 0; i < CHUNK && col0 + i < m.cols; i++) o[i] = dsrt_f32_to_bf16(w[i]);
        }
    } else {
        float *o = (float *)out + orow * m.cols + col0;
        if (full) {
#pragma unroll
            for (int q = 0; q < 8; q++) ((float4 *)o)[q] = make_float4(w[4 * q], w[4 * q + 1], w[4 * q + 2], w[4 * q + 3]);
        } else {
            for (int i = 0; i < CHUNK && col0 + i < m.cols; i++) o[i] = w[i];
        }
    }
}

/* A slab of groups, one per blockIdx.y: group g0 + y's set's [w1; w3] (UP) or w2 (DOWN) into
 * out + y·stride elements, the rows of w3 after those of w1 */
__global__ void __launch_bounds__(DSRTK_BLOCK) moe_dequant_groups_kernel(const dsrtk_moe_matrix *table, const int32_t *groups,
                                                                         int g0, int mode, int64_t stride, void *out,
                                                                         int out_dtype)
{
    const int set = groups[3 * (g0 + (int)blockIdx.y)];
    const dsrtk_moe_matrix &first = table[3 * set + (mode == DSRTK_MOE_DOWN ? 1 : 0)], &second = table[3 * set + 2];
    const int64_t chunks = (first.cols + CHUNK - 1) / CHUNK, rows = first.rows + (mode == DSRTK_MOE_UP ? second.rows : 0);
    void *o = (char *)out + (size_t)blockIdx.y * (size_t)stride * (out_dtype == DSRT_BF16 ? 2 : 4);
    for (int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; u < rows * chunks; u += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = u / chunks;
        const int c = (int)(u - row * chunks);
        if (row < first.rows) dequant_chunk(first, row, c, o, row, out_dtype);
        else dequant_chunk(second, row - first.rows, c, o, row, out_dtype);
    }
}

int dsrtk_moe_dequant_groups(int dev, const dsrtk_moe_matrix *table, const int32_t *groups, int g0, int g1, int mode,
                             int64_t max_units, int64_t stride, void *out, int out_dtype, void *stream)
{
    DSRTK_SET_DEVICE(dev, "moe dequantise");
    if (g1 <= g0) return DSRTK_OK;
    if (!table || !groups || !out || g0 < 0 || g1 - g0 > 65535 || (mode != DSRTK_MOE_UP && mode != DSRTK_MOE_DOWN) ||
        (out_dtype != DSRT_F32 && out_dtype != DSRT_BF16) || max_units < 1)
        return dsrtk_fail(DSRTK_ERROR, "moe: dequantising groups %d..%d called with bad arguments", g0, g1 - 1);
    /* a multiprocessor's worth of blocks in all, shared by the groups */
    const int64_t per_group = ((int64_t)dsrtk_multiprocessors(dev) * 8 + (g1 - g0) - 1) / (g1 - g0);
    const int64_t wanted = (max_units + DSRTK_BLOCK - 1) / DSRTK_BLOCK;
    const dim3 grid((unsigned)(wanted < per_group ? wanted : per_group), (unsigned)(g1 - g0));
    moe_dequant_groups_kernel<<<grid, DSRTK_BLOCK, 0, (cudaStream_t)stream>>>(table, groups, g0, mode, stride, out, out_dtype);
    return dsrtk_check_launch("moe_dequant_groups_kernel", dev);
}

int dsrtk_moe_gemm_groups(int dev, int ab_dtype, int count, const int *m, const int *n, const int *k, const void *const *a, int lda,
                          const void *const *w, void *const *c, int c_dtype, int ldc, void **ptrs, void *stream)
{
    if (dev < 0 || dev >= BLAS_MAX_DEVICES) return dsrtk_fail(DSRTK_ERROR, "moe: no device cuda:%d", dev);
    if (count == 0) return DSRTK_OK;
    if (count < 0 || count > DSRTK_MOE_SLAB || !a || !w || !c || !ptrs ||
        (ab_dtype != DSRT_BF16 && ab_dtype != DSRT_F32) || (c_dtype != DSRT_BF16 && c_dtype != DSRT_F32) ||
        (ab_dtype == DSRT_F32 && c_dtype != DSRT_F32))
        return dsrtk_fail(DSRTK_ERROR, "moe: %d grouped GEMMs called with bad arguments", count);
    for (int i = 0; i < count; i++)
        if (m[i] < 1 || n[i] < 1 || k[i] < 1 || lda < k[i] || ldc < n[i])
            return dsrtk_fail(DSRTK_ERROR, "moe: grouped GEMM %d of %d x %d x %d called with bad arguments", i, m[i], n[i], k[i]);
    DSRTK_SET_DEVICE(dev, "moe GEMM");
    /* the pointer arrays go up first: cuBLAS reads them on the device. Staged from pageable host
     * memory, so the host arrays are free again when the call returns. */
    const void *host[3 * DSRTK_MOE_SLAB];
    for (int i = 0; i < count; i++) host[i] = w[i], host[count + i] = a[i], host[2 * count + i] = c[i];
    int st = dsrtk_memcpy(dev, ptrs, host, sizeof(void *) * 3 * (size_t)count, DSRTK_H2D, stream, 1);
    if (st) return st;
    std::lock_guard<std::mutex> lock(blas_lock(dev)); /* blas.cuh: the shared handle */
    cublasHandle_t h;
    if ((st = blas_handle(dev, stream, "moe", &h))) return st;
    /* column-major, per group: Cᵀ [n, m] = W [n, k] (Wᵀ stored [k, n]: op T) · Aᵀ [k, m] (op N) */
    cudaDataType_t ab = ab_dtype == DSRT_BF16 ? CUDA_R_16BF : CUDA_R_32F, ct = c_dtype == DSRT_BF16 ? CUDA_R_16BF : CUDA_R_32F;
    cublasOperation_t ta[DSRTK_MOE_SLAB], tb[DSRTK_MOE_SLAB];
    int lda_[DSRTK_MOE_SLAB], ldc_[DSRTK_MOE_SLAB], ones[DSRTK_MOE_SLAB];
    float alpha[DSRTK_MOE_SLAB], beta[DSRTK_MOE_SLAB];
    for (int i = 0; i < count; i++) {
        ta[i] = CUBLAS_OP_T, tb[i] = CUBLAS_OP_N, lda_[i] = lda, ldc_[i] = ldc, ones[i] = 1;
        alpha[i] = 1.0f, beta[i] = 0.0f;
    }
    void **dp = ptrs;
    /* W_i is contiguous [n_i, k_i]: its leading dimension is k_i */
    return blas_check(cublasGemmGroupedBatchedEx(h, ta, tb, n, m, k, alpha, (const void *const *)dp, ab, k,
                                                 (const void *const *)(dp + count), ab, lda_, beta, dp + 2 * count, ct, ldc_,
                                                 count, ones, CUBLAS_COMPUTE_32F),
                      "moe", "cublasGemmGroupedBatchedEx", dev);
}

/* ---- prefill straight from the packed weights (reference precision, every matrix `mma`) ----
 *
 * moe_prefill_gemm_kernel: a block computes 128 of a set's outputs (weight rows) for one tile of a
 * group's rows (up to 128 tokens), out = in · Wᵀ, W the set's [w1; w3] (UP) or w2 (DOWN) read as
 * packed FP4 / FP8 bytes. The weights are wgmma's A operand, from registers: each warp turns its
 * own rows' bytes into bf16 fragments, so a converted weight never goes through shared memory;
 * the tokens are the B operand (N = the tile's rows rounded up to 32: a Flash expert gets ~96 of
 * 4096 tokens, which 128-row token tiles padded by a third). The K loop runs 64 columns a step
 * through a 4-stage cp.async ring (the tokens' bf16 rows and the weights' raw bytes, issued two
 * steps ahead), in halves of 32 columns: a warpgroup converts a half's fragments while the tensor
 * cores still run the previous half's two m64nNk16, issues its own, and waits for the previous
 * half's alone. The halves' fragments alternate between two register sets, each pinned after the
 * wait that retires its wgmmas (mma.cuh: the compiler would otherwise reuse them under the running
 * wgmmas). The block's e8m0 scales are gathered once into a shared table (pg_load_scales).
 *
 * What shaped it (ncu, H200, Flash layer at T = 4096, real clocks):
 *   - mma.sync first (8 warps of 64 x 32 with ldmatrix): UP 6.7 ms, DOWN 3.4 ms, the tensor pipe
 *     38% busy; the warps fed the tensor cores and converted in turn.
 *   - both operands from shared memory (tokens as A in 128-row tiles, the converted weights
 *     written to a shared tile as B, two blocks a multiprocessor): UP 2.5 ms, DOWN 1.3 ms, bound
 *     by shared memory (L1 84% busy): every weight was stored as bf16 and read back by both
 *     warpgroups, and a third of the token rows were padding.
 *   - the weights from registers, the tokens at their tile's width: the conversion costs the same
 *     (each weight converted once a tile, 6 instructions a bf16 pair), and it is the kernel's bound
 *     now: with four warps a scheduler the issue slots are ~55% busy and every instruction that
 *     is not the conversion's counts. First form 1.43 G warp instructions for UP (the old one's
 *     1.21 G) and the layer's MoE 5.39 ms against 4.78; the scales a step from global memory
 *     (four loads, a decode with branches) -> a shared table and one multiplier by the bits, the
 *     copies' shared addresses found once, the table copied by cp.async (gathered byte by byte it
 *     drew 8% of the stall samples): 0.95 G, the MoE layer 4.09-4.19 ms against 4.70-4.83.
 *   - a warpgroup-uniform branch around the wgmmas reads to ptxas as divergent and it serialises
 *     them ("C7520"; tools/check_ptxas.sh fails the build on it): the format and the token width
 *     are template arguments, chosen once a block.
 *   - A byte LUT for FP4 added ~3.5 wavefronts of bank conflicts per lookup, so FP4 codes convert
 *     in integer ops (pg_fp4_pair); FP8 (the shared expert where it does not take the FP8
 *     linear) converts through the hardware's e4m3x2 -> f16x2, which keeps e4m3's NaN codes NaN.
 *
 * Numerics: the slab path's. Inputs are Q8 round-tripped rows (exact in bf16; UP's are the
 * tokens', read through in_rows); a weight is code x 2^e, exact in bf16; products are exact in the
 * fp32 accumulators; the output is the bf16 rounding of the fp32 sum (a reordering of the CPU's, as
 * cuBLAS's is).
 *
 * Why not the slabs: they wrote every selected expert's weights out as bf16 (50 MB for a Flash
 * expert's [w1; w3]) and read them back, ~26 GB a layer at 4096 tokens; here the weights are read
 * once per tile of a group and the bytes that move are the packed ones. FLOPs (Flash, T = 4096):
 * 1.2 TFLOP a layer.
 */
enum { PG_M = 128, PG_TOKENS = DSRTK_MOE_TILE_ROWS, PG_TOKEN_STEP = 32, PG_K = 64, PG_STAGES = 4 };
enum { PG_THREADS = 256, PG_BLOCKS_PER_SM = 2, PG_RAW_ROW = 64 /* a row's bytes of a step, fp8 (fp4: 32) */ };
enum { PG_ALIGN = 1024, PG_OUT_LD = PG_M + 8 /* the output tile's row, padded off the banks */ };

struct PgShared {                                /* at a 1024-byte boundary (pg_shared), and so is each tile */
    uint16_t x[PG_STAGES][PG_TOKENS * PG_K];    /* the tile's input rows (wgmma's B), bf16, swizzled 16-byte chunks */
    uint8_t raw[PG_STAGES][PG_M * PG_RAW_ROW];  /* the block's weight rows' bytes of a step (pg_raw_at) */
};
static_assert(sizeof(uint16_t) * PG_TOKENS * PG_OUT_LD <= sizeof(((PgShared *)0)->x), "the output tile reuses x");

/* element offset of 16-byte chunk c of row r in a 64-column bf16 tile */
__device__ __forceinline__ int pg_swizzle(int r, int c) { return r * PG_K + ((c ^ (r & 7)) << 3); }

/* byte offset of 16-byte chunk c of weight row r in a raw stage: rows of 32 (fp4) or 64 (fp8)
 * bytes, chunks XOR-ed so the 8 rows a warp's load reads fall on distinct banks */
template <bool FP8> __device__ __forceinline__ int pg_raw_at(int r, int c)
{
    return FP8 ? r * 64 + 16 * (c ^ ((r >> 1) & 3)) : r * 32 + 16 * (c ^ ((r >> 2) & 1));
}

__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b)
{
    __nv_bfloat162 r = __hmul2(*(const __nv_bfloat162 *)&a, *(const __nv_bfloat162 *)&b);
    return *(const uint32_t *)&r;
}

/* bf16 pair of 2^p, -133 <= p <= 127 (exact: below -126 the subnormals) */
__device__ __forceinline__ uint32_t pow2_bf16x2(int p)
{
    const uint32_t h = p >= -126 ? (uint32_t)(p + 127) << 7 : 0x40u >> (-127 - p);
    return h * 0x10001u;
}

/* A chunk's e8m0 scale as the bf16 multipliers its converted codes take. FP4 codes convert as
 * code · 2^-126 and take 2^(e - 127 + 126), one bf16 while e <= 128, else two: 2^126, then
 * 2^(e - 127). FP8 codes convert as code and take 2^(e - 127), always one. e = 255 is NaN. */
struct PgScale {
    uint32_t first, second; /* second == 0: one multiply */
};

__device__ __forceinline__ PgScale pg_scale_of(uint32_t e, bool fp8)
{
    PgScale s;
    const int p = (int)e - 127 + (fp8 ? 0 : 126);
    s.second = 0;
    if (e == 255) s.first = 0x7fc07fc0u;
    else if (p <= 127) s.first = pow2_bf16x2(p);
    else s.first = pow2_bf16x2(126), s.second = pow2_bf16x2(p - 126);
    return s;
}

/* FP4 byte i of w (low nibble = the earlier column) as a bf16 pair of code · 2^-126: a code
 * s e1 e0 m becomes the bf16 bits s 0000000 e1 e0 m 000000, which read 2^(e - 127)(1 + m/2) =
 * e2m1 · 2^-126 for e > 0, and the subnormal m · 2^-127 = e2m1 · 2^-126 for e = 0. Five integer
 * ops a pair, no shared memory. */
__device__ __forceinline__ uint32_t pg_fp4_pair(uint32_t w, uint32_t i)
{
    const uint32_t t = __byte_perm(w, 0, 0x4440u | i);
    return ((t * 0x01001000u) & 0x80008000u) | ((t * 0x00040040u) & 0x01c001c0u);
}

/* FP8 half i of w (the low byte = the earlier column) as a bf16 pair, exactly (NaN stays NaN) */
__device__ __forceinline__ uint32_t pg_fp8_pair(uint32_t w, uint32_t i)
{
    uint32_t h;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"((unsigned short)(w >> (16 * i))));
    const float2 f = __half22float2(*(const __half2 *)&h);
    const __nv_bfloat162 b = __floats2bfloat162_rn(f.x, f.y);
    return *(const uint32_t *)&b;
}

/* A weight row of the block: its bytes and its scale row */
struct PgRow {
    const uint8_t *w, *scale; /* the row's first byte; its scale row's first byte */
    int64_t scale_stride1;    /* bytes between the scales of successive scale blocks along K */
    int shift;                /* log2(block_cols / 32): 32-column chunk -> scale block */
};

__device__ __forceinline__ PgRow pg_row(const dsrtk_moe_matrix &m, int64_t row)
{
    PgRow r;
    const bool fp8 = m.dtype == DSRT_F8E4M3;
    r.w = (const uint8_t *)m.weight + (fp8 ? m.offset + row * m.stride0 : (m.offset + row * m.stride0) / 2);
    r.scale = (const uint8_t *)m.scale + m.scale_offset + row / m.block_rows * m.scale_stride0;
    r.scale_stride1 = m.scale_stride1;
    r.shift = 31 - __clz(m.block_cols / 32);
    return r;
}

/* the e8m0 byte of 32-column chunk `chunk` of a row */
__device__ __forceinline__ uint32_t pg_scale_byte(const PgRow &r, int chunk)
{
    return __ldg(r.scale + (int64_t)(chunk >> r.shift) * r.scale_stride1);
}

/* What a thread of the block does besides the wgmmas, found once: the weight bytes and input rows
 * it copies each step, and where its rows' scale bytes lie. Input copies: rows t / 8 + 32i of the
 * tile, 16-byte chunk t mod 8 of each step's 64 columns (the input row through in_rows: UP reads
 * the Q8'd tokens in place, no gathered copy), so a copy's address is one add. */
enum { PG_COPY_ROWS = PG_THREADS / 8, PG_COPIES = PG_TOKENS / PG_COPY_ROWS };
struct PgTile {
    const uint8_t *w;       /* the weight bytes this thread copies: of row t / 2 of the block's */
    const uint8_t *scales;  /* the block's scale table (pg_load_scales), row r0 of it */
    int scale_ld;           /* bytes between its rows */
    const uint16_t *in;
    uint32_t at[PG_COPIES]; /* elements from `in` to input copy i's chunk at step 0 */
    uint32_t x0, raw0;      /* shared addresses of its first input chunk and weight chunk in stage 0 */
    int rows, nk;           /* the tile's rows; steps along K */
};

/* The scale table's row: K / 32 bytes rounded up to 128, 16-byte chunk C of row r stored at
 * C ^ (r mod 8), so the 8 rows of a warp's load fall on distinct banks. Flash (K <= 4096: 16 KB)
 * leaves two blocks a multiprocessor their shared memory. */
__host__ __device__ inline int pg_scale_ld(int64_t k) { return (int)((k / 32 + 127) / 128 * 128); }
__device__ __forceinline__ int pg_scale_at(int r, int c) { return (((c >> 4) ^ (r & 7)) << 4) | (c & 15); }

/* a step's cp.async: the thread's weight chunks (16 bytes of fp4, 32 of fp8) and its 16-byte
 * chunks of input rows, 8 lanes a row (a warp's copy reads 4 whole 128-byte lines). Rows past the
 * tile's are not copied: whatever their shared memory holds only reaches output columns never
 * stored (an output reads its own input row alone). */
template <int NT, bool FP8> __device__ __forceinline__ void pg_issue(int stage, int kt, const PgTile &c)
{
    const int t = threadIdx.x;
    const uint32_t raw = c.raw0 + stage * (uint32_t)sizeof(PgShared::raw[0]);
    if (FP8) {
        const uint8_t *p = c.w + (int64_t)kt * PG_K;
        cp_async16_at(raw, p), cp_async16_at(raw ^ 16, p + 16); /* pg_raw_at: chunks 2i, 2i + 1 */
    } else {
        cp_async16_at(raw, c.w + (int64_t)kt * (PG_K / 2));
    }
    const uint32_t x = c.x0 + stage * (uint32_t)sizeof(PgShared::x[0]);
#pragma unroll
    for (int i = 0; i < NT / PG_COPY_ROWS; i++) /* 32 rows further: 32 rows of 128 bytes, the same swizzle */
        if ((t >> 3) + i * PG_COPY_ROWS < c.rows) cp_async16_at(x + i * 4096, c.in + (c.at[i] + (uint32_t)(kt * PG_K)));
    cp_async_commit();
}

/* The block's scale table: byte [r][c] of `table` (rows `ld` bytes apart) is the e8m0 scale of
 * 32-column chunk c of the block's weight row r, gathered once, so a step reads its four bytes from
 * shared memory in two loads (per step from global memory they were four dependent loads and their
 * index arithmetic, a fifth of the loop's instructions). Rows whose scales lie contiguous and
 * aligned (FP4's 1 x 32 blocks) are copied by cp.async in 16-byte chunks, in the caller's next
 * commit group; others (FP8's 128 x 128 blocks) byte by byte. Thread t takes row t / 2, every other
 * chunk. */
template <typename RowOf>
__device__ __forceinline__ void pg_load_scales(uint8_t *table, int ld, int chunks, const RowOf &row_of)
{
    const int r = threadIdx.x >> 1, odd = threadIdx.x & 1;
    const PgRow row = row_of(r);
    uint8_t *dst = table + r * ld;
    if (row.shift == 0 && row.scale_stride1 == 1 && (uintptr_t)row.scale % 16 == 0 && chunks % 16 == 0) {
        for (int c = 16 * odd; c < chunks; c += 32) cp_async16(dst + pg_scale_at(r, c), row.scale + c);
    } else {
        for (int c = odd; c < chunks; c += 2) dst[pg_scale_at(r, c)] = (uint8_t)pg_scale_byte(row, c);
    }
}

/* Half a step's A fragments (columns 32·half .. 32·half + 31 of the step's 64) from a raw stage:
 * f[i] = k16 round 2·half + i in mma_bf16's A layout (f[i][0] row g, columns 16i + 2q, 16i + 2q + 1
 * of the half; f[i][1] row g + 8; f[i][2], f[i][3] the same rows 8 columns on). FP4: those columns
 * are byte 8i + q of the half's 16 (lane q takes byte q of each word); FP8: half q mod 2 of word
 * 4i + q / 2 of the half's 32 bytes. sc[h]: row h's multipliers (TWO_MULTIPLIES: both). */
template <bool FP8, bool TWO_MULTIPLIES>
__device__ __forceinline__ void pg_convert(const PgShared &s, int stage, int half, int r0, uint32_t q, const PgScale (&sc)[2],
                                           uint32_t (&f)[2][4])
{
#pragma unroll
    for (int h = 0; h < 2; h++) { /* row r0 + 8h: f[.][h] and f[.][2 + h] */
        const int r = r0 + 8 * h;
#pragma unroll
        for (int i = 0; i < 2; i++) {
            uint32_t lo, hi;
            if (FP8) {
                const uint4 v = *(const uint4 *)&s.raw[stage][pg_raw_at<true>(r, 2 * half + i)];
                lo = pg_fp8_pair(q & 2 ? v.y : v.x, q & 1), hi = pg_fp8_pair(q & 2 ? v.w : v.z, q & 1);
            } else {
                const uint4 v = *(const uint4 *)&s.raw[stage][pg_raw_at<false>(r, half)];
                lo = pg_fp4_pair(i ? v.z : v.x, q), hi = pg_fp4_pair(i ? v.w : v.y, q);
            }
            lo = bf16x2_mul(lo, sc[h].first), hi = bf16x2_mul(hi, sc[h].first);
            if (TWO_MULTIPLIES) lo = bf16x2_mul(lo, sc[h].second), hi = bf16x2_mul(hi, sc[h].second);
            f[i][h] = lo, f[i][2 + h] = hi;
        }
    }
}

template <int NT> __device__ __forceinline__ void pg_wgmma(float (&d)[NT / 2], const uint32_t (&a)[4], uint64_t b)
{
    if constexpr (NT == 32) wgmma_m64n32k16_bf16_rs(d, a, b);
    else if constexpr (NT == 64) wgmma_m64n64k16_bf16_rs(d, a, b);
    else if constexpr (NT == 96) wgmma_m64n96k16_bf16_rs(d, a, b);
    else wgmma_m64n128k16_bf16_rs(d, a, b);
}

/* Half a K step of a warpgroup: `cur` converted while the previous half's wgmmas run, its two
 * wgmmas issued, then the wait that retires the previous half's, whose fragments (`prev`) are
 * pinned after it. bytes: the half's scale bytes, row r0's in the low byte, row r0 + 8's above;
 * fast: every lane's scales of the step are FP4's below 2^1 (e < 128), one multiply each, its
 * bf16 pair 2^(e - 1) by the bits (pg_scale_of's general path takes the rest). */
template <int NT, bool FP8>
__device__ __forceinline__ void pg_half(const PgShared &s, int stage, int half, uint32_t bytes, bool fast,
                                        float (&acc)[NT / 2], uint32_t (&cur)[2][4], uint32_t (&prev)[2][4])
{
    const int lane = threadIdx.x & 31, r0 = 64 * (threadIdx.x >> 7) + 16 * ((threadIdx.x >> 5) & 3) + (lane >> 2);
    PgScale sc[2];
    if (!FP8 && fast) {
        sc[0].first = ((bytes & 255) + 126) * 0x00800080u, sc[1].first = ((bytes >> 8) + 126) * 0x00800080u;
        pg_convert<false, false>(s, stage, half, r0, lane & 3, sc, cur);
    } else {
        sc[0] = pg_scale_of(bytes & 255, FP8), sc[1] = pg_scale_of(bytes >> 8, FP8);
        if (!sc[0].second) sc[0].second = 0x3f803f80u; /* 1.0, where the other row takes two */
        if (!sc[1].second) sc[1].second = 0x3f803f80u;
        pg_convert<FP8, !FP8>(s, stage, half, r0, lane & 3, sc, cur);
    }
    const uint64_t b = wgmma_desc_advance(wgmma_desc_sw128(s.x[stage]), 64 * half);
    wgmma_pin_regs(cur[0]); /* converted before the fence, not sunk between the wgmmas */
    wgmma_pin_regs(cur[1]);
    wgmma_fence();
    pg_wgmma<NT>(acc, cur[0], b);
    pg_wgmma<NT>(acc, cur[1], wgmma_desc_advance(b, 32));
    wgmma_commit();
    wgmma_wait_one();
    wgmma_pin_regs(prev[0]);
    wgmma_pin_regs(prev[1]);
}

/* One K step of the block: step kt's copies landed, step kt + 2's issued, then its two halves */
template <int NT, bool FP8>
__device__ __forceinline__ void pg_step(PgShared &s, const PgTile &c, int kt, float (&acc)[NT / 2], uint32_t (&fa)[2][4],
                                        uint32_t (&fb)[2][4])
{
    cp_async_wait<1>();   /* this thread's copies of step kt (step kt + 1's may still fly) */
    fence_async_shared(); /* its input rows, for the wgmmas' reads */
    __syncthreads();      /* step kt landed everywhere; every warpgroup retired step kt - 1's first half */
    const int stage = kt % PG_STAGES;
    if (kt + 2 < c.nk) pg_issue<NT, FP8>((kt + 2) % PG_STAGES, kt + 2, c);
    else cp_async_commit();
    /* rows r0 and r0 + 8, chunks 2kt and 2kt + 1: {r0 2kt, r0 + 8 2kt} | {r0 2kt + 1, r0 + 8 2kt + 1} << 16 */
    const int at = pg_scale_at(threadIdx.x >> 2, 2 * kt); /* rows r0 and r0 + 8: r0 mod 8 = lane / 4 */
    const uint32_t a = *(const uint16_t *)&c.scales[at], b = *(const uint16_t *)&c.scales[8 * c.scale_ld + at];
    const uint32_t bytes = __byte_perm(a, b, 0x5140);
    const bool fast = !__any_sync(~0u, bytes & 0x80808080u);
    pg_half<NT, FP8>(s, stage, 0, bytes & 0xffff, fast, acc, fa, fb);
    pg_half<NT, FP8>(s, stage, 1, bytes >> 16, fast, acc, fb, fa);
}

/* The block's tile at token width NT, format FP8 (else FP4): the K loop, then the bf16 outputs
 * through shared memory (acc[4j + 2h + i] is weight row 16(warp mod 4) + g + 8h of the
 * warpgroup's 64, token 8j + 2q + i), stored a token row at a time. */
template <int NT, bool FP8>
__device__ __forceinline__ void pg_tile(PgShared &s, const PgTile &c, uint16_t *out, int64_t out_ld, int n0, int n_out)
{
    float acc[NT / 2];
#pragma unroll
    for (int i = 0; i < NT / 2; i++) acc[i] = 0.0f;
    wgmma_pin_acc(acc);
    uint32_t fa[2][4] = {}, fb[2][4] = {}; /* the halves' fragments: first halves in fa, second in fb */
    for (int kt = 0; kt < c.nk; kt++) pg_step<NT, FP8>(s, c, kt, acc, fa, fb);
    wgmma_wait_all();
    wgmma_pin_acc(acc);
    cp_async_wait<0>();
    __syncthreads(); /* every warpgroup is done with x: it holds the output tile now */

    uint16_t *o = s.x[0];
    const int t = threadIdx.x, lane = t & 31, gq = lane >> 2, q = lane & 3;
    const int r0 = 64 * (t >> 7) + 16 * ((t >> 5) & 3) + gq;
#pragma unroll
    for (int j = 0; j < NT / 8; j++)
#pragma unroll
        for (int h = 0; h < 2; h++)
#pragma unroll
            for (int i = 0; i < 2; i++) o[(8 * j + 2 * q + i) * PG_OUT_LD + r0 + 8 * h] = dsrt_f32_to_bf16(acc[4 * j + 2 * h + i]);
    __syncthreads();
    const bool whole = out_ld % 8 == 0 && (uintptr_t)out % 16 == 0;
    for (int e = t; e < c.rows * (PG_M / 8); e += PG_THREADS) {
        const int row = e / (PG_M / 8), col = 8 * (e % (PG_M / 8));
        uint16_t *dst = out + row * out_ld + n0 + col;
        const uint16_t *src = &o[row * PG_OUT_LD + col];
        if (whole && n0 + col + 8 <= n_out) *(uint4 *)dst = *(const uint4 *)src;
        else
            for (int i = 0; i < 8 && n0 + col + i < n_out; i++) dst[i] = src[i];
    }
}

/* the block's PgShared: the dynamic window rounded up to the 1024 bytes wgmma's swizzle needs
 * (moved along from the window's own pointer, so the compiler still knows it is shared memory);
 * the scale table follows it */
__device__ __forceinline__ PgShared &pg_shared(unsigned char *window)
{
    const uint32_t at = (uint32_t)__cvta_generic_to_shared(window);
    return *(PgShared *)(window + ((PG_ALIGN - at % PG_ALIGN) % PG_ALIGN));
}

/* tiles: n_tiles triples {group, first row of the tile within the group, its rows}; block b
 * computes outputs 128·(b mod n_col_tiles) .. of tile b / n_col_tiles */
__global__ void __launch_bounds__(PG_THREADS, PG_BLOCKS_PER_SM)
    moe_prefill_gemm_kernel(const dsrtk_moe_matrix *table, const int32_t *groups, const int32_t *tiles, int n_col_tiles,
                            int mode, const uint16_t *in, int64_t in_ld, const int32_t *in_rows, uint16_t *out,
                            int64_t out_ld)
{
    extern __shared__ unsigned char pg_smem[];
    PgShared &s = pg_shared(pg_smem);
    const int tile = blockIdx.x / n_col_tiles, n0 = (int)(blockIdx.x % n_col_tiles) * PG_M;
    const int g = tiles[3 * tile], m0 = tiles[3 * tile + 1], rows = tiles[3 * tile + 2];
    const int set = groups[3 * g];
    const int64_t row0 = groups[3 * g + 1] + (int64_t)m0;
    const dsrtk_moe_matrix &first = table[3 * set + (mode == DSRTK_MOE_DOWN ? 1 : 0)], &second = table[3 * set + 2];
    const int n_out = first.rows + (mode == DSRTK_MOE_UP ? second.rows : 0);
    if (n0 >= n_out) return; /* a narrower set than the launch's widest */
    const int t = threadIdx.x, lane = t & 31;

    /* weight rows past the matrix read its last (never stored) */
    auto row_of = [&](int r) {
        const int n = n0 + r < n_out ? n0 + r : n_out - 1;
        return n < first.rows ? pg_row(first, n) : pg_row(second, n - first.rows);
    };
    const bool fp8 = first.dtype == DSRT_F8E4M3;
    PgTile c;
    c.in = in, c.rows = rows, c.nk = first.cols / PG_K;
    c.w = row_of(t >> 1).w + (fp8 ? 32 : 16) * (t & 1); /* its half of the row's step */
#pragma unroll
    for (int i = 0; i < PG_COPIES; i++) {
        const int r = (t >> 3) + i * PG_COPY_ROWS;
        const int64_t row = row0 + (r < rows ? r : 0);
        c.at[i] = (uint32_t)((in_rows ? in_rows[row] : row) * in_ld + 8 * (t & 7));
    }
    c.x0 = (uint32_t)__cvta_generic_to_shared(&s.x[0][pg_swizzle(t >> 3, t & 7)]);
    c.raw0 = (uint32_t)__cvta_generic_to_shared(&s.raw[0][fp8 ? pg_raw_at<true>(t >> 1, 2 * (t & 1)) : pg_raw_at<false>(t >> 1, t & 1)]);
    uint8_t *scales = (uint8_t *)(&s + 1);
    const int r0 = 64 * (t >> 7) + 16 * ((t >> 5) & 3) + (lane >> 2);
    c.scale_ld = pg_scale_ld(in_ld);
    c.scales = scales + r0 * c.scale_ld;
    pg_load_scales(scales, c.scale_ld, 2 * c.nk, row_of); /* its copies land with step 0's */
    for (int kt = 0; kt < 2; kt++) {
        if (kt >= c.nk) cp_async_commit();
        else if (fp8) pg_issue<PG_TOKENS, true>(kt, kt, c);
        else pg_issue<PG_TOKENS, false>(kt, kt, c);
    }
    uint16_t *o = out + row0 * out_ld;
    switch ((rows + PG_TOKEN_STEP - 1) / PG_TOKEN_STEP) { /* block-uniform: the wgmmas' width and format */
    case 1: fp8 ? pg_tile<32, true>(s, c, o, out_ld, n0, n_out) : pg_tile<32, false>(s, c, o, out_ld, n0, n_out); break;
    case 2: fp8 ? pg_tile<64, true>(s, c, o, out_ld, n0, n_out) : pg_tile<64, false>(s, c, o, out_ld, n0, n_out); break;
    case 3: fp8 ? pg_tile<96, true>(s, c, o, out_ld, n0, n_out) : pg_tile<96, false>(s, c, o, out_ld, n0, n_out); break;
    default: fp8 ? pg_tile<128, true>(s, c, o, out_ld, n0, n_out) : pg_tile<128, false>(s, c, o, out_ld, n0, n_out); break;
    }
}

int dsrtk_moe_prefill_gemm(int dev, const dsrtk_moe_matrix *table, const int32_t *groups, const int32_t *tiles,
                           int64_t n_tiles, int mode, int64_t max_out, const void *in, int64_t in_ld, const int32_t *in_rows,
                           int64_t in_count, void *out, int64_t out_ld, void *stream)
{
    DSRTK_SET_DEVICE(dev, "moe prefill GEMM");
    if (n_tiles == 0) return DSRTK_OK;
    const int64_t col_tiles = (max_out + PG_M - 1) / PG_M;
    if (!table || !groups || !tiles || !in || !out || n_tiles < 0 || max_out < 1 || in_ld % 8 || (uintptr_t)in % 16 ||
        (uintptr_t)out % 2 || (mode != DSRTK_MOE_UP && mode != DSRTK_MOE_DOWN) || n_tiles * col_tiles > INT32_MAX ||
        in_count < 1 || in_count * in_ld > (int64_t)UINT32_MAX)
        return dsrtk_fail(DSRTK_ERROR, "moe: prefill GEMM of %lld tiles called with bad arguments", (long long)n_tiles);
    const size_t smem = sizeof(PgShared) + (size_t)PG_M * pg_scale_ld(in_ld) + PG_ALIGN;
    int st = dsrtk_allow_shared(dev, (const void *)moe_prefill_gemm_kernel, smem, "moe_prefill_gemm_kernel");
    if (st) return st;
    moe_prefill_gemm_kernel<<<(unsigned)(n_tiles * col_tiles), PG_THREADS, smem, (cudaStream_t)stream>>>(
        table, groups, tiles, (int)col_tiles, mode, (const uint16_t *)in, in_ld, in_rows, (uint16_t *)out, out_ld);
    return dsrtk_check_launch("moe_prefill_gemm_kernel", dev);
}

/* silu_f32(g) for every bf16 g, by its bits. Reference precision's SwiGLU takes g rounded to bf16,
 * so its silu is a lookup: no double-precision exp and no division at run time. Filled once per
 * device by silu_table_kernel with the very silu_f32, so the bits are the same. (The prefill's
 * SwiGLU ran ~107 instructions an element, 375 us a Flash layer at 4096 tokens, H200.) */
__device__ float silu_table[1 << 16];

__global__ void silu_table_kernel()
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    silu_table[i] = silu_f32(dsrt_bf16_to_f32((uint16_t)i));
}

enum { SILU_MAX_DEVICES = 64 };

/* the table of `dev`, filled before the first SwiGLU on it (and synchronised once, so that any
 * stream's later work sees it) */
static int ensure_silu_table(int dev, cudaStream_t stream)
{
    static std::mutex lock;
    static bool ready[SILU_MAX_DEVICES];
    if (dev < 0 || dev >= SILU_MAX_DEVICES) return dsrtk_fail(DSRTK_ERROR, "moe SwiGLU: no device cuda:%d", dev);
    std::lock_guard<std::mutex> guard(lock);
    if (ready[dev]) return DSRTK_OK;
    silu_table_kernel<<<(1 << 16) / 256, 256, 0, stream>>>();
    int st = dsrtk_check_launch("silu_table_kernel", dev);
    if (!st) st = dsrtk_check(cudaStreamSynchronize(stream), "moe SwiGLU: the silu table on cuda:%d", dev);
    ready[dev] = st == DSRTK_OK;
    return st;
}

/* swiglu_f32 of g and u that are bf16 values: the same operations, silu_f32(g) from the table
 * (g's bits are its f32 bits' upper half; a g clamped to the limit, no bf16 value in general,
 * computes it) */
__device__ __forceinline__ float swiglu_of_bf16(float g, float u, float limit)
{
    if (limit > 0) {
        u = u > limit ? limit : u < -limit ? -limit : u;
        if (g > limit) return silu_f32(limit) * u;
    }
    return silu_table[__float_as_uint(g) >> 16] * u;
}

/* SwiGLU between the prefill GEMMs: a warp per row (its group found once), ACT_U blocks of 128
 * columns (g and u: 2·ACT_U loads) in flight at once, 4 columns a lane */
__global__ void __launch_bounds__(DSRTK_BLOCK) moe_swiglu_kernel(const void *gu, int64_t gu_ld, int64_t rows,
                                                                 const dsrtk_moe_matrix *table, const int32_t *groups,
                                                                 const int32_t *n_groups, const float *row_weight,
                                                                 int64_t n_weighted, float limit, int reference, void *h,
                                                                 int64_t h_ld, int io_dtype, const void *shared_gu, bool vec)
{
    enum { U = ACT_U };
    const int lane = threadIdx.x % 32;
    const int64_t warps = (int64_t)gridDim.x * (blockDim.x / 32);
    for (int64_t r = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32; r < rows; r += warps) { /* warp-uniform */
        int lo = 0, hi = *n_groups - 1; /* the row's group (ascending first rows) */
        while (lo < hi) {
            int mid = (lo + hi + 1) / 2;
            if (groups[3 * mid + 1] <= r) lo = mid;
            else hi = mid - 1;
        }
        const int64_t inter = table[3 * groups[3 * lo]].rows;
        const bool vec_row = vec && inter % 4 == 0; /* u's columns start 4-aligned too */
        const float weight = r < n_weighted ? row_weight[r] : 1.0f;
        const bool own = shared_gu && r >= n_weighted; /* g and u in shared_gu's rows */
        const void *src = own ? shared_gu : gu;
        const int64_t g_at = own ? (r - n_weighted) * inter : r * gu_ld, u_at = own ? (rows - n_weighted) * inter + g_at : g_at + inter;
        for (int64_t c0 = 0; c0 < inter; c0 += U * ACT_BLOCK) {
            const int64_t row[2] = {g_at, u_at};
            float gu_v[2][U][4];
            bool valid[U][4];
            ld4_blocks<2, U>(src, io_dtype, row, c0, inter, vec_row, gu_v, valid);
#pragma unroll
            for (int k = 0; k < U; k++) {
                float v[4];
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    float gi = gu_v[0][k][i], ui = gu_v[1][k][i];
                    if (reference && io_dtype != DSRT_BF16) /* w1, w3 return bf16 (bf16 rows are) */
                        gi = round_bf16(gi), ui = round_bf16(ui);
                    float x = reference ? swiglu_of_bf16(gi, ui, limit) : swiglu_f32(gi, ui, limit);
                    if (r < n_weighted) x *= weight; /* before w2, in fp32 (SPEC §7.2) */
                    /* round_bf16_hw: a NaN's payload may differ, which Q8 turns into e4m3's one NaN
                     * code either way */
                    v[i] = !valid[k][i] ? 0.0f : reference ? round_bf16_hw(x) : x;
                }
                if (reference) q8_warp(v, valid[k]); /* every w2 quantised (moe.c checks) */
                st4_row(h, io_dtype, r * h_ld, c0 + k * ACT_BLOCK + 4 * lane, inter, vec_row, v);
            }
        }
    }
}

int dsrtk_moe_swiglu(int dev, const void *gu, int64_t gu_ld, int64_t rows, const dsrtk_moe_matrix *table,
                     const int32_t *groups, const int32_t *n_groups, const float *row_weight, int64_t n_weighted,
                     float limit, int reference, void *h, int64_t h_ld, int io_dtype, const void *shared_gu, void *stream)
{
    DSRTK_SET_DEVICE(dev, "moe SwiGLU");
    if (rows == 0) return DSRTK_OK;
    if (!gu || !table || !groups || !n_groups || !h || h_ld < 1 || gu_ld < 2 * h_ld ||
        (io_dtype != DSRT_F32 && io_dtype != DSRT_BF16) || (n_weighted && !row_weight))
        return dsrtk_fail(DSRTK_ERROR, "moe: SwiGLU of %lld rows called with bad arguments", (long long)rows);
    if (reference) {
        int st = ensure_silu_table(dev, (cudaStream_t)stream);
        if (st) return st;
    }
    int grid = dsrtk_grid_for(dev, rows * 32, DSRTK_BLOCK);
    moe_swiglu_kernel<<<grid, DSRTK_BLOCK, 0, (cudaStream_t)stream>>>(gu, gu_ld, rows, table, groups, n_groups, row_weight,
                                                                      n_weighted, limit, reference, h, h_ld, io_dtype, shared_gu,
                                                                      act_vec(gu, gu_ld) && act_vec(h, h_ld) &&
                                                                          (!shared_gu || act_vec(shared_gu, 4)));
    return dsrtk_check_launch("moe_swiglu_kernel", dev);
}
