/*
 * linear.cu - DeepSeek-V4's linear layers (runtime/linear.h) on CUDA, weights read in their
 * checkpoint formats: bf16, FP8 e4m3 with block scales, FP4 e2m1 (two per byte, low nibble first)
 * with 1x32 e8m0 scales.
 *
 * What this file protects: the numerics of runtime/linear.c's CPU forward (dsrt_linear_rows), which
 * is the readable reference for every kernel here, without ever holding a dequantised copy of an
 * FP8/FP4 weight in device memory. The CPU computes y = bf16?( Σ_k a[k] · (W[n,k]·S) ) where a is x,
 * Q8 round-tripped in blocks of 128 (quant.h) when the layer quantises; here:
 *
 *   - prep_kernel writes a: x converted to f32 and, when asked, Q8 round-tripped with quant.h's own
 *     functions (the same amax, power-of-two scale, e4m3 rounding as dsrt_q8_block), so a is the
 *     CPU's bit for bit. For cuBLASLt it writes the (codes, scales) pair instead, which is the same
 *     value (q·s is exact).
 *   - gemv_kernel (1..15 rows, the decode step): memory-bound. Every weight byte is read once with
 *     16-byte streaming loads (L1 no-allocate, so the activation stays in L1), dequantised in
 *     registers; a 16-byte vector never straddles a scale block (checked on the host), so a partial
 *     dot product over the vector is multiplied by its block's scale once. Scales are powers of two
 *     (e8m0; f32 scales are used as they are) so p·S equals Σ a·(W·S) up to the order of fp32
 *     additions. Each lane owns whole vectors; the activation is stored permuted by prep_kernel so
 *     the lanes' float4 loads of it are coalesced (see gemv_pos). Warps of a block split K when there
 *     are few vectors per row, and their sums meet in shared memory in a fixed order.
 *     Per weight element: 1 byte (fp8) / 0.5 (fp4) / 2 (bf16) from HBM, 2·rows FLOPs.
 *   - prefill FP8 (16+ rows, reference, 128x128 blocks): cuBLASLt FP8 with block scaling exactly as
 *     FORMATS.md §1 measured it on Hopper: TN, A = W (BLK128x128_32F scales, rows padded to a
 *     multiple of 4 k-blocks), B = the e4m3 codes of x (VEC128_32F, token-contiguous scales), D bf16,
 *     tokens padded to a multiple of 16. Where cuBLASLt offers no algorithm the tiled kernel runs.
 *   - tiled_kernel (everything else): 64x64 output tiles, the weight dequantised exactly into shared
 *     memory element by element (the CPU's dequantise_transposed), fp32 FMA. Correct for every
 *     format, block shape, group count and stride the constructor accepts; not fast.
 *
 * Launchers never allocate (the workspace comes from the core, sized by dsrtk_linear_workspace) and
 * never synchronise.
 */
#include <cublasLt.h>
#include <cuda_fp16.h>
#include <mutex>
#include "common.cuh"
#include "../runtime/quant.h"

enum { FMT_BF16 = 0, FMT_FP8 = 1, FMT_FP4 = 2 };
enum { PATH_GEMV, PATH_LT, PATH_TILED };
enum { GEMV_THREADS = 256, GEMV_WARPS = GEMV_THREADS / 32, GEMV_MAX_ROWS = 15, ACT_BLOCK = 128 };
enum { MAX_LT_DEVICES = 64 };
static const size_t LT_WORKSPACE = (size_t)32 << 20; /* what cuBLAS recommends for Hopper */

static __host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
static size_t align256(size_t n) { return (n + 255) & ~(size_t)255; }

/* weight elements per 16-byte vector */
static int vec_of(int format) { return format == FMT_FP8 ? 16 : format == FMT_FP4 ? 32 : 8; }

/* ---- the plan: which path, and where its buffers lie in the workspace ---- */

struct Plan {
    int path;
    int64_t seg, x_ld;        /* gemv: the permuted activation, per group and per token (floats) */
    size_t x_bytes;           /* gemv / tiled: the prepared f32 activation at offset 0 (0: x used as is) */
    int64_t mpad, kb, nb, ldw; /* lt */
    size_t codes_off, xs_off, ws_off, d_off, lt_off, total;
};

static int gemv_fits(const dsrtk_linear_weight *w)
{
    int64_t vec = vec_of(w->format), in_g = w->in / w->groups, out_g = w->out / w->groups;
    size_t bytes_per_vec = 16;
    if (in_g % vec || w->ld % vec || (uintptr_t)w->weight % bytes_per_vec) return 0;
    if (w->format != FMT_BF16 && (w->block_cols % vec || !w->scale)) return 0;
    if (w->groups > 1 && out_g % 4) return 0; /* a warp's 2 or 4 features share one group */
    return 1;
}

static int lt_fits(const dsrtk_linear_weight *w, int64_t rows, int quantise, int y_dtype)
{
    return rows >= 16 && quantise && w->format == FMT_FP8 && w->groups == 1 && w->block_rows == 128 &&
           w->block_cols == 128 && y_dtype == DSRT_BF16 && w->out % 16 == 0 && w->in % ACT_BLOCK == 0 &&
           w->ld == w->in && (uintptr_t)w->weight % 16 == 0 && rows <= INT32_MAX;
}

static void make_plan(const dsrtk_linear_weight *w, int64_t rows, int x_dtype, int quantise, int y_dtype, Plan *p)
{
    memset(p, 0, sizeof *p);
    int64_t in = w->in, in_g = in / w->groups;
    if (rows <= GEMV_MAX_ROWS && gemv_fits(w)) {
        int64_t vec = vec_of(w->format);
        p->path = PATH_GEMV;
        p->seg = ceil_div(in_g / vec, 32) * 32 * vec;
        p->x_ld = p->seg * w->groups;
        p->x_bytes = align256((size_t)(rows * p->x_ld) * sizeof(float));
        p->total = p->x_bytes;
        return;
    }
    p->path = PATH_TILED;
    p->x_bytes = x_dtype == DSRT_F32 && !quantise ? 0 : align256((size_t)(rows * in) * sizeof(float));
    p->total = p->x_bytes;
    if (!lt_fits(w, rows, quantise, y_dtype)) return;
    p->path = PATH_LT;
    p->mpad = ceil_div(rows, 16) * 16;
    p->kb = in / ACT_BLOCK;
    p->nb = ceil_div(w->out, 128);
    p->ldw = ceil_div(p->kb, 4) * 4;
    p->codes_off = 0;
    p->xs_off = align256((size_t)(p->mpad * in));
    p->ws_off = p->xs_off + align256((size_t)(p->kb * p->mpad) * sizeof(float));
    p->d_off = p->ws_off + align256((size_t)(p->nb * p->ldw) * sizeof(float));
    size_t d_bytes = p->mpad != rows ? align256((size_t)(p->mpad * w->out) * 2) : 0;
    p->lt_off = p->d_off + d_bytes;
    size_t lt_total = p->lt_off + LT_WORKSPACE;
    /* the tiled fallback reuses the same workspace from offset 0 */
    if (lt_total > p->total) p->total = lt_total;
}

/* ---- activation preparation ---- */

enum { PREP_F32, PREP_CODES };

struct PrepArgs {
    const void *x;
    int x_dtype, quantise, mode, vec; /* vec 0: plain [rows, in] layout; else gemv_pos */
    int64_t rows, in, in_g, seg, dst_ld;
    float *dst;                       /* PREP_F32 */
    uint8_t *codes;                   /* PREP_CODES: [mpad, in] e4m3, scales [in/128, mpad] */
    float *xscale;
    int64_t mpad;
};

/* Where column c of a token's activation goes for the GEMV: per group a segment of whole spans of
 * 32 vectors; in a span, lane l's vector (VEC consecutive columns) is stored as VEC/4 float4s at
 * float4 positions j·32 + l, so when the 32 lanes read their j-th float4 they read 512 contiguous
 * bytes. */
__device__ __forceinline__ int64_t gemv_pos(int64_t c, int64_t in_g, int64_t seg, int vec)
{
    if (vec == 0) return c;
    int64_t g = c / in_g, cc = c - g * in_g, span = 32 * (int64_t)vec;
    int64_t s = cc / span, w = cc - s * span;
    int64_t l = w / vec, r = w - l * vec;
    return g * seg + s * span + ((r >> 2) * 32 + l) * 4 + (r & 3);
}

/* One warp per (token, block of 128 columns): the block's Q8 round trip exactly as dsrt_q8_block
 * (quant.h) does it, lanes holding 4 elements each. */
__global__ void __launch_bounds__(DSRTK_BLOCK) prep_kernel(const __grid_constant__ PrepArgs a)
{
    const int lane = threadIdx.x & 31;
    const int64_t nblk = ceil_div(a.in, ACT_BLOCK), tokens = a.mode == PREP_CODES ? a.mpad : a.rows;
    const int64_t units = tokens * nblk, nwarps = (int64_t)gridDim.x * (blockDim.x / 32);
    for (int64_t u = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; u < units; u += nwarps) {
        int64_t t = u / nblk, c0 = (u - t * nblk) * ACT_BLOCK;
        int64_t len = a.in - c0 < ACT_BLOCK ? a.in - c0 : ACT_BLOCK;
        float v[4];
        bool ok[4];
        for (int e = 0; e < 4; e++) {
            int64_t i = lane * 4 + e;
            ok[e] = t < a.rows && i < len;
            v[e] = ok[e] ? dsrt_load_f32(a.x, a.x_dtype, t * a.in + c0 + i) : 0.0f;
        }
        float s = 1.0f;
        uint8_t code[4] = {0, 0, 0, 0};
        if (a.quantise) {
            float amax = 1e-4f;
            for (int e = 0; e < 4; e++) {
                float m = v[e] < 0 ? -v[e] : v[e];
                if (ok[e] && m > amax) amax = m;
            }
            for (int off = 16; off; off >>= 1) {
                float o = __shfl_xor_sync(0xffffffffu, amax, off);
                if (o > amax) amax = o;
            }
            s = dsrt_pow2_ceil(amax * (1.0f / 448.0f));
            for (int e = 0; e < 4; e++) {
                float q = v[e] / s;
                q = q > 448.0f ? 448.0f : q < -448.0f ? -448.0f : q;
                code[e] = dsrt_f32_to_e4m3(q);
                v[e] = dsrt_e4m3_to_f32(code[e]) * s;
            }
        }
        if (a.mode == PREP_CODES) {
            if (t >= a.rows) s = 1.0f; /* padding tokens: zero codes, unit scale */
            for (int e = 0; e < 4; e++)
                if (lane * 4 + e < len) a.codes[t * a.in + c0 + lane * 4 + e] = ok[e] ? code[e] : 0;
            if (lane == 0) a.xscale[(c0 / ACT_BLOCK) * a.mpad + t] = s;
        } else {
            for (int e = 0; e < 4; e++)
                if (ok[e]) a.dst[t * a.dst_ld + gemv_pos(c0 + lane * 4 + e, a.in_g, a.seg, a.vec)] = v[e];
        }
    }
}

/* ---- shared element helpers ---- */

__device__ __forceinline__ void store_out(void *y, int dtype, int64_t i, float v)
{
    if (dtype == DSRT_F32) ((float *)y)[i] = v;
    else ((uint16_t *)y)[i] = dsrt_f32_to_bf16(v); /* numeric.h's rounding, as the CPU */
}

__device__ __forceinline__ float scale_at(const dsrtk_linear_weight &w, int64_t r, int64_t c)
{
    return dsrt_load_f32(w.scale, w.scale_dtype, (r / w.block_rows) * w.scale_ld0 + (c / w.block_cols) * w.scale_ld1);
}

/* W[r, c]·S exactly, as the CPU's dequantise_transposed computes it */
__device__ __forceinline__ float weight_at(const dsrtk_linear_weight &w, int64_t r, int64_t c)
{
    int64_t i = r * w.ld + c;
    const uint8_t *b = (const uint8_t *)w.weight;
    float v;
    if (w.format == FMT_BF16) v = dsrt_bf16_to_f32(((const uint16_t *)w.weight)[i]);
    else if (w.format == FMT_FP8) v = dsrt_e4m3_to_f32(b[i]);
    else v = dsrt_fp4_to_f32((uint8_t)((b[i >> 1] >> ((i & 1) * 4)) & 15u));
    if (w.scale) v *= scale_at(w, r, c);
    return v;
}

/* ---- the decode GEMV ---- */

struct GemvArgs {
    dsrtk_linear_weight w;
    const float *x; /* prepared, permuted: token t, group g at x + t·x_ld + g·seg */
    int64_t x_ld, seg, rows;
    void *y;
    int y_dtype, ks; /* ks warps of a block split one feature group's K */
};

/* 16 bytes of weights, streamed: L1 no-allocate keeps the L1 for the activation */
__device__ __forceinline__ uint4 load_stream(const void *p)
{
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}

__device__ __forceinline__ float2 half2_bits_to_float2(uint32_t bits)
{
    __half2_raw raw;
    raw.x = (unsigned short)(bits & 0xffffu);
    raw.y = (unsigned short)(bits >> 16);
    return __half22float2(__half2(raw));
}

/* Σ_j x[j]·W[j] over one 16-byte vector, in fp32. fp8: e4m3 pairs convert exactly to f16 pairs in
 * hardware. fp4: each nibble s|e1 e0 m placed as s at bit 15 and e1 e0 m at bits 11..9 of an f16 is
 * the e2m1 value times 2^-14 for normal and subnormal codes alike (both formats' subnormals scale
 * the same way), so the result is the true sum times 2^-14, undone by the caller (exact: a power of
 * two). bf16: the upper half of an f32. */
template <int FMT>
__device__ __forceinline__ float vec_dot(const uint4 &wv, const float *x)
{
    const uint32_t words[4] = {wv.x, wv.y, wv.z, wv.w};
    float p = 0.0f;
    if (FMT == FMT_FP8) {
#pragma unroll
        for (int q = 0; q < 4; q++) {
#pragma unroll
            for (int h = 0; h < 2; h++) {
                uint32_t pair;
                unsigned short two = (unsigned short)(words[q] >> (16 * h));
                asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(pair) : "h"(two));
                float2 f = half2_bits_to_float2(pair); /* .x is the lower byte, the earlier column */
                p = fmaf(x[4 * q + 2 * h], f.x, p);
                p = fmaf(x[4 * q + 2 * h + 1], f.y, p);
            }
        }
    } else if (FMT == FMT_FP4) {
#pragma unroll
        for (int q = 0; q < 4; q++) {
#pragma unroll
            for (int k = 0; k < 4; k++) { /* nibbles k (low half) and k + 4 (high half) of the word */
                uint32_t t = words[q] >> (4 * k);
                uint32_t bits = ((t << 9) & 0x0e000e00u) | ((t << 12) & 0x80008000u);
                float2 f = half2_bits_to_float2(bits);
                p = fmaf(x[8 * q + k], f.x, p);
                p = fmaf(x[8 * q + k + 4], f.y, p);
            }
        }
    } else {
#pragma unroll
        for (int q = 0; q < 4; q++) {
            p = fmaf(x[2 * q], __uint_as_float(words[q] << 16), p);
            p = fmaf(x[2 * q + 1], __uint_as_float(words[q] & 0xffff0000u), p);
        }
    }
    return p;
}

/* A block of 8 warps works on tiles of FG·NW output features (FG = 8 / ks feature groups of NW
 * features; ks warps split each group's K). A lane holds NW weight vectors (NW 16-byte loads in
 * flight) and reuses each activation float4 for NW features; accumulators acc[feature][token]. */
template <int FMT, int MT>
__global__ void __launch_bounds__(GEMV_THREADS) gemv_kernel(const __grid_constant__ GemvArgs a)
{
    constexpr int VEC = FMT == FMT_FP8 ? 16 : FMT == FMT_FP4 ? 32 : 8;
    constexpr int NW = MT >= 8 ? 2 : 4;
    __shared__ float red[GEMV_WARPS][NW * MT];
    const dsrtk_linear_weight &w = a.w;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, ks = a.ks, fg = warp / ks, kslot = warp % ks;
    const int groups_per_block = GEMV_WARPS / ks;
    const int64_t out = w.out, out_g = out / w.groups, in_g = w.in / w.groups, nvec = in_g / VEC;
    const int64_t tile_features = (int64_t)groups_per_block * NW, ntiles = ceil_div(out, tile_features);
    const size_t row_bytes = FMT == FMT_FP4 ? (size_t)w.ld / 2 : (size_t)w.ld * (FMT == FMT_FP8 ? 1 : 2);
    const char *wbase = (const char *)w.weight;

    for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const int64_t n0 = tile * tile_features + (int64_t)fg * NW;
        float acc[NW][MT];
#pragma unroll
        for (int i = 0; i < NW; i++)
#pragma unroll
            for (int t = 0; t < MT; t++) acc[i][t] = 0.0f;
        if (n0 < out) {
            const int64_t g = n0 / out_g;
            const float *xg = a.x + g * a.seg + lane * 4;
            for (int64_t v = (int64_t)kslot * 32 + lane; v < nvec; v += (int64_t)ks * 32) {
                uint4 wv[NW];
                float sc[NW];
#pragma unroll
                for (int i = 0; i < NW; i++) {
                    int64_t n = n0 + i;
                    if (n < out) {
                        wv[i] = load_stream(wbase + (size_t)n * row_bytes + (size_t)v * 16);
                        sc[i] = FMT == FMT_BF16 ? 1.0f : scale_at(w, n, v * VEC);
                    } else {
                        wv[i] = make_uint4(0, 0, 0, 0);
                        sc[i] = 0.0f;
                    }
                }
                const float *xv = xg + (v - lane) * VEC;
#pragma unroll
                for (int t = 0; t < MT; t++) {
                    if (t < a.rows) {
                        float xr[VEC];
#pragma unroll
                        for (int j = 0; j < VEC / 4; j++) {
                            float4 f = __ldg((const float4 *)(xv + t * a.x_ld + j * 128));
                            xr[4 * j] = f.x, xr[4 * j + 1] = f.y, xr[4 * j + 2] = f.z, xr[4 * j + 3] = f.w;
                        }
#pragma unroll
                        for (int i = 0; i < NW; i++) {
                            float p = vec_dot<FMT>(wv[i], xr);
                            if (FMT == FMT_FP4) p *= 16384.0f; /* undo vec_dot's 2^-14 */
                            if (FMT == FMT_BF16) acc[i][t] += p;
                            else acc[i][t] = fmaf(p, sc[i], acc[i][t]);
                        }
                    }
                }
            }
        }
#pragma unroll
        for (int i = 0; i < NW; i++)
#pragma unroll
            for (int t = 0; t < MT; t++) {
                float s = acc[i][t];
                for (int off = 16; off; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
                if (lane == 0) red[warp][i * MT + t] = s;
            }
        __syncthreads();
        for (int idx = threadIdx.x; idx < groups_per_block * NW * MT; idx += GEMV_THREADS) {
            int f = idx / (NW * MT), rem = idx - f * (NW * MT), i = rem / MT, t = rem - i * MT;
            int64_t n = tile * tile_features + (int64_t)f * NW + i;
            float s = 0.0f;
            for (int k = 0; k < ks; k++) s += red[f * ks + k][rem]; /* a fixed order: deterministic */
            if (t < a.rows && n < out) store_out(a.y, a.y_dtype, t * out + n, s);
        }
        __syncthreads();
    }
}

template <int FMT, int MT>
static int launch_gemv_mt(int dev, const GemvArgs &a, int64_t tile_features, cudaStream_t s)
{
    int64_t ntiles = ceil_div(a.w.out, tile_features), most = (int64_t)dsrtk_multiprocessors(dev) * 8;
    int grid = (int)(ntiles < most ? ntiles : most);
    gemv_kernel<FMT, MT><<<grid, GEMV_THREADS, 0, s>>>(a);
    return dsrtk_check_launch("linear gemv_kernel", dev);
}

template <int FMT>
static int launch_gemv(int dev, const GemvArgs &a, cudaStream_t s)
{
    int64_t groups_per_block = GEMV_WARPS / a.ks;
    if (a.rows <= 1) return launch_gemv_mt<FMT, 1>(dev, a, groups_per_block * 4, s);
    if (a.rows <= 2) return launch_gemv_mt<FMT, 2>(dev, a, groups_per_block * 4, s);
    if (a.rows <= 4) return launch_gemv_mt<FMT, 4>(dev, a, groups_per_block * 4, s);
    if (a.rows <= 8) return launch_gemv_mt<FMT, 8>(dev, a, groups_per_block * 2, s);
    return launch_gemv_mt<FMT, 16>(dev, a, groups_per_block * 2, s);
}

/* ---- the tiled kernel ---- */

enum { TM = 64, TN = 64, TK = 16 };

struct TiledArgs {
    dsrtk_linear_weight w;
    const float *x; /* f32 [rows, in] with row stride x_ld */
    int64_t x_ld, rows;
    void *y;
    int y_dtype;
};

/* grid (out_g / TN, rows / TM, groups); thread (tx, ty) computes outputs (ty + 16i, tx + 16j) */
__global__ void __launch_bounds__(DSRTK_BLOCK) tiled_kernel(const __grid_constant__ TiledArgs a)
{
    __shared__ float as[TK][TM + 4];
    __shared__ float bs[TK][TN + 4];
    const dsrtk_linear_weight &w = a.w;
    const int64_t g = blockIdx.z, in_g = w.in / w.groups, out_g = w.out / w.groups;
    const int64_t m0 = (int64_t)blockIdx.y * TM, n0 = (int64_t)blockIdx.x * TN;
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    float acc[4][4] = {};
    for (int64_t k0 = 0; k0 < in_g; k0 += TK) {
        for (int e = tid; e < TM * TK; e += DSRTK_BLOCK) {
            int m = e / TK, k = e % TK;
            int64_t gm = m0 + m, gk = k0 + k;
            as[k][m] = gm < a.rows && gk < in_g ? a.x[gm * a.x_ld + g * in_g + gk] : 0.0f;
        }
        for (int e = tid; e < TN * TK; e += DSRTK_BLOCK) {
            int n = e / TK, k = e % TK;
            int64_t gn = n0 + n, gk = k0 + k;
            bs[k][n] = gn < out_g && gk < in_g ? weight_at(w, g * out_g + gn, gk) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < TK; k++) {
            float av[4], bv[4];
#pragma unroll
            for (int i = 0; i < 4; i++) av[i] = as[k][ty + 16 * i], bv[i] = bs[k][tx + 16 * i];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) {
            int64_t m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
            if (m < a.rows && n < out_g) store_out(a.y, a.y_dtype, m * w.out + g * out_g + n, acc[i][j]);
        }
}

/* ---- cuBLASLt FP8 with block scaling (prefill) ---- */

/* fp32 weight scales [nb, ldw] (k-block contiguous, rows padded to a multiple of 4: FORMATS.md §1) */
__global__ void __launch_bounds__(DSRTK_BLOCK) wscale_kernel(dsrtk_linear_weight w, int64_t nb, int64_t kb,
                                                              int64_t ldw, float *dst)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < nb * ldw; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = i / ldw, c = i - r * ldw;
        dst[i] = c < kb ? dsrt_load_f32(w.scale, w.scale_dtype, r * w.scale_ld0 + c * w.scale_ld1) : 1.0f;
    }
}

static std::mutex lt_locks[MAX_LT_DEVICES];
static cublasLtHandle_t lt_handles[MAX_LT_DEVICES];

static int lt_fail(cublasStatus_t status, const char *what, int dev)
{
    cudaGetLastError(); /* a CUDA failure under cuBLASLt must not resurface at our next launch check */
    return dsrtk_fail(status == CUBLAS_STATUS_ALLOC_FAILED ? DSRTK_OOM : DSRTK_ERROR, "linear: %s on cuda:%d: %s", what,
                      dev, cublasLtGetStatusString(status));
}

/* D[mpad, n] bf16 = codes[mpad, k] · Wᵀ with both block scalings; *taken = 0 when cuBLASLt offers
 * no algorithm (nothing is launched then). Called with the device's lock held. */
static int lt_matmul(int dev, const dsrtk_linear_weight *w, const Plan &p, char *ws, void *d, cudaStream_t s, int *taken)
{
    *taken = 0;
    if (!lt_handles[dev]) {
        cublasLtHandle_t h;
        cublasStatus_t cs = cublasLtCreate(&h);
        if (cs != CUBLAS_STATUS_SUCCESS) return lt_fail(cs, "cublasLtCreate", dev);
        lt_handles[dev] = h;
    }
    cublasLtHandle_t h = lt_handles[dev];
    cublasLtMatmulDesc_t op = NULL;
    cublasLtMatrixLayout_t la = NULL, lb = NULL, ld = NULL;
    cublasLtMatmulPreference_t pref = NULL;
    int st = DSRTK_OK;
    cublasStatus_t cs;
#define LT_CALL(call, what) \
    if (!st && (cs = (call)) != CUBLAS_STATUS_SUCCESS) st = lt_fail(cs, (what), dev)
    const uint64_t n = (uint64_t)w->out, k = (uint64_t)w->in, m = (uint64_t)p.mpad;
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    const int32_t amode = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F, bmode = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    const void *wscale = ws + p.ws_off, *xscale = ws + p.xs_off;
    const uint64_t wsb = LT_WORKSPACE;
    LT_CALL(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
    LT_CALL(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta), "set TRANSA");
    LT_CALL(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb), "set TRANSB");
    LT_CALL(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &amode, sizeof amode), "set A_SCALE_MODE");
    LT_CALL(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &bmode, sizeof bmode), "set B_SCALE_MODE");
    LT_CALL(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &wscale, sizeof wscale),
            "set A_SCALE_POINTER");
    LT_CALL(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &xscale, sizeof xscale),
            "set B_SCALE_POINTER");
    LT_CALL(cublasLtMatrixLayoutCreate(&la, CUDA_R_8F_E4M3, k, n, (int64_t)k), "cublasLtMatrixLayoutCreate(W)");
    LT_CALL(cublasLtMatrixLayoutCreate(&lb, CUDA_R_8F_E4M3, k, m, (int64_t)k), "cublasLtMatrixLayoutCreate(x)");
    LT_CALL(cublasLtMatrixLayoutCreate(&ld, CUDA_R_16BF, n, m, (int64_t)n), "cublasLtMatrixLayoutCreate(y)");
    LT_CALL(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate");
    LT_CALL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof wsb),
            "set MAX_WORKSPACE_BYTES");
    cublasLtMatmulHeuristicResult_t res;
    int found = 0;
    if (!st) {
        cs = cublasLtMatmulAlgoGetHeuristic(h, op, la, lb, ld, ld, pref, 1, &res, &found);
        /* no algorithm for this shape or mode: the caller falls back to the tiled kernel */
        if (cs == CUBLAS_STATUS_NOT_SUPPORTED || cs == CUBLAS_STATUS_INVALID_VALUE) found = 0, cudaGetLastError();
        else if (cs != CUBLAS_STATUS_SUCCESS) st = lt_fail(cs, "cublasLtMatmulAlgoGetHeuristic", dev);
    }
    if (!st && found > 0) {
        const float alpha = 1.0f, beta = 0.0f;
        LT_CALL(cublasLtMatmul(h, op, &alpha, w->weight, la, ws + p.codes_off, lb, &beta, d, ld, d, ld, &res.algo,
                               ws + p.lt_off, LT_WORKSPACE, s),
                "cublasLtMatmul (fp8, 128x128 / 1x128 block scales)");
        if (!st) *taken = 1;
    }
#undef LT_CALL
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (ld) cublasLtMatrixLayoutDestroy(ld);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (op) cublasLtMatmulDescDestroy(op);
    return st;
}

/* ---- launchers ---- */

static int check_args(const dsrtk_linear_weight *w, int64_t rows, int x_dtype, int y_dtype)
{
    if (!w || w->format < FMT_BF16 || w->format > FMT_FP4)
        return dsrtk_fail(DSRTK_ERROR, "linear: unknown weight format %d", w ? w->format : -1);
    if (w->groups < 1 || w->in < 1 || w->out < 1 || w->in % w->groups || w->out % w->groups)
        return dsrtk_fail(DSRTK_ERROR, "linear: %lld -> %lld features in %d groups", (long long)w->in, (long long)w->out,
                          w->groups);
    if (w->format != FMT_BF16 && (!w->scale || w->block_rows < 1 || w->block_cols < 1))
        return dsrtk_fail(DSRTK_ERROR, "linear: a %s weight needs its scale and block shape", w->format == FMT_FP8 ? "fp8" : "fp4");
    if (w->format == FMT_FP4 && (w->ld & 1))
        return dsrtk_fail(DSRTK_ERROR, "linear: fp4 weight rows must start on whole bytes (row stride %lld)", (long long)w->ld);
    if (rows < 0) return dsrtk_fail(DSRTK_ERROR, "linear: %lld rows", (long long)rows);
    if ((x_dtype != DSRT_F32 && x_dtype != DSRT_BF16) || (y_dtype != DSRT_F32 && y_dtype != DSRT_BF16))
        return dsrtk_fail(DSRTK_ERROR, "linear: input and output must be f32 or bf16");
    return DSRTK_OK;
}

int dsrtk_linear_workspace(int dev, const dsrtk_linear_weight *w, int64_t rows, int x_dtype, int quantise, int y_dtype,
                           size_t *bytes)
{
    (void)dev;
    int st = check_args(w, rows, x_dtype, y_dtype);
    if (st) return st;
    Plan p;
    make_plan(w, rows, x_dtype, quantise, y_dtype, &p);
    *bytes = rows ? p.total : 0;
    return DSRTK_OK;
}

static int launch_prep(int dev, const PrepArgs &a, int64_t tokens, cudaStream_t s)
{
    int64_t units = tokens * ceil_div(a.in, ACT_BLOCK) * 32;
    prep_kernel<<<dsrtk_grid_for(dev, units, DSRTK_BLOCK), DSRTK_BLOCK, 0, s>>>(a);
    return dsrtk_check_launch("linear prep_kernel", dev);
}

/* the activation as f32 at ws (plain, or permuted for the GEMV), Q8 round-tripped when asked */
static int prep_f32(int dev, const dsrtk_linear_weight *w, const void *x, int x_dtype, int64_t rows, int quantise,
                    int vec, const Plan &p, float *dst, cudaStream_t s)
{
    PrepArgs a = {};
    a.x = x, a.x_dtype = x_dtype, a.quantise = quantise, a.mode = PREP_F32, a.vec = vec;
    a.rows = rows, a.in = w->in, a.in_g = w->in / w->groups, a.seg = p.seg, a.dst_ld = vec ? p.x_ld : w->in, a.dst = dst;
    return launch_prep(dev, a, rows, s);
}

static int run_tiled(int dev, const dsrtk_linear_weight *w, const void *x, int x_dtype, int64_t rows, int quantise,
                     void *y, int y_dtype, char *ws, const Plan &p, cudaStream_t s)
{
    TiledArgs a = {};
    a.w = *w, a.x_ld = w->in, a.rows = rows, a.y = y, a.y_dtype = y_dtype;
    if (x_dtype == DSRT_F32 && !quantise) {
        a.x = (const float *)x;
    } else {
        int st = prep_f32(dev, w, x, x_dtype, rows, quantise, 0, p, (float *)ws, s);
        if (st) return st;
        a.x = (const float *)ws;
    }
    int64_t out_g = w->out / w->groups;
    dim3 grid((unsigned)ceil_div(out_g, TN), (unsigned)ceil_div(rows, TM), (unsigned)w->groups);
    if (ceil_div(rows, TM) > 65535 || w->groups > 65535 || ceil_div(out_g, TN) > INT32_MAX)
        return dsrtk_fail(DSRTK_ERROR, "linear: %lld rows x %lld features is too large a grid", (long long)rows,
                          (long long)w->out);
    tiled_kernel<<<grid, DSRTK_BLOCK, 0, s>>>(a);
    return dsrtk_check_launch("linear tiled_kernel", dev);
}

int dsrtk_linear(int dev, const dsrtk_linear_weight *w, const void *x, int x_dtype, int64_t rows, int quantise, void *y,
                 int y_dtype, void *workspace, size_t workspace_bytes, void *stream)
{
    int st = check_args(w, rows, x_dtype, y_dtype);
    if (st) return st;
    if (dev < 0 || dev >= MAX_LT_DEVICES) return dsrtk_fail(DSRTK_ERROR, "linear: no device cuda:%d", dev);
    if (rows == 0) return DSRTK_OK;
    Plan p;
    make_plan(w, rows, x_dtype, quantise, y_dtype, &p);
    if (workspace_bytes < p.total || (p.total && !workspace) || (uintptr_t)workspace % 256)
        return dsrtk_fail(DSRTK_ERROR, "linear: workspace of %zu bytes at %p, needs %zu bytes 256-byte aligned",
                          workspace_bytes, workspace, p.total);
    DSRTK_SET_DEVICE(dev, "linear");
    cudaStream_t s = (cudaStream_t)stream;
    char *ws = (char *)workspace;

    if (p.path == PATH_GEMV) {
        st = prep_f32(dev, w, x, x_dtype, rows, quantise, vec_of(w->format), p, (float *)ws, s);
        if (st) return st;
        GemvArgs a = {};
        a.w = *w, a.x = (const float *)ws, a.x_ld = p.x_ld, a.seg = p.seg, a.rows = rows, a.y = y, a.y_dtype = y_dtype;
        int64_t nvec = w->in / w->groups / vec_of(w->format);
        a.ks = 1;
        while (a.ks < GEMV_WARPS && (int64_t)a.ks * 64 <= nvec) a.ks *= 2;
        if (w->format == FMT_FP8) return launch_gemv<FMT_FP8>(dev, a, s);
        if (w->format == FMT_FP4) return launch_gemv<FMT_FP4>(dev, a, s);
        return launch_gemv<FMT_BF16>(dev, a, s);
    }

    if (p.path == PATH_LT) {
        std::lock_guard<std::mutex> lock(lt_locks[dev]);
        PrepArgs a = {};
        a.x = x, a.x_dtype = x_dtype, a.quantise = 1, a.mode = PREP_CODES, a.rows = rows, a.in = w->in, a.in_g = w->in;
        a.codes = (uint8_t *)(ws + p.codes_off), a.xscale = (float *)(ws + p.xs_off), a.mpad = p.mpad;
        if ((st = launch_prep(dev, a, p.mpad, s))) return st;
        wscale_kernel<<<dsrtk_grid_for(dev, p.nb * p.ldw, DSRTK_BLOCK), DSRTK_BLOCK, 0, s>>>(*w, p.nb, p.kb, p.ldw,
                                                                                             (float *)(ws + p.ws_off));
        if ((st = dsrtk_check_launch("linear wscale_kernel", dev))) return st;
        void *d = p.mpad == rows ? y : (void *)(ws + p.d_off);
        int taken = 0;
        if ((st = lt_matmul(dev, w, p, ws, d, s, &taken))) return st;
        if (taken) {
            if (d == y) return DSRTK_OK;
            /* the first `rows` rows of the padded row-major result are y */
            return dsrtk_check(cudaMemcpyAsync(y, d, (size_t)(rows * w->out) * 2, cudaMemcpyDeviceToDevice, s),
                               "linear: copy of %lld rows of the fp8 GEMM on cuda:%d", (long long)rows, dev);
        }
    }
    return run_tiled(dev, w, x, x_dtype, rows, quantise, y, y_dtype, ws, p, s);
}
