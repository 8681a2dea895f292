//! Quantized and dense tensors in a pack: writing them into containers, reading them
//! back with every entry checked against the manifest record, reconstructing one by
//! name, and whole-pack verification.
//!
//! A quantized tensor `NAME` is stored as entries, in digest order:
//! `NAME.codebook` F32 (2^b,), `NAME.scales` F16|BF16|U8 (rows, n_groups),
//! `NAME.codes` U8 (rows, row_bytes), and with an overlay `NAME.overlay_a` BF16 (rows, r),
//! `NAME.overlay_b` BF16 (r, cols). A dense tensor is one entry `NAME`.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use uc_format::{
    Container, ContainerBuilder, DenseDtype, Dtype, Encoding, Entry, EntryRef, FileCheck,
    FileEntry, Finding, Pack, Role, TensorRecord, ToolInfo,
};

use crate::recon::update_le;
use crate::tensor::bf16_to_f32;
use crate::{CodecError, CodecSpec, Kernel, Overlay, QuantTensor, Reconstructor, Result};

/// The expected entries of a tensor in digest order: (entry name, dtype, shape).
pub type EntrySpec = (String, Dtype, Vec<usize>);

fn mismatch(tensor: &str, reason: String) -> CodecError {
    CodecError::RecordMismatch {
        tensor: tensor.into(),
        reason,
    }
}

/// The shape of a record as usize dims.
fn record_shape(rec: &TensorRecord) -> Result<Vec<usize>> {
    rec.shape
        .iter()
        .map(|&d| {
            usize::try_from(d)
                .map_err(|_| mismatch(&rec.name, format!("dimension {d} does not fit in memory")))
        })
        .collect()
}

/// Codec spec and (rows, cols) of a quantized record.
fn codec_of(rec: &TensorRecord) -> Result<(CodecSpec, usize, usize)> {
    let Encoding::Codec(c) = &rec.encoding else {
        return Err(mismatch(
            &rec.name,
            format!("encoding {:?} is not a quantized codec", rec.encoding),
        ));
    };
    let spec = CodecSpec::from_record(c).map_err(|e| e.named(&rec.name))?;
    match record_shape(rec)?.as_slice() {
        &[rows, cols] => Ok((spec, rows, cols)),
        s => Err(mismatch(
            &rec.name,
            format!("quantized tensor needs a 2-D shape, manifest has {s:?}"),
        )),
    }
}

/// The entries a record implies, in digest order (dense: the tensor itself; codec:
/// codebook, scales, codes, then overlay a and b when the rank is > 0), and its exact
/// stored byte count. The one place that knows a tensor's entry layout: the verifier
/// and the runtime's loaders (mapped and positioned reads) all locate entries with it.
pub fn expected_entries(rec: &TensorRecord) -> Result<(Vec<EntrySpec>, u64)> {
    let n = &rec.name;
    match &rec.encoding {
        Encoding::Dense(dt) => {
            let shape = record_shape(rec)?;
            let bytes = shape
                .iter()
                .try_fold(dt.size() as u64, |a, &d| a.checked_mul(d as u64))
                .ok_or_else(|| mismatch(n, format!("shape {shape:?} overflows")))?;
            Ok((vec![(n.clone(), dt.dtype(), shape)], bytes))
        }
        Encoding::Codec(_) => {
            let (spec, rows, cols) = codec_of(rec)?;
            let l = spec.layout(rows, cols).map_err(|e| e.named(n))?;
            let r = spec.rank as usize;
            let mut v = vec![
                (format!("{n}.codebook"), Dtype::F32, vec![l.codebook]),
                (
                    format!("{n}.scales"),
                    spec.scale_dtype.dtype(),
                    vec![rows, l.n_groups],
                ),
                (format!("{n}.codes"), Dtype::U8, vec![rows, l.row_bytes]),
            ];
            if r > 0 {
                v.push((format!("{n}.overlay_a"), Dtype::BF16, vec![rows, r]));
                v.push((format!("{n}.overlay_b"), Dtype::BF16, vec![r, cols]));
            }
            Ok((v, l.stored_bytes()))
        }
    }
}

/// Looks up every expected entry of `rec` in `c` (order of [`expected_entries`]),
/// checking dtype and shape.
pub fn load_entries<'c>(c: &'c Container, rec: &TensorRecord) -> Result<Vec<EntryRef<'c>>> {
    let (specs, _) = expected_entries(rec)?;
    specs
        .into_iter()
        .map(|(name, dtype, shape)| {
            let e = c.entry(&name)?;
            if e.dtype != dtype || e.shape != shape.as_slice() {
                return Err(mismatch(
                    &rec.name,
                    format!(
                        "entry {name:?} is {:?} {:?}, manifest implies {dtype:?} {shape:?}",
                        e.dtype, e.shape
                    ),
                ));
            }
            Ok(e)
        })
        .collect()
}

/// Little-endian u16 values (bf16 / f16 bits) of `b`; a trailing odd byte is ignored.
pub fn le_u16(b: &[u8]) -> Vec<u16> {
    b.chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}

fn le_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn entry(name: String, dtype: Dtype, shape: Vec<usize>, data: Vec<u8>) -> Entry {
    Entry {
        name,
        dtype,
        shape,
        data,
    }
}

/// The container entries of a quantized tensor, in digest order.
pub fn quant_entries(name: &str, qt: &QuantTensor) -> Result<Vec<Entry>> {
    let l = qt.validate().map_err(|e| e.named(name))?;
    let u16s = |v: &[u16]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut v = vec![
        entry(
            format!("{name}.codebook"),
            Dtype::F32,
            vec![l.codebook],
            qt.codebook.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        entry(
            format!("{name}.scales"),
            qt.spec.scale_dtype.dtype(),
            vec![l.rows, l.n_groups],
            crate::scales_to_le(&qt.scales, qt.spec.scale_dtype),
        ),
        entry(
            format!("{name}.codes"),
            Dtype::U8,
            vec![l.rows, l.row_bytes],
            qt.codes.clone(),
        ),
    ];
    if let Some(o) = &qt.overlay {
        v.push(entry(
            format!("{name}.overlay_a"),
            Dtype::BF16,
            vec![l.rows, o.rank],
            u16s(&o.a),
        ));
        v.push(entry(
            format!("{name}.overlay_b"),
            Dtype::BF16,
            vec![o.rank, l.cols],
            u16s(&o.b),
        ));
    }
    Ok(v)
}

fn digest_parts<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut h = Sha256::new();
    parts.into_iter().for_each(|p| h.update(p));
    hex::encode(h.finalize())
}

/// Adds quantized tensor `name` to container `c` and returns its manifest record
/// (encoded and reconstruction digests computed here, reconstruction with the best
/// kernel: all kernels give the same bits).
pub fn write_quant_tensor(
    c: &mut ContainerBuilder,
    name: &str,
    role: Role,
    qt: &QuantTensor,
    stats: Option<Map<String, Value>>,
) -> Result<TensorRecord> {
    let entries = quant_entries(name, qt)?;
    let recon = Reconstructor::new(qt, Kernel::select(false))
        .and_then(|r| r.digest())
        .map_err(|e| e.named(name))?;
    let rec = TensorRecord {
        name: name.into(),
        file: c.path().into(),
        role,
        shape: vec![qt.rows as u64, qt.cols as u64],
        encoding: Encoding::Codec(qt.spec.to_record()),
        stored_bytes: qt.spec.stored_bytes(qt.rows, qt.cols)?,
        encoded_sha256: digest_parts(entries.iter().map(|e| e.data.as_slice())),
        recon_sha256: hex::encode(recon),
        stats,
    };
    c.push(entries, rec.clone())?;
    Ok(rec)
}

/// Adds dense tensor `name` (f32 `values` of `shape`) to container `c`, stored as
/// `dtype` (bf16/f16 round to nearest even); returns its manifest record.
pub fn write_dense_tensor(
    c: &mut ContainerBuilder,
    name: &str,
    role: Role,
    values: &[f32],
    shape: &[usize],
    dtype: DenseDtype,
    stats: Option<Map<String, Value>>,
) -> Result<TensorRecord> {
    let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if n != Some(values.len()) {
        return Err(CodecError::LengthMismatch {
            tensor: name.into(),
            what: "values",
            expected: n.unwrap_or(usize::MAX),
            found: values.len(),
        });
    }
    let data: Vec<u8> = match dtype {
        DenseDtype::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DenseDtype::Bf16 => values
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        DenseDtype::F16 => values
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
    };
    let e = entry(name.into(), dtype.dtype(), shape.to_vec(), data);
    let mut h = Sha256::new();
    update_le(&mut h, &dense_to_f32(dtype, &e.data));
    let rec = TensorRecord {
        name: name.into(),
        file: c.path().into(),
        role,
        shape: shape.iter().map(|&d| d as u64).collect(),
        encoding: Encoding::Dense(dtype),
        stored_bytes: e.data.len() as u64,
        encoded_sha256: digest_parts([e.data.as_slice()]),
        recon_sha256: hex::encode(h.finalize()),
        stats,
    };
    c.push(vec![e], rec.clone())?;
    Ok(rec)
}

/// f32 values of a dense entry's little-endian bytes.
pub fn dense_to_f32(dtype: DenseDtype, b: &[u8]) -> Vec<f32> {
    match dtype {
        DenseDtype::F32 => le_f32(b),
        DenseDtype::Bf16 => le_u16(b).into_iter().map(bf16_to_f32).collect(),
        DenseDtype::F16 => le_u16(b)
            .into_iter()
            .map(|x| half::f16::from_bits(x).to_f32())
            .collect(),
    }
}

fn quant_from_entries(rec: &TensorRecord, parts: &[EntryRef]) -> Result<QuantTensor> {
    let (spec, rows, cols) = codec_of(rec)?;
    let data = |i: usize| parts.get(i).map(|e| e.data).unwrap_or_default();
    let overlay = (spec.rank > 0).then(|| Overlay {
        rank: spec.rank as usize,
        a: le_u16(data(3)),
        b: le_u16(data(4)),
    });
    let qt = QuantTensor {
        rows,
        cols,
        spec,
        codebook: le_f32(data(0)),
        scales: crate::scales_from_le(data(1), spec.scale_dtype),
        codes: data(2).to_vec(),
        overlay,
    };
    qt.validate().map_err(|e| e.named(&rec.name))?;
    Ok(qt)
}

/// Lower-case hex reconstruction digest of f32 values (SHA-256 over their little-endian
/// bytes), as `recon_sha256` records it for dense tensors.
pub fn f32_digest(v: &[f32]) -> String {
    let mut h = Sha256::new();
    update_le(&mut h, v);
    hex::encode(h.finalize())
}

/// Reads quantized tensor `name`: entries checked against the manifest record (dtype,
/// shape), decoded, and validated.
pub fn read_quant_tensor(pack: &Pack, name: &str) -> Result<QuantTensor> {
    let rec = pack.tensor(name)?;
    codec_of(rec)?;
    let c = pack.container(&rec.file)?;
    quant_from_entries(rec, &load_entries(&c, rec)?)
}

/// Reconstructs tensor `name` (quantized or dense) to f32, row-major in its shape.
pub fn reconstruct_tensor(pack: &Pack, name: &str, kernel: Kernel) -> Result<Vec<f32>> {
    let rec = pack.tensor(name)?;
    let c = pack.container(&rec.file)?;
    let parts = load_entries(&c, rec)?;
    match &rec.encoding {
        Encoding::Dense(dt) => Ok(dense_to_f32(
            *dt,
            parts.first().map(|e| e.data).unwrap_or_default(),
        )),
        Encoding::Codec(_) => {
            let qt = quant_from_entries(rec, &parts)?;
            Ok(Reconstructor::new(&qt, kernel)
                .map_err(|e| e.named(name))?
                .all())
        }
    }
}

/// Checks one tensor: entries, stored byte count, encoded digest, decode + validation,
/// reconstruction digest.
/// Checks one tensor, recording the digests it computed in `out` as it goes.
fn check_tensor(
    pack: &Pack,
    rec: &TensorRecord,
    kernel: Kernel,
    out: &mut TensorCheck,
) -> Result<(), String> {
    let s = |e: CodecError| e.to_string();
    let (_, stored) = expected_entries(rec).map_err(s)?;
    if stored != rec.stored_bytes {
        return Err(format!(
            "stored_bytes {} but the codec and shape imply {stored}",
            rec.stored_bytes
        ));
    }
    let c = pack.container(&rec.file).map_err(|e| e.to_string())?;
    let parts = load_entries(&c, rec).map_err(s)?;
    let enc = digest_parts(parts.iter().map(|e| e.data));
    out.encoded_sha256.clone_from(&enc);
    if enc != rec.encoded_sha256 {
        return Err(format!(
            "encoded sha256 {enc}, manifest says {}",
            rec.encoded_sha256
        ));
    }
    let recon = match &rec.encoding {
        Encoding::Dense(dt) => {
            let mut h = Sha256::new();
            update_le(
                &mut h,
                &dense_to_f32(*dt, parts.first().map(|e| e.data).unwrap_or_default()),
            );
            hex::encode(h.finalize())
        }
        Encoding::Codec(_) => {
            let qt = quant_from_entries(rec, &parts).map_err(s)?;
            hex::encode(
                Reconstructor::new(&qt, kernel)
                    .and_then(|r| r.digest())
                    .map_err(s)?,
            )
        }
    };
    out.recon_sha256.clone_from(&recon);
    if recon != rec.recon_sha256 {
        return Err(format!(
            "reconstruction sha256 {recon}, manifest says {}",
            rec.recon_sha256
        ));
    }
    Ok(())
}

/// Container entries that no tensor record claims (data the manifest does not describe).
/// Entries of tensors in `failed` (already reported) are not reported again.
/// Drops the pages of `t`'s entries from the resident set once it is checked, so that
/// verifying a pack keeps about the tensors in flight resident rather than every
/// container it has mapped (a 4.75 GB 7B pack held 4.98 GB RSS before;
/// docs/research-log.md). The container stays open (its header is parsed) for the
/// unclaimed-entry check.
fn release_tensor(pack: &Pack, t: &TensorRecord) {
    if let (Ok((entries, _)), Ok(c)) = (expected_entries(t), pack.container(&t.file)) {
        for (name, ..) in entries {
            c.release(&name);
        }
    }
}

fn unclaimed_entries(pack: &Pack, failed: &BTreeSet<&str>) -> Vec<Finding> {
    let m = pack.manifest();
    let mut out = Vec::new();
    for f in m.files.iter().filter(|f| f.path.starts_with("tensors/")) {
        let Ok(c) = pack.container(&f.path) else {
            continue;
        }; // reported by the tensor checks
        let mine: Vec<&TensorRecord> = m.tensors.iter().filter(|t| t.file == f.path).collect();
        let claimed: BTreeSet<String> = mine
            .iter()
            .filter_map(|t| expected_entries(t).ok())
            .flat_map(|(v, _)| v.into_iter().map(|e| e.0))
            .collect();
        // A tensor whose check failed is reported already; its entries are not "unclaimed".
        let broken: Vec<&str> = mine
            .iter()
            .map(|t| t.name.as_str())
            .filter(|n| failed.contains(n))
            .collect();
        let covered = |n: &str| {
            claimed.contains(n)
                || broken
                    .iter()
                    .any(|b| n == *b || n.strip_prefix(*b).is_some_and(|r| r.starts_with('.')))
        };
        for n in c.names().into_iter().filter(|n| !covered(n)) {
            out.push(Finding::new(
                &f.path,
                format!("entry {n:?} belongs to no tensor in the manifest"),
            ));
        }
    }
    out
}

/// Description of the verifying machine, free of personal data.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct HostInfo {
    /// Operating system (`linux`).
    pub os: String,
    /// CPU architecture (`x86_64`).
    pub arch: String,
    /// Detected CPU features relevant to uc.
    pub cpu_features: Vec<String>,
    /// Threads used.
    pub threads: usize,
    /// Reconstruction kernel used.
    pub kernel: Kernel,
}

impl HostInfo {
    /// This machine, with `threads` threads and `kernel`.
    pub fn detect(threads: usize, kernel: Kernel) -> Self {
        #[allow(unused_mut)]
        let mut cpu_features: Vec<String> = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            macro_rules! probe { ($($f:tt),*) => { $( if is_x86_feature_detected!($f) { cpu_features.push($f.into()); } )* } }
            probe!("sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "sha", "aes");
        }
        #[cfg(target_arch = "aarch64")]
        {
            macro_rules! probe { ($($f:tt),*) => { $( if std::arch::is_aarch64_feature_detected!($f) { cpu_features.push($f.into()); } )* } }
            probe!("neon", "sha2", "aes");
        }
        HostInfo {
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            cpu_features,
            threads,
            kernel,
        }
    }
}

/// Outcome of checking one tensor.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TensorCheck {
    /// Tensor name.
    pub name: String,
    /// Container path.
    pub file: String,
    /// `dense_f32`, ..., or the codec name.
    pub encoding: String,
    /// Logical element count (0 if the shape overflows).
    pub elements: u64,
    /// SHA-256 of the encoded entries as read (empty if they could not be read).
    pub encoded_sha256: String,
    /// SHA-256 of the reconstruction as computed here (empty if not reached).
    pub recon_sha256: String,
    /// Entries, stored bytes, both digests and validation all passed.
    pub ok: bool,
}

/// The verification receipt (serialize it for `uc verify --json`).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct VerifyReport {
    /// Whether everything passed.
    pub pass: bool,
    /// The verifying program.
    pub tool: ToolInfo,
    /// The verifying machine.
    pub host: HostInfo,
    /// The pack's fingerprint as recorded in its manifest (empty if unreadable).
    pub fingerprint: String,
    /// Every listed file, in manifest order.
    pub files: Vec<FileCheck>,
    /// Every tensor, in manifest order.
    pub tensors: Vec<TensorCheck>,
    /// Every failure, naming its file or tensor.
    pub failures: Vec<Finding>,
    /// File bytes hashed.
    pub bytes_hashed: u64,
    /// Wall time in seconds.
    pub seconds: f64,
}

fn encoding_name(e: &Encoding) -> String {
    match e {
        Encoding::Dense(d) => serde_json::to_value(d)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default(),
        Encoding::Codec(c) => c.name.clone(),
    }
}

/// Verifies a pack completely on `threads` threads (0 = all cores): manifest
/// consistency, every file's size and SHA-256, no unlisted files or entries, and every
/// tensor decoded, validated, reconstructed and compared with both recorded digests.
/// File hashing and tensor reconstruction run concurrently, largest first.
pub fn verify_pack(pack: &Pack, threads: usize) -> VerifyReport {
    let start = Instant::now();
    let kernel = Kernel::select(false);
    let run = || {
        enum Work<'a> {
            File(&'a FileEntry),
            Tensor(&'a TensorRecord),
        }
        let m = pack.manifest();
        let mut work: Vec<(u64, usize, Work)> = m
            .files
            .iter()
            .enumerate()
            .map(|(i, f)| (f.size, i, Work::File(f)))
            .collect();
        // Reconstruction hashes 4 bytes per element: weigh it like a file that size.
        work.extend(m.tensors.iter().enumerate().map(|(i, t)| {
            (
                t.elements().unwrap_or(0).saturating_mul(4),
                i,
                Work::Tensor(t),
            )
        }));
        work.sort_by_key(|w| std::cmp::Reverse(w.0));
        enum Done {
            File(usize, FileCheck, Option<Finding>),
            Tensor(usize, TensorCheck, Option<Finding>),
        }
        let done: Vec<Done> = work
            .par_iter()
            .map(|(_, i, w)| match w {
                Work::File(f) => {
                    let (c, finding) = pack.check_file(f);
                    Done::File(*i, c, finding)
                }
                Work::Tensor(t) => {
                    let mut check = TensorCheck {
                        name: t.name.clone(),
                        file: t.file.clone(),
                        encoding: encoding_name(&t.encoding),
                        elements: t.elements().unwrap_or(0),
                        encoded_sha256: String::new(),
                        recon_sha256: String::new(),
                        ok: false,
                    };
                    let res = check_tensor(pack, t, kernel, &mut check);
                    check.ok = res.is_ok();
                    release_tensor(pack, t);
                    Done::Tensor(*i, check, res.err().map(|p| Finding::new(&t.name, p)))
                }
            })
            .collect();
        let mut files: Vec<Option<FileCheck>> = vec![None; m.files.len()];
        let mut tensors: Vec<Option<TensorCheck>> = vec![None; m.tensors.len()];
        let (mut file_fail, mut tensor_fail) =
            (vec![None; m.files.len()], vec![None; m.tensors.len()]);
        for d in done {
            match d {
                Done::File(i, c, f) => {
                    files[i] = Some(c);
                    file_fail[i] = f;
                }
                Done::Tensor(i, c, f) => {
                    tensors[i] = Some(c);
                    tensor_fail[i] = f;
                }
            }
        }
        let mut failures = pack.check_manifest();
        failures.extend(file_fail.into_iter().flatten());
        failures.extend(pack.unlisted_files());
        let failed: BTreeSet<&str> = tensor_fail
            .iter()
            .flatten()
            .map(|f| f.subject.as_str())
            .collect();
        failures.extend(unclaimed_entries(pack, &failed));
        failures.extend(tensor_fail.into_iter().flatten());
        let files: Vec<FileCheck> = files.into_iter().flatten().collect();
        VerifyReport {
            pass: failures.is_empty(),
            tool: ToolInfo::this(),
            host: HostInfo::detect(rayon::current_num_threads(), kernel),
            fingerprint: m.fingerprint.clone(),
            bytes_hashed: files.iter().map(|f| f.size).sum(),
            files,
            tensors: tensors.into_iter().flatten().collect(),
            failures,
            seconds: 0.0,
        }
    };
    let mut report = match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
        Ok(pool) => pool.install(run),
        Err(_) => run(),
    };
    report.seconds = start.elapsed().as_secs_f64();
    report
}

/// Opens and verifies the pack in `dir`; a pack that does not open yields a failed
/// report whose single finding names `manifest.json` and the reason.
pub fn verify_dir(dir: &Path, threads: usize) -> VerifyReport {
    match Pack::open(dir) {
        Ok(p) => verify_pack(&p, threads),
        Err(e) => VerifyReport {
            pass: false,
            tool: ToolInfo::this(),
            host: HostInfo::detect(
                if threads == 0 {
                    rayon::current_num_threads()
                } else {
                    threads
                },
                Kernel::select(false),
            ),
            fingerprint: String::new(),
            files: Vec::new(),
            tensors: Vec::new(),
            failures: vec![Finding::new(uc_format::MANIFEST_FILE, e.to_string())],
            bytes_hashed: 0,
            seconds: 0.0,
        },
    }
}
