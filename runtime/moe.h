/*
 * moe.h - DeepSeek-V4's mixture-of-experts feed-forward layer (SPEC §7): the router gate, hash or
 * learned routing, the routed SwiGLU experts and the shared expert.
 *
 * What this protects: the routing and combine rules of the reference (inference/model.py Gate,
 * Expert, MoE), which are easy to get subtly wrong and then only show as a slightly worse model:
 *   - gate logits fp32(x)·fp32(W)ᵀ, in both precisions (SPEC §7.1, §9.1);
 *   - scores σ = sqrt(softplus(l)) | sigmoid(l) | softmax(l) over all experts;
 *   - selection: the top-k of σ + bias (learned layers; the bias is used for the selection ONLY), or
 *     tid2eid[token id] (hash layers); top-k ties go to the lower expert id, and the ids come out in
 *     descending order of σ + bias (hash: tid2eid's order);
 *   - weights: the unbiased σ of the selected experts, divided by their sum when norm_topk_prob (the
 *     reference renormalises for every score function but softmax; config.lua defaults
 *     norm_topk_prob accordingly, and an explicit value is obeyed), times route_scale;
 *   - expert: g = w1·x, u = w3·x (their bf16 outputs upcast in reference mode), u clamped to
 *     [-limit, limit], g to (-inf, limit] (no clamp when limit is 0, as the reference), h = silu(g)·u
 *     in fp32, h ← w·h BEFORE w2 (so w2's Q8 sees the weighted activation), y_e = w2·bf16(h);
 *   - shared expert: the same SwiGLU with the same clamp and no weight;
 *   - y = bf16(Σ_e y_e + y_shared), accumulated in fp32 in the reference's order (routed experts by
 *     ascending id, then the shared expert).
 * In fp32 precision the same formulas run with no bf16 rounding and no activation quantisation and
 * return f32. That is NOT what transformers computes in every detail (it applies the routing weight
 * after down_proj and routes in bf16, SPEC §9.2 items 4-5); in exact arithmetic the two agree.
 *
 * Tokens are grouped by expert: the rows routed to expert e are gathered and each of its three
 * linears runs as one GEMM per call, so every selected expert's weights are read once. A token that
 * selects one expert twice (a malformed tid2eid row) counts both selections.
 *
 * On CUDA (kernels/moe.cu) the same rules run with no host synchronisation inside a decode step:
 * the expert ids stay on the device, picks are grouped by expert with a counting sort on the
 * device, and the experts are read straight from their packed FP4 / FP8 / bf16 weights, each
 * selected expert's once per batch of up to 8 of its rows. From 256 tokens on (prefill) the
 * per-expert counts are read back once and each expert runs as cuBLAS GEMMs on a transient
 * dequantised copy: bf16 tensor cores in reference precision when every matrix is FP4/FP8 with
 * e8m0 scales (the copies and the Q8'd inputs are exact in bf16), f32 GEMMs in fp32 precision,
 * the decode kernels otherwise. Results equal the CPU's up to the order of fp32
 * additions inside dot products (ids exactly, barring exact near-ties of the scores); a token id
 * outside the vocabulary (hash routing) cannot be reported without a synchronisation, so on CUDA
 * it routes to expert 0 with NaN weights, which makes that token's output NaN.
 *
 * The layer keeps the aux stream list it is given (DESIGN.md: whoever composes the model owns the
 * streams; a layer never creates them); the CPU forward does not use them.
 */
#ifndef DSRT_MOE_H
#define DSRT_MOE_H

#include "linear.h"

typedef enum { DSRT_SCORE_SQRTSOFTPLUS, DSRT_SCORE_SIGMOID, DSRT_SCORE_SOFTMAX } dsrt_score_func;

typedef struct {
    int n_routed;              /* experts */
    int n_activated;           /* experts per token (k) */
    dsrt_score_func score_func;
    int norm_topk_prob;        /* renormalise the k weights to sum 1 (before route_scale) */
    float route_scale;
    float swiglu_limit;        /* 0: no clamp */
} dsrt_moe_config;

/* One SwiGLU expert: w1 gate projection, w2 down projection, w3 up projection */
typedef struct { dsrt_linear *w1, *w2, *w3; } dsrt_swiglu;

typedef struct dsrt_moe {
    atomic_int refcount;
    dsrt_moe_config cfg;
    int64_t dim;               /* model width: x [T, dim] */
    dsrt_linear *gate;         /* fp32-math linear over gate.weight [n_routed, dim] */
    dsrt_tensor *bias;         /* f32 [n_routed] (learned routing) or NULL */
    dsrt_tensor *tid2eid;      /* i32 or i64 [vocab, n_activated] (hash routing) or NULL */
    dsrt_swiglu *experts;      /* [n_routed] */
    dsrt_swiglu shared;
    dsrt_stream **aux;         /* the aux stream list given, retained */
    int n_aux;
    /* CUDA layers: the kernels' matrix table (kernels.h dsrtk_moe_matrix, 3 per set: routed
     * experts, shared expert, gate), built on the first CUDA forward; NULL until then */
    _Atomic(dsrt_tensor *) cuda_table;
    /* DSRTK_MOE_MMA or DSRTK_MOE_WGMMA (kernels.h): the table's experts all read through a
     * tensor-core tile; 0 when some do not */
    _Atomic int cuda_tensor_cores;
    _Atomic uint64_t cuda_stream_id; /* the stream the weights were last marked in use on */
} dsrt_moe;

/* "sqrtsoftplus" | "sigmoid" | "softmax" */
int dsrt_score_func_from_name(const char *name, dsrt_score_func *out);
const char *dsrt_score_func_name(dsrt_score_func f);

/* Checks everything against everything (gate weight bf16 [E, dim]; exactly one of bias f32 [E] and
 * tid2eid i32/i64 [vocab, k]; n_routed experts whose w1, w3 are [inter, dim] and w2 [dim, inter],
 * one inter for all of them; a shared expert of the same form, its own inter; linears plain
 * (groups 1, no fp32_math); one device) and returns a layer holding references to all of it. */
dsrt_moe *dsrt_moe_new(const dsrt_moe_config *cfg, dsrt_tensor *gate_weight, dsrt_tensor *bias, dsrt_tensor *tid2eid,
                       const dsrt_swiglu *experts, const dsrt_swiglu *shared, dsrt_stream *const *aux, int n_aux);
void dsrt_moe_retain(dsrt_moe *m);
void dsrt_moe_release(dsrt_moe *m);

/* The routing of x [..., dim] (bf16 or f32): *expert_ids i64 [..., k], *weights f32 [..., k] (new
 * tensors). token_ids (i32 or i64, x's leading shape) are needed for hash routing, NULL otherwise.
 * Routing is fp32 in both precisions. */
int dsrt_moe_route(dsrt_moe *m, dsrt_tensor *x, dsrt_tensor *token_ids, dsrt_stream *s, dsrt_tensor **expert_ids,
                   dsrt_tensor **weights);

/* y [..., dim]: bf16 in reference precision, f32 in fp32 precision. */
dsrt_tensor *dsrt_moe_forward(dsrt_moe *m, dsrt_tensor *x, dsrt_tensor *token_ids, dsrt_precision prec, dsrt_stream *s);

#endif
