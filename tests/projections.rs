//! Projections end to end: read models against an independent fold of the same
//! events (`common::oracle`), on the embedded stores and on Kafka with Redis;
//! crashes, a Redis that loses its data, replays under load, read-your-writes,
//! dead letters, and the CLI.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::backends::PrivateRedis;
use common::models::{Api, check_models};
use common::oracle::Oracle;
use common::{Proc, unique};
use refold::config::{ByteSize, Config, LogBackend, Settings};
use refold::demo::{DemoConfig, DemoEvent, Generator};
use refold::position::Position;
use refold::projection::engine::{Engine, EngineConfig};
use refold::server::{Refold, load_projections, open_log, open_stores};
use serde_json::{Value, json};

const PARTITIONS: u32 = 3;

fn demo_events(seed: u64, n: usize) -> Vec<DemoEvent> {
    Generator::new(DemoConfig {
        seed,
        users: 60,
        tribes: 6,
        hot_share: 0.3,
    })
    .take(n)
}

/// Posts `events` in NDJSON bulks; every one must be appended. Returns the merged
/// position token.
async fn ingest(api: &Api, events: &[DemoEvent]) -> Position {
    let mut pos = Position::default();
    for chunk in events.chunks(500) {
        let body: String = chunk.iter().map(|e| format!("{}\n", e.to_json())).collect();
        let (status, b) = api
            .send("POST", "/events", "application/x-ndjson", body)
            .await;
        assert_eq!(status, 200, "{b}");
        assert_eq!(b["errors"], false, "{b}");
        pos.merge(&b["position"].as_str().unwrap().parse().unwrap());
    }
    pos
}

/// Posts `n` demo events of `seed`; their oracle and position token.
async fn seeded(api: &Api, seed: u64, n: usize) -> (Oracle, Position) {
    let events = demo_events(seed, n);
    let mut oracle = Oracle::new();
    oracle.apply_demo(&events, PARTITIONS);
    (oracle, ingest(api, &events).await)
}

fn config(settings: Settings) -> Config {
    Config::from_settings(Settings {
        migrations: Some(common::migrations_dir()),
        ..settings
    })
    .unwrap()
}

fn embedded(dir: &Path, batch: usize) -> Config {
    config(Settings {
        data_dir: Some(dir.to_owned()),
        projection_batch: Some(batch),
        ..Default::default()
    })
}

fn kafka_redis(dir: &Path, redis: &str) -> Config {
    config(Settings {
        data_dir: Some(dir.to_owned()),
        log: Some(LogBackend::Kafka),
        kafka_brokers: Some(common::kafka_brokers()),
        topic_prefix: Some(format!("{}.", unique("proj"))),
        auto_migrate: Some(true),
        redis_url: Some(redis.to_owned()),
        elasticsearch_url: Some(common::elasticsearch_url()),
        ..Default::default()
    })
}

async fn start(config: &Config) -> (Refold, Api) {
    let r = Refold::start(config, open_log(config).unwrap())
        .await
        .unwrap();
    let api = Api::Local(refold::http::app(r.state.clone()));
    (r, api)
}

/// The status of projection `name` once it has halted (`failed`), waiting up to
/// 30 s for it.
async fn failed(api: &Api, name: &str) -> Value {
    common::eventually(30, &format!("{name} to halt"), || async move {
        let s = status(api, name).await;
        (s["state"] == "failed").then_some(s)
    })
    .await
}

async fn status(api: &Api, name: &str) -> Value {
    let (s, b) = api.get(&format!("/projections/{name}")).await;
    assert_eq!(s, 200, "{b}");
    b
}

#[tokio::test]
async fn embedded_read_models_equal_an_independent_fold() {
    let dir = tempfile::tempdir().unwrap();
    let (r, api) = start(&embedded(dir.path(), 1000)).await;
    let events = demo_events(1, 3000);
    let mut oracle = Oracle::new();
    oracle.apply_demo(&events, PARTITIONS);
    assert_eq!(oracle.unranked(), 0);
    let pos = ingest(&api, &events).await;
    check_models(&api, &oracle, &pos, false).await.unwrap();
    let s = status(&api, "post_stats").await;
    assert_eq!(s["lag"], 0, "{s}");
    assert_eq!(s["events"], 3000, "{s}");
    assert_eq!(s["dead_letters"]["count"], 0, "{s}");
    assert_eq!(
        (s["state"].as_str(), s["generation"].as_u64()),
        (Some("running"), Some(1))
    );
    r.stop().await;
}

#[tokio::test]
async fn a_busy_document_worker_gathers_appends_into_one_commit_and_an_idle_one_commits_at_once() {
    // Commit pacing of document projections: a worker that committed less than
    // the interval ago gathers what arrives into the same batch. With an interval of ten minutes, only a
    // full batch (10 events) ends the gathering, whatever the machine's speed.
    let dir = tempfile::tempdir().unwrap();
    let config = config(Settings {
        data_dir: Some(dir.path().to_owned()),
        projection_batch: Some(10),
        document_commit_interval_ms: Some(600_000),
        ..Default::default()
    });
    let (r, api) = start(&config).await;
    let read = |token: String| {
        let api = &api;
        async move {
            let (st, b) = api
                .get(&format!("/views/posts/p1?after={token}&wait_ms=60000"))
                .await;
            assert_eq!(st, 200, "{b}");
            b
        }
    };
    // Idle: the first event is committed at once, not after the interval.
    let published = json!({"type": "PostPublished", "data": {"post_id": "p1",
        "tribe_id": "t1", "author_id": "u1", "title": "t", "body": "b"}});
    let token = api.append("post-p1", &published).await;
    assert_eq!(read(token).await["tribe_id"], "t1");
    assert_eq!(status(&api, "posts").await["commits"], 1);
    // Busy: 20 likes, one request each, fold as two full batches.
    let mut token = String::new();
    for i in 0..20 {
        let like =
            json!({"type": "PostLiked", "data": {"post_id": "p1", "user_id": format!("u{i}")}});
        token = api.append("post-p1", &like).await;
    }
    assert_eq!(read(token).await["likes"], 20);
    let s = status(&api, "posts").await;
    assert_eq!(
        (s["events"].as_u64(), s["commits"].as_u64()),
        (Some(21), Some(3)),
        "{s}"
    );
    r.stop().await;
}

#[tokio::test]
async fn a_worker_with_a_backlog_folds_several_reads_into_one_commit() {
    // 1500 views of 10 KB on one stream (one partition), appended before any
    // projection runs: a projection starts with a backlog of about 15 MB. Reads
    // stop at 1 MiB, so one commit per read makes at least 14 commits. With a
    // fold buffer of 4 MiB, a worker folds the reads after its first into the
    // same commit while the buffer has room (`projection_batch` events is far
    // above), so at least 3 commits and a handful; with a fold buffer of 0, one
    // commit per read. Each projection runs alone here, so that no other worker
    // takes room in the buffer: `post_stats` (key-value) folds the views,
    // `posts` (documents) skips them and still commits its checkpoint.
    const EVENTS: usize = 1500;
    const PAD: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let none = dir.path().join("no-projections");
    std::fs::create_dir_all(&none).unwrap();
    let (r, api) = start(&config(Settings {
        data_dir: Some(dir.path().to_owned()),
        projections: Some(none),
        stream_history: Some(false),
        ..Default::default()
    }))
    .await;
    let pad = "x".repeat(PAD);
    let events: Vec<String> = (0..EVENTS)
        .map(|i| {
            json!({"stream": "post-p1", "type": "PostViewed",
                "data": {"post_id": "p1", "user_id": format!("u{i}"), "pad": pad}})
            .to_string()
        })
        .collect();
    for chunk in events.chunks(50) {
        let (status, b) = api
            .send("POST", "/events", "application/x-ndjson", chunk.join("\n"))
            .await;
        assert_eq!((status, &b["errors"]), (200, &json!(false)), "{b}");
    }
    r.stop().await;
    drop(api); // it holds the log open

    let one_read = 1 << 20;
    for (name, buffer, commits) in [
        (
            "post_stats",
            4 << 20,
            (EVENTS * PAD).div_ceil(one_read + (4 << 20))..=7,
        ),
        (
            "posts",
            4 << 20,
            (EVENTS * PAD).div_ceil(one_read + (4 << 20))..=7,
        ),
        ("post_stats", 0, (EVENTS * PAD / one_read)..=EVENTS),
    ] {
        let alone = dir.path().join(format!("only-{name}"));
        std::fs::create_dir_all(&alone).unwrap();
        let file = format!("{name}.toml");
        std::fs::copy(common::projections_dir().join(&file), alone.join(&file)).unwrap();
        let data = tempfile::tempdir().unwrap();
        std::fs::copy(dir.path().join("log.redb"), data.path().join("log.redb")).unwrap();
        let (r, api) = start(&config(Settings {
            data_dir: Some(data.path().to_owned()),
            projections: Some(alone),
            stream_history: Some(false),
            projection_batch: Some(1_000_000),
            fold_buffer: Some(ByteSize(buffer)),
            ..Default::default()
        }))
        .await;
        let s = common::eventually(60, &format!("{name} to fold the backlog"), || {
            let api = &api;
            async move {
                let s = status(api, name).await;
                (s["events"] == EVENTS && s["lag"] == 0).then_some(s)
            }
        })
        .await;
        let made = s["commits"].as_u64().unwrap() as usize;
        assert!(
            commits.contains(&made),
            "{name}, fold buffer of {buffer} bytes: {made} commits for {EVENTS} events of {PAD} bytes, not {commits:?}: {s}"
        );
        if name == "post_stats" {
            let (_, view) = api.get("/views/post_stats/p1").await;
            assert_eq!(
                (&view["views"], &view["unique_viewers"]),
                (&json!(EVENTS), &json!(EVENTS)),
                "{view}"
            );
        }
        r.stop().await;
    }
}

#[tokio::test]
async fn kafka_redis_read_models_equal_the_oracle_with_a_competing_engine() {
    // A second engine projects the same projections into the same Redis at the same
    // time, as a second refold process would: checkpoint fencing must keep every
    // batch applied once.
    let dir = tempfile::tempdir().unwrap();
    let config = kafka_redis(dir.path(), &common::redis_url());
    let (r, api) = start(&config).await;
    let defs = load_projections(&config).unwrap();
    let specs = r.state.engine.specs();
    let rival = Engine::start(
        r.log.clone(),
        open_stores(&config, &defs, &specs).await.unwrap(),
        defs,
        EngineConfig {
            topic: config.topic("events"),
            partitions: PARTITIONS,
            batch: 50,
            commit_interval: config.document_commit_interval,
            fold_buffer: config.fold_buffer,
            specs,
            metrics: Default::default(),
        },
    )
    .await
    .unwrap();
    let (oracle, pos) = seeded(&api, 2, 2000).await;
    check_models(&api, &oracle, &pos, true).await.unwrap();
    // The rival has applied what it could; once both are idle the models still hold.
    rival.stop().await;
    check_models(&api, &oracle, &pos, true).await.unwrap();
    r.stop().await;
    common::redis_remove_namespace(&config.topic_prefix).await;
}

#[tokio::test]
async fn a_query_with_an_append_token_sees_that_append() {
    // I10. Small batches keep the projection behind a burst of events.
    let dir = tempfile::tempdir().unwrap();
    let (r, api) = start(&embedded(dir.path(), 5)).await;
    let events = demo_events(3, 2000);
    let mut oracle = Oracle::new();
    oracle.apply_demo(&events, PARTITIONS);
    ingest(&api, &events).await;
    let like = json!({"type": "PostLiked", "data": {"post_id": "p1", "user_id": "ryw"}});
    let token = api.append("post-p1", &like).await;
    let lag = status(&api, "post_stats").await["lag"].as_u64().unwrap();
    assert!(
        lag > 0,
        "the projection must still be behind, or this proves nothing"
    );
    // The projection is far behind on purpose (batches of 5, five projections
    // sharing two cores): give it the longest wait, so what decides is whether
    // the answer includes the append, not how fast the machine is.
    let (st, got) = api
        .get(&format!("/views/post_stats/p1?after={token}&wait_ms=60000"))
        .await;
    assert_eq!(st, 200, "{got}");
    let want = oracle.post_stats("p1").unwrap()["likes"].as_i64().unwrap() + 1;
    assert_eq!(
        got["likes"], want,
        "the view must include the like just appended"
    );

    // A position not reached in time: a clear 503 that says so.
    let (st, b) = api
        .get("/views/post_stats/p1?after=0:99999999&wait_ms=50")
        .await;
    assert_eq!(st, 503, "{b}");
    assert_eq!(b["error"]["code"], "not_caught_up");
    for bad in ["after=zz", "after=9:1", "wait_ms=-1", "colour=red"] {
        let (st, b) = api.get(&format!("/views/post_stats/p1?{bad}")).await;
        assert_eq!(st, 422, "{bad}: {b}");
    }
    let (st, _) = api.get("/views/nope/p1").await;
    assert_eq!(st, 404);
    let (st, b) = api.get("/views/post_stats/never-seen").await;
    assert_eq!((st, &b["error"]["code"]), (404, &json!("not_found")));
    r.stop().await;
}

#[tokio::test]
async fn replay_under_load_serves_only_complete_generations() {
    // I7: while generation 2 is built, queries read generation 1, complete; the
    // switch is atomic; new events arriving during the replay are not lost.
    let dir = tempfile::tempdir().unwrap();
    let (r, api) = start(&embedded(dir.path(), 100)).await;
    let (mut oracle, pos) = seeded(&api, 4, 6000).await;
    check_models(&api, &oracle, &pos, false).await.unwrap();
    let watched: Vec<(String, Value)> = oracle
        .post_ids()
        .into_iter()
        .take(20)
        .map(|p| {
            let v = oracle.post_stats(&p).unwrap();
            (p, v)
        })
        .collect();
    let watched = Arc::new(watched);
    let done = Arc::new(AtomicBool::new(false));
    let queries = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for i in 0..4 {
        let (api, watched, done, queries) =
            (api.clone(), watched.clone(), done.clone(), queries.clone());
        readers.push(tokio::spawn(async move {
            let mut n = i;
            while !done.load(Ordering::SeqCst) {
                let (post, want) = &watched[n % watched.len()];
                n += 1;
                let (st, got) = api.get(&format!("/views/post_stats/{post}")).await;
                assert_eq!(st, 200, "a query failed during the replay: {got}");
                for f in ["likes", "views", "comments", "unique_viewers"] {
                    assert_eq!(got[f], want[f], "{post}: half-built model served: {got}");
                }
                queries.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    // New posts in a new tribe arrive during the replay (the watched posts keep
    // their values).
    let fresh = common::fresh_posts(300);
    oracle.apply_demo(&fresh, PARTITIONS);
    let (st, b) = api
        .without_body("POST", "/projections/post_stats/replay")
        .await;
    assert_eq!(st, 202, "{b}");
    assert_eq!(b["replay"]["generation"], 2);
    let (st, b) = api
        .without_body("POST", "/projections/post_stats/replay")
        .await;
    assert_eq!(
        (st, &b["error"]["code"]),
        (409, &json!("replay_in_progress"))
    );
    let mut pos = pos;
    for chunk in fresh.chunks(30) {
        pos.merge(&ingest(&api, chunk).await);
    }
    let saw_replaying = Arc::new(AtomicBool::new(false));
    common::eventually(120, "the replay to switch", || {
        let (api, saw) = (api.clone(), saw_replaying.clone());
        async move {
            let s = status(&api, "post_stats").await;
            if s["state"] == "replaying" {
                saw.store(true, Ordering::SeqCst);
                let progress = s["replay"]["progress"].as_f64().unwrap();
                assert!((0.0..=1.0).contains(&progress), "{s}");
            }
            (s["generation"] == 2 && s["replay"].is_null()).then_some(())
        }
    })
    .await;
    done.store(true, Ordering::SeqCst);
    for t in readers {
        t.await.unwrap();
    }
    assert!(
        saw_replaying.load(Ordering::SeqCst),
        "the status never showed the replay"
    );
    assert!(
        queries.load(Ordering::SeqCst) > 20,
        "too few queries ran during the replay"
    );
    check_models(&api, &oracle, &pos, false).await.unwrap();
    r.stop().await;
}

#[tokio::test]
async fn a_cancelled_replay_leaves_the_live_generation() {
    let dir = tempfile::tempdir().unwrap();
    let (r, api) = start(&embedded(dir.path(), 2)).await;
    let (oracle, pos) = seeded(&api, 5, 1500).await;
    check_models(&api, &oracle, &pos, false).await.unwrap();
    let (st, _) = api
        .without_body("POST", "/projections/post_stats/replay")
        .await;
    assert_eq!(st, 202);
    let (st, b) = api
        .without_body("DELETE", "/projections/post_stats/replay")
        .await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["cancelled_generation"], 2);
    let s = status(&api, "post_stats").await;
    assert_eq!(
        (s["generation"].as_u64(), &s["replay"]),
        (Some(1), &Value::Null),
        "{s}"
    );
    let (st, _) = api
        .without_body("DELETE", "/projections/post_stats/replay")
        .await;
    assert_eq!(st, 404);
    check_models(&api, &oracle, &pos, false).await.unwrap();
    r.stop().await;
}

const SCORES: &str = r#"
name = "scores"
version = 1
store = "redis"
key = "data.k"

[[on.Scored]]
op = "incr"
field = "points"
from = "data.by"
"#;

#[tokio::test]
async fn poison_events_become_dead_letters_and_the_projection_carries_on() {
    // I8: an event the projection cannot apply is recorded with the reason; the
    // projection goes on (dead_letter) or stops there (halt).
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("projections");
    std::fs::create_dir_all(&defs).unwrap();
    std::fs::write(defs.join("scores.toml"), SCORES).unwrap();
    let halting = SCORES
        .replace("\"scores\"", "\"strict\"")
        .replace("key = \"data.k\"", "key = \"data.k\"\non_error = \"halt\"");
    std::fs::write(defs.join("strict.toml"), halting).unwrap();
    let config = config(Settings {
        data_dir: Some(dir.path().join("data")),
        projections: Some(defs),
        ..Default::default()
    });
    let (r, api) = start(&config).await;
    let mut pos = Position::default();
    for by in [json!(1), json!("lots"), json!(2)] {
        let scored = json!({"type": "Scored", "data": {"k": "a", "by": by}});
        let token = api.append("game-1", &scored).await;
        pos.merge(&token.parse().unwrap());
    }
    let (st, v) = api.get(&format!("/views/scores/a?after={pos}")).await;
    assert_eq!((st, &v["points"]), (200, &json!(3)), "{v}");
    let s = status(&api, "scores").await;
    assert_eq!(s["dead_letters"]["count"], 1, "{s}");
    let dl = &s["dead_letters"]["recent"][0];
    assert_eq!(
        (&dl["stream"], &dl["version"]),
        (&json!("game-1"), &json!(2)),
        "{s}"
    );
    assert!(
        dl["reason"]
            .as_str()
            .unwrap()
            .contains("must be an integer"),
        "{s}"
    );
    assert_eq!(s["state"], "running");

    let strict = failed(&api, "strict").await;
    assert!(
        strict["error"]
            .as_str()
            .unwrap()
            .contains("must be an integer"),
        "{strict}"
    );
    assert_eq!(strict["dead_letters"]["count"], 1, "{strict}");
    let (_, v) = api.get("/views/strict/a").await;
    assert_eq!(v["points"], 1, "nothing after the halting event is applied");
    let (st, b) = api.get("/readyz").await;
    assert_eq!(st, 503, "{b}");
    assert!(
        b["error"]["message"].as_str().unwrap().contains("strict"),
        "{b}"
    );

    // After a restart it halts at the same event again, without recording it twice.
    r.stop().await;
    drop(api);
    let (r, api) = start(&config).await;
    let strict = failed(&api, "strict").await;
    assert_eq!(strict["dead_letters"]["count"], 1, "{strict}");
    assert_eq!(status(&api, "scores").await["dead_letters"]["count"], 1);
    r.stop().await;
}

/// Spawns `refold serve` on the embedded backends in `dir`.
async fn serve_embedded(dir: &Path, extra: &[&str]) -> (Proc, Api) {
    let data = dir.join("data");
    let mut args = vec!["--data-dir", data.to_str().unwrap()];
    args.extend_from_slice(extra);
    let p = Proc::serve(&args, dir).await;
    let api = Api::Remote(reqwest::Client::new(), p.base.clone());
    (p, api)
}

/// Posts demo events to a refold started with `args`, SIGKILLs it while its
/// projections are behind, restarts it, and compares the read models with the
/// oracle: no double counting, nothing missing, wherever the kill lands (I6).
async fn sigkill_while_projecting(dir: &Path, args: &[&str], approx: bool) {
    let with_small_batches = [args, &["--projection-batch", "7"]].concat();
    let (mut p, api) = serve_embedded(dir, &with_small_batches).await;
    let (oracle, pos) = seeded(&api, 6, 3000).await;
    for name in ["post_stats", "posts"] {
        let s = status(&api, name).await;
        assert!(
            s["lag"].as_u64().unwrap() > 0 && s["events"].as_u64().unwrap() > 0,
            "kill in the middle of {name}: {s}"
        );
    }
    p.kill9();
    let (_p, api) = serve_embedded(dir, args).await;
    check_models(&api, &oracle, &pos, approx).await.unwrap();
}

#[tokio::test]
async fn sigkill_while_projecting_then_restart_matches_the_oracle() {
    let dir = tempfile::tempdir().unwrap();
    sigkill_while_projecting(dir.path(), &[], false).await;
}

#[tokio::test]
async fn sigkill_while_projecting_on_kafka_and_redis_matches_the_oracle() {
    let dir = tempfile::tempdir().unwrap();
    let (brokers, redis, es) = (
        common::kafka_brokers(),
        common::redis_url(),
        common::elasticsearch_url(),
    );
    let prefix = format!("{}.", unique("kill"));
    let args = [
        "--log",
        "kafka",
        "--kafka-brokers",
        &brokers,
        "--topic-prefix",
        &prefix,
        "--auto-migrate",
        "--redis-url",
        &redis,
        "--elasticsearch-url",
        &es,
    ];
    sigkill_while_projecting(dir.path(), &args, true).await;
    common::redis_remove_namespace(&prefix).await;
}

#[tokio::test]
async fn a_redis_that_lost_its_data_is_detected_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = PrivateRedis::start(common::free_port());
    let config = kafka_redis(dir.path(), &redis.url());
    let (r, api) = start(&config).await;
    let events = demo_events(7, 1500);
    let mut oracle = Oracle::new();
    oracle.apply_demo(&events[..1000], PARTITIONS);
    let pos = ingest(&api, &events[..1000]).await;
    check_models(&api, &oracle, &pos, true).await.unwrap();

    redis.restart();
    oracle.apply_demo(&events[1000..], PARTITIONS);
    let mut pos = pos;
    pos.merge(&ingest(&api, &events[1000..]).await);
    // Without detection the models would hold only the last 500 events.
    check_models(&api, &oracle, &pos, true).await.unwrap();
    r.stop().await;
}

#[tokio::test]
async fn a_bumped_version_rebuilds_at_start_and_the_cli_drives_replays() {
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("projections");
    std::fs::create_dir_all(&defs).unwrap();
    let repo = common::projections_dir();
    for f in [
        "post_stats.toml",
        "tribe_feed.toml",
        "posts.toml",
        "users.toml",
    ] {
        std::fs::copy(repo.join(f), defs.join(f)).unwrap();
    }
    let projections = ["--projections", defs.to_str().unwrap()];
    let (mut p, api) = serve_embedded(dir.path(), &projections).await;
    let (oracle, pos) = seeded(&api, 8, 1500).await;
    check_models(&api, &oracle, &pos, false).await.unwrap();

    // `refold status` and `refold replay` against the running service.
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_refold"))
            .args(args)
            .args(["--url", &p.base])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, out) = cli(&["status"]);
    assert!(
        ok && out.contains("post_stats") && out.contains("tribe_feed"),
        "{out}"
    );
    let (ok, out) = cli(&["replay", "tribe_feed"]);
    assert!(ok && out.contains("generation 2"), "{out}");
    assert_eq!(status(&api, "tribe_feed").await["generation"], 2);
    let (ok, out) = cli(&["replay", "no_such"]);
    assert!(!ok && out.contains("no projection named"), "{out}");
    assert_eq!(p.terminate().code(), Some(0));

    // Comments now count ten each: a new version, rebuilt at start by replay.
    let text = std::fs::read_to_string(defs.join("post_stats.toml")).unwrap();
    let text = text.replace("version = 1", "version = 2").replace(
        "op = \"incr\"\nfield = \"comments\"",
        "op = \"incr\"\nfield = \"comments\"\nby = 10",
    );
    std::fs::write(defs.join("post_stats.toml"), text).unwrap();
    let (_p, api) = serve_embedded(dir.path(), &projections).await;
    let s = common::eventually(60, "the rebuild to switch", || {
        let api = api.clone();
        async move {
            let s = status(&api, "post_stats").await;
            (s["generation"] == 2 && s["replay"].is_null()).then_some(s)
        }
    })
    .await;
    assert_eq!(s["version"], 2, "{s}");
    let post = oracle
        .post_ids()
        .into_iter()
        .find(|p| oracle.post_stats(p).unwrap()["comments"].as_i64() > Some(0))
        .unwrap();
    let (_, v) = api.get(&format!("/views/post_stats/{post}")).await;
    let want = oracle.post_stats(&post).unwrap()["comments"]
        .as_i64()
        .unwrap()
        * 10;
    assert_eq!(v["comments"], want, "{v}");
    assert_eq!(
        status(&api, "tribe_feed").await["generation"],
        2,
        "untouched projections keep their generation"
    );
}

#[tokio::test]
async fn the_demo_command_posts_a_realistic_stream() {
    let dir = tempfile::tempdir().unwrap();
    let (p, api) = serve_embedded(dir.path(), &[]).await;
    let out = Command::new(env!("CARGO_BIN_EXE_refold"))
        .args(["demo", "--events", "1200", "--seed", "9", "--url", &p.base])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    // The same seed gives the same events: the read models match the oracle.
    let events = Generator::new(DemoConfig {
        seed: 9,
        ..Default::default()
    })
    .take(1200);
    let mut oracle = Oracle::new();
    oracle.apply_demo(&events, PARTITIONS);
    let s = common::eventually(30, "the demo events to be projected", || {
        let api = api.clone();
        async move {
            let (_, all) = api.get("/projections").await;
            let idle = all["projections"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["lag"] == 0);
            let s = status(&api, "post_stats").await;
            (idle && s["events"] == 1200).then_some(s)
        }
    })
    .await;
    assert_eq!(s["dead_letters"]["count"], 0, "{s}");
    check_models(&api, &oracle, &Position::default(), false)
        .await
        .unwrap();
}

#[tokio::test]
async fn generations_left_behind_by_a_crash_are_dropped_at_start() {
    use refold::projection::fold::Effects;
    use refold::projection::store::embedded::EmbeddedKv;
    use refold::projection::store::{GenRef, Store};
    let dir = tempfile::tempdir().unwrap();
    let config = embedded(dir.path(), 1000);
    {
        // As if a crash had struck between a switch and the old generation's drop.
        let kv = EmbeddedKv::open(dir.path()).unwrap();
        let stale = GenRef {
            projection: "post_stats".into(),
            generation: 7,
        };
        let mut session = kv.session(&stale, 0).await.unwrap();
        let schema = Default::default();
        session
            .commit(None, 3, &Arc::new(Effects::default()), &schema)
            .await
            .unwrap();
        assert!(kv.generations("post_stats").await.unwrap().contains(&7));
    }
    let (r, api) = start(&config).await;
    seeded(&api, 10, 50).await;
    common::eventually(30, "the events to be projected", || {
        let api = api.clone();
        async move { (status(&api, "post_stats").await["events"] == 50).then_some(()) }
    })
    .await;
    let store = r.state.engine.get("post_stats").unwrap().store().clone();
    let left: Vec<u64> = store
        .generations("post_stats")
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(left, vec![1], "only the live generation remains");
    r.stop().await;
}
