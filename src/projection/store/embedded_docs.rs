//! The embedded document store: Elasticsearch's semantics on local tantivy indexes.
//!
//! Layout: `{data_dir}/docs/{projection}/meta.json` holds the projection's [`Meta`]
//! (written to a temporary file, fsynced and renamed into place), and every
//! generation is one tantivy index in `{data_dir}/docs/{projection}/g{generation}/`.
//!
//! Schema, from the projection's [`IndexSpec`] when the generation is created:
//! [`KEY_FIELD`] (exact, fast), a stored-only field holding the whole document as
//! JSON (the source every read returns), and one field per mapped field (text:
//! tokenized with tantivy's default tokenizer, scored with BM25; keyword: exact and
//! fast; long, double, boolean: indexed and fast). An array indexes every element;
//! fields that are not mapped live only in the source, and so does a mapped
//! field's value of another type (numbers and booleans are indexed as text in
//! text/keyword fields, numeric strings as numbers; an object nowhere), where
//! Elasticsearch would refuse the document. An existing generation keeps
//! the schema it was created with (read back from the index), whatever the spec
//! says now.
//!
//! Atomicity (I6). Every generation has one `IndexWriter` behind a mutex that the
//! sessions of all its partitions share. A commit holds the mutex while it checks
//! the partition's checkpoint, replaces the changed documents (delete by key, add
//! the new version), and commits the index with a *payload*: the generation's
//! whole bookkeeping (checkpoint of every partition, dead-letter count and the
//! newest [`DEAD_LETTERS_KEPT`] dead letters). Data and checkpoint are therefore one
//! atomic tantivy commit, as in the redb store: a crash leaves both as they were
//! or both moved, so [`Commit::Conflict`] never happens here, and the applied
//! offsets stamped on documents ([`apply_delta`]) are only a second line of
//! defence. The reader is reloaded before the commit returns, so every later read
//! or search sees it.
//!
//! Dead letters are idempotent per (partition, offset): a partition's dead letters
//! arrive in offset order, so one at or below the highest offset already recorded
//! for its partition is a repeat (a batch folded again after a restart).
//!
//! Search never goes through tantivy's query parser: the words of `text` are
//! tokenized with each text field's tokenizer and OR-ed as term queries (BM25),
//! filters are unscored term queries, `at_least` an unscored range. The hits are
//! ranked by a key computed per document (`Rank`) that implements the total
//! orders of [`Sort`]; a page keeps only the documents ranked after the cursor
//! (keyset pagination), and `total` counts every match. Relevance pages go by
//! position instead: a background merge that drops deleted documents changes the
//! BM25 statistics, so scores move between requests. A hit's sort values are
//! `[score, key, position]`, `[key]` or `[field value or null, key]`. A multi-valued field
//! sorts by its smallest value ascending and its largest descending (as
//! Elasticsearch does).
//!
//! All tantivy work runs on the blocking pool. Open generations are cached; each
//! holds a writer with the smallest memory budget tantivy accepts (15 MB, one
//! indexing thread), since a projection being replayed has two open at once.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tantivy::collector::{Count, TopDocs};
use tantivy::query::{
    AllQuery, BooleanQuery, ConstScoreQuery, EmptyQuery, Occur, Query, RangeQuery, TermQuery,
};
use tantivy::schema::{
    FAST, Field, FieldType as TantivyType, INDEXED, IndexRecordOption, STORED, STRING, TEXT,
    TantivyDocument, Value as _,
};
use tantivy::{
    DocAddress, DocId, DocSet, Index, IndexReader, IndexWriter, ReloadPolicy, Score, SegmentReader,
    TERMINATED, Term,
};

use super::doc::{
    DocStore, FieldType, Hit, IndexSpec, KEY_FIELD, Order, Page, Search, Sort, Specs,
    applied_offset, apply_delta, render, user_fields,
};
use super::{
    Commit, DEAD_LETTERS_KEPT, GenRef, Meta, Schema, Session, Store, StoreError, StoreResult,
};
use crate::projection::fold::{DeadLetter, DocReads, Effects};

/// The stored-only field holding the whole document (JSON text).
const SOURCE_FIELD: &str = "refold_source";
/// The smallest writer budget tantivy accepts.
const WRITER_BYTES: usize = 15_000_000;

fn storage(e: impl std::fmt::Display) -> StoreError {
    StoreError::Other(format!("embedded document store: {e}"))
}

/// What a generation's index commits carry besides the documents.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct GenState {
    /// Partition → next offset.
    checkpoints: BTreeMap<u32, u64>,
    dead_count: u64,
    /// Oldest first, at most [`DEAD_LETTERS_KEPT`].
    dead: Vec<DeadLetter>,
    /// Partition → highest dead-letter offset recorded.
    dead_max: BTreeMap<u32, u64>,
}

impl GenState {
    fn record(&mut self, letters: &[DeadLetter]) {
        for dl in letters {
            if self
                .dead_max
                .get(&dl.partition)
                .is_some_and(|max| dl.offset <= *max)
            {
                continue;
            }
            self.dead_max.insert(dl.partition, dl.offset);
            self.dead_count += 1;
            self.dead.push(dl.clone());
        }
        let excess = self.dead.len().saturating_sub(DEAD_LETTERS_KEPT);
        self.dead.drain(..excess);
    }
}

/// A generation's open index.
struct Gen {
    dir: PathBuf,
    index: Index,
    reader: IndexReader,
    key: Field,
    source: Field,
    /// Mapped field name → (field, type).
    mapped: BTreeMap<String, (Field, FieldType)>,
    /// Held for a whole commit; `None` after a failed commit (a fresh one is
    /// opened by the next) or once the generation was dropped.
    writer: Mutex<Option<IndexWriter>>,
    dropped: std::sync::atomic::AtomicBool,
    /// What the last commit's payload holds (changed with `writer` held; readers
    /// take only this lock, never waiting for a commit's fsync).
    state: Mutex<GenState>,
}

impl Gen {
    fn create(dir: &Path, spec: &IndexSpec) -> tantivy::Result<Gen> {
        let mut b = tantivy::schema::Schema::builder();
        b.add_text_field(KEY_FIELD, STRING | STORED | FAST);
        b.add_text_field(SOURCE_FIELD, STORED);
        for (name, t) in &spec.fields {
            if name == KEY_FIELD || name == SOURCE_FIELD {
                continue;
            }
            match t {
                FieldType::Text => b.add_text_field(name, TEXT),
                FieldType::Keyword => b.add_text_field(name, STRING | FAST),
                FieldType::Long => b.add_i64_field(name, INDEXED | FAST),
                FieldType::Double => b.add_f64_field(name, INDEXED | FAST),
                FieldType::Boolean => b.add_bool_field(name, INDEXED | FAST),
            };
        }
        std::fs::create_dir_all(dir)?;
        let index = Index::create_in_dir(dir, b.build())?;
        Gen::with_index(dir, index)
    }

    fn open(dir: &Path) -> tantivy::Result<Gen> {
        Gen::with_index(dir, Index::open_in_dir(dir)?)
    }

    fn with_index(dir: &Path, index: Index) -> tantivy::Result<Gen> {
        let schema = index.schema();
        let field = |name: &str| {
            schema.get_field(name).map_err(|_| {
                tantivy::TantivyError::SchemaError(format!(
                    "{} has no `{name}` field",
                    dir.display()
                ))
            })
        };
        let (key, source) = (field(KEY_FIELD)?, field(SOURCE_FIELD)?);
        let mut mapped = BTreeMap::new();
        for (f, entry) in schema.fields() {
            if f == key || f == source {
                continue;
            }
            let t = match entry.field_type() {
                TantivyType::Str(opts) => match opts.get_indexing_options() {
                    Some(i) if i.tokenizer() == "raw" => FieldType::Keyword,
                    _ => FieldType::Text,
                },
                TantivyType::I64(_) => FieldType::Long,
                TantivyType::F64(_) => FieldType::Double,
                TantivyType::Bool(_) => FieldType::Boolean,
                _ => continue,
            };
            mapped.insert(entry.name().to_owned(), (f, t));
        }
        let state = match index.load_metas()?.payload {
            Some(p) => serde_json::from_str(&p).map_err(|e| {
                tantivy::TantivyError::SchemaError(format!(
                    "{}: unreadable commit payload: {e}",
                    dir.display()
                ))
            })?,
            None => GenState::default(),
        };
        let writer = index.writer_with_num_threads(1, WRITER_BYTES)?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()?;
        Ok(Gen {
            dir: dir.to_owned(),
            index,
            reader,
            key,
            source,
            mapped,
            writer: Mutex::new(Some(writer)),
            dropped: Default::default(),
            state: Mutex::new(state),
        })
    }

    fn writer(&self) -> MutexGuard<'_, Option<IndexWriter>> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn state(&self) -> MutexGuard<'_, GenState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stored document of `key`, from the last commit.
    fn get(&self, key: &str) -> StoreResult<Option<Map<String, Value>>> {
        let searcher = self.reader.searcher();
        self.get_in(&searcher, key)
    }

    /// The stored document of `key` in `searcher`'s view.
    fn get_in(
        &self,
        searcher: &tantivy::Searcher,
        key: &str,
    ) -> StoreResult<Option<Map<String, Value>>> {
        match self.find(searcher, key)? {
            None => Ok(None),
            Some(addr) => self.source_of(searcher, addr).map(Some),
        }
    }

    /// Where the live document of `key` is: a lookup in each segment's postings
    /// of the key field (no query, no scoring; a key has one live document).
    fn find(&self, searcher: &tantivy::Searcher, key: &str) -> StoreResult<Option<DocAddress>> {
        let term = Term::from_field_text(self.key, key);
        for (ord, segment) in searcher.segment_readers().iter().enumerate() {
            let postings = segment
                .inverted_index(self.key)
                .map_err(storage)?
                .read_postings(&term, IndexRecordOption::Basic)
                .map_err(storage)?;
            let Some(mut postings) = postings else {
                continue;
            };
            let mut doc = postings.doc();
            while doc != TERMINATED {
                if segment.alive_bitset().is_none_or(|a| a.is_alive(doc)) {
                    return Ok(Some(DocAddress::new(ord as u32, doc)));
                }
                doc = postings.advance();
            }
        }
        Ok(None)
    }

    fn source_of(
        &self,
        searcher: &tantivy::Searcher,
        addr: DocAddress,
    ) -> StoreResult<Map<String, Value>> {
        let doc: TantivyDocument = searcher.doc(addr).map_err(storage)?;
        let json = doc
            .get_first(self.source)
            .and_then(|v| v.as_str())
            .ok_or_else(|| storage("a document without its source"))?;
        serde_json::from_str(json).map_err(storage)
    }

    /// The index document of a stored document.
    fn to_index(&self, key: &str, doc: &Map<String, Value>) -> TantivyDocument {
        let mut out = TantivyDocument::new();
        out.add_text(self.key, key);
        out.add_text(
            self.source,
            serde_json::to_string(doc).expect("JSON serializes"),
        );
        for (name, (field, t)) in &self.mapped {
            let values: Vec<&Value> = match doc.get(name) {
                None | Some(Value::Null) => continue,
                Some(Value::Array(a)) => a.iter().collect(),
                Some(v) => vec![v],
            };
            for v in values {
                // A value of another type is kept in the source only.
                match t {
                    FieldType::Text | FieldType::Keyword => match v {
                        Value::String(s) => out.add_text(*field, s),
                        Value::Number(_) | Value::Bool(_) => out.add_text(*field, v.to_string()),
                        _ => {}
                    },
                    FieldType::Long => {
                        if let Some(n) = as_i64(v) {
                            out.add_i64(*field, n);
                        }
                    }
                    FieldType::Double => {
                        if let Some(n) = as_f64(v) {
                            out.add_f64(*field, n);
                        }
                    }
                    FieldType::Boolean => {
                        if let Some(b) = as_bool(v) {
                            out.add_bool(*field, b);
                        }
                    }
                }
            }
        }
        out
    }
}

fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
    .filter(|f: &f64| f.is_finite())
}

fn as_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s == "true" => Some(true),
        Value::String(s) if s == "false" => Some(false),
        _ => None,
    }
}

pub struct EmbeddedDocs {
    root: PathBuf,
    specs: Arc<Specs>,
    open: Arc<Mutex<HashMap<GenRef, Arc<Gen>>>>,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(storage)?
}

/// A projection's directory name; refuses names that would leave `docs/`.
fn checked(projection: &str) -> StoreResult<&str> {
    if projection.is_empty()
        || projection.starts_with('.')
        || projection.contains(['/', '\\', '\0'])
    {
        return Err(storage(format!("`{projection}` is not a projection name")));
    }
    Ok(projection)
}

impl EmbeddedDocs {
    /// Opens (or creates) `{data_dir}/docs/`.
    pub fn open(data_dir: &Path, specs: Specs) -> anyhow::Result<Self> {
        let root = data_dir.join("docs");
        std::fs::create_dir_all(&root)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", root.display()))?;
        Ok(Self {
            root,
            specs: Arc::new(specs),
            open: Arc::default(),
        })
    }

    fn gen_dir(&self, g: &GenRef) -> StoreResult<PathBuf> {
        Ok(self
            .root
            .join(checked(&g.projection)?)
            .join(format!("g{}", g.generation)))
    }

    /// The generation's open index; `create`: make it when it does not exist,
    /// otherwise `None` for a generation that does not exist.
    async fn generation(&self, g: &GenRef, create: bool) -> StoreResult<Option<Arc<Gen>>> {
        let dir = self.gen_dir(g)?;
        let (open, specs, g) = (self.open.clone(), self.specs.clone(), g.clone());
        blocking(move || {
            let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(gen_) = open.get(&g) {
                return Ok(Some(gen_.clone()));
            }
            let gen_ = if dir.join("meta.json").exists() {
                Gen::open(&dir)
            } else if create {
                let spec = specs.get(&g.projection).cloned().unwrap_or_default();
                Gen::create(&dir, &spec)
            } else {
                return Ok(None);
            }
            .map_err(|e| storage(format!("{}: {e}", dir.display())))?;
            let gen_ = Arc::new(gen_);
            open.insert(g, gen_.clone());
            Ok(Some(gen_))
        })
        .await
    }
}

/// Writes `bytes` to `path` atomically: a temporary file, fsynced, renamed.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("a file in a directory");
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.tmp", uuid::Uuid::new_v4()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[async_trait]
impl Store for EmbeddedDocs {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn meta(&self, projection: &str) -> StoreResult<Meta> {
        let path = self.root.join(checked(projection)?).join("meta.json");
        blocking(move || match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| storage(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Meta::default()),
            Err(e) => Err(storage(format!("{}: {e}", path.display()))),
        })
        .await
    }

    async fn put_meta(&self, projection: &str, meta: &Meta) -> StoreResult<()> {
        let path = self.root.join(checked(projection)?).join("meta.json");
        let json = serde_json::to_vec(meta).map_err(storage)?;
        blocking(move || {
            write_atomic(&path, &json).map_err(|e| storage(format!("{}: {e}", path.display())))
        })
        .await
    }

    async fn session(&self, generation: &GenRef, partition: u32) -> StoreResult<Box<dyn Session>> {
        let gen_ = self
            .generation(generation, true)
            .await?
            .expect("created when missing");
        Ok(Box::new(DocSession { gen_, partition }))
    }

    async fn checkpoints(
        &self,
        generation: &GenRef,
        partitions: u32,
    ) -> StoreResult<Vec<Option<u64>>> {
        let Some(gen_) = self.generation(generation, false).await? else {
            return Ok(vec![None; partitions as usize]);
        };
        let state = gen_.state();
        Ok((0..partitions)
            .map(|p| state.checkpoints.get(&p).copied())
            .collect())
    }

    async fn view(
        &self,
        generation: &GenRef,
        schema: &Schema,
        key: &str,
    ) -> StoreResult<Option<Map<String, Value>>> {
        let Some(gen_) = self.generation(generation, false).await? else {
            return Ok(None);
        };
        let key = key.to_owned();
        let doc = blocking(move || gen_.get(&key)).await?;
        Ok(doc.map(|d| render(schema, d)))
    }

    async fn dead_letters(
        &self,
        generation: &GenRef,
        limit: usize,
    ) -> StoreResult<(u64, Vec<DeadLetter>)> {
        let Some(gen_) = self.generation(generation, false).await? else {
            return Ok((0, Vec::new()));
        };
        let state = gen_.state();
        let newest = state.dead.iter().rev().take(limit).cloned().collect();
        Ok((state.dead_count, newest))
    }

    async fn drop_generation(&self, generation: &GenRef) -> StoreResult<()> {
        let dir = self.gen_dir(generation)?;
        let (open, g) = (self.open.clone(), generation.clone());
        blocking(move || {
            let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(gen_) = open.remove(&g) {
                // Sessions still holding it fail from now on.
                gen_.dropped
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                let writer = gen_.writer().take();
                if let Some(w) = writer {
                    let _ = w.wait_merging_threads();
                }
            }
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(storage(format!("{}: {e}", dir.display()))),
            }
        })
        .await
    }

    async fn generations(&self, projection: &str) -> StoreResult<BTreeSet<u64>> {
        let dir = self.root.join(checked(projection)?);
        blocking(move || {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
                Err(e) => return Err(storage(format!("{}: {e}", dir.display()))),
            };
            let mut out = BTreeSet::new();
            for entry in entries {
                let path = entry.map_err(storage)?.path();
                let n = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_prefix('g'))
                    .and_then(|n| n.parse().ok());
                if let Some(n) = n
                    && path.join("meta.json").exists()
                {
                    out.insert(n);
                }
            }
            Ok(out)
        })
        .await
    }
}

#[async_trait]
impl DocStore for EmbeddedDocs {
    async fn search(&self, generation: &GenRef, search: &Search) -> StoreResult<Page> {
        let Some(gen_) = self.generation(generation, false).await? else {
            return Ok(Page {
                total: 0,
                hits: Vec::new(),
            });
        };
        let search = search.clone();
        blocking(move || run_search(&gen_, &search)).await
    }
}

struct DocSession {
    gen_: Arc<Gen>,
    partition: u32,
}

#[async_trait]
impl Session for DocSession {
    async fn checkpoint(&mut self) -> StoreResult<Option<u64>> {
        Ok(self.gen_.state().checkpoints.get(&self.partition).copied())
    }

    async fn read_fields(
        &mut self,
        keys: &BTreeSet<String>,
        _fields: &[String],
    ) -> StoreResult<DocReads> {
        let (gen_, keys, p) = (self.gen_.clone(), keys.clone(), self.partition);
        blocking(move || {
            let mut reads = DocReads::new();
            let searcher = gen_.reader.searcher();
            for key in keys {
                let Some(doc) = gen_.get_in(&searcher, &key)? else {
                    continue;
                };
                if let Some(a) = applied_offset(&doc, p) {
                    reads.applied.insert(key.clone(), a);
                }
                reads
                    .fields
                    .insert(key, user_fields(doc).into_iter().collect());
            }
            Ok(reads)
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
        let (gen_, p) = (self.gen_.clone(), self.partition);
        let fx = Arc::clone(effects);
        blocking(move || {
            let mut writer = gen_.writer();
            let found = gen_.state().checkpoints.get(&p).copied();
            if found != expected {
                return Ok(Commit::Fenced { found });
            }
            let mut state = gen_.state().clone();
            state.checkpoints.insert(p, next);
            state.record(&fx.dead_letters);
            let payload = serde_json::to_string(&state).expect("state serializes");
            if gen_.dropped.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(storage(format!("{} was dropped", gen_.dir.display())));
            }
            if writer.is_none() {
                *writer = Some(
                    gen_.index
                        .writer_with_num_threads(1, WRITER_BYTES)
                        .map_err(storage)?,
                );
            }
            let slot = &mut *writer;
            let writer = slot.as_mut().expect("opened above");
            let written = (|| {
                let searcher = gen_.reader.searcher();
                for (key, delta) in &fx.docs {
                    let current = gen_.get_in(&searcher, key)?;
                    // A key not in the index has nothing to delete (the writer
                    // holds nothing uncommitted: a failed commit drops it).
                    let existed = current.is_some();
                    let new = apply_delta(key, current, delta, p, next).map_err(storage)?;
                    if existed {
                        writer.delete_term(Term::from_field_text(gen_.key, key));
                    }
                    if let Some(doc) = new {
                        writer
                            .add_document(gen_.to_index(key, &doc))
                            .map_err(storage)?;
                    }
                }
                let mut prepared = writer.prepare_commit().map_err(storage)?;
                prepared.set_payload(&payload);
                prepared.commit().map_err(storage)?;
                Ok(())
            })();
            if let Err(e) = written {
                // Nothing of the batch may reach a later commit: the writer is
                // dropped with what it holds, and the next commit opens a fresh one
                // from the last commit. (`IndexWriter::rollback` leaves a writer
                // without its lock when reopening fails, and panics on the next
                // call: seen under load, after a segment file vanished under a
                // merge.)
                drop(slot.take());
                return Err(e);
            }
            // Documents first, checkpoint second: whoever sees the checkpoint
            // moved (read-your-writes waits on it) finds the documents too.
            let reloaded = gen_.reader.reload();
            *gen_.state() = state;
            reloaded.map_err(storage)?;
            Ok(Commit::Applied)
        })
        .await
    }
}

// ---- search ----------------------------------------------------------------------

/// An f64 with a total order.
#[derive(Debug, Clone, Copy)]
struct Num(f64);

impl PartialEq for Num {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Num {}
impl PartialOrd for Num {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Num {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// A sort field's value (one type per search).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum SortValue {
    Bool(bool),
    Long(i64),
    Double(Num),
    Str(String),
}

impl SortValue {
    fn to_json(&self) -> Value {
        match self {
            SortValue::Bool(b) => Value::Bool(*b),
            SortValue::Long(n) => Value::from(*n),
            SortValue::Double(n) => Value::from(n.0),
            SortValue::Str(s) => Value::String(s.clone()),
        }
    }

    fn from_json(t: FieldType, v: &Value) -> Option<SortValue> {
        match t {
            FieldType::Keyword => v.as_str().map(|s| SortValue::Str(s.to_owned())),
            FieldType::Long => v.as_i64().map(SortValue::Long),
            FieldType::Double => v.as_f64().map(|f| SortValue::Double(Num(f))),
            FieldType::Boolean => v.as_bool().map(SortValue::Bool),
            FieldType::Text => None,
        }
    }
}

/// What ranks a hit before the key. Greater ranks first; one search only ever
/// compares values of the same variant, or `Missing` with `Asc`/`Desc` (missing
/// values rank lower, so they come last in both orders).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Primary {
    None,
    Missing,
    Asc(Reverse<SortValue>),
    Desc(SortValue),
    Score(Num),
}

/// A hit's place in the total order of its search: greater comes first.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    primary: Primary,
    key: Reverse<String>,
}

impl Rank {
    /// The hit's sort values, as [`Hit::sort`] and [`Search::after`] carry them.
    fn to_json(&self) -> Vec<Value> {
        let key = Value::String(self.key.0.clone());
        match &self.primary {
            Primary::None => vec![key],
            Primary::Missing => vec![Value::Null, key],
            Primary::Asc(Reverse(v)) | Primary::Desc(v) => vec![v.to_json(), key],
            Primary::Score(s) => vec![Value::from(s.0), key],
        }
    }

    fn from_json(sort: &Sort, t: Option<FieldType>, values: &[Value]) -> Option<Rank> {
        let (primary, key) = match (sort, values) {
            (Sort::Key, [key]) => (Primary::None, key),
            (Sort::Relevance, [score, key, _position]) => {
                (Primary::Score(Num(score.as_f64()?)), key)
            }
            (Sort::Field(..), [Value::Null, key]) => (Primary::Missing, key),
            (Sort::Field(_, order), [v, key]) => {
                let v = SortValue::from_json(t?, v)?;
                match order {
                    Order::Asc => (Primary::Asc(Reverse(v)), key),
                    Order::Desc => (Primary::Desc(v), key),
                }
            }
            _ => return None,
        };
        Some(Rank {
            primary,
            key: Reverse(key.as_str()?.to_owned()),
        })
    }
}

/// How one segment finds a document's sort value.
enum SortColumn {
    None,
    Str(tantivy::columnar::StrColumn),
    Long(tantivy::columnar::Column<i64>),
    Double(tantivy::columnar::Column<f64>),
    Bool(tantivy::columnar::Column<bool>),
}

impl SortColumn {
    fn open(reader: &SegmentReader, field: &str, t: FieldType) -> tantivy::Result<SortColumn> {
        let ff = reader.fast_fields();
        Ok(match t {
            FieldType::Keyword => ff.str(field)?.map_or(SortColumn::None, SortColumn::Str),
            FieldType::Long => ff
                .column_opt::<i64>(field)?
                .map_or(SortColumn::None, SortColumn::Long),
            FieldType::Double => ff
                .column_opt::<f64>(field)?
                .map_or(SortColumn::None, SortColumn::Double),
            FieldType::Boolean => ff
                .column_opt::<bool>(field)?
                .map_or(SortColumn::None, SortColumn::Bool),
            FieldType::Text => SortColumn::None,
        })
    }

    /// The smallest (`Asc`) or largest (`Desc`) value of `doc`.
    fn value(&self, doc: DocId, order: Order) -> Option<SortValue> {
        fn pick<T: PartialOrd>(it: impl Iterator<Item = T>, order: Order) -> Option<T> {
            it.reduce(|a, b| {
                let b_first = match order {
                    Order::Asc => b < a,
                    Order::Desc => b > a,
                };
                if b_first { b } else { a }
            })
        }
        match self {
            SortColumn::None => None,
            SortColumn::Str(c) => {
                // Term ordinals follow the strings' order.
                let ord = pick(c.term_ords(doc), order)?;
                let mut s = String::new();
                c.ord_to_str(ord, &mut s).ok()?.then_some(SortValue::Str(s))
            }
            SortColumn::Long(c) => pick(c.values_for_doc(doc), order).map(SortValue::Long),
            SortColumn::Double(c) => {
                pick(c.values_for_doc(doc).map(Num), order).map(SortValue::Double)
            }
            SortColumn::Bool(c) => pick(c.values_for_doc(doc), order).map(SortValue::Bool),
        }
    }
}

fn mapped(gen_: &Gen, field: &str) -> StoreResult<(Field, FieldType)> {
    gen_.mapped
        .get(field)
        .copied()
        .ok_or_else(|| storage(format!("`{field}` is not a mapped field of the index")))
}

fn filter_term(field: Field, t: FieldType, name: &str, v: &Value) -> StoreResult<Term> {
    let bad = || {
        storage(format!(
            "`{v}` cannot be compared with the {} field `{name}`",
            t.as_str()
        ))
    };
    Ok(match t {
        FieldType::Keyword => Term::from_field_text(
            field,
            &match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            },
        ),
        FieldType::Long => Term::from_field_i64(field, as_i64(v).ok_or_else(bad)?),
        FieldType::Double => Term::from_field_f64(field, as_f64(v).ok_or_else(bad)?),
        FieldType::Boolean => Term::from_field_bool(field, as_bool(v).ok_or_else(bad)?),
        FieldType::Text => return Err(bad()),
    })
}

/// An unscored required clause.
fn must(q: Box<dyn Query>) -> (Occur, Box<dyn Query>) {
    (Occur::Must, Box::new(ConstScoreQuery::new(q, 0.0)))
}

fn build_query(gen_: &Gen, search: &Search) -> StoreResult<Box<dyn Query>> {
    let mut clauses: Vec<(Occur, Box<dyn Query>)> = Vec::new();
    if let Some(text) = &search.text {
        let mut words: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        for (field, t) in gen_.mapped.values() {
            if *t != FieldType::Text {
                continue;
            }
            let mut analyzer = gen_.index.tokenizer_for_field(*field).map_err(storage)?;
            let mut tokens = BTreeSet::new();
            analyzer.token_stream(text).process(&mut |tok| {
                tokens.insert(tok.text.clone());
            });
            for tok in tokens {
                words.push((
                    Occur::Should,
                    Box::new(TermQuery::new(
                        Term::from_field_text(*field, &tok),
                        IndexRecordOption::WithFreqs,
                    )),
                ));
            }
        }
        if words.is_empty() {
            return Ok(Box::new(EmptyQuery));
        }
        clauses.push((Occur::Must, Box::new(BooleanQuery::new(words))));
    }
    for (name, v) in &search.filters {
        let (field, t) = mapped(gen_, name)?;
        let term = filter_term(field, t, name, v)?;
        clauses.push(must(Box::new(TermQuery::new(
            term,
            IndexRecordOption::Basic,
        ))));
    }
    if let Some((name, min)) = &search.at_least {
        let lower = match mapped(gen_, name)? {
            (f, FieldType::Long) => Term::from_field_i64(f, *min),
            (f, FieldType::Double) => Term::from_field_f64(f, *min as f64),
            (_, t) => {
                return Err(storage(format!(
                    "`{name}` is a {} field, not a number",
                    t.as_str()
                )));
            }
        };
        clauses.push(must(Box::new(RangeQuery::new(
            Bound::Included(lower),
            Bound::Unbounded,
        ))));
    }
    Ok(if clauses.is_empty() {
        Box::new(AllQuery)
    } else {
        Box::new(BooleanQuery::new(clauses))
    })
}

fn run_search(gen_: &Gen, search: &Search) -> StoreResult<Page> {
    let query = build_query(gen_, search)?;
    let sort_field = match &search.sort {
        Sort::Field(name, order) => Some((name.clone(), mapped(gen_, name)?.1, *order)),
        _ => None,
    };
    if let Some((name, FieldType::Text, _)) = &sort_field {
        return Err(storage(format!("`{name}` is a text field: it cannot sort")));
    }
    let after = match &search.after {
        None => None,
        Some(values) => Some(
            Rank::from_json(&search.sort, sort_field.as_ref().map(|s| s.1), values)
                .ok_or_else(|| storage("the cursor does not belong to this search"))?,
        ),
    };
    let relevance = search.sort == Sort::Relevance;
    // Relevance pages go by position: scores move when a background merge drops
    // deleted documents from the BM25 statistics, which would make a keyset on
    // the score skip or repeat hits (Elasticsearch's adapter pages it the same way).
    let offset = match (&search.after, relevance) {
        (Some(values), true) => values.get(2).and_then(Value::as_u64).unwrap_or(0) as usize,
        _ => 0,
    };
    let after = if relevance { None } else { after };
    let ranked = TopDocs::with_limit(search.limit.max(1))
        .and_offset(offset)
        .tweak_score(move |segment: &SegmentReader| {
            let key = segment.fast_fields().str(KEY_FIELD).ok().flatten();
            let column = match &sort_field {
                Some((name, t, _)) => {
                    SortColumn::open(segment, name, *t).unwrap_or(SortColumn::None)
                }
                None => SortColumn::None,
            };
            let (sort_field, after) = (sort_field.clone(), after.clone());
            move |doc: DocId, score: Score| -> Option<Rank> {
                let mut k = String::new();
                let ord = key.as_ref()?.term_ords(doc).next()?;
                key.as_ref()?.ord_to_str(ord, &mut k).ok()?;
                let primary = match &sort_field {
                    Some((_, _, order)) => match (column.value(doc, *order), order) {
                        (None, _) => Primary::Missing,
                        (Some(v), Order::Asc) => Primary::Asc(Reverse(v)),
                        (Some(v), Order::Desc) => Primary::Desc(v),
                    },
                    None if relevance => Primary::Score(Num(f64::from(score))),
                    None => Primary::None,
                };
                let rank = Rank {
                    primary,
                    key: Reverse(k),
                };
                // Keyset pagination: only what ranks after the cursor.
                after.as_ref().is_none_or(|a| rank < *a).then_some(rank)
            }
        });
    let searcher = gen_.reader.searcher();
    let (total, top) = searcher
        .search(query.as_ref(), &(Count, ranked))
        .map_err(storage)?;
    let mut hits = Vec::new();
    for (rank, addr) in top {
        let Some(rank) = rank else { continue };
        let doc = gen_.source_of(&searcher, addr)?;
        let mut sort = rank.to_json();
        if relevance {
            sort.push(Value::from(offset + hits.len() + 1));
        }
        hits.push(Hit {
            key: rank.key.0.clone(),
            score: match rank.primary {
                Primary::Score(s) => Some(s.0),
                _ => None,
            },
            sort,
            doc: user_fields(doc),
        });
    }
    hits.truncate(search.limit);
    Ok(Page {
        total: total as u64,
        hits,
    })
}
