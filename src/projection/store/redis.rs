//! The Redis adapter of the key-value read-model port.
//!
//! Key layout, with `{ns}` the namespace (e.g. `refold.`), `{p}` the projection and
//! `{g}` the generation number:
//!
//! | key                              | type        | holds                                            |
//! |----------------------------------|-------------|--------------------------------------------------|
//! | `{ns}{p}:meta`                   | string      | the projection's [`Meta`] as JSON                |
//! | `{ns}{p}:{g}:ckpt:{partition}`   | string      | the next offset to read (integer)                |
//! | `{ns}{p}:{g}:doc:{key}`          | hash        | value fields as JSON text, counters as integers  |
//! | `{ns}{p}:{g}:set:{field}:{key}`  | set         | a set field's members, as JSON text              |
//! | `{ns}{p}:{g}:hll:{field}:{key}`  | HyperLogLog | a `count_distinct` field                         |
//! | `{ns}{p}:{g}:list:{field}:{key}` | list        | a capped list field, newest first, JSON text     |
//! | `{ns}{p}:{g}:rank:{ranking}`     | sorted set  | a ranking's members and scores                   |
//! | `{ns}{p}:{g}:dead`               | list        | dead letters as JSON, newest first, the last 100 |
//! | `{ns}{p}:{g}:dead_count`         | string      | how many dead letters there were in all          |
//!
//! Projection and field names are identifiers (no `:`), so a key belongs to exactly
//! one projection and generation, and `{ns}{p}:{g}:*` matches one generation only.
//!
//! A commit WATCHes the partition's checkpoint key, checks it, and applies the
//! batch and the new checkpoint in one MULTI/EXEC: the data and the checkpoint move
//! together or not at all (I6). Each [`Session`] owns its connection, since WATCH
//! state belongs to a connection.
//!
//! Connections are re-established after a connection error (the next call
//! reconnects), and every command times out after [`RESPONSE_TIMEOUT`], so a lost
//! or hung Redis surfaces as [`StoreError::Unavailable`].

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Client, Cmd, ErrorKind, FromRedisValue, Pipeline, RedisError,
    ServerErrorKind,
};
use serde_json::{Map, Value};
use tokio::sync::Mutex;

use super::{
    Commit, DEAD_LETTERS_KEPT, GenRef, KvStore, Meta, Schema, Session, Store, StoreError,
    StoreResult, parse_json, with_defaults,
};
use crate::projection::def::FieldKind;
use crate::projection::fold::{DeadLetter, DocReads, Effects, FieldDelta};

/// How long a command (or a whole pipeline) may take before it fails as unavailable.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// SCAN's COUNT hint when dropping a generation.
const SCAN_COUNT: usize = 1000;
/// Keys per HMGET pipeline in `read_fields`.
const READ_CHUNK: usize = 1000;

/// The Redis read-model store.
pub struct RedisStore {
    client: Client,
    ns: String,
    /// Shared by the store's own reads and writes (not by sessions).
    link: Link,
}

impl RedisStore {
    /// Connects (and PINGs) so a wrong URL fails at start with a clear message.
    pub async fn connect(url: &str, namespace: &str) -> StoreResult<Self> {
        let shown = crate::config::redact_url(url);
        let client = Client::open(url)
            .map_err(|e| StoreError::Other(format!("invalid Redis URL `{shown}`: {e}")))?;
        let link = Link::new(client.clone());
        let ping = async {
            let mut con = link.conn().await?;
            redis::cmd("PING")
                .query_async::<()>(&mut con)
                .await
                .map_err(store_err)
        };
        ping.await.map_err(|e| match e {
            StoreError::Unavailable(m) => {
                StoreError::Unavailable(format!("cannot reach Redis at `{shown}`: {m}"))
            }
            StoreError::Other(m) => {
                StoreError::Other(format!("cannot use Redis at `{shown}`: {m}"))
            }
        })?;
        Ok(Self {
            client,
            ns: namespace.to_owned(),
            link,
        })
    }

    fn keys(&self, generation: &GenRef) -> Keys {
        Keys::new(&self.ns, generation)
    }

    fn meta_key(&self, projection: &str) -> String {
        format!("{}{projection}:meta", self.ns)
    }
}

#[async_trait]
impl Store for RedisStore {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn meta(&self, projection: &str) -> StoreResult<Meta> {
        let json: Option<String> = self
            .link
            .query(redis::cmd("GET").arg(self.meta_key(projection)))
            .await?;
        match json {
            None => Ok(Meta::default()),
            Some(j) => serde_json::from_str(&j).map_err(|e| {
                StoreError::Other(format!("bad meta record of projection `{projection}`: {e}"))
            }),
        }
    }

    async fn put_meta(&self, projection: &str, meta: &Meta) -> StoreResult<()> {
        let json = serde_json::to_string(meta).map_err(|e| StoreError::Other(e.to_string()))?;
        self.link
            .query(redis::cmd("SET").arg(self.meta_key(projection)).arg(json))
            .await
    }

    async fn session(&self, generation: &GenRef, partition: u32) -> StoreResult<Box<dyn Session>> {
        let link = Link::new(self.client.clone());
        link.conn().await?; // fail now rather than on first use
        let keys = self.keys(generation);
        Ok(Box::new(RedisSession {
            ckpt: keys.ckpt(partition),
            keys,
            link,
        }))
    }

    async fn checkpoints(
        &self,
        generation: &GenRef,
        partitions: u32,
    ) -> StoreResult<Vec<Option<u64>>> {
        if partitions == 0 {
            return Ok(Vec::new());
        }
        let keys = self.keys(generation);
        let ckpts: Vec<String> = (0..partitions).map(|p| keys.ckpt(p)).collect();
        self.link.query(redis::cmd("MGET").arg(ckpts)).await
    }

    async fn view(
        &self,
        generation: &GenRef,
        schema: &Schema,
        key: &str,
    ) -> StoreResult<Option<Map<String, Value>>> {
        let keys = self.keys(generation);
        let doc = keys.doc(key);
        // Structural fields: (field, kind, redis key).
        let parts: Vec<(&String, FieldKind, String)> = schema
            .iter()
            .filter_map(|(f, k)| keys.structure(*k, f, key).map(|rk| (f, *k, rk)))
            .collect();

        let mut p = redis::pipe();
        p.atomic();
        p.cmd("EXISTS")
            .arg(&doc)
            .arg(parts.iter().map(|(_, _, rk)| rk).collect::<Vec<_>>());
        p.cmd("HGETALL").arg(&doc);
        for (_, kind, rk) in &parts {
            match kind {
                FieldKind::Set => p.cmd("SMEMBERS").arg(rk),
                FieldKind::Distinct => p.cmd("PFCOUNT").arg(rk),
                _ => p.cmd("LRANGE").arg(rk).arg(0).arg(-1),
            };
        }
        let replies: Option<Vec<redis::Value>> = self.link.query_pipe(&p).await?;
        let mut replies = replies
            .ok_or_else(|| StoreError::Other("redis: view transaction aborted".into()))?
            .into_iter();
        let mut next = || {
            replies
                .next()
                .ok_or_else(|| StoreError::Other("redis: short reply to view".into()))
        };

        let exists: u64 = parse(next()?)?;
        if exists == 0 {
            return Ok(None);
        }
        let mut out = Map::new();
        let hash: Vec<(String, String)> = parse(next()?)?;
        for (field, text) in hash {
            out.insert(field, parse_json(&text));
        }
        for (field, kind, _) in &parts {
            let reply = next()?;
            let v = match kind {
                FieldKind::Set => {
                    let mut members: Vec<String> = parse(reply)?;
                    members.sort_unstable();
                    Value::Array(members.iter().map(|m| parse_json(m)).collect())
                }
                FieldKind::Distinct => Value::from(parse::<u64>(reply)?),
                _ => Value::Array(
                    parse::<Vec<String>>(reply)?
                        .iter()
                        .map(|m| parse_json(m))
                        .collect(),
                ),
            };
            out.insert((*field).clone(), v);
        }
        Ok(Some(with_defaults(schema, out)))
    }

    async fn dead_letters(
        &self,
        generation: &GenRef,
        limit: usize,
    ) -> StoreResult<(u64, Vec<DeadLetter>)> {
        let keys = self.keys(generation);
        let mut p = redis::pipe();
        p.atomic();
        p.cmd("GET").arg(keys.dead_count());
        if limit > 0 {
            p.cmd("LRANGE")
                .arg(keys.dead())
                .arg(0)
                .arg(limit as i64 - 1);
        }
        let replies: Option<Vec<redis::Value>> = self.link.query_pipe(&p).await?;
        let mut replies = replies.unwrap_or_default().into_iter();
        let count: Option<u64> = replies.next().map(parse).transpose()?.flatten();
        let items: Vec<String> = replies.next().map(parse).transpose()?.unwrap_or_default();
        let letters = items
            .iter()
            .filter_map(|j| serde_json::from_str(j).ok())
            .collect();
        Ok((count.unwrap_or(0), letters))
    }

    async fn drop_generation(&self, generation: &GenRef) -> StoreResult<()> {
        let pattern = self.keys(generation).pattern();
        let mut cursor: u64 = 0;
        loop {
            let (next, found) = self.link.scan(cursor, &pattern).await?;
            if !found.is_empty() {
                self.link
                    .query::<()>(redis::cmd("UNLINK").arg(found))
                    .await?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    async fn generations(&self, projection: &str) -> StoreResult<BTreeSet<u64>> {
        let base = format!("{}{projection}:", self.ns);
        let pattern = format!("{}*:ckpt:*", glob_escape(&base));
        let mut out = BTreeSet::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, found) = self.link.scan(cursor, &pattern).await?;
            out.extend(found.iter().filter_map(|k| {
                k.strip_prefix(&base)?
                    .split(':')
                    .next()?
                    .parse::<u64>()
                    .ok()
            }));
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }
}

#[async_trait]
impl KvStore for RedisStore {
    async fn ranking(
        &self,
        generation: &GenRef,
        name: &str,
        limit: usize,
    ) -> StoreResult<Vec<(String, f64)>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let cmd = redis::cmd("ZREVRANGE")
            .arg(self.keys(generation).rank(name))
            .arg(0)
            .arg(limit as i64 - 1)
            .arg("WITHSCORES")
            .to_owned();
        self.link.query(&cmd).await
    }
}

/// The worker of one partition: its own connection, for WATCH.
struct RedisSession {
    keys: Keys,
    ckpt: String,
    link: Link,
}

#[async_trait]
impl Session for RedisSession {
    async fn checkpoint(&mut self) -> StoreResult<Option<u64>> {
        self.link.query(redis::cmd("GET").arg(&self.ckpt)).await
    }

    async fn read_fields(
        &mut self,
        keys: &BTreeSet<String>,
        fields: &[String],
    ) -> StoreResult<DocReads> {
        let mut out = DocReads::new();
        if fields.is_empty() || keys.is_empty() {
            return Ok(out);
        }
        let keys: Vec<&String> = keys.iter().collect();
        for chunk in keys.chunks(READ_CHUNK) {
            let mut p = redis::pipe();
            for key in chunk {
                p.cmd("HMGET").arg(self.keys.doc(key)).arg(fields);
            }
            let replies: Vec<Vec<Option<String>>> = self.link.query_pipe(&p).await?;
            for (key, values) in chunk.iter().zip(replies) {
                let got: std::collections::BTreeMap<String, Value> = fields
                    .iter()
                    .zip(values)
                    .filter_map(|(f, v)| v.map(|text| (f.clone(), parse_json(&text))))
                    .collect();
                if !got.is_empty() {
                    out.fields.insert((*key).clone(), got);
                }
            }
        }
        Ok(out)
    }

    async fn commit(
        &mut self,
        expected: Option<u64>,
        next: u64,
        effects: &Arc<Effects>,
        schema: &Schema,
    ) -> StoreResult<Commit> {
        let mut con = self.link.conn().await?;
        let result = self
            .try_commit(&mut con, expected, next, effects, schema)
            .await;
        if result.is_err() {
            // The connection may be left WATCHing (or worse): start afresh next time.
            self.link.reset().await;
        }
        result
    }
}

impl RedisSession {
    async fn try_commit(
        &self,
        con: &mut MultiplexedConnection,
        expected: Option<u64>,
        next: u64,
        effects: &Effects,
        schema: &Schema,
    ) -> StoreResult<Commit> {
        redis::cmd("WATCH")
            .arg(&self.ckpt)
            .query_async::<()>(con)
            .await
            .map_err(store_err)?;
        let found: Option<u64> = redis::cmd("GET")
            .arg(&self.ckpt)
            .query_async(con)
            .await
            .map_err(store_err)?;
        if found != expected {
            redis::cmd("UNWATCH")
                .query_async::<()>(con)
                .await
                .map_err(store_err)?;
            return Ok(Commit::Fenced { found });
        }

        let mut p = redis::pipe();
        p.atomic();
        self.apply(&mut p, effects, schema);
        p.cmd("SET").arg(&self.ckpt).arg(next).ignore();
        let done: Option<()> = p.query_async(con).await.map_err(store_err)?;
        if done.is_some() {
            return Ok(Commit::Applied);
        }
        // EXEC returned nil: the checkpoint changed after WATCH.
        let found: Option<u64> = redis::cmd("GET")
            .arg(&self.ckpt)
            .query_async(con)
            .await
            .map_err(store_err)?;
        Ok(Commit::Fenced { found })
    }

    /// Queues the batch's writes (every one `ignore`d: only errors matter).
    fn apply(&self, p: &mut Pipeline, fx: &Effects, schema: &Schema) {
        let k = &self.keys;
        for (key, delta) in &fx.docs {
            let doc = k.doc(key);
            if delta.reset {
                let mut del = vec![doc.clone()];
                del.extend(
                    schema
                        .iter()
                        .filter_map(|(f, kind)| k.structure(*kind, f, key)),
                );
                p.cmd("DEL").arg(del).ignore();
            }
            for (field, d) in &delta.fields {
                match d {
                    FieldDelta::Set(v) => {
                        p.cmd("HSET")
                            .arg(&doc)
                            .arg(field)
                            .arg(v.to_string())
                            .ignore();
                    }
                    FieldDelta::Incr(n) => {
                        p.cmd("HINCRBY").arg(&doc).arg(field).arg(*n).ignore();
                    }
                    FieldDelta::Members(members) => {
                        let set = k.set(field, key);
                        let (add, remove): (Vec<_>, Vec<_>) =
                            members.iter().partition(|(_, present)| **present);
                        if !add.is_empty() {
                            p.cmd("SADD")
                                .arg(&set)
                                .arg(add.iter().map(|(m, _)| *m).collect::<Vec<_>>())
                                .ignore();
                        }
                        if !remove.is_empty() {
                            p.cmd("SREM")
                                .arg(&set)
                                .arg(remove.iter().map(|(m, _)| *m).collect::<Vec<_>>())
                                .ignore();
                        }
                    }
                    FieldDelta::Distinct(values) => {
                        p.cmd("PFADD")
                            .arg(k.hll(field, key))
                            .arg(values.iter().collect::<Vec<_>>())
                            .ignore();
                    }
                    FieldDelta::Push { items, cap } => {
                        let list = k.list(field, key);
                        if *cap == 0 {
                            p.cmd("DEL").arg(&list).ignore();
                            continue;
                        }
                        if !items.is_empty() {
                            // Oldest first, so that the newest ends up at the head.
                            p.cmd("LPUSH")
                                .arg(&list)
                                .arg(items.iter().rev().collect::<Vec<_>>())
                                .ignore();
                        }
                        p.cmd("LTRIM")
                            .arg(&list)
                            .arg(0)
                            .arg(*cap as i64 - 1)
                            .ignore();
                    }
                }
            }
        }
        for (name, members) in &fx.rankings {
            let rank = k.rank(name);
            for (member, by) in members {
                p.cmd("ZINCRBY").arg(&rank).arg(*by).arg(member).ignore();
            }
        }
        if !fx.dead_letters.is_empty() {
            let json: Vec<String> = fx
                .dead_letters
                .iter()
                .map(|dl| serde_json::to_string(dl).expect("a dead letter serializes"))
                .collect();
            // In log order (oldest first), so that the newest ends up at the head.
            p.cmd("LPUSH").arg(k.dead()).arg(json).ignore();
            p.cmd("LTRIM")
                .arg(k.dead())
                .arg(0)
                .arg(DEAD_LETTERS_KEPT as i64 - 1)
                .ignore();
            p.cmd("INCRBY")
                .arg(k.dead_count())
                .arg(fx.dead_letters.len())
                .ignore();
        }
    }
}

/// The keys of one generation.
struct Keys {
    /// `{ns}{projection}:{g}:`
    base: String,
}

impl Keys {
    fn new(ns: &str, g: &GenRef) -> Self {
        Self {
            base: format!("{ns}{}:{}:", g.projection, g.generation),
        }
    }

    fn ckpt(&self, partition: u32) -> String {
        format!("{}ckpt:{partition}", self.base)
    }

    fn doc(&self, key: &str) -> String {
        format!("{}doc:{key}", self.base)
    }

    fn set(&self, field: &str, key: &str) -> String {
        format!("{}set:{field}:{key}", self.base)
    }

    fn hll(&self, field: &str, key: &str) -> String {
        format!("{}hll:{field}:{key}", self.base)
    }

    fn list(&self, field: &str, key: &str) -> String {
        format!("{}list:{field}:{key}", self.base)
    }

    /// The key of a field stored outside the doc hash, if it is one.
    fn structure(&self, kind: FieldKind, field: &str, key: &str) -> Option<String> {
        match kind {
            FieldKind::Set => Some(self.set(field, key)),
            FieldKind::Distinct => Some(self.hll(field, key)),
            FieldKind::List => Some(self.list(field, key)),
            FieldKind::Value | FieldKind::Counter => None,
        }
    }

    fn rank(&self, name: &str) -> String {
        format!("{}rank:{name}", self.base)
    }

    fn dead(&self) -> String {
        format!("{}dead", self.base)
    }

    fn dead_count(&self) -> String {
        format!("{}dead_count", self.base)
    }

    /// SCAN pattern of every key of the generation.
    fn pattern(&self) -> String {
        format!("{}*", glob_escape(&self.base))
    }
}

/// One connection, re-established on the next use after it failed.
struct Link {
    client: Client,
    conn: Mutex<Option<MultiplexedConnection>>,
}

impl Link {
    fn new(client: Client) -> Self {
        Self {
            client,
            conn: Mutex::new(None),
        }
    }

    async fn conn(&self) -> StoreResult<MultiplexedConnection> {
        let mut slot = self.conn.lock().await;
        if let Some(con) = slot.as_ref() {
            return Ok(con.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let con = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(store_err)?;
        *slot = Some(con.clone());
        Ok(con)
    }

    async fn reset(&self) {
        *self.conn.lock().await = None;
    }

    async fn failed<T>(&self, e: RedisError) -> StoreResult<T> {
        if unavailable(&e) || e.is_unrecoverable_error() {
            self.reset().await;
        }
        Err(store_err(e))
    }

    // Everything sent through a `Link` is safe to repeat (reads, SET of the meta
    // record, UNLINK), so a connection found dead (Redis restarted since its last
    // use) is replaced and the command sent once more, instead of failing the
    // query that happened to notice.

    async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> StoreResult<T> {
        self.retrying(|mut con| async move { cmd.query_async(&mut con).await })
            .await
    }

    async fn query_pipe<T: FromRedisValue>(&self, p: &Pipeline) -> StoreResult<T> {
        self.retrying(|mut con| async move { p.query_async(&mut con).await })
            .await
    }

    async fn retrying<T, F, Fut>(&self, send: F) -> StoreResult<T>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let mut retried = false;
        loop {
            match send(self.conn().await?).await {
                Ok(v) => return Ok(v),
                Err(e) if !retried && stale(&e) => {
                    self.reset().await;
                    retried = true;
                }
                Err(e) => return self.failed(e).await,
            }
        }
    }

    /// One page of `SCAN cursor MATCH pattern`: the next cursor (0: done) and keys.
    async fn scan(&self, cursor: u64, pattern: &str) -> StoreResult<(u64, Vec<String>)> {
        let scan = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .to_owned();
        self.query(&scan).await
    }
}

fn parse<T: FromRedisValue>(v: redis::Value) -> StoreResult<T> {
    redis::from_redis_value(v)
        .map_err(|e| StoreError::Other(format!("redis: unexpected reply: {e}")))
}

/// A connection that died while idle (not a slow server: timeouts are not retried).
fn stale(e: &RedisError) -> bool {
    e.is_connection_dropped() || e.is_io_error()
}

/// Connection losses, timeouts and a server that cannot serve right now.
fn unavailable(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ReadOnly
            )
        )
}

fn store_err(e: RedisError) -> StoreError {
    let msg = format!("redis: {e}");
    if unavailable(&e) {
        StoreError::Unavailable(msg)
    } else {
        StoreError::Other(msg)
    }
}

/// Escapes SCAN MATCH's special characters.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The URL without its password, for messages.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_pattern_does_not_match_other_generations() {
        let k1 = Keys::new(
            "a*.",
            &GenRef {
                projection: "p".into(),
                generation: 1,
            },
        );
        assert_eq!(k1.pattern(), "a\\*.p:1:*");
        assert_eq!(k1.doc("x:y"), "a*.p:1:doc:x:y");
    }
}
