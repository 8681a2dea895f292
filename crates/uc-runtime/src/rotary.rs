//! Rotary position tables: `1 / theta^(2i / d)` in f32 (Llama-3 scaling when
//! configured), and per-position cos / sin as transformers computes them (the angle is
//! the f32 product `position * frequency`). The rotation itself is
//! [`crate::kernels::math::rope`].

use uc_model::config::Rope;

/// `1 / theta^(2i / d)` for `i < head_dim / 2`, in f32, with Llama-3 scaling when
/// configured.
pub fn inverse_frequencies(rope: &Rope, head_dim: usize) -> Vec<f32> {
    let base = rope.theta as f32;
    let inv: Vec<f32> = (0..head_dim / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let Some(s) = &rope.llama3 else { return inv };
    let (factor, lo, hi, old) = (
        s.factor as f32,
        s.low_freq_factor as f32,
        s.high_freq_factor as f32,
        s.original_max_position_embeddings as f32,
    );
    let low_wavelen = old / lo;
    let high_wavelen = old / hi;
    inv.into_iter()
        .map(|f| {
            let wavelen = 2.0 * std::f32::consts::PI / f;
            if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / factor
            } else {
                let smooth = (old / wavelen - lo) / (hi - lo);
                (1.0 - smooth) * f / factor + smooth * f
            }
        })
        .collect()
}

/// `(cos, sin)` for positions `0..positions`, `(positions, head_dim / 2)` row-major
/// each.
pub fn tables(rope: &Rope, head_dim: usize, positions: usize) -> (Vec<f32>, Vec<f32>) {
    let inv = inverse_frequencies(rope, head_dim);
    let half = inv.len();
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for p in 0..positions {
        for &f in &inv {
            // f32 product as transformers computes it (t.float() @ inv_freq).
            let angle = p as f32 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    (cos, sin)
}
