//! The embedded key-value read-model store: Redis's semantics on redb.
//!
//! One redb file (`{data_dir}/views.redb`) holds every projection. A commit is one
//! redb write transaction that checks the checkpoint, applies the batch and moves
//! the checkpoint, so data and checkpoint can only move together (I6). Commits are
//! made durable (fsync) at most every [`DURABLE_EVERY`]; those in between are
//! visible at once and reach the disk with the next durable one. A crash rolls the
//! file back to its last durable commit, data and checkpoints together, and the
//! workers fold those batches again: a read model is rebuilt from the log, so
//! only the log needs every commit on disk. Metadata writes (generations, replay
//! switches) are always durable.
//!
//! Each key's read model is one record (its values, counters and capped lists),
//! read and rewritten once per batch; the members of its sets and the values its
//! distinct counts have seen are rows of their own, so a batch writes only the
//! members it adds or removes, however large the set (a popular post's viewers).
//! The record keeps each such field's row count. The file records its layout
//! ([`LAYOUT`]): read models written in an older layout are dropped when the file
//! is opened and rebuilt from the log. Differences from Redis, by design:
//! `count_distinct` is exact here (a set of the values seen) where Redis estimates
//! with HyperLogLog; rankings keep a score index so the top members are a range
//! scan, ordered as ZREVRANGE orders them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, TableHandle,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{
    Commit, DEAD_LETTERS_KEPT, GenRef, KvStore, Meta, Schema, Session, Store, StoreError,
    StoreResult, parse_json, with_defaults,
};
use crate::projection::fold::{DeadLetter, DocReads, Effects, FieldDelta};

/// projection -> Meta (JSON)
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// (generation, partition) -> next offset
const CKPT: TableDefinition<(&str, u32), u64> = TableDefinition::new("checkpoints");
/// (generation, key) -> StoredDoc (JSON)
const DOCS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("docs");
/// (generation, key, field, member) -> (): the members of set fields and the
/// values distinct fields have seen, one row each
const MEMBERS: TableDefinition<(&str, &str, &str, &str), ()> = TableDefinition::new("members");
/// "layout" -> the layout of the read models in this file ([`LAYOUT`])
const FORMAT: TableDefinition<&str, u32> = TableDefinition::new("format");
/// (generation, ranking, member) -> score
const RANK: TableDefinition<(&str, &str, &str), f64> = TableDefinition::new("rank");
/// (generation, ranking, ordered score, member) -> ()
const RANK_IDX: TableDefinition<(&str, &str, u64, &str), ()> = TableDefinition::new("rank_idx");
/// (generation, sequence) -> DeadLetter (JSON); the sequence counts all of them
const DEAD: TableDefinition<(&str, u64), &str> = TableDefinition::new("dead_letters");
/// generation -> dead letters recorded so far
const DEAD_COUNT: TableDefinition<&str, u64> = TableDefinition::new("dead_count");

const CACHE_BYTES: usize = 64 << 20;

/// The layout this version writes. 1: sets and distinct values inside each key's
/// record; 2: as rows of [`MEMBERS`].
pub const LAYOUT: u32 = 2;

/// Every table that holds read models or their metadata.
macro_rules! each_table {
    ($m:ident!($($arg:tt)*)) => {
        $m!($($arg)* META);
        $m!($($arg)* CKPT);
        $m!($($arg)* DOCS);
        $m!($($arg)* MEMBERS);
        $m!($($arg)* RANK);
        $m!($($arg)* RANK_IDX);
        $m!($($arg)* DEAD);
        $m!($($arg)* DEAD_COUNT);
    };
}

/// A key's stored read model.
#[derive(Debug, Default, Serialize, Deserialize)]
struct StoredDoc {
    fields: BTreeMap<String, Stored>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Stored {
    Value(Value),
    Counter(i64),
    /// A set field: how many member rows it has.
    Set(u64),
    /// A distinct count: how many value rows it has.
    Distinct(u64),
    List(VecDeque<String>),
}

type Members<'t> = redb::Table<'t, (&'static str, &'static str, &'static str, &'static str), ()>;

pub struct EmbeddedKv {
    db: Arc<Database>,
    /// When a commit was last made durable.
    durable: Arc<Mutex<Instant>>,
}

/// The longest time between two durable (fsynced) commits of read models.
pub const DURABLE_EVERY: Duration = Duration::from_secs(1);

fn storage(e: impl std::fmt::Display) -> StoreError {
    StoreError::Other(format!("embedded store: {e}"))
}

/// The table-key prefix of a generation.
fn gen_id(g: &GenRef) -> String {
    format!("{}:{}", g.projection, g.generation)
}

/// The first string after every string that starts with `s`'s whole value, for
/// tuple ranges: `(s, "")..(after(s), "")` holds exactly the tuples whose first
/// element is `s`.
fn after(s: &str) -> String {
    format!("{s}\0")
}

/// f64 → u64 with the same order (for the score index).
pub fn ordered(score: f64) -> u64 {
    let bits = score.to_bits();
    if bits >> 63 == 1 {
        !bits
    } else {
        bits | (1 << 63)
    }
}

impl EmbeddedKv {
    /// Opens (or creates) `{dir}/views.redb`.
    pub fn open(dir: &Path) -> StoreResult<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| storage(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("views.redb");
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => storage(format!(
                    "{} is in use by another refold process; stop it or pick another --data-dir",
                    path.display()
                )),
                e => storage(format!("cannot open {}: {e}", path.display())),
            })?;
        check_layout(&db, &path)?;
        Ok(Self {
            db: Arc::new(db),
            durable: Arc::new(Mutex::new(Instant::now())),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, redb::Error> + Send + 'static,
    ) -> StoreResult<T> {
        blocking(self.db.clone(), f).await
    }
}

impl Drop for EmbeddedKv {
    /// A clean stop keeps what was folded: the last commits are made durable.
    fn drop(&mut self) {
        let synced = (|| -> Result<(), redb::Error> { Ok(self.db.begin_write()?.commit()?) })();
        if let Err(e) = synced {
            tracing::warn!(error = %e, "embedded key-value store: final sync failed; the last batches will be folded again");
        }
    }
}

async fn blocking<T: Send + 'static>(
    db: Arc<Database>,
    f: impl FnOnce(&Database) -> Result<T, redb::Error> + Send + 'static,
) -> StoreResult<T> {
    tokio::task::spawn_blocking(move || f(&db))
        .await
        .map_err(storage)?
        .map_err(storage)
}

/// Creates the tables of a new file and records [`LAYOUT`]; drops read models
/// written in an older layout (the workers rebuild them from the log); refuses a
/// file written by a newer refold.
fn check_layout(db: &Database, path: &Path) -> StoreResult<()> {
    let txn = db.begin_write().map_err(storage)?;
    let found = txn
        .open_table(FORMAT)
        .map_err(storage)?
        .get("layout")
        .map_err(storage)?
        .map(|v| v.value());
    let found = match found {
        Some(v) => v,
        // Before the layout was recorded: layout 1 if anything was ever written.
        None => {
            let used = txn
                .list_tables()
                .map_err(storage)?
                .any(|t| t.name() == META.name());
            if used { 1 } else { LAYOUT }
        }
    };
    if found > LAYOUT {
        return Err(storage(format!(
            "{} holds read models in layout {found}, written by a newer refold (this one writes layout {LAYOUT}); run that version or pick another --data-dir",
            path.display()
        )));
    }
    if found < LAYOUT {
        tracing::warn!(path = %path.display(), layout = found, now = LAYOUT,
            "the embedded read models were written in an older layout: dropping them; every projection is rebuilt from the log");
        macro_rules! delete {
            ($t:ident) => {
                txn.delete_table($t).map_err(storage)?;
            };
        }
        each_table!(delete!());
    }
    macro_rules! create {
        ($t:ident) => {
            txn.open_table($t).map_err(storage)?;
        };
    }
    each_table!(create!());
    txn.open_table(FORMAT)
        .map_err(storage)?
        .insert("layout", LAYOUT)
        .map_err(storage)?;
    txn.commit().map_err(storage)?;
    Ok(())
}

fn read_doc(bytes: &[u8]) -> StoredDoc {
    serde_json::from_slice(bytes).unwrap_or_default()
}

/// A key's read model with the members of its set fields (field → members).
fn render(
    schema: &Schema,
    doc: StoredDoc,
    mut sets: BTreeMap<String, Vec<String>>,
) -> Map<String, Value> {
    let mut out = Map::new();
    for (field, stored) in doc.fields {
        let v = match stored {
            Stored::Value(v) => v,
            Stored::Counter(n) => Value::from(n),
            Stored::Set(_) => Value::Array(
                sets.remove(&field)
                    .unwrap_or_default()
                    .iter()
                    .map(|m| parse_json(m))
                    .collect(),
            ),
            Stored::Distinct(n) => Value::from(n),
            Stored::List(l) => Value::Array(l.iter().map(|m| parse_json(m)).collect()),
        };
        out.insert(field, v);
    }
    with_defaults(schema, out)
}

/// Removes `key`'s member rows: every field's, or `field`'s.
fn clear_members(
    members: &mut Members<'_>,
    gid: &str,
    key: &str,
    field: Option<&str>,
) -> Result<(), redb::Error> {
    match field {
        None => {
            let hi = after(key);
            members.retain_in((gid, key, "", "")..(gid, hi.as_str(), "", ""), |_, _| false)?;
        }
        Some(f) => {
            let hi = after(f);
            members.retain_in((gid, key, f, "")..(gid, key, hi.as_str(), ""), |_, _| false)?;
        }
    }
    Ok(())
}

/// Applies one field's combined change to a stored document and its member rows.
fn apply_field(
    doc: &mut StoredDoc,
    members: &mut Members<'_>,
    (gid, key): (&str, &str),
    field: &str,
    delta: &FieldDelta,
) -> Result<(), redb::Error> {
    let fits = matches!(
        (doc.fields.get(field), delta),
        (Some(Stored::Counter(_)), FieldDelta::Incr(_))
            | (Some(Stored::Set(_)), FieldDelta::Members(_))
            | (Some(Stored::Distinct(_)), FieldDelta::Distinct(_))
            | (Some(Stored::List(_)), FieldDelta::Push { .. })
    );
    if !fits {
        // Absent (or of another kind, after a definition change): start afresh.
        if let Some(Stored::Set(_) | Stored::Distinct(_)) = doc.fields.get(field) {
            clear_members(members, gid, key, Some(field))?;
        }
        let fresh = match delta {
            FieldDelta::Set(v) => Stored::Value(v.clone()),
            FieldDelta::Incr(_) => Stored::Counter(0),
            FieldDelta::Members(_) => Stored::Set(0),
            FieldDelta::Distinct(_) => Stored::Distinct(0),
            FieldDelta::Push { .. } => Stored::List(VecDeque::new()),
        };
        doc.fields.insert(field.to_owned(), fresh);
    }
    let slot = doc.fields.get_mut(field).expect("inserted above");
    match (slot, delta) {
        (Stored::Counter(n), FieldDelta::Incr(by)) => *n = n.saturating_add(*by),
        (Stored::Set(n), FieldDelta::Members(m)) => {
            for (member, present) in m {
                let row = (gid, key, field, member.as_str());
                if *present {
                    if members.insert(row, ())?.is_none() {
                        *n += 1;
                    }
                } else if members.remove(row)?.is_some() {
                    *n -= 1;
                }
            }
        }
        (Stored::Distinct(n), FieldDelta::Distinct(d)) => {
            for value in d {
                if members
                    .insert((gid, key, field, value.as_str()), ())?
                    .is_none()
                {
                    *n += 1;
                }
            }
        }
        (Stored::List(l), FieldDelta::Push { items, cap }) => {
            for item in items.iter().rev() {
                l.push_front(item.clone());
            }
            l.truncate(*cap);
        }
        (slot, FieldDelta::Set(v)) => *slot = Stored::Value(v.clone()),
        _ => unreachable!("the slot was made to fit the delta"),
    }
    Ok(())
}

fn apply_effects(txn: &WriteTransaction, gid: &str, fx: &Effects) -> Result<(), redb::Error> {
    let mut docs = txn.open_table(DOCS)?;
    let mut members = txn.open_table(MEMBERS)?;
    for (key, delta) in &fx.docs {
        let mut doc = if delta.reset {
            clear_members(&mut members, gid, key, None)?;
            StoredDoc::default()
        } else {
            docs.get((gid, key.as_str()))?
                .map(|v| read_doc(v.value()))
                .unwrap_or_default()
        };
        for (field, d) in &delta.fields {
            apply_field(&mut doc, &mut members, (gid, key), field, d)?;
        }
        // As in Redis, an emptied set or list no longer exists.
        doc.fields.retain(|_, v| match v {
            Stored::Set(n) => *n > 0,
            Stored::List(l) => !l.is_empty(),
            _ => true,
        });
        if doc.fields.is_empty() {
            docs.remove((gid, key.as_str()))?;
        } else {
            let bytes = serde_json::to_vec(&doc).expect("a stored doc serializes");
            docs.insert((gid, key.as_str()), bytes.as_slice())?;
        }
    }
    let mut rank = txn.open_table(RANK)?;
    let mut idx = txn.open_table(RANK_IDX)?;
    for (name, members) in &fx.rankings {
        for (member, by) in members {
            let old = rank
                .get((gid, name.as_str(), member.as_str()))?
                .map(|v| v.value());
            if let Some(old) = old {
                idx.remove((gid, name.as_str(), ordered(old), member.as_str()))?;
            }
            let new = old.unwrap_or(0.0) + by;
            rank.insert((gid, name.as_str(), member.as_str()), new)?;
            idx.insert((gid, name.as_str(), ordered(new), member.as_str()), ())?;
        }
    }
    if !fx.dead_letters.is_empty() {
        let mut count = txn.open_table(DEAD_COUNT)?;
        let mut dead = txn.open_table(DEAD)?;
        let mut n = count.get(gid)?.map(|v| v.value()).unwrap_or(0);
        for dl in &fx.dead_letters {
            let json = serde_json::to_string(dl).expect("a dead letter serializes");
            dead.insert((gid, n), json.as_str())?;
            if n >= DEAD_LETTERS_KEPT as u64 {
                dead.remove((gid, n - DEAD_LETTERS_KEPT as u64))?;
            }
            n += 1;
        }
        count.insert(gid, n)?;
    }
    Ok(())
}

/// Removes every entry of `table` whose first key element is `gid`.
macro_rules! drop_prefix {
    ($txn:expr, $table:expr, $gid:expr, $lo:expr, $hi:expr) => {{
        let mut t = $txn.open_table($table)?;
        t.retain_in($lo..$hi, |_, _| false)?;
        let _ = $gid;
    }};
}

#[async_trait]
impl Store for EmbeddedKv {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn meta(&self, projection: &str) -> StoreResult<Meta> {
        let p = projection.to_owned();
        let json = self
            .blocking(move |db| {
                let txn = db.begin_read()?;
                let t = txn.open_table(META)?;
                Ok(t.get(p.as_str())?.map(|v| v.value().to_owned()))
            })
            .await?;
        match json {
            None => Ok(Meta::default()),
            Some(j) => serde_json::from_str(&j).map_err(storage),
        }
    }

    async fn put_meta(&self, projection: &str, meta: &Meta) -> StoreResult<()> {
        let p = projection.to_owned();
        let json = serde_json::to_string(meta).map_err(storage)?;
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            txn.open_table(META)?.insert(p.as_str(), json.as_str())?;
            txn.commit()?;
            Ok(())
        })
        .await
    }

    async fn session(&self, generation: &GenRef, partition: u32) -> StoreResult<Box<dyn Session>> {
        Ok(Box::new(RedbSession {
            db: self.db.clone(),
            durable: self.durable.clone(),
            gid: gen_id(generation),
            partition,
        }))
    }

    async fn checkpoints(
        &self,
        generation: &GenRef,
        partitions: u32,
    ) -> StoreResult<Vec<Option<u64>>> {
        let gid = gen_id(generation);
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let t = txn.open_table(CKPT)?;
            (0..partitions)
                .map(|p| Ok(t.get((gid.as_str(), p))?.map(|v| v.value())))
                .collect()
        })
        .await
    }

    async fn view(
        &self,
        generation: &GenRef,
        schema: &Schema,
        key: &str,
    ) -> StoreResult<Option<Map<String, Value>>> {
        let (gid, key) = (gen_id(generation), key.to_owned());
        let found = self
            .blocking(move |db| {
                let txn = db.begin_read()?;
                let t = txn.open_table(DOCS)?;
                let Some(doc) = t
                    .get((gid.as_str(), key.as_str()))?
                    .map(|v| read_doc(v.value()))
                else {
                    return Ok(None);
                };
                let rows = txn.open_table(MEMBERS)?;
                let mut sets = BTreeMap::new();
                for (field, stored) in &doc.fields {
                    if !matches!(stored, Stored::Set(_)) {
                        continue;
                    }
                    let (k, f, hi) = (key.as_str(), field.as_str(), after(field));
                    let members = rows
                        .range((gid.as_str(), k, f, "")..(gid.as_str(), k, hi.as_str(), ""))?
                        .map(|row| Ok(row?.0.value().3.to_owned()))
                        .collect::<Result<Vec<_>, redb::Error>>()?;
                    sets.insert(field.clone(), members);
                }
                Ok(Some((doc, sets)))
            })
            .await?;
        Ok(found.map(|(doc, sets)| render(schema, doc, sets)))
    }

    async fn dead_letters(
        &self,
        generation: &GenRef,
        limit: usize,
    ) -> StoreResult<(u64, Vec<DeadLetter>)> {
        let gid = gen_id(generation);
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let count = txn
                .open_table(DEAD_COUNT)?
                .get(gid.as_str())?
                .map(|v| v.value())
                .unwrap_or(0);
            let dead = txn.open_table(DEAD)?;
            let hi = after(&gid);
            let mut out = Vec::new();
            for entry in dead
                .range((gid.as_str(), 0)..(hi.as_str(), 0))?
                .rev()
                .take(limit)
            {
                let (_, v) = entry?;
                if let Ok(dl) = serde_json::from_str(v.value()) {
                    out.push(dl);
                }
            }
            Ok((count, out))
        })
        .await
    }

    async fn drop_generation(&self, generation: &GenRef) -> StoreResult<()> {
        let gid = gen_id(generation);
        self.blocking(move |db| {
            let hi = after(&gid);
            let (g, h) = (gid.as_str(), hi.as_str());
            let txn = db.begin_write()?;
            drop_prefix!(txn, CKPT, g, (g, 0u32), (h, 0u32));
            drop_prefix!(txn, DOCS, g, (g, ""), (h, ""));
            drop_prefix!(txn, MEMBERS, g, (g, "", "", ""), (h, "", "", ""));
            drop_prefix!(txn, RANK, g, (g, "", ""), (h, "", ""));
            drop_prefix!(txn, RANK_IDX, g, (g, "", 0u64, ""), (h, "", 0u64, ""));
            drop_prefix!(txn, DEAD, g, (g, 0u64), (h, 0u64));
            txn.open_table(DEAD_COUNT)?.remove(g)?;
            txn.commit()?;
            Ok(())
        })
        .await
    }

    async fn generations(&self, projection: &str) -> StoreResult<BTreeSet<u64>> {
        let (lo, hi) = (format!("{projection}:"), format!("{projection};"));
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let t = txn.open_table(CKPT)?;
            let mut out = BTreeSet::new();
            for entry in t.range((lo.as_str(), 0u32)..(hi.as_str(), 0u32))? {
                let (k, _) = entry?;
                let (gid, _) = k.value();
                if let Some(g) = gid.strip_prefix(lo.as_str()).and_then(|n| n.parse().ok()) {
                    out.insert(g);
                }
            }
            Ok(out)
        })
        .await
    }
}

#[async_trait]
impl KvStore for EmbeddedKv {
    async fn ranking(
        &self,
        generation: &GenRef,
        name: &str,
        limit: usize,
    ) -> StoreResult<Vec<(String, f64)>> {
        let (gid, name) = (gen_id(generation), name.to_owned());
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let idx = txn.open_table(RANK_IDX)?;
            let rank = txn.open_table(RANK)?;
            let lo = (gid.as_str(), name.as_str(), 0u64, "");
            let hi_name = after(&name);
            let hi = (gid.as_str(), hi_name.as_str(), 0u64, "");
            let mut out = Vec::new();
            for entry in idx.range(lo..hi)?.rev().take(limit) {
                let (k, _) = entry?;
                let (_, _, _, member) = k.value();
                let score = rank
                    .get((gid.as_str(), name.as_str(), member))?
                    .map(|v| v.value())
                    .unwrap_or(0.0);
                out.push((member.to_owned(), score));
            }
            Ok(out)
        })
        .await
    }
}

struct RedbSession {
    db: Arc<Database>,
    durable: Arc<Mutex<Instant>>,
    gid: String,
    partition: u32,
}

#[async_trait]
impl Session for RedbSession {
    async fn checkpoint(&mut self) -> StoreResult<Option<u64>> {
        let (gid, p) = (self.gid.clone(), self.partition);
        blocking(self.db.clone(), move |db| {
            let txn = db.begin_read()?;
            Ok(txn
                .open_table(CKPT)?
                .get((gid.as_str(), p))?
                .map(|v| v.value()))
        })
        .await
    }

    async fn read_fields(
        &mut self,
        keys: &BTreeSet<String>,
        fields: &[String],
    ) -> StoreResult<DocReads> {
        let (gid, keys, fields) = (self.gid.clone(), keys.clone(), fields.to_vec());
        blocking(self.db.clone(), move |db| {
            let txn = db.begin_read()?;
            let t = txn.open_table(DOCS)?;
            let mut out = DocReads::new();
            for key in keys {
                let Some(doc) = t
                    .get((gid.as_str(), key.as_str()))?
                    .map(|v| read_doc(v.value()))
                else {
                    continue;
                };
                let mut got = BTreeMap::new();
                for f in &fields {
                    match doc.fields.get(f) {
                        Some(Stored::Value(v)) => {
                            got.insert(f.clone(), v.clone());
                        }
                        Some(Stored::Counter(n)) => {
                            got.insert(f.clone(), Value::from(*n));
                        }
                        _ => {}
                    }
                }
                out.fields.insert(key, got);
            }
            Ok(out)
        })
        .await
    }

    async fn commit(
        &mut self,
        expected: Option<u64>,
        next: u64,
        effects: &Arc<Effects>,
        _schema: &Schema,
    ) -> StoreResult<Commit> {
        let (gid, p, fx) = (self.gid.clone(), self.partition, Arc::clone(effects));
        let durable = self.durable.clone();
        blocking(self.db.clone(), move |db| {
            let mut txn = db.begin_write()?;
            // Write transactions are serial: the one that finds the last durable
            // commit old enough is made durable (and makes those before it so).
            let mut last = durable.lock().unwrap_or_else(|e| e.into_inner());
            if last.elapsed() >= DURABLE_EVERY {
                *last = Instant::now();
            } else {
                txn.set_durability(Durability::None)?;
            }
            drop(last);
            let found = txn
                .open_table(CKPT)?
                .get((gid.as_str(), p))?
                .map(|v| v.value());
            if found != expected {
                txn.abort()?;
                return Ok(Commit::Fenced { found });
            }
            apply_effects(&txn, &gid, &fx)?;
            txn.open_table(CKPT)?.insert((gid.as_str(), p), next)?;
            txn.commit()?;
            Ok(Commit::Applied)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::ReadableTableMetadata;

    #[test]
    fn score_order_is_numeric_order() {
        let xs = [-1e9, -2.5, -0.0, 0.0, 1.0, 2.5, 1e12];
        for w in xs.windows(2) {
            assert!(ordered(w[0]) <= ordered(w[1]), "{} vs {}", w[0], w[1]);
        }
    }

    #[test]
    fn a_field_of_another_kind_starts_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("t.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        let mut rows = txn.open_table(MEMBERS).unwrap();
        let mut doc = StoredDoc::default();
        let mut apply = |d: FieldDelta| apply_field(&mut doc, &mut rows, ("g", "k"), "f", &d);
        apply(FieldDelta::Distinct(
            ["\"a\"".into(), "\"b\"".into()].into(),
        ))
        .unwrap();
        apply(FieldDelta::Set(Value::from("x"))).unwrap();
        apply(FieldDelta::Incr(2)).unwrap();
        apply(FieldDelta::Incr(3)).unwrap();
        assert!(matches!(doc.fields["f"], Stored::Counter(5)));
        // The distinct values' rows went with the field.
        assert_eq!(rows.len().unwrap(), 0);
    }

    #[test]
    fn read_models_of_an_older_layout_are_dropped_and_a_newer_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("views.redb");
        {
            // Layout 1: no format table; a key's distinct values inside its record.
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META).unwrap().insert("p", "{}").unwrap();
            let old = r#"{"fields":{"v":{"distinct":["\"u1\""]}}}"#;
            txn.open_table(DOCS)
                .unwrap()
                .insert(("p:1", "k"), old.as_bytes())
                .unwrap();
            txn.open_table(CKPT).unwrap().insert(("p:1", 0), 7).unwrap();
            txn.commit().unwrap();
        }
        drop(EmbeddedKv::open(dir.path()).unwrap());
        let db = Database::open(&path).unwrap();
        let txn = db.begin_read().unwrap();
        assert_eq!(txn.open_table(DOCS).unwrap().len().unwrap(), 0);
        assert_eq!(txn.open_table(CKPT).unwrap().len().unwrap(), 0);
        assert_eq!(txn.open_table(META).unwrap().len().unwrap(), 0);
        let layout = txn.open_table(FORMAT).unwrap().get("layout").unwrap();
        assert_eq!(layout.map(|v| v.value()), Some(LAYOUT));
        drop(txn);
        // A file of the current layout keeps its read models.
        let w = db.begin_write().unwrap();
        w.open_table(CKPT).unwrap().insert(("p:1", 0), 7).unwrap();
        w.open_table(FORMAT)
            .unwrap()
            .insert("layout", LAYOUT + 1)
            .unwrap();
        w.commit().unwrap();
        drop(db);
        let err = EmbeddedKv::open(dir.path())
            .err()
            .expect("a newer layout is refused");
        assert!(err.to_string().contains("newer refold"), "{err}");
        let db = Database::open(&path).unwrap();
        let w = db.begin_write().unwrap();
        w.open_table(FORMAT)
            .unwrap()
            .insert("layout", LAYOUT)
            .unwrap();
        w.commit().unwrap();
        drop(db);
        drop(EmbeddedKv::open(dir.path()).unwrap());
        let db = Database::open(&path).unwrap();
        let txn = db.begin_read().unwrap();
        assert_eq!(txn.open_table(CKPT).unwrap().len().unwrap(), 1);
    }
}
