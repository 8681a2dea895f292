#!/usr/bin/env bash
# Evaluation throughput, uc against llama.cpp's perplexity tool on the same f32 model and
# text (issue 11: `uc eval` tokens/s >= 1.0x llama-perplexity). Writes
# results/bench_eval_llamacpp.json.
#
#   scripts/bench_eval_llamacpp.sh [THREADS] [ROUNDS] [WINDOWS]   (defaults: 2, 2, 32)
#
# Each round runs, in this order:
#   uc     uc eval assets/smollm2-135m --text TEXT --windows W --seq-len 1024 --score-from 512
#          (the f32 checkpoint; RAYON_NUM_THREADS=THREADS)
#   llama  llama-perplexity -m F32.gguf -f TEXT -c 1024 --chunks W -t THREADS
#          (the same weights as an F32 GGUF; llama-perplexity scores the second half of
#          each 1024-token chunk, which is what --score-from 512 makes uc score)
# Both run W windows of 1024 tokens through the model; tokens/s = W * 1024 / wall seconds,
# process start to exit (model load included, as a user waits for it). Medians over rounds.
# Both perplexities are reported as a check that the two computed the same thing (their
# tokenizers may split the text differently at the edges, so they agree closely, not
# exactly).
#
# Inputs: TEXT = $UC_EVAL_TEXT (default assets/devil/devil.txt, scripts/fetch_assets.sh);
# F32.gguf = $UC_EVAL_GGUF (default $UC_SCRATCH/decode/smollm2-135m-f32.gguf, made with
# llama-quantize from the teacher GGUF as scripts/bench_decode.sh makes it); llama.cpp in
# $LLAMA_BIN (as for scripts/bench_decode.sh).
set -euo pipefail

THREADS=${1:-2}
ROUNDS=${2:-2}
WINDOWS=${3:-32}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SCRATCH=${UC_SCRATCH:-/work/scratch/llamacpp}
TEXT=${UC_EVAL_TEXT:-$ROOT/assets/devil/devil.txt}
GGUF=${UC_EVAL_GGUF:-$SCRATCH/decode/smollm2-135m-f32.gguf}
OUT=${UC_EVAL_OUT:-$ROOT/results/bench_eval_llamacpp.json}
UC=${CARGO_TARGET_DIR:-$ROOT/target}/release/uc
if [ -z "${LLAMA_BIN:-}" ]; then
  LLAMA_BIN=$(ls -d "$SCRATCH"/llama_cpp_python-*/vendor/llama.cpp/build/bin 2>/dev/null | head -1 || true)
fi
[ -x "$LLAMA_BIN/llama-perplexity" ] || { echo "no llama-perplexity in LLAMA_BIN=$LLAMA_BIN" >&2; exit 2; }
[ -f "$TEXT" ] || { echo "no text $TEXT (scripts/fetch_assets.sh)" >&2; exit 2; }
(cd "$ROOT" && cargo build --release -p uc-cli >&2)
if [ ! -f "$GGUF" ]; then
  mkdir -p "$(dirname "$GGUF")"
  "$LLAMA_BIN/llama-quantize" --allow-requantize "$ROOT/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$GGUF" F32 >&2
fi
RAW=$(mktemp -d)
trap 'rm -rf "$RAW"' EXIT

for r in $(seq 1 "$ROUNDS"); do
  echo "round $r/$ROUNDS (loadavg $(cut -d' ' -f1 /proc/loadavg))" >&2
  cut -d' ' -f1 /proc/loadavg > "$RAW/uc_load_$r"
  s=$(date +%s%N)
  RAYON_NUM_THREADS=$THREADS "$UC" eval "$ROOT/assets/smollm2-135m" --text "$TEXT" \
    --windows "$WINDOWS" --seq-len 1024 --score-from 512 --json > "$RAW/uc_$r.json"
  echo $(( $(date +%s%N) - s )) > "$RAW/uc_wall_$r"
  cut -d' ' -f1 /proc/loadavg > "$RAW/llama_load_$r"
  s=$(date +%s%N)
  "$LLAMA_BIN/llama-perplexity" -m "$GGUF" -f "$TEXT" -c 1024 --chunks "$WINDOWS" \
    -t "$THREADS" > "$RAW/llama_$r.txt" 2>&1
  echo $(( $(date +%s%N) - s )) > "$RAW/llama_wall_$r"
done

python3 - "$RAW" "$ROUNDS" "$THREADS" "$WINDOWS" "$OUT" "$TEXT" "$GGUF" <<'PY'
import json, re, statistics, sys
raw, rounds, threads, windows, out, text, gguf = sys.argv[1:]
rounds, threads, windows = int(rounds), int(threads), int(windows)
tokens = windows * 1024
def f(p): return float(open(p).read().strip())
# wall times were written in nanoseconds
uc_wall = [f(f"{raw}/uc_wall_{r}") / 1e9 for r in range(1, rounds + 1)]
ll_wall = [f(f"{raw}/llama_wall_{r}") / 1e9 for r in range(1, rounds + 1)]
uc = json.load(open(f"{raw}/uc_1.json"))
ll_txt = open(f"{raw}/llama_1.txt").read()
m = re.search(r"Final estimate: PPL = ([0-9.]+)", ll_txt)
res = {
    "what": "evaluation throughput: uc eval (f32 checkpoint) vs llama.cpp llama-perplexity (same weights as F32 GGUF), same text, 1024-token windows, second half of each scored, interleaved rounds, wall time per process (load included), medians",
    "command": f"scripts/bench_eval_llamacpp.sh {threads} {rounds} {windows}",
    "threads": threads, "rounds": rounds, "windows": windows, "tokens_per_run": tokens,
    "text": text.split("/")[-1], "gguf": gguf.split("/")[-1],
    "loadavg_1min_before": {
        "uc": [f(f"{raw}/uc_load_{r}") for r in range(1, rounds + 1)],
        "llama": [f(f"{raw}/llama_load_{r}") for r in range(1, rounds + 1)],
    },
    "uc": {"wall_s": uc_wall, "tokens_per_s_median": tokens / statistics.median(uc_wall),
           "ppl": uc.get("ppl"), "receipt_tokens_per_s": uc.get("tokens_per_s")},
    "llama_perplexity": {"wall_s": ll_wall, "tokens_per_s_median": tokens / statistics.median(ll_wall),
                         "ppl": float(m.group(1)) if m else None},
}
res["ratio_uc_over_llama"] = res["uc"]["tokens_per_s_median"] / res["llama_perplexity"]["tokens_per_s_median"]
json.dump(res, open(out, "w"), indent=1)
print(json.dumps(res, indent=1))
PY
