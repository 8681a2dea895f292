//! Randomized block-Hadamard rotation of a linear's input dimension (incoherence
//! processing, as in QuIP# / QuaRot, in its cheapest exact form).
//!
//! For a weight `W (rows, cols)` and block size `b` (one of [`crate::ROTATIONS`],
//! dividing `cols`), `R = (I_{cols/b} (x) H_b / sqrt(b)) diag(s)`: a sign per input column
//! (`s`, fixed by `cols` alone, [`signs`]) then an orthonormal Walsh-Hadamard transform
//! of every block of `b` consecutive columns. A rotated codec stores `W_r = W R^T` and the
//! layer computes `y = W x = W_r (R x)`: the runtime rotates the input (`b log b` adds per
//! block, no matrix) and multiplies by the stored weight; the encoder sees `W_r` and the
//! Gram matrix `R H R^T`. Rotating spreads a row's outliers over its block, so each scale
//! group holds near-Gaussian values and the grid wastes fewer levels on rare extremes.
//!
//! Exactness (docs/format.md section 3b): [`rotate`] and [`unrotate`] are specified as
//! this scalar f32 code -- sign flips (exact), the butterflies in the fixed order below,
//! then a multiplication by `1 / sqrt(b)`, a power of two for the supported sizes (exact)
//! -- so every platform gets the same bits. Since `H_b` is symmetric, rotating a row
//! vector (`v R^T`) and an activation (`R x`) are the same operation.

use uc_format::rng::SplitMix64;

/// Seed of the sign stream (ASCII "ucrotate"); part of the format, never change it.
const SIGN_SEED: u64 = 0x7563_726f_7461_7465;

/// The signs `s` for inputs of width `cols`: bit 63 of successive SplitMix64 outputs
/// (seed [`SIGN_SEED`] xor `cols`), set = -1. Every rotated linear with `cols` inputs
/// shares them, so layers reading the same activations rotate them once.
pub fn signs(cols: usize) -> Vec<f32> {
    let mut r = SplitMix64(SIGN_SEED ^ cols as u64);
    (0..cols)
        .map(|_| if r.next_u64() >> 63 == 1 { -1.0 } else { 1.0 })
        .collect()
}

/// In-place unnormalised Walsh-Hadamard transform of `v` (length a power of two):
/// butterflies of span 1, 2, 4, ..., each pass left to right.
fn fwht<T: Copy + std::ops::Add<Output = T> + std::ops::Sub<Output = T>>(v: &mut [T]) {
    let n = v.len();
    let mut h = 1;
    while h < n {
        // Written as slices so the compiler vectorizes the wide spans; every butterfly is
        // independent within a span, so the order of evaluation does not change any bit.
        for pair in v.chunks_exact_mut(2 * h) {
            let (lo, hi) = pair.split_at_mut(h);
            for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                let (x, y) = (*a, *b);
                *a = x + y;
                *b = x - y;
            }
        }
        h *= 2;
    }
}

/// `1 / sqrt(b)` for a power-of-4 block (exact).
fn norm(b: usize) -> f32 {
    1.0 / (1u64 << (b.trailing_zeros() / 2)) as f32
}

/// Rotates every row of `x (n, cols)` in place: `row <- (row * s) H_b / sqrt(b)` per
/// block. Applied to activations this is `R x`; to weight rows, `W R^T`.
pub fn rotate(x: &mut [f32], cols: usize, b: usize, s: &[f32]) {
    let k = norm(b);
    for row in x.chunks_exact_mut(cols) {
        for (blk, sb) in row.chunks_exact_mut(b).zip(s.chunks_exact(b)) {
            blk.iter_mut().zip(sb).for_each(|(v, g)| *v *= g);
            fwht(blk);
            blk.iter_mut().for_each(|v| *v *= k);
        }
    }
}

/// Undoes [`rotate`] on every row of `w (rows, cols)` in place: `row <- (row H_b /
/// sqrt(b)) * s`, turning a stored `W_r` back into the model's `W`.
pub fn unrotate(w: &mut [f32], cols: usize, b: usize, s: &[f32]) {
    let k = norm(b);
    for row in w.chunks_exact_mut(cols) {
        for (blk, sb) in row.chunks_exact_mut(b).zip(s.chunks_exact(b)) {
            fwht(blk);
            blk.iter_mut().zip(sb).for_each(|(v, g)| *v *= k * g);
        }
    }
}

/// `h <- R H R^T` for a Gram matrix `h (cols, cols)` (f64, encoder side only), in `h`'s
/// own storage: rows rotated, the matrix transposed in place, the (former) columns
/// rotated, transposed back. No second `cols x cols` buffer: at the 8192-wide down_proj
/// input of a 1B model a copy is 512 MiB, and the encoder holds the rotated matrix
/// through error feedback while the unrotated one is no longer needed.
pub fn rotate_gram_in_place(h: &mut [f64], cols: usize, b: usize) {
    let s = signs(cols);
    let k = 1.0 / (b as f64).sqrt();
    let rot_rows = |m: &mut [f64]| {
        for row in m.chunks_exact_mut(cols) {
            for (blk, sb) in row.chunks_exact_mut(b).zip(s.chunks_exact(b)) {
                blk.iter_mut()
                    .zip(sb)
                    .for_each(|(v, g)| *v *= f64::from(*g));
                fwht(blk);
                blk.iter_mut().for_each(|v| *v *= k);
            }
        }
    };
    let transpose = |m: &mut [f64]| {
        for i in 0..cols {
            for j in i + 1..cols {
                m.swap(i * cols + j, j * cols + i);
            }
        }
    };
    rot_rows(h);
    transpose(h);
    rot_rows(h);
    transpose(h);
}

/// The rotation block for a linear of `cols` inputs: the largest of [`crate::ROTATIONS`]
/// that divides `cols` and is at most `max`, or 0.
pub fn block_for(cols: usize, max: u32) -> u32 {
    crate::ROTATIONS
        .iter()
        .rev()
        .copied()
        .find(|&b| b <= max && cols.is_multiple_of(b as usize))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut r = SplitMix64(seed);
        (0..n)
            .map(|_| (r.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            .collect()
    }

    #[test]
    fn unrotate_inverts_rotate_and_preserves_products() {
        let (rows, cols, b) = (3, 192, 64);
        let s = signs(cols);
        let w = data(rows * cols, 1);
        let x = data(cols, 2);
        let (mut wr, mut xr) = (w.clone(), x.clone());
        rotate(&mut wr, cols, b, &s);
        rotate(&mut xr, cols, b, &s);
        for r in 0..rows {
            let y: f64 = (0..cols)
                .map(|j| f64::from(w[r * cols + j]) * f64::from(x[j]))
                .sum();
            let yr: f64 = (0..cols)
                .map(|j| f64::from(wr[r * cols + j]) * f64::from(xr[j]))
                .sum();
            assert!((y - yr).abs() < 1e-5, "row {r}: {y} vs {yr}");
        }
        let mut back = wr.clone();
        unrotate(&mut back, cols, b, &s);
        let worst = w
            .iter()
            .zip(&back)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-6, "{worst}");
        assert_ne!(w, wr, "the rotation moved something");
    }

    #[test]
    fn gram_rotation_matches_rotated_activations() {
        let (n, cols, b) = (40, 64, 16);
        let s = signs(cols);
        let x = data(n * cols, 3);
        let gram = |x: &[f32]| -> Vec<f64> {
            let mut h = vec![0f64; cols * cols];
            for row in x.chunks_exact(cols) {
                for i in 0..cols {
                    for j in 0..cols {
                        h[i * cols + j] += f64::from(row[i]) * f64::from(row[j]);
                    }
                }
            }
            h
        };
        let mut xr = x.clone();
        rotate(&mut xr, cols, b, &s);
        let (want, mut got) = (gram(&xr), gram(&x));
        rotate_gram_in_place(&mut got, cols, b);
        let worst = want
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max);
        assert!(worst < 1e-4, "{worst}");
    }

    #[test]
    fn rotated_codec_names_round_trip_and_bad_blocks_are_refused() {
        use crate::{CodecError, CodecSpec};
        let s = CodecSpec::parse("q4g64h64-e8").unwrap();
        assert_eq!((s.bits, s.group, s.rank, s.rot), (4, 64, 0, 64));
        assert_eq!(CodecSpec::parse("q5g32r2h16").unwrap().name(), "q5g32r2h16");
        assert!(
            CodecSpec::parse("q4g64h32").is_err(),
            "32 is not a power of 4"
        );
        assert!(CodecSpec::parse("q4g64h0").is_err(), "non-canonical");
        assert!(matches!(
            s.layout(8, 96),
            Err(CodecError::BadRotation {
                rot: 64,
                cols: 96,
                ..
            })
        ));
        assert!(s.layout(8, 128).is_ok());
        let r = CodecSpec::from_record(&s.to_record()).unwrap();
        assert_eq!(r, s);
    }

    #[test]
    fn blocks_are_powers_of_four_dividing_the_width() {
        assert_eq!(block_for(576, 256), 64);
        assert_eq!(block_for(1536, 256), 256);
        assert_eq!(block_for(1536, 64), 64);
        assert_eq!(block_for(8, 256), 0);
        assert_eq!(norm(64), 0.125);
        assert_eq!(norm(256), 0.0625);
    }
}
