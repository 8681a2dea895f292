//! Linear layers behind one trait, [`Linear`]: dense f32 ([`DenseLinear`]) or the
//! codec's packed form ([`PackedLinear`]), and [`forward`], which runs several linears
//! that share an input (q/k/v, gate/up) in one parallel pass over output-row blocks.
//!
//! Shapes: a weight is `(rows, cols)` = `(out_features, in_features)`; inputs are
//! `(n, cols)` row-major (n tokens), outputs `(n, rows)`.
//!
//! Strategy by batch size:
//! - `n <= FUSED_MAX_TOKENS` (decode): mat-vec per token. Packed weights use the fused
//!   kernel ([`crate::kernels::quant::dot_rows`]) that reads codes, scales and codebook
//!   directly; the f32 weight is never materialised. On AVX2 and on AVX-512 with VBMI
//!   ([`int_decode`]) the integer kernel ([`crate::kernels::qint`]) runs instead, with
//!   each token's activations rounded once per call and layout; on AVX2, resident
//!   8-bit weights keep their int16 codebook values expanded ([`qint::Expanded`]).
//! - larger `n` (prefill), by [`Prefill`]: per block of `PREFILL_TILE` rows, packed
//!   weights are dequantized into a thread-local tile and multiplied with the `gemm`
//!   crate (exact; eval and compress); or, for generation on AVX-512 VNNI, the integer
//!   GEMM of [`crate::kernels::qgemm`] per block of `PREFILL_INT_TILE` rows.
//! - A low-rank overlay `W += A B` is applied as `(x B^T) A^T`: `x B^T` once per call
//!   ([`Linear::prologue`]), then a rank-r update per row block.

use crate::kernels::dense::{self, split_columns, ColBlock, Mat};
use crate::kernels::qgemm::{self, PackedX};
use crate::kernels::qint::{self, Expanded, I16Lut, PreparedX};
use crate::kernels::quant::{self, QuantRows, CODE_PAD};
use crate::kernels::Isa;
use crate::{Result, RuntimeError};
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::Arc;

/// Batches up to this many tokens use the fused mat-vec; larger ones dequantize tiles.
pub const FUSED_MAX_TOKENS: usize = 4;
/// Output rows per task when decoding (a few tasks per thread for balance).
pub const DECODE_ROWS: usize = 64;
/// Output rows per dequantized tile when prefilling.
pub const PREFILL_TILE: usize = 128;
/// Output rows per task of the integer prefill GEMM: 18 tasks for a 576-row weight, so
/// two threads share o_proj and down_proj evenly (128-row tiles left one thread a whole
/// tile behind).
pub const PREFILL_INT_TILE: usize = 32;

/// Activations prepared for a weight's integer kernel, when it has one.
#[derive(Clone, Copy)]
pub enum Prepared<'a> {
    /// None: the f32 kernels read `x`.
    None,
    /// Decode: each token rounded for the mat-vec ([`crate::kernels::qint`]).
    Tokens(&'a [PreparedX]),
    /// Prefill: every token packed for the integer GEMM ([`crate::kernels::qgemm`]).
    Packed(&'a PackedX),
    /// A prefill of a few tokens with the GEMM's bits: each token rounded as the GEMM
    /// rounds it, for [`qint::dot_rows_i16_spec`] ([`Prefill::IntegerAll`]).
    Spec(&'a [PreparedX]),
}

/// How a forward pass of more than [`FUSED_MAX_TOKENS`] tokens multiplies by packed
/// weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prefill {
    /// Per-tile f32 reconstruction and single-threaded GEMMs (the same bits on any
    /// number of threads; the exact arithmetic eval and compress use).
    Tiles,
    /// Whole-weight f32 reconstruction and one multi-threaded GEMM (`UC_PREFILL=whole`;
    /// its bits depend on the thread count).
    Whole,
    /// The integer GEMM ([`crate::kernels::qgemm`]) where the CPU has it and the weight
    /// allows it, else `Tiles`: activations rounded to 11 bits per group, each token's
    /// bits independent of the batch and of the thread count.
    Integer,
    /// [`Prefill::Integer`], and calls of up to [`qint::FUSED_MAX_SPEC`] tokens too get
    /// the GEMM's bits ([`qint::dot_rows_i16_spec`] on activations rounded as the GEMM
    /// rounds them) instead of the decode kernels': a prompt prefilled in pieces of any
    /// size has the bits of one prefill ([`crate::Decoder::prefill`]).
    IntegerAll,
}

impl Prefill {
    /// Whether prefills take the integer GEMM (where the CPU and the weight allow).
    pub fn is_integer(self) -> bool {
        matches!(self, Prefill::Integer | Prefill::IntegerAll)
    }
}

/// One linear layer's weight, however it is stored.
pub trait Linear: Send + Sync {
    /// Output features.
    fn rows(&self) -> usize;
    /// Input features.
    fn cols(&self) -> usize;
    /// Bytes this weight holds in memory.
    fn resident_bytes(&self) -> usize;
    /// `"dense_f32"` or the codec name.
    fn kind(&self) -> String;
    /// Row `i` of the weight as the format defines it (exact reconstruction, overlay
    /// included), into `out` (`cols` long). Used for embedding lookups.
    fn row_into(&self, isa: Isa, i: usize, out: &mut [f32]);
    /// The rotation of the input this weight is stored for: `(block, signs)` when the
    /// stored matrix is `W R^T` ([`uc_codec::rotation`]), so callers must hand it `R x`.
    /// Everything else here (`block`, `weight_f32`, `row_into`, the overlay) is in that
    /// stored basis.
    fn rotation(&self) -> Option<(usize, &[f32])> {
        None
    }
    /// Whether [`Self::prologue`] computes anything.
    fn has_prologue(&self) -> bool {
        false
    }
    /// Work shared by every row block of one call (the overlay's `x B^T`, `(n, r)`).
    fn prologue(&self, _isa: Isa, _x: &[f32], _n: usize) -> Vec<f32> {
        Vec::new()
    }
    /// The activation layout `(group, bits)` of the integer decode kernel
    /// ([`crate::kernels::qint`]) when this weight uses it with `isa`.
    fn int_layout(&self, _isa: Isa) -> Option<(usize, usize)> {
        None
    }
    /// `out (n, rows.len()) = x (n, cols) . W[rows]^T`, with `aux` from [`Self::prologue`],
    /// `px` the tokens' activations prepared for [`Self::int_layout`] (decode, or the
    /// integer prefill), and `scratch` a reusable per-thread buffer.
    fn block(
        &self,
        isa: Isa,
        x: &[f32],
        aux: &[f32],
        px: Prepared,
        out: &mut ColBlock,
        scratch: &mut Vec<f32>,
    );
    /// The whole weight as f32, overlay excluded: borrowed when stored dense, else
    /// reconstructed into `buf` (rows in parallel).
    fn weight_f32<'s>(&'s self, isa: Isa, buf: &'s mut Vec<f32>) -> &'s [f32];
    /// `out (n, rows) += aux (n, r) . A^T`: the overlay's second factor (nothing
    /// without an overlay).
    fn overlay_apply(&self, _aux: &[f32], _n: usize, _out: &mut [f32]) {}
}

/// A dense f32 weight, `(rows, cols)` row-major.
pub struct DenseLinear {
    rows: usize,
    cols: usize,
    w: Vec<f32>,
}

impl DenseLinear {
    /// Wraps `w` (`rows * cols` values).
    pub fn new(name: &str, w: Vec<f32>, rows: usize, cols: usize) -> Result<Self> {
        if rows == 0 || cols == 0 || w.len() != rows * cols {
            return Err(RuntimeError::bad(
                name,
                format!("{} values for a {rows} x {cols} weight", w.len()),
            ));
        }
        Ok(DenseLinear { rows, cols, w })
    }
}

impl Linear for DenseLinear {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn resident_bytes(&self) -> usize {
        self.w.len() * 4
    }
    fn kind(&self) -> String {
        "dense_f32".into()
    }
    fn row_into(&self, _isa: Isa, i: usize, out: &mut [f32]) {
        out.copy_from_slice(&self.w[i * self.cols..(i + 1) * self.cols]);
    }
    fn weight_f32<'s>(&'s self, _isa: Isa, _buf: &'s mut Vec<f32>) -> &'s [f32] {
        &self.w
    }
    fn block(
        &self,
        isa: Isa,
        x: &[f32],
        _aux: &[f32],
        _px: Prepared,
        out: &mut ColBlock,
        _scratch: &mut Vec<f32>,
    ) {
        let (c, r0, len) = (self.cols, out.first(), out.len());
        dense_rows(isa, &self.w[r0 * c..(r0 + len) * c], c, x, out);
    }
}

/// `out (n, len) = x (n, cols) . w^T` for `w` the f32 rows of `out`'s row block
/// (`(len, cols)`): [`DenseLinear`]'s arithmetic, for weights that materialize their rows
/// per call (the compressor's mixture-of-experts experts) and must give its bits.
pub fn dense_rows(isa: Isa, w: &[f32], cols: usize, x: &[f32], out: &mut ColBlock) {
    if out.n() <= FUSED_MAX_TOKENS {
        for t in 0..out.n() {
            dense::matvec(isa, w, cols, &x[t * cols..(t + 1) * cols], out.row_mut(t));
        }
    } else {
        out.gemm(cols, Mat::rows(x, cols), Mat::rows_t(w, cols), false);
    }
}

/// A low-rank overlay `W += A B` with factors widened to f32.
struct Overlay {
    rank: usize,
    /// `(rows, rank)`.
    a: Vec<f32>,
    /// `(rank, cols)`.
    b: Vec<f32>,
}

/// A quantized weight in the codec's stored form (see `docs/format.md`): codebook, f32
/// copies of the group scales, packed codes (plus [`CODE_PAD`] zero bytes), optional
/// overlay.
pub struct PackedLinear {
    rows: usize,
    cols: usize,
    bits: usize,
    group: usize,
    name: String,
    codebook: Box<[f32; 256]>,
    /// The codebook rounded for the integer decode kernel (`None`: shape unsupported).
    lut: Option<Box<I16Lut>>,
    /// 8-bit resident weights on the integer path: values looked up at load
    /// ([`qint::Expanded`]).
    expanded: Option<Expanded>,
    /// `(rows, n_groups)`.
    scales: Vec<f32>,
    /// `(rows, row_bytes)` + `CODE_PAD`.
    codes: Codes,
    overlay: Option<Overlay>,
    /// `(block, signs)` of a rotated codec (its input is `R x`).
    rot: Option<(usize, Vec<f32>)>,
    /// Where `codes` goes back to when this weight is dropped (streamed weights).
    recycler: Option<Arc<Recycler>>,
}

/// Where a packed weight's codes live.
enum Codes {
    /// An ordinary allocation (streamed weights, tests).
    Heap(Vec<u8>),
    /// A slot of the [`CodeArena`] shared by all resident weights.
    Arena(ArenaSlot),
}

impl Codes {
    fn bytes(&self) -> &[u8] {
        match self {
            Codes::Heap(v) => v,
            Codes::Arena(a) => a.bytes(),
        }
    }
}

/// One anonymous memory region holding the codes of every resident quantized weight,
/// filled slot by slot while the model loads and read-only afterwards. It is allocated
/// outside the heap so it can ask for transparent huge pages (`MADV_HUGEPAGE`): a decode
/// step reads all of it, and with 4 KiB pages the TLB misses cost ~7% of decode speed
/// here, whatever the allocator's own huge-page policy.
pub struct CodeArena {
    map: memmap2::MmapMut,
    /// Base pointer of `map`, taken once from `&mut` at construction; slots are written
    /// through it (see [`CodeArena::put`]).
    base: *mut u8,
    next: std::sync::Mutex<usize>,
}

// SAFETY: `base` points into `map`, which lives as long as the arena and is never
// remapped; writes through it happen only in `put`, under the mutex, to a range no one
// else has been handed yet.
unsafe impl Send for CodeArena {}
unsafe impl Sync for CodeArena {}

impl CodeArena {
    /// A zeroed region of `bytes` bytes (huge pages requested where the OS offers them).
    pub fn new(bytes: usize) -> std::io::Result<Arc<Self>> {
        let mut map = memmap2::MmapMut::map_anon(bytes.max(1))?;
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage); // a hint: ignore refusal
        let base = map.as_mut_ptr();
        Ok(Arc::new(CodeArena {
            map,
            base,
            next: std::sync::Mutex::new(0),
        }))
    }

    /// Copies `data` followed by `pad` zero bytes into a fresh slot (64-byte aligned);
    /// `None` when the arena is full.
    pub fn put(self: &Arc<Self>, data: &[u8], pad: usize) -> Option<ArenaSlot> {
        let len = data.len().checked_add(pad)?;
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let start = next.checked_add(63)? / 64 * 64;
        let end = start.checked_add(len)?;
        if end > self.map.len() {
            return None;
        }
        // SAFETY: [start, end) is inside the mapping and has not been handed out (the
        // bump pointer only grows, under the lock); nothing reads it before this returns.
        // The mapping is zero-filled, so the padding needs no write.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.add(start), data.len()) };
        *next = end;
        Some(ArenaSlot {
            arena: self.clone(),
            start,
            len,
        })
    }
}

/// A filled, immutable range of a [`CodeArena`].
pub struct ArenaSlot {
    arena: Arc<CodeArena>,
    start: usize,
    len: usize,
}

impl ArenaSlot {
    fn bytes(&self) -> &[u8] {
        &self.arena.map[self.start..self.start + self.len]
    }
}

/// Keeps the code buffers of dropped streamed weights for the next load, so streaming
/// block after block reuses the same few megabytes instead of allocating and freeing
/// them (which an allocator may return to the OS and fault in again every time). Holds
/// at most `cap` bytes: enough for the units in flight, never a copy of the model.
pub struct Recycler {
    bufs: std::sync::Mutex<Vec<Vec<u8>>>,
    cap: usize,
}

impl Recycler {
    /// A recycler keeping at most `cap` bytes of buffers.
    pub fn new(cap: usize) -> Self {
        Recycler {
            bufs: std::sync::Mutex::new(Vec::new()),
            cap,
        }
    }

    /// An empty buffer with capacity at least `cap` (the smallest kept one that fits).
    pub fn take(&self, cap: usize) -> Vec<u8> {
        let mut bufs = self.bufs.lock().unwrap_or_else(|p| p.into_inner());
        let best = (0..bufs.len())
            .filter(|&i| bufs[i].capacity() >= cap)
            .min_by_key(|&i| bufs[i].capacity());
        match best {
            Some(i) => {
                let mut v = bufs.swap_remove(i);
                v.clear();
                v
            }
            None => Vec::with_capacity(cap),
        }
    }

    /// Keeps `v` for a later [`Recycler::take`], dropping the smallest kept buffers
    /// while the total would exceed the cap.
    pub fn give(&self, v: Vec<u8>) {
        if v.capacity() == 0 || v.capacity() > self.cap {
            return;
        }
        let mut bufs = self.bufs.lock().unwrap_or_else(|p| p.into_inner());
        bufs.push(v);
        let mut total: usize = bufs.iter().map(|b| b.capacity()).sum();
        bufs.sort_by_key(|b| std::cmp::Reverse(b.capacity()));
        while total > self.cap {
            match bufs.pop() {
                Some(b) => total -= b.capacity(),
                None => break,
            }
        }
    }
}

impl Drop for PackedLinear {
    fn drop(&mut self) {
        if let (Some(r), Codes::Heap(v)) = (&self.recycler, &mut self.codes) {
            r.give(std::mem::take(v));
        }
    }
}

/// Where [`PackedLinear::from_quant_in`] puts the codes.
#[derive(Clone, Default)]
pub enum CodeHome {
    /// A heap allocation of its own.
    #[default]
    Heap,
    /// A heap allocation returned to this recycler when the weight is dropped.
    Recycled(Arc<Recycler>),
    /// A slot of this arena (heap if the arena is full).
    Arena(Arc<CodeArena>),
}

/// `codes` followed by the kernels' zero padding (no reallocation when the capacity
/// allows, as loaders arrange).
fn padded(mut codes: Vec<u8>) -> Vec<u8> {
    codes.extend_from_slice(&[0u8; CODE_PAD]);
    codes
}

impl PackedLinear {
    /// Takes a quantized tensor (validated here: lengths, codebook, scales, padding).
    pub fn from_quant(name: &str, qt: uc_codec::QuantTensor) -> Result<Self> {
        Self::from_quant_recycled(name, qt, None)
    }

    /// [`Self::from_quant`], returning the code buffer to `recycler` when dropped.
    pub fn from_quant_recycled(
        name: &str,
        qt: uc_codec::QuantTensor,
        recycler: Option<Arc<Recycler>>,
    ) -> Result<Self> {
        let home = recycler.map_or(CodeHome::Heap, CodeHome::Recycled);
        Self::from_quant_in(name, qt, home)
    }

    /// [`Self::from_quant`] with the codes placed in `home`.
    pub fn from_quant_in(name: &str, qt: uc_codec::QuantTensor, home: CodeHome) -> Result<Self> {
        let codec = |e| RuntimeError::Codec {
            tensor: name.into(),
            source: e,
        };
        qt.validate().map_err(codec)?;
        // Trellis codes are held as their plain expansion (one bit more per code), so
        // every kernel below applies unchanged (docs/format.md section 3c).
        let qt = if qt.spec.trellis {
            uc_codec::trellis::expand(&qt).map_err(codec)?
        } else {
            qt
        };
        let codebook = quant::periodic_codebook(&qt.codebook);
        let scales = qt
            .scales
            .iter()
            .map(|&s| uc_codec::scale_to_f32(s, qt.spec.scale_dtype))
            .collect();
        let resident = matches!(home, CodeHome::Arena(_) | CodeHome::Heap);
        let (codes, recycler) = match home {
            CodeHome::Arena(a) => match a.put(&qt.codes, CODE_PAD) {
                Some(slot) => (Codes::Arena(slot), None),
                None => (Codes::Heap(padded(qt.codes)), None),
            },
            CodeHome::Recycled(r) => (Codes::Heap(padded(qt.codes)), Some(r)),
            CodeHome::Heap => (Codes::Heap(padded(qt.codes)), None),
        };
        let overlay = qt.overlay.map(|o| Overlay {
            rank: o.rank,
            a: o.a.iter().map(|&v| uc_codec::bf16_to_f32(v)).collect(),
            b: o.b.iter().map(|&v| uc_codec::bf16_to_f32(v)).collect(),
        });
        let (bits, group) = (usize::from(qt.spec.bits), qt.spec.group as usize);
        let lut = qint::supports(bits, group).then(|| Box::new(I16Lut::new(&codebook, bits)));
        let p = PackedLinear {
            rows: qt.rows,
            cols: qt.cols,
            bits,
            group,
            name: qt.spec.name(),
            codebook,
            lut,
            expanded: None,
            scales,
            codes,
            overlay,
            rot: (qt.spec.rot > 0)
                .then(|| (qt.spec.rot as usize, uc_codec::rotation::signs(qt.cols))),
            recycler,
        };
        if QuantRows::new(
            p.bits,
            p.group,
            p.cols,
            &p.codebook,
            &p.scales,
            p.codes.bytes(),
        )
        .is_none_or(|q| q.rows() != p.rows)
        {
            return Err(RuntimeError::bad(
                name,
                "codec buffers inconsistent with the shape",
            ));
        }
        let mut p = p;
        // Streamed weights (recycled buffers) are loaded every token: not worth it there.
        // (AVX2 only: the AVX-512 VBMI kernel looks 8-bit codes up in four permutes.)
        let isa = Isa::detect();
        if resident
            && p.bits == 8
            && int_decode(isa)
            && qint::order(isa, 8, p.cols) == qint::Order::Natural
        {
            if let Some(lut) = &p.lut {
                p.expanded = Some(Expanded::new(&p.view(), lut));
            }
        }
        Ok(p)
    }

    fn view(&self) -> QuantRows<'_> {
        // The codebook is `quant::periodic_codebook`'s (and was checked in `from_quant`).
        QuantRows::with_periodic_codebook(
            self.bits,
            self.group,
            self.cols,
            &self.codebook,
            &self.scales,
            self.codes.bytes(),
        )
        .expect("checked in PackedLinear::from_quant")
    }
}

impl Linear for PackedLinear {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn resident_bytes(&self) -> usize {
        let ov = self
            .overlay
            .as_ref()
            .map_or(0, |o| (o.a.len() + o.b.len()) * 4);
        let ex = self.expanded.as_ref().map_or(0, Expanded::bytes);
        self.codes.bytes().len() + self.scales.len() * 4 + 256 * 4 + ov + ex
    }
    fn kind(&self) -> String {
        self.name.clone()
    }
    fn rotation(&self) -> Option<(usize, &[f32])> {
        self.rot.as_ref().map(|(b, s)| (*b, s.as_slice()))
    }
    fn row_into(&self, isa: Isa, i: usize, out: &mut [f32]) {
        quant::dequant_row(isa, &self.view(), i, out);
        if let Some(o) = &self.overlay {
            // The specification's order: acc = sum_k A[i,k] * B[k,j] in k order (no FMA),
            // then w = base + acc.
            for (j, w) in out.iter_mut().enumerate() {
                let mut acc = 0.0f32;
                for k in 0..o.rank {
                    acc += o.a[i * o.rank + k] * o.b[k * self.cols + j];
                }
                *w += acc;
            }
        }
    }
    fn has_prologue(&self) -> bool {
        self.overlay.is_some()
    }
    fn prologue(&self, _isa: Isa, x: &[f32], n: usize) -> Vec<f32> {
        let Some(o) = &self.overlay else {
            return Vec::new();
        };
        // xb (n, r) = x (n, cols) . B^T
        let mut xb = vec![0f32; n * o.rank];
        dense::gemm(
            n,
            o.rank,
            self.cols,
            Mat::rows(x, self.cols),
            Mat::rows_t(&o.b, self.cols),
            &mut xb,
            o.rank,
            false,
        );
        xb
    }
    fn weight_f32<'s>(&'s self, isa: Isa, buf: &'s mut Vec<f32>) -> &'s [f32] {
        let c = self.cols;
        buf.resize(self.rows * c, 0.0);
        let q = self.view();
        buf.par_chunks_mut(c * 16)
            .enumerate()
            .for_each(|(k, rows)| {
                for (r, row) in rows.chunks_exact_mut(c).enumerate() {
                    quant::dequant_row(isa, &q, k * 16 + r, row);
                }
            });
        buf
    }
    fn overlay_apply(&self, aux: &[f32], n: usize, out: &mut [f32]) {
        if let Some(o) = &self.overlay {
            let bounds = [0, self.rows];
            for mut b in split_columns(out, n, self.rows, &bounds) {
                b.gemm(
                    o.rank,
                    Mat::rows(aux, o.rank),
                    Mat::rows_t(&o.a, o.rank),
                    true,
                );
            }
        }
    }
    fn int_layout(&self, isa: Isa) -> Option<(usize, usize)> {
        (self.lut.is_some() && int_decode(isa)).then_some((self.group, self.bits))
    }
    fn block(
        &self,
        isa: Isa,
        x: &[f32],
        aux: &[f32],
        px: Prepared,
        out: &mut ColBlock,
        scratch: &mut Vec<f32>,
    ) {
        let (c, r0, len, n) = (self.cols, out.first(), out.len(), out.n());
        let q = self.view();
        let (packed, px, spec) = match px {
            Prepared::Packed(p) => (Some(p), None, None),
            Prepared::Tokens(p) => (None, Some(p), None),
            Prepared::Spec(p) => (None, None, Some(p)),
            Prepared::None => (None, None, None),
        };
        if let (Some(p), Some(lut)) = (packed, &self.lut) {
            qgemm::gemm_rows(isa, &q, lut, p, r0, &mut out.rows_mut());
        } else if let (Some(p), Some(lut)) = (spec, &self.lut) {
            let pxs: Vec<&PreparedX> = p[..n].iter().collect();
            let xs: Vec<&[f32]> = x.chunks_exact(c).take(n).collect();
            qint::dot_rows_i16_spec(isa, &q, lut, &pxs, &xs, r0, &mut out.rows_mut());
        } else if let (true, Some(lut), Some(px), None) =
            (n > 1 && n <= qint::MULTI, &self.lut, px, &self.expanded)
        {
            // Several tokens (a batched decode step, or a short input): each chunk of
            // codes looked up once for all of them; every token's bits as alone.
            let pxs: Vec<&PreparedX> = px[..n].iter().collect();
            let xs: Vec<&[f32]> = x.chunks_exact(c).take(n).collect();
            qint::dot_rows_i16_multi(isa, &q, lut, &pxs, &xs, r0, &mut out.rows_mut());
        } else if n <= FUSED_MAX_TOKENS || px.is_some() {
            for t in 0..n {
                let xt = &x[t * c..(t + 1) * c];
                match (&self.lut, px, &self.expanded) {
                    (Some(lut), Some(px), Some(e)) => {
                        qint::dot_rows_expanded(isa, &q, lut, e, &px[t], xt, r0, out.row_mut(t))
                    }
                    (Some(lut), Some(px), None) => {
                        qint::dot_rows_i16(isa, &q, lut, &px[t], xt, r0, out.row_mut(t))
                    }
                    _ => quant::dot_rows(isa, &q, xt, r0, out.row_mut(t)),
                }
            }
        } else {
            scratch.resize(len * c, 0.0);
            for (r, row) in scratch.chunks_exact_mut(c).enumerate() {
                quant::dequant_row(isa, &q, r0 + r, row);
            }
            out.gemm(c, Mat::rows(x, c), Mat::rows_t(scratch, c), false);
        }
        if let Some(o) = &self.overlay {
            let a = &o.a[r0 * o.rank..(r0 + len) * o.rank];
            // Decode (tokens prepared for the integer kernel, up to qint::MULTI of them):
            // each token's own dot products, as alone.
            if n <= FUSED_MAX_TOKENS || px.is_some() {
                for t in 0..n {
                    let xb = &aux[t * o.rank..(t + 1) * o.rank];
                    for (i, y) in out.row_mut(t).iter_mut().enumerate() {
                        *y += dense::dot(isa, &a[i * o.rank..(i + 1) * o.rank], xb);
                    }
                }
            } else {
                // out (n, len) += xb (n, r) . A[rows]^T
                out.gemm(o.rank, Mat::rows(aux, o.rank), Mat::rows_t(a, o.rank), true);
            }
        }
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static WEIGHT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// One linear of a [`forward`] call, with its optional bias `(rows,)`.
pub struct Op<'a> {
    /// The weight.
    pub w: &'a dyn Linear,
    /// Added to every output row.
    pub bias: Option<&'a [f32]>,
}

/// Runs every op on the same input `x (n, cols)` in one parallel pass over output-row
/// blocks (rayon), returning each op's output `(n, rows)`.
pub fn forward(isa: Isa, ops: &[Op], x: &[f32], n: usize) -> Vec<Vec<f32>> {
    let mut outs: Vec<Vec<f32>> = ops.iter().map(|op| vec![0f32; n * op.w.rows()]).collect();
    let mut refs: Vec<&mut [f32]> = outs.iter_mut().map(|v| v.as_mut_slice()).collect();
    forward_into(isa, ops, x, n, &mut refs);
    outs
}

/// [`forward`] with the prefill arithmetic `prefill` (decode loops on the team).
pub fn forward_prefill(
    prefill: Prefill,
    isa: Isa,
    ops: &[Op],
    x: &[f32],
    n: usize,
) -> Vec<Vec<f32>> {
    let mut outs: Vec<Vec<f32>> = ops.iter().map(|op| vec![0f32; n * op.w.rows()]).collect();
    let mut refs: Vec<&mut [f32]> = outs.iter_mut().map(|v| v.as_mut_slice()).collect();
    forward_into_opts(Par::Team, prefill, false, isa, ops, x, n, &mut refs);
    outs
}

/// [`forward`] with the decode loops on `par`.
pub fn forward_with(par: Par, isa: Isa, ops: &[Op], x: &[f32], n: usize) -> Vec<Vec<f32>> {
    let mut outs: Vec<Vec<f32>> = ops.iter().map(|op| vec![0f32; n * op.w.rows()]).collect();
    let mut refs: Vec<&mut [f32]> = outs.iter_mut().map(|v| v.as_mut_slice()).collect();
    forward_into_with(par, isa, ops, x, n, &mut refs);
    outs
}

/// [`forward`] into caller-owned outputs: `outs[i]` is op `i`'s `(n, rows)` output
/// (every element is overwritten).
pub fn forward_into(isa: Isa, ops: &[Op], x: &[f32], n: usize, outs: &mut [&mut [f32]]) {
    forward_into_with(Par::Team, isa, ops, x, n, outs)
}

/// Which threads run the small (decode) loops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Par {
    /// The spinning team ([`crate::team`]): lowest latency per loop.
    Team,
    /// The rayon pool: idle threads sleep, leaving the cores to others (the layer
    /// streamer's loader thread).
    Rayon,
}

/// Calls up to this many tokens have their parallel loops on `Par` (the decode team) even
/// when they prefill: their loops are short enough that a rayon wake-up per loop shows.
pub const SMALL_CALL_TOKENS: usize = 32;

/// Runs `f(task)` for every task in parallel on `par`'s threads.
pub fn par_tasks<T: Send>(par: Par, tasks: Vec<T>, f: &(dyn Fn(T) + Sync)) {
    let slots: Vec<std::sync::Mutex<Option<T>>> = tasks
        .into_iter()
        .map(|t| std::sync::Mutex::new(Some(t)))
        .collect();
    par_for_each(par, slots.len(), &|k| {
        let task = slots[k].lock().ok().and_then(|mut t| t.take());
        if let Some(t) = task {
            f(t);
        }
    });
}

/// Calls `f(i)` for `i in 0..n` in parallel on `par`'s threads.
pub fn par_for_each(par: Par, n: usize, f: &(dyn Fn(usize) + Sync)) {
    match par {
        Par::Team => crate::team::Team::global().for_each(n, f),
        Par::Rayon => (0..n).into_par_iter().for_each(f),
    }
}

/// [`forward_into`] with the decode loops on `par`.
pub fn forward_into_with(
    par: Par,
    isa: Isa,
    ops: &[Op],
    x: &[f32],
    n: usize,
    outs: &mut [&mut [f32]],
) {
    let prefill = match Prefill::from_env() {
        Some(Prefill::Whole) => Prefill::Whole,
        _ => Prefill::Tiles,
    };
    forward_into_opts(par, prefill, false, isa, ops, x, n, outs)
}

/// [`forward_into_with`], with `prefill` choosing how more than [`FUSED_MAX_TOKENS`]
/// tokens are multiplied ([`Prefill`]).
///
/// `per_token` keeps the decode kernels whatever `n` is (a batched decode step of `n`
/// independent sequences, [`crate::Decoder::forward_batch`]): every token then gets
/// exactly the bits it would get alone (`n = 1`), while each weight row block is still
/// read from memory once for all `n` tokens (the tokens are run one after another on
/// the block while it is in cache).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_into_opts(
    par: Par,
    prefill: Prefill,
    per_token: bool,
    isa: Isa,
    ops: &[Op],
    x: &[f32],
    n: usize,
    outs: &mut [&mut [f32]],
) {
    assert_eq!(ops.len(), outs.len(), "forward_into: one output per op");
    // Rotated weights read `R x`: one rotated copy per block size (ops sharing an input
    // have the same width, hence the same signs).
    let mut rotated: Vec<(usize, Vec<f32>)> = Vec::new();
    for op in ops {
        if let Some((b, signs)) = op.w.rotation() {
            if !rotated.iter().any(|(k, _)| *k == b) {
                let mut v = SPARE.with(|s| s.borrow_mut().0.pop()).unwrap_or_default();
                v.clear();
                v.extend_from_slice(&x[..n * op.w.cols()]);
                crate::kernels::math::rotate(isa, &mut v, op.w.cols(), b, signs);
                rotated.push((b, v));
            }
        }
    }
    let xs: Vec<&[f32]> = ops
        .iter()
        .map(|op| match op.w.rotation() {
            Some((b, _)) => rotated
                .iter()
                .find(|(k, _)| *k == b)
                .map_or(x, |(_, v)| v.as_slice()),
            None => x,
        })
        .collect();
    let decode = n <= FUSED_MAX_TOKENS || per_token;
    let aux: Vec<Vec<f32>> = if ops.iter().any(|op| op.w.has_prologue()) {
        ops.par_iter()
            .zip(&xs)
            .map(|(op, x)| {
                if per_token {
                    // One prologue per token: the overlay's `x B^T` of a lone token (a
                    // GEMM over several rows need not round the same).
                    let c = op.w.cols();
                    (0..n)
                        .flat_map(|t| op.w.prologue(isa, &x[t * c..(t + 1) * c], 1))
                        .collect()
                } else {
                    op.w.prologue(isa, x, n)
                }
            })
            .collect()
    } else {
        vec![Vec::new(); ops.len()]
    };
    if !decode && prefill == Prefill::Whole {
        // Prefill: each weight reconstructed once, then one multi-threaded GEMM.
        WEIGHT.with(|buf| {
            let mut buf = buf.borrow_mut();
            for (i, (op, y)) in ops.iter().zip(outs.iter_mut()).enumerate() {
                let (rows, cols) = (op.w.rows(), op.w.cols());
                let w = op.w.weight_f32(isa, &mut buf);
                dense::gemm_par(
                    n,
                    rows,
                    cols,
                    Mat::rows(xs[i], cols),
                    Mat::rows_t(w, cols),
                    y,
                    rows,
                );
                op.w.overlay_apply(&aux[i], n, y);
            }
        });
        add_bias(ops, outs);
        keep_spares(rotated, Vec::new());
        return;
    }
    // Integer prefill: each input rounded and packed once per weight group size (and
    // rotation), for every op whose weight the integer GEMM takes.
    let mut packed: Vec<((usize, usize), PackedX)> = Vec::new();
    let mut which_packed: Vec<Option<usize>> = vec![None; ops.len()];
    if !decode && prefill.is_integer() && qgemm::available(isa) {
        for (i, op) in ops.iter().enumerate() {
            let c = op.w.cols();
            let Some((group, _)) =
                op.w.int_layout(isa)
                    .filter(|&(g, b)| qgemm::supports(b, g, c))
            else {
                continue;
            };
            let key = (group, op.w.rotation().map_or(0, |r| r.0));
            let k = match packed.iter().position(|(k, _)| *k == key) {
                Some(k) => k,
                None => {
                    let spare = SPARE.with(|s| s.borrow_mut().1.pop());
                    packed.push((key, qgemm::pack_x_reusing(isa, xs[i], n, c, group, spare)));
                    packed.len() - 1
                }
            };
            which_packed[i] = Some(k);
        }
    }
    let step = if decode {
        DECODE_ROWS
    } else if !packed.is_empty() {
        PREFILL_INT_TILE
    } else {
        PREFILL_TILE
    };
    let mut tasks: Vec<(usize, ColBlock)> = Vec::new();
    for (i, (op, y)) in ops.iter().zip(outs.iter_mut()).enumerate() {
        let rows = op.w.rows();
        let bounds: Vec<usize> = (0..rows)
            .step_by(step)
            .chain(std::iter::once(rows))
            .collect();
        tasks.extend(
            split_columns(y, n, rows, &bounds)
                .into_iter()
                .map(|b| (i, b)),
        );
    }
    // Decode with the integer kernel: each token's activations rounded once per layout
    // (ops sharing an input mostly share one), not once per row block.
    let mut layouts: Vec<((usize, qint::Order, usize), Vec<PreparedX>)> = Vec::new();
    let mut which: Vec<Option<usize>> = vec![None; ops.len()];
    // A prefill piece of a few tokens with the GEMM's bits: rounded as the GEMM does.
    let mut specs: Vec<((usize, usize), Vec<PreparedX>)> = Vec::new();
    let mut which_spec: Vec<Option<usize>> = vec![None; ops.len()];
    if decode && !per_token && prefill == Prefill::IntegerAll && qgemm::available(isa) {
        for (i, op) in ops.iter().enumerate() {
            let c = op.w.cols();
            let Some((group, _)) = op.w.int_layout(isa).filter(|&(g, b)| {
                qgemm::supports(b, g, c) && n <= qint::FUSED_MAX_SPEC && !op.w.has_prologue()
            }) else {
                continue;
            };
            let key = (group, op.w.rotation().map_or(0, |r| r.0));
            let k = match specs.iter().position(|(k, _)| *k == key) {
                Some(k) => k,
                None => {
                    let x = xs[i];
                    let px = (0..n)
                        .map(|t| {
                            let xt = &x[t * c..(t + 1) * c];
                            qint::prepare_x_levels(
                                xt,
                                group,
                                qint::Order::Planes64,
                                qgemm::X_LEVELS,
                            )
                        })
                        .collect();
                    specs.push((key, px));
                    specs.len() - 1
                }
            };
            which_spec[i] = Some(k);
        }
    }
    if decode {
        for (i, op) in ops.iter().enumerate() {
            let Some((group, bits)) = op.w.int_layout(isa).filter(|_| which_spec[i].is_none())
            else {
                continue;
            };
            // Rotated inputs are other activations.
            let c = op.w.cols();
            let order = qint::order(isa, bits, c);
            let key = (group, order, op.w.rotation().map_or(0, |r| r.0));
            let k = match layouts.iter().position(|(k, _)| *k == key) {
                Some(k) => k,
                None => {
                    let x = xs[i];
                    let px = (0..n)
                        .map(|t| qint::prepare_x(&x[t * c..(t + 1) * c], group, order))
                        .collect();
                    layouts.push((key, px));
                    layouts.len() - 1
                }
            };
            which[i] = Some(k);
        }
    }
    let run = |(i, block): (usize, ColBlock)| {
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let px = match (which[i], which_packed[i], which_spec[i]) {
                (Some(k), _, _) => Prepared::Tokens(&layouts[k].1),
                (None, Some(k), _) => Prepared::Packed(&packed[k].1),
                (None, None, Some(k)) => Prepared::Spec(&specs[k].1),
                (None, None, None) => Prepared::None,
            };
            if n <= FUSED_MAX_TOKENS || !decode {
                let mut block = block;
                ops[i].w.block(isa, xs[i], &aux[i], px, &mut block, &mut s);
                return;
            }
            // Per-token decode of more than FUSED_MAX_TOKENS tokens: the same row block
            // for a few tokens at a time (each token through the decode kernel, as alone;
            // the integer kernel takes up to qint::MULTI at once).
            let (c, r) = (ops[i].w.cols(), aux[i].len() / n);
            let part_tokens = if which[i].is_some() {
                qint::MULTI
            } else {
                FUSED_MAX_TOKENS
            };
            for (t0, mut part) in block.split_rows(part_tokens) {
                let m = part.n();
                let x = &xs[i][t0 * c..(t0 + m) * c];
                let a = &aux[i][t0 * r..(t0 + m) * r];
                let px = match px {
                    Prepared::Tokens(p) => Prepared::Tokens(&p[t0..t0 + m]),
                    other => other,
                };
                ops[i].w.block(isa, x, a, px, &mut part, &mut s);
            }
        })
    };
    if decode || n <= SMALL_CALL_TOKENS {
        // Decode and short prefills: microsecond-sized tasks (on the spinning team
        // unless told otherwise).
        par_tasks(par, tasks, &run);
    } else {
        tasks.into_par_iter().for_each(run);
    }
    add_bias(ops, outs);
    keep_spares(rotated, packed);
}

thread_local! {
    /// Rotated inputs and packed activations of earlier calls on this thread, reused by
    /// the next: at prefill sizes (megabytes) a fresh allocation comes back from the
    /// kernel zeroed page by page (`clear_page` was prominent in a prefill profile).
    static SPARE: RefCell<(Vec<Vec<f32>>, Vec<PackedX>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Keeps the two largest of each kind of buffer for the next call, the largest last (it
/// is popped first: a smaller one popped for down_proj's wider input was reallocated,
/// and the new pages faulted in, on every layer).
fn keep_spares(rotated: Vec<(usize, Vec<f32>)>, packed: Vec<((usize, usize), PackedX)>) {
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        s.0.extend(rotated.into_iter().map(|(_, v)| v));
        s.0.sort_by_key(Vec::capacity);
        let drop_rotated = s.0.len().saturating_sub(2);
        s.0.drain(..drop_rotated);
        s.1.extend(packed.into_iter().map(|(_, p)| p));
        s.1.sort_by_key(PackedX::capacity);
        let drop_packed = s.1.len().saturating_sub(2);
        s.1.drain(..drop_packed);
    });
}

fn add_bias(ops: &[Op], outs: &mut [&mut [f32]]) {
    for (op, y) in ops.iter().zip(outs.iter_mut()) {
        if let Some(b) = op.bias {
            y.chunks_exact_mut(b.len())
                .for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v += b));
        }
    }
}

/// Whether decode uses the integer kernel ([`crate::kernels::qint`]) with `isa`: on AVX2,
/// and on AVX-512 with VBMI (byte permutes); AVX-512 without VBMI keeps the f32 kernels.
/// `UC_MATVEC=f32` asks for the f32 kernels (comparisons, the exactness baseline).
pub fn int_decode(isa: Isa) -> bool {
    static F32: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let int = match isa {
        Isa::Avx2 => true,
        Isa::Avx512 => qint::vbmi_available(),
        Isa::Scalar => false,
    };
    int && !*F32.get_or_init(|| std::env::var("UC_MATVEC").is_ok_and(|v| v == "f32"))
}

impl Prefill {
    /// `UC_PREFILL` (`tiles`, `whole` or `int`), if set: a comparison switch. Callers
    /// that need exact arithmetic (eval, compress) never take `int` from it.
    pub fn from_env() -> Option<Prefill> {
        static MODE: std::sync::OnceLock<Option<Prefill>> = std::sync::OnceLock::new();
        *MODE.get_or_init(|| match std::env::var("UC_PREFILL").ok()?.as_str() {
            "tiles" => Some(Prefill::Tiles),
            "whole" => Some(Prefill::Whole),
            "int" => Some(Prefill::Integer),
            _ => None,
        })
    }
}
