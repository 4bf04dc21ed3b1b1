/*
 * test_ops.c - the CPU implementations of the generic ops (ops.h) against naive loops written
 * here: matmul and dsrt_gemm_f32, binary ops with broadcasting and promotion, reductions.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "check.h"
#include "err.h"
#include "ops.h"
#include "tensor.h"

#define CPU dsrt_stream_default(DSRT_CPU)

static uint64_t seed_counter = 1000;

/* fresh uniform values in [-1, 1) */
static dsrt_tensor *rand_f32(int ndim, const int64_t *shape)
{
    dsrt_tensor *t = dsrt_tensor_new(DSRT_F32, ndim, shape, DSRT_CPU, CPU);
    if (t && dsrt_op_rand(t, seed_counter++, 0, 0, -1.0, 1.0, CPU)) {
        dsrt_tensor_release(t);
        return NULL;
    }
    return t;
}

static dsrt_tensor *from_values(dsrt_dtype dt, int ndim, const int64_t *shape, const double *v)
{
    dsrt_tensor *t = dsrt_tensor_new(dt, ndim, shape, DSRT_CPU, CPU);
    if (!t) return NULL;
    int64_t n = dsrt_tensor_numel(t);
    for (int64_t i = 0; i < n; i++) {
        if (dsrt_dtype_is_float(dt)) dsrt_store_f32(t->storage->data, dt, i, (float)v[i]);
        else dsrt_store_i64(t->storage->data, dt, i, (int64_t)v[i]);
    }
    return t;
}

/* element i in row-major order, as double */
static double get(const dsrt_tensor *t, int64_t i)
{
    dsrt_view v = dsrt_tensor_desc(t);
    int64_t e = dsrt_view_index(&v, i);
    return dsrt_dtype_is_float(t->dtype) ? dsrt_load_f32(t->storage->data, t->dtype, e)
                                         : (double)dsrt_load_i64(t->storage->data, t->dtype, e);
}

static int shape_is(const dsrt_tensor *t, int ndim, const int64_t *shape)
{
    return t->ndim == ndim && memcmp(t->shape, shape, (size_t)ndim * sizeof *shape) == 0;
}

/* ---- matmul ---- */

/* C = A @ B in double over f32 row-major arrays; also the sum of |a||b| per element for the bound */
static void naive_matmul(int64_t m, int64_t n, int64_t k, const float *a, const float *b, double *c, double *mag)
{
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) {
            double s = 0, g = 0;
            for (int64_t p = 0; p < k; p++) {
                s += (double)a[i * k + p] * b[p * n + j];
                g += fabs((double)a[i * k + p] * b[p * n + j]);
            }
            c[i * n + j] = s;
            mag[i * n + j] = g;
        }
}

/* |got - want| within a few f32 roundings of the accumulated magnitude */
static int64_t count_bad(const float *got, const double *want, const double *mag, int64_t n, int64_t k)
{
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++) {
        double tol = (double)(k + 2) * 1.2e-7 * mag[i] + 1e-30;
        if (!(fabs(got[i] - want[i]) <= tol)) bad++;
    }
    return bad;
}

static void check_matmul_2d(int64_t m, int64_t k, int64_t n)
{
    dsrt_tensor *a = rand_f32(2, (int64_t[]){m, k}), *b = rand_f32(2, (int64_t[]){k, n});
    REQUIRE(a && b);
    dsrt_tensor *c = dsrt_op_matmul(a, b, CPU);
    REQUIRE(c);
    CHECK(c->dtype == DSRT_F32 && shape_is(c, 2, (int64_t[]){m, n}) && dsrt_tensor_is_contiguous(c));
    double *want = malloc(sizeof(double) * (size_t)(m * n)), *mag = malloc(sizeof(double) * (size_t)(m * n));
    naive_matmul(m, n, k, a->storage->data, b->storage->data, want, mag);
    int64_t bad = count_bad(c->storage->data, want, mag, m * n, k);
    CHECKF(bad == 0, "%lldx%lldx%lld: %lld of %lld elements wrong", (long long)m, (long long)k, (long long)n,
           (long long)bad, (long long)(m * n));
    free(want);
    free(mag);
    dsrt_tensor_release(c);
    dsrt_tensor_release(a);
    dsrt_tensor_release(b);
}

TEST(matmul_matches_naive_at_odd_sizes)
{
    check_matmul_2d(1, 1, 1);
    check_matmul_2d(7, 13, 5);
    check_matmul_2d(65, 257, 130);
    check_matmul_2d(1, 300, 1);
    check_matmul_2d(130, 3, 257);
}

TEST(matmul_batched_with_broadcast)
{
    /* [3, 1, 7, 13] @ [4, 13, 5] -> [3, 4, 7, 5] */
    dsrt_tensor *a = rand_f32(4, (int64_t[]){3, 1, 7, 13}), *b = rand_f32(3, (int64_t[]){4, 13, 5});
    REQUIRE(a && b);
    dsrt_tensor *c = dsrt_op_matmul(a, b, CPU);
    REQUIRE(c);
    CHECK(shape_is(c, 4, (int64_t[]){3, 4, 7, 5}));
    double want[35], mag[35];
    int64_t bad = 0;
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 4; j++) {
            naive_matmul(7, 5, 13, (float *)a->storage->data + i * 91, (float *)b->storage->data + j * 65, want, mag);
            bad += count_bad((float *)c->storage->data + (i * 4 + j) * 35, want, mag, 35, 13);
        }
    CHECKF(bad == 0, "%lld elements wrong", (long long)bad);
    /* a 2-d operand is shared by every batch: [2, 7, 13] @ [13, 5] */
    dsrt_tensor *a3 = rand_f32(3, (int64_t[]){2, 7, 13}), *b2 = rand_f32(2, (int64_t[]){13, 5});
    REQUIRE(a3 && b2);
    dsrt_tensor *c2 = dsrt_op_matmul(a3, b2, CPU);
    REQUIRE(c2);
    CHECK(shape_is(c2, 3, (int64_t[]){2, 7, 5}));
    bad = 0;
    for (int i = 0; i < 2; i++) {
        naive_matmul(7, 5, 13, (float *)a3->storage->data + i * 91, b2->storage->data, want, mag);
        bad += count_bad((float *)c2->storage->data + i * 35, want, mag, 35, 13);
    }
    CHECK(bad == 0);
    dsrt_tensor_release(c2);
    dsrt_tensor_release(a3);
    dsrt_tensor_release(b2);
    dsrt_tensor_release(c);
    dsrt_tensor_release(a);
    dsrt_tensor_release(b);
}

TEST(matmul_one_dimensional_operands)
{
    dsrt_tensor *v = rand_f32(1, (int64_t[]){13}), *m = rand_f32(2, (int64_t[]){13, 5}), *w = rand_f32(1, (int64_t[]){13});
    REQUIRE(v && m && w);
    dsrt_tensor *vm = dsrt_op_matmul(v, m, CPU), *mtv = NULL, *dot = dsrt_op_matmul(v, w, CPU);
    REQUIRE(vm && dot);
    CHECK(shape_is(vm, 1, (int64_t[]){5}));
    CHECK(dot->ndim == 0);
    double want[5], mag[5];
    naive_matmul(1, 5, 13, v->storage->data, m->storage->data, want, mag);
    CHECK(count_bad(vm->storage->data, want, mag, 5, 13) == 0);
    naive_matmul(1, 1, 13, v->storage->data, w->storage->data, want, mag);
    CHECK(count_bad(dot->storage->data, want, mag, 1, 13) == 0);
    dsrt_tensor *mt = dsrt_tensor_transpose(m, 0, 1); /* [5, 13], non-contiguous */
    REQUIRE(mt);
    mtv = dsrt_op_matmul(mt, w, CPU);
    REQUIRE(mtv);
    CHECK(shape_is(mtv, 1, (int64_t[]){5}));
    int64_t bad = 0;
    for (int j = 0; j < 5; j++) {
        double s = 0, g = 0;
        for (int p = 0; p < 13; p++) {
            s += get(m, p * 5 + j) * get(w, p);
            g += fabs(get(m, p * 5 + j) * get(w, p));
        }
        bad += fabs(get(mtv, j) - s) > 15 * 1.2e-7 * g;
    }
    CHECK(bad == 0);
    dsrt_tensor_release(mt);
    dsrt_tensor_release(mtv);
    dsrt_tensor_release(vm);
    dsrt_tensor_release(dot);
    dsrt_tensor_release(v);
    dsrt_tensor_release(m);
    dsrt_tensor_release(w);
}

TEST(matmul_of_transposed_views)
{
    dsrt_tensor *a0 = rand_f32(2, (int64_t[]){13, 7}), *b0 = rand_f32(2, (int64_t[]){5, 13});
    REQUIRE(a0 && b0);
    dsrt_tensor *a = dsrt_tensor_transpose(a0, 0, 1), *b = dsrt_tensor_transpose(b0, 0, 1);
    dsrt_tensor *ac = dsrt_tensor_contiguous(a, CPU), *bc = dsrt_tensor_contiguous(b, CPU);
    REQUIRE(a && b && ac && bc);
    dsrt_tensor *c = dsrt_op_matmul(a, b, CPU);
    REQUIRE(c);
    double want[35], mag[35];
    naive_matmul(7, 5, 13, ac->storage->data, bc->storage->data, want, mag);
    CHECK(count_bad(c->storage->data, want, mag, 35, 13) == 0);
    dsrt_tensor_release(c);
    dsrt_tensor_release(ac);
    dsrt_tensor_release(bc);
    dsrt_tensor_release(a);
    dsrt_tensor_release(b);
    dsrt_tensor_release(a0);
    dsrt_tensor_release(b0);
}

TEST(matmul_bf16_rounds_the_f32_result_once)
{
    dsrt_tensor *a = rand_f32(2, (int64_t[]){9, 33}), *b = rand_f32(2, (int64_t[]){33, 17});
    REQUIRE(a && b);
    dsrt_tensor *ab = dsrt_tensor_to(a, DSRT_CPU, DSRT_BF16, CPU, 0), *bb = dsrt_tensor_to(b, DSRT_CPU, DSRT_BF16, CPU, 0);
    REQUIRE(ab && bb);
    dsrt_tensor *c = dsrt_op_matmul(ab, bb, CPU);
    REQUIRE(c);
    CHECK(c->dtype == DSRT_BF16 && shape_is(c, 2, (int64_t[]){9, 17}));
    dsrt_tensor *af = dsrt_tensor_to(ab, DSRT_CPU, DSRT_F32, CPU, 0), *bf = dsrt_tensor_to(bb, DSRT_CPU, DSRT_F32, CPU, 0);
    REQUIRE(af && bf);
    double want[9 * 17], mag[9 * 17];
    naive_matmul(9, 17, 33, af->storage->data, bf->storage->data, want, mag);
    int64_t bad = 0;
    for (int i = 0; i < 9 * 17; i++) {
        double got = get(c, i);
        /* one bf16 rounding (2^-8 relative) of a value good to f32 accuracy */
        bad += !(fabs(got - want[i]) <= fabs(want[i]) * (1.0 / 256) + 35 * 1.2e-7 * mag[i]);
    }
    CHECK(bad == 0);
    dsrt_tensor_release(af);
    dsrt_tensor_release(bf);
    dsrt_tensor_release(c);
    dsrt_tensor_release(ab);
    dsrt_tensor_release(bb);
    dsrt_tensor_release(a);
    dsrt_tensor_release(b);
}

TEST(matmul_rejects_bad_operands_with_shapes)
{
    dsrt_tensor *a = rand_f32(2, (int64_t[]){7, 13}), *b = rand_f32(2, (int64_t[]){12, 5});
    REQUIRE(a && b);
    CHECK(dsrt_op_matmul(a, b, CPU) == NULL);
    const char *msg = dsrt_err_msg();
    CHECKF(strstr(msg, "matmul") && strstr(msg, "[7, 13]") && strstr(msg, "[12, 5]"), "message: %s", msg);
    dsrt_tensor *i = dsrt_tensor_new(DSRT_I64, 2, (int64_t[]){13, 5}, DSRT_CPU, CPU);
    REQUIRE(i);
    CHECK(dsrt_op_matmul(a, i, CPU) == NULL);
    msg = dsrt_err_msg();
    CHECKF(strstr(msg, "matmul") && strstr(msg, "i64"), "message: %s", msg);
    dsrt_tensor *x = rand_f32(3, (int64_t[]){2, 7, 13}), *y = rand_f32(3, (int64_t[]){3, 13, 5});
    REQUIRE(x && y);
    CHECK(dsrt_op_matmul(x, y, CPU) == NULL);
    CHECK(strstr(dsrt_err_msg(), "batch") != NULL);
    int64_t no_dims[1] = {0};
    dsrt_tensor *s = dsrt_tensor_new(DSRT_F32, 0, no_dims, DSRT_CPU, CPU);
    REQUIRE(s);
    CHECK(dsrt_op_matmul(s, a, CPU) == NULL);
    dsrt_tensor_release(s);
    dsrt_tensor_release(x);
    dsrt_tensor_release(y);
    dsrt_tensor_release(i);
    dsrt_tensor_release(a);
    dsrt_tensor_release(b);
}

TEST(matmul_with_zero_sized_inner_dimension_gives_zeros)
{
    dsrt_tensor *a = dsrt_tensor_new(DSRT_F32, 2, (int64_t[]){3, 0}, DSRT_CPU, CPU);
    dsrt_tensor *b = dsrt_tensor_new(DSRT_F32, 2, (int64_t[]){0, 4}, DSRT_CPU, CPU);
    REQUIRE(a && b);
    dsrt_tensor *c = dsrt_op_matmul(a, b, CPU);
    REQUIRE(c);
    CHECK(shape_is(c, 2, (int64_t[]){3, 4}));
    int nonzero = 0;
    for (int i = 0; i < 12; i++) nonzero += get(c, i) != 0;
    CHECK(nonzero == 0);
    dsrt_tensor_release(c);
    dsrt_tensor_release(a);
    dsrt_tensor_release(b);
}

TEST(gemm_f32_respects_leading_dimensions)
{
    enum { M = 37, N = 29, K = 301, LDA = K + 3, LDB = N + 5, LDC = N + 7 };
    float *a = malloc(sizeof(float) * M * LDA), *b = malloc(sizeof(float) * K * LDB), *c = malloc(sizeof(float) * M * LDC);
    float *ap = malloc(sizeof(float) * M * K), *bp = malloc(sizeof(float) * K * N);
    REQUIRE(a && b && c && ap && bp);
    for (int i = 0; i < M * LDA; i++) a[i] = dsrt_rand_uniform(seed_counter, (uint64_t)i) - 0.5f;
    for (int i = 0; i < K * LDB; i++) b[i] = dsrt_rand_uniform(seed_counter + 1, (uint64_t)i) - 0.5f;
    seed_counter += 2;
    for (int i = 0; i < M * LDC; i++) c[i] = NAN; /* poison: every C element must be written */
    for (int i = 0; i < M; i++) memcpy(ap + i * K, a + i * LDA, sizeof(float) * K);
    for (int p = 0; p < K; p++) memcpy(bp + p * N, b + p * LDB, sizeof(float) * N);
    dsrt_gemm_f32(M, N, K, a, LDA, b, LDB, c, LDC);
    double want[M * N], mag[M * N];
    naive_matmul(M, N, K, ap, bp, want, mag);
    int64_t bad = 0, padding_touched = 0;
    for (int i = 0; i < M; i++) {
        bad += count_bad(c + i * LDC, want + i * N, mag + i * N, N, K);
        for (int j = N; j < LDC; j++) padding_touched += !isnan(c[i * LDC + j]);
    }
    CHECKF(bad == 0, "%lld wrong", (long long)bad);
    CHECK(padding_touched == 0);
    free(a), free(b), free(c), free(ap), free(bp);
}

/* ---- binary ops ---- */

TEST(binary_broadcasts_rows_and_columns)
{
    dsrt_tensor *a = from_values(DSRT_F32, 2, (int64_t[]){2, 3}, (double[]){1, 2, 3, 4, 5, 6});
    dsrt_tensor *r = from_values(DSRT_F32, 1, (int64_t[]){3}, (double[]){10, 20, 30});
    dsrt_tensor *col = from_values(DSRT_F32, 2, (int64_t[]){2, 1}, (double[]){100, 200});
    REQUIRE(a && r && col);
    dsrt_tensor *s = dsrt_op_binary(DSRT_OP_ADD, a, r, CPU);
    REQUIRE(s);
    CHECK(shape_is(s, 2, (int64_t[]){2, 3}));
    static const double want_s[6] = {11, 22, 33, 14, 25, 36};
    for (int i = 0; i < 6; i++) CHECKF(get(s, i) == want_s[i], "sum[%d] = %g", i, get(s, i));
    dsrt_tensor *p = dsrt_op_binary(DSRT_OP_MUL, col, r, CPU); /* [2,1] * [3] -> [2,3] outer product */
    REQUIRE(p);
    CHECK(shape_is(p, 2, (int64_t[]){2, 3}));
    static const double want_p[6] = {1000, 2000, 3000, 2000, 4000, 6000};
    for (int i = 0; i < 6; i++) CHECKF(get(p, i) == want_p[i], "outer[%d] = %g", i, get(p, i));
    dsrt_tensor *d = dsrt_op_binary(DSRT_OP_SUB, r, a, CPU); /* operand order kept */
    REQUIRE(d);
    static const double want_d[6] = {9, 18, 27, 6, 15, 24};
    for (int i = 0; i < 6; i++) CHECKF(get(d, i) == want_d[i], "diff[%d] = %g", i, get(d, i));
    /* [3, 1, 2] with [4, 1] -> [3, 4, 2] */
    dsrt_tensor *x = rand_f32(3, (int64_t[]){3, 1, 2}), *y = rand_f32(2, (int64_t[]){4, 1});
    REQUIRE(x && y);
    dsrt_tensor *z = dsrt_op_binary(DSRT_OP_DIV, x, y, CPU);
    REQUIRE(z);
    CHECK(shape_is(z, 3, (int64_t[]){3, 4, 2}));
    int bad = 0;
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 4; j++)
            for (int k = 0; k < 2; k++) bad += get(z, (i * 4 + j) * 2 + k) != (double)((float)get(x, i * 2 + k) / (float)get(y, j));
    CHECK(bad == 0);
    dsrt_tensor *bad_shape = from_values(DSRT_F32, 1, (int64_t[]){2}, (double[]){1, 2});
    REQUIRE(bad_shape);
    CHECK(dsrt_op_binary(DSRT_OP_ADD, a, bad_shape, CPU) == NULL);
    const char *msg = dsrt_err_msg();
    CHECKF(strstr(msg, "add") && strstr(msg, "[2, 3]") && strstr(msg, "[2]"), "message: %s", msg);
    dsrt_tensor_release(bad_shape);
    dsrt_tensor_release(z), dsrt_tensor_release(x), dsrt_tensor_release(y);
    dsrt_tensor_release(d), dsrt_tensor_release(p), dsrt_tensor_release(s);
    dsrt_tensor_release(a), dsrt_tensor_release(r), dsrt_tensor_release(col);
}

TEST(binary_promotes_dtypes)
{
    dsrt_tensor *i = from_values(DSRT_I64, 1, (int64_t[]){3}, (double[]){7, -7, 2});
    dsrt_tensor *i32 = from_values(DSRT_I32, 1, (int64_t[]){3}, (double[]){2, 2, 0});
    dsrt_tensor *f = from_values(DSRT_F32, 1, (int64_t[]){3}, (double[]){0.5, 0.5, 0.5});
    dsrt_tensor *h = from_values(DSRT_BF16, 1, (int64_t[]){3}, (double[]){1, 2, 3});
    REQUIRE(i && i32 && f && h);
    dsrt_tensor *r;
    CHECK((r = dsrt_op_binary(DSRT_OP_ADD, i, f, CPU)) && r->dtype == DSRT_F32 && get(r, 0) == 7.5);
    dsrt_tensor_release(r);
    CHECK((r = dsrt_op_binary(DSRT_OP_ADD, i, i32, CPU)) && r->dtype == DSRT_I64 && get(r, 1) == -5);
    dsrt_tensor_release(r);
    CHECK((r = dsrt_op_binary(DSRT_OP_MUL, h, h, CPU)) && r->dtype == DSRT_BF16 && get(r, 2) == 9);
    dsrt_tensor_release(r);
    CHECK((r = dsrt_op_binary(DSRT_OP_ADD, h, f, CPU)) && r->dtype == DSRT_F32 && get(r, 0) == 1.5);
    dsrt_tensor_release(r);
    CHECK((r = dsrt_op_binary(DSRT_OP_ADD, i, h, CPU)) && r->dtype == DSRT_BF16);
    dsrt_tensor_release(r);
    /* integer division is a float op; comparisons give bool */
    CHECK((r = dsrt_op_binary(DSRT_OP_DIV, i, i32, CPU)) && r->dtype == DSRT_F32 && get(r, 0) == 3.5 && isinf(get(r, 2)));
    dsrt_tensor_release(r);
    CHECK((r = dsrt_op_binary(DSRT_OP_LT, i, i32, CPU)) && r->dtype == DSRT_BOOL && get(r, 0) == 0 && get(r, 1) == 1);
    dsrt_tensor_release(r);
    dsrt_tensor_release(i), dsrt_tensor_release(i32), dsrt_tensor_release(f), dsrt_tensor_release(h);
}

TEST(integer_idiv_and_mod_floor_like_lua)
{
    static const double x[8] = {7, -7, 7, -7, 0, 5, INT64_MIN, 9};
    static const double y[8] = {2, 2, -2, -2, 3, 0, -1, 0};
    dsrt_tensor *a = from_values(DSRT_I64, 1, (int64_t[]){8}, x), *b = from_values(DSRT_I64, 1, (int64_t[]){8}, y);
    REQUIRE(a && b);
    dsrt_tensor *q = dsrt_op_binary(DSRT_OP_IDIV, a, b, CPU), *m = dsrt_op_binary(DSRT_OP_MOD, a, b, CPU);
    REQUIRE(q && m);
    CHECK(q->dtype == DSRT_I64 && m->dtype == DSRT_I64);
    static const int64_t want_q[8] = {3, -4, -4, 3, 0, 0, 0, 0}; /* by zero and MIN // -1: 0 */
    static const int64_t want_m[8] = {1, 1, -1, -1, 0, 0, 0, 0};
    for (int i = 0; i < 8; i++) {
        CHECKF(((int64_t *)q->storage->data)[i] == want_q[i], "idiv %d: %lld", i, (long long)((int64_t *)q->storage->data)[i]);
        CHECKF(((int64_t *)m->storage->data)[i] == want_m[i], "mod %d: %lld", i, (long long)((int64_t *)m->storage->data)[i]);
    }
    dsrt_tensor_release(q), dsrt_tensor_release(m), dsrt_tensor_release(a), dsrt_tensor_release(b);
    /* floats floor too */
    dsrt_tensor *fa = from_values(DSRT_F32, 1, (int64_t[]){4}, (double[]){7.5, -7.5, 7.5, -7.5});
    dsrt_tensor *fb = from_values(DSRT_F32, 1, (int64_t[]){4}, (double[]){2, 2, -2, -2});
    REQUIRE(fa && fb);
    q = dsrt_op_binary(DSRT_OP_IDIV, fa, fb, CPU), m = dsrt_op_binary(DSRT_OP_MOD, fa, fb, CPU);
    REQUIRE(q && m);
    static const double fq[4] = {3, -4, -4, 3}, fm[4] = {1.5, 0.5, -0.5, -1.5};
    for (int i = 0; i < 4; i++) CHECKF(get(q, i) == fq[i] && get(m, i) == fm[i], "%d: %g %g", i, get(q, i), get(m, i));
    dsrt_tensor_release(q), dsrt_tensor_release(m), dsrt_tensor_release(fa), dsrt_tensor_release(fb);
}

TEST(binary_scalar_both_sides_and_dtypes)
{
    dsrt_tensor *i = from_values(DSRT_I64, 1, (int64_t[]){3}, (double[]){1, 2, 3});
    dsrt_tensor *h = from_values(DSRT_BF16, 1, (int64_t[]){3}, (double[]){1, 2, 3});
    REQUIRE(i && h);
    dsrt_tensor *r;
    CHECK((r = dsrt_op_binary_scalar(DSRT_OP_ADD, i, 2, 0, CPU)) && r->dtype == DSRT_I64 && get(r, 2) == 5);
    dsrt_tensor_release(r);
    CHECK((r = dsrt_op_binary_scalar(DSRT_OP_ADD, i, 2.5, 0, CPU)) && r->dtype == DSRT_F32 && get(r, 0) == 3.5);
    dsrt_tensor_release(r);
    CHECK((r = dsrt_op_binary_scalar(DSRT_OP_SUB, i, 10, 1, CPU)) && get(r, 0) == 9 && get(r, 2) == 7);
    dsrt_tensor_release(r);
    CHECK((r = dsrt_op_binary_scalar(DSRT_OP_SUB, i, 10, 0, CPU)) && get(r, 0) == -9);
    dsrt_tensor_release(r);
    CHECK((r = dsrt_op_binary_scalar(DSRT_OP_DIV, i, 2, 0, CPU)) && r->dtype == DSRT_F32 && get(r, 0) == 0.5);
    dsrt_tensor_release(r);
    CHECK((r = dsrt_op_binary_scalar(DSRT_OP_POW, i, 2, 1, CPU)) && get(r, 2) == 8); /* 2 ^ t */
    dsrt_tensor_release(r);
    CHECK((r = dsrt_op_binary_scalar(DSRT_OP_MUL, h, 0.5, 0, CPU)) && r->dtype == DSRT_BF16 && get(r, 1) == 1);
    dsrt_tensor_release(r);
    CHECK((r = dsrt_op_binary_scalar(DSRT_OP_GE, h, 2, 0, CPU)) && r->dtype == DSRT_BOOL && get(r, 0) == 0 && get(r, 1) == 1);
    dsrt_tensor_release(r);
    CHECK((r = dsrt_op_binary_scalar(DSRT_OP_MOD, i, 2, 1, CPU)) && get(r, 0) == 0 && get(r, 2) == 2); /* 2 % t */
    dsrt_tensor_release(r);
    dsrt_tensor_release(i), dsrt_tensor_release(h);
}

TEST(maximum_minimum_propagate_nan)
{
    dsrt_tensor *a = from_values(DSRT_F32, 1, (int64_t[]){3}, (double[]){1, NAN, 5});
    dsrt_tensor *b = from_values(DSRT_F32, 1, (int64_t[]){3}, (double[]){2, 0, NAN});
    REQUIRE(a && b);
    dsrt_tensor *mx = dsrt_op_binary(DSRT_OP_MAXIMUM, a, b, CPU), *mn = dsrt_op_binary(DSRT_OP_MINIMUM, a, b, CPU);
    REQUIRE(mx && mn);
    CHECK(get(mx, 0) == 2 && isnan(get(mx, 1)) && isnan(get(mx, 2)));
    CHECK(get(mn, 0) == 1 && isnan(get(mn, 1)) && isnan(get(mn, 2)));
    dsrt_tensor_release(mx), dsrt_tensor_release(mn), dsrt_tensor_release(a), dsrt_tensor_release(b);
}

TEST(unary_ops_match_libm)
{
    dsrt_tensor *a = rand_f32(1, (int64_t[]){257});
    REQUIRE(a);
    for (int op = 0; op < DSRT_NUNARY; op++) {
        dsrt_tensor *r = dsrt_op_unary(op, a, CPU);
        REQUIRE(r);
        int bad = 0;
        for (int i = 0; i < 257; i++) {
            float x = (float)get(a, i), want;
            switch (op) {
            case DSRT_OP_NEG: want = -x; break;
            case DSRT_OP_ABS: want = fabsf(x); break;
            case DSRT_OP_EXP: want = expf(x); break;
            case DSRT_OP_LOG: want = logf(x); break;
            case DSRT_OP_SQRT: want = sqrtf(x); break;
            case DSRT_OP_RSQRT: want = 1 / sqrtf(x); break;
            case DSRT_OP_SIN: want = sinf(x); break;
            case DSRT_OP_COS: want = cosf(x); break;
            case DSRT_OP_TANH: want = tanhf(x); break;
            case DSRT_OP_SIGMOID: want = (float)(1 / (1 + exp(-(double)x))); break;
            case DSRT_OP_SILU: want = (float)(x / (1 + exp(-(double)x))); break;
            default: want = x > 0 ? x : 0; break;
            }
            double got = get(r, i);
            if (isnan(want)) bad += !isnan(got);
            else bad += !(fabs(got - want) <= 4e-7 * fabs(want) + 1e-30);
        }
        CHECKF(bad == 0, "%s: %d of 257 wrong", dsrt_op_unary_name(op), bad);
        dsrt_tensor_release(r);
    }
    dsrt_tensor_release(a);
    dsrt_tensor *i = from_values(DSRT_I64, 1, (int64_t[]){3}, (double[]){-5, 0, 4});
    REQUIRE(i);
    dsrt_tensor *r = dsrt_op_unary(DSRT_OP_ABS, i, CPU);
    CHECK(r && r->dtype == DSRT_I64 && get(r, 0) == 5);
    dsrt_tensor_release(r);
    r = dsrt_op_unary(DSRT_OP_EXP, i, CPU);
    CHECK(r && r->dtype == DSRT_F32 && fabs(get(r, 2) - exp(4)) < 1e-4);
    dsrt_tensor_release(r);
    dsrt_tensor_release(i);
}

/* ---- copy and fill ---- */

TEST(copy_converts_and_broadcasts)
{
    dsrt_tensor *src = from_values(DSRT_F32, 1, (int64_t[]){4}, (double[]){1.5, -2.5, 300, 1e10});
    dsrt_tensor *dst = dsrt_tensor_new(DSRT_I8, 2, (int64_t[]){2, 4}, DSRT_CPU, CPU);
    REQUIRE(src && dst);
    CHECK(dsrt_op_copy(dst, src, CPU) == 0);
    /* truncation toward zero, then wrapping to 8 bits as torch does (300 -> 44; 1e10 -> int64 -> low byte) */
    int8_t want3 = (int8_t)(int64_t)1e10f;
    for (int r = 0; r < 2; r++) {
        const int8_t *p = (const int8_t *)dst->storage->data + r * 4;
        CHECKF(p[0] == 1 && p[1] == -2 && p[2] == 44 && p[3] == want3, "row %d: %d %d %d %d", r, p[0], p[1], p[2], p[3]);
    }
    dsrt_tensor *wrong = dsrt_tensor_new(DSRT_F32, 1, (int64_t[]){3}, DSRT_CPU, CPU);
    REQUIRE(wrong);
    CHECK(dsrt_op_copy(dst, wrong, CPU) != 0); /* [3] does not broadcast to [2, 4] */
    CHECK(strstr(dsrt_err_msg(), "[3]") != NULL);
    CHECK(dsrt_op_fill(dst, -3, CPU) == 0);
    CHECK(((int8_t *)dst->storage->data)[7] == -3);
    dsrt_tensor_release(wrong), dsrt_tensor_release(src), dsrt_tensor_release(dst);
}

TEST(arange_and_rand_fill_in_row_major_order)
{
    dsrt_tensor *t = dsrt_tensor_new(DSRT_F32, 2, (int64_t[]){3, 4}, DSRT_CPU, CPU);
    REQUIRE(t);
    dsrt_tensor *tr = dsrt_tensor_transpose(t, 0, 1); /* writes through a strided view */
    REQUIRE(tr);
    CHECK(dsrt_op_arange(tr, 2, 0.5, CPU) == 0);
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 3; j++) CHECKF(get(t, j * 4 + i) == 2 + 0.5 * (i * 3 + j), "[%d][%d]", j, i);
    CHECK(dsrt_op_rand(t, 42, 5, 0, -2, 3, CPU) == 0);
    for (int i = 0; i < 12; i++) CHECK(get(t, i) == (double)(-2.0f + 5.0f * dsrt_rand_uniform(42, 5 + (uint64_t)i)));
    CHECK(dsrt_op_rand(t, 42, 0, 1, 1, 2, CPU) == 0);
    for (int i = 0; i < 12; i++) CHECK(get(t, i) == (double)(1.0f + 2.0f * dsrt_rand_normal(42, (uint64_t)i)));
    dsrt_tensor_release(tr), dsrt_tensor_release(t);
}

/* ---- reductions ---- */

static double naive_reduce(int op, const double *v, int n, int64_t *pos)
{
    double acc = op == DSRT_RED_SUM || op == DSRT_RED_MEAN ? 0 : v[0];
    *pos = 0;
    for (int i = 0; i < n; i++) {
        if (op == DSRT_RED_SUM || op == DSRT_RED_MEAN) acc += v[i];
        else if ((op == DSRT_RED_MAX || op == DSRT_RED_ARGMAX) ? v[i] > acc : v[i] < acc) acc = v[i], *pos = i;
    }
    return op == DSRT_RED_MEAN ? acc / n : acc;
}

TEST(reductions_along_every_dim)
{
    int64_t shape[3] = {3, 4, 5};
    dsrt_tensor *a = rand_f32(3, shape);
    REQUIRE(a);
    for (int op = 0; op < DSRT_NREDUCE; op++)
        for (int dim = 0; dim < 3; dim++)
            for (int keep = 0; keep < 2; keep++) {
                dsrt_tensor *r = dsrt_op_reduce(op, a, dim, keep, CPU);
                REQUIRE(r);
                int64_t want_shape[3];
                int nd = 0;
                for (int d = 0; d < 3; d++)
                    if (d != dim || keep) want_shape[nd++] = d == dim ? 1 : shape[d];
                CHECKF(shape_is(r, nd, want_shape), "%s dim %d keepdim %d: shape", dsrt_op_reduce_name(op), dim, keep);
                CHECK(r->dtype == (op >= DSRT_RED_ARGMAX ? DSRT_I64 : DSRT_F32));
                int bad = 0, outi = 0;
                for (int i = 0; i < 3; i++)
                    for (int j = 0; j < 4; j++)
                        for (int k = 0; k < 5; k++) {
                            int idx[3] = {i, j, k};
                            if (idx[dim] != 0) continue;
                            double v[5];
                            for (int x = 0; x < shape[dim]; x++) {
                                idx[dim] = x;
                                v[x] = get(a, (idx[0] * 4 + idx[1]) * 5 + idx[2]);
                            }
                            int64_t pos;
                            double want = naive_reduce(op, v, (int)shape[dim], &pos);
                            double got = get(r, outi++);
                            if (op >= DSRT_RED_ARGMAX) bad += got != pos;
                            else bad += !(fabs(got - want) <= 1e-6 * (1 + fabs(want)));
                        }
                CHECKF(bad == 0, "%s dim %d keepdim %d: %d wrong", dsrt_op_reduce_name(op), dim, keep, bad);
                dsrt_tensor_release(r);
            }
    dsrt_tensor_release(a);
}

TEST(reduce_everything_to_0d)
{
    dsrt_tensor *a = from_values(DSRT_F32, 2, (int64_t[]){2, 3}, (double[]){1, 9, 3, -4, 5, 9});
    REQUIRE(a);
    dsrt_tensor *r = dsrt_op_reduce(DSRT_RED_SUM, a, -1, 0, CPU);
    CHECK(r && r->ndim == 0 && get(r, 0) == 23);
    dsrt_tensor_release(r);
    r = dsrt_op_reduce(DSRT_RED_MEAN, a, -1, 1, CPU);
    CHECK(r && shape_is(r, 2, (int64_t[]){1, 1}) && fabs(get(r, 0) - 23.0 / 6) < 1e-6);
    dsrt_tensor_release(r);
    r = dsrt_op_reduce(DSRT_RED_ARGMAX, a, -1, 0, CPU); /* flat position, first of the tied 9s */
    CHECK(r && r->dtype == DSRT_I64 && get(r, 0) == 1);
    dsrt_tensor_release(r);
    r = dsrt_op_reduce(DSRT_RED_ARGMIN, a, -1, 0, CPU);
    CHECK(r && get(r, 0) == 3);
    dsrt_tensor_release(r);
    dsrt_tensor *tr = dsrt_tensor_transpose(a, 0, 1); /* [3, 2]: 1 -4 9 5 3 9 */
    REQUIRE(tr);
    r = dsrt_op_reduce(DSRT_RED_ARGMAX, tr, -1, 0, CPU);
    CHECK(r && get(r, 0) == 2);
    dsrt_tensor_release(r);
    CHECK(dsrt_op_reduce(DSRT_RED_SUM, a, 2, 0, CPU) == NULL);
    CHECK(strstr(dsrt_err_msg(), "sum") != NULL && strstr(dsrt_err_msg(), "[2, 3]") != NULL);
    dsrt_tensor_release(tr), dsrt_tensor_release(a);
}

TEST(argmax_ties_first_wins)
{
    dsrt_tensor *a = from_values(DSRT_F32, 2, (int64_t[]){2, 4}, (double[]){1, 3, 3, 2, 5, 5, 5, 5});
    REQUIRE(a);
    dsrt_tensor *mx = dsrt_op_reduce(DSRT_RED_ARGMAX, a, 1, 0, CPU), *mn = dsrt_op_reduce(DSRT_RED_ARGMIN, a, 1, 0, CPU);
    REQUIRE(mx && mn);
    CHECK(get(mx, 0) == 1 && get(mx, 1) == 0);
    CHECK(get(mn, 0) == 0 && get(mn, 1) == 0);
    dsrt_tensor *cols = dsrt_op_reduce(DSRT_RED_ARGMAX, a, 0, 0, CPU); /* 5 > 1, 5 > 3, 5 > 3, 5 > 2 */
    REQUIRE(cols);
    for (int i = 0; i < 4; i++) CHECK(get(cols, i) == 1);
    dsrt_tensor *ia = from_values(DSRT_I64, 1, (int64_t[]){5}, (double[]){-1, 7, 2, 7, -1});
    REQUIRE(ia);
    dsrt_tensor *im = dsrt_op_reduce(DSRT_RED_ARGMAX, ia, 0, 0, CPU), *in = dsrt_op_reduce(DSRT_RED_ARGMIN, ia, 0, 0, CPU);
    CHECK(im && get(im, 0) == 1);
    CHECK(in && get(in, 0) == 0);
    dsrt_tensor_release(im), dsrt_tensor_release(in), dsrt_tensor_release(ia);
    dsrt_tensor_release(cols), dsrt_tensor_release(mx), dsrt_tensor_release(mn), dsrt_tensor_release(a);
}

TEST(reductions_with_nan)
{
    /* rows: NaN in the middle, NaN first, NaN last after the maximum, no NaN */
    dsrt_tensor *a = from_values(DSRT_F32, 2, (int64_t[]){4, 3},
                                 (double[]){1, NAN, 3, NAN, 5, 6, 9, 2, NAN, 4, 8, 0});
    REQUIRE(a);
    dsrt_tensor *mx = dsrt_op_reduce(DSRT_RED_MAX, a, 1, 0, CPU), *mn = dsrt_op_reduce(DSRT_RED_MIN, a, 1, 0, CPU);
    dsrt_tensor *am = dsrt_op_reduce(DSRT_RED_ARGMAX, a, 1, 0, CPU), *an = dsrt_op_reduce(DSRT_RED_ARGMIN, a, 1, 0, CPU);
    dsrt_tensor *sm = dsrt_op_reduce(DSRT_RED_SUM, a, 1, 0, CPU), *me = dsrt_op_reduce(DSRT_RED_MEAN, a, 1, 0, CPU);
    REQUIRE(mx && mn && am && an && sm && me);
    for (int r = 0; r < 3; r++) {
        CHECKF(isnan(get(mx, r)) && isnan(get(mn, r)), "row %d: max %g min %g", r, get(mx, r), get(mn, r));
        CHECKF(isnan(get(sm, r)) && isnan(get(me, r)), "row %d: sum %g mean %g", r, get(sm, r), get(me, r));
    }
    CHECK(get(am, 0) == 1 && get(am, 1) == 0 && get(am, 2) == 2 && get(am, 3) == 1);
    CHECK(get(an, 0) == 1 && get(an, 1) == 0 && get(an, 2) == 2 && get(an, 3) == 2);
    CHECK(get(mx, 3) == 8 && get(mn, 3) == 0 && get(sm, 3) == 12);
    dsrt_tensor_release(mx), dsrt_tensor_release(mn), dsrt_tensor_release(am), dsrt_tensor_release(an);
    dsrt_tensor_release(sm), dsrt_tensor_release(me), dsrt_tensor_release(a);
}

TEST(reduce_dtypes_and_empty_dims)
{
    dsrt_tensor *i = from_values(DSRT_I32, 1, (int64_t[]){4}, (double[]){1, 2, 3, 2000000000});
    REQUIRE(i);
    dsrt_tensor *r = dsrt_op_reduce(DSRT_RED_SUM, i, 0, 0, CPU);
    CHECK(r && r->dtype == DSRT_I64 && get(r, 0) == 2000000006.0); /* no i32 overflow */
    dsrt_tensor_release(r);
    r = dsrt_op_reduce(DSRT_RED_MAX, i, 0, 0, CPU);
    CHECK(r && r->dtype == DSRT_I32 && get(r, 0) == 2000000000.0);
    dsrt_tensor_release(r);
    r = dsrt_op_reduce(DSRT_RED_MEAN, i, 0, 0, CPU);
    CHECK(r && r->dtype == DSRT_F32);
    dsrt_tensor_release(r);
    dsrt_tensor_release(i);
    dsrt_tensor *e = dsrt_tensor_new(DSRT_F32, 2, (int64_t[]){3, 0}, DSRT_CPU, CPU);
    REQUIRE(e);
    r = dsrt_op_reduce(DSRT_RED_SUM, e, 1, 0, CPU);
    CHECK(r && shape_is(r, 1, (int64_t[]){3}) && get(r, 0) == 0 && get(r, 2) == 0);
    dsrt_tensor_release(r);
    r = dsrt_op_reduce(DSRT_RED_SUM, e, 0, 0, CPU); /* reduces a dim of 3 into an empty result */
    CHECK(r && shape_is(r, 1, (int64_t[]){0}));
    dsrt_tensor_release(r);
    CHECK(dsrt_op_reduce(DSRT_RED_MAX, e, 1, 0, CPU) == NULL);
    CHECK(strstr(dsrt_err_msg(), "empty") != NULL);
    dsrt_tensor_release(e);
}
