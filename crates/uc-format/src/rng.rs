//! The one seeded PRNG of the workspace: SplitMix64 (Steele, Lea, Flood 2014).
//!
//! Tiny and fully specified, so a seed gives the same stream on every platform and with
//! every version of every dependency. It draws the calibration windows (their starts are
//! recorded in the manifest, so the stream is part of the pack's bytes: never change
//! [`SplitMix64::next_u64`]), seeds the sampler's xoshiro256**, and makes test data.

/// SplitMix64 state; `SplitMix64(seed)` starts the stream of `seed`.
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`; 0 for `n == 0`), by rejection so there is no modulo
    /// bias.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    /// Uniform in `[0, 1)` with 24 random bits (exact in f32).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in `[-1, 1)`.
    pub fn sym(&mut self) -> f32 {
        self.unit() * 2.0 - 1.0
    }

    /// Standard normal by Box-Muller over two [`SplitMix64::unit`] draws.
    pub fn normal(&mut self) -> f32 {
        let u = f64::from(self.unit()).max(1e-12);
        let v = f64::from(self.unit());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::SplitMix64;

    #[test]
    fn stream_of_seed_42_is_fixed_forever() {
        // Calibration window starts are drawn from this stream; packs depend on it.
        let mut r = SplitMix64(42);
        assert_eq!(r.next_u64(), 0xBDD7_3226_2FEB_6E95);
    }

    #[test]
    fn below_stays_in_range_and_handles_zero() {
        let mut r = SplitMix64(7);
        assert!((0..1000).all(|_| r.below(13) < 13));
        assert_eq!(r.below(0), 0);
    }
}
