#!/usr/bin/env bash
# Quick screen of one compression variant (the research log's 4-window tables):
#   scripts/screen_compress.sh NAME WINDOWS [uc compress flags...]
# e.g. scripts/screen_compress.sh b5-g64 4 --bpw 5.0 --group 64
# Compresses assets/smollm2-135m with the given flags (calibration: uc's default, the SOTU
# calibration split, unless the flags name one) into packs/screens/NAME, evaluates it against the
# source on the first WINDOWS windows of the SOTU held-out tail and, when
# assets/devil/devil.txt exists (scripts/fetch_assets.sh), of the second-genre text, and
# when packs/docs.txt exists (scripts/third_genre.sh), of the third (technical prose), and
# writes results/screens/NAME.json ({screen, compress, eval, eval_devil}: uc compress
# --json without the per-tensor list, and uc eval --json).
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1; windows=$2; shift 2
UC=${UC:-target/release/uc}
pack=packs/screens/$name
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf "$pack"; mkdir -p packs/screens results/screens
"$UC" compress assets/smollm2-135m -o "$pack" "$@" --json > "$tmp/c.json"
"$UC" eval "$pack" --against assets/smollm2-135m --sotu assets/sotu --windows "$windows" --json > "$tmp/e.json"
if [[ -f assets/devil/devil.txt ]]; then
    "$UC" eval "$pack" --against assets/smollm2-135m --text assets/devil/devil.txt \
        --windows "$windows" --json > "$tmp/d.json"
fi
# The third genre (technical prose), when scripts/third_genre.sh has written its text.
if [[ -f packs/docs.txt ]]; then
    "$UC" eval "$pack" --against assets/smollm2-135m --text packs/docs.txt \
        --windows "$windows" --json > "$tmp/t.json"
fi
python3 - "$name" "$tmp" <<'PY'
import json, os, sys
name, tmp = sys.argv[1:]
c = json.load(open(f"{tmp}/c.json")); e = json.load(open(f"{tmp}/e.json"))
c.pop("tensors", None)
out = {"screen": name, "compress": c, "eval": e}
if os.path.exists(f"{tmp}/d.json"):
    out["eval_devil"] = json.load(open(f"{tmp}/d.json"))
if os.path.exists(f"{tmp}/t.json"):
    out["eval_docs"] = json.load(open(f"{tmp}/t.json"))
with open(f"results/screens/{name}.json", "w") as f:
    json.dump(out, f, indent=1)
line = f"{name}: bpw {c['bpw_body']:.4f}  {c['seconds']:.0f} s"
for key, label in (("eval", "sotu"), ("eval_devil", "devil"), ("eval_docs", "docs")):
    if key in out:
        a = out[key]["against"]
        line += f" | {label}: ratio {a['ppl_ratio']:.4f} KLD {a['kld']:.4f} top-1 {a['top1']:.4f}"
print(line)
PY
