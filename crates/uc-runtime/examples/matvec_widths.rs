//! Micro-benchmark of the decode mat-vecs (f32 `quant::dot_rows`, int16 `qint`) per code
//! width, one thread:
//! nanoseconds and cycles (at the nominal `--ghz`) per weight on a `(rows, cols)` matrix
//! of random codes. Used to find which widths are slow (research log, 2026-12-03).
//!
//!   cargo run --release -p uc-runtime --example matvec_widths -- [rows] [cols] [ghz]

use std::time::Instant;
use uc_runtime::kernels::qint;
use uc_runtime::kernels::quant::{self, QuantRows, CODE_PAD};
use uc_runtime::kernels::Isa;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rows: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1536);
    let cols: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(576);
    let ghz: f64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let x: Vec<f32> = (0..cols)
        .map(|_| (next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        .collect();
    for isa in Isa::ALL.into_iter().filter(|i| i.is_available()) {
        for (bits, group) in [
            (2, 64),
            (3, 64),
            (4, 64),
            (5, 64),
            (6, 64),
            (8, 64),
            (8, 32),
        ] {
            let cb: Vec<f32> = (0..1usize << bits).map(|i| i as f32 * 0.01 - 0.3).collect();
            let cb = quant::periodic_codebook(&cb);
            let ng = cols.div_ceil(group);
            let scales: Vec<f32> = (0..rows * ng).map(|i| 0.5 + (i % 7) as f32 * 0.1).collect();
            let row_bytes = (cols * bits).div_ceil(8);
            let mut codes: Vec<u8> = (0..rows * row_bytes).map(|_| next() as u8).collect();
            codes.extend_from_slice(&[0; CODE_PAD]);
            let q = QuantRows::new(bits, group, cols, &cb, &scales, &codes).unwrap();
            let mut y = vec![0f32; rows];
            let reps = if isa == Isa::Scalar { 3 } else { 300 };
            quant::dot_rows(isa, &q, &x, 0, &mut y);
            let t = Instant::now();
            for _ in 0..reps {
                quant::dot_rows(isa, &q, &x, 0, &mut y);
                std::hint::black_box(&y);
            }
            let ns = t.elapsed().as_secs_f64() * 1e9 / (reps * rows * cols) as f64;
            println!(
                "{:7} q{bits}g{group:<3} {rows}x{cols}: {ns:.3} ns/weight, {:.2} cycles/weight at {ghz} GHz",
                isa.name(),
                ns * ghz
            );
            if isa == Isa::Scalar {
                continue;
            }
            let lut = qint::I16Lut::new(&cb, bits);
            let px = qint::prepare_x(&x, group, qint::order(isa, bits, cols));
            let t = Instant::now();
            for _ in 0..reps {
                qint::dot_rows_i16(isa, &q, &lut, &px, &x, 0, &mut y);
                std::hint::black_box(&y);
            }
            let ns = t.elapsed().as_secs_f64() * 1e9 / (reps * rows * cols) as f64;
            println!(
                "{:7} q{bits}g{group:<3} {rows}x{cols}: {ns:.3} ns/weight, {:.2} cycles/weight at {ghz} GHz (int16)",
                isa.name(),
                ns * ghz
            );
        }
    }
}
