// data.h: training data from JSONL files to token ids and loss masks, and the Qwen2.5 chat template.
//
// Forms of a line (CONTRACT.md): {"messages": [{"role", "content"}, ...]}, {"prompt", "completion"},
// {"text"}. Chats are rendered exactly as Qwen2.5's Jinja template renders them.
#ifndef DATA_H
#define DATA_H

#include <stdio.h>
#include "common.h"
#include "tokenizer.h"

typedef struct {
    int *tokens;          // [T]
    unsigned char *mask;  // [T] 1 when token t is trained on (predicted from t - 1); mask[0] = 0
    int T;
    int n_targets;        // number of t with mask[t] = 1
    int line;             // line of the file it came from (1-based)
} Example;

typedef struct {
    Example *ex;          // [n]
    int n;
    long n_tokens;        // sum of T
    long n_targets;       // sum of n_targets
    int n_truncated;      // examples cut to max_len
} Dataset;

typedef enum { LOSS_ON_ASSISTANT, LOSS_ON_ALL } LossOn;

// Reads, renders, tokenizes and masks every example of a JSONL file. Examples longer than max_len
// tokens are cut on the right (n_truncated counts them; the caller prints one warning). Any bad
// line (not JSON, wrong fields or types, unknown role, no assistant turn under LOSS_ON_ASSISTANT,
// invalid UTF-8, lone surrogate escapes, ...), an empty file or a data set without a single
// target token is an error "FILE:LINE: reason".
// Chats are trained on assistant content + its <|im_end|> (LOSS_ON_ASSISTANT) or on every token
// after the first (LOSS_ON_ALL); {"text"} examples on every token after the first under both.
int data_load(Dataset *ds, const char *path, const Tokenizer *tok, LossOn loss_on, int max_len, Err *e);
void data_free(Dataset *ds);

// Prints example k token by token: id, text, and whether it is trained on (--show-example).
void data_print_example(FILE *f, const Dataset *ds, int k, const Tokenizer *tok);

typedef struct {
    char *role;     // "system", "user" or "assistant"
    char *content;
} Message;

typedef struct {
    Message *msgs;  // [n]
    int n;
    int line;
} Conversation;

// Reads the conversations of a JSONL file ({"prompt","completion"} becomes a user and an assistant
// message; {"text"} lines are an error here). For `sft generate --data`.
int data_load_conversations(Conversation **convs, int *n, const char *path, Err *e);
void conversations_free(Conversation *convs, int n);

// Index of the last user message of c, or -1: `sft generate --data` renders msgs[0..i] with the
// generation prompt, i.e. chat_render(c->msgs, i + 1, 1).
int conversation_last_user(const Conversation *c);

// Checks that the content of every message is valid UTF-8, which the tokenizer needs, so that an
// error names the message and the byte of its own text ("message 1 (user) is not valid UTF-8 at
// byte 2 of its content (0xFF)"), where the tokenizer could only name a byte of the rendered
// template. Call it before chat_render + tokenizer_encode of text that has not been through JSON.
int chat_check(const Message *msgs, int n, Err *e);

// Renders messages with the Qwen2.5 chat template (the default system message first when
// msgs[0] is not a system message); add_generation_prompt appends "<|im_start|>assistant\n".
// Returns a malloc'ed, NUL-terminated string.
char *chat_render(const Message *msgs, int n, int add_generation_prompt);

#endif
