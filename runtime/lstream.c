/*
 * lstream.c - streams and events in Lua, and the per-state current stream of each device.
 *
 * The current stream is Lua state, not process state: it lives in the registry, so two Lua states
 * embedded in one host (or coroutines restoring it through dsrt.with_stream) never see each
 * other's choice. Ops look it up for the device of their operands.
 */
#include <stdio.h>
#include <string.h>
#include "err.h"
#include "lbind.h"

#define CURRENT_KEY "dsrt.current_streams"
#define DEFAULTS_KEY "dsrt.default_streams"

typedef struct { dsrt_stream *s; } stream_box;
typedef struct { dsrt_event *e; } event_box;

dsrt_stream *dsrtL_checkstream(lua_State *L, int idx)
{
    stream_box *b = luaL_checkudata(L, idx, DSRT_STREAM_MT);
    if (!b->s) luaL_error(L, "stream was closed");
    return b->s;
}

void dsrtL_pushstream(lua_State *L, dsrt_stream *s)
{
    stream_box *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->s = s;
    luaL_setmetatable(L, DSRT_STREAM_MT);
}

static event_box *check_event_box(lua_State *L, int idx)
{
    event_box *b = luaL_checkudata(L, idx, DSRT_EVENT_MT);
    if (!b->e) luaL_error(L, "event was closed");
    return b;
}

static void push_event(lua_State *L, dsrt_event *e)
{
    event_box *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->e = e;
    luaL_setmetatable(L, DSRT_EVENT_MT);
}

int dsrtL_checkdevice(lua_State *L, int idx, int def)
{
    if (lua_isnoneornil(L, idx)) return def;
    int device;
    if (lua_isinteger(L, idx)) { /* a bare N means cuda:N */
        lua_Integer n = lua_tointeger(L, idx);
        if (n < 0 || n >= DSRT_MAX_DEVICES) return luaL_error(L, "unknown device %d", (int)n);
        if (dsrt_device_check((int)n)) return dsrtL_error(L);
        return (int)n;
    }
    if (dsrt_device_parse(luaL_checkstring(L, idx), &device)) return dsrtL_error(L);
    if (dsrt_device_check(device)) return dsrtL_error(L);
    return device;
}

static void push_default_stream(lua_State *L, int device)
{
    luaL_getsubtable(L, LUA_REGISTRYINDEX, DEFAULTS_KEY);
    if (lua_rawgeti(L, -1, device) == LUA_TNIL) {
        lua_pop(L, 1);
        dsrtL_pushstream(L, dsrt_stream_default(device));
        lua_pushvalue(L, -1);
        lua_rawseti(L, -3, device);
    }
    lua_remove(L, -2);
}

/* pushes the current stream userdata of a device; a closed stream falls back to the default */
static void push_current_stream(lua_State *L, int device)
{
    luaL_getsubtable(L, LUA_REGISTRYINDEX, CURRENT_KEY);
    if (lua_rawgeti(L, -1, device) == LUA_TNIL || !((stream_box *)lua_touserdata(L, -1))->s) {
        lua_pop(L, 1);
        lua_pushnil(L);
        lua_rawseti(L, -2, device);
        push_default_stream(L, device);
    }
    lua_remove(L, -2);
}

dsrt_stream *dsrtL_current_stream(lua_State *L, int device)
{
    push_current_stream(L, device);
    stream_box *b = lua_touserdata(L, -1);
    lua_pop(L, 1); /* still referenced from the registry */
    return b->s;
}

/* dsrt.stream([device]) */
static int l_stream(lua_State *L)
{
    int device = dsrtL_checkdevice(L, 1, dsrt_device_count() ? 0 : DSRT_CPU);
    dsrt_stream *s = dsrt_stream_new(device);
    if (!s) return dsrtL_error(L);
    dsrtL_pushstream(L, s);
    return 1;
}

/* dsrt.event([device [, {timing = true}]]) */
static int l_event(lua_State *L)
{
    int device = dsrtL_checkdevice(L, 1, dsrt_device_count() ? 0 : DSRT_CPU);
    int timing = 0;
    if (lua_istable(L, 2)) {
        lua_getfield(L, 2, "timing");
        timing = lua_toboolean(L, -1);
        lua_pop(L, 1);
    }
    dsrt_event *e = dsrt_event_new(device, timing);
    if (!e) return dsrtL_error(L);
    push_event(L, e);
    return 1;
}

/* dsrt.current_stream([device]) */
static int l_current_stream(lua_State *L)
{
    push_current_stream(L, dsrtL_checkdevice(L, 1, dsrt_device_count() ? 0 : DSRT_CPU));
    return 1;
}

/* dsrt.set_stream(s) -> previous current stream of s's device (dsrt.with_stream builds on it) */
static int l_set_stream(lua_State *L)
{
    dsrt_stream *s = dsrtL_checkstream(L, 1);
    push_current_stream(L, s->device);
    luaL_getsubtable(L, LUA_REGISTRYINDEX, CURRENT_KEY);
    lua_pushvalue(L, 1);
    lua_rawseti(L, -2, s->device);
    lua_pop(L, 1);
    return 1;
}

static int l_stream_gc(lua_State *L)
{
    stream_box *b = luaL_checkudata(L, 1, DSRT_STREAM_MT);
    if (b->s && dsrt_stream_is_default(b->s)) return 0; /* shared by every state: never closed */
    dsrt_stream_release(b->s);
    b->s = NULL;
    return 0;
}

static int l_stream_record(lua_State *L)
{
    dsrt_stream *s = dsrtL_checkstream(L, 1);
    dsrt_event *e;
    if (lua_isnoneornil(L, 2)) {
        if (!(e = dsrt_event_new(s->device, 0))) return dsrtL_error(L);
        push_event(L, e);
    } else {
        e = check_event_box(L, 2)->e;
        lua_pushvalue(L, 2);
    }
    if (dsrt_event_record(e, s)) return dsrtL_error(L);
    return 1;
}

static int l_stream_wait(lua_State *L)
{
    dsrt_stream *s = dsrtL_checkstream(L, 1);
    if (dsrt_stream_wait(s, check_event_box(L, 2)->e)) return dsrtL_error(L);
    lua_settop(L, 1);
    return 1;
}

static int l_stream_synchronize(lua_State *L)
{
    if (dsrt_stream_synchronize(dsrtL_checkstream(L, 1))) return dsrtL_error(L);
    return 0;
}

static int l_stream_tostring(lua_State *L)
{
    stream_box *b = luaL_checkudata(L, 1, DSRT_STREAM_MT);
    char dev[16];
    if (!b->s) lua_pushliteral(L, "dsrt.stream(closed)");
    else lua_pushfstring(L, "dsrt.stream(%s%s)", dsrt_device_str(b->s->device, dev),
                         b->s->handle || b->s->device == DSRT_CPU ? "" : ", default");
    return 1;
}

static int l_stream_index(lua_State *L)
{
    dsrt_stream *s = dsrtL_checkstream(L, 1);
    const char *key = luaL_checkstring(L, 2);
    char dev[16];
    if (!strcmp(key, "device")) lua_pushstring(L, dsrt_device_str(s->device, dev));
    else if (luaL_getmetafield(L, 1, "methods") && lua_getfield(L, -1, key)) return 1;
    else lua_pushnil(L);
    return 1;
}

static int l_event_gc(lua_State *L)
{
    event_box *b = luaL_checkudata(L, 1, DSRT_EVENT_MT);
    dsrt_event_release(b->e);
    b->e = NULL;
    return 0;
}

static int l_event_query(lua_State *L)
{
    int rc = dsrt_event_query(check_event_box(L, 1)->e);
    if (rc < 0) return dsrtL_error(L);
    lua_pushboolean(L, rc);
    return 1;
}

static int l_event_synchronize(lua_State *L)
{
    if (dsrt_event_synchronize(check_event_box(L, 1)->e)) return dsrtL_error(L);
    return 0;
}

static int l_event_record(lua_State *L)
{
    dsrt_event *e = check_event_box(L, 1)->e;
    dsrt_stream *s = lua_isnoneornil(L, 2) ? dsrtL_current_stream(L, e->device) : dsrtL_checkstream(L, 2);
    if (dsrt_event_record(e, s)) return dsrtL_error(L);
    lua_settop(L, 1);
    return 1;
}

/* start:elapsed(end) -> milliseconds */
static int l_event_elapsed(lua_State *L)
{
    double ms;
    if (dsrt_event_elapsed(check_event_box(L, 1)->e, check_event_box(L, 2)->e, &ms)) return dsrtL_error(L);
    lua_pushnumber(L, ms);
    return 1;
}

static int l_event_tostring(lua_State *L)
{
    event_box *b = luaL_checkudata(L, 1, DSRT_EVENT_MT);
    char dev[16];
    if (!b->e) lua_pushliteral(L, "dsrt.event(closed)");
    else lua_pushfstring(L, "dsrt.event(%s)", dsrt_device_str(b->e->device, dev));
    return 1;
}

/* dsrt.synchronize([device]): wait for all work of the device's current and default streams */
static int l_synchronize(lua_State *L)
{
    int device = dsrtL_checkdevice(L, 1, dsrt_device_count() ? 0 : DSRT_CPU);
    if (dsrt_stream_synchronize(dsrtL_current_stream(L, device)) ||
        dsrt_stream_synchronize(dsrt_stream_default(device)))
        return dsrtL_error(L);
    return 0;
}

void dsrtL_open_stream(lua_State *L)
{
    static const luaL_Reg stream_meta[] = {
        {"__gc", l_stream_gc}, {"__close", l_stream_gc}, {"__tostring", l_stream_tostring},
        {"__index", l_stream_index}, {NULL, NULL}};
    static const luaL_Reg stream_methods[] = {
        {"record", l_stream_record}, {"wait", l_stream_wait}, {"synchronize", l_stream_synchronize},
        {"close", l_stream_gc}, {NULL, NULL}};
    static const luaL_Reg event_meta[] = {
        {"__gc", l_event_gc}, {"__close", l_event_gc}, {"__tostring", l_event_tostring}, {NULL, NULL}};
    static const luaL_Reg event_methods[] = {
        {"query", l_event_query}, {"synchronize", l_event_synchronize}, {"record", l_event_record},
        {"elapsed", l_event_elapsed}, {"close", l_event_gc}, {NULL, NULL}};
    static const luaL_Reg functions[] = {
        {"stream", l_stream}, {"event", l_event}, {"current_stream", l_current_stream},
        {"set_stream", l_set_stream}, {"synchronize", l_synchronize}, {NULL, NULL}};
    dsrtL_newclass(L, DSRT_STREAM_MT, stream_meta, stream_methods);
    dsrtL_newclass(L, DSRT_EVENT_MT, event_meta, event_methods);
    luaL_setfuncs(L, functions, 0);
}
