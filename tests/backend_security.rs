//! Security towards the backends: Redis with AUTH over TLS (a private
//! redis-server with a certificate of a test CA), Elasticsearch credentials
//! (basic and API key) checked by a proxy that refuses requests without them,
//! librdkafka properties reaching the Kafka clients, and secrets kept out of
//! logs and errors.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::es_proxy::EsProxy;
use common::{Proc, elasticsearch_url, embedded_config, free_port};
use refold::config::{EsAuth, Secret};
use refold::log::embedded::EmbeddedLog;
use refold::log::kafka::KafkaLog;
use refold::server::Refold;
use serde_json::json;

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a certificate it signed for localhost / 127.0.0.1, in `dir`.
fn certificates(dir: &Path) {
    let sh = |args: &[&str]| run(Command::new("openssl").current_dir(dir).args(args));
    sh(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=refold-test-ca",
    ]);
    sh(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    sh(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
}

struct Redis(std::process::Child);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const REDIS_PASSWORD: &str = "redis-pw-7c1f0e99";

/// A private redis-server that speaks only TLS and wants a password.
async fn tls_redis(dir: &Path) -> (Redis, u16) {
    let port = free_port();
    let child = Command::new("redis-server")
        .current_dir(dir)
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--tls-cert-file",
            "server.crt",
            "--tls-key-file",
            "server.key",
        ])
        .args(["--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no"])
        .args([
            "--requirepass",
            REDIS_PASSWORD,
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let redis = Redis(child);
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return (redis, port);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("redis-server with TLS did not listen on {port}");
}

#[tokio::test]
async fn redis_projections_run_over_tls_with_a_password_and_a_wrong_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let (_redis, port) = tls_redis(dir.path()).await;
    let ca = dir.path().join("ca.crt");
    let envs = [("SSL_CERT_FILE", ca.to_str().unwrap())];
    let data = dir.path().join("data");
    let url = format!("rediss://:{REDIS_PASSWORD}@localhost:{port}/");
    let mut p = Proc::serve_with(
        free_port(),
        &["--data-dir", data.to_str().unwrap(), "--redis-url", &url],
        &envs,
        dir.path(),
    )
    .await;
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/streams/post-9/events", p.base))
        .json(&json!({"events": [
            {"type": "PostPublished", "data": {"post_id": "9", "tribe_id": "t", "author_id": "u", "title": "x", "body": "y"}},
            {"type": "PostLiked", "data": {"post_id": "9", "user_id": "u2"}},
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let pos = r.json::<serde_json::Value>().await.unwrap()["position"]
        .as_str()
        .unwrap()
        .to_owned();
    let view: serde_json::Value = http
        .get(format!("{}/views/post_stats/9?after={pos}", p.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["likes"], 1, "folded into Redis over TLS: {view}");
    let ready = http.get(format!("{}/readyz", p.base)).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    p.terminate();
    assert!(
        !p.log().contains(REDIS_PASSWORD),
        "the password reached the log:\n{}",
        p.log()
    );

    // A wrong password: refold does not start, says why, and does not echo it.
    let wrong = format!("rediss://:wrong-pw-0d2b9e71@localhost:{port}/");
    let out = Command::new(env!("CARGO_BIN_EXE_refold"))
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--data-dir", data.to_str().unwrap(), "--redis-url", &wrong])
        .args(["--migrations", common::migrations_dir().to_str().unwrap()])
        .envs(envs)
        .env_remove("REFOLD_CONFIG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("Redis"), "{err}");
    assert!(
        err.to_lowercase().contains("auth")
            || err.contains("WRONGPASS")
            || err.contains("password"),
        "{err}"
    );
    assert!(
        !err.contains("wrong-pw-0d2b9e71"),
        "the password reached the error:\n{err}"
    );

    // Without the CA, the server's certificate is not trusted.
    let out = Command::new(env!("CARGO_BIN_EXE_refold"))
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--data-dir", data.to_str().unwrap(), "--redis-url", &url])
        .args(["--migrations", common::migrations_dir().to_str().unwrap()])
        .env_remove("REFOLD_CONFIG")
        .env_remove("SSL_CERT_FILE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an untrusted certificate was accepted: {err}"
    );
    assert!(!err.contains(REDIS_PASSWORD), "{err}");
}

async fn start_with_es(auth: EsAuth, proxy: &EsProxy, dir: &Path) -> anyhow::Result<Refold> {
    let mut config = embedded_config(dir);
    config.elasticsearch_url = Some(proxy.url.clone());
    config.elasticsearch_auth = auth;
    config.topic_prefix = common::unique("esauth") + ".";
    Refold::start(&config, Arc::new(EmbeddedLog::open(dir).unwrap())).await
}

#[tokio::test]
async fn elasticsearch_credentials_are_presented_and_their_absence_is_a_clear_error() {
    let proxy = EsProxy::start(&elasticsearch_url()).await;
    // base64("refold:es-pw-31d8a2")
    proxy.require_authorization("Basic cmVmb2xkOmVzLXB3LTMxZDhhMg==");
    let dir = tempfile::tempdir().unwrap();
    let basic = EsAuth {
        username: Some("refold".into()),
        password: Some(Secret("es-pw-31d8a2".into())),
        ..EsAuth::default()
    };
    let refold = start_with_es(basic, &proxy, dir.path()).await.unwrap();
    // The document projections work through the secured server.
    let app = refold::http::app(refold.state.clone());
    let r = common::post_json(
        &app,
        "/streams/post-5/events",
        json!({"type": "PostPublished", "data": {"post_id": "5", "tribe_id": "t", "author_id": "u", "title": "secured", "body": "b"}}),
    )
    .await;
    let pos = r.body["position"].as_str().unwrap().to_owned();
    let r = common::call(&app, "GET", &format!("/views/posts/5?after={pos}"), "", "").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["title"], "secured");
    refold.stop().await;

    for auth in [
        EsAuth::default(),
        EsAuth {
            username: Some("refold".into()),
            password: Some(Secret("not-the-pw-5e0c".into())),
            ..EsAuth::default()
        },
    ] {
        let dir = tempfile::tempdir().unwrap();
        let err = format!(
            "{:#}",
            start_with_es(auth, &proxy, dir.path())
                .await
                .err()
                .expect("refused")
        );
        assert!(
            err.contains("Elasticsearch") && err.contains("401"),
            "{err}"
        );
        assert!(!err.contains("not-the-pw-5e0c"), "{err}");
    }

    proxy.require_authorization("ApiKey a2V5aWQ6c2VjcmV0LTc3");
    let dir = tempfile::tempdir().unwrap();
    let key = EsAuth {
        api_key: Some(Secret("a2V5aWQ6c2VjcmV0LTc3".into())),
        ..EsAuth::default()
    };
    start_with_es(key, &proxy, dir.path())
        .await
        .unwrap()
        .stop()
        .await;
}

#[tokio::test]
async fn kafka_properties_reach_librdkafka() {
    let prop = |k: &str, v: &str| vec![(k.to_owned(), Secret(v.to_owned()))];
    // librdkafka checks what it is given.
    let err = KafkaLog::with_properties(
        "127.0.0.1:9092",
        &prop("security.protocol", "carrier-pigeon"),
        Duration::from_secs(1),
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(err.contains("security.protocol"), "{err}");
    let err = KafkaLog::with_properties(
        "127.0.0.1:9092",
        &prop("no.such.property", "1"),
        Duration::from_secs(1),
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(err.contains("no.such.property"), "{err}");
    // The same start without the properties works (the control)...
    let config = common::kafka_config(&common::unique("kprops"));
    let log = KafkaLog::with_properties(
        config.kafka_brokers.as_deref().unwrap(),
        &config.kafka_properties,
        config.kafka_timeout,
    )
    .unwrap();
    Refold::start(&config, Arc::new(log))
        .await
        .unwrap()
        .stop()
        .await;
    // ...and TLS towards the suite's plaintext broker gets nowhere.
    let mut config = common::kafka_config(&common::unique("kprops"));
    config.kafka_properties = prop("security.protocol", "SSL");
    config.kafka_timeout = Duration::from_secs(2);
    let log = KafkaLog::with_properties(
        config.kafka_brokers.as_deref().unwrap(),
        &config.kafka_properties,
        config.kafka_timeout,
    )
    .unwrap();
    let started = tokio::time::timeout(
        Duration::from_secs(30),
        Refold::start(&config, Arc::new(log)),
    )
    .await
    .expect("a clear error within the Kafka timeout, not a hang");
    let err = format!(
        "{:#}",
        started
            .err()
            .expect("no start over TLS against a plaintext broker")
    );
    assert!(err.contains("kafka_properties"), "{err}");
    // The config refuses the properties the write path's guarantees rest on.
    for own in [
        "acks=1",
        "enable.idempotence=false",
        "bootstrap.servers=x:1",
    ] {
        let err = refold::config::kafka_properties(own)
            .unwrap_err()
            .to_string();
        assert!(err.contains("refold sets it"), "{own}: {err}");
    }
}

/// Runs `refold serve` with `args` and `envs` until it exits (each run here
/// fails at start); its stdout and stderr.
fn serve_fails(args: &[&str], envs: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_refold"))
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--data-dir", dir.path().join("d").to_str().unwrap()])
        .args(["--migrations", common::migrations_dir().to_str().unwrap()])
        .args(args)
        .envs(envs.iter().copied())
        .env("REFOLD_API_KEYS", "admin:api-key-secret-4f1b2c3d")
        .env("RUST_LOG", "debug")
        .env_remove("REFOLD_CONFIG")
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "expected a failed start: {all}");
    assert!(
        !all.contains("api-key-secret-4f1b2c3d"),
        "the API key leaked:\n{all}"
    );
    all
}

#[tokio::test]
async fn secrets_stay_out_of_logs_errors_and_help() {
    // A Redis that cannot be reached, its password in the URL.
    let out = serve_fails(
        &["--redis-url", "redis://:redis-secret-9a8b7c@127.0.0.1:1/"],
        &[],
    );
    assert!(
        out.contains("Redis") && !out.contains("redis-secret-9a8b7c"),
        "{out}"
    );
    // An Elasticsearch that cannot be reached, with credentials in the URL and
    // in the settings.
    let out = serve_fails(
        &[
            "--elasticsearch-url",
            "http://u:es-url-secret-77aa@127.0.0.1:1",
        ],
        &[
            ("REFOLD_ELASTICSEARCH_USERNAME", "u"),
            ("REFOLD_ELASTICSEARCH_PASSWORD", "es-secret-1a2b3c"),
        ],
    );
    assert!(out.contains("Elasticsearch"), "{out}");
    for secret in ["es-url-secret-77aa", "es-secret-1a2b3c"] {
        assert!(!out.contains(secret), "{secret} leaked:\n{out}");
    }
    // A mistyped Kafka property holding a secret: librdkafka refuses it, and
    // rdkafka's own message would quote the value.
    let brokers = common::kafka_brokers();
    let out = serve_fails(
        &["--log", "kafka", "--kafka-brokers", &brokers],
        &[(
            "REFOLD_KAFKA_PROPERTIES",
            "sasl.pasword=kafka-secret-5d6e7f",
        )],
    );
    assert!(out.contains("sasl.pasword"), "names the property: {out}");
    assert!(
        !out.contains("kafka-secret-5d6e7f"),
        "the value leaked:\n{out}"
    );

    // --help shows the settings but none of the values the environment holds.
    let help = Command::new(env!("CARGO_BIN_EXE_refold"))
        .args(["serve", "--help"])
        .env("REFOLD_API_KEYS", "admin:api-key-secret-4f1b2c3d")
        .env("REFOLD_ELASTICSEARCH_PASSWORD", "es-secret-1a2b3c")
        .env("REFOLD_ELASTICSEARCH_API_KEY", "es-key-secret-3e3e")
        .env(
            "REFOLD_ELASTICSEARCH_URL",
            "https://u:es-url-secret-77aa@es:9200",
        )
        .env("REFOLD_REDIS_URL", "rediss://:redis-secret-9a8b7c@r:6379/")
        .env(
            "REFOLD_KAFKA_PROPERTIES",
            "sasl.password=kafka-secret-5d6e7f",
        )
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--api-keys",
        "--elasticsearch-password",
        "--kafka-properties",
        "--redis-url",
    ] {
        assert!(help.contains(flag), "{flag} in --help");
    }
    for secret in [
        "api-key-secret",
        "es-secret",
        "es-key-secret",
        "es-url-secret",
        "redis-secret",
        "kafka-secret",
    ] {
        assert!(!help.contains(secret), "{secret} in --help:\n{help}");
    }
}
