/*
 * lnn.c - dsrt.core.nn (also dsrt.nn): DeepSeek-V4's numerical primitives (nn.h) in Lua.
 *
 * One calling style everywhere, so a script reads like the SPEC: tensors first, then scalars, then
 * the precision as the last argument, the string "reference" or "fp32" (required: a model must
 * never run in a mode it did not ask for). Functions whose result cannot depend on it (sinkhorn,
 * rope_freqs, hc_expand) take none. Positions and pool indices are data and stay 0-based as the
 * checkpoint and the reference count them; only quant_roundtrip_q8's first column is a place in a
 * tensor and counts from 1, as narrow's start does. Work runs on the current stream of the first
 * tensor's device; errors are the core's messages, which name the function and the shapes.
 *
 *   nn.rms_norm(x, weight|nil, eps, prec)              nn.head_rms_norm(q, eps, prec)
 *   nn.quant_roundtrip_q8(x, blk, first, count, prec)  nn.quant_roundtrip_q4(x, prec)   -> x, rewritten
 *   nn.rope_freqs(theta [, yarn])                      nn.rope(x, positions, theta, yarn|nil, inverse, prec)
 *   nn.hadamard128(x, prec)                            nn.sparse_attention(q, pool, indices, sink, scale, prec)
 *   nn.norm_rope(x, weight|nil, norm, eps, first, step, theta, yarn|nil, post, prec [, dtype]) -> f32 | bf16
 *   nn.q_kv_norm(qa, q_weight|nil, kv, kv_weight|nil, eps, first, step, theta, yarn|nil, post, prec) -> qr, kv
 *   nn.sparse_attention_inverse_rope(q, pool, indices, sink, scale, first, step, theta, yarn|nil, prec)
 *   nn.sinkhorn(mixes, scale, base, hc, iters, eps)                      -> pre, post, comb
 *   nn.hc_pre(X, fn, scale, base, hc_eps, norm_eps, iters, prec [, norm_w])  -> u, post, comb
 *   nn.hc_post(f, X, post, comb, prec)        nn.hc_head(X, fn, scale, base, hc_eps, norm_eps, prec [, norm_w])
 *   nn.hc_expand(e, hc)
 *   nn.hc_post_pre(f, X, post, comb, fn, scale, base, hc_eps, norm_eps, iters, prec [, norm_w])
 *                                                                        -> X', u, post', comb'
 *   nn.hc_post_head(f, X, post, comb, fn, scale, base, hc_eps, norm_eps, prec [, norm_w])  -> X', y
 * With norm_w the hc ops return their u (hc_head's y) RMS-normed: nn.rms_norm(u, norm_w, norm_eps, prec).
 * yarn = {factor = 16, original_seq_len = 65536, beta_fast = 32, beta_slow = 1}, or nil for none.
 * The fused ops take positions as the progression first, first + step, ... (one per index of the
 * first dimension); norm_rope's norm is "rms", "head" or "none", its post "q8", "hadamard_q4" or
 * "none" (nn.h's dsrt_nn_norm and dsrt_nn_post).
 */
#include <limits.h>
#include <string.h>
#include "err.h"
#include "lbind.h"
#include "nn.h"

/* ---- arguments ---- */

static int check_int(lua_State *L, int idx)
{
    lua_Integer v = luaL_checkinteger(L, idx);
    luaL_argcheck(L, v >= INT_MIN && v <= INT_MAX, idx, "integer out of range");
    return (int)v;
}

static float check_float(lua_State *L, int idx) { return (float)luaL_checknumber(L, idx); }

static double yarn_number(lua_State *L, int idx, const char *key, const char *fn)
{
    lua_getfield(L, idx, key);
    if (lua_type(L, -1) != LUA_TNUMBER) luaL_error(L, "nn.%s: yarn.%s must be a number, got %s", fn, key, luaL_typename(L, -1));
    double v = lua_tonumber(L, -1);
    lua_pop(L, 1);
    return v;
}

/* a yarn table, or NULL for nil / none */
static const dsrt_yarn *check_yarn(lua_State *L, int idx, const char *fn, dsrt_yarn *yarn)
{
    if (lua_isnoneornil(L, idx)) return NULL;
    if (!lua_istable(L, idx))
        luaL_error(L, "nn.%s: yarn (argument #%d) must be a table or nil, got %s", fn, idx, luaL_typename(L, idx));
    yarn->factor = yarn_number(L, idx, "factor", fn);
    yarn->beta_fast = yarn_number(L, idx, "beta_fast", fn);
    yarn->beta_slow = yarn_number(L, idx, "beta_slow", fn);
    lua_getfield(L, idx, "original_seq_len");
    int is_int;
    yarn->original_seq_len = (int64_t)lua_tointegerx(L, -1, &is_int);
    if (!is_int) luaL_error(L, "nn.%s: yarn.original_seq_len must be an integer, got %s", fn, luaL_typename(L, -1));
    lua_pop(L, 1);
    return yarn;
}

static dsrt_tensor *opt_tensor(lua_State *L, int idx) { return lua_isnoneornil(L, idx) ? NULL : dsrtL_checktensor(L, idx); }

static dsrt_stream *stream_for(lua_State *L, const dsrt_tensor *t) { return dsrtL_current_stream(L, t->device); }

static int push_three(lua_State *L, int rc, dsrt_tensor *a, dsrt_tensor *b, dsrt_tensor *c)
{
    if (rc) return dsrtL_error(L);
    dsrtL_pushtensor(L, a);
    dsrtL_pushtensor(L, b);
    dsrtL_pushtensor(L, c);
    return 3;
}

/* ---- functions ---- */

static int l_rms_norm(lua_State *L)
{
    dsrt_tensor *x = dsrtL_checktensor(L, 1), *weight = opt_tensor(L, 2);
    float eps = check_float(L, 3);
    dsrtL_pushtensor(L, dsrt_nn_rms_norm(x, weight, eps, dsrtL_checkprecision(L, 4, "nn.rms_norm", 1), stream_for(L, x)));
    return 1;
}

static int l_head_rms_norm(lua_State *L)
{
    dsrt_tensor *q = dsrtL_checktensor(L, 1);
    float eps = check_float(L, 2);
    dsrtL_pushtensor(L, dsrt_nn_head_rms_norm(q, eps, dsrtL_checkprecision(L, 3, "nn.head_rms_norm", 1), stream_for(L, q)));
    return 1;
}

static int l_quant_roundtrip_q8(lua_State *L)
{
    dsrt_tensor *x = dsrtL_checktensor(L, 1);
    int blk = check_int(L, 2);
    lua_Integer first = luaL_checkinteger(L, 3), count = luaL_checkinteger(L, 4);
    dsrt_precision prec = dsrtL_checkprecision(L, 5, "nn.quant_roundtrip_q8", 1);
    if (dsrt_nn_quant_roundtrip_q8(x, blk, (int64_t)first - 1, (int64_t)count, prec, stream_for(L, x)))
        return dsrtL_error(L);
    lua_settop(L, 1);
    return 1;
}

static int l_quant_roundtrip_q4(lua_State *L)
{
    dsrt_tensor *x = dsrtL_checktensor(L, 1);
    if (dsrt_nn_quant_roundtrip_q4(x, dsrtL_checkprecision(L, 2, "nn.quant_roundtrip_q4", 1), stream_for(L, x)))
        return dsrtL_error(L);
    lua_settop(L, 1);
    return 1;
}

static int l_rope_freqs(lua_State *L)
{
    double theta = luaL_checknumber(L, 1);
    dsrt_yarn yarn_buf;
    const dsrt_yarn *yarn = check_yarn(L, 2, "rope_freqs", &yarn_buf);
    float freqs[DSRT_NN_ROPE_PAIRS];
    if (dsrt_nn_rope_freqs(theta, yarn, freqs)) return dsrtL_error(L);
    int64_t n = DSRT_NN_ROPE_PAIRS;
    dsrt_tensor *t = dsrtL_pushtensor(L, dsrt_tensor_new(DSRT_F32, 1, &n, DSRT_CPU, dsrt_stream_default(DSRT_CPU)));
    memcpy(t->storage->data, freqs, sizeof freqs);
    return 1;
}

static int l_rope(lua_State *L)
{
    dsrt_tensor *x = dsrtL_checktensor(L, 1), *positions = dsrtL_checktensor(L, 2);
    double theta = luaL_checknumber(L, 3);
    dsrt_yarn yarn_buf;
    const dsrt_yarn *yarn = check_yarn(L, 4, "rope", &yarn_buf);
    if (!lua_isnoneornil(L, 5) && !lua_isboolean(L, 5)) luaL_typeerror(L, 5, "boolean (inverse)");
    int inverse = lua_toboolean(L, 5);
    dsrt_precision prec = dsrtL_checkprecision(L, 6, "nn.rope", 1);
    dsrtL_pushtensor(L, dsrt_nn_rope(x, positions, theta, yarn, inverse, prec, stream_for(L, x)));
    return 1;
}

static int l_hadamard128(lua_State *L)
{
    dsrt_tensor *x = dsrtL_checktensor(L, 1);
    dsrtL_pushtensor(L, dsrt_nn_hadamard128(x, dsrtL_checkprecision(L, 2, "nn.hadamard128", 1), stream_for(L, x)));
    return 1;
}

static int l_sparse_attention(lua_State *L)
{
    dsrt_tensor *q = dsrtL_checktensor(L, 1), *pool = dsrtL_checktensor(L, 2), *indices = dsrtL_checktensor(L, 3);
    dsrt_tensor *sink = dsrtL_checktensor(L, 4);
    float scale = check_float(L, 5);
    dsrt_precision prec = dsrtL_checkprecision(L, 6, "nn.sparse_attention", 1);
    dsrtL_pushtensor(L, dsrt_nn_sparse_attention(q, pool, indices, sink, scale, prec, stream_for(L, q)));
    return 1;
}

/* the post-processing option of the fused passes, in dsrt_nn_post's order */
static dsrt_nn_post check_post(lua_State *L, int idx)
{
    static const char *const posts[] = {"none", "q8", "hadamard_q4", NULL};
    return (dsrt_nn_post)luaL_checkoption(L, idx, NULL, posts);
}

/* The positions first, first + step, ... and the RoPE parameters theta, yarn of the fused passes,
 * from the Lua arguments idx .. idx + 3 */
typedef struct {
    int64_t first, step;
    double theta;
    dsrt_yarn yarn_buf;
    const dsrt_yarn *yarn;
} rope_args;

static void check_rope_args(lua_State *L, int idx, const char *fn, rope_args *r)
{
    r->first = (int64_t)luaL_checkinteger(L, idx);
    r->step = (int64_t)luaL_checkinteger(L, idx + 1);
    r->theta = luaL_checknumber(L, idx + 2);
    r->yarn = check_yarn(L, idx + 3, fn, &r->yarn_buf);
}

static int l_norm_rope(lua_State *L)
{
    static const char *const norms[] = {"none", "rms", "head", NULL}; /* dsrt_nn_norm order */
    dsrt_tensor *x = dsrtL_checktensor(L, 1), *weight = opt_tensor(L, 2);
    dsrt_nn_norm norm = (dsrt_nn_norm)luaL_checkoption(L, 3, NULL, norms);
    float eps = check_float(L, 4);
    rope_args r;
    check_rope_args(L, 5, "norm_rope", &r);
    dsrt_nn_post post = check_post(L, 9);
    dsrt_precision prec = dsrtL_checkprecision(L, 10, "nn.norm_rope", 1);
    static const char *const outs[] = {"f32", "bf16", NULL};
    dsrt_dtype out = luaL_checkoption(L, 11, "f32", outs) ? DSRT_BF16 : DSRT_F32;
    dsrtL_pushtensor(L, dsrt_nn_norm_rope_to(x, norm, weight, eps, r.first, r.step, r.theta, r.yarn, post, prec, out,
                                             stream_for(L, x)));
    return 1;
}

static int l_q_kv_norm(lua_State *L)
{
    dsrt_tensor *qa = dsrtL_checktensor(L, 1), *q_weight = opt_tensor(L, 2), *kv = dsrtL_checktensor(L, 3);
    dsrt_tensor *kv_weight = opt_tensor(L, 4);
    float eps = check_float(L, 5);
    rope_args r;
    check_rope_args(L, 6, "q_kv_norm", &r);
    dsrt_nn_post post = check_post(L, 10);
    dsrt_precision prec = dsrtL_checkprecision(L, 11, "nn.q_kv_norm", 1);
    dsrt_tensor *qr, *kv_out;
    if (dsrt_nn_q_kv_norm(qa, q_weight, kv, kv_weight, eps, r.first, r.step, r.theta, r.yarn, post, prec, stream_for(L, qa),
                          &qr, &kv_out))
        return dsrtL_error(L);
    dsrtL_pushtensor(L, qr);
    dsrtL_pushtensor(L, kv_out);
    return 2;
}

static int l_sparse_attention_inverse_rope(lua_State *L)
{
    dsrt_tensor *q = dsrtL_checktensor(L, 1), *pool = dsrtL_checktensor(L, 2), *indices = dsrtL_checktensor(L, 3);
    dsrt_tensor *sink = dsrtL_checktensor(L, 4);
    float scale = check_float(L, 5);
    rope_args r;
    check_rope_args(L, 6, "sparse_attention_inverse_rope", &r);
    dsrt_precision prec = dsrtL_checkprecision(L, 10, "nn.sparse_attention_inverse_rope", 1);
    dsrtL_pushtensor(L, dsrt_nn_sparse_attention_inverse_rope(q, pool, indices, sink, scale, r.first, r.step, r.theta, r.yarn, prec,
                                                              stream_for(L, q)));
    return 1;
}

static int l_sinkhorn(lua_State *L)
{
    dsrt_tensor *mixes = dsrtL_checktensor(L, 1), *scale = dsrtL_checktensor(L, 2), *base = dsrtL_checktensor(L, 3);
    int hc = check_int(L, 4), iters = check_int(L, 5);
    float eps = check_float(L, 6);
    dsrt_tensor *pre, *post, *comb;
    int rc = dsrt_nn_sinkhorn(mixes, scale, base, hc, iters, eps, stream_for(L, mixes), &pre, &post, &comb);
    return push_three(L, rc, pre, post, comb);
}

static int l_hc_pre(lua_State *L)
{
    dsrt_tensor *X = dsrtL_checktensor(L, 1), *fn = dsrtL_checktensor(L, 2), *scale = dsrtL_checktensor(L, 3);
    dsrt_tensor *base = dsrtL_checktensor(L, 4);
    float hc_eps = check_float(L, 5), norm_eps = check_float(L, 6);
    int iters = check_int(L, 7);
    dsrt_precision prec = dsrtL_checkprecision(L, 8, "nn.hc_pre", 1);
    dsrt_tensor *norm_w = opt_tensor(L, 9), *u, *post, *comb;
    int rc = dsrt_nn_hc_pre(X, fn, scale, base, hc_eps, norm_eps, iters, norm_w, prec, stream_for(L, X), &u, &post, &comb);
    return push_three(L, rc, u, post, comb);
}

static int l_hc_post(lua_State *L)
{
    dsrt_tensor *f = dsrtL_checktensor(L, 1), *X = dsrtL_checktensor(L, 2), *post = dsrtL_checktensor(L, 3);
    dsrt_tensor *comb = dsrtL_checktensor(L, 4);
    dsrt_precision prec = dsrtL_checkprecision(L, 5, "nn.hc_post", 1);
    dsrtL_pushtensor(L, dsrt_nn_hc_post(f, X, post, comb, prec, stream_for(L, f)));
    return 1;
}

static int l_hc_head(lua_State *L)
{
    dsrt_tensor *X = dsrtL_checktensor(L, 1), *fn = dsrtL_checktensor(L, 2), *scale = dsrtL_checktensor(L, 3);
    dsrt_tensor *base = dsrtL_checktensor(L, 4);
    float hc_eps = check_float(L, 5), norm_eps = check_float(L, 6);
    dsrt_precision prec = dsrtL_checkprecision(L, 7, "nn.hc_head", 1);
    dsrtL_pushtensor(L, dsrt_nn_hc_head(X, fn, scale, base, hc_eps, norm_eps, opt_tensor(L, 8), prec, stream_for(L, X)));
    return 1;
}

static int l_hc_post_pre(lua_State *L)
{
    dsrt_tensor *f = dsrtL_checktensor(L, 1), *X = dsrtL_checktensor(L, 2), *post = dsrtL_checktensor(L, 3);
    dsrt_tensor *comb = dsrtL_checktensor(L, 4), *fn = dsrtL_checktensor(L, 5), *scale = dsrtL_checktensor(L, 6);
    dsrt_tensor *base = dsrtL_checktensor(L, 7);
    float hc_eps = check_float(L, 8), norm_eps = check_float(L, 9);
    int iters = check_int(L, 10);
    dsrt_precision prec = dsrtL_checkprecision(L, 11, "nn.hc_post_pre", 1);
    dsrt_tensor *norm_w = opt_tensor(L, 12), *Xn, *u, *pn, *cn;
    if (dsrt_nn_hc_post_pre(f, X, post, comb, fn, scale, base, hc_eps, norm_eps, iters, norm_w, prec, stream_for(L, f),
                            &Xn, &u, &pn, &cn))
        return dsrtL_error(L);
    dsrtL_pushtensor(L, Xn);
    dsrtL_pushtensor(L, u);
    dsrtL_pushtensor(L, pn);
    dsrtL_pushtensor(L, cn);
    return 4;
}

static int l_hc_post_head(lua_State *L)
{
    dsrt_tensor *f = dsrtL_checktensor(L, 1), *X = dsrtL_checktensor(L, 2), *post = dsrtL_checktensor(L, 3);
    dsrt_tensor *comb = dsrtL_checktensor(L, 4), *fn = dsrtL_checktensor(L, 5), *scale = dsrtL_checktensor(L, 6);
    dsrt_tensor *base = dsrtL_checktensor(L, 7);
    float hc_eps = check_float(L, 8), norm_eps = check_float(L, 9);
    dsrt_precision prec = dsrtL_checkprecision(L, 10, "nn.hc_post_head", 1);
    dsrt_tensor *Xn, *y;
    if (dsrt_nn_hc_post_head(f, X, post, comb, fn, scale, base, hc_eps, norm_eps, opt_tensor(L, 11), prec,
                             stream_for(L, f), &Xn, &y))
        return dsrtL_error(L);
    dsrtL_pushtensor(L, Xn);
    dsrtL_pushtensor(L, y);
    return 2;
}

static int l_hc_expand(lua_State *L)
{
    dsrt_tensor *e = dsrtL_checktensor(L, 1);
    dsrtL_pushtensor(L, dsrt_nn_hc_expand(e, check_int(L, 2), stream_for(L, e)));
    return 1;
}

void dsrtL_open_nn(lua_State *L)
{
    static const luaL_Reg functions[] = {
        {"rms_norm", l_rms_norm}, {"head_rms_norm", l_head_rms_norm},
        {"quant_roundtrip_q8", l_quant_roundtrip_q8}, {"quant_roundtrip_q4", l_quant_roundtrip_q4},
        {"rope_freqs", l_rope_freqs}, {"rope", l_rope}, {"hadamard128", l_hadamard128},
        {"sparse_attention", l_sparse_attention}, {"norm_rope", l_norm_rope}, {"q_kv_norm", l_q_kv_norm},
        {"sparse_attention_inverse_rope", l_sparse_attention_inverse_rope}, {"sinkhorn", l_sinkhorn}, {"hc_pre", l_hc_pre},
        {"hc_post", l_hc_post}, {"hc_head", l_hc_head}, {"hc_expand", l_hc_expand}, {"hc_post_pre", l_hc_post_pre},
        {"hc_post_head", l_hc_post_head}, {NULL, NULL}};
    luaL_newlib(L, functions);
    lua_setfield(L, -2, "nn");
}
