//! The pure fold: a micro-batch of events in, the combined effects on the read
//! model out. No I/O: the store adapters apply [`Effects`] with the checkpoint.
//!
//! Combining (the hot-key rule): inside one batch every key gets one [`DocDelta`]
//! and every ranking member one summed increment, however many events touch it, so
//! a post liked 10,000 times in a batch costs one write. Non-associative steps keep
//! their meaning: a `delete` drops what came before it in the batch and marks the
//! key to be cleared before the rest is applied; sets keep the last add/remove per
//! member; capped lists keep only the newest `cap` pushes.
//!
//! Each event is applied all or nothing: if one of its operations fails (a path is
//! missing, a value has the wrong type), none of its effects stay and it becomes a
//! [`DeadLetter`] (I8).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::def::{Definition, FieldKind, OnError, OpKind, Part, Source, Template, ValuePath};
use crate::event::Envelope;

/// Longest read-model key or ranking member, in bytes.
pub const MAX_KEY_BYTES: usize = 512;

/// One record of the events topic, decoded (or not).
#[derive(Debug, Clone)]
pub struct Input {
    pub partition: u32,
    pub offset: u64,
    /// `Err` holds why the record is not an event envelope.
    pub event: Result<Envelope, String>,
}

/// An event a projection could not apply, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub partition: u32,
    pub offset: u64,
    pub stream: Option<String>,
    pub version: Option<u64>,
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    pub id: Option<String>,
    pub reason: String,
}

/// The combined change of one field within a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldDelta {
    Set(Value),
    Incr(i64),
    /// Member (canonical JSON) → `true` added, `false` removed; last one wins.
    Members(BTreeMap<String, bool>),
    /// Values (canonical JSON) to count once each.
    Distinct(BTreeSet<String>),
    /// Pushed values (canonical JSON), newest first, at most `cap`.
    Push {
        items: VecDeque<String>,
        cap: usize,
    },
}

/// The combined change of one read-model key within a batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DocDelta {
    /// Clear the key before applying `fields` (a `delete` happened).
    pub reset: bool,
    pub fields: BTreeMap<String, FieldDelta>,
}

/// Everything a batch changes, ready to be applied with its checkpoint.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Effects {
    pub docs: BTreeMap<String, DocDelta>,
    /// Ranking name → member → summed increment.
    pub rankings: BTreeMap<String, BTreeMap<String, f64>>,
    pub dead_letters: Vec<DeadLetter>,
    /// Events whose operations were applied.
    pub applied: u64,
    /// With `on_error = "halt"`: the offset of the event that stopped the fold. It
    /// and everything after it are not in these effects.
    pub halted_at: Option<u64>,
}

impl Effects {
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty() && self.rankings.is_empty() && self.dead_letters.is_empty()
    }
}

/// What the store holds for the keys a batch touches, read before [`fold`].
#[derive(Debug, Clone, Default)]
pub struct DocReads {
    /// Key → stored field values: the `doc.` fields the definition reads (every
    /// field, on document stores).
    pub fields: HashMap<String, BTreeMap<String, Value>>,
    /// Key → the offset up to which the batch's partition is already applied to
    /// the stored document (document stores, whose writes are not atomic with the
    /// checkpoint): the fold skips the key's changes from events before it.
    pub applied: HashMap<String, u64>,
}

impl DocReads {
    pub fn new() -> Self {
        Self::default()
    }
}

/// The keys a batch must read before [`fold`]: those whose `doc.` fields an
/// operation reads, and on a store whose commits may be partial
/// ([`Definition::reads_before_fold`]) every key it touches.
pub fn keys_to_read(def: &Definition, inputs: &[Input], partial_commits: bool) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    if !def.reads_before_fold(partial_commits) {
        return keys;
    }
    for input in inputs {
        let Ok(env) = &input.event else { continue };
        let Some(ops) = def.ops_for(&env.event_type) else {
            continue;
        };
        for op in ops.iter().filter(|op| partial_commits || op.reads_doc) {
            let path = op.key.as_ref().unwrap_or(&def.key);
            if let Ok(k) = render_key(event_value(path, env), path) {
                keys.insert(k);
            }
        }
    }
    keys
}

/// Folds `inputs` (in log order) into combined effects.
pub fn fold(def: &Definition, inputs: &[Input], stored: &DocReads) -> Effects {
    fold_into(Effects::default(), def, inputs, stored)
}

/// Folds `inputs` (in log order) on top of `fx`, the effects of the events before
/// them, not committed yet (`stored` is what the store held before all of them).
/// Returns at once if `fx` halted.
pub fn fold_into(
    mut fx: Effects,
    def: &Definition,
    inputs: &[Input],
    stored: &DocReads,
) -> Effects {
    if fx.halted_at.is_some() {
        return fx;
    }
    for input in inputs {
        let env = match &input.event {
            Ok(env) => env,
            Err(reason) => {
                let dl = DeadLetter {
                    partition: input.partition,
                    offset: input.offset,
                    stream: None,
                    version: None,
                    event_type: None,
                    id: None,
                    reason: reason.clone(),
                };
                if dead(def, &mut fx, dl, input.offset) {
                    return fx;
                }
                continue;
            }
        };
        let Some(ops) = def.ops_for(&env.event_type) else {
            continue;
        };
        match apply_event(def, ops, env, input.offset, stored, &mut fx) {
            Ok(()) => fx.applied += 1,
            Err(reason) => {
                let dl = DeadLetter {
                    partition: input.partition,
                    offset: input.offset,
                    stream: Some(env.stream.clone()),
                    version: Some(env.version),
                    event_type: Some(env.event_type.clone()),
                    id: Some(env.id.to_string()),
                    reason,
                };
                if dead(def, &mut fx, dl, input.offset) {
                    return fx;
                }
            }
        }
    }
    fx
}

/// Records a dead letter; `true` when the projection halts here.
fn dead(def: &Definition, fx: &mut Effects, dl: DeadLetter, offset: u64) -> bool {
    fx.dead_letters.push(dl);
    if def.on_error == OnError::Halt {
        fx.halted_at = Some(offset);
        true
    } else {
        false
    }
}

fn apply_event(
    def: &Definition,
    ops: &[super::def::Op],
    env: &Envelope,
    offset: u64,
    stored: &DocReads,
    fx: &mut Effects,
) -> Result<(), String> {
    // All or nothing: the event's changes are worked out first and merged into the
    // batch only when every operation succeeded. An operation that reads the read
    // model sees the batch's delta with this event's earlier changes on top
    // ([`Ctx::doc`]); nothing of the batch is copied, so a hot key stays cheap.
    // The keys this event touches, and the key each key path rendered (once).
    let mut keys: Vec<String> = Vec::new();
    let mut paths: Vec<(&ValuePath, usize)> = Vec::new();
    // (index into `keys`, change)
    let mut changes: Vec<(usize, Change<'_>)> = Vec::new();
    let mut ranks: Vec<(String, String, f64)> = Vec::new();
    for op in ops {
        let key_path = op.key.as_ref().unwrap_or(&def.key);
        let k = match paths.iter().find(|(p, _)| *p == key_path) {
            Some((_, k)) => *k,
            None => {
                let key = render_key(event_value(key_path, env), key_path)?;
                let k = match keys.iter().position(|k| *k == key) {
                    Some(k) => k,
                    None => {
                        keys.push(key);
                        keys.len() - 1
                    }
                };
                paths.push((key_path, k));
                k
            }
        };
        let key = keys[k].as_str();
        if stored.applied.get(key).is_some_and(|a| offset < *a) {
            // Already in the stored document (an earlier attempt of this batch).
            continue;
        }
        // What the read model holds is looked up only for operations that read it.
        let reads = op.reads_doc;
        let ctx = Ctx {
            env,
            key,
            batch: reads.then(|| fx.docs.get(key)).flatten(),
            own: OwnChanges {
                key: k,
                changes: &changes,
            },
            stored: reads.then(|| stored.fields.get(key)).flatten(),
            def,
        };
        match &op.kind {
            OpKind::Rank {
                ranking,
                member,
                by,
                negate,
            } => {
                let name = ctx.render(ranking, "ranking")?;
                let member = ctx.render(member, "member")?;
                let by = ctx.number(by)?;
                ranks.push((name, member, if *negate { -by } else { by }));
            }
            kind => {
                let change = ctx.change(kind)?;
                changes.push((k, change));
            }
        }
    }
    for (k, change) in changes {
        let key = &keys[k];
        match fx.docs.get_mut(key) {
            Some(delta) => merge(delta, change),
            None => merge(fx.docs.entry(key.clone()).or_default(), change),
        }
    }
    for (name, member, by) in ranks {
        *fx.rankings
            .entry(name)
            .or_default()
            .entry(member)
            .or_default() += by;
    }
    Ok(())
}

/// One operation's change, before combining; field names borrow from the
/// definition.
enum Change<'d> {
    Delete,
    Set(&'d str, Value),
    Incr(&'d str, i64),
    /// A member added (`true`) or removed.
    Member(&'d str, String, bool),
    Distinct(&'d str, String),
    Push {
        field: &'d str,
        item: String,
        cap: usize,
    },
}

impl Change<'_> {
    /// The field's delta when it holds only this change.
    fn into_delta(self) -> FieldDelta {
        match self {
            Change::Delete => unreachable!("a delete is not a field's change"),
            Change::Set(_, v) => FieldDelta::Set(v),
            Change::Incr(_, n) => FieldDelta::Incr(n),
            Change::Member(_, m, present) => FieldDelta::Members(BTreeMap::from([(m, present)])),
            Change::Distinct(_, v) => FieldDelta::Distinct(BTreeSet::from([v])),
            Change::Push { item, cap, .. } => FieldDelta::Push {
                items: VecDeque::from([item]),
                cap,
            },
        }
    }
}

fn merge(delta: &mut DocDelta, change: Change<'_>) {
    let field = match &change {
        Change::Delete => {
            delta.reset = true;
            delta.fields.clear();
            return;
        }
        Change::Set(f, _)
        | Change::Incr(f, _)
        | Change::Member(f, ..)
        | Change::Distinct(f, _)
        | Change::Push { field: f, .. } => *f,
    };
    let Some(slot) = delta.fields.get_mut(field) else {
        delta.fields.insert(field.to_owned(), change.into_delta());
        return;
    };
    match (slot, change) {
        (FieldDelta::Incr(a), Change::Incr(_, b)) => *a = a.saturating_add(b),
        (FieldDelta::Members(a), Change::Member(_, m, present)) => {
            a.insert(m, present);
        }
        (FieldDelta::Distinct(a), Change::Distinct(_, v)) => {
            a.insert(v);
        }
        (FieldDelta::Push { items, cap }, Change::Push { item, .. }) => {
            items.push_front(item);
            items.truncate(*cap);
        }
        (slot, change) => *slot = change.into_delta(),
    }
}

/// The changes an event made before the operation at hand, to one key.
struct OwnChanges<'a, 'd> {
    key: usize,
    changes: &'a [(usize, Change<'d>)],
}

struct Ctx<'a> {
    env: &'a Envelope,
    key: &'a str,
    /// The key's delta in the batch so far (this event's changes not included);
    /// looked up, with `stored`, only for an operation that reads the read model.
    batch: Option<&'a DocDelta>,
    own: OwnChanges<'a, 'a>,
    stored: Option<&'a BTreeMap<String, Value>>,
    def: &'a Definition,
}

/// What the batch has done to a field that [`Ctx::doc`] can read.
enum Seen<'a> {
    Set(&'a Value),
    Incr(i64),
    /// Another kind of change: reads see the stored value.
    Other,
}

impl Ctx<'_> {
    fn value(&self, path: &ValuePath) -> Option<Cow<'_, Value>> {
        match path {
            ValuePath::Key => Some(Cow::Owned(Value::String(self.key.to_owned()))),
            ValuePath::Doc(field) => self.doc(field).map(Cow::Owned),
            other => event_value(other, self.env),
        }
    }

    /// What the read model holds for `field` now: stored, then this batch's delta,
    /// then this event's earlier changes.
    fn doc(&self, field: &str) -> Option<Value> {
        let mut reset = self.batch.is_some_and(|d| d.reset);
        let mut seen = match self.batch.and_then(|d| d.fields.get(field)) {
            Some(FieldDelta::Set(v)) => Some(Seen::Set(v)),
            Some(FieldDelta::Incr(n)) => Some(Seen::Incr(*n)),
            _ => None,
        };
        let own = self.own.changes.iter().filter(|(k, _)| *k == self.own.key);
        for (_, change) in own {
            seen = match change {
                Change::Delete => {
                    reset = true;
                    None
                }
                Change::Set(f, v) if *f == field => Some(Seen::Set(v)),
                Change::Incr(f, n) if *f == field => Some(match seen {
                    Some(Seen::Incr(a)) => Seen::Incr(a.saturating_add(*n)),
                    _ => Seen::Incr(*n),
                }),
                Change::Member(f, ..) | Change::Distinct(f, _) | Change::Push { field: f, .. }
                    if *f == field =>
                {
                    Some(Seen::Other)
                }
                _ => seen,
            };
        }
        let stored = if reset {
            None
        } else {
            self.stored.and_then(|s| s.get(field)).cloned()
        };
        match seen {
            Some(Seen::Set(v)) => Some(v.clone()),
            Some(Seen::Incr(n)) => {
                let base = stored.as_ref().and_then(Value::as_i64).unwrap_or(0);
                Some(Value::from(base.saturating_add(n)))
            }
            _ => match self.def.schema.get(field) {
                Some(FieldKind::Counter) => Some(stored.unwrap_or(Value::from(0))),
                _ => stored,
            },
        }
    }

    fn source<'s>(&'s self, s: &'s Source) -> Result<Cow<'s, Value>, String> {
        match s {
            Source::Const(v) => Ok(Cow::Borrowed(v)),
            Source::Path(p) => match self.value(p) {
                Some(v) if !v.is_null() => Ok(v),
                _ => Err(format!("`{p}` is missing")),
            },
        }
    }

    fn member(&self, s: &Source) -> Result<String, String> {
        let json = self.source(s)?.to_string();
        if json.len() > MAX_KEY_BYTES {
            return Err(format!(
                "value is {} bytes; at most {MAX_KEY_BYTES}",
                json.len()
            ));
        }
        Ok(json)
    }

    fn integer(&self, s: &Source) -> Result<i64, String> {
        let v = self.source(s)?;
        v.as_i64()
            .ok_or_else(|| format!("`{}` must be an integer, got {v}", describe(s)))
    }

    fn number(&self, s: &Source) -> Result<f64, String> {
        let v = self.source(s)?;
        v.as_f64()
            .filter(|f| f.is_finite())
            .ok_or_else(|| format!("`{}` must be a number, got {v}", describe(s)))
    }

    fn render(&self, t: &Template, what: &str) -> Result<String, String> {
        let mut out = String::new();
        for part in &t.0 {
            match part {
                Part::Lit(s) => out.push_str(s),
                Part::Path(p) => push_scalar(&mut out, self.value(p).as_deref(), p)?,
            }
        }
        if out.is_empty() || out.len() > MAX_KEY_BYTES {
            return Err(format!("{what} `{out}` must be 1 to {MAX_KEY_BYTES} bytes"));
        }
        Ok(out)
    }

    fn change<'d>(&self, kind: &'d OpKind) -> Result<Change<'d>, String> {
        Ok(match kind {
            OpKind::Delete => Change::Delete,
            OpKind::Set { field, value } => Change::Set(field, self.source(value)?.into_owned()),
            OpKind::Incr { field, by, negate } => {
                let n = self.integer(by)?;
                Change::Incr(field, if *negate { n.saturating_neg() } else { n })
            }
            OpKind::Add { field, value } => Change::Member(field, self.member(value)?, true),
            OpKind::Remove { field, value } => Change::Member(field, self.member(value)?, false),
            OpKind::CountDistinct { field, value } => Change::Distinct(field, self.member(value)?),
            OpKind::Push { field, value, cap } => Change::Push {
                field,
                item: self.member(value)?,
                cap: *cap,
            },
            OpKind::Rank { .. } => unreachable!("rankings are not document fields"),
        })
    }
}

fn describe(s: &Source) -> String {
    match s {
        Source::Path(p) => p.to_string(),
        Source::Const(v) => v.to_string(),
    }
}

/// Appends a path's value as text (for keys, ranking names and members).
fn push_scalar(out: &mut String, v: Option<&Value>, path: &ValuePath) -> Result<(), String> {
    use std::fmt::Write;
    match v {
        Some(Value::String(s)) => out.push_str(s),
        Some(Value::Number(n)) => write!(out, "{n}").expect("writing to a String"),
        Some(Value::Bool(b)) => write!(out, "{b}").expect("writing to a String"),
        None | Some(Value::Null) => return Err(format!("`{path}` is missing")),
        Some(other) => {
            return Err(format!(
                "`{path}` must be a string or a number, got {other}"
            ));
        }
    }
    Ok(())
}

fn render_key(v: Option<Cow<'_, Value>>, path: &ValuePath) -> Result<String, String> {
    let key = match v {
        Some(Cow::Owned(Value::String(s))) => s,
        v => {
            let mut key = String::new();
            push_scalar(&mut key, v.as_deref(), path).map_err(|e| format!("key: {e}"))?;
            key
        }
    };
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(format!(
            "key from `{path}` must be 1 to {MAX_KEY_BYTES} bytes"
        ));
    }
    Ok(key)
}

/// A path's value in the event, borrowed where the event holds it (`None` for
/// `key` and `doc.` paths).
pub fn event_value<'e>(path: &ValuePath, env: &'e Envelope) -> Option<Cow<'e, Value>> {
    let walk = |root: &'e serde_json::Map<String, Value>, segs: &[String]| {
        let Some((first, rest)) = segs.split_first() else {
            return Some(Cow::Owned(Value::Object(root.clone())));
        };
        let mut v = root.get(first)?;
        for s in rest {
            v = match v {
                Value::Object(m) => m.get(s)?,
                Value::Array(a) => a.get(s.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(Cow::Borrowed(v))
    };
    match path {
        ValuePath::Stream => Some(Cow::Owned(Value::String(env.stream.clone()))),
        ValuePath::Type => Some(Cow::Owned(Value::String(env.event_type.clone()))),
        ValuePath::Id => Some(Cow::Owned(Value::String(env.id.to_string()))),
        ValuePath::Version => Some(Cow::Owned(Value::from(env.version))),
        ValuePath::RecordedAt => Some(Cow::Owned(Value::String(env.recorded_at.clone()))),
        ValuePath::Data(segs) => walk(&env.data, segs),
        ValuePath::Metadata(segs) => walk(&env.metadata, segs),
        ValuePath::Key | ValuePath::Doc(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde_json::json;

    use super::*;
    use crate::projection::def::parse;

    fn def(ops: &str) -> Definition {
        let text = format!("name = \"t\"\nversion = 1\nstore = \"redis\"\nkey = \"data.k\"\n{ops}");
        parse(Path::new("t.toml"), &text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn ev(offset: u64, t: &str, data: Value) -> Input {
        Input {
            partition: 0,
            offset,
            event: Ok(Envelope {
                id: uuid::Uuid::new_v4(),
                stream: "s-1".into(),
                version: offset + 1,
                event_type: t.into(),
                data: data.as_object().unwrap().clone(),
                metadata: Default::default(),
                recorded_at: "2026-11-24T00:00:00Z".into(),
            }),
        }
    }

    fn run(d: &Definition, events: &[(&str, Value)]) -> Effects {
        let inputs: Vec<Input> = events
            .iter()
            .enumerate()
            .map(|(i, (t, v))| ev(i as u64, t, v.clone()))
            .collect();
        fold(d, &inputs, &DocReads::new())
    }

    fn reads(key: &str, fields: BTreeMap<String, Value>) -> DocReads {
        DocReads {
            fields: HashMap::from([(key.to_string(), fields)]),
            applied: HashMap::new(),
        }
    }

    fn field<'a>(fx: &'a Effects, key: &str, f: &str) -> &'a FieldDelta {
        &fx.docs[key].fields[f]
    }

    #[test]
    fn set_keeps_the_last_value_from_a_path_or_a_constant() {
        let d = def(
            "[[on.A]]\nop = \"set\"\nfield = \"name\"\nfrom = \"data.n\"\n[[on.B]]\nop = \"set\"\nfield = \"flag\"\nvalue = true\n",
        );
        let fx = run(
            &d,
            &[
                ("A", json!({"k": "x", "n": "one"})),
                ("A", json!({"k": "x", "n": "two"})),
                ("B", json!({"k": "x"})),
            ],
        );
        assert_eq!(field(&fx, "x", "name"), &FieldDelta::Set(json!("two")));
        assert_eq!(field(&fx, "x", "flag"), &FieldDelta::Set(json!(true)));
        assert_eq!(fx.applied, 3);
    }

    #[test]
    fn increments_combine_into_one_write_per_key() {
        let d = def(
            "[[on.A]]\nop = \"incr\"\nfield = \"n\"\n[[on.B]]\nop = \"decr\"\nfield = \"n\"\nby = 3\n[[on.C]]\nop = \"incr\"\nfield = \"n\"\nfrom = \"data.by\"\n",
        );
        let mut events = vec![("A", json!({"k": "hot"})); 10_000];
        events.push(("B", json!({"k": "hot"})));
        events.push(("C", json!({"k": "hot", "by": 5})));
        events.push(("A", json!({"k": "cold"})));
        let fx = run(&d, &events);
        assert_eq!(fx.docs.len(), 2, "one delta per key");
        assert_eq!(field(&fx, "hot", "n"), &FieldDelta::Incr(10_000 - 3 + 5));
        assert_eq!(field(&fx, "cold", "n"), &FieldDelta::Incr(1));
    }

    #[test]
    fn set_members_keep_the_last_add_or_remove() {
        let d = def(
            "[[on.A]]\nop = \"add\"\nfield = \"s\"\nfrom = \"data.m\"\n[[on.R]]\nop = \"remove\"\nfield = \"s\"\nfrom = \"data.m\"\n",
        );
        let fx = run(
            &d,
            &[
                ("A", json!({"k": "x", "m": "a"})),
                ("A", json!({"k": "x", "m": "b"})),
                ("R", json!({"k": "x", "m": "a"})),
                ("R", json!({"k": "x", "m": "c"})),
            ],
        );
        let want = BTreeMap::from([
            ("\"a\"".to_string(), false),
            ("\"b\"".to_string(), true),
            ("\"c\"".to_string(), false),
        ]);
        assert_eq!(field(&fx, "x", "s"), &FieldDelta::Members(want));
    }

    #[test]
    fn count_distinct_gathers_each_value_once() {
        let d = def("[[on.V]]\nop = \"count_distinct\"\nfield = \"u\"\nfrom = \"data.user\"\n");
        let fx = run(
            &d,
            &[
                ("V", json!({"k": "x", "user": "a"})),
                ("V", json!({"k": "x", "user": "a"})),
                ("V", json!({"k": "x", "user": 7})),
            ],
        );
        assert_eq!(
            field(&fx, "x", "u"),
            &FieldDelta::Distinct(BTreeSet::from(["\"a\"".to_string(), "7".to_string()]))
        );
    }

    #[test]
    fn push_keeps_the_newest_cap_items_newest_first() {
        let d = def("[[on.P]]\nop = \"push\"\nfield = \"l\"\nfrom = \"data.i\"\ncap = 3\n");
        let events: Vec<_> = (1..=5).map(|i| ("P", json!({"k": "x", "i": i}))).collect();
        let fx = run(&d, &events);
        let items: VecDeque<String> = ["5", "4", "3"].iter().map(|s| s.to_string()).collect();
        assert_eq!(field(&fx, "x", "l"), &FieldDelta::Push { items, cap: 3 });
    }

    #[test]
    fn rank_sums_per_member_and_names_the_ranking_from_the_read_model() {
        let d = def(
            "[[on.Pub]]\nop = \"set\"\nfield = \"tribe\"\nfrom = \"data.t\"\n[[on.Like]]\nop = \"rank\"\nranking = \"top:{doc.tribe}\"\n[[on.Unlike]]\nop = \"unrank\"\nranking = \"top:{doc.tribe}\"\nmember = \"{data.k}!\"\nby = 2\n",
        );
        // "p1" was published in an earlier batch (stored), "p2" in this one.
        let stored = reads("p1", BTreeMap::from([("tribe".to_string(), json!("t1"))]));
        let inputs = vec![
            ev(0, "Like", json!({"k": "p1"})),
            ev(1, "Pub", json!({"k": "p2", "t": "t2"})),
            ev(2, "Like", json!({"k": "p2"})),
            ev(3, "Like", json!({"k": "p1"})),
            ev(4, "Unlike", json!({"k": "p1"})),
        ];
        let fx = fold(&d, &inputs, &stored);
        assert_eq!(
            fx.rankings["top:t1"],
            BTreeMap::from([("p1".to_string(), 2.0), ("p1!".to_string(), -2.0)])
        );
        assert_eq!(
            fx.rankings["top:t2"],
            BTreeMap::from([("p2".to_string(), 1.0)])
        );
    }

    #[test]
    fn delete_drops_what_came_before_and_marks_a_reset() {
        let d = def("[[on.A]]\nop = \"incr\"\nfield = \"n\"\n[[on.D]]\nop = \"delete\"\n");
        let fx = run(
            &d,
            &[
                ("A", json!({"k": "x"})),
                ("A", json!({"k": "x"})),
                ("D", json!({"k": "x"})),
                ("A", json!({"k": "x"})),
            ],
        );
        assert!(fx.docs["x"].reset);
        assert_eq!(field(&fx, "x", "n"), &FieldDelta::Incr(1));
    }

    #[test]
    fn doc_reads_see_earlier_changes_of_the_same_batch_and_respect_deletes() {
        let d = def(
            "[[on.A]]\nop = \"incr\"\nfield = \"n\"\n[[on.S]]\nop = \"set\"\nfield = \"copy\"\nfrom = \"doc.n\"\n[[on.D]]\nop = \"delete\"\n",
        );
        let stored = reads("x", BTreeMap::from([("n".to_string(), json!(10))]));
        let inputs = vec![
            ev(0, "A", json!({"k": "x"})),
            ev(1, "S", json!({"k": "x"})),
            ev(2, "D", json!({"k": "x"})),
            ev(3, "S", json!({"k": "x"})),
        ];
        let fx = fold(&d, &inputs, &stored);
        // After the delete, the counter reads 0, not the stored 10.
        assert_eq!(field(&fx, "x", "copy"), &FieldDelta::Set(json!(0)));
        let fx = fold(&d, &inputs[..2], &stored);
        assert_eq!(field(&fx, "x", "copy"), &FieldDelta::Set(json!(11)));
    }

    #[test]
    fn an_operation_reads_what_its_own_event_changed_before_it() {
        // `copy` reads `n` through another key path that names the same key.
        let d = def(concat!(
            "[[on.A]]\nop = \"incr\"\nfield = \"n\"\n",
            "[[on.A]]\nop = \"set\"\nfield = \"copy\"\nfrom = \"doc.n\"\nkey = \"data.alias\"\n",
            "[[on.B]]\nop = \"delete\"\n",
            "[[on.B]]\nop = \"incr\"\nfield = \"n\"\n",
            "[[on.B]]\nop = \"set\"\nfield = \"copy\"\nfrom = \"doc.n\"\n",
        ));
        let stored = reads("x", BTreeMap::from([("n".to_string(), json!(10))]));
        let inputs = vec![
            ev(0, "A", json!({"k": "x", "alias": "x"})),
            ev(1, "A", json!({"k": "x", "alias": "x"})),
            ev(2, "B", json!({"k": "x"})),
        ];
        let fx = fold(&d, &inputs[..1], &stored);
        assert_eq!(field(&fx, "x", "copy"), &FieldDelta::Set(json!(11)));
        let fx = fold(&d, &inputs[..2], &stored);
        assert_eq!(field(&fx, "x", "copy"), &FieldDelta::Set(json!(12)));
        // The delete hides the stored 10 and the batch's increments.
        let fx = fold(&d, &inputs, &stored);
        assert_eq!(field(&fx, "x", "copy"), &FieldDelta::Set(json!(1)));
        assert_eq!(field(&fx, "x", "n"), &FieldDelta::Incr(1));
        assert!(fx.docs["x"].reset);
    }

    #[test]
    fn folding_reads_one_after_another_equals_folding_them_at_once() {
        let d = def(concat!(
            "[[on.A]]\nop = \"incr\"\nfield = \"n\"\n",
            "[[on.A]]\nop = \"add\"\nfield = \"who\"\nfrom = \"data.u\"\n",
            "[[on.A]]\nop = \"set\"\nfield = \"copy\"\nfrom = \"doc.n\"\n",
            "[[on.A]]\nop = \"rank\"\nranking = \"r\"\n",
        ));
        let stored = reads("x", BTreeMap::from([("n".to_string(), json!(10))]));
        let inputs: Vec<Input> = (0..6)
            .map(|i| {
                let k = ["x", "y"][i as usize % 2];
                ev(i, "A", json!({"k": k, "u": i}))
            })
            .collect();
        let at_once = fold(&d, &inputs, &stored);
        let in_two = fold_into(fold(&d, &inputs[..4], &stored), &d, &inputs[4..], &stored);
        assert_eq!(in_two, at_once);
        assert_eq!(field(&at_once, "x", "copy"), &FieldDelta::Set(json!(13)));
        assert_eq!(at_once.applied, 6);
    }

    #[test]
    fn a_failing_event_becomes_a_dead_letter_and_leaves_no_partial_effect() {
        let d = def(
            "[[on.A]]\nop = \"incr\"\nfield = \"n\"\n[[on.A]]\nop = \"incr\"\nfield = \"m\"\nfrom = \"data.by\"\n",
        );
        let fx = run(
            &d,
            &[
                ("A", json!({"k": "x", "by": 1})),
                ("A", json!({"k": "x", "by": "lots"})),
                ("A", json!({"k": "y"})),
                ("A", json!({"by": 1})),
            ],
        );
        assert_eq!(
            field(&fx, "x", "n"),
            &FieldDelta::Incr(1),
            "the bad event's first op was undone"
        );
        assert_eq!(field(&fx, "x", "m"), &FieldDelta::Incr(1));
        assert!(
            !fx.docs.contains_key("y"),
            "an event whose second op fails leaves nothing"
        );
        let reasons: Vec<(u64, &str)> = fx
            .dead_letters
            .iter()
            .map(|d| (d.offset, d.reason.as_str()))
            .collect();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(reasons[0].1.contains("must be an integer"), "{reasons:?}");
        assert!(reasons[1].1.contains("`data.by` is missing"), "{reasons:?}");
        assert!(reasons[2].1.contains("key"), "{reasons:?}");
        assert_eq!(fx.applied, 1);
        assert_eq!(fx.halted_at, None);
    }

    #[test]
    fn halt_stops_the_fold_at_the_bad_event() {
        let d = parse(Path::new("t.toml"), "name = \"t\"\nversion = 1\nstore = \"redis\"\nkey = \"data.k\"\non_error = \"halt\"\n[[on.A]]\nop = \"incr\"\nfield = \"n\"\n").unwrap();
        let fx = run(
            &d,
            &[
                ("A", json!({"k": "x"})),
                ("A", json!({})),
                ("A", json!({"k": "x"})),
            ],
        );
        assert_eq!(fx.halted_at, Some(1));
        assert_eq!(
            field(&fx, "x", "n"),
            &FieldDelta::Incr(1),
            "nothing after the halt"
        );
    }

    #[test]
    fn undecodable_records_are_dead_letters_and_other_types_are_skipped() {
        let d = def("[[on.A]]\nop = \"incr\"\nfield = \"n\"\n");
        let inputs = vec![
            Input {
                partition: 1,
                offset: 7,
                event: Err("not an event envelope".into()),
            },
            ev(8, "Other", json!({"k": "x"})),
        ];
        let fx = fold(&d, &inputs, &DocReads::new());
        assert_eq!(fx.dead_letters.len(), 1);
        assert_eq!(
            (fx.dead_letters[0].partition, fx.dead_letters[0].offset),
            (1, 7)
        );
        assert!(fx.docs.is_empty());
    }

    #[test]
    fn keys_to_read_lists_the_keys_of_operations_with_doc_reads() {
        let ops = "[[on.Pub]]\nop = \"set\"\nfield = \"t\"\nfrom = \"data.t\"\n[[on.Like]]\nop = \"rank\"\nranking = \"r:{doc.t}\"\n";
        let inputs = vec![
            ev(0, "Like", json!({"k": "a"})),
            ev(1, "Nope", json!({"k": "b"})),
            ev(2, "Pub", json!({"k": "c", "t": 1})),
        ];
        assert_eq!(
            keys_to_read(&def(ops), &inputs, false),
            BTreeSet::from(["a".to_string()])
        );
        // A store whose commits may be partial: every key the batch touches, to
        // skip what its documents already hold.
        assert_eq!(
            keys_to_read(&def(ops), &inputs, true),
            BTreeSet::from(["a".to_string(), "c".to_string()])
        );
    }

    #[test]
    fn a_key_skips_the_events_its_document_already_holds() {
        let d = def("[[on.A]]\nop = \"incr\"\nfield = \"n\"\nkey = \"data.k\"\n");
        // "x" holds this partition's events up to offset 2 (an earlier attempt of
        // the batch wrote it, then the process died before the checkpoint).
        let mut stored = reads("x", BTreeMap::from([("n".to_string(), json!(2))]));
        stored.applied.insert("x".into(), 2);
        let inputs: Vec<Input> = (0..4)
            .map(|i| ev(i, "A", json!({"k": if i % 2 == 0 { "x" } else { "y" }})))
            .collect();
        let fx = fold(&d, &inputs, &stored);
        assert_eq!(
            field(&fx, "x", "n"),
            &FieldDelta::Incr(1),
            "only offset 2 is new to x"
        );
        assert_eq!(field(&fx, "y", "n"), &FieldDelta::Incr(2));
        assert_eq!(fx.applied, 4);
    }
}
