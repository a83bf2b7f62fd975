// common.c: error messages, overflow-safe sizes, checked allocation, whole-file reads, a clock,
// SplitMix64 random numbers (sequential and counter-based), atomic file writes and mkdir -p.
//
// Leaves out: anything about models or tensors. Read common.h for the contracts, model.h next.
#include "common.h"

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int err_set(Err *e, const char *fmt, ...) {
    if (e) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(e->msg, sizeof e->msg, fmt, ap);
        va_end(ap);
    }
    return -1;
}

int size_mul(size_t *out, size_t a, size_t b) {
    if (a != 0 && b > SIZE_MAX / a) return -1;
    *out = a * b;
    return 0;
}

int size_add(size_t *out, size_t a, size_t b) {
    if (b > SIZE_MAX - a) return -1;
    *out = a + b;
    return 0;
}

static void out_of_memory(size_t n) {
    fprintf(stderr, "sft: out of memory (%zu bytes)\n", n);
    exit(1);
}

void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) out_of_memory(n);
    return p;
}

void *xcalloc(size_t count, size_t size) {
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) out_of_memory(count * size);
    return p;
}

void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) out_of_memory(n);
    return q;
}

char *xstrdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *p = xmalloc(n);
    memcpy(p, s, n);
    return p;
}

char *read_file(const char *path, size_t *len, Err *e) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        err_set(e, "%s: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fileno(f), &st) == 0 && S_ISDIR(st.st_mode)) {  // fopen opens a directory, fread fails
        fclose(f);
        err_set(e, "%s: is a directory, not a file", path);
        return NULL;
    }
    size_t cap = 1 << 16, n = 0;
    char *buf = xmalloc(cap);
    for (;;) {
        size_t got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
        if (got == 0) break;
        if (n + 1 == cap) {
            if (cap > SIZE_MAX / 2) break;
            cap *= 2;
            buf = realloc(buf, cap);
            if (!buf) out_of_memory(cap);
        }
    }
    int failed = ferror(f), saved = errno;
    fclose(f);
    if (failed) {
        free(buf);
        err_set(e, "%s: read error: %s", path, saved ? strerror(saved) : "unknown I/O error");
        return NULL;
    }
    buf[n] = 0;
    if (len) *len = n;
    return buf;
}

double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int trace_on = 0;

double trace_start(void) { return trace_on ? now_seconds() : 0; }

// "trace  NAME  SHAPES  TIME ms", columns aligned for reading down a list of a few hundred lines.
void trace_op(double t0, const char *name, const char *fmt, ...) {
    if (!trace_on) return;
    double ms = 1e3 * (now_seconds() - t0);
    char shapes[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(shapes, sizeof shapes, fmt, ap);
    va_end(ap);
    fprintf(stderr, "trace    %-26s %-64s %9.3f ms\n", name, shapes, ms);
}

// "trace  NAME  WHAT": the frame whose kernels follow, flush left.
void trace_frame(const char *name, const char *fmt, ...) {
    if (!trace_on) return;
    char what[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    fprintf(stderr, "trace  %s  %s\n", name, what);
}

uint64_t rng_next(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

float rng_uniform(uint64_t *state) {
    return (float)(rng_next(state) >> 40) * (1.0f / 16777216.0f);
}

float rng_normal(uint64_t *state) {
    float u1 = rng_uniform(state), u2 = rng_uniform(state);
    if (u1 < 1e-12f) u1 = 1e-12f;
    return sqrtf(-2.0f * logf(u1)) * cosf(6.2831853071795864f * u2);
}

float rng_hash_uniform(uint64_t seed, uint64_t a, uint64_t b, uint64_t c) {
    uint64_t s = seed ^ (a * 0xD1B54A32D192ED03ull) ^ (b * 0xAEF17502108EF2D9ull) ^ (c * 0xF1357AEA2E62A9C5ull);
    return rng_uniform(&s);
}

// The same draws 32 at a time, written out so that compilers vectorize them: rng_uniform's value
// (z >> 40) * 2^-24 is >= p exactly when the integer z >> 40 is >= ceil(p * 2^24) (both exact).
void rng_hash_bits(uint32_t *bits, uint64_t seed, uint64_t a, uint64_t b, int n, float p) {
    uint64_t base = seed ^ (a * 0xD1B54A32D192ED03ull) ^ (b * 0xAEF17502108EF2D9ull);
    uint32_t threshold = p <= 0 ? 0 : p >= 1 ? 1u << 24 : (uint32_t)ceilf(p * 16777216.0f);
    for (int c0 = 0; c0 < n; c0 += 32) {
        uint32_t u[32], w = 0;
        for (int j = 0; j < 32; j++) {
            uint64_t z = (base ^ ((uint64_t)(c0 + j) * 0xF1357AEA2E62A9C5ull)) + 0x9E3779B97F4A7C15ull;
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
            u[j] = (uint32_t)((z ^ (z >> 31)) >> 40);
        }
        for (int j = 0; j < 32; j++) w |= (uint32_t)(u[j] >= threshold) << j;
        bits[c0 / 32] = n - c0 >= 32 ? w : w & ((1u << (n - c0)) - 1);
    }
}

int atomic_open(AtomicFile *af, const char *path, Err *e) {
    memset(af, 0, sizeof *af);
    if (strlen(path) >= sizeof af->path) return err_set(e, "%s: path too long", path);
    snprintf(af->path, sizeof af->path, "%s", path);
    snprintf(af->tmp, sizeof af->tmp, "%s.tmp%ld", path, (long)getpid());
    af->f = fopen(af->tmp, "wb");
    if (!af->f) return err_set(e, "%s: cannot write: %s", af->tmp, strerror(errno));
    return 0;
}

int atomic_close(AtomicFile *af, Err *e) {
    int failed = ferror(af->f) || fflush(af->f) != 0 || fsync(fileno(af->f)) != 0;
    int saved = errno;
    if (fclose(af->f) != 0 && !failed) failed = 1, saved = errno;
    af->f = NULL;
    if (!failed && rename(af->tmp, af->path) == 0) return 0;
    if (!failed) saved = errno;
    remove(af->tmp);
    return err_set(e, "%s: write failed: %s", af->path, strerror(saved));
}

void atomic_abort(AtomicFile *af) {
    if (af->f) fclose(af->f);
    af->f = NULL;
    remove(af->tmp);
}

int make_dirs(const char *path, Err *e) {
    char buf[1024];
    if (strlen(path) >= sizeof buf) return err_set(e, "%s: path too long", path);
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(buf, 0755) != 0 && errno != EEXIST) return err_set(e, "%s: cannot create directory: %s", buf, strerror(errno));
        *p = '/';
    }
    if (mkdir(buf, 0755) != 0 && errno != EEXIST) return err_set(e, "%s: cannot create directory: %s", buf, strerror(errno));
    struct stat st;
    if (stat(buf, &st) != 0 || !S_ISDIR(st.st_mode)) return err_set(e, "%s: not a directory", buf);
    return 0;
}

// A mutable global, for the tests only: the arrivals at each entry of SFT_FAULT so far. A process
// without SFT_FAULT never touches it.
static int fault_arrivals[8];

// Entry i of SFT_FAULT ("NAME:N:SIGNAL") names this point: counts the arrival, and raises the
// signal on the N-th.
static void fault_entry(const char *entry, size_t len, int i, const char *name) {
    char buf[128];
    if (len >= sizeof buf) return;
    memcpy(buf, entry, len), buf[len] = 0;
    char *count = strchr(buf, ':'), *sig = NULL;
    if (count) *count++ = 0, sig = strchr(count, ':');
    if (sig) *sig++ = 0;
    if (strcmp(buf, name) != 0 || ++fault_arrivals[i] != (count && *count ? atoi(count) : 1)) return;
    int s = !sig || strcmp(sig, "KILL") == 0 ? SIGKILL : strcmp(sig, "TERM") == 0 ? SIGTERM
          : strcmp(sig, "HUP") == 0 ? SIGHUP : strcmp(sig, "INT") == 0 ? SIGINT : SIGKILL;
    raise(s);
}

void fault_point(const char *name) {
    const char *spec = getenv("SFT_FAULT");
    for (int i = 0; spec && *spec && i < 8; i++) {
        const char *comma = strchr(spec, ',');
        size_t len = comma ? (size_t)(comma - spec) : strlen(spec);
        fault_entry(spec, len, i, name);
        spec = comma ? comma + 1 : NULL;
    }
}
