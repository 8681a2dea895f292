//! Memory budgets (`--max-memory SIZE`): a size argument, and an estimate of a
//! command's peak resident set as named terms per phase, checked against a budget
//! before the command starts. The estimates themselves live beside what they model
//! (`uc_compress::memory` for compression, `uc_runtime::memory` for inference); this
//! module holds the shared vocabulary.

use serde::Serialize;

/// Bytes the process holds before any model data: the binary, the allocator's
/// arenas, thread stacks, the manifest writer (measured: `uc compress --help`-sized
/// processes start near 10 MiB; this leaves room for rayon's pool and buffers).
pub const BASE_BYTES: u64 = 64 << 20;

/// The margin [`Phase::with_margin`] adds, in percent of the tracked terms. Set from
/// measurements (scripts/bench_big.sh, docs/research-log.md 2026-12-03 evening): without
/// it the estimate was 10% under the measured peak RSS of a 7B-shaped RTN compress
/// (1.55 GiB vs 1.72 GiB) and 13% under a 1B-shaped calibrated one (4.54 vs 5.22 GiB);
/// mimalloc, which uc runs with purging off, keeps freed blocks per thread.
pub const MARGIN_PERCENT: u64 = 20;

/// One named part of a phase's resident set.
#[derive(Debug, Clone, Serialize)]
pub struct Term {
    /// What is resident.
    pub what: String,
    /// Bytes.
    pub bytes: u64,
}

/// The resident set of one phase of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    /// Which phase (`block`, `globals`, ...).
    pub name: String,
    /// Its terms.
    pub terms: Vec<Term>,
    /// Their sum.
    pub bytes: u64,
}

impl Phase {
    /// A phase of the given terms plus a margin of [`MARGIN_PERCENT`] of their sum for
    /// what the terms do not track (allocator retention, per-thread buffers, mapped
    /// source pages).
    pub fn with_margin(name: &str, mut terms: Vec<(String, u64)>) -> Self {
        let tracked: u64 = terms.iter().map(|(_, b)| b).sum();
        terms.push((
            format!("allocator retention and untracked buffers ({MARGIN_PERCENT}% of the rest)"),
            tracked * MARGIN_PERCENT / 100,
        ));
        Phase::new(name, terms)
    }

    /// A phase of the given terms (zero terms dropped).
    pub fn new(name: &str, terms: Vec<(String, u64)>) -> Self {
        let terms: Vec<Term> = terms
            .into_iter()
            .filter(|(_, b)| *b > 0)
            .map(|(what, bytes)| Term { what, bytes })
            .collect();
        let bytes = terms.iter().map(|t| t.bytes).sum();
        Phase {
            name: name.to_string(),
            terms,
            bytes,
        }
    }
}

/// The plan: every phase, and the largest.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryEstimate {
    /// Estimated peak resident bytes (the largest phase).
    pub peak_bytes: u64,
    /// The phase that sets the peak.
    pub peak_phase: String,
    /// Every phase.
    pub phases: Vec<Phase>,
}

impl MemoryEstimate {
    /// The estimate whose peak is the largest of `phases` (at least one).
    pub fn from_phases(phases: Vec<Phase>) -> Self {
        let peak = phases
            .iter()
            .max_by_key(|p| p.bytes)
            .cloned()
            .expect("at least one phase");
        MemoryEstimate {
            peak_bytes: peak.bytes,
            peak_phase: peak.name,
            phases,
        }
    }

    /// The phase that sets the peak.
    pub fn peak(&self) -> &Phase {
        self.phases
            .iter()
            .find(|p| p.name == self.peak_phase)
            .expect("peak phase is listed")
    }

    /// `Err(message)` when the peak exceeds `budget` bytes: the message names the phase,
    /// its terms largest first, and by how much the estimate is over.
    pub fn check(&self, budget: u64) -> Result<(), String> {
        if self.peak_bytes <= budget {
            return Ok(());
        }
        let p = self.peak();
        let mut terms: Vec<&Term> = p.terms.iter().collect();
        terms.sort_by_key(|t| std::cmp::Reverse(t.bytes));
        let list: Vec<String> = terms
            .iter()
            .map(|t| format!("{} {}", human(t.bytes), t.what))
            .collect();
        Err(format!(
            "does not fit: the estimated peak is {} (phase `{}`: {}), {} over the budget of {}",
            human(self.peak_bytes),
            p.name,
            list.join(" + "),
            human(self.peak_bytes - budget),
            human(budget)
        ))
    }
}

/// `1.23 GiB`, `45.6 MiB`, `789 KiB`.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.0} KiB", b / 1024.0)
    }
}

/// Parses a memory size: an integer or decimal number with an optional binary suffix
/// `K`, `M`, `G` or `T` (also `KiB`, `MB`, `g`, ...: every suffix means 1024^k bytes, as
/// for `docker --memory` and `sort -S`), e.g. `2G`, `1500M`, `1.5GiB`, `4096`. The
/// result must be at least one byte.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (examples: 2G, 1500M, 1.5GiB, 4096)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => return Err(format!("`{s}`: unknown unit `{other}` (use K, M, G or T)")),
    };
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 / 2.0 {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1500M"), Ok(1500 << 20));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        for bad in ["", "G", "two", "2X", "-1G", "0", "1e3G", "2 G B"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_estimate_over_budget_names_phase_terms_and_excess() {
        let e = MemoryEstimate::from_phases(vec![
            Phase::new("a", vec![("x".into(), 10 << 20)]),
            Phase::new(
                "b",
                vec![("big thing".into(), 3 << 30), ("small".into(), 1 << 20)],
            ),
        ]);
        assert_eq!(e.peak_phase, "b");
        assert!(e.check(4 << 30).is_ok());
        let msg = e.check(2 << 30).unwrap_err();
        assert!(msg.contains("phase `b`"), "{msg}");
        assert!(msg.contains("3.00 GiB big thing"), "{msg}");
        assert!(
            msg.contains("1.00 GiB over the budget of 2.00 GiB"),
            "{msg}"
        );
    }
}
