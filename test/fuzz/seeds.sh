#!/usr/bin/env bash
# test/fuzz/seeds.sh: writes the seed corpora test/fuzz/corpus/NAME/ from the fixtures and from a
# micro model that ./sft makes (1 layer, hidden 32, the tied fixture's 259-token tokenizer), in
# fuzz.h's layout (a first byte that picks the mode; files separated by FUZZ_SEP). Run it from the
# repository root after `make`; the corpora are committed, so only changes to the harnesses need it.
# Needs python3 for the sharded safetensors seed.
set -euo pipefail
c=test/fuzz/corpus tmp=test/tmp/fuzz-seeds sep=$'\n--8<--\n'
rm -rf "$c" "$tmp" && mkdir -p "$c"/{json,gguf,safetensors,tokenizer,data,adapter} "$tmp"
tok=test/fixtures/tied/model
cat >"$tmp/config.json" <<'JSON'
{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
 "num_key_value_heads": 1, "intermediate_size": 32, "vocab_size": 264, "max_position_embeddings": 256,
 "rope_theta": 10000.0, "rms_norm_eps": 1e-06, "tie_word_embeddings": true}
JSON
./sft init --config "$tmp/config.json" --tokenizer $tok --type f16 --out "$tmp/micro.gguf" --seed 1 2>/dev/null
./sft init --config "$tmp/config.json" --tokenizer $tok --type q8_0 --out "$tmp/micro_q8.gguf" --seed 2 2>/dev/null
printf '{"prompt": "ab", "completion": "cd"}\n' >"$tmp/d.jsonl"
./sft train --model "$tmp/micro.gguf" --data "$tmp/d.jsonl" --out "$tmp/adapter" --rank 2 --targets q_proj,down_proj \
    --max-steps 1 --quant f32 >/dev/null 2>&1
./sft merge --model "$tmp/micro.gguf" --lora "$tmp/adapter" --out "$tmp/hf/" --dtype bf16 >/dev/null 2>&1
./sft export --model $tok --lora test/fixtures/tied/adapter --out "$tmp/adapter.gguf" >/dev/null 2>&1

# json: the files sft reads, small.
cp $tok/tokenizer.json "$c/json/tokenizer.json"
cp "$tmp/config.json" "$c/json/config.json"
cp "$tmp/adapter/adapter_config.json" "$c/json/adapter_config.json"
head -1 data/danu.jsonl >"$c/json/line.json"
printf '{"a": [1, -2.5e-3, true, false, null, {}], "\\u00e9\\ud83d\\ude00": "x\\n\\"\\\\\\/"}' >"$c/json/escapes.json"
# gguf: models of two types.
cp "$tmp/micro.gguf" "$tmp/micro_q8.gguf" "$c/gguf/"
# safetensors: config.json | model.safetensors | index | shard 1 | shard 2 (fuzz_safetensors.c).
{ cat "$tmp/hf/config.json"; printf %s "$sep"; cat "$tmp/hf/model.safetensors"; } >"$c/safetensors/single"
python3 - "$tmp/hf" "$tmp/shards" <<'PY'
import json, struct, sys, os
src, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
raw = open(os.path.join(src, "model.safetensors"), "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
names = [k for k in header if k != "__metadata__"]
halves = [names[: len(names) // 2], names[len(names) // 2:]]
index = {"metadata": {"total_size": len(data)}, "weight_map": {}}
for i, part in enumerate(halves):
    fname = "model-%05d-of-00002.safetensors" % (i + 1)
    h, blob = {}, b""
    for k in part:
        b, e = header[k]["data_offsets"]
        h[k] = dict(header[k], data_offsets=[len(blob), len(blob) + e - b])
        blob += data[b:e]
        index["weight_map"][k] = fname
    hb = json.dumps(h, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    open(os.path.join(out, fname), "wb").write(struct.pack("<Q", len(hb)) + hb + blob)
open(os.path.join(out, "index.json"), "w").write(json.dumps(index))
PY
{ cat "$tmp/hf/config.json"; printf %s "$sep$sep"; cat "$tmp/shards/index.json"; printf %s "$sep"
  cat "$tmp/shards/model-00001-of-00002.safetensors"; printf %s "$sep"; cat "$tmp/shards/model-00002-of-00002.safetensors"; } \
    >"$c/safetensors/sharded"
# tokenizer: 0 + text, 1 + ids, 2 + tokenizer.json.
printf '\000Hello, world! <|im_start|>user\n日本の首都は？<|im_end|>\n  \t123 ééé 😀' >"$c/tokenizer/text"
head -c 600 test/tokenizer/random.inp | { printf '\000'; cat; } >"$c/tokenizer/random"
printf '\001\000\000\000\000\377\377\377\377\154\117\002\000\155\117\002\000\040\000\000\000' >"$c/tokenizer/ids"
{ printf '\002'; cat $tok/tokenizer.json; } >"$c/tokenizer/tokenizer_json"
# data: first byte 0x00 (assistant, 1024), 0x40 (all), 0x85 (assistant, max-len 7).
{ printf '\000'; cat data/danu.jsonl; } >"$c/data/danu"
{ printf '\100'; cat test/data/tricky.jsonl; } >"$c/data/tricky"
{ printf '\205'; cat test/data/crlf.jsonl; } >"$c/data/crlf"
{ printf '\000'; cat test/data/good.jsonl; } >"$c/data/good"
# adapter: 0 + adapter_config.json | adapter_model.safetensors, 1 + a GGUF adapter (the tied
# fixture's adapter: fuzz_adapter.c loads for the tied fixture model's shapes).
{ printf '\000'; cat test/fixtures/tied/adapter/adapter_config.json; printf %s "$sep"; cat test/fixtures/tied/adapter/adapter_model.safetensors; } >"$c/adapter/peft"
{ printf '\001'; cat "$tmp/adapter.gguf"; } >"$c/adapter/gguf"
rm -rf "$tmp"
du -sh "$c"/*
