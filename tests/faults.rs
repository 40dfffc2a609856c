//! The fault harness: refold's promises (I1-I10 in DESIGN.md) under faults, with
//! figures.
//!
//! Each case starts refold as users run it (`refold serve` on tansu, Redis and
//! osmem-server), drives demo events at it from concurrent clients that retry as a
//! careful client does (same event ids, after timeouts, 5xx and 429), injects one
//! kind of fault, heals it, settles every unknown outcome by sending that event
//! once more (same id), and then checks against the log itself:
//! - every acknowledged event is in the log exactly once, in its stream, at the
//!   version it was acknowledged with (I1, I4); no valid event is refused; no event
//!   id is in the log twice; every stream's versions are 1..n, in its partition
//!   (I2);
//! - once the projections have applied the whole log, every read model equals an
//!   independent fold of the log (`common::oracle`), with nothing counted twice and
//!   no extra key in Redis (I6), and every poison event is exactly one dead letter
//!   (I8).
//!
//! Every case prints its row of the table (on stderr, which the test harness does
//! not capture) and appends it to `target/fault-report.md`.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::backends::{Broker, PrivateRedis};
use common::es_proxy::{BulkFault, EsProxy, es_remove_namespace};
use common::models::{Api, Diffs, model_diffs};
use common::oracle::Oracle;
use common::{Proc, free_port, redis_remove_namespace, unique};
use refold::demo::{DemoConfig, Generator};
use refold::log::EventLog;
use refold::log::kafka::KafkaLog;
use refold::position::Position;
use serde_json::{Value, json};
use uuid::Uuid;

/// One event the load will send.
#[derive(Debug, Clone)]
struct Planned {
    id: Uuid,
    stream: String,
    event_type: String,
    data: Value,
    /// Valid JSON that `post_stats` and `posts` cannot apply (no usable `post_id`).
    poison: bool,
}

/// `n` demo events of `seed`; every `poison_every`-th is a poison event instead (0:
/// none).
fn plan(seed: u64, n: usize, poison_every: usize) -> Vec<Planned> {
    let demo = Generator::new(DemoConfig {
        seed,
        users: 80,
        tribes: 6,
        hot_share: 0.3,
    })
    .take(n);
    demo.into_iter()
        .enumerate()
        .map(|(i, e)| {
            let poison = poison_every > 0 && i % poison_every == poison_every - 1;
            let (event_type, data) = match (poison, i % 2) {
                (false, _) => (e.event_type, e.data),
                (true, 0) => ("PostLiked".into(), json!({"user_id": "u1"})),
                (true, _) => (
                    "CommentAdded".into(),
                    json!({"post_id": {"not": "a key"}, "comment_id": "c", "user_id": "u1", "text": "x"}),
                ),
            };
            Planned {
                id: Uuid::new_v4(),
                stream: if poison {
                    format!("post-poison{i}")
                } else {
                    e.stream
                },
                event_type,
                data,
                poison,
            }
        })
        .collect()
}

/// How the clients behave.
#[derive(Debug, Clone)]
struct LoadSpec {
    clients: usize,
    /// Every `bulk_every`-th request of a client is an NDJSON bulk of up to
    /// `bulk_size` events (0: single-event requests only).
    bulk_every: usize,
    bulk_size: usize,
    /// Client-side timeout of one request.
    timeout: Duration,
    /// How long a client retries one request (same ids) before it gives up.
    retry_for: Duration,
    /// Whether giving up on a 429 is expected (overload). Otherwise any event
    /// not acknowledged stops the load and fails the case.
    may_give_up: bool,
}

impl Default for LoadSpec {
    fn default() -> Self {
        Self {
            clients: 8,
            bulk_every: 3,
            bulk_size: 10,
            timeout: Duration::from_secs(20),
            retry_for: Duration::from_secs(180),
            may_give_up: false,
        }
    }
}

/// What sending one event came to, as the client saw it.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// 201, or 200 for a repeat: in the log at this version.
    Acked(u64),
    /// A 4xx (or 429 until the client gave up) and no attempt with an unknown
    /// result: not appended.
    Refused(u16),
    /// No definite answer (timeouts, dropped connections, 5xx).
    Unknown,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    timeouts: AtomicU64,
    /// Connection refused or reset, or a response cut off.
    broken: AtomicU64,
    /// 429 answers: refold's write budget is full.
    throttled: AtomicU64,
    /// 503 answers: the log or refold is unavailable (or shutting down).
    unavailable: AtomicU64,
    /// Other 5xx answers.
    errors_5xx: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Concurrent clients sending a plan of events to one address.
struct Load {
    may_give_up: bool,
    acked: Arc<AtomicUsize>,
    counters: Arc<Counters>,
    plan: Arc<Vec<Planned>>,
    tasks: Vec<tokio::task::JoinHandle<Vec<(usize, Outcome)>>>,
    started: Instant,
}

impl Load {
    fn start(base: &str, plan: Vec<Planned>, spec: LoadSpec) -> Load {
        let plan = Arc::new(plan);
        let next = Arc::new(AtomicUsize::new(0));
        let acked = Arc::new(AtomicUsize::new(0));
        let counters = Arc::new(Counters::default());
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(spec.clients)
            .build()
            .unwrap();
        let give_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = (0..spec.clients)
            .map(|c| {
                let give_up = give_up.clone();
                let client = Client {
                    http: http.clone(),
                    base: base.to_owned(),
                    spec: spec.clone(),
                    counters: counters.clone(),
                };
                let (plan, next, acked) = (plan.clone(), next.clone(), acked.clone());
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    for r in 0.. {
                        if give_up.load(Ordering::SeqCst) {
                            break;
                        }
                        let bulk = spec.bulk_every > 0 && (r + c) % spec.bulk_every == 0;
                        let k = if bulk { spec.bulk_size } else { 1 };
                        let from = next.fetch_add(k, Ordering::Relaxed);
                        if from >= plan.len() {
                            break;
                        }
                        let idx: Vec<usize> = (from..(from + k).min(plan.len())).collect();
                        let results = if bulk {
                            client.bulk(&plan, &idx).await
                        } else {
                            vec![(idx[0], client.single(&plan[idx[0]]).await)]
                        };
                        let n = results
                            .iter()
                            .filter(|(_, o)| matches!(o, Outcome::Acked(_)))
                            .count();
                        acked.fetch_add(n, Ordering::SeqCst);
                        if n < results.len() && !spec.may_give_up {
                            // Something is stuck: stop here rather than retry every
                            // remaining event for `retry_for`.
                            give_up.store(true, Ordering::SeqCst);
                        }
                        out.extend(results);
                    }
                    out
                })
            })
            .collect();
        Load {
            may_give_up: spec.may_give_up,
            acked,
            counters,
            plan,
            tasks,
            started: Instant::now(),
        }
    }

    fn acked(&self) -> usize {
        self.acked.load(Ordering::SeqCst)
    }

    /// Waits until `n` events are acknowledged.
    async fn until_acked(&self, n: usize) {
        common::eventually(300, &format!("{n} events acknowledged"), || async {
            (self.acked() >= n).then_some(())
        })
        .await;
    }

    /// Waits for every client to finish; each event sent with its outcome.
    async fn finish(self) -> Sent {
        let mut outcomes = vec![None; self.plan.len()];
        for t in self.tasks {
            for (i, o) in t.await.unwrap() {
                outcomes[i] = Some(o);
            }
        }
        let events = self
            .plan
            .iter()
            .cloned()
            .zip(outcomes)
            .filter_map(|(p, o)| Some((p, o?)))
            .collect();
        Sent {
            planned: self.plan.len(),
            may_give_up: self.may_give_up,
            events,
            counters: self.counters,
            elapsed: self.started.elapsed(),
        }
    }
}

/// What the load sent and how each event ended.
struct Sent {
    planned: usize,
    may_give_up: bool,
    events: Vec<(Planned, Outcome)>,
    counters: Arc<Counters>,
    elapsed: Duration,
}

/// One client: sends, and retries what has no definite answer.
struct Client {
    http: reqwest::Client,
    base: String,
    spec: LoadSpec,
    counters: Arc<Counters>,
}

/// How one attempt ended.
enum Attempt {
    /// A status and body.
    Answer(u16, Value, Duration),
    /// No answer: the request may or may not have been applied.
    Lost,
}

impl Client {
    /// One request; `retry`: the first attempt gets `spec.timeout`, retries a
    /// generous one, so that a short timeout cannot starve an event for ever.
    async fn attempt(&self, uri: &str, content_type: &str, body: String, retry: bool) -> Attempt {
        bump(&self.counters.requests);
        let timeout = if retry {
            self.spec.timeout.max(Duration::from_secs(20))
        } else {
            self.spec.timeout
        };
        let sent = self
            .http
            .post(format!("{}{uri}", self.base))
            .header("content-type", content_type)
            .body(body)
            .timeout(timeout)
            .send()
            .await;
        let r = match sent {
            Ok(r) => r,
            Err(e) => {
                bump(if e.is_timeout() {
                    &self.counters.timeouts
                } else {
                    &self.counters.broken
                });
                return Attempt::Lost;
            }
        };
        let status = r.status().as_u16();
        let retry_after = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(Duration::from_millis(200), Duration::from_secs);
        match r.json::<Value>().await {
            Ok(b) => {
                match status {
                    429 => bump(&self.counters.throttled),
                    503 => bump(&self.counters.unavailable),
                    500.. => bump(&self.counters.errors_5xx),
                    _ => {}
                }
                Attempt::Answer(status, b, retry_after.min(Duration::from_secs(2)))
            }
            Err(e) => {
                bump(if e.is_timeout() {
                    &self.counters.timeouts
                } else {
                    &self.counters.broken
                });
                Attempt::Lost
            }
        }
    }

    async fn single(&self, p: &Planned) -> Outcome {
        let uri = format!("/streams/{}/events", p.stream);
        let body = json!({"type": p.event_type, "data": p.data, "id": p.id}).to_string();
        let deadline = Instant::now() + self.spec.retry_for;
        let mut maybe_applied = false;
        let mut last = 0;
        for retry in [false].into_iter().chain(std::iter::repeat(true)) {
            if Instant::now() >= deadline {
                break;
            }
            let pause = match self
                .attempt(&uri, "application/json", body.clone(), retry)
                .await
            {
                Attempt::Answer(200 | 201, b, _) => {
                    return Outcome::Acked(b["first_version"].as_u64().expect("first_version"));
                }
                Attempt::Answer(s @ (429 | 500..), _, pause) => {
                    maybe_applied |= s >= 500;
                    last = s;
                    pause
                }
                // A 4xx after an attempt that may have been applied: I4 says the
                // retry should have been answered 200.
                Attempt::Answer(_, _, _) if maybe_applied => return Outcome::Unknown,
                Attempt::Answer(s, _, _) => return Outcome::Refused(s),
                Attempt::Lost => {
                    maybe_applied = true;
                    Duration::from_millis(100)
                }
            };
            tokio::time::sleep(pause).await;
        }
        if maybe_applied {
            Outcome::Unknown
        } else {
            Outcome::Refused(last)
        }
    }

    async fn bulk(&self, plan: &[Planned], idx: &[usize]) -> Vec<(usize, Outcome)> {
        let mut pending: Vec<usize> = idx.to_vec();
        let mut maybe_applied: HashMap<usize, bool> = HashMap::new();
        let mut out = Vec::new();
        let deadline = Instant::now() + self.spec.retry_for;
        let mut retry = false;
        while !pending.is_empty() && Instant::now() < deadline {
            let body: String = pending
                .iter()
                .map(|&i| {
                    let p = &plan[i];
                    format!(
                        "{}\n",
                        json!({"stream": p.stream, "type": p.event_type, "data": p.data, "id": p.id})
                    )
                })
                .collect();
            let answer = self
                .attempt("/events", "application/x-ndjson", body, retry)
                .await;
            retry = true;
            let pause = match answer {
                Attempt::Answer(200, b, pause) => {
                    let items = b["items"].as_array().expect("bulk items").clone();
                    assert_eq!(items.len(), pending.len(), "one item per line: {b}");
                    let mut still = Vec::new();
                    for (&i, item) in pending.iter().zip(&items) {
                        match item["status"].as_u64().unwrap() as u16 {
                            200 | 201 => out.push((
                                i,
                                Outcome::Acked(item["version"].as_u64().expect("version")),
                            )),
                            s @ (429 | 500..) => {
                                *maybe_applied.entry(i).or_default() |= s >= 500;
                                still.push(i);
                            }
                            _ if maybe_applied.get(&i) == Some(&true) => {
                                out.push((i, Outcome::Unknown))
                            }
                            s => out.push((i, Outcome::Refused(s))),
                        }
                    }
                    pending = still;
                    pause
                }
                Attempt::Answer(s @ (429 | 500..), _, pause) => {
                    for &i in &pending {
                        *maybe_applied.entry(i).or_default() |= s >= 500;
                    }
                    pause
                }
                Attempt::Answer(s, b, _) => panic!("a bulk of valid events got {s}: {b}"),
                Attempt::Lost => {
                    for &i in &pending {
                        maybe_applied.insert(i, true);
                    }
                    Duration::from_millis(100)
                }
            };
            if !pending.is_empty() {
                tokio::time::sleep(pause).await;
            }
        }
        for i in pending {
            let o = if maybe_applied.get(&i).copied().unwrap_or(false) {
                Outcome::Unknown
            } else {
                Outcome::Refused(429)
            };
            out.push((i, o));
        }
        out
    }
}

/// A refold deployment under test: its backends and its settings.
struct Stack {
    dir: tempfile::TempDir,
    /// Topic prefix, Redis key namespace and Elasticsearch index prefix.
    prefix: String,
    brokers: String,
    redis: String,
    elasticsearch: String,
    /// Where refold listens, across restarts.
    port: u16,
    extra: Vec<String>,
}

impl Stack {
    /// refold on the suite's tansu, Redis and osmem-server, in a namespace of its
    /// own.
    fn shared(tag: &str) -> Stack {
        Stack {
            dir: tempfile::tempdir().unwrap(),
            prefix: format!("{}.", unique(tag)),
            brokers: common::kafka_brokers(),
            redis: common::redis_url(),
            elasticsearch: common::elasticsearch_url(),
            port: free_port(),
            extra: Vec::new(),
        }
    }

    fn args(&self, data: &str) -> Vec<String> {
        let data = self.dir.path().join(data);
        let mut args: Vec<String> = [
            "--log",
            "kafka",
            "--kafka-brokers",
            &self.brokers,
            "--topic-prefix",
            &self.prefix,
            "--auto-migrate",
            "true",
            "--redis-url",
            &self.redis,
            "--elasticsearch-url",
            &self.elasticsearch,
            "--data-dir",
            data.to_str().unwrap(),
        ]
        .map(String::from)
        .into();
        args.extend(self.extra.iter().cloned());
        args
    }

    /// Starts (or restarts) refold on the stack's port.
    async fn serve(&self) -> Proc {
        let args = self.args("data");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Proc::serve_on(self.port, &args, self.dir.path()).await
    }

    /// A second refold process on the same backends, with its own port and data
    /// directory.
    async fn serve_another(&self) -> Proc {
        let args = self.args("data-2");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Proc::serve(&args, self.dir.path()).await
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> KafkaLog {
        KafkaLog::new(&self.brokers, Duration::from_secs(30)).unwrap()
    }

    /// [`verify`] against this stack's log and the read models as each of `procs`
    /// serves them; then stops them and removes the read models.
    async fn finish(
        &self,
        case: &str,
        faults: &dyn Fn() -> String,
        sent: &Sent,
        procs: Vec<Proc>,
    ) -> Report {
        let apis: Vec<Api> = procs.iter().map(|p| api(&p.base)).collect();
        let logs = ShowLogsOnPanic(&procs);
        let report = verify(case, faults, self, &procs[0].base, &apis, sent).await;
        drop(logs);
        drop(procs);
        self.remove_read_models().await;
        report
    }

    async fn remove_read_models(&self) {
        redis_remove_namespace(&self.prefix).await;
        es_remove_namespace(&self.prefix.to_lowercase()).await;
    }
}

/// Prints the end of each refold's log when a check fails, before the processes
/// and their directory are gone.
struct ShowLogsOnPanic<'a>(&'a [Proc]);

impl Drop for ShowLogsOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for p in self.0 {
                common::show_log_tail(&p.log_path, 40);
            }
        }
    }
}

/// The figures of one case: the table's row.
#[derive(Debug, Default)]
struct Report {
    case: String,
    faults: String,
    sent: usize,
    acked: usize,
    refused: usize,
    unknown: usize,
    unknown_in_log: usize,
    /// Acknowledged but not in the log.
    lost: usize,
    /// Event ids in the log more than once.
    duplicated_in_log: usize,
    /// Refused but in the log, or acknowledged at another stream or version.
    misplaced: usize,
    /// Streams whose versions are not 1..n in log order.
    gaps: usize,
    /// Read-model counters above the oracle (an event applied twice).
    duplicated_in_models: usize,
    /// Any other read-model difference.
    other_diffs: usize,
    dead_letters: String,
    requests: String,
    seconds: f64,
}

const HEADER: &str = "| case | faults injected | sent | acked | refused | unknown (in log) | lost | duplicated in log | misplaced | version gaps | duplicated in read models | other read-model diffs | dead letters (got/want) | requests (timeouts/broken/429/503/other 5xx) | s |\n|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|";

impl Report {
    fn row(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {} | {} ({}) | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} |",
            self.case,
            self.faults,
            self.sent,
            self.acked,
            self.refused,
            self.unknown,
            self.unknown_in_log,
            self.lost,
            self.duplicated_in_log,
            self.misplaced,
            self.gaps,
            self.duplicated_in_models,
            self.other_diffs,
            self.dead_letters,
            self.requests,
            self.seconds
        )
    }

    /// Prints the row past the test harness's capture and appends it to the
    /// report file.
    fn publish(&self) {
        let row = self.row();
        let _ = writeln!(std::io::stderr(), "\nfault harness:\n{HEADER}\n{row}\n");
        let path = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .unwrap()
            .join("fault-report.md");
        let fresh = !path.exists();
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            if fresh {
                let _ = writeln!(f, "{HEADER}");
            }
            let _ = writeln!(f, "{row}");
        }
    }
}

/// Checks the log and the read models after a case (see the module doc), prints
/// the case's row and fails the test on any broken promise.
async fn verify(
    case: &str,
    faults: &dyn Fn() -> String,
    stack: &Stack,
    base: &str,
    apis: &[Api],
    sent: &Sent,
) -> Report {
    let (log, prefix) = (&stack.log(), stack.prefix.as_str());
    // Settle every unknown outcome as a client would: send it once more, same id.
    // 200: it was in the log (at the version answered); 201: it was not, and is
    // now. Either way it is then checked like any acknowledged event.
    let mut outcomes: Vec<Outcome> = sent.events.iter().map(|(_, o)| o.clone()).collect();
    let mut unknown_in_log = 0;
    for (i, (p, o)) in sent.events.iter().enumerate() {
        if *o == Outcome::Unknown {
            let (status, version) = settle(base, p).await;
            unknown_in_log += usize::from(status == 200);
            outcomes[i] = Outcome::Acked(version);
        }
    }
    let topic = format!("{prefix}events");
    let records = common::events(log, &topic).await;
    let mut report = Report {
        case: case.into(),
        sent: sent.events.len(),
        seconds: sent.elapsed.as_secs_f64(),
        ..Default::default()
    };
    let c = &sent.counters;
    report.requests = format!(
        "{} ({}/{}/{}/{}/{})",
        c.requests.load(Ordering::Relaxed),
        c.timeouts.load(Ordering::Relaxed),
        c.broken.load(Ordering::Relaxed),
        c.throttled.load(Ordering::Relaxed),
        c.unavailable.load(Ordering::Relaxed),
        c.errors_5xx.load(Ordering::Relaxed)
    );

    // The log: where every id landed; versions per stream in log order.
    let mut oracle = Oracle::new();
    let mut at: HashMap<Uuid, Vec<(String, u64)>> = HashMap::new();
    let mut heads: HashMap<String, u64> = HashMap::new();
    let mut gaps = std::collections::BTreeSet::new();
    let mut end = Position::default();
    let partitions = log.end_offsets(&topic).await.unwrap().len() as u32;
    for (partition, offset, record) in &records {
        let env: refold::event::Envelope =
            serde_json::from_slice(record.value.as_ref().unwrap()).unwrap();
        let head = heads.entry(env.stream.clone()).or_default();
        // I2: gap-free versions, and every event in its stream's partition.
        if env.version != *head + 1
            || *partition != refold::log::partition_for(&env.stream, partitions)
        {
            gaps.insert(env.stream.clone());
        }
        *head = env.version;
        end.include(*partition, *offset);
        oracle.apply(
            *partition,
            &env.stream,
            &env.event_type,
            &Value::Object(env.data.clone()),
        );
        at.entry(env.id)
            .or_default()
            .push((env.stream, env.version));
    }
    report.gaps = gaps.len();
    report.duplicated_in_log = at.values().filter(|v| v.len() > 1).count();
    let mut poison_in_log = 0;
    let mut examples = Vec::new();
    report.unknown_in_log = unknown_in_log;
    for ((p, original), settled) in sent.events.iter().zip(&outcomes) {
        let unknown = *original == Outcome::Unknown;
        report.unknown += usize::from(unknown);
        let found = at.get(&p.id).map_or(&[][..], Vec::as_slice);
        poison_in_log += usize::from(p.poison && !found.is_empty());
        match settled {
            Outcome::Acked(v) => {
                report.acked += usize::from(!unknown);
                if found.is_empty() {
                    report.lost += 1;
                    examples.push(format!("lost: {} {} v{v}", p.id, p.stream));
                } else if found[0] != (p.stream.clone(), *v) {
                    report.misplaced += 1;
                    examples.push(format!(
                        "acked {} at {}/{v}, in the log at {found:?}",
                        p.id, p.stream
                    ));
                }
            }
            Outcome::Refused(s) => {
                report.refused += 1;
                if !found.is_empty() {
                    report.misplaced += 1;
                    examples.push(format!("refused ({s}) but in the log: {} {found:?}", p.id));
                }
            }
            Outcome::Unknown => unreachable!("settled above"),
        }
    }

    // The read models, once the projections have applied the whole log, as every
    // process serves them.
    let mut diffs = Diffs::default();
    for api in apis {
        caught_up(api, &end).await;
        let d = model_diffs(api, &oracle, &end, true).await;
        diffs.over.extend(d.over);
        diffs.other.extend(d.other);
    }
    let api = &apis[0];
    diffs
        .other
        .extend(redis_key_diffs(&stack.redis, prefix, api, &oracle).await);
    report.duplicated_in_models = diffs.over.len();
    report.other_diffs = diffs.other.len();
    examples.extend(diffs.over.iter().chain(&diffs.other).take(5).cloned());
    // Poison events are dead letters of both; so are likes that reached
    // `post_stats` before their post's tribe (no ranking can be named).
    let poison = poison_in_log as u64;
    let want = [poison + oracle.unranked(), poison];
    let mut dead = Vec::new();
    for (projection, want) in ["post_stats", "posts"].into_iter().zip(want) {
        let (s, b) = api.get(&format!("/projections/{projection}")).await;
        assert_eq!(s, 200, "{b}");
        let got = b["dead_letters"]["count"].as_u64().unwrap_or(u64::MAX);
        dead.push((got, want));
        if got != want {
            examples.push(format!(
                "{projection}: {got} dead letters, want {want}: {}",
                b["dead_letters"]
            ));
        }
    }
    report.dead_letters = format!("{}/{}, {}/{}", dead[0].0, dead[0].1, dead[1].0, dead[1].1);
    report.faults = faults();
    report.publish();

    assert!(
        report.lost == 0
            && report.duplicated_in_log == 0
            && report.misplaced == 0
            && report.gaps == 0
            && diffs.is_empty()
            && dead.iter().all(|(got, want)| got == want),
        "{case}: promises broken:\n{HEADER}\n{}\n{}",
        report.row(),
        examples.join("\n")
    );
    assert!(
        report.acked > 0,
        "{case}: nothing was acknowledged; the case proved nothing"
    );
    assert_eq!(
        sent.events.len(),
        sent.planned,
        "{case}: the load stopped early: an event was refused or never answered"
    );
    let planned_poison = sent.events.iter().filter(|(p, _)| p.poison).count();
    assert_eq!(
        poison_in_log, planned_poison,
        "{case}: every poison event is valid input and must be appended"
    );
    if !sent.may_give_up {
        assert_eq!(
            report.refused,
            0,
            "{case}: valid events were refused:\n{}",
            report.row()
        );
    } else {
        assert!(
            outcomes
                .iter()
                .all(|o| !matches!(o, Outcome::Refused(s) if *s != 429)),
            "{case}: only 429 may refuse valid events"
        );
    }
    report
}

/// The model comparison looks up the oracle's keys; this counts what refold
/// holds in Redis (the live generations' documents, rankings and feeds), so that a
/// key no event should have made is seen too.
async fn redis_key_diffs(redis: &str, prefix: &str, api: &Api, oracle: &Oracle) -> Vec<String> {
    use ::redis::AsyncCommands;
    let client = ::redis::Client::open(redis).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let tribes = oracle.tribe_ids();
    let rankings = tribes.iter().filter(|t| !oracle.top_posts(t).is_empty());
    let feeds = tribes.iter().filter(|t| !oracle.tribe_posts(t).is_empty());
    let mut out = Vec::new();
    for (projection, kind, want) in [
        ("post_stats", "doc", oracle.post_ids().len()),
        ("post_stats", "rank", rankings.count()),
        ("tribe_feed", "list", feeds.count()),
    ] {
        let (_, status) = api.get(&format!("/projections/{projection}")).await;
        let generation = status["generation"].as_u64().unwrap();
        let pattern = format!("{prefix}{projection}:{generation}:{kind}:*");
        let mut iter: ::redis::AsyncIter<String> = con.scan_match(&pattern).await.unwrap();
        let mut got = 0;
        while let Some(key) = iter.next_item().await {
            key.unwrap();
            got += 1;
        }
        if got != want {
            out.push(format!("Redis holds {got} keys {pattern}, want {want}"));
        }
    }
    out
}

/// Sends an event of unknown outcome again (same id) until refold answers it:
/// its status (200: already in the log, 201: appended now) and version.
async fn settle(base: &str, p: &Planned) -> (u16, u64) {
    let http = reqwest::Client::new();
    let body = json!({"type": p.event_type, "data": p.data, "id": p.id});
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = http
            .post(format!("{base}/streams/{}/events", p.stream))
            .json(&body)
            .timeout(Duration::from_secs(30))
            .send()
            .await;
        if let Ok(r) = r {
            let status = r.status().as_u16();
            let b: Value = r.json().await.unwrap_or_default();
            match status {
                200 | 201 => return (status, b["first_version"].as_u64().unwrap()),
                429 | 500.. => {}
                s => panic!("settling {}: {s} {b}", p.id),
            }
        }
        assert!(Instant::now() < deadline, "could not settle {}", p.id);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits (up to 5 minutes) until every demo projection has applied `end`, so that
/// a projection that never catches up fails the case at once instead of every
/// later query waiting for it.
async fn caught_up(api: &Api, end: &Position) {
    for projection in ["post_stats", "tribe_feed", "posts", "users"] {
        let uri = format!("/views/{projection}/refold-probe?after={end}&wait_ms=30000");
        let mut last = (0, Value::Null);
        let absent =
            |(s, b): &(u16, Value)| *s == 404 && b.to_string().contains("has nothing for key");
        for _ in 0..10 {
            last = api.get(&uri).await;
            if absent(&last) {
                break;
            }
        }
        assert!(absent(&last), "{projection} did not apply {end}: {last:?}");
    }
}

/// Events a projection folded in this refold process.
async fn events_folded(base: &str, projection: &str) -> u64 {
    status(base, projection).await["events"]
        .as_u64()
        .unwrap_or(0)
}

/// `GET /projections/{name}` of a running refold.
async fn status(base: &str, name: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{base}/projections/{name}"))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The HTTP API of a refold process; queries wait at most 60 s for a position.
fn api(base: &str) -> Api {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(90))
        .build()
        .unwrap();
    Api::Remote(http, base.to_owned())
}

#[tokio::test]
async fn sigkill_during_ingest() {
    let stack = Stack::shared("f-kill-ingest");
    let mut p = stack.serve().await;
    let load = Load::start(&stack.base(), plan(11, 2500, 0), LoadSpec::default());
    let mut kills = 0;
    for at in [500, 1400] {
        load.until_acked(at).await;
        p.kill9();
        kills += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
        p = stack.serve().await;
    }
    let sent = load.finish().await;
    stack
        .finish(
            "SIGKILL during ingest",
            &|| format!("{kills} SIGKILL"),
            &sent,
            vec![p],
        )
        .await;
}

#[tokio::test]
async fn sigkill_during_projection() {
    // The events go in first, through a refold without projections; then refold
    // with the projections is killed twice while they fold (batches of 5, so a
    // kill lands between or inside Redis transactions and Elasticsearch bulks).
    let mut stack = Stack::shared("f-kill-proj");
    let none = stack.dir.path().join("no-projections");
    std::fs::create_dir_all(&none).unwrap();
    stack.extra = [
        "--projections",
        none.to_str().unwrap(),
        "--stream-history",
        "false",
    ]
    .map(String::from)
    .into();
    let mut p = stack.serve().await;
    let sent = Load::start(&stack.base(), plan(12, 2500, 0), LoadSpec::default())
        .finish()
        .await;
    assert!(p.terminate().success());
    stack.extra = vec!["--projection-batch".into(), "5".into()];
    let mut kills = 0;
    for _ in 0..2 {
        p = stack.serve().await;
        // Once `posts` has folded something since this start, and is still behind.
        let s = common::eventually(120, "posts to fold", || async {
            let s = status(&stack.base(), "posts").await;
            (s["events"].as_u64() > Some(0)).then_some(s)
        })
        .await;
        assert!(
            s["lag"].as_u64() > Some(0),
            "the kill must land while the projections fold: {s}"
        );
        p.kill9();
        kills += 1;
    }
    let p = stack.serve().await;
    stack
        .finish(
            "SIGKILL during projection",
            &|| format!("{kills} SIGKILL"),
            &sent,
            vec![p],
        )
        .await;
}

#[tokio::test]
async fn broker_killed_and_restarted_during_ingest() {
    let broker = Broker::start(tempfile::tempdir().unwrap(), free_port());
    let mut stack = Stack::shared("f-broker");
    stack.brokers = broker.address();
    stack.extra = vec!["--kafka-timeout-ms".into(), "3000".into()];
    let p = stack.serve().await;
    let load = Load::start(&stack.base(), plan(13, 2500, 0), LoadSpec::default());
    load.until_acked(700).await;
    // Down for longer than refold waits for a delivery report (3 s).
    let (dir, port) = broker.kill();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let _broker = Broker::start(dir, port);
    let sent = load.finish().await;
    stack
        .finish(
            "broker SIGKILL + restart during ingest",
            &|| "1 broker SIGKILL, 8 s down".into(),
            &sent,
            vec![p],
        )
        .await;
}

#[tokio::test]
async fn redis_restarted_without_persistence() {
    let mut redis = PrivateRedis::start(free_port());
    let mut stack = Stack::shared("f-redis");
    stack.redis = redis.url();
    let p = stack.serve().await;
    let load = Load::start(&stack.base(), plan(14, 2500, 0), LoadSpec::default());
    load.until_acked(1200).await;
    common::eventually(120, "post_stats to hold data in Redis", || async {
        (events_folded(&stack.base(), "post_stats").await > 0).then_some(())
    })
    .await;
    redis.restart();
    let sent = load.finish().await;
    stack
        .finish(
            "Redis restarted empty",
            &|| "1 Redis restart (all data lost)".into(),
            &sent,
            vec![p],
        )
        .await;
}

#[tokio::test]
async fn elasticsearch_answers_429_and_5xx_and_stalls() {
    let proxy = Arc::new(EsProxy::start(&common::elasticsearch_url()).await);
    let mut stack = Stack::shared("f-es");
    stack.elasticsearch = proxy.url.clone();
    let p = stack.serve().await;
    // Faults hit the bulks of `posts` (documents and checkpoints), a model the
    // harness compares with the oracle.
    proxy.only_paths_containing("posts-g");
    let load = Load::start(&stack.base(), plan(15, 2500, 0), LoadSpec::default());
    // One fault for a `_bulk` every 300 ms while the load runs, in turn: whole
    // requests refused, stalled, items failed after being applied, items dropped.
    let stop = Arc::new(AtomicUsize::new(0));
    let injector = {
        let (proxy, stop) = (proxy.clone(), stop.clone());
        tokio::spawn(async move {
            let faults = [
                BulkFault::Reject(429),
                BulkFault::Reject(503),
                BulkFault::Stall(Duration::from_secs(3)),
                BulkFault::FailAfter {
                    items: vec![0, 1, 2],
                    status: 503,
                },
                BulkFault::DropBefore {
                    items: vec![0, 2],
                    status: 429,
                },
                BulkFault::Reject(500),
            ];
            for f in faults.iter().cycle() {
                if stop.load(Ordering::SeqCst) > 0 {
                    break;
                }
                if proxy.queued() < 2 {
                    proxy.push(f.clone());
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let sent = load.finish().await;
    stop.store(1, Ordering::SeqCst);
    injector.await.unwrap();
    let report = stack
        .finish(
            "Elasticsearch 429/5xx/stalls",
            &|| {
                format!(
                    "{} bulk faults (429, 5xx, 3 s stalls, items failed or dropped)",
                    proxy.injected()
                )
            },
            &sent,
            vec![p],
        )
        .await;
    assert!(proxy.injected() > 0, "{report:?}");
}

#[tokio::test]
async fn poison_events_become_dead_letters() {
    let stack = Stack::shared("f-poison");
    let p = stack.serve().await;
    let plan = plan(16, 2000, 25);
    let poison = plan.iter().filter(|e| e.poison).count();
    let sent = Load::start(&stack.base(), plan, LoadSpec::default())
        .finish()
        .await;
    stack
        .finish(
            "poison events",
            &|| format!("{poison} poison events"),
            &sent,
            vec![p],
        )
        .await;
}

#[tokio::test]
async fn two_processes_project_at_once() {
    // Both run every projection on every partition into the same stores: the
    // checkpoint fencing decides which one's batch counts.
    let stack = Stack::shared("f-two");
    let a = stack.serve().await;
    let b = stack.serve_another().await;
    let sent = Load::start(&stack.base(), plan(17, 2500, 0), LoadSpec::default())
        .finish()
        .await;
    let mut folded = [0, 0];
    for (n, proc) in folded.iter_mut().zip([&a, &b]) {
        for projection in [
            "post_stats",
            "tribe_feed",
            "posts",
            "users",
            "stream_history",
        ] {
            *n += events_folded(&proc.base, projection).await;
        }
    }
    assert!(
        folded.iter().all(|&n| n > 0),
        "both processes must fold (and be fenced), not one stand idle: {folded:?}"
    );
    stack
        .finish(
            "two processes project at once",
            &|| "2nd process on the same projections".into(),
            &sent,
            vec![a, b],
        )
        .await;
}

#[tokio::test]
async fn clients_retry_after_timeouts() {
    // Requests time out on the client while refold still writes them; the
    // retries carry the same ids (I4).
    let stack = Stack::shared("f-retry");
    let p = stack.serve().await;
    let spec = LoadSpec {
        timeout: Duration::from_millis(25),
        ..LoadSpec::default()
    };
    let sent = Load::start(&stack.base(), plan(18, 2000, 0), spec)
        .finish()
        .await;
    let timeouts = sent.counters.timeouts.load(Ordering::Relaxed);
    assert!(
        timeouts > 0,
        "no request timed out; the case proved nothing"
    );
    stack
        .finish(
            "client retries after timeouts",
            &|| format!("{timeouts} client timeouts (25 ms)"),
            &sent,
            vec![p],
        )
        .await;
}

/// Checks, with refold stopped, that the live `post_stats` generation in Redis
/// holds exactly the fold of the log below its checkpoints: no batch half
/// applied, no checkpoint ahead of or behind its data (I6). Returns how many
/// events the checkpoints cover.
async fn post_stats_equal_the_log_up_to_their_checkpoints(stack: &Stack) -> u64 {
    use refold::config::{Config, LogBackend, Settings};
    use refold::projection::store::GenRef;
    let config = Config::from_settings(Settings {
        data_dir: Some(stack.dir.path().join("check")),
        log: Some(LogBackend::Kafka),
        kafka_brokers: Some(stack.brokers.clone()),
        topic_prefix: Some(stack.prefix.clone()),
        redis_url: Some(stack.redis.clone()),
        projections: Some(common::projections_dir()),
        migrations: Some(common::migrations_dir()),
        ..Default::default()
    })
    .unwrap();
    let kv = refold::server::open_kv(&config).await.unwrap();
    let def = refold::server::load_projections(&config)
        .unwrap()
        .into_iter()
        .find(|d| d.name == "post_stats")
        .unwrap();
    let live = kv
        .meta("post_stats")
        .await
        .unwrap()
        .live
        .expect("a live generation");
    let generation = GenRef {
        projection: "post_stats".into(),
        generation: live.generation,
    };
    let topic = format!("{}events", stack.prefix);
    let log = stack.log();
    let partitions = log.end_offsets(&topic).await.unwrap().len() as u32;
    let checkpoints = kv.checkpoints(&generation, partitions).await.unwrap();
    let (mut covered, mut all) = (Oracle::new(), Oracle::new());
    let mut applied = 0;
    for (partition, offset, record) in common::events(&log, &topic).await {
        let env: refold::event::Envelope =
            serde_json::from_slice(record.value.as_ref().unwrap()).unwrap();
        let data = Value::Object(env.data);
        all.apply(partition, &env.stream, &env.event_type, &data);
        if offset < checkpoints[partition as usize].unwrap_or(0) {
            covered.apply(partition, &env.stream, &env.event_type, &data);
            applied += 1;
        }
    }
    for post in all.post_ids() {
        let got = kv.view(&generation, &def.schema, &post).await.unwrap();
        let want = covered.post_stats(&post);
        let same = match (&got, &want) {
            (None, None) => true,
            (Some(g), Some(w)) => ["likes", "views", "comments"]
                .iter()
                .all(|f| g.get(*f) == w.get(*f)),
            _ => false,
        };
        assert!(
            same,
            "post_stats {post} after SIGTERM: {got:?}, but the log up to the checkpoints {checkpoints:?} gives {want:?}"
        );
    }
    applied
}

/// Peak and current resident memory of a process, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let read = |key| refold::bench::proc_memory(&pid.to_string(), key).expect(key);
    (read("VmHWM"), read("VmRSS"))
}

#[tokio::test]
async fn overload_is_refused_with_bounded_memory_and_recovers() {
    // 128 clients each offer a bulk of 8 events of 100 KB at once: 100 MB, 25
    // times the 4 MiB write budget (I9). The flood goes to a refold without
    // projections, so that its memory is the write path's; then refold with the
    // projections folds all of it, and its memory is the projections'.
    const CLIENTS: usize = 128;
    const PER_BULK: usize = 8;
    let mut stack = Stack::shared("f-overload");
    let none = stack.dir.path().join("no-projections");
    std::fs::create_dir_all(&none).unwrap();
    stack.extra = [
        "--ingest-buffer",
        "4MiB",
        "--stream-history",
        "false",
        "--projections",
        none.to_str().unwrap(),
    ]
    .map(String::from)
    .into();
    let mut p = stack.serve().await;
    let pad = "x".repeat(100_000);
    let plan: Vec<Planned> = (0..CLIENTS * PER_BULK)
        .map(|i| Planned {
            id: Uuid::new_v4(),
            stream: format!("post-hot{}", i % 5),
            event_type: "PostViewed".into(),
            data: json!({"post_id": format!("hot{}", i % 5), "user_id": format!("u{i}"), "pad": pad}),
            poison: false,
        })
        .collect();
    let offered = (CLIENTS * PER_BULK * pad.len()) as u64;
    let (_, idle) = memory(p.child.id());
    let spec = LoadSpec {
        clients: CLIENTS,
        bulk_every: 1,
        bulk_size: PER_BULK,
        may_give_up: true,
        ..LoadSpec::default()
    };
    let sent = Load::start(&stack.base(), plan, spec).finish().await;
    let (ingest_peak, _) = memory(p.child.id());
    let throttled = sent.counters.throttled.load(Ordering::Relaxed)
        + sent.counters.unavailable.load(Ordering::Relaxed);
    // Recovery: a plain append goes through at once after the flood.
    let (s, b) = api(&stack.base())
        .send(
            "POST",
            "/streams/post-after/events",
            "application/json",
            json!({"type": "PostViewed", "data": {"post_id": "after", "user_id": "u"}}).to_string(),
        )
        .await;
    assert_eq!(s, 201, "after the flood: {b}");
    assert!(p.terminate().success());

    stack.extra.truncate(4); // the demo projections now
    let p = stack.serve().await;
    let pid = p.child.id();
    let mb = |b: u64| b >> 20;
    // Read when the projections have folded everything.
    let fold_peak = std::cell::Cell::new(0);
    stack
        .finish("overload", &|| {
            fold_peak.set(memory(pid).0);
            format!(
                "{} MB offered at once; {throttled} answers 429/503; peak RSS {} MB ingesting, {} MB folding (idle {} MB)",
                mb(offered),
                mb(ingest_peak),
                mb(fold_peak.get()),
                mb(idle)
            )
        }, &sent, vec![p])
        .await;
    let fold_peak = fold_peak.get();
    assert!(throttled > 0, "the flood was never refused");
    // Unbounded, either would hold at least the whole flood (without the read
    // caps of the log adapters, folding it peaked at 172 MB).
    for (what, peak) in [("ingest", ingest_peak), ("fold", fold_peak)] {
        assert!(
            peak < idle + offered * 3 / 4,
            "{what}: peak RSS {} MB with {} MB offered (idle {} MB): memory is not bounded",
            mb(peak),
            mb(offered),
            mb(idle)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_nothing() {
    // SIGTERM while clients post and projections fold (batches of 5); the clients
    // retry through the restart. Right after the exit, `post_stats` in Redis holds
    // exactly the fold of the log up to its checkpoints. After the restart nothing
    // acknowledged is lost and the read models count nothing twice.
    let mut stack = Stack::shared("f-sigterm");
    stack.extra = vec!["--projection-batch".into(), "5".into()];
    let mut p = stack.serve().await;
    let load = Load::start(&stack.base(), plan(19, 2500, 0), LoadSpec::default());
    load.until_acked(1000).await;
    // The clients go on sending while refold drains.
    let exit = tokio::task::block_in_place(|| p.terminate());
    assert!(exit.success(), "exit status {exit}:\n{}", p.log());
    assert!(p.log().contains("shutdown complete"), "{}", p.log());
    let applied = post_stats_equal_the_log_up_to_their_checkpoints(&stack).await;
    assert!(applied > 0, "post_stats had applied nothing before SIGTERM");
    let p = stack.serve().await;
    let sent = load.finish().await;
    stack
        .finish("SIGTERM under load", &|| "1 SIGTERM".into(), &sent, vec![p])
        .await;
}
