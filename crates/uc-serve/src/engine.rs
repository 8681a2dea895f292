//! The model worker: one OS thread that owns the model and serves a FIFO queue of
//! [`Job`]s, up to `max_batch` of them at once.
//!
//! Each of the `max_batch` slots is a [`Decoder`] with its own KV cache (all forks of
//! one, sharing the weights). Continuous batching: every round, the worker admits queued
//! jobs into free slots in arrival order and prefills each new job's prompt alone (one
//! forward pass, which samples its first token); then it advances every job that is
//! generating by one token in ONE batched step ([`Decoder::forward_batch`]: each weight
//! is read once for all of them, each sequence at its own position in its own KV
//! cache). Jobs join and leave the batch between rounds, so a long generation does not
//! hold up a short one and a new request waits at most one round for its prefill.
//!
//! A job's tokens depend only on its own decoder state and its own seeded sampler,
//! never on what else is running: the batched step gives each sequence the logits of
//! its own one-token forward bit for bit (tested in uc-runtime's tests/batch.rs), so
//! every response is identical to the same request served alone (tested at
//! temperature 0 and with seeds, with up to 8 concurrent requests of different prompt
//! lengths). Models the batched step refuses (Mamba's recurrent state) are stepped one
//! job at a time, as is a round whose batched step fails (so only the job at fault
//! gets the error).
//!
//! Prompt cache: a slot's decoder remembers the tokens its KV cache holds. A new job
//! goes to the free slot whose cached prompt shares the longest prefix with its own, and
//! only the rest of its prompt is prefilled ([`Decoder::keep_prefix`], then
//! [`Decoder::prefill`]: any number of tokens with the prefill GEMM's bits; positions
//! written by decode steps are not reused). This is done only where the decoder
//! says a prompt prefilled in pieces has the bits of one prefill
//! ([`Decoder::prefix_reuse_is_exact`]: the integer prefill GEMM and per-row attention),
//! so a reused prefix never changes an answer; elsewhere every prompt is prefilled whole.
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
    /// The most jobs advanced by one batched decode step so far.
    pub peak_batch: AtomicUsize,
    /// Prompt tokens taken from a slot's KV cache instead of being prefilled.
    pub reused_tokens: AtomicUsize,
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
    /// worker thread. `eos` ends a generation without being emitted; `prompt_cache`
    /// lets a job reuse the prompt prefix a slot holds (where that is exact).
    pub fn start(
        loader: Arc<dyn WeightLoader>,
        tokenizer: Arc<Tokenizer>,
        eos: Vec<u32>,
        capacity: usize,
        max_batch: usize,
        prompt_cache: bool,
    ) -> Result<Engine, EngineError> {
        // One copy of the weights: every slot after the first is a fork of it.
        let mut first = Decoder::new(
            loader.clone(),
            DecoderOptions {
                capacity,
                stream_layers: false,
            },
        )?;
        // Generation: the integer prefill GEMM (forks inherit it).
        first.set_fast_prefill(true)?;
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
            .spawn(move || worker(rx, decoders, &tokenizer, &eos, &l, prompt_cache))
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
    prompt_cache: bool,
) {
    let mut free: Vec<usize> = (0..decoders.len()).rev().collect();
    let mut active: Vec<Active> = Vec::new();
    // Reused for top-k selection.
    let mut order: Vec<u32> = Vec::new();
    let batched = decoders.first().is_some_and(Decoder::can_batch);
    loop {
        // Admit waiting jobs into free slots, in arrival order; block only when idle.
        while !free.is_empty() {
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
            // The free slot whose cache shares the longest prefix with the prompt (the
            // most recently freed on ties).
            let shared = |&s: &usize| {
                let held = decoders.get(s).map_or(&[][..], Decoder::tokens);
                held.iter()
                    .zip(&job.prompt)
                    .take_while(|(a, b)| a == b)
                    .count()
            };
            let best = (0..free.len())
                .max_by_key(|&i| (shared(&free[i]), i))
                .unwrap_or(0);
            let slot = free.remove(best);
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
        // Every job's step of this round, in admission order: `None` until it ran.
        let mut steps: Vec<Option<Step>> = Vec::with_capacity(active.len());
        for a in active.iter_mut() {
            steps.push(if a.job.events.is_closed() {
                Some(Step::ClientGone)
            } else if a.last.is_none() || !batched {
                // Prefill alone (and Mamba's decode steps): the bits of a lone request.
                decoders
                    .get_mut(a.slot)
                    .map(|dec| step(a, dec, eos, &mut order, prompt_cache, load))
            } else {
                None
            });
        }
        // One batched step for every generating job still waiting for its step.
        let waiting: Vec<usize> = (0..active.len()).filter(|&i| steps[i].is_none()).collect();
        let logits = match waiting.len() {
            0 | 1 => None,
            _ => batch_forward(&active, &waiting, &mut decoders).ok(),
        };
        if logits.is_some() {
            load.peak_batch.fetch_max(waiting.len(), Ordering::SeqCst);
        }
        match logits {
            Some(logits) => {
                for (&i, l) in waiting.iter().zip(logits) {
                    steps[i] = Some(sample(&mut active[i], l, eos, &mut order));
                }
            }
            // One job, or a batch that failed: each alone (the error goes to its job).
            None => {
                for &i in &waiting {
                    let a = &mut active[i];
                    steps[i] = decoders
                        .get_mut(a.slot)
                        .map(|dec| step(a, dec, eos, &mut order, prompt_cache, load));
                }
            }
        }
        // Free the slots of finished jobs.
        let mut steps = steps.into_iter();
        active.retain(|a| {
            let done = match steps.next().flatten() {
                Some(Step::Continue) => false,
                Some(Step::ClientGone) => {
                    load.cancelled.fetch_add(1, Ordering::SeqCst);
                    true
                }
                Some(Step::Over) | None => true,
            };
            if done {
                free.push(a.slot);
                load.active.fetch_sub(1, Ordering::SeqCst);
            }
            !done
        });
    }
}

/// The logits of one batched decode step of the jobs `active[i]` for `i` in `which`
/// (all generating: their last token not yet run), in that order.
fn batch_forward(
    active: &[Active],
    which: &[usize],
    decoders: &mut [Decoder],
) -> uc_runtime::Result<Vec<Vec<f32>>> {
    let mut by_slot: Vec<Option<&mut Decoder>> = decoders.iter_mut().map(Some).collect();
    let mut slots: Vec<&mut Decoder> = Vec::with_capacity(which.len());
    let mut ids: Vec<u32> = Vec::with_capacity(which.len());
    for &i in which {
        let a = active.get(i);
        let dec = a
            .and_then(|a| by_slot.get_mut(a.slot))
            .and_then(Option::take);
        let (Some(dec), Some(t)) = (dec, a.and_then(|a| a.last)) else {
            return Err(uc_runtime::RuntimeError::InvalidArgument(
                "a batched job without a slot or a token".into(),
            ));
        };
        slots.push(dec);
        ids.push(t);
    }
    Decoder::forward_batch(&mut slots, &ids)
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

/// One forward pass of `a` alone (the prompt's prefill, or its last token) and one
/// sampled token. The prefill runs only the part of the prompt past the prefix the
/// slot's cache can give (with `prompt_cache`).
fn step(
    a: &mut Active,
    dec: &mut Decoder,
    eos: &[u32],
    order: &mut Vec<u32>,
    prompt_cache: bool,
    load: &Load,
) -> Step {
    if a.job.events.is_closed() {
        return Step::ClientGone;
    }
    let logits = match a.last {
        None => {
            let kept = if prompt_cache {
                dec.keep_prefix(&a.job.prompt)
            } else {
                dec.reset();
                0
            };
            load.reused_tokens.fetch_add(kept, Ordering::SeqCst);
            dec.prefill(&a.job.prompt[kept..])
        }
        Some(t) => dec.forward(&[t], Logits::Last),
    };
    match logits {
        Ok(l) => sample(a, l, eos, order),
        Err(e) => {
            let _ = a.job.events.send(Event::Error(e.to_string()));
            Step::Over
        }
    }
}

/// One sampled token for `a` from the logits of its last forward: text and stop
/// sequences, end of generation, events.
fn sample(a: &mut Active, mut logits: Vec<f32>, eos: &[u32], order: &mut Vec<u32>) -> Step {
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
