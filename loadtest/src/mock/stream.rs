//! The event-stream driver shared by every streaming endpoint.
//!
//! An endpoint describes its stream as a [`Script`]: opening events, one
//! event per token, closing events. The driver turns that into a body stream
//! with one chunk per event, paces the token events, counts each token as
//! generated just before its event is yielded and as sent on the next poll,
//! injects stream faults, and marks the request finished only when the last
//! event has gone out and the stream is polled to its end.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use tokio::time::Instant;

use super::options::StreamFault;
use super::truth::LiveRequest;

/// The broken event sent by `malformed_after`.
pub(crate) const MALFORMED_EVENT: &[u8] = b"data: {\"id\": not json\n\n";

/// The events of one streamed response, written on demand.
pub(crate) trait Script: Send + 'static {
    /// Writes opening event `step` into `out`; false once there are no more.
    fn opening(&mut self, step: usize, out: &mut Vec<u8>) -> bool;
    /// Writes the event(s) carrying completion token `index` into `out`.
    fn token(&mut self, index: u32, out: &mut Vec<u8>);
    /// Writes closing event `step` into `out`; false once there are no more.
    fn closing(&mut self, step: usize, out: &mut Vec<u8>) -> bool;
}

/// How a stream is paced and whether it breaks.
pub(crate) struct Plan {
    /// Completion tokens in the stream.
    pub tokens: u32,
    /// Pacing between token events; zero sends them back to back.
    pub token_delay: Duration,
    /// A fault fired in place of token `after` (or of the closing events
    /// when the stream has no more than `after` tokens).
    pub fault: Option<(StreamFault, u32)>,
}

/// Where the driver is in the script.
#[derive(Clone, Copy)]
enum Phase {
    Opening(usize),
    Tokens(u32),
    Closing(usize),
    Done,
}

struct Driver<S> {
    script: S,
    request: Arc<LiveRequest>,
    plan: Plan,
    /// Token pacing is measured from here, so slow polls do not add up.
    start: Instant,
    phase: Phase,
    /// A token event was yielded and is counted as sent on the next poll.
    unsent: bool,
}

/// The body stream for `script`, accounting into `request`.
pub(crate) fn events<S: Script>(
    script: S,
    request: Arc<LiveRequest>,
    plan: Plan,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let driver = Driver {
        script,
        request,
        plan,
        start: Instant::now(),
        phase: Phase::Opening(0),
        unsent: false,
    };
    futures_util::stream::unfold(driver, Driver::step)
}

impl<S: Script> Driver<S> {
    async fn step(mut self) -> Option<(io::Result<Bytes>, Self)> {
        if std::mem::take(&mut self.unsent) {
            self.request.send(1);
        }
        loop {
            let mut out = Vec::with_capacity(320);
            match self.phase {
                Phase::Opening(step) => {
                    if self.script.opening(step, &mut out) {
                        self.phase = Phase::Opening(step + 1);
                        return Some((Ok(out.into()), self));
                    }
                    self.phase = Phase::Tokens(0);
                }
                Phase::Tokens(index) => {
                    if let Some(fault) = self.fault_at(index) {
                        // Pending once first, so hyper flushes the events so far:
                        // the client must see them before the connection breaks.
                        tokio::task::yield_now().await;
                        self.phase = Phase::Done;
                        return Some((fault_event(fault), self));
                    }
                    if index >= self.plan.tokens {
                        self.phase = Phase::Closing(0);
                        continue;
                    }
                    pace(self.start, self.plan.token_delay, index).await;
                    self.request.generate(1);
                    self.script.token(index, &mut out);
                    self.unsent = true;
                    self.phase = Phase::Tokens(index + 1);
                    return Some((Ok(out.into()), self));
                }
                Phase::Closing(step) => {
                    if self.script.closing(step, &mut out) {
                        self.phase = Phase::Closing(step + 1);
                        return Some((Ok(out.into()), self));
                    }
                    self.request.finish();
                    self.phase = Phase::Done;
                }
                Phase::Done => return None,
            }
        }
    }

    /// The fault due before token `index`, if this is where it fires.
    fn fault_at(&mut self, index: u32) -> Option<StreamFault> {
        let (fault, after) = self.plan.fault?;
        (index == after.min(self.plan.tokens)).then_some(fault)
    }
}

/// Waits until token `index` is due: `(index + 1) * delay` after `start`.
/// Pacing against a fixed start keeps the average rate right even though
/// tokio's timer only wakes on millisecond ticks.
///
/// Limitation: with delays under a millisecond, tokens leave in bursts on
/// each timer tick rather than evenly spaced, so inter-event gaps measured
/// against the mock are lumpy at that scale; the average rate is right.
async fn pace(start: Instant, delay: Duration, index: u32) {
    let due = delay
        .checked_mul(index + 1)
        .and_then(|d| start.checked_add(d));
    let Some(due) = due else { return };
    if due > Instant::now() {
        tokio::time::sleep_until(due).await;
    }
}

/// The chunk a stream fault yields: a broken event, or an error that makes
/// hyper abort the connection without the terminating chunk.
fn fault_event(fault: StreamFault) -> io::Result<Bytes> {
    match fault {
        StreamFault::Malformed => Ok(Bytes::from_static(MALFORMED_EVENT)),
        StreamFault::Disconnect => Err(io::Error::other("mock disconnect_after fault")),
    }
}

/// Appends one `data: <json>\n\n` event.
pub(crate) fn write_data<T: serde::Serialize>(out: &mut Vec<u8>, value: &T) {
    out.extend_from_slice(b"data: ");
    write_json(out, value);
    out.extend_from_slice(b"\n\n");
}

/// Appends one `event: <name>\ndata: <json>\n\n` event.
pub(crate) fn write_named<T: serde::Serialize>(out: &mut Vec<u8>, name: &str, value: &T) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.push(b'\n');
    write_data(out, value);
}

/// Appends `value` as compact JSON.
pub(crate) fn write_json<T: serde::Serialize>(out: &mut Vec<u8>, value: &T) {
    // Serializing our own plain structs into a Vec cannot fail: they have no
    // maps with non-string keys and no fallible Serialize impls.
    serde_json::to_writer(out, value).expect("mock event structs always serialize");
}
