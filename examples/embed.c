/*
 * embed.c - the smallest host that embeds dsrt: its own lua_State, dsrt added with one call, and
 * a script run in it. The Lua library is compiled into libdsrt, so the host needs no Lua files.
 *
 *   build/embed_example ['lua code']
 */
#include <lauxlib.h>
#include <lualib.h>
#include <stdio.h>
#include "dsrt.h"

int main(int argc, char **argv)
{
    const char *code = argc > 1 ? argv[1]
                                : "local dsrt = require 'dsrt' print(dsrt.randn({2, 2}, {seed = 1}))";
    lua_State *L = luaL_newstate();
    if (!L) return 1;
    luaL_openlibs(L);
    dsrt_openlibs(L);
    int status = luaL_dostring(L, code);
    if (status != LUA_OK) fprintf(stderr, "embed: %s\n", lua_tostring(L, -1));
    printf("dsrt %s embedded\n", dsrt_version());
    lua_close(L);
    return status == LUA_OK ? 0 : 1;
}
