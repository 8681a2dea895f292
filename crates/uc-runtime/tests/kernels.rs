//! Codec kernels against their references on deterministic random tensors: every bit
//! width, group size, awkward column counts (not a multiple of 16 or of the group), with
//! and without overlay, on every ISA this CPU has.

use half::f16;
use uc_codec::{pack_codes, CodecSpec, Overlay, QuantTensor, ScaleDtype};
use uc_runtime::kernels::qgemm;
use uc_runtime::kernels::qint::{self, I16Lut, I16_MATVEC_TOL};
use uc_runtime::kernels::quant::{self, QuantRows, CODE_PAD, MATVEC_REL_TOL};
use uc_runtime::kernels::Isa;
use uc_runtime::linear::{self, DenseLinear, Linear, Op, PackedLinear, Prefill};

/// Test data from the workspace's one seeded PRNG.
use uc_format::SplitMix64 as Prng;

fn random_qt(rng: &mut Prng, rows: usize, cols: usize, spec: CodecSpec) -> QuantTensor {
    let l = spec.layout(rows, cols).unwrap();
    let mut codebook: Vec<f32> = (0..l.codebook).map(|_| rng.sym() * 2.0).collect();
    codebook.sort_by(f32::total_cmp);
    // Include subnormal-producing scales now and then: the exact path must keep them.
    let scales = (0..l.scales)
        .map(|i| {
            f16::from_f32(if i % 97 == 5 {
                3e-7
            } else {
                0.01 + rng.unit() * 0.1
            })
            .to_bits()
        })
        .collect();
    let idx: Vec<u8> = (0..rows * cols)
        .map(|_| (rng.next_u64() % (1u64 << spec.bits)) as u8)
        .collect();
    let codes = pack_codes(&idx, rows, cols, spec.bits.into());
    let r = spec.rank as usize;
    let overlay = (r > 0).then(|| Overlay {
        rank: r,
        a: (0..rows * r)
            .map(|_| half::bf16::from_f32(rng.sym() * 0.05).to_bits())
            .collect(),
        b: (0..r * cols)
            .map(|_| half::bf16::from_f32(rng.sym() * 0.05).to_bits())
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

fn specs() -> Vec<CodecSpec> {
    let mut v = Vec::new();
    for bits in 2..=8u8 {
        for group in [32u32, 64, 128, 256] {
            v.push(CodecSpec::new(bits, group));
        }
    }
    v.push(CodecSpec {
        bits: 5,
        group: 64,
        scale_dtype: ScaleDtype::F16,
        rank: 4,
        rot: 0,
        trellis: false,
    });
    v.push(CodecSpec {
        bits: 4,
        group: 32,
        scale_dtype: ScaleDtype::Bf16,
        rank: 3,
        rot: 0,
        trellis: false,
    });
    v
}

const COLS: [usize; 5] = [32, 96, 200, 576, 1000];

fn isas() -> Vec<Isa> {
    Isa::ALL.into_iter().filter(|i| i.is_available()).collect()
}

#[test]
fn row_reconstruction_is_bit_identical_to_the_codec_for_every_isa() {
    let mut rng = Prng(1);
    for spec in specs() {
        for cols in COLS {
            let rows = 5;
            let qt = random_qt(&mut rng, rows, cols, spec);
            let want = uc_codec::reconstruct_scalar(&qt).unwrap();
            let p = PackedLinear::from_quant("t", qt).unwrap();
            for isa in isas() {
                let mut row = vec![0f32; cols];
                for i in 0..rows {
                    p.row_into(isa, i, &mut row);
                    let w = &want[i * cols..(i + 1) * cols];
                    let same = row.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{} cols {cols} {isa:?} row {i}: reconstruction bits differ",
                        spec.name()
                    );
                }
            }
        }
    }
}

#[test]
fn fused_matvec_matches_scalar_reference_within_named_tolerance() {
    let mut rng = Prng(2);
    for spec in specs().into_iter().filter(|s| s.rank == 0) {
        for cols in COLS {
            let rows = 7;
            let qt = random_qt(&mut rng, rows, cols, spec);
            let parts = RowParts::new(&qt);
            let q = parts.rows();
            let x: Vec<f32> = (0..cols).map(|_| rng.sym()).collect();
            let mut want = vec![0f32; rows];
            quant::dot_rows_scalar(&q, &x, 0, &mut want);
            let w = uc_codec::reconstruct_scalar(&qt).unwrap();
            for isa in isas() {
                let mut got = vec![0f32; rows - 2];
                quant::dot_rows(isa, &q, &x, 2, &mut got);
                for (r, g) in got.iter().enumerate() {
                    let i = r + 2;
                    let mag: f32 = (0..cols).map(|j| (w[i * cols + j] * x[j]).abs()).sum();
                    let err = (g - want[i]).abs();
                    assert!(
                        err <= MATVEC_REL_TOL * mag,
                        "{} cols {cols} {isa:?} row {i}: {g} vs {} (|wx| {mag})",
                        spec.name(),
                        want[i]
                    );
                }
            }
        }
    }
}

/// `sum_j |s(j)| max|cb| max_G|x|`: the scale of the integer kernel's rounding error
/// (see `qint`), for row `i`.
fn int_bound(qt: &QuantTensor, i: usize, x: &[f32]) -> f32 {
    let (cols, g) = (qt.cols, qt.spec.group as usize);
    let ng = cols.div_ceil(g);
    let cbmax = qt.codebook.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    (0..cols)
        .map(|j| {
            let gi = j / g;
            let s = uc_codec::scale_to_f32(qt.scales[i * ng + gi], qt.spec.scale_dtype);
            let xmax = x[gi * g..((gi + 1) * g).min(cols)]
                .iter()
                .fold(0.0f32, |m, v| m.max(v.abs()));
            s.abs() * cbmax * xmax
        })
        .sum()
}

/// What a [`QuantRows`] view of `qt` borrows: the periodic codebook, f32 scales and
/// padded codes.
struct RowParts {
    bits: usize,
    group: usize,
    cols: usize,
    cb: Box<[f32; 256]>,
    scales: Vec<f32>,
    codes: Vec<u8>,
}

impl RowParts {
    fn new(qt: &QuantTensor) -> Self {
        let mut codes = qt.codes.clone();
        codes.extend_from_slice(&[0; CODE_PAD]);
        RowParts {
            bits: usize::from(qt.spec.bits),
            group: qt.spec.group as usize,
            cols: qt.cols,
            cb: quant::periodic_codebook(&qt.codebook),
            scales: qt
                .scales
                .iter()
                .map(|&s| uc_codec::scale_to_f32(s, qt.spec.scale_dtype))
                .collect(),
            codes,
        }
    }

    fn rows(&self) -> QuantRows<'_> {
        QuantRows::new(
            self.bits,
            self.group,
            self.cols,
            &self.cb,
            &self.scales,
            &self.codes,
        )
        .unwrap()
    }
}

/// The integer decode kernel: SIMD against its scalar reference (same integer sums, f32
/// partials regrouped: within the f32 summation tolerance), and the reference against
/// the f32 reference within the named rounding bound.
#[test]
fn int16_matvec_matches_its_reference_and_the_f32_reference_within_named_tolerances() {
    let mut rng = Prng(7);
    for spec in specs().into_iter().filter(|s| s.rank == 0) {
        let (bits, group) = (usize::from(spec.bits), spec.group as usize);
        if !qint::supports(bits, group) {
            continue;
        }
        for cols in COLS {
            let rows = 9;
            let qt = random_qt(&mut rng, rows, cols, spec);
            let parts = RowParts::new(&qt);
            let q = parts.rows();
            let lut = I16Lut::new(&parts.cb, bits);
            // Activations with an outlier channel, as real hidden states have.
            let mut x: Vec<f32> = (0..cols).map(|_| rng.sym()).collect();
            x[cols / 3] = 40.0;
            let mut want = vec![0f32; rows];
            quant::dot_rows_scalar(&q, &x, 0, &mut want);
            let w = uc_codec::reconstruct_scalar(&qt).unwrap();
            // Every lane order (AVX2's for this width, and AVX-512 VBMI's when the
            // columns are whole 64-column chunks): the reference on the activations
            // rounded in that order, and each SIMD kernel that reads it.
            let avx2_order = if bits == 4 {
                qint::Order::Nibble
            } else {
                qint::Order::Natural
            };
            let mut orders = vec![avx2_order];
            if cols % 64 == 0 {
                orders.push(qint::Order::Planes64);
            }
            for order in orders {
                let px = qint::prepare_x(&x, group, order);
                let mut reference = vec![0f32; rows];
                qint::dot_rows_i16_scalar(&q, &lut, &px, &x, 0, &mut reference);
                for i in 0..rows {
                    let mag: f32 = (0..cols).map(|j| (w[i * cols + j] * x[j]).abs()).sum();
                    let bound = I16_MATVEC_TOL * int_bound(&qt, i, &x) + MATVEC_REL_TOL * mag;
                    assert!(
                        (reference[i] - want[i]).abs() <= bound,
                        "{} cols {cols} {order:?} row {i}: int16 reference {} vs f32 {} (bound {bound})",
                        spec.name(),
                        reference[i],
                        want[i]
                    );
                }
                // 8-bit weights may run from values expanded at load (AVX2's order):
                // same numbers.
                let expanded = (bits == 8 && order == qint::Order::Natural)
                    .then(|| qint::Expanded::new(&q, &lut));
                for isa in isas() {
                    if isa != Isa::Scalar && qint::order(isa, bits, cols) != order {
                        continue;
                    }
                    let mut got = vec![0f32; rows - 2];
                    qint::dot_rows_i16(isa, &q, &lut, &px, &x, 2, &mut got);
                    if let Some(e) = &expanded {
                        let mut via = vec![0f32; rows - 2];
                        qint::dot_rows_expanded(isa, &q, &lut, e, &px, &x, 2, &mut via);
                        got.extend(via);
                    }
                    for (r, g) in got.iter().enumerate() {
                        let i = r % (rows - 2) + 2;
                        let mag: f32 = (0..cols).map(|j| (w[i * cols + j] * x[j]).abs()).sum();
                        assert!(
                            (g - reference[i]).abs() <= MATVEC_REL_TOL * mag,
                            "{} cols {cols} {isa:?} {order:?} row {i}: {g} vs reference {}",
                            spec.name(),
                            reference[i]
                        );
                    }
                }
            }
        }
    }
}

/// The few-token kernel of the prefill arithmetic: every token's rows bit for bit the
/// scalar reference (the prefill GEMM's specification) on activations rounded as the GEMM
/// rounds them, for every width and group, 1 to 4 tokens, row counts on and off a
/// multiple of 16; activations rounded more finely take the reference.
#[test]
fn int16_spec_matvec_gives_each_token_the_reference_bits() {
    let mut rng = Prng(13);
    for spec in specs().into_iter().filter(|s| s.rank == 0) {
        let (bits, group) = (usize::from(spec.bits), spec.group as usize);
        if !qint::supports(bits, group) {
            continue;
        }
        let (rows, cols) = (37, 256);
        let qt = random_qt(&mut rng, rows, cols, spec);
        let parts = RowParts::new(&qt);
        let q = parts.rows();
        let lut = I16Lut::new(&parts.cb, bits);
        let xs: Vec<Vec<f32>> = (0..qint::FUSED_MAX_SPEC)
            .map(|t| {
                let mut x: Vec<f32> = (0..cols).map(|_| rng.sym()).collect();
                x[(t * 37) % cols] = 30.0;
                x
            })
            .collect();
        for levels in [uc_runtime::kernels::qgemm::X_LEVELS, qint::I16_LEVELS] {
            for isa in isas() {
                let order = qint::order(isa, bits, cols);
                let pxs: Vec<qint::PreparedX> = xs
                    .iter()
                    .map(|x| qint::prepare_x_levels(x, group, order, levels))
                    .collect();
                for (first, n) in [(0, 32), (1, 36), (5, 16), (2, 7)] {
                    for m in 1..=qint::FUSED_MAX_SPEC {
                        let mut ys = vec![vec![f32::NAN; n]; m];
                        let mut refs: Vec<&mut [f32]> =
                            ys.iter_mut().map(|y| y.as_mut_slice()).collect();
                        let p: Vec<&qint::PreparedX> = pxs[..m].iter().collect();
                        let x: Vec<&[f32]> = xs[..m].iter().map(|x| x.as_slice()).collect();
                        qint::dot_rows_i16_spec(isa, &q, &lut, &p, &x, first, &mut refs);
                        for t in 0..m {
                            let mut want = vec![0f32; n];
                            qint::dot_rows_i16_scalar(&q, &lut, &pxs[t], &xs[t], first, &mut want);
                            let same = ys[t]
                                .iter()
                                .zip(&want)
                                .all(|(a, b)| a.to_bits() == b.to_bits());
                            assert!(
                                same,
                                "{} {isa:?} levels {levels} rows {first}+{n}, {m} tokens, token {t}",
                                spec.name()
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Several tokens through one integer mat-vec call (a batched decode step): each token's
/// rows bit for bit what the one-token kernel gives it, for every width, group and
/// number of tokens, on every ISA here.
#[test]
fn int16_matvec_of_several_tokens_gives_each_token_its_own_bits() {
    let mut rng = Prng(11);
    for spec in specs().into_iter().filter(|s| s.rank == 0) {
        let (bits, group) = (usize::from(spec.bits), spec.group as usize);
        if !qint::supports(bits, group) {
            continue;
        }
        let (rows, cols) = (7, 192);
        let qt = random_qt(&mut rng, rows, cols, spec);
        let parts = RowParts::new(&qt);
        let q = parts.rows();
        let lut = I16Lut::new(&parts.cb, bits);
        let xs: Vec<Vec<f32>> = (0..qint::MULTI)
            .map(|t| {
                let mut x: Vec<f32> = (0..cols).map(|_| rng.sym()).collect();
                x[(t * 37) % cols] = 30.0;
                x
            })
            .collect();
        for isa in isas() {
            let order = qint::order(isa, bits, cols);
            let pxs: Vec<qint::PreparedX> = xs
                .iter()
                .map(|x| qint::prepare_x(x, group, order))
                .collect();
            let alone: Vec<Vec<f32>> = (0..qint::MULTI)
                .map(|t| {
                    let mut y = vec![0f32; rows - 1];
                    qint::dot_rows_i16(isa, &q, &lut, &pxs[t], &xs[t], 1, &mut y);
                    y
                })
                .collect();
            for m in 1..=qint::MULTI {
                let mut ys = vec![vec![f32::NAN; rows - 1]; m];
                let mut refs: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
                let p: Vec<&qint::PreparedX> = pxs[..m].iter().collect();
                let x: Vec<&[f32]> = xs[..m].iter().map(|x| x.as_slice()).collect();
                qint::dot_rows_i16_multi(isa, &q, &lut, &p, &x, 1, &mut refs);
                for t in 0..m {
                    let same = ys[t]
                        .iter()
                        .zip(&alone[t])
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{} {isa:?} {m} tokens, token {t}: {:?} vs {:?}",
                        spec.name(),
                        ys[t],
                        alone[t]
                    );
                }
            }
        }
    }
}

/// Decode (fused) and prefill (dequantized tile + GEMM) paths, overlay as (x B^T) A^T,
/// against a dense layer holding the exact reconstruction.
#[test]
fn packed_linear_matches_dense_reconstruction_for_decode_and_prefill_batches() {
    let mut rng = Prng(3);
    for spec in [
        CodecSpec::new(5, 128),
        CodecSpec::new(3, 64),
        // Trellis codes, expanded at load: 300 rows span five runs.
        CodecSpec::parse("t4g64").unwrap(),
        CodecSpec {
            bits: 5,
            group: 64,
            scale_dtype: ScaleDtype::F16,
            rank: 4,
            rot: 0,
            trellis: false,
        },
    ] {
        for cols in [200, 192] {
            let rows = 300;
            let qt = random_qt(&mut rng, rows, cols, spec);
            let w = uc_codec::reconstruct_scalar(&qt).unwrap();
            let qt_copy = qt.clone();
            let packed = PackedLinear::from_quant("p", qt).unwrap();
            let dense = DenseLinear::new("d", w.clone(), rows, cols).unwrap();
            let bias: Vec<f32> = (0..rows).map(|_| rng.sym()).collect();
            for n in [1, 3, 37] {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.sym()).collect();
                for (isa, prefill) in isas()
                    .into_iter()
                    .flat_map(|i| [(i, Prefill::Tiles), (i, Prefill::Integer)])
                {
                    let got = &linear::forward_prefill(
                        prefill,
                        isa,
                        &[Op {
                            w: &packed,
                            bias: Some(&bias),
                        }],
                        &x,
                        n,
                    )[0];
                    let want = &linear::forward(
                        Isa::Scalar,
                        &[Op {
                            w: &dense,
                            bias: Some(&bias),
                        }],
                        &x,
                        n,
                    )[0];
                    for t in 0..n {
                        for i in 0..rows {
                            let mag: f32 = (0..cols)
                                .map(|j| (w[i * cols + j] * x[t * cols + j]).abs())
                                .sum::<f32>()
                                + bias[i].abs();
                            let (g, e) = (got[t * rows + i], want[t * rows + i]);
                            // Decode with the integer kernel rounds codebook and activations
                            // to 15 bits; the integer prefill rounds activations to 11.
                            let xt = &x[t * cols..(t + 1) * cols];
                            let int = if n <= linear::FUSED_MAX_TOKENS && linear::int_decode(isa) {
                                I16_MATVEC_TOL * int_bound(&qt_copy, i, xt)
                            } else if prefill == Prefill::Integer && qgemm::available(isa) {
                                qgemm::PREFILL_TOL * int_bound(&qt_copy, i, xt)
                            } else {
                                0.0
                            };
                            assert!(
                                (g - e).abs() <= 2.0 * MATVEC_REL_TOL * mag + int,
                                "{} cols {cols} n {n} {isa:?} {prefill:?} ({t},{i}): {g} vs {e}",
                                spec.name()
                            );
                        }
                    }
                }
            }
        }
    }
}

/// The prefill GEMM's weight tile: the byte-permute lookup gives the reference's values.
#[test]
fn int16_tile_lookup_matches_its_reference() {
    let mut rng = Prng(13);
    for spec in specs().into_iter().filter(|s| s.rank == 0) {
        let bits = usize::from(spec.bits);
        let (rows, cols) = (6, 192);
        let qt = random_qt(&mut rng, rows, cols, spec);
        let parts = RowParts::new(&qt);
        let q = parts.rows();
        let lut = I16Lut::new(&parts.cb, bits);
        let mut want = vec![0i16; (rows - 1) * cols];
        qint::lookup_rows_scalar(&q, &lut, 1, &mut want);
        for isa in isas() {
            let mut got = vec![7i16; (rows - 1) * cols];
            qint::lookup_rows(isa, &q, &lut, 1, &mut got);
            assert_eq!(got, want, "{} {isa:?}", spec.name());
        }
    }
}

/// The integer prefill GEMM: every token's outputs bit for bit its reference (the
/// decode kernel's specification with 11-bit activations, token alone), for every
/// width, group, token count (lane blocks and register tiles partly filled) and row
/// count (8-row tiles and single rows); the reference within its named tolerance of
/// the f32 reference; the packing identical on every ISA.
#[test]
fn int16_prefill_gemm_gives_each_token_its_reference_bits() {
    let mut rng = Prng(17);
    for spec in specs().into_iter().filter(|s| s.rank == 0) {
        let (bits, group) = (usize::from(spec.bits), spec.group as usize);
        let cols = 256;
        if !qgemm::supports(bits, group, cols) {
            continue;
        }
        let rows = 21;
        let qt = random_qt(&mut rng, rows, cols, spec);
        let parts = RowParts::new(&qt);
        let q = parts.rows();
        let lut = I16Lut::new(&parts.cb, bits);
        let w = uc_codec::reconstruct_scalar(&qt).unwrap();
        for n in [1, 5, 16, 37, 70] {
            let mut x: Vec<f32> = (0..n * cols).map(|_| rng.sym()).collect();
            x[(n * 31) % (n * cols)] = 25.0;
            let reference = qgemm::pack_x(Isa::Scalar, &x, n, cols, group);
            let mut want = vec![vec![0f32; rows - 2]; n];
            let mut refs: Vec<&mut [f32]> = want.iter_mut().map(|y| y.as_mut_slice()).collect();
            qgemm::gemm_rows_scalar(&q, &lut, &reference, 2, &mut refs);
            for t in 0..n {
                let xt = &x[t * cols..(t + 1) * cols];
                let mut f32_ref = vec![0f32; rows - 2];
                quant::dot_rows_scalar(&q, xt, 2, &mut f32_ref);
                for (r, (&g, &e)) in want[t].iter().zip(&f32_ref).enumerate() {
                    let i = r + 2;
                    let mag: f32 = (0..cols).map(|j| (w[i * cols + j] * xt[j]).abs()).sum();
                    let bound = qgemm::PREFILL_TOL * int_bound(&qt, i, xt) + MATVEC_REL_TOL * mag;
                    assert!(
                        (g - e).abs() <= bound,
                        "{} n {n} ({t},{i}): int reference {g} vs f32 {e} (bound {bound})",
                        spec.name()
                    );
                }
            }
            for isa in isas() {
                let px = qgemm::pack_x(isa, &x, n, cols, group);
                for t in 0..n {
                    let (a, b) = (px.token(t), reference.token(t));
                    assert!(
                        a.xq() == b.xq() && a.xs() == b.xs(),
                        "{} {isa:?} n {n}: token {t} packed differently",
                        spec.name()
                    );
                }
                let mut got = vec![vec![f32::NAN; rows - 2]; n];
                let mut refs: Vec<&mut [f32]> = got.iter_mut().map(|y| y.as_mut_slice()).collect();
                qgemm::gemm_rows(isa, &q, &lut, &px, 2, &mut refs);
                for t in 0..n {
                    let same = got[t]
                        .iter()
                        .zip(&want[t])
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{} {isa:?} n {n} token {t}: {:?} vs {:?}",
                        spec.name(),
                        got[t],
                        want[t]
                    );
                }
            }
        }
    }
}

#[test]
fn quant_rows_rejects_inconsistent_buffers() {
    let cb = quant::periodic_codebook(&[0.0; 32]);
    let scales = vec![1.0f32; 4];
    // 2 rows x 2 groups of 32 at 5 bits: 40 bytes per row.
    assert!(QuantRows::new(5, 32, 64, &cb, &scales, &[0u8; 80 + CODE_PAD]).is_some());
    assert!(
        QuantRows::new(5, 32, 64, &cb, &scales, &[0u8; 80]).is_none(),
        "missing padding"
    );
    assert!(
        QuantRows::new(5, 24, 64, &cb, &scales, &[0u8; 80 + CODE_PAD]).is_none(),
        "group not a multiple of 16"
    );
    assert!(
        QuantRows::new(9, 32, 64, &cb, &scales, &[0u8; 80 + CODE_PAD]).is_none(),
        "bits"
    );
    let mut bad = *cb;
    bad[40] = 1.0;
    assert!(
        QuantRows::new(5, 32, 64, &bad, &scales, &[0u8; 80 + CODE_PAD]).is_none(),
        "codebook not periodic"
    );
}
