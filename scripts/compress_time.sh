#!/usr/bin/env bash
# Wall time of the default compression of the default model (the issue's 5-minute bar),
# the whole command as a user runs it (tokenizing the calibration text included):
#   scripts/compress_time.sh [REFERENCE_PACK]
# Writes results/compress_time.json: wall seconds and peak RSS from /usr/bin/time, the
# command's own --json summary (calibration / probe / per-block seconds), the machine,
# and -- if REFERENCE_PACK is given -- whether every pack file is byte-identical to it
# (a speed change must not change the output).
set -euo pipefail
cd "$(dirname "$0")/.."
UC=target/release/uc
PACK=packs/compress_time
REF=${1:-}
cargo build --release --locked -p uc-cli >&2
rm -rf "$PACK"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
/usr/bin/time -f '%e %M' -o "$tmp/time" \
    "$UC" compress assets/smollm2-135m -o "$PACK" --calib-sotu assets/sotu --json > "$tmp/c.json"
python3 - "$tmp" "$PACK" "$REF" <<'PY'
import hashlib, json, os, platform, sys
tmp, pack, ref = sys.argv[1:]
wall, rss_kib = open(f"{tmp}/time").read().split()
c = json.load(open(f"{tmp}/c.json"))
c.pop("tensors", None)
def digests(d):
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out
res = {
    "command": "uc compress assets/smollm2-135m -o PACK --calib-sotu assets/sotu --json",
    "wall_seconds": float(wall), "limit_seconds": 300, "within_limit": float(wall) <= 300,
    "peak_rss_mib": int(rss_kib) / 1024,
    "cpus": os.cpu_count(), "machine": platform.machine(), "compress": c,
}
if ref:
    a, b = digests(pack), digests(ref)
    # The manifest records tool timings nowhere, so the whole pack must match.
    res["reference_pack"] = ref
    res["identical_to_reference"] = a == b
    res["differing_files"] = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
with open("results/compress_time.json", "w") as f:
    json.dump(res, f, indent=1)
print(f"wall {float(wall):.1f} s (limit 300), peak RSS {int(rss_kib)/1024:.0f} MiB"
      + (f", identical to {ref}: {res['identical_to_reference']}" if ref else ""))
PY
