//! The demo read models as refold serves them, compared with the oracle over the
//! HTTP API: shared by the projection tests and the fault harness.

use axum::Router;
use serde_json::Value;

use super::oracle::{Oracle, check_feed};

/// The service under test: in process (router) or a spawned binary (socket).
#[derive(Clone)]
pub enum Api {
    Local(Router),
    Remote(reqwest::Client, String),
}

impl Api {
    pub async fn send(
        &self,
        method: &str,
        uri: &str,
        content_type: &str,
        body: String,
    ) -> (u16, Value) {
        match self {
            Api::Local(app) => {
                let r = super::call(app, method, uri, content_type, body).await;
                (r.status.as_u16(), r.body)
            }
            Api::Remote(client, base) => {
                let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
                let r = client
                    .request(m, format!("{base}{uri}"))
                    .header("content-type", content_type)
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let text = r.text().await.unwrap();
                (
                    status,
                    serde_json::from_str(&text).unwrap_or(Value::String(text)),
                )
            }
        }
    }

    /// Appends one event to `stream`, which must be accepted (201); its position
    /// token.
    pub async fn append(&self, stream: &str, event: &Value) -> String {
        let uri = format!("/streams/{stream}/events");
        let (st, b) = self
            .send("POST", &uri, "application/json", event.to_string())
            .await;
        assert_eq!(st, 201, "{uri}: {b}");
        b["position"].as_str().unwrap().to_owned()
    }

    pub async fn get(&self, uri: &str) -> (u16, Value) {
        self.without_body("GET", uri).await
    }

    pub async fn without_body(&self, method: &str, uri: &str) -> (u16, Value) {
        self.send(method, uri, "application/json", String::new())
            .await
    }
}

/// How the read models differ from the oracle.
#[derive(Debug, Default)]
pub struct Diffs {
    /// A counter or ranking score above the oracle's: an event applied twice.
    pub over: Vec<String>,
    /// Anything else: missing or wrong values, keys, lists; failed queries.
    pub other: Vec<String>,
}

impl Diffs {
    pub fn is_empty(&self) -> bool {
        self.over.is_empty() && self.other.is_empty()
    }

    /// The first difference, if any.
    pub fn first(&self) -> Result<(), String> {
        match self.over.first().or(self.other.first()) {
            Some(d) => Err(format!(
                "{d} ({} over-counted, {} other differences)",
                self.over.len(),
                self.other.len()
            )),
            None => Ok(()),
        }
    }

    /// Files a mismatch of counter `what`: over-counted when `got > want`.
    fn counter(&mut self, what: String, got: &Value, want: &Value) {
        match (got.as_f64(), want.as_f64()) {
            (Some(g), Some(w)) if g > w => self.over.push(what),
            _ => self.other.push(what),
        }
    }
}

/// Every read model of the demo equals the oracle once `after` is applied.
/// `approx`: unique_viewers comes from a HyperLogLog (Redis).
pub async fn check_models(
    api: &Api,
    oracle: &Oracle,
    after: &refold::position::Position,
    approx: bool,
) -> Result<(), String> {
    model_diffs(api, oracle, after, approx).await.first()
}

/// Every difference between the demo read models and the oracle, once `after` is
/// applied (queries wait up to 60 s for it).
pub async fn model_diffs(
    api: &Api,
    oracle: &Oracle,
    after: &refold::position::Position,
    approx: bool,
) -> Diffs {
    let q = if after.is_empty() {
        "wait_ms=60000".to_owned()
    } else {
        format!("after={after}&wait_ms=60000")
    };
    let mut d = Diffs::default();
    for post in oracle.post_ids() {
        let want = oracle.post_stats(&post).unwrap();
        let (status, got) = api.get(&format!("/views/post_stats/{post}?{q}")).await;
        if status != 200 {
            d.other.push(format!("post_stats {post}: {status} {got}"));
            continue;
        }
        for f in ["likes", "views", "comments"] {
            if got[f] != want[f] {
                let what = format!("post_stats {post}.{f}: got {got}, want {want}");
                d.counter(what, &got[f], &want[f]);
            }
        }
        let tribe = got.get("tribe_id").cloned().unwrap_or(Value::Null);
        if tribe != want["tribe_id"] {
            d.other.push(format!(
                "post_stats {post}.tribe_id: got {got}, want {want}"
            ));
        }
        let (g, w) = (
            got["unique_viewers"].as_f64().unwrap_or(-1.0),
            want["unique_viewers"].as_f64().unwrap(),
        );
        let tolerance = if approx { (w * 0.02).max(1.0) } else { 0.0 };
        if (g - w).abs() > tolerance {
            d.other.push(format!(
                "post_stats {post}.unique_viewers: got {g}, want {w}"
            ));
        }
    }
    for tribe in oracle.tribe_ids() {
        ranking_diffs(api, oracle, &tribe, &q, &mut d).await;
        let (status, feed) = api.get(&format!("/views/tribe_feed/{tribe}?{q}")).await;
        match (status, oracle.tribe_posts(&tribe).is_empty()) {
            (404, true) => {}
            (200, false) => {
                let feed: Vec<String> =
                    serde_json::from_value(feed["posts"].clone()).unwrap_or_default();
                if let Err(e) = check_feed(oracle, &tribe, &feed) {
                    d.other.push(e);
                }
            }
            _ => d.other.push(format!("tribe_feed {tribe}: {status} {feed}")),
        }
    }
    document_diffs(api, oracle, &q, &mut d).await;
    d
}

async fn ranking_diffs(api: &Api, oracle: &Oracle, tribe: &str, q: &str, d: &mut Diffs) {
    let (status, got) = api
        .get(&format!(
            "/views/post_stats/rankings/top_posts:{tribe}?limit=1000&{q}"
        ))
        .await;
    let Some(members) = got["members"].as_array().filter(|_| status == 200) else {
        d.other.push(format!("ranking {tribe}: {status} {got}"));
        return;
    };
    let got: Vec<(String, f64)> = members
        .iter()
        .map(|m| {
            (
                m["member"].as_str().unwrap_or_default().to_owned(),
                m["score"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect();
    if got.windows(2).any(|w| w[0].1 < w[1].1) {
        d.other
            .push(format!("ranking {tribe} is not highest first: {got:?}"));
    }
    let want: std::collections::BTreeMap<String, f64> =
        oracle.top_posts(tribe).into_iter().collect();
    let got_map: std::collections::BTreeMap<String, f64> = got.iter().cloned().collect();
    for (member, w) in &want {
        match got_map.get(member) {
            Some(g) if g == w => {}
            Some(g) => d.counter(
                format!("ranking {tribe} member {member}: score {g}, want {w}"),
                &Value::from(*g),
                &Value::from(*w),
            ),
            None => d.other.push(format!(
                "ranking {tribe}: member {member} missing (want {w})"
            )),
        }
    }
    for member in got_map.keys().filter(|m| !want.contains_key(*m)) {
        d.other.push(format!(
            "ranking {tribe}: member {member} should not be there"
        ));
    }
}

/// The document models `posts` and `users` against the oracle, key by key, and
/// their listings against the oracle's keys.
async fn document_diffs(api: &Api, oracle: &Oracle, q: &str, d: &mut Diffs) {
    for post in oracle.post_doc_ids() {
        let want = oracle.post_doc(&post).unwrap();
        let (status, got) = api.get(&format!("/views/posts/{post}?{q}")).await;
        if (status, &got) == (200, &want) {
            continue;
        }
        let what = format!("posts {post}: got {status} {got}, want {want}");
        let over = status == 200
            && ["likes", "comments"]
                .iter()
                .any(|f| got[f].as_i64() > want[f].as_i64());
        if over {
            d.over.push(what);
        } else {
            d.other.push(what);
        }
    }
    for user in oracle.user_ids() {
        let want = oracle.user_doc(&user).unwrap();
        let (status, got) = api.get(&format!("/views/users/{user}?{q}")).await;
        if (status, &got) != (200, &want) {
            d.other
                .push(format!("users {user}: got {status} {got}, want {want}"));
        }
    }
    for (projection, want) in [
        ("posts", oracle.post_doc_ids()),
        ("users", oracle.user_ids()),
    ] {
        match list_keys(api, &format!("/views/{projection}?{q}&limit=100")).await {
            Ok(got) if got == want => {}
            Ok(got) => d.other.push(format!(
                "listing {projection}: {} keys, want {}",
                got.len(),
                want.len()
            )),
            Err(e) => d.other.push(e),
        }
    }
}

/// Every hit's key of a search, following its cursors to the end.
pub async fn list_keys(api: &Api, uri: &str) -> Result<Vec<String>, String> {
    let hits = super::follow_cursors(uri, |page| async move { api.get(&page).await }).await?;
    Ok(hits
        .iter()
        .map(|h| h["key"].as_str().unwrap_or_default().to_owned())
        .collect())
}
