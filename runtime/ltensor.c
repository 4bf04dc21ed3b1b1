/*
 * ltensor.c - tensors in Lua: creation, views, arithmetic, conversion, printing.
 *
 * Lua is 1-based, so dimensions, rows (t[i]) and narrow's start count from 1 here and are turned
 * into the core's 0-based numbers at this boundary and nowhere else. Values that are data rather
 * than positions (argmax results, token ids) stay 0-based, as in the checkpoint and the tokenizer.
 * Every op runs on the current stream of its operands' device (lstream.c).
 */
#include <math.h>
#include <stdio.h>
#include <string.h>
#include "err.h"
#include "lbind.h"
#include "ops.h"

typedef struct { dsrt_tensor *t; } tensor_box;

int dsrtL_error(lua_State *L) { return luaL_error(L, "%s", dsrt_err_msg()); }

dsrt_tensor *dsrtL_totensor(lua_State *L, int idx)
{
    tensor_box *b = luaL_testudata(L, idx, DSRT_TENSOR_MT);
    if (b && !b->t) luaL_error(L, "tensor was closed");
    return b ? b->t : NULL;
}

dsrt_tensor *dsrtL_checktensor(lua_State *L, int idx)
{
    tensor_box *b = luaL_checkudata(L, idx, DSRT_TENSOR_MT);
    if (!b->t) luaL_error(L, "tensor was closed");
    return b->t;
}

dsrt_tensor *dsrtL_pushtensor(lua_State *L, dsrt_tensor *t)
{
    if (!t) dsrtL_error(L);
    tensor_box *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->t = t;
    luaL_setmetatable(L, DSRT_TENSOR_MT);
    return t;
}

static dsrt_stream *stream_of(lua_State *L, const dsrt_tensor *t) { return dsrtL_current_stream(L, t->device); }

/* ---- arguments ---- */

/* a 1-based dimension, negative counting from the end, to a 0-based one */
static int check_dim(lua_State *L, int idx, const dsrt_tensor *t)
{
    lua_Integer d = luaL_checkinteger(L, idx);
    if (d < 0) d += t->ndim + 1;
    if (d < 1 || d > t->ndim) {
        char buf[96];
        luaL_error(L, "dimension %d out of range for %s (1..%d)", (int)luaL_checkinteger(L, idx),
                   dsrt_tensor_str(t, buf, sizeof buf), t->ndim);
    }
    return (int)d - 1;
}

/* A shape given as a table {2, 3} or as integers 2, 3 from idx on; returns the index after it. */
static int check_shape(lua_State *L, int idx, int *ndim, int64_t *shape)
{
    int n = 0;
    if (lua_istable(L, idx)) {
        n = (int)luaL_len(L, idx);
        if (n > DSRT_MAX_DIMS) luaL_error(L, "shape has %d dimensions (at most %d)", n, DSRT_MAX_DIMS);
        for (int i = 1; i <= n; i++) {
            lua_geti(L, idx, i);
            int ok;
            lua_Integer v = lua_tointegerx(L, -1, &ok);
            if (!ok) luaL_error(L, "shape element %d is not an integer", i);
            shape[i - 1] = v;
            lua_pop(L, 1);
        }
        idx++;
    } else {
        while (lua_type(L, idx) == LUA_TNUMBER) {
            if (n == DSRT_MAX_DIMS) luaL_error(L, "shape has more than %d dimensions", DSRT_MAX_DIMS);
            shape[n++] = luaL_checkinteger(L, idx++);
        }
    }
    *ndim = n;
    return idx;
}

typedef struct {
    int has_dtype, has_device;
    dsrt_dtype dtype;
    int device;
} tensor_opts;

static int check_dtype_name(lua_State *L, const char *name)
{
    dsrt_dtype dt;
    if (dsrt_dtype_from_name(name, &dt)) dsrtL_error(L);
    return (int)dt;
}

/* the name the running C function was called by, for errors about its options */
static const char *function_name(lua_State *L)
{
    lua_Debug ar;
    return lua_getstack(L, 0, &ar) && lua_getinfo(L, "n", &ar) && ar.name ? ar.name : "?";
}

/* Pushes field `key` of the options table at idx (nil when absent) after checking its type; the
 * error names the function and the option, since the table is not itself an argument position. */
static int opt_field(lua_State *L, int idx, const char *key, int type)
{
    int t = lua_getfield(L, idx, key);
    if (t != LUA_TNIL && t != type)
        luaL_error(L, "%s: option '%s' must be a %s, got %s", function_name(L), key, lua_typename(L, type),
                   luaL_typename(L, -1));
    return t != LUA_TNIL;
}

static tensor_opts check_opts(lua_State *L, int idx)
{
    tensor_opts o = {0, 0, DSRT_F32, DSRT_CPU};
    if (lua_isnoneornil(L, idx)) return o;
    luaL_checktype(L, idx, LUA_TTABLE);
    if (opt_field(L, idx, "dtype", LUA_TSTRING)) o.has_dtype = 1, o.dtype = (dsrt_dtype)check_dtype_name(L, lua_tostring(L, -1));
    if (lua_getfield(L, idx, "device") != LUA_TNIL) {
        if (!lua_isinteger(L, -1) && lua_type(L, -1) != LUA_TSTRING)
            luaL_error(L, "%s: option 'device' must be a string or an integer, got %s", function_name(L), luaL_typename(L, -1));
        o.has_device = 1;
        o.device = dsrtL_checkdevice(L, lua_absindex(L, -1), DSRT_CPU);
    }
    lua_pop(L, 2);
    return o;
}

static double opt_number(lua_State *L, int idx, const char *key, double def)
{
    if (lua_isnoneornil(L, idx)) return def;
    lua_getfield(L, idx, key);
    double v = luaL_optnumber(L, -1, def);
    lua_pop(L, 1);
    return v;
}

static dsrt_tensor *new_tensor(lua_State *L, dsrt_dtype dt, int ndim, const int64_t *shape, int device)
{
    return dsrtL_pushtensor(L, dsrt_tensor_new(dt, ndim, shape, device, dsrtL_current_stream(L, device)));
}

/* ---- creation ---- */

/* walks nested tables: shape from the first elements, and the dtype the leaves call for */
static void scan_nested(lua_State *L, int idx, int depth, int *ndim, int64_t *shape, int *kinds)
{
    if (lua_istable(L, idx)) {
        lua_Integer n = luaL_len(L, idx);
        if (depth >= DSRT_MAX_DIMS) luaL_error(L, "dsrt.tensor: more than %d levels of nesting", DSRT_MAX_DIMS);
        if (depth == *ndim) shape[(*ndim)++] = n;
        for (lua_Integer i = 1; i <= n; i++) {
            lua_geti(L, idx, i);
            scan_nested(L, lua_gettop(L), depth + 1, ndim, shape, kinds);
            lua_pop(L, 1);
        }
        return;
    }
    int t = lua_type(L, idx);
    if (t == LUA_TBOOLEAN) *kinds |= 1;
    else if (t == LUA_TNUMBER) *kinds |= lua_isinteger(L, idx) ? 2 : 4;
    else luaL_error(L, "dsrt.tensor: element is a %s, expected a number or a boolean", luaL_typename(L, idx));
}

static int64_t fill_nested(lua_State *L, int idx, int depth, const dsrt_tensor *t, int64_t pos)
{
    if (depth == t->ndim) {
        if (lua_istable(L, idx)) luaL_error(L, "dsrt.tensor: ragged nesting (a table where a number belongs)");
        void *data = t->storage->data;
        if (lua_isboolean(L, idx)) dsrt_store_i64(data, t->dtype, pos, lua_toboolean(L, idx));
        else if (dsrt_dtype_is_float(t->dtype)) dsrt_store_f32(data, t->dtype, pos, (float)lua_tonumber(L, idx));
        else if (lua_isinteger(L, idx)) dsrt_store_i64(data, t->dtype, pos, lua_tointeger(L, idx));
        else dsrt_store_f32(data, t->dtype, pos, (float)lua_tonumber(L, idx));
        return pos + 1;
    }
    if (!lua_istable(L, idx) || luaL_len(L, idx) != t->shape[depth])
        luaL_error(L, "dsrt.tensor: ragged nesting (level %d should have %d elements)", depth + 1, (int)t->shape[depth]);
    for (lua_Integer i = 1; i <= t->shape[depth]; i++) {
        lua_geti(L, idx, i);
        pos = fill_nested(L, lua_gettop(L), depth + 1, t, pos);
        lua_pop(L, 1);
    }
    return pos;
}

/* dsrt.tensor(data [, {dtype=, device=}]) */
static int l_tensor(lua_State *L)
{
    tensor_opts o = check_opts(L, 2);
    int ndim = 0, kinds = 0;
    int64_t shape[DSRT_MAX_DIMS];
    luaL_argexpected(L, lua_istable(L, 1) || lua_isnumber(L, 1) || lua_isboolean(L, 1), 1, "table, number or boolean");
    scan_nested(L, 1, 0, &ndim, shape, &kinds);
    if ((kinds & 1) && (kinds & 6)) luaL_error(L, "dsrt.tensor: mixes booleans and numbers");
    dsrt_dtype dt = o.has_dtype ? o.dtype : (kinds & 4) ? DSRT_F32 : (kinds & 2) ? DSRT_I64 : (kinds & 1) ? DSRT_BOOL : DSRT_F32;
    dsrt_tensor *t = new_tensor(L, dt, ndim, shape, DSRT_CPU);
    if (dt == DSRT_FP4E2M1) memset(t->storage->data, 0, t->storage->nbytes);
    fill_nested(L, 1, 0, t, 0);
    if (o.device != DSRT_CPU) {
        dsrtL_pushtensor(L, dsrt_tensor_to(t, o.device, dt, dsrtL_current_stream(L, o.device), 0));
    }
    return 1;
}

static int filled(lua_State *L, double value, int value_given_at)
{
    int ndim;
    int64_t shape[DSRT_MAX_DIMS];
    int next = check_shape(L, 1, &ndim, shape);
    if (value_given_at) value = luaL_checknumber(L, next++);
    tensor_opts o = check_opts(L, next);
    dsrt_tensor *t = new_tensor(L, o.dtype, ndim, shape, o.device);
    if (dsrt_op_fill(t, value, dsrtL_current_stream(L, o.device))) return dsrtL_error(L);
    return 1;
}

static int l_zeros(lua_State *L) { return filled(L, 0, 0); }
static int l_ones(lua_State *L) { return filled(L, 1, 0); }
static int l_full(lua_State *L) { return filled(L, 0, 1); }

static int l_empty(lua_State *L)
{
    int ndim;
    int64_t shape[DSRT_MAX_DIMS];
    tensor_opts o = check_opts(L, check_shape(L, 1, &ndim, shape));
    new_tensor(L, o.dtype, ndim, shape, o.device);
    return 1;
}

/* dsrt.arange(stop) | dsrt.arange(start, stop [, step]) [, opts] */
static int l_arange(lua_State *L)
{
    int nnum = 0;
    while (nnum < 3 && lua_type(L, nnum + 1) == LUA_TNUMBER) nnum++;
    if (nnum == 0) luaL_error(L, "dsrt.arange: expected (stop) or (start, stop [, step])");
    int all_int = 1;
    for (int i = 1; i <= nnum; i++) all_int &= lua_isinteger(L, i);
    double start = nnum > 1 ? lua_tonumber(L, 1) : 0, stop = lua_tonumber(L, nnum > 1 ? 2 : 1);
    double step = nnum > 2 ? lua_tonumber(L, 3) : 1;
    if (step == 0 || !isfinite(start) || !isfinite(stop) || !isfinite(step)) luaL_error(L, "dsrt.arange: invalid range");
    tensor_opts o = check_opts(L, nnum + 1);
    double count = ceil((stop - start) / step);
    int64_t n = count > 0 ? (int64_t)count : 0;
    dsrt_tensor *t = new_tensor(L, o.has_dtype ? o.dtype : all_int ? DSRT_I64 : DSRT_F32, 1, &n, o.device);
    if (dsrt_op_arange(t, start, step, dsrtL_current_stream(L, o.device))) return dsrtL_error(L);
    return 1;
}

/* the global generator: a seed and how many numbers have been drawn from it */
#define RNG_KEY "dsrt.rng"

static void rng_draw(lua_State *L, int64_t count, uint64_t *seed, uint64_t *offset)
{
    luaL_getsubtable(L, LUA_REGISTRYINDEX, RNG_KEY);
    lua_getfield(L, -1, "seed");
    lua_getfield(L, -2, "offset");
    *seed = (uint64_t)lua_tointeger(L, -2);
    *offset = (uint64_t)lua_tointeger(L, -1);
    lua_pushinteger(L, (lua_Integer)(*offset + (uint64_t)count));
    lua_setfield(L, -4, "offset");
    lua_pop(L, 3);
}

static int l_manual_seed(lua_State *L)
{
    lua_Integer seed = luaL_checkinteger(L, 1);
    luaL_getsubtable(L, LUA_REGISTRYINDEX, RNG_KEY);
    lua_pushinteger(L, seed);
    lua_setfield(L, -2, "seed");
    lua_pushinteger(L, 0);
    lua_setfield(L, -2, "offset");
    return 0;
}

/* dsrt.rand(shape [, {seed=, low=, high=, dtype=, device=}]), dsrt.randn(shape [, {seed=, mean=, std=, ...}]) */
static int random_tensor(lua_State *L, int normal)
{
    int ndim;
    int64_t shape[DSRT_MAX_DIMS];
    int oi = check_shape(L, 1, &ndim, shape);
    tensor_opts o = check_opts(L, oi);
    if (!dsrt_dtype_is_float(o.dtype)) luaL_error(L, "dsrt.%s: dtype %s is not a float dtype", normal ? "randn" : "rand", dsrt_dtype_name(o.dtype));
    double a = normal ? opt_number(L, oi, "mean", 0) : opt_number(L, oi, "low", 0);
    double b = normal ? opt_number(L, oi, "std", 1) : opt_number(L, oi, "high", 1);
    dsrt_tensor *t = new_tensor(L, o.dtype, ndim, shape, o.device);
    uint64_t seed, offset = 0;
    int has_seed = 0;
    if (!lua_isnoneornil(L, oi)) {
        has_seed = opt_field(L, oi, "seed", LUA_TNUMBER);
        if (has_seed && !lua_isinteger(L, -1)) luaL_error(L, "option 'seed' must be an integer");
        if (has_seed) seed = (uint64_t)lua_tointeger(L, -1);
        lua_pop(L, 1);
    }
    if (!has_seed) rng_draw(L, dsrt_tensor_numel(t), &seed, &offset);
    if (dsrt_op_rand(t, seed, offset, normal, a, b, dsrtL_current_stream(L, o.device))) return dsrtL_error(L);
    return 1;
}

static int l_rand(lua_State *L) { return random_tensor(L, 0); }
static int l_randn(lua_State *L) { return random_tensor(L, 1); }

/* ---- reading values ---- */

/* the tensor's values on the CPU (itself when it already is there); pushed to keep it alive */
static dsrt_tensor *host_copy(lua_State *L, dsrt_tensor *t)
{
    return dsrtL_pushtensor(L, dsrt_tensor_to(t, DSRT_CPU, t->dtype, stream_of(L, t), 0));
}

static void push_element(lua_State *L, const dsrt_tensor *t, int64_t index)
{
    if (t->dtype == DSRT_BOOL) lua_pushboolean(L, dsrt_load_i64(t->storage->data, t->dtype, index) != 0);
    else if (dsrt_dtype_is_float(t->dtype)) lua_pushnumber(L, dsrt_load_f32(t->storage->data, t->dtype, index));
    else lua_pushinteger(L, dsrt_load_i64(t->storage->data, t->dtype, index));
}

static void push_nested(lua_State *L, const dsrt_tensor *t, int depth, int64_t index)
{
    if (depth == t->ndim) {
        push_element(L, t, index);
        return;
    }
    lua_createtable(L, (int)t->shape[depth], 0);
    for (int64_t i = 0; i < t->shape[depth]; i++) {
        push_nested(L, t, depth + 1, index + i * t->stride[depth]);
        lua_rawseti(L, -2, i + 1);
    }
}

static int l_totable(lua_State *L)
{
    dsrt_tensor *h = host_copy(L, dsrtL_checktensor(L, 1));
    push_nested(L, h, 0, h->offset);
    return 1;
}

static int l_item(lua_State *L)
{
    dsrt_tensor *t = dsrtL_checktensor(L, 1);
    if (dsrt_tensor_numel(t) != 1) {
        char buf[96];
        luaL_error(L, "item: %s has %d elements, not 1", dsrt_tensor_str(t, buf, sizeof buf), (int)dsrt_tensor_numel(t));
    }
    dsrt_tensor *h = host_copy(L, t);
    push_element(L, h, h->offset);
    return 1;
}

/* ---- printing, like torch: values with summarisation, then dtype and device ---- */

enum { EDGE = 3, SUMMARISE_ABOVE = 1000 };

typedef struct {
    const dsrt_tensor *t;
    int summarise, fmt, width; /* fmt: 0 integer-valued floats, 1 fixed, 2 scientific, 3 ints, 4 bools */
} printer;

static int shown(const printer *p, int depth, int64_t i)
{
    int64_t n = p->t->shape[depth];
    return !p->summarise || n <= 2 * EDGE || i < EDGE || i >= n - EDGE;
}

static int format_element(const printer *p, int64_t index, char *buf, size_t len)
{
    const dsrt_tensor *t = p->t;
    if (p->fmt == 4) return snprintf(buf, len, "%s", dsrt_load_i64(t->storage->data, t->dtype, index) ? "true" : "false");
    if (p->fmt == 3) return snprintf(buf, len, "%lld", (long long)dsrt_load_i64(t->storage->data, t->dtype, index));
    float v = dsrt_load_f32(t->storage->data, t->dtype, index);
    if (isnan(v)) return snprintf(buf, len, "nan");
    if (isinf(v)) return snprintf(buf, len, v > 0 ? "inf" : "-inf");
    return snprintf(buf, len, p->fmt == 0 ? "%.0f." : p->fmt == 1 ? "%.4f" : "%.4e", (double)v);
}

/* visits every printed float: its range chooses the format */
static void scan_printed(printer *p, int depth, int64_t index, double *maxabs, double *minabs, int *integral)
{
    const dsrt_tensor *t = p->t;
    if (depth == t->ndim) {
        double v = dsrt_load_f32(t->storage->data, t->dtype, index);
        if (!isfinite(v)) return;
        double a = fabs(v);
        if (a > *maxabs) *maxabs = a;
        if (a > 0 && a < *minabs) *minabs = a;
        if (v != floor(v)) *integral = 0;
        return;
    }
    for (int64_t i = 0; i < t->shape[depth]; i++)
        if (shown(p, depth, i)) scan_printed(p, depth + 1, index + i * t->stride[depth], maxabs, minabs, integral);
}

static void measure_width(printer *p, int depth, int64_t index)
{
    const dsrt_tensor *t = p->t;
    if (depth == t->ndim) {
        char buf[64];
        int w = format_element(p, index, buf, sizeof buf);
        if (w > p->width) p->width = w;
        return;
    }
    for (int64_t i = 0; i < t->shape[depth]; i++)
        if (shown(p, depth, i)) measure_width(p, depth + 1, index + i * t->stride[depth]);
}

static void print_level(luaL_Buffer *b, const printer *p, int depth, int64_t index, int indent)
{
    const dsrt_tensor *t = p->t;
    char buf[64];
    if (depth == t->ndim) {
        int w = format_element(p, index, buf, sizeof buf);
        for (int i = w; i < p->width; i++) luaL_addchar(b, ' ');
        luaL_addstring(b, buf);
        return;
    }
    luaL_addchar(b, '[');
    int first = 1;
    for (int64_t i = 0; i < t->shape[depth]; i++) {
        if (!shown(p, depth, i)) continue;
        if (!first) {
            luaL_addchar(b, ',');
            if (depth == t->ndim - 1) {
                luaL_addchar(b, ' ');
            } else {
                for (int k = depth; k < t->ndim - 1; k++) luaL_addchar(b, '\n');
                for (int k = 0; k < indent + depth + 1; k++) luaL_addchar(b, ' ');
            }
        }
        if (p->summarise && t->shape[depth] > 2 * EDGE && i == t->shape[depth] - EDGE) {
            luaL_addstring(b, "...,");
            if (depth == t->ndim - 1) luaL_addchar(b, ' ');
            else {
                luaL_addchar(b, '\n');
                for (int k = 0; k < indent + depth + 1; k++) luaL_addchar(b, ' ');
            }
        }
        print_level(b, p, depth + 1, index + i * t->stride[depth], indent);
        first = 0;
    }
    luaL_addchar(b, ']');
}

static int l_tostring(lua_State *L)
{
    tensor_box *box = luaL_checkudata(L, 1, DSRT_TENSOR_MT);
    if (!box->t) {
        lua_pushliteral(L, "tensor(closed)");
        return 1;
    }
    dsrt_tensor *t = box->t;
    dsrt_tensor *h = host_copy(L, t);
    printer p = {h, dsrt_tensor_numel(h) > SUMMARISE_ABOVE, 3, 0};
    char dev[16], shape[DSRT_SHAPE_BUF];
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    luaL_addstring(&b, "tensor(");
    if (dsrt_tensor_numel(h) == 0) {
        luaL_addstring(&b, "[], size=");
        luaL_addstring(&b, dsrt_shape_str(h->ndim, h->shape, shape, sizeof shape));
    } else {
        if (h->dtype == DSRT_BOOL) p.fmt = 4;
        else if (dsrt_dtype_is_float(h->dtype)) {
            double maxabs = 0, minabs = INFINITY;
            int integral = 1;
            p.fmt = 1;
            scan_printed(&p, 0, h->offset, &maxabs, &minabs, &integral);
            p.fmt = integral && maxabs < 1e8 ? 0 : (maxabs >= 1e8 || minabs < 1e-4) ? 2 : 1;
        }
        measure_width(&p, 0, h->offset);
        print_level(&b, &p, 0, h->offset, 7);
    }
    lua_pushfstring(L, ", dtype=%s, device=%s)", dsrt_dtype_name(t->dtype), dsrt_device_str(t->device, dev));
    luaL_addvalue(&b);
    luaL_pushresult(&b);
    return 1;
}

/* ---- properties ---- */

static void push_shape(lua_State *L, const dsrt_tensor *t, const int64_t *dims)
{
    lua_createtable(L, t->ndim, 0);
    for (int d = 0; d < t->ndim; d++) {
        lua_pushinteger(L, dims[d]);
        lua_rawseti(L, -2, d + 1);
    }
}

static int l_numel(lua_State *L) { lua_pushinteger(L, dsrt_tensor_numel(dsrtL_checktensor(L, 1))); return 1; }
static int l_dim(lua_State *L) { lua_pushinteger(L, dsrtL_checktensor(L, 1)->ndim); return 1; }
static int l_is_contiguous(lua_State *L) { lua_pushboolean(L, dsrt_tensor_is_contiguous(dsrtL_checktensor(L, 1))); return 1; }

static int l_nbytes(lua_State *L)
{
    dsrt_tensor *t = dsrtL_checktensor(L, 1);
    lua_pushinteger(L, (lua_Integer)dsrt_dtype_nbytes(t->dtype, dsrt_tensor_numel(t)));
    return 1;
}

static int size_or_stride(lua_State *L, int strides)
{
    dsrt_tensor *t = dsrtL_checktensor(L, 1);
    if (lua_isnoneornil(L, 2)) push_shape(L, t, strides ? t->stride : t->shape);
    else lua_pushinteger(L, (strides ? t->stride : t->shape)[check_dim(L, 2, t)]);
    return 1;
}

static int l_size(lua_State *L) { return size_or_stride(L, 0); }
static int l_stride(lua_State *L) { return size_or_stride(L, 1); }

static int l_len(lua_State *L)
{
    dsrt_tensor *t = dsrtL_checktensor(L, 1);
    if (t->ndim == 0) luaL_error(L, "# of a 0-d tensor");
    lua_pushinteger(L, t->shape[0]);
    return 1;
}

/* ---- views ---- */

static int l_narrow(lua_State *L)
{
    dsrt_tensor *t = dsrtL_checktensor(L, 1);
    int dim = check_dim(L, 2, t);
    dsrtL_pushtensor(L, dsrt_tensor_narrow(t, dim, luaL_checkinteger(L, 3) - 1, luaL_checkinteger(L, 4)));
    return 1;
}

static int64_t row_index(lua_State *L, int idx, const dsrt_tensor *t, int dim)
{
    lua_Integer i = luaL_checkinteger(L, idx);
    return i < 0 ? t->shape[dim] + i : i - 1; /* -1 is the last */
}

static int l_select(lua_State *L)
{
    dsrt_tensor *t = dsrtL_checktensor(L, 1);
    int dim = check_dim(L, 2, t);
    dsrtL_pushtensor(L, dsrt_tensor_select(t, dim, row_index(L, 3, t, dim)));
    return 1;
}

static int l_transpose(lua_State *L)
{
    dsrt_tensor *t = dsrtL_checktensor(L, 1);
    if (lua_isnoneornil(L, 2) && t->ndim == 2) {
        dsrtL_pushtensor(L, dsrt_tensor_transpose(t, 0, 1));
        return 1;
    }
    int d0 = check_dim(L, 2, t), d1 = check_dim(L, 3, t);
    dsrtL_pushtensor(L, dsrt_tensor_transpose(t, d0, d1));
    return 1;
}

static int l_permute(lua_State *L)
{
    dsrt_tensor *t = dsrtL_checktensor(L, 1);
    int ndim;
    int64_t dims[DSRT_MAX_DIMS];
    int perm[DSRT_MAX_DIMS];
    check_shape(L, 2, &ndim, dims);
    if (ndim != t->ndim) luaL_error(L, "permute: %d dimensions given for a %d-d tensor", ndim, t->ndim);
    for (int d = 0; d < ndim; d++) perm[d] = (int)(dims[d] < 0 ? dims[d] + ndim : dims[d] - 1);
    dsrtL_pushtensor(L, dsrt_tensor_permute(t, perm));
    return 1;
}

static int l_view(lua_State *L)
{
    dsrt_tensor *t = dsrtL_checktensor(L, 1);
    int ndim;
    int64_t shape[DSRT_MAX_DIMS];
    check_shape(L, 2, &ndim, shape);
    dsrtL_pushtensor(L, dsrt_tensor_view(t, ndim, shape));
    return 1;
}

static int l_reshape(lua_State *L)
{
    dsrt_tensor *t = dsrtL_checktensor(L, 1);
    int ndim;
    int64_t shape[DSRT_MAX_DIMS];
    check_shape(L, 2, &ndim, shape);
    dsrtL_pushtensor(L, dsrt_tensor_reshape(t, ndim, shape, stream_of(L, t)));
    return 1;
}

static int l_flatten(lua_State *L)
{
    dsrt_tensor *t = dsrtL_checktensor(L, 1);
    int64_t all = -1;
    dsrtL_pushtensor(L, dsrt_tensor_reshape(t, 1, &all, stream_of(L, t)));
    return 1;
}

static int l_expand(lua_State *L)
{
    dsrt_tensor *t = dsrtL_checktensor(L, 1);
    int ndim;
    int64_t shape[DSRT_MAX_DIMS];
    check_shape(L, 2, &ndim, shape);
    dsrtL_pushtensor(L, dsrt_tensor_expand(t, ndim, shape));
    return 1;
}

static int l_unsqueeze(lua_State *L)
{
    dsrt_tensor *t = dsrtL_checktensor(L, 1);
    lua_Integer d = luaL_checkinteger(L, 2);
    if (d < 0) d += t->ndim + 2;
    if (d < 1 || d > t->ndim + 1 || t->ndim == DSRT_MAX_DIMS) luaL_error(L, "unsqueeze: dimension %d out of range", (int)d);
    int64_t shape[DSRT_MAX_DIMS], stride[DSRT_MAX_DIMS];
    for (int i = 0, j = 0; i <= t->ndim; i++) {
        if (i == d - 1) shape[i] = 1, stride[i] = i < t->ndim ? t->stride[j] * t->shape[j] : 1;
        else shape[i] = t->shape[j], stride[i] = t->stride[j], j++;
    }
    dsrtL_pushtensor(L, dsrt_tensor_from_storage(t->storage, t->dtype, t->ndim + 1, shape, stride, t->offset));
    return 1;
}

static int l_squeeze(lua_State *L)
{
    dsrt_tensor *t = dsrtL_checktensor(L, 1);
    int only = lua_isnoneornil(L, 2) ? -1 : check_dim(L, 2, t);
    int64_t shape[DSRT_MAX_DIMS], stride[DSRT_MAX_DIMS];
    int n = 0;
    for (int d = 0; d < t->ndim; d++)
        if (t->shape[d] != 1 || (only >= 0 && d != only)) shape[n] = t->shape[d], stride[n++] = t->stride[d];
    dsrtL_pushtensor(L, dsrt_tensor_from_storage(t->storage, t->dtype, n, shape, stride, t->offset));
    return 1;
}

static int l_bitcast(lua_State *L)
{
    dsrt_tensor *t = dsrtL_checktensor(L, 1);
    dsrtL_pushtensor(L, dsrt_tensor_bitcast(t, (dsrt_dtype)check_dtype_name(L, luaL_checkstring(L, 2))));
    return 1;
}

static int l_contiguous(lua_State *L)
{
    dsrt_tensor *t = dsrtL_checktensor(L, 1);
    dsrtL_pushtensor(L, dsrt_tensor_contiguous(t, stream_of(L, t)));
    return 1;
}

static int l_clone(lua_State *L)
{
    dsrt_tensor *t = dsrtL_checktensor(L, 1);
    dsrt_stream *s = stream_of(L, t);
    dsrt_tensor *c = dsrtL_pushtensor(L, dsrt_tensor_like(t, t->dtype, s));
    if (dsrt_op_copy(c, t, s)) return dsrtL_error(L);
    return 1;
}

/* ---- moving and converting ---- */

/* t:to("cuda") | t:to("bf16") | t:to("cuda", "bf16") | t:to{device=, dtype=, async=, stream=} */
static int l_to(lua_State *L)
{
    dsrt_tensor *t = dsrtL_checktensor(L, 1);
    int device = t->device, async = 0;
    dsrt_dtype dtype = t->dtype;
    dsrt_stream *stream = NULL;
    if (lua_istable(L, 2)) {
        tensor_opts o = check_opts(L, 2);
        if (o.has_device) device = o.device;
        if (o.has_dtype) dtype = o.dtype;
        lua_getfield(L, 2, "async");
        async = lua_toboolean(L, -1);
        if (lua_getfield(L, 2, "stream") != LUA_TNIL) {
            if (!luaL_testudata(L, -1, DSRT_STREAM_MT)) luaL_error(L, "to: option 'stream' must be a dsrt.stream");
            stream = dsrtL_checkstream(L, -1);
        }
        lua_pop(L, 2);
    } else {
        for (int i = 2; i <= lua_gettop(L); i++) {
            const char *what = luaL_checkstring(L, i);
            int dev;
            if (!dsrt_device_parse(what, &dev)) {
                if (dsrt_device_check(dev)) return dsrtL_error(L);
                device = dev;
            } else if (dsrt_dtype_from_name(what, &dtype)) {
                luaL_error(L, "to: '%s' is neither a device (cpu, cuda, cuda:N) nor a dtype", what);
            }
        }
    }
    if (!stream) stream = dsrtL_current_stream(L, device != DSRT_CPU ? device : t->device);
    dsrtL_pushtensor(L, dsrt_tensor_to(t, device, dtype, stream, async));
    return 1;
}

static int l_cpu(lua_State *L)
{
    dsrt_tensor *t = dsrtL_checktensor(L, 1);
    dsrtL_pushtensor(L, dsrt_tensor_to(t, DSRT_CPU, t->dtype, stream_of(L, t), 0));
    return 1;
}

static int l_cuda(lua_State *L)
{
    dsrt_tensor *t = dsrtL_checktensor(L, 1);
    int device = dsrtL_checkdevice(L, 2, 0);
    dsrtL_pushtensor(L, dsrt_tensor_to(t, device, t->dtype, dsrtL_current_stream(L, device), 0));
    return 1;
}

/* t:copy(src): writes src (broadcast, converted, from any device) into t */
static int l_copy(lua_State *L)
{
    dsrt_tensor *t = dsrtL_checktensor(L, 1), *src = dsrtL_checktensor(L, 2);
    dsrt_stream *s = stream_of(L, t);
    if (src->device != t->device) src = dsrtL_pushtensor(L, dsrt_tensor_to(src, t->device, src->dtype,
                                                                              dsrtL_current_stream(L, t->device != DSRT_CPU ? t->device : src->device), 0));
    if (dsrt_op_copy(t, src, s)) return dsrtL_error(L);
    lua_settop(L, 1);
    return 1;
}

static int l_fill(lua_State *L)
{
    dsrt_tensor *t = dsrtL_checktensor(L, 1);
    if (dsrt_op_fill(t, luaL_checknumber(L, 2), stream_of(L, t))) return dsrtL_error(L);
    lua_settop(L, 1);
    return 1;
}

/* ---- arithmetic ---- */

static int binary(lua_State *L, int op)
{
    dsrt_tensor *a = dsrtL_totensor(L, 1), *b = dsrtL_totensor(L, 2);
    if (a && b) {
        dsrtL_pushtensor(L, dsrt_op_binary(op, a, b, stream_of(L, a)));
    } else if (a || b) {
        int scalar_at = a ? 2 : 1;
        if (lua_type(L, scalar_at) != LUA_TNUMBER && !lua_isboolean(L, scalar_at))
            luaL_error(L, "%s: expected a tensor or a number, got %s", dsrt_op_binary_name(op), luaL_typename(L, scalar_at));
        double x = lua_isboolean(L, scalar_at) ? lua_toboolean(L, scalar_at) : lua_tonumber(L, scalar_at);
        dsrt_tensor *t = a ? a : b;
        dsrtL_pushtensor(L, dsrt_op_binary_scalar(op, t, x, !a, stream_of(L, t)));
    } else {
        dsrtL_checktensor(L, 1);
    }
    return 1;
}

#define BINARY(name, op) static int l_##name(lua_State *L) { return binary(L, op); }
BINARY(add, DSRT_OP_ADD) BINARY(sub, DSRT_OP_SUB) BINARY(mul, DSRT_OP_MUL) BINARY(div, DSRT_OP_DIV)
BINARY(idiv, DSRT_OP_IDIV) BINARY(mod, DSRT_OP_MOD) BINARY(pow, DSRT_OP_POW) BINARY(maximum, DSRT_OP_MAXIMUM)
BINARY(minimum, DSRT_OP_MINIMUM) BINARY(eq, DSRT_OP_EQ) BINARY(ne, DSRT_OP_NE) BINARY(lt, DSRT_OP_LT)
BINARY(le, DSRT_OP_LE) BINARY(gt, DSRT_OP_GT) BINARY(ge, DSRT_OP_GE)

static int unary(lua_State *L, int op)
{
    dsrt_tensor *t = dsrtL_checktensor(L, 1);
    dsrtL_pushtensor(L, dsrt_op_unary(op, t, stream_of(L, t)));
    return 1;
}

#define UNARY(name, op) static int l_##name(lua_State *L) { return unary(L, op); }
UNARY(neg, DSRT_OP_NEG) UNARY(abs, DSRT_OP_ABS) UNARY(exp, DSRT_OP_EXP) UNARY(log, DSRT_OP_LOG)
UNARY(sqrt, DSRT_OP_SQRT) UNARY(rsqrt, DSRT_OP_RSQRT) UNARY(sin, DSRT_OP_SIN) UNARY(cos, DSRT_OP_COS)
UNARY(tanh, DSRT_OP_TANH) UNARY(sigmoid, DSRT_OP_SIGMOID) UNARY(silu, DSRT_OP_SILU) UNARY(relu, DSRT_OP_RELU)

/* t:sum() | t:sum(dim [, keepdim]) */
static int reduce(lua_State *L, int op)
{
    dsrt_tensor *t = dsrtL_checktensor(L, 1);
    int dim = lua_isnoneornil(L, 2) ? -1 : check_dim(L, 2, t);
    dsrtL_pushtensor(L, dsrt_op_reduce(op, t, dim, lua_toboolean(L, 3), stream_of(L, t)));
    return 1;
}

#define REDUCE(name, op) static int l_##name(lua_State *L) { return reduce(L, op); }
REDUCE(sum, DSRT_RED_SUM) REDUCE(mean, DSRT_RED_MEAN) REDUCE(max, DSRT_RED_MAX) REDUCE(min, DSRT_RED_MIN)
REDUCE(argmax, DSRT_RED_ARGMAX) REDUCE(argmin, DSRT_RED_ARGMIN)

/* Closes a tensor this binding pushed for its own use (the box at idx), once the op succeeded: left
 * to the collector, a view would keep its base's memory until the next cycle, which on a GPU made
 * the allocator call cudaMalloc for the base's successors. (On an error the collector gets it.) */
static void close_temporary(lua_State *L, int idx)
{
    tensor_box *b = lua_touserdata(L, idx);
    dsrt_tensor_release(b->t);
    b->t = NULL;
}

static int l_matmul(lua_State *L)
{
    dsrt_tensor *a = dsrtL_checktensor(L, 1), *b = dsrtL_checktensor(L, 2);
    dsrtL_pushtensor(L, dsrt_op_matmul(a, b, stream_of(L, a)));
    return 1;
}

/* dsrt.embedding(weight, ids [, dtype [, copies]]): rows weight[ids] (0-based ids, as token ids are)
 * as ids.shape + [cols] in dtype (default: the weight's when f32/bf16/f16, else f32), on the
 * weight's device; with copies, ids.shape + [copies, cols], each row repeated. ids: an i32/i64
 * tensor, or a Lua array of integers (sent up as i64 after the check). */
static int l_embedding(lua_State *L)
{
    dsrt_tensor *w = dsrtL_checktensor(L, 1), *ids = dsrtL_totensor(L, 2);
    dsrt_dtype dtype = w->dtype == DSRT_BF16 || w->dtype == DSRT_F16 ? w->dtype : DSRT_F32;
    if (!lua_isnoneornil(L, 3) && dsrt_dtype_from_name(luaL_checkstring(L, 3), &dtype))
        luaL_error(L, "embedding: unknown dtype '%s'", lua_tostring(L, 3));
    int copies = 0;
    if (!lua_isnoneornil(L, 4)) {
        lua_Integer c = luaL_checkinteger(L, 4);
        if (c < 1 || c > INT32_MAX) luaL_error(L, "embedding: copies must be a positive integer, got %I", c);
        copies = (int)c;
    }
    lua_settop(L, 2);
    int made = 0; /* host ids made here from a Lua array (stack slot 3), closed after the gather */
    if (!ids) {
        if (!lua_istable(L, 2)) luaL_error(L, "embedding: ids must be a tensor or a Lua array of integers, got %s",
                                           luaL_typename(L, 2));
        int64_t n = (int64_t)luaL_len(L, 2);
        ids = dsrtL_pushtensor(L, dsrt_tensor_new(DSRT_I64, 1, &n, DSRT_CPU, dsrtL_current_stream(L, DSRT_CPU)));
        made = 1;
        int64_t *p = (int64_t *)dsrt_tensor_desc(ids).data;
        for (int64_t i = 0; i < n; i++) {
            lua_geti(L, 2, i + 1);
            int isint = 0;
            lua_Integer v = lua_tointegerx(L, -1, &isint);
            if (!isint) luaL_error(L, "embedding: ids[%d] is %s, not an integer", (int)(i + 1), luaL_typename(L, -1));
            p[i] = v;
            lua_pop(L, 1);
        }
    }
    dsrtL_pushtensor(L, dsrt_op_embedding(w, ids, dtype, copies, stream_of(L, w)));
    if (made) close_temporary(L, 3);
    return 1;
}

/* ---- metatable ---- */

static int l_gc(lua_State *L)
{
    tensor_box *b = luaL_checkudata(L, 1, DSRT_TENSOR_MT);
    dsrt_tensor_release(b->t);
    b->t = NULL;
    return 0;
}

static int l_index(lua_State *L)
{
    dsrt_tensor *t = dsrtL_checktensor(L, 1);
    if (lua_type(L, 2) == LUA_TNUMBER) {
        if (t->ndim == 0) luaL_error(L, "cannot index a 0-d tensor");
        dsrtL_pushtensor(L, dsrt_tensor_select(t, 0, row_index(L, 2, t, 0)));
        return 1;
    }
    const char *key = luaL_checkstring(L, 2);
    char dev[16];
    if (luaL_getmetafield(L, 1, "methods") != LUA_TNIL && lua_getfield(L, -1, key) != LUA_TNIL) return 1;
    if (!strcmp(key, "shape")) push_shape(L, t, t->shape);
    else if (!strcmp(key, "dtype")) lua_pushstring(L, dsrt_dtype_name(t->dtype));
    else if (!strcmp(key, "device")) lua_pushstring(L, dsrt_device_str(t->device, dev));
    else if (!strcmp(key, "ndim")) lua_pushinteger(L, t->ndim);
    else if (!strcmp(key, "T")) { /* all dimensions reversed, as numpy */
        int perm[DSRT_MAX_DIMS];
        for (int d = 0; d < t->ndim; d++) perm[d] = t->ndim - 1 - d;
        dsrtL_pushtensor(L, dsrt_tensor_permute(t, perm));
    }
    else lua_pushnil(L);
    return 1;
}

/* t[i] = number | tensor: fills or copies into row i */
static int l_newindex(lua_State *L)
{
    dsrt_tensor *t = dsrtL_checktensor(L, 1);
    if (lua_type(L, 2) != LUA_TNUMBER) luaL_error(L, "tensors take only integer keys (rows); fields are read-only");
    if (t->ndim == 0) luaL_error(L, "cannot index a 0-d tensor");
    dsrt_tensor *row = dsrtL_pushtensor(L, dsrt_tensor_select(t, 0, row_index(L, 2, t, 0)));
    dsrt_stream *s = stream_of(L, t);
    dsrt_tensor *src = dsrtL_totensor(L, 3);
    int rc;
    if (src) {
        if (src->device != t->device) src = dsrtL_pushtensor(L, dsrt_tensor_to(src, t->device, src->dtype,
                                                                                  dsrtL_current_stream(L, t->device != DSRT_CPU ? t->device : src->device), 0));
        rc = dsrt_op_copy(row, src, s);
    } else {
        rc = dsrt_op_fill(row, luaL_checknumber(L, 3), s);
    }
    if (rc) return dsrtL_error(L);
    for (int i = lua_gettop(L); i > 3; i--) close_temporary(L, i);
    return 0;
}

static int l_is_tensor(lua_State *L)
{
    lua_pushboolean(L, luaL_testudata(L, 1, DSRT_TENSOR_MT) != NULL);
    return 1;
}

void dsrtL_open_tensor(lua_State *L)
{
    static const luaL_Reg meta[] = {
        {"__gc", l_gc}, {"__close", l_gc}, {"__tostring", l_tostring}, {"__index", l_index},
        {"__newindex", l_newindex}, {"__len", l_len}, {"__add", l_add}, {"__sub", l_sub}, {"__mul", l_mul},
        {"__div", l_div}, {"__idiv", l_idiv}, {"__mod", l_mod}, {"__pow", l_pow}, {"__unm", l_neg}, {NULL, NULL}};
    static const luaL_Reg methods[] = {
        {"numel", l_numel}, {"dim", l_dim}, {"size", l_size}, {"stride", l_stride}, {"nbytes", l_nbytes},
        {"is_contiguous", l_is_contiguous}, {"totable", l_totable}, {"item", l_item},
        {"narrow", l_narrow}, {"select", l_select}, {"transpose", l_transpose}, {"permute", l_permute},
        {"view", l_view}, {"reshape", l_reshape}, {"flatten", l_flatten}, {"expand", l_expand},
        {"unsqueeze", l_unsqueeze}, {"squeeze", l_squeeze}, {"bitcast", l_bitcast}, {"contiguous", l_contiguous}, {"clone", l_clone},
        {"to", l_to}, {"cpu", l_cpu}, {"cuda", l_cuda}, {"copy", l_copy}, {"fill", l_fill},
        {"add", l_add}, {"sub", l_sub}, {"mul", l_mul}, {"div", l_div}, {"idiv", l_idiv}, {"mod", l_mod},
        {"pow", l_pow}, {"maximum", l_maximum}, {"minimum", l_minimum}, {"eq", l_eq}, {"ne", l_ne},
        {"lt", l_lt}, {"le", l_le}, {"gt", l_gt}, {"ge", l_ge},
        {"neg", l_neg}, {"abs", l_abs}, {"exp", l_exp}, {"log", l_log}, {"sqrt", l_sqrt}, {"rsqrt", l_rsqrt},
        {"sin", l_sin}, {"cos", l_cos}, {"tanh", l_tanh}, {"sigmoid", l_sigmoid}, {"silu", l_silu}, {"relu", l_relu},
        {"sum", l_sum}, {"mean", l_mean}, {"max", l_max}, {"min", l_min}, {"argmax", l_argmax}, {"argmin", l_argmin},
        {"matmul", l_matmul}, {"close", l_gc}, {NULL, NULL}};
    static const luaL_Reg functions[] = {
        {"tensor", l_tensor}, {"zeros", l_zeros}, {"ones", l_ones}, {"full", l_full}, {"empty", l_empty},
        {"arange", l_arange}, {"rand", l_rand}, {"randn", l_randn}, {"manual_seed", l_manual_seed},
        {"matmul", l_matmul}, {"is_tensor", l_is_tensor}, {"embedding", l_embedding},
        {"add", l_add}, {"sub", l_sub}, {"mul", l_mul}, {"div", l_div}, {"pow", l_pow},
        {"maximum", l_maximum}, {"minimum", l_minimum}, {NULL, NULL}};
    dsrtL_newclass(L, DSRT_TENSOR_MT, meta, methods);
    luaL_setfuncs(L, functions, 0);
}
