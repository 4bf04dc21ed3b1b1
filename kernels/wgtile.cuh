/*
 * wgtile.cuh - the decode tile of FP8 and FP4 weights on Hopper's FP8 tensor cores (moe.cu): a
 * warpgroup multiplies 64 rows of a block-scaled FP8 (e4m3) or FP4 (e2m1, an e8m0 scale per 32
 * columns) matrix by up to 8 Q8-quantised activation rows with wgmma m64n8k32 e4m3 x e4m3 -> f32,
 * the weights (A) from registers, the activations (B) from shared memory.
 *
 * Why: fp8mma.cuh's f16 mma.sync tile is bound by its instruction stream (ncu, H200, Flash
 * experts, T = 1: ~230 warp instructions a KB of FP4 weights, ~310 of FP8, 1.2-1.3 TB/s): Hopper's
 * mma.sync has no e4m3, so every FP8 byte is widened to f16 first, an HMMA covers 256 weights and
 * FP4 pays a promotion every 16 columns. Here a lane's 16-byte (FP8) or 8-byte (FP4) loads of a row
 * ARE its wgmma fragments, and a wgmma covers a warp's 16 rows x 32 columns:
 *   - FP8 codes go to the tensor cores as they are: a step of 128 columns is 4 loads, 4 wgmmas
 *     and one promotion (ncu, Flash shapes with every expert FP8: 2.5 TB/s where fp8mma.cuh's
 *     FP8 experts ran at ~1.2);
 *   - FP4: fp8mma.cuh's word exchange puts 8 columns of one 32-column block in a lane, which
 *     become two words of e4m3 in 7 integer ops (an e2m1 code s e1 e0 m placed in an e4m3 byte as
 *     s 0 0 e1 e0 m 0 0 reads e2m1 · 2^-6 exactly, the subnormal code included): a wgmma is one
 *     scale block, promoted at once. ~250 warp instructions a KB, but not bound by them: how
 *     memory serves the fragments' scattered pieces bounds the tile (wg_load's what-ifs).
 * A step's loads go out BUFFERS - 1 steps before its use (walk_buffers). The same loads staged
 * through shared memory (cp.async, then ldmatrix) were slower: the MIO pipe the copies, the
 * ldmatrix and the shared loads share was the top stall (ncu, H200).
 *
 * What it protects is the reference's arithmetic (SPEC §3.5): e2m1 and e4m3 codes are exact in
 * e4m3, their products exact; the tensor core sums them with fewer bits than fp32 (about 14
 * significant, DeepSeek-V3 §3.3.2), which is what DeepSeek's own kernels do: FP8 promotes each
 * 128 columns' sum with its block scales, FP4 each 32-column block's with its weight scale and
 * then each 128 columns' with the activation scale:
 *     FP8: y[n, t] = Σ_128 sum128(code_w · code_x) · s_w(n / 128, block) · s_x(t, block)
 *     FP4: y[n, t] = Σ_128 ( Σ_32 sum32(code_w · code_x) · 2 s_w(n, block32) ) · s_x(t, block) · 2^5
 * Each column of a wgmma is its own sum, so results do not depend on how many tokens are staged.
 *
 * The k-order inside a wgmma is free as long as A and B agree: the activations are staged in the
 * order the lanes' words arrive in (wg_kslot).
 *
 * Shapes: columns a multiple of WG_STEP (128: a step is one Q8 block and one 128-byte row of
 * wgmma's swizzled B tile), rows a multiple of 64; FP8 scale blocks of a multiple of 16 rows (a
 * warp's rows share a scale) and of 128 columns; FP4 e8m0 scale rows 4-byte aligned (a step's 4
 * scales of a row are one word).
 */
#ifndef DSRT_KERNELS_WGTILE_CUH
#define DSRT_KERNELS_WGTILE_CUH

#include <stdint.h>
#include "fp8mma.cuh"
#include "mma.cuh"

enum {
    WG_ROWS = 64,   /* a warpgroup's rows */
    WG_STEP = 128,  /* columns a step: 4 wgmmas, one Q8 block */
    WG_TOKENS = 8,  /* wgmma's n */
    WG_ATOM = 1024, /* staged activations a step: 8 tokens x 128 codes in the 128-byte swizzle */
    /* FP4's staged activation scales carry 2^(6 - 1): the 2^6 of e2m1 read as e4m3 (fp4_to_e4m3),
     * less the octave e8m0_octave_up adds to the weight scales */
    FP4_X_SCALE_LOG2 = 5
};
enum { WG_FP8 = 1, WG_FP4 = 2 }; /* fp8mma.cuh's MMA_FP8 / MMA_FP4 */

/* The 8 e2m1 nibbles of a word (low nibble = even column) as e4m3 codes times 2^-6: `even` holds
 * columns 0 2 4 6, `odd` columns 1 3 5 7, a byte each, in order */
__device__ __forceinline__ void fp4_to_e4m3(uint32_t w, uint32_t &even, uint32_t &odd)
{
    even = ((w << 4) & 0x80808080u) | ((w << 2) & 0x1c1c1c1cu);
    odd = (w & 0x80808080u) | ((w >> 2) & 0x1c1c1c1cu);
}

/* The k-slot (0..127 within a step) of column c of a step (the comment at the top).
 *   FP8: a lane's 16-byte load of a row holds columns 16q..16q+15 of the step's half h; wgmma
 *        m = 2h + p takes the lane's words 2p (a0, k-slots 4q..4q+3) and 2p + 1 (a2, 16 + 4q..).
 *   FP4: after fp4_exchange a lane holds 8 columns of block j at fp4_lane_group(q) (0 16 8 24 for
 *        q = 0 1 2 3); their even columns go to a0 (4q..), the odd ones to a2 (16 + 4q..). */
template <int FMT> __device__ __forceinline__ int wg_kslot(int c)
{
    if (FMT == WG_FP8) {
        const int m = 2 * (c >> 6) + ((c >> 3) & 1), q = (c >> 4) & 3, e = c & 7;
        return 32 * m + (e & 4 ? 16 : 0) + 4 * q + (e & 3);
    }
    const int p = c & 31, q = ((p >> 3) & 1) << 1 | p >> 4;
    return (c & ~31) + 16 * (p & 1) + 4 * q + ((p & 7) >> 1);
}

/* byte offset of token t's k-slot kk (0..127 within a step) in a step's swizzled atom */
__device__ __forceinline__ int wg_atom_offset(int t, int kk) { return t * 128 + (((kk >> 4) ^ (t & 7)) << 4) + (kk & 15); }

/* Stages `rows` (<= WG_TOKENS) activation rows of `cols` columns (a multiple of WG_STEP) as Q8
 * codes in the swizzled atoms at xs (step s at s·WG_ATOM, k-slots by wg_kslot, tokens past `rows`
 * zero) and their scales at xsc (FP4: times 2^FP4_X_SCALE_LOG2; token t's of step s at
 * t·cols/128 + s, past `rows` zero): one warp per (token, step), quant.h's arithmetic through
 * q8_codes_warp. Row t of the input starts at element row_at(t) of x (bf16 or f32), read an element
 * an access (act.cuh's ld4_units without vec: the wider loads made the MoE's DOWN 81 -> 88 us a
 * step, CUPTI timeline, H200, twice, where the dense GEMVs gained 9). The whole block calls it;
 * fence_async_shared and a barrier must follow before wgmma reads the atoms. */
template <int FMT, class RowAt>
__device__ __forceinline__ void wg_stage(int rows, int cols, unsigned char *xs, float *xsc, const void *x, int x_dtype,
                                         RowAt row_at)
{
    enum { SB = 4 };
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int steps = cols / WG_STEP, units = rows * steps;
    /* tokens past `rows`: a token is 128 bytes of each atom (the swizzle moves 16-byte pieces
     * inside them), 16-byte word w of an atom's 64 the token w / 8's */
    for (int i = threadIdx.x; i < steps * 64; i += blockDim.x)
        if ((i & 63) >= rows * 8) ((uint4 *)xs)[i] = make_uint4(0, 0, 0, 0);
    for (int i = rows * steps + threadIdx.x; i < WG_TOKENS * steps; i += blockDim.x) xsc[i] = 0.0f;
    for (int u0 = warp; u0 < units; u0 += SB * warps) {
        float v[SB][4];
        bool ok[SB][4];
        ld4_units<SB>(x, x_dtype, false, units, steps, cols, u0, warps, row_at, v, ok);
#pragma unroll
        for (int j = 0; j < SB; j++) {
            const int u = u0 + j * warps, t = unit_row(u, steps), s = u - t * steps;
            if (u >= units) break; /* warp-uniform: the block's amax needs the whole warp */
            uint32_t codes;
            const float sc = q8_codes_warp(v[j], ok[j], codes);
            unsigned char *atom = xs + s * WG_ATOM;
            const int kk = wg_kslot<FMT>(4 * lane);
            if (FMT == WG_FP8) { /* columns 4·lane.. land on 4 consecutive k-slots */
                *(uint32_t *)(atom + wg_atom_offset(t, kk)) = codes;
            } else { /* codes 0 and 2 (even columns) on adjacent k-slots, 1 and 3 on the same + 16 */
                *(uint16_t *)(atom + wg_atom_offset(t, kk)) = (uint16_t)((codes & 0xffu) | (codes >> 8 & 0xff00u));
                *(uint16_t *)(atom + wg_atom_offset(t, kk + 16)) = (uint16_t)((codes >> 8 & 0xffu) | (codes >> 16 & 0xff00u));
            }
            if (lane == 0) xsc[t * steps + s] = FMT == WG_FP4 ? sc * (float)(1 << FP4_X_SCALE_LOG2) : sc; /* exact */
        }
    }
}

/* A warp's rows of a tile: the lane's first weight byte of row g (its wg_lane offset included)
 * and the first scale byte of its row (FP4) or of the warp's scale row (FP8). The matrix's
 * strides: row g + 8 lies row8 bytes on, its FP4 scales scale8 on (a matrix on this tile has no
 * rows past its last tile: rows % 64 == 0); FP8 scales are ld1 bytes apart along a row, a column
 * block 128 << chunk_shift columns. */
struct WgRows {
    const char *a, *sa;
};
struct WgStrides {
    int row8, scale8, ld1, chunk_shift;
};
/* the bytes a lane's loads start at in a row: FP8 16 of each 64, FP4 8 of each 32 */
__device__ __forceinline__ int wg_lane(int fmt, int q) { return fmt == WG_FP8 ? 16 * q : 8 * q; }

/* A step of a warp's two rows: FP8 16 bytes of each 64-column half, FP4 8 bytes; the scales raw
 * (FP8: the warp's f32 bits or e8m0 byte; FP4: each row's 4 e8m0 bytes). half: the warp's tile is
 * 8 rows (g only): row g + 8 is not loaded and reads as row g, its sums never stored. A warp keeps
 * BUFFERS of them, loaded BUFFERS - 1 steps before their use (ncu, H200, Flash FP4 experts at T =
 * 1: one step ahead, 16 KB in flight a multiprocessor, left 38% of the stall samples on the
 * loads; FP4 takes 3, FP8 2, as many as fit the 128 registers). */
template <int FMT> struct WgStep;
template <> struct WgStep<WG_FP8> { uint4 a[2], b[2]; uint32_t scale; static constexpr int BUFFERS = 2; };
template <> struct WgStep<WG_FP4> { uint2 a[2], b[2]; uint32_t sa, sb; static constexpr int BUFFERS = 3; };

/* A row's first load of a step asks L2 for its whole 128-byte line (load_stream<true>: FP8 the
 * step's line, FP4 this step's and the next's), the rest reads it. What bounds this tile is how
 * memory serves its loads, 64 or 128 bytes of each of a block's 128 rows kilobytes apart, not the
 * instructions (what-ifs on the H200, Flash at T = 1, UP ~40 us a layer, CUPTI timeline: without
 * the FP4 conversion 40-44, without the FP4 wgmmas 40, FP4 with 2 buffers 39-42; each FP4 tile
 * read in memory order instead, wrong values, 35-36 and DOWN 21 -> 17-19, at T = 3 UP 96 -> 79).
 * The line hint: UP 39-41 -> 38-39 us at T = 1 and 95-98 -> 89-93 at T = 3 (-5%); 64-byte
 * (.L2::64B) or 256-byte fetches changed nothing, nor did 128-byte ones on the dense GEMVs' loads.
 * Steps walked from a row-dependent start (each tile's blocks out of step with the others') made
 * UP 38 -> 44 us; the two warpgroups on alternate steps instead of halves, no change. */
template <int FMT, int SF>
__device__ __forceinline__ void wg_load(WgStep<FMT> &st, const WgRows &rows, int step, const WgStrides &sc, bool half)
{
    constexpr int ROW = FMT == WG_FP8 ? WG_STEP : WG_STEP / 2; /* a row's bytes a step */
    const char *a = rows.a + step * ROW, *b = a + sc.row8;
    if constexpr (FMT == WG_FP8) {
        st.a[0] = load_stream<true>(a), st.a[1] = load_stream(a + 64);
        if (!half) st.b[0] = load_stream<true>(b), st.b[1] = load_stream(b + 64);
        const char *s = rows.sa + (step >> sc.chunk_shift) * sc.ld1;
        st.scale = SF == DSRT_F32 ? load_scale32(s) : load_scale8(s);
    } else {
        const char *s = rows.sa + step * 4;
        st.a[0] = load_stream8<true>(a), st.a[1] = load_stream8(a + 32);
        st.sa = load_scale32(s);
        if (!half) {
            st.b[0] = load_stream8<true>(b), st.b[1] = load_stream8(b + 32);
            st.sb = load_scale32(s + sc.scale8);
        }
    }
}

__device__ __forceinline__ uint32_t uint4_word(const uint4 &v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

/* e8m0 byte j of a word as the f32 2^(b - 126), an octave above its value, so that every byte up
 * to 253 is a normal float's exponent (b = 0 included) and the decode is an extract and a multiply-
 * add, where e8m0_scale's subnormal takes a compare and a select more: 8 scales a step. The octave
 * comes back in the staged activation scale (FP4_X_SCALE_LOG2), exactly; 254 reads as inf (its
 * products overflow where the reference's came within an octave of doing so) and 255 as -0, made
 * NaN by wg_nan_rows. */
__device__ __forceinline__ float e8m0_octave_up(uint32_t w, int j)
{
    return __uint_as_float(((w >> (8 * j)) & 0xffu) * 0x800000u + 0x800000u);
}

/* The step, loaded: acc (rows g, g + 8 x tokens 2q, 2q + 1) += its products times the weight
 * scales and the activation scales x0, x1 of tokens 2q, 2q + 1 (the formulas at the top). FP4:
 * nan collects the scale words' 0xff bytes (e8m0's NaN), for wg_nan_rows at the tile's end.
 * b_low: the low word of the step's atom's descriptor (wgmma_desc_sw128_low). The whole
 * warpgroup calls it. */
template <int FMT, int SF>
__device__ __forceinline__ void wg_use(const WgStep<FMT> &st, uint32_t b_low, float x0, float x1, bool half, float (&acc)[4],
                                       uint32_t (&nan)[2])
{
    uint32_t a[4][4]; /* the four wgmmas' fragments, all before the fence: one fence serves them */
    if constexpr (FMT == WG_FP8) {
#pragma unroll
        for (int m = 0; m < 4; m++) {
            const uint4 ra = st.a[m >> 1], rb = half ? ra : st.b[m >> 1]; /* values: a selected reference puts st in memory */
            const int p = m & 1;
            a[m][0] = uint4_word(ra, 2 * p), a[m][1] = uint4_word(rb, 2 * p);
            a[m][2] = uint4_word(ra, 2 * p + 1), a[m][3] = uint4_word(rb, 2 * p + 1);
        }
    } else {
        const int q = threadIdx.x & 3;
#pragma unroll
        for (int h = 0; h < 2; h++) { /* blocks 2h and 2h + 1 */
            const uint2 rb = half ? st.a[h] : st.b[h];
            uint32_t wa[2], wb[2];
            fp4_exchange(st.a[h].x, st.a[h].y, q, wa[0], wa[1]);
            fp4_exchange(rb.x, rb.y, q, wb[0], wb[1]);
#pragma unroll
            for (int i = 0; i < 2; i++) {
                fp4_to_e4m3(wa[i], a[2 * h + i][0], a[2 * h + i][2]);
                fp4_to_e4m3(wb[i], a[2 * h + i][1], a[2 * h + i][3]);
            }
        }
    }
    float d[4][4];
    wgmma_fence();
    if constexpr (FMT == WG_FP8) {
        wgmma_m64n8k32_e4m3_rs(d[0], a[0], b_low);
#pragma unroll
        for (int m = 1; m < 4; m++) wgmma_m64n8k32_e4m3_rs_acc(d[0], a[m], b_low + 2 * m); /* 32 bytes further along K */
    } else {
#pragma unroll
        for (int j = 0; j < 4; j++) wgmma_m64n8k32_e4m3_rs(d[j], a[j], b_low + 2 * j); /* a block each: its own sum */
    }
    wgmma_commit();
    if constexpr (FMT == WG_FP8) {
        const float sw = SF == DSRT_F32 ? __uint_as_float(st.scale) : st.scale == 0xffu ? NAN : e8m0_scale(st.scale);
        const float f0 = sw * x0, f1 = sw * x1;
        wgmma_wait_all();
        wgmma_pin(d[0]);
        acc[0] = fmaf(d[0][0], f0, acc[0]);
        acc[1] = fmaf(d[0][1], f1, acc[1]);
        acc[2] = fmaf(d[0][2], f0, acc[2]);
        acc[3] = fmaf(d[0][3], f1, acc[3]);
    } else {
        const uint32_t sa = st.sa, sb = half ? st.sa : st.sb;
        nan[0] |= (0xfefefefeu - sa) & sa; /* a byte's top bit set here by 0xff only (e8m0_has_nan) */
        nan[1] |= (0xfefefefeu - sb) & sb;
        wgmma_wait_all();
        float p[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            wgmma_pin(d[j]);
            const float wa = e8m0_octave_up(sa, j), wb = e8m0_octave_up(sb, j);
            p[0] = j ? fmaf(d[j][0], wa, p[0]) : d[j][0] * wa;
            p[1] = j ? fmaf(d[j][1], wa, p[1]) : d[j][1] * wa;
            p[2] = j ? fmaf(d[j][2], wb, p[2]) : d[j][2] * wb;
            p[3] = j ? fmaf(d[j][3], wb, p[3]) : d[j][3] * wb;
        }
        acc[0] = fmaf(p[0], x0, acc[0]);
        acc[1] = fmaf(p[1], x1, acc[1]);
        acc[2] = fmaf(p[2], x0, acc[2]);
        acc[3] = fmaf(p[3], x1, acc[3]);
    }
}

/* A warp's walk over n_tiles tiles of `rounds` steps each through a ring of N register buffers,
 * fp8mma.cuh's walk_two_buffers for any N (that one stays as it is: the same loop written for N
 * made ptxas spill in moe_mma_kernel): a step's loads are issued N - 1 steps before it is used,
 * across tile boundaries. buf[0] holds step (0, 0), loaded by the caller; load(buffer, tile,
 * round) issues a step's loads and use(buffer, tile, round) consumes them. */
template <int N, class Step, class Load, class Use>
__device__ __forceinline__ void walk_buffers(Step (&buf)[N], int n_tiles, int rounds, Load load, Use use)
{
    int tile = 0, round = 0, load_tile = 0, load_round = 0;
    auto next = [&](int &t, int &r) {
        if (++r == rounds) r = 0, t++;
    };
#pragma unroll
    for (int k = 1; k < N - 1; k++) {
        next(load_tile, load_round);
        if (load_tile < n_tiles) load(buf[k], load_tile, load_round);
    }
    while (tile < n_tiles) {
#pragma unroll
        for (int k = 0; k < N; k++) { /* buffer indices known at compile time: the steps stay in registers */
            next(load_tile, load_round);
            if (load_tile < n_tiles) load(buf[(k + N - 1) % N], load_tile, load_round);
            use(buf[k], tile, round);
            next(tile, round);
            if (k < N - 1 && tile >= n_tiles) break; /* after the last buffer, the loop's own test */
        }
    }
}

/* A tile's end (FP4): rows whose scales held a NaN get NaN sums, and the marks are cleared */
__device__ __forceinline__ void wg_nan_rows(float (&acc)[4], uint32_t (&nan)[2])
{
    if (nan[0] & 0x80808080u) acc[0] = acc[1] = NAN;
    if (nan[1] & 0x80808080u) acc[2] = acc[3] = NAN;
    nan[0] = nan[1] = 0;
}

#endif
