//! refold: event sourcing / CQRS in the Kappa style.
//!
//! Clients POST events over HTTP; refold appends them durably to a partitioned log
//! (Kafka, or an embedded log by default) and folds them into read models.
//!
//! Module map, following a request:
//!
//! | module | role |
//! |---|---|
//! | [`cli`] | `refold serve` / `refold migrate`; the binary is a thin call into it |
//! | [`client`] | the HTTP client of `refold status`, `replay` and `demo` |
//! | [`config`] | settings from `refold.toml`, `REFOLD_*` and flags, validated once |
//! | [`telemetry`] | tracing: human or JSON logs |
//! | [`server`] | wiring and graceful shutdown: log, migrations, write path, HTTP |
//! | [`http`] | the endpoint table (router and OpenAPI document), ingest endpoints, health, metrics |
//! | [`auth`] | API keys with scopes (append, read, admin), checked per route |
//! | [`metrics`] | `GET /metrics`: Prometheus counters, histograms and scrape-time gauges |
//! | [`openapi`] | `GET /openapi.json`, generated from the endpoint table |
//! | [`query`] | read side over HTTP: views, search, rankings, stream history, projection status and replay |
//! | [`error`] | [`error::ApiError`]: every error's status, code and JSON shape |
//! | [`event`] | request parsing and validation, the event envelope in the log |
//! | [`writer`] | the write path: versions, expected-version checks, idempotency, group commit, stream heads |
//! | [`position`] | position tokens returned by appends (read-your-writes) |
//! | [`log`] | the event-log port and its adapters: [`log::embedded`] (redb), [`log::kafka`] (rdkafka) |
//! | [`projection`] | projections: [`projection::def`] (definitions), [`projection::fold`] (pure fold, combining), [`projection::engine`] (workers, replay, status), [`projection::history`] (the built-in stream history), [`projection::store`] (key-value port: Redis, embedded redb; document port [`projection::store::doc`]: Elasticsearch, embedded tantivy) |
//! | [`demo`] | the demo domain's event generator (`refold demo`, tests, benchmarks) |
//! | [`bench`](mod@bench) | `refold bench`: refold's figures beside the raw limits of its log and stores |
//! | [`migrate`] | `migrations/*.toml`: topics created or checked, index declarations, applied once, recorded |

pub mod auth;
pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod demo;
pub mod error;
pub mod event;
pub mod http;
pub mod log;
pub mod metrics;
pub mod migrate;
pub mod openapi;
pub mod position;
pub mod projection;
pub mod query;
pub mod server;
pub mod telemetry;
pub mod writer;
