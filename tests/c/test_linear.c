/*
 * test_linear.c - the linear layers (linear.h) against the reference's formulas written out naively
 * here in double: the blocked FP8 GEMM Σ_blocks s_x·S·(Σ_k q_x·W) over Q8(x, 128) (SPEC §3.3, §3.5)
 * with f32 and e8m0 scales, the FP4 GEMM with per-32 weight scales applied to partial sums and the
 * nibble order decoded by hand (low nibble = even column, SPEC §2.1), the bf16 linear (no activation
 * quantisation), the grouped wo_a (SPEC §6.8), both precisions, at sizes that are not multiples of
 * the 128 blocks; plus the constructor's and forward's refusals.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "check.h"
#include "err.h"
#include "linear.h"
#include "ops.h"

#define CPU dsrt_stream_default(DSRT_CPU)

static uint64_t seed_counter = 5000;

static dsrt_tensor *new_tensor(dsrt_dtype dt, int64_t rows, int64_t cols)
{
    return dsrt_tensor_new(dt, 2, (int64_t[]){rows, cols}, DSRT_CPU, CPU);
}

/* x [rows, cols] of bf16 values (as f32), row r scaled by 2^(r mod 5 - 2) so the Q8 scales differ */
static dsrt_tensor *random_input(int64_t rows, int64_t cols)
{
    dsrt_tensor *x = new_tensor(DSRT_F32, rows, cols);
    if (!x) return NULL;
    float *v = x->storage->data;
    uint64_t seed = seed_counter++;
    for (int64_t i = 0; i < rows * cols; i++)
        v[i] = dsrt_bf16_to_f32(dsrt_f32_to_bf16(ldexpf(dsrt_rand_normal(seed, (uint64_t)i), (int)(i / cols % 5) - 2)));
    return x;
}

/* e4m3 codes of N(0, 32²): most of the e4m3 range, as the checkpoint's */
static dsrt_tensor *random_e4m3(int64_t rows, int64_t cols)
{
    dsrt_tensor *w = new_tensor(DSRT_F8E4M3, rows, cols);
    if (!w) return NULL;
    uint8_t *b = w->storage->data;
    uint64_t seed = seed_counter++;
    for (int64_t i = 0; i < rows * cols; i++) b[i] = dsrt_f32_to_e4m3(32.0f * dsrt_rand_normal(seed, (uint64_t)i));
    return w;
}

/* power-of-two scales 2^(-10 .. -7) as e8m0 bytes, and the same values as f32 when f32_copy */
static dsrt_tensor *random_scales(int64_t rows, int64_t cols, dsrt_tensor **f32_copy)
{
    dsrt_tensor *s = new_tensor(DSRT_F8E8M0, rows, cols);
    if (f32_copy) *f32_copy = new_tensor(DSRT_F32, rows, cols);
    if (!s || (f32_copy && !*f32_copy)) return s;
    uint64_t seed = seed_counter++;
    for (int64_t i = 0; i < rows * cols; i++) {
        uint8_t byte = (uint8_t)(127 - 10 + (int)(4 * dsrt_rand_uniform(seed, (uint64_t)i)));
        ((uint8_t *)s->storage->data)[i] = byte;
        if (f32_copy) ((float *)(*f32_copy)->storage->data)[i] = ldexpf(1.0f, byte - 127);
    }
    return s;
}

static float value(const dsrt_tensor *t, int64_t i) { return dsrt_load_f32(t->storage->data, t->dtype, i); }

static double bf16_round(double v) { return dsrt_bf16_to_f32(dsrt_f32_to_bf16((float)v)); }

/* Q8(x row, 128) as the reference makes it: e4m3 codes (as values) and one scale per block */
static void q8_row(const float *x, int64_t n, float *code, float *scale)
{
    uint8_t bytes[DSRT_ACT_BLOCK];
    for (int64_t b = 0; b < n; b += DSRT_ACT_BLOCK) {
        int len = (int)(n - b < DSRT_ACT_BLOCK ? n - b : DSRT_ACT_BLOCK);
        scale[b / DSRT_ACT_BLOCK] = dsrt_q8_block(x + b, len, bytes);
        for (int i = 0; i < len; i++) code[b + i] = dsrt_e4m3_to_f32(bytes[i]);
    }
}

/* Counts outputs off the expected double value: bf16 outputs may differ by one bf16 rounding of a
 * value within f32 summation error of the exact one, f32 outputs by f32 summation error. */
typedef struct { int64_t bad, exact, total; } agreement;

static void compare(agreement *a, float got, double want, double magnitude, int64_t k, int bf16)
{
    double sum_error = (double)(k + 2) * 1.2e-7 * magnitude + 1e-30;
    double tol = bf16 ? ldexp(fabs(want), -8) + sum_error : sum_error;
    a->bad += !(fabs(got - want) <= tol);
    a->exact += bf16 ? got == bf16_round(want) : 1;
    a->total++;
}

static dsrt_linear *make_linear(dsrt_tensor *w, dsrt_tensor *s, dsrt_weight_format f, int64_t in, int64_t out, int64_t br,
                                int64_t bc, int groups)
{
    dsrt_linear_config c = {.format = f, .in_features = in, .out_features = out, .block_rows = br, .block_cols = bc,
                            .groups = groups, .fp32_math = 0};
    return dsrt_linear_new(w, s, &c);
}

static void check_fp8(int64_t rows, int64_t in, int64_t out)
{
    dsrt_tensor *scale_f32 = NULL;
    dsrt_tensor *x = random_input(rows, in), *w = random_e4m3(out, in);
    dsrt_tensor *s = random_scales((out + 127) / 128, (in + 127) / 128, &scale_f32);
    REQUIRE(x && w && s && scale_f32);
    dsrt_linear *l = make_linear(w, s, DSRT_FORMAT_FP8, in, out, 128, 128, 1);
    dsrt_linear *lf = make_linear(w, scale_f32, DSRT_FORMAT_FP8, in, out, 128, 128, 1);
    REQUIRE(l && lf);
    float *y = malloc(sizeof(float) * (size_t)(rows * out)), *yf = malloc(sizeof(float) * (size_t)(rows * out));
    float *y32 = malloc(sizeof(float) * (size_t)(rows * out)), *code = malloc(sizeof(float) * (size_t)in);
    float sx[16];
    const float *xv = x->storage->data;
    REQUIRE(y && yf && y32 && code);
    CHECK(dsrt_linear_rows(l, xv, rows, y, DSRT_PREC_REFERENCE, CPU) == 0);
    CHECK(dsrt_linear_rows(lf, xv, rows, yf, DSRT_PREC_REFERENCE, CPU) == 0);
    CHECK(dsrt_linear_rows(l, xv, rows, y32, DSRT_PREC_FP32, CPU) == 0);
    CHECK(memcmp(y, yf, sizeof(float) * (size_t)(rows * out)) == 0); /* f32 scales = the same powers of two */
    agreement ref = {0}, plain = {0};
    for (int64_t r = 0; r < rows; r++) {
        q8_row(xv + r * in, in, code, sx);
        for (int64_t n = 0; n < out; n++) {
            double total = 0, magnitude = 0, exact = 0, exact_magnitude = 0;
            for (int64_t kb = 0; kb * 128 < in; kb++) { /* the reference's blocked GEMM */
                double block = 0, block_magnitude = 0, sw = value(s, n / 128 * s->shape[1] + kb);
                for (int64_t k = kb * 128; k < in && k < kb * 128 + 128; k++) {
                    block += (double)code[k] * value(w, n * in + k);
                    block_magnitude += fabs((double)code[k] * value(w, n * in + k));
                    exact += (double)xv[r * in + k] * value(w, n * in + k) * sw;
                    exact_magnitude += fabs((double)xv[r * in + k] * value(w, n * in + k) * sw);
                }
                total += block * sx[kb] * sw;
                magnitude += block_magnitude * sx[kb] * sw;
            }
            compare(&ref, y[r * out + n], total, magnitude, in, 1);
            compare(&plain, y32[r * out + n], exact, exact_magnitude, in, 0);
        }
    }
    CHECKF(ref.bad == 0, "fp8 %lldx%lld -> %lld reference: %lld of %lld outputs off", (long long)rows, (long long)in,
           (long long)out, (long long)ref.bad, (long long)ref.total);
    CHECKF(ref.exact * 100 >= ref.total * 99, "only %lld of %lld outputs are the bf16 of the exact value",
           (long long)ref.exact, (long long)ref.total);
    CHECKF(plain.bad == 0, "fp8 fp32 precision: %lld of %lld outputs off", (long long)plain.bad, (long long)plain.total);
    free(y);
    free(yf);
    free(y32);
    free(code);
    dsrt_linear_release(l);
    dsrt_linear_release(lf);
    dsrt_tensor_release(x);
    dsrt_tensor_release(w);
    dsrt_tensor_release(s);
    dsrt_tensor_release(scale_f32);
}

TEST(linear_fp8_matches_blocked_reference_at_odd_sizes)
{
    check_fp8(5, 300, 133); /* 3 activation blocks (the last 44 wide), 2 row tiles */
    check_fp8(1, 128, 1);
    check_fp8(3, 37, 129);
}

static const float E2M1[8] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6};

/* the e2m1 code of weight element (n, k), decoded from the packed bytes by hand */
static float fp4_element(const uint8_t *bytes, int64_t in, int64_t n, int64_t k)
{
    uint8_t byte = bytes[(n * in + k) / 2], code = (k & 1) ? byte >> 4 : byte & 15;
    return (code & 8) ? -E2M1[code & 7] : E2M1[code & 7];
}

TEST(linear_fp4_per_32_scales_and_nibble_order)
{
    int64_t rows = 4, in = 160, out = 7; /* one full and one partial activation block, 5 weight blocks */
    dsrt_tensor *x = random_input(rows, in), *w = new_tensor(DSRT_FP4E2M1, out, in), *s = random_scales(out, in / 32, NULL);
    REQUIRE(x && w && s);
    uint8_t *bytes = w->storage->data;
    for (int64_t i = 0; i < out * in / 2; i++) bytes[i] = (uint8_t)(dsrt_rand_uniform(seed_counter, (uint64_t)i) * 256);
    seed_counter++;
    dsrt_linear *l = make_linear(w, s, DSRT_FORMAT_FP4, in, out, 1, 32, 1);
    REQUIRE(l);
    float y[28], y32[28], code[160], sx[2];
    const float *xv = x->storage->data;
    CHECK(dsrt_linear_rows(l, xv, rows, y, DSRT_PREC_REFERENCE, CPU) == 0);
    CHECK(dsrt_linear_rows(l, xv, rows, y32, DSRT_PREC_FP32, CPU) == 0);
    agreement ref = {0}, plain = {0};
    for (int64_t r = 0; r < rows; r++) {
        q8_row(xv + r * in, in, code, sx);
        for (int64_t n = 0; n < out; n++) {
            double total = 0, magnitude = 0, exact = 0, exact_magnitude = 0;
            for (int64_t kb = 0; kb * 32 < in; kb++) { /* per-32 weight scale on each partial sum */
                double part = 0, part_magnitude = 0, sw = value(s, n * (in / 32) + kb), sa = sx[kb * 32 / 128];
                for (int64_t k = kb * 32; k < kb * 32 + 32; k++) {
                    double wk = fp4_element(bytes, in, n, k);
                    part += code[k] * wk;
                    part_magnitude += fabs(code[k] * wk);
                    exact += xv[r * in + k] * wk * sw;
                    exact_magnitude += fabs(xv[r * in + k] * wk * sw);
                }
                total += part * sw * sa;
                magnitude += part_magnitude * sw * sa;
            }
            compare(&ref, y[r * out + n], total, magnitude, in, 1);
            compare(&plain, y32[r * out + n], exact, exact_magnitude, in, 0);
        }
    }
    CHECKF(ref.bad == 0 && ref.exact * 100 >= ref.total * 95, "fp4 reference: %lld off, %lld of %lld exact",
           (long long)ref.bad, (long long)ref.exact, (long long)ref.total);
    CHECKF(plain.bad == 0, "fp4 fp32 precision: %lld of %lld off", (long long)plain.bad, (long long)plain.total);

    /* byte 0x62 of row 0: column 0 (low nibble) = code 2 = 1.0, column 1 (high nibble) = code 6 = 4.0 */
    memset(bytes, 0, (size_t)(out * in / 2));
    bytes[0] = 0x62;
    memset(((uint8_t *)s->storage->data), 127, (size_t)(out * in / 32)); /* scales 1 */
    dsrt_linear *unit = make_linear(w, s, DSRT_FORMAT_FP4, in, out, 1, 32, 1);
    REQUIRE(unit);
    float e[160] = {1.0f, 0.5f}, got[7];
    CHECK(dsrt_linear_rows(unit, e, 1, got, DSRT_PREC_REFERENCE, CPU) == 0);
    CHECKF(got[0] == 1.0f * 1.0f + 0.5f * 4.0f && got[1] == 0, "got %g %g, expected 3 0", got[0], got[1]);
    dsrt_linear_release(unit);
    dsrt_linear_release(l);
    dsrt_tensor_release(x);
    dsrt_tensor_release(w);
    dsrt_tensor_release(s);
}

TEST(linear_bf16_has_no_activation_quantisation)
{
    int64_t rows = 3, in = 130, out = 9;
    dsrt_tensor *x = random_input(rows, in), *w = new_tensor(DSRT_BF16, out, in);
    REQUIRE(x && w);
    for (int64_t i = 0; i < out * in; i++)
        dsrt_store_f32(w->storage->data, DSRT_BF16, i, 0.1f * dsrt_rand_normal(seed_counter, (uint64_t)i));
    seed_counter++;
    dsrt_linear *l = make_linear(w, NULL, DSRT_FORMAT_BF16, in, out, 0, 0, 1);
    REQUIRE(l);
    float y[27], y32[27];
    const float *xv = x->storage->data;
    CHECK(dsrt_linear_rows(l, xv, rows, y, DSRT_PREC_REFERENCE, CPU) == 0);
    CHECK(dsrt_linear_rows(l, xv, rows, y32, DSRT_PREC_FP32, CPU) == 0);
    agreement ref = {0}, plain = {0};
    for (int64_t r = 0; r < rows; r++)
        for (int64_t n = 0; n < out; n++) {
            double exact = 0, magnitude = 0;
            for (int64_t k = 0; k < in; k++) {
                exact += (double)xv[r * in + k] * value(w, n * in + k);
                magnitude += fabs((double)xv[r * in + k] * value(w, n * in + k));
            }
            compare(&ref, y[r * out + n], exact, magnitude, in, 1);
            compare(&plain, y32[r * out + n], exact, magnitude, in, 0);
        }
    CHECKF(ref.bad == 0 && ref.exact * 100 >= ref.total * 95, "bf16 reference: %lld off, %lld of %lld exact",
           (long long)ref.bad, (long long)ref.exact, (long long)ref.total);
    CHECK(plain.bad == 0);
    /* 1 + 2^-7 is a bf16 value e4m3 cannot hold: an identity bf16 linear passes it through */
    dsrt_tensor *eye = new_tensor(DSRT_BF16, 2, 2);
    REQUIRE(eye);
    for (int i = 0; i < 4; i++) dsrt_store_f32(eye->storage->data, DSRT_BF16, i, i % 3 == 0);
    dsrt_linear *id = make_linear(eye, NULL, DSRT_FORMAT_BF16, 2, 2, 0, 0, 1);
    REQUIRE(id);
    float v[2] = {1.0f + 0x1p-7f, -3.0f - 0x1p-6f}, out2[2];
    CHECK(dsrt_linear_rows(id, v, 1, out2, DSRT_PREC_REFERENCE, CPU) == 0);
    CHECK(out2[0] == v[0] && out2[1] == v[1]);
    dsrt_linear_release(id);
    dsrt_tensor_release(eye);
    dsrt_linear_release(l);
    dsrt_tensor_release(x);
    dsrt_tensor_release(w);
}

TEST(linear_grouped_wo_a_is_a_per_group_gemm_without_quantisation)
{
    int64_t groups = 3, r_g = 50, in_g = 200, rows = 2, in = groups * in_g, out = groups * r_g;
    dsrt_tensor *x = random_input(rows, in), *w = random_e4m3(out, in_g), *s = random_scales(2, 2, NULL);
    REQUIRE(x && w && s);
    dsrt_linear *l = make_linear(w, s, DSRT_FORMAT_FP8, in, out, 128, 128, (int)groups);
    REQUIRE(l);
    float y[300], y32[300];
    const float *xv = x->storage->data;
    CHECK(dsrt_linear_rows(l, xv, rows, y, DSRT_PREC_REFERENCE, CPU) == 0);
    CHECK(dsrt_linear_rows(l, xv, rows, y32, DSRT_PREC_FP32, CPU) == 0);
    agreement ref = {0}, plain = {0};
    for (int64_t t = 0; t < rows; t++)
        for (int64_t g = 0; g < groups; g++)
            for (int64_t r = 0; r < r_g; r++) { /* z[g, r] = Σ_c o[g, c]·Wo_a[g·R + r, c] (SPEC §6.8) */
                int64_t row = g * r_g + r;
                double z = 0, magnitude = 0;
                for (int64_t c = 0; c < in_g; c++) {
                    double term = (double)xv[t * in + g * in_g + c] * value(w, row * in_g + c) *
                                  value(s, row / 128 * 2 + c / 128);
                    z += term;
                    magnitude += fabs(term);
                }
                compare(&ref, y[t * out + row], z, magnitude, in_g, 1);
                compare(&plain, y32[t * out + row], z, magnitude, in_g, 0);
            }
    CHECKF(ref.bad == 0 && ref.exact * 100 >= ref.total * 99, "grouped reference: %lld off, %lld of %lld exact",
           (long long)ref.bad, (long long)ref.exact, (long long)ref.total);
    CHECK(plain.bad == 0);
    dsrt_linear_release(l);
    dsrt_tensor_release(x);
    dsrt_tensor_release(w);
    dsrt_tensor_release(s);
}

TEST(linear_forward_tensors_keep_leading_dims_and_dtypes)
{
    dsrt_tensor *w = random_e4m3(20, 30), *s = random_scales(1, 1, NULL), *x2 = random_input(6, 30);
    REQUIRE(w && s && x2);
    dsrt_tensor *x = dsrt_tensor_view(x2, 3, (int64_t[]){2, 3, 30});
    dsrt_linear *l = make_linear(w, s, DSRT_FORMAT_FP8, 30, 20, 128, 128, 1);
    REQUIRE(x && l);
    dsrt_tensor *y = dsrt_linear_forward(l, x, DSRT_PREC_REFERENCE, CPU), *y32 = dsrt_linear_forward(l, x, DSRT_PREC_FP32, CPU);
    REQUIRE(y && y32);
    CHECK(y->dtype == DSRT_BF16 && y32->dtype == DSRT_F32);
    CHECK(y->ndim == 3 && y->shape[0] == 2 && y->shape[1] == 3 && y->shape[2] == 20);
    float rows[120];
    CHECK(dsrt_linear_rows(l, x2->storage->data, 6, rows, DSRT_PREC_REFERENCE, CPU) == 0);
    int64_t differ = 0;
    for (int i = 0; i < 120; i++) differ += value(y, i) != rows[i];
    CHECK(differ == 0);
    dsrt_tensor_release(y);
    dsrt_tensor_release(y32);
    dsrt_linear_release(l);
    dsrt_tensor_release(x);
    dsrt_tensor_release(x2);
    dsrt_tensor_release(w);
    dsrt_tensor_release(s);
}

static int fails_with(dsrt_linear *l, const char *needle)
{
    if (l) {
        dsrt_linear_release(l);
        return 0;
    }
    return strstr(dsrt_err_msg(), needle) != NULL;
}

TEST(linear_constructor_names_what_is_wrong)
{
    dsrt_tensor *w8 = random_e4m3(200, 300), *s8 = random_scales(2, 3, NULL), *bad_s = random_scales(2, 2, NULL);
    dsrt_tensor *i8 = new_tensor(DSRT_I8, 7, 80), *fp4 = new_tensor(DSRT_FP4E2M1, 7, 160), *s4 = random_scales(7, 5, NULL);
    dsrt_tensor *bf = new_tensor(DSRT_BF16, 4, 6);
    REQUIRE(w8 && s8 && bad_s && i8 && fp4 && s4 && bf);
    CHECK(fails_with(make_linear(w8, bad_s, DSRT_FORMAT_FP8, 300, 200, 128, 128, 1), "expected [2, 3]"));
    CHECK(fails_with(make_linear(w8, NULL, DSRT_FORMAT_FP8, 300, 200, 128, 128, 1), "needs a scale"));
    CHECK(fails_with(make_linear(w8, s8, DSRT_FORMAT_FP8, 301, 200, 128, 128, 1), "expected [200, 301]"));
    CHECK(fails_with(make_linear(w8, s8, DSRT_FORMAT_BF16, 300, 200, 0, 0, 1), "needs a bf16 weight"));
    CHECK(fails_with(make_linear(i8, s4, DSRT_FORMAT_FP4, 160, 7, 1, 32, 1), "bitcast"));
    CHECK(fails_with(make_linear(fp4, s8, DSRT_FORMAT_FP4, 160, 7, 1, 32, 1), "expected [7, 5]"));
    dsrt_tensor *s4_f32 = dsrt_tensor_to(s4, DSRT_CPU, DSRT_F32, CPU, 0);
    REQUIRE(s4_f32);
    CHECK(fails_with(make_linear(fp4, s4_f32, DSRT_FORMAT_FP4, 160, 7, 1, 32, 1), "must be f8e8m0"));
    CHECK(fails_with(make_linear(bf, s8, DSRT_FORMAT_BF16, 6, 4, 0, 0, 1), "takes no scale"));
    CHECK(fails_with(make_linear(bf, NULL, DSRT_FORMAT_BF16, 12, 4, 0, 0, 3), "do not split into 3 groups"));
    CHECK(fails_with(make_linear(bf, NULL, DSRT_FORMAT_BF16, 6, 4, 0, 0, 0), "groups must be at least 1"));

    dsrt_linear *l = make_linear(bf, NULL, DSRT_FORMAT_BF16, 6, 4, 0, 0, 1);
    REQUIRE(l);
    dsrt_tensor *narrow_x = new_tensor(DSRT_F32, 2, 5), *int_x = new_tensor(DSRT_I32, 2, 6);
    REQUIRE(narrow_x && int_x);
    CHECK(dsrt_linear_forward(l, narrow_x, DSRT_PREC_REFERENCE, CPU) == NULL && strstr(dsrt_err_msg(), "6 input features"));
    CHECK(dsrt_linear_forward(l, int_x, DSRT_PREC_REFERENCE, CPU) == NULL && strstr(dsrt_err_msg(), "bf16 or f32"));
    dsrt_linear_release(l);
    dsrt_tensor *tensors[] = {w8, s8, bad_s, i8, fp4, s4, s4_f32, bf, narrow_x, int_x};
    for (size_t i = 0; i < sizeof tensors / sizeof *tensors; i++) dsrt_tensor_release(tensors[i]);
}

/* ---- dsrt_linear_forward_pair: two layers over one input ---- */

/* random fp4 codes [rows, cols] (bytes of two nibbles) */
static dsrt_tensor *random_fp4(int64_t rows, int64_t cols)
{
    dsrt_tensor *w = new_tensor(DSRT_FP4E2M1, rows, cols);
    if (!w) return NULL;
    uint8_t *b = w->storage->data;
    for (int64_t i = 0; i < rows * cols / 2; i++) b[i] = (uint8_t)(dsrt_rand_uniform(seed_counter, (uint64_t)i) * 256);
    seed_counter++;
    return w;
}

/* whether a and b (on s's device) hold the same dtype, shape and bits */
static int same_bits(dsrt_tensor *a, dsrt_tensor *b, dsrt_stream *s)
{
    dsrt_tensor *ha = dsrt_tensor_to(a, DSRT_CPU, a->dtype, s, 0), *hb = dsrt_tensor_to(b, DSRT_CPU, b->dtype, s, 0);
    int same = ha && hb && ha->dtype == hb->dtype && ha->ndim == hb->ndim &&
               !memcmp(ha->shape, hb->shape, sizeof(int64_t) * (size_t)ha->ndim) &&
               !memcmp(ha->storage->data, hb->storage->data, (size_t)dsrt_tensor_numel(ha) * (size_t)dsrt_dtype_bits(ha->dtype) / 8);
    dsrt_tensor_release(ha);
    dsrt_tensor_release(hb);
    return same;
}

/* the pair's outputs against the two forwards', bit for bit, on x's device */
static void check_pair(dsrt_linear *l0, dsrt_linear *l1, dsrt_tensor *x, dsrt_precision prec, dsrt_stream *s, const char *what)
{
    dsrt_tensor *y0, *y1;
    CHECKF(dsrt_linear_forward_pair(l0, l1, x, prec, s, &y0, &y1) == 0, "%s: %s", what, dsrt_err_msg());
    dsrt_tensor *w0 = dsrt_linear_forward(l0, x, prec, s), *w1 = dsrt_linear_forward(l1, x, prec, s);
    REQUIRE(y0 && y1 && w0 && w1);
    CHECKF(same_bits(y0, w0, s) && same_bits(y1, w1, s), "%s: the pair differs from the two forwards", what);
    dsrt_tensor *all[] = {y0, y1, w0, w1};
    for (size_t i = 0; i < 4; i++) dsrt_tensor_release(all[i]);
}

TEST(linear_pair_equals_two_forwards_and_names_a_width_mismatch)
{
    dsrt_tensor *x = random_input(3, 256), *wa = random_e4m3(200, 256), *sa = random_scales(2, 2, NULL);
    dsrt_tensor *wb = random_e4m3(72, 256), *sb = random_scales(1, 2, NULL), *wc = random_e4m3(72, 128), *sc = random_scales(1, 1, NULL);
    REQUIRE(x && wa && sa && wb && sb && wc && sc);
    dsrt_linear *a = make_linear(wa, sa, DSRT_FORMAT_FP8, 256, 200, 128, 128, 1), *b = make_linear(wb, sb, DSRT_FORMAT_FP8, 256, 72, 128, 128, 1);
    dsrt_linear *c = make_linear(wc, sc, DSRT_FORMAT_FP8, 128, 72, 128, 128, 1);
    REQUIRE(a && b && c);
    check_pair(a, b, x, DSRT_PREC_REFERENCE, CPU, "cpu reference");
    check_pair(a, b, x, DSRT_PREC_FP32, CPU, "cpu fp32");
    dsrt_tensor *y0 = x, *y1 = x;
    CHECK(dsrt_linear_forward_pair(a, c, x, DSRT_PREC_REFERENCE, CPU, &y0, &y1) == -1 && !y0 && !y1 &&
          strstr(dsrt_err_msg(), "same input: 256 and 128 input features"));
    CHECK(dsrt_linear_forward_pair(a, b, wc, DSRT_PREC_REFERENCE, CPU, &y0, &y1) == -1 && !y0 && !y1 &&
          strstr(dsrt_err_msg(), "bf16 or f32"));
    dsrt_linear_release(a);
    dsrt_linear_release(b);
    dsrt_linear_release(c);
    dsrt_tensor *all[] = {x, wa, sa, wb, sb, wc, sc};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) dsrt_tensor_release(all[i]);
}

/* forward_pair_into's outputs against two forward_into's, bit for bit, on x's device */
static void check_pair_into(dsrt_linear *l0, dsrt_linear *l1, dsrt_tensor *x, dsrt_precision prec, dsrt_stream *s,
                            const char *what)
{
    const int64_t rows = x->shape[0], o0 = l0->cfg.out_features, o1 = l1->cfg.out_features;
    const dsrt_dtype dt = dsrt_linear_out_dtype(l0, prec);
    /* the outputs as two row blocks of one buffer, as the MoE's shared expert keeps them */
    dsrt_tensor *buf = dsrt_tensor_new(dt, 1, (int64_t[]){rows * (o0 + o1)}, x->device, s);
    dsrt_tensor *n0 = buf ? dsrt_tensor_narrow(buf, 0, 0, rows * o0) : NULL, *n1 = buf ? dsrt_tensor_narrow(buf, 0, rows * o0, rows * o1) : NULL;
    dsrt_tensor *y0 = n0 ? dsrt_tensor_view(n0, 2, (int64_t[]){rows, o0}) : NULL, *y1 = n1 ? dsrt_tensor_view(n1, 2, (int64_t[]){rows, o1}) : NULL;
    dsrt_tensor *w0 = dsrt_tensor_new(dt, 2, (int64_t[]){rows, o0}, x->device, s);
    dsrt_tensor *w1 = dsrt_tensor_new(dt, 2, (int64_t[]){rows, o1}, x->device, s);
    dsrt_tensor *c0 = dsrt_tensor_new(dt, 2, (int64_t[]){rows, o0}, x->device, s);
    dsrt_tensor *c1 = dsrt_tensor_new(dt, 2, (int64_t[]){rows, o1}, x->device, s);
    REQUIRE(y0 && y1 && w0 && w1 && c0 && c1);
    CHECKF(dsrt_linear_forward_pair_into(l0, l1, x, y0, y1, prec, s) == 0, "%s: %s", what, dsrt_err_msg());
    CHECKF(!dsrt_linear_forward_into(l0, x, w0, prec, s) && !dsrt_linear_forward_into(l1, x, w1, prec, s), "%s: %s", what,
           dsrt_err_msg());
    /* same_bits reads from the storage's start: the views copied out first */
    REQUIRE(!dsrt_op_copy(c0, y0, s) && !dsrt_op_copy(c1, y1, s));
    CHECKF(same_bits(c0, w0, s) && same_bits(c1, w1, s), "%s: the pair differs from the two forwards", what);
    dsrt_tensor *all[] = {buf, n0, n1, y0, y1, w0, w1, c0, c1};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) dsrt_tensor_release(all[i]);
}

TEST(linear_pair_into_equals_two_forwards_into_and_names_bad_outputs)
{
    dsrt_tensor *x = random_input(5, 256), *wa = random_e4m3(200, 256), *sa = random_scales(2, 2, NULL);
    dsrt_tensor *wb = random_e4m3(72, 256), *sb = random_scales(1, 2, NULL);
    REQUIRE(x && wa && sa && wb && sb);
    dsrt_linear *a = make_linear(wa, sa, DSRT_FORMAT_FP8, 256, 200, 128, 128, 1), *b = make_linear(wb, sb, DSRT_FORMAT_FP8, 256, 72, 128, 128, 1);
    REQUIRE(a && b);
    check_pair_into(a, b, x, DSRT_PREC_REFERENCE, CPU, "cpu reference");
    check_pair_into(a, b, x, DSRT_PREC_FP32, CPU, "cpu fp32");
    dsrt_tensor *y0 = new_tensor(DSRT_F32, 5, 200), *bad = new_tensor(DSRT_F32, 5, 73);
    REQUIRE(y0 && bad);
    CHECK(dsrt_linear_forward_pair_into(a, b, x, y0, bad, DSRT_PREC_FP32, CPU) == -1 &&
          strstr(dsrt_err_msg(), "must be a contiguous f32 [..., 72]"));
    CHECK(dsrt_linear_forward_pair_into(a, b, x, y0, y0, DSRT_PREC_FP32, CPU) == -1 &&
          strstr(dsrt_err_msg(), "[..., 72]"));
    dsrt_linear_release(a);
    dsrt_linear_release(b);
    dsrt_tensor *all[] = {x, wa, sa, wb, sb, y0, bad};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) dsrt_tensor_release(all[i]);
}

/* a bf16 linear on cuda:0, [out, in] */
static dsrt_linear *cuda_bf16_linear(int64_t out, int64_t in, dsrt_stream *s)
{
    dsrt_tensor *w = random_input(out, in), *wd = w ? dsrt_tensor_to(w, 0, DSRT_BF16, s, 0) : NULL;
    dsrt_linear *l = wd ? make_linear(wd, NULL, DSRT_FORMAT_BF16, in, out, 0, 0, 1) : NULL;
    dsrt_tensor_release(w);
    dsrt_tensor_release(wd);
    return l;
}

/* a linear of the given format on cuda:0, [out, in], 128x128 fp8 blocks or per-32 fp4 ones */
static dsrt_linear *cuda_linear(dsrt_weight_format f, int64_t out, int64_t in, int f32_scales, dsrt_stream *s)
{
    dsrt_tensor *sf = NULL;
    dsrt_tensor *w = f == DSRT_FORMAT_FP4 ? random_fp4(out, in) : random_e4m3(out, in);
    dsrt_tensor *sc = f == DSRT_FORMAT_FP4 ? random_scales(out, in / 32, NULL)
                                           : random_scales((out + 127) / 128, (in + 127) / 128, f32_scales ? &sf : NULL);
    dsrt_tensor *wd = w ? dsrt_tensor_to(w, 0, w->dtype, s, 0) : NULL;
    dsrt_tensor *sd = sc ? dsrt_tensor_to(sf ? sf : sc, 0, (sf ? sf : sc)->dtype, s, 0) : NULL;
    dsrt_linear *l = wd && sd ? make_linear(wd, sd, f, in, out, f == DSRT_FORMAT_FP4 ? 1 : 128, f == DSRT_FORMAT_FP4 ? 32 : 128, 1)
                              : NULL;
    dsrt_tensor *all[] = {w, sc, sf, wd, sd};
    for (size_t i = 0; i < 5; i++) dsrt_tensor_release(all[i]);
    return l;
}

GPU_TEST(gpu_linear_pair_equals_two_forwards)
{
    dsrt_stream *s = dsrt_stream_default(0);
    /* wq_a/wkv-like fp8 pairs (e8m0 and f32 scales), an fp4 pair, bf16 pairs in fp32 math on the
     * CUDA-core GEMV (a compressor's wkv/wgate, and widths whose plans split K differently), and
     * pairs the kernels take apart: fp8 with fp4, bf16 with fp8, and 9 rows (past the decode GEMV) */
    dsrt_linear *a = cuda_linear(DSRT_FORMAT_FP8, 1024, 4096, 0, s), *b = cuda_linear(DSRT_FORMAT_FP8, 520, 4096, 0, s);
    dsrt_linear *af = cuda_linear(DSRT_FORMAT_FP8, 264, 384, 1, s), *bf = cuda_linear(DSRT_FORMAT_FP8, 136, 384, 1, s);
    dsrt_linear *p = cuda_linear(DSRT_FORMAT_FP4, 200, 512, 0, s), *q = cuda_linear(DSRT_FORMAT_FP4, 48, 512, 0, s);
    dsrt_linear *m = cuda_linear(DSRT_FORMAT_FP4, 72, 4096, 0, s);
    dsrt_linear *ck = cuda_bf16_linear(1024, 4096, s), *cg = cuda_bf16_linear(1024, 4096, s);
    dsrt_linear *h0 = cuda_bf16_linear(3000, 4096, s), *h1 = cuda_bf16_linear(72, 4096, s);
    REQUIRE(a && b && af && bf && p && q && m && ck && cg && h0 && h1);
    for (int64_t rows = 1; rows <= 9; rows += rows < 3 ? 2 : 5) { /* 1, 3, 8, 9 */
        dsrt_tensor *x = random_input(rows, 4096), *x3 = random_input(rows, 384), *x5 = random_input(rows, 512);
        REQUIRE(x && x3 && x5);
        dsrt_tensor *xd = dsrt_tensor_to(x, 0, DSRT_F32, s, 0), *xb = dsrt_tensor_to(x, 0, DSRT_BF16, s, 0);
        dsrt_tensor *x3d = dsrt_tensor_to(x3, 0, DSRT_BF16, s, 0), *x5d = dsrt_tensor_to(x5, 0, DSRT_F32, s, 0);
        REQUIRE(xd && xb && x3d && x5d);
        const struct {
            dsrt_linear *l0, *l1;
            dsrt_tensor *x;
            dsrt_precision prec;
            const char *what;
        } cases[] = {
            {a, b, xd, DSRT_PREC_REFERENCE, "fp8 e8m0 f32 x"}, {a, b, xb, DSRT_PREC_REFERENCE, "fp8 e8m0 bf16 x"},
            {a, b, xb, DSRT_PREC_FP32, "fp8 e8m0 fp32 precision"}, {af, bf, x3d, DSRT_PREC_REFERENCE, "fp8 f32 scales"},
            {p, q, x5d, DSRT_PREC_REFERENCE, "fp4"}, {a, m, xb, DSRT_PREC_REFERENCE, "fp8 with fp4"},
            {ck, cg, xb, DSRT_PREC_FP32, "bf16 compressor"}, {h0, h1, xb, DSRT_PREC_FP32, "bf16 3000 and 72"},
            {h1, ck, xd, DSRT_PREC_FP32, "bf16 f32 x"}, {ck, a, xb, DSRT_PREC_FP32, "bf16 with fp8"},
        };
        for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
            char what[64];
            snprintf(what, sizeof what, "%s, %lld rows", cases[c].what, (long long)rows);
            check_pair(cases[c].l0, cases[c].l1, cases[c].x, cases[c].prec, s, what);
        }
        dsrt_tensor *all[] = {x, x3, x5, xd, xb, x3d, x5d};
        for (size_t i = 0; i < sizeof all / sizeof *all; i++) dsrt_tensor_release(all[i]);
    }
    dsrt_linear *all[] = {a, b, af, bf, p, q, m, ck, cg, h0, h1};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) dsrt_linear_release(all[i]);
}

GPU_TEST(gpu_linear_prefill_pair_preps_once_with_the_same_bits)
{
    dsrt_stream *s = dsrt_stream_default(0);
    /* prefill rows (past the decode GEMV): FP8 pairs on the cuBLASLt route share one Q8 pass of x
     * (wq_a ‖ wkv shapes; 40 rows pad to 48, the padded GEMM's rows copied out); fp32 precision and a
     * width cuBLASLt's route refuses (out 520) take the two forwards; pair_into writes two row blocks
     * of one buffer */
    dsrt_linear *a = cuda_linear(DSRT_FORMAT_FP8, 1024, 4096, 0, s), *b = cuda_linear(DSRT_FORMAT_FP8, 512, 4096, 0, s);
    dsrt_linear *odd = cuda_linear(DSRT_FORMAT_FP8, 520, 4096, 0, s);
    REQUIRE(a && b && odd);
    const int64_t row_counts[] = {40, 256};
    for (size_t r = 0; r < 2; r++) {
        dsrt_tensor *x = random_input(row_counts[r], 4096);
        dsrt_tensor *xd = x ? dsrt_tensor_to(x, 0, DSRT_F32, s, 0) : NULL, *xb = x ? dsrt_tensor_to(x, 0, DSRT_BF16, s, 0) : NULL;
        REQUIRE(xd && xb);
        char what[64];
        snprintf(what, sizeof what, "%lld rows", (long long)row_counts[r]);
        check_pair(a, b, xb, DSRT_PREC_REFERENCE, s, what);
        check_pair(a, b, xd, DSRT_PREC_REFERENCE, s, what);
        check_pair(a, b, xb, DSRT_PREC_FP32, s, what);
        check_pair(a, odd, xb, DSRT_PREC_REFERENCE, s, what);
        check_pair_into(a, b, xb, DSRT_PREC_REFERENCE, s, what);
        check_pair_into(b, odd, xd, DSRT_PREC_REFERENCE, s, what);
        dsrt_tensor *all[] = {x, xd, xb};
        for (size_t i = 0; i < 3; i++) dsrt_tensor_release(all[i]);
    }
    dsrt_linear_release(a);
    dsrt_linear_release(b);
    dsrt_linear_release(odd);
}
