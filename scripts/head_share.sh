#!/usr/bin/env bash
# How much of a pack's error its token embedding / head carries (SmolLM2: tied).
#   [OUT=results/head_share.json] scripts/head_share.sh PACK [WINDOWS=8]
# Exports PACK as an f32 checkpoint, then evaluates it against assets/smollm2-135m on the
# first WINDOWS windows of the SOTU tail four ways: as is; with the checkpoint's exact
# embedding (input and head); untied, with the exact rows only as the input embedding;
# untied, with the exact rows only as the head. Pure Python (no packages): the variants
# are written by rewriting the safetensors header.
set -euo pipefail
cd "$(dirname "$0")/.."
pack=$1; windows=${2:-8}
UC=${UC:-target/release/uc}
out=${OUT:-results/head_share.json}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$UC" export --to safetensors --dtype f32 "$pack" "$tmp/pack" > /dev/null
python3 - "$tmp" assets/smollm2-135m <<'PY'
import json, os, shutil, struct, sys
tmp, teacher = sys.argv[1:]
EMB = "model.embed_tokens.weight"

def read(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        head = json.loads(f.read(n))
        data = f.read()
    head.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]])
            for k, v in head.items()}

def write(path, tensors):
    head, off, blobs = {}, 0, []
    for k in sorted(tensors):
        dt, shape, b = tensors[k]
        head[k] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(b)]}
        off += len(b); blobs.append(b)
    h = json.dumps(head).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h))); f.write(h)
        for b in blobs:
            f.write(b)

student = read(f"{tmp}/pack/model.safetensors")
exact = read(f"{teacher}/model.safetensors")[EMB]
assert exact[0] == "F32" and exact[1] == student[EMB][1], "expects the f32 teacher"
for name, emb, head in [("embedding_exact", exact, None), ("input_exact", exact, student[EMB]),
                        ("head_exact", student[EMB], exact)]:
    d = f"{tmp}/{name}"
    os.makedirs(d)
    for f in os.listdir(f"{tmp}/pack"):
        if f != "model.safetensors":
            shutil.copy(f"{tmp}/pack/{f}", d)
    t = dict(student); t[EMB] = emb
    if head is not None:
        t["lm_head.weight"] = head
        cfg = json.load(open(f"{d}/config.json")); cfg["tie_word_embeddings"] = False
        json.dump(cfg, open(f"{d}/config.json", "w"))
    write(f"{d}/model.safetensors", t)
PY
for v in pack embedding_exact input_exact head_exact; do
    "$UC" eval "$tmp/$v" --against assets/smollm2-135m --sotu assets/sotu --windows "$windows" \
        --json > "$tmp/$v.json"
done
python3 - "$tmp" "$pack" "$windows" "$out" <<'PY'
import json, sys
tmp, pack, windows, path = sys.argv[1:]
rows = {}
for v in ["pack", "embedding_exact", "input_exact", "head_exact"]:
    a = json.load(open(f"{tmp}/{v}.json"))["against"]
    rows[v] = {k: a[k] for k in ("ppl_ratio", "kld", "top1")}
out = {"command": f"scripts/head_share.sh {pack} {windows}", "pack": pack,
       "text": "SOTU tail", "windows": int(windows), "rows": rows}
json.dump(out, open(path, "w"), indent=2)
print(json.dumps(out, indent=2))
PY
