/*
 * ops.h - the generic tensor ops: one entry point per op, a C implementation for the CPU and a
 * CUDA one behind kernels.h, chosen by the tensors' device.
 *
 * Ops take their stream explicitly (the Lua bindings supply the current one), check devices,
 * dtypes and shapes before touching memory, and name all three in their error messages. Outputs
 * are fresh contiguous tensors unless the op writes into a given `dst`.
 */
#ifndef DSRT_OPS_H
#define DSRT_OPS_H

#include "tensor.h"
#include "opmath.h"

/* in-place writers */
int dsrt_op_copy(dsrt_tensor *dst, dsrt_tensor *src, dsrt_stream *s); /* src broadcasts to dst; converts */
int dsrt_op_fill(dsrt_tensor *dst, double value, dsrt_stream *s);
int dsrt_op_arange(dsrt_tensor *dst, double start, double step, dsrt_stream *s);
/* uniform in [a, b) or, with normal, mean a and std b; draws elements offset, offset+1, ... */
int dsrt_op_rand(dsrt_tensor *dst, uint64_t seed, uint64_t offset, int normal, double a, double b, dsrt_stream *s);

/* new tensors */
dsrt_tensor *dsrt_op_binary(int op, dsrt_tensor *a, dsrt_tensor *b, dsrt_stream *s);
dsrt_tensor *dsrt_op_binary_scalar(int op, dsrt_tensor *a, double x, int scalar_first, dsrt_stream *s);
dsrt_tensor *dsrt_op_unary(int op, dsrt_tensor *a, dsrt_stream *s);
/* The embedding gather (SPEC §4 step 1): out[..., :] = weight[ids[...], :] converted to dtype (f32,
 * bf16 or f16), shape ids.shape + [cols], or with copies > 0 ids.shape + [copies, cols], each row
 * repeated (the decoder's hc residual streams, SPEC §4 step 2, in the same pass). weight: 2-D, any
 * float dtype but fp4, on the stream's device. ids: i32/i64 on the weight's device, or on the CPU
 * for a device weight (then checked and sent up). Host ids outside [0, rows) are an error naming
 * the first; device ids cannot be checked without a synchronisation, so such an id gives a row of
 * NaN (kernels/embedding.cu). */
dsrt_tensor *dsrt_op_embedding(dsrt_tensor *weight, dsrt_tensor *ids, dsrt_dtype dtype, int copies, dsrt_stream *s);
/* dim -1 reduces everything to a 0-d tensor */
dsrt_tensor *dsrt_op_reduce(int op, dsrt_tensor *a, int dim, int keepdim, dsrt_stream *s);
/* [..., m, k] @ [..., k, n] with broadcast batch dimensions; 1-d operands as in torch */
dsrt_tensor *dsrt_op_matmul(dsrt_tensor *a, dsrt_tensor *b, dsrt_stream *s);

const char *dsrt_op_binary_name(int op);
const char *dsrt_op_unary_name(int op);
const char *dsrt_op_reduce_name(int op);

/* C GEMM used by the CPU matmul, exposed for tests: C[m,n] = A[m,k] @ B[k,n], f32, row-major */
void dsrt_gemm_f32(int64_t m, int64_t n, int64_t k, const float *a, int64_t lda, const float *b, int64_t ldb,
                   float *c, int64_t ldc);

#endif
