//! Every error a client can get: status, OpenAI `type` and `code`, checked through
//! raw HTTP and, where an SDK user would meet it, through async-openai's typed error.

use async_openai::error::OpenAIError;
use async_openai::types::chat::CreateChatCompletionResponse;
use serde_json::{Value, json};

use crate::common::*;

async fn status_and_body(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap();
    let body = serde_json::from_slice(&body)
        .unwrap_or_else(|_| panic!("error body is JSON: {}", String::from_utf8_lossy(&body)));
    (status, body)
}

fn chat(model: &str, mock: Value) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "mock": mock})
}

/// The SDK's typed error for a request: status, type and code.
async fn sdk_error(h: &Harness, key: &str, body: Value) -> (u16, String, String) {
    let result = h
        .client(key)
        .chat()
        .create_byot::<_, CreateChatCompletionResponse>(body)
        .await;
    match result {
        // async-openai leaves 5xx bodies unparsed, in `message`; parse them here.
        Err(OpenAIError::ApiError(e)) if e.status_code.is_server_error() => {
            let body: Value = serde_json::from_str(&e.api_error.message).expect("5xx body is JSON");
            let (kind, code) = error_of(&body);
            (e.status_code.as_u16(), kind.to_owned(), code.to_owned())
        }
        Err(OpenAIError::ApiError(e)) => (
            e.status_code.as_u16(),
            e.api_error.r#type.unwrap_or_default(),
            e.api_error.code.unwrap_or_default(),
        ),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn client_errors_are_openai_shaped() {
    let h = Harness::start().await;

    let (status, body) =
        status_and_body(h.post("/v1/chat/completions", "{\"model\": ").await).await;
    assert_eq!(
        (status, error_of(&body)),
        (400, ("invalid_request_error", "invalid_json"))
    );

    let missing_model = json!({"messages": []});
    let (status, body) =
        status_and_body(h.post_json("/v1/chat/completions", &missing_model).await).await;
    assert_eq!(
        (status, error_of(&body)),
        (400, ("invalid_request_error", "missing_required_parameter"))
    );
    assert_eq!(body["error"]["param"], "model");

    let missing_messages = json!({"model": "mock-small"});
    let (status, body) =
        status_and_body(h.post_json("/v1/chat/completions", &missing_messages).await).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "messages");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("messages")
    );

    let missing_input = json!({"model": "mock-embed"});
    let (status, body) = status_and_body(h.post_json("/v1/embeddings", &missing_input).await).await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("input"))
    );

    let huge = chat("mock-small", json!({"pad": "x".repeat(70_000)}));
    let (status, body) = status_and_body(h.post_json("/v1/chat/completions", &huge).await).await;
    assert_eq!(
        (status, error_of(&body)),
        (413, ("invalid_request_error", "request_too_large"))
    );

    assert_eq!(
        h.truth().requests,
        0,
        "no refused request reached the provider"
    );
}

#[tokio::test]
async fn identity_and_model_errors_through_the_sdk() {
    let h = Harness::start().await;

    let unknown_model = sdk_error(&h, AGENT_KEY, chat("gpt-17", json!({}))).await;
    assert_eq!(
        unknown_model,
        (
            404,
            "invalid_request_error".into(),
            "model_not_found".into()
        )
    );

    let unknown_key = sdk_error(&h, "not-a-key", chat("mock-small", json!({}))).await;
    assert_eq!(
        unknown_key,
        (
            401,
            "invalid_request_error".into(),
            "invalid_api_key".into()
        )
    );

    let not_permitted = sdk_error(&h, LIMITED_KEY, chat("mock-large", json!({}))).await;
    assert_eq!(
        not_permitted,
        (403, "permission_error".into(), "permission_denied".into())
    );

    let response = reqwest::Client::new()
        .post(h.url("/v1/chat/completions"))
        .body(chat("mock-small", json!({})).to_string())
        .send()
        .await
        .unwrap();
    let (status, body) = status_and_body(response).await;
    assert_eq!((status, error_of(&body).1), (401, "missing_api_key"));

    let (status, body) = status_and_body(h.post("/v1/nothing-here", "{}").await).await;
    assert_eq!((status, error_of(&body).1), (404, "unknown_url"));
    assert_eq!(h.truth().requests, 0);
}

#[tokio::test]
async fn upstream_client_errors_pass_through_with_their_body() {
    let h = Harness::start().await;

    let response = h
        .post_json(
            "/v1/chat/completions",
            &chat("mock-small", json!({"fault": "bad_request"})),
        )
        .await;
    assert_eq!(response.status(), 400);
    let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"]["message"], "mock bad request");
    assert_eq!(body["error"]["code"], "invalid_value");

    let limited = sdk_error(
        &h,
        AGENT_KEY,
        chat("mock-small", json!({"fault": "rate_limit"})),
    )
    .await;
    assert_eq!(limited.0, 429);
    let response = h
        .post_json(
            "/v1/chat/completions",
            &chat("mock-small", json!({"fault": "rate_limit"})),
        )
        .await;
    assert_eq!(response.headers()["retry-after"], "1");

    let records = h.usage_records(3).await;
    assert!(
        records["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["outcome"] == "upstream_rejected")
    );
    assert_eq!(records["totals"]["cost_usd"], "0");
}

#[tokio::test]
async fn upstream_faults_map_to_502_and_504() {
    let h = Harness::start().await;

    let server_error = sdk_error(
        &h,
        AGENT_KEY,
        chat("mock-small", json!({"fault": "server_error"})),
    )
    .await;
    assert_eq!(
        server_error,
        (502, "upstream_error".into(), "upstream_server_error".into())
    );

    let slow = chat(
        "mock-slow",
        json!({"fault": "slow_headers", "delay_ms": 3000}),
    );
    let timeout = sdk_error(&h, AGENT_KEY, slow).await;
    assert_eq!(
        timeout,
        (504, "upstream_error".into(), "upstream_timeout".into())
    );

    let down = sdk_error(&h, AGENT_KEY, chat("mock-down", json!({}))).await;
    assert_eq!(
        down,
        (502, "upstream_error".into(), "upstream_unreachable".into())
    );

    let keyless = sdk_error(&h, AGENT_KEY, chat("mock-keyless", json!({}))).await;
    assert_eq!(
        keyless,
        (
            502,
            "upstream_error".into(),
            "provider_not_configured".into()
        )
    );
}

/// A stream the provider breaks off ends with an SSE error event the client can parse.
#[tokio::test]
async fn broken_streams_end_with_an_error_event() {
    let h = Harness::start().await;

    for (fault, tokens_before) in [("disconnect_after", 3), ("malformed_after", 4)] {
        let mut body = chat(
            "mock-small",
            json!({"fault": fault, "after": tokens_before, "tokens": 50}),
        );
        body["stream"] = json!(true);
        let response = h.post_json("/v1/chat/completions", &body).await;
        assert_eq!(response.status(), 200);

        let text = response.text().await.unwrap();
        let data = sse_data(&text);
        let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
        assert_eq!(
            error_of(&last),
            ("upstream_error", "upstream_stream_interrupted"),
            "{fault}"
        );
        assert!(
            !text.contains("not json"),
            "the malformed event is not forwarded"
        );
        let content_events = data
            .iter()
            .filter(|d| d.contains("\"content\":\"") && !d.contains("\"content\":\"\""))
            .count();
        assert_eq!(content_events, tokens_before as usize, "{fault}");
    }

    let records = h.usage_records(2).await;
    for record in records["data"].as_array().unwrap() {
        assert_eq!(record["outcome"], "upstream_cut");
        assert!(record["output_tokens"].as_u64().unwrap() >= 3);
    }
}

/// A Responses stream that breaks ends with a Responses-shaped `error` event.
#[tokio::test]
async fn broken_responses_stream_ends_with_error_event() {
    let h = Harness::start().await;
    let body = json!({"model": "mock-small", "input": "hello there", "stream": true,
        "mock": {"fault": "disconnect_after", "after": 2}});

    let text = h
        .post_json("/v1/responses", &body)
        .await
        .text()
        .await
        .unwrap();
    let last = sse_events(&text).pop().unwrap();
    assert!(last.starts_with("event: error\n"), "{last}");
    let data: Value = serde_json::from_str(last.split_once("data: ").unwrap().1).unwrap();
    assert_eq!(data["type"], "error");
    assert_eq!(data["code"], "upstream_stream_interrupted");
}
