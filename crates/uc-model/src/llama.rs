//! The Llama family forward pass (llama, SmolLM, mistral, qwen2, qwen3), f32 on CPU.
//!
//! Sections in data-flow order: rotary tables -> linear -> attention -> MLP ->
//! block -> model. A [`Block`] owns its weights and has its own `forward`, so the
//! compressor can load, run and drop one block at a time; [`Model`] strings them
//! together and returns logits for every position (not just the last).
//!
//! Numerics follow Hugging Face transformers' eager implementation: rotary
//! frequencies computed in f32, scores `q k^T / sqrt(head_dim)` + causal mask,
//! softmax in f32, RMSNorm `w * x / sqrt(mean(x^2) + eps)`.

use crate::checkpoint::check_shape;
use crate::config::{Family, ModelConfig, Rope};
use crate::error::Result;
use crate::source::WeightSource;
use candle_core::{DType, Device, Tensor};

/// Cos/sin tables for rotary embeddings, shape `(max_positions, head_dim / 2)`.
#[derive(Clone)]
pub struct RotaryTables {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryTables {
    /// Tables for positions `0..positions`.
    pub fn new(rope: &Rope, head_dim: usize, positions: usize) -> Result<Self> {
        let inv_freq = inverse_frequencies(rope, head_dim);
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for &f in &inv_freq {
                // f32 product as transformers computes it (t.float() @ inv_freq).
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(RotaryTables {
            cos: Tensor::from_vec(cos, (positions, half), &Device::Cpu)?,
            sin: Tensor::from_vec(sin, (positions, half), &Device::Cpu)?,
        })
    }

    /// Rotates `x` of shape `(batch, heads, seq, head_dim)` for positions `start..start+seq`.
    fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let seq = x.dim(2)?;
        let cos = self.cos.narrow(0, start, seq)?;
        let sin = self.sin.narrow(0, start, seq)?;
        Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?)
    }
}

/// `1 / theta^(2i / d)` in f32, with Llama-3 scaling when configured (shared with the
/// runtime, so both forward passes rotate identically).
pub fn inverse_frequencies(rope: &Rope, head_dim: usize) -> Vec<f32> {
    let base = rope.theta as f32;
    let inv: Vec<f32> = (0..head_dim / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let Some(s) = &rope.llama3 else { return inv };
    let (factor, lo, hi, old) = (
        s.factor as f32,
        s.low_freq_factor as f32,
        s.high_freq_factor as f32,
        s.original_max_position_embeddings as f32,
    );
    let low_wavelen = old / lo;
    let high_wavelen = old / hi;
    inv.into_iter()
        .map(|f| {
            let wavelen = 2.0 * std::f32::consts::PI / f;
            if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / factor
            } else {
                let smooth = (old / wavelen - lo) / (hi - lo);
                (1.0 - smooth) * f / factor + smooth * f
            }
        })
        .collect()
}

/// A linear layer `y = x W^T (+ b)`; `W` is `(out, in)`.
#[derive(Clone)]
pub struct Linear {
    /// Weight, `(out, in)`.
    pub weight: Tensor,
    /// Optional bias, `(out,)`.
    pub bias: Option<Tensor>,
}

impl Linear {
    fn load(
        src: &dyn WeightSource,
        name: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Self> {
        let wname = format!("{name}.weight");
        let weight = src.tensor(&wname)?;
        check_shape(&wname, &weight, &[out, inp])?;
        let bias = if bias {
            let bname = format!("{name}.bias");
            let b = src.tensor(&bname)?;
            check_shape(&bname, &b, &[out])?;
            Some(b)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// `x`: `(rows, in)` -> `(rows, out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.weight.t()?)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Names of the seven linear weights of a block, relative to `model.layers.N.`.
pub const BLOCK_LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// The four distinct inputs of a block's linears (q/k/v share one, gate/up share one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tap {
    /// Normed residual into q, k, v: `(rows, hidden)`.
    Attention,
    /// Attention context into o: `(rows, heads * head_dim)`.
    AttentionOutput,
    /// Normed residual into gate, up: `(rows, hidden)`.
    Mlp,
    /// SwiGLU activation into down: `(rows, intermediate)`.
    MlpDown,
}

/// One transformer block: attention and a SwiGLU MLP, each behind an RMSNorm.
#[derive(Clone)]
pub struct Block {
    /// Attention input norm weight, `(hidden,)`.
    pub input_norm: Tensor,
    /// MLP input norm weight, `(hidden,)`.
    pub post_attn_norm: Tensor,
    /// Per-head q/k norms (qwen3), `(head_dim,)` each.
    pub qk_norm: Option<(Tensor, Tensor)>,
    /// q, k, v, o, gate, up, down -- in [`BLOCK_LINEARS`] order.
    pub linears: [Linear; 7],
    cfg: ModelConfig,
}

/// The tensor-name prefix of block `layer`.
pub fn block_prefix(layer: usize) -> String {
    format!("model.layers.{layer}")
}

impl Block {
    /// Loads block `layer` from `src`, checking every shape against the config.
    pub fn load(src: &dyn WeightSource, layer: usize) -> Result<Self> {
        let cfg = src.config().clone();
        let p = block_prefix(layer);
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (q_out, kv_out) = (
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
        let shapes = [
            (q_out, h),
            (kv_out, h),
            (kv_out, h),
            (h, q_out),
            (i, h),
            (i, h),
            (h, i),
        ];
        let mut linears = Vec::with_capacity(7);
        for (k, (name, (o, n))) in BLOCK_LINEARS.iter().zip(shapes).enumerate() {
            let bias = cfg.attention_bias && k < 3;
            linears.push(Linear::load(src, &format!("{p}.{name}"), o, n, bias)?);
        }
        let norm = |name: String, n: usize| -> Result<Tensor> {
            let t = src.tensor(&name)?;
            check_shape(&name, &t, &[n])?;
            Ok(t)
        };
        let qk_norm = if cfg.family == Family::Qwen3 {
            Some((
                norm(format!("{p}.self_attn.q_norm.weight"), cfg.head_dim)?,
                norm(format!("{p}.self_attn.k_norm.weight"), cfg.head_dim)?,
            ))
        } else {
            None
        };
        Ok(Block {
            input_norm: norm(format!("{p}.input_layernorm.weight"), h)?,
            post_attn_norm: norm(format!("{p}.post_attention_layernorm.weight"), h)?,
            qk_norm,
            linears: linears
                .try_into()
                .map_err(|_| candle_core::Error::Msg("seven linears".into()))?,
            cfg,
        })
    }

    /// `x`: `(batch, seq, hidden)` at positions `0..seq` -> same shape.
    pub fn forward(&self, x: &Tensor, rope: &RotaryTables) -> Result<Tensor> {
        self.forward_tapped(x, rope, &mut |_, _| Ok(()))
    }

    /// [`Block::forward`], also handing each linear group's input to `tap` as it is
    /// computed: `(Tap, (batch*seq, in_features))`. The compressor collects its
    /// statistics (Gram matrices) this way.
    pub fn forward_tapped(
        &self,
        x: &Tensor,
        rope: &RotaryTables,
        tap: &mut dyn FnMut(Tap, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let mut p = self.begin(x)?;
        loop {
            tap(p.tap, &p.input)?;
            match self.resume(p, rope)? {
                Step::Paused(next) => p = next,
                Step::Done(y) => return Ok(y),
            }
        }
    }

    /// Starts a forward of `x` `(batch, seq, hidden)`, paused at [`Tap::Attention`].
    /// With [`Block::resume`] a caller can change the linears after a tap (the
    /// compressor quantizes stage by stage) and continue without recomputing what came
    /// before; the result is bit-identical to [`Block::forward`] with the weights each
    /// stage ran with.
    pub fn begin(&self, x: &Tensor) -> Result<Paused> {
        let (b, t, h) = x.dims3()?;
        let eps = self.cfg.rms_norm_eps as f32;
        // Rows are (batch*seq) so every linear is one 2-D matmul.
        let xn = candle_nn::ops::rms_norm(x, &self.input_norm, eps)?.reshape((b * t, h))?;
        Ok(Paused {
            resid: x.clone(),
            tap: Tap::Attention,
            input: xn,
        })
    }

    /// Runs a paused forward to the block output with the block's current weights.
    pub fn finish(&self, mut p: Paused, rope: &RotaryTables) -> Result<Tensor> {
        loop {
            match self.resume(p, rope)? {
                Step::Paused(next) => p = next,
                Step::Done(y) => return Ok(y),
            }
        }
    }

    /// Runs a paused forward up to its next tap (or to the block output after
    /// [`Tap::MlpDown`]) with the block's current weights.
    pub fn resume(&self, p: Paused, rope: &RotaryTables) -> Result<Step> {
        let (b, t, h) = p.resid.dims3()?;
        let cfg = &self.cfg;
        let eps = cfg.rms_norm_eps as f32;
        let [q_proj, k_proj, v_proj, o_proj, gate, up, down] = &self.linears;
        let paused =
            |resid: Tensor, tap: Tap, input: Tensor| Ok(Step::Paused(Paused { resid, tap, input }));
        match p.tap {
            Tap::Attention => {
                let xn = &p.input;
                let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
                // (b*t, heads*hd) -> (b, heads, t, hd)
                let heads = |y: Tensor, n: usize| -> Result<Tensor> {
                    Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
                };
                let mut q = heads(q_proj.forward(xn)?, nh)?;
                let mut k = heads(k_proj.forward(xn)?, nkv)?;
                let v = heads(v_proj.forward(xn)?, nkv)?;
                if let Some((qn, kn)) = &self.qk_norm {
                    q = candle_nn::ops::rms_norm(&q, qn, eps)?;
                    k = candle_nn::ops::rms_norm(&k, kn, eps)?;
                }
                let q = rope.apply(&q, 0)?;
                let k = rope.apply(&k, 0)?;
                // GQA without copying K/V: the g = nh/nkv query heads sharing a kv head
                // are stacked along the sequence axis: q (b, nkv, g*t, hd) against k
                // (b, nkv, t, hd).
                let g = nh / nkv;
                // The 1/sqrt(hd) scale goes on q (t x hd per head), not on the t x t
                // scores.
                let q = (q.reshape((b, nkv, g * t, hd))? * (1.0 / (hd as f64).sqrt()))?;
                let scores = q.matmul(&k.t()?)?; // (b, nkv, g*t, t); row r is query r % t
                let probs = crate::kernels::causal_softmax(&scores, cfg.sliding_window)?;
                let ctx = probs.matmul(&v)?; // (b, nkv, g*t, hd)
                let ctx = ctx
                    .reshape((b, nh, t, hd))?
                    .transpose(1, 2)?
                    .reshape((b * t, nh * hd))?;
                paused(p.resid, Tap::AttentionOutput, ctx)
            }
            Tap::AttentionOutput => {
                let x = (&p.resid + o_proj.forward(&p.input)?.reshape((b, t, h))?)?;
                // MLP: down(silu(gate(x)) * up(x)).
                let xn =
                    candle_nn::ops::rms_norm(&x, &self.post_attn_norm, eps)?.reshape((b * t, h))?;
                paused(x, Tap::Mlp, xn)
            }
            Tap::Mlp => {
                let xn = &p.input;
                let act = (candle_nn::ops::silu(&gate.forward(xn)?)? * up.forward(xn)?)?;
                paused(p.resid, Tap::MlpDown, act)
            }
            Tap::MlpDown => Ok(Step::Done(
                (&p.resid + down.forward(&p.input)?.reshape((b, t, h))?)?,
            )),
        }
    }
}

/// A block forward stopped just before the linears of [`Paused::tap`].
#[derive(Clone)]
pub struct Paused {
    /// The residual stream so far: the block input before the attention's output is
    /// added, the post-attention stream after.
    resid: Tensor,
    /// Which linear group runs next.
    pub tap: Tap,
    /// That group's input, `(batch*seq, in_features)`.
    pub input: Tensor,
}

/// What [`Block::resume`] reached.
pub enum Step {
    /// The next tap.
    Paused(Paused),
    /// The block output, `(batch, seq, hidden)`.
    Done(Tensor),
}

/// Token embedding, final norm and head: the parts of the model outside the blocks.
#[derive(Clone)]
pub struct Globals {
    /// Token embedding, `(vocab, hidden)`.
    pub embed: Tensor,
    /// Final norm weight, `(hidden,)`.
    pub norm: Tensor,
    /// Output head `(vocab, hidden)`; `None` when tied to the embedding.
    pub lm_head: Option<Tensor>,
    eps: f32,
}

/// Hugging Face names of the global tensors.
pub const EMBED: &str = "model.embed_tokens.weight";
/// Final norm weight name.
pub const FINAL_NORM: &str = "model.norm.weight";
/// Untied head weight name.
pub const LM_HEAD: &str = "lm_head.weight";

impl Globals {
    /// Loads embedding, final norm and head.
    pub fn load(src: &dyn WeightSource) -> Result<Self> {
        let cfg = src.config();
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed = src.tensor(EMBED)?;
        check_shape(EMBED, &embed, &[v, h])?;
        let norm = src.tensor(FINAL_NORM)?;
        check_shape(FINAL_NORM, &norm, &[h])?;
        // Some checkpoints ship lm_head even when tied; the config decides.
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            let w = src.tensor(LM_HEAD)?;
            check_shape(LM_HEAD, &w, &[v, h])?;
            Some(w)
        };
        Ok(Globals {
            embed,
            norm,
            lm_head,
            eps: cfg.rms_norm_eps as f32,
        })
    }

    /// `ids`: `(batch, seq)` u32 -> hidden `(batch, seq, hidden)`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        Ok(self.embed.index_select(&flat, 0)?.reshape((b, t, ()))?)
    }

    /// Hidden `(batch, seq, hidden)` -> logits `(batch, seq, vocab)`.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let xn = candle_nn::ops::rms_norm(x, &self.norm, self.eps)?.reshape((b * t, h))?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        Ok(xn.matmul(&head.t()?)?.reshape((b, t, ()))?)
    }
}

/// A whole model resident in memory.
pub struct Model {
    /// Configuration.
    pub cfg: ModelConfig,
    /// Embedding, final norm, head.
    pub globals: Globals,
    /// The blocks in order.
    pub blocks: Vec<Block>,
    rope: RotaryTables,
}

impl Model {
    /// Loads every weight from `src`, with rotary tables for `max_seq` positions.
    pub fn load(src: &dyn WeightSource, max_seq: usize) -> Result<Self> {
        let cfg = src.config().clone();
        let globals = Globals::load(src)?;
        let blocks = (0..cfg.num_layers)
            .map(|l| Block::load(src, l))
            .collect::<Result<Vec<_>>>()?;
        let rope = RotaryTables::new(&cfg.rope, cfg.head_dim, max_seq)?;
        Ok(Model {
            cfg,
            globals,
            blocks,
            rope,
        })
    }

    /// The rotary tables the model was loaded with.
    pub fn rope(&self) -> &RotaryTables {
        &self.rope
    }

    /// `ids`: `(batch, seq)` -> logits `(batch, seq, vocab)` for every position.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.check_ids(ids)?;
        let mut x = self.globals.embed(ids)?;
        for block in &self.blocks {
            x = block.forward(&x, &self.rope)?;
        }
        self.globals.logits(&x)
    }

    /// Rejects ids outside the vocabulary and sequences longer than the rotary tables.
    fn check_ids(&self, ids: &Tensor) -> Result<()> {
        let (_, t) = ids.dims2()?;
        let max = self.rope.cos.dim(0)?;
        if t > max {
            return Err(crate::ModelError::Source(format!(
                "sequence of {t} tokens is longer than the {max} positions the model was loaded for"
            )));
        }
        let flat = ids.flatten_all()?.to_vec1::<u32>()?;
        let vocab = self.cfg.vocab_size;
        if let Some(position) = flat.iter().position(|&id| id as usize >= vocab) {
            return Err(crate::ModelError::TokenOutOfRange {
                id: flat[position],
                position,
                vocab,
            });
        }
        Ok(())
    }

    /// Logits for one sequence of token ids: `(seq, vocab)` row-major f32.
    pub fn logits_for(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let t = Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu)?;
        let logits = self.forward(&t)?.to_dtype(DType::F32)?;
        Ok(logits.squeeze(0)?.flatten_all()?.to_vec1::<f32>()?)
    }
}
