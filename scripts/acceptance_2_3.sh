#!/usr/bin/env bash
# Re-runs every measurement of the acceptance sections of issues 2 and 3 on the default
# real model (SmolLM2-135M-Instruct imported from the PyPI GGUF) and writes results/.
#
#   scripts/acceptance_2_3.sh [STEP...]
#
# Steps, in this order (default: all):
#   teacher       uc eval of the teacher, 32 x 1024 on the SOTU tail, compared with the
#                 transformers reference -> results/eval_teacher_sotu32.json,
#                 results/ppl_vs_transformers.json                         (issue 2: <= 0.1%)
#   tokenization  our tokenizer.json vs transformers' GGUF tokenizer on the SOTU tail
#                 -> results/tokenization_compare.json                     (issue 2)
#   determinism   uc eval with RAYON_NUM_THREADS=1 and 2, 2 windows, teacher --against the
#                 RTN 5-bit pack -> results/determinism_eval.json          (issue 2)
#   rtn           RTN packs q5g128, q4g128, q3g128: compress, verify (must PASS), eval 32 x 1024
#                 --against the teacher -> results/rtn_qBgG_{compress,verify,eval}.json (issue 3)
#   corruption    1000 single-byte flips across every file of packs/rtn-q5g128
#                 -> results/corruption_test.json                          (issue 3)
#   bench_verify  uc verify vs sha256sum MB/s -> results/bench_verify.json (issue 3: >= 0.8x)
#   bench_eval    uc eval vs transformers CPU tokens/s -> results/bench_eval.json (issue 2: >= 0.7x)
# and finally results/acceptance_2_3.json, a summary of every number and verdict.
#
# Inputs (see scripts/fetch_assets.sh): assets/smollm2-135m, assets/sotu,
# assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, results/reference_transformers_smollm2_sotu.json.
# Environment:
#   UC        the uc binary to measure. Default: `cargo build --release -p uc-cli`, then a copy
#             of target/release/uc in target/acceptance/ (so a concurrent rebuild cannot swap
#             the binary in the middle of a run).
#   PYTHON    a Python with torch, transformers, tokenizers (scripts/requirements-reference.txt);
#             default python3. Only the tokenization and bench_eval steps need them.
#   RTN_CONFIGS  the rtn step's (bits x group) list, default "5x128 4x128 3x128".
#   QUIET_LOAD, QUIET_MAX_WAIT   before each timing benchmark, wait until the 1-minute load
#             average is <= QUIET_LOAD (default 0.5), at most QUIET_MAX_WAIT s (default 900).
# Every JSON gets a "measurement" object: step, command, git HEAD, the number of lines of
# `git status --short`, the binary's SHA-256, and /proc/loadavg before and after.
# Heavy jobs run one at a time. Exit 1 if a step fails to run or an RTN pack does not verify
# (the other verdicts are in the JSON); the remaining steps still run.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
QUIET_LOAD=${QUIET_LOAD:-0.5}
QUIET_MAX_WAIT=${QUIET_MAX_WAIT:-900}
MODEL=assets/smollm2-135m
SOTU=assets/sotu
GGUF=assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
REF=results/reference_transformers_smollm2_sotu.json
read -r -a RTN_CONFIGS <<<"${RTN_CONFIGS:-5x128 4x128 3x128}"
FAILED=0
mkdir -p results packs

if [ -z "${UC:-}" ]; then
    cargo build --release --locked -p uc-cli
    mkdir -p target/acceptance
    cp target/release/uc target/acceptance/uc
    UC=$ROOT/target/acceptance/uc
fi
UC=$(cd "$(dirname "$UC")" && pwd)/$(basename "$UC")
[ -x "$UC" ] || { echo "acceptance: $UC is not executable" >&2; exit 1; }
UC_SHA=$(sha256sum "$UC" | cut -d' ' -f1)
export UC

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
log() { echo "[acceptance $(date +%H:%M:%S) load $(loadavg)] $*" >&2; }

# stamp FILE STEP "COMMAND" "LOAD_BEFORE" "LOAD_AFTER" [EXTRA_JSON]
stamp() {
    python3 - "$@" "$(git rev-parse HEAD)" "$(git status --short | wc -l)" "$UC" "$UC_SHA" <<'EOF'
import json, sys, datetime
f, step, cmd, lb, la, *rest = sys.argv[1:]
extra = rest[0] if len(rest) == 5 else "{}"
head, dirty, uc, uc_sha = rest[-4:]
with open(f) as fh:
    d = json.load(fh)
d["measurement"] = {
    "step": step, "command": cmd,
    "git_head": head, "git_status_short_lines": int(dirty),
    "uc_binary": uc, "uc_binary_sha256": uc_sha,
    "loadavg_before": lb, "loadavg_after": la,
    "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    **json.loads(extra),
}
with open(f, "w") as fh:
    json.dump(d, fh, indent=2)
    fh.write("\n")
EOF
}

# Waits (bounded) for a quiet machine before a timing benchmark; prints the waited seconds.
wait_quiet() {
    local waited=0
    while awk -v l="$(cut -d' ' -f1 /proc/loadavg)" -v q="$QUIET_LOAD" 'BEGIN { exit !(l > q) }' &&
        [ "$waited" -lt "$QUIET_MAX_WAIT" ]; do
        sleep 15
        waited=$((waited + 15))
    done
    echo "$waited"
}

compress_rtn() { # compress_rtn BITS GROUP: packs/rtn-qBgG + results/rtn_qBgG_compress.json
    local b=$1 g=$2 pack=packs/rtn-q$1g$2 out=results/rtn_q$1g$2_compress.json lb
    rm -rf "$pack"
    lb=$(loadavg)
    log "compress $pack"
    "$UC" compress "$MODEL" -o "$pack" --method rtn --bits "$b" --group "$g" --scales f16 --json >"$out"
    stamp "$out" rtn "uc compress $MODEL -o $pack --method rtn --bits $b --group $g --scales f16 --json" "$lb" "$(loadavg)"
}

step_teacher() {
    local lb cmd
    cmd="uc eval $MODEL --sotu $SOTU --windows 32 --json --out results/eval_teacher_sotu32.json"
    lb=$(loadavg); log "$cmd"
    "$UC" eval "$MODEL" --sotu "$SOTU" --windows 32 --json --out results/eval_teacher_sotu32.json >/dev/null
    stamp results/eval_teacher_sotu32.json teacher "$cmd" "$lb" "$(loadavg)"
    cmd="scripts/compare_ppl.py results/eval_teacher_sotu32.json $REF --tokenizer-json $MODEL/tokenizer.json --sotu $SOTU"
    lb=$(loadavg); log "$cmd"
    "$PY" scripts/compare_ppl.py results/eval_teacher_sotu32.json "$REF" \
        --tokenizer-json "$MODEL/tokenizer.json" --sotu "$SOTU" >results/ppl_vs_transformers.json
    stamp results/ppl_vs_transformers.json teacher "$cmd" "$lb" "$(loadavg)"
}

step_tokenization() {
    local lb cmd
    cmd="scripts/compare_tokenization.py $MODEL/tokenizer.json $GGUF $SOTU"
    lb=$(loadavg); log "$cmd"
    "$PY" scripts/compare_tokenization.py "$MODEL/tokenizer.json" "$GGUF" "$SOTU" >results/tokenization_compare.json
    stamp results/tokenization_compare.json tokenization "$cmd" "$lb" "$(loadavg)"
}

step_determinism() {
    local lb cmd pack=packs/rtn-q5g128
    [ -f "$pack/manifest.json" ] || compress_rtn 5 128
    cmd="scripts/determinism_eval.sh $MODEL $pack $SOTU results/determinism_eval.json 2"
    lb=$(loadavg); log "$cmd"
    PYTHON=python3 scripts/determinism_eval.sh "$MODEL" "$pack" "$SOTU" results/determinism_eval.json 2 ||
        log "determinism: NOT identical (see results/determinism_eval.json)"
    stamp results/determinism_eval.json determinism "$cmd" "$lb" "$(loadavg)"
}

step_rtn() {
    local cfg b g pack lb cmd
    for cfg in "${RTN_CONFIGS[@]}"; do
        b=${cfg%x*} g=${cfg#*x}
        pack=packs/rtn-q${b}g${g}
        compress_rtn "$b" "$g"
        cmd="uc verify $pack --json"
        lb=$(loadavg); log "$cmd"
        "$UC" verify "$pack" --json >"results/rtn_q${b}g${g}_verify.json" ||
            { log "VERIFY FAILED for $pack (continuing; see the receipt)"; FAILED=1; }
        stamp "results/rtn_q${b}g${g}_verify.json" rtn "$cmd" "$lb" "$(loadavg)"
        cmd="uc eval $pack --against $MODEL --sotu $SOTU --windows 32 --out results/rtn_q${b}g${g}_eval.json"
        lb=$(loadavg); log "$cmd"
        "$UC" eval "$pack" --against "$MODEL" --sotu "$SOTU" --windows 32 \
            --out "results/rtn_q${b}g${g}_eval.json" >/dev/null ||
            { log "EVAL FAILED for $pack"; FAILED=1; continue; }
        stamp "results/rtn_q${b}g${g}_eval.json" rtn "$cmd" "$lb" "$(loadavg)"
    done
}

step_corruption() {
    local lb cmd pack=packs/rtn-q5g128
    [ -f "$pack/manifest.json" ] || compress_rtn 5 128
    cmd="scripts/corruption_test.py $pack --positions 1000 --seed 1 --uc UC --out results/corruption_test.json"
    lb=$(loadavg); log "$cmd"
    python3 scripts/corruption_test.py "$pack" --positions 1000 --seed 1 --uc "$UC" \
        --out results/corruption_test.json || log "corruption: not every position detected and named"
    stamp results/corruption_test.json corruption "$cmd" "$lb" "$(loadavg)"
}

step_bench_verify() {
    local lb cmd waited pack=packs/rtn-q5g128
    [ -f "$pack/manifest.json" ] || compress_rtn 5 128
    waited=$(wait_quiet)
    cmd="UC=UC scripts/bench_verify.sh $pack results/bench_verify.json"
    lb=$(loadavg); log "$cmd (waited ${waited}s for load <= $QUIET_LOAD)"
    scripts/bench_verify.sh "$pack" results/bench_verify.json >/dev/null
    stamp results/bench_verify.json bench_verify "$cmd" "$lb" "$(loadavg)" "{\"waited_for_quiet_s\": $waited}"
}

step_bench_eval() {
    local lb cmd waited
    waited=$(wait_quiet)
    cmd="scripts/bench_eval.py --model-dir $MODEL --sotu $SOTU --windows 4 --threads 2 --uc UC --out results/bench_eval.json"
    lb=$(loadavg); log "$cmd (waited ${waited}s for load <= $QUIET_LOAD)"
    "$PY" scripts/bench_eval.py --model-dir "$MODEL" --sotu "$SOTU" --windows 4 --threads 2 --uc "$UC" \
        --out results/bench_eval.json >/dev/null
    stamp results/bench_eval.json bench_eval "$cmd" "$lb" "$(loadavg)" "{\"waited_for_quiet_s\": $waited}"
}

summary() {
    python3 - <<'EOF'
import json, os
def load(p):
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
S = {"what": "acceptance of issues 2 and 3 on SmolLM2-135M-Instruct, SOTU tail; see scripts/acceptance_2_3.sh"}
p = load("results/ppl_vs_transformers.json")
if p:
    S["teacher_ppl"] = {"uc": p["ppl"]["uc"], "transformers": p["ppl"]["reference"],
                        "rel_diff": p["ppl"]["rel_diff"], "threshold": p["ppl"]["tolerance"],
                        "pass": p["ppl"]["pass"],
                        "same_windows_checks_equal": p["same_windows"]["all_available_checks_equal"],
                        "token_hash_in_uc_receipt": p["same_windows"]["token_hash_in_uc_receipt"]}
t = load("results/tokenization_compare.json")
if t:
    S["tokenization"] = {"n_ours": t["n_ours"], "n_hf": t["n_hf"], "n_mismatch": t["n_mismatch"],
                         "pass": t["n_mismatch"] == 0}
d = load("results/determinism_eval.json")
if d:
    S["determinism"] = {"identical": d["identical"], "pass": d["identical"]}
rtn = {}
for b, g in [(5, 128), (4, 128), (3, 128)]:
    k = f"q{b}g{g}"
    c, v, e = (load(f"results/rtn_{k}_{x}.json") for x in ("compress", "verify", "eval"))
    r = {}
    if c:
        r.update({kk: c.get(kk) for kk in ("bpw_body", "bpw_model", "seconds") if kk in c})
    if v:
        r["verify_pass"] = v.get("pass")
        if not v.get("pass"):
            r["verify_failures"] = v.get("failures")
        r["fingerprint"] = v.get("fingerprint")
    if e and e.get("against"):
        a = e["against"]
        r.update({"ppl": e["ppl"], "ref_ppl": a["ref_ppl"], "ratio": a["ppl_ratio"], "kld": a["kld"], "top1": a["top1"]})
    if r:
        rtn[k] = r
if rtn:
    S["rtn"] = rtn
c = load("results/corruption_test.json")
if c:
    S["corruption"] = dict(c["totals"], **{"pass": c["pass"]})
bv = load("results/bench_verify.json")
if bv:
    S["bench_verify"] = {"verify_mb_s": bv["verify_mb_s"], "sha256sum_mb_s": bv["sha256sum_mb_s"],
                         "ratio": bv["ratio"], "goal": 0.8, "pass": bv["ratio"] >= 0.8}
be = load("results/bench_eval.json")
if be and "ratio_uc_over_best_transformers" in be:
    S["bench_eval"] = {"uc_tokens_per_s": be["uc"]["tokens_per_s"],
                       "transformers_tokens_per_s": {k: v["tokens_per_s"] for k, v in be["transformers"]["runs"].items()},
                       "ratio_over_best": be["ratio_uc_over_best_transformers"],
                       "ratio_per_impl": be["ratio_uc_over_transformers"], "goal": 0.7,
                       "pass": be["ratio_uc_over_best_transformers"] >= 0.7}
with open("results/acceptance_2_3.json", "w") as f:
    json.dump(S, f, indent=2)
    f.write("\n")
print(json.dumps(S, indent=2))
EOF
}

STEPS=("$@")
[ ${#STEPS[@]} -gt 0 ] || STEPS=(teacher tokenization determinism rtn corruption bench_verify bench_eval)
log "uc=$UC sha256=$UC_SHA head=$(git rev-parse --short HEAD) dirty=$(git status --short | wc -l)"
for s in "${STEPS[@]}"; do
    case $s in
    teacher | tokenization | determinism | rtn | corruption | bench_verify | bench_eval) "step_$s" ;;
    summary) ;;
    *) echo "acceptance: unknown step $s" >&2; exit 2 ;;
    esac
done
summary
exit "$FAILED"
