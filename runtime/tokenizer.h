/*
 * tokenizer.h - the byte-level BPE tokenizer of Hugging Face `tokenizer.json` files (DeepSeek V3/V4;
 * FORMATS.md §3), whose ids must equal the `tokenizers` library's exactly.
 *
 * The Lua side (lua/dsrt/tokenizer.lua) reads the JSON and hands over what it found: every token's
 * string, the merges as (left id, right id, merged id) in rank order, the added tokens, and the
 * pre-tokenizer's Split regexes. Everything that runs per character of text is here.
 *
 * Encoding, in the library's order: added tokens are cut out first (leftmost-longest; the ones with
 * `normalized: false` in a first pass over the whole text, then the `normalized: true` ones in the
 * pieces left, as tokenizers does), then each Split regex cuts every current piece into matches and
 * the gaps between them (behaviour Isolated: both kept, in order), then each final piece's bytes are
 * merged by rank (lowest rank first, leftmost among equals).
 *
 * Invalid UTF-8 in the text: tokenizers only takes valid strings, so dsrt first replaces every
 * maximal invalid subsequence with U+FFFD, exactly as Rust's String::from_utf8_lossy does, and
 * encodes the result. Decoding joins the tokens' bytes and applies the same lossy conversion, as
 * the ByteLevel decoder does.
 */
#ifndef DSRT_TOKENIZER_H
#define DSRT_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

typedef struct dsrt_tokenizer dsrt_tokenizer;

dsrt_tokenizer *dsrt_tokenizer_new(int32_t n_ids); /* ids 0 .. n_ids-1 */
void dsrt_tokenizer_free(dsrt_tokenizer *t);

/* The token's string as the JSON spells it. Its bytes (for decoding) are its characters mapped back
 * through the byte-level table, or its UTF-8 as is when some character is outside that table (the
 * ByteLevel decoder's rule; added tokens such as <｜User｜>). A model token of one byte becomes the
 * starting symbol of that byte. */
int dsrt_tokenizer_set_token(dsrt_tokenizer *t, int32_t id, const char *s, size_t len, int model_token);
/* the next merge rank: left + right -> merged (a repeated pair keeps the later rank, as tokenizers) */
int dsrt_tokenizer_add_merge(dsrt_tokenizer *t, int32_t left, int32_t right, int32_t merged);
int dsrt_tokenizer_add_added(dsrt_tokenizer *t, const char *content, size_t len, int32_t id, int special,
                             int normalized);
/* an Oniguruma-syntax Split regex (behaviour Isolated), applied after the ones added before it */
int dsrt_tokenizer_add_split(dsrt_tokenizer *t, const char *pattern, size_t len);

/* ids of text. They live in the tokenizer's own buffer until its next encode, so a caller that
 * raises (Lua) cannot leak them; one tokenizer therefore encodes on one thread at a time.
 * special = 0 encodes special added tokens in the text
 * as plain text (tokenizers' encode_special_tokens); non-special added tokens are still matched. */
int dsrt_tokenizer_encode(dsrt_tokenizer *t, const char *text, size_t len, int special, const int32_t **ids,
                          size_t *n);
/* the text of ids, in the tokenizer's buffer like encode's ids; unknown ids are an error */
int dsrt_tokenizer_decode(dsrt_tokenizer *t, const int64_t *ids, size_t n, int skip_special, const char **out,
                          size_t *out_len);
/* the bytes of one id, before any UTF-8 repair (pointer into the tokenizer); unknown ids are an error */
int dsrt_tokenizer_raw_bytes(const dsrt_tokenizer *t, int64_t id, const char **bytes, size_t *len);
int dsrt_tokenizer_is_special(const dsrt_tokenizer *t, int32_t id);

/* s with each maximal invalid UTF-8 subsequence replaced by U+FFFD, into out (room for 3 * len
 * bytes); returns the length written */
size_t dsrt_utf8_lossy(const char *s, size_t len, char *out);
/* how many bytes at the end of s begin a UTF-8 character that is not complete yet (0..3) */
size_t dsrt_utf8_incomplete_tail(const char *s, size_t len);

#endif
