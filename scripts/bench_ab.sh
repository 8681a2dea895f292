#!/usr/bin/env bash
# Inference cost of a codec choice: uc bench of two round-to-nearest packs of
# SmolLM2-135M that differ only in the compress flags A and B, side by side in one run,
# rounds interleaved (each pack once per round, medians over rounds), so a shared machine
# slows both alike. Writes results/bench_NAME.json with the ratio B / A.
#
#   scripts/bench_ab.sh NAME "FLAGS_A" "FLAGS_B" [THREADS=2] [ROUNDS=3]
#   scripts/bench_ab.sh trellis "--bits 5 --rotate 64 --codes scalar" \
#       "--bits 5 --rotate 64 --codes trellis"
#
# (Round-to-nearest: throughput does not depend on the encoder, only on the codec.)
# Needs target/release/uc and assets/smollm2-135m; packs go to packs/bench-NAME/.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=$1; A=$2; B=$3
THREADS=${4:-2}
ROUNDS=${5:-3}
UC=${UC:-target/release/uc}
MODEL=assets/smollm2-135m
DIR=packs/bench-$NAME
mkdir -p "$DIR" results
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

for v in a b; do
  flags=$A; [[ $v == b ]] && flags=$B
  rm -rf "$DIR/$v"
  # shellcheck disable=SC2086
  "$UC" compress "$MODEL" -o "$DIR/$v" --method rtn $flags >&2
done
for round in $(seq 1 "$ROUNDS"); do
  for v in a b; do
    echo "round $round: $v" >&2
    MIMALLOC_ALLOW_THP=0 "$UC" bench "$DIR/$v" --threads "$THREADS" --reps 1 \
      --skip-recon-check --json > "$tmp/r$round-$v.json"
  done
done

python3 - "$tmp" "$NAME" "$A" "$B" "$THREADS" "$ROUNDS" "$(uptime)" <<'PY'
import json, statistics, sys
tmp, name, a, b, threads, rounds, up = sys.argv[1:]
threads, rounds = int(threads), int(rounds)
runs = {v: [json.load(open(f"{tmp}/r{r}-{v}.json")) for r in range(1, rounds + 1)] for v in "ab"}
keys = [k for k in ("decode_tok_s", "prefill_tok_s", "ttft_ms", "peak_rss_mib") if k in runs["a"][0]]
med = {v: {k: statistics.median(r[k] for r in runs[v]) for k in keys} for v in "ab"}
out = {
    "what": "uc bench of two RTN packs differing only in their compress flags, rounds interleaved",
    "command": f"scripts/bench_ab.sh {name} {a!r} {b!r} {threads} {rounds}",
    "flags": {"a": a, "b": b}, "threads": threads, "rounds": rounds, "uptime": up,
    "a": med["a"], "b": med["b"],
    "ratio_b_over_a": {k: med["b"][k] / med["a"][k] for k in keys},
    "raw": runs,
}
json.dump(out, open(f"results/bench_{name}.json", "w"), indent=1)
print(json.dumps({k: out[k] for k in ("a", "b", "ratio_b_over_a")}, indent=1))
PY
