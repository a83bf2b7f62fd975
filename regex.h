// regex.h: Python's re.fullmatch for the regular expressions that PEFT adapter configs hold
// (target_modules, exclude_modules, rank_pattern / alpha_pattern keys, layers_pattern).
//
// Supported: literals, `.`, classes `[a-z_]` `[^.]`, `\d \w \s \D \W \S`, escaped punctuation,
// groups `( )` `(?: )` `(?P<name> )`, `|`, the quantifiers `* + ? {m} {m,} {m,n}` (lazy `?` forms
// too: they do not change whether a full match exists), and `^ $ \A \Z`.
// Refused with a reason: look-arounds, back-references, inline flags, `\b`, possessive quantifiers.
// Matching is a Thompson NFA simulation (no backtracking): time linear in the text.
// Text and pattern are bytes (module names are ASCII). Read lora.c for the uses.
#ifndef REGEX_H
#define REGEX_H

#include "common.h"

// 1: pattern matches the whole of text; 0: it does not; -1: the pattern is invalid or uses
// syntax this matcher does not support (e filled: "regex 'PATTERN': reason").
int regex_fullmatch(const char *pattern, const char *text, Err *e);

#endif
