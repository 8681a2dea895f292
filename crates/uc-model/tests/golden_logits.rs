//! Golden test: our forward pass against Hugging Face transformers.
//!
//! Each fixture under tests/fixtures/ is a tiny random model made by
//! scripts/make_fixtures.py with transformers (fp32, eager attention), with
//! `io.safetensors` holding its `input_ids` (I64, (batch, seq)) and the logits
//! transformers computed for them (F32, (batch, seq, vocab)).

use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use uc_model::checkpoint::Checkpoint;
use uc_model::llama::Model;
use uc_model::source::WeightSource;

const TOLERANCE: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Max |ours - transformers| over all logits of a fixture.
fn max_logit_diff(name: &str) -> f32 {
    let dir = fixture(name);
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).unwrap();
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let want = &io["logits"];
    let ck = Checkpoint::open(&dir).unwrap();
    let (_, seq) = ids.dims2().unwrap();
    let model = Model::load(&ck, seq).unwrap();
    let got: Tensor = model.forward(&ids).unwrap();
    assert_eq!(got.dims(), want.dims(), "{name}: logits shape");
    (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

macro_rules! golden {
    ($($test:ident => $name:literal),* $(,)?) => {$(
        #[test]
        fn $test() {
            let d = max_logit_diff($name);
            assert!(d <= TOLERANCE, "{}: max |logit diff| {d} > {TOLERANCE}", $name);
        }
    )*};
}

golden! {
    llama_logits_match_transformers => "llama",
    llama3_rope_scaling_tied_logits_match_transformers => "llama3",
    mistral_logits_match_transformers => "mistral",
    qwen2_qkv_bias_logits_match_transformers => "qwen2",
    qwen3_qk_norm_logits_match_transformers => "qwen3",
    bf16_sharded_checkpoint_logits_match_transformers => "llama_bf16_sharded",
}

/// A wrong weight must move the logits past the tolerance: the test can fail.
#[test]
fn a_perturbed_weight_is_detected() {
    struct Perturbed(Checkpoint);
    impl uc_model::source::WeightSource for Perturbed {
        fn config(&self) -> &uc_model::config::ModelConfig {
            self.0.config()
        }
        fn tensor(&self, name: &str) -> uc_model::error::Result<Tensor> {
            let t = self.0.tensor(name)?;
            if name == "model.layers.1.mlp.down_proj.weight" {
                return Ok((t * 1.01)?);
            }
            Ok(t)
        }
        fn contains(&self, name: &str) -> bool {
            self.0.contains(name)
        }
        fn fingerprint(&self) -> uc_model::error::Result<String> {
            self.0.fingerprint()
        }
        fn describe(&self) -> String {
            "perturbed".into()
        }
    }
    let dir = fixture("llama");
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).unwrap();
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let src = Perturbed(Checkpoint::open(&dir).unwrap());
    let model = Model::load(&src, 64).unwrap();
    let got = model.forward(&ids).unwrap();
    let d = (got - &io["logits"])
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    assert!(d.to_scalar::<f32>().unwrap() > TOLERANCE);
}

/// A forward paused at a tap and finished by a block whose later linears changed equals
/// that block's whole forward, bit for bit (the compressor's stage-by-stage encoding and
/// its sensitivity probe rely on this).
#[test]
fn paused_forward_resumed_with_changed_weights_is_bit_identical() {
    use uc_model::llama::{Block, RotaryTables, Step, Tap};
    let ck = Checkpoint::open(&fixture("qwen3")).unwrap();
    let cfg = ck.config().clone();
    let block = Block::load(&ck, 0).unwrap();
    let rope = RotaryTables::new(&cfg.rope, cfg.head_dim, 7).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 7, cfg.hidden_size), &Device::Cpu).unwrap();
    let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(
        bits(&block.finish(block.begin(&x).unwrap(), &rope).unwrap()),
        bits(&block.forward(&x, &rope).unwrap())
    );
    // Change o, gate, up and down; pause the original block before o.
    let mut changed = block.clone();
    for k in 3..7 {
        let w = &changed.linears[k].weight;
        changed.linears[k].weight = (w * 0.9).unwrap();
    }
    let mut p = block.begin(&x).unwrap();
    while p.tap != Tap::AttentionOutput {
        p = match block.resume(p, &rope).unwrap() {
            Step::Paused(n) => n,
            Step::Done(_) => unreachable!(),
        };
    }
    assert_eq!(
        bits(&changed.finish(p, &rope).unwrap()),
        bits(&changed.forward(&x, &rope).unwrap())
    );
}
