/*
 * q8.cuh - quant.h's Q8 (SPEC §3.5: e4m3 codes and a power-of-two scale per block) on Hopper's e4m3
 * conversions, for every kernel that quantises as it goes: the decode GEMVs' staging (fp8mma.cuh),
 * the fused norm + RoPE + round trip of the KV row and the round-trip pass (norm.cu).
 *
 * What it protects is quant.h's bits. Two shortcuts give them exactly:
 *   - v / s equals v · (1 / s): s is a power of two, so 1 / s is one too and exact (2^-127 as a
 *     subnormal for s = 2^127), and the product rounds the exact quotient once, as the division;
 *   - cvt.rn.satfinite to e4m3 is quant.h's clamp to ±448 and its round to nearest even (a NaN stays
 *     a NaN), and e4m3 -> f16 is exact.
 * numeric.h's bit-level codec, which the kernels ran before, takes ~30 instructions and two branches
 * a value: 2.5-3.4 of the ~6 us of norm_rope_kernel's KV row (H200, globaltimer marks in one warp).
 */
#ifndef DSRTK_Q8_CUH
#define DSRTK_Q8_CUH

#include <stdint.h>
#include <cuda_fp16.h>
#include "../runtime/quant.h"

/* two e4m3 bytes (the low one first) as an f16 pair, exactly */
__device__ __forceinline__ uint32_t e4m3x2_to_f16x2(uint32_t two)
{
    uint32_t r;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"((unsigned short)two));
    return r;
}

/* 1 / s for a scale s = 2^e from dsrt_pow2_ceil (e in [-126, 127]), exactly */
__device__ __forceinline__ float q8_inverse(float s)
{
    const int e = (int)((dsrt_f32_bits(s) >> 23) & 0xffu) - 127;
    return e == 127 ? dsrt_bits_f32(0x00400000u) : dsrt_bits_f32((uint32_t)(127 - e) << 23);
}

/* the e4m3 codes of clamp(a / s) and clamp(b / s), a's in the low byte; inv = q8_inverse(s) */
__device__ __forceinline__ uint32_t q8_codes2(float a, float b, float inv)
{
    unsigned short codes;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(codes) : "f"(b * inv), "f"(a * inv));
    return codes;
}

/* v's Q8 round trip in a block of scale s: each value becomes its code's value times s */
template <int N>
__device__ __forceinline__ void q8_roundtrip(float (&v)[N], float s)
{
    static_assert(N % 2 == 0, "values go through the conversions in pairs");
    const float inv = q8_inverse(s);
#pragma unroll
    for (int i = 0; i < N; i += 2) {
        const uint32_t h = e4m3x2_to_f16x2(q8_codes2(v[i], v[i + 1], inv));
        v[i] = __half2float(__ushort_as_half((unsigned short)h)) * s;
        v[i + 1] = __half2float(__ushort_as_half((unsigned short)(h >> 16))) * s;
    }
}

#endif
