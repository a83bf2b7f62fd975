// generate.h: answers from the model (sft generate, sft chat): the chat prompt, sampling in
// Hugging Face's order (repetition penalty, temperature, top-k, top-p), the KV cache kept across
// the turns of a chat, and the answer streamed as it is decoded.
//
// sft.c turns the options into a Sampling and calls generator_init, then generate_answer per
// prompt. Leaves out: the forward pass with the KV cache (model.c: model_infer), the chat
// template (data.c: chat_render), streaming decode (tokenizer.c). Read generate_answer first.
#ifndef GENERATE_H
#define GENERATE_H

#include <stdint.h>
#include <stdio.h>

#include "common.h"
#include "data.h"
#include "lora.h"
#include "model.h"

typedef struct {
    float temperature;         // 0: greedy
    int top_k;                 // 0: off
    float top_p;               // 1: off
    float repetition_penalty;  // 1: off
    int max_new;               // new tokens at most
    uint64_t rng;              // the random state of the draws
} Sampling;

typedef struct {
    float logit;
    int id;
} Candidate;

typedef struct {
    Model *model;
    const Lora *lora;          // NULL: the base model
    KVCache *kv;
    int max_T;                 // tokens the cache holds
    int *ctx;                  // [max_T] the tokens in the cache, in order
    int n_ctx;
    float *logits;             // [V]
    Candidate *cand;           // [V]
    unsigned char *seen;       // [V] scratch of the repetition penalty
    char *piece;               // [piece_cap] bytes of one streamed token
    int piece_cap;
    Sampling s;
} Generator;

void generator_init(Generator *g, Model *m, const Lora *lora, int max_T, Sampling s);
// Makes room for `need` tokens in the cache (forgetting what it holds when it must grow).
void generator_reserve(Generator *g, int need);
void generator_free(Generator *g);

// A growable NUL-terminated string.
typedef struct {
    char *s;
    size_t n, cap;
} Text;

// The token ids of msgs[n] (with a system message in front when system is not NULL and they
// have none) rendered with the chat template and the generation prompt "<|im_start|>assistant\n".
// NULL with e filled when the text cannot be tokenized.
int *render_prompt(const Model *m, const char *system, const Message *msgs, int n, int *n_ids, Err *e);

// Generates the answer to prompt[n] (a rendered chat ending in "<|im_start|>assistant\n") until
// a stop token or g->s.max_new tokens, streaming it to `stream` (when not NULL) and collecting it
// into *answer. The cached tokens the prompt starts with are not run again (a chat's history).
int generate_answer(Generator *g, const int *prompt, int n, FILE *stream, Text *answer, Err *e);

// sft generate --data: for each conversation of the JSONL file `path`, the answer to its last
// user turn, written to out as one line {"prompt": that turn, "response": the answer}. Every
// conversation samples from `seed`, as if it were alone.
int generate_file(Generator *g, const char *path, const char *system, uint64_t seed, FILE *out, Err *e);

// A chat's messages so far, each role and content owned.
typedef struct {
    Message *msgs;
    int n, cap;
} History;

void history_add(History *h, const char *role, const char *content);
void history_drop_last(History *h);  // forgets the last message (a turn that got no answer)
void history_clear(History *h);      // forgets every message; h->msgs stays for reuse
void history_free(History *h);

#endif
