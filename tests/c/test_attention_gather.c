/* test_attention_gather.c - the attention layer's pool and index lists on CUDA (kernels/attention.cu,
 * dsrtk_attn_gather) against what they stand for: every index list entry of every query names a
 * pool row holding its source row (a fresh row, the window ring's, a compressed entry or an
 * indexer pick), and -1 exactly where nothing is visible. Both layouts of a ratio-4 pool: every
 * compressed entry (a prefill's many queries) and each query's picks (decode, where they are fewer
 * than the entries); the window-only and ratio-128 layers too. With the window ring's writes in the
 * same launch (a decode step's), the ring gets the fresh rows in their slots and keeps the rest, and
 * the launch is refused where a written slot is one the gather reads. The layer tests compare whole
 * outputs; this one holds the rows themselves. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "check.h"
#include "kernels.h"
#include "stream.h"
#include "tensor.h"

/* rows x hd random values on cuda:0 (at least one row: a window-only layer passes no entries) */
static dsrt_tensor *random_rows(int64_t rows, int64_t hd, dsrt_stream *s)
{
    if (rows < 1) rows = 1;
    dsrt_tensor *t = dsrt_tensor_new(DSRT_F32, 2, (int64_t[]){rows, hd}, DSRT_CPU, dsrt_stream_default(DSRT_CPU));
    if (!t) return NULL;
    float *v = t->storage->data;
    for (int64_t i = 0; i < rows * hd; i++) v[i] = (float)(rand() % 20001 - 10000) / 64.0f;
    dsrt_tensor *d = dsrt_tensor_to(t, 0, DSRT_F32, s, 0);
    dsrt_tensor_release(t);
    return d;
}

/* one call: S queries at positions P.., window W in a ring of window_rows, ratio r (4: topk picks
 * each, visible entries at random, -1 past the visible ones and now and then); with_rings: the
 * fresh rows also into the window ring in the same launch */
static void check_gather(int64_t S, int64_t P, int64_t W, int64_t window_rows, int64_t r, int64_t topk, int64_t hd,
                         int with_rings, dsrt_stream *s)
{
    const int64_t base = P - W + 1 > 0 ? P - W + 1 : 0, n_win = P + S - base, n_entries = r > 0 ? (P + S) / r : 0;
    const int64_t K = W + (r == 4 ? topk : n_entries), rows = dsrtk_attn_pool_rows(n_win, S, n_entries, r, topk);
    dsrt_tensor *fresh = random_rows(S, hd, s), *ring = random_rows(window_rows, hd, s), *entries = random_rows(n_entries, hd, s);
    REQUIRE(fresh && ring && entries);
    dsrt_tensor *picks = NULL, *dpicks = NULL;
    if (r == 4) {
        picks = dsrt_tensor_new(DSRT_I32, 2, (int64_t[]){S, topk}, DSRT_CPU, dsrt_stream_default(DSRT_CPU));
        REQUIRE(picks);
        int32_t *p = picks->storage->data;
        for (int64_t i = 0; i < S; i++) {
            const int64_t visible = (P + i + 1) / r;
            for (int64_t m = 0; m < topk; m++) {
                int pk = -1;
                if (m < visible && rand() % 16) pk = rand() % (int)visible;
                p[i * topk + m] = pk;
            }
        }
        REQUIRE((dpicks = dsrt_tensor_to(picks, 0, DSRT_I32, s, 0)));
    }
    dsrt_tensor *pool = dsrt_tensor_new(DSRT_F32, 2, (int64_t[]){rows, hd}, 0, s);
    dsrt_tensor *idx = dsrt_tensor_new(DSRT_I64, 2, (int64_t[]){S, K}, 0, s);
    REQUIRE(pool && idx);
    dsrt_tensor *ring_before = with_rings ? dsrt_tensor_to(ring, DSRT_CPU, DSRT_F32, s, 0) : NULL;
    const dsrtk_ring_write write = {ring->storage->data, fresh->storage->data, window_rows, hd};
    REQUIRE(!with_rings || ring_before);
    CHECK(dsrtk_attn_gather(0, pool->storage->data, idx->storage->data, fresh->storage->data, ring->storage->data, window_rows,
                            r > 0 ? entries->storage->data : NULL, dpicks ? dpicks->storage->data : NULL, base, P, S, n_entries,
                            hd, K, W, r, topk, with_rings ? &write : NULL, with_rings, s->handle) == 0);
    dsrt_tensor *keep[5] = {dsrt_tensor_to(pool, DSRT_CPU, DSRT_F32, s, 0), dsrt_tensor_to(fresh, DSRT_CPU, DSRT_F32, s, 0),
                            dsrt_tensor_to(ring, DSRT_CPU, DSRT_F32, s, 0), dsrt_tensor_to(entries, DSRT_CPU, DSRT_F32, s, 0),
                            dsrt_tensor_to(idx, DSRT_CPU, DSRT_I64, s, 0)};
    REQUIRE(keep[0] && keep[1] && keep[2] && keep[3] && keep[4]);
    const float *hp = keep[0]->storage->data, *hf = keep[1]->storage->data, *hr = keep[2]->storage->data;
    const float *he = keep[3]->storage->data;
    const int64_t *hi = keep[4]->storage->data;
    const int32_t *hk = picks ? picks->storage->data : NULL;
    int wrong = 0;
    for (int64_t i = 0; i < S && wrong < 5; i++) {
        const int64_t t = P + i, lo = t - W + 1 > 0 ? t - W + 1 : 0;
        for (int64_t m = 0; m < K && wrong < 5; m++) {
            const float *want = NULL; /* the source row, NULL: nothing visible */
            if (m < W) {
                const int64_t p = lo + m;
                if (p <= t) want = p >= P ? hf + (p - P) * hd : hr + (p % window_rows) * hd;
            } else if (r == 4) {
                const int pk = hk[i * topk + (m - W)];
                if (pk >= 0) want = he + (int64_t)pk * hd;
            } else if (m - W < (t + 1) / r) {
                want = he + (m - W) * hd;
            }
            const int64_t got = hi[i * K + m];
            const int ok = want ? got >= 0 && got < rows && memcmp(hp + got * hd, want, sizeof(float) * (size_t)hd) == 0
                                : got == -1;
            if (!ok) wrong++;
            CHECKF(ok, "S %lld P %lld W %lld r %lld topk %lld: query %lld entry %lld names pool row %lld (of %lld), %s",
                   (long long)S, (long long)P, (long long)W, (long long)r, (long long)topk, (long long)i, (long long)m,
                   (long long)got, (long long)rows, want ? "not its row" : "where nothing is visible");
        }
    }
    if (with_rings) { /* slot (P + i) mod rows: fresh row i; the others as they were */
        const float *before = ring_before->storage->data;
        for (int64_t j = 0; j < window_rows; j++) {
            const int64_t i = ((j - P) % window_rows + window_rows) % window_rows;
            const float *want = i < S ? hf + i * hd : before + j * hd;
            CHECKF(memcmp(hr + j * hd, want, sizeof(float) * (size_t)hd) == 0, "S %lld P %lld: ring row %lld is not %s",
                   (long long)S, (long long)P, (long long)j, i < S ? "the fresh row written there" : "as it was");
        }
    }
    dsrt_tensor *all[] = {fresh, ring, entries, picks, dpicks, pool, idx, keep[0], keep[1], keep[2], keep[3], keep[4], ring_before};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++)
        if (all[i]) dsrt_tensor_release(all[i]);
}

GPU_TEST(gpu_attention_pool_rows_hold_what_the_index_lists_name)
{
    srand(5);
    dsrt_stream *s = dsrt_stream_default(0);
    /* ratio 4, decode: 1024 entries, 512 picks: the pool holds the picks */
    CHECK(dsrtk_attn_pool_rows(128, 1, 1024, 4, 512) == 128 + 512);
    check_gather(1, 4095, 128, 128, 4, 512, 72, 0, s);
    check_gather(3, 300, 128, 134, 4, 16, 40, 0, s);   /* a verify's 3 queries: 48 picks of 75 entries */
    check_gather(2, 9, 8, 12, 4, 4, 24, 0, s);         /* 2 entries visible: picks -1 past them, all entries */
    check_gather(40, 200, 128, 128, 4, 16, 24, 0, s);  /* a chunk: 640 picks, 60 entries: every entry */
    check_gather(1, 4095, 128, 128, 128, 0, 72, 0, s); /* ratio 128: every visible entry */
    check_gather(5, 3, 128, 128, 0, 0, 16, 0, s);      /* window only, the ring not yet full */
    /* the window ring's writes in the launch: decode, a verify's 3 rows in a ring with slack, the
     * ring not yet full */
    check_gather(1, 4095, 128, 128, 4, 512, 72, 1, s);
    check_gather(3, 300, 128, 134, 4, 16, 40, 1, s);
    check_gather(5, 3, 128, 132, 0, 0, 16, 1, s);
}

GPU_TEST(gpu_attention_gather_refuses_ring_writes_into_slots_it_reads)
{
    dsrt_stream *s = dsrt_stream_default(0);
    dsrt_tensor *pool = dsrt_tensor_new(DSRT_F32, 2, (int64_t[]){256, 16}, 0, s), *idx = dsrt_tensor_new(DSRT_I64, 2, (int64_t[]){3, 128}, 0, s);
    dsrt_tensor *fresh = random_rows(3, 16, s), *ring = random_rows(128, 16, s);
    REQUIRE(pool && idx && fresh && ring);
    /* 3 queries at 300 in a ring of exactly the window: position 302's slot holds 174, which query 0 reads */
    const dsrtk_ring_write write = {ring->storage->data, fresh->storage->data, 128, 16};
    CHECK(dsrtk_attn_gather(0, pool->storage->data, idx->storage->data, fresh->storage->data, ring->storage->data, 128, NULL,
                            NULL, 300 - 127, 300, 3, 0, 16, 128, 128, 0, 0, &write, 1, s->handle) != 0);
    CHECK(strstr(dsrtk_error(), "reads their slots") != NULL);
    dsrt_tensor *all[] = {pool, idx, fresh, ring};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) dsrt_tensor_release(all[i]);
}
