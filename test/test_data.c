// test_data.c: the data pipeline (data.c): the chat template byte for byte, token ids and loss
// masks of real examples, truncation, CRLF and blank lines, every bad-input error with its line.
//
// Expected strings are written by hand from Qwen2.5's Jinja template (and were checked against
// jinja2 rendering that template); expected ids come from test/data/bpe_ref.py, an independent
// Python byte-level BPE over the same tokenizer.json (it matches Hugging Face's ids on the 46 cases
// of test/tokenizer/), cross-checked by hand against the vocabulary ("ãģ¬" = ぬ, "Ċ" = "\n", ...).
// Files: test/data/*.jsonl (good ones), test/data/bad/*.jsonl (one error each), data/danu*.jsonl.
#include <stdlib.h>
#include <string.h>

#include "../data.h"
#include "test.h"

#define IM_START 151644
#define IM_END 151645
#define NL 198
#define ARRAY_LEN(a) ((int)(sizeof(a) / sizeof((a)[0])))

// "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
static const int DEFAULT_SYSTEM_IDS[21] = {IM_START, 8948, NL, 2610, 525, 1207, 16948, 11, 3465, 553, 54364,
                                           14817, 13, 1446, 525, 264, 10950, 17847, 13, IM_END, NL};

// ---------------------------------------------------------------------------------------------
// The chat template, byte for byte.

static void check_render(const char *name, const Message *m, int n, int gen, const char *want) {
    char *got = chat_render(m, n, gen);
    check(strcmp(got, want) == 0, name, "got\n%s\nwant\n%s", got, want);
    free(got);
}

static void test_render(void) {
    Message one[] = {{"user", "日本の首都は？"}, {"assistant", "東京だぬ。"}};
    check_render("render default system", one, 2, 0,
                 "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                 "<|im_start|>user\n日本の首都は？<|im_end|>\n<|im_start|>assistant\n東京だぬ。<|im_end|>\n");
    check_render("render generation prompt", one, 1, 1,
                 "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                 "<|im_start|>user\n日本の首都は？<|im_end|>\n<|im_start|>assistant\n");
    Message sys[] = {{"system", "語尾はだぬ。"}, {"user", "2たす3は？"}, {"assistant", "5だぬ。"},
                     {"user", "それに4をかけると？"}, {"assistant", "20だぬ。"}};
    check_render("render explicit system, multi-turn", sys, 5, 0,
                 "<|im_start|>system\n語尾はだぬ。<|im_end|>\n<|im_start|>user\n2たす3は？<|im_end|>\n"
                 "<|im_start|>assistant\n5だぬ。<|im_end|>\n<|im_start|>user\nそれに4をかけると？<|im_end|>\n"
                 "<|im_start|>assistant\n20だぬ。<|im_end|>\n");
    Message late[] = {{"user", "x"}, {"system", "s"}, {"assistant", ""}};
    check_render("render late system message, empty content", late, 3, 0,
                 "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                 "<|im_start|>user\nx<|im_end|>\n<|im_start|>system\ns<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n");
    check_render("render no messages", NULL, 0, 1,
                 "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                 "<|im_start|>assistant\n");
}

// chat_check names the message and the byte of its own content, not of the rendered template.
static void test_chat_check(void) {
    Message ok[] = {{"system", "語尾はだぬ。"}, {"user", "日本の首都は？"}};
    Message bad[] = {{"system", "s"}, {"user", "ab\xFF" "cd"}};
    Message cut[] = {{"user", "fine"}, {"assistant", "x"}, {"user", "東\xE4\xBA"}};  // 京 cut short
    Err e = {{0}};
    check(chat_check(ok, 2, &e) == 0, "chat_check passes valid UTF-8", "%s", e.msg);
    int rc = chat_check(bad, 2, &e);
    check(rc < 0 && strcmp(e.msg, "message 2 (user) is not valid UTF-8 at byte 2 of its content (0xFF)") == 0,
          "chat_check names the message and the byte of its content", "rc %d '%s'", rc, e.msg);
    rc = chat_check(cut, 3, &e);
    check(rc < 0 && strstr(e.msg, "message 3 (user) is not valid UTF-8 at byte 3 of its content (0xE4)"),
          "chat_check: a character cut short", "rc %d '%s'", rc, e.msg);
}

// ---------------------------------------------------------------------------------------------
// Conversations for generation.

static void test_conversations(void) {
    Conversation *c;
    int n;
    Err e = {{0}};
    int rc = data_load_conversations(&c, &n, "test/data/tricky.jsonl", &e);
    check(rc == 0 && n == 5, "conversations load", "rc %d n %d: %s", rc, n, e.msg);
    if (rc == 0 && n == 5) {
        check(c[0].n == 2 && c[0].line == 1 && strcmp(c[0].msgs[1].content, "\n\nはい。") == 0,
              "conversations escapes kept", "n %d line %d", c[0].n, c[0].line);
        check(c[2].n == 5 && strcmp(c[2].msgs[2].role, "system") == 0 && strcmp(c[2].msgs[3].content, "y\r\nz") == 0,
              "conversations multi-turn", "n %d", c[2].n);
        check(conversation_last_user(&c[2]) == 3 && conversation_last_user(&c[4]) == 0, "conversations last user turn",
              "%d %d", conversation_last_user(&c[2]), conversation_last_user(&c[4]));
        check(c[4].n == 2 && strcmp(c[4].msgs[0].role, "user") == 0 && strcmp(c[4].msgs[0].content, "p") == 0 &&
                  strcmp(c[4].msgs[1].role, "assistant") == 0 && strcmp(c[4].msgs[1].content, "a<|im_start|>b\n") == 0,
              "conversations prompt/completion", "n %d", c[4].n);
        conversations_free(c, n);
    }
    rc = data_load_conversations(&c, &n, "test/data/good.jsonl", &e);
    check(rc < 0 && strncmp(e.msg, "test/data/good.jsonl:5: ", 24) == 0, "conversations reject text lines", "%s", e.msg);
    rc = data_load_conversations(&c, &n, "test/data/bad/unknown_role.jsonl", &e);
    check(rc < 0 && strstr(e.msg, "unknown_role.jsonl:2: ") != NULL, "conversations unknown role", "%s", e.msg);
}

// ---------------------------------------------------------------------------------------------
// Token ids and masks on real examples.

// Checks an example against expected ids and the [lo, hi) ranges of trained positions.
static void check_example(const char *name, const Example *ex, const int *ids, int T, const int *ranges, int n_ranges) {
    int ok = ex->T == T, bad = -1, n_targets = 0;
    for (int t = 0; ok && t < T; t++) {
        int train = 0;
        for (int r = 0; r < n_ranges; r++) train |= t >= ranges[2 * r] && t < ranges[2 * r + 1];
        n_targets += train;
        if (ex->tokens[t] != ids[t] || ex->mask[t] != train) bad = t;
    }
    ok = ok && bad < 0 && ex->n_targets == n_targets;
    check(ok, name, "T %d (want %d), n_targets %d (want %d), first mismatch at %d: id %d mask %d (want id %d)", ex->T, T,
          ex->n_targets, n_targets, bad, bad >= 0 ? ex->tokens[bad] : 0, bad >= 0 ? ex->mask[bad] : 0, bad >= 0 ? ids[bad] : 0);
}

// The four examples of test/data/good.jsonl (and of crlf.jsonl), with the assistant-only mask.
static void check_good(const char *file, const Dataset *ds, const int *lines) {
    char name[128];
    static const int ex0[40] = {151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446,
                                525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 131888, 106114, 15322,
                                11319, 151645, 198, 151644, 77091, 198, 102356, 46553, 35685, 133300, 1773, 151645, 198};
    static const int ex1[41] = {151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446,
                                525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 16, 27613, 17219, 16, 15322,
                                11319, 151645, 198, 151644, 77091, 198, 17, 35685, 133300, 1773, 151645, 198};
    static const int ex2[52] = {151644, 8948, 198, 102819, 101143, 15322, 35685, 133300, 1773, 151645, 198, 151644,
                                872, 198, 17, 27613, 17219, 18, 15322, 11319, 151645, 198, 151644, 77091, 198, 20,
                                35685, 133300, 1773, 151645, 198, 151644, 872, 198, 132449, 19, 29412, 137976, 19182,
                                11319, 151645, 198, 151644, 77091, 198, 17, 15, 35685, 133300, 1773, 151645, 198};
    static const int ex3[5] = {102356, 46553, 35685, 133300, 1773};
    // 東 京 だ ぬ 。 <|im_end|> | 2 だ ぬ 。 <|im_end|> | 5 だ ぬ 。 <|im_end|>, 2 0 だ ぬ 。 <|im_end|> | text
    static const int r0[] = {33, 39}, r1[] = {35, 40}, r2[] = {25, 30, 45, 51}, r3[] = {1, 5};
    if (ds->n != 4) {
        check(0, file, "%d examples, want 4", ds->n);
        return;
    }
    snprintf(name, sizeof name, "%s chat, default system", file);
    check_example(name, &ds->ex[0], ex0, 40, r0, 1);
    snprintf(name, sizeof name, "%s prompt/completion", file);
    check_example(name, &ds->ex[1], ex1, 41, r1, 1);
    snprintf(name, sizeof name, "%s multi-turn, explicit system", file);
    check_example(name, &ds->ex[2], ex2, 52, r2, 2);
    snprintf(name, sizeof name, "%s text (all after the first)", file);
    check_example(name, &ds->ex[3], ex3, 5, r3, 1);
    snprintf(name, sizeof name, "%s totals and lines", file);
    int lines_ok = 1;
    for (int i = 0; i < 4; i++) lines_ok &= ds->ex[i].line == lines[i];
    check(ds->n_tokens == 138 && ds->n_targets == 26 && ds->n_truncated == 0 && lines_ok, name,
          "tokens %ld targets %ld truncated %d lines %d %d %d %d", ds->n_tokens, ds->n_targets, ds->n_truncated,
          ds->ex[0].line, ds->ex[1].line, ds->ex[2].line, ds->ex[3].line);
}

static void test_masks(const Tokenizer *tok) {
    Dataset ds;
    Err e = {{0}};
    static const int good_lines[4] = {1, 3, 4, 5}, crlf_lines[4] = {1, 4, 5, 6};
    if (data_load(&ds, "test/data/good.jsonl", tok, LOSS_ON_ASSISTANT, 1024, &e) == 0) {
        check_good("good.jsonl", &ds, good_lines);
        data_free(&ds);
    } else {
        check(0, "good.jsonl loads", "%s", e.msg);
    }
    if (data_load(&ds, "test/data/crlf.jsonl", tok, LOSS_ON_ASSISTANT, 1024, &e) == 0) {
        check_good("crlf.jsonl", &ds, crlf_lines);
        data_free(&ds);
    } else {
        check(0, "crlf.jsonl loads", "%s", e.msg);
    }
    int rc = data_load(&ds, "test/data/good.jsonl", tok, LOSS_ON_ALL, 1024, &e);
    check(rc == 0 && ds.n_targets == 138 - 4 && ds.ex[0].mask[0] == 0 && ds.ex[0].mask[1] == 1,
          "loss-on all: every token after the first", "rc %d targets %ld", rc, ds.n_targets);
    if (rc == 0) data_free(&ds);
}

// A token that straddles "assistant\n" and content starting with "\n\n" ("ĊĊĊ") counts as content.
static void test_straddle(const Tokenizer *tok) {
    Dataset ds;
    Err e = {{0}};
    if (data_load(&ds, "test/data/tricky.jsonl", tok, LOSS_ON_ASSISTANT, 1024, &e) < 0) {
        check(0, "tricky.jsonl loads", "%s", e.msg);
        return;
    }
    int ids[37];
    memcpy(ids, DEFAULT_SYSTEM_IDS, sizeof DEFAULT_SYSTEM_IDS);
    static const int rest[16] = {IM_START, 872, NL, 15322, 16586, 11319, IM_END, NL,
                                 IM_START, 77091, 1406, 15322, 16586, 1773, IM_END, NL};
    memcpy(ids + 21, rest, sizeof rest);
    static const int r[] = {31, 36};  // ĊĊĊ は い 。 <|im_end|>
    check_example("straddling \"\\n\\n\\n\" token is trained", &ds.ex[0], ids, 37, r, 1);
    data_free(&ds);
}

// Tokenizing in pieces gives the ids of the whole rendered conversation, on every example.
static void check_piecewise(const char *path, const Tokenizer *tok) {
    Conversation *c;
    int n, bad = -1;
    Dataset ds;
    Err e = {{0}};
    char name[160];
    snprintf(name, sizeof name, "piecewise = whole: %s", path);
    if (data_load_conversations(&c, &n, path, &e) < 0 || data_load(&ds, path, tok, LOSS_ON_ASSISTANT, 1 << 20, &e) < 0) {
        check(0, name, "%s", e.msg);
        return;
    }
    for (int i = 0; i < n && i < ds.n && bad < 0; i++) {
        char *s = chat_render(c[i].msgs, c[i].n, 0);
        int *ids = NULL, T = tokenizer_encode(tok, s, strlen(s), &ids, &e);
        if (T != ds.ex[i].T || memcmp(ids, ds.ex[i].tokens, (size_t)T * sizeof *ids) != 0) bad = i;
        free(ids);
        free(s);
    }
    check(bad < 0 && n == ds.n, name, "example %d differs (%d conversations, %d examples)", bad, n, ds.n);
    conversations_free(c, n);
    data_free(&ds);
}

// ---------------------------------------------------------------------------------------------
// Truncation, bad input.

static void test_truncation(const Tokenizer *tok) {
    Dataset ds;
    Err e = {{0}};
    int rc = data_load(&ds, "test/data/good.jsonl", tok, LOSS_ON_ASSISTANT, 36, &e);
    // Cut to 36: ex0 keeps 東 京 だ (3 targets), ex1 keeps 2 (1), ex2 keeps its first answer (5), ex3 is short.
    check(rc == 0 && ds.n_truncated == 3 && ds.n_tokens == 36 * 3 + 5 && ds.n_targets == 3 + 1 + 5 + 4 &&
              ds.ex[0].T == 36 && ds.ex[0].n_targets == 3,
          "truncation to max_len 36", "rc %d truncated %d tokens %ld targets %ld: %s", rc, ds.n_truncated, ds.n_tokens,
          ds.n_targets, e.msg);
    if (rc == 0) data_free(&ds);
    rc = data_load(&ds, "test/data/bad/no_targets.jsonl", tok, LOSS_ON_ASSISTANT, 1024, &e);
    check(rc < 0 && strstr(e.msg, "no target tokens") != NULL, "no target tokens at all is an error", "%s", e.msg);
    rc = data_load(&ds, "test/data/crlf.jsonl", tok, LOSS_ON_ASSISTANT, 25, &e);  // cuts every chat target away
    check(rc == 0 && ds.n_targets == 4 && ds.n_truncated == 3, "truncated examples without targets are kept",
          "rc %d targets %ld: %s", rc, ds.n_targets, e.msg);
    if (rc == 0) data_free(&ds);
}

static void test_bad(const Tokenizer *tok) {
    static const struct {
        const char *file, *where, *reason;
    } cases[] = {
        {"not_json", ":3: ", "not valid JSON"},
        {"content_type", ":2: ", "messages[1].content is not a string"},
        {"messages_type", ":1: ", "\"messages\" is not an array"},
        {"unknown_role", ":2: ", "'tool' is unknown"},
        {"no_assistant", ":3: ", "no assistant message"},
        {"bad_utf8", ":2: ", "UTF-8"},
        {"surrogate", ":2: ", "surrogate"},
        {"empty", ": ", "no examples"},
        {"blank", ": ", "no examples"},
        {"missing", ": ", "No such file"},
        {"no_targets", ": ", "no target tokens"},
        {"not_object", ":2: ", "not a JSON object"},
        {"no_form", ":1: ", "no \"messages\""},
        {"two_forms", ":2: ", "more than one of"},
        {"no_completion", ":1: ", "\"completion\" is missing"},
        {"nul", ":2: ", "NUL"},
        {"empty_text", ":2: ", "empty"},
        {"duplicate_key", ":2: ", "column 36: duplicate key \"prompt\""},
    };
    for (int i = 0; i < ARRAY_LEN(cases); i++) {
        char path[128], prefix[160], name[128];
        snprintf(path, sizeof path, "test/data/bad/%s.jsonl", cases[i].file);
        snprintf(prefix, sizeof prefix, "%s%s", path, cases[i].where);
        snprintf(name, sizeof name, "bad input: %s", cases[i].file);
        Dataset ds;
        Err e = {{0}};
        int rc = data_load(&ds, path, tok, LOSS_ON_ASSISTANT, 1024, &e);
        int ok = rc < 0 && strncmp(e.msg, prefix, strlen(prefix)) == 0 && strstr(e.msg, cases[i].reason) != NULL;
        check(ok && ds.n == 0 && ds.ex == NULL, name, "rc %d: '%s' (want '%s...%s')", rc, e.msg, prefix, cases[i].reason);
        if (rc == 0) data_free(&ds);
    }
    Dataset ds;
    Err e = {{0}};
    int rc = data_load(&ds, "test/data/bad", tok, LOSS_ON_ASSISTANT, 1024, &e);
    check(rc < 0 && strcmp(e.msg, "test/data/bad: is a directory, not a file") == 0, "bad input: a directory", "rc %d '%s'", rc, e.msg);
    rc = data_load(&ds, "test/data/bad/no_assistant.jsonl", tok, LOSS_ON_ALL, 1024, &e);
    check(rc == 0 && ds.n == 3, "no assistant turn is fine with --loss-on all", "rc %d: %s", rc, e.msg);
    if (rc == 0) data_free(&ds);
}

// ---------------------------------------------------------------------------------------------
// The "だぬ" data sets and the example printer.

// Every run of trained tokens is one answer: it ends with <|im_end|> and its text with だぬ。 or だぬ！.
static void check_style(const char *path, int want_n, const Tokenizer *tok) {
    Dataset ds;
    Err e = {{0}};
    char name[160];
    snprintf(name, sizeof name, "%s: %d examples, every answer ends with だぬ", path, want_n);
    if (data_load(&ds, path, tok, LOSS_ON_ASSISTANT, 1024, &e) < 0) {
        check(0, name, "%s", e.msg);
        return;
    }
    int bad = -1, answers = 0;
    for (int i = 0; i < ds.n && bad < 0; i++) {
        const Example *ex = &ds.ex[i];
        for (int t = 1, start = -1; t <= ex->T && bad < 0; t++) {
            if (t < ex->T && ex->mask[t] && start < 0) start = t;
            if (start < 0 || (t < ex->T && ex->mask[t])) continue;
            char *s = tokenizer_decode(tok, ex->tokens + start, t - 1 - start);
            size_t n = strlen(s);
            int ends = n >= 9 && (strcmp(s + n - 9, "だぬ。") == 0 || strcmp(s + n - 9, "だぬ！") == 0);
            if (!ends || ex->tokens[t - 1] != tok->im_end_id) bad = i;
            free(s);
            answers++;
            start = -1;
        }
    }
    check(ds.n == want_n && bad < 0 && ds.n_truncated == 0, name, "n %d, example %d (line %d) breaks the style", ds.n,
          bad, bad >= 0 ? ds.ex[bad].line : 0);
    data_free(&ds);
}

// The eval prompts are not among the training prompts.
static void test_held_out(void) {
    const char *train[2] = {"data/danu.jsonl", "data/danu_more.jsonl"};
    Conversation *ev, *tr;
    int n_ev, n_tr, dup = -1;
    Err e = {{0}};
    if (data_load_conversations(&ev, &n_ev, "data/danu_eval.jsonl", &e) < 0) {
        check(0, "eval prompts held out", "%s", e.msg);
        return;
    }
    for (int f = 0; f < 2; f++) {
        if (data_load_conversations(&tr, &n_tr, train[f], &e) < 0) break;
        for (int i = 0; i < n_ev; i++)
            for (int j = 0; j < n_tr; j++)
                for (int k = 0; k < tr[j].n; k++)
                    if (strcmp(ev[i].msgs[0].content, tr[j].msgs[k].content) == 0) dup = i;
        conversations_free(tr, n_tr);
    }
    check(dup < 0 && e.msg[0] == 0, "eval prompts held out", "eval line %d repeats a training prompt %s", dup + 1, e.msg);
    conversations_free(ev, n_ev);
}

static void test_print(const Tokenizer *tok) {
    Dataset ds;
    Err e = {{0}};
    if (data_load(&ds, "test/data/good.jsonl", tok, LOSS_ON_ASSISTANT, 1024, &e) < 0) return;
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    data_print_example(f, &ds, 0, tok);
    fclose(f);
    int lines = 0;
    for (size_t i = 0; i < len; i++) lines += buf[i] == '\n';
    check(lines == 2 + 40 && strstr(buf, "\n    0  151644 -     \"<|im_start|>\"\n") &&
              strstr(buf, "\n    2     198 -     \"\\n\"\n") && strstr(buf, "\n    4     525 -     \" are\"\n") &&
              strstr(buf, "\n   33  102356 train \"東\"\n") && strstr(buf, "\n   38  151645 train \"<|im_end|>\"\n") &&
              strstr(buf, "\n   39     198 -     \"\\n\"\n"),
          "print example", "%d lines:\n%s", lines, buf);
    free(buf);
    data_free(&ds);
}

void test_data(void) {
    test_render();
    test_chat_check();
    test_conversations();
    Tokenizer tok;
    Err e = {{0}};
    if (tokenizer_load(&tok, "data/tokenizer.json", &e) < 0) {
        check(0, "load data/tokenizer.json", "%s", e.msg);
        return;
    }
    test_masks(&tok);
    test_straddle(&tok);
    check_piecewise("test/data/tricky.jsonl", &tok);
    check_piecewise("data/danu.jsonl", &tok);
    check_piecewise("data/danu_more.jsonl", &tok);
    test_truncation(&tok);
    test_bad(&tok);
    check_style("data/danu.jsonl", 10, &tok);
    check_style("data/danu_more.jsonl", 70, &tok);
    check_style("data/danu_eval.jsonl", 20, &tok);
    test_held_out();
    test_print(&tok);
    tokenizer_free(&tok);
}
