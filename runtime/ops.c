/*
 * ops.c - generic tensor ops: checks, broadcasting, dispatch, and the CPU implementations.
 *
 * The CPU versions are the references the CUDA kernels are tested against, so they are written
 * for clarity over strided views with the same per-element functions (numeric.h, opmath.h) the
 * kernels use; OpenMP spreads them over the cores. Float sums accumulate in double here, which
 * makes the CPU the more accurate side of any GPU comparison.
 */
#include "ops.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "err.h"
#include "kernels.h"

static const char *binary_names[DSRT_NBINARY] = {"add", "sub", "mul", "div", "idiv", "mod", "pow", "maximum",
                                                  "minimum", "eq", "ne", "lt", "le", "gt", "ge"};
static const char *unary_names[DSRT_NUNARY] = {"neg", "abs", "exp", "log", "sqrt", "rsqrt", "sin", "cos", "tanh",
                                                "sigmoid", "silu", "relu"};
static const char *reduce_names[DSRT_NREDUCE] = {"sum", "mean", "max", "min", "argmax", "argmin"};

const char *dsrt_op_binary_name(int op) { return binary_names[op]; }
const char *dsrt_op_unary_name(int op) { return unary_names[op]; }
const char *dsrt_op_reduce_name(int op) { return reduce_names[op]; }

/* ---- checks ---- */

/* All tensors on the stream's device; records the stream on their storage for the allocator. */
static int prepare(const char *op, dsrt_stream *s, dsrt_tensor **ts, int n)
{
    char a[96], b[16];
    for (int i = 0; i < n; i++) {
        if (!ts[i]) continue;
        if (ts[i]->device != s->device)
            return dsrt_err("%s: %s is not on the stream's device %s", op, dsrt_tensor_str(ts[i], a, sizeof a),
                            dsrt_device_str(s->device, b));
    }
    for (int i = 0; i < n; i++)
        if (ts[i] && dsrt_storage_use(ts[i]->storage, s)) return -1;
    return 0;
}

/* the launcher's message, led by the op's name unless the launcher already put it there */
static int kernel_failed(const char *op)
{
    const char *msg = dsrtk_error();
    size_t n = strlen(op);
    if (!strncmp(msg, op, n) && msg[n] == ':') return dsrt_err("%s", msg);
    return dsrt_err("%s: %s", op, msg);
}

/* Broadcast shape of a and b (numpy rules), or -1 naming both shapes. */
static int broadcast_shape(const char *op, const dsrt_tensor *a, const dsrt_tensor *b, int *ndim, int64_t *shape)
{
    int n = a->ndim > b->ndim ? a->ndim : b->ndim;
    for (int d = 0; d < n; d++) {
        int da = d - (n - a->ndim), db = d - (n - b->ndim);
        int64_t x = da >= 0 ? a->shape[da] : 1, y = db >= 0 ? b->shape[db] : 1;
        if (x != y && x != 1 && y != 1) {
            char sa[96], sb[96];
            return dsrt_err("%s: shapes do not broadcast: %s and %s (dimension %d: %lld vs %lld)", op,
                            dsrt_tensor_str(a, sa, sizeof sa), dsrt_tensor_str(b, sb, sizeof sb), d + 1,
                            (long long)x, (long long)y);
        }
        shape[d] = x == 1 ? y : x;
    }
    *ndim = n;
    return 0;
}

/* ---- CPU loops over views ---- */

static int parallel_safe(const dsrt_view *dst)
{
    /* two threads must never write the two nibbles of one fp4 byte: only contiguous, even-offset
     * fp4 destinations are split, at even (static, chunked) boundaries */
    if (dst->dtype != DSRT_FP4E2M1) return 1;
    if (dst->offset & 1) return 0;
    int64_t st = 1;
    for (int d = dst->ndim - 1; d >= 0; d--) {
        if (dst->shape[d] != 1 && dst->stride[d] != st) return 0;
        st *= dst->shape[d];
    }
    return 1;
}

static int64_t view_numel(const dsrt_view *v)
{
    int64_t n = 1;
    for (int d = 0; d < v->ndim; d++) n *= v->shape[d];
    return n;
}

static void cpu_copy(const dsrt_view *dst, const dsrt_view *src)
{
    int64_t n = view_numel(dst);
    int as_int = !dsrt_dtype_is_float(dst->dtype) && !dsrt_dtype_is_float(src->dtype);
#pragma omp parallel for schedule(static, 4096) if (n > 65536 && parallel_safe(dst))
    for (int64_t i = 0; i < n; i++) {
        int64_t di = dsrt_view_index(dst, i), si = dsrt_view_index(src, i);
        if (as_int) dsrt_store_i64(dst->data, dst->dtype, di, dsrt_load_i64(src->data, src->dtype, si));
        else dsrt_store_f32(dst->data, dst->dtype, di, dsrt_load_f32(src->data, src->dtype, si));
    }
}

static void cpu_fill(const dsrt_view *dst, double value)
{
    int64_t n = view_numel(dst);
    int as_int = !dsrt_dtype_is_float(dst->dtype);
#pragma omp parallel for schedule(static, 4096) if (n > 65536 && parallel_safe(dst))
    for (int64_t i = 0; i < n; i++) {
        int64_t di = dsrt_view_index(dst, i);
        if (as_int) dsrt_store_i64(dst->data, dst->dtype, di, (int64_t)value);
        else dsrt_store_f32(dst->data, dst->dtype, di, (float)value);
    }
}

/* ---- in-place writers ---- */

int dsrt_op_copy(dsrt_tensor *dst, dsrt_tensor *src, dsrt_stream *s)
{
    dsrt_tensor *ts[2] = {dst, src};
    if (prepare("copy", s, ts, 2)) return -1;
    dsrt_tensor *e = dsrt_tensor_expand(src, dst->ndim, dst->shape);
    if (!e) {
        char a[96], b[96];
        return dsrt_err("copy: %s does not broadcast to %s", dsrt_tensor_str(src, a, sizeof a), dsrt_tensor_str(dst, b, sizeof b));
    }
    dsrt_view dv = dsrt_tensor_desc(dst), sv = dsrt_tensor_desc(e);
    int rc = 0;
    if (s->device == DSRT_CPU) cpu_copy(&dv, &sv);
    else if (dsrtk_copy(s->device, &dv, &sv, s->handle)) rc = kernel_failed("copy");
    dsrt_tensor_release(e);
    return rc;
}

int dsrt_op_fill(dsrt_tensor *dst, double value, dsrt_stream *s)
{
    if (prepare("fill", s, &dst, 1)) return -1;
    if (!dsrt_dtype_is_float(dst->dtype) && !(value > -9.3e18 && value < 9.3e18)) {
        char buf[96];
        return dsrt_err("fill: %g does not fit %s", value, dsrt_tensor_str(dst, buf, sizeof buf));
    }
    dsrt_view dv = dsrt_tensor_desc(dst);
    if (s->device == DSRT_CPU) cpu_fill(&dv, value);
    else if (dsrtk_fill(s->device, &dv, value, s->handle)) return kernel_failed("fill");
    return 0;
}

int dsrt_op_arange(dsrt_tensor *dst, double start, double step, dsrt_stream *s)
{
    if (prepare("arange", s, &dst, 1)) return -1;
    dsrt_view dv = dsrt_tensor_desc(dst);
    if (s->device != DSRT_CPU) return dsrtk_arange(s->device, &dv, start, step, s->handle) ? kernel_failed("arange") : 0;
    int64_t n = view_numel(&dv);
    int as_float = dsrt_dtype_is_float(dv.dtype);
#pragma omp parallel for schedule(static, 4096) if (n > 65536 && parallel_safe(&dv))
    for (int64_t i = 0; i < n; i++) {
        double v = start + (double)i * step;
        int64_t di = dsrt_view_index(&dv, i);
        if (as_float) dsrt_store_f32(dv.data, dv.dtype, di, (float)v);
        else dsrt_store_i64(dv.data, dv.dtype, di, (int64_t)v);
    }
    return 0;
}

int dsrt_op_rand(dsrt_tensor *dst, uint64_t seed, uint64_t offset, int normal, double a, double b, dsrt_stream *s)
{
    if (prepare(normal ? "randn" : "rand", s, &dst, 1)) return -1;
    dsrt_view dv = dsrt_tensor_desc(dst);
    if (s->device != DSRT_CPU)
        return dsrtk_rand(s->device, &dv, seed, offset, normal, a, b, s->handle) ? kernel_failed("rand") : 0;
    int64_t n = view_numel(&dv);
    float fa = (float)a, fb = (float)b;
#pragma omp parallel for schedule(static, 4096) if (n > 65536 && parallel_safe(&dv))
    for (int64_t i = 0; i < n; i++) {
        float v = normal ? fa + fb * dsrt_rand_normal(seed, offset + (uint64_t)i)
                         : fa + (fb - fa) * dsrt_rand_uniform(seed, offset + (uint64_t)i);
        dsrt_store_f32(dv.data, dv.dtype, dsrt_view_index(&dv, i), v);
    }
    return 0;
}

/* ---- elementwise ---- */

static int computes_in_float(int op, dsrt_dtype a, dsrt_dtype b)
{
    return op == DSRT_OP_DIV || op == DSRT_OP_POW || dsrt_dtype_is_float(a) || dsrt_dtype_is_float(b);
}

static dsrt_dtype result_dtype(int op, dsrt_dtype promoted, int as_float)
{
    if (dsrt_op_is_compare(op)) return DSRT_BOOL;
    if (as_float && !dsrt_dtype_is_float(promoted)) return DSRT_F32;
    return promoted;
}

static void cpu_binary(int op, const dsrt_view *dst, const dsrt_view *a, const dsrt_view *b, int as_float)
{
    int64_t n = view_numel(dst);
#pragma omp parallel for schedule(static, 4096) if (n > 65536 && parallel_safe(dst))
    for (int64_t i = 0; i < n; i++) {
        int64_t di = dsrt_view_index(dst, i), ai = dsrt_view_index(a, i), bi = dsrt_view_index(b, i);
        if (as_float)
            dsrt_store_f32(dst->data, dst->dtype, di,
                           dsrt_binary_f32(op, dsrt_load_f32(a->data, a->dtype, ai), dsrt_load_f32(b->data, b->dtype, bi)));
        else
            dsrt_store_i64(dst->data, dst->dtype, di,
                           dsrt_binary_i64(op, dsrt_load_i64(a->data, a->dtype, ai), dsrt_load_i64(b->data, b->dtype, bi)));
    }
}

dsrt_tensor *dsrt_op_binary(int op, dsrt_tensor *a, dsrt_tensor *b, dsrt_stream *s)
{
    const char *name = binary_names[op];
    dsrt_tensor *ts[2] = {a, b};
    int ndim = 0;
    int64_t shape[DSRT_MAX_DIMS];
    if (a->device != b->device) {
        char sa[96], sb[96];
        return dsrt_err_null("%s: operands on different devices: %s and %s", name, dsrt_tensor_str(a, sa, sizeof sa),
                             dsrt_tensor_str(b, sb, sizeof sb));
    }
    if (prepare(name, s, ts, 2) || broadcast_shape(name, a, b, &ndim, shape)) return NULL;
    int as_float = computes_in_float(op, a->dtype, b->dtype);
    dsrt_tensor *out = dsrt_tensor_new(result_dtype(op, dsrt_dtype_promote(a->dtype, b->dtype), as_float), ndim, shape,
                                       s->device, s);
    if (!out) return NULL;
    dsrt_tensor *ea = dsrt_tensor_expand(a, ndim, shape), *eb = ea ? dsrt_tensor_expand(b, ndim, shape) : NULL;
    int rc = eb ? 0 : -1;
    if (!rc) {
        dsrt_view dv = dsrt_tensor_desc(out), av = dsrt_tensor_desc(ea), bv = dsrt_tensor_desc(eb);
        if (s->device == DSRT_CPU) cpu_binary(op, &dv, &av, &bv, as_float);
        else if (dsrtk_binary(s->device, op, &dv, &av, &bv, as_float, s->handle)) rc = kernel_failed(name);
    }
    dsrt_tensor_release(ea);
    dsrt_tensor_release(eb);
    if (rc) dsrt_tensor_release(out);
    return rc ? NULL : out;
}

dsrt_tensor *dsrt_op_binary_scalar(int op, dsrt_tensor *a, double x, int scalar_first, dsrt_stream *s)
{
    const char *name = binary_names[op];
    if (prepare(name, s, &a, 1)) return NULL;
    int scalar_is_int = x == floor(x) && fabs(x) < 9.2e18;
    int as_float = op == DSRT_OP_DIV || op == DSRT_OP_POW || dsrt_dtype_is_float(a->dtype) || !scalar_is_int;
    dsrt_dtype promoted = a->dtype <= DSRT_F16 ? a->dtype : dsrt_dtype_is_float(a->dtype) ? DSRT_F32
                          : scalar_is_int ? (a->dtype == DSRT_BOOL ? DSRT_I64 : a->dtype) : DSRT_F32;
    dsrt_tensor *out = dsrt_tensor_like(a, result_dtype(op, promoted, as_float), s);
    if (!out) return NULL;
    dsrt_view dv = dsrt_tensor_desc(out), av = dsrt_tensor_desc(a);
    if (s->device != DSRT_CPU) {
        if (dsrtk_binary_scalar(s->device, op, &dv, &av, x, scalar_first, as_float, s->handle)) {
            dsrt_tensor_release(out);
            kernel_failed(name);
            return NULL;
        }
        return out;
    }
    int64_t n = view_numel(&dv);
    float xf = (float)x;
    int64_t xi = scalar_is_int ? (int64_t)x : 0;
#pragma omp parallel for schedule(static, 4096) if (n > 65536 && parallel_safe(&dv))
    for (int64_t i = 0; i < n; i++) {
        int64_t di = dsrt_view_index(&dv, i), ai = dsrt_view_index(&av, i);
        if (as_float) {
            float v = dsrt_load_f32(av.data, av.dtype, ai);
            dsrt_store_f32(dv.data, dv.dtype, di, scalar_first ? dsrt_binary_f32(op, xf, v) : dsrt_binary_f32(op, v, xf));
        } else {
            int64_t v = dsrt_load_i64(av.data, av.dtype, ai);
            dsrt_store_i64(dv.data, dv.dtype, di, scalar_first ? dsrt_binary_i64(op, xi, v) : dsrt_binary_i64(op, v, xi));
        }
    }
    return out;
}

dsrt_tensor *dsrt_op_unary(int op, dsrt_tensor *a, dsrt_stream *s)
{
    const char *name = unary_names[op];
    if (prepare(name, s, &a, 1)) return NULL;
    int int_op = op == DSRT_OP_NEG || op == DSRT_OP_ABS || op == DSRT_OP_RELU;
    int as_float = dsrt_dtype_is_float(a->dtype) || !int_op;
    dsrt_dtype dt = as_float ? (a->dtype <= DSRT_F16 ? a->dtype : DSRT_F32) : (a->dtype == DSRT_BOOL ? DSRT_I64 : a->dtype);
    dsrt_tensor *out = dsrt_tensor_like(a, dt, s);
    if (!out) return NULL;
    dsrt_view dv = dsrt_tensor_desc(out), av = dsrt_tensor_desc(a);
    if (s->device != DSRT_CPU) {
        if (dsrtk_unary(s->device, op, &dv, &av, s->handle)) {
            dsrt_tensor_release(out);
            kernel_failed(name);
            return NULL;
        }
        return out;
    }
    int64_t n = view_numel(&dv);
#pragma omp parallel for schedule(static, 4096) if (n > 65536)
    for (int64_t i = 0; i < n; i++) {
        int64_t di = dsrt_view_index(&dv, i), ai = dsrt_view_index(&av, i);
        if (as_float) dsrt_store_f32(dv.data, dv.dtype, di, dsrt_unary_f32(op, dsrt_load_f32(av.data, av.dtype, ai)));
        else dsrt_store_i64(dv.data, dv.dtype, di, dsrt_unary_i64(op, dsrt_load_i64(av.data, av.dtype, ai)));
    }
    return out;
}

/* ---- reductions ---- */

static void cpu_reduce(int op, const dsrt_view *dst, const dsrt_view *src)
{
    int last = src->ndim - 1;
    int64_t len = src->shape[last], rows = view_numel(src) / len, step = src->stride[last];
    int is_float = dsrt_dtype_is_float(src->dtype);
    dsrt_view lead = *src; /* src without its last dimension: where each row starts */
    lead.ndim = last;
#pragma omp parallel for schedule(static) if (rows * len > 65536)
    for (int64_t r = 0; r < rows; r++) {
        int64_t base = dsrt_view_index(&lead, r), out = dsrt_view_index(dst, r);
        if (op == DSRT_RED_SUM || op == DSRT_RED_MEAN) {
            if (is_float || op == DSRT_RED_MEAN) {
                double acc = 0;
                for (int64_t i = 0; i < len; i++) acc += dsrt_load_f32(src->data, src->dtype, base + i * step);
                dsrt_store_f32(dst->data, dst->dtype, out, op == DSRT_RED_MEAN ? (float)(acc / (double)len) : (float)acc);
            } else {
                int64_t acc = 0;
                for (int64_t i = 0; i < len; i++) acc += dsrt_load_i64(src->data, src->dtype, base + i * step);
                dsrt_store_i64(dst->data, dst->dtype, out, acc);
            }
            continue;
        }
        int want_max = op == DSRT_RED_MAX || op == DSRT_RED_ARGMAX;
        int64_t best_i = 0;
        if (is_float) {
            float best = dsrt_load_f32(src->data, src->dtype, base);
            for (int64_t i = 1; i < len && best == best; i++) {
                float v = dsrt_load_f32(src->data, src->dtype, base + i * step);
                if (v != v || (want_max ? v > best : v < best)) best = v, best_i = i;
            }
            if (op == DSRT_RED_MAX || op == DSRT_RED_MIN) dsrt_store_f32(dst->data, dst->dtype, out, best);
        } else {
            int64_t best = dsrt_load_i64(src->data, src->dtype, base);
            for (int64_t i = 1; i < len; i++) {
                int64_t v = dsrt_load_i64(src->data, src->dtype, base + i * step);
                if (want_max ? v > best : v < best) best = v, best_i = i;
            }
            if (op == DSRT_RED_MAX || op == DSRT_RED_MIN) dsrt_store_i64(dst->data, dst->dtype, out, best);
        }
        if (op == DSRT_RED_ARGMAX || op == DSRT_RED_ARGMIN) ((int64_t *)dst->data)[out] = best_i;
    }
}

static dsrt_dtype reduce_dtype(int op, dsrt_dtype dt)
{
    int is_float = dsrt_dtype_is_float(dt);
    switch (op) {
    case DSRT_RED_SUM: return is_float ? (dt <= DSRT_F16 ? dt : DSRT_F32) : DSRT_I64;
    case DSRT_RED_MEAN: return is_float && dt <= DSRT_F16 ? dt : DSRT_F32;
    case DSRT_RED_MAX: case DSRT_RED_MIN: return dt;
    default: return DSRT_I64;
    }
}

dsrt_tensor *dsrt_op_reduce(int op, dsrt_tensor *a, int dim, int keepdim, dsrt_stream *s)
{
    const char *name = reduce_names[op];
    char buf[96];
    if (prepare(name, s, &a, 1)) return NULL;
    if (dim < -1 || dim >= a->ndim)
        return dsrt_err_null("%s: dimension %d out of range for %s", name, dim + 1, dsrt_tensor_str(a, buf, sizeof buf));
    /* move the reduced dimension last (or flatten everything into one) */
    dsrt_tensor *src;
    int64_t out_shape[DSRT_MAX_DIMS];
    int out_ndim = 0;
    if (dim < 0) {
        int64_t n = dsrt_tensor_numel(a);
        dsrt_tensor *c = dsrt_tensor_contiguous(a, s);
        src = c ? dsrt_tensor_view(c, 1, &n) : NULL;
        dsrt_tensor_release(c);
        for (int d = 0; keepdim && d < a->ndim; d++) out_shape[out_ndim++] = 1;
    } else {
        int perm[DSRT_MAX_DIMS], n = 0;
        for (int d = 0; d < a->ndim; d++)
            if (d != dim) perm[n++] = d;
        perm[n] = dim;
        src = dsrt_tensor_permute(a, perm);
        for (int d = 0; d < a->ndim; d++)
            if (d != dim || keepdim) out_shape[out_ndim++] = d == dim ? 1 : a->shape[d];
    }
    if (!src) return NULL;
    dsrt_tensor *out = dsrt_tensor_new(reduce_dtype(op, a->dtype), out_ndim, out_shape, s->device, s);
    int rc = out ? 0 : -1;
    if (!rc && src->shape[src->ndim - 1] == 0) {
        if (op == DSRT_RED_SUM || op == DSRT_RED_MEAN) rc = dsrt_op_fill(out, op == DSRT_RED_SUM ? 0.0 : NAN, s);
        else rc = dsrt_err("%s: reducing an empty dimension of %s", name, dsrt_tensor_str(a, buf, sizeof buf));
    } else if (!rc && dsrt_tensor_numel(out)) {
        dsrt_view dv = dsrt_tensor_desc(out), sv = dsrt_tensor_desc(src);
        if (s->device == DSRT_CPU) cpu_reduce(op, &dv, &sv);
        else if (dsrtk_reduce(s->device, op, &dv, &sv, s->handle)) rc = kernel_failed(name);
    }
    dsrt_tensor_release(src);
    if (rc) {
        dsrt_tensor_release(out);
        return NULL;
    }
    return out;
}

/* ---- embedding gather ---- */

/* The reference of kernels/embedding.cu: equal dtypes move raw bits (NaN payloads included), others
 * convert through numeric.h. Ids are in range (checked by the caller). */
static void cpu_embedding(const dsrt_view *dst, const dsrt_view *w, const void *ids, int ids_i64, int64_t n, int copies)
{
    int64_t cols = w->shape[1];
    size_t esize = (size_t)dsrt_dtype_bits(w->dtype) / 8;
    int same = dst->dtype == w->dtype;
#pragma omp parallel for schedule(static) if (n * copies * cols > 65536)
    for (int64_t r = 0; r < n * copies; r++) {
        int64_t k = r / copies, id = ids_i64 ? ((const int64_t *)ids)[k] : ((const int32_t *)ids)[k];
        int64_t base = w->offset + id * w->stride[0], out = dst->offset + r * cols;
        for (int64_t c = 0; c < cols; c++) {
            int64_t at = base + c * w->stride[1];
            if (same) memcpy((char *)dst->data + (out + c) * esize, (const char *)w->data + at * esize, esize);
            else dsrt_store_f32(dst->data, dst->dtype, out + c, dsrt_load_f32(w->data, w->dtype, at));
        }
    }
}

/* Host ids: each in [0, rows), or an error naming the first one outside and its position. */
static int check_host_ids(const dsrt_tensor *ids, const dsrt_tensor *weight)
{
    int64_t n = dsrt_tensor_numel(ids), rows = weight->shape[0];
    dsrt_view v = dsrt_tensor_desc(ids);
    for (int64_t i = 0; i < n; i++) {
        int64_t id = dsrt_load_i64(v.data, v.dtype, dsrt_view_index(&v, i));
        if (id < 0 || id >= rows) {
            char sw[96];
            return dsrt_err("embedding: ids[%lld] = %lld is outside the %lld rows of the weight %s", (long long)i + 1,
                            (long long)id, (long long)rows, dsrt_tensor_str(weight, sw, sizeof sw));
        }
    }
    return 0;
}

dsrt_tensor *dsrt_op_embedding(dsrt_tensor *weight, dsrt_tensor *ids, dsrt_dtype dtype, int copies, dsrt_stream *s)
{
    char sw[96], si[96], sd[16];
    if (copies < 0) return dsrt_err_null("embedding: copies must be 0 (none) or more, got %d", copies);
    if (weight->ndim != 2 || !dsrt_dtype_is_float(weight->dtype) || weight->dtype == DSRT_FP4E2M1)
        return dsrt_err_null("embedding: the weight must be a 2-D float tensor (not fp4), got %s",
                             dsrt_tensor_str(weight, sw, sizeof sw));
    if (ids->dtype != DSRT_I32 && ids->dtype != DSRT_I64)
        return dsrt_err_null("embedding: ids must be i32 or i64, got %s", dsrt_tensor_str(ids, si, sizeof si));
    if (dtype != DSRT_F32 && dtype != DSRT_BF16 && dtype != DSRT_F16)
        return dsrt_err_null("embedding: the output dtype must be f32, bf16 or f16, got %s", dsrt_dtype_name(dtype));
    if (ids->ndim + 1 + (copies > 0) > DSRT_MAX_DIMS)
        return dsrt_err_null("embedding: ids %s have too many dimensions", dsrt_tensor_str(ids, si, sizeof si));
    if (weight->device != s->device)
        return dsrt_err_null("embedding: the weight %s is not on the stream's device %s",
                             dsrt_tensor_str(weight, sw, sizeof sw), dsrt_device_str(s->device, sd));
    /* host ids for a device weight are checked here and go up; device ids for a host weight are refused */
    dsrt_tensor *moved = NULL;
    if (ids->device != weight->device) {
        if (ids->device != DSRT_CPU)
            return dsrt_err_null("embedding: ids %s and the weight %s are on different devices",
                                 dsrt_tensor_str(ids, si, sizeof si), dsrt_tensor_str(weight, sw, sizeof sw));
        if (check_host_ids(ids, weight)) return NULL;
        moved = dsrt_tensor_to(ids, weight->device, DSRT_I64, s, 1); /* staged: no wait (kernels.h dsrtk_memcpy) */
        if (!moved) return NULL;
        ids = moved;
    } else if (ids->device == DSRT_CPU && check_host_ids(ids, weight)) {
        return NULL;
    }
    dsrt_tensor *flat = dsrt_tensor_contiguous(ids, s);
    dsrt_tensor_release(moved);
    if (!flat) return NULL;
    int64_t n = dsrt_tensor_numel(flat), shape[DSRT_MAX_DIMS];
    int nd = flat->ndim, each = copies > 0 ? copies : 1;
    for (int d = 0; d < nd; d++) shape[d] = flat->shape[d];
    if (copies > 0) shape[nd++] = copies;
    shape[nd++] = weight->shape[1];
    dsrt_tensor *ts[2] = {weight, flat};
    dsrt_tensor *out = prepare("embedding", s, ts, 2) ? NULL : dsrt_tensor_new(dtype, nd, shape, s->device, s);
    int rc = out ? 0 : -1;
    if (!rc && n * each > 0 && weight->shape[1] > 0) {
        dsrt_view dv = dsrt_tensor_desc(out), wv = dsrt_tensor_desc(weight), iv = dsrt_tensor_desc(flat);
        const void *id_data = (const char *)iv.data + iv.offset * (flat->dtype == DSRT_I64 ? 8 : 4);
        dv.ndim = 2; /* [n·copies, cols]: the output is contiguous */
        dv.shape[0] = n * each, dv.shape[1] = weight->shape[1];
        dv.stride[0] = weight->shape[1], dv.stride[1] = 1;
        if (s->device == DSRT_CPU) cpu_embedding(&dv, &wv, id_data, flat->dtype == DSRT_I64, n, each);
        else if (dsrtk_embedding(s->device, &dv, &wv, id_data, flat->dtype, n, each, s->handle)) rc = kernel_failed("embedding");
    }
    dsrt_tensor_release(flat);
    if (rc) {
        dsrt_tensor_release(out);
        return NULL;
    }
    return out;
}
