//! Per-position metrics from logits, and their deterministic totals.
//!
//! Logits of a window are `(seq, vocab)` row-major; position `i` predicts token
//! `ids[i + 1]`, so a window of `seq` tokens gives `seq - 1` predictions.
//! Log-softmax is `l - logsumexp(l)` with the maximum subtracted first; exponentials
//! are f32, every sum is f64.

use crate::{Comparison, EvalReport};
use rayon::prelude::*;

/// What one predicted position contributes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Position {
    /// The model's NLL of the true next token.
    pub nll: f64,
    /// The reference's NLL, KL(ref || model), and whether the argmaxes agree.
    pub against: Option<(f64, f64, bool)>,
}

/// `logsumexp` of a row, with the max subtracted for stability.
fn logsumexp(row: &[f32]) -> f64 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f64 = row.iter().map(|&x| f64::from((x - m).exp())).sum();
    f64::from(m) + s.ln()
}

/// Index of the first maximum.
fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

/// KL(p || q) for rows of logits `r` (reference, p) and `c` (model, q).
fn kl(r: &[f32], lse_r: f64, c: &[f32], lse_c: f64) -> f64 {
    r.iter()
        .zip(c)
        .map(|(&a, &b)| {
            let log_p = f64::from(a) - lse_r;
            let log_q = f64::from(b) - lse_c;
            log_p.exp() * (log_p - log_q)
        })
        .sum()
}

/// Metrics of every predicted position of one window, in position order.
///
/// `logits` and `ref_logits` are `(ids.len(), vocab)`; ids are assumed in range
/// (the model rejected any that were not).
pub fn window_metrics(
    logits: &[f32],
    ref_logits: Option<&[f32]>,
    ids: &[u32],
    vocab: usize,
) -> Vec<Position> {
    let n = ids.len().saturating_sub(1);
    (0..n)
        .into_par_iter()
        .map(|i| {
            let row = &logits[i * vocab..(i + 1) * vocab];
            let target = ids[i + 1] as usize;
            let lse = logsumexp(row);
            let nll = lse - f64::from(row[target]);
            let against = ref_logits.map(|rl| {
                let rrow = &rl[i * vocab..(i + 1) * vocab];
                let lse_r = logsumexp(rrow);
                let ref_nll = lse_r - f64::from(rrow[target]);
                (
                    ref_nll,
                    kl(rrow, lse_r, row, lse),
                    argmax(rrow) == argmax(row),
                )
            });
            Position { nll, against }
        })
        .collect()
}

/// Running sums over positions, added in a fixed order.
#[derive(Debug, Default, Clone)]
pub struct Totals {
    n: usize,
    nll: f64,
    ref_nll: f64,
    kld: f64,
    agree: usize,
}

impl Totals {
    /// Adds a window's positions in order.
    pub fn add(&mut self, positions: &[Position]) {
        for p in positions {
            self.n += 1;
            self.nll += p.nll;
            if let Some((r, k, a)) = p.against {
                self.ref_nll += r;
                self.kld += k;
                self.agree += usize::from(a);
            }
        }
    }

    /// The report; `with_reference` says whether the comparison fields are meaningful.
    pub fn report(&self, with_reference: bool) -> EvalReport {
        let n = self.n.max(1) as f64;
        let nll = self.nll / n;
        let against = with_reference.then(|| {
            let ref_nll = self.ref_nll / n;
            Comparison {
                ref_nll,
                ref_ppl: ref_nll.exp(),
                ppl_ratio: (nll - ref_nll).exp(),
                kld: self.kld / n,
                top1: self.agree as f64 / n,
            }
        });
        EvalReport {
            n_pos: self.n,
            nll,
            ppl: nll.exp(),
            against,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_models_have_zero_kl_full_agreement_and_ratio_one() {
        let vocab = 5;
        let logits: Vec<f32> = (0..15).map(|i| ((i * 7) % 11) as f32 * 0.3).collect();
        let ids = [0u32, 3, 1];
        let per = window_metrics(&logits, Some(&logits), &ids, vocab);
        let mut t = Totals::default();
        t.add(&per);
        let r = t.report(true);
        let c = r.against.unwrap();
        assert_eq!(r.n_pos, 2);
        assert_eq!(c.kld, 0.0);
        assert_eq!(c.top1, 1.0);
        assert_eq!(c.ppl_ratio, 1.0);
    }

    #[test]
    fn nll_matches_hand_computation() {
        // Uniform logits over 4 tokens: NLL = ln 4 whatever the target.
        let per = window_metrics(&[0.0; 8], None, &[0, 2], 4);
        assert!((per[0].nll - 4f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn kl_matches_closed_form_for_two_tokens() {
        // p = softmax(0, ln 3) = (1/4, 3/4); q = uniform.
        let r = [0.0, 3f32.ln()];
        let c = [0.0, 0.0];
        let got = kl(&r, logsumexp(&r), &c, logsumexp(&c));
        let want = 0.25 * (0.25f64 / 0.5).ln() + 0.75 * (0.75f64 / 0.5).ln();
        assert!((got - want).abs() < 1e-7, "{got} vs {want}");
    }

    #[test]
    fn argmax_takes_the_first_of_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }
}
