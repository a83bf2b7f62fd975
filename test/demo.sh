#!/bin/sh
# test/demo.sh (make demo): the whole pipeline in about a minute on two cores.
#
# Makes a small random Qwen2 model (hidden 128, 4 layers, the real Qwen2.5 tokenizer and its
# 151,936-row tied embedding, 4-bit weights), asks it the ten questions of data/danu.jsonl,
# fine-tunes a LoRA adapter on them with `sft train` (the article's settings, with more epochs
# and a larger learning rate), and asks again: every answer now ends in "だぬ".
# A random model knows no Japanese: it memorizes the answers and picks up the style, which also
# shows on questions it never saw. Everything goes to demo-out/ (git-ignored).
set -eu
cd "$(dirname "$0")/.."
SFT=./sft
OUT=demo-out
START=$(date +%s)
[ -x "$SFT" ] || make sft
mkdir -p "$OUT"

# JSONL {"prompt": P, "response": R} lines as "  P  ->  R".
show() { sed -E 's/^\{"prompt": "(.*)", "response": "(.*)"\}$/    \1  ->  \2/'; }

echo "== 1. a small random model with the Qwen2.5 tokenizer: $OUT/model.gguf (make demo-model)"
# test/demo_config.json: hidden 128, 4 layers, Qwen2.5's vocabulary; the Makefile says why its
# embedding std is 0.5. Made again only when sft or the config changed (the same bytes anyway).
make -s demo-model

echo
echo "== 2. before training: greedy answers to the training questions"
"$SFT" generate --model "$OUT/model.gguf" --data data/danu.jsonl --temp 0 --max-new 12 | head -n 4 | show

echo
echo "== 3. sft train: rank 8, alpha 16, dropout 0.05, batch 1 x accumulation 4 (the article's),"
echo "      but 120 epochs instead of 2 and lr 3e-3 instead of 2e-4"
rm -rf "$OUT/danu-lora"
TRAIN="$SFT train --model $OUT/model.gguf --data data/danu.jsonl --out $OUT/danu-lora --epochs 120 --lr 3e-3
       --eval-data data/danu_eval.jsonl --eval-every 120"
if [ -t 1 ]; then
    $TRAIN
else
    $TRAIN 2>&1 | awk '/^step/ { n++ } !/^step/ || n % 40 == 0'
fi
echo "   the loss curve: $OUT/danu-lora/loss.svg, the log: $OUT/danu-lora/train_log.jsonl"
echo "   (the eval loss, on questions it never saw, rises: a random model memorizes, it cannot know facts)"

echo
echo "== 4. after training: the same questions"
"$SFT" generate --model "$OUT/model.gguf" --lora "$OUT/danu-lora" --data data/danu.jsonl --temp 0 \
    --max-new 32 > "$OUT/after.jsonl"
show < "$OUT/after.jsonl"
TOTAL=$(wc -l < "$OUT/after.jsonl")
GOOD=$(grep -c 'だぬ[。！]*"}$' "$OUT/after.jsonl" || true)

echo
echo "== 5. questions it never saw (data/danu_eval.jsonl): the style carries over, the facts cannot"
"$SFT" generate --model "$OUT/model.gguf" --lora "$OUT/danu-lora" --data data/danu_eval.jsonl --temp 0 \
    --max-new 32 | head -n 5 | show

echo
echo "$GOOD of $TOTAL answers end in だぬ; the demo took $(( $(date +%s) - START )) s"
[ "$GOOD" -eq "$TOTAL" ] || { echo "demo: the adapter did not learn the style" >&2; exit 1; }
