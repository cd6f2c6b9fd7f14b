//! The Responses, embeddings and models endpoints through the OpenAI SDK.

use async_openai::types::embeddings::CreateEmbeddingResponse;
use async_openai::types::responses::{Response, ResponseStreamEvent};
use futures_util::StreamExt;
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn responses_non_streamed_is_metered_exactly() {
    let h = Harness::start().await;

    let response: Response = h
        .client(AGENT_KEY)
        .responses()
        .create_byot(
            json!({"model": "mock-small", "input": "one two three", "mock": {"tokens": 9}}),
        )
        .await
        .expect("response succeeds");
    let usage = response.usage.expect("usage");

    let truth = h.truth();
    assert_eq!(
        u64::from(usage.output_tokens),
        truth.completion_tokens_generated
    );
    let records = h.usage_records(1).await;
    let record = &records["data"][0];
    assert_eq!(record["endpoint"], "responses");
    assert_eq!(record["input_tokens"], truth.prompt_tokens);
    assert_eq!(record["output_tokens"], 9);
    assert_eq!(record_cost(record), mock_cost(truth.prompt_tokens, 9));
}

#[tokio::test]
async fn responses_stream_is_metered_from_response_completed() {
    let h = Harness::start().await;

    let mut stream = h
        .client(AGENT_KEY)
        .responses()
        .create_stream_byot::<_, ResponseStreamEvent>(json!({
            "model": "mock-small", "input": "one two three four", "stream": true,
            "mock": {"tokens": 14}
        }))
        .await
        .expect("stream starts");
    let mut deltas = 0;
    let mut completed = false;
    while let Some(event) = stream.next().await {
        match event.expect("every event parses") {
            ResponseStreamEvent::ResponseOutputTextDelta(_) => deltas += 1,
            ResponseStreamEvent::ResponseCompleted(_) => completed = true,
            _ => {}
        }
    }
    assert_eq!((deltas, completed), (14, true));

    let truth = h.truth();
    let records = h.usage_records(1).await;
    let record = &records["data"][0];
    assert_eq!(record["usage_source"], "provider");
    assert_eq!(record["stream"], true);
    assert_eq!(record["output_tokens"], truth.completion_tokens_generated);
    assert_eq!(record_cost(record), mock_cost(truth.prompt_tokens, 14));
}

#[tokio::test]
async fn embeddings_are_metered_exactly() {
    let h = Harness::start().await;

    let response: CreateEmbeddingResponse = h
        .client(AGENT_KEY)
        .embeddings()
        .create_byot(json!({"model": "mock-embed", "input": ["alpha beta", "gamma"]}))
        .await
        .expect("embeddings succeed");
    assert_eq!(response.data.len(), 2);

    let truth = h.truth();
    assert_eq!(truth.prompt_tokens, 3);
    let records = h.usage_records(1).await;
    let record = &records["data"][0];
    assert_eq!(record["input_tokens"], 3);
    assert_eq!(record["output_tokens"], 0);
    assert_eq!(record_cost(record), mock_cost(3, 0));
}

/// `GET /v1/models` lists only the models the calling agent may use.
#[tokio::test]
async fn models_lists_only_what_the_agent_may_use() {
    let h = Harness::start().await;

    let limited = h
        .client(LIMITED_KEY)
        .models()
        .list()
        .await
        .expect("models list");
    let ids: Vec<_> = limited.data.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["mock-small"]);

    let lead = h
        .client(AGENT_KEY)
        .models()
        .list()
        .await
        .expect("models list");
    assert!(lead.data.len() > 10);
    assert!(
        lead.data
            .iter()
            .any(|m| m.id == "gpt-4o" && m.owned_by == "mock")
    );
}
