//! `POST /v1/responses`: text answers, streamed or whole.
//!
//! The stream mirrors OpenAI's recorded event sequence (see the
//! `openai-responses-stream-text-01` fixture): `response.created`,
//! `response.in_progress`, `response.output_item.added`,
//! `response.content_part.added`, one `response.output_text.delta` per
//! token, `response.output_text.done`, `response.content_part.done`,
//! `response.output_item.done`, then `response.completed` carrying usage.
//! A completion cut short by `max_output_tokens` ends with
//! `response.incomplete` instead, as OpenAI's does.
//!
//! Limitation: `mock.tool_calls` is ignored here; Responses answers are
//! always text.

use std::sync::Arc;

use axum::response::Response;
use serde::Serialize;
use serde_json::Value;

use super::exchange::{Exchange, event_stream_response, json_response};
use super::stream::{self, Script, write_json, write_named};
use super::tokens;
use super::truth::LiveRequest;

/// Answers a Responses request.
pub(crate) async fn answer(exchange: Exchange) -> Response {
    if exchange.stream {
        return answer_stream(exchange);
    }
    exchange.settle_whole().await;
    answer_whole(&exchange)
}

// ===== wire shapes =====

/// The `response` object, with OpenAI's fields in OpenAI's order.
#[derive(Serialize)]
struct ResponseObject<'a> {
    id: &'a str,
    object: &'static str,
    created_at: u64,
    status: &'static str,
    background: bool,
    completed_at: Option<u64>,
    error: Option<()>,
    incomplete_details: Option<IncompleteDetails>,
    instructions: Option<&'a str>,
    max_output_tokens: Option<u64>,
    max_tool_calls: Option<()>,
    model: &'a str,
    output: &'a [MessageItem<'a>],
    parallel_tool_calls: bool,
    previous_response_id: Option<()>,
    reasoning: Reasoning,
    service_tier: &'static str,
    store: bool,
    temperature: f64,
    text: TextConfig,
    tool_choice: &'static str,
    tools: [(); 0],
    top_p: f64,
    truncation: &'static str,
    usage: Option<&'a Usage>,
    user: Option<()>,
    metadata: Empty,
}

#[derive(Serialize)]
struct IncompleteDetails {
    reason: &'static str,
}

#[derive(Serialize)]
struct Reasoning {
    effort: Option<()>,
    summary: Option<()>,
}

#[derive(Serialize)]
struct TextConfig {
    format: TextFormat,
    verbosity: &'static str,
}

#[derive(Serialize)]
struct TextFormat {
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct Empty {}

/// The `usage` object of the Responses API.
#[derive(Serialize)]
struct Usage {
    input_tokens: u64,
    input_tokens_details: CachedTokens,
    output_tokens: u64,
    output_tokens_details: ReasoningTokens,
    total_tokens: u64,
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
struct MessageItem<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    status: &'static str,
    content: &'a [OutputText<'a>],
    role: &'static str,
}

#[derive(Serialize)]
struct OutputText<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    annotations: [(); 0],
    logprobs: [(); 0],
    text: &'a str,
}

#[derive(Serialize)]
struct ResponseEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    response: ResponseObject<'a>,
    sequence_number: u64,
}

#[derive(Serialize)]
struct ItemEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    item: MessageItem<'a>,
    output_index: u32,
    sequence_number: u64,
}

#[derive(Serialize)]
struct PartEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    content_index: u32,
    item_id: &'a str,
    output_index: u32,
    part: OutputText<'a>,
    sequence_number: u64,
}

#[derive(Serialize)]
struct DeltaEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    content_index: u32,
    delta: &'a str,
    item_id: &'a str,
    logprobs: [(); 0],
    output_index: u32,
    sequence_number: u64,
}

#[derive(Serialize)]
struct TextDoneEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    content_index: u32,
    item_id: &'a str,
    logprobs: [(); 0],
    output_index: u32,
    sequence_number: u64,
    text: &'a str,
}

// ===== the shape of one answer =====

/// Where a response stands, which sets its status fields and final event.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    InProgress,
    Completed,
    Incomplete,
}

/// What is fixed for the whole answer.
struct Outline {
    request: Arc<LiveRequest>,
    item_id: String,
    created: u64,
    /// Where the answer ends: `Completed`, or `Incomplete` when capped.
    end: Stage,
    usage: Usage,
    report_usage: bool,
}

impl Outline {
    fn new(exchange: &Exchange) -> Self {
        let item_id = format!("msg_{}", exchange.request.id().trim_start_matches("resp_"));
        let output_tokens = u64::from(exchange.tokens);
        let usage = Usage {
            input_tokens: exchange.prompt_tokens,
            input_tokens_details: CachedTokens { cached_tokens: 0 },
            output_tokens,
            output_tokens_details: ReasoningTokens {
                reasoning_tokens: 0,
            },
            total_tokens: exchange.prompt_tokens + output_tokens,
        };
        Self {
            request: exchange.request.clone(),
            item_id,
            created: exchange.created,
            end: if exchange.capped {
                Stage::Incomplete
            } else {
                Stage::Completed
            },
            usage,
            report_usage: exchange.options.usage,
        }
    }

    fn item<'a>(&'a self, stage: Stage, content: &'a [OutputText<'a>]) -> MessageItem<'a> {
        let status = match stage {
            Stage::InProgress => "in_progress",
            Stage::Completed => "completed",
            Stage::Incomplete => "incomplete",
        };
        MessageItem {
            id: &self.item_id,
            kind: "message",
            status,
            content,
            role: "assistant",
        }
    }

    fn response<'a>(&'a self, stage: Stage, output: &'a [MessageItem<'a>]) -> ResponseObject<'a> {
        let body = self.request.body();
        let (status, completed_at, incomplete_details, usage) = match stage {
            Stage::InProgress => ("in_progress", None, None, None),
            Stage::Completed => ("completed", Some(self.created), None, self.reported_usage()),
            Stage::Incomplete => {
                let details = IncompleteDetails {
                    reason: "max_output_tokens",
                };
                ("incomplete", None, Some(details), self.reported_usage())
            }
        };
        ResponseObject {
            id: self.request.id(),
            object: "response",
            created_at: self.created,
            status,
            background: false,
            completed_at,
            error: None,
            incomplete_details,
            instructions: body.get("instructions").and_then(Value::as_str),
            max_output_tokens: body.get("max_output_tokens").and_then(Value::as_u64),
            max_tool_calls: None,
            model: self.request.model(),
            output,
            parallel_tool_calls: true,
            previous_response_id: None,
            reasoning: Reasoning {
                effort: None,
                summary: None,
            },
            service_tier: "default",
            store: body.get("store").and_then(Value::as_bool).unwrap_or(true),
            temperature: 1.0,
            text: TextConfig {
                format: TextFormat { kind: "text" },
                verbosity: "medium",
            },
            tool_choice: "auto",
            tools: [],
            top_p: 1.0,
            truncation: "disabled",
            usage,
            user: None,
            metadata: Empty {},
        }
    }

    fn reported_usage(&self) -> Option<&Usage> {
        self.report_usage.then_some(&self.usage)
    }
}

fn output_text(text: &str) -> OutputText<'_> {
    OutputText {
        kind: "output_text",
        annotations: [],
        logprobs: [],
        text,
    }
}

// ===== whole answers =====

fn answer_whole(exchange: &Exchange) -> Response {
    let outline = Outline::new(exchange);
    let text = tokens::completion_text(exchange.tokens);
    let parts = [output_text(&text)];
    let items = [outline.item(outline.end, &parts)];

    let mut body = Vec::with_capacity(1024);
    write_json(&mut body, &outline.response(outline.end, &items));
    json_response(body)
}

// ===== streamed answers =====

fn answer_stream(exchange: Exchange) -> Response {
    let plan = stream::Plan {
        tokens: exchange.tokens,
        token_delay: exchange.token_delay,
        fault: exchange.options.stream_fault(),
    };
    let script = ResponsesScript {
        outline: Outline::new(&exchange),
        tokens: exchange.tokens,
        sequence: 0,
    };
    event_stream_response(stream::events(script, exchange.request, plan))
}

struct ResponsesScript {
    outline: Outline,
    tokens: u32,
    /// The `sequence_number` of the next event.
    sequence: u64,
}

impl ResponsesScript {
    fn next_sequence(&mut self) -> u64 {
        self.sequence += 1;
        self.sequence - 1
    }

    fn write_response(
        &mut self,
        out: &mut Vec<u8>,
        kind: &'static str,
        stage: Stage,
        output: &[MessageItem<'_>],
    ) {
        let sequence_number = self.next_sequence();
        let event = ResponseEvent {
            kind,
            response: self.outline.response(stage, output),
            sequence_number,
        };
        write_named(out, kind, &event);
    }

    fn write_item(
        &mut self,
        out: &mut Vec<u8>,
        kind: &'static str,
        stage: Stage,
        content: &[OutputText<'_>],
    ) {
        let sequence_number = self.next_sequence();
        let event = ItemEvent {
            kind,
            item: self.outline.item(stage, content),
            output_index: 0,
            sequence_number,
        };
        write_named(out, kind, &event);
    }

    fn write_part(&mut self, out: &mut Vec<u8>, kind: &'static str, text: &str) {
        let sequence_number = self.next_sequence();
        let item_id = &self.outline.item_id;
        let event = PartEvent {
            kind,
            content_index: 0,
            item_id,
            output_index: 0,
            part: output_text(text),
            sequence_number,
        };
        write_named(out, kind, &event);
    }

    /// The final event: `response.completed`, or `response.incomplete` when capped.
    fn write_end(&mut self, out: &mut Vec<u8>, text: &str) {
        let sequence_number = self.next_sequence();
        let end = self.outline.end;
        let kind = if end == Stage::Incomplete {
            "response.incomplete"
        } else {
            "response.completed"
        };
        let parts = [output_text(text)];
        let items = [self.outline.item(end, &parts)];
        let event = ResponseEvent {
            kind,
            response: self.outline.response(end, &items),
            sequence_number,
        };
        write_named(out, kind, &event);
    }

    fn write_text_done(&mut self, out: &mut Vec<u8>, text: &str) {
        let kind = "response.output_text.done";
        let sequence_number = self.next_sequence();
        let item_id = &self.outline.item_id;
        let event = TextDoneEvent {
            kind,
            content_index: 0,
            item_id,
            logprobs: [],
            output_index: 0,
            sequence_number,
            text,
        };
        write_named(out, kind, &event);
    }
}

impl Script for ResponsesScript {
    fn opening(&mut self, step: usize, out: &mut Vec<u8>) -> bool {
        match step {
            0 => self.write_response(out, "response.created", Stage::InProgress, &[]),
            1 => self.write_response(out, "response.in_progress", Stage::InProgress, &[]),
            2 => self.write_item(out, "response.output_item.added", Stage::InProgress, &[]),
            3 => self.write_part(out, "response.content_part.added", ""),
            _ => return false,
        }
        true
    }

    fn token(&mut self, index: u32, out: &mut Vec<u8>) {
        let kind = "response.output_text.delta";
        let sequence_number = self.next_sequence();
        let item_id = &self.outline.item_id;
        let delta = tokens::token(index);
        let event = DeltaEvent {
            kind,
            content_index: 0,
            delta,
            item_id,
            logprobs: [],
            output_index: 0,
            sequence_number,
        };
        write_named(out, kind, &event);
    }

    fn closing(&mut self, step: usize, out: &mut Vec<u8>) -> bool {
        if step > 3 {
            return false;
        }
        let text = tokens::completion_text(self.tokens);
        let end = self.outline.end;
        match step {
            0 => self.write_text_done(out, &text),
            1 => self.write_part(out, "response.content_part.done", &text),
            2 => self.write_item(out, "response.output_item.done", end, &[output_text(&text)]),
            _ => self.write_end(out, &text),
        }
        true
    }
}
