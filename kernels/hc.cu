/*
 * hc.cu - the Sinkhorn split and the hyper-connection ops (hc_pre, hc_post, hc_head) on CUDA
 * (runtime/nn.h; the C implementations in runtime/nn.c are the reference they are tested against).
 *
 * What this file protects: speed at both ends without giving up the CPU's numerics. hc_pre is
 * mixes = x·fnᵀ for the flattened streams x [T, K = hc·d] and fn [M = (2+hc)·hc, K] (24 × 16384
 * for the model), then per token ρ, Sinkhorn on the mixes and the collapse u = Σ_s pre_s·X_s. Two
 * launches whatever T is:
 *   1. the GEMM, split over K so that even one token spreads over the machine; partial dots (and
 *      the partial Σx² for ρ) go to a double workspace [T, splits, M + 1] that the core allocates
 *      (dsrtk_nn_hc_workspace). Two kernels, by size:
 *        - split_kernel (decode, T < DSRTK_NN_HC_TC_MIN_T, and whatever the tensor cores cannot
 *          take): blocks of (256 columns, up to 16 tokens), fn read once per token group;
 *        - mix_tc_kernel (prefill, bf16 X): bf16 tensor cores (mma.sync m16n8k16) on fn split into
 *          three bf16 planes fn = hi + mid + lo (fn_planes_kernel, once per call): a bf16 x times a
 *          plane is exact in fp32, so the three products carry fn's 24 bits; the MMA sums them in
 *          fp32. X is read once from HBM at full width, fn from shared memory.
 *   2. pre_kernel: per token the partials summed over the splits in a fixed order (deterministic),
 *      ρ and the mixes; blocks (token, part) compute only pre (hc sigmoids) and collapse their part
 *      of the columns, one more block per token runs Sinkhorn (post, comb) beside them, in one warp
 *      with the matrix in registers when hc² <= 32, so nothing waits for it. Given the sub-layer
 *      norm's weight (nn.h), the collapse normalises its row itself, and a prefill's Sinkhorn takes
 *      a launch of its own before it, a warp a token (sinkhorn_tokens_kernel).
 * One token of the model's 4 streams (a decode step, d = 256·C, C <= 16) takes one launch instead:
 * pre_cluster_kernel, the same bits on a cluster of C blocks (its comment).
 *
 * Numerics against nn.c: Sinkhorn, the weights and the collapse are the CPU's fp32 formulas in the
 * CPU's order with explicitly rounded intrinsics (no FMA contraction); e^x is evaluated in double and
 * rounded, where glibc's expf is within ~0.5 ulp: a rare one-ulp difference. The GEMM is where the two
 * sides really differ: the CPU accumulates each mix in fp32 in index order over K (dsrt_gemm_f32);
 * here fp32 partial sums of at most 1024 products (a tree of 8-product lane sums in split_kernel, the
 * MMA's fp32 accumulation in mix_tc_kernel) meet in double, as accurate as the CPU's or more. The
 * sum of squares is fp32 squares summed in double on both sides, as nn.c's mean_square.
 *
 * hc is limited to 32 streams here (the Sinkhorn matrix lives in shared memory); the model has 4.
 */
#include <math.h>
#include <cooperative_groups.h>
#include "act.cuh"
#include "mma.cuh"
#include "rmsnorm.cuh"

enum {
    HC_MAX = 32,
    MIX_MAX = (2 + HC_MAX) * HC_MAX,
    SPLIT_THREADS = 256,           /* split_kernel: one column of the chunk per thread */
    SPLIT_TOK = 16,                /* its most tokens per block */
    TC_THREADS = 128,              /* mix_tc_kernel: 4 warps of 32 tokens */
    TC_TOKENS = 128,               /* tokens per block */
    TC_MAX_M = 24,                 /* three n-tiles of 8 mixes */
    PRE_THREADS = 128,
    PRE_BATCH = 8,                 /* pre_kernel: values per warp summed together (4 warps: 32 >= M + 1) */
    NORM_THREADS = 256,            /* pre_kernel<NV>: the block that collapses and normalises a token */
    NORM_MAX_V = 2,                /* its 8-column vectors a thread: d <= 4096 (Flash's; 3 and 4 spilled) */
    PRE_STAGE_MAX = 128 * 1024,    /* its staged rows at most (pre_stage_bytes; Flash: 40 KB, bf16) */
};

static bool aligned16(const void *p) { return (uintptr_t)p % 16 == 0; }

/* e^x in double, rounded once to fp32 (see the file comment) */
__device__ __forceinline__ float exp_f32(float x) { return (float)exp((double)x); }
/* nn.c's sigmoid: 1/(1 + e^-x) in fp32 */
__device__ __forceinline__ float sigmoid(float x) { return __fdiv_rn(1.0f, __fadd_rn(1.0f, exp_f32(-x))); }

/* nn.c sinkhorn_row's pre_j = σ(mix_j·scale_0 + base_j) + eps, also hc_head's weights */
__device__ __forceinline__ float pre_weight(float mix, float s0, float base, float eps)
{
    return __fadd_rn(sigmoid(__fadd_rn(__fmul_rn(mix, s0), base)), eps);
}

/* nn.c hc_mixes' ρ = 1/sqrt(fp32(Σx²/K) + norm_eps), from the double sum of squares over K values:
 * pre_kernel's and sinkhorn_tokens_kernel's, so both give the mixes the same bits */
__device__ __forceinline__ float hc_rho(double sum_sq, int64_t K, float norm_eps)
{
    return __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn((float)(sum_sq / (double)K), norm_eps)));
}

/* nn.c sinkhorn_row's post_j = 2σ(mix_{hc+j}·scale_1 + base_{hc+j}) */
__device__ __forceinline__ float post_weight(float mix, float s1, float base)
{
    return __fmul_rn(2.0f, sigmoid(__fadd_rn(__fmul_rn(mix, s1), base)));
}

/* ---- Sinkhorn (nn.c: sinkhorn_row) ---- */

/* By the threads of a block, any hc <= HC_MAX: mix [M] (shared) of one token -> pre [hc], post
 * [hc], comb [hc·hc] (shared). Every step that the CPU runs as a loop over a row or a column is run
 * by one thread per row or column, in the CPU's order; the element-wise divisions by the sums are
 * spread over the block. All threads of the block must call it (it has barriers). */
__device__ void sinkhorn_block(const float *mix, const void *scale, int scale_dtype, const void *base, int base_dtype,
                               int hc, int iters, float eps, float *pre, float *post, float *comb, float *sums)
{
    const int tid = threadIdx.x, nt = blockDim.x, hh = hc * hc;
    const float s0 = ld(scale, scale_dtype, 0), s1 = ld(scale, scale_dtype, 1), s2 = ld(scale, scale_dtype, 2);
    for (int j = tid; j < hc; j += nt) {
        pre[j] = pre_weight(mix[j], s0, ld(base, base_dtype, j), eps);
        post[j] = post_weight(mix[hc + j], s1, ld(base, base_dtype, hc + j));
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

/* a / b correctly rounded, as __fdiv_rn: div.rn.f32's fast path alone, the instructions nvcc emits
 * for it before its range check (the reciprocal's approximation, a Newton step, the quotient and
 * one correction). Where a and b lie in [2^-60, 2^60] nothing in it overflows or underflows, inside
 * the range check's domain, so it is div.rn's own result (sinkhorn_iterations says how its caller
 * knows). __fdiv_rn's branch to its slow path and the warp's reconvergence after it took a fifth
 * of the Sinkhorn loop, 39 dependent divisions (5600 -> 4540 clocks with the check, 3950 without
 * it; clock64 inside a decode step, H200). */
__device__ __forceinline__ float div_rn_fast(float a, float b)
{
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(b));
    r = __fmaf_rn(r, __fmaf_rn(-b, r, 1.0f), r);
    const float q = __fmaf_rn(a, r, 0.0f);
    return __fmaf_rn(r, __fmaf_rn(-b, q, a), q);
}

/* Sinkhorn's iterations on the warp's matrix (sinkhorn_warp's layout). FAST divides by
 * div_rn_fast and returns in `lo` the least dividend of the column steps. Every divisor is a row or
 * column sum plus eps, in [eps, hc (1 + eps) + eps] (no value exceeds 1 + eps, none is negative),
 * and a row step divides what a column step returned, at least lo / 65 (hc <= 32, eps <= 1): so
 * with eps in [2^-60, 1], lo >= 2^-50 and no NaN in the result (fminf passes a NaN over), every
 * division was div.rn's. The caller checks that off the chain and otherwise redoes the iterations
 * with __fdiv_rn. */
template <int HC, bool FAST>
__device__ __forceinline__ float sinkhorn_iterations(float c, int hc, int iters, float eps, int j, int k, float &lo)
{
    const unsigned full = 0xffffffffu;
    for (int it = 0; it < iters; it++) {
        float sum;
        if (it > 0) {
            sum = 0;
#pragma unroll
            for (int kk = 0; kk < hc; kk++) sum = __fadd_rn(sum, __shfl_sync(full, c, j * hc + kk));
            c = FAST ? div_rn_fast(c, __fadd_rn(sum, eps)) : __fdiv_rn(c, __fadd_rn(sum, eps));
        }
        sum = 0;
#pragma unroll
        for (int jj = 0; jj < hc; jj++) sum = __fadd_rn(sum, __shfl_sync(full, c, jj * hc + k));
        if (FAST) lo = fminf(lo, c), c = div_rn_fast(c, __fadd_rn(sum, eps));
        else c = __fdiv_rn(c, __fadd_rn(sum, eps));
    }
    return c;
}

/* The same by one warp for hc² <= 32 (the model's 4 streams), with no barrier: lane i holds C_jk
 * for i = j·hc + k in a register; a row or column sum gathers its hc values with shuffles and adds
 * them in the CPU's order (every lane of the row or column computes the same sum). HC > 0 fixes hc
 * at compile time (the model's 4): the loops unroll, so the hc shuffles of a sum are issued back to
 * back and only the hc fp32 adds and the division stay serial (~40 × ~90 cycles for 20
 * iterations, where the runtime-hc loops waited on each shuffle in turn); HC = 0 takes hc at run
 * time. The same operations in the same order either way, so the same bits; the iterations divide
 * by div_rn_fast, and again by __fdiv_rn should any operand have fallen outside its range. Writes comb
 * [hc·hc] (global) of the token; all 32 lanes must call it. post is another warp's
 * (sinkhorn_token): its sigmoid, an e^x in double, would stand in this chain's way. */
template <int HC>
__device__ void sinkhorn_warp(const float *mix, const void *scale, int scale_dtype, const void *base, int base_dtype,
                              int hc_arg, int iters, float eps, float *comb)
{
    const unsigned full = 0xffffffffu;
    const int hc = HC > 0 ? HC : hc_arg;
    const int lane = threadIdx.x & 31, hh = hc * hc;
    const bool mine = lane < hh;
    const int i = mine ? lane : 0, j = i / hc, k = i - j * hc; /* spare lanes shadow element 0 */
    float c = __fadd_rn(__fmul_rn(mix[2 * hc + i], ld(scale, scale_dtype, 2)), ld(base, base_dtype, 2 * hc + i));
    /* the row softmax (max subtracted) + eps */
    float mx = __shfl_sync(full, c, j * hc);
#pragma unroll
    for (int kk = 1; kk < hc; kk++) mx = fmaxf(mx, __shfl_sync(full, c, j * hc + kk));
    c = exp_f32(__fsub_rn(c, mx));
    float sum = 0;
#pragma unroll
    for (int kk = 0; kk < hc; kk++) sum = __fadd_rn(sum, __shfl_sync(full, c, j * hc + kk));
    c = __fadd_rn(__fdiv_rn(c, sum), eps);
    float lo = 1.0f;
    float out = sinkhorn_iterations<HC, true>(c, hc, iters, eps, j, k, lo);
    const bool fast = eps >= 0x1p-60f && eps <= 1.0f && lo >= 0x1p-50f && out == out;
    if (!__all_sync(full, fast)) out = sinkhorn_iterations<HC, false>(c, hc, iters, eps, j, k, lo);
    if (mine) comb[i] = out;
}

/* Token t's Sinkhorn by the calling block: the warp version when it applies (warp 0 the matrix,
 * the last warp post and pre beside it), else the block version. mix is shared; sh_* are shared
 * scratch for the block version. */
__device__ void sinkhorn_token(const float *mix, const void *scale, int scale_dtype, const void *base, int base_dtype,
                               int hc, int iters, float eps, int64_t t, float *pre, float *post, float *comb,
                               float *sh_pre, float *sh_post, float *sh_comb, float *sh_sums)
{
    const int hh = hc * hc;
    if (hh <= 32) { /* uniform over the block: no barrier below */
        if (threadIdx.x < 32) {
            if (hc == 4) sinkhorn_warp<4>(mix, scale, scale_dtype, base, base_dtype, hc, iters, eps, comb + t * hh);
            else sinkhorn_warp<0>(mix, scale, scale_dtype, base, base_dtype, hc, iters, eps, comb + t * hh);
        }
        const int j = (int)threadIdx.x - (int)(blockDim.x - 32); /* the last warp's lanes (warp 0's with one warp) */
        if (j >= 0 && j < hc) {
            post[t * hc + j] = post_weight(mix[hc + j], ld(scale, scale_dtype, 1), ld(base, base_dtype, hc + j));
            if (pre) pre[t * hc + j] = pre_weight(mix[j], ld(scale, scale_dtype, 0), ld(base, base_dtype, j), eps);
        }
        return;
    }
    sinkhorn_block(mix, scale, scale_dtype, base, base_dtype, hc, iters, eps, sh_pre, sh_post, sh_comb, sh_sums);
    for (int j = threadIdx.x; j < hc; j += blockDim.x) {
        if (pre) pre[t * hc + j] = sh_pre[j];
        post[t * hc + j] = sh_post[j];
    }
    for (int i = threadIdx.x; i < hh; i += blockDim.x) comb[t * hh + i] = sh_comb[i];
}

/* One block per token: the standalone split of given mixes. */
__global__ void __launch_bounds__(64) sinkhorn_kernel(const void *mixes, int mixes_dtype, const void *scale,
                                                      int scale_dtype, const void *base, int base_dtype, int hc,
                                                      int iters, float eps, float *pre, float *post, float *comb)
{
    __shared__ float mix[MIX_MAX], p[HC_MAX], q[HC_MAX], c[HC_MAX * HC_MAX], sums[HC_MAX];
    const int M = (2 + hc) * hc;
    const int64_t t = blockIdx.x;
    for (int i = threadIdx.x; i < M; i += blockDim.x) mix[i] = ld(mixes, mixes_dtype, t * M + i);
    __syncthreads();
    sinkhorn_token(mix, scale, scale_dtype, base, base_dtype, hc, iters, eps, t, pre, post, comb, p, q, c, sums);
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
    if (T > INT32_MAX) return dsrtk_fail(DSRTK_ERROR, "%s: %lld tokens are too many for one launch", what, (long long)T);
    DSRTK_SET_DEVICE(dev, what);
    sinkhorn_kernel<<<(unsigned)T, 64, 0, (cudaStream_t)stream>>>(mixes, mixes_dtype, scale, scale_dtype, base,
                                                                  base_dtype, hc, iters, eps, pre, post, comb);
    return dsrtk_check_launch("sinkhorn_kernel", dev);
}

/* ---- div_rn_fast against div.rn (kernels.h: dsrtk_nn_div_rn_check) ---- */

__device__ __forceinline__ uint32_t mix32(uint32_t x) /* a 32-bit integer hash (lowbias32) */
{
    x ^= x >> 16, x *= 0x7feb352du, x ^= x >> 15, x *= 0x846ca68bu, x ^= x >> 16;
    return x;
}

/* a float of |x| in [2^-60, 2^60) from two hash words: sign, exponent and mantissa uniform; one
 * pair in 16 takes an edge of the range (the least or greatest exponent, mantissa 0 or all ones) */
__device__ __forceinline__ float div_operand(uint32_t h, uint32_t g)
{
    uint32_t e = 127 - 60 + g % 120, m = h & 0x7fffffu;
    if ((g >> 8 & 15) == 0) e = g >> 12 & 1 ? 127 + 59 : 127 - 60, m = g >> 13 & 1 ? 0x7fffffu : 0;
    return __uint_as_float((h & 0x80000000u) | e << 23 | m);
}

__global__ void div_check_kernel(int64_t n, uint32_t seed, unsigned long long *mismatches)
{
    unsigned long long bad = 0;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const uint32_t k = mix32(seed ^ mix32((uint32_t)i ^ mix32((uint32_t)(i >> 32))));
        const float a = div_operand(mix32(k + 1), mix32(k + 2)), b = div_operand(mix32(k + 3), mix32(k + 4));
        bad += __float_as_uint(div_rn_fast(a, b)) != __float_as_uint(__fdiv_rn(a, b));
    }
    if (bad) atomicAdd(mismatches, bad);
}

extern "C" int dsrtk_nn_div_rn_check(int dev, int64_t n, uint32_t seed, int64_t *mismatches)
{
    DSRTK_SET_DEVICE(dev, "nn.div_rn_check");
    unsigned long long *count = NULL, host = 0;
    int rc = dsrtk_check(cudaMalloc((void **)&count, sizeof *count), "nn.div_rn_check: cudaMalloc");
    if (!rc) rc = dsrtk_check(cudaMemset(count, 0, sizeof *count), "nn.div_rn_check: cudaMemset");
    if (!rc) {
        div_check_kernel<<<dsrtk_grid_for(dev, n, DSRTK_BLOCK), DSRTK_BLOCK>>>(n, seed, count);
        rc = dsrtk_check_launch("div_check_kernel", dev);
    }
    if (!rc) rc = dsrtk_check(cudaMemcpy(&host, count, sizeof host, cudaMemcpyDeviceToHost), "nn.div_rn_check: cudaMemcpy");
    if (count) (void)cudaFree(count);
    *mismatches = (int64_t)host;
    return rc;
}

/* ---- hc_post's formula for one element (nn.c: dsrt_nn_hc_post) ---- */

/* X'_k[c] = post_k·f[c] + Σ_j comb_jk·X_j[c] of token t: the sum over j in order from 0, then the
 * fp32 product added, the CPU's operations one for one. post_kernel and post_vec_kernel unroll the
 * same sequence; the fused hc_post_pre runs this one, so all give the same bits. HC > 0 fixes hc at
 * compile time (the model's 4): every load is issued before the first is used, one round trip
 * where the loop over j took one a stream (~3200 clocks of a one-token split_kernel's ~8600,
 * clock64, H200). */
template <int HC>
__device__ __forceinline__ float post_value(const dsrtk_hc_post_args &a, int64_t t, int hc_arg, int64_t d, int k, int64_t c)
{
    float mixed = 0;
    if constexpr (HC > 0) {
        (void)hc_arg;
        float cm[HC], x[HC];
#pragma unroll
        for (int j = 0; j < HC; j++) cm[j] = ld(a.comb, a.comb_dtype, (t * HC + j) * HC + k), x[j] = ld(a.X, a.X_dtype, (t * HC + j) * d + c);
        const float p = ld(a.post, a.post_dtype, t * HC + k), f = ld(a.f, a.f_dtype, t * d + c);
#pragma unroll
        for (int j = 0; j < HC; j++) mixed = __fadd_rn(mixed, __fmul_rn(cm[j], x[j]));
        return __fadd_rn(__fmul_rn(p, f), mixed);
    } else {
        const int hc = hc_arg;
        for (int j = 0; j < hc; j++)
            mixed = __fadd_rn(mixed, __fmul_rn(ld(a.comb, a.comb_dtype, (t * hc + j) * hc + k),
                                               ld(a.X, a.X_dtype, (t * hc + j) * d + c)));
        return __fadd_rn(__fmul_rn(ld(a.post, a.post_dtype, t * hc + k), ld(a.f, a.f_dtype, t * d + c)), mixed);
    }
}

/* a warp's rows m0, m0 + 8, ... (SPLIT_FN_ROWS of them, zeros past M) of fn at the block's columns:
 * split_kernel's f */
enum { SPLIT_FN_ROWS = 3 }; /* all of a warp's rows for M <= 24: the model's hc_pre */
__device__ __forceinline__ void load_fn_rows(const void *fn, int fn_dtype, int m0, int M, int64_t K, int64_t k0, int klen,
                                             int lane, float (&f)[SPLIT_FN_ROWS][8])
{
#pragma unroll
    for (int r = 0; r < SPLIT_FN_ROWS; r++) {
        const int m = m0 + r * (SPLIT_THREADS / 32);
#pragma unroll
        for (int i = 0; i < 8; i++)
            f[r][i] = m < M && lane + 32 * i < klen ? ld(fn, fn_dtype, (int64_t)m * K + k0 + lane + 32 * i) : 0.0f;
    }
}

/* ---- the mixes GEMM for few tokens (or f32 X), split over K ---- */

/* Block (split, token group): columns [split·CHUNK, +CHUNK) of TOK tokens. The x chunk goes to shared
 * memory as f32 (its squares summed on the way, in double); then warp w takes rows m = w, w + 8, ...
 * of fn, lane l multiplying fn[m][l + 32i] (i < 8, coalesced) with the TOK token chunks (fn read once
 * per block, reused TOK times from registers) in an fp32 chain of 8 products, a warp tree in fp32
 * finishing each partial dot. Cost: T·M·K FMAs, fn (M·K·|fn| bytes) read ceil(T/TOK) times.
 * POST (hc_post_pre): the block first computes its chunk of X' = hc_post(f, X, post, comb) with
 * post_value, writes it to X (X' here, of X_dtype) and takes the stored value (bf16-rounded in
 * reference precision, as hc_pre would read it back) as its x: X' is never read back for the GEMM. */
template <int TOK, bool POST>
__global__ void __launch_bounds__(SPLIT_THREADS) split_kernel(const void *X, int X_dtype, const void *fn, int fn_dtype,
                                                              int64_t T, int64_t K, int M, int splits, double *part,
                                                              const __grid_constant__ dsrtk_hc_post_args pa, int hc)
{
    dsrtk_wait_producer(); /* launched dependent (common.cuh) */
    static_assert(DSRTK_NN_HC_CHUNK == 8 * 32 && SPLIT_THREADS == DSRTK_NN_HC_CHUNK, "one column per thread, 8 per lane");
    __shared__ float xs[TOK][DSRTK_NN_HC_CHUNK];
    __shared__ double sq[SPLIT_THREADS / 32][TOK];
    const int split = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t k0 = (int64_t)split * DSRTK_NN_HC_CHUNK, t0 = (int64_t)blockIdx.y * TOK;
    const int klen = (int)(K - k0 < DSRTK_NN_HC_CHUNK ? K - k0 : DSRTK_NN_HC_CHUNK);
    const int k = threadIdx.x;
    /* the warp's first fn rows into registers while x is staged: their round trip was most of the
     * GEMM's ~5400 clocks in a one-token call when it followed the staging, into L1 or not (clock64,
     * H200) */
    float f[SPLIT_FN_ROWS][8];
    load_fn_rows(fn, fn_dtype, warp, M, K, k0, klen, lane, f);
#pragma unroll
    for (int t = 0; t < TOK; t++) {
        float v = 0.0f;
        if (t0 + t < T && k < klen) {
            const int64_t at = (t0 + t) * K + k0 + k;
            if (POST) {
                const int64_t d = K / hc, s = (k0 + k) / d;
                const float y = hc == 4 ? post_value<4>(pa, t0 + t, hc, d, (int)s, k0 + k - s * d)
                                        : post_value<0>(pa, t0 + t, hc, d, (int)s, k0 + k - s * d);
                st((void *)X, X_dtype, at, y);
                v = X_dtype == DSRT_F32 ? y : dsrt_bf16_to_f32(dsrt_f32_to_bf16(y)); /* what was stored */
            } else {
                v = ld(X, X_dtype, at);
            }
        }
        xs[t][k] = v;
        double own = (double)__fmul_rn(v, v); /* nn.c's mean_square: fp32 squares, double sum */
        for (int o = 16; o > 0; o >>= 1) own += __shfl_xor_sync(0xffffffffu, own, o);
        if (lane == 0) sq[warp][t] = own;
    }
    __syncthreads();
    if (threadIdx.x < TOK && t0 + threadIdx.x < T) {
        double v = 0;
        for (int w = 0; w < SPLIT_THREADS / 32; w++) v += sq[w][threadIdx.x];
        part[((t0 + threadIdx.x) * splits + split) * (M + 1) + M] = v;
    }
    for (int m0 = warp; m0 < M; m0 += SPLIT_FN_ROWS * (SPLIT_THREADS / 32)) {
        if (m0 != warp) load_fn_rows(fn, fn_dtype, m0, M, K, k0, klen, lane, f);
#pragma unroll
        for (int r = 0; r < SPLIT_FN_ROWS; r++) {
            const int m = m0 + r * (SPLIT_THREADS / 32);
            if (m >= M) break;
#pragma unroll
            for (int t = 0; t < TOK; t++) {
                float acc = 0;
#pragma unroll
                for (int i = 0; i < 8; i++) acc = fmaf(f[r][i], xs[t][lane + 32 * i], acc);
                for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
                if (lane == 0 && t0 + t < T) part[((t0 + t) * splits + split) * (M + 1) + m] = acc;
            }
        }
    }
}

/* ---- the mixes GEMM for many tokens: bf16 tensor cores ---- */

/* fn [M, K] (bf16 or f32) -> planes [3][PR][K] bf16 with PR = 8·ceil(M/8) rows (rows >= M zero):
 * hi = bf16(v), mid = bf16(v − hi), lo = bf16(v − hi − mid). Each difference is exact in fp32
 * (Sterbenz), so hi + mid + lo holds v's 24 bits (26 in all). 4·M·K bytes in, 6·PR·K out, once
 * per call (1.5 MB for the model: ~1 µs). */
__global__ void __launch_bounds__(DSRTK_BLOCK) fn_planes_kernel(const void *fn, int fn_dtype, int M, int PR, int64_t K,
                                                                uint16_t *planes)
{
    const int64_t n = (int64_t)PR * K, plane = n;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = e / K;
        float v = r < M ? ld(fn, fn_dtype, e) : 0.0f;
        uint16_t hi = dsrt_f32_to_bf16(v);
        float r1 = __fsub_rn(v, dsrt_bf16_to_f32(hi));
        uint16_t mid = dsrt_f32_to_bf16(r1);
        uint16_t lo = dsrt_f32_to_bf16(__fsub_rn(r1, dsrt_bf16_to_f32(mid)));
        planes[e] = hi, planes[plane + e] = mid, planes[2 * plane + e] = lo;
    }
}

/* Block (token tile of 128, split of split_len columns, a multiple of 32 as K is). Warp w owns tokens
 * tile + 32w .. +32 (two m-tiles of 16); per chunk of 32 columns lane (g = lane/4, q = lane%4) loads
 * 16 bytes of X, columns 8q..8q+8 of rows g and g + 8 of each m-tile, straight from HBM into
 * registers. The sum over k does not care in which order the columns come, so the MMA's k index is
 * permuted alike for A and B: the words w0 w1 of that load are k-step 1's (a0|a2, a1|a3) fragments
 * (logical k 2q, 2q+1 | 2q+8, 2q+9 = columns 8q..8q+3), w2 w3 k-step 2's, and B's fragments are the
 * same 16 bytes of the fn plane's row n0 + g: (b0, b1) = (v0, v1), then (v2, v3). The planes' chunk
 * (3·PR rows × 64 bytes) is staged in shared memory once per block, double-buffered with one
 * barrier per chunk. Squares of x summed per lane in double, then over the 4 lanes of a row.
 * Per token and column: 2 bytes of X from HBM; 3·2·PR FLOPs on tensor cores; fn from L2 once per
 * block (T/128 · 3·PR·K·2 bytes in all, 72 MB at T = 4096: L2 traffic, not HBM). */
template <int NT>
__global__ void __launch_bounds__(TC_THREADS) mix_tc_kernel(const uint16_t *__restrict__ X, const uint16_t *__restrict__ planes,
                                                            int64_t T, int64_t K, int M, int splits, int64_t split_len,
                                                            double *__restrict__ part)
{
    constexpr int PR = 8 * NT, CHUNK_VECS = 3 * PR * 4; /* uint4s of B per chunk */
    __shared__ uint4 bs[2][CHUNK_VECS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
    const int split = blockIdx.y;
    const int64_t k0 = (int64_t)split * split_len, k1 = k0 + split_len < K ? k0 + split_len : K;
    const int chunks = (int)((k1 - k0) / 32);
    const int64_t tw = (int64_t)blockIdx.x * TC_TOKENS + warp * 32;
    const uint4 *xrow[2][2]; /* rows g and g + 8 of m-tiles 0 and 1, at column k0 + 8q; NULL past T */
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int64_t t = tw + 16 * mt + 8 * h + g;
            xrow[mt][h] = t < T ? (const uint4 *)(X + t * K + k0 + 8 * q) : nullptr;
        }
    /* B's chunk c: uint4 u of the stage is plane p, row r, columns 8·(u % 4).. of the chunk */
    auto load_b = [&](int c, uint4 (&v)[(CHUNK_VECS + TC_THREADS - 1) / TC_THREADS]) {
#pragma unroll
        for (int i = 0; i < (CHUNK_VECS + TC_THREADS - 1) / TC_THREADS; i++) {
            const int u = threadIdx.x + i * TC_THREADS;
            if (u < CHUNK_VECS) {
                const int pr = u >> 2; /* p·PR + r */
                v[i] = *(const uint4 *)(planes + (int64_t)pr * K + k0 + 32 * c + 8 * (u & 3));
            }
        }
    };
    auto store_b = [&](int buf, const uint4 (&v)[(CHUNK_VECS + TC_THREADS - 1) / TC_THREADS]) {
#pragma unroll
        for (int i = 0; i < (CHUNK_VECS + TC_THREADS - 1) / TC_THREADS; i++) {
            const int u = threadIdx.x + i * TC_THREADS;
            if (u < CHUNK_VECS) bs[buf][u] = v[i];
        }
    };
    uint4 bnext[(CHUNK_VECS + TC_THREADS - 1) / TC_THREADS];
    if (chunks > 0) {
        load_b(0, bnext);
        store_b(0, bnext);
    }
    __syncthreads();
    float acc[2][NT][4];
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++) acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.0f;
    double sq[2][2] = {{0, 0}, {0, 0}};
    /* X a chunk ahead: loaded where it was used, a lane kept 64 bytes in flight and the GEMM read X
     * at ~1.7 TB/s (CUPTI, H200, Flash prefill: 78 us a call) */
    auto load_x = [&](int c, uint4 (&a)[2][2]) {
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
#pragma unroll
            for (int h = 0; h < 2; h++) a[mt][h] = xrow[mt][h] && c < chunks ? xrow[mt][h][4 * c] : make_uint4(0, 0, 0, 0);
    };
    uint4 anext[2][2];
    load_x(0, anext);
    for (int c = 0; c < chunks; c++) {
        if (c + 1 < chunks) load_b(c + 1, bnext); /* in flight while this chunk computes */
        uint4 a[2][2];
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
#pragma unroll
            for (int h = 0; h < 2; h++) a[mt][h] = anext[mt][h];
        load_x(c + 1, anext);
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const uint32_t w[4] = {a[mt][h].x, a[mt][h].y, a[mt][h].z, a[mt][h].w};
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const float lo = dsrt_bits_f32(w[i] << 16), hi = dsrt_bits_f32(w[i] & 0xffff0000u);
                    sq[mt][h] += (double)__fmul_rn(lo, lo);
                    sq[mt][h] += (double)__fmul_rn(hi, hi);
                }
            }
        const uint4 *b = bs[c & 1];
#pragma unroll
        for (int p = 0; p < 3; p++)
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                const uint4 v = b[(p * PR + nt * 8 + g) * 4 + q];
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    mma_bf16(acc[mt][nt], a[mt][0].x, a[mt][1].x, a[mt][0].y, a[mt][1].y, v.x, v.y);
                    mma_bf16(acc[mt][nt], a[mt][0].z, a[mt][1].z, a[mt][0].w, a[mt][1].w, v.z, v.w);
                }
            }
        if (c + 1 < chunks) store_b((c + 1) & 1, bnext); /* that buffer's readers passed the last barrier */
        __syncthreads();
    }
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            double v = sq[mt][h];
            v += __shfl_xor_sync(0xffffffffu, v, 1);
            v += __shfl_xor_sync(0xffffffffu, v, 2);
            const int64_t t = tw + 16 * mt + 8 * h + g;
            if (t >= T) continue;
            double *out = part + (t * splits + split) * (M + 1);
            if (q == 0) out[M] = v;
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int i = 0; i < 2; i++) { /* C fragment: rows g | g + 8, columns 2q, 2q + 1 */
                    const int m = nt * 8 + 2 * q + i;
                    if (m < M) out[m] = acc[mt][nt][2 * h + i];
                }
        }
}

/* ---- per token: the mixes, the collapse, Sinkhorn ---- */

/* acc[i] = Σ_s w_s·X_s[col + i] over the hc streams of token t, s in order from 0 (nn.c's
 * collapse), 8 columns at element col (16-byte aligned rows). HC > 0 fixes hc at compile time (the
 * model's 4): the HC loads are all issued before the first is used, where the runtime loop waited
 * on each stream's load in turn. The same operations in the same order, so the same bits. */
template <int HC>
__device__ __forceinline__ void collapse8(const void *X, int X_dtype, int64_t t, int hc_arg, int64_t d, int64_t col,
                                          const float *w, float (&acc)[8])
{
    const int hc = HC > 0 ? HC : hc_arg;
#pragma unroll
    for (int i = 0; i < 8; i++) acc[i] = 0;
    if constexpr (HC > 0) {
        float x[HC][8];
#pragma unroll
        for (int s = 0; s < HC; s++) ld8(X, X_dtype, (t * HC + s) * d + col, x[s]);
#pragma unroll
        for (int s = 0; s < HC; s++)
#pragma unroll
            for (int i = 0; i < 8; i++) acc[i] = __fadd_rn(acc[i], __fmul_rn(w[s], x[s][i]));
    } else {
        for (int s = 0; s < hc; s++) {
            float x[8];
            ld8(X, X_dtype, (t * hc + s) * d + col, x);
#pragma unroll
            for (int i = 0; i < 8; i++) acc[i] = __fadd_rn(acc[i], __fmul_rn(w[s], x[i]));
        }
    }
}

/* pre_kernel<NV>'s dynamic shared memory: the collapse block's staged rows, its token's hc streams
 * then the norm's weights */
static size_t pre_stage_bytes(int hc, int64_t d, int X_dtype, int norm_w_dtype)
{
    return (size_t)d * ((size_t)hc * (X_dtype == DSRT_F32 ? 4 : 2) + (norm_w_dtype == DSRT_F32 ? 4 : 2));
}

/* Block (token, part): the token's partials summed over the splits in order (double; a warp per
 * value, lanes over the splits, a fixed tree), then mixes_m = fp32(dot_m)·ρ with
 * ρ = 1/sqrt(fp32(Σx²/K) + norm_eps) (nn.c's hc_mixes). Parts < parts_n: the weights
 * w_s = σ(mix_s·scale_0 + base_s) + hc_eps (hc_pre's pre, also hc_head's weights) and
 * u[c] = Σ_s w_s·X_s[c] (nn.c's collapse) over the part's columns, 8 at a time with 16-byte accesses
 * when vec. Part parts_n (hc_pre only): Sinkhorn -> post, comb. Tokens run from the last one, whose
 * X the GEMM read most recently (the most of it still in L2). Bytes: X once (T·K·|X|), u once.
 * NV > 0 (a norm weight given): one collapse block of NORM_THREADS per token computes
 * the whole row, NV vectors of 8 a thread, and writes it RMS-normed (rmsnorm.cuh's operations on the
 * values u would have been stored as): the separate norm's launch and its pass over u saved. Its
 * dynamic shared memory (pre_stage_bytes) takes the token's streams and the norm's weights, copied
 * in with cp.async as soon as the block starts, so they land while the partials are summed (into
 * L1 by prefetch_l1 they still took ~4500 of the block's ~10000 clocks after the partials, clock64
 * inside a decode step, H200). */
template <int NV>
__global__ void __launch_bounds__(NORM_THREADS) pre_kernel(const void *X, int X_dtype, const void *scale, int scale_dtype,
                                                           const void *base, int base_dtype, int64_t T, int hc,
                                                           int64_t d, float hc_eps, float norm_eps, int iters, int head,
                                                           int splits, const double *part, int parts_n, int vec,
                                                           void *u, int u_dtype, const void *norm_w, int norm_w_dtype,
                                                           float *post, float *comb)
{
    extern __shared__ uint4 pre_stage[];
    dsrtk_wait_producer(!head); /* launched dependent (common.cuh); the LM head follows hc_head */
    __shared__ float mix[MIX_MAX], w[HC_MAX], q[HC_MAX], c[HC_MAX * HC_MAX], sums[HC_MAX];
    __shared__ double dots[MIX_MAX + 1], scratch[33];
    const int M = head ? hc : (2 + hc) * hc, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const bool sinkhorn = (int)blockIdx.y == parts_n;
    const int64_t t = T - 1 - blockIdx.x, K = (int64_t)hc * d;
    /* the values this block needs: the hc pre dots and Σx², or all M + 1 */
    const int nv = sinkhorn ? M + 1 : hc + 1;
    /* what the block reads after the partials, on its way while they come: Sinkhorn's scales and
     * bases into L1 (prefetch_l1), and the collapse's; with NV its token's streams and the norm's
     * weights into shared memory, else into L1 */
    if (threadIdx.x < 3) prefetch_l1(scale, scale_dtype, threadIdx.x);
    if (threadIdx.x < (sinkhorn ? M : hc)) prefetch_l1(base, base_dtype, threadIdx.x);
    const size_t x_bytes = (size_t)K * (X_dtype == DSRT_F32 ? 4 : 2);
    if (NV > 0 && !sinkhorn) {
        const char *xt = (const char *)X + t * x_bytes;
        for (size_t i = 16 * threadIdx.x; i < x_bytes; i += 16 * NORM_THREADS) cp_async16((char *)pre_stage + i, xt + i);
        if (norm_w)
            for (size_t i = 16 * threadIdx.x; i < (size_t)d * (norm_w_dtype == DSRT_F32 ? 4 : 2); i += 16 * NORM_THREADS)
                cp_async16((char *)pre_stage + x_bytes + i, (const char *)norm_w + i);
        cp_async_commit();
    }
    /* warp w takes values v = w + 4b (b < PRE_BATCH) at once: the loop over the splits is the outer
     * one, so the PRE_BATCH loads of a split are in flight together (one memory round trip per 32
     * splits instead of one per value); each value is still summed from 0 over sp = lane, lane + 32,
     * ... then the same xor tree: the same bits as one value at a time */
    for (int v0 = warp; v0 < nv; v0 += PRE_BATCH * warps) {
        double s[PRE_BATCH];
        int mb[PRE_BATCH];
#pragma unroll
        for (int b = 0; b < PRE_BATCH; b++) {
            const int v = v0 + b * warps;
            s[b] = 0;
            /* the collapse skips to Σx² after the hc pre dots; -1: past the values */
            mb[b] = v >= nv ? -1 : v < hc ? v : sinkhorn ? v : M;
        }
        /* two splits a lane at once, their loads in flight together: Flash's 64 splits
         * in one memory round trip, not two (the same additions in the same order) */
        int sp = lane;
        for (; sp + 32 < splits; sp += 64) {
            const double *row0 = part + (t * splits + sp) * (M + 1), *row1 = row0 + 32 * (M + 1);
            double v0s[PRE_BATCH], v1s[PRE_BATCH];
#pragma unroll
            for (int b = 0; b < PRE_BATCH; b++) {
                v0s[b] = mb[b] >= 0 ? row0[mb[b]] : 0.0;
                v1s[b] = mb[b] >= 0 ? row1[mb[b]] : 0.0;
            }
#pragma unroll
            for (int b = 0; b < PRE_BATCH; b++) s[b] = s[b] + v0s[b] + v1s[b];
        }
        if (sp < splits) {
            const double *row = part + (t * splits + sp) * (M + 1);
#pragma unroll
            for (int b = 0; b < PRE_BATCH; b++)
                if (mb[b] >= 0) s[b] += row[mb[b]];
        }
#pragma unroll
        for (int b = 0; b < PRE_BATCH; b++) {
            if (mb[b] < 0) continue; /* uniform over the warp: past the values, no shuffles (740 of a
                                      * block's ~3300 clocks before its barrier went to them) */
            for (int o = 16; o > 0; o >>= 1) s[b] += __shfl_xor_sync(0xffffffffu, s[b], o);
            if (lane == 0) dots[mb[b]] = s[b];
        }
    }
    __syncthreads();
    const float rho = hc_rho(dots[M], K, norm_eps);
    if (sinkhorn) {
        for (int m = threadIdx.x; m < M; m += blockDim.x) mix[m] = __fmul_rn((float)dots[m], rho);
        __syncthreads();
        sinkhorn_token(mix, scale, scale_dtype, base, base_dtype, hc, iters, hc_eps, t, NULL, post, comb, w, q, c, sums);
        return;
    }
    const float s0 = ld(scale, scale_dtype, 0);
    for (int s = threadIdx.x; s < hc; s += blockDim.x)
        w[s] = pre_weight(__fmul_rn((float)dots[s], rho), s0, ld(base, base_dtype, s), hc_eps);
    if (NV > 0) cp_async_wait<0>();
    __syncthreads();
    if constexpr (NV > 0) {
        const void *xs = pre_stage, *ws = (const char *)pre_stage + x_bytes; /* the staged rows: token 0 of xs */
        /* the token's whole row, thread g holding columns 8(g + 256k): rms_norm_rows_kernel<256, NV>'s
         * layout, so u (as stored in u_dtype) is normalised in registers by its operations */
        float v[NV][8];
        double acc = 0;
#pragma unroll
        for (int k = 0; k < NV; k++) {
            const int64_t col = 8 * ((int64_t)threadIdx.x + k * NORM_THREADS);
            if (col >= d) continue;
            float a[8];
            if (hc == 4) collapse8<4>(xs, X_dtype, 0, hc, d, col, w, a);
            else collapse8<0>(xs, X_dtype, 0, hc, d, col, w, a);
#pragma unroll
            for (int i = 0; i < 8; i++) {
                v[k][i] = u_dtype == DSRT_BF16 ? round_bf16(a[i]) : a[i];
                acc += square(v[k][i], 0);
            }
        }
        const float inv = inv_rms(block_sum(acc, scratch), d, norm_eps, 0);
#pragma unroll
        for (int k = 0; k < NV; k++) {
            const int64_t col = 8 * ((int64_t)threadIdx.x + k * NORM_THREADS);
            if (col >= d) continue;
            norm_scale8(v[k], inv, norm_w ? ws : NULL, norm_w_dtype, col);
            st8(u, u_dtype, t * d + col, v[k]);
        }
        return;
    }
    const int64_t part_len = (d + parts_n - 1) / parts_n;
    const int64_t c0 = blockIdx.y * part_len, c1 = c0 + part_len < d ? c0 + part_len : d;
    if (vec) { /* part_len and d multiples of 8 */
        for (int64_t col = c0 + 8 * threadIdx.x; col < c1; col += 8 * blockDim.x) {
            float acc[8];
            if (hc == 4) collapse8<4>(X, X_dtype, t, hc, d, col, w, acc);
            else collapse8<0>(X, X_dtype, t, hc, d, col, w, acc);
            st8(u, u_dtype, t * d + col, acc);
        }
        return;
    }
    for (int64_t col = c0 + threadIdx.x; col < c1; col += blockDim.x) {
        float acc = 0;
        for (int s = 0; s < hc; s++) acc = __fadd_rn(acc, __fmul_rn(w[s], ld(X, X_dtype, (t * hc + s) * d + col)));
        st(u, u_dtype, t * d + col, acc);
    }
}

/* Sinkhorn of many tokens (a prefill's hc_pre, HC² <= 32): a warp a token, SINK_TOKENS a block.
 * pre_kernel gives each token a Sinkhorn block beside its collapse block, one busy warp holding a
 * block slot and the collapse's staging memory, so in a prefill half of its blocks left the
 * collapse half the residency: the Flash slice's whole prefill 28.74-28.86 -> 28.52-28.63 ms
 * (bench_dsv4.lua, three A/B pairs in one visit, H200). The values and operations are pre_kernel's
 * Sinkhorn block's, so the same bits: each value's partials summed from 0 over sp = lane, lane +
 * 32, ..., the same xor tree, ρ, the mixes, sinkhorn_warp, post. */
enum { SINK_TOKENS = 8 };
template <int HC>
__global__ void __launch_bounds__(SINK_TOKENS * 32) sinkhorn_tokens_kernel(const void *scale, int scale_dtype,
                                                                           const void *base, int base_dtype, int64_t T,
                                                                           int64_t d, float hc_eps, float norm_eps, int iters,
                                                                           int splits, const double *part, float *post,
                                                                           float *comb)
{
    constexpr int M = (2 + HC) * HC;
    __shared__ float mix[SINK_TOKENS][M];
    dsrtk_wait_producer(); /* launched dependent (common.cuh) */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t t = (int64_t)blockIdx.x * SINK_TOKENS + warp;
    if (t >= T) return; /* the whole warp */
    double s[M + 1];
#pragma unroll
    for (int m = 0; m <= M; m++) s[m] = 0;
    for (int sp = lane; sp < splits; sp += 32) {
        const double *row = part + (t * splits + sp) * (M + 1);
#pragma unroll
        for (int m = 0; m <= M; m++) s[m] += row[m];
    }
#pragma unroll
    for (int m = 0; m <= M; m++)
        for (int o = 16; o > 0; o >>= 1) s[m] += __shfl_xor_sync(0xffffffffu, s[m], o);
    const float rho = hc_rho(s[M], HC * d, norm_eps);
    if (lane == 0)
#pragma unroll
        for (int m = 0; m < M; m++) mix[warp][m] = __fmul_rn((float)s[m], rho);
    __syncwarp();
    sinkhorn_warp<HC>(mix[warp], scale, scale_dtype, base, base_dtype, HC, iters, hc_eps, comb + t * HC * HC);
    if (lane < HC)
        post[t * HC + lane] = post_weight(mix[warp][HC + lane], ld(scale, scale_dtype, 1), ld(base, base_dtype, HC + lane));
}

/* ---- one token on a cluster: hc_pre, hc_post_pre and hc_head of a decode step in one launch ----
 *
 * A cluster of C = d / 256 blocks (16 for Flash: Hopper places clusters of 16) holds the token:
 * block r takes columns [256 r, 256 r + 256) of every stream, which are exactly split_kernel's
 * chunks s·C + r, so its partial dots are split_kernel's, bit for bit (the same fp32 chains and
 * trees). The blocks store their partials into each other's shared memory, and each sums the ones
 * it needs in pre_kernel's order (lane sp, then sp + 32, then the xor tree): the mixes, ρ, the
 * weights and Sinkhorn are pre_kernel's bits too. Block 0's two extra warps run Sinkhorn (hc_pre)
 * while every block collapses its own columns (already in its shared memory) and, given a norm
 * weight, normalises them with the row's Σu², summed over the blocks in block order (pre_kernel's
 * tree differs; both are double sums of the same fp32 squares, so the fp32 mean is the same but for
 * a one-in-10^9 tie). The Sinkhorn warps arrive at the norm's barrier before they start.
 *
 * Measured on the H200 (bench_dsv4, Flash, interleaved with split_kernel + pre_kernel in one visit):
 * the decode step 0.933-0.940 ms against 0.936-0.937, the HC head's row 2-3 us faster and the
 * layers even: a block reads 4 x 24 rows of fn (96 KB) where split_kernel's 64 blocks read 24 KB
 * each (the loads took ~2.5 us, globaltimer marks), which eats what the second launch and the
 * partials' round trip through L2 cost (~2 us of pre_kernel's start); Sinkhorn's ~3 us chain stays
 * last either way. Blocks reading the partials from each other (ld through map_shared_rank) took
 * ~1.5 us a round where stores before the barrier cost next to nothing. What the cluster saves for
 * sure is a launch per HC op: nine a decode step, ~3 us of the host's issue each. Reading fn
 * before the producer wait then took the loads off the chain (below). Bytes: fn read once, X
 * once, u once. */
enum {
    CL_COLS = DSRTK_NN_HC_CHUNK, /* a block's columns of each stream: one split each */
    CL_MAX_BLOCKS = 16,
    CL_HC = 4,                   /* the model's streams: the only count taken here */
    CL_WORKERS = CL_COLS / 32,   /* warps with a column each */
    CL_THREADS = CL_COLS + 64,   /* and two for Sinkhorn (block 0 of hc_pre) */
    CL_M = (2 + CL_HC) * CL_HC,  /* hc_pre's mixes; hc_head has CL_HC */
};

/* barrier.cluster in two halves: what a thread arrives with is released to the threads that wait */
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory"); }
__device__ __forceinline__ void cluster_arrive_relaxed() { asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory"); }
/* the worker warps' own barrier (named barrier 1) */
__device__ __forceinline__ void workers_sync() { asm volatile("bar.sync 1, 256;" ::: "memory"); /* CL_COLS threads */ }

/* R: fn rows a warp, ceil(M / 8): 3 for hc_pre, 1 for hc_head. POST: hc_post first (hc_post_pre, hc_post_head),
 * X the X' it writes. */
template <int R, bool POST>
__global__ void __launch_bounds__(CL_THREADS, 1) pre_cluster_kernel(void *X, int X_dtype, const void *fn, int fn_dtype,
                                                                    const void *scale, int scale_dtype, const void *base,
                                                                    int base_dtype, int64_t d, float hc_eps, float norm_eps,
                                                                    int iters, void *u, int u_dtype, const void *norm_w,
                                                                    int norm_w_dtype, float *post, float *comb,
                                                                    const __grid_constant__ dsrtk_hc_post_args pa)
{
    constexpr int HC = CL_HC, M = R == 1 ? HC : CL_M;
    static_assert(R == 1 || R == 3, "hc_head's rows or hc_pre's");
    static_assert(CL_COLS == 256, "workers_sync counts 256 threads");
    cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
    __shared__ float xs[HC][CL_COLS];
    /* every split's partials, as the blocks store them into each other's: all M + 1 values in block
     * 0 of hc_pre (Sinkhorn's), the hc pre dots and Σx² (at HC) elsewhere */
    __shared__ double table[HC * CL_MAX_BLOCKS][M + 1];
    __shared__ double sq[CL_WORKERS][HC], warp_uu[CL_WORKERS], block_uu[CL_MAX_BLOCKS];
    __shared__ double dots[M + 1];
    __shared__ float mix[M], w[HC], inv_rms_s;
    const int rank = (int)cluster.block_rank(), C = (int)cluster.num_blocks(), S = HC * C;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const bool worker = warp < CL_WORKERS, sinkhorn = R == 3 && rank == 0;
    const int64_t K = HC * d, col = (int64_t)rank * CL_COLS + (tid & (CL_COLS - 1));
    cluster_arrive_relaxed(); /* started: the blocks' shared memory may be written from the first store below */
    /* the parameters while the producer runs (common.cuh: parameters before the wait): the warp's
     * fn rows of each stream's chunk (split_kernel's), the weights' scale and bases, the norm's
     * weight. Loaded after the wait they took ~2.5 us of the chain (globaltimer marks); here the
     * decode step 0.942-0.943 -> 0.933-0.934 ms (bench_dsv4, H200, interleaved). */
    float f[HC][R][8], s0 = 0.0f, base_mine = 0.0f, nw = 1.0f;
    if (worker) {
#pragma unroll
        for (int s = 0; s < HC; s++)
#pragma unroll
            for (int r = 0; r < R; r++) {
                const int m = warp + r * CL_WORKERS;
#pragma unroll
                for (int i = 0; i < 8; i++)
                    f[s][r][i] = m < M ? ld(fn, fn_dtype, (int64_t)m * K + s * d + rank * CL_COLS + lane + 32 * i) : 0.0f;
            }
        s0 = ld(scale, scale_dtype, 0);
        if (tid < HC) base_mine = ld(base, base_dtype, tid);
        if (norm_w) nw = ld(norm_w, norm_w_dtype, col);
    }
    dsrtk_wait_producer();
    if (!worker) { /* Sinkhorn's scales and bases into L1 while the partials are made */
        if (sinkhorn && tid - CL_COLS < 3) prefetch_l1(scale, scale_dtype, tid - CL_COLS);
        if (sinkhorn && tid - CL_COLS < M) prefetch_l1(base, base_dtype, tid - CL_COLS);
    } else {
        /* the column of X, or what X' is made of */
        float x[HC];
        if (POST) { /* split_kernel's X': post_value for the column's four destinations */
#pragma unroll
            for (int k = 0; k < HC; k++) {
                const float y = post_value<HC>(pa, 0, HC, d, k, col);
                st(X, X_dtype, k * d + col, y);
                x[k] = X_dtype == DSRT_F32 ? y : round_bf16(y); /* what was stored */
            }
        } else {
#pragma unroll
            for (int s = 0; s < HC; s++) x[s] = ld(X, X_dtype, s * d + col);
        }
        /* split_kernel's operations: x staged as f32, its squares summed in double, the dots in fp32
         * chains of 8 products and xor trees. Every lane holds a tree's sum (the same bits: each level adds
         * the same two values, in one order or the other); lane b stores it into
         * block b (the pre dots and Σx² into every block, Sinkhorn's mixes into block 0). */
#pragma unroll
        for (int s = 0; s < HC; s++) {
            xs[s][tid] = x[s];
            double own = (double)__fmul_rn(x[s], x[s]);
            for (int o = 16; o > 0; o >>= 1) own += __shfl_xor_sync(0xffffffffu, own, o);
            if (lane == 0) sq[warp][s] = own;
        }
        workers_sync();
        cluster_wait(); /* every block has started */
#pragma unroll
        for (int s = 0; s < HC; s++)
#pragma unroll
            for (int r = 0; r < R; r++) {
                const int m = warp + r * CL_WORKERS;
                if (m >= M) break;
                float acc = 0;
#pragma unroll
                for (int i = 0; i < 8; i++) acc = fmaf(f[s][r][i], xs[s][lane + 32 * i], acc);
                for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
                if (lane < (m < HC ? C : 1)) *cluster.map_shared_rank(&table[s * C + rank][m], lane) = acc;
            }
        if (warp == 0 && lane < C)
#pragma unroll
            for (int s = 0; s < HC; s++) {
                double v = 0;
                for (int w8 = 0; w8 < CL_WORKERS; w8++) v += sq[w8][s];
                *cluster.map_shared_rank(&table[s * C + rank][M], lane) = v;
            }
        cluster_arrive();
        cluster_wait(); /* every block's partials are here */
        /* pre_kernel's sums over the S splits, in its order: lane sp, then sp + 32, then the xor
         * tree; a warp's values loaded at once */
        const int nv = sinkhorn ? M + 1 : HC + 1;
        constexpr int PER_WARP = (M + 1 + CL_WORKERS - 1) / CL_WORKERS;
        double a[PER_WARP], b[PER_WARP];
#pragma unroll
        for (int k = 0; k < PER_WARP; k++) {
            const int v = warp + k * CL_WORKERS, m = v < HC || sinkhorn ? v : M;
            a[k] = v < nv && lane < S ? table[lane][m] : 0.0;
            b[k] = v < nv && lane + 32 < S ? table[lane + 32][m] : 0.0;
        }
#pragma unroll
        for (int k = 0; k < PER_WARP; k++) {
            const int v = warp + k * CL_WORKERS, m = v < HC || sinkhorn ? v : M;
            if (v >= nv) break; /* warp-uniform */
            double sum = 0;
            if (lane < S) sum += a[k];
            if (lane + 32 < S) sum += b[k];
            for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            if (lane == 0) dots[m] = sum;
        }
        workers_sync();
        const float rho = hc_rho(dots[M], K, norm_eps);
        if (tid < HC) w[tid] = pre_weight(__fmul_rn((float)dots[tid], rho), s0, base_mine, hc_eps);
        if (sinkhorn)
            for (int m = tid; m < M; m += CL_COLS) mix[m] = __fmul_rn((float)dots[m], rho);
        __syncthreads(); /* w, and mix for Sinkhorn */
        /* the collapse of the column (collapse8's operations), as stored in u_dtype */
        float v = 0;
#pragma unroll
        for (int s = 0; s < HC; s++) v = __fadd_rn(v, __fmul_rn(w[s], xs[s][tid]));
        if (u_dtype == DSRT_BF16) v = round_bf16(v);
        if (norm_w) { /* the block's Σu² into every block, then the row's in block order */
            double own = square(v, 0);
            for (int o = 16; o > 0; o >>= 1) own += __shfl_xor_sync(0xffffffffu, own, o);
            if (lane == 0) warp_uu[warp] = own;
            workers_sync();
            if (warp == 0 && lane < C) {
                double bs = 0;
                for (int w8 = 0; w8 < CL_WORKERS; w8++) bs += warp_uu[w8];
                *cluster.map_shared_rank(&block_uu[rank], lane) = bs;
            }
            cluster_arrive();
            cluster_wait();
            if (tid == 0) {
                double total = 0;
                for (int bk = 0; bk < C; bk++) total += block_uu[bk];
                inv_rms_s = inv_rms(total, d, norm_eps, 0);
            }
            workers_sync();
            v = __fmul_rn(nw, __fmul_rn(v, inv_rms_s));
        } else {
            cluster_arrive();
            cluster_wait();
        }
        st(u, u_dtype, col, v);
        return;
    }
    /* warps CL_WORKERS and up: the barriers, and (block 0 of hc_pre) Sinkhorn and post */
    cluster_wait();
    cluster_arrive();
    cluster_wait();
    __syncthreads();
    cluster_arrive(); /* the norm's barrier: these warps store nothing another block reads */
    if (sinkhorn && warp == CL_WORKERS)
        sinkhorn_warp<HC>(mix, scale, scale_dtype, base, base_dtype, HC, iters, hc_eps, comb);
    if (sinkhorn && warp == CL_WORKERS + 1 && lane < HC)
        post[lane] = post_weight(mix[HC + lane], ld(scale, scale_dtype, 1), ld(base, base_dtype, HC + lane));
    cluster_wait();
}

/* The cluster's launch where it applies (one token, the model's 4 streams, d = 256 C with C <= 16
 * blocks that the device places at once): DSRTK_OK and *launched, else nothing launched. */
static int launch_pre_cluster(int dev, const dsrtk_hc_post_args *pa, const void *X, int X_dtype, const void *fn,
                              int fn_dtype, const void *scale, int scale_dtype, const void *base, int base_dtype,
                              int64_t T, int hc, int64_t d, float hc_eps, float norm_eps, int iters, int head, void *u,
                              int u_dtype, const void *norm_w, int norm_w_dtype, float *post, float *comb,
                              cudaStream_t cs, int *launched)
{
    *launched = 0;
    if (T != 1 || hc != CL_HC || d % CL_COLS != 0 || d / CL_COLS > CL_MAX_BLOCKS) return DSRTK_OK;
    const int C = (int)(d / CL_COLS);
    void (*kernel)(void *, int, const void *, int, const void *, int, const void *, int, int64_t, float, float, int, void *,
                   int, const void *, int, float *, float *, dsrtk_hc_post_args) =
        head ? (pa ? pre_cluster_kernel<1, true> : pre_cluster_kernel<1, false>)
             : (pa ? pre_cluster_kernel<3, true> : pre_cluster_kernel<3, false>);
    if (dsrtk_clusters_fit(dev, (const void *)kernel, C, CL_THREADS, 0) < 1) return DSRTK_OK;
    const dsrtk_hc_post_args none = {};
    int rc = dsrtk_check(dsrtk_launch_dependent_cluster(kernel, dim3((unsigned)C), dim3(CL_THREADS), 0, cs, C, (void *)X,
                                                        X_dtype, fn, fn_dtype, scale, scale_dtype, base, base_dtype, d,
                                                        hc_eps, norm_eps, iters, u, u_dtype, norm_w, norm_w_dtype, post,
                                                        comb, pa ? *pa : none),
                         "launch of pre_cluster_kernel (%d blocks) on cuda:%d", C, dev);
    *launched = !rc;
    return rc;
}

/* ---- hc_post (nn.c: dsrt_nn_hc_post) ---- */

/* One thread per (token, column c), all hc destinations: X'_k[c] = post_k·f[c] + Σ_j comb_jk·X_j[c],
 * the sum over j in order from 0, then the fp32 product added, as the CPU (post_value). Any layout;
 * the model's goes to post_vec_kernel. Bytes: (hc + 1)·T·d in, hc·T·d out: memory bound. */
__global__ void __launch_bounds__(DSRTK_BLOCK) post_kernel(const __grid_constant__ dsrtk_hc_post_args a, void *y, int y_dtype, int64_t T,
                                                           int hc, int64_t d)
{
    const int64_t n = T * d;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = e / d, col = e - t * d;
        for (int k = 0; k < hc; k++) st(y, y_dtype, (t * hc + k) * d + col, post_value<0>(a, t, hc, d, k, col));
    }
}

/* post_kernel for HC streams (the model's 4), d % 8 == 0 and 16-byte aligned f, X, y: a thread takes
 * 8 columns of a token with 16-byte loads and stores, the HC column vectors in registers; the very
 * operations of post_value, so the same bits. comb and post (HC² + HC floats a token) come from L1.
 * Three blocks a multiprocessor (80 registers, no spills) where it took 91 and two: a prefill's 8
 * calls 970 -> 907 us (CUPTI, H200); at four it spills. */
template <int HC>
__global__ void __launch_bounds__(DSRTK_BLOCK, 3) post_vec_kernel(const __grid_constant__ dsrtk_hc_post_args a,
                                                               void *y, int y_dtype,
                                                               int64_t T, int64_t d)
{
    dsrtk_wait_producer(); /* launched dependent (common.cuh) */
    const int64_t dv = d / 8, n = T * dv;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = e / dv, col = 8 * (e - t * dv);
        float f[8], x[HC][8];
        ld8(a.f, a.f_dtype, t * d + col, f);
#pragma unroll
        for (int j = 0; j < HC; j++) ld8(a.X, a.X_dtype, (t * HC + j) * d + col, x[j]);
#pragma unroll
        for (int k = 0; k < HC; k++) {
            float mixed[8] = {0, 0, 0, 0, 0, 0, 0, 0}, out[8];
#pragma unroll
            for (int j = 0; j < HC; j++) {
                const float cjk = ld(a.comb, a.comb_dtype, (t * HC + j) * HC + k);
#pragma unroll
                for (int i = 0; i < 8; i++) mixed[i] = __fadd_rn(mixed[i], __fmul_rn(cjk, x[j][i]));
            }
            const float pk = ld(a.post, a.post_dtype, t * HC + k);
#pragma unroll
            for (int i = 0; i < 8; i++) out[i] = __fadd_rn(__fmul_rn(pk, f[i]), mixed[i]);
            st8(y, y_dtype, (t * HC + k) * d + col, out);
        }
    }
}

static int launch_post(int dev, const dsrtk_hc_post_args &a, void *y, int y_dtype, int64_t T, int hc, int64_t d,
                       cudaStream_t cs)
{
    if (hc == 4 && d % 8 == 0 && aligned16(a.f) && aligned16(a.X) && aligned16(y)) {
        (void)dsrtk_launch_dependent(post_vec_kernel<4>, dim3(dsrtk_grid_for(dev, T * (d / 8), DSRTK_BLOCK)), dim3(DSRTK_BLOCK), 0,
                                     cs, a, y, y_dtype, T, d);
        return dsrtk_check_launch("post_vec_kernel", dev);
    }
    post_kernel<<<dsrtk_grid_for(dev, T * d, DSRTK_BLOCK), DSRTK_BLOCK, 0, cs>>>(a, y, y_dtype, T, hc, d);
    return dsrtk_check_launch("post_kernel", dev);
}

static int check_post_args(const char *what, const dsrtk_hc_post_args &a)
{
    int rc = check_float_dtype(what, "f", a.f_dtype);
    if (!rc) rc = check_float_dtype(what, "X", a.X_dtype);
    if (!rc) rc = check_float_dtype(what, "post", a.post_dtype);
    if (!rc) rc = check_float_dtype(what, "comb", a.comb_dtype);
    return rc;
}

/* ---- the launchers ---- */

template <int TOK>
static void launch_split(dim3 grid, cudaStream_t cs, const void *X, int X_dtype, const void *fn, int fn_dtype, int64_t T,
                         int64_t K, int M, int splits, double *part, const dsrtk_hc_post_args *pa, int hc)
{
    if (pa)
        (void)dsrtk_launch_dependent(split_kernel<TOK, true>, grid, dim3(SPLIT_THREADS), 0, cs, X, X_dtype, fn, fn_dtype, T, K, M,
                                     splits, part, *pa, hc);
    else
        (void)dsrtk_launch_dependent(split_kernel<TOK, false>, grid, dim3(SPLIT_THREADS), 0, cs, X, X_dtype, fn, fn_dtype, T, K, M,
                                     splits, part, dsrtk_hc_post_args{}, hc);
}

/* hc_pre (head 0), hc_head (head 1), or with pa hc_post_pre / hc_post_head, whose X is the X' it writes */
static int launch_pre(const char *what, int dev, const dsrtk_hc_post_args *pa, const void *X, int X_dtype,
                      const void *fn, int fn_dtype, const void *scale, int scale_dtype, const void *base,
                      int base_dtype, int64_t T, int hc, int64_t d, float hc_eps, float norm_eps, int iters, int head,
                      double *work, void *u, int u_dtype, const void *norm_w, int norm_w_dtype, float *post, float *comb,
                      void *stream)
{
    int rc = check_hc(what, hc, head ? 1 : iters);
    if (!rc && pa) rc = check_post_args(what, *pa);
    if (!rc) rc = check_float_dtype(what, pa ? "X'" : "X", X_dtype);
    if (!rc) rc = check_float_dtype(what, "fn", fn_dtype);
    if (!rc) rc = check_float_dtype(what, "scale", scale_dtype);
    if (!rc) rc = check_float_dtype(what, "base", base_dtype);
    if (!rc) rc = check_float_dtype(what, "u", u_dtype);
    if (!rc && norm_w) rc = check_float_dtype(what, "norm weight", norm_w_dtype);
    if (rc) return rc;
    if (T <= 0) return DSRTK_OK;
    if (T > INT32_MAX) return dsrtk_fail(DSRTK_ERROR, "%s: %lld tokens are too many for one launch", what, (long long)T);
    DSRTK_SET_DEVICE(dev, what);
    const int64_t K = (int64_t)hc * d;
    const int M = head ? hc : (2 + hc) * hc;
    cudaStream_t cs = (cudaStream_t)stream;
    int fused = 0;
    if ((rc = launch_pre_cluster(dev, pa, X, X_dtype, fn, fn_dtype, scale, scale_dtype, base, base_dtype, T, hc, d, hc_eps,
                                 norm_eps, iters, head, u, u_dtype, norm_w, norm_w_dtype, post, comb, cs, &fused)) ||
        fused)
        return rc;
    /* many tokens of bf16 X (the model's prefill, reference precision): the tensor-core GEMM, when
     * the rows split into whole 32-column chunks of 16-byte-aligned data; hc_post_pre writes X'
     * first (post_vec_kernel), then reads it back there */
    const bool tc = T >= DSRTK_NN_HC_TC_MIN_T && M <= TC_MAX_M && K % 32 == 0 && K <= 65535LL * DSRTK_NN_HC_TC_SPLIT &&
                    X_dtype == DSRT_BF16 && aligned16(X) && aligned16(work);
    int splits;
    double *part = work;
    if (tc) {
        if (pa && (rc = launch_post(dev, *pa, (void *)X, X_dtype, T, hc, d, cs))) return rc;
        const int NT = (M + 7) / 8, PR = 8 * NT;
        uint16_t *planes = (uint16_t *)work;
        part = work + dsrtk_nn_hc_plane_doubles(M, K);
        splits = (int)((K + DSRTK_NN_HC_TC_SPLIT - 1) / DSRTK_NN_HC_TC_SPLIT);
        fn_planes_kernel<<<dsrtk_grid_for(dev, PR * K, DSRTK_BLOCK), DSRTK_BLOCK, 0, cs>>>(fn, fn_dtype, M, PR, K, planes);
        if ((rc = dsrtk_check_launch("fn_planes_kernel", dev))) return rc;
        const dim3 grid((unsigned)((T + TC_TOKENS - 1) / TC_TOKENS), (unsigned)splits);
        const uint16_t *x16 = (const uint16_t *)X;
        if (NT == 1) mix_tc_kernel<1><<<grid, TC_THREADS, 0, cs>>>(x16, planes, T, K, M, splits, DSRTK_NN_HC_TC_SPLIT, part);
        else if (NT == 2) mix_tc_kernel<2><<<grid, TC_THREADS, 0, cs>>>(x16, planes, T, K, M, splits, DSRTK_NN_HC_TC_SPLIT, part);
        else mix_tc_kernel<3><<<grid, TC_THREADS, 0, cs>>>(x16, planes, T, K, M, splits, DSRTK_NN_HC_TC_SPLIT, part);
        rc = dsrtk_check_launch("mix_tc_kernel", dev);
    } else {
        const int64_t s64 = dsrtk_nn_hc_splits(K), groups = (T + SPLIT_TOK - 1) / SPLIT_TOK;
        if (s64 > INT32_MAX || groups > 65535)
            return dsrtk_fail(DSRTK_ERROR, "%s: %lld tokens of %lld values are too many for one launch", what,
                              (long long)T, (long long)K);
        splits = (int)s64;
        /* tokens per block: all of them up to 16 (fn read once), then groups of 16 */
        if (T == 1) launch_split<1>(dim3(splits, 1), cs, X, X_dtype, fn, fn_dtype, T, K, M, splits, part, pa, hc);
        else if (T == 2) launch_split<2>(dim3(splits, 1), cs, X, X_dtype, fn, fn_dtype, T, K, M, splits, part, pa, hc);
        else if (T <= 4) launch_split<4>(dim3(splits, 1), cs, X, X_dtype, fn, fn_dtype, T, K, M, splits, part, pa, hc);
        else if (T <= 8) launch_split<8>(dim3(splits, 1), cs, X, X_dtype, fn, fn_dtype, T, K, M, splits, part, pa, hc);
        else launch_split<SPLIT_TOK>(dim3(splits, (unsigned)groups), cs, X, X_dtype, fn, fn_dtype, T, K, M, splits, part, pa, hc);
        rc = dsrtk_check_launch("split_kernel", dev);
    }
    if (rc) return rc;
    /* The norm in the collapse's kernel: a block a token (as the collapse of many tokens has), rows
     * of whole 16-byte vectors whose streams fit its shared memory. Otherwise the collapse, then the
     * norm over u. */
    const int nv = (int)((d + 8 * NORM_THREADS - 1) / (8 * NORM_THREADS));
    if (norm_w && d % 8 == 0 && nv <= NORM_MAX_V && aligned16(X) && aligned16(u) && aligned16(norm_w) &&
        pre_stage_bytes(hc, d, X_dtype, norm_w_dtype) <= (size_t)PRE_STAGE_MAX) {
        void (*kernel)(const void *, int, const void *, int, const void *, int, int64_t, int, int64_t, float, float, int,
                       int, int, const double *, int, int, void *, int, const void *, int, float *, float *) =
            nv == 1 ? pre_kernel<1> : pre_kernel<2>;
        const size_t stage = pre_stage_bytes(hc, d, X_dtype, norm_w_dtype);
        if ((rc = dsrtk_allow_shared(dev, (const void *)kernel, stage, "pre_kernel"))) return rc;
        /* a prefill's Sinkhorn: its own launch, a warp a token (sinkhorn_tokens_kernel); decode's
         * stays beside the collapse, a launch less */
        const bool sink_apart = !head && hc == 4 && T >= DSRTK_NN_HC_TC_MIN_T;
        if (sink_apart) {
            (void)dsrtk_launch_dependent(sinkhorn_tokens_kernel<4>, dim3((unsigned)((T + SINK_TOKENS - 1) / SINK_TOKENS)),
                                         dim3(SINK_TOKENS * 32), 0, cs, scale, scale_dtype, base, base_dtype, T, d, hc_eps,
                                         norm_eps, iters, splits, (const double *)part, post, comb);
            if ((rc = dsrtk_check_launch("sinkhorn_tokens_kernel", dev))) return rc;
        }
        (void)dsrtk_launch_dependent(kernel, dim3((unsigned)T, (unsigned)(1 + !(head || sink_apart))), dim3(NORM_THREADS), stage,
            cs, X, X_dtype, scale, scale_dtype, base, base_dtype, T, hc, d, hc_eps, norm_eps, iters, head, splits,
            (const double *)part, 1, 1, u, u_dtype, norm_w, norm_w_dtype, post, comb);
        return dsrtk_check_launch("pre_kernel", dev);
    }
    /* few tokens: each token's columns over blocks of 1024 (8 per thread) so the collapse spreads out */
    int64_t parts = T >= 64 ? 1 : (d + 1023) / 1024;
    if (parts > 64) parts = 64;
    const int64_t part_len = (d + parts - 1) / parts;
    const int vec = d % 8 == 0 && part_len % 8 == 0 && aligned16(X) && aligned16(u);
    (void)dsrtk_launch_dependent(pre_kernel<0>, dim3((unsigned)T, (unsigned)(parts + !head)), dim3(PRE_THREADS), 0, cs,
        X, X_dtype, scale, scale_dtype, base, base_dtype, T, hc, d, hc_eps, norm_eps, iters, head, splits, (const double *)part,
        (int)parts, vec, u, u_dtype, (const void *)NULL, 0, post, comb);
    if ((rc = dsrtk_check_launch("pre_kernel", dev)) || !norm_w) return rc;
    return dsrtk_nn_rms_norm(dev, u, u_dtype, norm_w, norm_w_dtype, u, u_dtype, T, d, norm_eps, 0, stream); /* in place */
}

extern "C" int dsrtk_nn_hc_pre(int dev, const void *X, int X_dtype, const void *fn, int fn_dtype, const void *scale,
                               int scale_dtype, const void *base, int base_dtype, int64_t T, int hc, int64_t d,
                               float hc_eps, float norm_eps, int iters, double *work, void *u, int u_dtype,
                               const void *norm_w, int norm_w_dtype, float *post, float *comb, void *stream)
{
    return launch_pre("nn.hc_pre", dev, NULL, X, X_dtype, fn, fn_dtype, scale, scale_dtype, base, base_dtype, T, hc, d, hc_eps,
                      norm_eps, iters, 0, work, u, u_dtype, norm_w, norm_w_dtype, post, comb, stream);
}

extern "C" int dsrtk_nn_hc_head(int dev, const void *X, int X_dtype, const void *fn, int fn_dtype, const void *scale,
                                int scale_dtype, const void *base, int base_dtype, int64_t T, int hc, int64_t d,
                                float hc_eps, float norm_eps, double *work, void *y, int y_dtype, const void *norm_w,
                                int norm_w_dtype, void *stream)
{
    return launch_pre("nn.hc_head", dev, NULL, X, X_dtype, fn, fn_dtype, scale, scale_dtype, base, base_dtype, T, hc, d, hc_eps,
                      norm_eps, 1, 1, work, y, y_dtype, norm_w, norm_w_dtype, NULL, NULL, stream);
}

extern "C" int dsrtk_nn_hc_post_pre(int dev, const dsrtk_hc_post_args *post_args, void *X_next, int X_next_dtype,
                                    const void *fn, int fn_dtype, const void *scale, int scale_dtype, const void *base,
                                    int base_dtype, int64_t T, int hc, int64_t d, float hc_eps, float norm_eps,
                                    int iters, double *work, void *u, int u_dtype, const void *norm_w,
                                    int norm_w_dtype, float *post, float *comb, void *stream)
{
    if (!post_args) return dsrtk_fail(DSRTK_ERROR, "nn.hc_post_pre: no hc_post operands");
    return launch_pre("nn.hc_post_pre", dev, post_args, X_next, X_next_dtype, fn, fn_dtype, scale, scale_dtype, base,
                      base_dtype, T, hc, d, hc_eps, norm_eps, iters, 0, work, u, u_dtype, norm_w, norm_w_dtype, post, comb,
                      stream);
}

extern "C" int dsrtk_nn_hc_post_head(int dev, const dsrtk_hc_post_args *post_args, void *X_next, int X_next_dtype,
                                     const void *fn, int fn_dtype, const void *scale, int scale_dtype, const void *base,
                                     int base_dtype, int64_t T, int hc, int64_t d, float hc_eps, float norm_eps,
                                     double *work, void *y, int y_dtype, const void *norm_w, int norm_w_dtype,
                                     void *stream)
{
    if (!post_args) return dsrtk_fail(DSRTK_ERROR, "nn.hc_post_head: no hc_post operands");
    return launch_pre("nn.hc_post_head", dev, post_args, X_next, X_next_dtype, fn, fn_dtype, scale, scale_dtype, base,
                      base_dtype, T, hc, d, hc_eps, norm_eps, 1, 1, work, y, y_dtype, norm_w, norm_w_dtype, NULL, NULL,
                      stream);
}

extern "C" int dsrtk_nn_hc_post(int dev, const void *f, int f_dtype, const void *X, int X_dtype, const void *post,
                                int post_dtype, const void *comb, int comb_dtype, void *y, int y_dtype, int64_t T,
                                int hc, int64_t d, void *stream)
{
    const char *what = "nn.hc_post";
    const dsrtk_hc_post_args a = {f, X, post, comb, f_dtype, X_dtype, post_dtype, comb_dtype};
    int rc = check_post_args(what, a);
    if (!rc) rc = check_float_dtype(what, "y", y_dtype);
    if (rc) return rc;
    if (hc < 1) return dsrtk_fail(DSRTK_ERROR, "%s: hc = %d", what, hc);
    if (T <= 0 || d <= 0) return DSRTK_OK;
    DSRTK_SET_DEVICE(dev, what);
    return launch_post(dev, a, y, y_dtype, T, hc, d, (cudaStream_t)stream);
}
