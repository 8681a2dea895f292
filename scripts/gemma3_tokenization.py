#!/usr/bin/env python3
"""uc's tokenization of Gemma 3 (tokenizer.json rebuilt by `uc import gguf` from the
GGUF's SentencePiece vocabulary) against llama.cpp's own tokenizer on the same GGUF.

usage: gemma3_tokenization.py [--gemma-dir DIR] [--llama-bin DIR] [--uc BIN] [--out JSON]

Checks, per text (the SOTU eval split as `uc eval --sotu` joins it, and The Devil's
Dictionary), all with no BOS and special tokens parsed (llama-tokenize's default, and
what `tokenizers` does with added tokens):
  - sample: the first 8000 characters. llama-tokenize gives N ids; `uc eval --text
    SAMPLE --windows 1 --seq-len N` must report n_tokens == N and tokens_sha256 equal
    to the SHA-256 of those ids (u32 little-endian): uc's own binary, every token.
  - full text: uc eval's n_tokens (the whole text) and tokens_sha256 of its first window
    (1024 tokens) against llama-tokenize's; and, when the Python `tokenizers` package is
    importable, the same tokenizer.json through it against every llama.cpp id (the Python
    binding is a different build of the library uc links, so this is the wide check, the
    two above the exact one).
Writes results/gemma3_tokenization.json.

llama-tokenize comes from the llama.cpp vendored in PyPI llama-cpp-python==0.3.36 (built
as scripts/llamacpp_rows.sh builds it, plus the llama-tokenize target).
"""
import argparse
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GGUF = "gemma-3-270m-q4_k_m.gguf"
SAMPLE_CHARS = 8000


def sotu_eval_text(speeches: Path) -> str:
    """The SOTU eval split as uc's corpus module joins it: year >= 2000, by (year, N, name)."""
    files = []
    for p in speeches.glob("*.txt"):
        m = re.fullmatch(r"(\d{4})-(.+)-(\d+)\.txt", p.name)
        if m and int(m.group(1)) >= 2000:
            files.append(((int(m.group(1)), int(m.group(3)), m.group(2)), p))
    return "\n\n".join(p.read_bytes().decode("utf-8") for _, p in sorted(files))


def ids_sha256(ids) -> str:
    return hashlib.sha256(b"".join(struct.pack("<I", i) for i in ids)).hexdigest()


def llama_ids(bin_dir: Path, gguf: Path, text: str) -> list:
    out = subprocess.run(
        [str(bin_dir / "llama-tokenize"), "-m", str(gguf), "--stdin", "--no-escape",
         "--ids", "--no-bos", "--log-disable"],
        input=text.encode(), capture_output=True, check=True)
    return json.loads(out.stdout)


def uc_eval(uc: str, model: Path, args: list) -> dict:
    out = subprocess.run([uc, "eval", str(model), *args, "--json"], capture_output=True,
                         check=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gemma-dir", default=str(ROOT / "assets/gemma3-270m"))
    ap.add_argument("--llama-bin", default=os.environ.get(
        "LLAMA_BIN", "/work/scratch/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin"))
    ap.add_argument("--uc", default=str(ROOT / "target/release/uc"))
    ap.add_argument("--out", default=str(ROOT / "results/gemma3_tokenization.json"))
    a = ap.parse_args()
    gdir, bin_dir = Path(a.gemma_dir), Path(a.llama_bin)
    gguf, model = gdir / GGUF, gdir / "hf"
    sotu = ROOT / "assets/sotu/speeches"
    devil = ROOT / "assets/devil/devil.txt"
    texts = {
        "sotu_eval": (sotu_eval_text(sotu), ["--sotu", str(ROOT / "assets/sotu")]),
        "devil": (devil.read_bytes().decode("utf-8"), ["--text", str(devil)]),
    }
    try:
        from tokenizers import Tokenizer  # optional: the wide check
        py_tok = Tokenizer.from_file(str(model / "tokenizer.json"))
        import tokenizers
        py_version = tokenizers.__version__
    except ImportError:
        py_tok, py_version = None, None

    report = {"gguf": GGUF, "tokenizer_json_sha256": hashlib.sha256(
        (model / "tokenizer.json").read_bytes()).hexdigest(),
        "llama_cpp": "llama-tokenize from PyPI llama-cpp-python==0.3.36 (vendor/llama.cpp), "
                     "--no-bos, special tokens parsed, --no-escape",
        "python_tokenizers": py_version, "texts": {}}
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for name, (text, uc_args) in texts.items():
            r = {"chars": len(text)}
            # Exact check on a sample: every token through uc's own binary.
            sample = text[:SAMPLE_CHARS]
            sp = Path(tmp) / f"{name}_sample.txt"
            sp.write_bytes(sample.encode("utf-8"))
            ref = llama_ids(bin_dir, gguf, sample)
            ev = uc_eval(a.uc, model, ["--text", str(sp), "--windows", "1",
                                       "--seq-len", str(len(ref))])
            r["sample"] = {"chars": len(sample), "llama_tokens": len(ref),
                           "uc_tokens": ev["n_tokens"],
                           "llama_sha256": ids_sha256(ref), "uc_sha256": ev["tokens_sha256"]}
            r["sample"]["identical"] = (ev["n_tokens"] == len(ref)
                                        and ev["tokens_sha256"] == ids_sha256(ref))
            # Full text: uc's token count and first window, then every id via Python.
            full = llama_ids(bin_dir, gguf, text)
            ev = uc_eval(a.uc, model, uc_args + ["--windows", "1", "--seq-len", "1024"])
            r["full"] = {"llama_tokens": len(full), "uc_tokens": ev["n_tokens"],
                         "first_1024_identical": ev["tokens_sha256"] == ids_sha256(full[:1024]),
                         "uc_text_sha256": ev["text_sha256"],
                         "text_sha256": hashlib.sha256(text.encode()).hexdigest()}
            if py_tok is not None:
                ours = py_tok.encode(text, add_special_tokens=False).ids
                diffs = [i for i, (x, y) in enumerate(zip(ours, full)) if x != y]
                r["full"]["python_tokenizers_tokens"] = len(ours)
                r["full"]["python_tokenizers_mismatches"] = len(diffs) + abs(len(ours) - len(full))
                r["full"]["python_tokenizers_first_mismatch"] = diffs[0] if diffs else None
            r["full"]["identical"] = (r["full"]["llama_tokens"] == r["full"]["uc_tokens"]
                                      and r["full"]["first_1024_identical"]
                                      and r["full"].get("python_tokenizers_mismatches", 0) == 0)
            ok &= r["sample"]["identical"] and r["full"]["identical"]
            report["texts"][name] = r
            print(f"{name}: sample {r['sample']['llama_tokens']} tokens identical="
                  f"{r['sample']['identical']}; full {r['full']['llama_tokens']} llama / "
                  f"{r['full']['uc_tokens']} uc, identical={r['full']['identical']}",
                  file=sys.stderr)
    report["all_identical"] = ok
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {a.out}", file=sys.stderr)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
