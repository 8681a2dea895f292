//! Layer streaming: weights stay on disk and are loaded one *unit* at a time -- a
//! transformer block, or a chunk of rows of the output head -- the next unit on a
//! background thread while the current one computes.
//!
//! A forward pass takes units in a fixed cycle: blocks `0 .. L`, then head chunks
//! `0 .. C` (when the head is streamed), then block 0 of the next pass. When the decoder
//! takes unit `u`, the thread immediately starts loading unit `u + 1` (cyclically). The
//! decoder drops unit `u` before it takes `u + 1`, so at most two units are in memory:
//! the one computing and the one being prefetched.

use crate::linear::Linear;
use crate::weights::{BlockWeights, WeightLoader};
use crate::{Result, RuntimeError};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// The streamed head: tensor name, rows, rows per chunk.
#[derive(Clone, Debug)]
pub struct HeadPlan {
    /// `model.embed_tokens.weight` (tied) or `lm_head.weight`.
    pub name: &'static str,
    /// Vocabulary rows.
    pub rows: usize,
    /// Rows per chunk.
    pub chunk: usize,
}

impl HeadPlan {
    /// Number of chunks.
    pub fn chunks(&self) -> usize {
        self.rows.div_ceil(self.chunk.max(1))
    }

    /// Row range of chunk `c`.
    pub fn range(&self, c: usize) -> std::ops::Range<usize> {
        let r0 = c * self.chunk;
        r0..(r0 + self.chunk).min(self.rows)
    }
}

/// What the thread loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Transformer block `l`.
    Block(usize),
    /// Head chunk `c`.
    Head(usize),
}

/// A loaded unit. (Moved through a channel once per load; boxing the block would add an
/// allocation per load for nothing.)
#[allow(clippy::large_enum_variant)]
pub enum Loaded {
    /// A block's weights.
    Block(BlockWeights),
    /// Rows of the head.
    Head(Box<dyn Linear>),
}

/// The loading order and how to load each unit.
struct Plan {
    layers: usize,
    head: Option<HeadPlan>,
}

impl Plan {
    fn len(&self) -> usize {
        self.layers + self.head.as_ref().map_or(0, |h| h.chunks())
    }
    fn index(&self, u: Unit) -> usize {
        match u {
            Unit::Block(l) => l,
            Unit::Head(c) => self.layers + c,
        }
    }
    fn unit(&self, i: usize) -> Unit {
        if i < self.layers {
            Unit::Block(i)
        } else {
            Unit::Head(i - self.layers)
        }
    }
    fn load(&self, loader: &dyn WeightLoader, u: Unit) -> Result<Loaded> {
        match (u, &self.head) {
            (Unit::Block(l), _) => Ok(Loaded::Block(loader.block(l)?)),
            (Unit::Head(c), Some(h)) => {
                let rows: Vec<usize> = h.range(c).collect();
                let lin = loader.select_rows(h.name, &rows)?.ok_or_else(|| {
                    RuntimeError::Prefetch(format!("{} cannot be read by rows", h.name))
                })?;
                Ok(Loaded::Head(lin))
            }
            (Unit::Head(_), None) => Err(RuntimeError::Prefetch("the head is not streamed".into())),
        }
    }
}

/// What the decoder sends the loader thread.
#[allow(clippy::large_enum_variant)]
enum Msg {
    /// Load unit `i`.
    Load(usize),
    /// Free a used unit. Units are dropped on the thread that allocated them, so the
    /// allocator reuses that memory for the next load instead of parking it with the
    /// thread that happened to free it.
    Free(Loaded),
}

/// A unit loader running on its own thread.
pub struct Streamer {
    requests: Option<Sender<Msg>>,
    results: Receiver<(usize, Result<Loaded>)>,
    /// The unit requested and not yet taken.
    pending: Option<usize>,
    plan: Arc<Plan>,
    thread: Option<JoinHandle<()>>,
    /// Seconds the decoder spent waiting for a unit (prefetch not done in time).
    pub wait_seconds: f64,
}

impl Streamer {
    /// Starts the loader thread (blocks, plus head chunks when `head` is given) and
    /// prefetches block 0.
    pub fn new(loader: Arc<dyn WeightLoader>, head: Option<HeadPlan>) -> Result<Self> {
        let plan = Arc::new(Plan {
            layers: loader.config().num_layers,
            head,
        });
        let (req_tx, req_rx) = channel::<Msg>();
        let (res_tx, res_rx) = channel();
        let p = plan.clone();
        let thread = std::thread::Builder::new()
            .name("uc-prefetch".into())
            .spawn(move || {
                while let Ok(msg) = req_rx.recv() {
                    match msg {
                        Msg::Free(unit) => drop(unit),
                        Msg::Load(i) => {
                            let loaded = p.load(loader.as_ref(), p.unit(i));
                            if res_tx.send((i, loaded)).is_err() {
                                break;
                            }
                        }
                    }
                }
            })
            .map_err(|e| RuntimeError::Prefetch(e.to_string()))?;
        let mut s = Streamer {
            requests: Some(req_tx),
            results: res_rx,
            pending: None,
            plan,
            thread: Some(thread),
            wait_seconds: 0.0,
        };
        s.request(0)?;
        Ok(s)
    }

    /// The streamed head, if any.
    pub fn head(&self) -> Option<&HeadPlan> {
        self.plan.head.as_ref()
    }

    fn request(&mut self, i: usize) -> Result<()> {
        let tx = self
            .requests
            .as_ref()
            .ok_or_else(|| RuntimeError::Prefetch("stopped".into()))?;
        tx.send(Msg::Load(i))
            .map_err(|_| RuntimeError::Prefetch("thread exited".into()))?;
        self.pending = Some(i);
        Ok(())
    }

    fn receive(&mut self) -> Result<(usize, Result<Loaded>)> {
        self.pending = None;
        self.results
            .recv()
            .map_err(|_| RuntimeError::Prefetch("thread exited".into()))
    }

    /// Unit `u`, and starts prefetching the one after it.
    pub fn take(&mut self, u: Unit) -> Result<Loaded> {
        let t = std::time::Instant::now();
        let i = self.plan.index(u);
        if self.pending != Some(i) {
            if self.pending.is_some() {
                drop(self.receive()?); // an unneeded prefetch: discard it
            }
            self.request(i)?;
        }
        let (got, loaded) = self.receive()?;
        self.wait_seconds += t.elapsed().as_secs_f64();
        if got != i {
            return Err(RuntimeError::Prefetch(format!(
                "asked for {u:?}, got unit {got}"
            )));
        }
        let loaded = loaded?;
        self.request((i + 1) % self.plan.len().max(1))?;
        Ok(loaded)
    }

    /// Hands a used unit back to the loader thread, which frees it (see [`Msg::Free`]);
    /// dropped here if the thread is gone.
    pub fn give_back(&self, unit: Loaded) {
        if let Some(tx) = &self.requests {
            let _ = tx.send(Msg::Free(unit));
        }
    }

    /// Block `l` (see [`Streamer::take`]).
    pub fn block(&mut self, l: usize) -> Result<BlockWeights> {
        match self.take(Unit::Block(l))? {
            Loaded::Block(b) => Ok(b),
            Loaded::Head(_) => Err(RuntimeError::Prefetch("expected a block".into())),
        }
    }

    /// Head chunk `c` (see [`Streamer::take`]).
    pub fn head_chunk(&mut self, c: usize) -> Result<Box<dyn Linear>> {
        match self.take(Unit::Head(c))? {
            Loaded::Head(h) => Ok(h),
            Loaded::Block(_) => Err(RuntimeError::Prefetch("expected a head chunk".into())),
        }
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        // Closing the request channel ends the thread's loop (the channel is unbounded,
        // so the thread never blocks on a send).
        self.requests = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
