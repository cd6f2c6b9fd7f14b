//! Upstream providers: one pooled HTTP client each, and the forward phase.
//!
//! Each provider gets its own `reqwest` client so its connect timeout and connection
//! pool are its own; connections are kept alive and reused across requests, with
//! TCP_NODELAY so small SSE frames are not held back by Nagle's algorithm.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, header};

use super::Endpoint;
use crate::config::ProviderConfig;
use crate::error::ApiError;

/// A configured provider, ready to take requests.
pub struct Provider {
    pub name: Arc<str>,
    base_url: String,
    /// `Bearer <key>`; `None` when the key's environment variable is unset.
    auth: Option<HeaderValue>,
    api_key_env: String,
    connect_timeout: Duration,
    first_byte_timeout: Duration,
    client: reqwest::Client,
}

impl Provider {
    pub fn new(config: &ProviderConfig) -> Result<Provider, reqwest::Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .build()?;

        Ok(Provider {
            name: config.name.as_str().into(),
            base_url: config.base_url.trim_end_matches('/').to_owned(),
            auth: provider_auth(config),
            api_key_env: config.api_key_env.clone().unwrap_or_default(),
            connect_timeout: config.connect_timeout,
            first_byte_timeout: config.first_byte_timeout,
            client,
        })
    }

    /// Sends `body` to the provider and waits for its response headers.
    pub async fn send(
        &self,
        endpoint: Endpoint,
        body: Bytes,
    ) -> Result<reqwest::Response, ApiError> {
        let Some(auth) = self.auth.clone() else {
            return Err(ApiError::ProviderKeyMissing {
                provider: self.name.to_string(),
                env: self.api_key_env.clone(),
            });
        };

        let request = self
            .client
            .post(format!("{}{}", self.base_url, endpoint.path()))
            .header(header::AUTHORIZATION, auth)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body);

        match tokio::time::timeout(self.first_byte_timeout, request.send()).await {
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
        mut response: reqwest::Response,
        limit: usize,
    ) -> Result<Bytes, ApiError> {
        let mut body = bytes::BytesMut::new();
        loop {
            let chunk = response.chunk().await.map_err(|e| self.body_error(&e))?;
            let Some(chunk) = chunk else { break };
            if body.len() + chunk.len() > limit {
                return Err(ApiError::UpstreamBody {
                    provider: self.name.to_string(),
                    reason: format!(
                        "body larger than {limit} bytes (server.max_upstream_body_bytes)"
                    ),
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }

    pub fn body_error(&self, e: &reqwest::Error) -> ApiError {
        ApiError::UpstreamBody {
            provider: self.name.to_string(),
            reason: error_chain(e),
        }
    }

    fn send_error(&self, e: &reqwest::Error) -> ApiError {
        if e.is_connect() && e.is_timeout() {
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

/// A reqwest error with its sources, which is where the useful part usually is.
fn error_chain(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
