# bpe_ref.py: an independent Qwen2 byte-level BPE in Python (regex + unicodedata), used once to
# derive the expected ids that test/test_data.c writes down by hand. Not run by the tests.
# It matches Hugging Face's ids on the 46 cases of test/tokenizer/qwen2.inp.
# Needs Python's `regex` module (Debian: python3-regex). From the repository root:
#   python3 test/data/bpe_ref.py '日本の首都は？'
import json, regex, sys, unicodedata
tj = json.load(open("data/tokenizer.json"))
vocab = tj["model"]["vocab"]
merges = tj["model"]["merges"]
ranks = {}
for i, m in enumerate(merges):
    a, b = (m.split(" ", 1) if isinstance(m, str) else m)
    ranks[(a, b)] = i
added = {t["content"]: t["id"] for t in tj["added_tokens"]}
bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
cs = bs[:]; n = 0
for b in range(256):
    if b not in bs: bs.append(b); cs.append(256 + n); n += 1
b2u = {b: chr(c) for b, c in zip(bs, cs)}
pat = regex.compile(r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
def bpe(word):
    parts = list(word)
    while len(parts) > 1:
        best = min(((ranks.get((parts[i], parts[i+1]), 1 << 60), i) for i in range(len(parts) - 1)))
        if best[0] == 1 << 60: break
        i = best[1]
        parts = parts[:i] + [parts[i] + parts[i+1]] + parts[i+2:]
    return parts
def encode(text):
    sp = regex.compile("(" + "|".join(regex.escape(k) for k in sorted(added, key=len, reverse=True)) + ")")
    out = []
    for piece in sp.split(text):
        if piece == "": continue
        if piece in added: out.append((added[piece], piece)); continue
        piece = unicodedata.normalize("NFC", piece)
        for w in pat.findall(piece):
            for t in bpe("".join(b2u[b] for b in w.encode("utf-8"))):
                out.append((vocab[t], t))
    return out
if __name__ == "__main__":
    for i, t in encode(sys.argv[1]): print(i, repr(t))
