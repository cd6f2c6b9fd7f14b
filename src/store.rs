//! Store: Warden's SQLite database and the write-behind usage log.
//!
//! The request path never touches the database. It hands each finished request's
//! [`UsageRecord`] to a [`UsageLog`], an unbounded channel that never blocks and never
//! wakes anyone: one writer thread sleeps for `server.usage_flush_interval`, then
//! drains the channel and commits what has queued up in one transaction per
//! `server.usage_batch` records (group commit). Waking the writer per record would put
//! a thread switch and a commit on every request's critical path on a small machine.
//! A flush request or shutdown wakes the writer at once; a clean shutdown sends
//! `Shutdown` after the last request has settled, and the writer commits everything
//! before it exits.
//!
//! Readers (the usage API) open their own connection; WAL mode lets them read while
//! the writer writes. They first ask the writer to flush, so a record settled before
//! the query is always in its answer.

mod commit;
pub mod control;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, params};
use rust_decimal::Decimal;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::metering::{Usage, UsageSource};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS usage (
    id            INTEGER PRIMARY KEY,
    request_id    TEXT    NOT NULL,
    agent         TEXT    NOT NULL,
    model         TEXT    NOT NULL,
    provider      TEXT    NOT NULL,
    endpoint      TEXT    NOT NULL,
    stream        INTEGER NOT NULL,
    input_tokens  INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    usage_source  TEXT    NOT NULL,
    cost_usd      TEXT    NOT NULL,
    status        INTEGER NOT NULL,
    outcome       TEXT    NOT NULL,
    latency_ms    REAL    NOT NULL,
    ttft_ms       REAL,
    started_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_by_agent ON usage (agent, started_at_ms);
CREATE INDEX IF NOT EXISTS usage_by_time ON usage (started_at_ms);
";

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the data directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the store's writer thread has stopped")]
    WriterGone,
    #[error("commit failed: {0}")]
    Commit(String),
    #[error("ledger key: {0}")]
    Key(#[from] crate::ledger::KeyError),
    #[error(
        "key rotation recorded as entry {seq} and in use, but its key files are not \
         switched (the next start or rotation finishes it): {source}"
    )]
    RotationUnfinished {
        seq: i64,
        source: crate::ledger::KeyError,
    },
    #[error(
        "ledger entry {seq} is damaged or missing, but a signed checkpoint or a sink's acknowledgement \
         covers the ledger up to entry {vouched}: this is no torn write, so nothing is cut; \
         run `warden ledger verify` and restore the database from a backup"
    )]
    LedgerDamaged { seq: u64, vouched: u64 },
    #[error("cannot start the usage writer thread: {0}")]
    Spawn(std::io::Error),
}

/// One finished request, as it is stored.
#[derive(Debug, Clone)]
pub struct UsageRecord {
    pub request_id: Arc<str>,
    pub agent: Arc<str>,
    pub model: Arc<str>,
    pub provider: Arc<str>,
    pub endpoint: &'static str,
    pub stream: bool,
    pub usage: Usage,
    pub usage_source: UsageSource,
    pub cost: Decimal,
    /// The HTTP status the client received.
    pub status: u16,
    /// How the request ended: `ok`, `upstream_error`, `cut`, `abandoned`, ...
    pub outcome: &'static str,
    pub latency: Duration,
    pub ttft: Option<Duration>,
    pub started_at_ms: i64,
}

enum Command {
    Record(UsageRecord),
    Flush(oneshot::Sender<()>),
    Shutdown,
}

/// The SQLite database file.
#[derive(Clone)]
pub struct Store {
    path: PathBuf,
}

impl Store {
    /// Opens (creating if needed) `warden.db` under `data_dir` and applies the schema.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::CreateDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let store = Store {
            path: data_dir.join("warden.db"),
        };

        let conn = store.connect()?;
        conn.execute_batch(SCHEMA)?;
        Ok(store)
    }

    /// A new connection to the database, for a component that writes its own table.
    pub fn connection(&self) -> Result<Connection, StoreError> {
        self.connect()
    }

    fn connect(&self) -> Result<Connection, StoreError> {
        let conn = Connection::open(&self.path)?;
        // WAL lets readers run beside the writer; NORMAL syncs at checkpoints. The
        // control store's writer raises its own connection to FULL.
        //
        // Limitation: usage records are committed without an fsync, so a power cut
        // (not a killed process) can lose the last moments of them. Budgets are safe:
        // spending is covered by the control store's fsynced leases.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(conn)
    }

    /// Starts the writer thread of the usage log: it commits at most `batch` records
    /// per transaction, every `interval` or when asked to flush.
    pub fn usage_log(&self, batch: usize, interval: Duration) -> Result<UsageLog, StoreError> {
        let conn = self.connect()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let backlog = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            conn,
            rx,
            backlog: Arc::clone(&backlog),
            batch: batch.max(1),
            interval,
        };
        let thread = std::thread::Builder::new()
            .name("usage-writer".into())
            .spawn(move || writer.run())
            .map_err(StoreError::Spawn)?;

        Ok(UsageLog {
            sink: UsageSink {
                tx,
                backlog,
                writer: thread.thread().clone(),
            },
            thread: Some(thread),
        })
    }

    /// Usage records of `agent` (or every agent) started at or after `since_ms`,
    /// newest first, at most `limit` of them, with totals over all that match.
    pub fn query_usage(
        &self,
        agent: Option<&str>,
        since_ms: i64,
        limit: usize,
    ) -> Result<UsageReport, StoreError> {
        let conn = self.connect()?;
        let mut stmt = conn.prepare_cached(
            "SELECT request_id, agent, model, provider, endpoint, stream, input_tokens,
                    cached_tokens, output_tokens, usage_source, cost_usd, status, outcome,
                    latency_ms, ttft_ms, started_at_ms
             FROM usage
             WHERE (?1 IS NULL OR agent = ?1) AND started_at_ms >= ?2
             ORDER BY started_at_ms DESC, id DESC",
        )?;
        let rows = stmt.query_map(params![agent, since_ms], UsageRow::from_row)?;

        let mut report = UsageReport::default();
        for row in rows {
            let row = row?;
            report.totals.add(&row);
            if report.data.len() < limit {
                report.data.push(row);
            } else {
                report.has_more = true;
            }
        }
        Ok(report)
    }
}

/// Records and totals returned by `GET /v1/usage`.
#[derive(Debug, Default, Serialize)]
pub struct UsageReport {
    pub data: Vec<UsageRow>,
    pub has_more: bool,
    pub totals: Totals,
}

/// Sums over every record matching a usage query.
#[derive(Debug, Default, Serialize)]
pub struct Totals {
    pub requests: u64,
    pub input_tokens: u64,
    pub cached_tokens: u64,
    pub output_tokens: u64,
    #[serde(with = "rust_decimal::serde::str")]
    pub cost_usd: Decimal,
}

impl Totals {
    fn add(&mut self, row: &UsageRow) {
        self.requests += 1;
        self.input_tokens += row.input_tokens;
        self.cached_tokens += row.cached_tokens;
        self.output_tokens += row.output_tokens;
        self.cost_usd += row.cost_usd;
    }
}

/// One stored usage record.
#[derive(Debug, Serialize)]
pub struct UsageRow {
    pub request_id: String,
    pub agent: String,
    pub model: String,
    pub provider: String,
    pub endpoint: String,
    pub stream: bool,
    pub input_tokens: u64,
    pub cached_tokens: u64,
    pub output_tokens: u64,
    pub usage_source: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub cost_usd: Decimal,
    pub status: u16,
    pub outcome: String,
    pub latency_ms: f64,
    pub ttft_ms: Option<f64>,
    pub started_at_ms: i64,
}

impl UsageRow {
    fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<UsageRow> {
        let cost: String = row.get(10)?;
        let cost_usd = cost.parse::<Decimal>().map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(10, rusqlite::types::Type::Text, e.into())
        })?;

        Ok(UsageRow {
            request_id: row.get(0)?,
            agent: row.get(1)?,
            model: row.get(2)?,
            provider: row.get(3)?,
            endpoint: row.get(4)?,
            stream: row.get(5)?,
            input_tokens: row.get::<_, i64>(6)? as u64,
            cached_tokens: row.get::<_, i64>(7)? as u64,
            output_tokens: row.get::<_, i64>(8)? as u64,
            usage_source: row.get(9)?,
            cost_usd,
            status: row.get(11)?,
            outcome: row.get(12)?,
            latency_ms: row.get(13)?,
            ttft_ms: row.get(14)?,
            started_at_ms: row.get(15)?,
        })
    }
}

/// The sending side of the usage log: cheap to clone, never blocks.
#[derive(Clone)]
pub struct UsageSink {
    tx: mpsc::UnboundedSender<Command>,
    /// Records queued and not yet committed (or given up on).
    backlog: Arc<AtomicU64>,
    /// The writer thread, woken only for flushes and shutdown.
    writer: std::thread::Thread,
}

impl UsageSink {
    /// Queues a record for the writer. A record sent after shutdown is a bug in the
    /// shutdown order, and is logged as a lost write.
    pub fn record(&self, record: UsageRecord) {
        self.backlog.fetch_add(1, Ordering::Relaxed);
        if let Err(lost) = self.tx.send(Command::Record(record))
            && let Command::Record(record) = lost.0
        {
            self.backlog.fetch_sub(1, Ordering::Relaxed);
            tracing::error!(request.id = %record.request_id, "usage record lost: writer stopped");
        }
    }

    /// Records queued and not yet committed.
    pub fn backlog(&self) -> u64 {
        self.backlog.load(Ordering::Relaxed)
    }

    /// Resolves once every record queued before the call is committed.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Command::Flush(done))
            .map_err(|_| StoreError::WriterGone)?;
        self.writer.unpark();
        wait.await.map_err(|_| StoreError::WriterGone)
    }
}

/// The usage log's writer thread and the channel to it.
pub struct UsageLog {
    sink: UsageSink,
    thread: Option<JoinHandle<()>>,
}

impl UsageLog {
    pub fn sink(&self) -> UsageSink {
        self.sink.clone()
    }

    /// Commits everything queued so far and stops the writer. Call it after the last
    /// request has settled.
    pub fn close(mut self) {
        // The writer only exits on Shutdown, so the send can fail only if it panicked.
        let _ = self.sink.tx.send(Command::Shutdown);
        self.sink.writer.unpark();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("usage writer panicked; records queued at the time are lost");
        }
    }
}

/// The writer thread's state.
struct Writer {
    conn: Connection,
    rx: mpsc::UnboundedReceiver<Command>,
    backlog: Arc<AtomicU64>,
    batch: usize,
    interval: Duration,
}

impl Writer {
    fn run(mut self) {
        let mut pending = Vec::with_capacity(self.batch);
        let mut waiters = Vec::new();

        loop {
            let shutdown = self.drain(&mut pending, &mut waiters);
            self.commit(&mut pending);
            for waiter in waiters.drain(..) {
                let _ = waiter.send(());
            }
            if shutdown {
                return;
            }
            // Records do not wake us; flushes and shutdown unpark us early.
            std::thread::park_timeout(self.interval);
        }
    }

    /// Takes everything queued, committing every full batch; true once shut down.
    fn drain(
        &mut self,
        pending: &mut Vec<UsageRecord>,
        waiters: &mut Vec<oneshot::Sender<()>>,
    ) -> bool {
        let mut shutdown = false;
        loop {
            match self.rx.try_recv() {
                Ok(Command::Record(record)) => pending.push(record),
                Ok(Command::Flush(done)) => waiters.push(done),
                Ok(Command::Shutdown) => shutdown = true,
                Err(mpsc::error::TryRecvError::Empty) => return shutdown,
                Err(mpsc::error::TryRecvError::Disconnected) => return true,
            }
            if pending.len() >= self.batch {
                self.commit(pending);
            }
        }
    }

    fn commit(&mut self, pending: &mut Vec<UsageRecord>) {
        if let Err(e) = insert(&mut self.conn, pending) {
            tracing::error!(error = %e, records = pending.len(), "usage records lost: commit failed");
        }
        self.backlog
            .fetch_sub(pending.len() as u64, Ordering::Relaxed);
        pending.clear();
    }
}

fn insert(conn: &mut Connection, records: &[UsageRecord]) -> Result<(), StoreError> {
    if records.is_empty() {
        return Ok(());
    }

    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO usage (request_id, agent, model, provider, endpoint, stream,
                input_tokens, cached_tokens, output_tokens, usage_source, cost_usd, status,
                outcome, latency_ms, ttft_ms, started_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
        )?;
        for r in records {
            stmt.execute(params![
                &*r.request_id,
                &*r.agent,
                &*r.model,
                &*r.provider,
                r.endpoint,
                r.stream,
                tokens(r.usage.input_tokens),
                tokens(r.usage.cached_tokens),
                tokens(r.usage.output_tokens),
                r.usage_source.as_str(),
                r.cost.to_string(),
                r.status,
                r.outcome,
                r.latency.as_secs_f64() * 1e3,
                r.ttft.map(|t| t.as_secs_f64() * 1e3),
                r.started_at_ms,
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// SQLite integers are signed; token counts never come near the limit.
fn tokens(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(agent: &str, cost: &str, started_at_ms: i64) -> UsageRecord {
        UsageRecord {
            request_id: "req".into(),
            agent: agent.into(),
            model: "m".into(),
            provider: "p".into(),
            endpoint: "chat",
            stream: false,
            usage: Usage {
                input_tokens: 3,
                cached_tokens: 0,
                output_tokens: 4,
            },
            usage_source: UsageSource::Provider,
            cost: cost.parse().unwrap(),
            status: 200,
            outcome: "ok",
            latency: Duration::from_millis(2),
            ttft: None,
            started_at_ms,
        }
    }

    #[tokio::test]
    async fn records_survive_close_and_sum_exactly() {
        let dir = std::env::temp_dir().join(format!("warden-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).unwrap();

        let log = store.usage_log(2, Duration::from_secs(3600)).unwrap();
        let sink = log.sink();
        sink.record(record("a", "0.000000001", 10));
        sink.record(record("a", "0.1", 20));
        sink.record(record("b", "5", 30));
        sink.flush().await.unwrap();
        sink.record(record("a", "0.2", 5));
        log.close();

        let report = store.query_usage(Some("a"), 10, 1).unwrap();
        assert_eq!(report.totals.requests, 2);
        assert_eq!(
            report.totals.cost_usd,
            "0.100000001".parse::<Decimal>().unwrap()
        );
        assert_eq!(report.data.len(), 1);
        assert!(report.has_more);
        assert_eq!(store.query_usage(None, 0, 10).unwrap().totals.requests, 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
