/*
 * upload.h - moving many host tensors (weights in a file mapping) onto a GPU at full speed.
 */
#ifndef DSRT_UPLOAD_H
#define DSRT_UPLOAD_H

#include "tensor.h"

typedef struct {
    uint64_t bytes_done, bytes_total;
    double seconds;
} dsrt_upload_progress;

/* Called after each staging chunk; returning nonzero cancels the upload (an error). */
typedef int (*dsrt_upload_cb)(const dsrt_upload_progress *p, void *ctx);

/* out[i] = a new contiguous copy of src[i] on `device` (src on the CPU, any layout). Reading the
 * sources (page faults of a mapping) and the DMA overlap through two pinned staging buffers. On
 * failure every out[i] is NULL and the message says which tensor failed. */
int dsrt_upload(dsrt_tensor *const *src, dsrt_tensor **out, int n, int device, dsrt_stream *stream,
                dsrt_upload_cb cb, void *ctx);

#endif
