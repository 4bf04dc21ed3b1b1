/*
 * fp8mma.cuh - the FP8 tensor-core dot products of the decode GEMVs (linear.cu, moe.cu): a warp
 * multiplies a tile of 16 weight rows by up to 8 Q8-quantised activation rows with
 * mma.sync m16n8k32 e4m3 x e4m3 -> f32, straight from the weight bytes in registers.
 *
 * Why: a decode GEMV that dequantises each FP8 weight in CUDA cores pays a conversion per weight
 * (cvt e4m3x2 -> f16x2, then f16 -> f32), and Hopper converts 16 values per clock per SM where
 * HBM delivers ~17 weight bytes per clock per SM: the conversions, not the bytes, bounded the old
 * kernels (FP8 GEMVs at 0.1-1.1 TB/s, FP4 experts at 0.5 TB/s on the H200). Here one instruction
 * consumes 512 weights. What this file protects is that the products are the reference's: the Q8
 * activation IS e4m3 codes times a power-of-two block scale (quant.h), FP8 weights are e4m3 codes
 * times their block scale, and FP4 codes are e4m3 codes times 2^6 (below), so
 *     y[n, t] = Σ_blocks ( Σ_k code_w[n, k] · code_x[t, k] ) · s_w(n, block) · s_x(t, block)
 * is the CPU's Σ a·(W·S) with the sum taken in another order: each tensor-core sum covers at most
 * 64 columns inside one scale block (its accumulator keeps fewer than fp32's bits, as in the
 * reference's own FP8 GEMM; DeepSeek-V3 report §3.3.2) and is promoted to fp32 at once.
 *
 * The k-order of an mma is free as long as the A (weights) and B (activations) fragments agree, so
 * each lane feeds the tensor core the bytes it loaded, and the activation codes are staged in the
 * matching order. Fragment layout (PTX ISA, m16n8k32 .e4m3): lane = 4·g + q; A regs a0/a2 hold row
 * g, a1/a3 row g + 8, each 4 k-slots (a0/a1: q·4.., a2/a3: 16 + q·4..); B regs b0/b1 hold token g,
 * k-slots q·4.. and 16 + q·4..; C c0, c1 = (row g, tokens 2q, 2q + 1), c2, c3 = (row g + 8, same).
 *
 * FP4 e2m1 nibble s e1 e0 m becomes the e4m3 byte s 0 0 e1 e0 m 0 0: exponent field e, mantissa m/2,
 * so normal codes read 2^(e-7)(1 + m/2) = e2m1 · 2^-6 and the subnormal (e = 0) reads m/2 · 2^-6
 * too; exact, the 2^6 goes into the scale.
 */
#ifndef DSRT_KERNELS_FP8MMA_CUH
#define DSRT_KERNELS_FP8MMA_CUH

#include <stdint.h>
#include "../runtime/quant.h"

/* c += A·B over 32 k-slots, e4m3 inputs, f32 accumulator */
__device__ __forceinline__ void mma_e4m3(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* The 8 e2m1 nibbles of a word (low nibble = even column) as e4m3 bytes (value · 2^-6): the even
 * columns 0, 2, 4, 6 in `even`, the odd ones in `odd`, byte j of each from byte j of the word. */
__device__ __forceinline__ void fp4_to_e4m3(uint32_t w, uint32_t &even, uint32_t &odd)
{
    even = ((w << 4) & 0x80808080u) | ((w << 2) & 0x1c1c1c1cu);
    odd = (w & 0x80808080u) | ((w >> 2) & 0x1c1c1c1cu);
}
/* the factor fp4_to_e4m3's codes are scaled down by */
#define FP4_AS_E4M3_SCALE 64.0f

/* Where staged activation column c (of an 8-column group) lies for an FP4 matrix: the group's even
 * columns first, then its odd ones, matching fp4_to_e4m3's two words. */
__device__ __forceinline__ int fp4_staged_column(int c) { return (c & ~7) | ((c & 1) << 2) | ((c & 7) >> 1); }

/* FP4 exchange: lane q of a quad loaded the 16 columns [16q, 16q + 16) of a 64-column chunk (two
 * 32-column scale blocks) as words lo, hi. Every mma must stay inside one scale block, so lanes q
 * and q ^ 2 swap a word: afterwards `first` holds 8 columns of block 0 and `second` the same 8
 * columns of block 1, at offset fp4_lane_group(q) in the block. */
__device__ __forceinline__ void fp4_exchange(uint32_t lo, uint32_t hi, int q, uint32_t &first, uint32_t &second)
{
    const uint32_t other = __shfl_xor_sync(0xffffffffu, q < 2 ? hi : lo, 2);
    first = q < 2 ? lo : other;
    second = q < 2 ? other : hi;
}
__device__ __forceinline__ int fp4_lane_group(int q) { return q < 2 ? 16 * q : 16 * (q - 2) + 8; }

/* The Q8 round trip of one block of 128 (or fewer) columns held 4 per lane, exactly as
 * dsrt_q8_block (quant.h) computes it: the same amax, power-of-two scale and e4m3 rounding. v
 * becomes the round-tripped values, code their e4m3 bytes; returns the block's scale. The whole
 * warp calls it. */
__device__ __forceinline__ float q8_block_warp(float (&v)[4], const bool (&ok)[4], uint8_t (&code)[4])
{
    float amax = 1e-4f;
    for (int e = 0; e < 4; e++) {
        float m = v[e] < 0 ? -v[e] : v[e];
        if (ok[e] && m > amax) amax = m;
    }
    for (int off = 16; off; off >>= 1) {
        float o = __shfl_xor_sync(0xffffffffu, amax, off);
        if (o > amax) amax = o;
    }
    float s = dsrt_pow2_ceil(amax * (1.0f / 448.0f));
    for (int e = 0; e < 4; e++) {
        float q = v[e] / s;
        q = q > 448.0f ? 448.0f : q < -448.0f ? -448.0f : q;
        code[e] = dsrt_f32_to_e4m3(q);
        v[e] = dsrt_e4m3_to_f32(code[e]) * s;
    }
    return s;
}

/* weights, streamed: L1 no-allocate keeps the L1 for the scales */
__device__ __forceinline__ uint4 load_stream(const void *p)
{
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}
__device__ __forceinline__ uint2 load_stream8(const void *p)
{
    uint2 r;
    asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
    return r;
}

/* ---- the warp tile: 16 rows of one matrix times up to 8 staged tokens ---- */

enum { MMA_ROWS = 16, MMA_CHUNK = 64, MMA_TOKENS = 8 };
enum { MMA_FP8 = 1, MMA_FP4 = 2 }; /* linear.cu's FMT_FP8 / FMT_FP4 */

/* Where a lane's two rows (g and g + 8) of the tile live. Weights: row starts in bytes (a dead
 * row, past the matrix, reads nothing). Scales: fp8 f32 or e8m0, one per (row block, block_cols
 * columns), block_cols a multiple of 64; fp4 e8m0 one per 32 columns, contiguous along k, the
 * row's first scale at an even index (two read as one 16-bit word). */
struct MmaRows {
    const char *a, *b;
    bool live_a, live_b;
    const void *scale;
    int scale_dtype;
    int64_t scale_a, scale_b, scale_ld1, block_cols;
};

/* A lane's step: 16 rows x 64 columns. fp8: 16 bytes of row g and of row g + 8 (columns 16q..16q+15
 * of the chunk: two mmas) and their scales; fp4: 8 bytes of each (columns 16q..16q+15, then
 * fp4_exchange) and the four e8m0 bytes (row g blocks 0, 1, row g + 8 blocks 0, 1) in one word. */
template <int FMT> struct MmaStep;
template <> struct MmaStep<MMA_FP8> { uint4 a, b; float sa, sb; };
template <> struct MmaStep<MMA_FP4> { uint2 a, b; uint32_t scales; };
/* steps in flight per lane: 128 (fp8) / 64 (fp4) weight bytes */
template <int FMT> struct MmaDepth { static constexpr int U = FMT == MMA_FP8 ? 4 : 8; };

__device__ __forceinline__ float mma_weight_scale(const void *scale, int dtype, int64_t i)
{
    return dtype == DSRT_F32 ? ((const float *)scale)[i] : dsrt_e8m0_to_f32(((const uint8_t *)scale)[i]);
}

/* Issues the loads of chunks c0, c0 + stride, ... (U of them, those below nchunk) */
template <int FMT, int U>
__device__ __forceinline__ void mma_load(const MmaRows &r, MmaStep<FMT> (&st)[U], int64_t c0, int64_t stride,
                                         int64_t nchunk, int q)
{
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int64_t c = c0 + u * stride;
        if (c >= nchunk) break;
        if constexpr (FMT == MMA_FP8) {
            const size_t off = (size_t)c * MMA_CHUNK + q * 16;
            st[u].a = r.live_a ? load_stream(r.a + off) : make_uint4(0, 0, 0, 0);
            st[u].b = r.live_b ? load_stream(r.b + off) : make_uint4(0, 0, 0, 0);
            const int64_t cb = c * MMA_CHUNK / r.block_cols * r.scale_ld1;
            st[u].sa = r.live_a ? mma_weight_scale(r.scale, r.scale_dtype, r.scale_a + cb) : 0.0f;
            st[u].sb = r.live_b ? mma_weight_scale(r.scale, r.scale_dtype, r.scale_b + cb) : 0.0f;
        } else {
            const size_t off = (size_t)c * (MMA_CHUNK / 2) + q * 8;
            st[u].a = r.live_a ? load_stream8(r.a + off) : make_uint2(0, 0);
            st[u].b = r.live_b ? load_stream8(r.b + off) : make_uint2(0, 0);
            const uint8_t *sc = (const uint8_t *)r.scale;
            const uint32_t sa = r.live_a ? *(const unsigned short *)(sc + r.scale_a + 2 * c) : 0u;
            const uint32_t sb = r.live_b ? *(const unsigned short *)(sc + r.scale_b + 2 * c) : 0u;
            st[u].scales = sa | sb << 16;
        }
    }
}

/* The staged tokens as a lane reads them: token g's codes (row; has_x false past the last token)
 * and the Q8 scales of tokens 2q and 2q + 1 (NULL past the last), one per 128 columns. */
struct MmaX {
    const uint8_t *row;
    bool has_x;
    const float *s0, *s1;
};

/* acc (the C fragment: rows g, g + 8 x tokens 2q, 2q + 1) += the steps' products, each promoted
 * to fp32 with its weight and activation scales at once */
template <int FMT, int U>
__device__ __forceinline__ void mma_accumulate(const MmaStep<FMT> (&st)[U], int64_t c0, int64_t stride, int64_t nchunk,
                                               int q, const MmaX &x, float (&acc)[4])
{
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int64_t c = c0 + u * stride;
        if (c >= nchunk) break;
        const int64_t col = c * MMA_CHUNK;
        const float x0 = x.s0 ? x.s0[col / 128] : 0.0f, x1 = x.s1 ? x.s1[col / 128] : 0.0f;
        if constexpr (FMT == MMA_FP8) {
            const uint4 xv = x.has_x ? *(const uint4 *)(x.row + col + q * 16) : make_uint4(0, 0, 0, 0);
            const uint4 A = st[u].a, B = st[u].b;
            float p[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            mma_e4m3(p, A.x, B.x, A.y, B.y, xv.x, xv.y);
            mma_e4m3(p, A.z, B.z, A.w, B.w, xv.z, xv.w);
            acc[0] = fmaf(p[0], st[u].sa * x0, acc[0]);
            acc[1] = fmaf(p[1], st[u].sa * x1, acc[1]);
            acc[2] = fmaf(p[2], st[u].sb * x0, acc[2]);
            acc[3] = fmaf(p[3], st[u].sb * x1, acc[3]);
        } else {
            uint32_t a_blk[2], b_blk[2];
            fp4_exchange(st[u].a.x, st[u].a.y, q, a_blk[0], a_blk[1]);
            fp4_exchange(st[u].b.x, st[u].b.y, q, b_blk[0], b_blk[1]);
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const uint2 xv = x.has_x ? *(const uint2 *)(x.row + col + h * 32 + fp4_lane_group(q)) : make_uint2(0, 0);
                uint32_t ae, ao, be, bo;
                fp4_to_e4m3(a_blk[h], ae, ao);
                fp4_to_e4m3(b_blk[h], be, bo);
                float p[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                mma_e4m3(p, ae, be, ao, bo, xv.x, xv.y);
                const float sa = dsrt_e8m0_to_f32((uint8_t)(st[u].scales >> (8 * h))) * FP4_AS_E4M3_SCALE;
                const float sb = dsrt_e8m0_to_f32((uint8_t)(st[u].scales >> (16 + 8 * h))) * FP4_AS_E4M3_SCALE;
                acc[0] = fmaf(p[0], sa * x0, acc[0]);
                acc[1] = fmaf(p[1], sa * x1, acc[1]);
                acc[2] = fmaf(p[2], sb * x0, acc[2]);
                acc[3] = fmaf(p[3], sb * x1, acc[3]);
            }
        }
    }
}

/* A warp's share of the tile: chunks warp, warp + warps, ... U at a time; `first` holds the first
 * U steps, already loaded (issued before the caller staged the activations). */
template <int FMT>
__device__ __forceinline__ void mma_tile(const MmaRows &r, MmaStep<FMT> (&first)[MmaDepth<FMT>::U], int64_t nchunk,
                                         int warp, int warps, int q, const MmaX &x, float (&acc)[4])
{
    constexpr int U = MmaDepth<FMT>::U;
    for (int64_t i0 = 0; warp + i0 * warps < nchunk; i0 += U) {
        if (i0) mma_load<FMT, U>(r, first, warp + i0 * warps, warps, nchunk, q);
        mma_accumulate<FMT, U>(first, warp + i0 * warps, warps, nchunk, q, x, acc);
    }
}

/* Stores a lane's 4 codes (columns 4·lane.. of a 128-column block at `block`) in the staged order */
template <int FMT>
__device__ __forceinline__ void mma_store_codes(uint8_t *block, int lane, const uint8_t (&code)[4])
{
    if (FMT == MMA_FP8) {
        *(uint32_t *)(block + lane * 4) =
            (uint32_t)code[0] | (uint32_t)code[1] << 8 | (uint32_t)code[2] << 16 | (uint32_t)code[3] << 24;
    } else {
#pragma unroll
        for (int e = 0; e < 4; e++) block[fp4_staged_column(lane * 4 + e)] = code[e];
    }
}

/* staged codes of a token `ld` bytes apart, ld ≡ 64 (fp8) / 32 (fp4) mod 128: the tokens a
 * quarter-warp (fp8, 16-byte reads) or half-warp (fp4, 8-byte reads) touches fall in different
 * banks */
__host__ __device__ inline int64_t mma_staged_ld(int fmt, int64_t cols) { return (cols + 127) / 128 * 128 + (fmt == MMA_FP8 ? 64 : 32); }

#endif
