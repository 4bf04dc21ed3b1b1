/*
 * device.cu - devices, memory, streams, events and copies over the CUDA runtime API, plus the
 * error channel and view helpers the other kernel files share (common.cuh).
 *
 * What this file protects: the core must be able to treat a CUDA failure like any other error. So
 * every runtime call here is checked, nothing aborts, and a failure leaves a message that says what
 * was being done and what CUDA answered ("cudaMalloc of 1073741824 bytes on cuda:0: out of
 * memory"). Out-of-memory gets its own code, DSRTK_OOM, because the caching allocator answers it
 * by releasing its cache and trying again.
 *
 * Each function taking `dev` selects that device first: the core may call from any thread, and the
 * CUDA runtime's current device is per thread. A missing driver or GPU is not an error for
 * dsrtk_device_count, it is the CPU-only machine, and the answer is 0.
 */
#include <cuda_profiler_api.h>
#include <atomic>
#include <mutex>
#include <string.h>
#include <stdarg.h>
#include <stdio.h>
#include "common.cuh"

/* ---- the error channel ---- */

static thread_local char error_message[512];

const char *dsrtk_error(void) { return error_message; }

int dsrtk_fail(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(error_message, sizeof error_message, fmt, ap);
    va_end(ap);
    return code;
}

int dsrtk_check(cudaError_t err, const char *fmt, ...)
{
    if (err == cudaSuccess) return DSRTK_OK;
    cudaGetLastError(); /* clears what is clearable; a sticky (context-killing) error stays */
    char what[384];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    return dsrtk_fail(err == cudaErrorMemoryAllocation ? DSRTK_OOM : DSRTK_ERROR, "%s: %s", what,
                      cudaGetErrorString(err));
}

/* ---- helpers shared by the launchers ---- */

enum { MAX_CACHED_DEVICES = 64 };
static std::atomic<int> multiprocessors[MAX_CACHED_DEVICES];

int dsrtk_multiprocessors(int dev)
{
    int sms = dev >= 0 && dev < MAX_CACHED_DEVICES ? multiprocessors[dev].load(std::memory_order_relaxed) : 0;
    if (sms > 0) return sms;
    /* a failed query only costs occupancy: fall back to the H100/H200 count */
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) {
        cudaGetLastError();
        return 132;
    }
    if (dev >= 0 && dev < MAX_CACHED_DEVICES) multiprocessors[dev].store(sms, std::memory_order_relaxed);
    return sms;
}

int dsrtk_grid_for(int dev, int64_t units, int block)
{
    int64_t wanted = (units + block - 1) / block, most = (int64_t)dsrtk_multiprocessors(dev) * (2048 / block) * 4;
    if (wanted < 1) wanted = 1;
    return (int)(wanted < most ? wanted : most);
}

/* Per-call host work is what a decode step pays for (its kernels take microseconds), so what the
 * launchers ask CUDA about a device or a kernel is asked once and kept: the shared-memory limit
 * per device, each kernel's shared-memory opt-in per device, and the occupancy query's answer for
 * a cluster shape. */
static std::atomic<int> shared_optin[MAX_CACHED_DEVICES];

int dsrtk_shared_limit(int dev, int *optin)
{
    *optin = dev >= 0 && dev < MAX_CACHED_DEVICES ? shared_optin[dev].load(std::memory_order_relaxed) : 0;
    if (*optin > 0) return DSRTK_OK;
    int rc = dsrtk_check(cudaDeviceGetAttribute(optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
                         "shared memory limit of cuda:%d", dev);
    if (!rc && dev >= 0 && dev < MAX_CACHED_DEVICES) shared_optin[dev].store(*optin, std::memory_order_relaxed);
    return rc;
}

/* the kernels' opt-ins: (device, kernel) -> the most bytes allowed so far. Entries are appended
 * under the lock and published by the count; a launch whose bytes an entry already allows reads
 * them without it (launchers ask on every launch, ~20 times a decode step). */
enum { MAX_OPT_INS = 256 };
static std::mutex opt_in_lock;
static struct OptIn {
    int dev;
    const void *fn;
    std::atomic<size_t> bytes;
} opt_ins[MAX_OPT_INS];
static std::atomic<int> opt_in_count;

static OptIn *known_opt_in(int dev, const void *fn)
{
    const int n = opt_in_count.load(std::memory_order_acquire);
    for (int i = 0; i < n; i++)
        if (opt_ins[i].dev == dev && opt_ins[i].fn == fn) return &opt_ins[i];
    return NULL;
}

int dsrtk_allow_shared(int dev, const void *fn, size_t smem, const char *name)
{
    if (smem == 0) return DSRTK_OK;
    OptIn *known = known_opt_in(dev, fn);
    if (known && known->bytes.load(std::memory_order_acquire) >= smem) return DSRTK_OK;
    std::lock_guard<std::mutex> guard(opt_in_lock);
    known = known_opt_in(dev, fn);
    if (known && known->bytes.load(std::memory_order_relaxed) >= smem) return DSRTK_OK;
    /* the attribute only grows: a launch of fewer bytes that another thread has queued stays valid */
    int rc = dsrtk_check(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                         "allowing %zu bytes of shared memory for %s on cuda:%d", smem, name, dev);
    if (rc) return rc;
    if (known) {
        known->bytes.store(smem, std::memory_order_release);
    } else {
        const int n = opt_in_count.load(std::memory_order_relaxed);
        if (n < MAX_OPT_INS) {
            opt_ins[n].dev = dev, opt_ins[n].fn = fn;
            opt_ins[n].bytes.store(smem, std::memory_order_relaxed);
            opt_in_count.store(n + 1, std::memory_order_release); /* the entry is whole before it is seen */
        }
    }
    return DSRTK_OK;
}

/* the occupancy query's answers: (device, kernel, cluster, block, bytes) -> clusters placed */
enum { MAX_CLUSTER_ANSWERS = 64 };
static std::mutex cluster_lock;
static struct ClusterAnswer {
    int dev;
    const void *fn;
    int cluster, block;
    size_t smem;
    int fits;
} cluster_answers[MAX_CLUSTER_ANSWERS];
static int cluster_answer_count;

int dsrtk_clusters_fit(int dev, const void *fn, int cluster, int block, size_t smem)
{
    std::lock_guard<std::mutex> guard(cluster_lock);
    for (int i = 0; i < cluster_answer_count; i++) {
        const ClusterAnswer &a = cluster_answers[i];
        if (a.dev == dev && a.fn == fn && a.cluster == cluster && a.block == block && a.smem == smem) return a.fits;
    }
    int fits = 0;
    /* beyond 8 blocks a cluster is "non-portable": Hopper places 16, other parts may not */
    bool ok = cluster <= 8 || cudaFuncSetAttribute(fn, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess;
    if (ok) {
        cudaLaunchAttribute attr;
        attr.id = cudaLaunchAttributeClusterDimension;
        attr.val.clusterDim.x = (unsigned)cluster, attr.val.clusterDim.y = attr.val.clusterDim.z = 1;
        cudaLaunchConfig_t config = {};
        config.gridDim = dim3((unsigned)cluster), config.blockDim = dim3((unsigned)block), config.dynamicSmemBytes = smem;
        config.attrs = &attr, config.numAttrs = 1;
        ok = cudaOccupancyMaxActiveClusters(&fits, fn, &config) == cudaSuccess;
    }
    if (!ok) { /* a refusal only means "none" */
        (void)cudaGetLastError();
        fits = 0;
    }
    if (cluster_answer_count < MAX_CLUSTER_ANSWERS)
        cluster_answers[cluster_answer_count++] = ClusterAnswer{dev, fn, cluster, block, smem, fits};
    return fits;
}

int64_t dsrtk_numel(const dsrt_view *v)
{
    int64_t n = 1;
    for (int d = 0; d < v->ndim; d++) n *= v->shape[d];
    return n;
}

int dsrtk_is_contiguous(const dsrt_view *v)
{
    int64_t expected = 1;
    for (int d = v->ndim - 1; d >= 0; d--) {
        if (v->shape[d] == 1) continue; /* any stride walks a dimension of one the same */
        if (v->stride[d] != expected) return 0;
        expected *= v->shape[d];
    }
    return 1;
}

size_t dsrtk_dtype_size(int dtype)
{
    switch (dtype) {
    case DSRT_F32: case DSRT_I32: return 4;
    case DSRT_BF16: case DSRT_F16: return 2;
    case DSRT_I64: return 8;
    case DSRT_FP4E2M1: return 0;
    default: return 1;
    }
}

void dsrtk_coalesce(dsrt_view *const *views, int count)
{
    int64_t shape[DSRT_MAX_DIMS], stride[DSRTK_MAX_WALK][DSRT_MAX_DIMS];
    int ndim = 0;
    /* walk from the innermost dimension out, appending to or merging into the last kept one */
    for (int d = views[0]->ndim - 1; d >= 0; d--) {
        int64_t n = views[0]->shape[d];
        if (n == 1) continue;
        int merge = ndim > 0;
        for (int k = 0; k < count && merge; k++)
            merge = views[k]->stride[d] == stride[k][ndim - 1] * shape[ndim - 1];
        if (merge) {
            shape[ndim - 1] *= n;
        } else {
            shape[ndim] = n;
            for (int k = 0; k < count; k++) stride[k][ndim] = views[k]->stride[d];
            ndim++;
        }
    }
    if (ndim == 0) { /* a single element */
        shape[0] = 1;
        for (int k = 0; k < count; k++) stride[k][0] = 0;
        ndim = 1;
    }
    for (int k = 0; k < count; k++) {
        views[k]->ndim = ndim;
        for (int d = 0; d < ndim; d++) { /* kept innermost-first above */
            views[k]->shape[d] = shape[ndim - 1 - d];
            views[k]->stride[d] = stride[k][ndim - 1 - d];
        }
    }
}

/* ---- devices and memory ---- */

int dsrtk_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return n;
}

int dsrtk_device_name(int dev, char *buf, size_t len)
{
    DSRTK_SET_DEVICE(dev, "device_name");
    cudaDeviceProp prop;
    int st = dsrtk_check(cudaGetDeviceProperties(&prop, dev), "cudaGetDeviceProperties of cuda:%d", dev);
    if (st) return st;
    if (len > 0) snprintf(buf, len, "%s", prop.name);
    return DSRTK_OK;
}

int dsrtk_profiler(int dev, int start)
{
    DSRTK_SET_DEVICE(dev, "profiler");
    return start ? dsrtk_check(cudaProfilerStart(), "cudaProfilerStart on cuda:%d", dev)
                 : dsrtk_check(cudaProfilerStop(), "cudaProfilerStop on cuda:%d", dev);
}

int dsrtk_mem_info(int dev, size_t *free_bytes, size_t *total_bytes)
{
    DSRTK_SET_DEVICE(dev, "mem_info");
    return dsrtk_check(cudaMemGetInfo(free_bytes, total_bytes), "cudaMemGetInfo on cuda:%d", dev);
}

int dsrtk_malloc(int dev, void **ptr, size_t bytes)
{
    *ptr = NULL;
    DSRTK_SET_DEVICE(dev, "malloc");
    return dsrtk_check(cudaMalloc(ptr, bytes), "cudaMalloc of %zu bytes on cuda:%d", bytes, dev);
}

int dsrtk_free(int dev, void *ptr)
{
    DSRTK_SET_DEVICE(dev, "free");
    return dsrtk_check(cudaFree(ptr), "cudaFree of %p on cuda:%d", ptr, dev);
}

int dsrtk_host_alloc(void **ptr, size_t bytes)
{
    *ptr = NULL;
    /* portable: pinned for every device, so one staging buffer serves them all */
    return dsrtk_check(cudaHostAlloc(ptr, bytes, cudaHostAllocPortable), "cudaHostAlloc of %zu pinned bytes",
                       bytes);
}

int dsrtk_host_free(void *ptr)
{
    return dsrtk_check(cudaFreeHost(ptr), "cudaFreeHost of %p", ptr);
}

/* ---- streams and events ---- */

int dsrtk_stream_create(int dev, void **stream)
{
    *stream = NULL;
    DSRTK_SET_DEVICE(dev, "stream_create");
    /* non-blocking: a dsrt stream must not serialise behind the legacy default stream; ordering
     * between streams is what events are for */
    cudaStream_t s;
    int st = dsrtk_check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate on cuda:%d", dev);
    if (st == DSRTK_OK) *stream = s;
    return st;
}

int dsrtk_stream_destroy(int dev, void *stream)
{
    DSRTK_SET_DEVICE(dev, "stream_destroy");
    return dsrtk_check(cudaStreamDestroy((cudaStream_t)stream), "cudaStreamDestroy on cuda:%d", dev);
}

int dsrtk_stream_synchronize(int dev, void *stream)
{
    DSRTK_SET_DEVICE(dev, "stream_synchronize");
    return dsrtk_check(cudaStreamSynchronize((cudaStream_t)stream), "cudaStreamSynchronize on cuda:%d", dev);
}

int dsrtk_event_create(int dev, void **event, int timing)
{
    *event = NULL;
    DSRTK_SET_DEVICE(dev, "event_create");
    /* timing costs a timestamp write and makes waits heavier; only benchmarks ask for it */
    cudaEvent_t e;
    int st = dsrtk_check(cudaEventCreateWithFlags(&e, timing ? cudaEventDefault : cudaEventDisableTiming),
                         "cudaEventCreate on cuda:%d", dev);
    if (st == DSRTK_OK) *event = e;
    return st;
}

int dsrtk_event_destroy(int dev, void *event)
{
    DSRTK_SET_DEVICE(dev, "event_destroy");
    return dsrtk_check(cudaEventDestroy((cudaEvent_t)event), "cudaEventDestroy on cuda:%d", dev);
}

int dsrtk_event_record(int dev, void *event, void *stream)
{
    DSRTK_SET_DEVICE(dev, "event_record");
    return dsrtk_check(cudaEventRecord((cudaEvent_t)event, (cudaStream_t)stream), "cudaEventRecord on cuda:%d", dev);
}

int dsrtk_event_query(int dev, void *event)
{
    DSRTK_SET_DEVICE(dev, "event_query");
    cudaError_t err = cudaEventQuery((cudaEvent_t)event);
    if (err == cudaErrorNotReady) {
        cudaGetLastError(); /* "not yet" is an answer, not a failure to carry forward */
        return DSRTK_NOT_READY;
    }
    return dsrtk_check(err, "cudaEventQuery on cuda:%d", dev);
}

int dsrtk_event_synchronize(int dev, void *event)
{
    DSRTK_SET_DEVICE(dev, "event_synchronize");
    return dsrtk_check(cudaEventSynchronize((cudaEvent_t)event), "cudaEventSynchronize on cuda:%d", dev);
}

int dsrtk_event_elapsed_ms(int dev, void *start, void *end, float *ms)
{
    DSRTK_SET_DEVICE(dev, "event_elapsed_ms");
    return dsrtk_check(cudaEventElapsedTime(ms, (cudaEvent_t)start, (cudaEvent_t)end),
                       "cudaEventElapsedTime on cuda:%d", dev);
}

int dsrtk_stream_wait_event(int dev, void *stream, void *event)
{
    DSRTK_SET_DEVICE(dev, "stream_wait_event");
    return dsrtk_check(cudaStreamWaitEvent((cudaStream_t)stream, (cudaEvent_t)event, 0),
                       "cudaStreamWaitEvent on cuda:%d", dev);
}

/* ---- copies ---- */

/* Small asynchronous uploads go through pinned staging: from pageable memory cudaMemcpyAsync may
 * synchronise with the stream to stage the bytes itself (CUDA's API synchronisation notes), which
 * made every decode step's token-id upload wait for the previous step's kernels. A device's ring of
 * STAGE_SLOTS pinned slots, each reused only after the event of its last copy; the host bytes are
 * copied in at once, so the caller may free them on return, as after a synchronous copy. */
enum { STAGE_SLOTS = 32, STAGE_SLOT_BYTES = 64 << 10 };
struct Staging {
    std::mutex lock;
    char *slots = nullptr;
    cudaEvent_t done[STAGE_SLOTS];
    int events = 0, next = 0;
};
static Staging staging[MAX_CACHED_DEVICES];

static int staged_upload(int dev, void *dst, const void *src, size_t bytes, cudaStream_t s)
{
    Staging &st = staging[dev];
    std::lock_guard<std::mutex> hold(st.lock);
    for (; st.events < STAGE_SLOTS; st.events++) /* made once; a failure is retried by the next call */
        if (int rc = dsrtk_check(cudaEventCreateWithFlags(&st.done[st.events], cudaEventDisableTiming),
                                 "memcpy: staging event on cuda:%d", dev))
            return rc;
    if (!st.slots)
        if (int rc = dsrtk_check(cudaHostAlloc((void **)&st.slots, (size_t)STAGE_SLOTS * STAGE_SLOT_BYTES, cudaHostAllocDefault),
                                 "memcpy: pinned staging of %d KiB on cuda:%d", STAGE_SLOTS * (STAGE_SLOT_BYTES >> 10), dev))
            return rc;
    const int i = st.next;
    st.next = (i + 1) % STAGE_SLOTS;
    char *slot = st.slots + (size_t)i * STAGE_SLOT_BYTES;
    int rc = dsrtk_check(cudaEventSynchronize(st.done[i]), "memcpy: staging slot on cuda:%d", dev); /* long done */
    if (rc) return rc;
    memcpy(slot, src, bytes);
    rc = dsrtk_check(cudaMemcpyAsync(dst, slot, bytes, cudaMemcpyHostToDevice, s), "cudaMemcpyAsync host to device of %zu bytes on cuda:%d",
                     bytes, dev);
    return rc ? rc : dsrtk_check(cudaEventRecord(st.done[i], s), "memcpy: staging event on cuda:%d", dev);
}

int dsrtk_memcpy(int dev, void *dst, const void *src, size_t bytes, int kind, void *stream, int async)
{
    static const cudaMemcpyKind kinds[] = {cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice};
    static const char *const names[] = {"host to device", "device to host", "device to device"};
    if (kind < DSRTK_H2D || kind > DSRTK_D2D) return dsrtk_fail(DSRTK_ERROR, "memcpy: unknown copy kind %d", kind);
    DSRTK_SET_DEVICE(dev, "memcpy");
    cudaStream_t s = (cudaStream_t)stream;
    if (kind == DSRTK_H2D && async && bytes <= STAGE_SLOT_BYTES && dev >= 0 && dev < MAX_CACHED_DEVICES)
        return staged_upload(dev, dst, src, bytes, s);
    /* A synchronous copy is still enqueued on the stream, so it lands after the work already
     * queued there (the kernel that produced the bytes), then waits for it. */
    int st = dsrtk_check(cudaMemcpyAsync(dst, src, bytes, kinds[kind], s), "cudaMemcpyAsync %s of %zu bytes on cuda:%d",
                         names[kind], bytes, dev);
    if (st || async) return st;
    return dsrtk_check(cudaStreamSynchronize(s), "cudaStreamSynchronize after a %s copy of %zu bytes on cuda:%d",
                       names[kind], bytes, dev);
}
