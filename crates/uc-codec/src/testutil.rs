//! Test data shared by the encoder tests.

/// Deterministic pseudo-random values in [-1, 1) (the workspace's SplitMix64).
pub(crate) fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut r = uc_format::SplitMix64(seed);
    (0..n).map(|_| r.sym()).collect()
}

/// `tr((a - b) H (a - b)^T)` for `a`, `b` (rows x cols) and `h` (cols x cols): the output
/// error of using `b` for `a` on inputs with Gram matrix `h`.
pub(crate) fn h_trace(a: &[f32], b: &[f32], cols: usize, h: &[f64]) -> f64 {
    let mut total = 0.0;
    for (ra, rb) in a.chunks(cols).zip(b.chunks(cols)) {
        let d: Vec<f64> = ra.iter().zip(rb).map(|(x, y)| f64::from(x - y)).collect();
        for p in 0..cols {
            for q in 0..cols {
                total += d[p] * h[p * cols + q] * d[q];
            }
        }
    }
    total
}
