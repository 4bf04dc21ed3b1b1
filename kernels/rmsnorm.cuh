/*
 * rmsnorm.cuh - the arithmetic of RMSNorm and the head norm (nn.c: normalise_rows,
 * normalise_rows_bf16), shared by norm.cu's kernels and hc.cu's collapse, which normalises its own
 * output when asked (nn.h: hc_pre's norm weight): one set of operations, so every kernel that
 * normalises a row gives the same bits (norm.cu's top comment says how they relate to the CPU's).
 */
#ifndef DSRTK_RMSNORM_CUH
#define DSRTK_RMSNORM_CUH

#include "act.cuh"

/* Sum of a double over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
 * `scratch` holds 33 doubles of shared memory; the block must not use it again before a barrier. */
__device__ __forceinline__ double block_sum(double v, double *scratch)
{
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0;
        for (int w = 0; w < warps; w++) t += scratch[w];
        scratch[32] = t;
    }
    __syncthreads();
    double total = scratch[32];
    __syncthreads(); /* scratch may be reused by the caller's next row */
    return total;
}

/* the row's 1/rms from the double sum of its squares, in the CPU's operations */
__device__ __forceinline__ float inv_rms(double acc, int64_t d, float eps, int head_bf16)
{
    if (head_bf16) { /* m = bf16(mean), me = bf16(m + eps), r = bf16(1/sqrt(me)) */
        float mean = round_bf16((float)(acc / (double)d));
        return round_bf16(__fdiv_rn(1.0f, __fsqrt_rn(round_bf16(__fadd_rn(mean, eps)))));
    }
    float mean = (float)(acc / (double)d);
    return __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, eps)));
}

/* eight values of a row times its 1/rms, then (w non-NULL) by the weights at column j, each an fp32
 * product as the CPU rounds it */
__device__ __forceinline__ void norm_scale8(float (&v)[8], float inv, const void *w, int w_dtype, int64_t j)
{
    float wv[8];
    if (w) ld8(w, w_dtype, j, wv);
#pragma unroll
    for (int i = 0; i < 8; i++) {
        v[i] = __fmul_rn(v[i], inv);
        if (w) v[i] = __fmul_rn(wv[i], v[i]);
    }
}

/* the square the CPU adds: fp32, bf16-rounded for the head norm */
__device__ __forceinline__ double square(float v, int head_bf16)
{
    float sq = __fmul_rn(v, v);
    return head_bf16 ? (double)round_bf16(sq) : (double)sq;
}

#endif
