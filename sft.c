// sft.c: the command line. main() reads the command name and hands the arguments to one
// cmd_* function; each parses its options, loads what it needs, runs, and decides the exit status.
//
// The path of one training step: main -> cmd_train -> train_step (below) -> model_forward
// (model.c) -> block_forward -> matmul (quant.c) -> the dot product of one row.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "json.h"
#include "lora.h"
#include "model.h"
#include "quant.h"
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

static int cmd_info(int argc, char **argv) { (void)argc; (void)argv; die("info: not implemented yet"); }
static int cmd_quantize(int argc, char **argv) { (void)argc; (void)argv; die("quantize: not implemented yet"); }
static int cmd_init(int argc, char **argv) { (void)argc; (void)argv; die("init: not implemented yet"); }
static int cmd_tokenize(int argc, char **argv) { (void)argc; (void)argv; die("tokenize: not implemented yet"); }
static int cmd_eval(int argc, char **argv) { (void)argc; (void)argv; die("eval: not implemented yet"); }
static int cmd_grads(int argc, char **argv) { (void)argc; (void)argv; die("grads: not implemented yet"); }
static int cmd_train(int argc, char **argv) { (void)argc; (void)argv; die("train: not implemented yet"); }
static int cmd_generate(int argc, char **argv) { (void)argc; (void)argv; die("generate: not implemented yet"); }
static int cmd_chat(int argc, char **argv) { (void)argc; (void)argv; die("chat: not implemented yet"); }

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
    fprintf(stderr, "sft: unknown command '%s'\n\n%s", cmd, usage);
    return 1;
}
