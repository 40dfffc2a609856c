//! The ingest API on the embedded log, through the router: the contract of
//! DESIGN.md (shapes, statuses, error codes) and invariants I1-I4, I8, I9.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use common::{Resp, call, embedded_config, post_json};
use refold::config::Config;
use refold::http::app;
use refold::log::embedded::EmbeddedLog;
use refold::log::{
    Created, EventLog, LogError, LogResult, PartitionReader, ProduceRecord, TopicInfo, TopicSpec,
    partition_for,
};
use refold::server::Refold;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use uuid::Uuid;

struct Svc {
    refold: Refold,
    app: Router,
    log: Arc<dyn EventLog>,
}

async fn start_on(config: &Config, log: Arc<dyn EventLog>) -> Svc {
    let refold = Refold::start(config, log.clone()).await.unwrap();
    let app = app(refold.state.clone());
    Svc { refold, app, log }
}

async fn start(dir: &std::path::Path) -> Svc {
    let config = embedded_config(dir);
    start_on(&config, Arc::new(EmbeddedLog::open(dir).unwrap())).await
}

async fn events(log: &dyn EventLog) -> Vec<(u32, u64, refold::log::Record)> {
    common::events(log, "refold.events").await
}

async fn stream_versions(log: &dyn EventLog, stream: &str) -> Vec<u64> {
    common::stream_versions(log, "refold.events", stream).await
}

fn ev(t: &str) -> Value {
    json!({"type": t, "data": {"post_id": "42", "user_id": "7"}})
}

fn assert_error(r: &Resp, status: u16, code: &str) {
    assert_eq!(r.status.as_u16(), status, "{:?}", r.body);
    assert_eq!(r.body["error"]["code"], code, "{:?}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
}

#[tokio::test]
async fn single_events_get_gap_free_versions_and_land_in_the_log() {
    // I1, I2, I5
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    for v in 1..=3u64 {
        let r = post_json(&s.app, "/streams/post-42/events", ev("PostLiked")).await;
        assert_eq!(r.status, 201, "{:?}", r.body);
        assert_eq!(r.body["stream"], "post-42");
        assert_eq!(r.body["first_version"], v);
        assert_eq!(r.body["last_version"], v);
        assert_eq!(r.body["events"][0]["version"], v);
        assert!(Uuid::parse_str(r.body["events"][0]["id"].as_str().unwrap()).is_ok());
        let token: refold::position::Position =
            r.body["position"].as_str().unwrap().parse().unwrap();
        let (p, o) = token.entries().next().unwrap();
        assert_eq!((p, o), (partition_for("post-42", 3), v - 1));
    }
    let r = post_json(
        &s.app,
        "/streams/post-42/events",
        json!({"events": [ev("PostViewed"), ev("PostViewed")], "expected_version": 3}),
    )
    .await;
    assert_eq!(r.status, 201);
    assert_eq!(
        (
            r.body["first_version"].as_u64(),
            r.body["last_version"].as_u64()
        ),
        (Some(4), Some(5))
    );

    let all = events(&*s.log).await;
    assert_eq!(all.len(), 5);
    for (p, _, rec) in &all {
        let env: refold::event::Envelope =
            serde_json::from_slice(rec.value.as_ref().unwrap()).unwrap();
        assert_eq!(*p, partition_for("post-42", 3), "one stream, one partition");
        assert_eq!(
            rec.key,
            format!("post-42/{}", env.version),
            "unique key per event"
        );
        assert_eq!(rec.header("type"), Some(env.event_type.as_bytes()));
        assert_eq!(env.data["post_id"], "42");
        assert!(env.recorded_at.ends_with('Z'));
    }
    assert_eq!(
        stream_versions(&*s.log, "post-42").await,
        vec![1, 2, 3, 4, 5]
    );
    s.refold.stop().await;
}

#[tokio::test]
async fn wrong_expected_version_is_409_and_appends_nothing() {
    // I3, I8
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let new = json!({"events": [ev("UserRegistered")], "expected_version": 0});
    assert_eq!(
        post_json(&s.app, "/streams/user-1/events", new.clone())
            .await
            .status,
        201
    );
    let r = post_json(&s.app, "/streams/user-1/events", new).await;
    assert_error(&r, 409, "wrong_expected_version");
    assert_eq!(r.body["error"]["expected"], 0);
    assert_eq!(r.body["error"]["actual"], 1);
    let r = post_json(
        &s.app,
        "/streams/user-2/events",
        json!({"type": "A", "data": {}, "expected_version": 5}),
    )
    .await;
    assert_error(&r, 409, "wrong_expected_version");
    assert_eq!(stream_versions(&*s.log, "user-1").await, vec![1]);
    assert!(stream_versions(&*s.log, "user-2").await.is_empty());
    s.refold.stop().await;
    // A refused append leaves no trace: the final snapshot holds no head for user-2.
    let heads = common::events(&*s.log, "refold.stream-heads").await;
    assert!(
        heads.iter().any(|(_, _, r)| r.key == "user-1"),
        "the snapshot was written"
    );
    assert!(
        !heads.iter().any(|(_, _, r)| r.key == "user-2"),
        "no head for a stream never written"
    );
}

#[tokio::test]
async fn of_concurrent_appends_with_one_expected_version_exactly_one_wins() {
    // I3
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    post_json(&s.app, "/streams/tribe-9/events", ev("TribeCreated")).await;
    for round in 1..=5u64 {
        let body = json!({"events": [ev("UserJoinedTribe")], "expected_version": round});
        let answers = common::race(&s.app, "/streams/tribe-9/events", body, 16).await;
        common::assert_one_winner(&answers, round + 1);
    }
    assert_eq!(
        stream_versions(&*s.log, "tribe-9").await,
        (1..=6).collect::<Vec<_>>()
    );
    s.refold.stop().await;
}

#[tokio::test]
async fn retries_with_the_same_ids_return_the_original_result_also_after_restart() {
    // I4
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let batch = json!({"events": [
        {"type": "PostPublished", "data": {"post_id": "1"}, "id": a},
        {"type": "PostLiked", "data": {"post_id": "1"}, "id": b}
    ], "expected_version": 0});
    let first = {
        let s = start(dir.path()).await;
        let first = post_json(&s.app, "/streams/post-1/events", batch.clone()).await;
        assert_eq!(first.status, 201);
        let again = post_json(&s.app, "/streams/post-1/events", batch.clone()).await;
        assert_eq!(again.status, 200, "{:?}", again.body);
        assert_eq!(again.body["events"], first.body["events"]);
        assert_eq!(again.body["first_version"], 1);
        // A single-event retry of the second event alone is a repeat too.
        let one = post_json(
            &s.app,
            "/streams/post-1/events",
            json!({"type": "PostLiked", "data": {}, "id": b}),
        )
        .await;
        assert_eq!(
            (one.status.as_u16(), one.body["first_version"].as_u64()),
            (200, Some(2))
        );
        // Reusing a known id in any other way is a conflict, never a silent skip:
        // a known id followed by a new event, a new event followed by a known id,
        // known ids out of order, a known id in another stream.
        let liked = |id: Option<Uuid>| json!({"type": "PostLiked", "data": {}, "id": id});
        for (stream, events) in [
            ("post-1", vec![liked(Some(b)), liked(None)]),
            ("post-1", vec![liked(Some(Uuid::new_v4())), liked(Some(a))]),
            ("post-1", vec![liked(Some(b)), liked(Some(a))]),
            ("post-2", vec![liked(Some(a))]),
        ] {
            let r = post_json(
                &s.app,
                &format!("/streams/{stream}/events"),
                json!({"events": events}),
            )
            .await;
            assert_error(&r, 409, "duplicate_event_id");
        }
        // Later appends do not change what a repeat answers.
        let later = post_json(&s.app, "/streams/post-1/events", ev("PostViewed")).await;
        assert_eq!(later.status, 201);
        s.refold.stop().await;
        first
    };
    let s = start(dir.path()).await;
    let again = post_json(&s.app, "/streams/post-1/events", batch).await;
    assert_eq!(again.status, 200, "after restart: {:?}", again.body);
    assert_eq!(again.body["events"], first.body["events"]);
    assert_eq!(again.body["position"], first.body["position"]);
    assert_eq!(stream_versions(&*s.log, "post-1").await, vec![1, 2, 3]);
    assert!(stream_versions(&*s.log, "post-2").await.is_empty());
    // Versions continue where they were.
    let next = post_json(
        &s.app,
        "/streams/post-1/events",
        json!({"type": "PostViewed", "data": {}, "expected_version": 3}),
    )
    .await;
    assert_eq!(next.status, 201, "{:?}", next.body);
    assert_eq!(next.body["first_version"], 4);
    s.refold.stop().await;
}

#[tokio::test]
async fn the_idempotency_window_is_bounded_and_forgetting_never_loses_events() {
    // I4 within the window, I9 for the window itself: with room for 4 ids, a
    // retry of an event 5 appends back is no longer recognised. Sent with its
    // expected_version it is refused (409), so nothing is written twice.
    let dir = tempfile::tempdir().unwrap();
    let config = refold::config::Config {
        idempotency_window: 4,
        ..embedded_config(dir.path())
    };
    let s = start_on(&config, Arc::new(EmbeddedLog::open(dir.path()).unwrap())).await;
    let id = Uuid::new_v4();
    let first = json!({"type": "PostPublished", "data": {}, "id": id, "expected_version": 0});
    assert_eq!(
        post_json(&s.app, "/streams/post-3/events", first.clone())
            .await
            .status,
        201
    );
    assert_eq!(
        post_json(&s.app, "/streams/post-3/events", first.clone())
            .await
            .status,
        200
    );
    for _ in 0..4 {
        assert_eq!(
            post_json(&s.app, "/streams/post-4/events", ev("PostLiked"))
                .await
                .status,
            201
        );
    }
    let r = post_json(&s.app, "/streams/post-3/events", first).await;
    assert_error(&r, 409, "wrong_expected_version");
    assert_eq!(stream_versions(&*s.log, "post-3").await, vec![1]);
    s.refold.stop().await;
}

#[tokio::test]
async fn bad_requests_get_json_errors_and_append_nothing() {
    // I8
    let dir = tempfile::tempdir().unwrap();
    let config = refold::config::Config {
        body_limit: 4096,
        ..embedded_config(dir.path())
    };
    let s = start_on(&config, Arc::new(EmbeddedLog::open(dir.path()).unwrap())).await;
    let app = &s.app;
    assert_error(
        &call(
            app,
            "POST",
            "/streams/post-1/events",
            "application/json",
            "{\"type\": ",
        )
        .await,
        400,
        "malformed_json",
    );
    let cases = [
        ("/streams/post-1/events", json!({"data": {}}), "type"),
        (
            "/streams/post-1/events",
            json!({"type": "1bad", "data": {}}),
            "type",
        ),
        (
            "/streams/post-1/events",
            json!({"type": "A", "data": [1]}),
            "data",
        ),
        (
            "/streams/post-1/events",
            json!({"type": "A", "data": {}, "id": "x"}),
            "id",
        ),
        (
            "/streams/post-1/events",
            json!({"events": [ev("A"), {"type": "B"}]}),
            "events[1].data",
        ),
        (
            "/streams/post-1/events",
            json!({"events": [ev("A")], "expected_version": "3"}),
            "expected_version",
        ),
        ("/streams/-bad/events", ev("A"), "stream"),
    ];
    for (uri, body, field) in cases {
        let r = post_json(app, uri, body.clone()).await;
        assert_error(&r, 422, "validation_failed");
        assert_eq!(r.body["error"]["field"], field, "{body}");
    }
    let big = json!({"type": "A", "data": {"x": "y".repeat(5000)}});
    let r = post_json(app, "/streams/post-1/events", big).await;
    assert_error(&r, 413, "payload_too_large");
    // A path that is not UTF-8 gets the JSON shape too, not axum's plain text.
    let r = call(app, "POST", "/streams/%FF/events", "application/json", "{}").await;
    assert_error(&r, 422, "validation_failed");
    assert_eq!(r.body["error"]["field"], "stream");
    assert_error(
        &call(app, "GET", "/nope", "application/json", "").await,
        404,
        "not_found",
    );
    assert_error(
        &call(app, "PUT", "/streams/post-1/events", "application/json", "").await,
        405,
        "method_not_allowed",
    );
    assert!(
        events(&*s.log).await.is_empty(),
        "nothing appended for bad input"
    );
    s.refold.stop().await;
}

#[tokio::test]
async fn bulk_appends_answer_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let ndjson = [
        json!({"stream": "user-1", "type": "UserRegistered", "data": {"user_id": "1", "name": "Ann"}}).to_string(),
        "{not json".to_string(),
        json!({"stream": "post-5", "type": "PostLiked", "data": {}}).to_string(),
        json!({"stream": "user-1", "type": "UserRegistered", "data": {}, "expected_version": 0}).to_string(),
        json!({"type": "NoStream", "data": {}}).to_string(),
        String::new(),
        json!({"stream": "user-1", "type": "Renamed", "data": {}}).to_string(),
    ]
    .join("\n");
    let r = call(&s.app, "POST", "/events", "application/x-ndjson", ndjson).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["errors"], true);
    let items = r.body["items"].as_array().unwrap();
    let statuses: Vec<u64> = items
        .iter()
        .map(|i| i["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, vec![201, 400, 201, 409, 422, 201]);
    assert_eq!(items[1]["error"]["code"], "malformed_json");
    assert!(
        items[1]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("line 2")
    );
    assert_eq!(items[3]["error"]["actual"], 1);
    assert_eq!(items[4]["error"]["field"], "stream");
    assert_eq!(
        (items[5]["stream"].as_str(), items[5]["version"].as_u64()),
        (Some("user-1"), Some(2))
    );
    let token: refold::position::Position = r.body["position"].as_str().unwrap().parse().unwrap();
    assert!(
        token
            .entries()
            .any(|(p, _)| p == partition_for("post-5", 3))
    );

    let arr = json!([
        {"stream": "tribe-1", "type": "TribeCreated", "data": {"tribe_id": "1"}},
        {"stream": "tribe-1", "type": "UserJoinedTribe", "data": {}, "expected_version": 1}
    ]);
    let r = post_json(&s.app, "/events", arr).await;
    assert_eq!(r.body["errors"], false, "{:?}", r.body);
    assert_eq!(r.body["items"][1]["version"], 2);
    assert_error(
        &post_json(&s.app, "/events", json!([])).await,
        422,
        "validation_failed",
    );
    assert_error(
        &call(&s.app, "POST", "/events", "application/json", "[1,").await,
        400,
        "malformed_json",
    );
    assert_eq!(stream_versions(&*s.log, "user-1").await, vec![1, 2]);
    s.refold.stop().await;
}

/// The embedded log with a gate: appends wait until the test opens it. And a
/// switch: while `down`, appends to the events topic fail and end offsets never
/// come (a broker that does not answer).
struct Gated {
    inner: EmbeddedLog,
    gate: Arc<Semaphore>,
    /// Durable writes to the events topic so far.
    writes: std::sync::atomic::AtomicUsize,
    down: tokio::sync::watch::Sender<bool>,
}

impl Gated {
    fn new(dir: &std::path::Path) -> (Arc<Gated>, Arc<Semaphore>) {
        let gate = Arc::new(Semaphore::new(0));
        let log = Gated {
            inner: EmbeddedLog::open(dir).unwrap(),
            gate: gate.clone(),
            writes: Default::default(),
            down: tokio::sync::watch::channel(false).0,
        };
        (Arc::new(log), gate)
    }
}

/// Whether a write goes to the events topic (not the stream heads' snapshots).
fn to_events_topic(records: &[ProduceRecord]) -> bool {
    records
        .first()
        .is_some_and(|r| r.topic.ends_with(".events"))
}

#[async_trait]
impl EventLog for Gated {
    fn backend(&self) -> &'static str {
        "gated"
    }
    async fn create_topic(&self, spec: &TopicSpec) -> LogResult<Created> {
        self.inner.create_topic(spec).await
    }
    async fn describe_topic(&self, name: &str) -> LogResult<Option<TopicInfo>> {
        self.inner.describe_topic(name).await
    }
    async fn append(&self, records: Vec<ProduceRecord>) -> LogResult<Vec<u64>> {
        if to_events_topic(&records) {
            if *self.down.borrow() {
                return Err(LogError::Unavailable("injected outage".into()));
            }
            let _permit = self
                .gate
                .acquire()
                .await
                .map_err(|e| LogError::Other(e.to_string()))?;
            self.writes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.inner.append(records).await
    }
    async fn end_offsets(&self, topic: &str) -> LogResult<Vec<u64>> {
        let _ = self.down.subscribe().wait_for(|down| !down).await;
        self.inner.end_offsets(topic).await
    }
    async fn reader(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
    ) -> LogResult<Box<dyn PartitionReader>> {
        self.inner.reader(topic, partition, from).await
    }
    async fn flush(&self) -> LogResult<()> {
        Ok(())
    }
}

/// The embedded log as a log that keeps writes in flight: a `send` to the
/// events topic lands at once, but its delivery resolves only when the test
/// says so, with success or failure.
struct InFlight {
    inner: EmbeddedLog,
    /// One per delivery waiting, oldest first: send `true` to confirm it.
    verdicts: std::sync::Mutex<std::collections::VecDeque<tokio::sync::oneshot::Sender<bool>>>,
    sent: tokio::sync::watch::Sender<usize>,
}

impl InFlight {
    /// refold on this log over the embedded one in `dir`.
    async fn start(dir: &std::path::Path) -> (Arc<InFlight>, Svc) {
        let log = Arc::new(InFlight {
            inner: EmbeddedLog::open(dir).unwrap(),
            verdicts: Default::default(),
            sent: tokio::sync::watch::channel(0).0,
        });
        let svc = start_on(&embedded_config(dir), log.clone()).await;
        (log, svc)
    }

    /// Resolves the oldest waiting delivery: confirmed, or failed.
    fn verdict(&self, ok: bool) {
        let next = self.verdicts.lock().unwrap().pop_front();
        next.expect("a delivery waiting").send(ok).unwrap();
    }
}

/// Posts `body` to `uri` in a task of its own: the answer, once it comes.
fn spawn_post(app: &Router, uri: &'static str, body: Value) -> tokio::task::JoinHandle<Resp> {
    let app = app.clone();
    tokio::spawn(async move { post_json(&app, uri, body).await })
}

#[async_trait]
impl EventLog for InFlight {
    fn backend(&self) -> &'static str {
        "in-flight"
    }
    async fn create_topic(&self, spec: &TopicSpec) -> LogResult<Created> {
        self.inner.create_topic(spec).await
    }
    async fn describe_topic(&self, name: &str) -> LogResult<Option<TopicInfo>> {
        self.inner.describe_topic(name).await
    }
    async fn append(&self, records: Vec<ProduceRecord>) -> LogResult<Vec<u64>> {
        self.inner.append(records).await
    }
    async fn send(&self, records: Vec<ProduceRecord>) -> LogResult<refold::log::Delivery> {
        let events = to_events_topic(&records);
        let landed = self.inner.append(records).await;
        if !events {
            return Ok(Box::pin(std::future::ready(landed)));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.verdicts.lock().unwrap().push_back(tx);
        self.sent.send_modify(|n| *n += 1);
        Ok(Box::pin(async move {
            match rx.await {
                Ok(true) => landed,
                _ => Err(LogError::Unavailable("delivery failed (injected)".into())),
            }
        }))
    }
    async fn end_offsets(&self, topic: &str) -> LogResult<Vec<u64>> {
        self.inner.end_offsets(topic).await
    }
    async fn reader(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
    ) -> LogResult<Box<dyn PartitionReader>> {
        self.inner.reader(topic, partition, from).await
    }
    async fn flush(&self) -> LogResult<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_next_batch_is_sent_while_one_is_in_flight_and_fails_with_it() {
    // I1, I2, I4 with two batches in flight: the second is planned on top of
    // the first and handed to the log before the first is confirmed. When the
    // first fails, neither is acknowledged (their records landed here: "may or
    // may not be in the log"), the writer re-reads the log, and the stream's
    // versions continue without a gap; retries are idempotent.
    let dir = tempfile::tempdir().unwrap();
    let (log, s) = InFlight::start(dir.path()).await;
    let post = |body: Value| spawn_post(&s.app, "/streams/post-7/events", body);
    let mut sent = log.sent.subscribe();
    let (id_a, id_b) = (Uuid::new_v4(), Uuid::new_v4());
    let a = post(json!({"id": id_a, "type": "PostLiked", "data": {"n": 1}}));
    sent.wait_for(|n| *n == 1).await.unwrap();
    // Planned on top of the first (version 2, expected 1) and sent while the
    // first is still unconfirmed.
    let b = post(
        json!({"expected_version": 1, "events": [{"id": id_b, "type": "PostLiked", "data": {"n": 2}}]}),
    );
    tokio::time::timeout(Duration::from_secs(10), sent.wait_for(|n| *n == 2))
        .await
        .expect("the second batch goes to the log before the first is confirmed")
        .unwrap();
    log.verdict(false);
    log.verdict(true);
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert_eq!(a.status, 503, "{:?}", a.body);
    assert_eq!(b.status, 503, "planned on a failed batch: {:?}", b.body);
    assert_eq!(b.body["error"]["code"], "log_unavailable");
    // Deliveries are confirmed from now on.
    let confirm = tokio::spawn({
        let log = log.clone();
        async move {
            let mut sent = log.sent.subscribe();
            loop {
                if sent.changed().await.is_err() {
                    return;
                }
                while let Some(v) = log.verdicts.lock().unwrap().pop_front() {
                    let _ = v.send(true);
                }
            }
        }
    });
    // After the re-read, both landed events count: the retries are repeats.
    let r = common::eventually(30, "the writer to re-read the log", || async {
        let r = post(json!({"id": id_a, "type": "PostLiked", "data": {"n": 1}}))
            .await
            .unwrap();
        (r.status != 503).then_some(r)
    })
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["first_version"], 1);
    let r = post(json!({"expected_version": 1, "events": [{"id": id_b, "type": "PostLiked", "data": {"n": 2}}]}))
        .await
        .unwrap();
    assert_eq!(
        (r.status.as_u16(), &r.body["first_version"]),
        (200, &json!(2)),
        "{:?}",
        r.body
    );
    let r = post(json!({"type": "PostLiked", "data": {"n": 3}}))
        .await
        .unwrap();
    assert_eq!(r.body["first_version"], 3, "{:?}", r.body);
    assert_eq!(stream_versions(&*s.log, "post-7").await, vec![1, 2, 3]);
    confirm.abort();
    s.refold.stop().await;
}

#[tokio::test]
async fn a_retry_of_an_append_in_flight_is_a_repeat_and_refusals_on_a_failed_batch_are_503() {
    // I4 across the two batches in flight: the retry is planned while the
    // original is unconfirmed and answers with the original's versions and
    // position once it is. And a refusal decided against a batch that then
    // failed (its heads may never exist) is not given: 503, retry.
    let dir = tempfile::tempdir().unwrap();
    let (log, s) = InFlight::start(dir.path()).await;
    let post = |body: Value| spawn_post(&s.app, "/streams/post-8/events", body);
    // The writer holds `n` requests (each holds `body_limit` of the budget, as
    // these carry no Content-Length, until it is answered) and none waits in its
    // queue: the last one is planned. A batch of repeats or refusals sends no
    // records, so `sent` cannot tell.
    let writer = s.refold.state.writer.clone();
    let each = s.refold.state.body_limit as u64;
    let holding = |n: u64| {
        let writer = writer.clone();
        async move {
            common::eventually(10, "the writer to take the request", || async {
                let (bytes, _, waiting) = writer.queue();
                (bytes == n * each && waiting == 0).then_some(())
            })
            .await
        }
    };
    let mut sent = log.sent.subscribe();
    let id = Uuid::new_v4();
    let event = json!({"id": id, "type": "PostLiked", "data": {"n": 1}});
    let original = post(event.clone());
    sent.wait_for(|n| *n == 1).await.unwrap();
    let retry = post(event.clone());
    holding(2).await;
    log.verdict(true);
    let (original, retry) = (original.await.unwrap(), retry.await.unwrap());
    assert_eq!(original.status, 201, "{:?}", original.body);
    assert_eq!(retry.status, 200, "a repeat: {:?}", retry.body);
    assert_eq!(
        retry.body, original.body,
        "the original result, position included"
    );

    // Version 2 in flight; an append expecting 1 is refused against it, then
    // the batch it was decided against fails.
    let second = post(json!({"type": "PostLiked", "data": {"n": 2}}));
    sent.wait_for(|n| *n == 2).await.unwrap();
    let stale =
        post(json!({"expected_version": 1, "events": [{"type": "PostLiked", "data": {"n": 3}}]}));
    holding(2).await;
    log.verdict(false);
    let (second, stale) = (second.await.unwrap(), stale.await.unwrap());
    assert_eq!(second.status, 503, "{:?}", second.body);
    assert_eq!(
        stale.status, 503,
        "not a 409 against a head that may never be: {:?}",
        stale.body
    );
    s.refold.stop().await;
}

#[tokio::test]
async fn appends_during_an_outage_get_503_while_the_log_does_not_answer() {
    // I1 and I9: found by the fault harness. After a failed write the writer
    // re-reads the log's tail before it writes again; when the log does not
    // answer at all, the appends waiting for that must still get a 503 (not hang
    // until the outage ends), and writing resumes once it does.
    let dir = tempfile::tempdir().unwrap();
    let (log, gate) = Gated::new(dir.path());
    gate.add_permits(Semaphore::MAX_PERMITS / 2);
    let s = start_on(&embedded_config(dir.path()), log.clone()).await;
    let post = |n: u64| {
        let app = s.app.clone();
        async move {
            let body = json!({"type": "PostLiked", "data": {"n": n}});
            post_json(&app, "/streams/post-1/events", body).await
        }
    };
    assert_eq!(post(1).await.status, 201);
    log.down.send_replace(true);
    assert_eq!(post(2).await.status, 503, "the failed write");
    // The log does not answer until the outage ends; the answer comes anyway.
    let r = tokio::time::timeout(Duration::from_secs(60), post(3))
        .await
        .expect("an append during the outage must be answered, not held");
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert_eq!(r.body["error"]["code"], "log_unavailable");
    assert!(r.headers.contains_key("retry-after"));
    log.down.send_replace(false);
    let r = common::eventually(60, "writes to resume", || async {
        let r = post(4).await;
        (r.status == 201).then_some(r)
    })
    .await;
    assert_eq!(
        r.body["first_version"], 2,
        "versions continue without a gap"
    );
    assert_eq!(stream_versions(&*s.log, "post-1").await, vec![1, 2]);
    s.refold.stop().await;
}

#[tokio::test]
async fn a_saturated_write_path_answers_429_with_retry_after_and_loses_nothing() {
    // I9, I1
    let dir = tempfile::tempdir().unwrap();
    let (log, gate) = Gated::new(dir.path());
    // 2 KiB bodies, 4 KiB budget: a handful of requests fill it.
    let config = refold::config::Config {
        body_limit: 2048,
        ingest_buffer: 4096,
        ..embedded_config(dir.path())
    };
    let s = start_on(&config, log).await;
    let body = json!({"type": "PostLiked", "data": {"pad": "x".repeat(900)}}).to_string();
    let mut waiting = Vec::new();
    let mut refused = None;
    for i in 0..20 {
        let app = s.app.clone();
        let body = body.clone();
        let t = tokio::spawn(async move {
            call(
                &app,
                "POST",
                &format!("/streams/post-{i}/events"),
                "application/json",
                body,
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        if t.is_finished() {
            refused = Some(t.await.unwrap());
            break;
        }
        waiting.push(t);
    }
    let refused = refused.expect("a full write path must refuse at once");
    assert_error(&refused, 429, "overloaded");
    assert_eq!(refused.headers["retry-after"], "1");
    assert!(
        !waiting.is_empty() && waiting.len() <= 4,
        "{} requests admitted into 4 KiB",
        waiting.len()
    );
    assert!(
        events(&*s.log).await.is_empty(),
        "nothing is durable while the log is stuck"
    );
    gate.add_permits(1000);
    let admitted = waiting.len();
    for t in waiting {
        assert_eq!(t.await.unwrap().status, 201);
    }
    // Room is released: the next request goes through.
    assert_eq!(
        call(
            &s.app,
            "POST",
            "/streams/post-x/events",
            "application/json",
            body
        )
        .await
        .status,
        201
    );
    s.refold.stop().await;
    drop((s.app, s.log));
    let log = EmbeddedLog::open(dir.path()).unwrap();
    assert_eq!(
        events(&log).await.len(),
        admitted + 1,
        "every 201 is in the log, and nothing else"
    );
}

#[tokio::test]
async fn concurrent_requests_share_one_durable_write() {
    // Group commit: while one write is in progress, the requests that arrive
    // queue up and all go out together in the next single write.
    let dir = tempfile::tempdir().unwrap();
    let (log, gate) = Gated::new(dir.path());
    let s = start_on(&embedded_config(dir.path()), log.clone()).await;
    let spawn = |i: usize| {
        let app = s.app.clone();
        tokio::spawn(async move {
            post_json(&app, &format!("/streams/post-{i}/events"), ev("PostLiked"))
                .await
                .status
        })
    };
    let first = spawn(0);
    tokio::time::sleep(Duration::from_millis(100)).await; // the writer now waits at the gate
    let rest: Vec<_> = (1..=40).map(spawn).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    gate.add_permits(1000);
    assert_eq!(first.await.unwrap(), 201);
    for t in rest {
        assert_eq!(t.await.unwrap(), 201);
    }
    let writes = log.writes.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        writes, 2,
        "41 requests took {writes} durable writes; expected the first alone, then one for the other 40"
    );
    assert_eq!(events(&*s.log).await.len(), 41);
    s.refold.stop().await;
}

#[tokio::test]
async fn an_event_too_big_for_the_log_is_413_and_spoils_nothing() {
    // I8: refused alone, before it can touch the head or the batch it shares.
    let dir = tempfile::tempdir().unwrap();
    let config = refold::config::Config {
        body_limit: 4 << 20,
        ingest_buffer: 16 << 20,
        ..embedded_config(dir.path())
    };
    let s = start_on(&config, Arc::new(EmbeddedLog::open(dir.path()).unwrap())).await;
    let big = |n: usize| json!({"type": "PostPublished", "data": {"body": "x".repeat(n)}});
    let r = post_json(
        &s.app,
        "/streams/post-1/events",
        json!({"events": [ev("A"), big(1_100_000)]}),
    )
    .await;
    assert_error(&r, 413, "payload_too_large");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("event 1")
    );
    let r = post_json(&s.app, "/streams/post-1/events", big(900_000)).await;
    assert_eq!(
        (r.status.as_u16(), r.body["first_version"].as_u64()),
        (201, Some(1))
    );
    assert_eq!(stream_versions(&*s.log, "post-1").await, vec![1]);
    s.refold.stop().await;
}
