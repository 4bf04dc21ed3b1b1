/*
 * lsafetensors.c - the C primitives under lua/dsrt/safetensors.lua, in the table dsrt.core.safetensors:
 *
 *   map(path) -> mapping, header        the file mapped, and its JSON header as a string
 *   mapping:tensor(dtype, shape, begin, end)   a tensor over file bytes [begin, end) (0-based)
 *   mapping:size(), mapping:close()
 *   json_members(text) -> keys, spans    member names as written (escapes kept) and where each
 *                                        value is: spans[2i-1], spans[2i] for text:sub
 *   writer(path) -> writer               writer:write(string | contiguous CPU tensor), :commit()
 *
 * Failures raise the core's message without a source position: the caller is always
 * lua/dsrt/safetensors.lua, whose line numbers would only be noise in a message about a file.
 *
 * A mapping or a writer is a full userdata boxing its handle, boxed before the handle exists so
 * that no error can leak it. A writer is to-be-closed: if saving raises anywhere before commit,
 * closing (or collecting) the box removes the temporary file, so the final name never holds a
 * partial file. Closing a mapping drops only the Lua object's reference: tensors keep theirs.
 */
#include "err.h"
#include "lbind.h"
#include "safetensors.h"

#define MAPPING_MT "dsrt.safetensors.mapping"
#define WRITER_MT "dsrt.safetensors.writer"

typedef struct { dsrt_storage *storage; } mapping_box;
typedef struct { dsrt_safetensors_writer *w; } writer_box;

static int raise(lua_State *L)
{
    lua_pushstring(L, dsrt_err_msg());
    return lua_error(L);
}

/* ---- mappings ---- */

static dsrt_storage *check_mapping(lua_State *L, int idx)
{
    mapping_box *b = luaL_checkudata(L, idx, MAPPING_MT);
    if (!b->storage) luaL_error(L, "safetensors: the file mapping was closed");
    return b->storage;
}

static int l_map(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    mapping_box *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->storage = NULL;
    luaL_setmetatable(L, MAPPING_MT);
    if (!(b->storage = dsrt_safetensors_map(path))) return raise(L);
    const char *json;
    size_t len;
    if (dsrt_safetensors_header(b->storage, path, &json, &len)) {
        dsrt_storage_release(b->storage); /* now, not at the next collection: callers may try many files */
        b->storage = NULL;
        return raise(L);
    }
    lua_pushlstring(L, json, len);
    return 2;
}

/* mapping:tensor(dtype, {dims...}, begin, end) */
static int l_mapping_tensor(lua_State *L)
{
    dsrt_storage *s = check_mapping(L, 1);
    dsrt_dtype dtype;
    if (dsrt_dtype_from_name(luaL_checkstring(L, 2), &dtype)) return raise(L);
    luaL_checktype(L, 3, LUA_TTABLE);
    lua_Integer ndim = luaL_len(L, 3);
    if (ndim < 0 || ndim > DSRT_MAX_DIMS) luaL_error(L, "safetensors: %d dimensions (at most %d)", (int)ndim, DSRT_MAX_DIMS);
    int64_t shape[DSRT_MAX_DIMS];
    for (int d = 0; d < ndim; d++) {
        lua_geti(L, 3, d + 1);
        int ok;
        shape[d] = lua_tointegerx(L, -1, &ok);
        if (!ok) luaL_error(L, "safetensors: shape element %d is not an integer", d + 1);
        lua_pop(L, 1);
    }
    lua_Integer begin = luaL_checkinteger(L, 4), end = luaL_checkinteger(L, 5);
    luaL_argcheck(L, begin >= 0, 4, "negative byte offset");
    luaL_argcheck(L, end >= 0, 5, "negative byte offset");
    dsrt_tensor *t = dsrt_safetensors_tensor(s, dtype, (int)ndim, shape, (uint64_t)begin, (uint64_t)end);
    if (!t) return raise(L);
    dsrtL_pushtensor(L, t);
    return 1;
}

static int l_mapping_size(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)check_mapping(L, 1)->nbytes);
    return 1;
}

static int l_mapping_close(lua_State *L)
{
    mapping_box *b = luaL_checkudata(L, 1, MAPPING_MT);
    dsrt_storage_release(b->storage);
    b->storage = NULL;
    return 0;
}

/* ---- JSON members ---- */

typedef struct {
    lua_State *L;
    const char *text;
    lua_Integer count;
} member_lists;

/* keys and spans are the two tables on top of the stack */
static int add_member(void *ctx, const char *key, size_t key_len, const char *value, size_t value_len)
{
    member_lists *m = ctx;
    lua_State *L = m->L;
    lua_Integer first = (lua_Integer)(value - m->text) + 1;
    m->count++;
    lua_pushlstring(L, key, key_len);
    lua_rawseti(L, -3, m->count);
    lua_pushinteger(L, first);
    lua_rawseti(L, -2, 2 * m->count - 1);
    lua_pushinteger(L, first + (lua_Integer)value_len - 1);
    lua_rawseti(L, -2, 2 * m->count);
    return 0;
}

static int l_json_members(lua_State *L)
{
    size_t len;
    const char *text = luaL_checklstring(L, 1, &len);
    member_lists m = {L, text, 0};
    lua_newtable(L);
    lua_newtable(L);
    if (dsrt_safetensors_json_members(text, len, add_member, &m)) return raise(L);
    return 2;
}

/* ---- the writer ---- */

static dsrt_safetensors_writer *check_writer(lua_State *L)
{
    writer_box *b = luaL_checkudata(L, 1, WRITER_MT);
    if (!b->w) luaL_error(L, "safetensors: the writer was already committed or aborted");
    return b->w;
}

static int l_writer(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    writer_box *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->w = NULL;
    luaL_setmetatable(L, WRITER_MT);
    if (!(b->w = dsrt_safetensors_writer_open(path))) return raise(L);
    return 1;
}

/* writer:write(string | tensor): a tensor's bytes, which must be contiguous on the CPU (an empty
 * tensor has no bytes, so its strides do not matter) */
static int l_writer_write(lua_State *L)
{
    dsrt_safetensors_writer *w = check_writer(L);
    const void *bytes;
    size_t nbytes;
    if (lua_type(L, 2) == LUA_TSTRING) {
        bytes = lua_tolstring(L, 2, &nbytes);
    } else {
        dsrt_tensor *t = dsrtL_checktensor(L, 2);
        int64_t numel = dsrt_tensor_numel(t);
        if (t->device != DSRT_CPU || (numel && !dsrt_tensor_is_contiguous(t))) {
            char buf[96];
            luaL_error(L, "safetensors: writer needs a contiguous CPU tensor, got %s", dsrt_tensor_str(t, buf, sizeof buf));
        }
        nbytes = dsrt_dtype_nbytes(t->dtype, numel);
        /* contiguous fp4 starts on a byte, so the element offset converts exactly */
        bytes = (const char *)t->storage->data + t->offset * dsrt_dtype_bits(t->dtype) / 8;
    }
    if (dsrt_safetensors_writer_write(w, bytes, nbytes)) return raise(L);
    return 0;
}

static int l_writer_commit(lua_State *L)
{
    writer_box *b = luaL_checkudata(L, 1, WRITER_MT);
    dsrt_safetensors_writer *w = check_writer(L);
    b->w = NULL;
    if (dsrt_safetensors_writer_commit(w)) return raise(L);
    return 0;
}

/* __close, __gc and writer:abort(); nothing to do once committed */
static int l_writer_abort(lua_State *L)
{
    writer_box *b = luaL_checkudata(L, 1, WRITER_MT);
    if (b->w) dsrt_safetensors_writer_abort(b->w);
    b->w = NULL;
    return 0;
}

void dsrtL_open_safetensors(lua_State *L)
{
    static const luaL_Reg mapping_meta[] = {{"__gc", l_mapping_close}, {"__close", l_mapping_close}, {NULL, NULL}};
    static const luaL_Reg mapping_methods[] = {
        {"tensor", l_mapping_tensor}, {"size", l_mapping_size}, {"close", l_mapping_close}, {NULL, NULL}};
    static const luaL_Reg writer_meta[] = {{"__gc", l_writer_abort}, {"__close", l_writer_abort}, {NULL, NULL}};
    static const luaL_Reg writer_methods[] = {
        {"write", l_writer_write}, {"commit", l_writer_commit}, {"abort", l_writer_abort}, {NULL, NULL}};
    static const luaL_Reg functions[] = {
        {"map", l_map}, {"json_members", l_json_members}, {"writer", l_writer}, {NULL, NULL}};
    dsrtL_newclass(L, MAPPING_MT, mapping_meta, mapping_methods);
    dsrtL_newclass(L, WRITER_MT, writer_meta, writer_methods);
    luaL_newlib(L, functions);
    lua_setfield(L, -2, "safetensors");
}
