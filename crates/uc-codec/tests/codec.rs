//! Codec behaviour: table, encoder, bit-exact reconstruction across kernels and thread
//! counts, and one test per `CodecError` variant.

mod common;

use common::*;
use half::{bf16, f16};
use proptest::prelude::*;
use uc_codec::*;

#[test]
fn codec_table_names_parse_back_and_are_unique() {
    let mut names: Vec<String> = CODECS.iter().map(|c| c.name()).collect();
    for (c, n) in CODECS.iter().zip(&names) {
        assert_eq!(CodecSpec::parse(n).unwrap(), *c);
        c.validate().unwrap();
    }
    names.sort();
    names.dedup();
    assert_eq!(names.len(), CODECS.len());
    assert!(names.contains(&"q5g128".to_string()));
    let s = CodecSpec::parse("q4g64r16-bf16").unwrap();
    assert_eq!(
        (s.bits, s.group, s.scale_dtype, s.rank),
        (4, 64, ScaleDtype::Bf16, 16)
    );
}

#[test]
fn stored_bytes_count_every_byte() {
    let s = CodecSpec::parse("q5g128").unwrap();
    // codes 4096*2560 + scales 4096*32*2 + codebook 32*4
    assert_eq!(
        s.stored_bytes(4096, 4096).unwrap(),
        4096 * 2560 + 4096 * 32 * 2 + 128
    );
    let bpw = s.bits_per_weight(4096, 4096).unwrap();
    assert!((bpw - (5.0 + 16.0 / 128.0)).abs() < 1e-3, "{bpw}");
    let r = CodecSpec::parse("q3g32r8-bf16").unwrap();
    // cols 33 -> 2 groups, row bytes ceil(99/8) = 13; overlay (10*8 + 8*33) * 2
    assert_eq!(
        r.stored_bytes(10, 33).unwrap(),
        8 * 4 + 10 * 2 * 2 + 10 * 13 + (80 + 264) * 2
    );
}

#[test]
fn code_packing_is_lsb_first_per_row() {
    // Five-bit codes 1, 2: bits 00001 then 00010 -> byte0 = 0b0100_0001, byte1 = 0b0000_0000
    let packed = pack_codes(&[1, 2, 31, 0], 2, 2, 5);
    assert_eq!(packed, vec![0b0100_0001, 0b0000_0000, 0b0001_1111, 0]);
    assert_eq!(
        (code_at(&packed[2..4], 0, 5), code_at(&packed[2..4], 1, 5)),
        (31, 0)
    );
    // 8 five-bit codes fill exactly 5 bytes.
    assert_eq!(pack_codes(&[7; 8], 1, 8, 5).len(), 5);
}

#[test]
fn encode_round_trips_and_error_decreases_with_bits() {
    let mut rng = Prng(1);
    let (rows, cols) = (24, 300);
    let w = gaussian(&mut rng, rows * cols, 0.02);
    for group in GROUPS {
        let mut last = f64::INFINITY;
        for spec in CODECS.iter().filter(|c| c.group == group) {
            let qt = encode_rtn(&w, rows, cols, spec, None).unwrap();
            let r = reconstruct(&qt, Kernel::select(false)).unwrap();
            let e = rel_err(&w, &r);
            assert!(e < last, "{}: rel err {e} not below {last}", spec.name());
            if spec.bits == 5 {
                assert!(e < 0.08, "{}: rel err {e}", spec.name());
            }
            last = e;
        }
    }
}

#[test]
fn importance_lowers_error_on_important_columns() {
    let mut rng = Prng(2);
    let (rows, cols) = (32, 256);
    let w = gaussian(&mut rng, rows * cols, 1.0);
    let imp: Vec<f32> = (0..cols)
        .map(|j| if j < 16 { 100.0 } else { 1.0 })
        .collect();
    let spec = CodecSpec::parse("q3g128").unwrap();
    let col_err = |qt: &QuantTensor| {
        let r = reconstruct_scalar(qt).unwrap();
        (0..rows)
            .flat_map(|i| (0..16).map(move |j| i * cols + j))
            .map(|k| (w[k] - r[k]).powi(2) as f64)
            .sum::<f64>()
    };
    let plain = encode_rtn(&w, rows, cols, &spec, None).unwrap();
    let weighted = encode_rtn(&w, rows, cols, &spec, Some(&imp)).unwrap();
    assert!(col_err(&weighted) < col_err(&plain));
}

#[test]
fn encoder_is_deterministic_across_thread_counts() {
    let mut rng = Prng(3);
    let w = gaussian(&mut rng, 64 * 200, 0.05);
    let spec = CodecSpec::parse("q4g64").unwrap();
    let run = |t| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .unwrap()
            .install(|| encode_rtn(&w, 64, 200, &spec, None).unwrap())
    };
    assert_eq!(run(1), run(2));
}

#[test]
fn scales_are_stored_rounded_and_codes_fit_the_stored_scale() {
    let mut rng = Prng(4);
    let w = gaussian(&mut rng, 8 * 64, 1.0);
    for name in ["q4g32", "q4g32-bf16", "q4g32-e8"] {
        let spec = CodecSpec::parse(name).unwrap();
        let qt = encode_rtn(&w, 8, 64, &spec, None).unwrap();
        // Every weight's code is the best one for the stored scale.
        for i in 0..8 {
            for j in 0..64 {
                let s = scale_to_f32(qt.scales[i * 2 + j / 32], spec.scale_dtype);
                let c = code_at(&qt.codes[i * 32..(i + 1) * 32], j, 4) as usize;
                let x = w[i * 64 + j];
                let best = qt
                    .codebook
                    .iter()
                    .map(|q| (x - s * q).abs())
                    .fold(f32::INFINITY, f32::min);
                assert_eq!((x - s * qt.codebook[c]).abs(), best, "{name} ({i},{j})");
            }
        }
    }
}

#[test]
fn e8_scales_are_an_exact_monotone_minifloat() {
    let v = |c: u16| scale_to_f32(c, ScaleDtype::E8);
    assert_eq!(v(0), 1.0 / 128.0);
    assert_eq!(v(31), 63.0 / 4096.0);
    assert_eq!(v(32), 1.0 / 64.0);
    assert_eq!(v(255), E8_MAX);
    assert!(v(256).is_nan(), "codes above 255 are not storable");
    for c in 0..255u16 {
        assert!(v(c) < v(c + 1), "code {c}");
        // Every value round-trips, and midpoints go to a neighbour.
        assert_eq!(scale_from_f32(v(c), ScaleDtype::E8), c);
        let mid = scale_from_f32((v(c) + v(c + 1)) / 2.0, ScaleDtype::E8);
        assert!(mid == c || mid == c + 1);
    }
    // Out of range clamps instead of overflowing.
    assert_eq!(scale_from_f32(1e9, ScaleDtype::E8), 255);
    assert_eq!(scale_from_f32(0.0, ScaleDtype::E8), 0);
    // Relative step at most 1/32.
    for c in 0..255u16 {
        assert!(v(c + 1) / v(c) <= 1.0 + 1.0 / 32.0 + 1e-7, "code {c}");
    }
}

#[test]
fn e8_scales_cost_one_byte_and_lose_little() {
    let (f, e) = (
        CodecSpec::parse("q5g64").unwrap(),
        CodecSpec::parse("q5g64-e8").unwrap(),
    );
    let (rows, cols) = (64, 512);
    assert_eq!(
        f.stored_bytes(rows, cols).unwrap() - e.stored_bytes(rows, cols).unwrap(),
        (rows * cols / 64) as u64
    );
    let mut rng = Prng(9);
    let w = gaussian(&mut rng, rows * cols, 0.02);
    let err = |spec: &CodecSpec| {
        let qt = encode_rtn(&w, rows, cols, spec, None).unwrap();
        rel_err(&w, &reconstruct(&qt, Kernel::select(false)).unwrap())
    };
    let (ef, ee) = (err(&f), err(&e));
    assert!(ee < ef * 1.02, "e8 rel err {ee} vs f16 {ef}");
}

#[test]
fn all_zero_tensor_encodes_to_zeros() {
    let spec = CodecSpec::parse("q5g32").unwrap();
    let qt = encode_rtn(&[0.0; 3 * 40], 3, 40, &spec, None).unwrap();
    assert!(reconstruct_scalar(&qt).unwrap().iter().all(|&x| x == 0.0));
}

/// Every kernel this CPU has must agree bit for bit with the scalar reference.
fn assert_kernels_match(qt: &QuantTensor, what: &str) {
    let want = bits_of(&reconstruct_scalar(qt).unwrap());
    for k in Kernel::available() {
        assert_eq!(
            bits_of(&reconstruct(qt, k).unwrap()),
            want,
            "{what}: kernel {}",
            k.name()
        );
        let r = Reconstructor::new(qt, k).unwrap();
        let mut rows = vec![0f32; qt.cols * (qt.rows - 1)];
        r.rows_into(1, &mut rows).unwrap();
        assert_eq!(
            bits_of(&rows),
            want[qt.cols..],
            "{what}: rows_into, kernel {}",
            k.name()
        );
    }
}

#[test]
fn simd_kernels_match_scalar_on_random_inputs() {
    assert!(Kernel::available().contains(&Kernel::Scalar));
    let mut rng = Prng(5);
    for bits in 2..=8u8 {
        for cols in [1, 7, 8, 15, 16, 17, 33, 130, 257] {
            for rank in [0, 1, 3] {
                for dt in [ScaleDtype::F16, ScaleDtype::Bf16, ScaleDtype::E8] {
                    let spec = CodecSpec {
                        bits,
                        group: 32,
                        scale_dtype: dt,
                        rank: rank.min(cols as u32),
                        rot: 0,
                        trellis: false,
                    };
                    let qt = plain_qt(&mut rng, 5, cols, spec);
                    assert_kernels_match(&qt, &format!("{} cols {cols}", spec.name()));
                }
            }
        }
    }
}

#[test]
fn simd_kernels_match_scalar_on_adversarial_inputs() {
    let mut rng = Prng(6);
    let f16_max = f16::MAX.to_f32();
    let f16_sub = f16::from_bits(1).to_f32(); // smallest subnormal
    type Cb = Box<dyn Fn(&mut Prng, usize) -> f32>;
    type Gen = Box<dyn Fn(&mut Prng) -> f32>;
    // (what, codebook values, scales, overlay values)
    let cases: Vec<(&str, Cb, Gen, Gen)> = vec![
        (
            "f16 max scales",
            Box::new(|r, _| r.normal() * 1e30),
            Box::new(move |_| f16_max),
            Box::new(|r| r.normal() * 1e30),
        ),
        (
            "subnormal scales",
            Box::new(|r, _| r.normal() * 1e-3),
            Box::new(move |r| f16_sub * (1 + r.below(1000)) as f32),
            Box::new(|r| r.normal() * 1e-20),
        ),
        (
            "denormal codebook",
            Box::new(|r, i| {
                f32::from_bits(1 + r.below(1 << 20) as u32) * if i % 2 == 0 { -1.0 } else { 1.0 }
            }),
            Box::new(|r| r.unit() * 4.0),
            Box::new(|r| r.normal() * 1e-38),
        ),
        (
            "mixed signs and zero scales",
            Box::new(|r, _| r.normal()),
            Box::new(|r| [0.0, -0.0, -1.5, 2.0][r.below(4) as usize]),
            Box::new(|r| r.normal() * 1e3),
        ),
        (
            "cancellation in overlay",
            Box::new(|r, _| r.normal()),
            Box::new(|r| r.unit()),
            Box::new(|r| if r.below(2) == 0 { 1e19 } else { -1e19 }),
        ),
    ];
    for (what, cb, sc, ov) in &cases {
        for bits in [2u8, 3, 4, 5, 6, 8] {
            for cols in [1, 7, 33, 130] {
                for rank in [0u32, 2] {
                    let spec = CodecSpec {
                        bits,
                        group: 32,
                        scale_dtype: ScaleDtype::F16,
                        rank: rank.min(cols as u32),
                        rot: 0,
                        trellis: false,
                    };
                    let qt = random_qt(
                        &mut rng,
                        4,
                        cols,
                        spec,
                        |r, i| cb(r, i),
                        |r| sc(r),
                        |r| ov(r),
                    );
                    assert_kernels_match(&qt, &format!("{what}, {} cols {cols}", spec.name()));
                }
            }
        }
    }
}

#[test]
fn reconstruction_preserves_denormals() {
    let spec = CodecSpec::new(2, 32);
    let d = f32::from_bits(7); // denormal
    let qt = QuantTensor {
        rows: 1,
        cols: 16,
        spec,
        codebook: vec![-d, 0.0, d, 1.0],
        scales: vec![f16::from_f32(1.0).to_bits()],
        codes: pack_codes(&[2; 16], 1, 16, 2),
        overlay: None,
    };
    for k in Kernel::available() {
        assert!(
            reconstruct(&qt, k).unwrap().iter().all(|&x| x == d),
            "{}",
            k.name()
        );
    }
}

#[test]
fn overlay_adds_low_rank_product_without_fma() {
    // A = [1+2^-23 (bf16-rounded is 1)], chosen so FMA and mul+add differ:
    // a*b = (1 + 2^-7)^2 = 1 + 2^-6 + 2^-14; base cancels the leading 1.
    let x = 1.0 + 2f32.powi(-7);
    let spec = CodecSpec {
        rank: 1,
        ..CodecSpec::new(2, 32)
    };
    let qt = QuantTensor {
        rows: 1,
        cols: 16,
        spec,
        codebook: vec![-1.0, 0.0, 0.5, 1.0],
        scales: vec![f16::from_f32(1.0).to_bits()],
        codes: pack_codes(&[0; 16], 1, 16, 2),
        overlay: Some(Overlay {
            rank: 1,
            a: vec![bf16::from_f32(x).to_bits()],
            b: vec![bf16::from_f32(x).to_bits(); 16],
        }),
    };
    let want = -1.0f32 + x * x; // product rounded to f32 first
    assert_eq!(want, 2f32.powi(-6) + 2f32.powi(-14));
    for k in Kernel::available() {
        assert!(
            reconstruct(&qt, k)
                .unwrap()
                .iter()
                .all(|&v| v.to_bits() == want.to_bits()),
            "{}",
            k.name()
        );
    }
}

#[test]
fn reconstruction_is_identical_across_thread_counts() {
    let mut rng = Prng(7);
    let qt = plain_qt(
        &mut rng,
        300,
        130,
        CodecSpec {
            rank: 4,
            ..CodecSpec::new(5, 64)
        },
    );
    let run = |t: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .unwrap()
            .install(|| {
                let r = Reconstructor::new(&qt, Kernel::select(false)).unwrap();
                (bits_of(&r.all()), r.digest().unwrap())
            })
    };
    let (one, two) = (run(1), run(2));
    assert_eq!(one, two);
    use sha2::Digest;
    let direct: [u8; 32] = sha2::Sha256::digest(bytemuck::cast_slice::<u32, u8>(&one.0)).into();
    assert_eq!(
        one.1, direct,
        "streamed digest equals digest of the whole buffer"
    );
}

/// Golden digests pin the specification across CPU families (computed on x86-64 AVX-512;
/// the same test passes under qemu-aarch64 with NEON). Test data avoids libm so the
/// inputs themselves are identical everywhere.
#[test]
fn reconstruction_digests_match_golden_values() {
    let cases = [
        ("q5g32r2", 7, 130),
        ("q3g64-bf16", 5, 33),
        ("q8g32r1", 3, 257),
    ];
    let got: Vec<String> = cases
        .iter()
        .map(|&(name, rows, cols)| {
            let spec = CodecSpec::parse(name).unwrap();
            let qt = random_qt(
                &mut Prng(123),
                rows,
                cols,
                spec,
                |r, _| r.unit() * 2.0 - 1.0,
                |r| r.unit() * 0.05,
                |r| r.unit() - 0.5,
            );
            let d = Reconstructor::new(&qt, Kernel::select(false))
                .unwrap()
                .digest()
                .unwrap();
            assert_eq!(
                bits_of(&reconstruct(&qt, Kernel::select(false)).unwrap()),
                bits_of(&reconstruct_scalar(&qt).unwrap())
            );
            d.iter().map(|b| format!("{b:02x}")).collect()
        })
        .collect();
    assert_eq!(got, GOLDEN);
}

const GOLDEN: [&str; 3] = [
    "4c8c9ae33f95bd654875d156ea470df97921b6e3281dc8ba5d786d9c2aecdbb8",
    "841f4c6ece9231e90bb00f61175a5879810b8f9d009ab4be73f02e4812e11f88",
    "d8b2f4afe4a14b4ff5e9e2b8de96ca2654d3a0b6da5d176f0a73f00138834021",
];

#[test]
fn a_simd_kernel_is_detected_where_expected() {
    #[cfg(target_arch = "aarch64")]
    assert!(Kernel::available().contains(&Kernel::Neon));
    #[cfg(target_arch = "x86_64")]
    assert_eq!(
        Kernel::available().contains(&Kernel::Avx2),
        std::arch::is_x86_feature_detected!("avx2")
    );
}

#[test]
fn force_scalar_switch_selects_the_reference() {
    assert_eq!(Kernel::select(true), Kernel::Scalar);
    // nextest runs each test in its own process, so the variable does not leak.
    std::env::set_var(FORCE_SCALAR_ENV, "1");
    assert_eq!(Kernel::select(false), Kernel::Scalar);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn kernels_match_scalar_for_any_shape(seed in any::<u64>(), bits in 2u8..=8, rows in 1usize..6, cols in 1usize..300, gi in 0usize..4, rank in 0u32..4) {
        let mut rng = Prng(seed);
        let spec = CodecSpec { bits, group: GROUPS[gi], scale_dtype: ScaleDtype::F16, rank: rank.min(rows.min(cols) as u32), rot: 0, trellis: false };
        let qt = plain_qt(&mut rng, rows, cols, spec);
        let want = bits_of(&reconstruct_scalar(&qt).unwrap());
        for k in Kernel::available() {
            prop_assert_eq!(&bits_of(&reconstruct(&qt, k).unwrap()), &want);
        }
    }
}

proptest! {
    #[test]
    fn code_packing_round_trips(bits in 2u32..=8, rows in 1usize..5, cols in 1usize..70, seed in any::<u64>()) {
        let mut rng = Prng(seed);
        let idx: Vec<u8> = (0..rows * cols).map(|_| rng.below(1 << bits) as u8).collect();
        let packed = pack_codes(&idx, rows, cols, bits);
        let rb = (cols * bits as usize).div_ceil(8);
        prop_assert_eq!(packed.len(), rows * rb);
        for i in 0..rows {
            for j in 0..cols {
                prop_assert_eq!(code_at(&packed[i * rb..(i + 1) * rb], j, bits), idx[i * cols + j]);
            }
        }
    }
}

// ---- one test per CodecError variant ----

fn valid() -> QuantTensor {
    plain_qt(
        &mut Prng(9),
        3,
        40,
        CodecSpec {
            rank: 2,
            ..CodecSpec::new(3, 32)
        },
    )
}

#[test]
fn rejects_unknown_codec_names() {
    for n in [
        "q5",
        "x5g128",
        "q05g128",
        "q5g128r0",
        "q5g128-f32",
        "q5g128r",
        "",
    ] {
        assert!(
            matches!(CodecSpec::parse(n), Err(CodecError::UnknownCodec { .. })),
            "{n}"
        );
    }
}

#[test]
fn rejects_bits_outside_2_to_8() {
    assert!(matches!(
        CodecSpec::parse("q9g128"),
        Err(CodecError::BadBits { bits: 9, .. })
    ));
    assert!(matches!(
        CodecSpec::new(1, 32).validate(),
        Err(CodecError::BadBits { bits: 1, .. })
    ));
}

#[test]
fn rejects_unsupported_group() {
    assert!(matches!(
        CodecSpec::parse("q5g100"),
        Err(CodecError::BadGroup { group: 100, .. })
    ));
}

#[test]
fn rejects_rank_above_min_dimension() {
    let s = CodecSpec {
        rank: 4,
        ..CodecSpec::new(4, 32)
    };
    assert!(matches!(
        s.layout(3, 100),
        Err(CodecError::RankTooLarge {
            rank: 4,
            rows: 3,
            ..
        })
    ));
}

#[test]
fn rejects_empty_or_overflowing_shapes() {
    let s = CodecSpec::new(4, 32);
    assert!(matches!(s.layout(0, 10), Err(CodecError::BadShape { .. })));
    assert!(matches!(
        s.layout(usize::MAX / 2, 8),
        Err(CodecError::BadShape { .. })
    ));
}

#[test]
fn rejects_buffers_of_the_wrong_length() {
    let mut qt = valid();
    qt.codes.push(0);
    assert!(matches!(
        qt.validate(),
        Err(CodecError::LengthMismatch { what: "codes", .. })
    ));
    let e = encode_rtn(&[0.0; 5], 2, 3, &CodecSpec::new(4, 32), None)
        .unwrap_err()
        .named("w");
    assert!(
        matches!(e, CodecError::LengthMismatch { what: "weights", tensor, .. } if tensor == "w")
    );
}

#[test]
fn rejects_overlay_rank_disagreeing_with_codec() {
    let mut qt = valid();
    qt.overlay = None;
    assert!(matches!(
        qt.validate(),
        Err(CodecError::OverlayMismatch {
            spec_rank: 2,
            overlay_rank: 0,
            ..
        })
    ));
    let spec = CodecSpec {
        rank: 1,
        ..CodecSpec::new(4, 32)
    };
    assert!(matches!(
        encode_rtn(&[0.0; 4], 2, 2, &spec, None),
        Err(CodecError::OverlayMismatch { .. })
    ));
}

#[test]
fn rejects_unsorted_codebook() {
    let mut qt = valid();
    qt.codebook.swap(2, 5);
    assert!(matches!(
        qt.validate(),
        Err(CodecError::UnsortedCodebook { index: 3, .. })
    ));
}

#[test]
fn rejects_non_finite_codebook() {
    let mut qt = valid();
    qt.codebook[7] = f32::INFINITY;
    assert!(matches!(
        qt.validate(),
        Err(CodecError::NonFiniteCodebook { index: 7, .. })
    ));
}

#[test]
fn rejects_non_finite_scales() {
    let mut qt = valid();
    qt.scales[3] = f16::NAN.to_bits(); // row 1, group 1
    assert!(matches!(
        qt.validate(),
        Err(CodecError::NonFiniteScale {
            row: 1,
            group: 1,
            ..
        })
    ));
}

#[test]
fn rejects_non_finite_overlay() {
    let mut qt = valid();
    qt.overlay.as_mut().unwrap().b[5] = bf16::INFINITY.to_bits();
    assert!(matches!(
        qt.validate(),
        Err(CodecError::NonFiniteOverlay {
            factor: "b",
            index: 5,
            ..
        })
    ));
}

#[test]
fn rejects_non_zero_padding_bits() {
    let mut qt = valid(); // 40 cols * 3 bits = 120 bits = 15 bytes: no padding; use 41 cols
    qt = plain_qt(&mut Prng(10), 3, 41, qt.spec);
    let rb = (41 * 3usize).div_ceil(8);
    qt.codes[2 * rb - 1] |= 0x80;
    assert!(matches!(
        qt.validate(),
        Err(CodecError::NonZeroPadding { row: 1, .. })
    ));
}

#[test]
fn rejects_nan_and_inf_weights_naming_the_position() {
    let spec = CodecSpec::new(4, 32);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut w = vec![0.5f32; 3 * 50];
        w[2 * 50 + 17] = bad;
        assert!(matches!(
            encode_rtn(&w, 3, 50, &spec, None),
            Err(CodecError::NonFiniteWeight {
                row: 2,
                col: 17,
                ..
            })
        ));
    }
}

#[test]
fn rejects_negative_importance() {
    let mut imp = vec![1.0f32; 50];
    imp[9] = -1.0;
    let e = encode_rtn(&[0.5; 100], 2, 50, &CodecSpec::new(4, 32), Some(&imp));
    assert!(matches!(e, Err(CodecError::BadImportance { col: 9, .. })));
}

#[test]
fn rejects_scales_beyond_f16_range() {
    let w = vec![1e30f32; 64];
    let e = encode_rtn(&w, 1, 64, &CodecSpec::new(4, 32), None);
    assert!(matches!(
        e,
        Err(CodecError::ScaleOverflow {
            row: 0,
            group: 0,
            ..
        })
    ));
    // bf16 scales have f32's range.
    assert!(encode_rtn(&w, 1, 64, &CodecSpec::parse("q4g32-bf16").unwrap(), None).is_ok());
}

#[test]
fn rejects_overflowing_reconstruction() {
    // Products of 3e38 overflow to inf and then cancel to NaN, whose bits are CPU-specific.
    let qt = random_qt(
        &mut Prng(11),
        2,
        20,
        CodecSpec {
            rank: 2,
            ..CodecSpec::new(2, 32)
        },
        |r, _| r.normal(),
        |_| 1.0,
        |r| if r.below(2) == 0 { 3e38 } else { -3e38 },
    );
    let e = Reconstructor::new(&qt, Kernel::Scalar)
        .unwrap()
        .digest()
        .unwrap_err();
    assert!(
        matches!(e, CodecError::NonFiniteOutput { row: 0, col: 0, .. }),
        "{e}"
    );
}

#[test]
fn rejects_codec_record_whose_name_disagrees_with_fields() {
    let mut r = CodecSpec::new(5, 128).to_record();
    r.name = "q4g128".into();
    assert!(matches!(
        CodecSpec::from_record(&r),
        Err(CodecError::RecordMismatch { .. })
    ));
}

#[test]
fn format_errors_pass_through() {
    let d = tempfile::tempdir().unwrap();
    let e: CodecError = uc_format::Pack::open(d.path()).unwrap_err().into();
    assert!(matches!(
        e,
        CodecError::Format(uc_format::FormatError::Io { .. })
    ));
}
