/*
 * act.cuh - loads and stores of activations, which the nn kernels take as bf16 or f32 (nn.h): an
 * element at a time, or eight contiguous ones with 16-byte accesses. The conversions are
 * numeric.h's, so a value round-trips exactly as on the CPU. Shared by norm.cu and hc.cu.
 */
#ifndef DSRTK_ACT_CUH
#define DSRTK_ACT_CUH

#include "common.cuh"

/* launcher side: an activation's dtype must be one of the two */
static int check_float_dtype(const char *what, const char *name, int dtype)
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

#endif
