/*
 * hc.cu - the Sinkhorn split and the hyper-connection ops (hc_pre, hc_post, hc_head) on CUDA
 * (runtime/nn.h; the C implementations in runtime/nn.c are the reference they are tested against).
 *
 * What this file protects: decode speed without giving up the CPU's numerics. At decode (T = 1..16
 * tokens of 4 streams × 4096) these ops are launch-latency bound, so hc_pre and hc_head are two
 * launches whatever T is, and hc_post is one:
 *   1. mix_kernel: the fp32 GEMM mixes = x·fnᵀ for the flattened streams x [T, K = hc·d] with
 *      fn [M, K], split over K in chunks of DSRTK_NN_HC_CHUNK so that even one token spreads over
 *      K / chunk blocks. Each block also sums its chunk's squares (for ρ). Partials go to a double
 *      workspace [T, splits, M + 1] that the core allocates (dsrtk_nn_hc_workspace).
 *   2. pre_kernel: per token, the partials summed over the splits in a fixed order (deterministic),
 *      ρ, the mixes, Sinkhorn with all its iterations (or hc_head's sigmoid weights), then the
 *      weighted sum u = Σ_s pre_s·X_s; for few tokens the collapse of one token spreads over several
 *      blocks, each redoing the (tiny) Sinkhorn rather than waiting for another launch.
 *
 * Numerics against nn.c: Sinkhorn, the weights and the collapse are the CPU's fp32 formulas in the
 * CPU's order with explicitly rounded intrinsics (no FMA contraction); e^x is evaluated in double and
 * rounded, where glibc's expf is within ~0.5 ulp: a rare one-ulp difference. The GEMM is where the two
 * sides really differ: the CPU accumulates each mix in fp32 in index order over K (dsrt_gemm_f32);
 * here each lane sums 16 products in fp32 (FMA) and the rest of the sum is a tree in double, which is
 * the more accurate of the two. The sum of squares is in double on both sides, as nn.c's mean_square.
 *
 * hc is limited to 32 streams here (the Sinkhorn matrix lives in shared memory); the model has 4.
 */
#include <math.h>
#include "common.cuh"

enum { HC_MAX = 32, MIX_MAX = (2 + HC_MAX) * HC_MAX, MIX_THREADS = 256, PRE_THREADS = 256 };

static int check_float_dtype(const char *what, const char *name, int dtype)
{
    if (dtype != DSRT_F32 && dtype != DSRT_BF16)
        return dsrtk_fail(DSRTK_ERROR, "%s: %s has dtype %d, expected bf16 or f32", what, name, dtype);
    return DSRTK_OK;
}

__device__ __forceinline__ float ld(const void *p, int dtype, int64_t i)
{
    return dtype == DSRT_F32 ? ((const float *)p)[i] : dsrt_bf16_to_f32(((const uint16_t *)p)[i]);
}
__device__ __forceinline__ void st(void *p, int dtype, int64_t i, float v)
{
    if (dtype == DSRT_F32) ((float *)p)[i] = v;
    else ((uint16_t *)p)[i] = dsrt_f32_to_bf16(v);
}

/* e^x in double, rounded once to fp32 (see the file comment) */
__device__ __forceinline__ float exp_f32(float x) { return (float)exp((double)x); }
/* nn.c's sigmoid: 1/(1 + e^-x) in fp32 */
__device__ __forceinline__ float sigmoid(float x) { return __fdiv_rn(1.0f, __fadd_rn(1.0f, exp_f32(-x))); }

/* ---- Sinkhorn (nn.c: sinkhorn_row) by the threads of a block ---- */

/* mix [M] (shared) of one token -> pre [hc], post [hc], comb [hc·hc] (shared). Every step that the
 * CPU runs as a loop over a row or a column is run by one thread per row or column, in the CPU's
 * order; the element-wise divisions by the sums are spread over the block. All threads of the block
 * must call it (it has barriers). */
__device__ void sinkhorn_block(const float *mix, const void *scale, int scale_dtype, const void *base, int base_dtype,
                               int hc, int iters, float eps, float *pre, float *post, float *comb, float *sums)
{
    const int tid = threadIdx.x, nt = blockDim.x, hh = hc * hc;
    const float s0 = ld(scale, scale_dtype, 0), s1 = ld(scale, scale_dtype, 1), s2 = ld(scale, scale_dtype, 2);
    for (int j = tid; j < hc; j += nt) {
        pre[j] = __fadd_rn(sigmoid(__fadd_rn(__fmul_rn(mix[j], s0), ld(base, base_dtype, j))), eps);
        post[j] = __fmul_rn(2.0f, sigmoid(__fadd_rn(__fmul_rn(mix[hc + j], s1), ld(base, base_dtype, hc + j))));
    }
    for (int i = tid; i < hh; i += nt)
        comb[i] = __fadd_rn(__fmul_rn(mix[2 * hc + i], s2), ld(base, base_dtype, 2 * hc + i));
    __syncthreads();
    /* the row softmax (max subtracted) + eps: one thread per row */
    for (int j = tid; j < hc; j += nt) {
        float *row = comb + j * hc, mx = row[0], sum = 0;
        for (int k = 1; k < hc; k++) mx = fmaxf(mx, row[k]);
        for (int k = 0; k < hc; k++) {
            row[k] = exp_f32(__fsub_rn(row[k], mx));
            sum = __fadd_rn(sum, row[k]);
        }
        for (int k = 0; k < hc; k++) row[k] = __fadd_rn(__fdiv_rn(row[k], sum), eps);
    }
    __syncthreads();
    for (int it = 0; it < iters; it++) {
        if (it > 0) { /* rows: C_jk /= rowsum_j + eps */
            for (int j = tid; j < hc; j += nt) {
                float sum = 0;
                for (int k = 0; k < hc; k++) sum = __fadd_rn(sum, comb[j * hc + k]);
                sums[j] = __fadd_rn(sum, eps);
            }
            __syncthreads();
            for (int i = tid; i < hh; i += nt) comb[i] = __fdiv_rn(comb[i], sums[i / hc]);
            __syncthreads();
        }
        for (int k = tid; k < hc; k += nt) { /* columns: C_jk /= colsum_k + eps */
            float sum = 0;
            for (int j = 0; j < hc; j++) sum = __fadd_rn(sum, comb[j * hc + k]);
            sums[k] = __fadd_rn(sum, eps);
        }
        __syncthreads();
        for (int i = tid; i < hh; i += nt) comb[i] = __fdiv_rn(comb[i], sums[i % hc]);
        __syncthreads();
    }
}

/* One block per token (grid-stride): the standalone split of given mixes. */
__global__ void __launch_bounds__(64) sinkhorn_kernel(const void *mixes, int mixes_dtype, const void *scale,
                                                      int scale_dtype, const void *base, int base_dtype, int64_t T,
                                                      int hc, int iters, float eps, float *pre, float *post,
                                                      float *comb)
{
    __shared__ float mix[MIX_MAX], p[HC_MAX], q[HC_MAX], c[HC_MAX * HC_MAX], sums[HC_MAX];
    const int M = (2 + hc) * hc, hh = hc * hc;
    for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
        for (int i = threadIdx.x; i < M; i += blockDim.x) mix[i] = ld(mixes, mixes_dtype, t * M + i);
        __syncthreads();
        sinkhorn_block(mix, scale, scale_dtype, base, base_dtype, hc, iters, eps, p, q, c, sums);
        for (int j = threadIdx.x; j < hc; j += blockDim.x) pre[t * hc + j] = p[j], post[t * hc + j] = q[j];
        for (int i = threadIdx.x; i < hh; i += blockDim.x) comb[t * hh + i] = c[i];
        __syncthreads();
    }
}

static int check_hc(const char *what, int hc, int iters)
{
    if (hc < 1 || hc > HC_MAX) return dsrtk_fail(DSRTK_ERROR, "%s: hc = %d, the CUDA kernels take 1..%d streams", what, hc, HC_MAX);
    if (iters < 1) return dsrtk_fail(DSRTK_ERROR, "%s: Sinkhorn needs at least 1 iteration, got %d", what, iters);
    return DSRTK_OK;
}

extern "C" int dsrtk_nn_sinkhorn(int dev, const void *mixes, int mixes_dtype, const void *scale, int scale_dtype,
                                 const void *base, int base_dtype, int64_t T, int hc, int iters, float eps, float *pre,
                                 float *post, float *comb, void *stream)
{
    const char *what = "nn.sinkhorn";
    int rc = check_hc(what, hc, iters);
    if (!rc) rc = check_float_dtype(what, "mixes", mixes_dtype);
    if (!rc) rc = check_float_dtype(what, "scale", scale_dtype);
    if (!rc) rc = check_float_dtype(what, "base", base_dtype);
    if (rc) return rc;
    if (T <= 0) return DSRTK_OK;
    DSRTK_SET_DEVICE(dev, what);
    int64_t grid = T < (1 << 30) ? T : (1 << 30);
    sinkhorn_kernel<<<(unsigned)grid, 64, 0, (cudaStream_t)stream>>>(mixes, mixes_dtype, scale, scale_dtype, base,
                                                                     base_dtype, T, hc, iters, eps, pre, post, comb);
    return dsrtk_check_launch("sinkhorn_kernel", dev);
}

/* ---- hc_post's formula for one element (nn.c: dsrt_nn_hc_post) ---- */

/* X'_k[c] = post_k·f[c] + Σ_j comb_jk·X_j[c] of token t: the sum over j in order from 0, then the
 * fp32 product added, the CPU's operations one for one. post_kernel unrolls the same sequence; the
 * fused hc_post_pre runs this one, so both give the same bits. */
__device__ __forceinline__ float post_value(const dsrtk_hc_post_args &a, int64_t t, int hc, int64_t d, int k, int64_t c)
{
    float mixed = 0;
    for (int j = 0; j < hc; j++)
        mixed = __fadd_rn(mixed, __fmul_rn(ld(a.comb, a.comb_dtype, (t * hc + j) * hc + k),
                                           ld(a.X, a.X_dtype, (t * hc + j) * d + c)));
    return __fadd_rn(__fmul_rn(ld(a.post, a.post_dtype, t * hc + k), ld(a.f, a.f_dtype, t * d + c)), mixed);
}

/* ---- the mixes GEMM, split over K ---- */

/* Block (split, token group): columns [split·CHUNK, +CHUNK) of TOK tokens. The x chunk goes to shared
 * memory as f32 (its squares summed on the way, in double); then warp w takes rows m = w, w + 8, ...
 * of fn, each lane reading fn[m] coalesced and multiplying it with the TOK token chunks (fn is read
 * once per block and reused TOK times from registers), a warp tree finishing each dot product.
 * Cost: T·M·K FMAs, and fn (M·K·|fn| bytes) read ceil(T/TOK) times, from L2 after the first. */
/* POST (hc_post_pre): the block first computes its chunk of X' = hc_post(f, X, post, comb) with
 * post_value, writes it to X (X' here, of X_dtype) and takes the stored value (bf16-rounded in
 * reference precision, as hc_pre would read it back) as its x: X' is never read back for the GEMM.
 * Its own bytes: hc + 1 reads (L2 mostly) and one write per element of X'. */
template <int TOK, bool POST>
__global__ void __launch_bounds__(MIX_THREADS) mix_kernel(const void *X, int X_dtype, const void *fn, int fn_dtype,
                                                          int64_t T, int64_t K, int M, int splits, double *work,
                                                          const __grid_constant__ dsrtk_hc_post_args pa, int hc)
{
    __shared__ float xs[TOK][DSRTK_NN_HC_CHUNK];
    __shared__ double sq[MIX_THREADS / 32][TOK];
    const int split = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t k0 = (int64_t)split * DSRTK_NN_HC_CHUNK, t0 = (int64_t)blockIdx.y * TOK;
    const int klen = (int)(K - k0 < DSRTK_NN_HC_CHUNK ? K - k0 : DSRTK_NN_HC_CHUNK);
    double own[TOK];
#pragma unroll
    for (int t = 0; t < TOK; t++) {
        own[t] = 0;
        for (int k = threadIdx.x; k < DSRTK_NN_HC_CHUNK; k += MIX_THREADS) {
            float v = 0.0f;
            if (t0 + t < T && k < klen) {
                const int64_t at = (t0 + t) * K + k0 + k;
                if (POST) {
                    const int64_t d = K / hc, s = (k0 + k) / d;
                    float y = post_value(pa, t0 + t, hc, d, (int)s, k0 + k - s * d);
                    st((void *)X, X_dtype, at, y);
                    v = X_dtype == DSRT_F32 ? y : dsrt_bf16_to_f32(dsrt_f32_to_bf16(y)); /* what was stored */
                } else {
                    v = ld(X, X_dtype, at);
                }
            }
            xs[t][k] = v;
            own[t] += (double)__fmul_rn(v, v); /* nn.c's mean_square: fp32 squares, double sum */
        }
    }
#pragma unroll
    for (int t = 0; t < TOK; t++) {
        double v = own[t];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) sq[warp][t] = v;
    }
    __syncthreads();
    if (threadIdx.x < TOK && t0 + threadIdx.x < T) {
        double v = 0;
        for (int w = 0; w < MIX_THREADS / 32; w++) v += sq[w][threadIdx.x];
        work[((t0 + threadIdx.x) * splits + split) * (M + 1) + M] = v;
    }
    for (int m = warp; m < M; m += MIX_THREADS / 32) {
        float acc[TOK];
#pragma unroll
        for (int t = 0; t < TOK; t++) acc[t] = 0;
        const int64_t row = (int64_t)m * K + k0;
        for (int k = lane; k < klen; k += 32) {
            float f = ld(fn, fn_dtype, row + k);
#pragma unroll
            for (int t = 0; t < TOK; t++) acc[t] = fmaf(f, xs[t][k], acc[t]);
        }
#pragma unroll
        for (int t = 0; t < TOK; t++) {
            double v = acc[t];
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0 && t0 + t < T) work[((t0 + t) * splits + split) * (M + 1) + m] = v;
        }
    }
}

/* ---- per token: the mixes, Sinkhorn or the head's weights, the collapse ---- */

/* Block (token, part): the token's partials summed over the splits in order (double), then
 * mixes_m = fp32(dot_m)·ρ with ρ = 1/sqrt(fp32(Σx²/K) + norm_eps) (nn.c's hc_mixes), then the
 * weights, then u[c] = Σ_s w_s·X_s[c] (nn.c's collapse) over this part's columns. head: hc_head's
 * w_s = σ(mix_s·scale_0 + base_s) + hc_eps instead of Sinkhorn, no post/comb.
 * Bytes: X read once (T·K·|X|), u written once (T·d·|u|); the rest is small. */
__global__ void __launch_bounds__(PRE_THREADS) pre_kernel(const void *X, int X_dtype, const void *scale, int scale_dtype,
                                                          const void *base, int base_dtype, int64_t T, int hc,
                                                          int64_t d, float hc_eps, float norm_eps, int iters, int head,
                                                          int splits, const double *work, void *u, int u_dtype,
                                                          float *post, float *comb)
{
    __shared__ float mix[MIX_MAX], w[HC_MAX], q[HC_MAX], c[HC_MAX * HC_MAX], sums[HC_MAX];
    __shared__ double dots[MIX_MAX + 1];
    const int M = head ? hc : (2 + hc) * hc, hh = hc * hc;
    const int64_t K = (int64_t)hc * d, part_len = (d + gridDim.y - 1) / gridDim.y;
    const int64_t c0 = blockIdx.y * part_len, c1 = c0 + part_len < d ? c0 + part_len : d;
    for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
        for (int m = threadIdx.x; m <= M; m += blockDim.x) {
            double v = 0;
            for (int sp = 0; sp < splits; sp++) v += work[(t * splits + sp) * (M + 1) + m];
            dots[m] = v;
        }
        __syncthreads();
        float rho = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn((float)(dots[M] / (double)K), norm_eps)));
        for (int m = threadIdx.x; m < M; m += blockDim.x) mix[m] = __fmul_rn((float)dots[m], rho);
        __syncthreads();
        if (head) {
            float s0 = ld(scale, scale_dtype, 0);
            for (int s = threadIdx.x; s < hc; s += blockDim.x)
                w[s] = __fadd_rn(sigmoid(__fadd_rn(__fmul_rn(mix[s], s0), ld(base, base_dtype, s))), hc_eps);
            __syncthreads();
        } else {
            sinkhorn_block(mix, scale, scale_dtype, base, base_dtype, hc, iters, hc_eps, w, q, c, sums);
            if (blockIdx.y == 0) {
                for (int j = threadIdx.x; j < hc; j += blockDim.x) post[t * hc + j] = q[j];
                for (int i = threadIdx.x; i < hh; i += blockDim.x) comb[t * hh + i] = c[i];
            }
        }
        for (int64_t col = c0 + threadIdx.x; col < c1; col += blockDim.x) {
            float acc = 0;
            for (int s = 0; s < hc; s++) acc = __fadd_rn(acc, __fmul_rn(w[s], ld(X, X_dtype, (t * hc + s) * d + col)));
            st(u, u_dtype, t * d + col, acc);
        }
        __syncthreads(); /* the shared arrays are rewritten for the next token */
    }
}

template <int TOK>
static void launch_mix(dim3 grid, cudaStream_t cs, const void *X, int X_dtype, const void *fn, int fn_dtype, int64_t T,
                       int64_t K, int M, int splits, double *work, const dsrtk_hc_post_args *pa, int hc)
{
    if (pa)
        mix_kernel<TOK, true><<<grid, MIX_THREADS, 0, cs>>>(X, X_dtype, fn, fn_dtype, T, K, M, splits, work, *pa, hc);
    else
        mix_kernel<TOK, false><<<grid, MIX_THREADS, 0, cs>>>(X, X_dtype, fn, fn_dtype, T, K, M, splits, work,
                                                             dsrtk_hc_post_args{}, hc);
}

/* hc_pre (head 0), hc_head (head 1), or with pa hc_post_pre, whose X is the X' it writes */
static int launch_pre(const char *what, int dev, const dsrtk_hc_post_args *pa, const void *X, int X_dtype,
                      const void *fn, int fn_dtype, const void *scale, int scale_dtype, const void *base,
                      int base_dtype, int64_t T, int hc, int64_t d, float hc_eps, float norm_eps, int iters, int head,
                      double *work, void *u, int u_dtype, float *post, float *comb, void *stream)
{
    int rc = check_hc(what, hc, head ? 1 : iters);
    if (!rc && pa) rc = check_float_dtype(what, "f", pa->f_dtype);
    if (!rc && pa) rc = check_float_dtype(what, "X", pa->X_dtype);
    if (!rc && pa) rc = check_float_dtype(what, "post", pa->post_dtype);
    if (!rc && pa) rc = check_float_dtype(what, "comb", pa->comb_dtype);
    if (!rc) rc = check_float_dtype(what, pa ? "X'" : "X", X_dtype);
    if (!rc) rc = check_float_dtype(what, "fn", fn_dtype);
    if (!rc) rc = check_float_dtype(what, "scale", scale_dtype);
    if (!rc) rc = check_float_dtype(what, "base", base_dtype);
    if (!rc) rc = check_float_dtype(what, "u", u_dtype);
    if (rc) return rc;
    if (T <= 0) return DSRTK_OK;
    DSRTK_SET_DEVICE(dev, what);
    const int64_t K = (int64_t)hc * d;
    const int M = head ? hc : (2 + hc) * hc;
    const int64_t splits = dsrtk_nn_hc_splits(K);
    if (splits > 65535) return dsrtk_fail(DSRTK_ERROR, "%s: rows of %lld values are too long", what, (long long)K);
    cudaStream_t cs = (cudaStream_t)stream;
    /* tokens per mix block: one at decode (splits alone fill the machine), more as T grows so fn's
     * re-reads from L2 shrink */
    if (T == 1) {
        launch_mix<1>(dim3((unsigned)splits, 1), cs, X, X_dtype, fn, fn_dtype, T, K, M, (int)splits, work, pa, hc);
    } else if (T <= 64) {
        launch_mix<4>(dim3((unsigned)splits, (unsigned)((T + 3) / 4)), cs, X, X_dtype, fn, fn_dtype, T, K, M,
                      (int)splits, work, pa, hc);
    } else {
        int64_t groups = (T + 7) / 8;
        if (groups > 65535) return dsrtk_fail(DSRTK_ERROR, "%s: %lld tokens are too many for one launch", what, (long long)T);
        launch_mix<8>(dim3((unsigned)splits, (unsigned)groups), cs, X, X_dtype, fn, fn_dtype, T, K, M, (int)splits,
                      work, pa, hc);
    }
    rc = dsrtk_check_launch("mix_kernel", dev);
    if (rc) return rc;
    /* few tokens: split each token's columns over blocks of ~1024 so the collapse spreads out */
    int64_t parts = T >= 64 ? 1 : (d + 1023) / 1024;
    if (parts < 1) parts = 1;
    if (parts > 64) parts = 64;
    int64_t grid = T < (1 << 30) ? T : (1 << 30);
    pre_kernel<<<dim3((unsigned)grid, (unsigned)parts), PRE_THREADS, 0, cs>>>(
        X, X_dtype, scale, scale_dtype, base, base_dtype, T, hc, d, hc_eps, norm_eps, iters, head, (int)splits, work, u,
        u_dtype, post, comb);
    return dsrtk_check_launch("pre_kernel", dev);
}

extern "C" int dsrtk_nn_hc_pre(int dev, const void *X, int X_dtype, const void *fn, int fn_dtype, const void *scale,
                               int scale_dtype, const void *base, int base_dtype, int64_t T, int hc, int64_t d,
                               float hc_eps, float norm_eps, int iters, double *work, void *u, int u_dtype, float *post,
                               float *comb, void *stream)
{
    return launch_pre("nn.hc_pre", dev, NULL, X, X_dtype, fn, fn_dtype, scale, scale_dtype, base, base_dtype, T, hc, d, hc_eps,
                      norm_eps, iters, 0, work, u, u_dtype, post, comb, stream);
}

extern "C" int dsrtk_nn_hc_head(int dev, const void *X, int X_dtype, const void *fn, int fn_dtype, const void *scale,
                                int scale_dtype, const void *base, int base_dtype, int64_t T, int hc, int64_t d,
                                float hc_eps, float norm_eps, double *work, void *y, int y_dtype, void *stream)
{
    return launch_pre("nn.hc_head", dev, NULL, X, X_dtype, fn, fn_dtype, scale, scale_dtype, base, base_dtype, T, hc, d, hc_eps,
                      norm_eps, 1, 1, work, y, y_dtype, NULL, NULL, stream);
}

extern "C" int dsrtk_nn_hc_post_pre(int dev, const dsrtk_hc_post_args *post_args, void *X_next, int X_next_dtype,
                                    const void *fn, int fn_dtype, const void *scale, int scale_dtype, const void *base,
                                    int base_dtype, int64_t T, int hc, int64_t d, float hc_eps, float norm_eps,
                                    int iters, double *work, void *u, int u_dtype, float *post, float *comb,
                                    void *stream)
{
    if (!post_args) return dsrtk_fail(DSRTK_ERROR, "nn.hc_post_pre: no hc_post operands");
    return launch_pre("nn.hc_post_pre", dev, post_args, X_next, X_next_dtype, fn, fn_dtype, scale, scale_dtype, base,
                      base_dtype, T, hc, d, hc_eps, norm_eps, iters, 0, work, u, u_dtype, post, comb, stream);
}

/* ---- hc_post (nn.c: dsrt_nn_hc_post) ---- */

/* One thread per (token, column c), all hc destinations: X'_k[c] = post_k·f[c] + Σ_j comb_jk·X_j[c],
 * the sum over j in order from 0, then the fp32 product added, as the CPU. HC > 0 fixes the stream
 * count (4 for the model) so the hc column values stay in registers; HC = 0 takes any hc, re-reading
 * them (from L1). Bytes: (hc + 1)·T·d in, hc·T·d out; 2hc² + 2hc FLOPs per column: memory bound. */
template <int HC>
__global__ void __launch_bounds__(DSRTK_BLOCK) post_kernel(const void *f, int f_dtype, const void *X, int X_dtype,
                                                           const void *post, int post_dtype, const void *comb,
                                                           int comb_dtype, void *y, int y_dtype, int64_t T, int hc_any,
                                                           int64_t d)
{
    const int hc = HC > 0 ? HC : hc_any;
    const int64_t n = T * d;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
        int64_t t = e / d, col = e - t * d;
        float fv = ld(f, f_dtype, e);
        float xv[HC > 0 ? HC : 1];
        if (HC > 0)
#pragma unroll
            for (int j = 0; j < (HC > 0 ? HC : 1); j++) xv[j] = ld(X, X_dtype, (t * hc + j) * d + col);
        for (int k = 0; k < hc; k++) {
            float mixed = 0;
            for (int j = 0; j < hc; j++) {
                float x = HC > 0 ? xv[j] : ld(X, X_dtype, (t * hc + j) * d + col);
                mixed = __fadd_rn(mixed, __fmul_rn(ld(comb, comb_dtype, (t * hc + j) * hc + k), x));
            }
            st(y, y_dtype, (t * hc + k) * d + col, __fadd_rn(__fmul_rn(ld(post, post_dtype, t * hc + k), fv), mixed));
        }
    }
}

extern "C" int dsrtk_nn_hc_post(int dev, const void *f, int f_dtype, const void *X, int X_dtype, const void *post,
                                int post_dtype, const void *comb, int comb_dtype, void *y, int y_dtype, int64_t T,
                                int hc, int64_t d, void *stream)
{
    const char *what = "nn.hc_post";
    int rc = check_float_dtype(what, "f", f_dtype);
    if (!rc) rc = check_float_dtype(what, "X", X_dtype);
    if (!rc) rc = check_float_dtype(what, "post", post_dtype);
    if (!rc) rc = check_float_dtype(what, "comb", comb_dtype);
    if (!rc) rc = check_float_dtype(what, "y", y_dtype);
    if (rc) return rc;
    if (hc < 1) return dsrtk_fail(DSRTK_ERROR, "%s: hc = %d", what, hc);
    if (T <= 0 || d <= 0) return DSRTK_OK;
    DSRTK_SET_DEVICE(dev, what);
    int grid = dsrtk_grid_for(dev, T * d, DSRTK_BLOCK);
    cudaStream_t cs = (cudaStream_t)stream;
    if (hc == 4)
        post_kernel<4><<<grid, DSRTK_BLOCK, 0, cs>>>(f, f_dtype, X, X_dtype, post, post_dtype, comb, comb_dtype, y, y_dtype,
                                                     T, hc, d);
    else
        post_kernel<0><<<grid, DSRTK_BLOCK, 0, cs>>>(f, f_dtype, X, X_dtype, post, post_dtype, comb, comb_dtype, y, y_dtype,
                                                     T, hc, d);
    return dsrtk_check_launch("post_kernel", dev);
}
