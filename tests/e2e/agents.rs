//! The control plane: a lead hires its fleet, every refusal leaves no trace, and
//! ending an agent ends its descendants and revokes their keys.

use serde_json::{Value, json};

use crate::common::*;

fn spawn_body(parent: &str, name: &str, slice: &str, scopes: &[&str], lifetime: &str) -> Value {
    json!({
        "parent": parent,
        "name": name,
        "budget": {"daily_limit": slice, "currency": "USD", "source": "parent_slice"},
        "permissions": {"inherit_from": "parent", "restrict_to": scopes},
        "trust": {"initial_level": "WATCHED", "promote_after": "3_clean_verdicts"},
        "lifecycle": {"max_duration": lifetime, "auto_terminate": true}
    })
}

async fn spawn(h: &Harness, key: &str, body: Value) -> (u16, Value) {
    call(h, reqwest::Method::POST, "/v1/agents", key, Some(body)).await
}

async fn lead_budget(h: &Harness) -> Value {
    let path = "/v1/agents/lead-quarterly-orchestrator/budget";
    call(h, reqwest::Method::GET, path, CASE_LEAD_KEY, None)
        .await
        .1
}

/// The case-study quarter: 15 data fetchers, 8 reconcilers, 5 report generators and 3
/// audit validators with their slices and lifetimes; one more spawn that does not fit
/// is refused with the amount still available in the message.
#[tokio::test]
async fn lead_hires_the_quarterly_fleet() {
    let h = Harness::start().await;
    let roles = [
        (
            "data-fetcher",
            15,
            "50.00",
            "72h",
            vec!["market_data.read", "models.small"],
        ),
        (
            "reconciler",
            8,
            "80.00",
            "72h",
            vec!["market_data.read", "models.small"],
        ),
        (
            "report-generator",
            5,
            "120.00",
            "48h",
            vec!["reports.write", "models.small"],
        ),
        (
            "audit-validator",
            3,
            "60.00",
            "24h",
            vec!["compliance_docs.read", "models.small"],
        ),
    ];

    let mut first_key = None;
    for (role, count, slice, lifetime, scopes) in &roles {
        for n in 1..=*count {
            let name = format!("{role}-{n:02}");
            let body = spawn_body(
                "lead-quarterly-orchestrator",
                &name,
                slice,
                scopes,
                lifetime,
            );
            let (status, agent) = spawn(&h, CASE_LEAD_KEY, body).await;
            assert_eq!(status, 201, "{name}: {agent}");
            assert_eq!(
                agent["spiffe_id"],
                format!("spiffe://e2e.test/agent/fintech/{name}")
            );
            assert_eq!(agent["trust"]["level"], "WATCHED");
            assert_eq!(
                agent["budget"]["daily_limit"],
                *slice.trim_end_matches(".00")
            );
            assert!(agent["evidence_id"].as_str().unwrap().starts_with("dec_"));
            assert!(agent["api_key"].as_str().unwrap().starts_with("wdn_"));
            first_key.get_or_insert_with(|| agent["api_key"].as_str().unwrap().to_owned());
        }
    }

    let budget = lead_budget(&h).await;
    assert_eq!(budget["delegated"], "2170");
    assert_eq!(budget["available"], "30");

    let (status, refused) = spawn(
        &h,
        CASE_LEAD_KEY,
        spawn_body(
            "lead-quarterly-orchestrator",
            "data-fetcher-16",
            "50.00",
            &["market_data.read"],
            "72h",
        ),
    )
    .await;
    assert_eq!(
        (status, error_of(&refused)),
        (429, ("insufficient_quota", "budget_exceeded"))
    );
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("$30 available"),
        "{refused}"
    );

    // A new agent works at once with its own key, within its manifest.
    let fetcher = first_key.unwrap();
    let chat = json!({"model": "mock-small", "messages": [{"role": "user", "content": "quote"}]});
    let response = reqwest::Client::new()
        .post(h.url("/v1/chat/completions"))
        .bearer_auth(&fetcher)
        .body(chat.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let premium =
        json!({"model": "mock-large", "messages": [{"role": "user", "content": "quote"}]});
    let response = reqwest::Client::new()
        .post(h.url("/v1/chat/completions"))
        .bearer_auth(&fetcher)
        .body(premium.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);

    // Tools too: the fetcher's manifest grants get_quote, not write_report.
    for (tool, status) in [("get_quote", 200), ("write_report", 403)] {
        let with_tool = json!({
            "model": "mock-small",
            "messages": [{"role": "user", "content": "quote"}],
            "tools": [{"type": "function", "function": {"name": tool, "parameters": {}}}]
        });
        let response = reqwest::Client::new()
            .post(h.url("/v1/chat/completions"))
            .bearer_auth(&fetcher)
            .body(with_tool.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{tool}");
        if status == 403 {
            let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
            assert_eq!(body["error"]["param"], "tools");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("write_report")
            );
        }
    }

    let (_, list) = call(
        &h,
        reqwest::Method::GET,
        "/v1/agents?parent=lead-quarterly-orchestrator",
        CASE_LEAD_KEY,
        None,
    )
    .await;
    assert_eq!(list["data"].as_array().unwrap().len(), 31);
}

/// Every refusal answers with a clear error and changes nothing.
#[tokio::test]
async fn refused_spawns_change_nothing() {
    let h = Harness::start().await;
    let parent = "lead-quarterly-orchestrator";
    let ok = |name: &str| spawn_body(parent, name, "10.00", &["market_data.read"], "24h");

    let (status, child) = spawn(&h, CASE_LEAD_KEY, ok("fetcher")).await;
    assert_eq!(status, 201);
    let child_key = child["api_key"].as_str().unwrap().to_owned();
    let before = lead_budget(&h).await;

    let with = |mut body: Value, pointer: &str, value: Value| {
        *body.pointer_mut(pointer).unwrap() = value;
        body
    };
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "scope the parent lacks",
            with(
                ok("a"),
                "/permissions/restrict_to",
                json!(["portfolio.write"]),
            ),
            403,
            "scope_not_granted",
        ),
        (
            "scope policy keeps",
            with(
                ok("b"),
                "/permissions/restrict_to",
                json!(["portfolio.read"]),
            ),
            403,
            "scope_not_granted",
        ),
        (
            "slice above policy",
            with(ok("c"), "/budget/daily_limit", json!("500.00")),
            403,
            "delegation_denied",
        ),
        (
            "TRUSTED requested",
            with(ok("d"), "/trust/initial_level", json!("TRUSTED")),
            403,
            "trust_level_denied",
        ),
        (
            "negative budget",
            with(ok("e"), "/budget/daily_limit", json!("-5")),
            400,
            "invalid_value",
        ),
        (
            "zero budget",
            with(ok("f"), "/budget/daily_limit", json!("0")),
            400,
            "invalid_value",
        ),
        (
            "non-numeric budget",
            with(ok("g"), "/budget/daily_limit", json!("ten dollars")),
            400,
            "invalid_value",
        ),
        (
            "number, not string",
            with(ok("h"), "/budget/daily_limit", json!(10)),
            400,
            "invalid_value",
        ),
        (
            "absurd budget",
            with(ok("i"), "/budget/daily_limit", json!("1e30")),
            400,
            "invalid_value",
        ),
        (
            "malformed duration",
            with(ok("j"), "/lifecycle/max_duration", json!("three days")),
            400,
            "invalid_value",
        ),
        (
            "lifetime above policy",
            with(ok("k"), "/lifecycle/max_duration", json!("100h")),
            403,
            "delegation_denied",
        ),
        ("name collision", ok("fetcher"), 409, "name_taken"),
        ("bad name", ok("Fetcher 2"), 400, "invalid_value"),
        (
            "unknown parent",
            with(ok("l"), "/parent", json!("nobody")),
            404,
            "agent_not_found",
        ),
    ];
    for (what, body, status, code) in cases {
        let (got, error) = spawn(&h, CASE_LEAD_KEY, body).await;
        assert_eq!((got, error_of(&error).1), (status, code), "{what}: {error}");
        assert!(!error["error"]["message"].as_str().unwrap().is_empty());
    }

    // An agent may spawn only under itself.
    let (status, error) = spawn(&h, &child_key, ok("m")).await;
    assert_eq!((status, error_of(&error).1), (403, "not_a_descendant"));

    // Depth: the child (depth 1) may spawn; its child (depth 2) may not go deeper.
    let (status, grandchild) = spawn(
        &h,
        &child_key,
        spawn_body("fetcher", "sub", "1.00", &["market_data.read"], "1h"),
    )
    .await;
    assert_eq!(status, 201, "{grandchild}");
    let grandchild_key = grandchild["api_key"].as_str().unwrap();
    let (status, error) = spawn(
        &h,
        grandchild_key,
        spawn_body("sub", "subsub", "0.10", &["market_data.read"], "1h"),
    )
    .await;
    assert_eq!((status, error_of(&error).1), (403, "delegation_denied"));

    assert_eq!(
        lead_budget(&h).await,
        before,
        "refusals changed the lead's budget"
    );
    let refusals = h.decisions("spawn_refused", None);
    assert_eq!(refusals.len(), 16, "every refusal is a decision record");
    assert!(refusals.iter().any(|r| r["code"] == "trust_level_denied"));
    let (_, all) = call(&h, reqwest::Method::GET, "/v1/agents", OPERATOR_KEY, None).await;
    assert_eq!(
        all["data"].as_array().unwrap().len(),
        3 + 2,
        "three leads, a child, a grandchild"
    );
}

/// The number of children is capped by policy.
#[tokio::test]
async fn child_count_is_capped() {
    let h = Harness::start().await;
    let body = |name: &str| spawn_body("lead", name, "1.00", &["models.small"], "1h");
    assert_eq!(spawn(&h, AGENT_KEY, body("one")).await.0, 201);
    assert_eq!(spawn(&h, AGENT_KEY, body("two")).await.0, 201);
    let (status, error) = spawn(&h, AGENT_KEY, body("three")).await;
    assert_eq!((status, error_of(&error).1), (403, "delegation_denied"));
}

/// Ending an agent ends its descendants, revokes their keys at once, and returns the
/// unspent slices to the parent.
#[tokio::test]
async fn termination_cascades_and_revokes() {
    let h = Harness::start().await;
    let (_, child) = spawn(
        &h,
        CASE_LEAD_KEY,
        spawn_body(
            "lead-quarterly-orchestrator",
            "worker",
            "100.00",
            &["models.small"],
            "24h",
        ),
    )
    .await;
    let child_key = child["api_key"].as_str().unwrap().to_owned();
    let (_, grandchild) = spawn(
        &h,
        &child_key,
        spawn_body("worker", "helper", "20.00", &["models.small"], "1h"),
    )
    .await;
    let grandchild_key = grandchild["api_key"].as_str().unwrap().to_owned();
    assert_eq!(lead_budget(&h).await["available"], "2100");

    // A stranger cannot end it; the lead can.
    let path = format!("/v1/agents/{}", child["id"].as_str().unwrap());
    let (status, _) = call(&h, reqwest::Method::DELETE, &path, AGENT_KEY, None).await;
    assert_eq!(status, 403);
    let (status, ended) = call(&h, reqwest::Method::DELETE, &path, CASE_LEAD_KEY, None).await;
    assert_eq!(status, 200, "{ended}");
    assert_eq!(ended["ended"].as_array().unwrap().len(), 2);
    assert_eq!(ended["agent"]["state"], "ended");

    for key in [&child_key, &grandchild_key] {
        let chat = json!({"model": "mock-small", "messages": [{"role": "user", "content": "hi"}]});
        let response = reqwest::Client::new()
            .post(h.url("/v1/chat/completions"))
            .bearer_auth(key)
            .body(chat.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "a revoked key is refused");
    }
    assert_eq!(lead_budget(&h).await["available"], "2200");
}

/// A replacement has the same role, manifest and slice, and a new identity; the old
/// agent stays ended and its key stops working.
#[tokio::test]
async fn replacement_takes_over_the_role() {
    let h = Harness::start().await;
    let body = spawn_body(
        "lead-quarterly-orchestrator",
        "data-fetcher-03",
        "50.00",
        &["market_data.read", "models.small"],
        "72h",
    );
    let (_, old) = spawn(&h, CASE_LEAD_KEY, body).await;
    let before = lead_budget(&h).await;

    let path = format!("/v1/agents/{}/replace", old["id"].as_str().unwrap());
    let (status, new) = call(&h, reqwest::Method::POST, &path, CASE_LEAD_KEY, None).await;
    assert_eq!(status, 201, "{new}");
    assert_eq!(new["name"], "data-fetcher-04");
    assert_eq!(
        new["spiffe_id"],
        "spiffe://e2e.test/agent/fintech/data-fetcher-04"
    );
    assert_eq!(new["manifest"]["scopes"], old["manifest"]["scopes"]);
    assert_eq!(new["budget"]["daily_limit"], old["budget"]["daily_limit"]);
    assert_eq!(new["trust"]["level"], "WATCHED");
    assert!(new["evidence_id"].as_str().unwrap().starts_with("dec_"));
    assert_ne!(new["api_key"], old["api_key"]);
    assert_eq!(
        lead_budget(&h).await,
        before,
        "the old slice came back and went to the new agent"
    );

    let old_path = format!("/v1/agents/{}", old["id"].as_str().unwrap());
    let (_, old_now) = call(&h, reqwest::Method::GET, &old_path, OPERATOR_KEY, None).await;
    assert_eq!(old_now["state"], "ended");
    let chat = json!({"model": "mock-small", "messages": [{"role": "user", "content": "hi"}]});
    for (key, status) in [(&old["api_key"], 401), (&new["api_key"], 200)] {
        let response = reqwest::Client::new()
            .post(h.url("/v1/chat/completions"))
            .bearer_auth(key.as_str().unwrap())
            .body(chat.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status);
    }
}

/// The control plane's OpenAPI document is served, generated from the code.
#[tokio::test]
async fn openapi_document_describes_the_control_plane() {
    let h = Harness::start().await;
    let response = reqwest::get(h.url("/openapi.json")).await.unwrap();
    assert_eq!(response.status(), 200);
    let doc: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();

    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = &doc["paths"];
    for (path, method) in [
        ("/v1/agents", "post"),
        ("/v1/agents", "get"),
        ("/v1/agents/{id}", "get"),
        ("/v1/agents/{id}", "delete"),
        ("/v1/agents/{id}/budget", "get"),
        ("/v1/agents/{id}/replace", "post"),
        ("/v1/policy/reload", "post"),
    ] {
        assert!(paths[path][method].is_object(), "{method} {path} missing");
    }
    let spawn = &doc["components"]["schemas"]["SpawnRequest"];
    let required: Vec<&str> = spawn["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for field in ["parent", "name", "budget"] {
        assert!(required.contains(&field), "{required:?}");
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

/// A quarantined agent is refused at once, cannot spawn, and its parent carries on.
#[tokio::test]
async fn quarantine_refuses_the_agent_alone() {
    let h = Harness::start().await;
    let (_, child) = spawn(
        &h,
        CASE_LEAD_KEY,
        spawn_body(
            "lead-quarterly-orchestrator",
            "data-fetcher-03",
            "50.00",
            &["models.small"],
            "72h",
        ),
    )
    .await;
    let path = format!("/v1/agents/{}/quarantine", child["id"].as_str().unwrap());

    let (status, _) = call(
        &h,
        reqwest::Method::POST,
        &path,
        CASE_LEAD_KEY,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 403, "only the operator quarantines");
    let (status, view) = call(
        &h,
        reqwest::Method::POST,
        &path,
        OPERATOR_KEY,
        Some(json!({"reason": "retry loop"})),
    )
    .await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["trust"]["level"], "QUARANTINED");
    assert_eq!(
        h.decisions("quarantine", child["spiffe_id"].as_str()).len(),
        1
    );

    let chat = json!({"model": "mock-small", "messages": [{"role": "user", "content": "hi"}]});
    for (key, status) in [
        (child["api_key"].as_str().unwrap(), 401),
        (CASE_LEAD_KEY, 200),
    ] {
        let response = reqwest::Client::new()
            .post(h.url("/v1/chat/completions"))
            .bearer_auth(key)
            .body(chat.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status);
    }

    let under = spawn_body("data-fetcher-03", "helper", "1.00", &["models.small"], "1h");
    let (status, error) = spawn(&h, OPERATOR_KEY, under).await;
    assert_eq!((status, error_of(&error).1), (409, "parent_unavailable"));
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("quarantined")
    );
}

/// Spawns racing their parent's termination leave no live orphan: every child that was
/// acknowledged ends with its parent, and every unspent slice finds its way back to the
/// lead, however the race falls.
#[tokio::test]
async fn spawns_racing_a_termination_leave_no_orphan() {
    let h = Harness::start().await;
    let body = spawn_body(
        "lead-quarterly-orchestrator",
        "worker",
        "100.00",
        &["models.small"],
        "24h",
    );
    let (_, worker) = spawn(&h, CASE_LEAD_KEY, body).await;
    let worker_key = worker["api_key"].as_str().unwrap().to_owned();
    let worker_path = format!("/v1/agents/{}", worker["id"].as_str().unwrap());

    // Four spawners, each one spawn after another; the termination goes in after the
    // sixth acknowledgement, with the other spawners somewhere in their spawns (most
    // of a spawn is its commit).
    let acknowledged = std::sync::atomic::AtomicUsize::new(0);
    let sixth = tokio::sync::Notify::new();
    let spawner = |first: usize| {
        let (h, worker_key, acknowledged, sixth) = (&h, &worker_key, &acknowledged, &sixth);
        async move {
            let mut results = Vec::new();
            for n in first..first + 8 {
                let body = spawn_body(
                    "worker",
                    &format!("helper-{n:02}"),
                    "1.00",
                    &["models.small"],
                    "1h",
                );
                let (status, helper) = spawn(h, worker_key, body).await;
                if status == 201
                    && acknowledged.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 5
                {
                    sixth.notify_one();
                }
                results.push((status, helper));
            }
            results
        }
    };
    let termination = async {
        sixth.notified().await;
        call(
            &h,
            reqwest::Method::DELETE,
            &worker_path,
            CASE_LEAD_KEY,
            None,
        )
        .await
    };
    let (a, b, c, d, (status, _)) = tokio::join!(
        spawner(0),
        spawner(8),
        spawner(16),
        spawner(24),
        termination
    );
    assert_eq!(status, 200);
    let spawned: Vec<_> = [a, b, c, d].into_iter().flatten().collect();

    for (status, helper) in spawned {
        match status {
            201 => {
                let path = format!("/v1/agents/{}", helper["id"].as_str().unwrap());
                let (_, now) = call(&h, reqwest::Method::GET, &path, CASE_LEAD_KEY, None).await;
                assert_eq!(
                    now["state"], "ended",
                    "an acknowledged child outlived its parent: {now}"
                );
                let ended = h.decisions("termination", helper["spiffe_id"].as_str());
                assert_eq!(ended.len(), 1, "its ending is recorded");
            }
            // Too late: the worker's key is revoked (401), its name no longer names a
            // live agent (404), or it has ended (409).
            401 | 404 | 409 => {}
            other => panic!("unexpected {other}: {helper}"),
        }
    }
    assert_eq!(lead_budget(&h).await["available"], "2200");
}

/// A quarantined lead stays quarantined across a restart: its key is still refused and
/// it can spawn nothing.
#[tokio::test]
async fn a_quarantined_lead_stays_quarantined_after_a_restart() {
    let mut h = Harness::start().await;
    let path = "/v1/agents/lead-quarterly-orchestrator/quarantine";
    let (status, view) = call(
        &h,
        reqwest::Method::POST,
        path,
        OPERATOR_KEY,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 200, "{view}");

    h.crash();
    h.restart();
    let (status, view) = call(
        &h,
        reqwest::Method::GET,
        "/v1/agents/lead-quarterly-orchestrator",
        OPERATOR_KEY,
        None,
    )
    .await;
    assert_eq!(
        (status, &view["trust"]["level"]),
        (200, &json!("QUARANTINED")),
        "{view}"
    );
    let body = spawn_body(
        "lead-quarterly-orchestrator",
        "late",
        "1.00",
        &["models.small"],
        "1h",
    );
    assert_eq!(
        spawn(&h, CASE_LEAD_KEY, body).await.0,
        401,
        "its key stays revoked"
    );
}

/// A lead the operator terminated stays ended across a restart.
#[tokio::test]
async fn a_terminated_lead_stays_ended_after_a_restart() {
    let mut h = Harness::start().await;
    let path = "/v1/agents/lead-quarterly-orchestrator";
    let (_, lead) = call(&h, reqwest::Method::GET, path, OPERATOR_KEY, None).await;
    let (status, _) = call(&h, reqwest::Method::DELETE, path, OPERATOR_KEY, None).await;
    assert_eq!(status, 200);

    h.crash();
    h.restart();
    let by_id = format!("/v1/agents/{}", lead["id"].as_str().unwrap());
    let (status, view) = call(&h, reqwest::Method::GET, &by_id, OPERATOR_KEY, None).await;
    assert_eq!((status, &view["state"]), (200, &json!("ended")), "{view}");
    let body = spawn_body(
        "lead-quarterly-orchestrator",
        "late",
        "1.00",
        &["models.small"],
        "1h",
    );
    assert_eq!(
        spawn(&h, CASE_LEAD_KEY, body).await.0,
        401,
        "its key stays revoked"
    );
}
