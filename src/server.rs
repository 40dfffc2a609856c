//! Wiring: open the log, check or apply migrations, start the write path, serve.
//!
//! Shutdown protocol (SIGINT/SIGTERM): stop accepting connections and wait for the
//! requests in flight (each waits for its write to be durable), then drop the last
//! writer handle: the writer finishes its queue, writes a final stream-heads
//! snapshot and flushes the log. Then the projection workers stop after the batch
//! each has in flight (batch and checkpoint are committed together, so stopping
//! anywhere is safe). Only then does the process exit.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::config::{Config, LogBackend};
use crate::http::{AppState, Backends, app};
use crate::log::EventLog;
use crate::log::embedded::EmbeddedLog;
use crate::log::kafka::KafkaLog;
use crate::metrics::Metrics;
use crate::migrate;
use crate::projection::def::{Definition, StoreKind};
use crate::projection::engine::{self, Engine, EngineConfig};
use crate::projection::history;
use crate::projection::store::doc::{DocStore, Specs};
use crate::projection::store::elastic::ElasticStore;
use crate::projection::store::embedded::EmbeddedKv;
use crate::projection::store::embedded_docs::EmbeddedDocs;
use crate::projection::store::redis::RedisStore;
use crate::projection::store::{KvStore, Stores};
use crate::writer::{Writer, WriterConfig, WriterTask};

/// Opens the configured event log.
pub fn open_log(config: &Config) -> anyhow::Result<Arc<dyn EventLog>> {
    Ok(match config.log {
        LogBackend::Embedded => Arc::new(EmbeddedLog::open(&config.data_dir)?),
        LogBackend::Kafka => {
            let brokers = config
                .kafka_brokers
                .as_deref()
                .context("--kafka-brokers is required")?;
            Arc::new(
                KafkaLog::with_properties(brokers, &config.kafka_properties, config.kafka_timeout)?
                    .with_fetch_wait(config.kafka_fetch_wait),
            )
        }
    })
}

/// Opens the key-value read-model store: Redis when `--redis-url` is set, the
/// embedded stand-in under the data directory otherwise.
pub async fn open_kv(config: &Config) -> anyhow::Result<Arc<dyn KvStore>> {
    Ok(match &config.redis_url {
        Some(url) => Arc::new(
            RedisStore::connect(url, &config.topic_prefix)
                .await
                .context("cannot use Redis (--redis-url)")?,
        ),
        None => Arc::new(EmbeddedKv::open(&config.data_dir)?),
    })
}

/// Opens the document read-model store: Elasticsearch when `--elasticsearch-url`
/// is set, the embedded stand-in under the data directory otherwise.
pub async fn open_docs(config: &Config, specs: Specs) -> anyhow::Result<Arc<dyn DocStore>> {
    Ok(match &config.elasticsearch_url {
        Some(url) => Arc::new(
            ElasticStore::connect_with(
                url,
                &config.elasticsearch_auth,
                &config.topic_prefix,
                specs,
            )
            .await
            .context("cannot use Elasticsearch (--elasticsearch-url)")?,
        ),
        None => Arc::new(EmbeddedDocs::open(&config.data_dir, specs)?),
    })
}

/// The projections of `--projections`, plus the built-in stream history unless
/// it is switched off.
pub fn load_projections(config: &Config) -> anyhow::Result<Vec<Definition>> {
    let mut defs = engine::load_dir(&config.projections)?;
    if let Some(d) = defs.iter().find(|d| d.name == history::NAME) {
        anyhow::bail!(
            "{}: the name `{}` is taken by the built-in stream history; rename the projection",
            d.file.display(),
            history::NAME
        );
    }
    if config.stream_history {
        defs.push(history::definition());
    }
    Ok(defs)
}

/// Opens the stores the projections need (and only those).
pub async fn open_stores(
    config: &Config,
    defs: &[Definition],
    specs: &Specs,
) -> anyhow::Result<Stores> {
    let needs = |k: StoreKind| defs.iter().any(|d| d.store == k);
    Ok(Stores {
        kv: match needs(StoreKind::Redis) {
            true => Some(open_kv(config).await?),
            false => None,
        },
        docs: match needs(StoreKind::Elasticsearch) {
            true => Some(open_docs(config, specs.clone()).await?),
            false => None,
        },
    })
}

pub fn writer_config(config: &Config, metrics: Arc<Metrics>) -> WriterConfig {
    WriterConfig {
        events_topic: config.topic(migrate::EVENTS),
        heads_topic: config.topic(migrate::STREAM_HEADS),
        buffer_bytes: config.ingest_buffer,
        max_batch_events: config.max_batch_events,
        idempotency_window: config.idempotency_window,
        snapshot_every: config.snapshot_every,
        snapshot_interval: Duration::from_secs(1),
        metrics,
    }
}

/// How long `GET /readyz` waits for each backend to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a readiness answer is reused: probes, however many, cost the
/// backends one check per interval.
const READY_REUSE: Duration = Duration::from_secs(1);

/// Readiness of the backends: the log answers and is migrated, every
/// projection's store answers. One check runs at a time; its answer serves the
/// probes of the next second.
struct Readiness {
    log: Arc<dyn EventLog>,
    migrations: Vec<migrate::Migration>,
    prefix: String,
    last: tokio::sync::Mutex<Option<(std::time::Instant, Result<(), String>)>>,
}

/// `check`, or an error naming `what` when it takes longer than [`READY_TIMEOUT`].
async fn within<E: std::fmt::Display>(
    what: &str,
    check: impl Future<Output = Result<(), E>>,
) -> Result<(), String> {
    match tokio::time::timeout(READY_TIMEOUT, check).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!(
            "{what}: no answer within {} s",
            READY_TIMEOUT.as_secs()
        )),
    }
}

impl Readiness {
    async fn check(&self, engine: &Engine) -> Result<(), String> {
        let log = self.log.backend();
        let events = format!("{}{}", self.prefix, migrate::EVENTS);
        within(&format!("the {log} log does not answer"), async {
            self.log.end_offsets(&events).await.map(|_| ())
        })
        .await?;
        within(
            &format!("the {log} log is not migrated"),
            migrate::check(&*self.log, &self.migrations, &self.prefix),
        )
        .await?;
        for p in engine.all() {
            let what = format!(
                "the {} store of projection {} does not answer",
                p.store().backend(),
                p.name
            );
            within(&what, async { p.store().meta(&p.name).await.map(|_| ()) }).await?;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Backends for Readiness {
    async fn ready(&self, engine: &Engine) -> Result<(), String> {
        let mut last = self.last.lock().await;
        if let Some((at, answer)) = &*last
            && at.elapsed() < READY_REUSE
        {
            return answer.clone();
        }
        let answer = self.check(engine).await;
        *last = Some((std::time::Instant::now(), answer.clone()));
        answer
    }
}

/// A started service, not yet serving HTTP.
pub struct Refold {
    pub state: AppState,
    pub log: Arc<dyn EventLog>,
    writer_task: WriterTask,
}

impl Refold {
    /// Migrates (or checks migrations) and recovers the write path on `log`.
    pub async fn start(config: &Config, log: Arc<dyn EventLog>) -> anyhow::Result<Refold> {
        let migrations = migrate::load(&config.migrations)?;
        if config.auto_migrate {
            let report = migrate::migrate(&*log, &migrations, &config.topic_prefix).await?;
            if !report.applied.is_empty() {
                info!(applied = ?report.applied, "migrations applied at start");
            }
        } else {
            migrate::check(&*log, &migrations, &config.topic_prefix).await?;
        }
        let defs = load_projections(config)?;
        if defs.is_empty() {
            warn!(dir = %config.projections.display(), "no projection definitions found; only ingest is served");
        }
        let mut specs = migrate::index_specs(&migrations);
        specs.insert(history::NAME.to_string(), history::spec());
        let stores = open_stores(config, &defs, &specs).await?;
        let metrics = Arc::new(Metrics::new());
        let events = config.topic(migrate::EVENTS);
        let partitions = log
            .describe_topic(&events)
            .await?
            .with_context(|| format!("topic {events} does not exist; run `refold migrate`"))?
            .partitions;
        let engine = Engine::start(
            log.clone(),
            stores,
            defs,
            EngineConfig {
                topic: events,
                partitions,
                batch: config.projection_batch,
                commit_interval: config.document_commit_interval,
                fold_buffer: config.fold_buffer,
                specs,
                metrics: metrics.clone(),
            },
        )
        .await?;
        let (writer, writer_task) =
            Writer::start(log.clone(), writer_config(config, metrics.clone())).await?;
        let backends = Readiness {
            log: log.clone(),
            migrations,
            prefix: config.topic_prefix.clone(),
            last: tokio::sync::Mutex::new(None),
        };
        Ok(Refold {
            state: AppState {
                writer,
                engine: Arc::new(engine),
                body_limit: config.body_limit,
                keys: config.api_keys.clone(),
                metrics,
                backends: Arc::new(backends),
            },
            log,
            writer_task,
        })
    }

    /// Drains the write path (queued appends are written, the stream heads
    /// snapshotted and the log flushed; appends arriving later get 503), then stops
    /// the projection workers after the batch each has in flight.
    pub async fn stop(self) {
        self.writer_task.stop().await;
        self.state.engine.stop().await;
    }
}

/// Serves until `shutdown` resolves, then shuts down gracefully.
pub async fn run(
    config: &Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let refold = Refold::start(config, open_log(config)?).await?;
    let addr = listener.local_addr()?;
    info!(%addr, log = refold.log.backend(), "refold listening");
    if config.api_keys.is_open() && !addr.ip().is_loopback() {
        warn!(%addr, "the API is open to anyone who can reach this address: set api_keys (REFOLD_API_KEYS) to require keys");
    }
    axum::serve(listener, app(refold.state.clone()))
        .with_graceful_shutdown(shutdown)
        .await
        .context("HTTP server failed")?;
    info!("stopped accepting requests; draining the write path");
    refold.stop().await;
    info!("shutdown complete");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    info!("shutdown signal received");
}
