//! `GET /openapi.json`: the OpenAPI 3 document of the HTTP API.
//!
//! It is generated from [`crate::http::endpoints`], the same table the router
//! is built from, so an endpoint cannot be served without being documented (or
//! documented without being served). Each entry carries its [`Op`]: summary,
//! query parameters, request body, success responses and the scope it needs;
//! every operation also answers errors in the shape of the `Error` schema
//! (the `default` response). The schemas below describe what the handlers
//! build; schemathesis checks every response against them in CI.

use serde_json::{Map, Value, json};

use crate::auth::Scope;

/// The OpenAPI description of one endpoint.
pub struct Op {
    pub id: &'static str,
    pub summary: &'static str,
    pub tag: &'static str,
    pub query: Vec<Value>,
    pub body: Option<Value>,
    /// `(status, description, content type, schema)`
    pub responses: Vec<(u16, &'static str, &'static str, Value)>,
}

impl Op {
    pub fn new(id: &'static str, tag: &'static str, summary: &'static str) -> Self {
        Op {
            id,
            summary,
            tag,
            query: Vec::new(),
            body: None,
            responses: Vec::new(),
        }
    }

    /// A JSON response of component schema `schema`.
    pub fn ok(mut self, status: u16, description: &'static str, schema: &str) -> Self {
        self.responses
            .push((status, description, "application/json", reference(schema)));
        self
    }

    pub fn text(
        mut self,
        status: u16,
        description: &'static str,
        content_type: &'static str,
    ) -> Self {
        self.responses
            .push((status, description, content_type, json!({"type": "string"})));
        self
    }

    pub fn query(mut self, params: impl IntoIterator<Item = Value>) -> Self {
        self.query.extend(params);
        self
    }

    /// A request body: `(content type, schema)` pairs.
    pub fn body(mut self, content: &[(&str, Value)]) -> Self {
        let content: Map<String, Value> = content
            .iter()
            .map(|(ct, schema)| (ct.to_string(), json!({"schema": schema})))
            .collect();
        self.body = Some(json!({"required": true, "content": content}));
        self
    }
}

pub fn reference(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

/// An integer query parameter.
pub fn int(name: &str, description: &str, min: u64, max: u64) -> Value {
    json!({"name": name, "in": "query", "required": false, "description": description,
           "schema": {"type": "integer", "minimum": min, "maximum": max}})
}

/// A string query parameter.
pub fn string(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "query", "required": false, "description": description,
           "schema": {"type": "string"}})
}

/// `after` and `wait_ms`, which every view query takes (I10).
pub fn read_your_writes() -> [Value; 2] {
    [
        json!({"name": "after", "in": "query", "required": false,
               "description": "a position token from an append: answer once the projection has applied it",
               "schema": {"type": "string", "pattern": "^[0-9]{1,9}:[0-9]{1,19}(,[0-9]{1,9}:[0-9]{1,19})*$"}}),
        int(
            "wait_ms",
            "how long to wait for `after` before 503 not_caught_up",
            0,
            crate::query::MAX_WAIT_MS,
        ),
    ]
}

/// The document for `endpoints` (method, path, scope, operation).
pub fn document<'a>(
    endpoints: impl IntoIterator<Item = (&'a str, &'a str, Option<Scope>, &'a Op)>,
) -> Value {
    let mut paths = Map::new();
    for (method, path, scope, op) in endpoints {
        let mut params: Vec<Value> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| {
                // Examples from the demo domain, so generated requests also reach
                // real read models.
                let example = match (path, name) {
                    (_, "stream") => "post-42",
                    (p, "name") if p.starts_with("/views") => "top_posts:t1",
                    (_, "projection" | "name") => "post_stats",
                    _ => "42",
                };
                json!({"name": name, "in": "path", "required": true, "example": example,
                       "schema": {"type": "string", "minLength": 1}})
            })
            .collect();
        params.extend(op.query.iter().cloned());
        let mut responses = Map::new();
        for (status, description, ct, schema) in &op.responses {
            responses.insert(
                status.to_string(),
                json!({"description": description, "content": {*ct: {"schema": schema}}}),
            );
        }
        responses.insert(
            "default".into(),
            json!({"description": "an error, in the shape every error has",
                   "content": {"application/json": {"schema": reference("Error")}}}),
        );
        let mut operation = json!({
            "operationId": op.id,
            "summary": op.summary,
            "tags": [op.tag],
            "parameters": params,
            "responses": responses,
        });
        if let Some(body) = &op.body {
            operation["requestBody"] = body.clone();
        }
        match scope {
            Some(s) => {
                operation["security"] = json!([{"bearer": []}, {"apiKey": []}]);
                operation["x-refold-scope"] = s.as_str().into();
            }
            None => operation["security"] = json!([]),
        }
        paths
            .entry(path.to_string())
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("path item")
            .insert(method.to_ascii_lowercase(), operation);
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "refold",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Event sourcing / CQRS in the Kappa style: append events over HTTP, \
                read the read models folded from them. When API keys are configured, each \
                operation needs the scope named by its `x-refold-scope`.",
        },
        "paths": paths,
        "components": {"schemas": schemas(), "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }},
    })
}

fn nullable(mut schema: Value) -> Value {
    schema["nullable"] = true.into();
    schema
}

/// An event; in a bulk body it also names its stream.
fn event(bulk: bool) -> Value {
    let mut e = json!({
        "type": "object", "required": ["type", "data"], "additionalProperties": false,
        "properties": {
            "type": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9_.-]{0,127}$"},
            "data": {"type": "object"},
            "id": {"type": "string", "format": "uuid"},
            "metadata": {"type": "object", "nullable": true},
        },
    });
    if bulk {
        e["required"] = json!(["stream", "type", "data"]);
        e["properties"]["stream"] =
            json!({"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$"});
    }
    e
}

fn schemas() -> Value {
    let int = || json!({"type": "integer", "minimum": 0});
    let num = || json!({"type": "number"});
    let str_ = || json!({"type": "string"});
    let obj = || json!({"type": "object"});
    json!({
        "Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {"code": str_(), "message": str_()},
            }},
        },
        "Event": event(false),
        "StreamAppend": {
            "type": "object", "required": ["events"], "additionalProperties": false,
            "properties": {
                "events": {"type": "array", "items": reference("Event"), "minItems": 1},
                "expected_version": int(),
            },
        },
        "BulkEvent": event(true),
        "Appended": {
            "type": "object",
            "required": ["stream", "first_version", "last_version", "position", "events"],
            "properties": {
                "stream": str_(), "first_version": int(), "last_version": int(),
                "position": str_(),
                "events": {"type": "array", "items": {
                    "type": "object", "required": ["id", "version"],
                    "properties": {"id": str_(), "version": int()},
                }},
            },
        },
        "BulkResult": {
            "type": "object", "required": ["errors", "items", "position"],
            "properties": {
                "errors": {"type": "boolean"},
                "position": nullable(str_()),
                "items": {"type": "array", "items": {
                    "type": "object", "required": ["status"],
                    "properties": {
                        "status": int(), "stream": str_(), "id": str_(), "version": int(),
                        "error": {"type": "object", "required": ["code", "message"],
                                  "properties": {"code": str_(), "message": str_()}},
                    },
                }},
            },
        },
        "Document": {"type": "object", "description": "the read model's value for the key"},
        "SearchPage": {
            "type": "object", "required": ["projection", "total", "hits", "cursor"],
            "properties": {
                "projection": str_(), "total": int(), "cursor": nullable(str_()),
                "hits": {"type": "array", "items": {
                    "type": "object", "required": ["key", "doc"],
                    "properties": {"key": str_(), "score": nullable(num()), "doc": obj()},
                }},
            },
        },
        "Ranking": {
            "type": "object", "required": ["ranking", "members"],
            "properties": {
                "ranking": str_(),
                "members": {"type": "array", "items": {
                    "type": "object", "required": ["member", "score"],
                    "properties": {"member": str_(), "score": num()},
                }},
            },
        },
        "StreamHistory": {
            "type": "object", "required": ["stream", "from", "events", "next"],
            "properties": {
                "stream": str_(), "from": int(), "next": nullable(int()),
                "events": {"type": "array", "items": obj()},
            },
        },
        "Replay": {
            "type": "object",
            "required": ["generation", "version", "state", "position", "total", "progress"],
            "properties": {
                "generation": int(), "version": int(),
                "state": {"type": "string", "enum": ["running", "failed"]},
                "position": int(), "total": int(), "progress": num(),
                "events_per_sec": num(), "eta_secs": nullable(num()),
                "elapsed_secs": num(), "error": nullable(str_()),
            },
        },
        "ProjectionStatus": {
            "type": "object",
            "required": ["name", "version", "store", "generation", "state", "partitions",
                         "lag", "events", "events_per_sec", "dead_letters", "replay"],
            "properties": {
                "name": str_(), "version": int(),
                "store": {"type": "string", "enum": ["redis", "elasticsearch"]},
                "backend": str_(), "generation": int(),
                "state": {"type": "string", "enum": ["running", "replaying", "failed"]},
                "partitions": {"type": "array", "items": {
                    "type": "object", "required": ["partition", "position", "end", "lag"],
                    "properties": {"partition": int(), "position": int(),
                                   "end": nullable(int()), "lag": nullable(int())},
                }},
                "lag": nullable(int()), "events": int(), "commits": int(),
                "events_per_sec": num(),
                "dead_letters": {"type": "object", "required": ["count", "recent"],
                                 "properties": {"count": nullable(int()),
                                                "recent": {"type": "array", "items": obj()}}},
                "error": nullable(str_()),
                "replay": {"allOf": [reference("Replay")], "nullable": true},
            },
        },
        "ProjectionList": {
            "type": "object", "required": ["projections"],
            "properties": {"projections": {"type": "array", "items": reference("ProjectionStatus")}},
        },
        "ReplayStarted": {
            "type": "object", "required": ["projection", "replay"],
            "properties": {"projection": str_(), "replay": reference("Replay")},
        },
        "ReplayCancelled": {
            "type": "object", "required": ["projection", "cancelled_generation"],
            "properties": {"projection": str_(), "cancelled_generation": int()},
        },
        "Status": {
            "type": "object", "required": ["status"],
            "properties": {"status": str_()},
        },
        "OpenApi": {"type": "object", "required": ["openapi", "paths"]},
    })
}
