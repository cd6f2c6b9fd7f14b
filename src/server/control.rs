//! The control plane: spawning, reading and ending agents over JSON.
//!
//! An agent authenticates with its own key and may act on itself and its descendants;
//! the operator key may act on every agent. Spawns and terminations are decisions:
//! each is recorded through the decision log before it is acknowledged.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Json, Response};
use http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::App;
use crate::agents::next_name;
use crate::agents::{Agent, EndReason, Fleet, SpawnRequest, spawn};
use crate::budget::Amount;
use crate::decisions::Decision;
use crate::error::{ApiError, ErrorResponse};
use crate::identity::Caller;
use crate::policy::Policy;

type AppState = State<Arc<App>>;

/// An agent as the control plane shows it.
#[derive(Serialize, ToSchema)]
pub struct AgentView {
    id: String,
    name: String,
    spiffe_id: String,
    parent: Option<String>,
    state: &'static str,
    trust: TrustView,
    budget: BudgetView,
    manifest: ManifestView,
    lifecycle: LifecycleView,
    /// The agent's bearer key: in the spawn response only, never again.
    #[serde(skip_serializing_if = "Option::is_none")]
    api_key: Option<String>,
    /// The decision record of the spawn.
    #[serde(skip_serializing_if = "Option::is_none")]
    evidence_id: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct TrustView {
    level: &'static str,
    promote_after: u32,
}

/// An agent's budget in US dollars (decimal strings), this window.
#[derive(Serialize, ToSchema)]
pub struct BudgetView {
    #[serde(with = "rust_decimal::serde::str")]
    #[schema(value_type = String)]
    daily_limit: rust_decimal::Decimal,
    currency: &'static str,
    source: &'static str,
    /// Spent by the agent and by its ended children.
    #[serde(with = "rust_decimal::serde::str")]
    #[schema(value_type = String)]
    spent: rust_decimal::Decimal,
    /// Held by requests in flight.
    #[serde(with = "rust_decimal::serde::str")]
    #[schema(value_type = String)]
    reserved: rust_decimal::Decimal,
    /// The slices of live children.
    #[serde(with = "rust_decimal::serde::str")]
    #[schema(value_type = String)]
    delegated: rust_decimal::Decimal,
    /// What the agent may still reserve or delegate.
    #[serde(with = "rust_decimal::serde::str")]
    #[schema(value_type = String)]
    available: rust_decimal::Decimal,
}

#[derive(Serialize, ToSchema)]
struct ManifestView {
    scopes: Vec<String>,
    models: Vec<String>,
    tools: Vec<String>,
}

#[derive(Serialize, ToSchema)]
struct LifecycleView {
    created_at: String,
    expires_at: Option<String>,
    ended_at: Option<String>,
    end_reason: Option<&'static str>,
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

fn usd(amount: Amount) -> rust_decimal::Decimal {
    amount.to_usd().normalize()
}

impl AgentView {
    fn of(app: &App, agent: &Agent) -> AgentView {
        let budget = app.budgets.view(agent.key);
        let ended = agent.ended();
        let mut models: Vec<String> = agent.manifest().models.iter().cloned().collect();
        if agent.manifest().all_models {
            models.push("*".into());
        }
        models.sort();
        let mut tools: Vec<String> = agent.manifest().tools.iter().cloned().collect();
        tools.sort();

        AgentView {
            id: agent.id.clone(),
            name: agent.name.clone(),
            spiffe_id: agent.spiffe_id.to_string(),
            parent: agent
                .parent
                .and_then(|p| app.registry.get(p))
                .map(|p| p.id.clone()),
            state: if ended.is_some() { "ended" } else { "live" },
            trust: TrustView {
                level: agent.trust().as_str(),
                promote_after: agent.promote_after,
            },
            budget: budget_view(agent, budget),
            manifest: ManifestView {
                scopes: agent.manifest().scopes.iter().cloned().collect(),
                models,
                tools,
            },
            lifecycle: LifecycleView {
                created_at: rfc3339(agent.created_at),
                expires_at: agent.expires_at.map(rfc3339),
                ended_at: ended.map(|(at, _)| rfc3339(at)),
                end_reason: ended.map(|(_, reason)| reason.as_str()),
            },
            api_key: None,
            evidence_id: None,
        }
    }
}

fn budget_view(agent: &Agent, view: Option<crate::budget::BudgetView>) -> BudgetView {
    let view = view.unwrap_or(crate::budget::BudgetView {
        limit: agent.limit,
        spent: Amount::ZERO,
        reserved: Amount::ZERO,
        delegated: Amount::ZERO,
        ended_children: Amount::ZERO,
        available: Amount::ZERO,
    });
    BudgetView {
        daily_limit: usd(view.limit),
        currency: "USD",
        source: if agent.parent.is_some() {
            "parent_slice"
        } else {
            "policy"
        },
        spent: usd(view.spent + view.ended_children),
        reserved: usd(view.reserved),
        delegated: usd(view.delegated),
        available: usd(if agent.is_live() {
            view.available
        } else {
            Amount::ZERO
        }),
    }
}

/// Checks that the caller may act on `target` (itself or a descendant; the operator
/// on anything) and returns who the caller is, as decision records name it.
fn authorize(app: &App, headers: &HeaderMap, target: &Agent) -> Result<String, ApiError> {
    match app.identities.authenticate(headers)? {
        Caller::Operator => Ok(OPERATOR.to_owned()),
        Caller::Agent(caller) if app.registry.is_within(target, caller.key) => {
            Ok(caller.spiffe_id.to_string())
        }
        Caller::Agent(caller) => Err(ApiError::NotYourAgent {
            caller: caller.spiffe_id.to_string(),
            target: target.spiffe_id.to_string(),
        }),
    }
}

/// How decision records name the operator.
const OPERATOR: &str = "operator";

/// Where a spawn reads and writes, under the policy in force.
fn fleet<'a>(app: &'a App, policy: &'a crate::policy::Policy) -> Fleet<'a> {
    Fleet {
        registry: &app.registry,
        identities: &app.identities,
        budgets: &app.budgets,
        policy,
        decisions: &app.decisions,
    }
}

/// A JSON body that may be left out (then `T::default()`).
async fn optional_body<T: serde::de::DeserializeOwned + Default>(
    app: &App,
    body: Body,
) -> Result<T, ApiError> {
    let body = crate::proxy::read_body(body, app.limits.max_body_bytes).await?;
    if body.is_empty() {
        return Ok(T::default());
    }
    serde_json::from_slice(&body).map_err(ApiError::from_json)
}

fn find(app: &App, reference: &str) -> Result<Arc<Agent>, ApiError> {
    app.registry
        .find(reference)
        .ok_or_else(|| ApiError::AgentNotFound(reference.to_owned()))
}

/// Spawns a sub-agent
///
/// The caller (the parent itself, or the operator) hands the child a slice of its
/// budget and a subset of its scopes. The child starts WATCHED.
#[utoipa::path(post, path = "/v1/agents", tag = "agents", request_body = SpawnRequest,
    responses(
        (status = 201, description = "Spawned; the only time the key is shown", body = AgentView),
        (status = 400, description = "Malformed request", body = ErrorResponse),
        (status = 403, description = "Policy, scope or trust refusal", body = ErrorResponse),
        (status = 409, description = "Name taken or parent ended", body = ErrorResponse),
        (status = 429, description = "The slice does not fit the parent's room", body = ErrorResponse),
    ),
    security(("bearer" = [])))]
pub async fn create(
    State(app): AppState,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let caller = match app.identities.authenticate(&headers)? {
        Caller::Operator => None,
        Caller::Agent(agent) => Some(agent),
    };
    let body = crate::proxy::read_body(body, app.limits.max_body_bytes).await?;
    let request: SpawnRequest = serde_json::from_slice(&body).map_err(ApiError::from_json)?;
    let asked = (request.parent.clone(), request.name.clone());
    let actor = caller
        .as_ref()
        .map_or_else(|| OPERATOR.to_owned(), |c| c.spiffe_id.to_string());

    let worker = Arc::clone(&app);
    let spawned = tokio::task::spawn_blocking(move || {
        let policy = worker.policy();
        spawn(request, caller.as_deref(), fleet(&worker, &policy))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("spawn: {e}")))?;
    let spawned = match spawned {
        Ok(spawned) => spawned,
        Err(refusal) => {
            let code = refusal.descriptor().code;
            let decision =
                Decision::spawn_refused(&actor, &asked.0, &asked.1, code, &refusal.to_string());
            let decisions = app.decisions.clone();
            let recorded = tokio::task::spawn_blocking(move || decisions.record(&decision)).await;
            if !matches!(recorded, Ok(Ok(_))) {
                tracing::error!(parent = %asked.0, "spawn refusal not recorded");
            }
            return Err(refusal);
        }
    };

    let mut view = AgentView::of(&app, &spawned.agent);
    view.api_key = Some(spawned.api_key);
    view.evidence_id = Some(spawned.evidence_id);
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// Filters of `GET /v1/agents`.
#[derive(Deserialize, IntoParams)]
pub struct ListQuery {
    /// Only the children of this agent (id, SPIFFE ID or name).
    parent: Option<String>,
    /// `live` or `ended`.
    state: Option<String>,
    /// A trust level, e.g. `WATCHED`.
    trust: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct AgentList {
    object: &'static str,
    data: Vec<AgentView>,
}

/// Lists agents
///
/// The operator sees every agent; an agent sees itself and its descendants.
#[utoipa::path(get, path = "/v1/agents", tag = "agents", params(ListQuery),
    responses((status = 200, body = AgentList)), security(("bearer" = [])))]
pub async fn list(
    State(app): AppState,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let scope = match app.identities.authenticate(&headers)? {
        Caller::Operator => None,
        Caller::Agent(agent) => Some(agent.key),
    };
    let parent = match &query.parent {
        Some(reference) => Some(find(&app, reference)?.key),
        None => None,
    };

    let data = app
        .registry
        .all()
        .into_iter()
        .filter(|a| scope.is_none_or(|root| app.registry.is_within(a, root)))
        .filter(|a| parent.is_none_or(|p| a.parent == Some(p)))
        .filter(|a| {
            query
                .state
                .as_deref()
                .is_none_or(|s| s == if a.is_live() { "live" } else { "ended" })
        })
        .filter(|a| {
            query
                .trust
                .as_deref()
                .is_none_or(|t| t == a.trust().as_str())
        })
        .map(|a| AgentView::of(&app, &a))
        .collect();
    Ok(Json(AgentList {
        object: "list",
        data,
    })
    .into_response())
}

/// Reads an agent
#[utoipa::path(get, path = "/v1/agents/{id}", tag = "agents",
    params(("id" = String, Path, description = "Agent id, SPIFFE ID or name")),
    responses((status = 200, body = AgentView), (status = 404, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn get(
    State(app): AppState,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let agent = find(&app, &id)?;
    authorize(&app, &headers, &agent)?;
    Ok(Json(AgentView::of(&app, &agent)).into_response())
}

/// Reads an agent's budget
#[utoipa::path(get, path = "/v1/agents/{id}/budget", tag = "agents",
    params(("id" = String, Path, description = "Agent id, SPIFFE ID or name")),
    responses((status = 200, body = BudgetView), (status = 404, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn budget(
    State(app): AppState,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let agent = find(&app, &id)?;
    authorize(&app, &headers, &agent)?;
    Ok(Json(budget_view(&agent, app.budgets.view(agent.key))).into_response())
}

/// Terminates an agent
///
/// Ends the agent and its descendants, revokes their keys and returns each unspent
/// slice to its parent.
#[utoipa::path(delete, path = "/v1/agents/{id}", tag = "agents",
    params(("id" = String, Path, description = "Agent id, SPIFFE ID or name")),
    responses((status = 200, description = "The agent and the ids of every agent ended"),
        (status = 403, body = ErrorResponse), (status = 404, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn terminate(
    State(app): AppState,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let agent = find(&app, &id)?;
    let actor = authorize(&app, &headers, &agent)?;

    let (ended, evidence) = end(&app, &agent, EndReason::Terminated, &actor).await?;

    let view = AgentView::of(&app, &agent);
    let ended: Vec<String> = ended.iter().map(|a| a.id.clone()).collect();
    Ok(
        Json(serde_json::json!({ "agent": view, "ended": ended, "evidence_ids": evidence }))
            .into_response(),
    )
}

/// `POST /v1/agents/{id}/replace`.
#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplaceRequest {
    /// The replacement's name; default: the next number of the old agent's role.
    name: Option<String>,
}

/// Replaces an agent
///
/// Ends the agent (if it still lives) and spawns a fresh one with the same role,
/// manifest and slice, and a new identity.
#[utoipa::path(post, path = "/v1/agents/{id}/replace", tag = "agents",
    params(("id" = String, Path, description = "Agent id, SPIFFE ID or name")),
    request_body(content = Option<ReplaceRequest>),
    responses((status = 201, body = AgentView), (status = 404, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn replace(
    State(app): AppState,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let old = find(&app, &id)?;
    let actor = authorize(&app, &headers, &old)?;
    let parent = old
        .parent
        .and_then(|p| app.registry.get(p))
        .ok_or_else(|| {
            ApiError::DelegationDenied(format!(
                "{} is a lead: leads come from policy",
                old.spiffe_id
            ))
        })?;
    let asked: ReplaceRequest = optional_body(&app, body).await?;

    if old.is_live() {
        end(&app, &old, EndReason::Terminated, &actor).await?;
    }
    let name = asked
        .name
        .unwrap_or_else(|| next_name(&old.name, &app.registry));
    let request = SpawnRequest::replacing(&old, &parent, name);
    let worker = Arc::clone(&app);
    let (spawned, evidence) = tokio::task::spawn_blocking(move || {
        let policy = worker.policy();
        let spawned = spawn(request, Some(&parent), fleet(&worker, &policy))?;
        let decision = Decision::replacement(&actor, &old, &spawned.agent);
        let evidence = worker
            .decisions
            .record(&decision)
            .map_err(|e| ApiError::Internal(format!("replacement not stored: {e}")))?;
        Ok::<_, ApiError>((spawned, evidence))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("replace: {e}")))??;

    let mut view = AgentView::of(&app, &spawned.agent);
    view.api_key = Some(spawned.api_key);
    view.evidence_id = Some(evidence);
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// Why an operator quarantines an agent.
#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuarantineRequest {
    reason: Option<String>,
}

/// Quarantines an agent
///
/// Operator only. The agent is refused from now on: its key is revoked, its budget
/// (and so its descendants' spending) is frozen, and it can spawn nothing. It ends
/// only by termination.
#[utoipa::path(post, path = "/v1/agents/{id}/quarantine", tag = "agents",
    params(("id" = String, Path, description = "Agent id, SPIFFE ID or name")),
    request_body(content = Option<QuarantineRequest>),
    responses((status = 200, body = AgentView), (status = 404, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn quarantine(
    State(app): AppState,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    app.identities.authenticate_operator(&headers)?;
    let agent = find(&app, &id)?;
    let asked: QuarantineRequest = optional_body(&app, body).await?;

    agent.quarantine();
    app.identities.revoke(&agent);
    app.budgets.freeze(agent.key);
    let reason = asked.reason.unwrap_or_else(|| "operator action".into());
    let decision = Decision::quarantine(OPERATOR, &agent, &reason);
    let (decisions, stored) = (app.decisions.clone(), Arc::clone(&agent));
    let evidence = tokio::task::spawn_blocking(move || decisions.trust_changed(&stored, &decision))
        .await
        .map_err(|e| ApiError::Internal(format!("quarantine: {e}")))?
        .map_err(|e| ApiError::Internal(format!("quarantine not recorded: {e}")))?;
    tracing::info!(agent.id = %agent.spiffe_id, reason = %reason, "agent quarantined");

    let mut view = AgentView::of(&app, &agent);
    view.evidence_id = Some(evidence);
    Ok(Json(view).into_response())
}

/// Reloads the policy
///
/// Reads the policy file again and, if it is valid, puts it in force; otherwise the
/// old policy stays and the error names the line to fix. Operator only.
#[utoipa::path(post, path = "/v1/policy/reload", tag = "policy",
    responses((status = 200, description = "Reloaded"), (status = 400, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn reload(State(app): AppState, headers: HeaderMap) -> Result<Response, ApiError> {
    app.identities.authenticate_operator(&headers)?;
    let evidence = reload_policy(&app, OPERATOR).await?;
    Ok(Json(serde_json::json!({ "reloaded": true, "evidence_id": evidence })).into_response())
}

/// Reads, validates and applies the policy; the old one stays in force on any error.
/// Reloads run one at a time. Lead key changes are stored and recorded before anything
/// changes in memory, so a failure to store them leaves the old policy whole.
pub async fn reload_policy(app: &Arc<App>, actor: &str) -> Result<String, ApiError> {
    let (worker, actor) = (Arc::clone(app), actor.to_owned());
    tokio::task::spawn_blocking(move || {
        let _one_at_a_time = worker.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let served = |model: &str| worker.routes.get(model).is_some();
        let policy = Policy::load(worker.policy_path.as_deref(), served)
            .map_err(|e| ApiError::InvalidPolicy(e.to_string()))?;
        let rekeyed = worker
            .registry
            .plan_policy(&policy)
            .map_err(ApiError::InvalidPolicy)?;
        if rekeyed
            .iter()
            .any(|c| worker.identities.is_operator(&c.new))
        {
            return Err(ApiError::InvalidPolicy(
                "a lead's key_sha256 is the operator's; the operator needs its own key".into(),
            ));
        }

        worker
            .decisions
            .keys_changed(&actor, "policy reload", &rekeyed)
            .map_err(|e| ApiError::Internal(format!("lead key changes not stored: {e}")))?;
        worker
            .registry
            .apply_policy(
                &policy,
                &worker.budgets,
                &worker.identities,
                &worker.control,
            )
            .map_err(ApiError::InvalidPolicy)?;
        worker.identities.rekey(&rekeyed);
        for change in &rekeyed {
            tracing::info!(agent.id = %change.agent.spiffe_id, "lead key changed by policy");
        }
        // A lead added back may come with another key than the one stored for it.
        worker
            .registry
            .unrecorded_lead_keys(&worker.control)
            .and_then(|changes| {
                worker
                    .decisions
                    .keys_changed(&actor, "policy reload", &changes)
            })
            .map_err(|e| ApiError::Internal(format!("lead key changes not stored: {e}")))?;

        let source = worker.policy_path.as_ref().map_or_else(
            || "embedded policy.toml".to_owned(),
            |p| p.display().to_string(),
        );
        let decision = Decision::policy_reload(&actor, &source, policy.leads.len());
        worker.set_policy(policy);
        worker
            .decisions
            .record(&decision)
            .map_err(|e| ApiError::Internal(format!("policy reload not recorded: {e}")))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("policy reload: {e}")))?
}

/// Ends `agent` and its descendants, revokes their keys and records each ending.
async fn end(
    app: &Arc<App>,
    agent: &Agent,
    reason: EndReason,
    actor: &str,
) -> Result<(Vec<Arc<Agent>>, Vec<String>), ApiError> {
    let ended = app.registry.end(agent, reason, &app.budgets);
    for agent in &ended {
        app.identities.revoke(agent);
    }

    let (worker, actor, stored) = (Arc::clone(app), actor.to_owned(), ended.clone());
    let evidence = tokio::task::spawn_blocking(move || worker.decisions.ended(&actor, &stored))
        .await
        .map_err(|e| ApiError::Internal(format!("termination: {e}")))?
        .map_err(|e| ApiError::Internal(format!("termination not stored: {e}")))?;
    Ok((ended, evidence))
}

/// Ends every agent whose lifetime has run out; called periodically.
pub async fn expire(app: &Arc<App>) {
    for agent in app.registry.expired(SystemTime::now()) {
        if let Err(e) = end(app, &agent, EndReason::Expired, "warden").await {
            tracing::error!(agent.id = %agent.spiffe_id, error = %e, "expiry not recorded");
        }
    }
}

/// Seconds since the epoch, for decision records.
pub fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
