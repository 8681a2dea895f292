//! The staged block API (`uc_runtime::staged`, what `uc compress` runs) is the decoder's
//! block math: the same bits as the decoder's prefill for one window, a paused forward
//! resumed with changed weights equals the changed block's forward, independent windows
//! in one batch do not see each other, and the bits do not depend on the thread count.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use uc_runtime::kernels::math;
use uc_runtime::linear::{self, DenseLinear, Op};
use uc_runtime::staged::{Stager, Step, Tap};
use uc_runtime::weights::{BlockWeights, CheckpointLoader};
use uc_runtime::{Decoder, DecoderOptions, Logits, WeightLoader};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../uc-model/tests/fixtures")
        .join(name)
}

fn loader(name: &str) -> Arc<dyn WeightLoader> {
    Arc::new(CheckpointLoader::open(&fixture(name)).unwrap())
}

fn ids(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2654435761) ^ seed) % 128)
        .collect()
}

/// Embedding rows of `ids`, `(ids.len(), hidden)`.
fn embed(l: &dyn WeightLoader, ids: &[u32]) -> Vec<f32> {
    let g = l.globals().unwrap();
    let h = l.config().hidden_size;
    let isa = uc_runtime::kernels::Isa::detect();
    let mut x = vec![0f32; ids.len() * h];
    for (row, &id) in x.chunks_exact_mut(h).zip(ids) {
        g.embed.row_into(isa, id as usize, row);
    }
    x
}

/// Every block of the model through the stager, `x (rows, hidden)`.
fn all_blocks(l: &dyn WeightLoader, st: &Stager, mut x: Vec<f32>) -> Vec<f32> {
    for layer in 0..l.config().num_layers {
        x = st.forward(&l.block(layer).unwrap(), x).unwrap();
    }
    x
}

#[test]
fn one_window_gives_the_decoders_logits_bit_for_bit() {
    for name in [
        "llama",
        "qwen2",
        "qwen3",
        "mistral",
        "llama3",
        "mixtral",
        "qwen3_moe",
        "mamba",
    ] {
        let l = loader(name);
        let n = 150; // several key tiles and query blocks
        let ids = ids(n, 3);
        let mut dec = Decoder::new(
            l.clone(),
            DecoderOptions {
                capacity: n,
                stream_layers: false,
            },
        )
        .unwrap();
        let want = dec.forward(&ids, Logits::All).unwrap();
        let st = Stager::new(l.config(), n).unwrap();
        let x = all_blocks(l.as_ref(), &st, embed(l.as_ref(), &ids));
        let g = l.globals().unwrap();
        let mut xn = vec![0f32; x.len()];
        math::rms_norm(&x, &g.norm, l.config().rms_norm_eps as f32, &mut xn);
        let head = Op {
            w: g.head.as_ref(),
            bias: None,
        };
        let got = linear::forward(st.isa(), &[head], &xn, n).pop().unwrap();
        assert_eq!(got, want, "{name}");
    }
}

/// `b`'s linears read at tap `from` or later scaled by `f` (the weights a compressor
/// would swap in).
fn scaled(l: &dyn WeightLoader, layer: usize, from: Tap, f: f32) -> BlockWeights {
    let mut b = l.block(layer).unwrap();
    for k in 0..b.linears.len() {
        if Tap::of_block_linear(&b, k).index() < from.index() {
            continue;
        }
        let w = &b.linears[k];
        let (rows, cols) = (w.rows(), w.cols());
        let mut buf = Vec::new();
        let v: Vec<f32> = w
            .weight_f32(uc_runtime::kernels::Isa::Scalar, &mut buf)
            .iter()
            .map(|x| x * f)
            .collect();
        b.linears[k] = Box::new(DenseLinear::new("w", v, rows, cols).unwrap());
    }
    b
}

#[test]
fn a_paused_forward_resumed_with_changed_weights_is_the_changed_blocks_forward() {
    // qwen3: dense; mixtral: MoE (expert weights changed from the tap on, router not);
    // mamba: in_proj, x_proj, dt_proj, out_proj one tap each, conv / scan state carried.
    for name in ["qwen3", "mixtral", "mamba"] {
        paused_then_changed(name);
    }
}

fn paused_then_changed(name: &str) {
    let l = loader(name);
    let (seqs, n) = (2, 70);
    let st = Stager::new(l.config(), n).unwrap();
    let x = embed(l.as_ref(), &ids(seqs * n, 5));
    let block = l.block(0).unwrap();
    let experts = block.experts();
    for tap in Tap::ALL {
        // The original block paused at `tap`; the changed block differs from there on.
        let changed = scaled(l.as_ref(), 0, tap, 0.9);
        let mut p = st.begin(&block, x.clone()).unwrap();
        while p.tap() != tap {
            p = match st.resume(&block, p) {
                Step::Paused(p) => p,
                Step::Done(_) => unreachable!(),
            };
        }
        assert_eq!(p.rows(), seqs * n);
        assert_eq!(p.seqs(), seqs);
        if experts > 0 && matches!(tap, Tap::Mlp | Tap::MlpDown) {
            let r = p.routes().expect("a MoE pause carries its routes");
            assert_eq!(r.assignments(), seqs * n * 2, "{name}: top-2");
            let want_rows = if tap == Tap::Mlp {
                seqs * n
            } else {
                r.assignments()
            };
            assert_eq!(p.input().len(), want_rows * p.cols());
        }
        // Compacted (input dropped, recomputed on resume by the weights that made it).
        let mut c = p.clone();
        c.compact();
        assert!(c.input().is_empty());
        let got = st.finish(&changed, p);
        assert_eq!(
            got,
            st.forward(&changed, x.clone()).unwrap(),
            "{name} {tap:?}"
        );
        // `changed` keeps the linears before `tap`, which recompute the input.
        assert_eq!(got, st.finish(&changed, c), "{name} {tap:?} compacted");
        assert_ne!(
            got,
            st.forward(&block, x.clone()).unwrap(),
            "{name} {tap:?}"
        );
    }
}

#[test]
fn moe_windows_in_one_batch_match_each_window_alone() {
    for name in ["mixtral", "qwen3_moe"] {
        let l = loader(name);
        let (seqs, n) = (3, 40);
        let h = l.config().hidden_size;
        let st = Stager::new(l.config(), n).unwrap();
        let x = embed(l.as_ref(), &ids(seqs * n, 7));
        let batch = all_blocks(l.as_ref(), &st, x.clone());
        for s in 0..seqs {
            let rows = s * n * h..(s + 1) * n * h;
            let alone = all_blocks(l.as_ref(), &st, x[rows.clone()].to_vec());
            let worst = alone
                .iter()
                .zip(&batch[rows])
                .map(|(a, b)| (a - b).abs() / (1.0 + a.abs()))
                .fold(0f32, f32::max);
            assert!(worst <= 1e-5, "{name} window {s}: {worst}");
        }
    }
}

#[test]
fn windows_in_one_batch_are_independent() {
    // mamba: each window's conv and scan start from zero state.
    for name in ["llama", "mistral", "qwen2", "mamba"] {
        let l = loader(name);
        let (seqs, n) = (3, 90);
        let h = l.config().hidden_size;
        let st = Stager::new(l.config(), n).unwrap();
        let x = embed(l.as_ref(), &ids(seqs * n, 7));
        let batch = all_blocks(l.as_ref(), &st, x.clone());
        for s in 0..seqs {
            let rows = s * n * h..(s + 1) * n * h;
            let alone = all_blocks(l.as_ref(), &st, x[rows.clone()].to_vec());
            let worst = alone
                .iter()
                .zip(&batch[rows])
                .map(|(a, b)| (a - b).abs() / (1.0 + a.abs()))
                .fold(0f32, f32::max);
            assert!(worst <= 1e-5, "{name} window {s}: {worst}");
        }
    }
}

#[test]
fn the_bits_do_not_depend_on_the_thread_count() {
    for (name, layer) in [("qwen2", 1), ("mixtral", 0), ("qwen3_moe", 2), ("mamba", 1)] {
        bits_on_1_and_2_threads(name, layer);
    }
}

fn bits_on_1_and_2_threads(name: &str, layer: usize) {
    let l = loader(name);
    let (seqs, n) = (3, 150);
    let st = Stager::new(l.config(), n).unwrap();
    let x = embed(l.as_ref(), &ids(seqs * n, 11));
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let b = l.block(layer).unwrap();
            // Every tap's input and the output.
            let mut taps = Vec::new();
            let mut p = st.begin(&b, x.clone()).unwrap();
            loop {
                taps.push(p.input().to_vec());
                match st.resume(&b, p) {
                    Step::Paused(next) => p = next,
                    Step::Done(y) => {
                        taps.push(y);
                        break taps;
                    }
                }
            }
        })
    };
    assert_eq!(run(1), run(2), "{name}");
}

#[test]
fn rejects_inputs_that_are_not_whole_windows() {
    let l = loader("llama");
    let st = Stager::new(l.config(), 10).unwrap();
    let b = l.block(0).unwrap();
    let h = l.config().hidden_size;
    assert!(st.begin(&b, vec![0.0; 15 * h]).is_err());
    assert!(st.begin(&b, Vec::new()).is_err());
    assert!(Stager::new(l.config(), 0).is_err());
}
