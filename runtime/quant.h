/*
 * quant.h - the activation quantisers of DeepSeek-V4's reference numerics (SPEC §3.3-3.4), one
 * definition shared by every layer that quantises (linears, the KV latent, the indexer), on the
 * CPU and, compiled by nvcc, on the GPU.
 *
 * Scales are powers of two chosen with the reference's bit trick (ue8m0): the exponent of
 * amax·(1/max_code), plus one when any mantissa bit is set, so x/s and q·s are exact and a round
 * trip equals storing (codes, scales). The constants are products with the fp32 reciprocal, not
 * divisions, because that is what the tilelang kernels compute and the last bit can differ.
 */
#ifndef DSRT_QUANT_H
#define DSRT_QUANT_H

#include "numeric.h"

/* The two numerics of the model: "reference" follows DeepSeek's kernels (bf16 activations, fp32
 * where the reference uses it, the FP8/FP4 round trips); "fp32" computes in fp32 with no round
 * trips, the mode the transformers oracle is compared in. */
typedef enum { DSRT_PREC_REFERENCE, DSRT_PREC_FP32 } dsrt_precision;

/* 2^ceil(log2(v)) for v > 0 normal, by the exponent field (SPEC §3.3) */
DSRT_HD float dsrt_pow2_ceil(float v)
{
    uint32_t bits = dsrt_f32_bits(v);
    int32_t e = (int32_t)((bits >> 23) & 0xffu) - 127 + ((bits & 0x7fffffu) != 0);
    if (e < -126) e = -126;
    if (e > 127) e = 127;
    return dsrt_bits_f32((uint32_t)(e + 127) << 23);
}

/* Q8 of one block: codes (e4m3 bytes) and the block's scale; returns the scale */
DSRT_HD float dsrt_q8_block(const float *x, int n, uint8_t *codes)
{
    float amax = 1e-4f;
    for (int i = 0; i < n; i++) {
        float a = x[i] < 0 ? -x[i] : x[i];
        if (a > amax) amax = a;
    }
    float s = dsrt_pow2_ceil(amax * (1.0f / 448.0f));
    for (int i = 0; i < n; i++) {
        float v = x[i] / s;
        v = v > 448.0f ? 448.0f : v < -448.0f ? -448.0f : v;
        codes[i] = dsrt_f32_to_e4m3(v);
    }
    return s;
}

/* Q8 round trip in place over blocks of `blk` (the last block may be shorter) */
DSRT_HD void dsrt_q8_roundtrip(float *x, int n, int blk)
{
    uint8_t codes[128];
    for (int b = 0; b < n; b += blk) {
        int len = n - b < blk ? n - b : blk;
        float s = dsrt_q8_block(x + b, len, codes);
        for (int i = 0; i < len; i++) x[b + i] = dsrt_e4m3_to_f32(codes[i]) * s;
    }
}

/* Q4 round trip in place, blocks of 32 (SPEC §3.4) */
DSRT_HD void dsrt_q4_roundtrip(float *x, int n)
{
    for (int b = 0; b < n; b += 32) {
        int len = n - b < 32 ? n - b : 32;
        float amax = 6.0f * 1.17549435e-38f; /* 6·2^-126 */
        for (int i = 0; i < len; i++) {
            float a = x[b + i] < 0 ? -x[b + i] : x[b + i];
            if (a > amax) amax = a;
        }
        float s = dsrt_pow2_ceil(amax * (1.0f / 6.0f));
        for (int i = 0; i < len; i++) {
            float v = x[b + i] / s;
            v = v > 6.0f ? 6.0f : v < -6.0f ? -6.0f : v;
            x[b + i] = dsrt_fp4_to_f32(dsrt_f32_to_fp4(v)) * s;
        }
    }
}

#endif
