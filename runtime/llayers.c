/*
 * llayers.c - the layer objects in Lua (module dsrt.core, so also `dsrt.linear` / `dsrt.moe`):
 *
 *   core.linear{weight =, scale =, format =, block =, groups =, fp32_math =, in_features =, out_features =}
 *       -> linear. Takes exactly the linear tables dsv4.weights gives ({weight, scale, format, block}):
 *       format "fp8" (weight f8e4m3 [out, in], scale f8e8m0 or f32 [ceil(out/128), ceil(in/128)]),
 *       "fp4" (weight fp4e2m1 [out, in], the checkpoint's I8 bitcast; scale f8e8m0 [out, in/32]) or
 *       "bf16" (weight bf16, no scale). block = {rows, cols} one scale covers (default {128, 128}
 *       for fp8, {1, 32} for fp4). groups = G > 1: the grouped wo_a (SPEC §6.8), x [..., G·cols],
 *       y [..., out], no activation quantisation. fp32_math = true: router gate, compressor, LM head
 *       (f32 out in both precisions). in_features / out_features, when given, are checked against
 *       the weight. Unknown keys are refused (a misspelt option would otherwise be ignored).
 *   linear:forward(x [, precision]) -> y   x [..., in] bf16 or f32; precision "reference" (default)
 *       or "fp32"; y [..., out] bf16 (reference) or f32 (fp32 precision or fp32_math). linear.h
 *       gives the numerics of each case.
 *   linear.format, .in_features, .out_features, .groups, .fp32_math, .block ({rows, cols} or nil),
 *   .weight, .scale
 *
 *   core.moe(cfg, ffn, aux_streams) -> moe
 *       cfg: config.lua's cfg.dims (or cfg itself): n_routed_experts, n_activated_experts,
 *       score_func ("sqrtsoftplus" | "sigmoid" | "softmax"), route_scale, norm_topk_prob (default:
 *       score_func ~= "softmax", as config.lua), swiglu_limit (default 0: no clamp).
 *       ffn: dsv4.weights' ffn table {gate = {weight, bias | tid2eid}, experts = {[e] = {w1, w2, w3}},
 *       shared_experts = {w1, w2, w3}}, each w a linear table as above.
 *       aux_streams: the list of dsrt.stream objects the composer owns (DESIGN.md); kept, and
 *       returned as the same table by moe.aux_streams.
 *   moe:forward(x, token_ids [, precision]) -> y [..., dim]   token_ids (i32/i64, x's leading
 *       shape) are needed for hash routing and may be nil for learned routing.
 *   moe:route(x, token_ids) -> expert_ids i64 [..., k], weights f32 [..., k]  (0-based expert ids,
 *       as in the checkpoint; routing is fp32 in both precisions)
 *   moe.dim, .n_routed, .n_activated, .score_func, .route_scale, .norm_topk_prob, .swiglu_limit,
 *   .routing ("hash" | "learned"), .aux_streams
 *
 *   core.attention(layer_cfg, dims, attn, aux_streams) -> attention   (SPEC §6, attention.h)
 *       layer_cfg: config.lua's cfg.layers[i] (ratio, rope = {theta, yarn = {factor,
 *       original_seq_len, beta_fast, beta_slow} | false}); dims: cfg.dims (dim, n_heads, head_dim,
 *       rope_dim, q_lora_rank, o_lora_rank, o_groups, window, index_n_heads, index_head_dim,
 *       index_topk, norm_eps); attn: dsv4.weights' attn table {attn_sink, wq_a, q_norm, wq_b, wkv,
 *       kv_norm, wo_a, wo_b, compressor = {wkv, wgate, ape, norm} | nil, indexer = {wq_b,
 *       weights_proj, compressor} | nil}, linears as above (wo_a is made grouped by o_groups and
 *       the compressors' wkv/wgate fp32_math here); aux_streams as for moe.
 *   attention:forward(state, x [, precision]) -> y   x [S, dim] at positions [state:length(),
 *       + S); y [S, dim] (bf16 reference, f32 fp32); precision must be the state's.
 *   attention:advance(state, x [, precision [, skip]])   the state's half of a forward: x holds
 *       positions [state:length() + skip, + S); skip <= state:skippable(skip + S)
 *   attention.ratio, .window, .dim, .aux_streams
 *   core.attn_state(attention, {max_len =, slack = 0, precision = "reference", device = "cpu"})
 *       -> state, the per-sequence caches of one layer (position-addressed, SPEC §6.9)
 *   state:length(), state:truncate(n)   n >= length - slack (speculative decoding's rollback)
 *   state:skippable(n)   how many of the next n positions an advance may skip (the ring drops them)
 *
 * What this protects: a Lua table that does not describe a layer fails at construction with an
 * error naming the piece (the official tensor path, e.g. "experts.3.w2", 0-based as in the
 * checkpoint) and what is wrong with it. Objects are boxed before they exist and every C object
 * built on the way is owned by a Lua value, so an error part way through leaks nothing.
 */
#include <stdio.h>
#include <string.h>
#include "err.h"
#include "lbind.h"
#include "attention.h"
#include "moe.h"

#define LINEAR_MT "dsrt.linear"
#define MOE_MT "dsrt.moe"
#define ATTENTION_MT "dsrt.attention"
#define ATTN_STATE_MT "dsrt.attn_state"

typedef struct { dsrt_linear *l; } linear_box;
typedef struct { dsrt_moe *m; } moe_box;
typedef struct { dsrt_attention *a; } attention_box;
typedef struct { dsrt_attn_state *st; } attn_state_box;

/* ---- table fields ---- */

/* Pushes t[key] and returns whether it is present; raises unless it is of `type` (or absent and
 * not required). */
static int field(lua_State *L, int t, const char *key, int type, int required, const char *what)
{
    int got = lua_getfield(L, t, key);
    if (got == LUA_TNIL && !required) return 0;
    if (got != type)
        luaL_error(L, "%s: '%s' must be a %s, got %s", what, key, lua_typename(L, type), luaL_typename(L, -1));
    return 1;
}

/* t[key] as a tensor (NULL when absent and not required); the table keeps it alive */
static dsrt_tensor *field_tensor(lua_State *L, int t, const char *key, int required, const char *what)
{
    if (!field(L, t, key, LUA_TUSERDATA, required, what)) {
        lua_pop(L, 1);
        return NULL;
    }
    dsrt_tensor *x = dsrtL_totensor(L, -1);
    if (!x) luaL_error(L, "%s: '%s' must be a tensor, got %s", what, key, luaL_typename(L, -1));
    lua_pop(L, 1);
    return x;
}

static lua_Integer field_integer(lua_State *L, int t, const char *key, lua_Integer def, int required, const char *what)
{
    if (!field(L, t, key, LUA_TNUMBER, required, what)) {
        lua_pop(L, 1);
        return def;
    }
    int ok;
    lua_Integer v = lua_tointegerx(L, -1, &ok);
    if (!ok) luaL_error(L, "%s: '%s' must be an integer, got %s", what, key, lua_tostring(L, -1));
    lua_pop(L, 1);
    return v;
}

static double field_number(lua_State *L, int t, const char *key, double def, int required, const char *what)
{
    double v = field(L, t, key, LUA_TNUMBER, required, what) ? lua_tonumber(L, -1) : def;
    lua_pop(L, 1);
    return v;
}

static int field_boolean(lua_State *L, int t, const char *key, int def, const char *what)
{
    int v = field(L, t, key, LUA_TBOOLEAN, 0, what) ? lua_toboolean(L, -1) : def;
    lua_pop(L, 1);
    return v;
}

/* pushes t[key], a table (required) */
static void field_table(lua_State *L, int t, const char *key, const char *what) { field(L, t, key, LUA_TTABLE, 1, what); }

/* ---- linear ---- */

static dsrt_linear *check_linear(lua_State *L, int idx)
{
    linear_box *b = luaL_checkudata(L, idx, LINEAR_MT);
    if (!b->l) luaL_error(L, "linear was closed");
    return b->l;
}

static const char *const LINEAR_KEYS[] = {"weight", "scale", "format", "block", "groups", "fp32_math",
                                          "in_features", "out_features", NULL};

/* Builds a linear from the table at idx and pushes it. Errors in the table start with `what`; the
 * constructor's own ("linear: ...") are prefixed with `what` too when `nested` (an expert's). */
static dsrt_linear *push_linear(lua_State *L, int idx, const char *what, int nested)
{
    idx = lua_absindex(L, idx);
    if (!lua_istable(L, idx)) luaL_error(L, "%s: expected a linear table {weight =, format =, ...}, got %s", what, luaL_typename(L, idx));
    for (lua_pushnil(L); lua_next(L, idx); lua_pop(L, 1)) {
        int known = 0;
        for (int i = 0; !known && LINEAR_KEYS[i]; i++) known = lua_type(L, -2) == LUA_TSTRING && !strcmp(lua_tostring(L, -2), LINEAR_KEYS[i]);
        if (!known) luaL_error(L, "%s: unknown key '%s' in the linear table", what, luaL_tolstring(L, -2, NULL));
    }
    dsrt_linear_config c = {0};
    dsrt_tensor *weight = field_tensor(L, idx, "weight", 1, what), *scale = field_tensor(L, idx, "scale", 0, what);
    field(L, idx, "format", LUA_TSTRING, 1, what);
    if (dsrt_weight_format_from_name(lua_tostring(L, -1), &c.format)) luaL_error(L, "%s: %s", what, dsrt_err_msg());
    lua_pop(L, 1);
    c.groups = (int)field_integer(L, idx, "groups", 1, 0, what);
    c.fp32_math = field_boolean(L, idx, "fp32_math", 0, what);
    if (c.format == DSRT_FORMAT_FP8) c.block_rows = c.block_cols = 128;
    if (c.format == DSRT_FORMAT_FP4) c.block_rows = 1, c.block_cols = 32;
    if (field(L, idx, "block", LUA_TTABLE, 0, what)) {
        int block = lua_gettop(L);
        if (c.format == DSRT_FORMAT_BF16) luaL_error(L, "%s: a bf16 linear has no scale blocks, got a 'block'", what);
        if (luaL_len(L, block) != 2) luaL_error(L, "%s: 'block' must be {rows, cols}", what);
        lua_geti(L, block, 1);
        lua_geti(L, block, 2);
        int ok_rows, ok_cols;
        c.block_rows = lua_tointegerx(L, -2, &ok_rows);
        c.block_cols = lua_tointegerx(L, -1, &ok_cols);
        if (!ok_rows || !ok_cols) luaL_error(L, "%s: 'block' must be {rows, cols} integers", what);
        lua_pop(L, 2);
    }
    lua_pop(L, 1);
    if (weight->ndim != 2) {
        char wb[DSRT_SHAPE_BUF];
        luaL_error(L, "%s: weight %s must be 2-D [out, in]", what, dsrt_tensor_str(weight, wb, sizeof wb));
    }
    c.in_features = field_integer(L, idx, "in_features", weight->shape[1] * (c.groups > 0 ? c.groups : 1), 0, what);
    c.out_features = field_integer(L, idx, "out_features", weight->shape[0], 0, what);
    linear_box *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->l = NULL;
    luaL_setmetatable(L, LINEAR_MT);
    b->l = dsrt_linear_new(weight, scale, &c);
    if (!b->l && nested) luaL_error(L, "%s: %s", what, dsrt_err_msg());
    if (!b->l) dsrtL_error(L);
    return b->l;
}

static int l_linear(lua_State *L)
{
    push_linear(L, 1, "core.linear", 0);
    return 1;
}

static int l_linear_forward(lua_State *L)
{
    dsrt_linear *l = check_linear(L, 1);
    dsrt_tensor *x = dsrtL_checktensor(L, 2);
    dsrt_precision prec = dsrtL_checkprecision(L, 3, "linear:forward", 0);
    dsrtL_pushtensor(L, dsrt_linear_forward(l, x, prec, dsrtL_current_stream(L, x->device)));
    return 1;
}

static int l_linear_gc(lua_State *L)
{
    linear_box *b = luaL_checkudata(L, 1, LINEAR_MT);
    dsrt_linear_release(b->l);
    b->l = NULL;
    return 0;
}

static int l_linear_tostring(lua_State *L)
{
    linear_box *b = luaL_checkudata(L, 1, LINEAR_MT);
    if (!b->l) {
        lua_pushstring(L, "dsrt.linear (closed)");
        return 1;
    }
    const dsrt_linear_config *c = &b->l->cfg;
    char wb[DSRT_SHAPE_BUF];
    lua_pushfstring(L, "dsrt.linear(%s %s, %I -> %I%s%s)", dsrt_weight_format_name(c->format),
                    dsrt_tensor_str(b->l->weight, wb, sizeof wb), (lua_Integer)c->in_features, (lua_Integer)c->out_features,
                    c->groups > 1 ? ", grouped" : "", c->fp32_math ? ", fp32 math" : "");
    return 1;
}

static void push_retained(lua_State *L, dsrt_tensor *t)
{
    if (!t) {
        lua_pushnil(L);
        return;
    }
    dsrt_tensor_retain(t);
    dsrtL_pushtensor(L, t);
}

static int l_linear_index(lua_State *L)
{
    dsrt_linear *l = check_linear(L, 1);
    const char *key = luaL_checkstring(L, 2);
    const dsrt_linear_config *c = &l->cfg;
    if (luaL_getmetafield(L, 1, "methods") != LUA_TNIL && lua_getfield(L, -1, key) != LUA_TNIL) return 1;
    if (!strcmp(key, "format")) lua_pushstring(L, dsrt_weight_format_name(c->format));
    else if (!strcmp(key, "in_features")) lua_pushinteger(L, c->in_features);
    else if (!strcmp(key, "out_features")) lua_pushinteger(L, c->out_features);
    else if (!strcmp(key, "groups")) lua_pushinteger(L, c->groups);
    else if (!strcmp(key, "fp32_math")) lua_pushboolean(L, c->fp32_math);
    else if (!strcmp(key, "weight")) push_retained(L, l->weight);
    else if (!strcmp(key, "scale")) push_retained(L, l->scale);
    else if (!strcmp(key, "block") && c->format != DSRT_FORMAT_BF16) {
        lua_createtable(L, 2, 0);
        lua_pushinteger(L, c->block_rows);
        lua_rawseti(L, -2, 1);
        lua_pushinteger(L, c->block_cols);
        lua_rawseti(L, -2, 2);
    } else lua_pushnil(L);
    return 1;
}

/* The aux stream list at idx as an array (a userdata left on the stack owns it) */
static dsrt_stream **check_aux(lua_State *L, int idx, const char *what, int *n_aux)
{
    *n_aux = (int)luaL_len(L, idx);
    dsrt_stream **aux = lua_newuserdatauv(L, sizeof *aux * (size_t)(*n_aux ? *n_aux : 1), 0);
    for (int i = 0; i < *n_aux; i++) {
        lua_geti(L, idx, i + 1);
        if (!luaL_testudata(L, -1, DSRT_STREAM_MT))
            luaL_error(L, "%s: aux_streams[%d] must be a dsrt.stream, got %s", what, i + 1, luaL_typename(L, -1));
        aux[i] = dsrtL_checkstream(L, -1);
        lua_pop(L, 1);
    }
    return aux;
}

/* ---- moe ---- */

static dsrt_moe *check_moe(lua_State *L, int idx)
{
    moe_box *b = luaL_checkudata(L, idx, MOE_MT);
    if (!b->m) luaL_error(L, "moe was closed");
    return b->m;
}

/* Reads the expert table at idx into w; its linears are pushed onto the stack (they own them). */
static void push_swiglu(lua_State *L, int idx, const char *expert, dsrt_swiglu *w)
{
    char what[64];
    static const char *const names[3] = {"w1", "w2", "w3"};
    dsrt_linear **slots[3] = {&w->w1, &w->w2, &w->w3};
    idx = lua_absindex(L, idx);
    if (!lua_istable(L, idx)) luaL_error(L, "core.moe: %s must be a table {w1, w2, w3}, got %s", expert, luaL_typename(L, idx));
    for (int i = 0; i < 3; i++) {
        snprintf(what, sizeof what, "core.moe: %s.%s", expert, names[i]);
        if (lua_getfield(L, idx, names[i]) == LUA_TNIL) luaL_error(L, "%s is missing", what);
        *slots[i] = push_linear(L, -1, what, 1);
        lua_remove(L, -2);
    }
}

static int l_moe(lua_State *L)
{
    const char *what = "core.moe";
    luaL_checktype(L, 1, LUA_TTABLE);
    luaL_checktype(L, 2, LUA_TTABLE);
    luaL_checktype(L, 3, LUA_TTABLE);
    int cfg = 1;
    if (lua_getfield(L, 1, "dims") == LUA_TTABLE) cfg = lua_gettop(L); /* the whole config: read its dims */
    else lua_pop(L, 1);
    dsrt_moe_config c;
    c.n_routed = (int)field_integer(L, cfg, "n_routed_experts", 0, 1, what);
    c.n_activated = (int)field_integer(L, cfg, "n_activated_experts", 0, 1, what);
    field(L, cfg, "score_func", LUA_TSTRING, 1, what);
    if (dsrt_score_func_from_name(lua_tostring(L, -1), &c.score_func)) luaL_error(L, "%s: %s", what, dsrt_err_msg());
    lua_pop(L, 1);
    c.route_scale = (float)field_number(L, cfg, "route_scale", 0, 1, what);
    c.norm_topk_prob = field_boolean(L, cfg, "norm_topk_prob", c.score_func != DSRT_SCORE_SOFTMAX, what);
    c.swiglu_limit = (float)field_number(L, cfg, "swiglu_limit", 0, 0, what);
    if (c.n_routed < 1) luaL_error(L, "%s: n_routed_experts must be at least 1, got %d", what, c.n_routed);

    field_table(L, 2, "gate", "core.moe: ffn");
    int gate = lua_gettop(L);
    dsrt_tensor *gate_weight = field_tensor(L, gate, "weight", 1, "core.moe: gate");
    dsrt_tensor *bias = field_tensor(L, gate, "bias", 0, "core.moe: gate");
    dsrt_tensor *tid2eid = field_tensor(L, gate, "tid2eid", 0, "core.moe: gate");

    field_table(L, 2, "experts", "core.moe: ffn");
    int experts = lua_gettop(L);
    if (luaL_len(L, experts) != c.n_routed)
        luaL_error(L, "%s: ffn.experts has %d entries, n_routed_experts is %d", what, (int)luaL_len(L, experts), c.n_routed);
    dsrt_swiglu *routed = lua_newuserdatauv(L, sizeof *routed * (size_t)c.n_routed, 0); /* freed by the GC */
    lua_createtable(L, 3 * c.n_routed + 3, 0); /* owns the linears until the moe retains them */
    int keep = lua_gettop(L), kept = 0;
    char name[32];
    for (int e = 0; e < c.n_routed; e++) {
        snprintf(name, sizeof name, "experts.%d", e);
        lua_geti(L, experts, e + 1);
        push_swiglu(L, -1, name, &routed[e]);
        for (int i = 0; i < 3; i++) lua_rawseti(L, keep, ++kept);
        lua_pop(L, 1);
    }
    dsrt_swiglu shared;
    field_table(L, 2, "shared_experts", "core.moe: ffn");
    push_swiglu(L, -1, "shared_experts", &shared);
    for (int i = 0; i < 3; i++) lua_rawseti(L, keep, ++kept);
    lua_pop(L, 1);

    int n_aux;
    dsrt_stream **aux = check_aux(L, 3, what, &n_aux);
    moe_box *b = lua_newuserdatauv(L, sizeof *b, 1);
    b->m = NULL;
    luaL_setmetatable(L, MOE_MT);
    lua_pushvalue(L, 3);
    lua_setiuservalue(L, -2, 1);
    b->m = dsrt_moe_new(&c, gate_weight, bias, tid2eid, routed, &shared, aux, n_aux);
    if (!b->m) dsrtL_error(L);
    return 1;
}

static dsrt_tensor *opt_token_ids(lua_State *L, int idx) { return lua_isnoneornil(L, idx) ? NULL : dsrtL_checktensor(L, idx); }

static int l_moe_forward(lua_State *L)
{
    dsrt_moe *m = check_moe(L, 1);
    dsrt_tensor *x = dsrtL_checktensor(L, 2), *ids = opt_token_ids(L, 3);
    dsrt_precision prec = dsrtL_checkprecision(L, 4, "moe:forward", 0);
    dsrtL_pushtensor(L, dsrt_moe_forward(m, x, ids, prec, dsrtL_current_stream(L, x->device)));
    return 1;
}

static int l_moe_route(lua_State *L)
{
    dsrt_moe *m = check_moe(L, 1);
    dsrt_tensor *x = dsrtL_checktensor(L, 2), *ids = opt_token_ids(L, 3), *expert_ids, *weights;
    if (dsrt_moe_route(m, x, ids, dsrtL_current_stream(L, x->device), &expert_ids, &weights)) return dsrtL_error(L);
    dsrtL_pushtensor(L, expert_ids);
    dsrtL_pushtensor(L, weights);
    return 2;
}

static int l_moe_gc(lua_State *L)
{
    moe_box *b = luaL_checkudata(L, 1, MOE_MT);
    dsrt_moe_release(b->m);
    b->m = NULL;
    return 0;
}

static int l_moe_tostring(lua_State *L)
{
    moe_box *b = luaL_checkudata(L, 1, MOE_MT);
    if (!b->m) {
        lua_pushstring(L, "dsrt.moe (closed)");
        return 1;
    }
    const dsrt_moe *m = b->m;
    lua_pushfstring(L, "dsrt.moe(dim %I, %d of %d experts, %s routing, %s)", (lua_Integer)m->dim, m->cfg.n_activated,
                    m->cfg.n_routed, m->tid2eid ? "hash" : "learned", dsrt_score_func_name(m->cfg.score_func));
    return 1;
}

static int l_moe_index(lua_State *L)
{
    dsrt_moe *m = check_moe(L, 1);
    const char *key = luaL_checkstring(L, 2);
    const dsrt_moe_config *c = &m->cfg;
    if (luaL_getmetafield(L, 1, "methods") != LUA_TNIL && lua_getfield(L, -1, key) != LUA_TNIL) return 1;
    if (!strcmp(key, "dim")) lua_pushinteger(L, m->dim);
    else if (!strcmp(key, "n_routed")) lua_pushinteger(L, c->n_routed);
    else if (!strcmp(key, "n_activated")) lua_pushinteger(L, c->n_activated);
    else if (!strcmp(key, "score_func")) lua_pushstring(L, dsrt_score_func_name(c->score_func));
    else if (!strcmp(key, "route_scale")) lua_pushnumber(L, c->route_scale);
    else if (!strcmp(key, "norm_topk_prob")) lua_pushboolean(L, c->norm_topk_prob);
    else if (!strcmp(key, "swiglu_limit")) lua_pushnumber(L, c->swiglu_limit);
    else if (!strcmp(key, "routing")) lua_pushstring(L, m->tid2eid ? "hash" : "learned");
    else if (!strcmp(key, "aux_streams")) lua_getiuservalue(L, 1, 1);
    else lua_pushnil(L);
    return 1;
}

/* ---- attention ---- */

static dsrt_attention *check_attention(lua_State *L, int idx)
{
    attention_box *b = luaL_checkudata(L, idx, ATTENTION_MT);
    if (!b->a) luaL_error(L, "attention was closed");
    return b->a;
}

static dsrt_attn_state *check_attn_state(lua_State *L, int idx)
{
    attn_state_box *b = luaL_checkudata(L, idx, ATTN_STATE_MT);
    if (!b->st) luaL_error(L, "attn_state was closed");
    return b->st;
}

/* Builds the linear of the table t[key] with groups / fp32_math set (the checkpoint's tables do not
 * say how the layer uses them) and leaves it on the stack. */
static dsrt_linear *push_attn_linear(lua_State *L, int t, const char *key, const char *path, int groups, int fp32_math)
{
    char what[96];
    snprintf(what, sizeof what, "core.attention: %s", path);
    if (lua_getfield(L, t, key) != LUA_TTABLE) luaL_error(L, "%s: expected a linear table, got %s", what, luaL_typename(L, -1));
    int src = lua_gettop(L);
    lua_createtable(L, 0, 8);
    for (lua_pushnil(L); lua_next(L, src);) {
        lua_pushvalue(L, -2);
        lua_insert(L, -2);
        lua_settable(L, -4);
    }
    if (groups > 1) {
        lua_pushinteger(L, groups);
        lua_setfield(L, -2, "groups");
    }
    if (fp32_math) {
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, "fp32_math");
    }
    dsrt_linear *l = push_linear(L, -1, what, 1);
    lua_replace(L, src);
    lua_pop(L, 1);
    return l;
}

/* compressor = {wkv, wgate, ape, norm} of the table at t (its linears stay on the stack) */
static void push_compressor(lua_State *L, int t, const char *path, dsrt_compressor_weights *c)
{
    char name[64], what[96];
    snprintf(what, sizeof what, "core.attention: %s", path);
    field_table(L, t, "compressor", what);
    int comp = lua_gettop(L);
    snprintf(what, sizeof what, "core.attention: %s.compressor", path);
    c->ape = field_tensor(L, comp, "ape", 1, what);
    c->norm = field_tensor(L, comp, "norm", 1, what);
    snprintf(name, sizeof name, "%s.compressor.wkv", path);
    c->wkv = push_attn_linear(L, comp, "wkv", name, 1, 1);
    snprintf(name, sizeof name, "%s.compressor.wgate", path);
    c->wgate = push_attn_linear(L, comp, "wgate", name, 1, 1);
}

static int l_attention(lua_State *L)
{
    const char *what = "core.attention";
    luaL_checktype(L, 1, LUA_TTABLE);
    luaL_checktype(L, 2, LUA_TTABLE);
    luaL_checktype(L, 3, LUA_TTABLE);
    luaL_checktype(L, 4, LUA_TTABLE);
    luaL_checkstack(L, 40, what);
    dsrt_attn_config c = {0};
    c.ratio = (int)field_integer(L, 1, "ratio", 0, 1, "core.attention: layer");
    field_table(L, 1, "rope", "core.attention: layer");
    c.rope_theta = field_number(L, -1, "theta", 0, 1, "core.attention: layer.rope");
    if (lua_getfield(L, -1, "yarn") == LUA_TTABLE) {
        int y = lua_gettop(L);
        const char *yw = "core.attention: layer.rope.yarn";
        c.has_yarn = 1;
        c.yarn.factor = field_number(L, y, "factor", 0, 1, yw);
        c.yarn.original_seq_len = field_integer(L, y, "original_seq_len", 0, 1, yw);
        c.yarn.beta_fast = field_number(L, y, "beta_fast", 0, 1, yw);
        c.yarn.beta_slow = field_number(L, y, "beta_slow", 0, 1, yw);
    } else if (!lua_isnil(L, -1) && !(lua_isboolean(L, -1) && !lua_toboolean(L, -1))) {
        luaL_error(L, "core.attention: layer.rope.yarn must be a table or false, got %s", luaL_typename(L, -1));
    }
    lua_pop(L, 2);
    const char *dw = "core.attention: dims";
    c.dim = (int)field_integer(L, 2, "dim", 0, 1, dw);
    c.n_heads = (int)field_integer(L, 2, "n_heads", 0, 1, dw);
    c.head_dim = (int)field_integer(L, 2, "head_dim", 0, 1, dw);
    c.rope_dim = (int)field_integer(L, 2, "rope_dim", 0, 1, dw);
    c.q_lora_rank = (int)field_integer(L, 2, "q_lora_rank", 0, 1, dw);
    c.o_lora_rank = (int)field_integer(L, 2, "o_lora_rank", 0, 1, dw);
    c.o_groups = (int)field_integer(L, 2, "o_groups", 0, 1, dw);
    c.window = (int)field_integer(L, 2, "window", 0, 1, dw);
    c.index_n_heads = (int)field_integer(L, 2, "index_n_heads", 0, c.ratio == 4, dw);
    c.index_head_dim = (int)field_integer(L, 2, "index_head_dim", 0, c.ratio == 4, dw);
    c.index_topk = (int)field_integer(L, 2, "index_topk", 0, c.ratio == 4, dw);
    c.norm_eps = (float)field_number(L, 2, "norm_eps", 0, 1, dw);

    dsrt_attn_weights w = {0};
    const char *aw = "core.attention: attn";
    w.attn_sink = field_tensor(L, 3, "attn_sink", 1, aw);
    w.q_norm = field_tensor(L, 3, "q_norm", 1, aw);
    w.kv_norm = field_tensor(L, 3, "kv_norm", 1, aw);
    w.wq_a = push_attn_linear(L, 3, "wq_a", "wq_a", 1, 0);
    w.wq_b = push_attn_linear(L, 3, "wq_b", "wq_b", 1, 0);
    w.wkv = push_attn_linear(L, 3, "wkv", "wkv", 1, 0);
    w.wo_a = push_attn_linear(L, 3, "wo_a", "wo_a", c.o_groups, 0);
    w.wo_b = push_attn_linear(L, 3, "wo_b", "wo_b", 1, 0);
    if (c.ratio > 0) push_compressor(L, 3, "attn", &w.compressor);
    else if (lua_getfield(L, 3, "compressor") != LUA_TNIL) luaL_error(L, "%s: a window-only layer (ratio 0) has no compressor", aw);
    if (c.ratio == 4) {
        field_table(L, 3, "indexer", aw);
        int ix = lua_gettop(L);
        w.index_wq_b = push_attn_linear(L, ix, "wq_b", "indexer.wq_b", 1, 0);
        w.index_weights_proj = push_attn_linear(L, ix, "weights_proj", "indexer.weights_proj", 1, 0);
        push_compressor(L, ix, "indexer", &w.index_compressor);
    } else if (lua_getfield(L, 3, "indexer") != LUA_TNIL) {
        luaL_error(L, "%s: only ratio-4 layers have an indexer (ratio %d)", aw, c.ratio);
    }
    int n_aux;
    dsrt_stream **aux = check_aux(L, 4, what, &n_aux);
    attention_box *b = lua_newuserdatauv(L, sizeof *b, 1);
    b->a = NULL;
    luaL_setmetatable(L, ATTENTION_MT);
    lua_pushvalue(L, 4);
    lua_setiuservalue(L, -2, 1);
    b->a = dsrt_attention_new(&c, &w, aux, n_aux);
    if (!b->a) dsrtL_error(L);
    return 1;
}

static int l_attention_forward(lua_State *L)
{
    dsrt_attention *a = check_attention(L, 1);
    dsrt_attn_state *st = check_attn_state(L, 2);
    dsrt_tensor *x = dsrtL_checktensor(L, 3);
    dsrt_precision prec = lua_isnoneornil(L, 4) ? dsrt_attn_state_precision(st) : dsrtL_checkprecision(L, 4, "attention:forward", 1);
    dsrtL_pushtensor(L, dsrt_attention_forward(a, st, x, prec, dsrtL_current_stream(L, x->device)));
    return 1;
}

/* attention:advance(state, x [, precision [, skip]]): the state steps of a forward alone (no output),
 * after skipping `skip` positions the state would drop unread */
static int l_attention_advance(lua_State *L)
{
    dsrt_attention *a = check_attention(L, 1);
    dsrt_attn_state *st = check_attn_state(L, 2);
    dsrt_tensor *x = dsrtL_checktensor(L, 3);
    dsrt_precision prec = lua_isnoneornil(L, 4) ? dsrt_attn_state_precision(st) : dsrtL_checkprecision(L, 4, "attention:advance", 1);
    lua_Integer skip = luaL_optinteger(L, 5, 0);
    if (dsrt_attention_advance(a, st, x, skip, prec, dsrtL_current_stream(L, x->device))) return dsrtL_error(L);
    return 0;
}

static int l_attention_gc(lua_State *L)
{
    attention_box *b = luaL_checkudata(L, 1, ATTENTION_MT);
    dsrt_attention_release(b->a);
    b->a = NULL;
    return 0;
}

static int l_attention_tostring(lua_State *L)
{
    attention_box *b = luaL_checkudata(L, 1, ATTENTION_MT);
    const dsrt_attn_config *c = b->a ? dsrt_attention_config(b->a) : NULL;
    if (!c) lua_pushstring(L, "dsrt.attention (closed)");
    else lua_pushfstring(L, "dsrt.attention(dim %d, %d heads, window %d, ratio %d)", c->dim, c->n_heads, c->window, c->ratio);
    return 1;
}

static int l_attention_index(lua_State *L)
{
    dsrt_attention *a = check_attention(L, 1);
    const char *key = luaL_checkstring(L, 2);
    if (luaL_getmetafield(L, 1, "methods") != LUA_TNIL && lua_getfield(L, -1, key) != LUA_TNIL) return 1;
    const dsrt_attn_config *c = dsrt_attention_config(a);
    if (!strcmp(key, "ratio")) lua_pushinteger(L, c->ratio);
    else if (!strcmp(key, "window")) lua_pushinteger(L, c->window);
    else if (!strcmp(key, "dim")) lua_pushinteger(L, c->dim);
    else if (!strcmp(key, "aux_streams")) lua_getiuservalue(L, 1, 1);
    else lua_pushnil(L);
    return 1;
}

static int l_attn_state(lua_State *L)
{
    const char *what = "core.attn_state";
    dsrt_attention *a = check_attention(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    int64_t max_len = field_integer(L, 2, "max_len", 0, 1, what);
    int slack = (int)field_integer(L, 2, "slack", 0, 0, what);
    lua_getfield(L, 2, "precision");
    dsrt_precision prec = dsrtL_checkprecision(L, lua_gettop(L), what, 0);
    lua_getfield(L, 2, "device");
    int device = dsrtL_checkdevice(L, lua_gettop(L), DSRT_CPU);
    lua_pop(L, 2);
    attn_state_box *b = lua_newuserdatauv(L, sizeof *b, 1);
    b->st = NULL;
    luaL_setmetatable(L, ATTN_STATE_MT);
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, -2, 1);
    b->st = dsrt_attn_state_new(a, max_len, slack, prec, device, dsrtL_current_stream(L, device));
    if (!b->st) dsrtL_error(L);
    return 1;
}

static int l_attn_state_length(lua_State *L)
{
    lua_pushinteger(L, dsrt_attn_state_length(check_attn_state(L, 1)));
    return 1;
}

static int l_attn_state_truncate(lua_State *L)
{
    if (dsrt_attn_state_truncate(check_attn_state(L, 1), luaL_checkinteger(L, 2))) return dsrtL_error(L);
    return 0;
}

static int l_attn_state_skippable(lua_State *L)
{
    lua_pushinteger(L, dsrt_attn_state_skippable(check_attn_state(L, 1), luaL_checkinteger(L, 2)));
    return 1;
}

static int l_attn_state_gc(lua_State *L)
{
    attn_state_box *b = luaL_checkudata(L, 1, ATTN_STATE_MT);
    dsrt_attn_state_release(b->st);
    b->st = NULL;
    return 0;
}

void dsrtL_open_layers(lua_State *L)
{
    static const luaL_Reg linear_meta[] = {{"__gc", l_linear_gc}, {"__close", l_linear_gc}, {"__tostring", l_linear_tostring},
                                           {"__index", l_linear_index}, {NULL, NULL}};
    static const luaL_Reg linear_methods[] = {{"forward", l_linear_forward}, {"close", l_linear_gc}, {NULL, NULL}};
    static const luaL_Reg moe_meta[] = {{"__gc", l_moe_gc}, {"__close", l_moe_gc}, {"__tostring", l_moe_tostring},
                                        {"__index", l_moe_index}, {NULL, NULL}};
    static const luaL_Reg moe_methods[] = {{"forward", l_moe_forward}, {"route", l_moe_route}, {"close", l_moe_gc}, {NULL, NULL}};
    static const luaL_Reg attention_meta[] = {{"__gc", l_attention_gc}, {"__close", l_attention_gc},
                                              {"__tostring", l_attention_tostring}, {"__index", l_attention_index}, {NULL, NULL}};
    static const luaL_Reg attention_methods[] = {{"forward", l_attention_forward}, {"advance", l_attention_advance},
                                                 {"close", l_attention_gc}, {NULL, NULL}};
    static const luaL_Reg state_meta[] = {{"__gc", l_attn_state_gc}, {"__close", l_attn_state_gc}, {NULL, NULL}};
    static const luaL_Reg state_methods[] = {{"length", l_attn_state_length}, {"truncate", l_attn_state_truncate},
                                             {"skippable", l_attn_state_skippable}, {"close", l_attn_state_gc}, {NULL, NULL}};
    static const luaL_Reg functions[] = {{"linear", l_linear}, {"moe", l_moe}, {"attention", l_attention},
                                         {"attn_state", l_attn_state}, {NULL, NULL}};
    dsrtL_newclass(L, LINEAR_MT, linear_meta, linear_methods);
    dsrtL_newclass(L, MOE_MT, moe_meta, moe_methods);
    dsrtL_newclass(L, ATTENTION_MT, attention_meta, attention_methods);
    dsrtL_newclass(L, ATTN_STATE_MT, state_meta, state_methods);
    luaL_setfuncs(L, functions, 0);
}
