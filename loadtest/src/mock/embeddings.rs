//! `POST /v1/embeddings`: one small deterministic vector per input.
//!
//! Vectors have 8 dimensions and depend only on the input's position, so
//! answers are cheap and repeatable. `encoding_format: "base64"` returns the
//! little-endian f32 bytes in base64, as OpenAI does.

use axum::response::Response;
use serde::Serialize;
use serde_json::Value;

use super::exchange::{Exchange, json_response};
use super::stream::write_json;

/// Dimensions of every mock embedding.
const DIMENSIONS: usize = 8;

#[derive(Serialize)]
struct EmbeddingList<'a> {
    object: &'static str,
    data: Vec<Embedding>,
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct Embedding {
    object: &'static str,
    index: usize,
    embedding: Vector,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Vector {
    Floats([f32; DIMENSIONS]),
    Base64(String),
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u64,
    total_tokens: u64,
}

/// Answers an Embeddings request.
pub(crate) fn answer(exchange: Exchange) -> Response {
    let request = &exchange.request;
    let body = request.body();
    let inputs = match body.get("input") {
        Some(Value::Array(items)) => items.len(),
        _ => 1,
    };
    let base64 = body.get("encoding_format").and_then(Value::as_str) == Some("base64");
    exchange.request.finish();

    let data = (0..inputs).map(|index| Embedding {
        object: "embedding",
        index,
        embedding: vector(index, base64),
    });
    let usage = Usage {
        prompt_tokens: exchange.prompt_tokens,
        total_tokens: exchange.prompt_tokens,
    };
    let list = EmbeddingList {
        object: "list",
        data: data.collect(),
        model: request.model(),
        usage: exchange.options.usage.then_some(usage),
    };

    let mut out = Vec::with_capacity(256 + inputs * 128);
    write_json(&mut out, &list);
    json_response(out)
}

/// The embedding of input `index`: points on a sine wave, unit-free.
fn vector(index: usize, base64: bool) -> Vector {
    let mut floats = [0f32; DIMENSIONS];
    for (dimension, value) in floats.iter_mut().enumerate() {
        *value = ((index * DIMENSIONS + dimension) as f32 * 0.37).sin();
    }
    if !base64 {
        return Vector::Floats(floats);
    }
    let bytes: Vec<u8> = floats.iter().flat_map(|f| f.to_le_bytes()).collect();
    Vector::Base64(encode_base64(&bytes))
}

/// Standard base64 with padding; small enough not to need a crate.
fn encode_base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let b = [
            group[0],
            *group.get(1).unwrap_or(&0),
            *group.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            let symbol = ALPHABET[(n >> shift) as usize & 63] as char;
            out.push(if i <= group.len() { symbol } else { '=' });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        assert_eq!(encode_base64(b""), "");
        assert_eq!(encode_base64(b"f"), "Zg==");
        assert_eq!(encode_base64(b"fo"), "Zm8=");
        assert_eq!(encode_base64(b"foo"), "Zm9v");
        assert_eq!(encode_base64(b"foobar"), "Zm9vYmFy");
    }
}
