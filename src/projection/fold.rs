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
    Push { items: VecDeque<String>, cap: usize },
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

/// Stored values of the `doc.` fields the definition reads, per key.
pub type DocReads = HashMap<String, BTreeMap<String, Value>>;

/// The keys whose `doc.` fields a batch may read (load them before [`fold`]).
pub fn keys_to_read(def: &Definition, inputs: &[Input]) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    if def.doc_reads.is_empty() {
        return keys;
    }
    for input in inputs {
        let Ok(env) = &input.event else { continue };
        let Some(ops) = def.handlers.get(&env.event_type) else { continue };
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
        let Some(ops) = def.handlers.get(&env.event_type) else {
            continue;
        };
        match apply_event(def, ops, env, stored, &mut fx) {
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
    stored: &DocReads,
    fx: &mut Effects,
) -> Result<(), String> {
    // All or nothing: remember the keys' deltas before the event, restore on error.
    let mut saved: Vec<(String, Option<DocDelta>)> = Vec::new();
    let mut ranks: Vec<(String, String, f64)> = Vec::new();
    let result = (|| {
        for op in ops {
            let key_path = op.key.as_ref().unwrap_or(&def.key);
            let key = render_key(event_value(key_path, env), key_path)?;
            if !saved.iter().any(|(k, _)| *k == key) {
                saved.push((key.clone(), fx.docs.get(&key).cloned()));
            }
            let ctx = Ctx { env, key: &key, delta: fx.docs.get(&key), stored: stored.get(&key), def };
            match &op.kind {
                OpKind::Rank { ranking, member, by, negate } => {
                    let name = ctx.render(ranking, "ranking")?;
                    let member = ctx.render(member, "member")?;
                    let by = ctx.number(by)?;
                    ranks.push((name, member, if *negate { -by } else { by }));
                }
                kind => {
                    let change = ctx.change(kind)?;
                    let delta = fx.docs.entry(key).or_default();
                    merge(delta, change);
                }
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => {
            for (name, member, by) in ranks {
                *fx.rankings.entry(name).or_default().entry(member).or_default() += by;
            }
            Ok(())
        }
        Err(e) => {
            for (key, before) in saved {
                match before {
                    Some(d) => fx.docs.insert(key, d),
                    None => fx.docs.remove(&key),
                };
            }
            Err(e)
        }
    }
}

/// One operation's change, before combining.
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
        let stored = if reset { None } else { self.stored.and_then(|s| s.get(field)).cloned() };
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
            return Err(format!("value is {} bytes; at most {MAX_KEY_BYTES}", json.len()));
        }
        Ok(json)
    }

    fn integer(&self, s: &Source) -> Result<i64, String> {
        let v = self.source(s)?;
        v.as_i64().ok_or_else(|| format!("`{}` must be an integer, got {v}", describe(s)))
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
            OpKind::Set { field, value } => Change::Field(field.clone(), FieldDelta::Set(self.source(value)?)),
            OpKind::Incr { field, by, negate } => {
                let n = self.integer(by)?;
                Change::Field(field.clone(), FieldDelta::Incr(if *negate { n.saturating_neg() } else { n }))
            }
            OpKind::Add { field, value } => {
                Change::Field(field.clone(), FieldDelta::Members(BTreeMap::from([(self.member(value)?, true)])))
            }
            OpKind::Remove { field, value } => {
                Change::Field(field.clone(), FieldDelta::Members(BTreeMap::from([(self.member(value)?, false)])))
            }
            OpKind::CountDistinct { field, value } => {
                Change::Field(field.clone(), FieldDelta::Distinct(BTreeSet::from([self.member(value)?])))
            }
            OpKind::Push { field, value, cap } => Change::Field(
                field.clone(),
                FieldDelta::Push { items: VecDeque::from([self.member(value)?]), cap: *cap },
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
        Some(other) => Err(format!("`{path}` must be a string or a number, got {other}")),
    }
}

fn render_key(v: Option<Value>, path: &ValuePath) -> Result<String, String> {
    let key = scalar(v, path).map_err(|e| format!("key: {e}"))?;
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(format!("key from `{path}` must be 1 to {MAX_KEY_BYTES} bytes"));
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
