/*
 * safetensors.h - the unsafe half of safetensors: mapping a file, finding its header, making
 * tensors over the mapping, listing the members of a JSON object, and writing a file so that no
 * half-written file ever sits under the final name.
 *
 * The other half - decoding the header with lua-cjson and checking every entry against the
 * format's rules, with messages naming the file and the tensor - is lua/dsrt/safetensors.lua.
 * What stays here is whatever touches raw memory or the file system, and each such place checks
 * its own bounds, so that a header the Lua side failed to reject still cannot make dsrt read
 * outside the file.
 *
 * The format (FORMATS.md §5): an 8-byte little-endian header length N, N bytes of JSON, then the
 * data buffer, which tensors' data_offsets address relative to its start (byte 8 + N).
 */
#ifndef DSRT_SAFETENSORS_H
#define DSRT_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>
#include "tensor.h"

#define DSRT_SAFETENSORS_MAX_HEADER 100000000u /* the reference implementation's cap, in bytes */

/* The whole file at `path` mapped copy-on-write into a CPU storage (a new reference). Tensors made
 * over it hold references of their own, so the file stays mapped while any of them lives. */
dsrt_storage *dsrt_safetensors_map(const char *path);

/* The JSON header of the safetensors file mapped in s (`path` is for messages): checks the 8-byte
 * length against the file size and the format's cap. The data buffer starts at byte 8 + *json_len. */
int dsrt_safetensors_header(const dsrt_storage *s, const char *path, const char **json, size_t *json_len);

/* A tensor of dtype and shape over bytes [begin, end) of s, which must hold exactly its elements:
 * a view of s when begin is a multiple of the element size, otherwise a copy into fresh aligned
 * memory (the format does not promise alignment, and a view's offset counts whole elements). */
dsrt_tensor *dsrt_safetensors_tensor(dsrt_storage *s, dsrt_dtype dtype, int ndim, const int64_t *shape,
                                     uint64_t begin, uint64_t end);

/* Calls on_member for each member of the JSON object in text, in order, with the key as written
 * between its quotes (escapes not decoded) and the value's text. Returns 0, the first nonzero
 * result of on_member, or -1 with a message when text does not scan as an object. */
typedef int (*dsrt_json_member_fn)(void *ctx, const char *key, size_t key_len, const char *value, size_t value_len);
int dsrt_safetensors_json_members(const char *text, size_t len, dsrt_json_member_fn on_member, void *ctx);

/* Writes go to "<path>.tmp"; commit flushes it to disk and renames it over path, abort removes it.
 * Both free the writer, whatever happens. Messages name path. */
typedef struct dsrt_safetensors_writer dsrt_safetensors_writer;
dsrt_safetensors_writer *dsrt_safetensors_writer_open(const char *path);
int dsrt_safetensors_writer_write(dsrt_safetensors_writer *w, const void *bytes, size_t nbytes);
int dsrt_safetensors_writer_commit(dsrt_safetensors_writer *w);
void dsrt_safetensors_writer_abort(dsrt_safetensors_writer *w);

#endif
