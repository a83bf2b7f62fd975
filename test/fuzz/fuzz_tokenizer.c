// fuzz_tokenizer.c: the tokenizer. The first byte of the input picks what the rest is:
//   0: text for Qwen2.5's tokenizer (data/tokenizer.json, loaded once): encode, then decode must
//      give the text back (after NFC, what the normalizer does, when no added token splits the
//      text: NFC applies to each part), and the streaming decoder the same;
//   1: token ids (4 bytes each, little endian, some out of range) to decode, whole and streaming;
//   2: a tokenizer.json (small ones: the fixtures') to load, then encode and decode a fixed text.
#include "../../tokenizer.h"
#include "fuzz.h"

static Tokenizer qwen;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    fuzz_init("tokenizer");
    Err e;
    if (tokenizer_load(&qwen, "data/tokenizer.json", &e) != 0) {
        fprintf(stderr, "%s (run from the repository root)\n", e.msg);
        exit(1);
    }
    return 0;
}

// ids decoded one at a time by the streaming decoder, concatenated. malloc'ed, *len bytes.
// The piece buffer holds 64 + three times the longest token's bytes (each may become U+FFFD).
static char *stream_decode(const Tokenizer *tok, const int *ids, int n, size_t *len) {
    size_t longest = 0, total = 0, l;
    for (int k = 0; k < n; k++) {
        tokenizer_token_bytes(tok, ids[k], &l);
        longest = l > longest ? l : longest;
        total += 3 * l;
    }
    int cap = (int)(3 * longest + 64);
    char *piece = malloc((size_t)cap), *out = malloc(total + 64);
    DecodeStream s = {0};
    size_t at = 0;
    for (int k = 0; k < n; k++) {
        int w = decode_stream_push(&s, tok, ids[k], piece, cap);
        memcpy(out + at, piece, (size_t)w), at += (size_t)w;
    }
    int w = decode_stream_flush(&s, piece, cap);
    memcpy(out + at, piece, (size_t)w), at += (size_t)w;
    free(piece);
    *len = at;
    return out;
}

// Decodes ids whole and streaming: the same bytes, valid UTF-8.
static char *check_decode(const Tokenizer *tok, const int *ids, int n) {
    char *whole = tokenizer_decode(tok, ids, n);
    size_t len, wlen = strlen(whole);
    char *streamed = stream_decode(tok, ids, n, &len);
    FUZZ_ASSERT(utf8_valid_prefix(streamed, len) == len);
    int nul = memchr(streamed, 0, len) != NULL;  // a NUL byte decoded: strlen(whole) stops there
    FUZZ_ASSERT((nul ? wlen < len : wlen == len) && memcmp(streamed, whole, wlen) == 0);
    free(streamed);
    return whole;
}

static void fuzz_encode(const char *text, size_t n) {
    int *ids;
    Err e;
    int k = tokenizer_encode(&qwen, text, n, &ids, &e);
    FUZZ_ASSERT((k < 0) == (utf8_valid_prefix(text, n) < n));
    if (k < 0) return;
    for (int i = 0; i < k; i++) FUZZ_ASSERT(ids[i] >= 0 && ids[i] < qwen.n_vocab);
    char *back = check_decode(&qwen, ids, k);
    if (!memchr(text, '<', n) && !memchr(text, 0, n)) {  // no added token: NFC applies to the whole text (else to the parts between)
        size_t nfc_len;
        char *nfc = tokenizer_nfc(text, n, &nfc_len);
        FUZZ_ASSERT(strlen(back) == nfc_len && memcmp(back, nfc, nfc_len) == 0);
        free(nfc);
    }
    free(back);
    free(ids);
}

static void fuzz_ids(const uint8_t *data, size_t n) {
    int k = (int)(n / 4), *ids = malloc(sizeof(int) * (size_t)(k + 1));
    for (int i = 0; i < k; i++) {
        uint32_t v = (uint32_t)data[4 * i] | (uint32_t)data[4 * i + 1] << 8 | (uint32_t)data[4 * i + 2] << 16 | (uint32_t)data[4 * i + 3] << 24;
        ids[i] = (int)(v % (uint32_t)(qwen.n_vocab + 16)) - 8;  // a few below 0 and past the end
    }
    free(check_decode(&qwen, ids, k));
    free(ids);
}

static void fuzz_tokenizer_json(const uint8_t *data, size_t n) {
    static const char text[] = "Hello, world! <|im_start|>user\n日本の首都は？<|im_end|>\n\t  123 é";
    fuzz_write("tokenizer.json", data, n);
    Tokenizer tok;
    Err e;
    if (n == 0 || tokenizer_load(&tok, fuzz_path("tokenizer.json"), &e) != 0) return;
    int *ids;
    int k = tokenizer_encode(&tok, text, sizeof text - 1, &ids, &e);
    FUZZ_ASSERT(k >= 0);
    for (int i = 0; i < k; i++) FUZZ_ASSERT(ids[i] >= 0 && ids[i] < tok.n_vocab);
    free(check_decode(&tok, ids, k));
    free(ids);
    tokenizer_free(&tok);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
    if (n == 0) return 0;
    if (data[0] % 3 == 0) fuzz_encode((const char *)data + 1, n - 1);
    else if (data[0] % 3 == 1) fuzz_ids(data + 1, n - 1);
    else fuzz_tokenizer_json(data + 1, n - 1);
    return 0;
}
