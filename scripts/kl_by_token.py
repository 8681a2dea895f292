#!/usr/bin/env python3
"""Where a quantized model's KL divergence comes from, by the kind of token predicted.

Usage (torch + transformers, scripts/requirements-reference.txt; dense checkpoints only,
so a pack goes through `uc export PACK DIR --to safetensors --dtype f32` first):

    python scripts/kl_by_token.py --ref assets/smollm2-135m \
        --model uc=/tmp/uc-dense --model q3=/path/Q3_K_M+imatrix \
        --text assets/devil/devil.txt --windows 8 --out results/kl_by_token_devil.json

Protocol = `uc eval`'s: the text as one token stream (no BOS), the first WINDOWS
non-overlapping windows of SEQ_LEN tokens, position t predicting token t+1, KL(ref || model)
over the full vocabulary in fp32. Each prediction is put in a class by the token it
predicts (decoded text): `newline` (contains "\\n"), `spaces` (two or more spaces and
nothing else), `punct` (no letter or digit), `caps` (letters, two or more capitals, no
lower case: the Devil's Dictionary's headwords), `word` (the rest). The JSON gives, per
model and class, the number of predictions, the mean KL and the class's share of the
total KL, so two models' excess can be located.
"""

import argparse
import json
import math
import os
import sys

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM


def sotu_eval_text(d):
    files = []
    for name in os.listdir(d):
        if name.startswith(".") or not name.endswith(".txt"):
            continue
        year, rest = name[:-4].split("-", 1)
        who, n = rest.rsplit("-", 1)
        if int(year) >= 2000:
            files.append(((int(year), int(n), who), name))
    files.sort()
    return "\n\n".join(open(os.path.join(d, f), encoding="utf-8").read() for _, f in files)


def token_class(s):
    if "\n" in s:
        return "newline"
    if len(s) >= 2 and set(s) == {" "}:
        return "spaces"
    if not any(c.isalnum() for c in s):
        return "punct"
    letters = [c for c in s if c.isalpha()]
    if sum(c.isupper() for c in letters) >= 2 and not any(c.islower() for c in letters):
        return "caps"
    return "word"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", required=True)
    ap.add_argument("--model", action="append", required=True, help="NAME=DIR")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--text")
    g.add_argument("--sotu", help="SOTU speeches directory (eval split: year >= 2000)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(2)

    text = open(a.text, encoding="utf-8").read() if a.text else sotu_eval_text(a.sotu)
    tok = Tokenizer.from_file(os.path.join(a.ref, "tokenizer.json"))
    ids = tok.encode(text, add_special_tokens=False).ids
    need = a.windows * a.seq_len
    if len(ids) < need:
        sys.exit(f"text has {len(ids)} tokens, {need} needed")
    windows = torch.tensor(ids[:need]).view(a.windows, a.seq_len)
    targets = windows[:, 1:].reshape(-1).tolist()
    classes = [token_class(tok.decode([t])) for t in targets]

    def logprobs(path):
        m = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager")
        m.eval()
        out = []
        with torch.no_grad():
            for w in windows:
                out.append(torch.log_softmax(m(w[None]).logits[0, :-1].float(), -1))
        return out

    ref = logprobs(a.ref)
    report = {"text": a.text or f"{a.sotu} (eval split)", "windows": a.windows, "seq_len": a.seq_len, "models": {}}
    names = sorted(set(classes))
    report["counts"] = {c: classes.count(c) for c in names}
    for spec in a.model:
        name, path = spec.split("=", 1)
        lp = logprobs(path)
        kl = torch.cat([(r.exp() * (r - q)).sum(-1) for r, q in zip(ref, lp)]).tolist()
        nll_ref = torch.cat([-r.gather(-1, w[1:, None])[:, 0] for r, w in zip(ref, windows)])
        nll = torch.cat([-q.gather(-1, w[1:, None])[:, 0] for q, w in zip(lp, windows)])
        total = sum(kl)
        per = {}
        for c in names:
            sel = [k for k, cc in zip(kl, classes) if cc == c]
            idx = torch.tensor([i for i, cc in enumerate(classes) if cc == c])
            per[c] = {
                "n": len(sel),
                "kld": sum(sel) / len(sel),
                "share": sum(sel) / total,
                "nll_gap": float((nll[idx] - nll_ref[idx]).mean()),
            }
        report["models"][name] = {
            "path": path,
            "kld": total / len(kl),
            "ppl_ratio": math.exp(float((nll - nll_ref).mean())),
            "by_class": per,
        }
        print(name, f"KLD {total / len(kl):.4f}", " ".join(f"{c}:{per[c]['kld']:.4f}({per[c]['share']:.0%})" for c in names), flush=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
