#!/usr/bin/env bash
# Wall time vs peak RSS of the default compress for mimalloc purge delays (how long
# freed memory stays mapped before it goes back to the OS), in one invocation, one run
# after the other on the same machine:
#   scripts/bench_purge_delay.sh [DELAYS_MS...]   (default: 100 1000)
# Writes results/bench_purge_delay.json; every run must write the same pack bytes.
set -euo pipefail
cd "$(dirname "$0")/.."
DELAYS=("$@"); [ ${#DELAYS[@]} -gt 0 ] || DELAYS=(100 1000)
cargo build --release --locked -p uc-cli
UC=target/release/uc
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
for d in "${DELAYS[@]}"; do
    rm -rf "packs/purge-$d"
    UC_PURGE_DELAY_MS=$d "$UC" compress assets/smollm2-135m -o "packs/purge-$d" \
        --calib-sotu assets/sotu --json > "$tmp/$d.json"
    rm -rf "packs/purge-$d"
done
python3 - "$tmp" "${DELAYS[@]}" <<'PY'
import json, sys
tmp, delays = sys.argv[1], sys.argv[2:]
rows = []
for d in delays:
    c = json.load(open(f"{tmp}/{d}.json"))
    rows.append({"purge_delay_ms": int(d), "seconds": c["seconds"],
                 "probe_seconds": c["probe_seconds"], "peak_rss_mib": c["peak_rss_mib"],
                 "fingerprint": c["fingerprint"]})
assert len({r["fingerprint"] for r in rows}) == 1, "pack bytes differ between delays"
out = {"command": "scripts/bench_purge_delay.sh " + " ".join(delays), "runs": rows}
json.dump(out, open("results/bench_purge_delay.json", "w"), indent=1)
for r in rows:
    print(f"purge {r['purge_delay_ms']:>5} ms: {r['seconds']:.1f} s, peak {r['peak_rss_mib']:.0f} MiB")
PY
