//! Provider wire formats, read only as far as metering needs.
//!
//! Every type here deserializes borrowed from the event's bytes and skips what it
//! does not need, so metering an event allocates nothing. Text is never copied: a
//! string is reduced to its length as it is parsed.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{EventClass, Usage};

/// An event whose `data` is not the JSON its format promises.
#[derive(Debug, thiserror::Error)]
#[error("malformed event from upstream: {0}")]
pub struct MalformedEvent(#[from] serde_json::Error);

/// What metering learned from one event.
pub(super) struct Observed {
    pub class: EventClass,
    pub text_bytes: u64,
    pub usage: Option<Usage>,
}

/// The usage object as any OpenAI-compatible endpoint reports it. Chat and embeddings
/// say `prompt_tokens`/`completion_tokens`; Responses says `input_tokens`/
/// `output_tokens`. Unknown fields (Groq's timings, audio details) are skipped.
#[derive(Deserialize)]
struct WireUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    prompt_tokens_details: Option<Details>,
    input_tokens_details: Option<Details>,
}

#[derive(Deserialize)]
struct Details {
    cached_tokens: Option<u64>,
}

impl WireUsage {
    fn normalise(&self) -> Option<Usage> {
        let input = self.prompt_tokens.or(self.input_tokens)?;
        let details = self.prompt_tokens_details.as_ref();
        let details = details.or(self.input_tokens_details.as_ref());
        Some(Usage {
            input_tokens: input,
            cached_tokens: details.and_then(|d| d.cached_tokens).unwrap_or(0),
            output_tokens: self.completion_tokens.or(self.output_tokens).unwrap_or(0),
        })
    }
}

#[derive(Deserialize)]
struct ChatChunk {
    #[serde(default)]
    choices: Option<Choices>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct Choice {
    delta: Option<TextBytes>,
}

/// The `choices` array reduced to its length and the text bytes of its deltas.
#[derive(Default)]
struct Choices {
    count: u64,
    text_bytes: u64,
}

impl<'de> Deserialize<'de> for Choices {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ChoicesVisitor;

        impl<'de> Visitor<'de> for ChoicesVisitor {
            type Value = Choices;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of choices")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Choices, A::Error> {
                let mut choices = Choices::default();
                while let Some(choice) = seq.next_element::<Choice>()? {
                    choices.count += 1;
                    choices.text_bytes += choice.delta.map_or(0, |t| t.0);
                }
                Ok(choices)
            }
        }

        d.deserialize_seq(ChoicesVisitor)
    }
}

#[derive(Deserialize)]
struct ResponsesEvent {
    #[serde(rename = "type")]
    kind: Option<ResponsesKind>,
    delta: Option<TextBytes>,
    response: Option<ResponseObject>,
}

/// A Responses event type, reduced to whether it ends the stream.
enum ResponsesKind {
    Terminal,
    Other,
}

impl<'de> Deserialize<'de> for ResponsesKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KindVisitor;

        impl Visitor<'_> for KindVisitor {
            type Value = ResponsesKind;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an event type")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<ResponsesKind, E> {
                Ok(match v {
                    "response.completed" | "response.incomplete" | "response.failed" | "error" => {
                        ResponsesKind::Terminal
                    }
                    _ => ResponsesKind::Other,
                })
            }
        }

        d.deserialize_str(KindVisitor)
    }
}

#[derive(Deserialize)]
struct ResponseObject {
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct Body {
    usage: Option<WireUsage>,
}

/// Meters one Chat Completions chunk.
pub(super) fn observe_chat(data: &[u8]) -> Result<Observed, MalformedEvent> {
    if data == b"[DONE]" {
        return Ok(Observed {
            class: EventClass::Done,
            text_bytes: 0,
            usage: None,
        });
    }

    let chunk: ChatChunk = serde_json::from_slice(data)?;
    let choices = chunk.choices.unwrap_or_default();
    let usage = chunk.usage.as_ref().and_then(WireUsage::normalise);

    // Only a chunk with no choices at all is pure usage; Groq and others put usage on
    // a chunk that still carries a choice, and that chunk must reach the client.
    let class = if choices.count == 0 && usage.is_some() {
        EventClass::UsageOnly
    } else {
        EventClass::Forward
    };
    Ok(Observed {
        class,
        text_bytes: choices.text_bytes,
        usage,
    })
}

/// Meters one Responses stream event.
pub(super) fn observe_responses(data: &[u8]) -> Result<Observed, MalformedEvent> {
    let event: ResponsesEvent = serde_json::from_slice(data)?;
    let usage = event
        .response
        .and_then(|r| r.usage)
        .as_ref()
        .and_then(WireUsage::normalise);

    let class = match event.kind {
        Some(ResponsesKind::Terminal) => EventClass::Done,
        Some(ResponsesKind::Other) | None => EventClass::Forward,
    };
    Ok(Observed {
        class,
        text_bytes: event.delta.map_or(0, |t| t.0),
        usage,
    })
}

/// The usage object of a non-streamed body, if it has one.
pub(super) fn body_usage(body: &[u8]) -> Option<Usage> {
    let body: Body = serde_json::from_slice(body).ok()?;
    body.usage.as_ref().and_then(WireUsage::normalise)
}

/// Any JSON value reduced to the total byte length of the generated text inside it.
///
/// Keys that carry protocol rather than generated text (`role`, `type`, `id`,
/// `index`) are skipped; everything else counts, so a new delta field a provider
/// adds (Groq's `reasoning`, others' `reasoning_content`) is metered without a
/// code change. Counting a little too much keeps the bound an upper bound.
struct TextBytes(u64);

impl<'de> Deserialize<'de> for TextBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextBytesVisitor).map(TextBytes)
    }
}

struct TextBytesVisitor;

impl<'de> DeserializeSeed<'de> for TextBytesVisitor {
    type Value = u64;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<u64, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TextBytesVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        Ok(v.len() as u64)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<u64, E> {
        Ok(0)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<u64, E> {
        Ok(0)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<u64, E> {
        Ok(0)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<u64, E> {
        Ok(0)
    }

    fn visit_unit<E: de::Error>(self) -> Result<u64, E> {
        Ok(0)
    }

    fn visit_none<E: de::Error>(self) -> Result<u64, E> {
        Ok(0)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<u64, A::Error> {
        let mut total = 0;
        while let Some(n) = seq.next_element_seed(TextBytesVisitor)? {
            total += n;
        }
        Ok(total)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<u64, A::Error> {
        let mut total = 0;
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Protocol => {
                    map.next_value::<IgnoredAny>()?;
                }
                Key::Text => total += map.next_value_seed(TextBytesVisitor)?,
            }
        }
        Ok(total)
    }
}

/// A map key, classified without allocating.
enum Key {
    Protocol,
    Text,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;

        impl Visitor<'_> for KeyVisitor {
            type Value = Key;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(match v {
                    "role" | "type" | "id" | "index" | "channel" => Key::Protocol,
                    _ => Key::Text,
                })
            }
        }

        d.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_content_reasoning_and_tool_arguments() {
        let groq = br#"{"choices":[{"index":0,"delta":{"reasoning":"ab","channel":"analysis","tool_calls":[{"id":"fc_1","type":"function","function":{"name":"get","arguments":"{\"n\":1}"},"index":0}]},"finish_reason":null}]}"#;
        let observed = observe_chat(groq).unwrap();
        // "ab" + "get" + `{"n":1}` (7 bytes once unescaped).
        assert_eq!(observed.text_bytes, 2 + 3 + 7);
        assert_eq!(observed.class, EventClass::Forward);
    }

    #[test]
    fn usage_on_a_choice_chunk_is_forwarded() {
        let chunk = br#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":304,"completion_tokens":49,"total_tokens":353,"queue_time":0.1}}"#;
        let observed = observe_chat(chunk).unwrap();
        assert_eq!(observed.class, EventClass::Forward);
        assert_eq!(observed.usage.unwrap().output_tokens, 49);
    }

    #[test]
    fn null_usage_and_obfuscation_are_ignored() {
        let chunk = br#"{"id":"x","choices":[{"index":0,"delta":{"content":"The"}}],"usage":null,"obfuscation":"KhEo"}"#;
        let observed = observe_chat(chunk).unwrap();
        assert_eq!(observed.text_bytes, 3);
        assert!(observed.usage.is_none());
    }

    #[test]
    fn responses_usage_comes_from_completed() {
        let created = br#"{"type":"response.created","response":{"usage":null,"output":[]}}"#;
        assert!(observe_responses(created).unwrap().usage.is_none());

        let done = br#"{"type":"response.completed","response":{"usage":{"input_tokens":20,"input_tokens_details":{"cached_tokens":4},"output_tokens":3}}}"#;
        let usage = observe_responses(done).unwrap().usage.unwrap();
        assert_eq!(
            (usage.input_tokens, usage.cached_tokens, usage.output_tokens),
            (20, 4, 3)
        );
    }

    #[test]
    fn malformed_data_is_an_error() {
        assert!(observe_chat(br#"{"id": not json"#).is_err());
    }
}
