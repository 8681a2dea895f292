//! Test data shared by the encoder tests.

/// Deterministic pseudo-random values in [-1, 1) (xorshift64).
pub(crate) fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
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
