/*
 * attention.c - the DeepSeek-V4 attention layer on the CPU and on CUDA (attention.h, SPEC §6).
 *
 * What this protects: one position-addressed implementation of §6 (query path, window KV, the
 * compressors, the lightning indexer, sparse attention with the sink, the output path) whose result
 * for a token depends only on its position and the tokens before it, never on how the sequence was
 * cut into forward() calls, and whose state can be rolled back by up to `slack` positions exactly
 * (SPEC §6.9).
 *
 * State (all host f32; in reference precision every stored value is bf16-exact, so f32 storage
 * loses nothing):
 *   window ring     window + slack rows of the KV latent, position t in row t mod (window + slack);
 *   compressor ring coff·r + slack rows of (c_t, g_t + ape[t mod r]) (SPEC §6.5), position t in row
 *                   t mod (coff·r + slack): an overlap entry j reads positions (j−1)r … jr+r−1, a
 *                   plain one jr … jr+r−1, so the ring still holds them after a rollback by slack;
 *   entries         compressed entry j in row j (capacity max_len / r + 1), written when position
 *                   j·r + r − 1 is processed; the indexer has its own ring and key array.
 * Truncation only lowers the length: rows of positions >= length are stale and get overwritten
 * before anything reads them (entry j is visible only to queries t with j < (t+1) div r, i.e.
 * after it has been re-emitted).
 *
 * A chunk of S tokens at positions [P, P+S):
 *   - every projection runs once over the S rows (wq_a, wq_b, wkv, compressor wkv/wgate, indexer
 *     wq_b and weights_proj, wo_a, wo_b);
 *   - rows of a position p are read from the chunk's fresh buffers when p >= P and from the rings
 *     otherwise, and the rings are written only after the whole chunk has been computed (its last
 *     min(S, ring) positions). So a chunk longer than the window (or the compressor ring) never
 *     overwrites what an earlier query of the same chunk needs, with no splitting;
 *   - compressed entries j with P <= j·r + r − 1 < P + S are pooled from those rows and
 *     post-processed together (they do not depend on each other);
 *   - the attention pool is [window positions max(0, P−window+1) … P+S−1, entries 0 … (P+S) div r − 1]
 *     and each query's index list is laid out as a function of its position only: its window
 *     positions ascending, −1 up to `window` slots, then its compressed picks (all visible entries
 *     ascending; ratio 4: the indexer's top-k in descending score, ties to the lower entry), −1
 *     after. The blocked online softmax (nn.h) then sees the same list whatever the chunking, so
 *     chunked prefill, one-shot prefill and decode agree exactly.
 *
 * CUDA: the same state as f32 device tensors and the same steps, the loops as kernels
 * (kernels/attention.cu), with the aux-stream fan-out of SPEC §10; see "the CUDA path" below.
 * Both paths post-process a projection's rows with nn.h's fused ops: dsrt_nn_norm_rope (norm,
 * RoPE, then Q8 or Hadamard + Q4: the query, the window KV, compressed entries, the indexer's
 * query) and dsrt_nn_sparse_attention_inverse_rope (attention and the output's inverse RoPE),
 * which give the separate ops' bits in one launch each on CUDA. Their positions are progressions
 * (P, P + 1, … or j·r, (j+1)·r, …), so no positions tensor is made.
 *
 * Precision: reference follows SPEC §9.1 (the bf16 rounding points, Q8 on the latent's no-rope
 * dims, Hadamard + Q4 in the indexer, indexer scores in bf16); fp32 is the same computation in f32
 * with no round trips, no Hadamard and fp32 scores, as transformers in fp32 (SPEC §9.2 items 1, 2).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "attention.h"
#include "err.h"
#include "kernels.h"
#include "ops.h"

struct dsrt_attention {
    atomic_int refcount;
    dsrt_attn_config cfg;
    dsrt_attn_weights w;
    int coff, device;
    float *ape, *index_ape; /* f32 copies [ratio, coff·d] (CPU) */
    dsrt_tensor *ape_t, *index_ape_t; /* the same as contiguous f32 tensors on the device (CUDA) */
    dsrt_stream **aux;
    int n_aux;
    dsrt_event *ev[4];     /* CUDA with aux streams: one recorded on the caller's stream, one per aux stream */
};

/* one compressor's sequence state (SPEC §6.5) */
typedef struct {
    int d, ring;           /* entry width, rows of the (c, g) ring */
    float *c, *g;          /* [ring, coff·d] */
    float *entries;        /* [max_len / r + 1, d] */
    dsrt_tensor *tc, *tg, *tentries; /* CUDA: the same three as f32 tensors on the device */
} comp_state;

struct dsrt_attn_state {
    dsrt_attention *a;
    int64_t max_len, length;
    int slack, window_rows;
    dsrt_precision prec;
    float *window;         /* [window + slack, head_dim] */
    dsrt_tensor *twindow;  /* CUDA: the window ring as an f32 tensor on the device */
    int device;
    comp_state comp, index;
};

#define F32(t) ((float *)(t)->storage->data + (t)->offset)

static float bf16r(float v) { return dsrt_bf16_to_f32(dsrt_f32_to_bf16(v)); }

/* ---- construction ---- */

static int check_linear(const dsrt_linear *l, const char *name, int64_t in, int64_t out, int groups, int fp32_math,
                        int device)
{
    char d1[16], d2[16];
    if (!l) return dsrt_err("attention: %s is missing", name);
    const dsrt_linear_config *c = &l->cfg;
    if (c->in_features != in || c->out_features != out)
        return dsrt_err("attention: %s maps %lld -> %lld features, expected %lld -> %lld", name, (long long)c->in_features,
                        (long long)c->out_features, (long long)in, (long long)out);
    if (c->groups != groups || c->fp32_math != fp32_math)
        return dsrt_err("attention: %s has groups %d%s, expected groups %d%s", name, c->groups,
                        c->fp32_math ? " and fp32_math" : "", groups, fp32_math ? " and fp32_math" : "");
    if (l->weight->device != device)
        return dsrt_err("attention: %s is on %s, the layer's weights (wq_a) on %s", name, dsrt_device_str(l->weight->device, d1),
                        dsrt_device_str(device, d2));
    return 0;
}

/* a float tensor [n] or [rows, n] (rows 0: 1-D) on the layer's device */
static int check_vector(const dsrt_tensor *t, const char *name, int64_t rows, int64_t n, int device)
{
    char tb[DSRT_SHAPE_BUF], dev[16];
    if (!t) return dsrt_err("attention: %s is missing", name);
    int ok = dsrt_dtype_is_float(t->dtype) && t->device == device &&
             (rows ? t->ndim == 2 && t->shape[0] == rows && t->shape[1] == n : t->ndim == 1 && t->shape[0] == n);
    if (!ok) {
        if (rows) return dsrt_err("attention: %s %s, expected a float [%lld, %lld] on %s", name,
                                  dsrt_tensor_str(t, tb, sizeof tb), (long long)rows, (long long)n, dsrt_device_str(device, dev));
        return dsrt_err("attention: %s %s, expected a float [%lld] on %s", name, dsrt_tensor_str(t, tb, sizeof tb),
                        (long long)n, dsrt_device_str(device, dev));
    }
    return 0;
}

static int check_compressor(const dsrt_compressor_weights *c, const char *prefix, int64_t dim, int ratio, int coff, int d,
                            int device)
{
    char name[64];
    snprintf(name, sizeof name, "%s.wkv", prefix);
    if (check_linear(c->wkv, name, dim, (int64_t)coff * d, 1, 1, device)) return -1;
    snprintf(name, sizeof name, "%s.wgate", prefix);
    if (check_linear(c->wgate, name, dim, (int64_t)coff * d, 1, 1, device)) return -1;
    snprintf(name, sizeof name, "%s.ape", prefix);
    if (check_vector(c->ape, name, ratio, (int64_t)coff * d, device)) return -1;
    snprintf(name, sizeof name, "%s.norm", prefix);
    return check_vector(c->norm, name, 0, d, device);
}

static int check_config(const dsrt_attn_config *c)
{
    if (c->dim < 1 || c->n_heads < 1 || c->q_lora_rank < 1 || c->o_lora_rank < 1 || c->window < 1 || c->ratio < 0)
        return dsrt_err("attention: dims must be positive (dim %d, heads %d, q_lora_rank %d, o_lora_rank %d, window %d) "
                        "and ratio >= 0 (got %d)", c->dim, c->n_heads, c->q_lora_rank, c->o_lora_rank, c->window, c->ratio);
    if (c->rope_dim != DSRT_NN_ROPE_DIMS || c->head_dim < c->rope_dim)
        return dsrt_err("attention: rope_dim %d / head_dim %d: RoPE rotates the trailing %d dims (SPEC §3.6)", c->rope_dim,
                        c->head_dim, DSRT_NN_ROPE_DIMS);
    if (c->head_dim % 8 || c->head_dim > 1024) /* dsrt_nn_norm_rope's vectors (DSV4: 512) */
        return dsrt_err("attention: head_dim %d must be a multiple of 8 up to 1024", c->head_dim);
    if (c->o_groups < 1 || c->n_heads % c->o_groups)
        return dsrt_err("attention: %d heads do not split into %d output groups", c->n_heads, c->o_groups);
    if (c->ratio == 4 && (c->index_head_dim != DSRT_NN_HADAMARD_DIM || c->index_n_heads < 1 || c->index_topk < 1))
        return dsrt_err("attention: the indexer needs index_head_dim %d (got %d), index_n_heads and index_topk >= 1",
                        DSRT_NN_HADAMARD_DIM, c->index_head_dim);
    return 0;
}

static float *ape_copy(const dsrt_tensor *ape)
{
    int64_t rows = ape->shape[0], cols = ape->shape[1];
    float *p = malloc((size_t)(rows * cols) * sizeof *p);
    if (!p) return dsrt_err_null("attention: out of host memory");
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++)
            p[r * cols + c] = dsrt_load_f32(ape->storage->data, ape->dtype, ape->offset + r * ape->stride[0] + c * ape->stride[1]);
    return p;
}

static void compressor_ref(dsrt_compressor_weights *c, int retain)
{
    void (*lin)(dsrt_linear *) = retain ? dsrt_linear_retain : dsrt_linear_release;
    void (*ten)(dsrt_tensor *) = retain ? dsrt_tensor_retain : dsrt_tensor_release;
    if (c->wkv) lin(c->wkv);
    if (c->wgate) lin(c->wgate);
    if (c->ape) ten(c->ape);
    if (c->norm) ten(c->norm);
}

static void weights_ref(dsrt_attn_weights *w, int retain)
{
    void (*lin)(dsrt_linear *) = retain ? dsrt_linear_retain : dsrt_linear_release;
    void (*ten)(dsrt_tensor *) = retain ? dsrt_tensor_retain : dsrt_tensor_release;
    dsrt_linear *lins[] = {w->wq_a, w->wq_b, w->wkv, w->wo_a, w->wo_b, w->index_wq_b, w->index_weights_proj};
    dsrt_tensor *tens[] = {w->q_norm, w->kv_norm, w->attn_sink};
    for (size_t i = 0; i < sizeof lins / sizeof *lins; i++)
        if (lins[i]) lin(lins[i]);
    for (size_t i = 0; i < sizeof tens / sizeof *tens; i++)
        if (tens[i]) ten(tens[i]);
    compressor_ref(&w->compressor, retain);
    compressor_ref(&w->index_compressor, retain);
}

dsrt_attention *dsrt_attention_new(const dsrt_attn_config *cfg, const dsrt_attn_weights *w, dsrt_stream *const *aux,
                                   int n_aux)
{
    if (check_config(cfg)) return NULL;
    const dsrt_attn_config *c = cfg;
    int64_t hd = c->head_dim, heads = c->n_heads, G = c->o_groups;
    int coff = c->ratio == 4 ? 2 : 1;
    /* every weight lives where wq_a does: the CPU, or one CUDA device */
    int dev = w->wq_a ? w->wq_a->weight->device : DSRT_CPU;
    char db[16];
    if (check_linear(w->wq_a, "wq_a", c->dim, c->q_lora_rank, 1, 0, dev) ||
        check_linear(w->wq_b, "wq_b", c->q_lora_rank, heads * hd, 1, 0, dev) ||
        check_linear(w->wkv, "wkv", c->dim, hd, 1, 0, dev) ||
        check_linear(w->wo_a, "wo_a", heads * hd, G * c->o_lora_rank, (int)G, 0, dev) ||
        check_linear(w->wo_b, "wo_b", G * c->o_lora_rank, c->dim, 1, 0, dev) ||
        check_vector(w->q_norm, "q_norm", 0, c->q_lora_rank, dev) || check_vector(w->kv_norm, "kv_norm", 0, hd, dev) ||
        check_vector(w->attn_sink, "attn_sink", 0, heads, dev))
        return NULL;
    if (c->ratio > 0 && check_compressor(&w->compressor, "compressor", c->dim, c->ratio, coff, (int)hd, dev)) return NULL;
    if (c->ratio == 0 && (w->compressor.wkv || w->compressor.wgate || w->compressor.ape || w->compressor.norm))
        return dsrt_err_null("attention: a window-only layer (ratio 0) has no compressor, got compressor weights");
    int indexer = c->ratio == 4;
    if (indexer) {
        if (check_linear(w->index_wq_b, "indexer.wq_b", c->q_lora_rank, (int64_t)c->index_n_heads * c->index_head_dim, 1, 0,
                         dev) ||
            check_linear(w->index_weights_proj, "indexer.weights_proj", c->dim, c->index_n_heads, 1, 0, dev) ||
            check_compressor(&w->index_compressor, "indexer.compressor", c->dim, c->ratio, coff, c->index_head_dim, dev))
            return NULL;
    } else if (w->index_wq_b || w->index_weights_proj || w->index_compressor.wkv) {
        return dsrt_err_null("attention: only ratio-4 layers have an indexer (ratio %d), got indexer weights", c->ratio);
    }
    for (int i = 0; i < n_aux; i++)
        if (!aux[i] || aux[i]->device != dev)
            return dsrt_err_null("attention: aux stream %d is missing or not on %s, where the weights are", i + 1,
                                 dsrt_device_str(dev, db));
    /* SPEC §10: the three side GEMMs run on aux streams 0, 1, 2, or all on the caller's stream */
    if (dev != DSRT_CPU && n_aux != 0 && n_aux != 3)
        return dsrt_err_null("attention: a CUDA layer takes 3 aux streams (or none), got %d", n_aux);
    dsrt_attention *a = calloc(1, sizeof *a);
    if (!a) return dsrt_err_null("attention: out of host memory");
    atomic_init(&a->refcount, 1);
    a->cfg = *c;
    a->coff = coff;
    a->device = dev;
    a->w = *w;
    weights_ref(&a->w, 1);
    a->aux = calloc((size_t)(n_aux ? n_aux : 1), sizeof *a->aux);
    int ok = a->aux != NULL;
    for (int i = 0; ok && i < n_aux; i++) {
        a->aux[i] = aux[i];
        dsrt_stream_retain(aux[i]);
        a->n_aux = i + 1;
    }
    if (dev == DSRT_CPU) {
        if (ok && c->ratio > 0) ok = (a->ape = ape_copy(w->compressor.ape)) != NULL;
        if (ok && indexer) ok = (a->index_ape = ape_copy(w->index_compressor.ape)) != NULL;
    } else if (ok) {
        /* contiguous f32 ape on the device, made on the default stream and waited for here, so a
         * forward on any stream reads finished copies (construction is allowed to wait) */
        dsrt_stream *s0 = dsrt_stream_default(dev);
        if (c->ratio > 0) ok = (a->ape_t = dsrt_linear_input(w->compressor.ape, s0)) != NULL;
        if (ok && indexer) ok = (a->index_ape_t = dsrt_linear_input(w->index_compressor.ape, s0)) != NULL;
        for (int i = 0; ok && n_aux && i < 4; i++) ok = (a->ev[i] = dsrt_event_new(dev, 0)) != NULL;
        if (ok) ok = !dsrt_stream_synchronize(s0);
        if (!ok) {
            dsrt_attention_release(a);
            return NULL;
        }
    }
    if (!ok) {
        if (!a->aux) dsrt_err("attention: out of host memory");
        dsrt_attention_release(a);
        return NULL;
    }
    return a;
}

const dsrt_attn_config *dsrt_attention_config(const dsrt_attention *a) { return &a->cfg; }

void dsrt_attention_retain(dsrt_attention *a) { atomic_fetch_add(&a->refcount, 1); }

void dsrt_attention_release(dsrt_attention *a)
{
    if (!a || atomic_fetch_sub(&a->refcount, 1) != 1) return;
    weights_ref(&a->w, 0);
    for (int i = 0; i < a->n_aux; i++) dsrt_stream_release(a->aux[i]);
    free(a->aux);
    free(a->ape);
    free(a->index_ape);
    dsrt_tensor_release(a->ape_t);
    dsrt_tensor_release(a->index_ape_t);
    for (int i = 0; i < 4; i++)
        if (a->ev[i]) dsrt_event_release(a->ev[i]);
    free(a);
}

/* ---- state ---- */

static int comp_state_init(comp_state *cs, int d, int ratio, int coff, int slack, int64_t max_len)
{
    cs->d = d;
    cs->ring = coff * ratio + slack;
    size_t ring = (size_t)cs->ring * (size_t)(coff * d);
    cs->c = malloc(ring * sizeof(float));
    cs->g = malloc(ring * sizeof(float));
    cs->entries = malloc((size_t)(max_len / ratio + 1) * (size_t)d * sizeof(float));
    return cs->c && cs->g && cs->entries ? 0 : dsrt_err("attention: out of host memory for the compressor state");
}

/* the CUDA state: the same buffers as f32 tensors on `device`, zeroed on s */
static dsrt_tensor *state_tensor(int64_t rows, int64_t cols, int device, dsrt_stream *s)
{
    dsrt_tensor *t = dsrt_tensor_new(DSRT_F32, 2, (int64_t[]){rows, cols}, device, s);
    if (t && dsrt_op_fill(t, 0, s)) {
        dsrt_tensor_release(t);
        return NULL;
    }
    return t;
}

static int comp_state_init_device(comp_state *cs, int d, int ratio, int coff, int slack, int64_t max_len, int device,
                                  dsrt_stream *s)
{
    cs->d = d;
    cs->ring = coff * ratio + slack;
    cs->tc = state_tensor(cs->ring, (int64_t)coff * d, device, s);
    cs->tg = cs->tc ? state_tensor(cs->ring, (int64_t)coff * d, device, s) : NULL;
    cs->tentries = cs->tg ? state_tensor(max_len / ratio + 1, d, device, s) : NULL;
    return cs->tentries ? 0 : -1;
}

static void comp_state_free(comp_state *cs)
{
    free(cs->c);
    free(cs->g);
    free(cs->entries);
    dsrt_tensor_release(cs->tc);
    dsrt_tensor_release(cs->tg);
    dsrt_tensor_release(cs->tentries);
}

dsrt_attn_state *dsrt_attn_state_new(const dsrt_attention *a, int64_t max_len, int slack, dsrt_precision prec,
                                     int device, dsrt_stream *s)
{
    char dev[16], wdev[16];
    if (device != a->device)
        return dsrt_err_null("attn_state: a state on %s for a layer whose weights are on %s", dsrt_device_str(device, dev),
                             dsrt_device_str(a->device, wdev));
    if (s->device != device)
        return dsrt_err_null("attn_state: the stream is on %s, the state on %s", dsrt_device_str(s->device, wdev),
                             dsrt_device_str(device, dev));
    if (max_len < 1 || slack < 0)
        return dsrt_err_null("attn_state: max_len %lld must be >= 1 and slack %d >= 0", (long long)max_len, slack);
    const dsrt_attn_config *c = &a->cfg;
    dsrt_attn_state *st = calloc(1, sizeof *st);
    if (!st) return dsrt_err_null("attn_state: out of host memory");
    st->a = (dsrt_attention *)a;
    dsrt_attention_retain(st->a);
    st->max_len = max_len;
    st->slack = slack;
    st->prec = prec;
    st->window_rows = c->window + slack;
    st->device = device;
    int rc;
    if (device == DSRT_CPU) {
        st->window = malloc((size_t)st->window_rows * (size_t)c->head_dim * sizeof(float));
        rc = st->window ? 0 : dsrt_err("attn_state: out of host memory");
        if (!rc && c->ratio > 0) rc = comp_state_init(&st->comp, c->head_dim, c->ratio, a->coff, slack, max_len);
        if (!rc && c->ratio == 4) rc = comp_state_init(&st->index, c->index_head_dim, c->ratio, a->coff, slack, max_len);
    } else {
        /* zeroed (as the reference resets its states), then waited for: a forward may run on
         * another stream than s, and must not race these fills */
        st->twindow = state_tensor(st->window_rows, c->head_dim, device, s);
        rc = st->twindow ? 0 : -1;
        if (!rc && c->ratio > 0) rc = comp_state_init_device(&st->comp, c->head_dim, c->ratio, a->coff, slack, max_len, device, s);
        if (!rc && c->ratio == 4)
            rc = comp_state_init_device(&st->index, c->index_head_dim, c->ratio, a->coff, slack, max_len, device, s);
        if (!rc) rc = dsrt_stream_synchronize(s);
    }
    if (rc) {
        dsrt_attn_state_release(st);
        return NULL;
    }
    return st;
}

void dsrt_attn_state_release(dsrt_attn_state *st)
{
    if (!st) return;
    free(st->window);
    dsrt_tensor_release(st->twindow);
    comp_state_free(&st->comp);
    comp_state_free(&st->index);
    dsrt_attention_release(st->a);
    free(st);
}

int64_t dsrt_attn_state_length(const dsrt_attn_state *st) { return st->length; }

dsrt_precision dsrt_attn_state_precision(const dsrt_attn_state *st) { return st->prec; }

int64_t dsrt_attn_state_skippable(const dsrt_attn_state *st, int64_t n)
{
    return st->a->cfg.ratio == 0 && n > st->window_rows ? n - st->window_rows : 0;
}

int dsrt_attn_state_truncate(dsrt_attn_state *st, int64_t length)
{
    if (length > st->length || length < 0 || length < st->length - st->slack)
        return dsrt_err("attn_state: cannot truncate from %lld to %lld positions: the state rolls back by at most "
                        "slack = %d positions", (long long)st->length, (long long)length, st->slack);
    st->length = length;
    return 0;
}

/* ---- helpers over f32 tensors ---- */

static dsrt_tensor *new_f32(int ndim, int64_t d0, int64_t d1, int64_t d2, dsrt_stream *s)
{
    int64_t shape[3] = {d0, d1, d2};
    return dsrt_tensor_new(DSRT_F32, ndim, shape, DSRT_CPU, s);
}

/* t (released) as a contiguous f32 tensor; NULL passes through */
static dsrt_tensor *as_f32(dsrt_tensor *t, dsrt_stream *s)
{
    if (!t) return NULL;
    dsrt_tensor *f = t->dtype == DSRT_F32 ? dsrt_tensor_contiguous(t, s) : dsrt_tensor_to(t, t->device, DSRT_F32, s, 0);
    dsrt_tensor_release(t);
    return f;
}

/* y = linear(x rows) as a new f32 [rows, out] tensor */
static dsrt_tensor *project(dsrt_linear *l, const float *x, int64_t rows, dsrt_precision prec, dsrt_stream *s)
{
    dsrt_tensor *y = new_f32(2, rows, l->cfg.out_features, 0, s);
    if (y && dsrt_linear_rows(l, x, rows, F32(y), prec, s)) {
        dsrt_tensor_release(y);
        return NULL;
    }
    return y;
}

/* RMS_w of t (released), as f32 */
static dsrt_tensor *norm_f32(dsrt_tensor *t, dsrt_tensor *w, float eps, dsrt_precision prec, dsrt_stream *s)
{
    if (!t) return NULL;
    dsrt_tensor *y = dsrt_nn_rms_norm(t, w, eps, prec, s);
    dsrt_tensor_release(t);
    return as_f32(y, s);
}

static const dsrt_yarn *yarn_of(const dsrt_attn_config *c) { return c->has_yarn ? &c->yarn : NULL; }

/* t (released) normed, rotated by the layer's RoPE at positions first, first + step, … and
 * post-processed (nn.h dsrt_nn_norm_rope), as `out` (f32, or bf16 in reference precision): every
 * projection's rows before they are attended or stored (the query, the window KV, compressed
 * entries, the indexer's query) */
static dsrt_tensor *norm_rope_to(const dsrt_attn_config *c, dsrt_tensor *t, dsrt_nn_norm norm, dsrt_tensor *weight,
                                 int64_t first, int64_t step, dsrt_nn_post post, dsrt_precision prec, dsrt_dtype out,
                                 dsrt_stream *s)
{
    if (!t) return NULL;
    dsrt_tensor *y = dsrt_nn_norm_rope_to(t, norm, weight, c->norm_eps, first, step, c->rope_theta, yarn_of(c), post, prec,
                                          out, s);
    dsrt_tensor_release(t);
    return y;
}

static dsrt_tensor *norm_rope(const dsrt_attn_config *c, dsrt_tensor *t, dsrt_nn_norm norm, dsrt_tensor *weight,
                              int64_t first, int64_t step, dsrt_nn_post post, dsrt_precision prec, dsrt_stream *s)
{
    return norm_rope_to(c, t, norm, weight, first, step, post, prec, DSRT_F32, s);
}

/* sparse attention with the sink, then the inverse RoPE at the queries' positions P, P + 1, …
 * (SPEC §6.7, §6.8 step 1), in the op's dtype (bf16 in reference precision) */
static dsrt_tensor *attend(const dsrt_attention *a, dsrt_tensor *q, dsrt_tensor *pool, dsrt_tensor *idx, int64_t P,
                           dsrt_precision prec, dsrt_stream *s)
{
    const dsrt_attn_config *c = &a->cfg;
    return dsrt_nn_sparse_attention_inverse_rope(q, pool, idx, a->w.attn_sink, (float)(1.0 / sqrt((double)c->head_dim)), P,
                                                 1, c->rope_theta, yarn_of(c), prec, s);
}

/* what follows RoPE on a latent vector: the main KV latent's Q8 (window rows and compressed
 * entries, SPEC §6.2, §6.5), the indexer's Hadamard + Q4 (its query and keys, §6.6) in reference
 * precision only (SPEC §9.2 item 2) */
static dsrt_nn_post latent_post(int indexer, dsrt_precision prec)
{
    if (!indexer) return DSRT_NN_POST_Q8;
    return prec == DSRT_PREC_REFERENCE ? DSRT_NN_POST_HADAMARD_Q4 : DSRT_NN_POST_NONE;
}

/* ---- compressor (SPEC §6.5) ---- */

/* Emits the entries j with P <= j·r + r − 1 < P + S into cs->entries (rows no query has seen yet)
 * and returns the chunk's (c, g + ape) rows in *c_rows, *g_rows, f32 [S, coff·d], for
 * commit_rows once the whole forward has succeeded. x: f32 [S, dim]. `indexer`: Hadamard + Q4
 * instead of Q8. */
static int compress(dsrt_attention *a, comp_state *cs, dsrt_compressor_weights *w, const float *ape, const float *x,
                    int64_t P, int64_t S, int indexer, dsrt_precision prec, dsrt_stream *s, dsrt_tensor **c_rows,
                    dsrt_tensor **g_rows)
{
    const dsrt_attn_config *cfg = &a->cfg;
    int r = cfg->ratio, coff = a->coff, d = cs->d, width = coff * d;
    dsrt_tensor *ct = project(w->wkv, x, S, DSRT_PREC_FP32, s); /* fp32 math (SPEC §3.5) */
    dsrt_tensor *gt = ct ? project(w->wgate, x, S, DSRT_PREC_FP32, s) : NULL;
    int64_t j0 = P / r, n = (P + S) / r - j0;
    dsrt_tensor *E = gt ? new_f32(2, n, d, 0, s) : NULL;
    if (!E) goto fail;
    float *c = F32(ct), *g = F32(gt);
    for (int64_t i = 0; i < S; i++)
        for (int k = 0; k < width; k++) g[i * width + k] += ape[((P + i) % r) * width + k];
    /* the (c, g) row of position p, from the chunk or the ring */
#define ROW(buf, kept, p) ((p) >= P ? (buf) + ((p) - P) * width : (kept) + ((p) % cs->ring) * width)
#pragma omp parallel for if (n * d * r > (1 << 16))
    for (int64_t e = 0; e < n; e++) {
        int64_t j = j0 + e, first = coff == 2 && j > 0 ? (j - 1) * r : j * r, last = j * r + r;
        float *out = F32(E) + e * d;
        for (int ch = 0; ch < d; ch++) {
            /* per-channel softmax over the window's slots: overlap (SPEC §6.5) takes the A half
             * [0, d) of window j−1 and the B half [d, 2d) of window j */
            float m = -INFINITY;
            for (int64_t p = first; p < last; p++) {
                int half = coff == 2 && p >= j * r ? d : 0;
                float gv = ROW(g, cs->g, p)[half + ch];
                m = gv > m ? gv : m;
            }
            double num = 0, den = 0;
            for (int64_t p = first; p < last; p++) {
                int half = coff == 2 && p >= j * r ? d : 0;
                double wgt = expf(ROW(g, cs->g, p)[half + ch] - m);
                den += wgt;
                num += wgt * ROW(c, cs->c, p)[half + ch];
            }
            float v = (float)(num / den);
            out[ch] = prec == DSRT_PREC_REFERENCE ? bf16r(v) : v; /* bf16(E) before the norm */
        }
    }
    /* post-processing: RMS_w, RoPE at j·r, then Q8 (main) or Hadamard + Q4 (indexer; reference only) */
    E = norm_rope(cfg, E, DSRT_NN_NORM_RMS, w->norm, j0 * r, r, latent_post(indexer, prec), prec, s);
    if (!E) goto fail;
    memcpy(cs->entries + j0 * d, F32(E), (size_t)(n * d) * sizeof(float));
#undef ROW
    *c_rows = ct;
    *g_rows = gt;
    dsrt_tensor_release(E);
    return 0;
fail:
    dsrt_tensor_release(ct);
    dsrt_tensor_release(gt);
    dsrt_tensor_release(E);
    return -1;
}

/* the chunk's last min(S, ring) (c, g) rows (none when c is NULL) into the ring */
static void commit_rows(comp_state *cs, int width, dsrt_tensor *c, dsrt_tensor *g, int64_t P, int64_t S)
{
    if (!c) return;
    for (int64_t i = S > cs->ring ? S - cs->ring : 0; i < S; i++) {
        memcpy(cs->c + ((P + i) % cs->ring) * width, F32(c) + i * width, (size_t)width * sizeof(float));
        memcpy(cs->g + ((P + i) % cs->ring) * width, F32(g) + i * width, (size_t)width * sizeof(float));
    }
}

/* ---- lightning indexer (SPEC §6.6) ---- */

typedef struct {
    float score;
    int64_t j;
} pick;

/* descending score, ties to the lower entry */
static int pick_order(const void *pa, const void *pb)
{
    const pick *a = pa, *b = pb;
    if (a->score != b->score) return a->score > b->score ? -1 : 1;
    return a->j < b->j ? -1 : a->j > b->j;
}

/* The indexer's query (SPEC §6.6) from wq_b's output q [S, IH·ID] (released; NULL passes through)
 * for positions P … P+S−1: RoPE, then Hadamard + Q4 in reference precision only (SPEC §9.2 item 2);
 * f32 [S, IH, ID]. Shared by the CPU and the CUDA paths. */
static dsrt_tensor *indexer_q(dsrt_attention *a, dsrt_tensor *q, int64_t P, int64_t S, dsrt_precision prec, dsrt_stream *s)
{
    const dsrt_attn_config *c = &a->cfg;
    if (!q) return NULL;
    dsrt_tensor *v = dsrt_tensor_view(q, 3, (int64_t[]){S, c->index_n_heads, c->index_head_dim});
    dsrt_tensor_release(q);
    return norm_rope(c, v, DSRT_NN_NORM_NONE, NULL, P, 1, latent_post(1, prec), prec, s);
}

/* Writes each query's top-k visible entries (+ offset) into idx[i·K + first ...]. qr: f32 [S, q_lora]
 * (the query path's normed low-rank q), x: f32 [S, dim]. */
static int index_select(dsrt_attention *a, dsrt_attn_state *st, const float *qr, const float *x, int64_t P, int64_t S,
                        int64_t *idx, int64_t K, int64_t first, int64_t offset, dsrt_stream *s,
                        dsrt_tensor **c_rows, dsrt_tensor **g_rows)
{
    const dsrt_attn_config *c = &a->cfg;
    dsrt_precision prec = st->prec;
    int64_t IH = c->index_n_heads, ID = c->index_head_dim, topk = c->index_topk;
    int ref = prec == DSRT_PREC_REFERENCE;
    /* 1. qI = RoPE(wq_b·qr), then Hadamard + Q4 (reference only, SPEC §9.2 item 2) */
    dsrt_tensor *q = indexer_q(a, project(a->w.index_wq_b, qr, S, prec, s), P, S, prec, s), *w = NULL, *scratch = NULL;
    /* 2. the indexer's keys; 3. head weights bf16(weights_proj·x)·ID^-½·IH^-½ */
    if (!q || compress(a, &st->index, &a->w.index_compressor, a->index_ape, x, P, S, 1, prec, s, c_rows, g_rows)) goto fail;
    if (!(w = project(a->w.index_weights_proj, x, S, prec, s))) goto fail;
    float scale = (float)(1.0 / sqrt((double)ID) / sqrt((double)IH)), *wp = F32(w), *qp = F32(q);
    for (int64_t i = 0; i < S * IH; i++) wp[i] = ref ? bf16r(wp[i] * scale) : wp[i] * scale;
    int64_t n_max = (P + S) / c->ratio;
    if (!(scratch = dsrt_tensor_new(DSRT_U8, 1, (int64_t[]){(n_max ? n_max : 1) * S * (int64_t)sizeof(pick)}, DSRT_CPU, s)))
        goto fail;
    const float *keys = st->index.entries;
    /* 4. score[t, j] = Σ_h w[t,h]·ReLU(qI[t,h]·K_j), in bf16 in reference precision (bf16 dot
     * products, ReLU and products; the head sum accumulated in fp32 and rounded once, as torch's
     * bf16 sum); 5. the top k = min(topk, visible) of the visible entries j < (t+1) div r. */
#pragma omp parallel for if (S * n_max * IH * ID > (1 << 18))
    for (int64_t i = 0; i < S; i++) {
        int64_t visible = (P + i + 1) / c->ratio, k = visible < topk ? visible : topk;
        pick *picks = (pick *)scratch->storage->data + i * n_max;
        for (int64_t j = 0; j < visible; j++) {
            double sum = 0;
            for (int64_t h = 0; h < IH; h++) {
                const float *qh = qp + (i * IH + h) * ID, *kj = keys + j * ID;
                double dot = 0;
                for (int64_t e = 0; e < ID; e++) dot += (double)qh[e] * kj[e];
                float dv = ref ? bf16r((float)dot) : (float)dot;
                dv = dv > 0 ? dv : 0;
                sum += ref ? bf16r(dv * wp[i * IH + h]) : (double)dv * wp[i * IH + h];
            }
            picks[j].score = ref ? bf16r((float)sum) : (float)sum;
            picks[j].j = j;
        }
        qsort(picks, (size_t)visible, sizeof *picks, pick_order);
        for (int64_t m = 0; m < k; m++) idx[i * K + first + m] = offset + picks[m].j;
    }
    dsrt_tensor_release(q);
    dsrt_tensor_release(w);
    dsrt_tensor_release(scratch);
    return 0;
fail:
    dsrt_tensor_release(q);
    dsrt_tensor_release(w);
    dsrt_tensor_release(scratch);
    return -1;
}

/* ---- forward ---- */

/* op: "forward" or "advance", for the messages */
static int check_forward(const dsrt_attention *a, const dsrt_attn_state *st, const dsrt_tensor *x, int64_t skip,
                         dsrt_precision prec, const dsrt_stream *s, const char *op)
{
    char xb[DSRT_SHAPE_BUF];
    if (st->a != a) return dsrt_err("attention: the state was made for another attention layer");
    if (prec != st->prec)
        return dsrt_err("attention: %s in %s precision with a state made for %s", op, prec == DSRT_PREC_FP32 ? "fp32" : "reference",
                        st->prec == DSRT_PREC_FP32 ? "fp32" : "reference");
    if (dsrt_linear_check_input(x, a->cfg.dim, a->device, s, "attention")) return -1;
    if (x->ndim != 2 || x->shape[0] < 1)
        return dsrt_err("attention: input %s, expected [S, %d] with S >= 1", dsrt_tensor_str(x, xb, sizeof xb), a->cfg.dim);
    /* (skip past max_len is refused before skip + S can overflow) */
    const int64_t may_skip = skip >= 0 && skip <= st->max_len ? dsrt_attn_state_skippable(st, skip + x->shape[0]) : 0;
    if (skip < 0 || skip > may_skip)
        return dsrt_err("attention: advance cannot skip %lld positions before %lld rows: it may skip only what the state "
                        "drops unread (%lld here; %s)", (long long)skip, (long long)x->shape[0], (long long)may_skip,
                        a->cfg.ratio ? "a layer with compressors keeps every position" : "the ring keeps window + slack rows");
    if (st->length + skip + x->shape[0] > st->max_len)
        return dsrt_err("attention: %lld new positions after %lld exceed the state's max_len %lld",
                        (long long)(skip + x->shape[0]), (long long)st->length, (long long)st->max_len);
    return 0;
}

/* ---- the CUDA path ----
 *
 * The same computation as the CPU forward above, step for step, with the state in device tensors
 * and the host loops as kernels (kernels/attention.cu, each a transcription of the loop it
 * replaces: compress's pooling and ape add, commit_rows and the window write, the pool and index
 * lists, index_select's scores and sort). Sizes (S, P, the entry counts) are host integers, so
 * every buffer is sized on the host and nothing waits for the device during a forward.
 *
 * Streams (SPEC §10, DESIGN.md): with 3 aux streams (and a compressor: fans_out below), phase 1
 * fans out from an event recorded on the caller's stream s: aux 0 runs the compressor's wkv/wgate,
 * its ape add and its pooling, aux 1 the indexer's weights_proj, aux 2 the indexer-compressor's
 * wkv/wgate, while s runs wq_a ‖ wkv and the q/kv norm. Phase 2 (ratio 4) waits on aux 2 for qr
 * and weights_proj and runs the whole indexer there (wq_b, RoPE, Hadamard/Q4, the indexer
 * compressor's pooling, scores and top-k), beside wq_b, the head norm and RoPE on s. s joins every
 * aux stream once, before the pool is built: the first thing on s that reads their results. (It
 * used to join them right after wq_a ‖ wkv too, so its q/kv norm waited for the compressor's wider
 * GEMV, and the indexer then queued behind the compressor on aux 0: CUPTI timeline of a decode
 * step, H200, from wq_a to the pool 64.8 -> 58.8 us in the ratio-4 layer, 43.7 -> 37.3 in the
 * ratio-128 one.) A layer without an indexer fans out to aux 0 alone. Without aux streams every
 * step runs on s in the same order, so the numbers are the same either way (no kernel depends on
 * which stream it runs on). Every tensor an aux stream touches is registered on that stream
 * (dsrt_storage_use), and every result of an aux stream on s, so that the allocator, when the
 * tensor is freed, records an event on both and never hands the block out while either may still
 * use it (runtime/alloc.c). The join is issued whether or not the phase failed, so s never runs
 * ahead of work still queued on an aux stream. */

#define DEVF(t) ((float *)(t)->storage->data + (t)->offset)

/* The aux fan-out pays for itself only when there is side work to overlap: a layer with a
 * compressor (ratio > 0). A window-only layer has none, and the fan-out would only add its event
 * records and waits (decode: +5 us a layer). At decode it once measured slower (0.681 against
 * 0.586 ms, H200) while the host was the bound (a cudaMalloc per Lua-held tensor, the token upload
 * waiting for the stream); since the GPU is (bench_dsv4, same run, fan-out at decode on / off): the
 * ratio-4 layer 0.292 / 0.312 ms, the ratio-128 layer 0.227 / 0.230. The numbers are the same
 * either way (see above). */
static int fans_out(const dsrt_attention *a) { return a->n_aux == 3 && a->cfg.ratio > 0; }

/* From this many rows (prefill) in reference precision sparse attention runs on the tensor cores
 * (bf16 q and pool); fewer rows take its split path, where the f32 pool is read as is. */
enum { MMA_MIN_ROWS = 64 };

static int use_on(dsrt_tensor *t, dsrt_stream *s) { return t ? dsrt_storage_use(t->storage, s) : 0; }

static int kernel_failed(void) { return dsrt_err("attention: %s", dsrtk_error()); }

/* y = linear(x) as a contiguous f32 tensor on x's device: for the kernels here, which take f32 */
static dsrt_tensor *dlin(dsrt_linear *l, dsrt_tensor *x, dsrt_precision prec, dsrt_stream *s)
{
    return x ? as_f32(dsrt_linear_forward(l, x, prec, s), s) : NULL;
}

/* y = linear(x) in the linear's output dtype (bf16 in reference precision), contiguous: for a next
 * op that takes bf16 as well as f32 (an nn function, a linear). The values are bf16-exact either
 * way, and those ops load either dtype into the same fp32 arithmetic, so skipping the f32
 * conversion (a launch each, ~2.5 us at decode) changes no result. */
static dsrt_tensor *dlin_any(dsrt_linear *l, dsrt_tensor *x, dsrt_precision prec, dsrt_stream *s)
{
    return x ? dsrt_linear_forward(l, x, prec, s) : NULL;
}

/* later work on `to` waits for what is queued on `from` now */
static int order(dsrt_event *ev, dsrt_stream *from, dsrt_stream *to)
{
    return dsrt_event_record(ev, from) || dsrt_stream_wait(to, ev) ? -1 : 0;
}

/* the compressor's g rows += ape[t mod r] (SPEC §6.5), on s */
static int add_ape(dsrt_attention *a, dsrt_tensor *g, dsrt_tensor *ape, int64_t P, dsrt_stream *s)
{
    if (!g || use_on(ape, s)) return -1;
    if (dsrtk_attn_ape_add(s->device, DEVF(g), DEVF(ape), g->shape[0], g->shape[1], P, a->cfg.ratio, s->handle))
        return kernel_failed();
    return 0;
}

/* a compressor's rows of x on s: c = wkv·x and g = wgate·x + ape[t mod r], f32 in fp32 math (SPEC
 * §3.5); wkv ‖ wgate in one launch at decode, as vLLM fuses them (SPEC §10) */
static int compressor_rows(dsrt_attention *a, const dsrt_compressor_weights *cw, dsrt_tensor *ape, dsrt_tensor *xf, int64_t P,
                           dsrt_stream *s, dsrt_tensor **c, dsrt_tensor **g)
{
    return dsrt_linear_forward_pair(cw->wkv, cw->wgate, xf, DSRT_PREC_FP32, s, c, g) || add_ape(a, *g, ape, P, s) ? -1 : 0;
}

/* compress() on the device: the entries j with P <= j·r + r − 1 < P + S into cs->tentries, from
 * the chunk's (c, g + ape) rows c, g [S, coff·d] and the rings. */
static int compress_dev(dsrt_attention *a, comp_state *cs, dsrt_compressor_weights *w, dsrt_tensor *c, dsrt_tensor *g,
                        int64_t P, int64_t S, int indexer, dsrt_precision prec, dsrt_stream *s)
{
    const dsrt_attn_config *cfg = &a->cfg;
    int r = cfg->ratio, d = cs->d, dev = a->device;
    int64_t j0 = P / r, n = (P + S) / r - j0;
    if (n == 0) return 0;
    dsrt_tensor *ts[] = {c, g, cs->tc, cs->tg, cs->tentries};
    for (size_t i = 0; i < sizeof ts / sizeof *ts; i++)
        if (use_on(ts[i], s)) return -1;
    dsrt_tensor *E = dsrt_tensor_new(DSRT_F32, 2, (int64_t[]){n, d}, dev, s), *dst = NULL;
    int rc = -1;
    if (!E) goto done;
    if (dsrtk_attn_compress_pool(dev, DEVF(E), DEVF(c), DEVF(g), DEVF(cs->tc), DEVF(cs->tg), cs->ring, P, S, j0, n, d, r,
                                 a->coff, prec == DSRT_PREC_REFERENCE, s->handle)) {
        kernel_failed();
        goto done;
    }
    E = norm_rope(cfg, E, DSRT_NN_NORM_RMS, w->norm, j0 * r, r, latent_post(indexer, prec), prec, s);
    if (!E || !(dst = dsrt_tensor_narrow(cs->tentries, 0, j0, n))) goto done;
    rc = dsrt_op_copy(dst, E, s);
done:
    dsrt_tensor_release(E);
    dsrt_tensor_release(dst);
    return rc;
}

/* index_select() on the device: *picks = i32 [S, topk], each query's top-k visible entries
 * (descending score, ties to the lower entry), −1 after. iq: the indexer's wq_b·qr [S, IH·ID]
 * (released); w: weights_proj's output f32 [S, IH]; ic, ig: the indexer compressor's (c, g + ape)
 * rows. */
static int index_select_dev(dsrt_attention *a, dsrt_attn_state *st, dsrt_tensor *iq, dsrt_tensor *w, dsrt_tensor *ic,
                            dsrt_tensor *ig, int64_t P, int64_t S, dsrt_stream *s, dsrt_tensor **picks)
{
    const dsrt_attn_config *c = &a->cfg;
    dsrt_precision prec = st->prec;
    int64_t IH = c->index_n_heads, ID = c->index_head_dim, topk = c->index_topk, n_max = (P + S) / c->ratio;
    int ref = prec == DSRT_PREC_REFERENCE, dev = a->device;
    dsrt_tensor *scores = NULL, *out = NULL;
    /* 1. qI = RoPE(wq_b·qr), then Hadamard + Q4 (reference only) */
    dsrt_tensor *q = indexer_q(a, iq, P, S, prec, s);
    /* 2. the indexer's keys; 3.-5. scores and the top-k, as index_select() */
    if (!q || compress_dev(a, &st->index, &a->w.index_compressor, ic, ig, P, S, 1, prec, s)) goto fail;
    if (use_on(w, s) || use_on(st->index.tentries, s)) goto fail;
    if (!(scores = dsrt_tensor_new(DSRT_F32, 2, (int64_t[]){S, n_max ? n_max : 1}, dev, s))) goto fail;
    if (!(out = dsrt_tensor_new(DSRT_I32, 2, (int64_t[]){S, topk}, dev, s))) goto fail;
    float scale = (float)(1.0 / sqrt((double)ID) / sqrt((double)IH));
    if (dsrtk_attn_index_scores(dev, DEVF(scores), DEVF(q), DEVF(st->index.tentries), DEVF(w), scale, S, P, c->ratio,
                                (int)IH, (int)ID, n_max ? n_max : 1, ref, s->handle) ||
        dsrtk_attn_topk(dev, (int *)out->storage->data + out->offset, DEVF(scores), S, P, c->ratio, topk, n_max ? n_max : 1,
                        s->handle)) {
        kernel_failed();
        goto fail;
    }
    dsrt_tensor_release(q);
    dsrt_tensor_release(scores);
    *picks = out;
    return 0;
fail:
    dsrt_tensor_release(q);
    dsrt_tensor_release(scores);
    dsrt_tensor_release(out);
    return -1;
}

/* The ring writes of a chunk's rows (the window's kv rows, the window ring first, and the
 * compressors' (c, g + ape) rows) into rings; returns their count */
static int ring_list(dsrt_attention *a, dsrt_attn_state *st, dsrt_tensor *kv, dsrt_tensor *cc, dsrt_tensor *cg,
                     dsrt_tensor *ic, dsrt_tensor *ig, dsrtk_ring_write *rings)
{
    const dsrt_attn_config *c = &a->cfg;
    int64_t hd = c->head_dim, r = c->ratio;
    int n_rings = 0;
    rings[n_rings++] = (dsrtk_ring_write){DEVF(st->twindow), DEVF(kv), st->window_rows, hd};
    if (r > 0) {
        rings[n_rings++] = (dsrtk_ring_write){DEVF(st->comp.tc), DEVF(cc), st->comp.ring, a->coff * hd};
        rings[n_rings++] = (dsrtk_ring_write){DEVF(st->comp.tg), DEVF(cg), st->comp.ring, a->coff * hd};
    }
    if (r == 4) {
        rings[n_rings++] = (dsrtk_ring_write){DEVF(st->index.tc), DEVF(ic), st->index.ring, a->coff * c->index_head_dim};
        rings[n_rings++] = (dsrtk_ring_write){DEVF(st->index.tg), DEVF(ig), st->index.ring, a->coff * c->index_head_dim};
    }
    return n_rings;
}

/* The chunk's rows into the state's rings (ring_list's), all in one launch, and the length
 * advanced (launch failures here are configuration errors the forward's checks rule out) */
static int write_rings(dsrt_attention *a, dsrt_attn_state *st, const dsrtk_ring_write *rings, int n_rings, int64_t P,
                       int64_t S, dsrt_stream *s)
{
    if (dsrtk_attn_ring_writes(a->device, rings, n_rings, P, S, s->handle)) return kernel_failed();
    st->length = P + S;
    return 0;
}

/* dsrt_attention_advance on the device: forward_cuda's steps that write the state, in its order,
 * all on s (the state's values do not depend on the stream) */
static int advance_cuda(dsrt_attention *a, dsrt_attn_state *st, dsrt_tensor *x, int64_t skip, dsrt_precision prec,
                        dsrt_stream *s)
{
    const dsrt_attn_config *c = &a->cfg;
    dsrt_attn_weights *w = &a->w;
    int64_t S = x->shape[0], P = st->length + skip, r = c->ratio;
    dsrt_tensor *xf = dsrt_tensor_contiguous(x, s), *kv = NULL, *cc = NULL, *cg = NULL, *ic = NULL, *ig = NULL;
    int rc = -1;
    if (!xf) goto done;
    if ((r > 0 && compressor_rows(a, &w->compressor, a->ape_t, xf, P, s, &cc, &cg)) ||
        (r == 4 && compressor_rows(a, &w->index_compressor, a->index_ape_t, xf, P, s, &ic, &ig)))
        goto done;
    /* the window KV as forward_cuda's fused q/kv norm computes it (the same kernel, without q) */
    kv = norm_rope(c, dlin_any(w->wkv, xf, prec, s), DSRT_NN_NORM_RMS, w->kv_norm, P, 1, latent_post(0, prec), prec, s);
    if (!kv || (r == 4 && compress_dev(a, &st->index, &w->index_compressor, ic, ig, P, S, 1, prec, s)) ||
        (r > 0 && compress_dev(a, &st->comp, &w->compressor, cc, cg, P, S, 0, prec, s)))
        goto done;
    if (use_on(st->twindow, s) || (r > 0 && (use_on(st->comp.tc, s) || use_on(st->comp.tg, s))) ||
        (r == 4 && (use_on(st->index.tc, s) || use_on(st->index.tg, s))))
        goto done;
    dsrtk_ring_write rings[DSRTK_MAX_RING_WRITES];
    const int n_rings = ring_list(a, st, kv, cc, cg, ic, ig, rings);
    rc = write_rings(a, st, rings, n_rings, P, S, s);
done:
    {
        dsrt_tensor *all[] = {xf, kv, cc, cg, ic, ig};
        for (size_t i = 0; i < sizeof all / sizeof *all; i++) dsrt_tensor_release(all[i]);
    }
    return rc;
}

static dsrt_tensor *forward_cuda(dsrt_attention *a, dsrt_attn_state *st, dsrt_tensor *x, dsrt_precision prec,
                                 dsrt_stream *s)
{
    const dsrt_attn_config *c = &a->cfg;
    dsrt_attn_weights *w = &a->w;
    int64_t S = x->shape[0], P = st->length, H = c->n_heads, hd = c->head_dim, W = c->window, r = c->ratio;
    int dev = a->device, aux = fans_out(a);
    dsrt_stream *s_comp = aux ? a->aux[0] : s, *s_wproj = aux ? a->aux[1] : s, *s_icomp = aux ? a->aux[2] : s;
    /* x as given (bf16 in reference precision): only linears read it, and they take either dtype */
    dsrt_tensor *xf = dsrt_tensor_contiguous(x, s);
    dsrt_tensor *qa = NULL, *kvp = NULL, *qr = NULL, *q = NULL, *kv = NULL, *pool = NULL, *idx = NULL, *o = NULL, *z = NULL,
                *y = NULL, *out = NULL, *picks = NULL, *wproj = NULL, *ov = NULL, *iq = NULL;
    dsrt_tensor *cc = NULL, *cg = NULL, *ic = NULL, *ig = NULL; /* the compressors' (c, g + ape) rows */
    int ok;
    if (!xf) goto done;

    /* phase 1 (SPEC §10): fan out from s. The indexer's inputs go first (the indexer compressor's
     * rows on aux 2, weights_proj on aux 1), then wq_a ‖ wkv and the q/kv norm on s, then the
     * compressor's rows and pooling on aux 0, which nothing before the pool waits for: the order
     * the host issues them in is the order their blocks take the multiprocessors, and the
     * compressor's GEMV alone fills them */
    const int n_side = !aux ? 0 : r == 4 ? 3 : 1; /* the aux streams this layer uses: aux 0 alone without an indexer */
    if (aux && dsrt_event_record(a->ev[0], s)) goto done;
    for (int i = 0; i < n_side; i++)
        if (use_on(xf, a->aux[i]) || dsrt_stream_wait(a->aux[i], a->ev[0])) goto done;
    ok = 1;
    if (r == 4)
        ok = !compressor_rows(a, &w->index_compressor, a->index_ape_t, xf, P, s_icomp, &ic, &ig) &&
             (wproj = dlin(w->index_weights_proj, xf, prec, s_wproj)) != NULL;
    if (ok) ok = !dsrt_linear_forward_pair(w->wq_a, w->wkv, xf, prec, s, &qa, &kvp); /* one launch at decode */
    /* §6.1 qr = RMS_w(wq_a·x); §6.2 window KV: RoPE(RMS_w(wkv·x)), Q8 on the no-rope dims: one
     * launch. qr feeds only linears (wq_b, the indexer's wq_b) and stays in the norm's dtype; kv
     * is read by the kernels here (gather, ring_writes) and is f32 */
    if (ok)
        ok = !dsrt_nn_q_kv_norm(qa, w->q_norm, kvp, w->kv_norm, c->norm_eps, P, 1, c->rope_theta, yarn_of(c),
                                latent_post(0, prec), prec, s, &qr, &kv);
    if (ok && r > 0)
        ok = !compressor_rows(a, &w->compressor, a->ape_t, xf, P, s_comp, &cc, &cg) &&
             !compress_dev(a, &st->comp, &w->compressor, cc, cg, P, S, 0, prec, s_comp);

    /* phase 2 (ratio 4): the indexer's wq_b on s, then the layer's own wq_b with its head norm and
     * RoPE on s, then the rest of the indexer on aux 2 (after its compressor's rows), once the
     * indexer's query (s) and weights_proj (aux 1) are there. The indexer's chain (its GEMV, the
     * query's pass, scores, top-k) is the layer's critical path: with both GEMVs on the streams at
     * once, sharing the memory, the main stream waited ~20 us for the picks (CUPTI timeline, H200,
     * Flash decode); the host issues the main stream's work first, as the chain waits for the
     * indexer's GEMV anyway. An event is recorded again only after every wait on its last record is
     * queued. */
    if (ok && r == 4) {
        ok = (iq = dlin_any(w->index_wq_b, qr, prec, s)) != NULL;
        if (ok && aux) ok = !dsrt_event_record(a->ev[0], s) && !dsrt_event_record(a->ev[2], s_wproj);
    }
    /* a reference chunk of many rows attends on the tensor cores, in bf16 (below) */
    const int attend_bf16 = prec == DSRT_PREC_REFERENCE && S >= MMA_MIN_ROWS;
    if (ok && (q = dlin_any(w->wq_b, qr, prec, s))) { /* §6.1 steps 3-4: the head norm and RoPE, one fused pass */
        dsrt_tensor *v = dsrt_tensor_view(q, 3, (int64_t[]){S, H, hd});
        dsrt_tensor_release(q);
        q = norm_rope_to(c, v, DSRT_NN_NORM_HEAD, NULL, P, 1, DSRT_NN_POST_NONE, prec, attend_bf16 ? DSRT_BF16 : DSRT_F32,
                         s);
    }
    ok = ok && q;
    if (ok && r == 4) {
        if (aux)
            ok = !use_on(iq, s_icomp) && !use_on(wproj, s_icomp) && !dsrt_stream_wait(s_icomp, a->ev[0]) &&
                 !dsrt_stream_wait(s_icomp, a->ev[2]);
        if (ok) dsrt_tensor_retain(iq); /* index_select_dev's to release; ours lives past the join */
        ok = ok && !index_select_dev(a, st, iq, wproj, ic, ig, P, S, s_icomp, &picks);
    }
    if (aux) {
        /* join even after a failure: nothing on s may run ahead of queued aux work */
        int joined = 1;
        for (int i = 0; i < n_side; i++) joined = !order(a->ev[1 + i], a->aux[i], s) && joined;
        ok = ok && joined && !use_on(cc, s) && !use_on(cg, s) && !use_on(ic, s) && !use_on(ig, s) && !use_on(picks, s);
        if (joined) { /* the join covers the aux streams' uses of s's tensors (alloc.h) */
            dsrt_storage_joined(xf->storage, s, a->aux, n_side);
            if (iq) dsrt_storage_joined(iq->storage, s, a->aux, n_side);
        }
    }
    if (!ok) goto done;

    /* §6.4/§6.7 the pool [window positions base … P+S−1, entries 0 … n_entries−1] and the index lists */
    int64_t base = P - W + 1 > 0 ? P - W + 1 : 0, n_win = P + S - base, n_entries = r > 0 ? (P + S) / r : 0;
    int64_t n_comp = r == 4 ? c->index_topk : n_entries, K = W + n_comp;
    if (use_on(st->twindow, s) || (r > 0 && (use_on(st->comp.tentries, s) || use_on(st->comp.tc, s) || use_on(st->comp.tg, s))) ||
        (r == 4 && (use_on(st->index.tc, s) || use_on(st->index.tg, s))))
        goto done;
    /* a decode step's ratio-4 pool holds its picks, not the whole compressed cache (kernels.h) */
    const int64_t pool_rows = dsrtk_attn_pool_rows(n_win, S, n_entries, r, c->index_topk);
    if (!(pool = dsrt_tensor_new(DSRT_F32, 2, (int64_t[]){pool_rows, hd}, dev, s)) ||
        !(idx = dsrt_tensor_new(DSRT_I64, 2, (int64_t[]){S, K}, dev, s)))
        goto done;
    /* the rings take the chunk's rows in the gather's launch where none of the slots written is
     * one it reads (a decode step: a launch a layer saved), else last, as on the CPU */
    dsrtk_ring_write rings[DSRTK_MAX_RING_WRITES];
    const int rings_now = st->window_rows >= W + S - 1, n_rings = ring_list(a, st, kv, cc, cg, ic, ig, rings);
    if (dsrtk_attn_gather(dev, DEVF(pool), (int64_t *)idx->storage->data + idx->offset, DEVF(kv), DEVF(st->twindow),
                          st->window_rows, r > 0 ? DEVF(st->comp.tentries) : NULL,
                          picks ? (const int *)picks->storage->data + picks->offset : NULL, base, P, S, n_entries, hd, K, W, r,
                          c->index_topk, rings_now ? rings : NULL, rings_now ? n_rings : 0, s->handle)) {
        kernel_failed();
        goto done;
    }

    /* §6.7 sparse attention with the sink; §6.8 inverse RoPE (the attention kernels rotate their
     * output as they store it), grouped wo_a, wo_b. A reference chunk of many rows hands q and the
     * pool over as bf16, which sends sparse attention to its tensor-core path
     * (kernels/sparse_attention.cu); every value is bf16-exact in reference precision, so the
     * conversion loses nothing. q comes out of its norm and RoPE as bf16 already (an f32 copy and
     * its conversion cost 0.19 ms a Flash layer at 4096 tokens); the pool, ~(S + window +
     * entries)·hd values, converts here. */
    if (attend_bf16) {
        dsrt_tensor *q16 = dsrt_tensor_to(q, dev, DSRT_BF16, s, 0), *pool16 = q16 ? dsrt_tensor_to(pool, dev, DSRT_BF16, s, 0) : NULL;
        if (pool16) o = attend(a, q16, pool16, idx, P, prec, s);
        dsrt_tensor_release(q16);
        dsrt_tensor_release(pool16);
    } else {
        o = attend(a, q, pool, idx, P, prec, s);
    }
    /* o, z and y in the ops' own dtypes (bf16 in reference precision): the next op is a linear,
     * and y is the output, bf16 in reference precision and f32 in fp32 */
    ov = o ? dsrt_tensor_view(o, 2, (int64_t[]){S, H * hd}) : NULL;
    if (!ov || !(z = dlin_any(w->wo_a, ov, prec, s)) || !(y = dlin_any(w->wo_b, z, prec, s))) goto done;
    {
        dsrt_dtype want = prec == DSRT_PREC_REFERENCE ? DSRT_BF16 : DSRT_F32;
        out = y->dtype == want ? y : dsrt_tensor_to(y, dev, want, s, 0);
    }
    if (out == y) dsrt_tensor_retain(y);
    if (!out) goto done;

    if (rings_now) {
        st->length = P + S;
    } else if (write_rings(a, st, rings, n_rings, P, S, s)) {
        dsrt_tensor_release(out);
        out = NULL;
        goto done;
    }
done:
    {
        dsrt_tensor *all[] = {cc, cg, ic, ig, xf, qa, kvp, qr, q, kv, pool, idx, o, ov, z, y, picks, wproj, iq};
        for (size_t i = 0; i < sizeof all / sizeof *all; i++) dsrt_tensor_release(all[i]);
    }
    return out;
}

#undef DEVF

/* The chunk's rows into the state's rings and the length advanced (host state) */
static void commit_cpu(dsrt_attention *a, dsrt_attn_state *st, dsrt_tensor *kv, dsrt_tensor *cc, dsrt_tensor *cg,
                       dsrt_tensor *ic, dsrt_tensor *ig, int64_t P, int64_t S)
{
    const dsrt_attn_config *c = &a->cfg;
    int64_t hd = c->head_dim;
    for (int64_t i = S > st->window_rows ? S - st->window_rows : 0; i < S; i++)
        memcpy(st->window + ((P + i) % st->window_rows) * hd, F32(kv) + i * hd, (size_t)hd * sizeof(float));
    commit_rows(&st->comp, a->coff * c->head_dim, cc, cg, P, S);
    commit_rows(&st->index, a->coff * c->index_head_dim, ic, ig, P, S);
    st->length = P + S;
}

int dsrt_attention_advance(dsrt_attention *a, dsrt_attn_state *st, dsrt_tensor *x, int64_t skip, dsrt_precision prec,
                           dsrt_stream *s)
{
    if (check_forward(a, st, x, skip, prec, s, "advance")) return -1;
    if (a->device != DSRT_CPU) return advance_cuda(a, st, x, skip, prec, s);
    const dsrt_attn_config *c = &a->cfg;
    const dsrt_attn_weights *w = &a->w;
    int64_t S = x->shape[0], P = st->length + skip, r = c->ratio;
    dsrt_tensor *xf = dsrt_linear_input(x, s), *kv = NULL, *cc = NULL, *cg = NULL, *ic = NULL, *ig = NULL;
    int rc = -1;
    if (!xf) goto done;
    const float *xp = F32(xf);
    /* dsrt_attention_forward's state steps: §6.2 the window KV, §6.5 the compressors' entries (the
     * indexer's keys, §6.6, come from its own compressor: index_select's step 2) */
    kv = norm_rope(c, project(w->wkv, xp, S, prec, s), DSRT_NN_NORM_RMS, w->kv_norm, P, 1, latent_post(0, prec), prec, s);
    if (!kv ||
        (r > 0 && compress(a, &st->comp, (dsrt_compressor_weights *)&w->compressor, a->ape, xp, P, S, 0, prec, s, &cc, &cg)) ||
        (r == 4 && compress(a, &st->index, &a->w.index_compressor, a->index_ape, xp, P, S, 1, prec, s, &ic, &ig)))
        goto done;
    commit_cpu(a, st, kv, cc, cg, ic, ig, P, S);
    rc = 0;
done:
    {
        dsrt_tensor *all[] = {xf, kv, cc, cg, ic, ig};
        for (size_t i = 0; i < sizeof all / sizeof *all; i++) dsrt_tensor_release(all[i]);
    }
    return rc;
}

dsrt_tensor *dsrt_attention_forward(dsrt_attention *a, dsrt_attn_state *st, dsrt_tensor *x, dsrt_precision prec,
                                    dsrt_stream *s)
{
    if (check_forward(a, st, x, 0, prec, s, "forward")) return NULL;
    if (a->device != DSRT_CPU) return forward_cuda(a, st, x, prec, s);
    const dsrt_attn_config *c = &a->cfg;
    const dsrt_attn_weights *w = &a->w;
    int64_t S = x->shape[0], P = st->length, H = c->n_heads, hd = c->head_dim, W = c->window, r = c->ratio;
    dsrt_tensor *xf = dsrt_linear_input(x, s);
    dsrt_tensor *qr = NULL, *q = NULL, *kv = NULL, *pool = NULL, *idx = NULL, *o = NULL, *z = NULL, *y = NULL, *out = NULL;
    dsrt_tensor *cc = NULL, *cg = NULL, *ic = NULL, *ig = NULL; /* the compressors' pending (c, g) rows */
    if (!xf) goto done;
    const float *xp = F32(xf);
    /* §6.1 query path: qr = RMS_w(wq_a·x), q = RoPE(head_norm(wq_b·qr)) */
    qr = norm_f32(project(w->wq_a, xp, S, prec, s), w->q_norm, c->norm_eps, prec, s);
    if (!qr || !(q = project(w->wq_b, F32(qr), S, prec, s))) goto done;
    {
        dsrt_tensor *v = dsrt_tensor_view(q, 3, (int64_t[]){S, H, hd});
        dsrt_tensor_release(q);
        q = norm_rope(c, v, DSRT_NN_NORM_HEAD, NULL, P, 1, DSRT_NN_POST_NONE, prec, s);
    }
    /* §6.2 window KV: RoPE(RMS_w(wkv·x)), Q8 on the no-rope dims in blocks of 64 */
    kv = norm_rope(c, project(w->wkv, xp, S, prec, s), DSRT_NN_NORM_RMS, w->kv_norm, P, 1, latent_post(0, prec), prec, s);
    if (!q || !kv) goto done;
    /* §6.5 the chunk's compressed entries */
    if (r > 0 && compress(a, &st->comp, (dsrt_compressor_weights *)&w->compressor, a->ape, xp, P, S, 0, prec, s, &cc, &cg))
        goto done;

    /* §6.4/§6.7 the pool [window positions base … P+S−1, entries 0 … n_entries−1] and the index lists */
    int64_t base = P - W + 1 > 0 ? P - W + 1 : 0, n_win = P + S - base, n_entries = r > 0 ? (P + S) / r : 0;
    int64_t n_comp = r == 4 ? c->index_topk : n_entries, K = W + n_comp;
    if (!(pool = new_f32(2, n_win + n_entries, hd, 0, s)) || !(idx = dsrt_tensor_new(DSRT_I64, 2, (int64_t[]){S, K}, DSRT_CPU, s)))
        goto done;
    float *pp = F32(pool);
    for (int64_t p = base; p < P + S; p++) {
        const float *row = p >= P ? F32(kv) + (p - P) * hd : st->window + (p % st->window_rows) * hd;
        memcpy(pp + (p - base) * hd, row, (size_t)hd * sizeof(float));
    }
    if (n_entries) memcpy(pp + n_win * hd, st->comp.entries, (size_t)(n_entries * hd) * sizeof(float));
    int64_t *ip = (int64_t *)idx->storage->data;
    for (int64_t i = 0; i < S * K; i++) ip[i] = -1;
    for (int64_t i = 0; i < S; i++) {
        int64_t t = P + i, lo = t - W + 1 > 0 ? t - W + 1 : 0;
        for (int64_t p = lo; p <= t; p++) ip[i * K + p - lo] = p - base;
        if (r > 0 && r != 4)
            for (int64_t j = 0; j < (t + 1) / r; j++) ip[i * K + W + j] = n_win + j;
    }
    if (r == 4 && index_select(a, st, F32(qr), xp, P, S, ip, K, W, n_win, s, &ic, &ig)) goto done;

    /* §6.7 sparse attention with the sink; §6.8 inverse RoPE, grouped wo_a, wo_b */
    o = as_f32(attend(a, q, pool, idx, P, prec, s), s);
    if (!o || !(z = project(w->wo_a, F32(o), S, prec, s)) || !(y = project(w->wo_b, F32(z), S, prec, s))) goto done;
    out = prec == DSRT_PREC_REFERENCE ? dsrt_tensor_to(y, DSRT_CPU, DSRT_BF16, s, 0) : y;
    if (out == y) dsrt_tensor_retain(y);
    if (!out) goto done;

    /* the rings take the chunk's rows last, once nothing can fail: nothing above read a slot this
     * chunk overwrites, and a failed forward leaves the state as it was */
    commit_cpu(a, st, kv, cc, cg, ic, ig, P, S);
done:
    dsrt_tensor_release(cc);
    dsrt_tensor_release(cg);
    dsrt_tensor_release(ic);
    dsrt_tensor_release(ig);
    dsrt_tensor_release(xf);
    dsrt_tensor_release(qr);
    dsrt_tensor_release(q);
    dsrt_tensor_release(kv);
    dsrt_tensor_release(pool);
    dsrt_tensor_release(idx);
    dsrt_tensor_release(o);
    dsrt_tensor_release(z);
    dsrt_tensor_release(y);
    return out;
}
