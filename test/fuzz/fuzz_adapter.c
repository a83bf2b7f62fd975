// fuzz_adapter.c: adapter loading for the tied fixture model's shapes. The first byte of the input
// picks the form of the rest: even, a PEFT directory (fuzz.h's parts: adapter_config.json, then
// adapter_model.safetensors); odd, a llama.cpp LoRA GGUF file. Both go through lora_load.
#include <math.h>

#include "../../lora.h"
#include "../../modelfile.h"
#include "fuzz.h"

static Config config;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    fuzz_init("adapter");
    Err e;
    if (model_peek("test/fixtures/tied/model", &config, &e) != 0) {
        fprintf(stderr, "%s (run from the repository root)\n", e.msg);
        exit(1);
    }
    return 0;
}

// What lora_load promises: finite values in every pair it loaded.
static void check_lora(const Lora *lora) {
    FUZZ_ASSERT(lora->R >= 1);
    for (int i = 0; i < lora->L * LORA_NTARGETS; i++) {
        const LoraPair *p = &lora->pairs[i];
        if (!p->A) continue;
        for (int k = 0; k < p->r * p->in; k++) FUZZ_ASSERT(isfinite(p->A[k]));
        for (int k = 0; k < p->out * p->r; k++) FUZZ_ASSERT(isfinite(p->B[k]));
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
    if (n == 0) return 0;
    static const char *const PEFT[] = {"adapter_config.json", "adapter_model.safetensors"};
    const char *path;
    if (data[0] % 2 == 0) {
        fuzz_write_parts(data + 1, n - 1, PEFT, 2);
        path = fuzz_dir;
    } else {
        fuzz_write("adapter.gguf", data + 1, n - 1);
        path = fuzz_path("adapter.gguf");
    }
    Lora lora;
    Err e;
    if (lora_load(&lora, path, &config, &e) == 0) {
        check_lora(&lora);
        lora_free(&lora);
    }
    return 0;
}
