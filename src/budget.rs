//! Budgets: every agent's limit per window, and the reservations that make the limit a
//! hard ceiling under any concurrency.
//!
//! Money on the hot path is an integer number of picodollars ([`Amount`]), exact for
//! prices quoted to six decimals per million tokens, so reserving and settling are a
//! few integer operations under one lock. Each agent is a node in one tree:
//!
//! ```text
//! committed = spent + reserved + delegated + ended_children      (never above limit)
//! room      = limit - committed                                  (what it may still use)
//! ```
//!
//! `delegated` is the sum of the slices of the agent's live children. A child's limit
//! *is* its slice, which is already committed in every ancestor, so a child can never
//! spend its parent's own room: a reservation needs only the agent's room, checked in
//! the same critical section that checks no ancestor is frozen or ended. Ending a child
//! returns its unspent slice: the parent's `delegated` drops by the slice, and what the
//! child spent (and still has reserved) moves to the parent's `ended_children`.
//!
//! A request reserves its worst-case cost before it is forwarded and settles with its
//! actual cost afterwards, releasing the rest. Windows are UTC days from an injectable
//! [`Clock`]: at midnight spend resets, reservations and slices stay.
//!
//! Crash safety comes from leases. With a [`LeaseStore`], an agent may only have
//! `spent + reserved` up to its lease, a ceiling written durably *before* it is used.
//! After a crash every leased amount counts as spent, so a crash can waste at most one
//! lease block of room, never let an agent spend past its limit. Leases are extended a
//! block at a time ([`lease_block`]), in the background once half a block is left, so
//! a request waits for the disk only when it outruns that (the first request of an
//! agent's day, or a burst larger than a block).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;

/// An amount of US dollars in picodollars (10⁻¹² USD).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Amount(pub u64);

/// Picodollars per dollar.
const PICOS: u64 = 1_000_000_000_000;

/// The largest limit an agent may have: large enough for any fleet, small enough that
/// sums of limits never overflow.
pub const MAX_LIMIT: Amount = Amount(1_000_000 * PICOS);

impl Amount {
    pub const ZERO: Amount = Amount(0);

    /// Converts a decimal dollar amount; `None` if negative, finer than a picodollar,
    /// or above [`MAX_LIMIT`].
    pub fn from_usd(usd: Decimal) -> Option<Amount> {
        if usd.is_sign_negative() {
            return None;
        }
        let picos = usd.checked_mul(Decimal::from(PICOS))?;
        if picos.fract() != Decimal::ZERO {
            return None;
        }
        let amount = Amount(picos.to_u64()?);
        (amount <= MAX_LIMIT).then_some(amount)
    }

    pub fn to_usd(self) -> Decimal {
        Decimal::from(self.0) / Decimal::from(PICOS)
    }

    pub fn saturating_sub(self, other: Amount) -> Amount {
        Amount(self.0.saturating_sub(other.0))
    }
}

impl std::ops::Add for Amount {
    type Output = Amount;

    fn add(self, other: Amount) -> Amount {
        Amount(self.0.saturating_add(other.0))
    }
}

impl std::fmt::Display for Amount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "${}", self.to_usd().normalize())
    }
}

/// Where budgets get the time, so tests can cross midnight without waiting.
pub trait Clock: Send + Sync {
    fn now(&self) -> SystemTime;
}

/// The real clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// The UTC day a time falls in: the budget window.
fn window_of(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400)
}

/// An agent's identity in the budget tree.
pub type AgentKey = u64;

/// Why a budget operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    #[error("budget exceeded: {needed} needed, {available} available of a {limit} limit")]
    Exceeded {
        needed: Amount,
        available: Amount,
        limit: Amount,
    },
    #[error("the budget of {0} is frozen")]
    Frozen(AgentKey),
    #[error("agent {0} has ended")]
    Ended(AgentKey),
    #[error("agent {0} has no budget")]
    Unknown(AgentKey),
    /// The amount fits the limit but not the durable lease: extend the lease to
    /// `ceiling`, then try again.
    #[error("agent {agent} needs its lease extended to {ceiling}")]
    LeaseNeeded { agent: AgentKey, ceiling: Amount },
}

/// Where leases are written. Writing must be durable before it returns.
pub trait LeaseStore: Send + Sync {
    /// Raises `agent`'s lease for `window` to at least `ceiling`.
    fn persist(&self, agent: AgentKey, window: u64, ceiling: Amount) -> Result<(), String>;
}

/// How much a lease grows at a time: an eighth of the limit, at least a cent.
pub fn lease_block(limit: Amount) -> Amount {
    Amount((limit.0 / 8).max(PICOS / 100).min(limit.0))
}

/// What an agent's budget looks like right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetView {
    pub limit: Amount,
    pub spent: Amount,
    pub reserved: Amount,
    pub delegated: Amount,
    /// What ended children spent this window (it stays committed).
    pub ended_children: Amount,
    pub available: Amount,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeState {
    Live,
    Frozen,
    Ended,
}

#[derive(Debug)]
struct Node {
    parent: Option<AgentKey>,
    limit: Amount,
    spent: Amount,
    reserved: Amount,
    delegated: Amount,
    ended_children: Amount,
    /// The durable ceiling of `spent + reserved` in this window.
    leased: Amount,
    /// A lease extension is being written.
    extending: bool,
    /// The breaker tripped (a request found no room) in this window.
    tripped: bool,
    window: u64,
    state: NodeState,
    /// The window the node ended in: what it passed up then counts in that window only.
    ended_in: u64,
}

impl Node {
    fn committed(&self) -> Amount {
        self.spent + self.reserved + self.delegated + self.ended_children
    }

    fn room(&self) -> Amount {
        self.limit.saturating_sub(self.committed())
    }

    /// Starts a new window if the day has changed: spend resets, commitments stay.
    fn roll(&mut self, window: u64) {
        if self.window != window {
            self.window = window;
            self.spent = Amount::ZERO;
            self.ended_children = Amount::ZERO;
            self.leased = Amount::ZERO;
            self.tripped = false;
        }
    }

    fn view(&self) -> BudgetView {
        BudgetView {
            limit: self.limit,
            spent: self.spent,
            reserved: self.reserved,
            delegated: self.delegated,
            ended_children: self.ended_children,
            available: self.room(),
        }
    }
}

/// Every agent's budget, behind one lock (see the module docs).
pub struct Budgets {
    tree: Mutex<HashMap<AgentKey, Node>>,
    clock: Arc<dyn Clock>,
    /// `None`: no leases (tests and benches); every amount within the limit is usable.
    leases: Option<Arc<dyn LeaseStore>>,
}

/// Worst-case cost held against an agent's budget while its request is in flight.
/// Settle it with the actual cost; dropping it unsettled counts the whole amount as
/// spent, which can only under-use the budget.
#[must_use = "a reservation must be settled"]
pub struct Reservation {
    budgets: Arc<Budgets>,
    agent: AgentKey,
    amount: Amount,
    /// The least this reservation will settle for.
    floor: Amount,
    settled: bool,
    /// Set when little lease is left: the holder should extend it in the background.
    lease_hint: Option<Amount>,
}

impl Reservation {
    pub fn amount(&self) -> Amount {
        self.amount
    }

    /// The lease ceiling to extend to in the background, if the lease runs low.
    pub fn lease_hint(&self) -> Option<(AgentKey, Amount)> {
        self.lease_hint.map(|ceiling| (self.agent, ceiling))
    }

    /// Makes the eventual settlement count the whole reservation as spent, whatever
    /// actual cost it is given: for requests whose cost Warden cannot see.
    pub fn hold_as_spent(&mut self) {
        self.floor = self.amount;
    }

    /// Releases the reservation and records `actual` as spent (or the amount held by
    /// [`Reservation::hold_as_spent`], if larger). An actual cost above
    /// the reservation is recorded in full: it is what the provider billed.
    pub fn settle(mut self, actual: Amount) {
        self.settled = true;
        self.budgets
            .release(self.agent, self.amount, actual.max(self.floor));
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            self.budgets.release(self.agent, self.amount, self.amount);
        }
    }
}

impl Budgets {
    pub fn new(clock: Arc<dyn Clock>) -> Arc<Budgets> {
        Arc::new(Budgets {
            tree: Mutex::new(HashMap::new()),
            clock,
            leases: None,
        })
    }

    /// Budgets whose spending is covered by durable leases in `leases`.
    pub fn with_leases(clock: Arc<dyn Clock>, leases: Arc<dyn LeaseStore>) -> Arc<Budgets> {
        Arc::new(Budgets {
            tree: Mutex::new(HashMap::new()),
            clock,
            leases: Some(leases),
        })
    }

    fn lock(&self) -> (MutexGuard<'_, HashMap<AgentKey, Node>>, u64) {
        let window = window_of(self.clock.now());
        // A panic while holding the lock leaves integer fields consistent at every
        // step, so a poisoned lock is still safe to use.
        let tree = self
            .tree
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (tree, window)
    }

    /// Adds a root agent (a lead) with its own limit.
    pub fn add_root(&self, agent: AgentKey, limit: Amount) {
        let (mut tree, window) = self.lock();
        tree.insert(agent, new_node(None, limit, window));
    }

    /// Carves a child's budget out of its parent's room, in one step.
    pub fn delegate(
        &self,
        parent: AgentKey,
        child: AgentKey,
        slice: Amount,
    ) -> Result<(), BudgetError> {
        let (mut tree, window) = self.lock();
        check_path(&tree, parent)?;
        let node = tree.get_mut(&parent).ok_or(BudgetError::Unknown(parent))?;
        node.roll(window);

        let available = node.room();
        if slice > available {
            return Err(BudgetError::Exceeded {
                needed: slice,
                available,
                limit: node.limit,
            });
        }
        node.delegated = node.delegated + slice;
        tree.insert(child, new_node(Some(parent), slice, window));
        Ok(())
    }

    /// The most `agent` could reserve right now (zero if it or an ancestor is blocked).
    pub fn available(&self, agent: AgentKey) -> Amount {
        let (mut tree, window) = self.lock();
        if check_path(&tree, agent).is_err() {
            return Amount::ZERO;
        }
        tree.get_mut(&agent).map_or(Amount::ZERO, |node| {
            node.roll(window);
            node.room()
        })
    }

    /// Holds `amount` against `agent`'s budget if it fits and nothing on its path to
    /// the root is frozen or ended.
    pub fn reserve(
        self: &Arc<Self>,
        agent: AgentKey,
        amount: Amount,
    ) -> Result<Reservation, BudgetError> {
        self.reserve_up_to(agent, amount, amount)
    }

    /// Holds as much of `max` as fits, refusing if not even `min` does: the request
    /// is then clamped to what was held. One step, so two requests cannot both take
    /// the same room.
    pub fn reserve_up_to(
        self: &Arc<Self>,
        agent: AgentKey,
        min: Amount,
        max: Amount,
    ) -> Result<Reservation, BudgetError> {
        let (mut tree, window) = self.lock();
        check_path(&tree, agent)?;
        let node = tree.get_mut(&agent).ok_or(BudgetError::Unknown(agent))?;
        node.roll(window);

        let available = node.room();
        if min > available {
            return Err(BudgetError::Exceeded {
                needed: min,
                available,
                limit: node.limit,
            });
        }
        let amount = max.min(available);
        let mut lease_hint = None;
        if self.leases.is_some() {
            let used = node.spent + node.reserved + amount;
            let block = lease_block(node.limit);
            let cap = node
                .limit
                .saturating_sub(node.delegated + node.ended_children);
            if used > node.leased {
                return Err(BudgetError::LeaseNeeded {
                    agent,
                    ceiling: (used + block).min(cap),
                });
            }
            if node.leased.saturating_sub(used).0 < block.0 / 2
                && !node.extending
                && node.leased < cap
            {
                node.extending = true;
                lease_hint = Some((node.leased + block).min(cap));
            }
        }
        node.reserved = node.reserved + amount;
        drop(tree);

        Ok(Reservation {
            budgets: Arc::clone(self),
            agent,
            amount,
            floor: Amount::ZERO,
            settled: false,
            lease_hint,
        })
    }

    fn release(&self, agent: AgentKey, reserved: Amount, actual: Amount) {
        let (mut tree, window) = self.lock();
        let Some(node) = tree.get_mut(&agent) else {
            return;
        };
        node.roll(window);
        node.reserved = node.reserved.saturating_sub(reserved);

        // An agent that ended while this request was in flight is left alone: its
        // parent already counts the whole reservation as spent (see `end`).
        if node.state != NodeState::Ended {
            node.spent = node.spent + actual;
        }
    }

    /// Durably raises `agent`'s lease to `ceiling` for the current window. Blocks on the
    /// lease store: call it off the async threads.
    pub fn extend_lease(&self, agent: AgentKey, ceiling: Amount) -> Result<(), String> {
        let Some(leases) = &self.leases else {
            return Ok(());
        };
        let window = window_of(self.clock.now());
        let result = leases.persist(agent, window, ceiling);

        let (mut tree, _) = self.lock();
        if let Some(node) = tree.get_mut(&agent) {
            node.extending = false;
            if result.is_ok() && node.window == window && ceiling > node.leased {
                node.leased = ceiling;
            }
        }
        result
    }

    /// Restores an agent's state after a restart: everything its lease covered in the
    /// current window counts as spent, since what happened to it is unknown.
    pub fn restore_lease(&self, agent: AgentKey, window: u64, leased: Amount) {
        let (mut tree, current) = self.lock();
        if window != current {
            return;
        }
        if let Some(node) = tree.get_mut(&agent) {
            node.roll(current);
            node.spent = node.spent.max(leased);
            node.leased = node.leased.max(leased);
        }
    }

    /// Re-creates a child's node after a restart without checking the parent's room:
    /// the slice was granted before the crash and is still committed.
    pub fn restore_child(&self, parent: AgentKey, child: AgentKey, slice: Amount) {
        let (mut tree, window) = self.lock();
        if let Some(node) = tree.get_mut(&parent) {
            node.roll(window);
            node.delegated = node.delegated + slice;
        }
        tree.insert(child, new_node(Some(parent), slice, window));
    }

    /// Ends `agent`: its unspent slice returns to its parent (and past it, if the parent
    /// ended first). Open reservations stay counted as spent in the parent.
    pub fn end(&self, agent: AgentKey) {
        let (mut tree, window) = self.lock();
        let Some(node) = tree.get_mut(&agent) else {
            return;
        };
        if node.state == NodeState::Ended {
            return;
        }
        node.roll(window);
        node.state = NodeState::Ended;
        node.ended_in = window;
        let (mut next, slice, used) = (node.parent, node.limit, node.committed());

        let Some(parent) = next.and_then(|p| tree.get_mut(&p)) else {
            return;
        };
        parent.roll(window);
        parent.delegated = parent.delegated.saturating_sub(slice);
        parent.ended_children = parent.ended_children + used;

        // A parent that ended first (a child published just after its parent's end)
        // passed this whole slice up as used; pass the unspent part up after it, to
        // the first ancestor still live. Only within the window it was passed up in:
        // after that, the ancestor's counters have started again.
        let returned = slice.saturating_sub(used);
        while let Some(ended) = next.and_then(|p| tree.get(&p))
            && ended.state == NodeState::Ended
            && ended.ended_in == window
        {
            next = ended.parent;
            if let Some(ancestor) = next.and_then(|p| tree.get_mut(&p)) {
                ancestor.roll(window);
                ancestor.ended_children = ancestor.ended_children.saturating_sub(returned);
            }
        }
    }

    /// Marks `agent`'s breaker as tripped; true only the first time in a window, so
    /// the trip is recorded once however many requests it refuses.
    pub fn trip(&self, agent: AgentKey) -> bool {
        let (mut tree, window) = self.lock();
        let Some(node) = tree.get_mut(&agent) else {
            return false;
        };
        node.roll(window);
        !std::mem::replace(&mut node.tripped, true)
    }

    /// Changes a lead's limit (a policy reload). A limit below what is committed leaves
    /// no room until the window turns; nothing already committed is taken back.
    pub fn set_limit(&self, agent: AgentKey, limit: Amount) {
        let (mut tree, window) = self.lock();
        if let Some(node) = tree.get_mut(&agent) {
            node.roll(window);
            node.limit = limit;
        }
    }

    /// Freezes `agent`'s budget: it and its descendants can reserve nothing more.
    pub fn freeze(&self, agent: AgentKey) {
        let (mut tree, _) = self.lock();
        if let Some(node) = tree.get_mut(&agent)
            && node.state == NodeState::Live
        {
            node.state = NodeState::Frozen;
        }
    }

    pub fn view(&self, agent: AgentKey) -> Option<BudgetView> {
        let (mut tree, window) = self.lock();
        let node = tree.get_mut(&agent)?;
        node.roll(window);
        Some(node.view())
    }
}

fn new_node(parent: Option<AgentKey>, limit: Amount, window: u64) -> Node {
    Node {
        parent,
        limit,
        spent: Amount::ZERO,
        reserved: Amount::ZERO,
        delegated: Amount::ZERO,
        ended_children: Amount::ZERO,
        leased: Amount::ZERO,
        extending: false,
        tripped: false,
        window,
        state: NodeState::Live,
        ended_in: 0,
    }
}

/// Checks that `agent` and every ancestor can still spend.
fn check_path(tree: &HashMap<AgentKey, Node>, agent: AgentKey) -> Result<(), BudgetError> {
    let mut next = Some(agent);
    while let Some(key) = next {
        let node = tree.get(&key).ok_or(BudgetError::Unknown(key))?;
        match node.state {
            NodeState::Live => {}
            NodeState::Frozen => return Err(BudgetError::Frozen(key)),
            NodeState::Ended => return Err(BudgetError::Ended(key)),
        }
        next = node.parent;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
