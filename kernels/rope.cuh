/*
 * rope.cuh - the arithmetic of RoPE (SPEC §3.6, nn.h dsrt_nn_rope) for every kernel that rotates:
 * norm.cu's RoPE and its fused pass after a projection, sparse_attention.cu's inverse rotation of
 * its output. One definition, so that a rotation folded into another kernel gives the bits of the
 * separate RoPE pass it replaces.
 *
 * θ_i(t) = fp32(fp32(t)·f_i) exactly as the CPU (one rounded product; (float) of an int64 rounds to
 * nearest); cos and sin are evaluated in double and rounded to fp32 (norm.cu's file comment: they
 * are correctly rounded but for rare cases, where glibc's cosf/sinf may differ by one ulp); the
 * rotation is the CPU's fp32 products and sums, with explicitly rounded intrinsics so that nvcc
 * cannot contract them into FMAs.
 */
#ifndef DSRTK_ROPE_CUH
#define DSRTK_ROPE_CUH

#include <stdint.h>

struct RopeFreqs {
    float f[32]; /* DSRT_NN_ROPE_PAIRS, computed on the host by nn.c's rope_freqs: the CPU's bits */
};

/* cos and sin of pair i's angle at position p */
__device__ __forceinline__ void rope_cos_sin(int64_t p, float freq, float &cs, float &sn)
{
    const float angle = __fmul_rn((float)p, freq);
    cs = (float)cos((double)angle);
    sn = (float)sin((double)angle);
}

/* (a + jb)·(c ± js) in fp32, the CPU's products and sums: the pair's two outputs */
__device__ __forceinline__ void rope_rotate(float a, float b, float cc, float ss, int inverse, float &o0, float &o1)
{
    o0 = inverse ? __fadd_rn(__fmul_rn(a, cc), __fmul_rn(b, ss)) : __fsub_rn(__fmul_rn(a, cc), __fmul_rn(b, ss));
    o1 = inverse ? __fsub_rn(__fmul_rn(b, cc), __fmul_rn(a, ss)) : __fadd_rn(__fmul_rn(a, ss), __fmul_rn(b, cc));
}

#endif
