#!/usr/bin/env bash
# Where the default compress spends its time: `perf record` (cpu-clock, 200 Hz, both
# threads) of the command scripts/compress_time.sh times, then the symbols' shares of
# all samples. Closures show up under generic names (`call_mut`, `consume_iter`);
# `addr2line -f -i -e target/release/uc ADDR` names the source of an address.
#   scripts/compress_profile.sh [TOP=25]
# Writes results/compress_profile.json (OUT=... for another name; UC=... profiles
# another uc binary, e.g. an older build). Needs `perf` (Debian: linux-perf).
set -euo pipefail
cd "$(dirname "$0")/.."
TOP=${1:-25}
UC=${UC:-target/release/uc}
OUT=${OUT:-results/compress_profile.json}
PACK=packs/compress_profile
cargo build --release --locked -p uc-cli >&2
rm -rf "$PACK"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
perf record -e cpu-clock -F 200 -o "$tmp/perf.data" -- \
    "$UC" compress assets/smollm2-135m -o "$PACK" --calib-dir assets/calib --json > /dev/null
perf report -i "$tmp/perf.data" --no-children --sort sym -v --stdio -g none 2>/dev/null \
    > "$tmp/report.txt"
python3 - "$tmp" "$UC" "$TOP" "$OUT" <<'PY'
import json, os, platform, re, sys
tmp, uc, top, out_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
def cpu_model():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()
rows = []
for line in open(f"{tmp}/report.txt"):
    m = re.match(r"\s+([\d.]+)%\s+(0x[0-9a-f]+)\s+\S+\s+\[(.)\]\s+(.*)$", line)
    if m:
        rows.append({"share_pct": float(m.group(1)), "addr": m.group(2),
                     "kernel": m.group(3) == "k", "symbol": m.group(4).strip()})
rows = rows[:top]
json.dump({
    "what": "perf profile (cpu-clock, 200 Hz) of the default compress; share of all samples",
    "command": "scripts/compress_profile.sh " + str(top), "binary": uc,
    "compress": "uc compress assets/smollm2-135m -o PACK --calib-dir assets/calib --json",
    "cpus": os.cpu_count(), "machine": platform.machine(), "cpu_model": cpu_model(),
    "top": rows,
}, open(out_path, "w"), indent=1)
for r in rows[:12]:
    print(f"{r['share_pct']:6.2f}%  {r['addr']}  {r['symbol'][:80]}")
PY
