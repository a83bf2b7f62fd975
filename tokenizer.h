// tokenizer.h: Qwen2's byte-level BPE, giving exactly the ids of Hugging Face's `tokenizers`.
#ifndef TOKENIZER_H
#define TOKENIZER_H

#include <stddef.h>
#include "common.h"

// Token types as in GGUF's tokenizer.ggml.token_type.
enum { TOKEN_NORMAL = 1, TOKEN_UNKNOWN = 2, TOKEN_CONTROL = 3, TOKEN_USER_DEFINED = 4, TOKEN_UNUSED = 5, TOKEN_BYTE = 6 };

typedef struct TokenizerImpl TokenizerImpl;  // hash tables, merge ranks: private to tokenizer.c

typedef struct {
    int n_vocab;           // number of ids, added tokens included (151665 for Qwen2.5)
    char **vocab;          // [n_vocab] token strings in byte-level form ("Ġthe"), as in tokenizer.json
    int *token_type;       // [n_vocab] TOKEN_NORMAL, or TOKEN_CONTROL for added special tokens
    int n_merges;
    char **merges;         // [n_merges] "left right", by rank
    int eos_id;            // <|im_end|> when present, else <|endoftext|>
    int pad_id;            // <|endoftext|>
    int im_start_id, im_end_id, endoftext_id;  // -1 when absent
    TokenizerImpl *impl;
} Tokenizer;

// Loads a tokenizer.json, or the tokenizer.json of a model directory.
int tokenizer_load(Tokenizer *tok, const char *path, Err *e);

// Builds a tokenizer from vocabulary arrays (what GGUF's tokenizer.ggml.* keys hold). Copies
// everything. Types: TOKEN_CONTROL / TOKEN_USER_DEFINED tokens are matched inside text as
// added tokens. Rejects merges naming unknown tokens, duplicate tokens, bad UTF-8.
// `source` names the file for error messages.
int tokenizer_build(Tokenizer *tok, const char *source, char **vocab, const int *token_type,
                    int n_vocab, char **merges, int n_merges, Err *e);
void tokenizer_free(Tokenizer *tok);

// text[0..len) (UTF-8) to ids: NFC, added tokens, Qwen2 pre-tokenizer, byte-level BPE.
// *ids is malloc'ed; returns the number of ids, or -1 (invalid UTF-8) with e filled.
int tokenizer_encode(const Tokenizer *tok, const char *text, size_t len, int **ids, Err *e);

// Bytes of s[0..n) before the first one that is not part of valid UTF-8: n when all of it is valid.
size_t utf8_valid_prefix(const char *s, size_t n);

// Unicode NFC of text[0..len) (valid UTF-8, as tokenizer_encode applies it): malloc'ed,
// NUL-terminated, *out_len bytes. Pure ASCII and text already in NFC cost one quick scan.
char *tokenizer_nfc(const char *text, size_t len, size_t *out_len);

// Id of an exact token string (e.g. "<|im_end|>"), or -1.
int tokenizer_token_id(const Tokenizer *tok, const char *s);

// The bytes id decodes to, before any U+FFFD replacement (a token may hold part of a UTF-8
// character): what its byte-level characters stand for ("Ġthe" -> " the"), or its own string when
// it is not all byte-level. *len bytes, not NUL-terminated, owned by tok; NULL (*len = 0) for ids
// out of range.
const unsigned char *tokenizer_token_bytes(const Tokenizer *tok, int id, size_t *len);

// ids to UTF-8 as Hugging Face decodes (invalid UTF-8 becomes U+FFFD); malloc'ed, NUL-terminated.
char *tokenizer_decode(const Tokenizer *tok, const int *ids, int n);

// Streaming decode for generation: feed one id at a time, get the bytes that now form whole
// characters (never half a character); flush at the end.
typedef struct {
    unsigned char pending[8];
    int n_pending;
} DecodeStream;
// Start from a zeroed DecodeStream. Appends to out (capacity cap, at least 64 + longest token)
// and returns the bytes written; never writes past cap (in Qwen2's vocabulary U+FFFD replacements
// add at most 13 bytes to a token, so 64 + longest token always suffices; what does not fit is lost).
int decode_stream_push(DecodeStream *s, const Tokenizer *tok, int id, char *out, int cap);
int decode_stream_flush(DecodeStream *s, char *out, int cap);

#endif
