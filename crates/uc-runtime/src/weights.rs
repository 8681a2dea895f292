//! Where the decoder's weights come from: a dense Hugging Face checkpoint
//! ([`CheckpointLoader`]) or a pack ([`PackLoader`]), both behind [`WeightLoader`], which
//! hands out one block at a time so the decoder can keep every block resident or stream
//! them from disk.
//!
//! Neither loader keeps a file mapped between calls: each `block` / `globals` call maps
//! the files it needs, copies (and, for packs, decodes) the tensors into owned memory,
//! and unmaps them. So a streamed model's resident set holds only the blocks the decoder
//! holds, never the page-cache pages of the rest of the file. (The exception is the
//! compressor's [`CheckpointLoader::block_lazy_experts`]: its block keeps the checkpoint
//! mapped and reads a mixture-of-experts block's experts a row tile at a time,
//! releasing the pages it read.)
//!
//! Packs are verified before they run: [`PackLoader::open`] checks the manifest and every
//! file's size and SHA-256 (always), and with [`Verify::Full`] every tensor's
//! reconstruction digest as it is first loaded ([`WeightLoader::check_all`] runs that
//! pass up front, block by block, in bounded memory).

use crate::linear::{CodeArena, CodeHome, DenseLinear, Linear, PackedLinear, Recycler};
use crate::{Result, RuntimeError};
use sha2::Digest;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use uc_codec::pack::{dense_to_f32, f32_digest, le_u16};
use uc_codec::trellis::TRELLIS_ROWS;
use uc_codec::{CodecSpec, Kernel, Overlay, QuantTensor, Reconstructor};
use uc_format::{Container, DenseDtype, Encoding, Pack};
use uc_model::checkpoint::Checkpoint;
use uc_model::config::{ModelConfig, QkNorm};
use uc_model::names::{
    block_linears, block_norms, block_prefix, embed, final_norm, mamba_exact, moe_router,
    BLOCK_LINEARS, LM_HEAD, MAMBA_NORM, QK_NORMS,
};
use uc_model::source::WeightSource;

/// A block's RMSNorm weights, `(hidden,)` each, as applied (Gemma's stored `w` already
/// turned into `1 + w`); `None` where the family has no norm in that place.
#[derive(Default)]
pub struct Norms {
    /// Before attention (`input_layernorm`; none in OLMo-2).
    pub attn_in: Option<Vec<f32>>,
    /// On the attention output before the residual add (OLMo-2, Gemma:
    /// `post_attention_layernorm`).
    pub attn_out: Option<Vec<f32>>,
    /// Before the MLP (Llama: `post_attention_layernorm`; Gemma:
    /// `pre_feedforward_layernorm`; none in OLMo-2).
    pub mlp_in: Option<Vec<f32>>,
    /// On the MLP output before the residual add (OLMo-2, Gemma:
    /// `post_feedforward_layernorm`).
    pub mlp_out: Option<Vec<f32>>,
}

impl Norms {
    fn iter(&self) -> impl Iterator<Item = &Vec<f32>> {
        [&self.attn_in, &self.attn_out, &self.mlp_in, &self.mlp_out]
            .into_iter()
            .flatten()
    }
}

/// One transformer block's weights.
pub struct BlockWeights {
    /// Block index.
    pub layer: usize,
    /// The block's norms.
    pub norms: Norms,
    /// q and k norms: per head (qwen3, gemma3), `(head_dim,)` each, or over the whole
    /// projection (OLMo-2), `(heads * head_dim,)` and `(kv_heads * head_dim,)`.
    pub qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    /// q, k, v, o, gate, up, down in [`BLOCK_LINEARS`] order; in a MoE block q, k, v, o
    /// then each expert's gate, up, down (expert `e` at `4 + 3e ..= 6 + 3e`), in
    /// [`uc_model::names::block_linears`] order.
    pub linears: Vec<Box<dyn Linear>>,
    /// q, k, v biases (qwen2, `attention_bias`).
    pub qkv_bias: Option<[Vec<f32>; 3]>,
    /// A MoE block's router `(experts, hidden)`, f32 (never quantized); `None` in a dense
    /// block.
    pub router: Option<Vec<f32>>,
    /// A Mamba block's exact mixer tensors; `None` in the attention families. (Its norm is
    /// `norms.attn_in`; its four linears in_proj, x_proj, dt_proj, out_proj are `linears`.)
    pub ssm: Option<SsmWeights>,
}

/// The exact (f32, never quantized) tensors of a Mamba mixer, shapes with `d = d_inner`,
/// `N = state`, `K = conv_kernel`.
pub struct SsmWeights {
    /// Depthwise causal conv taps `(d, K)` (stored `(d, 1, K)`); tap `K - 1` multiplies
    /// the current position.
    pub conv: Vec<f32>,
    /// Conv bias `(d,)` (`use_conv_bias`).
    pub conv_bias: Option<Vec<f32>>,
    /// `A = -exp(A_log)` `(d, N)`, computed once at load in f32 as transformers does.
    pub a: Vec<f32>,
    /// Skip connection `D` `(d,)`.
    pub d: Vec<f32>,
    /// dt_proj's bias `(d,)` (added before the softplus).
    pub dt_bias: Vec<f32>,
    /// in_proj's bias `(2d,)` and out_proj's `(hidden,)` (`use_bias`).
    pub in_bias: Option<Vec<f32>>,
    /// See `in_bias`.
    pub out_bias: Option<Vec<f32>>,
}

impl SsmWeights {
    fn resident_bytes(&self) -> usize {
        let o = |x: &Option<Vec<f32>>| x.as_ref().map_or(0, Vec::len);
        4 * (self.conv.len()
            + self.a.len()
            + self.d.len()
            + self.dt_bias.len()
            + o(&self.conv_bias)
            + o(&self.in_bias)
            + o(&self.out_bias))
    }
}

impl BlockWeights {
    /// Bytes held in memory.
    pub fn resident_bytes(&self) -> usize {
        let v = |x: &Vec<f32>| x.len() * 4;
        self.linears
            .iter()
            .map(|l| l.resident_bytes())
            .sum::<usize>()
            + self.norms.iter().map(v).sum::<usize>()
            + self.qk_norm.as_ref().map_or(0, |(a, b)| v(a) + v(b))
            + self.qkv_bias.as_ref().map_or(0, |b| b.iter().map(v).sum())
            + self.router.as_ref().map_or(0, v)
            + self.ssm.as_ref().map_or(0, SsmWeights::resident_bytes)
    }

    /// Experts of the block's MLP: 0 for a dense MLP.
    pub fn experts(&self) -> usize {
        match self.router {
            Some(_) => self.linears.len().saturating_sub(4) / 3,
            None => 0,
        }
    }
}

/// Embedding, final norm and head.
pub struct GlobalWeights {
    /// Token embedding `(vocab, hidden)`; rows are looked up.
    pub embed: Arc<dyn Linear>,
    /// Final norm `(hidden,)`.
    pub norm: Vec<f32>,
    /// Output head `(vocab, hidden)`; the same object as `embed` when tied.
    pub head: Arc<dyn Linear>,
}

impl GlobalWeights {
    /// Bytes held in memory (a tied head counted once).
    pub fn resident_bytes(&self) -> usize {
        let head = if Arc::ptr_eq(&self.embed, &self.head) {
            0
        } else {
            self.head.resident_bytes()
        };
        self.embed.resident_bytes() + head + self.norm.len() * 4
    }
}

/// A source of a model's weights, one block at a time.
pub trait WeightLoader: Send + Sync {
    /// The model configuration.
    fn config(&self) -> &ModelConfig;
    /// The model directory.
    fn dir(&self) -> &Path;
    /// `"pack"` or `"checkpoint"`.
    fn kind(&self) -> &'static str;
    /// Loads embedding, final norm and head.
    fn globals(&self) -> Result<GlobalWeights>;
    /// Loads block `layer`.
    fn block(&self, layer: usize) -> Result<BlockWeights>;
    /// Runs every check a load would run, one block at a time, keeping nothing; with
    /// `globals`, also the embedding and head, a few rows at a time.
    fn check_all(&self, globals: bool) -> Result<()>;
    /// Rows `rows` (in that order) of the 2-D tensor `name` as a linear layer, reading
    /// only those rows from disk; `None` when this source cannot (the decoder then keeps
    /// embedding and head resident even when streaming).
    fn select_rows(&self, _name: &str, _rows: &[usize]) -> Result<Option<Box<dyn Linear>>> {
        Ok(None)
    }
    /// The final norm `(hidden,)`.
    fn final_norm(&self) -> Result<Vec<f32>>;
    /// Called before loading every block to keep: a loader may lay the weights out for
    /// resident use (packs: one huge-page region for all codes).
    fn prepare_resident(&self) -> Result<()> {
        Ok(())
    }
    /// A stable identity of the weights (SHA-256 hex).
    fn fingerprint(&self) -> Result<String>;
    /// Bits per weight of the stored model as `(body, whole model)`, when known.
    fn bits_per_weight(&self) -> Option<(f64, f64)> {
        None
    }
}

/// Opens `dir` as a pack (if it has a manifest) or as a Hugging Face checkpoint.
pub fn open(dir: &Path, verify: Verify) -> Result<Arc<dyn WeightLoader>> {
    if uc_model::pack_source::is_pack(dir) {
        Ok(Arc::new(PackLoader::open(dir, verify)?))
    } else {
        Ok(Arc::new(CheckpointLoader::open(dir)?))
    }
}

/// Expected shapes `(rows, cols)` of block `layer`'s linears, in
/// [`uc_model::names::block_linears`] order (the seven of a dense block; q, k, v, o and
/// every expert's gate, up, down in a MoE block).
pub fn linear_shapes(cfg: &ModelConfig, layer: usize) -> Vec<(usize, usize)> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    if let Some(s) = &cfg.ssm {
        // in_proj, x_proj, dt_proj, out_proj.
        let (d, r) = (s.d_inner, s.dt_rank);
        return vec![(2 * d, h), (r + 2 * s.state, d), (d, r), (h, d)];
    }
    let (q, kv) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    let mut shapes = vec![(q, h), (kv, h), (kv, h), (h, q)];
    let experts = cfg.experts_of(layer);
    if experts == 0 {
        shapes.extend([(i, h), (i, h), (h, i)]);
    } else {
        let mi = cfg.moe.as_ref().map_or(i, |m| m.expert_intermediate);
        for _ in 0..experts {
            shapes.extend([(mi, h), (mi, h), (h, mi)]);
        }
    }
    shapes
}

/// Reads named tensors from one opened source; shared assembly code builds blocks.
trait Reader {
    /// A dense tensor of exactly `shape`, as f32.
    fn dense(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
    /// A `(rows, cols)` linear weight, dense or packed.
    fn linear(&mut self, name: &str, rows: usize, cols: usize) -> Result<Box<dyn Linear>>;
}

fn read_block(r: &mut dyn Reader, cfg: &ModelConfig, layer: usize) -> Result<BlockWeights> {
    if cfg.ssm.is_some() {
        return read_mamba_block(r, cfg, layer);
    }
    let p = block_prefix(cfg, layer);
    let shapes = linear_shapes(cfg, layer);
    let names = block_linears(cfg, layer);
    let mut linears = Vec::with_capacity(names.len());
    for (name, (rows, cols)) in names.iter().zip(shapes.iter().copied()) {
        linears.push(r.linear(&format!("{p}.{name}.weight"), rows, cols)?);
    }
    let router = match cfg.experts_of(layer) {
        0 => None,
        experts => Some(r.dense(
            &format!("{p}.{}.weight", moe_router(cfg.family)),
            &[experts, cfg.hidden_size],
        )?),
    };
    let qkv_bias = if cfg.attention_bias {
        let mut b = Vec::with_capacity(3);
        for (name, (rows, _)) in BLOCK_LINEARS.iter().zip(shapes).take(3) {
            b.push(r.dense(&format!("{p}.{name}.bias"), &[rows])?);
        }
        b.try_into().ok()
    } else {
        None
    };
    let hd = cfg.head_dim;
    let qk_widths = match cfg.qk_norm {
        QkNorm::None => None,
        QkNorm::PerHead => Some((hd, hd)),
        QkNorm::Whole => Some((cfg.num_heads * hd, cfg.num_kv_heads * hd)),
    };
    let qk_norm = match qk_widths {
        Some((qw, kw)) => Some((
            read_norm(r, cfg, &format!("{p}.{}.weight", QK_NORMS[0]), qw)?,
            read_norm(r, cfg, &format!("{p}.{}.weight", QK_NORMS[1]), kw)?,
        )),
        None => None,
    };
    let h = cfg.hidden_size;
    let mut slots = Vec::with_capacity(4);
    for name in block_norms(cfg.norm_layout) {
        slots.push(match name {
            Some(n) => Some(read_norm(r, cfg, &format!("{p}.{n}.weight"), h)?),
            None => None,
        });
    }
    let [attn_in, attn_out, mlp_in, mlp_out]: [Option<Vec<f32>>; 4] = slots
        .try_into()
        .map_err(|_| RuntimeError::bad(&p, "four norm slots"))?;
    Ok(BlockWeights {
        layer,
        norms: Norms {
            attn_in,
            attn_out,
            mlp_in,
            mlp_out,
        },
        qk_norm,
        linears,
        qkv_bias,
        router,
        ssm: None,
    })
}

/// A Mamba block: its norm, the four linears, the exact mixer tensors (each checked
/// against the shape the config implies; a missing one is an error naming it).
fn read_mamba_block(r: &mut dyn Reader, cfg: &ModelConfig, layer: usize) -> Result<BlockWeights> {
    let s = cfg
        .ssm
        .as_ref()
        .ok_or_else(|| RuntimeError::bad("config", "a Mamba block without ssm settings"))?;
    let p = block_prefix(cfg, layer);
    let (h, d, n, k) = (cfg.hidden_size, s.d_inner, s.state, s.conv_kernel);
    let mut linears = Vec::with_capacity(4);
    for (name, (rows, cols)) in block_linears(cfg, layer)
        .iter()
        .zip(linear_shapes(cfg, layer))
    {
        linears.push(r.linear(&format!("{p}.{name}.weight"), rows, cols)?);
    }
    let mut exact: HashMap<&str, Vec<f32>> = HashMap::new();
    for name in mamba_exact(cfg) {
        let shape: &[usize] = match name {
            "mixer.conv1d.weight" => &[d, 1, k],
            "mixer.A_log" => &[d, n],
            "mixer.in_proj.bias" => &[2 * d],
            "mixer.out_proj.bias" => &[h],
            _ => &[d],
        };
        exact.insert(name, r.dense(&format!("{p}.{name}"), shape)?);
    }
    let mut take = |n: &str| exact.remove(n);
    let missing = || RuntimeError::bad(&p, "mixer tensor list");
    // A = -exp(A_log) in f32, as MambaMixer computes it on every forward.
    let a = take("mixer.A_log")
        .ok_or_else(missing)?
        .into_iter()
        .map(|x| -x.exp())
        .collect();
    let ssm = SsmWeights {
        conv: take("mixer.conv1d.weight").ok_or_else(missing)?,
        conv_bias: take("mixer.conv1d.bias"),
        a,
        d: take("mixer.D").ok_or_else(missing)?,
        dt_bias: take("mixer.dt_proj.bias").ok_or_else(missing)?,
        in_bias: take("mixer.in_proj.bias"),
        out_bias: take("mixer.out_proj.bias"),
    };
    let norm = read_norm(r, cfg, &format!("{p}.{MAMBA_NORM}"), h)?;
    Ok(BlockWeights {
        layer,
        norms: Norms {
            attn_in: Some(norm),
            ..Norms::default()
        },
        qk_norm: None,
        linears,
        qkv_bias: None,
        router: None,
        ssm: Some(ssm),
    })
}

/// A norm weight `(len,)` as applied: Gemma stores `w` and multiplies by `1 + w`
/// (computed here once, in f32 as transformers does).
fn read_norm(r: &mut dyn Reader, cfg: &ModelConfig, name: &str, len: usize) -> Result<Vec<f32>> {
    let mut w = r.dense(name, &[len])?;
    if cfg.norm_unit_offset {
        w.iter_mut().for_each(|x| *x += 1.0);
    }
    Ok(w)
}

fn read_globals(r: &mut dyn Reader, cfg: &ModelConfig) -> Result<GlobalWeights> {
    let (v, h) = (cfg.vocab_size, cfg.hidden_size);
    let embed: Arc<dyn Linear> = Arc::from(r.linear(embed(cfg.family), v, h)?);
    let norm = read_norm(r, cfg, final_norm(cfg.family), h)?;
    // Some checkpoints ship lm_head even when tied; the config decides (as uc-model does).
    let head = if cfg.tie_word_embeddings {
        embed.clone()
    } else {
        Arc::from(r.linear(LM_HEAD, v, h)?)
    };
    Ok(GlobalWeights { embed, norm, head })
}

// ---------------------------------------------------------------------------------------
// Dense checkpoints

/// A Hugging Face checkpoint directory (f32 / f16 / bf16 safetensors, sharded or not).
/// Every call opens (maps) the shards afresh and unmaps them when done.
pub struct CheckpointLoader {
    dir: PathBuf,
    config: ModelConfig,
}

impl CheckpointLoader {
    /// Opens `dir`: parses config.json and the shard headers (reads no weights).
    pub fn open(dir: &Path) -> Result<Self> {
        let ck = Checkpoint::open(dir)?;
        Ok(CheckpointLoader {
            dir: dir.to_path_buf(),
            config: ck.config().clone(),
        })
    }
}

/// Reads a checkpoint's tensors as f32; with `lazy_experts`, a mixture-of-experts
/// block's experts become [`CheckpointExpert`]s (checked, not read).
struct CheckpointReader {
    ck: Arc<Checkpoint>,
    lazy_experts: bool,
}

impl CheckpointReader {
    fn new(ck: Checkpoint) -> Self {
        CheckpointReader {
            ck: Arc::new(ck),
            lazy_experts: false,
        }
    }

    /// `name`'s stored shape is `shape`, else the error naming its file.
    fn check_shape(&self, name: &str, found: &[usize], shape: &[usize]) -> Result<()> {
        if found == shape {
            return Ok(());
        }
        Err(uc_model::ModelError::ShapeMismatch {
            name: name.into(),
            file: self.ck.file_of(name).unwrap_or(self.ck.dir()).to_path_buf(),
            found: found.to_vec(),
            expected: shape.to_vec(),
        }
        .into())
    }
}

impl Reader for CheckpointReader {
    fn dense(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (v, s) = self.ck.tensor_f32(name)?;
        self.check_shape(name, &s, shape)?;
        Ok(v)
    }
    fn linear(&mut self, name: &str, rows: usize, cols: usize) -> Result<Box<dyn Linear>> {
        if self.lazy_experts && name.contains(".experts.") {
            let found = self.ck.shape_of(name).ok_or_else(|| {
                RuntimeError::from(uc_model::ModelError::MissingTensor {
                    name: name.to_string(),
                    dir: self.ck.dir().to_path_buf(),
                })
            })?;
            self.check_shape(name, found, &[rows, cols])?;
            return Ok(Box::new(CheckpointExpert {
                ck: self.ck.clone(),
                name: name.to_string(),
                rows,
                cols,
            }));
        }
        let v = self.dense(name, &[rows, cols])?;
        Ok(Box::new(DenseLinear::new(name, v, rows, cols)?))
    }
}

/// A mixture-of-experts expert's weight left in the (mapped) checkpoint: each call
/// converts the rows it multiplies to f32 and runs [`DenseLinear`]'s arithmetic on them
/// ([`crate::linear::dense_rows`]), so a forward gives a resident block's bits while at
/// most one row tile per thread (128 rows in prefill) is held as f32. The compressor's
/// teacher block holds its experts this way (one expert's f32 at a time instead of
/// all). A read that fails (a dtype other than f32/f16/bf16, a non-finite value) gives
/// NaN outputs here; the compressor reads every expert whole before encoding it, which
/// reports the error by name.
pub struct CheckpointExpert {
    ck: Arc<Checkpoint>,
    name: String,
    rows: usize,
    cols: usize,
}

impl CheckpointExpert {
    /// Rows `r` into `buf`, NaN where they cannot be read (see the type's doc).
    fn rows_into(&self, r: std::ops::Range<usize>, buf: &mut Vec<f32>) {
        let n = r.len() * self.cols;
        if self.ck.tensor_rows_f32(&self.name, r, buf).is_err() || buf.len() != n {
            buf.clear();
            buf.resize(n, f32::NAN);
        }
    }
}

impl Linear for CheckpointExpert {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn resident_bytes(&self) -> usize {
        0
    }
    fn kind(&self) -> String {
        "dense_f32".into()
    }
    fn row_into(&self, _isa: crate::kernels::Isa, i: usize, out: &mut [f32]) {
        let mut buf = Vec::new();
        self.rows_into(i..i + 1, &mut buf);
        out.copy_from_slice(&buf);
    }
    fn weight_f32<'s>(&'s self, _isa: crate::kernels::Isa, buf: &'s mut Vec<f32>) -> &'s [f32] {
        self.rows_into(0..self.rows, buf);
        buf
    }
    fn block(
        &self,
        isa: crate::kernels::Isa,
        x: &[f32],
        _aux: &[f32],
        _px: crate::linear::Prepared,
        out: &mut crate::kernels::dense::ColBlock,
        scratch: &mut Vec<f32>,
    ) {
        let r0 = out.first();
        self.rows_into(r0..r0 + out.len(), scratch);
        crate::linear::dense_rows(isa, scratch, self.cols, x, out);
    }
}

impl CheckpointLoader {
    /// Block `layer` with a mixture-of-experts block's experts left in the checkpoint
    /// ([`CheckpointExpert`]: shapes checked, no weights read; the checkpoint stays
    /// mapped while the block lives). The rest of the block is read as by
    /// [`WeightLoader::block`], and forwards give the same bits. A dense block is the same
    /// as [`WeightLoader::block`]'s.
    pub fn block_lazy_experts(&self, layer: usize) -> Result<BlockWeights> {
        let mut r = CheckpointReader::new(Checkpoint::open(&self.dir)?);
        r.lazy_experts = true;
        read_block(&mut r, &self.config, layer)
    }
}

impl WeightLoader for CheckpointLoader {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn dir(&self) -> &Path {
        &self.dir
    }
    fn kind(&self) -> &'static str {
        "checkpoint"
    }
    fn globals(&self) -> Result<GlobalWeights> {
        read_globals(
            &mut CheckpointReader::new(Checkpoint::open(&self.dir)?),
            &self.config,
        )
    }
    fn block(&self, layer: usize) -> Result<BlockWeights> {
        read_block(
            &mut CheckpointReader::new(Checkpoint::open(&self.dir)?),
            &self.config,
            layer,
        )
    }
    fn check_all(&self, _globals: bool) -> Result<()> {
        Ok(())
    }
    fn final_norm(&self) -> Result<Vec<f32>> {
        read_norm(
            &mut CheckpointReader::new(Checkpoint::open(&self.dir)?),
            &self.config,
            final_norm(self.config.family),
            self.config.hidden_size,
        )
    }
    /// Same value as uc-model's `Checkpoint::fingerprint` (SHA-256 over the shards'
    /// SHA-256s), computed with buffered reads so no shard stays mapped.
    fn fingerprint(&self) -> Result<String> {
        let files: Vec<PathBuf> = Checkpoint::open(&self.dir)?
            .files()
            .iter()
            .map(|p| p.to_path_buf())
            .collect();
        let mut outer = sha2::Sha256::new();
        for f in files {
            let (_, hex_digest) = uc_format::sha256_file(&f).map_err(|e| RuntimeError::Format {
                dir: self.dir.clone(),
                source: e,
            })?;
            let raw = hex::decode(&hex_digest)
                .map_err(|e| RuntimeError::InvalidArgument(e.to_string()))?;
            outer.update(raw);
        }
        Ok(hex::encode(outer.finalize()))
    }
}

// ---------------------------------------------------------------------------------------
// Packs

/// Buffers waiting between a unit's drop and the next load. Used units are freed on the
/// loader thread right before it loads the next one, so one block's worth (the largest
/// block container) is enough; head chunks are smaller.
fn recycle_cap(pack: &Pack) -> usize {
    let largest = pack
        .manifest()
        .files
        .iter()
        .filter(|f| f.path.starts_with("tensors/block_"))
        .map(|f| f.size)
        .max()
        .unwrap_or(0);
    usize::try_from(largest).unwrap_or(usize::MAX)
}

/// Largest container header read by positioned reads (as the safetensors crate's cap).
const MAX_HEADER: u64 = 100_000_000;

/// Stored bytes per chunk when a big tensor is checked a few rows at a time.
const CHECK_CHUNK_BYTES: usize = 1 << 20;

/// How much of a pack to verify before running it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// Manifest, file sizes and SHA-256s, and every tensor's reconstruction digest.
    Full,
    /// Manifest, file sizes and SHA-256s only (never less).
    FilesOnly,
}

/// A pack directory. Holds the parsed manifest only; containers are mapped per call.
pub struct PackLoader {
    dir: PathBuf,
    pack: Pack,
    config: ModelConfig,
    verify: Verify,
    /// Per block, then one for the globals: reconstruction digests already checked.
    checked: Vec<AtomicBool>,
    /// Code buffers of dropped (streamed) weights, reused by later loads.
    recycler: Arc<Recycler>,
    /// The region resident weights' codes are loaded into (see [`CodeArena`]).
    arena: std::sync::OnceLock<Arc<CodeArena>>,
}

impl PackLoader {
    /// Opens and file-verifies the pack in `dir`: manifest consistency, every listed
    /// file's size and SHA-256, no unlisted files. Any failure is
    /// [`RuntimeError::Verify`] with one line per finding.
    pub fn open(dir: &Path, verify: Verify) -> Result<Self> {
        let pack = Pack::open(dir).map_err(|e| RuntimeError::Verify {
            report: format!("manifest.json: {e}"),
        })?;
        let report = pack.verify_files();
        if !report.failures.is_empty() {
            let lines: Vec<String> = report
                .failures
                .iter()
                .map(|f| format!("  {}: {}", f.subject, f.problem))
                .collect();
            return Err(RuntimeError::Verify {
                report: lines.join("\n"),
            });
        }
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let checked = (0..=config.num_layers)
            .map(|_| AtomicBool::new(false))
            .collect();
        let recycler = Arc::new(Recycler::new(recycle_cap(&pack)));
        Ok(PackLoader {
            dir: dir.to_path_buf(),
            pack,
            config,
            verify,
            checked,
            recycler,
            arena: std::sync::OnceLock::new(),
        })
    }

    /// Checks tensor `name`'s reconstruction digest a few rows at a time (bounded
    /// memory: each chunk maps the container afresh and unmaps it), reconstructing with
    /// the runtime's row kernel, which is bit-identical to uc-codec's.
    fn check_rows_digest(&self, name: &str) -> Result<()> {
        let rec = self.pack.tensor(name).map_err(|e| RuntimeError::Format {
            dir: self.dir.clone(),
            source: e,
        })?;
        let (rows, cols) = match rec.shape.as_slice() {
            &[r, c] => (r as usize, c as usize),
            s => return Err(RuntimeError::bad(name, format!("shape {s:?} is not 2-D"))),
        };
        let isa = crate::kernels::Isa::detect();
        // Whole trellis runs (docs/format.md section 3c), whatever the codec.
        let chunk = (CHECK_CHUNK_BYTES / cols.max(1)).next_multiple_of(TRELLIS_ROWS);
        let mut h = sha2::Sha256::new();
        let mut row = vec![0f32; cols];
        for r0 in (0..rows).step_by(chunk) {
            let sel: Vec<usize> = (r0..(r0 + chunk).min(rows)).collect();
            let lin = self
                .select_rows(name, &sel)?
                .ok_or_else(|| RuntimeError::bad(name, "rows unreadable"))?;
            for i in 0..sel.len() {
                lin.row_into(isa, i, &mut row);
                let bytes: Vec<u8> = row.iter().flat_map(|x| x.to_le_bytes()).collect();
                h.update(&bytes);
            }
        }
        let d = hex::encode(h.finalize());
        if d != rec.recon_sha256 {
            return Err(RuntimeError::Verify {
                report: format!(
                    "  {name}: reconstruction sha256 {d}, manifest says {}",
                    rec.recon_sha256
                ),
            });
        }
        Ok(())
    }

    /// Rows `sel` of tensor `name` read with positioned reads, not through a memory map:
    /// for scattered rows (embedding lookups) a map's fault-around would bring up to 16
    /// neighbouring cached pages per row into the resident set. Entries are checked
    /// against the manifest record as in the mapped path.
    #[cfg(unix)]
    fn pread_rows(&self, name: &str, sel: &[usize]) -> Result<Box<dyn Linear>> {
        use std::os::unix::fs::FileExt;
        let rec = self.pack.tensor(name).map_err(|e| RuntimeError::Format {
            dir: self.dir.clone(),
            source: e,
        })?;
        let (rows, cols) = match rec.shape.as_slice() {
            &[r, c] => (r as usize, c as usize),
            s => return Err(RuntimeError::bad(name, format!("shape {s:?} is not 2-D"))),
        };
        if let Some(&bad) = sel.iter().find(|&&i| i >= rows) {
            return Err(RuntimeError::bad(name, format!("row {bad} of {rows}")));
        }
        let path = self.dir.join(&rec.file);
        let io = |e: std::io::Error| RuntimeError::Io {
            path: path.clone(),
            source: e,
        };
        let file = std::fs::File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut n8 = [0u8; 8];
        file.read_exact_at(&mut n8, 0).map_err(io)?;
        let n = u64::from_le_bytes(n8);
        if n > MAX_HEADER || 8 + n > len {
            return Err(RuntimeError::bad(
                name,
                format!("container header of {n} bytes"),
            ));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact_at(&mut header, 8).map_err(io)?;
        let meta: safetensors::tensor::Metadata = serde_json::from_slice(&header)
            .map_err(|e| RuntimeError::bad(name, format!("container header: {e}")))?;
        let data_len = len - 8 - n;
        let codec = |e: uc_codec::CodecError| RuntimeError::Codec {
            tensor: name.into(),
            source: e,
        };
        // The entries the record implies, from uc-codec (the one reader of the layout).
        let (specs, _) = uc_codec::pack::expected_entries(rec).map_err(codec)?;
        // Byte offset of the record's entry `k` (order of `expected_entries`), its dtype
        // and shape checked against the container header.
        let locate = |k: usize| -> Result<u64> {
            let (entry, dtype, shape) = specs
                .get(k)
                .ok_or_else(|| RuntimeError::bad(name, format!("entry {k} of the record")))?;
            let (dtype, shape) = (*dtype, shape.as_slice());
            let info = meta.info(entry).ok_or_else(|| {
                RuntimeError::bad(name, format!("entry {entry:?} missing from {}", rec.file))
            })?;
            let bytes = shape.iter().product::<usize>() * dtype.bitsize() / 8;
            let (a, b) = info.data_offsets;
            if info.dtype != dtype
                || info.shape != shape
                || b < a
                || b - a != bytes
                || b as u64 > data_len
            {
                return Err(RuntimeError::bad(
                    name,
                    format!(
                        "entry {entry:?} is {:?} {:?}, the manifest implies {dtype:?} {shape:?}",
                        info.dtype, info.shape
                    ),
                ));
            }
            Ok(8 + n + a as u64)
        };
        // Row i of a (rows, width)-byte entry at `base`, for each selected row.
        let read_rows = |base: u64, width: usize, extra: usize| -> Result<Vec<u8>> {
            let mut out = self.recycler.take(sel.len() * width + extra);
            out.resize(sel.len() * width, 0);
            for (k, &i) in sel.iter().enumerate() {
                file.read_exact_at(
                    &mut out[k * width..(k + 1) * width],
                    base + (i * width) as u64,
                )
                .map_err(io)?;
            }
            Ok(out)
        };
        match &rec.encoding {
            Encoding::Dense(dt) => {
                let bytes = read_rows(locate(0)?, cols * dt.size(), 0)?;
                let v = dense_to_f32(*dt, &bytes);
                Ok(Box::new(DenseLinear::new(name, v, sel.len(), cols)?))
            }
            Encoding::Codec(cr) => {
                let spec = CodecSpec::from_record(cr).map_err(codec)?;
                let l = spec.layout(rows, cols).map_err(codec)?;
                let mut codebook = vec![0u8; l.codebook * 4];
                file.read_exact_at(&mut codebook, locate(0)?).map_err(io)?;
                let scales = read_rows(locate(1)?, l.n_groups * l.scale_bytes, 0)?;
                let codes = read_rows(locate(2)?, l.row_bytes, crate::kernels::quant::CODE_PAD)?;
                let r = spec.rank as usize;
                let overlay = if r > 0 {
                    let a = read_rows(locate(3)?, r * 2, 0)?;
                    let mut b = vec![0u8; r * cols * 2];
                    file.read_exact_at(&mut b, locate(4)?).map_err(io)?;
                    Some(Overlay {
                        rank: r,
                        a: le_u16(&a),
                        b: le_u16(&b),
                    })
                } else {
                    None
                };
                let qt = QuantTensor {
                    rows: sel.len(),
                    cols,
                    spec,
                    codebook: dense_to_f32(DenseDtype::F32, &codebook),
                    scales: uc_codec::scales_from_le(&scales, spec.scale_dtype),
                    codes,
                    overlay,
                };
                qt.validate().map_err(codec)?;
                Ok(Box::new(PackedLinear::from_quant_recycled(
                    name,
                    qt,
                    Some(self.recycler.clone()),
                )?))
            }
        }
    }

    fn reader(&self, slot: usize) -> PackReader<'_> {
        let check = self.verify == Verify::Full && !self.checked[slot].load(Ordering::Acquire);
        PackReader {
            loader: self,
            containers: HashMap::new(),
            check,
        }
    }
}

struct PackReader<'a> {
    loader: &'a PackLoader,
    /// Containers mapped during this call; unmapped when the reader drops.
    containers: HashMap<String, Container>,
    /// Compare reconstruction digests with the manifest.
    check: bool,
}

impl PackReader<'_> {
    fn container(&mut self, file: &str) -> Result<&Container> {
        let l = self.loader;
        if !self.containers.contains_key(file) {
            if !l.pack.manifest().files.iter().any(|f| f.path == file) {
                return Err(RuntimeError::Format {
                    dir: l.dir.clone(),
                    source: uc_format::FormatError::UnsafePath { path: file.into() },
                });
            }
            let c = Container::open(&l.dir.join(file)).map_err(|e| RuntimeError::Format {
                dir: l.dir.clone(),
                source: e,
            })?;
            self.containers.insert(file.to_string(), c);
        }
        Ok(&self.containers[file])
    }

    fn mismatch(&self, tensor: &str, what: &str, found: &str, want: &str) -> RuntimeError {
        RuntimeError::Verify {
            report: format!("  {tensor}: {what} sha256 {found}, manifest says {want}"),
        }
    }

    /// Record, shape check, container.
    fn record(
        &mut self,
        name: &str,
        shape: &[usize],
    ) -> Result<(uc_format::TensorRecord, &Container)> {
        let rec = self
            .loader
            .pack
            .tensor(name)
            .map_err(|e| RuntimeError::Format {
                dir: self.loader.dir.clone(),
                source: e,
            })?
            .clone();
        let found: Vec<usize> = rec.shape.iter().map(|&d| d as usize).collect();
        if found != shape {
            return Err(uc_model::ModelError::ShapeMismatch {
                name: name.into(),
                file: self.loader.dir.join(&rec.file),
                found,
                expected: shape.to_vec(),
            }
            .into());
        }
        let file = rec.file.clone();
        Ok((rec, self.container(&file)?))
    }

    /// The quantized tensor `name` (`None` if it is stored dense), all rows or only
    /// `select` (in that order). Digests are checked only for whole tensors.
    fn quant(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
        select: Option<&[usize]>,
    ) -> Result<Option<QuantTensor>> {
        let recycler = self.loader.recycler.clone();
        let (rec, c) = self.record(name, &[rows, cols])?;
        let Encoding::Codec(cr) = &rec.encoding else {
            return Ok(None);
        };
        let codec = |e: uc_codec::CodecError| RuntimeError::Codec {
            tensor: name.into(),
            source: e,
        };
        let spec = CodecSpec::from_record(cr).map_err(codec)?;
        let l = spec.layout(rows, cols).map_err(codec)?;
        // Entries located and checked by uc-codec (the one reader of the entry layout):
        // codebook, scales, codes, then overlay a, b.
        let parts = uc_codec::pack::load_entries(c, &rec).map_err(codec)?;
        let part = |i: usize| parts.get(i).map(|e| e.data).unwrap_or_default();
        let (codebook, scales, codes) = (part(0), part(1), part(2));
        let overlay = (spec.rank > 0).then(|| Overlay {
            rank: spec.rank as usize,
            a: le_u16(part(3)),
            b: le_u16(part(4)),
        });
        let picked: Vec<usize> = match select {
            Some(sel) => {
                if let Some(&bad) = sel.iter().find(|&&i| i >= rows) {
                    return Err(RuntimeError::bad(name, format!("row {bad} of {rows}")));
                }
                sel.to_vec()
            }
            None => Vec::new(),
        };
        // Row i of a (rows, width) buffer of `unit`-byte elements, for each picked row.
        let gather = |data: &[u8], width: usize, unit: usize, extra: usize| -> Vec<u8> {
            let row = width * unit;
            let n = if select.is_some() {
                picked.len() * row
            } else {
                data.len()
            };
            let mut out = recycler.take(n + extra);
            match select {
                Some(_) => picked
                    .iter()
                    .for_each(|&i| out.extend_from_slice(&data[i * row..(i + 1) * row])),
                None => out.extend_from_slice(data),
            }
            out
        };
        let overlay = overlay.map(|o| Overlay {
            a: match select {
                Some(_) => picked
                    .iter()
                    .flat_map(|&i| o.a[i * o.rank..(i + 1) * o.rank].iter().copied())
                    .collect(),
                None => o.a,
            },
            ..o
        });
        let qt = QuantTensor {
            rows: if select.is_some() { picked.len() } else { rows },
            cols,
            spec,
            codebook: dense_to_f32(DenseDtype::F32, codebook),
            scales: uc_codec::scales_from_le(
                &gather(scales, l.n_groups, l.scale_bytes, 0),
                spec.scale_dtype,
            ),
            // Room for the kernels' zero padding, so PackedLinear need not reallocate.
            codes: gather(codes, l.row_bytes, 1, crate::kernels::quant::CODE_PAD),
            overlay,
        };
        qt.validate().map_err(codec)?;
        if self.check && select.is_none() {
            let d = Reconstructor::new(&qt, Kernel::select(false))
                .and_then(|r| r.digest())
                .map_err(codec)?;
            let d = hex::encode(d);
            if d != rec.recon_sha256 {
                return Err(self.mismatch(name, "reconstruction", &d, &rec.recon_sha256));
            }
        }
        Ok(Some(qt))
    }
}

impl PackReader<'_> {
    /// Rows `select` of the 2-D tensor `name`, dense or quantized.
    fn select(&mut self, name: &str, select: &[usize]) -> Result<Box<dyn Linear>> {
        let rec = self
            .loader
            .pack
            .tensor(name)
            .map_err(|e| RuntimeError::Format {
                dir: self.loader.dir.clone(),
                source: e,
            })?;
        let (rows, cols) = match rec.shape.as_slice() {
            &[r, c] => (r as usize, c as usize),
            s => return Err(RuntimeError::bad(name, format!("shape {s:?} is not 2-D"))),
        };
        if let Some(qt) = self.quant(name, rows, cols, Some(select))? {
            return Ok(Box::new(PackedLinear::from_quant_recycled(
                name,
                qt,
                Some(self.loader.recycler.clone()),
            )?));
        }
        let (rec, c) = self.record(name, &[rows, cols])?;
        let Encoding::Dense(dt) = rec.encoding else {
            return Err(RuntimeError::bad(name, "encoding changed"));
        };
        let parts = uc_codec::pack::load_entries(c, &rec).map_err(|e| RuntimeError::Codec {
            tensor: name.into(),
            source: e,
        })?;
        let data = parts.first().map(|e| e.data).unwrap_or_default();
        let row = cols * dt.size();
        let mut v = Vec::with_capacity(select.len() * cols);
        for &i in select {
            if i >= rows {
                return Err(RuntimeError::bad(name, format!("row {i} of {rows}")));
            }
            v.extend(dense_to_f32(dt, &data[i * row..(i + 1) * row]));
        }
        Ok(Box::new(DenseLinear::new(name, v, select.len(), cols)?))
    }
}

impl Reader for PackReader<'_> {
    fn dense(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (rec, c) = self.record(name, shape)?;
        let v = match &rec.encoding {
            Encoding::Dense(dt) => {
                let parts =
                    uc_codec::pack::load_entries(c, &rec).map_err(|e| RuntimeError::Codec {
                        tensor: name.into(),
                        source: e,
                    })?;
                dense_to_f32(*dt, parts.first().map(|e| e.data).unwrap_or_default())
            }
            Encoding::Codec(_) => {
                let (rows, cols) = match shape {
                    [r, c] => (*r, *c),
                    _ => return Err(RuntimeError::bad(name, "a quantized tensor must be 2-D")),
                };
                let qt = self
                    .quant(name, rows, cols, None)?
                    .ok_or_else(|| RuntimeError::bad(name, "encoding changed"))?;
                uc_codec::reconstruct(&qt, Kernel::select(false)).map_err(|e| {
                    RuntimeError::Codec {
                        tensor: name.into(),
                        source: e,
                    }
                })?
            }
        };
        if self.check && matches!(rec.encoding, Encoding::Dense(_)) {
            let d = f32_digest(&v);
            if d != rec.recon_sha256 {
                return Err(self.mismatch(name, "reconstruction", &d, &rec.recon_sha256));
            }
        }
        Ok(v)
    }

    fn linear(&mut self, name: &str, rows: usize, cols: usize) -> Result<Box<dyn Linear>> {
        let home = match self.loader.arena.get() {
            Some(a) => CodeHome::Arena(a.clone()),
            None => CodeHome::Recycled(self.loader.recycler.clone()),
        };
        match self.quant(name, rows, cols, None)? {
            Some(qt) => Ok(Box::new(PackedLinear::from_quant_in(name, qt, home)?)),
            None => Ok(Box::new(DenseLinear::new(
                name,
                self.dense(name, &[rows, cols])?,
                rows,
                cols,
            )?)),
        }
    }
}

impl WeightLoader for PackLoader {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn dir(&self) -> &Path {
        &self.dir
    }
    fn kind(&self) -> &'static str {
        "pack"
    }
    fn globals(&self) -> Result<GlobalWeights> {
        let slot = self.config.num_layers;
        let g = read_globals(&mut self.reader(slot), &self.config)?;
        self.checked[slot].store(true, Ordering::Release);
        Ok(g)
    }
    fn block(&self, layer: usize) -> Result<BlockWeights> {
        if layer >= self.config.num_layers {
            return Err(RuntimeError::InvalidArgument(format!(
                "block {layer} of {}",
                self.config.num_layers
            )));
        }
        let b = read_block(&mut self.reader(layer), &self.config, layer)?;
        self.checked[layer].store(true, Ordering::Release);
        Ok(b)
    }
    fn check_all(&self, globals: bool) -> Result<()> {
        if self.verify == Verify::Full {
            for l in 0..self.config.num_layers {
                drop(self.block(l)?);
            }
            if globals {
                let mut names = vec![embed(self.config.family)];
                if !self.config.tie_word_embeddings {
                    names.push(LM_HEAD);
                }
                names
                    .into_iter()
                    .try_for_each(|n| self.check_rows_digest(n))?;
                self.final_norm()?;
            }
        }
        Ok(())
    }
    fn select_rows(&self, name: &str, rows: &[usize]) -> Result<Option<Box<dyn Linear>>> {
        // A trellis code depends on the two rows above it within its run of
        // TRELLIS_ROWS rows: only contiguous selections starting at a run can be decoded.
        let trellis = self
            .pack
            .tensor(name)
            .is_ok_and(|rec| matches!(&rec.encoding, Encoding::Codec(cr) if cr.trellis));
        let contiguous = rows.windows(2).all(|w| w[1] == w[0] + 1);
        if trellis && !(contiguous && rows.first().is_none_or(|r| r % TRELLIS_ROWS == 0)) {
            return Err(RuntimeError::bad(
                name,
                format!(
                    "trellis-coded rows can only be read in runs starting at a multiple of \
                     {TRELLIS_ROWS}"
                ),
            ));
        }
        #[cfg(unix)]
        if rows.windows(2).any(|w| w[1] != w[0] + 1) {
            return self.pread_rows(name, rows).map(Some);
        }
        let mut r = PackReader {
            loader: self,
            containers: HashMap::new(),
            check: false,
        };
        r.select(name, rows).map(Some)
    }
    fn prepare_resident(&self) -> Result<()> {
        if self.arena.get().is_some() {
            return Ok(());
        }
        // Every quantized tensor's codes + padding, each slot 64-byte aligned.
        let mut total = 0usize;
        for t in &self.pack.manifest().tensors {
            let (Encoding::Codec(cr), [rows, cols]) = (&t.encoding, t.shape.as_slice()) else {
                continue;
            };
            let (rows, cols) = (*rows as usize, *cols as usize);
            let Ok(l) = CodecSpec::from_record(cr).and_then(|s| s.layout(rows, cols)) else {
                continue; // reported when the tensor is loaded
            };
            total = total.saturating_add(l.codes + crate::kernels::quant::CODE_PAD + 64);
        }
        let arena = CodeArena::new(total).map_err(|e| RuntimeError::Io {
            path: "<anonymous memory for weights>".into(),
            source: e,
        })?;
        let _ = self.arena.set(arena);
        Ok(())
    }
    fn final_norm(&self) -> Result<Vec<f32>> {
        let slot = self.config.num_layers;
        read_norm(
            &mut self.reader(slot),
            &self.config,
            final_norm(self.config.family),
            self.config.hidden_size,
        )
    }
    fn fingerprint(&self) -> Result<String> {
        Ok(self.pack.manifest().fingerprint.clone())
    }
    fn bits_per_weight(&self) -> Option<(f64, f64)> {
        let m = self.pack.manifest();
        Some((m.bpw_body, m.bpw_model))
    }
}
