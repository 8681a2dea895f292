//! Throughput of the fused mat-vec and row dequantization per codec, one thread and
//! (mat-vec) all rayon threads, wall time: `REPS=500 kernel_bench [rows] [cols]`.
//! On a shared machine, run it a few times: other processes slow any single run.
use std::time::Instant;
use uc_codec::{pack_codes, CodecSpec};
use uc_runtime::kernels::quant::{self, QuantRows, CODE_PAD};
use uc_runtime::kernels::{dense, Isa};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rows: usize = args.get(1).map_or(4096, |s| s.parse().unwrap());
    let cols: usize = args.get(2).map_or(576, |s| s.parse().unwrap());
    let isa = Isa::detect();
    for (bits, group) in [(5usize, 128usize), (4, 128), (8, 64), (6, 128), (3, 64)] {
        let spec = CodecSpec::new(bits as u8, group as u32);
        let l = spec.layout(rows, cols).unwrap();
        let raw: Vec<f32> = (0..l.codebook).map(|i| i as f32 / 100.0 - 1.0).collect();
        let cb = quant::periodic_codebook(&raw);
        let scales = vec![0.01f32; l.scales];
        let idx: Vec<u8> = (0..rows * cols)
            .map(|i| ((i * 2654435761) >> 7) as u8 & ((1 << bits) - 1) as u8)
            .collect();
        let mut codes = pack_codes(&idx, rows, cols, bits as u32);
        codes.extend_from_slice(&[0; CODE_PAD]);
        let q = QuantRows::new(bits, group, cols, &cb, &scales, &codes).unwrap();
        let x: Vec<f32> = (0..cols).map(|i| (i as f32).sin()).collect();
        let mut y = vec![0f32; rows];
        let reps = std::env::var("REPS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(50);
        let t = Instant::now();
        for _ in 0..reps {
            quant::dot_rows(isa, &q, &x, 0, &mut y);
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        let mut row = vec![0f32; cols];
        let t = Instant::now();
        for _ in 0..reps {
            for i in 0..rows {
                quant::dequant_row(isa, &q, i, &mut row);
            }
        }
        let d = t.elapsed().as_secs_f64() / reps as f64;
        use rayon::prelude::*;
        let t = Instant::now();
        for _ in 0..reps {
            y.par_chunks_mut(64)
                .enumerate()
                .for_each(|(c, yc)| quant::dot_rows(isa, &q, &x, c * 64, yc));
        }
        let sp = t.elapsed().as_secs_f64() / reps as f64;
        println!("q{bits}g{group} {rows}x{cols}: matvec {:.2} Gweights/s ({:.2} GB/s codes), on {} threads {:.2}; dequant {:.2} Gweights/s",
            (rows * cols) as f64 / s / 1e9, codes.len() as f64 / s / 1e9,
            rayon::current_num_threads(), (rows * cols) as f64 / sp / 1e9, (rows * cols) as f64 / d / 1e9);
    }
    let w: Vec<f32> = (0..rows * cols).map(|i| (i as f32).cos()).collect();
    let x: Vec<f32> = (0..cols).map(|i| (i as f32).sin()).collect();
    let mut y = vec![0f32; rows];
    let t = Instant::now();
    for _ in 0..50 {
        dense::matvec(isa, &w, cols, &x, &mut y);
    }
    let s = t.elapsed().as_secs_f64() / 50.0;
    println!(
        "dense f32: {:.2} Gweights/s ({:.2} GB/s)",
        (rows * cols) as f64 / s / 1e9,
        (rows * cols * 4) as f64 / s / 1e9
    );
}
