//! The mock's token model: the ground truth every count is checked against.
//!
//! A completion token is one word from a fixed list, chosen by its position,
//! so the same request always yields the same text. The first token has no
//! leading space and every later one has exactly one, which makes the number
//! of whitespace-separated words in a completion equal to its token count.
//! Prompt tokens use the same rule: one token per whitespace-separated word of
//! the message text, and nothing else in the body counts.

use serde_json::Value;

/// The words completions are made of, each stored with its leading space.
const WORDS: [&str; 26] = [
    " alpha",
    " bravo",
    " charlie",
    " delta",
    " echo",
    " foxtrot",
    " golf",
    " hotel",
    " india",
    " juliett",
    " kilo",
    " lima",
    " mike",
    " november",
    " oscar",
    " papa",
    " quebec",
    " romeo",
    " sierra",
    " tango",
    " uniform",
    " victor",
    " whiskey",
    " xray",
    " yankee",
    " zulu",
];

/// The word at `index`, without any leading space.
pub fn word(index: u32) -> &'static str {
    &WORDS[index as usize % WORDS.len()][1..]
}

/// The text of completion token `index`: the first has no leading space,
/// every later one starts with exactly one.
pub fn token(index: u32) -> &'static str {
    if index == 0 {
        return word(0);
    }
    WORDS[index as usize % WORDS.len()]
}

/// The whole completion text made of the first `count` tokens.
pub fn completion_text(count: u32) -> String {
    let mut text = String::with_capacity(count as usize * 8);
    for index in 0..count {
        text.push_str(token(index));
    }
    text
}

/// Tokens in a piece of text: its whitespace-separated words.
pub fn count_words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// Prompt tokens of a Chat Completions body: words in the string content of
/// every message, where content is a string or an array of parts with `text`.
pub fn chat_prompt_tokens(body: &Value) -> u64 {
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return 0;
    };
    messages
        .iter()
        .filter_map(|m| m.get("content"))
        .map(content_words)
        .sum()
}

/// Prompt tokens of a Responses body: words in `input` when it is a string,
/// else in the `content` of each input item (a string or parts with `text`).
pub fn responses_prompt_tokens(body: &Value) -> u64 {
    match body.get("input") {
        Some(Value::String(text)) => count_words(text),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|i| i.get("content"))
            .map(content_words)
            .sum(),
        _ => 0,
    }
}

/// Prompt tokens of an Embeddings body: words in `input`, a string or an
/// array of strings.
pub fn embeddings_prompt_tokens(body: &Value) -> u64 {
    match body.get("input") {
        Some(Value::String(text)) => count_words(text),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(count_words)
            .sum(),
        _ => 0,
    }
}

/// Words in one message `content`: a string, or parts carrying `text`.
fn content_words(content: &Value) -> u64 {
    match content {
        Value::String(text) => count_words(text),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .map(count_words)
            .sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn first_token_has_no_space_and_the_rest_have_one() {
        assert_eq!(token(0), "alpha");
        assert_eq!(token(1), " bravo");
        assert_eq!(token(26), " alpha");
        for index in 0..100 {
            assert!(!token(index).is_empty());
            assert!(!word(index).starts_with(' '));
        }
    }

    #[test]
    fn completion_text_has_one_word_per_token() {
        assert_eq!(completion_text(0), "");
        assert_eq!(completion_text(3), "alpha bravo charlie");
        assert_eq!(count_words(&completion_text(57)), 57);
    }

    #[test]
    fn chat_prompt_counts_string_and_part_content_only() {
        let body = json!({
            "model": "gpt-4o-mini words here",
            "messages": [
                {"role": "system", "content": "be  brief\n please"},
                {"role": "user", "content": [
                    {"type": "text", "text": "two words"},
                    {"type": "image_url", "image_url": {"url": "x y z"}}
                ]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "a b"}]}
            ],
            "mock": {"tag": "not counted"}
        });
        assert_eq!(chat_prompt_tokens(&body), 5);
        assert_eq!(chat_prompt_tokens(&json!({})), 0);
    }

    #[test]
    fn responses_prompt_counts_string_or_item_content() {
        assert_eq!(
            responses_prompt_tokens(&json!({"input": "one two three"})),
            3
        );
        let body = json!({
            "instructions": "not counted at all",
            "input": [
                {"role": "user", "content": "What is 2+2?"},
                {"role": "user", "content": [{"type": "input_text", "text": "and 3+3"}]},
                {"type": "function_call_output", "output": "ignored words"}
            ]
        });
        assert_eq!(responses_prompt_tokens(&body), 5);
    }

    #[test]
    fn embeddings_prompt_counts_string_or_strings() {
        assert_eq!(embeddings_prompt_tokens(&json!({"input": "a b"})), 2);
        assert_eq!(
            embeddings_prompt_tokens(&json!({"input": ["a b", "c", 7]})),
            3
        );
    }
}
