/*
 * lcore.c - the Lua module dsrt.core: assembles the tensor and stream bindings and adds the
 * device-level functions (memory statistics and limits, CUDA queries).
 *
 * `require "dsrt"` loads lua/dsrt/init.lua, which builds the user-facing module on top of this
 * one; embedders that want only the C layer can require "dsrt.core" directly.
 */
#include <lauxlib.h>
#include <lua.h>
#include "dsrt.h"
#include "err.h"
#include "kernels.h"
#include "lbind.h"
#include "upload.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* dsrt.memory_stats([device]) -> {allocated=, reserved=, peak_allocated=, limit=, ...} in bytes */
static int l_memory_stats(lua_State *L)
{
    int device = dsrtL_checkdevice(L, 1, dsrt_device_count() ? 0 : DSRT_CPU);
    dsrt_mem_stats st;
    if (dsrt_alloc_stats(device, &st)) return dsrtL_error(L);
    lua_createtable(L, 0, 8);
    char dev[16];
    lua_pushstring(L, dsrt_device_str(device, dev));
    lua_setfield(L, -2, "device");
#define FIELD(name) (lua_pushinteger(L, (lua_Integer)st.name), lua_setfield(L, -2, #name))
    FIELD(allocated); FIELD(reserved); FIELD(peak_allocated); FIELD(limit);
    FIELD(allocations); FIELD(cache_hits); FIELD(device_mallocs);
#undef FIELD
    return 1;
}

/* dsrt.set_memory_limit(bytes | nil [, device]): cap on memory dsrt holds on the device */
static int l_set_memory_limit(lua_State *L)
{
    lua_Integer bytes = luaL_optinteger(L, 1, 0);
    if (bytes < 0) luaL_argerror(L, 1, "negative byte limit");
    int device = dsrtL_checkdevice(L, 2, dsrt_device_count() ? 0 : DSRT_CPU);
    if (dsrt_alloc_set_limit(device, (size_t)bytes)) return dsrtL_error(L);
    return 0;
}

static int l_empty_cache(lua_State *L)
{
    if (dsrt_alloc_empty_cache(dsrtL_checkdevice(L, 1, dsrt_device_count() ? 0 : DSRT_CPU))) return dsrtL_error(L);
    return 0;
}

static int l_cuda_available(lua_State *L)
{
    lua_pushboolean(L, dsrt_device_count() > 0);
    return 1;
}

static int l_cuda_device_count(lua_State *L)
{
    lua_pushinteger(L, dsrt_device_count());
    return 1;
}

/* dsrt.cuda.profiler(true | false [, device]): cudaProfilerStart / Stop, for profilers run with
 * capture from start off (ncu --profile-from-start off, nsys --capture-range=cudaProfilerApi) */
static int l_cuda_profiler(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TBOOLEAN);
    int device = dsrtL_checkdevice(L, 2, 0);
    if (device == DSRT_CPU) luaL_argerror(L, 2, "not a CUDA device");
    if (dsrtk_profiler(device, lua_toboolean(L, 1))) return luaL_error(L, "cuda.profiler: %s", dsrtk_error());
    return 0;
}

/* dsrt.cuda.device_info([device]) -> {name=, total_memory=, free_memory=} */
static int l_cuda_device_info(lua_State *L)
{
    int device = dsrtL_checkdevice(L, 1, 0);
    if (device == DSRT_CPU) luaL_argerror(L, 1, "not a CUDA device");
    char name[256];
    size_t free_bytes, total;
    if (dsrtk_device_name(device, name, sizeof name) || dsrtk_mem_info(device, &free_bytes, &total))
        return luaL_error(L, "cuda.device_info: %s", dsrtk_error());
    lua_createtable(L, 0, 3);
    lua_pushstring(L, name);
    lua_setfield(L, -2, "name");
    lua_pushinteger(L, (lua_Integer)total);
    lua_setfield(L, -2, "total_memory");
    lua_pushinteger(L, (lua_Integer)free_bytes);
    lua_setfield(L, -2, "free_memory");
    return 1;
}

void dsrtL_newclass(lua_State *L, const char *name, const luaL_Reg *meta, const luaL_Reg *methods)
{
    luaL_newmetatable(L, name);
    luaL_setfuncs(L, meta, 0);
    lua_newtable(L);
    luaL_setfuncs(L, methods, 0);
    if (lua_getfield(L, -2, "__index") == LUA_TNIL) {
        lua_pushvalue(L, -2);
        lua_setfield(L, -4, "__index");
    }
    lua_pop(L, 1);
    lua_setfield(L, -2, "methods");
    lua_pop(L, 1);
}

dsrt_precision dsrtL_checkprecision(lua_State *L, int idx, const char *prefix, int required)
{
    if (!required && lua_isnoneornil(L, idx)) return DSRT_PREC_REFERENCE;
    if (lua_type(L, idx) == LUA_TSTRING) {
        const char *name = lua_tostring(L, idx);
        if (!strcmp(name, "reference")) return DSRT_PREC_REFERENCE;
        if (!strcmp(name, "fp32")) return DSRT_PREC_FP32;
        luaL_error(L, "%s: precision (argument #%d) must be \"reference\" or \"fp32\", got \"%s\"", prefix, idx, name);
    }
    luaL_error(L, "%s: precision (argument #%d) must be \"reference\" or \"fp32\", got %s", prefix, idx,
               lua_isnone(L, idx) ? "no value" : luaL_typename(L, idx));
    return DSRT_PREC_REFERENCE;
}

typedef struct {
    const char *label;
    int shown;
} progress_bar;

/* "\rweights  12.30 / 148.70 GB  4.12 GB/s  ETA 33 s", redrawn at most ~10 times a second */
static int draw_progress(const dsrt_upload_progress *p, void *ctx)
{
    progress_bar *bar = ctx;
    int tenths = (int)(p->seconds * 10);
    if (tenths == bar->shown && p->bytes_done < p->bytes_total) return 0;
    bar->shown = tenths;
    double rate = p->seconds > 0 ? (double)p->bytes_done / p->seconds : 0;
    double eta = rate > 0 ? (double)(p->bytes_total - p->bytes_done) / rate : 0;
    fprintf(stderr, "\r%s %8.2f / %.2f GB  %6.2f GB/s  ETA %4.0f s ", bar->label, (double)p->bytes_done / 1e9,
            (double)p->bytes_total / 1e9, rate / 1e9, eta);
    fflush(stderr);
    return 0;
}

/* dsrt.upload({t1, t2, ...}, device [, {progress = true, label = "weights"}]) -> {d1, d2, ...} */
static int l_upload(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    int device = dsrtL_checkdevice(L, 2, 0);
    int n = (int)luaL_len(L, 1), want_bar = isatty(STDERR_FILENO);
    progress_bar bar = {"upload", -1};
    if (lua_istable(L, 3)) {
        if (lua_getfield(L, 3, "progress") != LUA_TNIL) want_bar = want_bar && lua_toboolean(L, -1);
        if (lua_getfield(L, 3, "label") == LUA_TSTRING) bar.label = lua_tostring(L, -1); /* stays on the stack */
    }
    dsrt_tensor **src = lua_newuserdatauv(L, sizeof *src * (size_t)(n ? n : 1) * 2, 0); /* freed by the GC */
    dsrt_tensor **out = src + n;
    for (int i = 0; i < n; i++) {
        lua_geti(L, 1, i + 1);
        src[i] = dsrtL_checktensor(L, -1);
        lua_pop(L, 1); /* still referenced by the argument table */
    }
    int rc = dsrt_upload(src, out, n, device, dsrtL_current_stream(L, device), want_bar ? draw_progress : NULL, &bar);
    if (want_bar && bar.shown >= 0) fputc('\n', stderr);
    if (rc) return dsrtL_error(L);
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        dsrtL_pushtensor(L, out[i]);
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

int luaopen_dsrt_core(lua_State *L)
{
    static const luaL_Reg functions[] = {
        {"memory_stats", l_memory_stats}, {"set_memory_limit", l_set_memory_limit}, {"empty_cache", l_empty_cache},
        {"upload", l_upload}, {NULL, NULL}};
    static const luaL_Reg cuda[] = {
        {"available", l_cuda_available}, {"device_count", l_cuda_device_count}, {"device_info", l_cuda_device_info},
        {"profiler", l_cuda_profiler}, {NULL, NULL}};
    luaL_newlib(L, functions);
    dsrtL_open_tensor(L);
    dsrtL_open_stream(L);
    dsrtL_open_safetensors(L);
    dsrtL_open_nn(L);
    dsrtL_open_layers(L);
    dsrtL_open_tokenizer(L);
    dsrtL_open_sampling(L);
    luaL_newlib(L, cuda);
    lua_setfield(L, -2, "cuda");
    lua_pushstring(L, DSRT_VERSION);
    lua_setfield(L, -2, "version");
    return 1;
}
