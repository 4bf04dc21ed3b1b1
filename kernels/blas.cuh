/*
 * blas.cuh - the one cuBLAS handle per device that gemm.cu, linear.cu and moe.cu share (defined in
 * gemm.cu).
 *
 * What it protects: a cuBLAS handle is bound to the device that was current when it was made and
 * is costly to create, so there is one per device, made on first use and kept for the process
 * (destroying it at exit could race the CUDA runtime's own teardown). Its stream is handle state,
 * so the caller holds blas_lock(dev) from blas_handle until its GEMM is queued: another host thread
 * could otherwise change the stream between cublasSetStream and the GEMM. The handle runs the
 * default math (no TF32: f32 products stay true fp32) without reduced-precision split-k reductions,
 * and with no workspace, so GEMMs queued on different streams (the aux streams) never share one.
 */
#ifndef DSRT_KERNELS_BLAS_CUH
#define DSRT_KERNELS_BLAS_CUH

#include <cublas_v2.h>
#include <mutex>

enum { BLAS_MAX_DEVICES = 64 };

/* the device's lock (dev in [0, BLAS_MAX_DEVICES), checked by the caller) */
std::mutex &blas_lock(int dev);
/* With blas_lock(dev) held: the device's handle, bound to `stream`. who names the caller in errors. */
int blas_handle(int dev, void *stream, const char *who, cublasHandle_t *handle);
/* DSRTK_OK, or the failure of a cuBLAS call as "<who>: <what> on cuda:<dev>: <cuBLAS's string>" */
int blas_check(cublasStatus_t status, const char *who, const char *what, int dev);

#endif
