//! Vector reconstruction kernels, and the encoder's error-feedback update
//! ([`sub_scaled`]). The only `unsafe` of this crate lives here.
//!
//! Each kernel computes, per chunk of consecutive output columns j, exactly the
//! operations of [`Prepared::element`] on every lane: one multiply for the base, then for
//! k = 0..r one multiply and one add (separate instructions, never FMA). Chunks are 8
//! or 16 columns; since group sizes are multiples of 16, a chunk never straddles a scale
//! group. Columns past the last whole chunk use the scalar reference.
//!
//! Code unpacking: 8 codes of `bits` bits fill exactly `bits` bytes, so the codes of the
//! chunk starting at column j (a multiple of 8) begin at byte j / 8 * bits of the row.
//! Code k of the chunk sits at bit k*bits: a byte shuffle moves bytes (k*bits/8,
//! k*bits/8 + 1) into 32-bit lane k, a per-lane shift by k*bits % 8 and a mask finish it.

use crate::recon::{Kernel, Prepared};

/// Runtime check that the CPU supports `k`.
pub(crate) fn available(k: Kernel) -> bool {
    match k {
        Kernel::Scalar => true,
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => is_x86_feature_detected!("avx2"),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => {
            is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
        }
        #[cfg(target_arch = "aarch64")]
        Kernel::Neon => std::arch::is_aarch64_feature_detected!("neon"),
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

/// Reconstructs row `i` into `out` (len == cols) with kernel `k`.
pub(crate) fn row(k: Kernel, p: &Prepared, i: usize, out: &mut [f32]) {
    assert_eq!(out.len(), p.cols, "row buffer must hold one row");
    match k {
        // SAFETY (all arms): `Reconstructor::new` only keeps a SIMD kernel after
        // `available` confirmed the CPU features it is compiled for.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 if available(k) => unsafe { x86::row_avx2(p, i, out) },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 if available(k) => unsafe { x86::row_avx512(p, i, out) },
        #[cfg(target_arch = "aarch64")]
        Kernel::Neon if available(k) => unsafe { neon::row_neon(p, i, out) },
        _ => out
            .iter_mut()
            .enumerate()
            .for_each(|(j, o)| *o = p.element(i, j)),
    }
}

#[cfg(target_arch = "x86_64")]
/// Per-lane shuffle control and shift for `lanes` codes of `bits` bits taken from a
/// `window`-byte little-endian word replicated in every 128-bit lane. Shared with the
/// runtime's fused kernels, which unpack codes the same way.
pub fn unpack_tables<const LANES: usize, const BYTES: usize>(
    bits: usize,
    window: usize,
) -> ([u8; BYTES], [u32; LANES]) {
    let mut ctrl = [0x80u8; BYTES];
    let mut shift = [0u32; LANES];
    for k in 0..LANES {
        let lo = k * bits / 8;
        // Shuffles index within a 128-bit lane; every lane holds the whole window
        // (AVX2: the 8-byte word twice; AVX-512: the 16 bytes), so lane k's byte
        // offsets are the same numbers in whichever 128-bit lane it falls.
        ctrl[4 * k] = lo as u8;
        ctrl[4 * k + 1] = if lo + 1 < window {
            (lo + 1) as u8
        } else {
            0x80
        };
        shift[k] = (k * bits % 8) as u32;
    }
    (ctrl, shift)
}

#[cfg(target_arch = "x86_64")]
/// Copies `N` bytes at `off` of `src`, zero-filling past its end (the last row's last
/// chunk may be shorter than the vector window).
#[inline(always)]
fn window<const N: usize>(src: &[u8], off: usize) -> [u8; N] {
    if let Some(w) = src
        .get(off..off + N)
        .and_then(|s| <[u8; N]>::try_from(s).ok())
    {
        return w;
    }
    let mut buf = [0u8; N];
    buf.iter_mut()
        .zip(src.get(off..).unwrap_or_default())
        .for_each(|(d, s)| *d = *s);
    buf
}

/// `x[j] -= a * u[j]` for every `j` (`x.len() == u.len()`): error feedback's update of
/// the columns not yet visited, the encoder's hottest loop. One multiply, then one
/// subtract per element, never fused: every ISA gives [`sub_scaled_scalar`]'s bits, so
/// the codes do not depend on the machine. The crate is built for baseline x86-64, where
/// the compiler's own vectorisation of this loop stops at SSE's 4 lanes.
pub(crate) fn sub_scaled(x: &mut [f32], a: f32, u: &[f32]) {
    assert_eq!(x.len(), u.len(), "sub_scaled: lengths differ");
    // SAFETY (both arms): the features the kernels are compiled for were detected.
    #[cfg(target_arch = "x86_64")]
    if available(Kernel::Avx512) {
        return unsafe { x86::sub_scaled_avx512(x, a, u) };
    } else if available(Kernel::Avx2) {
        return unsafe { x86::sub_scaled_avx2(x, a, u) };
    }
    sub_scaled_scalar(x, a, u);
}

/// The reference of [`sub_scaled`].
pub(crate) fn sub_scaled_scalar(x: &mut [f32], a: f32, u: &[f32]) {
    for (xj, &uj) in x.iter_mut().zip(u) {
        *xj -= a * uj;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{unpack_tables, window, Prepared};
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX-512 F; `x.len() == u.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn sub_scaled_avx512(x: &mut [f32], a: f32, u: &[f32]) {
        let av = _mm512_set1_ps(a);
        let mut j = 0;
        while j + 16 <= x.len() {
            let p = x[j..j + 16].as_mut_ptr();
            let prod = _mm512_mul_ps(av, _mm512_loadu_ps(u[j..j + 16].as_ptr()));
            _mm512_storeu_ps(p, _mm512_sub_ps(_mm512_loadu_ps(p), prod));
            j += 16;
        }
        super::sub_scaled_scalar(&mut x[j..], a, &u[j..]);
    }

    /// # Safety
    /// The CPU must support AVX2; `x.len() == u.len()`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn sub_scaled_avx2(x: &mut [f32], a: f32, u: &[f32]) {
        let av = _mm256_set1_ps(a);
        let mut j = 0;
        while j + 8 <= x.len() {
            let p = x[j..j + 8].as_mut_ptr();
            let prod = _mm256_mul_ps(av, _mm256_loadu_ps(u[j..j + 8].as_ptr()));
            _mm256_storeu_ps(p, _mm256_sub_ps(_mm256_loadu_ps(p), prod));
            j += 8;
        }
        super::sub_scaled_scalar(&mut x[j..], a, &u[j..]);
    }

    /// # Safety
    /// The CPU must support AVX2; `out.len() == p.cols` and `i < rows`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn row_avx2(p: &Prepared, i: usize, out: &mut [f32]) {
        let (ctrl, shift) = unpack_tables::<8, 32>(p.bits, 8);
        let ctrl = _mm256_loadu_si256(ctrl.as_ptr().cast());
        let shift = _mm256_loadu_si256(shift.as_ptr().cast());
        let mask = _mm256_set1_epi32((1i32 << p.bits) - 1);
        let cb8 = _mm256_loadu_ps(p.codebook.as_ptr());
        let row_off = i * p.row_bytes;
        let mut j = 0;
        while j + 8 <= p.cols {
            let word = u64::from_le_bytes(window::<8>(&p.qt.codes, row_off + j / 8 * p.bits));
            let v = _mm256_set1_epi64x(word as i64);
            let idx =
                _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(v, ctrl), shift), mask);
            // Indices are < 2^bits <= 256 and the codebook is padded to 256 entries.
            let q = if p.bits <= 3 {
                _mm256_permutevar8x32_ps(cb8, idx)
            } else {
                _mm256_i32gather_ps::<4>(p.codebook.as_ptr(), idx)
            };
            let mut w = _mm256_mul_ps(_mm256_set1_ps(p.scales[i * p.n_groups + j / p.group]), q);
            if p.rank > 0 {
                let mut acc = _mm256_setzero_ps();
                for k in 0..p.rank {
                    let b = _mm256_loadu_ps(p.b[k * p.cols + j..k * p.cols + j + 8].as_ptr());
                    acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_set1_ps(p.a[i * p.rank + k]), b));
                }
                w = _mm256_add_ps(w, acc);
            }
            _mm256_storeu_ps(out[j..j + 8].as_mut_ptr(), w);
            j += 8;
        }
        for (jj, o) in out.iter_mut().enumerate().skip(j) {
            *o = p.element(i, jj);
        }
    }

    /// # Safety
    /// The CPU must support AVX-512 F and BW; `out.len() == p.cols` and `i < rows`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn row_avx512(p: &Prepared, i: usize, out: &mut [f32]) {
        let (ctrl, shift) = unpack_tables::<16, 64>(p.bits, 16);
        let ctrl = _mm512_loadu_si512(ctrl.as_ptr().cast());
        let shift = _mm512_loadu_si512(shift.as_ptr().cast());
        let mask = _mm512_set1_epi32((1i32 << p.bits) - 1);
        let cb_lo = _mm512_loadu_ps(p.codebook.as_ptr());
        let cb_hi = _mm512_loadu_ps(p.codebook[16..32].as_ptr());
        let row_off = i * p.row_bytes;
        let mut j = 0;
        while j + 16 <= p.cols {
            let bytes = window::<16>(&p.qt.codes, row_off + j / 8 * p.bits);
            let v = _mm512_broadcast_i32x4(_mm_loadu_si128(bytes.as_ptr().cast()));
            let idx =
                _mm512_and_si512(_mm512_srlv_epi32(_mm512_shuffle_epi8(v, ctrl), shift), mask);
            // Indices are < 2^bits <= 256 and the codebook is padded to 256 entries.
            let q = match p.bits {
                0..=4 => _mm512_permutexvar_ps(idx, cb_lo),
                5 => _mm512_permutex2var_ps(cb_lo, idx, cb_hi),
                _ => _mm512_i32gather_ps::<4>(idx, p.codebook.as_ptr()),
            };
            let mut w = _mm512_mul_ps(_mm512_set1_ps(p.scales[i * p.n_groups + j / p.group]), q);
            if p.rank > 0 {
                let mut acc = _mm512_setzero_ps();
                for k in 0..p.rank {
                    let b = _mm512_loadu_ps(p.b[k * p.cols + j..k * p.cols + j + 16].as_ptr());
                    acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_set1_ps(p.a[i * p.rank + k]), b));
                }
                w = _mm512_add_ps(w, acc);
            }
            _mm512_storeu_ps(out[j..j + 16].as_mut_ptr(), w);
            j += 16;
        }
        for (jj, o) in out.iter_mut().enumerate().skip(j) {
            *o = p.element(i, jj);
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::Prepared;
    use crate::tensor::code_at;
    use std::arch::aarch64::*;

    /// # Safety
    /// The CPU must support NEON; `out.len() == p.cols` and `i < rows`. (Compile-checked
    /// only: no AArch64 machine in CI.) AArch64 NEON honours FPCR.FZ, which Linux leaves
    /// clear, so subnormals are preserved as the specification requires.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn row_neon(p: &Prepared, i: usize, out: &mut [f32]) {
        let row = &p.qt.codes[i * p.row_bytes..(i + 1) * p.row_bytes];
        let mut j = 0;
        while j + 4 <= p.cols {
            let q: [f32; 4] = std::array::from_fn(|t| {
                p.codebook[usize::from(code_at(row, j + t, p.bits as u32))]
            });
            let mut w = vmulq_f32(
                vdupq_n_f32(p.scales[i * p.n_groups + j / p.group]),
                vld1q_f32(q.as_ptr()),
            );
            if p.rank > 0 {
                let mut acc = vdupq_n_f32(0.0);
                for k in 0..p.rank {
                    let b = vld1q_f32(p.b[k * p.cols + j..k * p.cols + j + 4].as_ptr());
                    acc = vaddq_f32(acc, vmulq_f32(vdupq_n_f32(p.a[i * p.rank + k]), b));
                }
                w = vaddq_f32(w, acc);
            }
            vst1q_f32(out[j..j + 4].as_mut_ptr(), w);
            j += 4;
        }
        for (jj, o) in out.iter_mut().enumerate().skip(j) {
            *o = p.element(i, jj);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel of `sub_scaled` gives the reference's bits, for lengths around the
    /// vector widths and values whose products round (and subnormals).
    #[test]
    fn sub_scaled_kernels_match_the_reference_bit_for_bit() {
        let mut rng = uc_format::SplitMix64(7);
        let mut val = || rng.sym();
        for len in [0, 1, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 577] {
            let u: Vec<f32> = (0..len).map(|_| val() * 3.7).collect();
            let mut x0: Vec<f32> = (0..len).map(|_| val()).collect();
            if len > 2 {
                x0[1] = 1e-39; // subnormal
            }
            let a = val() * 0.37;
            let mut want = x0.clone();
            sub_scaled_scalar(&mut want, a, &u);
            let mut got = x0.clone();
            sub_scaled(&mut got, a, &u);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "dispatch, len {len}");
            #[cfg(target_arch = "x86_64")]
            for (k, f) in [
                (
                    Kernel::Avx2,
                    x86::sub_scaled_avx2 as unsafe fn(&mut [f32], f32, &[f32]),
                ),
                (Kernel::Avx512, x86::sub_scaled_avx512),
            ] {
                if available(k) {
                    let mut got = x0.clone();
                    // SAFETY: the kernel's features were detected just above.
                    unsafe { f(&mut got, a, &u) };
                    assert_eq!(bits(&got), bits(&want), "{k:?}, len {len}");
                }
            }
        }
    }
}
