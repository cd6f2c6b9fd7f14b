//! The mock over HTTP: keys, faults, replay, ground truth, and the
//! Responses, Embeddings and Models endpoints.

use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};

use super::MockConfig;
use super::stream::MALFORMED_EVENT;
use super::testkit::{fixtures_dir, post, send, send_bytes, start};

fn chat(mock: Value, stream: bool) -> Value {
    json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "one two three four"}],
        "stream": stream,
        "mock": mock,
    })
}

#[tokio::test]
async fn wrong_or_missing_key_gets_an_openai_401() {
    let config = MockConfig {
        api_key: Some("sekret".into()),
        ..MockConfig::default()
    };
    let mock = start(config).await;
    let path = "/v1/chat/completions";

    let missing = send(mock.addr(), "POST", path, None, &chat(json!({}), false)).await;
    assert_eq!(missing.status, 401);
    let error = &missing.json()["error"];
    assert_eq!(
        (&error["type"], &error["code"]),
        (&json!("invalid_request_error"), &json!("invalid_api_key"))
    );
    assert!(error["param"].is_null() && error["message"].is_string());

    let wrong = send(
        mock.addr(),
        "POST",
        path,
        Some("nope"),
        &chat(json!({}), false),
    )
    .await;
    assert_eq!(wrong.status, 401);
    let right = send(
        mock.addr(),
        "POST",
        path,
        Some("sekret"),
        &chat(json!({}), false),
    )
    .await;
    assert_eq!(right.status, 200);
    assert_eq!(
        mock.truth("").per_request[0].authorization.as_deref(),
        Some("Bearer sekret")
    );
    assert_eq!(
        mock.truth("").requests,
        1,
        "rejected requests are not admitted"
    );
}

#[tokio::test]
async fn error_faults_answer_openai_errors_and_count_no_tokens() {
    let mock = start(MockConfig::default()).await;
    let path = "/v1/chat/completions";

    let limited = post(
        mock.addr(),
        path,
        &chat(json!({"fault": "rate_limit", "tag": "f"}), true),
    )
    .await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.headers["retry-after"], "1");
    assert_eq!(limited.json()["error"]["code"], "rate_limit_exceeded");

    let failed = post(
        mock.addr(),
        path,
        &chat(json!({"fault": "server_error", "tag": "f"}), false),
    )
    .await;
    assert_eq!(failed.status, 500);
    assert_eq!(failed.json()["error"]["type"], "server_error");

    let bad = post(
        mock.addr(),
        path,
        &chat(json!({"fault": "bad_request", "tag": "f"}), false),
    )
    .await;
    assert_eq!(bad.status, 400);
    assert_eq!(
        bad.json(),
        json!({"error": {"message": "mock bad request", "type": "invalid_request_error",
                         "param": "messages", "code": "invalid_value"}})
    );

    let truth = mock.truth("f");
    assert_eq!(truth.requests, 3);
    assert_eq!(
        (truth.prompt_tokens, truth.completion_tokens_generated),
        (0, 0)
    );
}

#[tokio::test]
async fn slow_headers_delays_the_answer() {
    let mock = start(MockConfig::default()).await;
    let started = std::time::Instant::now();
    let body = chat(
        json!({"fault": "slow_headers", "delay_ms": 150, "tokens": 1}),
        false,
    );
    let reply = post(mock.addr(), "/v1/chat/completions", &body).await;
    assert_eq!(reply.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn disconnect_after_aborts_the_body_after_n_token_events() {
    let mock = start(MockConfig::default()).await;
    let body = chat(
        json!({"tokens": 10, "fault": "disconnect_after", "after": 3, "tag": "d"}),
        true,
    );
    let reply = post(mock.addr(), "/v1/chat/completions", &body).await;

    assert_eq!(reply.status, 200);
    assert!(
        reply.error.is_some(),
        "the body must end in an error, not cleanly"
    );
    assert_eq!(
        reply.chunks.len(),
        1 + 3,
        "role chunk and three tokens, then the cut"
    );
    assert!(
        !String::from_utf8(reply.bytes())
            .expect("utf-8")
            .contains("[DONE]")
    );

    let truth = mock.truth("d");
    assert_eq!(truth.completion_tokens_generated, 3);
    assert!(truth.completion_tokens_sent <= 3);
    assert!(!truth.per_request[0].finished);
}

#[tokio::test]
async fn malformed_after_sends_a_broken_event_then_ends_cleanly() {
    let mock = start(MockConfig::default()).await;
    let body = chat(
        json!({"tokens": 10, "fault": "malformed_after", "after": 2, "tag": "m"}),
        true,
    );
    let reply = post(mock.addr(), "/v1/chat/completions", &body).await;

    assert!(reply.error.is_none());
    assert_eq!(reply.chunks.len(), 1 + 2 + 1);
    assert_eq!(reply.chunks.last().map(|c| &c[..]), Some(MALFORMED_EVENT));
    let truth = mock.truth("m");
    assert_eq!(
        (
            truth.completion_tokens_generated,
            truth.completion_tokens_sent
        ),
        (2, 2)
    );
    assert!(!truth.per_request[0].finished);
}

#[tokio::test]
async fn replay_is_byte_for_byte_and_one_event_per_chunk() {
    let config = MockConfig {
        fixtures: Some(fixtures_dir()),
        ..MockConfig::default()
    };
    let mock = start(config).await;

    for name in [
        "openai-chat-stream-text-01",
        "openai-responses-stream-text-01",
        "openai-chat-text-01",
    ] {
        let folder = fixtures_dir().join(name);
        let meta: Value =
            serde_json::from_slice(&std::fs::read(folder.join("meta.json")).expect("meta"))
                .expect("json");
        let sse = std::fs::read(folder.join("response.sse"));
        let recorded = sse.as_ref().map_or_else(
            |_| std::fs::read(folder.join("response.json")).expect("body"),
            Vec::clone,
        );

        let body =
            json!({"model": "gpt-4o-mini", "stream": true, "mock": {"replay": name, "tag": name}});
        let reply = post(
            mock.addr(),
            meta["endpoint"].as_str().expect("endpoint"),
            &body,
        )
        .await;

        assert_eq!(reply.status.as_u16(), meta["http_status"]);
        assert_eq!(
            reply.headers["content-type"],
            meta["content_type"].as_str().expect("type")
        );
        assert_eq!(reply.bytes(), recorded, "{name} differs from the recording");
        if sse.is_ok() {
            let events = recorded.windows(2).filter(|w| w == b"\n\n").count();
            assert_eq!(reply.chunks.len(), events, "{name}: one chunk per event");
        }

        let truth = mock.truth(name);
        assert_eq!(truth.prompt_tokens, meta["usage"]["input_tokens"]);
        assert_eq!(truth.completion_tokens_sent, meta["usage"]["output_tokens"]);
        assert!(truth.per_request[0].finished);
    }
}

#[tokio::test]
async fn replay_of_an_unknown_fixture_is_a_400() {
    let config = MockConfig {
        fixtures: Some(fixtures_dir()),
        ..MockConfig::default()
    };
    let mock = start(config).await;
    let reply = post(
        mock.addr(),
        "/v1/chat/completions",
        &json!({"mock": {"replay": "../nope"}}),
    )
    .await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["param"], "mock.replay");
}

#[tokio::test]
async fn truth_counts_tokens_and_is_served_over_http() {
    let mock = start(MockConfig::default()).await;
    let path = "/v1/chat/completions";
    post(
        mock.addr(),
        path,
        &chat(json!({"tokens": 5, "tag": "t"}), true),
    )
    .await;
    post(
        mock.addr(),
        path,
        &chat(json!({"tokens": 7, "tag": "t"}), false),
    )
    .await;
    post(
        mock.addr(),
        path,
        &chat(json!({"tokens": 1, "tag": "other"}), false),
    )
    .await;

    let truth = mock.truth("t");
    assert_eq!(truth.requests, 2);
    assert_eq!(truth.prompt_tokens, 8);
    assert_eq!(
        (
            truth.completion_tokens_generated,
            truth.completion_tokens_sent
        ),
        (12, 12)
    );
    let first = &truth.per_request[0];
    assert!(first.stream && first.finished);
    assert_eq!(
        (first.endpoint.as_str(), first.model.as_str()),
        ("/v1/chat/completions", "gpt-4o-mini")
    );
    assert_eq!(first.body["mock"]["tokens"], 5);
    assert!(first.id.starts_with("chatcmpl-mock-"));

    let served = send(mock.addr(), "GET", "/mock/truth?tag=t", None, &Value::Null)
        .await
        .json();
    assert_eq!(served["completion_tokens_sent"], 12);
    let all = send(mock.addr(), "GET", "/mock/truth", None, &Value::Null)
        .await
        .json();
    assert_eq!(all["requests"], 3);

    let cleared = send(mock.addr(), "DELETE", "/mock/truth", None, &Value::Null).await;
    assert_eq!(cleared.status, 204);
    assert_eq!(mock.truth_all().requests, 0);
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_leaves_the_request_unfinished() {
    let mock = start(MockConfig::default()).await;
    let body = chat(
        json!({"tokens": 1000, "token_delay_us": 2000, "tag": "gone"}),
        true,
    );
    let addr = mock.addr();
    let reader = tokio::spawn(async move { post(addr, "/v1/chat/completions", &body).await });
    tokio::time::sleep(Duration::from_millis(60)).await;
    reader.abort();
    tokio::time::sleep(Duration::from_millis(60)).await;

    let truth = mock.truth("gone");
    assert!(truth.completion_tokens_generated > 0 && truth.completion_tokens_generated < 1000);
    assert!(truth.completion_tokens_sent <= truth.completion_tokens_generated);
    assert!(!truth.per_request[0].finished);
}

#[tokio::test]
async fn responses_stream_mirrors_openai_events() {
    let mock = start(MockConfig::default()).await;
    let body = json!({"model": "gpt-5.2", "input": [{"role": "user", "content": "What is 2+2?"}],
                      "instructions": "Answer directly.", "stream": true, "mock": {"tokens": 3}});
    let reply = post(mock.addr(), "/v1/responses", &body).await;
    assert_eq!(reply.status, 200);

    let events = reply.events();
    let data = reply.data();
    let kinds: Vec<&str> = data
        .iter()
        .map(|d| d["type"].as_str().expect("type"))
        .collect();
    assert_eq!(
        kinds,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    for (index, (event, data)) in events.iter().zip(&data).enumerate() {
        assert_eq!(
            event.lines().next(),
            Some(format!("event: {}", kinds[index]).as_str())
        );
        assert_eq!(data["sequence_number"], index);
    }
    let deltas: String = data.iter().filter_map(|d| d["delta"].as_str()).collect();
    assert_eq!(deltas, "alpha bravo charlie");
    assert_eq!(data[7]["text"], "alpha bravo charlie");

    let done = &data[10]["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["instructions"], "Answer directly.");
    assert_eq!(
        done["usage"],
        json!({"input_tokens": 3, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 3,
               "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 6})
    );
    assert!(data[0]["response"]["usage"].is_null());
}

#[tokio::test]
async fn whole_response_carries_output_and_usage() {
    let mock = start(MockConfig::default()).await;
    let body = json!({"model": "gpt-4o", "input": "hi there", "mock": {"tokens": 2}});
    let response = post(mock.addr(), "/v1/responses", &body).await.json();
    assert_eq!(response["object"], "response");
    assert_eq!(response["status"], "completed");
    assert_eq!(response["output"][0]["content"][0]["text"], "alpha bravo");
    assert_eq!(response["usage"]["total_tokens"], 4);

    let capped = json!({"input": "hi", "max_output_tokens": 1, "mock": {"tokens": 2}});
    let response = post(mock.addr(), "/v1/responses", &capped).await.json();
    assert_eq!(response["status"], "incomplete");
    assert_eq!(
        response["incomplete_details"]["reason"],
        "max_output_tokens"
    );
    assert_eq!(response["usage"]["output_tokens"], 1);
}

#[tokio::test]
async fn embeddings_and_models_are_openai_shaped() {
    let mock = start(MockConfig::default()).await;
    let body = json!({"model": "text-embedding-3-small", "input": ["a b", "c"]});
    let list = post(mock.addr(), "/v1/embeddings", &body).await.json();
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(list["data"][1]["index"], 1);
    assert_eq!(
        list["data"][0]["embedding"].as_array().map(Vec::len),
        Some(8)
    );
    assert_eq!(
        list["usage"],
        json!({"prompt_tokens": 3, "total_tokens": 3})
    );

    let models = send(mock.addr(), "GET", "/v1/models", None, &Value::Null)
        .await
        .json();
    assert_eq!(models["object"], "list");
    assert!(models["data"].as_array().is_some_and(|m| !m.is_empty()));
}

#[tokio::test]
async fn invalid_json_and_unknown_urls_get_openai_errors() {
    let mock = start(MockConfig::default()).await;
    let path = "/v1/chat/completions";
    let reply = send_bytes(
        mock.addr(),
        "POST",
        path,
        None,
        Bytes::from_static(b"{nope"),
    )
    .await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["type"], "invalid_request_error");

    let bad_mock = post(mock.addr(), path, &json!({"mock": {"tokens": "many"}})).await;
    assert_eq!(bad_mock.status, 400);
    assert_eq!(bad_mock.json()["error"]["param"], "mock");

    let unknown = post(mock.addr(), "/v1/nothing", &json!({})).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"]["code"], "unknown_url");
    assert_eq!(mock.truth_all().requests, 0, "none of these is admitted");
}

#[tokio::test]
async fn dropping_the_mock_stops_the_server() {
    let mock = start(MockConfig::default()).await;
    let addr = mock.addr();
    assert!(mock.base_url().starts_with("http://127.0.0.1:") && mock.base_url().ends_with("/v1"));
    drop(mock);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
