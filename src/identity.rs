//! Identity: which agent (SPIFFE ID) a request comes from.
//!
//! Agents present a bearer key. Warden stores only the SHA-256 of each key, so a
//! leaked database or config file reveals no usable credential; keys are high-entropy
//! random strings, which makes a plain, unsalted hash sufficient. Every caller of the
//! request path asks [`Identities::authenticate`] and gets an [`Agent`] back, so
//! other credentials (an X.509-SVID over mTLS) can be added behind the same call.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use dashmap::DashMap;
use http::HeaderMap;
use sha2::{Digest, Sha256};

pub use crate::agents::Agent;
use crate::agents::Registry;
use crate::config::ConfigError;
use crate::error::ApiError;

/// Who is calling: an agent, or the operator.
pub enum Caller {
    Agent(Arc<Agent>),
    Operator,
}

pub type KeyHash = [u8; 32];

/// An agent's key changing from the key with hash `old` to the one with hash `new`.
pub struct KeyChange {
    pub agent: Arc<Agent>,
    pub old: KeyHash,
    pub new: KeyHash,
}

/// The table of known credentials.
pub struct Identities {
    agents: DashMap<KeyHash, Arc<Agent>>,
    operator: KeyHash,
    /// Held by every change of the table, so a key change and a revocation of the
    /// same agent cannot interleave. Authentication reads without it.
    changes: Mutex<()>,
}

impl Identities {
    /// The operator and every live agent of the registry.
    pub fn new(operator_sha256: &str, registry: &Registry) -> Result<Self, ConfigError> {
        let identities = Identities {
            agents: DashMap::new(),
            operator: parse_hash(operator_sha256)?,
            changes: Mutex::new(()),
        };
        let usable = |a: &Agent| a.is_live() && a.trust() != crate::agents::TrustLevel::Quarantined;
        for agent in registry.all().into_iter().filter(|a| usable(a)) {
            identities.insert(agent);
        }
        Ok(identities)
    }

    /// Lets `agent` authenticate with its key.
    pub fn insert(&self, agent: Arc<Agent>) {
        let _change = self.change();
        self.agents.insert(agent.key_hash(), agent);
    }

    /// Revokes `agent`'s key: its next request, on any connection, is refused.
    pub fn revoke(&self, agent: &Agent) {
        let _change = self.change();
        self.agents.remove(&agent.key_hash());
    }

    /// Gives each agent its new key: the old keys are refused from now on, and each
    /// new one works if its agent could authenticate before. All old keys go before any
    /// new one comes, so two agents may swap keys.
    pub fn rekey(&self, changes: &[KeyChange]) {
        let _change = self.change();
        let usable: Vec<bool> = changes
            .iter()
            .map(|change| self.agents.remove(&change.agent.key_hash()).is_some())
            .collect();
        for (change, usable) in changes.iter().zip(usable) {
            change.agent.set_key_hash(change.new);
            if usable {
                self.agents.insert(change.new, Arc::clone(&change.agent));
            }
        }
    }

    /// Whether `hash` is the operator key's.
    pub fn is_operator(&self, hash: &KeyHash) -> bool {
        *hash == self.operator
    }

    fn change(&self) -> std::sync::MutexGuard<'_, ()> {
        self.changes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The caller behind a request's `Authorization: Bearer` key.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let key = bearer(headers).ok_or(ApiError::MissingKey)?;
        let hash: KeyHash = Sha256::digest(key).into();

        if let Some(agent) = self.agents.get(&hash) {
            // An agent past its lifetime is refused even before the sweeper ends it.
            if agent.expires_at.is_some_and(|at| at <= SystemTime::now()) {
                return Err(ApiError::AgentEnded {
                    agent: agent.spiffe_id.to_string(),
                });
            }
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

pub(crate) fn parse_hash(hex_digest: &str) -> Result<KeyHash, ConfigError> {
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
