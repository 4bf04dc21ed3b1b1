/*
 * linear.cu - DeepSeek-V4's linear layers (runtime/linear.h) on CUDA, weights read in their
 * checkpoint formats: bf16, FP8 e4m3 with block scales, FP4 e2m1 (two per byte, low nibble first)
 * with 1x32 e8m0 scales.
 *
 * What this file protects: the numerics of runtime/linear.c's CPU forward (dsrt_linear_rows), which
 * is the readable reference for every kernel here. The CPU computes y = bf16?( Σ_k a[k] · (W[n,k]·S) )
 * where a is x, Q8 round-tripped in blocks of 128 (quant.h) when the layer quantises. Every path
 * below computes that sum from the same a and the same W·S; only the order of the fp32 additions
 * differs (and, for cuBLASLt's FP8 tensor cores, the accumulator width inside a 128-block).
 *
 *   - mma_gemv_kernel (1..8 rows, the decode step, FP8/FP4 weights times Q8 activations, or FP8
 *     weights times bf16 ones): ONE launch, no workspace, the weights fed to f16 tensor cores
 *     from registers (fp8mma.cuh says why and proves the products exact). Persistent blocks stage
 *     the activation once; teams of warps walk 16-row tiles with the next weight loads always in
 *     flight. Measured on the H200 (2026-11-28, ncu inside a decode step, warm, real clocks):
 *     wq_b 1024->32768 (32 MB) 17 us, wo_b 8192->4096 20 us, wkv 4096->512 9 us; by CUDA events
 *     (make bench) wq_b 30 -> 20 us and wo_b 39 -> 24 us against the CUDA-core kernel below, which
 *     converts every weight to f32 (~1.5 conversions at 16 a clock per SM).
 *   - bf16_mma_kernel (1..8 rows, bf16 weights of 16384+ outputs: the LM head): mma.sync on the
 *     bf16 weights as stored, loaded in the CUDA-core GEMV's order; the head at 248-256 us at one
 *     row and 278 us at three (against 245-252 and 473 through gemv_kernel; ncu, H200).
 *   - gemv_kernel (1..8 rows, everything else: narrower bf16 weights such as the compressors'
 *     wkv and wgate, one launch for the pair, f32 or unquantised activations, widths off the
 *     64-column chunks): each block stages the activation
 *     it needs in shared memory (f32, Q8 round-tripped with quant.h's arithmetic, so bit for bit
 *     the CPU's a), then streams every weight byte once with 16-byte loads (L1 no-allocate),
 *     dequantised in registers; a 16-byte vector never straddles a scale block (checked on the
 *     host), so a partial dot product over the vector is multiplied by its block's scale once
 *     (scales are powers of two for e8m0, so p·S equals Σ a·(W·S) up to the order of fp32
 *     additions; f32 scales are applied the same way, as a product after the sum). Per weight
 *     element: 1 byte (fp8) / 0.5 (fp4) / 2 (bf16) from HBM and 2·rows FLOPs. The 1 GB bf16 head
 *     streamed at 4.1 TB/s through it at one row, and its FMAs bound it from two rows on.
 *   - prefill FP8 (9+ rows, reference, 128x128 blocks): cuBLASLt FP8 with block scaling exactly as
 *     FORMATS.md §1 measured it on Hopper (TN, A = W with BLK128x128_32F scales, B = the e4m3 codes
 *     of Q8(x) with VEC128_32F scales, D bf16, tokens padded to 16).
 *   - prefill everything else (9+ rows): cuBLAS on tensor cores over the weight dequantised into a
 *     transient slab of the workspace (at most SLAB_BYTES, one weight at a time, freed with the
 *     workspace). bf16 route when a and W·S are exactly bf16: Q8 values (4-bit significands times
 *     2^-22..2^127) and bf16 inputs are; e2m1·2^e always is, e4m3·2^e is unless 2^e < 2^-124; the
 *     dequantiser flags any inexact element and the exact tiled kernel then recomputes y (it returns
 *     at once when the flag is clear). bf16 products are exact in the tensor cores' fp32
 *     accumulation, so this is the CPU's sum in another order. f32 route otherwise (fp32 precision
 *     with f32 inputs, fp8 with f32 scales): true-fp32 cuBLAS (no TF32) on dequantised f32 slabs,
 *     W·S rounded exactly as the CPU's dequantise_transposed rounds it.
 *   - tiled_kernel (shapes the GEMV cannot vector-load, and the exactness fallback): 64x64 output
 *     tiles, the weight dequantised element by element (the CPU's dequantise_transposed), fp32 FMA.
 *
 * Launchers never allocate (the workspace comes from the core, sized by dsrtk_linear_workspace) and
 * never synchronise.
 */
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <atomic>
#include <mutex>
#include "common.cuh"
#include "act.cuh"
#include "blas.cuh"
#include "fp8mma.cuh"
#include "../runtime/quant.h"

enum { FMT_BF16 = 0, FMT_FP8 = 1, FMT_FP4 = 2 };
static_assert((int)FMT_FP8 == (int)MMA_FP8 && (int)FMT_FP4 == (int)MMA_FP4, "fp8mma.cuh names the formats as this file does");
enum { PATH_GEMV, PATH_LT, PATH_BLAS, PATH_TILED };
enum { GEMV_THREADS = 256, GEMV_WARPS = GEMV_THREADS / 32, GEMV_MAX_ROWS = 8 };
/* the staged activation: f32, at most this many bytes of dynamic shared memory (no opt-in needed) */
enum { GEMV_X_BYTES = 47 * 1024 };
enum { MAX_LT_DEVICES = 64 };
static const size_t LT_WORKSPACE = (size_t)32 << 20; /* what cuBLAS recommends for Hopper */
static const size_t SLAB_BYTES = (size_t)64 << 20;   /* the most dequantised weight held at once */

static __host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
static size_t align256(size_t n) { return (n + 255) & ~(size_t)255; }

/* weight elements per 16-byte vector */
static int vec_of(int format) { return format == FMT_FP8 ? 16 : format == FMT_FP4 ? 32 : 8; }

/* ---- the plan: which path, and where its buffers lie in the workspace ---- */

struct Plan {
    int path;
    int64_t kc;                 /* gemv: staged columns per chunk (a multiple of 32 vectors) */
    int64_t mpad, kb, nb, ldw;  /* lt */
    size_t codes_off, xs_off, ws_off, d_off, lt_off;
    int bf16, x_prep, w_direct, y_tmp; /* blas: bf16 route; x prepared at x_off; W used as stored; f32 C then rounded */
    int64_t slab_rows;          /* blas: weight rows dequantised per slab */
    size_t x_off, w_off, c_off, flag_off;
    size_t total;
};

static int gemv_fits(const dsrtk_linear_weight *w, int quantise)
{
    int64_t vec = vec_of(w->format), in_g = w->in / w->groups;
    if (in_g % vec || w->ld % vec || (uintptr_t)w->weight % 16) return 0;
    if (w->format != FMT_BF16 && (w->block_cols % vec || !w->scale)) return 0;
    /* Q8 blocks are the row's absolute 128-column blocks: a group must start on one */
    if (quantise && w->groups > 1 && in_g % ACT_BLOCK) return 0;
    return 1;
}

/* the tensor-core GEMV (fp8mma.cuh): persistent blocks of MMA_WARPS warps */
static const size_t MMA_MAX_SMEM = 200 * 1024;

static size_t mma_smem(int format, int64_t in_g, int64_t rows, int warps)
{
    /* rows + 1: the staging's zero row */
    return (size_t)((rows + 1) * mma_staged_ld(format, in_g)) * 2 + (size_t)((rows + 1) * ceil_div(in_g, ACT_BLOCK)) * 4 +
           (size_t)warps * MMA_ROWS * MMA_TOKENS * 4;
}

/* the tensor-core GEMV takes FP8/FP4 weights whose 64-column chunks load as whole vectors and stay
 * inside one weight scale block, times Q8 activations or (FP8) bf16 ones */
static int mma_gemv_fits(const dsrtk_linear_weight *w, int64_t rows, int quantise, int x_dtype)
{
    if (rows > GEMV_MAX_ROWS || mma_smem(w->format, w->in / w->groups, MMA_TOKENS, MMA_WARPS) > MMA_MAX_SMEM) return 0;
    if (w->out > INT32_MAX || w->in > INT32_MAX || w->block_rows > INT32_MAX) return 0; /* MmaGemvArgs' int sizes */
    if ((w->format != FMT_FP8 && w->format != FMT_FP4) || !w->scale) return 0;
    /* unquantised: FP8 weights times bf16 activations, scaled into f16 (f16_block_warp) */
    if (!quantise && (w->format != FMT_FP8 || x_dtype != DSRT_BF16)) return 0;
    int64_t in_g = w->in / w->groups, row_bytes = w->format == FMT_FP8 ? w->ld : w->ld / 2;
    if (in_g % MMA_CHUNK || row_bytes % 16 || (uintptr_t)w->weight % 16) return 0;
    /* fp8: 2^k chunks of 64 columns per scale block (a shift finds a chunk's block) */
    if (w->format == FMT_FP8 && (w->block_cols % MMA_CHUNK || (w->block_cols / MMA_CHUNK) & (w->block_cols / MMA_CHUNK - 1))) return 0;
    /* fp4: one e8m0 scale per 32 columns, two adjacent ones per chunk read as one 16-bit word */
    if (w->format == FMT_FP4 && (w->block_cols != 32 || w->scale_dtype != DSRT_F8E8M0 || w->scale_ld1 != 1 ||
                                 w->scale_ld0 % 2 || (uintptr_t)w->scale % 2))
        return 0;
    return w->groups == 1 || in_g % ACT_BLOCK == 0; /* Q8 blocks are the row's absolute 128-column blocks */
}


/* bf16 weights on the tensor cores (bf16_mma_kernel, below) */
enum { SUPER = 256 };                          /* the columns one warp instruction reads of a row */
static const int64_t BF16_MMA_MIN_OUT = 16384; /* narrower outputs leave warps without row pairs */
static const size_t BF16_MMA_MAX_SMEM = 100 * 1024; /* two blocks a multiprocessor */

/* super-chunks a step: 8 (4) 16-byte loads a lane in flight per buffer; 8 tokens' accumulators
 * leave room for 4 */
template <int MT> struct Bf16Shape { static constexpr int SC = MT >= 8 ? 2 : 4; };

struct Bf16MmaArgs {
    const char *weight;
    const void *x;
    void *y;
    int x_dtype, y_dtype, rows;
    int groups, out, out_g, in, in_g;
    int ldg, pitch;         /* a group's staged columns (in_g up to super-chunks), a plane row's */
    int pairs_g, n_pairs;   /* row pairs a group, in all */
    int rounds;             /* steps a row pair */
    int64_t row_bytes;
};

static int bf16_planes(int x_dtype) { return x_dtype == DSRT_BF16 ? 1 : 3; }
static int64_t bf16_ldg(int64_t in_g) { return ceil_div(in_g, SUPER) * SUPER; }
static size_t bf16_smem(int64_t groups, int64_t in_g, int planes, int64_t rows)
{
    return (size_t)(rows * planes * groups * bf16_ldg(in_g)) * 2;
}

/* bf16 weights with 8-column vectors, wide outputs, unquantised bf16 or f32 activations that fit
 * the shared memory 8 tokens at a time: never a question of rows, so that a token's result does not
 * depend on how many share the call (bf16_mma_kernel) */
static int bf16_mma_fits(const dsrtk_linear_weight *w, int64_t rows, int quantise, int x_dtype)
{
    const int64_t in_g = w->in / w->groups;
    return w->format == FMT_BF16 && !quantise && rows <= GEMV_MAX_ROWS && (x_dtype == DSRT_BF16 || x_dtype == DSRT_F32) &&
           w->out / w->groups >= BF16_MMA_MIN_OUT && in_g % 8 == 0 && w->ld % 8 == 0 && (uintptr_t)w->weight % 16 == 0 &&
           w->out <= INT32_MAX && w->in <= INT32_MAX &&
           bf16_smem(w->groups, in_g, bf16_planes(x_dtype), GEMV_MAX_ROWS) <= BF16_MMA_MAX_SMEM;
}

static int lt_fits(const dsrtk_linear_weight *w, int64_t rows, int quantise, int y_dtype)
{
    return rows > GEMV_MAX_ROWS && quantise && w->format == FMT_FP8 && w->groups == 1 && w->block_rows == 128 &&
           w->block_cols == 128 && y_dtype == DSRT_BF16 && w->out % 16 == 0 && w->in % ACT_BLOCK == 0 &&
           w->ld == w->in && (uintptr_t)w->weight % 16 == 0 && rows <= INT32_MAX;
}

static int64_t gemv_kc(const dsrtk_linear_weight *w, int mt)
{
    int64_t span = 32 * (int64_t)vec_of(w->format), in_g = w->in / w->groups;
    int64_t most = GEMV_X_BYTES / 4 / mt / span * span, need = ceil_div(in_g, span) * span;
    return need < most ? need : most;
}

static int gemv_mt(int64_t rows) { return rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : 8; }

static void make_plan(const dsrtk_linear_weight *w, int64_t rows, int x_dtype, int quantise, int y_dtype, Plan *p)
{
    memset(p, 0, sizeof *p);
    int64_t in = w->in, in_g = in / w->groups, out_g = w->out / w->groups;
    if (rows <= GEMV_MAX_ROWS &&
        (bf16_mma_fits(w, rows, quantise, x_dtype) || mma_gemv_fits(w, rows, quantise, x_dtype) || gemv_fits(w, quantise))) {
        p->path = PATH_GEMV;
        p->kc = gemv_kc(w, gemv_mt(rows));
        return; /* no workspace */
    }
    /* cuBLAS takes int sizes and leading dimensions */
    if (rows <= GEMV_MAX_ROWS || rows > INT32_MAX || in > INT32_MAX || w->out > INT32_MAX || w->ld > INT32_MAX) {
        p->path = PATH_TILED;
        p->total = x_dtype == DSRT_F32 && !quantise ? 0 : align256((size_t)(rows * in) * sizeof(float));
        return;
    }
    if (lt_fits(w, rows, quantise, y_dtype)) {
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
        p->total = p->lt_off + LT_WORKSPACE;
        /* where cuBLASLt offers no algorithm the blas route below runs in the same workspace */
    }
    Plan b;
    memset(&b, 0, sizeof b);
    b.path = PATH_BLAS;
    int x_exact_bf16 = quantise || x_dtype == DSRT_BF16;
    int w_exact_bf16 = w->format == FMT_BF16 || w->scale_dtype == DSRT_F8E8M0;
    b.bf16 = x_exact_bf16 && w_exact_bf16;
    size_t xe = b.bf16 ? 2 : 4;
    /* x goes in as stored when it already has the route's dtype and needs no Q8 */
    b.x_prep = quantise || (int)xe != (x_dtype == DSRT_BF16 ? 2 : 4);
    b.w_direct = b.bf16 && w->format == FMT_BF16;
    b.y_tmp = !b.bf16 && y_dtype == DSRT_BF16; /* f32 cuBLAS writes f32 only */
    size_t off = 0;
    b.x_off = off;
    if (b.x_prep) off += align256((size_t)(rows * in) * xe);
    b.c_off = off;
    if (b.y_tmp) off += align256((size_t)(rows * w->out) * 4);
    b.flag_off = off;
    if (b.bf16 && !b.w_direct) off += 256;
    b.w_off = off;
    if (!b.w_direct) {
        int64_t most = (int64_t)(SLAB_BYTES / ((size_t)in_g * xe));
        b.slab_rows = most < 1 ? 1 : most < out_g ? most : out_g;
        off += align256((size_t)(b.slab_rows * in_g) * xe);
    }
    b.total = off;
    if (p->path == PATH_LT) {
        b.path = PATH_LT;
        b.mpad = p->mpad, b.kb = p->kb, b.nb = p->nb, b.ldw = p->ldw;
        b.codes_off = p->codes_off, b.xs_off = p->xs_off, b.ws_off = p->ws_off, b.d_off = p->d_off, b.lt_off = p->lt_off;
        if (p->total > b.total) b.total = p->total;
    }
    *p = b;
}

/* ---- activation preparation (prefill paths) ---- */

enum { PREP_F32, PREP_BF16, PREP_CODES };

struct PrepArgs {
    const void *x;
    int x_dtype, quantise, mode;
    int64_t rows, in;
    void *dst;                        /* PREP_F32 / PREP_BF16: [rows, in] */
    uint8_t *codes;                   /* PREP_CODES: [mpad, in] e4m3, scales [in/128, mpad] */
    float *xscale;
    int64_t mpad;
    bool vec; /* x, dst and codes take act.cuh's 4-element accesses */
};

/* A warp per token, U blocks of 128 columns in flight at once, 4 columns a lane (act.cuh);
 * PREP_CODES tokens past rows (the padding up to mpad) get zero codes and scale 1. U = 8 where
 * rows are whole 1024-column spans: at ACT_U (4) a warp kept 1 KB in flight and the prefill's
 * preps ran at ~1.3 TB/s (CUPTI, H200, [4096, 4096] bf16 -> e4m3 in 37 us). */
template <int U>
__global__ void __launch_bounds__(DSRTK_BLOCK) prep_kernel(const __grid_constant__ PrepArgs a)
{
    const int lane = threadIdx.x & 31;
    const int64_t tokens = a.mode == PREP_CODES ? a.mpad : a.rows, nwarps = (int64_t)gridDim.x * (blockDim.x / 32);
    for (int64_t t = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; t < tokens; t += nwarps) {
        const bool real = t < a.rows;
        for (int64_t c0 = 0; c0 < a.in; c0 += U * ACT_BLOCK) {
            const int64_t row[1] = {t * a.in};
            float v[1][U][4];
            bool ok[U][4];
            ld4_blocks<1, U>(a.x, a.x_dtype, row, c0, real ? a.in : 0, a.vec, v, ok); /* padding rows read 0 */
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int64_t b0 = c0 + u * ACT_BLOCK, col = b0 + 4 * lane;
                if (b0 >= a.in) break; /* uniform */
                float s = 1.0f;
                uint8_t code[4] = {0, 0, 0, 0};
                if (a.quantise) s = q8_block_warp(v[0][u], ok[u], code);
                if (a.mode == PREP_CODES) {
                    uint8_t *dst = a.codes + t * a.in + col;
                    if (a.vec && col + 3 < a.in) *(uint32_t *)dst = code[0] | code[1] << 8 | code[2] << 16 | (uint32_t)code[3] << 24;
                    else
                        for (int e = 0; e < 4 && col + e < a.in; e++) dst[e] = code[e];
                    if (lane == 0) a.xscale[(b0 / ACT_BLOCK) * a.mpad + t] = real ? s : 1.0f;
                } else {
                    /* exact in bf16: see the top */
                    st4_row(a.dst, a.mode == PREP_BF16 ? DSRT_BF16 : DSRT_F32, t * a.in, col, a.in, a.vec, v[0][u]);
                }
            }
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
    const void *x;  /* [rows, in], bf16 or f32, as the caller gave it */
    int x_dtype, quantise;
    int64_t rows, kc; /* kc: staged columns per chunk (Plan.kc) */
    void *y;
    int y_dtype;
    int ks;           /* warps of a block splitting one feature group's K */
    int vpb_shift;    /* log2 of 16-byte vectors per scale block along K; -1: not a power of two */
    int grid;         /* the matrix's persistent blocks */
    /* sizes derived on the host (gemv_plan): a 64-bit division costs ~70 instructions ahead of a
     * warp's first load */
    int64_t out_g, in_g, tpg, ntiles; /* a group's outputs and inputs, tiles a group and in all */
};

/* One launch for one matrix, or for two that read the same x (a compressor's wkv and wgate, SPEC
 * §10): blocks below split serve m[0] with the plan a launch of its own would have (so the same
 * bits), the rest m[1] */
struct GemvLaunch {
    GemvArgs m[2];
    int split;
};

__device__ __forceinline__ float2 half2_bits_to_float2(uint32_t bits)
{
    __half2_raw raw;
    raw.x = (unsigned short)(bits & 0xffffu);
    raw.y = (unsigned short)(bits >> 16);
    return __half22float2(__half2(raw));
}

/* p + Σ_j x[j]·W[j] over the VEC/4 weights of one 32-bit word of a vector, in fp32. fp8: e4m3
 * pairs convert exactly to f16 pairs in hardware. fp4: each nibble s|e1 e0 m placed as s at bit 15
 * and e1 e0 m at bits 11..9 of an f16 is the e2m1 value times 2^-14 for normal and subnormal codes
 * alike (both formats' subnormals scale the same way), so the fp4 sum is the true sum times 2^-14,
 * undone by the caller (exact: a power of two). bf16: the upper half of an f32. x[j] is the word's
 * j-th column. */
template <int FMT>
__device__ __forceinline__ float word_dot(uint32_t word, const float *x, float p)
{
    if (FMT == FMT_FP8) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            uint32_t pair;
            unsigned short two = (unsigned short)(word >> (16 * h));
            asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(pair) : "h"(two));
            float2 f = half2_bits_to_float2(pair); /* .x is the lower byte, the earlier column */
            p = fmaf(x[2 * h], f.x, p);
            p = fmaf(x[2 * h + 1], f.y, p);
        }
    } else if (FMT == FMT_FP4) {
#pragma unroll
        for (int k = 0; k < 4; k++) { /* nibbles k (low half) and k + 4 (high half) of the word */
            uint32_t t = word >> (4 * k);
            uint32_t bits = ((t << 9) & 0x0e000e00u) | ((t << 12) & 0x80008000u);
            float2 f = half2_bits_to_float2(bits);
            p = fmaf(x[k], f.x, p);
            p = fmaf(x[k + 4], f.y, p);
        }
    } else {
        p = fmaf(x[0], __uint_as_float(word << 16), p);
        p = fmaf(x[1], __uint_as_float(word & 0xffff0000u), p);
    }
    return p;
}

__device__ __forceinline__ uint32_t word_of(const uint4 &v, int q) { return q == 0 ? v.x : q == 1 ? v.y : q == 2 ? v.z : v.w; }

/* stage_x's unquantised path: columns [0, cols) of each token's row as they are (load(i) reads
 * element i of the chunk, token t's at t·in + c), 4 columns a thread at a time, the index math in
 * 32 bits (a chunk is at most GEMV_X_BYTES), a thread's loads all issued before its stores. The
 * Q8 walk below, used for this before, cost a compressor's GEMV most of its 9 us at decode (ncu,
 * H200): 64-bit divisions per unit, and dsrt_load_f32's dtype switch around each load put one
 * memory round trip after another. */
template <int VEC, class Load>
__device__ __forceinline__ void stage_plain(const GemvArgs &a, float *xs, int64_t cols, Load load)
{
    constexpr int SPAN = 32 * VEC, BATCH = 2;
    const int quads = (int)cols / 4, n = (int)a.rows * quads;
    for (int i0 = threadIdx.x; i0 < n; i0 += BATCH * GEMV_THREADS) {
        float v[BATCH][4];
#pragma unroll
        for (int b = 0; b < BATCH; b++) {
            const int i = i0 + b * GEMV_THREADS, t = i / quads, c = 4 * (i - t * quads);
#pragma unroll
            for (int e = 0; e < 4; e++) v[b][e] = i < n ? load(t * a.w.in + c + e) : 0.0f;
        }
#pragma unroll
        for (int b = 0; b < BATCH; b++) {
            const int i = i0 + b * GEMV_THREADS, t = i / quads, c = 4 * (i - t * quads);
            const int s = c / SPAN, wi = c - s * SPAN, l = wi / VEC, r = wi - l * VEC;
            if (i < n) *(float4 *)(xs + t * a.kc + s * SPAN + ((r >> 2) * 32 + l) * 4) = make_float4(v[b][0], v[b][1], v[b][2], v[b][3]);
        }
    }
}

/* Stages columns [c0, c0 + cols) of group g of every token in shared memory, Q8 round-tripped when
 * asked (one warp per token and block of 128 columns, quant.h's arithmetic: q8_block_warp). The
 * chunk starts on an absolute 128-column block (kc is a multiple of the span, a multiple of 128,
 * and a quantised grouped layer has in_g % 128 == 0: gemv_fits), so these are the CPU's Q8 blocks.
 * Layout: token t at xs + t·kc; in each span of 32 vectors, lane l's vector (VEC consecutive
 * columns) lies as VEC/4 float4s at float4 positions j·32 + l, so when the 32 lanes read their j-th
 * float4 they read 512 contiguous bytes (no bank conflicts). cols is a multiple of VEC (>= 8), so a
 * lane's 4 columns are all in range or all out. A warp loads SB units before converting them, so
 * their latencies overlap; the arithmetic of each unit is unchanged. */
template <int VEC, int SB, bool Q8>
__device__ __forceinline__ void stage_x(const GemvArgs &a, float *xs, int64_t g, int64_t c0, int64_t cols)
{
    constexpr int SPAN = 32 * VEC;
    if (!Q8 || !a.quantise) { /* as it is, one load loop per dtype (stage_plain) */
        const int64_t x0 = g * a.in_g + c0;
        if (a.x_dtype == DSRT_BF16)
            stage_plain<VEC>(a, xs, cols, [&](int64_t i) { return dsrt_bf16_to_f32(((const uint16_t *)a.x)[x0 + i]); });
        else
            stage_plain<VEC>(a, xs, cols, [&](int64_t i) { return ((const float *)a.x)[x0 + i]; });
        return;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t in_g = a.in_g, nblk = ceil_div(cols, ACT_BLOCK), units = a.rows * nblk;
    for (int64_t u0 = warp; u0 < units; u0 += SB * GEMV_WARPS) {
        float v[SB][4];
        bool ok[SB][4];
#pragma unroll
        for (int j = 0; j < SB; j++) { /* unit u0 + j·WARPS; past the last unit nothing is loaded */
            const int64_t u = u0 + (int64_t)j * GEMV_WARPS, t = u / nblk, cb = (u - t * nblk) * ACT_BLOCK;
            const int64_t len = u >= units ? 0 : cols - cb < ACT_BLOCK ? cols - cb : ACT_BLOCK;
            const int64_t src = t * a.w.in + g * in_g + c0 + cb + lane * 4;
#pragma unroll
            for (int e = 0; e < 4; e++) {
                ok[j][e] = lane * 4 + e < len;
                v[j][e] = ok[j][e] ? dsrt_load_f32(a.x, a.x_dtype, src + e) : 0.0f;
            }
        }
#pragma unroll
        for (int j = 0; j < SB; j++) {
            const int64_t u = u0 + (int64_t)j * GEMV_WARPS;
            if (u >= units) break; /* warp-uniform: q8_block_warp needs the whole warp */
            const int64_t t = u / nblk, cb = (u - t * nblk) * ACT_BLOCK;
            const int64_t len = cols - cb < ACT_BLOCK ? cols - cb : ACT_BLOCK;
            if (a.quantise) {
                uint8_t code[4];
                q8_block_warp(v[j], ok[j], code);
            }
            if (lane * 4 < len) {
                const int cc = (int)cb + lane * 4, s = cc / SPAN, wi = cc - s * SPAN, l = wi / VEC, r = wi - l * VEC;
                *(float4 *)(xs + t * a.kc + (int64_t)s * SPAN + ((r >> 2) * 32 + l) * 4) =
                    make_float4(v[j][0], v[j][1], v[j][2], v[j][3]);
            }
        }
    }
}

template <int FMT, int MT> struct GemvShape {
    static constexpr int VEC = FMT == FMT_FP8 ? 16 : FMT == FMT_FP4 ? 32 : 8;
    /* features per warp: each x float4 read from shared memory serves NW of them, so at 4 tokens
     * NW = 4 halves the shared-memory traffic that bounds the multi-token GEMV (fp4 at 4 tokens
     * and 8 tokens would spill: ptxas) */
    static constexpr int NW = MT <= 2 || (MT == 4 && FMT != FMT_FP4) ? 4 : 2;
    static constexpr int U = NW == 4 ? 2 : 4;  /* vectors per feature in flight: NW·U = 8 loads a lane */
    static constexpr int SB = FMT == FMT_FP4 || MT >= 4 ? 1 : 2; /* stage_x's batch: more spills (ptxas) */
};

/* A block of 8 warps works on tiles of FG·NW output features of one group (FG = 8 / ks feature
 * groups of NW features; ks warps split each group's K), looping over tiles (a persistent grid) and
 * over K chunks of the staged activation. A lane keeps NW·U 16-byte weight loads in flight and
 * reuses each activation float4 for NW features; accumulators acc[feature][token]. Sums meet in a
 * fixed order (lanes by shuffle, k-slots in index order): the result does not depend on the grid.
 * Per 16-byte vector and token: VEC FMAs, VEC/4 LDS.128, plus the dequantisation (fp8 1.5
 * instructions a weight, fp4 ~3, bf16 1) shared by the tokens. */
template <int FMT, int MT>
__global__ void __launch_bounds__(GEMV_THREADS, 2) gemv_kernel(const __grid_constant__ GemvLaunch L)
{
    constexpr int VEC = GemvShape<FMT, MT>::VEC, NW = GemvShape<FMT, MT>::NW, U = GemvShape<FMT, MT>::U;
    constexpr int SPAN = 32 * VEC;
    extern __shared__ float4 xs4[];
    float *xs = (float *)xs4;
    __shared__ float red[GEMV_WARPS][NW * MT];
    /* pairs are bf16 only (dsrtk_linear_pair): FP8/FP4 pairs take the tensor-core GEMV, and a
     * run-time pick of the matrix made ptxas spill in their instantiations */
    const int second = FMT == FMT_BF16 && (int)blockIdx.x >= L.split;
    const GemvArgs &a = L.m[second];
    const int64_t block = (int64_t)blockIdx.x - (second ? L.split : 0);
    const dsrtk_linear_weight &w = a.w;
    bool waited = false; /* launched dependent (common.cuh): the wait comes after the first weight loads */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, ks = a.ks, fg = warp / ks, kslot = warp % ks;
    const int fgs = GEMV_WARPS / ks;
    const int64_t out_g = a.out_g, in_g = a.in_g, kc = a.kc, tf = (int64_t)fgs * NW, tpg = a.tpg, ntiles = a.ntiles;
    const int64_t step = (int64_t)ks * 32;
    const size_t row_bytes = FMT == FMT_FP4 ? (size_t)w.ld / 2 : (size_t)w.ld * (FMT == FMT_FP8 ? 1 : 2);
    const char *wbase = (const char *)w.weight;
    const bool one_chunk = kc >= in_g;
    int64_t staged = -1; /* the group whose whole activation is in xs (one_chunk only) */
    for (int64_t tile = block; tile < ntiles; tile += a.grid) {
        const int64_t g = w.groups == 1 ? 0 : tile / tpg, tl0 = (tile - g * tpg) * tf, nl0 = tl0 + (int64_t)fg * NW;
        const char *wrow = wbase + (size_t)(g * out_g + nl0) * row_bytes; /* feature i's row at + i·row_bytes */
        int64_t srow[NW];
        bool live[NW];
#pragma unroll
        for (int i = 0; i < NW; i++) {
            const int64_t nl = nl0 + i, n = g * out_g + (nl < out_g ? nl : 0);
            live[i] = nl < out_g;
            srow[i] = FMT == FMT_BF16 ? 0 : n / w.block_rows * w.scale_ld0;
        }
        float acc[NW][MT];
#pragma unroll
        for (int i = 0; i < NW; i++)
#pragma unroll
            for (int t = 0; t < MT; t++) acc[i][t] = 0.0f;

        for (int64_t c0 = 0; c0 < in_g; c0 += kc) {
            const int64_t cols = in_g - c0 < kc ? in_g - c0 : kc;
            const int64_t vbeg = c0 / VEC, vend = vbeg + cols / VEC;
            uint4 wv[U][NW];
            float sc[U][NW];
            auto load = [&](int64_t v0) {
#pragma unroll
                for (int u = 0; u < U; u++) {
                    const int64_t v = v0 + u * step;
#pragma unroll
                    for (int i = 0; i < NW; i++) {
                        if (live[i] && v < vend) {
                            wv[u][i] = load_stream(wrow + (size_t)i * row_bytes + (size_t)v * 16);
                            if (FMT == FMT_BF16) {
                                sc[u][i] = 1.0f;
                            } else {
                                const int64_t cb = a.vpb_shift >= 0 ? v >> a.vpb_shift : v * VEC / w.block_cols;
                                sc[u][i] = dsrt_load_f32(w.scale, w.scale_dtype, srow[i] + cb * w.scale_ld1);
                            }
                        } else {
                            wv[u][i] = make_uint4(0, 0, 0, 0);
                            sc[u][i] = 0.0f;
                        }
                    }
                }
            };
            /* bf16 up to 4 tokens: the chunk's first weights are in flight while x is staged
             * (weights are never written by a kernel, so before the producer wait too): a
             * compressor's call is one round of loads a warp, whose latency the staging used to
             * precede. The other shapes spill with their loads held across the staging (ptxas). */
            constexpr bool EARLY = FMT == FMT_BF16 && MT <= 4;
            int64_t v0 = vbeg + (int64_t)kslot * 32 + lane;
            if (EARLY) load(v0);
            if (!waited) {
                dsrtk_wait_producer();
                waited = true;
            }
            if (!one_chunk || staged != g) { /* block-uniform */
                __syncthreads();             /* every warp is done reading the previous chunk */
                stage_x<VEC, GemvShape<FMT, MT>::SB, FMT != FMT_BF16>(a, xs, g, c0, cols); /* bf16 never quantises */
                __syncthreads();
                staged = g;
            }
            for (bool loaded = EARLY; v0 < vend; v0 += U * step, loaded = false) {
                if (!loaded) load(v0);
#pragma unroll
                for (int u = 0; u < U; u++) {
                    const int64_t v = v0 + u * step;
                    if (v >= vend) continue;
                    /* (v - vbeg) % 32 == lane: the lane's own slot of its span; float4 j of the
                     * vector (columns 4j..4j+3) at xv + j·128 */
                    const float *xv = xs + ((v - vbeg) >> 5) * SPAN + lane * 4;
#pragma unroll
                    for (int t = 0; t < MT; t++) {
                        if (t >= a.rows) continue;
                        const float *xt = xv + t * kc;
                        float p[NW];
#pragma unroll
                        for (int i = 0; i < NW; i++) p[i] = 0.0f;
#pragma unroll
                        for (int q = 0; q < 4; q++) { /* word q holds columns q·VEC/4 .. */
                            float xq[VEC / 4];
                            if constexpr (FMT == FMT_FP4) {
                                const float4 lo = *(const float4 *)(xt + (2 * q) * 128);
                                const float4 hi = *(const float4 *)(xt + (2 * q + 1) * 128);
                                xq[0] = lo.x, xq[1] = lo.y, xq[2] = lo.z, xq[3] = lo.w;
                                xq[4] = hi.x, xq[5] = hi.y, xq[6] = hi.z, xq[7] = hi.w;
                            } else if constexpr (FMT == FMT_FP8) {
                                const float4 f = *(const float4 *)(xt + q * 128);
                                xq[0] = f.x, xq[1] = f.y, xq[2] = f.z, xq[3] = f.w;
                            } else {
                                const float2 f = *(const float2 *)(xt + (q >> 1) * 128 + (q & 1) * 2);
                                xq[0] = f.x, xq[1] = f.y;
                            }
#pragma unroll
                            for (int i = 0; i < NW; i++) p[i] = word_dot<FMT>(word_of(wv[u][i], q), xq, p[i]);
                        }
#pragma unroll
                        for (int i = 0; i < NW; i++) {
                            if (FMT == FMT_FP4) p[i] *= 16384.0f; /* undo word_dot's 2^-14 */
                            if (FMT == FMT_BF16) acc[i][t] += p[i];
                            else acc[i][t] = fmaf(p[i], sc[u][i], acc[i][t]);
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
                if (ks == 1) {
                    if (lane == 0 && live[i] && t < a.rows) store_out(a.y, a.y_dtype, t * w.out + g * out_g + nl0 + i, s);
                } else if (lane == 0) {
                    red[warp][i * MT + t] = s;
                }
            }
        if (ks > 1) { /* block-uniform */
            __syncthreads();
            for (int idx = threadIdx.x; idx < fgs * NW * MT; idx += GEMV_THREADS) {
                const int f = idx / (NW * MT), rem = idx - f * (NW * MT), i = rem / MT, t = rem - i * MT;
                const int64_t nl = tl0 + (int64_t)f * NW + i;
                float s = 0.0f;
                for (int k = 0; k < ks; k++) s += red[f * ks + k][rem]; /* a fixed order: deterministic */
                if (t < a.rows && nl < out_g) store_out(a.y, a.y_dtype, t * w.out + g * out_g + nl, s);
            }
            __syncthreads(); /* red is free for the next tile */
        }
    }
}

/* resident blocks of one GEMV instantiation per multiprocessor at the most shared memory it takes,
 * asked once per device */
template <int FMT, int MT>
static int gemv_blocks_per_sm(int dev)
{
    static std::atomic<int> cache[MAX_LT_DEVICES];
    int n = cache[dev].load(std::memory_order_relaxed);
    if (n > 0) return n;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, gemv_kernel<FMT, MT>, GEMV_THREADS, GEMV_X_BYTES) != cudaSuccess ||
        n < 1) {
        cudaGetLastError();
        n = 2; /* what __launch_bounds__ promises */
    }
    cache[dev].store(n, std::memory_order_relaxed);
    return n;
}

/* The plan of one matrix (a.ks, a.grid), from the shape and the device only. ks: the fewest warps
 * per feature group that still give every resident block a tile, while each k-slot keeps at least
 * one vector a lane */
template <int FMT, int MT>
static void gemv_plan(int dev, GemvArgs &a)
{
    constexpr int VEC = GemvShape<FMT, MT>::VEC, NW = GemvShape<FMT, MT>::NW;
    a.out_g = a.w.out / a.w.groups, a.in_g = a.w.in / a.w.groups;
    const int64_t nvec = a.in_g / VEC, resident = (int64_t)dsrtk_multiprocessors(dev) * gemv_blocks_per_sm<FMT, MT>(dev);
    auto tiles = [&](int ks) { return ceil_div(a.out_g, (int64_t)(GEMV_WARPS / ks) * NW) * a.w.groups; };
    a.ks = 1;
    while (a.ks < GEMV_WARPS && tiles(a.ks) < resident && (int64_t)a.ks * 2 * 32 <= nvec) a.ks *= 2;
    a.ntiles = tiles(a.ks), a.tpg = a.ntiles / a.w.groups;
    a.grid = (int)(a.ntiles < resident ? a.ntiles : resident);
}

/* y = x · wᵀ for the n (1 or 2) matrices of one format in one launch */
template <int FMT, int MT>
static int launch_gemv_mt(int dev, int n, const GemvArgs *m, cudaStream_t s)
{
    GemvLaunch L = {};
    int64_t kc = 0;
    for (int i = 0; i < n; i++) {
        L.m[i] = m[i];
        gemv_plan<FMT, MT>(dev, L.m[i]);
        if (L.m[i].kc > kc) kc = L.m[i].kc;
    }
    L.split = L.m[0].grid;
    return dsrtk_check(dsrtk_launch_dependent(gemv_kernel<FMT, MT>, dim3((unsigned)(L.m[0].grid + (n > 1 ? L.m[1].grid : 0))),
                                              dim3(GEMV_THREADS), (size_t)MT * (size_t)kc * sizeof(float), s, L),
                       "launch of linear gemv_kernel on cuda:%d", dev);
}

template <int FMT>
static int launch_gemv(int dev, int n, const GemvArgs *m, cudaStream_t s)
{
    switch (gemv_mt(m[0].rows)) {
    case 1: return launch_gemv_mt<FMT, 1>(dev, n, m, s);
    case 2: return launch_gemv_mt<FMT, 2>(dev, n, m, s);
    case 4: return launch_gemv_mt<FMT, 4>(dev, n, m, s);
    default: return launch_gemv_mt<FMT, 8>(dev, n, m, s);
    }
}

/* the CUDA-core GEMV's arguments for one matrix (the grid comes from gemv_plan) */
static GemvArgs gemv_args(const dsrtk_linear_weight *w, const void *x, int x_dtype, int64_t rows, int quantise, int64_t kc,
                          void *y, int y_dtype)
{
    GemvArgs a = {};
    a.w = *w, a.x = x, a.x_dtype = x_dtype, a.quantise = quantise, a.rows = rows, a.kc = kc, a.y = y, a.y_dtype = y_dtype;
    a.vpb_shift = -1;
    if (w->format != FMT_BF16) {
        int64_t vpb = w->block_cols / vec_of(w->format);
        if ((vpb & (vpb - 1)) == 0)
            for (a.vpb_shift = 0; ((int64_t)1 << a.vpb_shift) < vpb; a.vpb_shift++) {}
    }
    return a;
}

/* one matrix, the instantiation for its weights' format (pairs are bf16 only: dsrtk_linear_pair
 * launches them itself) */
static int launch_gemv_one(int dev, const GemvArgs *m, cudaStream_t s)
{
    if (m->w.format == FMT_FP8) return launch_gemv<FMT_FP8>(dev, 1, m, s);
    if (m->w.format == FMT_FP4) return launch_gemv<FMT_FP4>(dev, 1, m, s);
    return launch_gemv<FMT_BF16>(dev, 1, m, s);
}

/* ---- the decode GEMV on FP8 tensor cores (fp8mma.cuh) ---- */

/* What the tensor-core GEMV reads, every derived size computed on the host (32-bit where the
 * sizes allow: mma_gemv_fits), so a warp spends its instructions on the weights */
struct MmaGemvArgs {
    const void *weight, *scale, *x;
    void *y;
    int x_dtype, y_dtype, rows;
    int groups, out, out_g, in, in_g;
    int tpg, nchunk, nblk, ks, teams, rounds, block_rows;
    int ld;                                  /* the staging pitch in halves */
    int64_t row_bytes, scale_ld0, scale_ld1;
    int chunk_shift;                            /* log2 of the 64-column chunks per scale block */
};

/* One launch for one matrix, or for two that read the same x (attention's wq_a and wkv): blocks
 * below split serve m[0] as a launch of its own would (the same plan, so the same bits), the rest
 * m[1]; the second launch's ramp and tail are saved */
struct MmaGemvLaunch {
    MmaGemvArgs m[2];
    int split, grid[2];
};

/* Persistent: a block of its matrix serves one group (block % groups) and stages that group's
 * activation once. Its MMA_WARPS warps form teams of ks; a team takes the group's 16-row tiles
 * team_id, team_id + teams, ..., its warps split each tile's 64-column chunks, and mma_stream walks
 * them with the weight loads of the next step always in flight. The first loads go out before the
 * staging. ks and the grid depend on the shape and the device only, so a token's result does not
 * depend on how many tokens share the call. */
template <int FMT, int SF, bool Q8>
__global__ void __launch_bounds__(MMA_WARPS * 32) mma_gemv_kernel(const __grid_constant__ MmaGemvLaunch L)
{
    constexpr int U = MmaDepth<FMT>::U;
    extern __shared__ uint4 smem4[];
    const int second = (int)blockIdx.x >= L.split, block = (int)blockIdx.x - (second ? L.split : 0), grid = L.grid[second];
    const MmaGemvArgs &a = L.m[second];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gq = lane >> 2, q = lane & 3;
    const int team = warp / a.ks, kslot = warp - team * a.ks;
    const int g = block % a.groups, team_id = block / a.groups * a.teams + team;
    const int n_teams = grid / a.groups * a.teams;
    const int my_tiles = team_id < a.tpg ? (a.tpg - team_id + n_teams - 1) / n_teams : 0;
    __half *xq = (__half *)smem4;
    float *xsc = (float *)(xq + (a.rows + 1) * a.ld), *red = xsc + (a.rows + 1) * a.nblk;
    auto rows_of = [&](int tile) {
        const int ra = (team_id + tile * n_teams) * MMA_ROWS + gq, rb = ra + 8;
        const int na = g * a.out_g + (ra < a.out_g ? ra : 0), nb = g * a.out_g + (rb < a.out_g ? rb : 0);
        return mma_rows_at<FMT, SF>((const char *)a.weight + na * a.row_bytes, (const char *)a.weight + nb * a.row_bytes,
                                    a.scale, na / a.block_rows * a.scale_ld0, nb / a.block_rows * a.scale_ld0, a.scale_ld1,
                                    a.chunk_shift, q);
    };

    /* launched dependent (common.cuh): the first two steps' weights head for L2 while the
     * producer of x finishes, then the loads and the staging */
    MmaStep<FMT> buf[2][U];
    if (my_tiles) mma_prefetch<FMT>(rows_of(0), kslot * U, 2 * U, a.nchunk, q);
    dsrtk_wait_producer();
    if (my_tiles) mma_load<FMT, SF, U>(rows_of(0), buf[0], kslot * U, a.nchunk);
    const int64_t x0 = (int64_t)g * a.in_g;
    const bool vec = (uintptr_t)a.x % 16 == 0 && a.in % 4 == 0 && a.in_g % ACT_BLOCK == 0; /* x0 then too */
    auto row_at = [&](int t) { return (int64_t)t * a.in + x0; };
    if (a.x_dtype == DSRT_BF16) mma_stage<FMT, Q8>(a.rows, a.in_g, a.ld, xq, xsc, a.x, DSRT_BF16, vec, row_at);
    else mma_stage<FMT, true>(a.rows, a.in_g, a.ld, xq, xsc, a.x, DSRT_F32, vec, row_at); /* f32 inputs come quantised (mma_gemv_fits) */
    __syncthreads();

    const int t0 = 2 * q, t1 = 2 * q + 1;
    const MmaX x = mma_x(xq + (gq < a.rows ? gq : a.rows) * a.ld, xsc + (t0 < a.rows ? t0 : a.rows) * a.nblk,
                         xsc + (t1 < a.rows ? t1 : a.rows) * a.nblk);
    float *team_red = red + team * a.ks * (MMA_ROWS * MMA_TOKENS);
    mma_stream<FMT, SF, U>(buf, my_tiles, a.rounds, a.ks, kslot, a.nchunk, q, x, rows_of, [&](int tile, const float(&acc)[4]) {
        const int r0 = (team_id + tile * n_teams) * MMA_ROWS;
        mma_team_finish(acc, a.ks, team, kslot, team_red, a.rows, [&](int rr, int t, float v) {
            if (r0 + rr < a.out_g) store_out(a.y, a.y_dtype, (int64_t)t * a.out + g * a.out_g + r0 + rr, v);
        });
    });
}

/* Resident blocks of one instantiation per multiprocessor at `smem` bytes, asked once per device
 * and size. (One value per device once served every size: whichever matrix a process planned first
 * set the occupancy, and with it the K split and so the sums' order, of all the others.) */
template <int FMT, int SF, bool Q8>
static int mma_blocks_per_sm(int dev, size_t smem)
{
    enum { SIZES = 16 };                                       /* the distinct staging sizes a model plans */
    static std::atomic<uint64_t> cache[MAX_LT_DEVICES][SIZES]; /* smem << 8 | blocks; 0: free */
    for (int i = 0; i < SIZES; i++) {
        const uint64_t e = cache[dev][i].load(std::memory_order_acquire);
        if (!e) break;
        if (e >> 8 == smem) return (int)(e & 255);
    }
    int n;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, mma_gemv_kernel<FMT, SF, Q8>, MMA_WARPS * 32, smem) != cudaSuccess || n < 1) {
        cudaGetLastError();
        n = 1;
    }
    if (n > 255) n = 255;
    for (int i = 0; i < SIZES; i++) { /* a full table only costs the query again next time */
        uint64_t e = 0;
        if (cache[dev][i].compare_exchange_strong(e, (uint64_t)smem << 8 | (uint64_t)n) || e >> 8 == smem) break;
    }
    return n;
}

/* The plan of one matrix: its kernel arguments and blocks, from the shape and the device only
 * (never the rows, so a token's sums do not depend on how many share the call): blocks that fit
 * with MMA_PLAN_TOKENS tokens staged, and the smallest team that still gives half the resident
 * warps work (measured on the H200: a team that splits a tile in two costs its reduction more than
 * the idle warps). More tokens (up to MMA_TOKENS) run the same plan, in two waves where their
 * staging leaves one block a multiprocessor (wo_b's 8192 columns: 147 KB for 8 tokens, 82 KB
 * for 4). */
enum { MMA_PLAN_TOKENS = 4 }; /* decode, and a verify of up to 3 drafts */
template <int FMT, int SF, bool Q8>
static MmaGemvArgs mma_gemv_plan(int dev, const dsrtk_linear_weight *w, const void *x, int x_dtype, int64_t rows, void *y,
                                 int y_dtype, int *blocks)
{
    MmaGemvArgs a = {};
    a.weight = w->weight, a.scale = w->scale, a.x = x, a.y = y;
    a.x_dtype = x_dtype, a.y_dtype = y_dtype, a.rows = (int)rows;
    a.groups = w->groups, a.out = (int)w->out, a.out_g = (int)(w->out / w->groups), a.in = (int)w->in, a.in_g = (int)(w->in / w->groups);
    a.tpg = (int)ceil_div(a.out_g, MMA_ROWS), a.nchunk = a.in_g / MMA_CHUNK, a.nblk = (int)ceil_div(a.in_g, ACT_BLOCK);
    a.block_rows = (int)w->block_rows;
    a.ld = (int)mma_staged_ld(FMT, a.in_g), a.row_bytes = FMT == FMT_FP4 ? w->ld / 2 : w->ld;
    a.scale_ld0 = w->scale_ld0, a.scale_ld1 = w->scale_ld1;
    for (a.chunk_shift = 0; ((int64_t)MMA_CHUNK << a.chunk_shift) < w->block_cols; a.chunk_shift++) {}
    const size_t planned = mma_smem(FMT, a.in_g, MMA_PLAN_TOKENS, MMA_WARPS);
    const int64_t resident = (int64_t)dsrtk_multiprocessors(dev) * mma_blocks_per_sm<FMT, SF, Q8>(dev, planned);
    a.ks = 1;
    while (a.ks < MMA_WARPS && (int64_t)a.tpg * a.groups * a.ks * 2 < resident * MMA_WARPS && a.ks * 2 <= a.nchunk) a.ks *= 2;
    a.teams = MMA_WARPS / a.ks;
    a.rounds = (int)ceil_div(ceil_div(a.nchunk, a.ks), MmaDepth<FMT>::U);
    int64_t per_group = resident / a.groups;
    const int64_t needed = ceil_div((int64_t)a.tpg * a.ks, MMA_WARPS);
    if (per_group > needed) per_group = needed;
    if (per_group < 1) per_group = 1;
    *blocks = (int)(per_group * a.groups);
    return a;
}

/* y[i] = x · w[i]ᵀ for the n (1 or 2) matrices of one format and scale type, one launch */
template <int FMT, int SF, bool Q8>
static int launch_mma_gemv(int dev, int n, const dsrtk_linear_weight *const *w, const void *x, int x_dtype, int64_t rows,
                           void *const *y, int y_dtype, cudaStream_t s)
{
    int st = dsrtk_allow_shared(dev, (const void *)mma_gemv_kernel<FMT, SF, Q8>, MMA_MAX_SMEM, "linear mma_gemv_kernel");
    if (st) return st;
    MmaGemvLaunch L = {};
    size_t smem = 0;
    for (int i = 0; i < n; i++) {
        L.m[i] = mma_gemv_plan<FMT, SF, Q8>(dev, w[i], x, x_dtype, rows, y[i], y_dtype, &L.grid[i]);
        const size_t need = mma_smem(FMT, L.m[i].in_g, rows, MMA_WARPS);
        if (need > smem) smem = need;
    }
    L.split = L.grid[0];
    return dsrtk_check(dsrtk_launch_dependent(mma_gemv_kernel<FMT, SF, Q8>, dim3((unsigned)(L.grid[0] + (n > 1 ? L.grid[1] : 0))),
                                              dim3(MMA_WARPS * 32), smem, s, L),
                       "launch of linear mma_gemv_kernel on cuda:%d", dev);
}

/* the instantiation for the weights' format and scales (w[0]'s: the same for every matrix) and the
 * activation's treatment */
static int launch_mma(int dev, int n, const dsrtk_linear_weight *const *w, const void *x, int x_dtype, int64_t rows,
                      int quantise, void *const *y, int y_dtype, cudaStream_t s)
{
    if (w[0]->format == FMT_FP4) return launch_mma_gemv<FMT_FP4, DSRT_F8E8M0, true>(dev, n, w, x, x_dtype, rows, y, y_dtype, s);
    if (w[0]->scale_dtype == DSRT_F32)
        return quantise ? launch_mma_gemv<FMT_FP8, DSRT_F32, true>(dev, n, w, x, x_dtype, rows, y, y_dtype, s)
                        : launch_mma_gemv<FMT_FP8, DSRT_F32, false>(dev, n, w, x, x_dtype, rows, y, y_dtype, s);
    return quantise ? launch_mma_gemv<FMT_FP8, DSRT_F8E8M0, true>(dev, n, w, x, x_dtype, rows, y, y_dtype, s)
                    : launch_mma_gemv<FMT_FP8, DSRT_F8E8M0, false>(dev, n, w, x, x_dtype, rows, y, y_dtype, s);
}

/* ---- bf16 weights on the tensor cores (1..8 rows, wide outputs: the LM head) ----
 *
 * Why: the CUDA-core GEMV reads the 1 GB head at the copy rate at one row, but from two rows on it
 * is bound by its FMAs, one a weight a token (472-499 us at 3 rows against 252 at 1, ncu, H200),
 * which a speculative verify pays every round. mma.sync takes bf16 as it is stored.
 *
 * The loads are the CUDA-core GEMV's: a warp instruction reads 512 contiguous bytes of one weight
 * row (lane L columns 8L..8L+7 of a 256-column super-chunk). fp8mma.cuh's fragment order (8 rows x
 * 64 bytes an instruction) read the head at 3.5-3.8 TB/s against its 4.2 (ncu, H200). The
 * fragments follow from choosing what the mma's rows and columns mean. An m16n8k16 over rows j
 * (a0, a2) and j + 1 (a1, a3) takes lane (g, q)'s words as its k-slots, so its logical row g is
 * "row j, eighth g of the super-chunk" (columns 32g.., which lane group g holds), and B's column n
 * is the token's x at eighth n (lane (n, q) reads the x columns it loaded weights for). C[g, n] is
 * row j's partial over eighth g where n = g, C[g + 8, g] row j + 1's; the other entries mix
 * eighths and are never read. So: one mma per token, row pair and 16 columns of each eighth, and a
 * tile's eight partials meet by shuffles in a fixed order. Tokens never share an mma: a token's
 * result does not depend on how many share the call (speculative verify against plain decoding).
 *
 * Numerics: bf16 weight times bf16 activation products are exact in fp32; f32 activations come as
 * three bf16 planes whose sum is x exactly (stage_planes), each its own mma into the same
 * accumulator. y is the CPU's Σ W·x with the fp32 additions in another order. */

/* Token t's activation as P bf16 rows whose sum is x exactly, plane p at xs + (t·P + p)·pitch,
 * group g's columns from g·ldg; zeros up to ldg (a super-chunk past a group's end multiplies zero
 * weights by them: never inf or NaN) and for the tokens from rows to MT (computed, never stored).
 * Three planes for f32: v's 24 significant bits cut (not rounded, so nothing overflows) into
 * 8 + 8 + 8, hi = v with its low 16 bits cleared, mid the same of v - hi, lo = v - hi - mid, each
 * difference exact in f32. A non-finite v stays in hi (inf - inf would put NaN in the others). */
template <int MT, int P>
__device__ __forceinline__ void stage_planes(const Bf16MmaArgs &a, uint16_t *xs)
{
    /* BATCH elements a thread loaded before any is stored, from a pointer of the input's type: one
     * memory round trip per batch (a load a round trip, through dsrt_load_f32's dtype switch,
     * made the head's staging ~16 of them) */
    enum { BATCH = 8 };
    const int per_row = a.groups * a.ldg, n = MT * per_row;
    const bool bf16 = a.x_dtype == DSRT_BF16;
    for (int i0 = threadIdx.x; i0 < n; i0 += BATCH * blockDim.x) {
        float v[BATCH];
#pragma unroll
        for (int b = 0; b < BATCH; b++) {
            const int i = i0 + b * blockDim.x, t = i / per_row, gc = i - t * per_row, g = gc / a.ldg, c = gc - g * a.ldg;
            const int64_t at = (int64_t)t * a.in + (int64_t)g * a.in_g + c;
            const bool real = i < n && t < a.rows && c < a.in_g;
            v[b] = !real ? 0.0f : bf16 ? dsrt_bf16_to_f32(((const uint16_t *)a.x)[at]) : ((const float *)a.x)[at];
        }
#pragma unroll
        for (int b = 0; b < BATCH; b++) {
            const int i = i0 + b * blockDim.x, t = i / per_row, gc = i - t * per_row;
            if (i >= n) break;
            uint16_t *at = xs + t * P * a.pitch + gc;
            float x = v[b];
#pragma unroll
            for (int p = 0; p < P; p++, at += a.pitch) {
                const bool finite = isfinite(x);
                const uint16_t h = finite ? (uint16_t)(dsrt_f32_bits(x) >> 16) : dsrt_f32_to_bf16(x);
                *at = h;
                x = finite ? x - dsrt_bf16_to_f32(h) : 0.0f;
            }
        }
    }
}

/* MT tokens (rows of them real), P planes: the loops over both unrolled, no branch in the walk */
template <int MT, int P>
__global__ void __launch_bounds__(GEMV_THREADS) bf16_mma_kernel(const __grid_constant__ Bf16MmaArgs a)
{
    constexpr int SC = Bf16Shape<MT>::SC;
    extern __shared__ uint4 smem4[];
    uint16_t *xs = (uint16_t *)smem4;
    const int lane = threadIdx.x & 31, g8 = lane >> 2, q = lane & 3;
    const int warp = (int)blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5), warps = (int)gridDim.x * GEMV_WARPS;
    const int my_pairs = warp < a.n_pairs ? (a.n_pairs - warp + warps - 1) / warps : 0;
    /* row pair i of the warp: its group and first row (a row past the group reads row j instead:
     * real bytes, never emitted) */
    auto pair_at = [&](int i, int &g, int &j) {
        const int p = warp + i * warps;
        g = p / a.pairs_g, j = (p - g * a.pairs_g) * 2;
    };
    auto row_ptr = [&](int g, int j) { return a.weight + ((int64_t)g * a.out_g + j) * a.row_bytes; };
    typedef uint4 Step[SC][2];
    Step buf[2];
    const char *rows[2] = {nullptr, nullptr};
    int pg = 0, pj = 0;
    auto load = [&](Step &b, int i, int round) {
        if (round == 0) {
            pair_at(i, pg, pj);
            rows[0] = row_ptr(pg, pj), rows[1] = row_ptr(pg, pj + 1 < a.out_g ? pj + 1 : pj);
        }
#pragma unroll
        for (int s = 0; s < SC; s++) {
            const int c = (round * SC + s) * SUPER + 8 * lane;
            const bool in = c < a.in_g;
#pragma unroll
            for (int k = 0; k < 2; k++) b[s][k] = in ? load_stream(rows[k] + (int64_t)c * 2) : make_uint4(0, 0, 0, 0);
        }
    };
    if (my_pairs) { /* launched dependent (common.cuh): the first step heads for L2 meanwhile */
        int g, j;
        pair_at(0, g, j);
        if ((lane & 7) == 0)
            for (int s = 0; s < SC && s * SUPER + 8 * lane < a.in_g; s++)
                for (int k = 0; k < 2 && j + k < a.out_g; k++) dsrtk_prefetch_l2(row_ptr(g, j + k) + (s * SUPER + 8 * lane) * 2);
    }
    dsrtk_wait_producer();
    if (my_pairs) load(buf[0], 0, 0);
    stage_planes<MT, P>(a, xs);
    __syncthreads();

    float acc[MT][4] = {};
    int ug = 0, uj = 0; /* the pair use() works on */
    const uint32_t xs_at = (uint32_t)__cvta_generic_to_shared(xs) + 16 * lane, plane_bytes = 2 * a.pitch;
    uint32_t x0 = 0; /* the lane's x of the pair's group, super-chunk 0 */
    walk_two_buffers(buf, my_pairs, a.rounds, load, [&](const Step &b, int i, int round) {
        if (round == 0) pair_at(i, ug, uj), x0 = xs_at + 2 * ug * a.ldg;
#pragma unroll
        for (int s = 0; s < SC; s++) {
            const int sc = round * SC + s;
            if (sc * SUPER >= a.in_g) break; /* warp-uniform */
#pragma unroll
            for (int t = 0; t < MT; t++)
#pragma unroll
                for (int p = 0; p < P; p++) {
                    const uint4 xv = lds_u128(x0 + (t * P + p) * plane_bytes + 2 * sc * SUPER);
                    mma_bf16(acc[t], b[s][0].x, b[s][1].x, b[s][0].y, b[s][1].y, xv.x, xv.y);
                    mma_bf16(acc[t], b[s][0].z, b[s][1].z, b[s][0].w, b[s][1].w, xv.z, xv.w);
                }
        }
        if (round < a.rounds - 1) return;
        /* C[g, g] (row j) and C[g + 8, g] (row j + 1) sit in lane (g, g / 2), element g % 2 */
        const bool mine = q == g8 >> 1;
#pragma unroll
        for (int t = 0; t < MT; t++) {
            float v0 = mine ? (g8 & 1 ? acc[t][1] : acc[t][0]) : 0.0f, v1 = mine ? (g8 & 1 ? acc[t][3] : acc[t][2]) : 0.0f;
#pragma unroll
            for (int off = 16; off; off >>= 1) {
                v0 += __shfl_xor_sync(0xffffffffu, v0, off);
                v1 += __shfl_xor_sync(0xffffffffu, v1, off);
            }
            const int64_t at = (int64_t)t * a.out + (int64_t)ug * a.out_g + uj;
            if (lane == 0 && t < a.rows) store_out(a.y, a.y_dtype, at, v0);
            if (lane == 1 && t < a.rows && uj + 1 < a.out_g) store_out(a.y, a.y_dtype, at + 1, v1);
            acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;
        }
    });
}

template <int MT, int P>
static int launch_bf16_mma_mt(int dev, Bf16MmaArgs a, cudaStream_t s)
{
    a.rounds = (int)ceil_div(a.ldg / SUPER, Bf16Shape<MT>::SC); /* the same super-chunks in the same order at any MT */
    static std::atomic<int> ready[MAX_LT_DEVICES]; /* blocks a multiprocessor, once the opt-in is made */
    int per_sm = ready[dev].load(std::memory_order_relaxed);
    if (!per_sm) {
        int st = dsrtk_check(cudaFuncSetAttribute(bf16_mma_kernel<MT, P>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                  (int)BF16_MMA_MAX_SMEM),
                             "linear: %zu bytes of shared memory for the bf16 tensor-core GEMV", BF16_MMA_MAX_SMEM);
        if (st) return st;
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, bf16_mma_kernel<MT, P>, GEMV_THREADS, BF16_MMA_MAX_SMEM) !=
                cudaSuccess || per_sm < 1) {
            cudaGetLastError();
            per_sm = 1;
        }
        ready[dev].store(per_sm, std::memory_order_relaxed);
    }
    const int64_t blocks = ceil_div(a.n_pairs, GEMV_WARPS), resident = (int64_t)dsrtk_multiprocessors(dev) * per_sm;
    return dsrtk_check(dsrtk_launch_dependent(bf16_mma_kernel<MT, P>, dim3((unsigned)(blocks < resident ? blocks : resident)),
                                              dim3(GEMV_THREADS), bf16_smem(a.groups, a.in_g, P, MT), s, a),
                       "launch of linear bf16_mma_kernel on cuda:%d", dev);
}

static int launch_bf16_mma(int dev, const dsrtk_linear_weight *w, const void *x, int x_dtype, int64_t rows, void *y,
                           int y_dtype, cudaStream_t s)
{
    Bf16MmaArgs a = {};
    a.weight = (const char *)w->weight, a.x = x, a.y = y;
    a.x_dtype = x_dtype, a.y_dtype = y_dtype, a.rows = (int)rows;
    a.groups = (int)w->groups, a.out = (int)w->out, a.out_g = (int)(w->out / w->groups), a.in = (int)w->in;
    a.in_g = (int)(w->in / w->groups);
    a.ldg = (int)bf16_ldg(a.in_g), a.pitch = a.groups * a.ldg;
    a.pairs_g = (a.out_g + 1) / 2, a.n_pairs = a.pairs_g * a.groups;
    a.row_bytes = w->ld * 2;
    const int mt = gemv_mt(rows);
    if (bf16_planes(x_dtype) == 1)
        return mt == 1 ? launch_bf16_mma_mt<1, 1>(dev, a, s) : mt == 2 ? launch_bf16_mma_mt<2, 1>(dev, a, s)
             : mt == 4 ? launch_bf16_mma_mt<4, 1>(dev, a, s) : launch_bf16_mma_mt<8, 1>(dev, a, s);
    return mt == 1 ? launch_bf16_mma_mt<1, 3>(dev, a, s) : mt == 2 ? launch_bf16_mma_mt<2, 3>(dev, a, s)
         : mt == 4 ? launch_bf16_mma_mt<4, 3>(dev, a, s) : launch_bf16_mma_mt<8, 3>(dev, a, s);
}

/* ---- the tiled kernel ---- */

enum { TM = 64, TN = 64, TK = 16 };

struct TiledArgs {
    dsrtk_linear_weight w;
    const void *x; /* bf16 or f32 [rows, in] with row stride x_ld */
    int x_dtype;
    int64_t x_ld, rows;
    void *y;
    int y_dtype;
    const unsigned *only_if; /* when set, the kernel runs only if *only_if != 0 (the exactness fallback) */
};

/* grid (out_g / TN, rows / TM, groups); thread (tx, ty) computes outputs (ty + 16i, tx + 16j) */
__global__ void __launch_bounds__(DSRTK_BLOCK) tiled_kernel(const __grid_constant__ TiledArgs a)
{
    if (a.only_if && *a.only_if == 0) return; /* block-uniform, before any barrier */
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
            as[k][m] = gm < a.rows && gk < in_g ? dsrt_load_f32(a.x, a.x_dtype, gm * a.x_ld + g * in_g + gk) : 0.0f;
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

/* ---- prefill through cuBLAS: weight slabs and rounding ---- */

struct DequantArgs {
    dsrtk_linear_weight w;
    int64_t row0, nrows; /* weight rows row0 .. row0 + nrows - 1 (global rows; columns are group-local) */
    void *dst;           /* [nrows, in_g], bf16 or f32 */
    unsigned *inexact;   /* bf16: set to 1 when some W·S is not a bf16 value (NaN aside) */
};

/* dst = W·S of the slab, each element exactly as weight_at (the CPU's dequantise_transposed)
 * computes it, then (bf16) rounded, which is exact when the value is a bf16 value; the flag says
 * when it is not. One thread per run of 8 columns: one scale look-up for the run when it lies in
 * one scale block (always, for 1x32 and 128x128 blocks), one 16-byte store (bf16) or two (f32).
 * Bytes: 1 (fp8) / 0.5 (fp4) / 2 (bf16) read and 2 or 4 written per element. */
template <bool BF16>
__global__ void __launch_bounds__(DSRTK_BLOCK) dequant_kernel(const __grid_constant__ DequantArgs a)
{
    const dsrtk_linear_weight &w = a.w;
    const int64_t in_g = w.in / w.groups, runs = ceil_div(in_g, 8), units = a.nrows * runs;
    const uint8_t *codes = (const uint8_t *)w.weight;
    for (int64_t u = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; u < units; u += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = u / runs, c0 = (u - r * runs) * 8, n = a.row0 + r;
        const int len = in_g - c0 < 8 ? (int)(in_g - c0) : 8;
        int64_t srow = 0, sb = 0;
        float s0 = 1.0f;
        bool one = true;
        if (w.scale) {
            srow = n / w.block_rows * w.scale_ld0;
            sb = c0 / w.block_cols;
            one = (c0 + len - 1) / w.block_cols == sb;
            s0 = dsrt_load_f32(w.scale, w.scale_dtype, srow + sb * w.scale_ld1);
        }
        float v[8];
        if (w.format == FMT_FP8 && one && len == 8 && w.ld % 8 == 0 && (uintptr_t)codes % 8 == 0) {
            /* a whole run of e4m3 codes: one 8-byte load, the hardware's exact e4m3 -> f16 (NaN
             * kept) where dsrt_e4m3_to_f32 decodes bit by bit (a prefill's wo_a slabs: 17 us a
             * call at ~0.7 TB/s) */
            const uint2 c = *(const uint2 *)(codes + n * w.ld + c0);
            const uint32_t h[4] = {e4m3x2_to_f16x2(c.x & 0xffffu), e4m3x2_to_f16x2(c.x >> 16), e4m3x2_to_f16x2(c.y & 0xffffu),
                                   e4m3x2_to_f16x2(c.y >> 16)};
#pragma unroll
            for (int e = 0; e < 8; e++) v[e] = __half2float(__ushort_as_half((unsigned short)(h[e >> 1] >> (16 * (e & 1))))) * s0;
        } else {
#pragma unroll
            for (int e = 0; e < 8; e++) {
                if (e >= len) {
                    v[e] = 0.0f;
                    continue;
                }
                const int64_t i = n * w.ld + c0 + e;
                float x;
                if (w.format == FMT_BF16) x = dsrt_bf16_to_f32(((const uint16_t *)w.weight)[i]);
                else if (w.format == FMT_FP8) x = dsrt_e4m3_to_f32(codes[i]);
                else x = dsrt_fp4_to_f32((uint8_t)((codes[i >> 1] >> ((i & 1) * 4)) & 15u));
                if (w.scale) x *= one ? s0 : dsrt_load_f32(w.scale, w.scale_dtype, srow + ((c0 + e) / w.block_cols) * w.scale_ld1);
                v[e] = x;
            }
        }
        const int64_t at = r * in_g + c0;
        if (BF16) {
            uint16_t b[8];
            bool bad = false;
#pragma unroll
            for (int e = 0; e < 8; e++) {
                b[e] = dsrt_f32_to_bf16(v[e]);
                const float back = dsrt_bf16_to_f32(b[e]);
                if (back != v[e] && v[e] == v[e]) bad = true;
            }
            if (bad) atomicOr(a.inexact, 1u);
            uint16_t *d = (uint16_t *)a.dst + at;
            if (len == 8 && in_g % 8 == 0) {
                *(uint4 *)d = make_uint4(b[0] | (uint32_t)b[1] << 16, b[2] | (uint32_t)b[3] << 16, b[4] | (uint32_t)b[5] << 16,
                                         b[6] | (uint32_t)b[7] << 16);
            } else {
                for (int e = 0; e < len; e++) d[e] = b[e];
            }
        } else {
            float *d = (float *)a.dst + at;
            if (len == 8 && in_g % 4 == 0) {
                ((float4 *)d)[0] = make_float4(v[0], v[1], v[2], v[3]);
                ((float4 *)d)[1] = make_float4(v[4], v[5], v[6], v[7]);
            } else {
                for (int e = 0; e < len; e++) d[e] = v[e];
            }
        }
    }
}

/* y (bf16) = the f32 result rounded as the CPU rounds it */
__global__ void __launch_bounds__(DSRTK_BLOCK) round_kernel(const float *c, uint16_t *y, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        y[i] = dsrt_f32_to_bf16(c[i]);
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
    PrepArgs b = a;
    b.vec = act_vec(a.x, a.in) && (a.mode == PREP_CODES ? (uintptr_t)a.codes % 4 == 0 : act_vec(a.dst, a.in));
    const int grid = dsrtk_grid_for(dev, tokens * 32, DSRTK_BLOCK);
    if (b.vec && a.in % (8 * ACT_BLOCK) == 0) prep_kernel<8><<<grid, DSRTK_BLOCK, 0, s>>>(b);
    else prep_kernel<ACT_U><<<grid, DSRTK_BLOCK, 0, s>>>(b);
    return dsrtk_check_launch("linear prep_kernel", dev);
}

/* the activation as [rows, in] f32 or bf16 at dst, Q8 round-tripped when asked */
static int prep_plain(int dev, const dsrtk_linear_weight *w, const void *x, int x_dtype, int64_t rows, int quantise,
                      int mode, void *dst, cudaStream_t s)
{
    PrepArgs a = {};
    a.x = x, a.x_dtype = x_dtype, a.quantise = quantise, a.mode = mode, a.rows = rows, a.in = w->in, a.dst = dst;
    return launch_prep(dev, a, rows, s);
}

static int launch_tiled(int dev, const dsrtk_linear_weight *w, const void *x, int x_dtype, int64_t rows, void *y,
                        int y_dtype, const unsigned *only_if, cudaStream_t s)
{
    TiledArgs a = {};
    a.w = *w, a.x = x, a.x_dtype = x_dtype, a.x_ld = w->in, a.rows = rows, a.y = y, a.y_dtype = y_dtype, a.only_if = only_if;
    int64_t out_g = w->out / w->groups;
    if (ceil_div(rows, TM) > 65535 || w->groups > 65535 || ceil_div(out_g, TN) > INT32_MAX)
        return dsrtk_fail(DSRTK_ERROR, "linear: %lld rows x %lld features is too large a grid", (long long)rows,
                          (long long)w->out);
    dim3 grid((unsigned)ceil_div(out_g, TN), (unsigned)ceil_div(rows, TM), (unsigned)w->groups);
    tiled_kernel<<<grid, DSRTK_BLOCK, 0, s>>>(a);
    return dsrtk_check_launch("linear tiled_kernel", dev);
}

static int run_tiled(int dev, const dsrtk_linear_weight *w, const void *x, int x_dtype, int64_t rows, int quantise,
                     void *y, int y_dtype, char *ws, cudaStream_t s)
{
    if (x_dtype == DSRT_F32 && !quantise) return launch_tiled(dev, w, x, DSRT_F32, rows, y, y_dtype, NULL, s);
    int st = prep_plain(dev, w, x, x_dtype, rows, quantise, PREP_F32, ws, s);
    return st ? st : launch_tiled(dev, w, ws, DSRT_F32, rows, y, y_dtype, NULL, s);
}

/* Prefill through cuBLAS (see the top): per group, per slab of weight rows, y[:, slab] = a · slabᵀ,
 * column-major as cuBLAS sees it: C[slab rows, rows] (ldc = out) = Aᵀ B with A the slab [in_g,
 * slab rows] (lda = in_g, or the weight's ld when used as stored) and B = a [in_g, rows] (ldb = in).
 * FLOPs 2·rows·out·in_g on tensor cores (bf16) or CUDA cores (f32); extra bytes: the slab written
 * and read once (2 or 4 per weight element) and the prepared activation. */
static int run_blas(int dev, const dsrtk_linear_weight *w, const void *x, int x_dtype, int64_t rows, int quantise,
                    void *y, int y_dtype, char *ws, const Plan &p, cudaStream_t s)
{
    const int64_t in = w->in, in_g = in / w->groups, out = w->out, out_g = out / w->groups;
    const size_t xe = p.bf16 ? 2 : 4;
    const cudaDataType_t ab_type = p.bf16 ? CUDA_R_16BF : CUDA_R_32F;
    int st;
    const void *a = x;
    if (p.x_prep) {
        if ((st = prep_plain(dev, w, x, x_dtype, rows, quantise, p.bf16 ? PREP_BF16 : PREP_F32, ws + p.x_off, s))) return st;
        a = ws + p.x_off;
    }
    unsigned *inexact = p.bf16 && !p.w_direct ? (unsigned *)(ws + p.flag_off) : NULL;
    if (inexact && (st = dsrtk_check(cudaMemsetAsync(inexact, 0, sizeof *inexact, s), "linear: clearing a flag on cuda:%d", dev)))
        return st;
    void *c = p.y_tmp ? (void *)(ws + p.c_off) : y;
    const int c_dtype = p.y_tmp ? DSRT_F32 : y_dtype;
    const size_t ce = c_dtype == DSRT_F32 ? 4 : 2;
    const int64_t slab = p.w_direct ? out_g : p.slab_rows;
    {
        std::lock_guard<std::mutex> lock(blas_lock(dev)); /* blas.cuh: the shared handle */
        cublasHandle_t h;
        if ((st = blas_handle(dev, s, "linear", &h))) return st;
        const float one = 1.0f, zero = 0.0f;
        for (int64_t g = 0; g < w->groups; g++) {
            for (int64_t r0 = 0; r0 < out_g; r0 += slab) {
                const int64_t nr = out_g - r0 < slab ? out_g - r0 : slab, row0 = g * out_g + r0;
                const void *A;
                int64_t lda;
                if (p.w_direct) {
                    A = (const char *)w->weight + (size_t)(row0 * w->ld) * 2;
                    lda = w->ld;
                } else {
                    DequantArgs d = {};
                    d.w = *w, d.row0 = row0, d.nrows = nr, d.dst = ws + p.w_off, d.inexact = inexact;
                    int grid = dsrtk_grid_for(dev, nr * ceil_div(in_g, 8), DSRTK_BLOCK);
                    if (p.bf16) dequant_kernel<true><<<grid, DSRTK_BLOCK, 0, s>>>(d);
                    else dequant_kernel<false><<<grid, DSRTK_BLOCK, 0, s>>>(d);
                    if ((st = dsrtk_check_launch("linear dequant_kernel", dev))) return st;
                    A = ws + p.w_off;
                    lda = in_g;
                }
                st = blas_check(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, (int)nr, (int)rows, (int)in_g, &one, A, ab_type,
                                             (int)lda, (const char *)a + (size_t)(g * in_g) * xe, ab_type, (int)in, &zero,
                                             (char *)c + (size_t)row0 * ce, c_dtype == DSRT_F32 ? CUDA_R_32F : CUDA_R_16BF,
                                             (int)out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                                "linear", "cublasGemmEx", dev);
                if (st) return st;
            }
        }
    }
    if (p.y_tmp) {
        round_kernel<<<dsrtk_grid_for(dev, rows * out, DSRTK_BLOCK), DSRTK_BLOCK, 0, s>>>((const float *)c, (uint16_t *)y,
                                                                                       rows * out);
        if ((st = dsrtk_check_launch("linear round_kernel", dev))) return st;
    }
    /* some W·S was not a bf16 value: the exact kernel recomputes y (a no-op launch otherwise) */
    if (inexact) return launch_tiled(dev, w, a, DSRT_BF16, rows, y, y_dtype, inexact, s);
    return DSRTK_OK;
}

/* The cuBLASLt route of one matrix (plan p, PATH_LT; the caller holds lt_locks[dev]): x's e4m3
 * codes and scales into the workspace (unless `prepped`: a pair's second matrix reads its first's),
 * the weight's scales as cuBLASLt reads them, the GEMM. *taken 0 where cuBLASLt offers no
 * algorithm: y is untouched and the blas route runs in the same workspace. */
static int lt_forward(int dev, const dsrtk_linear_weight *w, const Plan &p, const void *x, int x_dtype, int64_t rows,
                      bool prepped, void *y, char *ws, cudaStream_t s, int *taken)
{
    int st;
    *taken = 0;
    if (!prepped) {
        PrepArgs a = {};
        a.x = x, a.x_dtype = x_dtype, a.quantise = 1, a.mode = PREP_CODES, a.rows = rows, a.in = w->in;
        a.codes = (uint8_t *)(ws + p.codes_off), a.xscale = (float *)(ws + p.xs_off), a.mpad = p.mpad;
        if ((st = launch_prep(dev, a, p.mpad, s))) return st;
    }
    wscale_kernel<<<dsrtk_grid_for(dev, p.nb * p.ldw, DSRTK_BLOCK), DSRTK_BLOCK, 0, s>>>(*w, p.nb, p.kb, p.ldw,
                                                                                         (float *)(ws + p.ws_off));
    if ((st = dsrtk_check_launch("linear wscale_kernel", dev))) return st;
    void *d = p.mpad == rows ? y : (void *)(ws + p.d_off);
    if ((st = lt_matmul(dev, w, p, ws, d, s, taken)) || !*taken || d == y) return st;
    /* the first `rows` rows of the padded row-major result are y */
    return dsrtk_check(cudaMemcpyAsync(y, d, (size_t)(rows * w->out) * 2, cudaMemcpyDeviceToDevice, s),
                       "linear: copy of %lld rows of the fp8 GEMM on cuda:%d", (long long)rows, dev);
}

/* whether both matrices take the cuBLASLt route over one input (same rows, so the same padding),
 * whose codes then serve both; their plans in lp. Decode's rows make no plans. */
static bool lt_pair(const dsrtk_linear_weight *w0, const dsrtk_linear_weight *w1, int64_t rows, int x_dtype, int quantise,
                    int y_dtype, Plan (&lp)[2])
{
    if (rows <= GEMV_MAX_ROWS || w0->in != w1->in) return false;
    make_plan(w0, rows, x_dtype, quantise, y_dtype, &lp[0]);
    make_plan(w1, rows, x_dtype, quantise, y_dtype, &lp[1]);
    return lp[0].path == PATH_LT && lp[1].path == PATH_LT;
}

int dsrtk_linear_pair_workspace(int dev, const dsrtk_linear_weight *w0, const dsrtk_linear_weight *w1, int64_t rows,
                                int x_dtype, int quantise, int y_dtype, size_t *bytes)
{
    (void)dev;
    *bytes = 0;
    int st = check_args(w0, rows, x_dtype, y_dtype);
    if (st || (st = check_args(w1, rows, x_dtype, y_dtype))) return st;
    Plan lp[2];
    if (lt_pair(w0, w1, rows, x_dtype, quantise, y_dtype, lp)) *bytes = lp[0].total > lp[1].total ? lp[0].total : lp[1].total;
    return DSRTK_OK;
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
        if (bf16_mma_fits(w, rows, quantise, x_dtype)) return launch_bf16_mma(dev, w, x, x_dtype, rows, y, y_dtype, s);
        if (mma_gemv_fits(w, rows, quantise, x_dtype)) return launch_mma(dev, 1, &w, x, x_dtype, rows, quantise, &y, y_dtype, s);
        const GemvArgs a = gemv_args(w, x, x_dtype, rows, quantise, p.kc, y, y_dtype);
        return launch_gemv_one(dev, &a, s);
    }
    if (p.path == PATH_TILED) return run_tiled(dev, w, x, x_dtype, rows, quantise, y, y_dtype, ws, s);

    if (p.path == PATH_LT) {
        std::lock_guard<std::mutex> lock(lt_locks[dev]);
        int taken = 0;
        if ((st = lt_forward(dev, w, p, x, x_dtype, rows, false, y, ws, s, &taken)) || taken) return st;
    }
    return run_blas(dev, w, x, x_dtype, rows, quantise, y, y_dtype, ws, p, s);
}

int dsrtk_linear_pair(int dev, const dsrtk_linear_weight *w0, const dsrtk_linear_weight *w1, const void *x, int x_dtype,
                      int64_t rows, int quantise, void *y0, void *y1, int y_dtype, void *workspace, size_t workspace_bytes,
                      void *stream, int *launched)
{
    *launched = 0;
    int st = check_args(w0, rows, x_dtype, y_dtype);
    if (st || (st = check_args(w1, rows, x_dtype, y_dtype))) return st;
    if (w0->in != w1->in) return dsrtk_fail(DSRTK_ERROR, "linear: a pair must read the same input (%lld and %lld features)",
                                            (long long)w0->in, (long long)w1->in);
    if (dev < 0 || dev >= MAX_LT_DEVICES) return dsrtk_fail(DSRTK_ERROR, "linear: no device cuda:%d", dev);
    if (rows == 0) return DSRTK_OK;
    const dsrtk_linear_weight *w[2] = {w0, w1};
    void *y[2] = {y0, y1};
    cudaStream_t s = (cudaStream_t)stream;
    Plan lp[2];
    if (lt_pair(w0, w1, rows, x_dtype, quantise, y_dtype, lp)) { /* prefill: one Q8 pass of x for both GEMMs */
        const size_t need = lp[0].total > lp[1].total ? lp[0].total : lp[1].total;
        if (workspace_bytes < need || !workspace || (uintptr_t)workspace % 256)
            return dsrtk_fail(DSRTK_ERROR, "linear: pair workspace of %zu bytes at %p, needs %zu bytes 256-byte aligned",
                              workspace_bytes, workspace, need);
        DSRTK_SET_DEVICE(dev, "linear");
        char *ws = (char *)workspace;
        int taken = 0;
        {
            std::lock_guard<std::mutex> lock(lt_locks[dev]);
            /* no algorithm for the first: nothing written, the caller runs both alone */
            if ((st = lt_forward(dev, w0, lp[0], x, x_dtype, rows, false, y0, ws, s, &taken)) || !taken) return st;
            *launched = 1;
            if ((st = lt_forward(dev, w1, lp[1], x, x_dtype, rows, true, y1, ws, s, &taken)) || taken) return st;
        }
        return run_blas(dev, w1, x, x_dtype, rows, quantise, y1, y_dtype, ws, lp[1], s);
    }
    /* one launch only where each matrix alone would take the same decode GEMV in one
     * instantiation: the tensor-core one (FP8/FP4) or the CUDA-core one with bf16 weights (a
     * compressor's wkv and wgate; gemv_kernel takes no other pair) */
    if (mma_gemv_fits(w0, rows, quantise, x_dtype) && mma_gemv_fits(w1, rows, quantise, x_dtype) &&
        w0->format == w1->format && w0->scale_dtype == w1->scale_dtype) {
        DSRTK_SET_DEVICE(dev, "linear");
        *launched = 1;
        return launch_mma(dev, 2, w, x, x_dtype, rows, quantise, y, y_dtype, s);
    }
    GemvArgs m[2];
    for (int i = 0; i < 2; i++) {
        Plan p;
        make_plan(w[i], rows, x_dtype, quantise, y_dtype, &p);
        if (p.path != PATH_GEMV || bf16_mma_fits(w[i], rows, quantise, x_dtype) || mma_gemv_fits(w[i], rows, quantise, x_dtype) ||
            w[i]->format != FMT_BF16)
            return DSRTK_OK;
        m[i] = gemv_args(w[i], x, x_dtype, rows, quantise, p.kc, y[i], y_dtype);
    }
    DSRTK_SET_DEVICE(dev, "linear");
    *launched = 1;
    return launch_gemv<FMT_BF16>(dev, 2, m, s); /* both bf16 (above) */
}
