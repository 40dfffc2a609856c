//! One conformance suite for the key-value read-model port, run against every
//! adapter: the embedded store (redb, in a temporary directory) and Redis (at
//! `TEST_REDIS_URL`, set by scripts/test.sh; each test uses a namespace of its own
//! and removes it afterwards).

mod common;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use refold::projection::def::FieldKind;
use refold::projection::fold::{DeadLetter, DocDelta, Effects, FieldDelta};
use refold::projection::store::embedded::EmbeddedKv;
use refold::projection::store::redis::RedisStore;
use refold::projection::store::{
    Commit, DEAD_LETTERS_KEPT, GenInfo, GenRef, KvStore, Meta, Schema, Store,
};
use serde_json::{Map, Value, json};

// ---- building blocks -------------------------------------------------------------

fn gen_ref(projection: &str, generation: u64) -> GenRef {
    GenRef {
        projection: projection.into(),
        generation,
    }
}

/// likes: counter, title/code: values, tags: set, viewers: distinct, recent: list.
fn schema() -> Schema {
    [
        ("likes", FieldKind::Counter),
        ("title", FieldKind::Value),
        ("code", FieldKind::Value),
        ("tags", FieldKind::Set),
        ("viewers", FieldKind::Distinct),
        ("recent", FieldKind::List),
    ]
    .into_iter()
    .map(|(f, k)| (f.to_owned(), k))
    .collect()
}

/// Canonical JSON text of a value, as the fold hands members and items over.
fn text(v: Value) -> String {
    v.to_string()
}

fn members(changes: &[(Value, bool)]) -> FieldDelta {
    FieldDelta::Members(
        changes
            .iter()
            .map(|(v, present)| (text(v.clone()), *present))
            .collect(),
    )
}

fn distinct(values: &[Value]) -> FieldDelta {
    FieldDelta::Distinct(values.iter().cloned().map(text).collect())
}

/// `items` newest first.
fn push(items: &[Value], cap: usize) -> FieldDelta {
    FieldDelta::Push {
        items: items.iter().cloned().map(text).collect::<VecDeque<_>>(),
        cap,
    }
}

fn delta(reset: bool, fields: Vec<(&str, FieldDelta)>) -> DocDelta {
    DocDelta {
        reset,
        fields: fields.into_iter().map(|(f, d)| (f.to_owned(), d)).collect(),
    }
}

fn docs(deltas: Vec<(&str, DocDelta)>) -> Effects {
    Effects {
        docs: deltas.into_iter().map(|(k, d)| (k.to_owned(), d)).collect(),
        ..Effects::default()
    }
}

fn rankings(rs: &[(&str, &[(&str, f64)])]) -> Effects {
    let rankings = rs
        .iter()
        .map(|(name, ms)| {
            (
                name.to_string(),
                ms.iter().map(|(m, by)| (m.to_string(), *by)).collect(),
            )
        })
        .collect();
    Effects {
        rankings,
        ..Effects::default()
    }
}

fn dead_letter(offset: u64) -> DeadLetter {
    let decoded = offset.is_multiple_of(2);
    DeadLetter {
        partition: 1,
        offset,
        stream: decoded.then(|| format!("post/{offset}")),
        version: decoded.then_some(offset + 1),
        event_type: decoded.then(|| "PostLiked".to_owned()),
        id: decoded.then(|| format!("id-{offset}")),
        reason: format!("bad event at {offset}"),
    }
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

/// Commits `fx` on a fresh session of `partition` and returns the outcome.
async fn commit(
    kv: &dyn KvStore,
    g: &GenRef,
    partition: u32,
    expected: Option<u64>,
    next: u64,
    fx: &Effects,
) -> Commit {
    let mut session = kv.session(g, partition).await.unwrap();
    session
        .commit(expected, next, &Arc::new(fx.clone()), &schema())
        .await
        .unwrap()
}

async fn view(kv: &dyn KvStore, g: &GenRef, key: &str) -> Option<Map<String, Value>> {
    kv.view(g, &schema(), key).await.unwrap()
}

// ---- the cases -------------------------------------------------------------------

async fn meta_round_trip(kv: &dyn KvStore) {
    assert_eq!(kv.meta("posts").await.unwrap(), Meta::default());

    let live = GenInfo {
        generation: 1,
        version: 1,
        source: "name = \"posts\"\n".into(),
    };
    let first = Meta {
        live: Some(live.clone()),
        building: None,
    };
    kv.put_meta("posts", &first).await.unwrap();
    assert_eq!(kv.meta("posts").await.unwrap(), first);

    let second = Meta {
        live: Some(live),
        building: Some(GenInfo {
            generation: 2,
            version: 2,
            source: "name = \"posts\" # v2\n".into(),
        }),
    };
    kv.put_meta("posts", &second).await.unwrap();
    assert_eq!(kv.meta("posts").await.unwrap(), second);
    assert_eq!(
        kv.meta("other").await.unwrap(),
        Meta::default(),
        "meta is per projection"
    );
}

async fn every_field_kind(kv: &dyn KvStore) {
    let g = gen_ref("posts", 1);
    let first = docs(vec![
        (
            "post/1",
            delta(
                false,
                vec![
                    ("likes", FieldDelta::Incr(3)),
                    ("title", FieldDelta::Set(json!("Hello"))),
                    ("code", FieldDelta::Set(json!("007"))),
                    (
                        "tags",
                        members(&[
                            (json!("b"), true),
                            (json!("a"), true),
                            (json!("c"), true),
                            (json!(1), true),
                        ]),
                    ),
                    ("viewers", distinct(&[json!("u1"), json!("u2")])),
                    ("recent", push(&[json!("e2"), json!("e1")], 3)),
                ],
            ),
        ),
        ("post/2", delta(false, vec![("likes", FieldDelta::Incr(1))])),
    ]);
    assert_eq!(commit(kv, &g, 0, None, 5, &first).await, Commit::Applied);

    let second = docs(vec![(
        "post/1",
        delta(
            false,
            vec![
                ("likes", FieldDelta::Incr(-1)),
                ("title", FieldDelta::Set(json!({"x": [1, 2], "y": null}))),
                (
                    "tags",
                    members(&[
                        (json!("b"), false),
                        (json!("d"), true),
                        (json!("zz"), false),
                    ]),
                ),
                ("viewers", distinct(&[json!("u2"), json!("u3")])),
                ("recent", push(&[json!({"n": 4}), json!("e3")], 3)),
            ],
        ),
    )]);
    assert_eq!(
        commit(kv, &g, 0, Some(5), 9, &second).await,
        Commit::Applied
    );

    // Sets sort by their members' JSON text (`"a"` < `"c"` < `"d"` < `1`); lists
    // are newest first and keep `cap` items; strings stay strings.
    assert_eq!(
        view(kv, &g, "post/1").await,
        Some(object(json!({
            "likes": 2,
            "title": {"x": [1, 2], "y": null},
            "code": "007",
            "tags": ["a", "c", "d", 1],
            "viewers": 3,
            "recent": [{"n": 4}, "e3", "e2"],
        })))
    );
    // Fields never written read as their defaults (values have none).
    assert_eq!(
        view(kv, &g, "post/2").await,
        Some(object(
            json!({"likes": 1, "tags": [], "viewers": 0, "recent": []})
        ))
    );
    assert_eq!(view(kv, &g, "post/404").await, None);
}

async fn reset_clears_the_key(kv: &dyn KvStore) {
    let g = gen_ref("posts", 1);
    let before = docs(vec![
        (
            "post/1",
            delta(
                false,
                vec![
                    ("likes", FieldDelta::Incr(5)),
                    ("title", FieldDelta::Set(json!("old"))),
                    ("tags", members(&[(json!("a"), true)])),
                    ("viewers", distinct(&[json!("u1")])),
                    ("recent", push(&[json!("x")], 5)),
                ],
            ),
        ),
        ("post/2", delta(false, vec![("likes", FieldDelta::Incr(7))])),
    ]);
    assert_eq!(commit(kv, &g, 0, None, 1, &before).await, Commit::Applied);

    let reset = docs(vec![(
        "post/1",
        delta(
            true,
            vec![
                ("likes", FieldDelta::Incr(1)),
                ("tags", members(&[(json!("b"), true)])),
            ],
        ),
    )]);
    assert_eq!(commit(kv, &g, 0, Some(1), 2, &reset).await, Commit::Applied);
    assert_eq!(
        view(kv, &g, "post/1").await,
        Some(object(
            json!({"likes": 1, "tags": ["b"], "viewers": 0, "recent": []})
        ))
    );

    // A reset with nothing after it deletes the key; other keys are untouched.
    let delete = docs(vec![("post/1", delta(true, vec![]))]);
    assert_eq!(
        commit(kv, &g, 0, Some(2), 3, &delete).await,
        Commit::Applied
    );
    assert_eq!(view(kv, &g, "post/1").await, None);
    assert_eq!(
        view(kv, &g, "post/2").await,
        Some(object(
            json!({"likes": 7, "tags": [], "viewers": 0, "recent": []})
        ))
    );
}

async fn rankings_sum_and_order(kv: &dyn KvStore) {
    let g = gen_ref("posts", 1);
    let first = rankings(&[
        ("top", &[("a", 1.0), ("b", 2.0), ("c", 2.0), ("d", 0.5)]),
        ("other", &[("a", 100.0)]),
    ]);
    assert_eq!(commit(kv, &g, 0, None, 1, &first).await, Commit::Applied);
    let second = rankings(&[("top", &[("a", 2.5), ("d", -0.5)])]);
    assert_eq!(
        commit(kv, &g, 0, Some(1), 2, &second).await,
        Commit::Applied
    );

    let top = |pairs: &[(&str, f64)]| {
        pairs
            .iter()
            .map(|(m, s)| (m.to_string(), *s))
            .collect::<Vec<_>>()
    };
    // Highest first; ties (b, c at 2) member descending.
    assert_eq!(
        kv.ranking(&g, "top", 10).await.unwrap(),
        top(&[("a", 3.5), ("c", 2.0), ("b", 2.0), ("d", 0.0)])
    );
    assert_eq!(
        kv.ranking(&g, "top", 2).await.unwrap(),
        top(&[("a", 3.5), ("c", 2.0)])
    );
    assert_eq!(kv.ranking(&g, "top", 0).await.unwrap(), top(&[]));
    assert_eq!(
        kv.ranking(&g, "other", 10).await.unwrap(),
        top(&[("a", 100.0)])
    );
    assert_eq!(kv.ranking(&g, "missing", 10).await.unwrap(), top(&[]));
}

async fn dead_letters_newest_first(kv: &dyn KvStore) {
    let g = gen_ref("posts", 1);
    assert_eq!(kv.dead_letters(&g, 10).await.unwrap(), (0, vec![]));

    let fx = |offsets: std::ops::Range<u64>| Effects {
        dead_letters: offsets.map(dead_letter).collect(),
        ..Effects::default()
    };
    assert_eq!(commit(kv, &g, 1, None, 3, &fx(0..3)).await, Commit::Applied);
    assert_eq!(
        kv.dead_letters(&g, 10).await.unwrap(),
        (3, vec![dead_letter(2), dead_letter(1), dead_letter(0)])
    );
    assert_eq!(
        kv.dead_letters(&g, 2).await.unwrap(),
        (3, vec![dead_letter(2), dead_letter(1)])
    );

    // Only the newest DEAD_LETTERS_KEPT are kept; the count covers all.
    let end = 3 + DEAD_LETTERS_KEPT as u64 + 5;
    assert_eq!(
        commit(kv, &g, 1, Some(3), end, &fx(3..end)).await,
        Commit::Applied
    );
    let (count, letters) = kv.dead_letters(&g, 1000).await.unwrap();
    assert_eq!(count, end);
    let offsets: Vec<u64> = letters.iter().map(|d| d.offset).collect();
    let newest: Vec<u64> = (end - DEAD_LETTERS_KEPT as u64..end).rev().collect();
    assert_eq!(offsets, newest);
    assert_eq!(letters[0], dead_letter(end - 1));
}

async fn checkpoints_fence_stale_writers(kv: &dyn KvStore) {
    let g = gen_ref("posts", 1);
    let fx = |likes: i64, title: &str| {
        let mut fx = docs(vec![(
            "post/1",
            delta(
                false,
                vec![
                    ("likes", FieldDelta::Incr(likes)),
                    ("title", FieldDelta::Set(json!(title))),
                ],
            ),
        )]);
        fx.rankings.insert(
            "top".into(),
            BTreeMap::from([("a".to_string(), likes as f64)]),
        );
        fx.dead_letters.push(dead_letter(likes as u64));
        fx
    };
    let applied_view = Some(object(
        json!({"likes": 1, "title": "first", "tags": [], "viewers": 0, "recent": []}),
    ));

    let mut worker = kv.session(&g, 0).await.unwrap();
    assert_eq!(worker.checkpoint().await.unwrap(), None);
    assert_eq!(
        worker
            .commit(None, 10, &Arc::new(fx(1, "first")), &schema())
            .await
            .unwrap(),
        Commit::Applied
    );
    assert_eq!(worker.checkpoint().await.unwrap(), Some(10));

    // Another worker that believes the partition is fresh (or behind) is fenced
    // and applies nothing: no data, no ranking, no dead letter, no checkpoint.
    let mut stale = kv.session(&g, 0).await.unwrap();
    for expected in [None, Some(5), Some(11)] {
        assert_eq!(
            stale
                .commit(expected, 20, &Arc::new(fx(100, "stale")), &schema())
                .await
                .unwrap(),
            Commit::Fenced { found: Some(10) },
            "expected {expected:?}"
        );
    }
    assert_eq!(view(kv, &g, "post/1").await, applied_view);
    assert_eq!(
        kv.ranking(&g, "top", 10).await.unwrap(),
        vec![("a".to_string(), 1.0)]
    );
    assert_eq!(kv.dead_letters(&g, 10).await.unwrap().0, 1);
    assert_eq!(stale.checkpoint().await.unwrap(), Some(10));

    // Whoever moves the checkpoint on fences the other one.
    assert_eq!(
        stale
            .commit(Some(10), 20, &Arc::new(fx(2, "second")), &schema())
            .await
            .unwrap(),
        Commit::Applied
    );
    assert_eq!(
        worker
            .commit(Some(10), 15, &Arc::new(fx(100, "late")), &schema())
            .await
            .unwrap(),
        Commit::Fenced { found: Some(20) }
    );
    assert_eq!(view(kv, &g, "post/1").await.unwrap()["likes"], json!(3));

    // Two workers racing from the same checkpoint: exactly one wins.
    let (mut a, mut b) = (
        kv.session(&g, 0).await.unwrap(),
        kv.session(&g, 0).await.unwrap(),
    );
    let (fa, fb) = (Arc::new(fx(10, "a")), Arc::new(fx(10, "b")));
    let s = schema();
    let (ra, rb) = tokio::join!(
        a.commit(Some(20), 30, &fa, &s),
        b.commit(Some(20), 31, &fb, &s)
    );
    let outcomes = [ra.unwrap(), rb.unwrap()];
    match outcomes {
        [Commit::Applied, Commit::Fenced { found: Some(30) }]
        | [Commit::Fenced { found: Some(31) }, Commit::Applied] => {}
        other => panic!("racing commits: {other:?}"),
    }
    assert_eq!(view(kv, &g, "post/1").await.unwrap()["likes"], json!(13));

    // A commit without effects still moves the checkpoint; checkpoints are per partition.
    assert_eq!(
        commit(kv, &g, 2, None, 7, &Effects::default()).await,
        Commit::Applied
    );
    let p0 = if outcomes[0] == Commit::Applied {
        30
    } else {
        31
    };
    assert_eq!(
        kv.checkpoints(&g, 4).await.unwrap(),
        vec![Some(p0), None, Some(7), None]
    );
    assert_eq!(
        kv.checkpoints(&gen_ref("posts", 2), 2).await.unwrap(),
        vec![None, None]
    );
}

async fn generations_are_isolated(kv: &dyn KvStore) {
    let (g1, g10) = (gen_ref("posts", 1), gen_ref("posts", 10));
    let other = gen_ref("postsx", 1);
    let meta = Meta {
        live: Some(GenInfo {
            generation: 10,
            version: 1,
            source: "x".into(),
        }),
        building: None,
    };
    kv.put_meta("posts", &meta).await.unwrap();

    for (g, n) in [(&g1, 1), (&g10, 10), (&other, 100)] {
        let mut fx = docs(vec![(
            "post/1",
            delta(
                false,
                vec![
                    ("likes", FieldDelta::Incr(n)),
                    ("tags", members(&[(json!(n), true)])),
                    ("viewers", distinct(&[json!(n)])),
                    ("recent", push(&[json!(n)], 3)),
                ],
            ),
        )]);
        fx.rankings
            .insert("top".into(), BTreeMap::from([("a".to_string(), n as f64)]));
        fx.dead_letters.push(dead_letter(n as u64));
        assert_eq!(commit(kv, g, 0, None, n as u64, &fx).await, Commit::Applied);
    }
    let expect = |n: i64| {
        Some(object(
            json!({"likes": n, "tags": [n], "viewers": 1, "recent": [n]}),
        ))
    };
    assert_eq!(view(kv, &g1, "post/1").await, expect(1));
    assert_eq!(view(kv, &g10, "post/1").await, expect(10));
    // Generations are listed per projection: `postsx` is another one.
    let listed = |v: &[u64]| {
        v.iter()
            .copied()
            .collect::<std::collections::BTreeSet<u64>>()
    };
    assert_eq!(kv.generations("posts").await.unwrap(), listed(&[1, 10]));
    assert_eq!(kv.generations("postsx").await.unwrap(), listed(&[1]));

    kv.drop_generation(&g1).await.unwrap();
    assert_eq!(kv.generations("posts").await.unwrap(), listed(&[10]));
    assert_eq!(view(kv, &g1, "post/1").await, None);
    assert_eq!(kv.checkpoints(&g1, 1).await.unwrap(), vec![None]);
    assert_eq!(kv.ranking(&g1, "top", 10).await.unwrap(), vec![]);
    assert_eq!(kv.dead_letters(&g1, 10).await.unwrap(), (0, vec![]));

    // Generation 10 (and the other projection) are untouched, and so is the meta.
    assert_eq!(view(kv, &g10, "post/1").await, expect(10));
    assert_eq!(kv.checkpoints(&g10, 1).await.unwrap(), vec![Some(10)]);
    assert_eq!(
        kv.ranking(&g10, "top", 10).await.unwrap(),
        vec![("a".to_string(), 10.0)]
    );
    assert_eq!(
        kv.dead_letters(&g10, 10).await.unwrap(),
        (1, vec![dead_letter(10)])
    );
    assert_eq!(view(kv, &other, "post/1").await, expect(100));
    assert_eq!(kv.meta("posts").await.unwrap(), meta);

    // A dropped generation starts afresh.
    let fx = docs(vec![(
        "post/1",
        delta(false, vec![("likes", FieldDelta::Incr(2))]),
    )]);
    assert_eq!(commit(kv, &g1, 0, None, 4, &fx).await, Commit::Applied);
    assert_eq!(view(kv, &g1, "post/1").await.unwrap()["likes"], json!(2));
}

async fn read_fields_returns_stored_values(kv: &dyn KvStore) {
    let g = gen_ref("posts", 1);
    let fx = docs(vec![
        (
            "post/1",
            delta(
                false,
                vec![
                    ("likes", FieldDelta::Incr(4)),
                    ("title", FieldDelta::Set(json!({"a": 1}))),
                    ("code", FieldDelta::Set(json!("12"))),
                ],
            ),
        ),
        (
            "post/2",
            delta(false, vec![("title", FieldDelta::Set(json!("t2")))]),
        ),
    ]);
    let mut session = kv.session(&g, 0).await.unwrap();
    assert_eq!(
        session
            .commit(None, 1, &Arc::new(fx), &schema())
            .await
            .unwrap(),
        Commit::Applied
    );

    let keys: BTreeSet<String> = ["post/1", "post/2", "post/404"]
        .into_iter()
        .map(String::from)
        .collect();
    let fields: Vec<String> = ["likes", "title", "code", "missing"]
        .into_iter()
        .map(String::from)
        .collect();
    let reads = session.read_fields(&keys, &fields).await.unwrap();
    assert_eq!(
        reads.fields.get("post/1"),
        Some(&BTreeMap::from([
            ("likes".to_string(), json!(4)),
            ("title".to_string(), json!({"a": 1})),
            ("code".to_string(), json!("12")),
        ]))
    );
    assert_eq!(
        reads.fields.get("post/2"),
        Some(&BTreeMap::from([("title".to_string(), json!("t2"))]))
    );
    assert!(
        reads.fields.get("post/404").is_none_or(|m| m.is_empty()),
        "unknown key: {reads:?}"
    );

    // Only the fields asked for.
    let only = session
        .read_fields(
            &BTreeSet::from(["post/1".to_string()]),
            &["likes".to_string()],
        )
        .await
        .unwrap();
    assert_eq!(
        only.fields.get("post/1"),
        Some(&BTreeMap::from([("likes".to_string(), json!(4))]))
    );
}

// ---- the adapters ----------------------------------------------------------------

/// A namespace no other test (or earlier run) uses on the shared Redis.
fn unique_namespace(case: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("t{}-{nanos}-{case}.", std::process::id())
}

/// Two tests per case: `embedded::<case>` and `redis::<case>`.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test]
                async fn $case() {
                    let dir = tempfile::tempdir().unwrap();
                    let kv = super::EmbeddedKv::open(dir.path()).unwrap();
                    assert_eq!(super::Store::backend(&kv), "embedded");
                    super::$case(&kv).await;
                }
            )*
        }

        mod redis {
            $(
                #[tokio::test]
                async fn $case() {
                    let ns = super::unique_namespace(stringify!($case));
                    let kv = super::RedisStore::connect(&super::common::redis_url(), &ns).await.unwrap();
                    assert_eq!(super::Store::backend(&kv), "redis");
                    super::$case(&kv).await;
                    crate::common::redis_remove_namespace(&ns).await;
                }
            )*
        }
    };
}

conformance!(
    meta_round_trip,
    every_field_kind,
    reset_clears_the_key,
    rankings_sum_and_order,
    dead_letters_newest_first,
    checkpoints_fence_stale_writers,
    generations_are_isolated,
    read_fields_returns_stored_values,
);

#[tokio::test]
async fn redis_connect_fails_fast_on_a_wrong_url() {
    let started = std::time::Instant::now();
    let err = RedisStore::connect("redis://127.0.0.1:1/", "x.")
        .await
        .err()
        .expect("nothing listens on port 1");
    let msg = err.to_string();
    assert!(
        msg.contains("unavailable") && msg.contains("127.0.0.1:1"),
        "{msg}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

#[tokio::test]
async fn redis_that_hangs_is_unavailable_after_the_timeout() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let started = std::time::Instant::now();
    let err = RedisStore::connect(&format!("redis://{addr}/"), "x.")
        .await
        .err()
        .expect("a silent server cannot be used");
    assert!(
        matches!(err, refold::projection::store::StoreError::Unavailable(_)),
        "{err}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    hold.abort();
}
