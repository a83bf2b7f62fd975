// common.h: the few helpers every file shares: error messages and overflow-safe sizes.
//
// Library-style code (parsers, loaders) never exits: it fills an Err and returns -1.
// Only sft.c decides to print the message and exit. Read model.h next.
#ifndef COMMON_H
#define COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

// An error message that names the file, the place and the reason,
// e.g. "model.gguf: tensor 'blk.3.attn_q.weight': data offset 123456 is past the end of the file".
typedef struct {
    char msg[1024];
} Err;

// Formats msg into e (if e is not NULL) and returns -1, so that callers can write
//   if (n > limit) return err_set(e, "%s: count %zu is too large", path, n);
int err_set(Err *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

// Overflow-safe size arithmetic: return 0 and store the result, or return -1 on overflow.
int size_mul(size_t *out, size_t a, size_t b);
int size_add(size_t *out, size_t a, size_t b);

// malloc/calloc that print "out of memory (N bytes)" and exit(1) on failure. Use them only for
// allocations whose size has already been validated; parsers check sizes before calling them.
void *xmalloc(size_t n);
void *xcalloc(size_t count, size_t size);
void *xrealloc(void *p, size_t n);  // for growable lists: their sizes are counts of what was read
char *xstrdup(const char *s);

// Reads a whole file into a NUL-terminated buffer. Returns NULL and fills e on failure
// ("PATH: reason": strerror's, or "is a directory, not a file").
char *read_file(const char *path, size_t *len, Err *e);

// A small deterministic random number generator (SplitMix64), the same on every machine.
// Used for initialization, dropout masks and the data order; state is one uint64_t seeded by --seed.
uint64_t rng_next(uint64_t *state);
float rng_uniform(uint64_t *state);  // in [0, 1), 24 random bits
float rng_normal(uint64_t *state);   // standard normal (Box-Muller)
// A counter-based draw: the same (seed, a, b, c) always gives the same value in [0, 1), whatever
// the order or the thread it is asked from (dropout masks).
float rng_hash_uniform(uint64_t seed, uint64_t a, uint64_t b, uint64_t c);
// bits[(n + 31) / 32]: bit c (c < n) set when rng_hash_uniform(seed, a, b, c) >= p; bits past n clear.
void rng_hash_bits(uint32_t *bits, uint64_t seed, uint64_t a, uint64_t b, int n, float p);

// Atomic file replacement: write into a temporary file beside `path`, then atomic_close fsyncs
// it and renames it over `path`, so a reader sees the old file or the new one, never half of one.
// On any error (disk full included) the temporary file is removed and `path` is untouched.
typedef struct {
    FILE *f;
    char path[1024];
    char tmp[1040];
} AtomicFile;
int atomic_open(AtomicFile *af, const char *path, Err *e);
int atomic_close(AtomicFile *af, Err *e);   // fflush + fsync + rename; -1 on any write error
void atomic_abort(AtomicFile *af);          // close and remove the temporary file

// mkdir -p; 0 when the directory exists afterwards.
int make_dirs(const char *path, Err *e);

// Crash and signal tests: SFT_FAULT=NAME[:N[:SIGNAL]][,NAME...] makes the N-th arrival (default:
// the first) at fault_point(NAME) raise SIGNAL: KILL (default; the process ends at once, as under
// kill -9), or TERM, HUP or INT (as if that signal came at that very moment). Unset, it does nothing.
void fault_point(const char *name);

// Seconds from a monotonic clock, for progress and throughput.
double now_seconds(void);

// sft train --trace: every kernel that runs prints one line on stderr, in the order it runs: its
// name, its output and input shapes, and its time. A kernel opens with t0 = trace_start() (the
// clock when tracing is on, else 0: no cost) and ends with trace_op(t0, "name", "shapes", ...).
// trace_frame prints the line of a frame that calls kernels (a training step, a layer).
extern int trace_on;
double trace_start(void);
void trace_op(double t0, const char *name, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void trace_frame(const char *name, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
