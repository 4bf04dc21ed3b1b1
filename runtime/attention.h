/*
 * attention.h - the DeepSeek-V4 attention layer (SPEC §6) and its per-sequence state.
 *
 * A layer object holds references to its weights (linear layers in their native formats), its
 * configuration and the aux stream list it was given by whoever composes the model; it never
 * creates streams. Everything a sequence accumulates - the window ring, compressed entries, the
 * compressor's pending rows, the indexer's keys - lives in a separate state object owned by the
 * session, addressed by absolute position, so that truncating a sequence (speculative decoding's
 * rollback, SPEC §6.9) is exact: rings keep `slack` positions beyond what attention needs, so any
 * truncation by at most `slack` positions restores the state a shorter run would have had.
 *
 * forward() takes a chunk of S >= 1 new tokens at positions [length, length + S) - a whole prompt,
 * a chunk of one, or a decode step - and gives the same result as processing them one by one.
 */
#ifndef DSRT_ATTENTION_H
#define DSRT_ATTENTION_H

#include "linear.h"
#include "nn.h"
#include "tensor.h"

typedef struct {
    int dim, n_heads, head_dim, rope_dim, q_lora_rank, o_lora_rank, o_groups, window;
    int ratio;                 /* 0: window only; 4: overlapping compressor + indexer; other > 0: plain compressor */
    int index_n_heads, index_head_dim, index_topk;
    double rope_theta;
    int has_yarn;              /* YaRN on this layer's RoPE (compressed layers, SPEC §1.2) */
    dsrt_yarn yarn;
    float norm_eps;
} dsrt_attn_config;

typedef struct {
    dsrt_linear *wkv, *wgate;  /* fp32 math (SPEC §3.5) */
    dsrt_tensor *ape;          /* f32 [ratio, coff·d] */
    dsrt_tensor *norm;         /* [d] */
} dsrt_compressor_weights;

typedef struct {
    dsrt_linear *wq_a, *wq_b, *wkv, *wo_a /* grouped */, *wo_b;
    dsrt_tensor *q_norm, *kv_norm, *attn_sink;
    dsrt_compressor_weights compressor;                    /* ratio > 0 */
    dsrt_linear *index_wq_b, *index_weights_proj;          /* ratio == 4 */
    dsrt_compressor_weights index_compressor;              /* ratio == 4 */
} dsrt_attn_weights;

typedef struct dsrt_attention dsrt_attention;
typedef struct dsrt_attn_state dsrt_attn_state;

/* Checks every weight against the config (naming what is wrong; all on the CPU or all on one CUDA
 * device, where wq_a is) and retains them and the aux streams. On the CPU any n_aux is accepted and
 * unused; on CUDA n_aux is 3 (compressor, indexer weights_proj and indexer compressor GEMMs run on
 * aux 0/1/2 beside wq_a/wkv, then the indexer on aux 0 beside wq_b, SPEC §10) or 0 (everything on
 * the caller's stream, with bit-equal results). Chunks of fewer than 64 rows (decode) run on the
 * caller's stream even with aux streams: there the fan-out's events cost more than it overlaps. */
dsrt_attention *dsrt_attention_new(const dsrt_attn_config *cfg, const dsrt_attn_weights *w, dsrt_stream *const *aux,
                                   int n_aux);
void dsrt_attention_retain(dsrt_attention *a);
void dsrt_attention_release(dsrt_attention *a);
const dsrt_attn_config *dsrt_attention_config(const dsrt_attention *a);

/* State for sequences of up to max_len positions, rollback by up to `slack` positions, for
 * forwards in precision `prec` (its caches hold that precision's values), on the layer's device
 * (host memory, or device memory allocated on s; creating a CUDA state waits for s once). */
dsrt_attn_state *dsrt_attn_state_new(const dsrt_attention *a, int64_t max_len, int slack, dsrt_precision prec,
                                     int device, dsrt_stream *s);
void dsrt_attn_state_release(dsrt_attn_state *st);
int64_t dsrt_attn_state_length(const dsrt_attn_state *st);
dsrt_precision dsrt_attn_state_precision(const dsrt_attn_state *st); /* the precision its forwards must use */
int dsrt_attn_state_truncate(dsrt_attn_state *st, int64_t length); /* length - slack <= n <= length */
/* How many of the next n positions an advance may skip (dsrt_attention_advance): those its state
 * would drop before anything reads them. A layer without compressors keeps only its window ring
 * (window + slack rows), so n minus that many; a layer with compressors keeps every entry: 0. */
int64_t dsrt_attn_state_skippable(const dsrt_attn_state *st, int64_t n);

/* x: the normed sub-layer input [S, dim] at positions [length, length + S); returns [S, dim]
 * (bf16 in reference precision, f32 in fp32) and advances the state's length by S. prec must be
 * the state's; a failed call leaves the state as it was. */
dsrt_tensor *dsrt_attention_forward(dsrt_attention *a, dsrt_attn_state *st, dsrt_tensor *x, dsrt_precision prec,
                                    dsrt_stream *s);

/* The state's half of dsrt_attention_forward: the window ring, the compressors' states and entries
 * and the indexer's keys take x's positions exactly as a forward leaves them (the same kernels in
 * the same order), and nothing else runs: no query path, index scores, attention or output. What
 * an MTP layer's ring fill needs (SPEC §8.2), whose forward output would be thrown away.
 * skip: positions before x's rows that the state would drop unread, stepped over without their
 * inputs (at most dsrt_attn_state_skippable(st, skip + S)): x holds positions [length + skip,
 * length + skip + S), and the state ends at length + skip + S as if all had been given. A long
 * prompt's MTP fill then computes only the ring's rows. 0 or -1. */
int dsrt_attention_advance(dsrt_attention *a, dsrt_attn_state *st, dsrt_tensor *x, int64_t skip, dsrt_precision prec,
                           dsrt_stream *s);

#endif
