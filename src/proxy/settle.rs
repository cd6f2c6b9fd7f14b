//! The settle phase: a forwarded request's usage becomes its cost, its metrics and
//! its one usage record.
//!
//! A [`Settlement`] is created when a request is admitted and consumed exactly once,
//! by whichever way the request ends: a body read, a stream finished, cut or
//! abandoned, or an upstream fault. Being consumed by value is what makes "once"
//! hold: a relay that is dropped settles in its `Drop`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::response::{IntoResponse, Response};
use http::StatusCode;

use super::{Endpoint, Route};
use crate::budget::{Amount, Reservation};
use crate::error::ApiError;
use crate::identity::Agent;
use crate::metering::{self, Usage, UsageSource};
use crate::server::App;
use crate::store::UsageRecord;

/// How a forwarded request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Completed normally.
    Ok,
    /// The provider refused it with a 4xx, passed through to the client.
    UpstreamRejected,
    /// The provider failed (5xx, timeout, unreachable) before a response began.
    UpstreamError,
    /// The provider's stream broke off or sent an unreadable event.
    UpstreamCut,
    /// The client went away before the stream ended.
    Abandoned,
    /// Warden cut the stream at the output its budget reserved.
    Cut,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::UpstreamRejected => "upstream_rejected",
            Outcome::UpstreamError => "upstream_error",
            Outcome::UpstreamCut => "upstream_cut",
            Outcome::Abandoned => "abandoned",
            Outcome::Cut => "cut",
        }
    }
}

/// What is known of a request once it is admitted: who sent it, where it goes.
pub struct Admitted {
    pub request_id: Arc<str>,
    pub agent: Arc<Agent>,
    pub route: Arc<Route>,
    pub endpoint: Endpoint,
    pub stream: bool,
    /// When the request arrived.
    pub started: Instant,
}

/// Everything needed to settle one admitted request.
pub struct Settlement {
    app: Arc<App>,
    request_id: Arc<str>,
    agent: Arc<Agent>,
    route: Arc<Route>,
    endpoint: Endpoint,
    stream: bool,
    started: Instant,
    started_at_ms: i64,
    /// The worst-case cost held for this request, settled with the actual cost.
    reservation: Reservation,
}

impl Settlement {
    pub fn new(app: Arc<App>, admitted: Admitted, reservation: Reservation) -> Settlement {
        let started_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        Settlement {
            app,
            request_id: admitted.request_id,
            agent: admitted.agent,
            route: admitted.route,
            endpoint: admitted.endpoint,
            stream: admitted.stream,
            started: admitted.started,
            started_at_ms,
            reservation,
        }
    }

    pub fn route(&self) -> &Route {
        &self.route
    }

    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn agent_id(&self) -> &str {
        &self.agent.spiffe_id
    }

    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    pub fn app(&self) -> &App {
        &self.app
    }

    /// Warden's own share of the request so far: everything but `upstream_time`.
    pub fn overhead_besides(&self, upstream_time: Duration) -> Duration {
        self.started.elapsed().saturating_sub(upstream_time)
    }

    /// Settles a request that used `usage`. `overhead` is the time Warden itself
    /// added, as opposed to waiting on the provider.
    pub fn settle(
        self,
        usage: Usage,
        source: UsageSource,
        status: StatusCode,
        outcome: Outcome,
        ttft: Option<Duration>,
        overhead: Duration,
    ) {
        let cost = metering::cost(&self.route.price, &usage);
        let held = self.reservation.amount();
        self.reservation
            .settle(Amount::from_usd(cost).unwrap_or(held));
        let latency = self.started.elapsed();
        let metrics = &self.app.metrics;
        let (agent, model) = (&*self.agent.spiffe_id, &*self.route.model);

        metrics
            .requests
            .with_label_values(&[agent, model, self.endpoint.name(), status.as_str()])
            .inc();
        metrics.overhead.observe(overhead.as_secs_f64());
        if usage != Usage::default() {
            count_tokens(&self.app, agent, model, &usage);
            let cost_f64 = cost.try_into().unwrap_or(0.0);
            metrics
                .spend
                .with_label_values(&[agent, model])
                .inc_by(cost_f64);
        }

        tracing::debug!(
            request.id = %self.request_id, agent.id = agent, model,
            input_tokens = usage.input_tokens, output_tokens = usage.output_tokens,
            cost_usd = %cost, usage.source = source.as_str(), outcome = outcome.as_str(),
            "request settled"
        );

        self.app.usage.record(UsageRecord {
            request_id: self.request_id,
            agent: Arc::clone(&self.agent.spiffe_id),
            model: Arc::clone(&self.route.model),
            provider: Arc::clone(&self.route.provider.name),
            endpoint: self.endpoint.name(),
            stream: self.stream,
            usage,
            usage_source: source,
            cost,
            status: status.as_u16(),
            outcome: outcome.as_str(),
            latency,
            ttft,
            started_at_ms: self.started_at_ms,
        });
    }

    /// Settles a request the provider did not bill (it refused or failed it).
    pub fn settle_unbilled(self, status: StatusCode, outcome: Outcome, upstream_time: Duration) {
        let overhead = self.overhead_besides(upstream_time);
        self.settle(
            Usage::default(),
            UsageSource::Provider,
            status,
            outcome,
            None,
            overhead,
        );
    }

    /// Settles an upstream fault before any response began and answers with its error.
    ///
    /// A provider that timed out may still finish and bill the request, so its whole
    /// reservation stays spent: the budget can only be under-used. The usage record
    /// shows no tokens, since Warden never saw any.
    pub fn fail(mut self, error: ApiError, upstream_time: Duration) -> Response {
        error.log(&self.request_id);
        let status = error.descriptor().status;
        if matches!(error, ApiError::UpstreamTimeout { .. }) {
            self.reservation.hold_as_spent();
        }
        self.settle_unbilled(status, Outcome::UpstreamError, upstream_time);
        error.into_response()
    }
}

fn count_tokens(app: &App, agent: &str, model: &str, usage: &Usage) {
    let tokens = &app.metrics.tokens;
    let uncached = usage.input_tokens.saturating_sub(usage.cached_tokens);
    tokens
        .with_label_values(&[agent, model, "input"])
        .inc_by(uncached);
    if usage.cached_tokens > 0 {
        tokens
            .with_label_values(&[agent, model, "cached_input"])
            .inc_by(usage.cached_tokens);
    }
    tokens
        .with_label_values(&[agent, model, "output"])
        .inc_by(usage.output_tokens);
}
