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
 *
 * Speed: these ops are memory bound, so each has a path for the model's layouts (rows a multiple of
 * 8 elements, 16-byte aligned) that moves 16 bytes per access and reads its input once: RMSNorm
 * keeps the row in registers (a warp per row up to 1024, the block up to 8192), the round trips give
 * a thread 8 elements and meet over a quantisation block with shuffles, RoPE takes 8 columns at a
 * time and splits a position over several blocks when positions are few. Every other layout takes
 * the one-element-at-a-time kernel, with the same operations, so both paths give the same bits.
 *
 * The attention layer's pass after a projection (norm_rope_kernel, nn.h dsrt_nn_norm_rope) chains
 * RMSNorm or the head norm, RoPE and the Q8 or Hadamard + Q4 round trip with the vector in one
 * warp's registers, each step the very operations of the kernel above that it replaces (RoPE's are
 * rope.cuh's, shared with sparse_attention.cu), so the chain gives their bits and a decode step
 * pays one launch where it paid three to six.
 */
#include <math.h>
#include "act.cuh"
#include "q8.cuh"
#include "rmsnorm.cuh"
#include "rope.cuh"
#include "../runtime/quant.h"

/* Any layout: one block per row (grid-stride), x read twice (the second time from L1/L2). */
__global__ void __launch_bounds__(1024) rms_norm_kernel(const void *x, int x_dtype, const void *w, int w_dtype, void *y,
                                                        int y_dtype, int64_t rows, int64_t d, float eps, int head_bf16)
{
    __shared__ double scratch[33];
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const int64_t base = r * d;
        double acc = 0;
        for (int64_t j = threadIdx.x; j < d; j += blockDim.x) acc += square(ld(x, x_dtype, base + j), head_bf16);
        const float inv = inv_rms(block_sum(acc, scratch), d, eps, head_bf16);
        for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
            float v = __fmul_rn(ld(x, x_dtype, base + j), inv);
            if (w) v = __fmul_rn(ld(w, w_dtype, j), v);
            st(y, y_dtype, base + j, v);
        }
    }
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

/* Rows of d % 8 == 0 with 16-byte aligned x, w, y (the model's): a group of G threads per row (a warp
 * for d <= 1024, the block of 256 for d <= 8192), each holding V vectors of 8
 * in registers, so x is read from HBM once: d·|x| in, d·|y| out (+ w from L2). The sum of squares
 * is per thread in double, then a shuffle tree (and block_sum across warps for G = 256); the
 * elements go through rms_norm_kernel's very operations, so the bits are the same. */
template <int G, int V>
__global__ void __launch_bounds__(256) rms_norm_rows_kernel(const void *x, int x_dtype, const void *w, int w_dtype,
                                                            void *y, int y_dtype, int64_t rows, int64_t d, float eps,
                                                            int head_bf16)
{
    dsrtk_wait_producer(); /* launched dependent (common.cuh) */
    __shared__ double scratch[33];
    constexpr int RPB = 256 / G; /* rows per block */
    const int g = threadIdx.x % G;
    prefetch_row_weights<V, G>(w, w_dtype, d, g);
    for (int64_t r = blockIdx.x * (int64_t)RPB + threadIdx.x / G; r - threadIdx.x / G < rows; r += (int64_t)gridDim.x * RPB) {
        /* the loop condition is uniform over the block (G = 256: one row) or the warp (G = 32) */
        const bool live = r < rows;
        const int64_t base = r * d;
        float v[V][8];
        double acc = 0;
#pragma unroll
        for (int k = 0; k < V; k++) {
            const int64_t j = 8 * (int64_t)(g + k * G);
            if (live && j < d) {
                ld8(x, x_dtype, base + j, v[k]);
#pragma unroll
                for (int i = 0; i < 8; i++) acc += square(v[k][i], head_bf16);
            }
        }
        if (G == 32) {
            for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        } else {
            acc = block_sum(acc, scratch);
        }
        const float inv = inv_rms(acc, d, eps, head_bf16);
#pragma unroll
        for (int k = 0; k < V; k++) {
            const int64_t j = 8 * (int64_t)(g + k * G);
            if (!live || j >= d) continue;
            norm_scale8(v[k], inv, w, w_dtype, j);
            st8(y, y_dtype, base + j, v[k]);
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

template <int G, int V>
static void launch_rows(int64_t rows, cudaStream_t cs, const void *x, int x_dtype, const void *w, int w_dtype, void *y,
                        int y_dtype, int64_t d, float eps, int head_bf16)
{
    int64_t blocks = (rows + 256 / G - 1) / (256 / G);
    if (blocks > (1 << 30)) blocks = 1 << 30;
    (void)dsrtk_launch_dependent(rms_norm_rows_kernel<G, V>, dim3((unsigned)blocks), dim3(256), 0, cs, x, x_dtype, w, w_dtype, y,
                                 y_dtype, rows, d, eps, head_bf16);
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
    cudaStream_t cs = (cudaStream_t)stream;
    const int aligned = d % 8 == 0 && (uintptr_t)x % 16 == 0 && (uintptr_t)y % 16 == 0 && (!w || (uintptr_t)w % 16 == 0);
    const int64_t vecs = d / 8;
    if (aligned && vecs <= 32 * 4) { /* a warp per row: the head norm's 512, the KV norm's */
        if (vecs <= 32) launch_rows<32, 1>(rows, cs, x, x_dtype, w, w_dtype, y, y_dtype, d, eps, head_bf16);
        else if (vecs <= 64) launch_rows<32, 2>(rows, cs, x, x_dtype, w, w_dtype, y, y_dtype, d, eps, head_bf16);
        else launch_rows<32, 4>(rows, cs, x, x_dtype, w, w_dtype, y, y_dtype, d, eps, head_bf16);
        return dsrtk_check_launch("rms_norm_rows_kernel", dev);
    }
    if (aligned && vecs <= 256 * 4) { /* a block per row: the model's 4096 */
        if (vecs <= 256) launch_rows<256, 1>(rows, cs, x, x_dtype, w, w_dtype, y, y_dtype, d, eps, head_bf16);
        else if (vecs <= 512) launch_rows<256, 2>(rows, cs, x, x_dtype, w, w_dtype, y, y_dtype, d, eps, head_bf16);
        else launch_rows<256, 4>(rows, cs, x, x_dtype, w, w_dtype, y, y_dtype, d, eps, head_bf16);
        return dsrtk_check_launch("rms_norm_rows_kernel", dev);
    }
    int64_t grid = rows < (1 << 30) ? rows : (1 << 30);
    rms_norm_kernel<<<(unsigned)grid, row_block(d), 0, cs>>>(x, x_dtype, w, w_dtype, y, y_dtype, rows, d, eps, head_bf16);
    return dsrtk_check_launch("rms_norm_kernel", dev);
}

/* ---- Q8 / Q4 round trips (quant.h, nn.c: roundtrip_in_place) ---- */

/* Any layout: one thread per (row, block) of the columns [first, first + count): the block's values
 * go to a local array and through quant.h's own dsrt_q8_roundtrip / dsrt_q4_roundtrip, the functions
 * the CPU runs, so the result is bit-exact. In place: each thread owns its block's elements. */
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

/* The model's layouts (blk a power of two from 8 to 128; first, count, n multiples of 8; x 16-byte
 * aligned): a thread per 8 elements with one 16-byte load and store, the L = blk/8 lanes of a block
 * meeting with shuffles for its amax. The scale and the codes are quant.h's operations one for one
 * (dsrt_q8_block / dsrt_q4_roundtrip): amax starts at the floor and takes every larger |x| (a max,
 * so the order does not matter), s = pow2_ceil(amax·(1/max)), x/s clamped, coded, decoded, ×s.
 * No grid-stride loop: every lane of a warp reaches the shuffles; lanes past the end, or past
 * `count` in a short last block, load zeros (below the floor) and store nothing.
 * Bytes: 2·count·|x| per row; Q8 codes through q8.cuh (the hardware conversions), Q4 through numeric.h's codec. */
template <bool Q4>
__global__ void __launch_bounds__(DSRTK_BLOCK) roundtrip_vec_kernel(void *x, int dtype, int64_t rows, int64_t n,
                                                                    int64_t first, int64_t count, int blk)
{
    const int L = blk / 8;
    const int64_t per_row = (count + blk - 1) / blk * L, units = rows * per_row; /* whole blocks of lanes */
    const int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    const int64_t r = u < units ? u / per_row : 0, col = 8 * (u < units ? u % per_row : 0);
    const bool have = u < units && col < count;
    const int64_t at = r * n + first + col;
    float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (have) ld8(x, dtype, at, v);
    const float max_code = Q4 ? 6.0f : 448.0f;
    float amax = Q4 ? 6.0f * 1.17549435e-38f : 1e-4f;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        float a = v[i] < 0 ? -v[i] : v[i];
        if (a > amax) amax = a;
    }
    for (int o = 1; o < L; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const float s = dsrt_pow2_ceil(amax * (1.0f / max_code));
    if (!have) return;
    if (Q4) {
#pragma unroll
        for (int i = 0; i < 8; i++) {
            float q = v[i] / s;
            q = q > max_code ? max_code : q < -max_code ? -max_code : q;
            v[i] = dsrt_fp4_to_f32(dsrt_f32_to_fp4(q)) * s;
        }
    } else {
        q8_roundtrip(v, s); /* q8.cuh: quant.h's bits, on the hardware's conversions */
    }
    st8(x, dtype, at, v);
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
    cudaStream_t cs = (cudaStream_t)stream;
    const int64_t threads = rows * ((count + blk - 1) / blk) * (blk / 8), grid = (threads + DSRTK_BLOCK - 1) / DSRTK_BLOCK;
    if (blk >= 8 && (blk & (blk - 1)) == 0 && first % 8 == 0 && count % 8 == 0 && n % 8 == 0 && (uintptr_t)x % 16 == 0 &&
        grid < INT32_MAX) {
        if (q4) roundtrip_vec_kernel<true><<<(unsigned)grid, DSRTK_BLOCK, 0, cs>>>(x, dtype, rows, n, first, count, blk);
        else roundtrip_vec_kernel<false><<<(unsigned)grid, DSRTK_BLOCK, 0, cs>>>(x, dtype, rows, n, first, count, blk);
        return dsrtk_check_launch("roundtrip_vec_kernel", dev);
    }
    int64_t units = rows * ((count + blk - 1) / blk);
    roundtrip_kernel<<<dsrtk_grid_for(dev, units, DSRTK_BLOCK), DSRTK_BLOCK, 0, cs>>>(x, dtype, rows, n, first, count,
                                                                                     blk, q4);
    return dsrtk_check_launch("roundtrip_kernel", dev);
}

/* ---- RoPE (nn.c: dsrt_nn_rope) ---- */

/* Block (position t, part): 32 threads compute the token's cos/sin into shared memory, then the
 * block walks its part of the heads × w outputs: VEC (w % 8 == 0, 16-byte aligned x and y) 8 at a
 * time with 16-byte accesses (a vector lies wholly in the kept or the rotated columns, its pairs
 * whole, as kept = w − 64 is a multiple of 8), else one at a time. θ = fp32(fp32(t)·f_i) exactly as
 * the CPU; cos and sin are evaluated in double and rounded (see the file comment). Several parts a
 * position when positions are few (decode), so that the grid fills the machine.
 * Bytes: heads·w·(|x| + |y|) a position, 6 FLOPs a rotated pair: memory bound. */
template <bool VEC>
__global__ void __launch_bounds__(DSRTK_BLOCK) rope_kernel(const void *x, int x_dtype, void *y, int y_dtype,
                                                           const void *pos, int pos_dtype, int64_t heads, int64_t w,
                                                           const __grid_constant__ RopeFreqs freqs, int inverse)
{
    __shared__ float cs[32], sn[32];
    const int64_t t = blockIdx.x, kept = w - 64, row_elems = heads * w;
    if (threadIdx.x < 32) {
        int64_t p = pos_dtype == DSRT_I64 ? ((const int64_t *)pos)[t] : (int64_t)((const int32_t *)pos)[t];
        rope_cos_sin(p, freqs.f[threadIdx.x], cs[threadIdx.x], sn[threadIdx.x]);
    }
    __syncthreads();
    const int64_t base = t * row_elems;
    if (VEC) {
        const int64_t nv = row_elems / 8, wv = w / 8, per = (nv + gridDim.y - 1) / gridDim.y;
        const int64_t v1 = (blockIdx.y + 1) * per < nv ? (blockIdx.y + 1) * per : nv;
        for (int64_t v = blockIdx.y * per + threadIdx.x; v < v1; v += blockDim.x) {
            const int64_t c = 8 * (v % wv), at = base + 8 * v;
            float in[8], out[8];
            ld8(x, x_dtype, at, in);
            if (c < kept) {
#pragma unroll
                for (int i = 0; i < 8; i++) out[i] = in[i];
            } else {
                const int i0 = (int)((c - kept) >> 1);
#pragma unroll
                for (int p = 0; p < 4; p++) rope_rotate(in[2 * p], in[2 * p + 1], cs[i0 + p], sn[i0 + p], inverse, out[2 * p], out[2 * p + 1]);
            }
            st8(y, y_dtype, at, out);
        }
        return;
    }
    const int64_t per = (row_elems + gridDim.y - 1) / gridDim.y;
    const int64_t e1 = (blockIdx.y + 1) * per < row_elems ? (blockIdx.y + 1) * per : row_elems;
    for (int64_t e = blockIdx.y * per + threadIdx.x; e < e1; e += blockDim.x) {
        int64_t c = e % w, at = base + e;
        float out;
        if (c < kept) {
            out = ld(x, x_dtype, at);
        } else {
            int64_t k = c - kept;
            int i = (int)(k >> 1);
            float o0, o1;
            rope_rotate(ld(x, x_dtype, at - (k & 1)), ld(x, x_dtype, at - (k & 1) + 1), cs[i], sn[i], inverse, o0, o1);
            out = k & 1 ? o1 : o0;
        }
        st(y, y_dtype, at, out);
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
    if (S > INT32_MAX) return dsrtk_fail(DSRTK_ERROR, "%s: %lld positions are too many for one launch", what, (long long)S);
    DSRTK_SET_DEVICE(dev, what);
    RopeFreqs f;
    for (int i = 0; i < 32; i++) f.f[i] = freqs[i];
    const bool vec = w % 8 == 0 && (uintptr_t)x % 16 == 0 && (uintptr_t)y % 16 == 0;
    /* parts per position: up to ~2 blocks a multiprocessor in all, at least 2 vectors (or elements) a thread */
    const int64_t work = vec ? heads * w / 8 : heads * w;
    int64_t parts = (2 * dsrtk_multiprocessors(dev) + S - 1) / S, most = (work + 2 * DSRTK_BLOCK - 1) / (2 * DSRTK_BLOCK);
    if (parts > most) parts = most;
    if (parts < 1) parts = 1;
    if (parts > 65535) parts = 65535;
    const dim3 grid((unsigned)S, (unsigned)parts);
    cudaStream_t cs = (cudaStream_t)stream;
    if (vec) rope_kernel<true><<<grid, DSRTK_BLOCK, 0, cs>>>(x, x_dtype, y, y_dtype, pos, pos_dtype, heads, w, f, inverse);
    else rope_kernel<false><<<grid, DSRTK_BLOCK, 0, cs>>>(x, x_dtype, y, y_dtype, pos, pos_dtype, heads, w, f, inverse);
    return dsrtk_check_launch("rope_kernel", dev);
}

/* ---- Hadamard (nn.c: hadamard_row) ---- */

/* One warp per 128-vector, lane l holding elements 4l..4l+3 (one 8-byte bf16 or 16-byte f32 access
 * when vec: x and y aligned so). Stage h pairs j with j + h (bit h of j clear): y_j = a + b,
 * y_{j+h} = a − b for a = y_j, b = y_{j+h}, the CPU's exact operations; stages 1 and 2 stay in a
 * thread, stages 4..64 exchange with lane l ^ (h/4). Then × fp32(128^-½).
 * 512 (f32) or 256 (bf16) bytes in and out per vector, ~900 FLOPs: memory bound. */
__device__ __forceinline__ void ld4(const void *p, int dtype, int64_t i, int vec, float (&v)[4])
{
    if (vec && dtype == DSRT_F32) {
        float4 a = ((const float4 *)p)[i / 4];
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
    } else if (vec) {
        uint2 a = ((const uint2 *)p)[i / 4];
        v[0] = dsrt_bits_f32(a.x << 16), v[1] = dsrt_bits_f32(a.x & 0xffff0000u);
        v[2] = dsrt_bits_f32(a.y << 16), v[3] = dsrt_bits_f32(a.y & 0xffff0000u);
    } else {
        for (int k = 0; k < 4; k++) v[k] = ld(p, dtype, i + k);
    }
}
__device__ __forceinline__ void st4(void *p, int dtype, int64_t i, int vec, const float (&v)[4])
{
    if (vec && dtype == DSRT_F32) {
        ((float4 *)p)[i / 4] = make_float4(v[0], v[1], v[2], v[3]);
    } else if (vec) {
        ((uint2 *)p)[i / 4] = make_uint2(dsrt_f32_to_bf16(v[0]) | (uint32_t)dsrt_f32_to_bf16(v[1]) << 16,
                                         dsrt_f32_to_bf16(v[2]) | (uint32_t)dsrt_f32_to_bf16(v[3]) << 16);
    } else {
        for (int k = 0; k < 4; k++) st(p, dtype, i + k, v[k]);
    }
}

__global__ void __launch_bounds__(DSRTK_BLOCK) hadamard_kernel(const void *x, int x_dtype, void *y, int y_dtype,
                                                               int64_t rows, int vec_x, int vec_y)
{
    const float scale = 0.08838834764831845f;
    const int lane = threadIdx.x & 31;
    const int64_t warps = (int64_t)gridDim.x * (blockDim.x >> 5);
    for (int64_t r = blockIdx.x * (int64_t)(blockDim.x >> 5) + (threadIdx.x >> 5); r < rows; r += warps) {
        float v[4];
        const int64_t at = r * 128 + 4 * lane;
        ld4(x, x_dtype, at, vec_x, v);
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
        for (int i = 0; i < 4; i++) v[i] = __fmul_rn(v[i], scale);
        st4(y, y_dtype, at, vec_y, v);
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
    /* the vector accesses need 4 elements' alignment: 16 bytes for f32, 8 for bf16 */
    const int vec_x = (uintptr_t)x % (x_dtype == DSRT_F32 ? 16 : 8) == 0;
    const int vec_y = (uintptr_t)y % (y_dtype == DSRT_F32 ? 16 : 8) == 0;
    int grid = dsrtk_grid_for(dev, rows * 32, DSRTK_BLOCK);
    hadamard_kernel<<<grid, DSRTK_BLOCK, 0, (cudaStream_t)stream>>>(x, x_dtype, y, y_dtype, rows, vec_x, vec_y);
    return dsrtk_check_launch("hadamard_kernel", dev);
}

/* ---- the attention layer's passes after a projection (nn.c: dsrt_nn_norm_rope, dsrt_nn_q_kv_norm) ---- */

/* Kinds of the pass's steps, the values of nn.h's dsrt_nn_norm and dsrt_nn_post (kernels.h) */
enum { NORM_NONE = 0, NORM_RMS = 1, NORM_HEAD = 2 };
enum { POST_NONE = 0, POST_Q8 = 1, POST_HADAMARD_Q4 = 2 };

struct NormRopeArgs {
    const void *x, *w; /* x [rows, width] (rows = S·heads), w [width] or NULL: contiguous, 16-byte aligned */
    void *y;           /* [rows, width], y_dtype */
    int x_dtype, w_dtype, y_dtype, norm, post, ref;
    int64_t rows, heads, width, first, step; /* row r is at position first + (r / heads)·step */
    int rows_per_warp; /* consecutive rows of one position a warp (heads a multiple of it; 1 with `also`) */
    float eps;
    dsrtk_norm_job also; /* warps past `rows`: its plain RMSNorm (also.rows 0: none) */
};

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

/* store_row for bf16-exact values into bf16: the upper halves of their f32 bits, one byte permute
 * a pair (the rounding store costs ~6 instructions a value, and norm_rope_kernel is bound by its
 * instructions) */
template <int V>
__device__ __forceinline__ void store_row_bf16_exact(void *y, int64_t base, int64_t width, int lane, const float (&v)[V][8])
{
#pragma unroll
    for (int k = 0; k < V; k++) {
        const int64_t j = 8 * (int64_t)(lane + 32 * k);
        if (j >= width) continue;
        uint32_t w[4];
#pragma unroll
        for (int i = 0; i < 4; i++)
            w[i] = __byte_perm(__float_as_uint(v[k][2 * i]), __float_as_uint(v[k][2 * i + 1]), 0x7632);
        ((uint4 *)y)[(base + j) / 8] = make_uint4(w[0], w[1], w[2], w[3]);
    }
}

/* RMSNorm of a row as load_row holds it (w [width] or NULL; head_bf16: the head norm's reference
 * rounding points), in rms_norm_rows_kernel<32, V>'s very operations: each lane's double sum of
 * squares in the same order, the same shuffle tree, the same 1/rms and products */
template <int V>
__device__ __forceinline__ void norm_row(float (&v)[V][8], const void *w, int w_dtype, int64_t width, float eps,
                                         int head_bf16, int lane)
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

/* dsrt_fp4_to_f32(dsrt_f32_to_fp4(q)) for |q| <= 6 or NaN, in float arithmetic: e2m1's grid is
 * steps of 1/2 below 2, of 1 to 4, of 2 to 6, and a tie's even code is the even multiple of its
 * step, which rintf's ties-to-even picks. Checked over every such float (quant.h's codec, CPU):
 * the same bits, -0 kept, NaN -> +0. ~8 instructions where the codec's compare chain takes ~40. */
__device__ __forceinline__ float fp4_round_trip(float q)
{
    const float x = fabsf(q);
    const float y = x < 2.0f ? rintf(2.0f * x) * 0.5f : x < 4.0f ? rintf(x) : 2.0f * rintf(0.5f * x);
    return q != q ? 0.0f : copysignf(y, q);
}

/* norm_rope_kernel's pass over row r (my_cs, my_sn: lane l's RoPE pair l at the row's position) */
template <int V>
__device__ __forceinline__ void norm_rope_row(const NormRopeArgs &a, int64_t r, int lane, float my_cs, float my_sn)
{
    const int64_t base = r * a.width, kept = a.width - 64;
    float v[V][8];
    load_row<V>(a.x, a.x_dtype, base, a.width, lane, v);
    if (a.norm != NORM_NONE) {
        norm_row<V>(v, a.w, a.w_dtype, a.width, a.eps, a.norm == NORM_HEAD && a.ref, lane);
        if (a.ref)
#pragma unroll
            for (int k = 0; k < V; k++)
#pragma unroll
                for (int i = 0; i < 8; i++) v[k][i] = round_bf16_hw(v[k][i]);
    }
    /* RoPE: lane l computes pair l's cos and sin (above: one of each, as rope_kernel's 32 threads
     * do), the lanes holding the rotated vectors take theirs with shuffles */
#pragma unroll
    for (int k = 0; k < V; k++) {
        const int64_t j = 8 * (int64_t)(lane + 32 * k);
        if (kept < 256 * (k + 1) && kept + 64 > 256 * k) { /* uniform: some lane's vector k is rotated */
            const bool rot = j >= kept && j < a.width;
            const int i0 = rot ? (int)((j - kept) >> 1) : 0;
#pragma unroll
            for (int q = 0; q < 4; q++) {
                const float cs = __shfl_sync(0xffffffffu, my_cs, i0 + q), sn = __shfl_sync(0xffffffffu, my_sn, i0 + q);
                if (rot) rope_rotate(v[k][2 * q], v[k][2 * q + 1], cs, sn, 0, v[k][2 * q], v[k][2 * q + 1]);
            }
        }
        if (a.ref && j < a.width)
#pragma unroll
            for (int i = 0; i < 8; i++) v[k][i] = round_bf16_hw(v[k][i]);
    }
    if (a.post == POST_Q8 && a.ref) {
#pragma unroll
        for (int k = 0; k < V; k++) {
            const bool in = 8 * (int64_t)(lane + 32 * k) < kept;
            float amax = 1e-4f;
            if (in)
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    float m = v[k][i] < 0 ? -v[k][i] : v[k][i];
                    if (m > amax) amax = m;
                }
            for (int o = 1; o < 8; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
            if (in) q8_roundtrip(v[k], dsrt_pow2_ceil(amax * (1.0f / 448.0f)));
        }
    }
    if (a.post == POST_HADAMARD_Q4) { /* V == 1, width 128: the host checks */
        float *u = v[0];
#pragma unroll
        for (int h = 1; h < 8; h *= 2)
#pragma unroll
            for (int i = 0; i < 8; i++)
                if (!(i & h)) {
                    const float x0 = u[i], x1 = u[i + h];
                    u[i] = __fadd_rn(x0, x1);
                    u[i + h] = __fsub_rn(x0, x1);
                }
        for (int h = 8; h < 128; h *= 2) {
            const int upper = (8 * lane) & h; /* bit h of every element this lane holds */
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const float other = __shfl_xor_sync(0xffffffffu, u[i], h >> 3);
                u[i] = upper ? __fsub_rn(other, u[i]) : __fadd_rn(u[i], other);
            }
        }
#pragma unroll
        for (int i = 0; i < 8; i++) {
            u[i] = __fmul_rn(u[i], 0.08838834764831845f);
            if (a.ref) u[i] = round_bf16_hw(u[i]);
        }
        if (a.ref) {
            float amax = 6.0f * 1.17549435e-38f;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                float m = u[i] < 0 ? -u[i] : u[i];
                if (m > amax) amax = m;
            }
            for (int o = 1; o < 4; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
            const float s = dsrt_pow2_ceil(amax * (1.0f / 6.0f)), inv = q8_inverse(s); /* exact: s = 2^e */
#pragma unroll
            for (int i = 0; i < 8; i++) {
                float q = u[i] * inv;
                q = q > 6.0f ? 6.0f : q < -6.0f ? -6.0f : q;
                u[i] = fp4_round_trip(q) * s;
            }
        }
    }
    if (a.y_dtype == DSRT_BF16) store_row_bf16_exact<V>(a.y, base, a.width, lane, v); /* ref: bf16-exact values */
    else store_row<V>(a.y, DSRT_F32, base, a.width, lane, v);
}

/* The norm -> RoPE -> round trip sequence of one vector in one warp, each step the very
 * operations of the separate kernel it replaces on the model's aligned rows, so the result has
 * their bits:
 *   - the norm (norm_row) as rms_norm_rows_kernel<32, V>, the path dsrtk_nn_rms_norm takes for
 *     16-byte aligned rows of width <= 1024, rounded to bf16 in reference precision as its bf16
 *     output is;
 *   - RoPE of the last 64 columns (whole vectors, pairs whole as width − 64 is a multiple of 8):
 *     rope.cuh's cos/sin (lane l computes pair l's) and rotation at the row's position, every value
 *     rounded to bf16 in reference precision as rope_kernel's bf16 output is;
 *   - Q8 (reference): the 8 lanes of a block of 64 columns meet for its amax with shuffles, as
 *     roundtrip_vec_kernel's lanes do (columns past width − 64 count as the floor, as its lanes past
 *     `count` do), then quant.h's scale and codes;
 *   - Hadamard + Q4 (width 128, lanes 0..15 hold it): the butterflies of hadamard_kernel, stages
 *     1, 2, 4 inside a lane and 8 … 64 with the lane l ^ (h/8), each y_j = a + b, y_{j+h} = a − b
 *     on the same operands, × fp32(128^-½), rounded to bf16 in reference precision; then Q4 over
 *     blocks of 32 (4 lanes) as roundtrip_vec_kernel<true>.
 * Output f32, or bf16 in reference precision, where the values are bf16-exact (a prefill's query,
 * which the tensor-core attention takes as bf16: no f32 copy to convert). Warps past the last row do
 * a.also's plain RMSNorm (norm_row, stored in its dtype as rms_norm_rows_kernel stores), so the
 * layer's q_norm rides in the KV row's launch. A warp per row (a prefill's queries: 8 rows of one
 * position, norm_rope_row each), 8 warps a block; a warp past all rows returns whole, so every
 * shuffle has its full warp.
 * Bytes: width·(|x| + 4) a row (+ w from L2); decode's rows are 1 (the KV row) or the heads. */
template <int V, int V2>
__global__ void __launch_bounds__(256) norm_rope_kernel(const __grid_constant__ NormRopeArgs a,
                                                        const __grid_constant__ RopeFreqs f)
{
    const int lane = threadIdx.x & 31;
    const int64_t r0 = (blockIdx.x * (int64_t)(blockDim.x >> 5) + (threadIdx.x >> 5)) * a.rows_per_warp;
    constexpr int U = V2 > 0 ? V2 : 1; /* V2 == 0: no second norm compiled in */
    const bool second = r0 >= a.rows; /* rows_per_warp is 1 where there is a second norm */
    /* before the producer wait (common.cuh), what needs nothing it makes: the norms' weights into
     * L1 (parameters) and RoPE's cos and sin (double evaluations, their position is a parameter),
     * once for the warp's rows: one position, where a warp a row evaluated them for each of its 64
     * heads (with the hardware's bf16 roundings, a prefill's 4 query launches 1.42 -> 1.02 ms,
     * CUPTI, H200) */
    float my_cs = 0.0f, my_sn = 0.0f;
    if (second) {
        if (V2 > 0 && r0 < a.rows + a.also.rows) prefetch_row_weights<U>(a.also.w, a.also.w_dtype, a.also.width, lane);
    } else {
        if (a.norm != NORM_NONE) prefetch_row_weights<V>(a.w, a.w_dtype, a.width, lane);
        rope_cos_sin(a.first + r0 / a.heads * a.step, f.f[lane], my_cs, my_sn);
    }
    dsrtk_wait_producer(); /* launched dependent (common.cuh) */
    if (second) {
        const int64_t r = r0;
        if (V2 > 0 && r < a.rows + a.also.rows) {
            const int64_t base = (r - a.rows) * a.also.width;
            float u[U][8];
            load_row<U>(a.also.x, a.also.x_dtype, base, a.also.width, lane, u);
            norm_row<U>(u, a.also.w, a.also.w_dtype, a.also.width, a.eps, 0, lane);
            store_row<U>(a.also.y, a.also.y_dtype, base, a.also.width, lane, u);
        }
        return;
    }
    for (int64_t r = r0; r < r0 + a.rows_per_warp && r < a.rows; r++)
        norm_rope_row<V>(a, r, lane, my_cs, my_sn);
}

/* the vectors a lane holds for rows of `width` (<= 1024): rms_norm_cuda's choice, which the bits
 * depend on */
static int lane_vectors(int64_t width) { return width <= 256 ? 1 : width <= 512 ? 2 : 4; }

template <int V>
static void launch_norm_rope(int v2, unsigned blocks, cudaStream_t cs, const NormRopeArgs &a, const RopeFreqs &f)
{
    if (v2 == 0) (void)dsrtk_launch_dependent(norm_rope_kernel<V, 0>, dim3(blocks), dim3(256), 0, cs, a, f);
    else if (v2 == 1) (void)dsrtk_launch_dependent(norm_rope_kernel<V, 1>, dim3(blocks), dim3(256), 0, cs, a, f);
    else if (v2 == 2) (void)dsrtk_launch_dependent(norm_rope_kernel<V, 2>, dim3(blocks), dim3(256), 0, cs, a, f);
    else (void)dsrtk_launch_dependent(norm_rope_kernel<V, 4>, dim3(blocks), dim3(256), 0, cs, a, f);
}

static bool aligned16(const void *p) { return (uintptr_t)p % 16 == 0; }

extern "C" int dsrtk_nn_norm_rope(int dev, const void *x, int x_dtype, const void *w, int w_dtype, void *y, int y_dtype,
                                  int64_t S, int64_t heads, int64_t width, int norm, float eps, const dsrtk_rope *rope,
                                  int post, int ref, const dsrtk_norm_job *also, void *stream)
{
    const char *what = "nn.norm_rope";
    int rc = check_float_dtype(what, "x", x_dtype);
    if (!rc && w) rc = check_float_dtype(what, "weight", w_dtype);
    if (!rc && also) rc = check_float_dtype(what, "the second norm's x", also->x_dtype);
    if (!rc && also && also->w) rc = check_float_dtype(what, "the second norm's weight", also->w_dtype);
    if (!rc && also) rc = check_float_dtype(what, "the second norm's y", also->y_dtype);
    if (!rc && y_dtype != DSRT_F32 && !(y_dtype == DSRT_BF16 && ref))
        rc = dsrtk_fail(DSRTK_ERROR, "%s: output dtype %d (f32, or bf16 in reference precision)", what, y_dtype);
    if (rc) return rc;
    if (width % 8 || width < 64 || width > 1024 || (also && (also->width % 8 || also->width < 8 || also->width > 1024)))
        return dsrtk_fail(DSRTK_ERROR, "%s: vectors of %lld (and %lld), expected multiples of 8 up to 1024, from 64", what,
                          (long long)width, also ? (long long)also->width : 0LL);
    if (norm < NORM_NONE || norm > NORM_HEAD || post < POST_NONE || post > POST_HADAMARD_Q4 || (w && norm != NORM_RMS) ||
        (post == POST_HADAMARD_Q4 && width != 128))
        return dsrtk_fail(DSRTK_ERROR, "%s: norm %d, post %d with%s weight on vectors of %lld", what, norm, post,
                          w ? "" : "out", (long long)width);
    if (!aligned16(x) || !aligned16(w) || !aligned16(y) ||
        (also && (!aligned16(also->x) || !aligned16(also->w) || !aligned16(also->y))))
        return dsrtk_fail(DSRTK_ERROR, "%s: the data must be 16-byte aligned", what);
    const int64_t rows = S > 0 && heads > 0 ? S * heads : 0, rows2 = also && also->rows > 0 ? also->rows : 0;
    /* a prefill's queries: 8 heads of a position a warp share its cos and sin (decode keeps a warp
     * a row: few rows) */
    const int rows_per_warp = !rows2 && heads % 8 == 0 && rows >= (1 << 16) ? 8 : 1;
    const int64_t blocks = ((rows + rows_per_warp - 1) / rows_per_warp + rows2 + 7) / 8;
    if (blocks == 0) return DSRTK_OK;
    if (blocks > INT32_MAX)
        return dsrtk_fail(DSRTK_ERROR, "%s: %lld rows are too many for one launch", what, (long long)(rows + rows2));
    DSRTK_SET_DEVICE(dev, what);
    NormRopeArgs a;
    a.x = x, a.w = w, a.y = y;
    a.x_dtype = x_dtype, a.w_dtype = w_dtype, a.y_dtype = y_dtype, a.norm = norm, a.post = post, a.ref = ref != 0;
    a.rows = rows, a.heads = heads, a.width = width, a.first = rope->first, a.step = rope->step;
    a.rows_per_warp = rows_per_warp;
    a.eps = eps;
    a.also = also ? *also : dsrtk_norm_job{};
    a.also.rows = rows2;
    RopeFreqs f;
    for (int i = 0; i < 32; i++) f.f[i] = rope->freqs[i];
    const int v2 = rows2 ? lane_vectors(also->width) : 0;
    cudaStream_t cs = (cudaStream_t)stream;
    switch (lane_vectors(width)) {
    case 1: launch_norm_rope<1>(v2, (unsigned)blocks, cs, a, f); break;
    case 2: launch_norm_rope<2>(v2, (unsigned)blocks, cs, a, f); break;
    default: launch_norm_rope<4>(v2, (unsigned)blocks, cs, a, f); break;
    }
    return dsrtk_check_launch("norm_rope_kernel", dev);
}
