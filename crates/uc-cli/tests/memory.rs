//! `--max-memory SIZE` of `uc compress`, `uc run` and `uc bench` on a committed tiny
//! fixture: sizes parse or exit 2 naming the flag; a budget below the estimate is
//! refused before anything is written, naming what does not fit; a budget that fits
//! is reported with the estimate in the JSON.

mod common;
use common::*;
use std::path::Path;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn compress(model: &Path, pack: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "compress",
        model.to_str().unwrap(),
        "-o",
        pack.to_str().unwrap(),
        "--method",
        "rtn",
    ];
    args.extend_from_slice(extra);
    uc(&args, &[])
}

#[test]
fn bad_sizes_are_usage_errors_naming_the_flag() {
    let m = model_with_tokenizer("llama");
    let out = tempfile::tempdir().unwrap();
    let pack = out.path().join("p");
    for bad in ["2X", "lots", "0", "-5M", ""] {
        let o = compress(m.path(), &pack, &[&format!("--max-memory={bad}")]);
        assert_eq!(o.status.code(), Some(2), "{bad}: {}", stderr(&o));
        assert!(stderr(&o).contains("--max-memory"), "{bad}: {}", stderr(&o));
        assert!(!pack.exists());
    }
    let model = m.path().to_str().unwrap();
    for cmd in [
        vec!["run", model, "-p", "Hi", "--max-memory", "12Q"],
        vec!["bench", model, "--max-memory", "12Q"],
    ] {
        let o = uc(&cmd, &[]);
        assert_eq!(o.status.code(), Some(2), "{cmd:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("--max-memory"), "{}", stderr(&o));
    }
}

#[test]
fn a_compress_budget_too_small_is_refused_before_anything_is_written() {
    let m = model_with_tokenizer("llama");
    let out = tempfile::tempdir().unwrap();
    let pack = out.path().join("p");
    let o = compress(m.path(), &pack, &["--max-memory", "1M"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("--max-memory"), "{e}");
    assert!(e.contains("does not fit"), "{e}");
    assert!(e.contains("process baseline"), "{e}");
    assert!(e.contains("over the budget of 1.0 MiB"), "{e}");
    assert!(!pack.exists(), "a refused run must not create the pack");
    // Calibrated: the message names the calibration activations' terms.
    let text = text_file(out.path());
    let o = uc(
        &[
            "compress",
            m.path().to_str().unwrap(),
            "-o",
            pack.to_str().unwrap(),
            "--calib",
            text.to_str().unwrap(),
            "--calib-seqs",
            "2",
            "--calib-len",
            "16",
            "--max-memory",
            "1M",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("calibration activations"),
        "{}",
        stderr(&o)
    );
    assert!(!pack.exists());
}

#[test]
fn a_budget_that_fits_is_reported_with_the_estimate() {
    let m = model_with_tokenizer("llama");
    let out = tempfile::tempdir().unwrap();
    let pack = out.path().join("p");
    let j = json_of(&compress(
        m.path(),
        &pack,
        &["--max-memory", "1G", "--json"],
    ));
    let mem = &j["memory"];
    assert_eq!(mem["max_memory_bytes"], 1u64 << 30);
    let est = mem["estimate_peak_bytes"].as_u64().unwrap();
    assert!(est > 0 && est < 1 << 30, "{mem}");
    assert!(
        ["globals", "stream start", "block statistics", "block solve"]
            .contains(&mem["estimate_phase"].as_str().unwrap())
    );
    assert_eq!(mem["recompute_mlp_input"], false, "{mem}");
    assert!(uc(&["verify", pack.to_str().unwrap()], &[])
        .status
        .success());

    // run and bench: streamed from the pack, a tiny budget is refused naming the KV
    // cache and the weights; a fitting one runs and bench reports it.
    let p = pack.to_str().unwrap();
    let o = uc(
        &[
            "run",
            p,
            "-p",
            "Hi",
            "--stream-layers",
            "--max-memory",
            "64K",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("does not fit") && e.contains("KV cache"), "{e}");
    let o = uc(
        &[
            "run",
            p,
            "-p",
            "Hi",
            "--max-tokens",
            "4",
            "--max-memory",
            "1G",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let j = json_of(&uc(
        &[
            "bench",
            p,
            "--stream-layers",
            "--prompt-len",
            "8",
            "--gen",
            "4",
            "--reps",
            "1",
            "--max-memory",
            "1G",
            "--json",
        ],
        &[],
    ));
    assert_eq!(j["memory"]["max_memory_bytes"], 1u64 << 30);
    assert!(j["memory"]["estimate_peak_bytes"].as_u64().unwrap() > 0);
}

/// The third fallback: a calibrated run whose plan fits neither as held nor with
/// down_proj's input recomputed, but fits with its activations spilled, runs spilled
/// (reported in the JSON) and writes the same pack; a budget below even the spilled
/// plan is refused naming it. 64 windows of 40 tokens make the held activations larger
/// than one spilled chunk on the tiny model.
#[test]
fn a_budget_that_needs_spilling_spills_and_gives_the_same_pack() {
    let m = model_with_tokenizer("llama");
    let out = tempfile::tempdir().unwrap();
    let text = text_file(out.path());
    let run = |pack: &str, extra: &[&str], env: &[(&str, &str)]| {
        let pack = out.path().join(pack);
        let mut args = vec![
            "compress",
            m.path().to_str().unwrap(),
            "-o",
            pack.to_str().unwrap(),
            "--calib",
            text.to_str().unwrap(),
            "--calib-seqs",
            "64",
            "--calib-len",
            "40",
            "--group",
            "32",
            "--bits",
            "4",
            "--json",
        ];
        args.extend_from_slice(extra);
        (uc(&args, env), pack)
    };
    let peak = |o: &std::process::Output| {
        json_of(o)["memory"]["estimate_peak_bytes"]
            .as_u64()
            .unwrap()
    };
    let (held_o, _) = run("held", &[], &[]);
    let (lean, _) = run("lean", &[], &[("UC_TEST_RECOMPUTE_MLP_INPUT", "1")]);
    let (spilled, _) = run("spilled", &["--spill-activations"], &[]);
    let (held, lean, spilled) = (peak(&held_o), peak(&lean), peak(&spilled));
    assert!(spilled < lean && lean <= held, "{spilled} {lean} {held}");

    let budget = ((spilled + lean) / 2).to_string();
    let (o, pack) = run("tight", &["--max-memory", &budget], &[]);
    let j = json_of(&o);
    assert_eq!(j["memory"]["spill_activations"], true, "{}", j["memory"]);
    assert_eq!(j["memory"]["recompute_mlp_input"], true);
    let tried = j["memory"]["plans_tried"].as_array().unwrap();
    assert_eq!(tried.len(), 3, "{tried:?}");
    assert_eq!(tried[2]["estimate_peak_bytes"], spilled);
    assert_eq!(j["fingerprint"], json_of(&held_o)["fingerprint"]);
    assert!(uc(&["verify", pack.to_str().unwrap()], &[])
        .status
        .success());

    let budget = (spilled - 1).to_string();
    let (o, pack) = run("refused", &["--max-memory", &budget], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("does not fit") && e.contains("spilled to disk"),
        "{e}"
    );
    assert!(
        e.contains("activations held") && e.contains("input recomputed"),
        "{e}"
    );
    assert!(!pack.exists());
}
