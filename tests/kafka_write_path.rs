//! The write path on Kafka (tansu, started by scripts/test.sh): migrations, the
//! record layout (I2, I5), concurrency (I3), idempotency across restarts (I4), and
//! a broker outage that must never be answered with 2xx (I1).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::backends::Broker;
use common::{eventually, kafka_config, post_json, unique};
use refold::config::Config;
use refold::http::app;
use refold::log::kafka::KafkaLog;
use refold::log::{EventLog, partition_for};
use refold::migrate;
use refold::server::{Refold, open_log};
use serde_json::json;
use uuid::Uuid;

fn kafka(config: &Config) -> Arc<dyn EventLog> {
    open_log(config).unwrap()
}

#[tokio::test]
async fn migrate_is_idempotent_and_serve_refuses_an_unmigrated_log() {
    let prefix = unique("mig");
    let config = Config {
        auto_migrate: false,
        ..kafka_config(&prefix)
    };
    let log = kafka(&config);
    let migrations = migrate::load(&config.migrations).unwrap();

    let err = Refold::start(&config, log.clone())
        .await
        .err()
        .expect("unmigrated log must be refused")
        .to_string();
    assert!(
        err.contains("not migrated") && err.contains("refold migrate"),
        "{err}"
    );

    let first = migrate::migrate(&*log, &migrations, &config.topic_prefix)
        .await
        .unwrap();
    let all = vec![
        "0001_event_log".to_string(),
        "0002_read_model_indexes".to_string(),
    ];
    assert_eq!(first.applied, all);
    assert!(first.topics_created.contains(&format!("{prefix}.events")));
    let again = migrate::migrate(&*log, &migrations, &config.topic_prefix)
        .await
        .unwrap();
    assert!(again.applied.is_empty() && again.topics_created.is_empty());
    assert_eq!(again.already, all);
    let events = log
        .describe_topic(&format!("{prefix}.events"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(events.partitions, 3);
    migrate::check(&*log, &migrations, &config.topic_prefix)
        .await
        .unwrap();

    // A changed migration file is refused, as is a topic that exists with other partitions.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(config.migrations.join("0001_event_log.toml")).unwrap();
    std::fs::write(
        dir.path().join("0001_event_log.toml"),
        text.replace("partitions = 3", "partitions = 4"),
    )
    .unwrap();
    let changed = migrate::load(dir.path()).unwrap();
    let err = migrate::migrate(&*log, &changed, &config.topic_prefix)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("changed after it was applied"), "{err}");
    let fresh_prefix = format!("{}.", unique("mig2"));
    log.create_topic(&refold::log::TopicSpec {
        name: format!("{fresh_prefix}events"),
        partitions: 1,
        replication_factor: 1,
        config: Default::default(),
    })
    .await
    .unwrap();
    let err = migrate::migrate(&*log, &migrations, &fresh_prefix)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("exists with 1 partitions"), "{err}");
}

#[tokio::test]
async fn events_are_keyed_partitioned_and_enveloped_on_kafka() {
    // I1, I2, I5
    let prefix = unique("layout");
    let config = kafka_config(&prefix);
    let refold = Refold::start(&config, kafka(&config)).await.unwrap();
    let app = app(refold.state.clone());
    let streams = ["post-1", "post-2", "user-7", "tribe-3", "post-99"];
    for round in 0..3 {
        for s in streams {
            let r = post_json(
                &app,
                &format!("/streams/{s}/events"),
                json!({"type": "PostViewed", "data": {"round": round}}),
            )
            .await;
            assert_eq!(r.status, 201, "{:?}", r.body);
        }
    }
    let topic = format!("{prefix}.events");
    let records = common::events(&*refold.log, &topic).await;
    assert_eq!(records.len(), 15);
    let mut by_stream: HashMap<String, Vec<u64>> = HashMap::new();
    for (p, _, rec) in &records {
        let env: refold::event::Envelope =
            serde_json::from_slice(rec.value.as_ref().unwrap()).unwrap();
        assert_eq!(*p, partition_for(&env.stream, 3));
        assert_eq!(rec.key, format!("{}/{}", env.stream, env.version));
        assert_eq!(rec.header("type"), Some(&b"PostViewed"[..]));
        by_stream.entry(env.stream).or_default().push(env.version);
    }
    for s in streams {
        assert_eq!(by_stream[s], vec![1, 2, 3], "{s}");
    }
    // Events near the record limit (writer::MAX_RECORD_BYTES) fit a Kafka record.
    let big = json!({"type": "PostPublished", "data": {"body": "x".repeat(990_000)}});
    let r = post_json(&app, "/streams/post-big/events", big).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    refold.stop().await;
}

#[tokio::test]
async fn concurrent_appends_and_retries_on_kafka() {
    // I3, I4
    let prefix = unique("conc");
    let config = kafka_config(&prefix);
    let id = Uuid::new_v4();
    let first = {
        let refold = Refold::start(&config, kafka(&config)).await.unwrap();
        let app = app(refold.state.clone());
        let body =
            json!({"events": [{"type": "PostPublished", "data": {}}], "expected_version": 0});
        common::assert_one_winner(
            &common::race(&app, "/streams/post-7/events", body, 12).await,
            1,
        );
        let first = post_json(
            &app,
            "/streams/post-7/events",
            json!({"type": "PostLiked", "data": {}, "id": id}),
        )
        .await;
        assert_eq!(first.status, 201);
        refold.stop().await;
        first
    };
    // A new process recovers the heads from the compacted stream-heads topic.
    let refold = Refold::start(&config, kafka(&config)).await.unwrap();
    let app = app(refold.state.clone());
    let again = post_json(
        &app,
        "/streams/post-7/events",
        json!({"type": "PostLiked", "data": {}, "id": id}),
    )
    .await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    assert_eq!(again.body["events"], first.body["events"]);
    let next = post_json(
        &app,
        "/streams/post-7/events",
        json!({"type": "PostLiked", "data": {}, "expected_version": 2}),
    )
    .await;
    assert_eq!(next.status, 201, "{:?}", next.body);
    assert_eq!(
        common::stream_versions(&*refold.log, &format!("{prefix}.events"), "post-7").await,
        vec![1, 2, 3]
    );
    refold.stop().await;
}

#[tokio::test]
async fn a_broker_outage_is_never_answered_with_2xx() {
    common::init_logs();
    // I1: while the broker is down, appends fail with 503 + Retry-After; after it
    // returns, writing resumes, and every acknowledged event is in the log once.
    let port = common::free_port();
    let broker = Broker::start(tempfile::tempdir().unwrap(), port);
    let brokers = format!("127.0.0.1:{port}");
    let config = Config {
        kafka_brokers: Some(brokers.clone()),
        kafka_timeout: Duration::from_secs(3),
        ..kafka_config(&unique("outage"))
    };
    let log: Arc<dyn EventLog> = Arc::new(KafkaLog::new(&brokers, config.kafka_timeout).unwrap());
    let refold = Refold::start(&config, log.clone()).await.unwrap();
    let app = app(refold.state.clone());
    let mut acked: Vec<Uuid> = Vec::new();
    let post = |app: axum::Router, stream: &'static str| async move {
        let id = Uuid::new_v4();
        let r = post_json(
            &app,
            &format!("/streams/{stream}/events"),
            json!({"type": "PostLiked", "data": {}, "id": id}),
        )
        .await;
        (r, id)
    };
    for _ in 0..5 {
        let (r, id) = post(app.clone(), "post-1").await;
        assert_eq!(r.status, 201, "{:?}", r.body);
        acked.push(id);
    }

    let (dir, port) = broker.kill();
    let mut unknown = Vec::new();
    for _ in 0..3 {
        let (r, id) = post(app.clone(), "post-1").await;
        assert_eq!(
            r.status, 503,
            "an append without a broker must not succeed: {:?}",
            r.body
        );
        assert_eq!(r.body["error"]["code"], "log_unavailable");
        assert!(r.headers.contains_key("retry-after"));
        unknown.push(id);
    }
    // A batch across every partition fails as a whole, line by line, never 2xx.
    let lines: Vec<serde_json::Value> = (0..12)
        .map(|i| {
            let id = Uuid::new_v4();
            unknown.push(id);
            json!({"stream": format!("user-{i}"), "type": "UserRegistered", "data": {}, "id": id})
        })
        .collect();
    let r = post_json(&app, "/events", json!(lines)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["errors"], true);
    for item in r.body["items"].as_array().unwrap() {
        assert_eq!(item["status"], 503, "{item}");
    }
    assert_eq!(
        common::call(&app, "GET", "/readyz", "application/json", "")
            .await
            .status,
        503,
        "not ready while the log cannot be confirmed"
    );

    let _broker = Broker::start(dir, port);
    let id = eventually(120, "writes to resume after the broker returned", || {
        let app = app.clone();
        async move {
            let id = Uuid::new_v4();
            let r = post_json(
                &app,
                "/streams/post-1/events",
                json!({"type": "PostLiked", "data": {}, "id": id}),
            )
            .await;
            (r.status == 201).then_some(id)
        }
    })
    .await;
    acked.push(id);
    // Retrying the failed batch with the same ids writes each event exactly once.
    let r = post_json(&app, "/events", json!(lines)).await;
    for item in r.body["items"].as_array().unwrap() {
        assert!(item["status"] == 201 || item["status"] == 200, "{item}");
    }

    let envs = common::envelopes(&*log, &format!("{}events", config.topic_prefix)).await;
    let versions: Vec<u64> = envs
        .iter()
        .filter(|e| e.stream == "post-1")
        .map(|e| e.version)
        .collect();
    for i in 0..12 {
        let user: Vec<u64> = envs
            .iter()
            .filter(|e| e.stream == format!("user-{i}"))
            .map(|e| e.version)
            .collect();
        assert_eq!(user, vec![1], "user-{i}: written once after the retry");
    }
    assert_eq!(
        versions,
        (1..=versions.len() as u64).collect::<Vec<_>>(),
        "gap-free, no duplicates"
    );
    for id in &acked {
        assert_eq!(
            envs.iter().filter(|e| e.id == *id).count(),
            1,
            "acknowledged event {id} exactly once"
        );
    }
    for id in &unknown {
        assert!(
            envs.iter().filter(|e| e.id == *id).count() <= 1,
            "an unacknowledged event at most once"
        );
    }
    refold.stop().await;
}
