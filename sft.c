// sft.c: the command line. main() reads the command name and hands the arguments to one
// cmd_* function; each parses its options, loads what it needs, runs, and decides the exit status.
// Only this file prints an error and exits; the rest return -1 with an Err (common.h).
//
// The path of one training step: main -> cmd_train -> train_loop (train.c) -> train_step ->
// run_examples -> model_forward_backward_batch (model.c) -> block_forward -> matmul (quant.c).
// Leaves out: training (train.c), generation and chat (generate.c), the model, the data and the
// file formats (model.c, data.c, lora.c, modelfile.c). Read main (at the end), then cmd_train.
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"
#include "data.h"
#include "generate.h"
#include "lora.h"
#include "model.h"
#include "modelfile.h"
#include "optim.h"
#include "quant.h"
#include "threads.h"
#include "tokenizer.h"
#include "train.h"

// ---------------------------------------------------------------------------------------------
// Options: every command reads `--name value` pairs (and bare flags) with these helpers.

// Prints "sft: message" on stderr and exits with status 1.
static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
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
    if (model_peek(model, &c, &e) != 0 || lora_load(&lora, lora_path, &c, &e) != 0) die("%s", e.msg);
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

static int cmd_eval(int argc, char **argv) {
    EvalOptions o = eval_parse_options(argc, argv, "eval", eval_help);
    Model m;
    Lora lora;
    Dataset ds;
    threads_init(o.threads);
    eval_load(&m, &lora, &ds, &o);
    double t0 = now_seconds(), loss;
    Err e;
    if (dataset_loss(&loss, &m, o.lora ? &lora : NULL, &ds, 0, o.data, &e) != 0) die("%s", e.msg);
    fprintf(stderr, "sft: %d examples, %ld tokens, %ld targets in %.2f s\n", ds.n, ds.n_tokens, ds.n_targets,
            now_seconds() - t0);
    if (o.logits && write_logits(&m, o.lora ? &lora : NULL, &ds, o.data, o.logits, &e) != 0) die("%s", e.msg);
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
    double loss;
    Err e;
    if (dataset_loss(&loss, &m, &lora, &ds, 1, o.data, &e) != 0) die("%s", e.msg);
    if (lora_save_grads(&lora, o.out, &e) != 0) die("%s", e.msg);
    printf("loss %.9g\n", loss);
    data_free(&ds);
    lora_free(&lora);
    model_free(&m);
    threads_free();
    return 0;
}

// ---------------------------------------------------------------------------------------------
// sft train: the options; train.c runs the training.

// The one mutable global of sft: a signal handler can reach nothing else. It holds the number
// of the signal that asked sft train to stop (SIGINT, SIGTERM or SIGHUP); the training loop
// (train.c) drops the step in progress, saves a checkpoint and returns; cmd_train then exits
// with status 128 + that number (130, 143, 129).
static volatile sig_atomic_t train_interrupted = 0;
static void train_on_signal(int sig) {
    train_interrupted = sig;
    signal(SIGINT, SIG_DFL), signal(SIGTERM, SIG_DFL), signal(SIGHUP, SIG_DFL);  // a second one stops at once
}

// Ctrl-C, SIGTERM (timeout, docker stop, systemd, batch schedulers) and SIGHUP (a dropped SSH
// session) stop training with a checkpoint; SIGPIPE is ignored, so that a dead `| tee` cannot
// end the run (writes to it fail quietly).
static void train_catch_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = train_on_signal;
    sa.sa_flags = SA_RESTART;  // a write that the signal interrupts goes on; the loop sees the flag
    sigaction(SIGINT, &sa, NULL), sigaction(SIGTERM, &sa, NULL), sigaction(SIGHUP, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}

static const char *signal_name(int sig) {
    return sig == SIGINT ? "SIGINT (Ctrl-C)" : sig == SIGTERM ? "SIGTERM" : sig == SIGHUP ? "SIGHUP" : "a signal";
}

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
    "  --save-every N       0 (a checkpoint every N steps and at the end; 0: only on Ctrl-C, SIGTERM, SIGHUP)\n"
    "  --resume DIR         continue from DIR = OUT/checkpoint-STEP exactly as if never stopped\n"
    "  --overwrite          write into a non-empty --out\n"
    "  --threads N          0 (0: all cores); the results do not depend on it\n"
    "  --trace              run one step and print on stderr each kernel as it runs: its shapes and\n"
    "                       time, in order (the path of docs/TUTORIAL.md, seen live)\n"
    "\n"
    "Exit status: 0 done; 1 error (one line on stderr); 130, 143 or 129 stopped by SIGINT (Ctrl-C),\n"
    "SIGTERM or SIGHUP: the step in progress is dropped and the last one done saved as a checkpoint\n"
    "(a second signal stops at once).\n";

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
        else if (strcmp(argv[i], "--trace") == 0) o.trace = 1, o.max_steps = 1;
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

static int cmd_train(int argc, char **argv) {
    TrainOptions o = train_parse_options(argc, argv);
    Trainer *tr = xmalloc(sizeof *tr);
    Err e;
    if (trainer_setup(tr, &o, &train_interrupted, &e) != 0) die("%s", e.msg);
    print_plan(tr);
    if (tr->o.resume) fprintf(stderr, "resuming from %s at step %ld\n", tr->o.resume, tr->step);

    train_catch_signals();
    int r = train_loop(tr, &e);
    end_progress_line(tr);
    if (r < 0) die("%s", e.msg);
    if (r == 1) {
        int sig = train_interrupted;
        fprintf(stderr, "interrupted by %s: checkpoint saved in %s/checkpoint-%ld; continue with --resume %s/checkpoint-%ld\n",
                signal_name(sig), tr->out, tr->step, tr->out, tr->step);
        trainer_free(tr);
        free(tr);
        return 128 + sig;
    }
    if (lora_save(&tr->lora, tr->out, &e) != 0) die("%s", e.msg);
    fprintf(stderr, "done: %ld steps in %.1f s; adapter saved in %s\n", tr->step, train_elapsed(tr), tr->out);
    trainer_free(tr);
    free(tr);
    return 0;
}

// ---------------------------------------------------------------------------------------------
// sft generate, sft chat: the options and the terminal; generate.c makes the answers.

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
    model_hugepages(m);
    if (o->lora && lora_load(lora, o->lora, &m->config, &e) != 0) die("%s", e.msg);
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
        Err e;
        int *ids = render_prompt(&m, o.system, &msg, 1, &n_ids, &e);
        if (!ids) die("%s", e.msg);
        if (n_ids + o.max_new + 1 < max_T) max_T = n_ids + o.max_new + 1;
        generator_init(&g, &m, o.lora ? &lora : NULL, max_T, sampling_of(&o, &m));
        Text answer = {0};
        if (generate_answer(&g, ids, n_ids, stdout, &answer, &e) != 0) die("%s", e.msg);
        printf("\n");
        free(answer.s);
        free(ids);
    } else {
        if (o.max_new + 512 < max_T) max_T = o.max_new + 512;  // grows when a prompt needs it
        generator_init(&g, &m, o.lora ? &lora : NULL, max_T, sampling_of(&o, &m));
        Err e;
        if (generate_file(&g, o.data, o.system, o.seed, stdout, &e) != 0) die("%s", e.msg);
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

// One turn: the user's line in, the streamed answer out; both join the history.
static void chat_turn(Generator *g, History *h, const char *line) {
    history_add(h, "user", line);
    int n_ids;
    Err e;
    int *ids = render_prompt(g->model, NULL, h->msgs, h->n, &n_ids, &e);
    if (!ids) die("%s", e.msg);
    Text answer = {0};
    if (generate_answer(g, ids, n_ids, stdout, &answer, &e) != 0) {
        fprintf(stderr, "sft: %s; /reset starts a new conversation\n", e.msg);
        history_drop_last(h);  // forget the unanswered message
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
    history_free(&h);
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
