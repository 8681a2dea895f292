//! Rotary position tables: `1 / theta^(2i / d)` in f32 (Llama-3 or linear scaling when
//! configured), and per-position cos / sin as transformers computes them (the angle is
//! the f32 product `position * frequency`). `d` is the rotated width of a head
//! (`rotary_dim`: all of it unless partial, as Phi-3 may be). [`Tables`] holds one set
//! per kind of layer (gemma3's sliding layers have their own theta). The rotation itself
//! is [`crate::kernels::math::rope`].

use uc_model::config::{ModelConfig, Rope};

/// `1 / theta^(2i / d)` for `i < head_dim / 2`, in f32, with Llama-3 or linear scaling
/// when configured.
pub fn inverse_frequencies(rope: &Rope, head_dim: usize) -> Vec<f32> {
    let base = rope.theta as f32;
    let inv: Vec<f32> = (0..head_dim / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    if let Some(f) = rope.linear {
        // transformers: inv_freq /= factor (an f32 tensor by a scalar).
        let f = f as f32;
        return inv.into_iter().map(|x| x / f).collect();
    }
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

/// The rotary tables of a model: `(positions, rotary_dim / 2)` cos and sin for the global
/// settings and, when the sliding layers have their own (gemma3), for those.
pub struct Tables {
    cos: Vec<f32>,
    sin: Vec<f32>,
    local: Option<(Vec<f32>, Vec<f32>)>,
}

impl Tables {
    /// Tables of `cfg` for positions `0..positions`.
    pub fn new(cfg: &ModelConfig, positions: usize) -> Self {
        let (cos, sin) = tables(&cfg.rope, cfg.rotary_dim, positions);
        let local = cfg
            .local_rope
            .as_ref()
            .map(|r| tables(r, cfg.rotary_dim, positions));
        Tables { cos, sin, local }
    }

    /// `(cos, sin)` of block `layer`.
    pub fn of_layer(&self, cfg: &ModelConfig, layer: usize) -> (&[f32], &[f32]) {
        match &self.local {
            Some((c, s)) if cfg.sliding_layers.get(layer).copied().unwrap_or(false) => (c, s),
            _ => (&self.cos, &self.sin),
        }
    }
}
