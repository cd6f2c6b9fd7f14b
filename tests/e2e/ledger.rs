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

#[tokio::test]
async fn decisions_verify_offline_and_tampering_is_named() {
    let h = Harness::start().await;
    for name in ["fetcher-a", "fetcher-b"] {
        let body = json!({"parent": "lead-quarterly-orchestrator", "name": name,
            "budget": {"daily_limit": "5.00"}, "permissions": {"restrict_to": ["models.small"]}});
        let response = reqwest::Client::new()
            .post(h.url("/v1/agents"))
            .bearer_auth(CASE_LEAD_KEY)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
    }
    let response = reqwest::Client::new()
        .delete(h.url("/v1/agents/fetcher-a"))
        .bearer_auth(CASE_LEAD_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

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
