//! The manifest schema (`manifest.json`). Compatibility rule: readers ignore unknown
//! fields (serde's default), and refuse a `format_version` greater than
//! [`FORMAT_VERSION`]; adding a field is therefore not a version change, changing the
//! meaning of one is.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::hash::sha256_hex;

/// Major version of the pack format this build writes and the newest it reads.
pub const FORMAT_VERSION: u64 = 1;

/// The whole `manifest.json`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Manifest {
    /// Major format version ([`FORMAT_VERSION`] when written by this build).
    pub format_version: u64,
    /// Program that wrote the pack.
    pub tool: ToolInfo,
    /// Checkpoint the pack was made from.
    pub source: SourceInfo,
    /// Calibration provenance (free-form; filled by the compressor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Value>,
    /// Every file of the pack except `manifest.json`, sorted by path.
    pub files: Vec<FileEntry>,
    /// Every stored tensor, sorted by (file, name).
    pub tensors: Vec<TensorRecord>,
    /// Stored bits per weight of the `body` tensors (0 when there are none).
    pub bpw_body: f64,
    /// Stored bits per weight over all tensors (0 when there are none).
    pub bpw_model: f64,
    /// [`fingerprint`] of the rest of the manifest: one hash naming the pack's exact
    /// contents and everything recorded about them.
    pub fingerprint: String,
}

/// Name and version of the writing program.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ToolInfo {
    /// Program name (`uc`).
    pub name: String,
    /// Program version (semver).
    pub version: String,
}

impl ToolInfo {
    /// This build of uc.
    pub fn this() -> Self {
        ToolInfo {
            name: "uc".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

/// Provenance of the source checkpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct SourceInfo {
    /// Architecture family (`llama`, ...).
    pub architecture: String,
    /// The source `config.json` object, verbatim.
    pub config: Value,
    /// The source files and their hashes.
    pub files: Vec<SourceFile>,
}

/// One file of the source checkpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SourceFile {
    /// File name relative to the source directory.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Lower-case hex SHA-256.
    pub sha256: String,
}

/// One file of the pack.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    /// Path relative to the pack root, `/`-separated (`tensors/block_0000.safetensors`).
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Lower-case hex SHA-256 of the whole file.
    pub sha256: String,
}

/// What part of the model a tensor is; decides which bits-per-weight total it counts in.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Linear weights inside transformer blocks (counted in `bpw_body`).
    Body,
    /// Token embedding.
    Embed,
    /// Output head (lm_head).
    Head,
    /// Normalization weights.
    Norm,
    /// Anything else (biases, ...).
    Other,
}

/// Storage dtype of a dense tensor.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DenseDtype {
    /// IEEE binary32.
    #[serde(rename = "dense_f32")]
    F32,
    /// bfloat16.
    #[serde(rename = "dense_bf16")]
    Bf16,
    /// IEEE binary16.
    #[serde(rename = "dense_f16")]
    F16,
}

impl DenseDtype {
    /// The safetensors dtype of the stored entry.
    pub fn dtype(self) -> safetensors::Dtype {
        match self {
            DenseDtype::F32 => safetensors::Dtype::F32,
            DenseDtype::Bf16 => safetensors::Dtype::BF16,
            DenseDtype::F16 => safetensors::Dtype::F16,
        }
    }
    /// Bytes per stored element.
    pub fn size(self) -> usize {
        match self {
            DenseDtype::F32 => 4,
            DenseDtype::Bf16 | DenseDtype::F16 => 2,
        }
    }
}

/// Storage dtype of a quantized tensor's group scales.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ScaleDtype {
    /// IEEE binary16 (entry dtype `F16`).
    F16,
    /// bfloat16 (entry dtype `BF16`).
    Bf16,
    /// 8-bit minifloat code `e` (entry dtype `U8`), value `(32 + e % 32) * 2^(e / 32 -
    /// 12)`: 5 mantissa bits over 8 octaves, `2^-7 ..= 1.96875`, monotone in `e`. The
    /// tensor's overall magnitude lives in its (f32) codebook.
    E8,
}

impl ScaleDtype {
    /// The safetensors dtype of the scales entry.
    pub fn dtype(self) -> safetensors::Dtype {
        match self {
            ScaleDtype::F16 => safetensors::Dtype::F16,
            ScaleDtype::Bf16 => safetensors::Dtype::BF16,
            ScaleDtype::E8 => safetensors::Dtype::U8,
        }
    }

    /// Bytes per stored scale.
    pub fn size(self) -> usize {
        match self {
            ScaleDtype::F16 | ScaleDtype::Bf16 => 2,
            ScaleDtype::E8 => 1,
        }
    }
}

/// A quantized tensor's codec parameters as recorded in the manifest (uc-codec checks
/// them against its codec table).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct CodecRecord {
    /// Canonical codec name (`q5g128`); must agree with the other fields.
    pub name: String,
    /// Bits per code.
    pub bits: u8,
    /// Columns per scale group.
    pub group: u32,
    /// Dtype of the scales.
    pub scale_dtype: ScaleDtype,
    /// Rank of the low-rank overlay (0 = none).
    pub rank: u32,
    /// Block size of the randomized Hadamard rotation of the input dimension (0 = none;
    /// docs/format.md section 3b). Absent in packs written before rotations existed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rot: u32,
    /// Trellis-coded codes (docs/format.md section 3c): each code is a branch bit and an
    /// index into one of four subsets of a codebook twice as long. Absent (false) in packs
    /// written before trellis codes existed.
    #[serde(default, skip_serializing_if = "is_false")]
    pub trellis: bool,
}

fn is_false(v: &bool) -> bool {
    !*v
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// How a tensor is stored: dense (a JSON string) or quantized (a JSON object).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(untagged)]
pub enum Encoding {
    /// Stored as one entry `NAME` of the given dtype.
    Dense(DenseDtype),
    /// Stored as entries `NAME.codebook`, `NAME.scales`, `NAME.codes` (+ overlay).
    Codec(CodecRecord),
}

/// One tensor of the pack.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TensorRecord {
    /// Tensor name in the source checkpoint (`model.layers.0.mlp.up_proj.weight`).
    pub name: String,
    /// Pack path of the container holding its entries.
    pub file: String,
    /// Role (which bits-per-weight total counts it).
    pub role: Role,
    /// Logical shape of the reconstructed tensor (rows, cols for quantized ones).
    pub shape: Vec<u64>,
    /// Storage encoding.
    pub encoding: Encoding,
    /// Every stored payload byte of the tensor's entries.
    pub stored_bytes: u64,
    /// SHA-256 of the entries' raw bytes concatenated in the order codebook, scales,
    /// codes, overlay_a, overlay_b (or of the single dense entry).
    pub encoded_sha256: String,
    /// SHA-256 of the reconstructed tensor as little-endian f32.
    pub recon_sha256: String,
    /// Free-form quality numbers (relative error, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<Map<String, Value>>,
}

impl TensorRecord {
    /// Element count of the logical shape, `None` on overflow.
    pub fn elements(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }
}

/// The pack fingerprint of a manifest given as a JSON value: SHA-256 (lower-case hex) of
/// its canonical text with the top-level `fingerprint` member removed. Every other field,
/// unknown ones included, is covered, so the fingerprint names the pack's exact bytes
/// (through `files`) and everything the manifest says about them (provenance, codecs,
/// digests, calibration, statistics). Canonical text: see [`canonical_json`].
pub fn fingerprint(manifest: &Value) -> String {
    let mut text = String::new();
    match manifest {
        Value::Object(map) => {
            let mut rest = map.clone();
            rest.remove("fingerprint");
            canonical_json(&Value::Object(rest), &mut text);
        }
        other => canonical_json(other, &mut text),
    }
    sha256_hex(text.as_bytes())
}

/// Appends the canonical JSON text of `v` to `out`: no whitespace, object members in
/// ascending bytewise order of their keys, strings escaped as serde_json escapes them,
/// numbers as serde_json prints them (integers in decimal, floats in the shortest form
/// that parses back to the same f64).
pub fn canonical_json(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                if let Some(x) = map.get(k) {
                    canonical_json(x, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(x, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// `(bpw_body, bpw_model)`: stored bits divided by logical elements, over `body` tensors
/// and over all tensors; 0 where there are no elements. Saturating sums: the inputs may
/// come from an untrusted manifest.
pub fn bpw(tensors: &[TensorRecord]) -> (f64, f64) {
    let ratio = |bytes: u64, elems: u64| {
        if elems == 0 {
            0.0
        } else {
            bytes as f64 * 8.0 / elems as f64
        }
    };
    let (mut body, mut all) = ((0u64, 0u64), (0u64, 0u64));
    for t in tensors {
        let e = t.elements().unwrap_or(u64::MAX);
        all = (
            all.0.saturating_add(t.stored_bytes),
            all.1.saturating_add(e),
        );
        if t.role == Role::Body {
            body = (
                body.0.saturating_add(t.stored_bytes),
                body.1.saturating_add(e),
            );
        }
    }
    (ratio(body.0, body.1), ratio(all.0, all.1))
}

/// Reads a bounded JSON file and checks its `format_version` before full parsing, so a
/// newer pack gets the version error rather than a confusing schema error.
pub(crate) fn read_versioned_json<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
) -> crate::Result<T> {
    parse_versioned_json(path, &read_bounded_json(path)?)
}

/// The bytes of a JSON file, refusing files over [`crate::MAX_JSON_BYTES`].
pub(crate) fn read_bounded_json(path: &std::path::Path) -> crate::Result<Vec<u8>> {
    use crate::FormatError;
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(FormatError::io(path))?;
    let size = file.metadata().map_err(FormatError::io(path))?.len();
    if size > crate::MAX_JSON_BYTES {
        return Err(FormatError::TooLarge {
            path: path.into(),
            size,
            cap: crate::MAX_JSON_BYTES,
        });
    }
    let mut bytes = Vec::new();
    // take(): the file may grow between metadata() and read().
    file.take(crate::MAX_JSON_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(FormatError::io(path))?;
    if bytes.len() as u64 > crate::MAX_JSON_BYTES {
        return Err(FormatError::TooLarge {
            path: path.into(),
            size: bytes.len() as u64,
            cap: crate::MAX_JSON_BYTES,
        });
    }
    Ok(bytes)
}

/// Parses JSON bytes after the `format_version` gate (see [`read_versioned_json`]).
pub(crate) fn parse_versioned_json<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    bytes: &[u8],
) -> crate::Result<T> {
    use crate::FormatError;
    #[derive(Deserialize)]
    struct Version {
        format_version: u64,
    }
    let json = |source| FormatError::Json {
        path: path.into(),
        source,
    };
    let v: Version = serde_json::from_slice(bytes).map_err(json)?;
    if v.format_version > FORMAT_VERSION {
        return Err(FormatError::UnsupportedVersion {
            path: path.into(),
            found: v.format_version,
            supported: FORMAT_VERSION,
        });
    }
    serde_json::from_slice(bytes).map_err(json)
}

impl Manifest {
    /// Parses manifest bytes (version gate, then schema). `label` names the source in
    /// errors. Exposed for fuzzing and tools that hold the bytes already.
    pub fn from_json_bytes(label: &std::path::Path, bytes: &[u8]) -> crate::Result<Manifest> {
        parse_versioned_json(label, bytes)
    }
}
