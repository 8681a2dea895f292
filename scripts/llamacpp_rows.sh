#!/usr/bin/env bash
# llama.cpp's quantizer on SmolLM2-135M-Instruct, scored by uc's own evaluation harness.
#
#   scripts/llamacpp_rows.sh [ROW...]
#       ROW = a llama-quantize type, optionally "+imatrix":  Q6_K  Q4_K_M+imatrix  ...
#       default rows: Q6_K Q5_K_M Q4_K_M+imatrix Q3_K_M+imatrix
#       (the row F32 is the teacher's own F32 GGUF: a sanity check of the round trip)
#   UC_EVAL_TEXT=FILE scores the rows on that text (first 32 x 1024 tokens windows) instead
#   of the SOTU eval split, and writes results/llamacpp_rows_<FILE's stem>.json; e.g.
#   UC_EVAL_TEXT=assets/devil/devil.txt (the second-genre text of scripts/fetch_assets.sh).
#   The quantized GGUFs and the imatrix (SOTU calibration split) are the same either way.
#   UC_REUSE_EVAL=1 keeps a row's earlier uc eval receipt instead of rerunning the eval
#   Another model: UC_ROWS_NAME=NAME UC_ROWS_TEACHER_GGUF=FILE UC_ROWS_REF=DIR (all three;
#   REF is FILE imported by uc import gguf) puts the work in $UC_SCRATCH/rows-<version>-NAME
#   and writes results/llamacpp_rows_NAME[_<stem>].json, e.g. Gemma 3 270M:
#     UC_ROWS_NAME=gemma3-270m UC_ROWS_TEACHER_GGUF=assets/gemma3-270m/gemma-3-270m-q4_k_m.gguf \
#     UC_ROWS_REF=assets/gemma3-270m/hf scripts/llamacpp_rows.sh Q4_K_M+imatrix Q3_K_M+imatrix
#   (each eval is ~2 x 32k tokens through the model; the receipt records uc's version and
#   both fingerprints, so a reused one still says what it measured).
#
# What it measures, per row (the protocol of the llama.cpp anchor table, but with uc's code
# doing the scoring instead of transformers):
#   - the teacher assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf is expanded to an F32 GGUF
#     (llama-quantize --allow-requantize ... F32), which is what every row is quantized from;
#   - imatrix rows: llama-imatrix -m F32.gguf -f calib.txt -c 512 --chunks 100, where
#     calib.txt = SOTU speeches dated before 2000, ordered by (year, N, name), joined by "\n\n"
#     (uc's calibration split, written out by this script);
#   - llama-quantize [--imatrix I] F32.gguf OUT.gguf TYPE 2, timed (quantize_seconds);
#   - bpw_body = every stored bit of the 210 block linear tensors (blk.*.attn_{q,k,v,output},
#     blk.*.ffn_{gate,up,down}), scales included, / their element count, read from OUT.gguf;
#   - uc import gguf OUT.gguf (dequantized to an f32 Hugging Face directory), then
#     uc eval DIR --against assets/smollm2-135m --sotu assets/sotu --split eval
#       --windows 32 --seq-len 1024: PPL, ratio to the teacher, KL(teacher || row), top-1.
# Writes results/llamacpp_rows.json (one object per row, with uc's eval receipt fingerprints,
# the llama-cpp-python version and every command line).
#
# llama.cpp is the copy vendored in PyPI's llama-cpp-python==0.3.36 sdist, built (CPU, only
# llama-quantize and llama-imatrix, -j 2) in $UC_SCRATCH (default /work/scratch/llamacpp),
# outside the repository, with cmake/ninja from PyPI in $UC_SCRATCH/venv. Same layout as
# scripts/bench_run.sh, so one source tree serves both; nothing of llama.cpp is committed.
# Intermediate GGUFs, the imatrix and the imported directories live in
# $UC_SCRATCH/rows-0.3.36 and are reused by later runs (delete it to redo them); the uc
# import and eval are rerun unless UC_REUSE_EVAL=1.
#
# Needs: target/release/uc (cargo build --release -p uc-cli), assets/ from
# scripts/fetch_assets.sh (teacher GGUF, SOTU speeches, assets/smollm2-135m), python3,
# gcc/g++, and network access to PyPI on the first run.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SCRATCH=${UC_SCRATCH:-/work/scratch/llamacpp}
LCP_VERSION=0.3.36
UC=${UC:-$ROOT/target/release/uc}
NAME=${UC_ROWS_NAME:-}
TEACHER_GGUF=${UC_ROWS_TEACHER_GGUF:-$ROOT/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
REF=${UC_ROWS_REF:-$ROOT/assets/smollm2-135m}
if [ -n "$NAME" ] && { [ -z "${UC_ROWS_TEACHER_GGUF:-}" ] || [ -z "${UC_ROWS_REF:-}" ]; }; then
  echo "error: UC_ROWS_NAME needs UC_ROWS_TEACHER_GGUF and UC_ROWS_REF" >&2; exit 1
fi
MODEL_LABEL=${NAME:-SmolLM2-135M-Instruct}
SOTU=$ROOT/assets/sotu
OUT=$ROOT/results/llamacpp_rows${NAME:+_$NAME}.json
EVAL_TEXT=${UC_EVAL_TEXT:-}
EVAL_ARGS=(--sotu "$SOTU" --split eval)
EVAL_CMD="--sotu assets/sotu --split eval"
EVAL_JSON=eval.json
if [ -n "$EVAL_TEXT" ]; then
  [ -f "$EVAL_TEXT" ] || { echo "error: UC_EVAL_TEXT=$EVAL_TEXT: no such file" >&2; exit 1; }
  stem=$(basename "${EVAL_TEXT%.*}")
  EVAL_ARGS=(--text "$EVAL_TEXT")
  EVAL_CMD="--text $EVAL_TEXT"
  EVAL_JSON=eval-$stem.json
  OUT=$ROOT/results/llamacpp_rows${NAME:+_$NAME}_$stem.json
fi
WORK=$SCRATCH/rows-$LCP_VERSION${NAME:+-$NAME}
QTHREADS=2
if [ $# -gt 0 ]; then ROWS=("$@"); else ROWS=(Q6_K Q5_K_M Q4_K_M+imatrix Q3_K_M+imatrix); fi

for f in "$UC" "$TEACHER_GGUF" "$REF/config.json"; do
  [ -e "$f" ] || { echo "error: missing $f (cargo build --release -p uc-cli; scripts/fetch_assets.sh)" >&2; exit 1; }
done
mkdir -p "$SCRATCH" "$WORK" "$ROOT/results"

# --- llama.cpp from llama-cpp-python==0.3.36's sdist, built outside the repo -----------
VENV=$SCRATCH/venv
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
if ! "$VENV/bin/python" -c 'import cmake, ninja, numpy, yaml' 2>/dev/null; then
  "$VENV/bin/pip" install -q cmake ninja numpy pyyaml --index-url https://pypi.org/simple >&2
fi
# The source tree is named by version, so a different version already in $SCRATCH (e.g. an
# unpinned one fetched by bench_run.sh) is left alone and not used.
LLAMA_SRC=$SCRATCH/llama_cpp_python-$LCP_VERSION/vendor/llama.cpp
if [ ! -d "$LLAMA_SRC" ]; then
  (cd "$SCRATCH" && "$VENV/bin/pip" download -q --no-binary llama-cpp-python --no-deps \
     "llama-cpp-python==$LCP_VERSION" >&2 && tar xzf "llama_cpp_python-$LCP_VERSION.tar.gz")
fi
BIN=$LLAMA_SRC/build/bin
if [ ! -x "$BIN/llama-quantize" ] || [ ! -x "$BIN/llama-imatrix" ]; then
  export PATH=$VENV/bin:$PATH
  if [ ! -f "$LLAMA_SRC/build/build.ninja" ]; then
    cmake -S "$LLAMA_SRC" -B "$LLAMA_SRC/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >&2
  fi
  cmake --build "$LLAMA_SRC/build" -j 2 --target llama-quantize llama-imatrix >&2
fi
GGUF_PY=$LLAMA_SRC/gguf-py   # llama.cpp's own GGUF reader, for the bpw accounting

# now_s: wall-clock seconds, for timing llama-quantize.
now_s() { date +%s.%N; }

# --- the F32 teacher and the calibration text -----------------------------------------
F32=$WORK/${NAME:-smollm2-135m}-F32.gguf
F32_CMD="llama-quantize --allow-requantize $(basename "$TEACHER_GGUF") F32.gguf F32 $QTHREADS"
if [ ! -f "$F32" ]; then
  "$BIN/llama-quantize" --allow-requantize "$TEACHER_GGUF" "$F32.tmp" F32 "$QTHREADS" >&2
  mv "$F32.tmp" "$F32"
fi

CALIB=$WORK/calib.txt
python3 - "$SOTU" "$CALIB" <<'PY'
# uc's SOTU calibration split (crates/uc-eval/src/corpus.rs): YYYY-Name-N.txt with
# year < 2000, ordered by (year, N, name), contents joined by "\n\n".
import os, sys
d, out = sys.argv[1], sys.argv[2]
if os.path.isdir(os.path.join(d, "speeches")):
    d = os.path.join(d, "speeches")
keyed = []
for name in os.listdir(d):
    if not name.endswith(".txt"):
        continue
    stem = name[:-4]
    year, _, rest = stem.partition("-")
    who, _, n = rest.rpartition("-")
    if len(year) != 4 or not year.isdigit() or not n.isdigit() or not who:
        continue
    if int(year) < 2000:
        keyed.append(((int(year), int(n), who), os.path.join(d, name)))
keyed.sort()
text = b"\n\n".join(open(p, "rb").read() for _, p in keyed)
text.decode("utf-8")
with open(out + ".tmp", "wb") as f:
    f.write(text)
os.replace(out + ".tmp", out)
print(f"calib.txt: {len(keyed)} speeches, {len(text.decode())} chars", file=sys.stderr)
PY

IMATRIX=$WORK/imatrix.gguf
IMATRIX_CMD="llama-imatrix -m F32.gguf -f calib.txt -c 512 --chunks 100 -t $QTHREADS -nr -o imatrix.gguf"
need_imatrix=0
for row in "${ROWS[@]}"; do [[ $row == *+imatrix ]] && need_imatrix=1; done
if [ $need_imatrix = 1 ] && [ ! -f "$WORK/imatrix.seconds" ]; then
  t0=$(now_s)
  # -nr (no weight repacking): the AMX repacked matmul of this build segfaults on a
  # machine with AMX (seen on the 2026-12-03 AVX-512/AMX machine); results unchanged
  # in kind, the imatrix is the same statistic.
  "$BIN/llama-imatrix" -m "$F32" -f "$CALIB" -c 512 --chunks 100 -t "$QTHREADS" -nr \
    -o "$IMATRIX" > "$WORK/imatrix.log" 2>&1 || { tail -20 "$WORK/imatrix.log" >&2; exit 1; }
  t1=$(now_s)
  python3 -c "print(f'{$t1 - $t0:.2f}')" > "$WORK/imatrix.seconds"
fi

# --- rows -----------------------------------------------------------------------------
for row in "${ROWS[@]}"; do
  type=${row%+imatrix}
  R=$WORK/$row
  mkdir -p "$R"
  if [ "$type" = F32 ]; then
    # The sanity row: the F32 GGUF itself (no quantization).
    cp -f "$F32" "$R/out.gguf"
    echo "$F32_CMD" > "$R/command"
    echo null > "$R/quantize.seconds"
  elif [ ! -f "$R/quantize.seconds" ]; then
    args=()
    cmd="llama-quantize"
    if [[ $row == *+imatrix ]]; then args=(--imatrix "$IMATRIX"); cmd="$cmd --imatrix imatrix.gguf"; fi
    echo "$cmd F32.gguf $row.gguf $type $QTHREADS" > "$R/command"
    echo "quantize $row" >&2
    t0=$(now_s)
    "$BIN/llama-quantize" "${args[@]}" "$F32" "$R/out.gguf" "$type" "$QTHREADS" \
      > "$R/quantize.log" 2>&1 || { tail -20 "$R/quantize.log" >&2; exit 1; }
    t1=$(now_s)
    python3 -c "print(f'{$t1 - $t0:.3f}')" > "$R/quantize.seconds"
  fi
  if [ "${UC_REUSE_EVAL:-0}" = 1 ] && [ -s "$R/$EVAL_JSON" ] && [ -s "$R/import.json" ] \
     && [ "$R/$EVAL_JSON" -nt "$R/out.gguf" ]; then
    echo "reuse eval $row" >&2
  else
    echo "import + eval $row" >&2
    if [ ! -s "$R/import.json" ] || [ ! -d "$R/hf" ] || [ "$R/import.json" -ot "$R/out.gguf" ]; then
      rm -rf "$R/hf"
      "$UC" import gguf "$R/out.gguf" -o "$R/hf" --json > "$R/import.json"
    fi
    rm -f "$R/$EVAL_JSON"
    "$UC" eval "$R/hf" --against "$REF" "${EVAL_ARGS[@]}" --windows 32 \
      --seq-len 1024 --json > "$R/$EVAL_JSON.tmp"
    mv "$R/$EVAL_JSON.tmp" "$R/$EVAL_JSON"
  fi
  python3 - "$R/$EVAL_JSON" >&2 <<'PY'
import json, sys
a = json.load(open(sys.argv[1]))["against"]
print("  ratio %.4f  KLD %.5f  top-1 %.4f" % (a["ppl_ratio"], a["kld"], a["top1"]))
PY
done

# --- results/llamacpp_rows.json -------------------------------------------------------
PYTHONPATH=$GGUF_PY "$VENV/bin/python" - "$WORK" "$OUT" "$LCP_VERSION" "$F32_CMD" "$IMATRIX_CMD" \
  "$EVAL_JSON" "$EVAL_CMD" "$MODEL_LABEL" "${REF#$ROOT/}" "${NAME:+UC_ROWS_NAME=$NAME }" \
  "$(cd "$ROOT" && git rev-parse HEAD 2>/dev/null || echo unknown)" "${ROWS[@]}" <<'PY'
import json, os, re, sys, collections, hashlib
import gguf
work, out, version, f32_cmd, imatrix_cmd, eval_json, eval_cmd, label, ref, env, commit, *rows = sys.argv[1:]
BODY = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

def read(path):
    return open(path).read().strip()

imatrix_s = os.path.join(work, "imatrix.seconds")
objs = []
for row in rows:
    R = os.path.join(work, row)
    reader = gguf.GGUFReader(os.path.join(R, "out.gguf"))
    body = [t for t in reader.tensors if BODY.match(t.name)]
    assert len(body) > 0 and len(body) % 7 == 0, (row, len(body))
    bits = 8 * sum(int(t.n_bytes) for t in body)
    elems = sum(int(t.n_elements) for t in body)
    body_types = collections.Counter(t.tensor_type.name for t in body)
    other_types = {t.name: t.tensor_type.name for t in reader.tensors
                   if not BODY.match(t.name) and t.tensor_type.name != "F32"}
    ev = json.load(open(os.path.join(R, eval_json)))
    imp = json.load(open(os.path.join(R, "import.json")))
    a = ev["against"]
    qs = json.loads(read(os.path.join(R, "quantize.seconds")))
    objs.append({
        "row": row,
        "type": row.split("+")[0],
        "imatrix": row.endswith("+imatrix"),
        "bpw_body": bits / elems,
        "body_bits": bits,
        "body_elements": elems,
        "body_tensor_types": dict(sorted(body_types.items())),
        "non_f32_other_tensors": other_types,
        "ppl": ev["ppl"],
        "ref_ppl": a["ref_ppl"],
        "ppl_ratio": a["ppl_ratio"],
        "kld": a["kld"],
        "top1": a["top1"],
        "n_pos": ev["n_pos"],
        "quantize_seconds": qs,
        "gguf_sha256": sha256(os.path.join(R, "out.gguf")),
        "gguf_bytes": os.path.getsize(os.path.join(R, "out.gguf")),
        "import_tensor_types": imp["tensor_types"],
        "receipt": {k: ev[k] for k in ("tool", "version", "text_files", "text_sha256",
                                        "text_chars", "tokenizer_sha256", "n_tokens",
                                        "tokens_sha256", "seq_len", "windows", "threads",
                                        "seconds") if k in ev}
                   | {"model_fingerprint": ev["model"]["fingerprint"],
                      "model_source": ev["model"]["source"],
                      "reference_fingerprint": ev["reference"]["fingerprint"],
                      "reference_source": ev["reference"]["source"]},
        "commands": {
            "quantize": read(os.path.join(R, "command")),
            "import": f"uc import gguf {row}.gguf -o DIR --json",
            "eval": f"uc eval DIR --against {ref} {eval_cmd} --windows 32 --seq-len 1024 --json",
        },
    })
report = {
    "what": f"llama.cpp quantizer rows on {label}, dequantized by uc import gguf and scored by uc eval ({eval_cmd}, 32 x 1024) against the teacher",
    "command": env + ("UC_EVAL_TEXT=" + eval_cmd.split()[-1] + " " if eval_cmd.startswith("--text") else "") + "scripts/llamacpp_rows.sh " + " ".join(rows),
    "uc_commit": commit,
    "llama_cpp": {"source": f"PyPI llama-cpp-python=={version} sdist, vendor/llama.cpp, CPU build (GGML_NATIVE=ON)",
                  "llama_cpp_python_version": version},
    "teacher_to_f32": f32_cmd,
    "imatrix": {"command": imatrix_cmd,
                "calib": "SOTU speeches with year < 2000, ordered by (year, N, name), joined by \"\\n\\n\"",
                "calib_sha256": sha256(os.path.join(work, "calib.txt")),
                "seconds": json.loads(read(imatrix_s)) if os.path.exists(imatrix_s) else None},
    "bpw_body": "stored bits of the block linear tensors (7 per block, scales included) / their element count, from the row's GGUF",
    "rows": objs,
}
with open(out, "w") as f:
    json.dump(report, f, indent=2)
    f.write("\n")
print(f"{'row':18s} {'bpw':>6s} {'ppl':>8s} {'ratio':>7s} {'KLD':>8s} {'top-1':>7s} {'quant s':>8s}")
for o in objs:
    qs = "-" if o["quantize_seconds"] is None else f"{o['quantize_seconds']:.2f}"
    print(f"{o['row']:18s} {o['bpw_body']:6.3f} {o['ppl']:8.3f} {o['ppl_ratio']:7.4f} {o['kld']:8.5f} {o['top1']:7.4f} {qs:>8s}")
PY
echo "wrote $OUT" >&2
