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
//! so a write that fails (or panics) is undone alone and its neighbours in the group
//! still commit. Some SQLite errors (disk full, I/O) roll the whole transaction back by
//! themselves; then the group stops there, as does a group whose commit fails: every
//! write in it is answered with the error, and the state goes back to what it was
//! before the group.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
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
    /// Taken only on drop, which closes the queue and lets the writer finish.
    queue: Option<mpsc::Sender<Box<dyn Job<S>>>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<Stats>,
}

/// What the writer has done. The counters are Prometheus counters, registered by
/// whoever exports them; writes over commits is how well the group commit batches.
pub struct Stats {
    /// Writes handed to the writer (queued, in progress or done).
    pub submitted: AtomicU64,
    /// Transactions committed or attempted, each one fsync.
    pub groups: IntCounter,
    /// Writes taken into a commit, whether the commit then succeeded or not.
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
            queue: Some(queue),
            thread: Some(thread),
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
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
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
        if let Err(error) = job.apply(&mut tx, state)
            && tx.is_autocommit()
        {
            // SQLite rolled the transaction back: a later write's savepoint would
            // commit on its own, outside the group.
            return Err(format!("the transaction was rolled back: {error}"));
        }
    }
    tx.commit().map_err(|e| e.to_string())
}

/// One queued write, its type erased so writes of any result type share the queue.
trait Job<S>: Send {
    /// Runs the write in its own savepoint of the group's transaction; its error, if
    /// it failed.
    fn apply(&mut self, tx: &mut Transaction<'_>, state: &mut S) -> Result<(), String>;

    /// Answers the caller once the group's commit is known.
    fn answer(self: Box<Self>, committed: &Result<(), String>);
}

struct Call<T, F> {
    write: Option<F>,
    /// The write's result once applied; it stands only if its group commits.
    outcome: Option<Result<T, StoreError>>,
    reply: mpsc::SyncSender<Result<T, StoreError>>,
}

impl<S, T, F> Job<S> for Call<T, F>
where
    S: Clone,
    T: Send,
    F: FnOnce(&Connection, &mut S) -> Result<T, StoreError> + Send,
{
    fn apply(&mut self, tx: &mut Transaction<'_>, state: &mut S) -> Result<(), String> {
        let Some(write) = self.write.take() else {
            return Ok(());
        };
        let before = state.clone();
        let outcome = tx.savepoint().map_err(StoreError::from).and_then(|sp| {
            // A panicking write fails alone instead of taking the writer thread down.
            let value = std::panic::catch_unwind(AssertUnwindSafe(|| write(&sp, state)))
                .unwrap_or_else(|_| Err(StoreError::Commit("the write panicked".into())))?;
            sp.commit()?;
            Ok(value)
        });

        let error = outcome.as_ref().err().map(ToString::to_string);
        if error.is_some() {
            *state = before;
        }
        self.outcome = Some(outcome);
        error.map_or(Ok(()), Err)
    }

    fn answer(self: Box<Self>, committed: &Result<(), String>) {
        let result = match committed {
            Err(error) => Err(StoreError::Commit(error.clone())),
            Ok(()) => self.outcome.unwrap_or(Err(StoreError::WriterGone)),
        };
        let _ = self.reply.send(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Write = Box<dyn FnOnce(&Connection, &mut u64) -> Result<u64, StoreError> + Send>;

    fn committer() -> Arc<Committer<u64>> {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (n INTEGER PRIMARY KEY); CREATE TABLE b (data BLOB);")
            .unwrap();
        Arc::new(Committer::start(conn, 0).unwrap())
    }

    /// Inserts `n` and counts it in the state; returns the count.
    fn insert(n: u64) -> Write {
        Box::new(move |conn, count| {
            conn.execute("INSERT INTO t (n) VALUES (?1)", [n as i64])?;
            *count += 1;
            Ok(*count)
        })
    }

    fn rows(committer: &Committer<u64>) -> Vec<u64> {
        committer
            .write(|conn, _| {
                let mut stmt = conn.prepare("SELECT n FROM t ORDER BY n")?;
                let rows = stmt.query_map([], |r| r.get::<_, i64>(0))?;
                Ok(rows.map(|n| n.unwrap() as u64).collect())
            })
            .unwrap()
    }

    /// Runs `writes` as one group: a first write holds the writer until all of them
    /// are queued, in order. Returns their results in order.
    fn grouped(
        committer: &Arc<Committer<u64>>,
        writes: Vec<Write>,
    ) -> Vec<Result<u64, StoreError>> {
        let groups = committer.stats().groups.get();
        let mut queued = committer.stats().submitted.load(Ordering::Relaxed) + 1;
        let (started, running) = mpsc::channel::<()>();
        let (held, release) = mpsc::channel::<()>();
        let blocker = {
            let committer = Arc::clone(committer);
            std::thread::spawn(move || {
                committer.write(move |_, _| {
                    started.send(()).unwrap();
                    release.recv().unwrap();
                    Ok(0)
                })
            })
        };
        running.recv().unwrap();

        let writers: Vec<_> = writes
            .into_iter()
            .map(|write| {
                let writer = {
                    let committer = Arc::clone(committer);
                    std::thread::spawn(move || committer.write(write))
                };
                queued += 1;
                while committer.stats().submitted.load(Ordering::Relaxed) < queued {
                    std::thread::yield_now();
                }
                writer
            })
            .collect();
        held.send(()).unwrap();

        blocker.join().unwrap().unwrap();
        let results = writers.into_iter().map(|w| w.join().unwrap()).collect();
        assert_eq!(
            committer.stats().groups.get(),
            groups + 2,
            "the held write alone, then the others together"
        );
        results
    }

    /// Writes that queue while a group commits go into the next group together.
    #[test]
    fn queued_writes_share_one_commit() {
        let committer = committer();
        let results = grouped(&committer, (1..=20).map(insert).collect());

        let counts: Vec<u64> = results.into_iter().map(Result::unwrap).collect();
        assert_eq!(counts, (1..=20).collect::<Vec<_>>());
        assert_eq!(rows(&committer), (1..=20).collect::<Vec<_>>());
    }

    /// A failing write is undone alone, its state change too; its neighbours in the
    /// same group commit.
    #[test]
    fn a_failed_write_is_undone_alone() {
        let committer = committer();
        let duplicate: Write = Box::new(|conn, count| {
            insert(2)(conn, count)?;
            insert(1)(conn, count)
        });
        let results = grouped(&committer, vec![insert(1), duplicate, insert(3)]);

        assert_eq!(results[0].as_ref().unwrap(), &1);
        assert!(results[1].is_err(), "the second insert of 1 collides");
        assert_eq!(
            results[2].as_ref().unwrap(),
            &2,
            "the failed write's count is undone"
        );
        assert_eq!(rows(&committer), [1, 3], "row 2 went with its failed write");
    }

    /// A panicking write fails alone; the writer lives on.
    #[test]
    fn a_panicking_write_fails_alone() {
        let committer = committer();
        let panics: Write = Box::new(|_, _| panic!("a bug in a write"));
        let results = grouped(&committer, vec![insert(1), panics, insert(2)]);

        assert!(results[0].is_ok() && results[1].is_err() && results[2].is_ok());
        assert_eq!(rows(&committer), [1, 2]);
    }

    /// When SQLite rolls the transaction back by itself (here: the database is full),
    /// no later write of the group commits on its own: the whole group fails, the
    /// state is as before, and the next group goes on from there.
    #[test]
    fn a_transaction_rolled_back_by_sqlite_fails_the_whole_group() {
        let committer = committer();
        committer
            .write(|conn, _| {
                let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
                conn.query_row(
                    &format!("PRAGMA max_page_count = {}", pages + 4),
                    [],
                    |_| Ok(()),
                )?;
                Ok(0)
            })
            .unwrap();
        let too_big: Write = Box::new(|conn, _| {
            conn.execute("INSERT INTO b (data) VALUES (zeroblob(1000000))", [])?;
            Ok(0)
        });
        let results = grouped(&committer, vec![insert(1), too_big, insert(2)]);

        assert!(results.iter().all(Result::is_err), "{results:?}");
        assert_eq!(rows(&committer), Vec::<u64>::new());
        assert_eq!(committer.write(|conn, c| insert(3)(conn, c)).unwrap(), 1);
        assert_eq!(rows(&committer), [3]);
    }
}
