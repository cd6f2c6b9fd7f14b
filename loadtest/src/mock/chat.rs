//! `POST /v1/chat/completions`: text or tool calls, streamed or whole.
//!
//! Streams follow OpenAI's chunk shape: a role chunk, one chunk per token,
//! a chunk with an empty delta and the finish reason, then (when usage is
//! asked for and not suppressed) a usage chunk with `choices: []`, then
//! `data: [DONE]`. Tool-call streams open each call with its id, type and
//! name, then carry its arguments one token per chunk.

use std::sync::Arc;

use axum::response::Response;
use serde::Serialize;
use serde_json::Value;

use super::exchange::{Exchange, event_stream_response, json_response};
use super::stream::{self, Script, write_data, write_json};
use super::tokens;
use super::truth::LiveRequest;

/// Name used for tool calls when the request declares no tools.
const DEFAULT_TOOL: &str = "lookup";

/// Answers a Chat Completions request.
pub(crate) async fn answer(exchange: Exchange) -> Response {
    if exchange.stream {
        return answer_stream(exchange);
    }
    exchange.settle_whole().await;
    answer_whole(&exchange)
}

// ===== wire shapes =====

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [ChunkChoice<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<&'a Usage>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'a str>,
}

#[derive(Serialize, Default)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    /// `Some(None)` writes `"content": null`, as OpenAI does before tool calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<[ToolCallDelta<'a>; 1]>,
}

#[derive(Serialize)]
struct ToolCallDelta<'a> {
    index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    function: FunctionDelta<'a>,
}

#[derive(Serialize)]
struct FunctionDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    arguments: &'a str,
}

/// The `usage` object of Chat Completions.
#[derive(Serialize)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    prompt_tokens_details: CachedTokens,
    completion_tokens_details: ReasoningTokens,
}

#[derive(Serialize)]
struct CachedTokens {
    cached_tokens: u64,
}

#[derive(Serialize)]
struct ReasoningTokens {
    reasoning_tokens: u64,
}

#[derive(Serialize)]
struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [CompletionChoice<'a>; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct CompletionChoice<'a> {
    index: u32,
    message: Message<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: Option<&'a str>,
    refusal: Option<()>,
    annotations: [(); 0],
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<WholeToolCall<'a>>,
}

#[derive(Serialize)]
struct WholeToolCall<'a> {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    function: WholeFunction<'a>,
}

#[derive(Serialize)]
struct WholeFunction<'a> {
    name: &'a str,
    arguments: String,
}

// ===== the shape of one answer =====

/// The tokens of one tool call: `len` tokens starting at token `first`.
#[derive(Clone, Copy)]
struct ToolCallSpan {
    first: u32,
    len: u32,
}

/// What to say: finish reason, usage to report, and tool-call layout.
struct Outline {
    finish_reason: &'static str,
    usage: Usage,
    /// Report usage in the stream (asked for, or forced, and not suppressed).
    report_usage: bool,
    calls: Vec<ToolCallSpan>,
}

impl Outline {
    fn new(exchange: &Exchange) -> Self {
        let calls = tool_call_spans(exchange.options.tool_calls, exchange.tokens);
        let finish_reason = match (exchange.capped, calls.is_empty()) {
            (true, _) => "length",
            (false, false) => "tool_calls",
            (false, true) => "stop",
        };
        let asked =
            exchange.request.body()["stream_options"]["include_usage"].as_bool() == Some(true);
        let report_usage = exchange.options.usage && (asked || exchange.options.usage_unasked);
        let usage = usage(exchange.prompt_tokens, exchange.tokens);
        Self {
            finish_reason,
            usage,
            report_usage,
            calls,
        }
    }
}

fn usage(prompt_tokens: u64, completion_tokens: u32) -> Usage {
    let completion_tokens = u64::from(completion_tokens);
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
        prompt_tokens_details: CachedTokens { cached_tokens: 0 },
        completion_tokens_details: ReasoningTokens {
            reasoning_tokens: 0,
        },
    }
}

/// Splits `tokens` across `calls` tool calls as evenly as possible. A call
/// needs at least one token, so fewer tokens than calls means fewer calls,
/// and no tokens means plain (empty) text.
fn tool_call_spans(calls: u32, tokens: u32) -> Vec<ToolCallSpan> {
    let calls = calls.min(tokens);
    if calls == 0 {
        return Vec::new();
    }
    let (base, extra) = (tokens / calls, tokens % calls);
    (0..calls)
        .map(|call| ToolCallSpan {
            first: call * base + call.min(extra),
            len: base + u32::from(call < extra),
        })
        .collect()
}

/// The argument fragment carried by token `index` of a call: the tokens of a
/// call together make `{"q":"<words>"}`.
fn argument_fragment(span: ToolCallSpan, index: u32) -> String {
    let offset = index - span.first;
    let mut fragment = String::with_capacity(16);
    if offset == 0 {
        fragment.push_str("{\"q\":\"");
        fragment.push_str(tokens::word(index));
    } else {
        fragment.push_str(tokens::token(index));
    }
    if offset + 1 == span.len {
        fragment.push_str("\"}");
    }
    fragment
}

/// The name of tool call `call`: the request's `tools[call]`, else a default.
fn tool_name(body: &Value, call: usize) -> &str {
    body["tools"][call]["function"]["name"]
        .as_str()
        .unwrap_or(DEFAULT_TOOL)
}

fn tool_call_id(request_id: &str, call: usize) -> String {
    format!("call_{request_id}_{call}")
}

// ===== whole answers =====

fn answer_whole(exchange: &Exchange) -> Response {
    let outline = Outline::new(exchange);
    let request = &exchange.request;
    let text = outline
        .calls
        .is_empty()
        .then(|| tokens::completion_text(exchange.tokens));
    let tool_calls = outline
        .calls
        .iter()
        .enumerate()
        .map(|(call, span)| whole_tool_call(request, call, *span));

    let message = Message {
        role: "assistant",
        content: text.as_deref(),
        refusal: None,
        annotations: [],
        tool_calls: tool_calls.collect(),
    };
    let completion = Completion {
        id: request.id(),
        object: "chat.completion",
        created: exchange.created,
        model: request.model(),
        choices: [CompletionChoice {
            index: 0,
            message,
            logprobs: None,
            finish_reason: outline.finish_reason,
        }],
        usage: exchange.options.usage.then_some(outline.usage),
    };

    let mut body = Vec::with_capacity(512);
    write_json(&mut body, &completion);
    json_response(body)
}

fn whole_tool_call(request: &LiveRequest, call: usize, span: ToolCallSpan) -> WholeToolCall<'_> {
    let arguments = (span.first..span.first + span.len)
        .map(|index| argument_fragment(span, index))
        .collect();
    WholeToolCall {
        id: tool_call_id(request.id(), call),
        kind: "function",
        function: WholeFunction {
            name: tool_name(request.body(), call),
            arguments,
        },
    }
}

// ===== streamed answers =====

fn answer_stream(exchange: Exchange) -> Response {
    let plan = stream::Plan {
        tokens: exchange.tokens,
        token_delay: exchange.token_delay,
        fault: exchange.options.stream_fault(),
    };
    let script = ChatScript {
        outline: Outline::new(&exchange),
        usage_on_choice_chunk: exchange.options.usage_on_choice_chunk,
        created: exchange.created,
        request: exchange.request.clone(),
    };
    event_stream_response(stream::events(script, exchange.request, plan))
}

struct ChatScript {
    request: Arc<LiveRequest>,
    outline: Outline,
    usage_on_choice_chunk: bool,
    created: u64,
}

impl ChatScript {
    fn write_chunk(&self, out: &mut Vec<u8>, choices: &[ChunkChoice<'_>], usage: Option<&Usage>) {
        let chunk = Chunk {
            id: self.request.id(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.request.model(),
            choices,
            usage,
        };
        write_data(out, &chunk);
    }

    fn write_delta(
        &self,
        out: &mut Vec<u8>,
        delta: Delta<'_>,
        finish_reason: Option<&str>,
        usage: Option<&Usage>,
    ) {
        let choice = ChunkChoice {
            index: 0,
            delta,
            logprobs: None,
            finish_reason,
        };
        self.write_chunk(out, &[choice], usage);
    }

    fn write_tool_token(&self, out: &mut Vec<u8>, index: u32) {
        let Some((call, span)) = self
            .outline
            .calls
            .iter()
            .enumerate()
            .find(|(_, s)| index < s.first + s.len)
        else {
            return;
        };

        // The first token of a call is preceded by the call's header delta.
        if index == span.first {
            let id = tool_call_id(self.request.id(), call);
            let function = FunctionDelta {
                name: Some(tool_name(self.request.body(), call)),
                arguments: "",
            };
            let header = ToolCallDelta {
                index: call as u32,
                id: Some(&id),
                kind: Some("function"),
                function,
            };
            self.write_delta(
                out,
                Delta {
                    tool_calls: Some([header]),
                    ..Delta::default()
                },
                None,
                None,
            );
        }

        let fragment = argument_fragment(*span, index);
        let function = FunctionDelta {
            name: None,
            arguments: &fragment,
        };
        let delta = ToolCallDelta {
            index: call as u32,
            id: None,
            kind: None,
            function,
        };
        self.write_delta(
            out,
            Delta {
                tool_calls: Some([delta]),
                ..Delta::default()
            },
            None,
            None,
        );
    }
}

impl Script for ChatScript {
    fn opening(&mut self, step: usize, out: &mut Vec<u8>) -> bool {
        if step > 0 {
            return false;
        }
        let content = if self.outline.calls.is_empty() {
            Some("")
        } else {
            None
        };
        let delta = Delta {
            role: Some("assistant"),
            content: Some(content),
            tool_calls: None,
        };
        self.write_delta(out, delta, None, None);
        true
    }

    fn token(&mut self, index: u32, out: &mut Vec<u8>) {
        if !self.outline.calls.is_empty() {
            return self.write_tool_token(out, index);
        }
        let delta = Delta {
            content: Some(Some(tokens::token(index))),
            ..Delta::default()
        };
        self.write_delta(out, delta, None, None);
    }

    fn closing(&mut self, step: usize, out: &mut Vec<u8>) -> bool {
        let usage = self.outline.report_usage.then_some(&self.outline.usage);
        let separate_usage = usage.is_some() && !self.usage_on_choice_chunk;
        match (step, separate_usage) {
            (0, _) => {
                let on_choice = usage.filter(|_| self.usage_on_choice_chunk);
                self.write_delta(
                    out,
                    Delta::default(),
                    Some(self.outline.finish_reason),
                    on_choice,
                );
            }
            (1, true) => self.write_chunk(out, &[], usage),
            (1, false) | (2, true) => out.extend_from_slice(b"data: [DONE]\n\n"),
            _ => return false,
        }
        true
    }
}

#[cfg(test)]
mod tests;
