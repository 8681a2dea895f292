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

/// Running sums over positions, added in a fixed order, plus each window's mean NLL.
#[derive(Debug, Default, Clone)]
pub struct Totals {
    n: usize,
    nll: f64,
    ref_nll: f64,
    kld: f64,
    agree: usize,
    window_nll: Vec<f64>,
    ref_window_nll: Vec<f64>,
}

impl Totals {
    /// Adds a window's positions in order (one call per window).
    pub fn add(&mut self, positions: &[Position]) {
        let (mut w_nll, mut w_ref) = (0f64, 0f64);
        for p in positions {
            self.n += 1;
            self.nll += p.nll;
            w_nll += p.nll;
            if let Some((r, k, a)) = p.against {
                self.ref_nll += r;
                w_ref += r;
                self.kld += k;
                self.agree += usize::from(a);
            }
        }
        let k = positions.len().max(1) as f64;
        self.window_nll.push(w_nll / k);
        self.ref_window_nll.push(w_ref / k);
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
                ref_window_nll: self.ref_window_nll.clone(),
            }
        });
        EvalReport {
            n_pos: self.n,
            nll,
            ppl: nll.exp(),
            window_nll: self.window_nll.clone(),
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
    fn window_means_are_per_window_and_average_to_the_total() {
        let vocab = 3;
        let a: Vec<f32> = (0..12).map(|i| ((i * 5) % 7) as f32 * 0.4).collect();
        let b: Vec<f32> = (0..12).map(|i| ((i * 3) % 5) as f32 * 0.7).collect();
        let (w1, w2) = ([0u32, 2, 1, 0], [1u32, 1, 2, 0]);
        let p1 = window_metrics(&a, Some(&b), &w1, vocab);
        let p2 = window_metrics(&b, Some(&a), &w2, vocab);
        let mut t = Totals::default();
        t.add(&p1);
        t.add(&p2);
        let r = t.report(true);
        let mean = |p: &[Position]| p.iter().map(|x| x.nll).sum::<f64>() / p.len() as f64;
        assert_eq!(r.window_nll, vec![mean(&p1), mean(&p2)]);
        assert!(((r.window_nll[0] + r.window_nll[1]) / 2.0 - r.nll).abs() < 1e-12);
        let c = r.against.unwrap();
        assert_eq!(c.ref_window_nll.len(), 2);
        assert!(((c.ref_window_nll[0] + c.ref_window_nll[1]) / 2.0 - c.ref_nll).abs() < 1e-12);
    }

    #[test]
    fn argmax_takes_the_first_of_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }
}
