// json.h: a small JSON parser (RFC 8259) for config.json, tokenizer.json, safetensors headers,
// adapter_config.json and the JSONL data files, and a few helpers to write JSON strings.
#ifndef JSON_H
#define JSON_H

#include <stdio.h>
#include "common.h"

typedef enum { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT } JsonType;

typedef struct Json Json;
struct Json {
    JsonType type;
    int boolean;       // JSON_BOOL
    double number;     // JSON_NUMBER
    char *str;         // JSON_STRING: UTF-8, NUL-terminated (may also hold \0 from "\u0000")
    size_t len;        // JSON_STRING: bytes in str; JSON_ARRAY/JSON_OBJECT: number of items
    Json *items;       // JSON_ARRAY/JSON_OBJECT: [len] values, in file order
    char **keys;       // JSON_OBJECT: [len] keys (UTF-8, NUL-terminated)
    size_t *key_lens;  // JSON_OBJECT: [len] key lengths in bytes
};

// Parses text[0..len) into *out. Handles every escape including \uXXXX surrogate pairs;
// rejects invalid UTF-8, lone surrogates, trailing garbage, nesting deeper than 256 and a key that
// appears twice in one object ("line L, column C: duplicate key \"KEY\" ...", at the second one).
// On error returns -1 with e->msg = "line L, column C: reason" (the caller prefixes the file name).
int json_parse(Json *out, const char *text, size_t len, Err *e);
void json_free(Json *j);

// Object member by key (keys are unique), or NULL when j is not an object or has no such key.
const Json *json_get(const Json *j, const char *key);

// Writes s[0..len) as a JSON string literal with quotes and escapes.
void json_write_string(FILE *f, const char *s, size_t len);

#endif
