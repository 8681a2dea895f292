#!/usr/bin/env bash
# Wall time of the default compression of the default model (the issue's 5-minute bar),
# the whole command as a user runs it (tokenizing the calibration text included):
#   scripts/compress_time.sh [REFERENCE_PACK]
# Writes results/compress_time.json: wall seconds and peak RSS from /usr/bin/time, the
# command's own --json summary (calibration / probe / per-block seconds), the machine,
# and -- if REFERENCE_PACK is given -- whether every pack file is byte-identical to it
# (a speed change must not change the output).
# With UC_BASE=<another uc binary>, the same command is timed with it first, in the same
# invocation, and the JSON gets its wall time, the ratio (a speed claim's baseline) and
# whether the two packs are byte-identical. OUT=... writes another file.
set -euo pipefail
cd "$(dirname "$0")/.."
UC=target/release/uc
PACK=packs/compress_time
REF=${1:-}
OUT=${OUT:-results/compress_time.json}
cargo build --release --locked -p uc-cli >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [[ -n "${UC_BASE:-}" ]]; then
    rm -rf "${PACK}_base"
    /usr/bin/time -f '%e %M' -o "$tmp/base_time" \
        "$UC_BASE" compress assets/smollm2-135m -o "${PACK}_base" --calib-dir assets/calib --json > /dev/null
fi
rm -rf "$PACK"
/usr/bin/time -f '%e %M' -o "$tmp/time" \
    "$UC" compress assets/smollm2-135m -o "$PACK" --calib-dir assets/calib --json > "$tmp/c.json"
python3 - "$tmp" "$PACK" "$REF" "$OUT" <<'PY'
import hashlib, json, os, platform, sys
tmp, pack, ref, out = sys.argv[1:]
wall, rss_kib = open(f"{tmp}/time").read().split()
c = json.load(open(f"{tmp}/c.json"))
c.pop("tensors", None)
def cpu_model():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()
def digests(d):
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out
res = {
    "command": "uc compress assets/smollm2-135m -o PACK --calib-dir assets/calib --json",
    "wall_seconds": float(wall), "limit_seconds": 300, "within_limit": float(wall) <= 300,
    "peak_rss_mib": int(rss_kib) / 1024,
    "cpus": os.cpu_count(), "machine": platform.machine(), "cpu_model": cpu_model(),
    "compress": c,
}
if os.path.exists(f"{tmp}/base_time"):
    base_wall = float(open(f"{tmp}/base_time").read().split()[0])
    res["base_binary"] = os.environ["UC_BASE"]
    res["base_wall_seconds"] = base_wall
    res["wall_ratio_to_base"] = float(wall) / base_wall
    res["identical_to_base"] = digests(pack) == digests(pack + "_base")
if ref:
    a, b = digests(pack), digests(ref)
    # The manifest records tool timings nowhere, so the whole pack must match.
    res["reference_pack"] = ref
    res["identical_to_reference"] = a == b
    res["differing_files"] = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
with open(out, "w") as f:
    json.dump(res, f, indent=1)
print(f"wall {float(wall):.1f} s (limit 300), peak RSS {int(rss_kib)/1024:.0f} MiB"
      + (f", identical to {ref}: {res['identical_to_reference']}" if ref else ""))
PY
