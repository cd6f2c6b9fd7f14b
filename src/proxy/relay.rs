//! The relay phase of a streamed response: upstream SSE events go to the client one
//! by one, each metered on the way.
//!
//! [`Relay`] is the response body. Every time the client's connection wants more it
//! polls the relay, which meters every complete upstream event received so far and
//! hands them over as the same bytes the provider sent (a `Bytes` sharing the read
//! buffer, not a copy). Nothing waits: an event is forwarded as soon as it is framed
//! and metered, and events that arrived in one read leave in one write, so a provider
//! that bursts costs one syscall per burst rather than one per event.
//!
//! Limitation: hyper's client hands the upstream body over in single chunks through a
//! one-slot channel, so a provider that bursts one event per chunk still costs one
//! write per event here (about 3 µs of CPU each; see docs/benchmarks.md). The relay settles exactly once: when the stream ends, when the provider
//! breaks it off (the client then gets an SSE error event before the close), or in
//! `Drop` when the client goes away, which also drops and so cancels the upstream
//! request.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
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
    /// The error event of a broken stream, sent after the events before it.
    error_event: Option<Bytes>,
    /// How the upstream body ended, once it has; events still buffered go first.
    upstream_end: Option<UpstreamEnd>,
    /// Warden's own share of the time before the first byte went to the client.
    overhead: Duration,
    ttft: Option<Duration>,
    open_streams: prometheus::IntGauge,
}

/// How the upstream body ended.
enum UpstreamEnd {
    Finished,
    Failed(String),
}

/// Most upstream frames read in one go before the events so far are forwarded.
const FRAMES_PER_POLL: usize = 64;

/// What to do with one framed event.
enum Step {
    Forward,
    Skip,
    /// The event is malformed, for this reason.
    Fail(String),
}

/// Meters one raw event and decides whether the client gets it.
fn inspect(meter: &mut StreamMeter, terminal: &mut bool, strip_usage: bool, raw: &[u8]) -> Step {
    let event = sse::parse(raw);
    let Some(data) = event.data.as_bytes() else {
        return Step::Forward; // a comment or keep-alive: nothing to meter
    };

    match meter.observe(data) {
        Ok(EventClass::Forward) => Step::Forward,
        Ok(EventClass::UsageOnly) if strip_usage => Step::Skip,
        Ok(EventClass::UsageOnly) => Step::Forward,
        Ok(EventClass::Done) => {
            *terminal = true;
            Step::Forward
        }
        Err(malformed) => Step::Fail(malformed.to_string()),
    }
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
            error_event: None,
            upstream_end: None,
            overhead,
            ttft: None,
            open_streams,
        }
    }

    /// Meters one event and decides whether the client gets it.
    fn inspect(&mut self, raw: &[u8]) -> Step {
        inspect(&mut self.meter, &mut self.terminal, self.strip_usage, raw)
    }

    /// Meters every complete event in the buffer; returns the length of the prefix to
    /// forward. A usage chunk the client did not ask for is cut out of the buffer; a
    /// malformed event ends the stream, the events before it still forwarded.
    fn meter_ready_events(&mut self) -> usize {
        let mut end = 0;
        while let Some(next) = self.framer.event_end(end) {
            let raw = &self.framer.bytes()[end..next];
            match inspect(&mut self.meter, &mut self.terminal, self.strip_usage, raw) {
                Step::Forward if self.meter.over_cap() => {
                    self.error_event = Some(self.cut());
                    break;
                }
                Step::Forward => end = next,
                Step::Skip => self.framer.remove(end..next),
                Step::Fail(reason) => {
                    let error = self.interrupted(reason);
                    self.error_event = Some(self.fail(error));
                    break;
                }
            }
        }
        end
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

    /// Ends a stream that delivered more than the provider was allowed to generate:
    /// the budget reserved no more.
    fn cut(&mut self) -> Bytes {
        let Some(settlement) = &self.settlement else {
            return Bytes::new();
        };
        let error = ApiError::StreamBudget {
            agent: settlement.agent_id().to_owned(),
            tokens: self.meter.tokens_at_least() - 1,
        };
        error.log(settlement.request_id());
        let endpoint = settlement.endpoint();
        self.finish(Outcome::Cut);
        error_event(endpoint, &error)
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
                Step::Fail(reason) => {
                    let error = self.interrupted(reason);
                    return Some(self.fail(error));
                }
            }
        }

        if self.terminal {
            self.finish(Outcome::Ok);
            return None;
        }
        let error = self.interrupted("the stream ended before its final event".into());
        Some(self.fail(error))
    }

    fn interrupted(&self, reason: String) -> ApiError {
        ApiError::StreamInterrupted {
            provider: self.provider(),
            reason,
        }
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
            let upstream_pending = this.read_ready(cx);

            if this.settlement.is_some() {
                let ready = this.meter_ready_events();
                if ready > 0 {
                    this.forwarded();
                    return Poll::Ready(Some(Ok(this.framer.take(ready))));
                }
            }
            if let Some(error_event) = this.error_event.take() {
                return Poll::Ready(Some(Ok(error_event)));
            }
            if this.settlement.is_none() {
                return Poll::Ready(None);
            }

            match this.upstream_end.take() {
                Some(UpstreamEnd::Finished) => return Poll::Ready(this.end_of_upstream().map(Ok)),
                Some(UpstreamEnd::Failed(reason)) => {
                    let error = this.interrupted(reason);
                    return Poll::Ready(Some(Ok(this.fail(error))));
                }
                // The upstream registered our waker when it said Pending.
                None if upstream_pending => return Poll::Pending,
                // Read the frame limit without a complete event: read on.
                None => {}
            }
        }
    }
}

impl Relay {
    /// Reads every frame the upstream has ready (up to [`FRAMES_PER_POLL`]) into the
    /// framer. Returns true when the upstream said Pending, having kept our waker.
    fn read_ready(&mut self, cx: &mut Context<'_>) -> bool {
        if self.upstream_end.is_some() || self.settlement.is_none() {
            return false;
        }

        for _ in 0..FRAMES_PER_POLL {
            match Pin::new(&mut self.upstream).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers carry nothing to relay on an SSE stream.
                    if let Some(chunk) = frame.data_ref() {
                        self.framer.push(chunk);
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    self.upstream_end = Some(UpstreamEnd::Failed(e.to_string()));
                    return false;
                }
                Poll::Ready(None) => {
                    self.upstream_end = Some(UpstreamEnd::Finished);
                    return false;
                }
                Poll::Pending => return true,
            }
        }
        false
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
