use serde_json::{Value, json};

use super::*;

fn signer(seed: u8) -> Signer {
    Signer {
        key: SigningKey::from_bytes(&[seed; 32]),
    }
}

/// A chain of `n` sealed entries.
fn chain(signer: &Signer, n: u64) -> Vec<StoredEntry> {
    let mut prev = GENESIS.to_owned();
    (1..=n)
        .map(|seq| {
            let entry = Entry {
                seq,
                time: "2026-12-03T00:00:00.000Z".into(),
                kind: "spawn".into(),
                actor: "spiffe://t/agent/x/lead".into(),
                subject: format!("spiffe://t/agent/x/child-{seq}"),
                details: serde_json::json!({"slice_usd": "50", "scopes": ["a.read"]}),
                prev: prev.clone(),
            };
            let sealed = signer.seal(&entry);
            prev = sealed.hash.clone();
            StoredEntry {
                seq,
                canonical: sealed.canonical,
                hash: sealed.hash,
                signature: sealed.signature,
                key_id: sealed.key_id,
            }
        })
        .collect()
}

/// A checkpoint by `signer` over the first `size` entries.
fn checkpoint(signer: &Signer, entries: &[StoredEntry], size: usize) -> Checkpoint {
    let leaves: Vec<_> = entries[..size]
        .iter()
        .map(|e| merkle::leaf_hash(e.canonical.as_bytes()))
        .collect();
    let time = "2026-12-03T00:00:01.000Z".into();
    signer.sign_checkpoint(size as u64, &merkle::root(&leaves), time)
}

/// How many entries `verify` passed.
fn verified(entries: &[StoredEntry], keys: &[VerifyingKey]) -> Result<usize, Broken> {
    verify(entries, keys).map(|_| entries.len())
}

fn public(signer: &Signer) -> Vec<VerifyingKey> {
    vec![signer.key.verifying_key()]
}

#[test]
fn an_untouched_ledger_verifies() {
    let signer = signer(7);
    assert_eq!(verified(&chain(&signer, 5), &public(&signer)), Ok(5));
}

#[test]
fn tampering_is_caught_at_the_first_bad_entry() {
    let signer = signer(7);
    let keys = public(&signer);
    let good = chain(&signer, 5);
    let first_bad = |entries: &[StoredEntry]| verify(entries, &keys).unwrap_err().seq;

    let mut byte = good.clone();
    byte[2].canonical = byte[2].canonical.replace("child-3", "child-9");
    assert_eq!(first_bad(&byte), 3, "one byte changed");

    let mut deleted = good.clone();
    deleted.remove(2);
    assert_eq!(first_bad(&deleted), 3, "an entry deleted");

    let mut reordered = good.clone();
    reordered.swap(1, 2);
    assert_eq!(first_bad(&reordered), 2, "two entries swapped");

    let mut swapped = good.clone();
    let signature = swapped[1].signature.clone();
    swapped[1].signature = swapped[2].signature.clone();
    swapped[2].signature = signature;
    let err = verify(&swapped, &keys).unwrap_err();
    assert_eq!(
        (err.seq, err.why.as_str()),
        (2, "signature does not verify")
    );

    let forger = self::signer(9);
    let mut forged = good.clone();
    let mut extra = chain(&forger, 6).pop().unwrap();
    let entry = Entry {
        prev: good[4].hash.clone(),
        ..serde_json::from_str(&extra.canonical).unwrap()
    };
    let sealed = forger.seal(&entry);
    extra.canonical = sealed.canonical;
    extra.hash = sealed.hash;
    extra.signature = sealed.signature;
    forged.push(extra);
    let err = verify(&forged, &keys).unwrap_err();
    assert_eq!(err.seq, 6);
    assert!(err.why.contains("in force"), "{}", err.why);

    let mut resigned = good.clone();
    resigned[3].key_id = good[3].key_id.clone();
    resigned[3].signature = forger
        .seal(&serde_json::from_str(&good[3].canonical).unwrap())
        .signature;
    assert_eq!(
        first_bad(&resigned),
        4,
        "a signature by another key under this key's id"
    );
}

#[test]
fn non_canonical_encoding_is_refused() {
    let signer = signer(7);
    let mut entries = chain(&signer, 1);
    entries[0].canonical = entries[0].canonical.replacen('{', "{ ", 1);
    let err = verify(&entries, &public(&signer)).unwrap_err();
    assert!(err.why.contains("canonical"), "{}", err.why);
}

/// RFC 8032, section 7.1, tests 1 and 2.
#[test]
fn ed25519_matches_rfc_8032() {
    let vectors = [
        (
            "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
            "",
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
        ),
        (
            "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
            "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
            "72",
            "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
        ),
    ];
    for (secret, public, message, signature) in vectors {
        let key = SigningKey::from_bytes(&parse_key(secret).unwrap());
        assert_eq!(hex::encode(key.verifying_key().as_bytes()), public);
        let message = hex::decode(message).unwrap();
        let signed = key.sign(&message);
        assert_eq!(hex::encode(signed.to_bytes()), signature);
        assert!(key.verifying_key().verify_strict(&message, &signed).is_ok());
    }
}

/// Every Ed25519 vector of Project Wycheproof (C2SP/wycheproof, Apache-2.0,
/// `testvectors/eddsa_test.json`) through the check `verify` uses: valid signatures
/// pass, and every invalid one (wrong length, S out of range, malleated, modified bits)
/// is refused.
#[test]
fn ed25519_verification_matches_wycheproof() {
    let text = include_str!("testdata/wycheproof_eddsa_test.json");
    let file: serde_json::Value = serde_json::from_str(text).unwrap();
    let mut checked = 0;
    for group in file["testGroups"].as_array().unwrap() {
        let public = hex::decode(group["key"]["pk"].as_str().unwrap()).unwrap();
        let key = VerifyingKey::from_bytes(&public.try_into().unwrap()).unwrap();
        for test in group["tests"].as_array().unwrap() {
            let message = hex::decode(test["msg"].as_str().unwrap()).unwrap();
            let signature = test["sig"].as_str().unwrap();
            let verdict = check_signed_by(&key, &key_id(&key), signature, &message);
            let expected = test["result"].as_str().unwrap();
            assert_eq!(
                verdict.is_ok(),
                expected == "valid",
                "tcId {} ({}): expected {expected}, got {verdict:?}",
                test["tcId"],
                test["comment"]
            );
            checked += 1;
        }
    }
    assert_eq!(checked, file["numberOfTests"].as_u64().unwrap());
}

/// RFC 8785, section 3.2.2: the canonical form of its example object.
#[test]
fn canonical_json_matches_rfc_8785() {
    let input = r#"{
        "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
        "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
        "literals": [null, true, false]
    }"#;
    let value: serde_json::Value = serde_json::from_str(input).unwrap();
    let expected = r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}"#;
    assert_eq!(
        serde_json_canonicalizer::to_string(&value).unwrap(),
        expected
    );
}

#[test]
fn the_signing_key_is_created_private_and_kept() {
    use std::os::unix::fs::PermissionsExt;

    let dir = std::env::temp_dir().join(format!("warden-ledger-key-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    let first = Signer::load_or_create(&dir).unwrap();
    let mode = std::fs::metadata(dir.join(SIGNING_KEY_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let again = Signer::load_or_create(&dir).unwrap();
    assert_eq!(first.public_key_hex(), again.public_key_hex());
    let exported = read_public_key(&dir.join(PUBLIC_KEY_FILE)).unwrap();
    assert_eq!(hex::encode(exported.as_bytes()), first.public_key_hex());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A rotation staged but never recorded is discarded on the next start; one recorded
/// is put in force, also when a crash stopped it halfway through switching files.
#[test]
fn a_staged_rotation_is_finished_only_if_the_ledger_announced_it() {
    let dir = std::env::temp_dir().join(format!("warden-ledger-stage-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let old = Signer::load_or_create(&dir).unwrap();
    let current = || Signer::load_or_create(&dir).unwrap().key_id();

    let unrecorded = Signer::stage(&dir).unwrap();
    Signer::resume_rotation(&dir, &old.key_id()).unwrap();
    assert_eq!(
        current(),
        old.key_id(),
        "never announced: the old key stays"
    );
    assert!(!dir.join(STAGED_KEY_FILE).exists());
    assert_ne!(unrecorded.key_id(), old.key_id());

    // Recorded, then a crash after the old key was archived, before the new one moved.
    let recorded = Signer::stage(&dir).unwrap();
    let archived = dir.join(format!("ledger-signing.{}.key", old.key_id()));
    std::fs::rename(dir.join(SIGNING_KEY_FILE), &archived).unwrap();
    Signer::resume_rotation(&dir, &recorded.key_id()).unwrap();
    assert_eq!(current(), recorded.key_id());
    assert!(archived.exists(), "the old key is kept");
    let public = read_public_key(&dir.join(PUBLIC_KEY_FILE)).unwrap();
    assert_eq!(hex::encode(public.as_bytes()), recorded.public_key_hex());

    // A key the ledger does not expect is refused rather than used.
    let expected = Some(recorded.key_id());
    assert!(Signer::load_for(&dir, expected.as_deref()).is_ok());
    let refused = Signer::load_for(&dir, Some(&old.key_id())).err();
    assert!(
        matches!(refused, Some(KeyError::NotTheLedgersKey { .. })),
        "{refused:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn checkpoints_catch_a_ledger_cut_short_and_prove_inclusion() {
    let signer = signer(7);
    let keys = public(&signer);
    let entries = chain(&signer, 10);
    let checkpoint = checkpoint(&signer, &entries, 8);
    let history = verify(&entries, &keys).unwrap();
    assert_eq!(
        verify_checkpoints(&entries, std::slice::from_ref(&checkpoint), &history),
        Ok(())
    );

    let cut = &entries[..6];
    assert_eq!(
        verified(cut, &keys),
        Ok(6),
        "the chain alone cannot see a cut tail"
    );
    let err = verify_checkpoints(cut, std::slice::from_ref(&checkpoint), &history).unwrap_err();
    assert_eq!(err.seq, 7);
    assert!(err.why.contains("cut short"), "{}", err.why);

    // The same checkpoint kept outside the ledger catches a cut that took it along.
    assert_eq!(verify_witness(&entries, &checkpoint, &history), Ok(()));
    let err = verify_witness(cut, &checkpoint, &history).unwrap_err();
    assert_eq!(err.seq, 7);
    let mut forged = checkpoint.clone();
    forged.size = 6;
    assert!(
        verify_witness(cut, &forged, &history).is_err(),
        "a witness altered"
    );

    for seq in 1..=8 {
        let proof = prove(&entries, &checkpoint, seq).unwrap();
        assert_eq!(verify_proof(&proof, &keys), Ok(()), "entry {seq}");
    }
    let mut forged = prove(&entries, &checkpoint, 3).unwrap();
    forged.entry = entries[9].canonical.clone();
    assert!(
        verify_proof(&forged, &keys).is_err(),
        "an entry outside the checkpoint"
    );
    let mut resigned = checkpoint.clone();
    resigned.size = 9;
    assert!(
        verify_checkpoints(&entries, &[resigned], &history).is_err(),
        "a checkpoint altered"
    );
}

/// A key rotation: the old key signs an entry announcing the new one, which signs
/// everything after; the first checkpoint after is signed by both. The ledger verifies
/// with only the original public key.
#[test]
fn a_rotated_key_is_vouched_for_by_the_old_one() {
    let (old, new) = (signer(7), signer(8));
    let mut entries = chain(&old, 3);
    let announce = |seq: u64, prev: String, kind: &str, details: serde_json::Value| Entry {
        seq,
        time: "2026-12-03T00:00:00.000Z".into(),
        kind: kind.into(),
        actor: "operator".into(),
        subject: "ledger".into(),
        details,
        prev,
    };
    let push = |entries: &mut Vec<StoredEntry>, by: &Signer, entry: Entry| {
        let sealed = by.seal(&entry);
        entries.push(StoredEntry {
            seq: entry.seq,
            canonical: sealed.canonical,
            hash: sealed.hash,
            signature: sealed.signature,
            key_id: sealed.key_id,
        });
    };
    let details = serde_json::json!({"new_public_key": new.public_key_hex()});
    let prev = entries[2].hash.clone();
    push(
        &mut entries,
        &old,
        announce(4, prev, "key_rotation", details),
    );
    let prev = entries[3].hash.clone();
    push(
        &mut entries,
        &new,
        announce(5, prev, "spawn", serde_json::json!({})),
    );

    let original = public(&old);
    let history = verify(&entries, &original).unwrap();
    let mut checkpoint = checkpoint(&new, &entries, 5);
    old.co_sign(&mut checkpoint);
    assert_eq!(
        verify_checkpoints(&entries, std::slice::from_ref(&checkpoint), &history),
        Ok(())
    );

    // Given both keys, the ledger still keeps to the order they were in force in: the
    // retired key signs nothing after the rotation.
    let both = [public(&old), public(&new)].concat();
    let mut late = entries[..4].to_vec();
    let prev = entries[3].hash.clone();
    push(
        &mut late,
        &old,
        announce(5, prev, "spawn", serde_json::json!({})),
    );
    let err = verify(&late, &both).unwrap_err();
    assert_eq!(err.seq, 5);
    assert!(err.why.contains("in force"), "{}", err.why);

    // Only the new key cannot vouch for the entries before it.
    let err = verify(&entries, &public(&new)).unwrap_err();
    assert_eq!(err.seq, 1);
    assert!(err.why.contains("first key"), "{}", err.why);

    // A "rotation" signed by a stranger introduces nothing.
    let stranger = self::signer(9);
    let mut forged = entries[..3].to_vec();
    let details = serde_json::json!({"new_public_key": stranger.public_key_hex()});
    let prev = entries[2].hash.clone();
    push(
        &mut forged,
        &stranger,
        announce(4, prev, "key_rotation", details),
    );
    assert_eq!(verify(&forged, &original).unwrap_err().seq, 4);

    // The checkpoint across the rotation needs both keys, each in its role.
    let checkpoint_err = |checkpoint: Checkpoint| {
        verify_checkpoints(&entries, &[checkpoint], &history)
            .unwrap_err()
            .why
    };
    let mut half = checkpoint.clone();
    half.co_signature = None;
    assert!(checkpoint_err(half).contains("half"));
    let mut new_only = checkpoint.clone();
    (new_only.co_key_id, new_only.co_signature) = (None, None);
    assert!(checkpoint_err(new_only).contains("must also be signed"));
    let mut old_first = self::checkpoint(&old, &entries, 5);
    new.co_sign(&mut old_first);
    assert!(checkpoint_err(old_first).contains("in force"));

    // Before the rotation, one signature: a second one is refused.
    let mut early = self::checkpoint(&old, &entries, 3);
    old.co_sign(&mut early);
    assert!(checkpoint_err(early).contains("no key rotation"));
}

/// Sealed entries of `(kind, subject, details)`, in order.
fn ledger_of(signer: &Signer, items: &[(&str, &str, Value)]) -> Vec<StoredEntry> {
    let mut prev = GENESIS.to_owned();
    let mut entries = Vec::new();
    for (seq, (kind, subject, details)) in (1..).zip(items) {
        let entry = Entry {
            seq,
            time: "2026-12-03T00:00:00.000Z".into(),
            kind: (*kind).into(),
            actor: "spiffe://t/agent/x/lead".into(),
            subject: (*subject).into(),
            details: details.clone(),
            prev,
        };
        let sealed = signer.seal(&entry);
        prev = sealed.hash.clone();
        entries.push(StoredEntry {
            seq,
            canonical: sealed.canonical,
            hash: sealed.hash,
            signature: sealed.signature,
            key_id: sealed.key_id,
        });
    }
    entries
}

/// Custody follows the latest incarnation of a reused SPIFFE ID and each ancestor as it
/// was when its descendant was spawned; a replacement's custody starts at its spawn.
#[test]
fn custody_follows_the_latest_incarnation() {
    let (lead, child, grandchild, stand_in) = (
        "spiffe://t/agent/x/lead",
        "spiffe://t/agent/x/child",
        "spiffe://t/agent/x/grandchild",
        "spiffe://t/agent/x/stand-in",
    );
    let spawn = |id, agent, parent| ("spawn", id, json!({"agent_id": agent, "parent": parent}));
    let about = |kind, id, agent| (kind, id, json!({ "agent_id": agent }));
    let replaced = json!({"agent_id": "a4", "replaces": grandchild});
    let entries = ledger_of(
        &signer(7),
        &[
            spawn(child, "a1", lead),
            about("termination", child, "a1"),
            spawn(child, "a2", lead),
            spawn(grandchild, "a3", child),
            about("termination", grandchild, "a3"),
            spawn(stand_in, "a4", child),
            ("replacement", stand_in, replaced),
            about("breaker_trip", stand_in, "a4"),
            spawn(child, "a5", lead),
        ],
    );
    let seqs = |id| {
        custody(&entries, id)
            .iter()
            .map(|e| e.seq)
            .collect::<Vec<_>>()
    };

    assert_eq!(
        seqs(stand_in),
        [3, 6, 7, 8],
        "its grant, then what happened since"
    );
    assert_eq!(seqs(grandchild), [3, 4, 5]);
    assert_eq!(seqs(child), [9], "the latest incarnation");
    assert_eq!(seqs(lead), Vec::<u64>::new(), "no entry is about the lead");
}
