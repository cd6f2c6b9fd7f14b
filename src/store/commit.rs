//! Group commit for the control store.
//!
//! Every control write (a spawn with its ledger entry, a termination, a lease) must be
//! durable before its caller acknowledges anything, and the ledger needs one writer so
//! entries chain in order. One thread owns the write connection; callers hand it their
//! write and block until it is committed. While the thread commits one group, the
//! writes that arrive queue up, and the next transaction takes all of them: under load
//! many decisions share one commit (and one fsync), alone a write commits at once,
//! never waiting for company.
//!
//! Each write runs in its own savepoint with a copy of the writer's state taken first,
//! so a write that fails is undone alone and its neighbours in the group still commit.
//! A group whose commit fails is answered with the error, every write in it, and the
//! state goes back to what it was before the group.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use prometheus::IntCounter;
use rusqlite::{Connection, Transaction, TransactionBehavior};

use super::StoreError;

/// At most this many writes share one transaction, so one group cannot hold the
/// writer (and the callers at its head) for long.
const MAX_GROUP: usize = 256;

/// The writer thread, and the queue into it. `S` is the state the writes keep beside
/// the database (for the ledger: its tail, Merkle frontier and signing key).
pub struct Committer<S> {
    queue: Mutex<Option<mpsc::Sender<Box<dyn Job<S>>>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<Stats>,
}

/// What the writer has done. The counters are Prometheus counters, registered by
/// whoever exports them; writes over commits is how well the group commit batches.
pub struct Stats {
    /// Writes handed to the writer (queued, in progress or done).
    pub submitted: AtomicU64,
    /// Transactions committed or attempted, each one fsync.
    pub groups: IntCounter,
    /// Writes applied.
    pub writes: IntCounter,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            submitted: AtomicU64::new(0),
            groups: IntCounter::new(
                "warden_control_commits_total",
                "Control-store transactions committed or attempted, each fsynced.",
            )
            .expect("static metric definition is valid"),
            writes: IntCounter::new(
                "warden_control_writes_total",
                "Control-store writes (decisions, agent changes, budget leases), grouped into commits.",
            )
            .expect("static metric definition is valid"),
        }
    }
}

impl<S: Clone + Send + 'static> Committer<S> {
    /// Starts the writer thread on `conn`, with the writes' state `state`.
    pub fn start(conn: Connection, state: S) -> Result<Committer<S>, StoreError> {
        let (queue, jobs) = mpsc::channel();
        let stats = Arc::new(Stats::default());
        let counted = Arc::clone(&stats);
        let thread = std::thread::Builder::new()
            .name("warden-commit".into())
            .spawn(move || run(conn, state, &jobs, &counted))
            .map_err(StoreError::Spawn)?;
        Ok(Committer {
            queue: Mutex::new(Some(queue)),
            thread: Mutex::new(Some(thread)),
            stats,
        })
    }

    /// Applies `write` in the next group and returns its result once that group is
    /// committed. Blocking: call it off the async threads.
    pub fn write<T, F>(&self, write: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &mut S) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = mpsc::sync_channel(1);
        let job = Box::new(Call {
            write: Some(write),
            outcome: None,
            reply,
        });
        let sent = self
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|queue| queue.send(job).is_ok());
        if !sent {
            return Err(StoreError::WriterGone);
        }
        self.stats.submitted.fetch_add(1, Ordering::Relaxed);
        answer.recv().map_err(|_| StoreError::WriterGone)?
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

impl Stats {
    /// Writes handed over and not yet applied: the writer's queue.
    pub fn queued(&self) -> u64 {
        let submitted = self.submitted.load(Ordering::Relaxed);
        submitted.saturating_sub(self.writes.get())
    }
}

impl<S> Drop for Committer<S> {
    /// Lets the writer finish what is queued and close its connection.
    fn drop(&mut self) {
        drop(self.queue.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(thread) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = thread.join();
        }
    }
}

/// The writer's loop: take what has queued, commit it as one group, answer everyone.
fn run<S: Clone>(
    mut conn: Connection,
    mut state: S,
    jobs: &mpsc::Receiver<Box<dyn Job<S>>>,
    stats: &Stats,
) {
    while let Ok(first) = jobs.recv() {
        let mut group = vec![first];
        group.extend(jobs.try_iter().take(MAX_GROUP - 1));

        let before = state.clone();
        let committed = commit(&mut conn, &mut state, &mut group);
        if let Err(error) = &committed {
            tracing::error!(writes = group.len(), %error, "control store commit failed");
            state = before;
        }
        stats.groups.inc();
        stats.writes.inc_by(group.len() as u64);

        for job in group {
            job.answer(&committed);
        }
    }
}

/// Applies every write of `group` in one transaction and commits it.
fn commit<S: Clone>(
    conn: &mut Connection,
    state: &mut S,
    group: &mut [Box<dyn Job<S>>],
) -> Result<(), String> {
    // IMMEDIATE takes the write lock at the start, waiting on the busy timeout if the
    // usage writer holds it, instead of failing when a read turns into a write.
    let mut tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| e.to_string())?;
    for job in group.iter_mut() {
        job.apply(&mut tx, state);
    }
    tx.commit().map_err(|e| e.to_string())
}

/// One queued write, its type erased so writes of any result type share the queue.
trait Job<S>: Send {
    /// Runs the write in its own savepoint of the group's transaction.
    fn apply(&mut self, tx: &mut Transaction<'_>, state: &mut S);

    /// Answers the caller once the group's commit is known.
    fn answer(self: Box<Self>, committed: &Result<(), String>);
}

struct Call<T, F> {
    write: Option<F>,
    outcome: Option<Result<T, StoreError>>,
    reply: mpsc::SyncSender<Result<T, StoreError>>,
}

impl<S, T, F> Job<S> for Call<T, F>
where
    S: Clone,
    T: Send,
    F: FnOnce(&Connection, &mut S) -> Result<T, StoreError> + Send,
{
    fn apply(&mut self, tx: &mut Transaction<'_>, state: &mut S) {
        let Some(write) = self.write.take() else {
            return;
        };
        let before = state.clone();
        let outcome = tx.savepoint().map_err(StoreError::from).and_then(|sp| {
            let value = write(&sp, state)?;
            sp.commit()?;
            Ok(value)
        });
        if outcome.is_err() {
            *state = before;
        }
        self.outcome = Some(outcome);
    }

    fn answer(self: Box<Self>, committed: &Result<(), String>) {
        let result = match (committed, self.outcome) {
            (Ok(()), Some(outcome)) => outcome,
            (Err(error), _) => Err(StoreError::Commit(error.clone())),
            (Ok(()), None) => Err(StoreError::WriterGone),
        };
        let _ = self.reply.send(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committer() -> Committer<u64> {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (n INTEGER PRIMARY KEY)")
            .unwrap();
        Committer::start(conn, 0).unwrap()
    }

    fn insert(conn: &Connection, count: &mut u64, n: u64) -> Result<u64, StoreError> {
        conn.execute("INSERT INTO t (n) VALUES (?1)", [n as i64])?;
        *count += 1;
        Ok(*count)
    }

    /// Writes that queue while a group commits go into the next group together.
    #[test]
    fn queued_writes_share_one_commit() {
        let committer = Arc::new(committer());
        let (started, running) = mpsc::channel::<()>();
        let (held, release) = mpsc::channel::<()>();
        let blocker = {
            let committer = Arc::clone(&committer);
            std::thread::spawn(move || {
                committer.write(move |conn, count| {
                    started.send(()).unwrap();
                    release.recv().unwrap();
                    insert(conn, count, 0)
                })
            })
        };
        running.recv().unwrap();

        let writers: Vec<_> = (1..=20)
            .map(|n| {
                let committer = Arc::clone(&committer);
                std::thread::spawn(move || committer.write(move |conn, c| insert(conn, c, n)))
            })
            .collect();
        while committer.stats().submitted.load(Ordering::Relaxed) < 21 {
            std::thread::yield_now();
        }
        held.send(()).unwrap();

        assert_eq!(blocker.join().unwrap().unwrap(), 1);
        let mut counts: Vec<u64> = writers
            .into_iter()
            .map(|w| w.join().unwrap().unwrap())
            .collect();
        counts.sort();
        assert_eq!(counts, (2..=21).collect::<Vec<_>>());
        assert_eq!(committer.stats().writes.get(), 21);
        assert_eq!(
            committer.stats().groups.get(),
            2,
            "the blocked write alone, then the twenty that queued behind it"
        );
    }

    /// A failing write is undone alone: its state change too, and its neighbours commit.
    #[test]
    fn a_failed_write_is_undone_alone() {
        let committer = committer();
        committer.write(|conn, c| insert(conn, c, 1)).unwrap();

        let duplicate = committer.write(|conn, c| {
            insert(conn, c, 2)?;
            insert(conn, c, 1)
        });
        assert!(duplicate.is_err(), "the second insert collides");

        assert_eq!(committer.write(|conn, c| insert(conn, c, 3)).unwrap(), 2);
        let rows: i64 = committer
            .write(|conn, _| Ok(conn.query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))?))
            .unwrap();
        assert_eq!(rows, 2, "row 2 went with its failed write");
    }
}
