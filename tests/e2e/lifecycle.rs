//! Operating Warden: Prometheus metrics, health, and graceful shutdown.

use std::io::Write;
use std::process::{Command, Stdio};

use futures_util::StreamExt;
use serde_json::json;

use crate::common::*;

/// `/metrics` shows the agent's spend and passes `promtool check metrics`.
#[tokio::test]
async fn metrics_show_spend_and_pass_promtool() {
    let h = Harness::start().await;
    let body = json!({"model": "mock-small", "messages": [{"role": "user", "content": "a b c"}]});
    assert_eq!(
        h.post_json("/v1/chat/completions", &body).await.status(),
        200
    );
    let stream = json!({"model": "mock-small", "stream": true, "messages": [{"role": "user", "content": "a"}]});
    h.post_json("/v1/chat/completions", &stream)
        .await
        .text()
        .await
        .unwrap();
    h.usage_records(2).await;

    let metrics = h.metrics().await;
    let spend = format!("warden_spend_usd_total{{agent=\"{AGENT_ID}\",model=\"mock-small\"}}");
    assert!(metrics.contains(&spend), "{metrics}");
    for name in [
        "warden_requests_total",
        "warden_tokens_total",
        "warden_upstream_latency_seconds_bucket",
        "warden_proxy_overhead_seconds_bucket",
        "warden_time_to_first_token_seconds_bucket",
        "warden_open_streams 0",
        "warden_usage_backlog 0",
        "warden_control_writes_queued 0",
    ] {
        assert!(metrics.contains(name), "missing {name}");
    }
    // The lead's first start stored it: at least one control write, in some commit.
    let (commits, writes) = (
        sample(&metrics, "warden_control_commits_total"),
        sample(&metrics, "warden_control_writes_total"),
    );
    assert!(
        writes >= commits && commits >= 1.0,
        "{commits} commits, {writes} writes"
    );

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian package `prometheus`)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let output = promtool.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The value of an unlabelled sample in Prometheus text.
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in {metrics}"))
}

#[tokio::test]
async fn health_and_readiness() {
    let h = Harness::start().await;
    assert_eq!(reqwest::get(h.url("/healthz")).await.unwrap().status(), 200);
    assert_eq!(reqwest::get(h.url("/readyz")).await.unwrap().status(), 200);
}

/// SIGTERM lets an open stream finish, then commits its usage record before exit.
#[tokio::test]
async fn sigterm_drains_open_streams_and_flushes_usage() {
    let mut h = Harness::start().await;
    let body = json!({"model": "mock-small", "stream": true,
        "messages": [{"role": "user", "content": "go"}],
        "mock": {"tokens": 20, "token_delay_us": 25_000}});

    let response = h.post_json("/v1/chat/completions", &body).await;
    let mut bytes = response.bytes_stream();
    let first = bytes.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));

    let exit = tokio::task::spawn_blocking(move || {
        let code = h.terminate();
        (h, code)
    });
    let mut rest = Vec::new();
    while let Some(chunk) = bytes.next().await {
        rest.extend_from_slice(&chunk.expect("the stream is not cut"));
    }
    assert!(rest.ends_with(b"data: [DONE]\n\n"));

    let (h, code) = exit.await.unwrap();
    assert_eq!(code, Some(0));
    let db = rusqlite::Connection::open(h.database()).unwrap();
    let (outcome, output): (String, i64) = db
        .query_row("SELECT outcome, output_tokens FROM usage", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((outcome.as_str(), output), ("ok", 20));
}
