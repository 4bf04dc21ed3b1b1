/*
 * stream.c - streams and events over the kernel ABI (see stream.h).
 */
#include "stream.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "err.h"
#include "kernels.h"

static atomic_uint_fast64_t next_stream_id = 1;

int dsrt_device_count(void)
{
    static atomic_int cached = -1;
    int n = atomic_load(&cached);
    if (n < 0) {
        n = dsrtk_device_count();
        if (n > DSRT_MAX_DEVICES) n = DSRT_MAX_DEVICES;
        atomic_store(&cached, n);
    }
    return n;
}

int dsrt_device_check(int device)
{
    if (device == DSRT_CPU) return 0;
    int n = dsrt_device_count();
    if (device < 0 || device >= n)
        return n ? dsrt_err("device cuda:%d does not exist (%d CUDA device%s)", device, n, n == 1 ? "" : "s")
                 : dsrt_err("device cuda:%d is not available: no CUDA device (dsrt.cuda.available() is false)", device);
    return 0;
}

const char *dsrt_device_str(int device, char buf[16])
{
    if (device == DSRT_CPU) snprintf(buf, 16, "cpu");
    else snprintf(buf, 16, "cuda:%d", device);
    return buf;
}

int dsrt_device_parse(const char *s, int *device)
{
    if (strcmp(s, "cpu") == 0) return *device = DSRT_CPU, 0;
    if (strcmp(s, "cuda") == 0) return *device = 0, 0;
    if (strncmp(s, "cuda:", 5) == 0 && s[5]) {
        char *end;
        long n = strtol(s + 5, &end, 10);
        if (!*end && n >= 0 && n < DSRT_MAX_DEVICES) return *device = (int)n, 0;
    }
    return dsrt_err("unknown device '%s' (expected \"cpu\", \"cuda\" or \"cuda:N\")", s);
}

static dsrt_stream default_streams[DSRT_MAX_DEVICES + 1]; /* [0] is the CPU */

dsrt_stream *dsrt_stream_default(int device)
{
    dsrt_stream *s = &default_streams[device + 1];
    s->device = device;
    s->id = (uint64_t)(device + 2) << 56; /* fixed, disjoint from the counter's range */
    return s;
}

int dsrt_stream_is_default(const dsrt_stream *s)
{
    return s >= default_streams && s < default_streams + DSRT_MAX_DEVICES + 1;
}

dsrt_stream *dsrt_stream_new(int device)
{
    if (dsrt_device_check(device)) return NULL;
    dsrt_stream *s = calloc(1, sizeof *s);
    if (!s) return dsrt_err_null("stream: out of host memory");
    if (device != DSRT_CPU && dsrtk_stream_create(device, &s->handle)) {
        free(s);
        return dsrt_err_null("stream: %s", dsrtk_error());
    }
    atomic_init(&s->refcount, 1);
    s->device = device;
    s->id = atomic_fetch_add(&next_stream_id, 1);
    return s;
}

void dsrt_stream_retain(dsrt_stream *s)
{
    if (!dsrt_stream_is_default(s)) atomic_fetch_add(&s->refcount, 1);
}

void dsrt_stream_release(dsrt_stream *s)
{
    if (!s || dsrt_stream_is_default(s) || atomic_fetch_sub(&s->refcount, 1) != 1) return;
    if (s->handle) dsrtk_stream_destroy(s->device, s->handle); /* CUDA lets queued work finish */
    free(s);
}

int dsrt_stream_synchronize(dsrt_stream *s)
{
    if (s->device == DSRT_CPU) return 0;
    return dsrtk_stream_synchronize(s->device, s->handle) ? dsrt_err("stream:synchronize: %s", dsrtk_error()) : 0;
}

int dsrt_stream_wait(dsrt_stream *s, dsrt_event *e)
{
    if (s->device != e->device) {
        char a[16], b[16];
        return dsrt_err("stream:wait: the stream is on %s but the event on %s",
                        dsrt_device_str(s->device, a), dsrt_device_str(e->device, b));
    }
    if (s->device == DSRT_CPU || !e->stream_id) return 0;
    return dsrtk_stream_wait_event(s->device, s->handle, e->handle) ? dsrt_err("stream:wait: %s", dsrtk_error()) : 0;
}

dsrt_event *dsrt_event_new(int device, int timing)
{
    if (dsrt_device_check(device)) return NULL;
    dsrt_event *e = calloc(1, sizeof *e);
    if (!e) return dsrt_err_null("event: out of host memory");
    if (device != DSRT_CPU && dsrtk_event_create(device, &e->handle, timing)) {
        free(e);
        return dsrt_err_null("event: %s", dsrtk_error());
    }
    atomic_init(&e->refcount, 1);
    e->device = device;
    return e;
}

void dsrt_event_retain(dsrt_event *e) { atomic_fetch_add(&e->refcount, 1); }

void dsrt_event_release(dsrt_event *e)
{
    if (!e || atomic_fetch_sub(&e->refcount, 1) != 1) return;
    if (e->handle) dsrtk_event_destroy(e->device, e->handle);
    free(e);
}

int dsrt_event_record(dsrt_event *e, dsrt_stream *s)
{
    if (s->device != e->device) {
        char a[16], b[16];
        return dsrt_err("stream:record: the stream is on %s but the event on %s",
                        dsrt_device_str(s->device, a), dsrt_device_str(e->device, b));
    }
    if (s->device != DSRT_CPU && dsrtk_event_record(s->device, e->handle, s->handle))
        return dsrt_err("stream:record: %s", dsrtk_error());
    if (s->device == DSRT_CPU) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        e->host_ms = (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
    }
    e->stream_id = s->id;
    return 0;
}

int dsrt_event_query(dsrt_event *e)
{
    if (e->device == DSRT_CPU || !e->stream_id) return 1;
    int rc = dsrtk_event_query(e->device, e->handle);
    if (rc == DSRTK_OK) return 1;
    if (rc == DSRTK_NOT_READY) return 0;
    return dsrt_err("event:query: %s", dsrtk_error());
}

int dsrt_event_synchronize(dsrt_event *e)
{
    if (e->device == DSRT_CPU || !e->stream_id) return 0;
    return dsrtk_event_synchronize(e->device, e->handle) ? dsrt_err("event:synchronize: %s", dsrtk_error()) : 0;
}

int dsrt_event_elapsed(dsrt_event *start, dsrt_event *end, double *ms)
{
    if (start->device != end->device) return dsrt_err("event:elapsed: the events are on different devices");
    if (!start->stream_id || !end->stream_id) return dsrt_err("event:elapsed: an event was never recorded");
    if (start->device == DSRT_CPU) return *ms = end->host_ms - start->host_ms, 0;
    float f;
    if (dsrtk_event_elapsed_ms(start->device, start->handle, end->handle, &f))
        return dsrt_err("event:elapsed: %s", dsrtk_error());
    *ms = f;
    return 0;
}
