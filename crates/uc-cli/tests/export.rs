//! `uc export` end to end on tiny fixture models: the exported safetensors checkpoint
//! and the exported GGUF (read back through uc's own GGUF importer) give the pack's
//! logits, through uc's dense loader.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A pack of fixture `name` (rtn) in `dir`/pack.
fn pack_of(name: &str, dir: &Path) -> PathBuf {
    let m = model_with_tokenizer(name);
    rtn_pack(m.path(), dir)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn export(pack: &Path, to: &str, out: &Path, dtype: &str) -> Value {
    json_of(&uc(
        &[
            "export",
            pack.to_str().unwrap(),
            "--to",
            to,
            out.to_str().unwrap(),
            "--dtype",
            dtype,
            "--json",
        ],
        &[],
    ))
}

/// Tolerances on logits (fixture logits are O(1..10)). f32 is the 1e-3 bound
/// (measured: 0, the export is the pack's reconstruction exactly). The half-precision
/// ones are the rounding of every weight to 11 (f16) or 8 (bf16) significant bits,
/// which the 1e-3 bound does not allow for: measured on these fixtures at up to
/// 3.5e-3 (f16; qwen3 through GGUF 1.7e-2) and 3.1e-2 (bf16), bounded here with ~3x
/// headroom.
const TOL_F32: f32 = 1e-3;
const TOL_F16: f32 = 5e-2;
const TOL_BF16: f32 = 1e-1;

#[test]
fn safetensors_export_gives_the_packs_logits() {
    for fixture in ["llama", "qwen2"] {
        let d = tempfile::tempdir().unwrap();
        let pack = pack_of(fixture, d.path());
        let want = logits(&pack);
        for (dtype, tol) in [("f32", TOL_F32), ("f16", TOL_F16), ("bf16", TOL_BF16)] {
            let out = d.path().join(format!("hf-{dtype}"));
            let r = export(&pack, "safetensors", &out, dtype);
            assert_eq!(r["format"], "safetensors");
            let manifest: Value =
                serde_json::from_slice(&std::fs::read(pack.join("manifest.json")).unwrap())
                    .unwrap();
            assert_eq!(r["pack_fingerprint"], manifest["fingerprint"]);
            for f in ["config.json", "tokenizer.json", "model.safetensors"] {
                assert!(out.join(f).is_file(), "{fixture} {dtype}: {f} missing");
            }
            let cfg: Value =
                serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
            let torch = match dtype {
                "f32" => "float32",
                "f16" => "float16",
                _ => "bfloat16",
            };
            assert_eq!(cfg["torch_dtype"], torch);
            let diff = max_diff(&want, &logits(&out));
            eprintln!("{fixture} safetensors {dtype}: max |logit diff| {diff:.3e}");
            assert!(diff <= tol, "{fixture} {dtype}: {diff} > {tol}");
            if dtype == "f32" {
                assert_eq!(r["max_rounding_error"], 0.0);
            } else {
                assert!(r["max_rounding_error"].as_f64().unwrap() > 0.0);
            }
        }
    }
}

#[test]
fn gguf_export_round_trips_through_the_gguf_importer() {
    for fixture in ["llama", "qwen2", "qwen3"] {
        let d = tempfile::tempdir().unwrap();
        let pack = pack_of(fixture, d.path());
        let want = logits(&pack);
        for (dtype, tol) in [("f32", TOL_F32), ("f16", TOL_F16)] {
            let file = d.path().join(format!("m-{dtype}.gguf"));
            let r = export(&pack, "gguf", &file, dtype);
            assert_eq!(r["format"], "gguf");
            let back = d.path().join(format!("imported-{dtype}"));
            let imp = uc(
                &[
                    "import",
                    "gguf",
                    file.to_str().unwrap(),
                    "-o",
                    back.to_str().unwrap(),
                ],
                &[],
            );
            assert!(
                imp.status.success(),
                "{fixture} {dtype} import: {}",
                String::from_utf8_lossy(&imp.stderr)
            );
            let diff = max_diff(&want, &logits(&back));
            eprintln!("{fixture} gguf {dtype}: max |logit diff| {diff:.3e}");
            assert!(diff <= tol, "{fixture} gguf {dtype}: {diff} > {tol}");
            // The vocabulary survives: the importer rebuilt a tokenizer that knows the
            // fixture's tokens at the same ids.
            let tok = |p: &Path| -> Value {
                serde_json::from_slice(&std::fs::read(p.join("tokenizer.json")).unwrap()).unwrap()
            };
            let (a, b) = (tok(&pack), tok(&back));
            for (t, id) in a["model"]["vocab"].as_object().unwrap() {
                assert_eq!(&b["model"]["vocab"][t], id, "{fixture}: token {t:?}");
            }
        }
    }
}

#[test]
fn export_refuses_a_corrupted_pack_an_existing_destination_and_bf16_gguf() {
    let d = tempfile::tempdir().unwrap();
    let pack = pack_of("llama", d.path());
    let existing = d.path().join("exists");
    std::fs::create_dir(&existing).unwrap();
    let out = uc(
        &[
            "export",
            pack.to_str().unwrap(),
            "--to",
            "safetensors",
            existing.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let out = uc(
        &[
            "export",
            pack.to_str().unwrap(),
            "--to",
            "gguf",
            d.path().join("x.gguf").to_str().unwrap(),
            "--dtype",
            "bf16",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));

    let cfg = pack.join("config.json");
    let mut bytes = std::fs::read(&cfg).unwrap();
    bytes.push(b' ');
    std::fs::write(&cfg, bytes).unwrap();
    let dest = d.path().join("hf");
    let out = uc(
        &[
            "export",
            pack.to_str().unwrap(),
            "--to",
            "safetensors",
            dest.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("VERIFY: FAIL"));
    assert!(!dest.exists(), "nothing written for a failing pack");
}
