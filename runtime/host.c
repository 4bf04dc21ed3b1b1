/*
 * host.c — what a lua_State needs so that `require "dsrt"` works in it (see dsrt.h).
 *
 * It protects one promise: the Lua library travels inside the binary, yet a developer's edits to
 * lua/ take effect without a rebuild. So the embedded copy is reached through a searcher appended
 * at the END of package.searchers: Lua's own path searchers run first and find lua/ whenever it is
 * on package.path; the embedded copy answers only when nothing on disk did.
 *
 * This file is linked into libdsrt.so, which a stock lua5.4 loads next to its own cjson module,
 * so it must not reference lua-cjson; the `dsrt` program registers its static cjson itself.
 */
#include <string.h>

#include "lua.h"
#include "lauxlib.h"
#include "lualib.h"

#include "dsrt.h"

const char *dsrt_version(void) {
    return DSRT_VERSION;
}

static const struct dsrt_embedded_lua *find_embedded_module(const char *name) {
    for (const struct dsrt_embedded_lua *m = dsrt_embedded_lua; m->name != NULL; m++)
        if (strcmp(m->name, name) == 0) return m;
    return NULL;
}

/* A package.searchers entry: given a module name, returns the compiled chunk and a string saying
   where it came from (which `require` hands to the chunk and returns as its second value), or
   the reason it has nothing, which `require` adds to its "module not found" message. */
static int search_embedded_library(lua_State *L) {
    const char *name = luaL_checkstring(L, 1);
    const struct dsrt_embedded_lua *module = find_embedded_module(name);
    if (module == NULL) {
        lua_pushfstring(L, "no embedded module '%s'", name);
        return 1;
    }
    /* '=' makes Lua print the chunk name as written: "[embedded dsrt.foo]:12: ..." */
    const char *chunkname = lua_pushfstring(L, "=[embedded %s]", name);
    if (luaL_loadbufferx(L, module->source, module->len, chunkname, "t") != LUA_OK)
        return luaL_error(L, "error loading module '%s' from the embedded library:\n\t%s", name,
                          lua_tostring(L, -1));
    lua_pushstring(L, chunkname + 1);
    return 2;
}

/* True when the searcher is already in the table on top of the stack: a host that opens dsrt
   twice must not make every failed `require` try the embedded library twice. */
static int has_embedded_searcher(lua_State *L) {
    lua_Integer n = luaL_len(L, -1);
    for (lua_Integer i = 1; i <= n; i++) {
        lua_rawgeti(L, -1, i);
        int same = lua_tocfunction(L, -1) == search_embedded_library;
        lua_pop(L, 1);
        if (same) return 1;
    }
    return 0;
}

void dsrt_openlibs(lua_State *L) {
    luaL_requiref(L, LUA_LOADLIBNAME, luaopen_package, 1);   /* only opens it if missing */

    /* the registry's table, not the field package.preload, is the one `require` consults */
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
    lua_pushcfunction(L, luaopen_dsrt_core);
    lua_setfield(L, -2, "dsrt.core");
    lua_pop(L, 1);

    if (lua_getfield(L, -1, "searchers") != LUA_TTABLE) {
        lua_pop(L, 2);   /* a host that removed the searchers does not want modules found */
        return;
    }
    if (!has_embedded_searcher(L)) {
        lua_pushcfunction(L, search_embedded_library);
        lua_rawseti(L, -2, luaL_len(L, -2) + 1);
    }
    lua_pop(L, 2);
}
