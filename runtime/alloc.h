/*
 * alloc.h - refcounted storage and the caching device allocator.
 *
 * Storage is the memory under tensors: allocator blocks, or memory owned by someone else (a file
 * mapping) with a release callback. Device memory is cached: a freed block goes back to a size
 * class list instead of cudaFree, because cudaMalloc/cudaFree synchronise the device and cost far
 * more than a decode step's kernels. Reuse is made safe with events, not host waits: a block taken
 * by a stream other than the ones that used it makes that stream wait on events of theirs (a
 * GPU-side wait; alloc.c says when they are recorded), so a block is never handed out while queued
 * work may still touch it.
 *
 * A byte limit per device bounds reserved memory (cached + in use); going over it, or cudaMalloc
 * failing, first empties the cache and retries, then fails with a message - never aborts.
 */
#ifndef DSRT_ALLOC_H
#define DSRT_ALLOC_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include "stream.h"

#define DSRT_STORAGE_STREAMS 8

typedef struct dsrt_block dsrt_block;

typedef struct dsrt_storage {
    atomic_int refcount;
    int device;
    void *data;
    size_t nbytes;
    dsrt_block *block;            /* allocator memory, or NULL for wrapped memory */
    void (*release)(void *ctx);   /* wrapped memory: called when the last reference goes */
    void *release_ctx;
    /* streams (beyond the allocating one) that queued work on this storage; retained */
    dsrt_stream *streams[DSRT_STORAGE_STREAMS];
    int nstreams;
} dsrt_storage;

typedef struct {
    size_t allocated;      /* bytes in live storage (rounded to the size class) */
    size_t reserved;       /* allocated + cached (device), i.e. what cudaMalloc holds */
    size_t peak_allocated;
    size_t limit;          /* 0: none */
    uint64_t allocations;  /* storage handed out */
    uint64_t cache_hits;   /* of which served from the cache */
    uint64_t device_mallocs;
} dsrt_mem_stats;

dsrt_storage *dsrt_storage_new(int device, size_t nbytes, dsrt_stream *stream);
dsrt_storage *dsrt_storage_wrap(int device, void *data, size_t nbytes, void (*release)(void *), void *ctx);
void dsrt_storage_retain(dsrt_storage *s);
void dsrt_storage_release(dsrt_storage *s);
/* Work touching s is being queued on `stream`: remember it, so that freeing waits for it too. */
int dsrt_storage_use(dsrt_storage *s, dsrt_stream *stream);
/* `home`, the stream s was allocated on, has been made to wait for the n streams `joined` after
 * every use of s queued on them (a join): s forgets those uses, so that its free records no event
 * on them. A no-op for s allocated on another stream; a later use on them registers again. */
void dsrt_storage_joined(dsrt_storage *s, dsrt_stream *home, dsrt_stream *const *joined, int n);

int dsrt_alloc_stats(int device, dsrt_mem_stats *out);
int dsrt_alloc_set_limit(int device, size_t bytes);
int dsrt_alloc_empty_cache(int device);
size_t dsrt_alloc_round(size_t nbytes); /* the size class a request is served from */

#endif
