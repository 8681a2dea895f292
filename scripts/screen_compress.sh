#!/usr/bin/env bash
# Quick screen of one compression variant (the research log's 4-window tables):
#   scripts/screen_compress.sh NAME WINDOWS [uc compress flags...]
# e.g. scripts/screen_compress.sh b5-g64 4 --bpw 5.0 --group 64
# Compresses assets/smollm2-135m with the SOTU calibration split and the given flags
# into packs/screens/NAME, evaluates it against the source on the first WINDOWS windows
# of the SOTU held-out tail, and writes results/screens/NAME.json ({screen, compress,
# eval}: uc compress --json without the per-tensor list, and uc eval --json).
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1; windows=$2; shift 2
UC=target/release/uc
pack=packs/screens/$name
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf "$pack"; mkdir -p packs/screens results/screens
"$UC" compress assets/smollm2-135m -o "$pack" --calib-sotu assets/sotu "$@" --json > "$tmp/c.json"
"$UC" eval "$pack" --against assets/smollm2-135m --sotu assets/sotu --windows "$windows" --json > "$tmp/e.json"
python3 - "$name" "$tmp" <<'PY'
import json, sys
name, tmp = sys.argv[1:]
c = json.load(open(f"{tmp}/c.json")); e = json.load(open(f"{tmp}/e.json"))
c.pop("tensors", None)
with open(f"results/screens/{name}.json", "w") as f:
    json.dump({"screen": name, "compress": c, "eval": e}, f, indent=1)
a = e["against"]
print(f"{name}: bpw {c['bpw_body']:.4f}  ratio {a['ppl_ratio']:.4f}  KLD {a['kld']:.4f}  "
      f"top-1 {a['top1']:.4f}  {c['seconds']:.0f} s")
PY
