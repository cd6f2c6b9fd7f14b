//! Identity: which agent (SPIFFE ID) a request comes from.
//!
//! Agents present a bearer key. Warden stores only the SHA-256 of each key, so a
//! leaked database or config file reveals no usable credential; keys are high-entropy
//! random strings, which makes a plain, unsalted hash sufficient. Every caller of the
//! request path asks [`Identities::authenticate`] and gets an [`Agent`] back, so
//! other credentials (an X.509-SVID over mTLS) can be added behind the same call.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::budget::{AgentKey, Budgets};
use crate::config::ConfigError;
use crate::error::ApiError;
use crate::policy::{Manifest, Policy};

/// A caller of the data plane.
#[derive(Debug)]
pub struct Agent {
    /// The agent's SPIFFE ID, used as its identity in metrics, logs and records.
    pub spiffe_id: Arc<str>,
    /// The agent's node in the budget tree.
    pub budget: AgentKey,
    /// What the agent may use.
    pub manifest: Arc<Manifest>,
}

/// Who is calling: an agent, or the operator.
pub enum Caller {
    Agent(Arc<Agent>),
    Operator,
}

type KeyHash = [u8; 32];

/// The table of known credentials.
pub struct Identities {
    agents: DashMap<KeyHash, Arc<Agent>>,
    operator: KeyHash,
    next_key: AtomicU64,
}

impl Identities {
    /// The operator and the policy's leads, each lead with its own budget.
    pub fn new(
        operator_sha256: &str,
        policy: &Policy,
        budgets: &Budgets,
    ) -> Result<Self, ConfigError> {
        let identities = Identities {
            agents: DashMap::new(),
            operator: parse_hash(operator_sha256)?,
            next_key: AtomicU64::new(1),
        };
        for lead in &policy.leads {
            let budget = identities.next_budget_key();
            budgets.add_root(budget, lead.daily_limit);
            let agent = Agent {
                spiffe_id: lead.spiffe_id.as_str().into(),
                budget,
                manifest: Arc::new(policy.catalogue.manifest(&lead.scopes)),
            };
            identities
                .agents
                .insert(parse_hash(&lead.key_sha256)?, Arc::new(agent));
        }
        Ok(identities)
    }

    /// A fresh key for a new node in the budget tree.
    pub fn next_budget_key(&self) -> AgentKey {
        self.next_key.fetch_add(1, Ordering::Relaxed)
    }

    /// The caller behind a request's `Authorization: Bearer` key.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let key = bearer(headers).ok_or(ApiError::MissingKey)?;
        let hash: KeyHash = Sha256::digest(key).into();

        if let Some(agent) = self.agents.get(&hash) {
            return Ok(Caller::Agent(Arc::clone(agent.value())));
        }
        if hash == self.operator {
            return Ok(Caller::Operator);
        }
        Err(ApiError::UnknownKey)
    }

    /// The agent behind a request; the operator key is not an agent.
    pub fn authenticate_agent(&self, headers: &HeaderMap) -> Result<Arc<Agent>, ApiError> {
        match self.authenticate(headers)? {
            Caller::Agent(agent) => Ok(agent),
            Caller::Operator => Err(ApiError::UnknownKey),
        }
    }

    /// Succeeds only for the operator key.
    pub fn authenticate_operator(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        match self.authenticate(headers)? {
            Caller::Operator => Ok(()),
            Caller::Agent(_) => Err(ApiError::OperatorOnly),
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(http::header::AUTHORIZATION)?.as_bytes();
    let (scheme, key) = value.split_at_checked(7)?;
    let key = key.trim_ascii();
    (scheme.eq_ignore_ascii_case(b"bearer ") && !key.is_empty()).then_some(key)
}

fn parse_hash(hex_digest: &str) -> Result<KeyHash, ConfigError> {
    let mut hash = [0u8; 32];
    hex::decode_to_slice(hex_digest, &mut hash)
        .map_err(|e| ConfigError::Invalid(format!("key hash {hex_digest}: {e}")))?;
    Ok(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_trimmed() {
        assert_eq!(bearer(&headers("Bearer abc")), Some(&b"abc"[..]));
        assert_eq!(bearer(&headers("bearer  abc ")), Some(&b"abc"[..]));
        assert_eq!(bearer(&headers("Basic abc")), None);
        assert_eq!(bearer(&headers("Bearer ")), None);
    }
}
