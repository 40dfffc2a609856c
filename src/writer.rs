//! The write path: versions, concurrency checks, idempotency and group commit.
//!
//! One task owns the stream heads (current version and offset of every stream) and
//! is the only writer to the events topic. HTTP handlers reserve room in a bounded
//! byte budget (full: 429, I9), then hand their appends over a bounded channel. The
//! task drains whatever is queued into one batch, decides every append against the
//! heads (I3: checks are sequential, so of concurrent appends with the same
//! `expected_version` exactly one wins), assigns gap-free versions (I2) and writes
//! the whole batch with one [`EventLog::send`]. Replies go out only after the log
//! confirmed the batch (I1): many requests share one fsync or one round of Kafka
//! delivery reports. While a batch is in flight the next one is decided on top of
//! it (its staged heads and ids) and sent too, so a log that keeps writes in
//! flight (Kafka) is never idle waiting for the writer; the embedded log confirms
//! within `send`. A batch is committed to the heads only once confirmed; if one
//! fails, the batch planned on top of it fails with it (503) whatever its own
//! delivery says, and both are covered by the tail re-read below.
//!
//! Idempotency (I4): the task remembers where the last `idempotency_window` events
//! (all streams) landed. An append whose ids are all known, in its stream, at
//! consecutive versions, is a repeat: it gets the original result (200, same
//! versions and position) and writes nothing. An append that reuses a known id in
//! any other way is refused (409); it is never half-applied.
//!
//! Restarts do not rescan history. The task periodically writes the heads that
//! changed to the compacted `stream-heads` topic, followed by one checkpoint record
//! per events partition saying up to which offset those heads are complete.
//! Recovery loads that snapshot and folds in the events after the checkpoints, or
//! from further back where the id index needs its last `idempotency_window` events.
//! The same tail scan repairs the heads when an append failed part-way (Kafka may
//! have written some records of a failed batch): it waits for the log to settle,
//! and until it has read the tail the writer answers 503 and writes nothing, so
//! versions are never assigned twice.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::error::ApiError;
use crate::event::{AppendInput, Envelope, TYPE_HEADER, now_ms, rfc3339};
use crate::log::{
    Delivery, EventLog, LogError, LogResult, ProduceRecord, Record, partition_for, scan,
};
use crate::metrics::Metrics;
use crate::position::Position;

#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub events_topic: String,
    pub heads_topic: String,
    /// Bytes of request bodies admitted at once (queued or being written).
    pub buffer_bytes: usize,
    /// Most events in one durable write.
    pub max_batch_events: usize,
    /// Event ids remembered (last written, all streams) for idempotent retries.
    pub idempotency_window: usize,
    /// Snapshot the heads after this many events...
    pub snapshot_every: u64,
    /// ...or this long after a change.
    pub snapshot_interval: Duration,
    pub metrics: Arc<Metrics>,
}

/// The result of one append, as the client sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Appended {
    pub stream: String,
    pub first_version: u64,
    pub last_version: u64,
    pub position: Position,
    pub events: Vec<EventRef>,
    /// `false` for an idempotent repeat (200 rather than 201).
    #[serde(skip)]
    pub created: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventRef {
    pub id: Uuid,
    pub version: u64,
}

pub type AppendResult = Result<Appended, ApiError>;

/// Room reserved in the write path's byte budget; released when dropped.
pub struct Ticket(#[allow(dead_code)] OwnedSemaphorePermit);

struct Job {
    appends: Vec<AppendInput>,
    reply: oneshot::Sender<Vec<AppendResult>>,
    _ticket: Ticket,
}

/// Handle to the write path; cheap to clone.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Job>,
    budget: Arc<Semaphore>,
    budget_kib: u32,
    healthy: Arc<AtomicBool>,
}

impl Writer {
    /// Recovers the heads from the log and starts the writer task.
    pub async fn start(
        log: Arc<dyn EventLog>,
        config: WriterConfig,
    ) -> anyhow::Result<(Writer, WriterTask)> {
        let task = WriterLoop::recover(log, config.clone()).await?;
        let budget_kib = (config.buffer_bytes / 1024).max(1) as u32;
        let (tx, rx) = mpsc::channel(budget_kib as usize);
        let healthy = task.healthy.clone();
        let (stop, stopped) = oneshot::channel();
        let join = tokio::spawn(task.run(rx, stopped));
        let writer = Writer {
            tx,
            budget: Arc::new(Semaphore::new(budget_kib as usize)),
            budget_kib,
            healthy,
        };
        Ok((writer, WriterTask { stop, join }))
    }

    /// Reserves room for a request of `bytes`; 429 when the budget is used up.
    pub fn reserve(&self, bytes: usize) -> Result<Ticket, ApiError> {
        let kib = (bytes.div_ceil(1024) as u32).clamp(1, self.budget_kib);
        self.budget
            .clone()
            .try_acquire_many_owned(kib)
            .map(Ticket)
            .map_err(|_| ApiError::Overloaded { retry_after: 1 })
    }

    /// Appends; one result per input, in order. `Err` only when the write path
    /// cannot take the request at all.
    pub async fn append(
        &self,
        ticket: Ticket,
        appends: Vec<AppendInput>,
    ) -> Result<Vec<AppendResult>, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(Job {
                appends,
                reply,
                _ticket: ticket,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => ApiError::Overloaded { retry_after: 1 },
                mpsc::error::TrySendError::Closed(_) => ApiError::ShuttingDown,
            })?;
        rx.await.map_err(|_| ApiError::ShuttingDown)
    }

    /// The queue, for metrics: request bytes admitted and not yet answered, the
    /// most it admits, and requests waiting for the writer.
    pub fn queue(&self) -> (u64, u64, u64) {
        let capacity = u64::from(self.budget_kib) * 1024;
        let free = self.budget.available_permits() as u64 * 1024;
        let waiting = (self.tx.max_capacity() - self.tx.capacity()) as u64;
        (capacity.saturating_sub(free), capacity, waiting)
    }

    /// False while the writer cannot confirm the state of the log (see module doc).
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

/// The running writer task.
pub struct WriterTask {
    stop: oneshot::Sender<()>,
    join: tokio::task::JoinHandle<()>,
}

impl WriterTask {
    /// Stops intake (new appends get 503 `shutting_down`), writes what is queued,
    /// snapshots the heads, flushes the log, and returns when all that is done.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.join.await;
    }
}

/// What the writer knows of one stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
struct Head {
    version: u64,
    /// Offset of the stream's last event in its partition.
    offset: u64,
}

#[derive(Serialize, Deserialize)]
struct HeadRecord {
    stream: String,
    #[serde(flatten)]
    head: Head,
}

#[derive(Serialize, Deserialize)]
struct CheckpointRecord {
    partition: u32,
    next_offset: u64,
}

const CHECKPOINT_PREFIX: &str = "_checkpoint/";

/// The largest event record (key plus envelope) refold writes: Kafka's default
/// `message.max.bytes`, so that the same events fit every log.
pub const MAX_RECORD_BYTES: usize = 1_000_000;

/// Where an event is: a durable offset, or a record of the batch being written.
#[derive(Debug, Clone, Copy)]
enum At {
    Offset(u64),
    /// A record of this batch.
    Record(usize),
    /// A record of the batch before, still in flight when this one was planned.
    Prior(usize),
}

/// A batch decided and handed to the log, waiting for its delivery.
struct Batch {
    staged: HashMap<Arc<str>, Head>,
    pending: HashMap<Uuid, (Arc<str>, u64, usize)>,
    plans: Vec<Vec<Plan>>,
    replies: Vec<(oneshot::Sender<Vec<AppendResult>>, Ticket)>,
    started: Instant,
    /// The offsets of the batch it was planned on top of, once known.
    prior_offsets: Vec<u64>,
}

/// The last `capacity` event ids written, across all streams, with where each
/// landed: what makes retries idempotent (I4). Bounded: the oldest are forgotten.
struct IdIndex {
    map: HashMap<Uuid, (Arc<str>, u64, u64)>,
    order: VecDeque<Uuid>,
    capacity: usize,
}

impl IdIndex {
    fn new(capacity: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    fn insert(&mut self, id: Uuid, stream: Arc<str>, version: u64, offset: u64) {
        if self.map.insert(id, (stream, version, offset)).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }
}

/// How one append of a batch is to be answered.
enum Plan {
    Fresh {
        stream: Arc<str>,
        first: u64,
        ids: Vec<Uuid>,
        records: Range<usize>,
    },
    Repeat {
        stream: Arc<str>,
        first: u64,
        ids: Vec<Uuid>,
        last: At,
    },
    Refused(ApiError),
}

/// A failed append may have left records that are still on their way into the
/// log; re-reading waits this long after the failure, then for stable end offsets.
const RESYNC_SETTLE: Duration = Duration::from_secs(1);

/// How long one attempt to see the log settle may take. A log that cannot answer
/// (a broker outage) gets the waiting appends a 503 after this, not after the
/// client gave up; the next appends or tick try again.
const RESYNC_PROBE: Duration = Duration::from_secs(2);

struct WriterLoop {
    log: Arc<dyn EventLog>,
    config: WriterConfig,
    partitions: u32,
    heads_partitions: u32,
    heads: HashMap<String, Head>,
    ids: IdIndex,
    /// Per events partition: every record below this offset is folded in.
    next_offsets: Vec<u64>,
    dirty: HashSet<String>,
    since_snapshot: u64,
    snapshot_checkpoints: Vec<u64>,
    /// Set by a failed append until a tail scan has repaired the heads.
    failed_at: Option<Instant>,
    healthy: Arc<AtomicBool>,
}

fn unavailable(e: &LogError) -> ApiError {
    ApiError::LogUnavailable {
        message: format!(
            "the event log did not confirm the write ({e}); retry with the same event ids"
        ),
        retry_after: 2,
    }
}

impl WriterLoop {
    async fn recover(log: Arc<dyn EventLog>, config: WriterConfig) -> anyhow::Result<Self> {
        let started = Instant::now();
        info!(topic = %config.events_topic, "recovering stream heads from the log");
        let missing = |t: &str| anyhow::anyhow!("topic {t} does not exist: run `refold migrate`");
        let partitions = log
            .describe_topic(&config.events_topic)
            .await?
            .ok_or_else(|| missing(&config.events_topic))?
            .partitions;
        let heads_partitions = log
            .describe_topic(&config.heads_topic)
            .await?
            .ok_or_else(|| missing(&config.heads_topic))?
            .partitions;
        let mut heads: HashMap<String, Head> = HashMap::new();
        let mut checkpoints = vec![0u64; partitions as usize];
        let heads_ends = log.end_offsets(&config.heads_topic).await?;
        for (hp, end) in heads_ends.into_iter().enumerate() {
            scan(&*log, &config.heads_topic, hp as u32, 0, end, |r| {
                let Some(value) = r.record.value else {
                    return Ok(());
                };
                let bad = |e: serde_json::Error| {
                    LogError::Other(format!("bad stream-heads record {}: {e}", r.record.key))
                };
                if r.record.key.starts_with(CHECKPOINT_PREFIX) {
                    let c: CheckpointRecord = serde_json::from_slice(&value).map_err(bad)?;
                    if let Some(slot) = checkpoints.get_mut(c.partition as usize) {
                        *slot = (*slot).max(c.next_offset);
                    }
                } else {
                    let h: HeadRecord = serde_json::from_slice(&value).map_err(bad)?;
                    let e = heads.entry(h.stream).or_default();
                    if h.head.version >= e.version {
                        *e = h.head;
                    }
                }
                Ok(())
            })
            .await?;
        }
        let snapshot_streams = heads.len();
        // Read from the checkpoints, or further back where the id index needs it:
        // the last `idempotency_window` events (spread over the partitions).
        let ends = log.end_offsets(&config.events_topic).await?;
        let per_partition = config.idempotency_window.div_ceil(partitions as usize) as u64;
        let from: Vec<u64> = checkpoints
            .iter()
            .zip(&ends)
            .map(|(&c, &end)| c.min(end.saturating_sub(per_partition)))
            .collect();
        let mut task = WriterLoop {
            ids: IdIndex::new(config.idempotency_window),
            log,
            partitions,
            heads_partitions,
            heads,
            next_offsets: from,
            dirty: HashSet::new(),
            since_snapshot: 0,
            snapshot_checkpoints: checkpoints,
            failed_at: None,
            healthy: Arc::new(AtomicBool::new(true)),
            config,
        };
        let scanned = task.fold_tail().await?;
        info!(
            streams = task.heads.len(),
            from_snapshot = snapshot_streams,
            events_scanned = scanned,
            ids_remembered = task.ids.map.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "stream heads recovered"
        );
        Ok(task)
    }

    /// Folds every event from `next_offsets` to the end of the log into the heads
    /// and the id index; returns how many were read.
    async fn fold_tail(&mut self) -> Result<u64, LogError> {
        let ends = self.log.end_offsets(&self.config.events_topic).await?;
        let mut scanned = 0;
        for (p, end) in ends.into_iter().enumerate() {
            let from = self.next_offsets[p];
            let (heads, ids, dirty) = (&mut self.heads, &mut self.ids, &mut self.dirty);
            scan(&*self.log, &self.config.events_topic, p as u32, from, end, |r| {
                let Some(value) = r.record.value else {
                    return Ok(());
                };
                let env: Envelope = serde_json::from_slice(&value).map_err(|e| {
                    LogError::Other(format!("bad event record at {p}:{}: {e}", r.offset))
                })?;
                let head = heads.entry(env.stream.clone()).or_default();
                if env.version > head.version {
                    if env.version != head.version + 1 {
                        warn!(stream = %env.stream, found = env.version, head = head.version, "version gap in the log");
                    }
                    *head = Head { version: env.version, offset: r.offset };
                    dirty.insert(env.stream.clone());
                }
                ids.insert(env.id, env.stream.into(), env.version, r.offset);
                scanned += 1;
                Ok(())
            })
            .await?;
            self.next_offsets[p] = self.next_offsets[p].max(end);
        }
        self.since_snapshot += scanned;
        Ok(scanned)
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Job>, mut stop: oneshot::Receiver<()>) {
        let mut tick = tokio::time::interval(self.config.snapshot_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping = false;
        // The batch handed to the log and not yet confirmed. The next batch is
        // planned on top of it and handed to the log before it is confirmed
        // (two in flight at most), so the log never waits for the writer.
        let mut inflight: Option<(Batch, Delivery)> = None;
        loop {
            let first = tokio::select! {
                biased;
                done = async { inflight.as_mut().expect("guarded").1.as_mut().await },
                    if inflight.is_some() => {
                    let (batch, _) = inflight.take().expect("guarded");
                    if self.finish(batch, done).is_none() {
                        self.log.failed().await;
                    }
                    self.snapshot_if_due().await;
                    continue;
                }
                job = rx.recv() => match job {
                    Some(job) => job,
                    None => break,
                },
                _ = &mut stop, if !stopping => {
                    // No new jobs; the queued ones are still received and written.
                    stopping = true;
                    rx.close();
                    continue;
                }
                _ = tick.tick(), if inflight.is_none() => {
                    if self.failed_at.is_some() {
                        self.resync().await;
                    } else {
                        self.snapshot().await;
                    }
                    continue;
                }
            };
            let mut jobs = vec![first];
            let mut events: usize = jobs[0].appends.iter().map(|a| a.events.len()).sum();
            while events < self.config.max_batch_events {
                let Ok(job) = rx.try_recv() else { break };
                events += job.appends.iter().map(|a| a.events.len()).sum::<usize>();
                jobs.push(job);
            }
            // A failure drains what was in flight, so a failed writer has none.
            if self.failed_at.is_some() && !self.resync().await {
                let e = unavailable(&LogError::Unavailable(
                    "the writer is re-reading the log after a failed write".into(),
                ));
                for job in jobs {
                    let _ = job
                        .reply
                        .send(job.appends.iter().map(|_| Err(e.clone())).collect());
                }
                continue;
            }
            let (batch, records) = self.prepare(jobs, inflight.as_ref().map(|(b, _)| b));
            let sent = match self.log.send(records).await {
                Ok(delivery) => Some((batch, delivery)),
                Err(e) => {
                    self.fail(batch, &e, true);
                    None
                }
            };
            if let Some((prior, delivery)) = inflight.take() {
                let done = delivery.await;
                match self.finish(prior, done) {
                    Some(offsets) => {
                        inflight = sent.map(|(mut b, d)| {
                            b.prior_offsets = offsets;
                            (b, d)
                        });
                    }
                    None => {
                        // Planned on top of a batch that failed: whatever it
                        // wrote is re-read with the rest (503, retry with the
                        // same ids).
                        if let Some((batch, delivery)) = sent {
                            let _ = delivery.await;
                            // Its refusals were decided against heads that may
                            // never exist: they get the 503 too.
                            self.fail(
                                batch,
                                &LogError::Unavailable("the write before it failed".into()),
                                false,
                            );
                        }
                    }
                }
            } else {
                inflight = sent;
            }
            if self.failed_at.is_some() {
                // Failed in this round (a failed writer first re-reads the log):
                // nothing is in flight any more.
                self.log.failed().await;
            }
            self.snapshot_if_due().await;
        }
        if let Some((batch, delivery)) = inflight.take() {
            let done = delivery.await;
            if self.finish(batch, done).is_none() {
                self.log.failed().await;
            }
        }
        if self.failed_at.is_none() {
            self.snapshot().await;
        }
        if let Err(e) = self.log.flush().await {
            warn!(error = %e, "flushing the event log at shutdown failed");
        }
        info!("write path stopped");
    }

    async fn snapshot_if_due(&mut self) {
        if self.failed_at.is_none() && self.since_snapshot >= self.config.snapshot_every {
            self.snapshot().await;
        }
    }

    /// After a failed append: wait for the log to settle, then fold in whatever
    /// of the failed batch did land. True when the writer may write again.
    async fn resync(&mut self) -> bool {
        let Some(failed_at) = self.failed_at else {
            return true;
        };
        tokio::time::sleep(RESYNC_SETTLE.saturating_sub(failed_at.elapsed())).await;
        let settled = async {
            let a = self.log.end_offsets(&self.config.events_topic).await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let b = self.log.end_offsets(&self.config.events_topic).await?;
            if a != b {
                return Err(LogError::Unavailable(
                    "the log is still taking writes in".into(),
                ));
            }
            Ok(())
        };
        let probe = tokio::time::timeout(RESYNC_PROBE, settled)
            .await
            .unwrap_or_else(|_| Err(LogError::Unavailable("the log does not answer".into())));
        if let Err(e) = probe {
            warn!(error = %e, "write path cannot re-read the log yet");
            return false;
        }
        match self.fold_tail().await {
            Ok(n) => {
                info!(events_found = n, "write path resynchronised with the log");
                self.failed_at = None;
                self.healthy.store(true, Ordering::Relaxed);
                true
            }
            Err(e) => {
                warn!(error = %e, "write path cannot re-read the log yet");
                false
            }
        }
    }

    /// Decides one batch of jobs on top of `prior` (the batch still in
    /// flight, as if it succeeded); its records for the log.
    fn prepare(&self, jobs: Vec<Job>, prior: Option<&Batch>) -> (Batch, Vec<ProduceRecord>) {
        let mut staged: HashMap<Arc<str>, Head> = HashMap::new();
        let mut pending: HashMap<Uuid, (Arc<str>, u64, usize)> = HashMap::new();
        let mut records = Vec::new();
        let mut plans: Vec<Vec<Plan>> = Vec::with_capacity(jobs.len());
        // One clock reading: the record timestamp and recorded_at agree.
        let timestamp_ms = now_ms();
        let recorded_at = rfc3339(timestamp_ms);
        // Tickets stay held (memory stays accounted for) until the reply is sent.
        let mut replies = Vec::with_capacity(jobs.len());
        for Job {
            appends,
            reply,
            _ticket,
        } in jobs
        {
            let mut job_plans = Vec::with_capacity(appends.len());
            for a in appends {
                let plan = self.plan(
                    a,
                    prior,
                    &mut staged,
                    &mut pending,
                    &mut records,
                    &recorded_at,
                    timestamp_ms,
                );
                job_plans.push(plan);
            }
            plans.push(job_plans);
            replies.push((reply, _ticket));
        }
        let batch = Batch {
            staged,
            pending,
            plans,
            replies,
            started: Instant::now(),
            prior_offsets: Vec::new(),
        };
        (batch, records)
    }

    /// Answers a batch the log did not confirm (503; what it refused keeps its
    /// answer when `keep_refusals`) and stops writing until the log is re-read.
    fn fail(&mut self, batch: Batch, e: &LogError, keep_refusals: bool) {
        warn!(error = %e, "append failed; re-reading the log before the next write");
        self.failed_at = Some(Instant::now());
        self.healthy.store(false, Ordering::Relaxed);
        let err = unavailable(e);
        for ((reply, _ticket), job_plans) in batch.replies.into_iter().zip(batch.plans) {
            let results = job_plans
                .into_iter()
                .map(|p| match p {
                    Plan::Refused(e) if keep_refusals => Err(e),
                    _ => Err(err.clone()),
                })
                .collect();
            let _ = reply.send(results);
        }
    }

    /// Commits and answers a batch the log confirmed (its offsets, for the batch
    /// planned on top of it), or fails it (`None`).
    fn finish(&mut self, batch: Batch, delivered: LogResult<Vec<u64>>) -> Option<Vec<u64>> {
        let offsets = match delivered {
            Ok(offsets) => offsets,
            Err(e) => {
                self.fail(batch, &e, true);
                return None;
            }
        };
        let Batch {
            mut staged,
            pending,
            plans,
            replies,
            started,
            prior_offsets,
        } = batch;
        // What was staged becomes the truth, with the offsets now known.
        for (id, (stream, version, record)) in pending {
            self.ids.insert(id, stream, version, offsets[record]);
        }
        let mut written = 0u64;
        for plan in plans.iter().flatten() {
            if let Plan::Fresh {
                stream,
                records: range,
                ..
            } = plan
            {
                let last = offsets[range.end - 1];
                let p = partition_for(stream, self.partitions) as usize;
                self.next_offsets[p] = self.next_offsets[p].max(last + 1);
                let head = staged.get_mut(stream).expect("staged");
                head.offset = last;
                self.heads.insert(stream.to_string(), *head);
                self.dirty.insert(stream.to_string());
                written += range.len() as u64;
            }
        }
        // Streams that only saw refused or repeated appends keep their heads (and
        // a stream never written stays unknown: no phantom heads).
        self.since_snapshot += written;
        let append_took = started.elapsed();
        self.config.metrics.log_append(written, append_took);
        debug!(
            jobs = replies.len(),
            events = written,
            append_ms = append_took.as_secs_f64() * 1e3,
            "batch durable"
        );
        for ((reply, _ticket), job_plans) in replies.into_iter().zip(plans) {
            let results = job_plans
                .into_iter()
                .map(|p| self.answer(p, &offsets, &prior_offsets))
                .collect();
            let _ = reply.send(results);
        }
        Some(offsets)
    }

    /// Where an id already is: written earlier, in the batch in flight, or
    /// earlier in this batch.
    fn seen(
        &self,
        prior: Option<&Batch>,
        pending: &HashMap<Uuid, (Arc<str>, u64, usize)>,
        id: &Uuid,
    ) -> Option<(Arc<str>, u64, At)> {
        if let Some((s, v, r)) = pending.get(id) {
            return Some((s.clone(), *v, At::Record(*r)));
        }
        if let Some((s, v, r)) = prior.and_then(|b| b.pending.get(id)) {
            return Some((s.clone(), *v, At::Prior(*r)));
        }
        self.ids
            .map
            .get(id)
            .map(|(s, v, o)| (s.clone(), *v, At::Offset(*o)))
    }

    /// Decides one append against the staged heads; pushes its records.
    #[allow(clippy::too_many_arguments)]
    fn plan(
        &self,
        a: AppendInput,
        prior: Option<&Batch>,
        staged: &mut HashMap<Arc<str>, Head>,
        pending: &mut HashMap<Uuid, (Arc<str>, u64, usize)>,
        records: &mut Vec<ProduceRecord>,
        recorded_at: &str,
        timestamp_ms: i64,
    ) -> Plan {
        let stream: Arc<str> = match staged.get_key_value(a.stream.as_str()) {
            Some((s, _)) => s.clone(),
            None => {
                let s: Arc<str> = a.stream.as_str().into();
                let head = prior
                    .and_then(|b| b.staged.get(a.stream.as_str()))
                    .or_else(|| self.heads.get(&a.stream))
                    .copied()
                    .unwrap_or_default();
                staged.insert(s.clone(), head);
                s
            }
        };
        let ids: Vec<Uuid> = a.events.iter().map(|e| e.id).collect();

        // Idempotency first: a retry of an append that succeeded must not meet its
        // own expected_version check. A repeat is exact: every id known, in this
        // stream, at consecutive versions in request order. Anything else that
        // reuses a known id is refused, never half-applied.
        let seen: Vec<Option<(Arc<str>, u64, At)>> =
            ids.iter().map(|id| self.seen(prior, pending, id)).collect();
        if let Some(i) = seen.iter().position(Option::is_some) {
            let first = seen[0].as_ref().map(|(_, v, _)| *v);
            let exact = first.is_some_and(|first| {
                seen.iter().enumerate().all(|(i, s)| {
                    s.as_ref()
                        .is_some_and(|(s, v, _)| **s == *stream && *v == first + i as u64)
                })
            });
            if let (true, Some(first), Some(Some((_, _, last)))) = (exact, first, seen.last()) {
                return Plan::Repeat {
                    stream,
                    first,
                    ids,
                    last: *last,
                };
            }
            let (other, v, _) = seen[i].as_ref().expect("position found it");
            return Plan::Refused(ApiError::DuplicateEventId(format!(
                "event {} is already in stream {other} at version {v}, and this request is not an exact repeat of the append that wrote it; give new events new ids",
                ids[i]
            )));
        }
        let head = staged.get_mut(&stream).expect("staged above");
        if let Some(expected) = a.expected_version
            && expected != head.version
        {
            return Plan::Refused(ApiError::WrongExpectedVersion {
                stream: a.stream,
                expected,
                actual: head.version,
            });
        }

        // Serialise first: an append whose event is too big for the log is refused
        // whole, before it can touch the head or fail the batch it shares.
        let first = head.version + 1;
        let mut values = Vec::with_capacity(a.events.len());
        for (i, e) in a.events.into_iter().enumerate() {
            let env = Envelope {
                id: e.id,
                stream: a.stream.clone(),
                version: first + i as u64,
                event_type: e.event_type,
                data: e.data,
                metadata: e.metadata,
                recorded_at: recorded_at.to_owned(),
            };
            let value = serde_json::to_vec(&env).expect("envelope serialises");
            let size = value.len() + env.key().len();
            if size > MAX_RECORD_BYTES {
                return Plan::Refused(ApiError::RecordTooLarge {
                    index: i,
                    size,
                    limit: MAX_RECORD_BYTES,
                });
            }
            values.push((env, value));
        }
        let partition = partition_for(&stream, self.partitions);
        let start = records.len();
        for (env, value) in values {
            pending.insert(env.id, (stream.clone(), env.version, records.len()));
            records.push(ProduceRecord {
                topic: self.config.events_topic.clone(),
                partition,
                record: Record {
                    key: env.key(),
                    value: Some(value),
                    headers: vec![(TYPE_HEADER.into(), env.event_type.into_bytes())],
                    timestamp_ms,
                },
            });
        }
        head.version = first + ids.len() as u64 - 1;
        Plan::Fresh {
            stream,
            first,
            ids,
            records: start..records.len(),
        }
    }

    fn answer(&self, plan: Plan, offsets: &[u64], prior_offsets: &[u64]) -> AppendResult {
        let (stream, first, ids, offset, created) = match plan {
            Plan::Refused(e) => return Err(e),
            Plan::Fresh {
                stream,
                first,
                ids,
                records,
            } => (stream, first, ids, offsets[records.end - 1], true),
            Plan::Repeat {
                stream,
                first,
                ids,
                last,
            } => {
                let offset = match last {
                    At::Offset(o) => o,
                    At::Record(r) => offsets[r],
                    At::Prior(r) => prior_offsets[r],
                };
                (stream, first, ids, offset, false)
            }
        };
        let partition = partition_for(&stream, self.partitions);
        let events: Vec<EventRef> = ids
            .into_iter()
            .enumerate()
            .map(|(i, id)| EventRef {
                id,
                version: first + i as u64,
            })
            .collect();
        Ok(Appended {
            last_version: first + events.len() as u64 - 1,
            stream: stream.to_string(),
            first_version: first,
            position: Position::at(partition, offset),
            events,
            created,
        })
    }

    /// Writes the changed heads, then the checkpoints they make true.
    async fn snapshot(&mut self) {
        if self.dirty.is_empty() && self.snapshot_checkpoints == self.next_offsets {
            return;
        }
        let topic = &self.config.heads_topic;
        let now = now_ms();
        let record = |key: String, partition: u32, value: Vec<u8>| ProduceRecord {
            topic: topic.clone(),
            partition,
            record: Record {
                key,
                value: Some(value),
                headers: vec![],
                timestamp_ms: now,
            },
        };
        let heads: Vec<ProduceRecord> = self
            .dirty
            .iter()
            .map(|s| {
                let value = HeadRecord {
                    stream: s.clone(),
                    head: self.heads[s],
                };
                record(
                    s.clone(),
                    partition_for(s, self.heads_partitions),
                    serde_json::to_vec(&value).expect("json"),
                )
            })
            .collect();
        let checkpoints: Vec<ProduceRecord> = self
            .next_offsets
            .iter()
            .enumerate()
            .map(|(p, &next_offset)| {
                let value = CheckpointRecord {
                    partition: p as u32,
                    next_offset,
                };
                record(
                    format!("{CHECKPOINT_PREFIX}{p}"),
                    p as u32 % self.heads_partitions,
                    serde_json::to_vec(&value).expect("json"),
                )
            })
            .collect();
        let n = heads.len();
        // Heads first: a checkpoint must never claim heads that are not written.
        // Through `send`, which leaves the log's producer alone on failure: an
        // events batch may be in flight on it, and a fresh producer would not
        // keep the next batch behind that one. The next snapshot retries.
        let write = |records: Vec<ProduceRecord>| async {
            match self.log.send(records).await {
                Ok(delivery) => delivery.await,
                Err(e) => Err(e),
            }
        };
        let result = match write(heads).await {
            Ok(_) => write(checkpoints).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(_) => {
                debug!(heads = n, "stream heads snapshot written");
                self.dirty.clear();
                self.since_snapshot = 0;
                self.snapshot_checkpoints = self.next_offsets.clone();
            }
            Err(e) => warn!(error = %e, "writing the stream heads snapshot failed; will retry"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_index_forgets_the_oldest_first() {
        let mut ix = IdIndex::new(3);
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
        for (i, id) in ids.iter().enumerate() {
            ix.insert(*id, "s".into(), i as u64 + 1, i as u64);
        }
        ix.insert(ids[4], "s".into(), 5, 4); // re-inserting does not count twice
        assert_eq!(ix.map.len(), 3);
        assert!(!ix.map.contains_key(&ids[1]));
        assert_eq!(ix.map[&ids[2]].1, 3);
    }
}
