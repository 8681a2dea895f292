//! Calibration windows and the activation statistics gathered from them.

use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use uc_format::SplitMix64;

/// One calibration source: a genre of text as one token stream (the model's tokenizer,
/// no BOS).
#[derive(Debug, Clone)]
pub struct Source {
    /// Name recorded in the manifest (e.g. the source's directory name).
    pub name: String,
    /// The token stream.
    pub tokens: Vec<u32>,
}

/// How [`Source::from_files`] tokenizes, as recorded in the manifest.
pub const TOKENIZATION: &str = "each file alone, no BOS; files joined by the tokens of \"\\n\\n\"";

impl Source {
    /// The token stream of `files` (UTF-8 text) with `tokenizer`, and what the manifest
    /// records of it (name, file names, SHA-256 of the files joined by "\n\n", tokens).
    ///
    /// Each file is tokenized alone and consecutive files are separated by the tokens of
    /// a blank line ([`TOKENIZATION`]): the tokenizer never holds more than one file
    /// (the SOTU calibration split as one 11 MB string took ~870 MB inside it).
    pub fn from_files(
        name: String,
        files: &[std::path::PathBuf],
        tokenizer: &uc_model::tokenizer::Tokenizer,
    ) -> crate::Result<(Source, serde_json::Value)> {
        use sha2::{Digest, Sha256};
        let sep = tokenizer.encode("\n\n")?;
        let mut tokens = Vec::new();
        let mut sha = Sha256::new();
        for (i, f) in files.iter().enumerate() {
            let bytes = std::fs::read(f).map_err(|source| crate::CompressError::Io {
                path: f.clone(),
                source,
            })?;
            let text = String::from_utf8(bytes).map_err(|e| {
                crate::CompressError::Settings(format!("{}: not UTF-8 ({e})", f.display()))
            })?;
            if i > 0 {
                tokens.extend_from_slice(&sep);
                sha.update(b"\n\n");
            }
            tokens.extend(tokenizer.encode(&text)?);
            sha.update(text.as_bytes());
        }
        let record = serde_json::json!({
            "name": name,
            "files": files.iter().filter_map(|f| f.file_name()).map(|n| n.to_string_lossy()).collect::<Vec<_>>(),
            "sha256": hex::encode(sha.finalize()),
            "n_tokens": tokens.len(),
        });
        Ok((Source { name, tokens }, record))
    }
}

/// Calibration settings and data.
///
/// Windows are drawn from the sources in turn (window `i` from source `i mod k`), each
/// start uniform over its source, so every genre gets its share of windows whatever its
/// length: a large code base does not drown a few essays. With one source this is the
/// plain uniform draw over one stream.
#[derive(Debug, Clone)]
pub struct Calibration {
    /// The sources, in the order windows are drawn from them (at least one).
    pub sources: Vec<Source>,
    /// How many windows to draw.
    pub n_seqs: usize,
    /// Tokens per window.
    pub seq_len: usize,
    /// Seed of the window draw.
    pub seed: u64,
    /// Provenance recorded in the manifest (text SHA-256, files...).
    pub provenance: serde_json::Value,
}

/// What the manifest records about one source.
#[derive(Debug, Clone, Serialize)]
pub struct SourceRecord {
    /// Source name.
    pub name: String,
    /// Tokens in its stream.
    pub n_tokens: usize,
}

/// What the manifest records about calibration.
#[derive(Debug, Clone, Serialize)]
pub struct CalibrationRecord {
    /// Tokens in all calibration streams.
    pub n_tokens: usize,
    /// With more than one source: each source's name and length.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceRecord>,
    /// With more than one source: the source of every window, in draw order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub window_sources: Vec<usize>,
    /// Windows drawn.
    pub n_seqs: usize,
    /// Tokens per window.
    pub seq_len: usize,
    /// Seed of the draw.
    pub seed: u64,
    /// Start offset of every window, in draw order.
    pub starts: Vec<usize>,
    /// Caller-supplied provenance (text hash, files).
    pub text: serde_json::Value,
}

impl Calibration {
    /// Draws the windows: window `i` from source `i mod k`, its start uniform over that
    /// source. Returns the ids `(n_seqs, seq_len)` and the record for the manifest.
    pub fn windows(&self) -> Result<(Tensor, CalibrationRecord), String> {
        let (n, l) = (self.n_seqs, self.seq_len);
        if n == 0 || l < 2 {
            return Err(format!(
                "calibration needs >= 1 window of >= 2 tokens (got {n} x {l})"
            ));
        }
        if self.sources.is_empty() {
            return Err("calibration needs at least one text source".into());
        }
        for s in &self.sources {
            if s.tokens.len() < l {
                return Err(format!(
                    "calibration source {:?} has {} tokens, fewer than one window of {l}",
                    s.name,
                    s.tokens.len()
                ));
            }
        }
        let k = self.sources.len();
        let mut rng = SplitMix64(self.seed);
        let window_sources: Vec<usize> = (0..n).map(|i| i % k).collect();
        let starts: Vec<usize> = window_sources
            .iter()
            .map(|&s| rng.below((self.sources[s].tokens.len() - l + 1) as u64) as usize)
            .collect();
        let mut ids = Vec::with_capacity(n * l);
        for (&src, &s) in window_sources.iter().zip(&starts) {
            ids.extend_from_slice(&self.sources[src].tokens[s..s + l]);
        }
        let t = Tensor::from_vec(ids, (n, l), &Device::Cpu).map_err(|e| e.to_string())?;
        let multi = k > 1;
        Ok((
            t,
            CalibrationRecord {
                n_tokens: self.sources.iter().map(|s| s.tokens.len()).sum(),
                sources: if multi {
                    self.sources
                        .iter()
                        .map(|s| SourceRecord {
                            name: s.name.clone(),
                            n_tokens: s.tokens.len(),
                        })
                        .collect()
                } else {
                    Vec::new()
                },
                window_sources: if multi { window_sources } else { Vec::new() },
                n_seqs: n,
                seq_len: l,
                seed: self.seed,
                starts,
                text: self.provenance.clone(),
            },
        ))
    }
}

/// Running `X^T X` of one linear input, in f64.
#[derive(Debug, Clone)]
pub struct Gram {
    /// Width of the input.
    pub cols: usize,
    /// `(cols, cols)` row-major.
    pub h: Vec<f64>,
}

impl Gram {
    /// Zero statistics for inputs of width `cols`.
    pub fn new(cols: usize) -> Self {
        Gram {
            cols,
            h: vec![0.0; cols * cols],
        }
    }

    /// Adds `x^T x` for `x` of shape `(rows, cols)`; the product is one f32 matmul per
    /// chunk (summing at most a few thousand rows), accumulated across chunks in f64.
    pub fn add(&mut self, x: &Tensor) -> candle_core::Result<()> {
        self.add_cross(x, x)
    }

    /// Adds `a^T b` for `a`, `b` of shape `(rows, cols)` (the cross statistics of two
    /// inputs seen on the same rows), like [`Gram::add`].
    pub fn add_cross(&mut self, a: &Tensor, b: &Tensor) -> candle_core::Result<()> {
        let atb = a.t()?.matmul(b)?.to_dtype(DType::F32)?;
        let v = atb.flatten_all()?.to_vec1::<f32>()?;
        for (a, b) in self.h.iter_mut().zip(v) {
            *a += f64::from(b);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_draw_is_a_pure_function_of_the_seed() {
        let c = Calibration {
            sources: vec![source("a", (0..1000).collect())],
            n_seqs: 5,
            seq_len: 10,
            seed: 42,
            provenance: serde_json::Value::Null,
        };
        let (a, ra) = c.windows().unwrap();
        let (b, rb) = c.windows().unwrap();
        assert_eq!(ra.starts, rb.starts);
        assert_eq!(a.to_vec2::<u32>().unwrap(), b.to_vec2::<u32>().unwrap());
        let other = Calibration {
            seed: 43,
            ..c.clone()
        }
        .windows()
        .unwrap()
        .1;
        assert_ne!(ra.starts, other.starts);
        // SplitMix64 is specified: the first draw of seed 42 is fixed forever.
        assert_eq!(SplitMix64(42).next_u64(), 0xBDD7_3226_2FEB_6E95);
    }

    fn source(name: &str, tokens: Vec<u32>) -> Source {
        Source {
            name: name.into(),
            tokens,
        }
    }

    #[test]
    fn windows_take_turns_over_the_sources() {
        // Source b is 100x longer than a, yet gets no more windows.
        let c = Calibration {
            sources: vec![
                source("a", (0..50).collect()),
                source("b", (1000..6000).collect()),
            ],
            n_seqs: 6,
            seq_len: 10,
            seed: 7,
            provenance: serde_json::Value::Null,
        };
        let (ids, rec) = c.windows().unwrap();
        assert_eq!(rec.window_sources, vec![0, 1, 0, 1, 0, 1]);
        assert_eq!(rec.n_tokens, 5050);
        assert_eq!(rec.sources[1].n_tokens, 5000);
        for (i, row) in ids.to_vec2::<u32>().unwrap().iter().enumerate() {
            let from_a = row[0] < 1000;
            assert_eq!(from_a, i % 2 == 0, "window {i}: {row:?}");
            assert!(
                row.windows(2).all(|w| w[1] == w[0] + 1),
                "contiguous: {row:?}"
            );
        }
    }

    #[test]
    fn one_source_records_no_source_lists() {
        let c = Calibration {
            sources: vec![source("a", (0..100).collect())],
            n_seqs: 2,
            seq_len: 10,
            seed: 0,
            provenance: serde_json::Value::Null,
        };
        let v = serde_json::to_value(c.windows().unwrap().1).unwrap();
        assert!(v.get("sources").is_none() && v.get("window_sources").is_none());
    }

    #[test]
    fn a_source_shorter_than_a_window_is_named_in_the_error() {
        let c = Calibration {
            sources: vec![source("long", vec![1; 100]), source("tiny", vec![1; 3])],
            n_seqs: 2,
            seq_len: 10,
            seed: 0,
            provenance: serde_json::Value::Null,
        };
        let e = c.windows().unwrap_err();
        assert!(e.contains("\"tiny\""), "{e}");
    }

    #[test]
    fn too_short_text_is_an_error() {
        let c = Calibration {
            sources: vec![source("a", vec![1; 5])],
            n_seqs: 1,
            seq_len: 10,
            seed: 0,
            provenance: serde_json::Value::Null,
        };
        assert!(c.windows().is_err());
    }
}
