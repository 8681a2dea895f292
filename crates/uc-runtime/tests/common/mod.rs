//! Helpers shared by the runtime's integration tests: the committed fixtures and a pack
//! written from one of them.

use std::path::{Path, PathBuf};
use uc_codec::pack::{write_dense_tensor, write_quant_tensor};
use uc_codec::{encode_rtn, CodecSpec, Overlay};
use uc_format::{
    block_container, ContainerBuilder, DenseDtype, PackWriter, Role, SourceInfo, GLOBALS_CONTAINER,
};
use uc_model::checkpoint::Checkpoint;
use uc_model::source::WeightSource;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../uc-model/tests/fixtures")
        .join(name)
}

/// A deterministic small overlay for tensor number `k`.
fn overlay(rows: usize, cols: usize, rank: usize, k: usize) -> Overlay {
    let v =
        |i: usize| half::bf16::from_f32((((i * 7 + k * 13) % 17) as f32 - 8.0) * 0.002).to_bits();
    Overlay {
        rank,
        a: (0..rows * rank).map(v).collect(),
        b: (0..rank * cols).map(|i| v(i + 5)).collect(),
    }
}

/// Writes fixture `name` as a pack: block linears as q5g64 (every third with a rank-2
/// overlay), the embedding as q8g32, everything else dense f32.
pub fn write_pack(name: &str, out: &Path) {
    write_pack_from(&fixture(name), out, true);
}

/// Writes the checkpoint at `src` as a pack, as [`write_pack`] does, with or without
/// the overlays.
pub fn write_pack_from(src: &Path, out: &Path, overlays: bool) {
    let ck = Checkpoint::open(src).unwrap();
    let cfg = ck.config().clone();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    let mut w = PackWriter::create(
        out,
        SourceInfo {
            architecture: "llama".into(),
            config,
            files: vec![],
        },
    )
    .unwrap();
    w.copy_file("config.json", &src.join("config.json"))
        .unwrap();
    let names: Vec<String> = ck.tensors().keys().cloned().collect();
    let mut k = 0;
    let mut put = |c: &mut ContainerBuilder, n: &str| {
        let (v, shape) = ck.tensor_f32(n).unwrap();
        let linear = n.contains("_proj.weight");
        if (linear || n == "model.embed_tokens.weight") && shape.len() == 2 {
            let (rows, cols) = (shape[0], shape[1]);
            let mut spec = if linear {
                CodecSpec::new(5, 64)
            } else {
                CodecSpec::new(8, 32)
            };
            let mut qt = encode_rtn(&v, rows, cols, &spec, None).unwrap();
            if overlays && linear && k % 3 == 0 {
                spec.rank = 2;
                qt.spec = spec;
                qt.overlay = Some(overlay(rows, cols, 2, k));
            }
            k += 1;
            let role = if linear { Role::Body } else { Role::Embed };
            write_quant_tensor(c, n, role, &qt, None).unwrap();
        } else {
            write_dense_tensor(c, n, Role::Norm, &v, &shape, DenseDtype::F32, None).unwrap();
        }
    };
    for l in 0..cfg.num_layers {
        let mut c = ContainerBuilder::new(&block_container(l)).unwrap();
        let prefix = format!("model.layers.{l}.");
        names
            .iter()
            .filter(|n| n.starts_with(&prefix))
            .for_each(|n| put(&mut c, n));
        w.write_container(c).unwrap();
    }
    let mut g = ContainerBuilder::new(GLOBALS_CONTAINER).unwrap();
    names
        .iter()
        .filter(|n| !n.starts_with("model.layers."))
        .for_each(|n| put(&mut g, n));
    w.write_container(g).unwrap();
    w.finish().unwrap();
}
