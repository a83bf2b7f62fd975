// test.h: the test runner's few checks. Each check prints "name ... ok" or "name ... FAIL" with
// the first mismatches and the max error; main() in test/test.c ends with "N passed, N failed".
#ifndef TEST_H
#define TEST_H

#include <stddef.h>

// Records one check. On failure prints the formatted reason.
void check(int ok, const char *name, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

// Compares n floats: passes when |got - want| <= atol + rtol * |want| for every element.
// On failure prints the first 5 mismatches and the max absolute error. Returns 1 when it passed.
int check_close(const char *name, const float *got, const float *want, size_t n, double atol, double rtol);

// Relative error of a whole tensor: ||got - want|| / max(||want||, 1e-30), in float64.
double rel_norm_error(const float *got, const float *want, size_t n);

// Path of the sft binary under test ("./sft", or $SFT: another build, e.g. "./build/asan/sft", or a
// command that runs one, e.g. "qemu-aarch64 ./build/arm64/sft"). Tests paste it unquoted into shell commands.
const char *sft_binary(void);

// Runs a shell command, returns its exit status; its stdout is captured into *out (malloc'ed,
// may be NULL) when out is not NULL. stderr goes to test/tmp/last_stderr.txt.
int run_command(const char *cmd, char **out);

// run_command for a command formatted printf-style, its stderr into the file err_path (each suite
// its own: suites may run at the same time).
int run_commandf(char **out, const char *err_path, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

// A scratch directory (test/tmp/NAME, emptied first) for files a test writes; returns its path.
const char *scratch_dir(const char *name);

// The test suites, one per file test/test_*.c.
void test_common(void);
void test_json(void);
void test_quant(void);
void test_files(void);
void test_tokenizer(void);
void test_data(void);
void test_model(void);
void test_lora(void);
void test_optim(void);
void test_cli(void);
void test_peft(void);
void test_docs(void);

#endif
