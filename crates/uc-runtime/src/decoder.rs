//! The incremental decoder: dense decoder blocks (every family of
//! `uc_model::config::Family`) over a KV cache. A prompt is prefilled in one pass; then
//! one token at a time.
//!
//! The block math is [`crate::block`] (numerics, buffer shapes); this module adds the
//! embedding (scaled by `embed_scale` for Gemma), the KV cache (`(kv_heads, capacity,
//! head_dim)` per layer for K and for V), resident or streamed blocks, the final norm and
//! the head (tied to the embedding when configured; logits soft-capped for Gemma-2).
//!
//! Mamba keeps a recurrent state per layer instead of K/V ([`crate::ssm::State`]: the
//! last `conv_kernel - 1` conv inputs and the `(d_inner, state)` SSM state), in memory
//! also when streaming (it does not grow with the context); its KV cache has no heads and
//! holds nothing. A forward at position 0 starts from zero state, so [`Decoder::reset`]
//! starts a new sequence for both kinds.
//!
//! [`Decoder::forward_batch`] advances several decoders that share one model's weights
//! (a decoder and its [`Decoder::fork`]s) by one token each in a single pass over the
//! weights: each sequence at its own position, against its own KV cache, with exactly
//! the logits it would get from its own one-token [`Decoder::forward`] (the block runs
//! its per-token decode kernels for every sequence; see [`crate::block`]). `uc serve`
//! steps all its generating requests this way.

use crate::block::{Ctx, Positions, SeqKv, Work};
use crate::kernels::math;
use crate::kernels::Isa;
use crate::kv::{KvCache, KvDtype};
use crate::linear::{self, Op};
use crate::stream::{HeadPlan, Loaded, Streamer};
use crate::weights::{BlockWeights, GlobalWeights, WeightLoader};
use crate::{Result, RuntimeError};
use std::sync::Arc;
use uc_model::config::ModelConfig;
use uc_model::names::{embed, LM_HEAD};

/// Which logits a forward call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// The last position's `(vocab,)` (generation).
    Last,
    /// Every position's, `(n, vocab)` row-major (tests, scoring).
    All,
}

/// How to build a [`Decoder`].
#[derive(Clone, Copy, Debug)]
pub struct DecoderOptions {
    /// Positions the KV cache holds (prompt + generated tokens).
    pub capacity: usize,
    /// Keep blocks on disk and stream them with background prefetch.
    pub stream_layers: bool,
}

/// Tokens per forward pass when streaming (bounds activations, see `forward`).
const STREAM_PREFILL_CHUNK: usize = 512;
/// Vocabulary rows per streamed head chunk (~1 MiB of 6- to 8-bit codes at hidden 576).
const HEAD_CHUNK_ROWS: usize = 2048;

/// Embedding, final norm and head: in memory, or (streaming a pack) only the norm, with
/// embedding rows read on demand and the head streamed in chunks.
/// Resident weights are shared (`Arc`) between a decoder and its [`Decoder::fork`]s.
enum Globals {
    Resident(Arc<GlobalWeights>),
    Streamed { norm: Vec<f32> },
}

enum Blocks {
    Resident(Arc<Vec<BlockWeights>>),
    Streamed(Streamer),
}

/// A model ready to generate: weights (resident or streamed), rotary tables, KV cache.
pub struct Decoder {
    cfg: ModelConfig,
    isa: Isa,
    /// Prefill arithmetic: exact f32 tiles unless [`Decoder::set_fast_prefill`].
    fast_prefill: bool,
    loader: Arc<dyn WeightLoader>,
    globals: Globals,
    blocks: Blocks,
    /// Rotary tables, `(capacity, rotary_dim / 2)` each.
    rope: crate::rotary::Tables,
    /// K and V of every layer (on disk when streaming).
    cache: KvCache,
    /// Mamba: every layer's recurrent state (one sequence); empty for attention models.
    ssm: Vec<crate::ssm::State>,
    /// Activation buffers of the last forward call, reused when the next has as many
    /// tokens (every decode step).
    work: Option<Work>,
    pos: usize,
    capacity: usize,
    /// The ids at positions `0 .. pos` (what the KV cache holds).
    history: Vec<u32>,
    /// Leading positions written by prefill calls with the row-invariant arithmetic
    /// (see [`Decoder::keep_prefix`]).
    prefilled: usize,
}

pub use crate::rotary::inverse_frequencies;

impl Decoder {
    /// Loads the globals (and, unless streaming, every block) from `loader`. When
    /// streaming, first runs the loader's checks over every block (bounded memory), and
    /// streams embedding and head too if the loader can read them by rows (packs).
    pub fn new(loader: Arc<dyn WeightLoader>, opts: DecoderOptions) -> Result<Self> {
        let cfg = loader.config().clone();
        if !cfg.head_dim.is_multiple_of(2) || !cfg.num_heads.is_multiple_of(cfg.num_kv_heads) {
            return Err(RuntimeError::InvalidArgument("head layout".into()));
        }
        let embed_by_rows =
            opts.stream_layers && loader.select_rows(embed(cfg.family), &[0])?.is_some();
        let (globals, blocks) = if opts.stream_layers {
            loader.check_all(embed_by_rows)?;
            let head = embed_by_rows.then_some(HeadPlan {
                name: if cfg.tie_word_embeddings {
                    embed(cfg.family)
                } else {
                    LM_HEAD
                },
                rows: cfg.vocab_size,
                chunk: HEAD_CHUNK_ROWS,
            });
            let globals = if embed_by_rows {
                Globals::Streamed {
                    norm: loader.final_norm()?,
                }
            } else {
                Globals::Resident(Arc::new(loader.globals()?))
            };
            (
                globals,
                Blocks::Streamed(Streamer::new(loader.clone(), head)?),
            )
        } else {
            loader.prepare_resident()?;
            let globals = Globals::Resident(Arc::new(loader.globals()?));
            (
                globals,
                Blocks::Resident(Arc::new(
                    (0..cfg.num_layers)
                        .map(|l| loader.block(l))
                        .collect::<Result<_>>()?,
                )),
            )
        };
        Self::with_weights(loader, cfg, globals, blocks, opts)
    }

    /// A new decoder over the same model with its own empty KV cache (and recurrent
    /// state) of `capacity` positions: resident weights are shared, not loaded again, so
    /// `uc serve`'s slots hold one copy of the model between them. A streaming decoder
    /// is re-created (its streamer owns buffers per decoder).
    pub fn fork(&self, capacity: usize) -> Result<Self> {
        let opts = DecoderOptions {
            capacity,
            stream_layers: self.is_streaming(),
        };
        match (&self.globals, &self.blocks) {
            (Globals::Resident(g), Blocks::Resident(b)) => {
                let (globals, blocks) = (Globals::Resident(g.clone()), Blocks::Resident(b.clone()));
                let mut d = Self::with_weights(
                    self.loader.clone(),
                    self.cfg.clone(),
                    globals,
                    blocks,
                    opts,
                )?;
                d.isa = self.isa;
                d.set_fast_prefill(self.fast_prefill)?;
                Ok(d)
            }
            _ => {
                let mut d = Self::new(self.loader.clone(), opts)?;
                d.isa = self.isa;
                d.set_fast_prefill(self.fast_prefill)?;
                Ok(d)
            }
        }
    }

    /// The per-sequence state (rotary tables, KV cache, recurrent state) around loaded
    /// weights.
    fn with_weights(
        loader: Arc<dyn WeightLoader>,
        cfg: ModelConfig,
        globals: Globals,
        blocks: Blocks,
        opts: DecoderOptions,
    ) -> Result<Self> {
        if opts.capacity == 0 {
            return Err(RuntimeError::InvalidArgument(
                "decoder capacity must be at least one position".into(),
            ));
        }
        let rope = crate::rotary::Tables::new(&cfg, opts.capacity);
        let (l, g, c, d) = (
            cfg.num_layers,
            cfg.num_kv_heads,
            opts.capacity,
            cfg.head_dim,
        );
        // Mamba's KV cache has no heads (zero bytes): nothing to put on disk.
        let cache = if opts.stream_layers && cfg.ssm.is_none() {
            KvCache::on_disk(l, g, c, d, KvDtype::F32)?
        } else {
            KvCache::in_memory(l, g, c, d, KvDtype::F32)?
        };
        let ssm = match &cfg.ssm {
            Some(s) => (0..cfg.num_layers)
                .map(|_| crate::ssm::State::new(s, 1))
                .collect(),
            None => Vec::new(),
        };
        Ok(Decoder {
            ssm,
            cfg,
            isa: Isa::detect(),
            fast_prefill: false,
            loader,
            globals,
            blocks,
            rope,
            cache,
            work: None,
            pos: 0,
            capacity: opts.capacity,
            history: Vec::new(),
            prefilled: 0,
        })
    }

    /// The model configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The weight source.
    pub fn loader(&self) -> &Arc<dyn WeightLoader> {
        &self.loader
    }

    /// The instruction set the kernels run with.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Uses `isa` (falls back to scalar if unavailable); for tests and comparisons.
    pub fn set_isa(&mut self, isa: Isa) {
        self.isa = isa.or_scalar();
    }

    /// The arithmetic of generation (`uc run`, `uc bench`, `uc serve`), where the CPU
    /// has the kernels:
    /// - prefills of more than a few tokens with the integer GEMM
    ///   ([`crate::kernels::qgemm`]: activations rounded to 11 bits per weight group,
    ///   within its documented tolerance of the exact f32 arithmetic);
    /// - K and V stored as f16 ([`KvDtype::F16`], where the attention kernels read it:
    ///   [`crate::kernels::attention::fast_kernels`]), half the bytes per decode step.
    ///
    /// Off by default: scoring (`uc eval`) and tests keep the exact arithmetic.
    /// `UC_PREFILL=tiles|whole` overrides the prefill GEMM for comparisons. Set it
    /// before the first token: a cache that holds positions is not converted.
    pub fn set_fast_prefill(&mut self, fast: bool) -> Result<()> {
        let was = self.fast_prefill;
        self.fast_prefill = fast;
        let want = self.generation_kv_dtype();
        if want != self.cache.dtype() {
            if self.pos > 0 {
                self.fast_prefill = was;
                return Err(RuntimeError::InvalidArgument(format!(
                    "set_fast_prefill would change the KV cache to {want:?} with {} positions in it; \
                     set it before the first token",
                    self.pos
                )));
            }
            self.cache = self.cache.empty_like(want)?;
        }
        Ok(())
    }

    /// How the KV cache stores K and V.
    pub fn kv_dtype(&self) -> KvDtype {
        self.cache.dtype()
    }

    /// The KV element type for the current settings.
    fn generation_kv_dtype(&self) -> KvDtype {
        if self.fast_prefill {
            crate::kv::generation_kv_dtype(&self.cfg, self.isa)
        } else {
            KvDtype::F32
        }
    }

    /// The prefill arithmetic a forward call uses.
    fn prefill_mode(&self) -> linear::Prefill {
        match (linear::Prefill::from_env(), self.fast_prefill) {
            (Some(linear::Prefill::Whole), _) => linear::Prefill::Whole,
            (Some(linear::Prefill::Tiles), _) | (_, false) => linear::Prefill::Tiles,
            (_, true) => linear::Prefill::Integer,
        }
    }

    /// Positions already in the KV cache.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Positions the KV cache holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether blocks are streamed from disk.
    pub fn is_streaming(&self) -> bool {
        matches!(self.blocks, Blocks::Streamed(_))
    }

    /// Seconds spent waiting for streamed blocks (0 when resident).
    pub fn stream_wait_seconds(&self) -> f64 {
        match &self.blocks {
            Blocks::Streamed(s) => s.wait_seconds,
            Blocks::Resident(_) => 0.0,
        }
    }

    /// Weight bytes held in memory now (globals + resident blocks).
    pub fn resident_weight_bytes(&self) -> usize {
        let blocks = match &self.blocks {
            Blocks::Resident(b) => b.iter().map(|b| b.resident_bytes()).sum(),
            Blocks::Streamed(_) => 0,
        };
        let globals = match &self.globals {
            Globals::Resident(g) => g.resident_bytes(),
            Globals::Streamed { norm } => norm.len() * 4,
        };
        globals + blocks
    }

    /// Forgets the KV cache (a new sequence starts at position 0).
    pub fn reset(&mut self) {
        self.keep(0);
    }

    /// Keeps the first `pos` positions of the KV cache (at most those it holds).
    fn keep(&mut self, pos: usize) {
        self.pos = self.pos.min(pos);
        self.history.truncate(self.pos);
        self.prefilled = self.prefilled.min(self.pos);
    }

    /// The token ids at positions `0 .. position()`, the sequence the KV cache holds.
    pub fn tokens(&self) -> &[u32] {
        &self.history
    }

    /// Whether a prompt prefilled in pieces gives the bits of one prefill:
    /// [`Decoder::prefill`]`(a)` then `prefill(b)` leave the KV cache and logits of
    /// `prefill(a ++ b)` (so do `forward` calls of more than
    /// [`linear::FUSED_MAX_TOKENS`] tokens), and a cached prefix can be kept
    /// ([`Decoder::keep_prefix`]). True when every per-token piece of a prefill is
    /// computed for each token alone: the integer GEMM's arithmetic for every block
    /// linear (the fast prefill on a CPU that has the GEMM, no low-rank overlay), the
    /// attention rows of [`crate::kernels::attention::rows`], resident weights, no
    /// recurrent state. Elsewhere the f32 GEMMs' rounding depends on the number of rows
    /// in a call. Decode steps (`forward` of up to `FUSED_MAX_TOKENS` tokens) take the
    /// decode kernels, which round activations more finely and sum in another order:
    /// their positions are not kept.
    pub fn prefix_reuse_is_exact(&self) -> bool {
        let Blocks::Resident(blocks) = &self.blocks else {
            return false;
        };
        let isa = self.isa;
        self.prefill_mode().is_integer()
            && crate::kernels::qgemm::available(isa)
            && self.ssm.is_empty()
            && blocks.iter().all(|b| {
                b.linears.iter().all(|w| {
                    !w.has_prologue()
                        && w.int_layout(isa).is_some_and(|(group, bits)| {
                            crate::kernels::qgemm::supports(bits, group, w.cols())
                        })
                })
            })
    }

    /// Before prefilling `ids`: keeps the longest prefix of them that the KV cache holds
    /// from prefills (not decode steps), leaving at least one token to run for its
    /// logits; forgets the rest and returns how many positions were kept.
    /// [`Decoder::prefill`]`(&ids[kept..])` then gives the bits of a cold `prefill(ids)`
    /// (when [`Decoder::prefix_reuse_is_exact`]; otherwise this resets and returns 0).
    pub fn keep_prefix(&mut self, ids: &[u32]) -> usize {
        if !self.prefix_reuse_is_exact() {
            self.reset();
            return 0;
        }
        let common = self.history[..self.prefilled]
            .iter()
            .zip(ids)
            .take_while(|(a, b)| a == b)
            .count();
        let kept = common.min(ids.len().saturating_sub(1));
        self.keep(kept);
        kept
    }

    /// Runs `ids` at positions `position() ..`, appending them to the KV cache; returns
    /// logits of the last position or of all of them.
    pub fn forward(&mut self, ids: &[u32], which: Logits) -> Result<Vec<f32>> {
        let mode = self.prefill_mode();
        self.forward_mode(ids, which, mode)
    }

    /// [`Decoder::forward`] of a prompt, or of the rest of one after
    /// [`Decoder::keep_prefix`]; the last position's logits. With the fast prefill on,
    /// a call of a few tokens gets the prefill GEMM's bits
    /// ([`linear::Prefill::IntegerAll`]) instead of the decode steps' arithmetic, so a
    /// prompt prefilled in pieces of any size has the bits of one prefill. Otherwise
    /// the same as `forward(ids, Logits::Last)`.
    pub fn prefill(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        let mode = match self.prefill_mode() {
            linear::Prefill::Integer => linear::Prefill::IntegerAll,
            other => other,
        };
        self.forward_mode(ids, Logits::Last, mode)
    }

    fn forward_mode(
        &mut self,
        ids: &[u32],
        which: Logits,
        mode: linear::Prefill,
    ) -> Result<Vec<f32>> {
        // Run the whole pass on a pool worker: the parallel loops inside then start
        // from a worker (no cross-thread wake-up of the caller per loop, which costs
        // tens of microseconds each on a VM, hundreds of times per token).
        if ids.len() <= linear::SMALL_CALL_TOKENS && !self.is_streaming() {
            // Decode steps and short prefills run their parallel loops on the spinning
            // team (crate::team).
            return self.forward_in_pool(ids, which, mode);
        }
        rayon::scope(|_| self.forward_in_pool(ids, which, mode))
    }

    fn forward_in_pool(
        &mut self,
        ids: &[u32],
        which: Logits,
        mode: linear::Prefill,
    ) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(RuntimeError::Empty("forward needs at least one token"));
        }
        // Streaming bounds activation memory too: long inputs go through the model in
        // passes of STREAM_PREFILL_CHUNK tokens (each pass streams the blocks again).
        let chunk = if self.is_streaming() {
            STREAM_PREFILL_CHUNK
        } else {
            ids.len()
        };
        if ids.len() <= chunk {
            return self.forward_chunk(ids, which, mode);
        }
        let mut out = Vec::new();
        let pieces: Vec<&[u32]> = ids.chunks(chunk).collect();
        for (i, piece) in pieces.iter().enumerate() {
            let last = i + 1 == pieces.len();
            match (which, last) {
                (Logits::All, _) => out.extend(self.forward_chunk(piece, Logits::All, mode)?),
                (Logits::Last, true) => out = self.forward_chunk(piece, Logits::Last, mode)?,
                // Only the KV cache of earlier pieces matters; their logits are not
                // needed, so compute the cheapest (last position's).
                (Logits::Last, false) => drop(self.forward_chunk(piece, Logits::Last, mode)?),
            }
        }
        Ok(out)
    }

    fn forward_chunk(
        &mut self,
        ids: &[u32],
        which: Logits,
        prefill: linear::Prefill,
    ) -> Result<Vec<f32>> {
        let n = ids.len();
        let vocab = self.cfg.vocab_size;
        if let Some(position) = ids.iter().position(|&id| id as usize >= vocab) {
            return Err(RuntimeError::TokenOutOfRange {
                id: ids[position],
                position,
                vocab,
            });
        }
        if self.pos + n > self.capacity {
            return Err(RuntimeError::ContextFull {
                needed: self.pos + n,
                capacity: self.capacity,
            });
        }
        let (h, isa) = (self.cfg.hidden_size, self.isa);
        // x: (n, hidden)
        let mut x = vec![0f32; n * h];
        match &self.globals {
            Globals::Resident(g) => {
                for (row, &id) in x.chunks_exact_mut(h).zip(ids) {
                    g.embed.row_into(isa, id as usize, row);
                }
            }
            Globals::Streamed { .. } => {
                // Read only the distinct rows this call needs.
                let mut uniq: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
                uniq.sort_unstable();
                uniq.dedup();
                let e = self
                    .loader
                    .select_rows(embed(self.cfg.family), &uniq)?
                    .ok_or_else(|| RuntimeError::Prefetch("embedding rows unreadable".into()))?;
                for (row, &id) in x.chunks_exact_mut(h).zip(ids) {
                    let k = uniq.binary_search(&(id as usize)).unwrap_or(0);
                    e.row_into(isa, k, row);
                }
            }
        }
        crate::scale_embedding(&self.cfg, &mut x);
        let Decoder {
            cfg,
            blocks,
            rope,
            cache,
            ssm,
            pos,
            capacity,
            work: work_slot,
            ..
        } = self;
        if *pos == 0 {
            // A new sequence: the recurrence starts from zeros.
            ssm.iter_mut().for_each(crate::ssm::State::clear);
        }
        let ctx = Ctx {
            cfg,
            isa,
            // Streaming: leave the second core to the loader thread between loops.
            par: if matches!(blocks, Blocks::Streamed(_)) {
                linear::Par::Rayon
            } else {
                linear::Par::Team
            },
            prefill,
            rope,
            pos: Positions::Same(*pos),
            capacity: *capacity,
            n,
            seqs: 1,
            per_token: false,
        };
        let mut work = match work_slot.take() {
            Some(w) if w.n == n => w,
            _ => Work::new(cfg, n),
        };
        for l in 0..cfg.num_layers {
            let (k, v) = cache.layer_mut(l);
            let run = |b: &BlockWeights| match ssm.get_mut(l) {
                Some(st) => ctx.ssm_block(b, st, &mut x, &mut work),
                None => ctx.block(b, &mut [SeqKv { k, v }], &mut x, &mut work),
            };
            match blocks {
                Blocks::Resident(b) => run(&b[l]),
                Blocks::Streamed(s) => {
                    let b = s.block(l)?;
                    run(&b);
                    s.give_back(Loaded::Block(b)); // evicted before the next one is taken
                }
            }
            cache.release(l);
        }
        *work_slot = Some(work);
        // Positions written with the prefill GEMM's arithmetic (other calls of up to
        // FUSED_MAX_TOKENS tokens take the decode kernels, which round activations more
        // finely and sum in another order).
        if self.prefilled == self.pos
            && (prefill == linear::Prefill::IntegerAll || n > linear::FUSED_MAX_TOKENS)
        {
            self.prefilled += n;
        }
        self.pos += n;
        self.history.extend_from_slice(ids);
        let eps = self.cfg.rms_norm_eps as f32;
        let rows = match which {
            Logits::Last => &x[(n - 1) * h..],
            Logits::All => &x[..],
        };
        let m = rows.len() / h;
        let mut xn = vec![0f32; rows.len()];
        let mut logits = self.head(rows, &mut xn, m, eps)?;
        if let Some(c) = self.cfg.final_softcap {
            // Gemma-2: c * tanh(logits / c), in f32 as transformers computes it.
            let c = c as f32;
            logits.iter_mut().for_each(|v| *v = (*v / c).tanh() * c);
        }
        Ok(logits)
    }

    /// Whether [`Decoder::forward_batch`] can step this decoder: resident weights and an
    /// attention model (streamed decoders and Mamba's recurrent state are refused).
    pub fn can_batch(&self) -> bool {
        matches!(
            (&self.globals, &self.blocks),
            (Globals::Resident(_), Blocks::Resident(_))
        ) && self.cfg.ssm.is_none()
    }

    /// One decode step of several sequences at once: `ids[i]` is the next token of
    /// `slots[i]`, run at that decoder's own position against its own KV cache; returns
    /// each one's `(vocab,)` logits, bit-identical to `slots[i].forward(&[ids[i]],
    /// Logits::Last)` (on any thread count). Each weight block is read from memory once
    /// for all the tokens.
    ///
    /// The decoders must share their weights (one is a [`Decoder::fork`] of another),
    /// be resident attention models ([`Decoder::can_batch`]) and have the same capacity
    /// and instruction set, else [`RuntimeError::Unbatchable`]. Nothing is changed when
    /// an error is returned (a token out of the vocabulary, a full context).
    pub fn forward_batch(slots: &mut [&mut Decoder], ids: &[u32]) -> Result<Vec<Vec<f32>>> {
        let Some(first) = slots.first() else {
            return Err(RuntimeError::Empty(
                "forward_batch needs at least one decoder",
            ));
        };
        if ids.len() != slots.len() {
            return Err(RuntimeError::InvalidArgument(format!(
                "forward_batch: {} tokens for {} decoders",
                ids.len(),
                slots.len()
            )));
        }
        let unbatchable = |why: &str| Err(RuntimeError::Unbatchable(why.into()));
        let (Globals::Resident(globals), Blocks::Resident(blocks)) =
            (&first.globals, &first.blocks)
        else {
            return unbatchable("streamed decoders are stepped one at a time");
        };
        let (globals, blocks) = (globals.clone(), blocks.clone());
        if first.cfg.ssm.is_some() {
            return unbatchable(
                "a state-space (Mamba) model keeps one recurrent state per decoder",
            );
        }
        let (isa, capacity, vocab) = (first.isa, first.capacity, first.cfg.vocab_size);
        for (i, (d, &id)) in slots.iter().zip(ids).enumerate() {
            let shared = match (&d.globals, &d.blocks) {
                (Globals::Resident(g), Blocks::Resident(b)) => {
                    Arc::ptr_eq(g, &globals) && Arc::ptr_eq(b, &blocks)
                }
                _ => false,
            };
            if !shared {
                return unbatchable(
                    "the decoders do not share one model's weights (Decoder::fork)",
                );
            }
            if d.capacity != capacity || d.isa != isa {
                return unbatchable("the decoders differ in capacity or instruction set");
            }
            if id as usize >= vocab {
                return Err(RuntimeError::TokenOutOfRange {
                    id,
                    position: i,
                    vocab,
                });
            }
            if d.pos + 1 > capacity {
                return Err(RuntimeError::ContextFull {
                    needed: d.pos + 1,
                    capacity,
                });
            }
        }
        let (n, h) = (slots.len(), first.cfg.hidden_size);
        let cfg = first.cfg.clone();
        // x: (n, hidden), row i = sequence i's token.
        let mut x = vec![0f32; n * h];
        for (row, &id) in x.chunks_exact_mut(h).zip(ids) {
            globals.embed.row_into(isa, id as usize, row);
        }
        crate::scale_embedding(&cfg, &mut x);
        let positions: Vec<usize> = slots.iter().map(|d| d.pos).collect();
        // Disjoint borrows: every decoder's cache (written) and the first's rotary
        // tables (read; a position's angles do not depend on the table's length).
        let mut caches: Vec<&mut KvCache> = Vec::with_capacity(n);
        let mut rope = None;
        for d in slots.iter_mut() {
            let Decoder { cache, rope: r, .. } = &mut **d;
            caches.push(cache);
            rope.get_or_insert(&*r);
        }
        let Some(rope) = rope else {
            return Err(RuntimeError::Empty(
                "forward_batch needs at least one decoder",
            ));
        };
        let ctx = Ctx {
            cfg: &cfg,
            isa,
            par: linear::Par::Team,
            prefill: linear::Prefill::Tiles,
            rope,
            pos: Positions::Each(&positions),
            capacity,
            n,
            seqs: n,
            per_token: true,
        };
        let mut work = Work::new(&cfg, n);
        for (l, b) in blocks.iter().enumerate() {
            let mut kv: Vec<SeqKv> = caches
                .iter_mut()
                .map(|c| {
                    let (k, v) = c.layer_mut(l);
                    SeqKv { k, v }
                })
                .collect();
            ctx.block(b, &mut kv, &mut x, &mut work);
        }
        drop(caches);
        for (d, &id) in slots.iter_mut().zip(ids) {
            d.pos += 1;
            d.history.push(id);
        }
        // Final norm and head, token by token through the decode kernels: (n, vocab).
        let mut xn = vec![0f32; n * h];
        math::rms_norm(&x, &globals.norm, cfg.rms_norm_eps as f32, &mut xn);
        let mut logits = vec![0f32; n * vocab];
        let head = Op {
            w: globals.head.as_ref(),
            bias: None,
        };
        linear::forward_into_opts(
            linear::Par::Team,
            linear::Prefill::Tiles,
            true,
            isa,
            &[head],
            &xn,
            n,
            &mut [&mut logits],
        );
        if let Some(c) = cfg.final_softcap {
            let c = c as f32;
            logits.iter_mut().for_each(|v| *v = (*v / c).tanh() * c);
        }
        Ok(logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }

    /// The final norm of `rows (m, hidden)` into `xn` and the head: `(m, vocab)` logits.
    fn head(&mut self, rows: &[f32], xn: &mut [f32], m: usize, eps: f32) -> Result<Vec<f32>> {
        let (isa, vocab) = (self.isa, self.cfg.vocab_size);
        match (&self.globals, &mut self.blocks) {
            (Globals::Resident(g), _) => {
                math::rms_norm(rows, &g.norm, eps, xn);
                let head = Op {
                    w: g.head.as_ref(),
                    bias: None,
                };
                Ok(linear::forward(isa, &[head], xn, m)
                    .pop()
                    .unwrap_or_default())
            }
            (Globals::Streamed { norm }, Blocks::Streamed(s)) => {
                math::rms_norm(rows, norm, eps, xn);
                let plan = s
                    .head()
                    .cloned()
                    .ok_or_else(|| RuntimeError::Prefetch("head not streamed".into()))?;
                // logits: (m, vocab), filled one chunk of vocabulary rows at a time.
                let mut logits = vec![0f32; m * vocab];
                for c in 0..plan.chunks() {
                    let w = s.head_chunk(c)?;
                    let r = plan.range(c);
                    let y = linear::forward_with(
                        linear::Par::Rayon,
                        isa,
                        &[Op {
                            w: w.as_ref(),
                            bias: None,
                        }],
                        xn,
                        m,
                    );
                    for (t, src) in y[0].chunks_exact(r.len()).enumerate() {
                        logits[t * vocab + r.start..t * vocab + r.end].copy_from_slice(src);
                    }
                    s.give_back(Loaded::Head(w));
                }
                Ok(logits)
            }
            (Globals::Streamed { .. }, Blocks::Resident(_)) => Err(RuntimeError::Prefetch(
                "streamed head without a streamer".into(),
            )),
        }
    }
}
