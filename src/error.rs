//! The errors a client can see, and the one place that decides how each is reported.
//!
//! Every refusal and fault on the request path becomes an [`ApiError`]. Its
//! [`ApiError::descriptor`] is an exhaustive match (no catch-all arm) giving the HTTP
//! status, the OpenAI error `type` and `code`, the log level and whose fault it was,
//! so the body an OpenAI SDK receives always maps to the exception it expects.

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use utoipa::ToSchema;

use crate::budget::{Amount, BudgetError};

/// Whose fault an error is: decides the log level and the metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Client,
    Upstream,
    /// The operator's configuration, e.g. a provider key that is not set.
    Config,
    Warden,
}

impl Fault {
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Client => "client",
            Fault::Upstream => "upstream",
            Fault::Config => "config",
            Fault::Warden => "warden",
        }
    }
}

/// How an error is reported: status, OpenAI `type` and `code`, and whose fault it is.
#[derive(Debug, Clone, Copy)]
pub struct Descriptor {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: &'static str,
    pub fault: Fault,
}

/// A request Warden refuses or cannot complete.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no API key: send `Authorization: Bearer <agent key>`")]
    MissingKey,
    #[error("the API key is not known to Warden")]
    UnknownKey,
    #[error("this endpoint needs the operator key")]
    OperatorOnly,
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(serde_json::Error),
    #[error("missing required parameter: '{0}'")]
    MissingField(&'static str),
    #[error("invalid value for '{field}': {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("request body is larger than the {limit}-byte limit (server.max_body_bytes)")]
    BodyTooLarge { limit: usize },
    #[error("could not read the request body: {0}")]
    BodyRead(String),
    #[error("the model '{0}' does not exist or is not served by this Warden")]
    ModelNotFound(String),
    #[error("this agent may not use the model '{0}'")]
    ModelNotPermitted(String),
    #[error("this agent may not use the tool '{0}'")]
    ToolNotPermitted(String),
    #[error(
        "budget exceeded for {agent}: {needed} needed, {available} available of its {limit} daily limit"
    )]
    BudgetExceeded {
        agent: String,
        needed: Amount,
        available: Amount,
        limit: Amount,
    },
    #[error("the budget of {agent} is frozen")]
    BudgetFrozen { agent: String },
    #[error("{agent} has ended")]
    AgentEnded { agent: String },
    #[error("stream cut: {agent} reached the {tokens} output tokens its budget reserved")]
    StreamBudget { agent: String, tokens: u64 },
    #[error("no agent {0}")]
    AgentNotFound(String),
    #[error("{caller} may act only on itself and its descendants, not on {target}")]
    NotYourAgent { caller: String, target: String },
    #[error("an agent named {spiffe_id} is already live")]
    NameTaken { spiffe_id: String },
    #[error("spawn refused by policy: {0}")]
    DelegationDenied(String),
    #[error("scope {scope} cannot be granted: {why}")]
    ScopeNotGranted { scope: String, why: String },
    #[error("a spawned agent starts WATCHED; {0} cannot be requested")]
    TrustDenied(String),
    #[error("{parent} is {state} and cannot spawn")]
    ParentUnavailable { parent: String, state: &'static str },
    #[error("policy not reloaded, the old one stays in force: {0}")]
    InvalidPolicy(String),
    #[error("the ledger has no signed checkpoint yet")]
    NoCheckpoint,
    #[error("unknown URL: {method} {path}")]
    UnknownRoute { method: String, path: String },
    #[error("provider '{provider}' has no API key: set the environment variable {env}")]
    ProviderKeyMissing { provider: String, env: String },
    #[error("could not reach provider '{provider}': {reason}")]
    UpstreamUnreachable { provider: String, reason: String },
    #[error("provider '{provider}' did not {phase} within {timeout_ms} ms")]
    UpstreamTimeout {
        provider: String,
        phase: &'static str,
        timeout_ms: u128,
    },
    #[error("provider '{provider}' failed with status {status}")]
    UpstreamStatus { provider: String, status: u16 },
    #[error("provider '{provider}' sent an unreadable response: {reason}")]
    UpstreamBody { provider: String, reason: String },
    #[error("provider '{provider}' broke off the stream: {reason}")]
    StreamInterrupted { provider: String, reason: String },
    #[error("Warden is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The refusal for a budget operation on `agent`'s behalf.
    pub fn from_budget(agent: &str, error: BudgetError) -> ApiError {
        let agent = agent.to_owned();
        match error {
            BudgetError::Exceeded {
                needed,
                available,
                limit,
            } => ApiError::BudgetExceeded {
                agent,
                needed,
                available,
                limit,
            },
            BudgetError::Frozen(_) => ApiError::BudgetFrozen { agent },
            BudgetError::Ended(_) => ApiError::AgentEnded { agent },
            BudgetError::LeaseNeeded { .. } => {
                ApiError::Internal(format!("{agent}: lease extension was not retried"))
            }
            BudgetError::Unknown(key) => {
                ApiError::Internal(format!("no budget node {key} for {agent}"))
            }
        }
    }

    /// The refusal for a request body that did not parse: malformed JSON, or JSON of
    /// the wrong shape.
    pub fn from_json(error: serde_json::Error) -> ApiError {
        if error.is_data() {
            ApiError::InvalidField {
                field: "body",
                reason: error.to_string(),
            }
        } else {
            ApiError::MalformedJson(error)
        }
    }

    /// The one mapping from error to status, OpenAI type and code, and fault.
    pub fn descriptor(&self) -> Descriptor {
        use ApiError::*;
        use Fault::*;

        let (status, kind, code, fault) = match self {
            MissingKey => (401, "invalid_request_error", "missing_api_key", Client),
            UnknownKey => (401, "invalid_request_error", "invalid_api_key", Client),
            OperatorOnly => (403, "permission_error", "operator_only", Client),
            MalformedJson(_) => (400, "invalid_request_error", "invalid_json", Client),
            MissingField(_) => (
                400,
                "invalid_request_error",
                "missing_required_parameter",
                Client,
            ),
            InvalidField { .. } => (400, "invalid_request_error", "invalid_value", Client),
            BodyTooLarge { .. } => (413, "invalid_request_error", "request_too_large", Client),
            BodyRead(_) => (400, "invalid_request_error", "body_unreadable", Client),
            ModelNotFound(_) => (404, "invalid_request_error", "model_not_found", Client),
            ModelNotPermitted(_) => (403, "permission_error", "permission_denied", Client),
            ToolNotPermitted(_) => (403, "permission_error", "permission_denied", Client),
            BudgetExceeded { .. } => (429, "insufficient_quota", "budget_exceeded", Client),
            BudgetFrozen { .. } => (403, "permission_error", "budget_frozen", Client),
            AgentEnded { .. } => (403, "permission_error", "agent_ended", Client),
            StreamBudget { .. } => (429, "insufficient_quota", "budget_exceeded", Client),
            AgentNotFound(_) => (404, "invalid_request_error", "agent_not_found", Client),
            NotYourAgent { .. } => (403, "permission_error", "not_a_descendant", Client),
            NameTaken { .. } => (409, "invalid_request_error", "name_taken", Client),
            DelegationDenied(_) => (403, "permission_error", "delegation_denied", Client),
            ScopeNotGranted { .. } => (403, "permission_error", "scope_not_granted", Client),
            TrustDenied(_) => (403, "permission_error", "trust_level_denied", Client),
            ParentUnavailable { .. } => {
                (409, "invalid_request_error", "parent_unavailable", Client)
            }
            InvalidPolicy(_) => (400, "invalid_request_error", "invalid_policy", Client),
            UnknownRoute { .. } => (404, "invalid_request_error", "unknown_url", Client),
            NoCheckpoint => (404, "invalid_request_error", "no_checkpoint", Client),
            ProviderKeyMissing { .. } => (502, "upstream_error", "provider_not_configured", Config),
            UpstreamUnreachable { .. } => (502, "upstream_error", "upstream_unreachable", Upstream),
            UpstreamTimeout { .. } => (504, "upstream_error", "upstream_timeout", Upstream),
            UpstreamStatus { .. } => (502, "upstream_error", "upstream_server_error", Upstream),
            UpstreamBody { .. } => (
                502,
                "upstream_error",
                "upstream_malformed_response",
                Upstream,
            ),
            StreamInterrupted { .. } => (
                502,
                "upstream_error",
                "upstream_stream_interrupted",
                Upstream,
            ),
            ShuttingDown => (503, "server_error", "shutting_down", Warden),
            Internal(_) => (500, "server_error", "internal_error", Warden),
        };

        Descriptor {
            status: StatusCode::from_u16(status).expect("every status above is a valid code"),
            kind,
            code,
            fault,
        }
    }

    /// The request parameter the error is about, for the OpenAI `param` field.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            ApiError::MissingField(field) | ApiError::InvalidField { field, .. } => Some(field),
            ApiError::ModelNotFound(_) | ApiError::ModelNotPermitted(_) => Some("model"),
            ApiError::ToolNotPermitted(_) => Some("tools"),
            _ => None,
        }
    }

    /// The OpenAI-shaped JSON body of this error.
    pub fn body(&self) -> Bytes {
        let descriptor = self.descriptor();
        let body = ErrorBody {
            error: ErrorObject {
                message: &self.to_string(),
                kind: descriptor.kind,
                code: descriptor.code,
                param: self.param(),
            },
        };
        serde_json::to_vec(&body)
            .expect("an error body of strings always serializes")
            .into()
    }

    /// Logs the error once, at the level its fault calls for.
    pub fn log(&self, request_id: &str) {
        let d = self.descriptor();
        match d.fault {
            Fault::Client => tracing::info!(
                request.id = request_id, status = d.status.as_u16(), code = d.code,
                error = %self, "request refused"
            ),
            Fault::Upstream => tracing::warn!(
                request.id = request_id, status = d.status.as_u16(), code = d.code,
                error = %self, "upstream fault"
            ),
            Fault::Config => tracing::warn!(
                request.id = request_id, status = d.status.as_u16(), code = d.code,
                error = %self, "refused by configuration"
            ),
            Fault::Warden => tracing::error!(
                request.id = request_id, status = d.status.as_u16(), code = d.code,
                error = %self, "request failed inside warden"
            ),
        }
    }
}

/// Every error body: `{"error": {"message", "type", "code", "param"}}`.
#[derive(Serialize, ToSchema)]
#[schema(as = ErrorResponse)]
pub struct ErrorBody<'a> {
    error: ErrorObject<'a>,
}

/// The OpenAI error object.
#[derive(Serialize, ToSchema)]
pub struct ErrorObject<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    code: &'static str,
    param: Option<&'static str>,
}

/// The schema of every error body, for the OpenAPI document.
pub type ErrorResponse = ErrorBody<'static>;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.descriptor().status;
        let mut response = (status, self.body()).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_openai_shaped() {
        let err = ApiError::MissingField("messages");
        let body: serde_json::Value = serde_json::from_slice(&err.body()).unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "missing_required_parameter");
        assert_eq!(body["error"]["param"], "messages");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("messages")
        );
    }
}
