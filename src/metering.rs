//! Metering: how many tokens a request used and what they cost.
//!
//! Two sources feed a request's [`Usage`]. The provider's own usage object is the
//! truth and wins whenever it arrives (a non-streamed body, the last chunk of a chat
//! stream, `response.completed` of a Responses stream). Until then, and whenever it
//! never arrives (a cut or abandoned stream), Warden keeps a local count that is an
//! upper bound on the truth: every token of a byte-level BPE tokenizer covers at
//! least one byte, so the bytes of text delivered bound the output tokens, and the
//! bytes of the request body bound the prompt tokens. `docs/benchmarks.md` records
//! why this bound was chosen over an exact BPE count on the relay path.
//!
//! Limitation: hidden reasoning tokens (models that bill for reasoning they do not
//! stream) are invisible to the local count, so a cut stream from such a model is
//! metered below its true cost. Streams that end normally carry provider usage and
//! are exact.

mod wire;

use rust_decimal::Decimal;

use crate::config::Price;

pub use wire::MalformedEvent;

/// Tokens one request used, normalised across the chat, responses and embeddings APIs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// All prompt tokens, cached ones included (OpenAI's convention).
    pub input_tokens: u64,
    /// The part of `input_tokens` served from the provider's prompt cache.
    pub cached_tokens: u64,
    /// All output tokens, reasoning included.
    pub output_tokens: u64,
}

/// Where a request's usage figures came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageSource {
    /// The provider reported usage: the figures are exact.
    Provider,
    /// No provider usage: the figures are Warden's upper bound.
    Estimate,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Provider => "provider",
            UsageSource::Estimate => "estimate",
        }
    }
}

const PER_MILLION: Decimal = Decimal::from_parts(1_000_000, 0, 0, false, 0);

/// Cost in USD of `usage` at `price`.
pub fn cost(price: &Price, usage: &Usage) -> Decimal {
    let cached = usage.cached_tokens.min(usage.input_tokens);
    let uncached = usage.input_tokens - cached;
    let cached_price = price.cached_input.unwrap_or(price.input);

    let micro = Decimal::from(uncached) * price.input
        + Decimal::from(cached) * cached_price
        + Decimal::from(usage.output_tokens) * price.output;
    micro / PER_MILLION
}

/// Which streaming wire format a relay is metering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamFormat {
    /// Chat Completions: `data: <chunk>` events ending with `data: [DONE]`.
    Chat,
    /// Responses: `event: <type>` + `data: <event>`, usage in `response.completed`.
    Responses,
}

/// What one SSE event turned out to be, so the relay can decide what to forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventClass {
    /// An ordinary event: forward it.
    Forward,
    /// A chat chunk with `choices: []` whose only payload is usage. Forwarded only
    /// when the client asked for usage.
    UsageOnly,
    /// The stream's last event: `[DONE]` on chat, `response.completed` (or
    /// `incomplete`, `failed`, `error`) on Responses. Forwarded.
    Done,
}

/// Meters one stream event by event.
#[derive(Debug)]
pub struct StreamMeter {
    format: StreamFormat,
    /// Upper bound on prompt tokens: the request body's length in bytes.
    prompt_bound: u64,
    /// The most output tokens the provider was allowed (the request's max tokens).
    output_cap: u64,
    /// Bytes of generated text (content, reasoning, tool arguments) seen so far.
    text_bytes: u64,
    /// Events that carried generated text: each carries at least one token.
    text_events: u64,
    /// The provider's usage, once reported.
    reported: Option<Usage>,
}

impl StreamMeter {
    pub fn new(format: StreamFormat, prompt_bound: u64, output_cap: u64) -> StreamMeter {
        StreamMeter {
            format,
            prompt_bound,
            output_cap,
            text_bytes: 0,
            text_events: 0,
            reported: None,
        }
    }

    /// Meters one event's `data` payload and classifies it.
    pub fn observe(&mut self, data: &[u8]) -> Result<EventClass, MalformedEvent> {
        let observed = match self.format {
            StreamFormat::Chat => wire::observe_chat(data)?,
            StreamFormat::Responses => wire::observe_responses(data)?,
        };

        self.text_bytes += observed.text_bytes;
        self.text_events += u64::from(observed.text_bytes > 0);
        if let Some(usage) = observed.usage {
            self.reported = Some(usage);
        }
        Ok(observed.class)
    }

    /// A lower bound on the output tokens delivered so far: every event with text
    /// carries at least one. Passing the request's max tokens on this count means the
    /// provider ignored the limit, and the relay cuts the stream.
    pub fn tokens_at_least(&self) -> u64 {
        self.text_events
    }

    /// Whether the stream has delivered more than the provider was allowed to generate.
    pub fn over_cap(&self) -> bool {
        self.text_events > self.output_cap
    }

    /// The usage to settle with, and whether the provider reported it.
    pub fn settle(&self) -> (Usage, UsageSource) {
        match self.reported {
            Some(usage) => (usage, UsageSource::Provider),
            None => (self.estimate(), UsageSource::Estimate),
        }
    }

    /// The upper bound: prompt bytes, and text bytes up to the request's max tokens
    /// (a provider never generates more than the max tokens Warden set).
    fn estimate(&self) -> Usage {
        Usage {
            input_tokens: self.prompt_bound,
            cached_tokens: 0,
            output_tokens: self.text_bytes.min(self.output_cap),
        }
    }
}

/// Usage of a non-streamed response body. Without a usage object the whole body's
/// length bounds the output (up to the request's max tokens), and the request body's
/// length bounds the prompt.
pub fn body_usage(body: &[u8], prompt_bound: u64, output_cap: u64) -> (Usage, UsageSource) {
    match wire::body_usage(body) {
        Some(usage) => (usage, UsageSource::Provider),
        None => {
            let usage = Usage {
                input_tokens: prompt_bound,
                cached_tokens: 0,
                output_tokens: (body.len() as u64).min(output_cap),
            };
            (usage, UsageSource::Estimate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn price(input: &str, cached: Option<&str>, output: &str) -> Price {
        Price {
            input: Decimal::from_str(input).unwrap(),
            cached_input: cached.map(|c| Decimal::from_str(c).unwrap()),
            output: Decimal::from_str(output).unwrap(),
            max_output_tokens: 16_384,
        }
    }

    #[test]
    fn cost_splits_cached_input() {
        let p = price("2.50", Some("1.25"), "10.00");
        let usage = Usage {
            input_tokens: 1_000,
            cached_tokens: 400,
            output_tokens: 100,
        };
        // 600 x 2.50 + 400 x 1.25 + 100 x 10 = 1500 + 500 + 1000 = 3000 micro-USD.
        assert_eq!(cost(&p, &usage), Decimal::from_str("0.003").unwrap());
    }

    #[test]
    fn cached_price_defaults_to_input() {
        let p = price("0.02", None, "0");
        let usage = Usage {
            input_tokens: 10,
            cached_tokens: 10,
            output_tokens: 0,
        };
        assert_eq!(cost(&p, &usage), Decimal::from_str("0.0000002").unwrap());
    }

    #[test]
    fn meter_prefers_reported_usage() {
        let mut meter = StreamMeter::new(StreamFormat::Chat, 500, 8);
        let chunk = br#"{"choices":[{"index":0,"delta":{"content":"Hello there"}}]}"#;
        assert_eq!(meter.observe(chunk).unwrap(), EventClass::Forward);
        assert_eq!(meter.tokens_at_least(), 1);
        assert_eq!(
            meter.settle(),
            (
                Usage {
                    input_tokens: 500,
                    cached_tokens: 0,
                    output_tokens: 8
                },
                UsageSource::Estimate
            )
        );

        let usage =
            br#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}"#;
        assert_eq!(meter.observe(usage).unwrap(), EventClass::UsageOnly);
        let (settled, source) = meter.settle();
        assert_eq!(source, UsageSource::Provider);
        assert_eq!(settled.input_tokens, 7);
        assert_eq!(settled.output_tokens, 2);
    }
}
