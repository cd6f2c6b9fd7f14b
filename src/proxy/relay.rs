//! The relay phase of a streamed response: upstream SSE events go to the client one
//! by one, each metered on the way.
//!
//! [`Relay`] is the response body. Every time the client's connection wants more it
//! polls the relay, which hands over the next complete upstream event as the same
//! bytes the provider sent (a `Bytes` sharing the read buffer, not a copy). Nothing
//! waits for the stream to end: an event is forwarded as soon as it is framed and
//! metered. The relay settles exactly once: when the stream ends, when the provider
//! breaks it off (the client then gets an SSE error event before the close), or in
//! `Drop` when the client goes away, which also drops and so cancels the upstream
//! request.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use http::StatusCode;
use hyper::body::{Body, Incoming};
use serde::Serialize;

use super::sse::{self, Framer};
use super::{Endpoint, Outcome, Settlement};
use crate::error::ApiError;
use crate::metering::{EventClass, StreamMeter};

/// A streamed response in flight; see the module docs.
pub struct Relay {
    upstream: Incoming,
    framer: Framer,
    meter: StreamMeter,
    /// `None` once settled: the relay then yields nothing more.
    settlement: Option<Settlement>,
    /// Drop the usage-only chunk Warden asked for on the client's behalf.
    strip_usage: bool,
    /// The stream's terminal event (`[DONE]`, `response.completed`) has been seen.
    terminal: bool,
    /// Warden's own share of the time before the first byte went to the client.
    overhead: Duration,
    ttft: Option<Duration>,
    open_streams: prometheus::IntGauge,
}

/// What to do with one framed event.
enum Step {
    Forward,
    Skip,
    Fail(ApiError),
}

impl Relay {
    pub fn new(
        upstream: Incoming,
        meter: StreamMeter,
        settlement: Settlement,
        strip_usage: bool,
        upstream_wait: Duration,
    ) -> Relay {
        let open_streams = settlement.app().metrics.open_streams.clone();
        open_streams.inc();
        let overhead = settlement.overhead_besides(upstream_wait);
        Relay {
            upstream,
            framer: Framer::default(),
            meter,
            settlement: Some(settlement),
            strip_usage,
            terminal: false,
            overhead,
            ttft: None,
            open_streams,
        }
    }

    /// Meters one event and decides whether the client gets it.
    fn inspect(&mut self, raw: &[u8]) -> Step {
        let event = sse::parse(raw);
        let Some(data) = event.data.as_bytes() else {
            return Step::Forward; // a comment or keep-alive: nothing to meter
        };

        match self.meter.observe(data) {
            Ok(EventClass::Forward) => Step::Forward,
            Ok(EventClass::UsageOnly) if self.strip_usage => Step::Skip,
            Ok(EventClass::UsageOnly) => Step::Forward,
            Ok(EventClass::Done) => {
                self.terminal = true;
                Step::Forward
            }
            Err(malformed) => Step::Fail(ApiError::StreamInterrupted {
                provider: self.provider(),
                reason: malformed.to_string(),
            }),
        }
    }

    fn forwarded(&mut self) {
        if self.ttft.is_some() {
            return;
        }
        let Some(settlement) = &self.settlement else {
            return;
        };
        let ttft = settlement.started().elapsed();
        self.ttft = Some(ttft);
        settlement
            .app()
            .metrics
            .ttft
            .with_label_values(&[&settlement.route().model])
            .observe(ttft.as_secs_f64());
    }

    /// Settles with the meter's usage and how the stream ended.
    fn finish(&mut self, outcome: Outcome) {
        let Some(settlement) = self.settlement.take() else {
            return;
        };
        let (usage, source) = self.meter.settle();
        let ttft = self.ttft;
        settlement.settle(usage, source, StatusCode::OK, outcome, ttft, self.overhead);
    }

    /// Ends the stream because of `error`: the client gets it as an SSE error event.
    fn fail(&mut self, error: ApiError) -> Bytes {
        let endpoint = self.settlement.as_ref().map(Settlement::endpoint);
        if let Some(settlement) = &self.settlement {
            error.log(settlement.request_id());
        }
        self.finish(Outcome::UpstreamCut);
        error_event(endpoint.unwrap_or(Endpoint::Chat), &error)
    }

    /// The upstream ended: forward an unterminated last event, then close, with an
    /// error event first if the stream never reached its terminal event.
    fn end_of_upstream(&mut self) -> Option<Bytes> {
        if let Some(rest) = self.framer.take_rest() {
            match self.inspect(&rest) {
                Step::Forward => return Some(rest),
                Step::Skip => {}
                Step::Fail(error) => return Some(self.fail(error)),
            }
        }

        if self.terminal {
            self.finish(Outcome::Ok);
            return None;
        }
        let error = ApiError::StreamInterrupted {
            provider: self.provider(),
            reason: "the stream ended before its final event".into(),
        };
        Some(self.fail(error))
    }

    fn provider(&self) -> String {
        self.settlement
            .as_ref()
            .map_or_else(String::new, |s| s.route().provider.name.to_string())
    }
}

impl Stream for Relay {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.settlement.is_none() {
                return Poll::Ready(None);
            }

            while let Some(raw) = this.framer.next_event() {
                match this.inspect(&raw) {
                    Step::Forward => {
                        this.forwarded();
                        return Poll::Ready(Some(Ok(raw)));
                    }
                    Step::Skip => {}
                    Step::Fail(error) => return Poll::Ready(Some(Ok(this.fail(error)))),
                }
            }

            match ready!(Pin::new(&mut this.upstream).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // Trailers carry nothing to relay on an SSE stream.
                    if let Some(chunk) = frame.data_ref() {
                        this.framer.push(chunk);
                    }
                }
                Some(Err(e)) => {
                    let error = ApiError::StreamInterrupted {
                        provider: this.provider(),
                        reason: e.to_string(),
                    };
                    return Poll::Ready(Some(Ok(this.fail(error))));
                }
                None => return Poll::Ready(this.end_of_upstream().map(Ok)),
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.open_streams.dec();
        // Still unsettled: the client went away mid-stream. Dropping `upstream` right
        // after this cancels the provider's request.
        self.finish(Outcome::Abandoned);
    }
}

/// The SSE error event that ends a broken stream, in the endpoint's own error shape:
/// `{"error": {...}}` on chat streams, an `error` event on Responses streams.
fn error_event(endpoint: Endpoint, error: &ApiError) -> Bytes {
    let (prefix, json): (&[u8], Bytes) = match endpoint {
        Endpoint::Responses => (b"event: error\ndata: ", responses_error(error)),
        Endpoint::Chat | Endpoint::Embeddings => (b"data: ", error.body()),
    };
    [prefix, &json, b"\n\n"].concat().into()
}

fn responses_error(error: &ApiError) -> Bytes {
    let body = ResponsesError {
        kind: "error",
        code: error.descriptor().code,
        message: &error.to_string(),
        param: None,
    };
    serde_json::to_vec(&body)
        .expect("an error event of strings always serializes")
        .into()
}

#[derive(Serialize)]
struct ResponsesError<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    code: &'static str,
    message: &'a str,
    param: Option<&'static str>,
}
