//! The command line: `refold serve` and `refold migrate` run the service; `refold
//! status`, `refold replay NAME` and `refold demo` are clients of a running refold
//! over its HTTP API (`--url`, `REFOLD_URL`), sharing [`crate::client::Api`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use serde_json::Value;

use crate::client::{Api, ApiError};
use crate::config::{Config, Settings, check_env};
use crate::demo::{DemoConfig, Generator};
use crate::position::Position;
use crate::{migrate, server, telemetry};

#[derive(Debug, Parser)]
#[command(
    name = "refold",
    version,
    about = "Event sourcing in the Kappa style: HTTP events into a durable log, folded into read models",
    after_help = "Every setting also comes from REFOLD_<NAME> (e.g. REFOLD_KAFKA_BROKERS) and from refold.toml \
                  (e.g. kafka_brokers = \"...\"); flags override the environment, which overrides the file."
)]
pub struct Cli {
    /// Config file [default: ./refold.toml when it exists]
    #[arg(long, global = true, env = "REFOLD_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP API on the configured log (embedded by default)
    Serve(Settings),
    /// Create or check the log's topics from migrations/, recording what was applied
    Migrate(Settings),
    /// Show the projections of a running refold: version, generation, lag, replays
    #[command(long_about = STATUS_ABOUT)]
    Status(StatusArgs),
    /// Rebuild a projection into a new generation, following it with a progress bar
    #[command(long_about = REPLAY_ABOUT)]
    Replay(ReplayArgs),
    /// Send generated demo events (users, tribes, posts, likes, ...) to a running refold
    #[command(long_about = DEMO_ABOUT)]
    Demo(DemoArgs),
    /// Measure refold against the raw limits of its log and stores; prints a table
    #[command(long_about = BENCH_ABOUT)]
    Bench(BenchArgs),
}

const BENCH_ABOUT: &str = "\
Measure refold against the raw limits of the parts it is made of, in one run on
this machine and the backends the flags select (the embedded ones by default;
--log kafka --kafka-brokers, --redis-url and --elasticsearch-url for real ones):

  raw     log append and read (and a bare rdkafka producer and consumer on
          Kafka); just before the replays, the events topic's read and the
          stores' writes of as many events: post_stats's writes per event
          (Redis pipelines or redb transactions), a document per event
          (Elasticsearch _bulk or tantivy)
  refold  the write path alone: HTTP ingest (bulk and single-event requests),
          append latency at 1,000 requests/s; then with the demo projections
          folding beside it: bulk ingest, append latency, append-to-visible
          latency, replay per store with the memory it takes, a hot key

Each refold figure is shown with the raw limit that bounds it and the ratio.
refold runs inside this process, under a fresh temporary data directory and a
topic prefix of its own, so a bench never touches a deployment's data
(--data-dir, --topic-prefix and --listen are ignored). Build with --release: a
debug build measures the compiler, not refold. See docs/BENCHMARKS.md.";

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub settings: Settings,
    /// Events of each throughput measurement (and so of the replays)
    #[arg(long, default_value_t = 200_000, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1000..))]
    pub events: u64,
    /// Seconds of the fixed-rate latency measurement
    #[arg(long, default_value_t = 10, value_name = "S",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub latency_secs: u64,
    /// Also write the table to this file
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
}

const STATUS_ABOUT: &str = "\
Show the projections of a running refold (GET /projections), one line each:

  NAME      the projection (projections/NAME.toml)
  VERSION   the definition version the live generation was built from
  STORE     the read-model store: redis or elasticsearch (and the backend serving it)
  GEN       the live generation, the one answering queries
  STATE     running, replaying, failed, ...
  LAG       events in the log not yet applied by the live generation
  EVENTS/S  events applied per second
  DEAD      events sent to the dead-letter record
  REPLAY    a rebuild in progress: its generation, progress and ETA (or -)";

const REPLAY_ABOUT: &str = "\
Rebuild a projection by replaying the log into a new generation (POST
/projections/NAME/replay), with the definition in projections/NAME.toml as it is
now. The live generation keeps answering queries; refold switches over when the
new one has caught up.

Without --no-wait, follows the replay with a progress bar and exits 0 once
refold has switched to the new generation, or non-zero if the replay failed or
was cancelled (DELETE /projections/NAME/replay). Interrupting the command does
not stop the replay.";

const DEMO_ABOUT: &str = "\
Send generated demo events to a running refold (POST /events, NDJSON, in
batches): first the users and tribes register, then users join tribes, publish
posts, view, like, unlike and comment, with a few posts getting most of the
activity. The same --seed sends the same events. Ids are numbered from 1 on
every run (u1, t1, p1, c1, ...), so a second run adds to the same users, tribes
and posts: use a fresh data directory for a clean demo. Batches refused with
429 or 503 are retried after Retry-After (every event carries an id, so a retry
never appends twice). Exits non-zero if any event was refused.";

/// Where a running refold answers.
#[derive(Debug, Clone, Args)]
pub struct Remote {
    /// Base URL of the running refold's HTTP API
    #[arg(
        long,
        env = "REFOLD_URL",
        default_value = "http://127.0.0.1:8080",
        value_name = "URL"
    )]
    pub url: String,
    /// API key to present, when the server has `api_keys` (status needs the
    /// read scope, replay admin and read, demo append)
    #[arg(
        long,
        env = "REFOLD_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub api_key: Option<crate::config::Secret>,
}

impl Remote {
    pub fn api(&self) -> anyhow::Result<Api> {
        Api::new(&self.url)?.with_key(self.api_key.clone())
    }
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub remote: Remote,
    /// Print the server's JSON answer as it is instead of the table
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// The projection to rebuild (`refold status` lists them)
    #[arg(value_name = "NAME")]
    pub name: String,
    #[command(flatten)]
    pub remote: Remote,
    /// Start the replay and exit; follow it later with `refold status`
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub remote: Remote,
    /// How many events to send (the setup of users and tribes included)
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    pub events: u64,
    /// Seed of the generator: the same seed sends the same events
    #[arg(long, default_value_t = 42, value_name = "S")]
    pub seed: u64,
    /// Users registered at the start (more sign up along the way)
    #[arg(long, default_value_t = 1000, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub users: u64,
    /// Tribes created at the start
    #[arg(long, default_value_t = 20, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub tribes: u64,
    /// Share of all likes and views going to one hot post, p1 (0 to 1): a hot key
    #[arg(long, default_value_t = 0.0, value_name = "SHARE", value_parser = parse_share)]
    pub hot_share: f64,
    /// Events per request
    #[arg(long, default_value_t = 500, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub batch: u64,
}

fn parse_share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if (0.0..=1.0).contains(&x) => Ok(x),
        _ => Err(format!("{s:?} is not a share between 0 and 1 (like 0.2)")),
    }
}

/// Entry point of the `refold` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Layers file, environment and flags into a validated [`Config`].
pub fn load_config(file: Option<&Path>, flags_and_env: Settings) -> anyhow::Result<Config> {
    // REFOLD_URL and REFOLD_API_KEY belong to the client commands; `serve` must
    // not refuse them.
    check_env(
        std::env::vars().map(|(k, _)| k),
        &["REFOLD_CONFIG", "REFOLD_URL", "REFOLD_API_KEY"],
    )?;
    let default = Path::new("refold.toml");
    let file = match file {
        Some(path) => Settings::from_file(path)?,
        None if default.exists() => Settings::from_file(default)?,
        None => Settings::default(),
    };
    Config::from_settings(flags_and_env.over(file))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Status(args) => client_runtime()?.block_on(status(args)),
        Command::Replay(args) => client_runtime()?.block_on(replay(args)),
        Command::Demo(args) => client_runtime()?.block_on(demo(args)),
        Command::Bench(args) => bench(cli.config.as_deref(), args),
        Command::Serve(_) | Command::Migrate(_) => run_service(cli),
    }
}

/// The client commands need no threads of their own.
fn client_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// `serve` and `migrate`.
fn run_service(cli: Cli) -> anyhow::Result<()> {
    let (Command::Serve(settings) | Command::Migrate(settings)) = &cli.command else {
        unreachable!("client commands do not load the service configuration")
    };
    let config = load_config(cli.config.as_deref(), settings.clone())?;
    telemetry::init(config.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cli.command {
            Command::Serve(_) => {
                let listener = tokio::net::TcpListener::bind(config.listen)
                    .await
                    .with_context(|| {
                        format!(
                            "cannot listen on {} (in use? pick another with --listen)",
                            config.listen
                        )
                    })?;
                server::run(&config, listener, server::shutdown_signal()).await
            }
            Command::Migrate(_) => {
                let log = server::open_log(&config)?;
                let migrations = migrate::load(&config.migrations)?;
                let report = migrate::migrate(&*log, &migrations, &config.topic_prefix).await?;
                for t in &report.topics_created {
                    println!("created topic {t}");
                }
                for m in &report.applied {
                    println!("applied {m}");
                }
                for m in &report.already {
                    println!("already applied {m}");
                }
                println!(
                    "the {} log is up to date ({} migrations)",
                    log.backend(),
                    migrations.len()
                );
                Ok(())
            }
            Command::Status(_) | Command::Replay(_) | Command::Demo(_) | Command::Bench(_) => {
                unreachable!("client commands and bench run in run()")
            }
        }
    })
}

/// `refold bench`: see [`crate::bench`].
fn bench(file: Option<&Path>, args: BenchArgs) -> anyhow::Result<()> {
    let mut config = load_config(file, args.settings)?;
    // Warnings and errors only (RUST_LOG overrides): the progress bar is the output.
    if std::env::var_os("RUST_LOG").is_none() {
        // SAFETY: single-threaded here, before any runtime or thread starts.
        unsafe { std::env::set_var("RUST_LOG", "warn") };
    }
    telemetry::init(config.log_format);
    let dir = tempfile_dir()?;
    config.data_dir = dir.clone();
    config.topic_prefix = format!(
        "bench-{}-{}.",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
    );
    config.auto_migrate = true;
    // The bench's own clients present no key.
    config.api_keys = Default::default();
    let sizes = crate::bench::Sizes {
        events: args.events as usize,
        latency_secs: args.latency_secs,
        visibility_samples: 200,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let pb = crate::bench::progress()?;
    let figures = rt.block_on(crate::bench::run(&config, sizes, &pb));
    pb.finish_and_clear();
    let _ = std::fs::remove_dir_all(&dir);
    let figures = figures?;
    let backends = format!(
        "log: {}; key-value store: {}; document store: {}",
        match config.log {
            crate::config::LogBackend::Embedded => "embedded".to_owned(),
            crate::config::LogBackend::Kafka => format!(
                "Kafka at {}",
                config.kafka_brokers.as_deref().unwrap_or("?")
            ),
        },
        config.redis_url.as_deref().map_or("embedded".into(), |u| {
            format!("Redis at {}", crate::config::redact_url(u))
        }),
        config
            .elasticsearch_url
            .as_deref()
            .map_or("embedded".into(), |u| {
                format!("Elasticsearch API at {}", crate::config::redact_url(u))
            }),
    );
    let table = format!(
        "{backends}; {} events; {} cores; {}\n\n{}",
        args.events,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if cfg!(debug_assertions) {
            "debug build"
        } else {
            "release build"
        },
        crate::bench::markdown(&figures)
    );
    println!("{table}");
    if let Some(path) = args.out {
        std::fs::write(&path, &table)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// A fresh directory under the system's temporary directory.
fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "refold-bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_nanos()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

// ---------------------------------------------------------------------------
// Client commands: status, replay, demo.

/// `GET /projections` and `GET /projections/{name}`: the fields the CLI shows.
/// Everything but the name is optional, so that a field the server leaves out
/// (or sends as null) shows as `-` instead of failing the command.
#[derive(Debug, Clone, Deserialize)]
struct ProjectionStatus {
    name: String,
    version: Option<u64>,
    store: Option<String>,
    backend: Option<String>,
    generation: Option<u64>,
    state: Option<String>,
    lag: Option<u64>,
    events_per_sec: Option<f64>,
    dead_letters: Option<DeadLetters>,
    error: Option<String>,
    replay: Option<ReplayStatus>,
}

#[derive(Debug, Clone, Deserialize)]
struct DeadLetters {
    count: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
struct ReplayStatus {
    generation: u64,
    version: Option<u64>,
    state: Option<String>,
    position: Option<u64>,
    total: Option<u64>,
    progress: Option<f64>,
    events_per_sec: Option<f64>,
    eta_secs: Option<f64>,
    error: Option<String>,
}

impl ReplayStatus {
    fn failed(&self) -> bool {
        self.state.as_deref() == Some("failed")
    }

    fn progress(&self) -> f64 {
        match (self.progress, self.position, self.total) {
            (Some(p), _, _) => p,
            (None, Some(pos), Some(total)) if total > 0 => pos as f64 / total as f64,
            _ => 0.0,
        }
    }

    /// `g4 63% eta 12s`, `g4 failed`.
    fn cell(&self) -> String {
        if self.failed() {
            return format!("g{} failed", self.generation);
        }
        let eta = self.eta_secs.map_or_else(|| "?".to_string(), fmt_secs);
        format!(
            "g{} {:.0}% eta {eta}",
            self.generation,
            (self.progress() * 100.0).floor()
        )
    }
}

#[derive(Debug, Deserialize)]
struct ProjectionList {
    projections: Vec<ProjectionStatus>,
}

/// `12s`, `3m05s`, `1h02m`.
fn fmt_secs(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

fn fmt_rate(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.1}")
    }
}

fn dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// The table of `refold status`, then one line per error worth reading.
fn status_table(projections: &[ProjectionStatus]) -> String {
    if projections.is_empty() {
        return "no projections: add definitions to the projections directory and restart refold\n"
            .to_string();
    }
    let header = [
        "NAME", "VERSION", "STORE", "GEN", "STATE", "LAG", "EVENTS/S", "DEAD", "REPLAY",
    ];
    let rows: Vec<[String; 9]> = projections
        .iter()
        .map(|p| {
            let store = match (&p.store, &p.backend) {
                (Some(s), Some(b)) if s != b => format!("{s} ({b})"),
                (s, _) => dash(s.as_ref()),
            };
            [
                p.name.clone(),
                dash(p.version),
                store,
                dash(p.generation),
                dash(p.state.as_ref()),
                dash(p.lag),
                dash(p.events_per_sec.map(fmt_rate)),
                dash(p.dead_letters.as_ref().and_then(|d| d.count)),
                dash(p.replay.as_ref().map(ReplayStatus::cell)),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.zip(widths).enumerate() {
            if i + 1 == widths.len() {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in &rows {
        line(&mut row.iter().map(String::as_str));
    }
    for p in projections {
        if let Some(e) = &p.error {
            out.push_str(&format!("\n{}: {e}", p.name));
        }
        if let Some(ReplayStatus {
            generation,
            error: Some(e),
            ..
        }) = &p.replay
        {
            out.push_str(&format!(
                "\n{}: replay into generation {generation}: {e}",
                p.name
            ));
        }
    }
    if projections
        .iter()
        .any(|p| p.error.is_some() || p.replay.as_ref().is_some_and(|r| r.error.is_some()))
    {
        out.push('\n');
    }
    out
}

/// `refold status`
async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let api = args.remote.api()?;
    let reply = api.get(&["projections"]).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reply.body)?);
        return Ok(());
    }
    let list: ProjectionList = api.parse(&["projections"], reply.body)?;
    print!("{}", status_table(&list.projections));
    Ok(())
}

/// A refused replay request, with what to do next when the server does not say.
fn replay_error(e: ApiError) -> anyhow::Error {
    match e.code() {
        Some("replay_in_progress") => anyhow!("{e} (or follow it with `refold status`)"),
        _ => e.into(),
    }
}

/// How often `refold replay` polls, and how many failed polls in a row it bears.
const POLL_EVERY: Duration = Duration::from_millis(200);
const POLL_FAILURES: u32 = 25;

/// `refold replay NAME`
async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    let name = args.name.as_str();
    let api = args.remote.api()?;
    let path = ["projections", name, "replay"];
    let reply = api.post(&path, None).await.map_err(replay_error)?;
    let started: ReplayStatus = api.parse(
        &path,
        reply.body.get("replay").cloned().unwrap_or(Value::Null),
    )?;
    let generation = started.generation;
    let version = dash(started.version);
    if args.no_wait {
        println!(
            "{name}: replay started into generation {generation} (version {version}); follow it with `refold status`"
        );
        return Ok(());
    }

    let pb = ProgressBar::new(started.total.unwrap_or(0))
        .with_style(
            ProgressStyle::with_template(
                "{prefix} [{wide_bar}] {human_pos}/{human_len} events  {msg}",
            )?
            .progress_chars("=> "),
        )
        .with_prefix(format!("{name} g{generation}"));
    let status_path = ["projections", name];
    let mut failures = 0;
    loop {
        tokio::time::sleep(POLL_EVERY).await;
        let status = match api.get(&status_path).await {
            Ok(reply) => {
                failures = 0;
                api.parse::<ProjectionStatus>(&status_path, reply.body)
                    .map_err(anyhow::Error::from)
            }
            Err(e) => {
                failures += 1;
                if failures < POLL_FAILURES && e.is_transient() {
                    continue;
                }
                Err(e.into())
            }
        };
        let status = match status {
            Ok(s) => s,
            Err(e) => {
                pb.finish_and_clear();
                return Err(e.context(format!(
                    "lost track of the replay of {name} into generation {generation} (it may still run: see `refold status`)"
                )));
            }
        };
        if status.generation == Some(generation) {
            pb.finish_and_clear();
            println!("{name}: switched to generation {generation} (version {version})");
            return Ok(());
        }
        match &status.replay {
            Some(r) if r.generation == generation => {
                if r.failed() {
                    pb.finish_and_clear();
                    bail!(
                        "the replay of {name} into generation {generation} failed at {}/{} events: {}; \
                         generation {} keeps serving",
                        dash(r.position),
                        dash(r.total),
                        r.error.as_deref().unwrap_or("no reason given"),
                        dash(status.generation)
                    );
                }
                if let Some(total) = r.total {
                    pb.set_length(total);
                }
                pb.set_position(r.position.unwrap_or(0));
                pb.set_message(format!(
                    "{} events/s, eta {}",
                    fmt_rate(r.events_per_sec.unwrap_or(0.0)),
                    r.eta_secs.map_or_else(|| "?".to_string(), fmt_secs)
                ));
            }
            _ => {
                let (at, total) = (pb.position(), pb.length());
                pb.finish_and_clear();
                bail!(
                    "the replay of {name} into generation {generation} ended at {at}/{} events without \
                     switching over (cancelled?); generation {} keeps serving{}",
                    dash(total),
                    dash(status.generation),
                    status
                        .error
                        .map(|e| format!(" (projection error: {e})"))
                        .unwrap_or_default()
                );
            }
        }
    }
}

/// Most attempts at one batch while refold answers 429/503.
const BATCH_ATTEMPTS: u32 = 30;
/// Longest wait between two attempts, whatever Retry-After says.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Tallies of `refold demo`.
#[derive(Debug, Default)]
struct DemoTally {
    sent: u64,
    accepted: u64,
    failed: u64,
    /// Refusals by error code (or status when no code).
    codes: BTreeMap<String, u64>,
    first_failure: Option<String>,
    position: Option<Position>,
    last_token: Option<String>,
}

impl DemoTally {
    /// Counts the per-line results of one `POST /events` answer for `n` events.
    fn count(&mut self, n: u64, first_line: u64, body: &Value) {
        self.sent += n;
        let items = body["items"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        let mut accepted = 0;
        for (i, item) in items.iter().enumerate() {
            let status = item["status"].as_u64().unwrap_or(0);
            if (200..300).contains(&status) {
                accepted += 1;
                continue;
            }
            let code = item["error"]["code"]
                .as_str()
                .map_or_else(|| format!("status {status}"), str::to_string);
            *self.codes.entry(code.clone()).or_default() += 1;
            if self.first_failure.is_none() {
                let message = item["error"]["message"].as_str().unwrap_or("");
                self.first_failure = Some(format!(
                    "event {}: {status} {code}: {message}",
                    first_line + i as u64 + 1
                ));
            }
        }
        let accepted = accepted.min(n);
        self.accepted += accepted;
        self.failed += n - accepted;
        if (items.len() as u64) < n {
            *self.codes.entry("no result".into()).or_default() += n - items.len() as u64;
        }
        if let Some(token) = body["position"].as_str() {
            self.last_token = Some(token.to_string());
            if let Ok(p) = token.parse::<Position>() {
                self.position
                    .get_or_insert_with(Position::default)
                    .merge(&p);
            }
        }
    }

    fn summary(&self, elapsed: Duration) -> String {
        let secs = elapsed.as_secs_f64().max(1e-3);
        let mut s = format!(
            "sent {} events in {:.1}s ({} events/s): {} accepted, {} failed",
            self.sent,
            secs,
            fmt_rate(self.sent as f64 / secs),
            self.accepted,
            self.failed
        );
        if !self.codes.is_empty() {
            let codes: Vec<String> = self.codes.iter().map(|(c, n)| format!("{n} {c}")).collect();
            s.push_str(&format!("\nrefused: {}", codes.join(", ")));
        }
        if let Some(f) = &self.first_failure {
            s.push_str(&format!("\nfirst refusal: {f}"));
        }
        let token = self
            .position
            .as_ref()
            .map(ToString::to_string)
            .or_else(|| self.last_token.clone());
        if let Some(t) = token {
            s.push_str(&format!(
                "\nposition: {t} (pass after={t} to a view query to read these writes)"
            ));
        }
        s
    }
}

/// Posts one NDJSON batch, retrying while refold answers 429/503.
async fn send_batch(api: &Api, body: Vec<u8>, pb: &ProgressBar) -> Result<Value, ApiError> {
    let mut attempt = 1;
    loop {
        let result = api
            .post(&["events"], Some(("application/x-ndjson", body.clone())))
            .await;
        match result {
            Err(ApiError::Server {
                status,
                code,
                retry_after,
                ..
            }) if matches!(status.as_u16(), 429 | 503) && attempt < BATCH_ATTEMPTS => {
                attempt += 1;
                let wait = retry_after
                    .unwrap_or(Duration::from_secs(1))
                    .min(MAX_BACKOFF);
                let code = code.map(|c| format!(" {c}")).unwrap_or_default();
                pb.suspend(|| {
                    eprintln!(
                        "refold is busy ({}{code}): retrying the batch in {}",
                        status.as_u16(),
                        fmt_secs(wait.as_secs_f64())
                    )
                });
                tokio::time::sleep(wait).await;
            }
            other => return other.map(|r| r.body),
        }
    }
}

/// `refold demo`
async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let api = args.remote.api()?;
    let mut generator = Generator::new(DemoConfig {
        seed: args.seed,
        users: args.users as usize,
        tribes: args.tribes as usize,
        hot_share: args.hot_share,
    });
    let pb = ProgressBar::new(args.events).with_style(
        ProgressStyle::with_template(
            "[{elapsed_precise}] [{wide_bar}] {human_pos}/{human_len} events ({per_sec}, eta {eta})",
        )?
        .progress_chars("=> "),
    );
    let started = Instant::now();
    let mut tally = DemoTally::default();
    while tally.sent < args.events {
        let n = args.batch.min(args.events - tally.sent);
        let mut body = Vec::with_capacity(n as usize * 200);
        for event in generator.take(n as usize) {
            let mut line = event.to_json();
            // An id per event makes a retried batch an idempotent repeat.
            line["id"] = Value::String(uuid::Uuid::new_v4().to_string());
            serde_json::to_writer(&mut body, &line)?;
            body.push(b'\n');
        }
        let answer = send_batch(&api, body, &pb).await.map_err(|e| {
            pb.finish_and_clear();
            let hint = if e.status() == Some(413) {
                " (lower --batch)"
            } else {
                ""
            };
            match tally.sent {
                0 => anyhow!("{e}{hint}"),
                _ => anyhow!(
                    "{e}{hint}\nbefore that: {}",
                    tally.summary(started.elapsed())
                ),
            }
        })?;
        tally.count(n, tally.sent, &answer);
        pb.inc(n);
    }
    pb.finish_and_clear();
    println!("{}", tally.summary(started.elapsed()));
    if tally.failed > 0 {
        bail!("refold refused {} of {} events", tally.failed, tally.sent);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use serde_json::json;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["refold", "replay", "post_stats", "--no-wait"]).unwrap();
        let Command::Replay(r) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(r.name, "post_stats");
        assert!(r.no_wait);
        let cli = Cli::try_parse_from([
            "refold",
            "demo",
            "--events",
            "5",
            "--url",
            "http://h:1",
            "--hot-share",
            "0.3",
        ])
        .unwrap();
        let Command::Demo(d) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(
            (d.events, d.batch, d.remote.url.as_str()),
            (5, 500, "http://h:1")
        );
        assert!(Cli::try_parse_from(["refold", "demo", "--hot-share", "2"]).is_err());
        assert!(Cli::try_parse_from(["refold", "demo", "--batch", "0"]).is_err());
    }

    #[test]
    fn urls_are_built_under_the_base() {
        let api = Api::new("http://127.0.0.1:8080").unwrap();
        assert_eq!(
            api.url(&["projections", "post_stats", "replay"]).as_str(),
            "http://127.0.0.1:8080/projections/post_stats/replay"
        );
        let api = Api::new("http://example.org/refold/").unwrap();
        assert_eq!(
            api.url(&["projections", "a b"]).as_str(),
            "http://example.org/refold/projections/a%20b"
        );
        assert!(Api::new("https://example.org").is_err());
        assert!(Api::new("ftp://example.org").is_err());
        assert_eq!(
            Api::new("localhost:8080")
                .unwrap()
                .url(&["healthz"])
                .as_str(),
            "http://localhost:8080/healthz"
        );
    }

    #[tokio::test]
    async fn an_unreachable_server_says_what_to_do() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}");
        let e = Api::new(&url)
            .unwrap()
            .get(&["projections"])
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!(
                "cannot reach refold at {url}: is `refold serve` running?"
            )),
            "{msg}"
        );
        assert!(msg.contains("REFOLD_URL"), "{msg}");
    }

    fn projection(v: Value) -> ProjectionStatus {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn status_table_shows_replays_and_errors() {
        let live = projection(json!({
            "name": "post_stats", "version": 2, "store": "redis", "backend": "embedded",
            "generation": 3, "state": "replaying",
            "partitions": [{"partition": 0, "position": 10, "end": 12, "lag": 2}],
            "lag": 2, "events": 1000, "events_per_sec": 1234.56,
            "dead_letters": {"count": 1, "recent": []}, "error": null,
            "replay": {"generation": 4, "version": 3, "state": "running", "position": 63,
                       "total": 100, "progress": 0.63, "events_per_sec": 5.0,
                       "eta_secs": 12.4, "error": null}
        }));
        let failed = projection(json!({
            "name": "tribe_feed", "version": 1, "store": "redis", "backend": "redis",
            "generation": 1, "state": "failed", "lag": null, "events_per_sec": 0.0,
            "dead_letters": {"count": null}, "error": "halted on event 7",
            "replay": {"generation": 2, "state": "failed", "error": "store down"}
        }));
        let table = status_table(&[live, failed]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            [
                "NAME", "VERSION", "STORE", "GEN", "STATE", "LAG", "EVENTS/S", "DEAD", "REPLAY"
            ]
        );
        assert!(lines[1].starts_with("post_stats  2"), "{table}");
        assert!(lines[1].contains("redis (embedded)"), "{table}");
        assert!(lines[1].contains(" 1235 "), "{table}");
        assert!(lines[1].ends_with("g4 63% eta 12s"), "{table}");
        assert!(lines[2].ends_with("g2 failed"), "{table}");
        assert!(table.contains("\ntribe_feed: halted on event 7"), "{table}");
        assert!(
            table.contains("tribe_feed: replay into generation 2: store down"),
            "{table}"
        );
        // Columns line up.
        let col = lines[0].find("REPLAY").unwrap();
        assert_eq!(lines[1].find("g4"), Some(col), "{table}");
        assert!(status_table(&[]).starts_with("no projections"));
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(fmt_secs(0.4), "0s");
        assert_eq!(fmt_secs(59.6), "1m00s");
        assert_eq!(fmt_secs(185.0), "3m05s");
        assert_eq!(fmt_secs(3720.0), "1h02m");
    }

    #[test]
    fn demo_tally_counts_items_and_merges_positions() {
        let mut t = DemoTally::default();
        t.count(
            2,
            0,
            &json!({"errors": false, "position": "0:5,1:3",
                    "items": [{"status": 201}, {"status": 200}]}),
        );
        t.count(
            3,
            2,
            &json!({"errors": true, "position": "1:9",
                    "items": [{"status": 201},
                              {"status": 409, "error": {"code": "wrong_expected_version", "message": "m"}},
                              {"status": 201}]}),
        );
        assert_eq!((t.sent, t.accepted, t.failed), (5, 4, 1));
        assert_eq!(t.codes["wrong_expected_version"], 1);
        let s = t.summary(Duration::from_secs(1));
        assert!(s.contains("sent 5 events"), "{s}");
        assert!(s.contains("4 accepted, 1 failed"), "{s}");
        assert!(
            s.contains("first refusal: event 4: 409 wrong_expected_version: m"),
            "{s}"
        );
        assert!(s.contains("position: 0:5,1:9"), "{s}");
    }
}
