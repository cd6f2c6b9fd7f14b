//! The server: shared state, the listeners, and graceful shutdown.
//!
//! Warden runs one event loop per worker thread (a current-thread tokio runtime),
//! each with its own listening socket on the same port (SO_REUSEPORT, so the kernel
//! spreads connections) and its own upstream connection pools. A request then lives on
//! one thread from accept to settle: no task hops between threads, which on a small
//! machine cost more than everything Warden itself does for a request. Shared state
//! (identities, metrics, the usage log) is `Sync` and lives in one [`App`].
//!
//! Each worker runs its own accept loop rather than `axum::serve` for two reasons:
//! every accepted socket gets TCP_NODELAY, and shutdown can be staged. On SIGTERM the
//! listeners close, `/readyz` turns 503, idle connections close, open streams get
//! `server.drain_timeout` to finish, and any still open after that are cut, which
//! settles them like an abandoned stream. Only then is the usage log closed, so
//! every request's record is committed before the process exits.

mod control;
mod openapi;
mod routes;

pub use control::unix_ms;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::agents::Registry;
use crate::budget::{Budgets, SystemClock};
use crate::config::{Config, ConfigError};
use crate::decisions::DecisionLog;
use crate::identity::Identities;
use crate::policy::Policy;
use crate::proxy::Routes;
use crate::store::control::ControlStore;
use crate::store::{Store, StoreError, UsageLog, UsageSink};
use crate::telemetry::Metrics;

/// Why Warden could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("restoring agents: {0}")]
    Restore(#[from] crate::agents::RestoreError),
    #[error("upstream: {0}")]
    Upstream(#[from] crate::proxy::UpstreamSetupError),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// State shared by every request.
pub struct App {
    pub identities: Identities,
    /// Agents, leases and decisions, written synchronously.
    pub control: Arc<ControlStore>,
    pub decisions: DecisionLog,
    pub registry: Registry,
    /// The policy in force; replaced whole by a reload.
    policy: RwLock<Arc<Policy>>,
    /// Where the policy is read from on reload; `None`: the embedded default.
    pub policy_path: Option<PathBuf>,
    /// Where the database and the ledger keys live.
    pub data_dir: PathBuf,
    pub budgets: Arc<Budgets>,
    pub routes: Routes,
    pub metrics: Metrics,
    pub usage: UsageSink,
    pub store: Store,
    pub limits: Limits,
    pub ids: RequestIds,
    /// Set once shutdown begins; `/readyz` then answers 503.
    pub draining: AtomicBool,
    /// Held through a policy reload, so reloads run one at a time.
    pub reloading: Mutex<()>,
}

impl App {
    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        Arc::clone(&self.policy.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Puts `policy` in force for every request and spawn from now on.
    pub fn set_policy(&self, policy: Policy) {
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
    }
}

/// Size limits on bodies in both directions.
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_upstream_body_bytes: usize,
}

/// Request ids unique across restarts: a per-process random prefix and a counter.
pub struct RequestIds {
    prefix: u32,
    next: AtomicU64,
}

impl RequestIds {
    fn new() -> RequestIds {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        RequestIds {
            prefix: nanos ^ std::process::id().rotate_left(16),
            next: AtomicU64::new(1),
        }
    }

    pub fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("req_{:08x}{n:010x}", self.prefix)
    }
}

/// A bound, not yet running, Warden.
pub struct Server {
    app: Arc<App>,
    sinks: Vec<crate::sinks::SinkConfig>,
    /// One listening socket per worker, all on the same address.
    listeners: Vec<std::net::TcpListener>,
    usage_log: UsageLog,
    drain_timeout: Duration,
}

impl Server {
    /// Opens the store, builds the routes and binds one listener per worker.
    pub fn bind(config: Config) -> Result<Server, StartError> {
        let store = Store::open(&config.server.data_dir)?;
        let usage_log = store.usage_log(
            config.server.usage_batch,
            config.server.usage_flush_interval,
        )?;
        let workers = match config.server.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };

        let control = Arc::new(ControlStore::open(&store, &config.server.data_dir)?);
        let budgets = Budgets::with_leases(Arc::new(SystemClock), control.clone());
        let registry = Registry::restore(&config.policy, &budgets, &control)?;
        let decisions = DecisionLog::new(control.clone());
        let rekeyed = registry.unrecorded_lead_keys(&control)?;
        decisions.keys_changed("warden", "policy at start", &rekeyed)?;
        let orphans = registry.end_orphans(&budgets);
        if !orphans.is_empty() {
            tracing::warn!(
                agents = orphans.len(),
                "ending agents whose parents ended before a crash"
            );
            decisions.ended("warden", &orphans)?;
        }
        let app = App {
            identities: Identities::new(&config.operator.key_sha256, &registry)?,
            decisions,
            control,
            registry,
            policy: RwLock::new(Arc::new(config.policy.clone())),
            policy_path: config.policy_path.clone(),
            data_dir: config.server.data_dir.clone(),
            budgets,
            routes: Routes::new(&config, workers)?,
            metrics: Metrics::new(),
            usage: usage_log.sink(),
            store,
            limits: Limits {
                max_body_bytes: config.server.max_body_bytes,
                max_upstream_body_bytes: config.server.max_upstream_body_bytes,
            },
            ids: RequestIds::new(),
            draining: AtomicBool::new(false),
            reloading: Mutex::new(()),
        };

        app.metrics.watch_control_store(app.control.commit_stats());
        Ok(Server {
            app: Arc::new(app),
            sinks: config.sinks.clone(),
            listeners: bind_listeners(config.server.listen, workers)?,
            usage_log,
            drain_timeout: config.server.drain_timeout,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listeners[0].local_addr()
    }

    /// Serves until `shutdown` resolves, then drains and flushes (see module docs).
    /// Blocks the calling thread, which only waits for the signal.
    pub fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
        let (stop, stopped) = watch::channel(false);
        let mut workers = Vec::new();
        for (index, listener) in self.listeners.into_iter().enumerate() {
            let app = Arc::clone(&self.app);
            let stopped = stopped.clone();
            let drain_timeout = self.drain_timeout;
            let worker = std::thread::Builder::new()
                .name(format!("warden-worker-{index}"))
                .spawn(move || run_worker(index, listener, app, stopped, drain_timeout))
                .map_err(StartError::Thread)?;
            workers.push(worker);
        }

        let signals = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(StartError::Thread)?;
        signals.block_on(async {
            for config in self.sinks {
                let metrics = crate::sinks::SinkMetrics {
                    lag: self.app.metrics.sink_lag.with_label_values(&[&config.name]),
                    dropped: self
                        .app
                        .metrics
                        .sink_dropped
                        .with_label_values(&[&config.name]),
                };
                let sink = crate::sinks::Sink::new(config, self.app.store.clone(), metrics);
                tokio::spawn(sink.run());
            }
            tokio::select! {
                () = shutdown => {}
                () = expire_agents(&self.app) => {}
                () = reload_on_sighup(&self.app) => {}
                () = checkpoint_ledger(&self.app) => {}
            }
        });
        self.app.draining.store(true, Ordering::Relaxed);
        let _ = stop.send(true);

        for worker in workers {
            if worker.join().is_err() {
                tracing::error!("a worker thread panicked; its open requests were not settled");
            }
        }
        self.usage_log.close();
        // A checkpoint over the last entries, so a ledger cut short after a clean stop
        // is caught by the checkpoint rather than only against a sink's copy.
        match self.app.control.checkpoint() {
            Ok(Some(size)) => tracing::info!(ledger.size = size, "final ledger checkpoint signed"),
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "final ledger checkpoint not stored"),
        }
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// Signs a ledger checkpoint every ten seconds when entries were added, until shutdown.
async fn checkpoint_ledger(app: &Arc<App>) {
    let mut ticks = tokio::time::interval(Duration::from_secs(10));
    loop {
        ticks.tick().await;
        let control = Arc::clone(&app.control);
        match tokio::task::spawn_blocking(move || control.checkpoint()).await {
            Ok(Ok(Some(size))) => tracing::debug!(ledger.size = size, "ledger checkpoint signed"),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "ledger checkpoint not stored"),
            Err(e) => tracing::error!(error = %e, "ledger checkpoint task failed"),
        }
    }
}

/// Reloads the policy on every SIGHUP, until shutdown.
async fn reload_on_sighup(app: &Arc<App>) {
    use tokio::signal::unix::{SignalKind, signal};

    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; reload with POST /v1/policy/reload");
            return std::future::pending().await;
        }
    };
    while hangups.recv().await.is_some() {
        match control::reload_policy(app, "operator").await {
            Ok(evidence) => tracing::info!(evidence.id = %evidence, "policy reloaded on SIGHUP"),
            Err(e) => tracing::warn!(error = %e, "policy reload on SIGHUP refused"),
        }
    }
}

/// Ends agents whose lifetime has run out, once a second, until shutdown.
async fn expire_agents(app: &Arc<App>) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    loop {
        ticks.tick().await;
        control::expire(app).await;
    }
}

/// Binds `workers` listening sockets to one address with SO_REUSEPORT. Port 0 picks a
/// free port for the first socket; the others join it.
fn bind_listeners(
    addr: SocketAddr,
    workers: usize,
) -> Result<Vec<std::net::TcpListener>, StartError> {
    let mut listeners: Vec<std::net::TcpListener> = Vec::with_capacity(workers);
    let mut addr = addr;
    for _ in 0..workers.max(1) {
        let bind_error = |source| StartError::Bind { addr, source };
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .map_err(bind_error)?;
        socket.set_reuse_address(true).map_err(bind_error)?;
        socket.set_reuse_port(true).map_err(bind_error)?;
        socket.set_nonblocking(true).map_err(bind_error)?;
        socket.bind(&addr.into()).map_err(bind_error)?;
        socket.listen(1024).map_err(bind_error)?;

        let listener = std::net::TcpListener::from(socket);
        addr = listener.local_addr().map_err(bind_error)?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// One worker: its own runtime and accept loop, until `stopped` turns true.
fn run_worker(
    index: usize,
    listener: std::net::TcpListener,
    app: Arc<App>,
    mut stopped: watch::Receiver<bool>,
    drain_timeout: Duration,
) {
    crate::proxy::set_worker(index);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(worker = index, error = %e, "worker runtime did not start");
            return;
        }
    };

    runtime.block_on(async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(e) => {
                tracing::error!(worker = index, error = %e, "worker listener did not start");
                return;
            }
        };
        let connections = accept_loop(&app, listener, stopped.wait_for(|s| *s)).await;
        drain(&app, connections, drain_timeout).await;
    });
}

/// Accepts connections until `shutdown` resolves; returns the ones still open.
async fn accept_loop(
    app: &Arc<App>,
    listener: TcpListener,
    shutdown: impl Future,
) -> (GracefulShutdown, JoinSet<()>) {
    let router = routes::router(Arc::clone(app));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);

    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (socket, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Typically EMFILE: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                if let Err(e) = socket.set_nodelay(true) {
                    tracing::debug!(error = %e, "TCP_NODELAY not set");
                }
                let service = TowerToHyperService::new(router.clone());
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(socket), service);
                let connection = graceful.watch(connection);
                connections.spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = &mut shutdown => break,
        }
    }
    (graceful, connections)
}

/// Lets open connections finish for up to `timeout`, then cuts the rest.
async fn drain(
    app: &App,
    (graceful, mut connections): (GracefulShutdown, JoinSet<()>),
    timeout: Duration,
) {
    tracing::info!(
        open_streams = app.metrics.open_streams.get(),
        timeout_ms = timeout.as_millis() as u64,
        "draining"
    );

    if tokio::time::timeout(timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            open_streams = app.metrics.open_streams.get(),
            "drain timeout reached; cutting the remaining streams"
        );
        connections.abort_all();
    }
    // Aborted connections drop their relays here, which settles them.
    while connections.join_next().await.is_some() {}
}
