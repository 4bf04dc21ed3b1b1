/*
 * tensor.h - the tensor: a dtype, a shape and strides over refcounted storage.
 *
 * Tensors are immutable descriptions: every view (narrow, select, transpose, permute, view,
 * expand) is a new tensor sharing the storage, so a tensor handed to a layer can never change shape
 * under it. Strides and offsets count elements (nibbles for fp4e2m1, whose elements are half a
 * byte), are never negative, and are checked against the storage when a tensor is made, which is
 * what keeps a malformed file or a bad Lua index from reading outside memory.
 *
 * Functions returning dsrt_tensor * return a new reference (release it) or NULL with a message
 * (err.h). Dimensions are 0-based here; the Lua bindings translate from Lua's 1-based ones.
 */
#ifndef DSRT_TENSOR_H
#define DSRT_TENSOR_H

#include <stdatomic.h>
#include <stdint.h>
#include "alloc.h"
#include "dtype.h"
#include "stream.h"

typedef struct dsrt_tensor {
    atomic_int refcount;
    dsrt_storage *storage;
    dsrt_dtype dtype;
    int device;
    int ndim;
    int64_t offset;
    int64_t shape[DSRT_MAX_DIMS];
    int64_t stride[DSRT_MAX_DIMS];
} dsrt_tensor;

dsrt_tensor *dsrt_tensor_new(dsrt_dtype dtype, int ndim, const int64_t *shape, int device, dsrt_stream *stream);
dsrt_tensor *dsrt_tensor_like(const dsrt_tensor *t, dsrt_dtype dtype, dsrt_stream *stream); /* same shape, contiguous */
dsrt_tensor *dsrt_tensor_from_storage(dsrt_storage *s, dsrt_dtype dtype, int ndim, const int64_t *shape,
                                      const int64_t *stride, int64_t offset);
void dsrt_tensor_retain(dsrt_tensor *t);
void dsrt_tensor_release(dsrt_tensor *t);

int64_t dsrt_tensor_numel(const dsrt_tensor *t);
int dsrt_tensor_is_contiguous(const dsrt_tensor *t); /* row-major, and byte-aligned for fp4 */
dsrt_view dsrt_tensor_desc(const dsrt_tensor *t);
const char *dsrt_tensor_str(const dsrt_tensor *t, char *buf, int len); /* "bf16[2, 3] on cuda:0" */
int dsrt_check_shape(int ndim, const int64_t *shape, const char *op);

/* views */
dsrt_tensor *dsrt_tensor_narrow(dsrt_tensor *t, int dim, int64_t start, int64_t length);
dsrt_tensor *dsrt_tensor_select(dsrt_tensor *t, int dim, int64_t index);
dsrt_tensor *dsrt_tensor_transpose(dsrt_tensor *t, int d0, int d1);
dsrt_tensor *dsrt_tensor_permute(dsrt_tensor *t, const int *perm);
dsrt_tensor *dsrt_tensor_view(dsrt_tensor *t, int ndim, const int64_t *shape); /* one -1 infers */
dsrt_tensor *dsrt_tensor_expand(dsrt_tensor *t, int ndim, const int64_t *shape);
/* The same bytes read as another dtype: the last dimension scales by the ratio of the bit widths
 * (I8 [out, in/2] becomes fp4e2m1 [out, in], as the checkpoint packs FP4). Needs a contiguous last
 * dimension that starts on a byte. */
dsrt_tensor *dsrt_tensor_bitcast(dsrt_tensor *t, dsrt_dtype dtype);

/* views when possible, copies otherwise (on `stream`, which must be of t's device) */
dsrt_tensor *dsrt_tensor_contiguous(dsrt_tensor *t, dsrt_stream *stream);
dsrt_tensor *dsrt_tensor_reshape(dsrt_tensor *t, int ndim, const int64_t *shape, dsrt_stream *stream);
/* Moves and/or converts. `stream` belongs to whichever side is a CUDA device (the destination when
 * both are). Without `async` the call returns once the data is in place. */
dsrt_tensor *dsrt_tensor_to(dsrt_tensor *t, int device, dsrt_dtype dtype, dsrt_stream *stream, int async);

#endif
