//! Helpers for the mock's own tests: a started mock and a raw HTTP/1.1
//! client that keeps every body chunk and the error a body ends with.

use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use hyper::header::HeaderMap;
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::{MockConfig, MockProvider};

/// One answer, chunk by chunk.
pub(crate) struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub chunks: Vec<Bytes>,
    /// The error the body ended with, if it did not end cleanly.
    pub error: Option<String>,
}

impl Reply {
    pub(crate) fn bytes(&self) -> Vec<u8> {
        self.chunks.concat()
    }

    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes()).expect("reply body is JSON")
    }

    /// The SSE events of the body, split at blank lines, without the blank line.
    pub(crate) fn events(&self) -> Vec<String> {
        let text = String::from_utf8(self.bytes()).expect("reply body is UTF-8");
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// The JSON of every `data:` line except `[DONE]`.
    pub(crate) fn data(&self) -> Vec<Value> {
        self.events()
            .iter()
            .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).expect("event data is JSON"))
            .collect()
    }
}

/// A mock on a free loopback port.
pub(crate) async fn start(config: MockConfig) -> MockProvider {
    MockProvider::start(SocketAddr::from(([127, 0, 0, 1], 0)), config)
        .await
        .expect("mock starts")
}

/// The shared fixtures folder: `$LOADTEST_FIXTURES`, else `shared/` beside the repo.
pub(crate) fn fixtures_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LOADTEST_FIXTURES") {
        return dir.into();
    }
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/provider-streams");
    assert!(
        dir.is_dir(),
        "fixtures not found at {}; set LOADTEST_FIXTURES",
        dir.display()
    );
    dir
}

/// Sends one request with a JSON body (none for `Value::Null`).
pub(crate) async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &Value,
) -> Reply {
    let body = if body.is_null() {
        Bytes::new()
    } else {
        Bytes::from(body.to_string())
    };
    send_bytes(addr, method, path, key, body).await
}

/// Sends one request on a fresh connection and reads the whole answer.
pub(crate) async fn send_bytes(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Bytes,
) -> Reply {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to mock");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);

    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json");
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    let request = request.body(Full::new(body)).expect("valid request");

    let response = sender.send_request(request).await.expect("response head");
    let (parts, mut body) = response.into_parts();
    let mut reply = Reply {
        status: parts.status,
        headers: parts.headers,
        chunks: Vec::new(),
        error: None,
    };
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => reply.chunks.extend(frame.into_data().ok()),
            Err(e) => {
                reply.error = Some(e.to_string());
                break;
            }
        }
    }
    reply
}

/// `POST path` with a JSON body and no key.
pub(crate) async fn post(addr: SocketAddr, path: &str, body: &Value) -> Reply {
    send(addr, "POST", path, None, body).await
}
