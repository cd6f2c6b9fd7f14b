//! The evidence ledger: every decision is a signed, chained entry that `warden ledger
//! verify` checks offline with only the public key, naming the first bad entry.

use std::process::Command;

use serde_json::{Value, json};

use crate::common::*;

fn warden_ledger(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_warden"))
        .arg("ledger")
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

/// `n` spawns the lead may not make (a child cannot start TRUSTED): each refusal is
/// a ledger entry.
async fn refused_spawns(h: &Harness, prefix: &str, n: usize) {
    for i in 0..n {
        let body = json!({"parent": "lead-quarterly-orchestrator", "name": format!("{prefix}-{i}"),
            "budget": {"daily_limit": "1.00"}, "trust": {"initial_level": "TRUSTED"}});
        let (status, _) = call(
            h,
            reqwest::Method::POST,
            "/v1/agents",
            CASE_LEAD_KEY,
            Some(body),
        )
        .await;
        assert_eq!(status, 403, "each refusal is a ledger entry");
    }
}

#[tokio::test]
async fn decisions_verify_offline_and_tampering_is_named() {
    let h = Harness::start().await;
    for name in ["fetcher-a", "fetcher-b"] {
        let body = json!({"parent": "lead-quarterly-orchestrator", "name": name,
            "budget": {"daily_limit": "5.00"}, "permissions": {"restrict_to": ["models.small"]}});
        let (status, _) = call(
            &h,
            reqwest::Method::POST,
            "/v1/agents",
            CASE_LEAD_KEY,
            Some(body),
        )
        .await;
        assert_eq!(status, 201);
    }
    let (status, _) = call(
        &h,
        reqwest::Method::DELETE,
        "/v1/agents/fetcher-a",
        CASE_LEAD_KEY,
        None,
    )
    .await;
    assert_eq!(status, 200);

    let db = h.database();
    let key = db.with_file_name("ledger-public.key");
    let (db, key) = (db.to_str().unwrap(), key.to_str().unwrap());
    let (ok, out) = warden_ledger(&["verify", "--db", db, "--public-key", key]);
    assert!(ok, "{out}");
    assert!(out.contains("3 entries verified"), "{out}");

    // The public key is served too.
    let served: Value = serde_json::from_slice(
        &reqwest::get(h.url("/v1/ledger/public-key"))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        served["public_key"],
        std::fs::read_to_string(key).unwrap().trim()
    );
    let key_id = served["key_id"].as_str().unwrap();
    assert!(out.contains(&format!("first key {key_id}")), "{out}");

    // An export verifies the same way.
    let export = db.replace("warden.db", "ledger.jsonl");
    assert!(warden_ledger(&["export", "--db", db, "--out", &export]).0);
    let (ok, out) = warden_ledger(&["verify", "--jsonl", &export, "--public-key", key]);
    assert!(ok, "{out}");

    // One changed byte in the second entry is found and named.
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.execute(
        "UPDATE ledger SET entry = replace(entry, 'fetcher-b', 'fetcher-c') WHERE seq = 2",
        [],
    )
    .unwrap();
    let (ok, out) = warden_ledger(&["verify", "--db", db, "--public-key", key]);
    assert!(!ok, "{out}");
    assert!(out.contains("entry 2"), "{out}");
}

/// A grandchild's custody shows the child's spawn (what the lead granted) and the
/// grandchild's own spawn, in order, from a verified ledger.
#[tokio::test]
async fn custody_of_a_grandchild() {
    let h = Harness::start().await;
    let spawn = |key: String, parent: &'static str, name: &'static str, slice: &'static str| {
        let url = h.url("/v1/agents");
        async move {
            let body = json!({"parent": parent, "name": name, "budget": {"daily_limit": slice},
                "permissions": {"restrict_to": ["models.small"]}, "lifecycle": {"max_duration": "1h"}});
            let response = reqwest::Client::new()
                .post(url)
                .bearer_auth(key)
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 201);
            serde_json::from_slice::<Value>(&response.bytes().await.unwrap()).unwrap()
        }
    };
    let child = spawn(
        CASE_LEAD_KEY.into(),
        "lead-quarterly-orchestrator",
        "reconciler",
        "20.00",
    )
    .await;
    let child_key = child["api_key"].as_str().unwrap().to_owned();
    let grandchild = spawn(child_key, "reconciler", "checker", "2.00").await;

    let db = h.database();
    let key = db.with_file_name("ledger-public.key");
    let id = grandchild["spiffe_id"].as_str().unwrap();
    let (ok, out) = warden_ledger(&[
        "custody",
        id,
        "--db",
        db.to_str().unwrap(),
        "--public-key",
        key.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let entries: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(entries.len(), 2, "{out}");
    assert_eq!(entries[0]["subject"], child["spiffe_id"]);
    assert_eq!(entries[0]["actor"], CASE_LEAD_ID);
    assert_eq!(entries[0]["details"]["slice_usd"], "20");
    assert_eq!(entries[1]["subject"], id);
    assert_eq!(entries[1]["details"]["parent"], child["spiffe_id"]);
    assert!(entries[0]["seq"].as_u64() < entries[1]["seq"].as_u64());
}

/// `GET /v1/ledger` filters by agent and kind and pages by sequence number.
#[tokio::test]
async fn ledger_query_filters_and_pages() {
    let h = Harness::start().await;
    for n in 0..5 {
        let body = json!({"parent": "lead-quarterly-orchestrator", "name": format!("worker-{n}"),
            "budget": {"daily_limit": "1.00"}, "permissions": {"restrict_to": ["models.small"]}});
        let (status, _) = call(
            &h,
            reqwest::Method::POST,
            "/v1/agents",
            CASE_LEAD_KEY,
            Some(body),
        )
        .await;
        assert_eq!(status, 201);
    }
    let get = |query: String| {
        let h = &h;
        async move {
            let path = format!("/v1/ledger?{query}");
            let (status, page) = call(h, reqwest::Method::GET, &path, OPERATOR_KEY, None).await;
            assert_eq!(status, 200);
            page
        }
    };

    let first = get("kind=spawn&limit=3".into()).await;
    assert_eq!(first["data"].as_array().unwrap().len(), 3);
    let after = first["next_after"].as_u64().unwrap();
    let rest = get(format!("kind=spawn&limit=3&after={after}")).await;
    assert_eq!(rest["data"].as_array().unwrap().len(), 2);
    assert!(rest["next_after"].is_null());

    let one = get("agent=spiffe://e2e.test/agent/fintech/worker-3".into()).await;
    let data = one["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["entry"]["kind"], "spawn");
    assert_eq!(data[0]["hash"].as_str().unwrap().len(), 64);

    // Time bounds: at or after `since`, before `until`.
    let all = get("limit=100".into()).await;
    let times: Vec<String> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["entry"]["time"].as_str().unwrap().to_owned())
        .collect();
    let cut = &times[2];
    let count = |page: &Value| page["data"].as_array().unwrap().len();
    let later = get(format!("since={cut}")).await;
    assert_eq!(count(&later), times.iter().filter(|t| *t >= cut).count());
    let earlier = get(format!("until={cut}")).await;
    assert_eq!(count(&earlier), times.iter().filter(|t| *t < cut).count());
    assert_eq!(
        count(&get("since=4102444800".into()).await),
        0,
        "2100 has no entries yet"
    );

    for bad in [
        "since=yesterday",
        "until=253402300800",
        "since=99999999999999999999",
    ] {
        let path = format!("/v1/ledger?{bad}");
        let (status, error) = call(&h, reqwest::Method::GET, &path, OPERATOR_KEY, None).await;
        assert_eq!(
            (status, error_of(&error).1),
            (400, "invalid_value"),
            "{bad}"
        );
    }
    let (status, _) = call(&h, reqwest::Method::GET, "/v1/ledger", CASE_LEAD_KEY, None).await;
    assert_eq!(status, 403, "operator only");
}

/// Every 64 entries a signed checkpoint covers the ledger's Merkle root: an entry's
/// inclusion proof verifies against it, and cutting the ledger short is caught.
#[tokio::test]
async fn checkpoints_prove_inclusion_and_catch_truncation() {
    let h = Harness::start().await;
    refused_spawns(&h, "x", 65).await;

    let db = h.database();
    let key = db.with_file_name("ledger-public.key");
    let (db, key) = (db.to_str().unwrap(), key.to_str().unwrap());
    let (ok, out) = warden_ledger(&["verify", "--db", db, "--public-key", key]);
    assert!(ok && out.contains("65 entries verified"), "{out}");
    // The 64th entry signed one; the ten-second timer may have signed others.
    let conn = rusqlite::Connection::open(db).unwrap();
    let at_64: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM checkpoints WHERE size = 64",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(at_64, 1);

    let (ok, proof) = warden_ledger(&["prove", "10", "--db", db]);
    assert!(ok, "{proof}");
    let proof_file = db.replace("warden.db", "proof-10.json");
    std::fs::write(&proof_file, &proof).unwrap();
    let (ok, out) = warden_ledger(&["verify", "--proof", &proof_file, "--public-key", key]);
    assert!(
        ok && out.contains("entry 10 is in the ledger of checkpoint"),
        "{out}"
    );

    conn.execute("DELETE FROM ledger WHERE seq > 60", [])
        .unwrap();
    let (ok, out) = warden_ledger(&["verify", "--db", db, "--public-key", key]);
    assert!(!ok && out.contains("entry 61"), "{out}");
}

/// A tail cut off together with the checkpoints over it leaves a ledger that verifies
/// by itself; a checkpoint kept outside Warden (`GET /v1/ledger/checkpoint`, here the
/// one a clean stop signs) catches the cut, naming the first missing entry.
#[tokio::test]
async fn a_witnessed_checkpoint_catches_a_tail_cut_with_its_checkpoints() {
    let mut h = Harness::start().await;
    let response = reqwest::get(h.url("/v1/ledger/checkpoint")).await.unwrap();
    assert_eq!(response.status(), 404, "no checkpoint yet");
    let error: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(error["error"]["code"], "no_checkpoint");

    refused_spawns(&h, "w", 3).await;
    assert_eq!(h.terminate(), Some(0));
    h.restart();
    let response = reqwest::get(h.url("/v1/ledger/checkpoint")).await.unwrap();
    assert_eq!(response.status(), 200);
    let witness = response.text().await.unwrap();
    let checkpoint: Value = serde_json::from_str(&witness).unwrap();
    assert_eq!(checkpoint["size"], 3, "a clean stop signs the last entries");
    assert_eq!(h.terminate(), Some(0));

    let db = h.database();
    let witness_file = db.with_file_name("witness.json");
    std::fs::write(&witness_file, witness).unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute("DELETE FROM ledger WHERE seq > 1", [])
        .unwrap();
    conn.execute("DELETE FROM checkpoints WHERE size > 1", [])
        .unwrap();
    let db = db.to_str().unwrap();

    let (ok, out) = warden_ledger(&["verify", "--db", db]);
    assert!(ok && out.contains("1 entries verified"), "alone: {out}");
    let witness = witness_file.to_str().unwrap();
    let (ok, out) = warden_ledger(&["verify", "--db", db, "--witness", witness]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("entry 2") && out.contains("witnessed checkpoint at 3"),
        "{out}"
    );
}

/// SIGKILL in the middle of a burst of spawns: after the restart the ledger verifies,
/// and every spawn that was acknowledged has its entry.
#[tokio::test]
async fn a_crash_during_a_spawn_burst_loses_no_acknowledged_record() {
    let mut h = Harness::start().await;
    let url = h.url("/v1/agents");
    let burst = async {
        let (mut acknowledged, mut lost) = (Vec::new(), 0);
        for wave in 0..80 {
            let spawns = (0..8).map(|i| {
                let url = url.clone();
                async move {
                    let body = json!({"parent": "lead-quarterly-orchestrator", "name": format!("burst-{wave}-{i}"),
                        "budget": {"daily_limit": "0.50"}, "permissions": {"restrict_to": ["models.small"]}});
                    let sent = reqwest::Client::new().post(url).bearer_auth(CASE_LEAD_KEY).body(body.to_string()).send().await;
                    let Ok(response) = sent else { return Err(()) };
                    if response.status() != 201 {
                        return Ok(None);
                    }
                    let bytes = response.bytes().await.map_err(|_| ())?;
                    let agent: Value = serde_json::from_slice(&bytes).map_err(|_| ())?;
                    let spiffe_id = agent["spiffe_id"].as_str().unwrap().to_owned();
                    Ok(Some((spiffe_id, agent["evidence_id"].as_str().unwrap().to_owned())))
                }
            });
            for outcome in futures_util::future::join_all(spawns).await {
                match outcome {
                    Ok(Some(ids)) => acknowledged.push(ids),
                    Ok(None) => {}
                    Err(()) => lost += 1,
                }
            }
        }
        (acknowledged, lost)
    };
    let crash = async {
        tokio::time::sleep(std::time::Duration::from_millis(60)).await;
        h.crash();
    };
    let ((acknowledged, lost), ()) = tokio::join!(burst, crash);
    assert!(
        !acknowledged.is_empty(),
        "some spawns were acknowledged before the crash"
    );
    assert!(lost > 0, "the crash came in the middle of the burst");
    h.restart();

    let db = h.database();
    let key = db.with_file_name("ledger-public.key");
    let (ok, out) = warden_ledger(&[
        "verify",
        "--db",
        db.to_str().unwrap(),
        "--public-key",
        key.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");

    let conn = rusqlite::Connection::open(&db).unwrap();
    for (spiffe_id, evidence) in &acknowledged {
        let seq: u64 = evidence.trim_start_matches("dec_").parse().unwrap();
        let subject: String = conn
            .query_row(
                "SELECT subject FROM ledger WHERE seq = ?1",
                [seq as i64],
                |r| r.get(0),
            )
            .unwrap_or_else(|e| panic!("{evidence} of {spiffe_id} is missing: {e}"));
        assert_eq!(&subject, spiffe_id);
    }

    // The agents themselves came back too, and still work.
    let (spiffe_id, _) = &acknowledged[0];
    let name = spiffe_id.rsplit('/').next().unwrap();
    let response = reqwest::Client::new()
        .get(h.url(&format!("/v1/agents/{name}")))
        .bearer_auth(OPERATOR_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// Rotating the ledger key through the operator endpoint: entries after it are signed
/// by the new key, the checkpoint at the rotation by both, and the whole ledger still
/// verifies with only the original public key.
#[tokio::test]
async fn key_rotation_keeps_the_ledger_verifiable_with_the_first_key() {
    let h = Harness::start().await;
    let spawn = |name: &'static str| {
        let url = h.url("/v1/agents");
        async move {
            let body = json!({"parent": "lead-quarterly-orchestrator", "name": name,
                "budget": {"daily_limit": "1.00"}, "permissions": {"restrict_to": ["models.small"]}});
            let response = reqwest::Client::new()
                .post(url)
                .bearer_auth(CASE_LEAD_KEY)
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 201);
        }
    };
    spawn("before").await;

    let db = h.database();
    let first_key = db.with_file_name("first-public.key");
    std::fs::copy(db.with_file_name("ledger-public.key"), &first_key).unwrap();

    let response = reqwest::Client::new()
        .post(h.url("/v1/ledger/rotate-key"))
        .bearer_auth(OPERATOR_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let rotated: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    spawn("after").await;

    let served: Value = serde_json::from_slice(
        &reqwest::get(h.url("/v1/ledger/public-key"))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(served["public_key"], rotated["public_key"]);
    assert_ne!(
        served["public_key"].as_str().unwrap(),
        std::fs::read_to_string(&first_key).unwrap().trim()
    );

    let conn = rusqlite::Connection::open(&db).unwrap();
    let (kind, co_key): (String, Option<String>) = conn
        .query_row(
            "SELECT l.kind, c.co_key_id FROM ledger l JOIN checkpoints c ON c.size = l.seq WHERE l.seq = 2",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((kind.as_str(), co_key.is_some()), ("key_rotation", true));

    let (ok, out) = warden_ledger(&[
        "verify",
        "--db",
        db.to_str().unwrap(),
        "--public-key",
        first_key.to_str().unwrap(),
    ]);
    assert!(ok && out.contains("3 entries verified"), "{out}");
    // Without --public-key, verify takes the keys beside the database: the one in
    // force and the one the rotation archived.
    let (ok, out) = warden_ledger(&["verify", "--db", db.to_str().unwrap()]);
    assert!(ok && out.contains("3 entries verified"), "{out}");

    // The export carries the co-signed checkpoint, after the entry it ends on, and
    // verifies it the same way.
    let export = db.with_file_name("ledger.jsonl");
    let export = export.to_str().unwrap();
    assert!(warden_ledger(&["export", "--db", db.to_str().unwrap(), "--out", export]).0);
    let text = std::fs::read_to_string(export).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // (The ten-second timer may add a checkpoint of its own on a slow machine.)
    let at_rotation = lines
        .iter()
        .position(|l| l["checkpoint"]["size"] == 2)
        .expect("the rotation's checkpoint is exported");
    assert_eq!(lines[at_rotation - 1]["seq"], 2, "{text}");
    assert!(lines[at_rotation]["checkpoint"]["co_signature"].is_string());
    let first_key = first_key.to_str().unwrap();
    let (ok, out) = warden_ledger(&["verify", "--jsonl", export, "--public-key", first_key]);
    assert!(ok && out.contains("3 entries verified"), "{out}");

    // A checkpoint whose root was changed in the export is caught.
    let root = lines[at_rotation]["checkpoint"]["root"].as_str().unwrap();
    let forged = text.replace(root, &"0".repeat(64));
    std::fs::write(export, forged).unwrap();
    let (ok, out) = warden_ledger(&["verify", "--jsonl", export, "--public-key", first_key]);
    assert!(!ok && out.contains("checkpoint"), "{out}");
}

/// Warden refuses to start with a signing key the ledger does not expect (here: the
/// key file replaced), naming both keys, rather than sign entries nobody can verify.
#[tokio::test]
async fn a_foreign_signing_key_is_refused_at_start() {
    let mut h = Harness::start().await;
    let body = json!({"parent": "lead-quarterly-orchestrator", "name": "one",
        "budget": {"daily_limit": "1.00"}, "permissions": {"restrict_to": ["models.small"]}});
    let (status, _) = call(
        &h,
        reqwest::Method::POST,
        "/v1/agents",
        CASE_LEAD_KEY,
        Some(body),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(h.terminate(), Some(0));

    let key = h.database().with_file_name("ledger-signing.key");
    std::fs::write(&key, format!("{}\n", "11".repeat(32))).unwrap();
    let config = h.policy_path().with_file_name("warden.toml");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_warden"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .env("WARDEN_E2E_MOCK_KEY", "unused")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("ledger's entries are now signed by key"),
        "{stderr}"
    );
}
