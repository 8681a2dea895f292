//! `uc compress --rotate`: rotated codecs end to end on a tiny model. The runtime rotates
//! activations (`W_r (R x)`); export un-rotates weights (`W_r R`); both must give the
//! same logits, the pack must verify, and the bytes must not depend on the thread count.

mod common;
use common::*;
use std::path::Path;
use uc_runtime::{weights, Decoder, DecoderOptions, Logits, Verify};

/// Every position's logits of a fixed 24-token input.
fn logits(model: &Path) -> Vec<f32> {
    let loader = weights::open(model, Verify::Full).unwrap();
    let vocab = loader.config().vocab_size as u32;
    let ids: Vec<u32> = (0..24u32).map(|i| (i * 37 + 5) % vocab).collect();
    let mut dec = Decoder::new(
        loader,
        DecoderOptions {
            capacity: 32,
            stream_layers: false,
        },
    )
    .unwrap();
    dec.forward(&ids, Logits::All).unwrap()
}

fn compress(
    src: &Path,
    text: &Path,
    out: &Path,
    extra: &[&str],
    threads: &str,
) -> std::process::Output {
    let mut args = vec![
        "compress",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--calib",
        text.to_str().unwrap(),
        "--calib-seqs",
        "6",
        "--calib-len",
        "40",
        "--group",
        "32",
        "--bits",
        "4",
    ];
    args.extend(extra);
    uc(&args, &[("RAYON_NUM_THREADS", threads)])
}

#[test]
fn rotated_packs_verify_match_their_export_and_are_thread_independent() {
    let m = model_with_tokenizer("llama");
    let text = text_file(m.path());
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    json_of(&compress(
        m.path(),
        &text,
        &a,
        &["--rotate", "64", "--json"],
        "1",
    ));
    json_of(&compress(
        m.path(),
        &text,
        &b,
        &["--rotate", "64", "--json"],
        "2",
    ));
    let manifest = |p: &Path| std::fs::read(p.join("manifest.json")).unwrap();
    assert_eq!(manifest(&a), manifest(&b), "1 vs 2 threads");

    // Hidden 64 gets 64-blocks, the MLP's 96-wide input the largest power of 4 dividing it.
    let man: serde_json::Value = serde_json::from_slice(&manifest(&a)).unwrap();
    let codecs: std::collections::BTreeSet<String> = man["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["role"] == "body")
        .map(|t| t["encoding"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        codecs.into_iter().collect::<Vec<_>>(),
        ["q4g32h16-e8", "q4g32h64-e8"],
        "rotation blocks per input width"
    );

    let v = uc(&["verify", a.to_str().unwrap()], &[]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));

    // The engine (rotating activations) against the exported dense weights (un-rotated).
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

    // The rotation is not the identity: an unrotated pack of the same settings differs.
    let plain = d.path().join("plain");
    json_of(&compress(m.path(), &text, &plain, &["--json"], "2"));
    assert_ne!(logits(&plain), got);
}

#[test]
fn bad_rotation_requests_are_refused_before_writing() {
    let m = model_with_tokenizer("llama");
    let text = text_file(m.path());
    let d = tempfile::tempdir().unwrap();
    for (extra, says) in [
        (&["--rotate", "32"][..], "--rotate 32"),
        (&["--rotate", "64", "--rank", "2"][..], "--rank"),
    ] {
        let out = d.path().join("p");
        let o = compress(m.path(), &text, &out, extra, "2");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?} accepted");
        assert!(err.contains(says), "{extra:?}: {err}");
        assert!(!out.exists(), "{extra:?}: pack directory written");
    }
}
