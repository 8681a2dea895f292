//! Prefill GEMM throughput on one thread: the integer GEMM (`kernels::qgemm`, its
//! activation packing timed apart) against the f32 path (tiles dequantized, `gemm`
//! crate) on the same random packed weight, in one invocation: GMAC/s per shape and the
//! ratio of the f32 time to the integer one (packing included). Prints one JSON document.
//!
//!   cargo run --release -p uc-runtime --example qgemm_speed [REPS] > results/qgemm_speed.json
use std::time::Instant;
use uc_runtime::kernels::dense::{split_columns, Mat};
use uc_runtime::kernels::qint::I16Lut;
use uc_runtime::kernels::quant::{self, QuantRows, CODE_PAD};
use uc_runtime::kernels::{qgemm, Isa};

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let isa = Isa::detect();
    println!(
        "{{\"command\":\"cargo run --release -p uc-runtime --example qgemm_speed {reps}\",\"isa\":\"{}\",\"integer_gemm\":{},\"threads\":1,\"best_of\":{reps},\"shapes\":[",
        isa.name(),
        qgemm::available(isa)
    );
    let mut rng = uc_format::SplitMix64(0x9e37_79b9_7f4a_7c15);
    let mut next = move || rng.next_u64();
    for (k, (rows, cols, bits, n)) in [
        (1536, 576, 6, 512),
        (576, 1536, 6, 512),
        (576, 576, 5, 512),
        (1536, 576, 6, 32),
    ]
    .into_iter()
    .enumerate()
    {
        let group = 64;
        let cb: Vec<f32> = (0..1usize << bits).map(|i| i as f32 / 16.0 - 2.0).collect();
        let cb = quant::periodic_codebook(&cb);
        let scales: Vec<f32> = (0..rows * cols / group)
            .map(|i| 0.01 + (i % 7) as f32 * 0.001)
            .collect();
        let mut codes: Vec<u8> = (0..rows * cols * bits / 8).map(|_| next() as u8).collect();
        codes.extend_from_slice(&[0; CODE_PAD]);
        let q = QuantRows::new(bits, group, cols, &cb, &scales, &codes).unwrap();
        let lut = I16Lut::new(&cb, bits);
        let x: Vec<f32> = (0..n * cols)
            .map(|_| (next() % 2000) as f32 / 1000.0 - 1.0)
            .collect();
        let mut y = vec![0f32; n * rows];
        let tile_rows = uc_runtime::linear::PREFILL_INT_TILE;
        let px = qgemm::pack_x(isa, &x, n, cols, group);
        let pack = best(reps, || drop(qgemm::pack_x(isa, &x, n, cols, group)));
        let int = best(reps, || {
            for mut b in split_columns(
                &mut y,
                n,
                rows,
                &(0..=rows).step_by(tile_rows).collect::<Vec<_>>(),
            ) {
                qgemm::gemm_rows(isa, &q, &lut, &px, b.first(), &mut b.rows_mut());
            }
        });
        let f32_tile = uc_runtime::linear::PREFILL_TILE;
        let mut tile = vec![0f32; f32_tile * cols];
        let f32_path = best(reps, || {
            for mut b in split_columns(
                &mut y,
                n,
                rows,
                &(0..=rows).step_by(f32_tile).collect::<Vec<_>>(),
            ) {
                for (r, row) in tile.chunks_exact_mut(cols).take(b.len()).enumerate() {
                    quant::dequant_row(isa, &q, b.first() + r, row);
                }
                b.gemm(
                    cols,
                    Mat::rows(&x, cols),
                    Mat::rows_t(&tile[..b.len() * cols], cols),
                    false,
                );
            }
        });
        let macs = (rows * cols * n) as f64;
        print!(
            "{}{{\"rows\":{rows},\"cols\":{cols},\"bits\":{bits},\"tokens\":{n},\"int_gmac_s\":{:.2},\"pack_ms\":{:.3},\"f32_gmac_s\":{:.2},\"int_over_f32\":{:.3}}}",
            if k == 0 { "" } else { ",\n" },
            macs / int / 1e9,
            pack * 1e3,
            macs / f32_path / 1e9,
            f32_path / (int + pack)
        );
    }
    println!("]}}");
}

/// Fastest of `reps` timed runs (after one warm-up), seconds.
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}
