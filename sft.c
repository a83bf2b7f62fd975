// sft.c: the command line. main() reads the command name and hands the arguments to one
// cmd_* function; each parses its options, loads what it needs, runs, and decides the exit status.
//
// The path of one training step: main -> cmd_train -> train_loop -> train_step (below) ->
// model_forward_backward (model.c) -> block_forward -> matmul (quant.c) -> one row's dot product.
// The training loop, its checkpoints, logs and loss.svg live here too. Leaves out: the model, the
// data and the file formats (model.c, data.c, lora.c, modelfile.c). Read main, then cmd_train.
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common.h"
#include "data.h"
#include "json.h"
#include "lora.h"
#include "model.h"
#include "modelfile.h"
#include "optim.h"
#include "quant.h"
#include "safetensors.h"
#include "threads.h"
#include "tokenizer.h"

// ---------------------------------------------------------------------------------------------
// Options: every command reads `--name value` pairs (and bare flags) with these helpers.

// Prints "sft: message" on stderr and exits with status 1.
static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

#include <stdarg.h>
static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "sft: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

// When argv[*i] is the option `name`, returns its value (argv[*i + 1]) and advances *i; else NULL.
static const char *opt_value(int argc, char **argv, int *i, const char *name) {
    if (strcmp(argv[*i], name) != 0) return NULL;
    if (*i + 1 >= argc) die("option %s needs a value", name);
    *i += 1;
    return argv[*i];
}

static long parse_long(const char *s, const char *name, long lo, long hi) {
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == 0 || *end != 0 || v < lo || v > hi) die("%s: '%s' is not an integer in [%ld, %ld]", name, s, lo, hi);
    return v;
}

static double parse_double(const char *s, const char *name, double lo, double hi) {
    char *end;
    double v = strtod(s, &end);
    if (*s == 0 || *end != 0 || !(v >= lo && v <= hi)) die("%s: '%s' is not a number in [%g, %g]", name, s, lo, hi);
    return v;
}

// ---------------------------------------------------------------------------------------------
// Commands.

// ---------------------------------------------------------------------------------------------
// sft info, sft quantize, sft init: thin wrappers over modelfile.c.

static const char *info_help =
    "usage: sft info --model PATH\n"
    "       sft info --kernels\n"
    "  --model PATH   a GGUF file or a Hugging Face model directory (required)\n"
    "  --kernels      print only the kernels the matrix products use on this CPU\n"
    "Validates the whole model, then prints its architecture, hyperparameters, tokenizer,\n"
    "every tensor (shape, type, bytes), the totals and the kernels in use.\n";

static int cmd_info(int argc, char **argv) {
    const char *model = NULL, *v;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) fputs(info_help, stdout), exit(0);
        else if (strcmp(argv[i], "--kernels") == 0) return printf("%s\n", kernel_path()), 0;
        else if ((v = opt_value(argc, argv, &i, "--model"))) model = v;
        else die("info: unknown option '%s' (sft info --help lists them)", argv[i]);
    }
    if (!model) die("info: --model is required (sft info --help)");
    Err e;
    if (model_info(stdout, model, &e) != 0) die("%s", e.msg);
    printf("kernels: %s\n", kernel_path());
    return 0;
}

static const char *quantize_help =
    "usage: sft quantize --model PATH --type TYPE --out FILE.gguf\n"
    "  --model PATH   a GGUF file or a Hugging Face model directory (required)\n"
    "  --type TYPE    q4_0 | q4_1 | q8_0 | f16 | bf16 | f32 | q4_k_m (and q5_0, q5_1, q4_k, q5_k,\n"
    "                 q6_k where a quantizer exists) (default q8_0)\n"
    "  --out FILE     the GGUF file to write, atomically (required)\n"
    "  --threads N    worker threads (default 0: every online core)\n"
    "Matrices are converted row by row; norms and biases are written as f32.\n";

static int cmd_quantize(int argc, char **argv) {
    const char *model = NULL, *type = "q8_0", *out = NULL, *v;
    int threads = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) fputs(quantize_help, stdout), exit(0);
        else if ((v = opt_value(argc, argv, &i, "--model"))) model = v;
        else if ((v = opt_value(argc, argv, &i, "--type"))) type = v;
        else if ((v = opt_value(argc, argv, &i, "--out"))) out = v;
        else if ((v = opt_value(argc, argv, &i, "--threads"))) threads = (int)parse_long(v, "--threads", 0, 256);
        else die("quantize: unknown option '%s' (sft quantize --help lists them)", argv[i]);
    }
    if (!model || !out) die("quantize: --model and --out are required (sft quantize --help)");
    threads_init(threads);
    Err e;
    double t0 = now_seconds();
    if (model_quantize(model, type, out, &e) != 0) die("%s", e.msg);
    fprintf(stderr, "sft: wrote %s (%s) in %.1f s\n", out, type, now_seconds() - t0);
    threads_free();
    return 0;
}

static const char *init_help =
    "usage: sft init --config NAME --tokenizer PATH --out FILE.gguf [options]\n"
    "  --config NAME     tiny | qwen2.5-0.5b | a Hugging Face config.json (required)\n"
    "  --tokenizer PATH  tokenizer.json, a model directory or a GGUF file (required)\n"
    "  --type TYPE       as for sft quantize (default q4_0)\n"
    "  --seed S          random seed (default 1)\n"
    "  --std X           std of the matrices and biases (default 0.02)\n"
    "  --embed-std X     std of the token embedding (default: --std)\n"
    "  --out FILE        the GGUF file to write, atomically (required)\n"
    "  --threads N       worker threads (default 0: every online core)\n"
    "A randomly initialized Qwen2 model of the config's shapes with that tokenizer embedded;\n"
    "norms are 1. The vocabulary is the config's vocab_size, else the tokenizer's size rounded\n"
    "up to a multiple of 64. The same options always write the same bytes.\n";

static int cmd_init(int argc, char **argv) {
    InitOptions o = {.type = "q4_0", .seed = 1, .std = 0.02f, .embed_std = -1};
    const char *v;
    int threads = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) fputs(init_help, stdout), exit(0);
        else if ((v = opt_value(argc, argv, &i, "--config"))) o.config = v;
        else if ((v = opt_value(argc, argv, &i, "--tokenizer"))) o.tokenizer = v;
        else if ((v = opt_value(argc, argv, &i, "--type"))) o.type = v;
        else if ((v = opt_value(argc, argv, &i, "--seed"))) o.seed = (uint64_t)parse_long(v, "--seed", 0, LONG_MAX);
        else if ((v = opt_value(argc, argv, &i, "--std"))) o.std = (float)parse_double(v, "--std", 0, 100);
        else if ((v = opt_value(argc, argv, &i, "--embed-std"))) o.embed_std = (float)parse_double(v, "--embed-std", 0, 100);
        else if ((v = opt_value(argc, argv, &i, "--out"))) o.out = v;
        else if ((v = opt_value(argc, argv, &i, "--threads"))) threads = (int)parse_long(v, "--threads", 0, 256);
        else die("init: unknown option '%s' (sft init --help lists them)", argv[i]);
    }
    if (!o.config || !o.tokenizer || !o.out) die("init: --config, --tokenizer and --out are required (sft init --help)");
    if (o.embed_std < 0) o.embed_std = o.std;
    threads_init(threads);
    Err e;
    double t0 = now_seconds();
    if (model_init_random(&o, &e) != 0) die("%s", e.msg);
    fprintf(stderr, "sft: wrote %s (%s, %s) in %.1f s\n", o.out, o.config, o.type, now_seconds() - t0);
    threads_free();
    return 0;
}
// ---------------------------------------------------------------------------------------------
// sft export, sft merge: the adapter where other tools run models (lora_gguf.c, modelfile.c).

static const char *export_help =
    "usage: sft export --model BASE --lora ADAPTER --out ADAPTER.gguf [--type TYPE]\n"
    "  --model BASE   the base model the adapter belongs to: GGUF or Hugging Face directory\n"
    "                 (required; every tensor's shape is checked against it)\n"
    "  --lora PATH    a PEFT adapter directory or a GGUF adapter (required)\n"
    "  --out FILE     the llama.cpp LoRA adapter to write, atomically (required)\n"
    "  --type TYPE    f32 (default) | f16 | bf16 | q8_0 (tensors whose rows are not whole blocks of\n"
    "                 32 are written as f16, as llama.cpp's convert_lora_to_gguf.py does)\n"
    "Writes what convert_lora_to_gguf.py writes: general.type adapter, adapter.type lora,\n"
    "adapter.lora.alpha, and blk.N.attn_q.weight.lora_a / .lora_b ... for each adapted matrix.\n"
    "llama.cpp scales every matrix by alpha / r: an rsLoRA adapter is written with alpha * sqrt(r),\n"
    "and a matrix whose scale still differs (rank_pattern with rsLoRA, alpha_pattern) with its B\n"
    "multiplied by the ratio. Use it with: llama-cli -m BASE.gguf --lora ADAPTER.gguf, or Ollama's\n"
    "Modelfile (FROM BASE.gguf, ADAPTER ADAPTER.gguf).\n";

static int cmd_export(int argc, char **argv) {
    const char *model = NULL, *lora_path = NULL, *out = NULL, *type_name = "f32", *v;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) fputs(export_help, stdout), exit(0);
        else if ((v = opt_value(argc, argv, &i, "--model"))) model = v;
        else if ((v = opt_value(argc, argv, &i, "--lora"))) lora_path = v;
        else if ((v = opt_value(argc, argv, &i, "--out"))) out = v;
        else if ((v = opt_value(argc, argv, &i, "--type"))) type_name = v;
        else die("export: unknown option '%s' (sft export --help lists them)", argv[i]);
    }
    if (!model || !lora_path || !out) die("export: --model, --lora and --out are required (sft export --help)");
    int type = type_from_name(type_name);
    if (type != TYPE_F32 && type != TYPE_F16 && type != TYPE_BF16 && type != TYPE_Q8_0)
        die("--type: '%s' is not f32, f16, bf16 or q8_0", type_name);
    Config c;
    Lora lora;
    Err e;
    if (model_peek(model, &c, NULL, &e) != 0 || lora_load(&lora, lora_path, &c, &e) != 0) die("%s", e.msg);
    char name[256];  // general.name: the adapter's file or directory name, as the converter names it
    snprintf(name, sizeof name, "%s", lora_path);
    for (size_t n = strlen(name); n > 1 && name[n - 1] == '/'; n--) name[n - 1] = 0;
    const char *base = strrchr(name, '/') ? strrchr(name, '/') + 1 : name;
    if (lora_save_gguf(&lora, out, type, base, &e) != 0) die("%s", e.msg);
    fprintf(stderr, "sft: wrote %s (%s, rank %d%s)\n", out, type_name, lora.R, lora.rslora ? ", rsLoRA" : "");
    lora_free(&lora);
    return 0;
}

static const char *merge_help =
    "usage: sft merge --model BASE --lora ADAPTER --out MERGED.gguf [--type TYPE]\n"
    "       sft merge --model BASE --lora ADAPTER --out DIR/ [--dtype bf16|f32]\n"
    "  --model BASE   GGUF file or Hugging Face model directory (required)\n"
    "  --lora PATH    a PEFT adapter directory or a GGUF adapter (required)\n"
    "  --out PATH     a GGUF file, or a directory (ending in / or existing) for a Hugging Face\n"
    "                 model: config.json, model.safetensors, tokenizer files, generation_config.json\n"
    "  --type TYPE    GGUF output: as for sft quantize (f32, f16, bf16, q8_0, q4_0, q4_k_m, ...)\n"
    "                 (default: each matrix's stored type for a GGUF base, bf16 for a HF base)\n"
    "  --dtype T      directory output: bf16 (default) or f32\n"
    "  --threads N    worker threads (default 0: every online core)\n"
    "W' = W + scale * B A, computed in float32 from the base as stored (a GGUF base dequantized,\n"
    "a Hugging Face base as it is: never through training's --quant), then written in the type.\n"
    "What requantizing costs: the update is small next to W, so a 4-bit type rounds much of it away\n"
    "and the base pays its own rounding error a second time (a Q4_0 base merged back into Q4_0 is\n"
    "two quantizations, not one). Merge from the original f16/bf16/f32 weights when you can, into\n"
    "q8_0 or better; or keep the adapter apart (sft export) and let llama.cpp add it at run time.\n";

static int cmd_merge(int argc, char **argv) {
    const char *model = NULL, *lora_path = NULL, *v;
    MergeOptions o = {0};
    int threads = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) fputs(merge_help, stdout), exit(0);
        else if ((v = opt_value(argc, argv, &i, "--model"))) model = v;
        else if ((v = opt_value(argc, argv, &i, "--lora"))) lora_path = v;
        else if ((v = opt_value(argc, argv, &i, "--out"))) o.out = v;
        else if ((v = opt_value(argc, argv, &i, "--type"))) o.type = v;
        else if ((v = opt_value(argc, argv, &i, "--dtype"))) o.dtype = v;
        else if ((v = opt_value(argc, argv, &i, "--threads"))) threads = (int)parse_long(v, "--threads", 0, 256);
        else die("merge: unknown option '%s' (sft merge --help lists them)", argv[i]);
    }
    if (!model || !lora_path || !o.out) die("merge: --model, --lora and --out are required (sft merge --help)");
    threads_init(threads);
    Err e;
    double t0 = now_seconds();
    if (model_merge(model, lora_path, &o, &e) != 0) die("%s", e.msg);
    fprintf(stderr, "sft: wrote %s in %.1f s\n", o.out, now_seconds() - t0);
    threads_free();
    return 0;
}

// ---------------------------------------------------------------------------------------------
// sft tokenize: text to ids and ids to text with tokenizer.c.

static const char *tokenize_help =
    "usage: sft tokenize --tokenizer PATH (--file F | TEXT)\n"
    "       sft tokenize --tokenizer PATH --decode (--file F | IDS)\n"
    "  --tokenizer PATH  tokenizer.json, a model directory or a GGUF file (required)\n"
    "  --file F          read the text (or the ids) from F; the whole file is one text\n"
    "  --decode          ids (separated by spaces, commas or newlines) to text\n"
    "  --bench           print the time taken and the throughput on stderr (one JSON object)\n"
    "Encoding prints the ids on one line, separated by spaces; decoding prints the text and a\n"
    "newline. Special tokens in the text (<|im_start|>, ...) are single tokens, as in Hugging Face.\n";

// Parses ids separated by white space or commas; every id must be in [0, n_vocab).
static int *tokenize_parse_ids(const char *s, int n_vocab, int *n_ids) {
    size_t cap = 64, n = 0;
    int *ids = xmalloc(cap * sizeof *ids);
    while (*s) {
        if (*s == ' ' || *s == ',' || *s == '\t' || *s == '\n' || *s == '\r') {
            s++;
            continue;
        }
        char *end;
        errno = 0;
        long v = strtol(s, &end, 10);
        if (end == s || errno || v < 0 || v >= n_vocab || n >= INT_MAX)
            die("tokenize: '%.20s' is not a token id in [0, %d)", s, n_vocab);
        if (n == cap) {
            cap *= 2;
            int *more = xmalloc(cap * sizeof *ids);
            memcpy(more, ids, n * sizeof *ids);
            free(ids);
            ids = more;
        }
        ids[n++] = (int)v;
        s = end;
    }
    *n_ids = (int)n;
    return ids;
}

static int cmd_tokenize(int argc, char **argv) {
    const char *path = NULL, *file = NULL, *text = NULL, *v;
    int decode = 0, bench = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) fputs(tokenize_help, stdout), exit(0);
        else if ((v = opt_value(argc, argv, &i, "--tokenizer"))) path = v;
        else if ((v = opt_value(argc, argv, &i, "--file"))) file = v;
        else if (strcmp(argv[i], "--decode") == 0) decode = 1;
        else if (strcmp(argv[i], "--bench") == 0) bench = 1;
        else if (strncmp(argv[i], "--", 2) == 0 || text) die("tokenize: unexpected argument '%s' (sft tokenize --help)", argv[i]);
        else text = argv[i];
    }
    if (!path || (!file) == (!text)) die("tokenize: --tokenizer and either --file or a text are required (sft tokenize --help)");
    Err e;
    Tokenizer tok;
    if (model_load_tokenizer(&tok, path, &e) != 0) die("%s", e.msg);
    size_t len = text ? strlen(text) : 0;
    char *buf = file ? read_file(file, &len, &e) : NULL;
    if (file && !buf) die("%s", e.msg);
    const char *in = file ? buf : text;
    double t0 = now_seconds();
    int n;
    if (decode) {
        int *ids = tokenize_parse_ids(in, tok.n_vocab, &n);
        char *out = tokenizer_decode(&tok, ids, n);
        fputs(out, stdout);
        fputc('\n', stdout);
        free(out);
        free(ids);
    } else {
        int *ids;
        n = tokenizer_encode(&tok, in, len, &ids, &e);
        if (n < 0) die("%s: %s", file ? file : "text", e.msg);
        for (int k = 0; k < n; k++) printf(k ? " %d" : "%d", ids[k]);
        putchar('\n');
        free(ids);
    }
    double dt = now_seconds() - t0;
    if (bench)  // one JSON object, as make bench collects it
        fprintf(stderr, "{\"what\": \"%s\", \"bytes\": %zu, \"tokens\": %d, \"seconds\": %.4f, \"mb_per_s\": %.2f}\n",
                decode ? "decode" : "encode", len, n, dt, dt > 0 ? (double)len / dt / 1e6 : 0.0);
    free(buf);
    tokenizer_free(&tok);
    return 0;
}
// ---------------------------------------------------------------------------------------------
// sft eval, sft grads: the mean loss of a data set, and its gradient with respect to the adapter.

static const char *eval_help =
    "usage: sft eval --model PATH [--lora DIR] --data FILE.jsonl [options]\n"
    "  --model PATH     GGUF file or Hugging Face model directory (required)\n"
    "  --lora PATH      an adapter: a PEFT directory (adapter_config.json + adapter_model.safetensors)\n"
    "                   or a llama.cpp LoRA GGUF file (default: none)\n"
    "  --data FILE      JSONL data (required)\n"
    "  --loss-on WHAT   assistant (default: replies and their <|im_end|>) or all (every token)\n"
    "  --max-len N      0 (0: the model's context length; longer examples are cut, with a warning)\n"
    "  --quant TYPE     frozen weights in memory: q4_0 (default for safetensors), nf4, q8_0, bf16,\n"
    "                   f32; a GGUF model keeps its stored types unless given\n"
    "  --threads N      0 (0: all cores); the results do not depend on it\n"
    "  --logits FILE    also write the logits at every position of every example, F32, into a\n"
    "                   safetensors file: logits.I [T, V] and tokens.I [T] (ids as floats) for\n"
    "                   example I (from 0): for checks against other implementations\n"
    "Prints one line: loss <mean NLL over all target tokens> ppl <exp(loss)> tokens <targets>.\n";

static const char *grads_help =
    "usage: sft grads --model PATH --lora DIR --data FILE.jsonl --out GRADS.safetensors [options]\n"
    "  --model PATH     GGUF file or Hugging Face model directory (required)\n"
    "  --lora PATH      a PEFT adapter directory or a GGUF adapter (required)\n"
    "  --data FILE      JSONL data (required)\n"
    "  --out FILE       the gradients, F32, under the adapter's tensor names (required)\n"
    "  --loss-on WHAT   assistant (default) or all\n"
    "  --max-len N      0 (0: the model's context length; longer examples are cut, with a warning)\n"
    "  --quant TYPE     as for sft eval\n"
    "  --threads N      0 (0: all cores); the results do not depend on it\n"
    "Prints one line, loss <mean NLL over all target tokens of the file>, and writes the gradient\n"
    "of that loss with respect to every LoRA tensor. No dropout; deterministic.\n";

typedef struct {
    const char *model, *lora, *data, *out, *logits;
    LossOn loss_on;
    int max_len, quant, threads;
} EvalOptions;

static EvalOptions eval_parse_options(int argc, char **argv, const char *cmd, const char *help) {
    EvalOptions o = {.loss_on = LOSS_ON_ASSISTANT, .quant = -1};
    for (int i = 1; i < argc; i++) {
        const char *v;
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) fputs(help, stdout), exit(0);
        else if ((v = opt_value(argc, argv, &i, "--model"))) o.model = v;
        else if ((v = opt_value(argc, argv, &i, "--lora"))) o.lora = v;
        else if ((v = opt_value(argc, argv, &i, "--data"))) o.data = v;
        else if ((v = opt_value(argc, argv, &i, "--out")) && strcmp(cmd, "grads") == 0) o.out = v;
        else if (v) die("%s: unknown option '--out' (sft %s --help lists them)", cmd, cmd);
        else if ((v = opt_value(argc, argv, &i, "--logits")) && strcmp(cmd, "eval") == 0) o.logits = v;
        else if (v) die("%s: unknown option '--logits' (sft %s --help lists them)", cmd, cmd);
        else if ((v = opt_value(argc, argv, &i, "--max-len"))) o.max_len = (int)parse_long(v, "--max-len", 0, 1 << 24);
        else if ((v = opt_value(argc, argv, &i, "--threads"))) o.threads = (int)parse_long(v, "--threads", 0, 4096);
        else if ((v = opt_value(argc, argv, &i, "--quant"))) {
            o.quant = type_from_name(v);
            if (o.quant < 0) die("--quant: unknown type '%s' (q4_0, nf4, q8_0, bf16, f32)", v);
        } else if ((v = opt_value(argc, argv, &i, "--loss-on"))) {
            if (strcmp(v, "assistant") == 0) o.loss_on = LOSS_ON_ASSISTANT;
            else if (strcmp(v, "all") == 0) o.loss_on = LOSS_ON_ALL;
            else die("--loss-on: '%s' is not assistant or all", v);
        } else die("%s: unknown option '%s' (sft %s --help lists them)", cmd, argv[i], cmd);
    }
    if (!o.model || !o.data) die("%s: --model and --data are required (sft %s --help)", cmd, cmd);
    return o;
}

// Loads the model, the adapter (when given) and the data; dies with the message on any error.
static void eval_load(Model *m, Lora *lora, Dataset *ds, const EvalOptions *o) {
    Err e;
    if (model_load(m, o->model, o->quant, &e) != 0) die("%s", e.msg);
    if (o->lora && lora_load(lora, o->lora, &m->config, &e) != 0) die("%s", e.msg);
    int max_len = o->max_len > 0 ? o->max_len : m->config.max_seq;
    if (data_load(ds, o->data, &m->tok, o->loss_on, max_len, &e) != 0) die("%s", e.msg);
    if (ds->n_truncated)
        fprintf(stderr, "sft: warning: %d of %d examples were longer than %d tokens and were cut\n", ds->n_truncated,
                ds->n, max_len);
}

// Examples run through the model as batches of stacked sequences (model_forward_backward_batch):
// consecutive examples while their tokens fit in PACK_TOKENS (or in the longest one), so that
// every matrix product of the model sees many rows at once even when the examples are short.
#define PACK_TOKENS 256
#define PACK_SEQS 64     // sequences of one pass at most

// Tokens of the Activations for examples up to `longest` tokens, `per_pass` examples a pass at most.
static int pack_tokens(const Dataset *ds, int per_pass) {
    int longest = 2, sum = 0;
    for (int i = 0; i < ds->n; i++) longest = ds->ex[i].T > longest ? ds->ex[i].T : longest;
    for (int i = 0; i < ds->n && i < per_pass; i++) sum += ds->ex[i].T;  // a rough bound for short data sets
    int cap = sum < PACK_TOKENS ? (sum > 2 ? sum : 2) : PACK_TOKENS;
    return longest > cap ? longest : cap;
}

// Sum of the NLLs of the examples ex[n] (pointers), in passes of at most a's max_T tokens; with
// backward, their gradient (scaled by grad_scale) is added to lora->grads. The passes are counted
// in *pass; pass p draws its dropout masks from dropout_seed(seed, step, p), none when seed is 0.
static uint64_t dropout_seed(uint64_t seed, long s, int j);
static double run_examples(Model *m, Lora *lora, Activations *a, const Example *const *ex, int n, float grad_scale,
                           int backward, uint64_t seed, long step, int *pass) {
    Sequence seqs[PACK_SEQS];
    int max_T = activations_max_T(a);
    double sum = 0;
    for (int i = 0; i < n; (*pass)++) {
        int B = 0, T = 0;
        while (i < n && B < PACK_SEQS && (B == 0 || T + ex[i]->T <= max_T)) {
            seqs[B++] = (Sequence){ex[i]->tokens, ex[i]->mask, ex[i]->T};
            T += ex[i++]->T;
        }
        sum += model_forward_backward_batch(m, lora, a, seqs, B, grad_scale, backward,
                                            seed ? dropout_seed(seed, step, *pass) : 0);
    }
    return sum;
}

// The mean NLL over every target of the data set; with backward, lora->grads holds its gradient.
static double dataset_loss(Model *m, Lora *lora, const Dataset *ds, int backward, const char *path) {
    Activations *a = activations_new(&m->config, lora, pack_tokens(ds, ds->n));
    const Example **ex = xmalloc((size_t)ds->n * sizeof *ex);
    for (int i = 0; i < ds->n; i++) ex[i] = &ds->ex[i];
    if (lora) lora_zero_grad(lora);
    int passes = 0;
    double sum = run_examples(m, lora, a, ex, ds->n, (float)(1.0 / ds->n_targets), backward, 0, 0, &passes);
    if (!isfinite(sum)) die("%s: the loss is not finite (a token id past the model's vocabulary?)", path);
    free(ex);
    activations_free(a);
    return sum / (double)ds->n_targets;
}

// --logits: every example run token by token through the KV cache; logits.I [T, V], tokens.I [T].
static void write_logits(Model *m, Lora *lora, const Dataset *ds, const char *data, const char *path) {
    int V = m->config.V, max_T = 1;
    for (int i = 0; i < ds->n; i++) max_T = ds->ex[i].T > max_T ? ds->ex[i].T : max_T;
    KVCache *kv = kvcache_new(&m->config, max_T);
    StTensor *t = xcalloc((size_t)ds->n * 2, sizeof *t);
    char *names = xmalloc((size_t)ds->n * 2 * 32);
    for (int i = 0; i < ds->n; i++) {
        const Example *ex = &ds->ex[i];
        float *logits = xmalloc(sizeof(float) * (size_t)ex->T * V), *ids = xmalloc(sizeof(float) * (size_t)ex->T);
        kvcache_reset(kv);
        for (int k = 0; k < ex->T; k++) {
            if (model_infer(m, lora, kv, &ex->tokens[k], 1, logits + (size_t)k * V) != 0)
                die("%s:%d: cannot run the example", data, ex->line);
            ids[k] = (float)ex->tokens[k];
        }
        snprintf(names + (size_t)i * 64, 32, "logits.%d", i);
        snprintf(names + (size_t)i * 64 + 32, 32, "tokens.%d", i);
        t[2 * i] = (StTensor){.name = names + (size_t)i * 64, .type = TYPE_F32, .n_dims = 2, .shape = {ex->T, V}, .data = logits};
        t[2 * i + 1] = (StTensor){.name = names + (size_t)i * 64 + 32, .type = TYPE_F32, .n_dims = 1, .shape = {ex->T}, .data = ids};
    }
    Err e;
    if (safetensors_write(path, t, ds->n * 2, NULL, &e) != 0) die("%s", e.msg);
    for (int i = 0; i < ds->n * 2; i++) free((void *)t[i].data);
    free(t), free(names);
    kvcache_free(kv);
}

static int cmd_eval(int argc, char **argv) {
    EvalOptions o = eval_parse_options(argc, argv, "eval", eval_help);
    Model m;
    Lora lora;
    Dataset ds;
    threads_init(o.threads);
    eval_load(&m, &lora, &ds, &o);
    double t0 = now_seconds();
    double loss = dataset_loss(&m, o.lora ? &lora : NULL, &ds, 0, o.data);
    fprintf(stderr, "sft: %d examples, %ld tokens, %ld targets in %.2f s\n", ds.n, ds.n_tokens, ds.n_targets,
            now_seconds() - t0);
    if (o.logits) write_logits(&m, o.lora ? &lora : NULL, &ds, o.data, o.logits);
    printf("loss %.9g ppl %.9g tokens %ld\n", loss, exp(loss), ds.n_targets);
    data_free(&ds);
    if (o.lora) lora_free(&lora);
    model_free(&m);
    threads_free();
    return 0;
}

static int cmd_grads(int argc, char **argv) {
    EvalOptions o = eval_parse_options(argc, argv, "grads", grads_help);
    if (!o.lora || !o.out) die("grads: --lora and --out are required (sft grads --help)");
    Model m;
    Lora lora;
    Dataset ds;
    threads_init(o.threads);
    eval_load(&m, &lora, &ds, &o);
    double loss = dataset_loss(&m, &lora, &ds, 1, o.data);
    Err e;
    if (lora_save_grads(&lora, o.out, &e) != 0) die("%s", e.msg);
    printf("loss %.9g\n", loss);
    data_free(&ds);
    lora_free(&lora);
    model_free(&m);
    threads_free();
    return 0;
}

// =============================================================================================
// sft train: options, the plan, the training loop, checkpoints, train_log.jsonl and loss.svg.
// Read cmd_train first, then train_loop -> train_step; checkpoints and the log come after them.
// One optimizer step = batch x grad-accum examples, run forward and backward as stacked sequences
// (run_examples: no padding, each example attends only to itself), gradients summed with
// grad_scale = 1 / target tokens of the step; then global norm clipping and AdamW (optim.c). The data order of epoch E and the dropout masks of step S
// are functions of (seed, E, S), so a resumed run sees exactly what an uninterrupted one sees.

// The one mutable global of sft: the SIGINT handler can reach nothing else. The training loop
// reads it between optimizer steps, saves a checkpoint and exits with status 130.
static volatile sig_atomic_t train_interrupted = 0;
static void train_on_sigint(int sig) {
    train_interrupted = 1;
    signal(sig, SIG_DFL);  // a second Ctrl-C stops at once
}

typedef struct {
    const char *model, *data, *out, *eval_data, *init_lora, *resume, *targets;
    int rank, batch, grad_accum, epochs, max_len, threads, quant, show_example, overwrite;
    double alpha, dropout, lr, warmup_ratio, weight_decay, max_grad_norm;
    long warmup_steps;       // -1: from warmup_ratio
    long max_steps, eval_every, save_every;
    Schedule schedule;
    LossOn loss_on;
    uint64_t seed;
} TrainOptions;

static const char *train_help =
    "usage: sft train --model PATH --data FILE.jsonl --out DIR [options]\n"
    "\n"
    "LoRA fine-tuning. Writes DIR/adapter_model.safetensors + DIR/adapter_config.json (PEFT format),\n"
    "DIR/train_log.jsonl (one line per optimizer step), DIR/loss.svg and DIR/checkpoint-STEP/.\n"
    "\n"
    "  --model PATH         GGUF file or Hugging Face model directory (required)\n"
    "  --data FILE          JSONL training data (required)\n"
    "  --out DIR            output directory (required; with --resume: the checkpoint's parent)\n"
    "  --quant TYPE         frozen weights in memory: q4_0 (default for safetensors), nf4, q8_0,\n"
    "                       bf16, f32; a GGUF model keeps its stored types unless given\n"
    "adapter\n"
    "  --rank R             8\n"
    "  --alpha A            16 (the update is scaled by alpha / rank)\n"
    "  --dropout P          0.05 (LoRA dropout on the adapter's input)\n"
    "  --targets LIST       q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj\n"
    "  --init-lora PATH     start from this adapter (PEFT directory or GGUF), keeping its ranks,\n"
    "                       alphas and targets\n"
    "optimization\n"
    "  --lr LR              2e-4 (peak learning rate)\n"
    "  --epochs N           2\n"
    "  --batch B            1 (examples per micro-batch)\n"
    "  --grad-accum K       4 (micro-batches per optimizer step)\n"
    "  --max-steps N        0 (0: the epochs decide; N > 0: exactly N optimizer steps)\n"
    "  --schedule S         linear (down to 0 after warmup), cosine or constant\n"
    "  --warmup-steps N     0\n"
    "  --warmup-ratio F     0 (warmup = ceil(F x steps), when --warmup-steps is not given)\n"
    "  --weight-decay WD    0 (AdamW, decoupled, on every LoRA tensor)\n"
    "  --max-grad-norm G    1.0 (global gradient-norm clipping; 0 turns it off)\n"
    "  --seed S             42 (adapter initialization, data order, dropout)\n"
    "data\n"
    "  --loss-on WHAT       assistant (replies and their <|im_end|>) or all (every token)\n"
    "  --max-len N          1024 (longer examples are cut, with a warning)\n"
    "  --show-example K     print example K token by token (trained on or not) before training\n"
    "  --eval-data FILE     held-out JSONL data whose loss is logged\n"
    "  --eval-every N       0 (0: at the end of each epoch)\n"
    "saving\n"
    "  --save-every N       0 (0: a checkpoint only at the end and on Ctrl-C)\n"
    "  --resume DIR         continue from DIR = OUT/checkpoint-STEP exactly as if never stopped\n"
    "  --overwrite          write into a non-empty --out\n"
    "  --threads N          0 (0: all cores); the results do not depend on it\n"
    "\n"
    "Exit status: 0 done; 1 error (one line on stderr); 130 stopped by Ctrl-C after saving a\n"
    "checkpoint (a second Ctrl-C stops at once).\n";

static TrainOptions train_parse_options(int argc, char **argv) {
    TrainOptions o = {0};
    o.rank = 8, o.alpha = 16, o.dropout = 0.05, o.lr = 2e-4, o.batch = 1, o.grad_accum = 4;
    o.epochs = 2, o.max_len = 1024, o.seed = 42, o.warmup_steps = -1, o.max_grad_norm = 1.0;
    o.quant = -1, o.show_example = -1, o.schedule = SCHEDULE_LINEAR, o.loss_on = LOSS_ON_ASSISTANT;
    o.targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj";
    for (int i = 1; i < argc; i++) {
        const char *v;
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) fputs(train_help, stdout), exit(0);
        else if (strcmp(argv[i], "--overwrite") == 0) o.overwrite = 1;
        else if ((v = opt_value(argc, argv, &i, "--model"))) o.model = v;
        else if ((v = opt_value(argc, argv, &i, "--data"))) o.data = v;
        else if ((v = opt_value(argc, argv, &i, "--out"))) o.out = v;
        else if ((v = opt_value(argc, argv, &i, "--eval-data"))) o.eval_data = v;
        else if ((v = opt_value(argc, argv, &i, "--init-lora"))) o.init_lora = v;
        else if ((v = opt_value(argc, argv, &i, "--resume"))) o.resume = v;
        else if ((v = opt_value(argc, argv, &i, "--targets"))) o.targets = v;
        else if ((v = opt_value(argc, argv, &i, "--rank"))) o.rank = (int)parse_long(v, "--rank", 1, 4096);
        else if ((v = opt_value(argc, argv, &i, "--alpha"))) o.alpha = parse_double(v, "--alpha", 1e-6, 1e6);
        else if ((v = opt_value(argc, argv, &i, "--dropout"))) o.dropout = parse_double(v, "--dropout", 0, 0.99);
        else if ((v = opt_value(argc, argv, &i, "--lr"))) o.lr = parse_double(v, "--lr", 0, 1e30);
        else if ((v = opt_value(argc, argv, &i, "--batch"))) o.batch = (int)parse_long(v, "--batch", 1, 1 << 20);
        else if ((v = opt_value(argc, argv, &i, "--grad-accum"))) o.grad_accum = (int)parse_long(v, "--grad-accum", 1, 1 << 20);
        else if ((v = opt_value(argc, argv, &i, "--epochs"))) o.epochs = (int)parse_long(v, "--epochs", 1, 1 << 20);
        else if ((v = opt_value(argc, argv, &i, "--max-steps"))) o.max_steps = parse_long(v, "--max-steps", 0, 1L << 40);
        else if ((v = opt_value(argc, argv, &i, "--warmup-steps"))) o.warmup_steps = parse_long(v, "--warmup-steps", 0, 1L << 40);
        else if ((v = opt_value(argc, argv, &i, "--warmup-ratio"))) o.warmup_ratio = parse_double(v, "--warmup-ratio", 0, 1);
        else if ((v = opt_value(argc, argv, &i, "--weight-decay"))) o.weight_decay = parse_double(v, "--weight-decay", 0, 1e6);
        else if ((v = opt_value(argc, argv, &i, "--max-grad-norm"))) o.max_grad_norm = parse_double(v, "--max-grad-norm", 0, 1e30);
        else if ((v = opt_value(argc, argv, &i, "--seed"))) o.seed = (uint64_t)parse_long(v, "--seed", 0, LONG_MAX);
        else if ((v = opt_value(argc, argv, &i, "--max-len"))) o.max_len = (int)parse_long(v, "--max-len", 2, 1 << 24);
        else if ((v = opt_value(argc, argv, &i, "--threads"))) o.threads = (int)parse_long(v, "--threads", 0, 4096);
        else if ((v = opt_value(argc, argv, &i, "--show-example"))) o.show_example = (int)parse_long(v, "--show-example", 0, INT_MAX);
        else if ((v = opt_value(argc, argv, &i, "--eval-every"))) o.eval_every = parse_long(v, "--eval-every", 0, 1L << 40);
        else if ((v = opt_value(argc, argv, &i, "--save-every"))) o.save_every = parse_long(v, "--save-every", 0, 1L << 40);
        else if ((v = opt_value(argc, argv, &i, "--quant"))) {
            o.quant = type_from_name(v);
            if (o.quant < 0) die("--quant: unknown type '%s' (q4_0, nf4, q8_0, bf16, f32)", v);
        } else if ((v = opt_value(argc, argv, &i, "--schedule"))) {
            int s = schedule_from_name(v);
            if (s < 0) die("--schedule: '%s' is not linear, cosine or constant", v);
            o.schedule = (Schedule)s;
        } else if ((v = opt_value(argc, argv, &i, "--loss-on"))) {
            if (strcmp(v, "assistant") == 0) o.loss_on = LOSS_ON_ASSISTANT;
            else if (strcmp(v, "all") == 0) o.loss_on = LOSS_ON_ALL;
            else die("--loss-on: '%s' is not assistant or all", v);
        } else die("train: unknown option '%s' (sft train --help lists them)", argv[i]);
    }
    if (!o.model || !o.data) die("train: --model and --data are required (sft train --help)");
    if (!o.out && !o.resume) die("train: --out is required (sft train --help)");
    return o;
}

// A growable list of (step, loss) points for loss.svg.
typedef struct {
    double *x, *y;
    size_t n, cap;
} Curve;

static void curve_add(Curve *c, double x, double y) {
    if (c->n == c->cap) {
        c->cap = c->cap ? 2 * c->cap : 64;
        c->x = realloc(c->x, c->cap * sizeof(double));
        c->y = realloc(c->y, c->cap * sizeof(double));
        if (!c->x || !c->y) die("out of memory");
    }
    c->x[c->n] = x, c->y[c->n] = y, c->n++;
}

#define TPS_WINDOW 10  // steps the tok/s of the progress line averages over

typedef struct {
    TrainOptions o;
    char out[1024];          // the output directory
    Model model;
    Lora lora;
    AdamW opt;
    Dataset train, eval;
    int has_eval;
    Activations *acts;
    long steps_per_epoch;    // ceil(examples / (batch x grad-accum))
    long total_steps;        // optimizer steps of the whole run
    long warmup;             // warmup steps
    long step;               // optimizer steps done
    int *order;              // [train.n] data order of epoch order_epoch
    long order_epoch;        // -1: none yet
    uint64_t model_fp, data_fp;  // fingerprints that a checkpoint must match
    FILE *log;               // OUT/train_log.jsonl, one line appended per step
    Curve train_curve, eval_curve;
    double t0;               // when this process started its first step
    double elapsed_before;   // seconds of training before a resume
    double last_svg;         // when loss.svg was last written
    long steps_this_run;
    long last_checkpoint;    // step of the last checkpoint written, 0 for none
    int tty;                 // stdout is a terminal: one live progress line
    int line_open;           // the live line is on screen without its newline
    long win_tokens[TPS_WINDOW];     // tokens and seconds of the last TPS_WINDOW steps, for the tok/s
    double win_seconds[TPS_WINDOW];  // of the progress line (one step alone jumps with its length)
} Trainer;

// What one optimizer step did.
typedef struct {
    double loss;         // mean NLL per target token
    double grad_norm;    // before clipping
    float lr;
    long tokens;         // tokens through the model
    long targets;        // target tokens
    double seconds;
} StepStats;

// ---------------------------------------------------------------------------------------------
// Fingerprints: FNV-1a over bytes, so that a checkpoint of another model or data set is refused.

static uint64_t fnv1a(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}
#define FNV_START 0xcbf29ce484222325ull

// The config, the stored types and a sample of the weights: the embedding rows 0, V/2 and V-1,
// the output norm, and per layer the norms and the first row of wq.
static uint64_t model_fingerprint(const Model *m) {
    const Config *c = &m->config;
    int dims[8] = {c->C, c->L, c->NH, c->NKV, c->FF, c->V, c->tied, m->w.embed.type};
    uint64_t h = fnv1a(FNV_START, dims, sizeof dims);
    float *row = xmalloc((size_t)(c->C > c->FF ? c->C : c->FF) * sizeof(float));
    int rows[3] = {0, c->V / 2, c->V - 1};
    for (int i = 0; i < 3; i++) {
        qmatrix_row(row, &m->w.embed, rows[i]);
        h = fnv1a(h, row, (size_t)c->C * sizeof(float));
    }
    h = fnv1a(h, m->w.out_norm, (size_t)c->C * sizeof(float));
    for (int l = 0; l < c->L; l++) {
        const LayerWeights *lw = &m->w.layers[l];
        h = fnv1a(h, &lw->wq.type, sizeof lw->wq.type);
        h = fnv1a(h, lw->attn_norm, (size_t)c->C * sizeof(float));
        h = fnv1a(h, lw->ffn_norm, (size_t)c->C * sizeof(float));
        qmatrix_row(row, &lw->wq, 0);
        h = fnv1a(h, row, (size_t)lw->wq.cols * sizeof(float));
    }
    free(row);
    return h;
}

static uint64_t data_fingerprint(const Dataset *d) {
    uint64_t h = fnv1a(FNV_START, &d->n, sizeof d->n);
    for (int i = 0; i < d->n; i++) {
        h = fnv1a(h, d->ex[i].tokens, (size_t)d->ex[i].T * sizeof(int));
        h = fnv1a(h, d->ex[i].mask, (size_t)d->ex[i].T);
    }
    return h;
}

// ---------------------------------------------------------------------------------------------
// The data order and the dropout seeds: pure functions of (seed, epoch, step).

// order[n] = a permutation of 0..n-1 (Fisher-Yates) drawn from (seed, epoch).
static void epoch_order(int *order, int n, uint64_t seed, long epoch) {
    uint64_t st = seed ^ (0xD1B54A32D192ED03ull * (uint64_t)(epoch + 1));
    for (int i = 0; i < n; i++) order[i] = i;
    for (int i = n - 1; i > 0; i--) {
        int j = (int)(rng_next(&st) % (uint64_t)(i + 1));
        int t = order[i];
        order[i] = order[j], order[j] = t;
    }
}

// Nonzero seed of the dropout masks of example j of step s (0 means no dropout).
static uint64_t dropout_seed(uint64_t seed, long s, int j) {
    uint64_t st = seed ^ (0xAEF17502108EF2D9ull * (uint64_t)(s + 1)) ^ (0xF1357AEA2E62A9C5ull * (uint64_t)(j + 1));
    uint64_t d = rng_next(&st);
    return d ? d : 1;
}

// The examples of step s: order[*first .. *first + *count) of epoch s / steps_per_epoch.
static void step_examples(Trainer *tr, long s, int *first, int *count) {
    long epoch = s / tr->steps_per_epoch;
    if (epoch != tr->order_epoch) {
        epoch_order(tr->order, tr->train.n, tr->o.seed, epoch);
        tr->order_epoch = epoch;
    }
    long per_step = (long)tr->o.batch * tr->o.grad_accum;
    long start = (s % tr->steps_per_epoch) * per_step;
    long end = start + per_step < tr->train.n ? start + per_step : tr->train.n;
    *first = (int)start;
    *count = (int)(end - start);
}

// ---------------------------------------------------------------------------------------------
// One optimizer step, and the evaluation loss.

// Forward and backward over the examples of step tr->step, clipping, AdamW. The parameters are
// left untouched when the loss or the gradient is not finite.
static void train_step(Trainer *tr, StepStats *st) {
    double t = now_seconds();
    int first, count;
    step_examples(tr, tr->step, &first, &count);
    memset(st, 0, sizeof *st);
    for (int j = 0; j < count; j++) st->targets += tr->train.ex[tr->order[first + j]].n_targets;
    st->lr = lr_at(tr->o.schedule, (float)tr->o.lr, tr->step, tr->warmup, tr->total_steps);
    lora_zero_grad(&tr->lora);
    if (st->targets == 0) {  // nothing to learn in this step (examples cut before their answers)
        st->seconds = now_seconds() - t;
        return;
    }
    const Example *ex[PACK_SEQS];
    double nll = 0;
    for (int j = 0, pass = 0; j < count; j += PACK_SEQS) {
        int n = count - j < PACK_SEQS ? count - j : PACK_SEQS;
        for (int k = 0; k < n; k++) ex[k] = &tr->train.ex[tr->order[first + j + k]], st->tokens += ex[k]->T;
        nll += run_examples(&tr->model, &tr->lora, tr->acts, ex, n, (float)(1.0 / (double)st->targets), 1,
                            tr->o.dropout > 0 ? tr->o.seed : 0, tr->step, &pass);
    }
    st->loss = nll / (double)st->targets;
    st->grad_norm = grad_norm(tr->lora.grads, tr->lora.n_params);
    if (isfinite(st->loss) && isfinite(st->grad_norm)) {
        clip_grad_norm(tr->lora.grads, tr->lora.n_params, st->grad_norm, (float)tr->o.max_grad_norm);
        adamw_step(&tr->opt, tr->lora.params, tr->lora.grads, st->lr);
    }
    st->seconds = now_seconds() - t;
}

// Mean NLL per target token of the evaluation set, without dropout.
static double eval_loss(Trainer *tr) {
    const Example *ex[PACK_SEQS];
    double nll = 0;
    for (int i = 0; i < tr->eval.n; i += PACK_SEQS) {
        int n = tr->eval.n - i < PACK_SEQS ? tr->eval.n - i : PACK_SEQS;
        for (int k = 0; k < n; k++) ex[k] = &tr->eval.ex[i + k];
        int passes = 0;
        nll += run_examples(&tr->model, &tr->lora, tr->acts, ex, n, 0, 0, 0, 0, &passes);
    }
    return nll / (double)(tr->eval.n_targets > 0 ? tr->eval.n_targets : 1);
}

// ---------------------------------------------------------------------------------------------
// Progress on the terminal and train_log.jsonl.

static double train_elapsed(const Trainer *tr) {
    return tr->elapsed_before + (tr->steps_this_run ? now_seconds() - tr->t0 : 0);
}

static void format_duration(char *buf, size_t cap, double s) {
    long t = (long)(s + 0.5);
    if (t >= 3600) snprintf(buf, cap, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
    else snprintf(buf, cap, "%ld:%02ld", t / 60, t % 60);
}

// Ends the live progress line, if one is on screen, before other output.
static void end_progress_line(Trainer *tr) {
    if (tr->line_open) printf("\n");
    tr->line_open = 0;
}

// Tokens per second over the last TPS_WINDOW steps of this run, this step's included.
static double window_tps(Trainer *tr, const StepStats *st) {
    long done = tr->steps_this_run;  // this step included
    int k = (int)((done - 1) % TPS_WINDOW), n = done < TPS_WINDOW ? (int)done : TPS_WINDOW;
    tr->win_tokens[k] = st->tokens, tr->win_seconds[k] = st->seconds;
    long tokens = 0;
    double seconds = 0;
    for (int i = 0; i < n; i++) tokens += tr->win_tokens[i], seconds += tr->win_seconds[i];
    return seconds > 0 ? (double)tokens / seconds : 0;
}

static void print_progress(Trainer *tr, const StepStats *st) {
    double elapsed = train_elapsed(tr), this_run = now_seconds() - tr->t0;
    double eta = this_run / (double)tr->steps_this_run * (double)(tr->total_steps - tr->step);
    double tps = window_tps(tr, st);
    if (!tr->tty) {
        printf("step %ld/%ld loss %.6f lr %.6g grad_norm %.4g tokens %ld tok/s %.0f elapsed_s %.1f\n",
               tr->step, tr->total_steps, st->loss, st->lr, st->grad_norm, st->tokens, tps, elapsed);
        fflush(stdout);
        return;
    }
    char el[32], et[32];
    format_duration(el, sizeof el, elapsed);
    format_duration(et, sizeof et, eta);
    long epochs = (tr->total_steps + tr->steps_per_epoch - 1) / tr->steps_per_epoch;
    printf("\r\033[Kepoch %ld/%ld  step %ld/%ld  loss %.4f  lr %.3g  %.0f tok/s  elapsed %s  ETA %s",
           (tr->step - 1) / tr->steps_per_epoch + 1, epochs, tr->step, tr->total_steps, st->loss,
           st->lr, tps, el, et);
    fflush(stdout);
    tr->line_open = 1;
}

static void log_step(Trainer *tr, const StepStats *st) {
    fprintf(tr->log, "{\"step\": %ld, \"loss\": %.9g, \"lr\": %.9g, \"tokens\": %ld, \"elapsed_s\": %.3f, "
            "\"grad_norm\": %.9g, \"epoch\": %.4f, \"target_tokens\": %ld}\n",
            tr->step, st->loss, st->lr, st->tokens, train_elapsed(tr), st->grad_norm,
            (double)tr->step / (double)tr->steps_per_epoch, st->targets);
    fflush(tr->log);
    curve_add(&tr->train_curve, (double)tr->step, st->loss);
}

static void log_eval(Trainer *tr, double loss) {
    fprintf(tr->log, "{\"step\": %ld, \"eval_loss\": %.9g, \"eval_ppl\": %.9g, \"elapsed_s\": %.3f}\n",
            tr->step, loss, exp(loss), train_elapsed(tr));
    fflush(tr->log);
    curve_add(&tr->eval_curve, (double)tr->step, loss);
    end_progress_line(tr);
    printf("eval step %ld/%ld loss %.6f ppl %.4g\n", tr->step, tr->total_steps, loss, exp(loss));
    fflush(stdout);
}

// ---------------------------------------------------------------------------------------------
// loss.svg: the train and eval losses against the optimizer step, drawn by hand.

// A "nice" tick spacing (1, 2 or 5 times a power of ten) near range / 5.
static double nice_tick(double range) {
    double raw = range / 5, p = pow(10, floor(log10(raw))), f = raw / p;
    return (f < 1.5 ? 1 : f < 3.5 ? 2 : f < 7.5 ? 5 : 10) * p;
}

static void svg_polyline(FILE *f, const Curve *c, double x0, double sx, double y0, double sy,
                         double ymax, const char *color, int dots) {
    fprintf(f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2\" points=\"", color);
    for (size_t i = 0; i < c->n; i++) {
        double y = c->y[i] < ymax ? c->y[i] : ymax;
        fprintf(f, "%.1f,%.1f ", x0 + sx * c->x[i], y0 - sy * y);
    }
    fprintf(f, "\"/>\n");
    for (size_t i = 0; dots && i < c->n; i++) {
        double y = c->y[i] < ymax ? c->y[i] : ymax;
        fprintf(f, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3.5\" fill=\"%s\"/>\n", x0 + sx * c->x[i], y0 - sy * y, color);
    }
}

static void svg_axes(FILE *f, double xmax, double ymax, double x0, double y0, double w, double h) {
    double xt = nice_tick(xmax) < 1 ? 1 : nice_tick(xmax), yt = nice_tick(ymax);
    fprintf(f, "<g font-family=\"sans-serif\" font-size=\"12\" fill=\"#333\">\n");
    for (double v = 0; v <= ymax * (1 + 1e-9); v += yt) {
        double y = y0 - h * v / ymax;
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>\n", x0, y, x0 + w, y);
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%g</text>\n", x0 - 6, y + 4, v);
    }
    for (double v = 0; v <= xmax * (1 + 1e-9); v += xt) {
        double x = x0 + w * v / xmax;
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#333\"/>\n", x, y0, x, y0 + 5);
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%g</text>\n", x, y0 + 19, v);
    }
    fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#333\"/>\n", x0, y0, x0 + w, y0);
    fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#333\"/>\n", x0, y0, x0, y0 - h);
    fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">optimizer step</text>\n", x0 + w / 2, y0 + 40);
    fprintf(f, "<text transform=\"translate(%.1f,%.1f) rotate(-90)\" text-anchor=\"middle\">"
            "loss (mean NLL per target token)</text>\n", x0 - 48, y0 - h / 2);
    fprintf(f, "</g>\n");
}

static int write_loss_svg(const Trainer *tr, Err *e) {
    char path[1100];
    snprintf(path, sizeof path, "%s/loss.svg", tr->out);
    const Curve *tc = &tr->train_curve, *ec = &tr->eval_curve;
    double ymax = 0;
    for (size_t i = 0; i < tc->n; i++) if (isfinite(tc->y[i]) && tc->y[i] > ymax) ymax = tc->y[i];
    for (size_t i = 0; i < ec->n; i++) if (isfinite(ec->y[i]) && ec->y[i] > ymax) ymax = ec->y[i];
    ymax = ymax > 0 ? ceil(ymax / nice_tick(ymax) * (1 - 1e-9)) * nice_tick(ymax) : 1;
    double xmax = tr->total_steps > 0 ? (double)tr->total_steps : 1;
    const double W = 720, H = 440, x0 = 75, y0 = H - 60, w = W - x0 - 25, h = y0 - 45;
    AtomicFile af;
    if (atomic_open(&af, path, e) != 0) return -1;
    FILE *f = af.f;
    fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%g\" height=\"%g\" viewBox=\"0 0 %g %g\">\n", W, H, W, H);
    fprintf(f, "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n");
    fprintf(f, "<text x=\"%g\" y=\"24\" font-family=\"sans-serif\" font-size=\"15\" text-anchor=\"middle\">"
            "sft train: loss, step %ld of %ld</text>\n", W / 2, tr->step, tr->total_steps);
    svg_axes(f, xmax, ymax, x0, y0, w, h);
    svg_polyline(f, tc, x0, w / xmax, y0, h / ymax, ymax, "#1f77b4", tc->n < 2);
    svg_polyline(f, ec, x0, w / xmax, y0, h / ymax, ymax, "#ff7f0e", 1);
    fprintf(f, "<g font-family=\"sans-serif\" font-size=\"12\">\n"
            "<line x1=\"%g\" y1=\"40\" x2=\"%g\" y2=\"40\" stroke=\"#1f77b4\" stroke-width=\"2\"/>"
            "<text x=\"%g\" y=\"44\">train</text>\n", W - 150, W - 128, W - 122);
    if (ec->n) fprintf(f, "<line x1=\"%g\" y1=\"58\" x2=\"%g\" y2=\"58\" stroke=\"#ff7f0e\" stroke-width=\"2\"/>"
                       "<text x=\"%g\" y=\"62\">eval</text>\n", W - 150, W - 128, W - 122);
    fprintf(f, "</g>\n</svg>\n");
    return atomic_close(&af, e);
}

// ---------------------------------------------------------------------------------------------
// Checkpoints: OUT/checkpoint-STEP/ holds the adapter (lora_save), optimizer.bin (AdamW's
// moments), train_log.jsonl up to STEP and trainer_state.json (step, settings that must match,
// the data order). It is written as OUT/checkpoint-STEP.partial/ and renamed when complete.

// optimizer.bin, little-endian:
//   |"SFTADAMW" 8 bytes|u64 n|u64 t|f32 m[n]|f32 v[n]|u64 FNV-1a of everything before it|
static void put_u64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static uint64_t get_u64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}
static void put_f32s(unsigned char *p, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &x[i], 4);
        for (int b = 0; b < 4; b++) p[4 * i + (size_t)b] = (unsigned char)(u >> (8 * b));
    }
}
static void get_f32s(float *x, const unsigned char *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint32_t u = 0;
        for (int b = 0; b < 4; b++) u |= (uint32_t)p[4 * i + (size_t)b] << (8 * b);
        memcpy(&x[i], &u, 4);
    }
}

static int write_bytes_atomic(const char *path, const void *data, size_t n, Err *e) {
    AtomicFile af;
    if (atomic_open(&af, path, e) != 0) return -1;
    if (n && fwrite(data, 1, n, af.f) != n) {
        int saved = errno;
        atomic_abort(&af);
        return err_set(e, "%s: write failed: %s", path, strerror(saved));
    }
    return atomic_close(&af, e);
}

static int save_optimizer(const AdamW *opt, const char *path, Err *e) {
    size_t n = opt->n, bytes = 24 + 8 * n + 8;
    unsigned char *buf = xmalloc(bytes);
    memcpy(buf, "SFTADAMW", 8);
    put_u64(buf + 8, n);
    put_u64(buf + 16, (uint64_t)opt->t);
    put_f32s(buf + 24, opt->m, n);
    put_f32s(buf + 24 + 4 * n, opt->v, n);
    put_u64(buf + bytes - 8, fnv1a(FNV_START, buf, bytes - 8));
    int r = write_bytes_atomic(path, buf, bytes, e);
    free(buf);
    return r;
}

static int load_optimizer(AdamW *opt, const char *path, Err *e) {
    size_t len;
    unsigned char *buf = (unsigned char *)read_file(path, &len, e);
    if (!buf) return -1;
    int ok = len >= 32 && memcmp(buf, "SFTADAMW", 8) == 0 && get_u64(buf + 8) == opt->n &&
             len == 24 + 8 * opt->n + 8 && get_u64(buf + len - 8) == fnv1a(FNV_START, buf, len - 8);
    if (ok) {
        opt->t = (long)get_u64(buf + 16);
        get_f32s(opt->m, buf + 24, opt->n);
        get_f32s(opt->v, buf + 24 + 4 * opt->n, opt->n);
    }
    free(buf);
    return ok ? 0 : err_set(e, "%s: not an optimizer state for this adapter (%zu parameters), or damaged", path, opt->n);
}

// The settings a checkpoint must share with the run that resumes it, as (option, value) text.
typedef struct {
    const char *key;
    char value[160];
} Setting;
enum { N_SETTINGS = 20 };

static int train_settings(Setting *s, const Trainer *tr) {
    const TrainOptions *o = &tr->o;
    const Lora *lo = &tr->lora;
    int n = 0;
#define SET(k, ...) (s[n].key = (k), snprintf(s[n].value, sizeof s[n].value, __VA_ARGS__), n++)
    SET("model weights", "%016llx", (unsigned long long)tr->model_fp);
    SET("training data", "%016llx", (unsigned long long)tr->data_fp);
    SET("--rank", "%d", lo->R);
    SET("--alpha", "%.9g", (double)lo->alpha);
    SET("--dropout", "%.9g", o->dropout);
    SET("--targets", "%u", lo->targets);
    SET("--lr", "%.9g", o->lr);
    SET("--epochs", "%d", o->epochs);
    SET("--batch", "%d", o->batch);
    SET("--grad-accum", "%d", o->grad_accum);
    SET("--max-steps", "%ld", o->max_steps);
    SET("--schedule", "%s", schedule_name(o->schedule));
    SET("--warmup-steps", "%ld", tr->warmup);
    SET("--weight-decay", "%.9g", o->weight_decay);
    SET("--max-grad-norm", "%.9g", o->max_grad_norm);
    SET("--seed", "%llu", (unsigned long long)o->seed);
    SET("--loss-on", "%s", o->loss_on == LOSS_ON_ALL ? "all" : "assistant");
    SET("--max-len", "%d", o->max_len);
    SET("parameters", "%zu", lo->n_params);
#undef SET
    return n;
}

static int write_trainer_state(const Trainer *tr, const char *path, Err *e) {
    AtomicFile af;
    if (atomic_open(&af, path, e) != 0) return -1;
    FILE *f = af.f;
    Setting s[N_SETTINGS];
    int n = train_settings(s, tr);
    fprintf(f, "{\n  \"format\": \"sft-trainer-state-1\",\n  \"step\": %ld,\n  \"total_steps\": %ld,\n", tr->step, tr->total_steps);
    fprintf(f, "  \"elapsed_s\": %.3f,\n  \"model\": ", train_elapsed(tr));
    json_write_string(f, tr->o.model, strlen(tr->o.model));
    fprintf(f, ",\n  \"settings\": {");
    for (int i = 0; i < n; i++) {
        fprintf(f, "%s\n    ", i ? "," : "");
        json_write_string(f, s[i].key, strlen(s[i].key));
        fprintf(f, ": ");
        json_write_string(f, s[i].value, strlen(s[i].value));
    }
    // The data order of the epoch in progress and the seed it and the dropout masks come from.
    fprintf(f, "\n  },\n  \"rng_seed\": %llu,\n  \"epoch\": %ld,\n  \"data_order\": [",
            (unsigned long long)tr->o.seed, tr->order_epoch);
    for (int i = 0; i < tr->train.n; i++) fprintf(f, "%s%d", i ? ", " : "", tr->order_epoch >= 0 ? tr->order[i] : i);
    fprintf(f, "]\n}\n");
    return atomic_close(&af, e);
}

// Removes a directory of plain files (a checkpoint); quiet when it does not exist.
static void remove_flat_dir(const char *path) {
    DIR *d = opendir(path);
    if (!d) return;
    struct dirent *de;
    char p[1400];
    while ((de = readdir(d))) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0) continue;
        snprintf(p, sizeof p, "%s/%s", path, de->d_name);
        remove(p);
    }
    closedir(d);
    rmdir(path);
}

static void fsync_dir(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd >= 0) fsync(fd), close(fd);
}

static int copy_log(const Trainer *tr, const char *dest, Err *e) {
    char path[1100];
    snprintf(path, sizeof path, "%s/train_log.jsonl", tr->out);
    size_t len;
    char *text = read_file(path, &len, e);
    if (!text) return -1;
    int r = write_bytes_atomic(dest, text, len, e);
    free(text);
    return r;
}

static int fill_checkpoint(const Trainer *tr, const char *dir, Err *e) {
    char p[1200];
    if (lora_save(&tr->lora, dir, e) != 0) return -1;
    snprintf(p, sizeof p, "%s/optimizer.bin", dir);
    if (save_optimizer(&tr->opt, p, e) != 0) return -1;
    snprintf(p, sizeof p, "%s/train_log.jsonl", dir);
    if (copy_log(tr, p, e) != 0) return -1;
    snprintf(p, sizeof p, "%s/trainer_state.json", dir);
    return write_trainer_state(tr, p, e);  // last: its presence marks a complete checkpoint
}

// Writes OUT/checkpoint-STEP/ as a whole or not at all; an older one of the same step is
// replaced only once the new one is complete.
static int save_checkpoint(Trainer *tr, Err *e) {
    char dir[1100], tmp[1120], old[1120];
    snprintf(dir, sizeof dir, "%s/checkpoint-%ld", tr->out, tr->step);
    snprintf(tmp, sizeof tmp, "%s.partial", dir);
    snprintf(old, sizeof old, "%s.old", dir);
    remove_flat_dir(tmp);
    if (make_dirs(tmp, e) != 0 || fill_checkpoint(tr, tmp, e) != 0) {
        remove_flat_dir(tmp);
        return -1;
    }
    fsync_dir(tmp);
    remove_flat_dir(old);
    struct stat st;
    int had_old = stat(dir, &st) == 0;
    if ((had_old && rename(dir, old) != 0) || rename(tmp, dir) != 0) {
        err_set(e, "%s: cannot rename to %s: %s", tmp, dir, strerror(errno));
        remove_flat_dir(tmp);
        return -1;
    }
    remove_flat_dir(old);
    fsync_dir(tr->out);
    tr->last_checkpoint = tr->step;
    return 0;
}

// ---------------------------------------------------------------------------------------------
// Resuming: check the checkpoint's settings, then load its adapter, moments, step and log.

static int check_settings(const Trainer *tr, const Json *saved, const char *path, Err *e) {
    Setting s[N_SETTINGS];
    int n = train_settings(s, tr);
    for (int i = 0; i < n; i++) {
        const Json *v = json_get(saved, s[i].key);
        if (!v || v->type != JSON_STRING) return err_set(e, "%s: no setting '%s'", path, s[i].key);
        if (strcmp(v->str, s[i].value) == 0) continue;
        if (s[i].key[0] != '-')
            return err_set(e, "%s: the checkpoint was made with other %s (fingerprint %s, now %s): "
                           "resume with the same --model, --quant and --data", path, s[i].key, v->str, s[i].value);
        return err_set(e, "%s: the checkpoint was made with %s %s, this run has %s %s: resume with the "
                       "options of the run that wrote it", path, s[i].key, v->str, s[i].key, s[i].value);
    }
    return 0;
}

// Reads trainer_state.json: checks it, and returns the step in *step.
static int read_trainer_state(Trainer *tr, const char *dir, long *step, double *elapsed, Err *e) {
    char path[1100];
    snprintf(path, sizeof path, "%s/trainer_state.json", dir);
    size_t len;
    char *text = read_file(path, &len, e);
    if (!text) return err_set(e, "%s: not a checkpoint: %s", dir, strerror(errno));
    Json j;
    Err je;
    int r = json_parse(&j, text, len, &je);
    free(text);
    if (r != 0) return err_set(e, "%s: %s", path, je.msg);
    const Json *st = json_get(&j, "step"), *set = json_get(&j, "settings"), *el = json_get(&j, "elapsed_s");
    const Json *fmt = json_get(&j, "format");
    if (!fmt || fmt->type != JSON_STRING || strcmp(fmt->str, "sft-trainer-state-1") != 0 || !st ||
        st->type != JSON_NUMBER || !set || set->type != JSON_OBJECT)
        r = err_set(e, "%s: not an sft trainer state", path);
    else if (st->number < 1 || st->number > (double)tr->total_steps || st->number != floor(st->number))
        r = err_set(e, "%s: step %g is not within this run's %ld steps", path, st->number, tr->total_steps);
    else
        r = check_settings(tr, set, path, e);
    if (r == 0) *step = (long)st->number, *elapsed = el && el->type == JSON_NUMBER ? el->number : 0;
    json_free(&j);
    return r;
}

// Rebuilds the loss curves from a train_log.jsonl text.
static void curves_from_log(Trainer *tr, const char *text, size_t len) {
    const char *p = text, *end = text + len;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t n = nl ? (size_t)(nl - p) : (size_t)(end - p);
        Json j;
        Err e;
        if (n > 0 && json_parse(&j, p, n, &e) == 0) {
            const Json *s = json_get(&j, "step"), *l = json_get(&j, "loss"), *v = json_get(&j, "eval_loss");
            if (s && s->type == JSON_NUMBER && l && l->type == JSON_NUMBER) curve_add(&tr->train_curve, s->number, l->number);
            if (s && s->type == JSON_NUMBER && v && v->type == JSON_NUMBER) curve_add(&tr->eval_curve, s->number, v->number);
            json_free(&j);
        }
        p += n + 1;
    }
}

// Loads the adapter, the moments and the loss curves of checkpoint dir into tr (the adapter
// replaces the freshly initialized one); *log = its train_log.jsonl, to continue from.
static int resume_from(Trainer *tr, const char *dir, char **log, size_t *log_len, Err *e) {
    long step = 0;
    double elapsed = 0;
    if (read_trainer_state(tr, dir, &step, &elapsed, e) != 0) return -1;
    Lora saved;
    if (lora_load(&saved, dir, &tr->model.config, e) != 0) return -1;
    if (!lora_same_shape(&saved, &tr->lora)) {
        lora_free(&saved);
        return err_set(e, "%s: the adapter does not match the checkpoint's settings", dir);
    }
    memcpy(tr->lora.params, saved.params, saved.n_params * sizeof(float));
    lora_free(&saved);
    char path[1100];
    snprintf(path, sizeof path, "%s/optimizer.bin", dir);
    if (load_optimizer(&tr->opt, path, e) != 0) return -1;
    snprintf(path, sizeof path, "%s/train_log.jsonl", dir);
    *log = read_file(path, log_len, e);
    if (!*log) return -1;
    curves_from_log(tr, *log, *log_len);
    tr->step = step, tr->elapsed_before = elapsed, tr->last_checkpoint = step;
    return 0;
}

// ---------------------------------------------------------------------------------------------
// The loop.

static void die_at_step(Trainer *tr, const StepStats *st) {
    char last[1200];
    if (tr->last_checkpoint) snprintf(last, sizeof last, "the last good checkpoint is %s/checkpoint-%ld", tr->out, tr->last_checkpoint);
    else snprintf(last, sizeof last, "no checkpoint was saved (use --save-every N)");
    end_progress_line(tr);
    die("step %ld: the loss is %s (gradient norm %s): training stopped (try a lower --lr); %s", tr->step + 1,
        isnan(st->loss) ? "NaN" : isinf(st->loss) ? "infinite" : "finite",
        isnan(st->grad_norm) ? "NaN" : isinf(st->grad_norm) ? "infinite" : "finite", last);
}

// Adds to e what is left when a checkpoint could not be written (the disk is full, say).
static int checkpoint_failed(const Trainer *tr, Err *e) {
    char why[sizeof e->msg];
    snprintf(why, sizeof why, "%s", e->msg);
    if (tr->last_checkpoint)
        return err_set(e, "step %ld: cannot save a checkpoint: %s; the last good checkpoint is %s/checkpoint-%ld",
                       tr->step, why, tr->out, tr->last_checkpoint);
    return err_set(e, "step %ld: cannot save a checkpoint: %s", tr->step, why);
}

static int eval_due(const Trainer *tr) {
    if (!tr->has_eval) return 0;
    if (tr->step == tr->total_steps) return 1;
    if (tr->o.eval_every > 0) return tr->step % tr->o.eval_every == 0;
    return tr->step % tr->steps_per_epoch == 0;
}

// Runs the steps from tr->step to the end. Returns 0 when done, 1 when stopped by Ctrl-C (after
// saving a checkpoint), -1 on an error (e filled).
static int train_loop(Trainer *tr, Err *e) {
    while (tr->step < tr->total_steps) {
        if (tr->steps_this_run == 0) tr->t0 = now_seconds();
        StepStats st;
        train_step(tr, &st);
        if (!isfinite(st.loss) || !isfinite(st.grad_norm)) die_at_step(tr, &st);
        tr->step++, tr->steps_this_run++;
        log_step(tr, &st);
        print_progress(tr, &st);
        if (eval_due(tr)) log_eval(tr, eval_loss(tr));
        int save = (tr->o.save_every > 0 && tr->step % tr->o.save_every == 0) || train_interrupted ||
                   tr->step == tr->total_steps;
        if (save || now_seconds() - tr->last_svg > 2) {
            if (write_loss_svg(tr, e) != 0) return -1;
            tr->last_svg = now_seconds();
        }
        if (save && save_checkpoint(tr, e) != 0) return checkpoint_failed(tr, e);
        if (train_interrupted && tr->step < tr->total_steps) return 1;
    }
    end_progress_line(tr);
    return 0;
}

// ---------------------------------------------------------------------------------------------
// Setting up: the output directory, the model, the data, the adapter and the plan.

static int dir_is_empty(const char *path) {
    DIR *d = opendir(path);
    if (!d) return 1;
    struct dirent *de;
    int empty = 1;
    while (empty && (de = readdir(d))) empty = strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0;
    closedir(d);
    return empty;
}

// The parent directory of path ("a/b/checkpoint-4/" -> "a/b").
static void parent_dir(char *out, size_t cap, const char *path) {
    snprintf(out, cap, "%s", path);
    size_t n = strlen(out);
    while (n > 1 && out[n - 1] == '/') out[--n] = 0;
    char *slash = strrchr(out, '/');
    if (!slash) snprintf(out, cap, ".");
    else if (slash == out) out[1] = 0;
    else *slash = 0;
}

static int same_file(const char *a, const char *b) {
    struct stat sa, sb;
    return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

// Refuses an output directory that is not empty, unless --overwrite or it is the directory of
// the checkpoint we resume from. Writes nothing.
static int check_out_dir(Trainer *tr, Err *e) {
    const TrainOptions *o = &tr->o;
    char parent[1024] = "";
    if (o->resume) parent_dir(parent, sizeof parent, o->resume);
    snprintf(tr->out, sizeof tr->out, "%s", o->out ? o->out : parent);
    struct stat st;
    if (stat(tr->out, &st) == 0) {
        if (!S_ISDIR(st.st_mode)) return err_set(e, "--out %s: exists and is not a directory", tr->out);
        int own = o->resume && same_file(parent, tr->out);
        if (!dir_is_empty(tr->out) && !o->overwrite && !own)
            return err_set(e, "--out %s: the directory is not empty; pass --overwrite to write into it, or "
                           "choose another --out", tr->out);
    }
    return 0;
}

// Creates the output directory and OUT/train_log.jsonl, which starts as log[len] (a resumed
// checkpoint's log) or empty.
static int create_out_dir(Trainer *tr, const char *log, size_t len, Err *e) {
    if (make_dirs(tr->out, e) != 0) return -1;
    char path[1100];
    snprintf(path, sizeof path, "%s/train_log.jsonl", tr->out);
    tr->log = fopen(path, "wb");
    if (!tr->log) return err_set(e, "%s: cannot write: %s", path, strerror(errno));
    if ((len && fwrite(log, 1, len, tr->log) != len) || fflush(tr->log) != 0)
        return err_set(e, "%s: write failed: %s", path, strerror(errno));
    return 0;
}

static double model_param_count(const Config *c) {
    double C = c->C, q = (double)c->NH * c->HS, kv = (double)c->NKV * c->HS;
    double layer = C * q + q + 2 * (C * kv + kv) + q * C + 3 * C * c->FF + 2 * C;
    return (double)c->V * C * (c->tied ? 1 : 2) + c->L * layer + C;
}

static void targets_text(char *buf, size_t cap, unsigned targets) {
    buf[0] = 0;
    for (int t = 0; t < LORA_NTARGETS; t++)
        if (targets & (1u << t)) snprintf(buf + strlen(buf), cap - strlen(buf), "%s%s", buf[0] ? "," : "", lora_target_names[t]);
}

static void print_plan(const Trainer *tr) {
    const Config *c = &tr->model.config;
    const Lora *lo = &tr->lora;
    const TypeInfo *ti = type_info(tr->model.w.layers[0].wq.type);
    double all = model_param_count(c) + (double)lo->n_params;
    char tg[256];
    targets_text(tg, sizeof tg, lo->targets);
    fprintf(stderr, "model     %s: %d layers, hidden %d, vocabulary %d, weights %s\n", tr->o.model, c->L, c->C,
            c->V, ti ? ti->name : "?");
    fprintf(stderr, "kernels   %s, %d threads\n", kernel_path(), threads_count());
    fprintf(stderr, "adapter   rank %d, alpha %g, dropout %g, %s: %zu trainable parameters (%.4f%% of %.0f)\n",
            lo->R, (double)lo->alpha, (double)lo->dropout, tg, lo->n_params, 100.0 * (double)lo->n_params / all, all);
    fprintf(stderr, "data      %s: %d examples, %ld tokens, %ld target tokens (loss on %s)\n", tr->o.data,
            tr->train.n, tr->train.n_tokens, tr->train.n_targets, tr->o.loss_on == LOSS_ON_ALL ? "all tokens" : "assistant replies");
    if (tr->has_eval)
        fprintf(stderr, "eval      %s: %d examples, %ld target tokens\n", tr->o.eval_data, tr->eval.n, tr->eval.n_targets);
    fprintf(stderr, "plan      %ld optimizer steps (%ld per epoch) of %d x %d examples, lr %g %s, warmup %ld, "
            "AdamW weight decay %g, clip %g\n", tr->total_steps, tr->steps_per_epoch, tr->o.batch, tr->o.grad_accum,
            tr->o.lr, schedule_name(tr->o.schedule), tr->warmup, tr->o.weight_decay, tr->o.max_grad_norm);
    if (tr->train.n_truncated)
        fprintf(stderr, "warning: %d of %d examples were longer than --max-len %d tokens and were cut\n",
                tr->train.n_truncated, tr->train.n, tr->o.max_len);
    if (tr->total_steps < 20)
        fprintf(stderr, "warning: only %ld optimizer steps: too few to learn much. Each step averages %d examples "
                "(--batch x --grad-accum) into one update; the article's run (10 examples, batch 1, accumulation 4, "
                "2 epochs) made only ~5. Raise --epochs or --max-steps, or lower --grad-accum.\n",
                tr->total_steps, tr->o.batch * tr->o.grad_accum);
}

static void load_data(Dataset *d, const char *path, const Trainer *tr) {
    Err e;
    if (data_load(d, path, &tr->model.tok, tr->o.loss_on, tr->o.max_len, &e) != 0) die("%s", e.msg);
}

// base_model_name_or_path for an adapter of the model at path: the Hugging Face id the model
// names for itself (modelfile.h: model_peek), else the path as given.
static char *base_model_name(const char *path) {
    Config c;
    char *id = NULL;
    Err e;
    if (model_peek(path, &c, &id, &e) != 0 || !id) return xstrdup(path);
    return id;
}

// The adapter: from --init-lora (its rank, alpha and targets; dropout from --dropout) or fresh.
static void make_adapter(Trainer *tr) {
    Err e;
    const TrainOptions *o = &tr->o;
    if (o->init_lora) {
        if (lora_load(&tr->lora, o->init_lora, &tr->model.config, &e) != 0) die("%s", e.msg);
        tr->lora.dropout = (float)o->dropout;
    } else {
        unsigned targets;
        if (lora_parse_targets(&targets, o->targets, &e) != 0) die("--targets: %s", e.msg);
        lora_init(&tr->lora, &tr->model.config, o->rank, (float)o->alpha, (float)o->dropout, targets, o->seed);
    }
    free(tr->lora.base_model);
    tr->lora.base_model = base_model_name(o->model);
}

static void make_plan(Trainer *tr) {
    const TrainOptions *o = &tr->o;
    long per_step = (long)o->batch * o->grad_accum;
    tr->steps_per_epoch = (tr->train.n + per_step - 1) / per_step;
    tr->total_steps = o->max_steps > 0 ? o->max_steps : tr->steps_per_epoch * o->epochs;
    tr->warmup = o->warmup_steps >= 0 ? o->warmup_steps : warmup_from_ratio(o->warmup_ratio, tr->total_steps);
}

static void trainer_free(Trainer *tr) {
    if (tr->log) fclose(tr->log);
    activations_free(tr->acts);
    adamw_free(&tr->opt);
    lora_free(&tr->lora);
    data_free(&tr->train);
    if (tr->has_eval) data_free(&tr->eval);
    model_free(&tr->model);
    free(tr->order);
    free(tr->train_curve.x), free(tr->train_curve.y), free(tr->eval_curve.x), free(tr->eval_curve.y);
}

// Loads and checks everything (model, data, adapter, checkpoint) before writing anything, so
// that bad input leaves --out untouched; then creates --out.
static void trainer_setup(Trainer *tr) {
    Err e;
    if (check_out_dir(tr, &e) != 0) die("%s", e.msg);
    threads_init(tr->o.threads);
    if (model_load(&tr->model, tr->o.model, tr->o.quant, &e) != 0) die("%s", e.msg);
    load_data(&tr->train, tr->o.data, tr);
    if (tr->o.eval_data) load_data(&tr->eval, tr->o.eval_data, tr), tr->has_eval = 1;
    if (tr->o.show_example >= 0) {
        if (tr->o.show_example >= tr->train.n) die("--show-example %d: the data has %d examples", tr->o.show_example, tr->train.n);
        data_print_example(stderr, &tr->train, tr->o.show_example, &tr->model.tok);
    }
    make_adapter(tr);
    make_plan(tr);
    adamw_init(&tr->opt, tr->lora.n_params, 0.9, 0.999, 1e-8, tr->o.weight_decay);
    tr->order = xmalloc((size_t)tr->train.n * sizeof(int));
    tr->model_fp = model_fingerprint(&tr->model);
    tr->data_fp = data_fingerprint(&tr->train);
    char *log = NULL;
    size_t log_len = 0;
    if (tr->o.resume && resume_from(tr, tr->o.resume, &log, &log_len, &e) != 0) die("%s", e.msg);
    if (create_out_dir(tr, log, log_len, &e) != 0) die("%s", e.msg);
    free(log);
    int max_T = pack_tokens(&tr->train, tr->o.batch * tr->o.grad_accum);
    if (tr->has_eval && pack_tokens(&tr->eval, PACK_SEQS) > max_T) max_T = pack_tokens(&tr->eval, PACK_SEQS);
    tr->acts = activations_new(&tr->model.config, &tr->lora, max_T);
}

static int cmd_train(int argc, char **argv) {
    Trainer *tr = xcalloc(1, sizeof *tr);
    tr->o = train_parse_options(argc, argv);
    tr->tty = isatty(fileno(stdout));
    tr->order_epoch = -1;
    trainer_setup(tr);
    print_plan(tr);
    if (tr->o.resume) fprintf(stderr, "resuming from %s at step %ld\n", tr->o.resume, tr->step);

    Err e;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = train_on_sigint;
    sigaction(SIGINT, &sa, NULL);
    int r = train_loop(tr, &e);
    end_progress_line(tr);
    if (r < 0) die("%s", e.msg);
    if (r == 1) {
        fprintf(stderr, "interrupted: checkpoint saved in %s/checkpoint-%ld; continue with --resume %s/checkpoint-%ld\n",
                tr->out, tr->step, tr->out, tr->step);
        trainer_free(tr);
        free(tr);
        return 130;
    }
    if (lora_save(&tr->lora, tr->out, &e) != 0) die("%s", e.msg);
    fprintf(stderr, "done: %ld steps in %.1f s; adapter saved in %s\n", tr->step, train_elapsed(tr), tr->out);
    trainer_free(tr);
    free(tr);
    return 0;
}


// =============================================================================================
// sft generate and sft chat: sampling (Hugging Face's order: repetition penalty, temperature,
// top-k, top-p), the KV cache kept across the turns of a chat, streaming decode.

typedef struct {
    float temperature;         // 0: greedy
    int top_k;                 // 0: off
    float top_p;               // 1: off
    float repetition_penalty;  // 1: off
    int max_new;
    uint64_t rng;
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

static void generator_init(Generator *g, Model *m, const Lora *lora, int max_T, Sampling s) {
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

// Makes room for `need` tokens in the cache (forgetting what it holds when it must grow).
static void generator_reserve(Generator *g, int need) {
    if (need <= g->max_T) return;
    kvcache_free(g->kv);
    g->kv = kvcache_new(&g->model->config, need);
    g->ctx = realloc(g->ctx, (size_t)need * sizeof(int));
    if (!g->ctx) die("out of memory");
    g->max_T = need, g->n_ctx = 0;
}

static void generator_free(Generator *g) {
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

// Appends bytes to a growable string.
typedef struct {
    char *s;
    size_t n, cap;
} Text;

static void text_add(Text *t, const char *s, size_t n) {
    if (t->n + n + 1 > t->cap) {
        t->cap = (t->n + n + 1) * 2;
        t->s = realloc(t->s, t->cap);
        if (!t->s) die("out of memory");
    }
    memcpy(t->s + t->n, s, n);
    t->n += n;
    t->s[t->n] = 0;
}

// Generates the answer to prompt[n] (a rendered chat ending in "<|im_start|>assistant\n"),
// streaming it to `stream` (when not NULL) and collecting it into *answer.
static int generate_answer(Generator *g, const int *prompt, int n, FILE *stream, Text *answer, Err *e) {
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

static int *encode_or_die(const Tokenizer *tok, const char *text, int *n) {
    int *ids;
    Err e;
    *n = tokenizer_encode(tok, text, strlen(text), &ids, &e);
    if (*n < 0) die("%s", e.msg);
    return ids;
}

// Options shared by generate and chat.
typedef struct {
    const char *model, *lora, *system, *prompt, *data;
    int quant, threads, max_new, ctx;
    double temp, top_p, repeat_penalty;   // < 0: not given
    long top_k;                           // < 0: not given
    uint64_t seed;
} GenOptions;

static const char *gen_help_options =
    "  --model PATH         GGUF file or Hugging Face model directory (required)\n"
    "  --lora PATH          an adapter to apply: a PEFT directory or a llama.cpp GGUF adapter\n"
    "  --system TEXT        the system message (default: Qwen2.5's)\n"
    "  --max-new N          256 (new tokens at most)\n"
    "  --temp T             from generation_config.json, else 0.7; 0 = greedy (argmax)\n"
    "  --top-k K            from generation_config.json, else 20 (0: off)\n"
    "  --top-p P            from generation_config.json, else 0.8 (1: off)\n"
    "  --repeat-penalty R   from generation_config.json, else 1.1 (1: off; with --temp 0: 1 unless given)\n"
    "  --seed S             42 (sampling)\n"
    "  --quant TYPE         frozen weights in memory: q4_0 (default for safetensors), nf4, q8_0, bf16, f32\n"
    "  --threads N          0 (0: all cores)\n";

static GenOptions gen_parse_options(int argc, char **argv, const char *help, int is_chat) {
    GenOptions o = {0};
    o.quant = -1, o.max_new = 256, o.ctx = 4096, o.seed = 42;
    o.temp = o.top_p = o.repeat_penalty = -1, o.top_k = -1;
    for (int i = 1; i < argc; i++) {
        const char *v;
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            fputs(help, stdout), fputs(gen_help_options, stdout);
            exit(0);
        } else if ((v = opt_value(argc, argv, &i, "--model"))) o.model = v;
        else if ((v = opt_value(argc, argv, &i, "--lora"))) o.lora = v;
        else if ((v = opt_value(argc, argv, &i, "--system"))) o.system = v;
        else if (!is_chat && (v = opt_value(argc, argv, &i, "--prompt"))) o.prompt = v;
        else if (!is_chat && (v = opt_value(argc, argv, &i, "--data"))) o.data = v;
        else if (is_chat && (v = opt_value(argc, argv, &i, "--context"))) o.ctx = (int)parse_long(v, "--context", 16, 1 << 20);
        else if ((v = opt_value(argc, argv, &i, "--max-new"))) o.max_new = (int)parse_long(v, "--max-new", 0, 1 << 20);
        else if ((v = opt_value(argc, argv, &i, "--temp"))) o.temp = parse_double(v, "--temp", 0, 100);
        else if ((v = opt_value(argc, argv, &i, "--top-k"))) o.top_k = parse_long(v, "--top-k", 0, INT_MAX);
        else if ((v = opt_value(argc, argv, &i, "--top-p"))) o.top_p = parse_double(v, "--top-p", 1e-6, 1);
        else if ((v = opt_value(argc, argv, &i, "--repeat-penalty"))) o.repeat_penalty = parse_double(v, "--repeat-penalty", 1e-3, 100);
        else if ((v = opt_value(argc, argv, &i, "--seed"))) o.seed = (uint64_t)parse_long(v, "--seed", 0, LONG_MAX);
        else if ((v = opt_value(argc, argv, &i, "--threads"))) o.threads = (int)parse_long(v, "--threads", 0, 4096);
        else if ((v = opt_value(argc, argv, &i, "--quant"))) {
            o.quant = type_from_name(v);
            if (o.quant < 0) die("--quant: unknown type '%s' (q4_0, nf4, q8_0, bf16, f32)", v);
        } else die("%s: unknown option '%s' (sft %s --help lists them)", argv[0], argv[i], argv[0]);
    }
    if (!o.model) die("%s: --model is required (sft %s --help)", argv[0], argv[0]);
    return o;
}

// The sampling settings: the options given, else the model's generation_config.json, else
// Qwen2.5-Instruct's defaults.
static Sampling sampling_of(const GenOptions *o, const Model *m) {
    GenDefaults d = m->gen;
    if (!(d.temperature > 0) && !(d.top_p > 0) && d.top_k == 0 && !(d.repetition_penalty > 0))
        d.temperature = 0.7f, d.top_p = 0.8f, d.top_k = 20, d.repetition_penalty = 1.1f;
    Sampling s;
    s.temperature = o->temp >= 0 ? (float)o->temp : d.temperature;
    s.top_k = o->top_k >= 0 ? (int)o->top_k : d.top_k;
    s.top_p = o->top_p > 0 ? (float)o->top_p : d.top_p > 0 ? d.top_p : 1.0f;
    s.repetition_penalty = o->repeat_penalty > 0 ? (float)o->repeat_penalty
                           : s.temperature <= 0 ? 1.0f : d.repetition_penalty > 0 ? d.repetition_penalty : 1.0f;
    s.max_new = o->max_new;
    s.rng = o->seed;
    return s;
}

// Loads the model and the adapter of --lora.
static void gen_load(Model *m, Lora *lora, const GenOptions *o) {
    Err e;
    threads_init(o->threads);
    if (model_load(m, o->model, o->quant, &e) != 0) die("%s", e.msg);
    if (o->lora && lora_load(lora, o->lora, &m->config, &e) != 0) die("%s", e.msg);
}

// Renders msgs[n] (+ the --system message in front when they have none) with the chat template
// and the generation prompt, and tokenizes it.
static int *render_prompt(const Model *m, const char *system, const Message *msgs, int n, int *n_ids) {
    Message *all = xmalloc((size_t)(n + 1) * sizeof(Message));
    int k = 0;
    if (system && !(n > 0 && strcmp(msgs[0].role, "system") == 0))
        all[k].role = (char *)"system", all[k++].content = (char *)system;
    memcpy(all + k, msgs, (size_t)n * sizeof(Message));
    char *text = chat_render(all, n + k, 1);
    int *ids = encode_or_die(&m->tok, text, n_ids);
    free(text);
    free(all);
    return ids;
}

// --data: one {"prompt", "response"} line per conversation, answering its last user turn.
static void generate_file(Generator *g, const GenOptions *o) {
    Conversation *convs;
    int n;
    Err e;
    if (data_load_conversations(&convs, &n, o->data, &e) != 0) die("%s", e.msg);
    Text answer = {0};
    for (int c = 0; c < n; c++) {
        int u = conversation_last_user(&convs[c]);
        if (u < 0) die("%s:%d: no user message to answer", o->data, convs[c].line);
        int n_ids;
        int *ids = render_prompt(g->model, o->system, convs[c].msgs, u + 1, &n_ids);
        generator_reserve(g, n_ids + g->s.max_new + 1);
        g->s.rng = o->seed;  // each example samples as if it were alone
        if (generate_answer(g, ids, n_ids, NULL, &answer, &e) != 0) die("%s:%d: %s", o->data, convs[c].line, e.msg);
        free(ids);
        const char *p = convs[c].msgs[u].content;
        printf("{\"prompt\": ");
        json_write_string(stdout, p, strlen(p));
        printf(", \"response\": ");
        json_write_string(stdout, answer.s, answer.n);
        printf("}\n");
        fflush(stdout);
    }
    free(answer.s);
    conversations_free(convs, n);
}

static int cmd_generate(int argc, char **argv) {
    GenOptions o = gen_parse_options(argc, argv,
        "usage: sft generate --model PATH (--prompt TEXT | --data FILE.jsonl) [options]\n\n"
        "The answer to one prompt (a one-turn chat), streamed to stdout; with --data, one JSONL line\n"
        "{\"prompt\", \"response\"} per example, answering its last user turn. Stops at <|im_end|>.\n\n"
        "  --prompt TEXT        the user message\n"
        "  --data FILE          JSONL conversations (messages or prompt/completion)\n", 0);
    if (!o.prompt == !o.data) die("generate: give one of --prompt TEXT or --data FILE.jsonl");
    Model m;
    Lora lora;
    gen_load(&m, &lora, &o);
    Generator g;
    int max_T = m.config.max_seq > 0 ? m.config.max_seq : 32768;
    if (o.prompt) {
        Message msg = {(char *)"user", (char *)o.prompt};
        int n_ids;
        int *ids = render_prompt(&m, o.system, &msg, 1, &n_ids);
        if (n_ids + o.max_new + 1 < max_T) max_T = n_ids + o.max_new + 1;
        generator_init(&g, &m, o.lora ? &lora : NULL, max_T, sampling_of(&o, &m));
        Text answer = {0};
        Err e;
        if (generate_answer(&g, ids, n_ids, stdout, &answer, &e) != 0) die("%s", e.msg);
        printf("\n");
        free(answer.s);
        free(ids);
    } else {
        if (o.max_new + 512 < max_T) max_T = o.max_new + 512;  // grows when a prompt needs it
        generator_init(&g, &m, o.lora ? &lora : NULL, max_T, sampling_of(&o, &m));
        generate_file(&g, &o);
    }
    generator_free(&g);
    if (o.lora) lora_free(&lora);
    model_free(&m);
    return 0;
}

// One chat line from stdin without its line end; NULL at the end of input.
static char *read_line(char **buf, size_t *cap) {
    ssize_t n = getline(buf, cap, stdin);
    if (n < 0) return NULL;
    while (n > 0 && ((*buf)[n - 1] == '\n' || (*buf)[n - 1] == '\r')) (*buf)[--n] = 0;
    return *buf;
}

typedef struct {
    Message *msgs;
    int n, cap;
} History;

static void history_add(History *h, const char *role, const char *content) {
    if (h->n == h->cap) {
        h->cap = h->cap ? 2 * h->cap : 16;
        h->msgs = realloc(h->msgs, (size_t)h->cap * sizeof(Message));
        if (!h->msgs) die("out of memory");
    }
    h->msgs[h->n].role = xstrdup(role);
    h->msgs[h->n].content = xstrdup(content);
    h->n++;
}

static void history_clear(History *h) {
    for (int i = 0; i < h->n; i++) free(h->msgs[i].role), free(h->msgs[i].content);
    h->n = 0;
}

// One turn: the user's line in, the streamed answer out; both join the history.
static void chat_turn(Generator *g, History *h, const char *line) {
    history_add(h, "user", line);
    int n_ids;
    int *ids = render_prompt(g->model, NULL, h->msgs, h->n, &n_ids);
    Text answer = {0};
    Err e;
    if (generate_answer(g, ids, n_ids, stdout, &answer, &e) != 0) {
        fprintf(stderr, "sft: %s; /reset starts a new conversation\n", e.msg);
        h->n--;  // forget the unanswered message
        free(h->msgs[h->n].role);
        free(h->msgs[h->n].content);
    } else {
        printf("\n");
        fflush(stdout);
        history_add(h, "assistant", answer.s);
    }
    free(answer.s);
    free(ids);
}

static int cmd_chat(int argc, char **argv) {
    GenOptions o = gen_parse_options(argc, argv,
        "usage: sft chat --model PATH [options]\n\n"
        "A conversation in the terminal: each line read from stdin is a user message; the answer is\n"
        "streamed to stdout. /reset forgets the history, /exit or Ctrl-D (end of input) quits.\n"
        "Works through a pipe: `printf 'hi\\n' | sft chat --model M`.\n\n"
        "  --context N          4096 (tokens of history the chat can hold)\n", 1);
    Model m;
    Lora lora;
    gen_load(&m, &lora, &o);
    int max_T = m.config.max_seq > 0 && m.config.max_seq < o.ctx ? m.config.max_seq : o.ctx;
    Generator g;
    generator_init(&g, &m, o.lora ? &lora : NULL, max_T, sampling_of(&o, &m));
    int interactive = isatty(fileno(stdin));
    if (interactive) fprintf(stderr, "chat with %s%s%s (/reset clears the history, /exit or Ctrl-D quits)\n",
                             o.model, o.lora ? " + " : "", o.lora ? o.lora : "");
    History h = {0};
    if (o.system) history_add(&h, "system", o.system);
    char *buf = NULL;
    size_t cap = 0;
    for (;;) {
        if (interactive) fprintf(stderr, "> ");
        const char *line = read_line(&buf, &cap);
        if (!line) break;
        if (strcmp(line, "/exit") == 0 || strcmp(line, "/quit") == 0) break;
        if (strcmp(line, "/reset") == 0) {
            history_clear(&h);
            if (o.system) history_add(&h, "system", o.system);
            fprintf(stderr, "(history cleared)\n");
            continue;
        }
        if (line[0] == 0) continue;
        chat_turn(&g, &h, line);
    }
    if (interactive) fprintf(stderr, "\n");
    free(buf);
    history_clear(&h);
    free(h.msgs);
    generator_free(&g);
    if (o.lora) lora_free(&lora);
    model_free(&m);
    return 0;
}


// ---------------------------------------------------------------------------------------------

static const char *usage =
    "sft: LoRA fine-tuning of Qwen2.5 on a CPU\n"
    "\n"
    "usage: sft COMMAND [options]      (sft COMMAND --help lists the options)\n"
    "  train      LoRA fine-tuning on a JSONL data set\n"
    "  generate   one answer to a prompt (or to every prompt of a JSONL file)\n"
    "  chat       interactive chat in the terminal\n"
    "  eval       mean loss and perplexity on a JSONL data set\n"
    "  grads      loss and LoRA gradients, written to a safetensors file\n"
    "  tokenize   text to token ids, or --decode ids to text\n"
    "  quantize   convert a model to a GGUF file of another type\n"
    "  info       what a model file holds\n"
    "  export     an adapter as a llama.cpp LoRA adapter (GGUF)\n"
    "  merge      a model with an adapter merged in, as GGUF or a Hugging Face directory\n"
    "  init       a randomly initialized model (tests, benchmarks, the demo)\n";

int main(int argc, char **argv) {
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        fputs(usage, argc < 2 ? stderr : stdout);
        return argc < 2 ? 1 : 0;
    }
    const char *cmd = argv[1];
    argc -= 1;
    argv += 1;  // argv[0] is now the command name; options start at argv[1]
    if (strcmp(cmd, "train") == 0) return cmd_train(argc, argv);
    if (strcmp(cmd, "generate") == 0) return cmd_generate(argc, argv);
    if (strcmp(cmd, "chat") == 0) return cmd_chat(argc, argv);
    if (strcmp(cmd, "eval") == 0) return cmd_eval(argc, argv);
    if (strcmp(cmd, "grads") == 0) return cmd_grads(argc, argv);
    if (strcmp(cmd, "tokenize") == 0) return cmd_tokenize(argc, argv);
    if (strcmp(cmd, "quantize") == 0) return cmd_quantize(argc, argv);
    if (strcmp(cmd, "info") == 0) return cmd_info(argc, argv);
    if (strcmp(cmd, "init") == 0) return cmd_init(argc, argv);
    if (strcmp(cmd, "export") == 0) return cmd_export(argc, argv);
    if (strcmp(cmd, "merge") == 0) return cmd_merge(argc, argv);
    fprintf(stderr, "sft: unknown command '%s'\n\n%s", cmd, usage);
    return 1;
}
