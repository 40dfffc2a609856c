//! `GET /metrics`: Prometheus (OpenMetrics text) metrics of one refold process.
//!
//! Event-driven figures (requests, latencies, batch sizes, store writes) are
//! recorded where they happen: the HTTP layer, the writer and the projection
//! workers hold an `Arc<Metrics>`. State figures (write-path queue, projection
//! positions, lag, rates, dead letters, replay progress) are read when scraped,
//! from the same status the API serves, so the two never disagree.
//!
//! Label values are bounded: routes are the router's templates, outcomes are
//! error codes, projections and partitions are fixed by configuration.

use std::fmt::Write as _;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Metric, Registry};
use serde_json::Value;
use std::sync::atomic::AtomicU64;

type Labels<const N: usize> = [(&'static str, String); N];
type Histograms<const N: usize> = Family<Labels<N>, Histogram, fn() -> Histogram>;
type GaugeF = Gauge<f64, AtomicU64>;

/// The content type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn seconds() -> Histogram {
    // 0.1 ms .. ~13 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

fn counts() -> Histogram {
    // 1 .. 65536 events
    Histogram::new(exponential_buckets(1.0, 4.0, 9))
}

const PREFIX: &str = "refold";

/// The registry being filled, with the sample names each metric yields.
struct Registrar {
    registry: Registry,
    names: Vec<String>,
}

impl Registrar {
    /// Registers `metric` as `refold_{name}`; the metric, for its field.
    fn add<M: Metric + TypedMetric + Clone>(&mut self, name: &str, help: &str, metric: M) -> M {
        let full = format!("{PREFIX}_{name}");
        match M::TYPE {
            MetricType::Counter => self.names.push(format!("{full}_total")),
            MetricType::Histogram => self
                .names
                .extend(["_bucket", "_sum", "_count"].map(|s| format!("{full}{s}"))),
            _ => self.names.push(full),
        }
        self.registry.register(name, help, metric.clone());
        metric
    }
}

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    names: Vec<String>,
    scraping: std::sync::Mutex<()>,
    http_requests: Family<Labels<3>, Counter>,
    ingest_requests: Family<Labels<2>, Counter>,
    ingest_events: Family<Labels<1>, Counter>,
    ingest_duration: Histograms<2>,
    write_queue_bytes: Gauge,
    write_queue_capacity: Gauge,
    write_queue_requests: Gauge,
    write_batch_events: Histogram,
    log_append_duration: Histogram,
    projection_events: Family<Labels<1>, Counter>,
    projection_commits: Family<Labels<1>, Counter>,
    projection_batch_events: Histograms<1>,
    store_write_duration: Histograms<2>,
    position: Family<Labels<2>, Gauge>,
    lag: Family<Labels<2>, Gauge>,
    events_per_second: Family<Labels<1>, GaugeF>,
    dead_letters: Family<Labels<1>, Gauge>,
    replay_progress: Family<Labels<1>, GaugeF>,
    state: Family<Labels<2>, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registrar {
            registry: Registry::with_prefix(PREFIX),
            names: Vec::new(),
        };
        Metrics {
            http_requests: r.add(
                "http_requests",
                "HTTP requests by method, route template and status",
                Family::default(),
            ),
            ingest_requests: r.add(
                "ingest_requests",
                "Append requests by endpoint (stream, bulk) and outcome (created, repeated, accepted or an error code)",
                Family::default(),
            ),
            ingest_events: r.add(
                "ingest_events",
                "Events in append requests by outcome (appended, repeated, refused)",
                Family::default(),
            ),
            ingest_duration: r.add(
                "ingest_duration_seconds",
                "Append request latency by endpoint and outcome, body read to answer",
                Family::new_with_constructor(seconds),
            ),
            write_queue_bytes: r.add(
                "write_queue_bytes",
                "Request bytes admitted into the write path and not yet answered",
                Gauge::default(),
            ),
            write_queue_capacity: r.add(
                "write_queue_capacity_bytes",
                "Bytes the write path admits at once (ingest_buffer); beyond it appends get 429",
                Gauge::default(),
            ),
            write_queue_requests: r.add(
                "write_queue_requests",
                "Append requests waiting for the writer",
                Gauge::default(),
            ),
            write_batch_events: r.add(
                "write_batch_events",
                "Events per durable log append (group commit)",
                counts(),
            ),
            log_append_duration: r.add(
                "log_append_duration_seconds",
                "Time for the log to make one batch durable",
                seconds(),
            ),
            projection_events: r.add(
                "projection_events",
                "Log records folded by each projection in this process (replays included)",
                Family::default(),
            ),
            projection_commits: r.add(
                "projection_commits",
                "Store writes (batch plus checkpoint) by each projection",
                Family::default(),
            ),
            projection_batch_events: r.add(
                "projection_batch_events",
                "Log records per projection batch",
                Family::new_with_constructor(counts),
            ),
            store_write_duration: r.add(
                "projection_store_write_duration_seconds",
                "Time to write one folded batch with its checkpoint, by projection and store",
                Family::new_with_constructor(seconds),
            ),
            position: r.add(
                "projection_position",
                "Next log offset the live generation reads, per projection and partition",
                Family::default(),
            ),
            lag: r.add(
                "projection_lag",
                "Log records not yet applied, per projection and partition",
                Family::default(),
            ),
            events_per_second: r.add(
                "projection_events_per_second",
                "Recent fold rate of each projection's live generation",
                Family::default(),
            ),
            dead_letters: r.add(
                "projection_dead_letters",
                "Dead letters recorded by each projection's live generation",
                Family::default(),
            ),
            replay_progress: r.add(
                "projection_replay_progress",
                "Share of the log a running replay has folded (0 to 1)",
                Family::default(),
            ),
            state: r.add(
                "projection_state",
                "1 for each projection's current state (running, replaying, failed)",
                Family::default(),
            ),
            registry: r.registry,
            names: r.names,
            scraping: std::sync::Mutex::new(()),
        }
    }

    /// Every sample name the exposition can hold (counters with `_total`,
    /// histograms with `_bucket`, `_sum` and `_count`), whether or not it has
    /// samples yet.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// One HTTP request answered.
    pub fn http_request(&self, method: &str, route: &str, status: u16) {
        self.http_requests
            .get_or_create(&[
                ("method", method.to_owned()),
                ("route", route.to_owned()),
                ("status", status.to_string()),
            ])
            .inc();
    }

    /// One append request answered: `endpoint` is `stream` or `bulk`, `outcome`
    /// `created`, `repeated`, `accepted` or an error code; `events` counts
    /// the request's events by what became of them.
    pub fn ingest(&self, endpoint: &'static str, outcome: &str, took: Duration, events: Tally) {
        let labels = [
            ("endpoint", endpoint.to_owned()),
            ("outcome", outcome.to_owned()),
        ];
        self.ingest_requests.get_or_create(&labels).inc();
        self.ingest_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        for (outcome, n) in [
            ("appended", events.appended),
            ("repeated", events.repeated),
            ("refused", events.refused),
        ] {
            if n > 0 {
                self.ingest_events
                    .get_or_create(&[("outcome", outcome.to_owned())])
                    .inc_by(n);
            }
        }
    }

    /// The exposition, with the scrape-time gauges set from the write path's
    /// queue `(bytes, capacity, requests)` and the projections' status objects
    /// (one scrape at a time, so none renders another's half-set gauges).
    pub fn scrape(&self, queue: (u64, u64, u64), statuses: &[Value]) -> String {
        let _one = self.scraping.lock().unwrap_or_else(|e| e.into_inner());
        let (bytes, capacity, requests) = queue;
        self.write_queue_bytes.set(bytes as i64);
        self.write_queue_capacity.set(capacity as i64);
        self.write_queue_requests.set(requests as i64);
        self.projections(statuses);
        self.render()
    }

    /// One durable log append of `events` events.
    pub fn log_append(&self, events: u64, took: Duration) {
        self.write_batch_events.observe(events as f64);
        self.log_append_duration.observe(took.as_secs_f64());
    }

    /// One projection batch of `records` written to `store` in `took`.
    pub fn projection_commit(&self, projection: &str, store: &str, records: u64, took: Duration) {
        let p = [("projection", projection.to_owned())];
        self.projection_events.get_or_create(&p).inc_by(records);
        self.projection_commits.get_or_create(&p).inc();
        self.projection_batch_events
            .get_or_create(&p)
            .observe(records as f64);
        self.store_write_duration
            .get_or_create(&[
                ("projection", projection.to_owned()),
                ("store", store.to_owned()),
            ])
            .observe(took.as_secs_f64());
    }

    /// The state gauges of every projection, from the status objects of
    /// `GET /projections` (read at scrape time; absent projections vanish).
    fn projections(&self, statuses: &[Value]) {
        for f in [&self.position, &self.lag, &self.state] {
            f.clear();
        }
        for f in [&self.events_per_second, &self.replay_progress] {
            f.clear();
        }
        self.dead_letters.clear();
        for s in statuses {
            let name = s["name"].as_str().unwrap_or_default().to_owned();
            let p = [("projection", name.clone())];
            for part in s["partitions"].as_array().into_iter().flatten() {
                let labels = [
                    ("projection", name.clone()),
                    ("partition", part["partition"].to_string()),
                ];
                if let Some(pos) = part["position"].as_i64() {
                    self.position.get_or_create(&labels).set(pos);
                }
                if let Some(lag) = part["lag"].as_i64() {
                    self.lag.get_or_create(&labels).set(lag);
                }
            }
            if let Some(r) = s["events_per_sec"].as_f64() {
                self.events_per_second.get_or_create(&p).set(r);
            }
            if let Some(n) = s["dead_letters"]["count"].as_i64() {
                self.dead_letters.get_or_create(&p).set(n);
            }
            if let Some(progress) = s["replay"]["progress"].as_f64() {
                self.replay_progress.get_or_create(&p).set(progress);
            }
            let state = s["state"].as_str().unwrap_or("unknown").to_owned();
            self.state
                .get_or_create(&[("projection", name), ("state", state)])
                .set(1);
        }
    }

    /// The exposition text.
    fn render(&self) -> String {
        let mut out = String::with_capacity(16 << 10);
        if encode(&mut out, &self.registry).is_err() {
            // Writing to a String cannot fail; keep the exposition well formed.
            out.clear();
            let _ = writeln!(out, "# EOF");
        }
        out
    }
}

/// What became of an append request's events.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub appended: u64,
    pub repeated: u64,
    pub refused: u64,
}

impl Tally {
    /// `n` events of one append: created (`Some(true)`), an idempotent repeat
    /// (`Some(false)`) or refused (`None`).
    pub fn record(&mut self, created: Option<bool>, n: u64) {
        match created {
            Some(true) => self.appended += n,
            Some(false) => self.repeated += n,
            None => self.refused += n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_exposition_names_what_happened() {
        let m = Metrics::new();
        m.http_request("GET", "/healthz", 200);
        m.ingest(
            "stream",
            "created",
            Duration::from_millis(3),
            Tally {
                appended: 2,
                ..Tally::default()
            },
        );
        m.projection_commit("post_stats", "redis", 40, Duration::from_millis(2));
        let text = m.scrape(
            (1024, 4096, 1),
            &[json!({
                "name": "post_stats", "state": "replaying", "events_per_sec": 12.5,
                "partitions": [{"partition": 0, "position": 7, "lag": 3}],
                "dead_letters": {"count": 1}, "replay": {"progress": 0.25},
            })],
        );
        for line in [
            r#"refold_http_requests_total{method="GET",route="/healthz",status="200"} 1"#,
            r#"refold_ingest_requests_total{endpoint="stream",outcome="created"} 1"#,
            r#"refold_ingest_events_total{outcome="appended"} 2"#,
            r#"refold_ingest_duration_seconds_count{endpoint="stream",outcome="created"} 1"#,
            r#"refold_projection_events_total{projection="post_stats"} 40"#,
            r#"refold_projection_batch_events_sum{projection="post_stats"} 40.0"#,
            r#"refold_projection_store_write_duration_seconds_count{projection="post_stats",store="redis"} 1"#,
            r#"refold_projection_position{projection="post_stats",partition="0"} 7"#,
            r#"refold_projection_lag{projection="post_stats",partition="0"} 3"#,
            r#"refold_projection_replay_progress{projection="post_stats"} 0.25"#,
            r#"refold_projection_state{projection="post_stats",state="replaying"} 1"#,
            r#"refold_projection_dead_letters{projection="post_stats"} 1"#,
            r#"refold_projection_events_per_second{projection="post_stats"} 12.5"#,
            "refold_write_queue_bytes 1024",
            "refold_write_queue_capacity_bytes 4096",
            "refold_write_queue_requests 1",
        ] {
            assert!(text.contains(line), "missing {line} in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        // Every sample in the exposition has a name of `names()`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(m.names().iter().any(|n| n == name), "{name} not in names()");
        }
        // A projection gone from the status is gone from the scrape.
        let text = m.scrape((0, 4096, 0), &[]);
        assert!(!text.contains("refold_projection_state{"), "{text}");
    }
}
