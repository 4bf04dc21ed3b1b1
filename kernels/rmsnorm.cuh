/*
 * rmsnorm.cuh - the arithmetic of RMSNorm and the head norm (nn.c: normalise_rows,
 * normalise_rows_bf16), shared by norm.cu's kernels, hc.cu's collapse, which normalises its own
 * output when asked (nn.h: hc_pre's norm weight), and linear.cu's decode GEMV, which normalises its
 * input rows as it stages them (linear.h: dsrt_linear_forward_normed): one set of operations, so
 * every kernel that normalises a row gives the same bits (norm.cu's top comment says how they
 * relate to the CPU's).
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

/* eight values of a row times its 1/rms, then (wv non-NULL) by their weights wv, each an fp32
 * product as the CPU rounds it */
__device__ __forceinline__ void norm_scale8_by(float (&v)[8], float inv, const float *wv)
{
#pragma unroll
    for (int i = 0; i < 8; i++) {
        v[i] = __fmul_rn(v[i], inv);
        if (wv) v[i] = __fmul_rn(wv[i], v[i]);
    }
}

/* the same with the weights at column j of w (or none: NULL) */
__device__ __forceinline__ void norm_scale8(float (&v)[8], float inv, const void *w, int w_dtype, int64_t j)
{
    float wv[8];
    if (w) ld8(w, w_dtype, j, wv);
    norm_scale8_by(v, inv, w ? wv : nullptr);
}

/* the square the CPU adds: fp32, bf16-rounded for the head norm */
__device__ __forceinline__ double square(float v, int head_bf16)
{
    float sq = __fmul_rn(v, v);
    return head_bf16 ? (double)round_bf16(sq) : (double)sq;
}

/* the norm's weights of a thread's vectors (the g-th of G threads a row; w may be NULL) into L1
 * while the row loads: the norm reads them only after the row's sum, a second round trip otherwise */
template <int V, int G = 32>
__device__ __forceinline__ void prefetch_row_weights(const void *w, int w_dtype, int64_t width, int g)
{
    if (!w) return;
#pragma unroll
    for (int k = 0; k < V; k++) {
        const int64_t j = 8 * (int64_t)(g + G * k);
        if (j < width) prefetch_l1(w, w_dtype, j);
    }
}

/* the lane's share of a row in registers: the 8-element vectors lane, lane + 32, … (zeros past
 * width), the layout of rms_norm_rows_kernel<32, V> */
template <int V>
__device__ __forceinline__ void load_row(const void *x, int dtype, int64_t base, int64_t width, int lane, float (&v)[V][8])
{
#pragma unroll
    for (int k = 0; k < V; k++) {
        const int64_t j = 8 * (int64_t)(lane + 32 * k);
        if (j < width) {
            ld8(x, dtype, base + j, v[k]);
        } else {
#pragma unroll
            for (int i = 0; i < 8; i++) v[k][i] = 0.0f;
        }
    }
}

template <int V>
__device__ __forceinline__ void store_row(void *y, int dtype, int64_t base, int64_t width, int lane, const float (&v)[V][8])
{
#pragma unroll
    for (int k = 0; k < V; k++) {
        const int64_t j = 8 * (int64_t)(lane + 32 * k);
        if (j < width) st8(y, dtype, base + j, v[k]);
    }
}

/* RMSNorm of a row as load_row holds it (w [width] or NULL; head_bf16: the head norm's reference
 * rounding points), in rms_norm_rows_kernel<32, V>'s very operations: each lane's double sum of
 * squares in the same order, the same shuffle tree, the same 1/rms and products. Vectors past
 * width take no part, so a larger V than the width needs gives the same bits. loaded_w: the
 * weights already in registers (load_row's layout), which then stand for w. */
template <int V>
__device__ __forceinline__ void norm_row(float (&v)[V][8], const void *w, int w_dtype, int64_t width, float eps,
                                         int head_bf16, int lane, const float (*loaded_w)[8] = nullptr)
{
    double acc = 0;
#pragma unroll
    for (int k = 0; k < V; k++)
        if (8 * (int64_t)(lane + 32 * k) < width)
#pragma unroll
            for (int i = 0; i < 8; i++) acc += square(v[k][i], head_bf16);
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    const float inv = inv_rms(acc, width, eps, head_bf16);
#pragma unroll
    for (int k = 0; k < V; k++) {
        const int64_t j = 8 * (int64_t)(lane + 32 * k);
        if (j >= width) continue;
        norm_scale8(v[k], inv, w, w_dtype, j);
    }
}

#endif
