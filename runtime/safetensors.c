/*
 * safetensors.c - mapping, header bounds, tensors over the mapping, a JSON member scanner and the
 * atomic file writer (see safetensors.h).
 *
 * What it protects:
 *   - Memory safety against any file. The header length is checked against the file before the
 *     header is touched, a tensor's bytes are checked against the mapping before a view or a copy
 *     is made, and views then go through dsrt_tensor_from_storage, which checks them again.
 *   - The mapping's lifetime. It is a storage with an munmap release, so it lives exactly as long
 *     as the last tensor over it, whatever happens to the Lua object that opened the file.
 *   - The file on disk. The mapping is MAP_PRIVATE and copy-on-write: in-place ops on a loaded
 *     weight (t:fill, t:copy, t[i] = x) change this process's pages only, where a read-only
 *     mapping would turn them into a segmentation fault. MAP_NORESERVE keeps a checkpoint larger
 *     than RAM + swap mappable under the kernel's default overcommit policy.
 *   - Never a half-written file under the final name: the writer writes "<path>.tmp", checks every
 *     call, syncs, and only then renames; any failure removes the temporary file.
 *
 * A file truncated by another process while mapped raises SIGBUS on access, as with every mmap
 * reader; that cannot be checked for here.
 */
#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include "err.h"

/* ---- the mapping ---- */

typedef struct {
    void *base;
    size_t length;
} file_mapping;

/* munmap fails only for arguments mmap did not return, which these are not */
static void unmap_file(void *ctx)
{
    file_mapping *m = ctx;
    munmap(m->base, m->length);
    free(m);
}

dsrt_storage *dsrt_safetensors_map(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return dsrt_err_null("safetensors: cannot open '%s': %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        dsrt_err("safetensors: cannot stat '%s': %s", path, strerror(errno));
        close(fd);
        return NULL;
    }
    if (!S_ISREG(st.st_mode) || st.st_size == 0) {
        dsrt_err("safetensors: '%s' is %s", path, S_ISDIR(st.st_mode) ? "a folder" :
                 S_ISREG(st.st_mode) ? "empty (no 8-byte header length)" : "not a regular file");
        close(fd);
        return NULL;
    }
    size_t length = (size_t)st.st_size;
    void *base = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, fd, 0);
    int map_errno = errno;
    /* the mapping keeps the file open by itself; the descriptor is not needed past this point */
    if (close(fd) != 0 && base != MAP_FAILED) {
        dsrt_err("safetensors: closing '%s': %s", path, strerror(errno));
        munmap(base, length);
        return NULL;
    }
    if (base == MAP_FAILED) return dsrt_err_null("safetensors: cannot map '%s': %s", path, strerror(map_errno));
    file_mapping *m = malloc(sizeof *m);
    dsrt_storage *s = m ? dsrt_storage_wrap(DSRT_CPU, base, length, unmap_file, m) : NULL;
    if (!s) {
        munmap(base, length);
        free(m);
        return dsrt_err_null("safetensors: out of host memory mapping '%s'", path);
    }
    m->base = base;
    m->length = length;
    return s;
}

int dsrt_safetensors_header(const dsrt_storage *s, const char *path, const char **json, size_t *json_len)
{
    if (s->nbytes < 8)
        return dsrt_err("safetensors: '%s' is %zu bytes, too short for the 8-byte header length (truncated?)",
                        path, s->nbytes);
    const unsigned char *bytes = s->data;
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = n << 8 | bytes[i];
    if (n > DSRT_SAFETENSORS_MAX_HEADER)
        return dsrt_err("safetensors: '%s': header length %llu is over the format's limit of %u bytes",
                        path, (unsigned long long)n, DSRT_SAFETENSORS_MAX_HEADER);
    if (n > s->nbytes - 8)
        return dsrt_err("safetensors: '%s': header length %llu is larger than the %zu bytes that follow it "
                        "(truncated?)", path, (unsigned long long)n, s->nbytes - 8);
    *json = (const char *)bytes + 8;
    *json_len = (size_t)n;
    return 0;
}

/* ---- tensors over the mapping ---- */

#define MAX_ELEMENTS (INT64_C(1) << 50) /* dsrt_check_shape's bound, applied to nonzero dimensions too */

dsrt_tensor *dsrt_safetensors_tensor(dsrt_storage *s, dsrt_dtype dtype, int ndim, const int64_t *shape,
                                     uint64_t begin, uint64_t end)
{
    char dims[DSRT_SHAPE_BUF];
    if (dsrt_check_shape(ndim, shape, "safetensors")) return NULL;
    /* strides step over zero-size dimensions as if they were 1, so their product must stay
     * bounded even when a zero elsewhere makes the tensor empty */
    int64_t stride[DSRT_MAX_DIMS], step = 1, numel = 1;
    for (int d = ndim - 1; d >= 0; d--) {
        stride[d] = step;
        if (shape[d] && step > MAX_ELEMENTS / shape[d])
            return dsrt_err_null("safetensors: shape %s is too large", dsrt_shape_str(ndim, shape, dims, sizeof dims));
        if (shape[d]) step *= shape[d];
        numel *= shape[d];
    }
    int bits = dsrt_dtype_bits(dtype);
    if (begin > end || end > s->nbytes || (uint64_t)numel * (uint64_t)bits != (end - begin) * 8)
        return dsrt_err_null("safetensors: %s%s cannot be bytes %llu..%llu of a %zu-byte file", dsrt_dtype_name(dtype),
                             dsrt_shape_str(ndim, shape, dims, sizeof dims), (unsigned long long)begin,
                             (unsigned long long)end, s->nbytes);
    uint64_t element_bytes = bits < 8 ? 1 : (uint64_t)bits / 8;
    if (begin % element_bytes == 0)
        return dsrt_tensor_from_storage(s, dtype, ndim, shape, stride, (int64_t)(begin * 8 / (uint64_t)bits));
    dsrt_tensor *copy = dsrt_tensor_new(dtype, ndim, shape, DSRT_CPU, dsrt_stream_default(DSRT_CPU));
    if (copy) memcpy(copy->storage->data, (const char *)s->data + begin, end - begin);
    return copy;
}

/* ---- JSON members ----
 * cjson keeps the last of two equal keys without a word, so duplicate names are found by scanning
 * the members here. The scanner runs on text cjson has already accepted, yet every step is
 * bounds-checked, and nesting is counted rather than recursed into, so no input can overrun the
 * text or the C stack. */

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

static size_t skip_space(const char *p, size_t i, size_t n)
{
    while (i < n && is_space(p[i])) i++;
    return i;
}

/* p[i] is an opening quote: the index just past the closing one, or SIZE_MAX if there is none */
static size_t skip_string(const char *p, size_t i, size_t n)
{
    for (i++; i < n; i++) {
        if (p[i] == '\\') i++;
        else if (p[i] == '"') return i + 1;
    }
    return SIZE_MAX;
}

/* the index just past the value that starts at p[i], or SIZE_MAX if the text ends inside it */
static size_t skip_value(const char *p, size_t i, size_t n)
{
    static const char scalar_ends[] = {',', '}', ']', ' ', '\t', '\n', '\r'};
    if (i >= n) return SIZE_MAX;
    if (p[i] == '"') return skip_string(p, i, n);
    if (p[i] != '{' && p[i] != '[') { /* number, true, false, null */
        while (i < n && !memchr(scalar_ends, p[i], sizeof scalar_ends)) i++;
        return i;
    }
    size_t depth = 0;
    while (i < n) {
        if (p[i] == '"') {
            if ((i = skip_string(p, i, n)) == SIZE_MAX) return SIZE_MAX;
            continue;
        }
        if (p[i] == '{' || p[i] == '[') depth++;
        else if ((p[i] == '}' || p[i] == ']') && --depth == 0) return i + 1;
        i++;
    }
    return SIZE_MAX;
}

int dsrt_safetensors_json_members(const char *text, size_t len, dsrt_json_member_fn on_member, void *ctx)
{
    size_t i = skip_space(text, 0, len);
    if (i >= len || text[i] != '{') return dsrt_err("json: not an object");
    i = skip_space(text, i + 1, len);
    if (i < len && text[i] == '}') return 0;
    for (;;) {
        if (i >= len || text[i] != '"') return dsrt_err("json: expected a member name at byte %zu", i);
        size_t key_end = skip_string(text, i, len);
        if (key_end == SIZE_MAX) return dsrt_err("json: unterminated member name at byte %zu", i);
        size_t value = skip_space(text, key_end, len);
        if (value >= len || text[value] != ':') return dsrt_err("json: expected ':' at byte %zu", value);
        value = skip_space(text, value + 1, len);
        size_t value_end = skip_value(text, value, len);
        if (value_end == SIZE_MAX || value_end == value) return dsrt_err("json: bad value at byte %zu", value);
        int rc = on_member(ctx, text + i + 1, key_end - i - 2, text + value, value_end - value);
        if (rc) return rc;
        i = skip_space(text, value_end, len);
        if (i < len && text[i] == '}') return 0;
        if (i >= len || text[i] != ',') return dsrt_err("json: expected ',' or '}' at byte %zu", i);
        i = skip_space(text, i + 1, len);
    }
}

/* ---- the writer ---- */

struct dsrt_safetensors_writer {
    FILE *file;
    char *path;     /* the final name, for messages and the rename */
    char *tmp_path; /* path + ".tmp", in the same allocation */
};

static void free_writer(dsrt_safetensors_writer *w)
{
    free(w->path);
    free(w);
}

dsrt_safetensors_writer *dsrt_safetensors_writer_open(const char *path)
{
    size_t len = strlen(path);
    dsrt_safetensors_writer *w = calloc(1, sizeof *w);
    char *names = malloc(2 * len + sizeof ".tmp" + 1);
    if (!w || !names) {
        free(w);
        free(names);
        return dsrt_err_null("safetensors: out of host memory saving '%s'", path);
    }
    w->path = names;
    w->tmp_path = names + len + 1;
    memcpy(w->path, path, len + 1);
    memcpy(w->tmp_path, path, len);
    memcpy(w->tmp_path + len, ".tmp", sizeof ".tmp");
    if (!(w->file = fopen(w->tmp_path, "wb"))) {
        dsrt_err("safetensors: cannot create '%s': %s", w->tmp_path, strerror(errno));
        free_writer(w);
        return NULL;
    }
    return w;
}

int dsrt_safetensors_writer_write(dsrt_safetensors_writer *w, const void *bytes, size_t nbytes)
{
    if (nbytes && fwrite(bytes, 1, nbytes, w->file) != nbytes)
        return dsrt_err("safetensors: writing '%s' failed: %s", w->path, strerror(errno));
    return 0;
}

/* Failing paths remove the temporary file; if even that fails there is nothing better to report
 * than the error that got us here. */
static void remove_tmp(dsrt_safetensors_writer *w) { (void)unlink(w->tmp_path); }

int dsrt_safetensors_writer_commit(dsrt_safetensors_writer *w)
{
    int rc = 0;
    if (fflush(w->file) != 0) rc = dsrt_err("safetensors: writing '%s' failed: %s", w->path, strerror(errno));
    /* EINVAL: the file is of a kind that cannot be synced (a device), which is no failure to write */
    else if (fsync(fileno(w->file)) != 0 && errno != EINVAL)
        rc = dsrt_err("safetensors: syncing '%s' failed: %s", w->path, strerror(errno));
    if (fclose(w->file) != 0 && rc == 0) rc = dsrt_err("safetensors: writing '%s' failed: %s", w->path, strerror(errno));
    if (rc == 0 && rename(w->tmp_path, w->path) != 0)
        rc = dsrt_err("safetensors: cannot rename '%s' to '%s': %s", w->tmp_path, w->path, strerror(errno));
    if (rc) remove_tmp(w);
    free_writer(w);
    return rc;
}

void dsrt_safetensors_writer_abort(dsrt_safetensors_writer *w)
{
    (void)fclose(w->file); /* the file is being thrown away: how its close went does not matter */
    remove_tmp(w);
    free_writer(w);
}
