/*
 * kernels.h - the C ABI between the C core (runtime/) and everything CUDA (kernels/).
 *
 * The core never includes a CUDA header: it calls these launchers, which take plain pointers,
 * dsrt_view descriptors (runtime/numeric.h) and opaque stream/event handles. Each returns 0 on
 * success; on failure it returns a DSRTK_E* code and leaves a message (the CUDA or cuBLAS error
 * string plus what was being done) for dsrtk_error(). A build without the CUDA toolkit links
 * runtime/nocuda.c instead, whose launchers all fail with "built without CUDA", so the core has
 * one code path.
 *
 * Launchers never allocate device memory (allocation policy is the core's: runtime/alloc.c) and
 * never synchronise unless their name says so. Views passed to kernels may be arbitrarily strided;
 * kernels take their own fast paths when they see contiguous data.
 */
#ifndef DSRT_KERNELS_H
#define DSRT_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include "../runtime/numeric.h"
#include "../runtime/opmath.h"

#ifdef __cplusplus
extern "C" {
#endif

enum { DSRTK_OK = 0, DSRTK_ERROR = 1, DSRTK_OOM = 2, DSRTK_NOT_READY = 3 };

const char *dsrtk_error(void); /* message of the last failure on this thread */

/* ---- devices, memory, streams, events ---- */
int dsrtk_device_count(void); /* 0 when there is no driver, no GPU or no CUDA build */
int dsrtk_device_name(int dev, char *buf, size_t len);
int dsrtk_mem_info(int dev, size_t *free_bytes, size_t *total_bytes);
/* cudaProfilerStart/Stop: brackets what a profiler started with "--profile-from-start off" (ncu,
 * nsys) records, so a script can profile one decode step and not its set-up */
int dsrtk_profiler(int dev, int start);
int dsrtk_malloc(int dev, void **ptr, size_t bytes);
int dsrtk_free(int dev, void *ptr);
int dsrtk_host_alloc(void **ptr, size_t bytes); /* pinned */
int dsrtk_host_free(void *ptr);

/* stream NULL is the device's legacy default stream */
int dsrtk_stream_create(int dev, void **stream);
int dsrtk_stream_destroy(int dev, void *stream);
int dsrtk_stream_synchronize(int dev, void *stream);
int dsrtk_event_create(int dev, void **event, int timing);
int dsrtk_event_destroy(int dev, void *event);
int dsrtk_event_record(int dev, void *event, void *stream);
int dsrtk_event_query(int dev, void *event); /* DSRTK_OK when done, DSRTK_NOT_READY when not */
int dsrtk_event_synchronize(int dev, void *event);
int dsrtk_event_elapsed_ms(int dev, void *start, void *end, float *ms);
int dsrtk_stream_wait_event(int dev, void *stream, void *event);

/* Byte copies between host and device or within a device; a synchronous copy returns when the bytes
 * have landed. async: host-to-device copies of up to 64 KiB go through pinned staging (the host bytes
 * copied at once, free on return, the transfer queued on the stream); otherwise async only matters
 * with pinned host memory. */
enum { DSRTK_H2D, DSRTK_D2H, DSRTK_D2D };
int dsrtk_memcpy(int dev, void *dst, const void *src, size_t bytes, int kind, void *stream, int async);

/* ---- elementwise (kernels/elementwise.cu) ---- */
/* dst[i] = convert(src[i]); shapes equal; any dtypes; floats pass through f32, integers through
 * int64 (numeric.h rules), so the result equals the CPU's bit for bit. */
int dsrtk_copy(int dev, const dsrt_view *dst, const dsrt_view *src, void *stream);
int dsrtk_fill(int dev, const dsrt_view *dst, double value, void *stream);
int dsrtk_arange(int dev, const dsrt_view *dst, double start, double step, void *stream);
/* element i (row-major position) gets dsrt_rand_uniform/normal(seed, offset + i), then lo + (hi-lo)*u
 * or mean + std*n, rounded once into dst's dtype */
int dsrtk_rand(int dev, const dsrt_view *dst, uint64_t seed, uint64_t offset, int normal,
               double a, double b, void *stream);

/* Binary and unary operators; codes shared with the CPU implementation (runtime/ops.h). Inputs
 * come already broadcast to dst's shape (stride 0 where broadcast). Float math runs in f32,
 * integer math in int64, comparisons produce bool. */
int dsrtk_binary(int dev, int op, const dsrt_view *dst, const dsrt_view *a, const dsrt_view *b,
                 int compute_float, void *stream);
int dsrtk_binary_scalar(int dev, int op, const dsrt_view *dst, const dsrt_view *a, double s,
                        int scalar_first, int compute_float, void *stream);
int dsrtk_unary(int dev, int op, const dsrt_view *dst, const dsrt_view *a, void *stream);

/* Reduce src along its last dimension into dst (src's other dims in order, row-major).
 * Float sums accumulate in f32 pairwise; argmax/argmin write int64 positions (0-based, first
 * maximum wins; NaN counts as the maximum, as torch). */
int dsrtk_reduce(int dev, int op, const dsrt_view *dst, const dsrt_view *src, void *stream);

/* ---- GEMM (kernels/gemm.cu): C[b] = A[b] @ B[b], row-major, contiguous, batch strides in
 * elements (0 broadcasts). f32 (fp32 compute, no TF32) or bf16 (fp32 accumulate, bf16 out). ---- */
int dsrtk_matmul(int dev, int dtype, int64_t batch, int64_t m, int64_t n, int64_t k,
                 const void *a, int64_t stride_a, const void *b, int64_t stride_b,
                 void *c, int64_t stride_c, void *stream);

/* ---- sampling (kernels/sampling.cu): the token sampler of runtime/sampling.h ---- */
/* One row's parameters as the kernels read them (uploaded by the core with the call): the fields
 * of dsrt_sample_params, and the row's history hist[hist_begin .. hist_end) in the uploaded ids. */
typedef struct {
    float temperature, top_p, min_p, repetition_penalty, presence_penalty;
    int32_t reserved;
    int64_t top_k;
    int64_t hist_begin, hist_end;
} dsrtk_sample_row;
/* Per-row status words written beside the ids: ids[r] is the sampled id when status[r] is OK; for
 * a NaN it is the first NaN's id. */
enum { DSRTK_SAMPLE_OK = 0, DSRTK_SAMPLE_NAN = 1, DSRTK_SAMPLE_NO_FINITE = 2 };
/* Device workspace the launcher needs for B rows of V logits; `sorting` = some row has temperature
 * > 0; `penalties` = some row has a penalty. Fails (B * V too large for the 64-bit sort keys) with
 * a message. */
int dsrtk_sample_workspace(int dev, int64_t B, int64_t V, int sorting, int penalties, size_t *bytes);
/* logits: contiguous f32 [B, V] on the device; rows[B] and hist: device copies or pinned host
 * memory (read in place); out: device i64 [2B], ids in out[0..B), status words in out[B..2B);
 * host_out: NULL, or pinned host memory [2B] the draw writes the same words to (no copy queued
 * after the kernels). Same arguments as dsrtk_sample_workspace. */
int dsrtk_sample(int dev, const float *logits, int64_t B, int64_t V, const dsrtk_sample_row *rows,
                 const int64_t *hist, int64_t max_hist, uint64_t seed, uint64_t step, int sorting, int penalties,
                 void *workspace, size_t workspace_bytes, int64_t *out, int64_t *host_out, void *stream);
/* The processed distributions (runtime/sampling.h dsrt_sample_probs) instead of a draw: probs f32
 * [B, V] on the device (written whole: zeros outside each row's candidates), status words in
 * out[B..2B) as above (out[0..B) get the argmax). Workspace as dsrtk_sample_workspace. */
int dsrtk_sample_probs(int dev, const float *logits, int64_t B, int64_t V, const dsrtk_sample_row *rows,
                       const int64_t *hist, int64_t max_hist, int sorting, int penalties, void *workspace,
                       size_t workspace_bytes, float *probs, int64_t *out, void *stream);
/* The draft ids of one speculative verification, by value (at most DSRT_VERIFY_MAX_K = 32). */
typedef struct { int64_t id[32]; } dsrtk_verify_drafts;
/* Speculative verification (runtime/sampling.h dsrt_sample_verify): p f32 [k+1, V], q f32 [k, V] or
 * NULL, contiguous on the device; out: device i64 [3] = accepted, next id, status (DSRTK_SAMPLE_OK). */
int dsrtk_sample_verify(int dev, const float *p, const float *q, int64_t k, int64_t V, dsrtk_verify_drafts drafts,
                        uint64_t seed, uint64_t step, int64_t *out, void *stream);
/* end of sampling */

/* ---- norm (kernels/norm.cu): RMSNorm, the per-head norm, RoPE, Hadamard, the Q8/Q4 round trips (runtime/nn.h) ---- */
/* Pointers are contiguous data of the dtype beside them (bf16 or f32 for values; i32/i64 for
 * positions); outputs are new buffers of the dtype given (bf16 in reference precision, f32 else). */
/* RMSNorm of x [rows, d] into y; w [d] or NULL. head_bf16: the head norm's five bf16 rounding
 * points (nn.h dsrt_nn_head_rms_norm, reference), with w NULL. */
int dsrtk_nn_rms_norm(int dev, const void *x, int x_dtype, const void *w, int w_dtype, void *y, int y_dtype,
                      int64_t rows, int64_t d, float eps, int head_bf16, void *stream);
/* In place on x [rows, n]: the Q8 round trip of columns [first, first + count) in blocks of blk, or
 * (q4) the Q4 round trip of whole rows in blocks of 32 (first 0, count n); quant.h's code. */
int dsrtk_nn_roundtrip(int dev, void *x, int dtype, int64_t rows, int64_t n, int64_t first, int64_t count, int blk,
                       int q4, void *stream);
/* RoPE of x [S, heads, w] into y at positions pos [S]; freqs: the 32 host floats of dsrt_nn_rope_freqs */
int dsrtk_nn_rope(int dev, const void *x, int x_dtype, void *y, int y_dtype, const void *pos, int pos_dtype,
                  int64_t S, int64_t heads, int64_t w, const float *freqs, int inverse, void *stream);
/* the normalised Hadamard transform of each 128-vector of x [rows, 128] into y */
int dsrtk_nn_hadamard128(int dev, const void *x, int x_dtype, void *y, int y_dtype, int64_t rows, void *stream);
/* RoPE folded into another kernel: the 32 host floats of dsrt_nn_rope_freqs, and the positions as
 * a progression (row t of the call at first + t·step), which is all the attention layer uses, so
 * no positions tensor is made for it */
typedef struct {
    float freqs[32];
    int64_t first, step;
} dsrtk_rope;
/* a plain RMSNorm that rides in dsrtk_nn_norm_rope's launch: y [rows, width] (y_dtype) = RMS_w(x),
 * w [width] or NULL, width a multiple of 8 up to 1024 (nn.h dsrt_nn_q_kv_norm's qr) */
typedef struct {
    const void *x, *w;
    void *y;
    int x_dtype, w_dtype, y_dtype;
    int64_t rows, width;
} dsrtk_norm_job;
/* nn.h dsrt_nn_norm_rope: y [S, heads, width] (y_dtype: f32, or bf16 when ref, the values being
 * bf16-exact then) = post(RoPE(norm(x))) of x [S, heads, width]
 * (width a multiple of 8 from 64 to 1024); norm and post take nn.h's dsrt_nn_norm / dsrt_nn_post
 * values, w [width] (RMS only) or NULL; ref: reference precision's rounding points and round trips.
 * also (or NULL): a second, plain RMSNorm in the same launch, with the same eps. Every pointer
 * 16-byte aligned (the bits are those of the separate ops' aligned paths). */
int dsrtk_nn_norm_rope(int dev, const void *x, int x_dtype, const void *w, int w_dtype, void *y, int y_dtype, int64_t S,
                       int64_t heads, int64_t width, int norm, float eps, const dsrtk_rope *rope, int post, int ref,
                       const dsrtk_norm_job *also, void *stream);
/* end of norm */

/* ---- hc (kernels/hc.cu): Sinkhorn and the hyper-connection ops (runtime/nn.h) ---- */
/* Contiguous bf16/f32 inputs (dtype beside each pointer), hc <= 32 streams. pre/post/comb are f32. */
int dsrtk_nn_sinkhorn(int dev, const void *mixes, int mixes_dtype, const void *scale, int scale_dtype,
                      const void *base, int base_dtype, int64_t T, int hc, int iters, float eps, float *pre,
                      float *post, float *comb, void *stream);
/* The check of the division the Sinkhorn loop takes (hc.cu's div_rn_fast) against div.rn.f32 (a
 * test's hook): n pairs drawn from `seed` with |a| and |b| in [2^-60, 2^60), any sign, mantissas
 * and exponents uniform, plus the range's edges; *mismatches counts the quotients whose bits
 * differ. Synchronous. */
int dsrtk_nn_div_rn_check(int dev, int64_t n, uint32_t seed, int64_t *mismatches);
/* hc_pre and hc_head split their GEMM over K = hc·d and need a workspace of
 * dsrtk_nn_hc_workspace(T, M, K) doubles (M = (2+hc)·hc for hc_pre, hc for hc_head), allocated by the
 * core on the stream: partial sums [T, splits, M + 1], splits of DSRTK_NN_HC_CHUNK columns (fewer
 * than DSRTK_NN_HC_TC_MIN_T tokens, or f32) or of DSRTK_NN_HC_TC_SPLIT (the tensor-core GEMM for
 * more tokens and M <= 24, which also keeps fn as three bf16 planes of 8·ceil(M/8) rows there). */
#define DSRTK_NN_HC_CHUNK 256
#define DSRTK_NN_HC_TC_SPLIT 1024
#define DSRTK_NN_HC_TC_MIN_T 64
static inline int64_t dsrtk_nn_hc_splits(int64_t K) { return K > 0 ? (K + DSRTK_NN_HC_CHUNK - 1) / DSRTK_NN_HC_CHUNK : 1; }
/* the planes' size in doubles, even so that the partial sums after them stay 16-byte aligned */
static inline int64_t dsrtk_nn_hc_plane_doubles(int64_t M, int64_t K) { return (3 * ((M + 7) / 8 * 8) * K * 2 + 15) / 16 * 2; }
static inline int64_t dsrtk_nn_hc_workspace(int64_t T, int64_t M, int64_t K)
{
    int64_t partials = T * dsrtk_nn_hc_splits(K) * (M + 1); /* >= the tensor-core GEMM's, whose splits are longer */
    return partials + (T >= DSRTK_NN_HC_TC_MIN_T && M <= 24 ? dsrtk_nn_hc_plane_doubles(M, K) : 0);
}
/* X [T, hc, d], fn [(2+hc)·hc, hc·d], scale [3], base [(2+hc)·hc] -> u [T, d] (u_dtype), post [T, hc],
 * comb [T, hc, hc]. With norm_w [d] (else NULL), u is written RMS-normed with it and norm_eps: the
 * values and bits of dsrtk_nn_rms_norm over u, in the collapse's kernel (d % 8 == 0, d <= 4096). */
int dsrtk_nn_hc_pre(int dev, const void *X, int X_dtype, const void *fn, int fn_dtype, const void *scale,
                    int scale_dtype, const void *base, int base_dtype, int64_t T, int hc, int64_t d, float hc_eps,
                    float norm_eps, int iters, double *work, void *u, int u_dtype, const void *norm_w,
                    int norm_w_dtype, float *post, float *comb, void *stream);
/* X [T, hc, d], fn [hc, hc·d], scale [1], base [hc] -> y [T, d] (y_dtype), RMS-normed as hc_pre's u
 * when norm_w is not NULL */
int dsrtk_nn_hc_head(int dev, const void *X, int X_dtype, const void *fn, int fn_dtype, const void *scale,
                     int scale_dtype, const void *base, int base_dtype, int64_t T, int hc, int64_t d, float hc_eps,
                     float norm_eps, double *work, void *y, int y_dtype, const void *norm_w, int norm_w_dtype,
                     void *stream);
/* hc_post's operands: f [T, d], X [T, hc, d], post [T, hc], comb [T, hc, hc] */
typedef struct {
    const void *f, *X, *post, *comb;
    int f_dtype, X_dtype, post_dtype, comb_dtype;
} dsrtk_hc_post_args;
/* X_next [T, hc, d] = hc_post(...) in X_next_dtype, then hc_pre of it (u, post, comb as dsrtk_nn_hc_pre,
 * workspace as hc_pre's): two launches for few tokens (the GEMM computes X' on the way), hc_post's
 * kernel then hc_pre's for many; the same bits as the two launchers */
int dsrtk_nn_hc_post_pre(int dev, const dsrtk_hc_post_args *post_args, void *X_next, int X_next_dtype,
                         const void *fn, int fn_dtype, const void *scale, int scale_dtype, const void *base,
                         int base_dtype, int64_t T, int hc, int64_t d, float hc_eps, float norm_eps, int iters,
                         double *work, void *u, int u_dtype, const void *norm_w, int norm_w_dtype, float *post,
                         float *comb, void *stream);
/* X_next [T, hc, d] = hc_post(...) in X_next_dtype, then hc_head of it (y as dsrtk_nn_hc_head, its
 * workspace): the same bits as the two launchers */
int dsrtk_nn_hc_post_head(int dev, const dsrtk_hc_post_args *post_args, void *X_next, int X_next_dtype,
                          const void *fn, int fn_dtype, const void *scale, int scale_dtype, const void *base,
                          int base_dtype, int64_t T, int hc, int64_t d, float hc_eps, float norm_eps, double *work,
                          void *y, int y_dtype, const void *norm_w, int norm_w_dtype, void *stream);
/* f [T, d], X [T, hc, d], post [T, hc], comb [T, hc, hc] -> y [T, hc, d] (y_dtype) */
int dsrtk_nn_hc_post(int dev, const void *f, int f_dtype, const void *X, int X_dtype, const void *post,
                     int post_dtype, const void *comb, int comb_dtype, void *y, int y_dtype, int64_t T, int hc,
                     int64_t d, void *stream);
/* end of hc */

/* ---- linear (kernels/linear.cu): the DSV4 linear layers in native weight formats (runtime/linear.h) ---- */
/* A linear's weight as the kernels read it. format: 0 bf16, 1 fp8 (e4m3), 2 fp4 (e2m1, two per byte,
 * low nibble first) as dsrt_weight_format. Element (r, c) of the [out, in/groups] weight is at
 * element r * ld + c of `weight` (fp4: nibbles; weight points at a whole byte). Scale element
 * (r / block_rows, c / block_cols) is at scale[.. * scale_ld0 + .. * scale_ld1], dtype f8e8m0 or f32;
 * scale is NULL for bf16. */
typedef struct {
    int format, groups, scale_dtype;
    const void *weight;
    int64_t ld;
    const void *scale;
    int64_t scale_ld0, scale_ld1, block_rows, block_cols;
    int64_t out, in; /* features of the whole layer: out = groups · out_g, in = groups · in_g */
} dsrtk_linear_weight;

/* Bytes of device workspace dsrtk_linear needs for this call (0 is possible). */
int dsrtk_linear_workspace(int dev, const dsrtk_linear_weight *w, int64_t rows, int x_dtype, int quantise,
                           int y_dtype, size_t *bytes);
/* y [rows, out] (f32 or bf16, contiguous) = x [rows, in] (f32 or bf16, contiguous) · Wᵀ per group,
 * quantise != 0: the activation is Q8 round-tripped in blocks of 128 first (quant.h). Picks the
 * one-launch decode GEMV (rows <= 8, no workspace), cuBLASLt FP8 block scaling (fp8, quantise,
 * rows > 8), cuBLAS over dequantised weight slabs (other rows > 8) or the tiled kernel. Any
 * contiguous rows work (e.g. an expert's gathered rows). workspace: at least
 * dsrtk_linear_workspace's bytes, 256-byte aligned. */
int dsrtk_linear(int dev, const dsrtk_linear_weight *w, const void *x, int x_dtype, int64_t rows, int quantise,
                 void *y, int y_dtype, void *workspace, size_t workspace_bytes, void *stream);
/* y0 = x · W0ᵀ and y1 = x · W1ᵀ, each as dsrtk_linear computes it alone (the same bits), sharing
 * work: in one launch where both take the same decode GEMV alone (the tensor-core one with one
 * format and scale type, or the CUDA-core one with bf16 weights); through one Q8 pass of x where
 * both take the cuBLASLt route (prefill: the workspace, dsrtk_linear_pair_workspace's bytes, 256-byte
 * aligned, holds x's codes for both). Otherwise *launched is 0 and nothing ran (call dsrtk_linear
 * twice). Same rows, x, quantise and y dtype for both; w0->in == w1->in. */
int dsrtk_linear_pair_workspace(int dev, const dsrtk_linear_weight *w0, const dsrtk_linear_weight *w1, int64_t rows,
                                int x_dtype, int quantise, int y_dtype, size_t *bytes);
int dsrtk_linear_pair(int dev, const dsrtk_linear_weight *w0, const dsrtk_linear_weight *w1, const void *x, int x_dtype,
                      int64_t rows, int quantise, void *y0, void *y1, int y_dtype, void *workspace, size_t workspace_bytes,
                      void *stream, int *launched);
/* end of linear */

/* ---- moe (kernels/moe.cu): routing and the FP4 experts (runtime/moe.h) ---- */
/* One weight matrix [rows = out_features, cols = in_features] as the kernels read it: device
 * pointers to the storages' data, offsets and strides in elements (nibbles for fp4), the scale
 * covering block_rows x block_cols weights (scale NULL for bf16). vector: rows start 16-byte
 * aligned, stride1 == 1 and cols % 32 == 0, so 32-column chunks load as 16-byte vectors. */
typedef struct {
    const void *weight, *scale;
    int64_t offset, stride0, stride1;
    int64_t scale_offset, scale_stride0, scale_stride1;
    int32_t dtype, scale_dtype;      /* DSRT_BF16 | DSRT_F8E4M3 | DSRT_FP4E2M1; DSRT_F8E8M0 | DSRT_F32 */
    int32_t block_rows, block_cols;
    int32_t rows, cols;
    int32_t vector;
    /* FP8/FP4 that kernels/fp8mma.cuh's tensor-core tile reads: vector, cols % 64 == 0; fp8
     * block_cols 64·2^k; fp4 e8m0 scales, block_cols 32, scale_stride1 1, scale offset, stride0
     * and pointer even (two scales read as one 16-bit word) */
    int32_t mma;
    /* an `mma` matrix kernels/wgtile.cuh's warpgroup tile reads too: cols a multiple of 256 up to
     * 16384, rows of 64; fp4 block_rows 1 and scale rows starting 4-byte aligned; fp8 scale
     * blocks of a multiple of 16 rows and 128 columns */
    int32_t wgmma;
} dsrtk_moe_matrix;

/* The table moe.c builds once per layer: 3 matrices (w1, w2, w3) per set; sets 0..E-1 are the
 * routed experts, set E the shared expert, set E+1 the gate (its w1; w2 and w3 unused). */
enum { DSRTK_MOE_GATE, DSRTK_MOE_UP, DSRTK_MOE_DOWN };
enum { DSRTK_MOE_MMA = 1, DSRTK_MOE_WGMMA = 2 }; /* dsrtk_moe_project_args.tensor_cores */

/* The grouped projection (decode and small batches: weights streamed once per batch of up to 8
 * rows of a group). Rows are grouped; group g = {set, first row, rows} from `groups`
 * (device i32 [max_groups][3], *n_groups of them valid) or, when groups is NULL, the single group
 * {single_set, 0, single_rows} (its rows sliced over the grid). Row r reads input row row_x[r] (r
 * itself when row_x is NULL) of x (x_dtype DSRT_F32 or DSRT_BF16, rows x_ld elements apart), Q8
 * round-tripped on the fly when `reference` and the matrix is FP8/FP4, and writes out row r:
 *   GATE: out = x·W1ᵀ (f32)
 *   UP:   out = h = silu(clamp(x·W1ᵀ)) · clamp(x·W3ᵀ) · row_weight[r] (r < n_weighted), moe.h's rules
 *   DOWN: out = x·W2ᵀ (bf16-rounded values when reference)
 * max_out / max_in: the widest output and input of any group (grid and shared-memory sizing);
 * with groups, single_rows is the most rows a group is expected to hold (it sizes the batch of
 * staged rows; more still work).
 * UP on the tensor-core path (tensor_cores, reference and groups) keeps w3's sums in
 * out[r, max_out + j] until it has h: out_ld >= 2·max_out there (moe.cu's mma_project). */
typedef struct {
    int32_t mode, reference;
    const dsrtk_moe_matrix *table;
    const void *x;
    int32_t x_dtype;
    /* DSRTK_MOE_MMA: every matrix of every group is `mma`, UP and DOWN in reference run on
     * fp8mma.cuh's tile; DSRTK_MOE_WGMMA: every one is `wgmma` too, they run on wgtile.cuh's */
    int32_t tensor_cores;
    int64_t x_ld;
    const int32_t *row_x;
    const float *row_weight;
    int64_t n_weighted;
    const int32_t *groups, *n_groups;
    int32_t max_groups, single_set;
    int64_t single_rows;
    int32_t max_out, max_in;
    float limit;
    float *out;
    int64_t out_ld;
} dsrtk_moe_project_args;
int dsrtk_moe_project(int dev, const dsrtk_moe_project_args *a, void *stream);

/* ---- prefill (tensor cores): the host reads the groups back once, then runs each phase's GEMMs
 * on the gathered rows, straight from the packed weights (dsrtk_moe_prefill_gemm) or through
 * dequantised slabs and cuBLAS ---- */

/* out [rows, cols] (out_dtype DSRT_BF16 or DSRT_F32, contiguous) row r = x row row_x[r] (row r
 * when row_x is NULL; x f32 or bf16, x_ld apart), Q8 round-tripped (blocks of 128) when q8. Exact in
 * bf16 when q8 (e4m3 codes times powers of two) or when x is bf16. */
int dsrtk_moe_gather(int dev, const void *x, int x_dtype, int64_t x_ld, const int32_t *row_x, int64_t rows, int64_t cols,
                     int q8, void *out, int out_dtype, void *stream);

/* Prefill's experts go in slabs of at most DSRTK_MOE_SLAB groups: one dequantisation launch and one
 * grouped GEMM call a slab, not one each per expert (the host's per-call cost bounded a prefill). */
enum { DSRTK_MOE_SLAB = 8 };

/* Groups g0 .. g1 - 1 of the grouping (groups, as dsrtk_moe_project reads it; device memory) with
 * their set's matrices dequantised exactly (code value times its scale, as linear.c's
 * dequantise_transposed) into out, group g0 + i's at i·stride elements: UP [w1; w3] (w3's rows after
 * w1's), DOWN w2, each contiguous [rows, cols]; out_dtype DSRT_BF16 (exact for FP4/FP8 codes with
 * power-of-two scales, and for bf16) or DSRT_F32. max_units: the most rows x 32-column chunks of any
 * group's matrices (grid sizing). */
int dsrtk_moe_dequant_groups(int dev, const dsrtk_moe_matrix *table, const int32_t *groups, int g0, int g1, int mode,
                             int64_t max_units, int64_t stride, void *out, int out_dtype, void *stream);

/* For i < count (at most DSRTK_MOE_SLAB): C_i [m_i, n_i] (ldc, c_dtype) = A_i [m_i, k_i] (lda) · W_iᵀ
 * with W_i [n_i, k_i] contiguous, fp32 accumulation: ab_dtype DSRT_BF16 (c_dtype DSRT_BF16: one
 * rounding of the fp32 sum, or DSRT_F32) or DSRT_F32 (true fp32, no TF32). a, w, c: host arrays of
 * device pointers, sent to ptrs (device memory for 3·count pointers, not reused by the caller
 * before this call's work on `stream` is done). One cuBLAS grouped call, one handle per device. */
int dsrtk_moe_gemm_groups(int dev, int ab_dtype, int count, const int *m, const int *n, const int *k, const void *const *a, int lda,
                          const void *const *w, void *const *c, int c_dtype, int ldc, void **ptrs, void *stream);

/* Prefill's expert GEMMs straight from the packed weights, when every matrix of the table is
 * `mma` (reference precision): for each of the n_tiles tiles (device i32 triples {group, first row
 * of the tile within the group, its rows}, up to DSRTK_MOE_TILE_ROWS rows), out rows =
 * in rows · Wᵀ, W the
 * group's set's [w1; w3] (UP: w3's outputs after w1's) or w2 (DOWN); in and out bf16, in_ld and
 * out_ld elements apart (in_ld a multiple of 8, in 16-byte aligned), out the bf16 rounding of the
 * fp32 sum. Output row r reads input row in_rows[r] (device i32; NULL: row r) of the in_count rows
 * of in (in_count · in_ld < 2^32). max_out: the most outputs of any set (grid sizing). */
enum { DSRTK_MOE_TILE_ROWS = 128 };
int dsrtk_moe_prefill_gemm(int dev, const dsrtk_moe_matrix *table, const int32_t *groups, const int32_t *tiles,
                           int64_t n_tiles, int mode, int64_t max_out, const void *in, int64_t in_ld, const int32_t *in_rows,
                           int64_t in_count, void *out, int64_t out_ld, void *stream);

/* The SwiGLU between the prefill GEMMs, moe.h's rules: gu row r holds g = x·W1ᵀ in columns
 * [0, inter) and u = x·W3ᵀ in [inter, 2·inter) (inter: the row's set's, from the groups), gu_ld
 * apart, dtype io_dtype (DSRT_BF16 in reference precision, DSRT_F32 in fp32); h row r (h_ld apart,
 * io_dtype) = silu(clamp g)·clamp u · row_weight[r] (r < n_weighted), then in reference bf16
 * and Q8 round-tripped (every w2 quantised). shared_gu, when not NULL, holds the unweighted rows'
 * g and u instead (the shared expert's, written by the FP8 linear): m = rows - n_weighted rows of
 * g, then m rows of u, each inter wide. */
int dsrtk_moe_swiglu(int dev, const void *gu, int64_t gu_ld, int64_t rows, const dsrtk_moe_matrix *table,
                     const int32_t *groups, const int32_t *n_groups, const float *row_weight, int64_t n_weighted,
                     float limit, int reference, void *h, int64_t h_ld, int io_dtype, const void *shared_gu, void *stream);

/* Routing of `rows` tokens from their gate logits (moe.h's rules): ids i64 and weights f32
 * [rows, k], contiguous. Learned routing: bias (f32 view [n_routed]); hash routing: tid2eid
 * (i32/i64 view [vocab, k], its ids already checked) and token_ids (a view of `rows` elements,
 * row-major). A token id outside the vocabulary routes to expert 0 with NaN weights. logits: an
 * f32 scratch [rows, n_routed] for the router's gate (its contents afterwards are not defined). */
enum { DSRTK_MOE_SQRTSOFTPLUS, DSRTK_MOE_SIGMOID, DSRTK_MOE_SOFTMAX }; /* moe.h's dsrt_score_func, in order */
typedef struct {
    float *logits;
    int64_t rows;
    int32_t n_routed, k, score_func, norm_topk_prob;
    float route_scale;
    int32_t hash;
    dsrt_view bias, tid2eid, token_ids;
    int64_t *ids;
    float *weights;
} dsrtk_moe_route_args;

/* The router: gate logits x·Wᵀ in f32 (gate: the gate's matrix, bf16 [n_routed, dim], by value;
 * table: the device table holding it as set n_routed + 1), then route's ids and weights of x's
 * route.rows rows (x_dtype DSRT_F32 or DSRT_BF16, x_ld apart), then, when groups is not NULL, the
 * grouping by expert (a stable counting sort of the rows·k picks): routed rows 0..rows·k-1 in
 * ascending expert id, each expert's picks in ascending pick order; shared rows rows·k + t.
 * Writes groups [<= min(n_routed, rows·k) + 1][3] ({set, first row, rows}) and *n_groups (set
 * n_routed is the shared expert's group, last), row_token [rows·k + rows], row_weight [rows·k],
 * pos_of_pick [rows·k]. Decode sizes (kernels/moe.cu says which) run as one kernel, others as
 * three; the results are the same. */
typedef struct {
    dsrtk_moe_matrix gate;
    const dsrtk_moe_matrix *table;
    const void *x;
    int32_t x_dtype;
    int64_t x_ld;
    dsrtk_moe_route_args route;
    int32_t *groups, *n_groups, *row_token, *pos_of_pick;
    float *row_weight;
} dsrtk_moe_router_args;
int dsrtk_moe_router(int dev, const dsrtk_moe_router_args *a, void *stream);
/* Hash routing with an element-wise score folded into the UP projection that follows it, for few
 * tokens on the warpgroup tile (kernels/moe.cu says why): the router's outputs and UP's, as
 * dsrtk_moe_router(r) then dsrtk_moe_project(up) would write them (up reads r's grouping: the same
 * groups, n_groups and row_weight), bit for bit; r's logits are not used. sync: two device words
 * the call may use until its work is done. *launched 0 (and 0 returned) when it does not apply:
 * then the caller runs those two. */
int dsrtk_moe_route_up(int dev, const dsrtk_moe_router_args *r, const dsrtk_moe_project_args *up, uint32_t *sync,
                       void *stream, int *launched);

/* y[t] = Σ routed rows of token t in ascending expert id (pos_of_pick order) + shared row, summed
 * in f32 from 0, stored as out_dtype (DSRT_BF16 or DSRT_F32), contiguous [rows, dim]; y is
 * [rows·(k+1), dim] of y_dtype (DSRT_F32 or DSRT_BF16). */
int dsrtk_moe_combine(int dev, const void *y, int y_dtype, const int32_t *pos_of_pick, int64_t rows, int32_t k, int64_t dim,
                      void *out, int out_dtype, void *stream);
/* end of moe */

/* ---- attention (kernels/attention.cu): sparse attention, rings, compressors, the indexer (runtime/attention.h) ---- */
/* sparse attention (kernels/sparse_attention.cu): dsrt_nn_sparse_attention (runtime/nn.h) on CUDA.
 * o [S, H, D] (bf16 or f32) = the sink attention of q [S, H, D] over pool [N, D] (K = V) through
 * indices [S, K] (i32/i64, -1 unused), sink [H], in blocks of DSRT_NN_ATTENTION_BLOCK (64) entries,
 * p rounded to bf16 when round_p (reference). q, pool, sink f32 or bf16; all views contiguous.
 * derotate (or NULL): then the inverse RoPE of o's last 64 columns (D >= 64), as dsrtk_nn_rope
 * would apply it to the stored o (dsrt_nn_sparse_attention_inverse_rope).
 * A bad index (< -1 or >= N) is never read: its query row's outputs become NaN (checking on the
 * host would need a synchronisation). Few query rows (decode) take a split path that needs
 * `workspace` of the size _workspace gives (0: none) for the same S, H, D, K on the same device. */
int dsrtk_sparse_attention_workspace(int dev, int64_t S, int64_t H, int64_t D, int64_t K, size_t *bytes);
int dsrtk_sparse_attention(int dev, const dsrt_view *o, const dsrt_view *q, const dsrt_view *pool,
                           const dsrt_view *indices, const dsrt_view *sink, float scale, int round_p,
                           const dsrtk_rope *derotate, void *workspace, size_t workspace_bytes, void *stream);
/* end of sparse attention */
/* The layer's own loops (runtime/attention.c); contiguous f32 rows unless said otherwise.
 * ape_add: g[i, :] += ape[(P+i) mod r, :] for the chunk's S rows of `width` gates.
 * compress_pool: out[e, :] (n entries j0+e of width d) = the per-channel softmax pool of the
 *   compressor's slots (coff 2: overlap, ratio 4), reading the chunk's (c, g) rows [S, coff·d] for
 *   positions >= P and the rings [ring, coff·d] (position p in row p mod ring) before; bf16-rounded
 *   when round_bf16.
 * ring_writes: for each of the n (<= DSRTK_MAX_RING_WRITES) rings, ring[(P+i) mod rows, :] =
 *   src[i, :] for the chunk's last min(S, rows) rows, all in one launch.
 * gather: pool [dsrtk_attn_pool_rows(...), hd] = window positions base … P+S-1 (fresh [S, hd] for
 *   p >= P, the window ring before), then the compressed entries; and, in the same launch, idx
 *   i64 [S, K]: the layer's index lists (window part, then the compressed part: ratio 4: the picks
 *   i32 [S, topk], −1 kept; other ratios > 0: every visible entry), n_win = P+S-base. The entries
 *   are all n_entries of entries [n_entries, hd], or (ratio 4 where the queries pick fewer rows
 *   than there are entries: decode past 4·topk positions) each query's topk picks in pick order,
 *   a pick's row never read when the pick is −1: a decode step copies what it attends to, not
 *   the whole compressed cache.
 *   With n_rings > 0 the launch also makes ring_writes' writes (rings[0] the window ring): allowed
 *   where no slot written is one the gather reads, window_rows >= W + S − 1 (then a written slot
 *   holds a position before base), which saves a decode step a launch a layer.
 * index_scores: scores [S, n_max] (visible entries only) of the lightning indexer from q [S, IH, ID],
 *   keys [n_max, ID] (16-byte aligned), w [S, IH] (weights_proj's output, scaled here). With ref
 *   (reference precision) q and keys are FP4 round trips in blocks of 32, as the layer makes them:
 *   the prefill's tensor-core kernel is exact only for those.
 * topk: picks i32 [S, topk]: per query, the min(topk, visible) visible entries by descending
 *   score, ties to the lower entry, −1 after. */
int dsrtk_attn_ape_add(int dev, float *g, const float *ape, int64_t S, int64_t width, int64_t P, int64_t r, void *stream);
int dsrtk_attn_compress_pool(int dev, float *out, const float *chunk_c, const float *chunk_g, const float *ring_c,
                             const float *ring_g, int64_t ring, int64_t P, int64_t S, int64_t j0, int64_t n, int d, int r,
                             int coff, int round_bf16, void *stream);
enum { DSRTK_MAX_RING_WRITES = 5 }; /* the window, the compressor's c and g, the indexer's c and g */
typedef struct {
    float *ring;
    const float *src;
    int64_t rows, width;
} dsrtk_ring_write;
int dsrtk_attn_ring_writes(int dev, const dsrtk_ring_write *writes, int n, int64_t P, int64_t S, void *stream);
static inline int dsrtk_attn_pool_picked(int64_t S, int64_t n_entries, int64_t r, int64_t topk)
{
    return r == 4 && S * topk < n_entries;
}
static inline int64_t dsrtk_attn_pool_rows(int64_t n_win, int64_t S, int64_t n_entries, int64_t r, int64_t topk)
{
    return n_win + (dsrtk_attn_pool_picked(S, n_entries, r, topk) ? S * topk : n_entries);
}
int dsrtk_attn_gather(int dev, float *pool, int64_t *idx, const float *fresh, const float *window, int64_t window_rows,
                      const float *entries, const int *picks, int64_t base, int64_t P, int64_t S, int64_t n_entries,
                      int64_t hd, int64_t K, int64_t W, int64_t r, int64_t topk, const dsrtk_ring_write *rings,
                      int n_rings, void *stream);
int dsrtk_attn_index_scores(int dev, float *scores, const float *q, const float *keys, const float *w, float scale,
                            int64_t S, int64_t P, int64_t r, int IH, int ID, int64_t n_max, int ref, void *stream);
int dsrtk_attn_topk(int dev, int *picks, const float *scores, int64_t S, int64_t P, int64_t r, int64_t topk, int64_t n_max,
                    void *stream);
/* end of attention */

/* ---- embedding (kernels/embedding.cu): the embedding gather ---- */
/* dst[i·copies + j, :] = weight[ids[i], :] for j < copies, converted to dst's dtype (runtime/ops.h
 * dsrt_op_embedding; the CPU loop there is the reference). weight: a 2-D view of any float dtype
 * but fp4; ids: n contiguous i32 or i64 (ids_dtype) values; dst: contiguous [n·copies, weight cols]
 * f32, bf16 or f16. Same dtypes copy raw bits, others convert through numeric.h. An id outside
 * [0, rows) cannot raise an error without a synchronisation, so its rows are written as NaN (the
 * core checks host ids first). */
int dsrtk_embedding(int dev, const dsrt_view *dst, const dsrt_view *weight, const void *ids, int ids_dtype,
                    int64_t n, int copies, void *stream);
/* end of embedding */

#ifdef __cplusplus
}
#endif
#endif
