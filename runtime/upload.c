/*
 * upload.c - host-to-device copies of many tensors through pinned staging buffers.
 *
 * A checkpoint arrives as views of a file mapping: pageable memory whose pages are read from disk
 * the first time they are touched. cudaMemcpy from pageable memory stages through a small driver
 * buffer and serialises the disk read with the DMA. Here the host copies each piece into one of
 * two pinned buffers (the copy is what reads the file, spread over OpenMP threads so that many page
 * faults are in flight), and the DMA of that buffer runs while the host fills the other one; an
 * event per buffer says when its DMA is over and it may be refilled. Memory use is bounded by the
 * two buffers whatever the checkpoint's size.
 */
#include "upload.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "err.h"
#include "kernels.h"

enum { STAGE_BYTES = 64 << 20, NSTAGES = 2 };

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void parallel_copy(char *dst, const char *src, size_t bytes)
{
    const size_t piece = (size_t)1 << 20;
    int64_t pieces = (int64_t)((bytes + piece - 1) / piece);
#pragma omp parallel for schedule(dynamic) if (pieces > 1)
    for (int64_t i = 0; i < pieces; i++) {
        size_t at = (size_t)i * piece, len = bytes - at < piece ? bytes - at : piece;
        memcpy(dst + at, src + at, len);
    }
}

typedef struct {
    void *buffer[NSTAGES];
    void *done[NSTAGES]; /* event: the last DMA out of buffer[i] finished */
    int used[NSTAGES];
} stages;

static void free_stages(stages *st, int device)
{
    for (int i = 0; i < NSTAGES; i++) {
        if (st->done[i]) {
            dsrtk_event_synchronize(device, st->done[i]);
            dsrtk_event_destroy(device, st->done[i]);
        }
        if (st->buffer[i]) dsrtk_host_free(st->buffer[i]);
    }
}

int dsrt_upload(dsrt_tensor *const *src, dsrt_tensor **out, int n, int device, dsrt_stream *stream,
                dsrt_upload_cb cb, void *ctx)
{
    if (device == DSRT_CPU || dsrt_device_check(device)) return device == DSRT_CPU ? dsrt_err("upload: the target must be a CUDA device") : -1;
    if (stream->device != device) return dsrt_err("upload: the stream is not on cuda:%d", device);
    for (int i = 0; i < n; i++) out[i] = NULL;
    dsrt_upload_progress prog = {0, 0, 0};
    for (int i = 0; i < n; i++) {
        if (src[i]->device != DSRT_CPU) return dsrt_err("upload: tensor %d is not on the CPU", i + 1);
        prog.bytes_total += dsrt_dtype_nbytes(src[i]->dtype, dsrt_tensor_numel(src[i]));
    }
    stages st;
    memset(&st, 0, sizeof st);
    int rc = 0;
    for (int i = 0; i < NSTAGES && !rc; i++)
        if (dsrtk_host_alloc(&st.buffer[i], STAGE_BYTES) || dsrtk_event_create(device, &st.done[i], 0))
            rc = dsrt_err("upload: pinned staging buffers: %s", dsrtk_error());
    double start = now_seconds();
    int stage = 0;
    for (int i = 0; i < n && !rc; i++) {
        dsrt_tensor *c = dsrt_tensor_contiguous(src[i], dsrt_stream_default(DSRT_CPU));
        out[i] = c ? dsrt_tensor_new(c->dtype, c->ndim, c->shape, device, stream) : NULL;
        if (!out[i]) {
            char buf[96], why[512];
            snprintf(why, sizeof why, "%s", dsrt_err_msg());
            rc = dsrt_err("upload of tensor %d (%s): %s", i + 1, dsrt_tensor_str(src[i], buf, sizeof buf), why);
        }
        size_t bytes = c ? dsrt_dtype_nbytes(c->dtype, dsrt_tensor_numel(c)) : 0;
        const char *from = c ? (const char *)c->storage->data + dsrt_dtype_nbytes(c->dtype, c->offset) : NULL;
        for (size_t at = 0; at < bytes && !rc; at += STAGE_BYTES) {
            size_t len = bytes - at < STAGE_BYTES ? bytes - at : STAGE_BYTES;
            if (st.used[stage] && dsrtk_event_synchronize(device, st.done[stage])) {
                rc = dsrt_err("upload: %s", dsrtk_error());
                break;
            }
            parallel_copy(st.buffer[stage], from + at, len);
            if (dsrtk_memcpy(device, (char *)out[i]->storage->data + at, st.buffer[stage], len, DSRTK_H2D,
                             stream->handle, 1) ||
                dsrtk_event_record(device, st.done[stage], stream->handle)) {
                rc = dsrt_err("upload: %s", dsrtk_error());
                break;
            }
            st.used[stage] = 1;
            stage = (stage + 1) % NSTAGES;
            prog.bytes_done += len;
            prog.seconds = now_seconds() - start;
            if (cb && cb(&prog, ctx)) rc = dsrt_err("upload: cancelled");
        }
        dsrt_tensor_release(c);
    }
    free_stages(&st, device); /* waits for the last DMAs */
    if (rc)
        for (int i = 0; i < n; i++) dsrt_tensor_release(out[i]), out[i] = NULL;
    return rc;
}
