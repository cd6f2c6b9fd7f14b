//! OpenAI-shaped error responses, injected or real.
//!
//! One exhaustive mapping from each error to its status, `type`, `code` and
//! `param`, so the wire shape of every error lives in one place.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Everything the mock answers with an error body.
#[derive(Debug)]
pub(crate) enum ApiError {
    /// Missing or wrong `Authorization: Bearer` key.
    InvalidKey,
    /// The body is not JSON; carries the parser's message.
    InvalidJson(String),
    /// The `mock` field is malformed; carries the parser's message.
    InvalidMock(String),
    /// Injected by `mock.fault = "rate_limit"`.
    RateLimited,
    /// Injected by `mock.fault = "server_error"`.
    ServerError,
    /// Injected by `mock.fault = "bad_request"`.
    BadRequest,
    /// `mock.replay` names a fixture that cannot be served; carries why.
    ReplayUnavailable(String),
    /// No route for this method and path; carries both.
    UnknownUrl(String),
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: Body<'a>,
}

#[derive(Serialize)]
struct Body<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            Self::InvalidKey => StatusCode::UNAUTHORIZED,
            Self::InvalidJson(_) | Self::InvalidMock(_) | Self::BadRequest => {
                StatusCode::BAD_REQUEST
            }
            Self::ReplayUnavailable(_) => StatusCode::BAD_REQUEST,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::ServerError => StatusCode::INTERNAL_SERVER_ERROR,
            Self::UnknownUrl(_) => StatusCode::NOT_FOUND,
        }
    }

    /// The OpenAI error `type`, `code` and `param`.
    fn shape(&self) -> (&'static str, Option<&'static str>, Option<&'static str>) {
        match self {
            Self::InvalidKey => ("invalid_request_error", Some("invalid_api_key"), None),
            Self::InvalidJson(_) => ("invalid_request_error", Some("invalid_json"), None),
            Self::InvalidMock(_) => ("invalid_request_error", Some("invalid_value"), Some("mock")),
            Self::RateLimited => ("requests", Some("rate_limit_exceeded"), None),
            Self::ServerError => ("server_error", None, None),
            Self::BadRequest => (
                "invalid_request_error",
                Some("invalid_value"),
                Some("messages"),
            ),
            Self::ReplayUnavailable(_) => (
                "invalid_request_error",
                Some("invalid_value"),
                Some("mock.replay"),
            ),
            Self::UnknownUrl(_) => ("invalid_request_error", Some("unknown_url"), None),
        }
    }

    fn message(&self) -> String {
        match self {
            Self::InvalidKey => "Incorrect API key provided.".to_owned(),
            Self::InvalidJson(why) => format!("We could not parse the JSON body: {why}"),
            Self::InvalidMock(why) => format!("Invalid 'mock' field: {why}"),
            Self::RateLimited => "Rate limit reached (mock).".to_owned(),
            Self::ServerError => {
                "The server had an error while processing your request (mock).".to_owned()
            }
            Self::BadRequest => "mock bad request".to_owned(),
            Self::ReplayUnavailable(why) => format!("Cannot replay fixture: {why}"),
            Self::UnknownUrl(what) => format!("Unknown request URL: {what}."),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = self.message();
        let (kind, code, param) = self.shape();
        let envelope = Envelope {
            error: Body {
                message: &message,
                kind,
                param,
                code,
            },
        };
        let body = serde_json::to_vec(&envelope).unwrap_or_default();

        let mut response = (self.status(), body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if matches!(self, Self::RateLimited) {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
