//! Deterministic test data shared by the codec tests (SplitMix64, no RNG dependency).
#![allow(dead_code)]

use half::bf16;
use uc_codec::*;
use uc_format::*;

/// Test data from the workspace's one seeded PRNG.
pub use uc_format::SplitMix64 as Prng;

pub fn gaussian(rng: &mut Prng, n: usize, sd: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * sd).collect()
}

/// A random, valid QuantTensor with a chosen codebook and scales generator; `rank`
/// > 0 adds an overlay whose values come from `ov`.
pub fn random_qt(
    rng: &mut Prng,
    rows: usize,
    cols: usize,
    spec: CodecSpec,
    mut cb: impl FnMut(&mut Prng, usize) -> f32,
    mut scale: impl FnMut(&mut Prng) -> f32,
    mut ov: impl FnMut(&mut Prng) -> f32,
) -> QuantTensor {
    let l = spec.layout(rows, cols).unwrap();
    let mut codebook: Vec<f32> = (0..l.codebook).map(|i| cb(rng, i)).collect();
    codebook.sort_by(f32::total_cmp);
    let to_bits = |s: f32| uc_codec::scale_from_f32(s, spec.scale_dtype);
    let scales = (0..l.scales).map(|_| to_bits(scale(rng))).collect();
    let idx: Vec<u8> = (0..rows * cols)
        .map(|_| rng.below(l.codebook as u64) as u8)
        .collect();
    let codes = pack_codes(&idx, rows, cols, spec.bits.into());
    let r = spec.rank as usize;
    let overlay = (r > 0).then(|| Overlay {
        rank: r,
        a: (0..rows * r)
            .map(|_| bf16::from_f32(ov(rng)).to_bits())
            .collect(),
        b: (0..r * cols)
            .map(|_| bf16::from_f32(ov(rng)).to_bits())
            .collect(),
    });
    QuantTensor {
        rows,
        cols,
        spec,
        codebook,
        scales,
        codes,
        overlay,
    }
}

/// A random QuantTensor with ordinary values.
pub fn plain_qt(rng: &mut Prng, rows: usize, cols: usize, spec: CodecSpec) -> QuantTensor {
    random_qt(
        rng,
        rows,
        cols,
        spec,
        |r, _| r.normal(),
        |r| r.unit() * 0.1,
        |r| r.normal() * 0.01,
    )
}

pub fn source() -> SourceInfo {
    SourceInfo {
        architecture: "llama".into(),
        config: serde_json::json!({}),
        files: vec![],
    }
}

pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum();
    let den: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum();
    (num / den).sqrt()
}

pub fn bits_of(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}
