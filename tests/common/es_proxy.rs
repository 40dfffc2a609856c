//! A fault-injecting HTTP proxy in front of the test Elasticsearch (osmem): it
//! forwards every request, except that `_bulk` requests can be made to fail in the
//! ways a loaded cluster fails them, and counts the faults it really injected.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::Response;
use serde_json::{Value, json};

/// Deletes every index whose name starts with `ns` (one by one: Elasticsearch 8
/// refuses wildcard deletes by default).
pub async fn es_remove_namespace(ns: &str) {
    let http = reqwest::Client::new();
    let base = super::elasticsearch_url();
    let rows: Value = http
        .get(format!("{base}/_cat/indices/{ns}*?format=json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap_or(Value::Null);
    for row in rows.as_array().cloned().unwrap_or_default() {
        if let Some(name) = row.get("index").and_then(Value::as_str) {
            let _ = http.delete(format!("{base}/{name}")).send().await;
        }
    }
}

/// What to do to one `_bulk` request.
#[derive(Debug, Clone)]
pub enum BulkFault {
    /// Answer the whole request with this status, without forwarding it.
    Reject(u16),
    /// Forward it, then report these items (positions in the request) as failed
    /// with `status`, although they were applied.
    FailAfter { items: Vec<usize>, status: u16 },
    /// Leave these items out of the forwarded request and report them as failed
    /// with `status` (they really were not applied). `usize::MAX` means every item.
    DropBefore { items: Vec<usize>, status: u16 },
    /// Hold the request this long, then forward it (an overloaded or paused node).
    Stall(std::time::Duration),
}

#[derive(Default)]
struct Plan {
    /// Faults for the next `_bulk` requests, one each, in order.
    queue: VecDeque<BulkFault>,
    /// The fault for every `_bulk` once the queue is empty.
    always: Option<BulkFault>,
    /// Only `_bulk` requests whose path contains this are touched.
    only: Option<String>,
    /// Only `_bulk` requests of at least this many actions are touched (so that a
    /// fault hits the first write of a batch, not the retry of a few items).
    min_items: usize,
}

struct Shared {
    upstream: String,
    http: reqwest::Client,
    plan: Mutex<Plan>,
    /// Requests rejected or stalled whole, plus items reported failed.
    injected: AtomicU64,
    /// `_bulk` requests seen (touched or not).
    bulks: AtomicU64,
    /// When set, requests without exactly this `Authorization` get 401.
    auth: Mutex<Option<String>>,
}

/// A running proxy; stops when dropped.
pub struct EsProxy {
    pub url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl EsProxy {
    pub async fn start(upstream: &str) -> Self {
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_owned(),
            http: reqwest::Client::new(),
            plan: Mutex::new(Plan::default()),
            injected: AtomicU64::new(0),
            bulks: AtomicU64::new(0),
            auth: Mutex::new(None),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { url, shared, task }
    }

    /// Queues a fault for the next (matching) `_bulk`.
    pub fn push(&self, fault: BulkFault) {
        self.shared.plan.lock().unwrap().queue.push_back(fault);
    }

    /// A fault for every (matching) `_bulk` once the queue is empty; `None`: none.
    pub fn always(&self, fault: Option<BulkFault>) {
        self.shared.plan.lock().unwrap().always = fault;
    }

    /// Touch only `_bulk` requests whose path contains `part`.
    pub fn only_paths_containing(&self, part: &str) {
        self.shared.plan.lock().unwrap().only = Some(part.to_owned());
    }

    /// Touch only `_bulk` requests of at least `n` actions.
    pub fn only_bulks_of_at_least(&self, n: usize) {
        self.shared.plan.lock().unwrap().min_items = n;
    }

    /// Faults really injected: whole requests rejected or stalled plus items
    /// reported failed.
    pub fn injected(&self) -> u64 {
        self.shared.injected.load(Ordering::SeqCst)
    }

    /// Faults still queued.
    pub fn queued(&self) -> usize {
        self.shared.plan.lock().unwrap().queue.len()
    }

    /// Answers 401, as a secured Elasticsearch does, to requests that do not
    /// carry exactly this `Authorization` header.
    pub fn require_authorization(&self, value: &str) {
        *self.shared.auth.lock().unwrap() = Some(value.to_owned());
    }

    pub fn bulks(&self) -> u64 {
        self.shared.bulks.load(Ordering::SeqCst)
    }
}

impl Drop for EsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    State(s): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let required = s.auth.lock().unwrap().clone();
    if let Some(required) = required
        && headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(required.as_str())
    {
        return json_response(
            401,
            &json!({"error": {"type": "security_exception", "reason": "missing authentication credentials"}, "status": 401}),
        );
    }
    let path = uri.path();
    if !path.ends_with("/_bulk") {
        return forward(&s, method, &uri, &headers, body).await;
    }
    s.bulks.fetch_add(1, Ordering::SeqCst);
    let actions = parse_bulk(&body);
    let fault = {
        let mut plan = s.plan.lock().unwrap();
        if plan.only.as_deref().is_some_and(|o| !path.contains(o)) || actions.len() < plan.min_items
        {
            None
        } else {
            plan.queue.pop_front().or_else(|| plan.always.clone())
        }
    };
    let Some(fault) = fault else {
        return forward(&s, method, &uri, &headers, body).await;
    };
    match fault {
        BulkFault::Stall(pause) => {
            s.injected.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(pause).await;
            forward(&s, method, &uri, &headers, body).await
        }
        BulkFault::Reject(status) => {
            s.injected.fetch_add(1, Ordering::SeqCst);
            json_response(
                status,
                &json!({"error": {"type": "injected", "reason": "rejected by the test proxy"}, "status": status}),
            )
        }
        BulkFault::FailAfter { items, status } => {
            let answer = forward(&s, method, &uri, &headers, body).await;
            if !answer.status().is_success() {
                return answer;
            }
            let bytes = axum::body::to_bytes(answer.into_body(), usize::MAX)
                .await
                .unwrap();
            let mut answer: Value = serde_json::from_slice(&bytes).unwrap();
            let list = answer["items"].as_array_mut().unwrap();
            for i in items {
                if let (Some(slot), Some(a)) = (list.get_mut(i), actions.get(i)) {
                    *slot = failed_item(a, status);
                    s.injected.fetch_add(1, Ordering::SeqCst);
                }
            }
            answer["errors"] = Value::Bool(true);
            json_response(200, &answer)
        }
        BulkFault::DropBefore { items, status } => {
            let dropped = |i: usize| items.contains(&i) || items.contains(&usize::MAX);
            let mut kept = String::new();
            for (i, a) in actions.iter().enumerate() {
                if !dropped(i) {
                    kept.push_str(&a.lines);
                }
            }
            let mut forwarded: VecDeque<Value> = VecDeque::new();
            if !kept.is_empty() {
                let answer = forward(&s, method, &uri, &headers, Bytes::from(kept)).await;
                if !answer.status().is_success() {
                    return answer;
                }
                let bytes = axum::body::to_bytes(answer.into_body(), usize::MAX)
                    .await
                    .unwrap();
                let answer: Value = serde_json::from_slice(&bytes).unwrap();
                forwarded = answer["items"].as_array().unwrap().clone().into();
            }
            let mut list = Vec::new();
            for (i, a) in actions.iter().enumerate() {
                if dropped(i) {
                    s.injected.fetch_add(1, Ordering::SeqCst);
                    list.push(failed_item(a, status));
                } else {
                    list.push(forwarded.pop_front().unwrap());
                }
            }
            json_response(200, &json!({"took": 1, "errors": true, "items": list}))
        }
    }
}

/// One action of a `_bulk` body: its name, id and its lines (with newlines).
struct Action {
    op: String,
    id: Value,
    lines: String,
}

fn parse_bulk(body: &[u8]) -> Vec<Action> {
    let text = std::str::from_utf8(body).unwrap();
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let mut out = Vec::new();
    while let Some(line) = lines.next() {
        let meta: Value = serde_json::from_str(line).unwrap();
        let (op, params) = meta.as_object().unwrap().iter().next().unwrap();
        let mut all = format!("{line}\n");
        if op != "delete" {
            all.push_str(lines.next().unwrap());
            all.push('\n');
        }
        out.push(Action {
            op: op.clone(),
            id: params.get("_id").cloned().unwrap_or(Value::Null),
            lines: all,
        });
    }
    out
}

fn failed_item(a: &Action, status: u16) -> Value {
    let kind = if status == 429 {
        "es_rejected_execution_exception"
    } else {
        "unavailable_shards_exception"
    };
    json!({ a.op.as_str(): {
        "_id": a.id,
        "status": status,
        "error": {"type": kind, "reason": "injected by the test proxy"}
    }})
}

fn json_response(status: u16, body: &Value) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

async fn forward(
    s: &Shared,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let target = format!(
        "{}{}",
        s.upstream,
        uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let mut req = s.http.request(method, target).body(body);
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        req = req.header(header::CONTENT_TYPE, ct);
    }
    match req.send().await {
        Ok(r) => {
            let status = r.status();
            let ct = r.headers().get(header::CONTENT_TYPE).cloned();
            let bytes = r.bytes().await.unwrap_or_default();
            let mut out = Response::builder().status(status);
            if let Some(ct) = ct {
                out = out.header(header::CONTENT_TYPE, ct);
            }
            out.body(Body::from(bytes)).unwrap()
        }
        Err(e) => Response::builder()
            .status(StatusCode::BAD_GATEWAY)
            .body(Body::from(e.to_string()))
            .unwrap(),
    }
}
