/*
 * test_numeric.c - the conversions and the RNG of runtime/numeric.h against independent references.
 *
 * Expected values are computed here from the formats' bit fields with double arithmetic and by
 * nearest-value searches over all codes, never with numeric.h's own functions, so a test fails
 * when the shared header is wrong, not only when it changes.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "check.h"
#include "numeric.h"

static float from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
/* same value and same sign of zero (NaNs compare separately) */
static int same(double a, double b) { return a == b && signbit(a) == signbit(b); }

/* ---- decoders from the bit fields ---- */

static double ref_e4m3(int c)
{
    int s = c >> 7, e = (c >> 3) & 15, m = c & 7;
    if (e == 15 && m == 7) return NAN;
    double v = e == 0 ? ldexp(m, -9) : ldexp(1.0 + m / 8.0, e - 7);
    return s ? -v : v;
}

static double ref_f16(int c)
{
    int s = c >> 15, e = (c >> 10) & 31, m = c & 1023;
    double v;
    if (e == 31) v = m ? NAN : INFINITY;
    else v = e == 0 ? ldexp(m, -24) : ldexp(1.0 + m / 1024.0, e - 15);
    return s ? -v : v;
}

static double ref_bf16(int c)
{
    int s = c >> 15, e = (c >> 7) & 255, m = c & 127;
    double v;
    if (e == 255) v = m ? NAN : INFINITY;
    else v = e == 0 ? ldexp(m, -133) : ldexp(1.0 + m / 128.0, e - 127);
    return s ? -v : v;
}

static const double fp4_values[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};

/* The code of the nearest value to |x| among the ascending non-negative codes 0..maxcode of a
 * format (decode), ties to the even code; with sign_bit set for negative x (and -0). */
static int nearest_code(double x, double (*decode)(int), int maxcode, int sign_bit)
{
    double a = fabs(x);
    int lo = 0, hi = maxcode; /* largest code with value <= a, by bisection (values ascend) */
    if (a >= decode(maxcode)) lo = maxcode;
    else {
        while (hi - lo > 1) {
            int mid = (lo + hi) / 2;
            if (decode(mid) <= a) lo = mid; else hi = mid;
        }
    }
    int c = lo;
    if (lo < maxcode) {
        double dlo = a - decode(lo), dhi = decode(lo + 1) - a;
        if (dhi < dlo || (dhi == dlo && ((lo + 1) & 1) == 0)) c = lo + 1;
    }
    return signbit(x) ? c | sign_bit : c;
}

/* ---- e4m3 ---- */

TEST(e4m3_decodes_every_code)
{
    for (int c = 0; c < 256; c++) {
        float got = dsrt_e4m3_to_f32((uint8_t)c);
        double want = ref_e4m3(c);
        if (isnan(want)) CHECKF(isnan(got) && (signbit(got) != 0) == (c >> 7), "code 0x%02x gives %g", c, got);
        else CHECKF(same(got, want), "code 0x%02x gives %.9g, expected %.9g", c, got, want);
    }
    CHECK(isnan(dsrt_e4m3_to_f32(0x7f)) && isnan(dsrt_e4m3_to_f32(0xff)));
    CHECK(dsrt_e4m3_to_f32(0x7e) == 448.0f);
    CHECK(dsrt_e4m3_to_f32(0x01) == ldexpf(1, -9));
}

TEST(e4m3_every_code_reencodes_to_itself)
{
    for (int c = 0; c < 256; c++) {
        uint8_t back = dsrt_f32_to_e4m3(dsrt_e4m3_to_f32((uint8_t)c));
        if ((c & 0x7f) == 0x7f) CHECKF(back == c, "NaN code 0x%02x encodes to 0x%02x", c, back);
        else CHECKF(back == c, "code 0x%02x re-encodes to 0x%02x", c, back);
    }
}

TEST(e4m3_encode_rounding_and_overflow)
{
    CHECK(dsrt_f32_to_e4m3(448.0f) == 0x7e);
    CHECK(dsrt_f32_to_e4m3(460.0f) == 0x7e);
    CHECK(dsrt_f32_to_e4m3(464.0f) == 0x7e);           /* tie between 448 and "480": even wins */
    CHECK(dsrt_f32_to_e4m3(-464.0f) == 0xfe);
    CHECK(dsrt_f32_to_e4m3(nextafterf(464.0f, 1e9f)) == 0x7f); /* past the tie: NaN, as torch */
    CHECK(dsrt_f32_to_e4m3(470.0f) == 0x7f);
    CHECK(dsrt_f32_to_e4m3(480.0f) == 0x7f);
    CHECK(dsrt_f32_to_e4m3(1e30f) == 0x7f);
    CHECK(dsrt_f32_to_e4m3(-1e30f) == 0xff);
    CHECK(dsrt_f32_to_e4m3(INFINITY) == 0x7f);
    CHECK(dsrt_f32_to_e4m3(-INFINITY) == 0xff);
    CHECK((dsrt_f32_to_e4m3(NAN) & 0x7f) == 0x7f);
    /* ties to even among normals: 1 + 1/16 lies between 1 (0x38) and 1.125 (0x39) */
    CHECK(dsrt_f32_to_e4m3(1.0625f) == 0x38);
    CHECK(dsrt_f32_to_e4m3(1.1875f) == 0x3a);          /* between 1.125 (odd) and 1.25 (even) */
    CHECK(dsrt_f32_to_e4m3(nextafterf(1.0625f, 2.0f)) == 0x39);
    /* subnormals: 2^-9 the least, 2^-10 a tie that goes to 0, 3*2^-10 a tie that goes to 2^-8 */
    CHECK(dsrt_f32_to_e4m3(ldexpf(1, -9)) == 0x01);
    CHECK(dsrt_f32_to_e4m3(ldexpf(1, -10)) == 0x00);
    CHECK(dsrt_f32_to_e4m3(-ldexpf(1, -10)) == 0x80);
    CHECK(dsrt_f32_to_e4m3(nextafterf(ldexpf(1, -10), 1.0f)) == 0x01);
    CHECK(dsrt_f32_to_e4m3(ldexpf(3, -10)) == 0x02);
    CHECK(dsrt_f32_to_e4m3(ldexpf(5, -10)) == 0x02);
    CHECK(dsrt_f32_to_e4m3(ldexpf(15, -10)) == 0x08);  /* 7.5 * 2^-9 rounds up to the least normal */
    CHECK(dsrt_f32_to_e4m3(1e-30f) == 0x00);
    CHECK(dsrt_f32_to_e4m3(-0.0f) == 0x80);
}

/* ---- e8m0 ---- */

TEST(e8m0_decodes_and_reencodes_every_code)
{
    for (int c = 0; c < 256; c++) {
        float got = dsrt_e8m0_to_f32((uint8_t)c);
        if (c == 255) {
            CHECKF(isnan(got), "code 255 gives %g", got);
            continue;
        }
        double want = ldexp(1.0, c - 127);
        CHECKF(got == want, "code %d gives %.9g, expected 2^%d", c, got, c - 127);
        uint8_t back = dsrt_f32_to_e8m0(got);
        CHECKF(back == c, "code %d re-encodes to %d", c, back);
    }
    CHECK(dsrt_f32_to_e8m0(NAN) == 255);
    CHECK(dsrt_f32_to_e8m0(INFINITY) == 255);
    CHECK(dsrt_f32_to_e8m0(0.0f) == 0);
    CHECK(dsrt_f32_to_e8m0(-4.0f) == 129); /* no sign: the magnitude's exponent */
    CHECK(dsrt_f32_to_e8m0(1.25f) == 127); /* rounds the exponent like torch (guard bit rule) */
    CHECK(dsrt_f32_to_e8m0(1.5f) == 128);
    CHECK(dsrt_f32_to_e8m0(1.75f) == 128);
}

/* ---- fp4 e2m1 ---- */

TEST(fp4_decodes_every_code)
{
    for (int c = 0; c < 16; c++) {
        double want = (c & 8) ? -fp4_values[c & 7] : fp4_values[c & 7];
        float got = dsrt_fp4_to_f32((uint8_t)c);
        CHECKF(same(got, want), "code %d gives %g, expected %g", c, got, want);
    }
}

TEST(fp4_every_code_reencodes_to_itself)
{
    for (int c = 0; c < 16; c++) {
        uint8_t back = dsrt_f32_to_fp4(dsrt_fp4_to_f32((uint8_t)c));
        CHECKF(back == c, "code %d re-encodes to %d", c, back);
    }
    CHECK(dsrt_f32_to_fp4(-0.0f) == 8);
}

TEST(fp4_rounding_ties_to_even_code_and_saturation)
{
    static const struct { float x; int code; } cases[] = {
        {0.25f, 0}, {0.75f, 2}, {1.25f, 2}, {1.75f, 4}, {2.5f, 4}, {3.5f, 6}, {5.0f, 6},
        {0.2f, 0}, {0.3f, 1}, {0.7f, 1}, {0.8f, 2}, {1.3f, 3}, {2.6f, 5}, {3.4f, 5}, {3.6f, 6},
        {4.9f, 6}, {5.1f, 7}, {6.0f, 7}, {7.0f, 7}, {1e30f, 7}, {INFINITY, 7},
        {-0.25f, 8}, {-0.75f, 10}, {-5.0f, 14}, {-7.0f, 15}, {-INFINITY, 15},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint8_t got = dsrt_f32_to_fp4(cases[i].x);
        CHECKF(got == cases[i].code, "%g encodes to %d, expected %d", cases[i].x, got, cases[i].code);
    }
    CHECK(dsrt_f32_to_fp4(NAN) == 0);
    CHECK(dsrt_f32_to_fp4(-NAN) == 0);
}

static double ref_fp4(int c) { return fp4_values[c & 7]; }

TEST(fp4_encode_matches_nearest_search)
{
    /* a dense sweep over [-8, 8] in steps of 1/64 plus random points */
    uint32_t state = 12345;
    for (int i = -512; i <= 512 + 20000; i++) {
        float x;
        if (i <= 512) x = (float)i / 64.0f;
        else {
            state = state * 1664525u + 1013904223u;
            x = ((float)(state >> 8) / 16777216.0f - 0.5f) * 16.0f;
        }
        int want = nearest_code(x, ref_fp4, 7, 8);
        uint8_t got = dsrt_f32_to_fp4(x);
        CHECKF(got == want, "%.9g encodes to %d, expected %d", x, got, want);
    }
}

/* ---- bf16 ---- */

TEST(bf16_round_to_nearest_even)
{
    CHECK(dsrt_f32_to_bf16(from_bits(0x3f808000u)) == 0x3f80); /* tie, even stays */
    CHECK(dsrt_f32_to_bf16(from_bits(0x3f818000u)) == 0x3f82); /* tie, odd rounds up */
    CHECK(dsrt_f32_to_bf16(from_bits(0x3f808001u)) == 0x3f81);
    CHECK(dsrt_f32_to_bf16(from_bits(0x3f807fffu)) == 0x3f80);
    CHECK(dsrt_f32_to_bf16(from_bits(0x3fff8000u)) == 0x4000); /* carries into the exponent */
    CHECK(dsrt_f32_to_bf16(from_bits(0xbfff8000u)) == 0xc000);
    CHECK(dsrt_f32_to_bf16(from_bits(0x7f7fffffu)) == 0x7f80); /* largest f32 rounds to inf */
    CHECK(dsrt_f32_to_bf16(from_bits(0x7f7f7fffu)) == 0x7f7f);
    CHECK(dsrt_f32_to_bf16(INFINITY) == 0x7f80);
    CHECK(dsrt_f32_to_bf16(-INFINITY) == 0xff80);
    CHECK(dsrt_f32_to_bf16(-0.0f) == 0x8000);
    CHECK(dsrt_f32_to_bf16(from_bits(0x00008000u)) == 0x0000); /* subnormal tie to even */
    CHECK(dsrt_f32_to_bf16(from_bits(0x00018000u)) == 0x0002);
    /* NaNs stay NaN (also those whose payload is only in the low 16 bits), sign kept */
    uint32_t nans[] = {0x7f800001u, 0x7fc00000u, 0xff800001u, 0x7fffffffu, 0xffc00000u};
    for (size_t i = 0; i < sizeof nans / sizeof nans[0]; i++) {
        uint16_t h = dsrt_f32_to_bf16(from_bits(nans[i]));
        CHECKF((h & 0x7f80) == 0x7f80 && (h & 0x7f) && (h >> 15) == (nans[i] >> 31), "NaN %08x gives %04x", nans[i], h);
    }
    /* the 1 + 2^-8 tie of the Lua tests */
    CHECK(dsrt_bf16_to_f32(dsrt_f32_to_bf16(1.0f + ldexpf(1, -8))) == 1.0f);
    CHECK(dsrt_bf16_to_f32(dsrt_f32_to_bf16(1.0f + 3 * ldexpf(1, -8))) == 1.0f + ldexpf(1, -6));
}

TEST(bf16_decodes_every_code_and_round_trips)
{
    for (int c = 0; c < 65536; c++) {
        float f = dsrt_bf16_to_f32((uint16_t)c);
        double want = ref_bf16(c);
        uint16_t back = dsrt_f32_to_bf16(f);
        if (isnan(want)) {
            CHECKF(isnan(f), "code %04x decodes to %g", c, f);
            CHECKF((back & 0x7f80) == 0x7f80 && (back & 0x7f) && (back >> 15) == (c >> 15),
                   "NaN code %04x comes back as %04x", c, back);
        } else {
            CHECKF(same(f, want), "code %04x decodes to %.9g, expected %.9g", c, f, want);
            CHECKF(back == c, "code %04x comes back as %04x", c, back);
        }
    }
}

/* ---- f16 ---- */

TEST(f16_decodes_every_code_and_round_trips)
{
    for (int c = 0; c < 65536; c++) {
        float f = dsrt_f16_to_f32((uint16_t)c);
        double want = ref_f16(c);
        uint16_t back = dsrt_f32_to_f16(f);
        if (isnan(want)) {
            CHECKF(isnan(f), "code %04x decodes to %g", c, f);
            CHECKF((back & 0x7c00) == 0x7c00 && (back & 0x3ff) && (back >> 15) == (c >> 15),
                   "NaN code %04x comes back as %04x", c, back);
        } else {
            CHECKF(same(f, want), "code %04x decodes to %.9g, expected %.9g", c, f, want);
            CHECKF(back == c, "code %04x comes back as %04x", c, back);
        }
    }
}

TEST(f16_ties_subnormals_and_overflow)
{
    CHECK(dsrt_f32_to_f16(65504.0f) == 0x7bff);
    CHECK(dsrt_f32_to_f16(nextafterf(65520.0f, 0.0f)) == 0x7bff);
    CHECK(dsrt_f32_to_f16(65520.0f) == 0x7c00);  /* the tie past the largest finite goes to inf */
    CHECK(dsrt_f32_to_f16(-65520.0f) == 0xfc00);
    CHECK(dsrt_f32_to_f16(1e10f) == 0x7c00);
    CHECK(dsrt_f32_to_f16(INFINITY) == 0x7c00);
    CHECK(dsrt_f32_to_f16(-INFINITY) == 0xfc00);
    CHECK(dsrt_f32_to_f16(1.0f + ldexpf(1, -11)) == 0x3c00);     /* tie, even stays */
    CHECK(dsrt_f32_to_f16(1.0f + 3 * ldexpf(1, -11)) == 0x3c02); /* tie, odd rounds up */
    CHECK(dsrt_f32_to_f16(2.0f - ldexpf(1, -12)) == 0x4000);     /* carries into the exponent */
    CHECK(dsrt_f32_to_f16(ldexpf(1, -14)) == 0x0400);            /* least normal */
    CHECK(dsrt_f32_to_f16(ldexpf(1, -24)) == 0x0001);            /* least subnormal */
    CHECK(dsrt_f32_to_f16(ldexpf(1, -25)) == 0x0000);            /* tie to even: 0 */
    CHECK(dsrt_f32_to_f16(-ldexpf(1, -25)) == 0x8000);
    CHECK(dsrt_f32_to_f16(nextafterf(ldexpf(1, -25), 1.0f)) == 0x0001);
    CHECK(dsrt_f32_to_f16(ldexpf(3, -26)) == 0x0001);            /* 0.75 * 2^-24 */
    CHECK(dsrt_f32_to_f16(ldexpf(3, -25)) == 0x0002);            /* 1.5 * 2^-24: tie to even */
    CHECK(dsrt_f32_to_f16(ldexpf(5, -25)) == 0x0002);            /* 2.5 * 2^-24: tie to even */
    CHECK(dsrt_f32_to_f16(ldexpf(1, -14) - ldexpf(1, -25)) == 0x0400); /* rounds up into the normals */
    CHECK(dsrt_f32_to_f16(1e-30f) == 0x0000);
    CHECK(dsrt_f32_to_f16(-0.0f) == 0x8000);
    uint16_t h = dsrt_f32_to_f16(NAN);
    CHECK((h & 0x7c00) == 0x7c00 && (h & 0x3ff));
    h = dsrt_f32_to_f16(from_bits(0x7f800001u)); /* payload below f16's mantissa: still NaN */
    CHECK((h & 0x7c00) == 0x7c00 && (h & 0x3ff));
}

/* ---- every conversion against the nearest-value searches, on a strided sample of all f32 ---- */

TEST(f32_sample_converts_like_nearest_search)
{
    const double bf16_inf_from = ldexp(2.0 - ldexp(1, -8), 127); /* halfway past the largest bf16 */
    long bad_bf16 = 0, bad_f16 = 0, bad_e4m3 = 0, bad_fp4 = 0;
    uint64_t n = 0;
    for (uint64_t u = 0; u < (UINT64_C(1) << 32); u += 4099, n++) {
        float x = from_bits((uint32_t)u);
        if (isnan(x)) continue;
        double a = fabs((double)x);
        int neg = signbit(x) != 0;

        int want = a >= bf16_inf_from ? (neg ? 0xff80 : 0x7f80) : nearest_code(x, ref_bf16, 0x7f7f, 0x8000);
        int got = dsrt_f32_to_bf16(x);
        if (got != want && bad_bf16++ < 4) CHECKF(0, "bf16 of %08x: got %04x, expected %04x", (uint32_t)u, got, want);

        want = a >= 65520.0 ? (neg ? 0xfc00 : 0x7c00) : nearest_code(x, ref_f16, 0x7bff, 0x8000);
        got = dsrt_f32_to_f16(x);
        if (got != want && bad_f16++ < 4) CHECKF(0, "f16 of %08x: got %04x, expected %04x", (uint32_t)u, got, want);

        want = a > 464.0 ? (neg ? 0xff : 0x7f) : nearest_code(x, ref_e4m3, 0x7e, 0x80);
        got = dsrt_f32_to_e4m3(x);
        if (got != want && bad_e4m3++ < 4) CHECKF(0, "e4m3 of %08x: got %02x, expected %02x", (uint32_t)u, got, want);

        want = nearest_code(x, ref_fp4, 7, 8); /* saturates: 6 is the last code */
        got = dsrt_f32_to_fp4(x);
        if (got != want && bad_fp4++ < 4) CHECKF(0, "fp4 of %08x: got %x, expected %x", (uint32_t)u, got, want);
    }
    CHECKF(bad_bf16 + bad_f16 + bad_e4m3 + bad_fp4 == 0, "mismatches: bf16 %ld, f16 %ld, e4m3 %ld, fp4 %ld of %llu",
           bad_bf16, bad_f16, bad_e4m3, bad_fp4, (unsigned long long)n);
    CHECK(n > 1000000);
}

/* ---- generic loads and stores ---- */

TEST(load_store_fp4_touches_one_nibble)
{
    uint8_t buf[3] = {0xff, 0xff, 0xff};
    dsrt_store_f32(buf, DSRT_FP4E2M1, 0, 1.0f);  /* code 2 in the low nibble of byte 0 */
    dsrt_store_f32(buf, DSRT_FP4E2M1, 3, -6.0f); /* code 15 in the high nibble of byte 1 */
    dsrt_store_f32(buf, DSRT_FP4E2M1, 2, 0.5f);  /* code 1 in the low nibble of byte 1 */
    CHECK(buf[0] == 0xf2);
    CHECK(buf[1] == 0xf1);
    CHECK(buf[2] == 0xff);
    CHECK(dsrt_load_f32(buf, DSRT_FP4E2M1, 0) == 1.0f);
    CHECK(dsrt_load_f32(buf, DSRT_FP4E2M1, 1) == -6.0f);
    CHECK(dsrt_load_f32(buf, DSRT_FP4E2M1, 2) == 0.5f);
    CHECK(dsrt_load_f32(buf, DSRT_FP4E2M1, 3) == -6.0f);
}

TEST(store_integers_wrap_and_float_to_int_truncates)
{
    int8_t i8;
    uint8_t u8;
    int32_t i32;
    int64_t i64;
    dsrt_store_i64(&i8, DSRT_I8, 0, 300);
    CHECK(i8 == 44);
    dsrt_store_i64(&u8, DSRT_U8, 0, -1);
    CHECK(u8 == 255);
    dsrt_store_i64(&i32, DSRT_I32, 0, INT64_C(0x100000005));
    CHECK(i32 == 5);
    dsrt_store_f32(&i64, DSRT_I64, 0, -2.75f);
    CHECK(i64 == -2);
    dsrt_store_f32(&i64, DSRT_I64, 0, NAN);
    CHECK(i64 == 0);
    dsrt_store_f32(&i64, DSRT_I64, 0, 1e30f);
    CHECK(i64 == INT64_MAX);
    dsrt_store_f32(&u8, DSRT_BOOL, 0, -0.5f);
    CHECK(u8 == 1);
    dsrt_store_f32(&u8, DSRT_BOOL, 0, 0.0f);
    CHECK(u8 == 0);
    float f = 2.5f;
    CHECK(dsrt_load_i64(&f, DSRT_F32, 0) == 2);
    f = -2.5f;
    CHECK(dsrt_load_i64(&f, DSRT_F32, 0) == -2);
}

/* ---- Philox and the distributions ---- */

/* Philox4x32-10 with a full 128-bit counter, written from the paper (Salmon et al., SC'11) */
static void ref_philox(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4])
{
    uint32_t c[4] = {ctr[0], ctr[1], ctr[2], ctr[3]}, k[2] = {key[0], key[1]};
    for (int r = 0; r < 10; r++) {
        uint64_t p0 = (uint64_t)0xD2511F53u * c[0], p1 = (uint64_t)0xCD9E8D57u * c[2];
        uint32_t n[4] = {(uint32_t)(p1 >> 32) ^ c[1] ^ k[0], (uint32_t)p1, (uint32_t)(p0 >> 32) ^ c[3] ^ k[1], (uint32_t)p0};
        memcpy(c, n, sizeof c);
        k[0] += 0x9E3779B9u;
        k[1] += 0xBB67AE85u;
    }
    memcpy(out, c, sizeof c);
}

TEST(philox_known_answers)
{
    static const uint32_t zero_ctr[4] = {0, 0, 0, 0}, zero_key[2] = {0, 0};
    static const uint32_t ones_ctr[4] = {~0u, ~0u, ~0u, ~0u}, ones_key[2] = {~0u, ~0u};
    static const uint32_t want0[4] = {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u};
    static const uint32_t want1[4] = {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu};
    uint32_t out[4];
    /* the reference reproduces both vectors of Random123's kat_vectors */
    ref_philox(zero_ctr, zero_key, out);
    CHECK(memcmp(out, want0, sizeof out) == 0);
    ref_philox(ones_ctr, ones_key, out);
    CHECK(memcmp(out, want1, sizeof out) == 0);
    /* dsrt_philox takes a 64-bit counter (words 2 and 3 zero): only the all-zero vector applies */
    dsrt_philox(0, 0, out);
    CHECKF(memcmp(out, want0, sizeof out) == 0, "got %08x %08x %08x %08x", out[0], out[1], out[2], out[3]);
}

TEST(philox_matches_reference_for_64bit_counters_and_keys)
{
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (int i = 0; i < 2000; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        uint64_t counter = x;
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        uint64_t key = i < 10 ? (uint64_t)i : x;
        uint32_t ctr[4] = {(uint32_t)counter, (uint32_t)(counter >> 32), 0, 0}, k[2] = {(uint32_t)key, (uint32_t)(key >> 32)};
        uint32_t want[4], got[4];
        ref_philox(ctr, k, want);
        dsrt_philox(counter, key, got);
        CHECKF(memcmp(want, got, sizeof got) == 0, "counter %016llx key %016llx", (unsigned long long)counter,
               (unsigned long long)key);
    }
}

TEST(rand_uniform_range_mean_and_determinism)
{
    const int n = 100000;
    double sum = 0;
    int out_of_range = 0;
    for (int i = 0; i < n; i++) {
        float u = dsrt_rand_uniform(1234, (uint64_t)i);
        out_of_range += !(u >= 0.0f && u < 1.0f);
        sum += u;
    }
    CHECK(out_of_range == 0);
    CHECKF(fabs(sum / n - 0.5) < 0.005, "mean %g", sum / n);
    CHECK(dsrt_rand_uniform(7, 99) == dsrt_rand_uniform(7, 99));
    int same_across_seeds = 0;
    for (int i = 0; i < 1000; i++) same_across_seeds += dsrt_rand_uniform(7, (uint64_t)i) == dsrt_rand_uniform(8, (uint64_t)i);
    CHECKF(same_across_seeds < 5, "%d of 1000 equal", same_across_seeds);
    /* the value is exactly 24 bits of the first Philox word */
    uint32_t r[4];
    dsrt_philox(5, 77, r);
    CHECK(dsrt_rand_uniform(77, 5) == (float)(r[0] >> 8) / 16777216.0f);
}

TEST(rand_normal_moments_and_determinism)
{
    const int n = 100000;
    double sum = 0, sum2 = 0;
    int bad = 0, beyond3 = 0;
    for (int i = 0; i < n; i++) {
        double v = dsrt_rand_normal(99, (uint64_t)i);
        bad += !isfinite(v);
        beyond3 += fabs(v) > 3;
        sum += v;
        sum2 += v * v;
    }
    double mean = sum / n, std = sqrt(sum2 / n - mean * mean);
    CHECK(bad == 0);
    CHECKF(fabs(mean) < 0.02, "mean %g", mean);
    CHECKF(fabs(std - 1) < 0.02, "std %g", std);
    CHECKF(beyond3 > 150 && beyond3 < 400, "%d beyond 3 sigma (expected ~270)", beyond3);
    CHECK(dsrt_rand_normal(3, 12345) == dsrt_rand_normal(3, 12345));
    int same_across_seeds = 0;
    for (int i = 0; i < 1000; i++) same_across_seeds += dsrt_rand_normal(3, (uint64_t)i) == dsrt_rand_normal(4, (uint64_t)i);
    CHECKF(same_across_seeds < 5, "%d of 1000 equal", same_across_seeds);
}
