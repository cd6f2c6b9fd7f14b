//! Upstream providers: one pooled HTTP client each, and the forward phase.
//!
//! Each provider gets its own hyper client per worker thread, so its connect timeout
//! and connection pool are its own and a pooled connection is always driven by the
//! thread that uses it. Connections are kept alive and reused, with TCP_NODELAY so
//! small SSE frames are not held back by Nagle's algorithm. The request URIs are built once at
//! startup: a request clones a ready `Uri` instead of formatting and parsing a URL
//! (which, with redirect and retry layers, made up a third of the proxy's own CPU
//! time per request when this used `reqwest`). TLS is rustls with the system's roots,
//! one configuration shared by every provider.

use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_rustls::{ConfigBuilderExt, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::Endpoint;
use crate::config::ProviderConfig;
use crate::error::ApiError;

type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Why the upstream side could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamSetupError {
    #[error("provider {provider}: base_url {url} is not a valid URL: {source}")]
    BadUrl {
        provider: String,
        url: String,
        source: http::uri::InvalidUri,
    },
}

/// The TLS configuration every provider client shares: the system's root certificates.
/// A machine without any yields an empty store, so only plain-HTTP providers work; that
/// is logged rather than fatal, since a mock-only setup needs no TLS at all.
pub fn tls_config() -> Arc<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder();
    let config = match builder.clone().with_native_roots() {
        Ok(with_roots) => with_roots.with_no_client_auth(),
        Err(e) => {
            tracing::warn!(error = %e, "no system root certificates; HTTPS providers will fail");
            builder
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        }
    };
    Arc::new(config)
}

/// A configured provider, ready to take requests.
pub struct Provider {
    pub name: Arc<str>,
    /// The full URI of each endpoint, indexed by [`Endpoint::index`].
    uris: [Uri; 3],
    /// `Bearer <key>`; `None` when the key's environment variable is unset.
    auth: Option<HeaderValue>,
    api_key_env: String,
    connect_timeout: Duration,
    first_byte_timeout: Duration,
    /// One client (and so one connection pool) per worker thread.
    clients: Vec<HttpsClient>,
}

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Marks the calling thread as worker `index`: its requests use that worker's pools.
pub fn set_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}

impl Provider {
    pub fn new(
        config: &ProviderConfig,
        tls: &Arc<rustls::ClientConfig>,
        workers: usize,
    ) -> Result<Provider, UpstreamSetupError> {
        let base = config.base_url.trim_end_matches('/');
        let uri = |endpoint: Endpoint| {
            let url = format!("{base}{}", endpoint.path());
            url.parse::<Uri>()
                .map_err(|source| UpstreamSetupError::BadUrl {
                    provider: config.name.clone(),
                    url,
                    source,
                })
        };

        Ok(Provider {
            name: config.name.as_str().into(),
            uris: [
                uri(Endpoint::Chat)?,
                uri(Endpoint::Responses)?,
                uri(Endpoint::Embeddings)?,
            ],
            auth: provider_auth(config),
            api_key_env: config.api_key_env.clone().unwrap_or_default(),
            connect_timeout: config.connect_timeout,
            first_byte_timeout: config.first_byte_timeout,
            clients: (0..workers.max(1)).map(|_| client(config, tls)).collect(),
        })
    }

    /// The calling worker's client.
    fn client(&self) -> &HttpsClient {
        let worker = WORKER.with(Cell::get);
        &self.clients[worker % self.clients.len()]
    }

    /// Sends `body` to the provider and waits for its response headers.
    pub async fn send(
        &self,
        endpoint: Endpoint,
        body: Bytes,
    ) -> Result<Response<Incoming>, ApiError> {
        let Some(auth) = self.auth.clone() else {
            return Err(ApiError::ProviderKeyMissing {
                provider: self.name.to_string(),
                env: self.api_key_env.clone(),
            });
        };

        let request = Request::post(self.uris[endpoint.index()].clone())
            .header(header::AUTHORIZATION, auth)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| ApiError::Internal(format!("building the upstream request: {e}")))?;

        match tokio::time::timeout(self.first_byte_timeout, self.client().request(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(self.send_error(&e)),
            Err(_) => Err(ApiError::UpstreamTimeout {
                provider: self.name.to_string(),
                phase: "send response headers",
                timeout_ms: self.first_byte_timeout.as_millis(),
            }),
        }
    }

    /// Reads a whole (non-streamed) response body, refusing one over `limit` bytes.
    pub async fn read_body(
        &self,
        response: Response<Incoming>,
        limit: usize,
    ) -> Result<Bytes, ApiError> {
        match Limited::new(response.into_body(), limit).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(e) if e.is::<LengthLimitError>() => Err(ApiError::UpstreamBody {
                provider: self.name.to_string(),
                reason: format!("body larger than {limit} bytes (server.max_upstream_body_bytes)"),
            }),
            Err(e) => Err(ApiError::UpstreamBody {
                provider: self.name.to_string(),
                reason: e.to_string(),
            }),
        }
    }

    fn send_error(&self, e: &hyper_util::client::legacy::Error) -> ApiError {
        if e.is_connect() && caused_by_timeout(e) {
            return ApiError::UpstreamTimeout {
                provider: self.name.to_string(),
                phase: "accept the connection",
                timeout_ms: self.connect_timeout.as_millis(),
            };
        }
        ApiError::UpstreamUnreachable {
            provider: self.name.to_string(),
            reason: error_chain(e),
        }
    }
}

fn client(config: &ProviderConfig, tls: &Arc<rustls::ClientConfig>) -> HttpsClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(config.connect_timeout));
    http.enforce_http(false);
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(rustls::ClientConfig::clone(tls))
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);

    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build(https)
}

impl Endpoint {
    fn index(self) -> usize {
        match self {
            Endpoint::Chat => 0,
            Endpoint::Responses => 1,
            Endpoint::Embeddings => 2,
        }
    }
}

/// The provider's `Authorization` header, from its configured environment variable.
/// A provider without `api_key_env` (a local mock) gets a fixed placeholder key.
fn provider_auth(config: &ProviderConfig) -> Option<HeaderValue> {
    let key = match &config.api_key_env {
        Some(env) => match std::env::var(env) {
            Ok(key) => key,
            Err(_) => {
                tracing::warn!(provider = %config.name, env = %env, "provider key is not set; its models will answer 502");
                return None;
            }
        },
        None => "none".to_owned(),
    };

    let mut value = HeaderValue::try_from(format!("Bearer {key}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

fn caused_by_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(cause) = source {
        let timed_out = cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut);
        if timed_out {
            return true;
        }
        source = cause.source();
    }
    false
}

/// An error with its sources, which is where the useful part usually is.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
