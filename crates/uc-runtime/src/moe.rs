//! Mixture-of-experts routing (Mixtral, Qwen3-MoE, OLMoE): which experts each token's
//! MLP runs and with what weight. [`Routes::route`] computes it from a block's router and
//! the MLP input; `block` runs the experts on it (decoder and stager alike) and the
//! compressor reads it to take each expert's statistics on the tokens routed to it.
//!
//! The numerics are transformers' (`MixtralTopKRouter`, `Qwen3MoeTopKRouter`,
//! `OlmoeTopKRouter`): router logits `x . W_r^T` in f32, softmax in f32, the `top_k`
//! largest probabilities (ties: the lower expert index first), divided by their sum when
//! `norm_topk_prob`. The router
//! runs on the scalar kernels whatever the machine, so a token's experts do not depend on
//! the instruction set given the same input.
//!
//! Layout: experts in ascending order, each with its tokens in ascending order; "row
//! `j` of expert `e`" is assignment `range(e).start + j`, the row index into the
//! `(assignments, width)` buffers that hold every (token, expert) pair's activations
//! (the tap [`crate::staged::Tap::MlpDown`] of a MoE block).

use crate::kernels::dense;
use crate::kernels::math;
use crate::kernels::Isa;
use std::ops::Range;

/// The routing of `rows` tokens to `experts` experts, `top_k` each.
#[derive(Debug, Clone, PartialEq)]
pub struct Routes {
    /// Tokens routed.
    rows: usize,
    /// `offsets[e] .. offsets[e + 1]` are expert `e`'s assignments; `experts + 1` entries.
    offsets: Vec<usize>,
    /// Per assignment: the token (ascending within an expert).
    tokens: Vec<u32>,
    /// Per assignment: the token's weight for that expert.
    weights: Vec<f32>,
}

impl Routes {
    /// Routes `x (rows, hidden)` with router `w (experts, hidden)`: per token the `top_k`
    /// experts of highest softmax probability, weights renormalized to sum 1 when
    /// `norm_topk_prob`. Callers guarantee `1 <= top_k <= experts` (checked at config
    /// parse) and matching widths.
    pub fn route(w: &[f32], top_k: usize, norm_topk_prob: bool, x: &[f32], hidden: usize) -> Self {
        let experts = w.len() / hidden.max(1);
        let rows = x.len() / hidden.max(1);
        let k = top_k.min(experts);
        // Per token: (expert, weight) of its top-k, in descending probability.
        let mut picked: Vec<(u32, f32)> = Vec::with_capacity(rows * k);
        let mut probs = vec![0f32; experts];
        let mut taken = vec![false; experts];
        for row in x.chunks_exact(hidden) {
            for (p, we) in probs.iter_mut().zip(w.chunks_exact(hidden)) {
                *p = dense::dot(Isa::Scalar, row, we);
            }
            math::softmax(Isa::Scalar, &mut probs);
            taken.iter_mut().for_each(|t| *t = false);
            let first = picked.len();
            for _ in 0..k {
                // The largest untaken probability, lowest index on ties (NaN never wins).
                let mut best: Option<usize> = None;
                for (e, &p) in probs.iter().enumerate() {
                    if !taken[e] && best.is_none_or(|b| p > probs[b]) {
                        best = Some(e);
                    }
                }
                let e = best.unwrap_or(0);
                taken[e] = true;
                picked.push((e as u32, probs[e]));
            }
            if norm_topk_prob {
                // Summed in descending order, as torch sums the top-k values.
                let sum: f32 = picked[first..].iter().map(|&(_, p)| p).sum();
                picked[first..].iter_mut().for_each(|(_, p)| *p /= sum);
            }
        }
        // Counting sort by expert; tokens stay ascending within each expert.
        let mut offsets = vec![0usize; experts + 1];
        for &(e, _) in &picked {
            offsets[e as usize + 1] += 1;
        }
        for e in 0..experts {
            offsets[e + 1] += offsets[e];
        }
        let mut next = offsets.clone();
        let mut tokens = vec![0u32; picked.len()];
        let mut weights = vec![0f32; picked.len()];
        for (i, &(e, p)) in picked.iter().enumerate() {
            let at = &mut next[e as usize];
            tokens[*at] = (i / k.max(1)) as u32;
            weights[*at] = p;
            *at += 1;
        }
        Routes {
            rows,
            offsets,
            tokens,
            weights,
        }
    }

    /// Tokens routed.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Experts.
    pub fn experts(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// (token, expert) pairs: `rows * top_k`.
    pub fn assignments(&self) -> usize {
        self.tokens.len()
    }

    /// Expert `e`'s rows in the assignment order.
    pub fn range(&self, e: usize) -> Range<usize> {
        self.offsets[e]..self.offsets[e + 1]
    }

    /// Tokens routed to expert `e`.
    pub fn count(&self, e: usize) -> usize {
        self.offsets[e + 1] - self.offsets[e]
    }

    /// The tokens routed to expert `e`, ascending.
    pub fn tokens(&self, e: usize) -> &[u32] {
        &self.tokens[self.range(e)]
    }

    /// Their weights for expert `e`.
    pub fn weights(&self, e: usize) -> &[f32] {
        &self.weights[self.range(e)]
    }

    /// The most tokens any one expert received.
    pub fn max_count(&self) -> usize {
        (0..self.experts())
            .map(|e| self.count(e))
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_top_k_by_probability_and_renormalizes() {
        // hidden 1: logits = x * w_e; x = 1 -> experts' logits 0, 2, 1, -1.
        let w = [0.0, 2.0, 1.0, -1.0];
        let r = Routes::route(&w, 2, true, &[1.0, -1.0], 1);
        assert_eq!((r.rows(), r.experts(), r.assignments()), (2, 4, 4));
        // Token 0 -> experts 1, 2; token 1 (logits 0, -2, -1, 1) -> experts 3, 0.
        assert_eq!(r.tokens(0), &[1]);
        assert_eq!(r.tokens(1), &[0]);
        assert_eq!(r.tokens(2), &[0]);
        assert_eq!(r.tokens(3), &[1]);
        let (a, b) = (r.weights(1)[0], r.weights(2)[0]);
        assert!((a + b - 1.0).abs() < 1e-6 && a > b);
        assert!((a - 1.0 / (1.0 + (-1.0f32).exp())).abs() < 1e-6);
    }

    #[test]
    fn without_renormalization_weights_are_the_softmax_probabilities() {
        let w = [0.0, 2.0, 1.0, -1.0];
        let r = Routes::route(&w, 2, false, &[1.0], 1);
        let z: f32 = [0.0f32, 2.0, 1.0, -1.0].iter().map(|l| l.exp()).sum();
        assert!((r.weights(1)[0] - 2f32.exp() / z).abs() < 1e-6);
        assert_eq!(r.count(0) + r.count(3), 0);
        assert_eq!(r.max_count(), 1);
    }

    #[test]
    fn ties_go_to_the_lower_expert() {
        let r = Routes::route(&[1.0, 1.0, 1.0], 1, true, &[1.0], 1);
        assert_eq!(r.tokens(0), &[0]);
        assert_eq!(r.weights(0), &[1.0]);
    }
}
