//! SIEM sinks: every ledger entry delivered to the operator's security tooling, with
//! nothing lost while a sink is down.
//!
//! The ledger is the outbox. Each sink has a durable cursor (the last sequence number
//! it acknowledged); a delivery task reads the entries after it, sends them in order,
//! and moves the cursor only when the receiver acknowledged them (a 2xx, with every
//! item of an Elastic `_bulk` answer read, see [`bulk_outcome`]; or the file written
//! and synced). A sink that is down is retried with exponential backoff and jitter,
//! and picks up where its cursor stopped, also after a crash: delivery is at least
//! once, and every event carries a stable id receivers can drop duplicates by. The
//! ledger is never pruned, so nothing above any cursor can disappear.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rusqlite::{OptionalExtension, params};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::ledger::{ExportLine, StoredEntry};
use crate::store::control::{LedgerQuery, query_ledger};
use crate::store::{Store, StoreError};

/// A sink as configured in `[[sinks]]`. A key the sink's kind does not know is
/// refused (a misspelt `token_env` would otherwise send events without the token).
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "toml::Table")]
pub struct SinkConfig {
    pub name: String,
    pub kind: SinkKind,
    /// Most entries per delivery.
    pub batch: usize,
}

/// The table as serde reads it; `kind` is flattened, which rules out serde's own
/// refusal of unknown keys, so [`SinkConfig`] checks them first.
#[derive(Deserialize)]
struct SinkTable {
    name: String,
    #[serde(flatten)]
    kind: SinkKind,
    #[serde(default = "default_batch")]
    batch: usize,
}

impl TryFrom<toml::Table> for SinkConfig {
    type Error = String;

    fn try_from(table: toml::Table) -> Result<SinkConfig, String> {
        let kind = table
            .get("kind")
            .and_then(toml::Value::as_str)
            .unwrap_or("");
        // The keys of each kind's fields in `SinkKind`; an unknown kind is left to
        // serde, which names the kinds there are.
        let keys: &[&str] = match kind {
            "webhook" => &["url", "format", "token_env", "index"],
            "file" => &["path", "max_bytes"],
            "syslog" => &["address", "tls", "server_name"],
            _ => return SinkTable::read(table),
        };
        let common = ["name", "kind", "batch"];
        if let Some(unknown) = table
            .keys()
            .find(|key| !common.contains(&key.as_str()) && !keys.contains(&key.as_str()))
        {
            let name = table
                .get("name")
                .and_then(toml::Value::as_str)
                .unwrap_or("?");
            return Err(format!(
                "sink {name}: unknown key `{unknown}` for a `{kind}` sink (known: {})",
                common
                    .iter()
                    .chain(keys)
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }

        SinkTable::read(table)
    }
}

impl SinkTable {
    fn read(table: toml::Table) -> Result<SinkConfig, String> {
        let sink: SinkTable = table
            .try_into()
            .map_err(|e: toml::de::Error| e.to_string())?;
        Ok(SinkConfig {
            name: sink.name,
            kind: sink.kind,
            batch: sink.batch,
        })
    }
}

fn default_batch() -> usize {
    100
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SinkKind {
    /// An HTTP endpoint: JSON lines, Splunk HEC or Elastic `_bulk`.
    Webhook {
        url: String,
        #[serde(default)]
        format: WebhookFormat,
        /// Environment variable holding the receiver's token, if it needs one.
        token_env: Option<String>,
        /// The Elastic index to write to.
        #[serde(default = "default_index")]
        index: String,
    },
    /// A JSON-lines file of OCSF events, rotated at `max_bytes`.
    File {
        path: PathBuf,
        #[serde(default = "default_max_bytes")]
        max_bytes: u64,
    },
    /// RFC 5424 syslog over TCP (RFC 6587 octet counting), optionally over TLS.
    ///
    /// Limitation: TCP syslog has no application acknowledgement, so a batch counts as
    /// delivered once it is written and flushed to the receiver's socket.
    Syslog {
        /// `host:port` of the receiver.
        address: String,
        #[serde(default)]
        tls: bool,
        /// The name to check the receiver's certificate against; default: the host.
        server_name: Option<String>,
    },
}

fn default_index() -> String {
    "warden-ledger".into()
}

fn default_max_bytes() -> u64 {
    64 << 20
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFormat {
    /// One OCSF event per line.
    #[default]
    Jsonl,
    /// Splunk HTTP Event Collector: `{"event": ..}` per line, `Authorization: Splunk`.
    SplunkHec,
    /// Elastic `_bulk`: an `index` action with the event id, then the event.
    ElasticBulk,
}

/// A ledger entry as an OCSF API Activity event (class 6003), with the entry itself
/// (and its hash and signature) kept under `unmapped` so a receiver can verify it.
pub fn ocsf_event(entry: &StoredEntry, ledger_id: &str) -> Value {
    let line = ExportLine::of(entry);
    let time_ms = line.entry["time"]
        .as_str()
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as i64);
    json!({
        "class_uid": 6003,
        "class_name": "API Activity",
        "category_uid": 6,
        "activity_name": line.entry["kind"],
        "severity_id": 1,
        "time": time_ms,
        "actor": {"user": {"uid": line.entry["actor"]}},
        "resources": [{"uid": line.entry["subject"], "type": "agent"}],
        "metadata": {
            "uid": event_id(ledger_id, entry.seq),
            "version": "1.1.0",
            "product": {"name": "Warden", "vendor_name": "Warden"},
            "sequence": entry.seq,
        },
        "unmapped": line,
    })
}

/// A stable id per entry: receivers drop duplicates by it.
pub fn event_id(ledger: &str, seq: u64) -> String {
    format!("warden-{ledger}-{seq}")
}

/// Why a delivery failed; the batch is retried.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("receiver answered {0}")]
    Status(u16),
    #[error("receiver refused {refused} of {sent} events, first: {first}")]
    Refused {
        refused: usize,
        sent: usize,
        first: String,
    },
    #[error(
        "receiver refused all {} events as unindexable, first: {}; the first goes alone next",
        .0.len(),
        .0.first().map_or("-", |r| r.id.as_str())
    )]
    AllUnindexable(Vec<Refusal>),
    #[error("receiver's answer unreadable: {0}")]
    Answer(String),
    #[error("receiver unreachable: {0}")]
    Unreachable(String),
    #[error("file: {0}")]
    File(#[from] std::io::Error),
    #[error("{0}")]
    Setup(String),
}

/// One sink's delivery state.
pub struct Sink {
    config: SinkConfig,
    store: Store,
    http: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// The ledger's identity, part of every event id: the start of its first entry's
    /// hash, which no key rotation or restart changes.
    ledger_id: std::sync::OnceLock<String>,
    /// Set when a whole batch was refused as unindexable: the next delivery sends only
    /// its first event, so one bad event cannot hold up the sink (see [`Sink::post`]).
    probing: AtomicBool,
    /// Events skipped that way since the receiver last accepted one.
    blind_skips: AtomicU32,
    metrics: SinkMetrics,
}

/// Events refused alone that are skipped in a row, with nothing accepted in between,
/// before the sink stops skipping: past that, the index is more likely broken than
/// the events, and the sink waits (its lag grows) rather than drop the stream.
const MAX_BLIND_SKIPS: u32 = 3;

/// One sink's metrics.
pub struct SinkMetrics {
    /// Ledger entries not acknowledged yet.
    pub lag: prometheus::IntGauge,
    /// Entries the receiver refused for good, skipped (see [`bulk_outcome`]).
    pub dropped: prometheus::IntCounter,
}

impl Sink {
    pub fn new(config: SinkConfig, store: Store, metrics: SinkMetrics) -> Sink {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(rustls::ClientConfig::clone(&crate::proxy::tls_config()))
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Sink {
            config,
            store,
            http: Client::builder(TokioExecutor::new()).build(https),
            ledger_id: std::sync::OnceLock::new(),
            probing: AtomicBool::new(false),
            blind_skips: AtomicU32::new(0),
            metrics,
        }
    }

    /// Delivers forever: entries after the cursor, in order, retrying with backoff.
    pub async fn run(self) {
        let sink = Arc::new(self);
        let mut backoff = Backoff::default();
        loop {
            match sink.deliver_next().await {
                Ok(0) => {
                    backoff.reset();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(_) => backoff.reset(),
                Err(e) => {
                    let wait = backoff.next();
                    tracing::warn!(sink = %sink.config.name, error = %e, retry_ms = wait.as_millis() as u64, "sink delivery failed");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Sends the next batch; returns how many entries were delivered.
    async fn deliver_next(self: &Arc<Self>) -> Result<usize, SinkError> {
        let (cursor, entries, last) = self.pending().await?;
        self.metrics.lag.set(last.saturating_sub(cursor) as i64);
        let Some(newest) = entries.last().map(|e| e.seq) else {
            return Ok(0);
        };

        let ledger_id = self.ledger_id().await?;
        let events: Vec<Value> = entries.iter().map(|e| ocsf_event(e, &ledger_id)).collect();
        match &self.config.kind {
            SinkKind::Webhook {
                url,
                format,
                token_env,
                index,
            } => {
                self.post(url, *format, token_env.as_deref(), index, &events)
                    .await?;
            }
            SinkKind::Syslog {
                address,
                tls,
                server_name,
            } => {
                let frames: Vec<u8> = entries
                    .iter()
                    .zip(&events)
                    .flat_map(|(entry, event)| syslog_frame(entry, event).into_bytes())
                    .collect();
                send_syslog(address, *tls, server_name.as_deref(), &frames).await?;
            }
            SinkKind::File { path, max_bytes } => {
                let (path, max_bytes) = (path.clone(), *max_bytes);
                tokio::task::spawn_blocking(move || append_file(&path, max_bytes, &events))
                    .await
                    .map_err(|e| SinkError::Setup(e.to_string()))??;
            }
        }

        self.advance(newest).await?;
        self.probing.store(false, Ordering::Relaxed);
        self.metrics.lag.set(last.saturating_sub(newest) as i64);
        Ok(entries.len())
    }

    /// The ledger's id (see the field), read once.
    async fn ledger_id(self: &Arc<Self>) -> Result<String, SinkError> {
        if let Some(id) = self.ledger_id.get() {
            return Ok(id.clone());
        }
        let sink = Arc::clone(self);
        let id: String = tokio::task::spawn_blocking(move || {
            let conn = sink.store.connection()?;
            conn.query_row("SELECT hash FROM ledger WHERE seq = 1", [], |r| {
                r.get::<_, String>(0)
            })
            .map_err(StoreError::from)
        })
        .await
        .map_err(|e| SinkError::Setup(e.to_string()))??;
        Ok(self
            .ledger_id
            .get_or_init(|| id.chars().take(16).collect())
            .clone())
    }

    /// The cursor, the entries after it (one batch) and the ledger's last sequence number.
    async fn pending(self: &Arc<Self>) -> Result<(u64, Vec<StoredEntry>, u64), SinkError> {
        let sink = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let conn = sink.store.connection()?;
            let cursor: u64 = conn
                .query_row(
                    "SELECT seq FROM sink_cursors WHERE sink = ?1",
                    [&sink.config.name],
                    |r| r.get::<_, i64>(0),
                )
                .optional()
                .map_err(StoreError::from)?
                .map_or(0, |s| s as u64);
            let last: i64 = conn
                .query_row("SELECT COALESCE(MAX(seq), 0) FROM ledger", [], |r| r.get(0))
                .map_err(StoreError::from)?;
            let query = LedgerQuery {
                after: cursor,
                limit: if sink.probing.load(Ordering::Relaxed) {
                    1
                } else {
                    sink.config.batch.max(1)
                },
                ..LedgerQuery::default()
            };
            Ok((cursor, query_ledger(&conn, &query)?, last as u64))
        })
        .await
        .map_err(|e| SinkError::Setup(e.to_string()))?
    }

    /// Moves the cursor durably after an acknowledged delivery.
    async fn advance(self: &Arc<Self>, seq: u64) -> Result<(), SinkError> {
        let sink = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let conn = sink.store.connection()?;
            conn.execute(
                "INSERT INTO sink_cursors (sink, seq) VALUES (?1, ?2)
                 ON CONFLICT (sink) DO UPDATE SET seq = max(seq, excluded.seq)",
                params![sink.config.name, seq as i64],
            )
            .map_err(StoreError::from)?;
            Ok(())
        })
        .await
        .map_err(|e| SinkError::Setup(e.to_string()))?
    }

    /// The refusals in an Elastic `_bulk` answer to skip (see [`bulk_outcome`]). A
    /// batch refused whole as unindexable says more about the index than the events,
    /// so it is retried, its first event alone; refused alone too, that event is bad
    /// and skipped, so one bad event never stops the sink. After [`MAX_BLIND_SKIPS`]
    /// such skips with nothing accepted in between, the sink keeps retrying instead:
    /// a broken index mapping stalls delivery until it is fixed, and drops nothing.
    fn refusals_to_skip(&self, answer: &[u8], sent: usize) -> Result<Vec<Refusal>, SinkError> {
        match bulk_outcome(answer, sent) {
            Ok(refusals) => {
                // Fewer refusals than events: the receiver accepted some.
                self.blind_skips.store(0, Ordering::Relaxed);
                Ok(refusals)
            }
            Err(SinkError::AllUnindexable(refusals))
                if sent == 1
                    && self.probing.load(Ordering::Relaxed)
                    && self.blind_skips.load(Ordering::Relaxed) < MAX_BLIND_SKIPS =>
            {
                self.blind_skips.fetch_add(1, Ordering::Relaxed);
                Ok(refusals)
            }
            Err(SinkError::AllUnindexable(refusals)) => {
                self.probing.store(true, Ordering::Relaxed);
                Err(SinkError::AllUnindexable(refusals))
            }
            outcome => outcome,
        }
    }

    async fn post(
        &self,
        url: &str,
        format: WebhookFormat,
        token_env: Option<&str>,
        index: &str,
        events: &[Value],
    ) -> Result<(), SinkError> {
        let uri: Uri = url
            .parse()
            .map_err(|e| SinkError::Setup(format!("sink url {url}: {e}")))?;
        let body = webhook_body(format, index, events);
        let mut request = Request::post(uri).header(header::CONTENT_TYPE, content_type(format));
        if let Some(token) = token_env.and_then(|env| std::env::var(env).ok()) {
            let scheme = if format == WebhookFormat::SplunkHec {
                "Splunk"
            } else {
                "Bearer"
            };
            if let Ok(value) = HeaderValue::try_from(format!("{scheme} {token}")) {
                request = request.header(header::AUTHORIZATION, value);
            }
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| SinkError::Setup(e.to_string()))?;

        let response = tokio::time::timeout(Duration::from_secs(30), self.http.request(request))
            .await
            .map_err(|_| SinkError::Unreachable("no answer within 30 s".into()))?
            .map_err(|e| SinkError::Unreachable(e.to_string()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(SinkError::Status(status.as_u16()));
        }
        if format == WebhookFormat::ElasticBulk {
            // `_bulk` answers 200 even when items failed; each item has its own status.
            let answer =
                tokio::time::timeout(Duration::from_secs(30), response.into_body().collect())
                    .await
                    .map_err(|_| SinkError::Unreachable("answer not read within 30 s".into()))?
                    .map_err(|e| SinkError::Unreachable(e.to_string()))?
                    .to_bytes();
            for refusal in self.refusals_to_skip(&answer, events.len())? {
                tracing::error!(
                    sink = %self.config.name, event.id = %refusal.id, reason = %refusal.reason,
                    "receiver refused the event for good; skipped (it stays in the ledger)"
                );
                self.metrics.dropped.inc();
            }
        }
        Ok(())
    }
}

/// An event a receiver refused, by its id.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub id: String,
    pub status: u64,
    pub reason: String,
}

/// Elastic error types that refuse a document for what it is (its fields against the
/// index's mapping): sending it again cannot help.
const UNINDEXABLE: [&str; 4] = [
    "mapper_parsing_exception",
    "document_parsing_exception",
    "strict_dynamic_mapping_exception",
    "illegal_argument_exception",
];

/// What an Elastic `_bulk` answer (200 even when items fail) says about a batch of
/// `sent` events. Each item has its own status: 2xx is stored, 409 is a duplicate of
/// an event stored before. A document refused with 400 for what it is (a mapping or
/// parsing error, see `UNINDEXABLE`) would be refused however often it came, so the
/// batch counts as delivered and those refusals are returned, to be logged and
/// skipped, unless every event of the batch was refused (more likely the index than
/// the events: `AllUnindexable`, which the sink retries). Any other refusal (429 or
/// 5xx from a busy cluster, a closed or badly named index, a permission) or an answer
/// missing items sends the whole batch again; the event ids make repeats overwrite,
/// not duplicate.
pub fn bulk_outcome(answer: &[u8], sent: usize) -> Result<Vec<Refusal>, SinkError> {
    let answer: Value = serde_json::from_slice(answer)
        .map_err(|e| SinkError::Answer(format!("not a _bulk answer: {e}")))?;
    let items = answer["items"].as_array().map_or(&[][..], Vec::as_slice);
    if items.len() != sent {
        return Err(SinkError::Answer(format!(
            "{} items for {sent} events",
            items.len()
        )));
    }
    if answer["errors"] != Value::Bool(true) {
        return Ok(Vec::new());
    }

    let (unindexable, passing): (Vec<Refusal>, Vec<Refusal>) = items
        .iter()
        .filter_map(|item| item.as_object()?.values().next())
        .map(|result| Refusal {
            id: result["_id"].as_str().unwrap_or("-").to_owned(),
            status: result["status"].as_u64().unwrap_or(0),
            reason: result["error"]["type"]
                .as_str()
                .unwrap_or("error")
                .to_owned(),
        })
        .filter(|r| !(200..300).contains(&r.status) && r.status != 409)
        .partition(|r| r.status == 400 && UNINDEXABLE.contains(&r.reason.as_str()));
    if let Some(first) = passing.first() {
        return Err(SinkError::Refused {
            refused: passing.len() + unindexable.len(),
            sent,
            first: format!("{} {} ({})", first.status, first.reason, first.id),
        });
    }
    match unindexable.len() {
        0 => Err(SinkError::Answer("errors set, but no item refused".into())),
        all if all == sent => Err(SinkError::AllUnindexable(unindexable)),
        _ => Ok(unindexable),
    }
}

fn content_type(format: WebhookFormat) -> &'static str {
    match format {
        WebhookFormat::Jsonl | WebhookFormat::ElasticBulk => "application/x-ndjson",
        WebhookFormat::SplunkHec => "application/json",
    }
}

/// The request body for a batch of events, in the receiver's format.
pub fn webhook_body(format: WebhookFormat, index: &str, events: &[Value]) -> String {
    let mut body = String::new();
    for event in events {
        match format {
            WebhookFormat::Jsonl => body.push_str(&event.to_string()),
            WebhookFormat::SplunkHec => {
                let time = event["time"].as_i64().unwrap_or(0) as f64 / 1e3;
                let hec = json!({"time": time, "sourcetype": "warden:ledger", "source": "warden", "event": event});
                body.push_str(&hec.to_string());
            }
            WebhookFormat::ElasticBulk => {
                let action = json!({"index": {"_index": index, "_id": event["metadata"]["uid"]}});
                body.push_str(&action.to_string());
                body.push('\n');
                body.push_str(&event.to_string());
            }
        }
        body.push('\n');
    }
    body
}

/// One RFC 5424 message for an entry, framed by octet counting (RFC 6587): facility
/// `log audit` (13), severity informational, MSGID the decision's kind, and the
/// entry's sequence number and stable id as structured data; the OCSF event is the MSG.
pub fn syslog_frame(entry: &StoredEntry, event: &Value) -> String {
    let time = event["unmapped"]["entry"]["time"].as_str().unwrap_or("-");
    let kind: String = event["activity_name"]
        .as_str()
        .unwrap_or("-")
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(32)
        .collect();
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty() && h.is_ascii());
    let id = event["metadata"]["uid"].as_str().unwrap_or("-");
    let message = format!(
        "<110>1 {time} {} warden - {kind} [warden@32473 seq=\"{}\" id=\"{}\"] {event}",
        host.as_deref().unwrap_or("-"),
        entry.seq,
        sd_escape(id),
    );
    format!("{} {message}", message.len())
}

/// Escapes a structured-data parameter value (RFC 5424, section 6.3.3).
fn sd_escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace(']', "\\]")
}

async fn send_syslog(
    address: &str,
    tls: bool,
    server_name: Option<&str>,
    frames: &[u8],
) -> Result<(), SinkError> {
    use tokio::io::AsyncWriteExt;

    let unreachable = |e: std::io::Error| SinkError::Unreachable(format!("{address}: {e}"));
    let stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(address),
    )
    .await
    .map_err(|_| SinkError::Unreachable(format!("{address}: connect timed out")))?
    .map_err(unreachable)?;
    stream.set_nodelay(true).map_err(unreachable)?;

    if !tls {
        let mut stream = stream;
        stream.write_all(frames).await.map_err(unreachable)?;
        stream.flush().await.map_err(unreachable)?;
        return stream.shutdown().await.map_err(unreachable);
    }
    let host = server_name.unwrap_or_else(|| address.rsplit_once(':').map_or(address, |(h, _)| h));
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| SinkError::Setup(format!("syslog server name {host}: {e}")))?;
    let connector = tokio_rustls::TlsConnector::from(crate::proxy::tls_config());
    let mut stream = connector.connect(name, stream).await.map_err(unreachable)?;
    stream.write_all(frames).await.map_err(unreachable)?;
    stream.flush().await.map_err(unreachable)?;
    stream.shutdown().await.map_err(unreachable)
}

/// Appends events to a JSON-lines file, rotating it to `<path>.1` past `max_bytes`,
/// and syncs before the cursor may move. One rotated file is kept: the one before is
/// replaced, so a shipper reading the file must keep up within two files' worth.
/// A write that fails part-way is cut back off, so the retry never follows half a line.
fn append_file(path: &Path, max_bytes: u64, events: &[Value]) -> Result<(), SinkError> {
    use std::io::Write;

    let size = std::fs::metadata(path).map_or(0, |m| m.len());
    if size > max_bytes {
        let mut rotated = path.as_os_str().to_owned();
        rotated.push(".1");
        std::fs::rename(path, &rotated)?;
        sync_parent(path)?;
    }

    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let before = file.metadata()?.len();
    let mut text = String::new();
    for event in events {
        text.push_str(&event.to_string());
        text.push('\n');
    }
    let written = file
        .write_all(text.as_bytes())
        .and_then(|()| file.sync_all());
    if let Err(e) = written {
        // Best effort: should the cut fail too, the torn line stays in the file.
        let _ = file.set_len(before);
        return Err(e.into());
    }
    Ok(())
}

/// Makes a rename in `path`'s directory survive a power cut.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::File::open(dir)?.sync_all(),
        _ => std::fs::File::open(".")?.sync_all(),
    }
}

/// Exponential backoff from 100 ms to 30 s, with full jitter.
#[derive(Default)]
struct Backoff {
    attempt: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let cap = 100u64.saturating_mul(1 << self.attempt.min(9)).min(30_000);
        self.attempt += 1;
        let mut bytes = [0u8; 8];
        let jitter = match getrandom::fill(&mut bytes) {
            Ok(()) => u64::from_le_bytes(bytes) % cap.max(1),
            Err(_) => cap / 2,
        };
        Duration::from_millis(jitter.max(50))
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64) -> StoredEntry {
        StoredEntry {
            seq,
            canonical: format!(
                r#"{{"actor":"operator","details":{{}},"kind":"spawn","prev":"00","seq":{seq},"subject":"spiffe://t/agent/a/b","time":"2026-12-03T00:00:00.000Z"}}"#
            ),
            hash: "ab".repeat(32),
            signature: "cd".repeat(64),
            key_id: "0011223344556677".into(),
        }
    }

    #[test]
    fn events_are_ocsf_with_a_stable_id() {
        let event = ocsf_event(&entry(7), "0011223344556677");
        assert_eq!(event["class_uid"], 6003);
        assert_eq!(event["metadata"]["uid"], "warden-0011223344556677-7");
        assert_eq!(event["unmapped"]["entry"]["kind"], "spawn");
        assert_eq!(event["time"], 1_796_256_000_000_i64);
    }

    #[test]
    fn webhook_formats() {
        let events = vec![ocsf_event(&entry(1), "k"), ocsf_event(&entry(2), "k")];
        let bulk = webhook_body(WebhookFormat::ElasticBulk, "idx", &events);
        let lines: Vec<Value> = bulk
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0]["index"]["_id"], "warden-k-1");
        assert_eq!(lines[0]["index"]["_index"], "idx");

        let hec = webhook_body(WebhookFormat::SplunkHec, "", &events);
        let first: Value = serde_json::from_str(hec.lines().next().unwrap()).unwrap();
        assert_eq!(first["sourcetype"], "warden:ledger");
        assert_eq!(first["event"]["metadata"]["uid"], "warden-k-1");
    }

    #[test]
    fn backoff_grows_and_stays_capped() {
        let mut backoff = Backoff::default();
        for _ in 0..20 {
            assert!(backoff.next() <= Duration::from_secs(30));
        }
        backoff.reset();
        assert!(backoff.next() <= Duration::from_millis(100));
    }

    fn answer(items: &[(u64, &str)]) -> Vec<u8> {
        let items: Vec<Value> = items
            .iter()
            .enumerate()
            .map(|(n, (status, error))| {
                json!({"index": {"_id": format!("e{n}"), "status": status, "error": {"type": error}}})
            })
            .collect();
        let errors = items.iter().any(|i| i["index"]["status"] != 201);
        json!({"took": 1, "errors": errors, "items": items})
            .to_string()
            .into_bytes()
    }

    /// Past `max_bytes` the file moves to `<path>.1` (the whole name kept) and a new
    /// one starts; every line is one event.
    #[test]
    fn the_file_sink_rotates_past_its_size() {
        let dir = std::env::temp_dir().join(format!("warden-rotate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.log");
        let events = |n: u64| (0..n).map(|seq| json!({ "seq": seq })).collect::<Vec<_>>();

        append_file(&path, 16, &events(2)).unwrap();
        append_file(&path, 16, &events(1)).unwrap();

        let lines = |p: &Path| std::fs::read_to_string(p).unwrap().lines().count();
        assert_eq!(lines(&dir.join("events.log.1")), 2);
        assert_eq!(lines(&path), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Only documents refused for what they are are skipped; a refusal the operator or
    /// time can fix, one refusing every event, and an answer short of items are retried.
    #[test]
    fn bulk_answers_skip_only_unindexable_documents() {
        let ok = answer(&[(201, ""), (201, "")]);
        assert!(bulk_outcome(&ok, 2).unwrap().is_empty());

        let mapping = answer(&[(201, ""), (400, "mapper_parsing_exception")]);
        let skipped = bulk_outcome(&mapping, 2).unwrap();
        assert_eq!(
            skipped.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["e1"]
        );

        for retried in [
            answer(&[(201, ""), (429, "es_rejected_execution_exception")]),
            answer(&[(201, ""), (400, "invalid_index_name_exception")]),
            answer(&[
                (400, "index_closed_exception"),
                (400, "index_closed_exception"),
            ]),
        ] {
            assert!(matches!(
                bulk_outcome(&retried, 2),
                Err(SinkError::Refused { .. })
            ));
        }
        let all = answer(&[
            (400, "mapper_parsing_exception"),
            (400, "mapper_parsing_exception"),
        ]);
        assert!(matches!(
            bulk_outcome(&all, 2),
            Err(SinkError::AllUnindexable(refusals)) if refusals.len() == 2
        ));
        assert!(
            matches!(bulk_outcome(&ok, 3), Err(SinkError::Answer(_))),
            "an item is missing"
        );
    }
}
