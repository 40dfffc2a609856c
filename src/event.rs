//! Events: what clients send, how it is validated, and the envelope in the log.
//!
//! Validation happens once, here, before anything reaches the write path; every
//! refusal names the offending field (`events[2].type`), so a client can fix it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::error::ApiError;

/// An event accepted for appending, ids assigned.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub id: Uuid,
    /// Whether the client chose the id (only those make retries idempotent).
    pub client_id: bool,
    pub event_type: String,
    pub data: Map<String, Value>,
    pub metadata: Map<String, Value>,
}

/// One append to one stream: the unit of versioning and concurrency control.
#[derive(Debug, Clone, PartialEq)]
pub struct AppendInput {
    pub stream: String,
    pub expected_version: Option<u64>,
    pub events: Vec<NewEvent>,
}

/// The JSON value of an event record in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: Uuid,
    pub stream: String,
    pub version: u64,
    #[serde(rename = "type")]
    pub event_type: String,
    pub data: Map<String, Value>,
    #[serde(default)]
    pub metadata: Map<String, Value>,
    pub recorded_at: String,
}

impl Envelope {
    /// The record key: unique per event, so compaction never drops history (I5).
    pub fn key(&self) -> String {
        event_key(&self.stream, self.version)
    }
}

pub fn event_key(stream: &str, version: u64) -> String {
    format!("{stream}/{version}")
}

/// The category of a stream: the part before the first `-`.
pub fn category(stream: &str) -> &str {
    stream.split_once('-').map_or(stream, |(c, _)| c)
}

/// `[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}`
pub fn validate_stream(stream: &str) -> Result<(), String> {
    let ok = matches!(stream.as_bytes().first(), Some(c) if c.is_ascii_alphanumeric())
        && stream.len() <= 200
        && stream
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"_.:-".contains(&c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{stream:?} is not a valid stream name: 1 to 200 characters from [A-Za-z0-9_.:-], starting with a letter or digit"
        ))
    }
}

/// `[A-Za-z][A-Za-z0-9_.-]{0,127}`
pub fn validate_type(t: &str) -> Result<(), String> {
    let ok = matches!(t.as_bytes().first(), Some(c) if c.is_ascii_alphabetic())
        && t.len() <= 128
        && t.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(&c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{t:?} is not a valid event type: 1 to 128 characters from [A-Za-z0-9_.-], starting with a letter"
        ))
    }
}

/// The record header naming the event's type, on every event the writer appends:
/// readers can skip events of types they ignore without parsing them.
pub const TYPE_HEADER: &str = "type";

const EVENT_FIELDS: &[&str] = &["type", "data", "id", "metadata"];

fn object(v: Value, field: &str) -> Result<Map<String, Value>, ApiError> {
    match v {
        Value::Object(m) => Ok(m),
        other => Err(ApiError::invalid(
            field,
            format!("must be a JSON object, got {}", kind(&other)),
        )),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn join(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_owned()
    } else {
        format!("{prefix}.{field}")
    }
}

/// Parses one EVENT object; `extra` names further keys allowed beside its fields.
fn parse_event(mut m: Map<String, Value>, at: &str, extra: &[&str]) -> Result<NewEvent, ApiError> {
    if let Some(k) = m
        .keys()
        .find(|k| !EVENT_FIELDS.contains(&k.as_str()) && !extra.contains(&k.as_str()))
    {
        let allowed: Vec<&str> = EVENT_FIELDS.iter().chain(extra).copied().collect();
        return Err(ApiError::invalid(
            join(at, k),
            format!("unknown field; an event has {}", allowed.join(", ")),
        ));
    }
    let event_type = match m.remove("type") {
        Some(Value::String(t)) => {
            validate_type(&t).map_err(|e| ApiError::invalid(join(at, "type"), e))?;
            t
        }
        Some(v) => {
            return Err(ApiError::invalid(
                join(at, "type"),
                format!("must be a string, got {}", kind(&v)),
            ));
        }
        None => return Err(ApiError::invalid(join(at, "type"), "is required")),
    };
    let data = match m.remove("data") {
        Some(v) => object(v, &join(at, "data"))?,
        None => {
            return Err(ApiError::invalid(
                join(at, "data"),
                "is required (a JSON object)",
            ));
        }
    };
    let metadata = match m.remove("metadata") {
        None | Some(Value::Null) => Map::new(),
        Some(v) => object(v, &join(at, "metadata"))?,
    };
    let (id, client_id) = match m.remove("id") {
        None | Some(Value::Null) => (Uuid::new_v4(), false),
        Some(Value::String(s)) => (
            Uuid::parse_str(&s)
                .map_err(|_| ApiError::invalid(join(at, "id"), format!("{s:?} is not a UUID")))?,
            true,
        ),
        Some(v) => {
            return Err(ApiError::invalid(
                join(at, "id"),
                format!("must be a UUID string, got {}", kind(&v)),
            ));
        }
    };
    Ok(NewEvent {
        id,
        client_id,
        event_type,
        data,
        metadata,
    })
}

fn parse_expected(v: Option<Value>, field: &str) -> Result<Option<u64>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64()),
        Some(v) => Err(ApiError::invalid(
            field,
            format!("must be a non-negative integer, got {v}"),
        )),
    }
}

fn check_ids(events: &[NewEvent], at: impl Fn(usize) -> String) -> Result<(), ApiError> {
    for (i, e) in events.iter().enumerate() {
        if events[..i].iter().any(|o| o.id == e.id) {
            return Err(ApiError::invalid(
                at(i),
                format!("event id {} appears twice in the request", e.id),
            ));
        }
    }
    Ok(())
}

/// The body of `POST /streams/{stream}/events`: `{"events": [...], "expected_version": N}`
/// or a single EVENT (which may carry `expected_version` too).
pub fn parse_stream_append(stream: &str, body: Value) -> Result<AppendInput, ApiError> {
    validate_stream(stream).map_err(|e| ApiError::invalid("stream", e))?;
    let mut m = object(body, "body")?;
    let expected_version = parse_expected(m.remove("expected_version"), "expected_version")?;
    let events = if let Some(events) = m.remove("events") {
        if let Some(k) = m.keys().next() {
            return Err(ApiError::invalid(
                k.clone(),
                "unknown field; a batch has events and expected_version",
            ));
        }
        let Value::Array(items) = events else {
            return Err(ApiError::invalid(
                "events",
                format!("must be an array, got {}", kind(&events)),
            ));
        };
        if items.is_empty() {
            return Err(ApiError::invalid("events", "must hold at least one event"));
        }
        let events = items
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let at = format!("events[{i}]");
                parse_event(object(v, &at)?, &at, &[])
            })
            .collect::<Result<Vec<_>, _>>()?;
        check_ids(&events, |i| format!("events[{i}].id"))?;
        events
    } else {
        vec![parse_event(m, "", &[])?]
    };
    Ok(AppendInput {
        stream: stream.to_owned(),
        expected_version,
        events,
    })
}

/// One item of `POST /events`: an EVENT plus `stream` (and optional `expected_version`).
pub fn parse_bulk_item(v: Value) -> Result<AppendInput, ApiError> {
    let mut m = object(v, "line")?;
    let stream = match m.remove("stream") {
        Some(Value::String(s)) => s,
        Some(v) => {
            return Err(ApiError::invalid(
                "stream",
                format!("must be a string, got {}", kind(&v)),
            ));
        }
        None => return Err(ApiError::invalid("stream", "is required")),
    };
    validate_stream(&stream).map_err(|e| ApiError::invalid("stream", e))?;
    let expected_version = parse_expected(m.remove("expected_version"), "expected_version")?;
    let event = parse_event(m, "", &["stream", "expected_version"])?;
    Ok(AppendInput {
        stream,
        expected_version,
        events: vec![event],
    })
}

/// Milliseconds since the Unix epoch (record timestamps).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Now as RFC 3339 UTC with milliseconds, e.g. `2026-11-23T22:57:01.123Z`.
pub fn now_rfc3339() -> String {
    rfc3339(now_ms())
}

pub fn rfc3339(ms: i64) -> String {
    let (secs, millis) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_follow_the_contract() {
        assert!(validate_stream("post-42").is_ok());
        assert!(validate_stream("a:b.c_d-e").is_ok());
        assert!(validate_stream(&"a".repeat(200)).is_ok());
        assert!(validate_stream(&"a".repeat(201)).is_err());
        for bad in ["", "-post", "_x", "post 1", "post/1", "é"] {
            assert!(validate_stream(bad).is_err(), "{bad:?}");
        }
        assert!(validate_type("PostLiked").is_ok());
        assert!(validate_type("v2.Post_Liked-x").is_ok());
        assert!(validate_type(&format!("A{}", "a".repeat(127))).is_ok());
        assert!(validate_type(&format!("A{}", "a".repeat(128))).is_err());
        for bad in ["", "1Post", "Post:Liked", "Post Liked"] {
            assert!(validate_type(bad).is_err(), "{bad:?}");
        }
        assert_eq!(category("post-42-x"), "post");
        assert_eq!(category("post"), "post");
    }

    #[test]
    fn single_event_shorthand_and_batches_parse() {
        let a =
            parse_stream_append("post-1", json!({"type": "PostLiked", "data": {"a": 1}})).unwrap();
        assert_eq!(a.events.len(), 1);
        assert!(!a.events[0].client_id);
        assert_eq!(a.expected_version, None);
        let id = Uuid::new_v4();
        let b = parse_stream_append(
            "post-1",
            json!({"expected_version": 0, "events": [
                {"type": "A", "data": {}, "id": id.to_string(), "metadata": {"m": 1}},
                {"type": "B", "data": {}}]}),
        )
        .unwrap();
        assert_eq!(b.expected_version, Some(0));
        assert_eq!(b.events[0].id, id);
        assert!(b.events[0].client_id);
        assert_eq!(b.events[0].metadata["m"], 1);
    }

    #[test]
    fn invalid_fields_are_named() {
        let field = |body: Value| match parse_stream_append("post-1", body) {
            Err(ApiError::Invalid { field, .. }) => field,
            other => panic!("expected a validation error, got {other:?}"),
        };
        assert_eq!(field(json!({"data": {}})), "type");
        assert_eq!(field(json!({"type": "9x", "data": {}})), "type");
        assert_eq!(field(json!({"type": "A", "data": 3})), "data");
        assert_eq!(field(json!({"type": "A"})), "data");
        assert_eq!(field(json!({"type": "A", "data": {}, "id": "nope"})), "id");
        assert_eq!(field(json!({"type": "A", "data": {}, "extra": 1})), "extra");
        assert_eq!(field(json!({"events": []})), "events");
        assert_eq!(
            field(json!({"events": [{"type": "A", "data": {}}, {"type": "A"}]})),
            "events[1].data"
        );
        assert_eq!(
            field(json!({"events": [], "expected_version": -1})),
            "expected_version"
        );
        assert_eq!(field(json!([1])), "body");
        let id = Uuid::new_v4().to_string();
        assert_eq!(
            field(
                json!({"events": [{"type": "A", "data": {}, "id": id}, {"type": "A", "data": {}, "id": id}]})
            ),
            "events[1].id"
        );
        assert!(matches!(
            parse_stream_append("bad stream", json!({"type": "A", "data": {}})),
            Err(ApiError::Invalid { field, .. }) if field == "stream"
        ));
    }

    #[test]
    fn bulk_items_carry_their_stream() {
        let a = parse_bulk_item(json!({"stream": "user-1", "type": "UserRegistered", "data": {}, "expected_version": 0})).unwrap();
        assert_eq!(a.stream, "user-1");
        assert_eq!(a.expected_version, Some(0));
        assert!(parse_bulk_item(json!({"type": "A", "data": {}})).is_err());
        assert!(parse_bulk_item(json!({"stream": "-x", "type": "A", "data": {}})).is_err());
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_795_392_000_000), "2026-11-23T00:00:00.000Z");
    }
}
