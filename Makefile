# sft: LoRA fine-tuning of Qwen2.5 on a CPU, in plain C.
#   make            build ./sft (optimized for this CPU)
#   make debug      ./sft-debug: -O0 -g3, reference kernels (step through it in gdb / VSCode);
#                   its test runner is build/debug/test/run. ./sft and test/run are left alone
#   make test       unit tests, reference comparisons and command-line tests
#   make test-asan  the same under AddressSanitizer + UndefinedBehaviorSanitizer
#   make test-ref   the same with the scalar reference kernels (strict float64 checks on Q4_0/Q8_0)
#   make test BUILD=build/v3/ OPT="-O2 -march=x86-64-v3"
#                   the suite built with other flags in build/v3/, ./sft untouched; .ci/run tests each
#                   instruction-set level so, arm64 under qemu with CC=aarch64-linux-gnu-gcc EXEC=qemu-aarch64
#   make bench      speed and memory figures on models of Qwen2.5-0.5B's shapes (bench.json)
#   make demo       teach a small model to answer in the "だぬ" style
#   make demo-model only the demo's small random model, demo-out/model.gguf (VSCode debugs on it)
#   make fuzz       libFuzzer harnesses (test/fuzz/, clang) FUZZ_SECONDS each (60) on their seed corpora
CC     ?= cc
# x86-64: the CPU's own instruction set (AVX2, AVX-512); arm64: NEON is always there.
ifeq ($(shell uname -m),x86_64)
ARCH   ?= -march=native
endif
OPT    ?= -O2 $(ARCH)
CFLAGS += -std=c11 -Wall -Wextra -D_POSIX_C_SOURCE=200809L -D_DARWIN_C_SOURCE -pthread
LDLIBS  = -lm -pthread
LIB     = $(filter-out sft.c,$(wildcard *.c)) $(wildcard kernels/*.c)
HDR     = $(wildcard *.h) $(wildcard kernels/*.h)
TESTS   = $(filter-out test/bench%.c,$(wildcard test/*.c))
# BUILD: where sft and test/run are built (empty: here); EXEC: the command that runs them (e.g. qemu-aarch64).
BUILD  ?=
EXEC   ?=

$(BUILD)sft: sft.c $(LIB) $(HDR)
	@mkdir -p $(@D)
	$(CC) $(OPT) $(CFLAGS) -o $@ sft.c $(LIB) $(LDLIBS)

$(BUILD)test/run: $(BUILD)sft $(TESTS) test/test.h
	@mkdir -p $(@D)
	$(CC) $(OPT) $(CFLAGS) -o $@ $(TESTS) $(LIB) $(LDLIBS)

# A build of its own in build/debug/, so that make never mistakes it for the optimized ./sft.
debug:
	$(MAKE) build/debug/test/run BUILD=build/debug/ OPT="-O0 -g3 -DSFT_REF"
	cp build/debug/sft sft-debug

test: $(BUILD)test/run
	SFT="$(strip $(EXEC) ./$(BUILD)sft)" $(EXEC) ./$(BUILD)test/run

test-asan:
	ASAN_OPTIONS=detect_leaks=1 $(MAKE) -B test BUILD=build/asan/ \
	    OPT="-O1 -g $(ARCH) $(ASAN_EXTRA) -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"

test/bench test/bench_kernels: sft test/bench.c test/bench_kernels.c
	$(CC) $(OPT) $(CFLAGS) -o test/bench test/bench.c $(LIB) $(LDLIBS)
	$(CC) $(OPT) $(CFLAGS) -o test/bench_kernels test/bench_kernels.c $(LIB) $(LDLIBS)

test-ref:
	$(MAKE) -B test BUILD=build/ref/ OPT="-O2 -DSFT_REF"

bench: sft test/bench test/bench_kernels
	./test/bench.sh

demo: sft
	./test/demo.sh

demo-model: demo-out/model.gguf

# An embedding std of 0.5 (not 0.02): with tied embeddings, a random model needs that much output
# range before any adapter can make one token of 151,936 likely.
demo-out/model.gguf: sft test/demo_config.json data/tokenizer.json
	@mkdir -p $(@D)
	./sft init --config test/demo_config.json --tokenizer data/tokenizer.json --type q4_0 --seed 1 \
	    --embed-std 0.5 --out $@

# Fuzzing: the library (LIB) built once with the sanitizers and libFuzzer's coverage, then one
# binary per test/fuzz/fuzz_NAME.c in build/fuzz/; test/fuzz/run.sh runs each and prints its line.
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 60
FUZZ_FLAGS    = -O1 -g $(ARCH) -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
FUZZ          = $(patsubst test/fuzz/fuzz_%.c,%,$(wildcard test/fuzz/fuzz_*.c))
FUZZ_OBJ      = $(patsubst %.c,build/fuzz/obj/%.o,$(LIB))

build/fuzz/obj/%.o: %.c $(HDR)
	@mkdir -p $(@D)
	$(FUZZ_CC) $(FUZZ_FLAGS) -fsanitize=fuzzer-no-link $(CFLAGS) -c -o $@ $<

build/fuzz/%: test/fuzz/fuzz_%.c test/fuzz/fuzz.h $(FUZZ_OBJ)
	$(FUZZ_CC) $(FUZZ_FLAGS) -fsanitize=fuzzer $(CFLAGS) -o $@ $< $(FUZZ_OBJ) $(LDLIBS)

.SECONDARY: $(FUZZ_OBJ)

fuzz: $(addprefix build/fuzz/,$(FUZZ))
	./test/fuzz/run.sh $(FUZZ_SECONDS) build/fuzz $(FUZZ)

clean:
	rm -rf sft sft-debug test/run test/bench test/bench_kernels test/tmp bench.json build

.PHONY: debug test test-asan test-ref bench demo demo-model fuzz clean
