/*
 * nn.h - the numerical primitives of DeepSeek-V4 (SPEC §3-5): RMSNorm and the per-head q norm, the
 * FP8/FP4 activation round trips, RoPE, the Hadamard rotation, sparse attention with the sink, the
 * Sinkhorn split and the hyper-connection ops (pre, post, head, expand).
 *
 * What this protects: every rounding point of the reference numerics is written down once, here,
 * and implemented once, in nn.c. The attention layer, the decoder and the CUDA kernels are built on
 * (and tested against) these functions, so a layer never re-derives where the reference rounds to
 * bf16 or keeps fp32.
 *
 * Precision (quant.h's dsrt_precision), the one switch every function takes where it matters:
 *   DSRT_PREC_REFERENCE  DeepSeek's numerics (SPEC §3, §9.1): fp32 internals where the reference
 *                        keeps fp32, the bf16 rounding points it has, the FP8/FP4 round trips.
 *                        Activation outputs are bf16.
 *   DSRT_PREC_FP32       fp32 everywhere, no bf16 rounding, round trips are the identity: the mode
 *                        compared with transformers run in fp32. Activation outputs are f32.
 * Outputs the reference keeps in fp32 (Sinkhorn's pre/post/comb, the RoPE frequencies) are f32 in
 * both modes.
 *
 * Conventions shared by all functions:
 *   - Inputs are bf16 or f32 tensors of any layout (integer tensors where indices are meant), on the
 *     stream's device; only the CPU is implemented so far (the CUDA versions will come through these
 *     signatures). An input's values are taken as they are: an f32 input in reference mode is not
 *     rounded to bf16 first (the reference never sees one; the model passes bf16 there).
 *   - Weights and parameters (norm weights, hc fn/scale/base, sinks) may be bf16 or f32; the
 *     reference holds them in fp32 with the checkpoint's values, which both widen to exactly.
 *   - Results are new contiguous tensors (a new reference: release it), except the round trips,
 *     which rewrite their argument in place as the reference does. Failure returns NULL or -1 with
 *     a message (err.h) naming the function ("nn.rms_norm: ...") and the shapes involved.
 *   - Long reductions (sums of squares over a row, dot products over a head, a block's sum of
 *     attention probabilities) accumulate in double and are rounded once to fp32: that is the
 *     exactly rounded value every fp32-accumulating kernel approximates, so the CPU is the accurate
 *     side of any GPU comparison. The hc mixes are an fp32 GEMM (dsrt_gemm_f32), as in the
 *     reference. Short sums (over hc streams, Sinkhorn's rows and columns) and vector accumulations
 *     (attention's P·V) follow the reference's fp32 arithmetic in index order.
 *   - Positions and pool indices are data, 0-based (as the reference and the checkpoint count);
 *     the Lua bindings keep them 0-based too.
 */
#ifndef DSRT_NN_H
#define DSRT_NN_H

#include "quant.h"
#include "tensor.h"

/* RoPE rotates the trailing 64 dims of a vector, as 32 adjacent pairs (SPEC §3.6) */
#define DSRT_NN_ROPE_DIMS 64
#define DSRT_NN_ROPE_PAIRS (DSRT_NN_ROPE_DIMS / 2)
/* the indexer's Hadamard rotation works on 128-dim vectors (SPEC §3.7) */
#define DSRT_NN_HADAMARD_DIM 128
/* sparse attention walks the index list in blocks of this many entries, as the tilelang kernel */
#define DSRT_NN_ATTENTION_BLOCK 64

/* ---- norms ---- */

/* RMSNorm (SPEC §3.1) over the last dimension of x [..., d]: y = x·rsqrt(mean(x²) + eps)·weight, in
 * fp32 (mean over d values in double, rounded to fp32; the weight product after the normalisation,
 * as the reference does). weight [d], or NULL for the unweighted norm. Reference: one rounding to
 * bf16 at the end. */
dsrt_tensor *dsrt_nn_rms_norm(dsrt_tensor *x, dsrt_tensor *weight, float eps, dsrt_precision prec, dsrt_stream *s);

/* The per-head q normalisation (SPEC §3.2) over the last dimension of q [..., d] (the model passes
 * [S, H, 512]), no weight. Reference: the reference's `q *= rsqrt(q.square().mean(-1) + eps)` on a
 * bf16 tensor, i.e. bf16 arithmetic with five rounding points:
 *     sq_j = bf16(q_j²)                   (torch computes each bf16 op in fp32 and rounds)
 *     m    = bf16(fp32(Σ_j sq_j / d))     (torch's bf16 mean accumulates in fp32 and rounds once;
 *                                          here the sum is double, rounded to fp32, then to bf16)
 *     me   = bf16(m + eps)
 *     r    = bf16(1 / sqrt(me))
 *     y_j  = bf16(q_j · r)
 * FP32: y = q·rsqrt(mean(q²) + eps) in fp32, f32 out. */
dsrt_tensor *dsrt_nn_head_rms_norm(dsrt_tensor *q, float eps, dsrt_precision prec, dsrt_stream *s);

/* ---- activation round trips (in place) ---- */

/* Q8 round trip (SPEC §3.3, quant.h) on columns [first, first + count) of every row of x [..., n],
 * in blocks of blk (1..128) starting at `first`; a last block shorter than blk is quantised on its
 * own. x (bf16 or f32, any layout) is rewritten in place; the values written, e4m3 × 2^k, are exact
 * in bf16. The KV latent uses blk 64, first 0, count 448. FP32: x is left as it is. */
int dsrt_nn_quant_roundtrip_q8(dsrt_tensor *x, int blk, int64_t first, int64_t count, dsrt_precision prec,
                               dsrt_stream *s);

/* Q4 round trip (SPEC §3.4, quant.h) over the whole last dimension of x [..., n] in blocks of 32,
 * in place (the indexer's 128-dim q and keys: 4 blocks). FP32: x is left as it is. */
int dsrt_nn_quant_roundtrip_q4(dsrt_tensor *x, dsrt_precision prec, dsrt_stream *s);

/* ---- RoPE ---- */

/* YaRN frequency interpolation (SPEC §3.6). The reference applies it only on compressed layers;
 * pass NULL for the others. original_seq_len must be > 0 (the reference's "0 = off" is NULL here). */
typedef struct {
    double factor;            /* 16 for Flash */
    int64_t original_seq_len; /* L0 = 65536 */
    double beta_fast;         /* 32 */
    double beta_slow;         /* 1 */
} dsrt_yarn;

/* The 32 inverse frequencies f_i of base theta (SPEC §3.6), computed as the reference's
 * precompute_freqs_cis does in fp32: f_i = 1 / theta^(2i/64); with YaRN, low/high from c(n) in
 * double, ramp_i = clamp((i − low)/(high − low), 0, 1) in fp32 (high − low bumped by 0.001 when they
 * meet), smooth = 1 − ramp, f_i = f_i/factor·(1 − smooth) + f_i·smooth. Returns 0, or -1 on
 * parameters outside their domain (theta <= 1, factor or betas <= 0, original_seq_len <= 0). */
int dsrt_nn_rope_freqs(double theta, const dsrt_yarn *yarn, float freqs[DSRT_NN_ROPE_PAIRS]);

/* RoPE of x [S, H, w] or [S, w] (w >= 64) at positions [S] (i32/i64, >= 0): the trailing 64 dims
 * are 32 complex numbers z_i = (v[w−64+2i], v[w−64+2i+1]) multiplied by e^{jθ_i(t)}, or by its
 * conjugate when `inverse` (the attention output's de-rotation, SPEC §6.8). θ_i(t) = fp32(fp32(t)·
 * f_i), cos and sin in fp32, the rotation in fp32 on the widened input. The other w − 64 dims are
 * copied. Reference: the result rounded to bf16. */
dsrt_tensor *dsrt_nn_rope(dsrt_tensor *x, dsrt_tensor *positions, double theta, const dsrt_yarn *yarn, int inverse,
                          dsrt_precision prec, dsrt_stream *s);

/* ---- the indexer's rotation ---- */

/* Normalised Walsh-Hadamard transform of every 128-vector of x [..., 128] (SPEC §3.7): H_128 in
 * Sylvester order (H_2n = [[H, H], [H, −H]]), butterflies in fp32, then × fp32(128^-0.5), as the
 * CUDA fast_hadamard_transform does. Reference: bf16 out. (transformers skips this rotation; being
 * orthonormal and applied to both indexer q and keys, it changes their scores only by rounding.) */
dsrt_tensor *dsrt_nn_hadamard128(dsrt_tensor *x, dsrt_precision prec, dsrt_stream *s);

/* ---- attention ---- */

/* Sparse attention with a sink (SPEC §3.8) for q [S, H, D] over pool [N, D] (one K = V vector per
 * entry), indices [S, K] (i32/i64; −1 = unused; anything else must be a pool row), sink [H],
 * softmax scale `scale`. Per query row and head, the reference kernel's online softmax over the
 * index list in blocks of DSRT_NN_ATTENTION_BLOCK entries:
 *     s_j  = fp32(q·kv_j) · scale                    (the dot product in double, rounded to fp32)
 *     m    = max(m, max_j s_j)   over the block's valid entries; α = e^{m_old − m}
 *     p_j  = e^{s_j − m};  den = den·α + Σ_j p_j
 *     acc  = acc·α + Σ_j P(p_j)·kv_j                 (fp32; P = bf16 rounding in reference mode,
 *                                                     the identity in fp32 mode)
 *   then den += e^{sink_h − m} (the sink only in the denominator), o = acc / den.
 * With K <= 64 this is exactly SPEC §3.8's formula with the global max; with more blocks the bf16
 * rounding of p happens relative to the running max, as in the kernel. A block without a valid
 * entry is skipped; a row without any gives zeros (the kernel would give NaN; the model never asks).
 * Reference: o rounded to bf16. FP32: f32 out. */
dsrt_tensor *dsrt_nn_sparse_attention(dsrt_tensor *q, dsrt_tensor *pool, dsrt_tensor *indices, dsrt_tensor *sink,
                                      float scale, dsrt_precision prec, dsrt_stream *s);

/* ---- the attention layer's fused passes ---- */

/* The norm that dsrt_nn_norm_rope applies first */
typedef enum {
    DSRT_NN_NORM_NONE, /* none */
    DSRT_NN_NORM_RMS,  /* dsrt_nn_rms_norm(x, weight, eps) (weight may be NULL) */
    DSRT_NN_NORM_HEAD  /* dsrt_nn_head_rms_norm(x, eps) (no weight) */
} dsrt_nn_norm;

/* What dsrt_nn_norm_rope applies after RoPE */
typedef enum {
    DSRT_NN_POST_NONE,        /* nothing */
    DSRT_NN_POST_Q8,          /* dsrt_nn_quant_roundtrip_q8(y, 64, 0, w − 64): the KV latent's no-rope dims */
    DSRT_NN_POST_HADAMARD_Q4  /* y = dsrt_nn_hadamard128(y), then dsrt_nn_quant_roundtrip_q4(y) (w = 128) */
} dsrt_nn_post;

/* What the attention layer does to a projection's rows before they are attended or cached (the
 * query's head norm and RoPE, SPEC §6.1 steps 3-4; the window KV's norm, RoPE and Q8, §6.2; a
 * compressed entry's, §6.5; the indexer query's RoPE, Hadamard and Q4, §6.6 step 1), as one op:
 *     y = post(dsrt_nn_rope(norm(x), positions, theta, yarn, 0, prec))
 * with positions[t] = first + t·step (t the first index of x [S, w] or [S, H, w]; they must be
 * >= 0), norm and post as their enums say, each step in precision prec. The result is what those
 * calls give, returned as a new contiguous f32 tensor in both precisions (in reference precision
 * its values are bf16-exact, so nothing is lost and the attention kernels can take it as it is).
 * w must be a multiple of 8 from 64 to 1024 (the model's 512 and 128; 128 with HADAMARD_Q4), a
 * weight goes only with DSRT_NN_NORM_RMS. On CUDA it is one kernel (kernels/norm.cu) that repeats
 * the separate kernels' operations on 16-byte aligned data (the model's, and any dense copy);
 * misaligned data goes through the separate ops, so the bits are theirs either way. */
dsrt_tensor *dsrt_nn_norm_rope(dsrt_tensor *x, dsrt_nn_norm norm, dsrt_tensor *weight, float eps, int64_t first,
                               int64_t step, double theta, const dsrt_yarn *yarn, dsrt_nn_post post,
                               dsrt_precision prec, dsrt_stream *s);
/* dsrt_nn_norm_rope with the result in dtype `out`: DSRT_F32, or DSRT_BF16 in reference precision
 * (the same values, bf16-exact there; the CUDA kernel stores them so, with no f32 copy between) */
dsrt_tensor *dsrt_nn_norm_rope_to(dsrt_tensor *x, dsrt_nn_norm norm, dsrt_tensor *weight, float eps, int64_t first,
                                  int64_t step, double theta, const dsrt_yarn *yarn, dsrt_nn_post post,
                                  dsrt_precision prec, dsrt_dtype out, dsrt_stream *s);

/* The attention layer's two norms after wq_a and wkv (SPEC §6.1 step 1, §6.2), in one launch on
 * CUDA, as vLLM fuses them: *qr = dsrt_nn_rms_norm(qa, q_weight, eps, prec) (qa [..., dq]) and
 * *kv_out = dsrt_nn_norm_rope(kv, DSRT_NN_NORM_RMS, kv_weight, eps, first, step, theta, yarn,
 * post, prec), exactly what those calls give. Rows of qa wider than 1024 or not a multiple of 8,
 * and misaligned data, go through the two calls. Returns 0, or -1 with both results NULL. */
int dsrt_nn_q_kv_norm(dsrt_tensor *qa, dsrt_tensor *q_weight, dsrt_tensor *kv, dsrt_tensor *kv_weight, float eps,
                      int64_t first, int64_t step, double theta, const dsrt_yarn *yarn, dsrt_nn_post post,
                      dsrt_precision prec, dsrt_stream *s, dsrt_tensor **qr, dsrt_tensor **kv_out);

/* dsrt_nn_sparse_attention(q, pool, indices, sink, scale, prec) followed by the inverse RoPE of its
 * output at positions[t] = first + t·step (>= 0; SPEC §6.8 step 1: dsrt_nn_rope(o, positions,
 * theta, yarn, 1, prec)), the result of those two calls (D >= 64). On CUDA the attention kernels
 * rotate their outputs as they store them, with no pass of their own. */
dsrt_tensor *dsrt_nn_sparse_attention_inverse_rope(dsrt_tensor *q, dsrt_tensor *pool, dsrt_tensor *indices,
                                                   dsrt_tensor *sink, float scale, int64_t first, int64_t step,
                                                   double theta, const dsrt_yarn *yarn, dsrt_precision prec,
                                                   dsrt_stream *s);

/* ---- hyper-connections (SPEC §3.9, §4 step 4, §5) ---- */

/* The Sinkhorn split (hc_split_sinkhorn, SPEC §3.9), all fp32, of mixes [T, (2+hc)·hc] with
 * scale [3] and base [(2+hc)·hc]:
 *     pre_j  = σ(mixes_j·scale_0 + base_j) + eps
 *     post_j = 2·σ(mixes_{hc+j}·scale_1 + base_{hc+j})
 *     C_jk   = mixes_{2hc+hc·j+k}·scale_2 + base_{2hc+hc·j+k}   (row j = source, column k = destination)
 *     C ← softmax over k (max subtracted) + eps;  C ← C / (colsum + eps)
 *     iters − 1 times: C ← C / (rowsum + eps);  C ← C / (colsum + eps)
 * (for iters = 20: 1 softmax, 20 column and 19 row normalisations; the last is a column one).
 * σ(x) = 1/(1 + e^−x). iters >= 1. Sets *pre [T, hc], *post [T, hc], *comb [T, hc, hc] (f32). */
int dsrt_nn_sinkhorn(dsrt_tensor *mixes, dsrt_tensor *scale, dsrt_tensor *base, int hc, int iters, float eps,
                     dsrt_stream *s, dsrt_tensor **pre, dsrt_tensor **post, dsrt_tensor **comb);

/* hc_pre (SPEC §5) of the residual streams X [T, hc, d], with fn [(2+hc)·hc, hc·d], scale [3],
 * base [(2+hc)·hc]: x = fp32(flatten X[t]); ρ = rsqrt(mean(x²) + norm_eps); mixes = (fn·x)·ρ
 * (an fp32 GEMM); (pre, post, comb) = Sinkhorn(mixes; hc_eps, iters);
 * u = Σ_s pre_s·X_s (fp32, s in order). Sets *u [T, d] (reference: bf16, fp32: f32), *post [T, hc]
 * and *comb [T, hc, hc] (f32, for hc_post). With norm_w [d] (else NULL) *u is the sub-layer's input
 * dsrt_nn_rms_norm(u, norm_w, norm_eps, prec) instead, its values and bits: on CUDA the collapse's
 * kernel normalises the row it just computed (a launch and a pass over u fewer). */
int dsrt_nn_hc_pre(dsrt_tensor *X, dsrt_tensor *fn, dsrt_tensor *scale, dsrt_tensor *base, float hc_eps,
                   float norm_eps, int iters, dsrt_tensor *norm_w, dsrt_precision prec, dsrt_stream *s,
                   dsrt_tensor **u, dsrt_tensor **post, dsrt_tensor **comb);

/* hc_post (SPEC §5): X'_k = post_k·f + Σ_j comb_jk·X_j for f [T, d] (the sub-layer output), X [T, hc, d],
 * post [T, hc], comb [T, hc, hc], in fp32 (the sum over j in order, then added to post_k·f). Note
 * the transpose: destination k sums over comb's first index. Returns X' [T, hc, d]; reference: bf16. */
dsrt_tensor *dsrt_nn_hc_post(dsrt_tensor *f, dsrt_tensor *X, dsrt_tensor *post, dsrt_tensor *comb,
                             dsrt_precision prec, dsrt_stream *s);

/* The HC head collapse (SPEC §4 step 4) of X [T, hc, d] with fn [hc, hc·d], scale [1], base [hc]:
 * mixes = (fn·x)·ρ as in hc_pre; w_s = σ(mixes_s·scale_0 + base_s) + hc_eps; y = Σ_s w_s·X_s
 * (fp32). No Sinkhorn. Returns y [T, d]; reference: bf16. With norm_w [d] (else NULL), y RMS-normed
 * as hc_pre's u (SPEC §4 step 5's final norm). */
dsrt_tensor *dsrt_nn_hc_head(dsrt_tensor *X, dsrt_tensor *fn, dsrt_tensor *scale, dsrt_tensor *base, float hc_eps,
                             float norm_eps, dsrt_tensor *norm_w, dsrt_precision prec, dsrt_stream *s);

/* hc_post of one sub-layer followed by hc_pre of the next (SPEC §10, vLLM's fusion): sets *X_next =
 * hc_post(f, X, post, comb) and (*u, *post_next, *comb_next) = hc_pre(*X_next, fn, scale, base, ...),
 * exactly what the two calls return (reference: X_next is bf16 and hc_pre reads it so); norm_w as
 * hc_pre's. */
int dsrt_nn_hc_post_pre(dsrt_tensor *f, dsrt_tensor *X, dsrt_tensor *post, dsrt_tensor *comb, dsrt_tensor *fn,
                        dsrt_tensor *scale, dsrt_tensor *base, float hc_eps, float norm_eps, int iters,
                        dsrt_tensor *norm_w, dsrt_precision prec, dsrt_stream *s, dsrt_tensor **X_next,
                        dsrt_tensor **u, dsrt_tensor **post_next, dsrt_tensor **comb_next);

/* hc_post of the last sub-layer followed by the HC head (SPEC §4 steps 3-5 at the end of the
 * blocks): sets *X_next = hc_post(f, X, post, comb) and *y = hc_head(*X_next, fn, scale, base, ...),
 * exactly what the two calls return; norm_w as hc_head's. */
int dsrt_nn_hc_post_head(dsrt_tensor *f, dsrt_tensor *X, dsrt_tensor *post, dsrt_tensor *comb, dsrt_tensor *fn,
                         dsrt_tensor *scale, dsrt_tensor *base, float hc_eps, float norm_eps, dsrt_tensor *norm_w,
                         dsrt_precision prec, dsrt_stream *s, dsrt_tensor **X_next, dsrt_tensor **y);

/* HC expand (SPEC §4 step 2): X[t, s] = e[t] for the hc streams, e [T, d] -> X [T, hc, d], e's dtype
 * (an exact copy, so no precision). */
dsrt_tensor *dsrt_nn_hc_expand(dsrt_tensor *e, int hc, dsrt_stream *s);

#endif
