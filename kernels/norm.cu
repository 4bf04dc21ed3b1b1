/*
 * norm.cu - RMSNorm, the per-head q norm, the Q8/Q4 activation round trips, RoPE and the indexer's
 * Hadamard rotation on CUDA (runtime/nn.h; the C implementations in runtime/nn.c are the reference
 * each kernel is tested against).
 *
 * What this file protects: the GPU result equals the CPU's wherever the arithmetic allows it. So
 * every fp32 formula of nn.c is evaluated here in the same order with explicitly rounded
 * intrinsics (__fmul_rn, __fadd_rn, __fdiv_rn, ...): nvcc would otherwise fuse a·b + c into one
 * FMA, which rounds once where the CPU (gcc, ISO C: no contraction) rounds twice. The remaining
 * differences are named where they arise:
 *   - long sums of squares: the CPU sums in double in index order; here each thread sums in double
 *     and the partial sums meet as a tree. Both are rounded once to fp32 from a near-exact double,
 *     so they differ only when the exact mean sits within 2^-29 relative of an fp32 rounding
 *     boundary (then by one fp32 ulp of the mean);
 *   - cos/sin of RoPE: computed in double and rounded to fp32 (correctly rounded but for rare
 *     cases), where glibc's cosf/sinf err by up to ~0.56 ulp: a rare one-ulp difference.
 * The round trips share quant.h's code with the CPU (compiled __host__ __device__), so they are
 * bit-exact by construction; the Hadamard butterflies are additions in the CPU's stage order, also
 * bit-exact.
 *
 * Inputs arrive contiguous (the core makes the copies), bf16 or f32, read through numeric.h's
 * loads; outputs are bf16 (reference precision) or f32, written through numeric.h's stores, the
 * same rounding the CPU's final conversion uses. Launchers never allocate and never synchronise.
 */
#include <math.h>
#include "common.cuh"
#include "../runtime/quant.h"

/* ---- shared pieces ---- */

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

__device__ __forceinline__ float round_bf16(float v) { return dsrt_bf16_to_f32(dsrt_f32_to_bf16(v)); }

/* Sum of a double over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
 * `scratch` holds 33 doubles of shared memory; the block must not use it again before a barrier. */
__device__ double block_sum(double v, double *scratch)
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

/* ---- RMSNorm and the head norm (nn.c: normalise_rows, normalise_rows_bf16) ---- */

/* One block per row (grid-stride over rows). Per row of d elements it reads x twice (the second
 * time from L1/L2) and writes y once: 2·d·in + d·out bytes, ~4 FLOPs an element: memory bound. */
__global__ void __launch_bounds__(1024) rms_norm_kernel(const void *x, int x_dtype, const void *w, int w_dtype, void *y,
                                                        int y_dtype, int64_t rows, int64_t d, float eps, int head_bf16)
{
    __shared__ double scratch[33];
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const int64_t base = r * d;
        double acc = 0;
        for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
            float v = ld(x, x_dtype, base + j), sq = __fmul_rn(v, v);
            acc += head_bf16 ? (double)round_bf16(sq) : (double)sq;
        }
        acc = block_sum(acc, scratch);
        float inv;
        if (head_bf16) { /* m = bf16(mean), me = bf16(m + eps), r = bf16(1/sqrt(me)) */
            float mean = round_bf16((float)(acc / (double)d));
            inv = round_bf16(__fdiv_rn(1.0f, __fsqrt_rn(round_bf16(__fadd_rn(mean, eps)))));
        } else {
            float mean = (float)(acc / (double)d);
            inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, eps)));
        }
        for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
            float v = __fmul_rn(ld(x, x_dtype, base + j), inv);
            if (w) v = __fmul_rn(ld(w, w_dtype, j), v);
            st(y, y_dtype, base + j, v);
        }
    }
}

/* Eight contiguous elements at p + i (16-byte aligned): one 16-byte access for bf16, two for f32. */
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

/* rms_norm_kernel with 16-byte accesses, for d % 8 == 0 and 16-byte aligned x, w and y (the model's
 * rows): each element goes through the very same operations, so the bits are the same. */
__global__ void __launch_bounds__(1024) rms_norm_vec_kernel(const void *x, int x_dtype, const void *w, int w_dtype,
                                                            void *y, int y_dtype, int64_t rows, int64_t d, float eps,
                                                            int head_bf16)
{
    __shared__ double scratch[33];
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const int64_t base = r * d;
        double acc = 0;
        for (int64_t j = 8 * (int64_t)threadIdx.x; j < d; j += 8 * (int64_t)blockDim.x) {
            float v[8];
            ld8(x, x_dtype, base + j, v);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                float sq = __fmul_rn(v[k], v[k]);
                acc += head_bf16 ? (double)round_bf16(sq) : (double)sq;
            }
        }
        acc = block_sum(acc, scratch);
        float inv;
        if (head_bf16) {
            float mean = round_bf16((float)(acc / (double)d));
            inv = round_bf16(__fdiv_rn(1.0f, __fsqrt_rn(round_bf16(__fadd_rn(mean, eps)))));
        } else {
            float mean = (float)(acc / (double)d);
            inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, eps)));
        }
        for (int64_t j = 8 * (int64_t)threadIdx.x; j < d; j += 8 * (int64_t)blockDim.x) {
            float v[8], wv[8];
            ld8(x, x_dtype, base + j, v);
            if (w) ld8(w, w_dtype, j, wv);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                v[k] = __fmul_rn(v[k], inv);
                if (w) v[k] = __fmul_rn(wv[k], v[k]);
            }
            st8(y, y_dtype, base + j, v);
        }
    }
}

/* threads per block for rows of d: about one element per thread in flight for short rows, 256
 * (8 warps) from d = 1024 up */
static int row_block(int64_t d)
{
    int64_t t = (d + 3) / 4;
    if (t >= 256) return 256;
    t = (t + 31) / 32 * 32;
    return t < 32 ? 32 : (int)t;
}

extern "C" int dsrtk_nn_rms_norm(int dev, const void *x, int x_dtype, const void *w, int w_dtype, void *y,
                                 int y_dtype, int64_t rows, int64_t d, float eps, int head_bf16, void *stream)
{
    const char *what = head_bf16 ? "nn.head_rms_norm" : "nn.rms_norm";
    int rc = check_float_dtype(what, "x", x_dtype);
    if (!rc && w) rc = check_float_dtype(what, "weight", w_dtype);
    if (!rc) rc = check_float_dtype(what, "y", y_dtype);
    if (rc) return rc;
    if (rows <= 0 || d <= 0) return DSRTK_OK;
    DSRTK_SET_DEVICE(dev, what);
    int64_t grid = rows < (1 << 30) ? rows : (1 << 30);
    int aligned = d % 8 == 0 && (uintptr_t)x % 16 == 0 && (uintptr_t)y % 16 == 0 && (!w || (uintptr_t)w % 16 == 0);
    if (aligned) {
        rms_norm_vec_kernel<<<(unsigned)grid, row_block(d / 4), 0, (cudaStream_t)stream>>>(
            x, x_dtype, w, w_dtype, y, y_dtype, rows, d, eps, head_bf16);
        return dsrtk_check_launch("rms_norm_vec_kernel", dev);
    }
    rms_norm_kernel<<<(unsigned)grid, row_block(d), 0, (cudaStream_t)stream>>>(x, x_dtype, w, w_dtype, y, y_dtype, rows,
                                                                               d, eps, head_bf16);
    return dsrtk_check_launch("rms_norm_kernel", dev);
}

/* ---- Q8 / Q4 round trips (quant.h, nn.c: roundtrip_in_place) ---- */

/* One thread per (row, block) of the columns [first, first + count): the block's values go to a
 * local array and through quant.h's own dsrt_q8_roundtrip / dsrt_q4_roundtrip, the functions the
 * CPU runs, so the result is bit-exact. In place: each thread owns its block's elements. */
__global__ void __launch_bounds__(DSRTK_BLOCK) roundtrip_kernel(void *x, int dtype, int64_t rows, int64_t n,
                                                                int64_t first, int64_t count, int blk, int q4)
{
    int64_t blocks = (count + blk - 1) / blk, units = rows * blocks;
    for (int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; u < units; u += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = u / blocks, b = u % blocks;
        int64_t at = r * n + first + b * blk;
        int len = (int)(count - b * blk < blk ? count - b * blk : blk);
        float v[128];
        for (int i = 0; i < len; i++) v[i] = ld(x, dtype, at + i);
        if (q4) dsrt_q4_roundtrip(v, len); /* len <= 32: one block */
        else dsrt_q8_roundtrip(v, len, len);
        for (int i = 0; i < len; i++) st(x, dtype, at + i, v[i]);
    }
}

extern "C" int dsrtk_nn_roundtrip(int dev, void *x, int dtype, int64_t rows, int64_t n, int64_t first, int64_t count,
                                  int blk, int q4, void *stream)
{
    const char *what = q4 ? "nn.quant_roundtrip_q4" : "nn.quant_roundtrip_q8";
    int rc = check_float_dtype(what, "x", dtype);
    if (rc) return rc;
    if (q4) blk = 32;
    if (blk < 1 || blk > 128) return dsrtk_fail(DSRTK_ERROR, "%s: block size %d outside 1..128", what, blk);
    if (first < 0 || count < 0 || first > n - count)
        return dsrtk_fail(DSRTK_ERROR, "%s: columns [%lld, %lld) outside rows of %lld", what, (long long)first,
                          (long long)(first + count), (long long)n);
    if (rows <= 0 || count == 0) return DSRTK_OK;
    DSRTK_SET_DEVICE(dev, what);
    int64_t units = rows * ((count + blk - 1) / blk);
    roundtrip_kernel<<<dsrtk_grid_for(dev, units, DSRTK_BLOCK), DSRTK_BLOCK, 0, (cudaStream_t)stream>>>(
        x, dtype, rows, n, first, count, blk, q4);
    return dsrtk_check_launch("roundtrip_kernel", dev);
}

/* ---- RoPE (nn.c: dsrt_nn_rope) ---- */

struct RopeFreqs {
    float f[32]; /* DSRT_NN_ROPE_PAIRS, computed on the host by nn.c's rope_freqs: the CPU's bits */
};

/* One block per position t (grid-stride): 32 threads compute the token's cos/sin into shared
 * memory, then the block walks its heads × w outputs. θ = fp32(fp32(t)·f_i) exactly as the CPU;
 * cos and sin are evaluated in double and rounded (see the file comment). */
__global__ void __launch_bounds__(DSRTK_BLOCK) rope_kernel(const void *x, int x_dtype, void *y, int y_dtype,
                                                           const void *pos, int pos_dtype, int64_t S, int64_t heads,
                                                           int64_t w, const __grid_constant__ RopeFreqs freqs,
                                                           int inverse)
{
    __shared__ float cs[32], sn[32];
    const int64_t kept = w - 64, row_elems = heads * w;
    for (int64_t t = blockIdx.x; t < S; t += gridDim.x) {
        __syncthreads(); /* the previous position's readers are done with cs/sn */
        if (threadIdx.x < 32) {
            int64_t p = pos_dtype == DSRT_I64 ? ((const int64_t *)pos)[t] : (int64_t)((const int32_t *)pos)[t];
            float angle = __fmul_rn((float)p, freqs.f[threadIdx.x]); /* (float) of int64 rounds to nearest */
            cs[threadIdx.x] = (float)cos((double)angle);
            sn[threadIdx.x] = (float)sin((double)angle);
        }
        __syncthreads();
        const int64_t base = t * row_elems;
        for (int64_t e = threadIdx.x; e < row_elems; e += blockDim.x) {
            int64_t c = e % w, at = base + e;
            float out;
            if (c < kept) {
                out = ld(x, x_dtype, at);
            } else {
                int64_t k = c - kept;
                int i = (int)(k >> 1);
                float a = ld(x, x_dtype, at - (k & 1)), b = ld(x, x_dtype, at - (k & 1) + 1), cc = cs[i], ss = sn[i];
                /* (a + jb)·(c ± js) in fp32, the CPU's products and sums */
                if (!(k & 1)) out = inverse ? __fadd_rn(__fmul_rn(a, cc), __fmul_rn(b, ss)) : __fsub_rn(__fmul_rn(a, cc), __fmul_rn(b, ss));
                else out = inverse ? __fsub_rn(__fmul_rn(b, cc), __fmul_rn(a, ss)) : __fadd_rn(__fmul_rn(a, ss), __fmul_rn(b, cc));
            }
            st(y, y_dtype, at, out);
        }
    }
}

extern "C" int dsrtk_nn_rope(int dev, const void *x, int x_dtype, void *y, int y_dtype, const void *pos, int pos_dtype,
                             int64_t S, int64_t heads, int64_t w, const float *freqs, int inverse, void *stream)
{
    const char *what = "nn.rope";
    int rc = check_float_dtype(what, "x", x_dtype);
    if (!rc) rc = check_float_dtype(what, "y", y_dtype);
    if (rc) return rc;
    if (pos_dtype != DSRT_I32 && pos_dtype != DSRT_I64)
        return dsrtk_fail(DSRTK_ERROR, "%s: positions have dtype %d, expected i32 or i64", what, pos_dtype);
    if (w < 64) return dsrtk_fail(DSRTK_ERROR, "%s: vectors of %lld, narrower than the 64 rotated dims", what, (long long)w);
    if (S <= 0 || heads <= 0) return DSRTK_OK;
    DSRTK_SET_DEVICE(dev, what);
    RopeFreqs f;
    for (int i = 0; i < 32; i++) f.f[i] = freqs[i];
    int64_t grid = S < (1 << 30) ? S : (1 << 30);
    rope_kernel<<<(unsigned)grid, DSRTK_BLOCK, 0, (cudaStream_t)stream>>>(x, x_dtype, y, y_dtype, pos, pos_dtype, S,
                                                                          heads, w, f, inverse);
    return dsrtk_check_launch("rope_kernel", dev);
}

/* ---- Hadamard (nn.c: hadamard_row) ---- */

/* One warp per 128-vector, lane l holding elements 4l..4l+3. Stage h pairs j with j + h (bit h of
 * j clear): y_j = a + b, y_{j+h} = a − b for a = y_j, b = y_{j+h}, the CPU's exact operations;
 * stages 1 and 2 stay in a thread, stages 4..64 exchange with lane l ^ (h/4). Then × fp32(128^-½).
 * 512 (f32) or 256 (bf16) bytes in and out per vector, ~900 FLOPs: memory bound. */
__global__ void __launch_bounds__(DSRTK_BLOCK) hadamard_kernel(const void *x, int x_dtype, void *y, int y_dtype,
                                                               int64_t rows)
{
    const float scale = 0.08838834764831845f;
    const int lane = threadIdx.x & 31;
    const int64_t warps = (int64_t)gridDim.x * (blockDim.x >> 5);
    for (int64_t r = blockIdx.x * (int64_t)(blockDim.x >> 5) + (threadIdx.x >> 5); r < rows; r += warps) {
        float v[4];
        const int64_t at = r * 128 + 4 * lane;
        for (int i = 0; i < 4; i++) v[i] = ld(x, x_dtype, at + i);
        /* h = 1: (0,1), (2,3); h = 2: (0,2), (1,3) */
        float a0 = v[0], a1 = v[1], a2 = v[2], a3 = v[3];
        v[0] = __fadd_rn(a0, a1), v[1] = __fsub_rn(a0, a1), v[2] = __fadd_rn(a2, a3), v[3] = __fsub_rn(a2, a3);
        a0 = v[0], a1 = v[1], a2 = v[2], a3 = v[3];
        v[0] = __fadd_rn(a0, a2), v[2] = __fsub_rn(a0, a2), v[1] = __fadd_rn(a1, a3), v[3] = __fsub_rn(a1, a3);
        for (int h = 4; h < 128; h *= 2) {
            int upper = (4 * lane) & h; /* bit h of every element this lane holds */
            for (int i = 0; i < 4; i++) {
                float other = __shfl_xor_sync(0xffffffffu, v[i], h >> 2);
                v[i] = upper ? __fsub_rn(other, v[i]) : __fadd_rn(v[i], other);
            }
        }
        for (int i = 0; i < 4; i++) st(y, y_dtype, at + i, __fmul_rn(v[i], scale));
    }
}

extern "C" int dsrtk_nn_hadamard128(int dev, const void *x, int x_dtype, void *y, int y_dtype, int64_t rows,
                                    void *stream)
{
    const char *what = "nn.hadamard128";
    int rc = check_float_dtype(what, "x", x_dtype);
    if (!rc) rc = check_float_dtype(what, "y", y_dtype);
    if (rc) return rc;
    if (rows <= 0) return DSRTK_OK;
    DSRTK_SET_DEVICE(dev, what);
    int grid = dsrtk_grid_for(dev, rows * 32, DSRTK_BLOCK);
    hadamard_kernel<<<grid, DSRTK_BLOCK, 0, (cudaStream_t)stream>>>(x, x_dtype, y, y_dtype, rows);
    return dsrtk_check_launch("hadamard_kernel", dev);
}
