#!/usr/bin/env bash
# Determinism of `uc eval` on the real model: the same evaluation with RAYON_NUM_THREADS=1
# and =2 must print identical numbers (issue 2, "Determinism").
#
#   scripts/determinism_eval.sh MODEL AGAINST SOTU_DIR OUT.json [WINDOWS=2]
#
# Environment: UC (default target/release/uc). Runs, one after the other,
#   RAYON_NUM_THREADS=T $UC eval MODEL --against AGAINST --sotu SOTU_DIR --windows WINDOWS --json
# for T = 1 and 2 and writes OUT.json with both receipts' metric fields (n_pos, nll, ppl and
# the comparison: ref_nll, ref_ppl, ppl_ratio, kld, top1), the threads each run reported, and
# `identical`: true when every metric field is equal, compared as the exact JSON numbers
# uc printed (shortest round-trip f64 text, so equal text <=> equal bits). The model and
# reference fingerprints, text and tokenizer digests must also be equal.
# Exit 0 if identical, 1 if not (the JSON is written either way).
set -euo pipefail

MODEL=${1:?usage: determinism_eval.sh MODEL AGAINST SOTU_DIR OUT.json [WINDOWS]}
AGAINST=${2:?usage}
SOTU=${3:?usage}
OUT=${4:?usage}
WINDOWS=${5:-2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
UC=${UC:-$ROOT/target/release/uc}
PY=${PYTHON:-python3}

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

for T in 1 2; do
    echo "determinism_eval: RAYON_NUM_THREADS=$T $UC eval $MODEL --against $AGAINST --windows $WINDOWS" >&2
    RAYON_NUM_THREADS=$T "$UC" eval "$MODEL" --against "$AGAINST" --sotu "$SOTU" \
        --windows "$WINDOWS" --json >"$TMP/t$T.json"
done

"$PY" - "$TMP/t1.json" "$TMP/t2.json" "$OUT" "$UC" "$MODEL" "$AGAINST" "$WINDOWS" <<'EOF'
import json, sys
t1, t2, out, uc, model, against, windows = sys.argv[1:]

def load(p):
    # Keep numbers as their exact printed text: equal text <=> equal f64.
    with open(p) as f:
        return json.load(f, parse_float=str, parse_int=str)

a, b = load(t1), load(t2)
METRICS = ["n_pos", "nll", "ppl"]
CMP = ["ref_nll", "ref_ppl", "ppl_ratio", "kld", "top1"]
IDENT = ["text_sha256", "tokenizer_sha256", "n_tokens", "seq_len", "windows"]

def metrics(r):
    m = {k: r.get(k) for k in METRICS}
    m["against"] = None if r.get("against") is None else {k: r["against"].get(k) for k in CMP}
    return m

ma, mb = metrics(a), metrics(b)
diffs = [k for k in METRICS if ma[k] != mb[k]]
if (ma["against"] is None) != (mb["against"] is None):
    diffs.append("against")
elif ma["against"] is not None:
    diffs += ["against." + k for k in CMP if ma["against"][k] != mb["against"][k]]
ident_diffs = [k for k in IDENT if a.get(k) != b.get(k)]
for side in ("model", "reference"):
    fa = (a.get(side) or {}).get("fingerprint")
    fb = (b.get(side) or {}).get("fingerprint")
    if fa != fb:
        ident_diffs.append(side + ".fingerprint")

def num(v):
    # back to JSON numbers for the output file (the comparison above used the exact text)
    if isinstance(v, dict):
        return {k: num(x) for k, x in v.items()}
    if isinstance(v, str):
        try:
            return int(v)
        except ValueError:
            return float(v)
    return v

res = {
    "what": "uc eval with RAYON_NUM_THREADS=1 and =2, same model, reference and windows",
    "command": f"RAYON_NUM_THREADS={{1,2}} {uc} eval {model} --against {against} --sotu ... --windows {windows} --json",
    "model": a.get("model"),
    "reference": a.get("reference"),
    "text_sha256": a.get("text_sha256"),
    "tokenizer_sha256": a.get("tokenizer_sha256"),
    "seq_len": num(a.get("seq_len")),
    "windows": num(a.get("windows")),
    "runs": {
        "rayon_1": {"threads_reported": num(a.get("threads")), "seconds": num(a.get("seconds")),
                    "metrics": num(ma), "metrics_text": ma},
        "rayon_2": {"threads_reported": num(b.get("threads")), "seconds": num(b.get("seconds")),
                    "metrics": num(mb), "metrics_text": mb},
    },
    "differing_metric_fields": diffs,
    "differing_identity_fields": ident_diffs,
    "identical": not diffs and not ident_diffs,
}
with open(out, "w") as f:
    json.dump(res, f, indent=2)
    f.write("\n")
print(json.dumps({"identical": res["identical"], "differing": diffs + ident_diffs}))
sys.exit(0 if res["identical"] else 1)
EOF
