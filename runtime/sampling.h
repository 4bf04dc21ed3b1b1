/*
 * sampling.h - the token sampler: logits f32 [B, V] -> ids i64 [B].
 *
 * One function, one definition, so that a device kernel can implement exactly the same thing
 * (the CUDA version comes with the CUDA backend). Per row r:
 *   1. penalties over the row's history (each distinct id once): repetition_penalty divides a
 *      positive logit and multiplies a negative one (as Hugging Face), presence_penalty subtracts;
 *   2. temperature == 0: greedy, the argmax of the penalized logits (the first max wins); done;
 *   3. otherwise the candidates in a defined order: descending logit, ties by ascending id;
 *      p_i = exp((x_i - x_max) / temperature) (double);
 *   4. top_k > 0 keeps the first top_k; top_p keeps the smallest prefix whose renormalized
 *      cumulative probability reaches top_p (at least one); min_p drops tokens with
 *      p < min_p * p_max (the first candidate always stays);
 *   5. u = dsrt_rand_uniform(seed, step * B + r) (numeric.h: Philox, identical on CPU and GPU);
 *      the id is the first kept candidate whose cumulative probability exceeds u * (their sum).
 * Logits that are NaN, or a row without a finite logit, are an error.
 */
#ifndef DSRT_SAMPLING_H
#define DSRT_SAMPLING_H

#include <stdint.h>
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

/* The tensor form: logits f32 [B, V] or [V] (B = 1) on any device -> a new i64 [B] tensor on the
 * same device (NULL with a message). params, hist_off, hist_ids are host arrays as above. Only the
 * CPU is implemented yet: a CUDA tensor is an error until the CUDA backend brings its kernel. */
dsrt_tensor *dsrt_sample(dsrt_tensor *logits, const dsrt_sample_params *params, const int64_t *hist_off,
                         const int64_t *hist_ids, uint64_t seed, uint64_t step, dsrt_stream *stream);

#endif
