#!/usr/bin/env bash
# Does llama.cpp load `uc export --to gguf` output, and what perplexity does its own tool
# give on it next to `uc eval` on the pack?  Writes results/export_llamacpp_ppl.json.
#
# usage: scripts/export_llamacpp_ppl.sh [PACK] [TEXT] [WINDOWS]
#   PACK     default packs/smollm2-135m-default (the README's main-job pack)
#   TEXT     default assets/devil/devil.txt (scripts/fetch_assets.sh)
#   WINDOWS  default 8 windows of 1024 tokens
#
# Protocols differ, so the two perplexities are not expected to be equal: `uc eval` scores
# every position of each 1024-token window (no BOS); llama-perplexity scores only the
# second half of each 1024-token chunk (the first half is context) and follows the GGUF's
# add_bos flag. The f32 and f16 GGUFs are scored by the same llama.cpp protocol, so their
# ratio isolates the f16 rounding. To separate the protocol difference from the export,
# the same two tools also score the uncompressed teacher (TEACHER_GGUF with llama.cpp,
# TEACHER with uc eval; the same weights): export_fidelity = (llama.cpp / uc on the
# pack) / (llama.cpp / uc on the teacher) is 1 when llama.cpp on the exported GGUF sees
# the pack as uc does.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PACK=${1:-packs/smollm2-135m-default}
TEXT=${2:-assets/devil/devil.txt}
WINDOWS=${3:-8}
THREADS=${THREADS:-2}
BIN=${LLAMA_BIN:-/work/scratch/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin}
UC=$ROOT/target/release/uc
TEACHER=${TEACHER:-assets/smollm2-135m}
TEACHER_GGUF=${TEACHER_GGUF:-/work/scratch/llamacpp/rows-0.3.36/smollm2-135m-F32.gguf}
WORK=$ROOT/packs/export-check
mkdir -p "$WORK" results
[ -x "$UC" ] || cargo build --release -p uc-cli

rows=()
for dt in f32 f16; do
    g=$WORK/$(basename "$PACK").$dt.gguf
    rm -f "$g"
    "$UC" export "$PACK" --to gguf "$g" --dtype $dt --json > "$WORK/export_$dt.json"
    out=$WORK/llama_perplexity_$dt.txt
    "$BIN/llama-perplexity" -m "$g" -f "$TEXT" -c 1024 --chunks "$WINDOWS" -t "$THREADS" > "$out" 2>&1
    ppl=$(grep -oP 'Final estimate: PPL = \K[0-9.]+' "$out")
    rows+=("{\"dtype\": \"$dt\", \"gguf_bytes\": $(stat -c %s "$g"), \"llama_perplexity_ppl\": $ppl}")
done
"$UC" eval "$PACK" --text "$TEXT" --windows "$WINDOWS" --seq-len 1024 --json > "$WORK/uc_eval.json"
"$UC" eval "$TEACHER" --text "$TEXT" --windows "$WINDOWS" --seq-len 1024 --json > "$WORK/uc_eval_teacher.json"
"$BIN/llama-perplexity" -m "$TEACHER_GGUF" -f "$TEXT" -c 1024 --chunks "$WINDOWS" -t "$THREADS" > "$WORK/llama_perplexity_teacher.txt" 2>&1
TEACHER_LLAMA=$(grep -oP 'Final estimate: PPL = \K[0-9.]+' "$WORK/llama_perplexity_teacher.txt")
python3 - "$WORK" "$PACK" "$TEXT" "$WINDOWS" "$TEACHER" "$TEACHER_GGUF" "$TEACHER_LLAMA" "${rows[@]}" <<'PY'
import json, sys
work, pack, text, windows, teacher, teacher_gguf, teacher_llama, *rows = sys.argv[1:]
rows = [json.loads(r) for r in rows]
ev = json.load(open(f"{work}/uc_eval.json"))
uc_ppl = ev["ppl"] if "ppl" in ev else ev["model"]["ppl"]
f32 = next(r for r in rows if r["dtype"] == "f32")
f16 = next(r for r in rows if r["dtype"] == "f16")
out = {
    "pack": pack, "text": text, "windows": int(windows), "window_tokens": 1024,
    "command": f"scripts/export_llamacpp_ppl.sh {pack} {text} {windows}",
    "uc_eval_ppl_on_pack": uc_ppl,
    "llamacpp": rows,
    "ratio_llamacpp_f32_over_uc_eval": f32["llama_perplexity_ppl"] / uc_ppl,
    "ratio_llamacpp_f16_over_f32": f16["llama_perplexity_ppl"] / f32["llama_perplexity_ppl"],
    "teacher": {"uc_eval": teacher, "llama_perplexity": teacher_gguf,
                "uc_eval_ppl": json.load(open(f"{work}/uc_eval_teacher.json"))["ppl"],
                "llama_perplexity_ppl": float(teacher_llama)},
    "export_report_f32": json.load(open(f"{work}/export_f32.json")),
    "note": "uc eval scores all positions of each window; llama-perplexity the second half of each chunk",
}
t = out["teacher"]
t["ratio_llamacpp_over_uc_eval"] = t["llama_perplexity_ppl"] / t["uc_eval_ppl"]
out["export_fidelity"] = out["ratio_llamacpp_f32_over_uc_eval"] / t["ratio_llamacpp_over_uc_eval"]
json.dump(out, open("results/export_llamacpp_ppl.json", "w"), indent=2)
print(json.dumps(out, indent=2))
PY
