#!/usr/bin/env bash
# Decode and prefill from the DEFAULT pack (uc compress defaults: 5.0 bpw, g64 e8 scales,
# q8g32 tied embedding/head; what scripts/main_job.sh writes) against llama.cpp's
# llama-bench on Q4_K_M of the same model, as a new user would run them: 512-token
# prompt, 128 generated tokens, THREADS threads. Issue 11, "must reach" decode >= 1.0x,
# prefill >= 2x. Writes results/bench_decode.json.
#
#   scripts/bench_decode.sh [THREADS] [ROUNDS]      (defaults: 2 threads, 5 rounds)
#   (UC_DECODE_OUT=results/other.json to write elsewhere, e.g. a 1-thread run)
#
# Each round runs every configuration once, in the same order: other processes on a
# shared machine slow whichever run they overlap, and interleaving spreads that over all
# configurations; the reported value is the median over rounds. /proc/loadavg is
# sampled before every run and written with the results. A load above the thread count
# means a busy machine: then spin-waiting thread pools (llama.cpp's) collapse far more
# than uc's team, which yields, so only idle-machine or 1-thread ratios are like for like.
#
# Configurations (each round):
#   uc             uc bench PACK --prompt-len 512 --gen 128      (decode at depth 512..640)
#   uc_d0          uc bench PACK --prompt-len 1 --gen 128        (decode from depth 1)
#   uc_f32         as uc, with UC_MATVEC=f32 (the f32 fused kernels instead of the int16
#                  decode kernel: the same binary, the kernel choice only)
#   [uc_base]      as uc, with $UC_BASE (an older uc binary), when set: before/after
#   llama          llama-bench -p 512 -n 128 (its tg128 runs from an empty cache)
#   llama_d512     llama-bench -p 0 -n 128 -d 512 (decode at depth 512, like uc's)
#
# Inputs (made when missing; nothing is written into the repository but results/):
#   PACK  $UC_DECODE_PACK  (default $UC_SCRATCH/decode/default-pack), made by
#         uc compress assets/smollm2-135m -o PACK --calib-sotu assets/sotu
#   GGUF  $UC_DECODE_GGUF  (default $UC_SCRATCH/decode/q4km.gguf), made by llama-quantize
#         --allow-requantize from assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf to F32,
#         then F32 -> Q4_K_M (as scripts/llamacpp_rows.sh does)
#   llama.cpp binaries in $LLAMA_BIN (default: the build scripts/bench_run.sh makes under
#         $UC_SCRATCH/llama_cpp_python-*/vendor/llama.cpp/build/bin)
set -euo pipefail

THREADS=${1:-2}
ROUNDS=${2:-5}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SCRATCH=${UC_SCRATCH:-/work/scratch/llamacpp}
ASSETS=${UC_ASSETS:-$ROOT/assets}
PACK=${UC_DECODE_PACK:-$SCRATCH/decode/default-pack}
GGUF=${UC_DECODE_GGUF:-$SCRATCH/decode/q4km.gguf}
OUT=${UC_DECODE_OUT:-$ROOT/results/bench_decode.json}
UC=${CARGO_TARGET_DIR:-$ROOT/target}/release/uc
if [ -z "${LLAMA_BIN:-}" ]; then
  LLAMA_BIN=$(ls -d "$SCRATCH"/llama_cpp_python-*/vendor/llama.cpp/build/bin 2>/dev/null | head -1 || true)
fi
[ -x "$LLAMA_BIN/llama-bench" ] || { echo "no llama-bench in LLAMA_BIN=$LLAMA_BIN (build it with scripts/bench_run.sh)" >&2; exit 2; }
mkdir -p "$(dirname "$PACK")" "$(dirname "$GGUF")" "$ROOT/results"

(cd "$ROOT" && cargo build --release -p uc-cli >&2)
if [ ! -f "$PACK/manifest.json" ]; then
  "$UC" compress "$ASSETS/smollm2-135m" -o "$PACK" --calib-sotu "$ASSETS/sotu" >&2
fi
if [ ! -f "$GGUF" ]; then
  F32=$(dirname "$GGUF")/smollm2-135m-f32.gguf
  "$LLAMA_BIN/llama-quantize" --allow-requantize "$ASSETS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$F32" F32 >&2
  "$LLAMA_BIN/llama-quantize" "$F32" "$GGUF" Q4_K_M >&2
fi

# As in scripts/bench_run.sh: mimalloc's huge pages only inflate RSS, same for every run.
export MIMALLOC_ALLOW_THP=0
RAW=$(mktemp -d)
trap 'rm -rf "$RAW"' EXIT
load() { cut -d' ' -f1 /proc/loadavg; }
ucb() { "$UC" bench "$PACK" --threads "$THREADS" --reps 1 --json "$@"; }
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r/$ROUNDS (loadavg $(load))" >&2
  load > "$RAW/load_uc_$r";       ucb --prompt-len 512 --gen 128 > "$RAW/uc_$r.json"
  load > "$RAW/load_uc_d0_$r";    ucb --prompt-len 1 --gen 128 > "$RAW/uc_d0_$r.json"
  load > "$RAW/load_uc_f32_$r";   UC_MATVEC=f32 ucb --prompt-len 512 --gen 128 > "$RAW/uc_f32_$r.json"
  if [ -n "${UC_BASE:-}" ]; then
    load > "$RAW/load_uc_base_$r"
    "$UC_BASE" bench "$PACK" --threads "$THREADS" --reps 1 --json --prompt-len 512 --gen 128 > "$RAW/uc_base_$r.json"
  fi
  load > "$RAW/load_llama_$r"
  "$LLAMA_BIN/llama-bench" -m "$GGUF" -t "$THREADS" -p 512 -n 128 -r 1 -o json > "$RAW/llama_$r.json" 2>/dev/null
  load > "$RAW/load_llama_d512_$r"
  "$LLAMA_BIN/llama-bench" -m "$GGUF" -t "$THREADS" -p 0 -n 128 -d 512 -r 1 -o json > "$RAW/llama_d512_$r.json" 2>/dev/null
done

python3 - "$RAW" "$ROUNDS" "$THREADS" "$OUT" "$PACK" "$GGUF" "${UC_BASE:-}" <<'PY'
import json, statistics, sys, os
raw, rounds, threads, out, pack, gguf, base = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7]
med = statistics.median
R = range(1, rounds + 1)
load = lambda n: [json.load(open(f"{raw}/{n}_{r}.json")) for r in R]
loads = lambda n: [float(open(f"{raw}/load_{n}_{r}").read()) for r in R]
uc, uc_d0, uc_f32 = load("uc"), load("uc_d0"), load("uc_f32")
uc_base = load("uc_base") if base else None
llama, llama_d512 = load("llama"), load("llama_d512")
def ll(runs, n_prompt, n_gen, depth=0):
    v = [t["avg_ts"] for run in runs for t in run
         if t["n_prompt"] == n_prompt and t["n_gen"] == n_gen and t.get("n_depth", 0) == depth]
    return {"runs": v, "median": med(v)}
u = lambda runs, k: {"runs": [x[k] for x in runs], "median": med([x[k] for x in runs])}
m = {
  "uc_prefill_tok_s": u(uc, "prefill_tok_s"),
  "uc_decode_tok_s": u(uc, "decode_tok_s"),
  "uc_decode_tok_s_depth0": u(uc_d0, "decode_tok_s"),
  "uc_f32_kernels_prefill_tok_s": u(uc_f32, "prefill_tok_s"),
  "uc_f32_kernels_decode_tok_s": u(uc_f32, "decode_tok_s"),
  "uc_peak_rss_mib": u(uc, "peak_rss_mib"),
  "uc_resident_weights_mib": {"median": uc[0]["model"]["resident_weights_mib"]},
  "llama_pp512_tok_s": ll(llama, 512, 0),
  "llama_tg128_tok_s": ll(llama, 0, 128),
  "llama_tg128_tok_s_depth512": ll(llama_d512, 0, 128, 512),
}
if uc_base:
  m["uc_base_prefill_tok_s"] = u(uc_base, "prefill_tok_s")
  m["uc_base_decode_tok_s"] = u(uc_base, "decode_tok_s")
v = lambda k: m[k]["median"]
ratios = {
  # The issue's measurement: uc bench 512 + 128 against llama-bench -p 512 -n 128.
  "decode_uc_over_llama": v("uc_decode_tok_s") / v("llama_tg128_tok_s"),
  "prefill_uc_over_llama": v("uc_prefill_tok_s") / v("llama_pp512_tok_s"),
  # The same depth on both sides (llama-bench's tg128 starts from an empty cache).
  "decode_depth0_uc_over_llama": v("uc_decode_tok_s_depth0") / v("llama_tg128_tok_s"),
  "decode_depth512_uc_over_llama": v("uc_decode_tok_s") / v("llama_tg128_tok_s_depth512"),
  "decode_f32_kernels_over_llama": v("uc_f32_kernels_decode_tok_s") / v("llama_tg128_tok_s"),
}
if uc_base:
  ratios["decode_uc_over_base"] = v("uc_decode_tok_s") / v("uc_base_decode_tok_s")
  ratios["decode_base_over_llama"] = v("uc_base_decode_tok_s") / v("llama_tg128_tok_s")
targets = {"decode_uc_over_llama": ">= 1.0", "prefill_uc_over_llama": ">= 2.0"}
allload = [x for n in ["uc", "uc_d0", "uc_f32", "llama", "llama_d512"] + (["uc_base"] if base else []) for x in loads(n)]
report = {
  "what": "decode/prefill from the default uc pack vs llama.cpp Q4_K_M of the same model; uc bench (prompt 512, gen 128) and llama-bench (-p 512 -n 128), same threads, interleaved rounds, medians",
  "command": f"scripts/bench_decode.sh {threads} {rounds}",
  "threads": threads, "rounds": rounds,
  "uc_pack": {"path": os.path.basename(pack), "fingerprint": uc[0]["model"]["fingerprint"],
              "bpw_body": uc[0]["model"]["bpw_body"], "bpw_model": uc[0]["model"]["bpw_model"]},
  "uc_base_binary": base or None,
  "llama_model": {"file": os.path.basename(gguf), "type": llama[0][0].get("model_type"),
                  "size_bytes": llama[0][0].get("model_size"), "build": llama[0][0].get("build_commit")},
  "machine": uc[0]["machine"],
  "load": {
    "loadavg_1min_before_each_run": {n: loads(n) for n in ["uc", "uc_d0", "uc_f32", "llama", "llama_d512"] + (["uc_base"] if base else [])},
    "median": med(allload), "max": max(allload),
    "busy": max(allload) > threads,
    "note": "1-minute load average sampled before each run. Above the thread count, other processes shared the cores: interleaving spreads that over all configurations, but runtimes that spin-wait between parallel loops (llama.cpp's thread pool; uc before its team yielded) lose far more than their share when a core is taken, so 2-thread ratios from a busy machine overstate uc against llama.cpp. Compare on an idle machine, or at 1 thread (no barriers).",
  },
  "uc_env": {"MIMALLOC_ALLOW_THP": os.environ.get("MIMALLOC_ALLOW_THP")},
  "measurements": m, "ratios": ratios, "targets": targets,
}
json.dump(report, open(out, "w"), indent=2)
open(out, "a").write("\n")
for k, x in m.items():
  print(f"{k:34s} {x['median']:9.2f}")
for k, r in ratios.items():
  print(f"{k:34s} {r:9.3f}   {('(target ' + targets[k] + ')') if k in targets else ''}")
PY
echo "wrote $OUT" >&2
