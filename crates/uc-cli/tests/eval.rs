//! `uc eval` end to end on a tiny model.

mod common;
use common::*;

fn eval_json(model: &str, against: Option<&str>, text: &str, threads: &str) -> serde_json::Value {
    let mut args = vec![
        "eval",
        model,
        "--text",
        text,
        "--seq-len",
        "32",
        "--windows",
        "4",
        "--json",
    ];
    if let Some(r) = against {
        args.extend(["--against", r]);
    }
    json_of(&uc(&args, &[("RAYON_NUM_THREADS", threads)]))
}

#[test]
fn eval_digits_are_identical_for_one_and_two_threads() {
    let m = model_with_tokenizer("llama");
    let r = model_with_tokenizer("mistral");
    let text = text_file(m.path());
    let (m, r, t) = (
        m.path().to_str().unwrap(),
        r.path().to_str().unwrap(),
        text.to_str().unwrap(),
    );
    let one = eval_json(m, Some(r), t, "1");
    let two = eval_json(m, Some(r), t, "2");
    assert_eq!(one["threads"], 1);
    assert_eq!(two["threads"], 2);
    for key in ["nll", "ppl", "n_pos"] {
        assert_eq!(one[key], two[key], "{key}");
    }
    for key in ["ref_nll", "kld", "top1", "ppl_ratio"] {
        assert_eq!(one["against"][key], two["against"][key], "{key}");
    }
    // Different random models really do disagree, so the comparison is not vacuous.
    assert!(one["against"]["kld"].as_f64().unwrap() > 0.0);
}

#[test]
fn a_model_against_itself_has_ratio_one_and_zero_kl() {
    let m = model_with_tokenizer("qwen2");
    let text = text_file(m.path());
    let p = m.path().to_str().unwrap();
    let j = eval_json(p, Some(p), text.to_str().unwrap(), "2");
    assert_eq!(j["against"]["ppl_ratio"], 1.0);
    assert_eq!(j["against"]["kld"], 0.0);
    assert_eq!(j["against"]["top1"], 1.0);
    assert_eq!(j["n_pos"], 4 * 31);
}

#[test]
fn too_short_text_is_a_clear_failure_with_exit_1() {
    let m = model_with_tokenizer("llama");
    let text = text_file(m.path());
    let out = uc(
        &[
            "eval",
            m.path().to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--windows",
            "1000",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tokens"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn usage_errors_exit_2_and_help_exits_0() {
    assert_eq!(uc(&["eval"], &[]).status.code(), Some(2));
    assert_eq!(uc(&["frobnicate"], &[]).status.code(), Some(2));
    let help = uc(&["eval", "--help"], &[]);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("Examples"));
}

#[test]
fn missing_model_directory_is_named() {
    let d = tempfile::tempdir().unwrap();
    let text = text_file(d.path());
    let out = uc(
        &[
            "eval",
            "/nonexistent/model",
            "--text",
            text.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/model"));
}
