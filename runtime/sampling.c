/*
 * sampling.c - the CPU sampler (sampling.h says what it computes).
 *
 * What it protects: the same seed, step and logits give the same id everywhere, so the candidate
 * order is total (logit, then id) and the draw is the counter-based Philox of numeric.h.
 */
#include "sampling.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "err.h"
#include "numeric.h"

dsrt_sample_params dsrt_sample_params_default(void)
{
    dsrt_sample_params p = {0.0f, 0, 1.0f, 0.0f, 1.0f, 0.0f};
    return p;
}

int dsrt_sample_params_check(const dsrt_sample_params *p, int64_t row)
{
    char where[48] = "";
    if (row >= 0) snprintf(where, sizeof where, " (row %lld)", (long long)row + 1);
    if (!(p->temperature >= 0.0f) || !isfinite(p->temperature))
        return dsrt_err("sample: temperature must be a finite number >= 0, got %g%s", p->temperature, where);
    if (p->top_k < 0) return dsrt_err("sample: top_k must be >= 0 (0 = off), got %lld%s", (long long)p->top_k, where);
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f))
        return dsrt_err("sample: top_p must be in (0, 1], got %g%s", p->top_p, where);
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f))
        return dsrt_err("sample: min_p must be in [0, 1], got %g%s", p->min_p, where);
    if (!(p->repetition_penalty > 0.0f) || !isfinite(p->repetition_penalty))
        return dsrt_err("sample: repetition_penalty must be a finite number > 0, got %g%s", p->repetition_penalty,
                        where);
    if (!isfinite(p->presence_penalty))
        return dsrt_err("sample: presence_penalty must be a finite number, got %g%s", p->presence_penalty, where);
    return 0;
}

typedef struct { float x; int64_t id; } cand;

static int cand_cmp(const void *a, const void *b)
{
    const cand *p = a, *q = b;
    if (p->x > q->x) return -1;
    if (p->x < q->x) return 1;
    return (p->id > q->id) - (p->id < q->id);
}

/* one row; x is a writable copy of the logits, seen a zeroed byte per id, c room for V candidates */
static int sample_row(float *x, int64_t V, const dsrt_sample_params *p, const int64_t *hist, int64_t nhist,
                      unsigned char *seen, cand *c, float u, int64_t row, int64_t *out)
{
    for (int64_t i = 0; i < V; i++)
        if (isnan(x[i])) return dsrt_err("sample: row %lld has a NaN logit (id %lld)", (long long)row + 1, (long long)i);
    for (int64_t j = 0; j < nhist; j++) {
        int64_t id = hist[j];
        if (id < 0 || id >= V)
            return dsrt_err("sample: history id %lld of row %lld is outside the vocabulary [0, %lld)", (long long)id,
                            (long long)row + 1, (long long)V);
    }
    if (p->repetition_penalty != 1.0f || p->presence_penalty != 0.0f) {
        for (int64_t j = 0; j < nhist; j++) {
            int64_t id = hist[j];
            if (seen[id]) continue;
            seen[id] = 1;
            float v = x[id];
            v = v > 0.0f ? v / p->repetition_penalty : v * p->repetition_penalty;
            x[id] = v - p->presence_penalty;
        }
        for (int64_t j = 0; j < nhist; j++) seen[hist[j]] = 0;
    }
    int64_t best = 0;
    for (int64_t i = 1; i < V; i++)
        if (x[i] > x[best]) best = i;
    if (x[best] == -INFINITY) return dsrt_err("sample: row %lld has no finite logit", (long long)row + 1);
    if (p->temperature == 0.0f) { *out = best; return 0; }

    double xmax = x[best], inv_t = 1.0 / p->temperature;
    int64_t n = V;
    for (int64_t i = 0; i < V; i++) { c[i].x = x[i]; c[i].id = i; }
    qsort(c, (size_t)V, sizeof *c, cand_cmp);
    if (p->top_k > 0 && p->top_k < n) n = p->top_k;
    /* +inf logits: treat them as the only candidates, equally likely */
    if (isinf(xmax)) {
        int64_t m = 0;
        while (m < n && c[m].x == INFINITY) m++;
        *out = c[(int64_t)((double)u * m)].id;
        return 0;
    }
    double *pr = malloc((size_t)n * sizeof *pr);
    if (!pr) return dsrt_err("sample: out of memory");
    double z = 0.0;
    for (int64_t i = 0; i < n; i++) { pr[i] = exp(((double)c[i].x - xmax) * inv_t); z += pr[i]; }
    if (p->top_p < 1.0f) {
        double target = (double)p->top_p * z, cum = 0.0;
        int64_t m = 0;
        while (m < n) { cum += pr[m++]; if (cum >= target) break; }
        n = m > 0 ? m : 1;
    }
    if (p->min_p > 0.0f) {
        double floor_p = (double)p->min_p * pr[0]; /* pr[0] is the largest */
        int64_t m = 1;
        while (m < n && pr[m] >= floor_p) m++;
        n = m;
    }
    z = 0.0;
    for (int64_t i = 0; i < n; i++) z += pr[i];
    double target = (double)u * z, cum = 0.0;
    int64_t pick = 0;
    for (int64_t i = 0; i < n; i++) {
        cum += pr[i];
        if (cum > target) { pick = i; break; }
        if (pr[i] > 0.0) pick = i; /* rounding: the last nonzero candidate */
    }
    free(pr);
    *out = c[pick].id;
    return 0;
}

int dsrt_sample_cpu(const float *logits, int64_t B, int64_t V, const dsrt_sample_params *params,
                    const int64_t *hist_off, const int64_t *hist_ids, uint64_t seed, uint64_t step, int64_t *out)
{
    if (B < 1 || V < 1) return dsrt_err("sample: logits must have at least one row and one column");
    for (int64_t r = 0; r < B; r++)
        if (dsrt_sample_params_check(&params[r], B > 1 ? r : -1)) return -1;
    float *x = malloc((size_t)V * sizeof *x);
    unsigned char *seen = calloc((size_t)V, 1);
    cand *c = malloc((size_t)V * sizeof *c);
    int rc = 0;
    if (!x || !seen || !c) rc = dsrt_err("sample: out of memory for a row of %lld logits", (long long)V);
    for (int64_t r = 0; r < B && rc == 0; r++) {
        memcpy(x, logits + r * V, (size_t)V * sizeof *x);
        int64_t h0 = hist_off ? hist_off[r] : 0, h1 = hist_off ? hist_off[r + 1] : 0;
        float u = dsrt_rand_uniform(seed, step * (uint64_t)B + (uint64_t)r);
        rc = sample_row(x, V, &params[r], hist_ids + h0, h1 - h0, seen, c, u, r, &out[r]);
    }
    free(x);
    free(seen);
    free(c);
    return rc;
}

dsrt_tensor *dsrt_sample(dsrt_tensor *logits, const dsrt_sample_params *params, const int64_t *hist_off,
                         const int64_t *hist_ids, uint64_t seed, uint64_t step, dsrt_stream *stream)
{
    if (logits->dtype != DSRT_F32 || (logits->ndim != 1 && logits->ndim != 2)) {
        char buf[128];
        dsrt_err("sample: logits must be f32 [B, V] or [V], got %s", dsrt_tensor_str(logits, buf, sizeof buf));
        return NULL;
    }
    if (logits->device != DSRT_CPU) {
        dsrt_err("sample: logits on a CUDA device are not supported yet (the CUDA sampler comes with the CUDA backend)");
        return NULL;
    }
    int64_t B = logits->ndim == 2 ? logits->shape[0] : 1, V = logits->shape[logits->ndim - 1];
    dsrt_tensor *c = dsrt_tensor_contiguous(logits, stream);
    if (!c) return NULL;
    if (dsrt_stream_synchronize(stream)) { dsrt_tensor_release(c); return NULL; }
    int64_t shape[1] = {B};
    dsrt_tensor *out = dsrt_tensor_new(DSRT_I64, 1, shape, DSRT_CPU, stream);
    if (out && dsrt_sample_cpu((const float *)c->storage->data + c->offset, B, V, params, hist_off, hist_ids, seed,
                               step, (int64_t *)out->storage->data + out->offset)) {
        dsrt_tensor_release(out);
        out = NULL;
    }
    dsrt_tensor_release(c);
    return out;
}
