//! The KV cache: per layer, K and V as `(kv_heads, capacity, head_dim)` each, so one
//! KV head's keys are a contiguous `(positions, head_dim)` matrix (a GEMM operand).
//! Elements are f32, or f16 for generation ([`KvDtype`]).
//!
//! Two stores with the same layout:
//! - in memory (resident mode);
//! - on disk (layer streaming): an unlinked temporary file mapped shared. After a layer
//!   is done, [`KvCache::release`] drops that layer's pages from the process's resident
//!   set (`MADV_DONTNEED` on a shared file mapping keeps the data in the file / page
//!   cache), so like the weights only the current layer's cache is resident.

use crate::{Result, RuntimeError};
use half::f16;
use std::path::PathBuf;

/// Bytes per page: layer regions start on page boundaries so they can be released.
const PAGE: usize = 4096;

/// How the cache stores K and V.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvDtype {
    /// binary32: the exact arithmetic (eval, compress, tests).
    F32,
    /// binary16, rounded to nearest-even when written: generation on CPUs whose
    /// attention kernels read it directly (half the bytes per decode step).
    F16,
}

impl KvDtype {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        }
    }

    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

/// The KV element type of generation (`Decoder::set_fast_prefill`) for `cfg` on `isa`:
/// f16 where the attention kernels read it directly
/// ([`crate::kernels::attention::fast_kernels`]), else f32. Mamba has no KV cache.
pub fn generation_kv_dtype(
    cfg: &uc_model::config::ModelConfig,
    isa: crate::kernels::Isa,
) -> KvDtype {
    if cfg.ssm.is_none() && crate::kernels::attention::fast_kernels(isa, cfg.head_dim) {
        KvDtype::F16
    } else {
        KvDtype::F32
    }
}

/// One layer's K or V, `(kv_heads, capacity, head_dim)`, as the cache stores it.
pub(crate) enum KvMut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
}

impl<'a> KvMut<'a> {
    fn of(bytes: &'a mut [u8], dtype: KvDtype) -> Self {
        // Regions start on page boundaries and hold whole elements: the casts cannot fail.
        match dtype {
            KvDtype::F32 => KvMut::F32(bytemuck::cast_slice_mut(bytes)),
            KvDtype::F16 => KvMut::F16(bytemuck::cast_slice_mut(bytes)),
        }
    }

    /// Writes `src` at element `at`, rounding to the stored type.
    pub(crate) fn write(&mut self, at: usize, src: &[f32]) {
        use half::slice::HalfFloatSliceExt;
        match self {
            KvMut::F32(d) => d[at..at + src.len()].copy_from_slice(src),
            KvMut::F16(d) => d[at..at + src.len()].convert_from_f32_slice(src),
        }
    }
}

enum Store {
    /// f32 words, so the start is aligned for either element type.
    Heap(Vec<f32>),
    File(memmap2::MmapMut),
}

/// K and V for every layer.
pub struct KvCache {
    store: Store,
    dtype: KvDtype,
    /// Elements of one of K or V in one layer: kv_heads * capacity * head_dim.
    half: usize,
    /// Bytes from one layer's region to the next (K and V, rounded up to a page).
    stride: usize,
    layers: usize,
}

impl KvCache {
    /// `(half, stride, total bytes)`.
    fn sizes(
        layers: usize,
        kv_heads: usize,
        capacity: usize,
        head_dim: usize,
        dtype: KvDtype,
    ) -> Result<(usize, usize, usize)> {
        let overflow = || RuntimeError::InvalidArgument("KV cache size overflows".into());
        let half = kv_heads
            .checked_mul(capacity)
            .and_then(|x| x.checked_mul(head_dim))
            .ok_or_else(overflow)?;
        let stride = half
            .checked_mul(2 * dtype.bytes())
            .map(|x| x.div_ceil(PAGE) * PAGE)
            .ok_or_else(overflow)?;
        let total = stride.checked_mul(layers).ok_or_else(overflow)?;
        Ok((half, stride, total))
    }

    /// A cache in process memory (zeroed pages become resident only when written).
    pub fn in_memory(
        layers: usize,
        kv_heads: usize,
        capacity: usize,
        head_dim: usize,
        dtype: KvDtype,
    ) -> Result<Self> {
        let (half, stride, total) = Self::sizes(layers, kv_heads, capacity, head_dim, dtype)?;
        Ok(KvCache {
            store: Store::Heap(vec![0f32; total / 4]),
            dtype,
            half,
            stride,
            layers,
        })
    }

    /// A cache in an unlinked temporary file under the system temp directory.
    pub fn on_disk(
        layers: usize,
        kv_heads: usize,
        capacity: usize,
        head_dim: usize,
        dtype: KvDtype,
    ) -> Result<Self> {
        let (half, stride, total) = Self::sizes(layers, kv_heads, capacity, head_dim, dtype)?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path: PathBuf =
            std::env::temp_dir().join(format!("uc-kv-{}-{stamp}", std::process::id()));
        let io = |e: std::io::Error| RuntimeError::Io {
            path: path.clone(),
            source: e,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io)?;
        // Unlink at once: the mapping keeps the file alive, and nothing is left behind
        // whatever happens to the process.
        std::fs::remove_file(&path).map_err(io)?;
        file.set_len(total as u64).map_err(io)?;
        // SAFETY: the file was just created by this process and unlinked, so no other
        // process can truncate or write it while it is mapped.
        let map = unsafe { memmap2::MmapMut::map_mut(&file) }.map_err(io)?;
        Ok(KvCache {
            store: Store::File(map),
            dtype,
            half,
            stride,
            layers,
        })
    }

    /// The element type.
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// An empty cache of the same shape and store, holding `dtype`.
    pub fn empty_like(&self, dtype: KvDtype) -> Result<Self> {
        // (layers, 1, 1, half) has this cache's element count per layer.
        if self.is_on_disk() {
            Self::on_disk(self.layers, 1, 1, self.half, dtype)
        } else {
            Self::in_memory(self.layers, 1, 1, self.half, dtype)
        }
    }

    /// Whether the cache lives in a file.
    pub fn is_on_disk(&self) -> bool {
        matches!(self.store, Store::File(_))
    }

    fn bytes(&mut self) -> &mut [u8] {
        match &mut self.store {
            Store::Heap(v) => bytemuck::cast_slice_mut(v),
            Store::File(m) => &mut m[..],
        }
    }

    /// Layer `l`'s K and V, `(kv_heads, capacity, head_dim)` each.
    pub(crate) fn layer_mut(&mut self, l: usize) -> (KvMut<'_>, KvMut<'_>) {
        assert!(
            l < self.layers,
            "KvCache::layer_mut: layer {l} of {}",
            self.layers
        );
        let (dtype, start, half) = (self.dtype, l * self.stride, self.half * self.dtype.bytes());
        let (k, v) = self.bytes()[start..start + 2 * half].split_at_mut(half);
        (KvMut::of(k, dtype), KvMut::of(v, dtype))
    }

    /// Drops layer `l`'s pages from the resident set (on-disk store only; the data stays
    /// in the file and is read back on the next access).
    pub fn release(&mut self, l: usize) {
        let (start, len) = (l * self.stride, self.stride);
        if let Store::File(m) = &self.store {
            // SAFETY: MADV_DONTNEED on a *shared* file mapping only unmaps the pages; their
            // contents stay in the page cache / file and fault back in unchanged. No
            // reference into the region is alive (we hold `&mut self`). The range is
            // page-aligned (strides are whole pages) and inside the mapping.
            let _ =
                unsafe { m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len) };
        }
    }
}
