//! Packs of quantized tensors: round trips for every codec, deterministic writing,
//! whole-pack verification and tampering detection.

mod common;

use std::path::Path;

use common::*;
use serde_json::{json, Value};
use uc_codec::pack::*;
use uc_codec::*;
use uc_format::*;

const ROWS: usize = 12;
const COLS: usize = 200;

fn body_name(spec: &CodecSpec) -> String {
    format!("model.layers.0.{}.weight", spec.name())
}

/// Every codec of the table, plus an overlay, a bf16-scale and an e8-scale codec, and
/// trellis codecs (one with a rotation, one with an overlay).
fn all_specs() -> Vec<CodecSpec> {
    let mut v = CODECS.to_vec();
    v.push(CodecSpec::parse("q4g64r3").unwrap());
    v.push(CodecSpec::parse("q5g128r2-bf16").unwrap());
    v.push(CodecSpec::parse("q5g64-e8").unwrap());
    v.push(CodecSpec::parse("t5g64-e8").unwrap());
    v.push(CodecSpec::parse("t2g32").unwrap());
    v.push(CodecSpec::parse("t7g32-e8").unwrap());
    v.push(CodecSpec::parse("t3g64r2").unwrap());
    v
}

/// Encodes one tensor per codec (overlay codecs get random A/B on top of the RTN base).
fn tensors() -> Vec<(CodecSpec, QuantTensor)> {
    let mut rng = Prng(42);
    let w = gaussian(&mut rng, ROWS * COLS, 0.02);
    all_specs()
        .into_iter()
        .map(|spec| {
            let base = CodecSpec { rank: 0, ..spec };
            let mut qt = encode_rtn(&w, ROWS, COLS, &base, None).unwrap();
            if spec.rank > 0 {
                let ov = plain_qt(&mut rng, ROWS, COLS, spec).overlay;
                qt = QuantTensor {
                    spec,
                    overlay: ov,
                    ..qt
                };
            }
            (spec, qt)
        })
        .collect()
}

fn write_pack(dir: &Path) {
    let mut w = PackWriter::create(dir, source()).unwrap();
    w.write_file("config.json", b"{}\n").unwrap();
    w.write_file("tokenizer.json", b"{\"model\": {}}\n")
        .unwrap();
    let mut g = ContainerBuilder::new(GLOBALS_CONTAINER).unwrap();
    let emb: Vec<f32> = (0..64).map(|i| i as f32 * 0.25 - 3.0).collect();
    write_dense_tensor(
        &mut g,
        "model.embed_tokens.weight",
        Role::Embed,
        &emb,
        &[8, 8],
        DenseDtype::F32,
        None,
    )
    .unwrap();
    write_dense_tensor(
        &mut g,
        "model.norm.weight",
        Role::Norm,
        &emb[..8],
        &[8],
        DenseDtype::Bf16,
        None,
    )
    .unwrap();
    write_dense_tensor(
        &mut g,
        "lm_head.bias",
        Role::Other,
        &emb[..8],
        &[8],
        DenseDtype::F16,
        None,
    )
    .unwrap();
    w.write_container(g).unwrap();
    let mut b = ContainerBuilder::new(&block_container(0)).unwrap();
    for (spec, qt) in tensors() {
        let stats = serde_json::from_value(json!({"rel_err": 0.01})).unwrap();
        write_quant_tensor(&mut b, &body_name(&spec), Role::Body, &qt, Some(stats)).unwrap();
    }
    w.write_container(b).unwrap();
    w.finish().unwrap();
}

fn packed() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    write_pack(d.path());
    d
}

fn subjects(dir: &Path) -> Vec<String> {
    let r = verify_dir(dir, 2);
    assert_eq!(r.pass, r.failures.is_empty());
    r.failures.into_iter().map(|f| f.subject).collect()
}

fn edit_manifest(dir: &Path, f: impl FnOnce(&mut Value)) {
    let p = dir.join(MANIFEST_FILE);
    let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// Index in manifest.tensors of tensor `name`.
fn tensor_index(dir: &Path, name: &str) -> usize {
    Pack::open(dir)
        .unwrap()
        .manifest()
        .tensors
        .iter()
        .position(|t| t.name == name)
        .unwrap()
}

#[test]
fn every_codec_round_trips_through_a_pack() {
    let d = packed();
    let pack = Pack::open(d.path()).unwrap();
    for (spec, qt) in tensors() {
        let name = body_name(&spec);
        let want = bits_of(&reconstruct_scalar(&qt).unwrap());
        assert_eq!(read_quant_tensor(&pack, &name).unwrap(), qt, "{name}");
        for k in Kernel::available() {
            assert_eq!(
                bits_of(&reconstruct_tensor(&pack, &name, k).unwrap()),
                want,
                "{name} {}",
                k.name()
            );
        }
        let rec = pack.tensor(&name).unwrap();
        assert_eq!(rec.stored_bytes, spec.stored_bytes(ROWS, COLS).unwrap());
    }
    let emb = reconstruct_tensor(&pack, "model.embed_tokens.weight", Kernel::Scalar).unwrap();
    assert_eq!(emb[5], 5.0 * 0.25 - 3.0);
    let norm = reconstruct_tensor(&pack, "model.norm.weight", Kernel::Scalar).unwrap();
    assert_eq!(norm, emb[..8], "these values are exact in bf16");
    let m = pack.manifest();
    let body: Vec<_> = m.tensors.iter().filter(|t| t.role == Role::Body).collect();
    let bytes: u64 = body.iter().map(|t| t.stored_bytes).sum();
    assert_eq!(
        m.bpw_body,
        bytes as f64 * 8.0 / (body.len() * ROWS * COLS) as f64
    );
    let r = verify_pack(&pack, 2);
    assert!(r.pass, "{:?}", r.failures);
    assert_eq!(r.tensors.len(), all_specs().len() + 3);
}

#[test]
fn pack_writer_is_deterministic() {
    let (a, b) = (packed(), packed());
    for f in &Pack::open(a.path()).unwrap().manifest().files {
        assert_eq!(
            std::fs::read(a.path().join(&f.path)).unwrap(),
            std::fs::read(b.path().join(&f.path)).unwrap(),
            "{}",
            f.path
        );
    }
    assert_eq!(
        std::fs::read(a.path().join(MANIFEST_FILE)).unwrap(),
        std::fs::read(b.path().join(MANIFEST_FILE)).unwrap()
    );
}

#[test]
fn verify_report_is_the_same_for_one_and_two_threads_and_serializes() {
    let d = packed();
    let pack = Pack::open(d.path()).unwrap();
    let (one, two) = (verify_pack(&pack, 1), verify_pack(&pack, 2));
    assert_eq!(
        (one.pass, &one.files, &one.tensors),
        (two.pass, &two.files, &two.tensors)
    );
    assert_eq!((one.host.threads, two.host.threads), (1, 2));
    let v: Value = serde_json::to_value(&one).unwrap();
    assert_eq!(v["tool"]["name"], "uc");
    assert_eq!(v["host"]["os"], std::env::consts::OS);
    assert!(v["bytes_hashed"].as_u64().unwrap() > 0);
}

#[test]
fn flipped_byte_in_any_file_fails_naming_it() {
    let d = packed();
    let files = Pack::open(d.path()).unwrap().manifest().files.clone();
    for f in files {
        let p = d.path().join(&f.path);
        let orig = std::fs::read(&p).unwrap();
        let mut bad = orig.clone();
        *bad.last_mut().unwrap() ^= 0x10; // inside the data of the last entry
        std::fs::write(&p, &bad).unwrap();
        let s = subjects(d.path());
        assert!(s.contains(&f.path), "{}: {s:?}", f.path);
        std::fs::write(&p, &orig).unwrap();
    }
    assert!(subjects(d.path()).is_empty());
}

#[test]
fn flipped_code_byte_fails_naming_file_and_tensor() {
    let d = packed();
    let pack = Pack::open(d.path()).unwrap();
    let name = body_name(&CodecSpec::parse("q5g128").unwrap());
    let c = pack.container("tensors/block_0000.safetensors").unwrap();
    let codes = c.entry(&format!("{name}.codes")).unwrap().data;
    let bytes = std::fs::read(c.path()).unwrap();
    let off = find(&bytes, codes);
    drop(c);
    drop(pack);
    let mut bad = bytes.clone();
    bad[off + 3] ^= 0x01;
    std::fs::write(d.path().join("tensors/block_0000.safetensors"), &bad).unwrap();
    let s = subjects(d.path());
    assert_eq!(s, vec!["tensors/block_0000.safetensors".to_string(), name]);
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).unwrap()
}

#[test]
fn truncated_removed_and_extra_files_fail_naming_them() {
    let d = packed();
    let blk = d.path().join("tensors/block_0000.safetensors");
    let orig = std::fs::read(&blk).unwrap();
    std::fs::write(&blk, &orig[..orig.len() - 7]).unwrap();
    let s = subjects(d.path());
    assert!(
        s.contains(&"tensors/block_0000.safetensors".to_string()),
        "{s:?}"
    );
    assert!(
        s.iter().filter(|x| x.starts_with("model.layers.0")).count() == all_specs().len(),
        "every tensor in it fails: {s:?}"
    );
    std::fs::remove_file(&blk).unwrap();
    assert!(subjects(d.path()).contains(&"tensors/block_0000.safetensors".to_string()));
    std::fs::write(&blk, &orig).unwrap();
    std::fs::write(d.path().join("tensors/block_0001.safetensors"), b"").unwrap();
    assert_eq!(subjects(d.path()), vec!["tensors/block_0001.safetensors"]);
}

#[test]
fn edited_tensor_fields_fail_naming_the_tensor() {
    let name = body_name(&CodecSpec::parse("q5g128").unwrap());
    type Edit = Box<dyn Fn(&mut Value)>;
    let edits: Vec<(&str, Edit)> = vec![
        ("shape", Box::new(|t| t["shape"] = json!([ROWS, COLS + 1]))),
        (
            "codec bits",
            Box::new(|t| {
                t["encoding"]["bits"] = json!(4);
                t["encoding"]["name"] = json!("q4g128");
            }),
        ),
        (
            "codec name only",
            Box::new(|t| t["encoding"]["name"] = json!("q4g128")),
        ),
        (
            "group",
            Box::new(|t| {
                t["encoding"]["group"] = json!(64);
                t["encoding"]["name"] = json!("q5g64");
            }),
        ),
        (
            "scale dtype",
            Box::new(|t| {
                t["encoding"]["scale_dtype"] = json!("bf16");
                t["encoding"]["name"] = json!("q5g128-bf16");
            }),
        ),
        ("dense", Box::new(|t| t["encoding"] = json!("dense_f32"))),
        (
            "recon hash",
            Box::new(|t| t["recon_sha256"] = json!("00".repeat(32))),
        ),
        (
            "encoded hash",
            Box::new(|t| t["encoded_sha256"] = json!("00".repeat(32))),
        ),
    ];
    for (what, edit) in edits {
        let d = packed();
        let i = tensor_index(d.path(), &name);
        edit_manifest(d.path(), |v| edit(&mut v["tensors"][i]));
        let s = subjects(d.path());
        assert!(s.contains(&name), "{what}: {s:?}");
        // A shape edit also changes the bits-per-weight totals, reported on manifest.json.
        assert!(
            s.iter().all(|x| x == &name || x == MANIFEST_FILE),
            "{what}: {s:?}"
        );
    }
}

#[test]
fn edited_stored_bytes_fails_naming_tensor_and_manifest() {
    let d = packed();
    let name = body_name(&CodecSpec::parse("q3g32").unwrap());
    let i = tensor_index(d.path(), &name);
    edit_manifest(d.path(), |v| v["tensors"][i]["stored_bytes"] = json!(1));
    // Twice on the manifest: its fingerprint and its bits-per-weight totals.
    assert_eq!(
        subjects(d.path()),
        vec![
            "manifest.json".to_string(),
            "manifest.json".to_string(),
            name
        ]
    );
}

#[test]
fn edited_file_hash_or_version_fails() {
    let d = packed();
    edit_manifest(d.path(), |v| {
        v["files"][0]["sha256"] = json!("ab".repeat(32))
    });
    assert_eq!(subjects(d.path()), vec!["manifest.json", "config.json"]);
    let d = packed();
    edit_manifest(d.path(), |v| v["format_version"] = json!(7));
    let r = verify_dir(d.path(), 1);
    assert!(
        !r.pass && r.failures[0].problem.contains("format_version 7"),
        "{:?}",
        r.failures
    );
}

#[test]
fn unclaimed_container_entries_fail() {
    let d = tempfile::tempdir().unwrap();
    let mut w = PackWriter::create(d.path(), source()).unwrap();
    let mut c = ContainerBuilder::new(GLOBALS_CONTAINER).unwrap();
    let rec =
        write_dense_tensor(&mut c, "a", Role::Norm, &[1.0], &[1], DenseDtype::F32, None).unwrap();
    let hidden = Entry {
        name: "hidden".into(),
        dtype: Dtype::U8,
        shape: vec![2],
        data: vec![1, 2],
    };
    c.push(
        vec![hidden],
        TensorRecord {
            name: "b".into(),
            ..rec
        },
    )
    .unwrap();
    w.write_container(c).unwrap();
    w.finish().unwrap();
    let s = subjects(d.path());
    assert!(
        s.contains(&"tensors/globals.safetensors".to_string()),
        "{s:?}"
    );
}

#[test]
fn read_checks_entries_against_the_record() {
    let d = packed();
    let pack = Pack::open(d.path()).unwrap();
    assert!(matches!(
        read_quant_tensor(&pack, "model.norm.weight"),
        Err(CodecError::RecordMismatch { .. })
    ));
    assert!(matches!(
        read_quant_tensor(&pack, "nope"),
        Err(CodecError::Format(FormatError::UnknownTensor { .. }))
    ));
    let name = body_name(&CodecSpec::parse("q2g32").unwrap());
    let i = tensor_index(d.path(), &name);
    edit_manifest(d.path(), |v| {
        v["tensors"][i]["shape"] = json!([ROWS + 1, COLS])
    });
    let pack = Pack::open(d.path()).unwrap();
    let e = read_quant_tensor(&pack, &name).unwrap_err();
    assert!(
        matches!(&e, CodecError::RecordMismatch { tensor, reason } if tensor == &name && reason.contains(".scales")),
        "{e}"
    );
}
