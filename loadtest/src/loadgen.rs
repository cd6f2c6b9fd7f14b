//! The load generator: the same workload straight at the mock, then
//! through Warden, and what Warden adds.
//!
//! A run meets, in order: `target` (loopback-only base URLs), `workload`
//! (the one request body every target gets), `driver` (closed-loop or
//! fixed-rate scheduling, warm-up, time cap, progress line), `exchange`
//! (one timed HTTP/1.1 request over a keep-alive pool, reading SSE events
//! for time to first token and inter-event gaps), and `report` (HDR
//! histograms, per-target summaries, the Warden-minus-direct comparison,
//! and the table and JSON outputs). `spawn` is a separate scenario: a lead
//! standing up a fleet of sub-agents through the control plane.

mod driver;
mod exchange;
mod report;
mod spawn;
mod target;
mod workload;

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

pub use report::{Comparison, Percentiles, RunReport, TargetReport};
pub use spawn::{SpawnConfig, SpawnReport, run_spawn};
pub use target::{Target, is_loopback};
pub use workload::{Endpoint, Workload};

/// How requests are scheduled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// `concurrency` requests always in flight.
    Closed { concurrency: usize },
    /// `rate` requests per second, due on a fixed schedule, with at most
    /// `max_in_flight` outstanding.
    Rate { rate: f64, max_in_flight: usize },
}

/// Everything one run needs.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// The mock (or any provider) reached directly.
    pub direct: Target,
    /// Warden in front of the same provider, if it is to be compared.
    pub warden: Option<Target>,
    pub mode: Mode,
    pub workload: Workload,
    /// Measured requests per target.
    pub requests: u64,
    /// Hard cap on each target's measured phase (and, separately, its warm-up).
    pub duration: Duration,
    /// Unrecorded requests sent to each target before measuring.
    pub warmup: u64,
    /// Longest a single request may take before it counts as an error.
    pub timeout: Duration,
    /// Show the live progress line on stderr.
    pub progress: bool,
}

/// Why a run cannot start.
#[derive(Debug)]
pub enum LoadError {
    /// The URL does not parse or is not `http://`.
    InvalidUrl { url: String, why: String },
    /// The URL's host is not loopback.
    NotLoopback { url: String, host: String },
    /// A combination of settings that cannot work, described.
    Settings(String),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidUrl { url, why } => write!(f, "invalid target URL {url}: {why}"),
            Self::NotLoopback { url, host } => write!(
                f,
                "refusing target {url}: host {host} is not loopback \
                 (use 127.0.0.0/8, ::1 or localhost)"
            ),
            Self::Settings(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for LoadError {}

impl Mode {
    fn describe(&self) -> String {
        match self {
            Self::Closed { concurrency } => format!("closed, concurrency {concurrency}"),
            Self::Rate {
                rate,
                max_in_flight,
            } => format!("rate {rate} req/s, max in flight {max_in_flight}"),
        }
    }

    /// Connections worth keeping open: one per request that can be in flight.
    fn connections(&self) -> usize {
        match *self {
            Self::Closed { concurrency } => concurrency,
            Self::Rate { max_in_flight, .. } => max_in_flight,
        }
    }

    /// Warm-up runs closed-loop, as wide as the measured phase can get.
    fn warmup(&self) -> Self {
        Self::Closed {
            concurrency: self.connections().min(256),
        }
    }
}

impl LoadConfig {
    fn check(&self) -> Result<(), LoadError> {
        if self.workload.stream && self.workload.endpoint == Endpoint::Embeddings {
            return Err(LoadError::Settings(
                "--stream does not apply to --endpoint embeddings".into(),
            ));
        }
        match self.mode {
            Mode::Closed { concurrency: 0 } => Err(LoadError::Settings(
                "--concurrency must be at least 1".into(),
            )),
            Mode::Rate { rate, .. } if !(rate > 0.0 && rate.is_finite()) => {
                Err(LoadError::Settings(
                    "--rate must be a positive number of requests per second".into(),
                ))
            }
            Mode::Rate {
                max_in_flight: 0, ..
            } => Err(LoadError::Settings(
                "--max-in-flight must be at least 1".into(),
            )),
            _ if self.requests == 0 => {
                Err(LoadError::Settings("--requests must be at least 1".into()))
            }
            _ => Ok(()),
        }
    }
}

/// Runs the workload against the direct target, then Warden, and compares.
pub async fn run(config: &LoadConfig) -> Result<RunReport, LoadError> {
    config.check()?;
    let mut targets = vec![measure(config, &config.direct).await?];
    if let Some(warden) = &config.warden {
        targets.push(measure(config, warden).await?);
    }

    let comparison = match targets.as_slice() {
        [direct, warden] => Some(Comparison::between(direct, warden)),
        _ => None,
    };
    Ok(RunReport {
        workload: config.workload.clone(),
        mode: config.mode.describe(),
        targets,
        comparison,
    })
}

/// Warms `target` up, then measures it.
async fn measure(config: &LoadConfig, target: &Target) -> Result<TargetReport, LoadError> {
    let client = exchange::client(config.mode.connections());
    let call = exchange::Call {
        uri: target.uri(config.workload.endpoint.path())?,
        authorization: target.authorization().cloned(),
        body: config.workload.body(&target.name),
        stream: config.workload.stream,
    };
    let pass = |label: String, requests| driver::Pass {
        label,
        client: client.clone(),
        call: call.clone(),
        requests,
        deadline: Instant::now() + config.duration,
        timeout: config.timeout,
        progress: config.progress,
    };

    if config.warmup > 0 {
        tracing::info!(target.name = %target.name, requests = config.warmup, "warming up");
        driver::run(
            pass(format!("{} warm-up", target.name), config.warmup),
            config.mode.warmup(),
        )
        .await;
    }
    tracing::info!(target.name = %target.name, requests = config.requests, "measuring");
    let (recorder, elapsed) =
        driver::run(pass(target.name.clone(), config.requests), config.mode).await;
    Ok(recorder.report(&target.name, &target.base_url, elapsed))
}

#[cfg(test)]
mod tests;
