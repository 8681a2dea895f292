#!/usr/bin/env bash
# What the Hadamard rotation costs at inference: uc bench of two packs that differ only in
# `--rotate` (round-to-nearest, uniform 5 bits, uc's default group 64 / e8 scales / q8g32
# embedding; throughput does not depend on the encoder), measured side by side in one
# run, rounds interleaved (each configuration once per round, medians over rounds), so a
# shared machine slows both alike. Writes results/bench_rotation.json.
#
#   scripts/bench_rotation.sh [BLOCK=64] [THREADS=2] [ROUNDS=3]
#
# Needs target/release/uc and assets/smollm2-135m (scripts/fetch_assets.sh). The packs go
# to packs/bench-rot/ (ignored by git) and are reused by later runs.
set -euo pipefail
cd "$(dirname "$0")/.."
BLOCK=${1:-64}
THREADS=${2:-2}
ROUNDS=${3:-3}
UC=${UC:-target/release/uc}
MODEL=assets/smollm2-135m
DIR=packs/bench-rot
mkdir -p "$DIR" results
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

for rot in 0 "$BLOCK"; do
  pack=$DIR/rtn5-h$rot
  if [ ! -f "$pack/manifest.json" ]; then
    "$UC" compress "$MODEL" -o "$pack" --method rtn --bits 5 --rotate "$rot" >&2
  fi
done

for round in $(seq 1 "$ROUNDS"); do
  for rot in 0 "$BLOCK"; do
    echo "round $round: rotate $rot" >&2
    MIMALLOC_ALLOW_THP=0 "$UC" bench "$DIR/rtn5-h$rot" --threads "$THREADS" --reps 1 \
      --skip-recon-check --json > "$tmp/r$round-h$rot.json"
  done
done

python3 - "$tmp" "$BLOCK" "$THREADS" "$ROUNDS" "$(uptime)" <<'EOF'
import json, statistics, sys
tmp, block, threads, rounds, up = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
def runs(rot):
    return [json.load(open(f"{tmp}/r{r}-h{rot}.json")) for r in range(1, rounds + 1)]
def med(rs, key):
    return statistics.median(r[key] for r in rs)
base, rot = runs(0), runs(block)
keys = [k for k in ("decode_tok_s", "prefill_tok_s", "ttft_ms", "peak_rss_mib") if k in base[0]]
out = {
    "what": "uc bench of two RTN 5-bit packs differing only in --rotate, rounds interleaved",
    "command": f"scripts/bench_rotation.sh {block} {threads} {rounds}",
    "threads": threads, "rounds": rounds, "uptime": up,
    "unrotated": {k: med(base, k) for k in keys},
    f"rotate_{block}": {k: med(rot, k) for k in keys},
    "ratio_rotated_over_unrotated": {k: med(rot, k) / med(base, k) for k in keys},
    "raw": {"unrotated": base, f"rotate_{block}": rot},
}
json.dump(out, open("results/bench_rotation.json", "w"), indent=1)
print(json.dumps({k: out[k] for k in ("unrotated", f"rotate_{block}", "ratio_rotated_over_unrotated")}, indent=1))
EOF
