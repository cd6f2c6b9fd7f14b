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
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;

use crate::budget::{AgentKey, Amount, Budgets};
use crate::identity::{KeyChange, KeyHash};
use crate::policy::{Delegation, Manifest, Policy};
use crate::store::StoreError;
use crate::store::control::{AgentRow, ControlStore};

pub use spawn::{Fleet, SpawnRequest, Spawned, next_name, spawn};

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
    /// The scopes granted at creation. The manifest in force is these, narrowed to what
    /// the parent holds under the current policy.
    pub granted: BTreeSet<String>,
    manifest: RwLock<Arc<Manifest>>,
    /// The agent's daily limit: the slice it was given, or a lead's own limit.
    pub limit: Amount,
    /// Clean verdicts in a row before WATCHED becomes ACTIVE.
    pub promote_after: u32,
    pub created_at: SystemTime,
    /// When the agent ends by itself, if it does.
    pub expires_at: Option<SystemTime>,
    /// The SHA-256 of its bearer key; a lead's changes when policy gives it another.
    key_hash: Mutex<KeyHash>,
    trust: AtomicU8,
    ended: Mutex<Option<(SystemTime, EndReason)>>,
}

impl Agent {
    /// What the agent may use now.
    pub fn manifest(&self) -> Arc<Manifest> {
        Arc::clone(&self.manifest.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Puts the agent in quarantine: it is refused from now on.
    pub fn quarantine(&self) {
        self.trust
            .store(TrustLevel::Quarantined as u8, Ordering::Relaxed);
    }

    fn set_manifest(&self, manifest: Manifest) {
        *self.manifest.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(manifest);
    }

    /// The agent as stored.
    pub fn row(&self) -> AgentRow {
        AgentRow {
            key: self.key,
            id: self.id.clone(),
            name: self.name.clone(),
            spiffe_id: self.spiffe_id.to_string(),
            parent: self.parent,
            lead: self.lead,
            depth: self.depth,
            scopes: self.granted.iter().cloned().collect(),
            limit: self.limit,
            promote_after: self.promote_after,
            created_ms: crate::server::unix_ms(self.created_at),
            expires_ms: self.expires_at.map(crate::server::unix_ms),
            key_hash: hex::encode(self.key_hash()),
            ended_ms: self.ended().map(|(at, _)| crate::server::unix_ms(at)),
            end_reason: self.ended().map(|(_, r)| r.as_str().to_owned()),
            trust: self.trust().as_str().to_owned(),
        }
    }

    pub fn key_hash(&self) -> KeyHash {
        *self.key_hash.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives the agent a new key hash (see [`crate::identity::Identities::rekey`]).
    pub(crate) fn set_key_hash(&self, hash: KeyHash) {
        *self.key_hash.lock().unwrap_or_else(|p| p.into_inner()) = hash;
    }

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
    /// Spawns between their checks and their commit; its lock is the spawn lock.
    spawning: Mutex<spawn::Pending>,
}

impl Registry {
    /// The registry as it was before the last stop: the policy's leads (keeping their
    /// keys from earlier runs) and every stored sub-agent, with their budgets, the
    /// leases of the current window counted as spent, and ended agents ended again.
    pub fn restore(
        policy: &Policy,
        budgets: &Budgets,
        store: &ControlStore,
    ) -> Result<Registry, RestoreError> {
        let snapshot = store.load()?;
        let registry = Registry {
            agents: DashMap::new(),
            by_id: DashMap::new(),
            live_ids: DashMap::new(),
            children: DashMap::new(),
            delegation: DashMap::new(),
            next_key: AtomicU64::new(snapshot.agents.iter().map(|a| a.key).max().unwrap_or(0) + 1),
            spawning: Mutex::default(),
        };

        for lead in &policy.leads {
            registry.restore_lead(lead, policy, budgets, store)?;
        }
        for row in snapshot.agents.iter().filter(|r| r.parent.is_some()) {
            registry.restore_child(row, policy, budgets);
        }
        for (&(agent, window), &leased) in &snapshot.leases {
            budgets.restore_lease(agent, window, leased);
        }
        let quarantined = registry
            .all()
            .into_iter()
            .filter(|a| a.trust() == TrustLevel::Quarantined);
        for agent in quarantined {
            budgets.freeze(agent.key);
        }
        let mut ended: Vec<_> = registry
            .all()
            .into_iter()
            .filter(|a| !a.is_live())
            .collect();
        ended.sort_by_key(|a| std::cmp::Reverse(a.depth));
        for agent in ended {
            budgets.end(agent.key);
        }
        Ok(registry)
    }

    fn restore_lead(
        &self,
        lead: &crate::policy::Lead,
        policy: &Policy,
        budgets: &Budgets,
        store: &ControlStore,
    ) -> Result<(), RestoreError> {
        let stored = store.lead(&lead.spiffe_id)?;
        let key = stored.as_ref().map_or_else(|| self.next_key(), |s| s.key);
        // Policy makes a lead TRUSTED and live; an operator's quarantine or
        // termination outlasts a restart.
        let trust = match stored.as_ref().and_then(|s| TrustLevel::parse(&s.trust)) {
            Some(TrustLevel::Quarantined) => TrustLevel::Quarantined,
            _ => TrustLevel::Trusted,
        };
        let ended = stored.as_ref().and_then(|s| {
            let at = s.ended_ms?;
            Some((from_ms(at), end_reason(s.end_reason.as_deref())))
        });
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
            granted: lead.scopes.clone(),
            manifest: RwLock::new(Arc::new(policy.catalogue.manifest(&lead.scopes))),
            limit: lead.daily_limit,
            promote_after: 0,
            created_at: SystemTime::now(),
            expires_at: None,
            key_hash: Mutex::new(crate::identity::parse_hash(&lead.key_sha256)?),
            trust: AtomicU8::new(trust as u8),
            ended: Mutex::new(ended),
        };
        if stored.is_none() {
            store.insert_agent(&agent.row(), None)?;
        }
        self.delegation.insert(key, lead.delegation.clone());
        self.insert(Arc::new(agent));
        Ok(())
    }

    /// Re-creates a stored sub-agent under its parent. Its scopes are narrowed to what
    /// the parent still holds, in case policy changed while Warden was down.
    fn restore_child(&self, row: &AgentRow, policy: &Policy, budgets: &Budgets) {
        let Some(parent) = row.parent.and_then(|p| self.get(p)) else {
            tracing::warn!(agent.id = %row.spiffe_id, "stored agent has no parent any more; not restored");
            return;
        };
        let Ok(key_hash) = crate::identity::parse_hash(&row.key_hash) else {
            tracing::warn!(agent.id = %row.spiffe_id, "stored agent has an unreadable key hash; not restored");
            return;
        };
        let granted: BTreeSet<String> = row.scopes.iter().cloned().collect();
        let scopes = granted
            .intersection(&parent.manifest().scopes)
            .cloned()
            .collect();

        budgets.restore_child(parent.key, row.key, row.limit);
        let agent = Agent {
            key: row.key,
            id: row.id.clone(),
            name: row.name.clone(),
            spiffe_id: row.spiffe_id.as_str().into(),
            parent: Some(parent.key),
            lead: row.lead,
            depth: row.depth,
            granted,
            manifest: RwLock::new(Arc::new(child_manifest(policy, &scopes))),
            limit: row.limit,
            promote_after: row.promote_after,
            created_at: from_ms(row.created_ms),
            expires_at: row.expires_ms.map(from_ms),
            key_hash: Mutex::new(key_hash),
            trust: AtomicU8::new(TrustLevel::parse(&row.trust).unwrap_or(TrustLevel::Watched) as u8),
            ended: Mutex::new(
                row.ended_ms
                    .map(|at| (from_ms(at), end_reason(row.end_reason.as_deref()))),
            ),
        };
        self.insert(Arc::new(agent));
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

    /// Ends `agent` and every descendant still live (also under an agent that ended
    /// before), deepest first: each stops authenticating, and each unspent slice
    /// returns to its parent. Returns the agents ended now.
    pub fn end(&self, agent: &Agent, reason: EndReason, budgets: &Budgets) -> Vec<Arc<Agent>> {
        let Some(agent) = self.get(agent.key) else {
            return Vec::new();
        };
        let ends_now = {
            let mut state = agent.ended.lock().unwrap_or_else(|p| p.into_inner());
            let live = state.is_none();
            if live {
                *state = Some((SystemTime::now(), reason));
            }
            live
        };

        // Marked before its children are listed: a spawn that publishes a child after
        // the mark finds its parent ended and ends the child itself (see `spawn`); one
        // that published before it is in the list.
        let mut ended = Vec::new();
        for child in self.children(agent.key) {
            ended.extend(self.end(&child, EndReason::Cascaded, budgets));
        }

        if ends_now {
            self.live_ids.remove(&agent.spiffe_id);
            budgets.end(agent.key);
            ended.push(agent);
        }
        ended
    }

    /// Ends every live agent under an ended one and returns them. A crash can leave
    /// one behind: a child stored just after its parent ended, before the child's own
    /// end was stored (see `spawn`).
    pub fn end_orphans(&self, budgets: &Budgets) -> Vec<Arc<Agent>> {
        self.all()
            .into_iter()
            .filter(|agent| !agent.is_live())
            .flat_map(|agent| self.end(&agent, EndReason::Cascaded, budgets))
            .collect()
    }

    /// Checks a reloaded policy against the registry before anything changes: every
    /// lead must still be in it. Returns the key changes it makes, for the caller to
    /// store, record and put in force (see [`crate::identity::Identities::rekey`]).
    pub fn plan_policy(&self, policy: &Policy) -> Result<Vec<KeyChange>, String> {
        let mut rekeyed = Vec::new();
        for lead in self.all().into_iter().filter(|a| a.parent.is_none()) {
            let Some(new) = policy
                .leads
                .iter()
                .find(|l| *l.spiffe_id == *lead.spiffe_id)
            else {
                return Err(format!(
                    "lead {} is missing from the new policy; end it before removing it",
                    lead.spiffe_id
                ));
            };
            let (old, new) = (
                lead.key_hash(),
                crate::identity::parse_hash(&new.key_sha256).map_err(|e| e.to_string())?,
            );
            if new != old {
                rekeyed.push(KeyChange {
                    agent: lead,
                    old,
                    new,
                });
            }
        }
        Ok(rekeyed)
    }

    /// Puts a reloaded policy, checked by [`Registry::plan_policy`], in force: leads'
    /// limits, scopes and delegation rules change, new leads appear, and every live
    /// agent's manifest is recomputed from the new catalogue, parents first, each child
    /// narrowed to what its parent now holds.
    pub fn apply_policy(
        &self,
        policy: &Policy,
        budgets: &Budgets,
        identities: &crate::identity::Identities,
        store: &ControlStore,
    ) -> Result<(), String> {
        let leads: Vec<_> = self
            .all()
            .into_iter()
            .filter(|a| a.parent.is_none())
            .collect();

        for new in &policy.leads {
            match leads.iter().find(|l| *l.spiffe_id == *new.spiffe_id) {
                Some(lead) => {
                    budgets.set_limit(lead.key, new.daily_limit);
                    self.delegation.insert(lead.key, new.delegation.clone());
                }
                None => {
                    self.restore_lead(new, policy, budgets, store)
                        .map_err(|e| e.to_string())?;
                    if let Some(added) = self.find(&new.spiffe_id) {
                        identities.insert(added);
                    }
                }
            }
        }

        for agent in self.all().into_iter().filter(|a| a.is_live()) {
            let scopes = match agent.parent.and_then(|p| self.get(p)) {
                None => policy
                    .leads
                    .iter()
                    .find(|l| *l.spiffe_id == *agent.spiffe_id)
                    .map(|l| l.scopes.clone())
                    .unwrap_or_default(),
                Some(parent) => agent
                    .granted
                    .intersection(&parent.manifest().scopes)
                    .cloned()
                    .collect(),
            };
            agent.set_manifest(policy.catalogue.manifest(&scopes));
        }
        Ok(())
    }

    /// Leads whose key in force is not the one stored: the policy changed it while
    /// Warden was down, or gave a lead added again a new key. Each change is still to
    /// be stored and recorded.
    pub fn unrecorded_lead_keys(&self, store: &ControlStore) -> Result<Vec<KeyChange>, StoreError> {
        let mut changes = Vec::new();
        for lead in self.all().into_iter().filter(|a| a.parent.is_none()) {
            let stored = store.lead(&lead.spiffe_id)?;
            let old = stored.and_then(|s| crate::identity::parse_hash(&s.key_hash).ok());
            let new = lead.key_hash();
            if let Some(old) = old.filter(|old| *old != new) {
                changes.push(KeyChange {
                    agent: lead,
                    old,
                    new,
                });
            }
        }
        Ok(changes)
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

/// Why the registry could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Store(#[from] StoreError),
}

fn from_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn end_reason(text: Option<&str>) -> EndReason {
    match text {
        Some("expired") => EndReason::Expired,
        Some("cascaded") => EndReason::Cascaded,
        _ => EndReason::Terminated,
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
