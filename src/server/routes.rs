//! The HTTP routes: the data plane (proxied OpenAI endpoints) and the operator's
//! read-only endpoints (models, usage, metrics, health).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use serde::{Deserialize, Serialize};

use super::{App, control};
use crate::error::ApiError;
use crate::identity::Caller;
use crate::ledger::ExportLine;
use crate::proxy::{self, Endpoint};
use crate::store::UsageReport;
use crate::store::control::{LedgerQuery, query_ledger};

type AppState = State<Arc<App>>;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/responses", post(responses))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/v1/usage", get(usage))
        .route("/v1/agents", post(control::create).get(control::list))
        .route(
            "/v1/agents/{id}",
            get(control::get).delete(control::terminate),
        )
        .route("/v1/agents/{id}/budget", get(control::budget))
        .route("/v1/agents/{id}/replace", post(control::replace))
        .route("/v1/agents/{id}/quarantine", post(control::quarantine))
        .route("/v1/policy/reload", post(control::reload))
        .route("/openapi.json", get(openapi_json))
        .route("/v1/ledger/public-key", get(ledger_public_key))
        .route("/v1/ledger", get(ledger_entries))
        .route("/v1/ledger/checkpoint", get(ledger_checkpoint))
        .route("/v1/ledger/rotate-key", post(rotate_ledger_key))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(unknown_route)
        .method_not_allowed_fallback(unknown_route)
        .with_state(app)
}

async fn chat(State(app): AppState, headers: HeaderMap, body: Body) -> Response {
    proxy::handle(app, Endpoint::Chat, headers, body).await
}

async fn responses(State(app): AppState, headers: HeaderMap, body: Body) -> Response {
    proxy::handle(app, Endpoint::Responses, headers, body).await
}

async fn embeddings(State(app): AppState, headers: HeaderMap, body: Body) -> Response {
    proxy::handle(app, Endpoint::Embeddings, headers, body).await
}

#[derive(Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: Vec<ModelEntry<'a>>,
}

#[derive(Serialize)]
struct ModelEntry<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'a str,
}

/// `GET /v1/models`: the models the calling agent may use.
async fn models(State(app): AppState, headers: HeaderMap) -> Result<Response, ApiError> {
    let agent = app.identities.authenticate_agent(&headers)?;

    let data = app
        .routes
        .all()
        .into_iter()
        .filter(|route| agent.manifest().allows_model(&route.model))
        .map(|route| ModelEntry {
            id: &route.model,
            object: "model",
            created: 0,
            owned_by: &route.provider.name,
        })
        .collect();
    Ok(Json(ModelList {
        object: "list",
        data,
    })
    .into_response())
}

#[derive(Deserialize)]
struct UsageQuery {
    agent: Option<String>,
    /// Unix seconds or an RFC 3339 timestamp; default: the last 24 hours.
    since: Option<String>,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    1000
}

#[derive(Serialize)]
struct UsageResponse {
    object: &'static str,
    #[serde(flatten)]
    report: UsageReport,
}

/// `GET /v1/usage`: usage records and totals. The operator may read any agent's; an
/// agent may read only its own.
async fn usage(
    State(app): AppState,
    headers: HeaderMap,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let caller = app.identities.authenticate(&headers)?;
    let Query(query) = query.map_err(|e| ApiError::InvalidField {
        field: "query",
        reason: e.body_text(),
    })?;

    let agent = match caller {
        Caller::Operator => query.agent,
        Caller::Agent(agent) => match query.agent {
            Some(asked) if *asked != *agent.spiffe_id => return Err(ApiError::OperatorOnly),
            _ => Some(agent.spiffe_id.to_string()),
        },
    };
    let since_ms = parse_since(query.since.as_deref())?;
    let limit = query.limit.clamp(1, 10_000);

    // Read-your-writes: records settled before this query are committed first.
    app.usage
        .flush()
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let store = app.store.clone();
    let report =
        tokio::task::spawn_blocking(move || store.query_usage(agent.as_deref(), since_ms, limit))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| ApiError::Internal(e.to_string()))?;

    Ok(Json(UsageResponse {
        object: "list",
        report,
    })
    .into_response())
}

/// The usage query's start, in unix milliseconds: `since`, or 24 hours ago.
fn parse_since(since: Option<&str>) -> Result<i64, ApiError> {
    let instant = match since {
        Some(text) => parse_time("since", text)?,
        None => SystemTime::now() - Duration::from_secs(24 * 3600),
    };
    Ok(instant
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64))
}

/// The last second RFC 3339 can write (9999-12-31T23:59:59Z).
const LAST_RFC3339_SECOND: u64 = 253_402_300_799;

/// A time given as unix seconds or RFC 3339, up to the end of year 9999.
fn parse_time(field: &'static str, text: &str) -> Result<SystemTime, ApiError> {
    let invalid = |why: String| ApiError::InvalidField {
        field,
        reason: format!("{why}: use unix seconds or RFC 3339, e.g. 2026-12-01T00:00:00Z"),
    };
    match text.parse::<u64>() {
        Ok(secs) if secs <= LAST_RFC3339_SECOND => Ok(UNIX_EPOCH + Duration::from_secs(secs)),
        Ok(_) => Err(invalid("after the year 9999".into())),
        Err(_) => humantime::parse_rfc3339_weak(text).map_err(|e| invalid(e.to_string())),
    }
}

/// `GET /metrics`: Prometheus text exposition.
async fn metrics(State(app): AppState) -> Response {
    app.metrics.usage_backlog.set(app.usage.backlog() as i64);
    let control = app.control.commit_stats();
    app.metrics.control_queue.set(control.queued() as i64);
    let mut response = app.metrics.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// `GET /openapi.json`: the control plane's OpenAPI document.
async fn openapi_json() -> Response {
    let mut response = super::openapi::document().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[derive(Deserialize)]
struct LedgerParams {
    /// Entries about this agent (SPIFFE ID).
    agent: Option<String>,
    kind: Option<String>,
    /// Entries at or after this time (unix seconds or RFC 3339).
    since: Option<String>,
    /// Entries before this time (unix seconds or RFC 3339).
    until: Option<String>,
    /// Entries after this sequence number: the `next_after` of the previous page.
    #[serde(default)]
    after: u64,
    #[serde(default = "default_limit")]
    limit: usize,
}

/// `GET /v1/ledger` (operator): ledger entries by agent, kind and time, in pages.
async fn ledger_entries(
    State(app): AppState,
    headers: HeaderMap,
    query: Result<Query<LedgerParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    app.identities.authenticate_operator(&headers)?;
    let Query(params) = query.map_err(|e| ApiError::InvalidField {
        field: "query",
        reason: e.body_text(),
    })?;
    let since = ledger_time("since", params.since.as_deref())?;
    let until = ledger_time("until", params.until.as_deref())?;
    let limit = params.limit.clamp(1, 1000);

    let store = app.store.clone();
    let page = tokio::task::spawn_blocking(move || {
        let conn = store.connection()?;
        let query = LedgerQuery {
            subject: params.agent.as_deref(),
            kind: params.kind.as_deref(),
            since: since.as_deref(),
            until: until.as_deref(),
            after: params.after,
            limit,
        };
        query_ledger(&conn, &query)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(|e| ApiError::Internal(e.to_string()))?;

    let next_after = (page.len() == limit)
        .then(|| page.last().map(|e| e.seq))
        .flatten();
    let data: Vec<ExportLine> = page.iter().map(ExportLine::of).collect();
    Ok(
        Json(serde_json::json!({ "object": "list", "data": data, "next_after": next_after }))
            .into_response(),
    )
}

/// `GET /v1/ledger/checkpoint`: the newest signed checkpoint, for auditors to keep
/// outside Warden and check the ledger against later (`warden ledger verify
/// --witness`). It tells only the ledger's size and root hash, so anyone may read it.
async fn ledger_checkpoint(State(app): AppState) -> Result<Response, ApiError> {
    let control = Arc::clone(&app.control);
    let checkpoint = tokio::task::spawn_blocking(move || control.latest_checkpoint())
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(checkpoint.ok_or(ApiError::NoCheckpoint)?).into_response())
}

/// A time bound of a ledger query (unix seconds or RFC 3339), written as entries write
/// their time, so that the two compare as strings.
fn ledger_time(field: &'static str, text: Option<&str>) -> Result<Option<String>, ApiError> {
    text.map(|text| {
        let instant = parse_time(field, text)?;
        Ok(humantime::format_rfc3339_millis(instant).to_string())
    })
    .transpose()
}

/// `POST /v1/ledger/rotate-key` (operator): a new ledger key, announced by an entry
/// signed with the old one; the checkpoint made at once is signed by both.
async fn rotate_ledger_key(State(app): AppState, headers: HeaderMap) -> Result<Response, ApiError> {
    app.identities.authenticate_operator(&headers)?;
    let worker = Arc::clone(&app);
    let (seq, signer) = tokio::task::spawn_blocking(move || {
        worker.control.rotate_key(&worker.data_dir, "operator")
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(|e| ApiError::Internal(format!("key rotation: {e}")))?;
    tracing::info!(ledger.key_id = %signer.key_id(), "ledger key rotated");
    Ok(Json(serde_json::json!({
        "key_id": signer.key_id(),
        "public_key": signer.public_key_hex(),
        "evidence_id": format!("dec_{seq:012}"),
    }))
    .into_response())
}

/// `GET /v1/ledger/public-key`: the key that verifies the evidence ledger.
async fn ledger_public_key(State(app): AppState) -> Response {
    let signer = app.control.signer();
    Json(serde_json::json!({
        "algorithm": "Ed25519",
        "key_id": signer.key_id(),
        "public_key": signer.public_key_hex(),
    }))
    .into_response()
}

/// `GET /healthz`: the process is up.
async fn healthz() -> &'static str {
    "ok\n"
}

/// `GET /readyz`: the process takes new requests (503 once shutdown has begun).
async fn readyz(State(app): AppState) -> (StatusCode, &'static str) {
    if app.draining.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n");
    }
    (StatusCode::OK, "ready\n")
}

async fn unknown_route(method: Method, uri: Uri) -> ApiError {
    ApiError::UnknownRoute {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}
