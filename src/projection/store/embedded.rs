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
//! The record keeps each such field's row count. Each generation's read models
//! are tables of their own ([`Tables`]), keyed by byte strings ([`part`]), so a
//! key compares as one byte string and dropping a generation drops its tables.
//! The file records its layout ([`LAYOUT`]): read models written in an older
//! layout are dropped when the file is opened and rebuilt from the log.
//! Differences from Redis, by design:
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
/// "layout" -> the layout of the read models in this file ([`LAYOUT`])
const FORMAT: TableDefinition<&str, u32> = TableDefinition::new("format");
/// (generation, sequence) -> DeadLetter (JSON); the sequence counts all of them
const DEAD: TableDefinition<(&str, u64), &str> = TableDefinition::new("dead_letters");
/// generation -> dead letters recorded so far
const DEAD_COUNT: TableDefinition<&str, u64> = TableDefinition::new("dead_count");

/// redb's page cache for the read models.
pub const CACHE_BYTES: usize = 64 << 20;

/// The layout this version writes. 1: sets and distinct values inside each key's
/// record; 2: as rows of their own; 3: each generation's read models in tables
/// of their own ([`Tables`]), keyed by byte strings.
pub const LAYOUT: u32 = 3;

/// The tables every generation shares.
macro_rules! each_table {
    ($m:ident!($($arg:tt)*)) => {
        $m!($($arg)* META);
        $m!($($arg)* CKPT);
        $m!($($arg)* DEAD);
        $m!($($arg)* DEAD_COUNT);
    };
}

/// The tables of one generation's read models, named after it. Keys are byte
/// strings of [`part`]s, so that a row compares as one byte string:
/// - `docs@{gid}`: key → [`StoredDoc`] (JSON);
/// - `members@{gid}`: part(key) part(field) member → (): the members of set
///   fields and the values distinct fields have seen, one row each;
/// - `rank@{gid}`: part(ranking) member → score;
/// - `rank_idx@{gid}`: part(ranking) [`ordered`] score (8 bytes, big-endian)
///   member → (): the score index.
struct Tables {
    docs: String,
    members: String,
    rank: String,
    rank_idx: String,
}

type Bytes = &'static [u8];

impl Tables {
    fn of(gid: &str) -> Self {
        Self {
            docs: format!("docs@{gid}"),
            members: format!("members@{gid}"),
            rank: format!("rank@{gid}"),
            rank_idx: format!("rank_idx@{gid}"),
        }
    }

    fn docs(&self) -> TableDefinition<'_, &'static str, Bytes> {
        TableDefinition::new(&self.docs)
    }

    fn members(&self) -> TableDefinition<'_, Bytes, ()> {
        TableDefinition::new(&self.members)
    }

    fn rank(&self) -> TableDefinition<'_, Bytes, f64> {
        TableDefinition::new(&self.rank)
    }

    fn rank_idx(&self) -> TableDefinition<'_, Bytes, ()> {
        TableDefinition::new(&self.rank_idx)
    }
}

/// Appends `s` as one part of a byte-string key: its bytes with each 0 escaped
/// as 0 0xFF, then 0 1. Keys of parts sort as the parts do, element by element,
/// and the rows under a prefix of whole parts are `prefix..`[`end_of`]`(prefix)`.
fn part(key: &mut Vec<u8>, s: &str) {
    for &b in s.as_bytes() {
        key.push(b);
        if b == 0 {
            key.push(0xFF);
        }
    }
    key.extend_from_slice(&[0, 1]);
}

/// The first key after every key that starts with `prefix` (whole [`part`]s,
/// which end in 1).
fn end_of(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    *end.last_mut().expect("a prefix of parts") += 1;
    end
}

/// `parts`, each a [`part`].
fn parts(parts: &[&str]) -> Vec<u8> {
    let mut key = Vec::new();
    for p in parts {
        part(&mut key, p);
    }
    key
}

/// Keys of rows under one prefix of [`part`]s, in one buffer: the prefix, then
/// a row's last element as it is (a member, a ranking's member).
struct RowKey {
    buf: Vec<u8>,
    prefix: usize,
}

impl RowKey {
    fn new(prefix: &[&str]) -> Self {
        let buf = parts(prefix);
        Self {
            prefix: buf.len(),
            buf,
        }
    }

    /// The key of the row ending with `last`'s bytes (after `more`'s, if any).
    fn of(&mut self, last: &str) -> &[u8] {
        self.with(&[], last)
    }

    fn with(&mut self, more: &[u8], last: &str) -> &[u8] {
        self.buf.truncate(self.prefix);
        self.buf.extend_from_slice(more);
        self.buf.extend_from_slice(last.as_bytes());
        &self.buf
    }
}

/// A generation's table for reading; `None` if nothing was ever written to it.
fn read_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    def: TableDefinition<'_, K, V>,
) -> Result<Option<redb::ReadOnlyTable<K, V>>, redb::Error> {
    match txn.open_table(def) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
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

type Members<'t> = redb::Table<'t, Bytes, ()>;

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

/// A generation's name in table names and keys.
fn gen_id(g: &GenRef) -> String {
    format!("{}:{}", g.projection, g.generation)
}

/// The first string after every string that starts with `s`'s whole value, for
/// tuple ranges: `(s, 0)..(after(s), 0)` holds exactly the tuples whose first
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
        // Every table but the layout's: the shared ones and every generation's.
        let tables: Vec<_> = txn
            .list_tables()
            .map_err(storage)?
            .filter(|t| t.name() != FORMAT.name())
            .collect();
        for t in tables {
            txn.delete_table(t).map_err(storage)?;
        }
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
    key: &str,
    field: Option<&str>,
) -> Result<(), redb::Error> {
    let mut lo = parts(&[key]);
    if let Some(f) = field {
        part(&mut lo, f);
    }
    let hi = end_of(&lo);
    members.retain_in(lo.as_slice()..hi.as_slice(), |_, _| false)?;
    Ok(())
}

/// Applies one field's combined change to a stored document and its member rows.
fn apply_field(
    doc: &mut StoredDoc,
    members: &mut Members<'_>,
    key: &str,
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
            clear_members(members, key, Some(field))?;
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
    let mut row = RowKey::new(&[key, field]);
    match (slot, delta) {
        (Stored::Counter(n), FieldDelta::Incr(by)) => *n = n.saturating_add(*by),
        (Stored::Set(n), FieldDelta::Members(m)) => {
            for (member, present) in m {
                if *present {
                    if members.insert(row.of(member), ())?.is_none() {
                        *n += 1;
                    }
                } else if members.remove(row.of(member))?.is_some() {
                    *n -= 1;
                }
            }
        }
        (Stored::Distinct(n), FieldDelta::Distinct(d)) => {
            for value in d {
                if members.insert(row.of(value), ())?.is_none() {
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
    let tables = Tables::of(gid);
    let mut docs = txn.open_table(tables.docs())?;
    let mut members = txn.open_table(tables.members())?;
    for (key, delta) in &fx.docs {
        let mut doc = if delta.reset {
            clear_members(&mut members, key, None)?;
            StoredDoc::default()
        } else {
            docs.get(key.as_str())?
                .map(|v| read_doc(v.value()))
                .unwrap_or_default()
        };
        for (field, d) in &delta.fields {
            apply_field(&mut doc, &mut members, key, field, d)?;
        }
        // As in Redis, an emptied set or list no longer exists.
        doc.fields.retain(|_, v| match v {
            Stored::Set(n) => *n > 0,
            Stored::List(l) => !l.is_empty(),
            _ => true,
        });
        if doc.fields.is_empty() {
            docs.remove(key.as_str())?;
        } else {
            let bytes = serde_json::to_vec(&doc).expect("a stored doc serializes");
            docs.insert(key.as_str(), bytes.as_slice())?;
        }
    }
    let mut rank = txn.open_table(tables.rank())?;
    let mut idx = txn.open_table(tables.rank_idx())?;
    for (name, members) in &fx.rankings {
        let (mut score_key, mut idx_key) = (RowKey::new(&[name]), RowKey::new(&[name]));
        for (member, by) in members {
            let old = rank.get(score_key.of(member))?.map(|v| v.value());
            if let Some(old) = old {
                idx.remove(idx_key.with(&ordered(old).to_be_bytes(), member))?;
            }
            let new = old.unwrap_or(0.0) + by;
            rank.insert(score_key.of(member), new)?;
            idx.insert(idx_key.with(&ordered(new).to_be_bytes(), member), ())?;
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
                let tables = Tables::of(&gid);
                let Some(doc) = read_table(&txn, tables.docs())?
                    .map(|t| t.get(key.as_str()))
                    .transpose()?
                    .flatten()
                    .map(|v| read_doc(v.value()))
                else {
                    return Ok(None);
                };
                let mut sets = BTreeMap::new();
                let Some(rows) = read_table(&txn, tables.members())? else {
                    return Ok(Some((doc, sets)));
                };
                for (field, stored) in &doc.fields {
                    if !matches!(stored, Stored::Set(_)) {
                        continue;
                    }
                    let lo = parts(&[key.as_str(), field]);
                    let hi = end_of(&lo);
                    let members = rows
                        .range(lo.as_slice()..hi.as_slice())?
                        .map(|row| {
                            let (k, _) = row?;
                            Ok(String::from_utf8_lossy(&k.value()[lo.len()..]).into_owned())
                        })
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
            let tables = Tables::of(g);
            txn.delete_table(tables.docs())?;
            txn.delete_table(tables.members())?;
            txn.delete_table(tables.rank())?;
            txn.delete_table(tables.rank_idx())?;
            txn.open_table(CKPT)?
                .retain_in((g, 0u32)..(h, 0u32), |_, _| false)?;
            txn.open_table(DEAD)?
                .retain_in((g, 0u64)..(h, 0u64), |_, _| false)?;
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
            let tables = Tables::of(&gid);
            let (Some(idx), Some(rank)) = (
                read_table(&txn, tables.rank_idx())?,
                read_table(&txn, tables.rank())?,
            ) else {
                return Ok(Vec::new());
            };
            let lo = parts(&[name.as_str()]);
            let hi = end_of(&lo);
            let mut score_key = RowKey::new(&[name.as_str()]);
            let mut out = Vec::new();
            for entry in idx.range(lo.as_slice()..hi.as_slice())?.rev().take(limit) {
                let (k, _) = entry?;
                // After the ranking's part, the 8 bytes of the ordered score.
                let member = String::from_utf8_lossy(&k.value()[lo.len() + 8..]).into_owned();
                let score = rank
                    .get(score_key.of(&member))?
                    .map(|v| v.value())
                    .unwrap_or(0.0);
                out.push((member, score));
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
            let mut out = DocReads::new();
            let Some(t) = read_table(&txn, Tables::of(&gid).docs())? else {
                return Ok(out);
            };
            for key in keys {
                let Some(doc) = t.get(key.as_str())?.map(|v| read_doc(v.value())) else {
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
    fn keys_of_parts_sort_as_the_parts_do_and_a_prefix_holds_exactly_its_rows() {
        let words = ["", "a", "a\0", "a\0b", "a\u{1}", "ab", "b", "\u{ff}", "é"];
        let mut tuples = Vec::new();
        for x in words {
            for y in words {
                tuples.push((x, y));
            }
        }
        for &(a, b) in &tuples {
            for &(c, d) in &tuples {
                assert_eq!(
                    parts(&[a, b]).cmp(&parts(&[c, d])),
                    (a, b).cmp(&(c, d)),
                    "{a:?},{b:?} vs {c:?},{d:?}"
                );
            }
            // The rows under (a, b): a member's row and a deeper part's.
            let lo = parts(&[a, b]);
            let hi = end_of(&lo);
            for &(c, d) in &tuples {
                for row in [RowKey::new(&[c, d]).of("m").to_vec(), parts(&[c, d, "x"])] {
                    let under = (lo.as_slice()..hi.as_slice()).contains(&row.as_slice());
                    assert_eq!(under, (a, b) == (c, d), "{c:?},{d:?} under {a:?},{b:?}");
                }
            }
        }
        // A score index row: the 8 bytes of the score may start with 0xFF.
        let lo = parts(&["r"]);
        let top = RowKey::new(&["r"])
            .with(&ordered(f64::MAX).to_be_bytes(), "m")
            .to_vec();
        assert!(top[lo.len()] == 0xFF && top.as_slice() < end_of(&lo).as_slice());
    }

    #[test]
    fn a_field_of_another_kind_starts_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("t.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        let tables = Tables::of("g");
        let mut rows = txn.open_table(tables.members()).unwrap();
        let mut doc = StoredDoc::default();
        let mut apply = |d: FieldDelta| apply_field(&mut doc, &mut rows, "k", "f", &d);
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
        // Layouts 1 and 2 kept every generation in shared tables with tuple keys.
        const OLD_DOCS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("docs");
        const OLD_MEMBERS: TableDefinition<(&str, &str, &str, &str), ()> =
            TableDefinition::new("members");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("views.redb");
        for old in [1, 2] {
            {
                let db = Database::create(&path).unwrap();
                let txn = db.begin_write().unwrap();
                txn.open_table(META).unwrap().insert("p", "{}").unwrap();
                let doc = if old == 1 {
                    // No format table; a key's distinct values inside its record.
                    r#"{"fields":{"v":{"distinct":["\"u1\""]}}}"#
                } else {
                    txn.open_table(FORMAT).unwrap().insert("layout", 2).unwrap();
                    txn.open_table(OLD_MEMBERS)
                        .unwrap()
                        .insert(("p:1", "k", "v", "\"u1\""), ())
                        .unwrap();
                    r#"{"fields":{"v":{"distinct":1}}}"#
                };
                txn.open_table(OLD_DOCS)
                    .unwrap()
                    .insert(("p:1", "k"), doc.as_bytes())
                    .unwrap();
                txn.open_table(CKPT).unwrap().insert(("p:1", 0), 7).unwrap();
                txn.commit().unwrap();
            }
            drop(EmbeddedKv::open(dir.path()).unwrap());
            let db = Database::open(&path).unwrap();
            let txn = db.begin_read().unwrap();
            let mut tables: Vec<String> = txn
                .list_tables()
                .unwrap()
                .map(|t| t.name().to_owned())
                .collect();
            tables.sort();
            assert_eq!(
                tables,
                [
                    "checkpoints",
                    "dead_count",
                    "dead_letters",
                    "format",
                    "meta"
                ],
                "layout {old}"
            );
            assert_eq!(txn.open_table(CKPT).unwrap().len().unwrap(), 0);
            assert_eq!(txn.open_table(META).unwrap().len().unwrap(), 0);
            let layout = txn.open_table(FORMAT).unwrap().get("layout").unwrap();
            assert_eq!(layout.map(|v| v.value()), Some(LAYOUT));
            drop(txn);
            drop(db);
            if old == 1 {
                std::fs::remove_file(&path).unwrap();
            }
        }
        let db = Database::open(&path).unwrap();
        // A file of the current layout keeps its read models.
        let w = db.begin_write().unwrap();
        w.open_table(CKPT).unwrap().insert(("p:1", 0), 7).unwrap();
        let g1 = Tables::of("p:1");
        w.open_table(g1.docs())
            .unwrap()
            .insert("k", &b"{}"[..])
            .unwrap();
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
        assert_eq!(txn.open_table(g1.docs()).unwrap().len().unwrap(), 1);
    }
}
