//! Helpers shared by the CLI integration tests: a tiny real model (a golden fixture
//! of uc-model) with a character-level tokenizer, and a runner for the `uc` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The uc-model fixture `name`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../uc-model/tests/fixtures")
        .join(name)
}

/// A copy of fixture `name` plus a character-level tokenizer.json (ids < 128).
pub fn model_with_tokenizer(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "io.safetensors" {
            std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
        }
    }
    let mut vocab = serde_json::Map::new();
    vocab.insert("<unk>".into(), 0.into());
    for (i, c) in (b' '..=b'~').chain([b'\n']).enumerate() {
        vocab.insert((c as char).to_string(), (i + 1).into());
    }
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.path().join("tokenizer.json"), tok.to_string()).unwrap();
    dir
}

/// A text file of a few hundred characters.
pub fn text_file(dir: &Path) -> PathBuf {
    let p = dir.join("text.txt");
    let s = "The quick brown fox jumps over the lazy dog 0123456789 times.\n".repeat(12);
    std::fs::write(&p, s).unwrap();
    p
}

/// Runs `uc ARGS` with extra environment variables.
pub fn uc(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uc"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// Stdout as JSON, with the stderr shown on failure.
pub fn json_of(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "uc failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// An RTN pack (no calibration needed) of the checkpoint `model`, written to `dir`/pack.
pub fn rtn_pack(model: &Path, dir: &Path) -> PathBuf {
    let pack = dir.join("pack");
    let (m, p) = (model.to_str().unwrap(), pack.to_str().unwrap());
    let out = uc(&["compress", m, "-o", p, "--method", "rtn"], &[]);
    assert!(
        out.status.success(),
        "compress: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    pack
}

/// Every position's logits of a fixed 24-token input.
pub fn logits(model: &Path) -> Vec<f32> {
    let loader = uc_runtime::weights::open(model, uc_runtime::Verify::Full).unwrap();
    let vocab = loader.config().vocab_size as u32;
    let ids: Vec<u32> = (0..24u32).map(|i| (i * 37 + 5) % vocab).collect();
    let mut dec = uc_runtime::Decoder::new(
        loader,
        uc_runtime::DecoderOptions {
            capacity: 32,
            stream_layers: false,
        },
    )
    .unwrap();
    dec.forward(&ids, uc_runtime::Logits::All).unwrap()
}
