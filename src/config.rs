//! Configuration: `refold.toml`, then `REFOLD_*` environment variables, then flags.
//!
//! Every setting has one name used three ways: `--kafka-brokers` on the command
//! line, `REFOLD_KAFKA_BROKERS` in the environment, `kafka_brokers` in the file.
//! Flags override the environment, which overrides the file. Unknown keys in the
//! file and unknown `REFOLD_*` variables are errors (a typo must not be ignored).
//! [`Settings`] is the raw, all-optional layer; [`Config`] is the validated result.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, CommandFactory, ValueEnum};
use serde::Deserialize;

use crate::auth::ApiKeys;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogBackend {
    Embedded,
    Kafka,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

/// A size in bytes, written `1048576`, `512KiB`, `1MiB` or `2GiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub usize);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (n, unit) = s.split_at(split);
        let n: usize = n
            .parse()
            .map_err(|_| format!("{s:?} is not a size like 1048576, 512KiB or 1MiB"))?;
        let mult = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "KB" | "k" => 1 << 10,
            "MiB" | "MB" | "M" => 1 << 20,
            "GiB" | "GB" | "G" => 1 << 30,
            u => return Err(format!("unknown size unit {u:?}: use B, KiB, MiB or GiB")),
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(usize),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A setting that must not reach a log: `Debug` shows `***`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// Settings shared by `serve` and `migrate`; each from flag, environment or file.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address of the HTTP API [default: 127.0.0.1:8080]
    #[arg(long, env = "REFOLD_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Directory of the embedded log and stores [default: ./data]
    #[arg(long, env = "REFOLD_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Directory of projection definitions [default: ./projections]
    #[arg(long, env = "REFOLD_PROJECTIONS", value_name = "DIR")]
    pub projections: Option<PathBuf>,
    /// Directory of migrations [default: ./migrations]
    #[arg(long, env = "REFOLD_MIGRATIONS", value_name = "DIR")]
    pub migrations: Option<PathBuf>,
    /// Event log backend [default: embedded]
    #[arg(long, env = "REFOLD_LOG", value_name = "BACKEND")]
    pub log: Option<LogBackend>,
    /// Kafka bootstrap servers, comma separated (needed with --log kafka)
    #[arg(long, env = "REFOLD_KAFKA_BROKERS", value_name = "LIST")]
    pub kafka_brokers: Option<String>,
    /// Redis for Redis projections; absent: the embedded stand-in
    #[arg(
        long,
        env = "REFOLD_REDIS_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub redis_url: Option<String>,
    /// Elasticsearch for document projections; absent: the embedded stand-in
    #[arg(
        long,
        env = "REFOLD_ELASTICSEARCH_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub elasticsearch_url: Option<String>,
    /// Prefix of every topic name [default: refold.]
    #[arg(long, env = "REFOLD_TOPIC_PREFIX", value_name = "PREFIX")]
    pub topic_prefix: Option<String>,
    /// Apply pending migrations at start [default: true on embedded, false on kafka]
    #[arg(long, env = "REFOLD_AUTO_MIGRATE", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub auto_migrate: Option<bool>,
    /// Log output: human or json [default: human]
    #[arg(long, env = "REFOLD_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Largest request body accepted [default: 1MiB]
    #[arg(long, env = "REFOLD_BODY_LIMIT", value_name = "SIZE")]
    pub body_limit: Option<ByteSize>,
    /// Request bytes admitted into the write path at once; beyond: 429 [default: 64MiB]
    #[arg(long, env = "REFOLD_INGEST_BUFFER", value_name = "SIZE")]
    pub ingest_buffer: Option<ByteSize>,
    /// Most events written in one durable batch [default: 5000]
    #[arg(long, env = "REFOLD_MAX_BATCH_EVENTS", value_name = "N")]
    pub max_batch_events: Option<usize>,
    /// Last event ids (all streams) remembered for idempotent retries [default: 100000]
    #[arg(long, env = "REFOLD_IDEMPOTENCY_WINDOW", value_name = "N")]
    pub idempotency_window: Option<usize>,
    /// How long Kafka may take to confirm a write before it fails (ms) [default: 10000]
    #[arg(long, env = "REFOLD_KAFKA_TIMEOUT_MS", value_name = "MS")]
    pub kafka_timeout_ms: Option<u64>,
    /// How long a projection's Kafka fetch may wait at the broker for records
    /// (fetch.wait.max.ms). Kafka answers as soon as records arrive; tansu 0.6
    /// always waits this long, so it bounds visibility there (ms) [default: 100]
    #[arg(long, env = "REFOLD_KAFKA_FETCH_WAIT_MS", value_name = "MS")]
    pub kafka_fetch_wait_ms: Option<u64>,
    /// Snapshot stream heads after this many events [default: 10000]
    #[arg(long, env = "REFOLD_SNAPSHOT_EVERY", value_name = "N")]
    pub snapshot_every: Option<u64>,
    /// Most events a projection folds into one store write [default: 20000]
    #[arg(long, env = "REFOLD_PROJECTION_BATCH", value_name = "N")]
    pub projection_batch: Option<usize>,
    /// Bytes of events that projection workers with a backlog (a replay, a
    /// restart) fold, all together, into commits spanning several reads; when it
    /// is full a worker commits what it folded. Larger: faster replays, more
    /// memory; 0 commits every read on its own [default: 32MiB]
    #[arg(long, env = "REFOLD_FOLD_BUFFER", value_name = "SIZE")]
    pub fold_buffer: Option<ByteSize>,
    /// Under load, a document projection's worker commits (and refreshes) at most
    /// once per this interval, folding what arrived meanwhile into one store
    /// write; an idle worker commits at once (ms) [default: 50]
    #[arg(long, env = "REFOLD_DOCUMENT_COMMIT_INTERVAL_MS", value_name = "MS")]
    pub document_commit_interval_ms: Option<u64>,
    /// Keep every event in the built-in `stream_history` document projection, for
    /// GET /streams/{stream}/events [default: true]
    #[arg(long, env = "REFOLD_STREAM_HISTORY", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub stream_history: Option<bool>,
    /// librdkafka properties for every Kafka client, `key=value` pairs separated
    /// by `;` (`\;` inside a value); TLS, SASL:
    /// `security.protocol=SASL_SSL;sasl.mechanism=SCRAM-SHA-512;…`
    #[arg(
        long,
        env = "REFOLD_KAFKA_PROPERTIES",
        value_name = "LIST",
        hide_env_values = true
    )]
    pub kafka_properties: Option<Secret>,
    /// User name for Elasticsearch basic authentication
    #[arg(long, env = "REFOLD_ELASTICSEARCH_USERNAME", value_name = "NAME")]
    pub elasticsearch_username: Option<String>,
    /// Password for Elasticsearch basic authentication
    #[arg(
        long,
        env = "REFOLD_ELASTICSEARCH_PASSWORD",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub elasticsearch_password: Option<Secret>,
    /// Elasticsearch API key (the base64 `encoded` form Elasticsearch returns)
    #[arg(
        long,
        env = "REFOLD_ELASTICSEARCH_API_KEY",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub elasticsearch_api_key: Option<Secret>,
    /// PEM file of the CA that signed Elasticsearch's certificate (https:// URLs);
    /// absent: the system's trusted CAs
    #[arg(long, env = "REFOLD_ELASTICSEARCH_CA_CERT", value_name = "FILE")]
    pub elasticsearch_ca_cert: Option<PathBuf>,
    /// API keys as `SCOPES:KEY` entries separated by `;`, scopes from append,
    /// read, admin (`append,read:KEY1;admin:KEY2`); unset: the API is open
    #[arg(
        long,
        env = "REFOLD_API_KEYS",
        value_name = "LIST",
        hide_env_values = true
    )]
    pub api_keys: Option<Secret>,
}

macro_rules! layer {
    ($hi:expr, $lo:expr, $($f:ident),*) => { Settings { $($f: $hi.$f.or($lo.$f)),* } };
}

impl Settings {
    /// `self` wins where both are set.
    pub fn over(self, lower: Settings) -> Settings {
        layer!(
            self,
            lower,
            listen,
            data_dir,
            projections,
            migrations,
            log,
            kafka_brokers,
            redis_url,
            elasticsearch_url,
            topic_prefix,
            auto_migrate,
            log_format,
            body_limit,
            ingest_buffer,
            max_batch_events,
            idempotency_window,
            kafka_timeout_ms,
            kafka_fetch_wait_ms,
            snapshot_every,
            projection_batch,
            fold_buffer,
            document_commit_interval_ms,
            stream_history,
            kafka_properties,
            elasticsearch_username,
            elasticsearch_password,
            elasticsearch_api_key,
            elasticsearch_ca_cert,
            api_keys
        )
    }

    /// Reads a `refold.toml`; unknown keys are errors naming file, line and key.
    pub fn from_file(path: &Path) -> anyhow::Result<Settings> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))
    }

    /// The environment variable of every setting.
    pub fn env_names() -> Vec<String> {
        #[derive(clap::Parser)]
        struct Probe {
            #[command(flatten)]
            s: Settings,
        }
        Probe::command()
            .get_arguments()
            .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
            .collect()
    }
}

/// Refuses `REFOLD_*` variables that name no setting.
pub fn check_env(
    vars: impl IntoIterator<Item = String>,
    extra_known: &[&str],
) -> anyhow::Result<()> {
    let known = Settings::env_names();
    let unknown: Vec<String> = vars
        .into_iter()
        .filter(|k| {
            k.starts_with("REFOLD_") && !known.contains(k) && !extra_known.contains(&k.as_str())
        })
        .collect();
    if !unknown.is_empty() {
        bail!(
            "unknown environment variable{} {}; refold reads {}",
            if unknown.len() > 1 { "s" } else { "" },
            unknown.join(", "),
            known.join(", ")
        );
    }
    Ok(())
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub projections: PathBuf,
    pub migrations: PathBuf,
    pub log: LogBackend,
    pub kafka_brokers: Option<String>,
    pub redis_url: Option<String>,
    pub elasticsearch_url: Option<String>,
    pub topic_prefix: String,
    pub auto_migrate: bool,
    pub log_format: LogFormat,
    pub body_limit: usize,
    pub ingest_buffer: usize,
    pub max_batch_events: usize,
    pub idempotency_window: usize,
    pub kafka_timeout: Duration,
    pub kafka_fetch_wait: Duration,
    pub snapshot_every: u64,
    pub projection_batch: usize,
    pub fold_buffer: usize,
    pub document_commit_interval: Duration,
    pub stream_history: bool,
    /// librdkafka properties of every Kafka client (secrets among them).
    pub kafka_properties: Vec<(String, Secret)>,
    pub elasticsearch_auth: EsAuth,
    pub api_keys: std::sync::Arc<ApiKeys>,
}

/// How refold authenticates to Elasticsearch and checks its certificate.
#[derive(Debug, Clone, Default)]
pub struct EsAuth {
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub api_key: Option<Secret>,
    pub ca_cert: Option<PathBuf>,
}

/// Settings refold makes itself (with librdkafka's aliases): the write path's
/// guarantees (I1) depend on them.
const KAFKA_OWN_PROPERTIES: [&str; 6] = [
    "bootstrap.servers",
    "metadata.broker.list",
    "acks",
    "request.required.acks",
    "enable.idempotence",
    "group.id",
];

/// A URL fit for messages: any user and password replaced by `***`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***{}", &url[..scheme], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Whether a librdkafka property holds a secret (its value is never shown).
pub fn secret_property(key: &str) -> bool {
    [
        "password",
        "secret",
        "jaas",
        "token",
        "key.pem",
        "certificate.pem",
    ]
    .iter()
    .any(|s| key.contains(s))
}

/// Parses `key=value;key=value` librdkafka properties.
pub fn kafka_properties(spec: &str) -> anyhow::Result<Vec<(String, Secret)>> {
    let mut out = Vec::new();
    // `\;` is a `;` inside a value (a password may hold one).
    let mut pairs = vec![String::new()];
    let mut chars = spec.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&';') => {
                pairs.last_mut().expect("one").push(';');
                chars.next();
            }
            ';' => pairs.push(String::new()),
            c => pairs.last_mut().expect("one").push(c),
        }
    }
    for (i, pair) in pairs
        .iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .enumerate()
    {
        let Some((k, v)) = pair.split_once('=') else {
            bail!(
                "kafka_properties entry {} is not key=value (like security.protocol=SASL_SSL)",
                i + 1
            );
        };
        let k = k.trim();
        if k.is_empty() {
            bail!("kafka_properties entry {} has no key", i + 1);
        }
        if KAFKA_OWN_PROPERTIES.contains(&k) {
            bail!(
                "kafka_properties may not set {k}: refold sets it (use --kafka-brokers for the brokers)"
            );
        }
        out.push((k.to_owned(), Secret(v.trim().to_owned())));
    }
    Ok(out)
}

impl Config {
    pub fn from_settings(s: Settings) -> anyhow::Result<Config> {
        let log = s.log.unwrap_or(LogBackend::Embedded);
        let kafka_brokers = s.kafka_brokers.filter(|b| !b.trim().is_empty());
        if log == LogBackend::Kafka && kafka_brokers.is_none() {
            bail!("--log kafka needs --kafka-brokers HOST:PORT (or REFOLD_KAFKA_BROKERS)");
        }
        let topic_prefix = s.topic_prefix.unwrap_or_else(|| "refold.".into());
        if !topic_prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            bail!("topic_prefix {topic_prefix:?} may only use [A-Za-z0-9._-]");
        }
        let body_limit = s.body_limit.map_or(1 << 20, |b| b.0);
        let ingest_buffer = s.ingest_buffer.map_or(64 << 20, |b| b.0);
        if body_limit < 1024 {
            bail!("body_limit must be at least 1KiB");
        }
        if ingest_buffer < 2 * body_limit {
            bail!(
                "ingest_buffer ({ingest_buffer} bytes) must be at least twice body_limit ({body_limit} bytes)"
            );
        }
        let positive = |name: &str, v: Option<usize>, default: usize| match v {
            Some(0) => bail!("{name} must be at least 1"),
            v => Ok(v.unwrap_or(default)),
        };
        Ok(Config {
            listen: s
                .listen
                .unwrap_or_else(|| "127.0.0.1:8080".parse().expect("addr")),
            data_dir: s.data_dir.unwrap_or_else(|| "data".into()),
            projections: s.projections.unwrap_or_else(|| "projections".into()),
            migrations: s.migrations.unwrap_or_else(|| "migrations".into()),
            auto_migrate: s.auto_migrate.unwrap_or(log == LogBackend::Embedded),
            log,
            kafka_brokers,
            redis_url: s.redis_url,
            elasticsearch_url: s.elasticsearch_url,
            topic_prefix,
            log_format: s.log_format.unwrap_or(LogFormat::Human),
            body_limit,
            ingest_buffer,
            max_batch_events: positive("max_batch_events", s.max_batch_events, 5000)?,
            idempotency_window: positive("idempotency_window", s.idempotency_window, 100_000)?,
            kafka_timeout: Duration::from_millis(s.kafka_timeout_ms.unwrap_or(10_000).max(1000)),
            kafka_fetch_wait: s
                .kafka_fetch_wait_ms
                .map_or(crate::log::kafka::DEFAULT_FETCH_WAIT, |ms| {
                    Duration::from_millis(ms.clamp(1, 10_000))
                }),
            snapshot_every: s.snapshot_every.unwrap_or(10_000).max(1),
            projection_batch: positive("projection_batch", s.projection_batch, 20_000)?,
            fold_buffer: s.fold_buffer.map_or(32 << 20, |b| b.0),
            document_commit_interval: Duration::from_millis(
                s.document_commit_interval_ms.unwrap_or(50),
            ),
            stream_history: s.stream_history.unwrap_or(true),
            kafka_properties: kafka_properties(s.kafka_properties.as_ref().map_or("", |p| &p.0))?,
            elasticsearch_auth: {
                if s.elasticsearch_password.is_some() != s.elasticsearch_username.is_some() {
                    bail!("elasticsearch_username and elasticsearch_password go together");
                }
                if s.elasticsearch_api_key.is_some() && s.elasticsearch_username.is_some() {
                    bail!("set elasticsearch_api_key or elasticsearch_username/password, not both");
                }
                if let Some(ca) = &s.elasticsearch_ca_cert
                    && !ca.is_file()
                {
                    bail!("elasticsearch_ca_cert {} is not a file", ca.display());
                }
                EsAuth {
                    username: s.elasticsearch_username,
                    password: s.elasticsearch_password,
                    api_key: s.elasticsearch_api_key,
                    ca_cert: s.elasticsearch_ca_cert,
                }
            },
            api_keys: std::sync::Arc::new(
                ApiKeys::parse(s.api_keys.as_ref().map_or("", |k| &k.0))
                    .map_err(anyhow::Error::msg)?,
            ),
        })
    }

    pub fn topic(&self, logical: &str) -> String {
        format!("{}{logical}", self.topic_prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every setting is in the README's configuration table with its environment
    /// variable and the default its `--help` states (`—` when there is none).
    #[test]
    fn the_readme_lists_every_setting_with_its_variable_and_default() {
        #[derive(clap::Parser)]
        struct Probe {
            #[command(flatten)]
            s: Settings,
        }
        let readme = include_str!("../README.md");
        let rows: Vec<Vec<String>> = readme
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| {
                l.split(" | ")
                    .map(|c| c.trim_matches(['|', ' ']).replace('`', ""))
                    .collect()
            })
            .collect();
        let mut checked = 0;
        for arg in Probe::command().get_arguments() {
            let Some(env) = arg.get_env() else { continue };
            let key = arg.get_id().as_str();
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let default = help
                .split_once("[default: ")
                .and_then(|(_, rest)| rest.split_once(']'))
                .map_or("—".to_owned(), |(d, _)| d.to_owned());
            let row = rows
                .iter()
                .find(|r| r[0] == key)
                .unwrap_or_else(|| panic!("README: no row for setting `{key}`"));
            assert_eq!(row[1], env.to_string_lossy(), "README: variable of `{key}`");
            assert_eq!(
                row[2], default,
                "README: default of `{key}` (--help says {default})"
            );
            checked += 1;
        }
        assert!(checked >= 20, "only {checked} settings found");
    }

    #[test]
    fn urls_are_shown_without_passwords() {
        assert_eq!(
            redact_url("rediss://:secret@host:6379/0"),
            "rediss://***@host:6379/0"
        );
        assert_eq!(
            redact_url("https://user:secret@es:9200"),
            "https://***@es:9200"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379/"),
            "redis://127.0.0.1:6379/"
        );
    }

    #[test]
    fn kafka_properties_parse_with_escapes_and_refuse_refolds_own() {
        let p = kafka_properties(r"security.protocol=SASL_SSL; sasl.password=a\;b=c ;").unwrap();
        assert_eq!(
            p[0],
            ("security.protocol".into(), Secret("SASL_SSL".into()))
        );
        assert_eq!(p[1], ("sasl.password".into(), Secret("a;b=c".into())));
        assert_eq!(p.len(), 2);
        for own in [
            "acks=1",
            "request.required.acks=1",
            "metadata.broker.list=x:1",
        ] {
            let err = kafka_properties(own).unwrap_err().to_string();
            assert!(err.contains("refold sets it"), "{own}: {err}");
        }
        assert!(kafka_properties("novalue").is_err());
        assert!(secret_property("sasl.password") && !secret_property("security.protocol"));
    }

    #[test]
    fn sizes_parse() {
        assert_eq!("1MiB".parse::<ByteSize>().unwrap().0, 1 << 20);
        assert_eq!("512KiB".parse::<ByteSize>().unwrap().0, 512 << 10);
        assert_eq!("100".parse::<ByteSize>().unwrap().0, 100);
        assert!("1XB".parse::<ByteSize>().is_err());
        assert!("MiB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn layers_override_in_order_and_defaults_apply() {
        let file: Settings =
            toml::from_str("listen = \"127.0.0.1:1\"\ndata_dir = \"/f\"\nbody_limit = \"2MiB\"")
                .unwrap();
        let env = Settings {
            data_dir: Some("/e".into()),
            ..Default::default()
        };
        let flags = Settings {
            listen: Some("127.0.0.1:3".parse().unwrap()),
            ..Default::default()
        };
        let c = Config::from_settings(flags.over(env.over(file))).unwrap();
        assert_eq!(c.listen.port(), 3);
        assert_eq!(c.data_dir, PathBuf::from("/e"));
        assert_eq!(c.body_limit, 2 << 20);
        assert_eq!(c.migrations, PathBuf::from("migrations"));
        assert!(c.auto_migrate, "embedded migrates on start by default");
    }

    #[test]
    fn bad_settings_are_refused_with_reasons() {
        let err = toml::from_str::<Settings>("listen = \"127.0.0.1:1\"\nkafka_broker = \"x\"")
            .unwrap_err();
        assert!(err.to_string().contains("kafka_broker"), "{err}");
        let kafka = Settings {
            log: Some(LogBackend::Kafka),
            ..Default::default()
        };
        assert!(
            Config::from_settings(kafka)
                .unwrap_err()
                .to_string()
                .contains("--kafka-brokers")
        );
        let small = Settings {
            ingest_buffer: Some(ByteSize(1024)),
            ..Default::default()
        };
        assert!(Config::from_settings(small).is_err());
        let c = Config::from_settings(Settings {
            log: Some(LogBackend::Kafka),
            kafka_brokers: Some("127.0.0.1:9092".into()),
            ..Default::default()
        })
        .unwrap();
        assert!(!c.auto_migrate, "kafka never migrates implicitly");
    }

    #[test]
    fn unknown_env_vars_are_refused() {
        assert!(Settings::env_names().contains(&"REFOLD_KAFKA_BROKERS".to_string()));
        assert!(check_env(["REFOLD_LISTEN".into(), "PATH".into()], &[]).is_ok());
        let err = check_env(["REFOLD_KAFKA_BROKER".into()], &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("REFOLD_KAFKA_BROKER") && err.contains("REFOLD_KAFKA_BROKERS"),
            "{err}"
        );
    }
}
