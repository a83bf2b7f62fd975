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

// The line after the one at line, or NULL after the last.
static const char *next_line(const char *line) {
    const char *eol = strchr(line, '\n');
    return eol ? eol + 1 : NULL;
}

// The functions defined (or declared) at the top level of one C file: a line that starts with a
// letter and has an identifier right before its first '('.
static void defined_functions(Names *s, const char *path) {
    char *text = read_file(path, NULL, NULL);
    if (!text) return;
    for (const char *line = text; line && *line; line = next_line(line)) {
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

// The names of a trace, in order: the word after "trace" on each line of `sft train --trace`.
static void trace_names(Names *s, const char *text) {
    for (const char *line = text; line && *line; line = next_line(line)) {
        if (strncmp(line, "trace ", 6) != 0) continue;
        const char *p = line + 6;
        while (*p == ' ') p++;
        size_t n = 0;
        while (is_ident((unsigned char)p[n])) n++;
        if (n) names_add(s, p, n);
    }
}

// The stops of a tutorial's walk: the first `name()` of each "### " heading, in order.
static void tutorial_stops(Names *s, const char *text) {
    for (const char *line = text; line && *line; line = next_line(line)) {
        if (strncmp(line, "### ", 4) != 0) continue;
        const char *eol = strchr(line, '\n'), *p = line;
        while ((p = strchr(p, '`')) && (!eol || p < eol)) {
            size_t n = 0;
            while (is_ident((unsigned char)p[1 + n])) n++;
            if (n && strncmp(p + 1 + n, "()`", 3) == 0) {
                names_add(s, p + 1, n);
                break;
            }
            p++;
        }
    }
}

// Every stop of the tutorial that the trace shows comes in the trace's order (a subsequence).
static void check_walk(const char *doc, const Names *trace) {
    char *text = read_file(doc, NULL, NULL);
    Names stops = {0};
    if (text) tutorial_stops(&stops, text);
    int pos = 0, matched = 0, in_order = 1;
    char first_bad[64] = "";
    for (int i = 0; i < stops.n && in_order; i++) {
        if (!names_has(trace, stops.names[i])) continue;  // main(), cmd_train(): frames the trace does not print
        while (pos < trace->n && strcmp(trace->names[pos], stops.names[i]) != 0) pos++;
        if (pos == trace->n) in_order = 0, snprintf(first_bad, sizeof first_bad, "%s", stops.names[i]);
        else matched++;
    }
    char name[160];
    snprintf(name, sizeof name, "%s: its %d stops that sft train --trace prints come in the trace's order", doc, matched);
    check(text && in_order && matched >= 10, name, "%s", in_order ? "fewer than 10 stops matched" : first_bad);
    names_free(&stops);
    free(text);
}

// One step of sft train --trace on a tiny Q4_0 model.
static void test_trace_walk(void) {
    scratch_dir("docs");
    FILE *f = fopen(TMP "/data.jsonl", "w");
    if (f) fputs("{\"prompt\": \"ab\", \"completion\": \"cd\"}\n{\"prompt\": \"ef\", \"completion\": \"gh\"}\n", f), fclose(f);
    int rc = run_commandf(NULL, TMP "/init.txt", "%s init --config tiny --tokenizer test/fixtures/tied/model/tokenizer.json "
                          "--type q4_0 --seed 1 --out " TMP "/tiny.gguf", sft_binary());
    if (rc == 0)
        rc = run_commandf(NULL, TMP "/trace.txt", "%s train --model " TMP "/tiny.gguf --data " TMP "/data.jsonl --out " TMP
                          "/out --trace --threads 1", sft_binary());
    char *text = read_file(TMP "/trace.txt", NULL, NULL);
    Names trace = {0};
    if (text) trace_names(&trace, text);
    check(rc == 0 && names_has(&trace, "matmul") && names_has(&trace, "adamw_step"),
          "sft train --trace prints the kernels of one step", "exit %d, %d trace lines", rc, trace.n);
    check_walk("docs/TUTORIAL.md", &trace);
    check_walk("docs/TUTORIAL.ja.md", &trace);
    names_free(&trace);
    free(text);
}

void test_docs(void) {
    Names functions = {0};
    all_functions(&functions);
    check(names_has(&functions, "main") && names_has(&functions, "matmul"), "docs: the function index finds main() and matmul()",
          "%d functions", functions.n);
    for (size_t i = 0; i < sizeof DOCS / sizeof DOCS[0]; i++) check_citations(DOCS[i], &functions);
    names_free(&functions);
    test_trace_walk();
}
