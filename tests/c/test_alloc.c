/*
 * test_alloc.c - storage accounting, the byte limit and the caching device allocator (alloc.h).
 *
 * The CPU tests run everywhere; the GPU_TESTs run only under `test_c --gpu` on device 0.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "check.h"
#include "err.h"
#include "ops.h"
#include "tensor.h"

#define MiB ((size_t)1 << 20)

static dsrt_mem_stats stats(int device)
{
    dsrt_mem_stats st;
    memset(&st, 0, sizeof st);
    CHECK(dsrt_alloc_stats(device, &st) == 0);
    return st;
}

/* ---- CPU ---- */

TEST(alloc_round_size_classes)
{
    CHECK(dsrt_alloc_round(0) == 512);
    CHECK(dsrt_alloc_round(1) == 512);
    CHECK(dsrt_alloc_round(512) == 512);
    CHECK(dsrt_alloc_round(513) == 1024);
    CHECK(dsrt_alloc_round(1000) == 1024);
    CHECK(dsrt_alloc_round(MiB - 512) == MiB - 512);
    CHECK(dsrt_alloc_round(MiB - 1) == MiB);
    CHECK(dsrt_alloc_round(2 * MiB) == 2 * MiB);
    CHECK(dsrt_alloc_round(2 * MiB + 1) == 4 * MiB);
    CHECK(dsrt_alloc_round(5 * MiB) == 6 * MiB);
    CHECK(dsrt_alloc_round(1000 * MiB + 7) == 1002 * MiB);
    /* every class covers the request, is a multiple of 512, and grows with it */
    size_t prev = 0;
    for (size_t n = 1; n < 8 * MiB; n = n * 3 / 2 + 7) {
        size_t r = dsrt_alloc_round(n);
        CHECKF(r >= n && r % 512 == 0 && r >= prev, "round(%zu) = %zu", n, r);
        CHECKF(n < MiB ? r - n < 512 : r - n < 2 * MiB, "round(%zu) = %zu wastes too much", n, r);
        prev = r;
    }
}

TEST(cpu_stats_count_allocations)
{
    dsrt_stream *cpu = dsrt_stream_default(DSRT_CPU);
    dsrt_mem_stats a = stats(DSRT_CPU);
    dsrt_storage *s = dsrt_storage_new(DSRT_CPU, 1000, cpu);
    REQUIRE(s);
    CHECK(s->nbytes == 1000 && s->device == DSRT_CPU && s->data != NULL);
    CHECK(((uintptr_t)s->data & 63) == 0);
    memset(s->data, 0xab, 1000); /* the memory is really there (ASan would tell) */
    dsrt_mem_stats b = stats(DSRT_CPU);
    CHECK(b.allocated == a.allocated + 1024);
    CHECK(b.reserved == a.reserved + 1024);
    CHECK(b.allocations == a.allocations + 1);
    CHECK(b.peak_allocated >= b.allocated);
    dsrt_storage *big = dsrt_storage_new(DSRT_CPU, 3 * MiB, cpu);
    REQUIRE(big);
    dsrt_mem_stats c = stats(DSRT_CPU);
    CHECK(c.allocated == b.allocated + 4 * MiB);
    CHECK(c.peak_allocated >= c.allocated);
    dsrt_storage_retain(big);
    dsrt_storage_release(big);
    CHECK(stats(DSRT_CPU).allocated == c.allocated); /* one reference left */
    dsrt_storage_release(big);
    dsrt_storage_release(s);
    dsrt_mem_stats d = stats(DSRT_CPU);
    CHECK(d.allocated == a.allocated);
    CHECK(d.reserved == a.reserved);
    CHECK(d.peak_allocated >= c.allocated); /* the peak remembers */
    CHECK(d.allocations == a.allocations + 2);
    CHECK(d.cache_hits == a.cache_hits && d.device_mallocs == a.device_mallocs); /* no caching on the CPU */
}

TEST(cpu_limit_fails_cleanly_and_zero_removes_it)
{
    dsrt_stream *cpu = dsrt_stream_default(DSRT_CPU);
    dsrt_mem_stats a = stats(DSRT_CPU);
    REQUIRE(dsrt_alloc_set_limit(DSRT_CPU, a.allocated + 64 * 1024) == 0);
    CHECK(stats(DSRT_CPU).limit == a.allocated + 64 * 1024);
    dsrt_storage *over = dsrt_storage_new(DSRT_CPU, 128 * 1024, cpu);
    CHECK(over == NULL);
    const char *msg = dsrt_err_msg();
    CHECKF(strstr(msg, "out of memory") != NULL && strstr(msg, "cpu") != NULL, "message: %s", msg);
    CHECK(stats(DSRT_CPU).allocated == a.allocated); /* the failure left nothing behind */
    dsrt_storage *fits = dsrt_storage_new(DSRT_CPU, 32 * 1024, cpu);
    CHECK(fits != NULL);
    dsrt_storage *second = dsrt_storage_new(DSRT_CPU, 48 * 1024, cpu); /* 32 + 48 > 64 KiB */
    CHECK(second == NULL);
    dsrt_storage_release(fits);
    second = dsrt_storage_new(DSRT_CPU, 48 * 1024, cpu); /* fits once the first is gone */
    CHECK(second != NULL);
    dsrt_storage_release(second);
    /* a tensor over the limit fails the same way */
    int64_t shape[1] = {1 << 20};
    CHECK(dsrt_tensor_new(DSRT_F32, 1, shape, DSRT_CPU, cpu) == NULL);
    CHECK(strstr(dsrt_err_msg(), "out of memory") != NULL);
    REQUIRE(dsrt_alloc_set_limit(DSRT_CPU, 0) == 0);
    CHECK(stats(DSRT_CPU).limit == 0);
    dsrt_tensor *t = dsrt_tensor_new(DSRT_F32, 1, shape, DSRT_CPU, cpu);
    CHECK(t != NULL);
    dsrt_tensor_release(t);
    CHECK(stats(DSRT_CPU).allocated == a.allocated);
}

static int released_count;
static void count_release(void *ctx) { released_count += *(int *)ctx; }

TEST(wrapped_storage_calls_release_once_and_is_not_counted)
{
    static char buffer[256];
    int weight = 1;
    released_count = 0;
    dsrt_mem_stats a = stats(DSRT_CPU);
    dsrt_storage *s = dsrt_storage_wrap(DSRT_CPU, buffer, sizeof buffer, count_release, &weight);
    REQUIRE(s);
    CHECK(s->data == buffer && s->nbytes == sizeof buffer);
    dsrt_tensor *t = dsrt_tensor_from_storage(s, DSRT_F32, 1, (int64_t[]){64}, (int64_t[]){1}, 0);
    REQUIRE(t);
    dsrt_storage_release(s); /* the tensor holds it now */
    CHECK(released_count == 0);
    CHECK(stats(DSRT_CPU).allocated == a.allocated);
    dsrt_tensor_release(t);
    CHECK(released_count == 1);
}

TEST(storage_new_rejects_a_stream_of_another_device)
{
    if (dsrt_device_count() == 0) {
        CHECK(dsrt_storage_new(0, 16, dsrt_stream_default(DSRT_CPU)) == NULL);
        CHECK(strstr(dsrt_err_msg(), "cuda:0") != NULL);
    } else {
        CHECK(dsrt_storage_new(0, 16, dsrt_stream_default(DSRT_CPU)) == NULL);
        CHECK(strstr(dsrt_err_msg(), "stream") != NULL);
    }
    CHECK(dsrt_alloc_stats(DSRT_MAX_DEVICES, &(dsrt_mem_stats){0}) != 0);
    CHECK(dsrt_alloc_set_limit(dsrt_device_count(), 0) != 0);
}

/* ---- GPU (device 0) ---- */

GPU_TEST(gpu_cache_reuses_freed_block)
{
    dsrt_stream *s = dsrt_stream_default(0);
    size_t size = 3 * MiB + 12345;
    dsrt_storage *a = dsrt_storage_new(0, size, s);
    REQUIRE(a);
    void *ptr = a->data;
    dsrt_storage_release(a);
    dsrt_mem_stats before = stats(0);
    CHECK(before.reserved >= before.allocated + dsrt_alloc_round(size));
    dsrt_storage *b = dsrt_storage_new(0, size, s);
    REQUIRE(b);
    dsrt_mem_stats after = stats(0);
    CHECK(after.cache_hits == before.cache_hits + 1);
    CHECK(after.device_mallocs == before.device_mallocs);
    CHECK(after.allocations == before.allocations + 1);
    CHECK(after.reserved == before.reserved);
    CHECK(after.allocated == before.allocated + dsrt_alloc_round(size));
    CHECK(b->data == ptr);
    /* a request of another size class is not served by it */
    dsrt_storage *c = dsrt_storage_new(0, 9 * MiB, s);
    REQUIRE(c);
    CHECK(c->data != b->data);
    dsrt_storage_release(c);
    dsrt_storage_release(b);
    CHECK(stats(0).allocated == before.allocated);
}

/* fills t with v on stream s many times, so that work stays queued on s for a while */
static int fill_many(dsrt_tensor *t, double v, int times, dsrt_stream *s)
{
    for (int i = 0; i < times; i++)
        if (dsrt_op_fill(t, v + (i == times - 1 ? 0 : 1000), s)) return -1;
    return 0;
}

GPU_TEST(gpu_block_reused_across_streams_stays_correct)
{
    dsrt_stream *a = dsrt_stream_new(0), *b = dsrt_stream_new(0);
    REQUIRE(a && b);
    int64_t n = 16 << 20; /* 64 MiB of f32 */
    for (int round = 0; round < 5; round++) {
        dsrt_tensor *x = dsrt_tensor_new(DSRT_F32, 1, &n, 0, a);
        REQUIRE(x);
        void *ptr = x->storage->data;
        CHECK(fill_many(x, 1.0, 200, a) == 0); /* still running when x is freed */
        dsrt_tensor_release(x);
        dsrt_mem_stats before = stats(0);
        dsrt_tensor *y = dsrt_tensor_new(DSRT_F32, 1, &n, 0, b);
        REQUIRE(y);
        CHECK(stats(0).cache_hits == before.cache_hits + 1);
        CHECK(y->storage->data == ptr);
        CHECK(dsrt_op_fill(y, 2.0 + round, b) == 0);
        dsrt_tensor *h = dsrt_tensor_to(y, DSRT_CPU, DSRT_F32, b, 0);
        REQUIRE(h);
        const float *p = h->storage->data;
        int64_t wrong = 0;
        for (int64_t i = 0; i < n; i++) wrong += p[i] != (float)(2.0 + round);
        CHECKF(wrong == 0, "round %d: %lld elements overwritten by the other stream's queued fills", round,
               (long long)wrong);
        dsrt_tensor_release(h);
        dsrt_tensor_release(y);
    }
    CHECK(dsrt_stream_synchronize(a) == 0 && dsrt_stream_synchronize(b) == 0);
    dsrt_stream_release(a);
    dsrt_stream_release(b);
}

/* dsrt_storage_joined forgets exactly the joined streams' uses of a storage homed on the caller's
 * stream, and a block freed after a real join is reused on its home with the right values */
GPU_TEST(gpu_joined_streams_are_forgotten)
{
    dsrt_stream *home = dsrt_stream_new(0), *a = dsrt_stream_new(0), *b = dsrt_stream_new(0);
    dsrt_event *ev = dsrt_event_new(0, 0);
    REQUIRE(home && a && b && ev);
    int64_t n = 16 << 20; /* 64 MiB of f32 */
    dsrt_tensor *x = dsrt_tensor_new(DSRT_F32, 1, &n, 0, home);
    REQUIRE(x);
    dsrt_storage *st = x->storage;
    CHECK(dsrt_storage_use(st, a) == 0 && dsrt_storage_use(st, b) == 0 && st->nstreams == 3);
    dsrt_storage_joined(st, a, (dsrt_stream *[]){b}, 1); /* not its home: nothing forgotten */
    CHECK(st->nstreams == 3);
    dsrt_storage_joined(st, home, (dsrt_stream *[]){a}, 1);
    CHECK(st->nstreams == 2 && st->streams[0] == home && st->streams[1] == b);
    dsrt_storage_joined(st, home, (dsrt_stream *[]){a, b}, 2);
    CHECK(st->nstreams == 1 && st->streams[0] == home);
    /* the pattern attention.c relies on: queued fills on a, home joins a, the block is freed and
     * taken again on home: the new value is the last one written */
    void *ptr = st->data;
    CHECK(dsrt_storage_use(st, a) == 0);
    CHECK(fill_many(x, 1.0, 200, a) == 0);
    CHECK(dsrt_event_record(ev, a) == 0 && dsrt_stream_wait(home, ev) == 0);
    dsrt_storage_joined(st, home, (dsrt_stream *[]){a}, 1);
    dsrt_tensor_release(x);
    dsrt_tensor *y = dsrt_tensor_new(DSRT_F32, 1, &n, 0, home);
    REQUIRE(y);
    CHECK(y->storage->data == ptr);
    CHECK(dsrt_op_fill(y, 7.0, home) == 0);
    dsrt_tensor *h = dsrt_tensor_to(y, DSRT_CPU, DSRT_F32, home, 0);
    REQUIRE(h);
    const float *p = h->storage->data;
    int64_t wrong = 0;
    for (int64_t i = 0; i < n; i++) wrong += p[i] != 7.0f;
    CHECKF(wrong == 0, "%lld elements overwritten by the joined stream's fills", (long long)wrong);
    dsrt_tensor_release(h);
    dsrt_tensor_release(y);
    CHECK(dsrt_stream_synchronize(a) == 0 && dsrt_stream_synchronize(home) == 0);
    dsrt_event_release(ev);
    dsrt_stream_release(home);
    dsrt_stream_release(a);
    dsrt_stream_release(b);
}

GPU_TEST(gpu_limit_fails_then_works_after_freeing)
{
    dsrt_stream *s = dsrt_stream_default(0);
    REQUIRE(dsrt_alloc_empty_cache(0) == 0);
    dsrt_mem_stats a = stats(0);
    CHECK(a.reserved == a.allocated);
    REQUIRE(dsrt_alloc_set_limit(0, a.reserved + 8 * MiB) == 0);
    dsrt_storage *x = dsrt_storage_new(0, 6 * MiB, s);
    CHECK(x != NULL);
    dsrt_storage *y = dsrt_storage_new(0, 6 * MiB, s);
    CHECK(y == NULL);
    const char *msg = dsrt_err_msg();
    CHECKF(strstr(msg, "out of memory") != NULL && strstr(msg, "cuda:0") != NULL, "message: %s", msg);
    dsrt_storage_release(x); /* cached: 6 MiB still reserved */
    /* 4 MiB is another class: the allocator must empty the cache to stay under the limit */
    dsrt_storage *z = dsrt_storage_new(0, 4 * MiB, s);
    CHECKF(z != NULL, "after freeing: %s", dsrt_err_msg());
    dsrt_mem_stats b = stats(0);
    CHECK(b.reserved <= a.reserved + 8 * MiB);
    dsrt_storage_release(z);
    int64_t n = 4 << 20; /* a 16 MiB tensor fails as a tensor too, and works without the limit */
    CHECK(dsrt_tensor_new(DSRT_F32, 1, &n, 0, s) == NULL);
    REQUIRE(dsrt_alloc_set_limit(0, 0) == 0);
    dsrt_tensor *t = dsrt_tensor_new(DSRT_F32, 1, &n, 0, s);
    CHECK(t != NULL);
    CHECK(t && dsrt_op_fill(t, 3.0, s) == 0);
    dsrt_tensor_release(t);
}

GPU_TEST(gpu_empty_cache_lowers_reserved)
{
    dsrt_stream *s = dsrt_stream_default(0);
    dsrt_storage *x = dsrt_storage_new(0, 10 * MiB, s);
    REQUIRE(x);
    dsrt_storage_release(x);
    dsrt_mem_stats a = stats(0);
    CHECK(a.reserved >= a.allocated + 10 * MiB);
    CHECK(dsrt_alloc_empty_cache(0) == 0);
    dsrt_mem_stats b = stats(0);
    CHECK(b.reserved == b.allocated);
    CHECK(b.reserved <= a.reserved - 10 * MiB);
    /* the next allocation goes to the device again */
    dsrt_storage *y = dsrt_storage_new(0, 10 * MiB, s);
    REQUIRE(y);
    CHECK(stats(0).device_mallocs == b.device_mallocs + 1);
    dsrt_storage_release(y);
}

GPU_TEST(gpu_stats_track_tensors)
{
    dsrt_stream *s = dsrt_stream_default(0);
    dsrt_mem_stats a = stats(0);
    int64_t shape[2] = {1000, 1000};
    dsrt_tensor *t = dsrt_tensor_new(DSRT_BF16, 2, shape, 0, s);
    REQUIRE(t);
    dsrt_mem_stats b = stats(0);
    CHECK(b.allocated == a.allocated + dsrt_alloc_round(2000000));
    CHECK(b.peak_allocated >= b.allocated);
    CHECK(b.allocations == a.allocations + 1);
    dsrt_tensor_release(t);
    CHECK(stats(0).allocated == a.allocated);
}
