//! Private backends a test may kill and restart: a tansu broker with its own
//! file-backed store, and a Redis that keeps nothing on disk.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn wait_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not open port {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A tansu broker on `127.0.0.1:{port}` with its sqlite store in `dir`.
pub struct Broker {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub port: u16,
}

impl Broker {
    pub fn start(dir: tempfile::TempDir, port: u16) -> Broker {
        let bin = std::env::var("TEST_TANSU_BIN").unwrap_or_else(|_| "tansu".into());
        let url = format!("tcp://127.0.0.1:{port}");
        // Kept beside its store (a restart appends), and shown if the test fails.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join(TANSU_LOG))
            .expect("tansu's log file");
        let child = Command::new(&bin)
            .current_dir(dir.path())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "sqlite://tansu.db",
            ])
            .stdout(log.try_clone().expect("tansu's log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin} (set TEST_TANSU_BIN or run scripts/test.sh): {e}")
            });
        wait_port(port, "tansu");
        index_tansu_db(&dir.path().join("tansu.db"));
        Broker {
            child: Some(child),
            dir,
            port,
        }
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGKILL; the store and port, to start it again.
    pub fn kill(mut self) -> (tempfile::TempDir, u16) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
        (
            std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap()),
            self.port,
        )
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            super::show_log_tail(&self.dir.path().join(TANSU_LOG), 30);
        }
    }
}

/// The broker's stdout and stderr, in its directory.
const TANSU_LOG: &str = "tansu.log";

/// The index `scripts/services.sh` adds to the shared broker's store (without it,
/// tansu 0.6 reads headers in quadratic time).
fn index_tansu_db(db: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/index-tansu-db.py");
    let ok = Command::new("python3")
        .arg(script)
        .arg(db)
        .status()
        .expect("python3 on PATH");
    assert!(ok.success(), "could not index {}", db.display());
}

/// A redis-server of the test's own on `127.0.0.1:{port}`, without persistence:
/// a restart loses everything.
pub struct PrivateRedis {
    child: Child,
    pub port: u16,
}

impl PrivateRedis {
    pub fn start(port: u16) -> PrivateRedis {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/services.sh installs it)");
        wait_port(port, "redis-server");
        PrivateRedis { child, port }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// SIGKILL and start again, empty.
    pub fn restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        *self = PrivateRedis::start(self.port);
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
