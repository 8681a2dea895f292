//! A small team of spinning worker threads for the decode step.
//!
//! Decoding one token runs ~150 short parallel loops (a few microseconds each). With
//! rayon, idle workers fall asleep between them and each loop pays a futex wake-up
//! (tens of microseconds on a VM: measured ~47 sleeps per token, a third of the step).
//! Team workers instead spin on an epoch counter for a few milliseconds after each job,
//! so consecutive loops start within nanoseconds; after that they park, so an idle
//! process burns nothing. Prefill keeps using rayon (long loops, no such cost).
//!
//! [`Team::run`] hands `f(worker)` to every worker (the caller is worker 0) and returns
//! when all have finished; callers share work through an atomic counter
//! ([`Team::for_each`]).

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking.
const SPIN: Duration = Duration::from_millis(3);
/// After this long, spinning threads (worker waiting for a job, leader waiting for the
/// workers) also yield the CPU on every check. Why: on a machine shared with other
/// processes, a spinning thread can hold the core the thread it waits for needs; pure
/// spinning then made each of the ~150 loops of a token wait for a scheduler tick
/// (measured: 2-thread decode at 1.8 tok/s while another process used one core).
/// Unloaded, loops follow each other well within this, so nothing changes there.
const PURE_SPIN: Duration = Duration::from_micros(50);

type Job = *const (dyn Fn(usize) + Sync + 'static);

struct Shared {
    /// Bumped once per job; workers run the job when they see it change.
    epoch: AtomicU64,
    /// The current job. Written by the leader before the epoch bump (Release), read by
    /// workers after seeing the bump (Acquire).
    job: UnsafeCell<Option<Job>>,
    /// Workers (not counting the leader) still running the current job.
    remaining: AtomicUsize,
    /// Workers parked or about to park.
    sleepers: AtomicUsize,
    /// A worker's job panicked.
    panicked: AtomicBool,
    stop: AtomicBool,
}

// SAFETY: `job` is only written by the leader while no job is running (remaining == 0,
// all workers past their last read) and read by workers between an Acquire of the new
// epoch and their Release decrement of `remaining`.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// Spinning worker threads; see the module documentation.
pub struct Team {
    shared: Arc<Shared>,
    workers: Vec<(JoinHandle<()>, Thread)>,
    /// One job at a time: `run` is not reentrant across threads.
    lock: Mutex<()>,
}

impl Team {
    /// A team of `threads` (the caller of [`Team::run`] counts as one).
    pub fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            remaining: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let workers = (1..threads.max(1))
            .filter_map(|w| {
                let s = shared.clone();
                let h = std::thread::Builder::new()
                    .name(format!("uc-team-{w}"))
                    .spawn(move || worker(&s, w))
                    .ok()?;
                let t = h.thread().clone();
                Some((h, t))
            })
            .collect();
        Team {
            shared,
            workers,
            lock: Mutex::new(()),
        }
    }

    /// The process-wide team, sized like the rayon pool.
    pub fn global() -> &'static Team {
        static TEAM: OnceLock<Team> = OnceLock::new();
        TEAM.get_or_init(|| Team::new(rayon::current_num_threads()))
    }

    /// Threads, the caller included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(w)` on every worker `w` in `0 .. threads()` (0 on the calling thread) and
    /// returns when all calls have returned.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let s = &self.shared;
        if !self.workers.is_empty() {
            // SAFETY: the lifetime is extended to 'static only for the duration of this
            // call: we wait below until every worker has finished with the pointer
            // (remaining == 0) before returning, and no worker touches it afterwards.
            let job: Job =
                unsafe { std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), Job>(f) };
            // SAFETY: no job is running (the previous `run` waited for remaining == 0).
            unsafe { *s.job.get() = Some(job) };
            s.remaining.store(self.workers.len(), Ordering::Relaxed);
            s.epoch.fetch_add(1, Ordering::Release);
            if s.sleepers.load(Ordering::Acquire) > 0 {
                self.workers.iter().for_each(|(_, t)| t.unpark());
            }
        }
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(0)));
        let mut spins = 0u32;
        let mut since: Option<Instant> = None;
        while s.remaining.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64)
                && since.get_or_insert_with(Instant::now).elapsed() > PURE_SPIN
            {
                std::thread::yield_now();
            }
        }
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, Ordering::AcqRel) {
            panic!("a team worker panicked");
        }
    }

    /// Calls `f(i)` for every `i` in `0 .. n`, spread over the team by an atomic counter.
    pub fn for_each(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if n == 0 {
            return;
        }
        if n == 1 || self.workers.is_empty() {
            (0..n).for_each(f);
            return;
        }
        let next = AtomicUsize::new(0);
        self.run(&|_| loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            f(i);
        });
    }
}

fn worker(s: &Shared, w: usize) {
    let mut seen = 0u64;
    loop {
        // Spin for a while, then park until woken.
        let start = Instant::now();
        let mut spins = 0u32;
        let epoch = loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen || s.stop.load(Ordering::Relaxed) {
                break e;
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) && start.elapsed() > PURE_SPIN {
                std::thread::yield_now();
            }
            if spins.is_multiple_of(1024) && start.elapsed() > SPIN {
                s.sleepers.fetch_add(1, Ordering::AcqRel);
                // Re-check after announcing: the leader unparks whenever it sees a sleeper.
                while s.epoch.load(Ordering::Acquire) == seen && !s.stop.load(Ordering::Relaxed) {
                    std::thread::park();
                }
                s.sleepers.fetch_sub(1, Ordering::AcqRel);
            }
        };
        if s.stop.load(Ordering::Relaxed) {
            return;
        }
        seen = epoch;
        // SAFETY: read after the Acquire of the new epoch, before our Release decrement;
        // the leader keeps the closure alive until remaining reaches 0.
        if let Some(job) = unsafe { *s.job.get() } {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { (*job)(w) }));
            if r.is_err() {
                s.panicked.store(true, Ordering::Release);
            }
        }
        s.remaining.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for (h, t) in self.workers.drain(..) {
            t.unpark();
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn for_each_visits_every_index_once_across_many_jobs() {
        let team = Team::new(3);
        for n in [0, 1, 2, 7, 100, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            team.for_each(n, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n={n}");
        }
    }

    #[test]
    fn parked_workers_wake_for_the_next_job() {
        let team = Team::new(2);
        std::thread::sleep(SPIN * 3); // let the worker park
        let seen = AtomicUsize::new(0);
        team.run(&|w| {
            seen.fetch_add(w + 1, Ordering::Relaxed);
        });
        assert_eq!(seen.load(Ordering::Relaxed), 1 + 2);
    }

    #[test]
    fn a_panicking_job_is_reported_to_the_caller() {
        let team = Team::new(2);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            team.run(&|w| assert!(w == 0, "worker {w}"))
        }));
        assert!(r.is_err());
        // The team still works afterwards.
        let n = AtomicUsize::new(0);
        team.for_each(10, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 10);
    }
}
