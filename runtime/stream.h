/*
 * stream.h - devices, streams and events as refcounted objects.
 *
 * A stream is an object someone owns (the model script, a layer's caller), never a global index:
 * the aux-stream wiring of DSV4 is data handed from Lua to layers. Device -1 is the CPU, where
 * streams and events are valid and work simply runs synchronously, so scripts are written once.
 * Every stream has a process-unique id so that the allocator can tell streams apart after one is
 * freed and its address reused.
 */
#ifndef DSRT_STREAM_H
#define DSRT_STREAM_H

#include <stdatomic.h>
#include <stdint.h>

#define DSRT_CPU (-1)
#define DSRT_MAX_DEVICES 16

typedef struct dsrt_stream {
    atomic_int refcount;
    int device;
    void *handle;  /* cudaStream_t; NULL for the CPU and for a device's default stream */
    uint64_t id;
} dsrt_stream;

typedef struct dsrt_event {
    atomic_int refcount;
    int device;
    void *handle;
    uint64_t stream_id; /* the stream it was last recorded on, 0 if never */
    double host_ms;     /* CPU events: when recorded, so elapsed() times CPU work too */
} dsrt_event;

int dsrt_device_count(void);                 /* CUDA devices; 0 without GPU or CUDA build */
int dsrt_device_check(int device);           /* 0, or -1 naming the device that does not exist */
const char *dsrt_device_str(int device, char buf[16]); /* "cpu", "cuda:0" */
int dsrt_device_parse(const char *s, int *device);     /* "cpu", "cuda", "cuda:N" */

dsrt_stream *dsrt_stream_new(int device);
dsrt_stream *dsrt_stream_default(int device); /* shared per device; retain/release are no-ops on it */
int dsrt_stream_is_default(const dsrt_stream *s);
void dsrt_stream_retain(dsrt_stream *s);
void dsrt_stream_release(dsrt_stream *s);
int dsrt_stream_synchronize(dsrt_stream *s);
int dsrt_stream_wait(dsrt_stream *s, dsrt_event *e); /* later work on s waits for e */

dsrt_event *dsrt_event_new(int device, int timing);
void dsrt_event_retain(dsrt_event *e);
void dsrt_event_release(dsrt_event *e);
int dsrt_event_record(dsrt_event *e, dsrt_stream *s);
int dsrt_event_query(dsrt_event *e); /* 1 done, 0 pending, -1 error */
int dsrt_event_synchronize(dsrt_event *e);
int dsrt_event_elapsed(dsrt_event *start, dsrt_event *end, double *ms);

#endif
