/*
 * tokenizer.c - byte-level BPE with Hugging Face `tokenizers` semantics (see tokenizer.h).
 *
 * What it protects: the ids a model sees. One id different from the reference and the model reads
 * another text, so every rule here follows the library, and tests/lua/test_tokenizer.lua compares
 * 12,000 strings against the Rust implementation. Two places needed care:
 *  - The Split regexes are written for Oniguruma. PCRE2 (PCRE2_UTF | PCRE2_UCP) agrees on \p{..}
 *    classes, ranges and lookaheads, but its \s also matches U+180E (Mongolian vowel separator,
 *    \h in PCRE2, not White_Space in Oniguruma), so \s and \S outside brackets are rewritten to
 *    Oniguruma's White_Space list before compiling (and \h, a hex digit there, a space in PCRE2).
 *    Inside brackets only \s and \h are rewritten; \S and \H there, nested classes and POSIX
 *    brackets are left to PCRE2 (no tokenizer.json seen so far uses them).
 *  - Each regex runs on one piece as its whole subject, as the library runs it on a separate
 *    string: a lookahead such as (?!\S) at the end of a piece sees the end, not the next piece.
 */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "tokenizer.h"
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "err.h"

#define MAX_SPLITS 8

typedef struct { uint64_t key; int32_t rank, merged; } merge_slot; /* key 0 = empty (left+1 in the high half) */

typedef struct { char *s; size_t len; int32_t id; uint8_t special, normalized; } added_token;

struct dsrt_tokenizer {
    int32_t n_ids;
    char **bytes;      /* per id: its decoded bytes (NULL = no such id) */
    uint32_t *nbytes;
    uint8_t *special;  /* per id: a special added token (skipped by decode's skip_special) */
    int32_t byte_id[256];
    merge_slot *merges;
    size_t merge_cap, n_merges;
    added_token *added;  /* sorted by first byte at the first encode after a change */
    size_t n_added;
    size_t first[257];   /* added[first[b] .. first[b+1]) start with byte b */
    int added_sorted;
    pcre2_code *split[MAX_SPLITS];
    pcre2_match_data *md[MAX_SPLITS];
    int n_splits;
    int32_t *out;                /* encode's result, BPE's symbols and pair heap, reused across calls */
    void *sym, *heap;
    size_t out_cap, sym_cap, heap_cap;
    char *text, *joined;         /* lossy input copy, decode's joined bytes and its result */
    size_t text_cap, joined_cap;
};

/* ---- UTF-8 ---- */

/* Length of the valid character at s[i], or 0 with *bad = the length of the maximal invalid
 * subpart there (Unicode's "substitution of maximal subparts", which from_utf8_lossy follows);
 * *truncated says the subpart was cut by the end of the string (more bytes could complete it). */
static size_t utf8_char(const unsigned char *s, size_t len, size_t i, size_t *bad, int *truncated)
{
    unsigned c = s[i];
    size_t need;
    unsigned lo = 0x80, hi = 0xBF;
    *truncated = 0;
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) need = 1;
    else if (c >= 0xE0 && c <= 0xEF) { need = 2; if (c == 0xE0) lo = 0xA0; if (c == 0xED) hi = 0x9F; }
    else if (c >= 0xF0 && c <= 0xF4) { need = 3; if (c == 0xF0) lo = 0x90; if (c == 0xF4) hi = 0x8F; }
    else { *bad = 1; return 0; }
    for (size_t k = 1; k <= need; k++) {
        if (i + k >= len) { *bad = k; *truncated = 1; return 0; }
        unsigned b = s[i + k];
        if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xBF)) { *bad = k; return 0; }
    }
    return need + 1;
}

size_t dsrt_utf8_lossy(const char *s, size_t len, char *out)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t o = 0, i = 0;
    while (i < len) {
        size_t bad;
        int truncated;
        size_t n = utf8_char(u, len, i, &bad, &truncated);
        if (n) { memcpy(out + o, s + i, n); o += n; i += n; continue; }
        memcpy(out + o, "\xEF\xBF\xBD", 3);
        o += 3;
        i += bad;
    }
    return o;
}

size_t dsrt_utf8_incomplete_tail(const char *s, size_t len)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t start = len > 3 ? len - 3 : 0;
    for (size_t i = start; i < len; i++) {
        size_t bad;
        int truncated;
        if (!utf8_char(u, len, i, &bad, &truncated) && truncated) return len - i;
    }
    return 0;
}

static int utf8_valid(const char *s, size_t len)
{
    for (size_t i = 0; i < len;) {
        size_t bad;
        int truncated;
        size_t n = utf8_char((const unsigned char *)s, len, i, &bad, &truncated);
        if (!n) return 0;
        i += n;
    }
    return 1;
}

/* ---- the byte-level table (GPT-2's bytes_to_unicode): printable bytes stand for themselves, the
 * others for U+0100 + their order among them ---- */

static int byte_printable(int b) { return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE); }

/* the byte a code point stands for, or -1 when it is outside the table */
static int char_to_byte(uint32_t cp)
{
    if (cp < 256 && byte_printable((int)cp)) return (int)cp;
    if (cp < 0x100 || cp >= 0x100 + 68) return -1; /* 68 = bytes that are not printable */
    int k = (int)(cp - 0x100);
    for (int b = 0; b < 256; b++)
        if (!byte_printable(b) && k-- == 0) return b;
    return -1;
}

/* ---- construction ---- */

dsrt_tokenizer *dsrt_tokenizer_new(int32_t n_ids)
{
    if (n_ids <= 0) return dsrt_err_null("tokenizer: no tokens");
    dsrt_tokenizer *t = calloc(1, sizeof *t);
    if (!t) return dsrt_err_null("tokenizer: out of memory");
    t->n_ids = n_ids;
    t->bytes = calloc((size_t)n_ids, sizeof *t->bytes);
    t->nbytes = calloc((size_t)n_ids, sizeof *t->nbytes);
    t->special = calloc((size_t)n_ids, 1);
    if (!t->bytes || !t->nbytes || !t->special) { dsrt_tokenizer_free(t); return dsrt_err_null("tokenizer: out of memory"); }
    for (int b = 0; b < 256; b++) t->byte_id[b] = -1;
    return t;
}

void dsrt_tokenizer_free(dsrt_tokenizer *t)
{
    if (!t) return;
    if (t->bytes)
        for (int32_t i = 0; i < t->n_ids; i++) free(t->bytes[i]);
    free(t->bytes);
    free(t->nbytes);
    free(t->special);
    free(t->merges);
    for (size_t i = 0; i < t->n_added; i++) free(t->added[i].s);
    free(t->added);
    for (int i = 0; i < t->n_splits; i++) { pcre2_match_data_free(t->md[i]); pcre2_code_free(t->split[i]); }
    free(t->out);
    free(t->sym);
    free(t->heap);
    free(t->text);
    free(t->joined);
    free(t);
}

static int check_id(const dsrt_tokenizer *t, int32_t id)
{
    if (id < 0 || id >= t->n_ids) return dsrt_err("tokenizer: id %d outside 0..%d", id, t->n_ids - 1);
    return 0;
}

int dsrt_tokenizer_set_token(dsrt_tokenizer *t, int32_t id, const char *s, size_t len, int model_token)
{
    if (check_id(t, id)) return -1;
    if (!utf8_valid(s, len)) return dsrt_err("tokenizer: token %d is not valid UTF-8", id);
    char *b = malloc(len + 1);
    if (!b) return dsrt_err("tokenizer: out of memory");
    size_t n = 0;
    int mapped = 1;
    for (size_t i = 0; i < len;) {
        size_t bad;
        int truncated;
        const unsigned char *u = (const unsigned char *)s;
        size_t k = utf8_char(u, len, i, &bad, &truncated);
        uint32_t cp = k == 1 ? u[i] : k == 2 ? (u[i] & 0x1Fu) << 6 | (u[i + 1] & 0x3Fu)
                                            : k == 3 ? (u[i] & 0x0Fu) << 12 | (u[i + 1] & 0x3Fu) << 6 | (u[i + 2] & 0x3Fu)
                                                     : 0x110000; /* 4 bytes: outside the table anyway */
        int byte = char_to_byte(cp);
        if (byte < 0) { memcpy(b, s, len); n = len; mapped = 0; break; } /* outside the table: the UTF-8 as is */
        b[n++] = (char)byte;
        i += k;
    }
    b[n] = 0;
    free(t->bytes[id]);
    t->bytes[id] = b;
    t->nbytes[id] = (uint32_t)n;
    /* only a token spelled through the table is a byte's symbol: a literal " " in some vocabulary
     * must not take the place of "Ġ" */
    if (model_token && mapped && n == 1) t->byte_id[(unsigned char)b[0]] = id;
    return 0;
}

static uint64_t pair_key(int32_t l, int32_t r) { return ((uint64_t)(uint32_t)(l + 1) << 32) | (uint32_t)r; }
static size_t pair_hash(uint64_t k) { k *= 0x9E3779B97F4A7C15ull; return (size_t)(k >> 20); }

static merge_slot *merge_find(const dsrt_tokenizer *t, uint64_t key)
{
    size_t mask = t->merge_cap - 1;
    for (size_t i = pair_hash(key) & mask;; i = (i + 1) & mask)
        if (t->merges[i].key == key || t->merges[i].key == 0) return &t->merges[i];
}

int dsrt_tokenizer_add_merge(dsrt_tokenizer *t, int32_t left, int32_t right, int32_t merged)
{
    if (check_id(t, left) || check_id(t, right) || check_id(t, merged)) return -1;
    if (2 * (t->n_merges + 1) > t->merge_cap) { /* keep the table at most half full */
        size_t cap = t->merge_cap ? 2 * t->merge_cap : 1024;
        merge_slot *old = t->merges;
        size_t old_cap = t->merge_cap;
        t->merges = calloc(cap, sizeof *t->merges);
        if (!t->merges) { t->merges = old; return dsrt_err("tokenizer: out of memory"); }
        t->merge_cap = cap;
        for (size_t i = 0; i < old_cap; i++)
            if (old[i].key) *merge_find(t, old[i].key) = old[i];
        free(old);
    }
    merge_slot *m = merge_find(t, pair_key(left, right));
    if (!m->key) t->n_merges++;
    *m = (merge_slot){ pair_key(left, right), (int32_t)t->n_merges - 1, merged };
    return 0;
}

int dsrt_tokenizer_add_added(dsrt_tokenizer *t, const char *content, size_t len, int32_t id, int special,
                             int normalized)
{
    if (check_id(t, id)) return -1;
    if (len == 0) return dsrt_err("tokenizer: added token %d is empty", id);
    added_token *a = realloc(t->added, (t->n_added + 1) * sizeof *a);
    if (!a) return dsrt_err("tokenizer: out of memory");
    t->added = a;
    char *s = malloc(len);
    if (!s) return dsrt_err("tokenizer: out of memory");
    memcpy(s, content, len);
    t->added[t->n_added++] = (added_token){ s, len, id, (uint8_t)!!special, (uint8_t)!!normalized };
    t->added_sorted = 0;
    t->special[id] = (uint8_t)!!special;
    return 0;
}

int dsrt_tokenizer_is_special(const dsrt_tokenizer *t, int32_t id)
{
    return id >= 0 && id < t->n_ids && t->special[id];
}

/* Oniguruma's \s (White_Space); see the comment at the top */
#define WS "\\t\\n\\x{0B}\\f\\r \\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"

int dsrt_tokenizer_add_split(dsrt_tokenizer *t, const char *pattern, size_t len)
{
    if (t->n_splits == MAX_SPLITS) return dsrt_err("tokenizer: more than %d Split pre-tokenizers", MAX_SPLITS);
    char *p = malloc(len * (sizeof WS + 4) + 1);
    if (!p) return dsrt_err("tokenizer: out of memory");
    size_t o = 0;
    int in_class = 0;
    for (size_t i = 0; i < len; i++) {
        char c = pattern[i];
        if (c == '\\' && i + 1 < len) {
            char d = pattern[i + 1];
            if (!in_class && (d == 's' || d == 'S')) {
                o += (size_t)sprintf(p + o, "[%s%s]", d == 'S' ? "^" : "", WS);
            } else if (in_class && d == 's') {
                o += (size_t)sprintf(p + o, "%s", WS);
            } else if (d == 'h' || d == 'H') { /* Oniguruma's \h is a hex digit, PCRE2's horizontal space */
                o += (size_t)sprintf(p + o, "%s", in_class ? "0-9a-fA-F" : d == 'H' ? "[^0-9a-fA-F]" : "[0-9a-fA-F]");
            } else {
                p[o++] = c;
                p[o++] = d;
            }
            i++;
            continue;
        }
        if (c == '[' && !in_class) { in_class = 1; p[o++] = c; if (i + 1 < len && pattern[i + 1] == '^') p[o++] = pattern[++i]; if (i + 1 < len && pattern[i + 1] == ']') p[o++] = pattern[++i]; continue; }
        if (c == ']' && in_class) in_class = 0;
        p[o++] = c;
    }
    int code;
    PCRE2_SIZE offset;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)p, o, PCRE2_UTF | PCRE2_UCP, &code, &offset, NULL);
    free(p);
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(code, msg, sizeof msg);
        return dsrt_err("tokenizer: Split regex %.*s does not compile: %s", (int)len, pattern, (char *)msg);
    }
    pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* without JIT (an unsupported CPU) matching still works */
    pcre2_match_data *md = pcre2_match_data_create_from_pattern(re, NULL);
    if (!md) { pcre2_code_free(re); return dsrt_err("tokenizer: out of memory"); }
    t->split[t->n_splits] = re;
    t->md[t->n_splits++] = md;
    return 0;
}

/* ---- encoding ---- */

/* grows *buf to hold n elements of size `size` */
static int reserve(void *buf, size_t *cap, size_t n, size_t size)
{
    if (n <= *cap) return 0;
    size_t c = *cap ? *cap : 64;
    while (c < n) c *= 2;
    void *p = realloc(*(void **)buf, c * size);
    if (!p) return dsrt_err("tokenizer: out of memory");
    *(void **)buf = p;
    *cap = c;
    return 0;
}

typedef struct { dsrt_tokenizer *t; size_t n; } out_ids;

static int push_id(out_ids *o, int32_t id)
{
    if (reserve(&o->t->out, &o->t->out_cap, o->n + 1, sizeof(int32_t))) return -1;
    o->t->out[o->n++] = id;
    return 0;
}

/* BPE of one piece, as tokenizers' Word::merge_all does it: a min-heap of candidate pairs ordered
 * by (rank, position), symbols in a linked list; a popped pair whose symbols have changed since it
 * was pushed is stale and skipped. O(n log n), so a long run of letters in a prompt (one piece)
 * cannot make encoding quadratic. */
typedef struct { int32_t id, prev, next; } bpe_sym;
typedef struct { int32_t rank, pos, merged; } bpe_pair;

static int pair_less(bpe_pair a, bpe_pair b) { return a.rank < b.rank || (a.rank == b.rank && a.pos < b.pos); }

static void heap_push(bpe_pair *h, size_t *n, bpe_pair p)
{
    size_t i = (*n)++;
    while (i > 0 && pair_less(p, h[(i - 1) / 2])) { h[i] = h[(i - 1) / 2]; i = (i - 1) / 2; }
    h[i] = p;
}

static bpe_pair heap_pop(bpe_pair *h, size_t *n)
{
    bpe_pair top = h[0], last = h[--*n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && pair_less(h[c + 1], h[c])) c++;
        if (!pair_less(h[c], last)) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = last;
    return top;
}

/* pushes the pair starting at symbol pos when the merges have it */
static void push_pair(const dsrt_tokenizer *t, const bpe_sym *sym, bpe_pair *h, size_t *n, int32_t pos)
{
    if (pos < 0 || sym[pos].next < 0) return;
    const merge_slot *m = merge_find(t, pair_key(sym[pos].id, sym[sym[pos].next].id));
    if (m->key) heap_push(h, n, (bpe_pair){ m->rank, pos, m->merged });
}

static int bpe(dsrt_tokenizer *t, const unsigned char *s, size_t len, out_ids *o)
{
    if (len > INT32_MAX / 4) return dsrt_err("tokenizer: a piece of %zu bytes is too long", len);
    /* every merge pushes at most 2 pairs onto the len - 1 initial ones */
    if (reserve(&t->sym, &t->sym_cap, len, sizeof(bpe_sym)) || reserve(&t->heap, &t->heap_cap, 3 * len, sizeof(bpe_pair)))
        return -1;
    bpe_sym *sym = t->sym;
    bpe_pair *heap = t->heap;
    size_t nh = 0;
    for (size_t i = 0; i < len; i++) {
        int32_t id = t->byte_id[s[i]];
        if (id < 0) return dsrt_err("tokenizer: byte 0x%02X has no token in the vocabulary", s[i]);
        sym[i] = (bpe_sym){ id, (int32_t)i - 1, i + 1 < len ? (int32_t)i + 1 : -1 };
    }
    if (t->merge_cap)
        for (size_t i = 0; i + 1 < len; i++) push_pair(t, sym, heap, &nh, (int32_t)i);
    while (nh) {
        bpe_pair p = heap_pop(heap, &nh);
        bpe_sym *left = &sym[p.pos];
        if (left->id < 0 || left->next < 0) continue;
        bpe_sym *right = &sym[left->next];
        const merge_slot *m = merge_find(t, pair_key(left->id, right->id));
        if (!m->key || m->merged != p.merged) continue; /* stale: a neighbour was merged since */
        left->id = p.merged;
        right->id = -1;
        left->next = right->next;
        if (left->next >= 0) sym[left->next].prev = p.pos;
        push_pair(t, sym, heap, &nh, left->prev);
        push_pair(t, sym, heap, &nh, p.pos);
    }
    for (int32_t i = 0; i >= 0; i = sym[i].next)
        if (push_id(o, sym[i].id)) return -1;
    return 0;
}

/* Split regex `level` on s[0..len) as its whole subject, each match and gap going on to the next level */
static int split(dsrt_tokenizer *t, int level, const char *s, size_t len, out_ids *o)
{
    if (len == 0) return 0;
    if (level == t->n_splits) return bpe(t, (const unsigned char *)s, len, o);
    pcre2_code *re = t->split[level];
    pcre2_match_data *md = t->md[level];
    size_t at = 0, gap = 0;
    while (at < len) {
        int rc = pcre2_match(re, (PCRE2_SPTR)s, len, at, PCRE2_NO_UTF_CHECK, md, NULL);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof msg);
            return dsrt_err("tokenizer: Split regex failed: %s", (char *)msg);
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        size_t b = ov[0], e = ov[1];
        if (e == b) { /* an empty match cuts nothing: step over one character */
            at = b + 1;
            while (at < len && ((unsigned char)s[at] & 0xC0) == 0x80) at++;
            continue;
        }
        /* b and e are read before the next levels run; each level has its own match data */
        if (split(t, level + 1, s + gap, b - gap, o) || split(t, level + 1, s + b, e - b, o)) return -1;
        at = gap = e;
    }
    return split(t, level + 1, s + gap, len - gap, o);
}

static int by_first_byte(const void *a, const void *b)
{
    unsigned x = (unsigned char)((const added_token *)a)->s[0], y = (unsigned char)((const added_token *)b)->s[0];
    return (x > y) - (x < y);
}

/* the scan below looks only at the added tokens that start with the byte at hand */
static void sort_added(dsrt_tokenizer *t)
{
    qsort(t->added, t->n_added, sizeof *t->added, by_first_byte);
    size_t k = 0;
    for (int b = 0; b <= 256; b++) {
        while (k < t->n_added && (unsigned char)t->added[k].s[0] < b) k++;
        t->first[b] = k;
    }
    t->added_sorted = 1;
}

/* Cuts the added tokens of one pass (normalized = 0 or 1) out of s, leftmost-longest; the text
 * between goes on to pass 1 (after pass 0) or to the Split regexes (after pass 1) */
static int cut_added(dsrt_tokenizer *t, int pass, int special, const char *s, size_t len, out_ids *o)
{
    size_t gap = 0;
    for (size_t i = 0; i < len; i++) {
        const added_token *best = NULL;
        unsigned char c = (unsigned char)s[i];
        for (size_t k = t->first[c]; k < t->first[c + 1]; k++) {
            const added_token *a = &t->added[k];
            if (a->normalized != pass || a->len > len - i) continue;
            if ((!best || a->len > best->len) && memcmp(a->s, s + i, a->len) == 0) best = a;
        }
        if (!best) continue;
        /* a special token with special = 0 is text, but it is consumed as a match all the same, as
         * the library's automaton does, so no token is found inside it */
        if (!best->special || special) {
            int rc = pass == 0 ? cut_added(t, 1, special, s + gap, i - gap, o) : split(t, 0, s + gap, i - gap, o);
            if (rc || push_id(o, best->id)) return -1;
            gap = i + best->len;
        }
        i += best->len - 1;
    }
    return pass == 0 ? cut_added(t, 1, special, s + gap, len - gap, o) : split(t, 0, s + gap, len - gap, o);
}

int dsrt_tokenizer_encode(dsrt_tokenizer *t, const char *text, size_t len, int special, const int32_t **ids,
                          size_t *n)
{
    if (!utf8_valid(text, len)) {
        if (reserve(&t->text, &t->text_cap, 3 * len, 1)) return -1;
        len = dsrt_utf8_lossy(text, len, t->text);
        text = t->text;
    }
    if (!t->added_sorted) sort_added(t);
    out_ids o = { t, 0 };
    if (reserve(&t->out, &t->out_cap, 1, sizeof(int32_t)) || cut_added(t, 0, special, text, len, &o)) return -1;
    *ids = t->out;
    *n = o.n;
    return 0;
}

int dsrt_tokenizer_raw_bytes(const dsrt_tokenizer *t, int64_t id, const char **bytes, size_t *len)
{
    if (id < 0 || id >= t->n_ids || !t->bytes[id]) return dsrt_err("tokenizer: unknown token id %lld", (long long)id);
    *bytes = t->bytes[id];
    *len = t->nbytes[id];
    return 0;
}

int dsrt_tokenizer_decode(dsrt_tokenizer *t, const int64_t *ids, size_t n, int skip_special, const char **out,
                          size_t *out_len)
{
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->n_ids || !t->bytes[ids[i]])
            return dsrt_err("tokenizer: unknown token id %lld (at position %zu)", (long long)ids[i], i + 1);
        total += t->nbytes[ids[i]];
    }
    /* joined bytes, then their lossy text behind them (at most 3 bytes per byte) */
    if (reserve(&t->joined, &t->joined_cap, 4 * total + 1, 1)) return -1;
    char *joined = t->joined;
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        if (skip_special && t->special[ids[i]]) continue;
        memcpy(joined + o, t->bytes[ids[i]], t->nbytes[ids[i]]);
        o += t->nbytes[ids[i]];
    }
    *out = joined + o;
    *out_len = dsrt_utf8_lossy(joined, o, joined + o);
    return 0;
}
