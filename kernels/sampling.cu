/*
 * sampling.cu - the token sampler of runtime/sampling.h on a CUDA device.
 *
 * What this file protects: the same seed, step and logits give the same ids on the GPU as on the
 * CPU (runtime/sampling.c, sample_row, is the readable reference of everything here), not just
 * the same distribution. So nothing is approximated: p_i is sampling.h's dsrt_sample_exp (the
 * same IEEE operations as the CPU's), every double sum is added in sampling.h's one order (by
 * chunks of candidates, then the chunk totals), and every comparison is the CPU's.
 *
 * Shape of the work, for B rows of V logits (V = 129,280 for DSV4):
 *   1. (rows with penalties) the row's history ids are marked in a byte map [B, V] (zeroed first);
 *      a marked logit is penalized when read. Penalizing is computed from the raw logit, so a
 *      duplicate id in the history marks the same byte again, which is the CPU's "each distinct
 *      id once" without a race.
 *   2. scan: blocks of SCAN_CHUNK logits per row read the row once, coalesced: the first NaN's
 *      id, the first maximum (argmax), and, when some row samples, a 64-bit sort key per logit:
 *      row | descending logit | id. Greedy rows are done here (their id is the argmax).
 *   3. (some row samples) one CUB radix sort of all B*V keys (stable by construction: the id is
 *      in the key): every row's candidates in the CPU's order, descending logit, ties by id.
 *   4. (some row samples) the cumulative sums of the sorted candidates (prefix_chunks_kernel: a
 *      thread a chunk of candidates, its p and running sums in the sort's input keys, free once
 *      sorted, and its total).
 *   5. pick: a block per row combines the scan's partial results (status, greedy id) and, for a
 *      sampling row, chains the chunk totals (prefix_offsets). Every sum the CPU takes is one of
 *      the cumulative sums, so top_p's cut and the draw are searches over them (first_reached).
 *      min_p's cut (the first candidate below min_p * p_max) is a parallel minimum, exact with no
 *      sum involved.
 *
 * Why a full sort rather than a top-p-bounded candidate set: top_p's threshold is top_p times the
 * sum of ALL candidates' p, added in sampling.h's order; another order changes the last bits of
 * that sum, which moves the cut on a rounding tie, so the exact answer needs the candidates in
 * order.
 *
 * Cost (B = 64, V = 129,280): the scan reads 33 MB of logits and writes 66 MB of keys; the sort
 * moves ~16 bytes per key per 8-bit digit over rb + 32 + 17 bits; then every p_i (a software exp
 * each) over the whole device, a chain of 256 dependent double adds a chunk and one of ~500 chunk
 * totals a row. At B = 1, T = 0.7, top_p = 0.9 on the
 * H200: 5.47 ms with three sequential walks over all candidates whose every add waited on a stop
 * test, 1.54 ms with one walk of bare adds (~20 clocks an add) and two searches, 0.31 ms with the
 * chunked sums on the pick's block, 0.22 ms on their own kernel (0.12 ms at top_k = 50: mostly the
 * sort and the scan). Greedy-only calls skip steps 3 and 4: they are one read of the logits.
 *
 * Errors: a row with a NaN or without a finite logit gets a status word beside its id, copied
 * back by the core with the ids (the launcher never synchronises).
 */
#include <cub/device/device_radix_sort.cuh>
#include <limits.h>
#include <math.h>
#include "common.cuh"
#include "sampling.h"

namespace {

enum {
    SCAN_BLOCK = 256,
    SCAN_PER_THREAD = 4, /* a row over ~V / 1024 blocks, a thread's loads in flight at once: a decode
                          * step's greedy draw of V = 129,280 was 7.7 us in 32 blocks of 16 a thread */
    SCAN_CHUNK = SCAN_BLOCK * SCAN_PER_THREAD, /* logits per scan block */
    MARK_BLOCK = 256,
    PICK_BLOCK = 256,
    PREFIX_KEYS = 16 /* sorted keys a thread of prefix_chunks_kernel loads at once: a chunk's lie 2 KB from the next one's */
};

/* one scan block's result for its chunk of a row */
struct ScanPart {
    float best;      /* the largest non-NaN logit (penalized) */
    int32_t best_id; /* its first position */
    int32_t nan_id;  /* the first NaN's position, INT_MAX if none */
};

/* where the pieces of the workspace lie */
struct Layout {
    int nchunks, idb, end_bit;
    size_t part, marks, keys_in, keys_out, temp, temp_bytes, totals, total;
};

__host__ __device__ inline int bits_for(int64_t n) /* bits to write 0 .. n-1 */
{
    int b = 0;
    while (b < 63 && (int64_t(1) << b) < n) b++;
    return b;
}

__device__ __forceinline__ bool row_penalized(const dsrtk_sample_row &p)
{
    return (p.repetition_penalty != 1.0f || p.presence_penalty != 0.0f) && p.hist_end > p.hist_begin;
}

/* sampling.c's penalty, rounded as there (no FMA) */
__device__ __forceinline__ float penalize(float v, const dsrtk_sample_row &p)
{
    v = v > 0.0f ? __fdiv_rn(v, p.repetition_penalty) : __fmul_rn(v, p.repetition_penalty);
    return __fsub_rn(v, p.presence_penalty);
}

/* Keys ascend as logits descend: the float's bits mapped to an order-preserving unsigned (after
 * -0 -> +0, which the CPU's comparison treats as equal), complemented. */
__device__ __forceinline__ uint32_t desc_bits(float v)
{
    if (v == 0.0f) v = 0.0f;
    uint32_t u = __float_as_uint(v);
    uint32_t ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ~ordered;
}
__device__ __forceinline__ float key_value(uint64_t key, int idb)
{
    uint32_t ordered = ~(uint32_t)(key >> idb);
    uint32_t u = (ordered & 0x80000000u) ? (ordered & 0x7fffffffu) : ~ordered;
    return __uint_as_float(u);
}
__device__ __forceinline__ int64_t key_id(uint64_t key, int idb) { return (int64_t)(key & ((1ull << idb) - 1)); }

/* p of a candidate, as sampling.c computes pr[i] */
__device__ __forceinline__ double key_prob(uint64_t key, int idb, double xmax, double inv_t)
{
    return dsrt_sample_exp(__dmul_rn(__dadd_rn((double)key_value(key, idb), -xmax), inv_t));
}

/* (v, i) beats (w, j): larger, or equal and first (the CPU's `x[i] > x[best]` from the left) */
__device__ __forceinline__ bool beats(float v, int32_t i, float w, int32_t j) { return v > w || (v == w && i < j); }

/* a into s: the better (value, id) and the first NaN */
__device__ __forceinline__ void combine(ScanPart &s, const ScanPart &a)
{
    if (beats(a.best, a.best_id, s.best, s.best_id)) s.best = a.best, s.best_id = a.best_id;
    s.nan_id = min(s.nan_id, a.nan_id);
}

/* The block's parts combined, in thread 0 (warps by shuffles, then the warps' results through
 * `scratch`, blockDim.x / 32 of them). (value, id) is a total order and the first NaN a minimum, so
 * any order of combining gives the same part. All threads call it. */
__device__ ScanPart combine_block(ScanPart s, ScanPart *scratch)
{
    for (int o = 16; o > 0; o >>= 1)
        combine(s, ScanPart{__shfl_down_sync(0xffffffffu, s.best, o), __shfl_down_sync(0xffffffffu, s.best_id, o),
                            __shfl_down_sync(0xffffffffu, s.nan_id, o)});
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) scratch[warp] = s;
    __syncthreads();
    if (threadIdx.x == 0)
        for (int w = 1; w < (int)(blockDim.x >> 5); w++) combine(s, scratch[w]);
    return s;
}

/* ---- 1. history marks ---- */

__global__ void __launch_bounds__(MARK_BLOCK) sample_mark_kernel(const dsrtk_sample_row *rows, const int64_t *hist,
                                                                 int64_t V, uint8_t *marks)
{
    const dsrtk_sample_row p = rows[blockIdx.y];
    if (!row_penalized(p)) return;
    uint8_t *m = marks + (int64_t)blockIdx.y * V;
    for (int64_t j = p.hist_begin + (int64_t)blockIdx.x * MARK_BLOCK + threadIdx.x; j < p.hist_end;
         j += (int64_t)gridDim.x * MARK_BLOCK) {
        int64_t id = hist[j];
        if (id >= 0 && id < V) m[id] = 1; /* checked on the host; the bound keeps a bad id harmless */
    }
}

/* ---- 2. scan ---- */

__global__ void __launch_bounds__(SCAN_BLOCK) sample_scan_kernel(const float *logits, int64_t V, int nchunks,
                                                                 const dsrtk_sample_row *rows, const uint8_t *marks,
                                                                 uint64_t *keys, int idb, ScanPart *parts)
{
    /* the row's parameters before the wait (the host wrote them, or a copy before any kernel of
     * the draw), and only for penalties: a pending draw's lie in pinned host memory, and a read
     * from every block across the bus made the scan of V = 129,280 take 13 us */
    const int64_t r = blockIdx.y;
    dsrtk_sample_row p = {};
    if (marks) p = rows[r];
    dsrtk_wait_producer(); /* launched dependent (common.cuh) */
    const bool pen = marks != nullptr && row_penalized(p);
    const float *x = logits + r * V;
    const uint8_t *m = pen ? marks + r * V : nullptr;
    uint64_t *k = keys ? keys + r * V : nullptr;
    const uint64_t row_key = (uint64_t)r << (32 + idb);
    const int64_t begin = (int64_t)blockIdx.x * SCAN_CHUNK, end = min(V, begin + (int64_t)SCAN_CHUNK);

    float best = -INFINITY;
    int32_t best_id = INT_MAX, nan_id = INT_MAX;
#pragma unroll 4
    for (int64_t i = begin + threadIdx.x; i < end; i += SCAN_BLOCK) {
        float v = __ldg(x + i);
        if (pen && m[i]) v = penalize(v, p);
        if (isnan(v)) {
            nan_id = min(nan_id, (int32_t)i);
        } else if (beats(v, (int32_t)i, best, best_id)) {
            best = v;
            best_id = (int32_t)i;
        }
        if (k) k[i] = row_key | (uint64_t)desc_bits(v) << idb | (uint64_t)i;
    }
    __shared__ ScanPart warp_part[SCAN_BLOCK / 32];
    const ScanPart s = combine_block(ScanPart{best, best_id, nan_id}, warp_part);
    if (threadIdx.x == 0) parts[r * nchunks + blockIdx.x] = s;
}

/* ---- 4. pick ---- */

struct PickShared {
    double chunk_before[DSRT_DRAW_MAX_CHUNKS]; /* prefix_offsets' S_b */
    int done;
    unsigned long long cut;
};

/* The cumulative sums of p over the candidates (sampling.h): P(i) = S_b + L_i for the chunk b =
 * i / C of C = dsrt_draw_chunk(V) candidates, L_i its own p summed in order from its first
 * candidate, S_b the chunk totals before it summed in chunk order, as sampling.c takes them. Every
 * sum the CPU takes is one of them: top_p's total, the cumulative sum that finds its cut, the kept
 * prefix's sum, the draw's; so one pass serves them all and the rest are searches.
 * prefix_chunks_kernel gives every chunk of every sampling row a thread, over the whole device: it
 * computes the chunk's p (a software exp each) and stores L_i at pre[i] and the chunk's total at
 * totals; the pick's block then chains the totals into S_b (prefix_offsets). (One sequential
 * double sum over all candidates, the sampler's definition before, took 1.4 ms a row at V =
 * 129,280 on the H200, ~20 clocks a dependent add; the chunks on the pick's one block a row, 0.19
 * ms.) A row the pick will not sum (greedy, a +inf or no finite logit; a NaN row's sums go unused)
 * is skipped; chunks past top_k are not needed. */
enum { CHUNK_THREADS = 32 };
__global__ void __launch_bounds__(CHUNK_THREADS) prefix_chunks_kernel(int64_t V, const dsrtk_sample_row *rows,
                                                                      const uint64_t *sorted, int idb, double *pre_all,
                                                                      double *totals)
{
    const int64_t r = blockIdx.y, c = (int64_t)blockIdx.x * CHUNK_THREADS + threadIdx.x;
    const dsrtk_sample_row p = rows[r];
    if (p.temperature == 0.0f) return;
    const uint64_t *k = sorted + r * V;
    const double xmax = key_value(k[0], idb);
    const int64_t n = p.top_k > 0 && p.top_k < V ? p.top_k : V, C = dsrt_draw_chunk(V), first = c * C;
    if (!(xmax < INFINITY && xmax > -INFINITY) || first >= n) return;
    const double inv_t = 1.0 / (double)p.temperature;
    const int64_t end = min(n, first + C);
    double *pre = pre_all + r * V, L = 0.0;
    for (int64_t i = first; i < end; i += PREFIX_KEYS) { /* the keys in flight together, their p apart from the adds */
        uint64_t key[PREFIX_KEYS];
#pragma unroll
        for (int u = 0; u < PREFIX_KEYS; u++) key[u] = i + u < end ? k[i + u] : 0;
        double v[PREFIX_KEYS];
#pragma unroll
        for (int u = 0; u < PREFIX_KEYS; u++) v[u] = i + u < end ? key_prob(key[u], idb, xmax, inv_t) : 0.0;
#pragma unroll
        for (int u = 0; u < PREFIX_KEYS; u++)
            if (i + u < end) L = __dadd_rn(L, v[u]), pre[i + u] = L;
    }
    totals[r * DSRT_DRAW_MAX_CHUNKS + c] = L;
}

/* S_b of the chunks that hold candidates 0 .. n - 1, into sh.chunk_before: the row's chunk totals
 * loaded by the block, chained by thread 0 in chunk order */
__device__ void prefix_offsets(PickShared &sh, const double *totals, int64_t n, int64_t C)
{
    const int64_t chunks = (n + C - 1) / C;
    for (int64_t c = threadIdx.x; c < chunks; c += PICK_BLOCK) sh.chunk_before[c] = totals[c];
    __syncthreads();
    if (threadIdx.x == 0) {
        double S = 0.0;
        for (int64_t c = 0; c < chunks; c++) {
            const double total = sh.chunk_before[c];
            sh.chunk_before[c] = S;
            S = __dadd_rn(S, total);
        }
    }
    __syncthreads();
}

/* P(i): the chunk's S_b (prefix_offsets) plus its L_i (prefix_chunks_kernel) */
__device__ __forceinline__ double prefix_at(const PickShared &sh, const double *pre, int64_t C, int64_t i)
{
    return __dadd_rn(sh.chunk_before[i / C], pre[i]);
}

/* The first i < n with reached(P(i)) (reached is monotone: false up to some i, true from there;
 * P never decreases), n if none. The block samples PICK_BLOCK evenly spaced points of the range
 * at a time: three rounds for V = 129,280. Every thread must call it. */
template <class Reached>
__device__ int64_t first_reached(const PickShared &sh, const double *pre, int64_t C, int64_t n, Reached reached)
{
    int64_t lo = 0, hi = n; /* the answer lies in [lo, hi]: nothing below lo is reached, hi is (or is n) */
    while (lo < hi) {
        const int64_t step = (hi - lo + PICK_BLOCK - 1) / PICK_BLOCK, i = lo + threadIdx.x * step;
        const int points = (int)((hi - lo + step - 1) / step);
        const int below = __syncthreads_count(i < hi && !reached(prefix_at(sh, pre, C, i)));
        if (below == 0) return lo;
        const int64_t last_below = lo + (int64_t)(below - 1) * step;
        if (below < points) hi = last_below + step;
        lo = last_below + 1;
    }
    return lo;
}

__global__ void __launch_bounds__(PICK_BLOCK) sample_pick_kernel(int64_t B, int64_t V, int nchunks,
                                                                 const dsrtk_sample_row *rows, const ScanPart *parts,
                                                                 const uint64_t *sorted, const double *pre_all,
                                                                 const double *totals, int idb, uint64_t seed,
                                                                 uint64_t step, int64_t *out, int64_t *host_out,
                                                                 float *probs)
{
    __shared__ PickShared sh;
    const int64_t r = blockIdx.x;
    const dsrtk_sample_row p = rows[r]; /* before the wait, as the scan's (it may come across the bus) */
    dsrtk_wait_producer(); /* launched dependent (common.cuh) */
    /* the row's id and status word, to the device and, for a pending draw, to its pinned words */
    auto put = [&](int64_t id, int64_t status) {
        out[r] = id, out[B + r] = status;
        if (host_out) host_out[r] = id, host_out[B + r] = status;
    };
    /* the row's chunks over the block's threads: one round trip, not one per chunk in a thread */
    __shared__ ScanPart warp_part[PICK_BLOCK / 32];
    ScanPart s{-INFINITY, INT_MAX, INT_MAX};
    for (int c = threadIdx.x; c < nchunks; c += PICK_BLOCK) combine(s, parts[r * nchunks + c]);
    s = combine_block(s, warp_part);
    if (threadIdx.x == 0) {
        sh.done = 1;
        if (s.nan_id != INT_MAX) put(s.nan_id, DSRTK_SAMPLE_NAN);
        else if (s.best == -INFINITY) put(0, DSRTK_SAMPLE_NO_FINITE);
        else if (p.temperature == 0.0f || sorted == nullptr) {
            put(s.best_id, DSRTK_SAMPLE_OK);
            if (probs) probs[r * V + s.best_id] = 1.0f; /* greedy: one-hot (the row was zeroed) */
        } else sh.done = 0;
    }
    __syncthreads();
    if (sh.done) return;

    const uint64_t *k = sorted + r * V;
    const int64_t n_all = p.top_k > 0 && p.top_k < V ? p.top_k : V;
    const double xmax = key_value(k[0], idb);
    const float u = dsrt_rand_uniform(seed, step * (uint64_t)B + (uint64_t)r);
    if (xmax == INFINITY) { /* the +inf candidates only, equally likely (a rare case: one thread) */
        if (threadIdx.x == 0) {
            int64_t m = 0;
            while (m < n_all && key_value(k[m], idb) == INFINITY) m++;
            put(key_id(k[(int64_t)((double)u * m)], idb), DSRTK_SAMPLE_OK);
            if (probs)
                for (int64_t i = 0; i < m; i++) probs[r * V + key_id(k[i], idb)] = (float)(1.0 / (double)m);
        }
        return;
    }
    const double inv_t = 1.0 / (double)p.temperature;
    /* min_p: the first candidate from 1 on with p < min_p * p_max, a parallel minimum (no sum) */
    auto min_p_cut = [&](int64_t n) {
        const double floor_p = (double)p.min_p * key_prob(k[0], idb, xmax, inv_t);
        __syncthreads(); /* sh.cut's last readers are done */
        if (threadIdx.x == 0) sh.cut = (unsigned long long)n;
        __syncthreads();
        /* each thread's first is its smallest */
        for (int64_t i = 1 + threadIdx.x; i < n; i += PICK_BLOCK) {
            if ((unsigned long long)i >= sh.cut) break;
            if (key_prob(k[i], idb, xmax, inv_t) < floor_p) {
                atomicMin(&sh.cut, (unsigned long long)i);
                break;
            }
        }
        __syncthreads();
        return (int64_t)sh.cut;
    };
    /* the CPU cuts top_k, then top_p, then min_p; without top_p the sums need only the kept ones */
    int64_t n = n_all;
    if (p.top_p >= 1.0f && p.min_p > 0.0f) n = min_p_cut(n);
    const double *pre = pre_all + r * V;
    const int64_t C = dsrt_draw_chunk(V);
    prefix_offsets(sh, totals + r * DSRT_DRAW_MAX_CHUNKS, n, C);
    if (p.top_p < 1.0f) { /* the CPU's cumulative sum up to the first that reaches top_p of the total */
        const double target = (double)p.top_p * prefix_at(sh, pre, C, n - 1);
        const int64_t at = first_reached(sh, pre, C, n, [&](double cum) { return cum >= target; });
        n = at < n ? at + 1 : n;
        if (p.min_p > 0.0f) n = min_p_cut(n);
    }
    const double z = prefix_at(sh, pre, C, n - 1); /* the kept prefix's sum */

    if (probs) { /* the distribution, not a draw: p_i / z at each kept candidate, as probs_row */
        for (int64_t i = threadIdx.x; i < n; i += PICK_BLOCK)
            probs[r * V + key_id(k[i], idb)] = __double2float_rn(__ddiv_rn(key_prob(k[i], idb, xmax, inv_t), z));
        if (threadIdx.x == 0) put(key_id(k[0], idb), DSRTK_SAMPLE_OK);
        return;
    }

    /* the draw: the first candidate whose cumulative sum passes u * z (u < 1 and P(n - 1) = z, so
     * there is one); where rounding leaves none, the CPU takes the last candidate with p > 0 (the
     * first, p = 1, always has it) */
    const double target = (double)u * z;
    int64_t pick = first_reached(sh, pre, C, n, [&](double cum) { return cum > target; });
    if (pick == n) { /* the same for every thread */
        __syncthreads(); /* sh.cut's last readers are done */
        if (threadIdx.x == 0) sh.cut = 0;
        __syncthreads();
        for (int64_t i = threadIdx.x; i < n; i += PICK_BLOCK)
            if (key_prob(k[i], idb, xmax, inv_t) > 0.0) atomicMax(&sh.cut, (unsigned long long)i);
        __syncthreads();
        pick = (int64_t)sh.cut;
    }
    if (threadIdx.x == 0) {
        put(key_id(k[pick], idb), DSRTK_SAMPLE_OK);
    }
}

size_t align_up(size_t x) { return (x + 255) & ~(size_t)255; }

int plan(int dev, int64_t B, int64_t V, int sorting, int penalties, Layout *L)
{
    if (B < 1 || V < 1) return dsrtk_fail(DSRTK_ERROR, "sample: %lld rows of %lld logits", (long long)B, (long long)V);
    if (B > 65535 || V >= INT_MAX || B * V > INT_MAX)
        return dsrtk_fail(DSRTK_ERROR, "sample: %lld rows of %lld logits are more than the CUDA sampler takes "
                          "(at most 65535 rows, 2^31 logits in all)", (long long)B, (long long)V);
    L->nchunks = (int)((V + SCAN_CHUNK - 1) / SCAN_CHUNK);
    L->idb = bits_for(V) > 0 ? bits_for(V) : 1;
    L->end_bit = bits_for(B) + 32 + L->idb;
    if (L->end_bit > 64)
        return dsrtk_fail(DSRTK_ERROR, "sample: %lld rows of %lld logits do not fit the 64-bit sort keys "
                          "(row and id bits must total <= 32)", (long long)B, (long long)V);
    size_t n = (size_t)(B * V), at = 0;
    L->part = at;
    at = align_up(at + (size_t)B * L->nchunks * sizeof(ScanPart));
    L->marks = at;
    if (penalties) at = align_up(at + n);
    L->keys_in = at;
    L->keys_out = at;
    L->temp = at;
    L->temp_bytes = 0;
    if (sorting) {
        L->keys_out = at = align_up(at + n * sizeof(uint64_t));
        L->temp = at = align_up(at + n * sizeof(uint64_t));
        DSRTK_SET_DEVICE(dev, "sample");
        int st = dsrtk_check(cub::DeviceRadixSort::SortKeys(nullptr, L->temp_bytes, (const uint64_t *)nullptr,
                                                            (uint64_t *)nullptr, (int)n, 0, L->end_bit),
                             "sample: sizing the radix sort of %zu keys on cuda:%d", n, dev);
        if (st) return st;
        at = align_up(at + L->temp_bytes);
        L->totals = at; /* prefix_chunks_kernel's chunk totals, DSRT_DRAW_MAX_CHUNKS a row */
        at = align_up(at + (size_t)B * DSRT_DRAW_MAX_CHUNKS * sizeof(double));
    }
    L->total = at;
    return DSRTK_OK;
}

} // namespace

int dsrtk_sample_workspace(int dev, int64_t B, int64_t V, int sorting, int penalties, size_t *bytes)
{
    Layout L;
    int st = plan(dev, B, V, sorting, penalties, &L);
    if (st) return st;
    *bytes = L.total;
    return DSRTK_OK;
}

namespace {

/* the launches of dsrtk_sample and dsrtk_sample_probs (probs != nullptr) */
int sample_launch(int dev, const float *logits, int64_t B, int64_t V, const dsrtk_sample_row *rows,
                  const int64_t *hist, int64_t max_hist, uint64_t seed, uint64_t step, int sorting, int penalties,
                  void *workspace, size_t workspace_bytes, int64_t *out, int64_t *host_out, float *probs, void *stream)
{
    Layout L;
    int st = plan(dev, B, V, sorting, penalties, &L);
    if (st) return st;
    if (workspace_bytes < L.total || (L.total > 0 && !workspace))
        return dsrtk_fail(DSRTK_ERROR, "sample: the workspace has %zu bytes, %zu needed", workspace_bytes, L.total);
    if (!logits || !rows || !out) return dsrtk_fail(DSRTK_ERROR, "sample: a NULL logits, rows or output pointer");
    DSRTK_SET_DEVICE(dev, "sample");
    cudaStream_t s = (cudaStream_t)stream;
    char *w = (char *)workspace;
    ScanPart *parts = (ScanPart *)(w + L.part);
    uint8_t *marks = nullptr;
    if (penalties && max_hist > 0) {
        marks = (uint8_t *)(w + L.marks);
        st = dsrtk_check(cudaMemsetAsync(marks, 0, (size_t)(B * V), s), "sample: clearing the history marks on cuda:%d", dev);
        if (st) return st;
        int64_t gx = (max_hist + MARK_BLOCK - 1) / MARK_BLOCK;
        dim3 grid((unsigned)(gx < 1024 ? gx : 1024), (unsigned)B);
        sample_mark_kernel<<<grid, MARK_BLOCK, 0, s>>>(rows, hist, V, marks);
        if ((st = dsrtk_check_launch("sample_mark_kernel", dev))) return st;
    }
    uint64_t *keys_in = sorting ? (uint64_t *)(w + L.keys_in) : nullptr;
    uint64_t *keys_out = sorting ? (uint64_t *)(w + L.keys_out) : nullptr;
    /* dependent launches: each starts under the tail of the kernel before it (a decode step's head) */
    (void)dsrtk_launch_dependent(sample_scan_kernel, dim3((unsigned)L.nchunks, (unsigned)B), dim3(SCAN_BLOCK), 0, s, logits,
                                 V, L.nchunks, rows, (const uint8_t *)marks, keys_in, L.idb, parts);
    if ((st = dsrtk_check_launch("sample_scan_kernel", dev))) return st;
    if (sorting) {
        size_t temp_bytes = L.temp_bytes;
        st = dsrtk_check(cub::DeviceRadixSort::SortKeys(w + L.temp, temp_bytes, (const uint64_t *)keys_in, keys_out,
                                                        (int)(B * V), 0, L.end_bit, s),
                         "sample: radix sort of %lld keys on cuda:%d", (long long)(B * V), dev);
        if (st) return st;
    }
    if (probs) {
        st = dsrtk_check(cudaMemsetAsync(probs, 0, (size_t)(B * V) * sizeof(float), s),
                         "sample_probs: clearing the [%lld, %lld] output on cuda:%d", (long long)B, (long long)V, dev);
        if (st) return st;
    }
    /* the sorted keys are in keys_out: keys_in holds the candidates' running sums from here */
    double *totals = sorting ? (double *)(w + L.totals) : nullptr;
    if (sorting) {
        const int64_t chunks = (V + dsrt_draw_chunk(V) - 1) / dsrt_draw_chunk(V);
        prefix_chunks_kernel<<<dim3((unsigned)((chunks + CHUNK_THREADS - 1) / CHUNK_THREADS), (unsigned)B), CHUNK_THREADS, 0,
                               s>>>(V, rows, keys_out, L.idb, (double *)keys_in, totals);
        if ((st = dsrtk_check_launch("prefix_chunks_kernel", dev))) return st;
    }
    (void)dsrtk_launch_dependent(sample_pick_kernel, dim3((unsigned)B), dim3(PICK_BLOCK), 0, s, B, V, L.nchunks, rows,
                                 (const ScanPart *)parts, (const uint64_t *)keys_out, (const double *)keys_in,
                                 (const double *)totals, L.idb, seed, step, out, host_out, probs);
    return dsrtk_check_launch("sample_pick_kernel", dev);
}

} // namespace

int dsrtk_sample(int dev, const float *logits, int64_t B, int64_t V, const dsrtk_sample_row *rows,
                 const int64_t *hist, int64_t max_hist, uint64_t seed, uint64_t step, int sorting, int penalties,
                 void *workspace, size_t workspace_bytes, int64_t *out, int64_t *host_out, void *stream)
{
    return sample_launch(dev, logits, B, V, rows, hist, max_hist, seed, step, sorting, penalties, workspace,
                         workspace_bytes, out, host_out, nullptr, stream);
}

int dsrtk_sample_probs(int dev, const float *logits, int64_t B, int64_t V, const dsrtk_sample_row *rows,
                       const int64_t *hist, int64_t max_hist, int sorting, int penalties, void *workspace,
                       size_t workspace_bytes, float *probs, int64_t *out, void *stream)
{
    if (!probs) return dsrtk_fail(DSRTK_ERROR, "sample_probs: a NULL output pointer");
    return sample_launch(dev, logits, B, V, rows, hist, max_hist, 0, 0, sorting, penalties, workspace,
                         workspace_bytes, out, nullptr, probs, stream);
}

/* ---- speculative verification (runtime/sampling.c dsrt_sample_verify_cpu and draw_weights are the
 * readable reference): one block decides, so the k acceptance tests and the draw stay in order.
 * Thread 0 runs the acceptance tests (k <= 32 reads of p and q). Then the draw of sampling.h's
 * dsrt_draw_weight order: thread c sums chunk c (dsrt_draw_chunk(V) consecutive ids, <= 1024 chunks)
 * in id order, thread 0 adds the chunk sums in order, finds the chunk, walks it. Bytes: one read of
 * a row of p (and q) per pass, 2 × 517 KB at V = 129,280 — a few microseconds from L2, where
 * dsrt_sample_probs just wrote it; the walks are <= 1024 + C dependent double adds on one thread. */

namespace {

enum { VERIFY_BLOCK = DSRT_DRAW_MAX_CHUNKS };

__global__ void __launch_bounds__(VERIFY_BLOCK) sample_verify_kernel(const float *p, const float *q, int64_t k,
                                                                     int64_t V, dsrtk_verify_drafts drafts,
                                                                     uint64_t seed, uint64_t step, int64_t *out)
{
    __shared__ double sums[DSRT_DRAW_MAX_CHUNKS];
    __shared__ int64_t accepted;
    __shared__ int use_p;
    __shared__ double Z;
    if (threadIdx.x == 0) {
        int64_t a = 0;
        for (; a < k; a++) {
            const int64_t d = drafts.id[a];
            const float pd = p[a * V + d], qd = q ? q[a * V + d] : 1.0f;
            const float u = dsrt_rand_uniform(seed, 2 * (step + (uint64_t)a));
            if (!(__dmul_rn((double)u, (double)qd) < (double)pd)) break;
        }
        accepted = a;
        use_p = 0;
    }
    __syncthreads();
    const int64_t a = accepted;
    const float *row = p + a * V;
    const float *qrow = a < k && q ? q + a * V : nullptr;
    const int64_t q_id = a < k && !q ? drafts.id[a] : -1;
    const int64_t C = dsrt_draw_chunk(V), nchunks = (V + C - 1) / C;
    for (int pass = 0; pass < 2; pass++) {
        for (int64_t ch = threadIdx.x; ch < nchunks; ch += VERIFY_BLOCK) {
            double acc = 0.0;
            const int64_t end = min(V, (ch + 1) * C);
            for (int64_t i = ch * C; i < end; i++) acc = __dadd_rn(acc, (double)dsrt_draw_weight(row, qrow, q_id, use_p, i));
            sums[ch] = acc;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            double z = 0.0;
            for (int64_t ch = 0; ch < nchunks; ch++) z = __dadd_rn(z, sums[ch]);
            Z = z;
            if (!(z > 0.0)) use_p = 1;
        }
        __syncthreads();
        if (Z > 0.0) break; /* every thread reads the same Z */
        __syncthreads();    /* everyone has read Z and use_p before the next pass rewrites sums */
    }
    if (threadIdx.x != 0) return;
    const float u = dsrt_rand_uniform(seed, 2 * (step + (uint64_t)a) + 1);
    const double target = __dmul_rn((double)u, Z);
    double cum = 0.0;
    int64_t ch = 0;
    while (ch < nchunks && !(__dadd_rn(cum, sums[ch]) > target)) cum = __dadd_rn(cum, sums[ch++]);
    int64_t lo = 0, hi = V, pick = -1;
    if (ch < nchunks) {
        lo = ch * C;
        hi = min(V, lo + C);
        for (int64_t i = lo; i < hi; i++) {
            cum = __dadd_rn(cum, (double)dsrt_draw_weight(row, qrow, q_id, use_p, i));
            if (cum > target) { pick = i; break; }
        }
    }
    if (pick < 0)
        for (int64_t i = hi - 1; i >= lo; i--)
            if (dsrt_draw_weight(row, qrow, q_id, use_p, i) > 0.0f) { pick = i; break; }
    out[0] = a;
    out[1] = pick < 0 ? 0 : pick;
    out[2] = DSRTK_SAMPLE_OK;
}

} // namespace

int dsrtk_sample_verify(int dev, const float *p, const float *q, int64_t k, int64_t V, dsrtk_verify_drafts drafts,
                        uint64_t seed, uint64_t step, int64_t *out, void *stream)
{
    if (!p || !out) return dsrtk_fail(DSRTK_ERROR, "sample_verify: a NULL p or output pointer");
    if (k < 0 || k > 32 || V < 1)
        return dsrtk_fail(DSRTK_ERROR, "sample_verify: %lld drafts over %lld ids (0 to 32 drafts, V >= 1)", (long long)k,
                          (long long)V);
    if ((V + dsrt_draw_chunk(V) - 1) / dsrt_draw_chunk(V) > DSRT_DRAW_MAX_CHUNKS)
        return dsrtk_fail(DSRTK_ERROR, "sample_verify: %lld ids are more chunks than one block sums", (long long)V);
    DSRTK_SET_DEVICE(dev, "sample_verify");
    sample_verify_kernel<<<1, VERIFY_BLOCK, 0, (cudaStream_t)stream>>>(p, q, k, V, drafts, seed, step, out);
    return dsrtk_check_launch("sample_verify_kernel", dev);
}
