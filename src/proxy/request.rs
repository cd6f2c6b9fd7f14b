//! The inspect and rewrite phases: what a client's request body asks for, and the
//! one change Warden makes to it before it goes upstream.
//!
//! Warden reads only the fields it acts on and forwards the body's bytes untouched
//! otherwise, so fields it does not know (new API parameters, provider extensions)
//! reach the provider exactly as the client sent them.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::Endpoint;
use crate::error::ApiError;

/// The fields of a request body that Warden acts on.
#[derive(Debug)]
pub struct Inspected<'a> {
    pub model: Cow<'a, str>,
    pub stream: bool,
    /// `stream_options` is present in the body (whatever its content).
    has_stream_options: bool,
    /// The client asked for a usage chunk at the end of a chat stream.
    pub include_usage: bool,
}

#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    messages: Option<IgnoredAny>,
    input: Option<IgnoredAny>,
    stream: Option<bool>,
    /// Outer `Some` when the key is present, even as `null`.
    #[serde(default, deserialize_with = "present")]
    stream_options: Option<Option<StreamOptions>>,
}

fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// Reads the request body and checks the fields the endpoint requires.
pub fn inspect(endpoint: Endpoint, body: &[u8]) -> Result<Inspected<'_>, ApiError> {
    let probe: Probe = serde_json::from_slice(body).map_err(|e| {
        if e.is_data() {
            ApiError::InvalidField {
                field: "body",
                reason: e.to_string(),
            }
        } else {
            ApiError::MalformedJson(e)
        }
    })?;

    let model = probe.model.ok_or(ApiError::MissingField("model"))?;
    match endpoint {
        Endpoint::Chat if probe.messages.is_none() => {
            return Err(ApiError::MissingField("messages"));
        }
        Endpoint::Embeddings if probe.input.is_none() => {
            return Err(ApiError::MissingField("input"));
        }
        _ => {}
    }

    let include_usage = probe
        .stream_options
        .as_ref()
        .and_then(|o| o.as_ref()?.include_usage);
    Ok(Inspected {
        model,
        stream: probe.stream.unwrap_or(false),
        has_stream_options: probe.stream_options.is_some(),
        include_usage: include_usage.unwrap_or(false),
    })
}

/// Makes sure a streamed chat request asks the provider for usage.
///
/// Without `stream_options.include_usage` a chat stream carries no usage at all, and
/// Warden could only estimate. When the client did not ask for it, Warden asks on its
/// behalf and the relay later strips the extra chunk. The common case (no
/// `stream_options` at all) is a splice that leaves every other byte as sent.
pub fn rewrite(endpoint: Endpoint, body: Bytes, inspected: &Inspected) -> Result<Bytes, ApiError> {
    let needs_usage = endpoint == Endpoint::Chat && inspected.stream && !inspected.include_usage;
    if !needs_usage {
        return Ok(body);
    }
    if !inspected.has_stream_options {
        return Ok(splice_include_usage(&body));
    }

    // `stream_options` exists without `include_usage: true`: edit it as a value.
    let mut value: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&body).map_err(ApiError::MalformedJson)?;
    let options = value
        .entry("stream_options")
        .or_insert(serde_json::Value::Null);
    if options.is_null() {
        *options = serde_json::Value::Object(Default::default());
    }
    let Some(options) = options.as_object_mut() else {
        return Err(ApiError::InvalidField {
            field: "stream_options",
            reason: "must be an object".into(),
        });
    };
    options.insert("include_usage".into(), serde_json::Value::Bool(true));

    let bytes = serde_json::to_vec(&value).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(bytes.into())
}

/// Inserts `"stream_options":{"include_usage":true},` right after the body's opening
/// brace. The body is known to be a JSON object with at least a `model` member.
fn splice_include_usage(body: &[u8]) -> Bytes {
    const FIELD: &[u8] = br#""stream_options":{"include_usage":true},"#;

    let brace = body
        .iter()
        .position(|&b| b == b'{')
        .expect("inspect() accepted the body, so it is a JSON object");
    let mut out = BytesMut::with_capacity(body.len() + FIELD.len());
    out.extend_from_slice(&body[..=brace]);
    out.extend_from_slice(FIELD);
    out.extend_from_slice(&body[brace + 1..]);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requires_model_and_messages() {
        let err = inspect(Endpoint::Chat, br#"{"messages":[]}"#).unwrap_err();
        assert!(matches!(err, ApiError::MissingField("model")));
        let err = inspect(Endpoint::Chat, br#"{"model":"m"}"#).unwrap_err();
        assert!(matches!(err, ApiError::MissingField("messages")));
        let err = inspect(Endpoint::Embeddings, br#"{"model":"m"}"#).unwrap_err();
        assert!(matches!(err, ApiError::MissingField("input")));
    }

    #[test]
    fn malformed_and_mistyped_bodies_differ() {
        assert!(matches!(
            inspect(Endpoint::Chat, b"{\"model\":"),
            Err(ApiError::MalformedJson(_))
        ));
        assert!(matches!(
            inspect(Endpoint::Chat, br#"{"model":5,"messages":[]}"#),
            Err(ApiError::InvalidField { .. })
        ));
        assert!(matches!(
            inspect(Endpoint::Chat, b"[1]"),
            Err(ApiError::InvalidField { .. })
        ));
    }

    #[test]
    fn splice_keeps_every_other_byte() {
        let body =
            Bytes::from_static(br#" {"model":"m","messages":[],"stream":true,"x_vendor":{"a":1}}"#);
        let inspected = inspect(Endpoint::Chat, &body).unwrap();
        let out = rewrite(Endpoint::Chat, body.clone(), &inspected).unwrap();
        assert_eq!(
            &out[..],
            &br#" {"stream_options":{"include_usage":true},"model":"m","messages":[],"stream":true,"x_vendor":{"a":1}}"#[..]
        );
        let reparsed = inspect(Endpoint::Chat, &out).unwrap();
        assert!(reparsed.include_usage);
    }

    #[test]
    fn existing_stream_options_are_edited() {
        let body = Bytes::from_static(
            br#"{"model":"m","messages":[],"stream":true,"stream_options":{"include_obfuscation":false}}"#,
        );
        let inspected = inspect(Endpoint::Chat, &body).unwrap();
        let out = rewrite(Endpoint::Chat, body.clone(), &inspected).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value["stream_options"]["include_usage"], true);
        assert_eq!(value["stream_options"]["include_obfuscation"], false);
    }

    #[test]
    fn asked_for_usage_is_untouched() {
        let body = Bytes::from_static(
            br#"{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#,
        );
        let inspected = inspect(Endpoint::Chat, &body).unwrap();
        let out = rewrite(Endpoint::Chat, body.clone(), &inspected).unwrap();
        assert_eq!(out, body);
    }
}
