//! Bit allocation under a bits-per-weight budget.
//!
//! Each block linear `k` gets its own codec. The choice rests on one measurement per
//! tensor, made by [`crate::pipeline`] before any encoding: the relative MSE that
//! round-to-nearest at [`PROBE_BITS`] bits of that tensor alone adds to its block's
//! output (teacher stream, a few calibration windows), per hidden channel relative to
//! that channel's mean square and averaged over channels. A tensor's added error at `b`
//! bits is modelled as `m_k * 4^-b` (each bit halves the rounding step), so the probe
//! gives `m_k`. [`allocate`] then spends the budget greedily: every tensor starts at the
//! cheapest candidate, and the upgrade with the largest modelled error reduction per
//! stored bit is taken while the total fits. Per-channel normalisation puts the errors of
//! different blocks in one currency: relative to the whole residual stream's energy
//! instead, blocks after the stream grows a few huge channels look 20x less sensitive
//! than they are, and a 5.0-bpw budget spent that way gave KLD 0.064 instead of 0.027
//! (docs/research-log.md). So the budget moves between blocks as well as within one.
//!
//! Stored bits are counted exactly ([`CodecSpec::stored_bytes`]: codes, scales,
//! codebook), so the pack's `bpw_body` is at most the budget.

use serde::Serialize;
use uc_codec::CodecSpec;

use crate::{CompressError, Result};

/// Bits of the round-to-nearest probe that measures each tensor's sensitivity.
pub const PROBE_BITS: u8 = 4;

/// One tensor's measured sensitivity.
#[derive(Debug, Clone, Serialize)]
pub struct Sensitivity {
    /// Tensor name.
    pub name: String,
    /// Rows (output features).
    pub rows: usize,
    /// Columns (input features).
    pub cols: usize,
    /// Per-channel relative MSE the probe added to the block output.
    pub probe_rel_mse: f64,
}

impl Sensitivity {
    /// Modelled added error at `bits` bits: `probe * 4^(PROBE_BITS - bits)`.
    fn error_at(&self, bits: u8) -> f64 {
        self.probe_rel_mse * 4f64.powi(i32::from(PROBE_BITS) - i32::from(bits))
    }
}

/// The codec a `(rows, cols)` tensor gets from a requested `spec`: a rotation request is
/// a largest block (the largest supported block dividing `cols`, none if there is none;
/// it does not change the stored bytes), and an overlay rank a largest rank (at most
/// `min(rows, cols)`, the most an overlay of the tensor can have: Mamba's dt_proj is
/// only `time_step_rank` columns wide). The encoder and the budget both use this.
pub fn per_tensor(spec: &CodecSpec, rows: usize, cols: usize) -> CodecSpec {
    CodecSpec {
        rot: uc_codec::rotation::block_for(cols, spec.rot),
        rank: spec
            .rank
            .min(u32::try_from(rows.min(cols)).unwrap_or(u32::MAX)),
        ..*spec
    }
}

/// Picks one of `candidates` per tensor so that the stored bits of all tensors are at
/// most `budget_bpw` times their element count, minimising the summed modelled error.
/// `candidates` must be sorted by ascending `bits`. Deterministic: ties go to the
/// earlier tensor. Errors if even the cheapest candidate everywhere exceeds the budget.
pub fn allocate(
    sens: &[Sensitivity],
    candidates: &[CodecSpec],
    budget_bpw: f64,
) -> Result<Vec<CodecSpec>> {
    let cost = |k: usize, c: usize| -> Result<u64> {
        let s = &sens[k];
        // Rotation and overlay rank are resolved per tensor, as the encoder does.
        let spec = per_tensor(&candidates[c], s.rows, s.cols);
        spec.stored_bytes(s.rows, s.cols)
            .map(|b| b * 8)
            .map_err(|error| CompressError::Codec {
                tensor: s.name.clone(),
                error,
            })
    };
    let elements: u64 = sens.iter().map(|s| (s.rows * s.cols) as u64).sum();
    // Floor, so rounding can never push the pack over the budget.
    let budget = (budget_bpw * elements as f64).floor() as u64;
    let mut choice = vec![0usize; sens.len()];
    let mut spent: u64 = (0..sens.len()).map(|k| cost(k, 0)).sum::<Result<u64>>()?;
    if spent > budget {
        return Err(CompressError::Settings(format!(
            "a budget of {budget_bpw} bits per weight is below the cheapest codec \
             ({}: {:.4} bpw)",
            candidates[0].name(),
            spent as f64 / elements as f64
        )));
    }
    loop {
        // The best affordable single-step upgrade: error reduction per extra bit.
        let mut best: Option<(f64, usize, u64)> = None;
        for (k, s) in sens.iter().enumerate() {
            let c = choice[k];
            if c + 1 >= candidates.len() {
                continue;
            }
            let extra = cost(k, c + 1)? - cost(k, c)?;
            if spent + extra > budget {
                continue;
            }
            let gain = s.error_at(candidates[c].bits) - s.error_at(candidates[c + 1].bits);
            let rate = gain / extra.max(1) as f64;
            if best.is_none_or(|(r, _, _)| rate > r) {
                best = Some((rate, k, extra));
            }
        }
        let Some((_, k, extra)) = best else { break };
        choice[k] += 1;
        spent += extra;
    }
    Ok(choice.into_iter().map(|c| candidates[c]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands() -> Vec<CodecSpec> {
        [3u8, 4, 5, 6, 8]
            .iter()
            .map(|&b| CodecSpec::new(b, 128))
            .collect()
    }

    fn sens(name: &str, rows: usize, cols: usize, e: f64) -> Sensitivity {
        Sensitivity {
            name: name.into(),
            rows,
            cols,
            probe_rel_mse: e,
        }
    }

    fn bpw(s: &[Sensitivity], c: &[CodecSpec]) -> f64 {
        let bits: u64 = s
            .iter()
            .zip(c)
            .map(|(s, c)| c.stored_bytes(s.rows, s.cols).unwrap() * 8)
            .sum();
        bits as f64 / s.iter().map(|s| (s.rows * s.cols) as f64).sum::<f64>()
    }

    #[test]
    fn meets_the_budget_and_favours_sensitive_tensors() {
        let s = vec![
            sens("a", 256, 512, 1e-3),
            sens("b", 256, 512, 1e-5),
            sens("c", 512, 256, 1e-4),
        ];
        for budget in [3.5, 4.0, 5.0, 6.0] {
            let c = allocate(&s, &cands(), budget).unwrap();
            assert!(bpw(&s, &c) <= budget, "{budget}: {}", bpw(&s, &c));
            assert!(c[0].bits >= c[2].bits && c[2].bits >= c[1].bits, "{c:?}");
        }
    }

    #[test]
    fn equal_tensors_get_bits_within_one_step() {
        let s: Vec<_> = (0..6)
            .map(|i| sens(&format!("t{i}"), 128, 256, 1e-4))
            .collect();
        let c = allocate(&s, &cands(), 5.0).unwrap();
        let (lo, hi) = (
            c.iter().map(|c| c.bits).min().unwrap(),
            c.iter().map(|c| c.bits).max().unwrap(),
        );
        assert!(hi - lo <= 1, "{c:?}");
        assert!(
            bpw(&s, &c) > 4.5,
            "the budget is mostly spent: {}",
            bpw(&s, &c)
        );
    }

    #[test]
    fn a_budget_below_the_cheapest_codec_is_an_error() {
        let s = vec![sens("a", 64, 128, 1.0)];
        let e = allocate(&s, &cands(), 2.0).unwrap_err();
        assert!(e.to_string().contains("below the cheapest"), "{e}");
    }
}
