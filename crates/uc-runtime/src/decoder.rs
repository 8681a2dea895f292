//! The incremental decoder: Llama-family blocks (llama, SmolLM, mistral, qwen2, qwen3)
//! over a KV cache. A prompt is prefilled in one pass; then one token at a time.
//!
//! Numerics follow `uc_model::llama` (itself checked against transformers): rotary
//! frequencies in f32 with Llama-3 scaling, rotate-half rotary, GQA (query head `h` reads
//! KV head `h / (heads / kv_heads)`), RMSNorm `x / sqrt(mean(x^2) + eps) * w`, softmax in
//! f32, SiLU-gated MLP, q/k/v biases (qwen2), per-head q/k RMSNorm before rotary (qwen3),
//! optional sliding window (mistral), head tied to the embedding when configured.
//!
//! Buffers (n = tokens in this call, p = position of the first):
//! - `x`: residual stream `(n, hidden)`
//! - `q`: `(n, heads * head_dim)`; `k`, `v`: `(n, kv_heads * head_dim)`
//! - KV cache per layer: `(kv_heads, capacity, head_dim)` for K and for V, so one KV
//!   head's keys are a contiguous `(positions, head_dim)` matrix (a GEMM operand).

use crate::kernels::attention;
use crate::kernels::dense::{self, split_columns, ColBlock, Mat};
use crate::kernels::math;
use crate::kernels::Isa;
use crate::kv::KvCache;
use crate::linear::{self, Linear, Op};
use crate::stream::{HeadPlan, Loaded, Streamer};
use crate::weights::{BlockWeights, GlobalWeights, WeightLoader};
use crate::{Result, RuntimeError};
use rayon::prelude::*;
use std::sync::Arc;
use uc_model::config::ModelConfig;
use uc_model::llama::{EMBED, LM_HEAD};

/// Which logits a forward call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// The last position's `(vocab,)` (generation).
    Last,
    /// Every position's, `(n, vocab)` row-major (tests, scoring).
    All,
}

/// How to build a [`Decoder`].
#[derive(Clone, Copy, Debug)]
pub struct DecoderOptions {
    /// Positions the KV cache holds (prompt + generated tokens).
    pub capacity: usize,
    /// Keep blocks on disk and stream them with background prefetch.
    pub stream_layers: bool,
}

/// Query rows per attention task in prefill.
const ATTN_QUERY_BLOCK: usize = 64;
/// Tokens per forward pass when streaming (bounds activations, see `forward`).
const STREAM_PREFILL_CHUNK: usize = 512;
/// Tokens per MLP pass in prefill (bounds the `(tokens, intermediate)` buffers).
const MLP_TOKENS: usize = 256;
/// Vocabulary rows per streamed head chunk (~1 MiB of 6- to 8-bit codes at hidden 576).
const HEAD_CHUNK_ROWS: usize = 2048;

/// Embedding, final norm and head: in memory, or (streaming a pack) only the norm, with
/// embedding rows read on demand and the head streamed in chunks.
enum Globals {
    Resident(GlobalWeights),
    Streamed { norm: Vec<f32> },
}

enum Blocks {
    Resident(Vec<BlockWeights>),
    Streamed(Streamer),
}

/// A model ready to generate: weights (resident or streamed), rotary tables, KV cache.
pub struct Decoder {
    cfg: ModelConfig,
    isa: Isa,
    loader: Arc<dyn WeightLoader>,
    globals: Globals,
    blocks: Blocks,
    /// `(capacity, head_dim / 2)` each.
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// K and V of every layer (on disk when streaming).
    cache: KvCache,
    /// Activation buffers of the last forward call, reused when the next has as many
    /// tokens (every decode step).
    work: Option<Work>,
    pos: usize,
    capacity: usize,
}

pub use uc_model::llama::inverse_frequencies;

impl Decoder {
    /// Loads the globals (and, unless streaming, every block) from `loader`. When
    /// streaming, first runs the loader's checks over every block (bounded memory), and
    /// streams embedding and head too if the loader can read them by rows (packs).
    pub fn new(loader: Arc<dyn WeightLoader>, opts: DecoderOptions) -> Result<Self> {
        let cfg = loader.config().clone();
        if opts.capacity == 0 {
            return Err(RuntimeError::InvalidArgument(
                "decoder capacity must be at least one position".into(),
            ));
        }
        if !cfg.head_dim.is_multiple_of(2) || !cfg.num_heads.is_multiple_of(cfg.num_kv_heads) {
            return Err(RuntimeError::InvalidArgument("head layout".into()));
        }
        let embed_by_rows = opts.stream_layers && loader.select_rows(EMBED, &[0])?.is_some();
        let (globals, blocks) = if opts.stream_layers {
            loader.check_all(embed_by_rows)?;
            let head = embed_by_rows.then_some(HeadPlan {
                name: if cfg.tie_word_embeddings {
                    EMBED
                } else {
                    LM_HEAD
                },
                rows: cfg.vocab_size,
                chunk: HEAD_CHUNK_ROWS,
            });
            let globals = if embed_by_rows {
                Globals::Streamed {
                    norm: loader.final_norm()?,
                }
            } else {
                Globals::Resident(loader.globals()?)
            };
            (
                globals,
                Blocks::Streamed(Streamer::new(loader.clone(), head)?),
            )
        } else {
            loader.prepare_resident()?;
            let globals = Globals::Resident(loader.globals()?);
            (
                globals,
                Blocks::Resident(
                    (0..cfg.num_layers)
                        .map(|l| loader.block(l))
                        .collect::<Result<_>>()?,
                ),
            )
        };
        let inv = inverse_frequencies(&cfg.rope, cfg.head_dim);
        let half = inv.len();
        let mut cos = Vec::with_capacity(opts.capacity * half);
        let mut sin = Vec::with_capacity(opts.capacity * half);
        for p in 0..opts.capacity {
            for &f in &inv {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let (l, g, c, d) = (
            cfg.num_layers,
            cfg.num_kv_heads,
            opts.capacity,
            cfg.head_dim,
        );
        let cache = if opts.stream_layers {
            KvCache::on_disk(l, g, c, d)?
        } else {
            KvCache::in_memory(l, g, c, d)?
        };
        Ok(Decoder {
            cfg,
            isa: Isa::detect(),
            loader,
            globals,
            blocks,
            cos,
            sin,
            cache,
            work: None,
            pos: 0,
            capacity: opts.capacity,
        })
    }

    /// The model configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The weight source.
    pub fn loader(&self) -> &Arc<dyn WeightLoader> {
        &self.loader
    }

    /// The instruction set the kernels run with.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Uses `isa` (falls back to scalar if unavailable); for tests and comparisons.
    pub fn set_isa(&mut self, isa: Isa) {
        self.isa = isa.or_scalar();
    }

    /// Positions already in the KV cache.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Positions the KV cache holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether blocks are streamed from disk.
    pub fn is_streaming(&self) -> bool {
        matches!(self.blocks, Blocks::Streamed(_))
    }

    /// Seconds spent waiting for streamed blocks (0 when resident).
    pub fn stream_wait_seconds(&self) -> f64 {
        match &self.blocks {
            Blocks::Streamed(s) => s.wait_seconds,
            Blocks::Resident(_) => 0.0,
        }
    }

    /// Weight bytes held in memory now (globals + resident blocks).
    pub fn resident_weight_bytes(&self) -> usize {
        let blocks = match &self.blocks {
            Blocks::Resident(b) => b.iter().map(|b| b.resident_bytes()).sum(),
            Blocks::Streamed(_) => 0,
        };
        let globals = match &self.globals {
            Globals::Resident(g) => g.resident_bytes(),
            Globals::Streamed { norm } => norm.len() * 4,
        };
        globals + blocks
    }

    /// Forgets the KV cache (a new sequence starts at position 0).
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// Runs `ids` at positions `position() ..`, appending them to the KV cache; returns
    /// logits of the last position or of all of them.
    pub fn forward(&mut self, ids: &[u32], which: Logits) -> Result<Vec<f32>> {
        // Run the whole pass on a pool worker: the parallel loops inside then start
        // from a worker (no cross-thread wake-up of the caller per loop, which costs
        // tens of microseconds each on a VM, hundreds of times per token).
        if ids.len() <= linear::FUSED_MAX_TOKENS && !self.is_streaming() {
            // Decode steps run their parallel loops on the spinning team (crate::team).
            return self.forward_in_pool(ids, which);
        }
        rayon::scope(|_| self.forward_in_pool(ids, which))
    }

    fn forward_in_pool(&mut self, ids: &[u32], which: Logits) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(RuntimeError::Empty("forward needs at least one token"));
        }
        // Streaming bounds activation memory too: long inputs go through the model in
        // passes of STREAM_PREFILL_CHUNK tokens (each pass streams the blocks again).
        let chunk = if self.is_streaming() {
            STREAM_PREFILL_CHUNK
        } else {
            ids.len()
        };
        if ids.len() <= chunk {
            return self.forward_chunk(ids, which);
        }
        let mut out = Vec::new();
        let pieces: Vec<&[u32]> = ids.chunks(chunk).collect();
        for (i, piece) in pieces.iter().enumerate() {
            let last = i + 1 == pieces.len();
            match (which, last) {
                (Logits::All, _) => out.extend(self.forward_chunk(piece, Logits::All)?),
                (Logits::Last, true) => out = self.forward_chunk(piece, Logits::Last)?,
                // Only the KV cache of earlier pieces matters; their logits are not
                // needed, so compute the cheapest (last position's).
                (Logits::Last, false) => drop(self.forward_chunk(piece, Logits::Last)?),
            }
        }
        Ok(out)
    }

    fn forward_chunk(&mut self, ids: &[u32], which: Logits) -> Result<Vec<f32>> {
        let n = ids.len();
        let vocab = self.cfg.vocab_size;
        if let Some(position) = ids.iter().position(|&id| id as usize >= vocab) {
            return Err(RuntimeError::TokenOutOfRange {
                id: ids[position],
                position,
                vocab,
            });
        }
        if self.pos + n > self.capacity {
            return Err(RuntimeError::ContextFull {
                needed: self.pos + n,
                capacity: self.capacity,
            });
        }
        let (h, isa) = (self.cfg.hidden_size, self.isa);
        // x: (n, hidden)
        let mut x = vec![0f32; n * h];
        match &self.globals {
            Globals::Resident(g) => {
                for (row, &id) in x.chunks_exact_mut(h).zip(ids) {
                    g.embed.row_into(isa, id as usize, row);
                }
            }
            Globals::Streamed { .. } => {
                // Read only the distinct rows this call needs.
                let mut uniq: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
                uniq.sort_unstable();
                uniq.dedup();
                let e = self
                    .loader
                    .select_rows(EMBED, &uniq)?
                    .ok_or_else(|| RuntimeError::Prefetch("embedding rows unreadable".into()))?;
                for (row, &id) in x.chunks_exact_mut(h).zip(ids) {
                    let k = uniq.binary_search(&(id as usize)).unwrap_or(0);
                    e.row_into(isa, k, row);
                }
            }
        }
        let Decoder {
            cfg,
            blocks,
            cos,
            sin,
            cache,
            pos,
            capacity,
            work: work_slot,
            ..
        } = self;
        let ctx = Ctx {
            cfg,
            isa,
            // Streaming: leave the second core to the loader thread between loops.
            par: if matches!(blocks, Blocks::Streamed(_)) {
                linear::Par::Rayon
            } else {
                linear::Par::Team
            },
            cos,
            sin,
            pos: *pos,
            capacity: *capacity,
            n,
        };
        let mut work = match work_slot.take() {
            Some(w) if w.n == n => w,
            _ => Work::new(cfg, n),
        };
        for l in 0..cfg.num_layers {
            let (kc, vc) = cache.layer_mut(l);
            match blocks {
                Blocks::Resident(b) => ctx.block(&b[l], kc, vc, &mut x, &mut work),
                Blocks::Streamed(s) => {
                    let b = s.block(l)?;
                    ctx.block(&b, kc, vc, &mut x, &mut work);
                    s.give_back(Loaded::Block(b)); // evicted before the next one is taken
                }
            }
            cache.release(l);
        }
        *work_slot = Some(work);
        self.pos += n;
        let eps = self.cfg.rms_norm_eps as f32;
        let rows = match which {
            Logits::Last => &x[(n - 1) * h..],
            Logits::All => &x[..],
        };
        let m = rows.len() / h;
        let mut xn = vec![0f32; rows.len()];
        match (&self.globals, &mut self.blocks) {
            (Globals::Resident(g), _) => {
                math::rms_norm(rows, &g.norm, eps, &mut xn);
                let head = Op {
                    w: g.head.as_ref(),
                    bias: None,
                };
                Ok(linear::forward(isa, &[head], &xn, m)
                    .pop()
                    .unwrap_or_default())
            }
            (Globals::Streamed { norm }, Blocks::Streamed(s)) => {
                math::rms_norm(rows, norm, eps, &mut xn);
                let plan = s
                    .head()
                    .cloned()
                    .ok_or_else(|| RuntimeError::Prefetch("head not streamed".into()))?;
                // logits: (m, vocab), filled one chunk of vocabulary rows at a time.
                let mut logits = vec![0f32; m * vocab];
                for c in 0..plan.chunks() {
                    let w = s.head_chunk(c)?;
                    let r = plan.range(c);
                    let y = linear::forward_with(
                        linear::Par::Rayon,
                        isa,
                        &[Op {
                            w: w.as_ref(),
                            bias: None,
                        }],
                        &xn,
                        m,
                    );
                    for (t, src) in y[0].chunks_exact(r.len()).enumerate() {
                        logits[t * vocab + r.start..t * vocab + r.end].copy_from_slice(src);
                    }
                    s.give_back(Loaded::Head(w));
                }
                Ok(logits)
            }
            (Globals::Streamed { .. }, Blocks::Resident(_)) => Err(RuntimeError::Prefetch(
                "streamed head without a streamer".into(),
            )),
        }
    }
}

thread_local! {
    /// Tiles of the flash attention, reused across tasks on this thread.
    static FLASH: std::cell::RefCell<attention::Scratch> = std::cell::RefCell::new(attention::Scratch::default());
}

fn op<'a>(w: &'a dyn Linear, bias: Option<&'a [f32]>) -> Op<'a> {
    Op { w, bias }
}

/// Activation buffers of one forward call, reused by every block (`n` tokens).
struct Work {
    /// Tokens the buffers are sized for.
    n: usize,
    /// Normed residual `(n, hidden)`.
    xn: Vec<f32>,
    /// `(n, heads * head_dim)`.
    q: Vec<f32>,
    /// `(n, kv_heads * head_dim)` each.
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention context `(n, heads * head_dim)`.
    ctx: Vec<f32>,
    /// o_proj and down_proj output `(n, hidden)`.
    o: Vec<f32>,
    /// `(min(n, MLP_TOKENS), intermediate)` each.
    gate: Vec<f32>,
    up: Vec<f32>,
}

impl Work {
    fn new(cfg: &ModelConfig, n: usize) -> Self {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (q, kv) = (
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
        let z = |k: usize| vec![0f32; n * k];
        Work {
            n,
            xn: z(h),
            q: z(q),
            k: z(kv),
            v: z(kv),
            ctx: z(q),
            o: z(h),
            gate: vec![0f32; n.min(MLP_TOKENS) * i],
            up: vec![0f32; n.min(MLP_TOKENS) * i],
        }
    }
}

/// What one forward call's blocks share.
struct Ctx<'a> {
    cfg: &'a ModelConfig,
    isa: Isa,
    /// Threads for the decode loops.
    par: linear::Par,
    cos: &'a [f32],
    sin: &'a [f32],
    pos: usize,
    capacity: usize,
    n: usize,
}

impl Ctx<'_> {
    /// One block on `x (n, hidden)` in place; appends this call's K/V to the cache.
    fn block(&self, b: &BlockWeights, kc: &mut [f32], vc: &mut [f32], x: &mut [f32], w: &mut Work) {
        let cfg = self.cfg;
        let (n, isa) = (self.n, self.isa);
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let eps = cfg.rms_norm_eps as f32;
        let [q_proj, k_proj, v_proj, o_proj, gate, up, down] = &b.linears;

        // Attention.
        math::rms_norm(x, &b.input_norm, eps, &mut w.xn);
        let bias = |i: usize| b.qkv_bias.as_ref().map(|bs| bs[i].as_slice());
        let ops = [
            op(q_proj.as_ref(), bias(0)),
            op(k_proj.as_ref(), bias(1)),
            op(v_proj.as_ref(), bias(2)),
        ];
        linear::forward_into_with(
            self.par,
            isa,
            &ops,
            &w.xn,
            n,
            &mut [&mut w.q, &mut w.k, &mut w.v],
        );
        if let Some((qn, kn)) = &b.qk_norm {
            math::rms_norm_inplace(&mut w.q, qn, eps);
            math::rms_norm_inplace(&mut w.k, kn, eps);
        }
        let half = hd / 2;
        for t in 0..n {
            let p = self.pos + t;
            let (c, s) = (
                &self.cos[p * half..(p + 1) * half],
                &self.sin[p * half..(p + 1) * half],
            );
            w.q[t * nh * hd..(t + 1) * nh * hd]
                .chunks_exact_mut(hd)
                .for_each(|head| math::rope(head, c, s));
            w.k[t * nkv * hd..(t + 1) * nkv * hd]
                .chunks_exact_mut(hd)
                .for_each(|head| math::rope(head, c, s));
            for g in 0..nkv {
                let dst = (g * self.capacity + p) * hd;
                let src = (t * nkv + g) * hd;
                kc[dst..dst + hd].copy_from_slice(&w.k[src..src + hd]);
                vc[dst..dst + hd].copy_from_slice(&w.v[src..src + hd]);
            }
        }
        self.attention(&w.q, kc, vc, &mut w.ctx);
        linear::forward_into_with(
            self.par,
            isa,
            &[op(o_proj.as_ref(), None)],
            &w.ctx,
            n,
            &mut [&mut w.o],
        );
        x.iter_mut().zip(&w.o).for_each(|(x, o)| *x += o);

        // MLP: down(silu(gate(x)) * up(x)), at most MLP_TOKENS rows at a time so the
        // (tokens, intermediate) buffers stay small on long prompts.
        math::rms_norm(x, &b.post_attn_norm, eps, &mut w.xn);
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let ops = [op(gate.as_ref(), None), op(up.as_ref(), None)];
        for t0 in (0..n).step_by(MLP_TOKENS) {
            let m = MLP_TOKENS.min(n - t0);
            let (g, u) = (&mut w.gate[..m * inter], &mut w.up[..m * inter]);
            linear::forward_into_with(
                self.par,
                isa,
                &ops,
                &w.xn[t0 * h..(t0 + m) * h],
                m,
                &mut [&mut *g, &mut *u],
            );
            g.par_chunks_mut(4096)
                .zip(u.par_chunks(4096))
                .for_each(|(g, u)| math::silu_mul(isa, g, u));
            let out = &mut w.o[t0 * h..(t0 + m) * h];
            linear::forward_into_with(self.par, isa, &[op(down.as_ref(), None)], g, m, &mut [out]);
        }
        x.iter_mut().zip(&w.o).for_each(|(x, d)| *x += d);
    }

    /// The keys query `t` of this call may see: `lo ..= pos + t` (causal, and within the
    /// sliding window when there is one).
    fn key_range(&self, t: usize) -> (usize, usize) {
        let p = self.pos + t;
        let lo = self
            .cfg
            .sliding_window
            .map_or(0, |w| (p + 1).saturating_sub(w));
        (lo, p + 1)
    }

    /// Scaled dot-product attention of `q (n, heads * hd)` against the cache into
    /// `ctx (n, heads * hd)`.
    fn attention(&self, q: &[f32], kc: &[f32], vc: &[f32], ctx: &mut [f32]) {
        let cfg = self.cfg;
        let (n, nh, hd, isa, cap) = (self.n, cfg.num_heads, cfg.head_dim, self.isa, self.capacity);
        let group = nh / cfg.num_kv_heads;
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        if n == 1 {
            // Decode: one query per head; heads in parallel.
            let (lo, end) = self.key_range(0);
            ctx.fill(0.0);
            let heads: Vec<std::sync::Mutex<&mut [f32]>> =
                ctx.chunks_mut(hd).map(std::sync::Mutex::new).collect();
            linear::par_for_each(self.par, nh, &|head| {
                let Ok(mut out) = heads[head].lock() else {
                    return;
                };
                let g = head / group;
                let qv = &q[head * hd..(head + 1) * hd];
                let keys = &kc[g * cap * hd..];
                let vals = &vc[g * cap * hd..];
                let mut s: Vec<f32> = (lo..end)
                    .map(|j| dense::dot(isa, qv, &keys[j * hd..(j + 1) * hd]) * scale)
                    .collect();
                math::softmax(isa, &mut s);
                for (j, p) in (lo..end).zip(&s) {
                    dense::axpy(isa, *p, &vals[j * hd..(j + 1) * hd], &mut out);
                }
            });
            return;
        }
        // Prefill: per (head, block of queries), flash-style attention over key tiles
        // (kernels::attention; no (queries, keys) score matrix), context written into
        // the block's rows and head columns of ctx (n, heads * hd).
        let bounds: Vec<usize> = (0..=nh).map(|h| h * hd).collect();
        let tasks: Vec<(usize, usize, ColBlock)> = split_columns(ctx, n, nh * hd, &bounds)
            .into_iter()
            .enumerate()
            .flat_map(|(head, b)| {
                b.split_rows(ATTN_QUERY_BLOCK)
                    .into_iter()
                    .map(move |(t0, b)| (head, t0, b))
            })
            .collect();
        tasks.into_par_iter().for_each(|(head, t0, mut out)| {
            let g = head / group;
            let range = |r: usize| self.key_range(t0 + r);
            let prob = attention::Problem {
                rows: out.n(),
                head_dim: hd,
                q: Mat {
                    data: &q[(t0 * nh + head) * hd..],
                    rs: nh * hd,
                    cs: 1,
                },
                keys: &kc[g * cap * hd..(g + 1) * cap * hd],
                vals: &vc[g * cap * hd..(g + 1) * cap * hd],
                scale,
                range: &range,
            };
            FLASH.with(|sc| {
                let mut sc = sc.borrow_mut();
                attention::flash(isa, &prob, &mut sc, &mut |r, ctx| {
                    out.row_mut(r).copy_from_slice(ctx)
                });
            });
        });
    }
}
