#!/usr/bin/env python3
"""reference.py: the float64 PyTorch reference for sft's forward and backward passes.

It builds two tiny random Qwen2 models (grouped-query attention; one with tied embeddings, one
without), each with a LoRA adapter whose A and B are non-zero on all seven projections, and writes
for each, under test/fixtures/:
    NAME/model/       a Hugging Face model directory: config.json, model.safetensors (F32),
                      tokenizer.json (256 byte tokens + 3 special tokens, no merges), tokenizer_config.json
    NAME/adapter/     adapter_config.json + adapter_model.safetensors, as PEFT writes them
    NAME/expected_{f32,q8_0,q4_0}.safetensors   what sft must compute (below)
and one data file, data.jsonl (chat examples, multi-turn included).

Expected values (all F32 tensors): ex{i}.tokens / ex{i}.mask (token ids and assistant-loss masks),
loss (mean NLL over all targets of all examples, with the adapter), loss_all (--loss-on all),
loss_base (without the adapter), n_targets, logits [P, V] at positions logits_pos [P] of example 0,
and the gradient of `loss` with respect to every LoRA tensor, under the adapter's tensor names.
The q8_0 / q4_0 files hold the same computed on the weights after ggml's reference quantizers
(quantize_row_q8_0_ref / quantize_row_q4_0_ref) and dequantization: every matrix (the seven
projections, the embedding and lm_head) is quantized; norms and biases stay F32.

The model is Hugging Face's Qwen2ForCausalLM written out in a page of torch, in float64, with
autograd for the gradients; nothing here is shared with the C code. Like llm.c's train_gpt2.py it
is run by hand, never by make:  /usr/bin/python3 test/reference.py   (needs torch and numpy).
"""
import json
import math
import os
import struct
import subprocess
import unicodedata

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "fixtures")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# -----------------------------------------------------------------------------------------------
# Files: safetensors and the tiny byte-level tokenizer


def bf16_round(a):
    """float32 array -> the nearest bf16 values (round to nearest even), as float32."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32)


def write_safetensors(path, tensors, dtype="F32"):
    """tensors: {name: np.ndarray}, written as F32 (or BF16: values already bf16) in the given order
    (with PEFT's metadata)."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, arr in tensors.items():
        f32 = np.ascontiguousarray(arr, dtype="<f4")
        data = f32.tobytes() if dtype == "F32" else (f32.view("<u4") >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def bytes_to_unicode():
    """GPT-2's byte -> printable character map; its order is the order of Qwen2's first 256 ids."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return bs, [chr(c) for c in cs]


BYTE_ORDER, BYTE_CHARS = bytes_to_unicode()
BYTE_ID = {b: i for i, b in enumerate(BYTE_ORDER)}        # byte value -> token id
SPECIAL_ID = {s: 256 + i for i, s in enumerate(SPECIALS)}  # 256, 257, 258


def tokenizer_json():
    real_pre = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    bl = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    added = [{"id": SPECIAL_ID[s], "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for s in SPECIALS]
    vocab = {c: i for i, c in enumerate(BYTE_CHARS)}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": {"type": "NFC"}, "pre_tokenizer": real_pre, "post_processor": bl, "decoder": bl,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": vocab, "merges": []}}


def encode_plain(text):
    """Text without special tokens -> ids: with no merges, byte-level BPE gives one id per byte."""
    return [BYTE_ID[b] for b in unicodedata.normalize("NFC", text).encode("utf-8")]


def render_and_mask(example):
    """One JSONL example -> (ids, mask) with the Qwen2.5 chat template; mask[t] = 1 on the tokens of
    each assistant message's content and on the <|im_end|> that closes it."""
    if "prompt" in example:
        msgs = [{"role": "user", "content": example["prompt"]}, {"role": "assistant", "content": example["completion"]}]
    else:
        msgs = example["messages"]
    if msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": DEFAULT_SYSTEM}] + msgs
    ids, mask = [], []

    def put(tokens, m):
        ids.extend(tokens)
        mask.extend([m] * len(tokens))

    for msg in msgs:
        a = msg["role"] == "assistant"
        put([SPECIAL_ID["<|im_start|>"]], 0)
        put(encode_plain(msg["role"] + "\n"), 0)
        put(encode_plain(msg["content"]), int(a))
        put([SPECIAL_ID["<|im_end|>"]], int(a))
        put(encode_plain("\n"), 0)
    mask[0] = 0
    return ids, mask


DATA = [
    {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
                  {"role": "assistant", "content": "6, of course."}]},
    {"prompt": "Say yes.", "completion": "Yes."},
]

# -----------------------------------------------------------------------------------------------
# ggml's reference quantizers, in float32 arithmetic exactly as the C code runs them


def fp16_round(x):
    return np.float32(np.float16(x))  # round to nearest even, as GGML_FP32_TO_FP16


def q8_0_dequant(w):
    w = w.astype(np.float32).reshape(-1, 32)
    out = np.empty_like(w)
    for i, x in enumerate(w):
        amax = np.float32(np.max(np.abs(x)))
        d = np.float32(amax / np.float32(127))
        idv = np.float32(1) / d if d != 0 else np.float32(0)
        q = np.array([math.copysign(math.floor(abs(float(v)) + 0.5), float(v)) for v in (x * idv).astype(np.float32)],
                     dtype=np.float32)  # roundf: half away from zero
        out[i] = q * fp16_round(d)
    return out.reshape(-1)


def q4_0_dequant(w):
    w = w.astype(np.float32).reshape(-1, 32)
    out = np.empty_like(w)
    for i, x in enumerate(w):
        j = int(np.argmax(np.abs(x)))            # the first element of largest magnitude
        mx = x[j]
        d = np.float32(mx / np.float32(-8))
        idv = np.float32(1) / d if d != 0 else np.float32(0)
        v = (x * idv).astype(np.float32) + np.float32(8.5)
        q = np.minimum(15, np.trunc(v.astype(np.float32))).astype(np.float32)  # (int8_t) truncates
        out[i] = (q - 8) * fp16_round(d)
    return out.reshape(-1)


NF4_CODE = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                     0.7229568362236023, 1.0], dtype=np.float32)


def nf4_dequant(w):
    """bitsandbytes' NF4 with blocks of 64: absmax per block, each value to the nearest code (the
    first of two at a midpoint: x > mid moves up), in float32 as sft's quantize_nf4 runs it."""
    w = w.astype(np.float32).reshape(-1, 64)
    amax = np.max(np.abs(w), axis=1, keepdims=True).astype(np.float32)
    idv = np.where(amax != 0, np.float32(1) / np.where(amax != 0, amax, 1), 0).astype(np.float32)
    x = (w * idv).astype(np.float32)
    mids = ((NF4_CODE[:-1].astype(np.float64) + NF4_CODE[1:].astype(np.float64)) / 2).astype(np.float32)
    q = (x[..., None] > mids).sum(-1)
    return (NF4_CODE[q] * amax).astype(np.float32).reshape(-1)


def f16(b):
    return np.frombuffer(b, dtype="<f2").astype(np.float32)


def k4_scales(sc):
    """[n, 12] bytes -> scales, mins [n, 8] (ggml's get_scale_min_k4)."""
    sc = sc.astype(np.int32)
    s, m = np.zeros((len(sc), 8), np.int32), np.zeros((len(sc), 8), np.int32)
    for j in range(8):
        if j < 4:
            s[:, j], m[:, j] = sc[:, j] & 63, sc[:, j + 4] & 63
        else:
            s[:, j] = (sc[:, j + 4] & 0xF) | ((sc[:, j - 4] >> 6) << 4)
            m[:, j] = (sc[:, j + 4] >> 4) | ((sc[:, j] >> 6) << 4)
    return s, m


def dequant_k(raw, kind):
    """Blocks of 256 values as ggml's dequantize_row_q{4,5,6}_K defines them; returns float32 [n * 256]."""
    size = {"q4_k": 144, "q5_k": 176, "q6_k": 210}[kind]
    b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, size)
    n = len(b)
    y = np.zeros((n, 256), np.float32)
    if kind == "q6_k":
        ql, qh, sc = b[:, :128].astype(np.int32), b[:, 128:192].astype(np.int32), b[:, 192:208].view(np.int8).astype(np.float32)
        d = f16(b[:, 208:210].tobytes())[:, None]
        for h in range(2):
            for l in range(32):
                lq, hq = ql[:, 64 * h:], qh[:, 32 * h:]
                q = [(lq[:, l] & 0xF) | ((hq[:, l] & 3) << 4), (lq[:, l + 32] & 0xF) | (((hq[:, l] >> 2) & 3) << 4),
                     (lq[:, l] >> 4) | (((hq[:, l] >> 4) & 3) << 4), (lq[:, l + 32] >> 4) | (((hq[:, l] >> 6) & 3) << 4)]
                for k in range(4):
                    y[:, 128 * h + l + 32 * k] = (d[:, 0] * sc[:, 8 * h + l // 16 + 2 * k]).astype(np.float32) * (q[k] - 32)
        return y.reshape(-1)
    d, dmin = f16(b[:, 0:2].tobytes())[:, None], f16(b[:, 2:4].tobytes())[:, None]
    s, m = k4_scales(b[:, 4:16])
    # Q4_K: |d|dmin|scales 12|qs 128|; Q5_K: |d|dmin|scales 12|qh 32|qs 128|
    qh = b[:, 16:48].astype(np.int32) if kind == "q5_k" else None
    qs = b[:, 48:176].astype(np.int32) if kind == "q5_k" else b[:, 16:144].astype(np.int32)
    for c in range(4):
        for half in range(2):
            g = 2 * c + half
            q = (qs[:, 32 * c:32 * c + 32] >> (4 * half)) & 0xF
            if kind == "q5_k":
                q = q + 16 * ((qh >> g) & 1)
            dd = (d[:, 0] * s[:, g]).astype(np.float32)[:, None]
            mm = (dmin[:, 0] * m[:, g]).astype(np.float32)[:, None]
            y[:, 32 * g:32 * g + 32] = (dd * q).astype(np.float32) - mm
    return y.reshape(-1)


def read_gguf_tensors(path):
    """{name: (type id, [ne0, ne1, ...], raw bytes)} of a GGUF file (versions 2, 3)."""
    with open(path, "rb") as f:
        buf = f.read()
    pos = 0

    def u(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return v[0]

    def string():
        nonlocal pos
        n = u("Q")
        pos += n
        return buf[pos - n:pos].decode()
    sizes = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q", 12: "d"}

    def value(t):
        if t == 8:
            return string()
        if t == 9:
            et, n = u("I"), u("Q")
            return [value(et) for _ in range(n)]
        return u(sizes[t])
    assert buf[:4] == b"GGUF"
    pos = 4
    u("I")
    n_tensors, n_kv = u("Q"), u("Q")
    align = 32
    for _ in range(n_kv):
        key, t = string(), u("I")
        v = value(t)
        if key == "general.alignment":
            align = v
    infos = []
    for _ in range(n_tensors):
        name, nd = string(), u("I")
        ne = [u("Q") for _ in range(nd)]
        infos.append((name, ne, u("I"), u("Q")))
    data = (pos + align - 1) // align * align
    block = {0: (1, 4), 12: (256, 144), 13: (256, 176), 14: (256, 210)}
    out = {}
    for name, ne, t, off in infos:
        bs, bb = block[t]
        nbytes = int(np.prod(ne)) // bs * bb
        out[name] = (t, ne, buf[data + off:data + off + nbytes])
    return out


def hf_to_gguf_name(name):
    """Hugging Face's name of a matrix -> GGUF's (llama.cpp's naming for qwen2)."""
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "lm_head.weight":
        return "output.weight"
    l, rest = name.split(".")[2], ".".join(name.split(".")[3:])
    return f"blk.{l}." + {"self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                          "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                          "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                          "mlp.down_proj.weight": "ffn_down.weight"}[rest]


def quantize_matrices(w, kind, gguf=None):
    """Every matrix of w as the model sft loads holds it: q8_0, q4_0 and nf4 quantized here exactly as
    sft's quantizers do; q4_k, q5_k, q6_k read from the GGUF file that `sft quantize` wrote and
    decoded here with ggml's definitions."""
    out = dict(w)
    tensors = read_gguf_tensors(gguf) if gguf else None
    for name, arr in w.items():
        if arr.ndim != 2:
            continue
        if tensors:
            t, ne, raw = tensors[hf_to_gguf_name(name)]
            assert t == {"q4_k": 12, "q5_k": 13, "q6_k": 14}[kind] and ne == [arr.shape[1], arr.shape[0]], name
            out[name] = dequant_k(raw, kind).reshape(arr.shape)
        else:
            out[name] = {"q8_0": q8_0_dequant, "q4_0": q4_0_dequant, "nf4": nf4_dequant}[kind](arr).reshape(arr.shape)
    return out

# -----------------------------------------------------------------------------------------------
# The model: Qwen2ForCausalLM + PEFT LoRA, float64


def rope_tables(T, HS, theta):
    """cos, sin [T, HS/2] as Hugging Face computes them (float32 angles), then float64."""
    inv = np.array([1.0 / theta ** (2 * j / HS) for j in range(HS // 2)]).astype(np.float32)
    ang = (np.arange(T, dtype=np.float32)[:, None] * inv[None, :]).astype(np.float32)
    cos = np.cos(ang.astype(np.float64)).astype(np.float32)
    sin = np.sin(ang.astype(np.float64)).astype(np.float32)
    return torch.tensor(cos, dtype=torch.float64), torch.tensor(sin, dtype=torch.float64)


def rope(x, cos, sin):
    """x [T, H, HS]: rotate_half convention, pairs (j, j + HS/2)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def rmsnorm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def linear(x, W, b, lora, key):
    y = x @ W.T
    if b is not None:
        y = y + b
    if lora is not None and key in lora["A"]:
        y = y + lora["scale"] * ((x @ lora["A"][key].T) @ lora["B"][key].T)
    return y


def forward(cfg, w, lora, ids):
    """ids [T] -> logits [T, V]."""
    T, C, NH, NKV = len(ids), cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    HS = C // NH
    cos, sin = rope_tables(T, HS, cfg["rope_theta"])
    eps = cfg["rms_norm_eps"]
    x = w["model.embed_tokens.weight"][torch.tensor(ids)]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."

        def lin(inp, sub, proj, bias=True):
            return linear(inp, w[p + sub + proj + ".weight"], w.get(p + sub + proj + ".bias") if bias else None, lora,
                          f"{l}.{proj}")
        h = rmsnorm(x, w[p + "input_layernorm.weight"], eps)
        q = rope(lin(h, "self_attn.", "q_proj").view(T, NH, HS), cos, sin)
        k = rope(lin(h, "self_attn.", "k_proj").view(T, NKV, HS), cos, sin)
        v = lin(h, "self_attn.", "v_proj").view(T, NKV, HS)
        k = k.repeat_interleave(NH // NKV, dim=1)  # query head hq uses kv head hq // (NH / NKV)
        v = v.repeat_interleave(NH // NKV, dim=1)
        att = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(HS)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        y = torch.einsum("hij,jhd->ihd", att, v).reshape(T, C)
        x = x + lin(y, "self_attn.", "o_proj", False)
        h = rmsnorm(x, w[p + "post_attention_layernorm.weight"], eps)
        g, u = lin(h, "mlp.", "gate_proj", False), lin(h, "mlp.", "up_proj", False)
        x = x + lin(torch.nn.functional.silu(g) * u, "mlp.", "down_proj", False)
    x = rmsnorm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
    return x @ head.T


def forward_peer_bf16(cfg, w, lora, ids):
    """ids [T] -> logits [T, V] as ../shared/peers/torch_lora_bench.py --dtype bf16 runs the peer that
    sft's speed is measured against (the Hugging Face Trainer's bf16=True): the base weights held in
    bf16 (w: bf16 tensors), the LoRA tensors in fp32, the forward under CPU autocast to bf16 (every
    product in bf16, RMSNorm and the attention softmax in fp32, the residual stream in bf16)."""
    T, C, NH, NKV = len(ids), cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    HS, eps, bf = C // NH, cfg["rms_norm_eps"], torch.bfloat16
    F = torch.nn.functional

    def norm(x, wn):  # Qwen2RMSNorm: normalise in fp32, cast back, then scale
        xf = x.to(torch.float32)
        return wn * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def lin(x, name, key, bias=True):  # peft.tuners.lora.Linear
        y = F.linear(x, w[name + ".weight"], w.get(name + ".bias") if bias else None)
        rd = y.dtype
        if key in lora["A"]:
            xa = x.to(torch.float32)  # autocast casts it back to bf16 for the products
            y = y + F.linear(F.linear(xa, lora["A"][key]), lora["B"][key]) * lora["scale"]
        return y.to(rd)

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, HS, 2, dtype=torch.int64).float() / HS))
    emb = torch.arange(T, dtype=torch.float32)[:, None] * inv[None, :]
    emb = torch.cat((emb, emb), dim=-1)
    with torch.autocast("cpu", dtype=bf):
        x = F.embedding(torch.tensor(ids), w["model.embed_tokens.weight"])
        cos, sin = emb.cos().to(x.dtype)[None], emb.sin().to(x.dtype)[None]
        mask = torch.full((T, T), torch.finfo(x.dtype).min, dtype=x.dtype).triu(1)[None]
        for l in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{l}."
            h = norm(x, w[p + "input_layernorm.weight"])
            q = lin(h, p + "self_attn.q_proj", f"{l}.q_proj").view(T, NH, HS).transpose(0, 1)
            k = lin(h, p + "self_attn.k_proj", f"{l}.k_proj").view(T, NKV, HS).transpose(0, 1)
            v = lin(h, p + "self_attn.v_proj", f"{l}.v_proj").view(T, NKV, HS).transpose(0, 1)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            k, v = k.repeat_interleave(NH // NKV, dim=0), v.repeat_interleave(NH // NKV, dim=0)
            att = torch.matmul(q, k.transpose(1, 2)) * (HS ** -0.5) + mask.to(q.dtype)
            att = F.softmax(att, dim=-1, dtype=torch.float32).to(q.dtype)
            y = torch.matmul(att, v).transpose(0, 1).reshape(T, C)
            x = x + lin(y, p + "self_attn.o_proj", f"{l}.o_proj", False)
            h = norm(x, w[p + "post_attention_layernorm.weight"])
            g, u = lin(h, p + "mlp.gate_proj", f"{l}.gate_proj", False), lin(h, p + "mlp.up_proj", f"{l}.up_proj", False)
            x = x + lin(F.silu(g) * u, p + "mlp.down_proj", f"{l}.down_proj", False)
        x = norm(x, w["model.norm.weight"])
        head = w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
        return F.linear(x, head).float()


def peer_errors(cfg, w32, lora32, r, alpha, examples, want):
    """The peer's errors against the float64 values `want` on the same weights: relative error of the
    loss, largest relative norm error of a LoRA gradient, largest absolute error of a logit."""
    w = {k: torch.tensor(v).to(torch.bfloat16) for k, v in w32.items()}
    params, lora = lora_params(cfg, lora32, r, alpha, torch.float32)
    n_targets = sum(sum(m[1:]) for _, m in examples)
    total, logits0 = 0, None
    for k, (ids, mask) in enumerate(examples):
        logits = forward_peer_bf16(cfg, w, lora, ids)
        total = total + nll_sum(logits.double(), ids, mask)
        if k == 0:
            logits0 = logits.detach().double().numpy()
    loss = total / n_targets
    loss.backward()
    grad_err = max(float(np.linalg.norm(p.grad.numpy().astype(np.float64) - want[name]) / np.linalg.norm(want[name]))
                   for name, p in params.items())
    return {"peer_bf16.loss_err": abs(loss.item() - want["loss"][0]) / abs(want["loss"][0]),
            "peer_bf16.grads_err": grad_err,
            "peer_bf16.logits_err": float(np.max(np.abs(logits0[want["logits_pos"].astype(int)] - want["logits"])))}


def nll_sum(logits, ids, mask):
    """Sum over t >= 1 with mask[t] of -log p(ids[t] | ids[:t])."""
    lp = torch.log_softmax(logits[:-1], dim=-1)
    tgt = torch.tensor(ids[1:])
    m = torch.tensor(mask[1:], dtype=torch.float64)
    return -(lp[torch.arange(len(tgt)), tgt] * m).sum()

# -----------------------------------------------------------------------------------------------
# Fixtures


def lora_name(l, proj, ab):
    sub = "self_attn" if proj in TARGETS[:4] else "mlp"
    return f"base_model.model.model.layers.{l}.{sub}.{proj}.lora_{ab}.weight"


def make_model(rng, cfg):
    C, FF, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    KV = cfg["num_key_value_heads"] * (C // cfg["num_attention_heads"])

    def mat(o, i):
        return rng.normal(0, 1 / math.sqrt(i), (o, i)).astype(np.float32)

    def vec(n, mean, std):
        return (mean + std * rng.normal(size=n)).astype(np.float32)
    w = {"model.embed_tokens.weight": rng.normal(0, 2 / math.sqrt(C), (V, C)).astype(np.float32)}
    for l in range(L):
        p = f"model.layers.{l}."
        w[p + "input_layernorm.weight"] = vec(C, 1, 0.2)
        w[p + "self_attn.q_proj.weight"], w[p + "self_attn.q_proj.bias"] = mat(C, C), vec(C, 0, 0.5)
        w[p + "self_attn.k_proj.weight"], w[p + "self_attn.k_proj.bias"] = mat(KV, C), vec(KV, 0, 0.5)
        w[p + "self_attn.v_proj.weight"], w[p + "self_attn.v_proj.bias"] = mat(KV, C), vec(KV, 0, 0.5)
        w[p + "self_attn.o_proj.weight"] = mat(C, C)
        w[p + "post_attention_layernorm.weight"] = vec(C, 1, 0.2)
        w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"] = mat(FF, C), mat(FF, C)
        w[p + "mlp.down_proj.weight"] = mat(C, FF)
    w["model.norm.weight"] = vec(C, 1, 0.2)
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = mat(V, C)
    return w


def make_lora(rng, cfg, r):
    C, FF, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    KV = cfg["num_key_value_heads"] * (C // cfg["num_attention_heads"])
    shapes = {"q_proj": (C, C), "k_proj": (KV, C), "v_proj": (KV, C), "o_proj": (C, C),
              "gate_proj": (FF, C), "up_proj": (FF, C), "down_proj": (C, FF)}
    t = {}
    for l in range(L):
        for proj in TARGETS:
            o, i = shapes[proj]
            t[lora_name(l, proj, "A")] = rng.uniform(-1 / math.sqrt(i), 1 / math.sqrt(i), (r, i)).astype(np.float32)
            t[lora_name(l, proj, "B")] = rng.normal(0, 0.2, (o, r)).astype(np.float32)
    return t


def peft_config(r, alpha, targets):
    """adapter_config.json with every key PEFT 0.13 writes (sft must ignore the ones it does not use)."""
    return {"alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "tiny-qwen2", "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layer_replication": None,
            "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": alpha,
            "lora_dropout": 0.05, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
            "peft_type": "LORA", "r": r, "rank_pattern": {}, "revision": None, "target_modules": targets,
            "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False}


def hf_config(C, NH, NKV, FF, L, V, theta, tied):
    return {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": SPECIAL_ID["<|endoftext|>"],
            "eos_token_id": SPECIAL_ID["<|im_end|>"], "hidden_act": "silu", "hidden_size": C, "initializer_range": 0.02,
            "intermediate_size": FF, "max_position_embeddings": 256, "max_window_layers": L, "model_type": "qwen2",
            "num_attention_heads": NH, "num_hidden_layers": L, "num_key_value_heads": NKV, "rms_norm_eps": 1e-6,
            "rope_scaling": None, "rope_theta": theta, "sliding_window": 256, "tie_word_embeddings": tied,
            "torch_dtype": "float32", "transformers_version": "4.45.0", "use_cache": True, "use_sliding_window": False,
            "vocab_size": V}


def lora_params(cfg, lora32, r, alpha, dtype):
    """The adapter's tensors as leaves that take gradients (dtype), and the {"scale", "A", "B"} view
    of them that linear() reads."""
    params = {k: torch.tensor(v, dtype=dtype, requires_grad=True) for k, v in lora32.items()}
    lora = {"scale": alpha / r, "A": {}, "B": {}}
    for l in range(cfg["num_hidden_layers"]):
        for proj in TARGETS:
            lora["A"][f"{l}.{proj}"] = params[lora_name(l, proj, "A")]
            lora["B"][f"{l}.{proj}"] = params[lora_name(l, proj, "B")]
    return params, lora


def expected(cfg, w32, lora32, r, alpha, examples):
    """Loss, logits and LoRA gradients in float64 for weights w32 (float32 arrays)."""
    w = {k: torch.tensor(v, dtype=torch.float64) for k, v in w32.items()}
    params, lora = lora_params(cfg, lora32, r, alpha, torch.float64)
    n_targets = sum(sum(m[1:]) for _, m in examples)
    n_all = sum(len(ids) - 1 for ids, _ in examples)
    total, total_all, total_base, logits0 = 0, 0.0, 0.0, None
    for k, (ids, mask) in enumerate(examples):
        logits = forward(cfg, w, lora, ids)
        total = total + nll_sum(logits, ids, mask)
        total_all += nll_sum(logits.detach(), ids, [0] + [1] * (len(ids) - 1)).item()
        with torch.no_grad():
            total_base += nll_sum(forward(cfg, w, None, ids), ids, mask).item()
        if k == 0:
            logits0 = logits.detach()
    loss = total / n_targets
    loss.backward()
    ids0 = examples[0][0]
    pos = [0, 1, len(ids0) // 2, len(ids0) - 1]
    out = {}
    for k, (ids, mask) in enumerate(examples):
        out[f"ex{k}.tokens"] = np.array(ids, dtype=np.float32)
        out[f"ex{k}.mask"] = np.array(mask, dtype=np.float32)
    out["loss"] = np.array([loss.item()])
    out["loss_all"] = np.array([total_all / n_all])
    out["loss_base"] = np.array([total_base / n_targets])
    out["n_targets"] = np.array([n_targets])
    out["logits_pos"] = np.array(pos)
    out["logits"] = logits0[pos].numpy()
    for name, p in params.items():
        out[name] = p.grad.numpy()
    return out, loss.item()


SFT = os.path.join(HERE, "..", "sft")


def build(name, seed, C, NH, NKV, FF, L, V, theta, tied, r, alpha, targets_field, examples,
          kinds=("f32", "q8_0", "q4_0"), storage="F32"):
    rng = np.random.default_rng(seed)
    cfg = hf_config(C, NH, NKV, FF, L, V, theta, tied)
    w = make_model(rng, cfg)
    if storage == "BF16":  # the model file holds bf16: its float32 values are those
        w = {k: bf16_round(v) for k, v in w.items()}
        cfg["torch_dtype"] = "bfloat16"
    lora = make_lora(rng, cfg, r)
    d = os.path.join(OUT, name)
    os.makedirs(os.path.join(d, "model"), exist_ok=True)
    os.makedirs(os.path.join(d, "adapter"), exist_ok=True)
    with open(os.path.join(d, "model", "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    write_safetensors(os.path.join(d, "model", "model.safetensors"), w, storage)
    with open(os.path.join(d, "model", "tokenizer.json"), "w") as f:
        json.dump(tokenizer_json(), f, ensure_ascii=False)
    with open(os.path.join(d, "model", "tokenizer_config.json"), "w") as f:
        json.dump({"add_bos_token": False, "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "model_max_length": 256, "tokenizer_class": "Qwen2Tokenizer"}, f, indent=2)
    with open(os.path.join(d, "adapter", "adapter_config.json"), "w") as f:
        json.dump(peft_config(r, alpha, targets_field), f, indent=2, sort_keys=True)
    write_safetensors(os.path.join(d, "adapter", "adapter_model.safetensors"), lora)
    for kind in kinds:
        gguf = None
        if kind in ("q4_k", "q5_k", "q6_k"):  # sft's own quantizer writes the blocks; decoded here
            gguf = os.path.join(d, f"model_{kind}.gguf")
            subprocess.run([SFT, "quantize", "--model", os.path.join(d, "model"), "--type", kind, "--out", gguf],
                           check=True, stderr=subprocess.DEVNULL)
        wk = w if kind == "f32" else quantize_matrices(w, kind, gguf)
        out, loss = expected(cfg, wk, lora, r, alpha, examples)
        out.update({k: np.array([v]) for k, v in peer_errors(cfg, wk, lora, r, alpha, examples, out).items()})
        write_safetensors(os.path.join(d, f"expected_{kind}.safetensors"), out)
        print(f"{name} {kind}: loss {loss:.9g}, {int(out['n_targets'][0])} targets, base loss {out['loss_base'][0]:.9g}; "
              f"bf16 peer: loss err {out['peer_bf16.loss_err'][0]:.2g}, grads {out['peer_bf16.grads_err'][0]:.2g}, "
              f"logits {out['peer_bf16.logits_err'][0]:.2g}")


def main():
    torch.manual_seed(0)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "data.jsonl"), "w") as f:
        for ex in DATA:
            f.write(json.dumps(ex) + "\n")
    examples = [render_and_mask(ex) for ex in DATA]
    # tied: C 32, 4 query heads sharing 2 kv heads of size 8, every target listed (PEFT writes a list)
    build("tied", 1, C=32, NH=4, NKV=2, FF=64, L=2, V=264, theta=10000.0, tied=True, r=4, alpha=8,
          targets_field=["k_proj", "o_proj", "q_proj", "v_proj", "down_proj", "up_proj", "gate_proj"], examples=examples)
    # untied: C 64, 4 query heads sharing 1 kv head of size 16, target_modules as one (regex) string
    build("untied", 2, C=64, NH=4, NKV=1, FF=96, L=2, V=272, theta=1000000.0, tied=False, r=2, alpha=6,
          targets_field=".*\\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)", examples=examples)
    # k256: hidden and FF multiples of 256 (whole K-quant blocks, full AMX tiles), heads of 64 as
    # Qwen2.5's, stored in bf16 (half the bytes); every weight type sft holds in memory
    build("k256", 3, C=256, NH=4, NKV=2, FF=512, L=1, V=264, theta=1000000.0, tied=True, r=8, alpha=16,
          targets_field=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], examples=examples,
          kinds=("f32", "q8_0", "q4_0", "nf4", "q4_k", "q5_k", "q6_k"), storage="BF16")


if __name__ == "__main__":
    main()
