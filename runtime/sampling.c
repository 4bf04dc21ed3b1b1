/*
 * sampling.c - the CPU sampler, and the host side of the CUDA one (sampling.h says what both
 * compute; kernels/sampling.cu holds the kernels).
 *
 * What it protects: the same seed, step and logits give the same id everywhere, so the candidate
 * order is total (logit, then id), the draw is the counter-based Philox of numeric.h, p_i comes
 * from sampling.h's own exp (libm's and CUDA's disagree in the last bit now and then) and every
 * sum is added in candidate order. This file is the readable reference of the CUDA kernels.
 *
 * On CUDA the logits stay on the device: the row parameters and histories (small, host arrays)
 * go up with the call, and only B ids and B status words come back, in one copy that also waits
 * for the kernels, so a NaN row is reported here as on the CPU; a draw read later
 * (dsrt_sample_async) has its kernels read the parameters from pinned memory and write the ids
 * there, so that nothing is copied between a decode step's kernels.
 */
#include "sampling.h"
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "err.h"
#include "kernels.h"
#include "numeric.h"

_Static_assert(sizeof(((dsrtk_verify_drafts *)0)->id) == DSRT_VERIFY_MAX_K * sizeof(int64_t),
               "the CUDA verification takes DSRT_VERIFY_MAX_K draft ids by value");

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

/* The processed distribution of one row (sampling.h steps 1–4), which both the draw and
 * dsrt_sample_probs read, so the two can never disagree. x is a writable copy of the logits, seen a
 * zeroed byte per id, c room for V candidates. */
enum { ROW_GREEDY, ROW_INF, ROW_WEIGHTS };
typedef struct {
    int kind;
    int64_t best; /* ROW_GREEDY: the argmax */
    int64_t n;    /* ROW_INF: c[0..n) are the +inf candidates; ROW_WEIGHTS: c[0..n) are kept */
    double *pr;   /* ROW_WEIGHTS: their p (malloc'd with cum, the caller frees pr) */
    double *cum;  /* their cumulative sums (sampling.h) */
    double z;     /* P(n - 1) */
} row_dist;

/* The cumulative sums of sampling.h over p[0..n): cum[i] = S_b + L_i, L_i chunk b's p summed in
 * order from its first candidate, S_b the totals of the chunks before b summed in chunk order;
 * chunks of dsrt_draw_chunk(V) candidates, as the CUDA kernel gives one thread each. */
static void chunked_sums(const double *p, int64_t n, int64_t V, double *cum)
{
    const int64_t C = dsrt_draw_chunk(V);
    double before = 0.0;
    for (int64_t first = 0; first < n; first += C) {
        const int64_t end = first + C < n ? first + C : n;
        double L = 0.0;
        for (int64_t i = first; i < end; i++) {
            L += p[i];
            cum[i] = before + L;
        }
        before += L;
    }
}

static int process_row(float *x, int64_t V, const dsrt_sample_params *p, const int64_t *hist, int64_t nhist,
                       unsigned char *seen, cand *c, int64_t row, row_dist *d)
{
    d->pr = NULL;
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
    if (p->temperature == 0.0f) { d->kind = ROW_GREEDY; d->best = best; return 0; }

    double xmax = x[best], inv_t = 1.0 / p->temperature;
    int64_t n = V;
    for (int64_t i = 0; i < V; i++) { c[i].x = x[i]; c[i].id = i; }
    qsort(c, (size_t)V, sizeof *c, cand_cmp);
    if (p->top_k > 0 && p->top_k < n) n = p->top_k;
    /* +inf logits: treat them as the only candidates, equally likely */
    if (isinf(xmax)) {
        int64_t m = 0;
        while (m < n && c[m].x == INFINITY) m++;
        d->kind = ROW_INF;
        d->n = m;
        return 0;
    }
    double *pr = malloc(2 * (size_t)n * sizeof *pr), *cum = pr + n;
    if (!pr) return dsrt_err("sample: out of memory");
    for (int64_t i = 0; i < n; i++) pr[i] = dsrt_sample_exp(((double)c[i].x - xmax) * inv_t);
    chunked_sums(pr, n, V, cum);
    if (p->top_p < 1.0f) {
        double target = (double)p->top_p * cum[n - 1];
        int64_t m = 0;
        while (m < n && !(cum[m] >= target)) m++;
        n = m < n ? m + 1 : n;
    }
    if (p->min_p > 0.0f) {
        double floor_p = (double)p->min_p * pr[0]; /* pr[0] is the largest */
        int64_t m = 1;
        while (m < n && pr[m] >= floor_p) m++;
        n = m;
    }
    d->kind = ROW_WEIGHTS;
    d->n = n;
    d->pr = pr;
    d->cum = cum;
    d->z = cum[n - 1];
    return 0;
}

/* one row's draw (sampling.h step 5) */
static int sample_row(float *x, int64_t V, const dsrt_sample_params *p, const int64_t *hist, int64_t nhist,
                      unsigned char *seen, cand *c, float u, int64_t row, int64_t *out)
{
    row_dist d;
    if (process_row(x, V, p, hist, nhist, seen, c, row, &d)) return -1;
    if (d.kind == ROW_GREEDY) { *out = d.best; return 0; }
    if (d.kind == ROW_INF) { *out = c[(int64_t)((double)u * d.n)].id; return 0; }
    double target = (double)u * d.z;
    int64_t pick = 0;
    for (int64_t i = 0; i < d.n; i++) {
        if (d.cum[i] > target) { pick = i; break; }
        if (d.pr[i] > 0.0) pick = i; /* rounding: the last nonzero candidate */
    }
    free(d.pr);
    *out = c[pick].id;
    return 0;
}

/* one row's processed distribution into out[V] (zeroed here) */
static int probs_row(float *x, int64_t V, const dsrt_sample_params *p, const int64_t *hist, int64_t nhist,
                     unsigned char *seen, cand *c, int64_t row, float *out)
{
    row_dist d;
    if (process_row(x, V, p, hist, nhist, seen, c, row, &d)) return -1;
    memset(out, 0, (size_t)V * sizeof *out);
    if (d.kind == ROW_GREEDY) {
        out[d.best] = 1.0f;
    } else if (d.kind == ROW_INF) {
        for (int64_t i = 0; i < d.n; i++) out[c[i].id] = (float)(1.0 / (double)d.n);
    } else {
        for (int64_t i = 0; i < d.n; i++) out[c[i].id] = (float)(d.pr[i] / d.z);
        free(d.pr);
    }
    return 0;
}

/* The per-row work of both CPU entry points: the checks, one row's scratch (a writable copy of the
 * logits, a seen byte per id, V candidates), and the row's history; `row` does the rest. */
typedef int (*row_fn)(float *x, int64_t V, const dsrt_sample_params *p, const int64_t *hist, int64_t nhist,
                      unsigned char *seen, cand *c, int64_t r, void *ctx);

static int each_row(const char *op, const float *logits, int64_t B, int64_t V, const dsrt_sample_params *params,
                    const int64_t *hist_off, const int64_t *hist_ids, row_fn row, void *ctx)
{
    if (B < 1 || V < 1) return dsrt_err("%s: logits must have at least one row and one column", op);
    for (int64_t r = 0; r < B; r++)
        if (dsrt_sample_params_check(&params[r], B > 1 ? r : -1)) return -1;
    float *x = malloc((size_t)V * sizeof *x);
    unsigned char *seen = calloc((size_t)V, 1);
    cand *c = malloc((size_t)V * sizeof *c);
    int rc = 0;
    if (!x || !seen || !c) rc = dsrt_err("%s: out of memory for a row of %lld logits", op, (long long)V);
    for (int64_t r = 0; r < B && rc == 0; r++) {
        memcpy(x, logits + r * V, (size_t)V * sizeof *x);
        int64_t h0 = hist_off ? hist_off[r] : 0, h1 = hist_off ? hist_off[r + 1] : 0;
        rc = row(x, V, &params[r], hist_ids + h0, h1 - h0, seen, c, r, ctx);
    }
    free(x);
    free(seen);
    free(c);
    return rc;
}

typedef struct { int64_t B; uint64_t seed, step; int64_t *out; } draw_ctx;

static int draw_row(float *x, int64_t V, const dsrt_sample_params *p, const int64_t *hist, int64_t nhist,
                    unsigned char *seen, cand *c, int64_t r, void *ctx)
{
    const draw_ctx *d = ctx;
    float u = dsrt_rand_uniform(d->seed, d->step * (uint64_t)d->B + (uint64_t)r);
    return sample_row(x, V, p, hist, nhist, seen, c, u, r, &d->out[r]);
}

int dsrt_sample_cpu(const float *logits, int64_t B, int64_t V, const dsrt_sample_params *params,
                    const int64_t *hist_off, const int64_t *hist_ids, uint64_t seed, uint64_t step, int64_t *out)
{
    draw_ctx d = {B, seed, step, out};
    return each_row("sample", logits, B, V, params, hist_off, hist_ids, draw_row, &d);
}

static int probs_of_row(float *x, int64_t V, const dsrt_sample_params *p, const int64_t *hist, int64_t nhist,
                        unsigned char *seen, cand *c, int64_t r, void *ctx)
{
    return probs_row(x, V, p, hist, nhist, seen, c, r, (float *)ctx + r * V);
}

int dsrt_sample_probs_cpu(const float *logits, int64_t B, int64_t V, const dsrt_sample_params *params,
                          const int64_t *hist_off, const int64_t *hist_ids, float *out)
{
    return each_row("sample_probs", logits, B, V, params, hist_off, hist_ids, probs_of_row, out);
}

/* ---- speculative verification (sampling.h), the readable reference of sample_verify_kernel ---- */

/* the weighted draw of sampling.h (dsrt_draw_weight), in its fixed order */
static int64_t draw_weights(const float *p, const float *q, int64_t q_id, int64_t V, float u)
{
    const int64_t C = dsrt_draw_chunk(V), nchunks = (V + C - 1) / C;
    double sums[DSRT_DRAW_MAX_CHUNKS];
    int use_p = 0;
    double Z = 0.0;
    for (int pass = 0; pass < 2; pass++) {
        Z = 0.0;
        for (int64_t ch = 0; ch < nchunks; ch++) {
            double s = 0.0;
            for (int64_t i = ch * C; i < V && i < (ch + 1) * C; i++) s += dsrt_draw_weight(p, q, q_id, use_p, i);
            sums[ch] = s;
        }
        for (int64_t ch = 0; ch < nchunks; ch++) Z += sums[ch];
        if (Z > 0.0) break;
        use_p = 1; /* p <= q everywhere (p == q up to rounding): the residual is empty, draw from p */
    }
    const double target = (double)u * Z;
    double cum = 0.0;
    int64_t ch = 0;
    while (ch < nchunks && !(cum + sums[ch] > target)) cum += sums[ch++];
    int64_t lo = 0, hi = V; /* where the rounding fallback looks */
    if (ch < nchunks) {
        lo = ch * C;
        hi = lo + C < V ? lo + C : V;
        for (int64_t i = lo; i < hi; i++) {
            cum += dsrt_draw_weight(p, q, q_id, use_p, i);
            if (cum > target) return i;
        }
    }
    for (int64_t i = hi - 1; i >= lo; i--)
        if (dsrt_draw_weight(p, q, q_id, use_p, i) > 0.0f) return i;
    return 0; /* unreachable: Z > 0 has a positive weight */
}

int dsrt_sample_verify_cpu(const float *p, const float *q, int64_t k, int64_t V, const int64_t *drafts, uint64_t seed,
                           uint64_t step, int64_t *accepted, int64_t *next_id)
{
    int64_t a = 0;
    for (; a < k; a++) {
        const int64_t d = drafts[a];
        const float pd = p[a * V + d], qd = q ? q[a * V + d] : 1.0f;
        const float u = dsrt_rand_uniform(seed, 2 * (step + (uint64_t)a));
        if (!((double)u * (double)qd < (double)pd)) break;
    }
    const float u = dsrt_rand_uniform(seed, 2 * (step + (uint64_t)a) + 1);
    const float *qrow = a < k && q ? q + a * V : NULL;
    const int64_t q_id = a < k && !q ? drafts[a] : -1;
    *accepted = a;
    *next_id = draw_weights(p + a * V, qrow, q_id, V, u);
    return 0;
}

/* the CPU form over tensors: waits for the stream that produced p and q first */
static int dsrt_sample_verify_cpu_checked(const float *p, const float *q, int64_t k, int64_t V, const int64_t *drafts,
                                          uint64_t seed, uint64_t step, dsrt_stream *stream, int64_t *accepted,
                                          int64_t *next_id)
{
    if (dsrt_stream_synchronize(stream)) return -1;
    return dsrt_sample_verify_cpu(p, q, k, V, drafts, seed, step, accepted, next_id);
}

/* ---- the CUDA path ---- */

/* A draw read later (dsrt_sample_async): on CUDA it owns pinned host memory, where its kernels read
 * the row parameters and write the ids, and an event recorded after those kernels. */
struct dsrt_sample_pending {
    int device;
    int64_t B, V;
    int64_t *words;  /* [2B]: the ids, then the status words (kernels.h); on CUDA the kernels' rows
                      * and history ids follow, read by them where they lie */
    size_t capacity; /* bytes at words */
    void *event;     /* recorded after the draw's last kernel */
};

static int kernel_failed(void)
{
    const char *msg = dsrtk_error();
    if (!strncmp(msg, "sample", 6)) return dsrt_err("%s", msg); /* sample:, sample_probs:, sample_verify: */
    return dsrt_err("sample: %s", msg);
}

/* Row r's status word (kernels.h) as the sampler's error, or 0 */
static int check_status(int64_t status, int64_t id, int64_t r, int64_t V)
{
    if (status == DSRTK_SAMPLE_NAN) return dsrt_err("sample: row %lld has a NaN logit (id %lld)", (long long)r + 1, (long long)id);
    if (status == DSRTK_SAMPLE_NO_FINITE) return dsrt_err("sample: row %lld has no finite logit", (long long)r + 1);
    if (status != DSRTK_SAMPLE_OK || id < 0 || id >= V)
        return dsrt_err("sample: the CUDA sampler returned status %lld and id %lld for row %lld (a bug)", (long long)status,
                        (long long)id, (long long)r + 1);
    return 0;
}

/* c: contiguous f32 logits [B, V] on a CUDA device (the stream's). Writes the ids to host `ids`
 * and, when `dev_out` is given, returns them as a device tensor there too. With `probs` (a
 * contiguous f32 [B, V] on the device) it writes the processed distributions there instead
 * (dsrt_sample_probs): the same kernels, ending before the draw. With `pending` nothing is copied
 * and nothing waits: the kernels read the rows and history from its pinned memory and write the
 * ids and status words there too (copies would each queue a copy engine's few microseconds between
 * a decode step's kernels), and its event follows them. */
static int sample_cuda(dsrt_tensor *c, int64_t B, int64_t V, const dsrt_sample_params *params,
                       const int64_t *hist_off, const int64_t *hist_ids, uint64_t seed, uint64_t step,
                       dsrt_stream *stream, int64_t *ids, dsrt_tensor **dev_out, dsrt_tensor *probs,
                       dsrt_sample_pending *pending)
{
    int dev = c->device;
    int sorting = 0, penalties = 0;
    int64_t nhist = hist_off ? hist_off[B] - hist_off[0] : 0, max_hist = 0;
    for (int64_t r = 0; r < B; r++) {
        if (dsrt_sample_params_check(&params[r], B > 1 ? r : -1)) return -1;
        int64_t h0 = hist_off ? hist_off[r] : 0, h1 = hist_off ? hist_off[r + 1] : 0;
        if (h1 < h0) return dsrt_err("sample: the history offsets of row %lld decrease", (long long)r + 1);
        for (int64_t j = h0; j < h1; j++)
            if (hist_ids[j] < 0 || hist_ids[j] >= V)
                return dsrt_err("sample: history id %lld of row %lld is outside the vocabulary [0, %lld)",
                                (long long)hist_ids[j], (long long)r + 1, (long long)V);
        if (params[r].temperature > 0.0f) sorting = 1;
        if ((params[r].repetition_penalty != 1.0f || params[r].presence_penalty != 0.0f) && h1 > h0) penalties = 1;
        if (h1 - h0 > max_hist) max_hist = h1 - h0;
    }
    size_t wbytes = 0;
    if (dsrtk_sample_workspace(dev, B, V, sorting, penalties, &wbytes)) return kernel_failed();

    /* the upload: B rows, then the history ids (rebased to 0); a pending draw's lie in its pinned
     * memory after its words */
    size_t rows_bytes = (size_t)B * sizeof(dsrtk_sample_row), up_bytes = rows_bytes + (size_t)nhist * sizeof(int64_t);
    unsigned char *up = pending ? (unsigned char *)(pending->words + 2 * B) : malloc(up_bytes);
    int64_t *back = pending ? NULL : malloc((size_t)(2 * B) * sizeof *back); /* a pending draw's are its words */
    dsrt_storage *up_dev = NULL, *work = NULL;
    dsrt_tensor *out = NULL;
    int rc = 0;
    if (!up || (!pending && !back)) { rc = dsrt_err("sample: out of host memory for %lld rows", (long long)B); goto done; }
    if (pending && pending->capacity < (size_t)(2 * B) * sizeof *back + up_bytes) {
        rc = dsrt_err("sample: a pending draw of %zu bytes for %zu (a bug)", pending->capacity,
                      (size_t)(2 * B) * sizeof *back + up_bytes);
        goto done;
    }
    for (int64_t r = 0; r < B; r++) {
        dsrtk_sample_row row;
        memset(&row, 0, sizeof row);
        row.temperature = params[r].temperature;
        row.top_p = params[r].top_p;
        row.min_p = params[r].min_p;
        row.repetition_penalty = params[r].repetition_penalty;
        row.presence_penalty = params[r].presence_penalty;
        row.top_k = params[r].top_k;
        row.hist_begin = hist_off ? hist_off[r] - hist_off[0] : 0;
        row.hist_end = hist_off ? hist_off[r + 1] - hist_off[0] : 0;
        memcpy(up + (size_t)r * sizeof row, &row, sizeof row);
    }
    if (nhist > 0) memcpy(up + rows_bytes, hist_ids + hist_off[0], (size_t)nhist * sizeof(int64_t));
    int64_t shape[1] = {2 * B};
    if ((!pending && !(up_dev = dsrt_storage_new(dev, up_bytes, stream))) ||
        (wbytes > 0 && !(work = dsrt_storage_new(dev, wbytes, stream))) ||
        !(out = dsrt_tensor_new(DSRT_I64, 1, shape, dev, stream)) || dsrt_storage_use(c->storage, stream)) {
        rc = -1;
        goto done;
    }
    /* pageable source: the copy has consumed it when the call returns (and `up` lives to the end) */
    if (!pending && dsrtk_memcpy(dev, up_dev->data, up, up_bytes, DSRTK_H2D, stream->handle, 1)) {
        rc = kernel_failed();
        goto done;
    }
    const unsigned char *rows = pending ? up : (const unsigned char *)up_dev->data;
    int64_t *out_data = (int64_t *)out->storage->data + out->offset;
    if (probs ? dsrtk_sample_probs(dev, (const float *)c->storage->data + c->offset, B, V,
                                   (const dsrtk_sample_row *)rows, (const int64_t *)(rows + rows_bytes), max_hist,
                                   sorting, penalties, work ? work->data : NULL, wbytes,
                                   (float *)probs->storage->data + probs->offset, out_data, stream->handle)
              : dsrtk_sample(dev, (const float *)c->storage->data + c->offset, B, V, (const dsrtk_sample_row *)rows,
                             (const int64_t *)(rows + rows_bytes), max_hist, seed, step, sorting, penalties,
                             work ? work->data : NULL, wbytes, out_data, pending ? pending->words : NULL,
                             stream->handle)) {
        rc = kernel_failed();
        goto done;
    }
    if (pending) {
        if (dsrtk_event_record(dev, pending->event, stream->handle)) {
            rc = kernel_failed();
            goto done;
        }
    } else { /* ids and status words in one copy, which waits for the kernels */
        if (dsrtk_memcpy(dev, back, out_data, (size_t)(2 * B) * sizeof *back, DSRTK_D2H, stream->handle, 0)) {
            rc = kernel_failed();
            goto done;
        }
        for (int64_t r = 0; r < B && rc == 0; r++) rc = check_status(back[B + r], back[r], r, V);
    }
    if (rc == 0) {
        if (ids) memcpy(ids, back, (size_t)B * sizeof *ids);
        if (dev_out && !(*dev_out = dsrt_tensor_narrow(out, 0, 0, B))) rc = -1;
    }
done:
    if (up_dev) dsrt_storage_release(up_dev);
    if (work) dsrt_storage_release(work);
    if (out) dsrt_tensor_release(out);
    if (!pending) free(up);
    free(back);
    return rc;
}

/* the checks both forms share; returns the contiguous logits (a new reference) or NULL */
static dsrt_tensor *sample_input(dsrt_tensor *logits, dsrt_stream *stream, int64_t *B, int64_t *V)
{
    char buf[128], d[16];
    if (logits->dtype != DSRT_F32 || (logits->ndim != 1 && logits->ndim != 2))
        return dsrt_err_null("sample: logits must be f32 [B, V] or [V], got %s", dsrt_tensor_str(logits, buf, sizeof buf));
    if (logits->device != stream->device)
        return dsrt_err_null("sample: logits %s are not on the stream's device %s", dsrt_tensor_str(logits, buf, sizeof buf),
                             dsrt_device_str(stream->device, d));
    *B = logits->ndim == 2 ? logits->shape[0] : 1;
    *V = logits->shape[logits->ndim - 1];
    if (*B < 1 || *V < 1) return dsrt_err_null("sample: logits must have at least one row and one column");
    return dsrt_tensor_contiguous(logits, stream);
}

static int sample_cpu_tensor(dsrt_tensor *c, int64_t B, int64_t V, const dsrt_sample_params *params,
                             const int64_t *hist_off, const int64_t *hist_ids, uint64_t seed, uint64_t step,
                             dsrt_stream *stream, int64_t *ids)
{
    if (dsrt_stream_synchronize(stream)) return -1;
    return dsrt_sample_cpu((const float *)c->storage->data + c->offset, B, V, params, hist_off, hist_ids, seed, step, ids);
}

dsrt_tensor *dsrt_sample(dsrt_tensor *logits, const dsrt_sample_params *params, const int64_t *hist_off,
                         const int64_t *hist_ids, uint64_t seed, uint64_t step, dsrt_stream *stream)
{
    int64_t B, V;
    dsrt_tensor *c = sample_input(logits, stream, &B, &V);
    if (!c) return NULL;
    dsrt_tensor *out = NULL;
    if (c->device != DSRT_CPU) {
        if (sample_cuda(c, B, V, params, hist_off, hist_ids, seed, step, stream, NULL, &out, NULL, NULL)) out = NULL;
    } else {
        int64_t shape[1] = {B};
        out = dsrt_tensor_new(DSRT_I64, 1, shape, DSRT_CPU, stream);
        if (out && sample_cpu_tensor(c, B, V, params, hist_off, hist_ids, seed, step, stream,
                                     (int64_t *)out->storage->data + out->offset)) {
            dsrt_tensor_release(out);
            out = NULL;
        }
    }
    dsrt_tensor_release(c);
    return out;
}

int dsrt_sample_host(dsrt_tensor *logits, const dsrt_sample_params *params, const int64_t *hist_off,
                     const int64_t *hist_ids, uint64_t seed, uint64_t step, dsrt_stream *stream, int64_t *ids)
{
    int64_t B, V;
    dsrt_tensor *c = sample_input(logits, stream, &B, &V);
    if (!c) return -1;
    int rc = c->device != DSRT_CPU ? sample_cuda(c, B, V, params, hist_off, hist_ids, seed, step, stream, ids, NULL, NULL, NULL)
                                   : sample_cpu_tensor(c, B, V, params, hist_off, hist_ids, seed, step, stream, ids);
    dsrt_tensor_release(c);
    return rc;
}

/* ---- a draw read later (dsrt_sample_async) ----
 * Pinned allocations and events cost the host tens of microseconds, a generation step's budget, so
 * released pending draws wait in a small free list for the next draw of at most as many rows. */

#define PENDING_FREE_MAX 8
static struct {
    pthread_mutex_t lock;
    dsrt_sample_pending *free[PENDING_FREE_MAX];
    int n;
} pending_pool = {PTHREAD_MUTEX_INITIALIZER, {0}, 0};

static void pending_destroy(dsrt_sample_pending *p)
{
    if (p->device != DSRT_CPU) {
        if (p->event) (void)dsrtk_event_destroy(p->device, p->event);
        if (p->words) (void)dsrtk_host_free(p->words);
    } else {
        free(p->words);
    }
    free(p);
}

/* bytes: the words' and (CUDA) the kernels' rows and history ids after them */
static dsrt_sample_pending *pending_new(int device, int64_t B, int64_t V, size_t bytes)
{
    size_t need = bytes;
    dsrt_sample_pending *p = NULL;
    pthread_mutex_lock(&pending_pool.lock);
    for (int i = 0; i < pending_pool.n; i++) {
        dsrt_sample_pending *f = pending_pool.free[i];
        if (f->device == device && f->capacity >= need) {
            p = f;
            pending_pool.free[i] = pending_pool.free[--pending_pool.n];
            break;
        }
    }
    pthread_mutex_unlock(&pending_pool.lock);
    if (!p) {
        p = calloc(1, sizeof *p);
        if (!p) return dsrt_err_null("sample: out of host memory");
        p->device = device, p->capacity = need < 512 ? 512 : need;
        int rc = device == DSRT_CPU ? ((p->words = malloc(p->capacity)) ? 0 : dsrt_err("sample: out of host memory"))
                                    : dsrtk_host_alloc((void **)&p->words, p->capacity) ||
                                          dsrtk_event_create(device, &p->event, 0) ? kernel_failed() : 0;
        if (rc) {
            pending_destroy(p);
            return NULL;
        }
    }
    p->B = B, p->V = V;
    return p;
}

int dsrt_sample_async(dsrt_tensor *logits, const dsrt_sample_params *params, const int64_t *hist_off,
                      const int64_t *hist_ids, uint64_t seed, uint64_t step, dsrt_stream *stream, dsrt_tensor **ids,
                      dsrt_sample_pending **pending)
{
    *ids = NULL, *pending = NULL;
    int64_t B, V;
    dsrt_tensor *c = sample_input(logits, stream, &B, &V);
    if (!c) return -1;
    int64_t nhist = hist_off && hist_off[B] > hist_off[0] ? hist_off[B] - hist_off[0] : 0; /* bad offsets: sample_cuda's error */
    size_t bytes = (size_t)(2 * B) * sizeof(int64_t);
    if (c->device != DSRT_CPU) bytes += (size_t)B * sizeof(dsrtk_sample_row) + (size_t)nhist * sizeof(int64_t);
    dsrt_sample_pending *p = pending_new(c->device, B, V, bytes);
    int rc = p ? 0 : -1;
    if (!rc && c->device != DSRT_CPU) {
        rc = sample_cuda(c, B, V, params, hist_off, hist_ids, seed, step, stream, NULL, ids, NULL, p);
    } else if (!rc) { /* the CPU draws now; its words are final */
        int64_t shape[1] = {B};
        *ids = dsrt_tensor_new(DSRT_I64, 1, shape, DSRT_CPU, stream);
        rc = *ids ? sample_cpu_tensor(c, B, V, params, hist_off, hist_ids, seed, step, stream, p->words) : -1;
        if (!rc) {
            memcpy((int64_t *)(*ids)->storage->data + (*ids)->offset, p->words, (size_t)B * sizeof *p->words);
            for (int64_t r = 0; r < B; r++) p->words[B + r] = DSRTK_SAMPLE_OK;
        }
    }
    dsrt_tensor_release(c);
    if (rc) {
        dsrt_tensor_release(*ids);
        *ids = NULL;
        if (p) dsrt_sample_pending_free(p);
        return -1;
    }
    *pending = p;
    return 0;
}

int64_t dsrt_sample_pending_rows(const dsrt_sample_pending *p) { return p->B; }

int dsrt_sample_wait(dsrt_sample_pending *p, int64_t *ids)
{
    if (p->device != DSRT_CPU && dsrtk_event_synchronize(p->device, p->event)) return kernel_failed();
    for (int64_t r = 0; r < p->B; r++)
        if (check_status(p->words[p->B + r], p->words[r], r, p->V)) return -1;
    memcpy(ids, p->words, (size_t)p->B * sizeof *ids);
    return 0;
}

void dsrt_sample_pending_free(dsrt_sample_pending *p)
{
    if (!p) return;
    /* its kernels may still be running (they read and write its memory): back to the pool once done */
    if (p->device != DSRT_CPU && dsrtk_event_synchronize(p->device, p->event)) {
        pending_destroy(p);
        return;
    }
    pthread_mutex_lock(&pending_pool.lock);
    int kept = pending_pool.n < PENDING_FREE_MAX;
    if (kept) pending_pool.free[pending_pool.n++] = p;
    pthread_mutex_unlock(&pending_pool.lock);
    if (!kept) pending_destroy(p);
}

dsrt_tensor *dsrt_sample_probs(dsrt_tensor *logits, const dsrt_sample_params *params, const int64_t *hist_off,
                               const int64_t *hist_ids, dsrt_stream *stream)
{
    int64_t B, V;
    dsrt_tensor *c = sample_input(logits, stream, &B, &V);
    if (!c) return NULL;
    int64_t shape[2] = {B, V};
    dsrt_tensor *out = dsrt_tensor_new(DSRT_F32, 2, shape, c->device, stream);
    int rc = out ? 0 : -1;
    if (rc == 0 && c->device != DSRT_CPU) {
        rc = sample_cuda(c, B, V, params, hist_off, hist_ids, 0, 0, stream, NULL, NULL, out, NULL);
    } else if (rc == 0) {
        rc = dsrt_stream_synchronize(stream);
        if (rc == 0)
            rc = dsrt_sample_probs_cpu((const float *)c->storage->data + c->offset, B, V, params, hist_off, hist_ids,
                                       (float *)out->storage->data + out->offset);
    }
    dsrt_tensor_release(c);
    if (rc && out) {
        dsrt_tensor_release(out);
        out = NULL;
    }
    return out;
}

int dsrt_sample_verify(dsrt_tensor *p, dsrt_tensor *q, const int64_t *drafts, int64_t k, uint64_t seed, uint64_t step,
                       dsrt_stream *stream, int64_t *accepted, int64_t *next_id)
{
    char buf[128], buf2[128], d[16];
    if (k < 0 || k > DSRT_VERIFY_MAX_K)
        return dsrt_err("sample_verify: %lld drafts; one verification takes 0 to %d", (long long)k, DSRT_VERIFY_MAX_K);
    if (p->dtype != DSRT_F32 || p->ndim != 2 || p->shape[0] != k + 1 || p->shape[1] < 1)
        return dsrt_err("sample_verify: p must be f32 [k + 1, V] = [%lld, V] for %lld drafts, got %s", (long long)k + 1,
                        (long long)k, dsrt_tensor_str(p, buf, sizeof buf));
    const int64_t V = p->shape[1];
    if (q && (q->dtype != DSRT_F32 || q->ndim != 2 || q->shape[0] != k || q->shape[1] != V))
        return dsrt_err("sample_verify: q must be f32 [k, V] = [%lld, %lld] like p %s, got %s", (long long)k,
                        (long long)V, dsrt_tensor_str(p, buf, sizeof buf), dsrt_tensor_str(q, buf2, sizeof buf2));
    if (q && q->device != p->device)
        return dsrt_err("sample_verify: p %s and q %s are on different devices", dsrt_tensor_str(p, buf, sizeof buf),
                        dsrt_tensor_str(q, buf2, sizeof buf2));
    if (p->device != stream->device)
        return dsrt_err("sample_verify: p %s is not on the stream's device %s", dsrt_tensor_str(p, buf, sizeof buf),
                        dsrt_device_str(stream->device, d));
    for (int64_t i = 0; i < k; i++)
        if (drafts[i] < 0 || drafts[i] >= V)
            return dsrt_err("sample_verify: draft %lld is id %lld, outside the vocabulary [0, %lld)", (long long)i + 1,
                            (long long)drafts[i], (long long)V);
    dsrt_tensor *pc = dsrt_tensor_contiguous(p, stream), *qc = NULL;
    if (!pc) return -1;
    if (q && !(qc = dsrt_tensor_contiguous(q, stream))) {
        dsrt_tensor_release(pc);
        return -1;
    }
    const float *pd = (const float *)pc->storage->data + pc->offset;
    const float *qd = qc ? (const float *)qc->storage->data + qc->offset : NULL;
    int rc = 0;
    if (pc->device == DSRT_CPU) {
        rc = dsrt_sample_verify_cpu_checked(pd, qd, k, V, drafts, seed, step, stream, accepted, next_id);
    } else {
        int dev = pc->device;
        dsrtk_verify_drafts ids;
        memset(&ids, 0, sizeof ids);
        for (int64_t i = 0; i < k; i++) ids.id[i] = drafts[i];
        int64_t back[3] = {0, 0, -1};
        dsrt_storage *out = dsrt_storage_new(dev, sizeof back, stream);
        if (!out || dsrt_storage_use(pc->storage, stream) || (qc && dsrt_storage_use(qc->storage, stream))) rc = -1;
        else if (dsrtk_sample_verify(dev, pd, qd, k, V, ids, seed, step, (int64_t *)out->data, stream->handle) ||
                 dsrtk_memcpy(dev, back, out->data, sizeof back, DSRTK_D2H, stream->handle, 0))
            rc = kernel_failed();
        else if (back[2] != DSRTK_SAMPLE_OK || back[0] < 0 || back[0] > k || back[1] < 0 || back[1] >= V)
            rc = dsrt_err("sample_verify: the CUDA kernel returned status %lld, %lld accepted, id %lld (a bug)",
                          (long long)back[2], (long long)back[0], (long long)back[1]);
        else {
            *accepted = back[0];
            *next_id = back[1];
        }
        if (out) dsrt_storage_release(out);
    }
    dsrt_tensor_release(pc);
    if (qc) dsrt_tensor_release(qc);
    return rc;
}
