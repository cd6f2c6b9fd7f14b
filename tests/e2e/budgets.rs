//! Budgets on the request path: the worst case is reserved before forwarding, a
//! request that does not fit is clamped or refused with 429 `budget_exceeded`, and the
//! provider's own count of what it generated never costs more than the agent's limit.

use std::str::FromStr;

use rust_decimal::Decimal;
use serde_json::{Value, json};

use crate::common::*;

fn limited_request(tokens: u64, stream: bool) -> Value {
    json!({
        "model": "mock-small",
        "stream": stream,
        "max_tokens": tokens,
        "messages": [{"role": "user", "content": "spend"}],
        "mock": {"tokens": tokens}
    })
}

async fn post_as(h: &Harness, key: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(h.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

/// What the mock generated, at the mock model's prices.
fn truth_cost(h: &Harness) -> Decimal {
    let truth = h.truth();
    mock_cost(truth.prompt_tokens, truth.completion_tokens_generated)
}

/// Requests one after another: each fits, then one is clamped to what is left, then
/// the agent is refused with the amount still available in the message.
#[tokio::test]
async fn sequential_spend_stops_at_the_limit() {
    let h = Harness::start().await;
    let limit = Decimal::from_str(LIMITED_LIMIT).unwrap();

    let mut refused = None;
    for _ in 0..20 {
        let response = post_as(&h, LIMITED_KEY, &limited_request(5_000, false)).await;
        if response.status() == 429 {
            let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
            refused = Some(body);
            break;
        }
        assert_eq!(response.status(), 200);
    }

    let body = refused.expect("the agent is refused once its budget is spent");
    assert_eq!(error_of(&body), ("insufficient_quota", "budget_exceeded"));
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("available") && message.contains(LIMITED_ID),
        "{message}"
    );

    let truth = h.truth();
    let clamped = truth.per_request.iter().any(|r| {
        let asked = r.body["max_tokens"].as_u64().unwrap();
        asked < 5_000 && r.completion_tokens_generated == asked
    });
    assert!(
        clamped,
        "the last request that fit was clamped to the budget left"
    );
    assert!(
        truth_cost(&h) <= limit,
        "spent {} of {limit}",
        truth_cost(&h)
    );
    assert!(
        truth_cost(&h) >= limit * Decimal::from_str("0.9").unwrap(),
        "the budget was used"
    );

    // The breaker trip is a decision, recorded once however many requests it refuses.
    let refused_again = post_as(&h, LIMITED_KEY, &limited_request(5_000, false)).await;
    assert_eq!(refused_again.status(), 429);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while h.decisions("breaker_trip", Some(LIMITED_ID)).is_empty()
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let trips = h.decisions("breaker_trip", Some(LIMITED_ID));
    assert_eq!(trips.len(), 1, "{trips:?}");

    // The lead is a different agent: its own budget is untouched.
    let other = post_as(&h, AGENT_KEY, &limited_request(10, false)).await;
    assert_eq!(other.status(), 200);
}

/// Fifty concurrent streams against a budget that covers about a third of them: the
/// cost of everything the mock generated stays within the limit.
#[tokio::test]
async fn concurrent_streams_never_pass_the_limit() {
    let h = Harness::start().await;
    let limit = Decimal::from_str(LIMITED_LIMIT).unwrap();

    let mut requests = Vec::new();
    for _ in 0..50 {
        let mut body = limited_request(1_000, true);
        body["mock"]["token_delay_us"] = json!(200);
        let h = &h;
        requests.push(async move {
            let response = post_as(h, LIMITED_KEY, &body).await;
            let status = response.status().as_u16();
            let _ = response.bytes().await;
            status
        });
    }
    let statuses = futures_util::future::join_all(requests).await;

    let ok = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(ok + refused, 50, "{statuses:?}");
    assert!(ok >= 10 && refused >= 10, "{ok} served, {refused} refused");
    assert!(
        truth_cost(&h) <= limit,
        "spent {} of {limit}",
        truth_cost(&h)
    );
}
