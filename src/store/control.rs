//! The control store: agents, budget leases and the evidence ledger, written
//! synchronously (these are the facts a crash must not lose) by one writer thread.
//!
//! Each write is atomic and committed before the caller acknowledges anything: a
//! spawn's agent row and its decision record together, a termination's rows and records
//! together, a lease before the amount it covers is spent. Writes that arrive together
//! share a transaction (group commit, see `commit`), and every commit is fsynced
//! (`synchronous = FULL`), so an acknowledged decision survives a killed process and a
//! power cut alike.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};

use rusqlite::{Connection, OptionalExtension, params};

use super::commit::Committer;
pub use super::commit::Stats;
use super::{Store, StoreError};
use crate::budget::{AgentKey, Amount, LeaseStore};
use sha2::{Digest, Sha256};

use crate::ledger::merkle::{self, Frontier};
use crate::ledger::{Checkpoint, Entry, GENESIS, Signer, StoredEntry};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS agents (
    key           INTEGER PRIMARY KEY,
    id            TEXT    NOT NULL UNIQUE,
    name          TEXT    NOT NULL,
    spiffe_id     TEXT    NOT NULL,
    parent        INTEGER,
    lead          INTEGER NOT NULL,
    depth         INTEGER NOT NULL,
    scopes        TEXT    NOT NULL,
    limit_picos   INTEGER NOT NULL,
    promote_after INTEGER NOT NULL,
    created_ms    INTEGER NOT NULL,
    expires_ms    INTEGER,
    key_hash      TEXT    NOT NULL,
    trust         TEXT    NOT NULL,
    ended_ms      INTEGER,
    end_reason    TEXT
);
CREATE TABLE IF NOT EXISTS leases (
    agent        INTEGER NOT NULL,
    window       INTEGER NOT NULL,
    leased_picos INTEGER NOT NULL,
    PRIMARY KEY (agent, window)
);
CREATE TABLE IF NOT EXISTS ledger (
    seq       INTEGER PRIMARY KEY,
    entry     TEXT    NOT NULL,
    hash      TEXT    NOT NULL,
    signature TEXT    NOT NULL,
    key_id    TEXT    NOT NULL,
    kind      TEXT    NOT NULL,
    subject   TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_by_subject ON ledger (subject, seq);
CREATE INDEX IF NOT EXISTS ledger_by_kind ON ledger (kind, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    size      INTEGER PRIMARY KEY,
    root      TEXT    NOT NULL,
    time      TEXT    NOT NULL,
    key_id    TEXT    NOT NULL,
    signature TEXT    NOT NULL,
    co_key_id    TEXT,
    co_signature TEXT
);
-- Each SIEM sink's last acknowledged entry (see the sinks module).
CREATE TABLE IF NOT EXISTS sink_cursors (
    sink TEXT    PRIMARY KEY,
    seq  INTEGER NOT NULL
);
";

/// One agent as stored.
#[derive(Debug, Clone)]
pub struct AgentRow {
    pub key: AgentKey,
    pub id: String,
    pub name: String,
    pub spiffe_id: String,
    pub parent: Option<AgentKey>,
    pub lead: AgentKey,
    pub depth: u32,
    pub scopes: Vec<String>,
    pub limit: Amount,
    pub promote_after: u32,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
    pub key_hash: String,
    pub trust: String,
    pub ended_ms: Option<i64>,
    pub end_reason: Option<String>,
}

/// One decision record, ready to append to the ledger.
#[derive(Debug, Clone)]
pub struct DecisionRow {
    /// RFC 3339 with milliseconds.
    pub time: String,
    pub kind: &'static str,
    pub actor: String,
    pub subject: String,
    pub details: serde_json::Value,
}

/// A lead as stored: its key in the registry, its trust, its key hash (hex) and
/// whether it ended.
#[derive(Debug, Clone)]
pub struct StoredLead {
    pub key: AgentKey,
    pub trust: String,
    pub key_hash: String,
    pub ended_ms: Option<i64>,
    pub end_reason: Option<String>,
}

/// What survived the last run.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Every agent, leads included, in key order (parents before children).
    pub agents: Vec<AgentRow>,
    /// Each agent's lease in each stored window.
    pub leases: HashMap<(AgentKey, u64), Amount>,
}

pub struct ControlStore {
    /// Startup reads (the restore, a lead's earlier key); WAL lets them run beside the
    /// writer.
    reader: Mutex<Connection>,
    /// Every write, group-committed by one thread that owns the ledger's tail.
    writer: Committer<Tail>,
    /// The key signing new entries, as last committed (the writer keeps its own copy).
    signer: RwLock<Signer>,
    /// Held through a key rotation, from staging the key to putting it in force.
    rotation: Mutex<()>,
}

/// The end of the committed ledger, kept by the writer so an append reads nothing.
#[derive(Clone)]
struct Tail {
    seq: i64,
    hash: String,
    frontier: Frontier,
    signer: Signer,
    /// The size the newest checkpoint covers.
    checkpointed: i64,
}

impl ControlStore {
    /// Opens the store and checks the ledger's chain. A torn tail (entries whose hash
    /// or link to the previous entry is broken, as a crash mid-write could leave) is
    /// cut off, and a `recovery` entry records what was cut. A break, or a missing
    /// entry, that a signed checkpoint or a sink's acknowledgement already covers is
    /// no torn write but damage: Warden refuses to start rather than cut evidence away
    /// or sign over the gap.
    ///
    /// The signing key is loaded from `keys` (created for an empty ledger) and must be
    /// the one the intact ledger expects next (see [`Signer::load_for`]).
    pub fn open(store: &Store, keys: &std::path::Path) -> Result<ControlStore, StoreError> {
        let conn = store.connection()?;
        conn.execute_batch(SCHEMA)?;
        // Acknowledged means on disk: every commit of the writer is fsynced, one fsync
        // per group of writes.
        conn.pragma_update(None, "synchronous", "FULL")?;

        let entries = read_ledger(&conn)?;
        let intact = intact_prefix(&entries);
        let checkpointed: i64 =
            conn.query_row("SELECT COALESCE(MAX(size), 0) FROM checkpoints", [], |r| {
                r.get(0)
            })?;
        // Also for a chain without a break: entries cut off cleanly show only here.
        refuse_damage(&conn, intact as u64 + 1, checkpointed)?;
        let signer = Signer::load_for(keys, next_key(&entries[..intact]).as_deref())?;
        let tail = Tail::of(&entries[..intact], signer.clone(), checkpointed);

        let control = ControlStore {
            reader: Mutex::new(store.connection()?),
            writer: Committer::start(conn, tail)?,
            signer: RwLock::new(signer),
            rotation: Mutex::new(()),
        };
        if intact < entries.len() {
            control.cut_torn_tail(intact as u64 + 1, entries.len() as u64)?;
        }
        Ok(control)
    }

    /// Deletes entries `first..=last` (none of them checkpointed or delivered, see
    /// [`refuse_damage`]) and records that it did, in one transaction.
    fn cut_torn_tail(&self, first: u64, last: u64) -> Result<(), StoreError> {
        tracing::error!(
            first,
            last,
            "ledger tail is torn; cutting it and recording the recovery"
        );
        let recovery = DecisionRow {
            time: now(),
            kind: "recovery",
            actor: "warden".into(),
            subject: "ledger".into(),
            details: serde_json::json!({ "cut_from": first, "cut_to": last }),
        };
        self.writer.write(move |conn, tail| {
            conn.execute("DELETE FROM ledger WHERE seq >= ?1", [first as i64])?;
            tail.append(conn, &recovery)
        })?;
        Ok(())
    }

    /// The key signing new entries.
    pub fn signer(&self) -> Signer {
        self.signer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Rotates the ledger key: a `key_rotation` entry signed by the old key announces
    /// the new one, and the next checkpoint (made at once) is signed by both.
    ///
    /// The new key is staged on disk first and put in force only after the entry is
    /// committed: a crash before the commit leaves the old key (the staged one is
    /// discarded on the next start), one after it is finished on the next start (see
    /// [`Signer::load_for`]), so no entry is ever signed by a key the ledger has
    /// not announced.
    pub fn rotate_key(
        &self,
        data_dir: &std::path::Path,
        actor: &str,
    ) -> Result<(i64, Signer), StoreError> {
        let _rotating = self.rotation.lock().unwrap_or_else(|p| p.into_inner());
        // A rotation whose files were not switched is finished before a new key is
        // staged over the one now signing.
        if Signer::staged(data_dir)?.is_some_and(|staged| staged.key_id() == self.signer().key_id())
        {
            Signer::promote_staged(data_dir)?;
        }
        let (dir, actor) = (data_dir.to_path_buf(), actor.to_owned());
        let (seq, new) = self.writer.write(move |conn, tail| {
            let old = tail.signer.clone();
            let new = Signer::stage(&dir)?;
            let announcement = DecisionRow {
                time: now(),
                kind: "key_rotation",
                actor,
                subject: "ledger".into(),
                details: serde_json::json!({
                    "old_key_id": old.key_id(),
                    "new_key_id": new.key_id(),
                    "new_public_key": new.public_key_hex(),
                }),
            };

            let seq = tail.append(conn, &announcement)?;
            tail.signer = new.clone();
            tail.checkpoint(conn, Some(&old))?;
            Ok((seq, new))
        })?;

        *self.signer.write().unwrap_or_else(|p| p.into_inner()) = new.clone();
        Signer::promote_staged(data_dir)
            .map_err(|source| StoreError::RotationUnfinished { seq, source })?;
        Ok((seq, new))
    }

    fn reader(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Everything stored, for the startup restore.
    pub fn load(&self) -> Result<Snapshot, StoreError> {
        let conn = self.reader();
        let mut stmt = conn.prepare(
            "SELECT key, id, name, spiffe_id, parent, lead, depth, scopes, limit_picos,
                    promote_after, created_ms, expires_ms, key_hash, ended_ms, end_reason, trust
             FROM agents ORDER BY key",
        )?;
        let agents = stmt
            .query_map([], |row| {
                let scopes: String = row.get(7)?;
                Ok(AgentRow {
                    key: row.get::<_, i64>(0)? as AgentKey,
                    id: row.get(1)?,
                    name: row.get(2)?,
                    spiffe_id: row.get(3)?,
                    parent: row.get::<_, Option<i64>>(4)?.map(|p| p as AgentKey),
                    lead: row.get::<_, i64>(5)? as AgentKey,
                    depth: row.get(6)?,
                    scopes: serde_json::from_str(&scopes).unwrap_or_default(),
                    limit: Amount(row.get::<_, i64>(8)? as u64),
                    promote_after: row.get(9)?,
                    created_ms: row.get(10)?,
                    expires_ms: row.get(11)?,
                    key_hash: row.get(12)?,
                    ended_ms: row.get(13)?,
                    end_reason: row.get(14)?,
                    trust: row.get(15)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;

        let mut stmt = conn.prepare("SELECT agent, window, leased_picos FROM leases")?;
        let leases = stmt
            .query_map([], |row| {
                let key = (
                    row.get::<_, i64>(0)? as AgentKey,
                    row.get::<_, i64>(1)? as u64,
                );
                Ok((key, Amount(row.get::<_, i64>(2)? as u64)))
            })?
            .collect::<Result<HashMap<_, _>, _>>()?;
        Ok(Snapshot { agents, leases })
    }

    /// A lead as a previous run stored it.
    pub fn lead(&self, spiffe_id: &str) -> Result<Option<StoredLead>, StoreError> {
        let lead = self
            .reader()
            .query_row(
                "SELECT key, trust, key_hash, ended_ms, end_reason FROM agents
                 WHERE spiffe_id = ?1 AND parent IS NULL",
                [spiffe_id],
                |row| {
                    Ok(StoredLead {
                        key: row.get::<_, i64>(0)? as AgentKey,
                        trust: row.get(1)?,
                        key_hash: row.get(2)?,
                        ended_ms: row.get(3)?,
                        end_reason: row.get(4)?,
                    })
                },
            )
            .optional()?;
        Ok(lead)
    }

    /// Stores a new agent (or a lead seen for the first time) with its decision, if any,
    /// in one transaction; returns the decision's sequence number.
    pub fn insert_agent(
        &self,
        agent: &AgentRow,
        decision: Option<&DecisionRow>,
    ) -> Result<Option<i64>, StoreError> {
        let (agent, decision) = (agent.clone(), decision.cloned());
        self.writer.write(move |conn, tail| {
            insert_agent_row(conn, &agent)?;
            decision.map(|d| tail.append(conn, &d)).transpose()
        })
    }

    /// Marks agents ended and appends their decisions, in one transaction.
    pub fn end_agents(
        &self,
        ended: &[(AgentKey, i64, &str)],
        decisions: &[DecisionRow],
    ) -> Result<Vec<i64>, StoreError> {
        let ended: Vec<_> = ended
            .iter()
            .map(|&(key, at_ms, reason)| (key, at_ms, reason.to_owned()))
            .collect();
        let decisions = decisions.to_vec();
        self.writer.write(move |conn, tail| {
            for (key, at_ms, reason) in &ended {
                conn.execute(
                    "UPDATE agents SET ended_ms = ?2, end_reason = ?3 WHERE key = ?1",
                    params![*key as i64, at_ms, reason],
                )?;
            }
            decisions.iter().map(|d| tail.append(conn, d)).collect()
        })
    }

    /// Changes an agent's stored trust level with the decision that changed it.
    pub fn set_trust(
        &self,
        key: AgentKey,
        trust: &str,
        decision: &DecisionRow,
    ) -> Result<i64, StoreError> {
        let (trust, decision) = (trust.to_owned(), decision.clone());
        self.writer.write(move |conn, tail| {
            conn.execute(
                "UPDATE agents SET trust = ?2 WHERE key = ?1",
                params![key as i64, trust],
            )?;
            tail.append(conn, &decision)
        })
    }

    /// Changes agents' stored key hashes (hex) with the decisions that changed them.
    pub fn set_key_hashes(
        &self,
        keys: &[(AgentKey, String)],
        decisions: &[DecisionRow],
    ) -> Result<Vec<i64>, StoreError> {
        let (keys, decisions) = (keys.to_vec(), decisions.to_vec());
        self.writer.write(move |conn, tail| {
            for (key, key_hash) in &keys {
                conn.execute(
                    "UPDATE agents SET key_hash = ?2 WHERE key = ?1",
                    params![*key as i64, key_hash],
                )?;
            }
            decisions.iter().map(|d| tail.append(conn, d)).collect()
        })
    }

    /// Signs a checkpoint over the whole ledger if entries were added since the last
    /// one. Returns its size, if one was made.
    pub fn checkpoint(&self) -> Result<Option<u64>, StoreError> {
        self.writer.write(|conn, tail| {
            if tail.seq == tail.checkpointed {
                return Ok(None);
            }
            tail.checkpoint(conn, None)?;
            Ok(Some(tail.seq as u64))
        })
    }

    /// The newest signed checkpoint, read on the store's own reader connection.
    pub fn latest_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        latest_checkpoint(&self.reader())
    }

    /// Appends one decision record.
    pub fn record(&self, decision: &DecisionRow) -> Result<i64, StoreError> {
        let decision = decision.clone();
        self.writer
            .write(move |conn, tail| tail.append(conn, &decision))
    }

    /// Transactions and writes committed so far: their ratio is the group commit's
    /// effect.
    pub fn commit_stats(&self) -> &Stats {
        self.writer.stats()
    }
}

impl Tail {
    /// The tail after `entries` (the intact ledger, in order).
    fn of(entries: &[StoredEntry], signer: Signer, checkpointed: i64) -> Tail {
        let mut frontier = Frontier::default();
        for entry in entries {
            frontier.push(merkle::leaf_hash(entry.canonical.as_bytes()));
        }
        let (seq, hash) = entries
            .last()
            .map_or((0, GENESIS.to_owned()), |e| (e.seq as i64, e.hash.clone()));
        Tail {
            seq,
            hash,
            frontier,
            signer,
            checkpointed,
        }
    }

    /// Appends `decision` as the next entry, chained to the last one and signed, and
    /// signs a checkpoint every [`CHECKPOINT_EVERY`] entries.
    fn append(&mut self, conn: &Connection, decision: &DecisionRow) -> Result<i64, StoreError> {
        let seq = self.seq + 1;
        let entry = Entry {
            seq: seq as u64,
            time: decision.time.clone(),
            kind: decision.kind.to_owned(),
            actor: decision.actor.clone(),
            subject: decision.subject.clone(),
            details: decision.details.clone(),
            prev: std::mem::take(&mut self.hash),
        };
        let sealed = self.signer.seal(&entry);
        conn.execute(
            "INSERT INTO ledger (seq, entry, hash, signature, key_id, kind, subject)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                seq,
                sealed.canonical,
                sealed.hash,
                sealed.signature,
                sealed.key_id,
                decision.kind,
                decision.subject
            ],
        )?;

        self.seq = seq;
        self.hash = sealed.hash;
        self.frontier
            .push(merkle::leaf_hash(sealed.canonical.as_bytes()));
        if (seq as u64).is_multiple_of(CHECKPOINT_EVERY) {
            self.checkpoint(conn, None)?;
        }
        Ok(seq)
    }

    /// Signs and stores a checkpoint over the whole ledger, co-signed by `co_signer`
    /// (the key before a rotation).
    fn checkpoint(
        &mut self,
        conn: &Connection,
        co_signer: Option<&Signer>,
    ) -> Result<(), StoreError> {
        let root = self.frontier.root();
        let mut checkpoint = self.signer.sign_checkpoint(self.seq as u64, &root, now());
        if let Some(co_signer) = co_signer {
            co_signer.co_sign(&mut checkpoint);
        }
        // A rotation announced at a multiple of CHECKPOINT_EVERY replaces the old key's
        // checkpoint at that size with the co-signed one, in the same transaction.
        // Nothing else meets an existing size: checkpoints only grow, and a torn-tail
        // cut never reaches below the last one (see `refuse_damage`).
        conn.execute(
            "INSERT OR REPLACE INTO checkpoints (size, root, time, key_id, signature, co_key_id, co_signature)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                self.seq,
                checkpoint.root,
                checkpoint.time,
                checkpoint.key_id,
                checkpoint.signature,
                checkpoint.co_key_id,
                checkpoint.co_signature
            ],
        )?;
        self.checkpointed = self.seq;
        Ok(())
    }
}

/// Now, as entries and checkpoints write it: RFC 3339 with milliseconds.
fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

fn insert_agent_row(conn: &Connection, agent: &AgentRow) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO agents (key, id, name, spiffe_id, parent, lead, depth, scopes,
            limit_picos, promote_after, created_ms, expires_ms, key_hash, ended_ms, end_reason, trust)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
        params![
            agent.key as i64,
            agent.id,
            agent.name,
            agent.spiffe_id,
            agent.parent.map(|p| p as i64),
            agent.lead as i64,
            agent.depth,
            serde_json::to_string(&agent.scopes).unwrap_or_else(|_| "[]".into()),
            agent.limit.0 as i64,
            agent.promote_after,
            agent.created_ms,
            agent.expires_ms,
            agent.key_hash,
            agent.ended_ms,
            agent.end_reason,
            agent.trust,
        ],
    )?;
    Ok(())
}

/// How many entries, from the first, hash and chain correctly. Signatures are left to
/// `warden ledger verify`: a torn write breaks the hash or the chain.
fn intact_prefix(entries: &[StoredEntry]) -> usize {
    let mut prev = GENESIS.to_owned();
    for (index, entry) in entries.iter().enumerate() {
        let hash = hex::encode(Sha256::digest(entry.canonical.as_bytes()));
        let linked = serde_json::from_str::<Entry>(&entry.canonical)
            .is_ok_and(|e| e.prev == prev && e.seq == entry.seq && e.seq == index as u64 + 1);
        if hash != entry.hash || !linked {
            return index;
        }
        prev = hash;
    }
    entries.len()
}

/// Filters of a ledger query.
#[derive(Debug, Default)]
pub struct LedgerQuery<'a> {
    /// Entries about this SPIFFE ID.
    pub subject: Option<&'a str>,
    pub kind: Option<&'a str>,
    /// Entries at or after this time, and before this time: RFC 3339 with milliseconds
    /// in UTC, as entries write theirs, so that they compare as strings.
    pub since: Option<&'a str>,
    pub until: Option<&'a str>,
    /// Entries after this sequence number (for paging).
    pub after: u64,
    pub limit: usize,
}

/// Ledger entries matching `query`, in order.
pub fn query_ledger(
    conn: &Connection,
    query: &LedgerQuery<'_>,
) -> Result<Vec<StoredEntry>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT seq, entry, hash, signature, key_id FROM ledger
         WHERE seq > ?1 AND (?2 IS NULL OR subject = ?2) AND (?3 IS NULL OR kind = ?3)
           AND (?4 IS NULL OR json_extract(entry, '$.time') >= ?4)
           AND (?5 IS NULL OR json_extract(entry, '$.time') < ?5)
         ORDER BY seq LIMIT ?6",
    )?;
    let rows = stmt.query_map(
        params![
            query.after as i64,
            query.subject,
            query.kind,
            query.since,
            query.until,
            query.limit as i64
        ],
        stored_entry,
    )?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// A ledger row selected as `seq, entry, hash, signature, key_id`.
fn stored_entry(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredEntry> {
    Ok(StoredEntry {
        seq: row.get::<_, i64>(0)? as u64,
        canonical: row.get(1)?,
        hash: row.get(2)?,
        signature: row.get(3)?,
        key_id: row.get(4)?,
    })
}

/// The id of the key the entry after `entries` must be signed with: the one the last
/// entry announced if it is a key rotation, else the one that signed it; none for an
/// empty ledger.
fn next_key(entries: &[StoredEntry]) -> Option<String> {
    let last = entries.last()?;
    let announced = serde_json::from_str::<Entry>(&last.canonical)
        .ok()
        .filter(|entry| entry.kind == "key_rotation")
        .and_then(|entry| entry.details["new_key_id"].as_str().map(str::to_owned));
    Some(announced.unwrap_or_else(|| last.key_id.clone()))
}

/// Refuses a break in the chain at entry `first` (or, past an intact chain, its
/// missing next entry) that something outside the tail vouches for: a checkpoint (signed in the same transaction as the entries it covers)
/// or a sink's cursor (moved only after the entries committed). A crash cannot tear
/// what was committed, so such a break is damage, and cutting from there would delete
/// evidence that may already sit in a SIEM.
fn refuse_damage(conn: &Connection, first: u64, checkpointed: i64) -> Result<(), StoreError> {
    let delivered: i64 =
        conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM sink_cursors", [], |r| {
            r.get(0)
        })?;
    let vouched = checkpointed.max(delivered) as u64;
    if first <= vouched {
        return Err(StoreError::LedgerDamaged {
            seq: first,
            vouched,
        });
    }
    Ok(())
}

/// Every ledger entry in order, for verification and export.
pub fn read_ledger(conn: &Connection) -> Result<Vec<StoredEntry>, StoreError> {
    let mut stmt =
        conn.prepare("SELECT seq, entry, hash, signature, key_id FROM ledger ORDER BY seq")?;
    let entries = stmt
        .query_map([], stored_entry)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(entries)
}

/// A checkpoint is signed every this many entries (and on a timer in between).
pub const CHECKPOINT_EVERY: u64 = 64;

const CHECKPOINT_COLUMNS: &str = "size, root, time, key_id, signature, co_key_id, co_signature";

fn checkpoint_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Checkpoint> {
    Ok(Checkpoint {
        size: row.get::<_, i64>(0)? as u64,
        root: row.get(1)?,
        time: row.get(2)?,
        key_id: row.get(3)?,
        signature: row.get(4)?,
        co_key_id: row.get(5)?,
        co_signature: row.get(6)?,
    })
}

/// The newest checkpoint, if one was signed.
pub fn latest_checkpoint(conn: &Connection) -> Result<Option<Checkpoint>, StoreError> {
    let sql = format!("SELECT {CHECKPOINT_COLUMNS} FROM checkpoints ORDER BY size DESC LIMIT 1");
    Ok(conn.query_row(&sql, [], checkpoint_row).optional()?)
}

/// Every checkpoint, smallest first.
pub fn read_checkpoints(conn: &Connection) -> Result<Vec<Checkpoint>, StoreError> {
    let sql = format!("SELECT {CHECKPOINT_COLUMNS} FROM checkpoints ORDER BY size");
    let mut stmt = conn.prepare(&sql)?;
    let checkpoints = stmt
        .query_map([], checkpoint_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(checkpoints)
}

impl LeaseStore for ControlStore {
    fn persist(&self, agent: AgentKey, window: u64, ceiling: Amount) -> Result<(), String> {
        self.writer
            .write(move |conn, _| {
                conn.execute(
                    "INSERT INTO leases (agent, window, leased_picos) VALUES (?1, ?2, ?3)
                     ON CONFLICT (agent, window) DO UPDATE SET leased_picos = max(leased_picos, excluded.leased_picos)",
                    params![agent as i64, window as i64, ceiling.0 as i64],
                )?;
                Ok(())
            })
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger;

    fn decision(n: u64) -> DecisionRow {
        DecisionRow {
            time: "2026-12-03T00:00:00.000Z".into(),
            kind: "spawn",
            actor: "operator".into(),
            subject: format!("spiffe://t/agent/a/{n}"),
            details: serde_json::json!({ "n": n }),
        }
    }

    /// A tail broken by a crash mid-write is cut on the next start, the cut recorded,
    /// and the ledger verifies again.
    #[test]
    fn a_torn_tail_is_cut_and_recorded() {
        let dir = std::env::temp_dir().join(format!("warden-torn-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).unwrap();
        let control = ControlStore::open(&store, &dir).unwrap();
        for n in 1..=5 {
            control.record(&decision(n)).unwrap();
        }
        drop(control);

        // Half of entry 4 never reached the disk.
        let conn = store.connection().unwrap();
        conn.execute(
            "UPDATE ledger SET entry = substr(entry, 1, 40) WHERE seq = 4",
            [],
        )
        .unwrap();

        let control = ControlStore::open(&store, &dir).unwrap();
        let entries = read_ledger(&control.reader()).unwrap();
        assert_eq!(
            entries.len(),
            4,
            "entries 4 and 5 cut, a recovery entry added"
        );
        let recovery: Entry = serde_json::from_str(&entries[3].canonical).unwrap();
        assert_eq!(recovery.kind, "recovery");
        assert_eq!(
            recovery.details,
            serde_json::json!({"cut_from": 4, "cut_to": 5})
        );
        let key = ledger::read_public_key(&dir.join("ledger-public.key")).unwrap();
        assert!(ledger::verify(&entries, &[key]).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A break below the last checkpoint, or below a sink's cursor, is damage, not a
    /// torn tail: the store refuses to open and deletes nothing.
    #[test]
    fn damage_under_a_checkpoint_or_a_cursor_is_refused_not_cut() {
        let dir = scratch("damaged");
        let store = Store::open(&dir).unwrap();
        let control = ControlStore::open(&store, &dir).unwrap();
        for n in 1..=5 {
            control.record(&decision(n)).unwrap();
        }
        control.checkpoint().unwrap();
        control.record(&decision(6)).unwrap();
        drop(control);
        let conn = store.connection().unwrap();
        let damage = |seq: i64| {
            conn.execute(
                "UPDATE ledger SET entry = replace(entry, '\"n\"', '\"m\"') WHERE seq = ?1",
                [seq],
            )
            .unwrap();
        };

        damage(2);
        let refused = ControlStore::open(&store, &dir).err();
        assert!(
            matches!(
                refused,
                Some(StoreError::LedgerDamaged { seq: 2, vouched: 5 })
            ),
            "{refused:?}"
        );
        assert_eq!(read_ledger(&conn).unwrap().len(), 6, "nothing cut");

        // Past the checkpoint but delivered to a sink: refused too.
        conn.execute(
            "UPDATE ledger SET entry = replace(entry, '\"m\"', '\"n\"')",
            [],
        )
        .unwrap();
        damage(6);
        conn.execute(
            "INSERT INTO sink_cursors (sink, seq) VALUES ('siem', 6)",
            [],
        )
        .unwrap();
        let refused = ControlStore::open(&store, &dir).err();
        assert!(
            matches!(
                refused,
                Some(StoreError::LedgerDamaged { seq: 6, vouched: 6 })
            ),
            "{refused:?}"
        );
        assert_eq!(read_ledger(&conn).unwrap().len(), 6, "nothing cut");

        // Cut off cleanly, the chain intact: the checkpoint still shows the gap.
        conn.execute("DELETE FROM sink_cursors", []).unwrap();
        conn.execute("DELETE FROM ledger WHERE seq > 3", [])
            .unwrap();
        let refused = ControlStore::open(&store, &dir).err();
        assert!(
            matches!(
                refused,
                Some(StoreError::LedgerDamaged { seq: 4, vouched: 5 })
            ),
            "{refused:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("warden-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// The ledger verifies with `first` (the first public key) alone.
    fn verifies_from(store: &Store, first: &ed25519_dalek::VerifyingKey) -> u64 {
        let entries = read_ledger(&store.connection().unwrap()).unwrap();
        let checkpoints = read_checkpoints(&store.connection().unwrap()).unwrap();
        let history = ledger::verify(&entries, std::slice::from_ref(first)).unwrap();
        ledger::verify_checkpoints(&entries, &checkpoints, &history).unwrap();
        entries.len() as u64
    }

    /// A rotation whose key files were not switched (the new key signing from memory,
    /// its file still staged) is finished by the next rotation, not lost to it: the
    /// ledger still verifies, and a restart finds the key in force.
    #[test]
    fn a_rotation_left_unswitched_is_finished_by_the_next() {
        let dir = scratch("rotate-retry");
        let store = Store::open(&dir).unwrap();
        let control = ControlStore::open(&store, &dir).unwrap();
        let first = ledger::read_public_key(&dir.join(ledger::PUBLIC_KEY_FILE)).unwrap();
        control.record(&decision(1)).unwrap();
        let old = control.signer();
        let (_, second) = control.rotate_key(&dir, "operator").unwrap();
        control.record(&decision(2)).unwrap();

        // As if the switch of files had failed: the new key back in the staged file,
        // the old one in force on disk.
        let (current, staged) = (
            dir.join(ledger::SIGNING_KEY_FILE),
            dir.join(ledger::STAGED_KEY_FILE),
        );
        std::fs::rename(&current, &staged).unwrap();
        let archived = dir.join(format!("ledger-signing.{}.key", old.key_id()));
        std::fs::copy(&archived, &current).unwrap();

        let (_, third) = control.rotate_key(&dir, "operator").unwrap();
        control.record(&decision(3)).unwrap();
        assert!(
            dir.join(format!("ledger-signing.{}.key", second.key_id()))
                .exists()
        );
        drop(control);

        let control = ControlStore::open(&store, &dir).unwrap();
        assert_eq!(control.signer().key_id(), third.key_id());
        control.record(&decision(4)).unwrap();
        assert_eq!(
            verifies_from(&store, &first),
            6,
            "4 decisions and 2 rotations"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A ledger whose key file is gone is refused at start: no key is created and the
    /// public key file is left as it was.
    #[test]
    fn a_missing_key_is_refused_not_replaced() {
        let dir = scratch("missing-key");
        let store = Store::open(&dir).unwrap();
        let control = ControlStore::open(&store, &dir).unwrap();
        control.record(&decision(1)).unwrap();
        drop(control);
        let public = std::fs::read_to_string(dir.join(ledger::PUBLIC_KEY_FILE)).unwrap();

        std::fs::remove_file(dir.join(ledger::SIGNING_KEY_FILE)).unwrap();
        let refused = ControlStore::open(&store, &dir)
            .err()
            .map(|e| e.to_string());
        assert!(
            refused.as_deref().is_some_and(|e| e.contains("missing")),
            "{refused:?}"
        );
        assert!(!dir.join(ledger::SIGNING_KEY_FILE).exists());
        assert_eq!(
            std::fs::read_to_string(dir.join(ledger::PUBLIC_KEY_FILE)).unwrap(),
            public
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
