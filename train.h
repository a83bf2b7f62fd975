// train.h: LoRA training (sft train) and the loss of a whole data set (sft eval, sft grads).
//
// One optimizer step = batch x grad-accum examples, run forward and backward as stacked
// sequences (no padding, each example attends only to itself, the prefix they share run once),
// gradients summed with grad_scale = 1 / target tokens of the step; then global-norm clipping and
// AdamW (optim.h).
// The data order of epoch E and the dropout masks of step S are functions of (seed, E, S), so a
// resumed run sees exactly what an uninterrupted one sees.
//
// sft.c parses the options into a TrainOptions, then calls trainer_setup, train_loop and
// trainer_free, and decides the exit status. Leaves out: the model (model.h), the data (data.h),
// the adapter's files (lora.h), AdamW (optim.h). Read train.c from train_loop.
#ifndef TRAIN_H
#define TRAIN_H

#include <signal.h>
#include <stdint.h>
#include <stdio.h>

#include "common.h"
#include "data.h"
#include "lora.h"
#include "model.h"
#include "optim.h"

// ---------------------------------------------------------------------------------------------
// The loss of a data set: sft eval and sft grads.

// *loss = the mean NLL over every target of the data set (no dropout); with backward,
// lora->grads holds its gradient. lora may be NULL (the base model). -1 when the loss is not
// finite, with e naming `path` (the data file).
int dataset_loss(double *loss, Model *m, Lora *lora, const Dataset *ds, int backward, const char *path, Err *e);

// sft eval --logits: every example of the data file `data` run token by token through the KV
// cache; writes logits.I [T, V] and tokens.I [T] (ids as floats), F32, to the safetensors `path`.
int write_logits(Model *m, const Lora *lora, const Dataset *ds, const char *data, const char *path, Err *e);

// ---------------------------------------------------------------------------------------------
// sft train.

// The options of sft train, as sft.c parsed them (sft train --help says what each means).
typedef struct {
    const char *model, *data, *out, *eval_data, *init_lora, *resume, *targets;
    int rank, batch, grad_accum, epochs, max_len, threads, quant, show_example, overwrite;
    int trace;               // --trace: one step, each kernel printed on stderr as it runs
    double alpha, dropout, lr, warmup_ratio, weight_decay, max_grad_norm;
    long warmup_steps;       // -1: from warmup_ratio
    long max_steps, eval_every, save_every;
    Schedule schedule;
    LossOn loss_on;
    uint64_t seed;
} TrainOptions;

// A growable list of (step, loss) points for loss.svg.
typedef struct {
    double *x, *y;
    size_t n, cap;
} Curve;

#define TPS_WINDOW 10  // steps the tok/s of the progress line averages over

// Everything one training run holds, from setup to the saved adapter.
typedef struct {
    TrainOptions o;
    const volatile sig_atomic_t *stop;  // set by sft.c's signal handler: drop the step, checkpoint, return 1
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

// Loads and checks everything (model, data, adapter, --resume checkpoint) before writing
// anything, so that bad input leaves --out untouched; then creates --out and its train_log.jsonl.
// tr is zeroed and takes a copy of o; stop is the flag train_loop watches (before every layer).
// With --overwrite, the old run's files in --out are removed then, and not before.
int trainer_setup(Trainer *tr, const TrainOptions *o, const volatile sig_atomic_t *stop, Err *e);

// The plan on stderr: model, kernels, adapter, data, steps, and warnings (cut examples, few steps).
void print_plan(const Trainer *tr);

// Runs the steps from tr->step to the end, writing train_log.jsonl, loss.svg and the
// checkpoints (each with checksums.sha256, which --resume checks). Returns 0 when done, 1 when
// *tr->stop was set: the step in progress is dropped and the last one done saved as a checkpoint
// (checkpoint-0 when no step was done); -1 on an error (e filled: a loss that is not
// finite, a checkpoint or a line of train_log.jsonl that cannot be written).
int train_loop(Trainer *tr, Err *e);

double train_elapsed(const Trainer *tr);  // seconds of training, those before a resume included
void end_progress_line(Trainer *tr);      // ends the live progress line before other output
void trainer_free(Trainer *tr);

#endif
