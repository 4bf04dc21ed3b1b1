/* test_attention_topk.c - the indexer's top-k on CUDA (kernels/attention.cu, dsrtk_attn_topk)
 * against a sort on the host: every row's picks, in order, on its three paths (the rank count of
 * up to 2048 visible entries; the shared-memory bitonic sort of up to 4096, padded to a power of
 * two; the radix select beyond), with tied scores, signed zeros, and more picks asked for than a
 * row can see. The model's tests compare whole layers, where a near-tied pick may differ within
 * their tolerance; this one holds the order itself. */
#include <stdint.h>
#include <stdlib.h>
#include "check.h"
#include "kernels.h"
#include "stream.h"
#include "tensor.h"

/* the CPU's order (index_select): descending score, ties to the lower entry; -0 equals +0 */
static const float *order_of;
static int by_score(const void *a, const void *b)
{
    const int i = *(const int *)a, j = *(const int *)b;
    const float x = order_of[i], y = order_of[j];
    if (x != y) return x > y ? -1 : 1;
    return (i > j) - (i < j);
}

/* one call: S query rows at positions P.., ratio r, topk picks each, compared pick by pick; the
 * scores take `values` distinct values (one: every key differs in its entry alone) */
static void check_topk(int64_t S, int64_t P, int64_t r, int64_t topk, unsigned seed, int values, dsrt_stream *s)
{
    const int64_t n_max = (P + S) / r > 0 ? (P + S) / r : 1;
    dsrt_tensor *scores = dsrt_tensor_new(DSRT_F32, 2, (int64_t[]){S, n_max}, DSRT_CPU, dsrt_stream_default(DSRT_CPU));
    REQUIRE(scores);
    float *v = scores->storage->data;
    srand(seed);
    for (int64_t i = 0; i < S * n_max; i++) { /* few distinct values: many ties; some -0 */
        const int q = rand() % values - values / 2;
        v[i] = q == 0 && rand() % 2 ? -0.0f : 0.25f * (float)q;
    }
    dsrt_tensor *dscores = dsrt_tensor_to(scores, 0, DSRT_F32, s, 0);
    dsrt_tensor *dpicks = dsrt_tensor_new(DSRT_I32, 2, (int64_t[]){S, topk}, 0, s);
    REQUIRE(dscores && dpicks);
    CHECK(dsrtk_attn_topk(0, dpicks->storage->data, dscores->storage->data, S, P, r, topk, n_max, s->handle) == 0);
    dsrt_tensor *picks = dsrt_tensor_to(dpicks, DSRT_CPU, DSRT_I32, s, 0);
    int *order = malloc(sizeof(int) * (size_t)n_max);
    REQUIRE(picks && order);
    const int32_t *got = picks->storage->data;
    int wrong = 0;
    for (int64_t i = 0; i < S; i++) {
        const int64_t visible = (P + i + 1) / r, k = visible < topk ? visible : topk;
        for (int64_t j = 0; j < visible; j++) order[j] = (int)j;
        order_of = v + i * n_max;
        qsort(order, (size_t)visible, sizeof *order, by_score);
        for (int64_t m = 0; m < topk && wrong < 5; m++) {
            const int want = m < k ? order[m] : -1;
            if (got[i * topk + m] != want) wrong++;
            CHECKF(got[i * topk + m] == want, "S %lld P %lld r %lld topk %lld: row %lld pick %lld is %d, not %d", (long long)S,
                   (long long)P, (long long)r, (long long)topk, (long long)i, (long long)m, got[i * topk + m], want);
        }
    }
    free(order);
    dsrt_tensor *all[] = {scores, dscores, dpicks, picks};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) dsrt_tensor_release(all[i]);
}

GPU_TEST(gpu_indexer_topk_matches_a_host_sort)
{
    dsrt_stream *s = dsrt_stream_default(0);
    check_topk(1, 4095, 4, 512, 1, 48, s);  /* decode at 4096: 1024 visible, no padding */
    check_topk(3, 3997, 4, 512, 2, 48, s);  /* 999-1000 visible: padded */
    check_topk(1, 4100, 4, 512, 3, 48, s);  /* 1025 */
    check_topk(2, 8190, 4, 512, 9, 48, s);  /* 2047 and 2048: the most the rank kernel takes */
    check_topk(1, 8196, 4, 512, 10, 48, s); /* 2049: the sort, padded to 4096 */
    check_topk(2, 16380, 4, 512, 8, 48, s); /* 4095 and 4096: the largest sort */
    check_topk(2, 20000, 4, 512, 4, 48, s); /* 5000: the radix select */
    check_topk(1, 32767, 4, 512, 11, 1 << 20, s); /* decode at 32768: 8192 nearly distinct scores */
    check_topk(1, 262143, 4, 512, 12, 48, s);     /* 65536 visible, ~1400 a score */
    check_topk(1, 20000, 4, 512, 13, 1, s);       /* one score: the entries alone order the keys */
    check_topk(2, 20000, 4, 4096, 14, 3, s);      /* 4096 picks of 5000 in 3 scores */
    check_topk(5, 0, 1, 64, 5, 48, s);      /* 1 .. 5 visible: the rest -1 */
    check_topk(4, 37, 2, 2048, 6, 48, s);   /* 2048 picks asked of 19-20 entries: the rest -1 */
    check_topk(300, 3000, 4, 64, 7, 48, s); /* a prefill's rows, 750 .. 825 visible */
}
