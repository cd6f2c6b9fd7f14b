//! Chat Completions framing, parsed back from the wire.

use serde_json::{Value, json};

use crate::mock::MockConfig;
use crate::mock::testkit::{Reply, post, start};

const PATH: &str = "/v1/chat/completions";

fn chat_body(mock: Value, extra: Value) -> Value {
    let mut body = json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "say three words"}],
        "mock": mock,
    });
    if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    body
}

/// Checks the fields every chunk carries and returns the chunks.
fn chunks(reply: &Reply) -> Vec<Value> {
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.headers["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let events = reply.events();
    assert_eq!(events.last().map(String::as_str), Some("data: [DONE]"));
    assert!(
        events
            .iter()
            .all(|e| e.starts_with("data: ") && !e.contains('\n'))
    );

    let chunks = reply.data();
    let id = chunks[0]["id"].as_str().expect("id").to_owned();
    assert!(id.starts_with("chatcmpl-mock-"));
    for chunk in &chunks {
        assert_eq!(chunk["id"], id.as_str());
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "gpt-4o-mini");
        assert!(chunk["created"].as_u64().is_some());
    }
    chunks
}

fn content(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect()
}

#[tokio::test]
async fn text_stream_is_openai_shaped_with_usage_chunk() {
    let mock = start(MockConfig::default()).await;
    let body = chat_body(
        json!({"tokens": 3}),
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let reply = post(mock.addr(), PATH, &body).await;
    let chunks = chunks(&reply);

    assert_eq!(chunks.len(), 1 + 3 + 1 + 1);
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    assert_eq!(
        chunks[1]["choices"][0],
        json!({"index": 0, "delta": {"content": "alpha"}, "logprobs": null, "finish_reason": null})
    );
    assert_eq!(content(&chunks), "alpha bravo charlie");
    assert_eq!(chunks[4]["choices"][0]["delta"], json!({}));
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");
    assert!(chunks[4].get("usage").is_none());
    assert_eq!(chunks[5]["choices"], json!([]));
    assert_eq!(
        chunks[5]["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
               "prompt_tokens_details": {"cached_tokens": 0},
               "completion_tokens_details": {"reasoning_tokens": 0}})
    );
}

#[tokio::test]
async fn usage_follows_include_usage_and_the_mock_switches() {
    let mock = start(MockConfig::default()).await;
    let usage_of = |chunks: &[Value]| chunks.iter().filter(|c| c.get("usage").is_some()).count();

    let unasked = post(
        mock.addr(),
        PATH,
        &chat_body(json!({"tokens": 2}), json!({"stream": true})),
    )
    .await;
    assert_eq!(usage_of(&chunks(&unasked)), 0);

    let forced = chat_body(
        json!({"tokens": 2, "usage_unasked": true}),
        json!({"stream": true}),
    );
    assert_eq!(
        usage_of(&chunks(&post(mock.addr(), PATH, &forced).await)),
        1
    );

    let asked = json!({"stream": true, "stream_options": {"include_usage": true}});
    let suppressed = chat_body(json!({"tokens": 2, "usage": false}), asked.clone());
    assert_eq!(
        usage_of(&chunks(&post(mock.addr(), PATH, &suppressed).await)),
        0
    );

    let on_choice = chat_body(json!({"tokens": 2, "usage_on_choice_chunk": true}), asked);
    let chunks = chunks(&post(mock.addr(), PATH, &on_choice).await);
    let last = &chunks[chunks.len() - 1];
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["usage"]["completion_tokens"], 2);
}

#[tokio::test]
async fn max_tokens_caps_the_completion_with_length() {
    let mock = start(MockConfig::default()).await;
    let body = chat_body(
        json!({"tokens": 10}),
        json!({"stream": true, "max_completion_tokens": 4}),
    );
    let chunks = chunks(&post(mock.addr(), PATH, &body).await);
    assert_eq!(content(&chunks), "alpha bravo charlie delta");
    assert_eq!(
        chunks[chunks.len() - 1]["choices"][0]["finish_reason"],
        "length"
    );

    let whole = post(
        mock.addr(),
        PATH,
        &chat_body(json!({"tokens": 10}), json!({"max_tokens": 2})),
    )
    .await;
    let whole = whole.json();
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    assert_eq!(whole["usage"]["completion_tokens"], 2);
}

#[tokio::test]
async fn tool_call_stream_names_calls_and_splits_arguments() {
    let mock = start(MockConfig::default()).await;
    let tools =
        json!([{"type": "function", "function": {"name": "get_capital", "parameters": {}}}]);
    let body = chat_body(
        json!({"tokens": 5, "tool_calls": 2}),
        json!({"stream": true, "tools": tools}),
    );
    let chunks = chunks(&post(mock.addr(), PATH, &body).await);

    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": null})
    );
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0))
        .collect();
    assert_eq!(
        calls.len(),
        2 + 5,
        "a header per call plus one chunk per token"
    );

    let headers: Vec<&&Value> = calls.iter().filter(|c| c.get("id").is_some()).collect();
    assert_eq!(
        headers[0]["function"],
        json!({"name": "get_capital", "arguments": ""})
    );
    assert_eq!(headers[1]["function"]["name"], "lookup");
    assert_eq!(headers[1]["type"], "function");
    for index in 0..2 {
        let arguments: String = calls
            .iter()
            .filter(|c| c["index"] == index)
            .filter_map(|c| c["function"]["arguments"].as_str())
            .collect();
        let parsed: Value = serde_json::from_str(&arguments).expect("arguments are JSON");
        assert!(parsed["q"].is_string());
    }
    assert_eq!(
        chunks[chunks.len() - 1]["choices"][0]["finish_reason"],
        "tool_calls"
    );
}

#[tokio::test]
async fn whole_completion_carries_text_and_usage() {
    let mock = start(MockConfig::default()).await;
    let reply = post(
        mock.addr(),
        PATH,
        &chat_body(json!({"tokens": 2}), json!({})),
    )
    .await;
    assert_eq!(reply.headers["content-type"], "application/json");
    let completion = reply.json();
    assert_eq!(completion["object"], "chat.completion");
    assert_eq!(
        completion["choices"][0]["message"]["content"],
        "alpha bravo"
    );
    assert_eq!(completion["choices"][0]["finish_reason"], "stop");
    assert_eq!(completion["usage"]["total_tokens"], 5);

    let silent = post(
        mock.addr(),
        PATH,
        &chat_body(json!({"usage": false}), json!({})),
    )
    .await
    .json();
    assert!(silent.get("usage").is_none());
}

#[tokio::test]
async fn whole_tool_calls_carry_complete_arguments() {
    let mock = start(MockConfig::default()).await;
    let reply = post(
        mock.addr(),
        PATH,
        &chat_body(json!({"tokens": 3, "tool_calls": 1}), json!({})),
    )
    .await;
    let message = &reply.json()["choices"][0]["message"];
    assert!(message["content"].is_null());
    assert_eq!(message["tool_calls"][0]["function"]["name"], "lookup");
    assert_eq!(
        message["tool_calls"][0]["function"]["arguments"],
        r#"{"q":"alpha bravo charlie"}"#
    );
}
