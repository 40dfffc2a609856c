//! The document read-model port, after Elasticsearch's semantics: one JSON
//! document per key, searchable. Adapters: [`super::elastic::ElasticStore`] and
//! [`super::embedded_docs::EmbeddedDocs`] (tantivy).
//!
//! What is shared by both adapters lives here: how a batch's [`DocDelta`] changes
//! a document ([`apply_delta`]), the bookkeeping fields every stored document
//! carries ([`KEY_FIELD`], [`APPLIED_FIELD`]), the index declaration taken from
//! `migrations/` ([`IndexSpec`]) and the validated search request ([`Search`]).
//!
//! Idempotency (I6). A stored document records, per partition, the offset up to
//! which that partition's events are in it ([`APPLIED_FIELD`]). Sessions return it
//! with the document ([`crate::projection::fold::DocReads::applied`]), and the fold skips the changes the
//! document already holds. So a batch written again after a crash, or after a
//! conflict on one document, changes nothing twice, whatever the batch boundaries.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{GenRef, Schema, Store, StoreResult, parse_json, with_defaults};
use crate::projection::fold::{DocDelta, FieldDelta};

/// Every stored document holds its key here (a keyword: exact match, sort).
pub const KEY_FIELD: &str = "refold_key";
/// Partition (as a string) → next offset: what the document already holds.
pub const APPLIED_FIELD: &str = "refold_applied";

/// Largest page of a search.
pub const MAX_LIMIT: usize = 100;
/// Page size when `limit` is not given.
pub const DEFAULT_LIMIT: usize = 10;
/// Longest `q`, in bytes.
pub const MAX_QUERY_BYTES: usize = 1024;

/// How a field of a document projection's index is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    /// Analyzed text: searched by `q` (relevance), not filtered or sorted.
    Text,
    /// An exact string: filters and sort.
    Keyword,
    /// A 64-bit integer: filters, ranges and sort.
    Long,
    /// A 64-bit float: filters and sort.
    Double,
    Boolean,
}

impl FieldType {
    pub fn as_str(self) -> &'static str {
        match self {
            FieldType::Text => "text",
            FieldType::Keyword => "keyword",
            FieldType::Long => "long",
            FieldType::Double => "double",
            FieldType::Boolean => "boolean",
        }
    }

    /// Parses a query-string value for a filter on a field of this type.
    pub fn parse_value(self, text: &str) -> Result<Value, String> {
        match self {
            FieldType::Text => Err("text fields are searched with `q`, not filtered".into()),
            FieldType::Keyword => Ok(Value::String(text.to_owned())),
            FieldType::Long => text
                .parse::<i64>()
                .map(Value::from)
                .map_err(|_| format!("`{text}` is not an integer")),
            FieldType::Double => text
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .map(Value::from)
                .ok_or_else(|| format!("`{text}` is not a number")),
            FieldType::Boolean => match text {
                "true" => Ok(Value::Bool(true)),
                "false" => Ok(Value::Bool(false)),
                _ => Err(format!("`{text}` is not `true` or `false`")),
            },
        }
    }
}

/// The index of a document projection, as `migrations/` declares it: the mapped
/// fields (what can be searched, filtered and sorted; other fields are kept in the
/// document but not indexed) and settings passed to Elasticsearch as they are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IndexSpec {
    #[serde(default)]
    pub fields: BTreeMap<String, FieldType>,
    /// Elasticsearch index settings (`number_of_shards`, analysis, ...); the
    /// embedded store ignores them.
    #[serde(default)]
    pub settings: Map<String, Value>,
}

impl IndexSpec {
    /// The Elasticsearch `mappings` object: the declared fields, the key as a
    /// keyword, the applied offsets stored but not indexed, and `dynamic: false`
    /// so that an unexpected field never changes the mapping.
    pub fn es_mappings(&self) -> Value {
        let mut props = Map::new();
        for (name, t) in &self.fields {
            props.insert(name.clone(), serde_json::json!({ "type": t.as_str() }));
        }
        props.insert(KEY_FIELD.into(), serde_json::json!({"type": "keyword"}));
        props.insert(
            APPLIED_FIELD.into(),
            serde_json::json!({"type": "object", "enabled": false}),
        );
        serde_json::json!({ "dynamic": false, "properties": props })
    }

    pub fn text_fields(&self) -> Vec<&str> {
        self.of_type(|t| t == FieldType::Text)
    }

    fn of_type(&self, f: impl Fn(FieldType) -> bool) -> Vec<&str> {
        self.fields
            .iter()
            .filter(|(_, t)| f(**t))
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// Fields that filters and sort accept.
    pub fn exact_fields(&self) -> Vec<&str> {
        self.of_type(|t| t != FieldType::Text)
    }
}

/// Projection name → its index declaration.
pub type Specs = BTreeMap<String, IndexSpec>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Asc,
    Desc,
}

/// The order of a search's hits. Every order ends with the key ascending, so that
/// it is total and cursors never skip or repeat a hit.
#[derive(Debug, Clone, PartialEq)]
pub enum Sort {
    /// Score descending, then key (the default with `q`).
    Relevance,
    /// Key ascending (the default without `q`).
    Key,
    /// A keyword, numeric or boolean field, then key. Documents without the field
    /// come last in both orders (as Elasticsearch's `missing: _last`).
    Field(String, Order),
}

/// A validated search: nothing of it is passed through as query DSL.
#[derive(Debug, Clone, PartialEq)]
pub struct Search {
    /// Words searched for in every text field (any word matches; more and rarer
    /// matches score higher).
    pub text: Option<String>,
    /// Exact matches on keyword, numeric or boolean fields (an array field matches
    /// when one of its values does), all required.
    pub filters: Vec<(String, Value)>,
    /// A numeric field's lower bound, inclusive.
    pub at_least: Option<(String, i64)>,
    pub sort: Sort,
    /// 1 to [`MAX_LIMIT`].
    pub limit: usize,
    /// The [`Hit::sort`] of the previous page's last hit: this page starts after it.
    pub after: Option<Vec<Value>>,
}

/// One search hit.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub key: String,
    /// The relevance score, with [`Sort::Relevance`].
    pub score: Option<f64>,
    /// The stored document without the bookkeeping fields ([`user_fields`]).
    pub doc: Map<String, Value>,
    /// The hit's sort values, as the adapter encodes them: given back in
    /// [`Search::after`] for the next page.
    pub sort: Vec<Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// How many documents match, over all pages.
    pub total: u64,
    pub hits: Vec<Hit>,
}

/// The document port. Every stored document holds [`KEY_FIELD`] and
/// [`APPLIED_FIELD`]; [`super::Store::view`] and [`Hit::doc`] leave them out.
#[async_trait]
pub trait DocStore: Store {
    /// Searches the generation's documents. Sees every commit that returned
    /// before it was called (Elasticsearch: the bulk write refreshes).
    async fn search(&self, generation: &GenRef, search: &Search) -> StoreResult<Page>;
}

/// A document's fields without the bookkeeping.
pub fn user_fields(mut doc: Map<String, Value>) -> Map<String, Value> {
    doc.remove(KEY_FIELD);
    doc.remove(APPLIED_FIELD);
    doc
}

/// The document as `GET /views/{p}/{key}` shows it.
pub fn render(schema: &Schema, doc: Map<String, Value>) -> Map<String, Value> {
    with_defaults(schema, user_fields(doc))
}

/// The offset up to which `partition` is applied to a stored document.
pub fn applied_offset(doc: &Map<String, Value>, partition: u32) -> Option<u64> {
    doc.get(APPLIED_FIELD)?.get(partition.to_string())?.as_u64()
}

/// Why a stored document cannot take a delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyError(pub String);

impl fmt::Display for ApplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The document after a batch of `partition` up to `next`: `current` (`None`:
/// absent) changed by `delta` and stamped with the partition's applied offset
/// (its other partitions' offsets are kept). `None` when the batch deleted it and
/// wrote nothing after. Sets are kept sorted by their canonical JSON, lists newest
/// first, as on the key-value stores.
pub fn apply_delta(
    key: &str,
    current: Option<Map<String, Value>>,
    delta: &DocDelta,
    partition: u32,
    next: u64,
) -> Result<Option<Map<String, Value>>, ApplyError> {
    let mut doc = current.unwrap_or_default();
    if delta.reset {
        let applied = doc.remove(APPLIED_FIELD);
        doc.clear();
        if delta.fields.is_empty() {
            return Ok(None);
        }
        if let Some(a) = applied {
            doc.insert(APPLIED_FIELD.into(), a);
        }
    }
    for (field, change) in &delta.fields {
        let slot = doc.remove(field);
        let value = match change {
            FieldDelta::Set(v) => v.clone(),
            FieldDelta::Incr(n) => {
                let base = match &slot {
                    None | Some(Value::Null) => 0,
                    Some(v) => v.as_i64().ok_or_else(|| {
                        ApplyError(format!("`{field}` of `{key}` holds {v}, not an integer"))
                    })?,
                };
                Value::from(base.saturating_add(*n))
            }
            FieldDelta::Members(changes) => {
                let mut members: BTreeSet<String> = array(field, key, slot)?
                    .iter()
                    .map(Value::to_string)
                    .collect();
                for (member, added) in changes {
                    if *added {
                        members.insert(member.clone());
                    } else {
                        members.remove(member);
                    }
                }
                Value::Array(members.iter().map(|m| parse_json(m)).collect())
            }
            FieldDelta::Push { items, cap } => {
                let old = array(field, key, slot)?;
                let mut list: Vec<Value> = items.iter().map(|m| parse_json(m)).collect();
                list.extend(old);
                list.truncate(*cap);
                Value::Array(list)
            }
            FieldDelta::Distinct(_) => {
                return Err(ApplyError(format!(
                    "`{field}`: count_distinct is not a document operation"
                )));
            }
        };
        doc.insert(field.clone(), value);
    }
    doc.insert(KEY_FIELD.into(), Value::String(key.to_owned()));
    let applied = doc
        .entry(APPLIED_FIELD)
        .or_insert_with(|| Value::Object(Map::new()));
    if !applied.is_object() {
        *applied = Value::Object(Map::new());
    }
    applied
        .as_object_mut()
        .expect("just made an object")
        .insert(partition.to_string(), Value::from(next));
    Ok(Some(doc))
}

fn array(field: &str, key: &str, v: Option<Value>) -> Result<Vec<Value>, ApplyError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => Ok(a),
        Some(other) => Err(ApplyError(format!(
            "`{field}` of `{key}` holds {other}, not an array"
        ))),
    }
}

/// Encodes a hit's sort values as an opaque, URL-safe cursor.
pub fn encode_cursor(sort: &[Value]) -> String {
    let json = serde_json::to_string(sort).expect("JSON values serialize");
    json.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The sort values a cursor holds; `None` when it is not one of ours.
pub fn decode_cursor(cursor: &str) -> Option<Vec<Value>> {
    if !cursor.len().is_multiple_of(2) || cursor.len() > 8192 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..cursor.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(cursor.get(i..i + 2)?, 16).ok())
        .collect();
    serde_json::from_slice(&bytes?).ok()
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use serde_json::json;

    use super::*;

    fn delta(reset: bool, fields: Vec<(&str, FieldDelta)>) -> DocDelta {
        DocDelta {
            reset,
            fields: fields
                .into_iter()
                .map(|(f, d)| (f.to_string(), d))
                .collect(),
        }
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn every_field_change_applies_and_the_document_is_stamped() {
        // Stored arrays hold values; members arrive as canonical JSON.
        let current = obj(json!({
            "n": 5, "tags": ["a", "b"], "l": [3, 2], "refold_applied": {"1": 40}
        }));
        let d = delta(
            false,
            vec![
                ("n", FieldDelta::Incr(-2)),
                ("title", FieldDelta::Set(json!("hi"))),
                (
                    "tags",
                    FieldDelta::Members(BTreeMap::from([
                        ("\"c\"".to_string(), true),
                        ("\"a\"".to_string(), false),
                    ])),
                ),
                (
                    "l",
                    FieldDelta::Push {
                        items: VecDeque::from(["5".to_string(), "4".to_string()]),
                        cap: 3,
                    },
                ),
            ],
        );
        let doc = apply_delta("k1", Some(current), &d, 0, 17)
            .unwrap()
            .unwrap();
        assert_eq!(
            Value::Object(doc.clone()),
            json!({
                "n": 3, "title": "hi", "tags": ["b", "c"], "l": [5, 4, 3],
                "refold_key": "k1", "refold_applied": {"0": 17, "1": 40}
            })
        );
        assert_eq!(applied_offset(&doc, 0), Some(17));
        assert_eq!(applied_offset(&doc, 1), Some(40));
        assert_eq!(applied_offset(&doc, 2), None);
        assert_eq!(
            Value::Object(user_fields(doc)),
            json!({"n": 3, "title": "hi", "tags": ["b", "c"], "l": [5, 4, 3]})
        );
    }

    #[test]
    fn a_reset_clears_fields_but_keeps_the_applied_offsets() {
        let current = obj(json!({"n": 5, "refold_key": "k", "refold_applied": {"1": 9}}));
        let gone = apply_delta("k", Some(current.clone()), &delta(true, vec![]), 0, 3).unwrap();
        assert_eq!(gone, None);
        let d = delta(true, vec![("m", FieldDelta::Incr(1))]);
        let doc = apply_delta("k", Some(current), &d, 0, 3).unwrap().unwrap();
        assert_eq!(
            Value::Object(doc),
            json!({"m": 1, "refold_key": "k", "refold_applied": {"0": 3, "1": 9}})
        );
    }

    #[test]
    fn a_field_of_the_wrong_shape_is_an_error() {
        let current = obj(json!({"n": "x"}));
        let d = delta(false, vec![("n", FieldDelta::Incr(1))]);
        assert!(apply_delta("k", Some(current), &d, 0, 1).is_err());
    }

    #[test]
    fn cursors_round_trip_and_foreign_text_is_refused() {
        let sort = vec![json!(1.5), json!("post-7"), json!(null)];
        let c = encode_cursor(&sort);
        assert!(c.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(decode_cursor(&c), Some(sort));
        assert_eq!(decode_cursor("zz"), None);
        assert_eq!(decode_cursor("abc"), None);
        assert_eq!(decode_cursor(""), None);
    }

    #[test]
    fn filter_values_are_parsed_by_field_type() {
        assert_eq!(FieldType::Long.parse_value("42"), Ok(json!(42)));
        assert!(FieldType::Long.parse_value("4x").is_err());
        assert_eq!(FieldType::Boolean.parse_value("true"), Ok(json!(true)));
        assert!(FieldType::Double.parse_value("NaN").is_err());
        assert!(FieldType::Text.parse_value("a").is_err());
        assert_eq!(FieldType::Keyword.parse_value("a b"), Ok(json!("a b")));
    }

    #[test]
    fn es_mappings_declare_the_fields_and_the_bookkeeping() {
        let spec = IndexSpec {
            fields: BTreeMap::from([
                ("title".to_string(), FieldType::Text),
                ("likes".to_string(), FieldType::Long),
            ]),
            settings: Map::new(),
        };
        assert_eq!(
            spec.es_mappings(),
            json!({"dynamic": false, "properties": {
                "title": {"type": "text"}, "likes": {"type": "long"},
                "refold_key": {"type": "keyword"},
                "refold_applied": {"type": "object", "enabled": false}
            }})
        );
        assert_eq!(spec.text_fields(), vec!["title"]);
        assert_eq!(spec.exact_fields(), vec!["likes"]);
    }
}
