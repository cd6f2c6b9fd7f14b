//! Recorded provider exchanges replayed through Warden: the client receives the
//! recorded body byte for byte (less the usage chunk when it did not ask for one),
//! and Warden meters exactly the recorded usage.

use std::path::Path;

use serde_json::{Value, json};

use crate::common::*;

struct Fixture {
    name: String,
    meta: Value,
    request: Value,
    body: Vec<u8>,
}

/// Every OpenAI-compatible fixture (the Anthropic ones are for another endpoint).
fn openai_compatible_fixtures() -> Vec<Fixture> {
    let mut fixtures = Vec::new();
    for entry in std::fs::read_dir(fixtures_dir()).expect("fixtures are present") {
        let dir = entry.unwrap().path();
        let Ok(meta) = std::fs::read(dir.join("meta.json")) else {
            continue;
        };
        let meta: Value = serde_json::from_slice(&meta).unwrap();
        if meta["provider"] == "anthropic" {
            continue;
        }
        let request =
            serde_json::from_slice(&std::fs::read(dir.join("request.json")).unwrap()).unwrap();
        fixtures.push(Fixture {
            name: dir.file_name().unwrap().to_string_lossy().into_owned(),
            body: read_body(&dir),
            meta,
            request,
        });
    }
    fixtures.sort_by(|a, b| a.name.cmp(&b.name));
    assert!(fixtures.len() >= 14, "found {} fixtures", fixtures.len());
    fixtures
}

fn read_body(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("response.sse"))
        .or_else(|_| std::fs::read(dir.join("response.json")))
        .unwrap()
}

fn endpoint_path(meta: &Value) -> &'static str {
    let endpoint = meta["endpoint"].as_str().unwrap();
    if endpoint.ends_with("/chat/completions") {
        "/v1/chat/completions"
    } else if endpoint.ends_with("/responses") {
        "/v1/responses"
    } else if endpoint.ends_with("/embeddings") {
        "/v1/embeddings"
    } else {
        panic!("unexpected endpoint {endpoint}")
    }
}

/// The recorded body minus events that carry only usage (`choices: []`).
fn without_usage_chunks(body: &[u8]) -> Vec<u8> {
    let text = std::str::from_utf8(body).unwrap();
    let mut out = String::new();
    for event in text.split_inclusive("\n\n") {
        let data = event.trim().strip_prefix("data: ").unwrap_or("");
        let usage_only = serde_json::from_str::<Value>(data)
            .is_ok_and(|v| v["choices"] == json!([]) && !v["usage"].is_null());
        if !usage_only {
            out.push_str(event);
        }
    }
    out.into_bytes()
}

async fn replay(h: &Harness, fixture: &Fixture, request: &Value) -> (u16, Vec<u8>) {
    let mut request = request.clone();
    request["mock"] = json!({"replay": fixture.name});
    let response = h.post_json(endpoint_path(&fixture.meta), &request).await;
    let status = response.status().as_u16();
    (status, response.bytes().await.unwrap().to_vec())
}

/// Each recording, replayed as it was requested, arrives byte for byte and is metered
/// with exactly the recorded usage.
#[tokio::test]
async fn recorded_exchanges_replay_byte_for_byte() {
    let h = Harness::start().await;
    let fixtures = openai_compatible_fixtures();

    for fixture in &fixtures {
        let (status, body) = replay(&h, fixture, &fixture.request).await;
        assert_eq!(status, fixture.meta["http_status"], "{}", fixture.name);
        assert!(
            body == fixture.body,
            "{}: body differs from the recording",
            fixture.name
        );
    }

    let records = h.usage_records(fixtures.len()).await;
    let records = records["data"].as_array().unwrap();
    assert_eq!(records.len(), fixtures.len());
    // Records come newest first; fixtures were sent in order.
    for (fixture, record) in fixtures.iter().zip(records.iter().rev()) {
        let usage = &fixture.meta["usage"];
        let expect = |field: &str| usage[field].as_u64().unwrap_or(0);
        assert_eq!(
            record["model"], fixture.request["model"],
            "{}",
            fixture.name
        );
        assert_eq!(
            record["input_tokens"].as_u64(),
            Some(expect("input_tokens")),
            "{}",
            fixture.name
        );
        assert_eq!(
            record["output_tokens"].as_u64(),
            Some(expect("output_tokens")),
            "{}",
            fixture.name
        );
        assert_eq!(
            record["cached_tokens"].as_u64(),
            Some(expect("cached_tokens")),
            "{}",
            fixture.name
        );
        assert_eq!(record["usage_source"], "provider", "{}", fixture.name);
    }
}

/// A recorded chat stream that carried a usage chunk, requested without
/// `include_usage`: the client gets the recording less that chunk, and the usage
/// is still metered from it.
#[tokio::test]
async fn usage_chunk_is_stripped_when_not_asked() {
    let h = Harness::start().await;
    let streams: Vec<_> = openai_compatible_fixtures()
        .into_iter()
        .filter(|f| f.request["stream_options"]["include_usage"] == true)
        .collect();
    assert!(streams.len() >= 3);

    for fixture in &streams {
        let mut request = fixture.request.clone();
        request.as_object_mut().unwrap().remove("stream_options");
        let (status, body) = replay(&h, fixture, &request).await;
        assert_eq!(status, 200);
        let expected = without_usage_chunks(&fixture.body);
        assert!(
            expected.len() < fixture.body.len(),
            "{}: recording has a usage chunk",
            fixture.name
        );
        assert_eq!(
            String::from_utf8(body).unwrap(),
            String::from_utf8(expected).unwrap(),
            "{}",
            fixture.name
        );
    }

    let records = h.usage_records(streams.len()).await;
    for (fixture, record) in streams
        .iter()
        .zip(records["data"].as_array().unwrap().iter().rev())
    {
        assert_eq!(
            record["output_tokens"], fixture.meta["usage"]["output_tokens"],
            "{}",
            fixture.name
        );
        assert_eq!(record["usage_source"], "provider");
    }
}
