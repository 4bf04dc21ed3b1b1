/*
 * linear.c - the linear layers (linear.h): construction checks, the exact dequantised weight cache
 * and the CPU forward.
 *
 * What this protects: a forward never reads a weight or scale the constructor has not checked
 * against the format, and the reference numerics (SPEC §3.5) come from one place: Q8 of the
 * activation (quant.h, the same definition the KV latent and the indexer use), an fp32 GEMM over
 * exactly dequantised weights (dsrt_gemm_f32, the CPU matmul's kernel), one bf16 rounding of the
 * output. See linear.h for why that equals the reference's blocked FP8/FP4 GEMM up to the order of
 * fp32 additions.
 *
 * On CUDA the same computation runs in kernels/linear.cu (dsrtk_linear) straight from the native
 * weight formats: the dequantised cache is never built for a CUDA weight (it would cost 4 bytes per
 * weight element of device memory). A decode call (<= 8 rows) takes no workspace at all; a prefill
 * call takes a per-call workspace (the prepared activation and at most one bounded slab of
 * dequantised weight), sized by dsrtk_linear_workspace and released as soon as the work is queued
 * (the allocator keeps it from reuse until the stream has passed it).
 */
#include <stdlib.h>
#include <string.h>
#include "err.h"
#include "kernels.h"
#include "linear.h"
#include "ops.h"

static const char *const FORMAT_NAMES[] = {"bf16", "fp8", "fp4"};
static const dsrt_dtype WEIGHT_DTYPE[] = {DSRT_BF16, DSRT_F8E4M3, DSRT_FP4E2M1};

/* below this many elements a loop is not worth waking the OpenMP team for */
enum { PARALLEL_MIN = 1 << 16 };

int dsrt_weight_format_from_name(const char *name, dsrt_weight_format *out)
{
    for (int f = 0; f < 3; f++) {
        if (!strcmp(name, FORMAT_NAMES[f])) {
            *out = (dsrt_weight_format)f;
            return 0;
        }
    }
    return dsrt_err("linear: unknown weight format \"%s\" (expected bf16, fp8 or fp4)", name);
}

const char *dsrt_weight_format_name(dsrt_weight_format format) { return FORMAT_NAMES[format]; }

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

static int check_scale(const dsrt_tensor *weight, const dsrt_tensor *scale, const dsrt_linear_config *c)
{
    char wb[DSRT_SHAPE_BUF], sb[DSRT_SHAPE_BUF], eb[DSRT_SHAPE_BUF];
    const char *fmt = FORMAT_NAMES[c->format];
    dsrt_tensor_str(weight, wb, sizeof wb);
    if (c->format == DSRT_FORMAT_BF16) {
        if (scale) return dsrt_err("linear: a bf16 weight takes no scale, got %s", dsrt_tensor_str(scale, sb, sizeof sb));
        return 0;
    }
    if (c->block_rows < 1 || c->block_cols < 1)
        return dsrt_err("linear: %s scale blocks must be at least 1x1, got %lldx%lld", fmt, (long long)c->block_rows,
                        (long long)c->block_cols);
    int64_t want[2] = {ceil_div(weight->shape[0], c->block_rows), ceil_div(weight->shape[1], c->block_cols)};
    dsrt_shape_str(2, want, eb, sizeof eb);
    const char *dtypes = c->format == DSRT_FORMAT_FP8 ? "f8e8m0 or f32" : "f8e8m0";
    if (!scale)
        return dsrt_err("linear: %s weight %s needs a scale (%s %s, one per %lldx%lld block)", fmt, wb, dtypes, eb,
                        (long long)c->block_rows, (long long)c->block_cols);
    dsrt_tensor_str(scale, sb, sizeof sb);
    int dtype_ok = scale->dtype == DSRT_F8E8M0 || (c->format == DSRT_FORMAT_FP8 && scale->dtype == DSRT_F32);
    if (!dtype_ok) return dsrt_err("linear: %s weight %s: scale %s must be %s", fmt, wb, sb, dtypes);
    if (scale->ndim != 2 || scale->shape[0] != want[0] || scale->shape[1] != want[1])
        return dsrt_err("linear: %s weight %s: scale %s, expected %s (one per %lldx%lld block)", fmt, wb, sb, eb,
                        (long long)c->block_rows, (long long)c->block_cols);
    if (scale->device != weight->device) return dsrt_err("linear: weight %s and scale %s are on different devices", wb, sb);
    return 0;
}

dsrt_linear *dsrt_linear_new(dsrt_tensor *weight, dsrt_tensor *scale, const dsrt_linear_config *cfg)
{
    char wb[DSRT_SHAPE_BUF];
    if ((unsigned)cfg->format > DSRT_FORMAT_FP4) return dsrt_err_null("linear: unknown weight format %d", (int)cfg->format);
    const char *fmt = FORMAT_NAMES[cfg->format];
    if (!weight) return dsrt_err_null("linear: no weight");
    dsrt_tensor_str(weight, wb, sizeof wb);
    if (cfg->groups < 1) return dsrt_err_null("linear: groups must be at least 1, got %d", cfg->groups);
    if (cfg->in_features < 1 || cfg->out_features < 1 || cfg->in_features > INT32_MAX)
        return dsrt_err_null("linear: %lld input and %lld output features (each must be in 1..2^31-1)",
                             (long long)cfg->in_features, (long long)cfg->out_features);
    if (cfg->in_features % cfg->groups || cfg->out_features % cfg->groups)
        return dsrt_err_null("linear: %lld input and %lld output features do not split into %d groups",
                             (long long)cfg->in_features, (long long)cfg->out_features, cfg->groups);
    if (weight->dtype != WEIGHT_DTYPE[cfg->format])
        return dsrt_err_null("linear: format %s needs a %s weight, got %s%s", fmt, dsrt_dtype_name(WEIGHT_DTYPE[cfg->format]), wb,
                             cfg->format == DSRT_FORMAT_FP4 && weight->dtype == DSRT_I8
                                 ? " (read the checkpoint's packed I8 as codes: bitcast(\"fp4e2m1\"))" : "");
    int64_t in_per_group = cfg->in_features / cfg->groups;
    if (weight->ndim != 2 || weight->shape[0] != cfg->out_features || weight->shape[1] != in_per_group)
        return dsrt_err_null("linear: weight %s, expected [%lld, %lld] (out, in%s)", wb, (long long)cfg->out_features,
                             (long long)in_per_group, cfg->groups > 1 ? " / groups" : "");
    if (check_scale(weight, scale, cfg)) return NULL;
    dsrt_linear *l = calloc(1, sizeof *l);
    if (!l) return dsrt_err_null("linear: out of host memory");
    atomic_init(&l->refcount, 1);
    l->cfg = *cfg;
    if (cfg->format == DSRT_FORMAT_BF16) l->cfg.block_rows = l->cfg.block_cols = 0;
    l->weight = weight;
    dsrt_tensor_retain(weight);
    l->scale = scale;
    if (scale) dsrt_tensor_retain(scale);
    atomic_init(&l->weight_t, NULL);
    return l;
}

void dsrt_linear_retain(dsrt_linear *l) { atomic_fetch_add(&l->refcount, 1); }

void dsrt_linear_release(dsrt_linear *l)
{
    if (!l || atomic_fetch_sub(&l->refcount, 1) != 1) return;
    dsrt_tensor_release(l->weight);
    dsrt_tensor_release(l->scale);
    dsrt_tensor_release(atomic_load(&l->weight_t));
    free(l);
}

dsrt_dtype dsrt_linear_out_dtype(const dsrt_linear *l, dsrt_precision prec)
{
    return prec == DSRT_PREC_FP32 || l->cfg.fp32_math ? DSRT_F32 : DSRT_BF16;
}

/* Q8 in front of the GEMM: reference FP8/FP4 linears only, never the grouped wo_a (SPEC §3.5, §6.8) */
static int quantises_activation(const dsrt_linear *l, dsrt_precision prec)
{
    return prec == DSRT_PREC_REFERENCE && l->cfg.format != DSRT_FORMAT_BF16 && l->cfg.groups == 1 && !l->cfg.fp32_math;
}

/* W·S exactly in f32, stored [groups, in/groups, out/groups]: element (g, c, r) = W[g·R + r, c] */
static dsrt_tensor *dequantise_transposed(const dsrt_linear *l, dsrt_stream *s)
{
    const dsrt_linear_config *c = &l->cfg;
    int64_t groups = c->groups, in_g = c->in_features / groups, r_g = c->out_features / groups;
    int64_t shape[3] = {groups, in_g, r_g};
    dsrt_tensor *wt = dsrt_tensor_new(DSRT_F32, 3, shape, DSRT_CPU, s);
    if (!wt) return NULL;
    float *dst = (float *)wt->storage->data;
    const dsrt_tensor *w = l->weight, *sc = l->scale;
#pragma omp parallel for if (c->out_features * in_g > PARALLEL_MIN)
    for (int64_t row = 0; row < c->out_features; row++) {
        float *column = dst + row / r_g * in_g * r_g + row % r_g;
        for (int64_t col = 0; col < in_g; col++) {
            float v = dsrt_load_f32(w->storage->data, w->dtype, w->offset + row * w->stride[0] + col * w->stride[1]);
            if (sc) {
                int64_t si = sc->offset + row / c->block_rows * sc->stride[0] + col / c->block_cols * sc->stride[1];
                v *= dsrt_load_f32(sc->storage->data, sc->dtype, si);
            }
            column[col * r_g] = v;
        }
    }
    return wt;
}

/* the dequantised cache, built by the first caller; a racing builder's copy is dropped */
static const float *dequantised(dsrt_linear *l, dsrt_stream *s)
{
    dsrt_tensor *wt = atomic_load(&l->weight_t);
    if (!wt) {
        dsrt_tensor *fresh = dequantise_transposed(l, s);
        if (!fresh) return NULL;
        if (atomic_compare_exchange_strong(&l->weight_t, &wt, fresh)) {
            wt = fresh;
        } else {
            dsrt_tensor_release(fresh);
        }
    }
    return (const float *)wt->storage->data;
}

int dsrt_linear_rows(dsrt_linear *l, const float *x, int64_t rows, float *y, dsrt_precision prec, dsrt_stream *s)
{
    char dev[16];
    if (l->weight->device != DSRT_CPU)
        return dsrt_err("linear: the host-buffer interface needs weights on the CPU, these are on %s "
                        "(use dsrt_linear_forward_into with device tensors)", dsrt_device_str(l->weight->device, dev));
    if (rows == 0) return 0;
    const float *wt = dequantised(l, s);
    if (!wt) return -1;
    const dsrt_linear_config *c = &l->cfg;
    int64_t in = c->in_features, out = c->out_features, in_g = in / c->groups, r_g = out / c->groups;
    const float *a = x;
    dsrt_tensor *quantised = NULL;
    if (quantises_activation(l, prec)) {
        int64_t shape[2] = {rows, in};
        quantised = dsrt_tensor_new(DSRT_F32, 2, shape, DSRT_CPU, s);
        if (!quantised) return -1;
        float *q = (float *)quantised->storage->data;
        memcpy(q, x, (size_t)(rows * in) * sizeof *q);
#pragma omp parallel for if (rows * in > PARALLEL_MIN)
        for (int64_t r = 0; r < rows; r++) dsrt_q8_roundtrip(q + r * in, (int)in, DSRT_ACT_BLOCK);
        a = q;
    }
    for (int64_t g = 0; g < c->groups; g++)
        dsrt_gemm_f32(rows, r_g, in_g, a + g * in_g, in, wt + g * in_g * r_g, r_g, y + g * r_g, out);
    if (dsrt_linear_out_dtype(l, prec) == DSRT_BF16) {
        int64_t n = rows * out;
#pragma omp parallel for if (n > PARALLEL_MIN)
        for (int64_t i = 0; i < n; i++) y[i] = dsrt_bf16_to_f32(dsrt_f32_to_bf16(y[i]));
    }
    dsrt_tensor_release(quantised);
    return 0;
}

dsrt_tensor *dsrt_linear_input(dsrt_tensor *x, dsrt_stream *s)
{
    return x->dtype == DSRT_F32 ? dsrt_tensor_contiguous(x, s) : dsrt_tensor_to(x, x->device, DSRT_F32, s, 0);
}

int dsrt_linear_check_input(const dsrt_tensor *x, int64_t width, int device, const dsrt_stream *s, const char *op)
{
    char xb[DSRT_SHAPE_BUF], dev[16];
    if (x->dtype != DSRT_BF16 && x->dtype != DSRT_F32) return dsrt_err("%s: input %s must be bf16 or f32",
                                                                       op, dsrt_tensor_str(x, xb, sizeof xb));
    if (x->ndim < 1 || x->shape[x->ndim - 1] != width)
        return dsrt_err("%s: input %s must end in the layer's %lld input features",
                        op, dsrt_tensor_str(x, xb, sizeof xb), (long long)width);
    if (x->device != device || s->device != device)
        return dsrt_err("%s: input %s, the weights (on %s) and the stream must be on one device",
                        op, dsrt_tensor_str(x, xb, sizeof xb),
                        dsrt_device_str(device, dev));
    return 0;
}

/* the launcher's description of the layer's weight (device pointers at the tensors' offsets) */
static dsrtk_linear_weight kernel_weight(const dsrt_linear *l)
{
    const dsrt_tensor *w = l->weight, *sc = l->scale;
    dsrtk_linear_weight k = {0};
    k.format = (int)l->cfg.format;
    k.groups = l->cfg.groups;
    k.out = l->cfg.out_features;
    k.in = l->cfg.in_features;
    k.ld = w->stride[0];
    size_t bits = (size_t)dsrt_dtype_bits(w->dtype);
    k.weight = (const char *)w->storage->data + (size_t)w->offset * bits / 8;
    if (sc) {
        k.scale = (const char *)sc->storage->data + (size_t)sc->offset * (size_t)dsrt_dtype_bits(sc->dtype) / 8;
        k.scale_dtype = (int)sc->dtype;
        k.scale_ld0 = sc->stride[0];
        k.scale_ld1 = sc->stride[1];
        k.block_rows = l->cfg.block_rows;
        k.block_cols = l->cfg.block_cols;
    }
    return k;
}

/* whether the kernels can read the weight: contiguous rows, fp4 rows starting on whole bytes */
static int cuda_layout(const dsrt_linear *l)
{
    const dsrt_tensor *w = l->weight;
    return w->stride[1] == 1 && !(w->dtype == DSRT_FP4E2M1 && ((w->offset | w->stride[0]) & 1));
}

/* y (contiguous, [rows, out] of the out dtype) from x (contiguous, bf16 or f32) on a CUDA device */
static int cuda_rows(dsrt_linear *l, dsrt_tensor *x, int64_t rows, dsrt_tensor *y, dsrt_precision prec, dsrt_stream *s)
{
    char wb[DSRT_SHAPE_BUF], xb[DSRT_SHAPE_BUF];
    const dsrt_tensor *w = l->weight;
    if (!cuda_layout(l))
        return dsrt_err("linear: weight %s must have contiguous rows (starting on whole bytes for fp4) on %s",
                        dsrt_tensor_str(w, wb, sizeof wb), "CUDA");
    dsrt_tensor *ts[4] = {l->weight, l->scale, x, y};
    for (int i = 0; i < 4; i++)
        if (ts[i] && dsrt_storage_use(ts[i]->storage, s)) return -1;
    if (rows == 0) return 0;
    dsrtk_linear_weight k = kernel_weight(l);
    int quant = quantises_activation(l, prec);
    size_t bytes = 0;
    if (dsrtk_linear_workspace(s->device, &k, rows, (int)x->dtype, quant, (int)y->dtype, &bytes))
        return dsrt_err("linear: %s", dsrtk_error());
    dsrt_tensor *ws = NULL;
    if (bytes) {
        int64_t n = (int64_t)bytes;
        ws = dsrt_tensor_new(DSRT_U8, 1, &n, s->device, s);
        if (!ws) return -1;
    }
    size_t xbits = (size_t)dsrt_dtype_bits(x->dtype), ybits = (size_t)dsrt_dtype_bits(y->dtype);
    int rc = dsrtk_linear(s->device, &k, (const char *)x->storage->data + (size_t)x->offset * xbits / 8, (int)x->dtype, rows,
                          quant, (char *)y->storage->data + (size_t)y->offset * ybits / 8, (int)y->dtype,
                          ws ? ws->storage->data : NULL, bytes, s->handle);
    dsrt_tensor_release(ws);
    if (rc) {
        const char *msg = dsrtk_error();
        if (!strncmp(msg, "linear: ", 8)) msg += 8;
        return dsrt_err("linear: %s %s, input %s: %s", dsrt_weight_format_name(l->cfg.format),
                        dsrt_tensor_str(w, wb, sizeof wb), dsrt_tensor_str(x, xb, sizeof xb), msg);
    }
    return 0;
}

/* x is a valid input of l and y a valid output for it (forward_into's contract) */
static int check_into(const dsrt_linear *l, const dsrt_tensor *x, const dsrt_tensor *y, dsrt_precision prec, const dsrt_stream *s)
{
    char xb[DSRT_SHAPE_BUF], yb[DSRT_SHAPE_BUF];
    if (dsrt_linear_check_input(x, l->cfg.in_features, l->weight->device, s, "linear")) return -1;
    int same = y->ndim == x->ndim && y->device == x->device && y->dtype == dsrt_linear_out_dtype(l, prec) &&
               dsrt_tensor_is_contiguous(y) && y->shape[y->ndim - 1] == l->cfg.out_features;
    for (int d = 0; same && d < x->ndim - 1; d++) same = y->shape[d] == x->shape[d];
    if (!same)
        return dsrt_err("linear: output %s for input %s must be a contiguous %s [..., %lld] on the input's device",
                        dsrt_tensor_str(y, yb, sizeof yb), dsrt_tensor_str(x, xb, sizeof xb),
                        dsrt_dtype_name(dsrt_linear_out_dtype(l, prec)), (long long)l->cfg.out_features);
    return 0;
}

int dsrt_linear_forward_into(dsrt_linear *l, dsrt_tensor *x, dsrt_tensor *y, dsrt_precision prec, dsrt_stream *s)
{
    if (check_into(l, x, y, prec, s)) return -1;
    if (x->device == DSRT_CPU) {
        dsrt_tensor *r = dsrt_linear_forward(l, x, prec, s);
        if (!r) return -1;
        int rc = dsrt_op_copy(y, r, s);
        dsrt_tensor_release(r);
        return rc;
    }
    dsrt_tensor *xc = dsrt_tensor_contiguous(x, s);
    if (!xc) return -1;
    int rc = cuda_rows(l, xc, dsrt_tensor_numel(x) / l->cfg.in_features, y, prec, s);
    dsrt_tensor_release(xc);
    return rc;
}

/* the pair in one launch (dsrtk_linear_pair); *launched 0 when the kernels take them apart */
static int cuda_pair(dsrt_linear *l0, dsrt_linear *l1, dsrt_tensor *x, dsrt_tensor *y0, dsrt_tensor *y1, dsrt_precision prec,
                     dsrt_stream *s, int *launched)
{
    char xb[DSRT_SHAPE_BUF];
    *launched = 0;
    int quant = quantises_activation(l0, prec);
    if (quant != quantises_activation(l1, prec) || y0->dtype != y1->dtype) return 0;
    dsrt_tensor *ts[] = {l0->weight, l0->scale, l1->weight, l1->scale, x, y0, y1};
    for (size_t i = 0; i < sizeof ts / sizeof *ts; i++)
        if (ts[i] && dsrt_storage_use(ts[i]->storage, s)) return -1;
    dsrtk_linear_weight k0 = kernel_weight(l0), k1 = kernel_weight(l1);
    const int64_t rows = dsrt_tensor_numel(x) / l0->cfg.in_features;
    size_t bytes = 0;
    if (dsrtk_linear_pair_workspace(s->device, &k0, &k1, rows, (int)x->dtype, quant, (int)y0->dtype, &bytes))
        return dsrt_err("linear: the pair over input %s: %s", dsrt_tensor_str(x, xb, sizeof xb), dsrtk_error());
    dsrt_tensor *ws = NULL;
    if (bytes) {
        int64_t n = (int64_t)bytes;
        if (!(ws = dsrt_tensor_new(DSRT_U8, 1, &n, s->device, s))) return -1;
    }
    size_t xbits = (size_t)dsrt_dtype_bits(x->dtype), ybits = (size_t)dsrt_dtype_bits(y0->dtype);
    int rc = dsrtk_linear_pair(s->device, &k0, &k1, (const char *)x->storage->data + (size_t)x->offset * xbits / 8,
                               (int)x->dtype, rows, quant, (char *)y0->storage->data + (size_t)y0->offset * ybits / 8,
                               (char *)y1->storage->data + (size_t)y1->offset * ybits / 8, (int)y0->dtype,
                               ws ? ws->storage->data : NULL, bytes, s->handle, launched);
    dsrt_tensor_release(ws);
    if (rc) return dsrt_err("linear: the pair over input %s: %s", dsrt_tensor_str(x, xb, sizeof xb), dsrtk_error());
    return 0;
}

int dsrt_linear_forward_pair_into(dsrt_linear *l0, dsrt_linear *l1, dsrt_tensor *x, dsrt_tensor *y0, dsrt_tensor *y1,
                                  dsrt_precision prec, dsrt_stream *s)
{
    if (l0->cfg.in_features != l1->cfg.in_features)
        return dsrt_err("linear: a pair must read the same input: %lld and %lld input features", (long long)l0->cfg.in_features,
                        (long long)l1->cfg.in_features);
    if (check_into(l0, x, y0, prec, s) || check_into(l1, x, y1, prec, s)) return -1;
    int launched = 0;
    if (x->device != DSRT_CPU && l0->weight->device == l1->weight->device && cuda_layout(l0) && cuda_layout(l1)) {
        dsrt_tensor *xc = dsrt_tensor_contiguous(x, s);
        int rc = xc ? cuda_pair(l0, l1, xc, y0, y1, prec, s, &launched) : -1;
        dsrt_tensor_release(xc);
        if (rc) return -1;
    }
    return launched || (!dsrt_linear_forward_into(l0, x, y0, prec, s) && !dsrt_linear_forward_into(l1, x, y1, prec, s)) ? 0 : -1;
}

int dsrt_linear_forward_pair(dsrt_linear *l0, dsrt_linear *l1, dsrt_tensor *x, dsrt_precision prec, dsrt_stream *s,
                             dsrt_tensor **y0, dsrt_tensor **y1)
{
    *y0 = *y1 = NULL;
    if (l0->cfg.in_features != l1->cfg.in_features)
        return dsrt_err("linear: a pair must read the same input: %lld and %lld input features", (long long)l0->cfg.in_features,
                        (long long)l1->cfg.in_features);
    int launched = 0;
    if (x->device != DSRT_CPU && l0->weight->device == l1->weight->device &&
        !dsrt_linear_check_input(x, l0->cfg.in_features, l0->weight->device, s, "linear") && cuda_layout(l0) &&
        cuda_layout(l1)) {
        int64_t shape[DSRT_MAX_DIMS];
        memcpy(shape, x->shape, sizeof shape);
        dsrt_tensor *xc = dsrt_tensor_contiguous(x, s);
        shape[x->ndim - 1] = l0->cfg.out_features;
        *y0 = xc ? dsrt_tensor_new(dsrt_linear_out_dtype(l0, prec), x->ndim, shape, x->device, s) : NULL;
        shape[x->ndim - 1] = l1->cfg.out_features;
        *y1 = *y0 ? dsrt_tensor_new(dsrt_linear_out_dtype(l1, prec), x->ndim, shape, x->device, s) : NULL;
        int rc = *y1 ? cuda_pair(l0, l1, xc, *y0, *y1, prec, s, &launched) : -1;
        dsrt_tensor_release(xc);
        if (rc || !launched) {
            dsrt_tensor_release(*y0);
            dsrt_tensor_release(*y1);
            *y0 = *y1 = NULL;
            if (rc) return -1;
        }
    }
    if (!launched) { /* the forwards say what is wrong, if anything */
        *y0 = dsrt_linear_forward(l0, x, prec, s);
        *y1 = *y0 ? dsrt_linear_forward(l1, x, prec, s) : NULL;
        if (!*y1) {
            dsrt_tensor_release(*y0);
            *y0 = NULL;
            return -1;
        }
    }
    return 0;
}

dsrt_tensor *dsrt_linear_forward(dsrt_linear *l, dsrt_tensor *x, dsrt_precision prec, dsrt_stream *s)
{
    if (dsrt_linear_check_input(x, l->cfg.in_features, l->weight->device, s, "linear")) return NULL;
    int64_t shape[DSRT_MAX_DIMS];
    memcpy(shape, x->shape, sizeof shape);
    shape[x->ndim - 1] = l->cfg.out_features;
    if (x->device != DSRT_CPU) {
        dsrt_tensor *y = dsrt_tensor_new(dsrt_linear_out_dtype(l, prec), x->ndim, shape, x->device, s);
        if (y && dsrt_linear_forward_into(l, x, y, prec, s)) {
            dsrt_tensor_release(y);
            return NULL;
        }
        return y;
    }
    dsrt_tensor *xf = dsrt_linear_input(x, s);
    dsrt_tensor *y = xf ? dsrt_tensor_new(DSRT_F32, x->ndim, shape, DSRT_CPU, s) : NULL;
    int rc = y ? dsrt_linear_rows(l, (const float *)xf->storage->data + xf->offset, dsrt_tensor_numel(x) / l->cfg.in_features,
                                  (float *)y->storage->data, prec, s)
               : -1;
    dsrt_tensor_release(xf);
    if (rc) {
        dsrt_tensor_release(y);
        return NULL;
    }
    if (dsrt_linear_out_dtype(l, prec) == DSRT_F32) return y;
    dsrt_tensor *rounded = dsrt_tensor_to(y, DSRT_CPU, DSRT_BF16, s, 0);
    dsrt_tensor_release(y);
    return rounded;
}
