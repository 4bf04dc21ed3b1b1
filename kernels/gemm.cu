/*
 * gemm.cu - batched row-major matrix products through cuBLAS: C[b] = A[b] @ B[b].
 *
 * What this file protects: the numerics promised in kernels.h. f32 products run in true fp32
 * (CUBLAS_COMPUTE_32F with the default math mode, which never picks TF32 tensor cores) so they
 * match the CPU to fp32 rounding; bf16 products accumulate in fp32 and round once to bf16, and the
 * math mode forbids cuBLAS from reducing split-k partial sums in bf16.
 *
 * Layout: cuBLAS is column-major. A row-major C[m,n] read column-major is C^T[n,m], and
 * C^T = B^T A^T, where B^T and A^T are just B and A read column-major. So the product is asked for
 * with the operands swapped and no transposes: cuBLAS (m', n', k') = (n, m, k), first operand B
 * with leading dimension n, second A with leading dimension k, result leading dimension n.
 *
 * Handles: blas.cuh's one handle per device, shared with linear.cu and moe.cu, defined here.
 */
#include "common.cuh"
#include "blas.cuh"

static std::mutex locks[BLAS_MAX_DEVICES];
static cublasHandle_t handles[BLAS_MAX_DEVICES];

std::mutex &blas_lock(int dev) { return locks[dev]; }

int blas_check(cublasStatus_t status, const char *who, const char *what, int dev)
{
    if (status == CUBLAS_STATUS_SUCCESS) return DSRTK_OK;
    cudaGetLastError(); /* a CUDA failure under cuBLAS must not resurface at our next launch check */
    return dsrtk_fail(status == CUBLAS_STATUS_ALLOC_FAILED ? DSRTK_OOM : DSRTK_ERROR, "%s: %s on cuda:%d: %s", who, what,
                      dev, cublasGetStatusString(status));
}

int blas_handle(int dev, void *stream, const char *who, cublasHandle_t *handle)
{
    if (!handles[dev]) {
        cublasHandle_t h;
        int st = blas_check(cublasCreate(&h), who, "cublasCreate", dev);
        if (st) return st;
        st = blas_check(cublasSetMathMode(h, (cublasMath_t)(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)),
                        who, "cublasSetMathMode", dev);
        if (!st) st = blas_check(cublasSetWorkspace(h, nullptr, 0), who, "cublasSetWorkspace", dev);
        if (st) {
            cublasDestroy(h);
            return st;
        }
        handles[dev] = h;
    }
    *handle = handles[dev];
    return blas_check(cublasSetStream(*handle, (cudaStream_t)stream), who, "cublasSetStream", dev);
}

int dsrtk_matmul(int dev, int dtype, int64_t batch, int64_t m, int64_t n, int64_t k, const void *a, int64_t stride_a,
                 const void *b, int64_t stride_b, void *c, int64_t stride_c, void *stream)
{
    if (dtype != DSRT_F32 && dtype != DSRT_BF16) return dsrtk_fail(DSRTK_ERROR, "matmul: dtype not supported");
    cudaDataType_t type = dtype == DSRT_F32 ? CUDA_R_32F : CUDA_R_16BF;
    size_t elem_bytes = dtype == DSRT_F32 ? 4 : 2;
    if (batch < 0 || m < 0 || n < 0 || k < 0 || stride_a < 0 || stride_b < 0 || stride_c < 0)
        return dsrtk_fail(DSRTK_ERROR, "matmul: negative size or stride (batch %lld, %lld x %lld x %lld)",
                          (long long)batch, (long long)m, (long long)n, (long long)k);
    if (dev < 0 || dev >= BLAS_MAX_DEVICES) return dsrtk_fail(DSRTK_ERROR, "matmul: no device cuda:%d", dev);
    if (batch == 0 || m == 0 || n == 0) return DSRTK_OK;
    /* every batch writes its own C: a shared one would be a race, not a broadcast */
    if (batch > 1 && stride_c < m * n)
        return dsrtk_fail(DSRTK_ERROR, "matmul: output batch stride %lld overlaps %lld x %lld results",
                          (long long)stride_c, (long long)m, (long long)n);
    DSRTK_SET_DEVICE(dev, "matmul");
    cudaStream_t s = (cudaStream_t)stream;

    if (k == 0) { /* an empty sum: C is zero (cuBLAS would refuse a leading dimension of 0) */
        size_t row = (size_t)(m * n) * elem_bytes, pitch = (size_t)(batch > 1 ? stride_c : m * n) * elem_bytes;
        return dsrtk_check(cudaMemset2DAsync(c, pitch, 0, row, (size_t)batch, s),
                           "matmul: cudaMemset2DAsync of %lld empty products on cuda:%d", (long long)batch, dev);
    }

    std::lock_guard<std::mutex> lock(blas_lock(dev));
    cublasHandle_t handle;
    int st = blas_handle(dev, s, "matmul", &handle);
    if (st) return st;
    const float one = 1.0f, zero = 0.0f;
    return blas_check(cublasGemmStridedBatchedEx_64(handle, CUBLAS_OP_N, CUBLAS_OP_N, n, m, k, &one, b, type, n,
                                                      stride_b, a, type, k, stride_a, &zero, c, type, n, stride_c,
                                                      batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                      "matmul", "cublasGemmStridedBatchedEx", dev);
}
