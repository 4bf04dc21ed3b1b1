/*
 * lsampling.c - the sampler (sampling.h) in Lua: dsrt.core.sample(logits, opts) -> i64 [B] on the
 * logits' device (CPU or CUDA), and dsrt.core.sample_ids(logits, opts) -> a Lua list of the B ids
 * (what generation wants: on CUDA only the ids cross to the host, one copy, no tensor).
 *
 * opts: temperature (0 = greedy, the default), top_k (0 = off), top_p (1 = off), min_p (0 = off),
 * repetition_penalty (1 = off), presence_penalty (0 = off) — each a number for every row or a
 * list of one per row; seed (integer, default 0), step (integer >= 0, default 0); history = {ids}
 * (every row) or {{ids of row 1}, {ids of row 2}, ...}. Every value is checked here or by
 * dsrt_sample_params_check, so a bad option is a Lua error naming it, never a crash.
 * core.sample_async(logits, opts) -> ids, pending: the same draw with nothing waiting for it (ids
 * an i64 [B] tensor on the logits' device, for the next forward; pending:wait() the Lua list, once,
 * once the draw itself has finished, or pending:close() unread: sampling.h dsrt_sample_async).
 * Also core.wall_time(): monotonic seconds, for the generation loop's timings.
 *
 * Speculative decoding (sampling.h): core.sample_probs(logits, opts) -> f32 [B, V] on the logits'
 * device, the distribution the sampler would draw from with the same opts (seed and step play no
 * part); core.sample_verify(p, drafts, {q = f32 [k, V], seed = s, step = t}) -> accepted, next_id:
 * rejection sampling of the k draft ids against the target's p f32 [k + 1, V] (q absent: the drafts
 * were deterministic proposals).
 */
#include <math.h>
#include <stdlib.h>
#include <time.h>
#include "err.h"
#include "lbind.h"
#include "sampling.h"

/* option `key` of the table at 2 for row r of B: a number, or a list of B numbers */
static int opt_number(lua_State *L, const char *key, int64_t r, int64_t B, double def, double *v)
{
    int t = lua_getfield(L, 2, key);
    if (t == LUA_TNIL) { lua_pop(L, 1); *v = def; return 0; }
    if (t == LUA_TTABLE) {
        lua_Integer n = luaL_len(L, -1);
        if (n != B) return luaL_error(L, "sample: %s is a list of %d values for %d rows", key, (int)n, (int)B);
        lua_geti(L, -1, r + 1);
        lua_remove(L, -2);
    }
    if (!lua_isnumber(L, -1)) return luaL_error(L, "sample: %s must be a number, got %s", key, luaL_typename(L, -1));
    *v = lua_tonumber(L, -1);
    lua_pop(L, 1);
    return 0;
}

static int64_t opt_integer(lua_State *L, const char *key, int64_t def)
{
    int t = lua_getfield(L, 2, key);
    int64_t v = def;
    if (t != LUA_TNIL) {
        int ok;
        v = lua_tointegerx(L, -1, &ok);
        if (!ok) return luaL_error(L, "sample: %s must be an integer, got %s", key, lua_tostring(L, -1) ? lua_tostring(L, -1) : luaL_typename(L, -1));
    }
    lua_pop(L, 1);
    return v;
}

/* a double as f32 without undefined behaviour: out of range becomes +-inf, NaN stays NaN */
static float to_f32(double v)
{
    if (v > 3.4028234663852886e38) return (float)INFINITY;
    if (v < -3.4028234663852886e38) return -(float)INFINITY;
    return (float)v;
}

#define PENDING "dsrt.sample_pending"

typedef struct { dsrt_sample_params *params; int64_t *off, *ids; } sample_bufs;

static int bufs_gc(lua_State *L)
{
    sample_bufs *b = lua_touserdata(L, 1);
    free(b->params); free(b->off); free(b->ids);
    b->params = NULL; b->off = b->ids = NULL;
    return 0;
}

enum { TO_TENSOR, TO_LIST, TO_PROBS, TO_ASYNC };

static int sample_call(lua_State *L, int mode)
{
    dsrt_tensor *logits = dsrtL_checktensor(L, 1);
    if (lua_isnoneornil(L, 2)) { lua_settop(L, 1); lua_newtable(L); }
    luaL_checktype(L, 2, LUA_TTABLE);
    if (logits->dtype != DSRT_F32 || (logits->ndim != 1 && logits->ndim != 2))
        return luaL_error(L, "sample: logits must be an f32 tensor [B, V] or [V]");
    int64_t B = logits->ndim == 2 ? logits->shape[0] : 1, V = logits->shape[logits->ndim - 1];
    if (B < 1 || V < 1) return luaL_error(L, "sample: logits are empty");
    /* buffers owned by a userdata, so that an error below frees them */
    sample_bufs *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->params = NULL; b->off = b->ids = NULL;
    lua_newtable(L);
    lua_pushcfunction(L, bufs_gc);
    lua_setfield(L, -2, "__gc");
    lua_setmetatable(L, -2);
    b->params = malloc((size_t)B * sizeof *b->params);
    b->off = malloc((size_t)(B + 1) * sizeof *b->off);
    if (!b->params || !b->off) return luaL_error(L, "sample: out of memory");
    for (int64_t r = 0; r < B; r++) {
        double t, k, tp, mp, rp, pp;
        opt_number(L, "temperature", r, B, 0.0, &t);
        opt_number(L, "top_k", r, B, 0.0, &k);
        opt_number(L, "top_p", r, B, 1.0, &tp);
        opt_number(L, "min_p", r, B, 0.0, &mp);
        opt_number(L, "repetition_penalty", r, B, 1.0, &rp);
        opt_number(L, "presence_penalty", r, B, 0.0, &pp);
        if (k != floor(k) || k < 0 || k > 9.2e18) return luaL_error(L, "sample: top_k must be an integer >= 0, got %f", k);
        dsrt_sample_params *p = &b->params[r];
        p->temperature = to_f32(t); p->top_k = (int64_t)k; p->top_p = to_f32(tp); p->min_p = to_f32(mp);
        p->repetition_penalty = to_f32(rp); p->presence_penalty = to_f32(pp);
        if (dsrt_sample_params_check(p, B > 1 ? r : -1)) return dsrtL_error(L);
    }
    int64_t seed = opt_integer(L, "seed", 0), step = opt_integer(L, "step", 0);
    if (step < 0) return luaL_error(L, "sample: step must be >= 0, got %I", (lua_Integer)step);
    /* history: {ids} for every row, or one list per row */
    int ht = lua_getfield(L, 2, "history");
    int64_t total = 0;
    if (ht != LUA_TNIL && ht != LUA_TTABLE) return luaL_error(L, "sample: history must be a list of ids or a list of lists");
    int per_row = 0;
    if (ht == LUA_TTABLE) {
        lua_geti(L, -1, 1);
        per_row = lua_istable(L, -1);
        lua_pop(L, 1);
        if (per_row && luaL_len(L, -1) != B)
            return luaL_error(L, "sample: history has %d lists for %d rows", (int)luaL_len(L, -1), (int)B);
        if (per_row) {
            for (int64_t r = 0; r < B; r++) {
                if (lua_geti(L, -1, r + 1) != LUA_TTABLE) return luaL_error(L, "sample: history[%d] must be a list of ids", (int)(r + 1));
                total += luaL_len(L, -1);
                lua_pop(L, 1);
            }
        } else total = luaL_len(L, -1) * B;
    }
    b->ids = malloc((size_t)(total + B) * sizeof *b->ids); /* the history, then room for the sampled ids */
    if (!b->ids) return luaL_error(L, "sample: out of memory");
    int64_t pos = 0;
    for (int64_t r = 0; r < B; r++) {
        b->off[r] = pos;
        if (ht != LUA_TTABLE) continue;
        if (per_row) lua_geti(L, -1, r + 1); else lua_pushvalue(L, -1);
        int64_t n = luaL_len(L, -1);
        for (int64_t j = 1; j <= n; j++) {
            lua_geti(L, -1, j);
            int ok;
            lua_Integer id = lua_tointegerx(L, -1, &ok);
            if (!ok) return luaL_error(L, "sample: history id %d of row %d is not an integer", (int)j, (int)(r + 1));
            if (id < 0 || id >= V)
                return luaL_error(L, "sample: history id %I of row %d is outside the vocabulary [0, %I)", id, (int)(r + 1), (lua_Integer)V);
            b->ids[pos++] = id;
            lua_pop(L, 1);
        }
        lua_pop(L, 1);
    }
    b->off[B] = pos;
    lua_pop(L, 1);
    dsrt_stream *s = dsrtL_current_stream(L, logits->device);
    if (mode == TO_PROBS) {
        dsrtL_pushtensor(L, dsrt_sample_probs(logits, b->params, b->off, b->ids, s));
        return 1;
    }
    if (mode == TO_ASYNC) {
        dsrt_sample_pending **box = lua_newuserdatauv(L, sizeof *box, 0);
        *box = NULL;
        luaL_setmetatable(L, PENDING);
        dsrt_tensor *ids = NULL;
        if (dsrt_sample_async(logits, b->params, b->off, b->ids, (uint64_t)seed, (uint64_t)step, s, &ids, box))
            return dsrtL_error(L);
        dsrtL_pushtensor(L, ids);
        lua_insert(L, -2);
        return 2;
    }
    if (mode == TO_TENSOR) {
        dsrtL_pushtensor(L, dsrt_sample(logits, b->params, b->off, b->ids, (uint64_t)seed, (uint64_t)step, s));
        return 1;
    }
    int64_t *got = b->ids + total;
    if (dsrt_sample_host(logits, b->params, b->off, b->ids, (uint64_t)seed, (uint64_t)step, s, got)) return dsrtL_error(L);
    lua_createtable(L, (int)B, 0);
    for (int64_t r = 0; r < B; r++) {
        lua_pushinteger(L, (lua_Integer)got[r]);
        lua_rawseti(L, -2, r + 1);
    }
    return 1;
}

/* ---- the pending read of an asynchronous draw: p:wait() -> the list of ids, once ---- */

static dsrt_sample_pending *check_pending(lua_State *L)
{
    dsrt_sample_pending **box = luaL_checkudata(L, 1, PENDING);
    if (!*box) luaL_error(L, "sample_async: this draw was already read (wait() once)");
    return *box;
}

static int pending_wait(lua_State *L)
{
    dsrt_sample_pending *p = check_pending(L), **box = lua_touserdata(L, 1);
    int64_t B = dsrt_sample_pending_rows(p);
    int64_t *ids = lua_newuserdatauv(L, (size_t)B * sizeof *ids, 0);
    int rc = dsrt_sample_wait(p, ids);
    dsrt_sample_pending_free(p); /* read or failed, the draw is over either way */
    *box = NULL;
    if (rc) return dsrtL_error(L);
    lua_createtable(L, (int)B, 0);
    for (int64_t r = 0; r < B; r++) {
        lua_pushinteger(L, (lua_Integer)ids[r]);
        lua_rawseti(L, -2, r + 1);
    }
    return 1;
}

static int pending_gc(lua_State *L)
{
    dsrt_sample_pending **box = luaL_checkudata(L, 1, PENDING);
    dsrt_sample_pending_free(*box);
    *box = NULL;
    return 0;
}

static int l_sample(lua_State *L) { return sample_call(L, TO_TENSOR); }
static int l_sample_async(lua_State *L) { return sample_call(L, TO_ASYNC); }
static int l_sample_ids(lua_State *L) { return sample_call(L, TO_LIST); }
static int l_sample_probs(lua_State *L) { return sample_call(L, TO_PROBS); }

/* sample_verify(p, drafts, {q = tensor, seed = s, step = t}) -> accepted, next_id */
static int l_sample_verify(lua_State *L)
{
    dsrt_tensor *p = dsrtL_checktensor(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    if (lua_isnoneornil(L, 3)) { lua_settop(L, 2); lua_newtable(L); }
    luaL_checktype(L, 3, LUA_TTABLE);
    lua_Integer k = luaL_len(L, 2);
    if (k > DSRT_VERIFY_MAX_K)
        return luaL_error(L, "sample_verify: %d drafts; one verification takes at most %d", (int)k, DSRT_VERIFY_MAX_K);
    int64_t drafts[DSRT_VERIFY_MAX_K];
    for (lua_Integer i = 1; i <= k; i++) {
        lua_geti(L, 2, i);
        int ok;
        drafts[i - 1] = lua_tointegerx(L, -1, &ok);
        if (!ok) return luaL_error(L, "sample_verify: draft %d is not an integer id", (int)i);
        lua_pop(L, 1);
    }
    dsrt_tensor *q = NULL;
    if (lua_getfield(L, 3, "q") != LUA_TNIL) q = dsrtL_checktensor(L, -1);
    lua_pop(L, 1); /* the options table keeps q alive */
    lua_settop(L, 3);
    lua_pushvalue(L, 3);
    lua_replace(L, 2); /* opt_integer reads the table at 2 */
    int64_t seed = opt_integer(L, "seed", 0), step = opt_integer(L, "step", 0);
    if (step < 0) return luaL_error(L, "sample_verify: step must be >= 0, got %I", (lua_Integer)step);
    int64_t accepted = 0, next = 0;
    if (dsrt_sample_verify(p, q, drafts, (int64_t)k, (uint64_t)seed, (uint64_t)step, dsrtL_current_stream(L, p->device),
                           &accepted, &next))
        return dsrtL_error(L);
    lua_pushinteger(L, (lua_Integer)accepted);
    lua_pushinteger(L, (lua_Integer)next);
    return 2;
}

static int l_wall_time(lua_State *L)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    lua_pushnumber(L, (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec);
    return 1;
}

void dsrtL_open_sampling(lua_State *L)
{
    if (luaL_newmetatable(L, PENDING)) {
        static const luaL_Reg meta[] = {{"__gc", pending_gc}, {"__close", pending_gc}, {NULL, NULL}};
        static const luaL_Reg methods[] = {{"wait", pending_wait}, {"close", pending_gc}, {NULL, NULL}};
        luaL_setfuncs(L, meta, 0);
        luaL_newlib(L, methods);
        lua_setfield(L, -2, "__index");
    }
    lua_pop(L, 1);
    static const luaL_Reg functions[] = {{"sample", l_sample},           {"sample_ids", l_sample_ids},
                                         {"sample_async", l_sample_async}, {"sample_probs", l_sample_probs},
                                         {"sample_verify", l_sample_verify}, {"wall_time", l_wall_time},
                                         {NULL, NULL}};
    luaL_setfuncs(L, functions, 0);
}
