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

/// The keys a batch must read before [`fold`]: those whose `doc.` fields it may
/// read, and on document stores every key it touches (read, changed, rewritten).
pub fn keys_to_read(def: &Definition, inputs: &[Input]) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    if !def.reads_before_fold() {
        return keys;
    }
    for input in inputs {
        let Ok(env) = &input.event else { continue };
        let Some(ops) = def.ops_for(&env.event_type) else {
            continue;
        };
        for op in ops {
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
    let mut fx = Effects::default();
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
    // All or nothing: the event's changes are worked out first, against a view of
    // each key's delta that holds what operations read (its set and incremented
    // fields, and whether it was deleted) plus this event's own changes; they are
    // merged into the batch only when every operation succeeded. Nothing is
    // copied that grows with the batch (sets, lists), so a hot key stays cheap.
    let mut views: Vec<(String, DocDelta)> = Vec::new();
    let mut changes: Vec<(String, Change)> = Vec::new();
    let mut ranks: Vec<(String, String, f64)> = Vec::new();
    for op in ops {
        let key_path = op.key.as_ref().unwrap_or(&def.key);
        let key = render_key(event_value(key_path, env), key_path)?;
        if stored.applied.get(&key).is_some_and(|a| offset < *a) {
            // Already in the stored document (an earlier attempt of this batch).
            continue;
        }
        let i = match views.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                views.push((key.clone(), read_view(fx.docs.get(&key))));
                views.len() - 1
            }
        };
        let ctx = Ctx {
            env,
            key: &key,
            delta: Some(&views[i].1),
            stored: stored.fields.get(&key),
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
                merge(&mut views[i].1, change.clone());
                changes.push((key, change));
            }
        }
    }
    for (key, change) in changes {
        merge(fx.docs.entry(key).or_default(), change);
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

/// The part of a key's delta that operations read ([`Ctx::doc`]): set and
/// incremented fields, and whether the key was deleted.
fn read_view(delta: Option<&DocDelta>) -> DocDelta {
    let Some(d) = delta else {
        return DocDelta::default();
    };
    DocDelta {
        reset: d.reset,
        fields: d
            .fields
            .iter()
            .filter(|(_, f)| matches!(f, FieldDelta::Set(_) | FieldDelta::Incr(_)))
            .map(|(k, f)| (k.clone(), f.clone()))
            .collect(),
    }
}

/// One operation's change, before combining.
#[derive(Clone)]
enum Change {
    Delete,
    Field(String, FieldDelta),
}

fn merge(delta: &mut DocDelta, change: Change) {
    let (field, new) = match change {
        Change::Delete => {
            delta.reset = true;
            delta.fields.clear();
            return;
        }
        Change::Field(f, d) => (f, d),
    };
    match (delta.fields.get_mut(&field), new) {
        (None, new) => {
            delta.fields.insert(field, new);
        }
        (Some(FieldDelta::Incr(a)), FieldDelta::Incr(b)) => *a = a.saturating_add(b),
        (Some(FieldDelta::Members(a)), FieldDelta::Members(b)) => a.extend(b),
        (Some(FieldDelta::Distinct(a)), FieldDelta::Distinct(b)) => a.extend(b),
        (Some(FieldDelta::Push { items, cap }), FieldDelta::Push { items: new, .. }) => {
            for item in new.into_iter().rev() {
                items.push_front(item);
            }
            items.truncate(*cap);
        }
        (Some(slot), new) => *slot = new,
    }
}

struct Ctx<'a> {
    env: &'a Envelope,
    key: &'a str,
    delta: Option<&'a DocDelta>,
    stored: Option<&'a BTreeMap<String, Value>>,
    def: &'a Definition,
}

impl Ctx<'_> {
    fn value(&self, path: &ValuePath) -> Option<Value> {
        match path {
            ValuePath::Key => Some(Value::String(self.key.to_owned())),
            ValuePath::Doc(field) => self.doc(field),
            other => event_value(other, self.env),
        }
    }

    /// What the read model holds for `field` now: stored, then this batch's delta.
    fn doc(&self, field: &str) -> Option<Value> {
        let reset = self.delta.is_some_and(|d| d.reset);
        let stored = if reset {
            None
        } else {
            self.stored.and_then(|s| s.get(field)).cloned()
        };
        match self.delta.and_then(|d| d.fields.get(field)) {
            Some(FieldDelta::Set(v)) => Some(v.clone()),
            Some(FieldDelta::Incr(n)) => {
                let base = stored.as_ref().and_then(Value::as_i64).unwrap_or(0);
                Some(Value::from(base.saturating_add(*n)))
            }
            _ => match self.def.schema.get(field) {
                Some(FieldKind::Counter) => Some(stored.unwrap_or(Value::from(0))),
                _ => stored,
            },
        }
    }

    fn source(&self, s: &Source) -> Result<Value, String> {
        match s {
            Source::Const(v) => Ok(v.clone()),
            Source::Path(p) => match self.value(p) {
                Some(Value::Null) | None => Err(format!("`{p}` is missing")),
                Some(v) => Ok(v),
            },
        }
    }

    fn member(&self, s: &Source) -> Result<String, String> {
        let v = self.source(s)?;
        let json = v.to_string();
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
                Part::Path(p) => out.push_str(&scalar(self.value(p), p)?),
            }
        }
        if out.is_empty() || out.len() > MAX_KEY_BYTES {
            return Err(format!("{what} `{out}` must be 1 to {MAX_KEY_BYTES} bytes"));
        }
        Ok(out)
    }

    fn change(&self, kind: &OpKind) -> Result<Change, String> {
        Ok(match kind {
            OpKind::Delete => Change::Delete,
            OpKind::Set { field, value } => {
                Change::Field(field.clone(), FieldDelta::Set(self.source(value)?))
            }
            OpKind::Incr { field, by, negate } => {
                let n = self.integer(by)?;
                Change::Field(
                    field.clone(),
                    FieldDelta::Incr(if *negate { n.saturating_neg() } else { n }),
                )
            }
            OpKind::Add { field, value } => Change::Field(
                field.clone(),
                FieldDelta::Members(BTreeMap::from([(self.member(value)?, true)])),
            ),
            OpKind::Remove { field, value } => Change::Field(
                field.clone(),
                FieldDelta::Members(BTreeMap::from([(self.member(value)?, false)])),
            ),
            OpKind::CountDistinct { field, value } => Change::Field(
                field.clone(),
                FieldDelta::Distinct(BTreeSet::from([self.member(value)?])),
            ),
            OpKind::Push { field, value, cap } => Change::Field(
                field.clone(),
                FieldDelta::Push {
                    items: VecDeque::from([self.member(value)?]),
                    cap: *cap,
                },
            ),
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

/// A path's value as text (for keys, ranking names and members).
fn scalar(v: Option<Value>, path: &ValuePath) -> Result<String, String> {
    match v {
        Some(Value::String(s)) => Ok(s),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(Value::Bool(b)) => Ok(b.to_string()),
        None | Some(Value::Null) => Err(format!("`{path}` is missing")),
        Some(other) => Err(format!(
            "`{path}` must be a string or a number, got {other}"
        )),
    }
}

fn render_key(v: Option<Value>, path: &ValuePath) -> Result<String, String> {
    let key = scalar(v, path).map_err(|e| format!("key: {e}"))?;
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(format!(
            "key from `{path}` must be 1 to {MAX_KEY_BYTES} bytes"
        ));
    }
    Ok(key)
}

/// A path's value in the event (`None` for `key` and `doc.` paths).
pub fn event_value(path: &ValuePath, env: &Envelope) -> Option<Value> {
    let walk = |root: &serde_json::Map<String, Value>, segs: &[String]| {
        let Some((first, rest)) = segs.split_first() else {
            return Some(Value::Object(root.clone()));
        };
        let mut v = root.get(first)?;
        for s in rest {
            v = match v {
                Value::Object(m) => m.get(s)?,
                Value::Array(a) => a.get(s.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(v.clone())
    };
    match path {
        ValuePath::Stream => Some(Value::String(env.stream.clone())),
        ValuePath::Type => Some(Value::String(env.event_type.clone())),
        ValuePath::Id => Some(Value::String(env.id.to_string())),
        ValuePath::Version => Some(Value::from(env.version)),
        ValuePath::RecordedAt => Some(Value::String(env.recorded_at.clone())),
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
    fn keys_to_read_lists_the_keys_of_events_with_doc_reads() {
        let d = def(
            "[[on.Pub]]\nop = \"set\"\nfield = \"t\"\nfrom = \"data.t\"\n[[on.Like]]\nop = \"rank\"\nranking = \"r:{doc.t}\"\n",
        );
        let inputs = vec![
            ev(0, "Like", json!({"k": "a"})),
            ev(1, "Nope", json!({"k": "b"})),
            ev(2, "Pub", json!({"k": "c", "t": 1})),
        ];
        assert_eq!(
            keys_to_read(&d, &inputs),
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
