//! SIEM delivery: a webhook receiver that is down while a thousand decisions happen,
//! and while Warden is killed and restarted, still gets every one of them, in order,
//! at least once, each with a stable id.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use serde_json::{Value, json};

use crate::common::*;

/// Refused spawns: the quickest decisions to make, each a ledger entry.
async fn decisions(h: &Harness, n: usize) {
    let url = h.url("/v1/agents");
    let mut batch = Vec::new();
    for i in 0..n {
        let url = url.clone();
        batch.push(async move {
            let body = json!({"parent": "lead-quarterly-orchestrator", "name": format!("d-{i}"),
                "budget": {"daily_limit": "1.00"}, "trust": {"initial_level": "TRUSTED"}});
            let response = reqwest::Client::new()
                .post(url)
                .bearer_auth(CASE_LEAD_KEY)
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 403);
        });
        if batch.len() == 20 {
            futures_util::future::join_all(std::mem::take(&mut batch)).await;
        }
    }
    futures_util::future::join_all(batch).await;
}

#[tokio::test]
async fn a_receiver_that_was_down_gets_every_decision_in_order() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sink = format!(
        "[[sinks]]\nname = \"siem\"\nkind = \"webhook\"\nurl = \"http://127.0.0.1:{port}/ingest\"\nformat = \"jsonl\"\nbatch = 100\n"
    );
    let mut h = Harness::start_with(&sink).await;

    decisions(&h, 500).await;
    h.crash();
    h.restart();
    decisions(&h, 500).await;

    // The receiver comes up only now.
    let received: Arc<Mutex<Vec<Value>>> = Arc::default();
    let store = Arc::clone(&received);
    let app = Router::new().route(
        "/ingest",
        post(move |body: String| {
            let store = Arc::clone(&store);
            async move {
                let mut events = store.lock().unwrap();
                events.extend(
                    body.lines()
                        .map(|l| serde_json::from_str::<Value>(l).unwrap()),
                );
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen: BTreeSet<u64> = received
            .lock()
            .unwrap()
            .iter()
            .map(|e| e["metadata"]["sequence"].as_u64().unwrap())
            .collect();
        if seen.len() >= 1000 || Instant::now() > deadline {
            assert_eq!(
                seen,
                (1..=1000).collect::<BTreeSet<u64>>(),
                "every decision, at least once"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let events = received.lock().unwrap().clone();
    let mut first_seen = Vec::new();
    for event in &events {
        let seq = event["metadata"]["sequence"].as_u64().unwrap();
        if !first_seen.contains(&seq) {
            first_seen.push(seq);
        }
        assert_eq!(event["class_uid"], 6003);
        assert_eq!(
            event["metadata"]["uid"]
                .as_str()
                .unwrap()
                .rsplit('-')
                .next()
                .unwrap(),
            seq.to_string()
        );
    }
    assert!(
        first_seen.windows(2).all(|w| w[0] < w[1]),
        "delivered in ledger order"
    );
}

/// The syslog sink sends well-formed RFC 5424 messages (parsed here by a maintained
/// parser), framed by octet counting, one per decision, in order.
#[tokio::test]
async fn syslog_receiver_gets_rfc_5424_messages() {
    use syslog_rfc5424::{SyslogFacility, SyslogSeverity};
    use tokio::io::AsyncReadExt;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let received: Arc<Mutex<Vec<String>>> = Arc::default();
    let store = Arc::clone(&received);
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut bytes = Vec::new();
            socket.read_to_end(&mut bytes).await.unwrap();
            let mut text = String::from_utf8(bytes).unwrap();
            // Octet counting: "<length> <message>", repeated.
            while let Some((length, rest)) = text.split_once(' ') {
                let length: usize = length.parse().unwrap();
                store.lock().unwrap().push(rest[..length].to_owned());
                text = rest[length..].to_owned();
            }
        }
    });

    let sink = format!(
        "[[sinks]]\nname = \"syslog\"\nkind = \"syslog\"\naddress = \"127.0.0.1:{port}\"\n"
    );
    let h = Harness::start_with(&sink).await;
    decisions(&h, 5).await;

    let deadline = Instant::now() + Duration::from_secs(20);
    while received.lock().unwrap().len() < 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let messages = received.lock().unwrap().clone();
    assert_eq!(messages.len(), 5, "{messages:?}");
    for (n, text) in messages.iter().enumerate() {
        let message =
            syslog_rfc5424::parse_message(text).unwrap_or_else(|e| panic!("{e:?}: {text}"));
        assert_eq!(message.facility, SyslogFacility::LOG_AUDIT);
        assert_eq!(message.severity, SyslogSeverity::SEV_INFO);
        assert_eq!(message.appname.as_deref(), Some("warden"));
        assert_eq!(message.msgid.as_deref(), Some("spawn_refused"));
        assert!(message.timestamp.is_some());
        let seq = message.sd.find_tuple("warden@32473", "seq").unwrap();
        assert_eq!(seq, &(n + 1).to_string());
        let event: Value = serde_json::from_str(&message.msg).unwrap();
        assert_eq!(event["metadata"]["sequence"], n as u64 + 1);
    }
}

/// The file sink appends one OCSF event per decision, as JSON lines, in order.
#[tokio::test]
async fn file_sink_writes_ocsf_json_lines() {
    let out = std::env::temp_dir().join(format!("warden-file-sink-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let sink = format!(
        "[[sinks]]\nname = \"archive\"\nkind = \"file\"\npath = \"{}\"\n",
        out.display()
    );
    let h = Harness::start_with(&sink).await;
    decisions(&h, 3).await;

    let deadline = Instant::now() + Duration::from_secs(20);
    let mut lines = Vec::new();
    while lines.len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        lines = std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
    }
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (n, line) in lines.iter().enumerate() {
        let event: Value = serde_json::from_str(line).unwrap();
        assert_eq!(event["class_uid"], 6003);
        assert_eq!(event["metadata"]["sequence"], n as u64 + 1);
        assert_eq!(event["unmapped"]["entry"]["kind"], "spawn_refused");
    }
    std::fs::remove_file(&out).unwrap();
}
