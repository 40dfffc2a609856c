//! The read side of the HTTP API: views, rankings, and the projections' status and
//! replay endpoints. Routed by [`crate::http::app`].
//!
//! Every view query accepts `after=TOKEN` (a position token from an append) and
//! `wait_ms`: the query waits until the projection has applied that position
//! (I10), or answers 503 `not_caught_up` when `wait_ms` runs out.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::http::AppState;
use crate::position::Position;
use crate::projection::engine::{Generation, Projection};

/// `wait_ms` when a query passes `after` without it.
pub const DEFAULT_WAIT_MS: u64 = 5_000;
/// Longest `wait_ms` a query may ask for.
pub const MAX_WAIT_MS: u64 = 60_000;
/// Default and largest `limit` of a ranking query.
pub const DEFAULT_LIMIT: usize = 10;
pub const MAX_LIMIT: usize = 1_000;

type Params = Result<Query<HashMap<String, String>>, QueryRejection>;

fn params(q: Params, allowed: &[&str]) -> Result<HashMap<String, String>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    if let Some(k) = q.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::invalid(
            k.clone(),
            format!(
                "unknown query parameter; this endpoint takes {}",
                allowed.join(", ")
            ),
        ));
    }
    Ok(q)
}

fn number<T>(q: &HashMap<String, String>, name: &str, default: T, max: T) -> Result<T, ApiError>
where
    T: std::str::FromStr + PartialOrd + Copy + std::fmt::Display,
{
    match q.get(name) {
        None => Ok(default),
        Some(v) => match v.parse::<T>() {
            Ok(n) if n <= max => Ok(n),
            _ => Err(ApiError::invalid(
                name,
                format!("must be a whole number up to {max}, got {v:?}"),
            )),
        },
    }
}

fn projection<'a>(s: &'a AppState, name: &str) -> Result<&'a Arc<Projection>, ApiError> {
    s.engine.get(name).ok_or_else(|| {
        ApiError::NotFound(format!(
            "no projection named {name:?}; GET /projections lists them"
        ))
    })
}

/// The live generation, once it covers `after` (when given).
async fn caught_up(
    p: &Projection,
    q: &HashMap<String, String>,
) -> Result<Arc<Generation>, ApiError> {
    let wait_ms = number(q, "wait_ms", DEFAULT_WAIT_MS, MAX_WAIT_MS)?;
    let Some(token) = q.get("after") else {
        return Ok(p.live());
    };
    let pos: Position = token
        .parse()
        .map_err(|e| ApiError::invalid("after", format!("not a position token: {e}")))?;
    let partitions = p.live().applied().len() as u32;
    if let Some((part, _)) = pos.entries().find(|(part, _)| *part >= partitions) {
        return Err(ApiError::invalid(
            "after",
            format!("names partition {part}; the events topic has {partitions}"),
        ));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
    loop {
        // Re-read the live generation each round: a replay may switch meanwhile.
        let g = p.live();
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if g.wait_for(&pos, left.min(Duration::from_millis(100))).await {
            return Ok(g);
        }
        if left.is_zero() {
            return Err(ApiError::NotCaughtUp {
                projection: p.name.clone(),
                position: token.clone(),
                waited_ms: wait_ms,
            });
        }
    }
}

fn path<T>(p: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    p.map(|Path(t)| t)
        .map_err(|e| ApiError::invalid("path", e.body_text()))
}

/// `GET /views/{projection}/{key}`
pub async fn view(
    State(s): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
    q: Params,
) -> Result<Json<Value>, ApiError> {
    let (name, key) = path(p)?;
    let q = params(q, &["after", "wait_ms"])?;
    let p = projection(&s, &name)?;
    let g = caught_up(p, &q).await?;
    match p.store().view(&g.id, &g.def.schema, &key).await? {
        Some(doc) => Ok(Json(Value::Object(doc))),
        None => Err(ApiError::NotFound(format!(
            "projection {name} has nothing for key {key:?}"
        ))),
    }
}

/// `GET /views/{projection}/rankings/{name}`
pub async fn ranking(
    State(s): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
    q: Params,
) -> Result<Json<Value>, ApiError> {
    let (name, ranking) = path(p)?;
    let q = params(q, &["after", "wait_ms", "limit"])?;
    let limit = number(&q, "limit", DEFAULT_LIMIT, MAX_LIMIT)?.max(1);
    let p = projection(&s, &name)?;
    let g = caught_up(p, &q).await?;
    let top = p.store().ranking(&g.id, &ranking, limit).await?;
    let members: Vec<Value> = top
        .into_iter()
        .map(|(member, score)| json!({"member": member, "score": score}))
        .collect();
    Ok(Json(json!({"ranking": ranking, "members": members})))
}

/// `GET /projections`
pub async fn list(State(s): State<AppState>) -> Json<Value> {
    let mut out = Vec::new();
    for p in s.engine.all() {
        out.push(p.status().await);
    }
    Json(json!({ "projections": out }))
}

/// `GET /projections/{name}`
pub async fn status(
    State(s): State<AppState>,
    p: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let name = path(p)?;
    Ok(Json(projection(&s, &name)?.status().await))
}

/// `POST /projections/{name}/replay`: 202, the replay runs in the background.
pub async fn start_replay(
    State(s): State<AppState>,
    p: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let name = path(p)?;
    let replay = projection(&s, &name)?.replay().await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"projection": name, "replay": replay})),
    )
        .into_response())
}

/// `DELETE /projections/{name}/replay`
pub async fn cancel_replay(
    State(s): State<AppState>,
    p: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let name = path(p)?;
    Ok(Json(projection(&s, &name)?.cancel_replay().await?))
}
