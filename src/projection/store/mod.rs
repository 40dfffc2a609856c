//! The read-model ports and their adapters.
//!
//! [`Store`] is what the engine needs of any read-model store: meta records,
//! per-partition sessions that commit a batch with its checkpoint, dead letters and
//! generations. Two ports extend it:
//! - [`KvStore`], after Redis's semantics (counters, sets, rankings): adapters
//!   [`redis::RedisStore`] and [`embedded::EmbeddedKv`] (redb);
//! - [`doc::DocStore`], after Elasticsearch's (JSON documents, search): adapters
//!   [`elastic::ElasticStore`] and [`embedded_docs::EmbeddedDocs`] (tantivy).
//!
//! Data is kept per *generation* of a projection ([`GenRef`]): a replay builds a
//! new generation beside the live one, and the projection's [`Meta`] record says
//! which generation is live; switching is one write of that record (I7).
//!
//! Checkpoints (I6): each generation keeps, per partition of the events topic, the
//! next offset to read. [`Session::commit`] applies a batch's effects and moves
//! the checkpoint, and only if the checkpoint still holds the value the worker last
//! saw: a worker that was overtaken (another process took the partition, or the
//! store lost its data) is *fenced* and told what it found, instead of applying its
//! batch twice or on top of the wrong state. Key-value stores do this in one atomic
//! step; Elasticsearch cannot, so its documents carry the offset each partition
//! applied up to ([`DocReads`] hands it to the fold, which skips what a
//! document already holds) and its checkpoint is written after the data.

pub mod doc;
pub mod elastic;
pub mod embedded;
pub mod embedded_docs;
pub mod redis;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::def::FieldKind;
use super::fold::{DeadLetter, DocReads, Effects};

/// Field name → kind: how a key's values are stored and rendered.
pub type Schema = BTreeMap<String, FieldKind>;

/// Dead letters kept per generation (the count covers all of them).
pub const DEAD_LETTERS_KEPT: usize = 100;

/// One generation of one projection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GenRef {
    pub projection: String,
    pub generation: u64,
}

impl fmt::Display for GenRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.projection, self.generation)
    }
}

/// A generation as recorded in [`Meta`]: its number and the definition it is built
/// with (the file's text), so that it is served and fed by that definition even
/// after the file changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenInfo {
    pub generation: u64,
    pub version: u32,
    pub source: String,
}

/// Which generations of a projection exist.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// The generation queries read.
    pub live: Option<GenInfo>,
    /// A generation being built by a replay.
    pub building: Option<GenInfo>,
}

/// Outcome of [`Session::commit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    Applied,
    /// The checkpoint was not what the worker expected: nothing was applied.
    Fenced {
        found: Option<u64>,
    },
    /// A document changed between [`Session::read_fields`] and the commit (a
    /// worker of another partition wrote it). Part of the batch may be applied and
    /// the checkpoint did not move: read and fold the batch again; what the
    /// documents already hold is skipped (document stores only).
    Conflict,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or timed out: retry later.
    #[error("read-model store unavailable: {0}")]
    Unavailable(String),
    #[error("read-model store error: {0}")]
    Other(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

impl From<StoreError> for crate::error::ApiError {
    /// A store that fails a query or an admin call: 503, retry.
    fn from(e: StoreError) -> Self {
        Self::StoreUnavailable(e.to_string())
    }
}

/// A projection's store, by port.
#[derive(Clone)]
pub enum ReadStore {
    Kv(Arc<dyn KvStore>),
    Doc(Arc<dyn doc::DocStore>),
}

impl ReadStore {
    /// What the engine uses of either.
    pub fn base(&self) -> Arc<dyn Store> {
        match self {
            ReadStore::Kv(s) => s.clone(),
            ReadStore::Doc(s) => s.clone(),
        }
    }
}

/// The stores a service runs its projections on, by kind.
#[derive(Clone, Default)]
pub struct Stores {
    /// For `store = "redis"` projections.
    pub kv: Option<Arc<dyn KvStore>>,
    /// For `store = "elasticsearch"` projections.
    pub docs: Option<Arc<dyn doc::DocStore>>,
}

/// What the engine needs of a read-model store, whatever its kind.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `"redis"`, `"elasticsearch"` or `"embedded"`, for logs and status.
    fn backend(&self) -> &'static str;

    /// Whether a commit writes a batch's data and its checkpoint in one atomic
    /// step. Elasticsearch cannot: its documents carry what each partition
    /// applied, which the fold reads before a batch to skip it.
    fn commits_atomically(&self) -> bool {
        true
    }

    async fn meta(&self, projection: &str) -> StoreResult<Meta>;

    /// Replaces the projection's meta record in one atomic write.
    async fn put_meta(&self, projection: &str, meta: &Meta) -> StoreResult<()>;

    /// A session for the worker of one partition (Redis: its own connection,
    /// since WATCH state belongs to a connection). Creates the generation's storage
    /// (an Elasticsearch index) when it does not exist yet.
    async fn session(&self, generation: &GenRef, partition: u32) -> StoreResult<Box<dyn Session>>;

    /// Every partition's checkpoint (`None`: never written), for status.
    async fn checkpoints(
        &self,
        generation: &GenRef,
        partitions: u32,
    ) -> StoreResult<Vec<Option<u64>>>;

    /// The read model of `key`, rendered with `schema`; `None` when nothing was
    /// ever written for it (or it was deleted). Read in one atomic step.
    async fn view(
        &self,
        generation: &GenRef,
        schema: &Schema,
        key: &str,
    ) -> StoreResult<Option<Map<String, Value>>>;

    /// How many dead letters the generation has, and the newest few (newest first).
    async fn dead_letters(
        &self,
        generation: &GenRef,
        limit: usize,
    ) -> StoreResult<(u64, Vec<DeadLetter>)>;

    /// Removes everything of a generation.
    async fn drop_generation(&self, generation: &GenRef) -> StoreResult<()>;

    /// The generations of a projection that hold a checkpoint (every commit writes
    /// one), to find those a crash left behind.
    async fn generations(&self, projection: &str) -> StoreResult<BTreeSet<u64>>;
}

/// The key-value port: Redis's semantics.
#[async_trait]
pub trait KvStore: Store {
    /// The top `limit` members of a ranking, highest score first (ties: member
    /// descending, as Redis's ZREVRANGE).
    async fn ranking(
        &self,
        generation: &GenRef,
        name: &str,
        limit: usize,
    ) -> StoreResult<Vec<(String, f64)>>;
}

/// One partition's worker's access to one generation.
#[async_trait]
pub trait Session: Send {
    /// The partition's checkpoint: the next offset to read, `None` if never written.
    async fn checkpoint(&mut self) -> StoreResult<Option<u64>>;

    /// The stored values of `fields` (set or counter fields) of `keys`. Document
    /// stores return every field of each document, and the offset this session's
    /// partition applied it up to; the engine reads every key a batch touches
    /// before it commits there ([`keys_to_read`](super::fold::keys_to_read)).
    async fn read_fields(
        &mut self,
        keys: &BTreeSet<String>,
        fields: &[String],
    ) -> StoreResult<DocReads>;

    /// Applies `effects` and sets the checkpoint to `next` if the checkpoint is
    /// still `expected`; otherwise applies nothing. Key-value stores do both in
    /// one atomic step; document stores write the documents (stamped with `next`
    /// for this partition) and then the checkpoint, so re-applying is harmless.
    /// The effects are shared, not copied, into an adapter's blocking work.
    async fn commit(
        &mut self,
        expected: Option<u64>,
        next: u64,
        effects: &Arc<Effects>,
        schema: &Schema,
    ) -> StoreResult<Commit>;
}

/// Fills in what an existing key shows for fields never written: counters and
/// distinct counts read 0, sets and lists read `[]`.
pub fn with_defaults(schema: &Schema, mut doc: Map<String, Value>) -> Map<String, Value> {
    for (field, kind) in schema {
        if doc.contains_key(field) {
            continue;
        }
        let default = match kind {
            FieldKind::Counter | FieldKind::Distinct => Value::from(0),
            FieldKind::Set | FieldKind::List => Value::Array(Vec::new()),
            FieldKind::Value => continue,
        };
        doc.insert(field.clone(), default);
    }
    doc
}

/// Parses a stored JSON member or value; text that is not JSON is kept as a string.
pub fn parse_json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.to_owned()))
}
