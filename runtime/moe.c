/*
 * moe.c - the mixture-of-experts layer (moe.h): construction checks, routing, grouped experts.
 *
 * What this protects: the reference's MoE numerics (SPEC §7, summarised in moe.h), computed over
 * host buffers with the linears' own row interface (linear.h), so an expert's projections have
 * exactly the numerics of every other linear of the model. Tokens are bucketed by expert with a
 * counting sort, so each selected expert runs its three GEMMs once per call on the rows routed to
 * it, and its contributions are added to each token's fp32 accumulator in ascending expert order,
 * the order of the reference's loop, before the shared expert's.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "err.h"
#include "moe.h"
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
    free(m->aux);
    free(m->experts);
    free(m);
}

/* ---- inputs ---- */

static int check_inputs(const dsrt_moe *m, const dsrt_tensor *x, const dsrt_tensor *token_ids, const dsrt_stream *s)
{
    char xb[DSRT_SHAPE_BUF], ib[DSRT_SHAPE_BUF];
    if (dsrt_linear_check_input(x, m->dim, m->gate->weight->device, s, "moe")) return -1;
    if (!token_ids) {
        if (m->tid2eid) return dsrt_err("moe: hash routing (tid2eid) needs the token ids");
        return 0;
    }
    dsrt_tensor_str(x, xb, sizeof xb);
    dsrt_tensor_str(token_ids, ib, sizeof ib);
    if (token_ids->dtype != DSRT_I32 && token_ids->dtype != DSRT_I64)
        return dsrt_err("moe: token ids %s must be i32 or i64", ib);
    int same_shape = token_ids->ndim == x->ndim - 1;
    for (int d = 0; same_shape && d < token_ids->ndim; d++) same_shape = token_ids->shape[d] == x->shape[d];
    if (!same_shape) return dsrt_err("moe: token ids %s must have the leading shape of the input %s", ib, xb);
    if (token_ids->device != x->device) return dsrt_err("moe: token ids %s and input %s are on different devices", ib, xb);
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

int dsrt_moe_route(dsrt_moe *m, dsrt_tensor *x, dsrt_tensor *token_ids, dsrt_stream *s, dsrt_tensor **expert_ids,
                   dsrt_tensor **weights)
{
    *expert_ids = *weights = NULL;
    if (check_inputs(m, x, token_ids, s)) return -1;
    int64_t shape[DSRT_MAX_DIMS];
    memcpy(shape, x->shape, sizeof shape);
    shape[x->ndim - 1] = m->cfg.n_activated;
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
