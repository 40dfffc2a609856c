//! The Kafka event-log adapter (rdkafka).
//!
//! Producer: idempotent, `acks=all`, explicit partitions chosen by the caller,
//! bounded by `message.timeout.ms`: a record that is not confirmed in time fails
//! its delivery report, and [`EventLog::append`] returns `Err` (never `Ok` for a
//! record without a positive delivery report). Readers assign one partition each
//! (no consumer-group offsets: positions belong to refold) and run librdkafka's
//! blocking calls on the blocking thread pool.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::config::Secret;
use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use super::{
    ConsumedRecord, Created, Delivery, EventLog, LogError, LogResult, PartitionReader,
    ProduceRecord, READ_BATCH_BYTES, ReadBatch, Record, TopicInfo, TopicSpec,
};

/// The readers' default `fetch.wait.max.ms`.
pub const DEFAULT_FETCH_WAIT: Duration = Duration::from_millis(100);

pub struct KafkaLog {
    brokers: String,
    /// `bootstrap.servers` plus the configured properties (TLS, SASL).
    base: ClientConfig,
    timeout: Duration,
    /// The readers' `fetch.wait.max.ms`.
    fetch_wait: Duration,
    /// Replaced after a failed append (see [`KafkaLog::reset_producer`]).
    producer: RwLock<FutureProducer>,
    admin: AdminClient<DefaultClientContext>,
}

fn kafka_err(e: KafkaError) -> LogError {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownPartition) => {
            LogError::UnknownTopic(e.to_string())
        }
        Some(
            RDKafkaErrorCode::MessageTimedOut
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::OperationTimedOut
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::NetworkException
            | RDKafkaErrorCode::QueueFull
            | RDKafkaErrorCode::NotEnoughReplicas
            | RDKafkaErrorCode::NotEnoughReplicasAfterAppend
            | RDKafkaErrorCode::LeaderNotAvailable
            | RDKafkaErrorCode::NotLeaderForPartition,
        ) => LogError::Unavailable(e.to_string()),
        _ => LogError::Other(e.to_string()),
    }
}

/// What one partition reader may prefetch; a fetch returns at least one whole
/// record even when it is larger.
const READER_PREFETCH_KIB: u32 = 1024;

/// A client creation error, without the values of secret properties: rdkafka's
/// own message for a refused property quotes its value.
fn config_error(e: KafkaError, properties: &[(String, Secret)]) -> String {
    let mut text = match &e {
        KafkaError::ClientConfig(_, desc, key, _) => format!("property {key}: {desc}"),
        e => e.to_string(),
    };
    for (k, v) in properties {
        if !v.0.is_empty() && crate::config::secret_property(k) {
            text = text.replace(&v.0, "***");
        }
    }
    text
}

/// `bootstrap.servers` and the configured librdkafka properties: where every
/// client starts (also used bare by `refold bench`).
pub fn base_config(brokers: &str, properties: &[(String, Secret)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, v) in properties {
        c.set(k, &v.0);
    }
    c.set("bootstrap.servers", brokers);
    c
}

/// The consumer settings of every partition reader (also used bare by `refold
/// bench`).
pub(crate) fn reader_config(base: &ClientConfig, fetch_wait: Duration) -> ClientConfig {
    let mut c = base.clone();
    c.set("group.id", "refold-reader")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", fetch_wait.as_millis().to_string())
        // Prefetch is per reader (one per projection and partition), and
        // librdkafka's default lets each buffer 64 MiB: cap it (I9).
        .set(
            "queued.max.messages.kbytes",
            READER_PREFETCH_KIB.to_string(),
        );
    c
}

/// The producer settings of every write (also used bare by `refold bench`).
pub(crate) fn new_producer(
    base: &ClientConfig,
    timeout: Duration,
) -> Result<FutureProducer, KafkaError> {
    let ms = timeout.as_millis().max(1000).to_string();
    base.clone()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // Topics come from migrations only: a metadata lookup (describe_topic) must
        // not make a broker with auto.create.topics.enable create a default topic.
        .set("allow.auto.create.topics", "false")
        // Room for the largest record refold writes (writer::MAX_RECORD_BYTES) plus
        // protocol overhead; librdkafka's default would refuse it.
        .set("message.max.bytes", "2000000")
        .set("message.timeout.ms", &ms)
        .set("linger.ms", "2")
        .set("socket.timeout.ms", &ms)
        .create()
}

impl KafkaLog {
    /// Connects lazily: librdkafka dials the brokers on first use.
    pub fn new(brokers: &str, timeout: Duration) -> anyhow::Result<Self> {
        Self::with_properties(brokers, &[], timeout)
    }

    /// [`KafkaLog::new`] with librdkafka `properties` (TLS, SASL) on every client.
    /// librdkafka checks them here: an unknown key or bad value is an error.
    pub fn with_properties(
        brokers: &str,
        properties: &[(String, Secret)],
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let base = base_config(brokers, properties);
        let producer = new_producer(&base, timeout).map_err(|e| {
            anyhow::anyhow!(
                "cannot create Kafka producer for {brokers}: {}",
                config_error(e, properties)
            )
        })?;
        let admin = base.create().map_err(|e| {
            anyhow::anyhow!(
                "cannot create Kafka admin client for {brokers}: {}",
                config_error(e, properties)
            )
        })?;
        Ok(Self {
            brokers: brokers.to_owned(),
            base,
            timeout,
            fetch_wait: DEFAULT_FETCH_WAIT,
            producer: RwLock::new(producer),
            admin,
        })
    }

    /// How long a reader's fetch may wait at the broker for records to arrive
    /// (`fetch.wait.max.ms`; Kafka answers as soon as a record is there).
    pub fn with_fetch_wait(mut self, wait: Duration) -> Self {
        self.fetch_wait = wait;
        self
    }

    fn producer(&self) -> FutureProducer {
        self.producer.read().expect("producer lock").clone()
    }

    /// After a failed append the producer may hold requests and idempotence state
    /// (producer id, sequence numbers) that a restarted broker no longer knows:
    /// tansu then drops the connection on every retry. A fresh producer starts
    /// clean; the old one is dropped off the runtime (its drop purges and waits).
    async fn reset_producer(&self) {
        match new_producer(&self.base, self.timeout) {
            Ok(fresh) => {
                let old =
                    std::mem::replace(&mut *self.producer.write().expect("producer lock"), fresh);
                let _ = tokio::task::spawn_blocking(move || drop(old)).await;
            }
            Err(e) => tracing::warn!(error = %e, "cannot recreate the Kafka producer"),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&FutureProducer, Duration) -> LogResult<T> + Send + 'static,
    ) -> LogResult<T> {
        let producer = self.producer();
        let timeout = self.timeout;
        tokio::task::spawn_blocking(move || f(&producer, timeout))
            .await
            .map_err(|e| LogError::Other(e.to_string()))?
    }
}

#[async_trait]
impl EventLog for KafkaLog {
    fn backend(&self) -> &'static str {
        "kafka"
    }

    async fn create_topic(&self, spec: &TopicSpec) -> LogResult<Created> {
        let mut topic = NewTopic::new(
            &spec.name,
            spec.partitions as i32,
            TopicReplication::Fixed(spec.replication_factor),
        );
        for (k, v) in &spec.config {
            topic = topic.set(k, v);
        }
        let opts = AdminOptions::new()
            .operation_timeout(Some(self.timeout))
            .request_timeout(Some(self.timeout));
        let results = self
            .admin
            .create_topics([&topic], &opts)
            .await
            .map_err(|e| {
                LogError::Unavailable(format!(
                    "cannot create topic {} on Kafka at {} (check --kafka-brokers and, for TLS or SASL, kafka_properties): {e}",
                    spec.name, self.brokers
                ))
            })?;
        match results.into_iter().next() {
            Some(Ok(_)) => Ok(Created::Created),
            Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => Ok(Created::AlreadyExists),
            Some(Err((name, code))) => Err(kafka_err(KafkaError::AdminOp(code)).context_for(&name)),
            None => Err(LogError::Other(format!(
                "no CreateTopics result for {}",
                spec.name
            ))),
        }
    }

    async fn describe_topic(&self, name: &str) -> LogResult<Option<TopicInfo>> {
        let name = name.to_owned();
        let brokers = self.brokers.clone();
        self.blocking(move |p, timeout| {
            let md = p
                .client()
                .fetch_metadata(Some(&name), timeout)
                .map_err(|e| {
                    LogError::Unavailable(format!("cannot reach Kafka at {brokers}: {e}"))
                })?;
            let Some(t) = md.topics().iter().find(|t| t.name() == name) else {
                return Ok(None);
            };
            match t.error() {
                None if !t.partitions().is_empty() => Ok(Some(TopicInfo {
                    partitions: t.partitions().len() as u32,
                })),
                _ => Ok(None),
            }
        })
        .await
    }

    async fn append(&self, records: Vec<ProduceRecord>) -> LogResult<Vec<u64>> {
        let delivered = match self.send(records).await {
            Ok(delivery) => delivery.await,
            Err(e) => Err(e),
        };
        if delivered.is_err() {
            self.failed().await;
        }
        delivered
    }

    /// Enqueues every record in the producer (in order: librdkafka keeps a
    /// partition's records in the order they were enqueued, also across sends),
    /// then returns the wait for their delivery reports. It never replaces the
    /// producer itself: a new one would not keep later sends behind earlier ones.
    async fn send(&self, records: Vec<ProduceRecord>) -> LogResult<Delivery> {
        let producer = self.producer();
        let mut pending = Vec::with_capacity(records.len());
        for r in &records {
            let mut headers = OwnedHeaders::new_with_capacity(r.record.headers.len());
            for (k, v) in &r.record.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            let mut fr = FutureRecord::to(&r.topic)
                .partition(r.partition as i32)
                .key(r.record.key.as_str())
                .headers(headers)
                .timestamp(r.record.timestamp_ms);
            if let Some(v) = &r.record.value {
                fr = fr.payload(v.as_slice());
            }
            // Enqueue everything first so the batch shares produce requests.
            let deadline = tokio::time::Instant::now() + self.timeout;
            loop {
                match producer.send_result(fr) {
                    Ok(f) => {
                        pending.push(f);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                        if tokio::time::Instant::now() < deadline =>
                    {
                        fr = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => {
                        // The caller resets the producer ([`EventLog::failed`])
                        // once nothing it sent before is in flight.
                        drop((producer, pending));
                        return Err(kafka_err(e));
                    }
                }
            }
        }
        Ok(Box::pin(async move {
            let mut offsets = Vec::with_capacity(pending.len());
            let mut first_error = None;
            for f in pending {
                match f.await {
                    Ok(Ok(d)) => offsets.push(d.offset as u64),
                    Ok(Err((e, _))) => {
                        first_error.get_or_insert(kafka_err(e));
                    }
                    Err(_) => {
                        first_error.get_or_insert(LogError::Other("Kafka producer dropped".into()));
                    }
                }
            }
            // Possibly the last handle of a producer replaced meanwhile: its drop
            // purges and joins a thread, so not on the runtime.
            tokio::task::spawn_blocking(move || drop(producer));
            match first_error {
                None => Ok(offsets),
                Some(e) => Err(e),
            }
        }))
    }

    /// A failed append may leave the producer with requests and idempotence
    /// state a restarted broker no longer knows: start a fresh one.
    async fn failed(&self) {
        self.reset_producer().await;
    }

    async fn end_offsets(&self, topic: &str) -> LogResult<Vec<u64>> {
        let partitions = self
            .describe_topic(topic)
            .await?
            .ok_or_else(|| LogError::UnknownTopic(topic.to_owned()))?
            .partitions;
        let topic = topic.to_owned();
        self.blocking(move |p, timeout| {
            (0..partitions)
                .map(|part| {
                    let (_, high) = p
                        .client()
                        .fetch_watermarks(&topic, part as i32, timeout)
                        .map_err(kafka_err)?;
                    Ok(high.max(0) as u64)
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
        let consumer: BaseConsumer = reader_config(&self.base, self.fetch_wait)
            .create()
            .map_err(kafka_err)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition as i32, Offset::Offset(from as i64))
            .map_err(kafka_err)?;
        consumer.assign(&tpl).map_err(kafka_err)?;
        Ok(Box::new(KafkaReader {
            consumer: Arc::new(consumer),
            topic: topic.to_owned(),
            partition,
            pos: from,
        }))
    }

    async fn flush(&self) -> LogResult<()> {
        self.blocking(|p, timeout| p.flush(timeout).map_err(kafka_err))
            .await
    }
}

trait Context {
    fn context_for(self, what: &str) -> Self;
}

impl Context for LogError {
    fn context_for(self, what: &str) -> Self {
        match self {
            LogError::Unavailable(m) => LogError::Unavailable(format!("{what}: {m}")),
            LogError::UnknownTopic(m) => LogError::UnknownTopic(format!("{what}: {m}")),
            LogError::Other(m) => LogError::Other(format!("{what}: {m}")),
        }
    }
}

struct KafkaReader {
    consumer: Arc<BaseConsumer>,
    topic: String,
    partition: u32,
    pos: u64,
}

impl Drop for KafkaReader {
    fn drop(&mut self) {
        // Closing a consumer blocks on librdkafka: keep that off the async workers.
        let consumer = self.consumer.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn_blocking(move || drop(consumer));
        }
    }
}

#[async_trait]
impl PartitionReader for KafkaReader {
    async fn next(&mut self, max: usize, wait: Duration) -> LogResult<ReadBatch> {
        let consumer = self.consumer.clone();
        let (topic, partition, pos) = (self.topic.clone(), self.partition, self.pos);
        let batch = tokio::task::spawn_blocking(move || {
            let mut records = Vec::new();
            let mut timeout = wait;
            let mut bytes = 0;
            while records.len() < max.max(1) && bytes < READ_BATCH_BYTES {
                let Some(msg) = consumer.poll(timeout) else {
                    break;
                };
                timeout = Duration::ZERO;
                let msg = msg.map_err(kafka_err)?;
                if msg.partition() as u32 != partition || msg.topic() != topic {
                    continue;
                }
                let headers = msg
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default();
                let record = Record {
                    key: String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned(),
                    value: msg.payload().map(<[u8]>::to_vec),
                    headers,
                    timestamp_ms: msg.timestamp().to_millis().unwrap_or(0),
                };
                bytes += record.size();
                records.push(ConsumedRecord {
                    partition,
                    offset: msg.offset() as u64,
                    record,
                });
            }
            let next_offset = match records.last() {
                Some(r) => r.offset + 1,
                // The consumer's position skips compacted-away offsets.
                None => consumer
                    .position()
                    .ok()
                    .and_then(
                        |tpl| match tpl.find_partition(&topic, partition as i32)?.offset() {
                            Offset::Offset(o) if o >= 0 => Some(o as u64),
                            _ => None,
                        },
                    )
                    .unwrap_or(pos)
                    .max(pos),
            };
            Ok(ReadBatch {
                records,
                next_offset,
            })
        })
        .await
        .map_err(|e| LogError::Other(e.to_string()))??;
        self.pos = batch.next_offset;
        Ok(batch)
    }
}
