/*
 * alloc.c - storage and the caching allocator (see alloc.h for the rules it keeps).
 *
 * Size classes: requests round up to 512 bytes below 1 MiB and to 2 MiB above, and a cached block
 * serves only requests of exactly its class, so the cache cannot fragment into unusable pieces;
 * the limit and the retry-after-emptying bound the memory it can hold. CPU memory is not cached
 * (malloc already does that) but is counted and limited the same way.
 *
 * The cost that matters is the host's, per tensor: a decode step allocates and frees hundreds of
 * small tensors, so the cache is hashed by size class (a take looks at one short list, not at
 * every cached block), and a block used on its allocating stream alone is freed without an event:
 * it keeps that stream (its home, retained) and is reused on it in stream order; only a take by
 * another stream records an event on the home stream then - covering all work queued there so far,
 * which includes every use before the free - and waits on it. That covers more than the block's
 * uses, so small blocks are taken across streams only when memory is short (MOVE_MIN). Streams a
 * storage was additionally used on (dsrt_storage_use) still get their event at the free.
 */
#include "alloc.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "err.h"
#include "kernels.h"

#define MAX_PENDING (DSRT_STORAGE_STREAMS + 1)
#define CACHE_BUCKETS 256

/* Sizes are multiples of 512 below 1 MiB and of 2 MiB above: both kinds spread over the buckets. */
static unsigned bucket_of(size_t size) { return (unsigned)(((size >> 9) ^ (size >> 21)) % CACHE_BUCKETS); }

struct dsrt_block {
    void *ptr;
    size_t size;
    int device;
    dsrt_stream *home;              /* the stream it was last handed out on; retained while cached */
    void *events[MAX_PENDING];      /* recorded at free on each other stream that used it */
    uint64_t event_stream[MAX_PENDING];
    int nevents;
    dsrt_block *next;               /* in its cache bucket */
};

typedef struct {
    pthread_mutex_t lock;
    dsrt_mem_stats stats;
    dsrt_block *cache[CACHE_BUCKETS]; /* free blocks by size hash, most recently freed first */
    void *event_pool[64];
    int nevent_pool;
} device_state;

static device_state devices[DSRT_MAX_DEVICES + 1]; /* [0] is the CPU */
static pthread_once_t init_once = PTHREAD_ONCE_INIT;

static void init_devices(void)
{
    for (int i = 0; i <= DSRT_MAX_DEVICES; i++) pthread_mutex_init(&devices[i].lock, NULL);
}

static device_state *state_of(int device)
{
    pthread_once(&init_once, init_devices);
    return &devices[device + 1];
}

size_t dsrt_alloc_round(size_t n)
{
    if (n == 0) n = 1;
    if (n < ((size_t)1 << 20)) return (n + 511) & ~(size_t)511;
    size_t big = (size_t)2 << 20;
    return (n + big - 1) / big * big;
}

static void human(size_t bytes, char buf[32])
{
    if (bytes >= ((size_t)1 << 30)) snprintf(buf, 32, "%.2f GiB", (double)bytes / (1 << 30));
    else if (bytes >= ((size_t)1 << 20)) snprintf(buf, 32, "%.2f MiB", (double)bytes / (1 << 20));
    else snprintf(buf, 32, "%zu bytes", bytes);
}

static void *event_get(device_state *st, int device)
{
    if (st->nevent_pool) return st->event_pool[--st->nevent_pool];
    void *ev;
    return dsrtk_event_create(device, &ev, 0) ? NULL : ev;
}

static void event_put(device_state *st, int device, void *ev)
{
    if (st->nevent_pool < (int)(sizeof st->event_pool / sizeof st->event_pool[0])) st->event_pool[st->nevent_pool++] = ev;
    else dsrtk_event_destroy(device, ev);
}

/* Frees every cached block of a device; the caller holds the lock. */
static void empty_cache_locked(device_state *st, int device)
{
    for (int k = 0; k < CACHE_BUCKETS; k++) {
        while (st->cache[k]) {
            dsrt_block *b = st->cache[k];
            st->cache[k] = b->next;
            for (int i = 0; i < b->nevents; i++) event_put(st, device, b->events[i]);
            dsrtk_free(device, b->ptr); /* cudaFree waits for the device: pending uses are over */
            dsrt_stream_release(b->home);
            st->stats.reserved -= b->size;
            free(b);
        }
    }
}

/* A block of a smaller class than this is taken by another stream than its home only when memory
 * is short: the take's event (order_after_frees) covers everything queued on the home stream so far,
 * not just the block's last use, so a decode step's aux stream taking the main stream's block, or
 * the main stream an aux stream's, waited for the other's work to date. In a decode step of the
 * Flash slice wq_b's output took a block the indexer had freed on aux stream 0 and waited for the
 * indexer's top-k (CUPTI timeline, H200: wq_b began 1.3 us after it, 38 us after its input was
 * ready). A fresh block for each stream's working set of small tensors costs little memory; big
 * blocks (prefill's) still move. */
#define MOVE_MIN ((size_t)1 << 20)

/* Takes a cached block of exactly `size`, preferring one whose home is `stream`; one of another
 * home only if `any_home`. */
static dsrt_block *cache_take(device_state *st, size_t size, dsrt_stream *stream, int any_home)
{
    dsrt_block **best = NULL;
    for (dsrt_block **p = &st->cache[bucket_of(size)]; *p; p = &(*p)->next) {
        if ((*p)->size != size) continue;
        if ((*p)->home->id == stream->id) { best = p; break; }
        if (!best && any_home) best = p;
    }
    if (!best) return NULL;
    dsrt_block *b = *best;
    *best = b->next;
    return b;
}

/* Makes `stream` wait for what other streams may still have queued on b (see the top). On
 * failure b is left as it was, for the cache. */
static int order_after_frees(device_state *st, dsrt_block *b, dsrt_stream *stream)
{
    if (b->home->id != stream->id) {
        void *ev = event_get(st, b->device);
        int rc = !ev || dsrtk_event_record(b->device, ev, b->home->handle) ||
                 dsrtk_stream_wait_event(b->device, stream->handle, ev);
        if (ev) event_put(st, b->device, ev); /* a recorded event may be reused: the wait is queued */
        if (rc) return dsrt_err("allocator: %s", ev ? dsrtk_error() : "no event for a cross-stream reuse");
    }
    int rc = 0;
    for (int i = 0; i < b->nevents; i++) {
        if (!rc && b->event_stream[i] != stream->id && dsrtk_stream_wait_event(b->device, stream->handle, b->events[i]))
            rc = dsrt_err("allocator: %s", dsrtk_error());
        event_put(st, b->device, b->events[i]);
    }
    b->nevents = 0;
    dsrt_stream_retain(stream);
    dsrt_stream_release(b->home);
    b->home = stream;
    return rc;
}

/* A cached block for `stream` (cache_take), ordered after its frees; NULL with *failed = 0 when
 * the cache has none, with *failed = 1 (and the block back in the cache) when the ordering failed */
static dsrt_block *cache_reuse(device_state *st, size_t size, dsrt_stream *stream, int any_home, int *failed)
{
    dsrt_block *b = cache_take(st, size, stream, any_home);
    *failed = 0;
    if (!b) return NULL;
    st->stats.cache_hits++;
    if (order_after_frees(st, b, stream)) {
        unsigned k = bucket_of(b->size);
        b->next = st->cache[k], st->cache[k] = b;
        *failed = 1;
        return NULL;
    }
    return b;
}

static dsrt_block *device_alloc(device_state *st, int device, size_t size, dsrt_stream *stream)
{
    const int over_limit = st->stats.limit && st->stats.reserved + size > st->stats.limit;
    int failed;
    dsrt_block *b = cache_reuse(st, size, stream, size >= MOVE_MIN || over_limit, &failed);
    if (b || failed) return b;
    char want[32], have[32], lim[32];
    if (over_limit) {
        empty_cache_locked(st, device);
        if (st->stats.reserved + size > st->stats.limit) {
            human(size, want), human(st->stats.allocated, have), human(st->stats.limit, lim);
            return dsrt_err_null("out of memory on cuda:%d: %s requested, %s in use, limit %s "
                                 "(dsrt.set_memory_limit)", device, want, have, lim);
        }
    }
    void *ptr;
    int rc = dsrtk_malloc(device, &ptr, size);
    if (rc == DSRTK_OOM) {
        if ((b = cache_reuse(st, size, stream, 1, &failed)) || failed) return b;
        empty_cache_locked(st, device);
        rc = dsrtk_malloc(device, &ptr, size);
    }
    if (rc) {
        human(size, want), human(st->stats.allocated, have);
        return dsrt_err_null("out of memory on cuda:%d: %s requested, %s in use by dsrt (%s)",
                             device, want, have, dsrtk_error());
    }
    b = calloc(1, sizeof *b);
    if (!b) {
        dsrtk_free(device, ptr);
        return dsrt_err_null("allocator: out of host memory");
    }
    dsrt_stream_retain(stream);
    b->ptr = ptr, b->size = size, b->device = device, b->home = stream;
    st->stats.reserved += size;
    st->stats.device_mallocs++;
    return b;
}

/* Puts b back in the cache with an event on every stream but its home that used it (see the top;
 * streams[0] is the allocating stream, the home). */
static void block_free(device_state *st, dsrt_block *b, dsrt_storage *s)
{
    for (int i = 1; i < s->nstreams; i++) {
        void *ev = event_get(st, b->device);
        if (ev && !dsrtk_event_record(b->device, ev, s->streams[i]->handle)) {
            b->events[b->nevents] = ev;
            b->event_stream[b->nevents++] = s->streams[i]->id;
        } else if (ev) {
            event_put(st, b->device, ev);
        }
    }
    unsigned k = bucket_of(b->size);
    b->next = st->cache[k];
    st->cache[k] = b;
}

dsrt_storage *dsrt_storage_new(int device, size_t nbytes, dsrt_stream *stream)
{
    if (dsrt_device_check(device)) return NULL;
    if (stream->device != device) {
        char a[16], b[16];
        return dsrt_err_null("allocation on %s with a stream of %s", dsrt_device_str(device, a),
                             dsrt_device_str(stream->device, b));
    }
    dsrt_storage *s = calloc(1, sizeof *s);
    if (!s) return dsrt_err_null("out of host memory allocating a tensor");
    size_t size = dsrt_alloc_round(nbytes);
    device_state *st = state_of(device);
    pthread_mutex_lock(&st->lock);
    if (device == DSRT_CPU) {
        char want[32], have[32], lim[32];
        if (st->stats.limit && st->stats.allocated + size > st->stats.limit) {
            human(size, want), human(st->stats.allocated, have), human(st->stats.limit, lim);
            dsrt_err("out of memory on cpu: %s requested, %s in use, limit %s (dsrt.set_memory_limit)", want, have, lim);
        } else if (!(s->data = aligned_alloc(64, size))) {
            human(size, want);
            dsrt_err("out of memory on cpu: %s requested", want);
        }
    } else {
        if ((s->block = device_alloc(st, device, size, stream))) s->data = s->block->ptr;
    }
    if (!s->data) {
        pthread_mutex_unlock(&st->lock);
        free(s);
        return NULL;
    }
    st->stats.allocated += size;
    if (device == DSRT_CPU) st->stats.reserved += size;
    if (st->stats.allocated > st->stats.peak_allocated) st->stats.peak_allocated = st->stats.allocated;
    st->stats.allocations++;
    pthread_mutex_unlock(&st->lock);
    atomic_init(&s->refcount, 1);
    s->device = device;
    s->nbytes = nbytes;
    if (device != DSRT_CPU) {
        dsrt_stream_retain(stream); /* the allocating stream is streams[0] */
        s->streams[s->nstreams++] = stream;
    }
    return s;
}

dsrt_storage *dsrt_storage_wrap(int device, void *data, size_t nbytes, void (*release)(void *), void *ctx)
{
    dsrt_storage *s = calloc(1, sizeof *s);
    if (!s) return dsrt_err_null("out of host memory wrapping a tensor");
    atomic_init(&s->refcount, 1);
    s->device = device, s->data = data, s->nbytes = nbytes, s->release = release, s->release_ctx = ctx;
    return s;
}

void dsrt_storage_retain(dsrt_storage *s) { atomic_fetch_add(&s->refcount, 1); }

/* Why: a reuse of a block on its home stream waits on the events its free recorded on the other
 * streams, and a kernel queued behind such a wait loses programmatic dependent launch: after each
 * attention layer that fans out, the next sub-layer's first kernel sat 2.5-6.9 us idle behind the
 * layer input's block, whose aux uses the join had long covered (CUPTI timeline, H200). */
void dsrt_storage_joined(dsrt_storage *s, dsrt_stream *home, dsrt_stream *const *joined, int n)
{
    if (s->device == DSRT_CPU || !s->block || s->nstreams == 0 || s->streams[0]->id != home->id) return;
    int kept = 1;
    for (int i = 1; i < s->nstreams; i++) {
        int forget = 0;
        for (int j = 0; j < n; j++) forget |= s->streams[i]->id == joined[j]->id;
        if (forget) dsrt_stream_release(s->streams[i]);
        else s->streams[kept++] = s->streams[i];
    }
    s->nstreams = kept;
}

int dsrt_storage_use(dsrt_storage *s, dsrt_stream *stream)
{
    if (s->device == DSRT_CPU || !s->block) return 0;
    for (int i = 0; i < s->nstreams; i++)
        if (s->streams[i]->id == stream->id) return 0;
    if (s->nstreams == DSRT_STORAGE_STREAMS)
        return dsrt_err("a tensor was used on more than %d streams; copy it to share it wider", DSRT_STORAGE_STREAMS);
    dsrt_stream_retain(stream);
    s->streams[s->nstreams++] = stream;
    return 0;
}

void dsrt_storage_release(dsrt_storage *s)
{
    if (!s || atomic_fetch_sub(&s->refcount, 1) != 1) return;
    if (s->release) {
        s->release(s->release_ctx);
    } else {
        device_state *st = state_of(s->device);
        size_t size = s->block ? s->block->size : dsrt_alloc_round(s->nbytes);
        pthread_mutex_lock(&st->lock);
        st->stats.allocated -= size;
        if (s->device == DSRT_CPU) {
            st->stats.reserved -= size;
            free(s->data);
        } else {
            block_free(st, s->block, s);
        }
        pthread_mutex_unlock(&st->lock);
    }
    for (int i = 0; i < s->nstreams; i++) dsrt_stream_release(s->streams[i]);
    free(s);
}

int dsrt_alloc_stats(int device, dsrt_mem_stats *out)
{
    if (device < DSRT_CPU || device >= DSRT_MAX_DEVICES) return dsrt_err("memory_stats: no device %d", device);
    device_state *st = state_of(device);
    pthread_mutex_lock(&st->lock);
    *out = st->stats;
    pthread_mutex_unlock(&st->lock);
    return 0;
}

int dsrt_alloc_set_limit(int device, size_t bytes)
{
    if (dsrt_device_check(device)) return -1;
    device_state *st = state_of(device);
    pthread_mutex_lock(&st->lock);
    st->stats.limit = bytes;
    pthread_mutex_unlock(&st->lock);
    return 0;
}

int dsrt_alloc_empty_cache(int device)
{
    if (dsrt_device_check(device)) return -1;
    if (device == DSRT_CPU) return 0;
    device_state *st = state_of(device);
    pthread_mutex_lock(&st->lock);
    empty_cache_locked(st, device);
    pthread_mutex_unlock(&st->lock);
    return 0;
}
