//! The evidence ledger: every decision as an append-only entry, hash-chained and
//! signed, verifiable offline with nothing but the public key.
//!
//! An entry is one JSON object in its RFC 8785 canonical encoding:
//!
//! ```text
//! {"actor":..,"details":{..},"kind":..,"prev":"<hex SHA-256 of the previous entry>",
//!  "seq":N,"subject":..,"time":"<RFC 3339>"}
//! ```
//!
//! Its hash is the SHA-256 of those bytes, and its signature an Ed25519 signature over
//! the same bytes. Every so often a signed checkpoint records the size of the ledger
//! and the RFC 6962 Merkle tree hash of its entries so far ([`merkle`]), so that an
//! inclusion proof can show one entry is in the ledger, and a ledger cut short after a
//! checkpoint is caught. Changing a byte breaks the hash and the signature; deleting or
//! reordering entries breaks the sequence and the `prev` chain; a forged entry fails
//! the signature, and so does one a retired key signed after its rotation. The
//! signing key is created on first start, kept with mode 0600 next to the database,
//! and its public key written beside it and served over HTTP.
//!
//! Limitation: a tail cut off together with the checkpoints over it leaves a ledger
//! that verifies by itself. Only a copy kept elsewhere shows the cut: a checkpoint an
//! auditor kept ([`verify_witness`]) or the events a SIEM sink received.

pub mod merkle;

use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// The `prev` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

pub(crate) const SIGNING_KEY_FILE: &str = "ledger-signing.key";
pub(crate) const PUBLIC_KEY_FILE: &str = "ledger-public.key";
/// A rotation's new key before the ledger has recorded the rotation.
pub(crate) const STAGED_KEY_FILE: &str = "ledger-signing.next.key";

/// Why the ledger key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a hex Ed25519 key of 32 bytes")]
    Malformed { path: PathBuf },
    #[error(
        "{path} holds key {found}, but the ledger's entries are now signed by key {expected}: \
         restore that key's file (entries signed by any other key would not verify)"
    )]
    NotTheLedgersKey {
        path: PathBuf,
        found: String,
        expected: String,
    },
}

/// The ledger's signing key.
#[derive(Clone)]
pub struct Signer {
    key: SigningKey,
}

impl Signer {
    /// Loads the signing key of a ledger whose next entry must be signed by the key
    /// `expected`, settling a rotation a crash interrupted first. An empty ledger
    /// (`expected` none) gets a key created if there is none. Otherwise the key must be
    /// the expected one, and nothing is written until it is: any other key would sign
    /// entries nobody can verify.
    pub fn load_for(data_dir: &Path, expected: Option<&str>) -> Result<Signer, KeyError> {
        let Some(expected) = expected else {
            return Signer::load_or_create(data_dir);
        };
        Signer::resume_rotation(data_dir, expected)?;

        let path = data_dir.join(SIGNING_KEY_FILE);
        let signer = read_key(&path)?;
        let found = signer.as_ref().map(Signer::key_id);
        match signer {
            Some(signer) if signer.key_id() == expected => {
                write_public(data_dir, PUBLIC_KEY_FILE, &signer)?;
                Ok(signer)
            }
            _ => Err(KeyError::NotTheLedgersKey {
                path,
                found: found.unwrap_or_else(|| "none (the file is missing)".into()),
                expected: expected.to_owned(),
            }),
        }
    }

    /// Loads the signing key from `data_dir`, creating it (mode 0600) and writing the
    /// public key beside it if there is none.
    pub fn load_or_create(data_dir: &Path) -> Result<Signer, KeyError> {
        let path = data_dir.join(SIGNING_KEY_FILE);
        let signer = match read_key(&path)? {
            Some(signer) => signer,
            None => {
                let key = create_key(&path).map_err(|source| KeyError::Io {
                    path: path.clone(),
                    source,
                })?;
                sync_dir(data_dir)?;
                Signer {
                    key: SigningKey::from_bytes(&key),
                }
            }
        };
        write_public(data_dir, PUBLIC_KEY_FILE, &signer)?;
        Ok(signer)
    }

    /// The key a rotation staged, if one is staged.
    pub fn staged(data_dir: &Path) -> Result<Option<Signer>, KeyError> {
        read_key(&data_dir.join(STAGED_KEY_FILE))
    }

    /// A new key for a rotation, written to `ledger-signing.next.key` (mode 0600,
    /// synced) but not in force: it replaces the current key only once the ledger has
    /// recorded the rotation (see [`Signer::promote_staged`]).
    pub fn stage(data_dir: &Path) -> Result<Signer, KeyError> {
        let path = data_dir.join(STAGED_KEY_FILE);
        let io = |source| KeyError::Io {
            path: path.clone(),
            source,
        };
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
        let key = create_key(&path).map_err(io)?;
        sync_dir(data_dir)?;
        Ok(Signer {
            key: SigningKey::from_bytes(&key),
        })
    }

    /// Puts the staged key in force: the current key (if still there) is kept as
    /// `ledger-signing.<key id>.key` with its public key as `ledger-public.<key id>.key`,
    /// the staged key takes its place and `ledger-public.key` follows. Each step can run
    /// again, so the next start finishes what a crash interrupted.
    pub fn promote_staged(data_dir: &Path) -> Result<Signer, KeyError> {
        let current = data_dir.join(SIGNING_KEY_FILE);
        let staged = data_dir.join(STAGED_KEY_FILE);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| KeyError::Io { path, source }
        };

        if let Some(old) = read_key(&current)? {
            let id = old.key_id();
            let archived = data_dir.join(format!("ledger-signing.{id}.key"));
            std::fs::rename(&current, &archived).map_err(io(&current))?;
            write_public(data_dir, &format!("ledger-public.{id}.key"), &old)?;
        }
        let signer = read_key(&staged)?.ok_or_else(|| KeyError::Io {
            path: staged.clone(),
            source: std::io::ErrorKind::NotFound.into(),
        })?;
        std::fs::rename(&staged, &current).map_err(io(&staged))?;
        write_public(data_dir, PUBLIC_KEY_FILE, &signer)?;
        sync_dir(data_dir)?;
        Ok(signer)
    }

    /// Settles a rotation a crash left staged, before the key is loaded: the staged key
    /// is put in force if the ledger announced it (`announced`: the key the ledger
    /// expects next), and discarded otherwise.
    fn resume_rotation(data_dir: &Path, announced: &str) -> Result<(), KeyError> {
        let staged = data_dir.join(STAGED_KEY_FILE);
        let Some(key) = read_key(&staged)? else {
            return Ok(());
        };
        if key.key_id() == announced {
            tracing::warn!(ledger.key_id = %key.key_id(), "finishing a ledger key rotation the ledger recorded");
            Signer::promote_staged(data_dir)?;
            return Ok(());
        }
        tracing::warn!(ledger.key_id = %key.key_id(), "discarding a staged ledger key the ledger never announced");
        std::fs::remove_file(&staged).map_err(|source| KeyError::Io {
            path: staged,
            source,
        })
    }

    /// Adds this key's signature to a checkpoint another key signed (key rotation:
    /// the first checkpoint after it is signed by both keys).
    pub fn co_sign(&self, checkpoint: &mut Checkpoint) {
        let message = checkpoint_message(checkpoint.size, &checkpoint.root, &checkpoint.time);
        checkpoint.co_key_id = Some(self.key_id());
        checkpoint.co_signature = Some(hex::encode(self.key.sign(message.as_bytes()).to_bytes()));
    }

    pub fn public_key_hex(&self) -> String {
        hex::encode(self.key.verifying_key().as_bytes())
    }

    /// A short id of the public key: the first 8 bytes of its SHA-256, in hex.
    pub fn key_id(&self) -> String {
        key_id(&self.key.verifying_key())
    }

    /// Signs a checkpoint stating that the first `size` entries have Merkle root `root`.
    pub fn sign_checkpoint(&self, size: u64, root: &merkle::Hash, time: String) -> Checkpoint {
        let root = hex::encode(root);
        let message = checkpoint_message(size, &root, &time);
        Checkpoint {
            size,
            root,
            time,
            key_id: self.key_id(),
            signature: hex::encode(self.key.sign(message.as_bytes()).to_bytes()),
            co_key_id: None,
            co_signature: None,
        }
    }

    /// Seals `entry` (whose `seq` and `prev` are set) into its stored form.
    pub fn seal(&self, entry: &Entry) -> Sealed {
        let canonical = canonical(entry);
        let hash = hex::encode(Sha256::digest(canonical.as_bytes()));
        let signature = hex::encode(self.key.sign(canonical.as_bytes()).to_bytes());
        Sealed {
            canonical,
            hash,
            signature,
            key_id: self.key_id(),
        }
    }
}

fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

fn parse_key(text: &str) -> Option<[u8; 32]> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut key).ok()?;
    Some(key)
}

/// Writes `signer`'s public key to `name` in `dir`, synced.
fn write_public(dir: &Path, name: &str, signer: &Signer) -> Result<(), KeyError> {
    let path = dir.join(name);
    let io = |source| KeyError::Io {
        path: path.clone(),
        source,
    };
    let mut file = std::fs::File::create(&path).map_err(io)?;
    file.write_all(format!("{}\n", signer.public_key_hex()).as_bytes())
        .map_err(io)?;
    file.sync_all().map_err(io)
}

/// Makes renames and new files in `dir` survive a power cut.
fn sync_dir(dir: &Path) -> Result<(), KeyError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| KeyError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

/// The key in `path`, if the file exists.
fn read_key(path: &Path) -> Result<Option<Signer>, KeyError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let key = parse_key(&text).ok_or_else(|| KeyError::Malformed {
                path: path.to_path_buf(),
            })?;
            Ok(Some(Signer {
                key: SigningKey::from_bytes(&key),
            }))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(KeyError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn create_key(path: &Path) -> std::io::Result<[u8; 32]> {
    use std::os::unix::fs::OpenOptionsExt;

    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(format!("{}\n", hex::encode(key)).as_bytes())?;
    file.sync_all()?;
    Ok(key)
}

/// One ledger entry before it is sealed.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Entry {
    pub seq: u64,
    /// RFC 3339, milliseconds, UTC.
    pub time: String,
    pub kind: String,
    pub actor: String,
    pub subject: String,
    pub details: serde_json::Value,
    /// The hash of the previous entry, [`GENESIS`] for the first.
    pub prev: String,
}

/// An entry as stored: its canonical bytes, hash and signature.
#[derive(Debug, Clone)]
pub struct Sealed {
    pub canonical: String,
    pub hash: String,
    pub signature: String,
    pub key_id: String,
}

/// The RFC 8785 canonical encoding of an entry.
pub fn canonical(entry: &Entry) -> String {
    serde_json_canonicalizer::to_string(entry).expect("an entry of JSON values always serializes")
}

/// A stored entry, as `verify` reads it.
#[derive(Debug, Clone)]
pub struct StoredEntry {
    pub seq: u64,
    pub canonical: String,
    pub hash: String,
    pub signature: String,
    pub key_id: String,
}

/// The first thing wrong with a ledger.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("entry {seq}: {why}")]
pub struct Broken {
    /// The sequence number of the first bad entry (the stored one, or the expected
    /// one when an entry is missing).
    pub seq: u64,
    pub why: String,
}

/// The keys a ledger was signed with, in the order they were in force.
#[derive(Debug, Clone, Default)]
pub struct KeyHistory {
    /// Each key with the first entry it signs.
    spans: Vec<(u64, VerifyingKey)>,
}

impl KeyHistory {
    /// The key that signs entry `seq` (for a `seq` past the ledger, the last key).
    fn signing(&self, seq: u64) -> Option<&VerifyingKey> {
        self.spans
            .iter()
            .rev()
            .find(|(from, _)| *from <= seq)
            .map(|(_, key)| key)
    }

    /// The id of the first key, which the verifier had to be given: auditors can pin it.
    pub fn first_key_id(&self) -> Option<String> {
        self.spans.first().map(|(_, key)| key_id(key))
    }

    /// The key in force once the first `size` entries are written: the one a
    /// checkpoint over them is signed with.
    fn after(&self, size: u64) -> Option<&VerifyingKey> {
        self.signing(size.saturating_add(1))
    }
}

/// Checks every entry in order: sequence, encoding, chain, hash and signature, and
/// that each is signed by the key in force at its place. The first entry's key must
/// be one of `anchors`; each later key is the one a `key_rotation` entry, signed by
/// the key before it, announced, and is in force from the entry after that one, so a
/// retired key signs nothing after its rotation. Returns the keys in the order they
/// were in force.
pub fn verify(entries: &[StoredEntry], anchors: &[VerifyingKey]) -> Result<KeyHistory, Broken> {
    let mut history = KeyHistory::default();
    let mut prev = GENESIS.to_owned();
    for (index, stored) in entries.iter().enumerate() {
        let expected = index as u64 + 1;
        let broken = |why: String| Broken {
            seq: stored.seq,
            why,
        };
        if stored.seq != expected {
            return Err(Broken {
                seq: expected,
                why: format!(
                    "missing or out of order: found entry {} instead",
                    stored.seq
                ),
            });
        }

        let entry = check_encoding(stored, &prev).map_err(broken)?;
        let key = match history.signing(stored.seq) {
            Some(key) => key,
            None => {
                let first = find_key(anchors, &stored.key_id).ok_or_else(|| {
                    broken(format!(
                        "signed by unknown key {}: not one of the public keys given \
                         (the ledger's first key is needed)",
                        stored.key_id
                    ))
                })?;
                history.spans.push((1, *first));
                first
            }
        };
        check_signed_by(
            key,
            &stored.key_id,
            &stored.signature,
            stored.canonical.as_bytes(),
        )
        .map_err(broken)?;
        if entry.kind == "key_rotation" {
            let new = introduced_key(&entry)
                .ok_or_else(|| broken("a key rotation without a valid new public key".into()))?;
            history.spans.push((stored.seq + 1, new));
        }
        prev = stored.hash.clone();
    }
    Ok(history)
}

/// Checks that `stored` is an entry in canonical encoding, at its place, chained to
/// the entry before (whose hash is `prev`) and hashed right.
fn check_encoding(stored: &StoredEntry, prev: &str) -> Result<Entry, String> {
    let entry: Entry =
        serde_json::from_str(&stored.canonical).map_err(|e| format!("not a ledger entry: {e}"))?;
    if canonical(&entry) != stored.canonical {
        return Err("not in canonical (RFC 8785) encoding".into());
    }
    if entry.seq != stored.seq {
        return Err(format!("claims sequence number {}", entry.seq));
    }
    if entry.prev != prev {
        return Err("does not chain to the previous entry".into());
    }
    if hex::encode(Sha256::digest(stored.canonical.as_bytes())) != stored.hash {
        return Err("its hash does not match its content".into());
    }
    Ok(entry)
}

/// A signed statement of the ledger's size and Merkle root at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Checkpoint {
    pub size: u64,
    /// Hex RFC 6962 Merkle tree hash of entries 1..=size.
    pub root: String,
    pub time: String,
    pub key_id: String,
    pub signature: String,
    /// The previous key's signature on the first checkpoint after a key rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub co_key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub co_signature: Option<String>,
}

/// What a checkpoint's signature covers.
fn checkpoint_message(size: u64, root: &str, time: &str) -> String {
    let message = serde_json::json!({ "root": root, "size": size, "time": time });
    serde_json_canonicalizer::to_string(&message).expect("a checkpoint message always serializes")
}

/// Checks a checkpoint's signatures: the first by `after`, the key in force at its
/// size, and, when a rotation put that key in force since the previous checkpoint,
/// a second by `before`, the key in force at the previous checkpoint. A checkpoint
/// without a rotation carries one signature.
fn check_checkpoint_signatures(
    checkpoint: &Checkpoint,
    before: &VerifyingKey,
    after: &VerifyingKey,
) -> Result<(), String> {
    let message = checkpoint_message(checkpoint.size, &checkpoint.root, &checkpoint.time);
    let size = checkpoint.size;
    check_signed_by(
        after,
        &checkpoint.key_id,
        &checkpoint.signature,
        message.as_bytes(),
    )
    .map_err(|why| format!("checkpoint at {size}: {why}"))?;

    let rotated = before != after;
    match (&checkpoint.co_key_id, &checkpoint.co_signature) {
        (None, None) if !rotated => Ok(()),
        (None, None) => Err(format!(
            "checkpoint at {size}: the first after a key rotation must also be signed by the key before it"
        )),
        (Some(_), Some(_)) if !rotated => Err(format!(
            "checkpoint at {size}: a second signature, but no key rotation since the previous checkpoint"
        )),
        (Some(id), Some(signature)) => check_signed_by(before, id, signature, message.as_bytes())
            .map_err(|why| format!("checkpoint at {size}, second signature: {why}")),
        _ => Err(format!("checkpoint at {size}: half a second signature")),
    }
}

/// The key among `keys` with id `id`.
fn find_key<'k>(keys: &'k [VerifyingKey], id: &str) -> Option<&'k VerifyingKey> {
    keys.iter().find(|k| key_id(k) == id)
}

/// Checks that `signature` (hex) over `message` is by `key`, whose id the signer
/// claimed as `claimed`.
fn check_signed_by(
    key: &VerifyingKey,
    claimed: &str,
    signature: &str,
    message: &[u8],
) -> Result<(), String> {
    let expected = key_id(key);
    if claimed != expected {
        return Err(format!(
            "signed by key {claimed}, but key {expected} is in force here"
        ));
    }
    let mut bytes = [0u8; 64];
    hex::decode_to_slice(signature, &mut bytes).map_err(|_| "malformed signature".to_owned())?;
    key.verify_strict(message, &Signature::from_bytes(&bytes))
        .map_err(|_| "signature does not verify".to_owned())
}

/// The new key a `key_rotation` entry introduces.
fn introduced_key(entry: &Entry) -> Option<VerifyingKey> {
    let bytes = parse_key(entry.details["new_public_key"].as_str()?)?;
    VerifyingKey::from_bytes(&bytes).ok()
}

/// Checks every checkpoint against the (already verified) entries, in order of size:
/// each must be signed by the key in force at its size (and co-signed across a
/// rotation, see [`check_checkpoint_signatures`]), no larger than the ledger, and
/// cover exactly its entries' Merkle root.
pub fn verify_checkpoints(
    entries: &[StoredEntry],
    checkpoints: &[Checkpoint],
    keys: &KeyHistory,
) -> Result<(), Broken> {
    let leaves = leaves(entries);
    let mut previous = 0;
    for checkpoint in checkpoints {
        let broken = |why: String| Broken {
            seq: checkpoint.size,
            why,
        };
        if checkpoint.size == 0 || checkpoint.size <= previous {
            return Err(broken(format!(
                "checkpoint at {} follows the one at {previous}: checkpoints grow",
                checkpoint.size
            )));
        }
        let (Some(before), Some(after)) = (keys.after(previous), keys.after(checkpoint.size))
        else {
            return Err(broken("a checkpoint over a ledger with no entries".into()));
        };
        // A cut is named as one, before its keys (which the cut may have taken along).
        check_covered(&leaves, checkpoint, "checkpoint")?;
        check_checkpoint_signatures(checkpoint, before, after).map_err(broken)?;
        check_root(&leaves, checkpoint, "checkpoint")?;
        previous = checkpoint.size;
    }
    Ok(())
}

/// Checks the ledger against a checkpoint kept outside it (from
/// `GET /v1/ledger/checkpoint`): signed by the key in force at its size, and the
/// ledger still holds every entry it covers, unchanged. This catches what the ledger
/// cannot show by itself: its tail cut off together with the checkpoints over it.
pub fn verify_witness(
    entries: &[StoredEntry],
    witness: &Checkpoint,
    keys: &KeyHistory,
) -> Result<(), Broken> {
    let leaves = leaves(entries);
    check_covered(&leaves, witness, "witnessed checkpoint")?;

    let size = witness.size;
    let key = keys.after(size).ok_or_else(|| Broken {
        seq: 1,
        why: format!("missing: the witnessed checkpoint at {size} covers it"),
    })?;
    let message = checkpoint_message(size, &witness.root, &witness.time);
    check_signed_by(key, &witness.key_id, &witness.signature, message.as_bytes()).map_err(
        |why| Broken {
            seq: size,
            why: format!("witnessed checkpoint at {size}: {why}"),
        },
    )?;
    check_root(&leaves, witness, "witnessed checkpoint")
}

/// The Merkle leaf hashes of `entries`.
fn leaves(entries: &[StoredEntry]) -> Vec<merkle::Hash> {
    entries
        .iter()
        .map(|e| merkle::leaf_hash(e.canonical.as_bytes()))
        .collect()
}

/// Checks that the ledger (as `leaves`) holds every entry `checkpoint` covers.
fn check_covered(
    leaves: &[merkle::Hash],
    checkpoint: &Checkpoint,
    what: &str,
) -> Result<(), Broken> {
    if checkpoint.size > leaves.len() as u64 {
        return Err(Broken {
            seq: leaves.len() as u64 + 1,
            why: format!(
                "missing: the {what} at {} covers it (the ledger was cut short)",
                checkpoint.size
            ),
        });
    }
    Ok(())
}

/// Checks that the entries `checkpoint` covers (which [`check_covered`] found in
/// `leaves`) have its Merkle root.
fn check_root(leaves: &[merkle::Hash], checkpoint: &Checkpoint, what: &str) -> Result<(), Broken> {
    let size = checkpoint.size;
    let covered = &leaves[..size as usize];
    if hex::encode(merkle::root(covered)) != checkpoint.root {
        return Err(Broken {
            seq: size,
            why: format!("entries up to here do not match the {what}'s Merkle root"),
        });
    }
    Ok(())
}

/// A proof that one entry is in the ledger a checkpoint covers.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct InclusionProof {
    pub seq: u64,
    /// The entry's canonical bytes.
    pub entry: String,
    pub checkpoint: Checkpoint,
    /// Hex sibling hashes, leaf to root.
    pub path: Vec<String>,
}

/// The inclusion proof of entry `seq` under `checkpoint` (which must cover it).
pub fn prove(entries: &[StoredEntry], checkpoint: &Checkpoint, seq: u64) -> Option<InclusionProof> {
    let size = checkpoint.size as usize;
    if seq == 0 || seq > checkpoint.size || size > entries.len() {
        return None;
    }
    let leaves = leaves(&entries[..size]);
    let path = merkle::inclusion_path(seq as usize - 1, &leaves);
    Some(InclusionProof {
        seq,
        entry: entries[seq as usize - 1].canonical.clone(),
        checkpoint: checkpoint.clone(),
        path: path.iter().map(hex::encode).collect(),
    })
}

/// Checks an inclusion proof with only the public key(s): the checkpoint must be
/// signed by one of `keys` (a co-signature, which only links keys across a rotation,
/// adds nothing to what the proof shows), and the entry's path must lead to its root.
pub fn verify_proof(proof: &InclusionProof, keys: &[VerifyingKey]) -> Result<(), String> {
    let checkpoint = &proof.checkpoint;
    let key = find_key(keys, &checkpoint.key_id).ok_or_else(|| {
        format!(
            "checkpoint at {} signed by unknown key {}",
            checkpoint.size, checkpoint.key_id
        )
    })?;
    let message = checkpoint_message(checkpoint.size, &checkpoint.root, &checkpoint.time);
    check_signed_by(
        key,
        &checkpoint.key_id,
        &checkpoint.signature,
        message.as_bytes(),
    )
    .map_err(|why| format!("checkpoint at {}: {why}", checkpoint.size))?;
    let index = proof
        .seq
        .checked_sub(1)
        .ok_or_else(|| "entries are numbered from 1".to_owned())?;
    let decode = |text: &str| {
        let mut hash = [0u8; 32];
        hex::decode_to_slice(text, &mut hash)
            .map(|_| hash)
            .map_err(|_| format!("malformed hash {text}"))
    };
    let root = decode(&proof.checkpoint.root)?;
    let path = proof
        .path
        .iter()
        .map(|p| decode(p))
        .collect::<Result<Vec<_>, _>>()?;
    let leaf = merkle::leaf_hash(proof.entry.as_bytes());
    let included = merkle::verify_inclusion(&leaf, index, proof.checkpoint.size, &path, &root);
    if included {
        Ok(())
    } else {
        Err(format!(
            "entry {} is not in the ledger of checkpoint {}",
            proof.seq, proof.checkpoint.size
        ))
    }
}

/// One line of `warden ledger export`: an entry as stored, with its content as JSON.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ExportLine {
    pub seq: u64,
    pub entry: serde_json::Value,
    pub hash: String,
    pub signature: String,
    pub key_id: String,
}

impl ExportLine {
    pub fn of(stored: &StoredEntry) -> ExportLine {
        ExportLine {
            seq: stored.seq,
            entry: serde_json::from_str(&stored.canonical).unwrap_or(serde_json::Value::Null),
            hash: stored.hash.clone(),
            signature: stored.signature.clone(),
            key_id: stored.key_id.clone(),
        }
    }

    /// Back to the stored form: the entry re-encoded canonically, which is exactly
    /// what was signed if the export is intact.
    pub fn stored(&self) -> StoredEntry {
        StoredEntry {
            seq: self.seq,
            canonical: serde_json_canonicalizer::to_string(&self.entry).unwrap_or_default(),
            hash: self.hash.clone(),
            signature: self.signature.clone(),
            key_id: self.key_id.clone(),
        }
    }
}

/// One line of a JSON-lines export: an entry, or a checkpoint, which follows the last
/// entry it covers so a reader meets it once it can check it.
#[derive(Debug, Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum ExportItem {
    Checkpoint { checkpoint: Checkpoint },
    Entry(ExportLine),
}

/// The ledger as export lines: entries in order, each checkpoint after its last entry.
pub fn export(entries: &[StoredEntry], checkpoints: &[Checkpoint]) -> Vec<ExportItem> {
    let mut checkpoints = checkpoints.iter().peekable();
    let mut items = Vec::with_capacity(entries.len() + checkpoints.len());
    for entry in entries {
        items.push(ExportItem::Entry(ExportLine::of(entry)));
        while let Some(checkpoint) = checkpoints.next_if(|c| c.size <= entry.seq) {
            items.push(ExportItem::Checkpoint {
                checkpoint: checkpoint.clone(),
            });
        }
    }
    // Checkpoints past the last entry (a cut ledger) stay in, for verify to report.
    items.extend(checkpoints.map(|c| ExportItem::Checkpoint {
        checkpoint: c.clone(),
    }));
    items
}

/// Reads a JSON-lines export back into entries and checkpoints; an unreadable line is
/// named by its number.
pub fn read_export(text: &str) -> Result<(Vec<StoredEntry>, Vec<Checkpoint>), String> {
    let (mut entries, mut checkpoints) = (Vec::new(), Vec::new());
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(ExportItem::Entry(line)) => entries.push(line.stored()),
            Ok(ExportItem::Checkpoint { checkpoint }) => checkpoints.push(checkpoint),
            Err(e) => {
                return Err(format!(
                    "line {} is neither a ledger entry nor a checkpoint: {e}",
                    index + 1
                ));
            }
        }
    }
    Ok((entries, checkpoints))
}

/// An agent's chain of custody: each ancestor's spawn (the lead's grant first), then
/// the agent's own spawn and every entry about it since, all in ledger order.
///
/// A SPIFFE ID names a role, which a later agent may take over once the earlier one
/// ended, so the chain follows the ID's latest incarnation: from its latest `spawn`,
/// and each ancestor as it was when the descendant was spawned. (A replacement is
/// spawned too; its `replacement` entry, which names the agent it replaced, follows.)
/// A lead, which policy defines rather than a spawn, has every entry about it.
pub fn custody(entries: &[StoredEntry], spiffe_id: &str) -> Vec<Entry> {
    let parsed: Vec<Entry> = entries
        .iter()
        .filter_map(|e| serde_json::from_str(&e.canonical).ok())
        .collect();
    let about = |seq: u64| {
        parsed
            .iter()
            .filter(move |e| e.subject == spiffe_id && e.seq >= seq)
            .cloned()
    };
    let Some(start) = spawn_of(&parsed, spiffe_id, u64::MAX) else {
        return about(0).collect();
    };

    let mut ancestors = Vec::new();
    let mut at = start;
    while let Some(next) = at.details["parent"]
        .as_str()
        .and_then(|parent| spawn_of(&parsed, parent, at.seq))
    {
        ancestors.push(next.clone());
        at = next;
    }
    ancestors.reverse();
    ancestors.extend(about(start.seq));
    ancestors
}

/// The spawn of the agent `id` as of entry `before`: its latest spawn before then.
fn spawn_of<'e>(parsed: &'e [Entry], id: &str, before: u64) -> Option<&'e Entry> {
    parsed
        .iter()
        .rev()
        .find(|e| e.seq < before && e.subject == id && e.kind == "spawn")
}

/// Reads a public key file (hex).
pub fn read_public_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bytes = parse_key(&text).ok_or_else(|| KeyError::Malformed {
        path: path.to_path_buf(),
    })?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::Malformed {
        path: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests;
