//! Behaviour of the pack container layer: writing, reading, verification, tampering,
//! resume, and one test per `FormatError` variant.

use std::path::Path;

use serde_json::{json, Value};
use uc_format::*;

fn source() -> SourceInfo {
    SourceInfo {
        architecture: "llama".into(),
        config: json!({"hidden_size": 8}),
        files: vec![SourceFile {
            name: "model.safetensors".into(),
            size: 3,
            sha256: sha256_hex(b"abc"),
        }],
    }
}

fn record(name: &str, shape: Vec<u64>, bytes: &[u8]) -> TensorRecord {
    TensorRecord {
        name: name.into(),
        file: String::new(),
        role: Role::Norm,
        shape,
        encoding: Encoding::Dense(DenseDtype::F32),
        stored_bytes: bytes.len() as u64,
        encoded_sha256: sha256_hex(bytes),
        recon_sha256: sha256_hex(bytes),
        stats: None,
    }
}

fn f32_entry(name: &str, v: &[f32]) -> (Entry, TensorRecord) {
    let data: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let rec = record(name, vec![v.len() as u64], &data);
    (
        Entry {
            name: name.into(),
            dtype: Dtype::F32,
            shape: vec![v.len()],
            data,
        },
        rec,
    )
}

fn builder(file: &str, tensors: &[(&str, &[f32])]) -> ContainerBuilder {
    let mut c = ContainerBuilder::new(file).unwrap();
    for (n, v) in tensors {
        let (e, r) = f32_entry(n, v);
        c.push(vec![e], r).unwrap();
    }
    c
}

/// A small finished pack: config.json, globals + two blocks.
fn make_pack(dir: &Path) -> Manifest {
    let mut w = PackWriter::create(dir, source()).unwrap();
    w.write_file("config.json", b"{\"hidden_size\": 8}\n")
        .unwrap();
    w.write_container(builder(
        GLOBALS_CONTAINER,
        &[("model.norm.weight", &[1.0, 2.0, 3.0])],
    ))
    .unwrap();
    for i in 0..2 {
        let n = format!("model.layers.{i}.input_layernorm.weight");
        w.write_container(builder(&block_container(i), &[(&n, &[i as f32, 0.5])]))
            .unwrap();
    }
    w.set_calibration(json!({"windows": 4})).unwrap();
    w.finish().unwrap()
}

fn read_all(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for sub in ["", "tensors"] {
        let mut names: Vec<_> = std::fs::read_dir(dir.join(sub))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for p in names.into_iter().filter(|p| p.is_file()) {
            out.push((
                p.strip_prefix(dir).unwrap().display().to_string(),
                std::fs::read(&p).unwrap(),
            ));
        }
    }
    out
}

fn edit_manifest(dir: &Path, f: impl FnOnce(&mut Value)) {
    let p = dir.join(MANIFEST_FILE);
    let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

fn failing_subjects(dir: &Path) -> Vec<String> {
    Pack::open(dir)
        .unwrap()
        .verify_files()
        .failures
        .into_iter()
        .map(|f| f.subject)
        .collect()
}

#[test]
fn written_pack_opens_and_verifies() {
    let d = tempfile::tempdir().unwrap();
    let m = make_pack(d.path());
    assert!(
        !d.path().join(JOURNAL_FILE).exists(),
        "finish removes the journal"
    );
    let p = Pack::open(d.path()).unwrap();
    assert_eq!(p.manifest(), &m);
    let r = p.verify_files();
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert_eq!(r.files.len(), 4);
    let rec = p.tensor("model.norm.weight").unwrap();
    assert_eq!(rec.file, "tensors/globals.safetensors");
    let c = p.container(&rec.file).unwrap();
    let e = c.entry("model.norm.weight").unwrap();
    assert_eq!((e.dtype, e.shape), (Dtype::F32, &[3usize][..]));
    assert_eq!(
        e.data,
        [1f32, 2.0, 3.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect::<Vec<_>>()
    );
    assert_eq!(m.calibration, Some(json!({"windows": 4})));
    assert_eq!(m.bpw_model, 32.0);
}

#[test]
fn containers_are_plain_safetensors() {
    let d = tempfile::tempdir().unwrap();
    make_pack(d.path());
    let bytes = std::fs::read(d.path().join("tensors/block_0001.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.names(), vec!["model.layers.1.input_layernorm.weight"]);
}

#[test]
fn writer_is_deterministic() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    make_pack(a.path());
    make_pack(b.path());
    assert_eq!(read_all(a.path()), read_all(b.path()));
}

#[test]
fn fingerprint_is_sha256_of_canonical_json_without_itself() {
    let v = json!({"b": [1, 2.5, "x"], "a": {"z": null, "y": true}, "fingerprint": "f"});
    assert_eq!(
        fingerprint(&v),
        sha256_hex(br#"{"a":{"y":true,"z":null},"b":[1,2.5,"x"]}"#)
    );
    let written = make_pack(tempfile::tempdir().unwrap().path());
    let mut v = serde_json::to_value(&written).unwrap();
    assert_eq!(fingerprint(&v), written.fingerprint);
    v["fingerprint"] = json!("anything");
    assert_eq!(fingerprint(&v), written.fingerprint, "own field excluded");
}

#[test]
fn edited_provenance_field_fails_naming_the_manifest() {
    // Fields no other check looks at: only the fingerprint can catch these edits.
    let edits: [fn(&mut serde_json::Value); 4] = [
        |v| v["tool"]["version"] = json!("9.9.9"),
        |v| v["source"]["architecture"] = json!("mistral"),
        |v| v["source"]["config"]["hidden_size"] = json!(1),
        |v| v["an_added_field"] = json!(1),
    ];
    for edit in edits {
        let d = tempfile::tempdir().unwrap();
        make_pack(d.path());
        edit_manifest(d.path(), edit);
        assert_eq!(failing_subjects(d.path()), vec!["manifest.json"]);
    }
}

#[test]
fn unknown_manifest_fields_are_ignored() {
    let d = tempfile::tempdir().unwrap();
    make_pack(d.path());
    edit_manifest(d.path(), |v| {
        v["a_future_field"] = json!({"x": 1});
        v["tensors"][0]["another"] = json!(2);
    });
    assert!(Pack::open(d.path()).is_ok());
}

#[test]
fn flipped_byte_in_any_file_fails_naming_it() {
    let d = tempfile::tempdir().unwrap();
    let m = make_pack(d.path());
    for f in &m.files {
        let p = d.path().join(&f.path);
        let orig = std::fs::read(&p).unwrap();
        let mut bad = orig.clone();
        let k = bad.len() / 2;
        bad[k] ^= 0x01;
        std::fs::write(&p, &bad).unwrap();
        assert_eq!(failing_subjects(d.path()), vec![f.path.clone()]);
        std::fs::write(&p, &orig).unwrap();
    }
}

#[test]
fn truncated_removed_and_extra_files_fail_naming_them() {
    let d = tempfile::tempdir().unwrap();
    make_pack(d.path());
    let blk = d.path().join("tensors/block_0000.safetensors");
    let orig = std::fs::read(&blk).unwrap();
    std::fs::write(&blk, &orig[..orig.len() - 1]).unwrap();
    assert_eq!(
        failing_subjects(d.path()),
        vec!["tensors/block_0000.safetensors"]
    );
    std::fs::remove_file(&blk).unwrap();
    assert_eq!(
        failing_subjects(d.path()),
        vec!["tensors/block_0000.safetensors"]
    );
    std::fs::write(&blk, &orig).unwrap();
    std::fs::write(d.path().join("tensors/extra.safetensors"), b"x").unwrap();
    std::fs::write(d.path().join("notes.txt"), b"x").unwrap();
    assert_eq!(
        failing_subjects(d.path()),
        vec!["notes.txt", "tensors/extra.safetensors"]
    );
}

#[test]
fn edited_manifest_size_or_hash_fails_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    make_pack(d.path());
    edit_manifest(d.path(), |v| v["files"][1]["size"] = json!(1));
    let s = failing_subjects(d.path());
    assert!(
        s.contains(&"manifest.json".to_string()),
        "fingerprint no longer matches: {s:?}"
    );
    assert!(s.iter().any(|x| x.starts_with("tensors/")), "{s:?}");
    let d = tempfile::tempdir().unwrap();
    make_pack(d.path());
    edit_manifest(d.path(), |v| v["files"][0]["sha256"] = json!("00"));
    assert_eq!(
        failing_subjects(d.path()),
        vec!["manifest.json", "config.json"]
    );
}

#[test]
fn edited_tensor_record_fails_manifest_checks() {
    let d = tempfile::tempdir().unwrap();
    make_pack(d.path());
    edit_manifest(d.path(), |v| v["tensors"][0]["stored_bytes"] = json!(999));
    assert_eq!(
        failing_subjects(d.path()),
        vec!["manifest.json", "manifest.json"],
        "fingerprint and bpw totals no longer match"
    );
    let d = tempfile::tempdir().unwrap();
    make_pack(d.path());
    edit_manifest(d.path(), |v| v["tensors"][0]["file"] = json!("config.json"));
    assert_eq!(
        failing_subjects(d.path()),
        vec!["manifest.json", "model.layers.0.input_layernorm.weight"]
    );
}

#[test]
fn resume_continues_after_a_crash_and_redoes_corrupt_files() {
    let d = tempfile::tempdir().unwrap();
    {
        let mut w = PackWriter::create(d.path(), source()).unwrap();
        w.write_file("config.json", b"{}").unwrap();
        w.write_container(builder(&block_container(0), &[("a", &[1.0])]))
            .unwrap();
        w.write_container(builder(&block_container(1), &[("b", &[2.0])]))
            .unwrap();
        // Crash: the writer is dropped without finish; a temp file is left behind.
        std::fs::write(d.path().join("tensors/block_0002.tmp"), b"partial").unwrap();
    }
    std::fs::write(d.path().join("tensors/block_0001.safetensors"), b"corrupt").unwrap();
    let mut w = PackWriter::resume(d.path()).unwrap();
    assert_eq!(w.dropped_on_resume(), ["tensors/block_0001.safetensors"]);
    assert!(w.is_complete("tensors/block_0000.safetensors") && w.is_complete("config.json"));
    assert!(!w.is_complete("tensors/block_0001.safetensors"));
    assert!(!d.path().join("tensors/block_0002.tmp").exists());
    w.write_container(builder(&block_container(1), &[("b", &[2.0])]))
        .unwrap();
    let m = w.finish().unwrap();
    assert_eq!(
        m.tensors
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert!(Pack::open(d.path())
        .unwrap()
        .verify_files()
        .failures
        .is_empty());
}

#[test]
fn tensor_names_are_unique_across_containers() {
    let d = tempfile::tempdir().unwrap();
    let mut w = PackWriter::create(d.path(), source()).unwrap();
    w.write_container(builder(&block_container(0), &[("a", &[1.0])]))
        .unwrap();
    let e = w
        .write_container(builder(&block_container(1), &[("a", &[1.0])]))
        .unwrap_err();
    assert!(matches!(e, FormatError::Duplicate { name } if name == "a"));
}

// ---- one test per FormatError variant ----

#[test]
fn io_error_names_the_missing_manifest() {
    let d = tempfile::tempdir().unwrap();
    let e = Pack::open(d.path()).unwrap_err();
    assert!(
        matches!(&e, FormatError::Io { path, .. } if path.ends_with(MANIFEST_FILE)),
        "{e}"
    );
}

#[test]
fn rejects_oversized_manifest() {
    let d = tempfile::tempdir().unwrap();
    let f = std::fs::File::create(d.path().join(MANIFEST_FILE)).unwrap();
    f.set_len(MAX_JSON_BYTES + 1).unwrap(); // sparse: no real allocation
    assert!(
        matches!(Pack::open(d.path()).unwrap_err(), FormatError::TooLarge { size, .. } if size == MAX_JSON_BYTES + 1)
    );
}

#[test]
fn rejects_malformed_manifest_json() {
    let d = tempfile::tempdir().unwrap();
    make_pack(d.path());
    edit_manifest(d.path(), |v| v["tensors"][0]["shape"] = json!("four"));
    assert!(matches!(
        Pack::open(d.path()).unwrap_err(),
        FormatError::Json { .. }
    ));
}

#[test]
fn rejects_newer_format_version() {
    let d = tempfile::tempdir().unwrap();
    make_pack(d.path());
    edit_manifest(d.path(), |v| {
        v["format_version"] = json!(2);
        v["tensors"] = json!("a schema this build cannot parse");
    });
    let e = Pack::open(d.path()).unwrap_err();
    assert!(
        matches!(
            e,
            FormatError::UnsupportedVersion {
                found: 2,
                supported: 1,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("upgrade"));
}

#[test]
fn rejects_paths_escaping_the_pack() {
    for bad in [
        "../etc/passwd",
        "/etc/passwd",
        "tensors/../x",
        "sub/x",
        ".hidden",
        "tensors/a\tb",
        "manifest.json",
    ] {
        let d = tempfile::tempdir().unwrap();
        make_pack(d.path());
        edit_manifest(d.path(), |v| v["files"][0]["path"] = json!(bad));
        assert!(
            matches!(Pack::open(d.path()).unwrap_err(), FormatError::UnsafePath { path } if path == bad),
            "{bad}"
        );
    }
    assert!(matches!(
        ContainerBuilder::new("../x"),
        Err(FormatError::UnsafePath { .. })
    ));
}

#[test]
fn rejects_trailing_bytes() {
    let d = tempfile::tempdir().unwrap();
    make_pack(d.path());
    let p = d.path().join("tensors/block_0000.safetensors");
    let mut b = std::fs::read(&p).unwrap();
    b.push(0);
    let e = Container::from_bytes(&p, b).unwrap_err();
    assert!(
        matches!(&e, FormatError::Container { path, .. } if path == &p),
        "{e}"
    );
    assert!(matches!(
        Container::from_bytes(&p, vec![1, 2, 3]),
        Err(FormatError::Container { .. })
    ));
}

#[test]
fn missing_entry_names_container_and_entry() {
    let d = tempfile::tempdir().unwrap();
    make_pack(d.path());
    let p = Pack::open(d.path()).unwrap();
    let c = p.container("tensors/globals.safetensors").unwrap();
    assert!(
        matches!(c.entry("nope"), Err(FormatError::MissingEntry { entry, .. }) if entry == "nope")
    );
}

#[test]
fn rejects_duplicate_names() {
    let mut c = builder("x.safetensors", &[("a", &[1.0])]);
    let (e, r) = f32_entry("a", &[2.0]);
    assert!(matches!(c.push(vec![e], r), Err(FormatError::Duplicate { name }) if name == "a"));
    let d = tempfile::tempdir().unwrap();
    make_pack(d.path());
    edit_manifest(d.path(), |v| {
        let t = v["tensors"][0].clone();
        v["tensors"].as_array_mut().unwrap().push(t);
    });
    assert!(matches!(
        Pack::open(d.path()).unwrap_err(),
        FormatError::Duplicate { .. }
    ));
}

#[test]
fn unknown_tensor_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    make_pack(d.path());
    let p = Pack::open(d.path()).unwrap();
    assert!(matches!(p.tensor("nope"), Err(FormatError::UnknownTensor { name }) if name == "nope"));
}

#[test]
fn create_refuses_an_existing_pack() {
    let d = tempfile::tempdir().unwrap();
    make_pack(d.path());
    assert!(matches!(
        PackWriter::create(d.path(), source()),
        Err(FormatError::AlreadyExists { .. })
    ));
}

#[test]
fn resume_without_journal_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    assert!(matches!(
        PackWriter::resume(d.path()),
        Err(FormatError::NoJournal { .. })
    ));
}

#[test]
fn bpw_totals_survive_the_json_round_trip() {
    // Regression: without serde_json's float_roundtrip feature some ratios (a q3g128 pack
    // of SmolLM2 was one) came back one ulp off and `uc verify` failed a sound pack.
    let mut bad = Vec::new();
    for bytes in 1u64..2000 {
        for elems in [576u64, 1536, 49152, 331_776, 884_736, 28_311_552] {
            let x = (bytes * 7919) as f64 * 8.0 / elems as f64;
            let back: f64 = serde_json::from_str(&serde_json::to_string(&x).unwrap()).unwrap();
            if back.to_bits() != x.to_bits() {
                bad.push(x);
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} values changed, e.g. {:?}",
        bad.len(),
        &bad[..bad.len().min(3)]
    );
}
