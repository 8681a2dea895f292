//! The KV cache: per layer, K and V as `(kv_heads, capacity, head_dim)` f32 each, so one
//! KV head's keys are a contiguous `(positions, head_dim)` matrix (a GEMM operand).
//!
//! Two stores with the same layout:
//! - in memory (resident mode);
//! - on disk (layer streaming): an unlinked temporary file mapped shared. After a layer
//!   is done, [`KvCache::release`] drops that layer's pages from the process's resident
//!   set (`MADV_DONTNEED` on a shared file mapping keeps the data in the file / page
//!   cache), so like the weights only the current layer's cache is resident.

use crate::{Result, RuntimeError};
use std::path::PathBuf;

/// Floats per page: layer regions start on page boundaries so they can be released.
const PAGE_FLOATS: usize = 4096 / 4;

enum Store {
    Heap(Vec<f32>),
    File(memmap2::MmapMut),
}

/// K and V for every layer.
pub struct KvCache {
    store: Store,
    /// Floats of one of K or V in one layer: kv_heads * capacity * head_dim.
    half: usize,
    /// Floats from one layer's region to the next (2 * half, rounded up to a page).
    stride: usize,
    layers: usize,
}

impl KvCache {
    fn sizes(
        layers: usize,
        kv_heads: usize,
        capacity: usize,
        head_dim: usize,
    ) -> Result<(usize, usize, usize)> {
        let overflow = || RuntimeError::InvalidArgument("KV cache size overflows".into());
        let half = kv_heads
            .checked_mul(capacity)
            .and_then(|x| x.checked_mul(head_dim))
            .ok_or_else(overflow)?;
        let stride = half
            .checked_mul(2)
            .map(|x| x.div_ceil(PAGE_FLOATS) * PAGE_FLOATS)
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
    ) -> Result<Self> {
        let (half, stride, total) = Self::sizes(layers, kv_heads, capacity, head_dim)?;
        Ok(KvCache {
            store: Store::Heap(vec![0f32; total]),
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
    ) -> Result<Self> {
        let (half, stride, total) = Self::sizes(layers, kv_heads, capacity, head_dim)?;
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
        file.set_len((total * 4) as u64).map_err(io)?;
        // SAFETY: the file was just created by this process and unlinked, so no other
        // process can truncate or write it while it is mapped.
        let map = unsafe { memmap2::MmapMut::map_mut(&file) }.map_err(io)?;
        Ok(KvCache {
            store: Store::File(map),
            half,
            stride,
            layers,
        })
    }

    /// Whether the cache lives in a file.
    pub fn is_on_disk(&self) -> bool {
        matches!(self.store, Store::File(_))
    }

    fn floats(&mut self) -> &mut [f32] {
        match &mut self.store {
            Store::Heap(v) => v,
            // A page-aligned mapping whose length is a multiple of 4: the cast cannot fail.
            Store::File(m) => bytemuck::cast_slice_mut(&mut m[..]),
        }
    }

    /// Layer `l`'s K and V, `(kv_heads, capacity, head_dim)` each.
    pub fn layer_mut(&mut self, l: usize) -> (&mut [f32], &mut [f32]) {
        assert!(
            l < self.layers,
            "KvCache::layer_mut: layer {l} of {}",
            self.layers
        );
        let (half, start) = (self.half, l * self.stride);
        self.floats()[start..start + 2 * half].split_at_mut(half)
    }

    /// Drops layer `l`'s pages from the resident set (on-disk store only; the data stays
    /// in the file and is read back on the next access).
    pub fn release(&mut self, l: usize) {
        let (start, len) = (l * self.stride * 4, self.stride * 4);
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
