/*
 * embedding.cu - the embedding gather of SPEC §4 step 1: out[i, :] = weight[ids[i], :], converted
 * to the output dtype (bf16 activations in the reference precision, f32 in fp32).
 *
 * What this file protects: the row the model starts from is the checkpoint's row, bit for bit, on
 * every device. The reference is the CPU loop of runtime/ops.c (cpu_embedding): equal dtypes move
 * raw bits, different ones convert each element through numeric.h's dsrt_load_f32/dsrt_store_f32,
 * exactly the functions used here, so the GPU result equals the CPU's bit for bit.
 *
 * Shape of the work: one block per gathered row (a grid-stride loop over rows), the block's threads
 * over the row's columns, each value stored to the row's `copies` output rows: the decoder's
 * residual streams start as hc copies of the embedding (SPEC §4 step 2), written here in the same
 * launch (a decode step's first kernels are paced by the host's launches: the separate copy's
 * launch held the step's third kernel back ~5 us, CUPTI timeline, H200). A Flash decode step
 * gathers one row of 4096 bf16 (8 KiB); a 4096-token prefill 32 MiB read + 4 x 32 MiB written:
 * memory-bound, so the two common cases — same dtype and bf16 -> f32, rows contiguous and 16-byte
 * aligned — move 16-byte vectors; everything else (strided weights, f16, f8 sources) takes the
 * generic element loop.
 *
 * Ids cannot be range-checked here without a synchronisation (launchers never synchronise), so an
 * id outside [0, rows) writes a row of NaN: it cannot go unnoticed downstream, and the core checks
 * host ids before they go up (dsrt_op_embedding).
 */
#include "common.cuh"

namespace {

struct gather_args {
    dsrt_view dst, weight; /* dst contiguous [n·copies, cols]; weight 2-D, any strides */
    const void *ids;
    int ids_i64, copies;   /* copies: each gathered row is written to that many consecutive rows */
    int64_t n, rows, cols;
};

__device__ __forceinline__ int64_t load_id(const gather_args &a, int64_t i)
{
    return a.ids_i64 ? ((const int64_t *)a.ids)[i] : (int64_t)((const int32_t *)a.ids)[i];
}

/* The generic path: element by element through numeric.h, as the CPU loop. */
__global__ void __launch_bounds__(DSRTK_BLOCK) gather_generic(const __grid_constant__ gather_args a)
{
    dsrtk_wait_producer(); /* launched dependent (common.cuh): the ids may be the kernel before's */
    const int same = a.dst.dtype == a.weight.dtype;
    for (int64_t r = blockIdx.x; r < a.n; r += gridDim.x) {
        int64_t id = load_id(a, r), out = a.dst.offset + r * a.copies * a.cols;
        int ok = id >= 0 && id < a.rows;
        int64_t base = a.weight.offset + (ok ? id : 0) * a.weight.stride[0];
        for (int64_t c = threadIdx.x; c < a.cols; c += blockDim.x) {
            int64_t at = base + c * a.weight.stride[1];
            for (int64_t o = out + c; o < out + a.copies * a.cols; o += a.cols) {
                if (!ok) {
                    dsrt_store_f32(a.dst.data, a.dst.dtype, o, __int_as_float(0x7fc00000));
                } else if (same) {
                    switch (a.dst.dtype) {
                    case DSRT_F32: ((uint32_t *)a.dst.data)[o] = ((const uint32_t *)a.weight.data)[at]; break;
                    case DSRT_BF16: case DSRT_F16:
                        ((uint16_t *)a.dst.data)[o] = ((const uint16_t *)a.weight.data)[at]; break;
                    default: break; /* the launcher admits only f32, bf16 and f16 outputs */
                    }
                } else {
                    dsrt_store_f32(a.dst.data, a.dst.dtype, o, dsrt_load_f32(a.weight.data, a.weight.dtype, at));
                }
            }
        }
    }
}

/* Same dtype, contiguous aligned rows: 16-byte vectors (vecs = row bytes / 16). */
__global__ void __launch_bounds__(DSRTK_BLOCK) gather_bits(const __grid_constant__ gather_args a, int64_t vecs,
                                                            int64_t weight_row_vecs)
{
    dsrtk_wait_producer(); /* launched dependent (common.cuh): the ids may be the kernel before's */
    const uint4 *w = (const uint4 *)a.weight.data; /* the launcher folded the offset into data */
    uint4 *d = (uint4 *)a.dst.data;
    const uint4 nan4 = make_uint4(0x7fc07fc0u, 0x7fc07fc0u, 0x7fc07fc0u, 0x7fc07fc0u); /* two bf16 NaN */
    const uint4 nanf = make_uint4(0x7fc00000u, 0x7fc00000u, 0x7fc00000u, 0x7fc00000u);  /* f32 NaN */
    const uint4 nanh = make_uint4(0x7e007e00u, 0x7e007e00u, 0x7e007e00u, 0x7e007e00u);  /* two f16 NaN */
    const uint4 bad = a.dst.dtype == DSRT_F32 ? nanf : a.dst.dtype == DSRT_BF16 ? nan4 : nanh;
    for (int64_t r = blockIdx.x; r < a.n; r += gridDim.x) {
        int64_t id = load_id(a, r);
        int ok = id >= 0 && id < a.rows;
        const uint4 *src = w + (ok ? id : 0) * weight_row_vecs;
        uint4 *out = d + r * a.copies * vecs;
        for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) {
            const uint4 x = ok ? __ldg(src + v) : bad;
            for (int j = 0; j < a.copies; j++) out[j * vecs + v] = x;
        }
    }
}

/* bf16 weight -> f32 output, contiguous aligned rows: 8 values (16 bytes in, 32 out) per step. The
 * conversion is exact (a bf16 is the top half of an f32), as numeric.h's dsrt_bf16_to_f32. */
__global__ void __launch_bounds__(DSRTK_BLOCK) gather_bf16_f32(const __grid_constant__ gather_args a, int64_t vecs,
                                                                int64_t weight_row_vecs)
{
    dsrtk_wait_producer(); /* launched dependent (common.cuh) */
    const uint4 *w = (const uint4 *)a.weight.data;
    float4 *d = (float4 *)a.dst.data;
    const float nan = __int_as_float(0x7fc00000);
    for (int64_t r = blockIdx.x; r < a.n; r += gridDim.x) {
        int64_t id = load_id(a, r);
        int ok = id >= 0 && id < a.rows;
        const uint4 *src = w + (ok ? id : 0) * weight_row_vecs;
        float4 *out = d + r * a.copies * vecs * 2;
        for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) {
            float4 lo = make_float4(nan, nan, nan, nan), hi = lo;
            if (ok) {
                uint4 p = __ldg(src + v);
                lo = make_float4(__uint_as_float(p.x << 16), __uint_as_float(p.x & 0xffff0000u),
                                 __uint_as_float(p.y << 16), __uint_as_float(p.y & 0xffff0000u));
                hi = make_float4(__uint_as_float(p.z << 16), __uint_as_float(p.z & 0xffff0000u),
                                 __uint_as_float(p.w << 16), __uint_as_float(p.w & 0xffff0000u));
            }
            for (int j = 0; j < a.copies; j++) out[2 * (j * vecs + v)] = lo, out[2 * (j * vecs + v) + 1] = hi;
        }
    }
}

int aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

} // namespace

extern "C" int dsrtk_embedding(int dev, const dsrt_view *dst, const dsrt_view *weight, const void *ids, int ids_dtype,
                               int64_t n, int copies, void *stream)
{
    const char *what = "embedding";
    if (copies < 1) return dsrtk_fail(DSRTK_ERROR, "%s: %d copies of each row", what, copies);
    if (weight->ndim != 2 || dst->ndim != 2 || dst->shape[0] != n * copies || dst->shape[1] != weight->shape[1])
        return dsrtk_fail(DSRTK_ERROR, "%s: output [%lld, %lld] does not fit %lld ids x %d copies of a [%lld, %lld] weight", what,
                          (long long)dst->shape[0], (long long)(dst->ndim > 1 ? dst->shape[1] : -1), (long long)n, copies,
                          (long long)weight->shape[0], (long long)(weight->ndim > 1 ? weight->shape[1] : -1));
    if (dst->dtype != DSRT_F32 && dst->dtype != DSRT_BF16 && dst->dtype != DSRT_F16)
        return dsrtk_fail(DSRTK_ERROR, "%s: output dtype %d is not f32, bf16 or f16", what, dst->dtype);
    if (!dsrt_dtype_is_float(weight->dtype) || weight->dtype == DSRT_FP4E2M1)
        return dsrtk_fail(DSRTK_ERROR, "%s: weight dtype %d is not a float dtype (fp4 excluded)", what, weight->dtype);
    if (ids_dtype != DSRT_I32 && ids_dtype != DSRT_I64)
        return dsrtk_fail(DSRTK_ERROR, "%s: ids dtype %d is not i32 or i64", what, ids_dtype);
    if (!dsrtk_is_contiguous(dst))
        return dsrtk_fail(DSRTK_ERROR, "%s: the output must be contiguous", what);
    if (n == 0 || dst->shape[1] == 0) return DSRTK_OK;
    DSRTK_SET_DEVICE(dev, what);

    gather_args a;
    a.dst = *dst;
    a.weight = *weight;
    a.ids = ids;
    a.ids_i64 = ids_dtype == DSRT_I64;
    a.copies = copies;
    a.n = n;
    a.rows = weight->shape[0];
    a.cols = weight->shape[1];
    /* a block per row, up to 16 resident blocks per multiprocessor; more rows loop */
    int64_t most = (int64_t)dsrtk_multiprocessors(dev) * 16;
    int grid = (int)(n < most ? n : most);
    cudaStream_t st = (cudaStream_t)stream;

    /* the vector paths: unit column stride, rows whole 16-byte vectors, everything 16-byte aligned */
    size_t wsize = dsrtk_dtype_size(weight->dtype), dsize = dsrtk_dtype_size(dst->dtype);
    const char *wbase = (const char *)weight->data + weight->offset * (int64_t)wsize;
    char *dbase = (char *)dst->data + dst->offset * (int64_t)dsize;
    int rows_ok = (weight->stride[1] == 1 || a.cols == 1) && aligned16(wbase) && aligned16(dbase) &&
                  (a.cols * (int64_t)wsize) % 16 == 0 && (weight->stride[0] * (int64_t)wsize) % 16 == 0;
    if (rows_ok && weight->dtype == dst->dtype) {
        gather_args v = a;
        v.weight.data = (void *)wbase;
        v.dst.data = dbase;
        (void)dsrtk_launch_dependent(gather_bits, dim3(grid), dim3(DSRTK_BLOCK), 0, st, v, a.cols * (int64_t)wsize / 16,
                                     weight->stride[0] * (int64_t)wsize / 16);
        return dsrtk_check_launch("embedding (vector copy)", dev);
    }
    if (rows_ok && weight->dtype == DSRT_BF16 && dst->dtype == DSRT_F32) {
        gather_args v = a;
        v.weight.data = (void *)wbase;
        v.dst.data = dbase;
        (void)dsrtk_launch_dependent(gather_bf16_f32, dim3(grid), dim3(DSRTK_BLOCK), 0, st, v, a.cols * 2 / 16,
                                     weight->stride[0] * 2 / 16);
        return dsrtk_check_launch("embedding (bf16 -> f32)", dev);
    }
    (void)dsrtk_launch_dependent(gather_generic, dim3(grid), dim3(DSRTK_BLOCK), 0, st, a);
    return dsrtk_check_launch("embedding", dev);
}
