// fuzz_safetensors.c: the safetensors reader, sharded directories and config.json. The input is a
// Hugging Face model directory (fuzz.h's parts, in the order of FILES; tokenizer.json is the
// tied fixture's): safetensors_open on model.safetensors, safetensors_open_dir, then model_load.
#include "../../model.h"
#include "../../quant.h"
#include "../../safetensors.h"
#include "fuzz.h"

static const char *const FILES[] = {"config.json", "model.safetensors", "model.safetensors.index.json",
                                    "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"};
enum { N_FILES = sizeof FILES / sizeof FILES[0] };

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    fuzz_init("safetensors");
    char tok[1024];
    if (!getcwd(tok, 900)) return perror("getcwd"), 1;
    strcat(tok, "/test/fixtures/tied/model/tokenizer.json");
    if (access(tok, R_OK) != 0 || symlink(tok, fuzz_path("tokenizer.json")) != 0) {
        perror("test/fixtures/tied/model/tokenizer.json (run from the repository root)");
        exit(1);
    }
    snprintf(fuzz_names[fuzz_n_names++], 64, "tokenizer.json");
    return 0;
}

// Every tensor of an open file lies inside the mapping, in offset order, with its byte count.
static void check_file(const StFile *f) {
    for (int i = 0; i < f->n; i++) {
        const StTensor *t = &f->tensors[i];
        const unsigned char *p = t->data;
        FUZZ_ASSERT(p >= f->map.data && p + t->nbytes <= f->map.data + f->map.size);
        FUZZ_ASSERT(safetensors_find(f, t->name) == t);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
    fuzz_write_parts(data, n, FILES, N_FILES);
    StFile f;
    Err e;
    if (safetensors_open(&f, fuzz_path("model.safetensors"), &e) == 0) {
        check_file(&f);
        safetensors_close(&f);
    }
    StModel s;
    if (safetensors_open_dir(&s, fuzz_dir, &e) == 0) {
        for (int i = 0; i < s.n_files; i++) check_file(&s.files[i]);
        safetensors_close_dir(&s);
    }
    Model m;
    if (model_load(&m, fuzz_dir, TYPE_F32, &e) == 0) model_free(&m);
    return 0;
}
