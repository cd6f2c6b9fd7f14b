//! The load generator against in-process mocks.

use std::net::SocketAddr;
use std::time::Duration;

use super::*;
use crate::mock::{MockConfig, MockProvider};

async fn mock(config: MockConfig) -> MockProvider {
    MockProvider::start(SocketAddr::from(([127, 0, 0, 1], 0)), config)
        .await
        .expect("mock starts")
}

fn config(
    direct: &MockProvider,
    warden: Option<&MockProvider>,
    mode: Mode,
    stream: bool,
) -> LoadConfig {
    let target = |name, mock: &MockProvider| {
        Target::new(name, &mock.base_url(), Some("mock")).expect("loopback")
    };
    LoadConfig {
        direct: target("direct", direct),
        warden: warden.map(|w| target("warden", w)),
        mode,
        workload: Workload {
            endpoint: Endpoint::Chat,
            stream,
            model: "gpt-4o-mini".into(),
            tokens: Some(4),
            token_delay_us: None,
            tag: "lg".into(),
        },
        requests: 200,
        duration: Duration::from_secs(20),
        warmup: 10,
        timeout: Duration::from_secs(5),
        progress: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_streams_are_timed_and_compared() {
    let (direct, warden) = (
        mock(MockConfig::default()).await,
        mock(MockConfig::default()).await,
    );
    let report = run(&config(
        &direct,
        Some(&warden),
        Mode::Closed { concurrency: 8 },
        true,
    ))
    .await
    .expect("runs");

    for target in &report.targets {
        assert_eq!((target.requests_ok, target.errors), (200, 0), "{target:?}");
        assert!(target.ttft_us.is_some() && target.inter_event_us.is_some());
        // Role, four tokens, finish, usage, [DONE]: seven gaps per stream.
        assert_eq!(target.inter_event_us.map(|p| p.count), Some(200 * 7));
    }
    assert!(
        report
            .comparison
            .as_ref()
            .and_then(|c| c.throughput_ratio)
            .is_some()
    );
    assert_eq!(
        direct.truth("lg-direct").requests,
        210,
        "warm-up plus measured"
    );
    assert_eq!(warden.truth("lg-warden").completion_tokens_sent, 210 * 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_mode_sends_the_budget_on_schedule() {
    let direct = mock(MockConfig::default()).await;
    let mut config = config(
        &direct,
        None,
        Mode::Rate {
            rate: 2000.0,
            max_in_flight: 16,
        },
        false,
    );
    config.requests = 300;
    config.warmup = 0;
    let started = std::time::Instant::now();
    let report = run(&config).await.expect("runs");

    let direct_report = &report.targets[0];
    assert_eq!(direct_report.requests_ok, 300);
    assert!(
        started.elapsed() >= Duration::from_millis(140),
        "300 at 2000/s takes ~150 ms"
    );
    assert!(direct_report.ttft_us.is_none());
    assert!(report.comparison.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_time_cap_stops_a_run_by_itself() {
    let direct = mock(MockConfig::default()).await;
    let mut config = config(&direct, None, Mode::Closed { concurrency: 4 }, true);
    config.workload.token_delay_us = Some(10_000);
    config.workload.tokens = Some(1000);
    config.requests = 1_000_000;
    config.warmup = 0;
    config.duration = Duration::from_millis(300);

    let started = std::time::Instant::now();
    let report = run(&config).await.expect("runs");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        report.targets[0].cancelled, 4,
        "the four long streams in flight are cut"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_count_as_errors_by_status() {
    let direct = mock(MockConfig {
        api_key: Some("other".into()),
        ..MockConfig::default()
    })
    .await;
    let mut config = config(&direct, None, Mode::Closed { concurrency: 2 }, false);
    config.requests = 20;
    let report = run(&config).await.expect("runs");
    assert_eq!(
        report.targets[0].errors_by_kind.get("status 401"),
        Some(&20)
    );
}

#[tokio::test]
async fn impossible_settings_are_refused() {
    let direct = mock(MockConfig::default()).await;
    let mut config = config(&direct, None, Mode::Closed { concurrency: 1 }, true);
    config.workload.endpoint = Endpoint::Embeddings;
    assert!(matches!(run(&config).await, Err(LoadError::Settings(_))));
}
