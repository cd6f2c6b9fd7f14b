//! Agents: the registry of every lead and sub-agent, and their lifecycle.
//!
//! Leads come from policy. Sub-agents are spawned by an agent (or the operator on its
//! behalf) through the control plane: [`spawn`] checks the request against policy and
//! the parent, carves the slice out of the parent's budget, issues a key, and only then
//! registers the child, so a refused spawn leaves nothing behind. Ending an agent ends
//! its descendants first (deepest first), revokes their keys and returns each unspent
//! slice to its parent.

mod spawn;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use dashmap::DashMap;

use crate::budget::{AgentKey, Amount, Budgets};
use crate::policy::{Delegation, Manifest, Policy};

pub use spawn::{SpawnRequest, Spawned, spawn};

/// Trust levels, lowest first (see DESIGN.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TrustLevel {
    Quarantined = 0,
    Watched = 1,
    Active = 2,
    Trusted = 3,
}

impl TrustLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            TrustLevel::Quarantined => "QUARANTINED",
            TrustLevel::Watched => "WATCHED",
            TrustLevel::Active => "ACTIVE",
            TrustLevel::Trusted => "TRUSTED",
        }
    }

    pub fn parse(text: &str) -> Option<TrustLevel> {
        match text {
            "QUARANTINED" => Some(TrustLevel::Quarantined),
            "WATCHED" => Some(TrustLevel::Watched),
            "ACTIVE" => Some(TrustLevel::Active),
            "TRUSTED" => Some(TrustLevel::Trusted),
            _ => None,
        }
    }

    fn from_u8(n: u8) -> TrustLevel {
        match n {
            0 => TrustLevel::Quarantined,
            1 => TrustLevel::Watched,
            2 => TrustLevel::Active,
            _ => TrustLevel::Trusted,
        }
    }
}

/// Why an agent ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Terminated through the control plane.
    Terminated,
    /// Its parent (or an ancestor) was terminated.
    Cascaded,
    /// It reached its `max_duration`.
    Expired,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Terminated => "terminated",
            EndReason::Cascaded => "cascaded",
            EndReason::Expired => "expired",
        }
    }
}

/// A lead or sub-agent.
#[derive(Debug)]
pub struct Agent {
    /// The agent's node in the budget tree, and its key in the registry.
    pub key: AgentKey,
    /// The public id, `agt_` and 16 hex digits.
    pub id: String,
    pub name: String,
    /// The agent's SPIFFE ID, used as its identity in metrics, logs and records.
    pub spiffe_id: Arc<str>,
    pub parent: Option<AgentKey>,
    /// The lead at the root of this agent's tree, whose delegation rules apply.
    pub lead: AgentKey,
    /// 0 for a lead, 1 for its children, ...
    pub depth: u32,
    /// What the agent may use.
    pub manifest: Arc<Manifest>,
    /// The agent's daily limit: the slice it was given, or a lead's own limit.
    pub limit: Amount,
    /// Clean verdicts in a row before WATCHED becomes ACTIVE.
    pub promote_after: u32,
    pub created_at: SystemTime,
    /// When the agent ends by itself, if it does.
    pub expires_at: Option<SystemTime>,
    /// SHA-256 of the agent's bearer key.
    pub key_hash: [u8; 32],
    trust: AtomicU8,
    ended: Mutex<Option<(SystemTime, EndReason)>>,
}

impl Agent {
    pub fn trust(&self) -> TrustLevel {
        TrustLevel::from_u8(self.trust.load(Ordering::Relaxed))
    }

    pub fn ended(&self) -> Option<(SystemTime, EndReason)> {
        *self.ended.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_live(&self) -> bool {
        self.ended().is_none()
    }

    /// The tenant segment of the SPIFFE ID (`spiffe://domain/agent/<tenant>/<name>`).
    pub fn tenant(&self) -> &str {
        let path = self.spiffe_id.split_once("/agent/").map_or("", |(_, p)| p);
        path.split('/')
            .next()
            .filter(|t| !t.is_empty())
            .unwrap_or("default")
    }
}

/// Every agent Warden knows, live or ended.
pub struct Registry {
    agents: DashMap<AgentKey, Arc<Agent>>,
    by_id: DashMap<String, AgentKey>,
    /// Live agents by SPIFFE ID: a name is taken while its agent lives.
    live_ids: DashMap<Arc<str>, AgentKey>,
    children: DashMap<AgentKey, Vec<AgentKey>>,
    /// Each lead's delegation rules.
    delegation: DashMap<AgentKey, Delegation>,
    next_key: AtomicU64,
}

impl Registry {
    /// The registry with the policy's leads, each with its own budget.
    pub fn new(policy: &Policy, budgets: &Budgets) -> Result<Registry, crate::config::ConfigError> {
        let registry = Registry {
            agents: DashMap::new(),
            by_id: DashMap::new(),
            live_ids: DashMap::new(),
            children: DashMap::new(),
            delegation: DashMap::new(),
            next_key: AtomicU64::new(1),
        };
        for lead in &policy.leads {
            let key = registry.next_key();
            budgets.add_root(key, lead.daily_limit);
            let name = lead.spiffe_id.rsplit('/').next().unwrap_or(&lead.spiffe_id);
            let agent = Agent {
                key,
                id: format!("lead_{key:016x}"),
                name: name.to_owned(),
                spiffe_id: lead.spiffe_id.as_str().into(),
                parent: None,
                lead: key,
                depth: 0,
                manifest: Arc::new(policy.catalogue.manifest(&lead.scopes)),
                limit: lead.daily_limit,
                promote_after: 0,
                created_at: SystemTime::now(),
                expires_at: None,
                key_hash: crate::identity::parse_hash(&lead.key_sha256)?,
                trust: AtomicU8::new(TrustLevel::Trusted as u8),
                ended: Mutex::new(None),
            };
            registry.delegation.insert(key, lead.delegation.clone());
            registry.insert(Arc::new(agent));
        }
        Ok(registry)
    }

    fn next_key(&self) -> AgentKey {
        self.next_key.fetch_add(1, Ordering::Relaxed)
    }

    fn insert(&self, agent: Arc<Agent>) {
        self.by_id.insert(agent.id.clone(), agent.key);
        if agent.is_live() {
            self.live_ids
                .insert(Arc::clone(&agent.spiffe_id), agent.key);
        }
        if let Some(parent) = agent.parent {
            self.children.entry(parent).or_default().push(agent.key);
        }
        self.agents.insert(agent.key, agent);
    }

    pub fn get(&self, key: AgentKey) -> Option<Arc<Agent>> {
        self.agents.get(&key).map(|a| Arc::clone(a.value()))
    }

    /// An agent by public id, SPIFFE ID, or (for live agents) name.
    pub fn find(&self, reference: &str) -> Option<Arc<Agent>> {
        if let Some(key) = self.by_id.get(reference) {
            return self.get(*key);
        }
        if let Some(key) = self.live_ids.get(reference) {
            return self.get(*key);
        }
        self.agents
            .iter()
            .find(|a| a.name == reference && a.is_live())
            .map(|a| Arc::clone(a.value()))
    }

    /// Every agent, in creation order.
    pub fn all(&self) -> Vec<Arc<Agent>> {
        let mut all: Vec<_> = self.agents.iter().map(|a| Arc::clone(a.value())).collect();
        all.sort_by_key(|a| a.key);
        all
    }

    pub fn children(&self, key: AgentKey) -> Vec<Arc<Agent>> {
        let keys = self
            .children
            .get(&key)
            .map(|c| c.clone())
            .unwrap_or_default();
        keys.into_iter().filter_map(|k| self.get(k)).collect()
    }

    /// Whether `agent` is `ancestor` or one of its descendants.
    pub fn is_within(&self, agent: &Agent, ancestor: AgentKey) -> bool {
        let mut next = Some(agent.key);
        while let Some(key) = next {
            if key == ancestor {
                return true;
            }
            next = self.get(key).and_then(|a| a.parent);
        }
        false
    }

    pub fn delegation(&self, lead: AgentKey) -> Option<Delegation> {
        self.delegation.get(&lead).map(|d| d.clone())
    }

    /// Ends `agent` and every descendant, deepest first: each stops authenticating,
    /// and each unspent slice returns to its parent. Returns the agents ended now.
    pub fn end(&self, agent: &Agent, reason: EndReason, budgets: &Budgets) -> Vec<Arc<Agent>> {
        let mut ended = Vec::new();
        for child in self.children(agent.key) {
            ended.extend(self.end(&child, EndReason::Cascaded, budgets));
        }

        let Some(agent) = self.get(agent.key) else {
            return ended;
        };
        let mut state = agent.ended.lock().unwrap_or_else(|p| p.into_inner());
        if state.is_some() {
            return ended;
        }
        *state = Some((SystemTime::now(), reason));
        drop(state);

        self.live_ids.remove(&agent.spiffe_id);
        budgets.end(agent.key);
        ended.push(agent);
        ended
    }

    /// Live agents whose lifetime has run out at `now`.
    pub fn expired(&self, now: SystemTime) -> Vec<Arc<Agent>> {
        self.agents
            .iter()
            .filter(|a| a.is_live() && a.expires_at.is_some_and(|at| at <= now))
            .map(|a| Arc::clone(a.value()))
            .collect()
    }
}

/// The manifest of a child restricted to `scopes` (already checked to be the parent's).
fn child_manifest(policy: &Policy, scopes: &BTreeSet<String>) -> Manifest {
    policy.catalogue.manifest(scopes)
}

/// A lifetime, capped by the parent's own end: a child never outlives its parent.
fn expiry(now: SystemTime, lifetime: Duration, parent: &Agent) -> SystemTime {
    let own = now + lifetime;
    parent.expires_at.map_or(own, |p| p.min(own))
}
