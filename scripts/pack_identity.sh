#!/usr/bin/env bash
# Byte-identity of packs across two builds: compresses the same model with the same
# arguments using binary A (e.g. main's) and binary B (this tree's), then compares every
# file of the two packs by SHA-256. Writes a JSON receipt.
#
#   scripts/pack_identity.sh UC_A UC_B MODEL_DIR SOTU_DIR OUT_JSON [compress args...]
#
# Default compress arguments (when none are given): a small SOTU calibration that still
# draws windows with SplitMix64 and runs the full default pipeline (probe, budget, GPTQ
# with teacher target): --calib-seqs 4 --calib-len 128.
set -euo pipefail
[ $# -ge 5 ] || { echo "usage: $0 UC_A UC_B MODEL_DIR SOTU_DIR OUT_JSON [compress args...]" >&2; exit 2; }
a=$1 b=$2 model=$3 sotu=$4 out=$5
shift 5
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--calib-seqs 4 --calib-len 128)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for side in a b; do
  bin=${!side}
  "$bin" compress "$model" -o "$work/$side" --calib-sotu "$sotu" "${args[@]}" >"$work/$side.log" 2>&1
  (cd "$work/$side" && find . -type f ! -name '.progress.json' | LC_ALL=C sort | xargs sha256sum) >"$work/$side.sums"
done
identical=false
cmp -s "$work/a.sums" "$work/b.sums" && identical=true
python3 - "$out" "$a" "$b" "$model" "$work" "$identical" "$(uptime)" "${args[@]}" <<'EOF'
import hashlib, json, sys
out, a, b, model, work, identical, up = sys.argv[1:8]
args = sys.argv[8:]
def sums(side):
    return dict(reversed(l.split(maxsplit=1)) for l in open(f"{work}/{side}.sums").read().splitlines())
sa, sb = sums("a"), sums("b")
def sha(p):
    return hashlib.sha256(open(p, "rb").read()).hexdigest()
r = {
    "what": "same compress command with two uc binaries; every pack file compared by SHA-256",
    "model": model, "compress_args": args,
    "binary_a": {"path": a, "sha256": sha(a)}, "binary_b": {"path": b, "sha256": sha(b)},
    "files": len(sa), "identical": identical == "true",
    "differing_files": sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k)),
    "manifest_sha256": {"a": sa.get("./manifest.json"), "b": sb.get("./manifest.json")},
    "uptime": up,
}
json.dump(r, open(out, "w"), indent=2)
open(out, "a").write("\n")
print(json.dumps(r, indent=2))
EOF
