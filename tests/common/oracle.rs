//! An independent in-memory fold of the demo read models, to check what refold's
//! projections produced.
//!
//! Written directly in plain Rust from the semantics in DESIGN.md ("Demo domain"),
//! deliberately without `refold::projection`: a bug in the projection engine must
//! not be mirrored here. Feed it the events in log order per partition (partitions
//! may be interleaved in any way), with the partition each event is in.
//!
//! Covered: `post_stats` (document per post, exact counts), the `top_posts:{tribe_id}`
//! rankings, `tribe_feed` (via [`Oracle::tribe_posts`] and [`check_feed`]), and the
//! document models `posts` and `users`, and which posts contain a word.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{Value, json};

/// How many post ids a `tribe_feed` list keeps (newest first).
pub const FEED_CAP: usize = 100;

#[derive(Debug, Default, Clone)]
struct PostStats {
    likes: i64,
    views: u64,
    comments: u64,
    viewers: BTreeSet<String>,
    /// From the post's (latest) PostPublished.
    tribe_id: Option<String>,
}

/// The expected demo read models after the events applied so far.
#[derive(Debug, Default, Clone)]
pub struct Oracle {
    posts: BTreeMap<String, PostStats>,
    /// Ranking name suffix (tribe id) -> member (post id) -> score.
    rankings: BTreeMap<String, BTreeMap<String, f64>>,
    /// Tribe id -> PostPublished of that tribe, in the order applied.
    tribe_posts: BTreeMap<String, Vec<(u32, String)>>,
    /// Every tribe id seen in TribeCreated, UserJoinedTribe or PostPublished.
    tribes: BTreeSet<String>,
    /// Likes/unlikes of a post with no tribe yet (no PostPublished before them):
    /// no `top_posts:{tribe_id}` ranking can be named for them, so `post_stats`
    /// applies none of their operations and records each as a dead letter.
    unranked: u64,
    /// `posts` documents: post id -> fields.
    post_docs: BTreeMap<String, serde_json::Map<String, Value>>,
    /// `users` documents: user id -> (name, tribes joined).
    users: BTreeMap<String, (Option<String>, BTreeSet<String>)>,
}

/// A string field of `data`; numbers are accepted and rendered as in JSON.
fn field(data: &Value, name: &str) -> Option<String> {
    match data.get(name)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl Oracle {
    pub fn new() -> Self {
        Self::default()
    }

    /// Folds one event. `partition` is the log partition it was read from (or
    /// will land in); events of other types or without the fields used here are
    /// ignored, as the demo projections do not handle them.
    pub fn apply(&mut self, partition: u32, stream: &str, event_type: &str, data: &Value) {
        let _ = stream; // keys come from `data`, like the projections' `key = "data.*"`
        self.apply_documents(event_type, data);
        match event_type {
            "TribeCreated" | "UserJoinedTribe" => {
                if let Some(t) = field(data, "tribe_id") {
                    self.tribes.insert(t);
                }
            }
            "PostPublished" | "PostLiked" | "PostUnliked" | "PostViewed" | "CommentAdded" => {
                let Some(post_id) = field(data, "post_id") else {
                    return;
                };
                let tribe = self.posts.get(&post_id).and_then(|p| p.tribe_id.as_ref());
                if matches!(event_type, "PostLiked" | "PostUnliked") && tribe.is_none() {
                    // No ranking can be named: the whole event is a dead letter of
                    // `post_stats`, its like not counted either.
                    self.unranked += 1;
                    return;
                }
                let post = self.posts.entry(post_id.clone()).or_default();
                match event_type {
                    "PostPublished" => {
                        if let Some(t) = field(data, "tribe_id") {
                            post.tribe_id = Some(t.clone());
                            self.tribes.insert(t.clone());
                            self.tribe_posts
                                .entry(t)
                                .or_default()
                                .push((partition, post_id));
                        }
                    }
                    "PostLiked" | "PostUnliked" => {
                        let delta = if event_type == "PostLiked" { 1 } else { -1 };
                        post.likes += delta;
                        let tribe = post.tribe_id.clone().expect("checked above");
                        *self
                            .rankings
                            .entry(tribe)
                            .or_default()
                            .entry(post_id)
                            .or_insert(0.0) += delta as f64;
                    }
                    "PostViewed" => {
                        post.views += 1;
                        if let Some(u) = field(data, "user_id") {
                            post.viewers.insert(u);
                        }
                    }
                    _ => post.comments += 1,
                }
            }
            _ => {}
        }
    }

    /// The `post_stats` document of a post: `{"likes", "views", "comments",
    /// "unique_viewers", "tribe_id"}` (numbers; `tribe_id` from its PostPublished,
    /// null before it), or `None` if no event of `post_stats` concerned it.
    /// `unique_viewers` is exact here; refold's may be approximate (HyperLogLog).
    pub fn post_stats(&self, post_id: &str) -> Option<Value> {
        let p = self.posts.get(post_id)?;
        Some(json!({
            "likes": p.likes,
            "views": p.views,
            "comments": p.comments,
            "unique_viewers": p.viewers.len(),
            "tribe_id": p.tribe_id,
        }))
    }

    /// Folds demo events in the order given, each in the partition refold puts
    /// its stream in (of `partitions`).
    pub fn apply_demo(&mut self, events: &[refold::demo::DemoEvent], partitions: u32) {
        for e in events {
            let p = refold::log::partition_for(&e.stream, partitions);
            self.apply(p, &e.stream, &e.event_type, &e.data);
        }
    }

    /// The `posts` and `users` document models.
    fn apply_documents(&mut self, event_type: &str, data: &Value) {
        match event_type {
            "PostPublished" | "PostLiked" | "PostUnliked" | "CommentAdded" => {
                let Some(post_id) = field(data, "post_id") else {
                    return;
                };
                let doc = self.post_docs.entry(post_id).or_default();
                let mut add = |f: &str, by: i64| {
                    let n = doc.get(f).and_then(Value::as_i64).unwrap_or(0);
                    doc.insert(f.into(), json!(n + by));
                };
                match event_type {
                    "PostLiked" => add("likes", 1),
                    "PostUnliked" => add("likes", -1),
                    "CommentAdded" => add("comments", 1),
                    _ => {
                        for f in ["post_id", "title", "body", "author_id", "tribe_id"] {
                            doc.insert(f.into(), data.get(f).cloned().unwrap_or(Value::Null));
                        }
                    }
                }
            }
            "UserRegistered" => {
                if let Some(u) = field(data, "user_id") {
                    self.users.entry(u).or_default().0 = field(data, "name");
                }
            }
            "UserJoinedTribe" => {
                if let (Some(u), Some(t)) = (field(data, "user_id"), field(data, "tribe_id")) {
                    self.users.entry(u).or_default().1.insert(t);
                }
            }
            _ => {}
        }
    }

    /// The `posts` document of a post, as `GET /views/posts/{id}` renders it
    /// (counters read 0 until touched), or `None`.
    pub fn post_doc(&self, post_id: &str) -> Option<Value> {
        let mut doc = self.post_docs.get(post_id)?.clone();
        for f in ["likes", "comments"] {
            doc.entry(f).or_insert(json!(0));
        }
        Some(Value::Object(doc))
    }

    /// A field of a `posts` document as stored: `None` when no event wrote it
    /// (searches sort such documents last).
    pub fn post_field(&self, post_id: &str, field: &str) -> Option<Value> {
        self.post_docs.get(post_id)?.get(field).cloned()
    }

    /// Every post id with a `posts` document, sorted.
    pub fn post_doc_ids(&self) -> Vec<String> {
        self.post_docs.keys().cloned().collect()
    }

    /// The `users` document of a user: `{"user_id", "name", "tribes"}` (tribes
    /// sorted; `user_id` and `name` only once registered), or `None`.
    pub fn user_doc(&self, user_id: &str) -> Option<Value> {
        let (name, tribes) = self.users.get(user_id)?;
        let mut doc = json!({ "tribes": tribes });
        if let Some(n) = name {
            doc["user_id"] = json!(user_id);
            doc["name"] = json!(n);
        }
        Some(doc)
    }

    pub fn user_ids(&self) -> Vec<String> {
        self.users.keys().cloned().collect()
    }

    /// Posts whose title or body holds `word` (lowercase; words are split at
    /// anything but letters and digits, as both search stores' analyzers do).
    pub fn posts_with_word(&self, word: &str) -> BTreeSet<String> {
        let has = |v: Option<&Value>| {
            v.and_then(Value::as_str).is_some_and(|t| {
                t.split(|c: char| !c.is_alphanumeric())
                    .any(|w| w.to_lowercase() == word)
            })
        };
        self.post_docs
            .iter()
            .filter(|(_, d)| has(d.get("title")) || has(d.get("body")))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Every post id with a `post_stats` document, sorted.
    pub fn post_ids(&self) -> Vec<String> {
        self.posts.keys().cloned().collect()
    }

    /// Ranking `top_posts:{tribe_id}`: every post of the tribe that had at least one
    /// PostLiked/PostUnliked after its PostPublished, scored by those net likes
    /// (members at 0 stay, as with Redis ZINCRBY); sorted by score descending, ties
    /// by member descending (Redis ZREVRANGE order).
    pub fn top_posts(&self, tribe_id: &str) -> Vec<(String, f64)> {
        let mut v: Vec<(String, f64)> = self
            .rankings
            .get(tribe_id)
            .map(|r| r.iter().map(|(m, s)| (m.clone(), *s)).collect())
            .unwrap_or_default();
        v.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
        v
    }

    /// Every tribe id seen (TribeCreated, UserJoinedTribe, PostPublished), sorted.
    /// Tribes without posts have an empty feed and no ranking.
    pub fn tribe_ids(&self) -> Vec<String> {
        self.tribes.iter().cloned().collect()
    }

    /// The PostPublished of a tribe as `(partition, post_id)`, in the order applied
    /// (so in log order within each partition). The order across partitions is not
    /// determined by the log: see [`check_feed`].
    pub fn tribe_posts(&self, tribe_id: &str) -> Vec<(u32, String)> {
        self.tribe_posts.get(tribe_id).cloned().unwrap_or_default()
    }

    /// Likes and unlikes that arrived before their post's PostPublished (no ranking
    /// can be named for them): dead letters of `post_stats`. 0 for the demo
    /// generator's events in order; concurrent clients can reorder them.
    pub fn unranked(&self) -> u64 {
        self.unranked
    }
}

/// Checks a `tribe_feed` list (newest first) against the oracle:
/// - its length is `min(n, 100)` for the tribe's `n` PostPublished;
/// - per partition, the feed's posts of that partition are the newest of that
///   partition, newest first (a prefix of its reverse log order). With `n <= 100`
///   that means the whole partition, so the feed holds exactly the tribe's posts.
///
/// Any interleaving of partitions passes: a projection applies partitions
/// independently, so their relative order is not determined by the log.
pub fn check_feed(oracle: &Oracle, tribe_id: &str, feed: &[String]) -> Result<(), String> {
    let posts = oracle.tribe_posts(tribe_id);
    let want_len = posts.len().min(FEED_CAP);
    if feed.len() != want_len {
        return Err(format!(
            "tribe_feed {tribe_id}: {} posts, want {want_len} ({} published): {feed:?}",
            feed.len(),
            posts.len()
        ));
    }
    // Newest first per partition, and which partition each post is in (a post's
    // stream lives in one partition).
    let mut newest_first: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
    let mut partition_of: HashMap<&str, u32> = HashMap::new();
    for (p, post) in posts.iter().rev() {
        newest_first.entry(*p).or_default().push(post);
        partition_of.insert(post, *p);
    }
    let mut seen: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
    for (i, post) in feed.iter().enumerate() {
        let Some(&p) = partition_of.get(post.as_str()) else {
            return Err(format!(
                "tribe_feed {tribe_id}: [{i}] {post:?} is not a post published in this tribe: {feed:?}"
            ));
        };
        seen.entry(p).or_default().push(post);
    }
    for (p, got) in &seen {
        let want = &newest_first[p][..got.len().min(newest_first[p].len())];
        if got.len() > newest_first[p].len() || got[..] != want[..] {
            return Err(format!(
                "tribe_feed {tribe_id}: partition {p}: feed has {got:?}, want the newest of {:?} in that order",
                newest_first[p]
            ));
        }
    }
    if posts.len() <= FEED_CAP {
        for (p, want) in &newest_first {
            let got = seen.get(p).map_or(0, Vec::len);
            if got != want.len() {
                return Err(format!(
                    "tribe_feed {tribe_id}: partition {p}: {got} of its {} posts in the feed: {feed:?}",
                    want.len()
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(o: &mut Oracle, partition: u32, t: &str, data: Value) {
        let stream = format!("post-{}", data["post_id"].as_str().unwrap());
        o.apply(partition, &stream, t, &data);
    }

    #[test]
    fn folds_stats_rankings_and_feeds() {
        let mut o = Oracle::new();
        o.apply(
            0,
            "tribe-t1",
            "TribeCreated",
            &json!({"tribe_id": "t1", "name": "x"}),
        );
        post(
            &mut o,
            1,
            "PostLiked",
            json!({"post_id": "p0", "user_id": "u1"}),
        );
        for (p, id) in [(1, "p1"), (2, "p2"), (1, "p3")] {
            post(
                &mut o,
                p,
                "PostPublished",
                json!({"post_id": id, "tribe_id": "t1", "author_id": "u1", "title": "a", "body": "b"}),
            );
        }
        for u in ["u1", "u2", "u1"] {
            post(
                &mut o,
                1,
                "PostViewed",
                json!({"post_id": "p1", "user_id": u}),
            );
        }
        post(
            &mut o,
            1,
            "PostLiked",
            json!({"post_id": "p1", "user_id": "u1"}),
        );
        post(
            &mut o,
            1,
            "PostLiked",
            json!({"post_id": "p3", "user_id": "u1"}),
        );
        post(
            &mut o,
            1,
            "PostUnliked",
            json!({"post_id": "p3", "user_id": "u1"}),
        );
        post(
            &mut o,
            2,
            "PostLiked",
            json!({"post_id": "p2", "user_id": "u1"}),
        );
        post(
            &mut o,
            2,
            "CommentAdded",
            json!({"post_id": "p2", "comment_id": "c1", "user_id": "u1", "text": "hi"}),
        );
        assert_eq!(
            o.post_stats("p1").unwrap(),
            json!({"likes": 1, "views": 3, "comments": 0, "unique_viewers": 2, "tribe_id": "t1"})
        );
        // Liked before it was published: a dead letter, nothing applied.
        assert!(o.post_stats("p0").is_none());
        assert_eq!(o.post_stats("p2").unwrap()["comments"], 1);
        assert!(o.post_stats("p9").is_none());
        assert_eq!(o.post_ids(), ["p1", "p2", "p3"]);
        assert_eq!(o.unranked(), 1);
        assert_eq!(
            o.top_posts("t1"),
            [("p2".into(), 1.0), ("p1".into(), 1.0), ("p3".into(), 0.0)]
        );
        assert_eq!(o.tribe_ids(), ["t1"]);

        let f = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // Partition 1 has p1 then p3, partition 2 has p2: any interleaving of
        // [p3, p1] and [p2] passes.
        for ok in [
            &["p3", "p1", "p2"][..],
            &["p2", "p3", "p1"],
            &["p3", "p2", "p1"],
        ] {
            check_feed(&o, "t1", &f(ok)).unwrap();
        }
        for bad in [
            &["p1", "p3", "p2"][..],
            &["p3", "p1"],
            &["p3", "p1", "p2", "p2"],
            &["p3", "p1", "p9"],
        ] {
            assert!(check_feed(&o, "t1", &f(bad)).is_err(), "{bad:?}");
        }
        check_feed(&o, "t2", &[]).unwrap();
    }

    #[test]
    fn feed_is_capped_at_100() {
        let mut o = Oracle::new();
        for i in 0..150 {
            let data = json!({"post_id": format!("p{i}"), "tribe_id": "t1", "author_id": "u1", "title": "a", "body": "b"});
            post(&mut o, i % 2, "PostPublished", data);
        }
        // Newest 100 by global order, and also a skewed interleaving: 60 of
        // partition 0 and 40 of partition 1.
        let global: Vec<String> = (50..150).rev().map(|i| format!("p{i}")).collect();
        check_feed(&o, "t1", &global).unwrap();
        let mut skewed: Vec<String> = (0..150)
            .rev()
            .filter(|i| i % 2 == 0)
            .take(60)
            .map(|i| format!("p{i}"))
            .collect();
        skewed.extend(
            (0..150)
                .rev()
                .filter(|i| i % 2 == 1)
                .take(40)
                .map(|i| format!("p{i}")),
        );
        check_feed(&o, "t1", &skewed).unwrap();
        // A gap inside a partition is wrong.
        let mut gap = global.clone();
        gap.remove(0);
        gap.push("p0".into());
        assert!(check_feed(&o, "t1", &gap).is_err());
    }
}
