//! Decisions: every delegation decision (spawn, termination, ...) as one record,
//! written through one interface before the decision is acknowledged.
//!
//! Records go to the evidence ledger (see `ledger`) in the control store, in order, each
//! with a sequence number that is its evidence id, signed and chained, in the same
//! transaction as the state change they describe.

use std::sync::Arc;
use std::time::SystemTime;

use serde_json::json;

use crate::agents::Agent;
use crate::identity::{KeyChange, KeyHash};
use crate::store::StoreError;
use crate::store::control::{AgentRow, ControlStore, DecisionRow};

/// One decision, as recorded.
#[derive(Debug, Clone)]
pub struct Decision {
    pub kind: &'static str,
    /// Who decided: an agent's SPIFFE ID, `operator` or `warden`.
    pub actor: String,
    /// The agent the decision is about.
    pub subject: String,
    pub details: serde_json::Value,
    pub at: SystemTime,
}

impl Decision {
    /// A child was spawned: what its parent granted.
    pub fn spawn(actor: &str, parent: &Agent, agent: &Agent) -> Decision {
        let manifest = agent.manifest();
        let mut models: Vec<&String> = manifest.models.iter().collect();
        models.sort();
        let mut tools: Vec<&String> = manifest.tools.iter().collect();
        tools.sort();

        Decision {
            kind: "spawn",
            actor: actor.to_owned(),
            subject: agent.spiffe_id.to_string(),
            details: json!({
                "agent_id": agent.id,
                "parent": parent.spiffe_id.to_string(),
                "slice_usd": agent.limit.to_usd().normalize().to_string(),
                "scopes": manifest.scopes,
                "models": models,
                "tools": tools,
                "trust": agent.trust().as_str(),
                "promote_after": agent.promote_after,
                "expires_at": agent.expires_at.map(|t| humantime::format_rfc3339_millis(t).to_string()),
            }),
            at: SystemTime::now(),
        }
    }

    /// `new` replaces `old`: same role, manifest and slice, a new identity.
    pub fn replacement(actor: &str, old: &Agent, new: &Agent) -> Decision {
        Decision {
            kind: "replacement",
            actor: actor.to_owned(),
            subject: new.spiffe_id.to_string(),
            details: json!({
                "agent_id": new.id,
                "replaces": old.spiffe_id.to_string(),
                "replaces_id": old.id,
            }),
            at: SystemTime::now(),
        }
    }

    /// A spawn was refused: who asked, for which parent and name, and why.
    pub fn spawn_refused(
        actor: &str,
        parent: &str,
        name: &str,
        code: &str,
        reason: &str,
    ) -> Decision {
        Decision {
            kind: "spawn_refused",
            actor: actor.to_owned(),
            subject: parent.to_owned(),
            details: json!({ "name": name, "code": code, "reason": reason }),
            at: SystemTime::now(),
        }
    }

    /// An agent's breaker tripped: it reached its limit (the first refusal this window).
    pub fn breaker_trip(agent: &Agent, reason: &str) -> Decision {
        Decision {
            kind: "breaker_trip",
            actor: "warden".to_owned(),
            subject: agent.spiffe_id.to_string(),
            details: json!({ "agent_id": agent.id, "reason": reason }),
            at: SystemTime::now(),
        }
    }

    /// An agent was quarantined: refused, key revoked, budget frozen.
    pub fn quarantine(actor: &str, agent: &Agent, reason: &str) -> Decision {
        Decision {
            kind: "quarantine",
            actor: actor.to_owned(),
            subject: agent.spiffe_id.to_string(),
            details: json!({ "agent_id": agent.id, "reason": reason, "trust": "QUARANTINED" }),
            at: SystemTime::now(),
        }
    }

    /// An agent's key was replaced (a lead's, by policy): the old key is refused from
    /// now on. Keys are named by the start of their SHA-256, never shown.
    pub fn key_change(
        actor: &str,
        agent: &Agent,
        old: &KeyHash,
        new: &KeyHash,
        reason: &str,
    ) -> Decision {
        Decision {
            kind: "key_change",
            actor: actor.to_owned(),
            subject: agent.spiffe_id.to_string(),
            details: json!({
                "agent_id": agent.id,
                "old_key_sha256_prefix": hex::encode(&old[..8]),
                "new_key_sha256_prefix": hex::encode(&new[..8]),
                "reason": reason,
            }),
            at: SystemTime::now(),
        }
    }

    /// A new policy was put in force.
    pub fn policy_reload(actor: &str, source: &str, leads: usize) -> Decision {
        Decision {
            kind: "policy_reload",
            actor: actor.to_owned(),
            subject: source.to_owned(),
            details: json!({ "source": source, "leads": leads }),
            at: SystemTime::now(),
        }
    }

    /// An agent ended; its unspent slice returned to its parent.
    pub fn termination(actor: &str, agent: &Agent) -> Decision {
        let reason = agent.ended().map_or("terminated", |(_, r)| r.as_str());
        Decision {
            kind: "termination",
            actor: actor.to_owned(),
            subject: agent.spiffe_id.to_string(),
            details: json!({ "agent_id": agent.id, "reason": reason }),
            at: SystemTime::now(),
        }
    }

    fn row(&self) -> DecisionRow {
        DecisionRow {
            time: humantime::format_rfc3339_millis(self.at).to_string(),
            kind: self.kind,
            actor: self.actor.clone(),
            subject: self.subject.clone(),
            details: self.details.clone(),
        }
    }
}

/// The evidence id of a decision's record.
fn evidence_id(seq: i64) -> String {
    format!("dec_{seq:012}")
}

/// The one interface every decision goes through.
#[derive(Clone)]
pub struct DecisionLog {
    store: Arc<ControlStore>,
}

impl DecisionLog {
    pub fn new(store: Arc<ControlStore>) -> DecisionLog {
        DecisionLog { store }
    }

    /// Stores a spawned agent and the decision that created it, together. Blocking.
    pub fn spawned(&self, agent: &AgentRow, decision: &Decision) -> Result<String, StoreError> {
        let seq = self.store.insert_agent(agent, Some(&decision.row()))?;
        Ok(evidence_id(seq.unwrap_or_default()))
    }

    /// Stores an agent's new trust level with the decision, together. Blocking.
    pub fn trust_changed(&self, agent: &Agent, decision: &Decision) -> Result<String, StoreError> {
        let seq = self
            .store
            .set_trust(agent.key, agent.trust().as_str(), &decision.row())?;
        Ok(evidence_id(seq))
    }

    /// Stores agents' new key hashes with one decision each, all together. Blocking.
    pub fn keys_changed(
        &self,
        actor: &str,
        reason: &str,
        changes: &[KeyChange],
    ) -> Result<Vec<String>, StoreError> {
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        let (keys, decisions): (Vec<_>, Vec<_>) = changes
            .iter()
            .map(|c| {
                let decision = Decision::key_change(actor, &c.agent, &c.old, &c.new, reason);
                ((c.agent.key, hex::encode(c.new)), decision.row())
            })
            .unzip();
        let seqs = self.store.set_key_hashes(&keys, &decisions)?;
        Ok(seqs.into_iter().map(evidence_id).collect())
    }

    /// Appends one decision on its own. Blocking.
    pub fn record(&self, decision: &Decision) -> Result<String, StoreError> {
        Ok(evidence_id(self.store.record(&decision.row())?))
    }

    /// Stores that `agents` ended, with one decision each, together. Blocking.
    pub fn ended(&self, actor: &str, agents: &[Arc<Agent>]) -> Result<Vec<String>, StoreError> {
        if agents.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<_> = agents
            .iter()
            .filter_map(|a| {
                let (at, reason) = a.ended()?;
                Some((a.key, crate::server::unix_ms(at), reason.as_str()))
            })
            .collect();
        let decisions: Vec<_> = agents
            .iter()
            .map(|a| Decision::termination(actor, a).row())
            .collect();
        let seqs = self.store.end_agents(&rows, &decisions)?;
        Ok(seqs.into_iter().map(evidence_id).collect())
    }
}
