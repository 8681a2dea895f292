//! Choosing the next token: greedy, temperature, nucleus (top-p), with a seeded PRNG so
//! the same seed gives the same tokens.

use crate::{Result, RuntimeError};

/// xoshiro256** seeded through SplitMix64: small, fast, reproducible on every platform.
#[derive(Clone, Debug)]
pub struct Rng([u64; 4]);

impl Rng {
    /// A generator whose whole stream is determined by `seed`.
    pub fn new(seed: u64) -> Self {
        let mut s = uc_format::SplitMix64(seed);
        Rng([s.next_u64(), s.next_u64(), s.next_u64(), s.next_u64()])
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let out = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Sampling settings.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct SamplingParams {
    /// 0 = greedy (argmax); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`
    /// (1 = all).
    pub top_p: f32,
    /// PRNG seed.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks ranges: temperature finite and >= 0, top_p in (0, 1].
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(RuntimeError::InvalidArgument(format!(
                "temperature {} must be >= 0",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(RuntimeError::InvalidArgument(format!(
                "top-p {} must be in (0, 1]",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Picks tokens from logits.
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// Reused: (probability, token) candidates.
    cand: Vec<(f64, u32)>,
}

/// Index of the largest finite value (lowest index on ties; 0 if none is finite).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = (f32::NEG_INFINITY, 0usize);
    for (i, &v) in logits.iter().enumerate() {
        if v > best.0 {
            best = (v, i);
        }
    }
    best.1 as u32
}

impl Sampler {
    /// A sampler with validated `params`.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        Ok(Sampler {
            params,
            rng: Rng::new(params.seed),
            cand: Vec::new(),
        })
    }

    /// The next token given one position's logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = self.params;
        if p.temperature == 0.0 || logits.len() < 2 {
            return argmax(logits);
        }
        // Softmax of logits / T in f64 (deterministic; the order of the sum is fixed).
        let t = f64::from(p.temperature);
        let max = f64::from(logits[argmax(logits) as usize]);
        let probs: Vec<f64> = logits
            .iter()
            .map(|&l| {
                if l.is_finite() {
                    ((f64::from(l) - max) / t).exp()
                } else {
                    0.0
                }
            })
            .collect();
        let total: f64 = probs.iter().sum();
        // Nucleus: the top-p set is inside {p >= thr} as soon as that set's mass reaches
        // top_p, so only those candidates need sorting.
        let target = f64::from(p.top_p) * total;
        let mut thr = if p.top_p >= 1.0 {
            0.0
        } else {
            probs.iter().copied().fold(0.0, f64::max)
        };
        loop {
            let mass: f64 = probs.iter().filter(|&&x| x >= thr).sum();
            if mass >= target || thr == 0.0 {
                break;
            }
            thr = if thr < 1e-300 { 0.0 } else { thr / 16.0 };
        }
        self.cand.clear();
        self.cand.extend(
            probs
                .iter()
                .enumerate()
                .filter(|(_, &x)| x >= thr && x > 0.0)
                .map(|(i, &x)| (x, i as u32)),
        );
        // Descending probability, ascending id on ties: a total order, so the result
        // does not depend on the sort algorithm.
        self.cand
            .sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut keep = self.cand.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, c) in self.cand.iter().enumerate() {
                acc += c.0;
                if acc >= target {
                    keep = i + 1;
                    break;
                }
            }
        }
        let kept = &self.cand[..keep.max(1)];
        let mass: f64 = kept.iter().map(|c| c.0).sum();
        let mut u = self.rng.next_f64() * mass;
        for c in kept {
            if u < c.0 {
                return c.1;
            }
            u -= c.0;
        }
        kept.last().map_or(0, |c| c.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
            .collect()
    }

    #[test]
    fn greedy_picks_argmax_lowest_index_on_ties() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&[1.0, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn same_seed_gives_same_tokens_and_another_seed_differs() {
        let l = logits();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.0,
                top_p: 0.9,
                seed,
            })
            .unwrap();
            (0..50).map(|_| s.sample(&l)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities ~ 0.64, 0.24, 0.09, 0.03: top_p 0.5 keeps only token 0.
        let l = [3.0f32, 2.0, 1.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: 1,
        })
        .unwrap();
        assert!((0..200).all(|_| s.sample(&l) == 0));
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.8,
            seed: 1,
        })
        .unwrap();
        let seen: std::collections::BTreeSet<u32> = (0..500).map(|_| s.sample(&l)).collect();
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn rejects_out_of_range_parameters() {
        assert!(Sampler::new(SamplingParams {
            temperature: -1.0,
            ..Default::default()
        })
        .is_err());
        assert!(Sampler::new(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        })
        .is_err());
        assert!(Sampler::new(SamplingParams {
            temperature: f32::NAN,
            ..Default::default()
        })
        .is_err());
    }
}
