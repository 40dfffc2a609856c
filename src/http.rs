//! The HTTP API (axum): ingest, read side ([`crate::query`]) and operations. `app(state)` is the whole router,
//! so tests drive it with `oneshot` exactly as a socket would.

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::event::{AppendInput, parse_bulk_item, parse_stream_append};
use crate::position::Position;
use crate::projection::engine::Engine;
use crate::query;
use crate::writer::{Appended, Ticket, Writer};

/// How long a request body may take to arrive.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Clone)]
pub struct AppState {
    pub writer: Writer,
    pub engine: std::sync::Arc<Engine>,
    pub body_limit: usize,
}

pub fn app(state: AppState) -> Router {
    Router::new()
        .route(
            "/streams/{stream}/events",
            post(append_to_stream).get(query::stream_events),
        )
        .route("/events", post(append_bulk))
        .route("/views/{projection}", get(query::search))
        .route("/views/{projection}/{key}", get(query::view))
        .route("/views/{projection}/rankings/{name}", get(query::ranking))
        .route("/projections", get(query::list))
        .route("/projections/{name}", get(query::status))
        .route(
            "/projections/{name}/replay",
            post(query::start_replay).delete(query::cancel_replay),
        )
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .fallback(|| async {
            ApiError::NotFound("no such endpoint; see the README for the API".into())
        })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state)
}

async fn readyz(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    if !s.writer.is_healthy() {
        return Err(ApiError::NotReady(
            "the write path is re-reading the event log after a failed write".into(),
        ));
    }
    let failed = s.engine.failed();
    if !failed.is_empty() {
        return Err(ApiError::NotReady(format!(
            "projections halted on an event they cannot apply: {}; see GET /projections",
            failed.join(", ")
        )));
    }
    Ok(Json(json!({"status": "ready"})))
}

/// Reserves write-path room for the body, then reads it within the limit.
async fn admit(s: &AppState, headers: &HeaderMap, body: Body) -> Result<(Ticket, Bytes), ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > s.body_limit) {
        return Err(ApiError::PayloadTooLarge {
            limit: s.body_limit,
        });
    }
    let ticket = s.writer.reserve(declared.unwrap_or(s.body_limit))?;
    // A slow client must not hold its share of the budget forever.
    let bytes = tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, s.body_limit))
        .await
        .map_err(|_| ApiError::RequestTimeout(BODY_TIMEOUT.as_secs()))?
        .map_err(|_| ApiError::PayloadTooLarge {
            limit: s.body_limit,
        })?;
    Ok((ticket, bytes))
}

fn malformed(e: serde_json::Error) -> ApiError {
    ApiError::MalformedJson(format!("the body is not valid JSON: {e}"))
}

async fn append_to_stream(
    State(s): State<AppState>,
    stream: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Path(stream) = stream.map_err(|e| ApiError::invalid("stream", e.body_text()))?;
    let (ticket, bytes) = admit(&s, &headers, body).await?;
    let value: Value = serde_json::from_slice(&bytes).map_err(malformed)?;
    let input = parse_stream_append(&stream, value)?;
    let result = s
        .writer
        .append(ticket, vec![input])
        .await?
        .pop()
        .expect("one result per append")?;
    let status = if result.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(result)).into_response())
}

/// Splits a bulk body into items: a JSON array, or NDJSON (one event per line).
fn bulk_items(
    headers: &HeaderMap,
    bytes: &[u8],
) -> Result<Vec<Result<AppendInput, ApiError>>, ApiError> {
    let ndjson = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.contains("ndjson") || ct.contains("jsonlines"));
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    let items = if !ndjson && first == Some(&b'[') {
        let Value::Array(items) = serde_json::from_slice(bytes).map_err(malformed)? else {
            unreachable!("starts with [")
        };
        items
            .into_iter()
            .enumerate()
            .map(|(i, v)| parse_bulk_item(v).map_err(|e| at_item(e, &format!("[{i}]"))))
            .collect()
    } else {
        let text = std::str::from_utf8(bytes)
            .map_err(|e| ApiError::MalformedJson(format!("the body is not UTF-8: {e}")))?;
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(n, line)| {
                serde_json::from_str(line)
                    .map_err(|e| {
                        ApiError::MalformedJson(format!("line {}: not valid JSON: {e}", n + 1))
                    })
                    .and_then(|v| {
                        parse_bulk_item(v).map_err(|e| at_item(e, &format!("line {}", n + 1)))
                    })
            })
            .collect()
    };
    Ok(items)
}

fn at_item(e: ApiError, at: &str) -> ApiError {
    match e {
        ApiError::Invalid { field, message } => ApiError::Invalid {
            message: format!("{at}: {message}"),
            field,
        },
        e => e,
    }
}

async fn append_bulk(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (ticket, bytes) = admit(&s, &headers, body).await?;
    let items = bulk_items(&headers, &bytes)?;
    if items.is_empty() {
        return Err(ApiError::invalid(
            "body",
            "holds no events: send a JSON array or one event per line",
        ));
    }
    // Valid items go to the writer; refused ones keep their place in the answer.
    let mut valid = Vec::with_capacity(items.len());
    let slots: Vec<Option<ApiError>> = items
        .into_iter()
        .map(|item| match item {
            Ok(a) => {
                valid.push(a);
                None
            }
            Err(e) => Some(e),
        })
        .collect();
    let mut results = s.writer.append(ticket, valid).await?.into_iter();
    let mut position = Position::default();
    let mut errors = false;
    let out: Vec<Value> = slots
        .into_iter()
        .map(|slot| {
            match slot.map_or_else(|| results.next().expect("one result per append"), Err) {
                Ok(Appended {
                    stream,
                    first_version,
                    position: p,
                    events,
                    created,
                    ..
                }) => {
                    position.merge(&p);
                    json!({
                        "status": if created { 201 } else { 200 },
                        "stream": stream,
                        "id": events[0].id,
                        "version": first_version,
                    })
                }
                Err(e) => {
                    errors = true;
                    json!({"status": e.status().as_u16(), "error": e.body()})
                }
            }
        })
        .collect();
    let position = (!position.is_empty()).then(|| position.to_string());
    Ok(Json(json!({"errors": errors, "items": out, "position": position})).into_response())
}
