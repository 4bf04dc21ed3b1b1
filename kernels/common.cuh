/*
 * common.cuh - what the kernel files share: the error channel, the launch shape, the strided walk
 * and the element codecs of copies.
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
 *
 * Copies: elementwise.cu's generic copy and transpose.cu's tiled one must give the same bits, so
 * both load elements as raw bits (dsrtk_load_raw) and store them through dsrtk_store_copied, which
 * converts only through numeric.h, exactly as the CPU does.
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

/* ---- programmatic dependent launch ----
 * A kernel launched by dsrtk_launch_dependent may start while the stream's previous kernel is
 * still finishing (its launch and first instructions overlap that kernel's tail: at decode, ~130
 * small kernels a step, each paid a launch gap). The price is a rule the kernel must keep: before
 * dsrtk_wait_producer() returns it writes nothing and reads nothing earlier work may have written,
 * but a model's parameters; it may compute addresses and prefetch into L2, which is coherent with
 * every write. Launched otherwise, the wait is a no-op. Parameters (linear.cu's bf16 decode
 * weights, hc.cu's fn, scale, base and norm weight for one token) are read there because no kernel
 * of a forward writes them: a caller that computes one on the device synchronises the stream
 * before the op that reads it (README, "Streams and events").
 * Past the wait the kernel lets the stream's next kernel launch at once (launch_dependents): its
 * blocks take their places and sit in their own wait, which returns once this grid has finished
 * and its writes are visible, as without the trigger; what leaves the chain is the next launch's
 * latency (the generation loop's decode step 0.945-0.953 -> 0.937-0.939 ms, bench_dsv4, H200,
 * runs interleaved in one visit). The next grid launches only when every block of this one has
 * passed its wait, so none of this grid's blocks ever waits for room behind it. trigger_next =
 * false keeps the next launch for this grid's end: where the HC head's kernel let the LM head's
 * 264 blocks launch early, the head's row took 0.277-0.279 ms against 0.265. */
__device__ __forceinline__ void dsrtk_wait_producer(bool trigger_next = true)
{
    asm volatile("griddepcontrol.wait;" ::: "memory");
    if (trigger_next) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}
__device__ __forceinline__ void dsrtk_prefetch_l2(const void *p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

/* cudaLaunchKernelEx with the attribute, and with cluster > 0 as clusters of that many blocks
 * (dsrtk_clusters_fit says whether the device places them); a refused launch is also the thread's
 * last error, which dsrtk_check_launch reads, as after <<<>>> */
template <class... Params, class... Args>
static inline cudaError_t dsrtk_launch_dependent_cluster(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                                         cudaStream_t s, int cluster, Args... args)
{
    cudaLaunchConfig_t config = {};
    config.gridDim = grid, config.blockDim = block, config.dynamicSmemBytes = smem, config.stream = s;
    cudaLaunchAttribute attrs[2];
    attrs[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[0].val.programmaticStreamSerializationAllowed = 1;
    attrs[1].id = cudaLaunchAttributeClusterDimension;
    attrs[1].val.clusterDim.x = (unsigned)cluster, attrs[1].val.clusterDim.y = attrs[1].val.clusterDim.z = 1;
    config.attrs = attrs, config.numAttrs = cluster > 0 ? 2 : 1;
    return cudaLaunchKernelEx(&config, kernel, args...);
}
template <class... Params, class... Args>
static inline cudaError_t dsrtk_launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t s,
                                                 Args... args)
{
    return dsrtk_launch_dependent_cluster(kernel, grid, block, smem, s, 0, args...);
}

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

/* The device's opt-in limit of shared memory a block (cached per device). */
int dsrtk_shared_limit(int dev, int *optin);
/* Allows `smem` dynamic bytes for kernel fn on dev (the current device), whatever its static
 * shared memory adds; asked of CUDA once per (device, kernel) while the bytes do not grow (a
 * driver call on every launch costs a decode step's host time). */
int dsrtk_allow_shared(int dev, const void *fn, size_t smem, const char *name);
/* How many clusters of `cluster` blocks of `block` threads and `smem` dynamic bytes the device
 * places at once (0: none, or the query refused; beyond 8 blocks the kernel is opted in to
 * non-portable sizes first). The smem opt-in must have been made. Answers are kept. */
int dsrtk_clusters_fit(int dev, const void *fn, int cluster, int block, size_t smem);

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

/* ---- element codecs of copies ---- */

/* An input element as loaded: its raw bits, converted only once every load of a run is issued.
 * For fp4 the bits are the whole byte, with the nibble meant (0 low, 1 high) in bit 8. */
__device__ __forceinline__ uint64_t dsrtk_load_raw(const dsrt_view &v, int64_t i)
{
    switch (v.dtype) {
    case DSRT_F32: case DSRT_I32: return ((const uint32_t *)v.data)[i];
    case DSRT_BF16: case DSRT_F16: return ((const uint16_t *)v.data)[i];
    case DSRT_I64: return ((const uint64_t *)v.data)[i];
    case DSRT_FP4E2M1: return ((const uint8_t *)v.data)[i >> 1] | (uint64_t)(i & 1) << 8;
    default: return ((const uint8_t *)v.data)[i];
    }
}

/* The value of a loaded element, through numeric.h's own loads: the bits sit at offset 0 of a
 * local (an fp4 nibble shifted there first), which the compiler keeps in a register. */
__device__ __forceinline__ uint64_t dsrtk_element_bits(uint64_t raw, int dtype)
{
    return dtype == DSRT_FP4E2M1 ? (raw >> (4 * (raw >> 8))) & 15u : raw;
}
__device__ __forceinline__ float dsrtk_raw_f32(uint64_t raw, int dtype)
{
    uint64_t bits = dsrtk_element_bits(raw, dtype);
    return dsrt_load_f32(&bits, dtype, 0);
}
__device__ __forceinline__ int64_t dsrtk_raw_i64(uint64_t raw, int dtype)
{
    uint64_t bits = dsrtk_element_bits(raw, dtype);
    return dsrt_load_i64(&bits, dtype, 0);
}

/* How a copy converts: same dtype (not fp4) moves raw bits, NaN payloads included; integers
 * travel as int64 and everything else as f32, as numeric.h's rules say. */
enum { DSRTK_COPY_BITS, DSRTK_COPY_INT, DSRTK_COPY_FLOAT };
static inline int dsrtk_copy_mode(int dst_dtype, int src_dtype)
{
    /* fp4 to fp4 needs the nibble-wise store; the f32 round trip is exact for every fp4 code */
    if (dst_dtype == src_dtype && dst_dtype != DSRT_FP4E2M1) return DSRTK_COPY_BITS;
    if (!dsrt_dtype_is_float(dst_dtype) && !dsrt_dtype_is_float(src_dtype)) return DSRTK_COPY_INT;
    return DSRTK_COPY_FLOAT;
}

/* Stores the element loaded as `raw` (of dtype src_dtype) at element index `at` of dst. */
__device__ __forceinline__ void dsrtk_store_copied(const dsrt_view &dst, int mode, int src_dtype, int64_t at, uint64_t raw)
{
    if (mode == DSRTK_COPY_BITS) {
        switch (dst.dtype) {
        case DSRT_F32: case DSRT_I32: ((uint32_t *)dst.data)[at] = (uint32_t)raw; break;
        case DSRT_BF16: case DSRT_F16: ((uint16_t *)dst.data)[at] = (uint16_t)raw; break;
        case DSRT_I64: ((uint64_t *)dst.data)[at] = raw; break;
        default: ((uint8_t *)dst.data)[at] = (uint8_t)raw; break;
        }
    } else if (mode == DSRTK_COPY_INT) {
        dsrt_store_i64(dst.data, dst.dtype, at, dsrtk_raw_i64(raw, src_dtype));
    } else {
        dsrt_store_f32(dst.data, dst.dtype, at, dsrtk_raw_f32(raw, src_dtype));
    }
}

/* transpose.cu: copies through shared-memory tiles when the two coalesced views (of one shape)
 * are contiguous along different dimensions, the case a strided walk reads or writes a word per
 * memory transaction in. *taken is 0 (nothing launched) when the layouts are not that case. */
int dsrtk_copy_tiled(int dev, const dsrt_view *dst, const dsrt_view *src, int mode, void *stream, int *taken);

#endif
