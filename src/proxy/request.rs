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
    /// The most output tokens the client asked for, and the field it used.
    pub max_output: Option<(u64, &'static str)>,
    /// The names of the tools the request offers the model.
    pub tools: Vec<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    messages: Option<IgnoredAny>,
    input: Option<IgnoredAny>,
    stream: Option<bool>,
    max_completion_tokens: Option<u64>,
    max_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
    #[serde(borrow, default)]
    tools: Option<Vec<ToolProbe<'a>>>,
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

/// A `tools` entry: a function tool names itself (`function.name` on chat, `name` on
/// Responses); a built-in tool is known by its `type` (`web_search`, ...).
#[derive(Deserialize)]
struct ToolProbe<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow)]
    function: Option<FunctionProbe<'a>>,
}

#[derive(Deserialize)]
struct FunctionProbe<'a> {
    #[serde(borrow)]
    name: Option<Cow<'a, str>>,
}

impl<'a> ToolProbe<'a> {
    fn into_name(self) -> Cow<'a, str> {
        self.function
            .and_then(|f| f.name)
            .or(self.name)
            .or(self.kind)
            .unwrap_or(Cow::Borrowed(""))
    }
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// Reads the request body and checks the fields the endpoint requires.
pub fn inspect(endpoint: Endpoint, body: &[u8]) -> Result<Inspected<'_>, ApiError> {
    let probe: Probe = serde_json::from_slice(body).map_err(ApiError::from_json)?;

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
    let max_output = match endpoint {
        Endpoint::Chat => probe
            .max_completion_tokens
            .map(|n| (n, "max_completion_tokens"))
            .or(probe.max_tokens.map(|n| (n, "max_tokens"))),
        Endpoint::Responses => probe.max_output_tokens.map(|n| (n, "max_output_tokens")),
        Endpoint::Embeddings => None,
    };
    Ok(Inspected {
        model,
        stream: probe.stream.unwrap_or(false),
        has_stream_options: probe.stream_options.is_some(),
        include_usage: include_usage.unwrap_or(false),
        max_output,
        tools: probe
            .tools
            .unwrap_or_default()
            .into_iter()
            .map(ToolProbe::into_name)
            .collect(),
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

/// Caps the request's output at `tokens`, in the field the client used or, if it set
/// none, in the endpoint's own (`max_completion_tokens`, `max_output_tokens`).
pub fn limit_output(
    endpoint: Endpoint,
    body: Bytes,
    inspected: &Inspected,
    tokens: u64,
) -> Result<Bytes, ApiError> {
    let Some((_, field)) = inspected.max_output else {
        let field = match endpoint {
            Endpoint::Chat => "max_completion_tokens",
            Endpoint::Responses => "max_output_tokens",
            Endpoint::Embeddings => return Ok(body),
        };
        return Ok(splice(&body, format!("\"{field}\":{tokens},").as_bytes()));
    };

    let mut value: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&body).map_err(ApiError::MalformedJson)?;
    value.insert(field.to_owned(), tokens.into());
    let bytes = serde_json::to_vec(&value).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(bytes.into())
}

/// Removes the `tools` entries named in `refused`, and `tools` itself if none is left.
pub fn strip_tools(body: Bytes, refused: &[String]) -> Result<Bytes, ApiError> {
    let mut value: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&body).map_err(ApiError::MalformedJson)?;
    if let Some(serde_json::Value::Array(tools)) = value.get_mut("tools") {
        tools.retain(|tool| {
            let probe = ToolProbe::deserialize(tool).ok();
            let name = probe.map(ToolProbe::into_name).unwrap_or_default();
            !refused.iter().any(|r| *r == name)
        });
        if tools.is_empty() {
            value.remove("tools");
        }
    }
    let bytes = serde_json::to_vec(&value).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(bytes.into())
}

/// Inserts `"stream_options":{"include_usage":true},` right after the body's opening
/// brace.
fn splice_include_usage(body: &[u8]) -> Bytes {
    splice(body, br#""stream_options":{"include_usage":true},"#)
}

/// Inserts `member` (`"name":value,`) right after the body's opening brace, leaving
/// every other byte as sent. The body is known to be a JSON object with at least a
/// `model` member, so the trailing comma is always followed by one.
fn splice(body: &[u8], member: &[u8]) -> Bytes {
    let brace = body
        .iter()
        .position(|&b| b == b'{')
        .expect("inspect() accepted the body, so it is a JSON object");
    let mut out = BytesMut::with_capacity(body.len() + member.len());
    out.extend_from_slice(&body[..=brace]);
    out.extend_from_slice(member);
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
    fn output_limit_is_set_in_the_field_the_client_used() {
        let body = Bytes::from_static(br#"{"model":"m","messages":[],"max_tokens":900}"#);
        let inspected = inspect(Endpoint::Chat, &body).unwrap();
        assert_eq!(inspected.max_output, Some((900, "max_tokens")));
        let out = limit_output(Endpoint::Chat, body.clone(), &inspected, 40).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value["max_tokens"], 40);

        let body = Bytes::from_static(br#"{"model":"m","input":"hi"}"#);
        let inspected = inspect(Endpoint::Responses, &body).unwrap();
        let out = limit_output(Endpoint::Responses, body.clone(), &inspected, 7).unwrap();
        assert_eq!(
            &out[..],
            &br#"{"max_output_tokens":7,"model":"m","input":"hi"}"#[..]
        );
    }

    #[test]
    fn tool_names_come_from_functions_or_types() {
        let body = br#"{"model":"m","messages":[],"tools":[{"type":"function","function":{"name":"get_quote"}},{"type":"web_search"},{"type":"function","name":"write_report"}]}"#;
        let inspected = inspect(Endpoint::Chat, body).unwrap();
        assert_eq!(inspected.tools, ["get_quote", "web_search", "write_report"]);

        let out = strip_tools(Bytes::from_static(body), &["web_search".into()]).unwrap();
        let names = inspect(Endpoint::Chat, &out).unwrap().tools;
        assert_eq!(names, ["get_quote", "write_report"]);
        let out = strip_tools(out, &["get_quote".into(), "write_report".into()]).unwrap();
        assert!(inspect(Endpoint::Chat, &out).unwrap().tools.is_empty());
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
