//! `refold bench`: refold's figures beside the raw limits of the parts it is made
//! of, measured in one run on the same machine and backends.
//!
//! Raw limits use the parts directly, with refold's settings, record sizes, keys
//! and batch sizes: the log's append and read, a bare rdkafka producer and
//! consumer, pipelined Redis writes or redb transactions, Elasticsearch `_bulk` or
//! tantivy commits. refold's figures go through its HTTP API, served in this
//! process on the configured backends: first the write path alone (ingest in bulk
//! and single-event requests, append latency at a fixed offered rate), then with
//! the demo projections folding (ingest, latency, end-to-end visibility, replay
//! per store with its memory, a hot key). Each refold figure is shown with the
//! limit that bounds it and the ratio.
//!
//! Everything runs under a fresh data directory and a topic prefix of its own, so
//! a bench never touches a deployment's data.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use crate::config::{Config, LogBackend};
use crate::demo::{DemoConfig, Generator};
use crate::log::{ConsumedRecord, EventLog, ProduceRecord, Record, TopicSpec};
use crate::projection::store::embedded::{
    CACHE_BYTES as EMBEDDED_KV_CACHE_BYTES, DURABLE_EVERY, ordered,
};
use crate::server::{Refold, open_log};

/// How much work each measurement does.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Events of the raw log and ingest measurements (the replays fold what
    /// they appended).
    pub events: usize,
    /// Seconds of the fixed-rate latency measurement.
    pub latency_secs: u64,
    /// Appends timed from append to visible in a read model.
    pub visibility_samples: usize,
}

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Figure {
    pub what: String,
    pub value: f64,
    pub unit: &'static str,
    /// The raw limit this figure is bounded by: its name and value (same unit).
    pub limit: Option<(String, f64)>,
}

/// Bytes of a typical demo event record (envelope JSON), the raw benches' size.
const RECORD_BYTES: usize = 300;
/// Events per raw write and per bulk request, as refold batches them.
const BATCH: usize = 1000;

/// Runs every measurement the configuration allows and returns the table's rows.
pub async fn run(config: &Config, sizes: Sizes, pb: &ProgressBar) -> anyhow::Result<Vec<Figure>> {
    let mut figures = Vec::new();
    let n = sizes.events;

    // Raw limits.
    pb.set_message("raw: log append");
    let log = open_log(config)?;
    let (append, read) = raw_log(&log, config, n).await?;
    // Through refold's log adapter (rdkafka for Kafka), without the write path.
    let log_name = match config.log {
        LogBackend::Embedded => "embedded log",
        LogBackend::Kafka => "Kafka log adapter (rdkafka)",
    };
    let adapter_read = match config.log {
        LogBackend::Embedded => "embedded log read",
        LogBackend::Kafka => "Kafka log adapter read (rdkafka)",
    };
    figures.push(raw(
        &format!("raw: {log_name} append ({RECORD_BYTES} B records keyed as events, compacted topic, batches of {BATCH})"),
        append,
        "events/s",
    ));
    figures.push(raw(&format!("raw: {adapter_read}"), read, "events/s"));
    // The same broker and settings through bare rdkafka clients: the limits.
    let (append, read) = match (&config.log, &config.kafka_brokers) {
        (LogBackend::Kafka, Some(brokers)) => {
            pb.set_message("raw: bare rdkafka producer and consumer");
            let (p, c) = bare_kafka(
                brokers,
                &config.kafka_properties,
                config.kafka_fetch_wait,
                &config.topic("bench-bare"),
                n,
            )
            .await?;
            figures.push(raw(
                &format!(
                    "raw: bare rdkafka producer ({RECORD_BYTES} B records, refold's settings)"
                ),
                p,
                "events/s",
            ));
            figures.push(raw(
                "raw: bare rdkafka consumer (3 partitions at once)",
                c,
                "events/s",
            ));
            (p, c)
        }
        _ => (append, read),
    };
    let (log_name, read_name) = match config.log {
        LogBackend::Embedded => (log_name, adapter_read),
        LogBackend::Kafka => ("bare rdkafka producer", "bare rdkafka consumer"),
    };
    pb.inc(1);
    // refold, served here on the same backends. First the write path alone (no
    // projection folds beside it): what the targets compare with the raw producer.
    let limit = Some((format!("raw: {log_name} append"), append));
    let mut alone = config.clone();
    alone.projections = config.data_dir.join("no-projections");
    alone.stream_history = false;
    pb.set_message("refold: starting the write path alone");
    let served = Served::start(&alone, log.clone()).await?;
    pb.set_message("refold: bulk ingest, write path alone");
    let rate = ingest_bulk(&served.http, &served.base, n, 1).await?;
    figures.push(Figure {
        what: format!("refold: HTTP bulk ingest, write path alone (NDJSON, {BATCH} events per request, 4 clients)"),
        value: rate,
        unit: "events/s",
        limit: limit.clone(),
    });
    pb.set_message("refold: single-event ingest, write path alone");
    let singles = (n / 10).clamp(1000, 20_000);
    let rate = ingest_single(&served.http, &served.base, singles, 64).await?;
    figures.push(Figure {
        what: "refold: HTTP single-event ingest, write path alone (64 clients)".into(),
        value: rate,
        unit: "events/s",
        limit: limit.clone(),
    });
    pb.set_message("refold: latency at 1,000 requests/s, write path alone");
    let lat = latency_at_rate(&served.http, &served.base, 1000, sizes.latency_secs).await?;
    latency_figures(&mut figures, &lat, "write path alone");
    served.stop().await;
    pb.inc(1);

    // Then refold as it runs: the demo projections fold beside ingest, on the
    // same cores. They first fold what the write path alone appended.
    pb.set_message("refold: starting with the projections");
    let served = Served::start(config, log.clone()).await?;
    let (http, base) = (served.http.clone(), served.base.clone());
    // The read-side figures need the demo projections; without them (an empty
    // --projections directory) the bench measures ingest alone.
    let projected = status(&http, &base, "post_stats").await?.is_some()
        && status(&http, &base, "posts").await?.is_some();
    if !projected {
        pb.set_position(STEPS);
        figures.push(raw(
            "refold: figures with projections skipped (the demo projections post_stats and posts are not loaded)",
            f64::NAN,
            "",
        ));
        figures.push(peak_rss(
            "refold: peak RSS of this process (bench client included)",
        ));
        served.stop().await;
        return Ok(figures);
    }
    pb.set_message("refold: projections catching up");
    caught_up(&http, &base).await?;
    pb.set_message("refold: bulk ingest with projections");
    let rate = ingest_bulk(&http, &base, n, 2).await?;
    figures.push(Figure {
        what: format!("refold: HTTP bulk ingest, the demo projections folding beside it (NDJSON, {BATCH} events per request, 4 clients)"),
        value: rate,
        unit: "events/s",
        limit: limit.clone(),
    });
    pb.inc(1);
    pb.set_message("refold: latency at 1,000 requests/s with projections");
    // At a steady rate the projections keep up: start from a caught-up state,
    // not from the backlog of the bulk ingest.
    caught_up(&http, &base).await?;
    let lat = latency_at_rate(&http, &base, 1000, sizes.latency_secs).await?;
    latency_figures(&mut figures, &lat, "the projections folding");
    pb.inc(1);

    pb.set_message("refold: visibility latency");
    caught_up(&http, &base).await?;
    let vis = visibility(&http, &base, sizes.visibility_samples).await?;
    for (q, v) in [("p50", vis[0]), ("p99", vis[1])] {
        figures.push(Figure {
            what: format!("refold: append to visible in post_stats, {q}"),
            value: v,
            unit: "ms",
            limit: None,
        });
    }
    pb.inc(1);

    pb.set_message("refold: replays");
    caught_up(&http, &base).await?;
    let total = log_events(&*log, config).await?;
    // The records a replay reads, read raw the same way just before: more of them
    // than the raw topic's, larger, and more than the log's page cache holds.
    let events_read = raw_read(&log, &config.topic(crate::migrate::EVENTS)).await?;
    figures.push(raw(
        &format!(
            "raw: {adapter_read} of the events topic ({total} events, the records the replays read)"
        ),
        events_read,
        "events/s",
    ));
    // The stores' raw writes of as many events as the replays fold, in
    // refold's batch size.
    let events = total as usize;
    let batch = config.projection_batch;
    pb.set_message("raw: key-value store writes");
    let writes = post_stats_writes(&log, &config.topic(crate::migrate::EVENTS)).await?;
    let (kv_name, kv_what, kv_rate) = match &config.redis_url {
        Some(url) => (
            "Redis pipelines of post_stats's writes",
            format!(
                "raw: Redis pipelines of post_stats's writes (HSET, HINCRBY, PFADD, ZINCRBY per event; the events topic's {events} events, {batch} per pipeline)"
            ),
            raw_redis(url, &config.topic_prefix, writes, batch).await?,
        ),
        None => {
            let dir = config.data_dir.join("bench-raw-redb");
            (
                "redb transactions of post_stats's writes",
                format!(
                    "raw: redb transactions of post_stats's writes (counters read and written, viewer rows, ranking scores and index, per event; the events topic's {events} events, {batch} per transaction, refold's cache and fsync policy)"
                ),
                tokio::task::spawn_blocking(move || raw_redb(&dir, writes, batch)).await??,
            )
        }
    };
    figures.push(raw(&kv_what, kv_rate, "events/s"));
    pb.inc(1);
    pb.set_message("raw: document store writes");
    let (doc_name, doc_what, doc_rate) = match &config.elasticsearch_url {
        Some(url) => (
            "Elasticsearch _bulk",
            format!("raw: Elasticsearch _bulk ({events} docs, {batch} per request, refresh)"),
            raw_bulk(url, &config.topic_prefix, events, batch).await?,
        ),
        None => {
            let dir = config.data_dir.join("bench-raw-tantivy");
            (
                "tantivy commits",
                format!(
                    "raw: tantivy documents ({events} docs, commits of {batch}, reader reloaded)"
                ),
                tokio::task::spawn_blocking(move || raw_tantivy(&dir, events, batch)).await??,
            )
        }
    };
    figures.push(raw(&doc_what, doc_rate, "docs/s"));
    pb.inc(1);
    pb.set_message("refold: replays");
    // On Kafka the bare consumer stays the limit; the embedded log has no
    // reader barer than its adapter, so the read of these very records is.
    let (read_name, read) = match config.log {
        LogBackend::Embedded => (format!("{adapter_read} of the events topic"), events_read),
        LogBackend::Kafka => (read_name.to_owned(), read),
    };
    for (projection, store, write) in [
        ("post_stats", kv_name, kv_rate),
        ("posts", doc_name, doc_rate),
    ] {
        // Peak memory from here on: the replay's, apart from what the bench
        // client and the earlier measurements needed.
        let before = reset_peak_rss();
        let anon_before = proc_memory("self", "RssAnon").map(mib);
        // Anonymous memory (heap) sampled while the replay runs: file pages
        // (mapped index segments, cached by the kernel) are not the service's.
        let mut anon_peak = 0u64;
        let replayed = replay(&http, &base, projection);
        tokio::pin!(replayed);
        let secs = loop {
            anon_peak = anon_peak.max(proc_memory("self", "RssAnon").unwrap_or(0));
            tokio::select! {
                secs = &mut replayed => break secs?,
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        };
        let bound = if write < read {
            (format!("raw: {store}"), write)
        } else {
            (format!("raw: {read_name}"), read)
        };
        figures.push(Figure {
            what: format!("refold: replay of {projection} ({total} events)"),
            value: total as f64 / secs,
            unit: "events/s",
            limit: Some(bound),
        });
        figures.push(peak_rss(&format!(
            "refold: peak RSS during the replay of {projection} ({total} events; {} MiB before it)",
            before.map_or("-".into(), human)
        )));
        figures.push(Figure {
            what: format!(
                "refold: peak anonymous RSS (heap) during the replay of {projection} ({} MiB before it)",
                anon_before.map_or("-".into(), human)
            ),
            value: mib(anon_peak),
            unit: "MiB",
            limit: None,
        });
        pb.inc(1);
    }
    pb.set_message("refold: hot key");
    let hot = n / 2;
    let commits = || async {
        let s = status(&http, &base, "post_stats").await?;
        Ok::<_, anyhow::Error>(s.and_then(|s| s["commits"].as_u64()).unwrap_or(0))
    };
    let before = commits().await?;
    let secs = hot_key(&http, &base, hot).await?;
    let writes = commits().await? - before;
    figures.push(Figure {
        what: format!(
            "refold: hot key ({hot} events, 90% of likes and views on post p1), ingest until folded into post_stats"
        ),
        value: hot as f64 / secs,
        unit: "events/s",
        limit: limit.clone(),
    });
    // Operations on one key are combined per batch: p1 is written once per
    // commit, so the events per commit say how much a hot key is folded down.
    figures.push(raw(
        &format!(
            "refold: hot key, events per post_stats commit ({writes} commits, each writing p1 once)"
        ),
        hot as f64 / writes.max(1) as f64,
        "events",
    ));
    pb.inc(1);
    figures.push(peak_rss(
        "refold: peak RSS of this process since the replays (bench client included)",
    ));
    served.stop().await;
    Ok(figures)
}

/// refold served in this process on `config`, with an HTTP client for it.
struct Served {
    refold: Refold,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    http: reqwest::Client,
    base: String,
}

impl Served {
    async fn start(config: &Config, log: Arc<dyn EventLog>) -> anyhow::Result<Served> {
        let refold = Refold::start(config, log).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let app = crate::http::app(refold.state.clone());
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()?;
        Ok(Served {
            refold,
            server,
            http,
            base,
        })
    }

    async fn stop(self) {
        self.server.abort();
        self.refold.stop().await;
    }
}

fn latency_figures(figures: &mut Vec<Figure>, lat: &[f64; 3], beside: &str) {
    for (q, v) in [("p50", lat[0]), ("p99", lat[1]), ("p99.9", lat[2])] {
        figures.push(Figure {
            what: format!("refold: append latency {q} at 1,000 requests/s, {beside}"),
            value: v,
            unit: "ms",
            limit: None,
        });
    }
}

/// Waits until every projection has folded the whole log (lag 0).
async fn caught_up(http: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let b: Value = http
            .get(format!("{base}/projections"))
            .send()
            .await?
            .json()
            .await?;
        let list = b["projections"].as_array().cloned().unwrap_or_default();
        if let Some(failed) = list.iter().find(|p| p["state"] == "failed") {
            bail!("projection {} failed: {}", failed["name"], failed["error"]);
        }
        if list.iter().all(|p| p["lag"] == 0) {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(1800) {
            bail!("the projections did not catch up with the log within 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many steps [`run`] reports to its progress bar.
pub const STEPS: u64 = 11;

fn raw(what: &str, value: f64, unit: &'static str) -> Figure {
    Figure {
        what: what.into(),
        value,
        unit,
        limit: None,
    }
}

/// The table, as markdown.
pub fn markdown(figures: &[Figure]) -> String {
    let mut out = String::from("| figure | value | limit | ratio |\n|---|--:|---|--:|\n");
    for f in figures {
        let value = if f.value.is_nan() {
            "-".to_owned()
        } else {
            format!("{} {}", human(f.value), f.unit)
        };
        let (limit, ratio) = match &f.limit {
            Some((name, v)) => (
                format!("{name}: {} {}", human(*v), f.unit),
                format!("{:.0}%", 100.0 * f.value / v),
            ),
            None => ("".into(), "".into()),
        };
        out.push_str(&format!("| {} | {value} | {limit} | {ratio} |\n", f.what));
    }
    out
}

fn human(v: f64) -> String {
    if v >= 100.0 {
        let n = v.round() as u64;
        let s = n.to_string();
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else {
        format!("{v:.1}")
    }
}

fn rate(n: usize, since: Instant) -> f64 {
    n as f64 / since.elapsed().as_secs_f64().max(1e-9)
}

/// The raw records: [`RECORD_BYTES`] each, keyed and partitioned as refold keys
/// events (`{stream}/{version}`, 1000 streams, the stream's partition of 3).
fn raw_record(i: usize) -> (String, u32) {
    let stream = format!("bench-{}", i % 1000);
    let partition = crate::log::partition_for(&stream, 3);
    (
        crate::event::event_key(&stream, (i / 1000) as u64 + 1),
        partition,
    )
}

/// The raw topics' settings: refold's events topic's (3 partitions, compacted).
fn raw_topic(name: &str) -> TopicSpec {
    TopicSpec {
        name: name.to_owned(),
        partitions: 3,
        replication_factor: 1,
        config: [("cleanup.policy".to_owned(), "compact".to_owned())].into(),
    }
}

/// Appends `n` records ([`raw_record`]) in batches of [`BATCH`] straight to the
/// log, then reads them back: events/s of each.
async fn raw_log(log: &Arc<dyn EventLog>, config: &Config, n: usize) -> anyhow::Result<(f64, f64)> {
    let topic = config.topic("bench-raw");
    log.create_topic(&raw_topic(&topic)).await?;
    let value = vec![b'x'; RECORD_BYTES];
    let started = Instant::now();
    let mut sent = 0;
    while sent < n {
        let batch: Vec<ProduceRecord> = (sent..(sent + BATCH).min(n))
            .map(|i| {
                let (key, partition) = raw_record(i);
                ProduceRecord {
                    topic: topic.clone(),
                    partition,
                    record: Record {
                        key,
                        value: Some(value.clone()),
                        headers: vec![("type".into(), b"Bench".to_vec())],
                        timestamp_ms: 0,
                    },
                }
            })
            .collect();
        sent += batch.len();
        log.append(batch).await?;
    }
    let append = rate(n, started);
    let read = raw_read(log, &topic).await?;
    Ok((append, read))
}

/// Reads `topic` from the start to its end offsets, all partitions at once as a
/// projection's workers read them, through the log adapter: records/s.
async fn raw_read(log: &Arc<dyn EventLog>, topic: &str) -> anyhow::Result<f64> {
    let ends = log.end_offsets(topic).await?;
    let started = Instant::now();
    let mut partitions = tokio::task::JoinSet::new();
    for (p, end) in ends.into_iter().enumerate() {
        let (log, topic) = (log.clone(), topic.to_owned());
        partitions.spawn(async move {
            let mut got = 0;
            read_partition(&log, &topic, p as u32, end, |records| got += records.len()).await?;
            Ok::<_, anyhow::Error>(got)
        });
    }
    let mut read = 0;
    while let Some(got) = partitions.join_next().await {
        read += got??;
    }
    Ok(rate(read, started))
}

/// Reads partition `p` of `topic` from its start to `end` through the log
/// adapter, in reads of [`BATCH`] records, handing each read's records to
/// `each`.
async fn read_partition(
    log: &Arc<dyn EventLog>,
    topic: &str,
    p: u32,
    end: u64,
    mut each: impl FnMut(Vec<ConsumedRecord>),
) -> anyhow::Result<()> {
    let mut reader = log.reader(topic, p, 0).await?;
    let mut at = 0;
    while at < end {
        let batch = reader.next(BATCH, Duration::from_secs(10)).await?;
        if batch.records.is_empty() && batch.next_offset <= at {
            bail!("reading {topic}/{p} stalled at offset {at} of {end}");
        }
        at = batch.next_offset;
        each(batch.records);
    }
    Ok(())
}

/// A bare rdkafka producer with refold's settings (`acks=all`, idempotence,
/// explicit partitions) sends `n` records of [`RECORD_BYTES`], 10,000 in flight at
/// most; then one bare consumer per partition reads them back, all at once.
/// Events/s of each.
async fn bare_kafka(
    brokers: &str,
    properties: &[(String, crate::config::Secret)],
    fetch_wait: Duration,
    topic: &str,
    n: usize,
) -> anyhow::Result<(f64, f64)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::FutureRecord;
    let log =
        crate::log::kafka::KafkaLog::with_properties(brokers, properties, Duration::from_secs(30))?;
    log.create_topic(&raw_topic(topic)).await?;
    let base = crate::log::kafka::base_config(brokers, properties);
    let producer = crate::log::kafka::new_producer(&base, Duration::from_secs(30))?;
    let value = vec![b'x'; RECORD_BYTES];
    let mut per_partition = [0usize; 3];
    let started = Instant::now();
    let mut sent = 0;
    while sent < n {
        let window = (n - sent).min(10_000);
        let mut pending = Vec::with_capacity(window);
        for i in sent..sent + window {
            let (key, partition) = raw_record(i);
            per_partition[partition as usize] += 1;
            // The shape of refold's records: a key, a 300 B value, a `type` header.
            let record = FutureRecord::to(topic)
                .partition(partition as i32)
                .key(&key)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "type",
                    value: Some(b"Bench".as_slice()),
                }))
                .payload(&value);
            match producer.send_result(record) {
                Ok(delivery) => pending.push(delivery),
                Err((e, _)) => bail!("producing to {topic}: {e}"),
            }
        }
        for d in pending {
            d.await
                .map_err(|_| anyhow!("delivery of {topic} cancelled"))?
                .map_err(|(e, _)| anyhow!("delivery to {topic}: {e}"))?;
        }
        sent += window;
    }
    let produced = rate(n, started);
    let topic = topic.to_owned();
    let consumed = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let readers: Vec<_> = (0..3)
            .map(|p| {
                let (base, topic) = (base.clone(), topic.clone());
                std::thread::spawn(move || {
                    let consumer: BaseConsumer =
                        crate::log::kafka::reader_config(&base, fetch_wait).create()?;
                    let mut tpl = rdkafka::TopicPartitionList::new();
                    tpl.add_partition_offset(&topic, p, rdkafka::Offset::Beginning)?;
                    consumer.assign(&tpl)?;
                    let want = per_partition[p as usize];
                    let mut got = 0;
                    while got < want {
                        match consumer.poll(Duration::from_secs(10)) {
                            Some(m) => {
                                m?;
                                got += 1;
                            }
                            None => anyhow::bail!("reading {topic}/{p} stalled at {got} of {want}"),
                        }
                    }
                    Ok::<_, anyhow::Error>(got)
                })
            })
            .collect();
        let mut read = 0;
        for r in readers {
            read += r
                .join()
                .map_err(|_| anyhow!("a reader thread panicked"))??;
        }
        Ok::<_, anyhow::Error>(rate(read, started))
    })
    .await??;
    Ok((produced, consumed))
}

/// `post_stats`'s writes for the events of `writes` ([`post_stats_writes`]) as
/// Redis commands in pipelines of `batch` events (refold's projection batch),
/// built before the clock starts: HSET of a post's tribe, HINCRBY of its
/// counters, PFADD of its viewers, ZINCRBY of its ranking score: events/s. The
/// Redis store's limit for a replay of `post_stats`.
async fn raw_redis(
    url: &str,
    prefix: &str,
    writes: Vec<Vec<StatsWrite>>,
    batch: usize,
) -> anyhow::Result<f64> {
    let client = redis::Client::open(url)?;
    let mut con = client.get_multiplexed_async_connection().await?;
    let key = |k: &str| format!("{prefix}bench:{k}");
    let pipes: Vec<redis::Pipeline> = writes
        .chunks(batch)
        .map(|events| {
            let mut pipe = redis::pipe();
            for w in events.iter().flatten() {
                match w {
                    StatsWrite::Tribe { post, tribe } => {
                        pipe.hset(key(post), "tribe_id", tribe).ignore();
                    }
                    StatsWrite::Incr { post, field, by } => {
                        pipe.hincr(key(post), *field, *by).ignore();
                    }
                    StatsWrite::Viewer { post, user } => {
                        pipe.pfadd(key(&format!("{post}:viewers")), user).ignore();
                    }
                    StatsWrite::Rank { ranking, post, by } => {
                        pipe.zincr(key(ranking), post, *by).ignore();
                    }
                }
            }
            pipe
        })
        .collect();
    let n = writes.len();
    drop(writes);
    let started = Instant::now();
    for pipe in pipes {
        pipe.query_async::<()>(&mut con).await?;
    }
    let r = rate(n, started);
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}bench:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut con)
            .await?;
        if !keys.is_empty() {
            redis::cmd("UNLINK")
                .arg(keys)
                .query_async::<()>(&mut con)
                .await?;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    Ok(r)
}

/// One write `post_stats` makes for an event, worked out from the event alone
/// (a liked post's tribe from its `PostPublished`), with its keys rendered: what
/// any store of that read model writes per event, without refold's parsing, fold
/// or combining.
enum StatsWrite {
    /// `PostPublished`: the post's tribe.
    Tribe { post: String, tribe: String },
    /// `PostLiked`/`PostUnliked` (likes), `PostViewed` (views), `CommentAdded`.
    Incr {
        post: String,
        field: &'static str,
        by: i64,
    },
    /// `PostViewed`: the viewer joins the post's distinct viewers; a new one
    /// increments its `unique_viewers`.
    Viewer { post: String, user: String },
    /// `PostLiked`/`PostUnliked`: the post's score in its tribe's ranking.
    Rank {
        ranking: String,
        post: String,
        by: f64,
    },
}

/// The writes of `post_stats` (see `projections/post_stats.toml`) for every
/// event of `topic` (the events the replays fold), event by event, one
/// partition after the other (a post's events share its stream's partition).
/// Read and worked out before any clock starts.
async fn post_stats_writes(
    log: &Arc<dyn EventLog>,
    topic: &str,
) -> anyhow::Result<Vec<Vec<StatsWrite>>> {
    let mut out = Vec::new();
    let mut tribes = std::collections::HashMap::new();
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    for (p, end) in log.end_offsets(topic).await?.into_iter().enumerate() {
        read_partition(log, topic, p as u32, end, |records| {
            for r in records {
                let e: Value = r
                    .record
                    .value
                    .and_then(|v| serde_json::from_slice(&v).ok())
                    .unwrap_or_default();
                let (data, post) = (&e["data"], text(&e["data"]["post_id"]));
                let incr = |field, by| StatsWrite::Incr {
                    post: post.clone(),
                    field,
                    by,
                };
                let rank = |by| {
                    tribes.get(&post).map(|tribe: &String| StatsWrite::Rank {
                        ranking: format!("top_posts:{tribe}"),
                        post: post.clone(),
                        by,
                    })
                };
                out.push(match e["type"].as_str().unwrap_or_default() {
                    "PostPublished" => {
                        let tribe = text(&data["tribe_id"]);
                        tribes.insert(post.clone(), tribe.clone());
                        vec![StatsWrite::Tribe { post, tribe }]
                    }
                    "PostLiked" => [Some(incr("likes", 1)), rank(1.0)]
                        .into_iter()
                        .flatten()
                        .collect(),
                    "PostUnliked" => [Some(incr("likes", -1)), rank(-1.0)]
                        .into_iter()
                        .flatten()
                        .collect(),
                    "PostViewed" => vec![
                        incr("views", 1),
                        StatsWrite::Viewer {
                            user: text(&data["user_id"]),
                            post,
                        },
                    ],
                    "CommentAdded" => vec![incr("comments", 1)],
                    _ => Vec::new(),
                });
            }
        })
        .await?;
    }
    Ok(out)
}

/// `post_stats`'s writes for the events of `writes` ([`post_stats_writes`]) in
/// redb write transactions of `batch` events (refold's projection batch), with
/// the embedded key-value store's cache and durability (an fsync at most every
/// [`DURABLE_EVERY`]): every counter read, added to and written, every viewer
/// inserted, every ranking score moved in a score table and a score index, under
/// byte-string keys: events/s. The embedded key-value store's limit for a replay
/// of `post_stats`.
fn raw_redb(
    dir: &std::path::Path,
    writes: Vec<Vec<StatsWrite>>,
    batch: usize,
) -> anyhow::Result<f64> {
    use redb::{Durability, ReadableTable, TableDefinition};
    const COUNTERS: TableDefinition<&[u8], i64> = TableDefinition::new("counters");
    const TRIBES: TableDefinition<&str, &str> = TableDefinition::new("tribes");
    const VIEWERS: TableDefinition<&[u8], ()> = TableDefinition::new("viewers");
    const SCORES: TableDefinition<&[u8], f64> = TableDefinition::new("scores");
    const BY_SCORE: TableDefinition<&[u8], ()> = TableDefinition::new("by_score");
    /// A row's key: `a`, 0, then `b` and `c`.
    fn key<'k>(buf: &'k mut Vec<u8>, a: &str, b: &[u8], c: &[u8]) -> &'k [u8] {
        buf.clear();
        buf.extend_from_slice(a.as_bytes());
        buf.push(0);
        buf.extend_from_slice(b);
        buf.extend_from_slice(c);
        buf
    }
    fn incr(t: &mut redb::Table<&[u8], i64>, key: &[u8], by: i64) -> Result<(), redb::Error> {
        let v = t.get(key)?.map_or(0, |v| v.value());
        t.insert(key, v + by)?;
        Ok(())
    }
    std::fs::create_dir_all(dir)?;
    let db = redb::Builder::new()
        .set_cache_size(EMBEDDED_KV_CACHE_BYTES)
        .create(dir.join("raw.redb"))?;
    let (mut k, mut k2) = (Vec::new(), Vec::new());
    let mut durable = Instant::now();
    let started = Instant::now();
    for events in writes.chunks(batch) {
        let mut txn = db.begin_write()?;
        if durable.elapsed() >= DURABLE_EVERY {
            durable = Instant::now();
        } else {
            txn.set_durability(Durability::None)?;
        }
        {
            let mut counters = txn.open_table(COUNTERS)?;
            let mut tribes = txn.open_table(TRIBES)?;
            let mut viewers = txn.open_table(VIEWERS)?;
            let mut scores = txn.open_table(SCORES)?;
            let mut by_score = txn.open_table(BY_SCORE)?;
            for w in events.iter().flatten() {
                match w {
                    StatsWrite::Tribe { post, tribe } => {
                        tribes.insert(post.as_str(), tribe.as_str())?;
                    }
                    StatsWrite::Incr { post, field, by } => {
                        incr(&mut counters, key(&mut k, post, field.as_bytes(), b""), *by)?;
                    }
                    StatsWrite::Viewer { post, user } => {
                        let row = key(&mut k, post, user.as_bytes(), b"");
                        if viewers.insert(row, ())?.is_none() {
                            incr(&mut counters, key(&mut k, post, b"unique_viewers", b""), 1)?;
                        }
                    }
                    StatsWrite::Rank { ranking, post, by } => {
                        let at = key(&mut k, ranking, post.as_bytes(), b"");
                        let old = scores.get(at)?.map(|v| v.value());
                        if let Some(old) = old {
                            let idx = key(
                                &mut k2,
                                ranking,
                                &ordered(old).to_be_bytes(),
                                post.as_bytes(),
                            );
                            by_score.remove(idx)?;
                        }
                        let new = old.unwrap_or(0.0) + by;
                        scores.insert(at, new)?;
                        let idx = key(
                            &mut k2,
                            ranking,
                            &ordered(new).to_be_bytes(),
                            post.as_bytes(),
                        );
                        by_score.insert(idx, ())?;
                    }
                }
            }
        }
        txn.commit()?;
    }
    let r = rate(writes.len(), started);
    drop(db);
    let _ = std::fs::remove_dir_all(dir);
    Ok(r)
}

/// `n` small documents (the `posts` mapping's kinds of fields) added to a
/// tantivy index in commits of `batch` (refold's projection batch), the reader
/// reloaded after each, with the writer refold uses (one thread, 15 MB): docs/s.
/// The embedded document store's limit.
fn raw_tantivy(dir: &std::path::Path, n: usize, batch: usize) -> anyhow::Result<f64> {
    use tantivy::schema::{FAST, INDEXED, STORED, STRING, TEXT};
    let mut b = tantivy::schema::Schema::builder();
    let key = b.add_text_field("key", STRING | STORED | FAST);
    let title = b.add_text_field("title", TEXT);
    let tribe = b.add_text_field("tribe_id", STRING | FAST);
    let likes = b.add_i64_field("likes", INDEXED | FAST);
    let source = b.add_text_field("source", STORED);
    std::fs::create_dir_all(dir)?;
    let index = tantivy::Index::create_in_dir(dir, b.build())?;
    let mut writer: tantivy::IndexWriter = index.writer_with_num_threads(1, 15_000_000)?;
    let reader = index
        .reader_builder()
        .reload_policy(tantivy::ReloadPolicy::Manual)
        .try_into()?;
    let started = Instant::now();
    let mut done = 0;
    while done < n {
        for i in done..(done + batch).min(n) {
            let mut doc = tantivy::TantivyDocument::new();
            doc.add_text(key, format!("p{i}"));
            doc.add_text(title, format!("post {i}"));
            doc.add_text(tribe, format!("t{}", i % 20));
            doc.add_i64(likes, (i % 7) as i64);
            doc.add_text(
                source,
                format!(
                    "{{\"title\":\"post {i}\",\"tribe_id\":\"t{}\",\"likes\":{}}}",
                    i % 20,
                    i % 7
                ),
            );
            writer.add_document(doc)?;
        }
        writer.commit()?;
        reader.reload()?;
        done = (done + batch).min(n);
    }
    let r = rate(n, started);
    drop(writer);
    let _ = std::fs::remove_dir_all(dir);
    Ok(r)
}

/// `n` small documents indexed with `_bulk` in requests of `batch` (refold's
/// projection batch), each
/// refreshed as refold's are: docs/s.
async fn raw_bulk(url: &str, prefix: &str, n: usize, batch: usize) -> anyhow::Result<f64> {
    let http = reqwest::Client::new();
    let index = format!("{}bench-raw", prefix.to_lowercase());
    let base = url.trim_end_matches('/');
    let started = Instant::now();
    let mut done = 0;
    while done < n {
        let mut body = String::new();
        for i in done..(done + batch).min(n) {
            body.push_str(&format!("{{\"index\":{{\"_id\":\"p{i}\"}}}}\n"));
            body.push_str(&format!(
                "{{\"title\":\"post {i}\",\"tribe_id\":\"t{}\",\"likes\":{}}}\n",
                i % 20,
                i % 7
            ));
        }
        let r = http
            .post(format!("{base}/{index}/_bulk?refresh=true"))
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("_bulk to {index} answered {}", r.status());
        }
        done = (done + batch).min(n);
    }
    let r = rate(n, started);
    let _ = http.delete(format!("{base}/{index}")).send().await;
    Ok(r)
}

/// Posts `n` demo events of generator seed `seed` as NDJSON bulks of [`BATCH`]
/// from 4 clients, each sending the events of its own streams: events/s.
async fn ingest_bulk(
    http: &reqwest::Client,
    base: &str,
    n: usize,
    seed: u64,
) -> anyhow::Result<f64> {
    const CLIENTS: usize = 4;
    let mut generator = Generator::new(DemoConfig {
        seed,
        ..DemoConfig::default()
    });
    // Each client sends the events of its own streams, in order: clients racing
    // over one queue of batches would reorder a stream's events (a like before
    // its post is published, a dead letter).
    let mut lines: Vec<Vec<String>> = vec![Vec::new(); CLIENTS];
    for e in generator.take(n) {
        let client = crate::log::partition_for(&e.stream, CLIENTS as u32) as usize;
        lines[client].push(format!("{}\n", e.to_json()));
    }
    let bodies = lines
        .into_iter()
        .map(|l| l.chunks(BATCH).map(|c| c.concat()).collect::<Vec<_>>());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for bodies in bodies {
        let (http, base) = (http.clone(), base.to_owned());
        tasks.push(tokio::spawn(async move {
            for body in bodies {
                post_until_taken(
                    &http,
                    &format!("{base}/events"),
                    "application/x-ndjson",
                    body,
                )
                .await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(rate(n, started))
}

/// Posts a body until refold takes it (429/503 are retried after a pause).
async fn post_until_taken(
    http: &reqwest::Client,
    url: &str,
    content_type: &str,
    body: String,
) -> anyhow::Result<Value> {
    loop {
        let r = http
            .post(url)
            .header("content-type", content_type)
            .body(body.clone())
            .send()
            .await?;
        let status = r.status().as_u16();
        let b: Value = r.json().await.unwrap_or(Value::Null);
        match status {
            200 | 201 if b["errors"] != true => return Ok(b),
            429 | 503 => tokio::time::sleep(Duration::from_millis(50)).await,
            _ => bail!("{url} answered {status}: {b}"),
        }
    }
}

/// `n` single-event appends from `clients` concurrent clients: events/s.
async fn ingest_single(
    http: &reqwest::Client,
    base: &str,
    n: usize,
    clients: usize,
) -> anyhow::Result<f64> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (http, base, next) = (http.clone(), base.to_owned(), next.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                let body = json!({"type": "PostViewed", "data": {"post_id": format!("s{c}"), "user_id": "u1"}});
                let url = format!("{base}/streams/post-s{c}/events");
                post_until_taken(&http, &url, "application/json", body.to_string()).await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(rate(n, started))
}

/// Offers `per_sec` single-event appends per second for `secs` seconds, whatever
/// the answers' pace (open loop); latency p50, p99, p99.9 in ms.
async fn latency_at_rate(
    http: &reqwest::Client,
    base: &str,
    per_sec: u64,
    secs: u64,
) -> anyhow::Result<[f64; 3]> {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_sec as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::new();
    for i in 0..per_sec * secs {
        tick.tick().await;
        let (http, base) = (http.clone(), base.to_owned());
        tasks.push(tokio::spawn(async move {
            let body = json!({"type": "PostViewed", "data": {"post_id": format!("l{}", i % 100), "user_id": "u1"}});
            let started = Instant::now();
            let r = http
                .post(format!("{base}/streams/post-l{}/events", i % 100))
                .json(&body)
                .send()
                .await?;
            if r.status() != 201 {
                bail!("append answered {}", r.status());
            }
            Ok::<_, anyhow::Error>(started.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let mut ms = Vec::with_capacity(tasks.len());
    for t in tasks {
        ms.push(t.await??);
    }
    Ok([
        quantile(&mut ms, 0.5),
        quantile(&mut ms, 0.99),
        quantile(&mut ms, 0.999),
    ])
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// Appends a like, then reads the post's `post_stats` with the append's position
/// token: the time until the read model shows it, p50 and p99 in ms.
async fn visibility(
    http: &reqwest::Client,
    base: &str,
    samples: usize,
) -> anyhow::Result<[f64; 2]> {
    let published = json!({"type": "PostPublished", "data": {"post_id": "vis", "tribe_id": "t1",
        "author_id": "u1", "title": "t", "body": "b"}});
    post_until_taken(
        http,
        &format!("{base}/streams/post-vis/events"),
        "application/json",
        published.to_string(),
    )
    .await?;
    let mut ms = Vec::with_capacity(samples);
    for _ in 0..samples {
        let started = Instant::now();
        let like = json!({"type": "PostLiked", "data": {"post_id": "vis", "user_id": "u1"}});
        let b = post_until_taken(
            http,
            &format!("{base}/streams/post-vis/events"),
            "application/json",
            like.to_string(),
        )
        .await?;
        let token = b["position"]
            .as_str()
            .ok_or_else(|| anyhow!("no position in {b}"))?;
        let r = http
            .get(format!(
                "{base}/views/post_stats/vis?after={token}&wait_ms=30000"
            ))
            .send()
            .await?;
        if r.status() != 200 {
            bail!("post_stats/vis answered {}", r.status());
        }
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok([quantile(&mut ms, 0.5), quantile(&mut ms, 0.99)])
}

/// Posts `n` demo events with most likes and views on one post, one bulk after
/// the other, then waits until `post_stats` shows all of them: seconds taken.
async fn hot_key(http: &reqwest::Client, base: &str, n: usize) -> anyhow::Result<f64> {
    let mut generator = Generator::new(DemoConfig {
        seed: 7,
        hot_share: 0.9,
        ..DemoConfig::default()
    });
    let started = Instant::now();
    let mut position = crate::position::Position::default();
    let mut sent = 0;
    while sent < n {
        let body: String = generator
            .take(BATCH.min(n - sent))
            .iter()
            .map(|e| format!("{}\n", e.to_json()))
            .collect();
        sent += BATCH.min(n - sent);
        let b = post_until_taken(
            http,
            &format!("{base}/events"),
            "application/x-ndjson",
            body,
        )
        .await?;
        if let Some(p) = b["position"].as_str() {
            position.merge(&p.parse().map_err(|e| anyhow!("bad position {p}: {e}"))?);
        }
    }
    // The longest wait refold grants is 60 s; a slow fold is waited for again.
    for _ in 0..10 {
        let r = http
            .get(format!(
                "{base}/views/post_stats/p1?after={position}&wait_ms=60000"
            ))
            .send()
            .await?;
        match r.status().as_u16() {
            // 404: folded, and p1 has no post_stats yet (a short run of setup events).
            200 | 404 => return Ok(started.elapsed().as_secs_f64()),
            503 => continue,
            s => bail!(
                "post_stats/p1 answered {s}: {}",
                r.text().await.unwrap_or_default()
            ),
        }
    }
    bail!("post_stats did not fold the hot-key events within 10 minutes")
}

/// Events in the events topic.
async fn log_events(log: &dyn EventLog, config: &Config) -> anyhow::Result<u64> {
    Ok(log
        .end_offsets(&config.topic(crate::migrate::EVENTS))
        .await?
        .iter()
        .sum())
}

/// `GET /projections/{name}`: the status, `None` when there is no such projection.
async fn status(http: &reqwest::Client, base: &str, name: &str) -> anyhow::Result<Option<Value>> {
    let r = http
        .get(format!("{base}/projections/{name}"))
        .send()
        .await?;
    if r.status() == 404 {
        return Ok(None);
    }
    Ok(Some(r.error_for_status()?.json().await?))
}

/// Starts a replay of `projection` and waits for the switch: seconds taken.
async fn replay(http: &reqwest::Client, base: &str, projection: &str) -> anyhow::Result<f64> {
    let current = || async {
        status(http, base, projection)
            .await?
            .ok_or_else(|| anyhow!("no projection {projection}"))
    };
    let before = current().await?["generation"]
        .as_u64()
        .ok_or_else(|| anyhow!("{projection} has no live generation"))?;
    let started = Instant::now();
    let r = http
        .post(format!("{base}/projections/{projection}/replay"))
        .send()
        .await?;
    if r.status() != 202 {
        bail!("replay of {projection} answered {}", r.status());
    }
    loop {
        let s = current().await?;
        if s["generation"].as_u64() > Some(before) {
            return Ok(started.elapsed().as_secs_f64());
        }
        if s["state"] == "failed" {
            bail!("replay of {projection} failed: {s}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// This process's peak resident memory (Linux), as a figure.
fn peak_rss(what: &str) -> Figure {
    Figure {
        what: what.into(),
        value: proc_memory("self", "VmHWM").map_or(f64::NAN, mib),
        unit: "MiB",
        limit: None,
    }
}

/// Resets this process's peak resident memory to what it holds now (Linux: 5 to
/// `/proc/self/clear_refs`), after handing freed memory back to the system (the
/// bench client's bodies): jemalloc's (Rust's allocations) and glibc's (the C
/// libraries'); that, in MiB.
fn reset_peak_rss() -> Option<f64> {
    #[cfg(not(target_env = "msvc"))]
    {
        // MALLCTL_ARENAS_ALL (4096): every arena.
        let purge = c"arena.4096.purge";
        // SAFETY: a purge takes no arguments and only releases unused pages.
        unsafe {
            tikv_jemalloc_sys::mallctl(
                purge.as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: glibc's malloc_trim only releases free heap memory.
        unsafe { malloc_trim(0) };
    }
    std::fs::write("/proc/self/clear_refs", "5").ok()?;
    proc_memory("self", "VmRSS").map(mib)
}

/// A memory figure (`VmHWM`, `VmRSS`, ...) of `/proc/{pid}/status`, in bytes;
/// `pid` is a process id or `self`. Linux only.
pub fn proc_memory(pid: &str, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// A progress bar over [`STEPS`], with the current measurement as its message.
pub fn progress() -> anyhow::Result<ProgressBar> {
    let pb = ProgressBar::new(STEPS).with_style(
        ProgressStyle::with_template("[{elapsed_precise}] [{wide_bar}] {pos}/{len} {msg}")
            .context("progress bar template")?
            .progress_chars("=> "),
    );
    Ok(pb)
}
