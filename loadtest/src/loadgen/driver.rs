//! Scheduling: when each request is sent, and for how long a target runs.
//!
//! Closed loop: `concurrency` workers each send their next request as soon
//! as the previous one ends. Open loop: requests are due at a fixed rate
//! whatever the target does; each is timed from when it was due, so a
//! stalled target is charged for the queue it causes (no coordinated
//! omission), and at most `max_in_flight` are outstanding. Both stop after
//! the request budget or at the time cap, whichever comes first; requests
//! still in flight at the cap are cancelled and counted as such.

use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::Mode;
use super::exchange::{self, Call, HttpClient};
use super::report::{Outcome, Recorder};

/// One pass over a target: what to send and within which limits.
pub(crate) struct Pass {
    pub label: String,
    pub client: HttpClient,
    pub call: Call,
    /// Requests to send at most.
    pub requests: u64,
    /// No request starts after this, and none outlives it.
    pub deadline: Instant,
    pub timeout: Duration,
    pub progress: bool,
}

/// Counters the progress line reads once per second.
#[derive(Default)]
struct Progress {
    done: AtomicU64,
    errors: AtomicU64,
}

/// State shared by every request of a pass.
struct Shared {
    pass: Pass,
    recorder: Mutex<Recorder>,
    progress: Progress,
}

/// Runs `pass` under `mode`; returns its samples and how long it took.
pub(crate) async fn run(pass: Pass, mode: Mode) -> (Recorder, Duration) {
    let shared = Arc::new(Shared {
        pass,
        recorder: Mutex::new(Recorder::new()),
        progress: Progress::default(),
    });
    let ticker = shared
        .pass
        .progress
        .then(|| tokio::spawn(report_progress(shared.clone())));

    let started = Instant::now();
    match mode {
        Mode::Closed { concurrency } => closed_loop(&shared, concurrency).await,
        Mode::Rate {
            rate,
            max_in_flight,
        } => open_loop(&shared, rate, max_in_flight).await,
    }
    let elapsed = started.elapsed();

    if let Some(ticker) = ticker {
        ticker.abort();
        let done = shared.progress.done.load(Ordering::Relaxed);
        print_progress(&shared, done as f64 / elapsed.as_secs_f64().max(1e-9), done);
        eprintln!();
    }
    let recorder = std::mem::replace(&mut *shared.lock_recorder(), Recorder::new());
    (recorder, elapsed)
}

async fn closed_loop(shared: &Arc<Shared>, concurrency: usize) {
    let claimed = Arc::new(AtomicU64::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (shared, claimed) = (shared.clone(), claimed.clone());
        workers.spawn(async move {
            while claimed.fetch_add(1, Ordering::Relaxed) < shared.pass.requests {
                let start = Instant::now();
                if start >= shared.pass.deadline {
                    break;
                }
                measure(&shared, start).await;
            }
        });
    }
    while workers.join_next().await.is_some() {}
}

async fn open_loop(shared: &Arc<Shared>, rate: f64, max_in_flight: usize) {
    let slots = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let deadline = shared.pass.deadline;
    let mut due_times = pacer(rate, shared.pass.requests, deadline);

    while let Some(due) = due_times.recv().await {
        let Ok(Ok(slot)) = tokio::time::timeout_at(deadline, slots.clone().acquire_owned()).await
        else {
            break;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            measure(&shared, due).await;
            drop(slot);
        });
    }

    // Every request is bounded by the deadline, so all slots come back by then.
    let all = u32::try_from(max_in_flight.max(1)).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
}

/// Emits each request's due time when it comes due, from a thread of its own.
///
/// Tokio's timer wheel has millisecond resolution, and since requests are timed
/// from when they were due, sleeping on it would charge every request up to a
/// millisecond it never waited at the target. A plain thread sleeping on the OS
/// timer wakes within tens of microseconds, the same for every target measured.
fn pacer(rate: f64, requests: u64, deadline: Instant) -> tokio::sync::mpsc::Receiver<Instant> {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let deadline = deadline.into_std();
    std::thread::spawn(move || {
        let first = std::time::Instant::now();
        for index in 0..requests {
            // Due times come from the schedule, never from when the last send happened.
            let due = first + Duration::from_secs_f64(index as f64 / rate);
            if due >= deadline {
                break;
            }
            std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
            if tx.blocking_send(Instant::from_std(due)).is_err() {
                break;
            }
        }
    });
    rx
}

/// Sends one request timed from `start` and records how it ended.
async fn measure(shared: &Shared, start: Instant) {
    let pass = &shared.pass;
    let limit = (start + pass.timeout).min(pass.deadline);
    let outcome =
        match tokio::time::timeout_at(limit, exchange::send(&pass.client, &pass.call, start)).await
        {
            Ok(Ok(sample)) => Outcome::Done(sample),
            Ok(Err(failure)) => Outcome::Failed(failure),
            Err(_) if limit == pass.deadline => Outcome::Cancelled,
            Err(_) => Outcome::Failed(exchange::Failure::Timeout),
        };

    if matches!(outcome, Outcome::Failed(_)) {
        shared.progress.errors.fetch_add(1, Ordering::Relaxed);
    }
    shared.progress.done.fetch_add(1, Ordering::Relaxed);
    shared.lock_recorder().record(outcome);
}

impl Shared {
    fn lock_recorder(&self) -> std::sync::MutexGuard<'_, Recorder> {
        // Recording is a few histogram updates; a panic mid-way loses at most one sample.
        self.recorder
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Rewrites the progress line on stderr once per second.
async fn report_progress(shared: Arc<Shared>) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.tick().await;
    let mut last = (Instant::now(), 0);
    loop {
        ticks.tick().await;
        let done = shared.progress.done.load(Ordering::Relaxed);
        let now = Instant::now();
        let rate = (done - last.1) as f64 / (now - last.0).as_secs_f64().max(1e-9);
        print_progress(&shared, rate, done);
        last = (now, done);
    }
}

fn print_progress(shared: &Shared, rate: f64, done: u64) {
    let errors = shared.progress.errors.load(Ordering::Relaxed);
    let pass = &shared.pass;
    let mut stderr = std::io::stderr().lock();
    let _ = write!(
        stderr,
        "\r{}: {done}/{} done, {rate:.0} req/s, {errors} errors   ",
        pass.label, pass.requests
    );
    let _ = stderr.flush();
}
