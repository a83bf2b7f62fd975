// modelfile.h: what `sft info`, `sft quantize` and `sft init` do with model files (modelfile.c).
// model_load / model_free (model.h) are the other half of modelfile.c.
#ifndef MODELFILE_H
#define MODELFILE_H

#include <stdint.h>
#include <stdio.h>
#include "common.h"
#include "model.h"

// Validates the model at path (GGUF file or Hugging Face directory) as model_load does, then
// prints the architecture, hyperparameters, tokenizer summary, every tensor (name, shape, type,
// bytes) and the totals (parameters, bytes, bits per weight).
int model_info(FILE *out, const char *path, Err *e);

// Converts the model at path to a GGUF file of `type`: a type name of quant.h ("q4_0", "q8_0",
// "f16", "bf16", "f32", ...) or "q4_k_m" (llama.cpp's Q4_K_M mix). Matrices are converted row by
// row; norms and biases stay F32. Matrices whose rows are not whole blocks of the type fall back
// (Q4_K -> Q5_0, Q6_K -> Q8_0, else Q8_0 / F32), with one note on stderr. Written atomically.
int model_quantize(const char *path, const char *type, const char *out_path, Err *e);

// sft init: a randomly initialized Qwen2 model written as GGUF, deterministic from the seed.
typedef struct {
    const char *config;     // "tiny", "qwen2.5-0.5b", or a Hugging Face config.json
    const char *tokenizer;  // tokenizer.json, a model directory, or a GGUF file
    const char *type;       // as for model_quantize
    uint64_t seed;
    float std;              // matrices (lm_head included when untied) and biases ~ N(0, std)
    float embed_std;        // the token embedding ~ N(0, embed_std)
    const char *out;
} InitOptions;
int model_init_random(const InitOptions *o, Err *e);

// Validates the model at path as model_load does, converting nothing, and gives its config.
int model_peek(const char *path, Config *c, Err *e);

// sft merge: the model at path with the adapter at lora_path (a PEFT directory or a GGUF adapter)
// merged into its weights, W' = W + scale B A, in float32 from the base as stored (dequantized,
// never through --quant), then written:
//   out a file:       a GGUF model of `type` (a type name as for model_quantize; NULL: each
//                     matrix's stored type for a GGUF base, bf16 for a Hugging Face base);
//   out a directory   (ends with '/' or exists): a Hugging Face model directory, weights in
//                     `dtype` ("bf16" (NULL) or "f32"), config.json, the tokenizer files (copied,
//                     or written from a GGUF base's tokenizer) and generation_config.json.
typedef struct {
    const char *out;
    const char *type;
    const char *dtype;
} MergeOptions;
int model_merge(const char *path, const char *lora_path, const MergeOptions *o, Err *e);

#endif
