//! Document projections end to end, on the embedded search store and on
//! Elasticsearch (osmem-server): search filters, sort and pagination against the
//! oracle, relevance, refused input, the stream history, and a replay under load
//! that switches the alias.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use axum::Router;
use common::oracle::Oracle;
use common::unique;
use refold::config::{Config, Settings};
use refold::demo::{DemoConfig, DemoEvent, Generator};
use refold::position::Position;
use refold::server::{Refold, open_log};
use serde_json::{Value, json};

const PARTITIONS: u32 = 3;

/// An embedded-log service whose document projections run on Elasticsearch
/// (`es`) or on the embedded search store.
fn config(dir: &Path, es: bool, batch: usize) -> Config {
    Config::from_settings(Settings {
        migrations: Some(common::migrations_dir()),
        data_dir: Some(dir.to_owned()),
        projection_batch: Some(batch),
        topic_prefix: Some(format!("{}.", unique("docs"))),
        elasticsearch_url: es.then(common::elasticsearch_url),
        ..Default::default()
    })
    .unwrap()
}

async fn start(config: &Config) -> (Refold, Router) {
    let r = Refold::start(config, open_log(config).unwrap())
        .await
        .unwrap();
    let app = refold::http::app(r.state.clone());
    (r, app)
}

async fn get(app: &Router, uri: &str) -> (u16, Value) {
    let r = common::call(app, "GET", uri, "application/json", String::new()).await;
    (r.status.as_u16(), r.body)
}

async fn post(app: &Router, uri: &str, body: String) -> (u16, Value) {
    let r = common::call(app, "POST", uri, "application/x-ndjson", body).await;
    (r.status.as_u16(), r.body)
}

/// Appends `events` in bulks; their merged position token.
async fn ingest(app: &Router, events: &[DemoEvent]) -> Position {
    let mut pos = Position::default();
    for chunk in events.chunks(500) {
        let body: String = chunk.iter().map(|e| format!("{}\n", e.to_json())).collect();
        let (st, b) = post(app, "/events", body).await;
        assert_eq!((st, &b["errors"]), (200, &json!(false)), "{b}");
        pos.merge(&b["position"].as_str().unwrap().parse().unwrap());
    }
    pos
}

fn demo(seed: u64, n: usize) -> (Vec<DemoEvent>, Oracle) {
    let events = Generator::new(DemoConfig {
        seed,
        users: 80,
        tribes: 5,
        hot_share: 0.3,
    })
    .take(n);
    let mut oracle = Oracle::new();
    oracle.apply_demo(&events, PARTITIONS);
    (events, oracle)
}

/// Follows a search's cursors to the end: every hit, in order.
async fn all_hits(app: &Router, uri: &str) -> Vec<Value> {
    common::follow_cursors(uri, |page| async move { get(app, &page).await })
        .await
        .unwrap()
}

fn keys(hits: &[Value]) -> Vec<String> {
    hits.iter()
        .map(|h| h["key"].as_str().unwrap().to_owned())
        .collect()
}

/// Filters, sort, pagination and full-text matches equal what the oracle says.
async fn search_matches_the_oracle(es: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (r, app) = start(&config(dir.path(), es, 500)).await;
    let (events, oracle) = demo(21, 2500);
    let pos = ingest(&app, &events).await;
    let after = format!("after={pos}&wait_ms=60000");

    let posts: Vec<(String, Value)> = oracle
        .post_doc_ids()
        .into_iter()
        .map(|k| {
            let d = oracle.post_doc(&k).unwrap();
            (k, d)
        })
        .collect();
    let tribes: BTreeSet<String> = posts
        .iter()
        .filter_map(|(_, d)| d["tribe_id"].as_str().map(str::to_owned))
        .collect();
    assert!(tribes.len() >= 3, "the demo must spread posts over tribes");
    for tribe in tribes.iter().take(3) {
        // A keyword filter, sorted by likes (most first, then key), 7 per page.
        let hits = all_hits(
            &app,
            &format!("/views/posts?tribe_id={tribe}&sort=-likes&limit=7&{after}"),
        )
        .await;
        // Posts whose likes were never touched have no `likes` field: last.
        let likes_of = |k: &str| oracle.post_field(k, "likes").and_then(|v| v.as_i64());
        let in_tribe: Vec<String> = posts
            .iter()
            .filter(|(_, d)| d["tribe_id"] == json!(tribe))
            .map(|(k, _)| k.clone())
            .collect();
        let ordered = |desc: bool| {
            let mut v = in_tribe.clone();
            v.sort_by(|a, b| {
                let (la, lb) = (likes_of(a), likes_of(b));
                let by_value = match (la, lb) {
                    (Some(x), Some(y)) if desc => y.cmp(&x),
                    (Some(x), Some(y)) => x.cmp(&y),
                    (Some(_), None) => std::cmp::Ordering::Less,
                    (None, Some(_)) => std::cmp::Ordering::Greater,
                    (None, None) => std::cmp::Ordering::Equal,
                };
                by_value.then_with(|| a.cmp(b))
            });
            v
        };
        let want_keys = ordered(true);
        assert!(want_keys.len() > 7, "several pages for {tribe}");
        assert!(
            in_tribe.iter().any(|k| likes_of(k).is_none()),
            "some posts of {tribe} without likes, to check they come last"
        );
        assert_eq!(keys(&hits), want_keys, "posts of {tribe} by -likes");
        for h in &hits {
            assert_eq!(
                h["doc"],
                oracle.post_doc(h["key"].as_str().unwrap()).unwrap()
            );
        }
        // Ascending, and a numeric filter on top.
        let hits = all_hits(
            &app,
            &format!("/views/posts?tribe_id={tribe}&sort=likes&limit=5&{after}"),
        )
        .await;
        assert_eq!(keys(&hits), ordered(false));
        let likes = likes_of(&want_keys[0]).unwrap();
        let hits = all_hits(
            &app,
            &format!("/views/posts?tribe_id={tribe}&likes={likes}&{after}"),
        )
        .await;
        let exact: Vec<String> = in_tribe
            .iter()
            .filter(|k| likes_of(k) == Some(likes))
            .cloned()
            .collect();
        assert_eq!(keys(&hits), exact, "likes={likes} in {tribe}");
        // An array field: the members of the tribe.
        let hits = all_hits(
            &app,
            &format!("/views/users?tribes={tribe}&limit=9&{after}"),
        )
        .await;
        let members: Vec<String> = oracle
            .user_ids()
            .into_iter()
            .filter(|u| {
                oracle.user_doc(u).unwrap()["tribes"]
                    .as_array()
                    .unwrap()
                    .contains(&json!(tribe))
            })
            .collect();
        assert!(!members.is_empty());
        assert_eq!(keys(&hits), members, "members of {tribe}");
    }

    // Full text: the hits of a word are exactly the posts holding it, best first.
    let word = ["rust", "engine", "road", "car", "the"]
        .into_iter()
        .map(|w| (w, oracle.posts_with_word(w)))
        .find(|(_, set)| set.len() > 3)
        .map(|(w, _)| w)
        .unwrap_or_else(|| {
            let (_, d) = &posts[0];
            let t = d["title"].as_str().unwrap();
            Box::leak(
                t.split_whitespace()
                    .next()
                    .unwrap()
                    .to_lowercase()
                    .into_boxed_str(),
            )
        });
    let want = oracle.posts_with_word(word);
    let (st, first) = get(&app, &format!("/views/posts?q={word}&limit=4&{after}")).await;
    assert_eq!(st, 200, "{first}");
    assert_eq!(first["total"], want.len(), "total of q={word}");
    let hits = all_hits(&app, &format!("/views/posts?q={word}&limit=4&{after}")).await;
    let got: BTreeSet<String> = keys(&hits).into_iter().collect();
    assert_eq!(got, want, "posts holding {word:?}");
    assert_eq!(hits.len(), want.len(), "no hit twice across pages");
    let scores: Vec<f64> = hits.iter().map(|h| h["score"].as_f64().unwrap()).collect();
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]),
        "best first: {scores:?}"
    );

    // Input that is not a valid search is refused by name; nothing reaches the store.
    for (uri, field) in [
        ("/views/posts?query=%7B%22match_all%22%3A%7B%7D%7D", "query"),
        ("/views/posts?title=x", "title"),
        ("/views/posts?likes=many", "likes"),
        ("/views/posts?sort=body", "sort"),
        ("/views/posts?limit=100000", "limit"),
        ("/views/posts?cursor=00", "cursor"),
        ("/views/post_stats?q=x", "projection"),
    ] {
        let (st, b) = get(&app, uri).await;
        assert_eq!(
            (st, &b["error"]["field"]),
            (422, &json!(field)),
            "{uri}: {b}"
        );
    }
    let (st, _) = get(&app, "/views/nope?q=x").await;
    assert_eq!(st, 404);
    r.stop().await;
}

#[tokio::test]
async fn embedded_search_matches_the_oracle() {
    search_matches_the_oracle(false).await;
}

#[tokio::test]
async fn elasticsearch_search_matches_the_oracle() {
    search_matches_the_oracle(true).await;
}

/// A post matching more of the words ranks above one matching fewer; posts
/// matching none are not hits.
async fn relevance_orders_hits(es: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (r, app) = start(&config(dir.path(), es, 100)).await;
    let post = |id: &str, title: &str, body: &str| {
        json!({"stream": format!("post-{id}"), "type": "PostPublished", "data": {
            "post_id": id, "tribe_id": "t1", "author_id": "u1", "title": title, "body": body}})
        .to_string()
    };
    let body = [
        post("a", "rust async guide", "a long read"),
        post("b", "rust cooking guide", "a long read"),
        post("c", "python packaging guide", "a long read"),
        post("d", "gardening notes today", "async rust and more rust"),
    ]
    .join("\n");
    let (st, b) = post_ndjson(&app, body).await;
    assert_eq!(st, 200, "{b}");
    let after = format!("after={}&wait_ms=30000", b["position"].as_str().unwrap());
    let (st, b) = get(&app, &format!("/views/posts?q=rust%20async&{after}")).await;
    assert_eq!(st, 200, "{b}");
    let got = keys(b["hits"].as_array().unwrap());
    assert_eq!(b["total"], 3, "{b}");
    assert_eq!(got.len(), 3, "{b}");
    assert!(
        !got.contains(&"c".to_string()),
        "c matches no word: {got:?}"
    );
    let rank = |k: &str| got.iter().position(|g| g == k).unwrap();
    assert!(rank("a") < rank("b"), "both words beat one word: {got:?}");
    assert!(rank("d") < rank("b"), "both words beat one word: {got:?}");
    r.stop().await;
}

async fn post_ndjson(app: &Router, body: String) -> (u16, Value) {
    post(app, "/events", body).await
}

#[tokio::test]
async fn embedded_relevance_orders_hits() {
    relevance_orders_hits(false).await;
}

#[tokio::test]
async fn elasticsearch_relevance_orders_hits() {
    relevance_orders_hits(true).await;
}

/// `GET /streams/{s}/events` pages through a stream, oldest first, from any
/// version, with `after` for read-your-writes; switched off, it is a clear 404.
async fn stream_history_pages_through_a_stream(es: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (r, app) = start(&config(dir.path(), es, 50)).await;
    let events: Vec<Value> = (0..230)
        .map(|i| {
            json!({"type": "PostViewed", "data": {"post_id": "h1", "user_id": format!("u{i}")},
                        "metadata": {"n": i}})
        })
        .collect();
    let mut pos = Position::default();
    for chunk in events.chunks(100) {
        let r = common::call(
            &app,
            "POST",
            "/streams/post-h1/events",
            "application/json",
            json!({ "events": chunk }).to_string(),
        )
        .await;
        assert_eq!(r.status.as_u16(), 201, "{}", r.body);
        pos.merge(&r.body["position"].as_str().unwrap().parse().unwrap());
    }
    // Another stream's events never show.
    let (st, _) = post_ndjson(
        &app,
        json!({"stream": "post-h2", "type": "PostViewed", "data": {"post_id": "h2", "user_id": "x"}}).to_string(),
    )
    .await;
    assert_eq!(st, 200);
    let mut seen = Vec::new();
    let mut from = Some(1u64);
    while let Some(f) = from {
        let (st, b) = get(
            &app,
            &format!("/streams/post-h1/events?from={f}&limit=100&after={pos}"),
        )
        .await;
        assert_eq!(st, 200, "{b}");
        assert_eq!(b["stream"], "post-h1");
        for e in b["events"].as_array().unwrap() {
            seen.push(e.clone());
        }
        from = b["next"].as_u64();
    }
    let versions: Vec<u64> = seen
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, (1..=230).collect::<Vec<_>>());
    for (i, e) in seen.iter().enumerate() {
        assert_eq!(e["stream"], "post-h1");
        assert_eq!(e["type"], "PostViewed");
        assert_eq!(e["data"], events[i]["data"], "event {i}");
        assert_eq!(e["metadata"], events[i]["metadata"], "event {i}");
        assert!(e["id"].is_string() && e["recorded_at"].is_string(), "{e}");
    }
    let (st, b) = get(
        &app,
        &format!("/streams/post-h1/events?from=229&after={pos}"),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(b["events"].as_array().unwrap().len(), 2);
    assert_eq!(b["next"], Value::Null);
    for uri in [
        "/streams/post-h1/events?from=x",
        "/streams/post-h1/events?limit=5000",
        "/streams/post-h1/events?since=1",
        "/streams/bad%20name/events",
    ] {
        let (st, b) = get(&app, uri).await;
        assert_eq!(st, 422, "{uri}: {b}");
    }
    r.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let off = Config {
        stream_history: false,
        ..config(dir.path(), es, 50)
    };
    let (r, app) = start(&off).await;
    let (st, b) = get(&app, "/streams/post-h1/events").await;
    assert_eq!(st, 404, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--stream-history"),
        "{b}"
    );
    r.stop().await;
}

#[tokio::test]
async fn embedded_stream_history_pages_through_a_stream() {
    stream_history_pages_through_a_stream(false).await;
}

#[tokio::test]
async fn elasticsearch_stream_history_pages_through_a_stream() {
    stream_history_pages_through_a_stream(true).await;
}

/// I7 on documents: while `posts` is rebuilt into a new index, queries and
/// searches keep answering from the complete old one; the switch moves the alias;
/// events arriving meanwhile are not lost; the old index is removed.
async fn replay_under_load_switches_generations(es: bool) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), es, 100);
    let (r, app) = start(&cfg).await;
    let (events, mut oracle) = demo(22, 4000);
    let pos = ingest(&app, &events).await;
    let after = format!("after={pos}&wait_ms=60000");
    let watched: Vec<(String, Value)> = oracle
        .post_doc_ids()
        .into_iter()
        .take(15)
        .map(|k| {
            let d = oracle.post_doc(&k).unwrap();
            (k, d)
        })
        .collect();
    let tribe = watched[0].1["tribe_id"].as_str().unwrap().to_owned();
    let in_tribe = oracle
        .post_doc_ids()
        .iter()
        .filter(|k| oracle.post_doc(k).unwrap()["tribe_id"] == json!(tribe))
        .count();
    for (k, want) in &watched {
        let (st, got) = get(&app, &format!("/views/posts/{k}?{after}")).await;
        assert_eq!((st, &got), (200, want));
    }
    let watched = Arc::new(watched);
    let done = Arc::new(AtomicBool::new(false));
    let queries = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for i in 0..3 {
        let (app, watched, done, queries, tribe) = (
            app.clone(),
            watched.clone(),
            done.clone(),
            queries.clone(),
            tribe.clone(),
        );
        readers.push(tokio::spawn(async move {
            let mut n = i;
            while !done.load(Ordering::SeqCst) {
                let (k, want) = &watched[n % watched.len()];
                n += 1;
                let (st, got) = get(&app, &format!("/views/posts/{k}")).await;
                assert_eq!(
                    (st, &got),
                    (200, want),
                    "{k}: failed or half-built during the replay"
                );
                let (st, b) = get(&app, &format!("/views/posts?tribe_id={tribe}&limit=1")).await;
                assert_eq!(st, 200, "{b}");
                assert_eq!(
                    b["total"], in_tribe,
                    "a half-built index answered a search: {b}"
                );
                queries.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    let (st, b) = post(&app, "/projections/posts/replay", String::new()).await;
    assert_eq!(st, 202, "{b}");
    // New posts in a new tribe arrive during the replay.
    let fresh = common::fresh_posts(200);
    oracle.apply_demo(&fresh, PARTITIONS);
    let mut pos = pos;
    for chunk in fresh.chunks(20) {
        pos.merge(&ingest(&app, chunk).await);
    }
    common::eventually(120, "the replay to switch", || {
        let app = app.clone();
        async move {
            let (_, s) = get(&app, "/projections/posts").await;
            (s["generation"] == 2 && s["replay"].is_null()).then_some(())
        }
    })
    .await;
    done.store(true, Ordering::SeqCst);
    for t in readers {
        t.await.unwrap();
    }
    assert!(
        queries.load(Ordering::SeqCst) > 10,
        "too few queries during the replay"
    );
    let after = format!("after={pos}&wait_ms=60000");
    for k in oracle.post_doc_ids() {
        let (st, got) = get(&app, &format!("/views/posts/{k}?{after}")).await;
        assert_eq!((st, got), (200, oracle.post_doc(&k).unwrap()), "{k}");
    }
    let (_, b) = get(
        &app,
        &format!("/views/posts?tribe_id=tfresh&limit=1&{after}"),
    )
    .await;
    assert_eq!(b["total"], 200, "{b}");
    if es {
        // The alias names the new generation's index, and only it; the old index goes.
        let base = common::elasticsearch_url();
        let ns = cfg.topic_prefix.to_lowercase();
        let http = reqwest::Client::new();
        let alias: Value = http
            .get(format!("{base}/_alias/{ns}posts"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let indices: Vec<&String> = alias.as_object().unwrap().keys().collect();
        assert_eq!(indices, vec![&format!("{ns}posts-g2")], "{alias}");
        common::eventually(60, "the old index to be deleted", || {
            let (http, url) = (http.clone(), format!("{base}/{ns}posts-g1"));
            async move {
                let st = http.head(&url).send().await.unwrap().status().as_u16();
                (st == 404).then_some(())
            }
        })
        .await;
    }
    r.stop().await;
}

#[tokio::test]
async fn embedded_replay_under_load_switches_generations() {
    replay_under_load_switches_generations(false).await;
}

#[tokio::test]
async fn elasticsearch_replay_under_load_switches_the_alias() {
    replay_under_load_switches_generations(true).await;
}
