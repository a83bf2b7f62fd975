// data.c: JSONL data files -> the Qwen2.5 chat template -> token ids and loss masks.
//
// A line is {"messages": [...]}, {"prompt", "completion"} (one user + one assistant turn) or
// {"text"} (tokenized as is). Chats are rendered as Qwen2.5's Jinja template renders plain
// messages. Leaves out: tools and tool calls, conversational prompt/completion (lists of messages),
// packing, padding. Read data.h for the interface; train.c (train, eval, grads) uses what this returns.
//
// How a token is attributed to a message (the loss mask): special tokens split the rendered text,
// so "<|im_start|>", "ROLE\nCONTENT", "<|im_end|>" and "\n" are tokenized separately and give the
// same ids as the whole rendered string does (test_data checks this on every example). Inside
// "ROLE\nCONTENT" the tokens that "ROLE\n" alone gives are the header; the rest is content. When
// content starts with whitespace that joins the "\n" into one pre-token (e.g. "\n\n"), the
// straddling token counts as content, as Hugging Face's assistant-token masks count it.
//
// {"text"} examples are trained on every token after the first, whatever --loss-on says: they
// have no assistant part to pick out.
#include "data.h"

#include <stdlib.h>
#include <string.h>

#include "json.h"

static const char DEFAULT_SYSTEM[] = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";

// ---------------------------------------------------------------------------------------------
// The chat template.

// The messages the template renders: msgs, after the default system message when msgs[0] is not
// a system message. Returns a malloc'ed array of n or n + 1 shallow copies; *n_out gets the count.
static Message *with_system(const Message *msgs, int n, int *n_out) {
    int add = n == 0 || strcmp(msgs[0].role, "system") != 0;
    Message *out = xmalloc(((size_t)n + 1) * sizeof *out);
    if (add) out[0] = (Message){(char *)"system", (char *)DEFAULT_SYSTEM};
    for (int i = 0; i < n; i++) out[add + i] = msgs[i];
    *n_out = n + add;
    return out;
}

int chat_check(const Message *msgs, int n, Err *e) {
    for (int i = 0; i < n; i++) {
        size_t len = strlen(msgs[i].content), ok = utf8_valid_prefix(msgs[i].content, len);
        if (ok < len)
            return err_set(e, "message %d (%.20s) is not valid UTF-8 at byte %zu of its content (0x%02X)", i + 1,
                           msgs[i].role, ok, (unsigned char)msgs[i].content[ok]);
    }
    return 0;
}

char *chat_render(const Message *msgs, int n, int add_generation_prompt) {
    int m;
    Message *all = with_system(msgs, n, &m);
    size_t len = sizeof "<|im_start|>assistant\n";
    for (int i = 0; i < m; i++) len += strlen(all[i].role) + strlen(all[i].content) + 32;
    char *out = xmalloc(len), *p = out;
    for (int i = 0; i < m; i++)
        p += sprintf(p, "<|im_start|>%s\n%s<|im_end|>\n", all[i].role, all[i].content);
    if (add_generation_prompt) p += sprintf(p, "<|im_start|>assistant\n");
    *p = 0;
    free(all);
    return out;
}

// ---------------------------------------------------------------------------------------------
// One line of JSON to a Conversation, or to a plain text.

// What a line holds: a conversation, or (text != NULL) a plain text.
typedef struct {
    Conversation conv;
    char *text;
} Record;

static void conversation_clear(Conversation *c) {
    for (int k = 0; k < c->n; k++) {
        free(c->msgs[k].role);
        free(c->msgs[k].content);
    }
    free(c->msgs);
    memset(c, 0, sizeof *c);
}

static void record_free(Record *r) {
    conversation_clear(&r->conv);
    free(r->text);
    memset(r, 0, sizeof *r);
}

// Copies the JSON string v into *out; `what` names the field for the error message.
static int take_string(char **out, const Json *v, const char *where, const char *what, Err *e) {
    if (!v) return err_set(e, "%s: %s is missing", where, what);
    if (v->type != JSON_STRING) return err_set(e, "%s: %s is not a string", where, what);
    if (strlen(v->str) != v->len) return err_set(e, "%s: %s contains a NUL character (\\u0000)", where, what);
    *out = xstrdup(v->str);
    return 0;
}

static int is_role(const char *s) {
    return strcmp(s, "system") == 0 || strcmp(s, "user") == 0 || strcmp(s, "assistant") == 0;
}

// One item of "messages": {"role": "system"|"user"|"assistant", "content": "..."}.
static int parse_message(Message *m, const Json *v, const char *where, size_t k, Err *e) {
    char what[64];
    if (v->type != JSON_OBJECT) return err_set(e, "%s: messages[%zu] is not an object", where, k);
    snprintf(what, sizeof what, "messages[%zu].role", k);
    if (take_string(&m->role, json_get(v, "role"), where, what, e) < 0) return -1;
    if (!is_role(m->role))
        return err_set(e, "%s: %s '%.40s' is unknown (system, user or assistant)", where, what, m->role);
    const Json *calls = json_get(v, "tool_calls");
    if (calls && !(calls->type == JSON_NULL || (calls->type == JSON_ARRAY && calls->len == 0)))
        return err_set(e, "%s: messages[%zu] has tool calls, which are not supported", where, k);
    snprintf(what, sizeof what, "messages[%zu].content", k);
    return take_string(&m->content, json_get(v, "content"), where, what, e);
}

static int parse_messages(Conversation *c, const Json *arr, const char *where, Err *e) {
    if (arr->type != JSON_ARRAY) return err_set(e, "%s: \"messages\" is not an array", where);
    if (arr->len == 0) return err_set(e, "%s: \"messages\" is empty", where);
    if (arr->len > 1000000) return err_set(e, "%s: too many messages (%zu)", where, arr->len);
    c->msgs = xcalloc(arr->len, sizeof *c->msgs);
    c->n = (int)arr->len;
    for (size_t k = 0; k < arr->len; k++)
        if (parse_message(&c->msgs[k], &arr->items[k], where, k, e) < 0) return -1;
    return 0;
}

static int parse_prompt_completion(Conversation *c, const Json *j, const char *where, Err *e) {
    c->msgs = xcalloc(2, sizeof *c->msgs);
    c->n = 2;
    c->msgs[0].role = xstrdup("user");
    c->msgs[1].role = xstrdup("assistant");
    if (take_string(&c->msgs[0].content, json_get(j, "prompt"), where, "\"prompt\"", e) < 0) return -1;
    return take_string(&c->msgs[1].content, json_get(j, "completion"), where, "\"completion\"", e);
}

// Fills r from the JSON object of one line. On error r may hold parts; record_free frees them.
static int parse_record(Record *r, const Json *j, const char *where, Err *e) {
    if (j->type != JSON_OBJECT)
        return err_set(e, "%s: not a JSON object ({\"messages\"}, {\"prompt\", \"completion\"} or {\"text\"})", where);
    int has_m = json_get(j, "messages") != NULL, has_t = json_get(j, "text") != NULL;
    int has_pc = json_get(j, "prompt") != NULL || json_get(j, "completion") != NULL;
    if (has_m + has_t + has_pc > 1)
        return err_set(e, "%s: more than one of \"messages\", \"prompt\"/\"completion\" and \"text\"", where);
    if (has_m) return parse_messages(&r->conv, json_get(j, "messages"), where, e);
    if (has_pc) return parse_prompt_completion(&r->conv, j, where, e);
    if (has_t) return take_string(&r->text, json_get(j, "text"), where, "\"text\"", e);
    return err_set(e, "%s: no \"messages\", \"prompt\"/\"completion\" or \"text\" field", where);
}

static int has_role(const Conversation *c, const char *role) {
    for (int i = 0; i < c->n; i++)
        if (strcmp(c->msgs[i].role, role) == 0) return 1;
    return 0;
}

// ---------------------------------------------------------------------------------------------
// Walking the lines of a file.

// The next line that is not whitespace only, without its "\n" / "\r\n". Returns 0 at the end.
typedef struct {
    const char *s;
    size_t len;
    int line;  // 1-based
} Line;

static int is_blank(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r' && s[i] != '\n') return 0;
    return 1;
}

static int next_line(const char *buf, size_t len, size_t *pos, int *line_no, Line *out) {
    while (*pos < len) {
        const char *s = buf + *pos, *nl = memchr(s, '\n', len - *pos);
        size_t n = nl ? (size_t)(nl - s) : len - *pos;
        *pos += n + (nl != NULL);
        *line_no += 1;
        if (n > 0 && s[n - 1] == '\r') n--;
        if (is_blank(s, n)) continue;
        *out = (Line){s, n, *line_no};
        return 1;
    }
    return 0;
}

// Parses one line into r; `where` is "FILE:LINE", which starts every error message.
static int line_record(Record *r, const Line *ln, const char *where, Err *e) {
    Json j;
    Err je;
    if (json_parse(&j, ln->s, ln->len, &je) < 0) {
        const char *m = strncmp(je.msg, "line 1, ", 8) == 0 ? je.msg + 8 : je.msg;
        return err_set(e, "%s: not valid JSON: %s", where, m);
    }
    int rc = parse_record(r, &j, where, e);
    json_free(&j);
    return rc;
}

// ---------------------------------------------------------------------------------------------
// Tokens and masks.

// A growing list of token ids with their loss mask.
typedef struct {
    int *ids;
    unsigned char *mask;
    size_t n, cap;
} Toks;

static void toks_push(Toks *t, int id, int train) {
    if (t->n == t->cap) {
        t->cap = t->cap ? 2 * t->cap : 256;
        t->ids = realloc(t->ids, t->cap * sizeof *t->ids);
        t->mask = realloc(t->mask, t->cap);
        if (!t->ids || !t->mask) xmalloc((size_t)-1);  // reports out of memory and exits
    }
    t->ids[t->n] = id;
    t->mask[t->n] = (unsigned char)train;
    t->n++;
}

// Tokenizes s[0..len) and appends it. The tokens that s[0..head) alone gives, as far as the whole
// begins with them, get mask 0; the rest get `train`.
static int toks_text(Toks *t, const Tokenizer *tok, const char *s, size_t len, size_t head, int train, Err *e) {
    int *ids = NULL, *hids = NULL, nh = 0;
    int n = tokenizer_encode(tok, s, len, &ids, e);
    if (n >= 0 && head > 0) nh = tokenizer_encode(tok, s, head, &hids, e);
    if (n < 0 || nh < 0) {
        free(ids);
        free(hids);
        return -1;
    }
    int k = 0;
    while (k < nh && k < n && ids[k] == hids[k]) k++;
    for (int i = 0; i < n; i++) toks_push(t, ids[i], i >= k && train);
    free(ids);
    free(hids);
    return 0;
}

// Appends the rendered conversation: <|im_start|> ROLE\n CONTENT <|im_end|> \n for each message.
static int toks_chat(Toks *t, const Tokenizer *tok, const Conversation *c, Err *e) {
    int m, rc = chat_check(c->msgs, c->n, e);
    if (rc < 0) return -1;
    Message *all = with_system(c->msgs, c->n, &m);
    for (int i = 0; i < m && rc == 0; i++) {
        int asst = strcmp(all[i].role, "assistant") == 0;
        size_t head = strlen(all[i].role) + 1, len = head + strlen(all[i].content);
        char *unit = xmalloc(len + 1);
        sprintf(unit, "%s\n%s", all[i].role, all[i].content);
        toks_push(t, tok->im_start_id, 0);
        rc = toks_text(t, tok, unit, len, head, asst, e);
        toks_push(t, tok->im_end_id, asst);
        if (rc == 0) rc = toks_text(t, tok, "\n", 1, 0, 0, e);
        free(unit);
    }
    free(all);
    return rc;
}

// Renders and tokenizes one record into ex (cut to max_len); *truncated is set when it was cut.
static int record_example(Example *ex, const Record *r, const Tokenizer *tok, LossOn loss_on, int max_len,
                          int *truncated, const char *where, Err *e) {
    Toks t = {0};
    int rc = r->text ? toks_text(&t, tok, r->text, strlen(r->text), 0, 1, e) : toks_chat(&t, tok, &r->conv, e);
    if (rc < 0) {
        Err inner = *e;
        err_set(e, "%s: %s", where, inner.msg);
    }
    if (rc == 0 && t.n == 0) rc = err_set(e, "%s: the text is empty", where);
    if (rc == 0 && t.n > (size_t)1 << 30) rc = err_set(e, "%s: too many tokens (%zu)", where, t.n);
    if (rc < 0) {
        free(t.ids);
        free(t.mask);
        return -1;
    }
    *truncated = t.n > (size_t)max_len;
    ex->T = *truncated ? max_len : (int)t.n;
    ex->tokens = t.ids;
    ex->mask = t.mask;
    ex->mask[0] = 0;
    ex->n_targets = 0;
    for (int i = 1; i < ex->T; i++) {
        if (loss_on == LOSS_ON_ALL) ex->mask[i] = 1;
        ex->n_targets += ex->mask[i];
    }
    return 0;
}

// ---------------------------------------------------------------------------------------------
// Showing an example token by token.

// Length of the UTF-8 sequence at s[0..n) by its lead byte when it is complete, else 0.
static size_t utf8_seq_len(const unsigned char *s, size_t n) {
    size_t need = s[0] < 0x80 ? 1 : s[0] >= 0xF0 && s[0] < 0xF5 ? 4 : s[0] >= 0xE0 ? 3 : s[0] >= 0xC2 ? 2 : 0;
    if (s[0] >= 0xF5 || need > n) return 0;
    for (size_t i = 1; i < need; i++)
        if ((s[i] & 0xC0) != 0x80) return 0;
    return need;
}

// Writes bytes as a quoted string: \n \t \r \\ \" escaped, other control bytes and bytes of
// incomplete UTF-8 characters (a character split across tokens) as \xHH.
static void print_escaped(FILE *f, const unsigned char *s, size_t n) {
    fputc('"', f);
    for (size_t i = 0; i < n;) {
        unsigned char c = s[i];
        size_t len = c >= 0x80 ? utf8_seq_len(s + i, n - i) : 1;
        if (c == '\n') fputs("\\n", f);
        else if (c == '\t') fputs("\\t", f);
        else if (c == '\r') fputs("\\r", f);
        else if (c == '\\' || c == '"') fprintf(f, "\\%c", c);
        else if (c < 0x20 || c == 0x7F || len == 0) fprintf(f, "\\x%02X", c);
        else fwrite(s + i, 1, len, f);
        i += len ? len : 1;
    }
    fputc('"', f);
}

void data_print_example(FILE *f, const Dataset *ds, int k, const Tokenizer *tok) {
    if (k < 0 || k >= ds->n) {
        fprintf(f, "no example %d (the data set has %d)\n", k, ds->n);
        return;
    }
    const Example *ex = &ds->ex[k];
    fprintf(f, "example %d (line %d): %d tokens, %d trained on\n", k, ex->line, ex->T, ex->n_targets);
    fprintf(f, "%5s %7s %-5s %s\n", "pos", "id", "loss", "text");
    for (int t = 0; t < ex->T; t++) {
        int id = ex->tokens[t];
        int known = id >= 0 && id < tok->n_vocab;
        const char *s = known ? tok->vocab[id] : "?";
        const unsigned char *bytes = (const unsigned char *)s;
        size_t n = strlen(s);
        if (known && tok->token_type[id] == TOKEN_NORMAL) bytes = tokenizer_token_bytes(tok, id, &n);
        fprintf(f, "%5d %7d %-5s ", t, id, ex->mask[t] ? "train" : "-");
        print_escaped(f, bytes, n);
        fputc('\n', f);
    }
}

// ---------------------------------------------------------------------------------------------
// Loading.

static int check_chat_tokens(const Tokenizer *tok, const char *path, Err *e) {
    if (tok->im_start_id < 0 || tok->im_end_id < 0)
        return err_set(e, "%s: chat examples need <|im_start|> and <|im_end|>, which the tokenizer lacks", path);
    return 0;
}

// Adds the example of one line to ds.
static int load_line(Dataset *ds, size_t *cap, const Line *ln, const char *path, const Tokenizer *tok,
                     LossOn loss_on, int max_len, Err *e) {
    Record r = {0};
    char where[600];
    snprintf(where, sizeof where, "%.500s:%d", path, ln->line);
    int rc = line_record(&r, ln, where, e);
    if (rc == 0 && !r.text) rc = check_chat_tokens(tok, path, e);
    if (rc == 0 && !r.text && loss_on == LOSS_ON_ASSISTANT && !has_role(&r.conv, "assistant"))
        rc = err_set(e, "%s: the conversation has no assistant message (nothing to train on)", where);
    int truncated = 0;
    Example ex = {0};
    if (rc == 0) rc = record_example(&ex, &r, tok, loss_on, max_len, &truncated, where, e);
    record_free(&r);
    if (rc < 0) return -1;
    if ((size_t)ds->n == *cap) {
        *cap = *cap ? 2 * *cap : 64;
        ds->ex = realloc(ds->ex, *cap * sizeof *ds->ex);
        if (!ds->ex) xmalloc((size_t)-1);
    }
    ex.line = ln->line;
    ds->ex[ds->n++] = ex;
    ds->n_tokens += ex.T;
    ds->n_targets += ex.n_targets;
    ds->n_truncated += truncated;
    return 0;
}

int data_load(Dataset *ds, const char *path, const Tokenizer *tok, LossOn loss_on, int max_len, Err *e) {
    memset(ds, 0, sizeof *ds);
    if (max_len < 2) return err_set(e, "%s: max_len %d is too small (at least 2)", path, max_len);
    size_t len, pos = 0, cap = 0;
    char *buf = read_file(path, &len, e);
    if (!buf) return -1;
    int line_no = 0, rc = 0;
    Line ln;
    while (rc == 0 && next_line(buf, len, &pos, &line_no, &ln)) {
        if (ds->n == 1 << 30) rc = err_set(e, "%s:%d: too many examples", path, ln.line);
        if (rc == 0) rc = load_line(ds, &cap, &ln, path, tok, loss_on, max_len, e);
    }
    free(buf);
    if (rc == 0 && ds->n == 0) rc = err_set(e, "%s: no examples (the file is empty)", path);
    if (rc == 0 && ds->n_targets == 0)
        rc = err_set(e, "%s: no target tokens in the whole data set (--loss-on %s, --max-len %d)", path,
                     loss_on == LOSS_ON_ALL ? "all" : "assistant", max_len);
    if (rc < 0) data_free(ds);
    return rc;
}

void data_free(Dataset *ds) {
    for (int i = 0; i < ds->n; i++) {
        free(ds->ex[i].tokens);
        free(ds->ex[i].mask);
    }
    free(ds->ex);
    memset(ds, 0, sizeof *ds);
}

int data_load_conversations(Conversation **convs, int *n, const char *path, Err *e) {
    *convs = NULL;
    *n = 0;
    size_t len, pos = 0, cap = 0;
    char *buf = read_file(path, &len, e);
    if (!buf) return -1;
    int line_no = 0, rc = 0;
    Line ln;
    while (rc == 0 && next_line(buf, len, &pos, &line_no, &ln)) {
        Record r = {0};
        char where[600];
        snprintf(where, sizeof where, "%.500s:%d", path, ln.line);
        rc = line_record(&r, &ln, where, e);
        if (rc == 0 && r.text) rc = err_set(e, "%s: a {\"text\"} line has no prompt to answer", where);
        if (rc == 0 && !has_role(&r.conv, "user")) rc = err_set(e, "%s: the conversation has no user message", where);
        if (rc == 0 && *n == 1 << 30) rc = err_set(e, "%s: too many conversations", where);
        if (rc < 0) {
            record_free(&r);
            break;
        }
        if ((size_t)*n == cap) {
            cap = cap ? 2 * cap : 64;
            *convs = realloc(*convs, cap * sizeof **convs);
            if (!*convs) xmalloc((size_t)-1);
        }
        r.conv.line = ln.line;
        (*convs)[(*n)++] = r.conv;
    }
    free(buf);
    if (rc == 0 && *n == 0) rc = err_set(e, "%s: no conversations (the file is empty)", path);
    if (rc < 0) {
        conversations_free(*convs, *n);
        *convs = NULL;
        *n = 0;
    }
    return rc;
}

int conversation_last_user(const Conversation *c) {
    for (int i = c->n - 1; i >= 0; i--)
        if (strcmp(c->msgs[i].role, "user") == 0) return i;
    return -1;
}

void conversations_free(Conversation *convs, int n) {
    if (!convs) return;
    for (int i = 0; i < n; i++) conversation_clear(&convs[i]);
    free(convs);
}
