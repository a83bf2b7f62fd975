// fuzz_data.c: the data loader. The input is a JSONL file (after its first byte, which picks
// --loss-on and --max-len), loaded with Qwen2.5's tokenizer (data/tokenizer.json, loaded once) as
// `sft train` loads it (the three forms, the chat template, the loss mask) and as `sft generate
// --data` reads it (conversations, rendered with the generation prompt and tokenized).
#include "../../data.h"
#include "fuzz.h"

static Tokenizer qwen;
static FILE *devnull;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    fuzz_init("data");
    devnull = fopen("/dev/null", "w");
    Err e;
    if (tokenizer_load(&qwen, "data/tokenizer.json", &e) != 0) {
        fprintf(stderr, "%s (run from the repository root)\n", e.msg);
        exit(1);
    }
    return 0;
}

// What data_load promises about every example.
static void check_dataset(const Dataset *ds, int max_len) {
    long tokens = 0, targets = 0;
    FUZZ_ASSERT(ds->n > 0 && ds->n_targets > 0);
    for (int i = 0; i < ds->n; i++) {
        const Example *ex = &ds->ex[i];
        int n = 0;
        FUZZ_ASSERT(ex->T >= 1 && ex->T <= max_len && ex->mask[0] == 0 && ex->line >= 1);
        for (int t = 0; t < ex->T; t++) {
            FUZZ_ASSERT(ex->tokens[t] >= 0 && ex->tokens[t] < qwen.n_vocab && ex->mask[t] <= 1);
            n += ex->mask[t];
        }
        FUZZ_ASSERT(n == ex->n_targets);
        tokens += ex->T, targets += n;
    }
    FUZZ_ASSERT(tokens == ds->n_tokens && targets == ds->n_targets);
    data_print_example(devnull, ds, 0, &qwen);
}

// Each conversation rendered up to its last user turn with the generation prompt, then tokenized.
static void check_conversations(const Conversation *c, int n) {
    for (int i = 0; i < n; i++) {
        int u = conversation_last_user(&c[i]);
        FUZZ_ASSERT(u >= 0);
        Err e;
        FUZZ_ASSERT(chat_check(c[i].msgs, u + 1, &e) == 0);  // JSON strings are UTF-8 already
        char *text = chat_render(c[i].msgs, u + 1, 1);
        int *ids;
        FUZZ_ASSERT(tokenizer_encode(&qwen, text, strlen(text), &ids, &e) > 0);
        free(ids);
        free(text);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
    if (n == 0) return 0;
    fuzz_write("d.jsonl", data + 1, n - 1);
    const char *path = fuzz_path("d.jsonl");
    int max_len = data[0] & 0x80 ? 2 + (data[0] & 0x3F) : 1024;
    LossOn loss_on = data[0] & 0x40 ? LOSS_ON_ALL : LOSS_ON_ASSISTANT;
    Dataset ds;
    Err e;
    if (data_load(&ds, path, &qwen, loss_on, max_len, &e) == 0) {
        check_dataset(&ds, max_len);
        data_free(&ds);
    } else {
        FUZZ_ASSERT(strncmp(e.msg, path, strlen(path)) == 0);  // every error names the file
    }
    Conversation *c;
    int nc;
    if (data_load_conversations(&c, &nc, path, &e) == 0) {
        check_conversations(c, nc);
        conversations_free(c, nc);
    }
    return 0;
}
