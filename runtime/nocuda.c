/*
 * nocuda.c - the kernel ABI (kernels/kernels.h) for a build without the CUDA toolkit.
 *
 * What this file protects: the core has one code path. It calls the same launchers whether or not
 * CUDA was there at build time; here there are no devices (dsrtk_device_count says 0, which is how
 * the core learns that only the CPU exists), and every other launcher fails with a message that
 * names it, in case something asks for a device anyway.
 */
#include <stdio.h>
#include "kernels.h"

static _Thread_local char error_message[128];

const char *dsrtk_error(void) { return error_message; }

static int without_cuda(const char *function)
{
    snprintf(error_message, sizeof error_message, "%s: dsrt was built without CUDA", function);
    return DSRTK_ERROR;
}

int dsrtk_device_count(void) { return 0; }

int dsrtk_device_name(int dev, char *buf, size_t len)
{
    (void)dev; (void)buf; (void)len;
    return without_cuda(__func__);
}

int dsrtk_mem_info(int dev, size_t *free_bytes, size_t *total_bytes)
{
    (void)dev; (void)free_bytes; (void)total_bytes;
    return without_cuda(__func__);
}

int dsrtk_malloc(int dev, void **ptr, size_t bytes)
{
    (void)dev; (void)bytes;
    *ptr = NULL;
    return without_cuda(__func__);
}

int dsrtk_free(int dev, void *ptr)
{
    (void)dev; (void)ptr;
    return without_cuda(__func__);
}

int dsrtk_host_alloc(void **ptr, size_t bytes)
{
    (void)bytes;
    *ptr = NULL;
    return without_cuda(__func__);
}

int dsrtk_host_free(void *ptr)
{
    (void)ptr;
    return without_cuda(__func__);
}

int dsrtk_stream_create(int dev, void **stream)
{
    (void)dev;
    *stream = NULL;
    return without_cuda(__func__);
}

int dsrtk_stream_destroy(int dev, void *stream)
{
    (void)dev; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_stream_synchronize(int dev, void *stream)
{
    (void)dev; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_event_create(int dev, void **event, int timing)
{
    (void)dev; (void)timing;
    *event = NULL;
    return without_cuda(__func__);
}

int dsrtk_event_destroy(int dev, void *event)
{
    (void)dev; (void)event;
    return without_cuda(__func__);
}

int dsrtk_event_record(int dev, void *event, void *stream)
{
    (void)dev; (void)event; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_event_query(int dev, void *event)
{
    (void)dev; (void)event;
    return without_cuda(__func__);
}

int dsrtk_event_synchronize(int dev, void *event)
{
    (void)dev; (void)event;
    return without_cuda(__func__);
}

int dsrtk_event_elapsed_ms(int dev, void *start, void *end, float *ms)
{
    (void)dev; (void)start; (void)end; (void)ms;
    return without_cuda(__func__);
}

int dsrtk_stream_wait_event(int dev, void *stream, void *event)
{
    (void)dev; (void)stream; (void)event;
    return without_cuda(__func__);
}

int dsrtk_memcpy(int dev, void *dst, const void *src, size_t bytes, int kind, void *stream, int async)
{
    (void)dev; (void)dst; (void)src; (void)bytes; (void)kind; (void)stream; (void)async;
    return without_cuda(__func__);
}

int dsrtk_copy(int dev, const dsrt_view *dst, const dsrt_view *src, void *stream)
{
    (void)dev; (void)dst; (void)src; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_fill(int dev, const dsrt_view *dst, double value, void *stream)
{
    (void)dev; (void)dst; (void)value; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_arange(int dev, const dsrt_view *dst, double start, double step, void *stream)
{
    (void)dev; (void)dst; (void)start; (void)step; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_rand(int dev, const dsrt_view *dst, uint64_t seed, uint64_t offset, int normal, double a, double b,
               void *stream)
{
    (void)dev; (void)dst; (void)seed; (void)offset; (void)normal; (void)a; (void)b; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_binary(int dev, int op, const dsrt_view *dst, const dsrt_view *a, const dsrt_view *b, int compute_float,
                 void *stream)
{
    (void)dev; (void)op; (void)dst; (void)a; (void)b; (void)compute_float; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_binary_scalar(int dev, int op, const dsrt_view *dst, const dsrt_view *a, double s, int scalar_first,
                        int compute_float, void *stream)
{
    (void)dev; (void)op; (void)dst; (void)a; (void)s; (void)scalar_first; (void)compute_float; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_unary(int dev, int op, const dsrt_view *dst, const dsrt_view *a, void *stream)
{
    (void)dev; (void)op; (void)dst; (void)a; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_reduce(int dev, int op, const dsrt_view *dst, const dsrt_view *src, void *stream)
{
    (void)dev; (void)op; (void)dst; (void)src; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_matmul(int dev, int dtype, int64_t batch, int64_t m, int64_t n, int64_t k, const void *a, int64_t stride_a,
                 const void *b, int64_t stride_b, void *c, int64_t stride_c, void *stream)
{
    (void)dev; (void)dtype; (void)batch; (void)m; (void)n; (void)k; (void)a; (void)stride_a;
    (void)b; (void)stride_b; (void)c; (void)stride_c; (void)stream;
    return without_cuda(__func__);
}

/* ---- sampling ---- */
/* end of sampling */

/* ---- norm ---- */
/* end of norm */

/* ---- hc ---- */
/* end of hc */

/* ---- linear ---- */
/* end of linear */

/* ---- moe ---- */
/* end of moe */

/* ---- attention ---- */
/* end of attention */

/* ---- embedding ---- */
/* end of embedding */
