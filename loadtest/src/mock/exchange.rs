//! One request through the mock, as named phases.
//!
//! authenticate (bearer key) → parse (JSON body, `mock` options) → admit
//! (count prompt tokens, apply the completion cap, enter the ledger) →
//! hold (slow headers) → fail (injected error) or answer (endpoint module).
//! Replays branch off after parsing and are answered by `replay`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::Value;

use super::error::ApiError;
use super::options::MockOptions;
use super::truth::{Admission, LiveRequest};
use super::{ProviderState, chat, embeddings, replay, responses, tokens};

/// The OpenAI endpoints the mock generates answers for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Chat,
    Responses,
    Embeddings,
}

/// An admitted request and everything its endpoint needs to answer it.
pub(crate) struct Exchange {
    pub request: Arc<LiveRequest>,
    pub options: MockOptions,
    /// Unix seconds, for `created` / `created_at`.
    pub created: u64,
    pub prompt_tokens: u64,
    /// Completion tokens to generate, after the request's cap.
    pub tokens: u32,
    /// The cap cut the completion short (finish reason `length`).
    pub capped: bool,
    pub token_delay: Duration,
    /// The request asked for an event stream.
    pub stream: bool,
}

impl Endpoint {
    /// The request path, as recorded in the ground truth.
    pub(crate) fn path(self) -> &'static str {
        match self {
            Self::Chat => "/v1/chat/completions",
            Self::Responses => "/v1/responses",
            Self::Embeddings => "/v1/embeddings",
        }
    }

    fn id_prefix(self) -> &'static str {
        match self {
            Self::Chat => "chatcmpl-mock-",
            Self::Responses => "resp_mock_",
            Self::Embeddings => "embd-mock-",
        }
    }

    fn prompt_tokens(self, body: &Value) -> u64 {
        match self {
            Self::Chat => tokens::chat_prompt_tokens(body),
            Self::Responses => tokens::responses_prompt_tokens(body),
            Self::Embeddings => tokens::embeddings_prompt_tokens(body),
        }
    }

    /// The request's own limit on completion tokens, if any.
    fn cap(self, body: &Value) -> Option<u64> {
        let field = |name: &str| body.get(name).and_then(Value::as_u64);
        match self {
            Self::Chat => field("max_completion_tokens").or_else(|| field("max_tokens")),
            Self::Responses => field("max_output_tokens"),
            Self::Embeddings => Some(0),
        }
    }

    fn streams(self, body: &Value) -> bool {
        self != Self::Embeddings && body.get("stream").and_then(Value::as_bool) == Some(true)
    }
}

/// Answers one request to `endpoint`; every failure becomes an OpenAI error.
pub(crate) async fn answer(
    state: Arc<ProviderState>,
    endpoint: Endpoint,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match exchange(&state, endpoint, &headers, &body).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn exchange(
    state: &ProviderState,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let authorization = authenticate(state, headers)?;
    let body: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    let options = MockOptions::from_body(&body)?;
    if options.replay.is_some() {
        return replay::answer(state, endpoint, options, authorization, body).await;
    }

    let error = options.error_fault();
    let exchange = admit(
        state,
        endpoint,
        options,
        authorization,
        body,
        error.is_some(),
    );
    if let Some(delay) = exchange.options.header_delay() {
        tokio::time::sleep(delay).await;
    }
    if let Some(error) = error {
        exchange.request.finish();
        return Err(error);
    }

    Ok(match endpoint {
        Endpoint::Chat => chat::answer(exchange).await,
        Endpoint::Responses => responses::answer(exchange).await,
        Endpoint::Embeddings => embeddings::answer(exchange),
    })
}

/// Checks the bearer key; returns the `Authorization` header as received.
pub(crate) fn authenticate(
    state: &ProviderState,
    headers: &HeaderMap,
) -> Result<Option<String>, ApiError> {
    let received = headers.get(header::AUTHORIZATION);
    if let Some(expected) = &state.bearer
        && received.map(HeaderValue::as_bytes) != Some(expected.as_bytes())
    {
        return Err(ApiError::InvalidKey);
    }
    Ok(received.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()))
}

/// Counts the request into the ledger and settles how much it will generate.
/// Requests answered with an injected error count no tokens at all, as a
/// real provider bills none for them.
fn admit(
    state: &ProviderState,
    endpoint: Endpoint,
    options: MockOptions,
    authorization: Option<String>,
    body: Value,
    failing: bool,
) -> Exchange {
    let requested = options.tokens(&state.config);
    let cap = endpoint.cap(&body);
    let tokens = cap.map_or(requested, |cap| cap.min(u64::from(requested)) as u32);
    let prompt_tokens = if failing {
        0
    } else {
        endpoint.prompt_tokens(&body)
    };
    let stream = endpoint.streams(&body) && !failing;

    let id = state.next_id(endpoint.id_prefix());
    tracing::debug!(
        request.id = %id,
        endpoint = endpoint.path(),
        tag = %options.tag,
        tokens,
        stream,
        "admitted"
    );
    let admission = Admission {
        id,
        tag: &options.tag,
        endpoint: endpoint.path(),
        stream,
        prompt_tokens,
        authorization,
        body,
    };
    let request = state.ledger.admit(admission);

    Exchange {
        request,
        created: unix_now(),
        prompt_tokens,
        tokens,
        capped: tokens < requested,
        token_delay: options.token_delay(&state.config),
        stream,
        options,
    }
}

impl Exchange {
    /// Settles a non-streamed answer: waits as long as streaming its tokens
    /// would have taken, then counts them all as generated and sent.
    pub(crate) async fn settle_whole(&self) {
        let generation = self.token_delay.saturating_mul(self.tokens);
        if !generation.is_zero() {
            tokio::time::sleep(generation).await;
        }
        self.request.generate(u64::from(self.tokens));
        self.request.send(u64::from(self.tokens));
        self.request.finish();
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A `200 application/json` response from already serialized bytes.
pub(crate) fn json_response(body: Vec<u8>) -> Response {
    let mut response = Response::new(Body::from(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A `200 text/event-stream` response over `events`.
pub(crate) fn event_stream_response<S>(events: S) -> Response
where
    S: futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static,
{
    let mut response = Response::new(Body::from_stream(events));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
