//! uc-eval: the text-window evaluation protocol and its metrics.
//!
//! Data flow: text files ([`corpus`], with the built-in SOTU split) -> one token
//! stream (the model's tokenizer, no BOS) -> non-overlapping windows of `seq_len`,
//! the first `n` ([`windows`]) -> for each window the candidate's and optionally a
//! reference's logits, from any [`Scorer`] (the `uc` binary plugs in the one forward
//! engine, `uc_runtime::Decoder`, for checkpoints and packs alike) -> per-position NLL, KL(reference || candidate) over the full
//! vocabulary and top-1 agreement ([`metrics`]) -> an [`EvalReport`].
//!
//! Identity of what was scored: [`tokens_sha256`] hashes the exact token ids of the
//! windows, so two receipts with equal hashes scored identical tokens; the report also
//! carries each window's mean NLL, so a difference can be located.
//!
//! Determinism: per-position values are computed in parallel but written to fixed
//! slots and summed sequentially in f64, so the report has the same digits for any
//! thread count.
#![deny(missing_docs)]

pub mod corpus;
pub mod metrics;

use serde::Serialize;

/// A model that scores a window: logits for every position of `ids`.
pub trait Scorer {
    /// Vocabulary size (columns of the logits).
    fn vocab(&self) -> usize;
    /// Logits `(ids.len(), vocab)` row-major, each window scored from position 0 (no
    /// state carried between calls).
    fn window_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>, EvalError>;
}

/// Errors of the evaluation protocol.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A text file could not be read or is not UTF-8.
    #[error("{path}: {reason}")]
    Text {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The corpus directory holds no file of the requested split.
    #[error("{dir}: no speeches in split {split:?} (expected files named YYYY-Name-N.txt)")]
    EmptySplit {
        /// The directory.
        dir: std::path::PathBuf,
        /// The split.
        split: String,
    },
    /// The text is too short for the requested windows.
    #[error("the text has {tokens} tokens: {windows} windows of {seq_len} need {needed}")]
    TooShort {
        /// Tokens available.
        tokens: usize,
        /// Windows asked for.
        windows: usize,
        /// Window length.
        seq_len: usize,
        /// Tokens needed.
        needed: usize,
    },
    /// Settings that cannot describe an evaluation.
    #[error("invalid settings: {0}")]
    Settings(String),
    /// The candidate and the reference do not share a vocabulary.
    #[error("vocabulary mismatch: model has {model}, reference has {reference}")]
    VocabMismatch {
        /// Candidate vocabulary.
        model: usize,
        /// Reference vocabulary.
        reference: usize,
    },
    /// The model failed.
    #[error(transparent)]
    Model(#[from] uc_model::ModelError),
    /// The forward engine failed.
    #[error("forward pass: {0}")]
    Forward(String),
}

/// Splits a token stream into the first `n` non-overlapping windows of `seq_len`.
pub fn windows(tokens: &[u32], seq_len: usize, n: usize) -> Result<Vec<&[u32]>, EvalError> {
    if seq_len < 2 || n == 0 {
        return Err(EvalError::Settings(format!(
            "seq_len must be >= 2 and windows >= 1 (got {seq_len}, {n})"
        )));
    }
    let needed = seq_len
        .checked_mul(n)
        .ok_or_else(|| EvalError::Settings("seq_len x windows overflows".into()))?;
    if tokens.len() < needed {
        return Err(EvalError::TooShort {
            tokens: tokens.len(),
            windows: n,
            seq_len,
            needed,
        });
    }
    Ok(tokens.chunks_exact(seq_len).take(n).collect())
}

/// SHA-256 (lowercase hex) of the token ids of `windows`: all windows concatenated
/// in order, each id as a u32 little-endian (4 bytes per token, no separators).
pub fn tokens_sha256(windows: &[&[u32]]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for w in windows {
        for id in w.iter() {
            h.update(id.to_le_bytes());
        }
    }
    hex::encode(h.finalize())
}

/// Metric totals of one evaluation.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EvalReport {
    /// Predicted positions: windows x (seq_len - 1), or x (seq_len - 1 - score_from).
    pub n_pos: usize,
    /// Mean negative log-likelihood of the model (nats).
    pub nll: f64,
    /// Perplexity: exp(nll).
    pub ppl: f64,
    /// Mean NLL of the model over each window's predicted positions (nats), in window
    /// order. Every window has seq_len - 1 positions, so their plain mean equals `nll`
    /// up to f64 rounding (`nll` itself is one sequential sum over all positions).
    pub window_nll: Vec<f64>,
    /// Against a reference: its NLL, perplexity, the ratio, KL and top-1.
    pub against: Option<Comparison>,
}

/// How the model compares to a reference on the same positions.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Comparison {
    /// Reference mean NLL.
    pub ref_nll: f64,
    /// Reference perplexity.
    pub ref_ppl: f64,
    /// Model perplexity / reference perplexity.
    pub ppl_ratio: f64,
    /// Mean over positions of KL(reference || model), nats.
    pub kld: f64,
    /// Fraction of positions where both argmaxes agree.
    pub top1: f64,
    /// Mean NLL of the reference over each window's predicted positions (nats), in
    /// window order; pairs with `window_nll` of the report.
    pub ref_window_nll: Vec<f64>,
}

/// Evaluates `model` (and `reference`, when given) on `windows`; `progress` is
/// called after each window with the number done.
pub fn evaluate(
    model: &mut dyn Scorer,
    reference: Option<&mut dyn Scorer>,
    windows: &[&[u32]],
    progress: impl FnMut(usize),
) -> Result<EvalReport, EvalError> {
    evaluate_from(model, reference, windows, 0, progress)
}

/// [`evaluate`], scoring only the predictions made at window positions `>= score_from`
/// (every window still runs from position 0, so they see the same context).
/// llama.cpp's `llama-perplexity` scores the second half of each chunk, i.e.
/// `score_from = seq_len / 2`: with it the two tools' numbers are like for like.
pub fn evaluate_from(
    model: &mut dyn Scorer,
    mut reference: Option<&mut dyn Scorer>,
    windows: &[&[u32]],
    score_from: usize,
    mut progress: impl FnMut(usize),
) -> Result<EvalReport, EvalError> {
    let vocab = model.vocab();
    if let Some(r) = &reference {
        if r.vocab() != vocab {
            return Err(EvalError::VocabMismatch {
                model: vocab,
                reference: r.vocab(),
            });
        }
    }
    let mut totals = metrics::Totals::default();
    for (i, w) in windows.iter().enumerate() {
        let logits = model.window_logits(w)?;
        let ref_logits = match reference.as_deref_mut() {
            Some(r) => Some(r.window_logits(w)?),
            None => None,
        };
        let per = metrics::window_metrics(&logits, ref_logits.as_deref(), w, vocab);
        totals.add(&per[score_from.min(per.len())..]);
        progress(i + 1);
    }
    Ok(totals.report(reference.is_some()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_sha256_hashes_u32_little_endian_concatenated() {
        // SHA-256 of the 8 bytes 01 00 00 00 02 01 00 00 (ids 1 and 258).
        let a: &[u32] = &[1];
        let b: &[u32] = &[258];
        let split = tokens_sha256(&[a, b]);
        let joined = tokens_sha256(&[&[1, 258]]);
        assert_eq!(split, joined);
        use sha2::{Digest, Sha256};
        let want = hex::encode(Sha256::digest([1u8, 0, 0, 0, 2, 1, 0, 0]));
        assert_eq!(split, want);
        // The empty input is the SHA-256 of no bytes.
        assert_eq!(
            tokens_sha256(&[]),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    /// Logits that put all mass on token `pos % vocab` at position `pos`: each window
    /// position's NLL differs, so a wrong slice shows.
    struct ByPosition(usize);
    impl Scorer for ByPosition {
        fn vocab(&self) -> usize {
            self.0
        }
        fn window_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>, EvalError> {
            let v = self.0;
            Ok((0..ids.len() * v)
                .map(|k| if k % v == (k / v) % v { 3.0 } else { 0.0 })
                .collect())
        }
    }

    #[test]
    fn score_from_scores_only_the_later_positions() {
        let ids: Vec<u32> = (0..8).map(|i| (i * 3 % 5) as u32).collect();
        let windows: Vec<&[u32]> = ids.chunks(4).collect();
        let all = evaluate(&mut ByPosition(5), None, &windows, |_| {}).unwrap();
        let late = evaluate_from(&mut ByPosition(5), None, &windows, 2, |_| {}).unwrap();
        assert_eq!(all.n_pos, 6);
        assert_eq!(late.n_pos, 2);
        // Position 2 of each window predicts its token 3: the mean over those alone.
        let nll = |pos: usize, target: u32| {
            let lse = (3f64.exp() + 4.0).ln();
            lse - if pos % 5 == target as usize { 3.0 } else { 0.0 }
        };
        let want = (nll(2, ids[3]) + nll(2, ids[7])) / 2.0;
        assert!((late.nll - want).abs() < 1e-6, "{} vs {want}", late.nll);
        assert_ne!(all.nll, late.nll);
    }
}
