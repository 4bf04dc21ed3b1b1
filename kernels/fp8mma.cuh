/*
 * fp8mma.cuh - the tensor-core tile of the decode GEMVs (linear.cu, moe.cu): a warp multiplies 16
 * rows of an FP8 or FP4 weight matrix by up to 8 Q8-quantised activation rows with mma.sync
 * m16n8k16 f16 x f16 -> f32, straight from the weight bytes in registers.
 *
 * Why: a decode GEMV that dequantises each weight to f32 in CUDA cores pays ~1.5 conversions per
 * weight (cvt e4m3x2 -> f16x2, then f16 -> f32) at 16 a clock per SM, where HBM delivers ~17
 * weight bytes a clock per SM: the conversions, not the bytes, bounded the old kernels (FP8 GEMVs
 * at 0.1-1.1 TB/s, FP4 experts at 0.5 TB/s on the H200). Here the tensor cores take f16: FP8 costs
 * one cvt per two weights, FP4 a few integer ops per eight and no cvt at all. (Hopper has no
 * mma.sync for e4m3: ptxas lowers it to f16 HMMA and converts BOTH operands at every call, the
 * staged activations included: measured barely faster than the f32 path.)
 *
 * What this file protects is that the products are the reference's. The Q8 activation IS e4m3
 * codes times a power-of-two block scale (quant.h); e4m3 codes are exact in f16 and are staged so.
 * FP8 weights are e4m3 codes (exact in f16) times their block scale; FP4 codes placed in an f16 as
 * below are e2m1 · 2^-14 exactly. f16 products are exact in the fp32 accumulator, so
 *     y[n, t] = Σ_blocks ( Σ_k code_w[n, k] · code_x[t, k] ) · s_w(n, block) · s_x(t, block)
 * is the CPU's Σ a·(W·S) with the fp32 sum taken in another order: each tensor-core sum covers 16
 * or 32 columns inside one scale block and is promoted with its scales at once.
 *
 * The k-order of an mma is free as long as the A (weights) and B (activations) fragments agree, so
 * each lane feeds the tensor core the weights it loaded, and the activations are staged in the
 * matching order (fragment layout: mma.cuh).
 *   - fp8: a lane loads 16 bytes of row g and of row g + 8, columns 16q..16q+15 of a 64-column
 *     chunk, and cvt turns byte pairs (4i, 4i + 1) and (4i + 2, 4i + 3) into a0 and a2 of the
 *     chunk's i-th mma; the activations keep their natural order.
 *   - fp4: a lane loads 8 bytes of each row (columns 16q..16q+15) and swaps a word with lane q ^ 2
 *     (fp4_exchange) so that every mma stays inside one 32-column scale block; a word's eight
 *     nibbles become four f16 pairs (fp4_to_f16); the activations are staged per 8-column group in
 *     the order 0 2 4 6 1 3 5 7 to match.
 */
#ifndef DSRT_KERNELS_FP8MMA_CUH
#define DSRT_KERNELS_FP8MMA_CUH

#include <stdint.h>
#include <cuda_fp16.h>
#include "../runtime/quant.h"
#include "act.cuh"
#include "common.cuh"
#include "mma.cuh"
#include "q8.cuh"

/* The 8 e2m1 nibbles of a word (low nibble = even column) as four f16 pairs, (0, 2) (4, 6) (1, 3)
 * (5, 7) by column: an f16 whose high byte is s 0 0 0 e1 e0 m 0 and low byte zero reads
 * 2^(e-15)(1 + m/2) = e2m1 · 2^-14 for normal codes, and the subnormal (e = 0) reads m/2 · 2^-14
 * too: exact, the 2^14 goes into the scale (FP4_AS_F16_LOG2). Eleven integer ops per eight weights. */
__device__ __forceinline__ void fp4_to_f16(uint32_t w, uint32_t (&p)[4])
{
    const uint32_t even = ((w << 1) & 0x0e0e0e0eu) | ((w << 4) & 0x80808080u); /* byte j: column 2j's high byte */
    const uint32_t odd = ((w >> 3) & 0x0e0e0e0eu) | (w & 0x80808080u);        /* byte j: column 2j + 1's */
    p[0] = __byte_perm(even, 0, 0x1404);
    p[1] = __byte_perm(even, 0, 0x3424);
    p[2] = __byte_perm(odd, 0, 0x1404);
    p[3] = __byte_perm(odd, 0, 0x3424);
}
enum { FP4_AS_F16_LOG2 = 14 }; /* fp4_to_f16's values are e2m1 · 2^-14 */

/* Where staged activation column c of an 8-column group lies for an FP4 matrix: the order
 * 0 2 4 6 1 3 5 7, fp4_to_f16's pairs */
__device__ __forceinline__ int fp4_staged_column(int c) { return (c & ~7) | ((c & 1) << 2) | ((c & 7) >> 1); }

/* FP4 exchange: lane q of a quad loaded the 16 columns [16q, 16q + 16) of a 64-column chunk (two
 * 32-column scale blocks) as words lo, hi. Lanes q and q ^ 2 swap a word: afterwards `first` holds
 * 8 columns of block 0 and `second` the same 8 columns of block 1, at offset fp4_lane_group(q). */
__device__ __forceinline__ void fp4_exchange(uint32_t lo, uint32_t hi, int q, uint32_t &first, uint32_t &second)
{
    const uint32_t other = __shfl_xor_sync(0xffffffffu, q < 2 ? hi : lo, 2);
    first = q < 2 ? lo : other;
    second = q < 2 ? other : hi;
}
__device__ __forceinline__ int fp4_lane_group(int q) { return q < 2 ? 16 * q : 16 * (q - 2) + 8; }

/* Q8 of one block of 128 (or fewer) columns held 4 per lane, exactly as dsrt_q8_block (quant.h)
 * computes it: the same amax and power-of-two scale s, then the e4m3 codes of clamp(v / s)
 * (q8.cuh). Returns s; codes holds the lane's 4 e4m3 bytes (byte e is column 4·lane + e). The
 * whole warp calls it. */
__device__ __forceinline__ float q8_codes_warp(const float (&v)[4], const bool (&ok)[4], uint32_t &codes)
{
    float amax = 1e-4f;
#pragma unroll
    for (int e = 0; e < 4; e++) {
        float m = v[e] < 0 ? -v[e] : v[e];
        if (ok[e] && m > amax) amax = m;
    }
#pragma unroll
    for (int off = 16; off; off >>= 1) {
        float o = __shfl_xor_sync(0xffffffffu, amax, off);
        if (o > amax) amax = o;
    }
    const float s = dsrt_pow2_ceil(amax * (1.0f / 448.0f)), inv = q8_inverse(s);
    codes = q8_codes2(v[0], v[1], inv) | q8_codes2(v[2], v[3], inv) << 16;
    return s;
}

/* The Q8 round trip of the block: v becomes codes times scale (q8_codes_warp), code its bytes.
 * The codes widen through the hardware's e4m3 -> f16 conversion (exact, NaN kept): numeric.h's
 * bit-level decoder cost ~15 instructions a value in the prefill's row passes. */
__device__ __forceinline__ float q8_block_warp(float (&v)[4], const bool (&ok)[4], uint8_t (&code)[4])
{
    uint32_t codes;
    const float s = q8_codes_warp(v, ok, codes);
    const uint32_t h[2] = {e4m3x2_to_f16x2(codes & 0xffffu), e4m3x2_to_f16x2(codes >> 16)};
#pragma unroll
    for (int e = 0; e < 4; e++) {
        code[e] = (uint8_t)(codes >> (8 * e));
        v[e] = __half2float(__ushort_as_half((unsigned short)(h[e >> 1] >> (16 * (e & 1))))) * s;
    }
    return s;
}

/* weights, streamed: L1 no-allocate keeps the L1 for the scales. volatile: issued where written,
 * ahead of the tensor-core work on the previous buffer (mma_stream), never sunk to its first use.
 * LINE: the L2's fetch from memory widened to the whole 128-byte line (.L2::128B), for the first
 * load of a row's line when the loads after it read the rest of it (wgtile.cuh says where). */
template <bool LINE = false>
__device__ __forceinline__ uint4 load_stream(const void *p)
{
    uint4 r;
    if constexpr (LINE)
        asm volatile("ld.global.nc.L1::no_allocate.L2::128B.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    else
        asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}
template <bool LINE = false>
__device__ __forceinline__ uint2 load_stream8(const void *p)
{
    uint2 r;
    if constexpr (LINE)
        asm volatile("ld.global.nc.L1::no_allocate.L2::128B.v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
    else
        asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
    return r;
}

/* weight scales, read-only: raw bits into registers, decoded only where used (mma_accumulate). An
 * instruction that reads a loaded register makes the warp wait for the load there: ncu showed the
 * FP4 experts' steps stalled on the byte merge that used to sit beside these loads (H200,
 * 2026-11-28). Moving it (and the decode) to the use was worth ~2% of the projection, not more: the
 * step's own weight loads are what the warps wait on. */
__device__ __forceinline__ uint32_t load_scale8(const void *p)
{
    uint32_t r;
    asm volatile("ld.global.nc.u8 %0, [%1];" : "=r"(r) : "l"(p));
    return r;
}
__device__ __forceinline__ uint32_t load_scale16(const void *p)
{
    unsigned short r;
    asm volatile("ld.global.nc.u16 %0, [%1];" : "=h"(r) : "l"(p));
    return r;
}
__device__ __forceinline__ uint32_t load_scale32(const void *p)
{
    uint32_t r;
    asm volatile("ld.global.nc.u32 %0, [%1];" : "=r"(r) : "l"(p));
    return r;
}
__device__ __forceinline__ uint2 load_scale64(const void *p)
{
    uint2 r;
    asm volatile("ld.global.nc.v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
    return r;
}

/* ---- the warp tile: 16 rows of one matrix times up to 8 staged tokens ---- */

enum { MMA_ROWS = 16, MMA_CHUNK = 64, MMA_TOKENS = 8 };
enum { MMA_FP8 = 1, MMA_FP4 = 2 }; /* linear.cu's FMT_FP8 / FMT_FP4 */
/* a block's warps: 8, in teams of ks (a power of two) that split a tile's chunks */
enum { MMA_WARPS = 8 };

/* Where a lane's two rows (g and g + 8) of the tile live, resolved once per tile (mma_rows_at) so
 * that a step costs a multiply-add per row for its addresses: the lane's first weight byte of each
 * row (its quad offset included) and the first byte of each row's scale row, scale_ld1 bytes
 * between scale blocks along k. fp8 scales are f32 or e8m0, one per (row block, 2^chunk_shift
 * chunks of 64 columns); fp4 e8m0 one per 32 columns, contiguous along k, the row's first scale at
 * an even byte (two read as one 16-bit word). A dead row (past the matrix) is given a live one by
 * the caller: it loads real bytes and its sums are never emitted, so the loads need no predicate. */
struct MmaRows {
    const char *a, *b;
    const char *sa, *sb;
    int scale_ld1, chunk_shift;
    bool scale_words; /* fp4: both scale rows 8-byte aligned, a step's 8 scale bytes a row read as one */
};

template <int FMT, int SF>
__device__ __forceinline__ MmaRows mma_rows_at(const char *row_a, const char *row_b, const void *scale, int64_t scale_a,
                                               int64_t scale_b, int64_t scale_ld1, int chunk_shift, int q)
{
    constexpr int ES = SF == DSRT_F32 ? 4 : 1; /* bytes per scale */
    const int lane = FMT == MMA_FP8 ? q * 16 : q * 8;
    MmaRows r;
    r.a = row_a + lane, r.b = row_b + lane;
    r.sa = (const char *)scale + scale_a * ES, r.sb = (const char *)scale + scale_b * ES;
    r.scale_ld1 = (int)(scale_ld1 * ES), r.chunk_shift = chunk_shift;
    r.scale_words = (((uintptr_t)r.sa | (uintptr_t)r.sb) & 7) == 0;
    return r;
}

/* A lane's chunk: fp8 16 bytes of row g and of row g + 8 and the raw bits of their scales (f32 or
 * e8m0); fp4 8 bytes of each row and one word of e8m0 scales. The fp4 scale words of a step (U = 4
 * chunks, two 32-column blocks each) are by row, not by chunk: step[0] and step[1] hold row g's
 * eight bytes (chunks 0-1, 2-3: byte 2u + h is chunk u's block h), step[2] and step[3] row g + 8's,
 * so that each row's eight come in one load (fp4_scale_of reads them back). */
template <int FMT> struct MmaStep;
template <> struct MmaStep<MMA_FP8> { uint4 a, b; uint32_t sa, sb; };
template <> struct MmaStep<MMA_FP4> { uint2 a, b; uint32_t scales; };
/* chunks per step: each of mma_stream's two buffers holds 64 weight bytes a lane (fp8: 2 chunks, fp4: 4) */
template <int FMT> struct MmaDepth { static constexpr int U = FMT == MMA_FP8 ? 2 : 4; };

/* fp4: the e8m0 byte of chunk u (of the step), block h, of row g (row 0) or g + 8 (row 1) */
__device__ __forceinline__ uint32_t fp4_scale_of(const MmaStep<MMA_FP4> (&st)[4], int u, int h, int row)
{
    return (st[2 * row + (u >> 1)].scales >> (16 * (u & 1) + 8 * h)) & 0xffu;
}

/* Issues the loads of chunks c0 .. c0 + U - 1 (those below nchunk): U·64 contiguous columns of
 * each row, whole 128-byte lines of an fp8 row, and their scales */
template <int FMT, int SF, int U>
__device__ __forceinline__ void mma_load(const MmaRows &r, MmaStep<FMT> (&st)[U], int c0, int nchunk)
{
    constexpr int BYTES = FMT == MMA_FP8 ? MMA_CHUNK : MMA_CHUNK / 2; /* a chunk of a row */
    const char *pa = r.a + (size_t)c0 * BYTES, *pb = r.b + (size_t)c0 * BYTES;
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int c = c0 + u;
        if (c >= nchunk) break;
        if constexpr (FMT == MMA_FP8) {
            st[u].a = load_stream(pa + u * BYTES);
            st[u].b = load_stream(pb + u * BYTES);
            const int s = (c >> r.chunk_shift) * r.scale_ld1;
            st[u].sa = SF == DSRT_F32 ? load_scale32(r.sa + s) : load_scale8(r.sa + s);
            st[u].sb = SF == DSRT_F32 ? load_scale32(r.sb + s) : load_scale8(r.sb + s);
        } else {
            st[u].a = load_stream8(pa + u * BYTES);
            st[u].b = load_stream8(pb + u * BYTES);
        }
    }
    if constexpr (FMT == MMA_FP4) {
        static_assert(U == 4, "fp4 scale words: a step is four chunks");
        if (r.scale_words && c0 + U <= nchunk) {
            const uint2 sa = load_scale64(r.sa + 2 * c0), sb = load_scale64(r.sb + 2 * c0);
            st[0].scales = sa.x, st[1].scales = sa.y, st[2].scales = sb.x, st[3].scales = sb.y;
        } else { /* odd shapes: a 16-bit word a chunk, merged here (the wait is paid on these only) */
            uint32_t w[2][U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                const bool in = c0 + u < nchunk;
                w[0][u] = in ? load_scale16(r.sa + 2 * (c0 + u)) : 0u;
                w[1][u] = in ? load_scale16(r.sb + 2 * (c0 + u)) : 0u;
            }
#pragma unroll
            for (int i = 0; i < 4; i++) st[i].scales = w[i >> 1][2 * (i & 1)] | w[i >> 1][2 * (i & 1) + 1] << 16;
        }
    }
}

/* L2 prefetches of the lines mma_load reads for chunks c0 .. c0 + n - 1, one lane a quad (a quad's
 * loads of a row share their lines): what a kernel may do before dsrtk_wait_producer (common.cuh) */
template <int FMT>
__device__ __forceinline__ void mma_prefetch(const MmaRows &r, int c0, int n, int nchunk, int q)
{
    if (q) return;
    for (int c = c0; c < c0 + n && c < nchunk; c++) {
        const size_t off = FMT == MMA_FP8 ? (size_t)c * MMA_CHUNK : (size_t)c * (MMA_CHUNK / 2);
        dsrtk_prefetch_l2(r.a + off);
        dsrtk_prefetch_l2(r.b + off);
    }
}

/* The staged tokens as a lane reads them, as shared-memory addresses (32 bits: three registers, not
 * six, where every register counts): token g's f16 values and the Q8 scales of tokens 2q and 2q + 1,
 * one per 128 columns; tokens past the last read the staging's zero row (mma_stage). */
struct MmaX {
    uint32_t row, s0, s1;
};
__device__ __forceinline__ MmaX mma_x(const __half *row, const float *s0, const float *s1)
{
    return {(uint32_t)__cvta_generic_to_shared(row), (uint32_t)__cvta_generic_to_shared(s0),
            (uint32_t)__cvta_generic_to_shared(s1)};
}
__device__ __forceinline__ float lds_f32(uint32_t at)
{
    float r;
    asm volatile("ld.shared.f32 %0, [%1];" : "=f"(r) : "r"(at));
    return r;
}
__device__ __forceinline__ uint4 lds_u128(uint32_t at)
{
    uint4 r;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "r"(at));
    return r;
}

/* Weight scales as a step uses them, from their raw bits, in two or three integer operations where
 * dsrt_e8m0_to_f32 takes seven (ncu, H200: the scales were a third of the FP4 experts' decode
 * instructions). They give dsrt_e8m0_to_f32's values (times 2^14 for fp4) for every byte but
 * e8m0's NaN (255), which they read as inf: mma_accumulate puts the NaN back per row, once a step.
 *   fp8: 2^(b - 127), b = 0 the subnormal 2^-127 through an integer max;
 *   fp4: 2^(b - 127) · 2^FP4_AS_F16_LOG2 = 2^(b - 113), a normal float up to b = 240 and inf past it
 *        (2^128 overflows, as the product it replaces did). */
__device__ __forceinline__ float e8m0_scale(uint32_t b) { return __uint_as_float(max(b << 23, 0x00400000u)); }
__device__ __forceinline__ float e8m0_fp4_scale(uint32_t b) { return __uint_as_float(min(b, 241u) * 0x800000u + ((uint32_t)FP4_AS_F16_LOG2 << 23)); }
/* whether a word of e8m0 bytes holds a NaN (0xff): the zero-byte test on its complement */
__device__ __forceinline__ bool e8m0_has_nan(uint32_t w) { return ((~w - 0x01010101u) & w & 0x80808080u) != 0; }

/* acc (the C fragment: rows g, g + 8 x tokens 2q, 2q + 1) += the chunks' products, each mma's sum
 * promoted to fp32 with its weight and activation scales at once */
template <int FMT, int SF, int U>
__device__ __forceinline__ void mma_accumulate(const MmaStep<FMT> (&st)[U], int c0, int nchunk, int q, const MmaX &x,
                                               float (&acc)[4])
{
    bool nan_a = false, nan_b = false;
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int c = c0 + u;
        if (c >= nchunk) break;
        const int col = c * MMA_CHUNK;
        const float x0 = lds_f32(x.s0 + col / 128 * 4), x1 = lds_f32(x.s1 + col / 128 * 4);
        if constexpr (FMT == MMA_FP8) {
            /* the lane's 16 columns of token g, as the weights' byte order */
            const uint4 xv[2] = {lds_u128(x.row + 2 * (col + q * 16)), lds_u128(x.row + 2 * (col + q * 16 + 8))};
            const uint32_t xw[8] = {xv[0].x, xv[0].y, xv[0].z, xv[0].w, xv[1].x, xv[1].y, xv[1].z, xv[1].w};
            const uint32_t aw[4] = {st[u].a.x, st[u].a.y, st[u].a.z, st[u].a.w};
            const uint32_t bw[4] = {st[u].b.x, st[u].b.y, st[u].b.z, st[u].b.w};
            float p[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int i = 0; i < 4; i++) /* word i: columns 4i..4i+3 of the lane's 16 */
                mma_f16(p, e4m3x2_to_f16x2(aw[i]), e4m3x2_to_f16x2(bw[i]), e4m3x2_to_f16x2(aw[i] >> 16),
                        e4m3x2_to_f16x2(bw[i] >> 16), xw[2 * i], xw[2 * i + 1]);
            float sa, sb;
            if constexpr (SF == DSRT_F32) {
                sa = __uint_as_float(st[u].sa), sb = __uint_as_float(st[u].sb);
            } else {
                sa = e8m0_scale(st[u].sa), sb = e8m0_scale(st[u].sb);
                nan_a |= st[u].sa == 0xffu, nan_b |= st[u].sb == 0xffu;
            }
            acc[0] = fmaf(p[0], sa * x0, acc[0]);
            acc[1] = fmaf(p[1], sa * x1, acc[1]);
            acc[2] = fmaf(p[2], sb * x0, acc[2]);
            acc[3] = fmaf(p[3], sb * x1, acc[3]);
        } else {
            uint32_t a_blk[2], b_blk[2];
            fp4_exchange(st[u].a.x, st[u].a.y, q, a_blk[0], a_blk[1]);
            fp4_exchange(st[u].b.x, st[u].b.y, q, b_blk[0], b_blk[1]);
#pragma unroll
            for (int h = 0; h < 2; h++) { /* block h: 8 columns a lane, two mmas */
                const uint4 xv = lds_u128(x.row + 2 * (col + h * 32 + fp4_lane_group(q)));
                uint32_t pa[4], pb[4];
                fp4_to_f16(a_blk[h], pa);
                fp4_to_f16(b_blk[h], pb);
                float ph[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                mma_f16(ph, pa[0], pb[0], pa[1], pb[1], xv.x, xv.y);
                mma_f16(ph, pa[2], pb[2], pa[3], pb[3], xv.z, xv.w);
                const float sa = e8m0_fp4_scale(fp4_scale_of(st, u, h, 0)), sb = e8m0_fp4_scale(fp4_scale_of(st, u, h, 1));
                acc[0] = fmaf(ph[0], sa * x0, acc[0]);
                acc[1] = fmaf(ph[1], sa * x1, acc[1]);
                acc[2] = fmaf(ph[2], sb * x0, acc[2]);
                acc[3] = fmaf(ph[3], sb * x1, acc[3]);
            }
        }
    }
    if constexpr (FMT == MMA_FP4) { /* the step's scale words, by row (MmaStep); bytes past nchunk are 0 */
        nan_a = e8m0_has_nan(st[0].scales) || e8m0_has_nan(st[1].scales);
        nan_b = e8m0_has_nan(st[2].scales) || e8m0_has_nan(st[3].scales);
    }
    if (nan_a) acc[0] = acc[1] = NAN; /* what a NaN scale makes of the row's sums (the reference's too) */
    if (nan_b) acc[2] = acc[3] = NAN;
}

/* A warp's walk over n_tiles tiles of `rounds` steps each through two register buffers: a step's
 * loads are issued before the previous step is used, across tile boundaries, so a warp keeps HBM
 * busy from its first load to its last. buf[0] holds step (0, 0), loaded by the caller (before it
 * staged the activations); load(buffer, tile, round) issues a step's loads and use(buffer, tile,
 * round) consumes them. (L2 prefetches of the steps 2-8 ahead of the loads were measured on the
 * H200: 10% slower.)
 *
 * Whatever a caller keeps live across the walk (its captures) shares the registers with the two
 * buffers: should ptxas move any of it to local memory, its reload queues behind the step's
 * weight loads and the warp waits for the loads it has just issued (moe.cu's mma_project). */
template <class Step, class Load, class Use>
__device__ __forceinline__ void walk_two_buffers(Step (&buf)[2], int n_tiles, int rounds, Load load, Use use)
{
    int tile = 0, round = 0, load_tile = 0, load_round = 0;
    auto next = [&](int &t, int &r) {
        if (++r == rounds) r = 0, t++;
    };
    while (tile < n_tiles) {
        next(load_tile, load_round);
        if (load_tile < n_tiles) load(buf[1], load_tile, load_round);
        use(buf[0], tile, round);
        next(tile, round);
        if (tile >= n_tiles) break;
        next(load_tile, load_round);
        if (load_tile < n_tiles) load(buf[0], load_tile, load_round);
        use(buf[1], tile, round);
        next(tile, round);
    }
}

/* The tensor-core tile's walk (linear.cu, moe.cu) over a warp's tiles 0..n_tiles-1 (the caller
 * maps them to rows), per tile `rounds` steps of U adjacent chunks, from chunk
 * (kslot + round·ks)·U. rows_of(tile) is asked once per tile (buf[0]'s step came from
 * rows_of(0)); after a tile's last step finish(tile, acc) runs. */
template <int FMT, int SF, int U, class RowsOf, class Finish>
__device__ __forceinline__ void mma_stream(MmaStep<FMT> (&buf)[2][U], int n_tiles, int rounds, int ks, int kslot, int nchunk,
                                           int q, const MmaX &x, RowsOf rows_of, Finish finish)
{
    float acc[4] = {};
    MmaRows rows = rows_of(0);
    walk_two_buffers(
        buf, n_tiles, rounds,
        [&](MmaStep<FMT>(&b)[U], int tile, int round) {
            if (round == 0) rows = rows_of(tile);
            mma_load<FMT, SF, U>(rows, b, (kslot + round * ks) * U, nchunk);
        },
        [&](const MmaStep<FMT>(&b)[U], int tile, int round) {
            mma_accumulate<FMT, SF, U>(b, (kslot + round * ks) * U, nchunk, q, x, acc);
            if (round == rounds - 1) {
                finish(tile, acc);
                acc[0] = acc[1] = acc[2] = acc[3] = 0.0f;
            }
        });
}

/* The end of a tile in a team of ks warps: emit(row in tile, token, sum) for every row of the tile
 * and token below ntok. ks == 1: straight from the C fragment; otherwise the warps' parts meet in
 * red (the team's ks·128 floats) and are summed in kslot order, between named barriers (id
 * team + 1) of the team's threads. */
template <class Emit>
__device__ __forceinline__ void mma_team_finish(const float (&acc)[4], int ks, int team, int kslot, float *red, int ntok, Emit emit)
{
    const int lane = threadIdx.x & 31, gq = lane >> 2, q = lane & 3, t0 = 2 * q, t1 = 2 * q + 1;
    if (ks == 1) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int t = i & 1 ? t1 : t0;
            if (t < ntok) emit(gq + (i >> 1) * 8, t, acc[i]);
        }
        return;
    }
    float *part = red + kslot * (MMA_ROWS * MMA_TOKENS);
    part[gq * MMA_TOKENS + t0] = acc[0];
    part[gq * MMA_TOKENS + t1] = acc[1];
    part[(gq + 8) * MMA_TOKENS + t0] = acc[2];
    part[(gq + 8) * MMA_TOKENS + t1] = acc[3];
    asm volatile("bar.sync %0, %1;" ::"r"(team + 1), "r"(ks * 32) : "memory");
    for (int idx = kslot * 32 + lane; idx < MMA_ROWS * ntok; idx += ks * 32) {
        const int rr = idx / ntok, t = idx - rr * ntok;
        float v = 0.0f;
        for (int k = 0; k < ks; k++) v += red[k * (MMA_ROWS * MMA_TOKENS) + rr * MMA_TOKENS + t];
        emit(rr, t, v);
    }
    asm volatile("bar.sync %0, %1;" ::"r"(team + 1), "r"(ks * 32) : "memory");
}

/* Stores a lane's 4 f16 values (columns 4·lane.. of a 128-column block at `block`, as two pairs)
 * in the staged order */
template <int FMT>
__device__ __forceinline__ void mma_store_f16(__half *block, int lane, uint32_t h01, uint32_t h23)
{
    if (FMT == MMA_FP8) {
        *(uint2 *)(block + lane * 4) = make_uint2(h01, h23);
    } else {
        unsigned short *b = (unsigned short *)block;
        b[fp4_staged_column(lane * 4)] = (unsigned short)h01;
        b[fp4_staged_column(lane * 4 + 1)] = (unsigned short)(h01 >> 16);
        b[fp4_staged_column(lane * 4 + 2)] = (unsigned short)h23;
        b[fp4_staged_column(lane * 4 + 3)] = (unsigned short)(h23 >> 16);
    }
}

/* The f16 scaling of one block of bf16 values held 4 per lane (the activations of an FP8 matrix
 * the reference runs in bf16, e.g. wo_a): s = 2^(e - 15) for the block's largest magnitude in
 * [2^e, 2^(e+1)), so every v / s lies below 2^16 (bf16's largest such value is 65280, an f16).
 * bf16 carries 8 significant bits, so v / s is an f16 exactly when |v / s| >= 2^-17, that is for
 * every |v| >= 2^-32 of the block's largest; smaller ones round by less than 2^-41 of it, far
 * below fp32's own summation noise. Returns s; h01, h23 the f16 pairs of v / s. */
__device__ __forceinline__ float f16_block_warp(const float (&v)[4], uint32_t &h01, uint32_t &h23)
{
    float amax = 0.0f;
#pragma unroll
    for (int e = 0; e < 4; e++) amax = fmaxf(amax, fabsf(v[e]));
#pragma unroll
    for (int off = 16; off; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    int e = (int)((dsrt_f32_bits(amax) >> 23) & 0xffu) - 127 - 15;
    e = e < -126 ? -126 : e > 127 ? 127 : e;
    const float s = dsrt_bits_f32((uint32_t)(e + 127) << 23);
    const float inv = e == 127 ? dsrt_bits_f32(0x00400000u) : dsrt_bits_f32((uint32_t)(127 - e) << 23);
    const __half2 a = __floats2half2_rn(v[0] * inv, v[1] * inv), b = __floats2half2_rn(v[2] * inv, v[3] * inv);
    h01 = *(const uint32_t *)&a, h23 = *(const uint32_t *)&b;
    return s;
}

/* Stages `rows` activation rows of `cols` columns (cols % 64 == 0) as f16 at xq (row t at t·ld
 * halves, row `rows` zeros) with one scale per 128-column block at xsc (row t's at
 * t·ceil(cols/128), row `rows` zeros): one warp per (row, 128-column block). Q8: the Q8 codes and
 * scales, quant.h's arithmetic through q8_codes_warp, so codes times scales are bit for bit the
 * CPU's Q8 values; otherwise the bf16 inputs scaled into f16 (f16_block_warp). Row t of the input
 * starts at element row_at(t) of x (bf16 or f32; vec as act.cuh's ld4_units). A warp issues the
 * loads of SB units before converting any: one L2 round trip per SB units, not per unit. */
template <int FMT, bool Q8, class RowAt>
__device__ __forceinline__ void mma_stage(int rows, int cols, int ld, __half *xq, float *xsc, const void *x, int x_dtype,
                                          bool vec, RowAt row_at)
{
    enum { SB = 4 }; /* 8 (with vec): the GEMVs 9 us a step slower (CUPTI timeline, H200) */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int nblk = (cols + 127) / 128, units = rows * nblk;
    /* row `rows`: zeros, what tokens past the last read (ld·2 bytes, a multiple of 16) */
    for (int i = threadIdx.x; i < ld / 8; i += blockDim.x) ((uint4 *)(xq + rows * ld))[i] = make_uint4(0, 0, 0, 0);
    for (int i = threadIdx.x; i < nblk; i += blockDim.x) xsc[rows * nblk + i] = 0.0f;
    for (int u0 = warp; u0 < units; u0 += SB * warps) {
        float v[SB][4];
        bool ok[SB][4];
        ld4_units<SB>(x, x_dtype, vec, units, nblk, cols, u0, warps, row_at, v, ok);
#pragma unroll
        for (int j = 0; j < SB; j++) {
            const int u = u0 + j * warps, t = unit_row(u, nblk), cb = (u - t * nblk) * 128;
            if (u >= units) break; /* warp-uniform: the block's amax needs the whole warp */
            uint32_t h01, h23;
            float s;
            if (Q8) {
                uint32_t codes;
                s = q8_codes_warp(v[j], ok[j], codes);
                h01 = e4m3x2_to_f16x2(codes), h23 = e4m3x2_to_f16x2(codes >> 16); /* exact */
            } else {
                s = f16_block_warp(v[j], h01, h23);
            }
            if (cb + lane * 4 < cols) mma_store_f16<FMT>(xq + t * ld + cb, lane, h01, h23); /* all four or none */
            if (lane == 0) xsc[t * nblk + cb / 128] = s;
        }
    }
}

/* The staging pitch in halves: ld·2 ≡ 16 (fp8: 16-byte reads at 32-byte steps) / 64 (fp4: 16-byte
 * reads, 64 bytes a token) mod 128, so the tokens a quarter-warp reads fall in different banks */
__host__ __device__ inline int64_t mma_staged_ld(int fmt, int64_t cols) { return (cols + 63) / 64 * 64 + (fmt == MMA_FP8 ? 8 : 32); }

#endif
