//! SIEM delivery: a webhook receiver that is down while a thousand decisions happen,
//! and while Warden is killed and restarted, still gets every one of them, in order,
//! at least once, each with a stable id.

use std::collections::BTreeSet;
use std::path::Path;
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
    serve_receiver(port, app).await;

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

/// A syslog receiver on loopback: every connection's octet-counted frames (RFC 6587),
/// read through TLS when `tls` is given. Returns its port and the messages so far.
async fn syslog_receiver(tls: Option<tokio_rustls::TlsAcceptor>) -> (u16, Arc<Mutex<Vec<String>>>) {
    use tokio::io::AsyncReadExt;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let received: Arc<Mutex<Vec<String>>> = Arc::default();
    let store = Arc::clone(&received);
    tokio::spawn(async move {
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            let mut bytes = Vec::new();
            let read = match &tls {
                None => {
                    let mut socket = socket;
                    socket.read_to_end(&mut bytes).await.map(|_| ())
                }
                Some(acceptor) => match acceptor.accept(socket).await {
                    Ok(mut stream) => stream.read_to_end(&mut bytes).await.map(|_| ()),
                    Err(e) => Err(e),
                },
            };
            if read.is_err() {
                continue;
            }
            let mut text = String::from_utf8(bytes).unwrap();
            // Octet counting: "<length> <message>", repeated.
            while let Some((length, rest)) = text.split_once(' ') {
                let length: usize = length.parse().unwrap();
                store.lock().unwrap().push(rest[..length].to_owned());
                text = rest[length..].to_owned();
            }
        }
    });
    (port, received)
}

/// Waits for `n` messages, then checks each is RFC 5424 as Warden writes it, in order.
async fn assert_rfc_5424(received: &Mutex<Vec<String>>, n: usize) {
    use syslog_rfc5424::{SyslogFacility, SyslogSeverity};

    let deadline = Instant::now() + Duration::from_secs(20);
    while received.lock().unwrap().len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let messages = received.lock().unwrap().clone();
    assert_eq!(messages.len(), n, "{messages:?}");
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

/// The syslog sink sends well-formed RFC 5424 messages (parsed here by a maintained
/// parser), framed by octet counting, one per decision, in order.
#[tokio::test]
async fn syslog_receiver_gets_rfc_5424_messages() {
    let (port, received) = syslog_receiver(None).await;
    let sink = format!(
        "[[sinks]]\nname = \"syslog\"\nkind = \"syslog\"\naddress = \"127.0.0.1:{port}\"\n"
    );
    let h = Harness::start_with(&sink).await;
    decisions(&h, 5).await;
    assert_rfc_5424(&received, 5).await;
}

/// Syslog over TLS: the receiver's certificate is checked against the trusted roots
/// (here a test CA given by `SSL_CERT_FILE`) and the name configured; a Warden that
/// does not trust the CA delivers nothing.
#[tokio::test]
async fn syslog_over_tls_checks_the_receiver() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let tls = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls");
    let chain: Vec<_> = CertificateDer::pem_file_iter(tls.join("server.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(tls.join("server.key")).unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let sink = |port: u16| {
        format!(
            "[[sinks]]\nname = \"syslog-tls\"\nkind = \"syslog\"\naddress = \"127.0.0.1:{port}\"\n\
             tls = true\nserver_name = \"localhost\"\n"
        )
    };

    let (port, received) = syslog_receiver(Some(acceptor.clone())).await;
    let ca = tls.join("ca.pem");
    let env = [("SSL_CERT_FILE", ca.to_str().unwrap())];
    let h = Harness::start_with_env(&sink(port), &env).await;
    decisions(&h, 5).await;
    assert_rfc_5424(&received, 5).await;

    let (port, refused) = syslog_receiver(Some(acceptor)).await;
    let untrusting = Harness::start_with(&sink(port)).await;
    decisions(&untrusting, 2).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        refused.lock().unwrap().is_empty(),
        "an untrusted receiver got events"
    );
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

/// Serves `app` as a receiver on loopback `port`, in the background.
async fn serve_receiver(port: u16, app: Router) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
}

/// A free loopback port for a receiver that starts later.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `seen` (sequence numbers received) holds `expected`, or fails after 30 s.
async fn until_all_seen(seen: impl Fn() -> BTreeSet<u64>, expected: BTreeSet<u64>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen().len() < expected.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen(), expected);
}

/// The Splunk HEC preset, against a receiver that answers as HEC does: the token in
/// `Authorization: Splunk`, one `{"time", "sourcetype", "event"}` object per event,
/// `{"text":"Success","code":0}` on success; a 503 "server is busy" is retried.
#[tokio::test]
async fn splunk_hec_receiver_gets_every_event() {
    use axum::http::{HeaderMap, StatusCode};

    let port = free_port();
    let received: Arc<Mutex<(usize, Vec<Value>)>> = Arc::default();
    let store = Arc::clone(&received);
    let app = Router::new().route(
        "/services/collector/event",
        post(move |headers: HeaderMap, body: String| {
            let store = Arc::clone(&store);
            async move {
                let authorization = headers.get("authorization").and_then(|v| v.to_str().ok());
                if authorization != Some(&format!("Splunk {MOCK_KEY}")) {
                    let refusal = json!({"text": "Invalid authorization", "code": 3});
                    return (StatusCode::UNAUTHORIZED, refusal.to_string());
                }
                let mut state = store.lock().unwrap();
                state.0 += 1;
                if state.0 == 1 {
                    let busy = json!({"text": "Server is busy", "code": 9});
                    return (StatusCode::SERVICE_UNAVAILABLE, busy.to_string());
                }
                // HEC takes events back to back, whitespace between them optional.
                let events = serde_json::Deserializer::from_str(&body).into_iter::<Value>();
                state.1.extend(events.map(Result::unwrap));
                (
                    StatusCode::OK,
                    json!({"text": "Success", "code": 0}).to_string(),
                )
            }
        }),
    );
    serve_receiver(port, app).await;

    let sink = format!(
        "[[sinks]]\nname = \"splunk\"\nkind = \"webhook\"\nformat = \"splunk_hec\"\n\
         url = \"http://127.0.0.1:{port}/services/collector/event\"\ntoken_env = \"WARDEN_E2E_MOCK_KEY\"\n"
    );
    let h = Harness::start_with(&sink).await;
    decisions(&h, 30).await;

    let seen = || {
        let state = received.lock().unwrap();
        state
            .1
            .iter()
            .map(|e| e["event"]["metadata"]["sequence"].as_u64().unwrap())
            .collect()
    };
    until_all_seen(seen, (1..=30).collect()).await;
    let state = received.lock().unwrap();
    assert!(state.0 >= 2, "the busy answer was retried");
    for hec in &state.1 {
        assert_eq!(hec["sourcetype"], "warden:ledger");
        assert_eq!(hec["event"]["class_uid"], 6003);
        let time_ms = hec["event"]["time"].as_f64().unwrap();
        assert_eq!(hec["time"].as_f64().unwrap(), time_ms / 1e3);
    }
}

/// The Elastic `_bulk` preset, against a receiver that answers as Elasticsearch does:
/// an `index` action with the index and the event id before each event; an answer of
/// 200 with `errors: true` (one item rejected with 429, as a busy cluster does) is not
/// an acknowledgement, and the rejected event comes again. An event refused with 400
/// (a mapping error, refused however often it comes) is skipped and counted, and
/// does not hold up the ones after it, also when it is the only one in its batch.
#[tokio::test]
async fn elastic_bulk_receiver_gets_every_event() {
    let port = free_port();
    // (requests, (action, document) pairs indexed, the id rejected once).
    type Indexed = (usize, Vec<(Value, Value)>, Option<String>);
    let received: Arc<Mutex<Indexed>> = Arc::default();
    let store = Arc::clone(&received);
    let app = Router::new().route(
        "/_bulk",
        post(move |body: String| {
            let store = Arc::clone(&store);
            async move {
                let lines: Vec<Value> = body
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect();
                let mut state = store.lock().unwrap();
                state.0 += 1;
                let reject_first = state.0 == 1;
                let mut items = Vec::new();
                let mut errors = reject_first;
                for (n, pair) in lines.chunks(2).enumerate() {
                    let id = pair[0]["index"]["_id"].clone();
                    if pair[1]["metadata"]["sequence"] == 5 {
                        errors = true;
                        items.push(json!({"index": {"_id": id, "status": 400, "error": {
                            "type": "mapper_parsing_exception", "reason": "failed to parse"}}}));
                    } else if reject_first && n == 0 {
                        state.2 = id.as_str().map(str::to_owned);
                        items.push(json!({"index": {"_id": id, "status": 429, "error": {
                            "type": "es_rejected_execution_exception", "reason": "queue full"}}}));
                    } else {
                        state.1.push((pair[0].clone(), pair[1].clone()));
                        items.push(
                            json!({"index": {"_id": id, "status": 201, "result": "created"}}),
                        );
                    }
                }
                json!({"took": 3, "errors": errors, "items": items}).to_string()
            }
        }),
    );
    serve_receiver(port, app).await;

    let sink = format!(
        "[[sinks]]\nname = \"elastic\"\nkind = \"webhook\"\nformat = \"elastic_bulk\"\n\
         url = \"http://127.0.0.1:{port}/_bulk\"\nindex = \"warden-audit\"\n"
    );
    let h = Harness::start_with(&sink).await;
    let seen = || {
        let state = received.lock().unwrap();
        state
            .1
            .iter()
            .map(|(_, doc)| doc["metadata"]["sequence"].as_u64().unwrap())
            .collect()
    };
    decisions(&h, 4).await;
    until_all_seen(seen, (1..=4).collect()).await;

    // Entry 5 goes alone, is refused whole, then alone again, and only then skipped.
    decisions(&h, 1).await;
    let dropped = "warden_sink_dropped_entries_total{sink=\"elastic\"} 1";
    let metrics = until_metrics(&h, &[dropped]).await;
    assert!(metrics.contains(dropped), "{metrics}");
    decisions(&h, 25).await;
    until_all_seen(seen, (1..=30).filter(|&seq| seq != 5).collect()).await;

    let state = received.lock().unwrap();
    for (action, doc) in &state.1 {
        assert_eq!(action["index"]["_index"], "warden-audit");
        assert_eq!(action["index"]["_id"], doc["metadata"]["uid"]);
    }
    let rejected = state.2.as_deref().expect("one item was rejected");
    assert!(
        state
            .1
            .iter()
            .any(|(action, _)| action["index"]["_id"] == rejected),
        "the rejected event was sent again and indexed"
    );
}

/// An Elastic index whose mapping refuses every event: three events refused alone are
/// skipped, then the sink stops skipping and waits, its lag showing what is held back,
/// and once the mapping is fixed the held-back events arrive.
#[tokio::test]
async fn a_broken_elastic_mapping_stalls_the_sink_instead_of_dropping_the_stream() {
    let port = free_port();
    let broken = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let indexed: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    let (mapping, store) = (Arc::clone(&broken), Arc::clone(&indexed));
    let app = Router::new().route(
        "/_bulk",
        post(move |body: String| {
            let (mapping, store) = (Arc::clone(&mapping), Arc::clone(&store));
            async move {
                let lines: Vec<Value> = body
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect();
                let refuse = mapping.load(std::sync::atomic::Ordering::SeqCst);
                let items: Vec<Value> = lines
                    .chunks(2)
                    .map(|pair| {
                        let id = pair[0]["index"]["_id"].clone();
                        if refuse {
                            return json!({"index": {"_id": id, "status": 400, "error": {
                                "type": "mapper_parsing_exception", "reason": "failed to parse"}}});
                        }
                        let seq = pair[1]["metadata"]["sequence"].as_u64().unwrap();
                        store.lock().unwrap().insert(seq);
                        json!({"index": {"_id": id, "status": 201, "result": "created"}})
                    })
                    .collect();
                json!({"took": 1, "errors": refuse, "items": items}).to_string()
            }
        }),
    );
    serve_receiver(port, app).await;

    let sink = format!(
        "[[sinks]]\nname = \"elastic\"\nkind = \"webhook\"\nformat = \"elastic_bulk\"\n\
         url = \"http://127.0.0.1:{port}/_bulk\"\n"
    );
    let h = Harness::start_with(&sink).await;
    decisions(&h, 2).await;
    until_all_seen(|| indexed.lock().unwrap().clone(), (1..=2).collect()).await;

    broken.store(true, std::sync::atomic::Ordering::SeqCst);
    decisions(&h, 6).await;
    let stalled = [
        "warden_sink_dropped_entries_total{sink=\"elastic\"} 3",
        "warden_sink_lag_entries{sink=\"elastic\"} 3",
    ];
    let metrics = until_metrics(&h, &stalled).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later = until_metrics(&h, &stalled).await;
    assert!(
        stalled
            .iter()
            .all(|m| metrics.contains(m) && later.contains(m)),
        "{later}"
    );

    broken.store(false, std::sync::atomic::Ordering::SeqCst);
    until_all_seen(
        || indexed.lock().unwrap().clone(),
        BTreeSet::from([1, 2, 6, 7, 8]),
    )
    .await;
}

/// The metrics text once it holds every line of `expected`, or after 10 s.
async fn until_metrics(h: &Harness, expected: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = h.metrics().await;
        if expected.iter().all(|m| metrics.contains(m)) || Instant::now() > deadline {
            return metrics;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
