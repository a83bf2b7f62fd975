// fuzz.h: what the libFuzzer harnesses of test/fuzz/ share: a scratch directory per process
// (under $TMPDIR when set, else test/tmp), files written there from the input's bytes and removed
// at exit, and the split of one input into the files of a directory layout.
//
// An input that stands for several files holds them one after another, separated by FUZZ_SEP;
// an empty part means "no such file". test/fuzz/seeds.sh writes the seed corpora this way.
// Each harness is one file, fuzz_NAME.c, built by `make fuzz` with the library (Makefile's LIB).
#ifndef FUZZ_H
#define FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define FUZZ_SEP "\n--8<--\n"
#define FUZZ_MAX_FILES 16

// The scratch directory and the names written into it, removed at exit. (Mutable statics: a
// harness is one process that libFuzzer calls over and over; this, and what a harness loads once
// in LLVMFuzzerInitialize (a tokenizer, a config), is the state it keeps between calls.)
static char fuzz_dir[512];
static char fuzz_names[FUZZ_MAX_FILES][64];
static int fuzz_n_names;

static inline void fuzz_cleanup(void) {
    char path[600];
    for (int i = 0; i < fuzz_n_names; i++) {
        snprintf(path, sizeof path, "%s/%s", fuzz_dir, fuzz_names[i]);
        unlink(path);
    }
    rmdir(fuzz_dir);
}

// Makes the scratch directory ($TMPDIR or test/tmp)/fuzz-NAME-PID; exits when it cannot.
static inline void fuzz_init(const char *name) {
    const char *tmp = getenv("TMPDIR");
    if (!tmp || !*tmp) {
        mkdir("test", 0755);
        mkdir("test/tmp", 0755);
        tmp = "test/tmp";
    }
    snprintf(fuzz_dir, sizeof fuzz_dir, "%s/fuzz-%s-%ld", tmp, name, (long)getpid());
    if (mkdir(fuzz_dir, 0755) != 0) {
        perror(fuzz_dir);
        exit(1);
    }
    atexit(fuzz_cleanup);
}

// fuzz_dir/NAME, in one of 8 static buffers used in turn.
static inline const char *fuzz_path(const char *name) {
    static char buf[8][600];
    static int k;
    k = (k + 1) % 8;
    snprintf(buf[k], sizeof buf[k], "%s/%s", fuzz_dir, name);
    return buf[k];
}

// Writes data[0..n) into fuzz_dir/NAME (remembered for the cleanup); n == 0 removes the file
// instead, so that an empty part stands for a missing file.
static inline void fuzz_write(const char *name, const void *data, size_t n) {
    int known = 0;
    for (int i = 0; i < fuzz_n_names; i++) known |= strcmp(fuzz_names[i], name) == 0;
    if (!known && fuzz_n_names < FUZZ_MAX_FILES) snprintf(fuzz_names[fuzz_n_names++], 64, "%s", name);
    const char *path = fuzz_path(name);
    if (n == 0) {
        unlink(path);
        return;
    }
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, n, f) != n || fclose(f) != 0) {
        perror(path);
        abort();
    }
}

// Splits data[0..n) at each FUZZ_SEP into at most max parts; returns their number.
static inline int fuzz_split(const uint8_t *data, size_t n, const uint8_t **parts, size_t *lens, int max) {
    size_t sep = sizeof FUZZ_SEP - 1, start = 0;
    int k = 0;
    for (size_t i = 0; k < max - 1 && i + sep <= n; i++) {
        if (memcmp(data + i, FUZZ_SEP, sep) != 0) continue;
        parts[k] = data + start, lens[k++] = i - start;
        start = i + sep;
        i = start - 1;
    }
    parts[k] = data + start, lens[k++] = n - start;
    return k;
}

// Writes the parts of data into the files names[0..count) (missing parts: no file).
static inline void fuzz_write_parts(const uint8_t *data, size_t n, const char *const *names, int count) {
    const uint8_t *parts[FUZZ_MAX_FILES];
    size_t lens[FUZZ_MAX_FILES];
    int k = fuzz_split(data, n, parts, lens, count);
    for (int i = 0; i < count; i++) fuzz_write(names[i], i < k ? parts[i] : NULL, i < k ? lens[i] : 0);
}

// A check that must hold whatever the input: a failure is a bug, reported as a crash.
#define FUZZ_ASSERT(cond)                                                              \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            fprintf(stderr, "%s:%d: FUZZ_ASSERT(%s) failed\n", __FILE__, __LINE__, #cond); \
            abort();                                                                   \
        }                                                                              \
    } while (0)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n);

#endif
