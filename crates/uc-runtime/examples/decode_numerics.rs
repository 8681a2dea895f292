//! How far the integer decode kernel (`kernels::qint`: AVX2, or AVX-512 VBMI) moves a real model's logits
//! from the f32 fused kernel: prefill a seeded prompt, then decode greedily with each
//! path on its own decoder and report, per step, max |logit difference|, the logits'
//! standard deviation and whether the argmax agrees. The f32 path is chosen by
//! `UC_MATVEC=f32`, read once per process, so this runs itself twice as a child.
//!
//!   cargo run --release -p uc-runtime --example decode_numerics -- PACK [prompt] [steps]

use std::sync::Arc;
use uc_runtime::weights::PackLoader;
use uc_runtime::{Decoder, DecoderOptions, Logits, Verify, WeightLoader};

fn logits_trace(pack: &str, prompt: usize, steps: usize) -> Vec<Vec<f32>> {
    let loader: Arc<dyn WeightLoader> =
        Arc::new(PackLoader::open(std::path::Path::new(pack), Verify::FilesOnly).unwrap());
    let vocab = loader.config().vocab_size as u64;
    let mut dec = Decoder::new(
        loader,
        DecoderOptions {
            capacity: prompt + steps + 1,
            stream_layers: false,
        },
    )
    .unwrap();
    let mut s = 12345u64;
    let ids: Vec<u32> = (0..prompt)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % vocab) as u32
        })
        .collect();
    dec.forward(&ids, Logits::Last).unwrap();
    // Decode a fixed token sequence (the same for both paths) so the steps compare.
    (0..steps)
        .map(|k| {
            dec.forward(&[(k as u32 * 7919) % vocab as u32], Logits::Last)
                .unwrap()
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let pack = args.get(1).expect("PACK").clone();
    let prompt: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(64);
    let steps: usize = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(16);
    if std::env::var("DECODE_NUMERICS_CHILD").is_ok() {
        let t = logits_trace(&pack, prompt, steps);
        let bytes: Vec<u8> = t.iter().flatten().flat_map(|v| v.to_le_bytes()).collect();
        std::io::Write::write_all(&mut std::io::stdout(), &bytes).unwrap();
        return;
    }
    let run = |f32_path: bool| -> Vec<f32> {
        let mut c = std::process::Command::new(&args[0]);
        c.args(&args[1..]).env("DECODE_NUMERICS_CHILD", "1");
        if f32_path {
            c.env("UC_MATVEC", "f32");
        } else {
            c.env_remove("UC_MATVEC");
        }
        let out = c.output().unwrap();
        out.stdout
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    let (a, b) = (run(true), run(false));
    let vocab = a.len() / steps;
    let mut worst = 0.0f32;
    let mut agree = 0;
    for k in 0..steps {
        let (x, y) = (
            &a[k * vocab..(k + 1) * vocab],
            &b[k * vocab..(k + 1) * vocab],
        );
        let d = x
            .iter()
            .zip(y)
            .map(|(u, v)| (u - v).abs())
            .fold(0.0f32, f32::max);
        let mean = x.iter().sum::<f32>() / vocab as f32;
        let sd = (x.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / vocab as f32).sqrt();
        let am = |z: &[f32]| (0..vocab).max_by(|&i, &j| z[i].total_cmp(&z[j])).unwrap();
        let same = am(x) == am(y);
        agree += usize::from(same);
        worst = worst.max(d);
        println!("step {k}: max |dlogit| {d:.5}  logit sd {sd:.3}  argmax same {same}");
    }
    println!("{{\"steps\": {steps}, \"max_abs_logit_diff\": {worst}, \"argmax_agree\": {agree}}}");
}
