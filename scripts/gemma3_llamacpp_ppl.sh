#!/usr/bin/env bash
# Is uc's import of Gemma 3 right? llama.cpp's own perplexity tool on the original GGUF
# against uc eval on the imported directory, on the same tokens, scored like for like.
# Writes results/gemma3_llamacpp_ppl.json.
#
# usage: scripts/gemma3_llamacpp_ppl.sh [WINDOWS=8]
#   GEMMA_DIR  scripts/fetch_gemma3.sh's directory (default assets/gemma3-270m)
#   LLAMA_BIN  llama.cpp's build/bin with llama-perplexity (PyPI llama-cpp-python==0.3.36's
#              vendored llama.cpp, built as scripts/llamacpp_rows.sh builds it)
#   UC         the uc binary (default target/release/uc)
#
# Protocol: the SOTU eval split (joined as uc eval --sotu joins it) and The Devil's
# Dictionary, WINDOWS chunks of 1024 tokens. llama-perplexity scores the second half of
# each chunk (predictions at positions 512..1022); uc eval --score-from 512 scores the
# same predictions. BOS is switched off in llama.cpp (--override-kv
# tokenizer.ggml.add_bos_token=bool:false), since uc eval's windows have none: both tools
# then see the identical token windows (tokenization checked equal by
# scripts/gemma3_tokenization.py). llama.cpp runs with an f32 KV cache and flash attention
# off and without weight repacking (-nr: this build's AMX repacked matmul segfaults on an
# AMX machine), so what differs is the arithmetic (ggml's quantized dot products on the Q4_K/Q5_0/
# Q6_K/Q8_0 weights vs uc's f32 GEMMs on the dequantized weights), not the protocol.
# Per-chunk mean NLLs come from llama-perplexity's running estimates ([i]ppl), which are
# exp of the mean over the first i chunks.
# llama.cpp scores two files: the Q4_K_M GGUF itself, whose matmuls quantize the
# activations to 8 bits (ggml's vec_dot_type for K-quants), and the same weights expanded
# to an F32 GGUF (llama-quantize --allow-requantize ... F32, as scripts/llamacpp_rows.sh
# makes its teacher), whose matmuls are f32 like uc's.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
WINDOWS=${1:-8}
GEMMA_DIR=${GEMMA_DIR:-assets/gemma3-270m}
LLAMA_BIN=${LLAMA_BIN:-/work/scratch/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin}
UC=${UC:-target/release/uc}
GGUF=$GEMMA_DIR/gemma-3-270m-q4_k_m.gguf
MODEL=$GEMMA_DIR/hf
THREADS=${THREADS:-2}
for f in "$UC" "$GGUF" "$MODEL/config.json" "$LLAMA_BIN/llama-perplexity"; do
  [ -e "$f" ] || { echo "error: missing $f" >&2; exit 1; }
done
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python3 - "$ROOT/assets/sotu/speeches" "$WORK/sotu_eval.txt" <<'PY'
import re, sys
from pathlib import Path
d, out = Path(sys.argv[1]), sys.argv[2]
files = []
for p in d.glob("*.txt"):
    m = re.fullmatch(r"(\d{4})-(.+)-(\d+)\.txt", p.name)
    if m and int(m.group(1)) >= 2000:
        files.append(((int(m.group(1)), int(m.group(3)), m.group(2)), p))
Path(out).write_bytes(b"\n\n".join(p.read_bytes() for _, p in sorted(files)))
PY
cp assets/devil/devil.txt "$WORK/devil.txt"

"$LLAMA_BIN/llama-quantize" --allow-requantize "$GGUF" "$WORK/F32.gguf" F32 "$THREADS" \
  > "$WORK/quantize.log" 2>&1 || { tail -20 "$WORK/quantize.log" >&2; exit 1; }
for t in sotu_eval devil; do
  for g in q4km f32; do
    if [ $g = q4km ]; then m=$GGUF; else m=$WORK/F32.gguf; fi
    "$LLAMA_BIN/llama-perplexity" -m "$m" -f "$WORK/$t.txt" -c 1024 --chunks "$WINDOWS" \
      -t "$THREADS" --no-escape -ctk f32 -ctv f32 -fa off -nr \
      --override-kv tokenizer.ggml.add_bos_token=bool:false > "$WORK/llama_${g}_$t.txt" 2>&1 \
      || { tail -20 "$WORK/llama_${g}_$t.txt" >&2; exit 1; }
  done
  "$UC" eval "$MODEL" --text "$WORK/$t.txt" --windows "$WINDOWS" --seq-len 1024 \
    --score-from 512 --json > "$WORK/uc_$t.json"
  "$UC" eval "$MODEL" --text "$WORK/$t.txt" --windows "$WINDOWS" --seq-len 1024 \
    --json > "$WORK/uc_all_$t.json"
done

python3 - "$WORK" "$WINDOWS" "$(git rev-parse HEAD 2>/dev/null || echo unknown)" <<'PY'
import json, math, re, sys
work, windows, commit = sys.argv[1], int(sys.argv[2]), sys.argv[3]
out = {"what": "llama-perplexity on gemma-3-270m-q4_k_m.gguf vs uc eval on its uc import, same token windows, same scored positions",
       "command": f"scripts/gemma3_llamacpp_ppl.sh {windows}", "uc_commit": commit,
       "llama_cpp": "PyPI llama-cpp-python==0.3.36 vendor/llama.cpp: llama-perplexity -c 1024 --chunks N -ctk f32 -ctv f32 -fa off -nr --override-kv tokenizer.ggml.add_bos_token=bool:false, on the Q4_K_M GGUF and on its F32 expansion (llama-quantize --allow-requantize GGUF F32.gguf F32)",
       "uc": "uc eval GEMMA_DIR/hf --text FILE --windows N --seq-len 1024 --score-from 512",
       "texts": {}}
def llama(path):
    log = open(path).read()
    final = float(re.search(r"Final estimate: PPL = ([0-9.]+)", log).group(1))
    running = [float(x) for x in re.findall(r"\[\d+\]([0-9.]+),", log)]
    # mean NLL of chunk i from the running estimates exp(mean over chunks 1..i)
    cum = [math.log(p) * (i + 1) for i, p in enumerate(running)]
    return final, [cum[0]] + [cum[i] - cum[i - 1] for i in range(1, len(cum))]
for t in ("sotu_eval", "devil"):
    uc = json.load(open(f"{work}/uc_{t}.json"))
    uc_all = json.load(open(f"{work}/uc_all_{t}.json"))
    r = {"uc_eval_ppl_second_half": uc["ppl"], "uc_n_pos": uc["n_pos"],
         "uc_tokens_sha256": uc["tokens_sha256"], "per_chunk_nll_uc": uc["window_nll"],
         "uc_eval_ppl_all_positions": uc_all["ppl"]}
    for g in ("q4km", "f32"):
        final, chunks = llama(f"{work}/llama_{g}_{t}.txt")
        diffs = [a - b for a, b in zip(uc["window_nll"], chunks)]
        r[f"llama_{g}"] = {"ppl": final, "ratio_uc_over_llama": uc["ppl"] / final,
                           "per_chunk_nll": chunks,
                           "max_abs_chunk_nll_diff": max(abs(d) for d in diffs)}
        print(f"{t} {g}: llama-perplexity {final:.4f}  uc (second half) {uc['ppl']:.4f}  ratio {uc['ppl']/final:.5f}  max chunk |dNLL| {max(abs(d) for d in diffs):.5f}", file=sys.stderr)
    r["note"] = "llama.cpp prints its running PPL to 4 decimals, so its per-chunk NLLs carry ~1e-4 of rounding"
    out["texts"][t] = r
json.dump(out, open("results/gemma3_llamacpp_ppl.json", "w"), indent=2)
PY
echo "wrote results/gemma3_llamacpp_ppl.json" >&2
