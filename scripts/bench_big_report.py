#!/usr/bin/env python3
"""Merges the stage records of scripts/bench_big.sh into results/big_7b.json and
results/big_1b.json (numbers copied from the stage files, nothing computed but ratios).

Usage: python3 scripts/bench_big_report.py results/big results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GB = 1e9


def load(d: Path, name: str):
    p = d / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def compress_row(rec, must_gb=None):
    if rec is None:
        return None
    out = rec["stdout"] if isinstance(rec["stdout"], dict) else {}
    mem = out.get("memory", {})
    est = mem.get("estimate_peak_bytes")
    peak = rec["peak_rss_kib"] * 1024
    row = {
        "command": rec["command"],
        "exit_code": rec["exit_code"],
        "wall_s": rec["wall_s"],
        "cpu_s": round(rec["user_s"] + rec["system_s"], 1),
        "uc_seconds": out.get("seconds"),
        "peak_rss_bytes": peak,
        "peak_rss_gb": round(peak / GB, 3),
        "max_memory_bytes": mem.get("max_memory_bytes"),
        "estimate_peak_bytes": est,
        "estimate_phase": mem.get("estimate_phase"),
        "estimate_over_measured": round(est / peak, 3) if est else None,
        "fingerprint": out.get("fingerprint"),
        "bpw_body": out.get("bpw_body"),
        "bpw_model": out.get("bpw_model"),
        "resumed_blocks": out.get("resumed_blocks"),
        "probe_seconds": out.get("probe_seconds"),
        "calibration_seconds": out.get("calibration_seconds"),
        "load_avg_before": rec["load_avg_before"],
        "load_avg_after": rec["load_avg_after"],
    }
    if mem.get("estimate"):
        row["estimate_terms"] = next(
            p["terms"] for p in mem["estimate"]["phases"] if p["name"] == mem["estimate_phase"]
        )
    if out.get("blocks"):
        row["block_seconds"] = [round(b["seconds"], 1) for b in out["blocks"]]
    if must_gb is not None:
        row["must_peak_rss_gb"] = must_gb
        row["must_met"] = rec["exit_code"] == 0 and peak / GB <= must_gb
    return row


def main() -> None:
    stages, results = Path(sys.argv[1]), Path(sys.argv[2])
    gen7, gen1 = load(stages, "gen_7b"), load(stages, "gen_1b")
    rtn7 = compress_row(load(stages, "rtn7b"), 2.5)
    res7 = compress_row(load(stages, "resume7b"))
    kill = load(stages, "resume7b_kill")
    ver = load(stages, "verify7b")
    run = load(stages, "run7b")
    seven = {
        "what": "uc on a synthetic Mistral-7B-v0.1-shaped checkpoint (bf16, 2 shards as on the hub, random weights), scripts/bench_big.sh",
        "checkpoint": gen7 and {
            "params": gen7["stdout"]["params"],
            "bytes": gen7["stdout"]["total_size"],
            "files": gen7["stdout"]["files"],
            "generate_wall_s": gen7["wall_s"],
            "generate_peak_rss_gb": gen7["peak_rss_gb"],
        },
        "rtn_compress": rtn7,
    }
    if res7 and kill:
        seven["kill_resume"] = {
            "killed_after_blocks": kill["killed_after_blocks"],
            "blocks": kill["blocks"],
            "rerun": res7,
            "fingerprint_uninterrupted": rtn7 and rtn7["fingerprint"],
            "fingerprint_killed_and_resumed": res7["fingerprint"],
            "identical": bool(rtn7 and rtn7["fingerprint"] and rtn7["fingerprint"] == res7["fingerprint"]),
        }
    if ver:
        v = ver["stdout"]
        seven["verify"] = {
            "command": ver["command"],
            "pass": v.get("pass"),
            "bytes_hashed": v.get("bytes_hashed"),
            "uc_seconds": v.get("seconds"),
            "wall_s": ver["wall_s"],
            "gb_per_s": round(v["bytes_hashed"] / v["seconds"] / GB, 3),
            "peak_rss_gb": ver["peak_rss_gb"],
            "load_avg_before": ver["load_avg_before"],
        }
    if run:
        r = run["stdout"]
        peak = run["peak_rss_kib"] * 1024
        est = r.get("memory", {}).get("estimate_peak_bytes")
        seven["streamed_decode"] = {
            "command": run["command"],
            "exit_code": run["exit_code"],
            "env": "MIMALLOC_ALLOW_THP=0",
            "prefill_tok_s": r.get("prefill_tok_s"),
            "decode_tok_s": r.get("decode_tok_s"),
            "ttft_ms": r.get("ttft_ms"),
            "load_s": r.get("load_s"),
            "peak_rss_bytes": peak,
            "peak_rss_gb": round(peak / GB, 3),
            "uc_peak_rss_mib": r.get("peak_rss_mib"),
            "max_memory_bytes": r.get("memory", {}).get("max_memory_bytes"),
            "estimate_peak_bytes": est,
            "estimate_over_measured": round(est / peak, 3) if est else None,
            "threads": r.get("machine", {}).get("threads"),
            "must_peak_rss_gb": 1.5,
            "must_met": run["exit_code"] == 0 and peak / GB <= 1.5,
            "wall_s": run["wall_s"],
            "load_avg_before": run["load_avg_before"],
        }
    (results / "big_7b.json").write_text(json.dumps(seven, indent=2) + "\n")

    rtn1 = compress_row(load(stages, "rtn1b"))
    cal1 = compress_row(load(stages, "calib1b"), 3.0)
    one = {
        "what": "uc on a synthetic Llama-3.2-1B-shaped checkpoint (bf16, one file, tied embeddings, random weights; SmolLM2's tokenizer), scripts/bench_big.sh",
        "checkpoint": gen1 and {
            "params": gen1["stdout"]["params"],
            "bytes": gen1["stdout"]["total_size"],
            "generate_wall_s": gen1["wall_s"],
        },
        "rtn_compress": rtn1,
        "calibrated_compress": cal1,
    }
    if rtn1 and rtn7 and gen1 and gen7:
        p1, p7 = gen1["stdout"]["params"], gen7["stdout"]["params"]
        one["rtn_time_scaling"] = {
            "params_ratio_7b_over_1b": round(p7 / p1, 3),
            "wall_ratio_7b_over_1b": round(rtn7["wall_s"] / rtn1["wall_s"], 3),
            "cpu_ratio_7b_over_1b": round(rtn7["cpu_s"] / rtn1["cpu_s"], 3),
        }
    (results / "big_1b.json").write_text(json.dumps(one, indent=2) + "\n")
    print(json.dumps({"7b": seven.get("rtn_compress"), "1b": cal1}, indent=1)[:3000])


if __name__ == "__main__":
    main()
