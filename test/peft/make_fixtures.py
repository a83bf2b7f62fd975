#!/usr/bin/env python3
"""make_fixtures.py: PEFT's own files and results for sft's tests (test/test_peft.c), made with
the real libraries. Run by hand, never by make:

    make debug   # ./sft-debug, built with the reference kernels (-DSFT_REF): see "sft_trained" below
    /path/to/venv/bin/python test/peft/make_fixtures.py [--sft ./sft-debug]
    # then, for the one llama.cpp file (needs llama.cpp's source, not committed):
    python llama.cpp/convert_lora_to_gguf.py --base test/peft/model --outtype f32 \
        --outfile test/peft/plain.gguf test/peft/plain

Versions used (a venv with these from PyPI): torch 2.15.0 (CPU), transformers 5.25.0,
peft 0.21.2, safetensors 0.8.0, tokenizers 0.23.3, numpy; llama.cpp's convert_lora_to_gguf.py and
gguf-py from llama.cpp as vendored in llama-cpp-python 0.3.36.

It writes, under test/peft/:
  model/            a tiny random Qwen2ForCausalLM (hidden 64, 2 layers, 4 heads, 2 kv heads,
                    MLP 128, tied embeddings, rope_theta 1e6), F32, saved by transformers, with the
                    259-token byte-level tokenizer of test/fixtures
  data.jsonl        three {"text": ...} examples (sft: --loss-on all, the mean NLL of all targets)
  NAME/             an adapter saved by peft (get_peft_model(...).save_pretrained), in one variant:
                      plain     r 4, alpha 8, the seven projections
                      variants  some targets, rank_pattern and alpha_pattern
                      rslora    use_rslora, layers_to_transform [1]
                      regex     target_modules a regular expression, exclude_modules
  NAME/expected.safetensors   what transformers + peft compute in float32 with that adapter:
                    loss [1], n_targets [1], tokens.I [T] and logits.I [T, V] for example I, and
                    the gradient of loss for every LoRA tensor under its adapter name
  sft_trained/      what `sft train` (the command in SFT_TRAIN) wrote, loaded back by
                    PeftModel.from_pretrained; its expected.safetensors holds peft's loss and logits
Lora A and B are random (init_lora_weights=False, B scaled down), so every projection matters.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
from peft import LoraConfig, PeftModel, get_peft_model

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TOKENIZER_DIR = os.path.join(ROOT, "test", "fixtures", "tied", "model")
TEXTS = ["Hello, tiny model!", "LoRA on a CPU, in C.", "2 + 2 = 4; 3 * 3 = 9"]
SFT_TRAIN = ["train", "--model", "test/peft/model", "--data", "test/peft/data.jsonl", "--quant", "f32", "--loss-on", "all",
             "--rank", "4", "--alpha", "8", "--max-steps", "3", "--lr", "1e-2", "--batch", "1", "--grad-accum", "1",
             "--seed", "7", "--threads", "1"]
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=SEVEN),
    "variants": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
                     rank_pattern={"v_proj": 4, "model.layers.1.mlp.down_proj": 2}, alpha_pattern={"o_proj": 4}),
    "rslora": dict(r=8, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "up_proj"], layers_to_transform=[1]),
    "regex": dict(r=4, lora_alpha=16, target_modules=r".*\.(self_attn\.(q|k)_proj|mlp\.up_proj)",
                  exclude_modules=["model.layers.0.self_attn.k_proj"]),
}


def make_model(out):
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=264, max_position_embeddings=256, rope_theta=1e6,
                      rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=256, eos_token_id=258)
    model = Qwen2ForCausalLM(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_((0.05 if name.endswith("bias") else 0.08) * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER_DIR, f), out)
    return model


def examples(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    return [torch.tensor(tok(t)["input_ids"]) for t in TEXTS]


def run(model, ids_list, grads):
    """Mean NLL over every target of every example (sft --loss-on all), logits, LoRA gradients."""
    model.zero_grad()
    total, n, logits = 0.0, 0, []
    for ids in ids_list:
        out = model(input_ids=ids[None]).logits[0].float()
        logits.append(out.detach())
        total = total + torch.nn.functional.cross_entropy(out[:-1], ids[1:], reduction="sum")
        n += len(ids) - 1
    loss = total / n
    result = {"loss": loss.detach().reshape(1), "n_targets": torch.tensor([float(n)])}
    for i, (ids, lg) in enumerate(zip(ids_list, logits)):
        result[f"tokens.{i}"] = ids.float()
        result[f"logits.{i}"] = lg.contiguous()
    if grads:
        loss.backward()
        for name, p in model.named_parameters():
            if "lora_" in name:
                result[name.replace(".default", "")] = p.grad.detach().clone()
    return result


def make_adapter(base_dir, name, kw, ids_list):
    base = Qwen2ForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.05, init_lora_weights=False, **kw))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.mul_(0.2)
    out = os.path.join("test", "peft", name)
    model.save_pretrained(out)
    os.remove(os.path.join(out, "README.md"))  # peft's model card template
    model.eval()  # dropout off; the LoRA tensors still require gradients
    save_file(run(model, ids_list, grads=True), os.path.join(out, "expected.safetensors"), metadata={"format": "pt"})


def sft_trained(base_dir, sft, ids_list):
    out = os.path.join("test", "peft", "sft_trained")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sft] + SFT_TRAIN + ["--out", os.path.join(tmp, "o")], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        os.makedirs(out, exist_ok=True)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(os.path.join(tmp, "o", f), out)
    base = Qwen2ForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out)
    model.eval()
    with torch.no_grad():
        save_file(run(model, ids_list, grads=False), os.path.join(out, "expected.safetensors"), metadata={"format": "pt"})


def main():
    os.chdir(ROOT)  # paths relative to the repository: base_model_name_or_path is "test/peft/model"
    ap = argparse.ArgumentParser()
    ap.add_argument("--sft", default=os.path.join(ROOT, "sft-debug"), help="an sft built with -DSFT_REF (make debug)")
    args = ap.parse_args()
    base_dir = os.path.join("test", "peft", "model")
    make_model(base_dir)
    with open(os.path.join("test", "peft", "data.jsonl"), "w") as f:
        for t in TEXTS:
            f.write(json.dumps({"text": t}) + "\n")
    ids_list = examples(base_dir)
    for name, kw in VARIANTS.items():
        make_adapter(base_dir, name, kw, ids_list)
    sft_trained(base_dir, args.sft, ids_list)
    print("wrote", HERE, file=sys.stderr)


if __name__ == "__main__":
    main()
