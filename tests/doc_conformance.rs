//! One conformance suite for the document read-model port, run against every
//! adapter: the embedded store (tantivy, in a temporary directory) and
//! Elasticsearch (at `TEST_ELASTICSEARCH_URL`; each test uses an index namespace of
//! its own and removes its indices afterwards).
//!
//! Batches are folded from real events with a `store = "elasticsearch"` definition
//! ([`DEF`]) wherever the read-before-fold path matters (re-applying a batch); the
//! search cases write documents with hand-made effects.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use refold::event::Envelope;
use refold::projection::def::{self, Definition};
use refold::projection::fold::{self, DeadLetter, DocDelta, Effects, FieldDelta, Input};
use refold::projection::store::doc::{DocStore, FieldType, IndexSpec, Order, Search, Sort, Specs};
use refold::projection::store::elastic::ElasticStore;
use refold::projection::store::embedded_docs::EmbeddedDocs;
use refold::projection::store::{Commit, DEAD_LETTERS_KEPT, GenInfo, GenRef, Meta, Session, Store};
use serde_json::{Map, Value, json};

// ---- building blocks -------------------------------------------------------------

/// The projection every case writes (the search cases need its [`specs`]).
const P: &str = "posts";

const DEF: &str = r#"
name = "posts"
version = 1
store = "elasticsearch"
key = "data.post_id"

[[on.PostPublished]]
op = "set"
field = "title"
from = "data.title"

[[on.PostLiked]]
op = "incr"
field = "likes"

[[on.PostUnliked]]
op = "decr"
field = "likes"

[[on.PostTagged]]
op = "add"
field = "tags"
from = "data.tag"

[[on.PostUntagged]]
op = "remove"
field = "tags"
from = "data.tag"

[[on.PostCommented]]
op = "push"
field = "recent"
from = "data.text"
cap = 2

[[on.PostDeleted]]
op = "delete"
"#;

fn definition() -> Definition {
    def::parse(std::path::Path::new("projections/posts.toml"), DEF)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The index of [`P`]: what search, filters and sort may use.
fn specs() -> Specs {
    let fields = [
        ("title", FieldType::Text),
        ("body", FieldType::Text),
        ("tribe", FieldType::Keyword),
        ("tags", FieldType::Keyword),
        ("likes", FieldType::Long),
        ("score", FieldType::Double),
        ("published", FieldType::Boolean),
    ]
    .into_iter()
    .map(|(f, t)| (f.to_owned(), t))
    .collect();
    Specs::from([(
        P.to_owned(),
        IndexSpec {
            fields,
            settings: Map::new(),
        },
    )])
}

fn gen_ref(projection: &str, generation: u64) -> GenRef {
    GenRef {
        projection: projection.into(),
        generation,
    }
}

fn object(v: Value) -> Map<String, Value> {
    v.as_object().expect("an object").clone()
}

/// An event of post `post` at (partition, offset).
fn ev(partition: u32, offset: u64, event_type: &str, post: &str, mut data: Value) -> Input {
    data["post_id"] = json!(post);
    let env = Envelope {
        id: uuid::Uuid::new_v4(),
        stream: format!("post-{post}"),
        version: offset + 1,
        event_type: event_type.into(),
        data: object(data),
        metadata: Map::new(),
        recorded_at: "2025-01-01T00:00:00Z".into(),
    };
    Input {
        partition,
        offset,
        event: Ok(env),
    }
}

/// What the engine does with a batch: read every key it touches, fold with what
/// the documents hold, commit with the checkpoint.
async fn run_batch(
    session: &mut dyn Session,
    def: &Definition,
    inputs: &[Input],
    expected: Option<u64>,
    next: u64,
) -> Commit {
    let keys = fold::keys_to_read(def, inputs, true);
    let fields: Vec<String> = def.schema.keys().cloned().collect();
    let reads = session.read_fields(&keys, &fields).await.unwrap();
    let fx = fold::fold(def, inputs, &reads);
    session
        .commit(expected, next, &Arc::new(fx), &def.schema)
        .await
        .unwrap()
}

/// Effects that set `fields` on each key (replacing what the document held).
fn docs_set(docs: Vec<(&str, Value)>) -> Effects {
    Effects {
        docs: docs
            .into_iter()
            .map(|(k, v)| {
                let fields = object(v)
                    .into_iter()
                    .map(|(f, v)| (f, FieldDelta::Set(v)))
                    .collect();
                (
                    k.to_owned(),
                    DocDelta {
                        reset: true,
                        fields,
                    },
                )
            })
            .collect(),
        ..Effects::default()
    }
}

/// Commits `fx` on partition 0 of `g`, moving its checkpoint on by one.
async fn write(store: &dyn DocStore, g: &GenRef, fx: &Effects) {
    let mut s = store.session(g, 0).await.unwrap();
    let at = s.checkpoint().await.unwrap();
    let next = at.map_or(1, |n| n + 1);
    assert_eq!(
        s.commit(at, next, &Arc::new(fx.clone()), &BTreeMap::new())
            .await
            .unwrap(),
        Commit::Applied
    );
}

fn dead_letter(offset: u64) -> DeadLetter {
    DeadLetter {
        partition: 1,
        offset,
        stream: Some("post-1".into()),
        version: Some(offset + 1),
        event_type: Some("PostLiked".into()),
        id: None,
        reason: format!("bad event at {offset}"),
    }
}

fn search(sort: Sort) -> Search {
    Search {
        text: None,
        filters: Vec::new(),
        at_least: None,
        sort,
        limit: 100,
        after: None,
    }
}

fn text(q: &str) -> Search {
    Search {
        text: Some(q.into()),
        ..search(Sort::Relevance)
    }
}

fn filtered(filters: Filters) -> Search {
    Search {
        filters: filters
            .into_iter()
            .map(|(f, v)| (f.to_owned(), v))
            .collect(),
        ..search(Sort::Key)
    }
}

/// The keys of a search's hits, in order; checks `total` covers at least them.
async fn keys(store: &dyn DocStore, g: &GenRef, s: &Search) -> Vec<String> {
    let page = store.search(g, s).await.unwrap();
    assert!(page.total >= page.hits.len() as u64, "{page:?}");
    page.hits.into_iter().map(|h| h.key).collect()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Every page of `s` (`limit` each), following the cursors; checks `total` on each.
async fn all_pages(store: &dyn DocStore, g: &GenRef, mut s: Search, total: u64) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..100 {
        let page = store.search(g, &s).await.unwrap();
        assert_eq!(page.total, total, "total ignores after and limit");
        assert!(page.hits.len() <= s.limit);
        let Some(last) = page.hits.last() else {
            return out;
        };
        s.after = Some(last.sort.clone());
        out.extend(page.hits.into_iter().map(|h| h.key));
    }
    panic!("pagination does not end");
}

// ---- the cases -------------------------------------------------------------------

async fn meta_round_trip(store: &dyn DocStore) {
    assert_eq!(store.meta(P).await.unwrap(), Meta::default());
    let meta = Meta {
        live: Some(GenInfo {
            generation: 3,
            version: 2,
            source: DEF.into(),
        }),
        building: Some(GenInfo {
            generation: 4,
            version: 3,
            source: "name = \"posts\"".into(),
        }),
    };
    store.put_meta(P, &meta).await.unwrap();
    assert_eq!(store.meta(P).await.unwrap(), meta);
    let live_only = Meta {
        building: None,
        ..meta
    };
    store.put_meta(P, &live_only).await.unwrap();
    assert_eq!(store.meta(P).await.unwrap(), live_only);
    assert_eq!(store.meta("other").await.unwrap(), Meta::default());
}

async fn every_operation_renders(store: &dyn DocStore) {
    let def = definition();
    let g = gen_ref(P, 1);
    let batch = [
        ev(0, 0, "PostPublished", "1", json!({"title": "Hello"})),
        ev(0, 1, "PostLiked", "1", json!({})),
        ev(0, 2, "PostLiked", "1", json!({})),
        ev(0, 3, "PostTagged", "1", json!({"tag": "rust"})),
        ev(0, 4, "PostTagged", "1", json!({"tag": "db"})),
        ev(0, 5, "PostCommented", "1", json!({"text": "c1"})),
    ];
    let mut s = store.session(&g, 0).await.unwrap();
    assert_eq!(
        run_batch(&mut *s, &def, &batch, None, 6).await,
        Commit::Applied
    );
    assert_eq!(
        store.view(&g, &def.schema, "1").await.unwrap(),
        Some(object(json!({
            "title": "Hello", "likes": 2, "tags": ["db", "rust"], "recent": ["c1"]
        })))
    );

    // A second batch changes what the first stored.
    let batch = [
        ev(0, 6, "PostUnliked", "1", json!({})),
        ev(0, 7, "PostTagged", "1", json!({"tag": "async"})),
        ev(0, 8, "PostUntagged", "1", json!({"tag": "db"})),
        ev(0, 9, "PostCommented", "1", json!({"text": "c2"})),
        ev(0, 10, "PostCommented", "1", json!({"text": "c3"})),
        ev(0, 11, "PostPublished", "1", json!({"title": "Hello again"})),
    ];
    assert_eq!(
        run_batch(&mut *s, &def, &batch, Some(6), 12).await,
        Commit::Applied
    );
    assert_eq!(
        store.view(&g, &def.schema, "1").await.unwrap(),
        Some(object(json!({
            "title": "Hello again", "likes": 1, "tags": ["async", "rust"], "recent": ["c3", "c2"]
        })))
    );
    // Never written: nothing. Written with some fields: the others read as defaults.
    assert_eq!(store.view(&g, &def.schema, "2").await.unwrap(), None);
    let batch = [ev(0, 12, "PostLiked", "2", json!({}))];
    assert_eq!(
        run_batch(&mut *s, &def, &batch, Some(12), 13).await,
        Commit::Applied
    );
    assert_eq!(
        store.view(&g, &def.schema, "2").await.unwrap(),
        Some(object(json!({"likes": 1, "tags": [], "recent": []})))
    );
}

async fn delete_and_delete_then_write(store: &dyn DocStore) {
    let def = definition();
    let g = gen_ref(P, 1);
    let mut s = store.session(&g, 0).await.unwrap();
    let batch = [
        ev(0, 0, "PostPublished", "1", json!({"title": "one"})),
        ev(0, 1, "PostPublished", "2", json!({"title": "two"})),
        ev(0, 2, "PostLiked", "2", json!({})),
    ];
    assert_eq!(
        run_batch(&mut *s, &def, &batch, None, 3).await,
        Commit::Applied
    );

    let batch = [
        ev(0, 3, "PostDeleted", "1", json!({})),
        ev(0, 4, "PostLiked", "2", json!({})),
        ev(0, 5, "PostDeleted", "2", json!({})),
        ev(0, 6, "PostTagged", "2", json!({"tag": "new"})),
        // Written and deleted within the batch: never there.
        ev(0, 7, "PostPublished", "3", json!({"title": "three"})),
        ev(0, 8, "PostDeleted", "3", json!({})),
    ];
    assert_eq!(
        run_batch(&mut *s, &def, &batch, Some(3), 9).await,
        Commit::Applied
    );
    assert_eq!(store.view(&g, &def.schema, "1").await.unwrap(), None);
    assert_eq!(store.view(&g, &def.schema, "3").await.unwrap(), None);
    assert_eq!(
        store.view(&g, &def.schema, "2").await.unwrap(),
        Some(object(json!({"likes": 0, "tags": ["new"], "recent": []})))
    );
    let page = store.search(&g, &search(Sort::Key)).await.unwrap();
    assert_eq!(page.total, 1);
    assert_eq!(page.hits[0].key, "2");
    assert_eq!(page.hits[0].doc, object(json!({"tags": ["new"]})));
}

async fn read_fields_returns_fields_and_applied_offsets(store: &dyn DocStore) {
    let def = definition();
    let g = gen_ref(P, 1);
    let mut p0 = store.session(&g, 0).await.unwrap();
    let batch = [
        ev(0, 0, "PostPublished", "1", json!({"title": "one"})),
        ev(0, 1, "PostLiked", "1", json!({})),
        ev(0, 2, "PostTagged", "2", json!({"tag": "x"})),
    ];
    assert_eq!(
        run_batch(&mut *p0, &def, &batch, None, 3).await,
        Commit::Applied
    );

    let keys: BTreeSet<String> = ["1", "2", "404"].into_iter().map(String::from).collect();
    let reads = p0.read_fields(&keys, &["likes".into()]).await.unwrap();
    // Every user field, whatever was asked for; no bookkeeping.
    assert_eq!(
        reads.fields.get("1"),
        Some(&BTreeMap::from([
            ("title".to_string(), json!("one")),
            ("likes".to_string(), json!(1)),
        ]))
    );
    assert_eq!(
        reads.fields.get("2"),
        Some(&BTreeMap::from([("tags".to_string(), json!(["x"]))]))
    );
    assert!(!reads.fields.contains_key("404"));
    assert_eq!(
        reads.applied,
        [("1".to_string(), 3), ("2".to_string(), 3)].into()
    );

    // Another partition sees the documents, but has applied nothing to them.
    let mut p1 = store.session(&g, 1).await.unwrap();
    let reads = p1.read_fields(&keys, &[]).await.unwrap();
    assert_eq!(reads.fields.len(), 2);
    assert!(reads.applied.is_empty(), "{:?}", reads.applied);
}

async fn reapplying_a_batch_changes_nothing(store: &dyn DocStore) {
    let def = definition();
    let g = gen_ref(P, 1);
    let batch: Vec<Input> = vec![
        ev(0, 0, "PostPublished", "1", json!({"title": "one"})),
        ev(0, 1, "PostLiked", "1", json!({})),
        ev(0, 2, "PostCommented", "1", json!({"text": "a"})),
        ev(0, 3, "PostLiked", "2", json!({})),
    ];
    let mut s = store.session(&g, 0).await.unwrap();
    assert_eq!(
        run_batch(&mut *s, &def, &batch, None, 4).await,
        Commit::Applied
    );
    let once = |likes1: i64, recent: Value, likes2: i64| {
        (
            Some(object(
                json!({"title": "one", "likes": likes1, "tags": [], "recent": recent}),
            )),
            Some(object(json!({"likes": likes2, "tags": [], "recent": []}))),
        )
    };
    let views = |s: &'static str| {
        let schema = def.schema.clone();
        async move {
            (
                store.view(&gen_ref(P, 1), &schema, "1").await.unwrap(),
                store.view(&gen_ref(P, 1), &schema, s).await.unwrap(),
            )
        }
    };
    assert_eq!(views("2").await, once(1, json!(["a"]), 1));

    // A restarted worker folds the same batch again, reading what the documents
    // hold: the fold skips it all, the commit changes nothing.
    let mut again = store.session(&g, 0).await.unwrap();
    assert_eq!(again.checkpoint().await.unwrap(), Some(4));
    let keys = fold::keys_to_read(&def, &batch, true);
    let reads = again.read_fields(&keys, &[]).await.unwrap();
    let fx = fold::fold(&def, &batch, &reads);
    assert!(fx.docs.is_empty(), "already applied: {:?}", fx.docs);
    assert_eq!(
        again
            .commit(Some(4), 4, &Arc::new(fx), &def.schema)
            .await
            .unwrap(),
        Commit::Applied
    );
    assert_eq!(views("2").await, once(1, json!(["a"]), 1));

    // A batch that starts before what the documents hold (the data of its first
    // part was written, the checkpoint was not): only the new part counts.
    let mut longer = batch.clone();
    longer.extend([
        ev(0, 4, "PostLiked", "1", json!({})),
        ev(0, 5, "PostCommented", "1", json!({"text": "b"})),
        ev(0, 6, "PostLiked", "2", json!({})),
    ]);
    assert_eq!(
        run_batch(&mut *again, &def, &longer, Some(4), 7).await,
        Commit::Applied
    );
    assert_eq!(views("2").await, once(2, json!(["b", "a"]), 2));
    assert_eq!(store.checkpoints(&g, 1).await.unwrap(), vec![Some(7)]);
}

async fn two_partitions_feed_one_document(store: &dyn DocStore) {
    let def = definition();
    let g = gen_ref(P, 1);
    let mut p0 = store.session(&g, 0).await.unwrap();
    let mut p1 = store.session(&g, 1).await.unwrap();
    let b0 = [
        ev(0, 0, "PostLiked", "1", json!({})),
        ev(0, 1, "PostLiked", "1", json!({})),
    ];
    let b1 = [
        ev(1, 5, "PostTagged", "1", json!({"tag": "t"})),
        ev(1, 6, "PostLiked", "1", json!({})),
    ];
    assert_eq!(
        run_batch(&mut *p0, &def, &b0, None, 2).await,
        Commit::Applied
    );
    assert_eq!(
        run_batch(&mut *p1, &def, &b1, None, 7).await,
        Commit::Applied
    );
    let expected = Some(object(json!({"likes": 3, "tags": ["t"], "recent": []})));
    assert_eq!(store.view(&g, &def.schema, "1").await.unwrap(), expected);

    let key = BTreeSet::from(["1".to_string()]);
    assert_eq!(p0.read_fields(&key, &[]).await.unwrap().applied["1"], 2);
    assert_eq!(p1.read_fields(&key, &[]).await.unwrap().applied["1"], 7);
    assert_eq!(
        store.checkpoints(&g, 3).await.unwrap(),
        vec![Some(2), Some(7), None]
    );

    // Each partition's batch folded again is skipped, by that partition's offset.
    assert_eq!(
        run_batch(&mut *p0, &def, &b0, Some(2), 2).await,
        Commit::Applied
    );
    assert_eq!(
        run_batch(&mut *p1, &def, &b1, Some(7), 7).await,
        Commit::Applied
    );
    assert_eq!(store.view(&g, &def.schema, "1").await.unwrap(), expected);

    // And each goes on from where it was.
    let b0 = [ev(0, 2, "PostUnliked", "1", json!({}))];
    assert_eq!(
        run_batch(&mut *p0, &def, &b0, Some(2), 3).await,
        Commit::Applied
    );
    assert_eq!(
        store.view(&g, &def.schema, "1").await.unwrap(),
        Some(object(json!({"likes": 2, "tags": ["t"], "recent": []})))
    );
}

/// Two partitions' workers writing one document at once lose nothing: a batch that
/// meets a [`Commit::Conflict`] is read and folded again, as the engine does.
async fn concurrent_partitions_lose_nothing(store: &dyn DocStore) {
    let def = definition();
    let g = gen_ref(P, 1);
    let worker = |p: u32| {
        let def = def.clone();
        let g = g.clone();
        async move {
            let mut s = store.session(&g, p).await.unwrap();
            let mut at = None;
            for offset in 0..15u64 {
                let batch = [
                    ev(p, offset, "PostLiked", "hot", json!({})),
                    ev(p, offset, "PostLiked", &format!("own{p}"), json!({})),
                ];
                loop {
                    match run_batch(&mut *s, &def, &batch, at, offset + 1).await {
                        Commit::Applied => break,
                        Commit::Conflict => continue,
                        fenced => panic!("{fenced:?}"),
                    }
                }
                at = Some(offset + 1);
            }
        }
    };
    tokio::join!(worker(0), worker(1));
    let likes = |key: &'static str| {
        let schema = def.schema.clone();
        let g = g.clone();
        async move { store.view(&g, &schema, key).await.unwrap().unwrap()["likes"].clone() }
    };
    assert_eq!(likes("hot").await, json!(30));
    assert_eq!(likes("own0").await, json!(15));
    assert_eq!(likes("own1").await, json!(15));
    assert_eq!(
        store.checkpoints(&g, 2).await.unwrap(),
        vec![Some(15), Some(15)]
    );
}

async fn checkpoints_fence_stale_writers(store: &dyn DocStore) {
    let def = definition();
    let g = gen_ref(P, 1);
    let mut worker = store.session(&g, 0).await.unwrap();
    assert_eq!(worker.checkpoint().await.unwrap(), None);
    let first = [ev(0, 9, "PostLiked", "1", json!({}))];
    assert_eq!(
        run_batch(&mut *worker, &def, &first, None, 10).await,
        Commit::Applied
    );
    assert_eq!(worker.checkpoint().await.unwrap(), Some(10));

    // A stale worker (it saw no checkpoint) is fenced and writes nothing.
    let mut stale = store.session(&g, 0).await.unwrap();
    let mut fx = fold::fold(&def, &first, &Default::default());
    fx.dead_letters.push(dead_letter(3));
    let fx = Arc::new(fx);
    assert_eq!(
        stale.commit(None, 5, &fx, &def.schema).await.unwrap(),
        Commit::Fenced { found: Some(10) }
    );
    assert_eq!(
        stale.commit(Some(4), 5, &fx, &def.schema).await.unwrap(),
        Commit::Fenced { found: Some(10) }
    );
    assert_eq!(
        store.view(&g, &def.schema, "1").await.unwrap(),
        Some(object(json!({"likes": 1, "tags": [], "recent": []})))
    );
    assert_eq!(store.dead_letters(&g, 10).await.unwrap(), (0, vec![]));
    assert_eq!(
        store.checkpoints(&g, 2).await.unwrap(),
        vec![Some(10), None]
    );

    // Empty effects still move the checkpoint.
    assert_eq!(
        stale
            .commit(Some(10), 12, &Arc::new(Effects::default()), &def.schema)
            .await
            .unwrap(),
        Commit::Applied
    );
    assert_eq!(worker.checkpoint().await.unwrap(), Some(12));
    assert_eq!(
        worker
            .commit(Some(10), 13, &Arc::new(Effects::default()), &def.schema)
            .await
            .unwrap(),
        Commit::Fenced { found: Some(12) }
    );
    // Another partition's checkpoint is its own.
    let mut p1 = store.session(&g, 1).await.unwrap();
    assert_eq!(
        p1.commit(None, 1, &Arc::new(Effects::default()), &def.schema)
            .await
            .unwrap(),
        Commit::Applied
    );
    assert_eq!(
        store.checkpoints(&g, 2).await.unwrap(),
        vec![Some(12), Some(1)]
    );
}

async fn dead_letters_idempotent_newest_first(store: &dyn DocStore) {
    let g = gen_ref(P, 1);
    assert_eq!(store.dead_letters(&g, 10).await.unwrap(), (0, vec![]));
    let fx = |offsets: std::ops::Range<u64>| Effects {
        dead_letters: offsets.map(dead_letter).collect(),
        ..Effects::default()
    };
    let mut s = store.session(&g, 1).await.unwrap();
    assert_eq!(
        s.commit(None, 3, &Arc::new(fx(0..3)), &BTreeMap::new())
            .await
            .unwrap(),
        Commit::Applied
    );
    assert_eq!(
        store.dead_letters(&g, 10).await.unwrap(),
        (3, vec![dead_letter(2), dead_letter(1), dead_letter(0)])
    );
    assert_eq!(
        store.dead_letters(&g, 2).await.unwrap(),
        (3, vec![dead_letter(2), dead_letter(1)])
    );

    // Recorded again (a batch folded again): one dead letter each.
    assert_eq!(
        s.commit(Some(3), 4, &Arc::new(fx(1..4)), &BTreeMap::new())
            .await
            .unwrap(),
        Commit::Applied
    );
    assert_eq!(
        store.dead_letters(&g, 10).await.unwrap(),
        (
            4,
            vec![
                dead_letter(3),
                dead_letter(2),
                dead_letter(1),
                dead_letter(0)
            ]
        )
    );

    // Only the newest DEAD_LETTERS_KEPT are kept; the count covers all.
    let end = 4 + DEAD_LETTERS_KEPT as u64 + 5;
    assert_eq!(
        s.commit(Some(4), end, &Arc::new(fx(4..end)), &BTreeMap::new())
            .await
            .unwrap(),
        Commit::Applied
    );
    let (count, letters) = store.dead_letters(&g, 1000).await.unwrap();
    assert_eq!(count, end);
    let offsets: Vec<u64> = letters.iter().map(|d| d.offset).collect();
    let newest: Vec<u64> = (end - DEAD_LETTERS_KEPT as u64..end).rev().collect();
    assert_eq!(offsets, newest);
    assert_eq!(letters[0], dead_letter(end - 1));
}

async fn generations_are_isolated(store: &dyn DocStore) {
    let def = definition();
    let (g1, g2, other) = (gen_ref(P, 1), gen_ref(P, 2), gen_ref("other", 1));
    assert_eq!(store.generations(P).await.unwrap(), BTreeSet::new());
    for (g, likes) in [(&g1, 1), (&g2, 2), (&other, 3)] {
        let batch: Vec<Input> = (0..likes)
            .map(|o| ev(0, o, "PostLiked", "1", json!({})))
            .collect();
        let mut s = store.session(g, 0).await.unwrap();
        assert_eq!(
            run_batch(&mut *s, &def, &batch, None, likes).await,
            Commit::Applied
        );
        let fx = Effects {
            dead_letters: vec![dead_letter(likes)],
            ..Effects::default()
        };
        assert_eq!(
            s.commit(Some(likes), likes + 1, &Arc::new(fx), &def.schema)
                .await
                .unwrap(),
            Commit::Applied
        );
    }
    for (g, likes) in [(&g1, 1), (&g2, 2), (&other, 3)] {
        assert_eq!(
            store.view(g, &def.schema, "1").await.unwrap(),
            Some(object(json!({"likes": likes, "tags": [], "recent": []})))
        );
        assert_eq!(
            store.checkpoints(g, 1).await.unwrap(),
            vec![Some(likes + 1)]
        );
        assert_eq!(
            store.dead_letters(g, 10).await.unwrap(),
            (1, vec![dead_letter(likes)])
        );
        let page = store.search(g, &search(Sort::Key)).await.unwrap();
        assert_eq!(page.total, 1);
        assert_eq!(page.hits[0].doc, object(json!({"likes": likes})));
    }
    assert_eq!(store.generations(P).await.unwrap(), BTreeSet::from([1, 2]));
    assert_eq!(
        store.generations("other").await.unwrap(),
        BTreeSet::from([1])
    );

    store.drop_generation(&g1).await.unwrap();
    assert_eq!(store.generations(P).await.unwrap(), BTreeSet::from([2]));
    assert_eq!(store.view(&g1, &def.schema, "1").await.unwrap(), None);
    assert_eq!(store.checkpoints(&g1, 1).await.unwrap(), vec![None]);
    assert_eq!(store.dead_letters(&g1, 10).await.unwrap(), (0, vec![]));
    assert_eq!(
        store
            .view(&g2, &def.schema, "1")
            .await
            .unwrap()
            .map(|v| v["likes"].clone()),
        Some(json!(2))
    );
    // Idempotent; a new session starts the generation afresh.
    store.drop_generation(&g1).await.unwrap();
    let mut s = store.session(&g1, 0).await.unwrap();
    assert_eq!(s.checkpoint().await.unwrap(), None);
    let page = store.search(&g1, &search(Sort::Key)).await.unwrap();
    assert_eq!((page.total, page.hits.len()), (0, 0));
    store.drop_generation(&g1).await.unwrap();
    store.drop_generation(&g2).await.unwrap();
    assert_eq!(store.generations(P).await.unwrap(), BTreeSet::new());
    assert_eq!(
        store.generations("other").await.unwrap(),
        BTreeSet::from([1])
    );
}

/// Documents for the search cases.
async fn corpus(store: &dyn DocStore, g: &GenRef) {
    write(
        store,
        g,
        &docs_set(vec![
            (
                "p1",
                json!({"title": "search tips", "tribe": "t1", "tags": ["rust", "db"],
                       "likes": 5, "score": 1.5, "published": true}),
            ),
            (
                "p2",
                json!({"title": "search with tantivy", "tribe": "t2", "tags": ["rust"],
                       "likes": 12, "score": 0.5, "published": false}),
            ),
            (
                "p3",
                json!({"title": "cooking pasta", "tribe": "t1", "tags": [],
                       "likes": 5, "published": true}),
            ),
            (
                "p4",
                json!({"body": "tantivy internals", "tribe": "t3", "tags": ["db"],
                       "score": 2.0, "extra": {"not": "mapped"}}),
            ),
            ("p5", json!({"note": "nothing mapped"})),
        ]),
    )
    .await;
}

async fn search_ranks_by_relevance(store: &dyn DocStore) {
    let g = gen_ref(P, 1);
    corpus(store, &g).await;

    // Any word in any text field; non-matching documents are left out.
    let page = store.search(&g, &text("tantivy search")).await.unwrap();
    assert_eq!(page.total, 3);
    let hits: Vec<&str> = page.hits.iter().map(|h| h.key.as_str()).collect();
    assert_eq!(hits[0], "p2", "matches both words: {page:?}");
    assert_eq!(
        hits.iter().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from(["p1", "p2", "p4"])
    );
    let scores: Vec<f64> = page.hits.iter().map(|h| h.score.unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    assert_eq!(
        page.hits[0].doc,
        object(
            json!({"title": "search with tantivy", "tribe": "t2", "tags": ["rust"],
                      "likes": 12, "score": 0.5, "published": false})
        )
    );

    // The rarer word counts more; a longer field less.
    assert_eq!(
        keys(store, &g, &text("Search PASTA")).await,
        strings(&["p3", "p1", "p2"])
    );
    assert_eq!(keys(store, &g, &text("internals")).await, strings(&["p4"]));
    // Unmapped fields are not searched; no word, no match.
    assert!(keys(store, &g, &text("mapped")).await.is_empty());
    assert!(keys(store, &g, &text("!!")).await.is_empty());

    // Equal scores: key ascending.
    write(
        store,
        &g,
        &docs_set(vec![
            ("q2", json!({"title": "identical words"})),
            ("q1", json!({"title": "identical words"})),
        ]),
    )
    .await;
    assert_eq!(
        keys(store, &g, &text("identical")).await,
        strings(&["q1", "q2"])
    );

    // Text and filters together.
    let s = Search {
        filters: vec![("tribe".into(), json!("t1"))],
        ..text("search pasta")
    };
    assert_eq!(keys(store, &g, &s).await, strings(&["p3", "p1"]));
}

type Filters<'a> = Vec<(&'a str, Value)>;

async fn search_filters_exact_values(store: &dyn DocStore) {
    let g = gen_ref(P, 1);
    corpus(store, &g).await;
    // (filters, the keys they match)
    let cases: Vec<(Filters, Vec<&str>)> = vec![
        (vec![("tribe", json!("t1"))], vec!["p1", "p3"]),
        (vec![("tribe", json!("t"))], vec![]),
        (vec![("likes", json!(5))], vec!["p1", "p3"]),
        (vec![("likes", json!(12))], vec!["p2"]),
        (vec![("score", json!(1.5))], vec!["p1"]),
        (vec![("score", json!(2))], vec!["p4"]),
        (vec![("published", json!(true))], vec!["p1", "p3"]),
        (vec![("published", json!(false))], vec!["p2"]),
        // An array matches when one of its values does.
        (vec![("tags", json!("rust"))], vec!["p1", "p2"]),
        (vec![("tags", json!("db"))], vec!["p1", "p4"]),
        // All filters are required.
        (
            vec![("tags", json!("db")), ("tribe", json!("t1"))],
            vec!["p1"],
        ),
        (
            vec![("likes", json!(5)), ("published", json!(false))],
            vec![],
        ),
    ];
    for (filters, expected) in cases {
        let s = filtered(filters.clone());
        let page = store.search(&g, &s).await.unwrap();
        let got: Vec<&str> = page.hits.iter().map(|h| h.key.as_str()).collect();
        assert_eq!(got, expected, "{filters:?}");
        assert_eq!(page.total, expected.len() as u64, "{filters:?}");
        assert!(page.hits.iter().all(|h| h.score.is_none()));
    }

    // at_least: inclusive lower bound, with other filters.
    let s = Search {
        at_least: Some(("likes".into(), 5)),
        ..search(Sort::Key)
    };
    assert_eq!(keys(store, &g, &s).await, strings(&["p1", "p2", "p3"]));
    let s = Search {
        at_least: Some(("likes".into(), 6)),
        ..search(Sort::Key)
    };
    assert_eq!(keys(store, &g, &s).await, strings(&["p2"]));
    let s = Search {
        at_least: Some(("likes".into(), 5)),
        ..filtered(vec![("tribe", json!("t1"))])
    };
    assert_eq!(keys(store, &g, &s).await, strings(&["p1", "p3"]));
}

async fn search_sorts_with_missing_last(store: &dyn DocStore) {
    let g = gen_ref(P, 1);
    corpus(store, &g).await;
    let by = |field: &str, order: Order| search(Sort::Field(field.into(), order));

    // Ties on the field: key ascending; no value: last, in both orders.
    assert_eq!(
        keys(store, &g, &by("likes", Order::Asc)).await,
        strings(&["p1", "p3", "p2", "p4", "p5"])
    );
    assert_eq!(
        keys(store, &g, &by("likes", Order::Desc)).await,
        strings(&["p2", "p1", "p3", "p4", "p5"])
    );
    assert_eq!(
        keys(store, &g, &by("score", Order::Asc)).await,
        strings(&["p2", "p1", "p4", "p3", "p5"])
    );
    assert_eq!(
        keys(store, &g, &by("score", Order::Desc)).await,
        strings(&["p4", "p1", "p2", "p3", "p5"])
    );
    assert_eq!(
        keys(store, &g, &by("tribe", Order::Desc)).await,
        strings(&["p4", "p2", "p1", "p3", "p5"])
    );
    assert_eq!(
        keys(store, &g, &by("published", Order::Asc)).await,
        strings(&["p2", "p1", "p3", "p4", "p5"])
    );
    assert_eq!(
        keys(store, &g, &search(Sort::Key)).await,
        strings(&["p1", "p2", "p3", "p4", "p5"])
    );
    // The sort with filters and a limit.
    let s = Search {
        limit: 1,
        ..Search {
            filters: vec![("tribe".into(), json!("t1"))],
            ..by("likes", Order::Desc)
        }
    };
    let page = store.search(&g, &s).await.unwrap();
    assert_eq!(page.total, 2);
    assert_eq!(page.hits.len(), 1);
    assert_eq!(page.hits[0].key, "p1");
}

async fn search_pages_cover_every_match_once(store: &dyn DocStore) {
    let g = gen_ref(P, 1);
    // 23 documents: likes with ties and gaps, some without likes; two words.
    let docs: Vec<(String, Value)> = (0..23)
        .map(|i| {
            let mut doc = json!({"title": if i % 3 == 0 { "alpha beta" } else { "alpha" }});
            if i % 4 != 0 {
                doc["likes"] = json!(i % 5);
            }
            (format!("k{i:02}"), doc)
        })
        .collect();
    // Written in two commits, so that they span more than one write.
    for chunk in docs.chunks(12) {
        let fx = docs_set(chunk.iter().map(|(k, v)| (k.as_str(), v.clone())).collect());
        write(store, &g, &fx).await;
    }
    let mut all_keys: Vec<String> = docs.iter().map(|(k, _)| k.clone()).collect();
    all_keys.sort();

    // Key order.
    let s = Search {
        limit: 5,
        ..search(Sort::Key)
    };
    assert_eq!(all_pages(store, &g, s, 23).await, all_keys);

    // Field order, both ways: every document once, in the order of the contract.
    for order in [Order::Asc, Order::Desc] {
        let mut expected: Vec<(Option<i64>, String)> = docs
            .iter()
            .map(|(k, v)| (v.get("likes").and_then(Value::as_i64), k.clone()))
            .collect();
        expected.sort_by(|a, b| {
            let field = match (a.0, b.0) {
                (Some(x), Some(y)) if order == Order::Asc => x.cmp(&y),
                (Some(x), Some(y)) => y.cmp(&x),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            };
            field.then_with(|| a.1.cmp(&b.1))
        });
        let expected: Vec<String> = expected.into_iter().map(|(_, k)| k).collect();
        let s = Search {
            limit: 4,
            ..search(Sort::Field("likes".into(), order))
        };
        assert_eq!(all_pages(store, &g, s, 23).await, expected, "{order:?}");
    }

    // Relevance: the documents with both words first, each group by key.
    let s = Search {
        limit: 3,
        ..text("alpha beta")
    };
    let (mut both, mut one): (Vec<String>, Vec<String>) = all_keys
        .iter()
        .cloned()
        .partition(|k| k[1..].parse::<u32>().unwrap() % 3 == 0);
    both.sort();
    one.sort();
    both.extend(one);
    assert_eq!(all_pages(store, &g, s, 23).await, both);

    // A page past the end is empty but still counts.
    let s = Search {
        limit: 5,
        ..text("beta")
    };
    let page = store.search(&g, &s).await.unwrap();
    let last = store
        .search(
            &g,
            &Search {
                after: Some(
                    store
                        .search(
                            &g,
                            &Search {
                                limit: 100,
                                ..s.clone()
                            },
                        )
                        .await
                        .unwrap()
                        .hits
                        .last()
                        .unwrap()
                        .sort
                        .clone(),
                ),
                ..s
            },
        )
        .await
        .unwrap();
    assert_eq!(last.total, page.total);
    assert!(last.hits.is_empty());
}

async fn search_sees_the_last_commit(store: &dyn DocStore) {
    let def = definition();
    let g = gen_ref(P, 1);
    let mut s = store.session(&g, 0).await.unwrap();
    let by_likes = |n: i64| filtered(vec![("likes", json!(n))]);
    for (offset, n) in (0..3u64).zip(1..) {
        let batch = [ev(0, offset, "PostLiked", "1", json!({}))];
        let expected = if offset == 0 { None } else { Some(offset) };
        assert_eq!(
            run_batch(&mut *s, &def, &batch, expected, offset + 1).await,
            Commit::Applied
        );
        // Right after the commit returned: the new value, not the old one.
        assert_eq!(keys(store, &g, &by_likes(n)).await, strings(&["1"]));
        assert!(keys(store, &g, &by_likes(n - 1)).await.is_empty());
    }
    let batch = [ev(0, 3, "PostDeleted", "1", json!({}))];
    assert_eq!(
        run_batch(&mut *s, &def, &batch, Some(3), 4).await,
        Commit::Applied
    );
    let page = store.search(&g, &search(Sort::Key)).await.unwrap();
    assert_eq!((page.total, page.hits.len()), (0, 0));
}

/// The embedded store keeps everything across a restart: documents, checkpoints
/// (also of a commit with no effects), dead letters, meta, generations.
#[tokio::test]
async fn embedded_state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let def = definition();
    let g = gen_ref(P, 1);
    let meta = Meta {
        live: Some(GenInfo {
            generation: 1,
            version: 1,
            source: DEF.into(),
        }),
        building: None,
    };
    {
        let store = EmbeddedDocs::open(dir.path(), specs()).unwrap();
        store.put_meta(P, &meta).await.unwrap();
        corpus(&store, &g).await;
        let mut p1 = store.session(&g, 1).await.unwrap();
        let batch = [ev(1, 4, "PostLiked", "p3", json!({}))];
        assert_eq!(
            run_batch(&mut *p1, &def, &batch, None, 5).await,
            Commit::Applied
        );
        let fx = Effects {
            dead_letters: vec![dead_letter(7)],
            ..Effects::default()
        };
        assert_eq!(
            p1.commit(Some(5), 8, &Arc::new(fx), &def.schema)
                .await
                .unwrap(),
            Commit::Applied
        );
        assert_eq!(
            p1.commit(Some(8), 9, &Arc::new(Effects::default()), &def.schema)
                .await
                .unwrap(),
            Commit::Applied
        );
    }
    let store = EmbeddedDocs::open(dir.path(), Specs::new()).unwrap();
    assert_eq!(store.meta(P).await.unwrap(), meta);
    assert_eq!(store.generations(P).await.unwrap(), BTreeSet::from([1]));
    assert_eq!(
        store.checkpoints(&g, 2).await.unwrap(),
        vec![Some(1), Some(9)]
    );
    assert_eq!(
        store.dead_letters(&g, 10).await.unwrap(),
        (1, vec![dead_letter(7)])
    );
    assert_eq!(
        store.view(&g, &def.schema, "p3").await.unwrap().unwrap()["likes"],
        json!(6)
    );
    // The index keeps the schema it was created with, whatever the specs say now.
    assert_eq!(
        keys(&store, &g, &filtered(vec![("tags", json!("rust"))])).await,
        strings(&["p1", "p2"])
    );
    assert_eq!(keys(&store, &g, &text("pasta")).await, strings(&["p3"]));
    let mut p1 = store.session(&g, 1).await.unwrap();
    let batch = [ev(1, 9, "PostLiked", "p3", json!({}))];
    assert_eq!(
        run_batch(&mut *p1, &def, &batch, Some(9), 10).await,
        Commit::Applied
    );
}

// ---- the adapters ----------------------------------------------------------------

/// Two tests per case: `embedded::<case>` and `elastic::<case>`.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test]
                async fn $case() {
                    let dir = tempfile::tempdir().unwrap();
                    let store = super::EmbeddedDocs::open(dir.path(), super::specs()).unwrap();
                    assert_eq!(super::Store::backend(&store), "embedded");
                    super::$case(&store).await;
                }
            )*
        }

        mod elastic {
            $(
                #[tokio::test]
                async fn $case() {
                    let url = super::common::elasticsearch_url();
                    let namespace =
                        format!("{}-", super::common::unique(stringify!($case)).to_lowercase());
                    let store = super::ElasticStore::connect(&url, &namespace, super::specs())
                        .await
                        .unwrap();
                    assert_eq!(super::Store::backend(&store), "elasticsearch");
                    super::$case(&store).await;
                    super::common::es_proxy::es_remove_namespace(&namespace).await;
                }
            )*
        }
    };
}

conformance!(
    meta_round_trip,
    every_operation_renders,
    delete_and_delete_then_write,
    read_fields_returns_fields_and_applied_offsets,
    reapplying_a_batch_changes_nothing,
    two_partitions_feed_one_document,
    concurrent_partitions_lose_nothing,
    checkpoints_fence_stale_writers,
    dead_letters_idempotent_newest_first,
    generations_are_isolated,
    search_ranks_by_relevance,
    search_filters_exact_values,
    search_sorts_with_missing_last,
    search_pages_cover_every_match_once,
    search_sees_the_last_commit,
);
