//! The embedded event log: Kafka's partition/offset semantics on redb.
//!
//! One redb file (`{data_dir}/log.redb`) holds every topic. Each append is one
//! redb write transaction committed with `Durability::Immediate` (fsync), so `Ok`
//! from [`EventLog::append`] means the records survive a crash or power loss; a
//! crash before the commit leaves none of them (all or nothing per call).
//!
//! Compacted topics are compacted eagerly: writing a key removes the previous record
//! with the same key in that partition, leaving a gap in the offsets exactly as
//! Kafka's log cleaner would. redb holds an exclusive lock on the file, so two
//! processes cannot share a data directory.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::watch;

use super::{
    ConsumedRecord, Created, EventLog, LogError, LogResult, PartitionReader, ProduceRecord,
    READ_BATCH_BYTES, ReadBatch, Record, TopicInfo, TopicSpec,
};

/// topic -> (partitions, compacted)
const TOPICS: TableDefinition<&str, (u32, bool)> = TableDefinition::new("topics");
/// (topic, partition, offset) -> encoded record
const RECORDS: TableDefinition<(&str, u32, u64), &[u8]> = TableDefinition::new("records");
/// (topic, partition) -> next offset (high watermark)
const ENDS: TableDefinition<(&str, u32), u64> = TableDefinition::new("ends");
/// (topic, partition, key) -> offset of the newest record with that key (compacted topics)
const KEYS: TableDefinition<(&str, u32, &str), u64> = TableDefinition::new("keys");

/// redb's page cache (its default is 1 GiB; the log is mostly appended and read
/// once from the tail, so a small cache serves it).
const CACHE_BYTES: usize = 64 << 20;

pub struct EmbeddedLog {
    db: Arc<Database>,
    /// Bumped after every commit; readers wait on it for new records.
    commits: watch::Sender<u64>,
}

fn storage(e: impl std::fmt::Display) -> LogError {
    LogError::Other(format!("embedded log: {e}"))
}

impl EmbeddedLog {
    /// Opens (or creates) the log under `data_dir`.
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            anyhow::anyhow!("cannot create data directory {}: {e}", data_dir.display())
        })?;
        let path = data_dir.join("log.redb");
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => anyhow::anyhow!(
                    "{} is in use by another refold process; stop it or pick another --data-dir",
                    path.display()
                ),
                e => anyhow::anyhow!("cannot open embedded log {}: {e}", path.display()),
            })?;
        let txn = db.begin_write()?;
        {
            txn.open_table(TOPICS)?;
            txn.open_table(RECORDS)?;
            txn.open_table(ENDS)?;
            txn.open_table(KEYS)?;
        }
        txn.commit()?;
        Ok(Self {
            db: Arc::new(db),
            commits: watch::channel(0).0,
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, LogError> + Send + 'static,
    ) -> LogResult<T> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(storage)?
    }
}

fn topic_info(db: &Database, topic: &str) -> LogResult<Option<(u32, bool)>> {
    let txn = db.begin_read().map_err(storage)?;
    let topics = txn.open_table(TOPICS).map_err(storage)?;
    Ok(topics.get(topic).map_err(storage)?.map(|v| v.value()))
}

#[async_trait]
impl EventLog for EmbeddedLog {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn create_topic(&self, spec: &TopicSpec) -> LogResult<Created> {
        let spec = spec.clone();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(storage)?;
            let created = {
                let mut topics = txn.open_table(TOPICS).map_err(storage)?;
                if topics.get(spec.name.as_str()).map_err(storage)?.is_some() {
                    Created::AlreadyExists
                } else {
                    topics
                        .insert(spec.name.as_str(), (spec.partitions, spec.is_compacted()))
                        .map_err(storage)?;
                    Created::Created
                }
            };
            txn.commit().map_err(storage)?;
            Ok(created)
        })
        .await
    }

    async fn describe_topic(&self, name: &str) -> LogResult<Option<TopicInfo>> {
        let name = name.to_owned();
        self.blocking(move |db| {
            Ok(topic_info(db, &name)?.map(|(partitions, _)| TopicInfo { partitions }))
        })
        .await
    }

    async fn append(&self, records: Vec<ProduceRecord>) -> LogResult<Vec<u64>> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let offsets = self
            .blocking(move |db| {
                let txn = db.begin_write().map_err(storage)?;
                let mut offsets = Vec::with_capacity(records.len());
                {
                    let topics = txn.open_table(TOPICS).map_err(storage)?;
                    let mut table = txn.open_table(RECORDS).map_err(storage)?;
                    let mut ends = txn.open_table(ENDS).map_err(storage)?;
                    let mut keys = txn.open_table(KEYS).map_err(storage)?;
                    let mut buf = Vec::new();
                    for r in &records {
                        let topic = r.topic.as_str();
                        let (partitions, compacted) = topics
                            .get(topic)
                            .map_err(storage)?
                            .map(|v| v.value())
                            .ok_or_else(|| LogError::UnknownTopic(topic.to_owned()))?;
                        if r.partition >= partitions {
                            return Err(LogError::UnknownTopic(format!(
                                "{topic}/{} (topic has {partitions} partitions)",
                                r.partition
                            )));
                        }
                        let offset = ends
                            .get((topic, r.partition))
                            .map_err(storage)?
                            .map_or(0, |v| v.value());
                        buf.clear();
                        encode(&r.record, &mut buf);
                        table
                            .insert((topic, r.partition, offset), buf.as_slice())
                            .map_err(storage)?;
                        ends.insert((topic, r.partition), offset + 1)
                            .map_err(storage)?;
                        if compacted {
                            let old = keys
                                .insert((topic, r.partition, r.record.key.as_str()), offset)
                                .map_err(storage)?
                                .map(|v| v.value());
                            if let Some(old) = old {
                                table.remove((topic, r.partition, old)).map_err(storage)?;
                            }
                        }
                        offsets.push(offset);
                    }
                }
                // Durability::Immediate is redb's default: commit returns after fsync.
                txn.commit().map_err(storage)?;
                Ok(offsets)
            })
            .await?;
        self.commits.send_modify(|c| *c += 1);
        Ok(offsets)
    }

    async fn end_offsets(&self, topic: &str) -> LogResult<Vec<u64>> {
        let topic = topic.to_owned();
        self.blocking(move |db| {
            let (partitions, _) =
                topic_info(db, &topic)?.ok_or_else(|| LogError::UnknownTopic(topic.clone()))?;
            let txn = db.begin_read().map_err(storage)?;
            let ends = txn.open_table(ENDS).map_err(storage)?;
            (0..partitions)
                .map(|p| {
                    Ok(ends
                        .get((topic.as_str(), p))
                        .map_err(storage)?
                        .map_or(0, |v| v.value()))
                })
                .collect()
        })
        .await
    }

    async fn reader(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
    ) -> LogResult<Box<dyn PartitionReader>> {
        let info = self.describe_topic(topic).await?;
        match info {
            Some(t) if partition < t.partitions => Ok(Box::new(EmbeddedReader {
                db: self.db.clone(),
                topic: topic.to_owned(),
                partition,
                pos: from,
                commits: self.commits.subscribe(),
            })),
            _ => Err(LogError::UnknownTopic(format!("{topic}/{partition}"))),
        }
    }

    async fn flush(&self) -> LogResult<()> {
        Ok(()) // every append is committed before it returns
    }
}

struct EmbeddedReader {
    db: Arc<Database>,
    topic: String,
    partition: u32,
    pos: u64,
    commits: watch::Receiver<u64>,
}

impl EmbeddedReader {
    async fn read(&self, max: usize) -> LogResult<ReadBatch> {
        let (db, topic, partition, pos) = (
            self.db.clone(),
            self.topic.clone(),
            self.partition,
            self.pos,
        );
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(storage)?;
            let table = txn.open_table(RECORDS).map_err(storage)?;
            let ends = txn.open_table(ENDS).map_err(storage)?;
            let end = ends
                .get((topic.as_str(), partition))
                .map_err(storage)?
                .map_or(0, |v| v.value());
            let mut records = Vec::new();
            let range = table
                .range((topic.as_str(), partition, pos)..(topic.as_str(), partition, u64::MAX))
                .map_err(storage)?;
            let (mut bytes, mut full) = (0, false);
            for item in range {
                if records.len() >= max || bytes >= READ_BATCH_BYTES {
                    full = true;
                    break;
                }
                let (k, v) = item.map_err(storage)?;
                let offset = k.value().2;
                let record = decode(v.value())?;
                bytes += record.size();
                records.push(ConsumedRecord {
                    partition,
                    offset,
                    record,
                });
            }
            let next_offset = match (records.last(), full) {
                (Some(last), true) => last.offset + 1,
                // Everything up to the end was read: skip compacted gaps too.
                _ => end.max(pos),
            };
            Ok(ReadBatch {
                records,
                next_offset,
            })
        })
        .await
        .map_err(storage)?
    }
}

#[async_trait]
impl PartitionReader for EmbeddedReader {
    async fn next(&mut self, max: usize, wait: Duration) -> LogResult<ReadBatch> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            self.commits.borrow_and_update();
            let batch = self.read(max.max(1)).await?;
            self.pos = batch.next_offset;
            if !batch.records.is_empty() {
                return Ok(batch);
            }
            match tokio::time::timeout_at(deadline, self.commits.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Ok(batch),
            }
        }
    }
}

// Record encoding: ts i64 | key_len u32 | key | has_value u8 | [value_len u32 | value]
// | n_headers u32 | (name_len u32 | name | value_len u32 | value)*; little endian.
fn encode(r: &Record, out: &mut Vec<u8>) {
    fn bytes(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(b);
    }
    out.extend_from_slice(&r.timestamp_ms.to_le_bytes());
    bytes(out, r.key.as_bytes());
    match &r.value {
        Some(v) => {
            out.push(1);
            bytes(out, v);
        }
        None => out.push(0),
    }
    out.extend_from_slice(&(r.headers.len() as u32).to_le_bytes());
    for (name, value) in &r.headers {
        bytes(out, name.as_bytes());
        bytes(out, value);
    }
}

fn decode(mut b: &[u8]) -> LogResult<Record> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> LogResult<&'a [u8]> {
        if b.len() < n {
            return Err(LogError::Other("embedded log: truncated record".into()));
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head)
    }
    fn u32_(b: &mut &[u8]) -> LogResult<usize> {
        Ok(u32::from_le_bytes(take(b, 4)?.try_into().expect("4 bytes")) as usize)
    }
    fn bytes(b: &mut &[u8]) -> LogResult<Vec<u8>> {
        let n = u32_(b)?;
        Ok(take(b, n)?.to_vec())
    }
    fn string(b: &mut &[u8]) -> LogResult<String> {
        String::from_utf8(bytes(b)?).map_err(storage)
    }
    let timestamp_ms = i64::from_le_bytes(take(&mut b, 8)?.try_into().expect("8 bytes"));
    let key = string(&mut b)?;
    let value = match take(&mut b, 1)?[0] {
        0 => None,
        _ => Some(bytes(&mut b)?),
    };
    let n = u32_(&mut b)?;
    let mut headers = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        headers.push((string(&mut b)?, bytes(&mut b)?));
    }
    Ok(Record {
        key,
        value,
        headers,
        timestamp_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_encoding_round_trips() {
        let r = Record {
            key: "post-1/3".into(),
            value: Some(b"{\"a\":1}".to_vec()),
            headers: vec![("type".into(), b"PostLiked".to_vec())],
            timestamp_ms: 1_700_000_000_000,
        };
        let mut buf = Vec::new();
        encode(&r, &mut buf);
        assert_eq!(decode(&buf).unwrap(), r);
        let tomb = Record {
            value: None,
            headers: vec![],
            ..r
        };
        buf.clear();
        encode(&tomb, &mut buf);
        assert_eq!(decode(&buf).unwrap(), tomb);
        assert!(decode(&buf[..buf.len() - 1]).is_err());
    }
}
