#!/usr/bin/env python3
"""Randomized corruption test of `uc verify` (issue 3 acceptance).

  corruption_test.py PACK [--positions 1000] [--seed 1] [--uc BIN] [--out FILE]
                     [--only PATH ...] [--workdir DIR] [--keep-going]

Copies PACK to a temporary directory and checks the copy verifies (PASS). Then draws
--positions (file, offset, mask) triples from --seed, deterministically:

  1. every file of the pack (recursively, manifest.json, config and tokenizer files
     included; sorted by relative path) gets one position, uniform over its bytes;
  2. the remaining positions are uniform over the concatenation of all files, i.e. each
     file is weighted by its size;
  3. a (file, offset) drawn twice is redrawn; each mask is uniform in 0x01..0xff.

(--only restricts the draw to the given relative paths: an exploration aid, not the
acceptance test.) For each position: xor the byte with the mask, run `BIN verify COPY
--json`, restore the byte. A position is

  * detected: exit code 1 and the receipt says pass=false;
  * named: detected, and some failure's subject is the corrupted file's relative path
    (for manifest.json: detected with a non-empty failure message -- the manifest cannot
    name itself by digest);
  * missed: not detected.

Writes (to --out, and a summary to stdout) the pack, the seed, totals {positions, detected,
named, missed, detected_not_named}, per-file totals, every position as a compact row
[file_index, offset, mask, exit_code, pass, named, n_failures], and the full details of every
missed or unnamed position (original and new byte, failures). Finally checks that the copy
verifies again with the pack's original fingerprint (every byte restored).
Exit 0 when every position was detected and named, 1 otherwise, 2 on bad input.
"""

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time


def list_files(root):
    out = []
    for d, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(d, f)
            out.append(os.path.relpath(p, root).replace(os.sep, "/"))
    return sorted(out)


def run_verify(uc, pack):
    t0 = time.perf_counter()
    p = subprocess.run([uc, "verify", pack, "--json"], capture_output=True, text=True)
    dt = time.perf_counter() - t0
    try:
        rep = json.loads(p.stdout)
    except json.JSONDecodeError:
        rep = None
    return p.returncode, rep, p.stderr, dt


def draw_positions(files, sizes, n, rng):
    total = sum(sizes)
    seen = set()
    pos = []

    def add(fi, off):
        if (fi, off) in seen:
            return False
        seen.add((fi, off))
        pos.append((fi, off, rng.randint(1, 255)))
        return True

    for fi, s in enumerate(sizes):  # at least one position per file
        if len(pos) >= n:
            break
        while not add(fi, rng.randrange(s)):
            pass
    # cumulative offsets for the size-weighted draw
    starts, acc = [], 0
    for s in sizes:
        starts.append(acc)
        acc += s
    import bisect

    while len(pos) < min(n, total):
        g = rng.randrange(total)
        fi = bisect.bisect_right(starts, g) - 1
        add(fi, g - starts[fi])
    return pos


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pack")
    ap.add_argument("--positions", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--uc", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "uc"))
    ap.add_argument("--out", help="write the full JSON here")
    ap.add_argument("--only", nargs="+", help="restrict the draw to these relative paths (exploration)")
    ap.add_argument("--workdir", help="parent of the temporary copy (default: system temp)")
    args = ap.parse_args()

    if not os.path.isfile(os.path.join(args.pack, "manifest.json")):
        print(f"corruption_test: {args.pack} has no manifest.json", file=sys.stderr)
        sys.exit(2)
    uc = os.path.abspath(args.uc)
    if not os.access(uc, os.X_OK):
        print(f"corruption_test: {uc} is not executable", file=sys.stderr)
        sys.exit(2)

    tmp = tempfile.mkdtemp(prefix="uc-corrupt-", dir=args.workdir)
    try:
        copy = os.path.join(tmp, "pack")
        shutil.copytree(args.pack, copy)
        files = list_files(copy)
        if args.only:
            missing = [f for f in args.only if f not in files]
            if missing:
                print(f"corruption_test: not in the pack: {missing}", file=sys.stderr)
                sys.exit(2)
            files = [f for f in files if f in set(args.only)]
        sizes = [os.path.getsize(os.path.join(copy, f)) for f in files]
        if any(s == 0 for s in sizes):
            empty = [f for f, s in zip(files, sizes) if s == 0]
            print(f"corruption_test: empty files cannot be corrupted by a flip, skipped: {empty}", file=sys.stderr)
        digests_before = {f: sha256_file(os.path.join(copy, f)) for f in files}

        rc0, rep0, err0, t_base = run_verify(uc, copy)
        if rc0 != 0 or not rep0 or not rep0.get("pass"):
            print(f"corruption_test: the pristine copy does not verify (exit {rc0}): {err0[-500:]}", file=sys.stderr)
            sys.exit(2)
        fingerprint = rep0.get("fingerprint")

        rng = random.Random(args.seed)
        nonempty = [i for i, s in enumerate(sizes) if s > 0]
        pos_ne = draw_positions([files[i] for i in nonempty], [sizes[i] for i in nonempty], args.positions, rng)
        positions = [(nonempty[fi], off, mask) for fi, off, mask in pos_ne]

        rows, details = [], []
        per_file = {f: {"size": s, "positions": 0, "detected": 0, "named": 0, "missed": 0} for f, s in zip(files, sizes)}
        t0 = time.perf_counter()
        load_before = os.getloadavg()
        for k, (fi, off, mask) in enumerate(positions):
            rel = files[fi]
            path = os.path.join(copy, rel)
            with open(path, "r+b") as f:
                f.seek(off)
                orig = f.read(1)[0]
                f.seek(off)
                f.write(bytes([orig ^ mask]))
            try:
                rc, rep, err, dt = run_verify(uc, copy)
            finally:
                with open(path, "r+b") as f:
                    f.seek(off)
                    f.write(bytes([orig]))
            passed = None if rep is None else bool(rep.get("pass"))
            failures = [] if rep is None else rep.get("failures", [])
            detected = rc == 1 and passed is False
            if rel == "manifest.json":
                named = detected and any(fl.get("problem") for fl in failures)
            else:
                named = detected and any(fl.get("subject") == rel for fl in failures)
            pf = per_file[rel]
            pf["positions"] += 1
            pf["detected"] += detected
            pf["named"] += named
            pf["missed"] += not detected
            rows.append([fi, off, mask, rc, None if passed is None else int(passed), int(named), len(failures)])
            if not named:
                details.append({
                    "file": rel, "offset": off, "mask": mask, "byte_before": orig, "byte_after": orig ^ mask,
                    "exit_code": rc, "pass": passed, "failures": failures[:10], "stderr_tail": err[-500:],
                })
            if (k + 1) % 50 == 0 or k + 1 == len(positions):
                el = time.perf_counter() - t0
                print(f"corruption_test: {k + 1}/{len(positions)} ({el:.0f}s), not named so far: {len(details)}",
                      file=sys.stderr, flush=True)
        elapsed = time.perf_counter() - t0
        load_after = os.getloadavg()

        rc1, rep1, _, _ = run_verify(uc, copy)
        restored = rc1 == 0 and bool(rep1 and rep1.get("pass")) and rep1.get("fingerprint") == fingerprint
        restored = restored and all(sha256_file(os.path.join(copy, f)) == d for f, d in digests_before.items())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    n = len(rows)
    detected = sum(1 for r in rows if r[3] == 1 and r[4] == 0)
    named = sum(r[5] for r in rows)
    totals = {"positions": n, "detected": detected, "named": named, "missed": n - detected,
              "detected_not_named": detected - named}
    out = {
        "what": "randomized single-byte corruption of every file of a pack, uc verify --json after each",
        "pack": os.path.abspath(args.pack),
        "pack_fingerprint": fingerprint,
        "uc": uc,
        "seed": args.seed,
        "only": args.only,
        "files": files,
        "total_bytes": sum(sizes),
        "totals": totals,
        "pass": n > 0 and named == n,
        "per_file": per_file,
        "columns": ["file_index", "offset", "mask", "exit_code", "pass", "named", "n_failures"],
        "positions": rows,
        "not_named_details": details,
        "restored_copy_verifies_with_original_fingerprint": restored,
        "baseline_verify_seconds": round(t_base, 3),
        "seconds": round(elapsed, 1),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        # readable, but one line per position
        rows_text = ",\n    ".join(json.dumps(r, separators=(",", ":")) for r in rows)
        text = json.dumps(dict(out, positions="@ROWS@"), indent=2)
        text = text.replace('"@ROWS@"', "[\n    " + rows_text + "\n  ]" if rows else "[]")
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(json.dumps({"totals": totals, "pass": out["pass"], "restored": restored, "seconds": out["seconds"]}))
    sys.exit(0 if out["pass"] and restored else 1)


if __name__ == "__main__":
    main()
