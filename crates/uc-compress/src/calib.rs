//! Calibration windows and the activation statistics gathered from them.

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

/// Calibration settings and data.
#[derive(Debug, Clone)]
pub struct Calibration {
    /// The calibration text as one token stream (the model's tokenizer, no BOS).
    pub tokens: Vec<u32>,
    /// How many windows to draw.
    pub n_seqs: usize,
    /// Tokens per window.
    pub seq_len: usize,
    /// Seed of the window draw.
    pub seed: u64,
    /// Provenance recorded in the manifest (text SHA-256, files...).
    pub provenance: serde_json::Value,
}

/// What the manifest records about calibration.
#[derive(Debug, Clone, Serialize)]
pub struct CalibrationRecord {
    /// Tokens in the calibration stream.
    pub n_tokens: usize,
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

/// SplitMix64: a tiny, fully specified PRNG, so window draws are the same on every
/// platform and every version of every dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), by rejection so there is no modulo bias.
    fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next();
            if x < zone {
                return x % n;
            }
        }
    }
}

impl Calibration {
    /// Draws the windows: `n_seqs` start offsets uniform over the stream.
    /// Returns the ids `(n_seqs, seq_len)` and the record for the manifest.
    pub fn windows(&self) -> Result<(Tensor, CalibrationRecord), String> {
        let (n, l) = (self.n_seqs, self.seq_len);
        if n == 0 || l < 2 {
            return Err(format!(
                "calibration needs >= 1 window of >= 2 tokens (got {n} x {l})"
            ));
        }
        if self.tokens.len() < l {
            return Err(format!(
                "calibration text has {} tokens, fewer than one window of {l}",
                self.tokens.len()
            ));
        }
        let mut rng = SplitMix64(self.seed);
        let span = (self.tokens.len() - l + 1) as u64;
        let starts: Vec<usize> = (0..n).map(|_| rng.below(span) as usize).collect();
        let mut ids = Vec::with_capacity(n * l);
        for &s in &starts {
            ids.extend_from_slice(&self.tokens[s..s + l]);
        }
        let t = Tensor::from_vec(ids, (n, l), &Device::Cpu).map_err(|e| e.to_string())?;
        Ok((
            t,
            CalibrationRecord {
                n_tokens: self.tokens.len(),
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
            tokens: (0..1000).collect(),
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
        assert_eq!(SplitMix64(42).next(), 0xBDD7_3226_2FEB_6E95);
    }

    #[test]
    fn too_short_text_is_an_error() {
        let c = Calibration {
            tokens: vec![1; 5],
            n_seqs: 1,
            seq_len: 10,
            seed: 0,
            provenance: serde_json::Value::Null,
        };
        assert!(c.windows().is_err());
    }
}
