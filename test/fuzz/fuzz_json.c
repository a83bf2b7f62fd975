// fuzz_json.c: json_parse on arbitrary bytes. Whatever it accepts must be a tree whose objects
// have unique keys and whose strings are valid UTF-8 that json_write_string writes back as JSON
// that parses to the same bytes.
#include "../../json.h"
#include "../../tokenizer.h"
#include "fuzz.h"

// Every object of j has unique keys (checked pairwise for up to 200 keys), strings are UTF-8.
static void check_tree(const Json *j) {
    if (j->type == JSON_STRING) FUZZ_ASSERT(utf8_valid_prefix(j->str, j->len) == j->len && j->str[j->len] == 0);
    if (j->type != JSON_ARRAY && j->type != JSON_OBJECT) return;
    for (size_t k = 0; k < j->len; k++) {
        check_tree(&j->items[k]);
        if (j->type != JSON_OBJECT || j->len > 200) continue;
        for (size_t i = 0; i < k; i++)
            FUZZ_ASSERT(j->key_lens[i] != j->key_lens[k] || memcmp(j->keys[i], j->keys[k], j->key_lens[k]) != 0);
        FUZZ_ASSERT(json_get(j, j->keys[k]) != NULL || strlen(j->keys[k]) != j->key_lens[k]);
    }
}

// json_write_string(s) parses back to s.
static void check_round_trip(const char *s, size_t n) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    json_write_string(f, s, n);
    fclose(f);
    Json back;
    Err e;
    FUZZ_ASSERT(json_parse(&back, buf, len, &e) == 0);
    FUZZ_ASSERT(back.type == JSON_STRING && back.len == n && memcmp(back.str, s, n) == 0);
    json_free(&back);
    free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
    Json j;
    Err e;
    if (json_parse(&j, (const char *)data, n, &e) != 0) {
        FUZZ_ASSERT(strncmp(e.msg, "line ", 5) == 0);
        return 0;
    }
    check_tree(&j);
    if (j.type == JSON_STRING) check_round_trip(j.str, j.len);
    if (j.type == JSON_OBJECT && j.len > 0) check_round_trip(j.keys[0], j.key_lens[0]);
    json_free(&j);
    return 0;
}
