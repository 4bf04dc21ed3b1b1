/*
 * linear.h - DeepSeek-V4's linear layers: y = x·Wᵀ with W in the checkpoint's own storage formats
 * (SPEC §2.1), under the two precisions of quant.h (SPEC §3.3-3.5, §6.8, §9.1).
 *
 * What this protects: every projection of the model goes through one object whose constructor has
 * checked the weight's dtype and shape and its scales' dtype and shape against the format, so a
 * wrong tensor fails when the model is built, naming what is wrong, instead of producing numbers.
 * The numerics of each kind of linear are decided here once:
 *
 *   format  precision   activation          weight          accumulate  output
 *   fp8     reference   Q8(x, 128)          e4m3 · S[128²]  fp32        bf16
 *   fp4     reference   Q8(x, 128)          e2m1 · S[1×32]  fp32        bf16
 *   bf16    reference   as given            bf16            fp32        bf16
 *   any     fp32        as given            dequantised     fp32        f32
 *   fp32_math (router gate, compressor wkv/wgate, LM head; SPEC §3.5): weight and input upcast,
 *           no activation quantisation, f32 output, in both precisions.
 *   groups = G (the grouped low-rank wo_a, SPEC §6.8): z[g, r] = Σ_c x[g, c]·W[g·R + r, c], one GEMM
 *           per group on the dequantised weight with NO activation quantisation (the reference
 *           dequantises wo_a to bf16 and runs a bf16 einsum); bf16 output in reference mode.
 *
 * How the reference numerics are met on the CPU: the weight is dequantised exactly to f32 once per
 * layer object (lazily, on the first forward; e4m3 or e2m1 codes times power-of-two scales are exact
 * in f32, and so is a bf16 weight) and kept transposed per group, [G, in/G, out/G], as the row-major
 * B operand of dsrt_gemm_f32. The activation is Q8 round-tripped (quant.h) in place of the reference's
 * (codes, scales) pair: q·s is exact in f32, and every product (q_x·s_x)·(W·S) of 4-bit significands
 * is exact too, so Σ_k (q_x·s_x)(W·S) in fp32 is the reference's blocked sum
 * Σ_blocks s_x·S·(Σ_k q_x·W) up to the order of the fp32 additions (relative ~1e-6 before the bf16
 * rounding of the output, which then agrees except at rounding boundaries). The dequantised cache is
 * the same in both precisions (dequantisation is exact), so one cache serves both; it costs 4 bytes
 * per weight element, which is what the CPU path, a reference for tests and tiny models, can afford.
 *
 * On CUDA (kernels/linear.cu) no dequantised copy is ever KEPT in device memory. 1..8 rows run one
 * memory-bound GEMV launch that stages the (Q8 round-tripped) activation in shared memory and
 * dequantises 16-byte weight vectors in registers, applying each block's scale to the partial sum
 * over the vector (exact: scales are powers of two); 9+ rows of a reference fp8 linear with 128x128
 * blocks run cuBLASLt FP8 with block scaling on the e4m3 codes of Q8(x) (the reference's own
 * act_quant, so the same numbers up to the order of fp32 additions); other 9+ row calls run cuBLAS
 * over the weight dequantised exactly into a transient slab of the per-call workspace (bf16 tensor
 * cores when activation and W·S are exactly bf16, true fp32 otherwise); odd shapes run a tiled
 * kernel. The activation's Q8 round trip uses quant.h's functions, bit for bit the CPU's.
 *
 * The layer holds references to its weight and scale tensors. Functions return NULL / -1 with a
 * message (err.h).
 */
#ifndef DSRT_LINEAR_H
#define DSRT_LINEAR_H

#include <stdatomic.h>
#include "quant.h"
#include "tensor.h"

typedef enum { DSRT_FORMAT_BF16, DSRT_FORMAT_FP8, DSRT_FORMAT_FP4 } dsrt_weight_format;

/* The input block of the reference's activation quantisation (SPEC §3.3, §3.5) */
#define DSRT_ACT_BLOCK 128

typedef struct {
    dsrt_weight_format format;
    int64_t in_features;           /* the width of x: groups × the weight's columns */
    int64_t out_features;          /* the weight's rows */
    int64_t block_rows, block_cols; /* weight elements one scale covers: fp8 128×128, fp4 1×32 */
    int groups;                    /* 1, or G for the grouped low-rank projection (SPEC §6.8) */
    int fp32_math;                 /* f32 in, f32 out, no activation quantisation (SPEC §3.5) */
} dsrt_linear_config;

typedef struct dsrt_linear {
    atomic_int refcount;
    dsrt_linear_config cfg;
    dsrt_tensor *weight;           /* bf16 | f8e4m3 | fp4e2m1 [out, in/groups] */
    dsrt_tensor *scale;            /* f8e8m0 or f32 (fp8), f8e8m0 (fp4); NULL for bf16 */
    /* the exactly dequantised weight, f32 [groups, in/groups, out/groups]; built on first use */
    _Atomic(dsrt_tensor *) weight_t;
} dsrt_linear;

/* "bf16" | "fp8" | "fp4" (the names dsv4.weights gives) */
int dsrt_weight_format_from_name(const char *name, dsrt_weight_format *out);
const char *dsrt_weight_format_name(dsrt_weight_format format);

/* Checks weight (and scale) against cfg and returns a layer holding references to both. */
dsrt_linear *dsrt_linear_new(dsrt_tensor *weight, dsrt_tensor *scale, const dsrt_linear_config *cfg);
void dsrt_linear_retain(dsrt_linear *l);
void dsrt_linear_release(dsrt_linear *l);

/* The dtype forward returns: f32 under fp32 precision or fp32_math, bf16 otherwise. */
dsrt_dtype dsrt_linear_out_dtype(const dsrt_linear *l, dsrt_precision prec);

/* x [..., in] bf16 or f32 -> y [..., out] of dsrt_linear_out_dtype, a new tensor. */
dsrt_tensor *dsrt_linear_forward(dsrt_linear *l, dsrt_tensor *x, dsrt_precision prec, dsrt_stream *s);

/* *y0 = forward(l0, x), *y1 = forward(l1, x): two layers of the same input width over one input.
 * On CUDA, where both take the decode GEMV's tensor-core path with one format (attention's wq_a
 * and wkv at decode), one launch serves both; where both take the FP8 cuBLASLt route (prefill), one
 * Q8 pass of x serves both GEMMs; each result as its own forward gives it; otherwise the two
 * forwards. Returns 0, or -1 with both outputs NULL. */
int dsrt_linear_forward_pair(dsrt_linear *l0, dsrt_linear *l1, dsrt_tensor *x, dsrt_precision prec, dsrt_stream *s,
                             dsrt_tensor **y0, dsrt_tensor **y1);

/* y = forward(x) written into a caller-given tensor: y contiguous, [..., out] with x's leading shape,
 * of dsrt_linear_out_dtype, on x's device (CPU or CUDA). For layers built on linears that own their
 * output buffers (e.g. the MoE writing an expert's rows into a slice of one buffer): on CUDA nothing
 * is allocated but a bounded per-call workspace for the prepared activation. */
int dsrt_linear_forward_into(dsrt_linear *l, dsrt_tensor *x, dsrt_tensor *y, dsrt_precision prec, dsrt_stream *s);

/* forward_into of both layers of a pair over one input (dsrt_linear_forward_pair's sharing) */
int dsrt_linear_forward_pair_into(dsrt_linear *l0, dsrt_linear *l1, dsrt_tensor *x, dsrt_tensor *y0, dsrt_tensor *y1,
                                  dsrt_precision prec, dsrt_stream *s);

/* Checks an input for a layer of `width` input features whose weights are on `device`: bf16 or
 * f32, [..., width], on that device (CPU or CUDA) with the stream; errors name `op`. */
int dsrt_linear_check_input(const dsrt_tensor *x, int64_t width, int device, const dsrt_stream *s, const char *op);
/* x as a contiguous f32 tensor (x itself when it already is one): the rows dsrt_linear_rows reads */
dsrt_tensor *dsrt_linear_input(dsrt_tensor *x, dsrt_stream *s);

/* The same computation over host f32 buffers, for layers built on linears (the MoE): x [rows, in]
 * (left unchanged), y [rows, out] receives the values forward would return, as f32 (bf16 values in
 * reference mode). The weight must be on the CPU (device layers use dsrt_linear_forward_into);
 * scratch comes from the allocator on `s`. */
int dsrt_linear_rows(dsrt_linear *l, const float *x, int64_t rows, float *y, dsrt_precision prec, dsrt_stream *s);

#endif
