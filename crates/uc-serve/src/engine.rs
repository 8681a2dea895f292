//! The model worker: one OS thread that owns the model and serves a FIFO queue of
//! [`Job`]s, up to `max_batch` of them at once.
//!
//! Each of the `max_batch` slots is a [`Decoder`] with its own KV cache. The worker
//! admits queued jobs into free slots in arrival order, then steps every active job by
//! one forward pass (the prompt's prefill, or one generated token) in turn, so a long
//! generation does not hold up a short one and a new request's first token waits at
//! most one step of each active job. A job's tokens depend only on its own decoder
//! state and its own seeded sampler, never on what else is running, so every response
//! is identical to the same request served alone (tested at temperature 0 and with
//! seeds). The steps are not fused into one batched matmul: that needs the decoder's
//! internals, which this crate does not touch.
//!
//! Events go back to the HTTP side over an unbounded channel per job; when the client
//! has gone (the receiver is dropped), the job is cancelled at its next step and its
//! slot is freed.

use crate::api::{FinishReason, Usage};
use crate::stop::StopMatcher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;
use uc_model::tokenizer::Tokenizer;
use uc_runtime::generate::TextStream;
use uc_runtime::{Decoder, DecoderOptions, Logits, Sampler, SamplingParams, WeightLoader};

/// One generation request, tokenized and validated.
pub struct Job {
    /// Prompt token ids (at least one).
    pub prompt: Vec<u32>,
    /// Most tokens to generate (>= 1; prompt + max_tokens fits the context).
    pub max_tokens: usize,
    /// Temperature, top-p, seed.
    pub sampling: SamplingParams,
    /// Keep only the `top_k` most likely tokens before sampling (0 = all).
    pub top_k: usize,
    /// Text sequences that end generation.
    pub stop: Vec<String>,
    /// Where the job's events go.
    pub events: UnboundedSender<Event>,
}

/// What the worker reports about a job.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// More text (never splits a UTF-8 character, never holds part of a stop sequence).
    Text(String),
    /// Generation ended.
    Done {
        /// Why.
        finish: FinishReason,
        /// Token counts.
        usage: Usage,
    },
    /// The forward pass failed (the job is over).
    Error(String),
}

/// Queue and slot occupancy, for `/health`.
#[derive(Debug, Default)]
pub struct Load {
    /// Jobs waiting for a slot.
    pub queued: AtomicUsize,
    /// Jobs in slots.
    pub active: AtomicUsize,
    /// Jobs given up because their client went away.
    pub cancelled: AtomicUsize,
}

/// Errors starting the worker.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Building a decoder failed.
    #[error(transparent)]
    Runtime(#[from] uc_runtime::RuntimeError),
    /// The worker thread could not be started.
    #[error("starting the model worker thread: {0}")]
    Thread(std::io::Error),
}

/// The handle the HTTP side submits jobs through (cheap to clone).
#[derive(Clone)]
pub struct Engine {
    jobs: mpsc::Sender<Job>,
    load: Arc<Load>,
}

impl Engine {
    /// Builds `max_batch` decoders of `capacity` positions over `loader` and starts the
    /// worker thread. `eos` ends a generation without being emitted.
    pub fn start(
        loader: Arc<dyn WeightLoader>,
        tokenizer: Arc<Tokenizer>,
        eos: Vec<u32>,
        capacity: usize,
        max_batch: usize,
    ) -> Result<Engine, EngineError> {
        // One copy of the weights: every slot after the first is a fork of it.
        let first = Decoder::new(
            loader.clone(),
            DecoderOptions {
                capacity,
                stream_layers: false,
            },
        )?;
        let mut decoders = Vec::with_capacity(max_batch.max(1));
        for _ in 1..max_batch.max(1) {
            decoders.push(first.fork(capacity)?);
        }
        decoders.insert(0, first);
        let (tx, rx) = mpsc::channel::<Job>();
        let load = Arc::new(Load::default());
        let l = load.clone();
        std::thread::Builder::new()
            .name("uc-serve-model".into())
            .spawn(move || worker(rx, decoders, &tokenizer, &eos, &l))
            .map_err(EngineError::Thread)?;
        Ok(Engine { jobs: tx, load })
    }

    /// Queues `job`; `Err(job)` if the worker has stopped.
    #[allow(clippy::result_large_err)]
    pub fn submit(&self, job: Job) -> Result<(), Job> {
        self.load.queued.fetch_add(1, Ordering::SeqCst);
        self.jobs.send(job).map_err(|e| {
            self.load.queued.fetch_sub(1, Ordering::SeqCst);
            e.0
        })
    }

    /// Current queue and slot occupancy.
    pub fn load(&self) -> &Load {
        &self.load
    }
}

/// A job in a slot.
struct Active<'t> {
    job: Job,
    slot: usize,
    sampler: Sampler,
    text: TextStream<'t>,
    stop: StopMatcher,
    /// The last sampled token, not yet run through the decoder (`None` before prefill).
    last: Option<u32>,
    generated: usize,
}

fn worker(
    rx: mpsc::Receiver<Job>,
    mut decoders: Vec<Decoder>,
    tok: &Tokenizer,
    eos: &[u32],
    load: &Load,
) {
    let mut free: Vec<usize> = (0..decoders.len()).rev().collect();
    let mut active: Vec<Active> = Vec::new();
    // Reused for top-k selection.
    let mut order: Vec<u32> = Vec::new();
    loop {
        // Admit waiting jobs into free slots, in arrival order; block only when idle.
        while let Some(&slot) = free.last() {
            let job = if active.is_empty() {
                match rx.recv() {
                    Ok(j) => j,
                    Err(_) => return, // every Engine handle is gone: shut down
                }
            } else {
                match rx.try_recv() {
                    Ok(j) => j,
                    Err(_) => break,
                }
            };
            load.queued.fetch_sub(1, Ordering::SeqCst);
            let sampler = match Sampler::new(job.sampling) {
                Ok(s) => s,
                Err(e) => {
                    let _ = job.events.send(Event::Error(e.to_string()));
                    continue;
                }
            };
            free.pop();
            load.active.fetch_add(1, Ordering::SeqCst);
            active.push(Active {
                stop: StopMatcher::new(job.stop.clone()),
                job,
                slot,
                sampler,
                text: TextStream::new(tok),
                last: None,
                generated: 0,
            });
        }
        // One step of every active job, in admission order.
        let mut i = 0;
        while i < active.len() {
            let done = match active.get_mut(i) {
                Some(a) => {
                    let dec = decoders.get_mut(a.slot);
                    match dec {
                        Some(dec) => match step(a, dec, eos, &mut order) {
                            Step::Continue => false,
                            Step::Over => true,
                            Step::ClientGone => {
                                load.cancelled.fetch_add(1, Ordering::SeqCst);
                                true
                            }
                        },
                        None => true,
                    }
                }
                None => true,
            };
            if done {
                let a = active.remove(i);
                free.push(a.slot);
                load.active.fetch_sub(1, Ordering::SeqCst);
            } else {
                i += 1;
            }
        }
    }
}

/// Keeps the `k` largest logits (ties broken by lower token id, so the set is
/// deterministic) and sets the rest to -inf, which the sampler gives probability 0.
pub fn mask_top_k(logits: &mut [f32], k: usize, order: &mut Vec<u32>) {
    if k == 0 || k >= logits.len() {
        return;
    }
    order.clear();
    order.extend(0..logits.len() as u32);
    let key = |&i: &u32| logits.get(i as usize).copied().unwrap_or(f32::NEG_INFINITY);
    order.select_nth_unstable_by(k - 1, |a, b| key(b).total_cmp(&key(a)).then(a.cmp(b)));
    for &i in order.iter().skip(k) {
        if let Some(l) = logits.get_mut(i as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// What a step left the job in.
enum Step {
    Continue,
    Over,
    ClientGone,
}

/// One forward pass and one sampled token for `a`.
fn step(a: &mut Active, dec: &mut Decoder, eos: &[u32], order: &mut Vec<u32>) -> Step {
    if a.job.events.is_closed() {
        return Step::ClientGone;
    }
    let logits = match a.last {
        None => {
            dec.reset();
            dec.forward(&a.job.prompt, Logits::Last)
        }
        Some(t) => dec.forward(&[t], Logits::Last),
    };
    let mut logits = match logits {
        Ok(l) => l,
        Err(e) => {
            let _ = a.job.events.send(Event::Error(e.to_string()));
            return Step::Over;
        }
    };
    mask_top_k(&mut logits, a.job.top_k, order);
    let tok = a.sampler.sample(&logits);
    let usage = |generated| Usage::new(a.job.prompt.len(), generated);
    if eos.contains(&tok) {
        let tail = a.text.finish().unwrap_or_default();
        let (text, _) = a.stop.push(&tail);
        let text = text + &a.stop.finish();
        return finish(a, text, FinishReason::Stop, usage(a.generated));
    }
    a.generated += 1;
    a.last = Some(tok);
    let piece = match a.text.push(tok) {
        Ok(p) => p,
        Err(e) => {
            let _ = a.job.events.send(Event::Error(e.to_string()));
            return Step::Over;
        }
    };
    let (text, hit) = a.stop.push(&piece);
    if hit {
        return finish(a, text, FinishReason::Stop, usage(a.generated));
    }
    if a.generated >= a.job.max_tokens {
        let tail = a.text.finish().unwrap_or_default();
        let (more, hit) = a.stop.push(&tail);
        let mut text = text + &more;
        if !hit {
            text += &a.stop.finish();
        }
        let reason = if hit {
            FinishReason::Stop
        } else {
            FinishReason::Length
        };
        return finish(a, text, reason, usage(a.generated));
    }
    if !text.is_empty() && a.job.events.send(Event::Text(text)).is_err() {
        return Step::ClientGone;
    }
    Step::Continue
}

fn finish(a: &Active, text: String, finish: FinishReason, usage: Usage) -> Step {
    if !text.is_empty() {
        let _ = a.job.events.send(Event::Text(text));
    }
    let _ = a.job.events.send(Event::Done { finish, usage });
    Step::Over
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_keeps_exactly_k_with_ties_broken_by_id() {
        let mut l = vec![1.0, 3.0, 3.0, 2.0, 3.0];
        mask_top_k(&mut l, 2, &mut Vec::new());
        let ninf = f32::NEG_INFINITY;
        assert_eq!(l, vec![ninf, 3.0, 3.0, ninf, ninf]);
        let mut l = vec![1.0, 2.0];
        mask_top_k(&mut l, 0, &mut Vec::new());
        assert_eq!(l, vec![1.0, 2.0]);
    }
}
