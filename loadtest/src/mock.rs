//! A mock OpenAI-compatible provider that knows the ground truth.
//!
//! Warden's tests and load runs point Warden at this mock instead of a real
//! provider. Every answer follows a deterministic token model (`tokens`), so
//! the mock can say exactly how many tokens it received, generated and sent
//! (`truth`), and compare that with what Warden metered.
//!
//! A request meets, in order: the accept loop here (TCP_NODELAY, one hyper
//! HTTP/1.1 connection task each), the router, then `exchange`, which
//! authenticates, parses the `mock` options (`options`), admits the request
//! into the ground-truth ledger (`truth`) and hands it to its endpoint
//! (`chat`, `responses`, `embeddings`) or to `replay` for recorded fixtures.
//! Streaming endpoints describe their events as a script that `stream` paces,
//! counts and breaks on request. Errors, injected or real, are OpenAI-shaped
//! (`error`).
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/responses`,
//! `POST /v1/embeddings`, `GET /v1/models`, and for tests
//! `GET /mock/truth?tag=T` and `DELETE /mock/truth`.

mod chat;
mod embeddings;
mod error;
mod exchange;
mod options;
mod replay;
mod responses;
mod stream;
pub mod tokens;
mod truth;

#[cfg(test)]
mod testkit;
#[cfg(test)]
mod tests;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub use truth::{RequestTruth, Truth};

use error::ApiError;
use exchange::{Endpoint, json_response};
use replay::Fixtures;
use truth::Ledger;

/// How the mock behaves when a request's `mock` field does not say.
#[derive(Clone, Debug)]
pub struct MockConfig {
    /// When set, requests must carry `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Completion tokens generated when `mock.tokens` is absent.
    pub default_tokens: u32,
    /// Pacing between streamed token events when `mock.token_delay_us` is absent.
    pub default_token_delay: Duration,
    /// Folder of recorded exchanges for `mock.replay`.
    pub fixtures: Option<PathBuf>,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            api_key: None,
            default_tokens: 16,
            default_token_delay: Duration::ZERO,
            fixtures: None,
        }
    }
}

/// A running mock provider. Dropping it stops the server and cuts every
/// open connection, including streams in flight.
pub struct MockProvider {
    addr: SocketAddr,
    state: Arc<ProviderState>,
    /// Set to true (or dropped) to stop the accept loop and all connections.
    shutdown: watch::Sender<bool>,
}

/// What every connection of one mock shares.
pub(crate) struct ProviderState {
    config: MockConfig,
    /// `Bearer <api_key>`, precomputed for a cheap comparison.
    bearer: Option<String>,
    ledger: Ledger,
    /// Source of the numeric part of response ids.
    next_id: AtomicU64,
    fixtures: Fixtures,
}

impl ProviderState {
    fn new(config: MockConfig) -> Self {
        Self {
            bearer: config.api_key.as_ref().map(|key| format!("Bearer {key}")),
            fixtures: Fixtures::new(config.fixtures.clone()),
            ledger: Ledger::default(),
            next_id: AtomicU64::new(1),
            config,
        }
    }

    /// A fresh response id: `prefix` followed by a process-unique number.
    fn next_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}{n}")
    }
}

impl MockProvider {
    /// Binds `addr` (port 0 picks a free port) and serves in a tokio task.
    pub async fn start(addr: SocketAddr, config: MockConfig) -> std::io::Result<MockProvider> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(ProviderState::new(config));
        let (shutdown, stopping) = watch::channel(false);

        tokio::spawn(accept(listener, router(state.clone()), stopping));
        tracing::info!(%addr, "mock provider listening");
        Ok(MockProvider {
            addr,
            state,
            shutdown,
        })
    }

    /// The address the mock is bound to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The OpenAI base URL of the mock, e.g. `http://127.0.0.1:9100/v1`. A
    /// mock bound to an unspecified address is reached over loopback.
    pub fn base_url(&self) -> String {
        let mut addr = self.addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        format!("http://{addr}/v1")
    }

    /// The ground truth of requests tagged `tag` (`mock.tag`; untagged
    /// requests have the tag "").
    pub fn truth(&self, tag: &str) -> Truth {
        self.state.ledger.snapshot(Some(tag))
    }

    /// The ground truth across every tag.
    pub fn truth_all(&self) -> Truth {
        self.state.ledger.snapshot(None)
    }

    /// Forgets all ground truth, as `DELETE /mock/truth` does.
    pub fn clear_truth(&self) {
        self.state.ledger.clear();
    }
}

impl Drop for MockProvider {
    fn drop(&mut self) {
        // Receivers also see the sender's drop; sending first is just explicit.
        let _ = self.shutdown.send(true);
    }
}

// ===== serving =====

fn router(state: Arc<ProviderState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/responses", post(responses))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/mock/truth", get(read_truth).delete(clear_truth))
        .fallback(unknown_url)
        .with_state(state)
}

/// Accepts connections until shutdown, one task per connection.
async fn accept(listener: TcpListener, router: Router, mut stopping: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            _ = stopping.wait_for(|stop| *stop) => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((socket, _)) => {
                tokio::spawn(serve_connection(socket, router.clone(), stopping.clone()));
            }
            Err(e) => {
                // Usually out of file descriptors: back off instead of spinning.
                tracing::warn!(error = %e, "mock accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    tracing::debug!("mock provider stopped accepting");
}

/// Serves one HTTP/1.1 connection until it closes or the mock stops.
async fn serve_connection(socket: TcpStream, router: Router, mut stopping: watch::Receiver<bool>) {
    if let Err(e) = socket.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(socket), TowerToHyperService::new(router));

    tokio::select! {
        served = connection => {
            if let Err(e) = served {
                tracing::debug!(error = %e, "mock connection ended with an error");
            }
        }
        _ = stopping.wait_for(|stop| *stop) => {}
    }
}

// ===== handlers =====

async fn chat_completions(
    State(state): State<Arc<ProviderState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    exchange::answer(state, Endpoint::Chat, headers, body).await
}

async fn responses(
    State(state): State<Arc<ProviderState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    exchange::answer(state, Endpoint::Responses, headers, body).await
}

async fn embeddings(
    State(state): State<Arc<ProviderState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    exchange::answer(state, Endpoint::Embeddings, headers, body).await
}

/// Models the mock claims to serve; any model name is accepted regardless.
const MODELS: [&str; 4] = ["gpt-4o-mini", "gpt-4o", "gpt-5.2", "text-embedding-3-small"];

#[derive(Serialize)]
struct ModelList {
    object: &'static str,
    data: Vec<Model>,
}

#[derive(Serialize)]
struct Model {
    id: &'static str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

async fn models(State(state): State<Arc<ProviderState>>, headers: HeaderMap) -> Response {
    if let Err(error) = exchange::authenticate(&state, &headers) {
        return error.into_response();
    }
    let data = MODELS.iter().map(|id| Model {
        id,
        object: "model",
        created: 1_700_000_000,
        owned_by: "mock",
    });
    let list = ModelList {
        object: "list",
        data: data.collect(),
    };
    let mut body = Vec::with_capacity(512);
    stream::write_json(&mut body, &list);
    json_response(body)
}

#[derive(Deserialize)]
struct TruthQuery {
    tag: Option<String>,
}

async fn read_truth(
    State(state): State<Arc<ProviderState>>,
    Query(query): Query<TruthQuery>,
) -> Response {
    let truth = state.ledger.snapshot(query.tag.as_deref());
    let mut body = Vec::with_capacity(1024);
    stream::write_json(&mut body, &truth);
    json_response(body)
}

async fn clear_truth(State(state): State<Arc<ProviderState>>) -> Response {
    state.ledger.clear();
    axum::http::StatusCode::NO_CONTENT.into_response()
}

async fn unknown_url(method: Method, uri: Uri) -> Response {
    ApiError::UnknownUrl(format!("{method} {}", uri.path())).into_response()
}
