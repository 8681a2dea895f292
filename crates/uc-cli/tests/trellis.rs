//! `uc compress --codes trellis` (the default of the calibrated encoder): trellis-coded
//! packs end to end on a tiny model. The pack must verify, its bytes must not depend on
//! the thread count, the engine (which expands the codes at load) must agree with the
//! dense export and between resident and streamed layers, and at equal stored bits the
//! trellis must leave less block error than scalar codes.

mod common;
use common::*;
use std::path::Path;

fn compress(
    src: &Path,
    text: &Path,
    out: &Path,
    extra: &[&str],
    threads: &str,
) -> serde_json::Value {
    let mut args = extra.to_vec();
    args.push("--json");
    json_of(&compress_small(
        src,
        out,
        text,
        ("6", "40"),
        &args,
        &[("RAYON_NUM_THREADS", threads)],
    ))
}

/// Sum over blocks of the compressor's block output error.
fn block_error(c: &serde_json::Value) -> f64 {
    c["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["out_rel_mse"].as_f64().unwrap())
        .sum()
}

#[test]
fn trellis_packs_verify_match_export_and_streaming_and_beat_scalar_codes() {
    let m = model_with_tokenizer("llama");
    let text = text_file(m.path());
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let ca = compress(m.path(), &text, &a, &["--bits", "4"], "1");
    compress(m.path(), &text, &b, &["--bits", "4"], "2");
    let manifest = |p: &Path| std::fs::read(p.join("manifest.json")).unwrap();
    assert_eq!(manifest(&a), manifest(&b), "1 vs 2 threads");
    let man = String::from_utf8(manifest(&a)).unwrap();
    assert!(
        man.contains("\"t4g32h64-e8\""),
        "default codes are trellis codes"
    );

    let v = uc(&["verify", a.to_str().unwrap()], &[]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));

    let hf = d.path().join("hf");
    json_of(&uc(
        &[
            "export",
            a.to_str().unwrap(),
            "--to",
            "safetensors",
            hf.to_str().unwrap(),
            "--dtype",
            "f32",
            "--json",
        ],
        &[],
    ));
    let (want, got) = (logits(&hf), logits(&a));
    let diff = want
        .iter()
        .zip(&got)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff <= 1e-3, "pack vs its export: {diff}");
    assert_eq!(run_text(&a, &[]), run_text(&a, &["--stream-layers"]));

    // Scalar codes at the same stored bits: same bpw, more block error.
    let s = d.path().join("scalar");
    let cs = compress(
        m.path(),
        &text,
        &s,
        &["--bits", "4", "--codes", "scalar"],
        "2",
    );
    assert!(String::from_utf8(manifest(&s))
        .unwrap()
        .contains("\"q4g32h64-e8\""));
    let (bt, bs) = (
        ca["bpw_body"].as_f64().unwrap(),
        cs["bpw_body"].as_f64().unwrap(),
    );
    // Only the codebooks differ: 16 more f32 entries per tensor, 0.12 bpw on these tiny
    // tensors (~0.002 on SmolLM2-135M's).
    assert!(bt > bs && bt - bs < 0.15, "bpw trellis {bt} scalar {bs}");
    let (et, es) = (block_error(&ca), block_error(&cs));
    assert!(et < 0.95 * es, "block error trellis {et} vs scalar {es}");
}

#[test]
fn bad_trellis_requests_are_refused_before_writing() {
    let m = model_with_tokenizer("llama");
    let text = text_file(m.path());
    let d = tempfile::tempdir().unwrap();
    for (extra, says) in [
        (&["--bits", "8", "--codes", "trellis"][..], "2 to 7 bits"),
        (
            &["--embed-codec", "t5g32"][..],
            "trellis codecs are for block linears",
        ),
    ] {
        let out = d.path().join("p");
        let mut args = vec![
            "compress",
            m.path().to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--calib",
            text.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = uc(&args, &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?} accepted");
        assert!(err.contains(says), "{extra:?}: {err}");
        assert!(!out.exists(), "{extra:?}: pack directory written");
    }
}
