//! What each request asks for: endpoint, streaming, and the `mock` field.
//!
//! The body is built once per target and shared by every request, so the
//! generator spends its time on the wire, not on serializing.

use bytes::Bytes;
use serde_json::{Value, json};

/// The prompt every request sends: nine words, so nine prompt tokens for the mock.
const PROMPT: &str = "Reply with a short greeting for the load generator";

/// The OpenAI endpoint under load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    Chat,
    Responses,
    Embeddings,
}

/// The request every target receives.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Workload {
    pub endpoint: Endpoint,
    pub stream: bool,
    pub model: String,
    /// `mock.tokens`; the mock's default when absent.
    pub tokens: Option<u32>,
    /// `mock.token_delay_us`; the mock's default when absent.
    pub token_delay_us: Option<u64>,
    /// Prefix of `mock.tag`; each target gets `<tag>-<target name>`.
    pub tag: String,
}

impl Endpoint {
    /// The path under the OpenAI base URL.
    pub fn path(self) -> &'static str {
        match self {
            Self::Chat => "/chat/completions",
            Self::Responses => "/responses",
            Self::Embeddings => "/embeddings",
        }
    }
}

impl Workload {
    /// The JSON body sent to the target named `target`.
    pub fn body(&self, target: &str) -> Bytes {
        let mut mock = json!({"tag": format!("{}-{target}", self.tag)});
        if let Some(tokens) = self.tokens {
            mock["tokens"] = tokens.into();
        }
        if let Some(delay) = self.token_delay_us {
            mock["token_delay_us"] = delay.into();
        }

        let mut body = match self.endpoint {
            Endpoint::Chat => json!({"messages": [{"role": "user", "content": PROMPT}]}),
            Endpoint::Responses | Endpoint::Embeddings => json!({"input": PROMPT}),
        };
        body["model"] = Value::from(self.model.as_str());
        body["mock"] = mock;
        if self.stream {
            body["stream"] = true.into();
        }
        if self.stream && self.endpoint == Endpoint::Chat {
            body["stream_options"] = json!({"include_usage": true});
        }
        Bytes::from(body.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_stream_body_asks_for_usage_and_tags_the_target() {
        let workload = Workload {
            endpoint: Endpoint::Chat,
            stream: true,
            model: "gpt-4o-mini".into(),
            tokens: Some(4),
            token_delay_us: None,
            tag: "run".into(),
        };
        let body: Value = serde_json::from_slice(&workload.body("warden")).expect("json");
        assert_eq!(body["mock"], json!({"tag": "run-warden", "tokens": 4}));
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(crate::mock::tokens::chat_prompt_tokens(&body), 9);
    }
}
