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
