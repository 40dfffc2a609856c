//! The projection engine: workers that fold the log into read models, replays
//! that rebuild them beside the live ones, and the status of it all.
//!
//! Workers. Each generation of a projection runs one worker per partition of the
//! events topic. A worker owns its position: it reads the checkpoint from the store
//! (never a consumer-group commit), reads a micro-batch from the log, folds it
//! ([`super::fold`]) and commits effects and checkpoint in one atomic step
//! ([`super::store::Session::commit`]). A crash between batches loses nothing and applies
//! nothing twice (I6). A batch is what the log holds when the worker reads (so
//! batches grow while a commit is slow, and a hot key is written once per batch).
//! A reader task per worker reads and decodes the next batch while the worker
//! folds and commits, when the log holds more than a batch (a replay, a backlog);
//! large batches are decoded and folded on the blocking pool, off the threads
//! that serve HTTP. Events of types a definition has no operations for are
//! skipped unparsed, by the record's `type` header. With a backlog, a worker
//! folds the reads that follow its batch into the same commit, up to `batch`
//! events, while the fold buffer shared by every worker (`fold_buffer`) has room
//! for their records.
//! Document projections are paced besides: each commit is a new segment to
//! refresh and merge (Elasticsearch, tantivy), so a worker that committed less
//! than `commit_interval` ago gathers what arrives until then into the same batch
//! (up to `batch` events and 1.5 × [`READ_BATCH_BYTES`]); an idle worker commits
//! an arriving event at once. When the commit finds a checkpoint it did not expect, the
//! worker was fenced (another process moved the partition on, or the store lost its
//! data): it applies nothing, re-reads the checkpoint and resumes from there, from
//! offset 0 if the checkpoint is gone, which rebuilds what the store lost. An idle
//! worker checks its checkpoint every few seconds for the same reason.
//!
//! Replay (I7). A replay writes generation N+1 from offset 0 while N keeps serving
//! and keeps following the log. When N+1 has reached the log's end as it was when
//! the replay began, N's workers stop, N+1 catches up to where N stopped (so reads
//! never go back in time), the meta record is switched in one write, and N is
//! dropped once the queries still reading it have finished. A bumped `version` in a
//! definition file starts the same replay at start-up; an unfinished replay resumes
//! from its checkpoints after a restart.
//!
//! Read-your-writes (I10). Each generation publishes the offsets it has applied;
//! [`Generation::wait_for`] waits until a position token is covered.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::def::StoreKind;
use super::def::{self, DefError, Definition};
use super::fold::{self, DocReads, Effects, Input};
use super::store::doc::{IndexSpec, Specs};
use super::store::{Commit, GenInfo, GenRef, Meta, ReadStore, Session, Store, StoreError, Stores};
use crate::error::ApiError;
use crate::event::{Envelope, TYPE_HEADER};
use crate::log::{ConsumedRecord, EventLog, READ_BATCH_BYTES};
use crate::metrics::Metrics;
use crate::position::Position;

/// How long a worker waits on an empty partition before it looks again.
const POLL_WAIT: Duration = Duration::from_millis(200);
/// How often an idle worker checks that its checkpoint is still there.
const IDLE_CHECK: Duration = Duration::from_secs(2);
/// Pause before a worker retries after an error.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// How long a switch waits for the new generation to reach where the old stopped.
const SWITCH_CATCH_UP: Duration = Duration::from_secs(30);
/// Window of the events/s figures.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// Loads every `*.toml` of `dir`, sorted by name. A missing directory is no
/// projections; any bad file fails the whole load with its file, line and reason.
pub fn load_dir(dir: &Path) -> Result<Vec<Definition>, DefError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files.iter().map(|f| load_file(f)).collect()
}

pub fn load_file(file: &Path) -> Result<Definition, DefError> {
    if file == Path::new(super::history::FILE) {
        return Ok(super::history::definition());
    }
    let source = std::fs::read_to_string(file).map_err(|e| DefError {
        file: file.display().to_string(),
        line: 0,
        reason: format!("cannot read: {e}"),
    })?;
    def::parse(file, &source)
}

/// What the workers share.
struct Ctx {
    log: Arc<dyn EventLog>,
    topic: String,
    partitions: u32,
    batch: usize,
    commit_interval: Duration,
    /// Bytes of records that workers with a backlog may fold, all together, into
    /// commits beyond each commit's first read (I9).
    fold_buffer: tokio::sync::Semaphore,
    metrics: Arc<Metrics>,
    /// Set at shutdown: replays stop without being dropped, to resume at start.
    shutting_down: AtomicBool,
}

/// Events/s over the last [`RATE_WINDOW`].
#[derive(Default)]
struct Rate(VecDeque<(Instant, u64)>);

impl Rate {
    fn record(&mut self, total: u64) {
        let now = Instant::now();
        self.0.push_back((now, total));
        while self.0.len() > 2 && self.0.front().is_some_and(|(t, _)| now - *t > RATE_WINDOW) {
            self.0.pop_front();
        }
    }

    fn per_sec(&self) -> f64 {
        match (self.0.front(), self.0.back()) {
            (Some((t0, n0)), Some((t1, n1))) if t1 > t0 && t1.elapsed() < RATE_WINDOW => {
                (n1 - n0) as f64 / (*t1 - *t0).as_secs_f64()
            }
            _ => 0.0,
        }
    }
}

/// One generation of a projection, with its running workers.
pub struct Generation {
    pub info: GenInfo,
    pub id: GenRef,
    pub def: Arc<Definition>,
    store: Arc<dyn Store>,
    /// Next offset to read per partition, as committed.
    applied: watch::Sender<Vec<u64>>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Records folded by this process (all types, for rates and progress).
    records: AtomicU64,
    /// Store writes (batches committed with their checkpoint) by this process.
    commits: AtomicU64,
    rate: Mutex<Rate>,
    failed: Mutex<Option<String>>,
}

impl Generation {
    fn start(
        ctx: &Arc<Ctx>,
        store: Arc<dyn Store>,
        info: GenInfo,
        def: Arc<Definition>,
    ) -> Arc<Self> {
        let g = Arc::new(Generation {
            id: GenRef {
                projection: def.name.clone(),
                generation: info.generation,
            },
            info,
            def,
            store,
            applied: watch::channel(vec![0; ctx.partitions as usize]).0,
            stop: watch::channel(false).0,
            tasks: Mutex::new(Vec::new()),
            records: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            rate: Mutex::new(Rate::default()),
            failed: Mutex::new(None),
        });
        let tasks = (0..ctx.partitions)
            .map(|p| tokio::spawn(worker(ctx.clone(), g.clone(), p)))
            .collect();
        *g.tasks.lock().unwrap() = tasks;
        g
    }

    /// Stops the workers and waits for them (a batch in flight finishes first).
    async fn halt_workers(&self) {
        self.stop.send_replace(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap());
        for t in tasks {
            let _ = t.await;
        }
    }

    pub fn applied(&self) -> Vec<u64> {
        self.applied.borrow().clone()
    }

    pub fn failure(&self) -> Option<String> {
        self.failed.lock().unwrap().clone()
    }

    /// Waits until every offset of `pos` is applied; `false` on timeout.
    pub async fn wait_for(&self, pos: &Position, timeout: Duration) -> bool {
        let covered = |applied: &Vec<u64>| {
            pos.entries()
                .all(|(p, o)| applied.get(p as usize).is_some_and(|a| *a > o))
        };
        let mut rx = self.applied.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if covered(&rx.borrow_and_update()) {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return covered(&rx.borrow()),
            }
        }
    }

    /// A batch of `n` records committed.
    fn committed(&self, n: u64) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        let total = self.records.fetch_add(n, Ordering::Relaxed) + n;
        self.rate.lock().unwrap().record(total);
    }

    fn per_sec(&self) -> f64 {
        self.rate.lock().unwrap().per_sec()
    }
}

/// The record as fold input; `None` for a tombstone (an erased event, I5), which
/// projections skip: erasure is deliberate, not bad input. Also `None`, without
/// parsing it, for an event of a type the projection has no operations for,
/// known from the record's `type` header (refold's writer sets it on every
/// event): the fold would skip the event anyway.
fn decode(r: ConsumedRecord, def: &Definition) -> Option<Input> {
    let event_type = r
        .record
        .headers
        .iter()
        .find(|(name, _)| name == TYPE_HEADER);
    if let Some((_, t)) = event_type
        && std::str::from_utf8(t).is_ok_and(|t| def.ops_for(t).is_none())
    {
        return None;
    }
    let event = serde_json::from_slice::<Envelope>(r.record.value.as_deref()?)
        .map_err(|e| format!("not an event envelope: {e}"));
    Some(Input {
        partition: r.partition,
        offset: r.offset,
        event,
    })
}

/// Why a worker's inner loop ended.
enum Restart {
    Stop,
    Again,
}

async fn worker(ctx: Arc<Ctx>, g: Arc<Generation>, partition: u32) {
    let mut stop = g.stop.subscribe();
    loop {
        if *stop.borrow() {
            return;
        }
        match run_partition(&ctx, &g, partition, &mut stop).await {
            Ok(Restart::Stop) => return,
            Ok(Restart::Again) => {}
            Err(e) => {
                warn!(projection = %g.id, partition, error = %e, "projection worker error; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_PAUSE) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

/// A read of the log, decoded: what the worker folds.
struct Decoded {
    inputs: Vec<Input>,
    /// Records read, tombstones included.
    count: usize,
    bytes: usize,
    last: Option<u64>,
    next_offset: u64,
    /// The last read stopped at its limits, not at the end of the log: the log
    /// held more (a replay, a backlog).
    full: bool,
}

impl Decoded {
    /// Appends the read that followed this one.
    fn extend(&mut self, more: Decoded) {
        self.count += more.count;
        self.bytes += more.bytes;
        self.last = more.last.or(self.last);
        self.next_offset = more.next_offset;
        self.full = more.full;
        self.inputs.extend(more.inputs);
    }
}

/// What a partition's reader has read and decoded and its worker has not taken
/// yet: at most `batch` events and [`READ_BATCH_BYTES`] (I9).
struct Ahead {
    slot: Mutex<Option<anyhow::Result<Decoded>>>,
    /// The reader filled the slot.
    filled: tokio::sync::Notify,
    /// The worker emptied it.
    taken: tokio::sync::Notify,
    /// The worker waits for a read (it found the slot empty).
    waiting: AtomicBool,
    wanted: tokio::sync::Notify,
}

/// Reads and decodes a partition ahead of its worker, so that the next batch is
/// read and parsed while the current one is folded and committed (two cores at
/// work instead of one) when the log holds more than a batch (a replay, a
/// backlog). Reads that arrive while the worker is busy join the one waiting for
/// it, so the worker takes everything read so far: as before, batches grow while
/// a commit is slow. At the end of the log the reader reads when the worker asks
/// for its next batch. Ends when the returned guard is dropped.
fn read_ahead(
    mut reader: Box<dyn crate::log::PartitionReader>,
    def: Arc<Definition>,
    max: usize,
) -> (Arc<Ahead>, AbortOnDrop) {
    let ahead = Arc::new(Ahead {
        slot: Mutex::new(None),
        filled: tokio::sync::Notify::new(),
        taken: tokio::sync::Notify::new(),
        waiting: AtomicBool::new(false),
        wanted: tokio::sync::Notify::new(),
    });
    let shared = ahead.clone();
    let task = tokio::spawn(async move {
        loop {
            let read = match reader.next(max, POLL_WAIT).await {
                Ok(batch) => {
                    let def = def.clone();
                    Ok(off_the_runtime(batch.records.len(), move || {
                        let count = batch.records.len();
                        let bytes = batch.records.iter().map(|r| r.record.size()).sum();
                        Decoded {
                            count,
                            bytes,
                            last: batch.records.last().map(|r| r.offset),
                            next_offset: batch.next_offset,
                            full: count >= max || bytes >= READ_BATCH_BYTES,
                            inputs: batch
                                .records
                                .into_iter()
                                .filter_map(|r| decode(r, &def))
                                .collect(),
                        }
                    })
                    .await)
                }
                Err(e) => Err(e.into()),
            };
            let failed = read.is_err();
            // A read that stopped short of its limits reached the end of the log:
            // the next one waits until the worker asks for it, so that what
            // arrives while the worker folds and commits makes its next batch,
            // as it would without a reader (reading at once would hand it one
            // event at a time, and as many commits).
            let ahead_of_worker = read.as_ref().is_ok_and(|d| d.full);
            let mut read = Some(read);
            while let Some(r) = read.take() {
                let taken = shared.taken.notified();
                {
                    let mut slot = shared.slot.lock().unwrap();
                    match (slot.as_mut(), r) {
                        (None, r) => *slot = Some(r),
                        (Some(Ok(ready)), Ok(more))
                            if ready.count + more.count <= max
                                && ready.bytes + more.bytes <= READ_BATCH_BYTES =>
                        {
                            ready.extend(more)
                        }
                        // Full (or holding an error): wait until the worker took it.
                        (Some(_), r) => read = Some(r),
                    }
                }
                if read.is_some() {
                    taken.await;
                } else {
                    shared.filled.notify_one();
                }
            }
            if failed {
                return;
            }
            if !ahead_of_worker {
                loop {
                    let wanted = shared.wanted.notified();
                    if shared.waiting.swap(false, Ordering::AcqRel) {
                        break;
                    }
                    wanted.await;
                }
            }
        }
    });
    (ahead, AbortOnDrop(task))
}

impl Ahead {
    /// Everything read so far, waiting for the next read when there is none.
    async fn take(&self) -> anyhow::Result<Decoded> {
        loop {
            let filled = self.filled.notified();
            if let Some(read) = self.slot.lock().unwrap().take() {
                self.taken.notify_one();
                return read;
            }
            self.waiting.store(true, Ordering::Release);
            self.wanted.notify_one();
            filled.await;
        }
    }
}

/// Batches from this many events up are decoded and folded on the blocking pool.
const OFFLOAD_FROM: usize = 64;

/// Runs CPU-bound work on a batch of `events`: on the blocking pool when the batch
/// is large, so that the runtime's threads (which serve HTTP too) are not held for
/// milliseconds; in place when it is small, where the hand-off would cost more.
async fn off_the_runtime<T: Send + 'static>(
    events: usize,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    if events < OFFLOAD_FROM {
        return work();
    }
    match tokio::task::spawn_blocking(work).await {
        Ok(out) => out,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Aborts a task when dropped (a worker's reader, when the worker returns).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn run_partition(
    ctx: &Ctx,
    g: &Generation,
    partition: u32,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<Restart> {
    let mut session = g.store.session(&g.id, partition).await?;
    let mut expected = session.checkpoint().await?;
    let mut next = expected.unwrap_or(0);
    g.applied.send_modify(|a| a[partition as usize] = next);
    let reader = ctx.log.reader(&ctx.topic, partition, next).await?;
    let (ahead, _reading) = read_ahead(reader, g.def.clone(), ctx.batch);
    // A read that did not fit into the batch before: the next batch starts with it.
    let mut held: Option<Decoded> = None;
    let mut checked = Instant::now();
    // When this worker last committed (the first batch commits at once).
    let mut committed: Option<Instant> = None;
    loop {
        let mut batch = match held.take() {
            Some(b) => b,
            None => tokio::select! {
                b = ahead.take() => b?,
                _ = stop.changed() => return Ok(Restart::Stop),
            },
        };
        if *stop.borrow() {
            return Ok(Restart::Stop);
        }
        if batch.count == 0 {
            if checked.elapsed() >= IDLE_CHECK {
                checked = Instant::now();
                let found = session.checkpoint().await?;
                if found != expected {
                    fenced(g, partition, expected, found);
                    return Ok(Restart::Again);
                }
            }
            continue;
        }
        // A document projection under load (its last commit was less than
        // `commit_interval` ago): what arrives until then joins this batch.
        let gather_until = committed
            .filter(|_| g.def.store == StoreKind::Elasticsearch)
            .map(|c| c + ctx.commit_interval);
        // A read returns up to READ_BATCH_BYTES: gathering stops at half of it,
        // so a batch holds less than 1.5 times that (I9), and at `batch` events.
        while batch.count < ctx.batch && batch.bytes < READ_BATCH_BYTES / 2 {
            let wait = gather_until.map_or(Duration::ZERO, |t| {
                t.saturating_duration_since(Instant::now())
            });
            if wait.is_zero() {
                break;
            }
            let more = tokio::select! {
                b = tokio::time::timeout(wait, ahead.take()) => match b {
                    Ok(more) => more?,
                    Err(_) => break,
                },
                _ = stop.changed() => return Ok(Restart::Stop),
            };
            if batch.count + more.count > ctx.batch {
                held = Some(more);
                break;
            }
            batch.extend(more);
        }
        let inputs = std::mem::take(&mut batch.inputs);
        let mut fx = fold_read(&mut *session, g, inputs, Effects::default()).await?;
        // With a backlog (a replay, a restart) the worker folds the reads that
        // follow into the same effects, up to `batch` events, while the fold
        // buffer shared by all workers has room for their records: one commit
        // then writes a key once for all of them. What it holds meanwhile is
        // effects, not events; the room is given back after the commit. At the
        // end of the log it commits at once.
        let mut lent: Option<tokio::sync::SemaphorePermit<'_>> = None;
        while batch.full && fx.halted_at.is_none() && batch.count < ctx.batch {
            let mut more = tokio::select! {
                b = ahead.take() => b?,
                _ = stop.changed() => return Ok(Restart::Stop),
            };
            let room = u32::try_from(more.bytes)
                .ok()
                .filter(|_| batch.count + more.count <= ctx.batch)
                .and_then(|n| ctx.fold_buffer.try_acquire_many(n).ok());
            let Some(room) = room else {
                held = Some(more);
                break;
            };
            match &mut lent {
                Some(l) => l.merge(room),
                None => lent = Some(room),
            }
            let inputs = std::mem::take(&mut more.inputs);
            batch.extend(more);
            fx = fold_read(&mut *session, g, inputs, fx).await?;
        }
        let count = batch.count as u64;
        let last = batch.last.unwrap_or(next);
        let upto = batch.next_offset.max(last + 1);
        if let Some(at) = fx.halted_at {
            // Halted here before (and restarted since): its dead letter is recorded.
            let (_, newest) = g.store.dead_letters(&g.id, 16).await?;
            if newest
                .iter()
                .any(|d| (d.partition, d.offset) == (partition, at))
            {
                fx.dead_letters.pop();
            }
        }
        let commit_to = fx.halted_at.unwrap_or(upto);
        let started = Instant::now();
        committed = Some(started);
        let fx = Arc::new(fx);
        let commit = session
            .commit(expected, commit_to, &fx, &g.def.schema)
            .await?;
        // The effects are written: their room in the fold buffer is free again.
        drop(lent);
        match commit {
            Commit::Applied => {
                ctx.metrics.projection_commit(
                    &g.id.projection,
                    g.store.backend(),
                    count,
                    started.elapsed(),
                );
                expected = Some(commit_to);
                next = commit_to;
                checked = Instant::now();
                g.applied.send_modify(|a| a[partition as usize] = next);
                g.committed(count);
                for dl in &fx.dead_letters {
                    warn!(projection = %g.id, partition, offset = dl.offset, reason = %dl.reason, "dead letter");
                }
                if let Some(at) = fx.halted_at {
                    let reason = fx
                        .dead_letters
                        .last()
                        .map(|d| d.reason.clone())
                        .unwrap_or_default();
                    let msg = format!("halted at partition {partition} offset {at}: {reason}");
                    warn!(projection = %g.id, "{msg}");
                    *g.failed.lock().unwrap() = Some(msg);
                    let _ = stop.wait_for(|s| *s).await;
                    return Ok(Restart::Stop);
                }
            }
            Commit::Fenced { found } => {
                fenced(g, partition, expected, found);
                return Ok(Restart::Again);
            }
            Commit::Conflict => {
                // A document moved under us; what is written stays written and is
                // skipped when the batch is read and folded again.
                debug!(projection = %g.id, partition, "document conflict; folding the batch again");
                return Ok(Restart::Again);
            }
        }
    }
}

/// Reads what the fold needs of the keys `inputs` touch (what `doc.` paths read;
/// on a store whose commits may be partial, every document, to skip what it
/// already holds), and folds `inputs` on top of `fx`.
async fn fold_read(
    session: &mut dyn Session,
    g: &Generation,
    inputs: Vec<Input>,
    fx: Effects,
) -> anyhow::Result<Effects> {
    let partial_commits = !g.store.commits_atomically();
    let reads = if !g.def.reads_before_fold(partial_commits) {
        None
    } else {
        let keys = fold::keys_to_read(&g.def, &inputs, partial_commits);
        Some(session.read_fields(&keys, &g.def.doc_reads).await?)
    };
    let def = g.def.clone();
    Ok(off_the_runtime(inputs.len(), move || {
        fold::fold_into(
            fx,
            &def,
            &inputs,
            reads.as_ref().unwrap_or(&DocReads::new()),
        )
    })
    .await)
}

fn fenced(g: &Generation, partition: u32, expected: Option<u64>, found: Option<u64>) {
    match (expected, found) {
        (Some(e), None) => warn!(
            projection = %g.id, partition, checkpoint = e,
            "checkpoint lost (did the store restart without its data?); rebuilding this partition from offset 0"
        ),
        _ => warn!(
            projection = %g.id, partition, ?expected, ?found,
            "checkpoint moved by another worker; resuming from it"
        ),
    }
}

/// A replay in progress (or one that failed, until the next one or a cancel).
struct Replay {
    generation: Arc<Generation>,
    /// End offsets of the log when the replay began: the distance to cover.
    target: Vec<u64>,
    started: Instant,
    cancel: watch::Sender<bool>,
    error: Option<String>,
}

/// A projection: its live generation and, during a replay, the one being built.
pub struct Projection {
    pub name: String,
    /// The index declaration of a document projection (from `migrations/`).
    pub spec: IndexSpec,
    read_store: ReadStore,
    store: Arc<dyn Store>,
    ctx: Arc<Ctx>,
    live: RwLock<Arc<Generation>>,
    replay: tokio::sync::Mutex<Option<Replay>>,
    file: PathBuf,
}

impl Projection {
    /// The generation queries read now.
    pub fn live(&self) -> Arc<Generation> {
        self.live.read().unwrap().clone()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The store by port: rankings on key-value stores, search on document stores.
    pub fn read_store(&self) -> &ReadStore {
        &self.read_store
    }

    /// Starts a replay with the definition file as it is now on disk.
    pub async fn replay(self: &Arc<Self>) -> Result<Value, ApiError> {
        let def = load_file(&self.file).map_err(|e| ApiError::InvalidDefinition(e.to_string()))?;
        if def.name != self.name {
            return Err(ApiError::InvalidDefinition(format!(
                "{} now names projection `{}`",
                self.file.display(),
                def.name
            )));
        }
        let mut slot = self.replay.lock().await;
        if let Some(r) = slot.as_ref().filter(|r| r.error.is_none()) {
            return Err(ApiError::ReplayInProgress(format!(
                "projection {} is already replaying into generation {}; cancel it with DELETE /projections/{}/replay",
                self.name, r.generation.info.generation, self.name
            )));
        }
        let meta = self.store.meta(&self.name).await?;
        let number = [meta.live.as_ref(), meta.building.as_ref()]
            .into_iter()
            .flatten()
            .map(|g| g.generation)
            .max()
            .unwrap_or(0)
            .max(self.live().info.generation)
            + 1;
        let info = GenInfo {
            generation: number,
            version: def.version,
            source: def.source.clone(),
        };
        self.begin_replay(&mut slot, info, Arc::new(def), true)
            .await?;
        Ok(self.replay_status(slot.as_ref().expect("just started")))
    }

    /// Cancels the running replay and drops its generation.
    pub async fn cancel_replay(&self) -> Result<Value, ApiError> {
        let mut slot = self.replay.lock().await;
        let Some(r) = slot.take() else {
            return Err(ApiError::NotFound(format!(
                "projection {} has no replay to cancel",
                self.name
            )));
        };
        r.cancel.send_replace(true);
        r.generation.halt_workers().await;
        self.forget_building(&r.generation).await?;
        info!(projection = %self.name, generation = r.generation.info.generation, "replay cancelled");
        Ok(json!({"projection": self.name, "cancelled_generation": r.generation.info.generation}))
    }

    async fn forget_building(&self, g: &Generation) -> Result<(), StoreError> {
        let mut meta = self.store.meta(&self.name).await?;
        if meta
            .building
            .as_ref()
            .is_some_and(|b| b.generation == g.info.generation)
        {
            meta.building = None;
            self.store.put_meta(&self.name, &meta).await?;
        }
        self.store.drop_generation(&g.id).await
    }

    /// Records `info` as the generation being built, starts its workers and the
    /// monitor that switches over when it has caught up. `fresh`: drop whatever an
    /// earlier attempt left under that number first.
    async fn begin_replay(
        self: &Arc<Self>,
        slot: &mut Option<Replay>,
        info: GenInfo,
        def: Arc<Definition>,
        fresh: bool,
    ) -> Result<(), StoreError> {
        if let Some(old) = slot.take() {
            // A failed replay still shown in the status: clear it away.
            old.generation.halt_workers().await;
            self.forget_building(&old.generation).await?;
        }
        let id = GenRef {
            projection: self.name.clone(),
            generation: info.generation,
        };
        if fresh {
            self.store.drop_generation(&id).await?;
        }
        let mut meta = self.store.meta(&self.name).await?;
        meta.building = Some(info.clone());
        if meta.live.is_none() {
            meta.live = Some(self.live().info.clone());
        }
        self.store.put_meta(&self.name, &meta).await?;
        let target = self
            .ctx
            .log
            .end_offsets(&self.ctx.topic)
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        info!(projection = %self.name, generation = info.generation, version = info.version,
              events = target.iter().sum::<u64>(), "replay started");
        let generation = Generation::start(&self.ctx, self.store.clone(), info, def);
        let cancel = watch::channel(false).0;
        let rx = cancel.subscribe();
        *slot = Some(Replay {
            generation: generation.clone(),
            target: target.clone(),
            started: Instant::now(),
            cancel,
            error: None,
        });
        tokio::spawn(self.clone().monitor(generation, target, rx));
        Ok(())
    }

    /// Watches a replay; switches when it has caught up.
    async fn monitor(
        self: Arc<Self>,
        new: Arc<Generation>,
        target: Vec<u64>,
        mut cancel: watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = cancel.changed() => return,
            }
            if *cancel.borrow() || self.ctx.shutting_down.load(Ordering::SeqCst) {
                return;
            }
            if let Some(e) = new.failure() {
                let mut slot = self.replay.lock().await;
                if let Some(r) = slot.as_mut().filter(|r| Arc::ptr_eq(&r.generation, &new)) {
                    warn!(projection = %self.name, generation = new.info.generation, error = %e, "replay failed; the live generation keeps serving");
                    r.error = Some(e);
                }
                return;
            }
            let live = self.live();
            let (got, old) = (new.applied(), live.applied());
            let caught_up = (0..got.len()).all(|p| got[p] >= target[p].max(old[p]));
            if !caught_up {
                continue;
            }
            let mut slot = self.replay.lock().await;
            if *cancel.borrow()
                || self.ctx.shutting_down.load(Ordering::SeqCst)
                || !slot
                    .as_ref()
                    .is_some_and(|r| Arc::ptr_eq(&r.generation, &new))
            {
                return;
            }
            match self.switch(&live, &new).await {
                Ok(()) => {
                    *slot = None;
                    return;
                }
                Err(e) => {
                    warn!(projection = %self.name, error = %e, "switching generations failed; will retry");
                }
            }
        }
    }

    /// Stops `old`, lets `new` reach where `old` stopped, then switches (I7).
    async fn switch(
        self: &Arc<Self>,
        old: &Arc<Generation>,
        new: &Arc<Generation>,
    ) -> Result<(), StoreError> {
        old.halt_workers().await;
        let final_old = old.applied();
        let mut rx = new.applied.subscribe();
        // Usually a few milliseconds; bounded, since the new generation may halt
        // or stall before it gets there.
        let deadline = Instant::now() + SWITCH_CATCH_UP;
        let reached = loop {
            if rx
                .borrow_and_update()
                .iter()
                .zip(&final_old)
                .all(|(n, o)| n >= o)
            {
                break Ok(());
            }
            if let Some(e) = new.failure() {
                break Err(StoreError::Other(format!("the new generation failed: {e}")));
            }
            if Instant::now() >= deadline {
                break Err(StoreError::Unavailable(format!(
                    "the new generation did not reach the old one's position within {} s",
                    SWITCH_CATCH_UP.as_secs()
                )));
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), rx.changed()).await;
        };
        let meta = Meta {
            live: Some(new.info.clone()),
            building: None,
        };
        let switched = match reached {
            Ok(()) => self.store.put_meta(&self.name, &meta).await,
            Err(e) => Err(e),
        };
        if let Err(e) = switched {
            // Keep serving the old generation, and let it follow the log again.
            let restarted = Generation::start(
                &self.ctx,
                self.store.clone(),
                old.info.clone(),
                old.def.clone(),
            );
            *self.live.write().unwrap() = restarted;
            return Err(e);
        }
        *self.live.write().unwrap() = new.clone();
        info!(projection = %self.name, from = old.info.generation, to = new.info.generation,
              version = new.info.version, "replay caught up; switched generations");
        let (old, store) = (old.clone(), self.store.clone());
        tokio::spawn(async move {
            // Queries still reading the old generation hold an Arc to it.
            let deadline = Instant::now() + Duration::from_secs(60);
            while Arc::strong_count(&old) > 1 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if let Err(e) = store.drop_generation(&old.id).await {
                warn!(generation = %old.id, error = %e, "could not drop the old generation");
            }
        });
        Ok(())
    }

    fn replay_status(&self, r: &Replay) -> Value {
        let got = r.generation.applied();
        let position: u64 = got.iter().zip(&r.target).map(|(g, t)| (*g).min(*t)).sum();
        let total: u64 = r.target.iter().sum();
        let rate = r.generation.per_sec();
        let progress = if total == 0 {
            1.0
        } else {
            position as f64 / total as f64
        };
        let eta = (rate > 0.0).then(|| (total - position) as f64 / rate);
        json!({
            "generation": r.generation.info.generation,
            "version": r.generation.info.version,
            "state": if r.error.is_some() { "failed" } else { "running" },
            "position": position,
            "total": total,
            "progress": progress,
            "events_per_sec": round(rate),
            "eta_secs": eta.map(round),
            "elapsed_secs": round(r.started.elapsed().as_secs_f64()),
            "error": r.error,
        })
    }

    /// The status object of `GET /projections/{name}`.
    pub async fn status(&self) -> Value {
        // The live generation and the replay are read together, under the replay
        // lock: a switch changes both while it holds that lock, so a status never
        // shows the old generation with the replay already gone.
        let (live, replay, replaying) = {
            let slot = self.replay.lock().await;
            (
                self.live(),
                slot.as_ref().map(|r| self.replay_status(r)),
                slot.as_ref().is_some_and(|r| r.error.is_none()),
            )
        };
        let ends = self.ctx.log.end_offsets(&self.ctx.topic).await.ok();
        let applied = live.applied();
        let partitions: Vec<Value> = applied
            .iter()
            .enumerate()
            .map(|(p, pos)| {
                let end = ends.as_ref().and_then(|e| e.get(p)).copied();
                json!({"partition": p, "position": pos, "end": end,
                       "lag": end.map(|e| e.saturating_sub(*pos))})
            })
            .collect();
        let lag: Option<u64> = ends.as_ref().map(|e| {
            e.iter()
                .zip(&applied)
                .map(|(e, a)| e.saturating_sub(*a))
                .sum()
        });
        let (dead_count, recent) = match self.store.dead_letters(&live.id, 5).await {
            Ok((n, r)) => (Some(n), r),
            Err(_) => (None, Vec::new()),
        };
        let failure = live.failure();
        let state = if failure.is_some() {
            "failed"
        } else if replaying {
            "replaying"
        } else {
            "running"
        };
        json!({
            "name": self.name,
            "version": live.info.version,
            "store": live.def.store.as_str(),
            "backend": self.store.backend(),
            "generation": live.info.generation,
            "state": state,
            "partitions": partitions,
            "lag": lag,
            "events": live.records.load(Ordering::Relaxed),
            "commits": live.commits.load(Ordering::Relaxed),
            "events_per_sec": round(live.per_sec()),
            "dead_letters": {"count": dead_count, "recent": recent},
            "error": failure,
            "replay": replay,
        })
    }
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Every projection of the service.
pub struct Engine {
    projections: BTreeMap<String, Arc<Projection>>,
    ctx: Arc<Ctx>,
    specs: Specs,
}

/// The engine's settings.
pub struct EngineConfig {
    pub topic: String,
    pub partitions: u32,
    pub batch: usize,
    /// Under load, the shortest time between two commits of a document
    /// projection's worker.
    pub commit_interval: Duration,
    /// Bytes of records that workers with a backlog may fold, all together, into
    /// their commits beyond each commit's first read.
    pub fold_buffer: usize,
    /// Index declarations of document projections, from `migrations/`.
    pub specs: Specs,
    pub metrics: Arc<Metrics>,
}

impl Engine {
    /// Starts every definition of `defs` on `store`: resumes the live generation,
    /// starts (or resumes) a replay when the version changed.
    pub async fn start(
        log: Arc<dyn EventLog>,
        stores: Stores,
        defs: Vec<Definition>,
        cfg: EngineConfig,
    ) -> anyhow::Result<Self> {
        let ctx = Arc::new(Ctx {
            log,
            topic: cfg.topic,
            partitions: cfg.partitions,
            batch: cfg.batch,
            commit_interval: cfg.commit_interval,
            fold_buffer: tokio::sync::Semaphore::new(
                cfg.fold_buffer.min(tokio::sync::Semaphore::MAX_PERMITS),
            ),
            metrics: cfg.metrics,
            shutting_down: AtomicBool::new(false),
        });
        let mut projections = BTreeMap::new();
        for def in defs {
            let store = match def.store {
                StoreKind::Redis => stores.kv.clone().map(ReadStore::Kv),
                StoreKind::Elasticsearch => stores.docs.clone().map(ReadStore::Doc),
            }
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no {} store for projection {}",
                    def.store.as_str(),
                    def.name
                )
            })?;
            let spec = cfg.specs.get(&def.name).cloned().unwrap_or_default();
            let p = Self::start_one(&ctx, store, spec, def).await?;
            projections.insert(p.name.clone(), p);
        }
        Ok(Self {
            projections,
            ctx,
            specs: cfg.specs,
        })
    }

    async fn start_one(
        ctx: &Arc<Ctx>,
        read_store: ReadStore,
        spec: IndexSpec,
        def: Definition,
    ) -> anyhow::Result<Arc<Projection>> {
        let store = read_store.base();
        let name = def.name.clone();
        let meta = store
            .meta(&name)
            .await
            .map_err(|e| anyhow::anyhow!("projection {name}: {e}"))?;
        let file_info = |generation| GenInfo {
            generation,
            version: def.version,
            source: def.source.clone(),
        };
        let (live_info, live_def) = match meta.live.clone() {
            None => (file_info(1), def.clone()),
            Some(l) if l.version == def.version => {
                if l.source != def.source {
                    warn!(projection = %name, version = def.version,
                          "definition changed without a version bump: new events follow the new definition, existing data stays as built; bump `version` to rebuild");
                }
                (file_info(l.generation), def.clone())
            }
            Some(l) => {
                let old = def::parse(&def.file, &l.source).unwrap_or_else(|e| {
                    warn!(projection = %name, error = %e, "the live generation's stored definition no longer parses; feeding it with the file's");
                    def.clone()
                });
                (l, old)
            }
        };
        let new_meta = Meta {
            live: Some(live_info.clone()),
            building: meta.building.clone(),
        };
        // Written even when unchanged: a document store also points the alias at
        // the live generation here, which a crash may have left behind.
        store
            .put_meta(&name, &new_meta)
            .await
            .map_err(|e| anyhow::anyhow!("projection {name}: {e}"))?;
        let live = Generation::start(ctx, store.clone(), live_info.clone(), Arc::new(live_def));
        let p = Arc::new(Projection {
            name: name.clone(),
            spec,
            read_store,
            store: store.clone(),
            ctx: ctx.clone(),
            live: RwLock::new(live),
            replay: tokio::sync::Mutex::new(None),
            file: def.file.clone(),
        });
        let wanted = live_info.version != def.version;
        let mut slot = p.replay.lock().await;
        match meta.building {
            // Interrupted by the last stop, with the definition the file has now
            // (a version bump, or a replay asked for over HTTP).
            Some(b) if b.version == def.version && b.source == def.source => {
                info!(projection = %name, generation = b.generation, "resuming the replay interrupted by the last stop");
                p.begin_replay(&mut slot, b, Arc::new(def), false).await?;
            }
            building => {
                if let Some(b) = building {
                    warn!(projection = %name, generation = b.generation, version = b.version,
                          "dropping an unfinished replay of a definition the file no longer has");
                    let id = GenRef {
                        projection: name.clone(),
                        generation: b.generation,
                    };
                    store.drop_generation(&id).await?;
                    store
                        .put_meta(
                            &name,
                            &Meta {
                                live: Some(live_info.clone()),
                                building: None,
                            },
                        )
                        .await?;
                }
                if wanted {
                    info!(projection = %name, from = live_info.version, to = def.version, "definition version changed; rebuilding by replay");
                    let number = live_info.generation.max(1) + 1;
                    let info = GenInfo {
                        generation: number,
                        version: def.version,
                        source: def.source.clone(),
                    };
                    p.begin_replay(&mut slot, info, Arc::new(def), true).await?;
                }
            }
        }
        // Generations a crash left behind (between a switch or a cancel and the
        // deletion that follows it): neither live nor being built.
        let building = slot.as_ref().map(|r| r.generation.info.generation);
        drop(slot);
        for g in store.generations(&name).await? {
            if g != live_info.generation && Some(g) != building {
                warn!(projection = %name, generation = g, "dropping a generation left behind by an earlier stop");
                let id = GenRef {
                    projection: name.clone(),
                    generation: g,
                };
                store.drop_generation(&id).await?;
            }
        }
        info!(projection = %name, generation = live_info.generation, version = live_info.version, store = store.backend(), "projection started");
        Ok(p)
    }

    /// The index declarations the engine was started with.
    pub fn specs(&self) -> Specs {
        self.specs.clone()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Projection>> {
        self.projections.get(name)
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Projection>> {
        self.projections.values()
    }

    /// Every projection's status object (`GET /projections`, metrics).
    pub async fn statuses(&self) -> Vec<Value> {
        let mut out = Vec::with_capacity(self.projections.len());
        for p in self.all() {
            out.push(p.status().await);
        }
        out
    }

    /// Projections whose live generation halted.
    pub fn failed(&self) -> Vec<String> {
        self.all()
            .filter(|p| p.live().failure().is_some())
            .map(|p| p.name.clone())
            .collect()
    }

    /// Stops every worker after its batch in flight; replays resume at next start.
    pub async fn stop(&self) {
        self.ctx.shutting_down.store(true, Ordering::SeqCst);
        for p in self.projections.values() {
            if let Some(r) = p.replay.lock().await.as_ref() {
                r.generation.halt_workers().await;
            }
            p.live().halt_workers().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::Record;

    fn record(event_type: Option<&str>, value: &[u8]) -> ConsumedRecord {
        ConsumedRecord {
            partition: 0,
            offset: 7,
            record: Record {
                key: "post-1/1".into(),
                value: Some(value.to_vec()),
                headers: event_type
                    .map(|t| (TYPE_HEADER.to_owned(), t.as_bytes().to_vec()))
                    .into_iter()
                    .collect(),
                timestamp_ms: 0,
            },
        }
    }

    #[test]
    fn events_of_types_without_operations_are_skipped_unparsed() {
        let def = def::parse(
            Path::new("t.toml"),
            "name = \"t\"\nversion = 1\nstore = \"redis\"\nkey = \"data.k\"\n\
             [[on.Liked]]\nop = \"incr\"\nfield = \"n\"\n",
        )
        .unwrap();
        let envelope = br#"{"id":"6f1c1c52-6a3e-4f8e-9d1a-2b7c1f0e4a11","stream":"post-1","version":1,"type":"Liked","data":{"k":"a"},"recorded_at":"2026-01-01T00:00:00Z"}"#;
        // Not parsed at all: not JSON, and no dead letter either.
        assert!(decode(record(Some("Viewed"), b"not json"), &def).is_none());
        let liked = decode(record(Some("Liked"), envelope), &def).unwrap();
        assert_eq!(liked.event.unwrap().event_type, "Liked");
        // A handled type that is not an envelope is still a dead letter, and a
        // record without the header (another producer) is parsed.
        assert!(
            decode(record(Some("Liked"), b"not json"), &def)
                .unwrap()
                .event
                .is_err()
        );
        assert!(
            decode(record(None, b"not json"), &def)
                .unwrap()
                .event
                .is_err()
        );
        assert!(decode(record(None, envelope), &def).unwrap().event.is_ok());
    }
}
