//! One request, timed: total latency, time to first token, and the gaps
//! between consecutive events of a stream.
//!
//! Times are measured from a start the caller chooses: the actual send in a
//! closed loop, the intended send in an open loop (so queueing behind a slow
//! target counts against it). A stream counts as complete only when it ends
//! with `data: [DONE]` or a final Responses event; anything else is a failure.

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde::Deserialize;
use serde::de::IgnoredAny;
use tokio::time::Instant;

/// The HTTP/1.1 keep-alive client every request of a target goes through.
pub(crate) type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A client with TCP_NODELAY and room to keep `connections` idle connections.
pub(crate) fn client(connections: usize) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(connections)
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// What to send; shared by every request to one target.
#[derive(Clone)]
pub(crate) struct Call {
    pub uri: Uri,
    pub authorization: Option<HeaderValue>,
    pub body: Bytes,
    pub stream: bool,
}

/// The timings of one successful request.
#[derive(Debug, Default)]
pub(crate) struct Sample {
    pub latency: Duration,
    /// Start to the first event carrying content (streams only).
    pub ttft: Option<Duration>,
    /// Gaps between consecutive events, in microseconds (streams only).
    pub gaps: Vec<u64>,
}

/// Why a request did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The target answered with a non-2xx status.
    Status(u16),
    /// No connection could be made.
    Connect,
    /// The request or response failed mid-way (reset, aborted body).
    Transport,
    /// A stream ended without its final event.
    Truncated,
    /// The per-request timeout passed.
    Timeout,
}

impl Failure {
    /// A short label for reports.
    pub(crate) fn label(&self) -> Cow<'static, str> {
        match self {
            Self::Status(code) => Cow::Owned(format!("status {code}")),
            Self::Connect => Cow::Borrowed("connect"),
            Self::Transport => Cow::Borrowed("transport"),
            Self::Truncated => Cow::Borrowed("truncated stream"),
            Self::Timeout => Cow::Borrowed("timeout"),
        }
    }
}

/// Sends `call` and times it from `start`.
pub(crate) async fn send(
    client: &HttpClient,
    call: &Call,
    start: Instant,
) -> Result<Sample, Failure> {
    let mut request = Request::post(call.uri.clone())
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .body(Full::new(call.body.clone()))
        .map_err(|_| Failure::Transport)?;
    if let Some(authorization) = &call.authorization {
        request
            .headers_mut()
            .insert(AUTHORIZATION, authorization.clone());
    }

    let response = client.request(request).await.map_err(|e| {
        if e.is_connect() {
            Failure::Connect
        } else {
            Failure::Transport
        }
    })?;
    let status = response.status();
    let mut body = response.into_body();
    if !status.is_success() {
        // Read the error body so the connection can be reused.
        let _ = (&mut body).collect().await;
        return Err(Failure::Status(status.as_u16()));
    }

    let mut clock = EventClock::new(start, call.stream);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| Failure::Transport)?;
        if let Ok(data) = frame.into_data() {
            clock.push(&data);
        }
    }
    clock.finish()
}

/// Splits a response body into SSE events as it arrives and times them.
struct EventClock {
    stream: bool,
    /// Bytes of the event not yet complete.
    pending: Vec<u8>,
    /// How far `pending` has been searched for an event boundary.
    scanned: usize,
    timings: Timings,
}

/// What the events of one response told so far.
struct Timings {
    start: Instant,
    last_event: Option<Instant>,
    sample: Sample,
    /// The final event was seen.
    ended: bool,
}

impl EventClock {
    fn new(start: Instant, stream: bool) -> Self {
        let timings = Timings {
            start,
            last_event: None,
            sample: Sample::default(),
            ended: false,
        };
        Self {
            stream,
            pending: Vec::new(),
            scanned: 0,
            timings,
        }
    }

    fn push(&mut self, data: &[u8]) {
        if !self.stream {
            return;
        }
        let now = Instant::now();
        self.pending.extend_from_slice(data);

        let mut consumed = 0;
        let mut index = self.scanned;
        loop {
            let Some(offset) = self.pending[index..].iter().position(|b| *b == b'\n') else {
                index = self.pending.len();
                break;
            };
            let newline = index + offset;
            match event_end(&self.pending, newline) {
                None => {
                    index = newline;
                    break;
                }
                Some(end) if end == newline + 1 => index = end,
                Some(end) => {
                    self.timings.observe(&self.pending[consumed..end], now);
                    (consumed, index) = (end, end);
                }
            }
        }

        self.pending.drain(..consumed);
        self.scanned = index - consumed;
    }

    fn finish(self) -> Result<Sample, Failure> {
        let mut sample = self.timings.sample;
        sample.latency = self.timings.start.elapsed();
        if self.stream && !self.timings.ended {
            return Err(Failure::Truncated);
        }
        Ok(sample)
    }
}

impl Timings {
    /// Times one complete event.
    fn observe(&mut self, event: &[u8], now: Instant) {
        if let Some(last) = self.last_event.replace(now) {
            self.sample.gaps.push((now - last).as_micros() as u64);
        }
        let kind = classify(event, self.sample.ttft.is_none());
        if kind == EventKind::Content && self.sample.ttft.is_none() {
            self.sample.ttft = Some(now - self.start);
        }
        self.ended |= kind == EventKind::End;
    }
}

/// Where the event containing the newline at `newline` ends: after a blank
/// line (`\n\n` or `\n\r\n`), `Some(newline + 1)` when it is a plain line
/// break, or `None` when more bytes are needed to tell.
fn event_end(bytes: &[u8], newline: usize) -> Option<usize> {
    match (bytes.get(newline + 1), bytes.get(newline + 2)) {
        (Some(b'\n'), _) => Some(newline + 2),
        (Some(b'\r'), Some(b'\n')) => Some(newline + 3),
        (None, _) | (Some(b'\r'), None) => None,
        _ => Some(newline + 1),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum EventKind {
    /// Carries generated content: text, tool-call arguments, reasoning.
    Content,
    /// The stream's final event.
    End,
    Other,
}

/// What an event is. Finding content needs a JSON parse, so it is only
/// looked for while `want_content` (until the first token has been seen).
fn classify(event: &[u8], want_content: bool) -> EventKind {
    let text = String::from_utf8_lossy(event);
    let mut name = None;
    let mut data = None;
    for line in text.lines() {
        if let Some(value) = line.strip_prefix("event:") {
            name = Some(value.trim());
        } else if let Some(value) = line.strip_prefix("data:") {
            data.get_or_insert(value.trim());
        }
    }

    let data = data.unwrap_or("");
    if data == "[DONE]" || name.is_some_and(is_final_event) {
        return EventKind::End;
    }
    if name.is_some_and(|n| n.ends_with(".delta")) {
        return EventKind::Content;
    }
    if name.is_some() || !data.starts_with('{') {
        return EventKind::Other;
    }
    // Responses events without an `event:` line carry their name in `type`.
    if !want_content && !data.contains("\"response.") {
        return EventKind::Other;
    }
    probe(data)
}

fn is_final_event(name: &str) -> bool {
    matches!(
        name,
        "response.completed" | "response.incomplete" | "response.failed"
    )
}

/// The few fields that tell what a JSON event carries.
#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(default)]
    choices: Vec<ChoiceProbe<'a>>,
}

#[derive(Deserialize)]
struct ChoiceProbe<'a> {
    #[serde(borrow)]
    delta: Option<DeltaProbe<'a>>,
}

#[derive(Deserialize)]
struct DeltaProbe<'a> {
    #[serde(borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow, alias = "reasoning_content")]
    reasoning: Option<Cow<'a, str>>,
    tool_calls: Option<Vec<IgnoredAny>>,
}

fn probe(data: &str) -> EventKind {
    let Ok(probe) = serde_json::from_str::<Probe<'_>>(data) else {
        return EventKind::Other;
    };
    if let Some(kind) = probe.kind {
        if is_final_event(&kind) {
            return EventKind::End;
        }
        return if kind.ends_with(".delta") {
            EventKind::Content
        } else {
            EventKind::Other
        };
    }

    let has_content = probe
        .choices
        .iter()
        .filter_map(|c| c.delta.as_ref())
        .any(|d| {
            d.content.as_deref().is_some_and(|c| !c.is_empty())
                || d.reasoning.as_deref().is_some_and(|r| !r.is_empty())
                || d.tool_calls.as_ref().is_some_and(|t| !t.is_empty())
        });
    if has_content {
        EventKind::Content
    } else {
        EventKind::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events_of(chunks: &[&[u8]]) -> (Vec<u8>, EventClock) {
        let mut clock = EventClock::new(Instant::now(), true);
        for chunk in chunks {
            clock.push(chunk);
        }
        (clock.pending.clone(), clock)
    }

    #[test]
    fn events_are_found_across_chunk_boundaries() {
        let role = br#"data: {"choices":[{"delta":{"role":"assistant","content":""}}]}"#;
        let token = br#"data: {"choices":[{"delta":{"content":"hi"}}]}"#;
        let mut body = Vec::new();
        for event in [&role[..], &token[..], b"data: [DONE]"] {
            body.extend_from_slice(event);
            body.extend_from_slice(b"\n\n");
        }
        for split in 1..body.len() {
            let (pending, clock) = events_of(&[&body[..split], &body[split..]]);
            assert!(pending.is_empty(), "split at {split}");
            assert_eq!(clock.timings.sample.gaps.len(), 2, "split at {split}");
            assert!(
                clock.timings.sample.ttft.is_some() && clock.timings.ended,
                "split at {split}"
            );
        }
    }

    #[test]
    fn crlf_framed_events_are_found() {
        let (_, clock) = events_of(&[
            b"event: response.output_text.delta\r\ndata: {}\r\n\r\n",
            b"data: [DONE]\r\n\r\n",
        ]);
        assert!(clock.timings.sample.ttft.is_some() && clock.timings.ended);
    }

    #[test]
    fn content_is_text_tool_calls_or_named_deltas() {
        let text = br#"data: {"choices":[{"delta":{"content":"x"}}]}"#;
        let empty = br#"data: {"choices":[{"delta":{"role":"assistant","content":""}}]}"#;
        let tool = br#"data: {"choices":[{"delta":{"tool_calls":[{"index":0}]}}]}"#;
        let usage = br#"data: {"choices":[],"usage":{"prompt_tokens":1}}"#;
        let named = b"event: response.output_text.delta\ndata: {\"delta\":\"x\"}";
        let typed = br#"data: {"type":"response.output_text.delta","delta":"x"}"#;
        assert_eq!(classify(text, true), EventKind::Content);
        assert_eq!(classify(empty, true), EventKind::Other);
        assert_eq!(classify(tool, true), EventKind::Content);
        assert_eq!(classify(usage, true), EventKind::Other);
        assert_eq!(classify(named, true), EventKind::Content);
        assert_eq!(classify(typed, true), EventKind::Content);
        assert_eq!(classify(b"data: {\"id\": not json", true), EventKind::Other);
    }

    #[test]
    fn final_events_end_the_stream() {
        assert_eq!(classify(b"data: [DONE]", false), EventKind::End);
        assert_eq!(
            classify(b"event: response.completed\ndata: {}", false),
            EventKind::End
        );
        assert_eq!(
            classify(br#"data: {"type":"response.incomplete"}"#, false),
            EventKind::End
        );
    }

    #[test]
    fn a_stream_without_its_final_event_is_truncated() {
        let (_, clock) = events_of(&[b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n"]);
        assert_eq!(clock.finish().map(|_| ()), Err(Failure::Truncated));
    }
}
