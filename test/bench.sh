#!/usr/bin/env bash
# make bench: speed and memory of sft on random models with exactly Qwen2.5-0.5B's shapes, and of
# the peers a user would run instead, side by side in the same run (a speed claim is a ratio taken
# on one machine at one time: these machines are noisy and differ from each other by 2x).
#
# Models are made once by `sft init` and cached in bench-models/ (git-ignored; SFT_BENCH_MODELS
# moves it). THREADS (default 2) sets the thread count of every figure. Peers, when present:
#   PyTorch  /usr/bin/python3 with torch, and ../shared/peers/torch_lora_bench.py (TORCH_BENCH
#            names another copy): LoRA training in bf16 autocast, the article's job
#   llama.cpp  LLAMA_BENCH=path/to/llama-bench: prompt processing (pp128) and generation (tg64)
# One JSON line per figure on stdout, then a table of ratios; everything also in bench.json.
set -euo pipefail
cd "$(dirname "$0")/.."
models=${SFT_BENCH_MODELS:-bench-models}
threads=${THREADS:-2}
torch_bench=${TORCH_BENCH:-../shared/peers/torch_lora_bench.py}
python=${TORCH_PYTHON:-/usr/bin/python3}
mkdir -p "$models"
for type in q4_0 q8_0 q4_k_m; do
    f="$models/qwen2.5-0.5b-$type.gguf"
    [ -f "$f" ] || ./sft init --config qwen2.5-0.5b --tokenizer data/tokenizer.json --type "$type" \
                          --seed 1 --out "$f" >&2
done
q4="$models/qwen2.5-0.5b-q4_0.gguf"
have_torch=0
[ -f "$torch_bench" ] && "$python" -c "import torch" 2>/dev/null && have_torch=1
have_llama=0
[ -n "${LLAMA_BENCH:-}" ] && [ -x "${LLAMA_BENCH}" ] && have_llama=1

lines=()
rows=()
notes=()
emit() {  # emit NAME JSON-OBJECT
    local line="{\"figure\": \"$1\", ${2#\{}"
    echo "$line"
    lines+=("$line")
}
field() {  # field NAME JSON: a number field of a one-line JSON object
    sed -E "s/.*\"$1\": ([-0-9.e+]+).*/\1/" <<<"$2"
}
ratio() {  # ratio FIGURE SFT PEER PEER_NAME HIGHER_IS_BETTER(1|0)
    local r
    if [ "$5" = 1 ]; then r=$(awk "BEGIN { printf \"%.2f\", $2 / $3 }"); else r=$(awk "BEGIN { printf \"%.2f\", $3 / $2 }"); fi
    rows+=("| $1 | $2 | $4 $(awk "BEGIN { printf \"%.1f\", $3 }") | ${r}x |")
    emit "ratio_$(tr ' /' '__' <<<"$1")" "{\"sft\": $2, \"peer\": $3, \"peer_name\": \"$4\", \"sft_advantage\": $r}"
}

echo "kernels: $(./sft info --kernels)" >&2
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | sed 's/^ //')" >&2

# Prompt processing and generation, each file once through sft and once through llama-bench.
for type in q4_0 q4_k_m q8_0; do
    m="$models/qwen2.5-0.5b-$type.gguf"
    pp=$(./test/bench "$m" prefill 128 "$threads"); emit "prefill_128_$type" "$pp"
    tg=$(./test/bench "$m" generate 64 "$threads"); emit "generate_$type" "$tg"
    if [ $have_llama = 1 ]; then
        csv=$("$LLAMA_BENCH" -m "$m" -p 128 -n 64 -t "$threads" -r 3 -o csv 2>/dev/null)
        lpp=$(awk -F'","' 'NR > 1 && $(NF-7) == "128" { print $(NF-1) }' <<<"$csv")
        ltg=$(awk -F'","' 'NR > 1 && $(NF-6) == "64" { print $(NF-1) }' <<<"$csv")
        emit "llama_pp128_$type" "{\"tokens_per_s\": $lpp}"
        emit "llama_tg64_$type" "{\"tokens_per_s\": $ltg}"
        ratio "prompt 128 tokens, $type (tok/s)" "$(field tokens_per_s "$pp")" "$lpp" "llama.cpp pp128" 1
        ratio "generation, $type (tok/s)" "$(field tokens_per_s "$tg")" "$ltg" "llama.cpp tg64" 1
        notes+=("prompt 128 tokens, $type: products at $(field gflop_s "$pp") GFLOP/s by sft, $(awk "BEGIN { printf \"%.1f\", \
            $(field gflop_s "$pp") / $(field tokens_per_s "$pp") * $lpp }") GFLOP/s by llama.cpp, on $threads threads")
        # the same file's weights, read once per token by both
        notes+=("generation, $type: weights read at $(field weights_gb_s "$tg") GB/s by sft, $(awk "BEGIN { printf \"%.1f\", \
            $(field weights_gb_s "$tg") / $(field tokens_per_s "$tg") * $ltg }") GB/s by llama.cpp")
    fi
done
emit forward_512_q4_0 "$(./test/bench "$q4" forward 512 "$threads")"

# Training: LoRA r=8 on all seven projections, loss on every token, AdamW. sft and PyTorch each
# run 3 times, alternately, and each gives the median of its runs: a process keeps the speed it
# starts with (sft's 2-thread runs fall into one of two modes ~20% apart on these machines, and
# PyTorch's runs vary as much), so one run of each would let two modes decide the ratio.
median3() { printf '%s\n' "$@" | sort -g | sed -n 2p; }
for T in 128 512; do
    sft_runs=() torch_runs=()
    for run in 1 2 3; do
        tr=$(./test/bench "$q4" train "$T" "$threads")
        sft_runs+=("$(field tokens_per_s "$tr")")
        if [ $have_torch = 1 ]; then
            pt=$("$python" "$torch_bench" train --dtype bf16 --seq "$T" --warmup 1 --steps 3 --threads "$threads" | tail -n 1)
            torch_runs+=("$(field tok_s_median "$pt")")
        fi
    done
    tok_s=$(median3 "${sft_runs[@]}")
    emit "train_${T}_q4_0" "{\"tokens_per_s\": $tok_s, \"peak_rss_mb\": $(field peak_rss_mb "$tr"), \"runs\": [$(IFS=,; echo "${sft_runs[*]}")]}"
    if [ $have_torch = 1 ]; then
        torch_tok_s=$(median3 "${torch_runs[@]}")
        emit "torch_bf16_train_$T" "{\"tokens_per_s\": $torch_tok_s, \"peak_rss_mb\": $(field maxrss_mib "$pt"), \"runs\": [$(IFS=,; echo "${torch_runs[*]}")]}"
        ratio "training $T tokens (tok/s)" "$tok_s" "$torch_tok_s" "PyTorch bf16" 1
        ratio "training $T tokens, peak memory (MB)" "$(field peak_rss_mb "$tr")" "$(field maxrss_mib "$pt")" "PyTorch bf16" 0
    fi
done

# The article's job: 10 chat examples of ~40 tokens, batch 1, accumulation 4, 2 epochs; sft's
# wall time includes loading the model, PyTorch's is its training loop alone. Each runs 3 times,
# alternately, and gives its median (one run of a few seconds moves by 10-15% on these machines).
# sft runs the prefix that a pass's examples share (the chat template's system prompt) once; the
# same job with every row of every example run (SFT_NO_SHARED_PREFIX=1) is timed beside it.
out=$(mktemp -d)
job_runs=() full_runs=() loop_runs=()
seconds_of() {  # seconds_of COMMAND...: its wall time
    local t0 t1
    t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N)
    awk "BEGIN { printf \"%.2f\", $t1 - $t0 }"
}
for run in 1 2 3; do
    rm -rf "$out/run" "$out/full"
    job_runs+=("$(seconds_of ./sft train --model "$q4" --data data/danu.jsonl --out "$out/run" --threads "$threads")")
    full_runs+=("$(SFT_NO_SHARED_PREFIX=1 seconds_of ./sft train --model "$q4" --data data/danu.jsonl --out "$out/full" \
                   --threads "$threads")")
    if [ $have_torch = 1 ]; then
        sj=$("$python" "$torch_bench" seedjob --dtype bf16 --threads "$threads" | tail -n 1)
        loop_runs+=("$(field loop_s "$sj")")
    fi
done
job=$(median3 "${job_runs[@]}") full=$(median3 "${full_runs[@]}")
emit article_job "{\"seconds\": $job, \"runs\": [$(IFS=,; echo "${job_runs[*]}")]}"
emit article_job_every_row "{\"seconds\": $full, \"runs\": [$(IFS=,; echo "${full_runs[*]}")]}"
if [ $have_torch = 1 ]; then
    loop=$(median3 "${loop_runs[@]}")
    emit torch_bf16_article_job "{\"seconds\": $loop, \"runs\": [$(IFS=,; echo "${loop_runs[*]}")]}"
    ratio "the article's job (s)" "$job" "$loop" "PyTorch bf16 loop" 0
    ratio "the article's job, every row run (s)" "$full" "$loop" "PyTorch bf16 loop" 0
fi

# Tokenizer throughput on mixed text (the tokenizer test corpus, repeated to ~4 MB).
for i in $(seq 1 84); do cat test/tokenizer/corpus.inp test/tokenizer/random.inp; done > "$out/mixed.txt"
emit tokenizer "$(./sft tokenize --tokenizer data/tokenizer.json --file "$out/mixed.txt" --bench 2>&1 >/dev/null | tail -n 1)"
rm -rf "$out"

# Each fast kernel against its scalar reference.
./test/bench_kernels | tee "$models/kernels.txt" >&2

{ echo "["; for i in "${!lines[@]}"; do
    sep=","; [ "$i" -eq $(( ${#lines[@]} - 1 )) ] && sep=""
    echo "  ${lines[$i]}$sep"; done; echo "]"; } > bench.json
if [ ${#rows[@]} -gt 0 ]; then
    echo
    echo "$(date +%Y-%m-%d), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $threads threads, kernels: $(./sft info --kernels)"
    echo "| figure | sft | peer, same run | sft's advantage |"
    echo "|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
    echo
    echo "The machine's ceilings (test/bench_kernels --ceilings):"
    ./test/bench_kernels --ceilings
    if [ ${#notes[@]} -gt 0 ]; then printf '%s\n' "${notes[@]}"; fi
else
    echo "no peers found: set LLAMA_BENCH, install python3-torch (see ../shared/peers/README.md)" >&2
fi
echo "wrote bench.json" >&2
