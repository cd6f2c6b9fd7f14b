//! Replay of recorded provider exchanges (`mock.replay`).
//!
//! A fixture folder holds `meta.json` (status, content type, usage) and the
//! recorded body as `response.sse` or `response.json`. The mock answers with
//! that status, content type and body byte for byte; an `.sse` body is sent
//! one event per chunk (split after each blank line), paced by
//! `token_delay_us` between events. Fixtures are read once and cached.
//!
//! Limitation: of the faults, only `slow_headers` applies to replays; the
//! others are ignored, since a recording already is the answer.
//! Limitation: events are split at `\n\n` only; a CRLF-framed recording is
//! still sent byte for byte, but as one chunk.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use super::ProviderState;
use super::error::ApiError;
use super::exchange::Endpoint;
use super::options::MockOptions;
use super::truth::{Admission, LiveRequest};

/// The fixtures folder and the recordings read from it so far.
pub(crate) struct Fixtures {
    dir: Option<PathBuf>,
    cache: Mutex<HashMap<String, Arc<Fixture>>>,
}

/// One recorded exchange, ready to send.
struct Fixture {
    status: StatusCode,
    content_type: HeaderValue,
    body: Recording,
    input_tokens: u64,
    output_tokens: u64,
}

enum Recording {
    /// An event stream, one entry per event, blank line included.
    Events(Vec<Bytes>),
    Whole(Bytes),
}

/// The parts of `meta.json` a replay needs.
#[derive(Deserialize)]
struct Meta {
    http_status: u16,
    content_type: String,
    usage: Option<MetaUsage>,
}

#[derive(Deserialize)]
struct MetaUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

impl Fixtures {
    pub(crate) fn new(dir: Option<PathBuf>) -> Self {
        Self {
            dir,
            cache: Mutex::default(),
        }
    }

    /// The fixture `name`, read from disk on first use.
    async fn get(&self, name: &str) -> Result<Arc<Fixture>, ApiError> {
        let Some(dir) = &self.dir else {
            let why = "the mock has no fixtures folder (MockConfig::fixtures / --fixtures)";
            return Err(ApiError::ReplayUnavailable(why.to_owned()));
        };
        if !is_plain_name(name) {
            return Err(ApiError::ReplayUnavailable(format!(
                "'{name}' is not a fixture folder name"
            )));
        }
        if let Some(fixture) = self.lock().get(name) {
            return Ok(fixture.clone());
        }

        let folder = dir.join(name);
        let loaded = tokio::task::spawn_blocking(move || Fixture::load(&folder)).await;
        let loaded = loaded.unwrap_or_else(|e| Err(io::Error::other(e)));
        let fixture = Arc::new(loaded.map_err(|e| {
            tracing::warn!(fixture = name, error = %e, "cannot load fixture");
            ApiError::ReplayUnavailable(format!("fixture '{name}': {e}"))
        })?);
        self.lock().insert(name.to_owned(), fixture.clone());
        Ok(fixture)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Fixture>>> {
        // The cache holds only complete entries, so a poisoned lock is safe to reuse.
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A single folder name: no separators, no `..`, not hidden.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl Fixture {
    /// Reads a fixture folder; blocking, so callers run it off the runtime.
    fn load(dir: &Path) -> io::Result<Self> {
        let meta: Meta = serde_json::from_slice(&std::fs::read(dir.join("meta.json"))?)?;
        let body = match std::fs::read(dir.join("response.sse")) {
            Ok(bytes) => Recording::Events(split_events(&Bytes::from(bytes))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Recording::Whole(std::fs::read(dir.join("response.json"))?.into())
            }
            Err(e) => return Err(e),
        };

        let invalid = |what: &str| {
            io::Error::new(io::ErrorKind::InvalidData, format!("meta.json: bad {what}"))
        };
        let usage = meta.usage.as_ref();
        Ok(Self {
            status: StatusCode::from_u16(meta.http_status).map_err(|_| invalid("http_status"))?,
            content_type: HeaderValue::try_from(meta.content_type)
                .map_err(|_| invalid("content_type"))?,
            body,
            input_tokens: usage.and_then(|u| u.input_tokens).unwrap_or(0),
            output_tokens: usage.and_then(|u| u.output_tokens).unwrap_or(0),
        })
    }
}

/// Splits an event stream after each blank line (`\n\n`); any trailing bytes
/// without one form a last chunk. Concatenating the chunks gives `body` back.
pub(crate) fn split_events(body: &Bytes) -> Vec<Bytes> {
    let mut events = Vec::new();
    let mut start = 0;
    let mut index = 0;
    while index + 1 < body.len() {
        if body[index] == b'\n' && body[index + 1] == b'\n' {
            events.push(body.slice(start..index + 2));
            start = index + 2;
            index = start;
        } else {
            index += 1;
        }
    }
    if start < body.len() {
        events.push(body.slice(start..));
    }
    events
}

/// Answers a request with the recorded exchange named by `mock.replay`.
pub(crate) async fn answer(
    state: &ProviderState,
    endpoint: Endpoint,
    options: MockOptions,
    authorization: Option<String>,
    body: Value,
) -> Result<Response, ApiError> {
    let name = options.replay.as_deref().unwrap_or_default();
    let fixture = state.fixtures.get(name).await?;

    let admission = Admission {
        id: state.next_id("replay-mock-"),
        tag: &options.tag,
        endpoint: endpoint.path(),
        stream: matches!(fixture.body, Recording::Events(_)),
        prompt_tokens: fixture.input_tokens,
        authorization,
        body,
    };
    let request = state.ledger.admit(admission);
    request.generate(fixture.output_tokens);
    request.send(fixture.output_tokens);
    tracing::debug!(request.id = request.id(), fixture = name, "replaying");

    if let Some(delay) = options.header_delay() {
        tokio::time::sleep(delay).await;
    }
    let delay = options.token_delay(&state.config);
    Ok(respond(fixture, request, delay))
}

fn respond(fixture: Arc<Fixture>, request: Arc<LiveRequest>, delay: Duration) -> Response {
    let body = match &fixture.body {
        Recording::Whole(bytes) => {
            request.finish();
            Body::from(bytes.clone())
        }
        Recording::Events(_) => Body::from_stream(paced_events(fixture.clone(), request, delay)),
    };

    let mut response = Response::new(body);
    *response.status_mut() = fixture.status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, fixture.content_type.clone());
    response
}

/// The recorded events one per chunk, `delay` apart, finishing the request
/// when the last one has gone out.
fn paced_events(
    fixture: Arc<Fixture>,
    request: Arc<LiveRequest>,
    delay: Duration,
) -> impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static {
    futures_util::stream::unfold(
        (0usize, fixture, request),
        move |(index, fixture, request)| async move {
            let Recording::Events(events) = &fixture.body else {
                return None;
            };
            let Some(event) = events.get(index).cloned() else {
                request.finish();
                return None;
            };
            if index > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Some((Ok(event), (index + 1, fixture, request)))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_after_blank_lines_and_rejoin_exactly() {
        let body = Bytes::from_static(b"data: a\n\nevent: x\ndata: b\n\ndata: [DONE]\n\n");
        let events = split_events(&body);
        assert_eq!(
            events,
            ["data: a\n\n", "event: x\ndata: b\n\n", "data: [DONE]\n\n"]
        );
        assert_eq!(
            split_events(&Bytes::from_static(b"data: a\n\ntail")).len(),
            2
        );
    }

    #[test]
    fn only_plain_folder_names_are_accepted() {
        assert!(is_plain_name("openai-chat-text-01"));
        assert!(!is_plain_name("../etc"));
        assert!(!is_plain_name("a/b"));
        assert!(!is_plain_name(""));
    }
}
