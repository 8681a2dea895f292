//! Bad checkpoints give typed errors naming the file or tensor, never a panic: opened
//! by the runtime's loader ([`CheckpointLoader`], the engine's dense weight source) and
//! loaded into a [`Decoder`].

use std::path::Path;
use std::sync::Arc;
use uc_model::ModelError;
use uc_runtime::weights::CheckpointLoader;
use uc_runtime::{Decoder, DecoderOptions, Logits, RuntimeError, WeightLoader};

fn copy_fixture(name: &str) -> tempfile::TempDir {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../uc-model/tests/fixtures")
        .join(name);
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    dir
}

/// The loader's error, which must come from checkpoint intake (uc-model).
fn open_err(dir: &Path) -> ModelError {
    match CheckpointLoader::open(dir).err().unwrap() {
        RuntimeError::Model(e) => e,
        e => panic!("not a checkpoint error: {e}"),
    }
}

/// A resident decoder over the checkpoint in `dir` (every block loaded and checked).
fn load(dir: &Path) -> Result<Decoder, RuntimeError> {
    let loader: Arc<dyn WeightLoader> = Arc::new(CheckpointLoader::open(dir)?);
    Decoder::new(
        loader,
        DecoderOptions {
            capacity: 16,
            stream_layers: false,
        },
    )
}

#[test]
fn missing_config_is_named() {
    let d = copy_fixture("llama");
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    let e = open_err(d.path());
    assert!(matches!(e, ModelError::MissingFile { .. }), "{e}");
    assert!(e.to_string().contains("config.json"));
}

#[test]
fn missing_weights_file_is_named() {
    let d = copy_fixture("llama");
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    let e = open_err(d.path());
    assert!(matches!(e, ModelError::MissingFile { .. }), "{e}");
}

#[test]
fn missing_shard_is_named() {
    let d = copy_fixture("llama_bf16_sharded");
    let shard = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("model-00002-of-"))
        .unwrap();
    std::fs::remove_file(&shard).unwrap();
    let e = open_err(d.path());
    assert!(
        e.to_string()
            .contains(&*shard.file_name().unwrap().to_string_lossy()),
        "{e}"
    );
}

#[test]
fn truncated_safetensors_is_rejected() {
    let d = copy_fixture("llama");
    let p = d.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 7]).unwrap();
    let e = open_err(d.path());
    assert!(matches!(e, ModelError::BadSafetensors { .. }), "{e}");
}

#[test]
fn garbage_header_is_rejected() {
    let d = copy_fixture("llama");
    let p = d.path().join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[0..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    assert!(matches!(
        open_err(d.path()),
        ModelError::BadSafetensors { .. }
    ));
}

#[test]
fn malformed_config_is_rejected() {
    let d = copy_fixture("llama");
    std::fs::write(d.path().join("config.json"), "{\"model_type\": \"llama\", ").unwrap();
    assert!(matches!(open_err(d.path()), ModelError::BadConfig { .. }));
}

#[test]
fn wrong_shape_names_the_tensor() {
    let d = copy_fixture("llama");
    let p = d.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    cfg["intermediate_size"] = serde_json::json!(100);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = load(d.path()).err().unwrap();
    assert!(
        matches!(e, RuntimeError::Model(ModelError::ShapeMismatch { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("mlp.gate_proj.weight"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let d = copy_fixture("llama");
    let p = d.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    cfg["num_hidden_layers"] = serde_json::json!(3);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = load(d.path()).err().unwrap();
    assert!(e.to_string().contains("model.layers.2."), "{e}");
}

#[test]
fn out_of_vocabulary_token_is_an_error() {
    let d = copy_fixture("llama");
    let mut dec = load(d.path()).unwrap();
    let e = dec.forward(&[1, 2, 100_000], Logits::All).err().unwrap();
    assert!(
        matches!(e, RuntimeError::TokenOutOfRange { id: 100_000, .. }),
        "{e}"
    );
}
