//! The read side of the HTTP API: views, search, rankings, stream history, and the
//! projections' status and replay endpoints. Routed by [`crate::http::app`].
//!
//! Search input is validated against the projection's index declaration
//! ([`IndexSpec`]) and turned into a typed [`Search`]: `q` is a string of words,
//! filters name declared exact fields with values of their type, `sort` names one
//! of them. Nothing a client sends is passed through as query DSL.
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
use crate::event::validate_stream;
use crate::http::AppState;
use crate::position::Position;
use crate::projection::engine::{Generation, Projection};
use crate::projection::history;
use crate::projection::store::ReadStore;
use crate::projection::store::doc::{
    self, DocStore, FieldType, Hit, IndexSpec, MAX_QUERY_BYTES, Order, Search, Sort,
};

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
    let ReadStore::Kv(store) = p.read_store() else {
        return Err(ApiError::invalid(
            "projection",
            format!(
                "{name} is a document projection: it has no rankings; search it with GET /views/{name}?q=..."
            ),
        ));
    };
    let top = store.ranking(&g.id, &ranking, limit).await?;
    let members: Vec<Value> = top
        .into_iter()
        .map(|(member, score)| json!({"member": member, "score": score}))
        .collect();
    Ok(Json(json!({"ranking": ranking, "members": members})))
}

/// `GET /projections`
pub async fn list(State(s): State<AppState>) -> Json<Value> {
    Json(json!({ "projections": s.engine.statuses().await }))
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

/// Parameters of `GET /views/{projection}` that are not field filters.
const SEARCH_PARAMS: [&str; 6] = ["q", "sort", "limit", "cursor", "after", "wait_ms"];

/// The document store of a document projection.
fn docs(p: &Projection) -> Result<&std::sync::Arc<dyn DocStore>, ApiError> {
    match p.read_store() {
        ReadStore::Doc(d) => Ok(d),
        ReadStore::Kv(_) => Err(ApiError::invalid(
            "projection",
            format!(
                "{} is a key-value projection: read one key with GET /views/{}/{{key}}; search is for document projections",
                p.name, p.name
            ),
        )),
    }
}

/// The sort of a search, from `sort=FIELD` / `sort=-FIELD`.
fn parse_sort(spec: &IndexSpec, sort: Option<&String>, text: bool) -> Result<Sort, ApiError> {
    let Some(sort) = sort else {
        return Ok(if text { Sort::Relevance } else { Sort::Key });
    };
    let (field, order) = match sort.strip_prefix('-') {
        Some(f) => (f, Order::Desc),
        None => (sort.strip_prefix('+').unwrap_or(sort), Order::Asc),
    };
    match spec.fields.get(field) {
        Some(t) if *t != FieldType::Text => Ok(Sort::Field(field.to_owned(), order)),
        _ => Err(ApiError::invalid(
            "sort",
            format!(
                "cannot sort by {field:?}; sortable fields: {} (prefix `-` for descending); without `sort`, hits come by relevance with `q`, else by key",
                field_list(&spec.exact_fields())
            ),
        )),
    }
}

fn field_list(fields: &[&str]) -> String {
    if fields.is_empty() {
        "none".into()
    } else {
        fields.join(", ")
    }
}

/// What a cursor is bound to: the same sort, so a cursor cannot be replayed on
/// another order.
fn sort_signature(sort: &Sort) -> String {
    match sort {
        Sort::Relevance => "_score".into(),
        Sort::Key => "_key".into(),
        Sort::Field(f, Order::Asc) => f.clone(),
        Sort::Field(f, Order::Desc) => format!("-{f}"),
    }
}

fn cursor_of(sort: &Sort, hit: &Hit) -> String {
    let mut values = vec![Value::String(sort_signature(sort))];
    values.extend(hit.sort.iter().cloned());
    doc::encode_cursor(&values)
}

fn parse_cursor(sort: &Sort, cursor: &str) -> Result<Vec<Value>, ApiError> {
    let bad = || {
        ApiError::invalid(
            "cursor",
            "not a cursor of this search: pass the `cursor` of the previous page, with the same `sort`",
        )
    };
    let mut values = doc::decode_cursor(cursor).ok_or_else(bad)?;
    if values.first() != Some(&Value::String(sort_signature(sort))) {
        return Err(bad());
    }
    values.remove(0);
    Ok(values)
}

/// Validates a search request against the projection's index.
fn parse_search(spec: &IndexSpec, q: &HashMap<String, String>) -> Result<Search, ApiError> {
    let text = match q.get("q").map(|t| t.trim()) {
        None | Some("") => None,
        Some(t) if t.len() > MAX_QUERY_BYTES => {
            return Err(ApiError::invalid(
                "q",
                format!("at most {MAX_QUERY_BYTES} bytes"),
            ));
        }
        Some(t) => {
            if spec.text_fields().is_empty() {
                return Err(ApiError::invalid(
                    "q",
                    "this projection declares no text fields to search (see its index in migrations/)",
                ));
            }
            Some(t.to_owned())
        }
    };
    let mut filters = Vec::new();
    let mut names: Vec<&String> = q
        .keys()
        .filter(|k| !SEARCH_PARAMS.contains(&k.as_str()))
        .collect();
    names.sort();
    for name in names {
        let value = match spec.fields.get(name.as_str()) {
            Some(t) if *t != FieldType::Text => t
                .parse_value(&q[name])
                .map_err(|e| ApiError::invalid(name.clone(), e))?,
            Some(_) => {
                return Err(ApiError::invalid(
                    name.clone(),
                    format!("{name} is a text field: search it with q=..."),
                ));
            }
            None => {
                return Err(ApiError::invalid(
                    name.clone(),
                    format!(
                        "unknown parameter; this endpoint takes {} and filters on {}",
                        SEARCH_PARAMS.join(", "),
                        field_list(&spec.exact_fields())
                    ),
                ));
            }
        };
        filters.push((name.clone(), value));
    }
    let sort = parse_sort(spec, q.get("sort"), text.is_some())?;
    let limit = number(q, "limit", doc::DEFAULT_LIMIT, doc::MAX_LIMIT)?.max(1);
    let after = q
        .get("cursor")
        .map(|c| parse_cursor(&sort, c))
        .transpose()?;
    Ok(Search {
        text,
        filters,
        at_least: None,
        sort,
        limit,
        after,
    })
}

/// `GET /views/{projection}?q=TEXT&FIELD=VALUE&sort=-FIELD&limit=N&cursor=C`
pub async fn search(
    State(s): State<AppState>,
    p: Result<Path<String>, PathRejection>,
    q: Params,
) -> Result<Json<Value>, ApiError> {
    let name = path(p)?;
    let Query(q) = q.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let p = projection(&s, &name)?;
    let store = docs(p)?;
    let search = parse_search(&p.spec, &q)?;
    let g = caught_up(p, &q).await?;
    let page = store.search(&g.id, &search).await?;
    let cursor = (page.hits.len() == search.limit)
        .then(|| page.hits.last().map(|h| cursor_of(&search.sort, h)))
        .flatten();
    let hits: Vec<Value> = page
        .hits
        .into_iter()
        .map(|h| {
            let doc = crate::projection::store::with_defaults(&g.def.schema, h.doc);
            json!({"key": h.key, "score": h.score, "doc": doc})
        })
        .collect();
    Ok(Json(json!({
        "projection": name,
        "total": page.total,
        "hits": hits,
        "cursor": cursor,
    })))
}

/// Largest page of `GET /streams/{stream}/events`.
pub const MAX_HISTORY_LIMIT: usize = 1_000;
/// Page size of `GET /streams/{stream}/events` when `limit` is not given.
pub const DEFAULT_HISTORY_LIMIT: usize = 100;

/// `GET /streams/{stream}/events?from=N&limit=M`: the stream's events from
/// version N on, oldest first, from the built-in stream history projection.
pub async fn stream_events(
    State(s): State<AppState>,
    p: Result<Path<String>, PathRejection>,
    q: Params,
) -> Result<Json<Value>, ApiError> {
    let stream = path(p)?;
    validate_stream(&stream).map_err(|e| ApiError::invalid("stream", e))?;
    let q = params(q, &["from", "limit", "after", "wait_ms"])?;
    let from = number(&q, "from", 1u64, i64::MAX as u64)?.max(1);
    let limit = number(&q, "limit", DEFAULT_HISTORY_LIMIT, MAX_HISTORY_LIMIT)?.max(1);
    let p = s.engine.get(history::NAME).ok_or_else(|| {
        ApiError::NotFound(
            "the stream history is switched off on this server (--stream-history false)".into(),
        )
    })?;
    let store = docs(p)?;
    let g = caught_up(p, &q).await?;
    let search = Search {
        text: None,
        filters: vec![("stream".into(), Value::String(stream.clone()))],
        at_least: Some(("version".into(), from as i64)),
        sort: Sort::Field("version".into(), Order::Asc),
        limit,
        after: None,
    };
    let page = store.search(&g.id, &search).await?;
    let events: Vec<Value> = page
        .hits
        .into_iter()
        .map(|h| Value::Object(h.doc))
        .collect();
    let next = (events.len() == limit)
        .then(|| {
            events
                .last()
                .and_then(|e| e["version"].as_u64())
                .map(|v| v + 1)
        })
        .flatten();
    Ok(Json(json!({
        "stream": stream,
        "from": from,
        "events": events,
        "next": next,
    })))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn spec() -> IndexSpec {
        IndexSpec {
            fields: BTreeMap::from([
                ("title".to_string(), FieldType::Text),
                ("tribe_id".to_string(), FieldType::Keyword),
                ("likes".to_string(), FieldType::Long),
            ]),
            settings: Default::default(),
        }
    }

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_valid_search_becomes_a_typed_request() {
        let s = parse_search(
            &spec(),
            &q(&[
                ("q", " rust  tips "),
                ("tribe_id", "t1"),
                ("likes", "3"),
                ("sort", "-likes"),
                ("limit", "5"),
            ]),
        )
        .unwrap();
        assert_eq!(s.text.as_deref(), Some("rust  tips"));
        assert_eq!(
            s.filters,
            vec![
                ("likes".to_string(), json!(3)),
                ("tribe_id".to_string(), json!("t1"))
            ]
        );
        assert_eq!(s.sort, Sort::Field("likes".into(), Order::Desc));
        assert_eq!(s.limit, 5);
        let s = parse_search(&spec(), &q(&[("q", "rust")])).unwrap();
        assert_eq!(s.sort, Sort::Relevance);
        let s = parse_search(&spec(), &q(&[])).unwrap();
        assert_eq!((s.sort, s.limit), (Sort::Key, doc::DEFAULT_LIMIT));
    }

    #[test]
    fn bad_search_input_is_refused_by_name() {
        let field_of = |pairs: &[(&str, &str)]| match parse_search(&spec(), &q(pairs)) {
            Err(ApiError::Invalid { field, .. }) => field,
            other => panic!("expected a refusal, got {other:?}"),
        };
        // Raw DSL has nowhere to go: an unknown parameter is refused.
        assert_eq!(field_of(&[("query", "{\"match_all\":{}}")]), "query");
        assert_eq!(field_of(&[("title", "x")]), "title");
        assert_eq!(field_of(&[("likes", "lots")]), "likes");
        assert_eq!(field_of(&[("sort", "title")]), "sort");
        assert_eq!(field_of(&[("sort", "-nope")]), "sort");
        assert_eq!(field_of(&[("limit", "1000")]), "limit");
        assert_eq!(field_of(&[("cursor", "zz")]), "cursor");
        let long = "a".repeat(MAX_QUERY_BYTES + 1);
        assert_eq!(field_of(&[("q", long.as_str())]), "q");
    }

    #[test]
    fn cursors_are_bound_to_their_sort() {
        let hit = Hit {
            key: "k".into(),
            score: None,
            doc: Default::default(),
            sort: vec![json!(5), json!("k")],
        };
        let by_likes = Sort::Field("likes".into(), Order::Desc);
        let c = cursor_of(&by_likes, &hit);
        assert_eq!(parse_cursor(&by_likes, &c).unwrap(), hit.sort);
        assert!(parse_cursor(&Sort::Key, &c).is_err());
    }
}
