/*
 * nocuda.c - the kernel ABI (kernels/kernels.h) for a build without the CUDA toolkit.
 *
 * What this file protects: the core has one code path. It calls the same launchers whether or not
 * CUDA was there at build time; here there are no devices (dsrtk_device_count says 0, which is how
 * the core learns that only the CPU exists), and every other launcher fails with a message that
 * names it, in case something asks for a device anyway.
 */
#include <stdio.h>
#include "kernels.h"

static _Thread_local char error_message[128];

const char *dsrtk_error(void) { return error_message; }

static int without_cuda(const char *function)
{
    snprintf(error_message, sizeof error_message, "%s: dsrt was built without CUDA", function);
    return DSRTK_ERROR;
}

int dsrtk_device_count(void) { return 0; }

int dsrtk_device_name(int dev, char *buf, size_t len)
{
    (void)dev; (void)buf; (void)len;
    return without_cuda(__func__);
}

int dsrtk_profiler(int dev, int start)
{
    (void)dev; (void)start;
    return without_cuda(__func__);
}

int dsrtk_mem_info(int dev, size_t *free_bytes, size_t *total_bytes)
{
    (void)dev; (void)free_bytes; (void)total_bytes;
    return without_cuda(__func__);
}

int dsrtk_malloc(int dev, void **ptr, size_t bytes)
{
    (void)dev; (void)bytes;
    *ptr = NULL;
    return without_cuda(__func__);
}

int dsrtk_free(int dev, void *ptr)
{
    (void)dev; (void)ptr;
    return without_cuda(__func__);
}

int dsrtk_host_alloc(void **ptr, size_t bytes)
{
    (void)bytes;
    *ptr = NULL;
    return without_cuda(__func__);
}

int dsrtk_host_free(void *ptr)
{
    (void)ptr;
    return without_cuda(__func__);
}

int dsrtk_stream_create(int dev, void **stream)
{
    (void)dev;
    *stream = NULL;
    return without_cuda(__func__);
}

int dsrtk_stream_destroy(int dev, void *stream)
{
    (void)dev; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_stream_synchronize(int dev, void *stream)
{
    (void)dev; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_event_create(int dev, void **event, int timing)
{
    (void)dev; (void)timing;
    *event = NULL;
    return without_cuda(__func__);
}

int dsrtk_event_destroy(int dev, void *event)
{
    (void)dev; (void)event;
    return without_cuda(__func__);
}

int dsrtk_event_record(int dev, void *event, void *stream)
{
    (void)dev; (void)event; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_event_query(int dev, void *event)
{
    (void)dev; (void)event;
    return without_cuda(__func__);
}

int dsrtk_event_synchronize(int dev, void *event)
{
    (void)dev; (void)event;
    return without_cuda(__func__);
}

int dsrtk_event_elapsed_ms(int dev, void *start, void *end, float *ms)
{
    (void)dev; (void)start; (void)end; (void)ms;
    return without_cuda(__func__);
}

int dsrtk_stream_wait_event(int dev, void *stream, void *event)
{
    (void)dev; (void)stream; (void)event;
    return without_cuda(__func__);
}

int dsrtk_memcpy(int dev, void *dst, const void *src, size_t bytes, int kind, void *stream, int async)
{
    (void)dev; (void)dst; (void)src; (void)bytes; (void)kind; (void)stream; (void)async;
    return without_cuda(__func__);
}

int dsrtk_copy(int dev, const dsrt_view *dst, const dsrt_view *src, void *stream)
{
    (void)dev; (void)dst; (void)src; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_fill(int dev, const dsrt_view *dst, double value, void *stream)
{
    (void)dev; (void)dst; (void)value; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_arange(int dev, const dsrt_view *dst, double start, double step, void *stream)
{
    (void)dev; (void)dst; (void)start; (void)step; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_rand(int dev, const dsrt_view *dst, uint64_t seed, uint64_t offset, int normal, double a, double b,
               void *stream)
{
    (void)dev; (void)dst; (void)seed; (void)offset; (void)normal; (void)a; (void)b; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_binary(int dev, int op, const dsrt_view *dst, const dsrt_view *a, const dsrt_view *b, int compute_float,
                 void *stream)
{
    (void)dev; (void)op; (void)dst; (void)a; (void)b; (void)compute_float; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_binary_scalar(int dev, int op, const dsrt_view *dst, const dsrt_view *a, double s, int scalar_first,
                        int compute_float, void *stream)
{
    (void)dev; (void)op; (void)dst; (void)a; (void)s; (void)scalar_first; (void)compute_float; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_unary(int dev, int op, const dsrt_view *dst, const dsrt_view *a, void *stream)
{
    (void)dev; (void)op; (void)dst; (void)a; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_reduce(int dev, int op, const dsrt_view *dst, const dsrt_view *src, void *stream)
{
    (void)dev; (void)op; (void)dst; (void)src; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_matmul(int dev, int dtype, int64_t batch, int64_t m, int64_t n, int64_t k, const void *a, int64_t stride_a,
                 const void *b, int64_t stride_b, void *c, int64_t stride_c, void *stream)
{
    (void)dev; (void)dtype; (void)batch; (void)m; (void)n; (void)k; (void)a; (void)stride_a;
    (void)b; (void)stride_b; (void)c; (void)stride_c; (void)stream;
    return without_cuda(__func__);
}

/* ---- sampling ---- */
int dsrtk_sample_workspace(int dev, int64_t B, int64_t V, int sorting, int penalties, size_t *bytes)
{
    (void)dev; (void)B; (void)V; (void)sorting; (void)penalties; (void)bytes;
    return without_cuda(__func__);
}

int dsrtk_sample(int dev, const float *logits, int64_t B, int64_t V, const dsrtk_sample_row *rows,
                 const int64_t *hist, int64_t max_hist, uint64_t seed, uint64_t step, int sorting, int penalties,
                 void *workspace, size_t workspace_bytes, int64_t *out, int64_t *host_out, void *stream)
{
    (void)dev; (void)logits; (void)B; (void)V; (void)rows; (void)hist; (void)max_hist; (void)seed; (void)step;
    (void)sorting; (void)penalties; (void)workspace; (void)workspace_bytes; (void)out; (void)host_out; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_sample_probs(int dev, const float *logits, int64_t B, int64_t V, const dsrtk_sample_row *rows,
                       const int64_t *hist, int64_t max_hist, int sorting, int penalties, void *workspace,
                       size_t workspace_bytes, float *probs, int64_t *out, void *stream)
{
    (void)dev; (void)logits; (void)B; (void)V; (void)rows; (void)hist; (void)max_hist; (void)sorting;
    (void)penalties; (void)workspace; (void)workspace_bytes; (void)probs; (void)out; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_sample_verify(int dev, const float *p, const float *q, int64_t k, int64_t V, dsrtk_verify_drafts drafts,
                        uint64_t seed, uint64_t step, int64_t *out, void *stream)
{
    (void)dev; (void)p; (void)q; (void)k; (void)V; (void)drafts; (void)seed; (void)step; (void)out; (void)stream;
    return without_cuda(__func__);
}
/* end of sampling */

/* ---- norm ---- */
int dsrtk_nn_rms_norm(int dev, const void *x, int x_dtype, const void *w, int w_dtype, void *y, int y_dtype,
                      int64_t rows, int64_t d, float eps, int head_bf16, void *stream)
{
    (void)dev; (void)x; (void)x_dtype; (void)w; (void)w_dtype; (void)y; (void)y_dtype; (void)rows; (void)d;
    (void)eps; (void)head_bf16; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_nn_roundtrip(int dev, void *x, int dtype, int64_t rows, int64_t n, int64_t first, int64_t count, int blk,
                       int q4, void *stream)
{
    (void)dev; (void)x; (void)dtype; (void)rows; (void)n; (void)first; (void)count; (void)blk; (void)q4; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_nn_rope(int dev, const void *x, int x_dtype, void *y, int y_dtype, const void *pos, int pos_dtype,
                  int64_t S, int64_t heads, int64_t w, const float *freqs, int inverse, void *stream)
{
    (void)dev; (void)x; (void)x_dtype; (void)y; (void)y_dtype; (void)pos; (void)pos_dtype; (void)S; (void)heads;
    (void)w; (void)freqs; (void)inverse; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_nn_hadamard128(int dev, const void *x, int x_dtype, void *y, int y_dtype, int64_t rows, void *stream)
{
    (void)dev; (void)x; (void)x_dtype; (void)y; (void)y_dtype; (void)rows; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_nn_norm_rope(int dev, const void *x, int x_dtype, const void *w, int w_dtype, void *y, int y_dtype, int64_t S,
                       int64_t heads, int64_t width, int norm, float eps, const dsrtk_rope *rope, int post, int ref,
                       const dsrtk_norm_job *also, void *stream)
{
    (void)dev; (void)x; (void)x_dtype; (void)w; (void)w_dtype; (void)y; (void)y_dtype; (void)S; (void)heads; (void)width;
    (void)norm;
    (void)eps; (void)rope; (void)post; (void)ref; (void)also; (void)stream;
    return without_cuda(__func__);
}
/* end of norm */

/* ---- hc ---- */
int dsrtk_nn_sinkhorn(int dev, const void *mixes, int mixes_dtype, const void *scale, int scale_dtype,
                      const void *base, int base_dtype, int64_t T, int hc, int iters, float eps, float *pre,
                      float *post, float *comb, void *stream)
{
    (void)dev; (void)mixes; (void)mixes_dtype; (void)scale; (void)scale_dtype; (void)base; (void)base_dtype; (void)T;
    (void)hc; (void)iters; (void)eps; (void)pre; (void)post; (void)comb; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_nn_div_rn_check(int dev, int64_t n, uint32_t seed, int64_t *mismatches)
{
    (void)dev; (void)n; (void)seed; (void)mismatches;
    return without_cuda(__func__);
}

int dsrtk_nn_hc_pre(int dev, const void *X, int X_dtype, const void *fn, int fn_dtype, const void *scale,
                    int scale_dtype, const void *base, int base_dtype, int64_t T, int hc, int64_t d, float hc_eps,
                    float norm_eps, int iters, double *work, void *u, int u_dtype, const void *norm_w,
                    int norm_w_dtype, float *post, float *comb, void *stream)
{
    (void)dev; (void)X; (void)X_dtype; (void)fn; (void)fn_dtype; (void)scale; (void)scale_dtype; (void)base;
    (void)base_dtype; (void)T; (void)hc; (void)d; (void)hc_eps; (void)norm_eps; (void)iters; (void)work; (void)u;
    (void)u_dtype; (void)norm_w; (void)norm_w_dtype; (void)post; (void)comb; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_nn_hc_head(int dev, const void *X, int X_dtype, const void *fn, int fn_dtype, const void *scale,
                     int scale_dtype, const void *base, int base_dtype, int64_t T, int hc, int64_t d, float hc_eps,
                     float norm_eps, double *work, void *y, int y_dtype, const void *norm_w, int norm_w_dtype,
                     void *stream)
{
    (void)dev; (void)X; (void)X_dtype; (void)fn; (void)fn_dtype; (void)scale; (void)scale_dtype; (void)base;
    (void)base_dtype; (void)T; (void)hc; (void)d; (void)hc_eps; (void)norm_eps; (void)work; (void)y; (void)y_dtype;
    (void)norm_w; (void)norm_w_dtype; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_nn_hc_post_pre(int dev, const dsrtk_hc_post_args *post_args, void *X_next, int X_next_dtype,
                         const void *fn, int fn_dtype, const void *scale, int scale_dtype, const void *base,
                         int base_dtype, int64_t T, int hc, int64_t d, float hc_eps, float norm_eps, int iters,
                         double *work, void *u, int u_dtype, const void *norm_w, int norm_w_dtype, float *post,
                         float *comb, void *stream)
{
    (void)dev; (void)post_args; (void)X_next; (void)X_next_dtype; (void)fn; (void)fn_dtype; (void)scale;
    (void)scale_dtype; (void)base; (void)base_dtype; (void)T; (void)hc; (void)d; (void)hc_eps; (void)norm_eps;
    (void)iters; (void)work; (void)u; (void)u_dtype; (void)norm_w; (void)norm_w_dtype; (void)post; (void)comb;
    (void)stream;
    return without_cuda(__func__);
}

int dsrtk_nn_hc_post_head(int dev, const dsrtk_hc_post_args *post_args, void *X_next, int X_next_dtype,
                          const void *fn, int fn_dtype, const void *scale, int scale_dtype, const void *base,
                          int base_dtype, int64_t T, int hc, int64_t d, float hc_eps, float norm_eps, double *work,
                          void *y, int y_dtype, const void *norm_w, int norm_w_dtype, void *stream)
{
    (void)dev; (void)post_args; (void)X_next; (void)X_next_dtype; (void)fn; (void)fn_dtype; (void)scale;
    (void)scale_dtype; (void)base; (void)base_dtype; (void)T; (void)hc; (void)d; (void)hc_eps; (void)norm_eps;
    (void)work; (void)y; (void)y_dtype; (void)norm_w; (void)norm_w_dtype; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_nn_hc_post(int dev, const void *f, int f_dtype, const void *X, int X_dtype, const void *post,
                     int post_dtype, const void *comb, int comb_dtype, void *y, int y_dtype, int64_t T, int hc,
                     int64_t d, void *stream)
{
    (void)dev; (void)f; (void)f_dtype; (void)X; (void)X_dtype; (void)post; (void)post_dtype; (void)comb;
    (void)comb_dtype; (void)y; (void)y_dtype; (void)T; (void)hc; (void)d; (void)stream;
    return without_cuda(__func__);
}
/* end of hc */

/* ---- linear ---- */
int dsrtk_linear_workspace(int dev, const dsrtk_linear_weight *w, int64_t rows, int x_dtype, int quantise,
                           int y_dtype, size_t *bytes)
{
    (void)dev; (void)w; (void)rows; (void)x_dtype; (void)quantise; (void)y_dtype; (void)bytes;
    return without_cuda(__func__);
}

int dsrtk_linear(int dev, const dsrtk_linear_weight *w, const void *x, int x_dtype, int64_t rows, int quantise,
                 void *y, int y_dtype, void *workspace, size_t workspace_bytes, void *stream)
{
    (void)dev; (void)w; (void)x; (void)x_dtype; (void)rows; (void)quantise; (void)y; (void)y_dtype;
    (void)workspace; (void)workspace_bytes; (void)stream;
    return without_cuda(__func__);
}
int dsrtk_linear_pair_workspace(int dev, const dsrtk_linear_weight *w0, const dsrtk_linear_weight *w1, int64_t rows,
                                int x_dtype, int quantise, int y_dtype, size_t *bytes)
{
    (void)dev; (void)w0; (void)w1; (void)rows; (void)x_dtype; (void)quantise; (void)y_dtype;
    *bytes = 0;
    return without_cuda(__func__);
}
int dsrtk_linear_pair(int dev, const dsrtk_linear_weight *w0, const dsrtk_linear_weight *w1, const void *x, int x_dtype,
                      int64_t rows, int quantise, void *y0, void *y1, int y_dtype, void *workspace, size_t workspace_bytes,
                      void *stream, int *launched)
{
    (void)dev; (void)w0; (void)w1; (void)x; (void)x_dtype; (void)rows; (void)quantise; (void)y0; (void)y1; (void)y_dtype;
    (void)workspace; (void)workspace_bytes; (void)stream;
    *launched = 0;
    return without_cuda(__func__);
}
/* end of linear */

/* ---- moe ---- */
int dsrtk_moe_project(int dev, const dsrtk_moe_project_args *a, void *stream)
{
    (void)dev; (void)a; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_moe_gather(int dev, const void *x, int x_dtype, int64_t x_ld, const int32_t *row_x, int64_t rows, int64_t cols,
                     int q8, void *out, int out_dtype, void *stream)
{
    (void)dev; (void)x; (void)x_dtype; (void)x_ld; (void)row_x; (void)rows; (void)cols; (void)q8; (void)out;
    (void)out_dtype; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_moe_dequant_groups(int dev, const dsrtk_moe_matrix *table, const int32_t *groups, int g0, int g1, int mode,
                             int64_t max_units, int64_t stride, void *out, int out_dtype, void *stream)
{
    (void)dev; (void)table; (void)groups; (void)g0; (void)g1; (void)mode; (void)max_units; (void)stride; (void)out;
    (void)out_dtype; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_moe_prefill_gemm(int dev, const dsrtk_moe_matrix *table, const int32_t *groups, const int32_t *tiles,
                           int64_t n_tiles, int mode, int64_t max_out, const void *in, int64_t in_ld, const int32_t *in_rows,
                           int64_t in_count, void *out, int64_t out_ld, void *stream)
{
    (void)dev; (void)table; (void)groups; (void)tiles; (void)n_tiles; (void)mode; (void)max_out; (void)in; (void)in_ld;
    (void)in_rows; (void)in_count; (void)out; (void)out_ld; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_moe_gemm_groups(int dev, int ab_dtype, int count, const int *m, const int *n, const int *k, const void *const *a, int lda,
                          const void *const *w, void *const *c, int c_dtype, int ldc, void **ptrs, void *stream)
{
    (void)dev; (void)ab_dtype; (void)count; (void)m; (void)n; (void)k; (void)a; (void)lda; (void)w; (void)c; (void)c_dtype;
    (void)ldc; (void)ptrs; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_moe_swiglu(int dev, const void *gu, int64_t gu_ld, int64_t rows, const dsrtk_moe_matrix *table,
                     const int32_t *groups, const int32_t *n_groups, const float *row_weight, int64_t n_weighted,
                     float limit, int reference, void *h, int64_t h_ld, int io_dtype, const void *shared_gu, void *stream)
{
    (void)dev; (void)gu; (void)gu_ld; (void)rows; (void)table; (void)groups; (void)n_groups; (void)row_weight;
    (void)n_weighted; (void)limit; (void)reference; (void)h; (void)h_ld; (void)io_dtype; (void)shared_gu; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_moe_router(int dev, const dsrtk_moe_router_args *a, void *stream)
{
    (void)dev; (void)a; (void)stream;
    return without_cuda(__func__);
}

int dsrtk_moe_route_up(int dev, const dsrtk_moe_router_args *r, const dsrtk_moe_project_args *up, uint32_t *sync,
                       void *stream, int *launched)
{
    (void)dev; (void)r; (void)up; (void)sync; (void)stream;
    *launched = 0;
    return without_cuda(__func__);
}

int dsrtk_moe_combine(int dev, const void *y, int y_dtype, const int32_t *pos_of_pick, int64_t rows, int32_t k, int64_t dim,
                      void *out, int out_dtype, void *stream)
{
    (void)dev; (void)y; (void)y_dtype; (void)pos_of_pick; (void)rows; (void)k; (void)dim; (void)out; (void)out_dtype; (void)stream;
    return without_cuda(__func__);
}
/* end of moe */

/* ---- attention ---- */
/* sparse attention */
int dsrtk_sparse_attention_workspace(int dev, int64_t S, int64_t H, int64_t D, int64_t K, size_t *bytes)
{
    (void)dev; (void)S; (void)H; (void)D; (void)K;
    *bytes = 0;
    return without_cuda(__func__);
}

int dsrtk_sparse_attention(int dev, const dsrt_view *o, const dsrt_view *q, const dsrt_view *pool,
                           const dsrt_view *indices, const dsrt_view *sink, float scale, int round_p,
                           const dsrtk_rope *derotate, void *workspace, size_t workspace_bytes, void *stream)
{
    (void)dev; (void)o; (void)q; (void)pool; (void)indices; (void)sink; (void)scale; (void)round_p; (void)derotate;
    (void)workspace; (void)workspace_bytes; (void)stream;
    return without_cuda(__func__);
}
/* end of sparse attention */
int dsrtk_attn_ape_add(int dev, float *g, const float *ape, int64_t S, int64_t width, int64_t P, int64_t r, void *stream)
{
    (void)dev, (void)g, (void)ape, (void)S, (void)width, (void)P, (void)r, (void)stream;
    return without_cuda(__func__);
}
int dsrtk_attn_compress_pool(int dev, float *out, const float *chunk_c, const float *chunk_g, const float *ring_c,
                             const float *ring_g, int64_t ring, int64_t P, int64_t S, int64_t j0, int64_t n, int d, int r,
                             int coff, int round_bf16, void *stream)
{
    (void)dev, (void)out, (void)chunk_c, (void)chunk_g, (void)ring_c, (void)ring_g, (void)ring, (void)P, (void)S, (void)j0;
    (void)n, (void)d, (void)r, (void)coff, (void)round_bf16, (void)stream;
    return without_cuda(__func__);
}
int dsrtk_attn_ring_writes(int dev, const dsrtk_ring_write *writes, int n, int64_t P, int64_t S, void *stream)
{
    (void)dev, (void)writes, (void)n, (void)P, (void)S, (void)stream;
    return without_cuda(__func__);
}

int dsrtk_attn_gather(int dev, float *pool, int64_t *idx, const float *fresh, const float *window, int64_t window_rows,
                      const float *entries, const int *picks, int64_t base, int64_t P, int64_t S, int64_t n_entries,
                      int64_t hd, int64_t K, int64_t W, int64_t r, int64_t topk, const dsrtk_ring_write *rings,
                      int n_rings, void *stream)
{
    (void)dev, (void)pool, (void)idx, (void)fresh, (void)window, (void)window_rows, (void)entries, (void)picks, (void)base;
    (void)P, (void)S, (void)n_entries, (void)hd, (void)K, (void)W, (void)r, (void)topk, (void)rings, (void)n_rings, (void)stream;
    return without_cuda(__func__);
}

int dsrtk_attn_index_scores(int dev, float *scores, const float *q, const float *keys, const float *w, float scale,
                            int64_t S, int64_t P, int64_t r, int IH, int ID, int64_t n_max, int ref, void *stream)
{
    (void)dev, (void)scores, (void)q, (void)keys, (void)w, (void)scale, (void)S, (void)P, (void)r, (void)IH, (void)ID;
    (void)n_max, (void)ref, (void)stream;
    return without_cuda(__func__);
}
int dsrtk_attn_topk(int dev, int *picks, const float *scores, int64_t S, int64_t P, int64_t r, int64_t topk, int64_t n_max,
                    void *stream)
{
    (void)dev, (void)picks, (void)scores, (void)S, (void)P, (void)r, (void)topk, (void)n_max, (void)stream;
    return without_cuda(__func__);
}
/* end of attention */

/* ---- embedding ---- */
int dsrtk_embedding(int dev, const dsrt_view *dst, const dsrt_view *weight, const void *ids, int ids_dtype,
                    int64_t n, int copies, void *stream)
{
    (void)dev; (void)dst; (void)weight; (void)ids; (void)ids_dtype; (void)n; (void)copies; (void)stream;
    return without_cuda(__func__);
}
/* end of embedding */
