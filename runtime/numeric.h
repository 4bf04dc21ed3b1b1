/*
 * numeric.h - the numbers dsrt agrees on, compiled identically by the C core and the CUDA kernels.
 *
 * What this file protects: a value must not change with the device it is computed on. Every dtype
 * conversion and the counter-based RNG are written once, here, as static inline functions that both
 * gcc (runtime/) and nvcc (kernels/) compile, so `t:to("cuda"):to("bf16")` and `t:to("bf16"):to("cuda")`
 * give the same bits and `dsrt.randn` gives the same numbers on every device. Only integer and exactly
 * rounded IEEE operations are used in the conversions, so there is nothing for two compilers to
 * disagree on.
 *
 * Conventions (torch's, so checkpoints and oracles agree):
 *   bf16, f16   round to nearest even; NaN stays NaN; overflow to inf.
 *   f8e4m3(fn)  round to nearest even; what rounds past 448 (|x| > 464, inf, NaN) becomes NaN
 *               (0x7f|sign), exactly as torch's cast. No infinities.
 *   f8e8m0(fnu) 2^(b-127); b = 255 is NaN; no sign, no zero: the sign is ignored, zero encodes as
 *               b = 0 (2^-127) and the exponent rounds to nearest even as torch does.
 *   fp4e2m1     codes 0..7 = 0 .5 1 1.5 2 3 4 6, bit 3 the sign; packed two per byte, the low nibble
 *               holds the even element. Encoding rounds to nearest with ties to the even code,
 *               saturates at +-6 (inf too) and sends NaN to +0: e2m1 has neither.
 */
#ifndef DSRT_NUMERIC_H
#define DSRT_NUMERIC_H

#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define DSRT_HD __host__ __device__ __forceinline__
#else
#define DSRT_HD static inline
#endif

#define DSRT_MAX_DIMS 8

typedef enum {
    DSRT_F32, DSRT_BF16, DSRT_F16, DSRT_F8E4M3, DSRT_F8E8M0, DSRT_FP4E2M1,
    DSRT_I8, DSRT_U8, DSRT_I32, DSRT_I64, DSRT_BOOL,
    DSRT_NDTYPES
} dsrt_dtype;

/* A strided window on device or host memory, the one shape description both sides take.
 * Element (i0..in-1) lives at element index offset + sum(ik * stride[k]) from data; for fp4 that
 * index is counted in nibbles (byte index >> 1, nibble index & 1). */
typedef struct {
    void *data;
    int dtype;
    int ndim;
    int64_t offset;
    int64_t shape[DSRT_MAX_DIMS];
    int64_t stride[DSRT_MAX_DIMS];
} dsrt_view;

DSRT_HD uint32_t dsrt_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
DSRT_HD float dsrt_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* ---- bf16 ---- */
DSRT_HD float dsrt_bf16_to_f32(uint16_t h) { return dsrt_bits_f32((uint32_t)h << 16); }
DSRT_HD uint16_t dsrt_f32_to_bf16(float f)
{
    uint32_t u = dsrt_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* ---- f16 ---- */
DSRT_HD float dsrt_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) return dsrt_bits_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        if (man == 0) return dsrt_bits_f32(sign);
        float v = (float)man * (1.0f / 16777216.0f); /* man * 2^-24, exact */
        return sign ? -v : v;
    }
    return dsrt_bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}
DSRT_HD uint16_t dsrt_f32_to_f16(float f)
{
    uint32_t u = dsrt_f32_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* >= 65520 rounds to inf */
    if (a < 0x38800000u) {                                    /* below 2^-14: subnormal or zero */
        if (a < 0x33000000u) return (uint16_t)sign;           /* < 2^-25 rounds to 0 */
        uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - e;                             /* 14..24 */
        uint32_t r = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (r & 1u))) r++;
        return (uint16_t)(sign | r);
    }
    a += 0xfffu + ((a >> 13) & 1u);
    return (uint16_t)(sign | (((a - 0x38000000u) >> 13) & 0x7fffu));
}

/* ---- f8 e4m3fn ---- */
DSRT_HD float dsrt_e4m3_to_f32(uint8_t b)
{
    uint32_t sign = (uint32_t)(b & 0x80u) << 24, exp = (b >> 3) & 0xfu, man = b & 7u;
    if (exp == 0xf && man == 7) return dsrt_bits_f32(sign | 0x7fc00000u);
    if (exp == 0) {
        float v = (float)man * (1.0f / 512.0f); /* man * 2^-9 */
        return sign ? -v : v;
    }
    return dsrt_bits_f32(sign | ((exp + 120u) << 23) | (man << 20));
}
DSRT_HD uint8_t dsrt_f32_to_e4m3(float f)
{
    uint32_t u = dsrt_f32_bits(f), sign = (u >> 24) & 0x80u, a = u & 0x7fffffffu;
    if (a >= 0x43f00000u) return (uint8_t)(sign | 0x7fu); /* >= 480, inf, NaN */
    if (a < 0x3c800000u) {                                /* below 2^-6: subnormal or zero */
        uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
        if (e < 117) return (uint8_t)sign;                /* < 2^-10, half the least subnormal */
        uint32_t shift = 141u - e;                        /* value = m * 2^(e-150); step 2^-9 */
        uint32_t r = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (r & 1u))) r++;
        return (uint8_t)(sign | r);
    }
    a += 0x7ffffu + ((a >> 20) & 1u);
    return (uint8_t)(sign | (((a - 0x3c000000u) >> 20) & 0x7fu));
}

/* ---- f8 e8m0fnu ---- */
/* 2^(b - 127); b = 0 is 2^-127, an f32 subnormal (0x00400000), b = 255 NaN (0x7fc00000): both
 * are b << 23 with bit 22 set. No branch: the decode GEMVs convert a scale every 32-64 weights. */
DSRT_HD float dsrt_e8m0_to_f32(uint8_t b)
{
    const uint32_t special = (uint8_t)(b + 1u) <= 1u; /* b is 0 or 255 */
    return dsrt_bits_f32((uint32_t)b << 23 | special << 22);
}
DSRT_HD uint8_t dsrt_f32_to_e8m0(float f)
{
    uint32_t u = dsrt_f32_bits(f), exp = (u >> 23) & 0xffu;
    if (exp == 0xff) return 0xff;
    uint32_t guard = (u >> 22) & 1u, round = (u >> 21) & 1u, sticky = (u & 0x1fffffu) != 0;
    uint32_t lsb = exp > 0; /* the implicit mantissa bit is the e8m0 value's last bit */
    if (guard && (round || sticky || lsb)) exp++;
    return (uint8_t)exp;
}

/* ---- fp4 e2m1 ---- */
DSRT_HD float dsrt_fp4_to_f32(uint8_t code)
{
    /* magnitudes in halves: 0 1 2 3 4 6 8 12 */
    uint32_t m = code & 7u;
    float v = (m < 4) ? 0.5f * (float)m : (float)(1u << (m / 2u - 1u)) * (1.0f + 0.5f * (float)(m & 1u));
    return (code & 8u) ? -v : v;
}
DSRT_HD uint8_t dsrt_f32_to_fp4(float f)
{
    uint32_t u = dsrt_f32_bits(f), sign = (u >> 28) & 8u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return 0;
    float x = dsrt_bits_f32(a);
    /* midpoints between neighbouring codes; a tie goes to the even code */
    uint8_t c;
    if (x < 0.25f) c = 0; else if (x == 0.25f) c = 0;
    else if (x < 0.75f) c = 1; else if (x == 0.75f) c = 2;
    else if (x < 1.25f) c = 2; else if (x == 1.25f) c = 2;
    else if (x < 1.75f) c = 3; else if (x == 1.75f) c = 4;
    else if (x < 2.5f) c = 4;  else if (x == 2.5f) c = 4;
    else if (x < 3.5f) c = 5;  else if (x == 3.5f) c = 6;
    else if (x < 5.0f) c = 6;  else if (x == 5.0f) c = 6;
    else c = 7;
    return (uint8_t)(sign | c);
}

/* ---- generic element access: floats travel as f32, integers as int64 ---- */
DSRT_HD int dsrt_dtype_is_float(int dt) { return dt <= DSRT_FP4E2M1; }

DSRT_HD float dsrt_load_f32(const void *base, int dt, int64_t i)
{
    switch (dt) {
    case DSRT_F32: return ((const float *)base)[i];
    case DSRT_BF16: return dsrt_bf16_to_f32(((const uint16_t *)base)[i]);
    case DSRT_F16: return dsrt_f16_to_f32(((const uint16_t *)base)[i]);
    case DSRT_F8E4M3: return dsrt_e4m3_to_f32(((const uint8_t *)base)[i]);
    case DSRT_F8E8M0: return dsrt_e8m0_to_f32(((const uint8_t *)base)[i]);
    case DSRT_FP4E2M1: return dsrt_fp4_to_f32((uint8_t)((((const uint8_t *)base)[i >> 1] >> ((i & 1) * 4)) & 15u));
    case DSRT_I8: return (float)((const int8_t *)base)[i];
    case DSRT_U8: return (float)((const uint8_t *)base)[i];
    case DSRT_I32: return (float)((const int32_t *)base)[i];
    case DSRT_I64: return (float)((const int64_t *)base)[i];
    default: return ((const uint8_t *)base)[i] ? 1.0f : 0.0f;
    }
}

DSRT_HD int64_t dsrt_load_i64(const void *base, int dt, int64_t i)
{
    switch (dt) {
    case DSRT_I8: return ((const int8_t *)base)[i];
    case DSRT_U8: return ((const uint8_t *)base)[i];
    case DSRT_I32: return ((const int32_t *)base)[i];
    case DSRT_I64: return ((const int64_t *)base)[i];
    case DSRT_BOOL: return ((const uint8_t *)base)[i] != 0;
    default: {
        float f = dsrt_load_f32(base, dt, i); /* truncation toward zero, as C casts */
        if (!(f == f)) return 0;
        if (f >= 9.2233720368547758e18f) return INT64_MAX;
        if (f <= -9.2233720368547758e18f) return INT64_MIN;
        return (int64_t)f;
    }
    }
}

/* Stores wrap integers modulo their width as torch does; fp4 stores touch one nibble only (on the
 * GPU atomically, so any strided fp4 view can be written by many threads at once). */
DSRT_HD void dsrt_store_f32(void *base, int dt, int64_t i, float v)
{
    switch (dt) {
    case DSRT_F32: ((float *)base)[i] = v; break;
    case DSRT_BF16: ((uint16_t *)base)[i] = dsrt_f32_to_bf16(v); break;
    case DSRT_F16: ((uint16_t *)base)[i] = dsrt_f32_to_f16(v); break;
    case DSRT_F8E4M3: ((uint8_t *)base)[i] = dsrt_f32_to_e4m3(v); break;
    case DSRT_F8E8M0: ((uint8_t *)base)[i] = dsrt_f32_to_e8m0(v); break;
    case DSRT_FP4E2M1: {
        uint8_t *p = (uint8_t *)base + (i >> 1);
#ifdef __CUDA_ARCH__
        /* the other nibble of the byte may be another thread's: update ours atomically, in the
         * aligned word around it (device allocations are whole words) */
        uint32_t *word = (uint32_t *)((uintptr_t)p & ~(uintptr_t)3);
        int sh = (int)((uintptr_t)p & 3) * 8 + (int)(i & 1) * 4;
        atomicAnd(word, ~(15u << sh));
        atomicOr(word, (uint32_t)dsrt_f32_to_fp4(v) << sh);
#else
        int sh = (int)(i & 1) * 4;
        *p = (uint8_t)((*p & ~(15u << sh)) | ((uint32_t)dsrt_f32_to_fp4(v) << sh));
#endif
        break;
    }
    case DSRT_BOOL: ((uint8_t *)base)[i] = v != 0.0f; break;
    default: {
        int64_t x = 0;
        if (v == v) x = v >= 9.2233720368547758e18f ? INT64_MAX : v <= -9.2233720368547758e18f ? INT64_MIN : (int64_t)v;
        switch (dt) {
        case DSRT_I8: ((int8_t *)base)[i] = (int8_t)x; break;
        case DSRT_U8: ((uint8_t *)base)[i] = (uint8_t)x; break;
        case DSRT_I32: ((int32_t *)base)[i] = (int32_t)x; break;
        default: ((int64_t *)base)[i] = x; break;
        }
    }
    }
}

DSRT_HD void dsrt_store_i64(void *base, int dt, int64_t i, int64_t v)
{
    switch (dt) {
    case DSRT_I8: ((int8_t *)base)[i] = (int8_t)v; break;
    case DSRT_U8: ((uint8_t *)base)[i] = (uint8_t)v; break;
    case DSRT_I32: ((int32_t *)base)[i] = (int32_t)v; break;
    case DSRT_I64: ((int64_t *)base)[i] = v; break;
    case DSRT_BOOL: ((uint8_t *)base)[i] = v != 0; break;
    default: dsrt_store_f32(base, dt, i, (float)v); break;
    }
}

/* Element index of the linear position `lin` (row-major over shape) inside a view. */
DSRT_HD int64_t dsrt_view_index(const dsrt_view *v, int64_t lin)
{
    int64_t idx = v->offset;
    for (int d = v->ndim - 1; d >= 0; d--) {
        int64_t n = v->shape[d];
        idx += (lin % n) * v->stride[d];
        lin /= n;
    }
    return idx;
}

/* ---- Philox-4x32-10 (Salmon et al., SC'11): counter-based, so element i of a draw depends only on
 * (seed, offset + i), never on the device, the thread layout or what was drawn before. ---- */
DSRT_HD void dsrt_philox(uint64_t counter, uint64_t key, uint32_t out[4])
{
    uint32_t c0 = (uint32_t)counter, c1 = (uint32_t)(counter >> 32), c2 = 0, c3 = 0;
    uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
    for (int r = 0; r < 10; r++) {
        uint64_t p0 = (uint64_t)0xD2511F53u * c0, p1 = (uint64_t)0xCD9E8D57u * c2;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        c1 = (uint32_t)p1; c3 = (uint32_t)p0; c0 = n0; c2 = n2;
        k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
    }
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

/* Uniform in [0, 1): 24 random bits, exact in f32. */
DSRT_HD float dsrt_rand_uniform(uint64_t seed, uint64_t i)
{
    uint32_t r[4];
    dsrt_philox(i, seed, r);
    return (float)(r[0] >> 8) * (1.0f / 16777216.0f);
}

/* Standard normal by Box-Muller in double: the double result is rounded to f32, so the few-ulp
 * differences between libm and CUDA's double log/cos vanish except on a ~1e-9 chance per value. */
#ifdef __CUDACC__
#define DSRT_LOG log
#define DSRT_COS cos
#define DSRT_SQRT sqrt
#else
#include <math.h>
#define DSRT_LOG log
#define DSRT_COS cos
#define DSRT_SQRT sqrt
#endif
DSRT_HD float dsrt_rand_normal(uint64_t seed, uint64_t i)
{
    uint32_t r[4];
    dsrt_philox(i, seed, r);
    uint64_t a = ((uint64_t)r[0] << 21) ^ (r[1] >> 11);  /* 53 bits */
    uint64_t b = ((uint64_t)r[2] << 21) ^ (r[3] >> 11);
    double u1 = ((double)(a & ((1ull << 53) - 1)) + 1.0) * (1.0 / 9007199254740992.0); /* (0, 1] */
    double u2 = (double)(b & ((1ull << 53) - 1)) * (1.0 / 9007199254740992.0);         /* [0, 1) */
    return (float)(DSRT_SQRT(-2.0 * DSRT_LOG(u1)) * DSRT_COS(6.283185307179586 * u2));
}

#endif
