//! The Elasticsearch adapter of the document read-model port.
//!
//! Indices, with `{ns}` the namespace (the configured topic prefix, lowercased),
//! `{p}` the projection and `{g}` the generation number:
//!
//! | index                   | holds                                                         |
//! |-------------------------|---------------------------------------------------------------|
//! | `{ns}{p}-g{g}`          | the generation's documents, id = key, mapped from its spec    |
//! | `{ns}{p}-g{g}-state`    | checkpoints `ckpt-{partition}` (`next`, `dead_count`, `dead_max`) and dead letters `dead-{partition}-{offset}` |
//! | `{ns}refold-meta`       | one document per projection: its [`Meta`]                     |
//! | alias `{ns}{p}`         | names the live generation's index, for readers outside refold |
//!
//! Projection names are lowercase identifiers (no `-`), so `{ns}{p}-g*` matches the
//! indices of one projection only. refold itself always queries the concrete
//! generation index; [`Store::put_meta`] moves the alias with the meta record (I7).
//!
//! A commit cannot be atomic here (I6), so it is ordered and conditional:
//! 1. read the partition's checkpoint; not the expected one: fenced, nothing written;
//! 2. one `_bulk` of the new documents (built with [`apply_delta`] from what
//!    [`Session::read_fields`] returned), each conditional on the `_seq_no` /
//!    `_primary_term` it was read with (`create` for new ones), refreshed so that
//!    searches see it. A 409 means another partition's worker changed the document
//!    since: [`Commit::Conflict`], the engine reads and folds again, and what is
//!    already written is skipped thanks to the applied offsets the documents carry;
//! 3. the dead letters newer than the highest offset the partition's checkpoint
//!    counted (a batch folded again records nothing twice; ids derived from
//!    partition and offset make a repeated write a 409);
//! 4. the checkpoint, with the partition's dead-letter count and highest offset,
//!    conditional on the `_seq_no` it was read with; a 409 there means another
//!    worker moved it: fenced. Dead letters older than the newest
//!    [`DEAD_LETTERS_KEPT`] are then deleted; the counts still cover them.
//!
//! The checkpoint is never written before the data it covers, and writing the data
//! again changes nothing. Requests time out after [`REQUEST_TIMEOUT`]; 429s, 5xxs,
//! connection errors and timeouts are retried with exponential backoff and jitter
//! (a `_bulk` retries only its failed items) for a bounded time, after which the
//! store is [`StoreError::Unavailable`].
//!
//! Search: a bool query (`multi_match` over the text fields, `term` and `range`
//! filters), sorted as [`Sort`] says with the key (`refold_key`, a keyword: `_id`
//! cannot be sorted on) last. Key and field orders page with `search_after`;
//! relevance pages by position (see `search_body`). Only APIs that Elasticsearch 8 and
//! OpenSearch 2 share are used (no scripts: documents are read, changed and
//! written back).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use async_trait::async_trait;
use elasticsearch::Elasticsearch;
use elasticsearch::auth::Credentials;
use elasticsearch::cert::{Certificate, CertificateValidation};
use elasticsearch::http::headers::{CONTENT_TYPE, HeaderMap, HeaderValue};
use elasticsearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use elasticsearch::http::{Method, Url};
use serde_json::{Map, Value, json};

use super::doc::{
    DocStore, FieldType, Hit, IndexSpec, KEY_FIELD, Order, Page, Search, Sort, Specs, apply_delta,
    render, user_fields,
};
use super::{
    Commit, DEAD_LETTERS_KEPT, GenRef, Meta, Schema, Session, Store, StoreError, StoreResult,
};
use crate::config::EsAuth;
use crate::projection::fold::{DeadLetter, DocReads, Effects};

/// How long one request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a commit keeps retrying what fails transiently before it gives up.
pub const WRITE_RETRY_BUDGET: Duration = Duration::from_secs(60);
/// The same for reads (view, search, status): callers are waiting.
const READ_RETRY_BUDGET: Duration = Duration::from_secs(5);
/// How long [`ElasticStore::connect`] waits for the server to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Ids per `_mget`.
const MGET_CHUNK: usize = 1000;
/// Elasticsearch's default `index.max_result_window`: `from + size` at most.
const MAX_RESULT_WINDOW: usize = 10_000;
/// Old dead letters removed per commit at most.
const PRUNE_CHUNK: usize = 1000;
/// Checkpoint documents (one per partition) read at most for the dead-letter count.
const MAX_PARTITIONS: usize = 10_000;

/// The Elasticsearch (or OpenSearch) document store.
#[derive(Clone)]
pub struct ElasticStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Elasticsearch,
    /// The URL without credentials, for messages.
    shown: String,
    ns: String,
    specs: Specs,
    /// [`WRITE_RETRY_BUDGET`] unless set, in milliseconds.
    write_budget_ms: AtomicU64,
    meta_index_ready: AtomicBool,
    /// Microseconds since the epoch of the last dead letter recorded by this
    /// process: strictly increasing, so that newest-first is well defined.
    clock: AtomicU64,
}

impl ElasticStore {
    /// Connects and asks the server who it is, so that a wrong URL fails at start.
    /// `namespace` (the topic prefix, e.g. `refold.`) starts every index name.
    pub async fn connect(url: &str, namespace: &str, specs: Specs) -> anyhow::Result<Self> {
        Self::connect_with(url, &EsAuth::default(), namespace, specs).await
    }

    /// [`ElasticStore::connect`] with credentials (basic or API key) and, for
    /// `https://`, the CA to trust.
    pub async fn connect_with(
        url: &str,
        auth: &EsAuth,
        namespace: &str,
        specs: Specs,
    ) -> anyhow::Result<Self> {
        let shown = crate::config::redact_url(url);
        let parsed =
            Url::parse(url).with_context(|| format!("invalid Elasticsearch URL `{shown}`"))?;
        let mut builder = TransportBuilder::new(SingleNodeConnectionPool::new(parsed));
        match (&auth.username, &auth.password, &auth.api_key) {
            (Some(user), Some(password), _) => {
                builder = builder.auth(Credentials::Basic(user.clone(), password.0.clone()));
            }
            (_, _, Some(key)) => builder = builder.auth(Credentials::EncodedApiKey(key.0.clone())),
            _ => {}
        }
        if let Some(ca) = &auth.ca_cert {
            let pem = std::fs::read(ca)
                .with_context(|| format!("cannot read elasticsearch_ca_cert {}", ca.display()))?;
            let cert = Certificate::from_pem(&pem).with_context(|| {
                format!(
                    "elasticsearch_ca_cert {} holds no PEM certificate",
                    ca.display()
                )
            })?;
            builder = builder.cert_validation(CertificateValidation::Full(cert));
        }
        let transport = builder
            .build()
            .with_context(|| format!("cannot set up a client for Elasticsearch at `{shown}`"))?;
        let client = Elasticsearch::new(transport);
        let answer = client
            .send(
                Method::Get,
                "/",
                HeaderMap::new(),
                None::<&()>,
                None::<&str>,
                Some(CONNECT_TIMEOUT),
            )
            .await
            .with_context(|| format!("cannot reach Elasticsearch at `{shown}`"))?;
        let status = answer.status_code();
        if !status.is_success() {
            let text = answer.text().await.unwrap_or_default();
            anyhow::bail!("Elasticsearch at `{shown}` answered {status}: {text}");
        }
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                shown,
                ns: namespace.to_lowercase(),
                specs,
                write_budget_ms: AtomicU64::new(WRITE_RETRY_BUDGET.as_millis() as u64),
                meta_index_ready: AtomicBool::new(false),
                clock: AtomicU64::new(0),
            }),
        })
    }

    /// How long commits retry transient failures ([`WRITE_RETRY_BUDGET`] unless
    /// set; tests shorten it). Clones share it: this sets it for all of them.
    pub fn with_retry_budget(self, budget: Duration) -> Self {
        let ms = u64::try_from(budget.as_millis()).unwrap_or(u64::MAX);
        self.inner.write_budget_ms.store(ms, Ordering::Relaxed);
        self
    }
}

// ---- names ---------------------------------------------------------------------

impl Inner {
    fn data_index(&self, g: &GenRef) -> String {
        format!("{}{}-g{}", self.ns, g.projection, g.generation)
    }

    fn state_index(&self, g: &GenRef) -> String {
        format!("{}-state", self.data_index(g))
    }

    fn meta_index(&self) -> String {
        format!("{}refold-meta", self.ns)
    }

    fn alias(&self, projection: &str) -> String {
        format!("{}{projection}", self.ns)
    }

    fn spec(&self, projection: &str) -> IndexSpec {
        self.specs.get(projection).cloned().unwrap_or_default()
    }

    fn read_deadline(&self) -> Instant {
        Instant::now() + READ_RETRY_BUDGET
    }

    fn write_deadline(&self) -> Instant {
        Instant::now() + Duration::from_millis(self.write_budget_ms.load(Ordering::Relaxed))
    }

    /// A strictly increasing timestamp (µs) for dead letters.
    fn stamp(&self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let mut prev = self.clock.load(Ordering::Relaxed);
        loop {
            let next = now.max(prev + 1);
            match self
                .clock
                .compare_exchange(prev, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(p) => prev = p,
            }
        }
    }
}

fn ckpt_id(partition: u32) -> String {
    format!("ckpt-{partition}")
}

fn dead_id(partition: u32, offset: u64) -> String {
    format!("dead-{partition}-{offset}")
}

fn state_mappings() -> Value {
    json!({
        "dynamic": false,
        "properties": {
            "kind": {"type": "keyword"},
            "next": {"type": "long"},
            "at": {"type": "long"},
            "partition": {"type": "long"},
            "offset": {"type": "long"},
            "letter": {"type": "object", "enabled": false}
        }
    })
}

// ---- HTTP with retries ---------------------------------------------------------

enum Body {
    Json(Value),
    NdJson(String),
}

struct Reply {
    status: u16,
    body: Value,
    /// How many times the request was sent (more than 1: an earlier attempt may
    /// have been applied although its answer was lost).
    attempts: u32,
}

impl Reply {
    fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The server's reason, for messages.
    fn reason(&self) -> String {
        reason_of(&self.body)
    }

    fn error_type(&self) -> Option<&str> {
        self.body.get("error")?.get("type")?.as_str()
    }
}

fn reason_of(body: &Value) -> String {
    let err = body.get("error").unwrap_or(body);
    match (
        err.get("type").and_then(Value::as_str),
        err.get("reason").and_then(Value::as_str),
    ) {
        (Some(t), Some(r)) => format!("{t}: {r}"),
        (None, Some(r)) => r.to_owned(),
        _ => match err {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        },
    }
}

fn retryable(status: u16) -> bool {
    status == 429 || (500..600).contains(&status)
}

/// Exponential backoff with jitter, bounded by a deadline.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self {
            next: FIRST_BACKOFF,
        }
    }

    /// Sleeps before the next attempt; `false` when the deadline would pass first.
    async fn wait(&mut self, deadline: Instant) -> bool {
        // Half fixed, half random: retries of many workers spread out.
        let half = self.next / 2;
        let delay = half + half.mul_f64(jitter());
        self.next = (self.next * 2).min(MAX_BACKOFF);
        if Instant::now() + delay >= deadline {
            return false;
        }
        tokio::time::sleep(delay).await;
        true
    }
}

/// A number in [0, 1).
fn jitter() -> f64 {
    (uuid::Uuid::new_v4().as_u64_pair().0 >> 11) as f64 / (1u64 << 53) as f64
}

impl Inner {
    /// Sends a request until it gets an answer that is not a 429 or a 5xx, or the
    /// deadline passes ([`StoreError::Unavailable`]). Other statuses are for the
    /// caller to judge.
    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Body>,
        deadline: Instant,
    ) -> StoreResult<Reply> {
        let mut backoff = Backoff::new();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let failure = match self.send_once(method, path, query, body).await {
                Ok((status, body)) if !retryable(status) => {
                    return Ok(Reply {
                        status,
                        body,
                        attempts,
                    });
                }
                Ok((status, body)) => format!("answered {status}: {}", reason_of(&body)),
                Err(e) => e,
            };
            if !backoff.wait(deadline).await {
                return Err(StoreError::Unavailable(format!(
                    "Elasticsearch at `{}`: {} {path} failed {attempts} times, last: {failure}",
                    self.shown,
                    method_name(method)
                )));
            }
        }
    }

    async fn send_once(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Body>,
    ) -> Result<(u16, Value), String> {
        let mut headers = HeaderMap::new();
        let text = match body {
            None => None,
            Some(Body::Json(v)) => Some(v.to_string()),
            Some(Body::NdJson(s)) => {
                headers.insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/x-ndjson"),
                );
                Some(s.clone())
            }
        };
        let query = (!query.is_empty()).then_some(query);
        let response = self
            .client
            .send(method, path, headers, query, text, Some(REQUEST_TIMEOUT))
            .await
            .map_err(|e| describe(&e))?;
        let status = response.status_code().as_u16();
        let bytes = response.bytes().await.map_err(|e| describe(&e))?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok((status, body))
    }

    /// A reply that must be a success, else [`StoreError::Other`] naming `what`.
    fn expect_ok(&self, reply: Reply, what: &str) -> StoreResult<Value> {
        if reply.ok() {
            Ok(reply.body)
        } else {
            Err(StoreError::Other(format!(
                "Elasticsearch refused to {what} ({}): {}",
                reply.status,
                reply.reason()
            )))
        }
    }

    /// Creates an index unless it exists.
    async fn ensure_index(
        &self,
        name: &str,
        mappings: Value,
        settings: &Map<String, Value>,
    ) -> StoreResult<()> {
        let mut body = json!({ "mappings": mappings });
        if !settings.is_empty() {
            body["settings"] = Value::Object(settings.clone());
        }
        let reply = self
            .call(
                Method::Put,
                name,
                &[],
                Some(&Body::Json(body)),
                self.write_deadline(),
            )
            .await?;
        if reply.ok() || reply.error_type() == Some("resource_already_exists_exception") {
            return Ok(());
        }
        Err(StoreError::Other(format!(
            "cannot create index `{name}` ({}): {}",
            reply.status,
            reply.reason()
        )))
    }

    async fn ensure_generation(&self, g: &GenRef) -> StoreResult<()> {
        let spec = self.spec(&g.projection);
        self.ensure_index(&self.data_index(g), spec.es_mappings(), &spec.settings)
            .await?;
        self.ensure_index(&self.state_index(g), state_mappings(), &Map::new())
            .await
    }

    async fn ensure_meta_index(&self) -> StoreResult<()> {
        if self.meta_index_ready.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mappings = json!({"dynamic": false, "properties": {}});
        self.ensure_index(&self.meta_index(), mappings, &Map::new())
            .await?;
        self.meta_index_ready.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The stored documents of `ids` (in order); a missing index holds none.
    async fn mget(
        &self,
        index: &str,
        ids: &[String],
        deadline: Instant,
    ) -> StoreResult<Vec<Option<Stored>>> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(MGET_CHUNK) {
            let reply = self
                .call(
                    Method::Post,
                    &format!("{index}/_mget"),
                    &[],
                    Some(&Body::Json(json!({ "ids": chunk }))),
                    deadline,
                )
                .await?;
            if reply.status == 404 {
                out.extend(chunk.iter().map(|_| None));
                continue;
            }
            let body = self.expect_ok(reply, &format!("read documents of `{index}`"))?;
            let docs = body
                .get("docs")
                .and_then(Value::as_array)
                .filter(|d| d.len() == chunk.len())
                .ok_or_else(|| {
                    StoreError::Other(format!("malformed _mget answer from `{index}`: {body}"))
                })?;
            for (id, d) in chunk.iter().zip(docs) {
                out.push(Stored::from_hit(index, id, d)?);
            }
        }
        Ok(out)
    }

    /// Writes `items` to `index` in one `_bulk` (refreshed), then again only those
    /// that failed with a 429 or a 5xx, until all are settled or the deadline passes.
    async fn bulk(
        &self,
        index: &str,
        items: &[Item],
        deadline: Instant,
    ) -> StoreResult<Vec<Outcome>> {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; items.len()];
        let mut pending: Vec<usize> = (0..items.len()).collect();
        let mut backoff = Backoff::new();
        let path = format!("{index}/_bulk");
        let query = [("refresh", "true".to_string())];
        while !pending.is_empty() {
            let mut body = String::new();
            for &i in &pending {
                items[i].write(&mut body);
            }
            let reply = self
                .call(
                    Method::Post,
                    &path,
                    &query,
                    Some(&Body::NdJson(body)),
                    deadline,
                )
                .await?;
            let answer = self.expect_ok(reply, &format!("take a bulk write to `{index}`"))?;
            let answered = answer
                .get("items")
                .and_then(Value::as_array)
                .filter(|a| a.len() == pending.len())
                .ok_or_else(|| {
                    StoreError::Other(format!("malformed _bulk answer from `{index}`: {answer}"))
                })?;
            let mut again = Vec::new();
            let mut last = String::new();
            for (&i, item) in pending.iter().zip(answered) {
                let result = item
                    .as_object()
                    .and_then(|o| o.values().next())
                    .unwrap_or(&Value::Null);
                let status = result.get("status").and_then(Value::as_u64).unwrap_or(0) as u16;
                let outcome = match status {
                    200..=299 => Outcome::Done,
                    404 => Outcome::Missing,
                    409 => Outcome::Conflict,
                    s if retryable(s) => {
                        last = format!("{s}: {}", reason_of(result));
                        again.push(i);
                        continue;
                    }
                    s => Outcome::Failed(format!("{s}: {}", reason_of(result))),
                };
                outcomes[i] = Some(outcome);
            }
            if !again.is_empty() && !backoff.wait(deadline).await {
                return Err(StoreError::Unavailable(format!(
                    "Elasticsearch at `{}`: {} of {} writes to `{index}` still failing, last: {last}",
                    self.shown,
                    again.len(),
                    items.len()
                )));
            }
            pending = again;
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.expect("every item settled"))
            .collect())
    }

    async fn delete_index(&self, name: &str) -> StoreResult<()> {
        let reply = self
            .call(Method::Delete, name, &[], None, self.write_deadline())
            .await?;
        if reply.status == 404 {
            return Ok(());
        }
        self.expect_ok(reply, &format!("delete index `{name}`"))
            .map(drop)
    }

    /// Points the projection's alias at `target` only (or at nothing).
    async fn point_alias(&self, projection: &str, target: Option<&str>) -> StoreResult<()> {
        let alias = self.alias(projection);
        let reply = self
            .call(
                Method::Get,
                &format!("_alias/{alias}"),
                &[],
                None,
                self.write_deadline(),
            )
            .await?;
        let holders: Vec<String> = if reply.status == 404 {
            Vec::new()
        } else {
            let body = self.expect_ok(reply, &format!("read alias `{alias}`"))?;
            body.as_object()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default()
        };
        let mut actions: Vec<Value> = holders
            .iter()
            .filter(|h| Some(h.as_str()) != target)
            .map(|h| json!({"remove": {"index": h, "alias": alias}}))
            .collect();
        if let Some(t) = target.filter(|t| !holders.iter().any(|h| h == t)) {
            actions.push(json!({"add": {"index": t, "alias": alias}}));
        }
        if actions.is_empty() {
            return Ok(());
        }
        let reply = self
            .call(
                Method::Post,
                "_aliases",
                &[],
                Some(&Body::Json(json!({ "actions": actions }))),
                self.write_deadline(),
            )
            .await?;
        self.expect_ok(reply, &format!("point alias `{alias}` at {target:?}"))
            .map(drop)
    }

    /// Documents of one kind in a state index (dead letters newest first); `None`
    /// when the index does not exist.
    async fn search_state(
        &self,
        index: &str,
        kind: &str,
        size: usize,
        from: usize,
        deadline: Instant,
    ) -> StoreResult<Option<Value>> {
        let reply = self
            .call(
                Method::Post,
                &format!("{index}/_search"),
                &[],
                Some(&Body::Json(json!({
                    "query": {"term": {"kind": kind}},
                    "from": from,
                    "size": size,
                    "sort": [{"at": "desc"}, {"partition": "desc"}, {"offset": "desc"}],
                }))),
                deadline,
            )
            .await?;
        if reply.status == 404 {
            return Ok(None);
        }
        self.expect_ok(reply, &format!("search `{index}`"))
            .map(Some)
    }

    /// Deletes the dead letters older than the newest [`DEAD_LETTERS_KEPT`] (the
    /// count, kept with the checkpoints, still covers them).
    async fn prune_dead_letters(&self, index: &str, deadline: Instant) -> StoreResult<()> {
        let Some(body) = self
            .search_state(index, "dead", PRUNE_CHUNK, DEAD_LETTERS_KEPT, deadline)
            .await?
        else {
            return Ok(());
        };
        let items: Vec<Item> = hits(&body)
            .iter()
            .filter_map(|h| h.get("_id")?.as_str())
            .map(|id| Item {
                op: Op::Delete,
                id: id.to_owned(),
                if_version: None,
                source: None,
            })
            .collect();
        if items.is_empty() {
            return Ok(());
        }
        for (item, outcome) in items.iter().zip(self.bulk(index, &items, deadline).await?) {
            if let Outcome::Failed(reason) = outcome {
                return Err(StoreError::Other(format!(
                    "cannot remove old dead letter `{}` of `{index}`: {reason}",
                    item.id
                )));
            }
        }
        Ok(())
    }

    async fn read_checkpoint(
        &self,
        g: &GenRef,
        partition: u32,
        deadline: Instant,
    ) -> StoreResult<Option<Stored>> {
        let got = self
            .mget(&self.state_index(g), &[ckpt_id(partition)], deadline)
            .await?;
        Ok(got.into_iter().next().flatten())
    }
}

fn method_name(m: Method) -> &'static str {
    match m {
        Method::Get => "GET",
        Method::Put => "PUT",
        Method::Post => "POST",
        Method::Delete => "DELETE",
        Method::Head => "HEAD",
    }
}

fn describe(e: &elasticsearch::Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    if e.is_timeout() {
        msg.push_str(" (timed out)");
    }
    msg
}

/// `url` without the password, for messages.
/// A stored document and the version it was read at.
#[derive(Debug, Clone)]
struct Stored {
    doc: Map<String, Value>,
    seq_no: u64,
    primary_term: u64,
}

impl Stored {
    /// One entry of an `_mget` answer.
    fn from_hit(index: &str, id: &str, d: &Value) -> StoreResult<Option<Self>> {
        if let Some(err) = d.get("error") {
            if err.get("type").and_then(Value::as_str) == Some("index_not_found_exception") {
                return Ok(None);
            }
            return Err(StoreError::Other(format!(
                "cannot read `{id}` of `{index}`: {}",
                reason_of(d)
            )));
        }
        if d.get("found").and_then(Value::as_bool) != Some(true) {
            return Ok(None);
        }
        let doc = d.get("_source").and_then(Value::as_object).cloned();
        let seq_no = d.get("_seq_no").and_then(Value::as_u64);
        let primary_term = d.get("_primary_term").and_then(Value::as_u64);
        match (doc, seq_no, primary_term) {
            (Some(doc), Some(seq_no), Some(primary_term)) => Ok(Some(Self {
                doc,
                seq_no,
                primary_term,
            })),
            _ => Err(StoreError::Other(format!(
                "`{id}` of `{index}` came back without its source or _seq_no: {d}"
            ))),
        }
    }

    /// The dead letters a checkpoint document has counted, and the highest offset
    /// among them.
    fn dead(&self) -> (u64, Option<u64>) {
        let count = self.doc.get("dead_count").and_then(Value::as_u64);
        let max = self.doc.get("dead_max").and_then(Value::as_u64);
        (count.unwrap_or(0), max)
    }

    fn next(&self, what: &str) -> StoreResult<u64> {
        self.doc.get("next").and_then(Value::as_u64).ok_or_else(|| {
            StoreError::Other(format!("bad checkpoint document {what}: {:?}", self.doc))
        })
    }
}

/// One action of a `_bulk`.
struct Item {
    op: Op,
    id: String,
    /// Only if the document is still at this `_seq_no` / `_primary_term`.
    if_version: Option<(u64, u64)>,
    source: Option<Value>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Index,
    Create,
    Delete,
}

impl Item {
    fn write(&self, out: &mut String) {
        let mut meta = json!({ "_id": self.id });
        if let Some((seq_no, term)) = self.if_version {
            meta["if_seq_no"] = seq_no.into();
            meta["if_primary_term"] = term.into();
        }
        let name = match self.op {
            Op::Index => "index",
            Op::Create => "create",
            Op::Delete => "delete",
        };
        out.push_str(&json!({ name: meta }).to_string());
        out.push('\n');
        if let Some(source) = &self.source {
            out.push_str(&source.to_string());
            out.push('\n');
        }
    }
}

/// How one bulk item ended.
#[derive(Debug, Clone)]
enum Outcome {
    Done,
    /// 404 (a delete of a missing document).
    Missing,
    /// 409: the condition did not hold.
    Conflict,
    Failed(String),
}

// ---- the port ------------------------------------------------------------------

#[async_trait]
impl Store for ElasticStore {
    fn backend(&self) -> &'static str {
        "elasticsearch"
    }

    fn commits_atomically(&self) -> bool {
        false
    }

    async fn meta(&self, projection: &str) -> StoreResult<Meta> {
        let s = &self.inner;
        let got = s
            .mget(&s.meta_index(), &[projection.to_owned()], s.read_deadline())
            .await?;
        match got.into_iter().next().flatten() {
            None => Ok(Meta::default()),
            Some(stored) => serde_json::from_value(Value::Object(stored.doc)).map_err(|e| {
                StoreError::Other(format!("bad meta record of projection `{projection}`: {e}"))
            }),
        }
    }

    async fn put_meta(&self, projection: &str, meta: &Meta) -> StoreResult<()> {
        let s = &self.inner;
        s.ensure_meta_index().await?;
        let body = serde_json::to_value(meta).map_err(|e| StoreError::Other(e.to_string()))?;
        let reply = s
            .call(
                Method::Put,
                &format!("{}/_doc/{projection}", s.meta_index()),
                &[],
                Some(&Body::Json(body)),
                s.write_deadline(),
            )
            .await?;
        s.expect_ok(reply, &format!("write the meta record of `{projection}`"))?;
        let target = match &meta.live {
            Some(live) => {
                let g = GenRef {
                    projection: projection.to_owned(),
                    generation: live.generation,
                };
                // An alias needs an index to name.
                s.ensure_generation(&g).await?;
                Some(s.data_index(&g))
            }
            None => None,
        };
        s.point_alias(projection, target.as_deref()).await
    }

    async fn session(&self, generation: &GenRef, partition: u32) -> StoreResult<Box<dyn Session>> {
        self.inner.ensure_generation(generation).await?;
        Ok(Box::new(ElasticSession {
            store: self.inner.clone(),
            generation: generation.clone(),
            partition,
            read: HashMap::new(),
        }))
    }

    async fn checkpoints(
        &self,
        generation: &GenRef,
        partitions: u32,
    ) -> StoreResult<Vec<Option<u64>>> {
        let s = &self.inner;
        let ids: Vec<String> = (0..partitions).map(ckpt_id).collect();
        let got = s
            .mget(&s.state_index(generation), &ids, s.read_deadline())
            .await?;
        got.iter()
            .map(|c| {
                c.as_ref()
                    .map(|c| c.next(&generation.to_string()))
                    .transpose()
            })
            .collect()
    }

    async fn view(
        &self,
        generation: &GenRef,
        schema: &Schema,
        key: &str,
    ) -> StoreResult<Option<Map<String, Value>>> {
        let s = &self.inner;
        let got = s
            .mget(
                &s.data_index(generation),
                &[key.to_owned()],
                s.read_deadline(),
            )
            .await?;
        Ok(got
            .into_iter()
            .next()
            .flatten()
            .map(|stored| render(schema, stored.doc)))
    }

    async fn dead_letters(
        &self,
        generation: &GenRef,
        limit: usize,
    ) -> StoreResult<(u64, Vec<DeadLetter>)> {
        let s = &self.inner;
        let index = s.state_index(generation);
        let deadline = s.read_deadline();
        // The count is kept with each partition's checkpoint.
        let Some(ckpts) = s
            .search_state(&index, "ckpt", MAX_PARTITIONS, 0, deadline)
            .await?
        else {
            return Ok((0, Vec::new()));
        };
        let count = hits(&ckpts)
            .iter()
            .filter_map(|h| h.pointer("/_source/dead_count")?.as_u64())
            .sum();
        let limit = limit.min(DEAD_LETTERS_KEPT);
        if limit == 0 {
            return Ok((count, Vec::new()));
        }
        let Some(body) = s.search_state(&index, "dead", limit, 0, deadline).await? else {
            return Ok((0, Vec::new()));
        };
        let letters = hits(&body)
            .iter()
            .filter_map(|h| h.get("_source")?.get("letter").cloned())
            .filter_map(|l| serde_json::from_value(l).ok())
            .collect();
        Ok((count, letters))
    }

    async fn drop_generation(&self, generation: &GenRef) -> StoreResult<()> {
        let s = &self.inner;
        s.delete_index(&s.data_index(generation)).await?;
        s.delete_index(&s.state_index(generation)).await
    }

    async fn generations(&self, projection: &str) -> StoreResult<BTreeSet<u64>> {
        let s = &self.inner;
        let prefix = format!("{}{projection}-g", s.ns);
        let reply = s
            .call(
                Method::Get,
                &format!("_cat/indices/{prefix}*"),
                &[("format", "json".to_string())],
                None,
                s.read_deadline(),
            )
            .await?;
        if reply.status == 404 {
            return Ok(BTreeSet::new());
        }
        let body = s.expect_ok(reply, &format!("list the indices of `{projection}`"))?;
        Ok(body
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|row| row.get("index")?.as_str())
            .filter_map(|name| {
                let rest = name.strip_prefix(&prefix)?;
                let digits = rest.strip_suffix("-state").unwrap_or(rest);
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                digits.parse().ok()
            })
            .collect())
    }
}

fn hits(body: &Value) -> &[Value] {
    body.pointer("/hits/hits")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn total_hits(body: &Value) -> StoreResult<u64> {
    let total = body.pointer("/hits/total");
    total
        .and_then(|t| t.get("value").or(Some(t)))
        .and_then(Value::as_u64)
        .ok_or_else(|| StoreError::Other(format!("search answer without a total: {body}")))
}

#[async_trait]
impl DocStore for ElasticStore {
    async fn search(&self, generation: &GenRef, search: &Search) -> StoreResult<Page> {
        let s = &self.inner;
        let spec = s.spec(&generation.projection);
        let (body, from) = search_body(&spec, search)?;
        let index = s.data_index(generation);
        let reply = s
            .call(
                Method::Post,
                &format!("{index}/_search"),
                &[],
                Some(&Body::Json(body)),
                s.read_deadline(),
            )
            .await?;
        if reply.status == 404 {
            return Ok(Page {
                total: 0,
                hits: Vec::new(),
            });
        }
        let body = s.expect_ok(reply, &format!("search `{index}`"))?;
        let total = total_hits(&body)?;
        let relevance = search.sort == Sort::Relevance;
        let hits = hits(&body)
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let doc = h
                    .get("_source")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                let key = doc
                    .get(KEY_FIELD)
                    .and_then(Value::as_str)
                    .or_else(|| h.get("_id").and_then(Value::as_str))
                    .unwrap_or_default()
                    .to_owned();
                Hit {
                    key,
                    score: if relevance {
                        h.get("_score").and_then(Value::as_f64)
                    } else {
                        None
                    },
                    doc: user_fields(doc),
                    sort: {
                        let mut sort = h
                            .get("sort")
                            .and_then(Value::as_array)
                            .cloned()
                            .unwrap_or_default();
                        if relevance {
                            sort.push(Value::from(from + i + 1));
                        }
                        sort
                    },
                }
            })
            .collect();
        Ok(Page { total, hits })
    }
}

/// The query DSL of a validated search, and the position of its first hit. Field
/// names must be declared in the index's spec; the user's text only goes into
/// `multi_match.query`, term and range values, and `search_after` (scalars only).
///
/// Relevance pages go by position (`from`): their cursor is `[score, key, hits so
/// far]`. Keyset paging on `_score` needs the score to round-trip exactly through
/// JSON, and osmem-server's does not (it compares unrounded scores with the
/// rounded ones it printed, so pages repeat or skip ties). Scores move with every
/// write anyway, so a relevance order is not stable across pages on any server.
fn search_body(spec: &IndexSpec, search: &Search) -> StoreResult<(Value, usize)> {
    let exact = |field: &str| -> StoreResult<FieldType> {
        match spec.fields.get(field) {
            Some(t) if *t != FieldType::Text => Ok(*t),
            _ => Err(StoreError::Other(format!(
                "`{field}` is not a keyword, numeric or boolean field of this index"
            ))),
        }
    };
    let mut must = Vec::new();
    if let Some(text) = &search.text {
        let fields = spec.text_fields();
        if fields.is_empty() {
            must.push(json!({"match_none": {}}));
        } else {
            must.push(json!({"multi_match": {"query": text, "fields": fields}}));
        }
    }
    let mut filter = Vec::new();
    for (field, value) in &search.filters {
        exact(field)?;
        if !is_scalar(value) {
            return Err(StoreError::Other(format!(
                "filter on `{field}` is not a single value"
            )));
        }
        filter.push(json!({"term": {field.as_str(): value}}));
    }
    if let Some((field, min)) = &search.at_least {
        exact(field)?;
        filter.push(json!({"range": {field.as_str(): {"gte": min}}}));
    }
    let key_asc = json!({KEY_FIELD: {"order": "asc"}});
    let sort = match &search.sort {
        Sort::Relevance => vec![json!({"_score": {"order": "desc"}}), key_asc],
        Sort::Key => vec![key_asc],
        Sort::Field(field, order) => {
            let t = exact(field)?;
            let order = match order {
                Order::Asc => "asc",
                Order::Desc => "desc",
            };
            vec![
                json!({field.as_str(): {"order": order, "missing": "_last", "unmapped_type": t.as_str()}}),
                key_asc,
            ]
        }
    };
    let sort_len = sort.len();
    let mut body = json!({
        "query": {"bool": {"must": must, "filter": filter}},
        "sort": sort,
        "size": search.limit,
        "track_total_hits": true,
    });
    let foreign = || StoreError::Other("the cursor does not belong to this search's order".into());
    let mut from = 0;
    match &search.after {
        None => {}
        Some(after) if search.sort == Sort::Relevance => {
            from = match after.as_slice() {
                [_, _, n] => n.as_u64().ok_or_else(foreign)? as usize,
                _ => return Err(foreign()),
            };
            if from + search.limit > MAX_RESULT_WINDOW {
                return Err(StoreError::Other(format!(
                    "results by relevance page through the first {MAX_RESULT_WINDOW} only"
                )));
            }
            body["from"] = Value::from(from);
        }
        Some(after) => {
            if after.len() != sort_len || !after.iter().all(is_scalar) {
                return Err(foreign());
            }
            body["search_after"] = Value::Array(after.clone());
        }
    }
    Ok((body, from))
}

fn is_scalar(v: &Value) -> bool {
    !matches!(v, Value::Array(_) | Value::Object(_))
}

/// The worker of one partition of one generation.
struct ElasticSession {
    store: Arc<Inner>,
    generation: GenRef,
    partition: u32,
    /// What `read_fields` found since the last commit: the documents (`None`:
    /// absent) and the versions the commit's writes are conditional on.
    read: HashMap<String, Option<Stored>>,
}

#[async_trait]
impl Session for ElasticSession {
    async fn checkpoint(&mut self) -> StoreResult<Option<u64>> {
        let s = &self.store;
        s.read_checkpoint(&self.generation, self.partition, s.read_deadline())
            .await?
            .map(|c| c.next(&self.generation.to_string()))
            .transpose()
    }

    async fn read_fields(
        &mut self,
        keys: &BTreeSet<String>,
        _fields: &[String],
    ) -> StoreResult<DocReads> {
        let mut out = DocReads::new();
        let ids: Vec<String> = keys.iter().cloned().collect();
        let s = &self.store;
        let got = s
            .mget(&s.data_index(&self.generation), &ids, s.write_deadline())
            .await?;
        for (key, stored) in ids.into_iter().zip(got) {
            if let Some(st) = &stored {
                if let Some(a) = super::doc::applied_offset(&st.doc, self.partition) {
                    out.applied.insert(key.clone(), a);
                }
                out.fields.insert(
                    key.clone(),
                    user_fields(st.doc.clone()).into_iter().collect(),
                );
            }
            self.read.insert(key, stored);
        }
        Ok(out)
    }

    async fn commit(
        &mut self,
        expected: Option<u64>,
        next: u64,
        effects: &Arc<Effects>,
        _schema: &Schema,
    ) -> StoreResult<Commit> {
        let mut read = std::mem::take(&mut self.read);
        let s = self.store.clone();
        let g = &self.generation;
        let p = self.partition;
        let deadline = s.write_deadline();
        let (data, state) = (s.data_index(g), s.state_index(g));

        // 1. Fencing.
        let ckpt = s.read_checkpoint(g, p, deadline).await?;
        let found = ckpt.as_ref().map(|c| c.next(&g.to_string())).transpose()?;
        if found != expected {
            return Ok(Commit::Fenced { found });
        }

        // 2. The documents, conditional on what was read.
        let unread: Vec<String> = effects
            .docs
            .keys()
            .filter(|k| !read.contains_key(*k))
            .cloned()
            .collect();
        if !unread.is_empty() {
            let got = s.mget(&data, &unread, deadline).await?;
            read.extend(unread.into_iter().zip(got));
        }
        let mut items = Vec::new();
        for (key, delta) in &effects.docs {
            let current = read.remove(key).flatten();
            let version = current.as_ref().map(|c| (c.seq_no, c.primary_term));
            let new = apply_delta(key, current.map(|c| c.doc), delta, p, next)
                .map_err(|e| StoreError::Other(format!("{g}: cannot apply a batch: {e}")))?;
            let (op, source) = match (new, version) {
                (Some(doc), Some(_)) => (Op::Index, Some(Value::Object(doc))),
                (Some(doc), None) => (Op::Create, Some(Value::Object(doc))),
                (None, Some(_)) => (Op::Delete, None),
                (None, None) => continue,
            };
            items.push(Item {
                op,
                id: key.clone(),
                if_version: version,
                source,
            });
        }
        if !items.is_empty() {
            let outcomes = s.bulk(&data, &items, deadline).await?;
            let mut conflict = false;
            for (item, outcome) in items.iter().zip(outcomes) {
                match outcome {
                    Outcome::Done => {}
                    Outcome::Missing if item.op == Op::Delete => {}
                    Outcome::Conflict => conflict = true,
                    Outcome::Missing => {
                        return Err(StoreError::Other(format!(
                            "{g}: writing `{}` answered 404",
                            item.id
                        )));
                    }
                    Outcome::Failed(reason) => {
                        return Err(StoreError::Other(format!(
                            "{g}: cannot write `{}`: {reason}",
                            item.id
                        )));
                    }
                }
            }
            if conflict {
                return Ok(Commit::Conflict);
            }
        }

        // 3. Dead letters. A partition's arrive in offset order, so one at or below
        //    the highest offset its checkpoint counted is a repeat (a batch folded
        //    again); ids from (partition, offset) make a second write a 409.
        let (dead_count, dead_max) = ckpt.as_ref().map_or((0, None), Stored::dead);
        let letters: Vec<&DeadLetter> = effects
            .dead_letters
            .iter()
            .filter(|dl| dead_max.is_none_or(|m| dl.offset > m))
            .collect();
        if !letters.is_empty() {
            let items: Vec<Item> = letters
                .iter()
                .map(|dl| Item {
                    op: Op::Create,
                    id: dead_id(dl.partition, dl.offset),
                    if_version: None,
                    source: Some(json!({
                        "kind": "dead",
                        "at": s.stamp(),
                        "partition": dl.partition,
                        "offset": dl.offset,
                        "letter": dl,
                    })),
                })
                .collect();
            let outcomes = s.bulk(&state, &items, deadline).await?;
            for (item, outcome) in items.iter().zip(outcomes) {
                match outcome {
                    Outcome::Done | Outcome::Conflict => {}
                    Outcome::Missing | Outcome::Failed(_) => {
                        return Err(StoreError::Other(format!(
                            "{g}: cannot record dead letter `{}`: {outcome:?}",
                            item.id
                        )));
                    }
                }
            }
        }

        // 4. The checkpoint, after the data it covers, with the dead-letter count
        //    (refreshed then, for `dead_letters` finds the counts by search).
        let mut query = Vec::new();
        if !letters.is_empty() {
            query.push(("refresh", "true".to_string()));
        }
        match &ckpt {
            Some(c) => {
                query.push(("if_seq_no", c.seq_no.to_string()));
                query.push(("if_primary_term", c.primary_term.to_string()));
            }
            None => query.push(("op_type", "create".to_string())),
        }
        let reply = s
            .call(
                Method::Put,
                &format!("{state}/_doc/{}", ckpt_id(p)),
                &query,
                Some(&Body::Json(json!({
                    "kind": "ckpt",
                    "partition": p,
                    "next": next,
                    "dead_count": dead_count + letters.len() as u64,
                    "dead_max": letters.iter().map(|d| d.offset).max().or(dead_max),
                }))),
                deadline,
            )
            .await?;
        if reply.status == 409 {
            let found = s
                .read_checkpoint(g, p, deadline)
                .await?
                .map(|c| c.next(&g.to_string()))
                .transpose()?;
            // A retried write may have been applied the first time.
            if reply.attempts > 1 && found == Some(next) {
                return Ok(Commit::Applied);
            }
            return Ok(Commit::Fenced { found });
        }
        s.expect_ok(reply, &format!("write the checkpoint of {g} partition {p}"))?;
        if !letters.is_empty() {
            // Housekeeping: the commit is done whatever happens here.
            if let Err(e) = s.prune_dead_letters(&state, deadline).await {
                tracing::warn!(generation = %g, error = %e, "cannot remove old dead letters");
            }
        }
        Ok(Commit::Applied)
    }
}
