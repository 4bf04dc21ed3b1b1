/*
 * test_tensor.c - views, strides, bounds and lifetimes of tensors through the C API (tensor.h).
 */
#include <stdint.h>
#include <string.h>
#include "check.h"
#include "err.h"
#include "ops.h"
#include "tensor.h"

#define CPU_STREAM dsrt_stream_default(DSRT_CPU)

/* a contiguous f32 CPU tensor holding 0, 1, 2, ... */
static dsrt_tensor *iota(int ndim, const int64_t *shape)
{
    dsrt_tensor *t = dsrt_tensor_new(DSRT_F32, ndim, shape, DSRT_CPU, CPU_STREAM);
    if (!t) return NULL;
    int64_t n = dsrt_tensor_numel(t);
    for (int64_t i = 0; i < n; i++) ((float *)t->storage->data)[i] = (float)i;
    return t;
}

/* element at a multi-index */
static float at(const dsrt_tensor *t, const int64_t *idx)
{
    int64_t e = t->offset;
    for (int d = 0; d < t->ndim; d++) e += idx[d] * t->stride[d];
    return dsrt_load_f32(t->storage->data, t->dtype, e);
}

static int shape_is(const dsrt_tensor *t, int ndim, const int64_t *shape)
{
    return t->ndim == ndim && memcmp(t->shape, shape, (size_t)ndim * sizeof *shape) == 0;
}

static int strides_are(const dsrt_tensor *t, const int64_t *stride)
{
    return memcmp(t->stride, stride, (size_t)t->ndim * sizeof *stride) == 0;
}

static size_t cpu_allocated(void)
{
    dsrt_mem_stats st;
    dsrt_alloc_stats(DSRT_CPU, &st);
    return st.allocated;
}

TEST(tensor_new_is_contiguous_row_major)
{
    int64_t shape[3] = {2, 3, 4};
    dsrt_tensor *t = dsrt_tensor_new(DSRT_BF16, 3, shape, DSRT_CPU, CPU_STREAM);
    REQUIRE(t);
    CHECK(shape_is(t, 3, shape));
    CHECK(strides_are(t, (int64_t[]){12, 4, 1}));
    CHECK(t->offset == 0 && t->device == DSRT_CPU && t->dtype == DSRT_BF16);
    CHECK(dsrt_tensor_numel(t) == 24);
    CHECK(dsrt_tensor_is_contiguous(t));
    CHECK(t->storage->nbytes >= 48);
    char buf[64];
    CHECK(strcmp(dsrt_tensor_str(t, buf, sizeof buf), "bf16[2, 3, 4] on cpu") == 0);
    dsrt_tensor_release(t);
}

TEST(tensor_new_rejects_negative_sizes_and_too_many_dims)
{
    int64_t bad[2] = {2, -3};
    CHECK(dsrt_tensor_new(DSRT_F32, 2, bad, DSRT_CPU, CPU_STREAM) == NULL);
    CHECK(strstr(dsrt_err_msg(), "negative") != NULL);
    int64_t nine[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
    CHECK(dsrt_tensor_new(DSRT_F32, 9, nine, DSRT_CPU, CPU_STREAM) == NULL);
    int64_t zero[2] = {0, 5};
    dsrt_tensor *t = dsrt_tensor_new(DSRT_F32, 2, zero, DSRT_CPU, CPU_STREAM);
    CHECK(t && dsrt_tensor_numel(t) == 0);
    dsrt_tensor_release(t);
}

TEST(narrow_offsets_and_strides)
{
    dsrt_tensor *t = iota(2, (int64_t[]){4, 5});
    REQUIRE(t);
    dsrt_tensor *n = dsrt_tensor_narrow(t, 1, 2, 3);
    REQUIRE(n);
    CHECK(shape_is(n, 2, (int64_t[]){4, 3}));
    CHECK(strides_are(n, (int64_t[]){5, 1}));
    CHECK(n->offset == 2);
    CHECK(n->storage == t->storage);
    CHECK(!dsrt_tensor_is_contiguous(n));
    CHECK(at(n, (int64_t[]){3, 2}) == 19.0f);
    dsrt_tensor *rows = dsrt_tensor_narrow(t, 0, 1, 2);
    REQUIRE(rows);
    CHECK(rows->offset == 5 && dsrt_tensor_is_contiguous(rows));
    CHECK(at(rows, (int64_t[]){0, 0}) == 5.0f);
    /* out of range start/length, bad dim */
    CHECK(dsrt_tensor_narrow(t, 1, 3, 3) == NULL);
    CHECK(strstr(dsrt_err_msg(), "narrow") != NULL);
    CHECK(dsrt_tensor_narrow(t, 0, -1, 2) == NULL);
    CHECK(dsrt_tensor_narrow(t, 2, 0, 1) == NULL);
    CHECK(strstr(dsrt_err_msg(), "dimension") != NULL);
    dsrt_tensor *empty = dsrt_tensor_narrow(t, 1, 5, 0);
    CHECK(empty && dsrt_tensor_numel(empty) == 0);
    dsrt_tensor_release(empty);
    dsrt_tensor_release(rows);
    dsrt_tensor_release(n);
    dsrt_tensor_release(t);
}

TEST(select_drops_the_dimension)
{
    dsrt_tensor *t = iota(3, (int64_t[]){2, 3, 4});
    REQUIRE(t);
    dsrt_tensor *a = dsrt_tensor_select(t, 0, 1), *b = dsrt_tensor_select(t, 1, 2), *c = dsrt_tensor_select(t, 2, 3);
    REQUIRE(a && b && c);
    CHECK(shape_is(a, 2, (int64_t[]){3, 4}) && strides_are(a, (int64_t[]){4, 1}) && a->offset == 12);
    CHECK(shape_is(b, 2, (int64_t[]){2, 4}) && strides_are(b, (int64_t[]){12, 1}) && b->offset == 8);
    CHECK(shape_is(c, 2, (int64_t[]){2, 3}) && strides_are(c, (int64_t[]){12, 4}) && c->offset == 3);
    CHECK(at(c, (int64_t[]){1, 2}) == 23.0f);
    dsrt_tensor *s = dsrt_tensor_select(a, 0, 2); /* select of a select */
    REQUIRE(s);
    dsrt_tensor *scalar = dsrt_tensor_select(s, 0, 1);
    REQUIRE(scalar);
    CHECK(scalar->ndim == 0 && dsrt_tensor_numel(scalar) == 1 && at(scalar, NULL) == 21.0f);
    CHECK(dsrt_tensor_select(t, 0, 2) == NULL);
    CHECK(strstr(dsrt_err_msg(), "out of range") != NULL);
    CHECK(dsrt_tensor_select(t, 0, -1) == NULL);
    CHECK(dsrt_tensor_select(scalar, 0, 0) == NULL);
    dsrt_tensor_release(scalar);
    dsrt_tensor_release(s);
    dsrt_tensor_release(a);
    dsrt_tensor_release(b);
    dsrt_tensor_release(c);
    dsrt_tensor_release(t);
}

TEST(transpose_and_permute_swap_strides)
{
    dsrt_tensor *t = iota(3, (int64_t[]){2, 3, 4});
    REQUIRE(t);
    dsrt_tensor *tr = dsrt_tensor_transpose(t, 0, 2);
    REQUIRE(tr);
    CHECK(shape_is(tr, 3, (int64_t[]){4, 3, 2}) && strides_are(tr, (int64_t[]){1, 4, 12}) && tr->offset == 0);
    CHECK(at(tr, (int64_t[]){3, 1, 1}) == 12 + 4 + 3);
    CHECK(!dsrt_tensor_is_contiguous(tr));
    dsrt_tensor *p = dsrt_tensor_permute(t, (int[]){2, 0, 1});
    REQUIRE(p);
    CHECK(shape_is(p, 3, (int64_t[]){4, 2, 3}) && strides_are(p, (int64_t[]){1, 12, 4}));
    CHECK(at(p, (int64_t[]){3, 1, 2}) == 12 + 8 + 3);
    CHECK(dsrt_tensor_permute(t, (int[]){0, 0, 1}) == NULL);
    CHECK(strstr(dsrt_err_msg(), "permute") != NULL);
    CHECK(dsrt_tensor_permute(t, (int[]){0, 1, 3}) == NULL);
    CHECK(dsrt_tensor_transpose(t, 0, 3) == NULL);
    dsrt_tensor *same = dsrt_tensor_transpose(t, 1, 1);
    CHECK(same && strides_are(same, t->stride));
    dsrt_tensor_release(same);
    dsrt_tensor_release(p);
    dsrt_tensor_release(tr);
    dsrt_tensor_release(t);
}

TEST(expand_gives_zero_strides)
{
    dsrt_tensor *t = iota(2, (int64_t[]){3, 1});
    REQUIRE(t);
    dsrt_tensor *e = dsrt_tensor_expand(t, 3, (int64_t[]){2, 3, 4});
    REQUIRE(e);
    CHECK(shape_is(e, 3, (int64_t[]){2, 3, 4}) && strides_are(e, (int64_t[]){0, 1, 0}));
    CHECK(at(e, (int64_t[]){1, 2, 3}) == 2.0f);
    dsrt_tensor *keep = dsrt_tensor_expand(t, 2, (int64_t[]){-1, 5}); /* -1 keeps the size */
    CHECK(keep && shape_is(keep, 2, (int64_t[]){3, 5}));
    dsrt_tensor_release(keep);
    CHECK(dsrt_tensor_expand(t, 2, (int64_t[]){4, 4}) == NULL);
    CHECK(strstr(dsrt_err_msg(), "expand") != NULL && strstr(dsrt_err_msg(), "[4, 4]") != NULL);
    CHECK(dsrt_tensor_expand(t, 1, (int64_t[]){3}) == NULL); /* fewer dims */
    dsrt_tensor_release(e);
    dsrt_tensor_release(t);
}

TEST(view_of_contiguous_and_minus_one)
{
    dsrt_tensor *t = iota(3, (int64_t[]){2, 3, 4});
    REQUIRE(t);
    dsrt_tensor *v = dsrt_tensor_view(t, 2, (int64_t[]){6, 4});
    REQUIRE(v);
    CHECK(shape_is(v, 2, (int64_t[]){6, 4}) && strides_are(v, (int64_t[]){4, 1}) && v->storage == t->storage);
    dsrt_tensor *inf = dsrt_tensor_view(t, 3, (int64_t[]){4, -1, 2});
    REQUIRE(inf);
    CHECK(shape_is(inf, 3, (int64_t[]){4, 3, 2}));
    dsrt_tensor *flat = dsrt_tensor_view(t, 1, (int64_t[]){-1});
    CHECK(flat && flat->shape[0] == 24);
    CHECK(dsrt_tensor_view(t, 2, (int64_t[]){-1, -1}) == NULL);
    CHECK(strstr(dsrt_err_msg(), "-1") != NULL);
    CHECK(dsrt_tensor_view(t, 2, (int64_t[]){-1, 5}) == NULL);
    CHECK(strstr(dsrt_err_msg(), "view") != NULL);
    CHECK(dsrt_tensor_view(t, 2, (int64_t[]){5, 5}) == NULL);
    CHECK(dsrt_tensor_view(t, 2, (int64_t[]){-2, 12}) == NULL);
    dsrt_tensor_release(flat);
    dsrt_tensor_release(inf);
    dsrt_tensor_release(v);
    dsrt_tensor_release(t);
}

TEST(view_of_compatible_noncontiguous_layouts)
{
    dsrt_tensor *t = iota(2, (int64_t[]){4, 6});
    REQUIRE(t);
    /* columns 1..3 of every row: rows can still be split */
    dsrt_tensor *n = dsrt_tensor_narrow(t, 1, 1, 3);
    REQUIRE(n);
    dsrt_tensor *v = dsrt_tensor_view(n, 3, (int64_t[]){2, 2, 3});
    REQUIRE(v);
    CHECK(strides_are(v, (int64_t[]){12, 6, 1}) && v->offset == 1);
    CHECK(at(v, (int64_t[]){1, 1, 2}) == 12 + 6 + 1 + 2);
    /* a transposed [3, 4] -> [4, 3] with strides [1, 4]: splitting its first dim works */
    dsrt_tensor *m = iota(2, (int64_t[]){3, 4});
    REQUIRE(m);
    dsrt_tensor *tr = dsrt_tensor_transpose(m, 0, 1);
    REQUIRE(tr);
    dsrt_tensor *split = dsrt_tensor_view(tr, 3, (int64_t[]){2, 2, 3});
    REQUIRE(split);
    CHECK(strides_are(split, (int64_t[]){2, 1, 4}));
    CHECK(at(split, (int64_t[]){1, 0, 2}) == at(tr, (int64_t[]){2, 2}));
    dsrt_tensor *unit = dsrt_tensor_view(tr, 3, (int64_t[]){4, 1, 3}); /* inserting a 1 */
    CHECK(unit != NULL);
    dsrt_tensor_release(unit);
    dsrt_tensor_release(split);
    dsrt_tensor_release(tr);
    dsrt_tensor_release(m);
    dsrt_tensor_release(v);
    dsrt_tensor_release(n);
    dsrt_tensor_release(t);
}

TEST(view_of_incompatible_layout_fails_with_message)
{
    dsrt_tensor *m = iota(2, (int64_t[]){3, 4});
    REQUIRE(m);
    dsrt_tensor *tr = dsrt_tensor_transpose(m, 0, 1);
    REQUIRE(tr);
    CHECK(dsrt_tensor_view(tr, 1, (int64_t[]){12}) == NULL);
    const char *msg = dsrt_err_msg();
    CHECKF(strstr(msg, "view") && strstr(msg, "[4, 3]") && strstr(msg, "[12]"), "message: %s", msg);
    dsrt_tensor *n = dsrt_tensor_narrow(m, 1, 0, 2); /* [3, 2] with row stride 4 */
    REQUIRE(n);
    CHECK(dsrt_tensor_view(n, 1, (int64_t[]){6}) == NULL);
    dsrt_tensor_release(n);
    dsrt_tensor_release(tr);
    dsrt_tensor_release(m);
}

TEST(reshape_views_when_it_can_and_copies_when_it_must)
{
    dsrt_tensor *m = iota(2, (int64_t[]){3, 4});
    REQUIRE(m);
    dsrt_tensor *r = dsrt_tensor_reshape(m, 2, (int64_t[]){2, 6}, CPU_STREAM);
    REQUIRE(r);
    CHECK(r->storage == m->storage);
    dsrt_tensor *tr = dsrt_tensor_transpose(m, 0, 1);
    REQUIRE(tr);
    dsrt_tensor *flat = dsrt_tensor_reshape(tr, 1, (int64_t[]){-1}, CPU_STREAM);
    REQUIRE(flat);
    CHECK(flat->storage != m->storage);
    CHECK(shape_is(flat, 1, (int64_t[]){12}) && dsrt_tensor_is_contiguous(flat));
    int wrong = 0;
    for (int64_t i = 0; i < 12; i++) wrong += at(flat, &i) != (float)((i % 3) * 4 + i / 3);
    CHECK(wrong == 0);
    CHECK(dsrt_tensor_reshape(tr, 1, (int64_t[]){13}, CPU_STREAM) == NULL);
    CHECK(strstr(dsrt_err_msg(), "reshape") != NULL);
    dsrt_tensor_release(flat);
    dsrt_tensor_release(tr);
    dsrt_tensor_release(r);
    dsrt_tensor_release(m);
}

TEST(contiguous_shares_or_copies)
{
    dsrt_tensor *m = iota(3, (int64_t[]){2, 3, 5});
    REQUIRE(m);
    dsrt_tensor *same = dsrt_tensor_contiguous(m, CPU_STREAM);
    CHECK(same == m); /* already contiguous: the same tensor, one more reference */
    dsrt_tensor_release(same);
    dsrt_tensor *p = dsrt_tensor_permute(m, (int[]){2, 0, 1});
    REQUIRE(p);
    dsrt_tensor *c = dsrt_tensor_contiguous(p, CPU_STREAM);
    REQUIRE(c);
    CHECK(c->storage != m->storage && dsrt_tensor_is_contiguous(c) && shape_is(c, 3, p->shape));
    int wrong = 0;
    for (int64_t i = 0; i < 5; i++)
        for (int64_t j = 0; j < 2; j++)
            for (int64_t k = 0; k < 3; k++) wrong += at(c, (int64_t[]){i, j, k}) != (float)(j * 15 + k * 5 + i);
    CHECK(wrong == 0);
    /* size-1 dimensions do not matter for contiguity */
    dsrt_tensor *one = iota(3, (int64_t[]){4, 1, 3});
    REQUIRE(one);
    dsrt_tensor *odd = dsrt_tensor_from_storage(one->storage, DSRT_F32, 3, one->shape, (int64_t[]){3, 77, 1}, 0);
    CHECK(odd && dsrt_tensor_is_contiguous(odd));
    dsrt_tensor_release(odd);
    dsrt_tensor_release(one);
    dsrt_tensor_release(c);
    dsrt_tensor_release(p);
    dsrt_tensor_release(m);
}

TEST(from_storage_checks_bounds)
{
    dsrt_tensor *t = iota(1, (int64_t[]){10});
    REQUIRE(t);
    dsrt_storage *s = t->storage;
    dsrt_tensor *ok = dsrt_tensor_from_storage(s, DSRT_F32, 2, (int64_t[]){2, 5}, (int64_t[]){5, 1}, 0);
    CHECK(ok != NULL);
    dsrt_tensor_release(ok);
    ok = dsrt_tensor_from_storage(s, DSRT_F32, 1, (int64_t[]){3}, (int64_t[]){1}, 7);
    CHECK(ok != NULL);
    dsrt_tensor_release(ok);
    /* the same storage read as bytes holds 40 elements */
    ok = dsrt_tensor_from_storage(s, DSRT_U8, 1, (int64_t[]){40}, (int64_t[]){1}, 0);
    CHECK(ok != NULL);
    dsrt_tensor_release(ok);
    CHECK(dsrt_tensor_from_storage(s, DSRT_U8, 1, (int64_t[]){40}, (int64_t[]){1}, 1) == NULL);
    CHECK(dsrt_tensor_from_storage(s, DSRT_F32, 1, (int64_t[]){10}, (int64_t[]){1}, 1) == NULL);
    const char *msg = dsrt_err_msg();
    CHECKF(strstr(msg, "storage") != NULL && strstr(msg, "[10]") != NULL, "message: %s", msg);
    CHECK(dsrt_tensor_from_storage(s, DSRT_F32, 1, (int64_t[]){3}, (int64_t[]){1}, 8) == NULL);
    CHECK(dsrt_tensor_from_storage(s, DSRT_F32, 2, (int64_t[]){2, 5}, (int64_t[]){6, 1}, 0) == NULL);
    CHECK(dsrt_tensor_from_storage(s, DSRT_F32, 1, (int64_t[]){2}, (int64_t[]){1}, -1) == NULL);
    CHECK(dsrt_tensor_from_storage(s, DSRT_F32, 1, (int64_t[]){2}, (int64_t[]){-1}, 5) == NULL);
    CHECK(strstr(dsrt_err_msg(), "negative stride") != NULL);
    CHECK(dsrt_tensor_from_storage(s, DSRT_I64, 1, (int64_t[]){6}, (int64_t[]){1}, 0) == NULL); /* 40 bytes: 5 i64 */
    ok = dsrt_tensor_from_storage(s, DSRT_F32, 1, (int64_t[]){1000}, (int64_t[]){0}, 9); /* stride 0 */
    CHECK(ok != NULL);
    dsrt_tensor_release(ok);
    dsrt_tensor_release(t);
}

TEST(fp4_sizes_round_up_to_whole_bytes)
{
    dsrt_tensor *t = dsrt_tensor_new(DSRT_FP4E2M1, 1, (int64_t[]){7}, DSRT_CPU, CPU_STREAM);
    REQUIRE(t);
    CHECK(t->storage->nbytes == 4);
    CHECK(dsrt_dtype_nbytes(DSRT_FP4E2M1, 15) == 8);
    CHECK(dsrt_dtype_nbytes(DSRT_FP4E2M1, 16) == 8);
    CHECK(dsrt_dtype_nbytes(DSRT_FP4E2M1, 1) == 1);
    CHECK(dsrt_dtype_nbytes(DSRT_FP4E2M1, 0) == 0);
    /* 4 bytes hold 8 nibbles (the 8th is padding), not 9 */
    dsrt_tensor *eight = dsrt_tensor_from_storage(t->storage, DSRT_FP4E2M1, 1, (int64_t[]){8}, (int64_t[]){1}, 0);
    CHECK(eight != NULL);
    dsrt_tensor_release(eight);
    CHECK(dsrt_tensor_from_storage(t->storage, DSRT_FP4E2M1, 1, (int64_t[]){9}, (int64_t[]){1}, 0) == NULL);
    dsrt_tensor_release(t);
}

TEST(fp4_narrow_at_odd_offsets_reads_the_right_nibbles)
{
    static const float vals[9] = {0.5f, -1.0f, 1.5f, 2.0f, -3.0f, 4.0f, 6.0f, -0.5f, 1.0f};
    dsrt_tensor *t = dsrt_tensor_new(DSRT_FP4E2M1, 1, (int64_t[]){9}, DSRT_CPU, CPU_STREAM);
    REQUIRE(t);
    CHECK(t->storage->nbytes == 5);
    memset(t->storage->data, 0, 5);
    for (int i = 0; i < 9; i++) dsrt_store_f32(t->storage->data, DSRT_FP4E2M1, i, vals[i]);
    CHECK(((uint8_t *)t->storage->data)[0] == 0xa1); /* 0.5 low (code 1), -1 high (code 10) */
    dsrt_tensor *n = dsrt_tensor_narrow(t, 0, 3, 5);
    REQUIRE(n);
    CHECK(n->offset == 3);
    CHECK(!dsrt_tensor_is_contiguous(n));
    int wrong = 0;
    for (int64_t i = 0; i < 5; i++) wrong += at(n, &i) != vals[3 + i];
    CHECK(wrong == 0);
    dsrt_tensor *even = dsrt_tensor_narrow(t, 0, 2, 4);
    REQUIRE(even);
    CHECK(dsrt_tensor_is_contiguous(even));
    dsrt_tensor *c = dsrt_tensor_contiguous(n, CPU_STREAM);
    REQUIRE(c);
    CHECK(c != n && c->offset == 0 && dsrt_tensor_is_contiguous(c) && c->storage->nbytes == 3);
    wrong = 0;
    for (int64_t i = 0; i < 5; i++) wrong += at(c, &i) != vals[3 + i];
    CHECK(wrong == 0);
    /* writing through an odd-offset view changes its nibbles only */
    dsrt_tensor *one = dsrt_tensor_narrow(t, 0, 5, 1);
    REQUIRE(one);
    CHECK(dsrt_op_fill(one, -6.0, CPU_STREAM) == 0);
    wrong = 0;
    for (int64_t i = 0; i < 9; i++) wrong += at(t, &i) != (i == 5 ? -6.0f : vals[i]);
    CHECK(wrong == 0);
    /* 2-d fp4 with an odd row length: rows start at odd nibbles */
    dsrt_tensor *m = dsrt_tensor_view(t, 2, (int64_t[]){3, 3});
    REQUIRE(m);
    dsrt_tensor *row = dsrt_tensor_select(m, 0, 1);
    REQUIRE(row);
    CHECK(row->offset == 3 && !dsrt_tensor_is_contiguous(row));
    CHECK(at(row, (int64_t[]){2}) == -6.0f);
    dsrt_tensor_release(row);
    dsrt_tensor_release(m);
    dsrt_tensor_release(one);
    dsrt_tensor_release(c);
    dsrt_tensor_release(even);
    dsrt_tensor_release(n);
    dsrt_tensor_release(t);
}

TEST(storage_freed_when_last_view_goes)
{
    size_t start = cpu_allocated();
    dsrt_tensor *t = iota(2, (int64_t[]){64, 64});
    REQUIRE(t);
    size_t with = cpu_allocated();
    CHECK(with >= start + 64 * 64 * 4);
    dsrt_tensor *a = dsrt_tensor_transpose(t, 0, 1), *b = dsrt_tensor_narrow(t, 0, 10, 5);
    REQUIRE(a && b);
    CHECK(atomic_load(&t->storage->refcount) == 3);
    CHECK(cpu_allocated() == with); /* views allocate nothing */
    dsrt_tensor_release(t);
    CHECK(cpu_allocated() == with);
    CHECK(at(b, (int64_t[]){0, 3}) == 643.0f); /* still readable through the views */
    dsrt_tensor_retain(a);
    dsrt_tensor_release(a);
    dsrt_tensor_release(a);
    CHECK(cpu_allocated() == with);
    dsrt_tensor_release(b);
    CHECK(cpu_allocated() == start);
}

TEST(to_converts_dtype_on_cpu)
{
    dsrt_tensor *t = iota(1, (int64_t[]){5});
    REQUIRE(t);
    ((float *)t->storage->data)[1] = 1.0f + 1.0f / 256.0f; /* bf16 tie: rounds to 1 */
    ((float *)t->storage->data)[2] = -2.75f;
    dsrt_tensor *b = dsrt_tensor_to(t, DSRT_CPU, DSRT_BF16, CPU_STREAM, 0);
    REQUIRE(b);
    CHECK(b->dtype == DSRT_BF16 && b->storage != t->storage);
    CHECK(((uint16_t *)b->storage->data)[1] == 0x3f80);
    dsrt_tensor *i = dsrt_tensor_to(t, DSRT_CPU, DSRT_I32, CPU_STREAM, 0);
    REQUIRE(i);
    CHECK(((int32_t *)i->storage->data)[2] == -2 && ((int32_t *)i->storage->data)[4] == 4);
    dsrt_tensor *same = dsrt_tensor_to(t, DSRT_CPU, DSRT_F32, CPU_STREAM, 0);
    CHECK(same == t);
    dsrt_tensor_release(same);
    if (dsrt_device_count() == 0) {
        CHECK(dsrt_tensor_to(t, 0, DSRT_F32, CPU_STREAM, 0) == NULL);
        CHECK(strstr(dsrt_err_msg(), "cuda:0") != NULL);
    }
    dsrt_tensor_release(i);
    dsrt_tensor_release(b);
    dsrt_tensor_release(t);
}

TEST(device_parse_and_check)
{
    int dev = 99;
    CHECK(dsrt_device_parse("cpu", &dev) == 0 && dev == DSRT_CPU);
    CHECK(dsrt_device_parse("cuda", &dev) == 0 && dev == 0);
    CHECK(dsrt_device_parse("cuda:3", &dev) == 0 && dev == 3);
    CHECK(dsrt_device_parse("gpu", &dev) != 0);
    CHECK(strstr(dsrt_err_msg(), "gpu") != NULL);
    CHECK(dsrt_device_parse("cuda:", &dev) != 0);
    CHECK(dsrt_device_parse("cuda:x", &dev) != 0);
    CHECK(dsrt_device_parse("cuda:-1", &dev) != 0);
    CHECK(dsrt_device_check(DSRT_CPU) == 0);
    CHECK(dsrt_device_check(dsrt_device_count()) != 0);
    char buf[16];
    CHECK(strcmp(dsrt_device_str(DSRT_CPU, buf), "cpu") == 0);
    CHECK(strcmp(dsrt_device_str(2, buf), "cuda:2") == 0);
}

TEST(dtype_names_and_promotion)
{
    dsrt_dtype dt;
    CHECK(dsrt_dtype_from_name("bf16", &dt) == 0 && dt == DSRT_BF16);
    CHECK(dsrt_dtype_from_name("bfloat16", &dt) == 0 && dt == DSRT_BF16);
    CHECK(dsrt_dtype_from_name("fp4e2m1", &dt) == 0 && dt == DSRT_FP4E2M1);
    CHECK(dsrt_dtype_from_name("f64", &dt) != 0);
    CHECK(strstr(dsrt_err_msg(), "f64") != NULL);
    for (int i = 0; i < DSRT_NDTYPES; i++) {
        CHECKF(dsrt_dtype_from_name(dsrt_dtype_name((dsrt_dtype)i), &dt) == 0 && dt == (dsrt_dtype)i, "dtype %d", i);
    }
    CHECK(dsrt_dtype_promote(DSRT_BF16, DSRT_BF16) == DSRT_BF16);
    CHECK(dsrt_dtype_promote(DSRT_BF16, DSRT_F16) == DSRT_F32);
    CHECK(dsrt_dtype_promote(DSRT_I64, DSRT_BF16) == DSRT_BF16);
    CHECK(dsrt_dtype_promote(DSRT_I32, DSRT_I64) == DSRT_I64);
    CHECK(dsrt_dtype_promote(DSRT_F8E4M3, DSRT_F8E4M3) == DSRT_F32);
    CHECK(dsrt_dtype_promote(DSRT_I8, DSRT_FP4E2M1) == DSRT_F32);
    CHECK(dsrt_dtype_promote(DSRT_I32, DSRT_I32) == DSRT_I32);
}
