/*
 * sampling.h - the token sampler: logits f32 [B, V] -> ids i64 [B], on the CPU or a CUDA device.
 *
 * One function, one definition, which the CPU (sampling.c) and the CUDA kernels
 * (kernels/sampling.cu) implement alike, so that the same seed gives the same ids on both. Per row r:
 *   1. penalties over the row's history (each distinct id once): repetition_penalty divides a
 *      positive logit and multiplies a negative one (as Hugging Face), presence_penalty subtracts;
 *   2. temperature == 0: greedy, the argmax of the penalized logits (the first max wins); done;
 *   3. otherwise the candidates in a defined order: descending logit, ties by ascending id
 *      (-0 and +0 are equal); with +inf logits present (within top_k), u below picks uniformly
 *      among them: candidate floor(u * count); otherwise
 *      p_i = dsrt_sample_exp(((double)x_i - x_max) * (1.0 / (double)temperature)), the exp below
 *      (double, the same IEEE operations on both sides, so p_i has the same bits everywhere);
 *   4. top_k > 0 keeps the first top_k; top_p keeps the smallest prefix whose cumulative sum
 *      P reaches top_p * P(last candidate) (at least one); min_p then drops, from the first
 *      candidate with p < min_p * p_max on, the rest (the first candidate always stays);
 *   5. u = dsrt_rand_uniform(seed, step * B + r) (numeric.h: Philox, identical on CPU and GPU);
 *      the id is the first kept candidate whose P exceeds u * P(last kept); should rounding
 *      leave none, the last kept candidate with p > 0.
 * The cumulative sum, in double: P(i) = S_b + L_i, where candidate i lies in chunk b of
 * dsrt_draw_chunk(V) consecutive candidates, L_i is chunk b's p added in order from its first
 * candidate to i, and S_b the totals of the chunks before b added in chunk order. Every sum has
 * this one order, so equal inputs give equal sums on both sides and ties are decided the same way;
 * the chunks are what the CUDA kernel gives a thread each (one running sum over all 129,280
 * candidates of DSV4 took it 1.4 ms, a chain of dependent double adds).
 * Logits that are NaN, or a row without a finite logit, are an error.
 */
#ifndef DSRT_SAMPLING_H
#define DSRT_SAMPLING_H

#include <math.h>
#include <stdint.h>
#include "numeric.h"

/* exp(a) for the sampler, a <= 0 (it is right up to a = 709): Cody-Waite reduction a = k ln2 + r,
 * |r| <= ln2/2, the Taylor polynomial of degree 13 (truncation < 5e-18) by Horner, times 2^k;
 * 0 where the result would leave the normal doubles (a <= -708). Within ~2 ulp of exp. Written
 * with separately rounded operations only (nvcc would fuse a*b+c into an FMA, which rounds once),
 * so gcc and nvcc compute the same bits; libm's exp and CUDA's differ in the last bit now and
 * then, which would make a GPU draw differ from the CPU's on a rounding tie. */
#ifdef __CUDA_ARCH__
#define DSRT_SX_MUL(a, b) __dmul_rn((a), (b))
#define DSRT_SX_ADD(a, b) __dadd_rn((a), (b))
#else
#define DSRT_SX_MUL(a, b) ((a) * (b))
#define DSRT_SX_ADD(a, b) ((a) + (b))
#endif
DSRT_HD double dsrt_sample_exp(double a)
{
    if (!(a > -708.0)) return 0.0; /* -inf too */
    const double ln2_hi = 0.6931471803691238, ln2_lo = 1.9082149292705877e-10; /* fdlibm's split */
    double k = floor(DSRT_SX_ADD(DSRT_SX_MUL(a, 1.4426950408889634), 0.5));
    double r = DSRT_SX_ADD(DSRT_SX_ADD(a, -DSRT_SX_MUL(k, ln2_hi)), -DSRT_SX_MUL(k, ln2_lo));
    /* Horner from 1/13! down to 1/1!, then + 1 */
    double p = 1.6059043836821613e-10;
    p = DSRT_SX_ADD(DSRT_SX_MUL(p, r), 2.08767569878681e-09);
    p = DSRT_SX_ADD(DSRT_SX_MUL(p, r), 2.505210838544172e-08);
    p = DSRT_SX_ADD(DSRT_SX_MUL(p, r), 2.755731922398589e-07);
    p = DSRT_SX_ADD(DSRT_SX_MUL(p, r), 2.7557319223985893e-06);
    p = DSRT_SX_ADD(DSRT_SX_MUL(p, r), 2.48015873015873e-05);
    p = DSRT_SX_ADD(DSRT_SX_MUL(p, r), 0.0001984126984126984);
    p = DSRT_SX_ADD(DSRT_SX_MUL(p, r), 0.001388888888888889);
    p = DSRT_SX_ADD(DSRT_SX_MUL(p, r), 0.008333333333333333);
    p = DSRT_SX_ADD(DSRT_SX_MUL(p, r), 0.041666666666666664);
    p = DSRT_SX_ADD(DSRT_SX_MUL(p, r), 0.16666666666666666);
    p = DSRT_SX_ADD(DSRT_SX_MUL(p, r), 0.5);
    p = DSRT_SX_ADD(DSRT_SX_MUL(p, r), 1.0);
    p = DSRT_SX_ADD(DSRT_SX_MUL(p, r), 1.0);
    return ldexp(p, (int)k); /* exact: the result is a normal double */
}

/* The chunks of the sampler's cumulative sums (above) and of the weighted draw (below): at most
 * DSRT_DRAW_MAX_CHUNKS of them, at least 256 candidates each.
 * The weighted draw of speculative verification, one definition for gcc and nvcc: weights
 * w_i = max(0, p_i - q_i) over i < V (q_i: q[i] when q is given, else 1 at q_id and 0 elsewhere;
 * f32 subtraction; use_p: w_i = max(0, p_i)), summed in double in a fixed order: chunks of
 * dsrt_draw_chunk(V) consecutive ids, each added from its first id on, then the chunk sums in
 * chunk order (Z). Returns the first id whose running sum (the sums of the chunks before it, then
 * its chunk's weights one by one) exceeds u * Z; rounding fallbacks are the last id with w > 0 of
 * the chunk the chunk sums chose, or of the whole row. The chunks are what the CUDA kernel gives
 * one thread each (at most DSRT_DRAW_MAX_CHUNKS). */
#define DSRT_DRAW_MAX_CHUNKS 1024
DSRT_HD int64_t dsrt_draw_chunk(int64_t V)
{
    int64_t c = (V + DSRT_DRAW_MAX_CHUNKS - 1) / DSRT_DRAW_MAX_CHUNKS;
    return c < 256 ? 256 : c;
}
DSRT_HD float dsrt_draw_weight(const float *p, const float *q, int64_t q_id, int use_p, int64_t i)
{
    float w = use_p ? p[i] : p[i] - (q ? q[i] : (i == q_id ? 1.0f : 0.0f));
    return w > 0.0f ? w : 0.0f; /* NaN -> 0 too */
}

/* the rest is the C API, which the kernels do not need */
#ifndef __CUDACC__
#include "tensor.h"

typedef struct {
    float temperature;        /* >= 0, finite; 0 = greedy */
    int64_t top_k;            /* >= 0; 0 = off */
    float top_p;              /* (0, 1]; 1 = off */
    float min_p;              /* [0, 1]; 0 = off */
    float repetition_penalty; /* > 0, finite; 1 = off */
    float presence_penalty;   /* finite; 0 = off */
} dsrt_sample_params;

/* the defaults: greedy, every filter off */
dsrt_sample_params dsrt_sample_params_default(void);

/* 0, or -1 with a message naming the bad field (err.h); `row` goes into the message when >= 0 */
int dsrt_sample_params_check(const dsrt_sample_params *p, int64_t row);

/* The sampler over raw host (or, for the device version, device) memory: logits f32 [B, V]
 * row-major; params[B]; history of row r = hist_ids[hist_off[r] .. hist_off[r+1]) (hist_off may be
 * NULL for no history); out[B]. Returns 0, or -1 with a message. */
int dsrt_sample_cpu(const float *logits, int64_t B, int64_t V, const dsrt_sample_params *params,
                    const int64_t *hist_off, const int64_t *hist_ids, uint64_t seed, uint64_t step,
                    int64_t *out);

/* The tensor form: logits f32 [B, V] or [V] (B = 1) on the CPU or a CUDA device -> a new i64 [B]
 * tensor on the same device (NULL with a message). params, hist_off, hist_ids are host arrays as
 * above; `stream` must be of the logits' device. On CUDA the kernels run on `stream` and the call
 * waits for them: the per-row status words (NaN, no finite logit) come back with the ids, so that
 * a bad row is an error here, never a silent id. The logits never leave the device. */
dsrt_tensor *dsrt_sample(dsrt_tensor *logits, const dsrt_sample_params *params, const int64_t *hist_off,
                         const int64_t *hist_ids, uint64_t seed, uint64_t step, dsrt_stream *stream);

/* The same, with the B ids written to host memory `ids` instead (what generation needs): on CUDA
 * only the ids and status words cross to the host. Returns 0, or -1 with a message. */
int dsrt_sample_host(dsrt_tensor *logits, const dsrt_sample_params *params, const int64_t *hist_off,
                     const int64_t *hist_ids, uint64_t seed, uint64_t step, dsrt_stream *stream, int64_t *ids);

/* A draw that nothing waits for, for a generation loop that issues the next step's forward
 * before it reads this one's token (dsv4's generate): *ids gets the ids as a new i64 [B] tensor on
 * the logits' device (what the next forward takes), *pending the read of the same ids on the host.
 * On CUDA the kernels run on `stream`, read the row parameters from pinned memory and write the ids
 * and status words there themselves (no copies between a decode step's kernels); dsrt_sample_wait
 * waits for those kernels only (not for later work on the stream), then reports a bad row as
 * dsrt_sample does, or writes the B ids. On the CPU the draw happens in
 * the call (a bad row is its error) and the wait returns at once. dsrt_sample_pending_free is
 * needed whether or not it was waited for. Returns 0, or -1 with a message. */
typedef struct dsrt_sample_pending dsrt_sample_pending;
int dsrt_sample_async(dsrt_tensor *logits, const dsrt_sample_params *params, const int64_t *hist_off,
                      const int64_t *hist_ids, uint64_t seed, uint64_t step, dsrt_stream *stream, dsrt_tensor **ids,
                      dsrt_sample_pending **pending);
int dsrt_sample_wait(dsrt_sample_pending *p, int64_t *ids);
int64_t dsrt_sample_pending_rows(const dsrt_sample_pending *p);
void dsrt_sample_pending_free(dsrt_sample_pending *p);

/* ---- the processed distribution and speculative verification (MTP drafts, issue 7) ----
 *
 * dsrt_sample_probs: the distribution the sampler draws from, per row: f32 [B, V] with, at each
 * kept candidate of steps 1–4 above, p_i / z (p_i and z exactly the sampler's doubles, the quotient
 * rounded once to f32), and 0 elsewhere. Greedy rows (temperature 0) are one-hot at the argmax; a
 * row with +inf logits gives 1/m to each of its m +inf candidates. So a draw with
 * dsrt_sample(seed, step) follows these weights exactly, and rejection sampling (below) can compare
 * target and draft distributions as the sampler sees them. seed/step play no part. A new tensor on
 * the logits' device (NULL with a message); on CUDA the logits never leave the device and the call
 * waits only for the B status words. */
dsrt_tensor *dsrt_sample_probs(dsrt_tensor *logits, const dsrt_sample_params *params, const int64_t *hist_off,
                               const int64_t *hist_ids, dsrt_stream *stream);
int dsrt_sample_probs_cpu(const float *logits, int64_t B, int64_t V, const dsrt_sample_params *params,
                          const int64_t *hist_off, const int64_t *hist_ids, float *out);

/* The most drafts one verification takes (the CUDA kernel gets the draft ids by value). */
#define DSRT_VERIFY_MAX_K 32

/* Speculative verification by rejection sampling (Leviathan et al. / Chen et al.; vLLM's
 * rejection sampler): p f32 [k+1, V] the target's processed distributions (dsrt_sample_probs) at
 * the k+1 verified positions, q f32 [k, V] the drafts' (NULL: each draft was a deterministic
 * proposal, q = one-hot at it), drafts[k] the draft ids (host). For i = 0, 1, ...: draft i is
 * accepted when u_i * q_i(d_i) < p_i(d_i) (in double: accept with probability min(1, p/q)),
 *   u_i = dsrt_rand_uniform(seed, 2 * (step + i));
 * at the first rejection i the next token is drawn from normalise(max(0, p_i - q_i)) (f32
 * difference; p_i itself where that is all zero), after k acceptances from p_k, in both cases with
 *   u = dsrt_rand_uniform(seed, 2 * (step + a) + 1), a = the number accepted,
 * by dsrt_sample_draw_weights' fixed summation order. step is the index of the token row 0 decides,
 * so a generation's counters never repeat. p and q on one device (CPU or CUDA): on CUDA one kernel
 * decides and only *accepted and *next_id cross to the host. Returns 0, or -1 with a message. */
int dsrt_sample_verify(dsrt_tensor *p, dsrt_tensor *q, const int64_t *drafts, int64_t k, uint64_t seed, uint64_t step,
                       dsrt_stream *stream, int64_t *accepted, int64_t *next_id);
int dsrt_sample_verify_cpu(const float *p, const float *q, int64_t k, int64_t V, const int64_t *drafts, uint64_t seed,
                           uint64_t step, int64_t *accepted, int64_t *next_id);

#endif /* !__CUDACC__ */

#endif
