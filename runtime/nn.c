/*
 * nn.c - the CPU implementations of DeepSeek-V4's numerical primitives (nn.h).
 *
 * What this protects: these loops are the ground truth that the CUDA kernels and the composed
 * model are tested against, so each one is written as the formula it implements (nn.h and the SPEC
 * sections cited there), over contiguous f32 copies of its inputs, with every bf16 rounding point
 * the reference has spelled out where it happens. The shared machinery (argument checks, the f32
 * copies, the final rounding of a result) lives at the top so that each primitive reads as its
 * numerics only. OpenMP spreads rows (or query rows × heads) over the cores.
 */
#include "nn.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "alloc.h"
#include "dtype.h"
#include "err.h"
#include "kernels.h"
#include "ops.h"

/* below this many elements of work a loop is not worth waking the OpenMP team for */
enum { PARALLEL_MIN = 1 << 15 };

/* a dimension check_arg accepts at any size */
#define ANY_SIZE (-1)

/* ---- arguments ---- */

static int check_precision(const char *op, dsrt_precision prec)
{
    if (prec != DSRT_PREC_REFERENCE && prec != DSRT_PREC_FP32) return dsrt_err("%s: unknown precision %d", op, (int)prec);
    return 0;
}

static int check_stream(const char *op, const dsrt_stream *s)
{
    char dev[16];
    if (!s) return dsrt_err("%s: no stream given", op);
    if (s->device != DSRT_CPU)
        return dsrt_err("%s: only the CPU implementation exists so far (the stream is on %s)", op,
                        dsrt_device_str(s->device, dev));
    return 0;
}

/* The functions with a CUDA implementation take a stream of any device (check_stream above stays
 * CPU-only for any function that has none yet). */
static int check_any_stream(const char *op, const dsrt_stream *s)
{
    if (!s) return dsrt_err("%s: no stream given", op);
    return 0;
}

/* t is on the stream's device, bf16/f32 (or, with `integer`, i32/i64), and has `ndim` dimensions
 * (0: any number from 1) of sizes `shape` (NULL: any; ANY_SIZE entries: any). */
static int check_arg(const char *op, const char *name, const dsrt_tensor *t, int integer, int ndim, const int64_t *shape,
                     const dsrt_stream *s)
{
    char ts[128], dev[16];
    if (!t) return dsrt_err("%s: %s is missing", op, name);
    if (t->device != s->device)
        return dsrt_err("%s: %s is %s, not on the stream's device %s",
                        op, name, dsrt_tensor_str(t, ts, sizeof ts), dsrt_device_str(s->device, dev));
    int dtype_ok = integer ? t->dtype == DSRT_I32 || t->dtype == DSRT_I64 : t->dtype == DSRT_BF16 || t->dtype == DSRT_F32;
    if (!dtype_ok) return dsrt_err("%s: %s is %s, expected %s",
                                   op, name, dsrt_tensor_str(t, ts, sizeof ts), integer ? "i32 or i64" : "bf16 or f32");
    if (ndim == 0) {
        if (t->ndim < 1) return dsrt_err("%s: %s is %s, expected at least 1 dimension",
                                         op, name, dsrt_tensor_str(t, ts, sizeof ts));
        return 0;
    }
    int ok = t->ndim == ndim;
    for (int d = 0; ok && shape && d < ndim; d++) ok = shape[d] == ANY_SIZE || shape[d] == t->shape[d];
    if (ok) return 0;
    if (!shape) return dsrt_err("%s: %s is %s, expected %d dimensions", op, name, dsrt_tensor_str(t, ts, sizeof ts), ndim);
    char want[DSRT_SHAPE_BUF];
    int n = snprintf(want, sizeof want, "[");
    for (int d = 0; d < ndim && n < (int)sizeof want; d++) {
        if (shape[d] == ANY_SIZE) n += snprintf(want + n, sizeof want - (size_t)n, d ? ", *" : "*");
        else n += snprintf(want + n, sizeof want - (size_t)n, d ? ", %lld" : "%lld", (long long)shape[d]);
    }
    if (n < (int)sizeof want) snprintf(want + n, sizeof want - (size_t)n, "]");
    return dsrt_err("%s: %s is %s, expected shape %s", op, name, dsrt_tensor_str(t, ts, sizeof ts), want);
}

/* ---- values and results ---- */

/* t's values as a contiguous f32 tensor: t itself when it already is one, else a converted copy */
static dsrt_tensor *as_f32(dsrt_tensor *t, dsrt_stream *s)
{
    return t->dtype == DSRT_F32 ? dsrt_tensor_contiguous(t, s) : dsrt_tensor_to(t, t->device, DSRT_F32, s, 0);
}

static float *f32_data(const dsrt_tensor *t) { return (float *)t->storage->data + t->offset; }

/* an integer tensor's values widened to int64 (malloc'd; free it), or NULL with a message */
static int64_t *as_i64(const char *op, dsrt_tensor *t, dsrt_stream *s)
{
    dsrt_tensor *c = dsrt_tensor_contiguous(t, s);
    if (!c) return NULL;
    int64_t n = dsrt_tensor_numel(c);
    int64_t *v = malloc((size_t)(n ? n : 1) * sizeof *v);
    if (v)
        for (int64_t i = 0; i < n; i++) v[i] = dsrt_load_i64(c->storage->data, c->dtype, c->offset + i);
    dsrt_tensor_release(c);
    return v ? v : dsrt_err_null("%s: out of memory", op);
}

static dsrt_tensor *new_f32(int ndim, const int64_t *shape, dsrt_stream *s)
{
    return dsrt_tensor_new(DSRT_F32, ndim, shape, DSRT_CPU, s);
}

/* An activation result computed in fp32, in the dtype of the precision: the reference rounds it to
 * bf16 once, here. Takes ownership of `result` (NULL passes through). */
static dsrt_tensor *finish(dsrt_tensor *result, dsrt_precision prec, dsrt_stream *s)
{
    if (!result || prec == DSRT_PREC_FP32) return result;
    dsrt_tensor *out = dsrt_tensor_to(result, result->device, DSRT_BF16, s, 0);
    dsrt_tensor_release(result);
    return out;
}

/* ---- the CUDA side ---- */

/* A CUDA branch hands the launchers (kernels/norm.cu, kernels/hc.cu) contiguous operands in their own
 * dtype (bf16 or f32: the kernels widen them as the CPU's as_f32 does), allocates every result and
 * workspace on the stream through the core, and reports a launcher's failure under the op's name. */
static int on_cuda(const dsrt_stream *s) { return s->device != DSRT_CPU; }

/* t as a contiguous tensor of its dtype (t itself when it is one), its storage marked as used by s */
static dsrt_tensor *dense(dsrt_tensor *t, dsrt_stream *s)
{
    dsrt_tensor *c = dsrt_tensor_contiguous(t, s);
    if (c && dsrt_storage_use(c->storage, s)) {
        dsrt_tensor_release(c);
        return NULL;
    }
    return c;
}

static void *dev_data(const dsrt_tensor *t)
{
    return (char *)t->storage->data + dsrt_dtype_nbytes(t->dtype, t->offset);
}

static dsrt_tensor *new_on(dsrt_dtype dtype, int ndim, const int64_t *shape, dsrt_stream *s)
{
    return dsrt_tensor_new(dtype, ndim, shape, s->device, s);
}

/* the dtype of an activation result: bf16 in reference precision, f32 in fp32 */
static dsrt_dtype act_dtype(dsrt_precision prec) { return prec == DSRT_PREC_REFERENCE ? DSRT_BF16 : DSRT_F32; }

/* a launcher's status: 0, or -1 with its message led by the op's name */
static int launched(const char *op, int status)
{
    if (!status) return 0;
    const char *msg = dsrtk_error();
    size_t n = strlen(op);
    if (!strncmp(msg, op, n) && msg[n] == ':') return dsrt_err("%s", msg);
    return dsrt_err("%s: %s", op, msg);
}

/* a double workspace of n values on the stream (the allocator has no f64 dtype: i64 has the size) */
static dsrt_tensor *new_workspace(int64_t n, dsrt_stream *s) { return new_on(DSRT_I64, 1, &n, s); }

static void release_all(dsrt_tensor **ts, int n)
{
    for (int i = 0; i < n; i++) dsrt_tensor_release(ts[i]);
}

static int64_t rows_of(const dsrt_tensor *t)
{
    int64_t n = t->shape[t->ndim - 1];
    return n ? dsrt_tensor_numel(t) / n : 0;
}

static float round_bf16(float v) { return dsrt_bf16_to_f32(dsrt_f32_to_bf16(v)); }

static float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/* mean of the fp32 squares of x[0..n), summed in double and rounded once to fp32 */
static float mean_square(const float *x, int64_t n)
{
    double acc = 0;
    for (int64_t j = 0; j < n; j++) acc += (double)(x[j] * x[j]);
    return (float)(acc / (double)n);
}

/* ---- norms (SPEC §3.1-3.2) ---- */

/* y = x·rsqrt(mean(x²) + eps) [·w] per row of d values, all fp32 */
static void normalise_rows(const float *x, const float *w, int64_t rows, int64_t d, float eps, float *y)
{
#pragma omp parallel for if (rows * d > PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        float *yr = y + r * d;
        float inv = 1.0f / sqrtf(mean_square(xr, d) + eps);
        for (int64_t j = 0; j < d; j++) {
            float v = xr[j] * inv;
            yr[j] = w ? w[j] * v : v;
        }
    }
}

/* RMSNorm or the head norm on CUDA (norm.cu's rms_norm_kernel): head_bf16 for the head norm's
 * reference rounding points */
static dsrt_tensor *rms_norm_cuda(const char *op, dsrt_tensor *x, dsrt_tensor *weight, float eps, int head_bf16,
                                  dsrt_precision prec, dsrt_stream *s)
{
    int64_t d = x->shape[x->ndim - 1];
    dsrt_tensor *xc = dense(x, s), *wc = xc && weight ? dense(weight, s) : NULL;
    dsrt_tensor *y = xc && (wc || !weight) ? new_on(act_dtype(prec), x->ndim, x->shape, s) : NULL;
    if (y && launched(op, dsrtk_nn_rms_norm(s->device, dev_data(xc), xc->dtype, wc ? dev_data(wc) : NULL,
                                            wc ? wc->dtype : DSRT_F32, dev_data(y), y->dtype, rows_of(x), d, eps,
                                            head_bf16, s->handle))) {
        dsrt_tensor_release(y);
        y = NULL;
    }
    dsrt_tensor_release(xc);
    dsrt_tensor_release(wc);
    return y;
}

dsrt_tensor *dsrt_nn_rms_norm(dsrt_tensor *x, dsrt_tensor *weight, float eps, dsrt_precision prec, dsrt_stream *s)
{
    const char *op = "nn.rms_norm";
    if (check_precision(op, prec) || check_any_stream(op, s) || check_arg(op, "x", x, 0, 0, NULL, s)) return NULL;
    int64_t d = x->shape[x->ndim - 1];
    if (weight && check_arg(op, "weight", weight, 0, 1, &d, s)) return NULL;
    if (on_cuda(s)) return rms_norm_cuda(op, x, weight, eps, 0, prec, s);
    dsrt_tensor *xv = as_f32(x, s), *wv = xv && weight ? as_f32(weight, s) : NULL;
    dsrt_tensor *y = xv && (wv || !weight) ? new_f32(x->ndim, x->shape, s) : NULL;
    if (y) normalise_rows(f32_data(xv), wv ? f32_data(wv) : NULL, rows_of(x), d, eps, f32_data(y));
    dsrt_tensor_release(xv);
    dsrt_tensor_release(wv);
    return finish(y, prec, s);
}

/* the reference's bf16 evaluation of q·rsqrt(mean(q²) + eps), the five roundings of nn.h */
static void normalise_rows_bf16(const float *x, int64_t rows, int64_t d, float eps, float *y)
{
#pragma omp parallel for if (rows * d > PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        double acc = 0;
        for (int64_t j = 0; j < d; j++) acc += round_bf16(xr[j] * xr[j]);
        float mean = round_bf16((float)(acc / (double)d));
        float inv = round_bf16(1.0f / sqrtf(round_bf16(mean + eps)));
        for (int64_t j = 0; j < d; j++) y[r * d + j] = xr[j] * inv; /* rounded to bf16 by finish() */
    }
}

dsrt_tensor *dsrt_nn_head_rms_norm(dsrt_tensor *q, float eps, dsrt_precision prec, dsrt_stream *s)
{
    const char *op = "nn.head_rms_norm";
    if (check_precision(op, prec) || check_any_stream(op, s) || check_arg(op, "q", q, 0, 0, NULL, s)) return NULL;
    if (on_cuda(s)) return rms_norm_cuda(op, q, NULL, eps, prec == DSRT_PREC_REFERENCE, prec, s);
    int64_t d = q->shape[q->ndim - 1];
    dsrt_tensor *qv = as_f32(q, s), *y = qv ? new_f32(q->ndim, q->shape, s) : NULL;
    if (y && prec == DSRT_PREC_REFERENCE) normalise_rows_bf16(f32_data(qv), rows_of(q), d, eps, f32_data(y));
    else if (y) normalise_rows(f32_data(qv), NULL, rows_of(q), d, eps, f32_data(y));
    dsrt_tensor_release(qv);
    return finish(y, prec, s);
}

/* ---- activation round trips (SPEC §3.3-3.4) ---- */

typedef void (*row_roundtrip)(float *v, int n, int blk);
static void q8_row(float *v, int n, int blk) { dsrt_q8_roundtrip(v, n, blk); }
static void q4_row(float *v, int n, int blk) { (void)blk; dsrt_q4_roundtrip(v, n); }

/* applies `trip` to columns [first, first + count) of every row of x, writing back into x */
static int roundtrip_in_place(dsrt_tensor *x, int64_t first, int64_t count, int blk, row_roundtrip trip, dsrt_stream *s)
{
    dsrt_tensor *v = as_f32(x, s); /* x itself when it is contiguous f32: then the loop writes x */
    if (!v) return -1;
    int64_t n = x->shape[x->ndim - 1], rows = rows_of(x);
    float *p = f32_data(v);
#pragma omp parallel for if (rows * count > PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) trip(p + r * n + first, (int)count, blk);
    int rc = v == x ? 0 : dsrt_op_copy(x, v, s); /* q·s is exact in bf16, so the copy back is too */
    dsrt_tensor_release(v);
    return rc;
}

/* The round trip on CUDA (norm.cu's roundtrip_kernel, quant.h's code): in place when x is
 * contiguous, else on a contiguous copy that is copied back, as the CPU does. */
static int roundtrip_cuda(const char *op, dsrt_tensor *x, int64_t first, int64_t count, int blk, int q4, dsrt_stream *s)
{
    dsrt_tensor *c = dense(x, s);
    if (!c) return -1;
    int64_t n = x->shape[x->ndim - 1];
    int rc = launched(op, dsrtk_nn_roundtrip(s->device, dev_data(c), c->dtype, rows_of(x), n, first, count, blk, q4,
                                             s->handle));
    if (!rc && c != x) rc = dsrt_op_copy(x, c, s);
    dsrt_tensor_release(c);
    return rc;
}

/* the common checks of the two round trips; the row length must fit quant.h's int */
static int check_roundtrip(const char *op, const dsrt_tensor *x, dsrt_precision prec, const dsrt_stream *s)
{
    if (check_precision(op, prec) || check_any_stream(op, s) || check_arg(op, "x", x, 0, 0, NULL, s)) return -1;
    if (x->shape[x->ndim - 1] > INT_MAX) {
        char ts[128];
        return dsrt_err("%s: x is %s, rows longer than %d", op, dsrt_tensor_str(x, ts, sizeof ts), INT_MAX);
    }
    return 0;
}

int dsrt_nn_quant_roundtrip_q8(dsrt_tensor *x, int blk, int64_t first, int64_t count, dsrt_precision prec,
                               dsrt_stream *s)
{
    const char *op = "nn.quant_roundtrip_q8";
    if (check_roundtrip(op, x, prec, s)) return -1;
    char ts[128];
    int64_t n = x->shape[x->ndim - 1];
    if (blk < 1 || blk > 128) return dsrt_err("%s: block size %d outside 1..128", op, blk);
    if (first < 0 || count < 0 || first > n - count)
        return dsrt_err("%s: columns [%lld, %lld) are not within the %lld of x %s", op, (long long)first,
                        (long long)(first + count), (long long)n, dsrt_tensor_str(x, ts, sizeof ts));
    if (prec == DSRT_PREC_FP32 || count == 0) return 0;
    if (on_cuda(s)) return roundtrip_cuda(op, x, first, count, blk, 0, s);
    return roundtrip_in_place(x, first, count, blk, q8_row, s);
}

int dsrt_nn_quant_roundtrip_q4(dsrt_tensor *x, dsrt_precision prec, dsrt_stream *s)
{
    const char *op = "nn.quant_roundtrip_q4";
    if (check_roundtrip(op, x, prec, s)) return -1;
    if (prec == DSRT_PREC_FP32) return 0;
    if (on_cuda(s)) return roundtrip_cuda(op, x, 0, x->shape[x->ndim - 1], 32, 1, s);
    return roundtrip_in_place(x, 0, x->shape[x->ndim - 1], 32, q4_row, s);
}

/* ---- RoPE (SPEC §3.6) ---- */

/* The last few tables computed on this thread, by their arguments: a decode step asks for the same
 * two or three ~16 times (every RoPE launch), and computing one (32 powf, logs) was 1.5% of a step's
 * host time on the H200 machine (tools/host_profile.sh). Thread-local: no lock on the launch path. */
enum { FREQ_CACHE = 4 };
typedef struct {
    int used, has_yarn;
    double theta;
    dsrt_yarn yarn;
    float freqs[DSRT_NN_ROPE_PAIRS];
} freq_entry;
static _Thread_local freq_entry freq_cache[FREQ_CACHE];
static _Thread_local int freq_next;

static freq_entry *freq_find(double theta, const dsrt_yarn *yarn)
{
    for (int i = 0; i < FREQ_CACHE; i++) {
        freq_entry *e = &freq_cache[i];
        if (e->used && e->theta == theta && e->has_yarn == (yarn != NULL) &&
            (!yarn || (e->yarn.factor == yarn->factor && e->yarn.original_seq_len == yarn->original_seq_len &&
                       e->yarn.beta_fast == yarn->beta_fast && e->yarn.beta_slow == yarn->beta_slow)))
            return e;
    }
    return NULL;
}

/* SPEC §3.6's table for valid arguments */
static void compute_freqs(double theta, const dsrt_yarn *yarn, float *freqs)
{
    /* 1 / base^(arange(0, 64, 2) / 64) in fp32, as torch evaluates it */
    for (int i = 0; i < DSRT_NN_ROPE_PAIRS; i++)
        freqs[i] = 1.0f / powf((float)theta, (float)(2 * i) / (float)DSRT_NN_ROPE_DIMS);
    if (!yarn) return;
    /* the correction range in double (Python's math), c(n) = d·ln(L0/(2πn)) / (2·ln base) */
    double dims = DSRT_NN_ROPE_DIMS, l0 = (double)yarn->original_seq_len;
    double low = floor(dims * log(l0 / (yarn->beta_fast * 2 * M_PI)) / (2 * log(theta)));
    double high = ceil(dims * log(l0 / (yarn->beta_slow * 2 * M_PI)) / (2 * log(theta)));
    low = low > 0 ? low : 0;
    high = high < dims - 1 ? high : dims - 1;
    if (low == high) high += 0.001; /* the reference's guard against a zero-width ramp */
    /* the ramp and the blend in fp32, in the reference's order of operations */
    for (int i = 0; i < DSRT_NN_ROPE_PAIRS; i++) {
        float ramp = ((float)i - (float)low) / (float)(high - low);
        ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
        float smooth = 1.0f - ramp;
        freqs[i] = freqs[i] / (float)yarn->factor * (1.0f - smooth) + freqs[i] * smooth;
    }
}

static int rope_freqs(const char *op, double theta, const dsrt_yarn *yarn, float *freqs)
{
    if (!(theta > 1)) return dsrt_err("%s: theta must be > 1, got %g", op, theta);
    if (yarn && !(yarn->factor > 0 && yarn->beta_fast > 0 && yarn->beta_slow > 0 && yarn->original_seq_len > 0))
        return dsrt_err("%s: YaRN needs factor, beta_fast, beta_slow and original_seq_len > 0 (got %g, %g, %g, %lld)",
                        op, yarn->factor, yarn->beta_fast, yarn->beta_slow, (long long)yarn->original_seq_len);
    freq_entry *e = freq_find(theta, yarn);
    if (!e) {
        e = &freq_cache[freq_next];
        freq_next = (freq_next + 1) % FREQ_CACHE;
        compute_freqs(theta, yarn, e->freqs);
        e->used = 1, e->theta = theta, e->has_yarn = yarn != NULL;
        if (yarn) e->yarn = *yarn;
    }
    memcpy(freqs, e->freqs, sizeof e->freqs);
    return 0;
}

int dsrt_nn_rope_freqs(double theta, const dsrt_yarn *yarn, float freqs[DSRT_NN_ROPE_PAIRS])
{
    return rope_freqs("nn.rope_freqs", theta, yarn, freqs);
}

dsrt_tensor *dsrt_nn_rope(dsrt_tensor *x, dsrt_tensor *positions, double theta, const dsrt_yarn *yarn, int inverse,
                          dsrt_precision prec, dsrt_stream *s)
{
    const char *op = "nn.rope";
    char ts[128];
    float freqs[DSRT_NN_ROPE_PAIRS];
    if (check_precision(op, prec) || check_any_stream(op, s) || check_arg(op, "x", x, 0, 0, NULL, s)) return NULL;
    if (x->ndim != 2 && x->ndim != 3)
        return dsrt_err_null("%s: x is %s, expected [S, H, w] or [S, w]", op, dsrt_tensor_str(x, ts, sizeof ts));
    int64_t S = x->shape[0], heads = x->ndim == 3 ? x->shape[1] : 1, w = x->shape[x->ndim - 1];
    if (w < DSRT_NN_ROPE_DIMS)
        return dsrt_err_null("%s: x is %s, its vectors are narrower than the %d rotated dims", op,
                             dsrt_tensor_str(x, ts, sizeof ts), DSRT_NN_ROPE_DIMS);
    if (check_arg(op, "positions", positions, 1, 1, &S, s) || rope_freqs(op, theta, yarn, freqs)) return NULL;
    if (on_cuda(s)) {
        /* the frequencies are the host's bits; positions are not checked for signs here (that would
         * synchronise): a negative one rotates backwards, as the formula says */
        dsrt_tensor *xc = dense(x, s), *pc = xc ? dense(positions, s) : NULL;
        dsrt_tensor *y = pc ? new_on(act_dtype(prec), x->ndim, x->shape, s) : NULL;
        if (y && launched(op, dsrtk_nn_rope(s->device, dev_data(xc), xc->dtype, dev_data(y), y->dtype, dev_data(pc),
                                            pc->dtype, S, heads, w, freqs, inverse, s->handle))) {
            dsrt_tensor_release(y);
            y = NULL;
        }
        dsrt_tensor_release(xc);
        dsrt_tensor_release(pc);
        return y;
    }
    int64_t *pos = as_i64(op, positions, s);
    if (!pos) return NULL;
    for (int64_t i = 0; i < S; i++)
        if (pos[i] < 0) {
            long long bad = (long long)pos[i];
            free(pos);
            return dsrt_err_null("%s: positions[%lld] = %lld is negative", op, (long long)i, bad);
        }
    dsrt_tensor *xv = as_f32(x, s), *y = xv ? new_f32(x->ndim, x->shape, s) : NULL;
    if (y) {
        const float *px = f32_data(xv);
        float *py = f32_data(y);
        int64_t kept = w - DSRT_NN_ROPE_DIMS;
#pragma omp parallel for if (S * heads * w > PARALLEL_MIN)
        for (int64_t t = 0; t < S; t++) {
            float cos_t[DSRT_NN_ROPE_PAIRS], sin_t[DSRT_NN_ROPE_PAIRS];
            for (int i = 0; i < DSRT_NN_ROPE_PAIRS; i++) {
                float angle = (float)pos[t] * freqs[i]; /* one fp32 product, as torch.outer */
                cos_t[i] = cosf(angle);
                sin_t[i] = sinf(angle);
            }
            for (int64_t h = 0; h < heads; h++) {
                const float *v = px + (t * heads + h) * w;
                float *o = py + (t * heads + h) * w;
                memcpy(o, v, (size_t)kept * sizeof *o);
                for (int i = 0; i < DSRT_NN_ROPE_PAIRS; i++) {
                    float a = v[kept + 2 * i], b = v[kept + 2 * i + 1], c = cos_t[i], sn = sin_t[i];
                    /* (a + jb)·(c ± js), fp32 */
                    o[kept + 2 * i] = inverse ? a * c + b * sn : a * c - b * sn;
                    o[kept + 2 * i + 1] = inverse ? b * c - a * sn : a * sn + b * c;
                }
            }
        }
    }
    free(pos);
    dsrt_tensor_release(xv);
    return finish(y, prec, s);
}

/* ---- Hadamard rotation (SPEC §3.7) ---- */

/* y = H_128·x / sqrt(128): in-place butterflies give Sylvester (natural) order */
static void hadamard_row(const float *x, float *y)
{
    const float scale = 0.08838834764831845f; /* fp32(128^-0.5) */
    memcpy(y, x, DSRT_NN_HADAMARD_DIM * sizeof *y);
    for (int h = 1; h < DSRT_NN_HADAMARD_DIM; h *= 2)
        for (int i = 0; i < DSRT_NN_HADAMARD_DIM; i += 2 * h)
            for (int j = i; j < i + h; j++) {
                float a = y[j], b = y[j + h];
                y[j] = a + b;
                y[j + h] = a - b;
            }
    for (int j = 0; j < DSRT_NN_HADAMARD_DIM; j++) y[j] *= scale;
}

dsrt_tensor *dsrt_nn_hadamard128(dsrt_tensor *x, dsrt_precision prec, dsrt_stream *s)
{
    const char *op = "nn.hadamard128";
    char ts[128];
    if (check_precision(op, prec) || check_any_stream(op, s) || check_arg(op, "x", x, 0, 0, NULL, s)) return NULL;
    if (x->shape[x->ndim - 1] != DSRT_NN_HADAMARD_DIM)
        return dsrt_err_null("%s: x is %s, expected [..., %d]", op, dsrt_tensor_str(x, ts, sizeof ts),
                             DSRT_NN_HADAMARD_DIM);
    if (on_cuda(s)) {
        dsrt_tensor *xc = dense(x, s), *y = xc ? new_on(act_dtype(prec), x->ndim, x->shape, s) : NULL;
        if (y && launched(op, dsrtk_nn_hadamard128(s->device, dev_data(xc), xc->dtype, dev_data(y), y->dtype,
                                                   rows_of(x), s->handle))) {
            dsrt_tensor_release(y);
            y = NULL;
        }
        dsrt_tensor_release(xc);
        return y;
    }
    dsrt_tensor *xv = as_f32(x, s), *y = xv ? new_f32(x->ndim, x->shape, s) : NULL;
    if (y) {
        const float *px = f32_data(xv);
        float *py = f32_data(y);
        int64_t rows = rows_of(x);
#pragma omp parallel for if (rows * DSRT_NN_HADAMARD_DIM > PARALLEL_MIN)
        for (int64_t r = 0; r < rows; r++) hadamard_row(px + r * DSRT_NN_HADAMARD_DIM, py + r * DSRT_NN_HADAMARD_DIM);
    }
    dsrt_tensor_release(xv);
    return finish(y, prec, s);
}

/* ---- sparse attention (SPEC §3.8) ---- */

static float dot(const float *a, const float *b, int64_t n)
{
    double acc = 0;
    for (int64_t i = 0; i < n; i++) acc += (double)a[i] * b[i];
    return (float)acc;
}

/* One query row and head: the kernel's online softmax over blocks of the index list (nn.h).
 * `o` receives the result (it is also the fp32 accumulator). */
static void attend(const float *q, const float *pool, int64_t D, const int64_t *idx, int64_t K, float sink, float scale,
                   int round_p, float *o)
{
    float score[DSRT_NN_ATTENTION_BLOCK];
    float m = -INFINITY, den = 0;
    memset(o, 0, (size_t)D * sizeof *o);
    for (int64_t b0 = 0; b0 < K; b0 += DSRT_NN_ATTENTION_BLOCK) {
        int64_t n = K - b0 < DSRT_NN_ATTENTION_BLOCK ? K - b0 : DSRT_NN_ATTENTION_BLOCK;
        const int64_t *bi = idx + b0;
        float m_new = m;
        int valid = 0;
        for (int64_t j = 0; j < n; j++) {
            if (bi[j] < 0) continue;
            score[j] = dot(q, pool + bi[j] * D, D) * scale;
            m_new = fmaxf(m_new, score[j]);
            valid++;
        }
        if (!valid) continue; /* the kernel would rescale by e^(-inf - -inf) here when m is still -inf */
        float alpha = expf(m - m_new); /* 0 for the first block with a valid entry */
        double block_sum = 0;
        for (int64_t j = 0; j < n; j++) {
            if (bi[j] < 0) continue;
            float p = expf(score[j] - m_new);
            block_sum += p;
            score[j] = round_p ? round_bf16(p) : p; /* what the P·V product sees */
        }
        den = den * alpha + (float)block_sum;
        for (int64_t c = 0; c < D; c++) o[c] *= alpha;
        for (int64_t j = 0; j < n; j++) {
            if (bi[j] < 0) continue;
            const float *kv = pool + bi[j] * D;
            for (int64_t c = 0; c < D; c++) o[c] += score[j] * kv[c];
        }
        m = m_new;
    }
    if (m == -INFINITY) return; /* no valid index: zeros */
    den += expf(sink - m);      /* the sink: a zero-valued key, in the denominator only */
    for (int64_t c = 0; c < D; c++) o[c] /= den;
}

/* the arguments of sparse attention, checked under the name of the op that takes them */
static int check_attention(const char *op, dsrt_tensor *q, dsrt_tensor *pool, dsrt_tensor *indices, dsrt_tensor *sink,
                           dsrt_precision prec, dsrt_stream *s)
{
    if (check_precision(op, prec) || check_any_stream(op, s) || check_arg(op, "q", q, 0, 3, NULL, s)) return -1;
    int64_t pool_shape[2] = {ANY_SIZE, q->shape[2]}, index_shape[2] = {q->shape[0], ANY_SIZE};
    if (check_arg(op, "pool", pool, 0, 2, pool_shape, s) || check_arg(op, "indices", indices, 1, 2, index_shape, s) ||
        check_arg(op, "sink", sink, 0, 1, &q->shape[1], s))
        return -1;
    return 0;
}

/* Sparse attention on CUDA (kernels/sparse_attention.cu), with the inverse RoPE of its output
 * when `derotate`. The index values stay on the device (checking them here would synchronise): a
 * bad one turns its query row's outputs into NaN instead of an error. */
static dsrt_tensor *sparse_attention_cuda(const char *op, dsrt_tensor *q, dsrt_tensor *pool, dsrt_tensor *indices,
                                          dsrt_tensor *sink, float scale, const dsrtk_rope *derotate, dsrt_precision prec,
                                          dsrt_stream *s)
{
    int64_t S = q->shape[0], H = q->shape[1], D = q->shape[2], K = indices->shape[1];
    dsrt_tensor *ts[6] = {dense(q, s), NULL, NULL, NULL, NULL, NULL}; /* q pool indices sink o workspace */
    for (int i = 1; i < 4 && ts[i - 1]; i++) ts[i] = dense(i == 1 ? pool : i == 2 ? indices : sink, s);
    size_t ws_bytes = 0;
    int rc = ts[3] ? launched(op, dsrtk_sparse_attention_workspace(s->device, S, H, D, K, &ws_bytes)) : -1;
    if (!rc) ts[4] = new_on(act_dtype(prec), 3, q->shape, s);
    if (ts[4] && ws_bytes) {
        int64_t n = (int64_t)ws_bytes;
        ts[5] = new_on(DSRT_U8, 1, &n, s);
    }
    rc = !ts[4] || (ws_bytes && !ts[5]) || dsrt_storage_use(ts[4]->storage, s) ||
         (ts[5] && dsrt_storage_use(ts[5]->storage, s));
    if (!rc) {
        dsrt_view vo = dsrt_tensor_desc(ts[4]), vq = dsrt_tensor_desc(ts[0]), vp = dsrt_tensor_desc(ts[1]);
        dsrt_view vi = dsrt_tensor_desc(ts[2]), vs = dsrt_tensor_desc(ts[3]);
        rc = launched(op, dsrtk_sparse_attention(s->device, &vo, &vq, &vp, &vi, &vs, scale, prec == DSRT_PREC_REFERENCE,
                                                 derotate, ts[5] ? dev_data(ts[5]) : NULL, ws_bytes, s->handle));
    }
    dsrt_tensor *o = rc ? NULL : ts[4];
    if (o) ts[4] = NULL;
    release_all(ts, 6);
    return o;
}

dsrt_tensor *dsrt_nn_sparse_attention(dsrt_tensor *q, dsrt_tensor *pool, dsrt_tensor *indices, dsrt_tensor *sink,
                                      float scale, dsrt_precision prec, dsrt_stream *s)
{
    const char *op = "nn.sparse_attention";
    if (check_attention(op, q, pool, indices, sink, prec, s)) return NULL;
    if (on_cuda(s)) return sparse_attention_cuda(op, q, pool, indices, sink, scale, NULL, prec, s);
    if (check_stream(op, s)) return NULL; /* the CPU from here on */
    int64_t S = q->shape[0], H = q->shape[1], D = q->shape[2], N = pool->shape[0], K = indices->shape[1];
    int64_t *idx = as_i64(op, indices, s);
    if (!idx) return NULL;
    for (int64_t i = 0; i < S * K; i++)
        if (idx[i] < -1 || idx[i] >= N) {
            char ps[128];
            long long bad = (long long)idx[i];
            free(idx);
            return dsrt_err_null("%s: indices[%lld, %lld] = %lld is not a row of pool %s (nor -1, unused)", op,
                                 (long long)(i / K), (long long)(i % K), bad, dsrt_tensor_str(pool, ps, sizeof ps));
        }
    dsrt_tensor *qv = as_f32(q, s), *pv = qv ? as_f32(pool, s) : NULL, *sv = pv ? as_f32(sink, s) : NULL;
    dsrt_tensor *o = sv ? new_f32(3, q->shape, s) : NULL;
    if (o) {
        const float *pq = f32_data(qv), *pp = f32_data(pv), *ps = f32_data(sv);
        float *po = f32_data(o);
        int round_p = prec == DSRT_PREC_REFERENCE;
#pragma omp parallel for schedule(dynamic) if (S * H * K * D > PARALLEL_MIN)
        for (int64_t sh = 0; sh < S * H; sh++) {
            int64_t t = sh / H, h = sh % H;
            attend(pq + sh * D, pp, D, idx + t * K, K, ps[h], scale, round_p, po + sh * D);
        }
    }
    free(idx);
    dsrt_tensor_release(qv);
    dsrt_tensor_release(pv);
    dsrt_tensor_release(sv);
    return finish(o, prec, s);
}

/* ---- the attention layer's fused passes ---- */

/* The positions first + t·step, t < S, are all >= 0 (as dsrt_nn_rope requires of its positions;
 * the two ends bound a progression) */
static int check_progression(const char *op, int64_t S, int64_t first, int64_t step)
{
    if (first < 0 || (S > 1 && first + (S - 1) * step < 0))
        return dsrt_err("%s: the positions first + t·step (first %lld, step %lld, t < %lld) include negative ones", op,
                        (long long)first, (long long)step, (long long)S);
    return 0;
}

/* those positions as an i64 tensor on the stream's device, for dsrt_nn_rope */
static dsrt_tensor *progression(int64_t S, int64_t first, int64_t step, dsrt_stream *s)
{
    dsrt_tensor *p = new_on(DSRT_I64, 1, &S, s);
    if (p && dsrt_op_arange(p, (double)first, (double)step, s)) {
        dsrt_tensor_release(p);
        return NULL;
    }
    return p;
}

/* norm_rope as the ops themselves, one after the other, so the result is theirs by construction:
 * the CPU's implementation, and CUDA's for data the fused kernel does not take (kernels/norm.cu's
 * norm_rope_kernel is tested against it) */
static dsrt_tensor *norm_rope_by_steps(dsrt_tensor *x, dsrt_nn_norm norm, dsrt_tensor *weight, float eps, int64_t first,
                                       int64_t step, double theta, const dsrt_yarn *yarn, dsrt_nn_post post,
                                       dsrt_precision prec, dsrt_stream *s)
{
    dsrt_tensor *n = x;
    if (norm == DSRT_NN_NORM_RMS) n = dsrt_nn_rms_norm(x, weight, eps, prec, s);
    else if (norm == DSRT_NN_NORM_HEAD) n = dsrt_nn_head_rms_norm(x, eps, prec, s);
    else dsrt_tensor_retain(x);
    dsrt_tensor *pos = n ? progression(x->shape[0], first, step, s) : NULL;
    dsrt_tensor *r = pos ? dsrt_nn_rope(n, pos, theta, yarn, 0, prec, s) : NULL; /* a new tensor: x stays as it is */
    dsrt_tensor *y = r ? as_f32(r, s) : NULL;
    dsrt_tensor_release(n);
    dsrt_tensor_release(pos);
    dsrt_tensor_release(r);
    int64_t w = x->shape[x->ndim - 1];
    if (y && post == DSRT_NN_POST_Q8 && dsrt_nn_quant_roundtrip_q8(y, 64, 0, w - DSRT_NN_ROPE_DIMS, prec, s)) {
        dsrt_tensor_release(y);
        return NULL;
    }
    if (y && post == DSRT_NN_POST_HADAMARD_Q4) {
        dsrt_tensor *h = dsrt_nn_hadamard128(y, prec, s);
        dsrt_tensor_release(y);
        y = h ? as_f32(h, s) : NULL;
        dsrt_tensor_release(h);
        if (y && dsrt_nn_quant_roundtrip_q4(y, prec, s)) {
            dsrt_tensor_release(y);
            return NULL;
        }
    }
    return y;
}

/* norm_rope's arguments (x and weight named `name` and `wname`), under the name of the op that
 * takes them; the RoPE frequencies and positions into *rope */
static int check_norm_rope(const char *op, const char *name, const char *wname, dsrt_tensor *x, dsrt_nn_norm norm,
                           dsrt_tensor *weight, int64_t first, int64_t step, double theta, const dsrt_yarn *yarn,
                           dsrt_nn_post post, dsrt_stream *s, dsrtk_rope *rope)
{
    char ts[128];
    if (check_arg(op, name, x, 0, 0, NULL, s)) return -1;
    if (x->ndim != 2 && x->ndim != 3)
        return dsrt_err("%s: %s is %s, expected [S, H, w] or [S, w]", op, name, dsrt_tensor_str(x, ts, sizeof ts));
    int64_t w = x->shape[x->ndim - 1];
    if (w % 8 || w < DSRT_NN_ROPE_DIMS || w > 1024)
        return dsrt_err("%s: %s is %s, expected vectors of a multiple of 8 from %d to 1024 values", op, name,
                        dsrt_tensor_str(x, ts, sizeof ts), DSRT_NN_ROPE_DIMS);
    if ((unsigned)norm > DSRT_NN_NORM_HEAD || (unsigned)post > DSRT_NN_POST_HADAMARD_Q4)
        return dsrt_err("%s: unknown norm %d or post-processing %d", op, (int)norm, (int)post);
    if (weight && norm != DSRT_NN_NORM_RMS) return dsrt_err("%s: only the RMS norm takes a weight", op);
    if (weight && check_arg(op, wname, weight, 0, 1, &w, s)) return -1;
    if (post == DSRT_NN_POST_HADAMARD_Q4 && w != DSRT_NN_HADAMARD_DIM)
        return dsrt_err("%s: %s is %s, the Hadamard rotation takes vectors of %d", op, name,
                        dsrt_tensor_str(x, ts, sizeof ts), DSRT_NN_HADAMARD_DIM);
    if (check_progression(op, x->shape[0], first, step) || rope_freqs(op, theta, yarn, rope->freqs)) return -1;
    rope->first = first, rope->step = step;
    return 0;
}

/* The fused kernel reproduces the separate ops where they take their 16-byte paths, which needs
 * the data so aligned (every row then is too, widths being multiples of 8); the dense copies of
 * strided data are. NULL (no weight) passes. */
static int fusable(const dsrt_tensor *t) { return !t || (uintptr_t)dev_data(t) % 16 == 0; }

dsrt_tensor *dsrt_nn_norm_rope(dsrt_tensor *x, dsrt_nn_norm norm, dsrt_tensor *weight, float eps, int64_t first,
                               int64_t step, double theta, const dsrt_yarn *yarn, dsrt_nn_post post,
                               dsrt_precision prec, dsrt_stream *s)
{
    return dsrt_nn_norm_rope_to(x, norm, weight, eps, first, step, theta, yarn, post, prec, DSRT_F32, s);
}

/* y (released) as dtype `out` */
static dsrt_tensor *as_dtype(dsrt_tensor *y, dsrt_dtype out, dsrt_stream *s)
{
    if (!y || y->dtype == out) return y;
    dsrt_tensor *z = dsrt_tensor_to(y, y->device, out, s, 0);
    dsrt_tensor_release(y);
    return z;
}

dsrt_tensor *dsrt_nn_norm_rope_to(dsrt_tensor *x, dsrt_nn_norm norm, dsrt_tensor *weight, float eps, int64_t first,
                                  int64_t step, double theta, const dsrt_yarn *yarn, dsrt_nn_post post,
                                  dsrt_precision prec, dsrt_dtype out, dsrt_stream *s)
{
    const char *op = "nn.norm_rope";
    dsrtk_rope rope;
    if (check_precision(op, prec) || check_any_stream(op, s) ||
        check_norm_rope(op, "x", "weight", x, norm, weight, first, step, theta, yarn, post, s, &rope))
        return NULL;
    if (out != DSRT_F32 && !(out == DSRT_BF16 && prec == DSRT_PREC_REFERENCE))
        return dsrt_err_null("%s: output dtype %s (f32, or bf16 in reference precision)", op, dsrt_dtype_name(out));
    if (!on_cuda(s))
        return as_dtype(norm_rope_by_steps(x, norm, weight, eps, first, step, theta, yarn, post, prec, s), out, s);
    dsrt_tensor *xc = dense(x, s), *wc = xc && weight ? dense(weight, s) : NULL, *y = NULL;
    if (xc && (wc || !weight) && !(fusable(xc) && fusable(wc))) {
        y = as_dtype(norm_rope_by_steps(xc, norm, wc, eps, first, step, theta, yarn, post, prec, s), out, s);
    } else if (xc && (wc || !weight) && (y = new_on(out, x->ndim, x->shape, s))) {
        int64_t heads = x->ndim == 3 ? x->shape[1] : 1, w = x->shape[x->ndim - 1];
        if (launched(op, dsrtk_nn_norm_rope(s->device, dev_data(xc), xc->dtype, wc ? dev_data(wc) : NULL,
                                            wc ? wc->dtype : DSRT_F32, dev_data(y), out, x->shape[0], heads, w, (int)norm,
                                            eps, &rope, (int)post, prec == DSRT_PREC_REFERENCE, NULL, s->handle))) {
            dsrt_tensor_release(y);
            y = NULL;
        }
    }
    dsrt_tensor_release(xc);
    dsrt_tensor_release(wc);
    return y;
}

int dsrt_nn_q_kv_norm(dsrt_tensor *qa, dsrt_tensor *q_weight, dsrt_tensor *kv, dsrt_tensor *kv_weight, float eps,
                      int64_t first, int64_t step, double theta, const dsrt_yarn *yarn, dsrt_nn_post post,
                      dsrt_precision prec, dsrt_stream *s, dsrt_tensor **qr, dsrt_tensor **kv_out)
{
    const char *op = "nn.q_kv_norm";
    dsrtk_rope rope;
    *qr = *kv_out = NULL;
    if (check_precision(op, prec) || check_any_stream(op, s) || check_arg(op, "qa", qa, 0, 0, NULL, s) ||
        check_norm_rope(op, "kv", "kv_weight", kv, DSRT_NN_NORM_RMS, kv_weight, first, step, theta, yarn, post, s, &rope))
        return -1;
    int64_t dq = qa->shape[qa->ndim - 1];
    if (q_weight && check_arg(op, "q_weight", q_weight, 0, 1, &dq, s)) return -1;
    /* one launch for aligned data (the dense copies of qa, q_weight, kv, kv_weight in ts) whose qa
     * rows fit a warp (norm_rope_kernel's second norm); else the two ops */
    dsrt_tensor *ts[4] = {NULL, NULL, NULL, NULL};
    int fused = on_cuda(s) && dq % 8 == 0 && dq <= 1024;
    for (int i = 0; fused && i < 4; i++) {
        dsrt_tensor *t = i == 0 ? qa : i == 1 ? q_weight : i == 2 ? kv : kv_weight;
        fused = !t || ((ts[i] = dense(t, s)) && fusable(ts[i]));
    }
    if (!fused) { /* (a dense copy that failed fails again there, with its message) */
        release_all(ts, 4);
        *qr = dsrt_nn_rms_norm(qa, q_weight, eps, prec, s);
        *kv_out = *qr ? dsrt_nn_norm_rope(kv, DSRT_NN_NORM_RMS, kv_weight, eps, first, step, theta, yarn, post, prec, s)
                      : NULL;
        if (*kv_out) return 0;
        dsrt_tensor_release(*qr);
        *qr = NULL;
        return -1;
    }
    dsrt_tensor *q_out = new_on(act_dtype(prec), qa->ndim, qa->shape, s);
    dsrt_tensor *y = q_out ? new_on(DSRT_F32, kv->ndim, kv->shape, s) : NULL;
    int rc = -1;
    if (y) {
        dsrtk_norm_job also = {dev_data(ts[0]), ts[1] ? dev_data(ts[1]) : NULL, dev_data(q_out), ts[0]->dtype,
                               ts[1] ? ts[1]->dtype : DSRT_F32, q_out->dtype, rows_of(qa), dq};
        int64_t heads = kv->ndim == 3 ? kv->shape[1] : 1, w = kv->shape[kv->ndim - 1];
        rc = launched(op, dsrtk_nn_norm_rope(s->device, dev_data(ts[2]), ts[2]->dtype, ts[3] ? dev_data(ts[3]) : NULL,
                                             ts[3] ? ts[3]->dtype : DSRT_F32, dev_data(y), DSRT_F32, kv->shape[0], heads, w,
                                             DSRT_NN_NORM_RMS, eps, &rope, (int)post, prec == DSRT_PREC_REFERENCE, &also,
                                             s->handle));
    }
    release_all(ts, 4);
    if (rc) {
        dsrt_tensor_release(q_out);
        dsrt_tensor_release(y);
        return -1;
    }
    *qr = q_out;
    *kv_out = y;
    return 0;
}

dsrt_tensor *dsrt_nn_sparse_attention_inverse_rope(dsrt_tensor *q, dsrt_tensor *pool, dsrt_tensor *indices,
                                                   dsrt_tensor *sink, float scale, int64_t first, int64_t step,
                                                   double theta, const dsrt_yarn *yarn, dsrt_precision prec,
                                                   dsrt_stream *s)
{
    const char *op = "nn.sparse_attention_inverse_rope";
    char ts[128];
    dsrtk_rope rope;
    if (check_attention(op, q, pool, indices, sink, prec, s)) return NULL;
    if (q->shape[2] < DSRT_NN_ROPE_DIMS)
        return dsrt_err_null("%s: q is %s, its vectors are narrower than the %d rotated dims", op,
                             dsrt_tensor_str(q, ts, sizeof ts), DSRT_NN_ROPE_DIMS);
    if (check_progression(op, q->shape[0], first, step) || rope_freqs(op, theta, yarn, rope.freqs)) return NULL;
    if (on_cuda(s)) {
        rope.first = first, rope.step = step;
        return sparse_attention_cuda(op, q, pool, indices, sink, scale, &rope, prec, s);
    }
    /* the CPU: the two ops */
    dsrt_tensor *o = dsrt_nn_sparse_attention(q, pool, indices, sink, scale, prec, s);
    dsrt_tensor *pos = o ? progression(q->shape[0], first, step, s) : NULL;
    dsrt_tensor *y = pos ? dsrt_nn_rope(o, pos, theta, yarn, 1, prec, s) : NULL;
    dsrt_tensor_release(o);
    dsrt_tensor_release(pos);
    return y;
}

/* ---- hyper-connections (SPEC §3.9, §4, §5) ---- */

/* hc_split_sinkhorn for one token, as the tilelang kernel (nn.h); comb is hc×hc row-major */
static void sinkhorn_row(const float *mix, const float *scale, const float *base, int hc, int iters, float eps,
                         float *pre, float *post, float *comb)
{
    for (int j = 0; j < hc; j++) {
        pre[j] = sigmoid(mix[j] * scale[0] + base[j]) + eps;
        post[j] = 2 * sigmoid(mix[hc + j] * scale[1] + base[hc + j]);
    }
    for (int i = 0; i < hc * hc; i++) comb[i] = mix[2 * hc + i] * scale[2] + base[2 * hc + i];
    /* softmax over each row (max subtracted), then + eps */
    for (int j = 0; j < hc; j++) {
        float *row = comb + j * hc, mx = row[0], sum = 0;
        for (int k = 1; k < hc; k++) mx = fmaxf(mx, row[k]);
        for (int k = 0; k < hc; k++) {
            row[k] = expf(row[k] - mx);
            sum += row[k];
        }
        for (int k = 0; k < hc; k++) row[k] = row[k] / sum + eps;
    }
    for (int it = 0; it < iters; it++) {
        if (it > 0) /* the first column normalisation follows the softmax directly */
            for (int j = 0; j < hc; j++) {
                float *row = comb + j * hc, sum = 0;
                for (int k = 0; k < hc; k++) sum += row[k];
                for (int k = 0; k < hc; k++) row[k] /= sum + eps;
            }
        for (int k = 0; k < hc; k++) {
            float sum = 0;
            for (int j = 0; j < hc; j++) sum += comb[j * hc + k];
            for (int j = 0; j < hc; j++) comb[j * hc + k] /= sum + eps;
        }
    }
}

/* the parameter checks Sinkhorn needs: scale [3], base [(2+hc)·hc], iters >= 1 */
static int check_sinkhorn_params(const char *op, const dsrt_tensor *scale, const dsrt_tensor *base, int hc, int iters,
                                 const dsrt_stream *s)
{
    int64_t three = 3, mix = (int64_t)(2 + hc) * hc;
    if (iters < 1) return dsrt_err("%s: Sinkhorn needs at least 1 iteration, got %d", op, iters);
    return check_arg(op, "scale", scale, 0, 1, &three, s) || check_arg(op, "base", base, 0, 1, &mix, s) ? -1 : 0;
}

/* The outputs of a multi-result function: all set, or all NULL after a failure. */
static int all_or_nothing(int rc, dsrt_tensor **a, dsrt_tensor **b, dsrt_tensor **c)
{
    if (rc || !*a || !*b || !*c) {
        dsrt_tensor_release(*a);
        dsrt_tensor_release(*b);
        dsrt_tensor_release(*c);
        *a = *b = *c = NULL;
        return -1;
    }
    return 0;
}

int dsrt_nn_sinkhorn(dsrt_tensor *mixes, dsrt_tensor *scale, dsrt_tensor *base, int hc, int iters, float eps,
                     dsrt_stream *s, dsrt_tensor **pre, dsrt_tensor **post, dsrt_tensor **comb)
{
    const char *op = "nn.sinkhorn";
    *pre = *post = *comb = NULL;
    if (check_any_stream(op, s)) return -1;
    if (hc < 1) return dsrt_err("%s: hc must be at least 1, got %d", op, hc);
    int64_t mix_shape[2] = {ANY_SIZE, (int64_t)(2 + hc) * hc};
    if (check_arg(op, "mixes", mixes, 0, 2, mix_shape, s) || check_sinkhorn_params(op, scale, base, hc, iters, s))
        return -1;
    int64_t T = mixes->shape[0], vec[2] = {T, hc}, mat[3] = {T, hc, hc};
    if (on_cuda(s)) { /* hc.cu's sinkhorn_kernel: one block per token, all iterations */
        dsrt_tensor *ts[3] = {dense(mixes, s), NULL, NULL};
        ts[1] = ts[0] ? dense(scale, s) : NULL;
        ts[2] = ts[1] ? dense(base, s) : NULL;
        if (ts[2]) {
            *pre = new_on(DSRT_F32, 2, vec, s);
            *post = new_on(DSRT_F32, 2, vec, s);
            *comb = new_on(DSRT_F32, 3, mat, s);
        }
        int rc = !*pre || !*post || !*comb ||
                 launched(op, dsrtk_nn_sinkhorn(s->device, dev_data(ts[0]), ts[0]->dtype, dev_data(ts[1]), ts[1]->dtype,
                                                dev_data(ts[2]), ts[2]->dtype, T, hc, iters, eps, dev_data(*pre),
                                                dev_data(*post), dev_data(*comb), s->handle));
        release_all(ts, 3);
        return all_or_nothing(rc, pre, post, comb);
    }
    dsrt_tensor *mv = as_f32(mixes, s), *sv = mv ? as_f32(scale, s) : NULL, *bv = sv ? as_f32(base, s) : NULL;
    if (bv) {
        *pre = new_f32(2, vec, s);
        *post = new_f32(2, vec, s);
        *comb = new_f32(3, mat, s);
    }
    if (*pre && *post && *comb) {
        const float *pm = f32_data(mv), *ps = f32_data(sv), *pb = f32_data(bv);
#pragma omp parallel for if (T * hc * hc * iters > PARALLEL_MIN)
        for (int64_t t = 0; t < T; t++)
            sinkhorn_row(pm + t * mix_shape[1], ps, pb, hc, iters, eps, f32_data(*pre) + t * hc,
                         f32_data(*post) + t * hc, f32_data(*comb) + t * hc * hc);
    }
    dsrt_tensor_release(mv);
    dsrt_tensor_release(sv);
    dsrt_tensor_release(bv);
    return all_or_nothing(!bv, pre, post, comb);
}

/* mixes [T, M] = (x·fnᵀ)·ρ for the flattened streams x [T, K] (f32, contiguous), with
 * ρ = rsqrt(mean(x²) + norm_eps) per token: the GEMM first, the norm after (SPEC §5) */
static dsrt_tensor *hc_mixes(dsrt_tensor *x, dsrt_tensor *fn, float norm_eps, dsrt_stream *s)
{
    int64_t T = x->shape[0], K = x->shape[1], M = fn->shape[0], shape[2] = {T, M};
    dsrt_tensor *fv = as_f32(fn, s), *fv_t = fv ? dsrt_tensor_transpose(fv, 0, 1) : NULL;
    dsrt_tensor *fn_t = fv_t ? dsrt_tensor_contiguous(fv_t, s) : NULL; /* [K, M], the GEMM's B */
    dsrt_tensor *mixes = fn_t ? new_f32(2, shape, s) : NULL;
    if (mixes) {
        const float *px = f32_data(x);
        float *pm = f32_data(mixes);
        dsrt_gemm_f32(T, M, K, px, K, f32_data(fn_t), M, pm, M);
        for (int64_t t = 0; t < T; t++) {
            float rho = 1.0f / sqrtf(mean_square(px + t * K, K) + norm_eps);
            for (int64_t i = 0; i < M; i++) pm[t * M + i] *= rho;
        }
    }
    dsrt_tensor_release(fv);
    dsrt_tensor_release(fv_t);
    dsrt_tensor_release(fn_t);
    return mixes;
}

/* u[t] = Σ_s w[t, s]·x[t, s] over the hc streams of d values, fp32, s in order */
static void collapse(const float *x, const float *w, int64_t T, int hc, int64_t d, float *u)
{
#pragma omp parallel for if (T * hc * d > PARALLEL_MIN)
    for (int64_t t = 0; t < T; t++)
        for (int64_t c = 0; c < d; c++) {
            float acc = 0;
            for (int st = 0; st < hc; st++) acc += w[t * hc + st] * x[(t * hc + st) * d + c];
            u[t * d + c] = acc;
        }
}

/* the checks hc_pre and hc_head share: X [T, hc, d] with hc >= 1, fn [rows, hc·d]; sets hc and d */
static int check_streams(const char *op, const dsrt_tensor *X, const dsrt_tensor *fn, int mix_per_hc, const dsrt_stream *s,
                         int *hc, int64_t *d)
{
    char ts[128];
    if (check_arg(op, "X", X, 0, 3, NULL, s)) return -1;
    if (X->shape[1] < 1 || X->shape[1] > 1024)
        return dsrt_err("%s: X is %s, expected [T, hc, d] with 1 <= hc <= 1024", op, dsrt_tensor_str(X, ts, sizeof ts));
    *hc = (int)X->shape[1];
    *d = X->shape[2];
    int64_t fn_shape[2] = {mix_per_hc ? (int64_t)(2 + *hc) * *hc : *hc, *hc * *d};
    return check_arg(op, "fn", fn, 0, 2, fn_shape, s);
}

/* the norm weight hc_pre and hc_head may take: [d], on the streams' device (NULL: none) */
static int check_norm_weight(const char *op, dsrt_tensor *norm_w, int64_t d, dsrt_stream *s)
{
    return norm_w ? check_arg(op, "norm weight", norm_w, 0, 1, &d, s) : 0;
}

/* The CPU's hc_pre / hc_head output y, then (norm_w) its RMSNorm: nn.rms_norm of the finished y */
static dsrt_tensor *normed(dsrt_tensor *y, dsrt_tensor *norm_w, float norm_eps, dsrt_precision prec, dsrt_stream *s)
{
    if (!y || !norm_w) return y;
    dsrt_tensor *x = dsrt_nn_rms_norm(y, norm_w, norm_eps, prec, s);
    dsrt_tensor_release(y);
    return x;
}

int dsrt_nn_hc_pre(dsrt_tensor *X, dsrt_tensor *fn, dsrt_tensor *scale, dsrt_tensor *base, float hc_eps,
                   float norm_eps, int iters, dsrt_tensor *norm_w, dsrt_precision prec, dsrt_stream *s,
                   dsrt_tensor **u, dsrt_tensor **post, dsrt_tensor **comb)
{
    const char *op = "nn.hc_pre";
    int hc;
    int64_t d;
    *u = *post = *comb = NULL;
    if (check_precision(op, prec) || check_any_stream(op, s) || check_streams(op, X, fn, 1, s, &hc, &d) ||
        check_sinkhorn_params(op, scale, base, hc, iters, s) || check_norm_weight(op, norm_w, d, s))
        return -1;
    int64_t T = X->shape[0], flat[2] = {T, hc * d}, ushape[2] = {T, d};
    if (on_cuda(s)) {
        int64_t vec[2] = {T, hc}, mat[3] = {T, hc, hc};
        dsrt_tensor *ts[6] = {NULL};
        int ok = (ts[0] = dense(X, s)) && (ts[1] = dense(fn, s)) && (ts[2] = dense(scale, s)) &&
                 (ts[3] = dense(base, s)) && (!norm_w || (ts[5] = dense(norm_w, s))) &&
                 (ts[4] = new_workspace(dsrtk_nn_hc_workspace(T, (int64_t)(2 + hc) * hc, hc * d), s)) &&
                 (*u = new_on(act_dtype(prec), 2, ushape, s)) && (*post = new_on(DSRT_F32, 2, vec, s)) &&
                 (*comb = new_on(DSRT_F32, 3, mat, s));
        int rc = !ok || launched(op, dsrtk_nn_hc_pre(s->device, dev_data(ts[0]), ts[0]->dtype, dev_data(ts[1]),
                                                     ts[1]->dtype, dev_data(ts[2]), ts[2]->dtype, dev_data(ts[3]),
                                                     ts[3]->dtype, T, hc, d, hc_eps, norm_eps, iters, dev_data(ts[4]),
                                                     dev_data(*u), (*u)->dtype, ts[5] ? dev_data(ts[5]) : NULL,
                                                     ts[5] ? ts[5]->dtype : 0, dev_data(*post), dev_data(*comb),
                                                     s->handle));
        release_all(ts, 6);
        return all_or_nothing(rc, u, post, comb);
    }
    dsrt_tensor *xv = as_f32(X, s), *x2 = xv ? dsrt_tensor_view(xv, 2, flat) : NULL;
    dsrt_tensor *mixes = x2 ? hc_mixes(x2, fn, norm_eps, s) : NULL, *pre = NULL;
    int rc = !mixes || dsrt_nn_sinkhorn(mixes, scale, base, hc, iters, hc_eps, s, &pre, post, comb);
    if (!rc) *u = new_f32(2, ushape, s);
    if (*u) collapse(f32_data(xv), f32_data(pre), T, hc, d, f32_data(*u));
    *u = normed(finish(*u, prec, s), norm_w, norm_eps, prec, s);
    rc = rc || !*u;
    dsrt_tensor_release(xv);
    dsrt_tensor_release(x2);
    dsrt_tensor_release(mixes);
    dsrt_tensor_release(pre);
    return all_or_nothing(rc, u, post, comb);
}

dsrt_tensor *dsrt_nn_hc_post(dsrt_tensor *f, dsrt_tensor *X, dsrt_tensor *post, dsrt_tensor *comb,
                             dsrt_precision prec, dsrt_stream *s)
{
    const char *op = "nn.hc_post";
    if (check_precision(op, prec) || check_any_stream(op, s) || check_arg(op, "X", X, 0, 3, NULL, s)) return NULL;
    int64_t T = X->shape[0], hc = X->shape[1], d = X->shape[2];
    int64_t fshape[2] = {T, d}, pshape[2] = {T, hc}, cshape[3] = {T, hc, hc};
    if (check_arg(op, "f", f, 0, 2, fshape, s) || check_arg(op, "post", post, 0, 2, pshape, s) ||
        check_arg(op, "comb", comb, 0, 3, cshape, s))
        return NULL;
    if (on_cuda(s)) { /* hc.cu's post_kernel */
        if (hc > INT_MAX) return dsrt_err_null("%s: %lld streams", op, (long long)hc);
        dsrt_tensor *ts[4] = {NULL}, *y = NULL;
        int ok = (ts[0] = dense(f, s)) && (ts[1] = dense(X, s)) && (ts[2] = dense(post, s)) &&
                 (ts[3] = dense(comb, s)) && (y = new_on(act_dtype(prec), 3, X->shape, s));
        if (ok && launched(op, dsrtk_nn_hc_post(s->device, dev_data(ts[0]), ts[0]->dtype, dev_data(ts[1]), ts[1]->dtype,
                                                dev_data(ts[2]), ts[2]->dtype, dev_data(ts[3]), ts[3]->dtype,
                                                dev_data(y), y->dtype, T, (int)hc, d, s->handle))) {
            dsrt_tensor_release(y);
            y = NULL;
        }
        release_all(ts, 4);
        return y;
    }
    dsrt_tensor *fv = as_f32(f, s), *xv = fv ? as_f32(X, s) : NULL, *pv = xv ? as_f32(post, s) : NULL;
    dsrt_tensor *cv = pv ? as_f32(comb, s) : NULL, *y = cv ? new_f32(3, X->shape, s) : NULL;
    if (y) {
        const float *pf = f32_data(fv), *px = f32_data(xv), *pp = f32_data(pv), *pc = f32_data(cv);
        float *py = f32_data(y);
#pragma omp parallel for if (T * hc * hc * d > PARALLEL_MIN)
        for (int64_t t = 0; t < T; t++)
            for (int64_t k = 0; k < hc; k++)
                for (int64_t c = 0; c < d; c++) {
                    float mixed = 0; /* Σ_j comb[j][k]·X_j: destination k reads column k */
                    for (int64_t j = 0; j < hc; j++) mixed += pc[(t * hc + j) * hc + k] * px[(t * hc + j) * d + c];
                    py[(t * hc + k) * d + c] = pp[t * hc + k] * pf[t * d + c] + mixed;
                }
    }
    dsrt_tensor_release(fv);
    dsrt_tensor_release(xv);
    dsrt_tensor_release(pv);
    dsrt_tensor_release(cv);
    return finish(y, prec, s);
}

/* hc_head's scale [1] and base [hc] */
static int check_head_params(const char *op, dsrt_tensor *scale, dsrt_tensor *base, int hc, dsrt_stream *s)
{
    int64_t one = 1, hc64 = hc;
    return check_arg(op, "scale", scale, 0, 1, &one, s) || check_arg(op, "base", base, 0, 1, &hc64, s) ? -1 : 0;
}

/* hc_post_pre (head 0) and hc_post_head (head 1) on CUDA: for few tokens hc.cu's split GEMM (one
 * token: its cluster) computes X' chunk by chunk, writes it and multiplies it with fn at once (one
 * launch and one read of X' fewer than the two calls); for many, hc_post's kernel then the
 * tensor-core GEMM; then the per-token kernel. The arguments are checked as the two functions check
 * them; hc_post_head has no post' and comb'. */
static int hc_post_fused_cuda(const char *op, int head, dsrt_tensor *f, dsrt_tensor *X, dsrt_tensor *post,
                              dsrt_tensor *comb, dsrt_tensor *fn, dsrt_tensor *scale, dsrt_tensor *base, float hc_eps,
                              float norm_eps, int iters, dsrt_tensor *norm_w, dsrt_precision prec, dsrt_stream *s,
                              dsrt_tensor **X_next, dsrt_tensor **u, dsrt_tensor **post_next, dsrt_tensor **comb_next)
{
    int hc;
    int64_t d;
    if (check_precision(op, prec) || check_streams(op, X, fn, !head, s, &hc, &d) ||
        (head ? check_head_params(op, scale, base, hc, s) : check_sinkhorn_params(op, scale, base, hc, iters, s)) ||
        check_norm_weight(op, norm_w, d, s))
        return -1;
    int64_t T = X->shape[0], fshape[2] = {T, d}, vec[2] = {T, hc}, mat[3] = {T, hc, hc};
    if (check_arg(op, "f", f, 0, 2, fshape, s) || check_arg(op, "post", post, 0, 2, vec, s) ||
        check_arg(op, "comb", comb, 0, 3, mat, s))
        return -1;
    dsrt_tensor *ts[8] = {NULL}, *Xn = NULL;
    int ok = (ts[0] = dense(f, s)) && (ts[1] = dense(X, s)) && (ts[2] = dense(post, s)) && (ts[3] = dense(comb, s)) &&
             (ts[4] = dense(fn, s)) && (ts[5] = dense(scale, s)) && (ts[6] = dense(base, s)) &&
             (!norm_w || (ts[7] = dense(norm_w, s))) &&
             (Xn = new_on(act_dtype(prec), 3, X->shape, s)) && (*u = new_on(act_dtype(prec), 2, fshape, s)) &&
             (head || ((*post_next = new_on(DSRT_F32, 2, vec, s)) && (*comb_next = new_on(DSRT_F32, 3, mat, s))));
    const int64_t M = head ? hc : (int64_t)(2 + hc) * hc;
    dsrt_tensor *work = ok ? new_workspace(dsrtk_nn_hc_workspace(T, M, hc * d), s) : NULL;
    int rc = !work;
    if (!rc) {
        dsrtk_hc_post_args pa = {dev_data(ts[0]), dev_data(ts[1]), dev_data(ts[2]), dev_data(ts[3]),
                                 ts[0]->dtype, ts[1]->dtype, ts[2]->dtype, ts[3]->dtype};
        const void *nw = ts[7] ? dev_data(ts[7]) : NULL;
        const int nw_dtype = ts[7] ? ts[7]->dtype : 0;
        rc = head ? launched(op, dsrtk_nn_hc_post_head(s->device, &pa, dev_data(Xn), Xn->dtype, dev_data(ts[4]),
                                                      ts[4]->dtype, dev_data(ts[5]), ts[5]->dtype, dev_data(ts[6]),
                                                      ts[6]->dtype, T, hc, d, hc_eps, norm_eps, dev_data(work),
                                                      dev_data(*u), (*u)->dtype, nw, nw_dtype, s->handle))
                  : launched(op, dsrtk_nn_hc_post_pre(s->device, &pa, dev_data(Xn), Xn->dtype, dev_data(ts[4]),
                                                      ts[4]->dtype, dev_data(ts[5]), ts[5]->dtype, dev_data(ts[6]),
                                                      ts[6]->dtype, T, hc, d, hc_eps, norm_eps, iters, dev_data(work),
                                                      dev_data(*u), (*u)->dtype, nw, nw_dtype, dev_data(*post_next),
                                                      dev_data(*comb_next), s->handle));
    }
    release_all(ts, 8);
    dsrt_tensor_release(work);
    if (head ? rc || !*u : all_or_nothing(rc, u, post_next, comb_next)) {
        dsrt_tensor_release(*u);
        *u = NULL;
        dsrt_tensor_release(Xn);
        return -1;
    }
    *X_next = Xn;
    return 0;
}

/* On the CPU the composition of the two functions; on CUDA the fused kernels above. */
int dsrt_nn_hc_post_pre(dsrt_tensor *f, dsrt_tensor *X, dsrt_tensor *post, dsrt_tensor *comb, dsrt_tensor *fn,
                        dsrt_tensor *scale, dsrt_tensor *base, float hc_eps, float norm_eps, int iters,
                        dsrt_tensor *norm_w, dsrt_precision prec, dsrt_stream *s, dsrt_tensor **X_next,
                        dsrt_tensor **u, dsrt_tensor **post_next, dsrt_tensor **comb_next)
{
    *X_next = *u = *post_next = *comb_next = NULL;
    if (check_any_stream("nn.hc_post_pre", s)) return -1;
    if (on_cuda(s))
        return hc_post_fused_cuda("nn.hc_post_pre", 0, f, X, post, comb, fn, scale, base, hc_eps, norm_eps, iters, norm_w,
                                  prec, s, X_next, u, post_next, comb_next);
    dsrt_tensor *Xn = dsrt_nn_hc_post(f, X, post, comb, prec, s);
    if (!Xn) return -1;
    if (dsrt_nn_hc_pre(Xn, fn, scale, base, hc_eps, norm_eps, iters, norm_w, prec, s, u, post_next, comb_next)) {
        dsrt_tensor_release(Xn);
        return -1;
    }
    *X_next = Xn;
    return 0;
}

/* The same with hc_head: on the CPU the two functions, on CUDA the fused kernels. */
int dsrt_nn_hc_post_head(dsrt_tensor *f, dsrt_tensor *X, dsrt_tensor *post, dsrt_tensor *comb, dsrt_tensor *fn,
                         dsrt_tensor *scale, dsrt_tensor *base, float hc_eps, float norm_eps, dsrt_tensor *norm_w,
                         dsrt_precision prec, dsrt_stream *s, dsrt_tensor **X_next, dsrt_tensor **y)
{
    *X_next = *y = NULL;
    if (check_any_stream("nn.hc_post_head", s)) return -1;
    if (on_cuda(s))
        return hc_post_fused_cuda("nn.hc_post_head", 1, f, X, post, comb, fn, scale, base, hc_eps, norm_eps, 1, norm_w,
                                  prec, s, X_next, y, NULL, NULL);
    int hc;
    int64_t d;
    const char *op = "nn.hc_post_head";
    if (check_precision(op, prec) || check_streams(op, X, fn, 0, s, &hc, &d) || check_head_params(op, scale, base, hc, s) ||
        check_norm_weight(op, norm_w, d, s))
        return -1; /* the head's arguments before hc_post's work */
    dsrt_tensor *Xn = dsrt_nn_hc_post(f, X, post, comb, prec, s);
    if (!Xn) return -1;
    if (!(*y = dsrt_nn_hc_head(Xn, fn, scale, base, hc_eps, norm_eps, norm_w, prec, s))) {
        dsrt_tensor_release(Xn);
        return -1;
    }
    *X_next = Xn;
    return 0;
}

dsrt_tensor *dsrt_nn_hc_head(dsrt_tensor *X, dsrt_tensor *fn, dsrt_tensor *scale, dsrt_tensor *base, float hc_eps,
                             float norm_eps, dsrt_tensor *norm_w, dsrt_precision prec, dsrt_stream *s)
{
    const char *op = "nn.hc_head";
    int hc;
    int64_t d;
    if (check_precision(op, prec) || check_any_stream(op, s) || check_streams(op, X, fn, 0, s, &hc, &d) ||
        check_head_params(op, scale, base, hc, s) || check_norm_weight(op, norm_w, d, s))
        return NULL;
    int64_t T = X->shape[0], flat[2] = {T, hc * d}, yshape[2] = {T, d};
    if (on_cuda(s)) { /* hc.cu: the split GEMM, then the weights and the collapse (and the norm) */
        dsrt_tensor *ts[6] = {NULL}, *y = NULL;
        int ok = (ts[0] = dense(X, s)) && (ts[1] = dense(fn, s)) && (ts[2] = dense(scale, s)) &&
                 (ts[3] = dense(base, s)) && (!norm_w || (ts[5] = dense(norm_w, s))) &&
                 (ts[4] = new_workspace(dsrtk_nn_hc_workspace(T, hc, hc * d), s)) &&
                 (y = new_on(act_dtype(prec), 2, yshape, s));
        if (ok && launched(op, dsrtk_nn_hc_head(s->device, dev_data(ts[0]), ts[0]->dtype, dev_data(ts[1]), ts[1]->dtype,
                                                dev_data(ts[2]), ts[2]->dtype, dev_data(ts[3]), ts[3]->dtype, T, hc, d,
                                                hc_eps, norm_eps, dev_data(ts[4]), dev_data(y), y->dtype,
                                                ts[5] ? dev_data(ts[5]) : NULL, ts[5] ? ts[5]->dtype : 0, s->handle))) {
            dsrt_tensor_release(y);
            y = NULL;
        }
        release_all(ts, 6);
        return y;
    }
    dsrt_tensor *xv = as_f32(X, s), *x2 = xv ? dsrt_tensor_view(xv, 2, flat) : NULL;
    dsrt_tensor *mixes = x2 ? hc_mixes(x2, fn, norm_eps, s) : NULL;
    dsrt_tensor *sv = mixes ? as_f32(scale, s) : NULL, *bv = sv ? as_f32(base, s) : NULL;
    dsrt_tensor *y = bv ? new_f32(2, yshape, s) : NULL;
    if (y) {
        /* the weights overwrite the mixes: w_s = σ(mixes_s·scale + base_s) + hc_eps */
        float *pw = f32_data(mixes);
        const float *pb = f32_data(bv);
        float sc = f32_data(sv)[0];
        for (int64_t t = 0; t < T; t++)
            for (int st = 0; st < hc; st++) pw[t * hc + st] = sigmoid(pw[t * hc + st] * sc + pb[st]) + hc_eps;
        collapse(f32_data(xv), pw, T, hc, d, f32_data(y));
    }
    dsrt_tensor_release(xv);
    dsrt_tensor_release(x2);
    dsrt_tensor_release(mixes);
    dsrt_tensor_release(sv);
    dsrt_tensor_release(bv);
    return normed(finish(y, prec, s), norm_w, norm_eps, prec, s);
}

dsrt_tensor *dsrt_nn_hc_expand(dsrt_tensor *e, int hc, dsrt_stream *s)
{
    const char *op = "nn.hc_expand";
    if (check_any_stream(op, s) || check_arg(op, "e", e, 0, 2, NULL, s)) return NULL;
    if (hc < 1) return dsrt_err_null("%s: hc must be at least 1, got %d", op, hc);
    int64_t T = e->shape[0], d = e->shape[1], one_stream[3] = {T, 1, d}, streams[3] = {T, hc, d};
    dsrt_tensor *src = dsrt_tensor_reshape(e, 3, one_stream, s);
    dsrt_tensor *X = src ? dsrt_tensor_new(e->dtype, 3, streams, s->device, s) : NULL; /* either device */
    if (X && dsrt_op_copy(X, src, s)) { /* the copy broadcasts the one stream to hc */
        dsrt_tensor_release(X);
        X = NULL;
    }
    dsrt_tensor_release(src);
    return X;
}
