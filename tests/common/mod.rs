//! Helpers shared by the integration tests: configs, unique names, an HTTP client
//! for the in-process router, and a spawned `refold` process.
#![allow(dead_code)]

pub mod backends;
pub mod es_proxy;
pub mod models;
pub mod oracle;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use refold::config::{Config, LogBackend, Settings};
use serde_json::Value;
use tower::ServiceExt;

/// The Kafka-API broker the suite runs against (`scripts/test.sh` starts tansu).
pub fn kafka_brokers() -> String {
    std::env::var("TEST_KAFKA_BROKERS").expect(
        "TEST_KAFKA_BROKERS is not set: run the suite with scripts/test.sh, which starts tansu on 127.0.0.1:9092",
    )
}

/// The shared Redis the suite runs against (`scripts/test.sh` starts or reuses it).
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").expect(
        "TEST_REDIS_URL is not set: run the suite with scripts/test.sh, which starts redis \
         (or set TEST_REDIS_URL=redis://127.0.0.1:6379/)",
    )
}

/// The Elasticsearch-API server the suite runs against (`scripts/test.sh` starts
/// osmem-server).
pub fn elasticsearch_url() -> String {
    std::env::var("TEST_ELASTICSEARCH_URL").expect(
        "TEST_ELASTICSEARCH_URL is not set: run the suite with scripts/test.sh, which starts osmem-server \
         (or set TEST_ELASTICSEARCH_URL=http://127.0.0.1:9200)",
    )
}

/// `n` PostPublished of new posts `fresh0…` in a new tribe `tfresh`: events that
/// arrive during a replay without changing the posts a test watches.
pub fn fresh_posts(n: usize) -> Vec<refold::demo::DemoEvent> {
    (0..n)
        .map(|i| refold::demo::DemoEvent {
            stream: format!("post-fresh{i}"),
            event_type: "PostPublished".into(),
            data: serde_json::json!({"post_id": format!("fresh{i}"), "tribe_id": "tfresh",
                                     "author_id": "u1", "title": "fresh", "body": "new"}),
        })
        .collect()
}

/// Every hit of a search (`GET /views/{p}?…` as `first`), in order, following
/// its cursors until one is `null`. `get` sends a GET and returns status and body.
pub async fn follow_cursors<F, Fut>(first: &str, get: F) -> Result<Vec<Value>, String>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = (u16, Value)>,
{
    let mut hits = Vec::new();
    let mut page = first.to_owned();
    for _ in 0..10_000 {
        let (status, b) = get(page.clone()).await;
        if status != 200 {
            return Err(format!("{page}: {status} {b}"));
        }
        let Some(page_hits) = b["hits"].as_array() else {
            return Err(format!("{page}: no `hits` array in {b}"));
        };
        hits.extend(page_hits.iter().cloned());
        match b["cursor"].as_str() {
            Some(c) => page = format!("{first}&cursor={c}"),
            None => return Ok(hits),
        }
    }
    Err(format!("{first}: the cursors never ended"))
}

/// Removes every key of a test's namespace (or topic prefix) from the shared Redis.
pub async fn redis_remove_namespace(ns: &str) {
    let client = ::redis::Client::open(redis_url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let pattern = format!("{ns}*");
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = ::redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut con)
            .await
            .unwrap();
        if !keys.is_empty() {
            ::redis::cmd("UNLINK")
                .arg(keys)
                .query_async::<()>(&mut con)
                .await
                .unwrap();
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
}

/// A name no other test (or earlier run) uses.
pub fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "t{}-{}-{}-{tag}",
        std::process::id(),
        nanos,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn migrations_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations")
}

/// The repository's projection definitions (the demo's).
pub fn projections_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("projections")
}

pub fn embedded_config(data_dir: &Path) -> Config {
    Config::from_settings(Settings {
        data_dir: Some(data_dir.to_owned()),
        migrations: Some(migrations_dir()),
        ..Default::default()
    })
    .unwrap()
}

/// Kafka config with a topic prefix of its own, migrated on start. Its data
/// directory (the embedded read-model store) is its own too.
pub fn kafka_config(prefix: &str) -> Config {
    Config::from_settings(Settings {
        data_dir: Some(Path::new(env!("CARGO_TARGET_TMPDIR")).join(prefix)),
        log: Some(LogBackend::Kafka),
        kafka_brokers: Some(kafka_brokers()),
        topic_prefix: Some(format!("{prefix}.")),
        migrations: Some(migrations_dir()),
        auto_migrate: Some(true),
        ..Default::default()
    })
    .unwrap()
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

/// Sends one request through the router (no socket).
pub async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    content_type: &str,
    body: impl Into<Body>,
) -> Resp {
    call_with(app, method, uri, &[("content-type", content_type)], body).await
}

/// [`call`] with any headers.
pub async fn call_with(
    app: &Router,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: impl Into<Body>,
) -> Resp {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(body.into()).unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    Resp {
        status,
        headers,
        body,
    }
}

pub async fn post_json(app: &Router, uri: &str, body: Value) -> Resp {
    call(app, "POST", uri, "application/json", body.to_string()).await
}

/// Polls `f` until it returns `Some`, or panics after `secs`.
pub async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    secs: u64,
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `refold serve` child process on a free port.
pub struct Proc {
    pub child: Child,
    pub base: String,
    pub log_path: std::path::PathBuf,
}

/// Prints the last `lines` lines of the log at `path` to stderr (for a test that
/// is failing, before the file's directory is gone).
pub fn show_log_tail(path: &Path, lines: usize) {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(lines).collect();
    eprintln!("--- last lines of {} ---", path.display());
    for line in tail.iter().rev() {
        eprintln!("{line}");
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Proc {
    /// Starts `refold serve` with `args` and waits until /healthz answers.
    pub async fn serve(args: &[&str], log_dir: &Path) -> Proc {
        Self::serve_on(free_port(), args, log_dir).await
    }

    /// [`Proc::serve`] on a given port (a restart where clients expect it).
    pub async fn serve_on(port: u16, args: &[&str], log_dir: &Path) -> Proc {
        Self::serve_with(port, args, &[], log_dir).await
    }

    /// [`Proc::serve_on`] with extra environment variables.
    pub async fn serve_with(
        port: u16,
        args: &[&str],
        envs: &[(&str, &str)],
        log_dir: &Path,
    ) -> Proc {
        static STARTS: AtomicU32 = AtomicU32::new(0);
        let n = STARTS.fetch_add(1, Ordering::Relaxed);
        let log_path = log_dir.join(format!("refold-{port}-{n}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_refold"))
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--migrations", migrations_dir().to_str().unwrap()])
            .args(args)
            .env_remove("REFOLD_CONFIG")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut p = Proc {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log_path,
        };
        let client = reqwest::Client::new();
        let url = format!("{}/healthz", p.base);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if client
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return p;
            }
            if let Some(status) = p.child.try_wait().unwrap() {
                panic!("refold exited with {status} before serving:\n{}", p.log());
            }
            assert!(
                Instant::now() < deadline,
                "refold did not start:\n{}",
                p.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success(), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "refold ignored SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every record of `topic`, as (partition, offset, record).
pub async fn events(
    log: &dyn refold::log::EventLog,
    topic: &str,
) -> Vec<(u32, u64, refold::log::Record)> {
    let ends = log.end_offsets(topic).await.unwrap();
    let mut out = Vec::new();
    for (p, end) in ends.into_iter().enumerate() {
        refold::log::scan(log, topic, p as u32, 0, end, |r| {
            out.push((p as u32, r.offset, r.record));
            Ok(())
        })
        .await
        .unwrap();
    }
    out
}

/// The versions of `stream` in log order.
pub async fn stream_versions(
    log: &dyn refold::log::EventLog,
    topic: &str,
    stream: &str,
) -> Vec<u64> {
    envelopes(log, topic)
        .await
        .into_iter()
        .filter(|e| e.stream == stream)
        .map(|e| e.version)
        .collect()
}

pub async fn envelopes(
    log: &dyn refold::log::EventLog,
    topic: &str,
) -> Vec<refold::event::Envelope> {
    events(log, topic)
        .await
        .into_iter()
        .map(|(_, _, r)| serde_json::from_slice(r.value.as_ref().unwrap()).unwrap())
        .collect()
}

/// Routes refold's logs into the test's captured output (shown when it fails).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Sends `n` copies of one append at once; the answers, in no particular order.
pub async fn race(app: &Router, uri: &str, body: Value, n: usize) -> Vec<Resp> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (app, uri, body) = (app.clone(), uri.to_owned(), body.clone());
            tokio::spawn(async move { post_json(&app, &uri, body).await })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    answers
}

/// I3: exactly one 201, at `version`; every other answer a 409 with the error shape.
pub fn assert_one_winner(answers: &[Resp], version: u64) {
    let statuses: Vec<u16> = answers.iter().map(|r| r.status.as_u16()).collect();
    let wins: Vec<&Resp> = answers.iter().filter(|r| r.status == 201).collect();
    let conflicts = answers
        .iter()
        .filter(|r| r.status == 409 && r.body["error"]["code"] == "wrong_expected_version")
        .count();
    assert_eq!(
        (wins.len(), conflicts),
        (1, answers.len() - 1),
        "{statuses:?}"
    );
    assert_eq!(wins[0].body["first_version"], version, "{:?}", wins[0].body);
}

/// A TCP forwarder to a backend that a test can cut (open connections dropped,
/// new ones closed at once) and restore: the backend becomes unreachable.
pub struct TcpGate {
    pub addr: std::net::SocketAddr,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpGate {
    /// Forwards to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> TcpGate {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let upstream = upstream.to_owned();
        let task = tokio::spawn({
            let (open, conns) = (open.clone(), conns.clone());
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if !open.load(Ordering::SeqCst) {
                        continue; // dropped: closed at once
                    }
                    let upstream = upstream.clone();
                    let conn = tokio::spawn(async move {
                        if let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    conns.lock().unwrap().push(conn);
                }
            }
        });
        TcpGate {
            addr,
            open,
            conns,
            task,
        }
    }

    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for TcpGate {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}
