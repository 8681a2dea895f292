//! Packs through the runtime: a pack written from a tiny fixture (5-bit codes, some
//! tensors with a low-rank overlay) generates exactly the tokens that the same weights
//! exported as a dense f32 checkpoint generate; streaming changes nothing; a corrupted
//! pack refuses to load with the verify message.

use std::path::Path;
use std::sync::Arc;
mod common;

use common::write_pack;
use uc_codec::pack::reconstruct_tensor;
use uc_codec::Kernel;
use uc_format::{block_container, Pack};
use uc_runtime::weights::{CheckpointLoader, PackLoader};
use uc_runtime::{
    generate, Decoder, DecoderOptions, GenerateOptions, Logits, SamplingParams, Verify,
    WeightLoader,
};

/// The pack's reconstruction as a dense f32 checkpoint (safetensors + config.json).
fn export_dense(pack_dir: &Path, out: &Path) {
    let pack = Pack::open(pack_dir).unwrap();
    std::fs::create_dir_all(out).unwrap();
    std::fs::copy(pack_dir.join("config.json"), out.join("config.json")).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = pack
        .manifest()
        .tensors
        .iter()
        .map(|t| {
            let v = reconstruct_tensor(&pack, &t.name, Kernel::Scalar).unwrap();
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            (
                t.name.clone(),
                t.shape.iter().map(|&d| d as usize).collect(),
                bytes,
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &out.join("model.safetensors")).unwrap();
}

fn greedy(loader: Arc<dyn WeightLoader>, prompt: &[u32], n: usize, stream: bool) -> Vec<u32> {
    let mut dec = Decoder::new(
        loader,
        DecoderOptions {
            capacity: prompt.len() + n,
            stream_layers: stream,
        },
    )
    .unwrap();
    let opts = GenerateOptions {
        max_tokens: n,
        sampling: SamplingParams::default(),
        stop: vec![],
    };
    let mut out = Vec::new();
    generate(&mut dec, prompt, &opts, |t| {
        out.push(t);
        Ok(true)
    })
    .unwrap();
    out
}

const PROMPT: [u32; 6] = [3, 17, 99, 4, 42, 7];

#[test]
fn greedy_generation_from_a_pack_equals_the_same_weights_exported_dense() {
    for name in ["llama", "qwen2", "qwen3", "llama3"] {
        let tmp = tempfile::tempdir().unwrap();
        let (pack, dense) = (tmp.path().join("pack"), tmp.path().join("dense"));
        write_pack(name, &pack);
        export_dense(&pack, &dense);
        let p: Arc<dyn WeightLoader> = Arc::new(PackLoader::open(&pack, Verify::Full).unwrap());
        let d: Arc<dyn WeightLoader> = Arc::new(CheckpointLoader::open(&dense).unwrap());
        let from_pack = greedy(p.clone(), &PROMPT, 24, false);
        let from_dense = greedy(d.clone(), &PROMPT, 24, false);
        assert_eq!(
            from_pack, from_dense,
            "{name}: pack and dense export disagree"
        );
        assert_eq!(
            greedy(p.clone(), &PROMPT, 24, true),
            from_pack,
            "{name}: streaming changed the tokens"
        );
        // And the logits agree closely at every position (fused kernels vs dense f32);
        // streaming blocks, embedding rows and head chunks changes no bit.
        let mut s = Decoder::new(
            p.clone(),
            DecoderOptions {
                capacity: 32,
                stream_layers: true,
            },
        )
        .unwrap();
        let mut a = Decoder::new(p, RESIDENT_32).unwrap();
        let (x, y) = (
            a.forward(&PROMPT, Logits::All).unwrap(),
            s.forward(&PROMPT, Logits::All).unwrap(),
        );
        assert_eq!(x, y, "{name}: streamed logits differ");
        assert!(s.resident_weight_bytes() < a.resident_weight_bytes() / 4);
        a.reset();
        let mut b = Decoder::new(d, RESIDENT_32).unwrap();
        for chunk in [&PROMPT[..], &[5], &[6]] {
            let (x, y) = (
                a.forward(chunk, Logits::All).unwrap(),
                b.forward(chunk, Logits::All).unwrap(),
            );
            let diff = max_abs_diff(&x, &y);
            // One-token steps on AVX2 run the int16 decode kernel (codebook and
            // activations rounded to 15 bits, `kernels::qint`; its per-mat-vec bound is
            // tested in tests/kernels.rs). Through the fixtures' layers that moves the
            // logits by up to ~7e-5 of their largest magnitude (measured: llama 5.6e-4
            // at 2.8, qwen3 3.4e-3 at 51), where the f32 kernels stay within 1e-4.
            let big = y.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let tol = if chunk.len() <= uc_runtime::linear::FUSED_MAX_TOKENS
                && uc_runtime::linear::int_decode(a.isa())
            {
                5e-4 * big
            } else {
                1e-4
            };
            assert!(
                diff < tol,
                "{name}: logits differ by {diff} (tolerance {tol})"
            );
        }
    }
}

#[test]
fn a_corrupted_pack_refuses_to_load_with_the_verify_message() {
    let tmp = tempfile::tempdir().unwrap();
    let pack = tmp.path().join("pack");
    write_pack("llama", &pack);
    let file = pack.join("tensors").join(block_container(1));
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 0x40;
    std::fs::write(&file, bytes).unwrap();
    for verify in [Verify::Full, Verify::FilesOnly] {
        let e = PackLoader::open(&pack, verify)
            .err()
            .expect("a corrupted pack must not open");
        let msg = e.to_string();
        assert!(
            msg.contains("VERIFY: FAIL") && msg.contains("block_0001"),
            "{msg}"
        );
    }
}

#[test]
fn a_pack_with_a_wrong_reconstruction_digest_fails_the_full_check_only() {
    // Rewrite one record's recon_sha256 and re-seal the manifest's fingerprint: the file
    // hashes pass, the reconstruction check catches it.
    let tmp = tempfile::tempdir().unwrap();
    let pack = tmp.path().join("pack");
    write_pack("llama", &pack);
    let path = pack.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let t = m["tensors"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|t| t["name"] == "model.layers.0.mlp.up_proj.weight")
        .unwrap();
    t["recon_sha256"] = serde_json::Value::String("0".repeat(64));
    m["fingerprint"] = serde_json::Value::String(uc_format::fingerprint(&m));
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let full = PackLoader::open(&pack, Verify::Full).unwrap();
    let e = Decoder::new(
        Arc::new(full),
        DecoderOptions {
            capacity: 8,
            stream_layers: false,
        },
    )
    .err()
    .unwrap();
    assert!(
        e.to_string().contains("VERIFY: FAIL") && e.to_string().contains("up_proj"),
        "{e}"
    );
    let e = Decoder::new(
        Arc::new(PackLoader::open(&pack, Verify::Full).unwrap()),
        DecoderOptions {
            capacity: 8,
            stream_layers: true,
        },
    )
    .err()
    .unwrap();
    assert!(
        e.to_string().contains("up_proj"),
        "streaming checks up front too: {e}"
    );
    let files_only = PackLoader::open(&pack, Verify::FilesOnly).unwrap();
    assert!(Decoder::new(
        Arc::new(files_only),
        DecoderOptions {
            capacity: 8,
            stream_layers: false
        }
    )
    .is_ok());
}

/// The largest `|a - b|`.
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

/// The largest `|v|`, at least 1 (a tolerance scale).
fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(1.0f32, |m, x| m.max(x.abs()))
}

/// A resident decoder of 32 positions.
const RESIDENT_32: DecoderOptions = DecoderOptions {
    capacity: 32,
    stream_layers: false,
};

/// The llama fixture packed under `dir`, opened with the full check.
fn llama_pack(dir: &std::path::Path) -> Arc<dyn WeightLoader> {
    let pack = dir.join("pack");
    write_pack("llama", &pack);
    Arc::new(PackLoader::open(&pack, Verify::Full).unwrap())
}

/// A fork (what `uc serve` gives each slot) shares the weights and starts from an empty
/// cache: its logits are the original decoder's bit for bit, whatever state the original
/// is in, and running the fork does not move the original.
#[test]
fn a_fork_shares_weights_and_computes_what_a_fresh_decoder_does() {
    let tmp = tempfile::tempdir().unwrap();
    let p = llama_pack(tmp.path());
    let mut a = Decoder::new(p.clone(), RESIDENT_32).unwrap();
    let want = Decoder::new(p, RESIDENT_32)
        .unwrap()
        .forward(&PROMPT, Logits::All)
        .unwrap();
    a.forward(&PROMPT[..3], Logits::Last).unwrap();
    let mut f = a.fork(32).unwrap();
    assert_eq!(f.position(), 0);
    assert_eq!(f.resident_weight_bytes(), a.resident_weight_bytes());
    let got = f.forward(&PROMPT, Logits::All).unwrap();
    assert!(
        got.iter()
            .zip(&want)
            .all(|(x, y)| x.to_bits() == y.to_bits()),
        "a fork's logits differ from a fresh decoder's"
    );
    assert_eq!(a.position(), 3, "the fork moved the original");
    assert!(a.fork(0).is_err(), "a zero-capacity fork must be refused");
}

/// Generation stores K and V as f16 where the attention kernels read it; the element
/// type is settled before the first token and cannot change under a filled cache.
#[test]
fn generation_keeps_an_f16_cache_chosen_before_the_first_token() {
    use uc_runtime::kernels::{attention, Isa};
    use uc_runtime::kv::KvDtype;
    let tmp = tempfile::tempdir().unwrap();
    let p = llama_pack(tmp.path());
    let mut d = Decoder::new(p.clone(), RESIDENT_32).unwrap();
    assert_eq!(d.kv_dtype(), KvDtype::F32, "scoring keeps the exact cache");
    d.set_fast_prefill(true).unwrap();
    let want = if attention::fast_kernels(d.isa(), d.config().head_dim) {
        KvDtype::F16
    } else {
        KvDtype::F32
    };
    assert_eq!(d.kv_dtype(), want);
    assert_eq!(d.fork(8).unwrap().kv_dtype(), want, "forks inherit it");
    let first = d.forward(&[1, 2, 3], Logits::Last).unwrap();
    if want == KvDtype::F16 {
        assert!(
            d.set_fast_prefill(false).is_err(),
            "a filled cache was retyped"
        );
        assert_eq!(d.kv_dtype(), KvDtype::F16);
        // The refused call changed nothing: the next step reads the cache it wrote.
        let mut again = Decoder::new(p.clone(), RESIDENT_32).unwrap();
        again.set_fast_prefill(true).unwrap();
        assert_eq!(again.forward(&[1, 2, 3], Logits::Last).unwrap(), first);
        assert_eq!(
            d.forward(&[4], Logits::Last).unwrap(),
            again.forward(&[4], Logits::Last).unwrap()
        );
    }
    // The scalar reference reads the f16 cache too (widened per call).
    let mut scalar = Decoder::new(p, RESIDENT_32).unwrap();
    scalar.set_fast_prefill(true).unwrap();
    scalar.set_isa(Isa::Scalar);
    let s = scalar.forward(&[1, 2, 3], Logits::Last).unwrap();
    let (diff, big) = (max_abs_diff(&s, &first), max_abs(&first));
    assert!(
        diff < 5e-3 * big,
        "scalar vs SIMD on the f16 cache: {diff} (max {big})"
    );
}

/// The fast prefill (`Decoder::set_fast_prefill`: the integer GEMM where the CPU has it)
/// against the exact one: logits within the integer kernels' reach, the same greedy
/// tokens, and the same bits on 1 and 2 threads. The fixtures' 64-wide inputs take the
/// integer GEMM; down_proj's 96-wide input keeps the f32 tiles.
#[test]
fn fast_prefill_is_close_to_exact_and_independent_of_the_thread_count() {
    for name in ["llama", "qwen3"] {
        let tmp = tempfile::tempdir().unwrap();
        let pack = tmp.path().join("pack");
        write_pack(name, &pack);
        let p: Arc<dyn WeightLoader> = Arc::new(PackLoader::open(&pack, Verify::Full).unwrap());
        let prompt: Vec<u32> = (0..40u32).map(|i| (i * 37 + 3) % 128).collect();
        let logits = |fast: bool, threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut d = Decoder::new(
                    p.clone(),
                    DecoderOptions {
                        capacity: 64,
                        stream_layers: false,
                    },
                )
                .unwrap();
                d.set_fast_prefill(fast).unwrap();
                d.forward(&prompt, Logits::All).unwrap()
            })
        };
        let exact = logits(false, 2);
        let fast = logits(true, 2);
        assert_eq!(
            fast,
            logits(true, 1),
            "{name}: fast prefill depends on threads"
        );
        if uc_runtime::kernels::qgemm::available(uc_runtime::kernels::Isa::detect()) {
            assert_ne!(fast, exact, "{name}: the integer GEMM did not run");
        }
        // 11-bit activations per group (kernels::qgemm, PREFILL_TOL per mat-vec) move
        // the fixtures' logits by up to ~1e-3 of their largest magnitude (measured:
        // llama 3.3e-3 at 3.9, qwen3 2.5e-2 at 62).
        let (diff, big) = (max_abs_diff(&fast, &exact), max_abs(&exact));
        assert!(
            diff < 5e-3 * big,
            "{name}: fast prefill moved logits by {diff} (max {big})"
        );
        let argmax = |v: &[f32]| {
            v.chunks_exact(128)
                .map(|r| (0..128).max_by(|&i, &j| r[i].total_cmp(&r[j])).unwrap())
                .collect::<Vec<_>>()
        };
        let (a, b) = (argmax(&fast), argmax(&exact));
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        assert!(
            same >= a.len() - 1,
            "{name}: top-1 agrees at {same} of {} positions",
            a.len()
        );
    }
}
