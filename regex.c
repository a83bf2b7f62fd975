// regex.c: Python's re.fullmatch for PEFT's module-name patterns (regex.h), in three steps:
// parse the pattern into a tree of nodes, compile the tree into a program of NFA instructions
// (Thompson's construction), and run the program over the text keeping every live state at once
// (so a pattern like (a*)*b costs no more than a*b). Leaves out captures: only "does it match".
#include "regex.h"

#include <stdlib.h>
#include <string.h>

enum { MAX_PATTERN = 1000, MAX_NODES = 2048, MAX_CLASSES = 256, MAX_PROG = 4096, REP_LIMIT = 100 };

// Tree nodes. R_REP repeats child a from min to max times (max -1: unbounded).
enum { R_EMPTY, R_CHAR, R_ANY, R_CLASS, R_BOL, R_EOL, R_CAT, R_ALT, R_REP };
typedef struct {
    int kind;
    int a, b;       // children (R_CAT, R_ALT: a then b; R_REP: a)
    int min, max;   // R_REP
    int x;          // R_CHAR: the byte; R_CLASS: index into classes
} RNode;

// Instructions: CHAR x, ANY (any byte but '\n'), CLASS x, SPLIT x y (go on at both), JMP x,
// BOL (position 0), EOL (end of text), MATCH.
enum { I_CHAR, I_ANY, I_CLASS, I_SPLIT, I_JMP, I_BOL, I_EOL, I_MATCH };
typedef struct {
    int op, x, y;
} Inst;

typedef struct {
    const char *pattern;
    const char *p;                          // parse position
    RNode node[MAX_NODES];
    int n_nodes;
    unsigned char cls[MAX_CLASSES][32];     // byte sets, bit b of byte b / 8
    int n_classes;
    Inst prog[MAX_PROG];
    int n_prog;
    Err *e;
    int failed;
} Regex;

static int fail(Regex *r, const char *why) {
    if (!r->failed) err_set(r->e, "regex '%.200s': %s (at offset %d)", r->pattern, why, (int)(r->p - r->pattern));
    r->failed = 1;
    return 0;
}

static int new_node(Regex *r, int kind, int a, int b) {
    if (r->n_nodes == MAX_NODES) return fail(r, "pattern too large");
    r->node[r->n_nodes] = (RNode){.kind = kind, .a = a, .b = b};
    return r->n_nodes++;
}

static int new_class(Regex *r) {
    if (r->n_classes == MAX_CLASSES) return fail(r, "too many character classes"), -1;
    memset(r->cls[r->n_classes], 0, 32);
    return r->n_classes++;
}

static void set_bit(unsigned char *set, int c) { set[c >> 3] |= (unsigned char)(1u << (c & 7)); }
static int has_bit(const unsigned char *set, int c) { return set[c >> 3] >> (c & 7) & 1; }

// Adds \d, \w or \s (lower case) or their complements (upper case) to set.
static void add_shorthand(unsigned char *set, int letter) {
    unsigned char s[32] = {0};
    for (int c = 0; c < 256; c++) {
        int lc = letter | 0x20;
        int in = lc == 'd' ? (c >= '0' && c <= '9')
               : lc == 'w' ? ((c | 0x20) >= 'a' && (c | 0x20) <= 'z') || (c >= '0' && c <= '9') || c == '_'
               : c == ' ' || (c >= '\t' && c <= '\r');
        if (in != (letter != lc)) set_bit(s, c);
    }
    for (int i = 0; i < 32; i++) set[i] |= s[i];
}

// The byte an escape stands for (after the backslash), or -1 for \d \w \s \D \W \S (in *letter).
static int escape_byte(Regex *r, int *letter) {
    int c = (unsigned char)*r->p++;
    const char *map = "n\nt\tr\rf\fv\va\a";
    *letter = 0;
    if (c == 0) return fail(r, "pattern ends with a backslash"), -2;
    if (strchr("dwsDWS", c)) return *letter = c, -1;
    for (const char *m = map; *m; m += 2)
        if (c == m[0]) return (unsigned char)m[1];
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
        return fail(r, "escape not supported (back-references, \\b, \\x.. and the like)"), -2;
    return c;
}

// [...] after the '['.
static int parse_class(Regex *r) {
    int k = new_class(r), negate = *r->p == '^', first = 1;
    if (k < 0) return 0;
    unsigned char *set = r->cls[k];
    r->p += negate;
    while (*r->p && (*r->p != ']' || first)) {
        first = 0;
        int letter, lo = (unsigned char)*r->p++;
        if (lo == '\\' && (lo = escape_byte(r, &letter)) < 0) {
            if (lo == -2) return 0;
            add_shorthand(set, letter);
            continue;
        }
        int hi = lo;
        if (r->p[0] == '-' && r->p[1] && r->p[1] != ']') {
            r->p++;
            hi = (unsigned char)*r->p++;
            if (hi == '\\' && (hi = escape_byte(r, &letter)) < 0) return hi == -2 ? 0 : fail(r, "bad range in a class");
            if (hi < lo) return fail(r, "bad range in a class");
        }
        for (int c = lo; c <= hi; c++) set_bit(set, c);
    }
    if (*r->p != ']') return fail(r, "unterminated character class");
    r->p++;
    if (negate)
        for (int i = 0; i < 32; i++) set[i] = (unsigned char)~set[i];
    int n = new_node(r, R_CLASS, 0, 0);
    r->node[n].x = k;
    return n;
}

static int parse_alt(Regex *r);

// A group after its '('.
static int parse_group(Regex *r) {
    if (r->p[0] == '?' && r->p[1] == ':') r->p += 2;
    else if (r->p[0] == '?' && r->p[1] == 'P' && r->p[2] == '<') {
        const char *end = strchr(r->p, '>');
        if (!end) return fail(r, "unterminated group name");
        r->p = end + 1;
    } else if (r->p[0] == '?') return fail(r, "look-arounds, inline flags and other (?...) groups are not supported");
    int n = parse_alt(r);
    if (r->failed) return 0;
    if (*r->p != ')') return fail(r, "missing )");
    r->p++;
    return new_node(r, R_CAT, new_node(r, R_EMPTY, 0, 0), n);  // a group may be repeated: (a*)*
}

static int parse_atom(Regex *r) {
    int c = (unsigned char)*r->p++, letter;
    if (c == '(') return parse_group(r);
    if (c == '[') return parse_class(r);
    if (c == '.') return new_node(r, R_ANY, 0, 0);
    if (c == '^') return new_node(r, R_BOL, 0, 0);
    if (c == '$') return new_node(r, R_EOL, 0, 0);
    if (c == '*' || c == '+' || c == '?') return fail(r, "nothing to repeat");
    if (c == '\\') {
        if (*r->p == 'A' || *r->p == 'Z') return new_node(r, *r->p++ == 'A' ? R_BOL : R_EOL, 0, 0);
        c = escape_byte(r, &letter);
        if (c == -2) return 0;
        if (c == -1) {
            int k = new_class(r);
            if (k < 0) return 0;
            add_shorthand(r->cls[k], letter);
            int n = new_node(r, R_CLASS, 0, 0);
            r->node[n].x = k;
            return n;
        }
    }
    int n = new_node(r, R_CHAR, 0, 0);
    r->node[n].x = c;
    return n;
}

// {m}, {m,}, {,n}, {m,n} at r->p: 1 and the bounds when it is one; 0 (r->p unmoved) when the
// brace is a literal, as Python reads it.
static int parse_braces(Regex *r, int *min, int *max) {
    const char *p = r->p + 1;
    long lo = 0, hi;
    int digits = 0;
    for (; *p >= '0' && *p <= '9'; p++, digits++) lo = lo > REP_LIMIT ? lo : lo * 10 + (*p - '0');
    hi = lo;
    if (*p == ',') {
        int d2 = 0;
        hi = 0;
        for (p++; *p >= '0' && *p <= '9'; p++, d2++) hi = hi > REP_LIMIT ? hi : hi * 10 + (*p - '0');
        if (d2 == 0) hi = -1;
        digits += d2 + 1;
    }
    if (*p != '}' || digits == 0) return 0;
    *min = (int)lo, *max = (int)hi;
    r->p = p + 1;
    return 1;
}

static int parse_repeat(Regex *r) {
    int n = parse_atom(r);
    while (!r->failed) {
        int min, max;
        if (*r->p == '*') min = 0, max = -1, r->p++;
        else if (*r->p == '+') min = 1, max = -1, r->p++;
        else if (*r->p == '?') min = 0, max = 1, r->p++;
        else if (*r->p != '{' || !parse_braces(r, &min, &max)) break;
        if (min > REP_LIMIT || max > REP_LIMIT || (max >= 0 && max < min)) return fail(r, "bad or too large repeat count");
        if (*r->p == '?') r->p++;  // lazy: the same full matches
        else if (*r->p == '+') return fail(r, "possessive quantifiers are not supported");
        if (r->node[n].kind == R_REP) return fail(r, "multiple repeat");
        n = new_node(r, R_REP, n, 0);
        r->node[n].min = min, r->node[n].max = max;
    }
    return n;
}

static int parse_cat(Regex *r) {
    int n = new_node(r, R_EMPTY, 0, 0);
    while (!r->failed && *r->p && *r->p != '|' && *r->p != ')') {
        int m = parse_repeat(r);
        n = new_node(r, R_CAT, n, m);
    }
    return n;
}

static int parse_alt(Regex *r) {
    int n = parse_cat(r);
    while (!r->failed && *r->p == '|') {
        r->p++;
        int m = parse_cat(r);
        n = new_node(r, R_ALT, n, m);
    }
    return n;
}

// ---------------------------------------------------------------------------------------------
// Compiling the tree into instructions.

static int emit(Regex *r, int op, int x, int y) {
    if (r->n_prog == MAX_PROG) return fail(r, "pattern too large once repeats are expanded"), 0;
    r->prog[r->n_prog] = (Inst){op, x, y};
    return r->n_prog++;
}

static void compile_node(Regex *r, int n);

// child{min,max}: min copies, then (max - min) optional ones, or a loop when max is unbounded.
static void compile_repeat(Regex *r, const RNode *nd) {
    for (int i = 0; i < nd->min && !r->failed; i++) compile_node(r, nd->a);
    if (nd->max < 0) {
        int split = emit(r, I_SPLIT, 0, 0);
        r->prog[split].x = split + 1;
        compile_node(r, nd->a);
        emit(r, I_JMP, split, 0);
        r->prog[split].y = r->n_prog;
        return;
    }
    int splits[REP_LIMIT + 1], k = 0;
    for (int i = nd->min; i < nd->max && !r->failed; i++) {
        splits[k] = emit(r, I_SPLIT, 0, 0);
        r->prog[splits[k]].x = splits[k] + 1;
        k++;
        compile_node(r, nd->a);
    }
    for (int i = 0; i < k && !r->failed; i++) r->prog[splits[i]].y = r->n_prog;
}

static void compile_node(Regex *r, int n) {
    const RNode *nd = &r->node[n];
    if (r->failed) return;
    switch (nd->kind) {
    case R_CHAR: emit(r, I_CHAR, nd->x, 0); break;
    case R_ANY: emit(r, I_ANY, 0, 0); break;
    case R_CLASS: emit(r, I_CLASS, nd->x, 0); break;
    case R_BOL: emit(r, I_BOL, 0, 0); break;
    case R_EOL: emit(r, I_EOL, 0, 0); break;
    case R_CAT: compile_node(r, nd->a), compile_node(r, nd->b); break;
    case R_REP: compile_repeat(r, nd); break;
    case R_ALT: {
        int split = emit(r, I_SPLIT, 0, 0);
        r->prog[split].x = split + 1;
        compile_node(r, nd->a);
        int jmp = emit(r, I_JMP, 0, 0);
        r->prog[split].y = r->n_prog;
        compile_node(r, nd->b);
        r->prog[jmp].x = r->n_prog;
        break;
    }
    default: break;  // R_EMPTY
    }
}

// ---------------------------------------------------------------------------------------------
// Running the program: the set of live instructions, one text position at a time.

// Adds pc and everything reachable from it without reading a byte (at text position pos of len).
static void add_state(const Regex *r, int *list, int *n, int *mark, int gen, int *stack, int pc, size_t pos, size_t len) {
    int top = 0;
    stack[top++] = pc;
    while (top > 0) {
        pc = stack[--top];
        if (mark[pc] == gen) continue;
        mark[pc] = gen;
        const Inst *in = &r->prog[pc];
        if (in->op == I_JMP) stack[top++] = in->x;
        else if (in->op == I_SPLIT) stack[top++] = in->y, stack[top++] = in->x;
        else if (in->op == I_BOL) { if (pos == 0) stack[top++] = pc + 1; }
        else if (in->op == I_EOL) { if (pos == len) stack[top++] = pc + 1; }
        else list[(*n)++] = pc;
    }
}

static int run(const Regex *r, const char *text) {
    size_t len = strlen(text);
    int np = r->n_prog;
    int *buf = xmalloc(sizeof(int) * (size_t)np * 5);
    int *cur = buf, *next = buf + np, *mark = buf + 2 * np, *stack = buf + 3 * np;  // stack: 2 * np
    for (int i = 0; i < np; i++) mark[i] = -1;
    int n_cur = 0, gen = 0, matched = 0;
    add_state(r, cur, &n_cur, mark, gen, stack, 0, 0, len);
    for (size_t pos = 0; pos <= len && n_cur > 0; pos++) {
        int n_next = 0, c = (unsigned char)text[pos];
        gen++;
        for (int i = 0; i < n_cur; i++) {
            const Inst *in = &r->prog[cur[i]];
            if (in->op == I_MATCH) matched |= pos == len;
            if (pos == len) continue;
            int ok = (in->op == I_CHAR && in->x == c) || (in->op == I_ANY && c != '\n') ||
                     (in->op == I_CLASS && has_bit(r->cls[in->x], c));
            if (ok) add_state(r, next, &n_next, mark, gen, stack, cur[i] + 1, pos + 1, len);
        }
        int *t = cur;
        cur = next, next = t, n_cur = n_next;
    }
    free(buf);
    return matched;
}

int regex_fullmatch(const char *pattern, const char *text, Err *e) {
    if (strlen(pattern) > MAX_PATTERN) return err_set(e, "regex of %zu characters is too long", strlen(pattern));
    Regex *r = xcalloc(1, sizeof *r);
    r->pattern = r->p = pattern;
    r->e = e;
    int root = parse_alt(r);
    if (!r->failed && *r->p == ')') fail(r, "unbalanced )");
    if (!r->failed) compile_node(r, root);
    if (!r->failed) emit(r, I_MATCH, 0, 0);
    int rc = r->failed ? -1 : run(r, text);
    free(r);
    return rc;
}
