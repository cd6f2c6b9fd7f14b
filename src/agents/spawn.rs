//! Spawning a sub-agent: the request, every check policy and the parent impose, and
//! the few steps that create the child once all checks pass.
//!
//! The order matters: everything that can refuse runs before anything changes, and the
//! one check that is also a change (carving the slice out of the parent's budget) runs
//! last, under the registry's spawn lock, so a refused spawn leaves no trace and two
//! concurrent spawns cannot both take the same room, name or child slot. The lock is
//! not held while the spawn is made durable: the name and child slot stay reserved
//! (see [`Pending`]) and the child is published afterwards, so spawns in flight
//! together share one commit.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::str::FromStr;
use std::sync::atomic::AtomicU8;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime};

use rust_decimal::Decimal;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use super::{Agent, EndReason, Registry, TrustLevel, child_manifest, expiry};
use crate::budget::{AgentKey, Amount, BudgetError, Budgets};
use crate::decisions::{Decision, DecisionLog};
use crate::error::ApiError;
use crate::identity::Identities;
use crate::policy::Policy;
use crate::store::StoreError;

/// `POST /v1/agents`: the child to spawn.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SpawnRequest {
    /// The parent: its id, SPIFFE ID or name.
    pub parent: String,
    pub name: String,
    pub budget: BudgetRequest,
    #[serde(default)]
    pub permissions: PermissionsRequest,
    #[serde(default)]
    pub trust: TrustRequest,
    #[serde(default)]
    pub lifecycle: LifecycleRequest,
}

/// The child's budget: a slice of its parent's.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetRequest {
    /// US dollars per day, as a decimal string.
    #[schema(value_type = String, example = "50.00")]
    pub daily_limit: serde_json::Value,
    /// `USD`, the only currency.
    pub currency: Option<String>,
    /// `parent_slice`, the only source.
    pub source: Option<String>,
}

/// The child's permissions: a subset of its parent's.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PermissionsRequest {
    /// `parent`, the only source.
    pub inherit_from: Option<String>,
    /// The scopes the child gets; absent means every scope the parent may delegate.
    pub restrict_to: Option<Vec<String>>,
}

/// The child's trust: it always starts WATCHED.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrustRequest {
    /// `WATCHED`; any higher level is refused.
    pub initial_level: Option<String>,
    /// A count, or a string like `"3_clean_verdicts"`.
    #[schema(value_type = String, example = "3_clean_verdicts")]
    pub promote_after: Option<serde_json::Value>,
}

/// The child's lifetime.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LifecycleRequest {
    /// A duration like `"72h"`; absent means the policy's `max_lifetime`.
    pub max_duration: Option<String>,
    /// Must be `true` when given: every sub-agent ends at its `max_duration`.
    pub auto_terminate: Option<bool>,
}

/// A spawned agent, its bearer key (shown this once) and its evidence id.
pub struct Spawned {
    pub agent: Arc<Agent>,
    pub api_key: String,
    pub evidence_id: String,
}

/// Where a spawn reads and writes: the registry, keys, budgets, policy, decisions.
pub struct Fleet<'a> {
    pub registry: &'a Registry,
    pub identities: &'a Identities,
    pub budgets: &'a Budgets,
    pub policy: &'a Policy,
    pub decisions: &'a DecisionLog,
}

/// What a spawn request asks for, once parsed.
struct Terms {
    slice: Amount,
    scopes: BTreeSet<String>,
    promote_after: u32,
    lifetime: Duration,
}

const DEFAULT_PROMOTE_AFTER: u32 = 3;

/// Spawns that passed their checks and are being made durable: their names are
/// taken and they count against their parents' child limits.
#[derive(Debug, Default)]
pub struct Pending {
    names: HashSet<Arc<str>>,
    children: HashMap<AgentKey, usize>,
}

impl Pending {
    fn hold(&mut self, parent: AgentKey, name: &Arc<str>) {
        self.names.insert(Arc::clone(name));
        *self.children.entry(parent).or_default() += 1;
    }

    fn release(&mut self, parent: AgentKey, name: &str) {
        self.names.remove(name);
        if let Some(count) = self.children.get_mut(&parent) {
            *count -= 1;
            if *count == 0 {
                self.children.remove(&parent);
            }
        }
    }

    fn children_of(&self, parent: AgentKey) -> usize {
        self.children.get(&parent).copied().unwrap_or(0)
    }
}

fn spawn_lock(registry: &Registry) -> MutexGuard<'_, Pending> {
    registry.spawning.lock().unwrap_or_else(|p| p.into_inner())
}

/// Spawns a child of `request.parent` on behalf of `caller` (`None`: the operator).
/// Blocks on the control store: call it off the async threads.
pub fn spawn(
    request: SpawnRequest,
    caller: Option<&Agent>,
    fleet: Fleet<'_>,
) -> Result<Spawned, ApiError> {
    let registry = fleet.registry;
    let parent = registry
        .find(&request.parent)
        .ok_or_else(|| ApiError::AgentNotFound(request.parent.clone()))?;
    if let Some(caller) = caller
        && caller.key != parent.key
    {
        return Err(ApiError::NotYourAgent {
            caller: caller.spiffe_id.to_string(),
            target: parent.spiffe_id.to_string(),
        });
    }
    check_name(&request.name)?;
    let terms = terms(&request, &parent, registry)?;

    let (agent, api_key) = reserve(request.name, &parent, &terms, &fleet)?;

    // Durable before it exists: a crash after this keeps the child, one before it
    // never acknowledged it.
    let actor = caller.map_or_else(|| "operator".to_owned(), |c| c.spiffe_id.to_string());
    let decision = Decision::spawn(&actor, &parent, &agent);
    let stored = fleet.decisions.spawned(&agent.row(), &decision);
    let evidence_id = publish(&parent, &agent, stored, &fleet)?;
    tracing::info!(
        agent.id = %agent.spiffe_id, parent = %parent.spiffe_id,
        slice_usd = %terms.slice.to_usd(), scopes = ?terms.scopes, "agent spawned"
    );
    Ok(Spawned {
        agent,
        api_key,
        evidence_id,
    })
}

/// Under the spawn lock: the last checks, the slice carved out of the parent's budget
/// and the name and child slot held, for a child not yet visible to anyone.
fn reserve(
    name: String,
    parent: &Agent,
    terms: &Terms,
    fleet: &Fleet<'_>,
) -> Result<(Arc<Agent>, String), ApiError> {
    let (registry, budgets, policy) = (fleet.registry, fleet.budgets, fleet.policy);
    let mut pending = spawn_lock(registry);
    check_parent(parent, registry, pending.children_of(parent.key))?;
    let spiffe_id: Arc<str> = format!(
        "spiffe://{}/agent/{}/{}",
        policy.trust_domain,
        parent.tenant(),
        name
    )
    .into();
    if registry.live_ids.contains_key(&spiffe_id) || pending.names.contains(&spiffe_id) {
        return Err(ApiError::NameTaken {
            spiffe_id: spiffe_id.to_string(),
        });
    }

    let key = registry.next_key();
    budgets
        .delegate(parent.key, key, terms.slice)
        .map_err(|e| slice_refused(parent, e))?;
    pending.hold(parent.key, &spiffe_id);

    let api_key = new_key();
    let now = SystemTime::now();
    let agent = Agent {
        key,
        id: format!("agt_{:016x}", random_u64()),
        name,
        spiffe_id,
        parent: Some(parent.key),
        lead: parent.lead,
        depth: parent.depth + 1,
        manifest: RwLock::new(Arc::new(child_manifest(policy, &terms.scopes))),
        granted: terms.scopes.clone(),
        limit: terms.slice,
        promote_after: terms.promote_after,
        created_at: now,
        expires_at: Some(expiry(now, terms.lifetime, parent)),
        key_hash: Mutex::new(Sha256::digest(api_key.as_bytes()).into()),
        trust: AtomicU8::new(TrustLevel::Watched as u8),
        ended: Mutex::new(None),
    };
    Ok((Arc::new(agent), api_key))
}

/// After the commit: a stored child joins the registry and can authenticate; one that
/// could not be stored gives its slice back. A parent ended while the child was being
/// stored takes the child with it, recorded like any cascade.
fn publish(
    parent: &Agent,
    agent: &Arc<Agent>,
    stored: Result<String, StoreError>,
    fleet: &Fleet<'_>,
) -> Result<String, ApiError> {
    let (registry, budgets) = (fleet.registry, fleet.budgets);
    let evidence_id = {
        let mut pending = spawn_lock(registry);
        pending.release(parent.key, &agent.spiffe_id);
        let evidence_id = stored.map_err(|e| {
            budgets.end(agent.key);
            ApiError::Internal(format!("spawn not stored: {e}"))
        })?;
        registry.insert(Arc::clone(agent));
        fleet.identities.insert(Arc::clone(agent));
        evidence_id
    };

    if !parent.is_live() {
        tracing::warn!(
            agent.id = %agent.spiffe_id, parent = %parent.spiffe_id,
            "parent ended while its child was being stored; ending the child"
        );
        let ended = registry.end(agent, EndReason::Cascaded, budgets);
        for agent in &ended {
            fleet.identities.revoke(agent);
        }
        fleet
            .decisions
            .ended("warden", &ended)
            .map_err(|e| ApiError::Internal(format!("termination not stored: {e}")))?;
        return Err(ApiError::ParentUnavailable {
            parent: parent.spiffe_id.to_string(),
            state: "ended",
        });
    }
    Ok(evidence_id)
}

impl SpawnRequest {
    /// A request for a fresh agent with `old`'s role, manifest, slice and lifetime,
    /// named `name`.
    pub fn replacing(old: &Agent, parent: &Agent, name: String) -> SpawnRequest {
        let lifetime = old
            .expires_at
            .and_then(|end| end.duration_since(old.created_at).ok())
            .unwrap_or(Duration::from_secs(3600));
        SpawnRequest {
            parent: parent.id.clone(),
            name,
            budget: BudgetRequest {
                daily_limit: serde_json::Value::String(old.limit.to_usd().normalize().to_string()),
                currency: None,
                source: None,
            },
            permissions: PermissionsRequest {
                inherit_from: None,
                restrict_to: Some(old.granted.iter().cloned().collect()),
            },
            trust: TrustRequest {
                initial_level: None,
                promote_after: Some(old.promote_after.into()),
            },
            lifecycle: LifecycleRequest {
                max_duration: Some(humantime::format_duration(lifetime).to_string()),
                auto_terminate: None,
            },
        }
    }
}

/// The next free name in `name`'s role: `data-fetcher-03` gives `data-fetcher-04`
/// (or the first number after every agent of that role the registry has seen).
pub fn next_name(name: &str, registry: &Registry) -> String {
    let (role, width) = match name.rsplit_once('-') {
        Some((role, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            (role, n.len())
        }
        _ => (name, 2),
    };
    let taken = registry
        .all()
        .into_iter()
        .filter_map(|a| {
            let (r, n) = a.name.rsplit_once('-')?;
            (r == role).then(|| n.parse::<u64>().ok()).flatten()
        })
        .max()
        .unwrap_or(0);
    format!("{role}-{:0width$}", taken + 1)
}

/// Parses the request and checks it against the parent and its lead's delegation.
fn terms(request: &SpawnRequest, parent: &Agent, registry: &Registry) -> Result<Terms, ApiError> {
    let rules = registry.delegation(parent.lead).ok_or_else(|| {
        ApiError::Internal(format!("no delegation rules for {}", parent.spiffe_id))
    })?;

    let slice = slice(&request.budget)?;
    if slice > rules.max_slice {
        return Err(ApiError::DelegationDenied(format!(
            "a slice of {slice} is above the {} that policy allows per child",
            rules.max_slice
        )));
    }
    if parent.depth + 1 > rules.max_depth {
        return Err(ApiError::DelegationDenied(format!(
            "a child of {} would be at depth {}; policy allows {}",
            parent.spiffe_id,
            parent.depth + 1,
            rules.max_depth
        )));
    }

    let scopes = scopes(&request.permissions, parent, &rules.allowed_scopes)?;
    let promote_after = trust(&request.trust)?;
    let lifetime = lifetime(&request.lifecycle, rules.max_lifetime)?;
    Ok(Terms {
        slice,
        scopes,
        promote_after,
        lifetime,
    })
}

/// The checks that can change while a spawn waits for the lock: the parent can take
/// one more child (live, not quarantined, under its child limit counting the
/// `pending` spawns under it).
fn check_parent(parent: &Agent, registry: &Registry, pending: usize) -> Result<(), ApiError> {
    if !parent.is_live() {
        return Err(ApiError::ParentUnavailable {
            parent: parent.spiffe_id.to_string(),
            state: "ended",
        });
    }
    if parent.trust() == TrustLevel::Quarantined {
        return Err(ApiError::ParentUnavailable {
            parent: parent.spiffe_id.to_string(),
            state: "quarantined",
        });
    }

    let rules = registry.delegation(parent.lead).ok_or_else(|| {
        ApiError::Internal(format!("no delegation rules for {}", parent.spiffe_id))
    })?;
    let live = registry
        .children(parent.key)
        .iter()
        .filter(|c| c.is_live())
        .count()
        + pending;
    if live >= rules.max_children {
        return Err(ApiError::DelegationDenied(format!(
            "{} already has {live} live children; policy allows {}",
            parent.spiffe_id, rules.max_children
        )));
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), ApiError> {
    let valid = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if valid {
        return Ok(());
    }
    Err(ApiError::InvalidField {
        field: "name",
        reason: format!(
            "{name:?} must be 1-63 characters of a-z, 0-9 and '-', not starting with '-'"
        ),
    })
}

fn slice(budget: &BudgetRequest) -> Result<Amount, ApiError> {
    let invalid = |reason: String| ApiError::InvalidField {
        field: "budget.daily_limit",
        reason,
    };
    if budget.currency.as_deref().is_some_and(|c| c != "USD") {
        return Err(ApiError::InvalidField {
            field: "budget.currency",
            reason: "only USD is supported".into(),
        });
    }
    if budget
        .source
        .as_deref()
        .is_some_and(|s| s != "parent_slice")
    {
        return Err(ApiError::InvalidField {
            field: "budget.source",
            reason: "a child's budget is always a slice of its parent's: use \"parent_slice\""
                .into(),
        });
    }

    let serde_json::Value::String(text) = &budget.daily_limit else {
        return Err(invalid(format!(
            "{} must be a decimal string such as \"50.00\"",
            budget.daily_limit
        )));
    };
    let amount = Decimal::from_str(text)
        .map_err(|_| invalid(format!("{text:?} is not a decimal amount")))?;
    if amount <= Decimal::ZERO {
        return Err(invalid(format!("{text} must be above zero")));
    }
    Amount::from_usd(amount).ok_or_else(|| {
        invalid(format!(
            "{text} is more precise than 10^-12 or above the 1000000 maximum"
        ))
    })
}

fn scopes(
    permissions: &PermissionsRequest,
    parent: &Agent,
    delegable: &BTreeSet<String>,
) -> Result<BTreeSet<String>, ApiError> {
    if permissions
        .inherit_from
        .as_deref()
        .is_some_and(|i| i != "parent")
    {
        return Err(ApiError::InvalidField {
            field: "permissions.inherit_from",
            reason: "a child inherits from its parent: use \"parent\"".into(),
        });
    }

    let grantable: BTreeSet<String> = parent
        .manifest()
        .scopes
        .intersection(delegable)
        .cloned()
        .collect();
    let Some(asked) = &permissions.restrict_to else {
        return Ok(grantable);
    };
    for scope in asked {
        if !parent.manifest().scopes.contains(scope) {
            return Err(ApiError::ScopeNotGranted {
                scope: scope.clone(),
                why: format!("{} does not hold it", parent.spiffe_id),
            });
        }
        if !delegable.contains(scope) {
            return Err(ApiError::ScopeNotGranted {
                scope: scope.clone(),
                why: "policy does not allow delegating it".into(),
            });
        }
    }
    Ok(asked.iter().cloned().collect())
}

fn trust(trust: &TrustRequest) -> Result<u32, ApiError> {
    if let Some(level) = &trust.initial_level {
        match TrustLevel::parse(level) {
            Some(TrustLevel::Watched) => {}
            Some(_) => return Err(ApiError::TrustDenied(level.clone())),
            None => {
                return Err(ApiError::InvalidField {
                    field: "trust.initial_level",
                    reason: format!("{level:?} is not a trust level; a new agent starts WATCHED"),
                });
            }
        }
    }

    let invalid = |value: &serde_json::Value| ApiError::InvalidField {
        field: "trust.promote_after",
        reason: format!("{value} must be a count such as 3 or \"3_clean_verdicts\""),
    };
    match &trust.promote_after {
        None => Ok(DEFAULT_PROMOTE_AFTER),
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| invalid(&trust.promote_after.clone().unwrap_or_default())),
        Some(value @ serde_json::Value::String(text)) => text
            .trim_end_matches("_clean_verdicts")
            .parse::<u32>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| invalid(value)),
        Some(other) => Err(invalid(other)),
    }
}

fn lifetime(lifecycle: &LifecycleRequest, max: Duration) -> Result<Duration, ApiError> {
    if lifecycle.auto_terminate == Some(false) {
        return Err(ApiError::InvalidField {
            field: "lifecycle.auto_terminate",
            reason: "every sub-agent ends at its max_duration; policy allows no open-ended agents"
                .into(),
        });
    }
    let Some(text) = &lifecycle.max_duration else {
        return Ok(max);
    };

    let duration = humantime::parse_duration(text).map_err(|e| ApiError::InvalidField {
        field: "lifecycle.max_duration",
        reason: format!("{text:?}: {e}; use a duration such as \"72h\""),
    })?;
    if duration.is_zero() {
        return Err(ApiError::InvalidField {
            field: "lifecycle.max_duration",
            reason: "must be above zero".into(),
        });
    }
    if duration > max {
        return Err(ApiError::DelegationDenied(format!(
            "a lifetime of {text} is above the {} that policy allows",
            humantime::format_duration(max)
        )));
    }
    Ok(duration)
}

fn slice_refused(parent: &Agent, error: BudgetError) -> ApiError {
    ApiError::from_budget(&parent.spiffe_id, error)
}

/// A new bearer key: 192 random bits, hex-encoded, with a recognisable prefix.
fn new_key() -> String {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    format!("wdn_{}", hex::encode(bytes))
}

fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    u64::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::SystemClock;
    use crate::store::Store;
    use crate::store::control::ControlStore;

    fn request(parent: &str, name: &str, slice: &str) -> SpawnRequest {
        serde_json::from_value(serde_json::json!({
            "parent": parent,
            "name": name,
            "budget": {"daily_limit": slice},
            "permissions": {"restrict_to": ["models.standard"]},
            "lifecycle": {"max_duration": "1h"},
        }))
        .unwrap()
    }

    /// A registry over a store in `dir`, as a start of Warden builds it.
    struct World {
        policy: Policy,
        budgets: Arc<Budgets>,
        registry: Registry,
        identities: Identities,
        decisions: DecisionLog,
    }

    impl World {
        fn open(dir: &std::path::Path) -> World {
            let store = Store::open(dir).unwrap();
            let control = Arc::new(ControlStore::open(&store, dir).unwrap());
            let policy = Policy::load(None, |_| true).unwrap();
            let budgets = Budgets::with_leases(Arc::new(SystemClock), control.clone());
            let registry = Registry::restore(&policy, &budgets, &control).unwrap();
            World {
                identities: Identities::new(&"0".repeat(64), &registry).unwrap(),
                decisions: DecisionLog::new(control),
                policy,
                budgets,
                registry,
            }
        }

        fn fleet(&self) -> Fleet<'_> {
            Fleet {
                registry: &self.registry,
                identities: &self.identities,
                budgets: &self.budgets,
                policy: &self.policy,
                decisions: &self.decisions,
            }
        }

        /// A worker under the demo lead, and its child `fetcher` reserved (checked,
        /// slice carved out) but neither stored nor published.
        fn worker_and_reserved_child(&self) -> (Arc<Agent>, Arc<Agent>) {
            let worker = spawn(request("lead", "worker", "100"), None, self.fleet())
                .unwrap()
                .agent;
            let helper = request("worker", "fetcher", "10");
            let terms = terms(&helper, &worker, &self.registry).unwrap();
            let (child, _key) = reserve(helper.name, &worker, &terms, &self.fleet()).unwrap();
            (worker, child)
        }
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("warden-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// A parent that ends between its child's checks and the child's publication takes
    /// the child with it: the spawn is refused, the child ended and recorded, its slice
    /// back with the lead.
    #[test]
    fn a_parent_ended_during_the_commit_takes_the_child_with_it() {
        let dir = scratch("spawn-race");
        let world = World::open(&dir);
        let lead = world.registry.find("lead").unwrap();
        let room = world.budgets.available(lead.key);

        let (worker, child) = world.worker_and_reserved_child();
        let decision = Decision::spawn("operator", &worker, &child);
        let stored = world.decisions.spawned(&child.row(), &decision);
        let ended = world
            .registry
            .end(&worker, EndReason::Terminated, &world.budgets);
        assert_eq!(ended.len(), 1, "the child is not published yet");
        let refused = publish(&worker, &child, stored, &world.fleet());

        assert!(
            matches!(refused, Err(ApiError::ParentUnavailable { .. })),
            "{refused:?}"
        );
        assert!(!child.is_live());
        assert_eq!(
            world.budgets.available(lead.key),
            room,
            "both slices are back"
        );
        assert_eq!(control_kinds(&dir), ["spawn", "spawn", "termination"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A crash after such a child was stored but before its end was leaves it live
    /// under its ended parent; the next start ends it.
    #[test]
    fn a_child_left_under_an_ended_parent_by_a_crash_is_ended_on_restart() {
        let dir = scratch("spawn-orphan");
        let world = World::open(&dir);
        let lead = world.registry.find("lead").unwrap();
        let room = world.budgets.available(lead.key);
        let (worker, child) = world.worker_and_reserved_child();
        let ended = world
            .registry
            .end(&worker, EndReason::Terminated, &world.budgets);
        world.decisions.ended("operator", &ended).unwrap();
        let decision = Decision::spawn("operator", &worker, &child);
        world.decisions.spawned(&child.row(), &decision).unwrap();
        drop(world);

        let world = World::open(&dir);
        let restored = world.registry.find(&child.id).unwrap();
        assert!(restored.is_live(), "stored as spawned, never as ended");
        let orphans = world.registry.end_orphans(&world.budgets);
        assert_eq!(orphans.len(), 1);
        assert_eq!(orphans[0].id, child.id);
        assert!(!restored.is_live());
        assert_eq!(
            world.budgets.available(lead.key),
            room,
            "both slices are back"
        );
        assert!(world.registry.end_orphans(&world.budgets).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The kinds of the ledger's entries, in order.
    fn control_kinds(dir: &std::path::Path) -> Vec<String> {
        let conn = Store::open(dir).unwrap().connection().unwrap();
        crate::store::control::read_ledger(&conn)
            .unwrap()
            .iter()
            .map(|e| {
                serde_json::from_str::<serde_json::Value>(&e.canonical).unwrap()["kind"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }
}
