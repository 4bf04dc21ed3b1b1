/* test_index_scores.c - the lightning indexer's scores on CUDA (kernels/attention.cu,
 * dsrtk_attn_index_scores) against index_select's arithmetic written out on the host, bit for bit,
 * on each of its kernels: the decode split (few rows), the f16 tensor cores (prefill rows in
 * reference precision) and the FP64 ones (prefill rows in fp32). The inputs are what the layer
 * gives them: FP4 round trips, e2m1 codes times a power of two per block of 32 dimensions, the
 * blocks' powers a few binades apart (the kernels' exactness rests on that, attention.cu), and
 * rows whose every value is subnormal. The model's tests compare whole layers, where a near-tied
 * pick may differ within their tolerance; this one holds the scores themselves. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include "check.h"
#include "kernels.h"
#include "numeric.h"
#include "stream.h"
#include "tensor.h"

enum { DIM = 128, BLOCK = 32 };

static float bf16_round(float v) { return dsrt_bf16_to_f32(dsrt_f32_to_bf16(v)); }

/* n rows of DIM values, an FP4 round trip each block: codes of e2m1 (±0 .. ±6) times 2^e, e drawn
 * from [lo, hi]; tiny rows (every `tiny`-th, when tiny > 0) take 2^-126 for every block, so that
 * codes of 0.5 are subnormal */
static void fp4_rows(float *v, int64_t n, int lo, int hi, int tiny)
{
    static const float e2m1[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    for (int64_t row = 0; row < n; row++)
        for (int b = 0; b < DIM / BLOCK; b++) {
            const int e = tiny > 0 && row % tiny == 0 ? -126 : lo + rand() % (hi - lo + 1);
            const int zero_block = rand() % 16 == 0;
            for (int k = 0; k < BLOCK; k++) {
                const float c = zero_block ? 0.0f : e2m1[rand() % 8];
                v[row * DIM + b * BLOCK + k] = ldexpf(rand() % 2 ? -c : c, e);
            }
        }
}

/* index_select's score of query row i and entry j (attention.c): the dots in double (exact for
 * these inputs), each head's term with the reference's bf16 roundings when ref, summed in head order */
static float host_score(const float *q, const float *keys, const float *w, float scale, int IH, int64_t i, int64_t j, int ref)
{
    double sum = 0;
    for (int h = 0; h < IH; h++) {
        double dot = 0;
        for (int e = 0; e < DIM; e++) dot += (double)q[(i * IH + h) * DIM + e] * (double)keys[j * DIM + e];
        float wh = w[i * IH + h] * scale;
        if (ref) wh = bf16_round(wh);
        float dv = ref ? bf16_round((float)dot) : (float)dot;
        dv = dv > 0 ? dv : 0;
        sum += ref ? (double)bf16_round(dv * wh) : (double)dv * (double)wh;
    }
    return ref ? bf16_round((float)sum) : (float)sum;
}

static dsrt_tensor *upload(const float *v, int64_t n, dsrt_stream *s)
{
    dsrt_tensor *host = dsrt_tensor_new(DSRT_F32, 1, &n, DSRT_CPU, dsrt_stream_default(DSRT_CPU));
    if (!host) return NULL;
    for (int64_t k = 0; k < n; k++) ((float *)host->storage->data)[k] = v[k];
    dsrt_tensor *dev = dsrt_tensor_to(host, 0, DSRT_F32, s, 0);
    dsrt_tensor_release(host);
    return dev;
}

/* one call: S query rows at positions P.., ratio r, IH heads; every visible score compared */
static void check_scores(int64_t S, int64_t P, int64_t r, int IH, int ref, int lo, int hi, int tiny, unsigned seed,
                         dsrt_stream *s)
{
    const int64_t n_max = (P + S) / r;
    float *q = malloc(sizeof(float) * (size_t)(S * IH * DIM)), *keys = malloc(sizeof(float) * (size_t)(n_max * DIM));
    float *w = malloc(sizeof(float) * (size_t)(S * IH));
    REQUIRE(q && keys && w);
    srand(seed);
    fp4_rows(q, S * IH, lo, hi, tiny);
    fp4_rows(keys, n_max, lo, hi, tiny);
    for (int64_t k = 0; k < S * IH; k++) w[k] = (float)(rand() % 2001 - 1000) / 256.0f;
    const float scale = (float)(1.0 / sqrt((double)DIM) / sqrt((double)IH));
    dsrt_tensor *dq = upload(q, S * IH * DIM, s), *dk = upload(keys, n_max * DIM, s), *dw = upload(w, S * IH, s);
    dsrt_tensor *dscores = dsrt_tensor_new(DSRT_F32, 2, (int64_t[]){S, n_max}, 0, s);
    REQUIRE(dq && dk && dw && dscores);
    CHECK(dsrtk_attn_index_scores(0, dscores->storage->data, dq->storage->data, dk->storage->data, dw->storage->data,
                                  scale, S, P, r, IH, DIM, n_max, ref, s->handle) == 0);
    dsrt_tensor *scores = dsrt_tensor_to(dscores, DSRT_CPU, DSRT_F32, s, 0);
    REQUIRE(scores);
    const float *got = scores->storage->data;
    int wrong = 0;
    for (int64_t i = 0; i < S && wrong < 5; i++)
        for (int64_t j = 0; j < (P + i + 1) / r && wrong < 5; j++) {
            const float want = host_score(q, keys, w, scale, IH, i, j, ref);
            const int same = dsrt_f32_bits(got[i * n_max + j]) == dsrt_f32_bits(want);
            wrong += !same;
            CHECKF(same, "S %lld P %lld IH %d ref %d: score [%lld, %lld] is %.9g, not %.9g", (long long)S, (long long)P, IH,
                   ref, (long long)i, (long long)j, got[i * n_max + j], want);
        }
    free(q), free(keys), free(w);
    dsrt_tensor *all[] = {dq, dk, dw, dscores, scores};
    for (size_t k = 0; k < sizeof all / sizeof *all; k++) dsrt_tensor_release(all[k]);
}

GPU_TEST(gpu_indexer_scores_match_index_select)
{
    dsrt_stream *s = dsrt_stream_default(0);
    check_scores(1, 4095, 4, 64, 1, -6, 6, 0, 1, s);      /* decode at 4096: the split kernel */
    check_scores(1, 32767, 4, 64, 1, -6, 6, 0, 7, s);     /* decode at 32768: the f16 tensor cores, a row of 4 */
    check_scores(1, 32767, 4, 64, 0, -6, 6, 0, 8, s);     /* the same in fp32: the split kernel, 4 waves */
    check_scores(2, 1021, 4, 64, 1, -6, 6, 3, 2, s);      /* a verify's rows, subnormal rows too */
    check_scores(201, 3900, 4, 64, 1, -6, 6, 0, 3, s);    /* prefill rows: the f16 tensor cores, 4 a CTA but 1 */
    check_scores(160, 250, 4, 64, 1, -8, 8, 5, 4, s);     /* partial entry blocks, subnormal rows */
    check_scores(98, 3000, 4, 32, 1, -6, 6, 0, 5, s);     /* fewer heads than a CTA's 64; a last CTA of 2 rows */
    check_scores(200, 3900, 4, 64, 0, -6, 6, 0, 6, s);    /* fp32: the FP64 tensor cores */
}
