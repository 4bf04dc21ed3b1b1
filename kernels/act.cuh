/*
 * act.cuh - loads and stores of activations, which the nn kernels take as bf16 or f32 (nn.h): an
 * element at a time, or four / eight contiguous ones with 8- or 16-byte accesses. The conversions
 * are numeric.h's, so a value round-trips exactly as on the CPU. Shared by norm.cu, hc.cu, and the
 * Q8 passes of linear.cu and moe.cu (a warp per row, a lane 4 columns of each block of 128).
 */
#ifndef DSRTK_ACT_CUH
#define DSRTK_ACT_CUH

#include <cuda_bf16.h>
#include "common.cuh"

/* launcher side: an activation's dtype must be one of the two */
static inline int check_float_dtype(const char *what, const char *name, int dtype)
{
    if (dtype != DSRT_F32 && dtype != DSRT_BF16)
        return dsrtk_fail(DSRTK_ERROR, "%s: %s has dtype %d, expected bf16 or f32", what, name, dtype);
    return DSRTK_OK;
}

/* a contiguous bf16/f32 element as f32, and an f32 value stored in the output's dtype */
__device__ __forceinline__ float ld(const void *p, int dtype, int64_t i)
{
    return dtype == DSRT_F32 ? ((const float *)p)[i] : dsrt_bf16_to_f32(((const uint16_t *)p)[i]);
}
__device__ __forceinline__ void st(void *p, int dtype, int64_t i, float v)
{
    if (dtype == DSRT_F32) ((float *)p)[i] = v;
    else ((uint16_t *)p)[i] = dsrt_f32_to_bf16(v);
}

/* v rounded to bf16 (numeric.h's rounding) and back: what a bf16 store then load gives */
__device__ __forceinline__ float round_bf16(float v) { return dsrt_bf16_to_f32(dsrt_f32_to_bf16(v)); }
/* the same value through the hardware's conversion: one instruction where numeric.h's codec takes
 * ~6 (a NaN may come out with other payload bits, still a NaN) */
__device__ __forceinline__ float round_bf16_hw(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

/* Eight contiguous elements at element i of p (16-byte aligned): one 16-byte access for bf16, two
 * for f32. */
__device__ __forceinline__ void ld8(const void *p, int dtype, int64_t i, float (&v)[8])
{
    if (dtype == DSRT_F32) {
        float4 a = ((const float4 *)p)[i / 4], b = ((const float4 *)p)[i / 4 + 1];
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    } else {
        uint4 a = ((const uint4 *)p)[i / 8];
        uint32_t w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
        for (int k = 0; k < 4; k++) v[2 * k] = dsrt_bits_f32(w[k] << 16), v[2 * k + 1] = dsrt_bits_f32(w[k] & 0xffff0000u);
    }
}
/* Element i of p (f32 or bf16, as ld reads it) into L1 ahead of its load. A latency-bound kernel
 * prefetches what it will read once its producer is done, all at once, so that the round trips of
 * loads its code issues one after another (the partial sums, then the weights they select, then
 * the rows they weigh) overlap in one. A hint: the bits never depend on it. */
__device__ __forceinline__ void prefetch_l1(const void *p, int dtype, int64_t i)
{
    asm volatile("prefetch.global.L1 [%0];" ::"l"((const char *)p + i * (dtype == DSRT_F32 ? 4 : 2)));
}
__device__ __forceinline__ void st8(void *p, int dtype, int64_t i, const float (&v)[8])
{
    if (dtype == DSRT_F32) {
        ((float4 *)p)[i / 4] = make_float4(v[0], v[1], v[2], v[3]);
        ((float4 *)p)[i / 4 + 1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
        uint32_t w[4];
#pragma unroll
        for (int k = 0; k < 4; k++) w[k] = dsrt_f32_to_bf16(v[2 * k]) | (uint32_t)dsrt_f32_to_bf16(v[2 * k + 1]) << 16;
        ((uint4 *)p)[i / 8] = make_uint4(w[0], w[1], w[2], w[3]);
    }
}

/* Four contiguous elements at element i of p (i a multiple of 4, p 16-byte aligned): one 8-byte
 * access for bf16, one 16-byte access for f32. */
__device__ __forceinline__ void ld4(const void *p, int dtype, int64_t i, float (&v)[4])
{
    if (dtype == DSRT_F32) {
        float4 a = ((const float4 *)p)[i / 4];
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
    } else {
        uint2 a = ((const uint2 *)p)[i / 4];
        v[0] = dsrt_bits_f32(a.x << 16), v[1] = dsrt_bits_f32(a.x & 0xffff0000u);
        v[2] = dsrt_bits_f32(a.y << 16), v[3] = dsrt_bits_f32(a.y & 0xffff0000u);
    }
}
__device__ __forceinline__ void st4(void *p, int dtype, int64_t i, const float (&v)[4])
{
    if (dtype == DSRT_F32) {
        ((float4 *)p)[i / 4] = make_float4(v[0], v[1], v[2], v[3]);
    } else {
        ((uint2 *)p)[i / 4] = make_uint2(dsrt_f32_to_bf16(v[0]) | (uint32_t)dsrt_f32_to_bf16(v[1]) << 16,
                                         dsrt_f32_to_bf16(v[2]) | (uint32_t)dsrt_f32_to_bf16(v[3]) << 16);
    }
}

/* A lane's four columns col .. col + 3 of a row of `cols` elements starting at element `row` of p:
 * one access when all four exist and `vec` (p 16-byte aligned, row a multiple of 4), else one at a
 * time; ok[e] says which exist, the others read 0. */
__device__ __forceinline__ void ld4_row(const void *p, int dtype, int64_t row, int64_t col, int64_t cols, bool vec,
                                        float (&v)[4], bool (&ok)[4])
{
#pragma unroll
    for (int e = 0; e < 4; e++) ok[e] = col + e < cols;
    if (vec && ok[3]) {
        ld4(p, dtype, row + col, v);
        return;
    }
#pragma unroll
    for (int e = 0; e < 4; e++) v[e] = ok[e] ? ld(p, dtype, row + col + e) : 0.0f;
}
__device__ __forceinline__ void st4_row(void *p, int dtype, int64_t row, int64_t col, int64_t cols, bool vec,
                                        const float (&v)[4])
{
    if (vec && col + 3 < cols) {
        st4(p, dtype, row + col, v);
        return;
    }
#pragma unroll
    for (int e = 0; e < 4; e++)
        if (col + e < cols) st(p, dtype, row + col + e, v[e]);
}

/* N four-element vectors of p at elements at[n] (multiples of 4, p 16-byte aligned), every load
 * issued before any value is used, the dtype tested once. ld4_row's branch a load made the compiler
 * issue each load right before its use, so a row pass's warp waited on its loads one after another
 * (ncu, the prefill SwiGLU: its 8 loads an iteration drew equal stall samples at their first uses). */
template <int N>
__device__ __forceinline__ void ld4_all(const void *p, int dtype, const int64_t (&at)[N], float (&v)[N][4])
{
    if (dtype == DSRT_F32) {
        float4 a[N];
#pragma unroll
        for (int n = 0; n < N; n++) a[n] = ((const float4 *)p)[at[n] / 4];
#pragma unroll
        for (int n = 0; n < N; n++) v[n][0] = a[n].x, v[n][1] = a[n].y, v[n][2] = a[n].z, v[n][3] = a[n].w;
    } else {
        uint2 a[N];
#pragma unroll
        for (int n = 0; n < N; n++) a[n] = ((const uint2 *)p)[at[n] / 4];
#pragma unroll
        for (int n = 0; n < N; n++) {
            v[n][0] = dsrt_bits_f32(a[n].x << 16), v[n][1] = dsrt_bits_f32(a[n].x & 0xffff0000u);
            v[n][2] = dsrt_bits_f32(a[n].y << 16), v[n][3] = dsrt_bits_f32(a[n].y & 0xffff0000u);
        }
    }
}

/* A row pass's loads: a warp reads 4 columns a lane of each block of ACT_BLOCK (the Q8 block) and
 * keeps ACT_U blocks in flight at once */
enum { ACT_BLOCK = 128, ACT_U = 4 };

/* One iteration of a warp's row pass: the lane's columns c0 + u * ACT_BLOCK + 4 * lane (u < U) of R
 * rows starting at elements row[r] of p, rows of `cols` elements (cols 0: nothing exists). Whole
 * blocks load through ld4_all, every load before any use; a row's ragged end, or an unaligned p,
 * column by column through ld4_row. ok[u][e] says which columns exist (the same in every row). */
template <int R, int U>
__device__ __forceinline__ void ld4_blocks(const void *p, int dtype, const int64_t (&row)[R], int64_t c0, int64_t cols,
                                           bool vec, float (&v)[R][U][4], bool (&ok)[U][4])
{
    const int lane = threadIdx.x % 32;
    if (vec && c0 + U * ACT_BLOCK <= cols) {
        int64_t at[R * U];
        float all[R * U][4];
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int u = 0; u < U; u++) at[r * U + u] = row[r] + c0 + u * ACT_BLOCK + 4 * lane;
        ld4_all<R * U>(p, dtype, at, all);
#pragma unroll
        for (int u = 0; u < U; u++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                ok[u][e] = true;
#pragma unroll
                for (int r = 0; r < R; r++) v[r][u][e] = all[r * U + u][e];
            }
        return;
    }
#pragma unroll
    for (int u = 0; u < U; u++)
#pragma unroll
        for (int r = 0; r < R; r++) ld4_row(p, dtype, row[r], c0 + u * ACT_BLOCK + 4 * lane, cols, vec, v[r][u], ok[u]);
}

/* A stager's unit u (row t, 128-column block u - t·nblk) by its row t = u / nblk, computed as
 * (u + 1/2) / nblk with the fast fp32 division, where an integer division took ~20 instructions
 * (with the element-at-a-time loads, a good part of the ~150 a unit the staging cost: ncu, H200,
 * wo_b at decode). Exact for the stagers' units (quotients below 64, nblk below 2^15): the
 * quotient lies at least 1/(2·nblk) from an integer, the division errs by two ulps, under 2^-17. */
__device__ __forceinline__ int unit_row(int u, int nblk) { return (int)__fdividef((float)u + 0.5f, (float)nblk); }

/* A Q8 stager's loads (fp8mma.cuh's mma_stage, wgtile.cuh's wg_stage): a warp's SB units u0,
 * u0 + step, ... of `units` (row t = u / nblk, its 128-column block u % nblk), the lane's 4 columns
 * of each, every load issued before any value is used. Row t's column 0 is element row_at(t) of p.
 * vec (p 16-byte aligned, every row_at a multiple of 4, cols whole blocks): one 8- or 16-byte access
 * a unit where an element at a time took four, which made the staging of a long row (wo_b's 8192
 * columns, 3 rows at a verify: 6 rounds of 4 units a warp) wait on the load pipe. Units past
 * `units` read row 0 and are not ok; ok[j][e] says which columns exist. */
template <int SB, class RowAt>
__device__ __forceinline__ void ld4_units(const void *p, int dtype, bool vec, int units, int nblk, int cols, int u0, int step,
                                          RowAt row_at, float (&v)[SB][4], bool (&ok)[SB][4])
{
    const int lane = threadIdx.x % 32;
    auto unit_at = [&](int j, int &col) { /* element of the lane's first column of unit j, and that column */
        const int u = u0 + j * step, t = u < units ? unit_row(u, nblk) : 0;
        col = (u < units ? u - t * nblk : 0) * ACT_BLOCK + 4 * lane;
        return row_at(t) + col;
    };
    if (vec) {
        int64_t at[SB];
        int col;
#pragma unroll
        for (int j = 0; j < SB; j++) at[j] = unit_at(j, col);
        ld4_all<SB>(p, dtype, at, v);
#pragma unroll
        for (int j = 0; j < SB; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) ok[j][e] = u0 + j * step < units;
        return;
    }
#pragma unroll
    for (int j = 0; j < SB; j++) {
        int col;
        const int64_t at = unit_at(j, col);
#pragma unroll
        for (int e = 0; e < 4; e++) {
            ok[j][e] = u0 + j * step < units && col + e < cols;
            v[j][e] = ok[j][e] ? ld(p, dtype, at + e) : 0.0f;
        }
    }
}

/* the launchers' test for ld4_row / st4_row's `vec`: a 16-byte aligned base, rows 4 elements apart */
static inline bool act_vec(const void *p, int64_t ld) { return (uintptr_t)p % 16 == 0 && ld % 4 == 0; }

#endif
