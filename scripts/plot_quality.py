#!/usr/bin/env python3
"""Quality per bit: uc's rows against llama.cpp's, as a picture for the README.

    python3 scripts/plot_quality.py            # writes docs/quality.svg

Reads the committed results only (nothing is measured here):
  results/compress_acceptance.json        uc rows (scripts/bench_compress.sh), SOTU tail and,
                                          where measured, the second-genre text (row["devil"])
  results/llamacpp_rows.json              llama.cpp rows on the SOTU tail (scripts/llamacpp_rows.sh)
  results/llamacpp_rows_devil.json        llama.cpp rows on the second-genre text
                                          (UC_EVAL_TEXT=assets/devil/devil.txt scripts/llamacpp_rows.sh)
  results/screens/NAME_devil32.json      uc packs scored on 32 windows of the second-genre
                                          text outside scripts/bench_compress.sh (bpw from
                                          results/screens/NAME.json)
  results/third_genre_docs{,_m,_h}.json  uc rows "t2", "m" and "h" and llama.cpp's rows on the third
                                          text, technical prose (scripts/third_genre.sh)
Draws bpw (block linears, every stored byte) against KLD and against PPL ratio - 1 (both
log scale), one column per text. Needs matplotlib (pip install matplotlib).
"""
import glob
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def load(name):
    path = os.path.join(ROOT, "results", name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def uc_points(acc, text, variant, method):
    """(bpw, ratio, kld) of uc's rows of one variant and method, on one text."""
    pts = []
    for r in acc["rows"]:
        if r["variant"] != variant or r["method"] != method:
            continue
        m = r if text == "sotu" else r.get(text)
        if m:
            pts.append((r["bpw_body"], m["ppl_ratio"], m["kld"]))
    return sorted(pts)


def screen_devil_points():
    """(bpw, ratio, kld) of screen packs scored on 32 windows of the second-genre text."""
    pts = []
    d = os.path.join(ROOT, "results", "screens")
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        if name.endswith("_devil32.json"):
            ev = json.load(open(os.path.join(d, name)))
            screen = json.load(open(os.path.join(d, name[: -len("_devil32.json")] + ".json")))
            a = ev["against"]
            pts.append((screen["compress"]["bpw_body"], a["ppl_ratio"], a["kld"]))
    return sorted(pts)


def docs_points(variant):
    """(bpw, ratio, kld) of uc's rows of one variant on the third text (scripts/third_genre.sh;
    a budget measured later has its own file, third_genre_docs_<variant>_<budget>.json)."""
    base = "third_genre_docs" if variant == "t2" else f"third_genre_docs_{variant}"
    names = [base + ".json"] + sorted(
        os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "results", base + "_[0-9]*.json")))
    rows = [r for d in map(load, names) if d is not None for r in d["uc"]]
    return sorted((r["bpw_body"], r["eval"]["against"]["ppl_ratio"], r["eval"]["against"]["kld"])
                  for r in rows)


def llama_points(rows):
    return [(r["bpw_body"], r["ppl_ratio"], r["kld"], r["row"]) for r in rows["rows"]] if rows else []


def main():
    acc = load("compress_acceptance.json")
    if acc is None:
        sys.exit("results/compress_acceptance.json is missing: run scripts/bench_compress.sh")
    variant = os.environ.get("UC_VARIANT", "default")
    texts = [("sotu", "SOTU held-out tail (speeches)", load("llamacpp_rows.json"))]
    if any(r.get("devil") for r in acc["rows"]) or screen_devil_points():
        texts.append(("devil", "The Devil's Dictionary (genre not in calibration)",
                      load("llamacpp_rows_devil.json")))
    docs = load("third_genre_docs.json")
    if docs:
        texts.append(("docs", "docutils documentation (technical prose, not in calibration)",
                      docs["llamacpp"]))
    fig, axes = plt.subplots(2, len(texts), figsize=(5.5 * len(texts), 8), squeeze=False)
    for col, (key, title, llama) in enumerate(texts):
        for row, (metric, idx) in enumerate((("KL divergence to the original", 2),
                                             ("perplexity ratio - 1", 1))):
            y = (lambda v: v - 1) if idx == 1 else (lambda v: v)
            ax = axes[row][col]
            # Rows named "default" were measured before the rotation became the
            # default; the rotated scalar rows are the variant "h64", the trellis rows
            # calibrated on speeches "t2", genre-mixed calibration with damping 0.3 "m",
            # and today's default, "m" with the calibrated head, "h"; `--effort max`
            # with coordinate descent is "hmaxcd" (scripts/bench_compress.sh).
            for var, method, style, label in (
                (variant, "gptq", "o:", "uc (calibrated, unrotated, scalar codes)"),
                ("h64", "gptq", "D--", "uc (calibrated, rotated, scalar codes)"),
                ("t2", "gptq", "x--", "uc (trellis, calibrated on speeches)"),
                ("m", "gptq", "*--", "uc (trellis, genre-mixed calibration)"),
                ("h", "gptq", "P-", "uc default (as above, calibrated head)"),
                ("hmaxcd", "gptq", "v", "uc --effort max"),
                (variant, "rtn", "s--", "uc round-to-nearest"),
            ):
                pts = docs_points(var) if key == "docs" and method == "gptq" else uc_points(acc, key, var, method)
                if key == "devil" and var == variant and method == "gptq" and not pts:
                    pts = screen_devil_points()
                if pts:
                    ax.plot([p[0] for p in pts], [y(p[idx]) for p in pts], style, label=label)
            lp = [p for p in llama_points(llama) if p[0] < 9]
            if lp:
                ax.plot([p[0] for p in lp], [y(p[idx]) for p in lp], "^", color="tab:red",
                        label="llama.cpp")
                for p in lp:
                    ax.annotate(p[3], (p[0], y(p[idx])), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
            ax.set_yscale("log")
            ax.set_xlabel("bits per weight (block linears, every stored byte)")
            ax.set_ylabel(metric)
            ax.set_title(title, fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct: quality per bit (lower is better)", fontsize=11)
    fig.tight_layout()
    out = os.path.join(ROOT, "docs", "quality.svg")
    fig.savefig(out + ".tmp", format="svg", metadata={"Date": None})
    os.replace(out + ".tmp", out)
    print(f"wrote {os.path.relpath(out, ROOT)}")


if __name__ == "__main__":
    main()
