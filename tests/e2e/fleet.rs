//! A fleet under load: twenty sub-agents of one lead run two hundred concurrent
//! streams against budgets that cover about half the demand, across a SIGKILL and a
//! restart. Measured against the mock's own count of what it generated, no agent
//! spends past its slice and the lead's tree stays within the lead's limit; deadlines
//! still fire after the restart.

use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::{Value, json};

use crate::common::*;

const CHILDREN: usize = 20;
/// Three rounds of ten requests ask for about $0.036 per child: twice the slice.
const SLICE: &str = "0.018";
/// Each request asks for this many output tokens: $0.0012 at the mock's price.
const TOKENS: u64 = 2_000;

struct Child {
    name: String,
    key: String,
}

async fn spawn_child(h: &Harness, name: &str, slice: &str, lifetime: &str) -> Value {
    let body = json!({
        "parent": "lead-quarterly-orchestrator",
        "name": name,
        "budget": {"daily_limit": slice},
        "permissions": {"restrict_to": ["models.small"]},
        "lifecycle": {"max_duration": lifetime}
    });
    let response = reqwest::Client::new()
        .post(h.url("/v1/agents"))
        .bearer_auth(CASE_LEAD_KEY)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
}

/// One streamed request as `child`; the body is drained whatever happens.
async fn stream_as(url: String, child_key: String, tag: String) -> u16 {
    let body = json!({
        "model": "mock-small",
        "stream": true,
        "max_tokens": TOKENS,
        "messages": [{"role": "user", "content": "reconcile the ledger"}],
        "mock": {"tokens": TOKENS, "token_delay_us": 150, "tag": tag}
    });
    let sent = reqwest::Client::new()
        .post(url)
        .bearer_auth(child_key)
        .body(body.to_string())
        .send()
        .await;
    let Ok(response) = sent else { return 0 };
    let status = response.status().as_u16();
    let _ = response.bytes().await;
    status
}

/// Ten streams per child, all at once: two hundred in flight.
async fn load(url: String, children: &[Child]) -> Vec<u16> {
    let mut streams = Vec::new();
    for child in children {
        for _ in 0..10 {
            streams.push(stream_as(
                url.clone(),
                child.key.clone(),
                child.name.clone(),
            ));
        }
    }
    futures_util::future::join_all(streams).await
}

fn truth_cost(h: &Harness, tag: &str) -> Decimal {
    let truth = h.mock.truth(tag);
    mock_cost(truth.prompt_tokens, truth.completion_tokens_generated)
}

fn assert_within_limits(h: &Harness, children: &[Child]) {
    let slice = Decimal::from_str(SLICE).unwrap();
    let mut tree = Decimal::ZERO;
    for child in children {
        let spent = truth_cost(h, &child.name);
        assert!(spent <= slice, "{} spent {spent} of {slice}", child.name);
        tree += spent;
    }
    assert!(tree <= Decimal::from(2200), "the lead's tree spent {tree}");
}

// Two hundred streams from the clients and the in-process mock: more than one thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_streams_and_a_crash_stay_within_every_limit() {
    let mut h = Harness::start().await;
    let mut children = Vec::new();
    for n in 0..CHILDREN {
        let name = format!("worker-{n:02}");
        let spawned = spawn_child(&h, &name, SLICE, "72h").await;
        let key = spawned["api_key"].as_str().unwrap().to_owned();
        children.push(Child { name, key });
    }
    let short_lived = spawn_child(&h, "short-lived", "0.01", "3s").await;

    // Demand is 10 x $0.0012+ per child per round against a $0.018 slice: the first
    // round fits, the rest only in part.
    let first = load(h.url("/v1/chat/completions"), &children).await;
    assert!(first.iter().all(|s| *s == 200), "{first:?}");
    assert_within_limits(&h, &children);

    // Crash in the middle of the second round, then restart and run a third.
    let crash_load = load(h.url("/v1/chat/completions"), &children);
    let crash = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        h.crash();
    };
    let (during, ()) = tokio::join!(crash_load, crash);
    assert!(
        during.contains(&200),
        "some streams had started before the crash"
    );
    h.restart();

    let after = load(h.url("/v1/chat/completions"), &children).await;
    let refused = after.iter().filter(|s| **s == 429).count();
    assert!(refused > 0, "budgets ran out after the restart: {after:?}");
    assert_within_limits(&h, &children);

    // The short-lived agent's deadline fires after the restart too.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let id = short_lived["id"].as_str().unwrap();
    let response = reqwest::Client::new()
        .get(h.url(&format!("/v1/agents/{id}")))
        .bearer_auth(OPERATOR_KEY)
        .send()
        .await
        .unwrap();
    let agent: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(agent["state"], "ended", "{agent}");
    assert_eq!(agent["lifecycle"]["end_reason"], "expired");
    let status = stream_as(
        h.url("/v1/chat/completions"),
        short_lived["api_key"].as_str().unwrap().to_owned(),
        "short-lived".into(),
    )
    .await;
    assert_eq!(status, 401, "an expired agent's key is revoked");

    // The parent invariant, as Warden sees it after the restart: the slices are all
    // still committed (the short-lived one returned), and nothing is over the limit.
    let response = reqwest::Client::new()
        .get(h.url("/v1/agents/lead-quarterly-orchestrator/budget"))
        .bearer_auth(CASE_LEAD_KEY)
        .send()
        .await
        .unwrap();
    let lead: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(
        lead["delegated"], "0.36",
        "twenty live slices of $0.018: {lead}"
    );
    let committed: Decimal = ["spent", "reserved", "delegated", "available"]
        .iter()
        .map(|f| Decimal::from_str(lead[f].as_str().unwrap()).unwrap())
        .sum();
    assert_eq!(committed, Decimal::from(2200), "{lead}");
}
