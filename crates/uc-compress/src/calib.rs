//! Calibration windows and the activation statistics gathered from them.

use rayon::prelude::*;
use serde::Serialize;
use uc_format::SplitMix64;
use uc_runtime::kernels::dense::{gemm, Mat};

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
    /// source. Returns the ids `(n_seqs, seq_len)` row-major (window `i` is
    /// `ids[i * seq_len .. (i + 1) * seq_len]`) and the record for the manifest.
    pub fn windows(&self) -> Result<(Vec<u32>, CalibrationRecord), String> {
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
        let multi = k > 1;
        Ok((
            ids,
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
    /// With [`Gram::with_spread`]: how the chunk-by-chunk contributions spread around
    /// their mean, for [`Gram::shrinkage`].
    spread: Option<Spread>,
}

/// Per-chunk moments of a Gram matrix: chunk `k` over `m_k` rows adds `H_k`.
#[derive(Debug, Clone)]
struct Spread {
    /// `(cols, cols)`: sum over chunks of `H_k^2` (elementwise).
    sq: Vec<f64>,
    /// `(cols, cols)`: sum over chunks of `m_k H_k`.
    weighted: Vec<f64>,
    /// Sum of `m_k^2`.
    rows_sq: f64,
    /// Total rows `M`.
    rows: f64,
    /// Chunks `K`.
    chunks: usize,
}

impl Gram {
    /// Zero statistics for inputs of width `cols`.
    pub fn new(cols: usize) -> Self {
        Gram {
            cols,
            h: vec![0.0; cols * cols],
            spread: None,
        }
    }

    /// Like [`Gram::new`], also keeping the chunk-to-chunk spread (two more
    /// `(cols, cols)` arrays) so that [`Gram::shrinkage`] can be estimated.
    pub fn with_spread(cols: usize) -> Self {
        Gram {
            spread: Some(Spread {
                sq: vec![0.0; cols * cols],
                weighted: vec![0.0; cols * cols],
                rows_sq: 0.0,
                rows: 0.0,
                chunks: 0,
            }),
            ..Gram::new(cols)
        }
    }

    /// Adds `x^T x` for `x` of shape `(rows, cols)` row-major: one chunk of
    /// [`Gram::shrinkage`]. The product is f32 GEMMs over the chunk's rows (a few
    /// thousand), accumulated across chunks in f64. Only the tiles on and below the
    /// diagonal are computed and mirrored, so `h` is exactly symmetric. The f32 tiles are
    /// added as they are produced, a batch at a time ([`product_tiles`]): no `(cols,
    /// cols)` f32 product is held (256 MiB at width 8192).
    pub fn add(&mut self, x: &[f32]) {
        let cols = self.cols;
        let m = (x.len() / cols.max(1)) as f64;
        let (h, spread) = (&mut self.h, &mut self.spread);
        // Every entry of `h` gets exactly one term per chunk: the tile's value at or
        // below the diagonal, mirrored above it.
        let mut put = |p: usize, b: f32| {
            let b = f64::from(b);
            h[p] += b;
            if let Some(sp) = spread.as_mut() {
                sp.sq[p] += b * b;
                sp.weighted[p] += m * b;
            }
        };
        product_tiles(x, x, cols, true, |i, j, tile| {
            let nj = TILE.min(cols - j);
            for (r, row) in tile.chunks_exact(nj).enumerate() {
                let gi = i + r;
                for (c, &b) in row.iter().enumerate().take((gi + 1).saturating_sub(j)) {
                    let gj = j + c;
                    put(gi * cols + gj, b);
                    if gj < gi {
                        put(gj * cols + gi, b);
                    }
                }
            }
        });
        if let Some(sp) = self.spread.as_mut() {
            sp.rows += m;
            sp.rows_sq += m * m;
            sp.chunks += 1;
        }
    }

    /// Shrinkage intensity towards the diagonal, in [0, 1], estimated on the
    /// correlation scale (Schafer & Strimmer's target "D": diagonal, unequal variances):
    /// the estimated variance of the off-diagonal correlations relative to their energy,
    /// `delta = sum_{i!=j} Var(r_ij) / sum_{i!=j} r_ij^2`. On the covariance scale
    /// (plain Ledoit-Wolf) the few channels with huge activations own the sums and the
    /// estimate says "trust everything" (0.00-0.11 on SmolLM2; research log).
    /// The variance comes from the spread between chunks (a few windows each) rather
    /// than between tokens, so it measures how much the cross-channel structure changes
    /// from one stretch of text to the next -- tokens of one window are far from
    /// independent. With chunk means `S_k = H_k / m_k` and `S = H / M`:
    /// `Var(S_ij) ~ K/(K-1) sum_k (m_k/M)^2 (S_k,ij - S_ij)^2`, and `r_ij = S_ij /
    /// sqrt(S_ii S_jj)` (the diagonal taken as known). `None` without spread statistics,
    /// with fewer than two chunks, or without off-diagonal energy.
    pub fn shrinkage(&self) -> Option<f64> {
        let sp = self.spread.as_ref()?;
        if sp.chunks < 2 {
            return None;
        }
        let (n, m) = (self.cols, sp.rows);
        let k = sp.chunks as f64;
        let (mut var, mut energy) = (0.0, 0.0);
        for i in 0..n {
            let hii = self.h[i * n + i];
            for j in (0..n).filter(|&j| j != i) {
                let p = i * n + j;
                let scale = hii * self.h[j * n + j];
                if scale <= 0.0 {
                    continue; // a dead channel has no correlations to trust or shrink
                }
                let h = self.h[p];
                // M^2 sum_k (m_k/M)^2 (S_k - S)^2, expanded into the running sums, and
                // M^2 S_ij^2; both over M^2 S_ii S_jj on the correlation scale.
                var += (sp.sq[p] - 2.0 * h * sp.weighted[p] / m + h * h * sp.rows_sq / (m * m))
                    / scale;
                energy += h * h / scale;
            }
        }
        (energy > 0.0).then(|| (k / (k - 1.0) * var / energy).clamp(0.0, 1.0))
    }
}

/// Columns per tile of [`product`].
const TILE: usize = 128;

/// Tiles of [`product_tiles`] computed before they are handed over: their f32 values
/// (64 KiB each) are all it holds.
const BATCH: usize = 256;

/// The tiles of `a^T b (cols, cols)` in f32 for `a`, `b` of shape `(rows, cols)`
/// row-major, handed to `sink(i, j, tile)` (tile: rows `i..`, columns `j..`, at most
/// [`TILE`] x [`TILE`], row-major) in a fixed order: one single-threaded GEMM per
/// (column tile of `a`, column tile of `b`), tiles in parallel within batches of
/// [`BATCH`] (so the bits do not depend on the thread count or the batching). With
/// `sym` (`a == b`), only the tiles on and below the diagonal are computed; the caller
/// mirrors them.
fn product_tiles(
    a: &[f32],
    b: &[f32],
    cols: usize,
    sym: bool,
    mut sink: impl FnMut(usize, usize, &[f32]),
) {
    assert!(
        cols > 0 && a.len().is_multiple_of(cols),
        "Gram: input is not (rows, {cols})"
    );
    let rows = a.len() / cols;
    let tiles: Vec<usize> = (0..cols).step_by(TILE).collect();
    let pairs: Vec<(usize, usize)> = tiles
        .iter()
        .flat_map(|&i| {
            tiles
                .iter()
                .filter(move |&&j| !sym || j <= i)
                .map(move |&j| (i, j))
        })
        .collect();
    for batch in pairs.chunks(BATCH) {
        let blocks: Vec<Vec<f32>> = batch
            .par_iter()
            .map(|&(i, j)| {
                let (mi, nj) = (TILE.min(cols - i), TILE.min(cols - j));
                let mut out = vec![0f32; mi * nj];
                if rows > 0 {
                    // out (mi, nj) = A[:, i..]^T (mi, rows) . B[:, j..] (rows, nj)
                    let lhs = Mat {
                        data: &a[i..],
                        rs: 1,
                        cs: cols,
                    };
                    gemm(
                        mi,
                        nj,
                        rows,
                        lhs,
                        Mat::rows(&b[j..], cols),
                        &mut out,
                        nj,
                        false,
                    );
                }
                out
            })
            .collect();
        for (&(i, j), tile) in batch.iter().zip(&blocks) {
            sink(i, j, tile);
        }
    }
}

/// The cross statistics `C = A^T B` of two inputs seen on the same rows (the quantized
/// and the teacher stream's input of one stage), summed over chunks like [`Gram::add`]
/// (the same f32 tile products, accumulated in f64), held as a faer matrix so that the
/// teacher-target solve can turn it into `C - H` in its own storage
/// ([`crate::target::teacher_targets`]).
pub struct Cross {
    /// `(cols, cols)`: entry `(i, j)` is the sum over rows of `a[., i] b[., j]`.
    pub c: faer::Mat<f64>,
}

impl Cross {
    /// Zero statistics for inputs of width `cols`.
    pub fn new(cols: usize) -> Self {
        Cross {
            c: faer::Mat::zeros(cols, cols),
        }
    }

    /// Adds `a^T b` for `a`, `b` of shape `(rows, cols)` row-major.
    pub fn add(&mut self, a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len(), "Cross::add: operands of different shapes");
        let cols = self.c.ncols();
        let c = &mut self.c;
        product_tiles(a, b, cols, false, |i, j, tile| {
            let nj = TILE.min(cols - j);
            let mi = tile.len() / nj;
            // Column by column: faer stores columns contiguously.
            for cc in 0..nj {
                for r in 0..mi {
                    c[(i + r, j + cc)] += f64::from(tile[r * nj + cc]);
                }
            }
        });
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
        assert_eq!(a, b);
        assert_eq!(a.len(), 5 * 10);
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
        for (i, row) in ids.chunks(10).enumerate() {
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

    /// Rows `(rows, 3)`: channel 0 noise, channel 1 = `c` x channel 0 (+ a little of its
    /// own noise), channel 2 independent noise; the workspace's seeded PRNG.
    fn chunk(rows: usize, c: f32, seed: u64) -> Vec<f32> {
        let mut r = SplitMix64(seed);
        (0..rows)
            .flat_map(|_| {
                let (a, b, e) = (r.sym(), r.sym(), r.sym());
                [a, c * a + 0.1 * b, e]
            })
            .collect()
    }

    #[test]
    fn shrinkage_is_small_for_stable_structure_and_large_for_noise() {
        let shrink = |chunks: &[Vec<f32>]| {
            let mut g = Gram::with_spread(3);
            let mut plain = Gram::new(3);
            for x in chunks {
                g.add(x);
                plain.add(x);
            }
            assert_eq!(g.h, plain.h, "the spread does not change H");
            g.shrinkage().unwrap()
        };
        // Identical chunks: no spread at all.
        let same = vec![chunk(64, 1.0, 3); 4];
        assert_eq!(shrink(&same), 0.0);
        // Channels 0 and 1 coupled the same way in every chunk: the structure is real.
        let stable: Vec<Vec<f32>> = (0..6).map(|k| chunk(256, 1.0, 10 + k)).collect();
        let d_stable = shrink(&stable);
        // The coupling flips sign from chunk to chunk: the mean off-diagonal entries
        // are noise, to be shrunk away.
        let flipping: Vec<Vec<f32>> = (0..6)
            .map(|k| chunk(256, if k % 2 == 0 { 1.0 } else { -1.0 }, 10 + k))
            .collect();
        let d_flip = shrink(&flipping);
        assert!(d_stable < 0.05, "stable {d_stable}");
        assert!(d_flip > 0.9, "flipping {d_flip}");
        // Unequal chunk sizes (a short last chunk) are weighted, not an error.
        let mut uneven = stable.clone();
        uneven.push(chunk(17, 1.0, 99));
        assert!(shrink(&uneven) < 0.05);
        // Loud stable pair (channels 0, 1 x100) beside a quiet flipping pair: on the
        // covariance scale the loud pair would own the sums (delta ~ 0); on the
        // correlation scale the quiet pair's chunk-to-chunk flips count as much as the
        // loud pair's stable coupling: Var(r_34) ~ 1/(K-1) = 0.2 against r_01^2 ~ 1.
        let mixed: Vec<Vec<f32>> = (0..6u64)
            .map(|k| {
                let sign = if k % 2 == 0 { 1.0 } else { -1.0 };
                let loud = chunk(256, 1.0, 10 + k);
                let quiet = chunk(256, sign, 50 + k);
                // rows: the loud triple x100, then the quiet pair's first two channels
                loud.chunks(3)
                    .zip(quiet.chunks(3))
                    .flat_map(|(l, q)| [l[0] * 100.0, l[1] * 100.0, l[2] * 100.0, q[0], q[1]])
                    .collect()
            })
            .collect();
        let mut g = Gram::with_spread(5);
        for x in &mixed {
            g.add(x);
        }
        let d_mixed = g.shrinkage().unwrap();
        assert!((0.15..0.3).contains(&d_mixed), "mixed {d_mixed}");
        // One chunk: nothing to estimate from.
        let mut one = Gram::with_spread(3);
        one.add(&stable[0]);
        assert_eq!(one.shrinkage(), None);
        assert_eq!(Gram::new(3).shrinkage(), None);
    }

    /// The tiled products against a plain f64 reference: every tile shape (a ragged last
    /// tile), the mirrored triangle, and the cross product's asymmetry.
    #[test]
    fn tiled_products_match_a_plain_reference() {
        let (rows, cols) = (37, 300);
        let mut r = SplitMix64(5);
        let a: Vec<f32> = (0..rows * cols).map(|_| r.sym()).collect();
        let b: Vec<f32> = (0..rows * cols).map(|_| r.sym()).collect();
        let reference = |x: &[f32], y: &[f32], i: usize, j: usize| -> f64 {
            (0..rows)
                .map(|t| f64::from(x[t * cols + i]) * f64::from(y[t * cols + j]))
                .sum()
        };
        let mut g = Gram::new(cols);
        g.add(&a);
        let mut c = Cross::new(cols);
        c.add(&a, &b);
        for i in 0..cols {
            for j in 0..cols {
                let p = i * cols + j;
                assert_eq!(g.h[p], g.h[j * cols + i], "H exactly symmetric");
                assert!((g.h[p] - reference(&a, &a, i, j)).abs() < 1e-4, "H {i} {j}");
                assert!(
                    (c.c[(i, j)] - reference(&a, &b, i, j)).abs() < 1e-4,
                    "C {i} {j}"
                );
            }
        }
        assert_ne!(c.c[(0, 1)], c.c[(1, 0)]);
    }
}
