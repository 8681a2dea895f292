//! `uc run` and `uc bench` end to end on a tiny model (a golden fixture with a
//! character-level tokenizer), from the checkpoint and from a pack made of it.

mod common;
use common::*;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

fn run(model: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "run",
        model.to_str().unwrap(),
        "-p",
        "The quick brown fox",
        "--max-tokens",
        "24",
    ];
    args.extend_from_slice(extra);
    uc(&args, &[])
}

#[test]
fn greedy_run_prints_text_and_is_deterministic_across_thread_counts() {
    let m = model_with_tokenizer("llama");
    let a = ok_stdout(&run(m.path(), &["--threads", "1"]));
    let b = ok_stdout(&run(m.path(), &["--threads", "2"]));
    assert!(
        a.trim_end_matches('\n').chars().count() > 0,
        "no text generated"
    );
    assert_eq!(a, b);
}

#[test]
fn same_seed_gives_the_same_text_and_another_seed_differs() {
    let m = model_with_tokenizer("qwen2");
    let s = |seed: &str| {
        ok_stdout(&run(
            m.path(),
            &["--temperature", "1.0", "--top-p", "0.95", "--seed", seed],
        ))
    };
    assert_eq!(s("7"), s("7"));
    assert_ne!(
        s("7"),
        s("8"),
        "different seeds should sample different text on a random model"
    );
}

#[test]
fn a_pack_runs_and_streamed_layers_print_the_same_text() {
    let m = model_with_tokenizer("llama");
    let tmp = tempfile::tempdir().unwrap();
    let pack = rtn_pack(m.path(), tmp.path());
    let resident = ok_stdout(&run(&pack, &[]));
    let streamed = ok_stdout(&run(&pack, &["--stream-layers"]));
    assert_eq!(resident, streamed);
    let files_only = ok_stdout(&run(&pack, &["--skip-recon-check"]));
    assert_eq!(resident, files_only);
}

#[test]
fn a_corrupted_pack_refuses_to_run_with_the_verify_message_and_exit_1() {
    let m = model_with_tokenizer("llama");
    let tmp = tempfile::tempdir().unwrap();
    let pack = rtn_pack(m.path(), tmp.path());
    let file = pack.join("tensors/block_0000.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    for extra in [&[][..], &["--skip-recon-check"][..]] {
        let out = run(&pack, extra);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("VERIFY: FAIL") && err.contains("block_0000"),
            "{err}"
        );
        assert!(
            out.stdout.is_empty(),
            "nothing may be generated from a corrupt pack"
        );
    }
}

#[test]
fn a_closed_stdout_is_not_a_crash() {
    // Regression guard: `uc run ... | head -c1` must end quietly with exit 0.
    let m = model_with_tokenizer("llama");
    let mut child = Command::new(env!("CARGO_BIN_EXE_uc"))
        .args([
            "run",
            m.path().to_str().unwrap(),
            "-p",
            "abc",
            "--max-tokens",
            "200",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 1];
    let mut out = child.stdout.take().unwrap();
    let _ = out.read(&mut first);
    drop(out);
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{status:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn help_has_an_example_and_usage_errors_exit_2() {
    let out = uc(&["run", "--help"], &[]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("Examples") && help.contains("uc run"),
        "{help}"
    );
    assert_eq!(uc(&["run"], &[]).status.code(), Some(2));
    assert_eq!(uc(&["bench", "--help"], &[]).status.code(), Some(0));
}

#[test]
fn bad_input_is_a_clear_error_with_exit_1() {
    let m = model_with_tokenizer("llama");
    let dir = m.path().to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&["--top-p", "0"], "top-p"),
        (&["--temperature=-1"], "temperature"),
        (&["--max-tokens", "100000"], "context"),
        (&["--threads", "0"], "threads"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["run", dir, "-p", "abc"];
        args.extend_from_slice(extra);
        let out = uc(&args, &[]);
        assert_eq!(out.status.code(), Some(1), "{extra:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(needle) && !err.contains("panicked"),
            "{extra:?}: {err}"
        );
    }
    let out = uc(&["run", "/nonexistent/model", "-p", "x"], &[]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn bench_json_has_one_schema_for_packs_and_checkpoints() {
    let m = model_with_tokenizer("llama");
    let tmp = tempfile::tempdir().unwrap();
    let pack = rtn_pack(m.path(), tmp.path());
    let bench = |dir: &Path, extra: &[&str]| {
        let mut args = vec![
            "bench",
            dir.to_str().unwrap(),
            "--prompt-len",
            "16",
            "--gen",
            "4",
            "--reps",
            "1",
            "--json",
        ];
        args.extend_from_slice(extra);
        json_of(&uc(&args, &[]))
    };
    let (a, b) = (bench(m.path(), &[]), bench(&pack, &[]));
    let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&a), keys(&b));
    assert_eq!(keys(&a["model"]), keys(&b["model"]));
    assert_eq!(a["model"]["kind"], "checkpoint");
    assert_eq!(b["model"]["kind"], "pack");
    for j in [&a, &b] {
        for k in [
            "ttft_ms",
            "prefill_tok_s",
            "decode_tok_s",
            "peak_rss_mib",
            "load_s",
        ] {
            assert!(j[k].as_f64().is_some_and(|v| v > 0.0), "{k}: {}", j[k]);
        }
        assert!(
            j["machine"]["cpu_model"].is_string() && j["machine"]["threads"].as_u64() > Some(0)
        );
    }
    let s = bench(&pack, &["--stream-layers"]);
    assert_eq!(s["stream_layers"], true);
    assert!(
        s["model"]["resident_weights_mib"].as_f64() < b["model"]["resident_weights_mib"].as_f64()
    );
}
