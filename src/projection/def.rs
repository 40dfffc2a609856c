//! Projection definitions: `projections/*.toml`, parsed and validated once.
//!
//! ```toml
//! name = "post_stats"          # must match the file name
//! version = 1                  # bump it to rebuild the read model by replay
//! store = "redis"
//! key = "data.post_id"         # the read-model key, from each event
//! on_error = "dead_letter"     # or "halt"
//!
//! [[on.PostLiked]]
//! op = "incr"
//! field = "likes"
//!
//! [[on.PostLiked]]
//! op = "rank"
//! ranking = "top_posts:{doc.tribe_id}"
//! ```
//!
//! Paths name a value of the event (`data.x.y`, `metadata.x`, `stream`, `type`,
//! `id`, `version`, `recorded_at`), the read-model key (`key`), or a field the read
//! model already holds for that key (`doc.field`). Templates embed paths in braces.
//! The README has the reference of every operation.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path as FsPath, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use toml::Spanned;

/// A definition that does not parse or validate: file, line and reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {reason}")]
pub struct DefError {
    pub file: String,
    pub line: usize,
    pub reason: String,
}

/// Where a projection's read model lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// Key-value read models: Redis, or its embedded stand-in.
    Redis,
    /// Searchable JSON documents: Elasticsearch, or its embedded stand-in.
    Elasticsearch,
}

impl StoreKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::Redis => "redis",
            StoreKind::Elasticsearch => "elasticsearch",
        }
    }
}

/// Field names document projections may not use: the stores keep their own
/// bookkeeping under this prefix.
pub const RESERVED_PREFIX: &str = "refold_";

/// What happens to an event a projection cannot apply (I8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Record it as a dead letter with the reason and carry on.
    DeadLetter,
    /// Record it and stop the projection at that event.
    Halt,
}

/// The kind of value a read-model field holds; one per field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// Any JSON value (`set`).
    Value,
    /// An integer (`incr`, `decr`); reads as 0 when absent.
    Counter,
    /// A set of JSON values (`add`, `remove`); reads as a sorted array.
    Set,
    /// A count of distinct values (`count_distinct`; HyperLogLog on Redis).
    Distinct,
    /// A capped list, newest first (`push`).
    List,
}

impl FieldKind {
    fn op_names(self) -> &'static str {
        match self {
            FieldKind::Value => "set",
            FieldKind::Counter => "incr/decr",
            FieldKind::Set => "add/remove",
            FieldKind::Distinct => "count_distinct",
            FieldKind::List => "push",
        }
    }
}

/// A value read from an event, its key, or the read model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValuePath {
    Key,
    Stream,
    Type,
    Id,
    Version,
    RecordedAt,
    Data(Vec<String>),
    Metadata(Vec<String>),
    Doc(String),
}

impl fmt::Display for ValuePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValuePath::Key => f.write_str("key"),
            ValuePath::Stream => f.write_str("stream"),
            ValuePath::Type => f.write_str("type"),
            ValuePath::Id => f.write_str("id"),
            ValuePath::Version => f.write_str("version"),
            ValuePath::RecordedAt => f.write_str("recorded_at"),
            ValuePath::Data(p) if p.is_empty() => f.write_str("data"),
            ValuePath::Data(p) => write!(f, "data.{}", p.join(".")),
            ValuePath::Metadata(p) if p.is_empty() => f.write_str("metadata"),
            ValuePath::Metadata(p) => write!(f, "metadata.{}", p.join(".")),
            ValuePath::Doc(field) => write!(f, "doc.{field}"),
        }
    }
}

impl ValuePath {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = s.split('.');
        let head = parts.next().unwrap_or_default();
        let rest: Vec<String> = parts.map(str::to_owned).collect();
        if rest.iter().any(String::is_empty) {
            return Err(format!("path `{s}` has an empty segment"));
        }
        let bare = |p: ValuePath| {
            if rest.is_empty() {
                Ok(p)
            } else {
                Err(format!("`{head}` has no fields (in path `{s}`)"))
            }
        };
        match head {
            "key" => bare(ValuePath::Key),
            "stream" => bare(ValuePath::Stream),
            "type" => bare(ValuePath::Type),
            "id" => bare(ValuePath::Id),
            "version" => bare(ValuePath::Version),
            "recorded_at" => bare(ValuePath::RecordedAt),
            "data" => Ok(ValuePath::Data(rest)),
            "metadata" => Ok(ValuePath::Metadata(rest)),
            "doc" if rest.len() == 1 => Ok(ValuePath::Doc(rest[0].clone())),
            "doc" => Err(format!(
                "`doc` paths name one field, like `doc.tribe_id` (got `{s}`)"
            )),
            _ => Err(format!(
                "unknown path `{s}`: paths start with data., metadata., doc., or are key, stream, type, id, version, recorded_at"
            )),
        }
    }
}

/// A string with `{path}` placeholders, like `top_posts:{doc.tribe_id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(pub Vec<Part>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Lit(String),
    Path(ValuePath),
}

impl Template {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Lit(rest[..open].to_owned()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("unclosed `{{` in template `{s}`"))?;
            parts.push(Part::Path(ValuePath::parse(&rest[open + 1..open + close])?));
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("unmatched `}}` in template `{s}`"));
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_owned()));
        }
        if parts.is_empty() {
            return Err("a template cannot be empty".into());
        }
        Ok(Template(parts))
    }

    pub fn paths(&self) -> impl Iterator<Item = &ValuePath> {
        self.0.iter().filter_map(|p| match p {
            Part::Path(p) => Some(p),
            Part::Lit(_) => None,
        })
    }
}

/// Where an operation takes its value: an event path or a constant.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Path(ValuePath),
    Const(Value),
}

/// One validated operation. `key` overrides the projection's key path.
#[derive(Debug, Clone, PartialEq)]
pub struct Op {
    pub key: Option<ValuePath>,
    pub kind: OpKind,
    /// Some path of the operation reads the read model (`doc.`).
    pub reads_doc: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum OpKind {
    Set {
        field: String,
        value: Source,
    },
    /// `decr` is an `Incr` with the amount negated.
    Incr {
        field: String,
        by: Source,
        negate: bool,
    },
    Add {
        field: String,
        value: Source,
    },
    Remove {
        field: String,
        value: Source,
    },
    CountDistinct {
        field: String,
        value: Source,
    },
    Push {
        field: String,
        value: Source,
        cap: usize,
    },
    Rank {
        ranking: Template,
        member: Template,
        by: Source,
        negate: bool,
    },
    Delete,
}

/// A projection definition, validated.
#[derive(Debug, Clone)]
pub struct Definition {
    pub name: String,
    pub version: u32,
    pub store: StoreKind,
    pub key: ValuePath,
    pub on_error: OnError,
    /// Operations per event type, in file order.
    pub handlers: BTreeMap<String, Vec<Op>>,
    /// Every field the operations write, with its kind.
    pub schema: BTreeMap<String, FieldKind>,
    /// `doc.` fields some operation reads: loaded before a batch is folded.
    pub doc_reads: Vec<String>,
    /// The file's text: stored with each generation so that a generation is always
    /// served and fed with the definition it was built with.
    pub source: String,
    pub file: PathBuf,
}

/// The handler key that takes every event type without a handler of its own.
pub const ANY_TYPE: &str = "*";

impl Definition {
    pub fn handles(&self, event_type: &str) -> bool {
        self.ops_for(event_type).is_some()
    }

    /// The operations an event of `event_type` runs: its own, or those of `on."*"`.
    pub fn ops_for(&self, event_type: &str) -> Option<&[Op]> {
        self.handlers
            .get(event_type)
            .or_else(|| self.handlers.get(ANY_TYPE))
            .map(Vec::as_slice)
    }

    /// Whether a batch reads the stored read model before it is folded: for
    /// `doc.` paths, and always on a store whose commits may leave part of a
    /// batch applied (`partial_commits`: Elasticsearch), where the fold skips what
    /// a document already holds.
    pub fn reads_before_fold(&self, partial_commits: bool) -> bool {
        !self.doc_reads.is_empty() || partial_commits
    }
}

// --- raw file shape -------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDef {
    name: Spanned<String>,
    version: Spanned<i64>,
    store: Spanned<String>,
    key: Spanned<String>,
    #[serde(default)]
    on_error: Option<Spanned<String>>,
    #[serde(default)]
    on: BTreeMap<String, Vec<Spanned<RawOp>>>,
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum RawOp {
    Set {
        field: String,
        from: Option<String>,
        value: Option<toml::Value>,
        key: Option<String>,
    },
    Incr {
        field: String,
        by: Option<i64>,
        from: Option<String>,
        key: Option<String>,
    },
    Decr {
        field: String,
        by: Option<i64>,
        from: Option<String>,
        key: Option<String>,
    },
    Add {
        field: String,
        from: String,
        key: Option<String>,
    },
    Remove {
        field: String,
        from: String,
        key: Option<String>,
    },
    CountDistinct {
        field: String,
        from: String,
        key: Option<String>,
    },
    Push {
        field: String,
        from: String,
        cap: Option<i64>,
        key: Option<String>,
    },
    Rank {
        ranking: String,
        member: Option<String>,
        by: Option<f64>,
        from: Option<String>,
        key: Option<String>,
    },
    Unrank {
        ranking: String,
        member: Option<String>,
        by: Option<f64>,
        from: Option<String>,
        key: Option<String>,
    },
    Delete {
        key: Option<String>,
    },
}

/// Largest `cap` of a `push` list.
pub const MAX_CAP: usize = 10_000;

fn line_of(source: &str, offset: usize) -> usize {
    source[..offset.min(source.len())].matches('\n').count() + 1
}

fn is_ident(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 64
}

/// Parses and validates one definition file's text. `file` names it in errors and
/// gives the expected projection name (the file stem).
pub fn parse(file: &FsPath, source: &str) -> Result<Definition, DefError> {
    let fname = file.display().to_string();
    let err = |offset: usize, reason: String| DefError {
        file: fname.clone(),
        line: line_of(source, offset),
        reason,
    };
    let raw: RawDef = toml::from_str(source).map_err(|e| {
        let offset = e.span().map(|s| s.start).unwrap_or(0);
        err(offset, e.message().trim().to_owned())
    })?;

    let name = raw.name.get_ref().clone();
    let stem = file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    if !is_ident(&name) || name.starts_with('_') || name.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(err(
            raw.name.span().start,
            format!(
                "name `{name}` must be lowercase letters, digits and `_`, starting with a letter"
            ),
        ));
    }
    if !stem.is_empty() && stem != name {
        return Err(err(
            raw.name.span().start,
            format!("name `{name}` does not match the file name `{stem}.toml`"),
        ));
    }
    let version = *raw.version.get_ref();
    if !(1..=i64::from(u32::MAX)).contains(&version) {
        return Err(err(
            raw.version.span().start,
            "version must be a positive integer".into(),
        ));
    }
    let store = match raw.store.get_ref().as_str() {
        "redis" => StoreKind::Redis,
        "elasticsearch" => StoreKind::Elasticsearch,
        other => {
            return Err(err(
                raw.store.span().start,
                format!("unknown store `{other}`; expected `redis` or `elasticsearch`"),
            ));
        }
    };
    let key = ValuePath::parse(raw.key.get_ref()).map_err(|r| err(raw.key.span().start, r))?;
    if matches!(key, ValuePath::Key | ValuePath::Doc(_)) {
        return Err(err(
            raw.key.span().start,
            "the key must come from the event".into(),
        ));
    }
    let on_error = match raw
        .on_error
        .as_ref()
        .map(|s| (s.get_ref().as_str(), s.span()))
    {
        None | Some(("dead_letter", _)) => OnError::DeadLetter,
        Some(("halt", _)) => OnError::Halt,
        Some((other, span)) => {
            return Err(err(
                span.start,
                format!("unknown on_error `{other}`; expected `dead_letter` or `halt`"),
            ));
        }
    };
    if raw.on.is_empty() {
        return Err(err(
            0,
            "no [[on.EventType]] operations: the projection would do nothing".into(),
        ));
    }

    let mut schema: BTreeMap<String, FieldKind> = BTreeMap::new();
    let mut handlers = BTreeMap::new();
    // Each `doc.` field read, with where it is first read (for errors).
    let mut doc_reads: Vec<(String, usize)> = Vec::new();
    let mut caps: BTreeMap<String, usize> = BTreeMap::new();
    for (event_type, ops) in raw.on {
        if event_type != ANY_TYPE && crate::event::validate_type(&event_type).is_err() {
            return Err(err(
                ops.first().map_or(0, |op| op.span().start),
                format!("`on.{event_type}`: not a valid event type name"),
            ));
        }
        let mut out = Vec::new();
        for op in ops {
            let at = op.span().start;
            let e = |r: String| err(at, format!("on.{event_type}: {r}"));
            let op = validate_op(op.into_inner()).map_err(&e)?;
            if store == StoreKind::Elasticsearch {
                document_op(&op.kind).map_err(&e)?;
            }
            if let OpKind::Push { field, cap, .. } = &op.kind {
                // Pushes combine per batch, which needs one cap per list.
                if let Some(other) = caps.insert(field.clone(), *cap).filter(|c| c != cap) {
                    return Err(e(format!(
                        "list `{field}` is capped at {other} elsewhere; give every push to it the same cap"
                    )));
                }
            }
            if let Some((field, kind)) = op_field(&op.kind) {
                match schema.get(field) {
                    Some(k) if *k != kind => {
                        return Err(e(format!(
                            "field `{field}` is written by {} elsewhere; one field holds one kind of value, so it cannot also take {}",
                            k.op_names(),
                            kind.op_names()
                        )));
                    }
                    _ => {
                        schema.insert(field.to_owned(), kind);
                    }
                }
            }
            for p in op_paths(&op) {
                if let ValuePath::Doc(f) = p
                    && !doc_reads.iter().any(|(r, _)| r == f)
                {
                    doc_reads.push((f.clone(), at));
                }
            }
            out.push(op);
        }
        handlers.insert(event_type, out);
    }
    for (f, at) in &doc_reads {
        match schema.get(f) {
            Some(FieldKind::Value | FieldKind::Counter) => {}
            Some(k) => {
                return Err(err(
                    *at,
                    format!(
                        "`doc.{f}` reads a {} field; only set and incr/decr fields can be read",
                        k.op_names()
                    ),
                ));
            }
            None => {
                return Err(err(
                    *at,
                    format!("`doc.{f}` reads a field no operation writes"),
                ));
            }
        }
    }
    Ok(Definition {
        name,
        version: version as u32,
        store,
        key,
        on_error,
        handlers,
        schema,
        doc_reads: doc_reads.into_iter().map(|(f, _)| f).collect(),
        source: source.to_owned(),
        file: file.to_owned(),
    })
}

/// What a document projection cannot do.
fn document_op(op: &OpKind) -> Result<(), String> {
    match op {
        OpKind::Rank { .. } => Err(
            "rankings are key-value read models: put `rank`/`unrank` in a `store = \"redis\"` projection".into(),
        ),
        OpKind::CountDistinct { .. } => Err(
            "`count_distinct` is a key-value operation (HyperLogLog): use a `store = \"redis\"` projection, or keep the values with `add` and count them".into(),
        ),
        _ => match op_field(op) {
            Some((field, _)) if field.starts_with(RESERVED_PREFIX) => Err(format!(
                "field `{field}`: names starting with `{RESERVED_PREFIX}` are reserved for refold's bookkeeping"
            )),
            _ => Ok(()),
        },
    }
}

fn op_field(op: &OpKind) -> Option<(&str, FieldKind)> {
    match op {
        OpKind::Set { field, .. } => Some((field, FieldKind::Value)),
        OpKind::Incr { field, .. } => Some((field, FieldKind::Counter)),
        OpKind::Add { field, .. } | OpKind::Remove { field, .. } => Some((field, FieldKind::Set)),
        OpKind::CountDistinct { field, .. } => Some((field, FieldKind::Distinct)),
        OpKind::Push { field, .. } => Some((field, FieldKind::List)),
        OpKind::Rank { .. } | OpKind::Delete => None,
    }
}

fn src(s: &Source) -> Option<&ValuePath> {
    match s {
        Source::Path(p) => Some(p),
        Source::Const(_) => None,
    }
}

fn op_paths(op: &Op) -> Vec<&ValuePath> {
    let mut out: Vec<&ValuePath> = op.key.iter().collect();
    match &op.kind {
        OpKind::Set { value, .. }
        | OpKind::Add { value, .. }
        | OpKind::Remove { value, .. }
        | OpKind::CountDistinct { value, .. }
        | OpKind::Push { value, .. } => out.extend(src(value)),
        OpKind::Incr { by, .. } => out.extend(src(by)),
        OpKind::Rank {
            ranking,
            member,
            by,
            ..
        } => {
            out.extend(ranking.paths());
            out.extend(member.paths());
            out.extend(src(by));
        }
        OpKind::Delete => {}
    }
    out
}

fn field_name(field: String) -> Result<String, String> {
    if is_ident(&field) {
        Ok(field)
    } else {
        Err(format!(
            "field `{field}` must be letters, digits and `_`, not starting with a digit"
        ))
    }
}

fn event_path(s: &str) -> Result<ValuePath, String> {
    ValuePath::parse(s)
}

fn key_path(key: Option<String>) -> Result<Option<ValuePath>, String> {
    key.map(|k| {
        let p = ValuePath::parse(&k)?;
        if matches!(p, ValuePath::Key | ValuePath::Doc(_)) {
            return Err(format!("key `{k}` must come from the event"));
        }
        Ok(p)
    })
    .transpose()
}

fn amount(by: Option<i64>, from: Option<String>) -> Result<Source, String> {
    match (by, from) {
        (Some(_), Some(_)) => Err("give `by` or `from`, not both".into()),
        (None, Some(p)) => Ok(Source::Path(event_path(&p)?)),
        (by, None) => Ok(Source::Const(Value::from(by.unwrap_or(1)))),
    }
}

fn validate_op(raw: RawOp) -> Result<Op, String> {
    let negate = matches!(raw, RawOp::Decr { .. });
    let (key, kind) = match raw {
        RawOp::Set {
            field,
            from,
            value,
            key,
        } => {
            let value = match (from, value) {
                (Some(p), None) => Source::Path(event_path(&p)?),
                (None, Some(v)) => {
                    Source::Const(serde_json::to_value(v).map_err(|e| format!("value: {e}"))?)
                }
                _ => {
                    return Err(
                        "set takes exactly one of `from` (a path) or `value` (a constant)".into(),
                    );
                }
            };
            (
                key,
                OpKind::Set {
                    field: field_name(field)?,
                    value,
                },
            )
        }
        RawOp::Incr {
            field,
            by,
            from,
            key,
        }
        | RawOp::Decr {
            field,
            by,
            from,
            key,
        } => (
            key,
            OpKind::Incr {
                field: field_name(field)?,
                by: amount(by, from)?,
                negate,
            },
        ),
        RawOp::Add { field, from, key } => (
            key,
            OpKind::Add {
                field: field_name(field)?,
                value: Source::Path(event_path(&from)?),
            },
        ),
        RawOp::Remove { field, from, key } => (
            key,
            OpKind::Remove {
                field: field_name(field)?,
                value: Source::Path(event_path(&from)?),
            },
        ),
        RawOp::CountDistinct { field, from, key } => (
            key,
            OpKind::CountDistinct {
                field: field_name(field)?,
                value: Source::Path(event_path(&from)?),
            },
        ),
        RawOp::Push {
            field,
            from,
            cap,
            key,
        } => {
            let cap = cap.unwrap_or(100);
            if !(1..=MAX_CAP as i64).contains(&cap) {
                return Err(format!("cap must be between 1 and {MAX_CAP}"));
            }
            (
                key,
                OpKind::Push {
                    field: field_name(field)?,
                    value: Source::Path(event_path(&from)?),
                    cap: cap as usize,
                },
            )
        }
        RawOp::Rank {
            ranking,
            member,
            by,
            from,
            key,
        } => (key, rank(ranking, member, by, from, false)?),
        RawOp::Unrank {
            ranking,
            member,
            by,
            from,
            key,
        } => (key, rank(ranking, member, by, from, true)?),
        RawOp::Delete { key } => (key, OpKind::Delete),
    };
    let mut op = Op {
        key: key_path(key)?,
        kind,
        reads_doc: false,
    };
    op.reads_doc = op_paths(&op).iter().any(|p| matches!(p, ValuePath::Doc(_)));
    Ok(op)
}

fn rank(
    ranking: String,
    member: Option<String>,
    by: Option<f64>,
    from: Option<String>,
    negate: bool,
) -> Result<OpKind, String> {
    let by = match (by, from) {
        (Some(_), Some(_)) => return Err("give `by` or `from`, not both".into()),
        (None, Some(p)) => Source::Path(event_path(&p)?),
        (Some(b), None) if !b.is_finite() => return Err("by must be a finite number".into()),
        (by, None) => Source::Const(Value::from(by.unwrap_or(1.0))),
    };
    Ok(OpKind::Rank {
        ranking: Template::parse(&ranking)?,
        member: Template::parse(member.as_deref().unwrap_or("{key}"))?,
        by,
        negate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(name: &str, text: &str) -> Result<Definition, DefError> {
        parse(FsPath::new(&format!("projections/{name}.toml")), text)
    }

    const GOOD: &str = r#"
name = "p"
version = 2
store = "redis"
key = "data.post_id"

[[on.PostPublished]]
op = "set"
field = "tribe_id"
from = "data.tribe_id"

[[on.PostLiked]]
op = "rank"
ranking = "top:{doc.tribe_id}"
"#;

    #[test]
    fn a_good_definition_loads_with_its_schema() {
        let d = load("p", GOOD).unwrap();
        assert_eq!((d.name.as_str(), d.version), ("p", 2));
        assert_eq!(d.key, ValuePath::Data(vec!["post_id".into()]));
        assert_eq!(d.schema["tribe_id"], FieldKind::Value);
        assert_eq!(d.doc_reads, vec!["tribe_id".to_string()]);
        assert!(d.handles("PostLiked") && !d.handles("PostViewed"));
    }

    #[test]
    fn on_star_takes_the_types_without_a_handler_of_their_own() {
        let d = load(
            "p",
            "name = \"p\"\nversion = 1\nstore = \"elasticsearch\"\nkey = \"id\"\n[[on.\"*\"]]\nop = \"set\"\nfield = \"t\"\nfrom = \"type\"\n[[on.A]]\nop = \"delete\"\n",
        )
        .unwrap();
        assert!(matches!(d.ops_for("A").unwrap()[0].kind, OpKind::Delete));
        assert!(matches!(
            d.ops_for("B").unwrap()[0].kind,
            OpKind::Set { .. }
        ));
        assert!(
            d.reads_before_fold(true),
            "document projections read before they fold where commits may be partial"
        );
        assert!(!d.reads_before_fold(false), "no doc. paths, atomic commits");
    }

    #[test]
    fn the_demo_definitions_load() {
        for def in ["post_stats", "tribe_feed", "posts", "users"] {
            let file =
                FsPath::new(env!("CARGO_MANIFEST_DIR")).join(format!("projections/{def}.toml"));
            let text = std::fs::read_to_string(&file).unwrap();
            parse(&file, &text).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    /// Each bad definition is refused with the line of the culprit and a reason.
    #[test]
    fn bad_definitions_name_file_line_and_reason() {
        let cases: &[(&str, usize, &str)] = &[
            (
                "name = \"p\"\nversion = 1\nstore = \"elasticsearch\"\nkey = \"data.x\"\n[[on.A]]\nop = \"rank\"\nranking = \"r\"\n",
                5,
                "rankings are key-value",
            ),
            (
                "name = \"p\"\nversion = 1\nstore = \"elasticsearch\"\nkey = \"data.x\"\n[[on.A]]\nop = \"count_distinct\"\nfield = \"u\"\nfrom = \"data.u\"\n",
                5,
                "count_distinct",
            ),
            (
                "name = \"p\"\nversion = 1\nstore = \"elasticsearch\"\nkey = \"data.x\"\n[[on.A]]\nop = \"set\"\nfield = \"refold_key\"\nvalue = 1\n",
                5,
                "reserved",
            ),
            (
                "name = \"p\"\nversion = 1\nstore = \"redis\"\nkey = \"data.x\"\n[[on.A]]\nop = \"explode\"\n",
                6,
                "explode",
            ),
            (
                "name = \"p\"\nversion = 1\nstore = \"redis\"\nkey = \"data.x\"\n[[on.A]]\nop = \"incr\"\nfield = \"n\"\ncolour = 1\n",
                5,
                "colour",
            ),
            (
                "name = \"p\"\nversion = 1\nstore = \"mongo\"\nkey = \"data.x\"\n",
                3,
                "unknown store",
            ),
            (
                "name = \"q\"\nversion = 1\nstore = \"redis\"\nkey = \"data.x\"\n",
                1,
                "does not match the file name",
            ),
            (
                "name = \"p\"\nversion = 0\nstore = \"redis\"\nkey = \"data.x\"\n",
                2,
                "positive",
            ),
            (
                "name = \"p\"\nversion = 1\nstore = \"redis\"\nkey = \"body.x\"\n",
                4,
                "unknown path",
            ),
            (
                "name = \"p\"\nversion = 1\nstore = \"redis\"\nkey = \"data.x\"\n[[on.A]]\nop = \"incr\"\nfield = \"n\"\n[[on.B]]\nop = \"set\"\nfield = \"n\"\nvalue = 1\n",
                8,
                "one field holds one kind",
            ),
            (
                "name = \"p\"\nversion = 1\nstore = \"redis\"\nkey = \"data.x\"\n[[on.A]]\nop = \"push\"\nfield = \"l\"\nfrom = \"data.y\"\ncap = 0\n",
                5,
                "cap must be",
            ),
            (
                "name = \"p\"\nversion = 1\nstore = \"redis\"\nkey = \"data.x\"\n[[on.A]]\nop = \"rank\"\nranking = \"r:{data.y\"\n",
                5,
                "unclosed",
            ),
            (
                "name = \"p\"\nversion = 1\nstore = \"redis\"\nkey = \"data.x\"\n[[on.A]]\nop = \"set\"\nfield = \"f\"\n",
                5,
                "exactly one of",
            ),
            (
                "name = \"p\"\nversion = 1\nstore = \"redis\"\nkey = \"data.x\"\n",
                1,
                "no [[on.EventType]]",
            ),
            (
                "name = \"p\"\nversion = 1\nstore = \"redis\"\nkey = \"data.x\"\n[[on.A]]\nop = \"rank\"\nranking = \"r:{doc.nope}\"\n",
                5,
                "no operation writes",
            ),
            (
                "name = \"p\"\nversion = 1\nstore = \"redis\"\nkey = [1]\n",
                4,
                "invalid type",
            ),
            (
                "name = \"p\"\nversion = 1\nstore = \"redis\"\nkey = \"data.x\"\n[[on.A]]\nop = \"push\"\nfield = \"l\"\nfrom = \"data.y\"\n[[on.B]]\nop = \"push\"\nfield = \"l\"\nfrom = \"data.y\"\ncap = 5\n",
                9,
                "same cap",
            ),
        ];
        let mut wrong = Vec::new();
        for (text, line, reason) in cases {
            let e = load("p", text).expect_err(text);
            assert_eq!(e.file, "projections/p.toml");
            if !e.reason.contains(reason) || e.line != *line {
                wrong.push(format!("{e} (expected line {line}, {reason:?})"));
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    #[test]
    fn templates_and_paths_parse() {
        let t = Template::parse("top:{doc.tribe_id}:{data.a.b}").unwrap();
        assert_eq!(
            t.0,
            vec![
                Part::Lit("top:".into()),
                Part::Path(ValuePath::Doc("tribe_id".into())),
                Part::Lit(":".into()),
                Part::Path(ValuePath::Data(vec!["a".into(), "b".into()])),
            ]
        );
        assert!(Template::parse("a}").is_err());
        assert!(ValuePath::parse("doc.a.b").is_err());
        assert!(ValuePath::parse("data..a").is_err());
        assert_eq!(
            ValuePath::parse("metadata.m").unwrap().to_string(),
            "metadata.m"
        );
    }
}
