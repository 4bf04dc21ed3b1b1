/*
 * kernels.h - the C ABI between the C core (runtime/) and everything CUDA (kernels/).
 *
 * The core never includes a CUDA header: it calls these launchers, which take plain pointers,
 * dsrt_view descriptors (runtime/numeric.h) and opaque stream/event handles. Each returns 0 on
 * success; on failure it returns a DSRTK_E* code and leaves a message (the CUDA or cuBLAS error
 * string plus what was being done) for dsrtk_error(). A build without the CUDA toolkit links
 * runtime/nocuda.c instead, whose launchers all fail with "built without CUDA", so the core has
 * one code path.
 *
 * Launchers never allocate device memory (allocation policy is the core's: runtime/alloc.c) and
 * never synchronise unless their name says so. Views passed to kernels may be arbitrarily strided;
 * kernels take their own fast paths when they see contiguous data.
 */
#ifndef DSRT_KERNELS_H
#define DSRT_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include "../runtime/numeric.h"
#include "../runtime/opmath.h"

#ifdef __cplusplus
extern "C" {
#endif

enum { DSRTK_OK = 0, DSRTK_ERROR = 1, DSRTK_OOM = 2, DSRTK_NOT_READY = 3 };

const char *dsrtk_error(void); /* message of the last failure on this thread */

/* ---- devices, memory, streams, events ---- */
int dsrtk_device_count(void); /* 0 when there is no driver, no GPU or no CUDA build */
int dsrtk_device_name(int dev, char *buf, size_t len);
int dsrtk_mem_info(int dev, size_t *free_bytes, size_t *total_bytes);
int dsrtk_malloc(int dev, void **ptr, size_t bytes);
int dsrtk_free(int dev, void *ptr);
int dsrtk_host_alloc(void **ptr, size_t bytes); /* pinned */
int dsrtk_host_free(void *ptr);

/* stream NULL is the device's legacy default stream */
int dsrtk_stream_create(int dev, void **stream);
int dsrtk_stream_destroy(int dev, void *stream);
int dsrtk_stream_synchronize(int dev, void *stream);
int dsrtk_event_create(int dev, void **event, int timing);
int dsrtk_event_destroy(int dev, void *event);
int dsrtk_event_record(int dev, void *event, void *stream);
int dsrtk_event_query(int dev, void *event); /* DSRTK_OK when done, DSRTK_NOT_READY when not */
int dsrtk_event_synchronize(int dev, void *event);
int dsrtk_event_elapsed_ms(int dev, void *start, void *end, float *ms);
int dsrtk_stream_wait_event(int dev, void *stream, void *event);

/* Byte copies between host and device or within a device; async only matters with pinned host
 * memory, and a synchronous copy returns when the bytes have landed. */
enum { DSRTK_H2D, DSRTK_D2H, DSRTK_D2D };
int dsrtk_memcpy(int dev, void *dst, const void *src, size_t bytes, int kind, void *stream, int async);

/* ---- elementwise (kernels/elementwise.cu) ---- */
/* dst[i] = convert(src[i]); shapes equal; any dtypes; floats pass through f32, integers through
 * int64 (numeric.h rules), so the result equals the CPU's bit for bit. */
int dsrtk_copy(int dev, const dsrt_view *dst, const dsrt_view *src, void *stream);
int dsrtk_fill(int dev, const dsrt_view *dst, double value, void *stream);
int dsrtk_arange(int dev, const dsrt_view *dst, double start, double step, void *stream);
/* element i (row-major position) gets dsrt_rand_uniform/normal(seed, offset + i), then lo + (hi-lo)*u
 * or mean + std*n, rounded once into dst's dtype */
int dsrtk_rand(int dev, const dsrt_view *dst, uint64_t seed, uint64_t offset, int normal,
               double a, double b, void *stream);

/* Binary and unary operators; codes shared with the CPU implementation (runtime/ops.h). Inputs
 * come already broadcast to dst's shape (stride 0 where broadcast). Float math runs in f32,
 * integer math in int64, comparisons produce bool. */
int dsrtk_binary(int dev, int op, const dsrt_view *dst, const dsrt_view *a, const dsrt_view *b,
                 int compute_float, void *stream);
int dsrtk_binary_scalar(int dev, int op, const dsrt_view *dst, const dsrt_view *a, double s,
                        int scalar_first, int compute_float, void *stream);
int dsrtk_unary(int dev, int op, const dsrt_view *dst, const dsrt_view *a, void *stream);

/* Reduce src along its last dimension into dst (src's other dims in order, row-major).
 * Float sums accumulate in f32 pairwise; argmax/argmin write int64 positions (0-based, first
 * maximum wins; NaN counts as the maximum, as torch). */
int dsrtk_reduce(int dev, int op, const dsrt_view *dst, const dsrt_view *src, void *stream);

/* ---- GEMM (kernels/gemm.cu): C[b] = A[b] @ B[b], row-major, contiguous, batch strides in
 * elements (0 broadcasts). f32 (fp32 compute, no TF32) or bf16 (fp32 accumulate, bf16 out). ---- */
int dsrtk_matmul(int dev, int dtype, int64_t batch, int64_t m, int64_t n, int64_t k,
                 const void *a, int64_t stride_a, const void *b, int64_t stride_b,
                 void *c, int64_t stride_c, void *stream);

/* ---- sampling (kernels/sampling.cu): the token sampler of runtime/sampling.h ---- */
/* end of sampling */

/* ---- norm (kernels/norm.cu): RMSNorm, the per-head norm, RoPE, Hadamard, the Q8/Q4 round trips (runtime/nn.h) ---- */
/* end of norm */

/* ---- hc (kernels/hc.cu): Sinkhorn and the hyper-connection ops (runtime/nn.h) ---- */
/* end of hc */

/* ---- linear (kernels/linear.cu): the DSV4 linear layers in native weight formats (runtime/linear.h) ---- */
/* end of linear */

/* ---- moe (kernels/moe.cu): routing and the FP4 experts (runtime/moe.h) ---- */
/* end of moe */

/* ---- attention (kernels/attention.cu): sparse attention, rings, compressors, the indexer (runtime/attention.h) ---- */
/* end of attention */

/* ---- embedding (kernels/embedding.cu): the embedding gather ---- */
/* end of embedding */

#ifdef __cplusplus
}
#endif
#endif
