//! The event-log port: a Kafka-shaped, partitioned, append-only log.
//!
//! Everything refold persists as history goes through [`EventLog`]: topics with a
//! fixed number of partitions, records addressed by `(partition, offset)` with
//! offsets starting at 0 and growing by one per append in each partition. Compacted
//! topics keep at least the newest record per key; offsets may then have gaps,
//! which readers must tolerate (see [`ReadBatch::next_offset`]).
//!
//! Two adapters honour the same contract and run the same conformance suite
//! (`tests/log_conformance.rs`):
//! - [`embedded::EmbeddedLog`]: a crash-safe local log in redb (fsync per commit);
//! - [`kafka::KafkaLog`]: rdkafka, idempotent producer with `acks=all`.
//!
//! Delivery contract of [`EventLog::append`]: `Ok` means every record is durable
//! (embedded: fsynced; Kafka: delivery report under `acks=all`). `Err` means *some*
//! records may have been written: callers must re-read the log to learn which
//! (the write path does, see `crate::writer`).

pub mod embedded;
pub mod kafka;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;

/// Declared shape of a topic (a `[[topics]]` entry of `migrations/`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: u32,
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

fn default_replication() -> i32 {
    1
}

impl TopicSpec {
    pub fn is_compacted(&self) -> bool {
        self.config
            .get("cleanup.policy")
            .is_some_and(|p| p.split(',').any(|p| p.trim() == "compact"))
    }
}

/// What the log reports about an existing topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    pub partitions: u32,
}

/// A record as written: key, value (`None` is a tombstone), headers, timestamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: String,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub timestamp_ms: i64,
}

impl Record {
    /// Bytes of key, value and headers: what the record costs in memory.
    pub fn size(&self) -> usize {
        self.key.len()
            + self.value.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }

    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// A record bound for one partition of one topic.
#[derive(Debug, Clone)]
pub struct ProduceRecord {
    pub topic: String,
    pub partition: u32,
    pub record: Record,
}

/// A record read back, with its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedRecord {
    pub partition: u32,
    pub offset: u64,
    pub record: Record,
}

/// The answer of [`PartitionReader::next`].
#[derive(Debug, Default)]
pub struct ReadBatch {
    pub records: Vec<ConsumedRecord>,
    /// The offset to read from next. Past the last record returned, or past a run
    /// of compacted-away offsets when no record was returned.
    pub next_offset: u64,
}

/// Outcome of [`EventLog::create_topic`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    Created,
    AlreadyExists,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log cannot be reached or did not confirm in time: retry later.
    #[error("event log unavailable: {0}")]
    Unavailable(String),
    #[error("unknown topic or partition: {0}")]
    UnknownTopic(String),
    #[error("event log error: {0}")]
    Other(String),
}

pub type LogResult<T> = Result<T, LogError>;

/// A write in flight: the records' offsets once durable.
pub type Delivery =
    std::pin::Pin<Box<dyn std::future::Future<Output = LogResult<Vec<u64>>> + Send>>;

#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// `"embedded"` or `"kafka"`, for logs and status.
    fn backend(&self) -> &'static str;

    /// Creates the topic, or reports that it exists (its shape is not compared
    /// here: see [`EventLog::describe_topic`]).
    async fn create_topic(&self, spec: &TopicSpec) -> LogResult<Created>;

    /// The topic's shape, or `None` when it does not exist.
    async fn describe_topic(&self, name: &str) -> LogResult<Option<TopicInfo>>;

    /// Appends all records; `Ok` carries each record's offset, in input order, and
    /// means all are durable. Records for one partition land in input order.
    async fn append(&self, records: Vec<ProduceRecord>) -> LogResult<Vec<u64>>;

    /// Starts an append and returns its delivery, which resolves like
    /// [`EventLog::append`]. Once `send` returns, the records are ordered after
    /// those of every earlier `send` and `append`, so the caller may send more
    /// before this delivery resolves. After a failed `send` or delivery, call
    /// [`EventLog::failed`] once nothing sent earlier is in flight, before
    /// writing again (`send` itself leaves the log's state alone). A log that cannot keep writes
    /// in flight appends here and returns a finished delivery.
    async fn send(&self, records: Vec<ProduceRecord>) -> LogResult<Delivery> {
        let done = self.append(records).await;
        Ok(Box::pin(std::future::ready(done)))
    }

    /// After a failed delivery: let the log start clean (Kafka: a fresh producer).
    async fn failed(&self) {}

    /// The high watermark (next offset to be written) of every partition.
    async fn end_offsets(&self, topic: &str) -> LogResult<Vec<u64>>;

    /// A reader of one partition positioned at `from`.
    async fn reader(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
    ) -> LogResult<Box<dyn PartitionReader>>;

    /// Waits until everything appended so far is handed to the log (shutdown).
    async fn flush(&self) -> LogResult<()>;
}

/// One [`PartitionReader::next`] stops adding records once they hold this many
/// bytes (so it returns at most this plus one record): with the record count, what
/// bounds the memory of a projection batch, whatever the size of the events (I9).
pub const READ_BATCH_BYTES: usize = 1 << 20;

#[async_trait]
pub trait PartitionReader: Send {
    /// Up to `max` records and [`READ_BATCH_BYTES`] from the current position.
    /// Waits up to `wait` when none are available yet, then returns an empty batch.
    async fn next(&mut self, max: usize, wait: Duration) -> LogResult<ReadBatch>;
}

/// How long [`scan`] waits for a log that returns nothing before it gives up.
const SCAN_STALL: Duration = Duration::from_secs(60);

/// Reads a partition from `from` up to (excluding) `end`, calling `f` per record.
pub async fn scan(
    log: &dyn EventLog,
    topic: &str,
    partition: u32,
    from: u64,
    end: u64,
    mut f: impl FnMut(ConsumedRecord) -> LogResult<()> + Send,
) -> LogResult<()> {
    if from >= end {
        return Ok(());
    }
    let mut reader = log.reader(topic, partition, from).await?;
    let mut pos = from;
    let mut progress_at = std::time::Instant::now();
    while pos < end {
        let batch = reader.next(1024, Duration::from_millis(500)).await?;
        if batch.records.is_empty() && batch.next_offset <= pos {
            if progress_at.elapsed() > SCAN_STALL {
                return Err(LogError::Unavailable(format!(
                    "{topic}/{partition}: no progress reading from offset {pos} towards {end} for {} s",
                    SCAN_STALL.as_secs()
                )));
            }
        } else {
            progress_at = std::time::Instant::now();
        }
        for r in batch.records {
            if r.offset >= end {
                return Ok(());
            }
            f(r)?;
        }
        pos = pos.max(batch.next_offset);
    }
    Ok(())
}

/// Kafka's default partitioner hash (murmur2, seed 0x9747b28c), so that refold and
/// any Kafka client agree on where a stream lives.
pub fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = 0x9747_b28c ^ (len as u32);
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    match tail.len() {
        3 => {
            h ^= (tail[2] as u32) << 16;
            h ^= (tail[1] as u32) << 8;
            h ^= tail[0] as u32;
            h = h.wrapping_mul(M);
        }
        2 => {
            h ^= (tail[1] as u32) << 8;
            h ^= tail[0] as u32;
            h = h.wrapping_mul(M);
        }
        1 => {
            h ^= tail[0] as u32;
            h = h.wrapping_mul(M);
        }
        _ => {}
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of a key, exactly as Kafka's default partitioner picks it.
pub fn partition_for(key: &str, partitions: u32) -> u32 {
    ((murmur2(key.as_bytes()) & 0x7fff_ffff) as u32) % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafka_test_vectors() {
        // From Kafka's UtilsTest.testMurmur2.
        let cases: [(&str, i32); 6] = [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ];
        for (input, expected) in cases {
            assert_eq!(murmur2(input.as_bytes()), expected, "murmur2({input:?})");
        }
    }

    #[test]
    fn partition_is_stable_and_in_range() {
        for n in 1..8 {
            for s in ["post-1", "user-42", "tribe-x"] {
                let p = partition_for(s, n);
                assert!(p < n);
                assert_eq!(p, partition_for(s, n));
            }
        }
    }

    #[test]
    fn compaction_policy_is_read_from_config() {
        let mut spec = TopicSpec {
            name: "t".into(),
            partitions: 1,
            replication_factor: 1,
            config: BTreeMap::new(),
        };
        assert!(!spec.is_compacted());
        spec.config
            .insert("cleanup.policy".into(), "delete,compact".into());
        assert!(spec.is_compacted());
    }
}
