/*
 * common.cuh - what the kernel files share: the error channel, the launch shape and the
 * strided walk.
 *
 * Errors: a launcher never aborts and never prints. It leaves one message per host thread (a
 * thread_local buffer owned by device.cu) naming what it was doing and why CUDA refused, and
 * returns a DSRTK_E* code; dsrtk_error() hands the message to the core, which raises it in Lua.
 * Every CUDA call goes through dsrtk_check(), every launch is followed by dsrtk_check_launch().
 *
 * The walk: kernels see arbitrary strided views. The host first merges the dimensions that are
 * laid out alike in every operand (dsrtk_coalesce), so contiguous and most sliced or broadcast data
 * walks as one or two dimensions, and the device-side index computation (dsrtk_offsets) only pays
 * a division for each dimension left beyond the first.
 */
#ifndef DSRT_KERNELS_COMMON_CUH
#define DSRT_KERNELS_COMMON_CUH

#include <cuda_runtime.h>
#include <stdint.h>
#include "kernels.h"

/* ---- errors (device.cu holds the buffer) ---- */

/* Formats the thread's message and returns `code`, so failures read `return dsrtk_fail(...)`. */
int dsrtk_fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* DSRTK_OK, or the failure of `err` described as "<what>: <CUDA's string>". Out-of-memory maps to
 * DSRTK_OOM. The runtime's last-error slot is cleared, so a refused call never shows up again as
 * the failure of a later, unrelated launch check. */
int dsrtk_check(cudaError_t err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* After a kernel launch: a bad configuration is reported at once through cudaGetLastError; faults
 * inside the kernel surface later, at the next synchronising call, as CUDA intends. */
#define dsrtk_check_launch(kernel_name, dev) \
    dsrtk_check(cudaGetLastError(), "launch of %s on cuda:%d", (kernel_name), (dev))

/* cudaSetDevice first: every launcher works on the device it is told, whatever thread calls it. */
#define DSRTK_SET_DEVICE(dev, what)                                                       \
    do {                                                                                  \
        int set_device_status_ = dsrtk_check(cudaSetDevice(dev), "%s: cudaSetDevice(%d)", \
                                             (what), (dev));                              \
        if (set_device_status_) return set_device_status_;                                \
    } while (0)

/* ---- launch shape ---- */

/* Kernels declare __launch_bounds__(DSRTK_BLOCK, DSRTK_MIN_BLOCKS): 64 registers a thread. Told
 * only the block size, ptxas trims registers for occupancy on its own and spills a few words in
 * the generic kernels; the explicit budget keeps them spill-free at full occupancy. */
enum { DSRTK_BLOCK = 256, DSRTK_MIN_BLOCKS = 4 };

int dsrtk_multiprocessors(int dev); /* cached per device */

/* Blocks for a grid-stride loop over `units` work items: enough to fill every multiprocessor
 * several times over, never more than the work needs. */
int dsrtk_grid_for(int dev, int64_t units, int block);

/* ---- views ---- */

int64_t dsrtk_numel(const dsrt_view *v);
int dsrtk_is_contiguous(const dsrt_view *v);
size_t dsrtk_dtype_size(int dtype); /* bytes per element; 0 for fp4, which packs two per byte */

/* Rewrites `count` views (at most DSRTK_MAX_WALK) of one common shape into the fewest dimensions
 * that walk them the same way: size-1 dimensions go, neighbours that every view strides alike
 * merge. Shape and ndim end equal in all views, with ndim >= 1. */
enum { DSRTK_MAX_WALK = 3 };
void dsrtk_coalesce(dsrt_view *const *views, int count);

/* Element indices of row-major position `lin` in N views of one coalesced shape (ndim >= 1), walked
 * together so each dimension but the outermost costs one division, not one per view: contiguous,
 * sliced and broadcast-along-one-axis data (one dimension after coalescing) costs none. The views
 * are kernel parameters (__grid_constant__), read in place. */
template <int N>
__device__ __forceinline__ void dsrtk_offsets(int64_t lin, const dsrt_view *const (&v)[N], int64_t *idx)
{
    const dsrt_view &shape = *v[0];
    for (int k = 0; k < N; k++) idx[k] = v[k]->offset;
    for (int d = shape.ndim - 1; d > 0; d--) {
        int64_t n = shape.shape[d], q;
        /* 64-bit division is a long software sequence; nearly every index fits 32 bits */
        if (((uint64_t)lin | (uint64_t)n) >> 32 == 0) q = (int64_t)((uint32_t)lin / (uint32_t)n);
        else q = lin / n;
        int64_t i = lin - q * n;
        for (int k = 0; k < N; k++) idx[k] += i * v[k]->stride[d];
        lin = q;
    }
    for (int k = 0; k < N; k++) idx[k] += lin * v[k]->stride[0]; /* what is left is the outermost index */
}

#endif
