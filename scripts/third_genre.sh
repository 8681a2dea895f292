#!/usr/bin/env bash
# A third evaluation genre: technical prose (docutils' reStructuredText documentation,
# assets/calib-mix/docs from scripts/fetch_assets.sh). The default pack calibrates on the
# SOTU speeches only (scripts/main_job.sh), so this text is outside its calibration, as
# the Devil's Dictionary is. Scores uc's 5.0 and 4.0 packs (the acceptance rows "t2",
# made by `METHODS=gptq SUFFIX=_t2 scripts/bench_compress.sh "5.0 4.0"`) and llama.cpp's
# Q4_K_M+imatrix and Q3_K_M+imatrix rows (scripts/llamacpp_rows.sh: imatrix on the SOTU
# calibration split, as in every other row) with the same harness: uc eval against the
# f32 teacher, the first 32 x 1024-token windows of the text.
#
#   scripts/third_genre.sh [PACK_DIR]   (default packs/bench_compress: gptq_5.0_t2, gptq_4.0_t2)
#   TAG=_m BUDGETS="5.0 4.0 3.0" scripts/third_genre.sh   (the packs gptq_<B>_m)
#
# Writes results/llamacpp_rows_docs.json (llamacpp_rows.sh; kept when present, LLAMA_ROWS=1
# measures it again) and results/third_genre_docs<TAG>.json (TAG "_t2": no suffix; OUT=...
# names another file).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PACKS=${1:-packs/bench_compress}
UC=${UC:-$ROOT/target/release/uc}
TEXT=$ROOT/packs/docs.txt
[ -d assets/calib-mix/docs ] || { echo "no assets/calib-mix/docs (scripts/fetch_assets.sh)" >&2; exit 2; }
mkdir -p packs results
# The files in name order, joined by "\n\n" (as --calib-dir reads a source).
python3 - "$TEXT" <<'PY'
import os, sys
d = "assets/calib-mix/docs"
parts = [open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))]
open(sys.argv[1], "wb").write(b"\n\n".join(parts))
PY
export TAG=${TAG:-_t2} BUDGETS=${BUDGETS:-5.0 4.0}
OUT=${OUT:-results/third_genre_docs${TAG/#_t2/}.json}
if [[ ! -f results/llamacpp_rows_docs.json || ${LLAMA_ROWS:-0} == 1 ]]; then
  UC_EVAL_TEXT=$TEXT UC=$UC scripts/llamacpp_rows.sh Q4_K_M+imatrix Q3_K_M+imatrix
fi
rows=()
for b in $BUDGETS; do
  pack=$PACKS/gptq_${b}${TAG}
  "$UC" eval "$pack" --against assets/smollm2-135m --text "$TEXT" --windows 32 --seq-len 1024 \
    --json > "packs/third_genre_$b$TAG.json"
  rows+=("$b$TAG" "$pack")
done
python3 - "$OUT" "${rows[@]}" <<'PY'
import json, os, sys
outpath, args = sys.argv[1], sys.argv[2:]
out = {"what": "uc packs and llama.cpp rows on a third genre (docutils documentation, technical prose), 32 x 1024 windows, uc eval against the f32 teacher",
       "command": f"TAG={os.environ['TAG']} BUDGETS=\"{os.environ['BUDGETS']}\" scripts/third_genre.sh", "text": "packs/docs.txt (assets/calib-mix/docs, name order, joined by blank lines)",
       "uc": [], "llamacpp": json.load(open("results/llamacpp_rows_docs.json"))}
for b, pack in zip(args[::2], args[1::2]):
    e = json.load(open(f"packs/third_genre_{b}.json"))
    b = b.split("_")[0]
    m = json.load(open(f"{pack}/manifest.json"))
    out["uc"].append({"bpw": float(b), "pack": pack, "fingerprint": m["fingerprint"], "bpw_body": m["bpw_body"], "eval": e})
json.dump(out, open(outpath, "w"), indent=1)
def nums(e):
    return {k: e.get(k) for k in ("ppl_ratio", "kld", "top1")}
for r in out["uc"]:
    print("uc", r["bpw"], {k: v for k, v in r["eval"].items() if not isinstance(v, (dict, list))})
PY
