/*
 * sparse_attention.cu - DSV4's sparse attention with the sink (SPEC §3.8) on CUDA: the kernels
 * behind dsrt_nn_sparse_attention (runtime/nn.h) when the stream is a CUDA one.
 *
 * What this file protects: the reference kernel's numerics, which nn.c's attend() writes down and
 * which this file must reproduce. Per query row t and head h, the index list is walked in blocks of
 * ENTRIES = 64 (DSRT_NN_ATTENTION_BLOCK): s_j = fp32(q·kv_j)·scale, running max m, α = e^{m_old−m},
 * p_j = e^{s_j−m}, den = den·α + Σp_j, acc = acc·α + Σ P(p_j)·kv_j with P the bf16 rounding in
 * reference mode; at the end den += e^{sink−m} and o = acc/den. The bf16 rounding of p happens
 * relative to the RUNNING max, so a block's probabilities depend on every block before it; every
 * path below keeps that exactly (the split path computes the running max of every block first).
 * Differences from the CPU: the dot product accumulates in fp32 (the CPU uses double), sums of p
 * run as a warp tree (the CPU: double, in order) and expf is CUDA's (2 ulp): agreement is ~1e-6
 * relative in fp32, a rare bf16 flip of one p in reference mode.
 *
 * All heads of a query row share its index list, so a CTA takes one query row and a group of heads,
 * stages the block's 64 gathered pool rows in shared memory ONCE (cp.async) and uses each row for
 * every head of the group. Four launch shapes:
 *   mma    (many rows, reference precision, q and pool bf16, D a multiple of 64 up to 512: prefill):
 *          one CTA per (row, 32 heads), all blocks in order, both products on the tensor cores
 *          (mma.sync m16n8k16 bf16 -> fp32). q and kv are bf16 already and P(p) is the bf16 value
 *          the reference multiplies with, so the products are exact and only the fp32 summation
 *          order differs from the CPU. The P·V accumulator lives in registers (mma C fragments).
 *          Per block and CTA: 64 rows x D x 2 bytes in (64 KB at D = 512), 2 x 32 x 64 x D x 2 FLOPs
 *          (4.2 MFLOP). Flash prefill S = 4096, H = 64, K = 640: 344 GFLOP, 5.4 GB of gathered rows
 *          (mostly L2 hits: neighbouring rows share window entries). Shared memory, not the tensor
 *          cores, bounds it: with 16 heads a CTA (H200, same S, H, K) it took 5.96 ms, 4.70 once the
 *          gather's index math was 32-bit and the scores ran as independent chains, 3.44 with 32
 *          heads a CTA: each block's rows staged once per 32 heads, each kv fragment serving two
 *          m-tiles (126 registers, 111 KB of shared memory, still two CTAs a multiprocessor).
 *   fused  (many rows otherwise: fp32 precision or f32 inputs): one CTA per (row, 8 heads) on the
 *          CUDA cores (fp32 products, as the fp32 mode needs):
 *            - scores: warp w takes entries 8w..8w+7 for all 8 heads, each lane a 4-column slice of
 *              D, so a lane holds 64 partial dots that one transposing warp reduction finishes;
 *            - softmax step: warp h updates head h's running max, den and rounds its 64 p's;
 *            - P·V: thread c owns column c of all 8 heads, reading kv[e][c] once for 8 FMAs.
 *   split  (few rows: decode, S·groups < one wave): flash-decoding over chunks of CHUNK = 16
 *          entries (4 per block), three kernels, so a Flash decode call (S = 1, H = 64, D = 512,
 *          K = 640) runs 8 x 40 = 320 CTAs instead of 8 x 10. scores_kernel, one CTA per (row,
 *          8 heads, chunk), writes every s_j and each chunk's max (workspace); pv_kernel, one CTA
 *          per (row, 8 heads, chunk), takes the running max M_b of the chunk's block b = the max of
 *          the chunk maxima of blocks 0..b, so its P(e^{s_j − M_b}) are the fused path's exactly,
 *          and writes its partial acc, Σp and M_b; combine_kernel, one CTA per (row, head, 128
 *          columns), sums the chunks with weights e^{M_b − M}, which equals the chain of α's up to
 *          fp32 rounding.
 *          Bytes (Flash decode, f32 pool): the gathered rows, 1.3 MB, read by each of the 8 head
 *          groups in both kernels (L2 after the first), q 128 KB per chunk column, partials
 *          40 x 64 x 512 x 4 = 5.2 MB written and read once. Host side: shared-memory
 *          attributes and device limits are cached, so a call costs three launches and nothing else.
 *   cluster (few rows, a CTA's share of at most two chunks in shared memory, rows of whole 16-byte
 *          pieces: the window and ratio-128 layers' decode): the split path's three kernels as one
 *          launch of clusters that meet at cluster barriers (cluster_kernel says how); the split
 *          path keeps the rest (the ratio-4 layer's 40 chunks, where its 320 CTAs win).
 *
 * The inverse RoPE of the output (SPEC §6.8, dsrt_nn_sparse_attention_inverse_rope) happens where
 * each path stores its output, with rope.cuh's arithmetic on the values as they would be stored
 * (bf16-rounded for a bf16 output): the tensor-core path holds both values of a pair in one
 * thread, the fused path reads the pair's other value from shared memory, combine_kernel gathers
 * the last 64 columns in shared memory for its first warp, a cluster's slices keep pairs whole.
 * So the rotated output has the bits of nn.rope applied to the stored one, and decode pays no
 * launch for it.
 *
 * Index values are data on the device, so a bad one (< −1 or >= N) cannot be reported without a
 * synchronisation: it is never dereferenced, and the outputs of its query row (for the heads of
 * the CTA that saw it) become NaN, which no comparison passes.
 */
#include <math.h>
#include <cooperative_groups.h>
#include "act.cuh"
#include "mma.cuh"
#include "rope.cuh"

namespace {

enum { ENTRIES = 64, HEADS = 8, THREADS = 256, WARPS = THREADS / 32, ENTRIES_PER_WARP = ENTRIES / WARPS };
static_assert(HEADS == WARPS, "the softmax step gives each head of a group one warp");
static_assert(ENTRIES_PER_WARP * HEADS == 64, "the score reduction leaves 2 of 64 values per lane");
static_assert(ENTRIES == 2 * 32, "the softmax step gives each lane two entries");
enum { CHUNK = 16, CHUNKS_PER_BLOCK = ENTRIES / CHUNK }; /* the split path's unit of work */
static_assert(ENTRIES % CHUNK == 0 && CHUNK % WARPS == 0, "a block is whole chunks, a chunk whole warps");
static_assert(CHUNK * HEADS <= THREADS && CHUNK <= 32, "pv_kernel: one thread per (entry, head) of a chunk");

const unsigned FULL = 0xffffffffu;

struct Args {
    const void *q;    /* [S, H, D] f32 or bf16, contiguous */
    const void *pool; /* [N, D] f32 or bf16, contiguous */
    const void *idx;  /* [S, K] i32 or i64, contiguous */
    const void *sink; /* [H] f32 or bf16 */
    void *o;          /* [S, H, D] f32 or bf16 */
    int sink_dtype, idx64, out_bf16, round_p, vec_rows;
    int row4;  /* pool rows can be read 4 elements at a time (load4's alignment) */
    int vec_q; /* q rows can be copied 16 bytes at a time (the mma path's staging) */
    int64_t S, H, D, N, K, D4; /* D4: D rounded up to 4, the row length in shared memory */
    int64_t groups, nb, nc;    /* ceil(H / HEADS) (the mma path: ceil(H / MMA_HEADS)), ceil(K / ENTRIES), ceil(K / CHUNK) */
    float scale;
    /* the inverse RoPE of the output (derotate_pair), when `rope` */
    int rope;
    int64_t rope_first, rope_step; /* query row t is at position rope_first + t·rope_step */
    RopeFreqs freqs;
    /* the split path's workspace */
    float *scores;   /* [S, H, K] */
    float *cmax;     /* [S, nc, H] each chunk's max score, -inf when it has no valid entry */
    float *part_acc; /* [S, nc, H, D] */
    float *part_m;   /* [S, nc, H] the running max M_b of the chunk's block, -inf: no valid entry */
    float *part_sum; /* [S, nc, H] its Σ p (unrounded), NaN after a bad index */
};

/* ---- shared memory (byte offsets, the same on host and device) ---- */

struct Layout {
    size_t q, acc, p, m, den, alpha, row, flag, kv, total;
};
__host__ __device__ inline size_t align16(size_t n) { return (n + 15) & ~(size_t)15; }
__host__ __device__ inline Layout layout_for(int64_t D, int64_t D4, size_t pool_elem)
{
    Layout l;
    l.q = 0;                                              /* float [HEADS][D4], q of the group */
    l.acc = l.q + align16(sizeof(float) * HEADS * D4);    /* float [HEADS][D], the running acc */
    l.p = l.acc + align16(sizeof(float) * HEADS * D);     /* float [ENTRIES][HEADS], s then P(p) */
    l.m = l.p + sizeof(float) * ENTRIES * HEADS;          /* float [HEADS] running max */
    l.den = l.m + align16(sizeof(float) * HEADS);         /* float [HEADS] running denominator */
    l.alpha = l.den + align16(sizeof(float) * HEADS);     /* float [HEADS] this block's α */
    l.row = l.alpha + align16(sizeof(float) * HEADS);     /* long long [ENTRIES] pool row or -1 */
    l.flag = l.row + sizeof(long long) * ENTRIES;         /* int: a bad index was seen */
    l.kv = l.flag + 16;                                   /* pool dtype [ENTRIES][D4] the block's rows */
    l.total = l.kv + align16(pool_elem * ENTRIES * D4);
    return l;
}

struct Shared {
    float *q, *acc, *p, *m, *den, *alpha;
    long long *row;
    int *bad;
    unsigned char *kv;
};
__device__ inline Shared shared_at(unsigned char *base, const Layout &l)
{
    Shared s;
    s.q = (float *)(base + l.q);
    s.acc = (float *)(base + l.acc);
    s.p = (float *)(base + l.p);
    s.m = (float *)(base + l.m);
    s.den = (float *)(base + l.den);
    s.alpha = (float *)(base + l.alpha);
    s.row = (long long *)(base + l.row);
    s.bad = (int *)(base + l.flag);
    s.kv = base + l.kv;
    return s;
}

/* ---- element access (uint16_t is bf16) ---- */

__device__ __forceinline__ float elem(const float *p, int64_t i) { return p[i]; }
__device__ __forceinline__ float elem(const uint16_t *p, int64_t i) { return dsrt_bf16_to_f32(p[i]); }

/* four consecutive elements, p 16-byte (f32) or 8-byte (bf16) aligned */
__device__ __forceinline__ void load4(const float *p, float (&v)[4])
{
    float4 x = *(const float4 *)p;
    v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w;
}
__device__ __forceinline__ void load4(const uint16_t *p, float (&v)[4])
{
    uint2 x = *(const uint2 *)p; /* little endian: element 0 in the low half */
    v[0] = __uint_as_float(x.x << 16), v[1] = __uint_as_float(x.x & 0xffff0000u);
    v[2] = __uint_as_float(x.y << 16), v[3] = __uint_as_float(x.y & 0xffff0000u);
}

/* ---- the pieces of a block step ---- */

/* q of row t, heads g·HEADS.., as f32 rows of D4 (zeros past D and past H) */
template <class TQ>
__device__ void load_q(const Args &a, int64_t t, int64_t g, float *q_s)
{
    const TQ *q = (const TQ *)a.q;
    /* the group's HEADS values of a column loaded together, then stored: one round trip to L2 per
     * column a thread, not per value (decode's scores_kernel waited on 16 in turn); no 64-bit
     * division per element */
    for (int64_t c = threadIdx.x; c < a.D4; c += blockDim.x) {
        float v[HEADS];
#pragma unroll
        for (int h = 0; h < HEADS; h++) {
            const int64_t hh = g * HEADS + h;
            v[h] = hh < a.H && c < a.D ? elem(q, (t * a.H + hh) * a.D + c) : 0.0f;
        }
#pragma unroll
        for (int h = 0; h < HEADS; h++) q_s[h * a.D4 + c] = v[h];
    }
}

/* Block b's indices into s.row (-1 where unused, past K, or bad) and its valid pool rows into
 * kv_s (rows of ld elements; zero_invalid: the rows of invalid entries are zeroed, for the tensor
 * cores, which multiply them by p = 0 and must not meet stale NaN bits).
 * Returns (to every thread) whether any entry is valid; ends with the block synchronised. */
template <class TP>
__device__ int load_block(const Args &a, int64_t t, int64_t b, const Shared &s, TP *kv, int64_t ld, bool zero_invalid)
{
    long long r = -1;
    if (threadIdx.x < ENTRIES) {
        int64_t k = b * ENTRIES + threadIdx.x;
        if (k < a.K) {
            int64_t at = t * a.K + k;
            r = a.idx64 ? ((const long long *)a.idx)[at] : (long long)((const int *)a.idx)[at];
            if (r < -1 || r >= a.N) {
                *s.bad = 1; /* every writer writes 1 */
                r = -1;
            }
        }
        s.row[threadIdx.x] = r;
    }
    int any = __syncthreads_or(r >= 0);
    if (!any) return 0;
    const TP *pool = (const TP *)a.pool;
    /* index math in 32 bits (a block is at most 64 rows of 2 KB in shared memory): a 64-bit
     * division per 16-byte chunk cost more issue slots than the block's mma */
    if (a.vec_rows) { /* rows of a multiple of 16 bytes, 16-byte aligned (ld·sizeof(TP) too) */
        const int chunks = (int)(a.D * (int64_t)sizeof(TP) / 16);
        auto copy = [&](int e, int ch) {
            long long row = s.row[e];
            if (row >= 0) cp_async16((unsigned char *)(kv + e * ld) + 16 * ch, (const unsigned char *)(pool + row * a.D) + 16 * ch);
            else if (zero_invalid) *(uint4 *)((unsigned char *)(kv + e * ld) + 16 * ch) = make_uint4(0, 0, 0, 0);
        };
        if (THREADS % chunks == 0) { /* a thread keeps its chunk column: no division in the loop */
            for (int e = threadIdx.x / chunks; e < ENTRIES; e += THREADS / chunks) copy(e, threadIdx.x % chunks);
        } else {
            for (int i = threadIdx.x; i < ENTRIES * chunks; i += THREADS) copy(i / chunks, i % chunks);
        }
        cp_async_wait_all();
    } else {
        const int width = (int)ld;
        for (int i = threadIdx.x; i < ENTRIES * width; i += THREADS) {
            const int e = i / width, c = i - e * width;
            long long row = s.row[e];
            if (row >= 0) kv[i] = c < a.D ? pool[row * a.D + c] : TP(0);
            else if (zero_invalid) kv[i] = TP(0);
        }
    }
    __syncthreads();
    return 1;
}

/* one step of block_scores' reduction: N values per lane become N/2 (all indices compile-time) */
template <int N>
__device__ __forceinline__ void halve(float (&v)[ENTRIES_PER_WARP * HEADS], int lane, int o)
{
    const bool upper = lane & o;
#pragma unroll
    for (int i = 0; i < N / 2; i++) {
        float send = upper ? v[i] : v[i + N / 2];
        float keep = upper ? v[i + N / 2] : v[i];
        v[i] = keep + __shfl_xor_sync(FULL, send, o);
    }
}

/* s.p[e][h] = fp32(q_h · kv_e) · scale for the block's valid entries, -inf for the others.
 * Warp w: entries 8w..8w+7, all 8 heads; lane l: columns 4l + 128i. Per lane and 4 columns: 8 loads
 * of kv and 8 of q (shared) for 256 FMAs. */
template <class TP>
__device__ void block_scores(const Args &a, const Shared &s)
{
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, e0 = warp * ENTRIES_PER_WARP;
    const TP *kv = (const TP *)s.kv;
    float v[ENTRIES_PER_WARP * HEADS]; /* v[e·HEADS + h] */
#pragma unroll
    for (int i = 0; i < ENTRIES_PER_WARP * HEADS; i++) v[i] = 0.0f;
    for (int64_t c = 4 * lane; c < a.D4; c += 128) {
        float x[ENTRIES_PER_WARP][4];
#pragma unroll
        for (int e = 0; e < ENTRIES_PER_WARP; e++) load4(kv + (e0 + e) * a.D4 + c, x[e]);
#pragma unroll
        for (int h = 0; h < HEADS; h++) {
            float4 qv = *(const float4 *)(s.q + h * a.D4 + c);
#pragma unroll
            for (int e = 0; e < ENTRIES_PER_WARP; e++) {
                float d = v[e * HEADS + h];
                d = fmaf(qv.x, x[e][0], d);
                d = fmaf(qv.y, x[e][1], d);
                d = fmaf(qv.z, x[e][2], d);
                d = fmaf(qv.w, x[e][3], d);
                v[e * HEADS + h] = d;
            }
        }
    }
    /* Transposing reduction: at offset o each lane keeps half of its values (the upper half where
     * lane & o) and adds the partner's copy of that half, so 64 values over 32 lanes take
     * 32 + 16 + 8 + 4 + 2 shuffles and lane l ends with the totals of values 2l and 2l + 1. */
    halve<64>(v, lane, 16);
    halve<32>(v, lane, 8);
    halve<16>(v, lane, 4);
    halve<8>(v, lane, 2);
    halve<4>(v, lane, 1);
#pragma unroll
    for (int i = 0; i < 2; i++) {
        int value = 2 * lane + i, e = e0 + value / HEADS, h = value % HEADS;
        s.p[e * HEADS + h] = s.row[e] >= 0 ? __fmul_rn(v[i], a.scale) : -INFINITY;
    }
}

/* Warp h (all lanes): the block's scores of head h in s.p[e][h] (-inf where invalid) become
 * P(e^{s_e − m_new}) (0 where invalid), m_new = max(m_old, the block's max). Returns m_new and the
 * block's Σ p before rounding (nn.c attend()'s m_new and block_sum). */
__device__ float2 block_softmax(const Shared &s, int h, float m_old, int round_p)
{
    const int lane = threadIdx.x & 31;
    const bool v0 = s.row[lane] >= 0, v1 = s.row[lane + 32] >= 0;
    float s0 = s.p[lane * HEADS + h], s1 = s.p[(lane + 32) * HEADS + h];
    float mx = fmaxf(s0, s1);
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(FULL, mx, o));
    float m_new = fmaxf(m_old, mx);
    float p0 = v0 ? expf(s0 - m_new) : 0.0f, p1 = v1 ? expf(s1 - m_new) : 0.0f;
    float sum = p0 + p1;
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) sum += __shfl_xor_sync(FULL, sum, o);
    s.p[lane * HEADS + h] = round_p ? round_bf16(p0) : p0;
    s.p[(lane + 32) * HEADS + h] = round_p ? round_bf16(p1) : p1;
    return make_float2(m_new, sum);
}

/* acc[h] += p[h]·x for the 8 heads, p an entry's row of P(p) in shared memory (16-byte aligned) */
__device__ __forceinline__ void add_entry(float (&acc)[HEADS], const float *p, float x)
{
    const float4 p0 = *(const float4 *)p, p1 = *(const float4 *)(p + 4);
    acc[0] = fmaf(p0.x, x, acc[0]);
    acc[1] = fmaf(p0.y, x, acc[1]);
    acc[2] = fmaf(p0.z, x, acc[2]);
    acc[3] = fmaf(p0.w, x, acc[3]);
    acc[4] = fmaf(p1.x, x, acc[4]);
    acc[5] = fmaf(p1.y, x, acc[5]);
    acc[6] = fmaf(p1.z, x, acc[6]);
    acc[7] = fmaf(p1.w, x, acc[7]);
}

/* acc[h][c] = acc[h][c]·α_h + Σ_e P(p_e,h)·kv_e[c] over the valid entries in order (attend()'s
 * loop). Thread c owns column c of the 8 heads: one kv load, two broadcast float4 loads of p, 8 FMAs. */
template <class TP>
__device__ void block_pv(const Args &a, const Shared &s)
{
    const TP *kv = (const TP *)s.kv;
    for (int64_t c = threadIdx.x; c < a.D; c += THREADS) {
        float acc[HEADS];
#pragma unroll
        for (int h = 0; h < HEADS; h++) acc[h] = s.acc[h * a.D + c] * s.alpha[h];
        for (int e = 0; e < ENTRIES; e++) {
            if (s.row[e] < 0) continue; /* the same for every thread */
            add_entry(acc, s.p + e * HEADS, elem(kv, e * a.D4 + c));
        }
#pragma unroll
        for (int h = 0; h < HEADS; h++) s.acc[h * a.D + c] = acc[h];
    }
}

__device__ __forceinline__ void store_out(const Args &a, int64_t i, float v)
{
    if (a.out_bf16) ((uint16_t *)a.o)[i] = dsrt_f32_to_bf16(v);
    else ((float *)a.o)[i] = v;
}

__device__ __forceinline__ float sink_of(const Args &a, int64_t h) { return dsrt_load_f32(a.sink, a.sink_dtype, h); }

/* The cos and sin of query row t's 32 RoPE pairs into table[0..32) and table[32..64): one pair a
 * thread for the 32 threads from `first`, as rope_kernel's 32 threads compute them (the caller
 * synchronises before reading). */
__device__ __forceinline__ void rope_table(const Args &a, int64_t t, unsigned first, float *table)
{
    const unsigned i = threadIdx.x - first; /* wraps past 32 below `first` */
    if (a.rope && i < 32) rope_cos_sin(a.rope_first + t * a.rope_step, a.freqs.f[i], table[i], table[32 + i]);
}

/* The inverse RoPE (SPEC §6.8) of the output pair (v0, v1) at columns kept + k, kept + k + 1 of a
 * query row (k even, kept = D − 64; table: rope_table's), as dsrtk_nn_rope would apply it to the
 * stored output: each value as stored (bf16-rounded for a bf16 output), rotated by rope.cuh's
 * arithmetic; store_out then rounds the result as rope_kernel's store does. */
__device__ __forceinline__ void derotate_pair(const Args &a, const float *table, int64_t k, float &v0, float &v1)
{
    if (a.out_bf16) v0 = round_bf16(v0), v1 = round_bf16(v1);
    rope_rotate(v0, v1, table[k >> 1], table[32 + (k >> 1)], 1, v0, v1);
}

/* ---- fused: one CTA per (query row, head group), all blocks in order ---- */

template <class TQ, class TP>
__global__ void __launch_bounds__(THREADS, 1) fused_kernel(const __grid_constant__ Args a, const __grid_constant__ Layout l)
{
    extern __shared__ __align__(16) unsigned char smem[];
    const Shared s = shared_at(smem, l);
    const int64_t t = blockIdx.x / a.groups, g = blockIdx.x % a.groups;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    load_q<TQ>(a, t, g, s.q);
    for (int64_t i = threadIdx.x; i < HEADS * a.D; i += THREADS) s.acc[i] = 0.0f;
    if (threadIdx.x < HEADS) s.m[threadIdx.x] = -INFINITY, s.den[threadIdx.x] = 0.0f;
    if (threadIdx.x == 0) *s.bad = 0;
    __syncthreads();
    for (int64_t b = 0; b < a.nb; b++) {
        if (!load_block<TP>(a, t, b, s, (TP *)s.kv, a.D4, false)) continue; /* attend() skips a block without a valid entry */
        block_scores<TP>(a, s);
        __syncthreads();
        float m_old = s.m[warp];
        float2 r = block_softmax(s, warp, m_old, a.round_p);
        if (lane == 0) {
            float alpha = expf(m_old - r.x); /* 0 for the first block with a valid entry */
            s.alpha[warp] = alpha;
            s.den[warp] = fmaf(s.den[warp], alpha, r.y);
            s.m[warp] = r.x;
        }
        __syncthreads();
        block_pv<TP>(a, s);
        __syncthreads(); /* before the next block's rows and p overwrite these */
    }
    if (threadIdx.x < HEADS && g * HEADS + threadIdx.x < a.H && s.m[threadIdx.x] != -INFINITY)
        s.den[threadIdx.x] += expf(sink_of(a, g * HEADS + threadIdx.x) - s.m[threadIdx.x]); /* the sink */
    rope_table(a, t, 32, s.p); /* s.p is free after the last block; warp 1, beside the sink's warp 0 */
    __syncthreads();
    const int bad = *s.bad;
    const int64_t kept = a.D - 64;
    for (int64_t i = threadIdx.x; i < HEADS * a.D; i += THREADS) {
        int64_t h = i / a.D, c = i - h * a.D, hh = g * HEADS + h;
        if (hh >= a.H) break; /* i only grows */
        float v = bad ? NAN : s.m[h] == -INFINITY ? 0.0f : s.acc[i] / s.den[h];
        if (a.rope && c >= kept) { /* the pair's other value from shared memory: the same expression */
            const int64_t k = c - kept, mate = k & 1 ? i - 1 : i + 1;
            const float w = bad ? NAN : s.m[h] == -INFINITY ? 0.0f : s.acc[mate] / s.den[h];
            float v0 = k & 1 ? w : v, v1 = k & 1 ? v : w;
            derotate_pair(a, s.p, k & ~(int64_t)1, v0, v1);
            v = k & 1 ? v1 : v0;
        }
        store_out(a, (t * a.H + hh) * a.D + c, v);
    }
}

/* ---- split: scores, partial P·V per chunk, combine (three kernels, no tickets) ---- */

/* The split path works on chunks of CHUNK entries (a block of ENTRIES is CHUNKS_PER_BLOCK chunks)
 * so that a decode call spreads over S·groups·nc CTAs (Flash: 8 x 40 = 320) instead of S·groups·nb
 * (8 x 10). The blocked softmax needs, per block b, the running max M_b = max of the scores of
 * blocks 0..b: scores_kernel writes each chunk's max per head, and pv_kernel takes the max over the
 * chunks of blocks 0..b, so P(e^{s − M_b}) are the fused path's values exactly (max is order-free).
 * The per-block sums Σp and partial accumulators are split over the block's chunks, which only
 * changes the fp32 summation order (as the old per-block split did for the α chain). */

/* The dots of EPW pool rows with the 8 heads' q (q_s: [HEADS][D4] f32, shared), by one warp: lane
 * l multiplies columns 4l + 128i in one fp32 chain per (row, head), then a butterfly per (row,
 * head) finishes the sums, so every lane holds every total and lane h returns head h's in d[j].
 * rows[j] null reads zeros; row4: 4 columns a load, else one. The split and cluster paths both
 * score through it: the same bits whether the rows come from global or shared memory. */
template <int EPW, class TP>
__device__ __forceinline__ void dot_rows(const Args &a, const float *q_s, const TP *const (&rows)[EPW], bool row4,
                                         float (&d)[EPW])
{
    const int lane = threadIdx.x & 31;
    float v[EPW][HEADS];
#pragma unroll
    for (int j = 0; j < EPW; j++)
#pragma unroll
        for (int h = 0; h < HEADS; h++) v[j][h] = 0.0f;
#pragma unroll 4
    for (int64_t c = 4 * lane; c < a.D4; c += 128) {
        float x[EPW][4];
#pragma unroll
        for (int j = 0; j < EPW; j++) {
            if (!rows[j]) x[j][0] = x[j][1] = x[j][2] = x[j][3] = 0.0f;
            else if (row4) load4(rows[j] + c, x[j]);
            else {
#pragma unroll
                for (int i = 0; i < 4; i++) x[j][i] = c + i < a.D ? elem(rows[j], c + i) : 0.0f;
            }
        }
#pragma unroll
        for (int h = 0; h < HEADS; h++) {
            float4 qv = *(const float4 *)(q_s + h * a.D4 + c);
#pragma unroll
            for (int j = 0; j < EPW; j++) {
                float s = v[j][h];
                s = fmaf(qv.x, x[j][0], s);
                s = fmaf(qv.y, x[j][1], s);
                s = fmaf(qv.z, x[j][2], s);
                s = fmaf(qv.w, x[j][3], s);
                v[j][h] = s;
            }
        }
    }
#pragma unroll
    for (int j = 0; j < EPW; j++)
#pragma unroll
        for (int h = 0; h < HEADS; h++) {
            float s = v[j][h];
#pragma unroll
            for (int o = 16; o >= 1; o >>= 1) s += __shfl_xor_sync(FULL, s, o);
            if (lane == h) d[j] = s;
        }
}

/* grid (S·groups, nc): s_j = fp32(q·kv_j)·scale of the chunk's entries into a.scores (-inf where
 * the entry is not valid) and the chunk's max per head into a.cmax (-inf without a valid entry).
 * Warp w: entries CHUNK/WARPS·w.., read straight from global memory (coalesced 16-byte slices
 * per lane), dotted with the 8 heads' q in shared memory (dot_rows).
 * Flash decode, f32 pool: per CTA 16 rows x 2 KB + q 16 KB (L2); 8 x 16 x 512 x 2 FLOPs. */
template <class TQ, class TP>
__global__ void __launch_bounds__(THREADS) scores_kernel(const __grid_constant__ Args a)
{
    dsrtk_wait_producer(); /* launched dependent (common.cuh) */
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ float sc_s[CHUNK][HEADS];
    float *q_s = (float *)smem; /* [HEADS][D4] */
    const int64_t t = blockIdx.x / a.groups, g = blockIdx.x % a.groups, ch = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const TP *pool = (const TP *)a.pool;
    enum { EPW = CHUNK / WARPS }; /* entries per warp, dotted together so their loads overlap */
    const int e0 = warp * EPW;
    long long r[EPW]; /* the same in every lane; loaded before q and checked after, so the two
                         round trips overlap */
#pragma unroll
    for (int j = 0; j < EPW; j++) {
        const int64_t k = ch * CHUNK + e0 + j, at = t * a.K + (k < a.K ? k : 0);
        r[j] = k >= a.K ? -1 : a.idx64 ? ((const long long *)a.idx)[at] : (long long)((const int *)a.idx)[at];
    }
    load_q<TQ>(a, t, g, q_s);
#pragma unroll
    for (int j = 0; j < EPW; j++)
        if (r[j] < -1 || r[j] >= a.N) r[j] = -1; /* pv_kernel reports it */
    __syncthreads();
    const TP *rows[EPW];
#pragma unroll
    for (int j = 0; j < EPW; j++) rows[j] = r[j] >= 0 ? pool + r[j] * a.D : nullptr;
    float d[EPW] = {};
    dot_rows<EPW, TP>(a, q_s, rows, a.row4, d);
#pragma unroll
    for (int j = 0; j < EPW; j++)
        if (lane < HEADS) sc_s[e0 + j][lane] = r[j] >= 0 ? __fmul_rn(d[j], a.scale) : -INFINITY;
    __syncthreads();
    for (int i = threadIdx.x; i < CHUNK * HEADS; i += THREADS) {
        const int e = i / HEADS, h = i % HEADS;
        const int64_t hh = g * HEADS + h, k = ch * CHUNK + e;
        if (hh < a.H && k < a.K) a.scores[(t * a.H + hh) * a.K + k] = sc_s[e][h];
    }
    if (threadIdx.x < HEADS && g * HEADS + threadIdx.x < a.H) {
        float mx = -INFINITY;
        for (int e = 0; e < CHUNK; e++) mx = fmaxf(mx, sc_s[e][threadIdx.x]); /* -inf past K */
        a.cmax[(t * a.nc + ch) * a.H + g * HEADS + threadIdx.x] = mx;
    }
}

/* grid (S·groups, nc): chunk ch of block b = ch / CHUNKS_PER_BLOCK: p = e^{s − M_b} (P-rounded in
 * reference mode, block_softmax's values) and its partial Σ_e P(p_e)·kv_e in entry order into
 * a.part_acc, Σ p (unrounded) into a.part_sum and M_b into a.part_m (-inf: no valid entry, skipped
 * by the combine; a bad index: 0 with a NaN sum, so its heads' outputs become NaN).
 * Thread c owns column c of the 8 heads: per entry one kv load (coalesced) and 8 FMAs. */
template <class TP>
__global__ void __launch_bounds__(THREADS) pv_kernel(const __grid_constant__ Args a)
{
    dsrtk_wait_producer(); /* launched dependent (common.cuh) */
    __shared__ float p_s[CHUNK][HEADS], raw_s[CHUNK][HEADS], mb_s[HEADS];
    __shared__ long long row_s[CHUNK];
    __shared__ int bad_s;
    const int64_t t = blockIdx.x / a.groups, g = blockIdx.x % a.groups, ch = blockIdx.y;
    const int64_t b = ch / CHUNKS_PER_BLOCK;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (threadIdx.x == 0) bad_s = 0;
    /* thread (e, h)'s score, loaded before the barriers (scores_kernel wrote every entry below K) */
    const int pe = threadIdx.x / HEADS, ph = threadIdx.x % HEADS;
    const int64_t pk = ch * CHUNK + pe, phh = g * HEADS + ph;
    const float score = threadIdx.x < CHUNK * HEADS && pk < a.K && phh < a.H ? a.scores[(t * a.H + phh) * a.K + pk] : -INFINITY;
    __syncthreads();
    if (threadIdx.x < CHUNK) {
        const int64_t k = ch * CHUNK + threadIdx.x;
        long long r = -1;
        if (k < a.K) {
            int64_t at = t * a.K + k;
            r = a.idx64 ? ((const long long *)a.idx)[at] : (long long)((const int *)a.idx)[at];
            if (r < -1 || r >= a.N) {
                bad_s = 1; /* every writer writes 1 */
                r = -1;
            }
        }
        row_s[threadIdx.x] = r;
    }
    { /* warp h: M_b of head h, the max over the chunks of blocks 0..b */
        const int64_t hh = g * HEADS + warp, last = (b + 1) * CHUNKS_PER_BLOCK < a.nc ? (b + 1) * CHUNKS_PER_BLOCK : a.nc;
        float mb = -INFINITY;
        if (hh < a.H)
            for (int64_t k = lane; k < last; k += 32) mb = fmaxf(mb, a.cmax[(t * a.nc + k) * a.H + hh]);
#pragma unroll
        for (int o = 16; o >= 1; o >>= 1) mb = fmaxf(mb, __shfl_xor_sync(FULL, mb, o));
        if (lane == 0) mb_s[warp] = mb;
    }
    __syncthreads();
    int any = 0;
    for (int e = 0; e < CHUNK; e++) any |= row_s[e] >= 0;
    if (threadIdx.x < CHUNK * HEADS) {
        const bool valid = row_s[pe] >= 0 && phh < a.H;
        const float p = valid ? expf(score - mb_s[ph]) : 0.0f;
        raw_s[pe][ph] = p;
        p_s[pe][ph] = a.round_p ? round_bf16(p) : p;
    }
    __syncthreads();
    const int bad = bad_s;
    const int64_t part = (t * a.nc + ch) * a.H;
    if (threadIdx.x < HEADS && g * HEADS + threadIdx.x < a.H) {
        float sum = 0.0f;
        for (int e = 0; e < CHUNK; e++) sum += raw_s[e][threadIdx.x];
        a.part_m[part + g * HEADS + threadIdx.x] = bad ? 0.0f : any ? mb_s[threadIdx.x] : -INFINITY;
        a.part_sum[part + g * HEADS + threadIdx.x] = bad ? NAN : sum;
    }
    if (!any && !bad) return; /* skipped by the combine: nothing to write */
    const TP *pool = (const TP *)a.pool;
    for (int64_t c = threadIdx.x; c < a.D; c += THREADS) {
        float acc[HEADS];
#pragma unroll
        for (int h = 0; h < HEADS; h++) acc[h] = 0.0f;
        float x[CHUNK]; /* all loads first, so their latencies overlap */
#pragma unroll
        for (int e = 0; e < CHUNK; e++) x[e] = row_s[e] >= 0 ? elem(pool, row_s[e] * a.D + c) : 0.0f;
#pragma unroll
        for (int e = 0; e < CHUNK; e++) {
            if (row_s[e] < 0) continue; /* the same for every thread; attend() skips the entry */
#pragma unroll
            for (int h = 0; h < HEADS; h++) acc[h] = fmaf(p_s[e][h], x[e], acc[h]);
        }
#pragma unroll
        for (int h = 0; h < HEADS; h++)
            if (g * HEADS + h < a.H) a.part_acc[(part + g * HEADS + h) * a.D + c] = acc[h];
    }
}

/* grid (S·H, slices of COMBINE_COLS columns): o = Σ_ch w_ch·acc_ch / (Σ_ch w_ch·sum_ch + e^{sink − M}),
 * w_ch = e^{M_ch − M}, M the max of the M_ch (the last running max), chunks with M_ch = -inf skipped;
 * 0 when nothing was valid. With a.rope the last 64 columns meet in shared memory and the first warp
 * de-rotates their pairs (derotate_pair, a pair a thread, each with its own cos and sin), so
 * decode's inverse RoPE costs no launch of its own.
 * The sums run in chunk order, one thread a column (and one for the denominator), as a plain loop
 * would; what is parallel is everything they wait on. A thread's partials do not depend on the
 * weights (a skipped chunk's are loaded and never used), so its first COMBINE_LOADS of them are in
 * flight with the chunks' M and Σp: one memory round trip where there were three, then one more
 * per COMBINE_LOADS chunks. Slices end at the row's end, so the last one holds the 64 rotated
 * columns whole. Each slice computes the weights and the denominator itself, the same operations
 * in the same order, so the same bits in every slice.
 * ncu (H200, Flash decode, 40 chunks): 15.8 us with a CTA a head, each thread two columns and 8
 * chunks' loads at a time, before this layout. Flash decode: 40 chunks x 2 KB of partials a
 * (row, head), 64 x 4 CTAs. */
enum { COMBINE_COLS = 128, COMBINE_LOADS = 32 };
__global__ void __launch_bounds__(COMBINE_COLS) combine_kernel(const __grid_constant__ Args a)
{
    dsrtk_wait_producer(); /* launched dependent (common.cuh) */
    extern __shared__ float w_s[]; /* [nc] the chunks' weights, -inf where skipped, then [nc] their Σp */
    float *sum_s = w_s + a.nc;
    __shared__ float M_s, den_s, rot[64], table[64];
    const int64_t t = blockIdx.x / a.H, hh = blockIdx.x % a.H;
    const int64_t c = a.D - (int64_t)(gridDim.y - blockIdx.y) * COMBINE_COLS + threadIdx.x; /* < 0: before the row */
    const float *pm = a.part_m + t * a.nc * a.H + hh, *ps = a.part_sum + t * a.nc * a.H + hh;
    const float *part = a.part_acc + (t * a.nc * a.H + hh) * a.D + (c >= 0 ? c : 0); /* chunk k's at k·H·D */
    const int64_t chunk_step = a.H * a.D;
    float v[COMBINE_LOADS];
    auto load_batch = [&](int64_t k0) { /* column c's partials of chunks k0 .. k0 + COMBINE_LOADS - 1 */
#pragma unroll
        for (int j = 0; j < COMBINE_LOADS; j++) v[j] = k0 + j < a.nc ? part[(k0 + j) * chunk_step] : 0.0f;
    };
    load_batch(0); /* with the weights' inputs: the partials do not depend on them */
    for (int64_t k = threadIdx.x; k < a.nc; k += blockDim.x) w_s[k] = pm[k * a.H], sum_s[k] = ps[k * a.H];
    __syncthreads();
    if (threadIdx.x < 32) {
        float M = -INFINITY;
        for (int64_t k = threadIdx.x; k < a.nc; k += 32) M = fmaxf(M, w_s[k]);
#pragma unroll
        for (int o = 16; o >= 1; o >>= 1) M = fmaxf(M, __shfl_xor_sync(FULL, M, o));
        if (threadIdx.x == 0) M_s = M;
    }
    __syncthreads();
    const float M = M_s;
    for (int64_t k = threadIdx.x; k < a.nc; k += blockDim.x) w_s[k] = w_s[k] != -INFINITY ? expf(w_s[k] - M) : -INFINITY;
    __syncthreads();
    if (threadIdx.x == 0) {
        float den = 0.0f;
        for (int64_t k = 0; k < a.nc; k++)
            if (w_s[k] != -INFINITY) den = fmaf(w_s[k], sum_s[k], den);
        den_s = den + expf(sink_of(a, hh) - M);
    }
    rope_table(a, t, 32, table); /* warp 1, beside the denominator's thread */
    __syncthreads();
    float acc = 0.0f;
    for (int64_t k0 = 0; k0 < a.nc; k0 += COMBINE_LOADS) {
        if (k0 > 0) load_batch(k0);
#pragma unroll
        for (int j = 0; j < COMBINE_LOADS; j++)
            if (k0 + j < a.nc && w_s[k0 + j] != -INFINITY) acc = fmaf(w_s[k0 + j], v[j], acc);
    }
    const float o = M == -INFINITY ? 0.0f : acc / den_s;
    if (a.rope && c >= a.D - 64) rot[c - (a.D - 64)] = o;
    else if (c >= 0) store_out(a, (t * a.H + hh) * a.D + c, o);
    if (!a.rope || blockIdx.y != gridDim.y - 1) return; /* uniform over the block */
    __syncthreads();
    if (threadIdx.x < 32) {
        const int64_t at = (t * a.H + hh) * a.D + a.D - 64 + 2 * threadIdx.x;
        float v0 = rot[2 * threadIdx.x], v1 = rot[2 * threadIdx.x + 1];
        derotate_pair(a, table, 2 * threadIdx.x, v0, v1);
        store_out(a, at, v0);
        store_out(a, at + 1, v1);
    }
}

/* ---- cluster: the split path in one launch (few rows: decode) ---- */

/* A cluster of CL = min(nc, 8) CTAs per (query row, 8 heads); CTA r of it takes the chunks
 * [c(r), c(r + 1)), c(r) = r·nc / CL, and the split path's three kernels become three phases that
 * meet at cluster barriers, each CTA sending what the others need into their shared memory
 * (distributed shared memory: stores, never remote loads to wait on):
 *   1. the CTA's pool rows and q come in by bulk copies (one a row), are scored by dot_rows (the
 *      split path's bits), and each chunk's max goes to every CTA;
 *   2. warp h takes, for each block the CTA's chunks fall in, the running max M_b over the chunks
 *      of blocks 0..b, rounds its P(e^{s − M_b}) (the fused path's values exactly) and chains Σp
 *      with attend()'s α = e^{M_{b−1} − M_b}; the partial acc (at the scale of the CTA's last
 *      block) goes column by column to the CTA whose slice of the columns holds it;
 *   3. CTA r weighs what it received with w = e^{M_last − M} (M the row's max), as combine_kernel
 *      weighs its chunks, adds the sink, divides, de-rotates and stores its slice.
 * Against the split path: no workspace, no partials through HBM, two launches fewer; only the fp32
 * summation order of Σp and acc differs. A CTA reads no other's memory after the last barrier,
 * so each leaves when done. H200, Flash decode (64 heads of 512, f32 pool), CUPTI timeline inside
 * a step: the window layer's K = 128 15.3 us in three kernels -> 10.7-11.3, K = 160 15.6 -> 14.3-15.1. */
enum { CLUSTER_MAX = 8 }; /* CTAs a cluster: a portable size */
enum { CLUSTER_THREADS = 512, CLUSTER_WARPS = CLUSTER_THREADS / 32 };
/* chunks a CTA at most: past two the split path's spread over nc CTAs is faster (H200, K = 640:
 * 25 us in clusters of 8 CTAs of 5 chunks, 21 us split) */
enum { CLUSTER_CHUNKS = 2 };

struct ClusterLayout {
    size_t q, kv, sc, raw, row, cmax, red, total;
    int cpc, slice; /* chunks a CTA at most, its columns in phase 3 */
};
/* what the CTAs send each other (by chunk, at most CLUSTER_MAX·CLUSTER_CHUNKS of them) and the bulk
 * copies' mbarrier */
struct ClusterRed {
    uint64_t bar;
    float part_m[CLUSTER_MAX * CLUSTER_CHUNKS][HEADS];   /* the chunk's M_b, -inf: no valid entry */
    float part_sum[CLUSTER_MAX * CLUSTER_CHUNKS][HEADS]; /* its Σp */
    float w[HEADS][CLUSTER_MAX * CLUSTER_CHUNKS];        /* phase 3: its weight, -inf: skipped */
    int bad[CLUSTER_MAX];                                /* a bad index among a CTA's entries */
    float table[64];                                     /* the inverse RoPE's cos and sin (rope_table) */
};
__host__ __device__ inline ClusterLayout cluster_layout_for(int64_t D, int64_t D4, size_t pool_elem, int64_t nc, int cl)
{
    ClusterLayout l;
    l.cpc = (int)((nc + cl - 1) / cl);
    l.slice = (int)(((D + cl - 1) / cl + 1) & ~(int64_t)1); /* even: a RoPE pair stays in one slice */
    const int64_t E = (int64_t)l.cpc * CHUNK, q = (int64_t)HEADS * D4, recv = nc * HEADS * l.slice;
    l.q = 0;                                                  /* float [HEADS][D4] q of the group, then */
    l.kv = l.q + align16(sizeof(float) * (q > recv ? q : recv)); /* [nc][HEADS][slice] the partials sent here; */
    l.sc = l.kv + align16(pool_elem * E * D);                 /* pool dtype [E][D] the rows; float [E][HEADS] */
    l.raw = l.sc + sizeof(float) * E * HEADS;                 /* scores, then P(p); float [E][HEADS] p; */
    l.row = l.raw + sizeof(float) * E * HEADS;                /* long long [E] pool row or -1; */
    l.cmax = l.row + sizeof(long long) * E;                   /* float [nc][HEADS] every chunk's max */
    l.red = l.cmax + align16(sizeof(float) * nc * HEADS);
    l.total = l.red + align16(sizeof(ClusterRed));
    return l;
}
__host__ __device__ inline int cluster_chunk(int r, int nc, int cl) { return r * nc / cl; }

/* ---- cluster_kernel's bulk copies (the tensor memory accelerator's 1-D copies, completion
 * counted in bytes on an mbarrier in shared memory) and split cluster barrier ---- */
__device__ __forceinline__ unsigned shared_at(const void *p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(uint64_t *bar)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n"
                 "fence.mbarrier_init.release.cluster;\n" ::"r"(shared_at(bar)) : "memory");
}
/* the one arrival, announcing `bytes` to come */
__device__ __forceinline__ void mbar_expect(uint64_t *bar, unsigned bytes)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(shared_at(bar)), "r"(bytes) : "memory");
}
/* bytes (a multiple of 16, both ends 16-byte aligned) from global to this CTA's shared memory */
__device__ __forceinline__ void bulk_copy(void *to, const void *from, unsigned bytes, uint64_t *bar)
{
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                 ::"r"(shared_at(to)), "l"(from), "r"(bytes), "r"(shared_at(bar)) : "memory");
}
/* the cluster barrier in two halves, with no memory ordering (cluster.sync() orders) */
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_wait(uint64_t *bar)
{
    asm volatile("{\n .reg .pred done;\n"
                 "wait_%=:\n mbarrier.try_wait.parity.shared::cta.b64 done, [%0], 0;\n @!done bra wait_%=;\n}\n"
                 ::"r"(shared_at(bar)) : "memory");
}

template <class TQ, class TP>
__global__ void __launch_bounds__(CLUSTER_THREADS, 1) cluster_kernel(const __grid_constant__ Args a,
                                                                    const __grid_constant__ ClusterLayout l)
{
    static_assert(CLUSTER_WARPS >= HEADS, "phases 2 and 3 give each head a warp");
    cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
    extern __shared__ __align__(16) unsigned char smem[];
    float *q_s = (float *)(smem + l.q), *recv = q_s, *sc = (float *)(smem + l.sc); /* recv: once q is used */
    float *cmax = (float *)(smem + l.cmax), *raw = (float *)(smem + l.raw);
    TP *kv = (TP *)(smem + l.kv);
    long long *row = (long long *)(smem + l.row);
    ClusterRed *red = (ClusterRed *)(smem + l.red);
    /* 32-bit index math: rows·groups < the multiprocessors, nc < 65536, a CTA's rows fit its shared
     * memory (64-bit divisions were a tenth of the kernel's instructions) */
    const int cl = (int)cluster.num_blocks(), rank = (int)cluster.block_rank(), nc = (int)a.nc, D = (int)a.D;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int unit = (int)blockIdx.x / cl, t = unit / (int)a.groups, g = unit - t * (int)a.groups;
    const int c0 = cluster_chunk(rank, nc, cl), c1 = cluster_chunk(rank + 1, nc, cl);
    const int e0 = c0 * CHUNK, E = (c1 * CHUNK < a.K ? c1 * CHUNK : (int)a.K) - e0; /* <= CLUSTER_THREADS */
    const int heads = (int)(a.H - g * HEADS < HEADS ? a.H - g * HEADS : HEADS);
    const bool bulk_q = sizeof(TQ) == 4 && a.vec_q; /* f32 q rows of whole 16-byte pieces: one copy */
    if (tid == 0) mbar_init(&red->bar);
    cluster_arrive(); /* this CTA has started: the others may send to it once they wait below */
    dsrtk_wait_producer(); /* launched dependent (common.cuh) */

    /* 1. the indices (a thread an entry), then q and the valid entries' rows by bulk copies (no
     * step reads an invalid entry's row); scores and chunk maxima */
    long long r = -1;
    int bad = 0;
    if (tid < E) {
        const int64_t at = (int64_t)t * a.K + e0 + tid;
        r = a.idx64 ? ((const long long *)a.idx)[at] : (long long)((const int *)a.idx)[at];
        if (r < -1 || r >= a.N) bad = 1, r = -1;
        row[tid] = r;
    }
    if (!bulk_q) load_q<TQ>(a, t, g, q_s);
    bad = __syncthreads_or(bad);
    const int valid = __syncthreads_count(r >= 0);
    const unsigned row_bytes = (unsigned)(D * sizeof(TP)), q_bytes = bulk_q ? (unsigned)(heads * D * 4) : 0u;
    if (warp == 0) {
        if (lane == 0) {
            mbar_expect(&red->bar, q_bytes + valid * row_bytes);
            if (bulk_q) bulk_copy(q_s, (const float *)a.q + ((int64_t)t * a.H + g * HEADS) * a.D, q_bytes, &red->bar);
        }
        __syncwarp();
        for (int e = lane; e < E; e += 32)
            if (row[e] >= 0) bulk_copy(kv + e * D, (const TP *)a.pool + row[e] * a.D, row_bytes, &red->bar);
    }
    if (bulk_q) /* the rows of heads past H */
        for (int i = heads * D / 4 + tid; i < HEADS * D / 4; i += CLUSTER_THREADS)
            ((float4 *)q_s)[i] = make_float4(0, 0, 0, 0);
    rope_table(a, t, 32, red->table); /* warp 1, while the copies fly */
    mbar_wait(&red->bar);
    __syncthreads();
    for (int e = warp; e < E; e += CLUSTER_WARPS) { /* a warp an entry, as dot_rows sums it */
        const TP *rows[1] = {row[e] >= 0 ? kv + e * D : nullptr};
        float d[1] = {};
        dot_rows<1, TP>(a, q_s, rows, true, d);
        if (lane < HEADS) sc[e * HEADS + lane] = rows[0] ? __fmul_rn(d[0], a.scale) : -INFINITY;
    }
    __syncthreads();
    cluster_wait(); /* every CTA has started */
    if (tid < (c1 - c0) * HEADS) { /* sent to every CTA of the cluster */
        const int j = tid / HEADS, h = tid % HEADS;
        float mx = -INFINITY;
        for (int e = j * CHUNK; e < (j + 1) * CHUNK && e < E; e++) mx = fmaxf(mx, sc[e * HEADS + h]);
        for (int q = 0; q < cl; q++) cluster.map_shared_rank(cmax, q)[c0 * HEADS + tid] = mx;
    }
    if (tid < cl) cluster.map_shared_rank(red, tid)->bad[rank] = bad;
    cluster.sync(); /* what was sent is there */

    /* 2. per chunk, as pv_kernel: warp h takes head h's M_b (the max of the chunk maxima of blocks
     * 0..b), its p (P-rounded), Σp in entry order; then thread c the chunk's Σ P(p)·kv[c] from 0 in
     * entry order. Each chunk's M_b and Σp go to every CTA, its partials to the CTA whose slice of
     * the columns holds them. */
    if (warp < HEADS) {
        for (int j = 0; j < c1 - c0; j++) {
            const int k0 = c0 + j, block_end = (k0 / CHUNKS_PER_BLOCK + 1) * CHUNKS_PER_BLOCK;
            const int last = block_end < nc ? block_end : nc;
            float m = -INFINITY;
            for (int k = lane; k < last; k += 32) m = fmaxf(m, cmax[k * HEADS + warp]);
#pragma unroll
            for (int o = 16; o >= 1; o >>= 1) m = fmaxf(m, __shfl_xor_sync(FULL, m, o));
            const int e = j * CHUNK + lane;
            const bool in = lane < CHUNK && e < E, valid = in && row[e] >= 0;
            if (in) {
                const float p = valid ? expf(sc[e * HEADS + warp] - m) : 0.0f;
                raw[e * HEADS + warp] = p;
                sc[e * HEADS + warp] = a.round_p ? round_bf16(p) : p;
            }
            const bool any = __any_sync(FULL, valid);
            __syncwarp();
            if (lane < cl) {
                float sum = 0.0f;
                for (int i = j * CHUNK; i < (j + 1) * CHUNK && i < E; i++) sum += raw[i * HEADS + warp];
                ClusterRed *theirs = cluster.map_shared_rank(red, lane);
                theirs->part_m[k0][warp] = any ? m : -INFINITY, theirs->part_sum[k0][warp] = sum;
            }
        }
    }
    __syncthreads();
    for (int c = tid; c < D; c += CLUSTER_THREADS) {
        const int owner = c / l.slice; /* the CTA whose slice holds column c gets the partials */
        float *theirs = cluster.map_shared_rank(recv, owner) + c - owner * l.slice;
        for (int j = 0; j < c1 - c0; j++) {
            float acc[HEADS];
#pragma unroll
            for (int h = 0; h < HEADS; h++) acc[h] = 0.0f;
            for (int e = j * CHUNK; e < (j + 1) * CHUNK && e < E; e++) {
                if (row[e] < 0) continue; /* the same for every thread; attend() skips the entry */
                add_entry(acc, sc + e * HEADS, elem(kv, e * D + c));
            }
#pragma unroll
            for (int h = 0; h < HEADS; h++) theirs[((c0 + j) * HEADS + h) * l.slice] = acc[h];
        }
    }
    cluster.sync(); /* every partial sent is here; no CTA reads another's memory after this */

    /* 3. warp h, head h: this CTA's slice of the columns, a pair a lane, as combine_kernel: the
     * chunks' weights w = e^{M_b − M} (M the row's max, chunks without a valid entry skipped), the
     * denominator in chunk order plus the sink, the partials' weighted sum in chunk order, the
     * division, the inverse RoPE, the stores. So the bits of the split path, whatever the CTAs. */
    const int s0 = rank * l.slice, s1 = s0 + l.slice < D ? s0 + l.slice : D, pairs = s1 > s0 ? (s1 - s0 + 1) / 2 : 0;
    if (warp < heads) {
        const int h = warp;
        const int64_t hh = g * HEADS + h;
        float M = -INFINITY, den = 0.0f;
        bool bad_row = false;
        for (int k = 0; k < nc; k++) M = fmaxf(M, red->part_m[k][h]);
        for (int q = 0; q < cl; q++) bad_row |= red->bad[q] != 0;
        float *w = red->w[h];
        if (lane < nc) w[lane] = red->part_m[lane][h] != -INFINITY ? expf(red->part_m[lane][h] - M) : -INFINITY;
        __syncwarp();
        for (int k = 0; k < nc; k++)
            if (w[k] != -INFINITY) den = fmaf(w[k], red->part_sum[k][h], den);
        den += expf(sink_of(a, hh) - M);
        for (int p = lane; p < pairs; p += 32) {
            const int c = s0 + 2 * p;
            float v0 = 0.0f, v1 = 0.0f;
            for (int k = 0; k < nc; k++) {
                const float *sent = recv + (k * HEADS + h) * l.slice + 2 * p;
                if (w[k] != -INFINITY) v0 = fmaf(w[k], sent[0], v0), v1 = fmaf(w[k], sent[1], v1);
            }
            float o0 = 0.0f, o1 = 0.0f;
            if (bad_row) o0 = o1 = NAN;
            else if (M != -INFINITY) o0 = v0 / den, o1 = v1 / den;
            if (a.rope && c >= D - 64) derotate_pair(a, red->table, c - (D - 64), o0, o1);
            const int64_t at = ((int64_t)t * a.H + hh) * a.D + c;
            store_out(a, at, o0);
            if (c + 1 < D) store_out(a, at + 1, o1);
        }
    }
}

/* ---- mma: one CTA per (query row, 32 heads), tensor-core products, all blocks in order ---- */

enum {
    MMA_HEADS = 32,             /* heads a CTA: one block's gathered rows serve them all */
    MMA_MI = MMA_HEADS / 16,    /* m-tiles of 16 heads */
    MMA_NT = 8,                 /* n-tiles of 8 columns per warp at D = 512 */
    SC_LD = ENTRIES + 4, PB_LD = ENTRIES + 8
};
static_assert(MMA_HEADS % WARPS == 0 && MMA_HEADS % 16 == 0, "the softmax step gives each warp whole heads");
static_assert(ENTRIES == 8 * WARPS, "the score step gives each warp one n-tile of 8 entries");

/* shared memory of the mma kernel (byte offsets, the same on host and device); bf16 rows of
 * DP = D + 8 elements: the 16-byte pad puts the 8 rows a fragment load touches in distinct banks */
struct MmaLayout {
    size_t q, kv, sc, pb, m, den, alpha, row, flag, total;
};
__host__ __device__ inline MmaLayout mma_layout_for(int64_t D)
{
    const int64_t DP = D + 8;
    MmaLayout l;
    l.q = 0;                                                  /* bf16 [MMA_HEADS][DP] q of the heads */
    l.kv = l.q + align16(2 * MMA_HEADS * DP);                 /* bf16 [64][DP] the block's rows */
    l.sc = l.kv + align16(2 * ENTRIES * DP);                  /* float [MMA_HEADS][SC_LD] scores */
    l.pb = l.sc + align16(sizeof(float) * MMA_HEADS * SC_LD); /* bf16 [MMA_HEADS][PB_LD] P(p), the A operand */
    l.m = l.pb + align16(2 * MMA_HEADS * PB_LD);              /* float [MMA_HEADS] running max */
    l.den = l.m + align16(sizeof(float) * MMA_HEADS);         /* float [MMA_HEADS] running denominator */
    l.alpha = l.den + align16(sizeof(float) * MMA_HEADS);     /* float [MMA_HEADS] this block's α */
    l.row = l.alpha + align16(sizeof(float) * MMA_HEADS);     /* long long [64] pool row or -1 */
    l.flag = l.row + sizeof(long long) * ENTRIES;             /* int: a bad index was seen */
    l.total = l.flag + 16;
    return l;
}

/* four 8x8 bf16 matrices: lane l gives the address of row l % 8 of matrix l / 8; register j holds
 * matrix j's row l / 4, columns 2(l % 4) and 2(l % 4) + 1 */
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void *row)
{
    unsigned at = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(at));
}

/* An m16n8k16 A fragment (rows of ld elements from `tile`, k columns from k): matrices rows 0-7 /
 * 8-15 of columns k..k+7, then of k+8..k+15, so register j is the fragment's a_j */
__device__ __forceinline__ void load_a_fragment(uint32_t (&a)[4], const uint16_t *tile, int ld, int k, int lane)
{
    ldmatrix_x4(a, tile + ((lane & 7) + 8 * ((lane >> 3) & 1)) * ld + k + 8 * (lane >> 4));
}

/* four 8x8 bf16 matrices, transposed: lane l gives the address of row l % 8 of matrix l / 8 */
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void *row)
{
    unsigned at = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(at));
}

/* Requires round_p, q and pool bf16, D % 64 == 0, D <= 512 (the host checks). Fragment layout of
 * m16n8k16 (lane = 4·gid + qd): A rows gid and gid + 8, columns 2qd, 2qd + 1 (+ 8); B column gid,
 * rows 2qd, 2qd + 1 (+ 8); C rows gid (c0, c1) and gid + 8 (c2, c3), columns 2qd, 2qd + 1.
 *   scores: S[32 heads][64 entries] = Q[32][D] · KV^T: warp w the n-tile of entries 8w..8w+7 for
 *     both m-tiles of 16 heads, D/16 k-steps; one ldmatrix gives the B fragments of two k-steps
 *     (rows 8w.. of kv, consecutive dims), each used by both tiles; A (q) by ldmatrix too;
 *   softmax: warp w heads 4w .. 4w + 3, as block_softmax; P(p) as bf16 into pb (A operand);
 *   P·V: O[32][D] += P[32][64] · KV[64][D]: warp w the D/64 n-tiles from column w·D/8, 4 k-steps;
 *     B fragments by ldmatrix.trans of kv rows (entries along k), two n-tiles per ldmatrix.x4,
 *     each for both m-tiles. */
__global__ void __launch_bounds__(THREADS, 2) mma_kernel(const __grid_constant__ Args a, const __grid_constant__ MmaLayout l)
{
    extern __shared__ __align__(16) unsigned char smem[];
    uint16_t *qb = (uint16_t *)(smem + l.q), *kvb = (uint16_t *)(smem + l.kv), *pb = (uint16_t *)(smem + l.pb);
    float *sc = (float *)(smem + l.sc), *m_s = (float *)(smem + l.m), *den_s = (float *)(smem + l.den);
    float *alpha_s = (float *)(smem + l.alpha);
    Shared s = {};
    s.row = (long long *)(smem + l.row);
    s.bad = (int *)(smem + l.flag);
    const int64_t t = blockIdx.x / a.groups, g = blockIdx.x % a.groups, D = a.D, DP = D + 8;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, qd = lane & 3;
    const int nt = (int)(D / 64); /* this warp's n-tiles in P·V, columns from c_warp */
    const int64_t c_warp = warp * (D / 8);
    const uint16_t *q = (const uint16_t *)a.q;
    if (a.vec_q) {
        /* 16-byte copies, all in flight at once; the first block's wait covers them. Copied an
         * element a load, the q of a CTA took ~10 of a window layer's ~40 us a CTA (H200) */
        const int chunks = (int)D / 8; /* 16-byte chunks a row */
        for (int i = threadIdx.x; i < MMA_HEADS * chunks; i += THREADS) {
            const int h = i / chunks, c = 8 * (i - h * chunks);
            const int64_t hh = g * MMA_HEADS + h;
            if (hh < a.H) cp_async16(qb + h * DP + c, q + (t * a.H + hh) * D + c);
            else *(uint4 *)(qb + h * DP + c) = make_uint4(0, 0, 0, 0);
        }
    } else {
        for (int i = threadIdx.x; i < MMA_HEADS * (int)D; i += THREADS) { /* 32-bit index math: D <= 512 */
            const int h = i / (int)D, c = i - h * (int)D;
            const int64_t hh = g * MMA_HEADS + h;
            qb[h * DP + c] = hh < a.H ? q[(t * a.H + hh) * D + c] : (uint16_t)0;
        }
    }
    if (threadIdx.x < MMA_HEADS) m_s[threadIdx.x] = -INFINITY, den_s[threadIdx.x] = 0.0f;
    if (threadIdx.x == 0) *s.bad = 0;
    float acc[MMA_MI][MMA_NT][4] = {};
    __syncthreads();
    for (int64_t b = 0; b < a.nb; b++) {
        if (!load_block<uint16_t>(a, t, b, s, kvb, DP, true)) continue; /* attend() skips such a block */
        { /* scores of entries 8·warp … 8·warp + 7 for every m-tile of 16 heads: two independent mma
             * chains a tile (k-steps mod 2), summed at the end, so the k-loop is not one chain of
             * D/16 mma latencies; the entries' fragment serves every tile */
            float dc[MMA_MI][2][4] = {};
            /* one ldmatrix: the B fragments of both k16 steps of 32 columns (entry rows, 8 columns
             * a matrix); the A fragments too, where 32-bit loads took 4 instructions each */
            const uint16_t *kr = kvb + (8 * warp + (lane & 7)) * DP + 8 * (lane >> 3);
            for (int k0 = 0; k0 < (int)D; k0 += 32) {
                uint32_t bf[4];
                ldmatrix_x4(bf, kr + k0);
#pragma unroll
                for (int c = 0; c < 2; c++) {
#pragma unroll
                    for (int mi = 0; mi < MMA_MI; mi++) {
                        uint32_t af[4];
                        load_a_fragment(af, qb + 16 * mi * DP, (int)DP, k0 + 16 * c, lane);
                        mma_bf16(dc[mi][c], af[0], af[1], af[2], af[3], bf[2 * c], bf[2 * c + 1]);
                    }
                }
            }
#pragma unroll
            for (int mi = 0; mi < MMA_MI; mi++)
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const int h = 16 * mi + gid + (j >= 2 ? 8 : 0), e = 8 * warp + 2 * qd + (j & 1);
                    const float d = dc[mi][0][j] + dc[mi][1][j];
                    sc[h * SC_LD + e] = s.row[e] >= 0 ? __fmul_rn(d, a.scale) : -INFINITY;
                }
        }
        __syncthreads();
#pragma unroll
        for (int hw = 0; hw < MMA_HEADS / WARPS; hw++) { /* softmax step of head h (block_softmax, P into pb) */
            const int h = MMA_HEADS / WARPS * warp + hw;
            const bool v0 = s.row[lane] >= 0, v1 = s.row[lane + 32] >= 0;
            float s0 = sc[h * SC_LD + lane], s1 = sc[h * SC_LD + lane + 32];
            float mx = fmaxf(s0, s1);
#pragma unroll
            for (int o = 16; o >= 1; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(FULL, mx, o));
            const float m_old = m_s[h], m_new = fmaxf(m_old, mx);
            float p0 = v0 ? expf(s0 - m_new) : 0.0f, p1 = v1 ? expf(s1 - m_new) : 0.0f;
            float sum = p0 + p1;
#pragma unroll
            for (int o = 16; o >= 1; o >>= 1) sum += __shfl_xor_sync(FULL, sum, o);
            pb[h * PB_LD + lane] = dsrt_f32_to_bf16(p0); /* P: the reference's bf16 rounding */
            pb[h * PB_LD + lane + 32] = dsrt_f32_to_bf16(p1);
            __syncwarp();
            if (lane == 0) {
                float alpha = expf(m_old - m_new); /* 0 for the first block with a valid entry */
                alpha_s[h] = alpha;
                den_s[h] = fmaf(den_s[h], alpha, sum);
                m_s[h] = m_new;
            }
        }
        __syncthreads();
        { /* acc = acc·α + P·V over this warp's columns, each V fragment serving every m-tile */
#pragma unroll
            for (int mi = 0; mi < MMA_MI; mi++) {
                const float a_lo = alpha_s[16 * mi + gid], a_hi = alpha_s[16 * mi + gid + 8];
#pragma unroll
                for (int i = 0; i < MMA_NT; i++)
                    acc[mi][i][0] *= a_lo, acc[mi][i][1] *= a_lo, acc[mi][i][2] *= a_hi, acc[mi][i][3] *= a_hi;
            }
#pragma unroll
            for (int ks = 0; ks < ENTRIES / 16; ks++) {
                uint32_t pa[MMA_MI][4];
#pragma unroll
                for (int mi = 0; mi < MMA_MI; mi++) load_a_fragment(pa[mi], pb + 16 * mi * PB_LD, PB_LD, 16 * ks, lane);
                /* ldmatrix rows: entry 16ks + (lane & 7) + 8·((lane >> 3) & 1), columns + 8·(lane >> 4) */
                const uint16_t *vr = kvb + (16 * ks + (lane & 7) + 8 * ((lane >> 3) & 1)) * DP + c_warp + 8 * (lane >> 4);
#pragma unroll
                for (int i = 0; i < MMA_NT; i += 2) {
                    if (i >= nt) break;
                    uint32_t bf[4];
                    ldmatrix_x4_trans(bf, vr + 8 * i);
#pragma unroll
                    for (int mi = 0; mi < MMA_MI; mi++) {
                        mma_bf16(acc[mi][i], pa[mi][0], pa[mi][1], pa[mi][2], pa[mi][3], bf[0], bf[1]);
                        mma_bf16(acc[mi][i + 1], pa[mi][0], pa[mi][1], pa[mi][2], pa[mi][3], bf[2], bf[3]);
                    }
                }
            }
        }
        __syncthreads(); /* before the next block's rows and p overwrite these */
    }
    cp_async_wait_all(); /* q's copies, where no block had a valid entry to wait for them */
    if (threadIdx.x < MMA_HEADS && g * MMA_HEADS + threadIdx.x < a.H && m_s[threadIdx.x] != -INFINITY)
        den_s[threadIdx.x] += expf(sink_of(a, g * MMA_HEADS + threadIdx.x) - m_s[threadIdx.x]); /* the sink */
    rope_table(a, t, 32, sc); /* sc is free after the last block; warp 1, beside the sink's warp 0 */
    __syncthreads();
    const int bad = *s.bad;
    const bool pairs = a.out_bf16 && ((uintptr_t)a.o & 3) == 0; /* (c, c + 1) as one 32-bit store */
#pragma unroll
    for (int mi = 0; mi < MMA_MI; mi++) {
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int h = 16 * mi + gid + 8 * half;
            const int64_t hh = g * MMA_HEADS + h, row = (t * a.H + hh) * D;
            if (hh >= a.H) continue;
            /* o = acc · (1/den): one division a head, not one an element (an IEEE division is a
             * dozen instructions, and a window layer's CTA stores 64 values a thread after only two
             * blocks); 1 ulp of fp32 from acc/den */
            const float m = m_s[h], inv = 1.0f / den_s[h];
#pragma unroll
            for (int i = 0; i < MMA_NT; i++) {
                if (i >= nt) break;
                const int64_t c = c_warp + 8 * i + 2 * qd;
                float v[2];
#pragma unroll
                for (int j = 0; j < 2; j++) v[j] = bad ? NAN : m == -INFINITY ? 0.0f : acc[mi][i][2 * half + j] * inv;
                /* c is even and so is D − 64 (D % 64 == 0): (c, c + 1) is a RoPE pair */
                if (a.rope && c >= D - 64) derotate_pair(a, sc, c - (D - 64), v[0], v[1]);
                if (pairs) {
                    ((uint32_t *)a.o)[(row + c) / 2] = dsrt_f32_to_bf16(v[0]) | (uint32_t)dsrt_f32_to_bf16(v[1]) << 16;
                } else {
                    store_out(a, row + c, v[0]);
                    store_out(a, row + c + 1, v[1]);
                }
            }
        }
    }
}

/* ---- wgmma: (query row, 64 heads) at D = 512 by two warpgroups, a CTA a multiprocessor ----
 *
 * Flash's prefill attends 64 heads of 512 over its 640 (ratio-4 layer) or 128-160 index entries a
 * query row; mma_kernel's mma.sync ran it at ~140 TFLOP/s, bound by shared memory (each block's q
 * fragments re-read by every warp). Here the 64 heads are wgmma's M, so every operand is read from
 * shared memory once a block:
 *   - warpgroup w owns dims 256w..256w+255: its half of q (staged once), its half of each
 *     gathered row, its half of the output columns. The two halves never meet but in the scores;
 *   - scores: S_w = q[:, half w] · kv[:, half w]ᵀ, 16 wgmma m64n64k16 (both operands K-major in
 *     the 128-byte swizzle); the warpgroups swap their partial S through shared memory and each
 *     adds the other's (fp32 addition commutes: both hold the same bits), then both run the
 *     softmax step of all 64 heads (the same values twice: cheaper than a second exchange);
 *   - P·V: O_w += P · kv[:, half w], P (bf16) straight from the S accumulator's registers as
 *     wgmma's A fragments (the m64 accumulator's layout is the A layout), kv read N-major from
 *     the same swizzled rows (64-dim column groups 8 KB apart, 8-entry groups 1 KB apart).
 * Each warpgroup gathers its own half of the next block's rows (cp.async, zero-filled where the
 * entry is invalid) as soon as its P·V of the block before has retired, so the copies of block
 * b + 1 run under the exchange, softmax and P·V of block b. Numerics are mma_kernel's: exact
 * bf16 products, fp32 sums in the tensor cores' order, P rounded to bf16 from the running max.
 * Shared memory: q 64 KB, two stages of rows 128 KB, the exchange 32 KB: one CTA a multiprocessor,
 * persistent over the rows (wga_kernel says why).
 * Measured (CUPTI, H200, a Flash prefill's 4 launches): mma_kernel 5.1 ms; this kernel 2.4 (the
 * ratio-4 layer 1.13 ms, ~240 TFLOP/s; README's eighteenth session lists the steps). */
enum { WGA_HEADS = 64, WGA_D = 512, WGA_THREADS = 256, WGA_CHUNK = 64 * 128 /* 64 rows x 64 dims, bf16 */ };
enum : uint32_t {
    WGA_Q = 0,                      /* bf16 [8 dim groups][64 heads][64] swizzled */
    WGA_KV = WGA_Q + 8 * WGA_CHUNK, /* two stages of bf16 [8 dim groups][64 entries][64] swizzled */
    WGA_XS = WGA_KV + 16 * WGA_CHUNK, /* float [2 warpgroups][32][128 threads]: partial scores */
    WGA_VALID = WGA_XS + 2 * 32 * 128 * 4, /* u64 [2 warpgroups][2 stages][4 warps]: valid entries */
    WGA_TABLE = WGA_VALID + 2 * 2 * 4 * 8, /* float [64]: the RoPE cos and sin of a row (rope_table) */
    WGA_BYTES = WGA_TABLE + 64 * 4,
    WGA_SMEM = WGA_BYTES + 1024 /* the swizzle needs 1024-byte aligned tiles */
};
/* named barriers: 0 is __syncthreads; the exchange (both warpgroups); "partial w was read" */
enum { BAR_SWAPPED = 1, BAR_READ = 2 /* + w */, BAR_GROUP = 4 /* + w: a warpgroup's 128 threads */ };
__device__ __forceinline__ void bar_sync(int id, int threads) { asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory"); }
__device__ __forceinline__ void bar_arrive(int id, int threads) { asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory"); }

/* bar.sync of a warpgroup's 128 threads that also returns whether any of them passed `p` */
__device__ __forceinline__ bool bar_or(int id, bool p)
{
    uint32_t r;
    asm volatile("{\n.reg .pred p, q;\nsetp.ne.u32 p, %1, 0;\nbar.red.or.pred q, %2, 128, p;\nselp.u32 %0, 1, 0, q;\n}\n"
                 : "=r"(r) : "r"((uint32_t)p), "r"(id) : "memory");
    return r != 0;
}

/* (lo, hi) rounded to bf16 (nearest even) as one word, lo in the low half: dsrt_f32_to_bf16's
 * values in one instruction (a NaN may come out with other payload bits) */
__device__ __forceinline__ uint32_t bf16_pair(float lo, float hi)
{
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

/* descriptors of tiles at a shared address: K-major (wgmma_desc_sw128), and N-major (the
 * transposed B) with its 64-column groups `lbo` bytes apart */
__device__ __forceinline__ uint64_t wgmma_desc_sw128_at(uint32_t shared_at)
{
    return (uint64_t)WGMMA_SW128_HIGH << 32 | wgmma_desc_sw128_low(shared_at);
}
__device__ __forceinline__ uint64_t wgmma_desc_sw128_n_major(uint32_t shared_at, uint32_t lbo)
{
    return (uint64_t)WGMMA_SW128_HIGH << 32 | ((shared_at & 0x3ffffu) >> 4) | (lbo >> 4) << 16;
}

/* A warpgroup's share of a block: 64 entries x 32 16-byte pieces (its 256 dims), 16 copies a
 * thread: thread i takes piece i % 8 of dim groups 4w..4w+3 (a warp's lanes cover 128 contiguous
 * bytes of 4 rows) for entries i / 8 + 16k, k < 4. wga_rows loads the 4 indices (a block ahead
 * of their use), wga_copy checks them and issues the copies once the stage is free, and returns,
 * in lane 0, the block's valid-entry bits its warp saw. */
struct WgaRows {
    long long r[4]; /* the index values as loaded (entries past K: any) */
};
__device__ __forceinline__ WgaRows wga_rows(const Args &a, int64_t t, int64_t b, int i)
{
    WgaRows rows;
#pragma unroll
    for (int k = 0; k < 4; k++) { /* no branch and no test of the value here: the loads all go out at once */
        const int64_t kk = b * ENTRIES + (i >> 3) + 16 * k, at = t * a.K + (kk < a.K ? kk : a.K - 1);
        rows.r[k] = a.idx64 ? ((const long long *)a.idx)[at] : (long long)((const int *)a.idx)[at];
    }
    return rows;
}
__device__ __forceinline__ uint64_t wga_copy(const Args &a, const WgaRows &rows, int64_t b, uint32_t stage_at, int w, int i,
                                             bool &bad)
{
    const int piece = i & 7, lane = i & 31;
    const uint16_t *pool = (const uint16_t *)a.pool + 8 * (4 * w * 8 + piece);
    uint64_t bits = 0;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const int e = (i >> 3) + 16 * k;
        long long r = b * ENTRIES + e < a.K ? rows.r[k] : -1;
        if (r < -1 || r >= a.N) bad = true, r = -1;
        const uint16_t *src = r >= 0 ? pool + r * WGA_D : pool;
#pragma unroll
        for (int m = 0; m < 4; m++)
            cp_async16_or_zero_at(stage_at + (4 * w + m) * WGA_CHUNK + e * 128 + ((piece ^ (e & 7)) << 4), src + 64 * m, r >= 0);
        /* lanes 8j hold entries (i >> 3) - (lane >> 3) + j + 16k, j < 4 */
        const uint32_t vote = __ballot_sync(FULL, r >= 0);
#pragma unroll
        for (int j = 0; j < 4; j++) bits |= (uint64_t)(vote >> (8 * j) & 1) << (e - (lane >> 3) + j);
    }
    cp_async_commit();
    return bits;
}

/* Where a CTA is in its work: item f is block b of its row number k (row r = blockIdx.x + k·grid,
 * query t = r / groups, head group r % groups); advance() steps one block */
struct WgaPos {
    int t, grp, r, b; /* 32 bits: the host keeps S·groups and the blocks below 2^31 */
    __device__ void set_row(const Args &a, int row)
    {
        r = row, t = row / (int)a.groups, grp = row - t * (int)a.groups, b = 0;
    }
    __device__ void advance(const Args &a)
    {
        if (++b == a.nb) set_row(a, r + (int)gridDim.x);
    }
};

/* Block f's softmax step over the summed scores s (rows 16·warp + g + 8h of the accumulator:
 * s[4j + 2h + c] is entry 8j + 2·qd + c), attend()'s: the running max m, α, den, o·α, P(p) as
 * bf16 straight into the A fragments pa; then this warpgroup's P·V (issued, not waited for) */
__device__ __forceinline__ void wga_softmax_pv(const Args &a, float (&s)[32], uint64_t vmask, int qd, float (&m)[2],
                                               float (&den)[2], float (&o)[2][64], uint32_t (&pa)[4][4], uint32_t kv_at, int w)
{
    const uint64_t vm = vmask >> (2 * qd); /* entry 8j + 2·qd + c is valid: bit 8j + c */
    float mx[2] = {-INFINITY, -INFINITY};
    if (vmask == ~0ull) { /* every entry valid (most blocks): no mask to apply */
#pragma unroll
        for (int k = 0; k < 32; k++) s[k] = __fmul_rn(s[k], a.scale);
    } else {
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int c = 0; c < 4; c++)
                s[4 * j + c] = (uint32_t)(vm >> (8 * j + (c & 1))) & 1 ? __fmul_rn(s[4 * j + c], a.scale) : -INFINITY;
    }
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
        for (int c = 0; c < 4; c++) mx[c >> 1] = fmaxf(mx[c >> 1], s[4 * j + c]);
    float alpha[2], sum[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(FULL, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(FULL, mx[h], 2));
        const float m_new = fmaxf(m[h], mx[h]);
        alpha[h] = expf(m[h] - m_new); /* 0 for the first block with a valid entry */
        m[h] = m_new;
        sum[h] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            /* e^{-inf} = 0 where the entry is invalid: no branch */
            const float p0 = expf(s[4 * j + 2 * h] - m[h]), p1 = expf(s[4 * j + 2 * h + 1] - m[h]);
            sum[h] += p0;
            sum[h] += p1;
            /* A fragment of k-step j / 2: a0 row g, a1 row g + 8, a2/a3 the same 8 entries on */
            pa[j >> 1][2 * (j & 1) + h] = bf16_pair(p0, p1);
        }
#pragma unroll
    for (int h = 0; h < 2; h++) {
        sum[h] += __shfl_xor_sync(FULL, sum[h], 1);
        sum[h] += __shfl_xor_sync(FULL, sum[h], 2);
        den[h] = fmaf(den[h], alpha[h], sum[h]);
    }
    if (__any_sync(FULL, alpha[0] != 1.0f || alpha[1] != 1.0f)) { /* o·1 is o: most later blocks skip it */
#pragma unroll
        for (int n = 0; n < 2; n++)
#pragma unroll
            for (int j = 0; j < 16; j++)
#pragma unroll
                for (int h = 0; h < 2; h++) o[n][4 * j + 2 * h] *= alpha[h], o[n][4 * j + 2 * h + 1] *= alpha[h];
    }
    wgmma_pin_acc(o[0]); /* the rescaling done before the fence, not sunk between the wgmmas */
    wgmma_pin_acc(o[1]);
#pragma unroll
    for (int ks = 0; ks < 4; ks++) wgmma_pin_regs(pa[ks]);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < 4; ks++)
#pragma unroll
        for (int n = 0; n < 2; n++)
            wgmma_m64n128k16_bf16_rs<1>(o[n], pa[ks],
                                        wgmma_desc_sw128_n_major(kv_at + (4 * w + 2 * n) * WGA_CHUNK + ks * 16 * 128, WGA_CHUNK));
    wgmma_commit();
}

/* A row's output from the accumulators: o · 1/den (the sink's term added; one division a head),
 * NaN after a bad index, 0 without a valid entry; warpgroup 1 derotates the last 64 columns */
__device__ __forceinline__ void wga_store(const Args &a, const WgaPos &p, const float (&o)[2][64], const float (&m)[2],
                                          const float (&den)[2], bool bad, const float *table, int w, int warp, int g, int qd)
{
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int64_t hh = p.grp * WGA_HEADS + 16 * warp + g + 8 * h, row = (p.t * a.H + hh) * WGA_D;
        const float sink_den = m[h] != -INFINITY ? den[h] + expf(sink_of(a, hh) - m[h]) : 1.0f;
        const float inv = bad ? NAN : m[h] == -INFINITY ? 0.0f : 1.0f / sink_den;
#pragma unroll
        for (int n = 0; n < 2; n++)
#pragma unroll
            for (int j = 0; j < 16; j++) {
                const int c = 256 * w + 128 * n + 8 * j + 2 * qd;
                float v0 = o[n][4 * j + 2 * h] * inv, v1 = o[n][4 * j + 2 * h + 1] * inv;
                if (n == 1 && j >= 8 && w == 1 && a.rope) derotate_pair(a, table, c - (WGA_D - 64), v0, v1);
                ((uint32_t *)a.o)[(row + c) / 2] = bf16_pair(v0, v1); /* (c, c + 1): one 32-bit store */
            }
    }
}

/* The end of row p once its last P·V has retired: warpgroup 1's RoPE table, the row's bad-index
 * flag over the warpgroup (its threads saw every index of the row), the output, and the
 * accumulators and running values reset for the next row */
__device__ __forceinline__ void wga_finish(const Args &a, const WgaPos &p, float (&o)[2][64], float (&m)[2], float (&den)[2],
                                           bool bad, float *table, int w, int warp, int g, int qd)
{
    if (w == 1) rope_table(a, p.t, 128, table);
    const bool row_bad = bar_or(BAR_GROUP + w, bad); /* and the table is in */
    wga_store(a, p, o, m, den, row_bad, table, w, warp, g, qd);
#pragma unroll
    for (int n = 0; n < 2; n++)
#pragma unroll
        for (int k = 0; k < 64; k++) o[n][k] = 0.0f;
    m[0] = m[1] = -INFINITY, den[0] = den[1] = 0.0f;
}

/* this warpgroup's half of query t's q (heads grp·64..), as wga_copy's rows */
__device__ __forceinline__ void wga_load_q(const Args &a, const WgaPos &p, uint32_t q_at, int w, int i)
{
    const int piece = i & 7;
    const uint16_t *q = (const uint16_t *)a.q + (p.t * a.H + p.grp * WGA_HEADS) * WGA_D + 8 * (4 * w * 8 + piece);
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const int h = (i >> 3) + 16 * k;
#pragma unroll
        for (int m = 0; m < 4; m++)
            cp_async16_at(q_at + (4 * w + m) * WGA_CHUNK + h * 128 + ((piece ^ (h & 7)) << 4), q + h * WGA_D + 64 * m);
    }
}

/* Requires round_p, q and pool bf16 and 16-byte aligned, o bf16 and 4-byte aligned, D = 512,
 * H % 64 == 0, K > 0 (the host checks). Persistent: a CTA takes rows blockIdx.x, + grid, ... as
 * one stream of blocks, so the next row's q and first rows are copied under this row's last block
 * and its stores, which one CTA a multiprocessor leaves no other CTA to hide (a CTA a row: the
 * window layers 0.49 ms, persistent 0.41). A row's output is stored at the next block's wait, once
 * its last P·V has retired: a wait of its own in the loop made ptxas serialise the wgmmas (C7518). */
__global__ void __launch_bounds__(WGA_THREADS, 1) wga_kernel(const __grid_constant__ Args a)
{
    extern __shared__ __align__(16) unsigned char wga_raw[];
    /* offset from the array (not a rounded integer) so the compiler keeps shared-memory accesses */
    unsigned char *smem = wga_raw + ((1024 - ((uint32_t)__cvta_generic_to_shared(wga_raw) & 1023)) & 1023);
    const uint32_t base = (uint32_t)__cvta_generic_to_shared(smem);
    const int w = threadIdx.x >> 7, i = threadIdx.x & 127, warp = i >> 5, lane = i & 31, g = lane >> 2, qd = lane & 3;
    float *xs_mine = (float *)(smem + WGA_XS) + w * 32 * 128, *xs_other = (float *)(smem + WGA_XS) + (1 - w) * 32 * 128;
    uint64_t *valid = (uint64_t *)(smem + WGA_VALID) + w * 8; /* [stage][warp] */
    float *table = (float *)(smem + WGA_TABLE);                /* warpgroup 1's RoPE table of its row */
    const int64_t rows = a.S * a.groups, items = (rows - blockIdx.x + gridDim.x - 1) / gridDim.x * a.nb;

    WgaPos cur, next, after, prev; /* items f, f + 1, f + 2, f - 1 */
    bool prev_ends = false;        /* item f - 1 ended its row */
    cur.set_row(a, (int)blockIdx.x);
    next = cur, next.advance(a);
    after = next, after.advance(a);
    bool bad = false, bad_next = false; /* an index out of range in this row's blocks, in the next row's */
    wga_load_q(a, cur, base + WGA_Q, w, i);
    {
        const uint64_t bits = wga_copy(a, wga_rows(a, cur.t, 0, i), 0, base + WGA_KV, w, i, bad);
        if (lane == 0) valid[warp] = bits;
    }
    /* the indices of item f + 1, loaded during item f - 1: an L2 round trip under the gathers'
     * traffic outlasts one block's scores (ncu: 18% of the samples waited on them there) */
    WgaRows next_rows = wga_rows(a, items > 1 ? next.t : cur.t, items > 1 ? next.b : 0, i);

    float o[2][64] = {}; /* O[64 heads][this half's 256 columns]: two m64n128 accumulators */
    float m[2] = {-INFINITY, -INFINITY}, den[2] = {0.0f, 0.0f}; /* rows 16·warp + g (+ 8) */
    uint32_t pa[4][4] = {}; /* P of the block: the A fragments of its four k16 steps */
    int swapped = 0;        /* blocks whose partial scores this warpgroup has written */
    for (int64_t f = 0;; f++) { /* f = items: only the last row's output */
        const int st = (int)(f & 1);
        const uint32_t kv_at = base + WGA_KV + st * 8 * WGA_CHUNK;
        cp_async_wait<0>();
        fence_async_shared();
        bar_sync(BAR_GROUP + w, 128); /* this warpgroup's copies of item f (and q) are in */
        const uint64_t vmask = f < items ? valid[st * 4 + 0] | valid[st * 4 + 1] | valid[st * 4 + 2] | valid[st * 4 + 3] : 0;
        const WgaRows after_rows = wga_rows(a, f + 2 < items ? after.t : cur.t, f + 2 < items ? after.b : cur.b, i);
        float s[32] = {};
        if (vmask) {
            wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < 16; ks++) {
                const uint32_t off = (4 * w + (ks >> 2)) * WGA_CHUNK + (ks & 3) * 32;
                wgmma_m64n64k16_bf16_ss(s, wgmma_desc_sw128_at(base + WGA_Q + off), wgmma_desc_sw128_at(kv_at + off), ks);
            }
            wgmma_commit();
        }
        wgmma_wait_all(); /* the scores, and item f - 1's P·V: q (if f ends a row) and stage st ^ 1 are free */
        wgmma_pin_acc(s);
        wgmma_pin_acc(o[0]);
        wgmma_pin_acc(o[1]);
#pragma unroll
        for (int ks = 0; ks < 4; ks++) wgmma_pin_regs(pa[ks]); /* item f - 1's P·V read them until here */
        if (prev_ends) { /* item f - 1 ended its row, whose P·V has just retired: its output */
            wga_finish(a, prev, o, m, den, bad, table, w, warp, g, qd);
            bad = bad_next, bad_next = false;
        }
        if (f == items) break;
        const bool row_ends = cur.b == a.nb - 1;
        if (f + 1 < items) {
            if (row_ends) wga_load_q(a, next, base + WGA_Q, w, i); /* the same commit group as its first rows */
            const uint64_t bits = wga_copy(a, next_rows, next.b, base + WGA_KV + (st ^ 1) * 8 * WGA_CHUNK, w, i,
                                           row_ends ? bad_next : bad);
            if (lane == 0) valid[(st ^ 1) * 4 + warp] = bits;
        }
        next_rows = after_rows;
        if (vmask) { /* attend() skips a block without a valid entry; so do both warpgroups */
            if (swapped++) bar_sync(BAR_READ + w, 256); /* the other warpgroup has read the last partial */
#pragma unroll
            for (int k = 0; k < 8; k++)
                *(float4 *)(xs_mine + (k * 128 + i) * 4) = make_float4(s[4 * k], s[4 * k + 1], s[4 * k + 2], s[4 * k + 3]);
            bar_sync(BAR_SWAPPED, 256);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const float4 x = *(const float4 *)(xs_other + (k * 128 + i) * 4);
                s[4 * k] += x.x, s[4 * k + 1] += x.y, s[4 * k + 2] += x.z, s[4 * k + 3] += x.w;
            }
            bar_arrive(BAR_READ + (1 - w), 256);
            wga_softmax_pv(a, s, vmask, qd, m, den, o, pa, kv_at, w);
        }
        prev = cur, prev_ends = row_ends;
        cur = next, next = after;
        if (f + 3 < items) after.advance(a);
    }
    if (swapped) bar_sync(BAR_READ + w, 256); /* pairs the other warpgroup's last arrive */
}

/* ---- host side ---- */

const char *OP = "nn.sparse_attention";

/* the split path for few rows: fewer fused CTAs than one wave, and more than one block to spread */
bool use_split(int dev, int64_t S, int64_t H, int64_t K)
{
    int64_t groups = (H + HEADS - 1) / HEADS, nb = (K + ENTRIES - 1) / ENTRIES, nc = (K + CHUNK - 1) / CHUNK;
    return nb > 1 && nc <= 65535 && S * groups < dsrtk_multiprocessors(dev);
}

struct Workspace {
    size_t scores, cmax, part_acc, part_m, part_sum, total;
};
Workspace workspace_for(int64_t S, int64_t H, int64_t D, int64_t K)
{
    int64_t nc = (K + CHUNK - 1) / CHUNK;
    auto round = [](size_t n) { return (n + 255) & ~(size_t)255; };
    Workspace w;
    w.scores = 0;
    w.cmax = w.scores + round(sizeof(float) * (size_t)(S * H * K));
    w.part_acc = w.cmax + round(sizeof(float) * (size_t)(S * nc * H));
    w.part_m = w.part_acc + round(sizeof(float) * (size_t)(S * nc * H * D));
    w.part_sum = w.part_m + round(sizeof(float) * (size_t)(S * nc * H));
    w.total = w.part_sum + round(sizeof(float) * (size_t)(S * nc * H));
    return w;
}

bool contiguous(const dsrt_view *v)
{
    int64_t st = 1;
    for (int d = v->ndim - 1; d >= 0; d--) {
        if (v->shape[d] != 1 && v->stride[d] != st) return false;
        st *= v->shape[d];
    }
    return true;
}

size_t elem_size(int dtype) { return dtype == DSRT_F32 || dtype == DSRT_I32 ? 4 : dtype == DSRT_I64 ? 8 : 2; }
const void *base_of(const dsrt_view *v) { return (const char *)v->data + (size_t)v->offset * elem_size(v->dtype); }

int check_view(const char *name, const dsrt_view *v, int ndim, bool integer)
{
    bool dtype_ok = integer ? v->dtype == DSRT_I32 || v->dtype == DSRT_I64 : v->dtype == DSRT_F32 || v->dtype == DSRT_BF16;
    if (v->ndim != ndim || !dtype_ok)
        return dsrtk_fail(DSRTK_ERROR, "%s: %s must be a %d-dimensional %s tensor (got %d dimensions, dtype %d)", OP, name,
                          ndim, integer ? "i32/i64" : "f32/bf16", v->ndim, v->dtype);
    if (!contiguous(v)) return dsrtk_fail(DSRTK_ERROR, "%s: %s must be contiguous", OP, name);
    return DSRTK_OK;
}

/* the one place a kernel template is picked by dtypes */
template <template <class, class> class F, class... P>
int by_dtypes(int q_dtype, int pool_dtype, P... p)
{
    if (q_dtype == DSRT_F32) return pool_dtype == DSRT_F32 ? F<float, float>::run(p...) : F<float, uint16_t>::run(p...);
    return pool_dtype == DSRT_F32 ? F<uint16_t, float>::run(p...) : F<uint16_t, uint16_t>::run(p...);
}

template <class K, class L>
int launch(int dev, K kernel, const char *name, dim3 grid, size_t smem, const Args &a, const L &l, cudaStream_t st)
{
    int rc = dsrtk_allow_shared(dev, (const void *)kernel, smem, name);
    if (rc) return rc;
    kernel<<<grid, THREADS, smem, st>>>(a, l);
    return dsrtk_check_launch(name, dev);
}

template <class TQ, class TP>
struct Fused {
    static int run(int dev, const Args *a, const Layout *l, cudaStream_t st)
    {
        return launch(dev, fused_kernel<TQ, TP>, "sparse_attention fused_kernel", dim3((unsigned)(a->S * a->groups)),
                      l->total, *a, *l, st);
    }
};
/* the split path: three launches, each kernel's grid spread over chunks (and rows, head groups) */
template <class TQ, class TP>
struct Split {
    static int run(int dev, const Args *a, const Layout *, cudaStream_t st)
    {
        const dim3 grid((unsigned)(a->S * a->groups), (unsigned)a->nc);
        const size_t q_bytes = sizeof(float) * HEADS * (size_t)a->D4;
        int rc = dsrtk_allow_shared(dev, (const void *)scores_kernel<TQ, TP>, q_bytes, "sparse_attention scores_kernel");
        if (rc) return rc;
        (void)dsrtk_launch_dependent(scores_kernel<TQ, TP>, grid, dim3(THREADS), q_bytes, st, *a);
        if ((rc = dsrtk_check_launch("sparse_attention scores_kernel", dev))) return rc;
        (void)dsrtk_launch_dependent(pv_kernel<TP>, grid, dim3(THREADS), 0, st, *a);
        if ((rc = dsrtk_check_launch("sparse_attention pv_kernel", dev))) return rc;
        const size_t combine_bytes = 2 * sizeof(float) * (size_t)a->nc;
        if ((rc = dsrtk_allow_shared(dev, (const void *)combine_kernel, combine_bytes, "sparse_attention combine_kernel"))) return rc;
        const unsigned slices = (unsigned)((a->D + COMBINE_COLS - 1) / COMBINE_COLS);
        (void)dsrtk_launch_dependent(combine_kernel, dim3((unsigned)(a->S * a->H), slices), dim3(COMBINE_COLS), combine_bytes, st, *a);
        return dsrtk_check_launch("sparse_attention combine_kernel", dev);
    }
};

/* The cluster path: clusters of min(nc, 8) CTAs, launched dependent. *launched 0 (and DSRTK_OK)
 * where it does not apply: a CTA would take more than CLUSTER_CHUNKS chunks, its share of the rows
 * would not fit its shared memory, or the device places no such cluster. */
template <class TQ, class TP>
struct Cluster {
    static int run(int dev, const Args *a, int optin, cudaStream_t st, int *launched)
    {
        void (*kernel)(Args, ClusterLayout) = cluster_kernel<TQ, TP>;
        const int cl = (int)(a->nc < CLUSTER_MAX ? a->nc : CLUSTER_MAX);
        const ClusterLayout l = cluster_layout_for(a->D, a->D4, sizeof(TP), a->nc, cl);
        *launched = 0;
        if (l.cpc > CLUSTER_CHUNKS || l.total > (size_t)optin) return DSRTK_OK;
        int rc = dsrtk_allow_shared(dev, (const void *)kernel, l.total, "sparse_attention cluster_kernel");
        if (rc || dsrtk_clusters_fit(dev, (const void *)kernel, cl, CLUSTER_THREADS, l.total) < 1) return rc;
        cudaLaunchConfig_t config = {};
        config.gridDim = dim3((unsigned)(a->S * a->groups * cl)), config.blockDim = dim3(CLUSTER_THREADS);
        config.dynamicSmemBytes = l.total, config.stream = st;
        cudaLaunchAttribute attr[2];
        attr[0].id = cudaLaunchAttributeClusterDimension;
        attr[0].val.clusterDim.x = (unsigned)cl, attr[0].val.clusterDim.y = attr[0].val.clusterDim.z = 1;
        attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization; /* launched dependent (common.cuh) */
        attr[1].val.programmaticStreamSerializationAllowed = 1;
        config.attrs = attr, config.numAttrs = 2;
        *launched = 1;
        return dsrtk_check(cudaLaunchKernelEx(&config, kernel, *a, l),
                           "launch of sparse_attention cluster_kernel on cuda:%d", dev);
    }
};

} /* namespace */

extern "C" int dsrtk_sparse_attention_workspace(int dev, int64_t S, int64_t H, int64_t D, int64_t K, size_t *bytes)
{
    *bytes = 0;
    if (S <= 0 || H <= 0 || D <= 0 || K < 0) return DSRTK_OK;
    if (use_split(dev, S, H, K)) *bytes = workspace_for(S, H, D, K).total;
    return DSRTK_OK;
}

extern "C" int dsrtk_sparse_attention(int dev, const dsrt_view *o, const dsrt_view *q, const dsrt_view *pool,
                                      const dsrt_view *indices, const dsrt_view *sink, float scale, int round_p,
                                      const dsrtk_rope *derotate, void *workspace, size_t workspace_bytes, void *stream)
{
    int rc;
    if ((rc = check_view("o", o, 3, false)) || (rc = check_view("q", q, 3, false)) ||
        (rc = check_view("pool", pool, 2, false)) || (rc = check_view("indices", indices, 2, true)) ||
        (rc = check_view("sink", sink, 1, false)))
        return rc;
    const int64_t S = q->shape[0], H = q->shape[1], D = q->shape[2], N = pool->shape[0], K = indices->shape[1];
    if (o->shape[0] != S || o->shape[1] != H || o->shape[2] != D || pool->shape[1] != D || indices->shape[0] != S ||
        sink->shape[0] != H)
        return dsrtk_fail(DSRTK_ERROR,
                          "%s: shapes disagree: q [%lld, %lld, %lld], pool [%lld, %lld], indices [%lld, %lld], sink [%lld], "
                          "o [%lld, %lld, %lld]", OP, (long long)S, (long long)H, (long long)D, (long long)N,
                          (long long)pool->shape[1], (long long)indices->shape[0], (long long)K, (long long)sink->shape[0],
                          (long long)o->shape[0], (long long)o->shape[1], (long long)o->shape[2]);
    if (derotate && D < 64)
        return dsrtk_fail(DSRTK_ERROR, "%s: vectors of %lld, narrower than the 64 dims the inverse RoPE rotates", OP,
                          (long long)D);
    if (S == 0 || H == 0 || D == 0) return DSRTK_OK;
    DSRTK_SET_DEVICE(dev, OP);

    Args a = {};
    a.q = base_of(q), a.pool = base_of(pool), a.idx = base_of(indices), a.sink = base_of(sink);
    a.o = (void *)base_of(o);
    a.sink_dtype = sink->dtype, a.idx64 = indices->dtype == DSRT_I64, a.out_bf16 = o->dtype == DSRT_BF16;
    a.round_p = round_p != 0;
    a.S = S, a.H = H, a.D = D, a.N = N, a.K = K, a.D4 = (D + 3) / 4 * 4;
    a.groups = (H + HEADS - 1) / HEADS, a.nb = (K + ENTRIES - 1) / ENTRIES, a.nc = (K + CHUNK - 1) / CHUNK;
    a.scale = scale;
    if (derotate) {
        a.rope = 1, a.rope_first = derotate->first, a.rope_step = derotate->step;
        for (int i = 0; i < 32; i++) a.freqs.f[i] = derotate->freqs[i];
    }
    size_t pe = elem_size(pool->dtype);
    a.vec_rows = (D * (int64_t)pe) % 16 == 0 && (uintptr_t)a.pool % 16 == 0;
    a.row4 = D % 4 == 0 && (uintptr_t)a.pool % (4 * pe) == 0;
    a.vec_q = (D * (int64_t)elem_size(q->dtype)) % 16 == 0 && (uintptr_t)a.q % 16 == 0;
    Layout l = layout_for(D, a.D4, pe);

    int optin = 0;
    if ((rc = dsrtk_shared_limit(dev, &optin))) return rc;
    if (l.total > (size_t)optin)
        return dsrtk_fail(DSRTK_ERROR, "%s: vectors of %lld values need %zu bytes of shared memory per block, cuda:%d has %d",
                          OP, (long long)D, l.total, dev, optin);
    if (S * a.groups > INT32_MAX || S * H > INT32_MAX || a.nb > 65535)
        return dsrtk_fail(DSRTK_ERROR, "%s: %lld query rows x %lld heads x %lld indices is beyond one launch", OP,
                          (long long)S, (long long)H, (long long)K);

    cudaStream_t st = (cudaStream_t)stream;
    if (!use_split(dev, S, H, K)) {
        /* the tensor cores where the operands are bf16 and P(p) is bf16 (reference precision):
         * wgmma at Flash's shape, mma.sync otherwise */
        const bool bf16 = a.round_p && q->dtype == DSRT_BF16 && pool->dtype == DSRT_BF16;
        if (bf16 && D == WGA_D && H % WGA_HEADS == 0 && K > 0 && a.vec_rows && a.vec_q && a.out_bf16 &&
            ((uintptr_t)a.o & 3) == 0 && (int)WGA_SMEM <= optin) {
            a.groups = H / WGA_HEADS;
            if ((rc = dsrtk_allow_shared(dev, (const void *)wga_kernel, WGA_SMEM, "sparse_attention wga_kernel"))) return rc;
            const int64_t sms = dsrtk_multiprocessors(dev), rows = S * a.groups;
            wga_kernel<<<dim3((unsigned)(rows < sms ? rows : sms)), WGA_THREADS, WGA_SMEM, st>>>(a);
            return dsrtk_check_launch("sparse_attention wga_kernel", dev);
        }
        if (bf16 && D % 64 == 0 && D <= 64 * MMA_NT) {
            MmaLayout ml = mma_layout_for(D);
            a.groups = (H + MMA_HEADS - 1) / MMA_HEADS;
            if (ml.total <= (size_t)optin)
                return launch(dev, mma_kernel, "sparse_attention mma_kernel", dim3((unsigned)(S * a.groups)), ml.total, a,
                              ml, st);
            a.groups = (H + HEADS - 1) / HEADS;
        }
        return by_dtypes<Fused>(q->dtype, pool->dtype, dev, (const Args *)&a, (const Layout *)&l, st);
    }

    if (a.vec_rows && a.row4) { /* the cluster path, when a CTA's rows fit its shared memory */
        int launched = 0;
        rc = by_dtypes<Cluster>(q->dtype, pool->dtype, dev, (const Args *)&a, optin, st, &launched);
        if (rc || launched) return rc;
    }
    Workspace w = workspace_for(S, H, D, K);
    if (!workspace || workspace_bytes < w.total)
        return dsrtk_fail(DSRTK_ERROR, "%s: the workspace has %zu bytes, %zu needed (dsrtk_sparse_attention_workspace)", OP,
                          workspace ? workspace_bytes : (size_t)0, w.total);
    char *ws = (char *)workspace;
    a.scores = (float *)(ws + w.scores), a.cmax = (float *)(ws + w.cmax), a.part_acc = (float *)(ws + w.part_acc);
    a.part_m = (float *)(ws + w.part_m), a.part_sum = (float *)(ws + w.part_sum);
    return by_dtypes<Split>(q->dtype, pool->dtype, dev, (const Args *)&a, (const Layout *)&l, st);
}
