// generate.c: sft generate's and sft chat's answers: the prompt, sampling, the KV cache kept
// across a chat's turns, and streaming decode. generate.h has the contracts.
//
// Read generate_answer (below the sampling) first: feed_prompt runs the prompt through the model,
// then each step sample_next picks a token from the logits and model_infer (model.c) runs it.
// Leaves out: the options, the sampling defaults and the terminal (sft.c), the forward pass
// (model.c), the chat template (data.c).
#include "generate.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "tokenizer.h"

// ---------------------------------------------------------------------------------------------
// Sampling.

// HF's RepetitionPenaltyLogitsProcessor: each distinct token of the sequence so far gets its
// logit divided by the penalty when positive, multiplied by it when negative.
static void apply_repetition_penalty(Generator *g) {
    float rp = g->s.repetition_penalty;
    if (rp == 1.0f) return;
    for (int i = 0; i < g->n_ctx; i++) {
        int id = g->ctx[i];
        if (g->seen[id]) continue;
        g->seen[id] = 1;
        float *l = &g->logits[id];
        *l = *l > 0 ? *l / rp : *l * rp;
    }
    for (int i = 0; i < g->n_ctx; i++) g->seen[g->ctx[i]] = 0;
}

static int cand_desc(const void *a, const void *b) {
    const Candidate *x = a, *y = b;
    if (x->logit != y->logit) return x->logit > y->logit ? -1 : 1;
    return x->id - y->id;
}

// The k largest logits, sorted descending, into cand[0..k); returns k.
static int top_candidates(Candidate *cand, const float *logits, int V, int k) {
    if (k <= 0 || k >= V) {
        for (int i = 0; i < V; i++) cand[i].logit = logits[i], cand[i].id = i;
        qsort(cand, (size_t)V, sizeof *cand, cand_desc);
        return V;
    }
    int n = 0;  // cand[0..n) sorted descending; insertion keeps it so
    for (int i = 0; i < V; i++) {
        float l = logits[i];
        if (n == k && !(l > cand[k - 1].logit)) continue;
        int j = n < k ? n++ : k - 1;
        while (j > 0 && cand[j - 1].logit < l) cand[j] = cand[j - 1], j--;
        cand[j].logit = l, cand[j].id = i;
    }
    return n;
}

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) if (x[i] > x[best]) best = i;
    return best;
}

// The next token from g->logits: greedy when temperature is 0, else temperature, top-k, top-p
// (HF's TopPLogitsWarper: drop the least likely tokens whose cumulative probability is at most
// 1 - top_p, keeping at least one) and a draw from the renormalized distribution.
static int sample_next(Generator *g) {
    int V = g->model->config.V;
    apply_repetition_penalty(g);
    if (g->s.temperature <= 0) return argmax(g->logits, V);
    int n = top_candidates(g->cand, g->logits, V, g->s.top_k);
    double max = g->cand[0].logit / g->s.temperature, sum = 0;
    for (int i = 0; i < n; i++) {
        double p = exp(g->cand[i].logit / g->s.temperature - max);
        g->cand[i].logit = (float)p;
        sum += p;
    }
    if (g->s.top_p < 1.0f) {
        double cum = 0;
        int keep = n;
        for (int i = n - 1; i > 0; i--) {
            cum += g->cand[i].logit / sum;
            if (cum > 1.0 - g->s.top_p) break;
            keep = i;
        }
        n = keep;
    }
    double total = 0;
    for (int i = 0; i < n; i++) total += g->cand[i].logit;
    double r = rng_uniform(&g->s.rng) * total;
    for (int i = 0; i < n; i++) {
        r -= g->cand[i].logit;
        if (r < 0) return g->cand[i].id;
    }
    return g->cand[n - 1].id;
}

// ---------------------------------------------------------------------------------------------
// The generator: the KV cache, the tokens in it, and scratch for sampling and decoding.

void generator_init(Generator *g, Model *m, const Lora *lora, int max_T, Sampling s) {
    memset(g, 0, sizeof *g);
    int V = m->config.V;
    g->model = m, g->max_T = max_T, g->s = s;
    g->lora = lora;
    g->kv = kvcache_new(&m->config, max_T);
    g->ctx = xmalloc((size_t)max_T * sizeof(int));
    g->logits = xmalloc((size_t)V * sizeof(float));
    g->cand = xmalloc((size_t)V * sizeof(Candidate));
    g->seen = xcalloc((size_t)V, 1);
    int longest = 0;
    for (int i = 0; i < m->tok.n_vocab; i++) {
        int len = (int)strlen(m->tok.vocab[i]);
        if (len > longest) longest = len;
    }
    g->piece_cap = 64 + longest;
    g->piece = xmalloc((size_t)g->piece_cap);
}

void generator_reserve(Generator *g, int need) {
    if (need <= g->max_T) return;
    kvcache_free(g->kv);
    g->kv = kvcache_new(&g->model->config, need);
    g->ctx = xrealloc(g->ctx, (size_t)need * sizeof(int));
    g->max_T = need, g->n_ctx = 0;
}

void generator_free(Generator *g) {
    kvcache_free(g->kv);
    free(g->ctx), free(g->logits), free(g->cand), free(g->seen), free(g->piece);
}

// Runs prompt[n] through the model, reusing the cached tokens it starts with (a chat's history).
static int feed_prompt(Generator *g, const int *prompt, int n, Err *e) {
    int p = 0;
    while (p < g->n_ctx && p < n && g->ctx[p] == prompt[p]) p++;
    if (p < g->n_ctx || p == n) kvcache_reset(g->kv), g->n_ctx = p = 0;
    if (n + 1 > g->max_T) return err_set(e, "the conversation (%d tokens) does not fit the context of %d tokens", n, g->max_T);
    if (model_infer(g->model, g->lora, g->kv, prompt + p, n - p, g->logits) != 0)
        return err_set(e, "the context of %d tokens is full", g->max_T);
    memcpy(g->ctx + p, prompt + p, (size_t)(n - p) * sizeof(int));
    g->n_ctx = n;
    return 0;
}

// ---------------------------------------------------------------------------------------------
// One answer.

// Appends s[n] to t.
static void text_add(Text *t, const char *s, size_t n) {
    if (t->n + n + 1 > t->cap) {
        t->cap = (t->n + n + 1) * 2;
        t->s = xrealloc(t->s, t->cap);
    }
    memcpy(t->s + t->n, s, n);
    t->n += n;
    t->s[t->n] = 0;
}

// generate.h has the contract. The stop tokens end the answer without being part of it.
int generate_answer(Generator *g, const int *prompt, int n, FILE *stream, Text *answer, Err *e) {
    if (feed_prompt(g, prompt, n, e) != 0) return -1;
    const Tokenizer *tok = &g->model->tok;
    DecodeStream ds = {0};
    answer->n = 0;
    text_add(answer, "", 0);
    for (int i = 0; i < g->s.max_new; i++) {
        int id = sample_next(g);
        if (id == tok->im_end_id || id == tok->endoftext_id || id == tok->eos_id) break;
        int len = decode_stream_push(&ds, tok, id, g->piece, g->piece_cap);
        text_add(answer, g->piece, (size_t)len);
        if (stream && len > 0) fwrite(g->piece, 1, (size_t)len, stream), fflush(stream);
        if (i + 1 == g->s.max_new) break;
        if (g->n_ctx >= g->max_T) {  // the context is full: stop here
            fprintf(stderr, "sft: the context of %d tokens is full\n", g->max_T);
            break;
        }
        if (model_infer(g->model, g->lora, g->kv, &id, 1, g->logits) != 0) break;
        g->ctx[g->n_ctx++] = id;
    }
    int len = decode_stream_flush(&ds, g->piece, g->piece_cap);
    text_add(answer, g->piece, (size_t)len);
    if (stream && len > 0) fwrite(g->piece, 1, (size_t)len, stream), fflush(stream);
    return 0;
}


// ---------------------------------------------------------------------------------------------
// Prompts: one message (--prompt), every conversation of a file (--data), a chat's history.

int *render_prompt(const Model *m, const char *system, const Message *msgs, int n, int *n_ids, Err *e) {
    Message *all = xmalloc((size_t)(n + 1) * sizeof(Message));
    int k = 0;
    if (system && !(n > 0 && strcmp(msgs[0].role, "system") == 0))
        all[k].role = (char *)"system", all[k++].content = (char *)system;
    memcpy(all + k, msgs, (size_t)n * sizeof(Message));
    if (chat_check(all, n + k, e) != 0) {  // names the message and the byte in the user's text
        free(all);
        *n_ids = -1;
        return NULL;
    }
    char *text = chat_render(all, n + k, 1);
    int *ids = NULL;
    *n_ids = tokenizer_encode(&m->tok, text, strlen(text), &ids, e);
    free(text);
    free(all);
    return *n_ids < 0 ? NULL : ids;
}

// The answer to the last user turn of conversation c, into *answer.
static int answer_conversation(Generator *g, const Conversation *c, const char *path, const char *system,
                               uint64_t seed, Text *answer, Err *e) {
    int u = conversation_last_user(c);
    if (u < 0) return err_set(e, "%s:%d: no user message to answer", path, c->line);
    int n_ids;
    int *ids = render_prompt(g->model, system, c->msgs, u + 1, &n_ids, e);
    if (!ids) return -1;
    generator_reserve(g, n_ids + g->s.max_new + 1);
    g->s.rng = seed;  // each example samples as if it were alone
    Err why;
    int r = generate_answer(g, ids, n_ids, NULL, answer, &why);
    if (r != 0) err_set(e, "%s:%d: %s", path, c->line, why.msg);
    free(ids);
    return r;
}

int generate_file(Generator *g, const char *path, const char *system, uint64_t seed, FILE *out, Err *e) {
    Conversation *convs;
    int n, r = 0;
    if (data_load_conversations(&convs, &n, path, e) != 0) return -1;
    Text answer = {0};
    for (int c = 0; c < n && r == 0; c++) {
        r = answer_conversation(g, &convs[c], path, system, seed, &answer, e);
        if (r != 0) break;
        const char *p = convs[c].msgs[conversation_last_user(&convs[c])].content;
        fprintf(out, "{\"prompt\": ");
        json_write_string(out, p, strlen(p));
        fprintf(out, ", \"response\": ");
        json_write_string(out, answer.s, answer.n);
        fprintf(out, "}\n");
        fflush(out);
    }
    free(answer.s);
    conversations_free(convs, n);
    return r;
}

void history_add(History *h, const char *role, const char *content) {
    if (h->n == h->cap) {
        h->cap = h->cap ? 2 * h->cap : 16;
        h->msgs = xrealloc(h->msgs, (size_t)h->cap * sizeof(Message));
    }
    h->msgs[h->n].role = xstrdup(role);
    h->msgs[h->n].content = xstrdup(content);
    h->n++;
}

void history_drop_last(History *h) {
    h->n--;
    free(h->msgs[h->n].role);
    free(h->msgs[h->n].content);
}

void history_clear(History *h) {
    while (h->n > 0) history_drop_last(h);
}

void history_free(History *h) {
    history_clear(h);
    free(h->msgs);
    h->msgs = NULL, h->cap = 0;
}
