//! Mamba (`MambaForCausalLM`) end to end on its tiny golden fixture: calibrated `uc
//! compress` under a bit budget and RTN, `uc verify`, `uc eval` of the pack against its
//! checkpoint (digits identical on 1 and 2 threads), `uc run` of checkpoint and pack,
//! resident and with `--stream-layers`; the mixer's exact tensors stored f32 and its four
//! linears encoded; `uc inspect` and an f32 safetensors export of a pack; pack bytes the
//! same on 1 and 2 threads; bad input (a missing config
//! field, a missing mixer tensor, a tensor of the wrong shape) refused by name, nothing
//! written.

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// Calibrated compress of `model` into `dir`/pack (`extra` flags added), with
/// `RAYON_NUM_THREADS=threads`.
fn compress(
    model: &Path,
    dir: &Path,
    text: &Path,
    extra: &[&str],
    threads: &str,
) -> (PathBuf, serde_json::Value) {
    let pack = dir.join("pack");
    let mut args = extra.to_vec();
    args.push("--json");
    let out = compress_small(
        model,
        &pack,
        text,
        ("6", "40"),
        &args,
        &[("RAYON_NUM_THREADS", threads)],
    );
    let j = json_of(&out);
    (pack, j)
}

/// The pack's manifest tensors as (name, encoding) where encoding is the dense dtype or
/// the codec name.
fn encodings(pack: &Path) -> Vec<(String, String)> {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pack.join("manifest.json")).unwrap()).unwrap();
    m["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let e = &t["encoding"];
            let enc = e
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| e["name"].as_str().unwrap().to_string());
            (t["name"].as_str().unwrap().to_string(), enc)
        })
        .collect()
}

/// Every mixer linear is codec-encoded, every exact tensor (conv, A_log, D, biases,
/// norms) dense f32, under the hub's names.
fn check_layout(pack: &Path) {
    let enc = encodings(pack);
    let of = |n: &str| {
        enc.iter()
            .find(|(name, _)| name == n)
            .map(|(_, e)| e.clone())
            .unwrap_or_else(|| panic!("{n} not in the pack"))
    };
    for l in 0..2 {
        let p = format!("backbone.layers.{l}");
        for lin in ["in_proj", "x_proj", "dt_proj", "out_proj"] {
            let e = of(&format!("{p}.mixer.{lin}.weight"));
            assert!(!e.starts_with("dense"), "{lin}: {e}");
        }
        for exact in [
            "mixer.conv1d.weight",
            "mixer.conv1d.bias",
            "mixer.A_log",
            "mixer.D",
            "mixer.dt_proj.bias",
            "mixer.in_proj.bias",
            "mixer.out_proj.bias",
            "norm.weight",
        ] {
            assert_eq!(of(&format!("{p}.{exact}")), "dense_f32", "{exact}");
        }
    }
    assert_eq!(of("backbone.norm_f.weight"), "dense_f32");
    assert!(!of("backbone.embeddings.weight").starts_with("dense"));
    // Tied: no head tensor (26 = embedding, final norm, 2 x (4 linears + 8 exact)).
    assert_eq!(enc.len(), 2 + 2 * 12, "{enc:?}");
}

#[test]
fn mamba_compresses_verifies_evaluates_and_runs() {
    let m = model_with_tokenizer("mamba");
    let text = text_file(m.path());
    let tmp = tempfile::tempdir().unwrap();
    let (pack, c) = compress(m.path(), tmp.path(), &text, &["--bpw", "5"], "2");
    assert_eq!(c["blocks"].as_array().unwrap().len(), 2);
    let bpw = c["bpw_body"].as_f64().unwrap();
    assert!(bpw > 4.0 && bpw <= 5.0, "bpw {bpw}");
    for b in c["blocks"].as_array().unwrap() {
        let e = b["out_rel_mse"].as_f64().unwrap();
        assert!(e.is_finite() && e > 0.0 && e < 0.05, "block error {e}");
    }
    check_layout(&pack);
    verify_passes(&pack);
    let e = eval_small(&pack, m.path(), &text, "2");
    let (kld, top1) = (
        e["against"]["kld"].as_f64().unwrap(),
        e["against"]["top1"].as_f64().unwrap(),
    );
    eprintln!("mamba 5.0 bpw pack vs checkpoint: kld {kld} top1 {top1} bpw_body {bpw}");
    assert!(kld > 0.0 && kld < 0.1, "kld {kld}");
    assert!(top1 > 0.8, "top1 {top1}");
    let from_checkpoint = run_text(m.path(), &[]);
    assert!(!from_checkpoint.trim().is_empty(), "no text");
    let resident = run_text(&pack, &[]);
    assert!(!resident.trim().is_empty(), "no text from the pack");
    assert_eq!(resident, run_text(&pack, &["--stream-layers"]));
}

#[test]
fn mamba_rtn_pack_verifies_runs_and_stays_close_to_the_checkpoint() {
    let m = model_with_tokenizer("mamba");
    let tmp = tempfile::tempdir().unwrap();
    let pack = rtn_pack(m.path(), tmp.path());
    check_layout(&pack);
    verify_passes(&pack);
    // The pack's logits move off the checkpoint's, but not far (8-bit embedding, RTN
    // body at the default codec).
    let (a, b) = (logits(m.path()), logits(&pack));
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let scale = a.iter().map(|x| x.abs()).fold(0f32, f32::max);
    assert!(worst > 0.0 && worst < 0.25 * scale, "{worst} of {scale}");
    let resident = run_text(&pack, &[]);
    assert!(!resident.trim().is_empty());
    assert_eq!(resident, run_text(&pack, &["--stream-layers"]));
    // inspect folds backbone.layers.N. like model.layers.N.: one row per kind.
    let table = ok_stdout(&uc(&["inspect", pack.to_str().unwrap()], &[]));
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("mixer.in_proj.weight") && l.contains(" 2 ")),
        "{table}"
    );
    assert!(!table.contains("backbone.layers."), "{table}");
    // An f32 safetensors export under the hub's names gives the pack's logits (every
    // linear sees all 24 tokens in both, through the same GEMM path).
    let out = tmp.path().join("hf");
    ok_stdout(&uc(
        &[
            "export",
            pack.to_str().unwrap(),
            "--to",
            "safetensors",
            out.to_str().unwrap(),
            "--dtype",
            "f32",
        ],
        &[],
    ));
    let d = logits(&out)
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(d <= 1e-4, "export vs pack max |diff| {d}");
}

#[test]
fn mamba_pack_bytes_and_eval_digits_are_identical_for_one_and_two_threads() {
    let m = model_with_tokenizer("mamba");
    let text = text_file(m.path());
    let (t1, t2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (pack, one) = compress(m.path(), t1.path(), &text, &[], "1");
    let (_, two) = compress(m.path(), t2.path(), &text, &[], "2");
    assert_eq!(one["fingerprint"], two["fingerprint"]);
    let one = eval_small(&pack, m.path(), &text, "1");
    let two = eval_small(&pack, m.path(), &text, "2");
    assert_eq!(
        (one["threads"].as_u64(), two["threads"].as_u64()),
        (Some(1), Some(2))
    );
    for key in ["nll", "ppl", "n_pos", "window_nll", "tokens_sha256"] {
        assert_eq!(one[key], two[key], "{key}");
    }
    for key in ["ref_nll", "kld", "top1", "ppl_ratio", "ref_window_nll"] {
        assert_eq!(one["against"][key], two["against"][key], "{key}");
    }
}

#[test]
fn mamba_bad_input_is_refused_by_name() {
    // A config missing a field (hidden_size has no default).
    let m = model_with_tokenizer("mamba");
    set_config(m.path(), "hidden_size", serde_json::Value::Null);
    refused(m.path(), &["config.json", "hidden_size"]);
    // A bad time_step_rank.
    let m = model_with_tokenizer("mamba");
    set_config(m.path(), "time_step_rank", serde_json::json!("wide"));
    refused(m.path(), &["config.json", "time_step_rank"]);
    // A shard missing a mixer tensor, exact or quantized.
    for tensor in [
        "backbone.layers.1.mixer.A_log",
        "backbone.layers.0.mixer.conv1d.weight",
        "backbone.layers.1.mixer.dt_proj.bias",
        "backbone.layers.0.mixer.x_proj.weight",
        "backbone.norm_f.weight",
    ] {
        let m = model_with_tokenizer("mamba");
        drop_tensor(m.path(), tensor);
        refused(m.path(), &[tensor]);
    }
    // Tensors of the wrong shape for the config: state 4 makes x_proj (2 + 8, 64) and
    // A_log (64, 4); conv_kernel 3 makes the conv (64, 1, 3).
    for (key, value, tensor) in [
        ("state_size", 4, "mixer.x_proj.weight"),
        ("conv_kernel", 3, "mixer.conv1d.weight"),
    ] {
        let m = model_with_tokenizer("mamba");
        set_config(m.path(), key, serde_json::json!(value));
        refused(m.path(), &[tensor, "model.safetensors", "shape"]);
    }
}

/// `uc serve` and `uc bench` on a Mamba pack: greedy completions decode with the
/// recurrent state, give `uc run`'s text, and a second request (a reset decoder) the
/// same; bench reports decode throughput.
#[test]
fn mamba_pack_serves_and_benches() {
    let m = model_with_tokenizer("mamba");
    let tmp = tempfile::tempdir().unwrap();
    let pack = rtn_pack(m.path(), tmp.path());
    let want = run_text(&pack, &["--temperature", "0"]);
    let s = serve(&pack, &[]);
    let body = serde_json::json!({
        "model": s.model,
        "prompt": "The quick brown fox",
        "max_tokens": 16,
        "temperature": 0,
    });
    let text = |v: &serde_json::Value| v["choices"][0]["text"].as_str().unwrap().to_string();
    let (status, first) = post(&s, "/v1/completions", &body);
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["usage"]["completion_tokens"], 16);
    assert_eq!(text(&first), want.trim_end_matches('\n'));
    let (_, second) = post(&s, "/v1/completions", &body);
    assert_eq!(text(&second), text(&first));
    drop(s);
    let b = json_of(&uc(&["bench", pack.to_str().unwrap(), "--json"], &[]));
    assert!(b.to_string().contains("decode"), "{b}");
}

/// An overlay rank wider than a tensor is capped at what the tensor allows (as a rotation
/// block is): dt_proj is `time_step_rank` = 2 columns wide, so `--rank 4` gives it rank 2
/// and the other linears rank 4, under a budget and with fixed bits.
#[test]
fn mamba_overlay_rank_is_capped_at_dt_projs_width() {
    let m = model_with_tokenizer("mamba");
    let text = text_file(m.path());
    // (Rank-4 overlays cost 4 * (rows + cols) bf16 values: above 5 bpw at these widths.)
    for extra in [
        &["--rank", "4", "--bpw", "7"][..],
        &["--rank", "4", "--bits", "4"][..],
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let (pack, _) = compress(m.path(), tmp.path(), &text, extra, "2");
        verify_passes(&pack);
        for (name, enc) in encodings(&pack) {
            if name.ends_with("dt_proj.weight") {
                assert!(enc.contains("r2"), "{name}: {enc}");
            } else if name.contains(".mixer.") && name.ends_with("proj.weight") {
                assert!(enc.contains("r4"), "{name}: {enc}");
            }
        }
    }
}
