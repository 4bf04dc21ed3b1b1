/*
 * moe.c - the mixture-of-experts layer (moe.h): construction checks, routing, grouped experts.
 *
 * What this protects: the reference's MoE numerics (SPEC §7, summarised in moe.h), computed over
 * host buffers with the linears' own row interface (linear.h), so an expert's projections have
 * exactly the numerics of every other linear of the model. Tokens are bucketed by expert with a
 * counting sort, so each selected expert runs its three GEMMs once per call on the rows routed to
 * it, and its contributions are added to each token's fp32 accumulator in ascending expert order,
 * the order of the reference's loop, before the shared expert's.
 *
 * On CUDA the same steps run as kernels (kernels/moe.cu) over device buffers the allocator hands
 * out on the caller's stream: the router (gate logits, routing, a device counting sort into groups:
 * one kernel at decode), w1/w3 with the SwiGLU, w2, the combine. Nothing waits for the device
 * inside a decode forward; a prefill (PREFILL_ROWS tokens or more) reads the per-expert counts
 * back once to run each expert as GEMMs (cuda_prefill), and building the kernels' weight table
 * (and checking tid2eid) synchronises once on first use.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "err.h"
#include "kernels.h"
#include "moe.h"
#include "ops.h"
#include "opmath.h"

static const char *const SCORE_FUNC_NAMES[] = {"sqrtsoftplus", "sigmoid", "softmax"};

/* below this many elements a loop is not worth waking the OpenMP team for */
enum { PARALLEL_MIN = 1 << 16 };

int dsrt_score_func_from_name(const char *name, dsrt_score_func *out)
{
    for (int f = 0; f < 3; f++) {
        if (!strcmp(name, SCORE_FUNC_NAMES[f])) {
            *out = (dsrt_score_func)f;
            return 0;
        }
    }
    return dsrt_err("moe: unknown score function \"%s\" (expected sqrtsoftplus, sigmoid or softmax)", name);
}

const char *dsrt_score_func_name(dsrt_score_func f) { return SCORE_FUNC_NAMES[f]; }

/* ---- construction ---- */

static int check_projection(const dsrt_linear *l, const char *expert, const char *name, int64_t in, int64_t out)
{
    if (!l) return dsrt_err("moe: %s.%s is missing", expert, name);
    if (l->cfg.groups != 1 || l->cfg.fp32_math)
        return dsrt_err("moe: %s.%s must be a plain linear (groups 1, no fp32_math)", expert, name);
    if (l->cfg.in_features != in || l->cfg.out_features != out)
        return dsrt_err("moe: %s.%s maps %lld -> %lld features, expected %lld -> %lld", expert, name,
                        (long long)l->cfg.in_features, (long long)l->cfg.out_features, (long long)in, (long long)out);
    return 0;
}

/* w1, w3: dim -> inter, w2: inter -> dim; *inter is taken from w1 when negative, checked otherwise */
static int check_swiglu(const dsrt_swiglu *w, int64_t dim, int64_t *inter, int device, const char *expert)
{
    char dev[16], wdev[16];
    if (w->w1 && *inter < 0) *inter = w->w1->cfg.out_features;
    if (check_projection(w->w1, expert, "w1", dim, *inter) || check_projection(w->w3, expert, "w3", dim, *inter) ||
        check_projection(w->w2, expert, "w2", *inter, dim))
        return -1;
    const dsrt_linear *all[3] = {w->w1, w->w2, w->w3};
    for (int i = 0; i < 3; i++) {
        if (all[i]->weight->device != device)
            return dsrt_err("moe: %s.w%d is on %s, the gate on %s", expert, i + 1,
                            dsrt_device_str(all[i]->weight->device, wdev), dsrt_device_str(device, dev));
    }
    return 0;
}

static int check_config(const dsrt_moe_config *c)
{
    if (c->n_routed < 1 || c->n_activated < 1 || c->n_activated > c->n_routed)
        return dsrt_err("moe: %d experts per token of %d routed experts (need 1 <= per token <= routed)", c->n_activated,
                        c->n_routed);
    if ((unsigned)c->score_func > DSRT_SCORE_SOFTMAX) return dsrt_err("moe: unknown score function %d", (int)c->score_func);
    if (!isfinite(c->route_scale)) return dsrt_err("moe: route_scale %g is not finite", (double)c->route_scale);
    if (!(c->swiglu_limit >= 0) || !isfinite(c->swiglu_limit))
        return dsrt_err("moe: swiglu_limit %g must be finite and >= 0 (0: no clamp)", (double)c->swiglu_limit);
    return 0;
}

static int check_gate(const dsrt_moe_config *c, const dsrt_tensor *weight, const dsrt_tensor *bias, const dsrt_tensor *tid2eid)
{
    char tb[DSRT_SHAPE_BUF], wb[DSRT_SHAPE_BUF];
    if (!weight) return dsrt_err("moe: no gate.weight");
    dsrt_tensor_str(weight, wb, sizeof wb);
    if (weight->dtype != DSRT_BF16 || weight->ndim != 2 || weight->shape[0] != c->n_routed)
        return dsrt_err("moe: gate.weight %s, expected bf16 [%d, dim] (one row per routed expert)", wb, c->n_routed);
    if (bias && tid2eid) return dsrt_err("moe: the gate has both a bias (learned routing) and tid2eid (hash routing)");
    if (!bias && !tid2eid) return dsrt_err("moe: the gate needs a bias (learned routing) or tid2eid (hash routing)");
    if (bias) {
        dsrt_tensor_str(bias, tb, sizeof tb);
        if (bias->dtype != DSRT_F32 || bias->ndim != 1 || bias->shape[0] != c->n_routed)
            return dsrt_err("moe: gate.bias %s, expected f32 [%d]", tb, c->n_routed);
        if (bias->device != weight->device) return dsrt_err("moe: gate.bias %s is not on gate.weight's device (%s)", tb, wb);
    } else {
        dsrt_tensor_str(tid2eid, tb, sizeof tb);
        if ((tid2eid->dtype != DSRT_I32 && tid2eid->dtype != DSRT_I64) || tid2eid->ndim != 2 ||
            tid2eid->shape[1] != c->n_activated)
            return dsrt_err("moe: gate.tid2eid %s, expected i32 or i64 [vocab, %d] (experts per token)", tb, c->n_activated);
        if (tid2eid->device != weight->device)
            return dsrt_err("moe: gate.tid2eid %s is not on gate.weight's device (%s)", tb, wb);
    }
    return 0;
}

static void release_swiglu(dsrt_swiglu *w)
{
    dsrt_linear_release(w->w1);
    dsrt_linear_release(w->w2);
    dsrt_linear_release(w->w3);
}

static void retain_swiglu(dsrt_swiglu *w)
{
    dsrt_linear_retain(w->w1);
    dsrt_linear_retain(w->w2);
    dsrt_linear_retain(w->w3);
}

dsrt_moe *dsrt_moe_new(const dsrt_moe_config *cfg, dsrt_tensor *gate_weight, dsrt_tensor *bias, dsrt_tensor *tid2eid,
                       const dsrt_swiglu *experts, const dsrt_swiglu *shared, dsrt_stream *const *aux, int n_aux)
{
    char dev[16], sdev[16], name[32];
    if (check_config(cfg) || check_gate(cfg, gate_weight, bias, tid2eid)) return NULL;
    int device = gate_weight->device;
    int64_t dim = gate_weight->shape[1], inter = -1, shared_inter = -1;
    for (int e = 0; e < cfg->n_routed; e++) {
        snprintf(name, sizeof name, "experts.%d", e);
        if (check_swiglu(&experts[e], dim, &inter, device, name)) return NULL;
    }
    if (check_swiglu(shared, dim, &shared_inter, device, "shared_experts")) return NULL;
    for (int i = 0; i < n_aux; i++) {
        if (!aux[i]) return dsrt_err_null("moe: aux stream %d is missing", i + 1);
        if (aux[i]->device != device)
            return dsrt_err_null("moe: aux stream %d is on %s, the weights on %s", i + 1, dsrt_device_str(aux[i]->device, sdev),
                                 dsrt_device_str(device, dev));
    }
    dsrt_linear_config gate_cfg = {.format = DSRT_FORMAT_BF16, .in_features = dim, .out_features = cfg->n_routed,
                                   .groups = 1, .fp32_math = 1};
    dsrt_moe *m = calloc(1, sizeof *m);
    if (!m) return dsrt_err_null("moe: out of host memory");
    atomic_init(&m->refcount, 1);
    atomic_init(&m->cuda_table, NULL);
    atomic_init(&m->cuda_tensor_cores, 0);
    atomic_init(&m->cuda_stream_id, 0);
    m->cfg = *cfg;
    m->dim = dim;
    m->experts = calloc((size_t)cfg->n_routed, sizeof *m->experts);
    m->aux = calloc((size_t)(n_aux ? n_aux : 1), sizeof *m->aux);
    if (!m->experts || !m->aux) dsrt_err("moe: out of host memory");
    else m->gate = dsrt_linear_new(gate_weight, NULL, &gate_cfg);
    if (!m->gate) { /* release takes what is there: NULL pointers, no experts or streams yet */
        dsrt_moe_release(m);
        return NULL;
    }
    m->bias = bias;
    m->tid2eid = tid2eid;
    if (bias) dsrt_tensor_retain(bias);
    if (tid2eid) dsrt_tensor_retain(tid2eid);
    for (int e = 0; e < cfg->n_routed; e++) {
        m->experts[e] = experts[e];
        retain_swiglu(&m->experts[e]);
    }
    m->shared = *shared;
    retain_swiglu(&m->shared);
    for (int i = 0; i < n_aux; i++) {
        m->aux[i] = aux[i];
        dsrt_stream_retain(aux[i]);
    }
    m->n_aux = n_aux;
    return m;
}

void dsrt_moe_retain(dsrt_moe *m) { atomic_fetch_add(&m->refcount, 1); }

void dsrt_moe_release(dsrt_moe *m)
{
    if (!m || atomic_fetch_sub(&m->refcount, 1) != 1) return;
    dsrt_linear_release(m->gate);
    dsrt_tensor_release(m->bias);
    dsrt_tensor_release(m->tid2eid);
    for (int e = 0; m->experts && e < m->cfg.n_routed; e++) release_swiglu(&m->experts[e]);
    release_swiglu(&m->shared);
    for (int i = 0; i < m->n_aux; i++) dsrt_stream_release(m->aux[i]);
    dsrt_tensor_release(atomic_load(&m->cuda_table));
    free(m->aux);
    free(m->experts);
    free(m);
}

/* ---- inputs ---- */

static int check_inputs(const dsrt_moe *m, const dsrt_tensor *x, const dsrt_tensor *token_ids, const dsrt_stream *s)
{
    char xb[DSRT_SHAPE_BUF], ib[DSRT_SHAPE_BUF], dev[16];
    int device = m->gate->weight->device;
    if (x->dtype != DSRT_BF16 && x->dtype != DSRT_F32) return dsrt_err("moe: input %s must be bf16 or f32",
                                                                       dsrt_tensor_str(x, xb, sizeof xb));
    if (x->ndim < 1 || x->shape[x->ndim - 1] != m->dim)
        return dsrt_err("moe: input %s must end in the layer's %lld input features",
                        dsrt_tensor_str(x, xb, sizeof xb), (long long)m->dim);
    if (x->device != device || s->device != device)
        return dsrt_err("moe: input %s, the weights (on %s) and the stream must be on one device",
                        dsrt_tensor_str(x, xb, sizeof xb),
                        dsrt_device_str(device, dev));
    if (!token_ids) {
        if (m->tid2eid) return dsrt_err("moe: hash routing (tid2eid) needs the token ids");
        return 0;
    }
    if (token_ids->dtype != DSRT_I32 && token_ids->dtype != DSRT_I64)
        return dsrt_err("moe: token ids %s must be i32 or i64", dsrt_tensor_str(token_ids, ib, sizeof ib));
    int same_shape = token_ids->ndim == x->ndim - 1;
    for (int d = 0; same_shape && d < token_ids->ndim; d++) same_shape = token_ids->shape[d] == x->shape[d];
    if (!same_shape) return dsrt_err("moe: token ids %s must have the leading shape of the input %s",
                                     dsrt_tensor_str(token_ids, ib, sizeof ib), dsrt_tensor_str(x, xb, sizeof xb));
    if (token_ids->device != x->device) return dsrt_err("moe: token ids %s and input %s are on different devices",
                                                        dsrt_tensor_str(token_ids, ib, sizeof ib),
                                                        dsrt_tensor_str(x, xb, sizeof xb));
    return 0;
}

/* ---- routing (SPEC §7.1) ---- */

/* in place: logits -> scores, one row of n_routed */
static void score_row(dsrt_score_func f, float *row, int n)
{
    if (f == DSRT_SCORE_SOFTMAX) {
        float max = row[0], sum = 0;
        for (int e = 1; e < n; e++) max = row[e] > max ? row[e] : max;
        for (int e = 0; e < n; e++) sum += row[e] = expf(row[e] - max);
        for (int e = 0; e < n; e++) row[e] /= sum;
        return;
    }
    for (int e = 0; e < n; e++) {
        float l = row[e];
        if (f == DSRT_SCORE_SIGMOID) row[e] = dsrt_unary_f32(DSRT_OP_SIGMOID, l);
        else row[e] = sqrtf(l > 20.0f ? l : log1pf(expf(l))); /* softplus with torch's threshold 20 */
    }
}

/* The top k of score + bias, in descending order, ties to the lower expert id. A NaN key counts as
 * +inf (torch's topk ranks NaN highest), which keeps the order total: k distinct valid ids always. */
static void select_top(const float *score, const dsrt_tensor *bias, int n, int k, int64_t *ids)
{
    float prev_key = 0;
    int prev = -1;
    for (int j = 0; j < k; j++) {
        int best = -1;
        float best_key = 0;
        for (int e = 0; e < n; e++) {
            float key = score[e];
            if (bias) key += dsrt_load_f32(bias->storage->data, DSRT_F32, bias->offset + e * bias->stride[0]);
            if (key != key) key = INFINITY;
            int after_prev = prev < 0 || key < prev_key || (key == prev_key && e > prev);
            if (after_prev && (best < 0 || key > best_key)) best = e, best_key = key;
        }
        ids[j] = best;
        prev = best, prev_key = best_key;
    }
}

/* expert ids and weights of `rows` rows of x (f32 [rows, dim]) into ids/weights [rows, k] */
static int route_rows(dsrt_moe *m, const float *x, int64_t rows, const dsrt_tensor *token_ids, int64_t *ids, float *weights,
                      dsrt_stream *s)
{
    const dsrt_moe_config *c = &m->cfg;
    int n = c->n_routed, k = c->n_activated;
    if (m->tid2eid) { /* hash routing: tid2eid[token] (SPEC §7.1) */
        const dsrt_tensor *t = m->tid2eid;
        dsrt_view iv = dsrt_tensor_desc(token_ids);
        for (int64_t r = 0; r < rows; r++) {
            int64_t token = dsrt_load_i64(token_ids->storage->data, token_ids->dtype, dsrt_view_index(&iv, r));
            if (token < 0 || token >= t->shape[0])
                return dsrt_err("moe: token id %lld at position %lld is outside the vocabulary [0, %lld)", (long long)token,
                                (long long)r, (long long)t->shape[0]);
            for (int j = 0; j < k; j++) {
                int64_t e = dsrt_load_i64(t->storage->data, t->dtype, t->offset + token * t->stride[0] + j * t->stride[1]);
                if (e < 0 || e >= n)
                    return dsrt_err("moe: tid2eid[%lld] holds expert id %lld, outside [0, %d)", (long long)token, (long long)e, n);
                ids[r * k + j] = e;
            }
        }
    }
    int64_t shape[2] = {rows, n};
    dsrt_tensor *logits = dsrt_tensor_new(DSRT_F32, 2, shape, DSRT_CPU, s);
    if (!logits) return -1;
    float *score = (float *)logits->storage->data;
    /* fp32_math: fp32(x)·fp32(W)ᵀ in either precision */
    if (dsrt_linear_rows(m->gate, x, rows, score, DSRT_PREC_FP32, s)) {
        dsrt_tensor_release(logits);
        return -1;
    }
#pragma omp parallel for if (rows * n > PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        float *row = score + r * n, *w = weights + r * k;
        int64_t *sel = ids + r * k;
        score_row(c->score_func, row, n);
        if (!m->tid2eid) select_top(row, m->bias, n, k, sel);
        float sum = 0;
        for (int j = 0; j < k; j++) sum += w[j] = row[sel[j]];
        for (int j = 0; j < k; j++) {
            if (c->norm_topk_prob) w[j] /= sum;
            w[j] *= c->route_scale;
        }
    }
    dsrt_tensor_release(logits);
    return 0;
}

/* ---- CUDA (kernels/moe.cu) ---- */

/* the launcher's message, led by "moe:" once */
static int kernel_failed(void)
{
    const char *msg = dsrtk_error();
    return strncmp(msg, "moe:", 4) ? dsrt_err("moe: %s", msg) : dsrt_err("%s", msg);
}

static int fill_matrix(dsrtk_moe_matrix *d, const dsrt_linear *l, const char *what, int set, int slot)
{
    const dsrt_tensor *w = l->weight, *sc = l->scale;
    const dsrt_linear_config *c = &l->cfg;
    if (c->out_features > INT32_MAX || c->block_rows > INT32_MAX || c->block_cols > INT32_MAX)
        return dsrt_err("moe: %s %d w%d: %lld output features or its scale blocks are too large for the CUDA kernels", what,
                        set, slot + 1, (long long)c->out_features);
    memset(d, 0, sizeof *d);
    d->weight = w->storage->data;
    d->offset = w->offset;
    d->stride0 = w->stride[0];
    d->stride1 = w->stride[1];
    d->dtype = w->dtype;
    d->rows = (int32_t)c->out_features;
    d->cols = (int32_t)c->in_features;
    d->block_rows = d->block_cols = 1;
    if (sc) {
        d->scale = sc->storage->data;
        d->scale_offset = sc->offset;
        d->scale_stride0 = sc->stride[0];
        d->scale_stride1 = sc->stride[1];
        d->scale_dtype = sc->dtype;
        d->block_rows = (int32_t)c->block_rows;
        d->block_cols = (int32_t)c->block_cols;
    }
    /* 32-column chunks as 16-byte loads: one scale per chunk, rows starting on 16 bytes */
    int64_t bits = dsrt_dtype_bits(w->dtype);
    d->vector = w->stride[1] == 1 && d->cols % 32 == 0 && (!sc || (d->block_cols >= 32 && d->block_cols % 32 == 0)) &&
                (w->offset * bits) % 128 == 0 &&
                (w->stride[0] * bits) % 128 == 0 && (uintptr_t)w->storage->data % 16 == 0;
    int fp8 = w->dtype == DSRT_F8E4M3 && d->block_cols % 64 == 0 && ((d->block_cols / 64) & (d->block_cols / 64 - 1)) == 0;
    int fp4 = w->dtype == DSRT_FP4E2M1 && sc && sc->dtype == DSRT_F8E8M0 && d->block_cols == 32 && sc->stride[1] == 1 &&
              sc->offset % 2 == 0 && sc->stride[0] % 2 == 0 && (uintptr_t)sc->storage->data % 2 == 0;
    d->mma = d->vector && sc && d->cols % 64 == 0 && (fp8 || fp4);
    int64_t scale_at = sc ? (int64_t)((uintptr_t)sc->storage->data % 4) + sc->offset * dsrt_dtype_bits(sc->dtype) / 8 : 0;
    d->wgmma = d->mma && d->cols % 256 == 0 && d->cols <= 16384 && d->rows % 64 == 0 &&
               (fp4 ? d->block_rows == 1 && scale_at % 4 == 0 && sc->stride[0] % 4 == 0
                    : d->block_cols % 128 == 0 && d->block_rows % 16 == 0);
    return 0;
}

/* hash routing reads tid2eid on the device unchecked: every id is checked here, once */
static int check_tid2eid(dsrt_moe *m, dsrt_stream *s)
{
    dsrt_tensor *t = dsrt_tensor_to(m->tid2eid, DSRT_CPU, m->tid2eid->dtype, s, 0);
    if (!t) return -1;
    int rc = 0;
    for (int64_t r = 0; r < t->shape[0] && !rc; r++) {
        for (int64_t j = 0; j < t->shape[1] && !rc; j++) {
            int64_t e = dsrt_load_i64(t->storage->data, t->dtype, t->offset + r * t->stride[0] + j * t->stride[1]);
            if (e < 0 || e >= m->cfg.n_routed)
                rc = dsrt_err("moe: tid2eid[%lld] holds expert id %lld, outside [0, %d)", (long long)r, (long long)e,
                              m->cfg.n_routed);
        }
    }
    dsrt_tensor_release(t);
    return rc;
}

/* The kernels' matrix table (kernels.h), built and uploaded once per layer; a racing builder's
 * copy is dropped. */
static const dsrtk_moe_matrix *cuda_table(dsrt_moe *m, dsrt_stream *s)
{
    dsrt_tensor *t = atomic_load(&m->cuda_table);
    if (t) return (const dsrtk_moe_matrix *)t->storage->data;
    int n = m->cfg.n_routed;
    if (m->tid2eid && check_tid2eid(m, s)) return NULL;
    int64_t count = 3 * ((int64_t)n + 2), bytes = count * (int64_t)sizeof(dsrtk_moe_matrix);
    dsrtk_moe_matrix *host = calloc((size_t)count, sizeof *host);
    if (!host) return dsrt_err_null("moe: out of host memory");
    int rc = 0, tensor_cores = DSRTK_MOE_WGMMA; /* lowered by any expert off the tiles */
    for (int e = 0; e <= n && !rc; e++) {
        const dsrt_swiglu *w = e < n ? &m->experts[e] : &m->shared;
        const char *what = e < n ? "expert" : "shared expert";
        rc = fill_matrix(&host[3 * e], w->w1, what, e, 0) || fill_matrix(&host[3 * e + 1], w->w2, what, e, 1) ||
             fill_matrix(&host[3 * e + 2], w->w3, what, e, 2);
        if (!rc) { /* the table's tile: the one every expert's three matrices fit */
            int mma = host[3 * e].mma && host[3 * e + 1].mma && host[3 * e + 2].mma;
            int wgmma = host[3 * e].wgmma && host[3 * e + 1].wgmma && host[3 * e + 2].wgmma;
            int tile = wgmma ? DSRTK_MOE_WGMMA : mma ? DSRTK_MOE_MMA : 0;
            if (tile < tensor_cores) tensor_cores = tile;
        }
        /* w1 and w3 read one staged input: both take it as given (bf16) or both Q8 round-tripped */
        if (!rc && (w->w1->cfg.format == DSRT_FORMAT_BF16) != (w->w3->cfg.format == DSRT_FORMAT_BF16))
            rc = dsrt_err("moe: %s %d: w1 is %s and w3 %s; on CUDA both must be bf16 or both quantised", what, e,
                          dsrt_weight_format_name(w->w1->cfg.format), dsrt_weight_format_name(w->w3->cfg.format));
    }
    for (int slot = 0; slot < 3 && !rc; slot++) rc = fill_matrix(&host[3 * (n + 1) + slot], m->gate, "gate", n + 1, 0);
    dsrt_tensor *table = rc ? NULL : dsrt_tensor_new(DSRT_U8, 1, &bytes, s->device, s);
    if (table && dsrtk_memcpy(s->device, table->storage->data, host, (size_t)bytes, DSRTK_H2D, s->handle, 0)) {
        kernel_failed();
        dsrt_tensor_release(table);
        table = NULL;
    }
    free(host);
    if (!table) return NULL;
    atomic_store(&m->cuda_tensor_cores, tensor_cores); /* a racing builder stores the same */
    if (!atomic_compare_exchange_strong(&m->cuda_table, &t, table)) {
        dsrt_tensor_release(table);
        table = t;
    }
    return (const dsrtk_moe_matrix *)table->storage->data;
}

static int use_linear(dsrt_linear *l, dsrt_stream *s)
{
    return dsrt_storage_use(l->weight->storage, s) || (l->scale && dsrt_storage_use(l->scale->storage, s));
}

/* Marks every weight as in use on s, so that freeing them waits for the kernels queued there */
static int mark_weights(dsrt_moe *m, dsrt_stream *s)
{
    int rc = use_linear(m->gate, s) || (m->bias && dsrt_storage_use(m->bias->storage, s)) ||
             (m->tid2eid && dsrt_storage_use(m->tid2eid->storage, s)) ||
             dsrt_storage_use(atomic_load(&m->cuda_table)->storage, s);
    for (int e = 0; e <= m->cfg.n_routed && !rc; e++) {
        const dsrt_swiglu *w = e < m->cfg.n_routed ? &m->experts[e] : &m->shared;
        rc = use_linear(w->w1, s) || use_linear(w->w2, s) || use_linear(w->w3, s);
    }
    return rc;
}

/* mark_weights, only when s differs from the last stream this was done for (a decode step's cost) */
static int use_weights(dsrt_moe *m, dsrt_stream *s)
{
    if (atomic_load(&m->cuda_stream_id) == s->id) return 0;
    int rc = mark_weights(m, s);
    if (!rc) atomic_store(&m->cuda_stream_id, s->id);
    return rc;
}

static float *f32_data(dsrt_tensor *t) { return (float *)t->storage->data + t->offset; }
static void *x_data(dsrt_tensor *t) { return (char *)t->storage->data + t->offset * dsrt_dtype_bits(t->dtype) / 8; }
static int32_t *i32_data(dsrt_tensor *t) { return (int32_t *)t->storage->data + t->offset; }

static dsrt_tensor *device_buffer(dsrt_dtype dtype, int64_t n, dsrt_stream *s)
{
    return dsrt_tensor_new(dtype, 1, &n, s->device, s);
}

/* Where the router groups the picks (kernels.h dsrtk_moe_router_args) */
typedef struct {
    int32_t *groups, *n_groups, *row_token, *pos_of_pick;
    float *row_weight;
} cuda_groups;

/* The router's arguments over the rows of xf (f32 or bf16 contiguous [rows, dim] on the device):
 * ids i64 and weights f32 out (contiguous, rows·k each) and, when g is not NULL, the grouping; the
 * logits scratch is the caller's to give. */
static int router_args(dsrt_moe *m, const dsrtk_moe_matrix *table, dsrt_tensor *xf, int64_t rows, dsrt_tensor *token_ids,
                       int64_t *ids, float *weights, const cuda_groups *g, dsrtk_moe_router_args *r)
{
    const dsrt_moe_config *c = &m->cfg;
    *r = (dsrtk_moe_router_args){.table = table, .x = x_data(xf), .x_dtype = xf->dtype, .x_ld = m->dim};
    /* the gate's matrix by value: the kernel starts its weight loads without reading the table first */
    if (fill_matrix(&r->gate, m->gate, "gate", c->n_routed + 1, 0)) return -1;
    r->route = (dsrtk_moe_route_args){.rows = rows, .n_routed = c->n_routed, .k = c->n_activated,
                                      .score_func = (int32_t)c->score_func, .norm_topk_prob = c->norm_topk_prob,
                                      .route_scale = c->route_scale, .hash = m->tid2eid != NULL, .ids = ids, .weights = weights};
    if (m->tid2eid) {
        r->route.tid2eid = dsrt_tensor_desc(m->tid2eid);
        r->route.token_ids = dsrt_tensor_desc(token_ids);
    } else {
        r->route.bias = dsrt_tensor_desc(m->bias);
    }
    if (g) {
        r->groups = g->groups, r->n_groups = g->n_groups, r->row_token = g->row_token, r->pos_of_pick = g->pos_of_pick;
        r->row_weight = g->row_weight;
    }
    return 0;
}

/* The router over the arguments router_args built, with its logits scratch */
static int cuda_route_rows(dsrt_moe *m, dsrtk_moe_router_args *r, dsrt_stream *s)
{
    dsrt_tensor *logits = device_buffer(DSRT_F32, r->route.rows * m->cfg.n_routed, s);
    if (!logits) return -1;
    r->route.logits = f32_data(logits);
    int rc = dsrtk_moe_router(s->device, r, s->handle) ? kernel_failed() : 0;
    dsrt_tensor_release(logits);
    return rc;
}

/* x as the contiguous rows (bf16 or f32, read as they are) the kernels read, the table, and the
 * weights marked in use */
static dsrt_tensor *cuda_prepare(dsrt_moe *m, dsrt_tensor *x, dsrt_tensor *token_ids, dsrt_stream *s,
                                 const dsrtk_moe_matrix **table)
{
    if (dsrt_device_check(s->device)) return NULL;
    if (dsrt_tensor_numel(x) / m->dim > INT32_MAX / (m->cfg.n_activated + 1))
        return dsrt_err_null("moe: %lld tokens are too many for one CUDA forward", (long long)(dsrt_tensor_numel(x) / m->dim));
    *table = cuda_table(m, s);
    if (!*table || use_weights(m, s) || dsrt_storage_use(x->storage, s) ||
        (token_ids && dsrt_storage_use(token_ids->storage, s)))
        return NULL;
    return x->dtype == DSRT_F32 || x->dtype == DSRT_BF16 ? dsrt_tensor_contiguous(x, s) : dsrt_tensor_to(x, x->device, DSRT_F32, s, 0);
}

static int cuda_route(dsrt_moe *m, dsrt_tensor *x, dsrt_tensor *token_ids, dsrt_stream *s, dsrt_tensor *ids, dsrt_tensor *w)
{
    const dsrtk_moe_matrix *table;
    int64_t rows = dsrt_tensor_numel(x) / m->dim;
    dsrt_tensor *xf = cuda_prepare(m, x, token_ids, s, &table);
    if (!xf) return -1;
    dsrtk_moe_router_args r;
    int rc = 0;
    if (rows && (router_args(m, table, xf, rows, token_ids, (int64_t *)ids->storage->data, f32_data(w), NULL, &r) ||
                 cuda_route_rows(m, &r, s)))
        rc = -1;
    dsrt_tensor_release(xf);
    return rc;
}

/* From this many tokens on, the experts run as tensor-core GEMMs on transient dequantised copies
 * (about 8 rows per expert at Flash's 6 of 256: there dequantising an expert costs less than the
 * decode kernel's passes over its rows). */
enum { PREFILL_ROWS = 256 };

/* Can prefill run? fp32: always (f32 GEMMs on exact f32 copies). Reference: every matrix FP4/FP8
 * with power-of-two (e8m0) scales, so the copies and the Q8'd inputs are exact in bf16. */
static int prefill_ok(const dsrt_moe *m, int reference)
{
    if (!reference) return 1;
    for (int e = 0; e <= m->cfg.n_routed; e++) {
        const dsrt_swiglu *w = e < m->cfg.n_routed ? &m->experts[e] : &m->shared;
        const dsrt_linear *all[3] = {w->w1, w->w2, w->w3};
        for (int i = 0; i < 3; i++)
            if (all[i]->cfg.format == DSRT_FORMAT_BF16 || !all[i]->scale || all[i]->scale->dtype != DSRT_F8E8M0) return 0;
    }
    return 1;
}

/* Prefill's experts run in slabs of DSRTK_MOE_SLAB groups (one dequantisation launch and one grouped
 * GEMM a slab: per-expert calls, five a group, left the GPU waiting on the host) on lanes: the
 * caller's stream and an aux stream, slab j on lane j mod lanes with the lane's own scratch, so
 * one slab's dequantisation runs beside the other's GEMMs. Forking and joining the lanes costs one
 * event per lane. Scratch: one slab of [w1; w3] per lane (Flash: 8 x 32 MiB in bf16, twice). */
enum { MAX_LANES = 2 };
typedef struct {
    int n, forked;
    dsrt_stream *stream[MAX_LANES];
    dsrt_event *done[MAX_LANES]; /* done[0]: the fork, recorded on the caller's stream */
} lanes;

static void lanes_free(lanes *l)
{
    for (int i = 0; i < MAX_LANES; i++) dsrt_event_release(l->done[i]);
}

/* the caller's stream s and up to MAX_LANES - 1 aux streams; the tensors ts used on all of them */
static int lanes_open(lanes *l, dsrt_moe *m, dsrt_stream *s, dsrt_tensor *const *ts, int nts)
{
    memset(l, 0, sizeof *l);
    l->stream[l->n++] = s;
    for (int i = 0; i < m->n_aux && l->n < MAX_LANES; i++) l->stream[l->n++] = m->aux[i];
    for (int i = 0; i < l->n; i++)
        if (!(l->done[i] = dsrt_event_new(s->device, 0))) return -1;
    for (int i = 1; i < l->n; i++) {
        if (mark_weights(m, l->stream[i])) return -1;
        for (int t = 0; t < nts; t++)
            if (dsrt_storage_use(ts[t]->storage, l->stream[i])) return -1;
    }
    return 0;
}

/* later work on every lane waits for what is queued on the caller's stream */
static int lanes_fork(lanes *l)
{
    if (l->n > 1 && dsrt_event_record(l->done[0], l->stream[0])) return -1;
    l->forked = 1;
    for (int i = 1; i < l->n; i++)
        if (dsrt_stream_wait(l->stream[i], l->done[0])) return -1;
    return 0;
}

/* later work on the caller's stream waits for every lane; called after any failure too, so that
 * nothing on the caller's stream runs ahead of queued lane work */
static int lanes_join(lanes *l)
{
    int rc = 0;
    if (!l->forked) return 0;
    l->forked = 0;
    for (int i = 1; i < l->n; i++)
        if (dsrt_event_record(l->done[i], l->stream[i]) || dsrt_stream_wait(l->stream[0], l->done[i])) rc = -1;
    return rc;
}

/* What a prefill phase multiplies: UP gu = xg·[w1; w3]ᵀ, DOWN yr = h·w2ᵀ, each group's rows with
 * its set's matrices */
typedef struct {
    int mode;
    dsrt_tensor *in, *out;  /* rows of the groups, in_ld and out_ld elements apart */
    int64_t in_ld, out_ld;
    int64_t stride;         /* elements between a slab's dequantised matrices */
} phase;

/* One phase over the groups (host: the groups' {set, first row, rows}), slab by slab on the lanes */
static int prefill_phase(dsrt_moe *m, const dsrtk_moe_matrix *table, int32_t *groups_dev, const int32_t *host,
                         int32_t n_groups, const phase *ph, lanes *l, dsrt_tensor *const *scratch, dsrt_tensor *ptrs,
                         dsrt_dtype io)
{
    int n = m->cfg.n_routed, dev = l->stream[0]->device;
    size_t es = (size_t)dsrt_dtype_bits(io) / 8;
    for (int32_t g0 = 0, slab = 0; g0 < n_groups; g0 += DSRTK_MOE_SLAB, slab++) {
        int g1 = g0 + DSRTK_MOE_SLAB < n_groups ? g0 + DSRTK_MOE_SLAB : n_groups, lane = slab % l->n;
        void *ls = l->stream[lane]->handle;
        char *w = x_data(scratch[lane]);
        int rows[DSRTK_MOE_SLAB], outs[DSRTK_MOE_SLAB], depth[DSRTK_MOE_SLAB];
        const void *a[DSRTK_MOE_SLAB], *wp[DSRTK_MOE_SLAB];
        void *c[DSRTK_MOE_SLAB];
        int64_t max_units = 1;
        for (int i = 0; i < g1 - g0; i++) {
            const int32_t *g = host + 3 * (g0 + i);
            int64_t inter = (g[0] < n ? m->experts[g[0]].w1 : m->shared.w1)->cfg.out_features;
            /* UP: [2·inter, dim] over dim-wide rows; DOWN: [dim, inter] over inter-wide rows */
            int64_t w_rows = ph->mode == DSRTK_MOE_UP ? 2 * inter : m->dim, w_cols = ph->mode == DSRTK_MOE_UP ? m->dim : inter;
            int64_t units = w_rows * ((w_cols + 31) / 32);
            if (units > max_units) max_units = units;
            rows[i] = g[2], outs[i] = (int)w_rows, depth[i] = (int)w_cols;
            a[i] = (char *)x_data(ph->in) + (size_t)(g[1] * ph->in_ld) * es;
            wp[i] = w + (size_t)(i * ph->stride) * es;
            c[i] = (char *)x_data(ph->out) + (size_t)(g[1] * ph->out_ld) * es;
        }
        if (dsrtk_moe_dequant_groups(dev, table, groups_dev, g0, g1, ph->mode, max_units, ph->stride, w, io, ls) ||
            dsrtk_moe_gemm_groups(dev, io, g1 - g0, rows, outs, depth, a, (int)ph->in_ld, wp, c, io, (int)ph->out_ld,
                                  (void **)x_data(ptrs) + 3 * DSRTK_MOE_SLAB * lane, ls))
            return kernel_failed();
    }
    return 0;
}

/* The direct path's tiles: {group, first row, rows} triples, a group's rows cut into the fewest
 * tiles of up to DSRTK_MOE_TILE_ROWS, of even size (the kernel's width is a tile's rows rounded up
 * to 32: 130 rows make two tiles of 65, not 128 and 2), uploaded to tiles (device i32, room for
 * rows / DSRTK_MOE_TILE_ROWS + n_groups triples) */
static int upload_tiles(const int32_t *host, int32_t n_groups, dsrt_tensor *tiles, int64_t *n_tiles, dsrt_stream *s)
{
    int64_t n = 0, cap = tiles->shape[0] / 3;
    for (int32_t g = 0; g < n_groups; g++) n += (host[3 * g + 2] + DSRTK_MOE_TILE_ROWS - 1) / DSRTK_MOE_TILE_ROWS;
    if (n > cap) return dsrt_err("moe: %lld prefill tiles for room of %lld", (long long)n, (long long)cap);
    int32_t *list = malloc((size_t)(3 * n + 1) * sizeof *list);
    if (!list) return dsrt_err("moe: out of host memory");
    int64_t i = 0;
    for (int32_t g = 0; g < n_groups; g++) {
        int32_t count = host[3 * g + 2], parts = (count + DSRTK_MOE_TILE_ROWS - 1) / DSRTK_MOE_TILE_ROWS;
        int32_t size = parts ? (count + parts - 1) / parts : 0;
        for (int32_t r = 0; r < count; r += size, i++)
            list[3 * i] = g, list[3 * i + 1] = r, list[3 * i + 2] = count - r < size ? count - r : size;
    }
    int rc = dsrtk_memcpy(s->device, tiles->storage->data, list, (size_t)(3 * i) * sizeof *list, DSRTK_H2D, s->handle, 0)
                 ? kernel_failed()
                 : 0;
    free(list);
    *n_tiles = i;
    return rc;
}

/* A direct prefill's shared expert goes through the FP8 linear (cuBLASLt block scaling) where its
 * matrices are FP8: its rows are every token, dense GEMMs, which the expert GEMM (built for the
 * routed experts' few rows each, its FP8 bytes widened through a table) ran at a fraction of that
 * rate. The rounding points stay the reference's: Q8 inputs (the linear's Q8 of a Q8'd row gives
 * back its values), fp32 sums rounded once to bf16. */
static int shared_by_linear(const dsrt_moe *m)
{
    const dsrt_linear *all[3] = {m->shared.w1, m->shared.w2, m->shared.w3};
    for (int i = 0; i < 3; i++)
        if (all[i]->cfg.format != DSRT_FORMAT_FP8 || all[i]->cfg.groups != 1) return 0;
    return 1;
}

/* rows [first, first + n) x columns [c0, c0 + width) of a buffer read as rows of ld elements */
static dsrt_tensor *block_of(dsrt_tensor *buf, int64_t ld, int64_t first, int64_t n, int64_t c0, int64_t width)
{
    dsrt_tensor *v = dsrt_tensor_view(buf, 2, (int64_t[]){dsrt_tensor_numel(buf) / ld, ld});
    dsrt_tensor *r = v ? dsrt_tensor_narrow(v, 0, first, n) : NULL;
    dsrt_tensor *b = r ? dsrt_tensor_narrow(r, 1, c0, width) : NULL;
    dsrt_tensor_release(v);
    dsrt_tensor_release(r);
    return b;
}

/* The shared expert's UP: sgu's first rows rows = x·w1ᵀ, the next rows rows = x·w3ᵀ (its own
 * inter wide; dsrtk_moe_swiglu's shared_gu), x the tokens' Q8'd rows. The FP8 linear writes them
 * in place: copied into gu's rows they cost two strided passes of 16 MB a Flash layer (49 us each,
 * H200); as a pair, x's Q8 pass serves both. */
static int shared_up(dsrt_moe *m, dsrt_tensor *xg, int64_t rows, dsrt_tensor *sgu, dsrt_stream *s)
{
    int64_t dim = m->dim, inter = m->shared.w1->cfg.out_features;
    dsrt_tensor *x = block_of(xg, dim, 0, rows, 0, dim), *g = block_of(sgu, inter, 0, rows, 0, inter);
    dsrt_tensor *u = block_of(sgu, inter, rows, rows, 0, inter);
    int rc = x && g && u && !dsrt_linear_forward_pair_into(m->shared.w1, m->shared.w3, x, g, u, DSRT_PREC_REFERENCE, s) ? 0 : -1;
    dsrt_tensor *all[] = {x, g, u};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) dsrt_tensor_release(all[i]);
    return rc;
}

/* The shared expert's DOWN: yr rows [picks, picks + rows) = h·w2ᵀ */
static int shared_down(dsrt_moe *m, dsrt_tensor *h, int64_t rows, int64_t picks, int64_t width, dsrt_tensor *yr, dsrt_stream *s)
{
    dsrt_tensor *x = block_of(h, width, picks, rows, 0, m->shared.w2->cfg.in_features);
    dsrt_tensor *y = x ? block_of(yr, m->dim, picks, rows, 0, m->dim) : NULL;
    int rc = y && !dsrt_linear_forward_into(m->shared.w2, x, y, DSRT_PREC_REFERENCE, s) ? 0 : -1;
    dsrt_tensor_release(x);
    dsrt_tensor_release(y);
    return rc;
}

/* Prefill's experts, after the grouping: x gathered (Q8'd), the shared expert's UP started (the
 * direct path), the groups read back once; the UP phase into gu; the SwiGLU; the DOWN phase into
 * yr; the combine. Reference runs in bf16 (exact inputs, fp32 accumulation, bf16 outputs = the
 * reference's roundings), fp32 in f32.
 * Reference precision with every matrix `mma` (FP4/FP8 the tensor-core tile reads) multiplies
 * straight from the packed weights (dsrtk_moe_prefill_gemm), UP reading the tokens' Q8'd rows in
 * place through row_token (a token's Q8 is the same for each of its experts: no gathered copy,
 * 0.38 ms a Flash layer at 4096 tokens), and an FP8 shared expert takes the FP8 linear
 * (shared_by_linear: Flash prefill 41.5-42.2 -> 40.1 ms, H200); the rest goes through the slabs. */
static int cuda_prefill(dsrt_moe *m, const dsrtk_moe_matrix *table, dsrt_tensor *xf, int64_t rows, int reference,
                        int32_t *groups_dev, int32_t max_groups, const int32_t *row_token, const int32_t *pos_of_pick,
                        const float *row_weight, dsrt_stream *s, dsrt_tensor *y)
{
    int k = m->cfg.n_activated, dev = s->device, direct = reference && atomic_load(&m->cuda_tensor_cores);
    void *st = s->handle;
    int64_t dim = m->dim, picks = rows * k, all = picks + rows;
    int64_t inter = m->experts[0].w1->cfg.out_features, shared_inter = m->shared.w1->cfg.out_features;
    int64_t width = inter > shared_inter ? inter : shared_inter;
    dsrt_dtype io = reference ? DSRT_BF16 : DSRT_F32;
    int32_t *host = malloc((size_t)(3 * max_groups + 1) * sizeof *host);
    if (!host) return dsrt_err("moe: out of host memory");
    lanes l = {0};
    /* bufs: xg (the direct path: x's rows Q8'd, by token), gu, h, yr; the direct path's tiles and,
     * where the shared expert takes the FP8 linear, its g and u (sgu, in the first scratch slot,
     * which the direct path does not use), or the lanes' grouped-GEMM pointers (i64 holds a
     * pointer) and one scratch per lane */
    enum { XG, GU, H, YR, PTRS, SCRATCH, TILES = PTRS, SGU };
    const int shared_lt = direct && shared_by_linear(m);
    int nlanes = 1 + m->n_aux < MAX_LANES ? 1 + m->n_aux : MAX_LANES, rc = 0;
    int nbufs = direct ? (shared_lt ? SGU : TILES) + 1 : SCRATCH + nlanes;
    int64_t slab = DSRTK_MOE_SLAB * 2 * width * dim, n_tiles = 0;
    int64_t x_rows = direct ? rows : all;
    int64_t lens[SCRATCH + MAX_LANES] = {x_rows * dim, all * 2 * width, all * width, all * dim,
                                         direct ? 3 * (all / DSRTK_MOE_TILE_ROWS + max_groups) : 3 * DSRTK_MOE_SLAB * MAX_LANES,
                                         2 * rows * shared_inter};
    dsrt_tensor *bufs[SCRATCH + MAX_LANES] = {NULL};
    for (int i = 0; i < nbufs && !rc; i++) {
        dsrt_dtype dt = i == PTRS ? (direct ? DSRT_I32 : DSRT_I64) : io;
        if (!(bufs[i] = device_buffer(dt, i < SCRATCH || direct ? lens[i] : slab, s))) rc = -1;
    }
    if (!rc && (!direct || shared_lt)) rc = lanes_open(&l, m, s, bufs, nbufs);
    if (!rc && dsrtk_moe_gather(dev, x_data(xf), xf->dtype, dim, direct ? NULL : row_token, x_rows, dim, reference,
                                x_data(bufs[XG]), io, st))
        rc = kernel_failed();
    phase up = {DSRTK_MOE_UP, bufs[XG], bufs[GU], dim, 2 * width, 2 * width * dim};
    phase down = {DSRTK_MOE_DOWN, bufs[H], bufs[YR], width, dim, dim * width};
    const phase *phases[2] = {&up, &down};
    /* the shared expert on an aux stream (when the layer has one), beside the routed GEMMs; its UP
     * needs no counts, so it runs while the host waits for them (the GPU sat idle 64-91 us there,
     * Flash prefill, H200) */
    dsrt_stream *side = shared_lt && l.n > 1 ? l.stream[1] : s;
    if (!rc && side != s && lanes_fork(&l)) rc = -1;
    if (!rc && shared_lt) rc = shared_up(m, up.in, rows, bufs[SGU], side);
    /* the one synchronisation of a prefill: the per-expert counts */
    int32_t n_groups = 0;
    if (!rc && dsrtk_memcpy(dev, host, groups_dev, (size_t)(3 * max_groups + 1) * sizeof *host, DSRTK_D2H, st, 0))
        rc = kernel_failed();
    if (!rc) n_groups = host[3 * max_groups];
    /* the shared expert's group is the last (moe_group_kernel) */
    if (!rc && shared_lt && (n_groups < 1 || host[3 * (n_groups - 1)] != m->cfg.n_routed))
        rc = dsrt_err("moe: the grouping of %lld rows has no shared expert's group", (long long)rows);
    if (!rc && direct) rc = upload_tiles(host, n_groups - shared_lt, bufs[TILES], &n_tiles, s);
    for (int p = 0; p < 2 && !rc; p++) {
        const phase *ph = phases[p];
        if (direct) { /* out_ld is the widest set's outputs: 2·width (UP), dim (DOWN) */
            const int by_token = ph->mode == DSRTK_MOE_UP; /* UP's input rows are xg's tokens */
            if (!by_token && side != s && lanes_fork(&l)) rc = -1;
            if (!rc && shared_lt && !by_token) rc = shared_down(m, ph->in, rows, picks, width, ph->out, side);
            if (!rc && dsrtk_moe_prefill_gemm(dev, table, groups_dev, x_data(bufs[TILES]), n_tiles, ph->mode, ph->out_ld,
                                              x_data(ph->in), ph->in_ld, by_token ? row_token : NULL, by_token ? x_rows : all,
                                              x_data(ph->out), ph->out_ld, st))
                rc = kernel_failed();
            if (lanes_join(&l) && !rc) rc = -1;
        } else {
            if (lanes_fork(&l)) rc = -1;
            if (!rc) rc = prefill_phase(m, table, groups_dev, host, n_groups, ph, &l, bufs + SCRATCH, bufs[PTRS], io);
            if (lanes_join(&l) && !rc) rc = -1;
        }
        if (!rc && p == 0 &&
            dsrtk_moe_swiglu(dev, x_data(bufs[GU]), 2 * width, all, table, groups_dev, groups_dev + 3 * max_groups, row_weight,
                             picks, m->cfg.swiglu_limit, reference, x_data(bufs[H]), width, io,
                             shared_lt ? x_data(bufs[SGU]) : NULL, st))
            rc = kernel_failed();
    }
    if (lanes_join(&l) && !rc) rc = -1; /* a failure left the shared expert's UP forked */
    if (!rc && dsrtk_moe_combine(dev, x_data(bufs[YR]), io, pos_of_pick, rows, k, dim, y->storage->data, y->dtype, st))
        rc = kernel_failed();
    free(host);
    lanes_free(&l);
    for (int i = 0; i < nbufs; i++) dsrt_tensor_release(bufs[i]);
    return rc;
}

/* The whole layer on the device: the router (route and group), then w1/w3 + SwiGLU, w2 and the
 * combine into y, by the decode kernels (a hash layer's router and UP as one, where
 * dsrtk_moe_route_up applies) or, from PREFILL_ROWS tokens on, by cuda_prefill. */
static int cuda_forward(dsrt_moe *m, dsrt_tensor *x, dsrt_tensor *token_ids, dsrt_precision prec, dsrt_stream *s, dsrt_tensor *y)
{
    const dsrt_moe_config *c = &m->cfg;
    int n = c->n_routed, k = c->n_activated, reference = prec == DSRT_PREC_REFERENCE;
    int64_t dim = m->dim, rows = dsrt_tensor_numel(x) / dim, picks = rows * k, all = picks + rows;
    int64_t inter = m->experts[0].w1->cfg.out_features, shared_inter = m->shared.w1->cfg.out_features;
    int64_t width = inter > shared_inter ? inter : shared_inter;
    int32_t max_groups = (int32_t)((picks < n ? picks : n) + 1);
    const dsrtk_moe_matrix *table;
    dsrt_tensor *xf = cuda_prepare(m, x, token_ids, s, &table);
    if (!xf) return -1;
    if (!rows) {
        dsrt_tensor_release(xf);
        return 0;
    }
    int prefill = rows >= PREFILL_ROWS && prefill_ok(m, reference);
    /* picks: ids i64, weights f32; index: groups, n_groups, row_token, pos_of_pick, and the two
     * words of dsrtk_moe_route_up */
    dsrt_tensor *ids = device_buffer(DSRT_I64, picks, s), *w = ids ? device_buffer(DSRT_F32, picks, s) : NULL;
    dsrt_tensor *index = w ? device_buffer(DSRT_I32, 3 * (int64_t)max_groups + 1 + all + picks + 2, s) : NULL;
    dsrt_tensor *row_weight = index ? device_buffer(DSRT_F32, picks, s) : NULL;
    /* the tensor-core path's UP keeps w3's sums beside h's row until it has h (kernels.h) */
    int tensor_cores = atomic_load(&m->cuda_tensor_cores);
    int64_t h_ld = reference && tensor_cores ? 2 * width : width;
    dsrt_tensor *h = row_weight && !prefill ? device_buffer(DSRT_F32, all * h_ld, s) : NULL;
    dsrt_tensor *out = h ? device_buffer(DSRT_F32, all * dim, s) : NULL;
    int rc = row_weight && (prefill || out) ? 0 : -1;
    if (!rc) {
        int32_t *groups = i32_data(index), *n_groups = groups + 3 * max_groups, *row_token = n_groups + 1;
        int32_t *pos_of_pick = row_token + all;
        uint32_t *sync = (uint32_t *)(pos_of_pick + picks);
        cuda_groups grouping = {groups, n_groups, row_token, pos_of_pick, f32_data(row_weight)};
        int dev = s->device;
        void *st = s->handle;
        /* single_rows: no group holds more rows than there are tokens (but a malformed tid2eid row) */
        dsrtk_moe_project_args up = {.mode = DSRTK_MOE_UP, .reference = reference, .table = table, .x = x_data(xf),
                                     .x_dtype = xf->dtype, .tensor_cores = tensor_cores,
                                     .x_ld = dim, .row_x = row_token,
                                     .row_weight = f32_data(row_weight), .n_weighted = picks, .groups = groups,
                                     .n_groups = n_groups, .max_groups = max_groups, .single_rows = rows,
                                     .max_out = (int32_t)width, .max_in = (int32_t)dim, .limit = c->swiglu_limit,
                                     .out = h ? f32_data(h) : NULL, .out_ld = h_ld};
        int64_t *ids_out = (int64_t *)ids->storage->data;
        int up_done = 0; /* hash routing beside UP (kernels.h), where it applies */
        dsrtk_moe_router_args r;
        if (router_args(m, table, xf, rows, token_ids, ids_out, f32_data(w), &grouping, &r) ||
            (!prefill && m->tid2eid && dsrtk_moe_route_up(dev, &r, &up, sync, st, &up_done) && kernel_failed()))
            rc = -1;
        if (!rc && !up_done) {
            if (cuda_route_rows(m, &r, s))
                rc = -1;
            else if (prefill)
                rc = cuda_prefill(m, table, xf, rows, reference, groups, max_groups, row_token, pos_of_pick,
                                  f32_data(row_weight), s, y);
            else if (dsrtk_moe_project(dev, &up, st))
                rc = kernel_failed();
        }
        if (!rc && !prefill) {
            dsrtk_moe_project_args down = up;
            down.mode = DSRTK_MOE_DOWN;
            down.x = f32_data(h), down.x_dtype = DSRT_F32, down.x_ld = h_ld, down.row_x = NULL;
            down.max_out = (int32_t)dim, down.max_in = (int32_t)width;
            down.out = f32_data(out), down.out_ld = dim;
            if (dsrtk_moe_project(dev, &down, st) ||
                dsrtk_moe_combine(dev, f32_data(out), DSRT_F32, pos_of_pick, rows, k, dim, y->storage->data, y->dtype, st))
                rc = kernel_failed();
        }
    }
    dsrt_tensor *temps[] = {xf, ids, w, index, row_weight, h, out};
    for (size_t i = 0; i < sizeof temps / sizeof *temps; i++) dsrt_tensor_release(temps[i]);
    return rc;
}

int dsrt_moe_route(dsrt_moe *m, dsrt_tensor *x, dsrt_tensor *token_ids, dsrt_stream *s, dsrt_tensor **expert_ids,
                   dsrt_tensor **weights)
{
    *expert_ids = *weights = NULL;
    if (check_inputs(m, x, token_ids, s)) return -1;
    int64_t shape[DSRT_MAX_DIMS];
    memcpy(shape, x->shape, sizeof shape);
    shape[x->ndim - 1] = m->cfg.n_activated;
    if (x->device != DSRT_CPU) {
        dsrt_tensor *ids = dsrt_tensor_new(DSRT_I64, x->ndim, shape, x->device, s);
        dsrt_tensor *w = ids ? dsrt_tensor_new(DSRT_F32, x->ndim, shape, x->device, s) : NULL;
        if (!w || cuda_route(m, x, token_ids, s, ids, w)) {
            dsrt_tensor_release(ids);
            dsrt_tensor_release(w);
            return -1;
        }
        *expert_ids = ids;
        *weights = w;
        return 0;
    }
    dsrt_tensor *xf = dsrt_linear_input(x, s);
    dsrt_tensor *ids = xf ? dsrt_tensor_new(DSRT_I64, x->ndim, shape, DSRT_CPU, s) : NULL;
    dsrt_tensor *w = ids ? dsrt_tensor_new(DSRT_F32, x->ndim, shape, DSRT_CPU, s) : NULL;
    int rc = w ? route_rows(m, (const float *)xf->storage->data + xf->offset, dsrt_tensor_numel(x) / m->dim, token_ids,
                            (int64_t *)ids->storage->data, (float *)w->storage->data, s)
               : -1;
    dsrt_tensor_release(xf);
    if (rc) {
        dsrt_tensor_release(ids);
        dsrt_tensor_release(w);
        return -1;
    }
    *expert_ids = ids;
    *weights = w;
    return 0;
}

/* ---- experts (SPEC §7.2-7.3) ---- */

/* Buffers for one SwiGLU over up to `cap` rows: the gathered input and its routing weights, the
 * two projections (h overwrites the gate projection) and the output. */
typedef struct {
    float *x, *row_weight, *gate, *up, *y;
} swiglu_scratch;

/* y = w2·bf16(row_weight · silu(clamp(w1·x)) · clamp(w3·x)); row_weight NULL means none (shared) */
static int run_swiglu(const dsrt_swiglu *w, const float *x, int64_t rows, const float *row_weight, float limit,
                      dsrt_precision prec, swiglu_scratch *b, dsrt_stream *s)
{
    int64_t inter = w->w1->cfg.out_features;
    if (dsrt_linear_rows(w->w1, x, rows, b->gate, prec, s) || dsrt_linear_rows(w->w3, x, rows, b->up, prec, s)) return -1;
#pragma omp parallel for if (rows * inter > PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        float *g = b->gate + r * inter;
        const float *u = b->up + r * inter;
        for (int64_t j = 0; j < inter; j++) {
            float gj = g[j], uj = u[j];
            if (limit > 0) { /* comparisons keep NaN, as torch.clamp does */
                uj = uj > limit ? limit : uj < -limit ? -limit : uj;
                gj = gj > limit ? limit : gj;
            }
            float h = dsrt_unary_f32(DSRT_OP_SILU, gj) * uj;
            if (row_weight) h *= row_weight[r]; /* before w2, in fp32 (SPEC §7.2) */
            g[j] = prec == DSRT_PREC_REFERENCE ? dsrt_bf16_to_f32(dsrt_f32_to_bf16(h)) : h;
        }
    }
    return dsrt_linear_rows(w->w2, b->gate, rows, b->y, prec, s);
}

static void add_rows(float *acc, const float *y, const int64_t *token, int64_t rows, int64_t dim)
{
    for (int64_t r = 0; r < rows; r++) {
        float *a = acc + (token ? token[r] : r) * dim;
        const float *yr = y + r * dim;
        for (int64_t j = 0; j < dim; j++) a[j] += yr[j];
    }
}

/* Routed experts then the shared expert into acc [rows, dim] (zeroed), the reference's order.
 * ids [rows·k] are the routing; index holds 2·rows·k + n_routed + 1 integers of workspace. */
static int combine_experts(dsrt_moe *m, const float *x, int64_t rows, const int64_t *ids, const float *weights,
                           int64_t *index, float *acc, dsrt_precision prec, dsrt_stream *s)
{
    int n = m->cfg.n_routed, k = m->cfg.n_activated;
    int64_t dim = m->dim, picks = rows * k;
    /* counting sort of the picks by expert; each bucket lists its picks in ascending token order */
    int64_t *bucket = index, *start = bucket + picks, *token = start + n + 1;
    memset(start, 0, (size_t)(n + 1) * sizeof *start);
    for (int64_t p = 0; p < picks; p++) start[ids[p] + 1]++;
    int64_t cap = rows;
    for (int e = 0; e < n; e++) {
        cap = start[e + 1] > cap ? start[e + 1] : cap;
        start[e + 1] += start[e];
    }
    for (int64_t p = 0; p < picks; p++) bucket[start[ids[p]]++] = p;
    for (int e = n; e > 0; e--) start[e] = start[e - 1]; /* the fill moved each start to the next one's */
    start[0] = 0;

    int64_t inter = m->experts[0].w1->cfg.out_features, shared_inter = m->shared.w1->cfg.out_features;
    int64_t width = inter > shared_inter ? inter : shared_inter, len = cap * (2 * dim + 2 * width + 1);
    dsrt_tensor *scratch = dsrt_tensor_new(DSRT_F32, 1, &len, DSRT_CPU, s);
    if (!scratch) return -1;
    swiglu_scratch b;
    b.x = (float *)scratch->storage->data;
    b.y = b.x + cap * dim;
    b.gate = b.y + cap * dim;
    b.up = b.gate + cap * width;
    b.row_weight = b.up + cap * width;
    int rc = 0;
    float limit = m->cfg.swiglu_limit;
    for (int e = 0; e < n && !rc; e++) {
        int64_t count = start[e + 1] - start[e];
        if (!count) continue;
        for (int64_t i = 0; i < count; i++) {
            int64_t p = bucket[start[e] + i];
            token[i] = p / k;
            b.row_weight[i] = weights[p];
            memcpy(b.x + i * dim, x + token[i] * dim, (size_t)dim * sizeof *b.x);
        }
        rc = run_swiglu(&m->experts[e], b.x, count, b.row_weight, limit, prec, &b, s);
        if (!rc) add_rows(acc, b.y, token, count, dim);
    }
    if (!rc) rc = run_swiglu(&m->shared, x, rows, NULL, limit, prec, &b, s);
    if (!rc) add_rows(acc, b.y, NULL, rows, dim);
    dsrt_tensor_release(scratch);
    return rc;
}

dsrt_tensor *dsrt_moe_forward(dsrt_moe *m, dsrt_tensor *x, dsrt_tensor *token_ids, dsrt_precision prec, dsrt_stream *s)
{
    if (check_inputs(m, x, token_ids, s)) return NULL;
    if (x->device != DSRT_CPU) {
        dsrt_tensor *y = dsrt_tensor_new(prec == DSRT_PREC_FP32 ? DSRT_F32 : DSRT_BF16, x->ndim, x->shape, x->device, s);
        if (y && cuda_forward(m, x, token_ids, prec, s, y)) {
            dsrt_tensor_release(y);
            return NULL;
        }
        return y;
    }
    int64_t dim = m->dim, rows = dsrt_tensor_numel(x) / dim, picks = rows * m->cfg.n_activated;
    int64_t index_len = 3 * picks + m->cfg.n_routed + 1; /* ids, buckets, starts, tokens */
    dsrt_tensor *xf = dsrt_linear_input(x, s);
    dsrt_tensor *index = xf ? dsrt_tensor_new(DSRT_I64, 1, &index_len, DSRT_CPU, s) : NULL;
    dsrt_tensor *weights = index ? dsrt_tensor_new(DSRT_F32, 1, &picks, DSRT_CPU, s) : NULL;
    dsrt_tensor *y = weights ? dsrt_tensor_new(DSRT_F32, x->ndim, x->shape, DSRT_CPU, s) : NULL;
    int rc = y ? 0 : -1;
    if (!rc && rows) {
        const float *xs = (const float *)xf->storage->data + xf->offset;
        int64_t *ids = (int64_t *)index->storage->data;
        float *acc = (float *)y->storage->data, *w = (float *)weights->storage->data;
        memset(acc, 0, (size_t)(rows * dim) * sizeof *acc);
        rc = route_rows(m, xs, rows, token_ids, ids, w, s);
        if (!rc) rc = combine_experts(m, xs, rows, ids, w, ids + picks, acc, prec, s);
    }
    dsrt_tensor_release(xf);
    dsrt_tensor_release(index);
    dsrt_tensor_release(weights);
    if (rc || prec == DSRT_PREC_FP32) {
        if (rc) dsrt_tensor_release(y);
        return rc ? NULL : y;
    }
    dsrt_tensor *rounded = dsrt_tensor_to(y, DSRT_CPU, DSRT_BF16, s, 0);
    dsrt_tensor_release(y);
    return rounded;
}
