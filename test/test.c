// test.c: the test runner. `make test` runs every suite; `test/run NAME...` runs only some.
// It prints one line per check and ends with "N passed, N failed"; it exits 1 on any failure.
#include "test.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>

// The one mutable global of the tests: the tally printed at the end.
static int n_passed, n_failed;

void check(int ok, const char *name, const char *fmt, ...) {
    if (ok) {
        n_passed++;
        printf("%s ... ok\n", name);
        return;
    }
    n_failed++;
    printf("%s ... FAIL: ", name);
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
}

int check_close(const char *name, const float *got, const float *want, size_t n, double atol, double rtol) {
    double max_err = 0;
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        double err = fabs((double)got[i] - (double)want[i]);
        if (!(err <= max_err)) max_err = err;  // also catches NaN
        if (!(err <= atol + rtol * fabs((double)want[i]))) bad++;
    }
    if (bad == 0) {
        n_passed++;
        printf("%s ... ok (max err %.3g)\n", name, max_err);
        return 1;
    }
    n_failed++;
    printf("%s ... FAIL: %zu of %zu differ (atol %g, rtol %g), max err %.6g\n", name, bad, n, atol, rtol, max_err);
    int shown = 0;
    for (size_t i = 0; i < n && shown < 5; i++) {
        double err = fabs((double)got[i] - (double)want[i]);
        if (!(err <= atol + rtol * fabs((double)want[i]))) {
            printf("    [%zu] got %.9g want %.9g\n", i, got[i], want[i]);
            shown++;
        }
    }
    return 0;
}

double rel_norm_error(const float *got, const float *want, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)got[i] - (double)want[i];
        num += d * d;
        den += (double)want[i] * (double)want[i];
    }
    return sqrt(num) / (sqrt(den) > 1e-30 ? sqrt(den) : 1e-30);
}

const char *sft_binary(void) {
    const char *s = getenv("SFT");
    return s && *s ? s : "./sft";
}

int run_command(const char *cmd, char **out) {
    char full[8192];
    snprintf(full, sizeof full, "( %s ) 2>test/tmp/last_stderr.txt", cmd);
    FILE *p = popen(full, "r");
    if (!p) return -1;
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    size_t got;
    while ((got = fread(buf + n, 1, cap - n - 1, p)) > 0) {
        n += got;
        if (n + 1 == cap) buf = realloc(buf, cap *= 2);
    }
    buf[n] = 0;
    int status = pclose(p);
    if (out) *out = buf; else free(buf);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

int run_commandf(char **out, const char *err_path, const char *fmt, ...) {
    char cmd[4096], full[4400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    snprintf(full, sizeof full, "( %s ) 2>%s", cmd, err_path);
    return run_command(full, out);
}

const char *scratch_dir(const char *name) {
    static char path[512];  // valid until the next call
    char cmd[1100];
    snprintf(path, sizeof path, "test/tmp/%s", name);
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s'", path, path);
    if (system(cmd) != 0) fprintf(stderr, "cannot make %s\n", path);
    return path;
}

typedef struct {
    const char *name;
    void (*run)(void);
} Suite;

int main(int argc, char **argv) {
    const Suite suites[] = {
        {"common", test_common}, {"json", test_json}, {"quant", test_quant},
        {"files", test_files}, {"tokenizer", test_tokenizer}, {"data", test_data},
        {"model", test_model}, {"lora", test_lora}, {"optim", test_optim}, {"cli", test_cli}, {"peft", test_peft},
        {"docs", test_docs},
    };
    mkdir("test/tmp", 0755);
    for (size_t i = 0; i < sizeof suites / sizeof suites[0]; i++) {
        int wanted = argc < 2;
        for (int a = 1; a < argc; a++) wanted |= strcmp(argv[a], suites[i].name) == 0;
        if (!wanted) continue;
        printf("== %s\n", suites[i].name);
        fflush(stdout);
        suites[i].run();
        fflush(stdout);
    }
    printf("%d passed, %d failed\n", n_passed, n_failed);
    return n_failed ? 1 : 0;
}
