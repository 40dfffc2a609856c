//! Operations and security over the HTTP API: API keys and scopes on every
//! route, `GET /metrics`, `GET /healthz` and `GET /readyz` (with a store that
//! becomes unreachable), and `GET /openapi.json` against the router it describes.

mod common;

use std::collections::BTreeMap;

use axum::Router;
use common::{Resp, TcpGate, call, embedded_config, eventually, post_json, redis_url};
use refold::auth::{ApiKeys, Scope};
use refold::config::Config;
use refold::http::{app, endpoints};
use refold::log::embedded::EmbeddedLog;
use refold::server::Refold;
use serde_json::{Value, json};

const APPENDER: &str = "appender-key-0123456789";
const READER: &str = "reader-key-0123456789";
const ADMIN: &str = "admin-key-0123456789";

async fn start(config: &Config, dir: &std::path::Path) -> (Refold, Router) {
    let refold = Refold::start(config, std::sync::Arc::new(EmbeddedLog::open(dir).unwrap()))
        .await
        .unwrap();
    let app = app(refold.state.clone());
    (refold, app)
}

/// Sends a JSON request with `headers`.
async fn send(app: &Router, method: &str, uri: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    common::call_with(app, method, uri, &all, body.to_owned()).await
}

/// Every string value of a `key` anywhere in `v`.
fn strings_under(v: &Value, key: &str) -> Vec<String> {
    match v {
        Value::Object(m) => m
            .get(key)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .into_iter()
            .chain(m.values().flat_map(|v| strings_under(v, key)))
            .collect(),
        Value::Array(a) => a.iter().flat_map(|v| strings_under(v, key)).collect(),
        _ => Vec::new(),
    }
}

/// The shipped projections and the built-in stream history.
const DEMO_PROJECTIONS: [&str; 5] = [
    "post_stats",
    "posts",
    "users",
    "tribe_feed",
    "stream_history",
];

/// A concrete URI for a route template.
fn concrete(path: &str) -> String {
    path.replace("{stream}", "post-1")
        .replace("{projection}", "post_stats")
        .replace("{key}", "1")
        .replace("{name}", "post_stats")
}

fn body_for(method: &str, path: &str) -> &'static str {
    match (method, path) {
        ("POST", "/events") => {
            r#"[{"stream": "post-1", "type": "PostLiked", "data": {"post_id": "1", "user_id": "2"}}]"#
        }
        ("POST", p) if p.starts_with("/streams") => {
            r#"{"type": "PostLiked", "data": {"post_id": "1", "user_id": "2"}}"#
        }
        _ => "",
    }
}

#[tokio::test]
async fn every_scoped_route_refuses_missing_unknown_and_unscoped_keys() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = embedded_config(dir.path());
    config.api_keys = std::sync::Arc::new(
        ApiKeys::parse(&format!("append:{APPENDER};read:{READER};admin:{ADMIN}")).unwrap(),
    );
    let (refold, app) = start(&config, dir.path()).await;
    let key_of = |s: Scope| match s {
        Scope::Append => APPENDER,
        Scope::Read => READER,
        Scope::Admin => ADMIN,
    };
    let mut checked = 0;
    for e in endpoints() {
        let (method, uri) = (e.method.as_str(), concrete(e.path));
        let body = body_for(method, e.path);
        let Some(scope) = e.scope else {
            let r = send(&app, method, &uri, &[], body).await;
            assert!(
                r.status.as_u16() != 401 && r.status.as_u16() != 403,
                "{method} {uri} is open: {:?}",
                r.body
            );
            continue;
        };
        let r = send(&app, method, &uri, &[], body).await;
        assert_eq!(r.status, 401, "{method} {uri} without a key: {:?}", r.body);
        assert_eq!(r.body["error"]["code"], "unauthorized", "{:?}", r.body);
        assert!(
            r.headers["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer")
        );
        let r = send(
            &app,
            method,
            &uri,
            &[("authorization", "Bearer not-a-known-key-0000")],
            body,
        )
        .await;
        assert_eq!(
            r.status, 401,
            "{method} {uri} with an unknown key: {:?}",
            r.body
        );
        // A valid key of another scope (admin holds every scope, so never that one).
        for other in [Scope::Append, Scope::Read]
            .into_iter()
            .filter(|o| *o != scope)
        {
            let r = send(&app, method, &uri, &[("x-api-key", key_of(other))], body).await;
            assert_eq!(
                r.status, 403,
                "{method} {uri} with a {other:?} key: {:?}",
                r.body
            );
            assert_eq!(r.body["error"]["code"], "forbidden");
            assert_eq!(r.body["error"]["required_scope"], scope.as_str());
        }
        if e.method == axum::http::Method::GET {
            // HEAD is answered by the GET handler: it needs the key too.
            let r = send(&app, "HEAD", &uri, &[], "").await;
            assert_eq!(r.status, 401, "HEAD {uri} without a key");
        }
        // A method the table does not list reaches no handler.
        let r = send(&app, "PATCH", &uri, &[("x-api-key", ADMIN)], body).await;
        assert_eq!(r.status, 405, "PATCH {uri}: {:?}", r.body);
        let bearer = format!("Bearer {}", key_of(scope));
        let r = send(&app, method, &uri, &[("authorization", &bearer)], body).await;
        assert!(
            r.status.as_u16() != 401 && r.status.as_u16() != 403,
            "{method} {uri} with its scope's key: {} {:?}",
            r.status,
            r.body
        );
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} scoped routes");
    // The refused appends appended nothing: only the two admitted ones are in the log.
    let events = common::events(&*refold.log, "refold.events").await;
    assert_eq!(events.len(), 2, "{events:?}");
    refold.stop().await;
}

/// The exposition as `name{labels}` → value (comments and `# EOF` left out).
async fn scrape(app: &Router) -> BTreeMap<String, f64> {
    let r = call(app, "GET", "/metrics", "text/plain", "").await;
    assert_eq!(r.status, 200);
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"),
        "{:?}",
        r.headers
    );
    let text = r.body.as_str().expect("text").to_owned();
    assert!(text.ends_with("# EOF\n"), "{text}");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_owned(), v.parse().unwrap())
        })
        .collect()
}

fn metric(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no {key} in {:#?}", m.keys().collect::<Vec<_>>()))
}

#[tokio::test]
async fn metrics_count_ingest_by_outcome_and_show_each_projection_caught_up() {
    let dir = tempfile::tempdir().unwrap();
    let config = embedded_config(dir.path());
    let (refold, app) = start(&config, dir.path()).await;
    let (id1, id2) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let two = json!({"events": [
        {"id": id1, "type": "PostPublished", "data": {"post_id": "1", "tribe_id": "t1", "author_id": "u1", "title": "a", "body": "b"}},
        {"id": id2, "type": "PostLiked", "data": {"post_id": "1", "user_id": "u2"}},
    ]});
    let created = post_json(&app, "/streams/post-1/events", two.clone()).await;
    assert_eq!(created.status, 201);
    let repeat = post_json(&app, "/streams/post-1/events", two).await;
    assert_eq!(repeat.status, 200, "{:?}", repeat.body);
    let conflict = post_json(
        &app,
        "/streams/post-1/events",
        json!({"expected_version": 0, "events": [{"type": "PostLiked", "data": {"post_id": "1", "user_id": "u3"}}]}),
    )
    .await;
    assert_eq!(conflict.status, 409);
    let invalid = post_json(
        &app,
        "/streams/post-1/events",
        json!({"type": "9bad", "data": {}}),
    )
    .await;
    assert_eq!(invalid.status, 422);
    let bulk = post_json(
        &app,
        "/events",
        json!([
            {"stream": "post-2", "type": "PostPublished", "data": {"post_id": "2", "tribe_id": "t1", "author_id": "u1", "title": "c", "body": "d"}},
            {"stream": "post-2", "type": "PostLiked", "data": {"post_id": "2", "user_id": "u2"}},
            {"stream": "bad stream", "type": "PostLiked", "data": {}},
        ]),
    )
    .await;
    assert_eq!(bulk.status, 200);
    // Every projection has applied everything.
    for position in [&created.body["position"], &bulk.body["position"]] {
        let position = position.as_str().unwrap();
        for p in DEMO_PROJECTIONS {
            let r = call(
                &app,
                "GET",
                &format!("/views/{p}/none?after={position}"),
                "",
                "",
            )
            .await;
            assert_eq!(r.status, 404, "{p} caught up: {:?}", r.body);
        }
    }

    let m = scrape(&app).await;
    let ingest = |endpoint: &str, outcome: &str| {
        metric(
            &m,
            &format!(
                r#"refold_ingest_requests_total{{endpoint="{endpoint}",outcome="{outcome}"}}"#
            ),
        )
    };
    assert_eq!(ingest("stream", "created"), 1.0);
    assert_eq!(ingest("stream", "repeated"), 1.0);
    assert_eq!(ingest("stream", "wrong_expected_version"), 1.0);
    assert_eq!(ingest("stream", "validation_failed"), 1.0);
    assert_eq!(ingest("bulk", "accepted"), 1.0);
    let events = |outcome: &str| {
        metric(
            &m,
            &format!(r#"refold_ingest_events_total{{outcome="{outcome}"}}"#),
        )
    };
    assert_eq!(events("appended"), 4.0);
    assert_eq!(events("repeated"), 2.0);
    // The conflicting request's one event and the bulk's bad line (the invalid
    // request never got as far as its events).
    assert_eq!(events("refused"), 2.0);
    assert_eq!(
        metric(
            &m,
            r#"refold_ingest_duration_seconds_count{endpoint="stream",outcome="created"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"refold_http_requests_total{method="POST",route="/streams/{stream}/events",status="409"}"#
        ),
        1.0
    );
    // Only appended events are written; nothing is queued now.
    assert_eq!(metric(&m, "refold_write_batch_events_sum"), 4.0);
    assert!(metric(&m, "refold_log_append_duration_seconds_count") >= 2.0);
    assert_eq!(metric(&m, "refold_write_queue_bytes"), 0.0);
    assert_eq!(metric(&m, "refold_write_queue_requests"), 0.0);
    assert_eq!(
        metric(&m, "refold_write_queue_capacity_bytes"),
        config.ingest_buffer as f64
    );
    // Each projection: positions sum to the 4 records, no lag, running, every
    // record folded once, in commits whose batch sizes add up.
    for p in DEMO_PROJECTIONS {
        let sum = |name: &str| -> f64 {
            m.iter()
                .filter(|(k, _)| k.starts_with(&format!(r#"{name}{{projection="{p}",partition="#)))
                .map(|(_, v)| v)
                .sum()
        };
        assert_eq!(sum("refold_projection_position"), 4.0, "{p}");
        assert_eq!(sum("refold_projection_lag"), 0.0, "{p}");
        assert_eq!(
            metric(
                &m,
                &format!(r#"refold_projection_state{{projection="{p}",state="running"}}"#)
            ),
            1.0
        );
        assert_eq!(
            metric(
                &m,
                &format!(r#"refold_projection_events_total{{projection="{p}"}}"#)
            ),
            4.0
        );
        assert_eq!(
            metric(
                &m,
                &format!(r#"refold_projection_batch_events_sum{{projection="{p}"}}"#)
            ),
            4.0
        );
        let commits = metric(
            &m,
            &format!(r#"refold_projection_commits_total{{projection="{p}"}}"#),
        );
        assert!(commits >= 1.0);
        assert!(
            metric(
                &m,
                &format!(r#"refold_projection_events_per_second{{projection="{p}"}}"#)
            ) > 0.0,
            "{p} folded just now"
        );
        assert_eq!(
            metric(
                &m,
                &format!(r#"refold_projection_dead_letters{{projection="{p}"}}"#)
            ),
            0.0,
            "{p}"
        );
        let writes: f64 = m
            .iter()
            .filter(|(k, _)| {
                k.starts_with(&format!(
                    r#"refold_projection_store_write_duration_seconds_count{{projection="{p}","#
                ))
            })
            .map(|(_, v)| v)
            .sum();
        assert_eq!(writes, commits, "{p}: one timed store write per commit");
    }
    assert!(
        !m.keys()
            .any(|k| k.starts_with("refold_projection_replay_progress")),
        "no replay runs"
    );
    refold.stop().await;
}

#[test]
fn the_grafana_dashboard_queries_only_metrics_refold_serves() {
    // The registry's names (the metrics unit test checks every sample of the
    // exposition is one of them).
    let served: std::collections::BTreeSet<String> = refold::metrics::Metrics::new()
        .names()
        .iter()
        .cloned()
        .collect();
    assert!(
        served.contains("refold_projection_replay_progress"),
        "{served:?}"
    );
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/dashboards/refold.json"
    );
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let exprs = strings_under(&dashboard, "expr");
    assert!(exprs.len() >= 10, "{exprs:?}");
    let mut named = 0;
    for expr in &exprs {
        // Names are `refold_…` words outside label matchers and strings.
        let mut bare = String::new();
        let mut depth = 0;
        let mut quoted = false;
        for c in expr.chars() {
            match c {
                '"' => quoted = !quoted,
                '{' if !quoted => depth += 1,
                '}' if !quoted => depth -= 1,
                c if depth == 0 && !quoted => bare.push(c),
                _ => {}
            }
        }
        for word in bare.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("refold_") {
                named += 1;
                assert!(
                    served.contains(word),
                    "the dashboard queries {word}, which refold does not serve ({expr})"
                );
            }
        }
    }
    assert!(named >= exprs.len(), "every query names a metric");
}

#[tokio::test]
async fn readyz_names_an_unreachable_store_while_healthz_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = redis_url();
    let host = upstream
        .trim_start_matches("redis://")
        .trim_end_matches('/');
    let gate = TcpGate::start(host).await;
    let mut config = embedded_config(dir.path());
    config.redis_url = Some(format!("redis://{}/", gate.addr));
    config.topic_prefix = common::unique("ready") + ".";
    let (refold, app) = start(&config, dir.path()).await;

    let r = call(&app, "GET", "/readyz", "", "").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["status"], "ready");

    gate.cut();
    // Answers are reused for a second, so the cut shows within a few.
    let r = eventually(30, "readyz reports the cut", || async {
        let r = call(&app, "GET", "/readyz", "", "").await;
        (r.status == 503).then_some(r)
    })
    .await;
    assert_eq!(r.body["error"]["code"], "not_ready");
    let msg = r.body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("the redis store of projection post_stats"),
        "names the store and the projection: {msg}"
    );
    assert!(r.headers.contains_key("retry-after"));
    let r = call(&app, "GET", "/healthz", "", "").await;
    assert_eq!(r.status, 200, "the process is alive: {:?}", r.body);

    gate.restore();
    eventually(30, "readyz recovers with the store", || async {
        (call(&app, "GET", "/readyz", "", "").await.status == 200).then_some(())
    })
    .await;
    refold.stop().await;
    common::redis_remove_namespace(&config.topic_prefix).await;
}

#[tokio::test]
async fn the_openapi_document_is_the_router() {
    let dir = tempfile::tempdir().unwrap();
    let (refold, app) = start(&embedded_config(dir.path()), dir.path()).await;
    let r = call(&app, "GET", "/openapi.json", "", "").await;
    assert_eq!(r.status, 200);
    let doc = r.body;
    assert_eq!(doc["openapi"], "3.0.3");
    let paths = doc["paths"].as_object().unwrap();
    let mut documented = 0;
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            documented += 1;
            let e = endpoints()
                .into_iter()
                .find(|e| e.path == path && e.method.as_str().eq_ignore_ascii_case(method))
                .unwrap_or_else(|| panic!("{method} {path} is documented but not an endpoint"));
            assert_eq!(
                op.get("x-refold-scope").and_then(Value::as_str),
                e.scope.map(Scope::as_str),
                "{method} {path}"
            );
            assert!(
                op["responses"]["default"].is_object(),
                "{method} {path}: error shape"
            );
            // The router serves it: not the fallback's 404 for an unknown endpoint.
            let uri = concrete(path);
            let resp = send(
                &app,
                &method.to_uppercase(),
                &uri,
                &[],
                body_for(&method.to_uppercase(), path),
            )
            .await;
            let msg = resp.body["error"]["message"].as_str().unwrap_or_default();
            assert!(!msg.contains("no such endpoint"), "{method} {uri}: {msg}");
            assert_ne!(resp.status, 405, "{method} {uri} is routed for that method");
        }
    }
    assert_eq!(
        documented,
        endpoints().len(),
        "every endpoint is documented once"
    );
    // Every reference resolves.
    let all = strings_under(&doc, "$ref");
    assert!(all.len() > 10);
    for r in all {
        let name = r
            .strip_prefix("#/components/schemas/")
            .expect("a schema ref");
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "{r} does not resolve"
        );
    }
    // A path the router does not have is the JSON 404, a known path with another
    // method the JSON 405.
    let r = call(&app, "GET", "/nope", "", "").await;
    assert_eq!(
        (r.status.as_u16(), r.body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let r = call(&app, "PUT", "/healthz", "", "").await;
    assert_eq!(r.status, 405);
    refold.stop().await;
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_response_outside_the_schema() {
    let st = std::env::var("TEST_SCHEMATHESIS").expect(
        "TEST_SCHEMATHESIS is not set: run the suite with scripts/test.sh, which installs schemathesis",
    );
    let dir = tempfile::tempdir().unwrap();
    let keys = format!("append,read:{APPENDER};admin:{ADMIN}");
    let data = dir.path().join("data");
    let mut p = common::Proc::serve(
        &["--data-dir", data.to_str().unwrap(), "--api-keys", &keys],
        dir.path(),
    )
    .await;
    // Demo data, so the examples reach real read models.
    let events: Vec<Value> = refold::demo::Generator::new(refold::demo::DemoConfig {
        seed: 7,
        users: 50,
        tribes: 3,
        hot_share: 0.0,
    })
    .take(400)
    .iter()
    .map(|e| e.to_json())
    .collect();
    let r = reqwest::Client::new()
        .post(format!("{}/events", p.base))
        .bearer_auth(APPENDER)
        .json(&events)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let out = tokio::task::spawn_blocking({
        let (st, base, cwd) = (st.clone(), p.base.clone(), dir.path().to_owned());
        move || {
            std::process::Command::new(st)
                .current_dir(cwd)
                .args(["run", &format!("{base}/openapi.json")])
                .args(["-H", &format!("Authorization: Bearer {ADMIN}")])
                .args([
                    "--checks",
                    "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance",
                ])
                .args(["--max-examples", "60", "--seed", "1", "--no-color"])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{report}");
    assert!(
        out.status.success(),
        "schemathesis failed:\n{report}\nrefold log:\n{}",
        p.log()
    );
    assert!(
        report.contains("Operations:") && report.contains("passed"),
        "{report}"
    );
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "refold crashed:\n{}",
        p.log()
    );
    p.terminate();
}

#[tokio::test]
async fn the_command_line_presents_its_api_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let keys = format!("append,read:{APPENDER};read:{READER}");
    let mut p = common::Proc::serve(
        &["--data-dir", data.to_str().unwrap(), "--api-keys", &keys],
        dir.path(),
    )
    .await;
    let cli = |args: &[&str], key: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_refold"));
        cmd.args(args)
            .args(["--url", &p.base])
            .env_remove("REFOLD_API_KEY");
        if let Some(k) = key {
            cmd.env("REFOLD_API_KEY", k);
        }
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, out) = cli(&["status"], None);
    assert!(!ok && out.contains("API key"), "{out}");
    let (ok, out) = cli(&["status"], Some(READER));
    assert!(ok && out.contains("post_stats"), "{out}");
    let (ok, out) = cli(&["demo", "--events", "50"], Some(READER));
    assert!(
        !ok && out.contains("append"),
        "a read key cannot append: {out}"
    );
    let (ok, out) = cli(&["demo", "--events", "50"], Some(APPENDER));
    assert!(ok, "{out}");
    let (ok, out) = cli(&["replay", "post_stats", "--no-wait"], Some(APPENDER));
    assert!(!ok && out.contains("admin"), "{out}");
    assert!(!out.contains(APPENDER) && !p.log().contains(APPENDER));
    p.terminate();
}
