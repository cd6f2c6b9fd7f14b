//! Chat completions through Warden: metering against the mock's ground truth,
//! streaming event by event, usage chunks, abandoned streams.

use std::time::Duration;

use async_openai::types::chat::{CreateChatCompletionResponse, CreateChatCompletionStreamResponse};
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::common::*;

fn chat_body(extra: Value) -> Value {
    let mut body = json!({
        "model": "mock-small",
        "messages": [{"role": "user", "content": "count the words in this prompt please"}],
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

/// A non-streamed completion through the OpenAI SDK is metered exactly.
#[tokio::test]
async fn non_streamed_cost_equals_ground_truth() {
    let h = Harness::start().await;
    let client = h.client(AGENT_KEY);

    let response: CreateChatCompletionResponse = client
        .chat()
        .create_byot(chat_body(json!({"mock": {"tokens": 12}})))
        .await
        .expect("completion succeeds");
    let usage = response.usage.expect("usage passes through");

    let truth = h.truth();
    assert_eq!(truth.requests, 1);
    assert_eq!(u64::from(usage.prompt_tokens), truth.prompt_tokens);
    assert_eq!(
        u64::from(usage.completion_tokens),
        truth.completion_tokens_generated
    );

    let records = h.usage_records(1).await;
    let record = &records["data"][0];
    assert_eq!(record["agent"], AGENT_ID);
    assert_eq!(record["usage_source"], "provider");
    assert_eq!(record["input_tokens"], truth.prompt_tokens);
    assert_eq!(record["output_tokens"], truth.completion_tokens_generated);
    let expected = mock_cost(truth.prompt_tokens, truth.completion_tokens_generated);
    assert_eq!(record_cost(record), expected);
    assert_eq!(records["totals"]["cost_usd"], expected.to_string());
}

/// A streamed completion through the SDK: the client did not ask for usage, so the
/// usage chunk Warden requested is stripped, and the cost still equals the truth.
#[tokio::test]
async fn streamed_cost_equals_ground_truth_and_usage_chunk_is_stripped() {
    let h = Harness::start().await;
    let client = h.client(AGENT_KEY);

    let mut stream = client
        .chat()
        .create_stream_byot::<_, CreateChatCompletionStreamResponse>(chat_body(
            json!({"stream": true, "mock": {"tokens": 25}}),
        ))
        .await
        .expect("stream starts");
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("every chunk parses");
        assert!(chunk.usage.is_none(), "client did not ask for usage");
        assert!(
            !chunk.choices.is_empty(),
            "no usage-only chunk reaches the client"
        );
        if let Some(content) = &chunk.choices[0].delta.content {
            text.push_str(content);
        }
    }
    assert_eq!(text.split_whitespace().count(), 25);

    let truth = h.truth();
    assert_eq!(truth.completion_tokens_generated, 25);
    let sent = &truth.per_request[0].body;
    assert_eq!(
        sent["stream_options"]["include_usage"], true,
        "warden asks for usage"
    );
    assert_eq!(sent["mock"]["tokens"], 25, "unknown fields pass through");

    let records = h.usage_records(1).await;
    let record = &records["data"][0];
    assert_eq!(record["usage_source"], "provider");
    assert_eq!(record["output_tokens"], 25);
    assert_eq!(record_cost(record), mock_cost(truth.prompt_tokens, 25));
}

/// A client that asks for usage gets the usage chunk, with `choices: []`.
#[tokio::test]
async fn streamed_usage_chunk_reaches_a_client_that_asked() {
    let h = Harness::start().await;
    let body = chat_body(json!({"stream": true, "stream_options": {"include_usage": true}}));

    let text = h
        .post_json("/v1/chat/completions", &body)
        .await
        .text()
        .await
        .unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let usage_chunk: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 16);
}

/// Events reach the client as they are generated: the first arrives while the
/// mock has produced only part of a paced stream.
#[tokio::test]
async fn stream_is_relayed_event_by_event() {
    let h = Harness::start().await;
    let body = chat_body(json!({"stream": true, "mock": {"tokens": 20, "token_delay_us": 50_000}}));

    let response = h.post_json("/v1/chat/completions", &body).await;
    let mut bytes = response.bytes_stream();
    let mut seen = String::new();
    loop {
        let chunk = bytes.next().await.expect("stream continues").unwrap();
        seen.push_str(std::str::from_utf8(&chunk).unwrap());
        let has_token = sse_data(&seen)
            .iter()
            .any(|d| d.contains(r#""content":""#) && !d.contains(r#""content":"""#));
        if has_token {
            break;
        }
    }

    let generated = h.truth().completion_tokens_generated;
    assert!(
        generated < 20,
        "first token arrived after {generated} of 20 were generated"
    );
    while bytes.next().await.is_some() {}
    assert_eq!(h.truth().completion_tokens_generated, 20);
}

/// Without provider usage the local count bounds the truth from above.
#[tokio::test]
async fn missing_usage_is_metered_at_or_above_truth() {
    let h = Harness::start().await;
    let body = chat_body(json!({"stream": true, "mock": {"tokens": 40, "usage": false}}));

    let text = h
        .post_json("/v1/chat/completions", &body)
        .await
        .text()
        .await
        .unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));

    let truth = h.truth();
    let records = h.usage_records(1).await;
    let record = &records["data"][0];
    assert_eq!(record["usage_source"], "estimate");
    assert!(record["output_tokens"].as_u64().unwrap() >= truth.completion_tokens_generated);
    assert!(record["input_tokens"].as_u64().unwrap() >= truth.prompt_tokens);
    let truth_cost = mock_cost(truth.prompt_tokens, truth.completion_tokens_generated);
    assert!(record_cost(record) >= truth_cost);
}

/// A client that walks away mid-stream is metered for what was delivered (at or
/// above the truth), and the upstream request is cancelled.
#[tokio::test]
async fn abandoned_stream_is_metered_and_upstream_cancelled() {
    let h = Harness::start().await;
    let body = chat_body(json!({"stream": true, "mock": {"tokens": 400, "token_delay_us": 5_000}}));

    let response = h.post_json("/v1/chat/completions", &body).await;
    let mut bytes = response.bytes_stream();
    let mut events = 0;
    while events < 10 {
        let chunk = bytes.next().await.unwrap().unwrap();
        events += chunk.windows(2).filter(|w| w == b"\n\n").count();
    }
    drop(bytes);

    let records = h.usage_records(1).await;
    let record = &records["data"][0];
    assert_eq!(record["outcome"], "abandoned");
    assert_eq!(record["usage_source"], "estimate");

    // The mock stops generating once Warden drops the upstream connection.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let truth = h.truth();
    let request = &truth.per_request[0];
    assert!(!request.finished);
    assert!(
        request.completion_tokens_generated < 400,
        "upstream was not cancelled"
    );
    assert!(record["output_tokens"].as_u64().unwrap() >= request.completion_tokens_sent);
}

/// curl sees raw SSE: `data:` events ending in `[DONE]`, no usage chunk.
#[tokio::test]
async fn curl_streams_raw_sse() {
    let h = Harness::start().await;
    let body = chat_body(json!({"stream": true, "mock": {"tokens": 5}})).to_string();

    let url = h.url("/v1/chat/completions");
    let curl = move || {
        std::process::Command::new("curl")
            .args([
                "-sN",
                "--fail-with-body",
                "-H",
                "content-type: application/json",
            ])
            .arg("-H")
            .arg(format!("authorization: Bearer {AGENT_KEY}"))
            .args(["-d", &body, &url])
            .output()
    };
    // curl blocks, and the mock provider runs on this test's runtime.
    let output = tokio::task::spawn_blocking(curl)
        .await
        .unwrap()
        .expect("curl runs");
    assert!(output.status.success());

    let text = String::from_utf8(output.stdout).unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().unwrap(), "[DONE]");
    for chunk in &data[..data.len() - 1] {
        let chunk: Value = serde_json::from_str(chunk).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_ne!(chunk["choices"], json!([]));
    }
}
