#!/usr/bin/env python3
"""Compare `uc eval`'s perplexity with the transformers reference (issue 2 acceptance).

  compare_ppl.py UC_EVAL_JSON REFERENCE_JSON [--tolerance 0.001]
                 [--tokenizer-json DIR/tokenizer.json --sotu SOTU_DIR] > OUT.json

UC_EVAL_JSON is the receipt of `uc eval MODEL --sotu DIR --json` (the teacher, no --against);
REFERENCE_JSON is scripts/reference_eval.py's output. Prints one JSON object:

  * ppl: uc's and the reference's perplexity, rel_diff = uc / ref - 1, and pass when
    |rel_diff| <= tolerance (default 0.001 = 0.1%);
  * same_windows: whether both evaluated the same token windows, from what the two files
    hold: text SHA-256, token count, seq_len, windows, predicted positions, and the SHA-256
    of the used token ids (u32 little-endian) when uc's receipt carries one (it is looked up
    under the names `used_tokens_sha256_u32le`, `used_tokens_sha256`, `tokens_sha256_u32le`);
  * optional proxy (--tokenizer-json and --sotu, needs the `tokenizers` Python package):
    the used-token SHA-256 recomputed from uc's tokenizer.json with the Python binding of the
    same Rust `tokenizers` library. This checks the tokenizer file, not uc's own token stream.

Exit code 0 whether or not the check passes (the verdict is in the JSON); 2 on bad input.
"""

import argparse
import hashlib
import json
import os
import re
import struct
import sys

TOKEN_SHA_FIELDS = ("used_tokens_sha256_u32le", "used_tokens_sha256", "tokens_sha256_u32le")
SPEECH_RE = re.compile(r"^(\d{4})-(.+)-(\d+)\.txt$")


def sotu_eval_text(sotu_dir):
    """The SOTU eval split (year >= 2000), same protocol as uc and scripts/reference_eval.py."""
    if os.path.isdir(os.path.join(sotu_dir, "speeches")):
        sotu_dir = os.path.join(sotu_dir, "speeches")
    entries = []
    for f in os.listdir(sotu_dir):
        m = SPEECH_RE.match(f)
        if m and int(m.group(1)) >= 2000:
            entries.append(((int(m.group(1)), int(m.group(3)), m.group(2)), f))
    entries.sort()
    parts = []
    for _, f in entries:
        with open(os.path.join(sotu_dir, f), "rb") as fh:
            parts.append(fh.read().decode("utf-8"))
    return "\n\n".join(parts)


def find_token_sha(receipt):
    for k in TOKEN_SHA_FIELDS:
        if isinstance(receipt.get(k), str):
            return k, receipt[k]
    return None, None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("uc_eval_json")
    ap.add_argument("reference_json")
    ap.add_argument("--tolerance", type=float, default=0.001, help="max |uc/ref - 1| (default 0.001)")
    ap.add_argument("--tokenizer-json", help="recompute the used-token hash from this tokenizer.json (proxy)")
    ap.add_argument("--sotu", help="SOTU corpus directory, for --tokenizer-json")
    args = ap.parse_args()

    try:
        with open(args.uc_eval_json) as f:
            uc = json.load(f)
        with open(args.reference_json) as f:
            ref = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        print(f"compare_ppl: {e}", file=sys.stderr)
        sys.exit(2)
    if uc.get("against") is not None:
        print("compare_ppl: warning: the uc receipt was made with --against; using its model's ppl",
              file=sys.stderr)

    uc_ppl, ref_ppl = float(uc["ppl"]), float(ref["ppl"])
    rel = uc_ppl / ref_ppl - 1.0
    ref_nll = ref.get("mean_nll")

    checks = {}

    def check(name, a, b):
        checks[name] = {"uc": a, "reference": b, "equal": a == b}

    check("text_sha256", uc.get("text_sha256"), (ref.get("text") or {}).get("sha256"))
    check("text_chars", uc.get("text_chars"), (ref.get("text") or {}).get("chars"))
    check("text_files", uc.get("text_files"), (ref.get("text") or {}).get("files"))
    check("n_tokens", uc.get("n_tokens"), ref.get("n_tokens"))
    check("seq_len", uc.get("seq_len"), ref.get("seq_len"))
    check("windows", uc.get("windows"), ref.get("windows"))
    check("n_pos", uc.get("n_pos"), ref.get("n_pos"))
    field, uc_tok_sha = find_token_sha(uc)
    if field:
        check("used_tokens_sha256_u32le", uc_tok_sha, ref.get("used_tokens_sha256_u32le"))
        token_note = f"uc receipt field `{field}` compared with the reference's used_tokens_sha256_u32le"
    else:
        token_note = ("uc's eval receipt has no hash of the token ids it used (looked for "
                      + ", ".join(TOKEN_SHA_FIELDS)
                      + "); identical windows are implied only by equal text SHA-256, token count, "
                      "seq_len and windows, plus the tokenization comparison and the proxy below")

    proxy = None
    if args.tokenizer_json:
        if not args.sotu:
            print("compare_ppl: --tokenizer-json needs --sotu", file=sys.stderr)
            sys.exit(2)
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            proxy = {"skipped": f"python package `tokenizers` not importable: {e}"}
        else:
            text = sotu_eval_text(args.sotu)
            ids = Tokenizer.from_file(args.tokenizer_json).encode(text, add_special_tokens=False).ids
            used = ids[: int(ref["seq_len"]) * int(ref["windows"])]
            with open(args.tokenizer_json, "rb") as f:
                tok_sha = hashlib.sha256(f.read()).hexdigest()
            sha_all = hashlib.sha256(struct.pack(f"<{len(ids)}I", *ids)).hexdigest()
            sha_used = hashlib.sha256(struct.pack(f"<{len(used)}I", *used)).hexdigest()
            ref_all = (ref.get("tokenizer") or {}).get("tokens_sha256_u32le")
            proxy = {
                "what": "token ids recomputed from uc's tokenizer.json with the Python binding of the "
                        "Rust `tokenizers` library (the library uc links); checks the tokenizer file "
                        "and the text, not uc's in-process token stream",
                "tokenizer_json": os.path.abspath(args.tokenizer_json),
                "tokenizer_json_sha256": tok_sha,
                "tokenizer_sha256_matches_uc_receipt": tok_sha == uc.get("tokenizer_sha256"),
                "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                "n_tokens": len(ids),
                "all_tokens_sha256_u32le": sha_all,
                "all_tokens_equal_reference": sha_all == ref_all,
                "used_tokens_sha256_u32le": sha_used,
                "used_tokens_equal_reference": sha_used == ref.get("used_tokens_sha256_u32le"),
            }

    same = all(c["equal"] for c in checks.values())
    if proxy and "skipped" not in proxy:
        same = same and proxy["used_tokens_equal_reference"] and proxy["tokenizer_sha256_matches_uc_receipt"]
    out = {
        "what": "uc eval teacher perplexity vs transformers fp32 reference, SOTU eval split",
        "uc_eval_json": os.path.abspath(args.uc_eval_json),
        "reference_json": os.path.abspath(args.reference_json),
        "ppl": {
            "uc": uc_ppl,
            "reference": ref_ppl,
            "rel_diff": rel,
            "abs_rel_diff": abs(rel),
            "uc_nll": uc.get("nll"),
            "reference_nll": ref_nll,
            "nll_diff": (uc.get("nll") - ref_nll) if (uc.get("nll") is not None and ref_nll is not None) else None,
            "tolerance": args.tolerance,
            "pass": abs(rel) <= args.tolerance,
        },
        "same_windows": {
            "checks": checks,
            "token_hash_in_uc_receipt": field is not None,
            "note": token_note,
            "proxy": proxy,
            "all_available_checks_equal": same,
        },
        "pass": abs(rel) <= args.tolerance and same,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
