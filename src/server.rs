//! The server: shared state, the HTTP listener, and graceful shutdown.
//!
//! Warden runs its own accept loop (rather than `axum::serve`) for two reasons: every
//! accepted socket gets TCP_NODELAY, and shutdown can be staged. On SIGTERM the
//! listener closes, `/readyz` turns 503, idle connections close, open streams get
//! `server.drain_timeout` to finish, and any still open after that are cut, which
//! settles them like an abandoned stream. Only then is the usage log closed, so
//! every request's record is committed before the process exits.

mod routes;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::config::{Config, ConfigError};
use crate::identity::Identities;
use crate::proxy::Routes;
use crate::store::{Store, StoreError, UsageLog, UsageSink};
use crate::telemetry::Metrics;

/// Why Warden could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot build the upstream HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// State shared by every request.
pub struct App {
    pub identities: Identities,
    pub routes: Routes,
    pub metrics: Metrics,
    pub usage: UsageSink,
    pub store: Store,
    pub limits: Limits,
    pub ids: RequestIds,
    /// Set once shutdown begins; `/readyz` then answers 503.
    pub draining: AtomicBool,
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
    listener: TcpListener,
    usage_log: UsageLog,
    drain_timeout: Duration,
}

impl Server {
    /// Opens the store, builds the routes and binds the listener.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        let store = Store::open(&config.server.data_dir)?;
        let usage_log = store.usage_log(config.server.usage_batch)?;

        let app = App {
            identities: Identities::new(&config.operator.key_sha256, &config.agents)?,
            routes: Routes::new(&config)?,
            metrics: Metrics::new(),
            usage: usage_log.sink(),
            store,
            limits: Limits {
                max_body_bytes: config.server.max_body_bytes,
                max_upstream_body_bytes: config.server.max_upstream_body_bytes,
            },
            ids: RequestIds::new(),
            draining: AtomicBool::new(false),
        };

        let addr = config.server.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        Ok(Server {
            app: Arc::new(app),
            listener,
            usage_log,
            drain_timeout: config.server.drain_timeout,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then drains and flushes (see module docs).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Server {
            app,
            listener,
            usage_log,
            drain_timeout,
        } = self;
        let router = routes::router(Arc::clone(&app));
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
                () = &mut shutdown => break,
            }
        }

        drop(listener);
        drain(&app, graceful, connections, drain_timeout).await;
        let closed = tokio::task::spawn_blocking(move || usage_log.close()).await;
        if closed.is_err() {
            tracing::error!("usage log did not close cleanly");
        }
        tracing::info!("shutdown complete");
    }
}

/// Lets open connections finish for up to `timeout`, then cuts the rest.
async fn drain(
    app: &App,
    graceful: GracefulShutdown,
    mut connections: JoinSet<()>,
    timeout: Duration,
) {
    app.draining.store(true, Ordering::Relaxed);
    let open = app.metrics.open_streams.get();
    tracing::info!(
        open_streams = open,
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
