// train.c: sft train's loop (train_loop -> train_step -> run_examples -> model.c), its
// progress line, train_log.jsonl, loss.svg, checkpoints and --resume; and the loss of a whole
// data set for sft eval and sft grads (dataset_loss).
//
// Read train_loop first (under "The loop"), then train_step (one optimizer step);
// save_checkpoint and resume_from are the two ends of a checkpoint; trainer_setup (at the end)
// loads and checks everything before --out is written. Leaves out: the options and the exit
// status (sft.c), the model (model.c), AdamW (optim.c). train.h has the contracts.
#include "train.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "json.h"
#include "modelfile.h"
#include "quant.h"
#include "safetensors.h"
#include "sha256.h"
#include "threads.h"

// ---------------------------------------------------------------------------------------------
// Running examples through the model, and the loss of a whole data set (sft eval, sft grads).

// Examples run through the model as batches of stacked sequences (model_forward_backward_batch):
// consecutive examples while their tokens fit in PACK_TOKENS (or in the longest one), so that
// every matrix product of the model sees many rows at once even when the examples are short.
#define PACK_TOKENS 256
#define PACK_SEQS 64     // sequences of one pass at most

static int int_desc(const void *a, const void *b) { return *(const int *)b - *(const int *)a; }

// Tokens of the Activations: room for the per_pass longest examples together (a step's examples
// then run in one pass), at most PACK_TOKENS unless one example is longer.
static int pack_tokens(const Dataset *ds, int per_pass) {
    int *T = xmalloc((size_t)(ds->n > 0 ? ds->n : 1) * sizeof *T), sum = 0;
    for (int i = 0; i < ds->n; i++) T[i] = ds->ex[i].T;
    qsort(T, (size_t)ds->n, sizeof *T, int_desc);
    for (int i = 0; i < ds->n && i < per_pass && sum < PACK_TOKENS; i++) sum += T[i];
    int longest = ds->n > 0 && T[0] > 2 ? T[0] : 2;
    free(T);
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
        fault_point("model-pass");  // the tests' stand-in for a signal that comes mid-step
        while (i < n && B < PACK_SEQS && (B == 0 || T + ex[i]->T <= max_T)) {
            seqs[B++] = (Sequence){ex[i]->tokens, ex[i]->mask, ex[i]->T};
            T += ex[i++]->T;
        }
        sum += model_forward_backward_batch(m, lora, a, seqs, B, grad_scale, backward,
                                            seed ? dropout_seed(seed, step, *pass) : 0);
    }
    return sum;
}

int dataset_loss(double *loss, Model *m, Lora *lora, const Dataset *ds, int backward, const char *path, Err *e) {
    Activations *a = activations_new(&m->config, lora, pack_tokens(ds, ds->n));
    const Example **ex = xmalloc((size_t)ds->n * sizeof *ex);
    for (int i = 0; i < ds->n; i++) ex[i] = &ds->ex[i];
    if (lora) lora_zero_grad(lora);
    int passes = 0;
    double sum = run_examples(m, lora, a, ex, ds->n, (float)(1.0 / ds->n_targets), backward, 0, 0, &passes);
    free(ex);
    activations_free(a);
    if (!isfinite(sum)) return err_set(e, "%s: the loss is not finite (a token id past the model's vocabulary?)", path);
    *loss = sum / (double)ds->n_targets;
    return 0;
}

// Runs ex token by token through kv; logits[T, V] = the logits at each of its positions.
static int example_logits(float *logits, Model *m, const Lora *lora, KVCache *kv, const Example *ex) {
    kvcache_reset(kv);
    for (int k = 0; k < ex->T; k++)
        if (model_infer(m, lora, kv, &ex->tokens[k], 1, logits + (size_t)k * m->config.V) != 0) return -1;
    return 0;
}

int write_logits(Model *m, const Lora *lora, const Dataset *ds, const char *data, const char *path, Err *e) {
    int V = m->config.V, max_T = 1, r = 0;
    for (int i = 0; i < ds->n; i++) max_T = ds->ex[i].T > max_T ? ds->ex[i].T : max_T;
    KVCache *kv = kvcache_new(&m->config, max_T);
    kvcache_exact(kv, 1);  // logits to check against a reference: training's products, not 8-bit ones
    StTensor *t = xcalloc((size_t)ds->n * 2, sizeof *t);
    char *names = xmalloc((size_t)ds->n * 64);  // "logits.I" and "tokens.I", 32 bytes each
    for (int i = 0; i < ds->n && r == 0; i++) {
        const Example *ex = &ds->ex[i];
        float *logits = xmalloc(sizeof(float) * (size_t)ex->T * V), *ids = xmalloc(sizeof(float) * (size_t)ex->T);
        for (int k = 0; k < ex->T; k++) ids[k] = (float)ex->tokens[k];
        snprintf(names + (size_t)i * 64, 32, "logits.%d", i);
        snprintf(names + (size_t)i * 64 + 32, 32, "tokens.%d", i);
        t[2 * i] = (StTensor){.name = names + (size_t)i * 64, .type = TYPE_F32, .n_dims = 2, .shape = {ex->T, V}, .data = logits};
        t[2 * i + 1] = (StTensor){.name = names + (size_t)i * 64 + 32, .type = TYPE_F32, .n_dims = 1, .shape = {ex->T}, .data = ids};
        if (example_logits(logits, m, lora, kv, ex) != 0) r = err_set(e, "%s:%d: cannot run the example", data, ex->line);
    }
    if (r == 0) r = safetensors_write(path, t, ds->n * 2, NULL, e);
    for (int i = 0; i < ds->n * 2; i++) free((void *)t[i].data);
    free(t), free(names);
    kvcache_free(kv);
    return r;
}

// ---------------------------------------------------------------------------------------------
// sft train: the Trainer (train.h) and what one step did.

static void curve_add(Curve *c, double x, double y) {
    if (c->n == c->cap) {
        c->cap = c->cap ? 2 * c->cap : 64;
        c->x = xrealloc(c->x, c->cap * sizeof(double));
        c->y = xrealloc(c->y, c->cap * sizeof(double));
    }
    c->x[c->n] = x, c->y[c->n] = y, c->n++;
}

// What one optimizer step did.
typedef struct {
    double loss;         // mean NLL per target token
    double grad_norm;    // before clipping
    float lr;
    long tokens;         // tokens through the model
    long targets;        // target tokens
    double seconds;
    int dropped;         // a signal came during the step: it changed nothing
} StepStats;

// ---------------------------------------------------------------------------------------------
// Fingerprints: FNV-1a over bytes, so that a checkpoint of another model or data set is refused.

static uint64_t fnv1a(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}
#define FNV_START 0xcbf29ce484222325ull

// A matrix's type and shape, then the bytes of its rows rows[n] as stored (quantized blocks).
static uint64_t hash_rows(uint64_t h, const QMatrix *W, const int *rows, int n) {
    int32_t shape[3] = {(int32_t)W->type, W->rows, W->cols};
    h = fnv1a(h, shape, sizeof shape);
    size_t bytes = row_bytes(W->type, W->cols);
    for (int i = 0; i < n; i++) h = fnv1a(h, (const unsigned char *)W->data + (size_t)rows[i] * bytes, bytes);
    return h;
}

// The config, every matrix's type and shape, and a sample of the weights: the stored bytes of
// the embedding rows 0, V/2 and V-1 (and lm_head's when untied) and of the first row of every
// layer matrix, and the norms. Bytes as stored, never dequantized: checkpoint set-up then runs
// none of the kernels a learner sets breakpoints on.
static uint64_t model_fingerprint(const Model *m) {
    const Config *c = &m->config;
    int32_t dims[7] = {c->C, c->L, c->NH, c->NKV, c->FF, c->V, c->tied};
    uint64_t h = fnv1a(FNV_START, dims, sizeof dims);
    int sample[3] = {0, c->V / 2, c->V - 1}, first = 0;
    h = hash_rows(h, &m->w.embed, sample, 3);
    if (!c->tied) h = hash_rows(h, &m->w.lm_head, sample, 3);
    h = fnv1a(h, m->w.out_norm, (size_t)c->C * sizeof(float));
    for (int l = 0; l < c->L; l++) {
        const LayerWeights *lw = &m->w.layers[l];
        const QMatrix *mats[7] = {&lw->wq, &lw->wk, &lw->wv, &lw->wo, &lw->wgate, &lw->wup, &lw->wdown};
        for (int k = 0; k < 7; k++) h = hash_rows(h, mats[k], &first, 1);
        h = fnv1a(h, lw->attn_norm, (size_t)c->C * sizeof(float));
        h = fnv1a(h, lw->ffn_norm, (size_t)c->C * sizeof(float));
    }
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
// left untouched when the loss or the gradient is not finite, and when a signal asked to stop
// during the step (st->dropped: the passes returned early, the gradients are partial).
static void train_step(Trainer *tr, StepStats *st) {
    double t = now_seconds();
    int first, count;
    step_examples(tr, tr->step, &first, &count);
    trace_on = tr->o.trace;
    trace_frame("train_step", "step %ld: %d examples", tr->step + 1, count);
    memset(st, 0, sizeof *st);
    for (int j = 0; j < count; j++) st->targets += tr->train.ex[tr->order[first + j]].n_targets;
    st->lr = lr_at(tr->o.schedule, (float)tr->o.lr, tr->step, tr->warmup, tr->total_steps);
    lora_zero_grad(&tr->lora);
    if (st->targets == 0) {  // nothing to learn in this step (examples cut before their answers)
        trace_on = 0;
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
    st->dropped = *tr->stop != 0;
    st->loss = st->dropped ? NAN : nll / (double)st->targets;
    st->grad_norm = grad_norm(tr->lora.grads, tr->lora.n_params);
    if (isfinite(st->loss) && isfinite(st->grad_norm)) {
        clip_grad_norm(tr->lora.grads, tr->lora.n_params, st->grad_norm, (float)tr->o.max_grad_norm);
        adamw_step(&tr->opt, tr->lora.params, tr->lora.grads, st->lr);
    }
    trace_on = 0;
    st->seconds = now_seconds() - t;
}

// Mean NLL per target token of the evaluation set, without dropout.
static double eval_loss(Trainer *tr) {
    const Example *ex[PACK_SEQS];
    double nll = 0;
    fault_point("eval");  // the tests' stand-in for a signal during the evaluation
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

double train_elapsed(const Trainer *tr) {
    return tr->elapsed_before + (tr->steps_this_run ? now_seconds() - tr->t0 : 0);
}

static void format_duration(char *buf, size_t cap, double s) {
    long t = (long)(s + 0.5);
    if (t >= 3600) snprintf(buf, cap, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
    else snprintf(buf, cap, "%ld:%02ld", t / 60, t % 60);
}

void end_progress_line(Trainer *tr) {
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

// "the last good checkpoint is OUT/checkpoint-N", or that there is none.
static void last_good(const Trainer *tr, char *buf, size_t cap) {
    if (tr->last_checkpoint) snprintf(buf, cap, "the last good checkpoint is %s/checkpoint-%ld", tr->out, tr->last_checkpoint);
    else snprintf(buf, cap, "no checkpoint was saved (use --save-every N)");
}

// After a line went to train_log.jsonl: fills e when it could not be written (the disk is full).
static int log_written(Trainer *tr, Err *e) {
    if (!ferror(tr->log) && fflush(tr->log) == 0) return 0;
    int saved = errno;
    char last[1200];
    last_good(tr, last, sizeof last);
    end_progress_line(tr);
    return err_set(e, "%s/train_log.jsonl: write failed at step %ld: %s: training stopped; %s", tr->out, tr->step,
                   strerror(saved), last);
}

static int log_step(Trainer *tr, const StepStats *st, Err *e) {
    fprintf(tr->log, "{\"step\": %ld, \"loss\": %.9g, \"lr\": %.9g, \"tokens\": %ld, \"elapsed_s\": %.3f, "
            "\"grad_norm\": %.9g, \"epoch\": %.4f, \"target_tokens\": %ld}\n",
            tr->step, st->loss, st->lr, st->tokens, train_elapsed(tr), st->grad_norm,
            (double)tr->step / (double)tr->steps_per_epoch, st->targets);
    curve_add(&tr->train_curve, (double)tr->step, st->loss);
    return log_written(tr, e);
}

static int log_eval(Trainer *tr, double loss, Err *e) {
    fprintf(tr->log, "{\"step\": %ld, \"eval_loss\": %.9g, \"eval_ppl\": %.9g, \"elapsed_s\": %.3f}\n",
            tr->step, loss, exp(loss), train_elapsed(tr));
    if (log_written(tr, e) != 0) return -1;
    curve_add(&tr->eval_curve, (double)tr->step, loss);
    end_progress_line(tr);
    printf("eval step %ld/%ld loss %.6f ppl %.4g\n", tr->step, tr->total_steps, loss, exp(loss));
    fflush(stdout);
    return 0;
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
// moments), train_log.jsonl up to STEP, trainer_state.json (step, settings that must match,
// the data order) and checksums.sha256, the SHA-256 of each of those five files in the format of
// sha256sum, written last. It is written as OUT/checkpoint-STEP.partial/ and renamed when complete.

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

// The files of a checkpoint that a resume reads, each with its line in checksums.sha256.
static const char *const CHECKPOINT_FILES[] = {"adapter_config.json", "adapter_model.safetensors", "optimizer.bin",
                                               "train_log.jsonl", "trainer_state.json"};
enum { N_CHECKPOINT_FILES = sizeof CHECKPOINT_FILES / sizeof CHECKPOINT_FILES[0] };

// hex[65] = the SHA-256 of the file dir/name.
static int file_sha256(char hex[65], const char *dir, const char *name, Err *e) {
    char path[1200];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    size_t len;
    char *data = read_file(path, &len, e);
    if (!data) return -1;
    sha256_hex(hex, data, len);
    free(data);
    return 0;
}

// dir/checksums.sha256: "HEX  NAME" a line for each of CHECKPOINT_FILES, as sha256sum writes it.
static int write_checksums(const char *dir, Err *e) {
    char text[N_CHECKPOINT_FILES * 128], hex[65], path[1200];
    size_t n = 0;
    for (int i = 0; i < N_CHECKPOINT_FILES; i++) {
        if (file_sha256(hex, dir, CHECKPOINT_FILES[i], e) != 0) return -1;
        n += (size_t)snprintf(text + n, sizeof text - n, "%s  %s\n", hex, CHECKPOINT_FILES[i]);
    }
    snprintf(path, sizeof path, "%s/checksums.sha256", dir);
    return write_bytes_atomic(path, text, n, e);
}

static int fill_checkpoint(const Trainer *tr, const char *dir, Err *e) {
    char p[1200];
    if (lora_save(&tr->lora, dir, e) != 0) return -1;
    fault_point("checkpoint-adapter");
    snprintf(p, sizeof p, "%s/optimizer.bin", dir);
    if (save_optimizer(&tr->opt, p, e) != 0) return -1;
    fault_point("checkpoint-optimizer");
    snprintf(p, sizeof p, "%s/train_log.jsonl", dir);
    if (copy_log(tr, p, e) != 0) return -1;
    fault_point("checkpoint-log");
    snprintf(p, sizeof p, "%s/trainer_state.json", dir);
    if (write_trainer_state(tr, p, e) != 0) return -1;
    fault_point("checkpoint-state");
    return write_checksums(dir, e);  // last: its presence marks a complete checkpoint
}

static int is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

// Writes OUT/checkpoint-STEP/ as a whole or not at all; an older one of the same step is
// replaced only once the new one is complete. Nothing to do when this step's checkpoint is there
// already (a run resumed in place and stopped before its first step ended).
static int save_checkpoint(Trainer *tr, Err *e) {
    char dir[1100], tmp[1120], old[1120];
    snprintf(dir, sizeof dir, "%s/checkpoint-%ld", tr->out, tr->step);
    snprintf(tmp, sizeof tmp, "%s.partial", dir);
    snprintf(old, sizeof old, "%s.old", dir);
    if (tr->step == tr->last_checkpoint && is_dir(dir)) return 0;
    remove_flat_dir(tmp);
    if (make_dirs(tmp, e) != 0 || fill_checkpoint(tr, tmp, e) != 0) {
        remove_flat_dir(tmp);
        return -1;
    }
    fault_point("checkpoint-complete");
    fsync_dir(tmp);
    remove_flat_dir(old);
    int had_old = is_dir(dir);
    if (had_old && rename(dir, old) != 0) {
        err_set(e, "%s: cannot rename to %s: %s", dir, old, strerror(errno));
        remove_flat_dir(tmp);
        return -1;
    }
    if (had_old) fault_point("checkpoint-rename-1");
    if (rename(tmp, dir) != 0) {
        err_set(e, "%s: cannot rename to %s: %s", tmp, dir, strerror(errno));
        if (had_old) rename(old, dir);
        remove_flat_dir(tmp);
        return -1;
    }
    fault_point("checkpoint-rename-2");
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
    else if (st->number < 0 || st->number > (double)tr->total_steps || st->number != floor(st->number))
        r = err_set(e, "%s: step %g is not within this run's %ld steps", path, st->number, tr->total_steps);
    else
        r = check_settings(tr, set, path, e);
    if (r == 0) *step = (long)st->number, *elapsed = el && el->type == JSON_NUMBER ? el->number : 0;
    json_free(&j);
    return r;
}

// The SHA-256 that the text of checksums.sha256 gives for name, into hex[65]; -1 when it has none.
static int listed_sha256(char hex[65], const char *text, const char *name) {
    size_t n = strlen(name);
    for (const char *line = text; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
        const char *end = strchr(line, '\n');
        size_t len = end ? (size_t)(end - line) : strlen(line);
        if (len != 66 + n || memcmp(line + 64, "  ", 2) != 0 || memcmp(line + 66, name, n) != 0) continue;
        memcpy(hex, line, 64), hex[64] = 0;
        return 0;
    }
    return -1;
}

// Checks every file a resume reads (CHECKPOINT_FILES) against dir/checksums.sha256, before any
// of them is parsed: a damaged file is named, whatever it holds.
static int verify_checksums(const char *dir, Err *e) {
    char path[1100], want[65], got[65];
    snprintf(path, sizeof path, "%s/checksums.sha256", dir);
    char *text = read_file(path, NULL, e);
    if (!text) {
        int saved = errno;
        snprintf(path, sizeof path, "%s/trainer_state.json", dir);
        if (access(path, F_OK) != 0) return err_set(e, "%s: not a checkpoint (no trainer_state.json)", dir);
        return err_set(e, "%s/checksums.sha256: %s: the checkpoint cannot be checked, so it is not resumed", dir,
                       strerror(saved));
    }
    int r = 0;
    for (int i = 0; i < N_CHECKPOINT_FILES && r == 0; i++) {
        if (listed_sha256(want, text, CHECKPOINT_FILES[i]) != 0)
            r = err_set(e, "%s/checksums.sha256: no checksum for %s: the checkpoint is not resumed", dir, CHECKPOINT_FILES[i]);
        else if (file_sha256(got, dir, CHECKPOINT_FILES[i], e) != 0)
            r = -1;
        else if (strcmp(got, want) != 0)
            r = err_set(e, "%s/%s: does not match its SHA-256 in checksums.sha256 (changed or damaged since the "
                        "checkpoint was saved): not resumed", dir, CHECKPOINT_FILES[i]);
    }
    free(text);
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
    if (verify_checksums(dir, e) != 0 || read_trainer_state(tr, dir, &step, &elapsed, e) != 0) return -1;
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

// Fills e when step tr->step + 1 had a loss or a gradient that is not finite (its update was skipped).
static int not_finite(Trainer *tr, const StepStats *st, Err *e) {
    char last[1200];
    last_good(tr, last, sizeof last);
    end_progress_line(tr);
    return err_set(e, "step %ld: the loss is %s (gradient norm %s): training stopped (try a lower --lr); %s", tr->step + 1,
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

// The evaluation of step tr->step, logged unless a signal cut it short (a resume from this step's
// checkpoint then runs it: eval_pending).
static int run_eval(Trainer *tr, Err *e) {
    double loss = eval_loss(tr);
    if (isnan(loss) && *tr->stop) return 0;
    return log_eval(tr, loss, e);
}

// A resumed run whose checkpoint was saved before its evaluation finished.
static int eval_pending(const Trainer *tr) {
    const Curve *c = &tr->eval_curve;
    return tr->step > 0 && eval_due(tr) && (c->n == 0 || c->x[c->n - 1] != (double)tr->step);
}

// After step tr->step: loss.svg (every 2 s); a checkpoint when stop is set and, with --save-every,
// every --save-every steps and at the end. Without it a finished run writes no checkpoint: its
// adapter is the result, and a resume of a finished run has nothing left to do.
static int save_due(Trainer *tr, int stop, Err *e) {
    long every = tr->o.save_every;
    int save = stop || (every > 0 && (tr->step % every == 0 || tr->step == tr->total_steps));
    if (save || now_seconds() - tr->last_svg > 2) {
        if (write_loss_svg(tr, e) != 0) return -1;
        tr->last_svg = now_seconds();
    }
    if (save && save_checkpoint(tr, e) != 0) return checkpoint_failed(tr, e);
    return 0;
}

// A signal came during step tr->step + 1, which was dropped: checkpoint step tr->step (step 0,
// the state before any step, when the first was dropped) and return 1.
static int stop_between_steps(Trainer *tr, Err *e) {
    end_progress_line(tr);
    int first, count;
    if (tr->step > 0) step_examples(tr, tr->step - 1, &first, &count);  // the data order of the last step done
    return save_due(tr, 1, e) != 0 ? -1 : 1;  // at step 0: checkpoint-0, the state before any step
}

// train.h has the contract. Each step: train_step, the log line, the progress line, the eval
// loss when due, then save_due; a signal drops the step in progress (stop_between_steps).
int train_loop(Trainer *tr, Err *e) {
    activations_watch(tr->acts, tr->stop);
    if (eval_pending(tr) && run_eval(tr, e) != 0) return -1;
    while (tr->step < tr->total_steps) {
        if (tr->steps_this_run == 0) tr->t0 = now_seconds();
        StepStats st;
        train_step(tr, &st);
        if (st.dropped) return stop_between_steps(tr, e);
        if (!isfinite(st.loss) || !isfinite(st.grad_norm)) return not_finite(tr, &st, e);
        tr->step++, tr->steps_this_run++;
        if (log_step(tr, &st, e) != 0) return -1;
        print_progress(tr, &st);
        if (eval_due(tr) && run_eval(tr, e) != 0) return -1;
        int stop = *tr->stop != 0;  // read once: a signal between the two uses changes nothing
        if (save_due(tr, stop, e) != 0) return -1;
        if (stop && (tr->step < tr->total_steps || eval_pending(tr))) return 1;  // the last step's eval cut: resume
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

// 1 when --resume names a checkpoint of --out itself: the run goes on in its own directory.
static int resumes_in_place(const Trainer *tr) {
    char parent[1024];
    if (!tr->o.resume) return 0;
    parent_dir(parent, sizeof parent, tr->o.resume);
    return same_file(parent, tr->out);
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
        if (!dir_is_empty(tr->out) && !o->overwrite && !resumes_in_place(tr))
            return err_set(e, "--out %s: the directory is not empty; pass --overwrite to write into it, or "
                           "choose another --out", tr->out);
    }
    return 0;
}

// The files and directories that sft train writes into --out (their temporary files included):
// the adapter, train_log.jsonl, loss.svg, checkpoint-STEP/ (.partial, .old).
static int is_run_file(const char *name) {
    const char *const prefixes[] = {"adapter_config.json", "adapter_model.safetensors", "train_log.jsonl", "loss.svg",
                                    "checkpoint-"};
    for (size_t i = 0; i < sizeof prefixes / sizeof prefixes[0]; i++)
        if (strncmp(name, prefixes[i], strlen(prefixes[i])) == 0) return 1;
    return 0;
}

// --overwrite: removes the files of the run that --out holds (is_run_file; others stay), so
// that the folder never mixes two runs.
static int remove_old_run(const char *out, Err *e) {
    DIR *d = opendir(out);
    if (!d) return 0;
    struct dirent *de;
    char p[1400];
    int r = 0;
    while (r == 0 && (de = readdir(d))) {
        if (!is_run_file(de->d_name)) continue;
        snprintf(p, sizeof p, "%s/%s", out, de->d_name);
        if (is_dir(p)) remove_flat_dir(p);
        else remove(p);
        if (access(p, F_OK) == 0) r = err_set(e, "%s: cannot remove it (--overwrite): %s", p, strerror(errno));
    }
    closedir(d);
    return r;
}

// Creates the output directory and OUT/train_log.jsonl, which starts as log[len] (a resumed
// checkpoint's log) or empty. With --overwrite, the old run goes first (unless this run resumes
// in place): everything was checked before, nothing is written yet.
static int create_out_dir(Trainer *tr, const char *log, size_t len, Err *e) {
    if (make_dirs(tr->out, e) != 0) return -1;
    if (tr->o.overwrite && !resumes_in_place(tr) && remove_old_run(tr->out, e) != 0) return -1;
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

void print_plan(const Trainer *tr) {
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
    ActivationsMemory am = activations_memory(tr->acts);
    fprintf(stderr, "memory    activations %.0f MB for passes of up to %d tokens, the MLP's gate/up kept %s",
            (double)am.bytes / 1e6, activations_max_T(tr->acts), am.ff_bf16 ? "in bf16" : "in floats");
    if (am.ff_layers < c->L) fprintf(stderr, " by %d of %d layers (the others recompute them)", am.ff_layers, c->L);
    fprintf(stderr, "\n");
    if (tr->o.lr == 0)
        fprintf(stderr, "warning: --lr 0: the adapter will not change (training only measures the loss)\n");
    if (tr->train.n_truncated)
        fprintf(stderr, "warning: %d of %d examples were longer than --max-len %d tokens and were cut\n",
                tr->train.n_truncated, tr->train.n, tr->o.max_len);
    if (tr->total_steps < 20 && !tr->o.trace)
        fprintf(stderr, "warning: only %ld optimizer steps: too few to learn much. Each step averages %d examples "
                "(--batch x --grad-accum) into one update; the article's run (10 examples, batch 1, accumulation 4, "
                "2 epochs) made only 6. Raise --epochs or --max-steps, or lower --grad-accum.\n",
                tr->total_steps, tr->o.batch * tr->o.grad_accum);
}

static int load_data(Dataset *d, const char *path, const Trainer *tr, Err *e) {
    return data_load(d, path, &tr->model.tok, tr->o.loss_on, tr->o.max_len, e);
}

// The adapter: from --init-lora (its rank, alpha and targets; dropout from --dropout) or fresh.
static int make_adapter(Trainer *tr, Err *e) {
    const TrainOptions *o = &tr->o;
    if (o->init_lora) {
        if (lora_load(&tr->lora, o->init_lora, &tr->model.config, e) != 0) return -1;
        tr->lora.dropout = (float)o->dropout;
    } else {
        unsigned targets;
        Err why;
        if (lora_parse_targets(&targets, o->targets, &why) != 0) return err_set(e, "--targets: %s", why.msg);
        lora_init(&tr->lora, &tr->model.config, o->rank, (float)o->alpha, (float)o->dropout, targets, o->seed);
    }
    free(tr->lora.base_model);
    // base_model_name_or_path: the Hugging Face id the model names for itself, else the path as given
    tr->lora.base_model = xstrdup(tr->model.hf_id ? tr->model.hf_id : o->model);
    return 0;
}

static void make_plan(Trainer *tr) {
    const TrainOptions *o = &tr->o;
    long per_step = (long)o->batch * o->grad_accum;
    tr->steps_per_epoch = (tr->train.n + per_step - 1) / per_step;
    tr->total_steps = o->max_steps > 0 ? o->max_steps : tr->steps_per_epoch * o->epochs;
    tr->warmup = o->warmup_steps >= 0 ? o->warmup_steps : warmup_from_ratio(o->warmup_ratio, tr->total_steps);
}

void trainer_free(Trainer *tr) {
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

// Loads the model and the data sets; prints the example of --show-example.
static int load_inputs(Trainer *tr, Err *e) {
    const TrainOptions *o = &tr->o;
    if (model_load(&tr->model, o->model, o->quant, e) != 0) return -1;
    if (load_data(&tr->train, o->data, tr, e) != 0) return -1;
    if (o->eval_data) {
        if (load_data(&tr->eval, o->eval_data, tr, e) != 0) return -1;
        tr->has_eval = 1;
    }
    if (o->show_example >= 0) {
        if (o->show_example >= tr->train.n)
            return err_set(e, "--show-example %d: the data has %d examples", o->show_example, tr->train.n);
        data_print_example(stderr, &tr->train, o->show_example, &tr->model.tok);
    }
    return 0;
}

// train.h has the contract. --out is checked first and written last.
int trainer_setup(Trainer *tr, const TrainOptions *o, const volatile sig_atomic_t *stop, Err *e) {
    memset(tr, 0, sizeof *tr);
    tr->o = *o, tr->stop = stop;
    tr->tty = isatty(fileno(stdout));
    tr->order_epoch = -1;
    if (check_out_dir(tr, e) != 0) return -1;
    threads_init(o->threads);
    if (load_inputs(tr, e) != 0 || make_adapter(tr, e) != 0) return -1;
    make_plan(tr);
    adamw_init(&tr->opt, tr->lora.n_params, 0.9, 0.999, 1e-8, o->weight_decay);
    tr->order = xmalloc((size_t)tr->train.n * sizeof(int));
    tr->model_fp = model_fingerprint(&tr->model);
    tr->data_fp = data_fingerprint(&tr->train);
    char *log = NULL;
    size_t log_len = 0;
    if (o->resume && resume_from(tr, o->resume, &log, &log_len, e) != 0) return -1;
    int r = create_out_dir(tr, log, log_len, e);
    free(log);
    if (r != 0) return -1;
    int max_T = pack_tokens(&tr->train, o->batch * o->grad_accum);
    if (tr->has_eval && pack_tokens(&tr->eval, PACK_SEQS) > max_T) max_T = pack_tokens(&tr->eval, PACK_SEQS);
    tr->acts = activations_new(&tr->model.config, &tr->lora, max_T);
    return 0;
}
