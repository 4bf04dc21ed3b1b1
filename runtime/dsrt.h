/*
 * dsrt.h — the interface dsrt promises to programs that embed it.
 *
 * A host (a game loop, a tool, the `dsrt` program itself) owns its lua_State and decides which
 * standard libraries it opens. dsrt adds itself to that state and nothing else:
 *
 *   lua_State *L = luaL_newstate();
 *   luaL_openlibs(L);
 *   dsrt_openlibs(L);                       // now `require "dsrt"` works
 *
 * After dsrt_openlibs, `require "dsrt.core"` loads the C bindings linked into the host and
 * `require "dsrt"` (and every other module of the Lua library) is found on package.path first,
 * so a checkout's lua/ folder wins, and otherwise in the copy of the library compiled into the
 * binary, so an installed host needs no Lua files beside it. Nothing here aborts or exits the
 * process: failures surface as Lua errors in the state that asked.
 *
 * Link with libdsrt.a (or libdsrt.so) and Lua 5.4. Include with -I pointing at the Lua headers.
 */
#ifndef DSRT_H
#define DSRT_H

#ifdef __cplusplus
extern "C" {
#endif

#include <stddef.h>
#include "lua.h"

#define DSRT_VERSION "0.1.0"

/* The version of the library actually linked, which may differ from DSRT_VERSION of the header
   a host was compiled with. */
const char *dsrt_version(void);

/* The C bindings, as `require "dsrt.core"` sees them; a stock lua5.4 finds this function in
   dsrt/core.so on package.cpath. */
int luaopen_dsrt_core(lua_State *L);

/* Makes `require "dsrt"` work in L: registers dsrt.core in package.preload and appends to
   package.searchers a searcher for the Lua library embedded in the binary. Opens the package
   library if the host has not. Calling it twice is harmless. Raises a Lua error only when
   memory runs out, like luaL_openlibs. */
void dsrt_openlibs(lua_State *L);

/* The Lua library compiled into the binary by tools/embed_lua.lua: one entry per module, `name`
   as `require` spells it ("dsrt", "dsrt.dsv4"), `source` its bytes (len of them, followed by a
   NUL), ending with an entry whose name is NULL. */
struct dsrt_embedded_lua {
    const char *name;
    const char *source;
    size_t len;
};
extern const struct dsrt_embedded_lua dsrt_embedded_lua[];

#ifdef __cplusplus
}
#endif

#endif
