#!/usr/bin/env bash
# Inference benchmark: uc (5-bit pack, resident and --stream-layers) against llama.cpp's
# llama-bench (Q5_K_M of the same model), same thread count, measured side by side in
# one run. Writes results/bench_run.json with every raw measurement and the ratios.
#
#   scripts/bench_run.sh [THREADS] [ROUNDS]      (defaults: 2 threads, 3 rounds)
#
# Needs: assets/smollm2-135m (scripts/fetch_assets.sh), network access to PyPI for the
# llama.cpp sources (only on the first run), python3, gcc/g++. llama.cpp is built from the
# vendored source of PyPI's llama-cpp-python sdist, in $UC_SCRATCH (default
# /work/scratch/llamacpp), outside the repository; nothing of it is committed.
#
# Each round runs every configuration once, in the same order; the reported value per
# configuration is the median over rounds (other processes on a shared machine slow
# whichever run they overlap, and interleaving spreads that over all configurations).
set -euo pipefail

THREADS=${1:-2}
ROUNDS=${2:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SCRATCH=${UC_SCRATCH:-/work/scratch/llamacpp}
MODEL=$ROOT/assets/smollm2-135m
# Two packs, both 5-bit (q5g128) in the blocks; they differ in the token embedding /
# tied head: q8g64 (8.25 bpw, like llama.cpp's Q8_0 for this model; the measurement
# predates uc compress's q8g32 default) and q6g64 (6.25 bpw). The head is a fifth of the weights a decode step reads, and an
# 8-bit codebook lookup costs about twice a 5- or 6-bit one.
PACK=$SCRATCH/smollm2-135m-q5g128
PACK6=$SCRATCH/smollm2-135m-q5g128-e6
OUT=$ROOT/results/bench_run.json
UC=$ROOT/target/release/uc
mkdir -p "$SCRATCH" "$ROOT/results"

# --- uc and its pack ---------------------------------------------------------------
(cd "$ROOT" && cargo build --release -p uc-cli >&2)
# Calibration-free round-to-nearest: throughput does not depend on the encoder.
if [ ! -f "$PACK/manifest.json" ]; then
  "$UC" compress "$MODEL" -o "$PACK" --method rtn --bits 5 --group 128 --scales f16 --embed-codec q8g64 >&2
fi
if [ ! -f "$PACK6/manifest.json" ]; then
  "$UC" compress "$MODEL" -o "$PACK6" --method rtn --bits 5 --group 128 --scales f16 --embed-codec q6g64 >&2
fi

# --- llama.cpp (vendored in llama-cpp-python's sdist), built outside the repo --------
LLAMA_SRC=$(ls -d "$SCRATCH"/llama_cpp_python-*/vendor/llama.cpp 2>/dev/null | head -1 || true)
if [ -z "$LLAMA_SRC" ]; then
  python3 -m venv "$SCRATCH/venv"
  "$SCRATCH/venv/bin/pip" install -q cmake ninja numpy sentencepiece safetensors torch --index-url https://pypi.org/simple >&2
  (cd "$SCRATCH" && "$SCRATCH/venv/bin/pip" download --no-binary llama-cpp-python --no-deps llama-cpp-python >&2 \
     && tar xzf llama_cpp_python-*.tar.gz)
  LLAMA_SRC=$(ls -d "$SCRATCH"/llama_cpp_python-*/vendor/llama.cpp | head -1)
fi
BIN=$LLAMA_SRC/build/bin
if [ ! -x "$BIN/llama-bench" ]; then
  export PATH=$SCRATCH/venv/bin:$PATH
  cmake -S "$LLAMA_SRC" -B "$LLAMA_SRC/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >&2
  cmake --build "$LLAMA_SRC/build" -j "$THREADS" --target llama-bench llama-quantize >&2
fi
GGUF_F32=$SCRATCH/gguf/smollm2-135m-f32.gguf
GGUF=$SCRATCH/gguf/smollm2-135m-Q5_K_M.gguf
mkdir -p "$SCRATCH/gguf"
if [ ! -f "$GGUF" ]; then
  PY=${UC_REFERENCE_PYTHON:-$SCRATCH/venv/bin/python}
  "$PY" "$LLAMA_SRC/convert_hf_to_gguf.py" "$MODEL" --outtype f32 --outfile "$GGUF_F32" >&2
  "$BIN/llama-quantize" "$GGUF_F32" "$GGUF" Q5_K_M >&2
fi

# --- measurements ------------------------------------------------------------------
# uc links mimalloc, which by default backs its arena with transparent huge pages: a
# partly used 2 MiB page then counts whole in the resident set (measured here: streamed
# peak RSS 73 MiB with huge pages, 35 MiB without; resident 200 vs 144 MiB; throughput
# unchanged). The option is only read at process start, so it is set in the environment,
# for every uc run alike.
export MIMALLOC_ALLOW_THP=0
RAW=$(mktemp -d)
trap 'rm -rf "$RAW"' EXIT
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r/$ROUNDS" >&2
  "$UC" bench "$PACK" --threads "$THREADS" --prompt-len 512 --gen 128 --reps 1 --json > "$RAW/uc_resident_$r.json"
  "$UC" bench "$PACK" --threads "$THREADS" --prompt-len 512 --gen 128 --reps 1 --json --stream-layers > "$RAW/uc_stream_$r.json"
  "$UC" bench "$PACK" --threads "$THREADS" --prompt-len 1 --gen 128 --reps 1 --json > "$RAW/uc_d0_$r.json"
  "$UC" bench "$PACK6" --threads "$THREADS" --prompt-len 512 --gen 128 --reps 1 --json > "$RAW/uc6_resident_$r.json"
  "$UC" bench "$PACK6" --threads "$THREADS" --prompt-len 1 --gen 128 --reps 1 --json > "$RAW/uc6_d0_$r.json"
  "$BIN/llama-bench" -m "$GGUF" -t "$THREADS" -p 512 -n 128 -r 1 -o json > "$RAW/llama_$r.json" 2>/dev/null
  "$BIN/llama-bench" -m "$GGUF" -t "$THREADS" -p 0 -n 128 -d 512 -r 1 -o json > "$RAW/llama_d512_$r.json" 2>/dev/null
done

python3 - "$RAW" "$ROUNDS" "$THREADS" "$OUT" "$PACK" "$GGUF" "$PACK6" <<'PY'
import json, statistics, sys, platform, os
raw, rounds, threads, out, pack, gguf, pack6 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7]
load = lambda n: [json.load(open(f"{raw}/{n}_{r}.json")) for r in range(1, rounds + 1)]
res, stream, d0 = load("uc_resident"), load("uc_stream"), load("uc_d0")
res6, d06 = load("uc6_resident"), load("uc6_d0")
llama, llama_d512 = load("llama"), load("llama_d512")
med = statistics.median
def ll(runs, n_prompt, n_gen, depth=0):
    v = [t["avg_ts"] for run in runs for t in run
         if t["n_prompt"] == n_prompt and t["n_gen"] == n_gen and t.get("n_depth", 0) == depth]
    return {"runs": v, "median": med(v)}
u = lambda runs, k: {"runs": [r[k] for r in runs], "median": med([r[k] for r in runs])}
m = {
  "uc_prefill_tok_s": u(res, "prefill_tok_s"),
  "uc_ttft_ms": u(res, "ttft_ms"),
  "uc_decode_tok_s_depth512": u(res, "decode_tok_s"),
  "uc_decode_tok_s_depth0": u(d0, "decode_tok_s"),
  "uc_peak_rss_mib": u(res, "peak_rss_mib"),
  "uc_stream_prefill_tok_s": u(stream, "prefill_tok_s"),
  "uc_stream_decode_tok_s_depth512": u(stream, "decode_tok_s"),
  "uc_stream_peak_rss_mib": u(stream, "peak_rss_mib"),
  "uc_e6_prefill_tok_s": u(res6, "prefill_tok_s"),
  "uc_e6_decode_tok_s_depth512": u(res6, "decode_tok_s"),
  "uc_e6_decode_tok_s_depth0": u(d06, "decode_tok_s"),
  "llama_pp512_tok_s": ll(llama, 512, 0),
  "llama_tg128_tok_s_depth0": ll(llama, 0, 128),
  "llama_tg128_tok_s_depth512": ll(llama_d512, 0, 128, 512),
}
v = lambda k: m[k]["median"]
ratios = {
  "decode_depth0_uc_over_llama": v("uc_decode_tok_s_depth0") / v("llama_tg128_tok_s_depth0"),
  "decode_depth512_uc_over_llama": v("uc_decode_tok_s_depth512") / v("llama_tg128_tok_s_depth512"),
  "prefill_uc_over_llama": v("uc_prefill_tok_s") / v("llama_pp512_tok_s"),
  "stream_peak_rss_over_resident": v("uc_stream_peak_rss_mib") / v("uc_peak_rss_mib"),
  "stream_prefill_over_resident": v("uc_stream_prefill_tok_s") / v("uc_prefill_tok_s"),
  "e6_decode_depth0_uc_over_llama": v("uc_e6_decode_tok_s_depth0") / v("llama_tg128_tok_s_depth0"),
  "e6_decode_depth512_uc_over_llama": v("uc_e6_decode_tok_s_depth512") / v("llama_tg128_tok_s_depth512"),
  "e6_prefill_uc_over_llama": v("uc_e6_prefill_tok_s") / v("llama_pp512_tok_s"),
}
targets = {
  "decode_depth0_uc_over_llama": ">= 1.0", "decode_depth512_uc_over_llama": ">= 1.0",
  "prefill_uc_over_llama": ">= 0.5", "stream_peak_rss_over_resident": "<= 0.30",
  "stream_prefill_over_resident": ">= 0.90",
  "e6_decode_depth0_uc_over_llama": ">= 1.0", "e6_decode_depth512_uc_over_llama": ">= 1.0",
  "e6_prefill_uc_over_llama": ">= 0.5",
}
report = {
  "what": "uc bench (5-bit pack) vs llama.cpp llama-bench (Q5_K_M), same machine, same threads, interleaved rounds, medians",
  "command": f"scripts/bench_run.sh {threads} {rounds}",
  "threads": threads, "rounds": rounds,
  "uc_pack": {"path": os.path.basename(pack), "fingerprint": res[0]["model"]["fingerprint"],
              "bpw_body": res[0]["model"]["bpw_body"], "bpw_model": res[0]["model"]["bpw_model"],
              "embed_codec": "q8g64"},
  "uc_pack_e6": {"path": os.path.basename(pack6), "fingerprint": res6[0]["model"]["fingerprint"],
                 "bpw_body": res6[0]["model"]["bpw_body"], "bpw_model": res6[0]["model"]["bpw_model"],
                 "embed_codec": "q6g64"},
  "llama_model": {"file": os.path.basename(gguf), "type": llama[0][0].get("model_type"),
                  "size_bytes": llama[0][0].get("model_size"), "build": llama[0][0].get("build_commit")},
  "machine": res[0]["machine"],
  "loadavg_at_end": open("/proc/loadavg").read().split()[:3],
  "uc_env": {"MIMALLOC_ALLOW_THP": os.environ.get("MIMALLOC_ALLOW_THP")},
  "measurements": m, "ratios": ratios, "targets": targets,
}
json.dump(report, open(out, "w"), indent=2)
open(out, "a").write("\n")
for k, r in ratios.items():
    print(f"{k:34s} {r:7.3f}   (target {targets[k]})")
PY
echo "wrote $OUT" >&2
