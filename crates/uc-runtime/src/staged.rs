//! The block forward paused at the inputs of its linears, for calibration (`uc
//! compress`): the same pieces as the decoder ([`crate::block`]), run on a batch of
//! independent windows (each at positions `0 .. seq_len`, with its own scratch K/V; no
//! cache is shared between windows or kept between calls).
//!
//! [`Stager::begin`] takes a block input and stops at [`Tap::Attention`], handing out
//! the q/k/v input; [`Stager::resume`] runs to the next tap ([`Tap::AttentionOutput`]:
//! the attention context into o, [`Tap::Mlp`]: the normed stream into gate/up (the
//! stream itself for OLMo-2, which has no MLP input norm), [`Tap::MlpDown`]: the gated
//! activation into down) or to the block output, with
//! whatever weights it is given -- so a caller can swap a stage's linears (the
//! compressor quantizes them) and go on without recomputing what came before. A paused
//! forward resumed with weights `B` equals `B`'s whole forward whenever the linears
//! before the pause are `B`'s too (tested bit for bit).
//!
//! Determinism: every parallel loop splits outputs, never a sum (linears by 128-row
//! weight tiles with single-threaded GEMMs, attention by (window, head, 64-query block)),
//! so the bits do not depend on the number of threads (tested with 1 and 2).
//!
//! Shapes: `x` and block outputs `(seqs * seq_len, hidden)` row-major, window `s` in
//! rows `s * seq_len ..`; a tap's input `(seqs * seq_len, cols)` with `cols` the input
//! width of its linears.
//!
//! Mixture-of-experts blocks: a forward paused at [`Tap::Mlp`] or [`Tap::MlpDown`]
//! carries its [`Routes`] ([`Paused::routes`]; computed with the block's router, which
//! the compressor never changes). At [`Tap::Mlp`] the input is the normed stream of every
//! token, as in a dense block (expert `e` reads the rows `routes.tokens(e)`); at
//! [`Tap::MlpDown`] it is every (token, expert) pair's activation, `(rows * top_k,
//! expert_intermediate)`, expert `e`'s in rows `routes.range(e)`. The whole batch is one
//! MoE call here (the decoder runs MLPs in passes of 256 tokens), so an expert's GEMM may
//! see more rows than in the decoder.
//!
//! Mamba blocks pause at the same four taps, one linear each: [`Tap::Attention`] the
//! normed stream into in_proj `(rows, hidden)`, [`Tap::AttentionOutput`] the conv + SiLU
//! output into x_proj `(rows, d_inner)`, [`Tap::Mlp`] the dt columns of x_proj's output
//! into dt_proj `(rows, dt_rank)`, [`Tap::MlpDown`] the gated scan output into out_proj
//! `(rows, d_inner)`. What a later piece needs besides the tap's input (the gate z; u, B
//! and C for the scan) rides along in the paused state; each window's recurrence starts
//! from zeros. The residual stays the block input until out_proj's output is added.

use crate::block::{Ctx, Positions, SeqKv, MLP_TOKENS};
use crate::kernels::Isa;
use crate::linear::Par;
use crate::moe::Routes;
use crate::weights::BlockWeights;
use crate::{Result, RuntimeError};
use std::sync::Arc;
use uc_model::config::ModelConfig;

/// The four distinct inputs of a block's linears (q/k/v share one, gate/up share one),
/// in forward order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tap {
    /// Normed residual into q, k, v (the residual itself for OLMo-2): `(rows, hidden)`.
    Attention,
    /// Attention context into o: `(rows, heads * head_dim)`.
    AttentionOutput,
    /// Normed residual into gate, up (the residual itself for OLMo-2): `(rows, hidden)`.
    Mlp,
    /// Gated activation (SwiGLU; GeGLU for Gemma) into down: `(rows, intermediate)`.
    MlpDown,
}

impl Tap {
    /// Every tap, in forward order.
    pub const ALL: [Tap; 4] = [Tap::Attention, Tap::AttentionOutput, Tap::Mlp, Tap::MlpDown];

    /// The linears reading this input in a dense block, as indices into
    /// [`uc_model::names::BLOCK_LINEARS`] (and [`BlockWeights::linears`]).
    pub fn linears(self) -> &'static [usize] {
        match self {
            Tap::Attention => &[0, 1, 2],
            Tap::AttentionOutput => &[3],
            Tap::Mlp => &[4, 5],
            Tap::MlpDown => &[6],
        }
    }

    /// The linears reading this input in a block with `experts` experts (0: dense), as
    /// indices into [`BlockWeights::linears`]: every expert's gate and up at
    /// [`Tap::Mlp`], every expert's down at [`Tap::MlpDown`].
    pub fn linears_of(self, experts: usize) -> Vec<usize> {
        match (self, experts) {
            (_, 0) | (Tap::Attention | Tap::AttentionOutput, _) => self.linears().to_vec(),
            (Tap::Mlp, n) => (0..n).flat_map(|e| [4 + 3 * e, 5 + 3 * e]).collect(),
            (Tap::MlpDown, n) => (0..n).map(|e| 6 + 3 * e).collect(),
        }
    }

    /// The tap whose input linear `k` of a block with `experts` experts reads.
    pub fn of_linear(k: usize, experts: usize) -> Tap {
        match k {
            0..=2 => Tap::Attention,
            3 => Tap::AttentionOutput,
            _ if experts == 0 && k == 6 => Tap::MlpDown,
            _ if experts == 0 => Tap::Mlp,
            _ if (k - 4) % 3 == 2 => Tap::MlpDown,
            _ => Tap::Mlp,
        }
    }

    /// The tap whose input linear `k` of block `b` reads (a Mamba block's four linears
    /// read one tap each, in order).
    pub fn of_block_linear(b: &BlockWeights, k: usize) -> Tap {
        match b.ssm {
            Some(_) => Tap::ALL[k.min(Tap::ALL.len() - 1)],
            None => Tap::of_linear(k, b.experts()),
        }
    }

    /// The linears of block `b` reading this tap's input, as indices into
    /// [`BlockWeights::linears`] ([`Tap::linears_of`]; a Mamba block: the one at the
    /// tap's own index).
    pub fn linears_in(self, b: &BlockWeights) -> Vec<usize> {
        match b.ssm {
            Some(_) => vec![self.index()],
            None => self.linears_of(b.experts()),
        }
    }

    /// Position in [`Tap::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A block forward stopped just before the linears of [`Paused::tap`].
#[derive(Clone)]
pub struct Paused {
    tap: Tap,
    /// Windows in the batch.
    seqs: usize,
    /// Tokens of all windows.
    rows: usize,
    /// The residual stream so far `(rows, hidden)`: the block input before the
    /// attention's output is added, the post-attention stream after.
    resid: Vec<f32>,
    /// The tap's input `(rows, cols)` (MoE [`Tap::MlpDown`]: `(assignments, cols)`).
    input: Vec<f32>,
    /// Width of the input.
    cols: usize,
    /// MoE blocks at [`Tap::Mlp`] and [`Tap::MlpDown`]: the routing of the MLP input.
    routes: Option<Arc<Routes>>,
    /// Mamba blocks: what later pieces need besides the input (at
    /// [`Tap::AttentionOutput`]: z `(rows, d_inner)`; at [`Tap::Mlp`]: u, z `(rows,
    /// d_inner)` and x_proj's output `(rows, dt_rank + 2 state)`); empty otherwise.
    carry: Vec<Vec<f32>>,
}

impl Paused {
    /// Which linears run next.
    pub fn tap(&self) -> Tap {
        self.tap
    }

    /// Their input, `(rows, cols)` row-major; empty after [`Paused::compact`].
    pub fn input(&self) -> &[f32] {
        &self.input
    }

    /// Drops the tap's input, keeping only the residual stream: [`Stager::resume`]
    /// recomputes the input from it with the weights it is given (the normed stream at
    /// [`Tap::Attention`] and [`Tap::Mlp`]; q/k/v and attention at
    /// [`Tap::AttentionOutput`], whose residual is still the block input; gate/up at
    /// [`Tap::MlpDown`]) -- the same bits when those weights are the ones that produced
    /// it. For holding many paused forwards between stages in less memory.
    pub fn compact(&mut self) {
        self.input = Vec::new();
    }

    /// Rows of the input: tokens of all windows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Width of the input.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// A MoE block's routing of the MLP input (at [`Tap::Mlp`] and [`Tap::MlpDown`]).
    pub fn routes(&self) -> Option<&Routes> {
        self.routes.as_deref()
    }

    /// Windows in the batch.
    pub fn seqs(&self) -> usize {
        self.seqs
    }
}

/// What [`Stager::resume`] reached.
pub enum Step {
    /// The next tap.
    Paused(Paused),
    /// The block output `(rows, hidden)`.
    Done(Vec<f32>),
}

/// Runs blocks on batches of independent windows of `seq_len` tokens, pausing at taps.
pub struct Stager {
    cfg: ModelConfig,
    isa: Isa,
    seq_len: usize,
    /// Rotary tables `(seq_len, rotary_dim / 2)`.
    rope: crate::rotary::Tables,
}

impl Stager {
    /// A stager for windows of `seq_len` tokens of a model with configuration `cfg`.
    pub fn new(cfg: &ModelConfig, seq_len: usize) -> Result<Self> {
        if seq_len == 0 {
            return Err(RuntimeError::InvalidArgument(
                "windows need at least one token".into(),
            ));
        }
        if !cfg.head_dim.is_multiple_of(2) || !cfg.num_heads.is_multiple_of(cfg.num_kv_heads) {
            return Err(RuntimeError::InvalidArgument("head layout".into()));
        }
        Ok(Stager {
            cfg: cfg.clone(),
            isa: Isa::detect(),
            seq_len,
            rope: crate::rotary::Tables::new(cfg, seq_len),
        })
    }

    /// Tokens per window.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// The instruction set the kernels run with.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Uses `isa` (falls back to scalar if unavailable); for tests and comparisons.
    pub fn set_isa(&mut self, isa: Isa) {
        self.isa = isa.or_scalar();
    }

    fn ctx(&self, seqs: usize) -> Ctx<'_> {
        Ctx {
            cfg: &self.cfg,
            isa: self.isa,
            par: Par::Rayon,
            prefill: crate::linear::Prefill::Tiles,
            rope: &self.rope,
            pos: Positions::Same(0),
            capacity: self.seq_len,
            n: seqs * self.seq_len,
            seqs,
            per_token: false,
        }
    }

    /// Starts the forward of `x (seqs * seq_len, hidden)` through block `b`, paused at
    /// [`Tap::Attention`] (its input is the normed `x`).
    pub fn begin(&self, b: &BlockWeights, x: Vec<f32>) -> Result<Paused> {
        let (h, l) = (self.cfg.hidden_size, self.seq_len);
        if x.is_empty() || !x.len().is_multiple_of(h * l) {
            return Err(RuntimeError::InvalidArgument(format!(
                "block input of {} values is not whole windows of {l} x {h}",
                x.len()
            )));
        }
        if b.linears[0].cols() != h {
            return Err(RuntimeError::bad(
                &format!("block {}", b.layer),
                "weights do not match the stager's configuration",
            ));
        }
        let mut xn = vec![0f32; x.len()];
        self.ctx(1).attn_input(b, &x, &mut xn);
        Ok(Paused {
            tap: Tap::Attention,
            seqs: x.len() / (h * l),
            rows: x.len() / h,
            resid: x,
            input: xn,
            cols: h,
            routes: None,
            carry: Vec::new(),
        })
    }

    /// Runs a paused forward to its next tap, or to the block output after
    /// [`Tap::MlpDown`], with the weights of `b`.
    pub fn resume(&self, b: &BlockWeights, p: Paused) -> Step {
        // On a pool worker, so the parallel loops inside start from one.
        rayon::scope(|_| self.resume_in_pool(b, p))
    }

    fn resume_in_pool(&self, b: &BlockWeights, p: Paused) -> Step {
        if b.ssm.is_some() {
            return self.resume_ssm(b, p);
        }
        let cfg = &self.cfg;
        let ctx = self.ctx(p.seqs);
        let n = ctx.n;
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let (qw, kvw) = (
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
        let mi = ctx.expert_inter();
        let Paused {
            tap,
            seqs,
            rows,
            mut resid,
            mut input,
            routes,
            ..
        } = p;
        if input.is_empty() {
            input = self.recompute(b, tap, seqs, &resid, routes.clone());
        }
        let paused = |tap, resid, input: Vec<f32>, routes: Option<Arc<Routes>>| {
            let cols = match &routes {
                Some(r) if tap == Tap::MlpDown => input.len() / r.assignments().max(1),
                _ => input.len() / rows.max(1),
            };
            Step::Paused(Paused {
                tap,
                seqs,
                rows,
                resid,
                input,
                cols,
                routes,
                carry: Vec::new(),
            })
        };
        match tap {
            Tap::Attention => {
                let z = |k: usize| vec![0f32; k];
                let (mut q, mut k, mut v) = (z(n * qw), z(n * kvw), z(n * kvw));
                // Scratch K/V: one (kv_heads, seq_len, head_dim) slab per window.
                let (mut kc, mut vc) = (z(n * kvw), z(n * kvw));
                let mut out = z(n * qw);
                let mut kv = SeqKv::slabs(&mut kc, &mut vc, ctx.slab());
                ctx.attend(b, &input, &mut kv, &mut q, &mut k, &mut v, &mut out);
                paused(Tap::AttentionOutput, resid, out, None)
            }
            Tap::AttentionOutput => {
                let mut o = vec![0f32; n * h];
                ctx.attn_out(b, &input, &mut o, &mut resid);
                let mut xn = o;
                ctx.mlp_input(b, &resid, &mut xn);
                let routes = ctx.route(b, &xn).map(Arc::new);
                paused(Tap::Mlp, resid, xn, routes)
            }
            Tap::Mlp if b.router.is_some() => {
                // The routing of this input (kept from the pause, or computed now).
                let Some(r) = routes.or_else(|| ctx.route(b, &input).map(Arc::new)) else {
                    unreachable!("a MoE block routes");
                };
                let most = r.max_count();
                let mut act = vec![0f32; r.assignments() * mi];
                let (mut up, mut xe) = (vec![0f32; most * mi], vec![0f32; most * h]);
                ctx.moe_gate_up(b, &r, &input, &mut act, &mut up, &mut xe);
                paused(Tap::MlpDown, resid, act, Some(r))
            }
            Tap::MlpDown if b.router.is_some() => {
                let Some(r) = routes else {
                    unreachable!("a MoE block's MlpDown pause carries its routes");
                };
                let mut o = vec![0f32; n * h];
                let mut ye = vec![0f32; r.max_count() * h];
                ctx.moe_down(b, &r, &input, &mut o, &mut ye);
                ctx.mlp_residual(b, &mut o, &mut resid);
                Step::Done(resid)
            }
            Tap::Mlp => {
                let mut act = vec![0f32; n * inter];
                let mut up = vec![0f32; n.min(MLP_TOKENS) * inter];
                for t0 in (0..n).step_by(MLP_TOKENS) {
                    let m = MLP_TOKENS.min(n - t0);
                    ctx.gate_up(
                        b,
                        4,
                        &input[t0 * h..(t0 + m) * h],
                        m,
                        &mut act[t0 * inter..(t0 + m) * inter],
                        &mut up[..m * inter],
                    );
                }
                paused(Tap::MlpDown, resid, act, None)
            }
            Tap::MlpDown => {
                let mut o = vec![0f32; n * h];
                for t0 in (0..n).step_by(MLP_TOKENS) {
                    let m = MLP_TOKENS.min(n - t0);
                    ctx.down(
                        b,
                        6,
                        &input[t0 * inter..(t0 + m) * inter],
                        m,
                        &mut o[t0 * h..(t0 + m) * h],
                    );
                }
                ctx.mlp_residual(b, &mut o, &mut resid);
                Step::Done(resid)
            }
        }
    }

    /// The input of `tap` from the residual `resid` of a paused forward (see
    /// [`Paused::compact`]).
    fn recompute(
        &self,
        b: &BlockWeights,
        tap: Tap,
        seqs: usize,
        resid: &[f32],
        routes: Option<Arc<Routes>>,
    ) -> Vec<f32> {
        let ctx = self.ctx(seqs);
        let attn_in = || {
            let mut xn = vec![0f32; resid.len()];
            ctx.attn_input(b, resid, &mut xn);
            xn
        };
        let mlp_in = || {
            let mut xn = vec![0f32; resid.len()];
            ctx.mlp_input(b, resid, &mut xn);
            xn
        };
        let rows = resid.len() / self.cfg.hidden_size;
        let at = |tap, input: Vec<f32>| Paused {
            tap,
            seqs,
            rows,
            resid: resid.to_vec(),
            cols: input.len() / rows.max(1),
            input,
            routes: routes.clone(),
            carry: Vec::new(),
        };
        let step = match tap {
            Tap::Attention => return attn_in(),
            Tap::Mlp => return mlp_in(),
            // The residual is the block input: from the attention's input on.
            Tap::AttentionOutput => self.resume_in_pool(b, at(Tap::Attention, attn_in())),
            // The residual is the post-attention stream: from gate/up's input on.
            Tap::MlpDown => self.resume_in_pool(b, at(Tap::Mlp, mlp_in())),
        };
        match step {
            Step::Paused(p) => p.input,
            Step::Done(_) => unreachable!("a tap before the block output"),
        }
    }

    /// A Mamba block's next piece (see the module doc); a compacted input is recomputed
    /// from the block input (the residual) with `b`.
    fn resume_ssm(&self, b: &BlockWeights, p: Paused) -> Step {
        let Some(s) = self.cfg.ssm.as_ref() else {
            unreachable!("a Mamba block under a Mamba config");
        };
        let p = if p.input.is_empty() {
            self.recompute_ssm(b, p.tap, p.seqs, p.resid)
        } else {
            p
        };
        let ctx = self.ctx(p.seqs);
        let (n, d) = (ctx.n, s.d_inner);
        let Paused {
            tap,
            seqs,
            rows,
            mut resid,
            input,
            mut carry,
            ..
        } = p;
        let z = |k: usize| vec![0f32; n * k];
        let paused = |tap, resid, input: Vec<f32>, carry| {
            Step::Paused(Paused {
                tap,
                seqs,
                rows,
                resid,
                cols: input.len() / rows.max(1),
                input,
                routes: None,
                carry,
            })
        };
        // Every window's recurrence starts from zeros.
        let mut state = crate::ssm::State::new(s, seqs);
        match tap {
            Tap::Attention => {
                let (mut xz, mut u, mut g) = (z(2 * d), z(d), z(d));
                ctx.ssm_in(b, &input, &mut xz, &mut state.conv, &mut u, &mut g);
                paused(Tap::AttentionOutput, resid, u, vec![g])
            }
            Tap::AttentionOutput => {
                let (mut dbc, mut dtl) = (z(s.dt_rank + 2 * s.state), z(s.dt_rank));
                ctx.ssm_x(b, &input, &mut dbc, &mut dtl);
                let g = carry.pop().unwrap_or_default();
                paused(Tap::Mlp, resid, dtl, vec![input, g, dbc])
            }
            Tap::Mlp => {
                let [u, g, dbc]: [Vec<f32>; 3] = match carry.try_into() {
                    Ok(c) => c,
                    Err(_) => unreachable!("a Mamba dt_proj pause carries u, z, x_proj's output"),
                };
                let (mut dt, mut y) = (z(d), z(d));
                ctx.ssm_scan(b, &input, &dbc, &u, &g, &mut state.h, &mut dt, &mut y);
                paused(Tap::MlpDown, resid, y, Vec::new())
            }
            Tap::MlpDown => {
                let mut o = z(self.cfg.hidden_size);
                ctx.ssm_out(b, &input, &mut o, &mut resid);
                Step::Done(resid)
            }
        }
    }

    /// A Mamba block's forward from its input `resid` up to `tap`, with `b`.
    fn recompute_ssm(&self, b: &BlockWeights, tap: Tap, seqs: usize, resid: Vec<f32>) -> Paused {
        let mut xn = vec![0f32; resid.len()];
        self.ctx(seqs).attn_input(b, &resid, &mut xn);
        let mut p = Paused {
            tap: Tap::Attention,
            seqs,
            rows: resid.len() / self.cfg.hidden_size,
            resid,
            cols: self.cfg.hidden_size,
            input: xn,
            routes: None,
            carry: Vec::new(),
        };
        while p.tap != tap {
            p = match self.resume_ssm(b, p) {
                Step::Paused(next) => next,
                Step::Done(_) => unreachable!("a tap before the block output"),
            };
        }
        p
    }

    /// Runs a paused forward to the block output with the weights of `b`.
    pub fn finish(&self, b: &BlockWeights, mut p: Paused) -> Vec<f32> {
        loop {
            match self.resume(b, p) {
                Step::Paused(next) => p = next,
                Step::Done(y) => return y,
            }
        }
    }

    /// The whole block on `x (seqs * seq_len, hidden)`.
    pub fn forward(&self, b: &BlockWeights, x: Vec<f32>) -> Result<Vec<f32>> {
        Ok(self.finish(b, self.begin(b, x)?))
    }
}
