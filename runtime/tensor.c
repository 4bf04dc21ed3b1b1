/*
 * tensor.c - tensor creation, views and moves between devices (see tensor.h).
 */
#include "tensor.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "err.h"
#include "kernels.h"
#include "ops.h"

int dsrt_check_shape(int ndim, const int64_t *shape, const char *op)
{
    if (ndim < 0 || ndim > DSRT_MAX_DIMS) return dsrt_err("%s: %d dimensions (at most %d)", op, ndim, DSRT_MAX_DIMS);
    /* the product of the nonzero sizes bounds every stride, even of a tensor with no elements */
    int64_t extent = 1;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 0) return dsrt_err("%s: negative size %lld in dimension %d", op, (long long)shape[d], d + 1);
        if (shape[d] && extent > (INT64_C(1) << 50) / shape[d]) return dsrt_err("%s: shape too large", op);
        if (shape[d]) extent *= shape[d];
    }
    return 0;
}

static dsrt_tensor *alloc_header(dsrt_storage *s, dsrt_dtype dtype, int ndim, const int64_t *shape, int64_t offset)
{
    dsrt_tensor *t = calloc(1, sizeof *t);
    if (!t) return dsrt_err_null("out of host memory");
    atomic_init(&t->refcount, 1);
    t->storage = s;
    t->dtype = dtype;
    t->device = s->device;
    t->ndim = ndim;
    t->offset = offset;
    if (ndim) memcpy(t->shape, shape, (size_t)ndim * sizeof *shape);
    return t;
}

static void set_contiguous_strides(dsrt_tensor *t)
{
    int64_t st = 1;
    for (int d = t->ndim - 1; d >= 0; d--) {
        t->stride[d] = st;
        st *= t->shape[d] ? t->shape[d] : 1;
    }
}

int64_t dsrt_tensor_numel(const dsrt_tensor *t)
{
    int64_t n = 1;
    for (int d = 0; d < t->ndim; d++) n *= t->shape[d];
    return n;
}

dsrt_tensor *dsrt_tensor_new(dsrt_dtype dtype, int ndim, const int64_t *shape, int device, dsrt_stream *stream)
{
    if (dsrt_check_shape(ndim, shape, "tensor")) return NULL;
    int64_t numel = 1;
    for (int d = 0; d < ndim; d++) numel *= shape[d];
    dsrt_storage *s = dsrt_storage_new(device, dsrt_dtype_nbytes(dtype, numel), stream);
    if (!s) return NULL;
    dsrt_tensor *t = alloc_header(s, dtype, ndim, shape, 0);
    if (!t) {
        dsrt_storage_release(s);
        return NULL;
    }
    set_contiguous_strides(t);
    return t;
}

dsrt_tensor *dsrt_tensor_like(const dsrt_tensor *t, dsrt_dtype dtype, dsrt_stream *stream)
{
    return dsrt_tensor_new(dtype, t->ndim, t->shape, t->device, stream);
}

/* checks that every element of (shape, stride, offset) lies inside s */
static int check_bounds(const dsrt_storage *s, dsrt_dtype dtype, int ndim, const int64_t *shape,
                        const int64_t *stride, int64_t offset)
{
    int64_t last = offset, numel = 1;
    for (int d = 0; d < ndim; d++) {
        if (stride[d] < 0) return dsrt_err("tensor: negative stride in dimension %d", d + 1);
        numel *= shape[d];
        if (shape[d]) last += (shape[d] - 1) * stride[d];
    }
    int64_t capacity = (int64_t)(s->nbytes * 8 / (size_t)dsrt_dtype_bits(dtype));
    if (numel && (offset < 0 || last >= capacity)) {
        char buf[DSRT_SHAPE_BUF];
        return dsrt_err("tensor: %s%s at element offset %lld needs %lld elements but its storage holds %lld",
                        dsrt_dtype_name(dtype), dsrt_shape_str(ndim, shape, buf, sizeof buf),
                        (long long)offset, (long long)last + 1, (long long)capacity);
    }
    return 0;
}

dsrt_tensor *dsrt_tensor_from_storage(dsrt_storage *s, dsrt_dtype dtype, int ndim, const int64_t *shape,
                                      const int64_t *stride, int64_t offset)
{
    if (dsrt_check_shape(ndim, shape, "tensor") || check_bounds(s, dtype, ndim, shape, stride, offset)) return NULL;
    dsrt_tensor *t = alloc_header(s, dtype, ndim, shape, offset);
    if (!t) return NULL;
    if (ndim) memcpy(t->stride, stride, (size_t)ndim * sizeof *stride);
    dsrt_storage_retain(s);
    return t;
}

void dsrt_tensor_retain(dsrt_tensor *t) { atomic_fetch_add(&t->refcount, 1); }

void dsrt_tensor_release(dsrt_tensor *t)
{
    if (!t || atomic_fetch_sub(&t->refcount, 1) != 1) return;
    dsrt_storage_release(t->storage);
    free(t);
}

int dsrt_tensor_is_contiguous(const dsrt_tensor *t)
{
    if (dsrt_tensor_numel(t) == 0) return 1;
    if (t->dtype == DSRT_FP4E2M1 && (t->offset & 1)) return 0;
    int64_t st = 1;
    for (int d = t->ndim - 1; d >= 0; d--) {
        if (t->shape[d] != 1 && t->stride[d] != st) return 0;
        st *= t->shape[d];
    }
    return 1;
}

dsrt_view dsrt_tensor_desc(const dsrt_tensor *t)
{
    dsrt_view v;
    memset(&v, 0, sizeof v);
    v.data = t->storage->data;
    v.dtype = t->dtype;
    v.ndim = t->ndim;
    v.offset = t->offset;
    memcpy(v.shape, t->shape, sizeof v.shape);
    memcpy(v.stride, t->stride, sizeof v.stride);
    return v;
}

const char *dsrt_tensor_str(const dsrt_tensor *t, char *buf, int len)
{
    char shape[DSRT_SHAPE_BUF], dev[16];
    snprintf(buf, (size_t)len, "%s%s on %s", dsrt_dtype_name(t->dtype), dsrt_shape_str(t->ndim, t->shape, shape, sizeof shape),
             dsrt_device_str(t->device, dev));
    return buf;
}

/* ---- views ---- */

static dsrt_tensor *derive_as(dsrt_tensor *t, dsrt_dtype dtype, int ndim, const int64_t *shape, const int64_t *stride,
                              int64_t offset)
{
    return dsrt_tensor_from_storage(t->storage, dtype, ndim, shape, stride, offset);
}

static dsrt_tensor *derive(dsrt_tensor *t, int ndim, const int64_t *shape, const int64_t *stride, int64_t offset)
{
    return derive_as(t, t->dtype, ndim, shape, stride, offset);
}

static int check_dim(const dsrt_tensor *t, int dim, const char *op)
{
    if (dim < 0 || dim >= t->ndim) {
        char buf[96];
        return dsrt_err("%s: dimension %d out of range for %s (dimensions are 1..%d)", op, dim + 1,
                        dsrt_tensor_str(t, buf, sizeof buf), t->ndim);
    }
    return 0;
}

dsrt_tensor *dsrt_tensor_narrow(dsrt_tensor *t, int dim, int64_t start, int64_t length)
{
    if (check_dim(t, dim, "narrow")) return NULL;
    if (start < 0 || length < 0 || start + length > t->shape[dim]) {
        char buf[96];
        return dsrt_err_null("narrow: elements %lld..%lld of dimension %d do not exist in %s", (long long)start + 1,
                             (long long)(start + length), dim + 1, dsrt_tensor_str(t, buf, sizeof buf));
    }
    int64_t shape[DSRT_MAX_DIMS];
    memcpy(shape, t->shape, sizeof shape);
    shape[dim] = length;
    return derive(t, t->ndim, shape, t->stride, t->offset + start * t->stride[dim]);
}

dsrt_tensor *dsrt_tensor_select(dsrt_tensor *t, int dim, int64_t index)
{
    if (check_dim(t, dim, "select")) return NULL;
    if (index < 0 || index >= t->shape[dim]) {
        char buf[96];
        return dsrt_err_null("index %lld out of range for dimension %d of %s (1..%lld)", (long long)index + 1, dim + 1,
                             dsrt_tensor_str(t, buf, sizeof buf), (long long)t->shape[dim]);
    }
    int64_t shape[DSRT_MAX_DIMS], stride[DSRT_MAX_DIMS];
    int n = 0;
    for (int d = 0; d < t->ndim; d++)
        if (d != dim) shape[n] = t->shape[d], stride[n++] = t->stride[d];
    return derive(t, n, shape, stride, t->offset + index * t->stride[dim]);
}

dsrt_tensor *dsrt_tensor_transpose(dsrt_tensor *t, int d0, int d1)
{
    if (check_dim(t, d0, "transpose") || check_dim(t, d1, "transpose")) return NULL;
    int64_t shape[DSRT_MAX_DIMS], stride[DSRT_MAX_DIMS];
    memcpy(shape, t->shape, sizeof shape);
    memcpy(stride, t->stride, sizeof stride);
    shape[d0] = t->shape[d1], shape[d1] = t->shape[d0];
    stride[d0] = t->stride[d1], stride[d1] = t->stride[d0];
    return derive(t, t->ndim, shape, stride, t->offset);
}

dsrt_tensor *dsrt_tensor_permute(dsrt_tensor *t, const int *perm)
{
    int seen[DSRT_MAX_DIMS] = {0};
    int64_t shape[DSRT_MAX_DIMS], stride[DSRT_MAX_DIMS];
    for (int d = 0; d < t->ndim; d++) {
        if (check_dim(t, perm[d], "permute")) return NULL;
        if (seen[perm[d]]++) return dsrt_err_null("permute: dimension %d appears twice", perm[d] + 1);
        shape[d] = t->shape[perm[d]], stride[d] = t->stride[perm[d]];
    }
    return derive(t, t->ndim, shape, stride, t->offset);
}

/* Resolves one -1 in a requested shape against numel; checks the total. */
static int infer_shape(const dsrt_tensor *t, int ndim, const int64_t *in, int64_t *out, const char *op)
{
    int64_t numel = dsrt_tensor_numel(t), known = 1;
    int infer = -1;
    if (ndim < 0 || ndim > DSRT_MAX_DIMS) return dsrt_err("%s: %d dimensions (at most %d)", op, ndim, DSRT_MAX_DIMS);
    for (int d = 0; d < ndim; d++) {
        out[d] = in[d];
        if (in[d] == -1) {
            if (infer >= 0) return dsrt_err("%s: only one dimension can be -1", op);
            infer = d;
        } else if (in[d] < 0) {
            return dsrt_err("%s: invalid size %lld", op, (long long)in[d]);
        } else {
            known *= in[d];
        }
    }
    if (infer >= 0 && known) out[infer] = numel / known;
    int64_t total = 1;
    for (int d = 0; d < ndim; d++) total *= out[d];
    if (total != numel) {
        char a[96], b[DSRT_SHAPE_BUF];
        return dsrt_err("%s: cannot view %s as %s (%lld elements)", op, dsrt_tensor_str(t, a, sizeof a),
                        dsrt_shape_str(ndim, in, b, sizeof b), (long long)numel);
    }
    return 0;
}

/* Strides that present t's elements in `shape`, or -1 when no strides can (torch's rule: each
 * run of dimensions merged or split must be contiguous within itself). */
static int view_strides(const dsrt_tensor *t, int ndim, const int64_t *shape, int64_t *stride)
{
    if (dsrt_tensor_numel(t) == 0 || t->ndim == 0) {
        int64_t st = 1;
        for (int d = ndim - 1; d >= 0; d--) stride[d] = st, st *= shape[d] ? shape[d] : 1;
        return 0;
    }
    int view_d = ndim - 1;
    int64_t chunk_base = t->stride[t->ndim - 1], tensor_numel = 1, view_numel = 1;
    for (int td = t->ndim - 1; td >= 0; td--) {
        tensor_numel *= t->shape[td];
        if (td == 0 || (t->shape[td - 1] != 1 && t->stride[td - 1] != tensor_numel * chunk_base)) {
            while (view_d >= 0 && (view_numel < tensor_numel || shape[view_d] == 1)) {
                stride[view_d] = view_numel * chunk_base;
                view_numel *= shape[view_d];
                view_d--;
            }
            if (view_numel != tensor_numel) return -1;
            if (td > 0) chunk_base = t->stride[td - 1], tensor_numel = 1, view_numel = 1;
        }
    }
    return view_d == -1 ? 0 : -1;
}

dsrt_tensor *dsrt_tensor_view(dsrt_tensor *t, int ndim, const int64_t *shape)
{
    int64_t resolved[DSRT_MAX_DIMS], stride[DSRT_MAX_DIMS];
    if (infer_shape(t, ndim, shape, resolved, "view")) return NULL;
    if (view_strides(t, ndim, resolved, stride)) {
        char a[96], b[DSRT_SHAPE_BUF];
        return dsrt_err_null("view: %s is not contiguous enough to view as %s; use reshape (which copies)",
                             dsrt_tensor_str(t, a, sizeof a), dsrt_shape_str(ndim, resolved, b, sizeof b));
    }
    return derive(t, ndim, resolved, stride, t->offset);
}

dsrt_tensor *dsrt_tensor_expand(dsrt_tensor *t, int ndim, const int64_t *shape)
{
    char a[96], b[DSRT_SHAPE_BUF];
    if (ndim < t->ndim || ndim > DSRT_MAX_DIMS)
        return dsrt_err_null("expand: cannot expand %s to %s", dsrt_tensor_str(t, a, sizeof a),
                             dsrt_shape_str(ndim, shape, b, sizeof b));
    int64_t out_shape[DSRT_MAX_DIMS], stride[DSRT_MAX_DIMS];
    int lead = ndim - t->ndim;
    for (int d = 0; d < ndim; d++) {
        int64_t have = d < lead ? 1 : t->shape[d - lead], want = shape[d] == -1 ? have : shape[d];
        if (have == want) {
            out_shape[d] = want, stride[d] = d < lead ? 0 : t->stride[d - lead];
        } else if (have == 1 && want >= 0) {
            out_shape[d] = want, stride[d] = 0;
        } else {
            return dsrt_err_null("expand: cannot expand %s to %s (dimension %d is %lld, not 1)",
                                 dsrt_tensor_str(t, a, sizeof a), dsrt_shape_str(ndim, shape, b, sizeof b), d + 1,
                                 (long long)have);
        }
    }
    return derive(t, ndim, out_shape, stride, t->offset);
}

dsrt_tensor *dsrt_tensor_bitcast(dsrt_tensor *t, dsrt_dtype dtype)
{
    int from = dsrt_dtype_bits(t->dtype), to = dsrt_dtype_bits(dtype), last = t->ndim - 1;
    char a[96];
    if (from == to) return derive_as(t, dtype, t->ndim, t->shape, t->stride, t->offset);
    if (last < 0 || (t->shape[last] != 1 && t->stride[last] != 1) || (t->offset * from) % to ||
        (t->shape[last] * from) % to)
        return dsrt_err_null("bitcast: %s cannot be read as %s (the last dimension must be contiguous, start on "
                             "a %s element and hold whole %s elements)", dsrt_tensor_str(t, a, sizeof a),
                             dsrt_dtype_name(dtype), dsrt_dtype_name(dtype), dsrt_dtype_name(dtype));
    int64_t shape[DSRT_MAX_DIMS], stride[DSRT_MAX_DIMS];
    for (int d = 0; d < last; d++) {
        if ((t->stride[d] * from) % to) return dsrt_err_null("bitcast: the strides of %s do not fit %s",
                                                             dsrt_tensor_str(t, a, sizeof a), dsrt_dtype_name(dtype));
        shape[d] = t->shape[d], stride[d] = t->stride[d] * from / to;
    }
    shape[last] = t->shape[last] * from / to, stride[last] = 1;
    return derive_as(t, dtype, t->ndim, shape, stride, t->offset * from / to);
}

dsrt_tensor *dsrt_tensor_contiguous(dsrt_tensor *t, dsrt_stream *stream)
{
    if (dsrt_tensor_is_contiguous(t)) {
        dsrt_tensor_retain(t);
        return t;
    }
    dsrt_tensor *out = dsrt_tensor_like(t, t->dtype, stream);
    if (out && dsrt_op_copy(out, t, stream)) {
        dsrt_tensor_release(out);
        return NULL;
    }
    return out;
}

dsrt_tensor *dsrt_tensor_reshape(dsrt_tensor *t, int ndim, const int64_t *shape, dsrt_stream *stream)
{
    int64_t resolved[DSRT_MAX_DIMS], stride[DSRT_MAX_DIMS];
    if (infer_shape(t, ndim, shape, resolved, "reshape")) return NULL;
    if (!view_strides(t, ndim, resolved, stride)) return derive(t, ndim, resolved, stride, t->offset);
    dsrt_tensor *c = dsrt_tensor_contiguous(t, stream);
    if (!c) return NULL;
    dsrt_tensor *v = dsrt_tensor_view(c, ndim, resolved);
    dsrt_tensor_release(c);
    return v;
}

/* ---- moving between devices ---- */

static dsrt_tensor *copy_across(dsrt_tensor *src, int device, dsrt_stream *stream, int async)
{
    dsrt_stream *src_stream = src->device == DSRT_CPU ? dsrt_stream_default(DSRT_CPU) : stream;
    dsrt_tensor *c = dsrt_tensor_contiguous(src, src_stream);
    if (!c) return NULL;
    dsrt_stream *dst_stream = device == DSRT_CPU ? dsrt_stream_default(DSRT_CPU) : stream;
    dsrt_tensor *out = dsrt_tensor_new(c->dtype, c->ndim, c->shape, device, dst_stream);
    size_t bytes = dsrt_dtype_nbytes(c->dtype, dsrt_tensor_numel(c));
    const char *from = (const char *)c->storage->data + dsrt_dtype_nbytes(c->dtype, c->offset);
    int rc = 0;
    if (out && bytes) {
        if (src->device != DSRT_CPU && device != DSRT_CPU) {
            /* between two GPUs: through the host, simple and rare */
            dsrt_tensor *host = copy_across(c, DSRT_CPU, stream, 0);
            rc = host ? 0 : -1;
            if (host) {
                rc = dsrtk_memcpy(device, out->storage->data, host->storage->data, bytes, DSRTK_H2D, NULL, 0)
                         ? dsrt_err("to(cuda:%d): %s", device, dsrtk_error()) : 0;
                dsrt_tensor_release(host);
            }
        } else {
            int kind = device == DSRT_CPU ? DSRTK_D2H : DSRTK_H2D, dev = device == DSRT_CPU ? src->device : device;
            if (stream->device != dev) {
                char a[16], b[16];
                rc = dsrt_err("to: copying on a stream of %s, but the copy involves %s", dsrt_device_str(stream->device, a),
                              dsrt_device_str(dev, b));
            } else if (dsrtk_memcpy(dev, out->storage->data, from, bytes, kind, stream->handle, async)) {
                rc = dsrt_err("to(%s): %s", kind == DSRTK_D2H ? "cpu" : "cuda", dsrtk_error());
            } else {
                rc = dsrt_storage_use(c->device == DSRT_CPU ? out->storage : c->storage, stream);
            }
        }
    }
    dsrt_tensor_release(c);
    if (!out || rc) {
        dsrt_tensor_release(out);
        return NULL;
    }
    return out;
}

dsrt_tensor *dsrt_tensor_to(dsrt_tensor *t, int device, dsrt_dtype dtype, dsrt_stream *stream, int async)
{
    if (dsrt_device_check(device)) return NULL;
    if (t->device == device && t->dtype == dtype) {
        dsrt_tensor_retain(t);
        return t;
    }
    /* convert on the GPU side when there is one: conversion there is cheaper than on the host */
    dsrt_tensor *moved = t;
    dsrt_tensor_retain(t);
    if (t->device != device && device != DSRT_CPU) {
        moved = copy_across(t, device, stream, async);
        dsrt_tensor_release(t);
        if (!moved) return NULL;
    }
    dsrt_tensor *out = moved;
    if (moved->dtype != dtype) {
        dsrt_stream *s = moved->device == DSRT_CPU ? dsrt_stream_default(DSRT_CPU) : stream;
        out = dsrt_tensor_like(moved, dtype, s);
        if (out && dsrt_op_copy(out, moved, s)) {
            dsrt_tensor_release(out);
            out = NULL;
        }
        dsrt_tensor_release(moved);
        if (!out) return NULL;
    }
    if (out->device != device) {
        dsrt_tensor *host = copy_across(out, device, stream, async);
        dsrt_tensor_release(out);
        out = host;
    }
    return out;
}
