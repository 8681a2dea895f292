//! The block math, written once: a Llama-family block (llama, SmolLM, mistral, qwen2,
//! qwen3) as five pieces that both callers run in the same order --
//!
//! 1. attention input norm: `xn = rms_norm(x)` (input of q, k, v);
//! 2. [`Ctx::attend`]: q/k/v, per-head q/k norm (qwen3), rotary, K/V into the cache,
//!    attention -> context (input of o);
//! 3. [`Ctx::attn_out`]: `x += o_proj(context)`; then the MLP input norm
//!    `xn = rms_norm(x)` (input of gate, up);
//! 4. [`Ctx::gate_up`]: `act = silu(gate(xn)) * up(xn)` (input of down);
//! 5. [`Ctx::down`] and the residual add.
//!
//! [`crate::decoder::Decoder`] runs them back to back ([`Ctx::block`]);
//! [`crate::staged::Stager`] pauses between them so the compressor can read each
//! linear's input and swap weights before going on.
//!
//! Numerics follow transformers' eager path (checked against its logits by
//! tests/golden.rs): rotary frequencies in f32 with Llama-3 scaling, rotate-half
//! rotary, GQA (query head `h` reads KV head `h / (heads / kv_heads)`), RMSNorm
//! `x / sqrt(mean(x^2) + eps) * w`, softmax in f32, SiLU-gated MLP, q/k/v biases
//! (qwen2), optional sliding window (mistral).
//!
//! Buffers (n = tokens in this call over `seqs` independent sequences of `n / seqs`
//! tokens each, every sequence at positions `pos ..`):
//! - `x`: residual stream `(n, hidden)`
//! - `q`: `(n, heads * head_dim)`; `k`, `v`: `(n, kv_heads * head_dim)`
//! - K/V cache per sequence: `(kv_heads, capacity, head_dim)` for K and for V, so one KV
//!   head's keys are a contiguous `(positions, head_dim)` matrix (a GEMM operand);
//!   sequence `s` owns `kc[s * kv_heads * capacity * head_dim ..]` (likewise `vc`).

use crate::kernels::attention;
use crate::kernels::dense::{self, split_columns, ColBlock, Mat};
use crate::kernels::math;
use crate::kernels::Isa;
use crate::linear::{self, Linear, Op, Par};
use crate::weights::BlockWeights;
use rayon::prelude::*;
use uc_model::config::ModelConfig;

/// Query rows per attention task in prefill.
const ATTN_QUERY_BLOCK: usize = 64;
/// Tokens per MLP pass (bounds the decoder's `(tokens, intermediate)` buffers).
pub(crate) const MLP_TOKENS: usize = 256;

thread_local! {
    /// Tiles of the flash attention, reused across tasks on this thread.
    static FLASH: std::cell::RefCell<attention::Scratch> = std::cell::RefCell::new(attention::Scratch::default());
}

fn op<'a>(w: &'a dyn Linear, bias: Option<&'a [f32]>) -> Op<'a> {
    Op { w, bias }
}

/// Activation buffers of one decoder call, reused by every block (`n` tokens).
pub(crate) struct Work {
    /// Tokens the buffers are sized for.
    pub(crate) n: usize,
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
    pub(crate) fn new(cfg: &ModelConfig, n: usize) -> Self {
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
pub(crate) struct Ctx<'a> {
    pub(crate) cfg: &'a ModelConfig,
    pub(crate) isa: Isa,
    /// Threads for the decode loops.
    pub(crate) par: Par,
    /// Whole-weight prefill GEMMs (`UC_PREFILL=whole`; their bits depend on the thread
    /// count, so the staged API never uses them).
    pub(crate) whole: bool,
    /// Rotary tables `(positions, head_dim / 2)`.
    pub(crate) cos: &'a [f32],
    pub(crate) sin: &'a [f32],
    /// Position of every sequence's first token in this call.
    pub(crate) pos: usize,
    /// Positions per sequence in the K/V cache.
    pub(crate) capacity: usize,
    /// Tokens in this call (all sequences).
    pub(crate) n: usize,
    /// Independent sequences in this call (`n / seqs` tokens each, no shared keys).
    pub(crate) seqs: usize,
}

impl Ctx<'_> {
    /// `outs[i] (m, rows_i) = x (m, cols) . W_i^T (+ b_i)`.
    fn linears(&self, ops: &[Op], x: &[f32], m: usize, outs: &mut [&mut [f32]]) {
        linear::forward_into_opts(self.par, self.whole, self.isa, ops, x, m, outs);
    }

    /// Tokens per sequence.
    fn seq_len(&self) -> usize {
        self.n / self.seqs
    }

    /// Elements of one sequence's K (or V) cache.
    fn slab(&self) -> usize {
        self.cfg.num_kv_heads * self.capacity * self.cfg.head_dim
    }

    /// Pieces 1-5 on `x (n, hidden)` in place; appends this call's K/V to the cache.
    pub(crate) fn block(
        &self,
        b: &BlockWeights,
        kc: &mut [f32],
        vc: &mut [f32],
        x: &mut [f32],
        w: &mut Work,
    ) {
        let (n, h, inter) = (self.n, self.cfg.hidden_size, self.cfg.intermediate_size);
        let eps = self.cfg.rms_norm_eps as f32;
        math::rms_norm(x, &b.input_norm, eps, &mut w.xn);
        self.attend(b, &w.xn, kc, vc, &mut w.q, &mut w.k, &mut w.v, &mut w.ctx);
        self.attn_out(b, &w.ctx, &mut w.o, x);
        math::rms_norm(x, &b.post_attn_norm, eps, &mut w.xn);
        // At most MLP_TOKENS rows at a time, so the (tokens, intermediate) buffers stay
        // small on long prompts.
        for t0 in (0..n).step_by(MLP_TOKENS) {
            let m = MLP_TOKENS.min(n - t0);
            let (g, u) = (&mut w.gate[..m * inter], &mut w.up[..m * inter]);
            self.gate_up(b, &w.xn[t0 * h..(t0 + m) * h], m, g, u);
            self.down(b, g, m, &mut w.o[t0 * h..(t0 + m) * h]);
        }
        x.iter_mut().zip(&w.o).for_each(|(x, d)| *x += d);
    }

    /// Piece 2: `ctx (n, heads * hd)` = attention of this call's tokens given their
    /// normed residual `xn (n, hidden)`; their K/V are appended to the cache. `q`, `k`,
    /// `v` are scratch of their projections' widths.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attend(
        &self,
        b: &BlockWeights,
        xn: &[f32],
        kc: &mut [f32],
        vc: &mut [f32],
        q: &mut [f32],
        k: &mut [f32],
        v: &mut [f32],
        ctx: &mut [f32],
    ) {
        let cfg = self.cfg;
        let n = self.n;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let eps = cfg.rms_norm_eps as f32;
        let [q_proj, k_proj, v_proj, ..] = &b.linears;
        let bias = |i: usize| b.qkv_bias.as_ref().map(|bs| bs[i].as_slice());
        let ops = [
            op(q_proj.as_ref(), bias(0)),
            op(k_proj.as_ref(), bias(1)),
            op(v_proj.as_ref(), bias(2)),
        ];
        self.linears(&ops, xn, n, &mut [&mut *q, &mut *k, &mut *v]);
        if let Some((qn, kn)) = &b.qk_norm {
            math::rms_norm_inplace(q, qn, eps);
            math::rms_norm_inplace(k, kn, eps);
        }
        let (half, len, slab) = (hd / 2, self.seq_len(), self.slab());
        for t in 0..n {
            let (s, p) = (t / len, self.pos + t % len);
            let (c, sn) = (
                &self.cos[p * half..(p + 1) * half],
                &self.sin[p * half..(p + 1) * half],
            );
            q[t * nh * hd..(t + 1) * nh * hd]
                .chunks_exact_mut(hd)
                .for_each(|head| math::rope(head, c, sn));
            k[t * nkv * hd..(t + 1) * nkv * hd]
                .chunks_exact_mut(hd)
                .for_each(|head| math::rope(head, c, sn));
            for g in 0..nkv {
                let dst = s * slab + (g * self.capacity + p) * hd;
                let src = (t * nkv + g) * hd;
                kc[dst..dst + hd].copy_from_slice(&k[src..src + hd]);
                vc[dst..dst + hd].copy_from_slice(&v[src..src + hd]);
            }
        }
        self.attention(q, kc, vc, ctx);
    }

    /// Piece 3: `x (n, hidden) += o_proj(ctx)`; `o` is `(n, hidden)` scratch.
    pub(crate) fn attn_out(&self, b: &BlockWeights, ctx: &[f32], o: &mut [f32], x: &mut [f32]) {
        self.linears(
            &[op(b.linears[3].as_ref(), None)],
            ctx,
            self.n,
            &mut [&mut *o],
        );
        x.iter_mut().zip(&*o).for_each(|(x, o)| *x += o);
    }

    /// Piece 4: `act (m, inter) = silu(gate(xn)) * up(xn)` for `xn (m, hidden)`; `up` is
    /// `(m, inter)` scratch.
    pub(crate) fn gate_up(
        &self,
        b: &BlockWeights,
        xn: &[f32],
        m: usize,
        act: &mut [f32],
        up: &mut [f32],
    ) {
        let ops = [
            op(b.linears[4].as_ref(), None),
            op(b.linears[5].as_ref(), None),
        ];
        self.linears(&ops, xn, m, &mut [&mut *act, &mut *up]);
        let isa = self.isa;
        act.par_chunks_mut(4096)
            .zip(up.par_chunks(4096))
            .for_each(|(g, u)| math::silu_mul(isa, g, u));
    }

    /// Piece 5 (before the residual add): `out (m, hidden) = down(act)`.
    pub(crate) fn down(&self, b: &BlockWeights, act: &[f32], m: usize, out: &mut [f32]) {
        self.linears(&[op(b.linears[6].as_ref(), None)], act, m, &mut [out]);
    }

    /// The keys query `t` of a sequence (its index in this call's part of that
    /// sequence) may see: `lo ..= pos + t` (causal, and within the sliding window when
    /// there is one).
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
        // Prefill: per (sequence, head, block of queries), flash-style attention over
        // key tiles (kernels::attention; no (queries, keys) score matrix), context
        // written into the block's rows and head columns of ctx (n, heads * hd).
        let (len, slab) = (self.seq_len(), self.slab());
        let bounds: Vec<usize> = (0..=nh).map(|h| h * hd).collect();
        let tasks: Vec<(usize, usize, usize, ColBlock)> = split_columns(ctx, n, nh * hd, &bounds)
            .into_iter()
            .enumerate()
            .flat_map(|(head, b)| {
                b.split_rows(len).into_iter().flat_map(move |(s0, b)| {
                    b.split_rows(ATTN_QUERY_BLOCK)
                        .into_iter()
                        .map(move |(t0, b)| (s0 / len, head, t0, b))
                })
            })
            .collect();
        tasks.into_par_iter().for_each(|(s, head, t0, mut out)| {
            let g = head / group;
            let range = |r: usize| self.key_range(t0 + r);
            let kv = s * slab + g * cap * hd..s * slab + (g + 1) * cap * hd;
            let prob = attention::Problem {
                rows: out.n(),
                head_dim: hd,
                q: Mat {
                    data: &q[((s * len + t0) * nh + head) * hd..],
                    rs: nh * hd,
                    cs: 1,
                },
                keys: &kc[kv.clone()],
                vals: &vc[kv],
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
