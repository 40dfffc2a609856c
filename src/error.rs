//! The service's one error type at the HTTP edge.
//!
//! Every variant documents its status and machine-readable `code`; all of them
//! render as `{"error": {"code": "...", "message": "...", ...details}}`. Adapters
//! translate their own failures into these variants; a 500 never leaks details to
//! the client (they are logged instead).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// 400 `malformed_json`: the body is not JSON (or not NDJSON).
    #[error("{0}")]
    MalformedJson(String),
    /// 422 `validation_failed`: well-formed JSON with an invalid field.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// 413 `payload_too_large`: body over the configured limit.
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// 413 `payload_too_large`: one event is larger than the log takes.
    #[error(
        "event {index} is {size} bytes as a log record; the log takes records up to {limit} bytes"
    )]
    RecordTooLarge {
        index: usize,
        size: usize,
        limit: usize,
    },
    /// 408 `request_timeout`: the body did not arrive in time.
    #[error("the request body did not arrive within {0} s")]
    RequestTimeout(u64),
    /// 409 `wrong_expected_version`: optimistic concurrency check failed.
    #[error("stream {stream} is at version {actual}, the request expected {expected}")]
    WrongExpectedVersion {
        stream: String,
        expected: u64,
        actual: u64,
    },
    /// 409 `duplicate_event_id`: some event ids are already in the stream, but the
    /// request is not an exact repeat of an earlier append.
    #[error("{0}")]
    DuplicateEventId(String),
    /// 429 `overloaded`: the write path's bounded buffer is full; retry later.
    #[error("the write path is saturated; retry after {retry_after} s")]
    Overloaded { retry_after: u64 },
    /// 503 `log_unavailable`: the log did not confirm the write (the events may or
    /// may not be in the log: retry with the same event ids).
    #[error("{message}")]
    LogUnavailable { message: String, retry_after: u64 },
    /// 503 `not_caught_up`: a query's `after` position was not applied within
    /// `wait_ms`; retry, or ask without `after` for the current state.
    #[error("projection {projection} has not applied position {position} within {waited_ms} ms")]
    NotCaughtUp {
        projection: String,
        position: String,
        waited_ms: u64,
    },
    /// 409 `replay_in_progress`: one replay per projection at a time.
    #[error("{0}")]
    ReplayInProgress(String),
    /// 422 `invalid_definition`: a projection definition does not parse or validate.
    #[error("{0}")]
    InvalidDefinition(String),
    /// 503 `store_unavailable`: the read-model store cannot be reached; retry.
    #[error("{0}")]
    StoreUnavailable(String),
    /// 503 `not_ready`: see `GET /readyz`.
    #[error("{0}")]
    NotReady(String),
    /// 503 `shutting_down`.
    #[error("refold is shutting down")]
    ShuttingDown,
    /// 401 `unauthorized`: no API key, or one refold does not know.
    #[error("{0}")]
    Unauthorized(String),
    /// 403 `forbidden`: the API key lacks the scope the endpoint needs.
    #[error("the API key lacks the `{scope}` scope this endpoint needs")]
    Forbidden { scope: &'static str },
    /// 404 `not_found`.
    #[error("{0}")]
    NotFound(String),
    /// 405 `method_not_allowed`.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 500 `internal`: details are logged, not returned.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::MalformedJson(_) => StatusCode::BAD_REQUEST,
            Self::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::PayloadTooLarge { .. } | Self::RecordTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::WrongExpectedVersion { .. } | Self::DuplicateEventId(_) => StatusCode::CONFLICT,
            Self::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::ReplayInProgress(_) => StatusCode::CONFLICT,
            Self::InvalidDefinition(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::LogUnavailable { .. }
            | Self::NotReady(_)
            | Self::ShuttingDown
            | Self::NotCaughtUp { .. }
            | Self::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::MalformedJson(_) => "malformed_json",
            Self::Invalid { .. } => "validation_failed",
            Self::PayloadTooLarge { .. } | Self::RecordTooLarge { .. } => "payload_too_large",
            Self::RequestTimeout(_) => "request_timeout",
            Self::NotReady(_) => "not_ready",
            Self::WrongExpectedVersion { .. } => "wrong_expected_version",
            Self::DuplicateEventId(_) => "duplicate_event_id",
            Self::Overloaded { .. } => "overloaded",
            Self::LogUnavailable { .. } => "log_unavailable",
            Self::ShuttingDown => "shutting_down",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden { .. } => "forbidden",
            Self::NotFound(_) => "not_found",
            Self::NotCaughtUp { .. } => "not_caught_up",
            Self::ReplayInProgress(_) => "replay_in_progress",
            Self::InvalidDefinition(_) => "invalid_definition",
            Self::StoreUnavailable(_) => "store_unavailable",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Internal(_) => "internal",
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Overloaded { retry_after } | Self::LogUnavailable { retry_after, .. } => {
                Some(*retry_after)
            }
            Self::ShuttingDown | Self::NotReady(_) => Some(5),
            Self::NotCaughtUp { .. } | Self::StoreUnavailable(_) => Some(1),
            _ => None,
        }
    }

    /// The `{"code", "message", ...details}` object (also used per line in bulk).
    pub fn body(&self) -> Value {
        let mut e = Map::new();
        e.insert("code".into(), self.code().into());
        e.insert("message".into(), self.to_string().into());
        match self {
            Self::Invalid { field, .. } => {
                e.insert("field".into(), field.clone().into());
            }
            Self::PayloadTooLarge { limit } => {
                e.insert("limit".into(), (*limit).into());
            }
            Self::RecordTooLarge { limit, .. } => {
                e.insert("limit".into(), (*limit).into());
            }
            Self::WrongExpectedVersion {
                stream,
                expected,
                actual,
            } => {
                e.insert("stream".into(), stream.clone().into());
                e.insert("expected".into(), (*expected).into());
                e.insert("actual".into(), (*actual).into());
            }
            Self::Forbidden { scope } => {
                e.insert("required_scope".into(), (*scope).into());
            }
            Self::NotCaughtUp {
                projection,
                position,
                waited_ms,
            } => {
                e.insert("projection".into(), projection.clone().into());
                e.insert("position".into(), position.clone().into());
                e.insert("waited_ms".into(), (*waited_ms).into());
            }
            _ => {}
        }
        if let Some(s) = self.retry_after() {
            e.insert("retry_after".into(), s.into());
        }
        Value::Object(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(detail) = &self {
            tracing::error!(detail = %detail, "internal error");
        }
        let mut resp = (self.status(), axum::Json(json!({ "error": self.body() }))).into_response();
        if let Some(s) = self.retry_after() {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if let Self::Unauthorized(_) = self {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"refold\""),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_shape_and_status() {
        let e = ApiError::WrongExpectedVersion {
            stream: "s".into(),
            expected: 1,
            actual: 3,
        };
        assert_eq!(e.status(), StatusCode::CONFLICT);
        let b = e.body();
        assert_eq!(b["code"], "wrong_expected_version");
        assert_eq!(b["expected"], 1);
        assert_eq!(b["actual"], 3);
        let r = ApiError::Overloaded { retry_after: 1 }.into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let r = ApiError::Internal("secret detail".into());
        assert!(!r.body().to_string().contains("secret"));
    }
}
