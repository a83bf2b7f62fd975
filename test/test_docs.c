// test_docs.c: the documents cannot drift from the code. Every function the README and the
// tutorials cite as `name()` is defined in the sources, every file cited as `file.c` exists, and
// the stops of the tutorial's walk through one training step come in the order that
// `sft train --trace` prints the calls that run.
#include <ctype.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../common.h"
#include "test.h"

#define TMP "test/tmp/docs"

static const char *const DOCS[] = {"README.md", "README.ja.md", "docs/TUTORIAL.md", "docs/TUTORIAL.ja.md"};
static const char *const SOURCE_DIRS[] = {".", "kernels", "test"};

// A list of names (functions defined in the sources, or the calls of a trace).
typedef struct {
    char **names;
    int n, cap;
} Names;

static void names_add(Names *s, const char *name, size_t len) {
    if (s->n == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 256;
        char **grown = xmalloc((size_t)s->cap * sizeof *grown);
        if (s->n) memcpy(grown, s->names, (size_t)s->n * sizeof *grown);
        free(s->names);
        s->names = grown;
    }
    char *copy = xmalloc(len + 1);
    memcpy(copy, name, len);
    copy[len] = 0;
    s->names[s->n++] = copy;
}

static int names_has(const Names *s, const char *name) {
    for (int i = 0; i < s->n; i++)
        if (strcmp(s->names[i], name) == 0) return 1;
    return 0;
}

static void names_free(Names *s) {
    for (int i = 0; i < s->n; i++) free(s->names[i]);
    free(s->names);
}

static int is_ident(int c) { return isalnum(c) || c == '_'; }

// The functions defined (or declared) at the top level of one C file: a line that starts with a
// letter and has an identifier right before its first '('.
static void defined_functions(Names *s, const char *path) {
    char *text = read_file(path, NULL, NULL);
    if (!text) return;
    for (char *line = text; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
        if (!isalpha((unsigned char)*line)) continue;
        char *paren = strchr(line, '('), *eol = strchr(line, '\n');
        if (!paren || (eol && paren > eol)) continue;
        char *end = paren, *start = paren;
        while (start > line && is_ident((unsigned char)start[-1])) start--;
        if (start < end) names_add(s, start, (size_t)(end - start));
    }
    free(text);
}

static void all_functions(Names *s) {
    for (size_t d = 0; d < sizeof SOURCE_DIRS / sizeof SOURCE_DIRS[0]; d++) {
        DIR *dir = opendir(SOURCE_DIRS[d]);
        if (!dir) continue;
        for (struct dirent *e; (e = readdir(dir));) {
            size_t n = strlen(e->d_name);
            if (n < 3 || (strcmp(e->d_name + n - 2, ".c") != 0 && strcmp(e->d_name + n - 2, ".h") != 0)) continue;
            char path[512];
            snprintf(path, sizeof path, "%s/%s", SOURCE_DIRS[d], e->d_name);
            defined_functions(s, path);
        }
        closedir(dir);
    }
}

static int file_exists(const char *path) {
    FILE *f = fopen(path, "rb");
    if (f) fclose(f);
    return f != NULL;
}

// Checks the `code spans` of one document: `name()` must be a defined function, `path.c` and
// `path.h` must exist. Returns the number of citations checked.
static int check_citations(const char *doc, const Names *functions) {
    char *text = read_file(doc, NULL, NULL);
    if (!text) return check(0, doc, "cannot read it"), 0;
    int cited = 0, missing = 0;
    char first_missing[128] = "";
    for (char *p = strchr(text, '`'); p; p = strchr(p + 1, '`')) {
        if (strncmp(p, "```", 3) == 0) {  // a fenced block: commands and listings, not citations
            char *close = strstr(p + 3, "```");
            if (!close) break;
            p = close + 2;
            continue;
        }
        char *end = strchr(p + 1, '`');
        if (!end) break;
        size_t len = (size_t)(end - p - 1);
        char span[128];
        if (len > 0 && len < sizeof span) {
            memcpy(span, p + 1, len), span[len] = 0;
            int found = -1;  // -1: not a citation
            if (len > 2 && strcmp(span + len - 2, "()") == 0) {
                span[len - 2] = 0;
                int ident = 1;
                for (char *c = span; *c; c++) ident = ident && is_ident((unsigned char)*c);
                if (ident) found = names_has(functions, span);
                span[len - 2] = '(';
            } else if (len > 2 && (strcmp(span + len - 2, ".c") == 0 || strcmp(span + len - 2, ".h") == 0) &&
                       !strchr(span, ' ') && !strchr(span, '*')) {
                found = file_exists(span);
            }
            if (found >= 0) cited++;
            if (found == 0 && missing++ == 0) snprintf(first_missing, sizeof first_missing, "%s", span);
        }
        p = end;
    }
    free(text);
    char name[160];
    snprintf(name, sizeof name, "%s: %d cited functions and files exist", doc, cited);
    check(missing == 0 && cited > 0, name, "%d missing, the first `%s`", missing, first_missing);
    return cited;
}

void test_docs(void) {
    Names functions = {0};
    all_functions(&functions);
    check(names_has(&functions, "main") && names_has(&functions, "matmul"), "docs: the function index finds main() and matmul()",
          "%d functions", functions.n);
    for (size_t i = 0; i < sizeof DOCS / sizeof DOCS[0]; i++) check_citations(DOCS[i], &functions);
    names_free(&functions);
}
