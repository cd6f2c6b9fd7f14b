//! The data plane: one OpenAI-compatible request, from arrival to settlement.
//!
//! A request passes through named phases over a per-request context:
//!
//! 1. **authenticate**: the bearer key names an agent (`identity`).
//! 2. **read**: the body, up to `server.max_body_bytes`.
//! 3. **inspect**: the fields Warden acts on (`request::inspect`).
//! 4. **admit**: the model is served here and the agent's manifest grants it and
//!    every tool the request offers (or the unlisted tools are stripped, by policy).
//! 5. **rewrite**: a streamed chat request asks for usage (`request::rewrite`).
//! 6. **reserve**: the worst-case cost is held against the agent's budget, and the
//!    request's max output tokens capped at what the reservation covers.
//! 7. **forward**: to the model's provider, over a pooled connection (`upstream`).
//! 8. **relay**: a stream event by event (`relay`), or a whole body, as received; a
//!    stream past its max tokens is cut.
//! 9. **settle**: the actual cost is charged and the rest of the reservation
//!    released; usage and cost become metrics and a usage record (`settle`).

mod relay;
mod request;
mod settle;
pub mod sse;
mod upstream;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};

use crate::budget::{AgentKey, Amount, BudgetError, Reservation};
use crate::config::{Config, Price};
use crate::decisions::Decision;
use crate::error::ApiError;
use crate::identity::Agent;
use crate::metering::{self, StreamFormat, StreamMeter};
use crate::policy::{Manifest, UnlistedTools};
use crate::server::App;

pub use relay::Relay;
pub use request::{inspect, limit_output, rewrite, strip_tools};
pub use settle::{Admitted, Outcome, Settlement};
pub use upstream::{Provider, UpstreamSetupError, set_worker, tls_config};

/// The OpenAI endpoints Warden proxies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Responses,
    Embeddings,
}

impl Endpoint {
    /// The path below the provider's base URL.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/chat/completions",
            Endpoint::Responses => "/responses",
            Endpoint::Embeddings => "/embeddings",
        }
    }

    /// The endpoint's label in metrics and usage records.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat.completions",
            Endpoint::Responses => "responses",
            Endpoint::Embeddings => "embeddings",
        }
    }

    fn stream_format(self) -> StreamFormat {
        match self {
            Endpoint::Responses => StreamFormat::Responses,
            Endpoint::Chat | Endpoint::Embeddings => StreamFormat::Chat,
        }
    }
}

/// Where a model's requests go and what its tokens cost.
pub struct Route {
    pub model: Arc<str>,
    pub provider: Arc<Provider>,
    pub price: Price,
    /// Input and output price per token, in picodollars, for reservations.
    pub per_token: (u64, u64),
}

/// Every model Warden serves, by the `model` a client sends.
pub struct Routes {
    by_model: HashMap<String, Arc<Route>>,
}

impl Routes {
    /// Builds every provider, each with a connection pool per worker thread.
    pub fn new(config: &Config, workers: usize) -> Result<Routes, UpstreamSetupError> {
        let tls = upstream::tls_config();
        let mut by_model = HashMap::new();
        for provider_config in &config.providers {
            let provider = Arc::new(Provider::new(provider_config, &tls, workers)?);
            for model in &provider_config.models {
                let price = config.prices[model];
                let route = Route {
                    model: model.as_str().into(),
                    provider: Arc::clone(&provider),
                    price,
                    per_token: price.per_token(),
                };
                by_model.insert(model.clone(), Arc::new(route));
            }
        }
        Ok(Routes { by_model })
    }

    pub fn get(&self, model: &str) -> Option<&Arc<Route>> {
        self.by_model.get(model)
    }

    /// Every route, sorted by model id.
    pub fn all(&self) -> Vec<&Arc<Route>> {
        let mut routes: Vec<_> = self.by_model.values().collect();
        routes.sort_by(|a, b| a.model.cmp(&b.model));
        routes
    }
}

/// Serves one data-plane request and always answers: errors become OpenAI-shaped.
pub async fn handle(app: Arc<App>, endpoint: Endpoint, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let request_id: Arc<str> = app.ids.next().into();

    let mut response = match serve(&app, endpoint, &headers, body, started, &request_id).await {
        Ok(response) => response,
        Err(refusal) => {
            refusal.error.log(&request_id);
            let status = refusal.error.descriptor().status;
            app.metrics
                .requests
                .with_label_values(&[
                    refusal.agent.as_deref().unwrap_or(""),
                    "",
                    endpoint.name(),
                    status.as_str(),
                ])
                .inc();
            refusal.error.into_response()
        }
    };

    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// An error before the request was admitted: nothing was forwarded or spent.
struct Refusal {
    agent: Option<Arc<str>>,
    error: ApiError,
}

impl From<ApiError> for Refusal {
    fn from(error: ApiError) -> Self {
        Refusal { agent: None, error }
    }
}

async fn serve(
    app: &Arc<App>,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Body,
    started: Instant,
    request_id: &Arc<str>,
) -> Result<Response, Refusal> {
    let agent = app.identities.authenticate_agent(headers)?;
    let refuse = |error| Refusal {
        agent: Some(Arc::clone(&agent.spiffe_id)),
        error,
    };

    let body = read_body(body, app.limits.max_body_bytes)
        .await
        .map_err(refuse)?;
    let inspected = inspect(endpoint, &body).map_err(refuse)?;
    let manifest = agent.manifest();
    let route = admit(app, &manifest, &inspected.model).map_err(refuse)?;
    let unlisted = unlisted_tools(app, &manifest, &inspected).map_err(refuse)?;
    let stream = inspected.stream;
    let client_wants_usage = inspected.include_usage;
    let prompt_bound = body.len() as u64;
    let body = rewrite(endpoint, body.clone(), &inspected).map_err(refuse)?;
    let body = match unlisted.is_empty() {
        true => body,
        false => strip_tools(body, &unlisted).map_err(refuse)?,
    };
    let (reservation, output_cap) =
        reserve(app, &agent, &route, endpoint, &inspected, prompt_bound)
            .await
            .map_err(refuse)?;
    let body = if inspected.max_output.map(|(n, _)| n) == Some(output_cap) {
        body
    } else {
        limit_output(endpoint, body, &inspected, output_cap).map_err(refuse)?
    };

    let admitted = Admitted {
        request_id: Arc::clone(request_id),
        agent,
        route,
        endpoint,
        stream,
        started,
    };
    let settlement = Settlement::new(Arc::clone(app), admitted, reservation);
    Ok(forward(
        app,
        settlement,
        body,
        client_wants_usage,
        prompt_bound,
        output_cap,
    )
    .await)
}

/// The reserve phase: holds the request's worst-case cost (every prompt byte a token,
/// every allowed output token generated) against the agent's budget.
///
/// Limitation: images, audio and files are billed by the provider per item, not per
/// byte of the request, so an `image_url` pointing elsewhere costs more prompt tokens
/// than its bytes; such requests are reserved too low, and settle at their true cost. A request that
/// does not fit is clamped to the output tokens that do, down to the policy's floor;
/// below that it is refused. Returns the reservation and the output tokens it covers.
async fn reserve(
    app: &App,
    agent: &Agent,
    route: &Route,
    endpoint: Endpoint,
    inspected: &request::Inspected<'_>,
    prompt_bound: u64,
) -> Result<(Reservation, u64), ApiError> {
    let (input_price, output_price) = route.per_token;
    let cap = match endpoint {
        Endpoint::Embeddings => 0,
        Endpoint::Chat | Endpoint::Responses => route.price.max_output_tokens,
    };
    let wanted = inspected.max_output.map_or(cap, |(n, _)| n.min(cap));
    let floor = app.policy().min_output_tokens.min(wanted);

    let prompt = Amount(prompt_bound.saturating_mul(input_price));
    let at_most = |tokens: u64| prompt + Amount(tokens.saturating_mul(output_price));
    let reservation = hold(app, agent, at_most(floor), at_most(wanted)).await?;

    let covered = match output_price {
        0 => wanted,
        price => ((reservation.amount().0 - prompt.0) / price).min(wanted),
    };
    Ok((reservation, covered))
}

/// Reserves between `min` and `max` against the agent's budget. When the durable
/// lease does not cover it, the lease is extended first (the one case where a request
/// waits on the disk); when the lease runs low, it is extended in the background.
async fn hold(app: &App, agent: &Agent, min: Amount, max: Amount) -> Result<Reservation, ApiError> {
    for _ in 0..3 {
        match app.budgets.reserve_up_to(agent.key, min, max) {
            Ok(reservation) => {
                if let Some((key, ceiling)) = reservation.lease_hint() {
                    extend_lease(app, key, ceiling);
                }
                return Ok(reservation);
            }
            Err(BudgetError::LeaseNeeded {
                agent: key,
                ceiling,
            }) => {
                let budgets = Arc::clone(&app.budgets);
                tokio::task::spawn_blocking(move || budgets.extend_lease(key, ceiling))
                    .await
                    .map_err(|e| ApiError::Internal(format!("lease: {e}")))?
                    .map_err(|e| ApiError::Internal(format!("lease not stored: {e}")))?;
            }
            Err(e) => {
                let refusal = ApiError::from_budget(&agent.spiffe_id, e);
                if matches!(refusal, ApiError::BudgetExceeded { .. }) && app.budgets.trip(agent.key)
                {
                    record_trip(app, agent, &refusal);
                }
                return Err(refusal);
            }
        }
    }
    Err(ApiError::Internal(format!(
        "{}: the lease kept running out",
        agent.spiffe_id
    )))
}

/// Records a breaker trip off the request path.
fn record_trip(app: &App, agent: &Agent, refusal: &ApiError) {
    let decision = Decision::breaker_trip(agent, &refusal.to_string());
    let decisions = app.decisions.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = decisions.record(&decision) {
            tracing::error!(agent.id = %decision.subject, error = %e, "breaker trip not recorded");
        }
    });
}

/// Extends a lease off the request path; a failure only means the next request waits.
fn extend_lease(app: &App, agent: AgentKey, ceiling: Amount) {
    let budgets = Arc::clone(&app.budgets);
    tokio::task::spawn_blocking(move || {
        if let Err(e) = budgets.extend_lease(agent, ceiling) {
            tracing::error!(agent = agent, error = %e, "lease extension not stored");
        }
    });
}

/// The tools the request offers that the agent's manifest does not grant: refused, or
/// returned to be stripped, as policy says.
fn unlisted_tools(
    app: &App,
    manifest: &Manifest,
    inspected: &request::Inspected<'_>,
) -> Result<Vec<String>, ApiError> {
    let mut unlisted = Vec::new();
    for tool in inspected.tools.iter().filter(|t| !manifest.allows_tool(t)) {
        match app.policy().unlisted_tools {
            UnlistedTools::Refuse => return Err(ApiError::ToolNotPermitted(tool.to_string())),
            UnlistedTools::Strip => unlisted.push(tool.to_string()),
        }
    }
    Ok(unlisted)
}

/// The admit phase: the model exists here and the agent's manifest grants it.
fn admit(app: &App, manifest: &Manifest, model: &str) -> Result<Arc<Route>, ApiError> {
    let route = app
        .routes
        .get(model)
        .ok_or_else(|| ApiError::ModelNotFound(model.to_owned()))?;
    if !manifest.allows_model(model) {
        return Err(ApiError::ModelNotPermitted(model.to_owned()));
    }
    Ok(Arc::clone(route))
}

/// The forward phase and what follows it. From here on every outcome is settled.
async fn forward(
    app: &App,
    settlement: Settlement,
    body: Bytes,
    client_wants_usage: bool,
    prompt_bound: u64,
    output_cap: u64,
) -> Response {
    let provider = Arc::clone(&settlement.route().provider);

    let sent_at = Instant::now();
    let upstream = match provider.send(settlement.endpoint(), body).await {
        Ok(upstream) => upstream,
        Err(error) => return settlement.fail(error, sent_at.elapsed()),
    };
    let upstream_wait = sent_at.elapsed();
    app.metrics
        .upstream_latency
        .with_label_values(&[&provider.name])
        .observe(upstream_wait.as_secs_f64());

    let status = upstream.status();
    let headers = passed_headers(upstream.headers());
    if status.is_server_error() {
        let error = ApiError::UpstreamStatus {
            provider: provider.name.to_string(),
            status: status.as_u16(),
        };
        return settlement.fail(error, upstream_wait);
    }

    if is_event_stream(upstream.headers()) && status.is_success() {
        let format = settlement.endpoint().stream_format();
        let meter = StreamMeter::new(format, prompt_bound, output_cap);
        let relay = Relay::new(
            upstream.into_body(),
            meter,
            settlement,
            !client_wants_usage,
            upstream_wait,
        );
        return respond(status, headers, Body::from_stream(relay));
    }

    let body = match provider
        .read_body(upstream, app.limits.max_upstream_body_bytes)
        .await
    {
        Ok(body) => body,
        Err(error) => return settlement.fail(error, upstream_wait),
    };
    let upstream_time = sent_at.elapsed();
    if status.is_success() {
        let (usage, source) = metering::body_usage(&body, prompt_bound, output_cap);
        let overhead = settlement.overhead_besides(upstream_time);
        settlement.settle(usage, source, status, Outcome::Ok, None, overhead);
    } else {
        // A client error the provider found: pass it through as the provider said it.
        settlement.settle_unbilled(status, Outcome::UpstreamRejected, upstream_time);
    }
    respond(status, headers, Body::from(body))
}

fn respond(status: StatusCode, headers: HeaderMap, body: Body) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().extend(headers);
    response
}

/// The read phase: the whole request body, or 413 past the limit.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(ApiError::BodyTooLarge { limit }),
        Err(e) => Err(ApiError::BodyRead(e.to_string())),
    }
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const UPSTREAM_REQUEST_ID: HeaderName = HeaderName::from_static("x-upstream-request-id");

/// The upstream response headers a client may rely on: its content type, rate-limit
/// and retry hints, and the provider's own request id (renamed, since `x-request-id`
/// is Warden's).
fn passed_headers(upstream: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in upstream {
        let keep = name == header::CONTENT_TYPE
            || name == header::RETRY_AFTER
            || name.as_str().starts_with("x-ratelimit-")
            || name.as_str().starts_with("openai-");
        if keep {
            headers.append(name.clone(), value.clone());
        } else if name == REQUEST_ID {
            headers.insert(UPSTREAM_REQUEST_ID, value.clone());
        }
    }
    headers
}

fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"))
}
