/*
 * ltokenizer.c - the tokenizer core (tokenizer.h) in Lua, as dsrt.core.tokenizer.
 *
 * These are the primitives lua/dsrt/tokenizer.lua builds the public object from; what they protect
 * is the boundary: every id from Lua is checked before the core sees it, and results come from
 * buffers the core owns (or Lua's own), so an error raised while pushing them leaks nothing.
 */
#include "err.h"
#include "lbind.h"
#include "tokenizer.h"

#define TOKENIZER_MT "dsrt.tokenizer"

typedef struct { dsrt_tokenizer *t; } tok_box;

static dsrt_tokenizer *checktok(lua_State *L)
{
    tok_box *b = luaL_checkudata(L, 1, TOKENIZER_MT);
    if (!b->t) luaL_error(L, "tokenizer was closed");
    return b->t;
}

static int32_t checkid(lua_State *L, int idx)
{
    lua_Integer id = luaL_checkinteger(L, idx);
    luaL_argcheck(L, id >= 0 && id <= INT32_MAX, idx, "token id out of range");
    return (int32_t)id;
}

static int t_new(lua_State *L)
{
    lua_Integer n = luaL_checkinteger(L, 1);
    luaL_argcheck(L, n > 0 && n <= INT32_MAX, 1, "number of ids out of range");
    tok_box *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->t = NULL;
    luaL_setmetatable(L, TOKENIZER_MT);
    b->t = dsrt_tokenizer_new((int32_t)n);
    if (!b->t) dsrtL_error(L);
    return 1;
}

static int t_gc(lua_State *L)
{
    tok_box *b = luaL_checkudata(L, 1, TOKENIZER_MT);
    dsrt_tokenizer_free(b->t);
    b->t = NULL;
    return 0;
}

static int t_set_token(lua_State *L)
{
    dsrt_tokenizer *t = checktok(L);
    size_t len;
    const char *s = luaL_checklstring(L, 3, &len);
    if (dsrt_tokenizer_set_token(t, checkid(L, 2), s, len, lua_toboolean(L, 4))) dsrtL_error(L);
    return 0;
}

static int t_add_merge(lua_State *L)
{
    dsrt_tokenizer *t = checktok(L);
    if (dsrt_tokenizer_add_merge(t, checkid(L, 2), checkid(L, 3), checkid(L, 4))) dsrtL_error(L);
    return 0;
}

static int t_add_added(lua_State *L)
{
    dsrt_tokenizer *t = checktok(L);
    size_t len;
    const char *s = luaL_checklstring(L, 2, &len);
    if (dsrt_tokenizer_add_added(t, s, len, checkid(L, 3), lua_toboolean(L, 4), lua_toboolean(L, 5)))
        dsrtL_error(L);
    return 0;
}

static int t_add_split(lua_State *L)
{
    dsrt_tokenizer *t = checktok(L);
    size_t len;
    const char *s = luaL_checklstring(L, 2, &len);
    if (dsrt_tokenizer_add_split(t, s, len)) dsrtL_error(L);
    return 0;
}

static int t_encode(lua_State *L)
{
    dsrt_tokenizer *t = checktok(L);
    size_t len, n;
    const char *s = luaL_checklstring(L, 2, &len);
    const int32_t *ids;
    if (dsrt_tokenizer_encode(t, s, len, lua_toboolean(L, 3), &ids, &n)) dsrtL_error(L);
    lua_createtable(L, n > INT32_MAX ? 0 : (int)n, 0);
    for (size_t i = 0; i < n; i++) {
        lua_pushinteger(L, ids[i]);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    return 1;
}

static int t_decode(lua_State *L)
{
    dsrt_tokenizer *t = checktok(L);
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_Integer n = luaL_len(L, 2);
    int64_t *ids = lua_newuserdatauv(L, (size_t)(n > 0 ? n : 1) * sizeof *ids, 0); /* collected on error */
    for (lua_Integer i = 1; i <= n; i++) {
        int isnum;
        lua_rawgeti(L, 2, i);
        ids[i - 1] = (int64_t)lua_tointegerx(L, -1, &isnum);
        if (!isnum) return luaL_error(L, "tokenizer: token id at position %d is not an integer", (int)i);
        lua_pop(L, 1);
    }
    const char *out;
    size_t len;
    if (dsrt_tokenizer_decode(t, ids, (size_t)n, lua_toboolean(L, 3), &out, &len)) dsrtL_error(L);
    lua_pushlstring(L, out, len);
    return 1;
}

/* the raw bytes of one token (what the streaming decoder joins before it cuts whole characters) */
static int t_bytes(lua_State *L)
{
    dsrt_tokenizer *t = checktok(L);
    int64_t id = (int64_t)luaL_checkinteger(L, 2);
    const char *out;
    size_t len;
    if (dsrt_tokenizer_raw_bytes(t, id, &out, &len)) dsrtL_error(L);
    lua_pushlstring(L, out, len);
    return 1;
}

static int t_is_special(lua_State *L)
{
    lua_pushboolean(L, dsrt_tokenizer_is_special(checktok(L), checkid(L, 2)));
    return 1;
}

static int u_lossy(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    luaL_Buffer buf;
    char *dst = luaL_buffinitsize(L, &buf, 3 * len);
    luaL_pushresultsize(&buf, dsrt_utf8_lossy(s, len, dst));
    return 1;
}

static int u_incomplete_tail(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    lua_pushinteger(L, (lua_Integer)dsrt_utf8_incomplete_tail(s, len));
    return 1;
}

void dsrtL_open_tokenizer(lua_State *L)
{
    static const luaL_Reg meta[] = { { "__gc", t_gc }, { "__close", t_gc }, { NULL, NULL } };
    static const luaL_Reg methods[] = {
        { "set_token", t_set_token }, { "add_merge", t_add_merge }, { "add_added", t_add_added },
        { "add_split", t_add_split }, { "encode", t_encode },       { "decode", t_decode },
        { "bytes", t_bytes },
        { "is_special", t_is_special }, { NULL, NULL },
    };
    static const luaL_Reg funcs[] = {
        { "new", t_new }, { "utf8_lossy", u_lossy }, { "utf8_incomplete_tail", u_incomplete_tail }, { NULL, NULL },
    };
    dsrtL_newclass(L, TOKENIZER_MT, meta, methods);
    lua_newtable(L);
    luaL_setfuncs(L, funcs, 0);
    lua_setfield(L, -2, "tokenizer");
}
