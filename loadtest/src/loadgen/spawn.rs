//! The spawn scenario: a lead stands up a fleet of sub-agents through Warden's control
//! plane, `concurrency` spawns at a time, then ends them again.
//!
//! Reports each spawn's latency (HDR percentiles), the time to stand up the whole
//! fleet (first request sent to last response read) and each termination's latency.
//! Every agent spawned is terminated before the run returns, so runs can repeat.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::exchange::{HttpClient, client};
use super::report::Percentiles;
use super::{LoadError, Target};

/// What to spawn.
#[derive(Clone, Debug)]
pub struct SpawnConfig {
    /// Warden's base URL (with `/v1`) and the lead's key.
    pub warden: Target,
    /// The parent: the lead's name, id or SPIFFE ID.
    pub parent: String,
    pub agents: usize,
    pub concurrency: usize,
    /// Each child's daily slice, a decimal string.
    pub slice: String,
    /// Names are `<prefix>-<n>`.
    pub prefix: String,
}

/// Latencies in microseconds, and the fleet time.
#[derive(Debug, Serialize)]
pub struct SpawnReport {
    pub agents: usize,
    pub concurrency: usize,
    pub spawned: usize,
    pub refused: usize,
    pub spawn_us: Option<Percentiles>,
    pub fleet_ms: f64,
    pub terminate_us: Option<Percentiles>,
}

impl fmt::Display for SpawnReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |us: u64| us as f64 / 1e3;
        writeln!(
            f,
            "spawn scenario: {} agents, {} at a time",
            self.agents, self.concurrency
        )?;
        writeln!(f, "spawned           {:>9}", self.spawned)?;
        writeln!(f, "refused           {:>9}", self.refused)?;
        writeln!(f, "fleet time        {:>9.1} ms", self.fleet_ms)?;
        if let Some(s) = &self.spawn_us {
            writeln!(f, "spawn p50         {:>9.3} ms", ms(s.p50))?;
            writeln!(f, "spawn p90         {:>9.3} ms", ms(s.p90))?;
            writeln!(f, "spawn p99         {:>9.3} ms", ms(s.p99))?;
            writeln!(f, "spawn max         {:>9.3} ms", ms(s.max))?;
        }
        if let Some(t) = &self.terminate_us {
            writeln!(f, "terminate p50     {:>9.3} ms", ms(t.p50))?;
            writeln!(f, "terminate p99     {:>9.3} ms", ms(t.p99))?;
        }
        Ok(())
    }
}

/// Spawns the fleet, then terminates it.
pub async fn run_spawn(config: &SpawnConfig) -> Result<SpawnReport, LoadError> {
    let http = client(config.concurrency.max(1));
    let (spawned, spawn_us, fleet) = spawn_fleet(config, &http).await?;
    let refused = config.agents - spawned.len();
    let terminate_us = terminate_fleet(config, &http, &spawned).await?;

    Ok(SpawnReport {
        agents: config.agents,
        concurrency: config.concurrency,
        spawned: spawned.len(),
        refused,
        spawn_us: Percentiles::of(&spawn_us),
        fleet_ms: fleet.as_secs_f64() * 1e3,
        terminate_us: Percentiles::of(&terminate_us),
    })
}

type Latencies = Histogram<u64>;

fn histogram() -> Latencies {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds are valid")
}

async fn spawn_fleet(
    config: &SpawnConfig,
    http: &HttpClient,
) -> Result<(Vec<String>, Latencies, Duration), LoadError> {
    let slots = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let uri = config.warden.uri("/agents")?;
    let mut tasks = JoinSet::new();
    let started = Instant::now();

    for n in 0..config.agents {
        let body = serde_json::json!({
            "parent": config.parent,
            "name": format!("{}-{n:03}", config.prefix),
            "budget": {"daily_limit": config.slice, "currency": "USD", "source": "parent_slice"},
            "trust": {"initial_level": "WATCHED"},
            "lifecycle": {"max_duration": "1h", "auto_terminate": true}
        });
        let request = request(&config.warden, Method::POST, uri.clone(), Some(body))?;
        let (http, slots) = (http.clone(), Arc::clone(&slots));
        tasks.spawn(async move {
            let _slot = slots.acquire_owned().await;
            let sent = Instant::now();
            let answer = send(&http, request).await;
            (answer, sent.elapsed())
        });
    }

    let mut ids = Vec::new();
    let mut latencies = histogram();
    while let Some(joined) = tasks.join_next().await {
        let Ok((answer, took)) = joined else { continue };
        let _ = latencies.record(took.as_micros().max(1) as u64);
        if let Ok((StatusCode::CREATED, body)) = answer
            && let Some(id) = body["id"].as_str()
        {
            ids.push(id.to_owned());
        }
    }
    Ok((ids, latencies, started.elapsed()))
}

async fn terminate_fleet(
    config: &SpawnConfig,
    http: &HttpClient,
    ids: &[String],
) -> Result<Latencies, LoadError> {
    let mut latencies = histogram();
    for id in ids {
        let uri = config.warden.uri(&format!("/agents/{id}"))?;
        let request = request(&config.warden, Method::DELETE, uri, None)?;
        let sent = Instant::now();
        let answer = send(http, request).await;
        let _ = latencies.record(sent.elapsed().as_micros().max(1) as u64);
        if !matches!(answer, Ok((StatusCode::OK, _))) {
            return Err(LoadError::Settings(format!(
                "could not terminate {id}: {answer:?}"
            )));
        }
    }
    Ok(latencies)
}

fn request(
    target: &Target,
    method: Method,
    uri: http::Uri,
    body: Option<serde_json::Value>,
) -> Result<Request<Full<Bytes>>, LoadError> {
    let mut builder = Request::builder().method(method).uri(uri);
    if let Some(authorization) = target.authorization() {
        builder = builder.header(header::AUTHORIZATION, authorization.clone());
    }
    let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    builder
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| LoadError::Settings(format!("building a request: {e}")))
}

async fn send(
    http: &HttpClient,
    request: Request<Full<Bytes>>,
) -> Result<(StatusCode, serde_json::Value), String> {
    let response = tokio::time::timeout(Duration::from_secs(30), http.request(request))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, serde_json::from_slice(&body).unwrap_or_default()))
}
