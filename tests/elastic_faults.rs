//! The Elasticsearch adapter under injected faults: a proxy in front of the test
//! Elasticsearch (`TEST_ELASTICSEARCH_URL`) rejects `_bulk` requests, reports
//! applied items as failed, or drops items and reports them failed. The adapter is
//! driven as the engine drives it (session, read_fields, fold, commit; on a
//! conflict, read and fold the batch again), and the documents must end up as the
//! log folded exactly once, the checkpoint moved once per batch.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::elasticsearch_url as es_url;
use common::es_proxy::{BulkFault, EsProxy, es_remove_namespace};
use refold::event::Envelope;
use refold::projection::def::{Definition, parse};
use refold::projection::fold::{DocReads, Input, fold, keys_to_read};
use refold::projection::store::doc::{Specs, applied_offset, apply_delta, render, user_fields};
use refold::projection::store::elastic::ElasticStore;
use refold::projection::store::{Commit, GenRef, Store, StoreError};
use serde_json::{Map, Value, json};

const DEF: &str = r#"
name = "posts"
version = 1
store = "elasticsearch"
key = "data.k"

[[on.Liked]]
op = "incr"
field = "likes"

[[on.Tagged]]
op = "add"
field = "tags"
from = "data.t"

[[on.Titled]]
op = "set"
field = "title"
from = "data.title"
"#;

fn definition() -> Definition {
    parse(Path::new("posts.toml"), DEF).unwrap_or_else(|e| panic!("{e}"))
}

fn gen_ref() -> GenRef {
    GenRef {
        projection: "posts".into(),
        generation: 1,
    }
}

fn ev(partition: u32, offset: u64, t: &str, data: Value) -> Input {
    Input {
        partition,
        offset,
        event: Ok(Envelope {
            id: uuid::Uuid::new_v4(),
            stream: format!("s-{offset}"),
            version: offset + 1,
            event_type: t.into(),
            data: data.as_object().unwrap().clone(),
            metadata: Default::default(),
            recorded_at: "2026-11-24T00:00:00Z".into(),
        }),
    }
}

/// Offsets `from..from+n` of partition 0: likes on five keys, tags and titles.
fn batch(from: u64, n: u64) -> Vec<Input> {
    (from..from + n)
        .map(|o| match o % 7 {
            5 => ev(
                0,
                o,
                "Tagged",
                json!({"k": format!("k{}", o % 5), "t": format!("t{}", o % 3)}),
            ),
            6 => ev(
                0,
                o,
                "Titled",
                json!({"k": format!("k{}", o % 5), "title": format!("post {o}")}),
            ),
            _ => ev(0, o, "Liked", json!({"k": format!("k{}", o % 5)})),
        })
        .collect()
}

/// The read model folded exactly once, in memory, with the same `apply_delta`.
#[derive(Default)]
struct Oracle {
    docs: HashMap<String, Map<String, Value>>,
}

impl Oracle {
    fn apply(&mut self, def: &Definition, inputs: &[Input], partition: u32, next: u64) {
        let mut reads = DocReads::new();
        for key in keys_to_read(def, inputs, true) {
            if let Some(doc) = self.docs.get(&key) {
                reads
                    .fields
                    .insert(key.clone(), user_fields(doc.clone()).into_iter().collect());
                if let Some(a) = applied_offset(doc, partition) {
                    reads.applied.insert(key.clone(), a);
                }
            }
        }
        let fx = fold(def, inputs, &reads);
        for (key, delta) in &fx.docs {
            match apply_delta(key, self.docs.remove(key), delta, partition, next).unwrap() {
                Some(doc) => self.docs.insert(key.clone(), doc),
                None => None,
            };
        }
    }
}

/// One batch as the engine commits it: read, fold, commit; on a conflict a new
/// session reads and folds again. Returns how many conflicts it went through.
async fn commit_batch(
    store: &ElasticStore,
    def: &Definition,
    inputs: &[Input],
    partition: u32,
    next: u64,
) -> Result<u32, StoreError> {
    let g = gen_ref();
    let mut conflicts = 0;
    loop {
        let mut session = store.session(&g, partition).await?;
        let expected = session.checkpoint().await?;
        let keys = keys_to_read(def, inputs, true);
        let reads = session.read_fields(&keys, &def.doc_reads).await?;
        let fx = fold(def, inputs, &reads);
        match session
            .commit(expected, next, &Arc::new(fx), &def.schema)
            .await?
        {
            Commit::Applied => return Ok(conflicts),
            Commit::Conflict => {
                conflicts += 1;
                assert!(conflicts < 20, "conflicts without end");
            }
            Commit::Fenced { found } => panic!("fenced: expected {expected:?}, found {found:?}"),
        }
    }
}

struct Setup {
    ns: String,
    proxy: EsProxy,
    /// Through the proxy.
    store: ElasticStore,
    /// Straight to Elasticsearch, to check what is stored.
    direct: ElasticStore,
    def: Definition,
}

async fn setup(tag: &str) -> Setup {
    let ns = format!("{}.", common::unique(tag));
    let proxy = EsProxy::start(&es_url()).await;
    let store = ElasticStore::connect(&proxy.url, &ns, Specs::new())
        .await
        .unwrap();
    let direct = ElasticStore::connect(&es_url(), &ns, Specs::new())
        .await
        .unwrap();
    Setup {
        ns,
        proxy,
        store,
        direct,
        def: definition(),
    }
}

impl Setup {
    /// Every document equals the oracle's, and nothing else is stored.
    async fn check(&self, oracle: &Oracle) {
        let g = gen_ref();
        for k in 0..5 {
            let key = format!("k{k}");
            let got = self.direct.view(&g, &self.def.schema, &key).await.unwrap();
            let want = oracle
                .docs
                .get(&key)
                .map(|d| render(&self.def.schema, d.clone()));
            assert_eq!(got, want, "document `{key}`");
        }
    }

    async fn checkpoint(&self) -> Option<u64> {
        self.direct.checkpoints(&gen_ref(), 1).await.unwrap()[0]
    }

    async fn cleanup(self) {
        es_remove_namespace(&self.ns).await;
    }
}

/// Runs batches of 20 events from offset 0; returns the conflicts and the oracle.
async fn run(s: &Setup, batches: u64) -> (u32, Oracle) {
    let mut oracle = Oracle::default();
    let mut conflicts = 0;
    for b in 0..batches {
        let inputs = batch(b * 20, 20);
        let next = (b + 1) * 20;
        conflicts += commit_batch(&s.store, &s.def, &inputs, 0, next)
            .await
            .unwrap();
        oracle.apply(&s.def, &inputs, 0, next);
        assert_eq!(s.checkpoint().await, Some(next));
    }
    (conflicts, oracle)
}

/// Likes over every document: one per liking event, if nothing was doubled.
fn total_likes(oracle: &Oracle) -> i64 {
    oracle
        .docs
        .values()
        .map(|d| d["likes"].as_i64().unwrap())
        .sum()
}

#[tokio::test]
async fn rejected_bulk_requests_are_sent_again() {
    let s = setup("esf-reject").await;
    s.proxy.only_paths_containing("-g1/_bulk");
    s.proxy.push(BulkFault::Reject(503));
    s.proxy.push(BulkFault::Reject(429));
    s.proxy.push(BulkFault::Reject(503));
    let (conflicts, oracle) = run(&s, 3).await;
    assert_eq!(s.proxy.injected(), 3);
    assert_eq!(s.proxy.queued(), 0);
    assert_eq!(conflicts, 0, "nothing was applied by a rejected request");
    s.check(&oracle).await;
    // Counters are not doubled: 60 events, 5 keys, likes on 5 of every 7 offsets.
    let likes = total_likes(&oracle);
    assert_eq!(likes, (0..60).filter(|o| o % 7 < 5).count() as i64);
    s.cleanup().await;
}

#[tokio::test]
async fn items_reported_failed_after_being_applied_are_not_applied_twice() {
    let s = setup("esf-after").await;
    s.proxy.only_paths_containing("-g1/_bulk");
    s.proxy.only_bulks_of_at_least(5);
    // First batch: creates reported failed; later batches: conditional updates.
    s.proxy.push(BulkFault::FailAfter {
        items: vec![0, 2],
        status: 429,
    });
    s.proxy.push(BulkFault::FailAfter {
        items: vec![1, 3, 4],
        status: 503,
    });
    s.proxy.push(BulkFault::FailAfter {
        items: vec![0],
        status: 429,
    });
    let (conflicts, oracle) = run(&s, 4).await;
    assert_eq!(s.proxy.queued(), 0);
    assert_eq!(s.proxy.injected(), 6);
    // Retrying an applied item is refused (its version moved): a conflict, then a
    // new fold that skips what the documents already hold.
    assert_eq!(conflicts, 3);
    s.check(&oracle).await;
    let likes = total_likes(&oracle);
    assert_eq!(likes, (0..80).filter(|o| o % 7 < 5).count() as i64);
    s.cleanup().await;
}

#[tokio::test]
async fn items_dropped_before_forwarding_are_written_by_the_retry() {
    let s = setup("esf-drop").await;
    s.proxy.only_paths_containing("-g1/_bulk");
    s.proxy.only_bulks_of_at_least(5);
    s.proxy.push(BulkFault::DropBefore {
        items: vec![0, 1],
        status: 429,
    });
    s.proxy.push(BulkFault::DropBefore {
        items: vec![0],
        status: 503,
    });
    s.proxy.push(BulkFault::DropBefore {
        items: vec![2, 4],
        status: 429,
    });
    let (conflicts, oracle) = run(&s, 3).await;
    assert_eq!(s.proxy.queued(), 0);
    assert_eq!(s.proxy.injected(), 5);
    assert_eq!(conflicts, 0, "only the dropped items were sent again");
    s.check(&oracle).await;
    s.cleanup().await;
}

#[tokio::test]
async fn dead_letters_survive_faults_and_are_recorded_once() {
    let s = setup("esf-dead").await;
    s.proxy.only_paths_containing("-state/_bulk");
    s.proxy.push(BulkFault::Reject(503));
    s.proxy.push(BulkFault::FailAfter {
        items: vec![0, 1],
        status: 429,
    });
    // Offsets 0..10; 3 and 7 have no key (dead letters).
    let inputs: Vec<Input> = (0..10)
        .map(|o| {
            if o == 3 || o == 7 {
                ev(0, o, "Liked", json!({"nokey": true}))
            } else {
                ev(0, o, "Liked", json!({"k": "k1"}))
            }
        })
        .collect();
    commit_batch(&s.store, &s.def, &inputs, 0, 10)
        .await
        .unwrap();
    assert_eq!(s.proxy.injected(), 3);
    let (count, newest) = s.direct.dead_letters(&gen_ref(), 10).await.unwrap();
    assert_eq!(count, 2);
    let offsets: Vec<u64> = newest.iter().map(|d| d.offset).collect();
    assert_eq!(offsets, vec![7, 3], "newest first");
    assert_eq!(s.checkpoint().await, Some(10));
    let mut oracle = Oracle::default();
    oracle.apply(&s.def, &inputs, 0, 10);
    s.check(&oracle).await;
    s.cleanup().await;
}

/// A failing data bulk (whole requests, or every item) ends in Unavailable after
/// the bounded retries, and the checkpoint stays where it was (I6).
#[tokio::test]
async fn the_checkpoint_is_not_written_when_the_data_keeps_failing() {
    for fault in [
        BulkFault::Reject(503),
        BulkFault::DropBefore {
            items: vec![usize::MAX],
            status: 429,
        },
    ] {
        let s = setup("esf-down").await;
        let store = s.store.clone().with_retry_budget(Duration::from_secs(2));
        s.proxy.only_paths_containing("-g1/_bulk");
        let (_, oracle) = run(&s, 1).await;
        assert_eq!(s.checkpoint().await, Some(20));

        s.proxy.always(Some(fault.clone()));
        let started = Instant::now();
        let err = commit_batch(&store, &s.def, &batch(20, 20), 0, 40)
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert!(
            matches!(err, StoreError::Unavailable(_)),
            "{fault:?}: {err}"
        );
        assert!(
            took < Duration::from_secs(10),
            "{fault:?}: gave up after {took:?}"
        );
        assert!(
            s.proxy.injected() >= 2,
            "{fault:?}: retried {}",
            s.proxy.injected()
        );
        assert_eq!(s.checkpoint().await, Some(20), "{fault:?}");
        s.check(&oracle).await;

        // Once the store recovers, the same batch commits, once.
        s.proxy.always(None);
        commit_batch(&store, &s.def, &batch(20, 20), 0, 40)
            .await
            .unwrap();
        let mut oracle = oracle;
        oracle.apply(&s.def, &batch(20, 20), 0, 40);
        s.check(&oracle).await;
        assert_eq!(s.checkpoint().await, Some(40));
        s.cleanup().await;
    }
}

#[tokio::test]
async fn connect_fails_fast_when_the_server_is_unreachable() {
    // A port nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let started = Instant::now();
    let err = ElasticStore::connect(&url, "x.", BTreeMap::new())
        .await
        .err()
        .expect("connect must fail");
    assert!(started.elapsed() < Duration::from_secs(6));
    let msg = format!("{err:#}");
    assert!(msg.contains("cannot reach Elasticsearch"), "{msg}");
    assert!(msg.contains(&url), "{msg}");
}

// ---- adapter-specific behaviour (not faults) ------------------------------------

async fn es_get(path: &str) -> (u16, Value) {
    let r = reqwest::get(format!("{}/{path}", es_url())).await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn live(generation: u64) -> refold::projection::store::Meta {
    refold::projection::store::Meta {
        live: Some(refold::projection::store::GenInfo {
            generation,
            version: 1,
            source: DEF.into(),
        }),
        building: None,
    }
}

/// The alias `{ns}{projection}` names the live generation's index only (I7).
#[tokio::test]
async fn put_meta_points_the_alias_at_the_live_generation() {
    let s = setup("esf-alias").await;
    let holders = |body: Value| -> Vec<String> {
        let mut v: Vec<String> = body.as_object().unwrap().keys().cloned().collect();
        v.sort();
        v
    };
    let alias = format!("{}posts", s.ns);
    s.direct.put_meta("posts", &live(1)).await.unwrap();
    let (_, body) = es_get(&format!("_alias/{alias}")).await;
    assert_eq!(holders(body), vec![format!("{}posts-g1", s.ns)]);

    s.direct.put_meta("posts", &live(2)).await.unwrap();
    s.direct.put_meta("posts", &live(2)).await.unwrap(); // idempotent
    let (_, body) = es_get(&format!("_alias/{alias}")).await;
    assert_eq!(holders(body), vec![format!("{}posts-g2", s.ns)]);
    assert_eq!(s.direct.meta("posts").await.unwrap(), live(2));

    s.direct
        .put_meta("posts", &refold::projection::store::Meta::default())
        .await
        .unwrap();
    let (status, _) = es_get(&format!("_alias/{alias}")).await;
    assert_eq!(status, 404);
    s.cleanup().await;
}

/// Dead letters beyond the newest ones kept are deleted; the count covers all.
#[tokio::test]
async fn old_dead_letters_are_removed() {
    let s = setup("esf-prune").await;
    let inputs: Vec<Input> = (0..130)
        .map(|o| ev(0, o, "Liked", json!({"nokey": o})))
        .collect();
    commit_batch(&s.direct, &s.def, &inputs, 0, 130)
        .await
        .unwrap();
    let (count, newest) = s.direct.dead_letters(&gen_ref(), 1000).await.unwrap();
    assert_eq!(count, 130);
    assert_eq!(newest.len(), refold::projection::store::DEAD_LETTERS_KEPT);
    assert_eq!(newest[0].offset, 129);
    let (_, body) = es_get(&format!("{}posts-g1-state/_count?q=kind:dead", s.ns)).await;
    assert_eq!(
        body["count"].as_u64(),
        Some(refold::projection::store::DEAD_LETTERS_KEPT as u64)
    );
    s.cleanup().await;
}
