//! Ground truth: what the mock really received, generated and sent.
//!
//! Every accepted request is admitted into the ledger before its response
//! headers go out. The ledger keeps running totals per tag (atomic counters
//! the request path bumps without a lock) and the most recent requests of
//! each tag, up to a cap, for tests that inspect single exchanges. Reading
//! the truth takes a snapshot; clearing starts a new ledger, and requests
//! still in flight keep counting into the totals they were admitted under.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Ground truth for one tag, or for every tag: totals and recent requests.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Truth {
    /// Requests admitted (authenticated, parsed, and answered by the mock).
    pub requests: u64,
    /// Prompt tokens under the mock's token model; 0 for error faults.
    pub prompt_tokens: u64,
    /// Completion tokens produced, counted just before their event is emitted.
    pub completion_tokens_generated: u64,
    /// Completion tokens handed to the HTTP layer; never above generated.
    pub completion_tokens_sent: u64,
    /// The most recent requests, oldest first, up to the ledger's cap per tag.
    pub per_request: Vec<RequestTruth>,
}

/// Ground truth for one request.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct RequestTruth {
    /// The response id (`chatcmpl-mock-N`, `resp_mock_N`, `embd-mock-N`, `replay-mock-N`).
    pub id: String,
    /// The `mock.tag` of the request, "" when absent.
    pub tag: String,
    /// The request path, e.g. `/v1/chat/completions`.
    pub endpoint: String,
    /// The `model` of the request body, "" when absent.
    pub model: String,
    /// Whether the response was an event stream.
    pub stream: bool,
    pub prompt_tokens: u64,
    pub completion_tokens_generated: u64,
    pub completion_tokens_sent: u64,
    /// True once the whole well-formed response was handed to the HTTP layer.
    pub finished: bool,
    /// The `Authorization` header as received.
    pub authorization: Option<String>,
    /// The request body as received.
    pub body: Value,
}

/// Requests kept per tag for `per_request`; older ones only count in totals.
pub(crate) const RECENT_PER_TAG: usize = 10_000;

/// The store of ground truth shared by all connections.
#[derive(Default)]
pub(crate) struct Ledger {
    tags: Mutex<HashMap<String, TagLedger>>,
    /// Admission counter, giving each request its place in the timeline.
    next_seq: AtomicU64,
}

/// One tag's totals and its most recent requests.
struct TagLedger {
    totals: Arc<TagTotals>,
    recent: VecDeque<Arc<LiveRequest>>,
}

/// Running totals of one tag, bumped lock-free by the request path.
#[derive(Default)]
pub(crate) struct TagTotals {
    tag: String,
    requests: AtomicU64,
    prompt_tokens: AtomicU64,
    generated: AtomicU64,
    sent: AtomicU64,
}

/// What the request path knows about a request when it admits it.
pub(crate) struct Admission<'a> {
    pub id: String,
    pub tag: &'a str,
    pub endpoint: &'static str,
    pub stream: bool,
    pub prompt_tokens: u64,
    pub authorization: Option<String>,
    pub body: Value,
}

/// The ground truth of one request while it is being answered.
pub(crate) struct LiveRequest {
    /// Admission order, to merge tags back into one timeline.
    seq: u64,
    id: String,
    endpoint: &'static str,
    stream: bool,
    prompt_tokens: u64,
    authorization: Option<String>,
    body: Value,
    generated: AtomicU64,
    sent: AtomicU64,
    finished: AtomicBool,
    totals: Arc<TagTotals>,
}

impl Ledger {
    /// Admits a request: counts it under its tag and keeps it among the recent.
    pub(crate) fn admit(&self, admission: Admission<'_>) -> Arc<LiveRequest> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let mut tags = self.lock();
        let ledger = match tags.get_mut(admission.tag) {
            Some(ledger) => ledger,
            None => tags
                .entry(admission.tag.to_owned())
                .or_insert_with(|| TagLedger::new(admission.tag)),
        };
        let request = Arc::new(LiveRequest::new(seq, admission, ledger.totals.clone()));
        ledger.recent.push_back(request.clone());
        if ledger.recent.len() > RECENT_PER_TAG {
            ledger.recent.pop_front();
        }
        drop(tags);

        request.totals.requests.fetch_add(1, Ordering::Relaxed);
        request
            .totals
            .prompt_tokens
            .fetch_add(request.prompt_tokens, Ordering::Relaxed);
        request
    }

    /// The truth for `tag`, or across all tags when `tag` is `None`.
    pub(crate) fn snapshot(&self, tag: Option<&str>) -> Truth {
        let tags = self.lock();
        let mut truth = Truth::default();
        let selected = tags
            .iter()
            .filter(|(name, _)| tag.is_none_or(|t| t == name.as_str()));
        let mut recent: Vec<&Arc<LiveRequest>> = Vec::new();
        for (_, ledger) in selected {
            ledger.totals.add_to(&mut truth);
            recent.extend(ledger.recent.iter());
        }

        recent.sort_by_key(|r| r.seq);
        truth.per_request = recent.into_iter().map(|r| r.snapshot()).collect();
        truth
    }

    /// Forgets everything; requests in flight keep counting into orphaned totals.
    pub(crate) fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, TagLedger>> {
        // A panic while holding the lock cannot leave the map half-updated in a
        // way that matters for test bookkeeping, so a poisoned lock is reused.
        self.tags
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl TagLedger {
    fn new(tag: &str) -> Self {
        let totals = TagTotals {
            tag: tag.to_owned(),
            ..TagTotals::default()
        };
        Self {
            totals: Arc::new(totals),
            recent: VecDeque::new(),
        }
    }
}

impl TagTotals {
    fn add_to(&self, truth: &mut Truth) {
        truth.requests += self.requests.load(Ordering::Relaxed);
        truth.prompt_tokens += self.prompt_tokens.load(Ordering::Relaxed);
        truth.completion_tokens_generated += self.generated.load(Ordering::Relaxed);
        truth.completion_tokens_sent += self.sent.load(Ordering::Relaxed);
    }
}

impl LiveRequest {
    fn new(seq: u64, admission: Admission<'_>, totals: Arc<TagTotals>) -> Self {
        Self {
            seq,
            id: admission.id,
            endpoint: admission.endpoint,
            stream: admission.stream,
            prompt_tokens: admission.prompt_tokens,
            authorization: admission.authorization,
            body: admission.body,
            generated: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            finished: AtomicBool::new(false),
            totals,
        }
    }

    /// The response id.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// The request body as received.
    pub(crate) fn body(&self) -> &Value {
        &self.body
    }

    /// The requested model, echoed in responses.
    pub(crate) fn model(&self) -> &str {
        self.body.get("model").and_then(Value::as_str).unwrap_or("")
    }

    /// Counts `n` completion tokens as produced.
    pub(crate) fn generate(&self, n: u64) {
        self.generated.fetch_add(n, Ordering::Relaxed);
        self.totals.generated.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts `n` completion tokens as handed to the HTTP layer.
    pub(crate) fn send(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
        self.totals.sent.fetch_add(n, Ordering::Relaxed);
    }

    /// Marks the response as wholly and correctly delivered.
    pub(crate) fn finish(&self) {
        self.finished.store(true, Ordering::Relaxed);
    }

    fn snapshot(&self) -> RequestTruth {
        RequestTruth {
            id: self.id.clone(),
            tag: self.totals.tag.clone(),
            endpoint: self.endpoint.to_owned(),
            model: self.model().to_owned(),
            stream: self.stream,
            prompt_tokens: self.prompt_tokens,
            completion_tokens_generated: self.generated.load(Ordering::Relaxed),
            completion_tokens_sent: self.sent.load(Ordering::Relaxed),
            finished: self.finished.load(Ordering::Relaxed),
            authorization: self.authorization.clone(),
            body: self.body.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn admission(tag: &str, prompt_tokens: u64) -> Admission<'_> {
        Admission {
            id: format!("id-{tag}-{prompt_tokens}"),
            tag,
            endpoint: "/v1/chat/completions",
            stream: true,
            prompt_tokens,
            authorization: Some("Bearer k".into()),
            body: json!({"model": "m"}),
        }
    }

    #[test]
    fn totals_aggregate_per_tag_and_across_tags() {
        let ledger = Ledger::default();
        let a = ledger.admit(admission("a", 3));
        a.generate(2);
        a.send(1);
        let b = ledger.admit(admission("b", 5));
        b.generate(4);
        b.send(4);
        b.finish();

        let truth = ledger.snapshot(Some("a"));
        assert_eq!((truth.requests, truth.prompt_tokens), (1, 3));
        assert_eq!(
            (
                truth.completion_tokens_generated,
                truth.completion_tokens_sent
            ),
            (2, 1)
        );
        assert!(!truth.per_request[0].finished);
        assert_eq!(truth.per_request[0].model, "m");

        let all = ledger.snapshot(None);
        assert_eq!(
            (all.requests, all.prompt_tokens, all.completion_tokens_sent),
            (2, 8, 5)
        );
        let ids: Vec<_> = all.per_request.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["id-a-3", "id-b-5"]);
        assert_eq!(ledger.snapshot(Some("missing")).requests, 0);
    }

    #[test]
    fn recent_requests_are_capped_but_totals_are_not() {
        let ledger = Ledger::default();
        for _ in 0..RECENT_PER_TAG + 5 {
            ledger.admit(admission("t", 1));
        }
        let truth = ledger.snapshot(Some("t"));
        assert_eq!(truth.requests, RECENT_PER_TAG as u64 + 5);
        assert_eq!(truth.per_request.len(), RECENT_PER_TAG);
    }

    #[test]
    fn clear_forgets_everything() {
        let ledger = Ledger::default();
        let request = ledger.admit(admission("", 1));
        ledger.clear();
        request.generate(1);
        assert_eq!(ledger.snapshot(None).requests, 0);
        assert_eq!(ledger.snapshot(None).completion_tokens_generated, 0);
    }
}
