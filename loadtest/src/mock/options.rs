//! The `mock` body field: how a single request asks the mock to behave.
//!
//! Every field is optional; absent ones fall back to the provider's config.
//! Unknown fields are ignored so tests can grow options without breaking.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::MockConfig;
use super::error::ApiError;

/// Per-request behaviour, read from the body's `mock` object.
#[derive(Deserialize, Debug)]
#[serde(default)]
pub(crate) struct MockOptions {
    /// Completion tokens to generate before any `max_tokens` cap.
    pub tokens: Option<u32>,
    /// Pacing between streamed token events, in microseconds.
    pub token_delay_us: Option<u64>,
    /// Groups this request's ground truth.
    pub tag: String,
    /// False simulates a provider that never reports usage.
    pub usage: bool,
    /// Report usage in streams even without `stream_options.include_usage`.
    pub usage_unasked: bool,
    /// Put stream usage on the last chunk with choices, not a separate chunk.
    pub usage_on_choice_chunk: bool,
    /// Stream this many tool calls instead of text (Chat Completions only).
    pub tool_calls: u32,
    pub fault: Option<Fault>,
    /// Tokens before a stream fault fires.
    pub after: u32,
    /// Delay before response headers for `slow_headers`.
    pub delay_ms: u64,
    /// Fixture folder to replay instead of generating.
    pub replay: Option<String>,
}

/// A failure the mock injects on request.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Fault {
    /// 429 with `retry-after: 1`.
    RateLimit,
    /// 500 `server_error`.
    ServerError,
    /// 400 `invalid_value` on `messages`.
    BadRequest,
    /// Sleep `delay_ms` before sending response headers.
    SlowHeaders,
    /// After `after` tokens send a broken event, then end the stream cleanly.
    MalformedAfter,
    /// After `after` tokens abort the connection mid-body.
    DisconnectAfter,
}

/// A fault that happens inside an event stream, after some tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamFault {
    Malformed,
    Disconnect,
}

impl Default for MockOptions {
    fn default() -> Self {
        Self {
            tokens: None,
            token_delay_us: None,
            tag: String::new(),
            usage: true,
            usage_unasked: false,
            usage_on_choice_chunk: false,
            tool_calls: 0,
            fault: None,
            after: 0,
            delay_ms: 0,
            replay: None,
        }
    }
}

impl MockOptions {
    /// Reads the `mock` field of a request body; absent or null means defaults.
    pub(crate) fn from_body(body: &Value) -> Result<Self, ApiError> {
        match body.get("mock") {
            None | Some(Value::Null) => Ok(Self::default()),
            Some(mock) => Self::deserialize(mock).map_err(|e| ApiError::InvalidMock(e.to_string())),
        }
    }

    /// Completion tokens asked for, before any cap from the request.
    pub(crate) fn tokens(&self, config: &MockConfig) -> u32 {
        self.tokens.unwrap_or(config.default_tokens)
    }

    /// Pacing between streamed token events.
    pub(crate) fn token_delay(&self, config: &MockConfig) -> Duration {
        self.token_delay_us
            .map_or(config.default_token_delay, Duration::from_micros)
    }

    /// The error response to send instead of a completion, if any.
    pub(crate) fn error_fault(&self) -> Option<ApiError> {
        match self.fault? {
            Fault::RateLimit => Some(ApiError::RateLimited),
            Fault::ServerError => Some(ApiError::ServerError),
            Fault::BadRequest => Some(ApiError::BadRequest),
            Fault::SlowHeaders | Fault::MalformedAfter | Fault::DisconnectAfter => None,
        }
    }

    /// How long to hold the response headers back.
    pub(crate) fn header_delay(&self) -> Option<Duration> {
        (self.fault == Some(Fault::SlowHeaders)).then(|| Duration::from_millis(self.delay_ms))
    }

    /// The fault to inject into an event stream, with the tokens before it.
    pub(crate) fn stream_fault(&self) -> Option<(StreamFault, u32)> {
        match self.fault? {
            Fault::MalformedAfter => Some((StreamFault::Malformed, self.after)),
            Fault::DisconnectAfter => Some((StreamFault::Disconnect, self.after)),
            Fault::RateLimit | Fault::ServerError | Fault::BadRequest | Fault::SlowHeaders => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn absent_mock_field_means_defaults() {
        let options = MockOptions::from_body(&json!({"model": "m"})).expect("defaults");
        assert!(options.usage);
        assert_eq!(options.tokens(&MockConfig::default()), 16);
        assert_eq!(options.tag, "");
    }

    #[test]
    fn fields_are_read_and_faults_classified() {
        let body =
            json!({"mock": {"tokens": 3, "fault": "disconnect_after", "after": 2, "usage": false}});
        let options = MockOptions::from_body(&body).expect("valid");
        assert_eq!(options.tokens, Some(3));
        assert!(!options.usage);
        assert_eq!(options.stream_fault(), Some((StreamFault::Disconnect, 2)));
        assert!(options.error_fault().is_none());
    }

    #[test]
    fn unknown_fault_is_rejected() {
        let body = json!({"mock": {"fault": "explode"}});
        assert!(matches!(
            MockOptions::from_body(&body),
            Err(ApiError::InvalidMock(_))
        ));
    }
}
