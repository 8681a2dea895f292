//! Mamba's selective state-space mixer: the causal depthwise conv and the selective scan,
//! and the recurrent state that replaces a KV cache ([`State`]).
//!
//! Numerics follow transformers' torch path (`MambaMixer` with `causal_conv1d_fn` and
//! `mamba_selective_scan`'s sequential loop), in f32:
//! - conv: `u[t, c] = silu(bias[c] + sum_j w[c, j] x[t - (K - 1) + j, c])`, positions
//!   before the sequence start zero (torch's left padding of `K - 1`), or, in decode, the
//!   inputs kept in the conv state;
//! - scan per channel `c`, state `h (N,)`: `dt = softplus(dt_raw + dt_bias)` (torch's
//!   threshold 20), `h = exp(A[c] dt) * h + (dt B_t) x_t`, `y = C_t . h + D[c] x_t`, then
//!   `y *= silu(z)`.
//!
//! Determinism: the parallel loops split channels (outputs), never a sum, so the bits do
//! not depend on the thread count; every sum runs in index order.
//!
//! Shapes (n = tokens of this call over `seqs` sequences of `n / seqs` tokens each, `d =
//! d_inner`, `N = state`, `K = conv_kernel`): `x`, `u`, `z`, `dt`, `y` are `(n, d)`
//! row-major; `B`, `C` are read from x_proj's output `(n, R + 2N)` (columns `R .. R + N`
//! and `R + N ..`); the state of one sequence is `(K - 1, d)` conv inputs (oldest first)
//! and `(d, N)` SSM state.

use rayon::prelude::*;
use uc_model::config::Ssm;

/// Channels per parallel task of the scan.
const SCAN_CHANNELS: usize = 32;

/// The recurrent state of one Mamba layer for `seqs` sequences.
pub(crate) struct State {
    /// `(seqs, K - 1, d)`: the last `K - 1` conv inputs of each sequence, oldest first.
    pub(crate) conv: Vec<f32>,
    /// `(seqs, d, N)`.
    pub(crate) h: Vec<f32>,
}

impl State {
    /// Zeros: the state before a sequence's first token.
    pub(crate) fn new(s: &Ssm, seqs: usize) -> Self {
        State {
            conv: vec![0f32; seqs * (s.conv_kernel - 1) * s.d_inner],
            h: vec![0f32; seqs * s.d_inner * s.state],
        }
    }

    /// Back to zeros (a new sequence).
    pub(crate) fn clear(&mut self) {
        self.conv.fill(0.0);
        self.h.fill(0.0);
    }
}

/// `x / (1 + exp(-x))` (torch's `F.silu` in f32).
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// torch's `F.softplus` (beta 1, threshold 20): `x` above 20, else `log1p(exp(x))`.
fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// The causal depthwise conv and SiLU: `u (n, d)` from `x` = columns `0..d` of `xz (n,
/// 2d)`; `conv (d, K)` taps, `bias (d,)`; `state.conv` is read as the inputs before this
/// call and left holding the last `K - 1` inputs of each sequence.
pub(crate) fn conv(
    s: &Ssm,
    w: &[f32],
    bias: Option<&[f32]>,
    xz: &[f32],
    seqs: usize,
    state: &mut [f32],
    u: &mut [f32],
) {
    let (d, k) = (s.d_inner, s.conv_kernel);
    let n = u.len() / d;
    let len = n / seqs.max(1);
    let keep = k - 1;
    for sq in 0..seqs {
        // ext: (keep + len, d) = the kept inputs, then this call's.
        let mut ext = Vec::with_capacity((keep + len) * d);
        let st = &mut state[sq * keep * d..(sq + 1) * keep * d];
        ext.extend_from_slice(st);
        for t in 0..len {
            let row = (sq * len + t) * 2 * d;
            ext.extend_from_slice(&xz[row..row + d]);
        }
        let out = &mut u[sq * len * d..(sq + 1) * len * d];
        out.par_chunks_mut(d).enumerate().for_each(|(t, o)| {
            for (c, o) in o.iter_mut().enumerate() {
                let mut acc = bias.map_or(0.0, |b| b[c]);
                for j in 0..k {
                    acc += w[c * k + j] * ext[(t + j) * d + c];
                }
                *o = silu(acc);
            }
        });
        st.copy_from_slice(&ext[len * d..]);
    }
}

/// The selective scan: `y (n, d)` from `u`, `z` `(n, d)`, `dt (n, d)` (dt_proj's output
/// before its bias), B and C in `dbc (n, R + 2N)`; `a = -exp(A_log) (d, N)`, `dd = D
/// (d,)`, `dt_bias (d,)`; `h (seqs, d, N)` is the state before this call, left at its end.
#[allow(clippy::too_many_arguments)]
pub(crate) fn scan(
    s: &Ssm,
    a: &[f32],
    dd: &[f32],
    dt_bias: &[f32],
    dt: &[f32],
    dbc: &[f32],
    u: &[f32],
    z: &[f32],
    seqs: usize,
    h: &mut [f32],
    y: &mut [f32],
) {
    let (d, ns, r) = (s.d_inner, s.state, s.dt_rank);
    let w = r + 2 * ns;
    let n = y.len() / d;
    let len = n / seqs.max(1);
    for sq in 0..seqs {
        let hs = &mut h[sq * d * ns..(sq + 1) * d * ns];
        // Per block of channels: its outputs (len, block) gathered, then scattered into y.
        let blocks: Vec<(usize, Vec<f32>)> = hs
            .par_chunks_mut(SCAN_CHANNELS * ns)
            .enumerate()
            .map(|(blk, hb)| {
                let c0 = blk * SCAN_CHANNELS;
                let width = hb.len() / ns;
                let mut out = vec![0f32; len * width];
                for t in 0..len {
                    let row = sq * len + t;
                    let bc = &dbc[row * w + r..(row + 1) * w];
                    let (b, cc) = bc.split_at(ns);
                    for i in 0..width {
                        let c = c0 + i;
                        let delta = softplus(dt[row * d + c] + dt_bias[c]);
                        let x = u[row * d + c];
                        let hc = &mut hb[i * ns..(i + 1) * ns];
                        let ac = &a[c * ns..(c + 1) * ns];
                        let mut acc = 0f32;
                        for j in 0..ns {
                            hc[j] = (ac[j] * delta).exp() * hc[j] + delta * b[j] * x;
                            acc += hc[j] * cc[j];
                        }
                        let v = acc + x * dd[c];
                        out[t * width + i] = v * silu(z[row * d + c]);
                    }
                }
                (c0, out)
            })
            .collect();
        for (c0, out) in blocks {
            let width = out.len() / len.max(1);
            for t in 0..len {
                let row = (sq * len + t) * d + c0;
                y[row..row + width].copy_from_slice(&out[t * width..(t + 1) * width]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Ssm {
        Ssm {
            d_inner: 3,
            state: 2,
            conv_kernel: 3,
            dt_rank: 1,
            use_bias: false,
            use_conv_bias: true,
        }
    }

    #[test]
    fn conv_state_carries_the_window_across_calls() {
        // One call over 5 tokens equals 2 + 3 tokens with the state in between.
        let s = cfg();
        let w: Vec<f32> = (0..9).map(|i| 0.1 * i as f32 - 0.3).collect();
        let b = [0.1f32, -0.2, 0.3];
        let xz: Vec<f32> = (0..30).map(|i| ((i * 7) % 11) as f32 * 0.1 - 0.5).collect();
        let mut st = vec![0f32; 2 * 3];
        let mut whole = vec![0f32; 15];
        conv(&s, &w, Some(&b), &xz, 1, &mut st, &mut whole);
        let mut st2 = vec![0f32; 6];
        let (mut u1, mut u2) = (vec![0f32; 6], vec![0f32; 9]);
        conv(&s, &w, Some(&b), &xz[..12], 1, &mut st2, &mut u1);
        conv(&s, &w, Some(&b), &xz[12..], 1, &mut st2, &mut u2);
        assert_eq!([u1, u2].concat(), whole);
        assert_eq!(st, st2);
        // First token: only the current input's tap (j = K - 1) sees data.
        let want = silu(b[0] + w[2] * xz[0]);
        assert_eq!(whole[0], want);
    }

    #[test]
    fn softplus_matches_torch_threshold() {
        assert_eq!(softplus(25.0), 25.0);
        assert!((softplus(0.0) - std::f32::consts::LN_2).abs() < 1e-7);
    }
}
