#!/usr/bin/env bash
# make bench: speed and memory of sft on random models with exactly Qwen2.5-0.5B's shapes.
# Models are made once by `sft init` and cached in bench-models/ (git-ignored; SFT_BENCH_MODELS
# moves it). One line per figure on stdout; all of them also in bench.json.
# THREADS (default 2) sets the thread count of every figure.
set -euo pipefail
cd "$(dirname "$0")/.."
models=${SFT_BENCH_MODELS:-bench-models}
threads=${THREADS:-2}
mkdir -p "$models"
for type in q4_0 q8_0 q4_k_m; do
    f="$models/qwen2.5-0.5b-$type.gguf"
    [ -f "$f" ] || ./sft init --config qwen2.5-0.5b --tokenizer data/tokenizer.json --type "$type" \
                          --seed 1 --out "$f" >&2
done
q4="$models/qwen2.5-0.5b-q4_0.gguf"
lines=()
emit() {  # emit NAME JSON-OBJECT
    local line="{\"figure\": \"$1\", ${2#\{}"
    echo "$line"
    lines+=("$line")
}
for type in q4_0 q4_k_m q8_0; do
    m="$models/qwen2.5-0.5b-$type.gguf"
    emit "forward_128_$type" "$(./test/bench "$m" forward 128 "$threads")"
    emit "generate_$type" "$(./test/bench "$m" generate 64 "$threads")"
done
emit forward_512_q4_0 "$(./test/bench "$q4" forward 512 "$threads")"
for T in 64 128 256 512; do
    emit "train_${T}_q4_0" "$(./test/bench "$q4" train "$T" "$threads")"
done

# The article's job: 10 chat examples of ~40 tokens, batch 1, accumulation 4, 2 epochs.
out=$(mktemp -d)
t0=$(date +%s.%N)
./sft train --model "$q4" --data data/danu.jsonl --out "$out/run" --threads "$threads" >/dev/null 2>&1
t1=$(date +%s.%N)
emit article_job "{\"seconds\": $(awk "BEGIN { printf \"%.2f\", $t1 - $t0 }")}"

# Tokenizer throughput on mixed text (the tokenizer test corpus, repeated to ~4 MB).
for i in $(seq 1 84); do cat test/tokenizer/corpus.inp test/tokenizer/random.inp; done > "$out/mixed.txt"
emit tokenizer "$(./sft tokenize --tokenizer data/tokenizer.json --file "$out/mixed.txt" --bench 2>&1 >/dev/null | tail -n 1)"
rm -rf "$out"

# Each fast kernel against its scalar reference.
./test/bench_kernels | tee "$models/kernels.txt" >&2

{ echo "["; for i in "${!lines[@]}"; do
    sep=","; [ "$i" -eq $(( ${#lines[@]} - 1 )) ] && sep=""
    echo "  ${lines[$i]}$sep"; done; echo "]"; } > bench.json
echo "wrote bench.json" >&2
