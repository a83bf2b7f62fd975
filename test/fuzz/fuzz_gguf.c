// fuzz_gguf.c: the GGUF reader and model loading on arbitrary bytes written as a .gguf file:
// gguf_open, then model_load (every check a command makes before it uses a model) and model_info.
#include "../../gguf.h"
#include "../../model.h"
#include "../../modelfile.h"
#include "fuzz.h"

static FILE *devnull;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    fuzz_init("gguf");
    devnull = fopen("/dev/null", "w");
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
    fuzz_write("m.gguf", data, n);
    const char *path = fuzz_path("m.gguf");
    GgufFile g;
    Err e;
    if (n == 0) return 0;
    int ok = gguf_open(&g, path, &e) == 0;
    if (ok) gguf_close(&g);
    Model m;
    if (ok && model_load(&m, path, -1, &e) == 0) {
        FUZZ_ASSERT(m.config.V > 0 && m.tok.n_vocab > 0 && m.tok.n_vocab <= m.config.V);
        model_free(&m);
        FUZZ_ASSERT(model_info(devnull, path, &e) == 0);
    }
    return 0;
}
