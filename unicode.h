// unicode.h: the Unicode properties the tokenizer needs, from tables that test/gen_unicode.py
// generates into unicode.c from the Unicode Character Database.
//
// What it leaves out: case mapping, scripts, compatibility (NFKC) decompositions, Hangul syllables
// (composed and decomposed algorithmically in tokenizer.c). Read tokenizer.c next.
#ifndef UNICODE_H
#define UNICODE_H

#include <stdint.h>

// Character classes of the Qwen2 pre-tokenizer regex: \p{L}, \p{N}, \s (White_Space), the rest.
enum { UCLASS_OTHER = 0, UCLASS_LETTER = 1, UCLASS_NUMBER = 2, UCLASS_SPACE = 3 };
int unicode_class(uint32_t cp);

// Canonical combining class (0 for starters).
int unicode_ccc(uint32_t cp);

// NFC_Quick_Check of one code point.
enum { UNICODE_QC_YES = 0, UNICODE_QC_MAYBE = 1, UNICODE_QC_NO = 2 };
int unicode_nfc_qc(uint32_t cp);

// Full canonical decomposition of cp into out (outputs first); returns its length, 0 when cp does
// not decompose. Hangul syllables return 0.
#define UNICODE_MAX_DECOMP 4
int unicode_decompose(uint32_t out[UNICODE_MAX_DECOMP], uint32_t cp);

// The primary composite of the pair (a, b), or 0 when there is none (Hangul excepted).
uint32_t unicode_compose(uint32_t a, uint32_t b);

#endif
