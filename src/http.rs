//! The HTTP API (axum): ingest, read side ([`crate::query`]) and operations. `app(state)` is the whole router,
//! so tests drive it with `oneshot` exactly as a socket would.

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::auth::{ApiKeys, Scope};
use crate::error::ApiError;
use crate::event::{AppendInput, parse_bulk_item, parse_stream_append};
use crate::metrics::{Metrics, Tally};
use crate::openapi::{self, Op, int, read_your_writes, reference, string};
use crate::position::Position;
use crate::projection::engine::Engine;
use crate::query;
use crate::writer::{Appended, Ticket, Writer};

/// How long a request body may take to arrive.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Clone)]
pub struct AppState {
    pub writer: Writer,
    pub engine: Arc<Engine>,
    pub body_limit: usize,
    pub keys: Arc<ApiKeys>,
    pub metrics: Arc<Metrics>,
    /// Checks the log and the stores answer, for `GET /readyz`.
    pub backends: Arc<dyn Backends>,
}

/// What `GET /readyz` asks of the backends.
#[async_trait::async_trait]
pub trait Backends: Send + Sync {
    /// `Err(reason)` when the log or a store of `engine`'s projections does not
    /// answer, or the migrations are not applied.
    async fn ready(&self, engine: &Engine) -> Result<(), String>;
}

/// One endpoint of the API: the router and the OpenAPI document are both built
/// from the list [`endpoints`] returns.
pub struct Endpoint {
    pub method: Method,
    pub path: &'static str,
    /// The scope an API key needs (`None`: open to all).
    pub scope: Option<Scope>,
    pub op: Op,
    handler: MethodRouter<AppState>,
}

fn endpoint(
    method: Method,
    path: &'static str,
    scope: Option<Scope>,
    handler: MethodRouter<AppState>,
    op: Op,
) -> Endpoint {
    Endpoint {
        method,
        path,
        scope,
        op,
        handler,
    }
}

/// Every endpoint with its handler, scope and description.
pub fn endpoints() -> Vec<Endpoint> {
    use Scope::{Admin, Append, Read};
    vec![
        endpoint(Method::POST, "/streams/{stream}/events", Some(Append), post(append_to_stream),
            Op::new("appendToStream", "ingest", "Append events to one stream (all or nothing)")
                .body(&[("application/json", json!({"oneOf": [reference("StreamAppend"), reference("Event")]}))])
                .ok(201, "appended", "Appended")
                .ok(200, "an idempotent repeat of an earlier append: nothing appended", "Appended")),
        endpoint(Method::GET, "/streams/{stream}/events", Some(Read), get(query::stream_events),
            Op::new("streamEvents", "read", "A stream's events, oldest first, from version `from`")
                .query([
                    int("from", "first version to return", 1, i64::MAX as u64),
                    int("limit", "most events to return", 1, query::MAX_HISTORY_LIMIT as u64),
                ])
                .query(read_your_writes())
                .ok(200, "a page of the stream's events", "StreamHistory")),
        endpoint(Method::POST, "/events", Some(Append), post(append_bulk),
            Op::new("appendBulk", "ingest", "Append events across streams (not atomic across streams)")
                .body(&[
                    ("application/json", json!({"type": "array", "items": reference("BulkEvent"), "minItems": 1})),
                    ("application/x-ndjson", json!({"type": "string", "description": "one BulkEvent per line"})),
                ])
                .ok(200, "one result per event, in order", "BulkResult")),
        endpoint(Method::GET, "/views/{projection}", Some(Read), get(query::search),
            Op::new("search", "read", "Search and list a document projection (declared fields filter as FIELD=VALUE)")
                .query([
                    string("q", "words to match in the text fields"),
                    string("sort", "FIELD or -FIELD (a declared exact field)"),
                    int("limit", "page size", 1, crate::projection::store::doc::MAX_LIMIT as u64),
                    string("cursor", "the `cursor` of the previous page"),
                ])
                .query(read_your_writes())
                .ok(200, "a page of matching documents", "SearchPage")),
        endpoint(Method::GET, "/views/{projection}/{key}", Some(Read), get(query::view),
            Op::new("view", "read", "The read model of one key")
                .query(read_your_writes())
                .ok(200, "the document or value", "Document")),
        endpoint(Method::GET, "/views/{projection}/rankings/{name}", Some(Read), get(query::ranking),
            Op::new("ranking", "read", "Top members of a ranking, highest score first")
                .query([int("limit", "most members", 1, query::MAX_LIMIT as u64)])
                .query(read_your_writes())
                .ok(200, "the ranking", "Ranking")),
        endpoint(Method::GET, "/projections", Some(Read), get(query::list),
            Op::new("listProjections", "projections", "Every projection's status")
                .ok(200, "the projections", "ProjectionList")),
        endpoint(Method::GET, "/projections/{name}", Some(Read), get(query::status),
            Op::new("projectionStatus", "projections", "One projection's status: generation, state, positions, lag, rate, dead letters, replay")
                .ok(200, "the status", "ProjectionStatus")),
        endpoint(Method::POST, "/projections/{name}/replay", Some(Admin), post(query::start_replay),
            Op::new("startReplay", "projections", "Rebuild the projection from its definition on disk into a new generation; switch when caught up")
                .ok(202, "the replay started", "ReplayStarted")),
        endpoint(Method::DELETE, "/projections/{name}/replay", Some(Admin), delete(query::cancel_replay),
            Op::new("cancelReplay", "projections", "Cancel the running replay and drop its generation")
                .ok(200, "cancelled", "ReplayCancelled")),
        endpoint(Method::GET, "/healthz", None, get(|| async { Json(json!({"status": "ok"})) }),
            Op::new("healthz", "operations", "The process is alive")
                .ok(200, "alive", "Status")),
        endpoint(Method::GET, "/readyz", None, get(readyz),
            Op::new("readyz", "operations", "Ready to serve: backends reachable, migrations applied, write path healthy, no projection failed")
                .ok(200, "ready", "Status")),
        endpoint(Method::GET, "/metrics", Some(Read), get(metrics),
            Op::new("metrics", "operations", "Prometheus metrics (OpenMetrics text)")
                .text(200, "the exposition", crate::metrics::CONTENT_TYPE)),
        endpoint(Method::GET, "/openapi.json", None, get(openapi_json),
            Op::new("openapi", "operations", "This document")
                .ok(200, "the OpenAPI 3 document", "OpenApi")),
    ]
}

/// The OpenAPI document of [`endpoints`].
pub fn openapi_document() -> Value {
    let eps = endpoints();
    openapi::document(
        eps.iter()
            .map(|e| (e.method.as_str(), e.path, e.scope, &e.op)),
    )
}

pub fn app(state: AppState) -> Router {
    let mut router = Router::new();
    for e in endpoints() {
        // The scope check wraps the handler itself, so every method the handler
        // answers (HEAD with GET) needs the key; methods the table does not list
        // are 405 before any handler runs.
        let keys = state.keys.clone();
        let scope = e.scope;
        let handler =
            e.handler
                .route_layer(middleware::from_fn(move |req: Request, next: Next| {
                    let keys = keys.clone();
                    async move {
                        match keys.check(req.headers(), scope) {
                            Ok(()) => next.run(req).await,
                            Err(e) => e.into_response(),
                        }
                    }
                }));
        router = router.route(e.path, handler);
    }
    router
        .fallback(|| async {
            ApiError::NotFound("no such endpoint; see GET /openapi.json or the README".into())
        })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .with_state(state)
}

/// Counts every answer by method, route template and status.
async fn count(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned());
    // A fixed set: methods are client input, labels must stay bounded.
    let method = match *req.method() {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let resp = next.run(req).await;
    s.metrics.http_request(
        method,
        route.as_deref().unwrap_or("unmatched"),
        resp.status().as_u16(),
    );
    resp
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
    s.backends
        .ready(&s.engine)
        .await
        .map_err(ApiError::NotReady)?;
    Ok(Json(json!({"status": "ready"})))
}

/// How long a scrape waits for the projections' positions (the log's end
/// offsets); past it, the scrape answers without the projection gauges.
const SCRAPE_STATUS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

async fn metrics(State(s): State<AppState>) -> Response {
    let statuses = tokio::time::timeout(SCRAPE_STATUS_TIMEOUT, s.engine.statuses()).await;
    if statuses.is_err() {
        tracing::warn!(
            "metrics: projection status took over 3 s (is the log slow?); scraped without projection gauges"
        );
    }
    let body = s
        .metrics
        .scrape(s.writer.queue(), statuses.as_deref().unwrap_or(&[]));
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body).into_response()
}

async fn openapi_json() -> Response {
    static DOC: std::sync::LazyLock<Bytes> =
        std::sync::LazyLock::new(|| Bytes::from(openapi_document().to_string()));
    ([(header::CONTENT_TYPE, "application/json")], DOC.clone()).into_response()
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
) -> Response {
    let started = Instant::now();
    let mut events = 0;
    let result = append_one(&s, stream, &headers, body, &mut events).await;
    let outcome = match &result {
        Ok(r) if r.created => "created",
        Ok(_) => "repeated",
        Err(e) => e.code(),
    };
    let mut tally = Tally::default();
    tally.record(result.as_ref().ok().map(|r| r.created), events);
    s.metrics
        .ingest("stream", outcome, started.elapsed(), tally);
    match result {
        Ok(r) if r.created => (StatusCode::CREATED, Json(r)).into_response(),
        Ok(r) => (StatusCode::OK, Json(r)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// One stream's append; `events` is set once the request's events are known.
async fn append_one(
    s: &AppState,
    stream: Result<Path<String>, PathRejection>,
    headers: &HeaderMap,
    body: Body,
    events: &mut u64,
) -> Result<Appended, ApiError> {
    let Path(stream) = stream.map_err(|e| ApiError::invalid("stream", e.body_text()))?;
    let (ticket, bytes) = admit(s, headers, body).await?;
    let value: Value = serde_json::from_slice(&bytes).map_err(malformed)?;
    let input = parse_stream_append(&stream, value)?;
    *events = input.events.len() as u64;
    s.writer
        .append(ticket, vec![input])
        .await?
        .pop()
        .expect("one result per append")
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

async fn append_bulk(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let mut tally = Tally::default();
    let result = bulk(&s, &headers, body, &mut tally).await;
    let outcome = result.as_ref().map_or_else(|e| e.code(), |_| "accepted");
    s.metrics.ingest("bulk", outcome, started.elapsed(), tally);
    result.map_or_else(IntoResponse::into_response, |v| Json(v).into_response())
}

async fn bulk(
    s: &AppState,
    headers: &HeaderMap,
    body: Body,
    tally: &mut Tally,
) -> Result<Value, ApiError> {
    let (ticket, bytes) = admit(s, headers, body).await?;
    let items = bulk_items(headers, &bytes)?;
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
                    tally.record(Some(created), 1);
                    json!({
                        "status": if created { 201 } else { 200 },
                        "stream": stream,
                        "id": events[0].id,
                        "version": first_version,
                    })
                }
                Err(e) => {
                    errors = true;
                    tally.record(None, 1);
                    json!({"status": e.status().as_u16(), "error": e.body()})
                }
            }
        })
        .collect();
    let position = (!position.is_empty()).then(|| position.to_string());
    Ok(json!({"errors": errors, "items": out, "position": position}))
}
