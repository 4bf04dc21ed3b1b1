/*
 * test_nn.c - DeepSeek-V4's numerical primitives (nn.h) against hand-computed tables and against
 * independent double-precision re-implementations written here from the SPEC's formulas.
 *
 * What this protects: the numbers the whole model and every later CUDA kernel are checked against.
 * Tables pin the exact round trips (SPEC §3.3-3.4 incl. the tie list and the amax floors) and the
 * RoPE frequencies (§3.6); engineered cases pin the rounding points that random data cannot
 * separate from noise (attention's bf16 probabilities, the kernel's running max); the double
 * re-implementations check everything else at odd sizes on fresh random inputs: fp32 mode within
 * fp32 rounding, reference mode within the bf16 rounding it adds.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "check.h"
#include "err.h"
#include "nn.h"
#include "ops.h"

#define CPU dsrt_stream_default(DSRT_CPU)
#define REF DSRT_PREC_REFERENCE
#define FP32 DSRT_PREC_FP32

static uint64_t next_seed = 4000;

/* fresh normal values (mean 0, std `std`), stored in dtype */
static dsrt_tensor *randn(dsrt_dtype dtype, int ndim, const int64_t *shape, double std)
{
    dsrt_tensor *t = dsrt_tensor_new(dtype, ndim, shape, DSRT_CPU, CPU);
    if (t && dsrt_op_rand(t, next_seed++, 0, 1, 0.0, std, CPU)) {
        dsrt_tensor_release(t);
        return NULL;
    }
    return t;
}

static dsrt_tensor *from_values(dsrt_dtype dtype, int ndim, const int64_t *shape, const double *v)
{
    dsrt_tensor *t = dsrt_tensor_new(dtype, ndim, shape, DSRT_CPU, CPU);
    if (!t) return NULL;
    for (int64_t i = 0; i < dsrt_tensor_numel(t); i++) {
        if (dsrt_dtype_is_float(dtype)) dsrt_store_f32(t->storage->data, dtype, i, (float)v[i]);
        else dsrt_store_i64(t->storage->data, dtype, i, (int64_t)v[i]);
    }
    return t;
}

/* t's values in row-major order as doubles (malloc'd) */
static double *values(const dsrt_tensor *t)
{
    int64_t n = dsrt_tensor_numel(t);
    double *v = malloc((size_t)(n ? n : 1) * sizeof *v);
    dsrt_view view = dsrt_tensor_desc(t);
    for (int64_t i = 0; i < n; i++) {
        int64_t e = dsrt_view_index(&view, i);
        v[i] = dsrt_dtype_is_float(t->dtype) ? dsrt_load_f32(t->storage->data, t->dtype, e)
                                             : (double)dsrt_load_i64(t->storage->data, t->dtype, e);
    }
    return v;
}

static double bf16(double v) { return dsrt_bf16_to_f32(dsrt_f32_to_bf16((float)v)); }

/* the spacing of bf16 values around v (8 significant bits) */
static double bf16_ulp(double v)
{
    int e;
    frexp(v, &e);
    return v == 0 ? ldexp(1, -133) : ldexp(1, e - 8);
}

static double max_abs(const double *v, int64_t n)
{
    double m = 0;
    for (int64_t i = 0; i < n; i++) m = fmax(m, fabs(v[i]));
    return m;
}

static int shape_is(const dsrt_tensor *t, int ndim, const int64_t *shape)
{
    return t && t->ndim == ndim && memcmp(t->shape, shape, (size_t)ndim * sizeof *shape) == 0;
}

/* the failure message contains every one of the given fragments */
static int message_has(const char *a, const char *b)
{
    const char *msg = dsrt_err_msg();
    return strstr(msg, a) && (!b || strstr(msg, b));
}
#define CHECK_ERROR(call, a, b) CHECKF((call) && message_has(a, b), "message: %s", dsrt_err_msg())

/* ---- round trips (SPEC §3.3-3.4) ---- */

TEST(nn_q8_roundtrip_table)
{
    /* blocks of 4 over columns 1..8; columns 0 and 9 are outside the range */
    const double x[2][10] = {{7.7, 449, 1, -3.3, 17, 1e-6, -5e-5, 0, 3e-7, 9.9},
                             {0, 19, -0.1, 2.5, 100, 1e-3, -1e-3, 5e-4, 0, 0}};
    const double p22 = ldexp(1, -22), p18 = ldexp(1, -18);
    const double want[2][10] = {
        /* s = 2: 449/2 = 224.5 -> 224; 17/2 = 8.5 ties to 8 (even mantissa); -3.3/2 -> -1.625.
         * amax 5e-5 < 1e-4: the floor gives s = 2^-22 (1e-4/448 = 1.87·2^-23, rounded up) */
        {7.7, 448, 1, -3.25, 16, 4 * p22, -208 * p22, 0, 1.25 * p22, 9.9},
        /* s = 1/4: 19·4 = 76 ties to 80, 100·4 = 400 ties to 384 (the amax itself moves down);
         * amax 1e-3: s = 2^-18, 262.1 -> 256, 131.07 -> 128 */
        {0, 20, -0.1015625, 2.5, 96, 256 * p18, -256 * p18, 128 * p18, 0, 0}};
    int64_t shape[2] = {2, 10};
    dsrt_tensor *t = from_values(DSRT_F32, 2, shape, &x[0][0]);
    REQUIRE(t);
    CHECK(dsrt_nn_quant_roundtrip_q8(t, 4, 1, 8, REF, CPU) == 0);
    double *got = values(t);
    for (int i = 0; i < 20; i++)
        CHECKF(got[i] == (double)(float)(&want[0][0])[i], "[%d] got %.9g want %.9g", i, got[i], (&want[0][0])[i]);
    free(got);
    dsrt_tensor_release(t);

    /* a last block shorter than blk is quantised on its own; fp32 mode leaves x alone */
    t = from_values(DSRT_F32, 2, shape, &x[0][0]);
    REQUIRE(t);
    CHECK(dsrt_nn_quant_roundtrip_q8(t, 4, 1, 7, REF, CPU) == 0);
    got = values(t);
    CHECK(got[5] == 4 * p22 && got[6] == -208 * p22 && got[8] == (double)(float)3e-7);
    free(got);
    CHECK(dsrt_nn_quant_roundtrip_q8(t, 4, 0, 10, FP32, CPU) == 0);
    got = values(t);
    CHECK(got[0] == (double)(float)7.7 && got[9] == (double)(float)9.9);
    free(got);
    dsrt_tensor_release(t);
}

TEST(nn_q8_roundtrip_in_place_views)
{
    /* bf16 and strided f32 tensors are rewritten in place, equal to quant.h on the same values */
    int64_t shape[2] = {5, 70};
    for (int strided = 0; strided < 2; strided++) {
        dsrt_tensor *t = randn(strided ? DSRT_F32 : DSRT_BF16, 2, shape, 3.0);
        REQUIRE(t);
        dsrt_tensor *x = strided ? dsrt_tensor_transpose(t, 0, 1) : (dsrt_tensor_retain(t), t); /* [70, 5] view */
        double *before = values(x);
        int64_t n = x->shape[1], rows = x->shape[0], first = strided ? 1 : 3, count = strided ? 3 : 64;
        CHECK(dsrt_nn_quant_roundtrip_q8(x, strided ? 2 : 32, first, count, REF, CPU) == 0);
        double *after = values(x);
        int bad = 0;
        for (int64_t r = 0; r < rows; r++) {
            float buf[64];
            for (int64_t c = 0; c < count; c++) buf[c] = (float)before[r * n + first + c];
            dsrt_q8_roundtrip(buf, (int)count, strided ? 2 : 32);
            for (int64_t c = 0; c < n; c++) {
                double want = c >= first && c < first + count ? buf[c - first] : before[r * n + c];
                bad += after[r * n + c] != want;
            }
        }
        CHECKF(bad == 0, "%d values differ (strided %d)", bad, strided);
        free(before);
        free(after);
        dsrt_tensor_release(x);
        dsrt_tensor_release(t);
    }
}

TEST(nn_q4_roundtrip_table)
{
    double x[2][64] = {{0}}, want[2][64] = {{0}};
    /* SPEC §3.4's ties (s = 1: amax 6) and some plain roundings, then the same ×32 (s = 32) */
    const double in[] = {6, .25, .75, 1.25, 1.75, 2.5, 3.5, 5, -.25, -.75, -1.25, -1.75, -2.5, -3.5, -5, .3, .8, 2.9, 4.6};
    const double out[] = {6, 0, 1, 1, 2, 2, 4, 4, 0, -1, -1, -2, -2, -4, -4, .5, 1, 3, 4};
    for (int i = 0; i < 19; i++) {
        x[0][i] = in[i], want[0][i] = out[i];
        x[0][32 + i] = 32 * in[i], want[0][32 + i] = 32 * out[i];
    }
    /* the 6·2^-126 floor: s = 2^-126, so 2^-127 (code 0.5) and 3·2^-127 (1.5) survive, 2^-149 goes */
    const double p127 = ldexp(1, -127);
    const double tiny_in[] = {p127, 3 * p127, ldexp(1, -149), -p127}, tiny_out[] = {p127, 3 * p127, 0, -p127};
    for (int i = 0; i < 4; i++) x[1][i] = tiny_in[i], want[1][i] = tiny_out[i];
    /* amax 6.5 > 6: s = 2, 6.5/2 = 3.25 -> 3, 1.1/2 = 0.55 -> 0.5 */
    x[1][32] = 6.5, want[1][32] = 6;
    x[1][33] = 1.1, want[1][33] = 1;
    int64_t shape[2] = {2, 64};
    dsrt_tensor *t = from_values(DSRT_F32, 2, shape, &x[0][0]);
    REQUIRE(t);
    CHECK(dsrt_nn_quant_roundtrip_q4(t, REF, CPU) == 0);
    double *got = values(t);
    for (int i = 0; i < 128; i++)
        CHECKF(got[i] == (&want[0][0])[i], "[%d] %.9g -> %.9g, want %.9g", i, (&x[0][0])[i], got[i], (&want[0][0])[i]);
    free(got);
    CHECK(dsrt_nn_quant_roundtrip_q4(t, FP32, CPU) == 0); /* the identity */
    got = values(t);
    CHECK(got[32] == 192 && got[64 + 1] == 3 * p127);
    free(got);
    dsrt_tensor_release(t);
}

/* ---- RoPE (SPEC §3.6) ---- */

static const dsrt_yarn FLASH_YARN = {16, 65536, 32, 1};

TEST(nn_rope_freqs_table)
{
    /* SPEC §3.6's table, as printed: i, window layers (θ = 1e4), compressed layers (θ = 1.6e5 + YaRN) */
    static const struct { int i; const char *window, *compressed; } rows[] = {
        {0, "1.0", "1.0"},
        {1, "7.498942e-01", "6.876560e-01"},
        {8, "1.0e-01", "5.0e-02"},
        {15, "1.333521e-02", "3.635539e-03"},
        {16, "1.0e-02", "2.265625e-03"},
        {20, "3.162278e-03", "2.969778e-04"},
        {24, "1.0e-03", "1.953125e-05"},
        {25, "7.498942e-04", "5.372313e-06"},
        {31, "1.333521e-04", "5.680529e-07"},
    };
    float window[DSRT_NN_ROPE_PAIRS], compressed[DSRT_NN_ROPE_PAIRS], plain[DSRT_NN_ROPE_PAIRS];
    REQUIRE(dsrt_nn_rope_freqs(10000, NULL, window) == 0);
    REQUIRE(dsrt_nn_rope_freqs(160000, &FLASH_YARN, compressed) == 0);
    REQUIRE(dsrt_nn_rope_freqs(160000, NULL, plain) == 0);
    for (size_t r = 0; r < sizeof rows / sizeof rows[0]; r++) {
        const char *printed[2] = {rows[r].window, rows[r].compressed};
        float got[2] = {window[rows[r].i], compressed[rows[r].i]};
        for (int c = 0; c < 2; c++) {
            /* agreement to the printed digits: half a unit of the last one, plus two fp32 ulps for
             * the table's value having been rounded from the exact one, not from our fp32 result */
            double v = atof(printed[c]);
            const char *exponent = strchr(printed[c], 'e');
            const char *mantissa_end = exponent ? exponent : printed[c] + strlen(printed[c]);
            int decimals = (int)(mantissa_end - strchr(printed[c], '.')) - 1;
            double unit = pow(10, floor(log10(v)) - decimals);
            double tol = unit / 2 + 2 * ldexp(v, -23);
            CHECKF(fabs(got[c] - v) <= tol, "i = %d %s: %.9e vs %s", rows[r].i, c ? "compressed" : "window", got[c],
                   printed[c]);
        }
    }
    /* YaRN's shape (low = 15, high = 25): dims up to 15 untouched, from 25 on exactly divided by 16 */
    for (int i = 0; i < DSRT_NN_ROPE_PAIRS; i++) {
        if (i <= 15) CHECKF(compressed[i] == plain[i], "i = %d", i);
        if (i >= 25) CHECKF(compressed[i] == plain[i] / 16, "i = %d", i);
        if (i > 15 && i < 25) CHECKF(compressed[i] < plain[i] && compressed[i] > plain[i] / 16, "i = %d", i);
    }
    /* the tables come from a small per-thread cache once computed: asked again after more distinct
     * arguments than it holds (and a YaRN that differs in one field), each is still its own */
    float first[6][DSRT_NN_ROPE_PAIRS];
    for (int round = 0; round < 2; round++) {
        for (int k = 0; k < 6; k++) { /* beta_slow 1..6: YaRN's high end 25, 23, 22, 22, 21, 20 */
            dsrt_yarn y = FLASH_YARN;
            y.beta_slow = 1 + k;
            float t[DSRT_NN_ROPE_PAIRS];
            REQUIRE(dsrt_nn_rope_freqs(160000, &y, t) == 0);
            if (!round) memcpy(first[k], t, sizeof t);
            CHECKF(memcmp(t, first[k], sizeof t) == 0 && (memcmp(t, compressed, sizeof t) == 0) == (k == 0) &&
                       t[24] < plain[24],
                   "round %d, beta_slow %d", round, 1 + k);
        }
        float again[3][DSRT_NN_ROPE_PAIRS];
        REQUIRE(dsrt_nn_rope_freqs(10000, NULL, again[0]) == 0 && dsrt_nn_rope_freqs(160000, &FLASH_YARN, again[1]) == 0 &&
                dsrt_nn_rope_freqs(160000, NULL, again[2]) == 0);
        CHECK(memcmp(again[0], window, sizeof window) == 0 && memcmp(again[1], compressed, sizeof compressed) == 0 &&
              memcmp(again[2], plain, sizeof plain) == 0);
    }
    dsrt_yarn bad = FLASH_YARN;
    bad.factor = 0;
    CHECK_ERROR(dsrt_nn_rope_freqs(160000, &bad, plain), "nn.rope_freqs:", "factor");
    CHECK_ERROR(dsrt_nn_rope_freqs(1, NULL, plain), "nn.rope_freqs: theta", NULL);
}

/* the rotation in double on fp32 angles, as the reference computes them (the angle itself is one
 * fp32 product: matching the reference means reproducing it, not using double) */
static void rope_double(const double *x, const int64_t *pos, int64_t S, int64_t H, int64_t w, const float *freqs,
                        int inverse, double *y)
{
    int64_t kept = w - DSRT_NN_ROPE_DIMS;
    for (int64_t t = 0; t < S; t++)
        for (int64_t h = 0; h < H; h++) {
            const double *v = x + (t * H + h) * w;
            double *o = y + (t * H + h) * w;
            for (int64_t c = 0; c < kept; c++) o[c] = v[c];
            for (int i = 0; i < DSRT_NN_ROPE_PAIRS; i++) {
                double angle = (float)pos[t] * freqs[i], c = cos(angle), s = inverse ? -sin(angle) : sin(angle);
                double a = v[kept + 2 * i], b = v[kept + 2 * i + 1];
                o[kept + 2 * i] = a * c - b * s;
                o[kept + 2 * i + 1] = a * s + b * c;
            }
        }
}

TEST(nn_rope_known_vector)
{
    /* unit pairs (1, 0) rotate to (cos θ_i, sin θ_i); the 6 leading dims are copied */
    int64_t shape[2] = {2, 70}, pshape[1] = {2};
    double x[140], pos[2] = {0, 12345};
    for (int t = 0; t < 2; t++)
        for (int c = 0; c < 70; c++) x[t * 70 + c] = c < 6 ? c + 0.5 : (c - 6) % 2 == 0 ? 1 : 0;
    dsrt_tensor *xt = from_values(DSRT_F32, 2, shape, x), *pt = from_values(DSRT_I32, 1, pshape, pos);
    REQUIRE(xt && pt);
    float freqs[DSRT_NN_ROPE_PAIRS];
    REQUIRE(dsrt_nn_rope_freqs(160000, &FLASH_YARN, freqs) == 0);
    for (int inverse = 0; inverse < 2; inverse++) {
        dsrt_tensor *y = dsrt_nn_rope(xt, pt, 160000, &FLASH_YARN, inverse, FP32, CPU);
        REQUIRE(y && y->dtype == DSRT_F32 && shape_is(y, 2, shape));
        double *got = values(y);
        for (int c = 0; c < 6; c++) CHECK(got[c] == c + 0.5 && got[70 + c] == c + 0.5);
        for (int i = 0; i < DSRT_NN_ROPE_PAIRS; i++) {
            CHECK(got[6 + 2 * i] == 1 && got[6 + 2 * i + 1] == 0); /* position 0 */
            double angle = (float)12345 * freqs[i], sign = inverse ? -1 : 1;
            CHECKF(fabs(got[76 + 2 * i] - cos(angle)) <= 2e-7 && fabs(got[77 + 2 * i] - sign * sin(angle)) <= 2e-7,
                   "i = %d: (%.9f, %.9f) vs (%.9f, %.9f)", i, got[76 + 2 * i], got[77 + 2 * i], cos(angle), sign * sin(angle));
        }
        free(got);
        dsrt_tensor_release(y);
    }
    dsrt_tensor_release(xt);
    dsrt_tensor_release(pt);
}

TEST(nn_rope_vs_double_and_inverse)
{
    enum { S = 5, H = 3, W = 70 };
    int64_t shape[3] = {S, H, W}, pshape[1] = {S};
    double pos_v[S] = {0, 1, 127, 4099, 999999};
    int64_t pos[S] = {0, 1, 127, 4099, 999999};
    dsrt_tensor *x = randn(DSRT_BF16, 3, shape, 1.0), *pt = from_values(DSRT_I64, 1, pshape, pos_v);
    REQUIRE(x && pt);
    float freqs[DSRT_NN_ROPE_PAIRS];
    REQUIRE(dsrt_nn_rope_freqs(10000, NULL, freqs) == 0);
    double *xv = values(x), want[S * H * W];
    rope_double(xv, pos, S, H, W, freqs, 0, want);
    for (int p = 0; p < 2; p++) {
        dsrt_precision prec = p ? REF : FP32;
        dsrt_tensor *y = dsrt_nn_rope(x, pt, 10000, NULL, 0, prec, CPU);
        REQUIRE(y && y->dtype == (p ? DSRT_BF16 : DSRT_F32));
        dsrt_tensor *back = dsrt_nn_rope(y, pt, 10000, NULL, 1, prec, CPU);
        REQUIRE(back);
        double *got = values(y), *round_trip = values(back);
        int bad = 0, bad_inverse = 0;
        for (int i = 0; i < S * H * W; i++) {
            double tol = p ? bf16_ulp(want[i]) : 1e-6 * (fabs(xv[i]) + 1);
            bad += !(fabs(got[i] - want[i]) <= tol);
            /* inverse ∘ forward = identity, up to the roundings of the two steps */
            bad_inverse += !(fabs(round_trip[i] - xv[i]) <= (p ? 2 * bf16_ulp(xv[i]) + 1e-2 : 1e-5));
        }
        CHECKF(bad == 0, "%s: %d values off the double rotation", p ? "reference" : "fp32", bad);
        CHECKF(bad_inverse == 0, "%s: %d values not restored by the inverse", p ? "reference" : "fp32", bad_inverse);
        free(got);
        free(round_trip);
        dsrt_tensor_release(y);
        dsrt_tensor_release(back);
    }
    free(xv);
    dsrt_tensor_release(x);
    dsrt_tensor_release(pt);
}

/* ---- Hadamard (SPEC §3.7) ---- */

TEST(nn_hadamard128)
{
    enum { N = DSRT_NN_HADAMARD_DIM };
    int64_t shape[2] = {N, N};
    double *eye = calloc(N * N, sizeof *eye);
    for (int i = 0; i < N; i++) eye[i * N + i] = 1;
    dsrt_tensor *I = from_values(DSRT_F32, 2, shape, eye);
    REQUIRE(I);
    /* row i of H·I / sqrt(128) is column i of the Sylvester matrix, (-1)^popcount(i & j), times
     * fp32(128^-0.5) exactly: the butterflies of a unit vector are exact */
    dsrt_tensor *H = dsrt_nn_hadamard128(I, FP32, CPU);
    REQUIRE(H && H->dtype == DSRT_F32);
    double *h = values(H), scale = (float)(1 / sqrt(N));
    int bad = 0;
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) bad += h[i * N + j] != (__builtin_popcount(i & j) % 2 ? -scale : scale);
    CHECKF(bad == 0, "%d entries differ from the Sylvester order", bad);
    /* H·H = I (orthonormal and symmetric) */
    dsrt_tensor *HH = dsrt_nn_hadamard128(H, FP32, CPU);
    REQUIRE(HH);
    double *hh = values(HH);
    bad = 0;
    for (int i = 0; i < N * N; i++) bad += fabs(hh[i] - eye[i]) > 1e-6;
    CHECKF(bad == 0, "H·H differs from I in %d entries", bad);
    /* a known vector: all ones -> sqrt(128) e_0 */
    int64_t one_shape[1] = {N};
    double ones[N];
    for (int i = 0; i < N; i++) ones[i] = 1;
    dsrt_tensor *o = from_values(DSRT_BF16, 1, one_shape, ones), *ho = o ? dsrt_nn_hadamard128(o, REF, CPU) : NULL;
    REQUIRE(ho && ho->dtype == DSRT_BF16);
    double *hv = values(ho);
    CHECK(hv[0] == bf16(sqrt(N)));
    for (int i = 1; i < N; i++) CHECK(hv[i] == 0);
    /* random bf16 rows, reference mode: the double product, rounded once to bf16 */
    int64_t rshape[3] = {3, 5, N};
    dsrt_tensor *x = randn(DSRT_BF16, 3, rshape, 1.0), *y = x ? dsrt_nn_hadamard128(x, REF, CPU) : NULL;
    REQUIRE(y);
    double *xv = values(x), *yv = values(y);
    bad = 0;
    for (int r = 0; r < 15; r++)
        for (int j = 0; j < N; j++) {
            double want = 0;
            for (int k = 0; k < N; k++) want += xv[r * N + k] * h[k * N + j]; /* H is symmetric */
            bad += fabs(yv[r * N + j] - want) > bf16_ulp(want) + 1e-6;
        }
    CHECKF(bad == 0, "%d values off", bad);
    free(eye);
    free(h);
    free(hh);
    free(hv);
    free(xv);
    free(yv);
    dsrt_tensor_release(I);
    dsrt_tensor_release(H);
    dsrt_tensor_release(HH);
    dsrt_tensor_release(o);
    dsrt_tensor_release(ho);
    dsrt_tensor_release(x);
    dsrt_tensor_release(y);
}

/* ---- sparse attention (SPEC §3.8) ---- */

/* SPEC §3.8 in double, walking the index list in blocks of `block` with a running max; round_p
 * rounds each probability to bf16 before P·V. block >= K gives the global-max formula. */
static void attention_double(const double *q, const double *pool, const int64_t *idx, const double *sink, double scale,
                             int64_t S, int64_t H, int64_t D, int64_t K, int64_t block, int round_p, double *o)
{
    for (int64_t t = 0; t < S; t++)
        for (int64_t h = 0; h < H; h++) {
            const double *qv = q + (t * H + h) * D;
            double *ov = o + (t * H + h) * D, m = -INFINITY, den = 0;
            for (int64_t c = 0; c < D; c++) ov[c] = 0;
            for (int64_t b0 = 0; b0 < K; b0 += block) {
                const int64_t *bi = idx + t * K + b0;
                int64_t n = K - b0 < block ? K - b0 : block;
                double m_new = m;
                for (int64_t j = 0; j < n; j++) {
                    if (bi[j] < 0) continue;
                    double dot = 0;
                    for (int64_t c = 0; c < D; c++) dot += qv[c] * pool[bi[j] * D + c];
                    m_new = fmax(m_new, (float)dot * scale);
                }
                if (m_new == -INFINITY) continue;
                double alpha = exp(m - m_new);
                den *= alpha;
                for (int64_t c = 0; c < D; c++) ov[c] *= alpha;
                for (int64_t j = 0; j < n; j++) {
                    if (bi[j] < 0) continue;
                    double dot = 0;
                    for (int64_t c = 0; c < D; c++) dot += qv[c] * pool[bi[j] * D + c];
                    double p = exp((float)dot * scale - m_new);
                    den += p;
                    for (int64_t c = 0; c < D; c++) ov[c] += (round_p ? bf16(p) : p) * pool[bi[j] * D + c];
                }
                m = m_new;
            }
            if (m == -INFINITY) continue;
            den += exp(sink[h] - m);
            for (int64_t c = 0; c < D; c++) ov[c] /= den;
        }
}

TEST(nn_sparse_attention_vs_double)
{
    enum { S = 6, H = 3, D = 37, N = 29, K = 150 };
    int64_t qshape[3] = {S, H, D}, pshape[2] = {N, D}, ishape[2] = {S, K}, sshape[1] = {H};
    dsrt_tensor *q = randn(DSRT_BF16, 3, qshape, 1.0), *pool = randn(DSRT_BF16, 2, pshape, 1.0);
    dsrt_tensor *sink = randn(DSRT_F32, 1, sshape, 1.0);
    REQUIRE(q && pool && sink);
    double idx_v[S * K];
    int64_t idx[S * K];
    uint64_t seed = next_seed++;
    for (int i = 0; i < S * K; i++) {
        int64_t t = i / K, j = i % K, r = (int64_t)(dsrt_rand_uniform(seed, (uint64_t)i) * (N + 8)) - 8;
        if (t == 2) r = -1;          /* a row without any valid index: zeros */
        if (t == 3 && j < 70) r = -1; /* the first block wholly unused, then valid entries */
        idx[i] = r < 0 ? -1 : r;
        idx_v[i] = (double)idx[i];
    }
    dsrt_tensor *it64 = from_values(DSRT_I64, 2, ishape, idx_v), *it32 = from_values(DSRT_I32, 2, ishape, idx_v);
    REQUIRE(it64 && it32);
    double *qv = values(q), *pv = values(pool), *sv = values(sink);
    double scale = (float)(1 / sqrt(D)), global[S * H * D], online_rounded[S * H * D];
    attention_double(qv, pv, idx, sv, scale, S, H, D, K, K, 0, global);
    attention_double(qv, pv, idx, sv, scale, S, H, D, K, DSRT_NN_ATTENTION_BLOCK, 1, online_rounded);
    double top = max_abs(global, S * H * D);
    for (int p = 0; p < 2; p++)
        for (int wide = 0; wide < 2; wide++) {
            dsrt_tensor *o = dsrt_nn_sparse_attention(q, pool, wide ? it64 : it32, sink, (float)scale, p ? REF : FP32, CPU);
            REQUIRE(o && shape_is(o, 3, qshape) && o->dtype == (p ? DSRT_BF16 : DSRT_F32));
            double *ov = values(o);
            int bad = 0;
            for (int i = 0; i < S * H * D; i++) {
                double want = p ? online_rounded[i] : global[i];
                double tol = p ? bf16_ulp(want) + ldexp(top, -9) : 1e-5 * top;
                bad += !(fabs(ov[i] - want) <= tol);
                if (i / (H * D) == 2) bad += ov[i] != 0;
            }
            CHECKF(bad == 0, "%s, i%d indices: %d values off", p ? "reference" : "fp32", wide ? 64 : 32, bad);
            free(ov);
            dsrt_tensor_release(o);
        }
    free(qv);
    free(pv);
    free(sv);
    dsrt_tensor_release(q);
    dsrt_tensor_release(pool);
    dsrt_tensor_release(sink);
    dsrt_tensor_release(it64);
    dsrt_tensor_release(it32);
}

/* bf16 rounding that a relative error of 1e-5 (float vs double arithmetic) cannot flip */
static int rounds_robustly(double v) { return bf16(v * (1 + 1e-5)) == bf16(v * (1 - 1e-5)); }

/* Attention of one query over two pool rows, key 0 = zeros (score 0) and key 1 = all v (score a·v
 * for q = a·e_0), placed at index-list positions pos0 and pos1 of K, with a negligible sink. */
static double two_keys(double a, double v, int64_t pos0, int64_t pos1, int64_t K, dsrt_precision prec)
{
    enum { D = 8 };
    int64_t qshape[3] = {1, 1, D}, pshape[2] = {2, D}, ishape[2] = {1, K}, sshape[1] = {1};
    double qv[D] = {a}, pv[2 * D], sv[1] = {-1000}, iv[256];
    for (int c = 0; c < D; c++) pv[c] = 0, pv[D + c] = v;
    for (int64_t j = 0; j < K; j++) iv[j] = j == pos0 ? 0 : j == pos1 ? 1 : -1;
    dsrt_tensor *q = from_values(DSRT_BF16, 3, qshape, qv), *pool = from_values(DSRT_BF16, 2, pshape, pv);
    dsrt_tensor *idx = from_values(DSRT_I64, 2, ishape, iv), *sink = from_values(DSRT_F32, 1, sshape, sv);
    dsrt_tensor *o = dsrt_nn_sparse_attention(q, pool, idx, sink, 1.0f, prec, CPU);
    double r = o ? dsrt_load_f32(o->storage->data, o->dtype, D - 1) : NAN;
    dsrt_tensor_release(q);
    dsrt_tensor_release(pool);
    dsrt_tensor_release(idx);
    dsrt_tensor_release(sink);
    dsrt_tensor_release(o);
    return r;
}

TEST(nn_sparse_attention_rounding_points)
{
    /* o = P(p)·v / (1 + p) with p = e^(a·v): find a score whose bf16 rounding of p shows in the bf16
     * output, then check reference mode rounds p there and fp32 mode does not */
    int found = 0;
    for (int k = 1; k < 200 && !found; k++) {
        double a = bf16(-0.01 * k), v = 1, p = exp((float)(a * v));
        double rounded = bf16(bf16(p) * v / (1 + p)), plain = bf16(p * v / (1 + p));
        if (rounded == plain || !rounds_robustly(p) || !rounds_robustly(bf16(p) * v / (1 + p)) ||
            !rounds_robustly(p * v / (1 + p)))
            continue;
        found = 1;
        CHECKF(two_keys(a, v, 0, 1, 2, REF) == rounded, "a = %g: %.9g, want %.9g", a, two_keys(a, v, 0, 1, 2, REF), rounded);
        CHECKF(fabs(two_keys(a, v, 0, 1, 2, FP32) - p * v / (1 + p)) < 1e-6, "a = %g", a);
    }
    CHECK(found);
    /* the running max: key 1 (score a·v < 0) in the first block of 64, key 0 (score 0, the max) in
     * the second. The kernel rounds key 1's probability against the first block's max (it is 1
     * there, exactly), then rescales it by e^(a·v) in fp32: no bf16 error. The global formula
     * would round e^(a·v). */
    found = 0;
    for (int k = 1; k < 200 && !found; k++) {
        double a = bf16(0.01 * k), v = -1, p = exp((float)(a * v));
        double online = bf16(p * v / (1 + p)), global = bf16(bf16(p) * v / (1 + p));
        if (online == global || !rounds_robustly(p) || !rounds_robustly(p * v / (1 + p)) ||
            !rounds_robustly(bf16(p) * v / (1 + p)))
            continue;
        found = 1;
        CHECKF(two_keys(a, v, 70, 5, 100, REF) == online, "a = %g: %.9g, want %.9g", a, two_keys(a, v, 70, 5, 100, REF),
               online);
        CHECKF(two_keys(a, v, 5, 70, 100, REF) == global, "a = %g: key order inside one max", a);
    }
    CHECK(found);
}

TEST(nn_sparse_attention_errors)
{
    int64_t qshape[3] = {2, 3, 5}, pshape[2] = {4, 5}, bad_pshape[2] = {4, 6}, ishape[2] = {2, 3}, sshape[1] = {3};
    double iv[6] = {0, 1, -1, 3, 4, 2};
    dsrt_tensor *q = randn(DSRT_BF16, 3, qshape, 1), *pool = randn(DSRT_BF16, 2, pshape, 1);
    dsrt_tensor *wide = randn(DSRT_BF16, 2, bad_pshape, 1), *sink = randn(DSRT_F32, 1, sshape, 1);
    dsrt_tensor *idx = from_values(DSRT_I64, 2, ishape, iv), *fidx = from_values(DSRT_F32, 2, ishape, iv);
    REQUIRE(q && pool && wide && sink && idx && fidx);
    CHECK_ERROR(!dsrt_nn_sparse_attention(q, pool, idx, sink, 1, REF, CPU), "indices[1, 1] = 4 is not a row of pool",
                "bf16[4, 5]");
    CHECK_ERROR(!dsrt_nn_sparse_attention(q, wide, idx, sink, 1, REF, CPU), "nn.sparse_attention: pool is bf16[4, 6]",
                "expected shape [*, 5]");
    CHECK_ERROR(!dsrt_nn_sparse_attention(q, pool, fidx, sink, 1, REF, CPU), "indices is f32[2, 3]", "i32 or i64");
    CHECK_ERROR(!dsrt_nn_sparse_attention(q, pool, idx, pool, 1, REF, CPU), "sink is bf16[4, 5]", "expected shape [3]");
    dsrt_tensor_release(q);
    dsrt_tensor_release(pool);
    dsrt_tensor_release(wide);
    dsrt_tensor_release(sink);
    dsrt_tensor_release(idx);
    dsrt_tensor_release(fidx);
}

/* ---- norms (SPEC §3.1-3.2) ---- */

TEST(nn_rms_norm_vs_double)
{
    enum { R = 7, Dm = 37 };
    int64_t shape[2] = {Dm, R}, wshape[1] = {Dm};
    dsrt_tensor *xt = randn(DSRT_BF16, 2, shape, 2.0), *w = randn(DSRT_BF16, 1, wshape, 1.0);
    REQUIRE(xt && w);
    dsrt_tensor *x = dsrt_tensor_transpose(xt, 0, 1); /* [R, Dm], strided */
    double *xv = values(x), *wv = values(w);
    for (int weighted = 0; weighted < 2; weighted++)
        for (int p = 0; p < 2; p++) {
            dsrt_tensor *y = dsrt_nn_rms_norm(x, weighted ? w : NULL, 1e-6f, p ? REF : FP32, CPU);
            REQUIRE(y && y->dtype == (p ? DSRT_BF16 : DSRT_F32) && shape_is(y, 2, x->shape));
            double *yv = values(y);
            int bad = 0;
            for (int r = 0; r < R; r++) {
                double ms = 0;
                for (int j = 0; j < Dm; j++) ms += xv[r * Dm + j] * xv[r * Dm + j];
                double inv = 1 / sqrt(ms / Dm + (float)1e-6);
                for (int j = 0; j < Dm; j++) {
                    double want = xv[r * Dm + j] * inv * (weighted ? wv[j] : 1);
                    bad += !(fabs(yv[r * Dm + j] - want) <= (p ? bf16_ulp(want) : 1e-6 * (fabs(want) + 1e-3)));
                }
            }
            CHECKF(bad == 0, "%s, weighted %d: %d values off", p ? "reference" : "fp32", weighted, bad);
            free(yv);
            dsrt_tensor_release(y);
        }
    CHECK_ERROR(!dsrt_nn_rms_norm(xt, w, 1e-6f, REF, CPU), "nn.rms_norm: weight is bf16[37]", "expected shape [7]");
    free(xv);
    free(wv);
    dsrt_tensor_release(x);
    dsrt_tensor_release(xt);
    dsrt_tensor_release(w);
}

/* head_rms_norm of random bf16 q of standard deviation `std`: reference mode against the bf16
 * evaluation written out in double, fp32 mode against the plain formula */
static void check_head_norm(double std)
{
    enum { S = 3, H = 5, Dh = 67 };
    int64_t shape[3] = {S, H, Dh};
    dsrt_tensor *q = randn(DSRT_BF16, 3, shape, std);
    REQUIRE(q);
    dsrt_tensor *ref = dsrt_nn_head_rms_norm(q, 1e-6f, REF, CPU), *f = dsrt_nn_head_rms_norm(q, 1e-6f, FP32, CPU);
    REQUIRE(ref && f && ref->dtype == DSRT_BF16 && f->dtype == DSRT_F32);
    double *qv = values(q), *rv = values(ref), *fv = values(f);
    int bad_ref = 0, bad_fp32 = 0, differs_from_one_rounding = 0;
    for (int r = 0; r < S * H; r++) {
        const double *x = qv + r * Dh;
        double ms = 0, ms_bf16 = 0;
        for (int j = 0; j < Dh; j++) {
            ms += x[j] * x[j];
            ms_bf16 += bf16(x[j] * x[j]); /* q.square() in bf16 */
        }
        /* mean, + eps, rsqrt and the product each rounded to bf16 (nn.h) */
        double inv_bf16 = bf16(1 / sqrt(bf16(bf16((float)(ms_bf16 / Dh)) + (float)1e-6)));
        double inv = 1 / sqrt(ms / Dh + (float)1e-6);
        for (int j = 0; j < Dh; j++) {
            bad_ref += rv[r * Dh + j] != bf16(x[j] * inv_bf16);
            bad_fp32 += !(fabs(fv[r * Dh + j] - x[j] * inv) <= 1e-6 * fabs(x[j] * inv) + 1e-7);
            differs_from_one_rounding += rv[r * Dh + j] != bf16(x[j] * inv);
        }
    }
    CHECKF(bad_ref == 0, "std %g: %d reference values differ from the bf16 evaluation", std, bad_ref);
    CHECKF(bad_fp32 == 0, "std %g: %d fp32 values off", std, bad_fp32);
    CHECKF(differs_from_one_rounding > 0, "std %g: the bf16 arithmetic never showed (suspicious)", std);
    free(qv);
    free(rv);
    free(fv);
    dsrt_tensor_release(q);
    dsrt_tensor_release(ref);
    dsrt_tensor_release(f);
}

TEST(nn_head_rms_norm_bf16_arithmetic)
{
    check_head_norm(3.0);  /* the squares and their mean round visibly */
    check_head_norm(1e-3); /* mean(q²) ~ 1e-6: the rounding of + eps shows too */
}

/* ---- hyper-connections (SPEC §3.9, §4, §5) ---- */

static double sigmoid_d(double x) { return 1 / (1 + exp(-x)); }

/* hc_split_sinkhorn in double, from SPEC §3.9 */
static void sinkhorn_double(const double *mix, const double *scale, const double *base, int hc, int iters, double eps,
                            double *pre, double *post, double *comb)
{
    for (int j = 0; j < hc; j++) {
        pre[j] = sigmoid_d(mix[j] * scale[0] + base[j]) + eps;
        post[j] = 2 * sigmoid_d(mix[hc + j] * scale[1] + base[hc + j]);
    }
    for (int j = 0; j < hc; j++) {
        double mx = -INFINITY, sum = 0;
        for (int k = 0; k < hc; k++) mx = fmax(mx, mix[2 * hc + j * hc + k] * scale[2] + base[2 * hc + j * hc + k]);
        for (int k = 0; k < hc; k++) {
            comb[j * hc + k] = exp(mix[2 * hc + j * hc + k] * scale[2] + base[2 * hc + j * hc + k] - mx);
            sum += comb[j * hc + k];
        }
        for (int k = 0; k < hc; k++) comb[j * hc + k] = comb[j * hc + k] / sum + eps;
    }
    for (int it = 0; it < 2 * iters - 1; it++) {
        int by_column = it % 2 == 0; /* column, then (row, column) × (iters − 1) */
        for (int a = 0; a < hc; a++) {
            double sum = 0;
            double *line = by_column ? comb + a : comb + a * hc; /* column a or row a */
            int step = by_column ? hc : 1;
            for (int b = 0; b < hc; b++) sum += line[b * step];
            for (int b = 0; b < hc; b++) line[b * step] /= sum + eps;
        }
    }
}

TEST(nn_sinkhorn_vs_double)
{
    /* hc, iters, and the comb logits' scale: a peaked softmax (scale 8) converges slowly, so every
     * normalisation more or less shows; with iters 1 the result is softmax + eps, columns normalised */
    const struct { int hc, iters; double comb_scale; } cases[] = {{4, 20, 1}, {3, 20, 1}, {4, 20, 8}, {4, 2, 8}, {4, 1, 1}};
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        int hc = cases[ci].hc, iters = cases[ci].iters, M = (2 + hc) * hc;
        enum { T = 7 };
        int64_t mshape[2] = {T, M}, sshape[1] = {3}, bshape[1] = {M};
        double scale_v[3] = {0.7, -1.3, cases[ci].comb_scale};
        dsrt_tensor *mixes = randn(DSRT_F32, 2, mshape, 2.0), *scale = from_values(DSRT_F32, 1, sshape, scale_v);
        dsrt_tensor *base = randn(DSRT_F32, 1, bshape, 1.0), *pre, *post, *comb;
        REQUIRE(mixes && scale && base);
        REQUIRE(dsrt_nn_sinkhorn(mixes, scale, base, hc, iters, 1e-6f, CPU, &pre, &post, &comb) == 0);
        int64_t vshape[2] = {T, hc}, cshape[3] = {T, hc, hc};
        CHECK(shape_is(pre, 2, vshape) && shape_is(post, 2, vshape) && shape_is(comb, 3, cshape));
        CHECK(pre->dtype == DSRT_F32 && post->dtype == DSRT_F32 && comb->dtype == DSRT_F32);
        double *mv = values(mixes), *sv = values(scale), *bv = values(base);
        double *pg = values(pre), *qg = values(post), *cg = values(comb);
        int bad = 0, bad_columns = 0;
        double worst_row = 0;
        for (int t = 0; t < T; t++) {
            double pw[8], qw[8], cw[64];
            sinkhorn_double(mv + t * M, sv, bv, hc, iters, (float)1e-6, pw, qw, cw);
            for (int j = 0; j < hc; j++) {
                bad += !(fabs(pg[t * hc + j] - pw[j]) <= 1e-6) + !(fabs(qg[t * hc + j] - qw[j]) <= 2e-6);
                bad += !(pg[t * hc + j] > 1e-6 && pg[t * hc + j] <= 1 + 1e-6 && qg[t * hc + j] >= 0 && qg[t * hc + j] <= 2);
            }
            for (int i = 0; i < hc * hc; i++) bad += !(fabs(cg[t * hc * hc + i] - cw[i]) <= 1e-6);
            /* the last step normalises columns: they sum to S/(S + eps), 1 up to eps over the sum S
             * before it; rows only approach 1, as fast as the softmax is flat */
            for (int a = 0; a < hc; a++) {
                double col = 0, row = 0;
                for (int b = 0; b < hc; b++) col += cg[t * hc * hc + b * hc + a], row += cg[t * hc * hc + a * hc + b];
                bad_columns += !(col <= 1 + 1e-6 && col >= 1 - 1e-4);
                worst_row = fmax(worst_row, fabs(row - 1));
            }
        }
        CHECKF(bad == 0, "hc %d, iters %d: %d values off the double Sinkhorn", hc, iters, bad);
        CHECKF(bad_columns == 0, "hc %d, iters %d: %d column sums off 1", hc, iters, bad_columns);
        if (iters == 20 && cases[ci].comb_scale == 1) CHECKF(worst_row < 5e-2, "hc %d: a row sums to 1 ± %g", hc, worst_row);
        free(mv), free(sv), free(bv), free(pg), free(qg), free(cg);
        dsrt_tensor_release(mixes), dsrt_tensor_release(scale), dsrt_tensor_release(base);
        dsrt_tensor_release(pre), dsrt_tensor_release(post), dsrt_tensor_release(comb);
    }
}

/* (fn·x)·rsqrt(mean(x²) + eps) in double for one token's flattened streams x [K] */
static void mixes_double(const double *fn, const double *x, int64_t rows, int64_t K, double norm_eps, double *mixes)
{
    double ms = 0;
    for (int64_t k = 0; k < K; k++) ms += x[k] * x[k];
    double rho = 1 / sqrt(ms / K + norm_eps);
    for (int64_t i = 0; i < rows; i++) {
        double dot = 0;
        for (int64_t k = 0; k < K; k++) dot += fn[i * K + k] * x[k];
        mixes[i] = dot * rho;
    }
}

TEST(nn_hc_pre_post_head_vs_double)
{
    enum { T = 5, HC = 4, Dm = 37, M = (2 + HC) * HC, ITERS = 20 };
    const float eps = 1e-6f;
    int64_t xshape[3] = {T, HC, Dm}, fnshape[2] = {M, HC * Dm}, three[1] = {3}, mshape[1] = {M};
    int64_t hfnshape[2] = {HC, HC * Dm}, one[1] = {1}, hcshape[1] = {HC}, ushape[2] = {T, Dm};
    dsrt_tensor *X = randn(DSRT_BF16, 3, xshape, 1.0), *fn = randn(DSRT_F32, 2, fnshape, 0.1);
    dsrt_tensor *scale = randn(DSRT_F32, 1, three, 1.0), *base = randn(DSRT_F32, 1, mshape, 1.0);
    dsrt_tensor *hfn = randn(DSRT_F32, 2, hfnshape, 0.1), *hscale = randn(DSRT_F32, 1, one, 1.0);
    dsrt_tensor *hbase = randn(DSRT_F32, 1, hcshape, 1.0), *f = randn(DSRT_BF16, 2, ushape, 1.0);
    REQUIRE(X && fn && scale && base && hfn && hscale && hbase && f);
    double *xv = values(X), *fnv = values(fn), *sv = values(scale), *bv = values(base);
    double *hfnv = values(hfn), *hsv = values(hscale), *hbv = values(hbase), *fv = values(f);
    /* the double model: u, post, comb of hc_pre; y of hc_head (and the sums of the magnitudes of
     * their terms, which bound the fp32 rounding of a sum with cancellation) */
    double u[T * Dm], u_mag[T * Dm], post[T * HC], comb[T * HC * HC], y[T * Dm], y_mag[T * Dm];
    for (int t = 0; t < T; t++) {
        const double *xt = xv + t * HC * Dm;
        double mixes[M], pre[HC], head_mix[HC];
        mixes_double(fnv, xt, M, HC * Dm, eps, mixes);
        sinkhorn_double(mixes, sv, bv, HC, ITERS, eps, pre, post + t * HC, comb + t * HC * HC);
        mixes_double(hfnv, xt, HC, HC * Dm, eps, head_mix);
        for (int c = 0; c < Dm; c++) {
            int i = t * Dm + c;
            u[i] = u_mag[i] = y[i] = y_mag[i] = 0;
            for (int s = 0; s < HC; s++) {
                double w = sigmoid_d(head_mix[s] * hsv[0] + hbv[s]) + eps;
                u[i] += pre[s] * xt[s * Dm + c];
                u_mag[i] += fabs(pre[s] * xt[s * Dm + c]);
                y[i] += w * xt[s * Dm + c];
                y_mag[i] += fabs(w * xt[s * Dm + c]);
            }
        }
    }
    for (int p = 0; p < 2; p++) {
        dsrt_precision prec = p ? REF : FP32;
        dsrt_tensor *ut, *pt, *ct;
        REQUIRE(dsrt_nn_hc_pre(X, fn, scale, base, eps, eps, ITERS, NULL, prec, CPU, &ut, &pt, &ct) == 0);
        CHECK(shape_is(ut, 2, ushape) && ut->dtype == (p ? DSRT_BF16 : DSRT_F32) && pt->dtype == DSRT_F32);
        double *ug = values(ut), *pg = values(pt), *cg = values(ct);
        int bad = 0;
        for (int i = 0; i < T * Dm; i++) bad += !(fabs(ug[i] - u[i]) <= (p ? bf16_ulp(u[i]) : 0) + 1.5e-6 * u_mag[i]);
        for (int i = 0; i < T * HC; i++) bad += !(fabs(pg[i] - post[i]) <= 1e-5);
        for (int i = 0; i < T * HC * HC; i++) bad += !(fabs(cg[i] - comb[i]) <= 1e-5);
        CHECKF(bad == 0, "hc_pre %s: %d values off", p ? "reference" : "fp32", bad);

        /* hc_post on the double post/comb's f32 twins (the ones hc_pre returned) */
        dsrt_tensor *Xt = dsrt_nn_hc_post(f, X, pt, ct, prec, CPU);
        REQUIRE(Xt && shape_is(Xt, 3, xshape));
        double *xg = values(Xt);
        bad = 0;
        for (int t = 0; t < T; t++)
            for (int k = 0; k < HC; k++)
                for (int c = 0; c < Dm; c++) {
                    double want = pg[t * HC + k] * fv[t * Dm + c], mag = fabs(want);
                    for (int j = 0; j < HC; j++) {
                        want += cg[(t * HC + j) * HC + k] * xv[(t * HC + j) * Dm + c];
                        mag += fabs(cg[(t * HC + j) * HC + k] * xv[(t * HC + j) * Dm + c]);
                    }
                    double got = xg[(t * HC + k) * Dm + c];
                    bad += !(fabs(got - want) <= (p ? bf16_ulp(want) : 0) + 1e-6 * mag);
                }
        CHECKF(bad == 0, "hc_post %s: %d values off", p ? "reference" : "fp32", bad);

        dsrt_tensor *yt = dsrt_nn_hc_head(X, hfn, hscale, hbase, eps, eps, NULL, prec, CPU);
        REQUIRE(yt && shape_is(yt, 2, ushape));
        double *yg = values(yt);
        bad = 0;
        for (int i = 0; i < T * Dm; i++) bad += !(fabs(yg[i] - y[i]) <= (p ? bf16_ulp(y[i]) : 0) + 1.5e-6 * y_mag[i]);
        CHECKF(bad == 0, "hc_head %s: %d values off", p ? "reference" : "fp32", bad);
        free(ug), free(pg), free(cg), free(xg), free(yg);
        dsrt_tensor_release(ut), dsrt_tensor_release(pt), dsrt_tensor_release(ct);
        dsrt_tensor_release(Xt), dsrt_tensor_release(yt);
    }
    dsrt_tensor *no_u, *no_post, *no_comb;
    CHECK_ERROR(dsrt_nn_hc_pre(X, hfn, scale, base, eps, eps, ITERS, NULL, REF, CPU, &no_u, &no_post, &no_comb),
                "nn.hc_pre: fn is f32[4, 148]", "expected shape [24, 148]");
    CHECK(!no_u && !no_post && !no_comb);
    CHECK_ERROR(!dsrt_nn_hc_head(X, fn, hscale, hbase, eps, eps, NULL, REF, CPU), "nn.hc_head: fn is f32[24, 148]",
                "expected shape [4, 148]");
    CHECK_ERROR(!dsrt_nn_hc_post(f, X, hbase, X, REF, CPU), "nn.hc_post: post is f32[4]", "expected shape [5, 4]");
    free(xv), free(fnv), free(sv), free(bv), free(hfnv), free(hsv), free(hbv), free(fv);
    dsrt_tensor_release(X), dsrt_tensor_release(fn), dsrt_tensor_release(scale), dsrt_tensor_release(base);
    dsrt_tensor_release(hfn), dsrt_tensor_release(hscale), dsrt_tensor_release(hbase), dsrt_tensor_release(f);
}

TEST(nn_hc_expand)
{
    int64_t shape[2] = {3, 5}, xshape[3] = {3, 4, 5};
    dsrt_tensor *e = randn(DSRT_BF16, 2, shape, 1.0), *X = e ? dsrt_nn_hc_expand(e, 4, CPU) : NULL;
    REQUIRE(X && shape_is(X, 3, xshape) && X->dtype == DSRT_BF16);
    double *ev = values(e), *xv = values(X);
    int bad = 0;
    for (int t = 0; t < 3; t++)
        for (int s = 0; s < 4; s++)
            for (int c = 0; c < 5; c++) bad += xv[(t * 4 + s) * 5 + c] != ev[t * 5 + c];
    CHECK(bad == 0);
    CHECK_ERROR(!dsrt_nn_hc_expand(e, 0, CPU), "nn.hc_expand: hc must be at least 1", NULL);
    free(ev), free(xv);
    dsrt_tensor_release(e), dsrt_tensor_release(X);
}

TEST(nn_argument_errors)
{
    int64_t shape[2] = {3, 70}, pshape[1] = {3}, narrow_shape[2] = {3, 40};
    double neg[3] = {0, -1, 2};
    dsrt_tensor *x = randn(DSRT_BF16, 2, shape, 1), *narrow = randn(DSRT_BF16, 2, narrow_shape, 1);
    dsrt_tensor *ints = from_values(DSRT_I64, 2, shape, (double[210]){0}), *pos = from_values(DSRT_I64, 1, pshape, neg);
    REQUIRE(x && narrow && ints && pos);
    CHECK_ERROR(!dsrt_nn_rms_norm(ints, NULL, 1e-6f, REF, CPU), "nn.rms_norm: x is i64[3, 70] on cpu", "bf16 or f32");
    CHECK_ERROR(!dsrt_nn_rms_norm(x, NULL, 1e-6f, (dsrt_precision)7, CPU), "nn.rms_norm: unknown precision", NULL);
    CHECK_ERROR(!dsrt_nn_rope(narrow, pos, 10000, NULL, 0, REF, CPU), "nn.rope: x is bf16[3, 40]", "narrower");
    CHECK_ERROR(!dsrt_nn_rope(x, pos, 10000, NULL, 0, REF, CPU), "nn.rope: positions[1] = -1 is negative", NULL);
    CHECK_ERROR(!dsrt_nn_rope(x, x, 10000, NULL, 0, REF, CPU), "nn.rope: positions is bf16[3, 70]", "i32 or i64");
    CHECK_ERROR(dsrt_nn_quant_roundtrip_q8(x, 0, 0, 64, REF, CPU), "nn.quant_roundtrip_q8: block size 0", NULL);
    CHECK_ERROR(dsrt_nn_quant_roundtrip_q8(x, 64, 10, 64, REF, CPU), "columns [10, 74) are not within the 70",
                "bf16[3, 70]");
    CHECK_ERROR(!dsrt_nn_hadamard128(x, REF, CPU), "nn.hadamard128: x is bf16[3, 70]", "[..., 128]");
    dsrt_tensor *a, *b, *c;
    CHECK_ERROR(dsrt_nn_sinkhorn(x, x, x, 4, 0, 1e-6f, CPU, &a, &b, &c), "nn.sinkhorn:", NULL);
    CHECK(!a && !b && !c);
    dsrt_tensor_release(x), dsrt_tensor_release(narrow), dsrt_tensor_release(ints), dsrt_tensor_release(pos);
}
