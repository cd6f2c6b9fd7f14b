//! Decisions: every delegation decision (spawn, termination, ...) as one record,
//! written through one interface before the decision is acknowledged.
//!
//! Records go to the `decisions` table, in order, each with a sequence number that is
//! its evidence id. The evidence ledger signs and chains these same records; callers
//! only ever see [`DecisionLog::record`].

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rusqlite::{Connection, params};
use serde_json::json;

use crate::agents::Agent;
use crate::error::ApiError;
use crate::server::App;
use crate::store::{Store, StoreError};

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
    pub fn spawn(actor: &str, app: &App, agent: &Agent) -> Decision {
        let parent = agent.parent.and_then(|p| app.registry.get(p));
        let mut models: Vec<&String> = agent.manifest.models.iter().collect();
        models.sort();
        let mut tools: Vec<&String> = agent.manifest.tools.iter().collect();
        tools.sort();

        Decision {
            kind: "spawn",
            actor: actor.to_owned(),
            subject: agent.spiffe_id.to_string(),
            details: json!({
                "agent_id": agent.id,
                "parent": parent.map(|p| p.spiffe_id.to_string()),
                "slice_usd": agent.limit.to_usd().normalize().to_string(),
                "scopes": agent.manifest.scopes,
                "models": models,
                "tools": tools,
                "trust": agent.trust().as_str(),
                "promote_after": agent.promote_after,
                "expires_at": agent.expires_at.map(|t| humantime::format_rfc3339_millis(t).to_string()),
            }),
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
}

/// The append-only log of decisions.
#[derive(Clone)]
pub struct DecisionLog {
    conn: Arc<Mutex<Connection>>,
}

impl DecisionLog {
    pub fn open(store: &Store) -> Result<DecisionLog, StoreError> {
        Ok(DecisionLog {
            conn: Arc::new(Mutex::new(store.connection()?)),
        })
    }

    /// Appends `decision` durably and returns its evidence id.
    pub async fn record(&self, decision: Decision) -> Result<String, ApiError> {
        let conn = Arc::clone(&self.conn);
        let seq = tokio::task::spawn_blocking(move || append(&conn, &decision))
            .await
            .map_err(|e| ApiError::Internal(format!("decision log: {e}")))?
            .map_err(|e| ApiError::Internal(format!("decision log: {e}")))?;
        Ok(format!("dec_{seq:012}"))
    }
}

fn append(conn: &Mutex<Connection>, decision: &Decision) -> Result<i64, StoreError> {
    let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
    conn.execute(
        "INSERT INTO decisions (at_ms, kind, actor, subject, details) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            crate::server::unix_ms(decision.at),
            decision.kind,
            decision.actor,
            decision.subject,
            decision.details.to_string(),
        ],
    )?;
    Ok(conn.last_insert_rowid())
}
