/*
 * attention.cu - the host loops of the DSV4 attention layer (runtime/attention.c, SPEC §6) as
 * kernels: the compressor's ape add, per-channel softmax pooling and ring writes, the attention
 * pool gather and index-list construction, and the lightning indexer's scores and top-k.
 *
 * What this file protects: the CUDA layer gives the CPU layer's result, and its index lists have
 * the CPU's layout, so the two are comparable and a chunked prefill equals a one-shot one equals
 * decode on the GPU too. Each kernel is the corresponding loop of attention.c with one thread per
 * output element (or blocks per query row for the top-k), written with the same arithmetic in
 * the same order:
 *   - the ape add is one rounded f32 add, as the CPU's `g += ape` (bit-exact);
 *   - pooling takes the f32 max, then Σ e^{g−m}·c and Σ e^{g−m} in double in slot order, exactly as
 *     compress() does; only expf may differ from glibc's by an ulp (CUDA's is within 2 ulp);
 *   - indexer scores: the 128-term dot products in double in dimension order, the head sum in
 *     double in head order, with the CPU's bf16 rounding points in reference precision. Every
 *     product of two f32 values is exact in double, so a fused multiply-add gives the same bits as
 *     the CPU's multiply then add: the scores are bit-equal to index_select()'s, and so is the
 *     top-k order (descending score, ties to the lower entry), which makes the picks equal too;
 *   - ring writes, the pool gather and the index lists only move values. A decode step is bound
 *     by launches, so the pool and the index lists are one launch, and so are all the rings'
 *     writes.
 * Decode (few query rows) has its own indexer score kernel, score_split_kernel: a CTA per 8 entries,
 * a thread per (entry, head) dot, the head sum in order by one thread per entry: the same bits.
 * Prefill with up to 64 heads (a multiple of 8) takes score_dmma_kernel: the dots on the FP64
 * tensor cores, the same bits while the dots are exact (see there).
 * The top-k of up to 2048 visible entries ranks each key by counting the keys below it, over
 * many multiprocessors (topk_rank_kernel); longer rows sort in one block, the bitonic sort's
 * stages with jj < 32 as warp shuffles, beyond 4096 after a radix select has narrowed them to
 * about 2k candidates. Either way the ascending order of the same unique keys.
 * Nothing here allocates or synchronises; the caller (attention.c) owns every buffer and stream.
 * All buffers are contiguous f32 (i64 for index lists, i32 for picks), row-major, as described
 * at each launcher in kernels.h.
 */
#include <math.h>
#include <cuda_fp16.h>
#include "common.cuh"
#include "mma.cuh"

static int bad_arg(const char *what, const char *why) { return dsrtk_fail(DSRTK_ERROR, "%s: %s", what, why); }

/* f32 -> f64 kept inside the loop that uses it: a hoisted conversion of the 128 key values would
 * take 256 registers and spill */
__device__ __forceinline__ double widen(float x)
{
    double d;
    asm volatile("cvt.f64.f32 %0, %1;" : "=d"(d) : "f"(x));
    return d;
}

__device__ __forceinline__ float bf16_round(float v) { return dsrt_bf16_to_f32(dsrt_f32_to_bf16(v)); }

/* ---- compressor (attention.c compress, commit_rows; SPEC §6.5) ---- */

/* g[i, k] += ape[(P + i) mod r, k] for the chunk's S rows of `width` gates. */
__global__ void __launch_bounds__(DSRTK_BLOCK) ape_add_kernel(float *g, const float *ape, int64_t S, int64_t width,
                                                              int64_t P, int64_t r)
{
    dsrtk_wait_producer(); /* launched dependent (common.cuh) */
    int64_t n = S * width, step = (int64_t)gridDim.x * blockDim.x;
    for (int64_t at = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; at < n; at += step) {
        int64_t i = at / width, k = at - i * width;
        g[at] = __fadd_rn(g[at], ape[((P + i) % r) * width + k]);
    }
}

int dsrtk_attn_ape_add(int dev, float *g, const float *ape, int64_t S, int64_t width, int64_t P, int64_t r, void *stream)
{
    if (S < 0 || width < 1 || P < 0 || r < 1) return bad_arg("attention.ape_add", "bad sizes");
    if (S == 0) return DSRTK_OK;
    DSRTK_SET_DEVICE(dev, "attention.ape_add");
    int grid = dsrtk_grid_for(dev, S * width, DSRTK_BLOCK);
    (void)dsrtk_launch_dependent(ape_add_kernel, dim3(grid), dim3(DSRTK_BLOCK), 0, (cudaStream_t)stream, g, ape, S, width, P, r);
    return dsrtk_check_launch("attention.ape_add", dev);
}

/* One thread per (entry e, channel ch): entry j = j0 + e pools the slots of positions
 * first … j·r + r − 1 (overlap: from (j−1)·r, the A half [0, d) of window j−1 and the B half
 * [d, 2d) of window j), reading the chunk's rows for positions >= P and the ring otherwise. */
__global__ void __launch_bounds__(DSRTK_BLOCK) pool_kernel(float *out, const float *cc, const float *cg, const float *rc,
                                                           const float *rg, int64_t ring, int64_t P, int64_t j0, int64_t n,
                                                           int d, int r, int coff, int round_bf16)
{
    int64_t total = n * d, step = (int64_t)gridDim.x * blockDim.x, width = (int64_t)coff * d;
    for (int64_t at = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; at < total; at += step) {
        int64_t e = at / d, ch = at - e * d, j = j0 + e;
        int64_t first = coff == 2 && j > 0 ? (j - 1) * r : j * r, last = j * r + r;
        float m = -INFINITY;
        for (int64_t p = first; p < last; p++) {
            int64_t half = coff == 2 && p >= j * r ? d : 0;
            const float *g = p >= P ? cg + (p - P) * width : rg + (p % ring) * width;
            float gv = g[half + ch];
            m = gv > m ? gv : m;
        }
        double num = 0, den = 0;
        for (int64_t p = first; p < last; p++) {
            int64_t half = coff == 2 && p >= j * r ? d : 0;
            int64_t row = p >= P ? (p - P) * width : (p % ring) * width;
            const float *g = p >= P ? cg : rg, *c = p >= P ? cc : rc;
            double w = (double)expf(__fsub_rn(g[row + half + ch], m));
            den = __dadd_rn(den, w);
            num = __fma_rn(w, (double)c[row + half + ch], num); /* the product is exact in double */
        }
        float v = (float)__ddiv_rn(num, den);
        out[at] = round_bf16 ? bf16_round(v) : v;
    }
}

int dsrtk_attn_compress_pool(int dev, float *out, const float *chunk_c, const float *chunk_g, const float *ring_c,
                             const float *ring_g, int64_t ring, int64_t P, int64_t S, int64_t j0, int64_t n, int d, int r,
                             int coff, int round_bf16, void *stream)
{
    const char *what = "attention.compress_pool";
    if (n < 0 || d < 1 || r < 1 || (coff != 1 && coff != 2) || ring < 1 || P < 0 || S < 0 || j0 < 0)
        return bad_arg(what, "bad sizes");
    /* every slot read lies in the chunk or in the ring's last `ring` positions before P */
    int64_t oldest = coff == 2 && j0 > 0 ? (j0 - 1) * r : j0 * r;
    if (n > 0 && ((j0 + n) * r > P + S || (oldest < P && P - oldest > ring)))
        return bad_arg(what, "the entries' windows are not in the chunk and the ring");
    if (n == 0) return DSRTK_OK;
    DSRTK_SET_DEVICE(dev, what);
    int grid = dsrtk_grid_for(dev, n * d, DSRTK_BLOCK);
    pool_kernel<<<grid, DSRTK_BLOCK, 0, (cudaStream_t)stream>>>(out, chunk_c, chunk_g, ring_c, ring_g, ring, P, j0, n, d,
                                                                r, coff, round_bf16);
    return dsrtk_check_launch(what, dev);
}

/* Every ring of the layer in one launch: ring k gets rows[(P + i) mod rows_k] = src_k[i] for the
 * chunk's last min(S, rows_k) rows. The rings are distinct buffers, so their writes are independent;
 * one grid-stride loop over the concatenated elements (start[k] … start[k+1]) costs one launch where
 * a decode step paid one per ring (up to five). */
struct RingWrites {
    dsrtk_ring_write w[DSRTK_MAX_RING_WRITES];
    int64_t start[DSRTK_MAX_RING_WRITES + 1], first[DSRTK_MAX_RING_WRITES];
    int n;
    int64_t P;
};

/* element `at` (< rw.start[rw.n]) of the concatenated writes */
__device__ __forceinline__ void ring_write_at(const RingWrites &rw, int64_t at)
{
    int k = 0;
    while (at >= rw.start[k + 1]) k++;
    const dsrtk_ring_write &w = rw.w[k];
    const int64_t e = at - rw.start[k], i = rw.first[k] + e / w.width, c = e % w.width;
    w.ring[((rw.P + i) % w.rows) * w.width + c] = w.src[i * w.width + c];
}

__global__ void __launch_bounds__(DSRTK_BLOCK) ring_write_kernel(const __grid_constant__ RingWrites rw)
{
    dsrtk_wait_producer(); /* launched dependent (common.cuh) */
    const int64_t total = rw.start[rw.n], step = (int64_t)gridDim.x * blockDim.x;
    for (int64_t at = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; at < total; at += step) ring_write_at(rw, at);
}

/* the writes' plan; n == 0: none */
static int ring_writes_of(const char *what, const dsrtk_ring_write *writes, int n, int64_t P, int64_t S, RingWrites *rw)
{
    if (n < 0 || n > DSRTK_MAX_RING_WRITES || P < 0 || S < 0 || (n > 0 && !writes)) return bad_arg(what, "bad ring writes");
    rw->n = n, rw->P = P, rw->start[0] = 0;
    for (int k = 0; k < n; k++) {
        const dsrtk_ring_write &w = writes[k];
        if (w.rows < 1 || w.width < 1) return bad_arg(what, "bad ring sizes");
        rw->w[k] = w;
        rw->first[k] = S > w.rows ? S - w.rows : 0;
        rw->start[k + 1] = rw->start[k] + (S - rw->first[k]) * w.width;
    }
    return DSRTK_OK;
}

int dsrtk_attn_ring_writes(int dev, const dsrtk_ring_write *writes, int n, int64_t P, int64_t S, void *stream)
{
    const char *what = "attention.ring_writes";
    if (n < 1) return bad_arg(what, "bad sizes");
    RingWrites rw;
    int st = ring_writes_of(what, writes, n, P, S, &rw);
    if (st) return st;
    if (rw.start[n] == 0) return DSRTK_OK;
    DSRTK_SET_DEVICE(dev, what);
    int grid = dsrtk_grid_for(dev, rw.start[n], DSRTK_BLOCK);
    (void)dsrtk_launch_dependent(ring_write_kernel, dim3(grid), dim3(DSRTK_BLOCK), 0, (cudaStream_t)stream, rw);
    return dsrtk_check_launch(what, dev);
}

/* ---- the attention pool and index lists (attention.c forward; SPEC §6.4, §6.7) ---- */

struct GatherArgs {
    float *pool;
    int64_t *idx;
    const float *fresh, *window, *entries;
    const int *picks;
    int64_t window_rows, base, P, S, n_win, n_entries, hd, K, W, r, topk;
    int picked; /* dsrtk_attn_pool_picked: the pool's entries are the queries' picks */
};

/* One launch, one grid-stride loop over both outputs: first the pool's elements, then the index
 * lists', then the ring writes asked for with them (dsrtk_attn_gather says when that is allowed).
 * pool rows: window positions base … P+S−1 (fresh rows for p >= P, the ring before), then the
 * entries 0 … n_entries−1, or when picked query i's picks j < topk at n_win + i·topk + j (a −1
 * pick's row zero).
 * idx[i, m] for query t = P + i: m < W: window positions lo … t (pool rows p − base), −1 after;
 * m >= W: ratio 4: the pick's pool row, picks[i, m − W] + n_win or, picked, n_win + i·topk + m − W
 * (−1 stays −1); other ratios: the visible entries n_win + (m − W) for m − W < (t+1) div r; −1
 * elsewhere (ratio 0 has no compressed part). The attention reads the same rows in the same order
 * either way, so its bits do not depend on the pool's layout. */
__global__ void __launch_bounds__(DSRTK_BLOCK) gather_kernel(const __grid_constant__ GatherArgs a,
                                                             const __grid_constant__ RingWrites rw)
{
    dsrtk_wait_producer(); /* launched dependent (common.cuh) */
    const int64_t n_pool = (a.n_win + (a.picked ? a.S * a.topk : a.n_entries)) * a.hd, n_lists = n_pool + a.S * a.K;
    const int64_t total = n_lists + rw.start[rw.n], step = (int64_t)gridDim.x * blockDim.x;
    for (int64_t at = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; at < total; at += step) {
        if (at >= n_lists) {
            ring_write_at(rw, at - n_lists);
            continue;
        }
        if (at < n_pool) {
            int64_t row = at / a.hd, k = at - row * a.hd;
            float v;
            if (row < a.n_win) {
                int64_t p = a.base + row;
                v = p >= a.P ? a.fresh[(p - a.P) * a.hd + k] : a.window[(p % a.window_rows) * a.hd + k];
            } else if (a.picked) {
                const int pk = a.picks[row - a.n_win];
                v = pk >= 0 ? a.entries[(int64_t)pk * a.hd + k] : 0.0f;
            } else {
                v = a.entries[(row - a.n_win) * a.hd + k];
            }
            a.pool[at] = v;
            continue;
        }
        const int64_t e = at - n_pool, i = e / a.K, m = e - i * a.K, t = a.P + i;
        int64_t v = -1;
        if (m < a.W) {
            int64_t lo = t - a.W + 1 > 0 ? t - a.W + 1 : 0;
            if (lo + m <= t) v = lo + m - a.base;
        } else if (a.r == 4) {
            if (m - a.W < a.topk) {
                int pk = a.picks[i * a.topk + (m - a.W)];
                if (pk >= 0) v = a.n_win + (a.picked ? i * a.topk + (m - a.W) : pk);
            }
        } else if (a.r > 0) {
            if (m - a.W < (t + 1) / a.r) v = a.n_win + (m - a.W);
        }
        a.idx[e] = v;
    }
}

int dsrtk_attn_gather(int dev, float *pool, int64_t *idx, const float *fresh, const float *window, int64_t window_rows,
                    const float *entries, const int *picks, int64_t base, int64_t P, int64_t S, int64_t n_entries,
                    int64_t hd, int64_t K, int64_t W, int64_t r, int64_t topk, const dsrtk_ring_write *rings, int n_rings,
                    void *stream)
{
    const char *what = "attention.gather";
    if (hd < 1 || window_rows < 1 || base < 0 || base > P || S < 1 || n_entries < 0 || P - base > window_rows ||
        W < 1 || K < W || r < 0 || (r == 4 && (!picks || topk < 1 || K != W + topk)))
        return bad_arg(what, "bad sizes");
    /* the window ring's written slots must hold positions before base: the gather reads the rest */
    if (n_rings > 0 && (!rings || rings[0].ring != window || window_rows < W + S - 1))
        return bad_arg(what, "ring writes beside a gather that reads their slots");
    RingWrites rw;
    int st = ring_writes_of(what, rings, n_rings, P, S, &rw);
    if (st) return st;
    GatherArgs a;
    a.pool = pool, a.idx = idx, a.fresh = fresh, a.window = window, a.entries = entries, a.picks = picks;
    a.window_rows = window_rows, a.base = base, a.P = P, a.S = S, a.n_win = P + S - base, a.n_entries = n_entries;
    a.hd = hd, a.K = K, a.W = W, a.r = r, a.topk = topk, a.picked = dsrtk_attn_pool_picked(S, n_entries, r, topk);
    DSRTK_SET_DEVICE(dev, what);
    int grid = dsrtk_grid_for(dev, dsrtk_attn_pool_rows(a.n_win, S, n_entries, r, topk) * hd + S * K + rw.start[rw.n],
                              DSRTK_BLOCK);
    (void)dsrtk_launch_dependent(gather_kernel, dim3(grid), dim3(DSRTK_BLOCK), 0, (cudaStream_t)stream, a, rw);
    return dsrtk_check_launch(what, dev);
}

/* ---- lightning indexer (attention.c index_select; SPEC §6.6) ---- */

enum { SCORE_BLOCK = 128, INDEX_DIM = 128 };

/* The indexer's arithmetic after the dot products (attention.c's index_select), one definition for
 * the three score kernels below: w' = w·scale, a head's term w'·ReLU(q·K) and the score from the
 * terms' sum, in double with the reference's bf16 roundings when ref. */
__device__ __forceinline__ float index_weight(float w, float scale, int ref)
{
    const float v = __fmul_rn(w, scale);
    return ref ? bf16_round(v) : v;
}
__device__ __forceinline__ double index_term(double dot, float w, int ref)
{
    float dv = ref ? bf16_round((float)dot) : (float)dot;
    dv = dv > 0 ? dv : 0;
    return ref ? (double)bf16_round(__fmul_rn(dv, w)) : __dmul_rn((double)dv, (double)w);
}
__device__ __forceinline__ float index_score(double sum, int ref) { return ref ? bf16_round((float)sum) : (float)sum; }

/* score[i, j] = Σ_h w'[i,h]·ReLU(q[i,h]·K_j) for the visible entries j < (P+i+1) div r of query
 * row i (blockIdx.x), one entry per thread. w' = w·scale (bf16-rounded in reference precision).
 * q_i and w'_i sit in shared memory (IH·(128+1) floats), K_j in the thread's registers.
 * Per query row and visible entry: 128·IH double FMAs, K_j read once (512 bytes). */
__global__ void __launch_bounds__(SCORE_BLOCK) score_kernel(float *scores, const float *q, const float *keys,
                                                            const float *w, float scale, int64_t P, int64_t r, int IH,
                                                            int64_t n_max, int ref)
{
    extern __shared__ float smem[];
    int64_t i = blockIdx.x, visible = (P + i + 1) / r, j = blockIdx.y * (int64_t)SCORE_BLOCK + threadIdx.x;
    if (blockIdx.y * (int64_t)SCORE_BLOCK >= visible) return; /* uniform over the block */
    float *qs = smem, *ws = smem + (int64_t)IH * INDEX_DIM;
    for (int k = threadIdx.x; k < IH * INDEX_DIM; k += SCORE_BLOCK) qs[k] = q[i * IH * INDEX_DIM + k];
    for (int h = threadIdx.x; h < IH; h += SCORE_BLOCK) {
        ws[h] = index_weight(w[i * IH + h], scale, ref);
    }
    __syncthreads();
    if (j >= visible) return;
    float kj[INDEX_DIM];
    const float4 *k4 = (const float4 *)(keys + j * INDEX_DIM);
#pragma unroll
    for (int e = 0; e < INDEX_DIM / 4; e++) {
        float4 v = k4[e];
        kj[4 * e] = v.x, kj[4 * e + 1] = v.y, kj[4 * e + 2] = v.z, kj[4 * e + 3] = v.w;
    }
    double sum = 0;
    for (int h = 0; h < IH; h++) {
        const float *qh = qs + h * INDEX_DIM;
        double dot = 0;
#pragma unroll
        for (int e = 0; e < INDEX_DIM; e++) dot = __fma_rn((double)qh[e], widen(kj[e]), dot); /* exact products */
        sum = __dadd_rn(sum, index_term(dot, ws[h], ref));
    }
    scores[i * n_max + j] = index_score(sum, ref);
}

/* The decode shape (few query rows): score_kernel above gives each visible entry one thread that
 * walks all IH heads serially (Flash, 1 row x 1024 entries: 8 CTAs, 64 x 128 dependent double
 * FMAs per thread). Here a CTA takes SPLIT_ENTRIES entries of one row and its threads take the
 * (entry, head) pairs: each dot product is the same 128 double FMAs in dimension order, its term
 * goes to shared memory, and one thread per entry sums the terms in head order, so the result is
 * bit-equal to score_kernel's (and index_select()'s). q and the keys are widened to double once,
 * in shared memory (rows padded to 129 doubles: the heads of a warp hit distinct banks).
 * Flash decode: 128 CTAs; per CTA q 32 KB (L2) and 8 keys 4 KB; 8 x 64 x 128 double FMAs. */
enum { SPLIT_ENTRIES = 8, SPLIT_THREADS = 256, PADDED_DIM = INDEX_DIM + 1 };

static size_t score_split_smem(int IH)
{
    return sizeof(double) * ((size_t)SPLIT_ENTRIES * IH + (size_t)IH * PADDED_DIM + (size_t)SPLIT_ENTRIES * PADDED_DIM) +
           sizeof(float) * (size_t)IH;
}

__global__ void __launch_bounds__(SPLIT_THREADS) score_split_kernel(float *scores, const float *q, const float *keys,
                                                                    const float *w, float scale, int64_t P, int64_t r,
                                                                    int IH, int64_t n_max, int ref)
{
    dsrtk_wait_producer(); /* launched dependent (common.cuh) */
    extern __shared__ double dsmem[];
    double *terms = dsmem;                                  /* [SPLIT_ENTRIES][IH] */
    double *qs = terms + (size_t)SPLIT_ENTRIES * IH;        /* [IH][PADDED_DIM] */
    double *ks = qs + (size_t)IH * PADDED_DIM;              /* [SPLIT_ENTRIES][PADDED_DIM] */
    float *ws = (float *)(ks + SPLIT_ENTRIES * PADDED_DIM); /* [IH] */
    const int64_t i = blockIdx.x, visible = (P + i + 1) / r, j0 = blockIdx.y * (int64_t)SPLIT_ENTRIES;
    if (j0 >= visible) return; /* uniform over the block */
    const int ne = visible - j0 < SPLIT_ENTRIES ? (int)(visible - j0) : SPLIT_ENTRIES;
    for (int k = threadIdx.x; k < IH * INDEX_DIM; k += SPLIT_THREADS)
        qs[(k / INDEX_DIM) * PADDED_DIM + k % INDEX_DIM] = (double)q[i * IH * INDEX_DIM + k];
    for (int k = threadIdx.x; k < ne * INDEX_DIM; k += SPLIT_THREADS)
        ks[(k / INDEX_DIM) * PADDED_DIM + k % INDEX_DIM] = (double)keys[j0 * INDEX_DIM + k];
    for (int h = threadIdx.x; h < IH; h += SPLIT_THREADS) {
        ws[h] = index_weight(w[i * IH + h], scale, ref);
    }
    __syncthreads();
    /* a thread's pairs two at a time, SPLIT_THREADS apart: two independent chains, and one q load
     * for both where IH divides SPLIT_THREADS (their head is the same): the loop is bound by its
     * shared-memory loads (CUPTI timeline, H200, Flash decode: 10 us a call with one pair a pass) */
    const bool same_head = SPLIT_THREADS % IH == 0;
    for (int pr = threadIdx.x; pr < ne * IH; pr += 2 * SPLIT_THREADS) {
        const bool two = pr + SPLIT_THREADS < ne * IH;
        const int pr2 = two ? pr + SPLIT_THREADS : pr, e = pr / IH, h = pr - e * IH, e2 = pr2 / IH, h2 = pr2 - e2 * IH;
        const double *qh = qs + h * PADDED_DIM, *qh2 = qs + h2 * PADDED_DIM, *kj = ks + e * PADDED_DIM, *kj2 = ks + e2 * PADDED_DIM;
        double dot = 0, dot2 = 0;
#pragma unroll 16
        for (int d = 0; d < INDEX_DIM; d++) { /* exact products, each dot in dimension order */
            const double qd = qh[d];
            dot = __fma_rn(qd, kj[d], dot);
            dot2 = __fma_rn(same_head ? qd : qh2[d], kj2[d], dot2);
        }
        terms[e * IH + h] = index_term(dot, ws[h], ref);
        if (two) terms[e2 * IH + h2] = index_term(dot2, ws[h2], ref);
    }
    __syncthreads();
    if (threadIdx.x < ne) {
        double sum = 0;
        for (int h = 0; h < IH; h++) sum = __dadd_rn(sum, terms[threadIdx.x * IH + h]); /* head order */
        scores[i * n_max + j0 + threadIdx.x] = index_score(sum, ref);
    }
}

/* The prefill shape (many query rows) in fp32 precision, on the FP64 tensor cores (reference
 * precision takes score_hmma_kernel, below): a CTA takes one query row i and
 * DMMA_ENTRIES entries; its 4 warps take 16 heads each and run the row's [IH, 128] · [128, 64]
 * product as DMMA m8n8k4 (double products and sums). Every product of two f32 values is exact in
 * double, and so is every partial sum whose terms span fewer than ~29 binades (the indexer's
 * inputs are FP4 round trips, blocks of 32: 2-bit codes times scales a few binades apart): then
 * the order of the sum cannot change it and the dots are score_kernel's. From there the terms are
 * score_kernel's arithmetic, summed over heads in head order by one thread per entry.
 * q sits in shared memory as f32 (rows padded to 132: a fragment's 8 rows hit distinct banks),
 * the entries as double (padded to 132 doubles likewise); the terms reuse the entries' space.
 * Measured on the H200 (ncu, Flash prefill, 4096 rows x 1024 entries, 64 heads): score_kernel
 * 9.1 ms (two f32 -> f64 conversions a double FMA), this kernel 2.0 ms (~17 TFLOP/s of the FP64
 * tensor cores' ~67). */
enum { DMMA_ENTRIES = 64, DMMA_WARPS = 4, DMMA_HEADS = 64, DMMA_PAD = INDEX_DIM + 4 };

static size_t score_dmma_smem()
{
    return sizeof(float) * ((size_t)DMMA_HEADS * DMMA_PAD + DMMA_HEADS) + sizeof(double) * (size_t)DMMA_ENTRIES * DMMA_PAD;
}

__device__ __forceinline__ void dmma_884(double (&c)[2], double a, double b)
{
    asm volatile("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0, %1}, {%2}, {%3}, {%0, %1};"
                 : "+d"(c[0]), "+d"(c[1])
                 : "d"(a), "d"(b));
}

__global__ void __launch_bounds__(DMMA_WARPS * 32, 2) score_dmma_kernel(float *scores, const float *q, const float *keys,
                                                                        const float *w, float scale, int64_t P, int64_t r,
                                                                        int IH, int64_t n_max, int ref)
{
    extern __shared__ double dmma_smem[];
    double *ks = dmma_smem;                                         /* [DMMA_ENTRIES][DMMA_PAD] */
    float *qs = (float *)(ks + (size_t)DMMA_ENTRIES * DMMA_PAD);    /* [DMMA_HEADS][DMMA_PAD] */
    float *ws = qs + (size_t)DMMA_HEADS * DMMA_PAD;                 /* [DMMA_HEADS] */
    const int64_t i = blockIdx.x, visible = (P + i + 1) / r, j0 = blockIdx.y * (int64_t)DMMA_ENTRIES;
    if (j0 >= visible) return; /* uniform over the block */
    const int ne = visible - j0 < DMMA_ENTRIES ? (int)(visible - j0) : DMMA_ENTRIES;
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5, g = lane >> 2, c = lane & 3;
    for (int k = t; k < IH * INDEX_DIM / 4; k += DMMA_WARPS * 32) {
        const float4 v = ((const float4 *)(q + i * IH * INDEX_DIM))[k];
        float *d = qs + (4 * k / INDEX_DIM) * DMMA_PAD + 4 * k % INDEX_DIM;
        d[0] = v.x, d[1] = v.y, d[2] = v.z, d[3] = v.w;
    }
    for (int k = t; k < DMMA_ENTRIES * INDEX_DIM / 4; k += DMMA_WARPS * 32) {
        const int e = 4 * k / INDEX_DIM, at = 4 * k % INDEX_DIM;
        const float4 v = ((const float4 *)(keys + (j0 + (e < ne ? e : ne - 1)) * INDEX_DIM))[at / 4];
        double *d = ks + e * DMMA_PAD + at;
        d[0] = v.x, d[1] = v.y, d[2] = v.z, d[3] = v.w;
    }
    for (int h = t; h < IH; h += DMMA_WARPS * 32) {
        ws[h] = index_weight(w[i * IH + h], scale, ref);
    }
    __syncthreads();
    /* warp: heads 16·warp .. + 15 (two 8-head tiles, those past IH skipped) x the 64 entries */
    const int h0 = 16 * warp;
    const bool second = h0 + 8 < IH;
    double acc[2][DMMA_ENTRIES / 8][2] = {};
    if (h0 < IH) {
#pragma unroll 4
        for (int k0 = 0; k0 < INDEX_DIM; k0 += 4) {
            const double a0 = qs[(h0 + g) * DMMA_PAD + k0 + c], a1 = second ? qs[(h0 + 8 + g) * DMMA_PAD + k0 + c] : 0.0;
#pragma unroll
            for (int n = 0; n < DMMA_ENTRIES / 8; n++) {
                const double b = ks[(8 * n + g) * DMMA_PAD + k0 + c];
                dmma_884(acc[0][n], a0, b);
                if (second) dmma_884(acc[1][n], a1, b);
            }
        }
    }
    __syncthreads(); /* the entries are consumed: their space takes the terms [entry][head] */
    double *terms = ks;
    if (h0 < IH) {
#pragma unroll
        for (int m = 0; m < 2; m++) {
            const int h = h0 + 8 * m + g;
            if (m == 1 && !second) continue;
#pragma unroll
            for (int n = 0; n < DMMA_ENTRIES / 8; n++) {
#pragma unroll
                for (int u = 0; u < 2; u++) {
                    terms[(8 * n + 2 * c + u) * DMMA_HEADS + h] = index_term(acc[m][n][u], ws[h], ref);
                }
            }
        }
    }
    __syncthreads();
    if (t < ne) {
        double sum = 0;
        for (int h = 0; h < IH; h++) sum = __dadd_rn(sum, terms[t * DMMA_HEADS + h]); /* head order */
        scores[i * n_max + j0 + t] = index_score(sum, ref);
    }
}

/* The prefill shape in reference precision, on the f16 tensor cores. There the indexer's q and keys
 * are FP4 round trips (blocks of 32 along the 128 dimensions, norm.cu's Hadamard + Q4): each value
 * is an e2m1 code (two significant bits) times its block's power of two. Staged divided by a power
 * of two of their block (2^floor(log2 amax)), they are f16 values exactly, and a block's sum of 32
 * products is an exact fp32 sum in the tensor core (multiples of one quantum, below 2^13 of them).
 * Each block's sum times its two powers of two is then exact in double, and the dimension's four
 * block sums add exactly (the binades score_dmma_kernel already relies on): the dots are
 * score_dmma_kernel's, bit for bit, and from there the arithmetic is its (a term is a bf16 value
 * here, so it waits for the head-order sum as a float). A CTA takes HMMA_ROWS query rows and
 * HMMA_ENTRIES entries: the entries are staged once, each row's q in turn; warp w computes the
 * heads 16 (w % 4) .. + 15 of entries 32 (w / 4) .. + 31 (m16n8k16, a block's two k-steps into one
 * accumulator, promoted into double dots); then a thread a (row, entry) sums its heads in order.
 * Per CTA: 4 x 1 MFLOP; 32 KB of f32 keys and 4 x 32 KB of q staged from L2.
 * Measured (CUPTI, H200, Flash prefill of 4096 tokens): score_dmma_kernel 2.05 ms; a row a CTA
 * here 1.32 (ncu: issue slots 45% busy at 4 warps a scheduler, the 64-long head-order sums on two
 * warps of eight, the keys staged again for every row); four rows a CTA 1.06. */
enum { HMMA_ROWS = 4, HMMA_ENTRIES = 64, HMMA_WARPS = 8, HMMA_HEADS = 64, HMMA_BLOCK = 32, HMMA_BLOCKS = INDEX_DIM / HMMA_BLOCK,
       HMMA_PAD = INDEX_DIM + 8, /* halves: a fragment's 8 rows fall in distinct banks */
       HMMA_TERMS_LD = HMMA_HEADS + 1 /* floats: a (row, entry)'s terms, the sums' reads in distinct banks */ };
static_assert(HMMA_ROWS * HMMA_ENTRIES == HMMA_WARPS * 32, "the head-order sums: a thread a (row, entry)");

struct HmmaSmem {
    size_t qs, ks, qsc, ksc, ws, terms, total;
};
__host__ __device__ inline HmmaSmem hmma_smem()
{
    HmmaSmem l;
    l.qs = 0;                                                             /* f16 [HMMA_HEADS][HMMA_PAD] a row's q */
    l.ks = l.qs + sizeof(__half) * HMMA_HEADS * HMMA_PAD;                  /* f16 [HMMA_ENTRIES][HMMA_PAD] */
    l.qsc = l.ks + sizeof(__half) * HMMA_ENTRIES * HMMA_PAD;               /* float [HMMA_HEADS][HMMA_BLOCKS] */
    l.ksc = l.qsc + sizeof(float) * HMMA_HEADS * HMMA_BLOCKS;              /* float [HMMA_ENTRIES][HMMA_BLOCKS] */
    l.ws = l.ksc + sizeof(float) * HMMA_ENTRIES * HMMA_BLOCKS;             /* float [HMMA_ROWS][HMMA_HEADS] w' */
    l.terms = l.ws + sizeof(float) * HMMA_ROWS * HMMA_HEADS;               /* float [HMMA_ROWS][HMMA_ENTRIES][LD] */
    l.total = l.terms + sizeof(float) * HMMA_ROWS * HMMA_ENTRIES * HMMA_TERMS_LD;
    return l;
}

/* A row of INDEX_DIM values of an FP4 round trip (v, 16-byte aligned) staged by one warp, a lane
 * 4 columns (one coalesced 512-byte load): each 32-value block as f16 values v / s at h, with
 * s = 2^floor(log2 of the block's largest magnitude) (1 for a zero block) at sc[block] */
__device__ __forceinline__ void stage_fp4_row(const float *v, __half *h, float *sc, int lane)
{
    const float4 x = ((const float4 *)v)[lane];
    float amax = fmaxf(fmaxf(fabsf(x.x), fabsf(x.y)), fmaxf(fabsf(x.z), fabsf(x.w)));
#pragma unroll
    for (int o = 1; o < HMMA_BLOCK / 4; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    /* s and 1 / s as bits. FP4's scales are 2^-126 or more and its codes 1/2 or more, so a
     * subnormal largest value is 2^-127; a zero block (or inf: the products carry it) takes 1.
     * v / s is then exact in f32 and in f16 */
    const uint32_t biased = dsrt_f32_bits(amax) >> 23; /* amax >= 0 */
    const bool normal = biased > 0 && biased < 255, tiny = biased == 0 && amax > 0.0f;
    const float s = normal ? dsrt_bits_f32(biased << 23) : tiny ? dsrt_bits_f32(0x00400000u) : 1.0f;
    const float inv = normal ? dsrt_bits_f32((254u - biased) << 23) : tiny ? dsrt_bits_f32(254u << 23) : 1.0f;
    const __half2 a = __floats2half2_rn(x.x * inv, x.y * inv), b = __floats2half2_rn(x.z * inv, x.w * inv);
    *(uint2 *)(h + 4 * lane) = make_uint2(*(const uint32_t *)&a, *(const uint32_t *)&b);
    if (lane % (HMMA_BLOCK / 4) == 0) sc[lane / (HMMA_BLOCK / 4)] = s;
}

__global__ void __launch_bounds__(HMMA_WARPS * 32, 2) score_hmma_kernel(float *scores, const float *q, const float *keys,
                                                                     const float *w, float scale, int64_t S, int64_t P,
                                                                     int64_t r, int IH, int64_t n_max)
{
    extern __shared__ uint4 hmma_smem4[];
    const HmmaSmem L = hmma_smem();
    char *base = (char *)hmma_smem4;
    __half *qs = (__half *)(base + L.qs), *ks = (__half *)(base + L.ks);
    float *qsc = (float *)(base + L.qsc), *ksc = (float *)(base + L.ksc), *ws = (float *)(base + L.ws);
    float *terms = (float *)(base + L.terms);
    const int64_t i0 = blockIdx.x * (int64_t)HMMA_ROWS, j0 = blockIdx.y * (int64_t)HMMA_ENTRIES;
    const int rows = S - i0 < HMMA_ROWS ? (int)(S - i0) : HMMA_ROWS;
    auto entries = [&](int row) { /* the row's visible entries in this CTA's block, 0 when none */
        const int64_t n = (P + i0 + row + 1) / r - j0;
        return n <= 0 ? 0 : n < HMMA_ENTRIES ? (int)n : HMMA_ENTRIES;
    };
    const int ne = entries(rows - 1); /* the last row sees the most */
    if (ne == 0) return;              /* uniform over the block */
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5, g = lane >> 2, c = lane & 3;
    /* a warp a row: the entries once, then each query row's heads before its products */
    for (int e = warp; e < HMMA_ENTRIES; e += HMMA_WARPS)
        stage_fp4_row(keys + (j0 + (e < ne ? e : ne - 1)) * INDEX_DIM, ks + e * HMMA_PAD, ksc + e * HMMA_BLOCKS, lane);
    for (int k = t; k < rows * IH; k += HMMA_WARPS * 32)
        ws[k / IH * HMMA_HEADS + k % IH] = index_weight(w[(i0 + k / IH) * IH + k % IH], scale, 1);
    const int h0 = 16 * (warp % 4), e0 = 32 * (warp / 4);
    for (int row = 0; row < rows; row++) {
        if (entries(row) == 0) continue; /* uniform */
        __syncthreads(); /* the previous row's q is consumed */
        for (int h = warp; h < IH; h += HMMA_WARPS)
            stage_fp4_row(q + ((i0 + row) * IH + h) * INDEX_DIM, qs + h * HMMA_PAD, qsc + h * HMMA_BLOCKS, lane);
        __syncthreads();
        if (h0 >= IH) continue; /* uniform over the warp; no barrier until the loop's next pass */
        double dot[4][4] = {};
        const __half *qa = qs + (h0 + g) * HMMA_PAD + 2 * c, *qb = qa + 8 * HMMA_PAD;
#pragma unroll 1 /* unrolled, ptxas hoists the blocks' scales: 146 registers, one CTA a multiprocessor */
        for (int b = 0; b < HMMA_BLOCKS; b++) {
            float acc[4][4] = {};
#pragma unroll
            for (int k0 = b * HMMA_BLOCK; k0 < (b + 1) * HMMA_BLOCK; k0 += 16) {
                const uint32_t a0 = *(const uint32_t *)(qa + k0), a1 = *(const uint32_t *)(qb + k0);
                const uint32_t a2 = *(const uint32_t *)(qa + k0 + 8), a3 = *(const uint32_t *)(qb + k0 + 8);
#pragma unroll
                for (int n = 0; n < 4; n++) {
                    const __half *kb = ks + (e0 + 8 * n + g) * HMMA_PAD + k0 + 2 * c;
                    mma_f16(acc[n], a0, a1, a2, a3, *(const uint32_t *)kb, *(const uint32_t *)(kb + 8));
                }
            }
            const double sa = qsc[(h0 + g) * HMMA_BLOCKS + b], sb = qsc[(h0 + g + 8) * HMMA_BLOCKS + b];
#pragma unroll
            for (int n = 0; n < 4; n++)
#pragma unroll
                for (int u = 0; u < 4; u++) {
                    const double sk = ksc[(e0 + 8 * n + 2 * c + (u & 1)) * HMMA_BLOCKS + b];
                    dot[n][u] = __dadd_rn(dot[n][u], __dmul_rn((double)acc[n][u], __dmul_rn(u < 2 ? sa : sb, sk)));
                }
        }
        float *row_terms = terms + row * HMMA_ENTRIES * HMMA_TERMS_LD;
#pragma unroll
        for (int n = 0; n < 4; n++)
#pragma unroll
            for (int u = 0; u < 4; u++) {
                const int h = h0 + g + 8 * (u >> 1), e = e0 + 8 * n + 2 * c + (u & 1);
                row_terms[e * HMMA_TERMS_LD + h] = (float)index_term(dot[n][u], ws[row * HMMA_HEADS + h], 1); /* a bf16 value */
            }
    }
    __syncthreads();
    const int row = t / HMMA_ENTRIES, e = t % HMMA_ENTRIES;
    if (row < rows && e < entries(row)) {
        const float *mine = terms + (row * HMMA_ENTRIES + e) * HMMA_TERMS_LD;
        double sum = 0;
#pragma unroll 16
        for (int h = 0; h < IH; h++) sum = __dadd_rn(sum, (double)mine[h]); /* head order (IH % 16 == 0) */
        scores[(i0 + row) * n_max + j0 + e] = index_score(sum, 1);
    }
}

int dsrtk_attn_index_scores(int dev, float *scores, const float *q, const float *keys, const float *w, float scale,
                            int64_t S, int64_t P, int64_t r, int IH, int ID, int64_t n_max, int ref, void *stream)
{
    const char *what = "attention.index_scores";
    if (ID != INDEX_DIM) return dsrtk_fail(DSRTK_ERROR, "%s: index_head_dim %d, the kernel is built for %d", what, ID, INDEX_DIM);
    if (S < 1 || P < 0 || r < 1 || IH < 1 || n_max < (P + S) / r || n_max > (int64_t)65535 * SCORE_BLOCK)
        return bad_arg(what, "bad sizes");
    if (n_max == 0) return DSRTK_OK;
    if (((uintptr_t)keys & 15) != 0) return bad_arg(what, "keys must be 16-byte aligned");
    DSRTK_SET_DEVICE(dev, what);
    const int64_t row_blocks = (n_max + SCORE_BLOCK - 1) / SCORE_BLOCK, sms = dsrtk_multiprocessors(dev);
    const bool hmma = ref && IH <= HMMA_HEADS && IH % 16 == 0 && ((uintptr_t)q & 15) == 0 && n_max <= (int64_t)65535 * HMMA_ENTRIES;
    /* the split kernel stages q in every CTA: beyond one wave of them (2 a multiprocessor, decode
     * past ~2000 entries) the f16 tensor cores' CTAs of 64 entries cost less (CUPTI, H200, decode at
     * context 32768, 8192 entries: 31 µs split) */
    const bool split_wave = S * ((n_max + SPLIT_ENTRIES - 1) / SPLIT_ENTRIES) <= 2 * sms;
    if (S * row_blocks < sms && n_max <= (int64_t)65535 * SPLIT_ENTRIES && (split_wave || !hmma)) {
        /* fewer score_kernel CTAs than SMs: spread the heads too */
        size_t ssmem = score_split_smem(IH);
        if (ssmem > 200 * 1024) return dsrtk_fail(DSRTK_ERROR, "%s: %d indexer heads need %zu bytes of shared memory", what, IH, ssmem);
        int st = dsrtk_allow_shared(dev, (const void *)score_split_kernel, ssmem, what);
        if (st) return st;
        dim3 sgrid((unsigned)S, (unsigned)((n_max + SPLIT_ENTRIES - 1) / SPLIT_ENTRIES));
        (void)dsrtk_launch_dependent(score_split_kernel, sgrid, dim3(SPLIT_THREADS), ssmem, (cudaStream_t)stream, scores, q, keys, w,
                                     scale, P, r, IH, n_max, ref);
        return dsrtk_check_launch(what, dev);
    }
    /* each kernel's grid y counts its own entry blocks: the tensor cores' ones, of 64, must fit too */
    if (hmma) {
        const size_t hsmem = hmma_smem().total;
        int st = dsrtk_allow_shared(dev, (const void *)score_hmma_kernel, hsmem, what);
        if (st) return st;
        dim3 hgrid((unsigned)((S + HMMA_ROWS - 1) / HMMA_ROWS), (unsigned)((n_max + HMMA_ENTRIES - 1) / HMMA_ENTRIES));
        score_hmma_kernel<<<hgrid, HMMA_WARPS * 32, hsmem, (cudaStream_t)stream>>>(scores, q, keys, w, scale, S, P, r, IH,
                                                                                   n_max);
        return dsrtk_check_launch(what, dev);
    }
    if (IH <= DMMA_HEADS && IH % 8 == 0 && ((uintptr_t)q & 15) == 0 && n_max <= (int64_t)65535 * DMMA_ENTRIES) {
        const size_t dsmem = score_dmma_smem();
        int st = dsrtk_allow_shared(dev, (const void *)score_dmma_kernel, dsmem, what);
        if (st) return st;
        dim3 dgrid((unsigned)S, (unsigned)((n_max + DMMA_ENTRIES - 1) / DMMA_ENTRIES));
        score_dmma_kernel<<<dgrid, DMMA_WARPS * 32, dsmem, (cudaStream_t)stream>>>(scores, q, keys, w, scale, P, r, IH, n_max, ref);
        return dsrtk_check_launch(what, dev);
    }
    size_t smem = (size_t)IH * (INDEX_DIM + 1) * sizeof(float);
    if (smem > 200 * 1024) return dsrtk_fail(DSRTK_ERROR, "%s: %d indexer heads need %zu bytes of shared memory", what, IH, smem);
    int st = dsrtk_allow_shared(dev, (const void *)score_kernel, smem, what);
    if (st) return st;
    dim3 grid((unsigned)S, (unsigned)((n_max + SCORE_BLOCK - 1) / SCORE_BLOCK));
    score_kernel<<<grid, SCORE_BLOCK, smem, (cudaStream_t)stream>>>(scores, q, keys, w, scale, P, r, IH, n_max, ref);
    return dsrtk_check_launch(what, dev);
}

/* Top-k per query row: keys (descending score, then ascending entry) as one u64, so the CPU's
 * order is the ascending order of unique keys. ±0 compare equal on the CPU, so −0 becomes +0. */
__device__ __forceinline__ uint64_t topk_key(float s, int64_t j)
{
    uint32_t u = s == 0.0f ? 0u : dsrt_f32_bits(s);
    uint32_t ascending = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return (uint64_t)(~ascending) << 32 | (uint64_t)j;
}

enum { TOPK_THREADS = 1024, TOPK_SMEM = 4096, TOPK_STAGE = 8192 };

/* stages (k, jj0), (k, jj0/2), …, (k, 1) of the bitonic network on the key x of index i, jj0 < 32:
 * the partner i ^ jj is in the same warp, so the exchange is a shuffle (the lower index keeps the
 * min where the run ascends, the max where it descends: the compare-exchange of the network) */
__device__ __forceinline__ uint64_t warp_stages(uint64_t x, int i, int k, int jj0)
{
    for (int jj = jj0; jj > 0; jj >>= 1) {
        const uint64_t y = __shfl_xor_sync(0xffffffffu, x, jj);
        const bool lower = (i & jj) == 0, ascending = (i & k) == 0;
        x = lower == ascending ? (x < y ? x : y) : (x < y ? y : x);
    }
    return x;
}

/* Sorts keys[0, n2) ascending, n2 a power of two, 32 <= n2 <= TOPK_SMEM (bitonic network; the
 * block's size a multiple of 32). The stages with jj < 32 run in registers, a 32-key segment per
 * warp, so a sort of 1024 keys takes 21 barriers instead of 55; the others exchange through shared
 * memory, one thread per compare-exchange pair. The same network as before, so the same order. */
__device__ void bitonic_sort(uint64_t *keys, int n2)
{
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int seg = threadIdx.x >> 5; seg < n2 / 32; seg += warps) { /* k = 2 … 32: sort each segment */
        const int i = seg * 32 + lane;
        uint64_t x = keys[i];
        for (int k = 2; k <= 32; k <<= 1) x = warp_stages(x, i, k, k >> 1);
        keys[i] = x;
    }
    __syncthreads();
    for (int k = 64; k <= n2; k <<= 1) {
        for (int jj = k >> 1; jj >= 32; jj >>= 1) {
            for (int pr = threadIdx.x; pr < n2 / 2; pr += blockDim.x) {
                const int i = 2 * pr - (pr & (jj - 1)), partner = i + jj; /* i: pr with a 0 bit inserted at jj */
                const uint64_t a = keys[i], b = keys[partner];
                const bool ascending = (i & k) == 0;
                if ((a > b) == ascending) keys[i] = b, keys[partner] = a;
            }
            __syncthreads();
        }
        for (int seg = threadIdx.x >> 5; seg < n2 / 32; seg += warps) {
            const int i = seg * 32 + lane;
            keys[i] = warp_stages(keys[i], i, k, 16);
        }
        __syncthreads();
    }
}

/* One radix digit's choice by warp 0 (the others idle at the caller's barriers): of the 256 bins of
 * hist, the bin b that holds the `left`-th smallest (1-based) candidate key. Lane l sums bins 8l ..
 * 8l + 7, a warp scan finds the first lane whose running count reaches `left`, that lane walks
 * its bins. Returns b and sets *below to the candidates in bins < b. */
__device__ __forceinline__ int radix_bin(const unsigned *hist, int64_t left, int64_t *below)
{
    const int lane = threadIdx.x & 31;
    unsigned mine[8], sum = 0;
#pragma unroll
    for (int i = 0; i < 8; i++) mine[i] = hist[8 * lane + i], sum += mine[i];
    unsigned run = sum; /* inclusive scan over the lanes */
    for (int o = 1; o < 32; o <<= 1) {
        const unsigned y = __shfl_up_sync(0xffffffffu, run, o);
        if (lane >= o) run += y;
    }
    const unsigned reached = __ballot_sync(0xffffffffu, (int64_t)run >= left);
    const int at = reached ? __ffs(reached) - 1 : 31; /* left never exceeds the candidates */
    int b = 8 * at + 7;
    int64_t before = (int64_t)__shfl_sync(0xffffffffu, run - sum, at);
    if (lane == at) {
        int64_t acc = before;
        for (int i = 0; i < 8; i++) {
            if (acc + mine[i] >= left) {
                b = 8 * at + i;
                break;
            }
            acc += mine[i];
        }
        before = acc;
    }
    b = __shfl_sync(0xffffffffu, b, at);
    *below = __shfl_sync(0xffffffffu, before, at);
    return b;
}

/* Rows with more than RANK_MAX visible entries (topk_rank_kernel below takes the others). One
 * block per query row i: picks[i, m] = the m-th of the k = min(topk, visible) best entries,
 * −1 for m >= k. At most TOPK_SMEM visible entries: all keys sorted in shared memory. More: an
 * 8-bit radix select over the 64-bit keys from the top narrows the candidates, the keys whose
 * digits so far are at most the k-th smallest key's, to at most 2k (eight digits at most: the keys
 * are unique; the sort of up to 4096 candidates this once stopped at was most of the kernel's
 * instructions); those are gathered and sorted, and the k smallest are the picks. A row of up to
 * `staged` (<= TOPK_STAGE) entries is read once, into shared memory, and the passes read it there;
 * a digit's histogram takes a warp's equal bins as one atomic (__match_any_sync), warp 0 picks the
 * bin by a warp scan, and the gather takes a warp's slots with one atomic. The select that read the row from memory each pass, counted each
 * key with its own atomic, ran all eight digits and scanned the bins on one thread took 39 µs at
 * 8192 visible entries (CUPTI, H200, decode at context 32768). */
__global__ void __launch_bounds__(TOPK_THREADS) topk_kernel(int *picks, const float *scores, int64_t P, int64_t r,
                                                            int64_t topk, int64_t n_max, int64_t staged)
{
    dsrtk_wait_producer(); /* launched dependent (common.cuh) */
    extern __shared__ float staged_row[];
    __shared__ uint64_t keys[TOPK_SMEM];
    __shared__ unsigned hist[256];
    __shared__ uint64_t prefix_s;
    __shared__ int64_t remaining_s, candidates_s;
    __shared__ unsigned count_s;
    int64_t i = blockIdx.x, visible = (P + i + 1) / r, k = visible < topk ? visible : topk;
    const float *row = scores + i * n_max;
    int n;
    if (visible <= TOPK_SMEM) {
        n = (int)visible;
        int n2 = 32; /* bitonic_sort's smallest size: the padding keys sort last */
        while (n2 < n) n2 <<= 1;
        for (int j = threadIdx.x; j < n2; j += blockDim.x) keys[j] = j < n ? topk_key(row[j], j) : ~(uint64_t)0;
        __syncthreads();
        bitonic_sort(keys, n2);
    } else {
        /* candidates: keys whose digits above `shift` equal prefix's there; the k-th smallest key
         * is the remaining-th smallest candidate */
        const float *src = row;
        if (visible <= staged) {
#pragma unroll 8
            for (int64_t j = threadIdx.x; j < visible; j += blockDim.x) staged_row[j] = row[j];
            __syncthreads();
            src = staged_row;
        }
        uint64_t prefix = 0, mask = 0;
        int64_t remaining = k;
        int shift = 56;
        /* a digit more costs less than sorting twice the keys: narrow to 2k (at least 256) */
        const int64_t enough = 2 * k >= TOPK_SMEM ? TOPK_SMEM : 2 * k > 256 ? 2 * k : 256;
        for (;; shift -= 8) {
            for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
            __syncthreads();
            for (int64_t j0 = 0; j0 < visible; j0 += blockDim.x) { /* whole warps: __match_any_sync */
                const int64_t j = j0 + threadIdx.x;
                const uint64_t key = j < visible ? topk_key(src[j], j) : 0;
                const bool in = j < visible && (key & mask) == prefix;
                const unsigned bin = in ? (unsigned)(key >> shift) & 255u : 256u;
                const unsigned same = __match_any_sync(0xffffffffu, bin);
                if (in && (threadIdx.x & 31) == __ffs(same) - 1) atomicAdd(&hist[bin], (unsigned)__popc(same));
            }
            __syncthreads();
            if (threadIdx.x < 32) {
                int64_t below;
                const int b = radix_bin(hist, remaining, &below);
                if (threadIdx.x == 0) {
                    prefix_s = prefix | (uint64_t)b << shift;
                    remaining_s = remaining - below;
                    candidates_s = k - (remaining - below) + hist[b]; /* keys with these digits <= the k-th's */
                }
            }
            __syncthreads();
            prefix = prefix_s, remaining = remaining_s;
            mask |= (uint64_t)255 << shift;
            if (candidates_s <= enough || shift == 0) break; /* block-uniform */
        }
        /* the keys whose digits so far are at most the k-th smallest key's: the k smallest and the
         * rest of its bin, at most TOPK_SMEM */
        if (threadIdx.x == 0) count_s = 0;
        __syncthreads();
        const int lane = threadIdx.x & 31;
        for (int64_t j0 = 0; j0 < visible; j0 += blockDim.x) { /* whole warps: the ballot */
            const int64_t j = j0 + threadIdx.x;
            const uint64_t key = j < visible ? topk_key(src[j], j) : 0;
            const bool take = j < visible && (key & mask) <= prefix;
            const unsigned taking = __ballot_sync(0xffffffffu, take);
            unsigned first = 0;
            if (lane == 0 && taking) first = atomicAdd(&count_s, (unsigned)__popc(taking));
            first = __shfl_sync(0xffffffffu, first, 0);
            const unsigned at = first + (unsigned)__popc(taking & ((1u << lane) - 1u));
            if (take && at < TOPK_SMEM) keys[at] = key;
        }
        __syncthreads();
        n = (int)(count_s < (unsigned)TOPK_SMEM ? count_s : (unsigned)TOPK_SMEM);
        int n2 = 32; /* bitonic_sort's smallest size: the padding keys sort last */
        while (n2 < n) n2 <<= 1;
        for (int j = n + threadIdx.x; j < n2; j += blockDim.x) keys[j] = ~(uint64_t)0;
        __syncthreads();
        bitonic_sort(keys, n2);
    }
    for (int64_t m = threadIdx.x; m < topk; m += blockDim.x)
        picks[i * topk + m] = m < k && m < n ? (int)(keys[m] & 0xffffffffu) : -1;
}

/* Up to RANK_MAX visible entries (decode's ~1025 at 4096 tokens): each key's place in the order is
 * the number of keys below it (the keys are unique), so picks[rank] = its entry for rank < k, with
 * no sort at all. Block (row, y) ranks the row's keys y·RANK_I .. +RANK_I, its warps each counting
 * over a slice of all the row's keys (a broadcast read of shared memory a step); blocks run on as
 * many multiprocessors as the row has 32-key slices. The same unique keys in the same ascending
 * order as the sort, so the same picks. 3.8 us where the bitonic sort of 1025 keys on one
 * multiprocessor, a chain of 66 dependent stages, took 16 (ncu, H200, decode at 4096). */
enum { RANK_MAX = 2048, RANK_I = 32, RANK_WARPS = 8 };

__global__ void __launch_bounds__(RANK_WARPS * 32) topk_rank_kernel(int *picks, const float *scores, int64_t P, int64_t r,
                                                                    int64_t topk, int64_t n_max)
{
    dsrtk_wait_producer(); /* launched dependent (common.cuh) */
    __shared__ uint64_t keys[RANK_MAX];
    __shared__ int below_s[RANK_WARPS][RANK_I];
    const int64_t row = blockIdx.x, visible64 = (P + row + 1) / r;
    const int visible = (int)visible64, k = (int)(visible64 < topk ? visible64 : topk), i0 = (int)blockIdx.y * RANK_I;
    int *out = picks + row * topk;
    if (blockIdx.y == 0)
        for (int64_t m = k + threadIdx.x; m < topk; m += blockDim.x) out[m] = -1;
    if (i0 >= visible) return; /* block-uniform */
    const float *s = scores + row * n_max;
    float v[RANK_MAX / (RANK_WARPS * 32)]; /* a thread's scores, loaded together: one round trip */
#pragma unroll
    for (int b = 0; b < RANK_MAX / (RANK_WARPS * 32); b++) {
        const int j = threadIdx.x + b * RANK_WARPS * 32;
        v[b] = j < visible ? s[j] : 0.0f;
    }
#pragma unroll
    for (int b = 0; b < RANK_MAX / (RANK_WARPS * 32); b++) {
        const int j = threadIdx.x + b * RANK_WARPS * 32;
        if (j < visible) keys[j] = topk_key(v[b], j);
    }
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, i = i0 + lane;
    const uint64_t mine = i < visible ? keys[i] : 0;
    const int slice = (visible + RANK_WARPS - 1) / RANK_WARPS, j0 = warp * slice, j1 = j0 + slice < visible ? j0 + slice : visible;
    int below = 0;
#pragma unroll 8
    for (int j = j0; j < j1; j++) below += keys[j] < mine;
    below_s[warp][lane] = below;
    __syncthreads();
    if (warp == 0 && i < visible) {
        int rank = 0;
#pragma unroll
        for (int w = 0; w < RANK_WARPS; w++) rank += below_s[w][lane];
        if (rank < k) out[rank] = i;
    }
}

int dsrtk_attn_topk(int dev, int *picks, const float *scores, int64_t S, int64_t P, int64_t r, int64_t topk, int64_t n_max,
                    void *stream)
{
    const char *what = "attention.topk";
    if (S < 1 || P < 0 || r < 1 || topk < 1 || n_max < (P + S) / r) return bad_arg(what, "bad sizes");
    if (topk > TOPK_SMEM) return dsrtk_fail(DSRTK_ERROR, "%s: index_topk %lld, at most %d on CUDA", what, (long long)topk, TOPK_SMEM);
    if (n_max >= ((int64_t)1 << 31)) return bad_arg(what, "too many entries");
    DSRTK_SET_DEVICE(dev, what);
    const int64_t most_visible = (P + S) / r; /* the last row's */
    if (most_visible <= RANK_MAX) {
        const unsigned slices = most_visible > 0 ? (unsigned)((most_visible + RANK_I - 1) / RANK_I) : 1; /* y = 0 writes the -1s */
        (void)dsrtk_launch_dependent(topk_rank_kernel, dim3((unsigned)S, slices), dim3(RANK_WARPS * 32), 0, (cudaStream_t)stream,
                                     picks, scores, P, r, topk, n_max);
    } else {
        /* rows of up to TOPK_STAGE entries (decode to context 32K) read once into shared memory */
        const int64_t staged = most_visible <= TOPK_STAGE ? most_visible : 0;
        const size_t smem = sizeof(float) * (size_t)staged;
        int st = dsrtk_allow_shared(dev, (const void *)topk_kernel, smem, what);
        if (st) return st;
        (void)dsrtk_launch_dependent(topk_kernel, dim3((unsigned)S), dim3(TOPK_THREADS), smem, (cudaStream_t)stream, picks,
                                     scores, P, r, topk, n_max, staged);
    }
    return dsrtk_check_launch(what, dev);
}
