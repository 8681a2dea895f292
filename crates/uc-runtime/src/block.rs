//! The block math, written once: a dense decoder block (llama, SmolLM, mistral, qwen2,
//! qwen3, OLMo-2, Phi-3, Gemma-2/3) as five pieces that both callers run in the same
//! order --
//!
//! 1. [`Ctx::attn_input`]: `xn = rms_norm(x)`, or `x` itself where the family has no
//!    input norm (OLMo-2) (input of q, k, v);
//! 2. [`Ctx::attend`]: q/k/v, q/k norm (per head: qwen3, gemma3; over the whole
//!    projection: OLMo-2), rotary (of the first `rotary_dim` dimensions of each head,
//!    with the layer's tables), K/V into the cache, attention (scale, soft-cap and
//!    sliding window of the layer) -> context (input of o);
//! 3. [`Ctx::attn_out`]: `x += norm(o_proj(context))` (the output norm only for OLMo-2
//!    and Gemma); then [`Ctx::mlp_input`] (input of gate, up);
//! 4. [`Ctx::gate_up`]: `act = silu(gate(xn)) * up(xn)` (GeGLU with gelu-tanh for Gemma)
//!    (input of down);
//! 5. [`Ctx::down`] and [`Ctx::mlp_residual`]: `x += norm(down(act))` (output norm only
//!    for OLMo-2 and Gemma).
//!
//! A mixture-of-experts block (Mixtral, Qwen3-MoE, OLMoE) has the same pieces with pieces 4
//! and 5 run per expert on the tokens routed to it ([`Ctx::route`], [`Ctx::moe_gate_up`],
//! [`Ctx::moe_down`]): `out[t] = sum_e w_te * down_e(silu(gate_e(xn_t)) * up_e(xn_t))`
//! over the token's top-k experts, added in ascending expert order (as transformers'
//! `index_add_` loop does), so the sum is the same whatever the thread count.
//!
//! A Mamba block (`ssm` settings) has no attention and no MLP: `x += out_proj(mixer(
//! rms_norm(x)))`, run as four pieces that pause at the same four places (the inputs of
//! in_proj, x_proj, dt_proj, out_proj): [`Ctx::attn_input`] (its norm is the attention-input
//! slot), [`Ctx::ssm_in`] (in_proj, causal conv, SiLU), [`Ctx::ssm_x`] (x_proj),
//! [`Ctx::ssm_scan`] (dt_proj, selective scan, gate) and [`Ctx::ssm_out`]; the recurrent
//! state ([`crate::ssm::State`]) replaces the K/V cache. See [`crate::ssm`].
//!
//! Family differences are data in [`ModelConfig`] and [`BlockWeights`] (which norms
//! exist, their widths, the activation, scales, windows, rotary tables): there is one
//! attention and one MLP.
//!
//! [`crate::decoder::Decoder`] runs them back to back ([`Ctx::block`]);
//! [`crate::staged::Stager`] pauses between them so the compressor can read each
//! linear's input and swap weights before going on.
//!
//! Numerics follow transformers' eager path (checked against its logits by
//! tests/golden.rs): rotary frequencies in f32 with Llama-3 or linear scaling,
//! rotate-half rotary, GQA (query head `h` reads KV head `h / (heads / kv_heads)`),
//! RMSNorm `x / sqrt(mean(x^2) + eps) * w` (Gemma's `1 + w` is added to the weight at
//! load), softmax in f32, SiLU- or GELU-gated MLP, q/k/v biases (qwen2), optional
//! sliding window (mistral, phi3; alternate layers for gemma).
//!
//! Buffers (n = tokens in this call over `seqs` independent sequences of `n / seqs`
//! tokens each, sequence `s` at positions `pos.of(s) ..`):
//! - `x`: residual stream `(n, hidden)`
//! - `q`: `(n, heads * head_dim)`; `k`, `v`: `(n, kv_heads * head_dim)`
//! - K/V cache per sequence ([`SeqKv`], one per sequence of the call): `(kv_heads,
//!   capacity, head_dim)` for K and for V, so one KV head's keys are a contiguous
//!   `(positions, head_dim)` matrix (a GEMM operand). The sequences' caches may be
//!   slabs of one buffer (the stager's windows) or belong to different decoders (a
//!   batched decode step, [`crate::Decoder::forward_batch`]).
//!
//! A batched decode step is this same block with one token per sequence, each at its
//! own position (`Positions::Each`) and `per_token` set: every linear runs its decode
//! kernel token by token on each weight block (read once for all tokens) and attention
//! runs the decode kernel per (sequence, head), so each sequence gets the bits it gets
//! when decoded alone.

use crate::kernels::attention;
use crate::kernels::dense::{split_columns, ColBlock, Mat};
use crate::kernels::math;
use crate::kernels::Isa;
use crate::kv::KvMut;
use crate::linear::{self, Linear, Op, Par};
use crate::moe::Routes;
use crate::rotary::Tables;
use crate::ssm;
use crate::weights::BlockWeights;
use rayon::prelude::*;
use uc_model::config::{Activation, ModelConfig};

/// Query rows per attention task in prefill.
const ATTN_QUERY_BLOCK: usize = 64;
/// Tokens per attention task in the generation paths' prefill (times the GQA group's
/// heads in rows).
const ATTN_ROWS_TOKENS: usize = 16;
/// Tokens per MLP pass (bounds the decoder's `(tokens, intermediate)` buffers).
pub(crate) const MLP_TOKENS: usize = 256;

thread_local! {
    /// Tiles of the flash attention, reused across tasks on this thread.
    static FLASH: std::cell::RefCell<attention::Scratch> = std::cell::RefCell::new(attention::Scratch::default());
    /// Scores of a decode query, reused across heads on this thread.
    static DECODE_SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Scratch of the generation paths' prefill attention.
    static ROWS: std::cell::RefCell<attention::RowsScratch> = std::cell::RefCell::new(attention::RowsScratch::default());
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
    /// `(min(n, MLP_TOKENS), intermediate)` each (the widest MLP: dense or one expert).
    gate: Vec<f32>,
    up: Vec<f32>,
    /// MoE blocks: every (token, expert) pair's activation `(min(n, MLP_TOKENS) * top_k,
    /// expert_intermediate)`, and one expert's gathered input / output rows
    /// `(min(n, MLP_TOKENS), hidden)`; empty for dense models.
    act: Vec<f32>,
    xe: Vec<f32>,
    ye: Vec<f32>,
    /// Mamba blocks' buffers; `None` for the attention families.
    ssm: Option<SsmWork>,
}

/// A Mamba block's activations for `n` tokens (`d = d_inner`, `R = dt_rank`, `N = state`).
pub(crate) struct SsmWork {
    /// in_proj's output `(n, 2d)`: x then z per row.
    pub(crate) xz: Vec<f32>,
    /// Conv + SiLU output `(n, d)` (input of x_proj), and the gate z `(n, d)`.
    pub(crate) u: Vec<f32>,
    pub(crate) z: Vec<f32>,
    /// x_proj's output `(n, R + 2N)`: dt, B, C per row.
    pub(crate) dbc: Vec<f32>,
    /// Its first `R` columns `(n, R)` (input of dt_proj).
    pub(crate) dtl: Vec<f32>,
    /// dt_proj's output `(n, d)`, then the gated scan output `(n, d)` (input of out_proj).
    pub(crate) dt: Vec<f32>,
    pub(crate) y: Vec<f32>,
}

impl SsmWork {
    pub(crate) fn new(s: &uc_model::config::Ssm, n: usize) -> Self {
        let (d, r) = (s.d_inner, s.dt_rank);
        let z = |k: usize| vec![0f32; n * k];
        SsmWork {
            xz: z(2 * d),
            u: z(d),
            z: z(d),
            dbc: z(r + 2 * s.state),
            dtl: z(r),
            dt: z(d),
            y: z(d),
        }
    }
}

impl Work {
    pub(crate) fn new(cfg: &ModelConfig, n: usize) -> Self {
        let (h, i) = (cfg.hidden_size, cfg.max_intermediate());
        let (q, kv) = (
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
        let z = |k: usize| vec![0f32; n * k];
        let m = n.min(MLP_TOKENS);
        let (act, xe) = match &cfg.moe {
            Some(moe) => (m * moe.top_k * moe.expert_intermediate, m * h),
            None => (0, 0),
        };
        Work {
            n,
            xn: z(h),
            q: z(q),
            k: z(kv),
            v: z(kv),
            ctx: z(q),
            o: z(h),
            gate: vec![0f32; m * i],
            up: vec![0f32; m * i],
            act: vec![0f32; act],
            xe: vec![0f32; xe],
            ye: vec![0f32; xe],
            ssm: cfg.ssm.as_ref().map(|s| SsmWork::new(s, n)),
        }
    }
}

/// Where each sequence of a call starts.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Positions<'a> {
    /// Every sequence at the same position.
    Same(usize),
    /// Sequence `s` at `p[s]` (one entry per sequence).
    Each(&'a [usize]),
}

impl Positions<'_> {
    /// Position of sequence `s`'s first token in this call.
    pub(crate) fn of(&self, s: usize) -> usize {
        match self {
            Positions::Same(p) => *p,
            Positions::Each(p) => p.get(s).copied().unwrap_or(0),
        }
    }
}

/// One sequence's K and V cache in one layer, `(kv_heads, capacity, head_dim)` each.
pub(crate) struct SeqKv<'c> {
    pub(crate) k: KvMut<'c>,
    pub(crate) v: KvMut<'c>,
}

impl<'c> SeqKv<'c> {
    /// `kc` and `vc` (f32) cut into consecutive per-sequence slabs of `slab` floats.
    pub(crate) fn slabs(kc: &'c mut [f32], vc: &'c mut [f32], slab: usize) -> Vec<Self> {
        kc.chunks_mut(slab.max(1))
            .zip(vc.chunks_mut(slab.max(1)))
            .map(|(k, v)| SeqKv {
                k: KvMut::F32(k),
                v: KvMut::F32(v),
            })
            .collect()
    }
}

/// A call's caches as one element type (every sequence of a call has the same).
fn typed<'a, E>(
    kv: &'a [SeqKv],
    get: impl Fn(&'a KvMut) -> Option<&'a [E]>,
) -> Vec<(&'a [E], &'a [E])> {
    kv.iter()
        .map(|c| match (get(&c.k), get(&c.v)) {
            (Some(k), Some(v)) => (k, v),
            _ => unreachable!("one KV element type per call"),
        })
        .collect()
}

/// What one forward call's blocks share.
pub(crate) struct Ctx<'a> {
    pub(crate) cfg: &'a ModelConfig,
    pub(crate) isa: Isa,
    /// Threads for the decode loops.
    pub(crate) par: Par,
    /// How prefill multiplies (whole-weight GEMMs' bits depend on the thread count and
    /// the integer GEMM's are not the exact arithmetic, so the staged API uses tiles).
    pub(crate) prefill: linear::Prefill,
    /// Rotary tables `(positions, rotary_dim / 2)`, per layer kind.
    pub(crate) rope: &'a Tables,
    /// Position of each sequence's first token in this call.
    pub(crate) pos: Positions<'a>,
    /// Positions per sequence in the K/V cache.
    pub(crate) capacity: usize,
    /// Tokens in this call (all sequences).
    pub(crate) n: usize,
    /// Independent sequences in this call (`n / seqs` tokens each, no shared keys).
    pub(crate) seqs: usize,
    /// Decode kernels for every token whatever `n` (a batched decode step): each token's
    /// bits are those of a one-token call.
    pub(crate) per_token: bool,
}

impl Ctx<'_> {
    /// `outs[i] (m, rows_i) = x (m, cols) . W_i^T (+ b_i)`.
    fn linears(&self, ops: &[Op], x: &[f32], m: usize, outs: &mut [&mut [f32]]) {
        linear::forward_into_opts(
            self.par,
            self.prefill,
            self.per_token,
            self.isa,
            ops,
            x,
            m,
            outs,
        );
    }

    /// Tokens per sequence.
    fn seq_len(&self) -> usize {
        self.n / self.seqs
    }

    /// Elements of one sequence's K (or V) cache.
    pub(crate) fn slab(&self) -> usize {
        self.cfg.num_kv_heads * self.capacity * self.cfg.head_dim
    }

    /// Pieces 1-5 on `x (n, hidden)` in place; appends this call's K/V to each
    /// sequence's cache (`kv`, one per sequence).
    pub(crate) fn block(&self, b: &BlockWeights, kv: &mut [SeqKv], x: &mut [f32], w: &mut Work) {
        let (n, h, inter) = (self.n, self.cfg.hidden_size, self.cfg.intermediate_size);
        self.attn_input(b, x, &mut w.xn);
        self.attend(b, &w.xn, kv, &mut w.q, &mut w.k, &mut w.v, &mut w.ctx);
        self.attn_out(b, &w.ctx, &mut w.o, x);
        self.mlp_input(b, x, &mut w.xn);
        // At most MLP_TOKENS rows at a time, so the (tokens, intermediate) buffers stay
        // small on long prompts.
        for t0 in (0..n).step_by(MLP_TOKENS) {
            let m = MLP_TOKENS.min(n - t0);
            let xn = &w.xn[t0 * h..(t0 + m) * h];
            let out = &mut w.o[t0 * h..(t0 + m) * h];
            match self.route(b, xn) {
                None => {
                    let (g, u) = (&mut w.gate[..m * inter], &mut w.up[..m * inter]);
                    self.gate_up(b, 4, xn, m, g, u);
                    self.down(b, 6, g, m, out);
                }
                Some(r) => {
                    self.moe_gate_up(b, &r, xn, &mut w.act, &mut w.up, &mut w.xe);
                    self.moe_down(b, &r, &w.act, out, &mut w.ye);
                }
            }
        }
        self.mlp_residual(b, &mut w.o, x);
    }

    /// A Mamba block on `x (n, hidden)` in place, advancing the recurrent state `st`
    /// (which must be zeros at a sequence start).
    pub(crate) fn ssm_block(
        &self,
        b: &BlockWeights,
        st: &mut ssm::State,
        x: &mut [f32],
        w: &mut Work,
    ) {
        let Some(sw) = w.ssm.as_mut() else {
            unreachable!("Work of a Mamba config has its buffers");
        };
        self.attn_input(b, x, &mut w.xn);
        self.ssm_in(b, &w.xn, &mut sw.xz, &mut st.conv, &mut sw.u, &mut sw.z);
        self.ssm_x(b, &sw.u, &mut sw.dbc, &mut sw.dtl);
        self.ssm_scan(
            b, &sw.dtl, &sw.dbc, &sw.u, &sw.z, &mut st.h, &mut sw.dt, &mut sw.y,
        );
        self.ssm_out(b, &sw.y, &mut w.o, x);
    }

    /// Mamba piece 2: `xz (n, 2d) = in_proj(xn) (+ bias)`, `u (n, d) = silu(conv(x))`
    /// with the conv state `conv (seqs, K - 1, d)` (advanced), `z (n, d)` the gate half.
    pub(crate) fn ssm_in(
        &self,
        b: &BlockWeights,
        xn: &[f32],
        xz: &mut [f32],
        conv: &mut [f32],
        u: &mut [f32],
        z: &mut [f32],
    ) {
        let (Some(s), Some(sw)) = (&self.cfg.ssm, &b.ssm) else {
            unreachable!("ssm pieces run on Mamba blocks");
        };
        let d = s.d_inner;
        let bias = sw.in_bias.as_deref();
        self.linears(
            &[op(b.linears[0].as_ref(), bias)],
            xn,
            self.n,
            &mut [&mut *xz],
        );
        ssm::conv(s, &sw.conv, sw.conv_bias.as_deref(), xz, self.seqs, conv, u);
        for (zr, xr) in z.chunks_exact_mut(d).zip(xz.chunks_exact(2 * d)) {
            zr.copy_from_slice(&xr[d..]);
        }
    }

    /// Mamba piece 3: `dbc (n, R + 2N) = x_proj(u)`; `dtl (n, R)` its dt columns.
    pub(crate) fn ssm_x(&self, b: &BlockWeights, u: &[f32], dbc: &mut [f32], dtl: &mut [f32]) {
        let Some(s) = &self.cfg.ssm else {
            unreachable!("ssm pieces run on Mamba blocks");
        };
        let (r, w) = (s.dt_rank, s.dt_rank + 2 * s.state);
        self.linears(
            &[op(b.linears[1].as_ref(), None)],
            u,
            self.n,
            &mut [&mut *dbc],
        );
        for (o, row) in dtl.chunks_exact_mut(r).zip(dbc.chunks_exact(w)) {
            o.copy_from_slice(&row[..r]);
        }
    }

    /// Mamba piece 4: `dt (n, d) = dt_proj(dtl)` (its bias added in the scan, before the
    /// softplus, as transformers does), then the selective scan from the state `h (seqs,
    /// d, N)` (advanced): `y (n, d) = (C . h + D u) * silu(z)`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn ssm_scan(
        &self,
        b: &BlockWeights,
        dtl: &[f32],
        dbc: &[f32],
        u: &[f32],
        z: &[f32],
        h: &mut [f32],
        dt: &mut [f32],
        y: &mut [f32],
    ) {
        let (Some(s), Some(sw)) = (&self.cfg.ssm, &b.ssm) else {
            unreachable!("ssm pieces run on Mamba blocks");
        };
        self.linears(
            &[op(b.linears[2].as_ref(), None)],
            dtl,
            self.n,
            &mut [&mut *dt],
        );
        ssm::scan(s, &sw.a, &sw.d, &sw.dt_bias, dt, dbc, u, z, self.seqs, h, y);
    }

    /// Mamba piece 5: `x (n, hidden) += out_proj(y) (+ bias)`; `o` is `(n, hidden)`
    /// scratch.
    pub(crate) fn ssm_out(&self, b: &BlockWeights, y: &[f32], o: &mut [f32], x: &mut [f32]) {
        let bias = b.ssm.as_ref().and_then(|s| s.out_bias.as_deref());
        self.linears(
            &[op(b.linears[3].as_ref(), bias)],
            y,
            self.n,
            &mut [&mut *o],
        );
        x.iter_mut().zip(&*o).for_each(|(x, o)| *x += o);
    }

    /// `out = rms_norm(x)` with weight `w`, or a copy of `x` where the slot has no norm.
    fn norm_into(&self, w: Option<&Vec<f32>>, x: &[f32], out: &mut [f32]) {
        match w {
            Some(w) => math::rms_norm(x, w, self.cfg.rms_norm_eps as f32, out),
            None => out.copy_from_slice(x),
        }
    }

    /// Piece 1: the input of q/k/v from the residual `x (n, hidden)` into `xn`.
    pub(crate) fn attn_input(&self, b: &BlockWeights, x: &[f32], xn: &mut [f32]) {
        self.norm_into(b.norms.attn_in.as_ref(), x, xn);
    }

    /// End of piece 3: the input of gate/up from the post-attention residual.
    pub(crate) fn mlp_input(&self, b: &BlockWeights, x: &[f32], xn: &mut [f32]) {
        self.norm_into(b.norms.mlp_in.as_ref(), x, xn);
    }

    /// End of piece 5: `x (m, hidden) += norm(out)` (the MLP output norm where the family
    /// has one); `out` is normed in place.
    pub(crate) fn mlp_residual(&self, b: &BlockWeights, out: &mut [f32], x: &mut [f32]) {
        if let Some(w) = &b.norms.mlp_out {
            math::rms_norm_inplace(out, w, self.cfg.rms_norm_eps as f32);
        }
        x.iter_mut().zip(&*out).for_each(|(x, d)| *x += d);
    }

    /// Piece 2: `ctx (n, heads * hd)` = attention of this call's tokens given their
    /// normed residual `xn (n, hidden)`; their K/V are appended to the cache. `q`, `k`,
    /// `v` are scratch of their projections' widths; `kv` holds one cache per sequence.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attend(
        &self,
        b: &BlockWeights,
        xn: &[f32],
        kv: &mut [SeqKv],
        q: &mut [f32],
        k: &mut [f32],
        v: &mut [f32],
        ctx: &mut [f32],
    ) {
        let cfg = self.cfg;
        let n = self.n;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let eps = cfg.rms_norm_eps as f32;
        let (q_proj, k_proj, v_proj) = (&b.linears[0], &b.linears[1], &b.linears[2]);
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
        // Rotary on the first `rot` dimensions of each head (all unless partial).
        let (cos, sin) = self.rope.of_layer(cfg, b.layer);
        let rot = cfg.rotary_dim;
        let (half, len) = (rot / 2, self.seq_len());
        for t in 0..n {
            let (s, p) = (t / len, self.pos.of(t / len) + t % len);
            let Some(SeqKv { k: kc, v: vc }) = kv.get_mut(s) else {
                unreachable!("one cache per sequence");
            };
            let (c, sn) = (
                &cos[p * half..(p + 1) * half],
                &sin[p * half..(p + 1) * half],
            );
            q[t * nh * hd..(t + 1) * nh * hd]
                .chunks_exact_mut(hd)
                .for_each(|head| math::rope(&mut head[..rot], c, sn));
            k[t * nkv * hd..(t + 1) * nkv * hd]
                .chunks_exact_mut(hd)
                .for_each(|head| math::rope(&mut head[..rot], c, sn));
            for g in 0..nkv {
                let dst = (g * self.capacity + p) * hd;
                let src = (t * nkv + g) * hd;
                kc.write(dst, &k[src..src + hd]);
                vc.write(dst, &v[src..src + hd]);
            }
        }
        self.attention(q, kv, ctx, cfg.window(b.layer));
    }

    /// Piece 3: `x (n, hidden) += norm(o_proj(ctx))` (the attention output norm where the
    /// family has one); `o` is `(n, hidden)` scratch.
    pub(crate) fn attn_out(&self, b: &BlockWeights, ctx: &[f32], o: &mut [f32], x: &mut [f32]) {
        self.linears(
            &[op(b.linears[3].as_ref(), None)],
            ctx,
            self.n,
            &mut [&mut *o],
        );
        if let Some(w) = &b.norms.attn_out {
            math::rms_norm_inplace(o, w, self.cfg.rms_norm_eps as f32);
        }
        x.iter_mut().zip(&*o).for_each(|(x, o)| *x += o);
    }

    /// Piece 4: `act (m, inter) = act(gate(xn)) * up(xn)` for `xn (m, hidden)` (SiLU, or
    /// gelu-tanh for Gemma), gate and up being linears `k` and `k + 1` of `b` (4 and 5;
    /// an expert's at `4 + 3e`); `up` is `(m, inter)` scratch.
    pub(crate) fn gate_up(
        &self,
        b: &BlockWeights,
        k: usize,
        xn: &[f32],
        m: usize,
        act: &mut [f32],
        up: &mut [f32],
    ) {
        let ops = [
            op(b.linears[k].as_ref(), None),
            op(b.linears[k + 1].as_ref(), None),
        ];
        self.linears(&ops, xn, m, &mut [&mut *act, &mut *up]);
        let isa = self.isa;
        let act_fn = |(g, u): (&mut [f32], &[f32])| match self.cfg.activation {
            Activation::Silu => math::silu_mul(isa, g, u),
            Activation::GeluTanh => math::gelu_tanh_mul(g, u),
        };
        if self.per_token || self.prefill.is_integer() {
            // Token by token, each row cut into the same chunks as a one-token call's
            // (the SIMD kernels round their tails differently), so no token's bits
            // depend on the others in the call.
            let width = b.linears[k].rows();
            let row = |(g, u): (&mut [f32], &[f32])| {
                g.chunks_mut(4096).zip(u.chunks(4096)).for_each(act_fn)
            };
            if self.per_token || self.n <= linear::SMALL_CALL_TOKENS {
                act.chunks_mut(width).zip(up.chunks(width)).for_each(row);
            } else {
                act.par_chunks_mut(width)
                    .zip(up.par_chunks(width))
                    .for_each(row);
            }
            return;
        }
        act.par_chunks_mut(4096)
            .zip(up.par_chunks(4096))
            .for_each(act_fn);
    }

    /// Piece 5 (before the residual add): `out (m, hidden) = down(act)`, down being
    /// linear `k` of `b` (6; an expert's at `6 + 3e`).
    pub(crate) fn down(&self, b: &BlockWeights, k: usize, act: &[f32], m: usize, out: &mut [f32]) {
        self.linears(&[op(b.linears[k].as_ref(), None)], act, m, &mut [out]);
    }

    /// The routing of the MLP input `xn (m, hidden)` in a MoE block; `None` in a dense
    /// one.
    pub(crate) fn route(&self, b: &BlockWeights, xn: &[f32]) -> Option<Routes> {
        let (router, moe) = (b.router.as_ref()?, self.cfg.moe.as_ref()?);
        Some(Routes::route(
            router,
            moe.top_k,
            moe.norm_topk_prob,
            xn,
            self.cfg.hidden_size,
        ))
    }

    /// Piece 4 of a MoE block: for each expert `e`, the rows of `xn (m, hidden)` routed
    /// to it gathered into `xe`, and their activation written to rows `r.range(e)` of
    /// `act (assignments, expert_inter)`. `up` is `(max count, expert_inter)` scratch,
    /// `xe` `(max count, hidden)`.
    pub(crate) fn moe_gate_up(
        &self,
        b: &BlockWeights,
        r: &Routes,
        xn: &[f32],
        act: &mut [f32],
        up: &mut [f32],
        xe: &mut [f32],
    ) {
        let (h, mi) = (self.cfg.hidden_size, self.expert_inter());
        for e in 0..r.experts() {
            let (ne, rows) = (r.count(e), r.range(e));
            if ne == 0 {
                continue;
            }
            for (j, &t) in r.tokens(e).iter().enumerate() {
                let t = t as usize;
                xe[j * h..(j + 1) * h].copy_from_slice(&xn[t * h..(t + 1) * h]);
            }
            self.gate_up(
                b,
                4 + 3 * e,
                &xe[..ne * h],
                ne,
                &mut act[rows.start * mi..rows.end * mi],
                &mut up[..ne * mi],
            );
        }
    }

    /// Piece 5 of a MoE block (before the residual add): `out (m, hidden)` = for each
    /// token the weighted sum of its experts' down projections of their rows of `act`,
    /// added in ascending expert order. `ye` is `(max count, hidden)` scratch.
    pub(crate) fn moe_down(
        &self,
        b: &BlockWeights,
        r: &Routes,
        act: &[f32],
        out: &mut [f32],
        ye: &mut [f32],
    ) {
        let (h, mi) = (self.cfg.hidden_size, self.expert_inter());
        out.fill(0.0);
        for e in 0..r.experts() {
            let (ne, rows) = (r.count(e), r.range(e));
            if ne == 0 {
                continue;
            }
            let y = &mut ye[..ne * h];
            self.down(b, 6 + 3 * e, &act[rows.start * mi..rows.end * mi], ne, y);
            for ((&t, &wt), yr) in r.tokens(e).iter().zip(r.weights(e)).zip(y.chunks_exact(h)) {
                let t = t as usize;
                out[t * h..(t + 1) * h]
                    .iter_mut()
                    .zip(yr)
                    .for_each(|(o, y)| *o += wt * y);
            }
        }
    }

    /// One expert's inner width (0 in a dense model).
    pub(crate) fn expert_inter(&self) -> usize {
        self.cfg.moe.as_ref().map_or(0, |m| m.expert_intermediate)
    }

    /// The keys query `t` of sequence `s` (its index in this call's part of that
    /// sequence) may see: `lo ..= pos + t` (causal, and within the layer's sliding
    /// `window` when it has one: the `window` newest keys).
    fn key_range(&self, window: Option<usize>, s: usize, t: usize) -> (usize, usize) {
        let p = self.pos.of(s) + t;
        let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
        (lo, p + 1)
    }

    /// `ctx (n, heads * hd)` cut into attention tasks `(sequence, column block, first
    /// token, block)`: column blocks of `width` (one head, or a KV head's group of
    /// heads), rows by sequence, then by `tokens`.
    fn attention_tasks<'x>(
        &self,
        ctx: &'x mut [f32],
        width: usize,
        tokens: usize,
    ) -> Vec<(usize, usize, usize, ColBlock<'x>)> {
        let (n, len, ld) = (self.n, self.seq_len(), ctx.len() / self.n.max(1));
        let bounds: Vec<usize> = (0..=ld / width).map(|i| i * width).collect();
        split_columns(ctx, n, ld, &bounds)
            .into_iter()
            .enumerate()
            .flat_map(|(i, b)| {
                b.split_rows(len).into_iter().flat_map(move |(s0, b)| {
                    b.split_rows(tokens)
                        .into_iter()
                        .map(move |(t0, b)| (s0 / len, i, t0, b))
                })
            })
            .collect()
    }

    /// Scaled dot-product attention of `q (n, heads * hd)` against each sequence's cache
    /// into `ctx (n, heads * hd)`; scores `q.k / sqrt(attn_scalar)`, soft-capped when
    /// configured, keys within `window`.
    fn attention(&self, q: &[f32], kv: &[SeqKv], ctx: &mut [f32], window: Option<usize>) {
        match kv.first().map(|c| &c.k) {
            Some(KvMut::F16(_)) => {
                let kv = typed(kv, |c| match c {
                    KvMut::F16(x) => Some(&**x),
                    KvMut::F32(_) => None,
                });
                self.attention_in(q, &kv, ctx, window)
            }
            _ => {
                let kv = typed(kv, |c| match c {
                    KvMut::F32(x) => Some(&**x),
                    KvMut::F16(_) => None,
                });
                self.attention_in(q, &kv, ctx, window)
            }
        }
    }

    /// [`Ctx::attention`] over each sequence's `(K, V)` of one element type.
    fn attention_in<E: attention::KvElem>(
        &self,
        q: &[f32],
        kv: &[(&[E], &[E])],
        ctx: &mut [f32],
        window: Option<usize>,
    ) {
        let cfg = self.cfg;
        let (n, nh, hd, isa, cap) = (self.n, cfg.num_heads, cfg.head_dim, self.isa, self.capacity);
        let group = nh / cfg.num_kv_heads;
        let scale = (1.0 / cfg.attn_scalar.sqrt()) as f32;
        let softcap = cfg.attn_softcap.map(|c| c as f32);
        if self.seq_len() == 1 {
            // Decode: one query per (sequence, head), all in parallel; output chunk `i`
            // of ctx is sequence `i / heads`'s head `i % heads`.
            ctx.fill(0.0);
            let heads: Vec<std::sync::Mutex<&mut [f32]>> =
                ctx.chunks_mut(hd).map(std::sync::Mutex::new).collect();
            linear::par_for_each(self.par, n * nh, &|i| {
                let (s, head) = (i / nh, i % nh);
                let (Some(Ok(mut out)), Some(c)) = (heads.get(i).map(|h| h.lock()), kv.get(s))
                else {
                    return;
                };
                let (lo, end) = self.key_range(window, s, 0);
                let g = head / group;
                let qv = &q[i * hd..(i + 1) * hd];
                let keys = &c.0[g * cap * hd..];
                let vals = &c.1[g * cap * hd..];
                DECODE_SCORES.with(|s| {
                    let mut s = s.borrow_mut();
                    attention::decode(
                        isa,
                        qv,
                        keys,
                        vals,
                        (lo, end),
                        scale,
                        softcap,
                        &mut s,
                        &mut out,
                    );
                });
            });
            return;
        }
        let len = self.seq_len();
        if self.prefill.is_integer() {
            // Generation: per (sequence, KV head, block of tokens), every query row with
            // the decode kernel's bits (kernels::attention::rows), so a prompt prefilled
            // in pieces gives what one prefill gives.
            let tasks = self.attention_tasks(ctx, group * hd, ATTN_ROWS_TOKENS);
            let run = |(s, g, t0, mut out): (usize, usize, usize, ColBlock)| {
                let Some(c) = kv.get(s) else {
                    return;
                };
                let range = |t: usize| self.key_range(window, s, t0 + t);
                let span = g * cap * hd..(g + 1) * cap * hd;
                let grp = attention::Group {
                    tokens: out.n(),
                    heads: group,
                    head_dim: hd,
                    q: &q[((s * len + t0) * nh + g * group) * hd..],
                    q_stride: nh * hd,
                    keys: &c.0[span.clone()],
                    vals: &c.1[span],
                    scale,
                    softcap,
                    range: &range,
                };
                ROWS.with(|sc| {
                    attention::rows(isa, &grp, &mut sc.borrow_mut(), &mut |t, h, ctx| {
                        out.row_mut(t)[h * hd..(h + 1) * hd].copy_from_slice(ctx)
                    });
                });
            };
            if n <= linear::SMALL_CALL_TOKENS {
                linear::par_tasks(self.par, tasks, &run);
            } else {
                tasks.into_par_iter().for_each(run);
            }
            return;
        }
        // Prefill: per (sequence, head, block of queries), flash-style attention over
        // key tiles (kernels::attention; no (queries, keys) score matrix), context
        // written into the block's rows and head columns of ctx (n, heads * hd).
        let tasks = self.attention_tasks(ctx, hd, ATTN_QUERY_BLOCK);
        tasks.into_par_iter().for_each(|(s, head, t0, mut out)| {
            let g = head / group;
            let range = |r: usize| self.key_range(window, s, t0 + r);
            let Some(c) = kv.get(s) else {
                return;
            };
            // The tiled kernel reads f32 (an f16 cache meets it only when generation is
            // forced onto the exact prefill, UC_PREFILL=tiles).
            let hi = range(out.n() - 1).1;
            let span = g * cap * hd..(g * cap + hi) * hd;
            let (mut kb, mut vb) = (Vec::new(), Vec::new());
            let prob = attention::Problem {
                rows: out.n(),
                head_dim: hd,
                q: Mat {
                    data: &q[((s * len + t0) * nh + head) * hd..],
                    rs: nh * hd,
                    cs: 1,
                },
                keys: E::widen(&c.0[span.clone()], &mut kb),
                vals: E::widen(&c.1[span], &mut vb),
                scale,
                softcap,
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
