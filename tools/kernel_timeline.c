/*
 * kernel_timeline.c - the kernels of a profiled region as they really ran: start and end of every
 * kernel from CUPTI's activity records, with programmatic dependent launch, the aux streams and
 * the host's pace all in effect. ncu serialises kernels and times each alone, so it cannot show
 * what the decode step's critical path is; nsys would, but the GPU image has none. This library
 * is CUDA's injection hook (CUDA_INJECTION64_PATH): between cudaProfilerStart and cudaProfilerStop
 * (dsrt.cuda.profiler(true/false)) it records every kernel, and with DSRT_TIMELINE_HOST=1 every
 * runtime call too, and writes to the file named by DSRT_TIMELINE (default timeline.txt) one line
 * per record, in one timebase:
 *     K start_ns end_ns correlation stream grid_x grid_y mangled_name   (a kernel on the GPU)
 *     A start_ns end_ns correlation cbid                                 (a runtime call on the host)
 *     S ns                                          (a stream or device synchronize returned, host)
 * A kernel's correlation names the call that launched it, so the file says for each kernel when
 * the host asked for it and when the GPU ran it: whether the GPU waited for the host. The runtime
 * calls' records are not free: they doubled the host's time to issue a decode step (0.99 ms
 * against 0.52 untraced, H200 machine, 2026-11-29), so with them the host looks slower than it is;
 * hence opt-in. Stream and device synchronize calls, cheap to note, part a region's steps (S lines;
 * an event's synchronize, which the token upload's staging ring makes inside a step, does not).
 * tools/timeline.sh runs scripts/profile_decode.lua under it and prints the steps.
 */
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>

static FILE *out;
static int host;      /* DSRT_TIMELINE_HOST=1: the runtime calls too */
static int recording; /* between cudaProfilerStart and cudaProfilerStop */

static void CUPTIAPI buffer_requested(uint8_t **buffer, size_t *size, size_t *max_records)
{
    *size = (size_t)8 << 20;
    *buffer = aligned_alloc(8, *size);
    *max_records = 0;
}

static void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream, uint8_t *buffer, size_t size, size_t valid)
{
    (void)ctx, (void)stream, (void)size;
    CUpti_Activity *record = NULL;
    while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
        if (!out) continue;
        if (record->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) {
            const CUpti_ActivityKernel10 *k = (const CUpti_ActivityKernel10 *)record;
            fprintf(out, "K %llu %llu %u %u %d %d %s\n", (unsigned long long)k->start, (unsigned long long)k->end,
                    k->correlationId, k->streamId, k->gridX, k->gridY, k->name);
        } else if (record->kind == CUPTI_ACTIVITY_KIND_RUNTIME) {
            const CUpti_ActivityAPI *a = (const CUpti_ActivityAPI *)record;
            fprintf(out, "A %llu %llu %u %u\n", (unsigned long long)a->start, (unsigned long long)a->end, a->correlationId,
                    (unsigned)a->cbid);
        }
    }
    free(buffer);
}

static void CUPTIAPI on_api(void *user, CUpti_CallbackDomain domain, CUpti_CallbackId id, const void *data)
{
    (void)user, (void)domain;
    const CUpti_CallbackData *cb = data;
    if (id == CUPTI_RUNTIME_TRACE_CBID_cudaProfilerStart_v4000 && cb->callbackSite == CUPTI_API_EXIT) {
        cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
        if (host) cuptiActivityEnable(CUPTI_ACTIVITY_KIND_RUNTIME);
        recording = 1;
    }
    if ((id == CUPTI_RUNTIME_TRACE_CBID_cudaDeviceSynchronize_v3020 || id == CUPTI_RUNTIME_TRACE_CBID_cudaStreamSynchronize_v3020) &&
        cb->callbackSite == CUPTI_API_EXIT && recording && out) {
        uint64_t now = 0;
        cuptiGetTimestamp(&now);
        fprintf(out, "S %llu\n", (unsigned long long)now);
    }
    if (id == CUPTI_RUNTIME_TRACE_CBID_cudaProfilerStop_v4000 && cb->callbackSite == CUPTI_API_ENTER) {
        recording = 0;
        cuptiActivityDisable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
        if (host) cuptiActivityDisable(CUPTI_ACTIVITY_KIND_RUNTIME);
        cuptiActivityFlushAll(1);
        if (out) fflush(out);
    }
}

int InitializeInjection(void)
{
    const char *path = getenv("DSRT_TIMELINE"), *want_host = getenv("DSRT_TIMELINE_HOST");
    host = want_host && want_host[0] == '1';
    out = fopen(path && *path ? path : "timeline.txt", "w");
    CUpti_SubscriberHandle subscriber;
    if (!out || cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed) != CUPTI_SUCCESS ||
        cuptiSubscribe(&subscriber, (CUpti_CallbackFunc)on_api, NULL) != CUPTI_SUCCESS ||
        cuptiEnableCallback(1, subscriber, CUPTI_CB_DOMAIN_RUNTIME_API, CUPTI_RUNTIME_TRACE_CBID_cudaProfilerStart_v4000) !=
            CUPTI_SUCCESS ||
        cuptiEnableCallback(1, subscriber, CUPTI_CB_DOMAIN_RUNTIME_API, CUPTI_RUNTIME_TRACE_CBID_cudaProfilerStop_v4000) !=
            CUPTI_SUCCESS ||
        cuptiEnableCallback(1, subscriber, CUPTI_CB_DOMAIN_RUNTIME_API, CUPTI_RUNTIME_TRACE_CBID_cudaDeviceSynchronize_v3020) !=
            CUPTI_SUCCESS ||
        cuptiEnableCallback(1, subscriber, CUPTI_CB_DOMAIN_RUNTIME_API, CUPTI_RUNTIME_TRACE_CBID_cudaStreamSynchronize_v3020) !=
            CUPTI_SUCCESS) {
        fprintf(stderr, "kernel_timeline: CUPTI would not start\n");
        return 0;
    }
    return 1;
}
