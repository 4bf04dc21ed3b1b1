/*
 * mma.cuh - the tensor-core instructions the kernels use (mma.sync m16n8k16 and wgmma, f32
 * accumulators), one wrapper each, so that hc.cu, sparse_attention.cu, moe.cu and fp8mma.cuh state the
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

/* ---- warpgroup level (sm_90a): wgmma, B from shared memory, A from shared memory or registers ----
 *
 * Operands are K-major tiles in the 128-byte swizzle: rows of 128 bytes, 16-byte chunk c of row r
 * stored at chunk c ^ (r & 7), tiles 1024-byte aligned (the swizzle is computed from address
 * bits). A descriptor names a tile's first row; 8-row groups lie 1024 bytes apart. Accumulator
 * layout of an m64nN tile (PTX ISA): warp w of the warpgroup holds rows 16w + g and 16w + g + 8;
 * d[4j + 2h + i] is row 16w + g + 8h, column 8j + 2q + i (lane = 4g + q), mma_bf16's C per 8
 * columns. */
/* a descriptor's high word: 8-row groups 1024 bytes apart, the 128-byte swizzle */
enum : uint32_t { WGMMA_SW128_HIGH = (1024 >> 4) | 1u << 30 };
__device__ __forceinline__ uint32_t wgmma_desc_sw128_low(uint32_t shared_at) { return ((shared_at & 0x3ffffu) >> 4) | 1u << 16; }
__device__ __forceinline__ uint64_t wgmma_desc_sw128(const void *tile)
{
    return (uint64_t)WGMMA_SW128_HIGH << 32 | wgmma_desc_sw128_low((uint32_t)__cvta_generic_to_shared(tile));
}

/* the descriptor of the same rows `bytes` further along K (inside the 128-byte row) */
__device__ __forceinline__ uint64_t wgmma_desc_advance(uint64_t desc, int bytes) { return desc + (uint64_t)(bytes >> 4); }

/* orders the warpgroup's register and shared-memory accesses before the wgmmas that follow */
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }

/* d = A·Bᵀ over one k32 step, fresh (scale-d 0): A 64x32 e4m3 from registers, warp w's rows
 * 16w + g (a0, a2) and 16w + g + 8 (a1, a3), columns 4q..4q+3 (a0, a1) and 16 + 4q.. (a2, a3), four
 * codes a register, the low byte first; B 8x32 e4m3 rows (K-major) in shared memory, named by the
 * low word of its descriptor (wgmma_desc_sw128_low: the high word is a constant, and a 64-bit
 * descriptor computed per call costs a 64-bit add and two moves to uniform registers); d as the
 * m64n8 accumulator above. Hopper's FP8 tensor cores sum the products with fewer bits than fp32
 * (about 14 significant: DeepSeek-V3 §3.3.2), which callers account for by promoting each sum at
 * once. Asynchronous: d is the warpgroup's after wgmma_commit, wgmma_wait_all and wgmma_pin. */
__device__ __forceinline__ void wgmma_m64n8k32_e4m3_rs(float (&d)[4], const uint32_t (&a)[4], uint32_t b_low)
{
    asm volatile("{\n.reg .b64 b;\nmov.b64 b, {%8, %9};\n"
                 "wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3 {%0, %1, %2, %3}, {%4, %5, %6, %7}, b, 0, 1, 1;\n}\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b_low), "r"((uint32_t)WGMMA_SW128_HIGH));
}

/* d += A·Bᵀ, as wgmma_m64n8k32_e4m3_rs otherwise */
__device__ __forceinline__ void wgmma_m64n8k32_e4m3_rs_acc(float (&d)[4], const uint32_t (&a)[4], uint32_t b_low)
{
    asm volatile("{\n.reg .b64 b;\nmov.b64 b, {%8, %9};\n"
                 "wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3 {%0, %1, %2, %3}, {%4, %5, %6, %7}, b, 1, 1, 1;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b_low), "r"((uint32_t)WGMMA_SW128_HIGH));
}

/* after wgmma_wait_all: keeps the compiler from reading an accumulator before the wait */
__device__ __forceinline__ void wgmma_pin(float (&d)[4])
{
    asm volatile("" : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])::"memory");
}

/* generic-proxy writes to shared memory (st.shared, cp.async) made visible to wgmma's reads */
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

/* d += A·Bᵀ over one k16 step: A 64x16 bf16 from registers (mma_bf16's A fragment per warp: warp
 * w's rows 16w + g and 16w + g + 8), B Nx16 bf16 rows (K-major) in shared memory, d the m64nN
 * accumulator above. Asynchronous: a's registers and d stay the wgmma's until a wait retires its
 * group; callers pin them (wgmma_pin_regs) after that wait, or the compiler may reuse a's registers
 * while the tensor cores still read them. One wrapper per N the prefill's expert GEMM takes. */
__device__ __forceinline__ void wgmma_m64n32k16_bf16_rs(float (&d)[16], const uint32_t (&a)[4], uint64_t b)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {"
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
                 "}, {%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

__device__ __forceinline__ void wgmma_m64n64k16_bf16_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t b)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
                 "}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

__device__ __forceinline__ void wgmma_m64n96k16_bf16_rs(float (&d)[48], const uint32_t (&a)[4], uint64_t b)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %53, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n96k16.f32.bf16.bf16 {"
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
                 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47"
                 "}, {%48, %49, %50, %51}, %52, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
                   "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
                   "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

/* N_MAJOR: B's rows run along N instead (wgmma's transposed B: 8-row groups along K lie SBO bytes
 * apart, 64-column groups along N LBO bytes apart; sparse_attention.cu's V) */
template <int N_MAJOR = 0>
__device__ __forceinline__ void wgmma_m64n128k16_bf16_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t b)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
                 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
                 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
                 "}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
                   "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
                   "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
                   "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
                   "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1), "n"(N_MAJOR));
}

/* d = A·Bᵀ (accumulate 0) or d += A·Bᵀ over one k16 step, A 64x16 and B 64x16 bf16, both K-major
 * tiles in shared memory (descriptors as wgmma_desc_sw128), d the m64n64 accumulator above */
__device__ __forceinline__ void wgmma_m64n64k16_bf16_ss(float (&d)[32], uint64_t a, uint64_t b, int accumulate)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
                 "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "l"(a), "l"(b), "r"(accumulate));
}

/* waits until at most one committed wgmma group is in flight */
__device__ __forceinline__ void wgmma_wait_one() { asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory"); }

/* The values are in their registers here: placed after the wait that retires the wgmmas reading
 * them, it keeps the compiler from reusing those registers earlier; placed before wgmma_fence, it
 * keeps their computation from being sunk between the wgmmas (ptxas then serialises them).
 * wgmma_pin_acc is the same for an accumulator of any size (wgmma_pin: the m64n8 one). */
template <int N> __device__ __forceinline__ void wgmma_pin_regs(uint32_t (&r)[N])
{
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+r"(r[i])::"memory");
}
template <int N> __device__ __forceinline__ void wgmma_pin_acc(float (&d)[N])
{
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(d[i])::"memory");
}

/* ---- shared-memory staging ---- */

/* 16 bytes global -> shared, asynchronous, L2 only (streamed: the L1 keeps the rest), to a shared
 * address already converted (__cvta_generic_to_shared) */
__device__ __forceinline__ void cp_async16_at(uint32_t smem, const void *gmem)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem), "l"(gmem) : "memory");
}
/* 16 bytes as cp_async16_at where `copy`, else 16 zero bytes (nothing read at gmem) */
__device__ __forceinline__ void cp_async16_or_zero_at(uint32_t smem, const void *gmem, bool copy)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(copy ? 16 : 0) : "memory");
}
/* the same from a generic pointer to shared memory */
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem)
{
    cp_async16_at((uint32_t)__cvta_generic_to_shared(smem), gmem);
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
/* waits until at most `pending` of this thread's committed groups are in flight */
template <int pending> __device__ __forceinline__ void cp_async_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all()
{
    cp_async_commit();
    cp_async_wait<0>();
}

#endif
