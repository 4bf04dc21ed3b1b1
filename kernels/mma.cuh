/*
 * mma.cuh - the warp-level tensor-core instructions the kernels use (mma.sync m16n8k16, f32
 * accumulators), one wrapper each, so that hc.cu, sparse_attention.cu and fp8mma.cuh state the
 * operand order once. Fragment layout (PTX ISA): lane = 4·g + q; A regs a0/a2 hold row g, a1/a3
 * row g + 8, two k-slots each (a0/a1: 2q, 2q + 1; a2/a3: 8 + 2q, 9 + 2q); B regs b0/b1 hold
 * column g at the same k-slots; C c0, c1 = (row g, columns 2q, 2q + 1), c2, c3 = (row g + 8, same).
 */
#ifndef DSRT_KERNELS_MMA_CUH
#define DSRT_KERNELS_MMA_CUH

#include <stdint.h>

/* c += A·B, A 16x16 bf16 (row), B 16x8 bf16 (col) */
__device__ __forceinline__ void mma_bf16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* c += A·B, A 16x16 f16 (row), B 16x8 f16 (col) */
__device__ __forceinline__ void mma_f16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                        uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

#endif
