#!/usr/bin/env bash
# Verification throughput against sha256sum over the same files, on this machine.
#
#   scripts/bench_verify.sh PACK [OUT.json]      (environment: UC=path of the uc binary)
#
# Runs `$UC verify PACK` (default UC=target/release/uc) (or, until the CLI has it, the example
# `target/release/examples/verify_pack PACK`) and `sha256sum` over every file of the
# pack, each 3 times with a warm page cache, keeps the best time of each, and prints
# (and writes to OUT.json if given) {pack_bytes, verify_s, sha256sum_s, verify_mb_s,
# sha256sum_mb_s, ratio}, MB = 10^6 bytes. Goal: ratio >= 0.8. uc verify does more work
# than sha256sum (it also re-hashes each tensor's entries and hashes the reconstructed
# f32 weights, ~6x the stored bytes), so the ratio measures parallelism and SIMD.
set -euo pipefail

PACK=${1:?usage: scripts/bench_verify.sh PACK [OUT.json]}
OUT=${2:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
UC=${UC:-$ROOT/target/release/uc}
EXAMPLE="$ROOT/target/release/examples/verify_pack"

if [ -x "$UC" ] && "$UC" verify --help >/dev/null 2>&1; then
    VERIFY=("$UC" verify "$PACK")
else
    [ -x "$EXAMPLE" ] || (cd "$ROOT" && cargo build --release -q -p uc-codec --example verify_pack)
    VERIFY=("$EXAMPLE" "$PACK")
fi

mapfile -d '' FILES < <(find "$PACK" -type f ! -name '.progress.json' -print0 | sort -z)
BYTES=$(cat "${FILES[@]}" | wc -c)
cat "${FILES[@]}" >/dev/null # warm the page cache for both contenders

now() { date +%s.%N; }
best_of_3() { # prints the best wall time of 3 runs of "$@" (which must succeed)
    local best="" t0 t1 dt
    for _ in 1 2 3; do
        t0=$(now)
        "$@" >/dev/null || { echo "bench_verify: '$*' failed" >&2; exit 1; }
        t1=$(now)
        dt=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", b - a }')
        if [ -z "$best" ] || awk -v a="$dt" -v b="$best" 'BEGIN { exit !(a < b) }'; then best=$dt; fi
    done
    echo "$best"
}

T_VERIFY=$(best_of_3 "${VERIFY[@]}")
T_SHA=$(best_of_3 sha256sum "${FILES[@]}")

JSON=$(awk -v n="$BYTES" -v tv="$T_VERIFY" -v ts="$T_SHA" 'BEGIN {
    mv = n / 1e6 / tv; ms = n / 1e6 / ts;
    printf "{\"pack_bytes\": %d, \"verify_s\": %.4f, \"sha256sum_s\": %.4f, \"verify_mb_s\": %.1f, \"sha256sum_mb_s\": %.1f, \"ratio\": %.3f}\n", n, tv, ts, mv, ms, mv / ms }')
echo "$JSON"
if [ -n "$OUT" ]; then echo "$JSON" >"$OUT"; fi
