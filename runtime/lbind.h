/*
 * lbind.h - what the Lua binding files (ltensor.c, lstream.c, lcore.c) share.
 *
 * Objects reach Lua as full userdata boxing one reference (a pointer that __gc/__close release),
 * so a C object lives exactly as long as some Lua value or C owner holds it. Results are boxed
 * before anything else can raise an error, which is what keeps an error from leaking them.
 */
#ifndef DSRT_LBIND_H
#define DSRT_LBIND_H

#include <lauxlib.h>
#include <lua.h>
#include "stream.h"
#include "tensor.h"

#define DSRT_TENSOR_MT "dsrt.tensor"
#define DSRT_STREAM_MT "dsrt.stream"
#define DSRT_EVENT_MT "dsrt.event"

/* raise the core's last error message */
int dsrtL_error(lua_State *L);

dsrt_tensor *dsrtL_checktensor(lua_State *L, int idx);
dsrt_tensor *dsrtL_totensor(lua_State *L, int idx); /* NULL if not a (live) tensor */
/* push a new reference (takes ownership; raises the core error when t is NULL) */
dsrt_tensor *dsrtL_pushtensor(lua_State *L, dsrt_tensor *t);

dsrt_stream *dsrtL_checkstream(lua_State *L, int idx);
void dsrtL_pushstream(lua_State *L, dsrt_stream *s); /* takes ownership */
/* the current stream of a device (its default stream unless with_stream/set_stream said otherwise) */
dsrt_stream *dsrtL_current_stream(lua_State *L, int device);
int dsrtL_checkdevice(lua_State *L, int idx, int def); /* "cpu" | "cuda" | "cuda:N" | N | nil -> def */

/* Registers metatable `name` with the metamethods `meta` and the methods table `methods` (kept as
 * the metatable's "methods" field, and as __index unless `meta` brings its own __index). */
void dsrtL_newclass(lua_State *L, const char *name, const luaL_Reg *meta, const luaL_Reg *methods);

/* The precision argument at idx: "reference" or "fp32"; `prefix` names the function in the error
 * ("nn.rms_norm"). With `required` false, none/nil means "reference". */
#include "quant.h"
dsrt_precision dsrtL_checkprecision(lua_State *L, int idx, const char *prefix, int required);

void dsrtL_open_tensor(lua_State *L); /* adds the tensor functions to the module table on top */
void dsrtL_open_stream(lua_State *L);
void dsrtL_open_safetensors(lua_State *L); /* adds the file-mapping and writing primitives */
void dsrtL_open_nn(lua_State *L);          /* adds core.nn: the model's numerical primitives */
void dsrtL_open_layers(lua_State *L);      /* adds the layer objects (linear, moe, ...) */
void dsrtL_open_tokenizer(lua_State *L);   /* adds the BPE tokenizer primitives */
void dsrtL_open_sampling(lua_State *L);    /* adds the token sampler */

#endif
