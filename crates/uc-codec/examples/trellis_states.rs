//! Would a trellis with more states pay? `trellis_states [SAMPLES] > results/trellis_states.json`
//!
//! The codec's trellis ([`uc_codec::trellis`]) has 4 states: the branch bits of the two
//! rows above. This experiment generalises it to 2^K states (the branch bits of the K
//! rows above, `s` with bit 0 = row r-1) with subset `j = p(s & m0) + 2 (u ^ p(s & m1))`,
//! `p` the parity: the first subset bit depends on the state only, so both branches of a
//! state stay inside one half of the union codebook, as in Ungerboeck's 4-state trellis
//! (K = 2, m0 = 0b01, m1 = 0b10, which is exactly the codec's `union_index`). For each K
//! it searches every mask pair on a quarter of the samples and scores the best on all of
//! them: squared error against a plain `b`-bit uniform grid at the same stored bits, on a
//! uniform and a Gaussian (sd 1/3, clipped by the grid) source, runs of 64 values. The
//! K = 2 row is cross-checked against the codec's own Viterbi search
//! ([`uc_codec::trellis::quantize_run`]).
//!
//! Result (docs/research-log.md, 2026-12-04): 8 to 32 states cut the error by only 1-3%
//! beyond the 4-state trellis here, so the codec keeps 4 states.

use uc_codec::trellis::{quantize_run, TRELLIS_ROWS};

fn parity(x: usize) -> usize {
    (x.count_ones() & 1) as usize
}

/// Squared error of the nearest level of subset `j` (entries j, j+4, ... of `cb`).
fn nearest(x: f32, cb: &[f32], j: usize) -> f64 {
    cb.iter()
        .skip(j)
        .step_by(4)
        .map(|&c| f64::from(x - c).powi(2))
        .fold(f64::INFINITY, f64::min)
}

/// Total squared error of the 2^k-state Viterbi search over runs of [`TRELLIS_ROWS`].
fn viterbi(xs: &[f32], cb: &[f32], k: usize, m0: usize, m1: usize) -> f64 {
    let n = 1usize << k;
    let mut total = 0.0;
    for run in xs.chunks(TRELLIS_ROWS) {
        let mut cost = vec![f64::INFINITY; n];
        cost[0] = 0.0;
        let mut next = vec![f64::INFINITY; n];
        for &x in run {
            let e: [f64; 4] = std::array::from_fn(|j| nearest(x, cb, j));
            next.fill(f64::INFINITY);
            for (s, &c) in cost.iter().enumerate() {
                if !c.is_finite() {
                    continue;
                }
                for u in 0..2 {
                    let j = parity(s & m0) + 2 * (u ^ parity(s & m1));
                    let ns = ((s << 1) | u) & (n - 1);
                    next[ns] = next[ns].min(c + e[j]);
                }
            }
            std::mem::swap(&mut cost, &mut next);
        }
        total += cost.iter().copied().fold(f64::INFINITY, f64::min);
    }
    total
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let samples: usize = std::env::args().nth(1).map_or(Ok(65536), |s| s.parse())?;
    let mut rows = Vec::new();
    for source in ["uniform", "gaussian"] {
        let mut rng = uc_format::SplitMix64(7);
        let xs: Vec<f32> = (0..samples)
            .map(|_| match source {
                "uniform" => rng.sym(),
                _ => rng.normal() / 3.0,
            })
            .collect();
        for bits in [3usize, 5] {
            let n = 1usize << (bits + 1);
            let cb: Vec<f32> = (0..n)
                .map(|k| (k as f32 + 0.5) / n as f32 * 2.0 - 1.0)
                .collect();
            let nb = 1usize << bits;
            let scalar: f64 = xs
                .iter()
                .map(|&x| {
                    let k = (((x + 1.0) / 2.0 * nb as f32).floor().max(0.0) as usize).min(nb - 1);
                    f64::from(x - ((k as f32 + 0.5) / nb as f32 * 2.0 - 1.0)).powi(2)
                })
                .sum();
            // The codec's own search, for the K = 2 cross-check.
            let mut codec = 0.0;
            for run in xs.chunks(TRELLIS_ROWS) {
                let mut out = vec![0u8; run.len()];
                codec += quantize_run(run, &vec![1.0; run.len()], &cb, &mut out);
            }
            let k2 = viterbi(&xs, &cb, 2, 0b01, 0b10);
            assert!(
                (k2 - codec).abs() <= 1e-9 * codec,
                "generalised K=2 search {k2} != codec {codec}"
            );
            let screen = &xs[..samples / 4];
            for k in 2..=5usize {
                let mut best = (f64::INFINITY, 0b01, 0b10);
                for m0 in 1..1usize << k {
                    for m1 in 1..1usize << k {
                        if (m0 | m1) >> (k - 1) == 0 {
                            continue; // the oldest bit unused: fewer states in fact
                        }
                        let e = viterbi(screen, &cb, k, m0, m1);
                        if e < best.0 {
                            best = (e, m0, m1);
                        }
                    }
                }
                let e = viterbi(&xs, &cb, k, best.1, best.2);
                rows.push(serde_json::json!({
                    "source": source, "bits": bits, "states": 1 << k,
                    "m0": best.1, "m1": best.2,
                    "error_vs_scalar": e / scalar,
                    "error_vs_4_states": e / codec,
                }));
            }
        }
    }
    let out = serde_json::json!({
        "command": "cargo run --release -p uc-codec --example trellis_states",
        "samples": samples, "run_rows": TRELLIS_ROWS, "rows": rows,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
