#!/usr/bin/env python3
"""Compare token ids from uc's imported tokenizer.json with transformers' own GGUF
tokenizer on the SOTU eval text (speeches from 2000 on, sorted by (year, N, name),
joined by a blank line). Prints JSON {n_ours, n_hf, first_mismatch, n_mismatch, ...}.

Both sides encode without special tokens (SmolLM2 adds no BOS).

usage: compare_tokenization.py TOKENIZER_JSON GGUF_FILE SPEECHES_DIR
"""
import json
import re
import sys
from pathlib import Path


def eval_text(speeches: Path) -> str:
    files = []
    for p in speeches.glob("*.txt"):
        m = re.fullmatch(r"(\d{4})-(.+)-(\d+)\.txt", p.name)
        if m and int(m.group(1)) >= 2000:
            files.append(((int(m.group(1)), int(m.group(3)), m.group(2)), p))
    # Bytes, not read_text(): universal-newline translation would alter the text.
    return "\n\n".join(p.read_bytes().decode("utf-8") for _, p in sorted(files))


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    ours_path, gguf, speeches = map(Path, sys.argv[1:])
    if (speeches / "speeches").is_dir():  # the corpus root, as `uc eval --sotu` accepts
        speeches = speeches / "speeches"
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    text = eval_text(speeches)
    ours = Tokenizer.from_file(str(ours_path)).encode(text, add_special_tokens=False).ids
    hf_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf = hf_tok(text, add_special_tokens=False)["input_ids"]
    diffs = [i for i, (a, b) in enumerate(zip(ours, hf)) if a != b]
    first = diffs[0] if diffs else (None if len(ours) == len(hf) else min(len(ours), len(hf)))
    out = {
        "n_chars": len(text),
        "n_ours": len(ours),
        "n_hf": len(hf),
        "first_mismatch": first,
        "n_mismatch": len(diffs) + abs(len(ours) - len(hf)),
    }
    if first is not None:
        ctx = slice(max(first - 3, 0), first + 5)
        out["ours_near_first"] = [hf_tok.convert_ids_to_tokens(i) for i in ours[ctx]]
        out["hf_near_first"] = hf_tok.convert_ids_to_tokens(hf[ctx])
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
