//! Policy reloads: a bad policy is refused with the line to fix and the old one stays
//! in force; a good one takes effect without a restart, by endpoint or SIGHUP.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::*;

async fn spawn_child(h: &Harness, name: &str) -> u16 {
    let body = json!({
        "parent": "lead",
        "name": name,
        "budget": {"daily_limit": "1.00"},
        "permissions": {"restrict_to": ["models.small"]},
        "lifecycle": {"max_duration": "1h"}
    });
    let response = reqwest::Client::new()
        .post(h.url("/v1/agents"))
        .bearer_auth(AGENT_KEY)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    response.status().as_u16()
}

/// The status of `GET /v1/models` with `key`.
async fn models(h: &Harness, key: &str) -> u16 {
    let response = reqwest::Client::new()
        .get(h.url("/v1/models"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    response.status().as_u16()
}

async fn reload(h: &Harness) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(h.url("/v1/policy/reload"))
        .bearer_auth(OPERATOR_KEY)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (
        status,
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap(),
    )
}

#[tokio::test]
async fn reload_refuses_a_bad_policy_and_applies_a_good_one() {
    let h = Harness::start().await;
    assert_eq!(spawn_child(&h, "one").await, 201);
    assert_eq!(spawn_child(&h, "two").await, 201);
    assert_eq!(
        spawn_child(&h, "three").await,
        403,
        "the lead may have two children"
    );

    let original = std::fs::read_to_string(h.policy_path()).unwrap();
    let bad = original.replacen(
        r#"allowed_scopes = ["models.small"]"#,
        r#"allowed_scopes = ["models.smal"]"#,
        1,
    );
    assert_ne!(bad, original);
    std::fs::write(h.policy_path(), &bad).unwrap();
    let (status, refused) = reload(&h).await;
    assert_eq!(
        (status, error_of(&refused)),
        (400, ("invalid_request_error", "invalid_policy"))
    );
    let message = refused["error"]["message"].as_str().unwrap();
    let line = bad[..bad.find("models.smal\"").unwrap()]
        .matches('\n')
        .count()
        + 1;
    assert!(
        message.contains(&format!("line {line}")) && message.contains("models.smal"),
        "{message}"
    );
    assert_eq!(
        spawn_child(&h, "three").await,
        403,
        "the old policy stays in force"
    );

    // A good policy, by SIGHUP: the lead may now have three children.
    let good = original.replacen("max_children = 2", "max_children = 3", 1);
    std::fs::write(h.policy_path(), &good).unwrap();
    h.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut status = spawn_child(&h, "three").await;
    while status != 201 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        status = spawn_child(&h, "three").await;
    }
    assert_eq!(status, 201, "SIGHUP put the new policy in force");

    let (status, reloaded) = reload(&h).await;
    assert_eq!(status, 200);
    assert!(
        reloaded["evidence_id"]
            .as_str()
            .unwrap()
            .starts_with("dec_")
    );
}

/// A lead's key is rotated by editing its `key_sha256` and reloading: the old key is
/// refused at once, the new one works, the change is recorded (by key hash prefix,
/// never the key), and it holds across a restart. A change made while Warden was down
/// is recorded at the next start.
#[tokio::test]
async fn reload_rotates_a_leads_key() {
    let mut h = Harness::start().await;
    let new_key = "e2e-agent-key-rotated";
    let policy = std::fs::read_to_string(h.policy_path()).unwrap();
    let rotated = policy.replacen(&sha256(AGENT_KEY), &sha256(new_key), 1);
    assert_ne!(rotated, policy);
    std::fs::write(h.policy_path(), rotated).unwrap();
    let (status, reloaded) = reload(&h).await;
    assert_eq!(status, 200, "{reloaded}");

    assert_eq!(
        models(&h, AGENT_KEY).await,
        401,
        "the old key is refused at once"
    );
    assert_eq!(models(&h, new_key).await, 200);
    let changes = h.decisions("key_change", Some(AGENT_ID));
    assert_eq!(changes.len(), 1);
    let details = &changes[0];
    assert_eq!(details["new_key_sha256_prefix"], sha256(new_key)[..16]);
    assert_eq!(details["old_key_sha256_prefix"], sha256(AGENT_KEY)[..16]);
    assert!(!changes[0].to_string().contains(new_key));

    h.crash();
    h.restart();
    assert_eq!(models(&h, AGENT_KEY).await, 401);
    assert_eq!(models(&h, new_key).await, 200);
    assert_eq!(
        h.decisions("key_change", Some(AGENT_ID)).len(),
        1,
        "nothing new to record"
    );

    // Changed while Warden was down: recorded at the next start.
    let third = "e2e-agent-key-third";
    h.crash();
    let policy = std::fs::read_to_string(h.policy_path()).unwrap();
    std::fs::write(
        h.policy_path(),
        policy.replacen(&sha256(new_key), &sha256(third), 1),
    )
    .unwrap();
    h.restart();
    assert_eq!(models(&h, new_key).await, 401);
    assert_eq!(models(&h, third).await, 200);
    let changes = h.decisions("key_change", Some(AGENT_ID));
    assert_eq!(changes.len(), 2);
    assert_eq!(changes[1]["reason"], "policy at start");
    assert_eq!(changes[1]["new_key_sha256_prefix"], sha256(third)[..16]);
}

/// With `unlisted_tools = "strip"`, a tool the agent's scopes do not grant is taken
/// out of the request and the rest is forwarded: the provider receives only the
/// granted tool.
#[tokio::test]
async fn strip_mode_forwards_only_granted_tools() {
    let h = Harness::start().await;
    let policy = std::fs::read_to_string(h.policy_path()).unwrap();
    let strip = policy.replacen(
        "trust_domain = \"e2e.test\"",
        "trust_domain = \"e2e.test\"\nunlisted_tools = \"strip\"",
        1,
    );
    std::fs::write(h.policy_path(), strip).unwrap();
    assert_eq!(reload(&h).await.0, 200);

    let tool =
        |name: &str| json!({"type": "function", "function": {"name": name, "parameters": {}}});
    let body = json!({
        "model": "mock-small",
        "messages": [{"role": "user", "content": "quote please"}],
        "tools": [tool("get_quote"), tool("transfer_funds")],
        "mock": {"tag": "strip"}
    });
    let response = reqwest::Client::new()
        .post(h.url("/v1/chat/completions"))
        .bearer_auth(CASE_LEAD_KEY)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let received = &h.mock.truth("strip").per_request[0].body;
    let names: Vec<&str> = received["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["get_quote"]);
    assert_eq!(
        received["messages"], body["messages"],
        "the rest is untouched"
    );
}

/// Two leads may swap keys in one reload; a lead may not take the operator's key.
#[tokio::test]
async fn reload_swaps_lead_keys_and_refuses_the_operators() {
    let h = Harness::start().await;
    let policy = std::fs::read_to_string(h.policy_path()).unwrap();
    let (lead, limited) = (sha256(AGENT_KEY), sha256(LIMITED_KEY));
    let swapped = policy
        .replacen(&lead, "SWAP", 1)
        .replacen(&limited, &lead, 1)
        .replacen("SWAP", &limited, 1);
    std::fs::write(h.policy_path(), &swapped).unwrap();
    assert_eq!(reload(&h).await.0, 200);

    let view = |path: &'static str, key: &'static str| {
        let h = &h;
        async move { call(h, reqwest::Method::GET, path, key, None).await.0 }
    };
    assert_eq!(
        view("/v1/agents/lead", LIMITED_KEY).await,
        200,
        "the limited key is the lead's now"
    );
    assert_eq!(view("/v1/agents/limited", AGENT_KEY).await, 200);
    assert_eq!(h.decisions("key_change", None).len(), 2);

    let operator = swapped.replacen(&limited, &sha256(OPERATOR_KEY), 1);
    std::fs::write(h.policy_path(), operator).unwrap();
    let (status, refused) = reload(&h).await;
    assert_eq!(
        (status, error_of(&refused).1),
        (400, "invalid_policy"),
        "{refused}"
    );
    assert_eq!(
        view("/v1/agents/lead", LIMITED_KEY).await,
        200,
        "the old policy stays"
    );
}
