//! The HTTP client of the client commands: one place builds URLs, sends, and maps
//! failures to errors that say what to do.

use std::fmt;
use std::time::Duration;

use anyhow::{Context, bail};
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// How long a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a whole request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A refold HTTP API at a base URL.
#[derive(Debug, Clone)]
pub struct Api {
    base: Url,
    /// The URL as the user gave it, for messages.
    shown: String,
    http: reqwest::Client,
    /// Sent as `Authorization: Bearer KEY` when set.
    key: Option<crate::config::Secret>,
}

/// A 2xx answer with its JSON body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
}

/// Why a request failed.
#[derive(Debug)]
pub enum ApiError {
    /// No connection: nothing listens there, or the URL is wrong.
    Unreachable { base: String, detail: String },
    /// Connected, but the exchange failed or timed out.
    Transport {
        method: Method,
        url: String,
        detail: String,
        timeout: bool,
    },
    /// refold answered with a non-2xx status: its error code and message.
    Server {
        method: Method,
        url: String,
        status: StatusCode,
        code: Option<String>,
        message: String,
        retry_after: Option<Duration>,
    },
    /// A 2xx answer that is not what refold sends.
    BadReply { url: String, detail: String },
}

impl ApiError {
    /// The server's error code (`not_found`, `replay_in_progress`, ...).
    pub fn code(&self) -> Option<&str> {
        match self {
            ApiError::Server { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// The HTTP status of a server's refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Server { status, .. } => Some(status.as_u16()),
            _ => None,
        }
    }

    /// Worth trying again a moment later (while polling).
    pub fn is_transient(&self) -> bool {
        match self {
            ApiError::Unreachable { .. } | ApiError::Transport { .. } => true,
            ApiError::Server { status, .. } => {
                matches!(status.as_u16(), 429 | 502 | 503 | 504)
            }
            ApiError::BadReply { .. } => false,
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::Unreachable { base, detail } => write!(
                f,
                "cannot reach refold at {base}: is `refold serve` running? (set --url or REFOLD_URL) [{detail}]"
            ),
            ApiError::Transport {
                method,
                url,
                timeout: true,
                ..
            } => write!(
                f,
                "{method} {url}: refold did not answer within {}s",
                REQUEST_TIMEOUT.as_secs()
            ),
            ApiError::Transport {
                method,
                url,
                detail,
                ..
            } => write!(f, "{method} {url} failed: {detail}"),
            ApiError::Server {
                method,
                url,
                status,
                code: None,
                message,
                ..
            } if status.as_u16() == 404 => write!(
                f,
                "{method} {url}: 404 {message}: no such endpoint (is this a refold with the projections API?)"
            ),
            ApiError::Server {
                status,
                code,
                message,
                ..
            } => {
                write!(f, "refold answered {}", status.as_u16())?;
                if let Some(code) = code {
                    write!(f, " {code}")?;
                }
                write!(f, ": {message}")
            }
            ApiError::BadReply { url, detail } => write!(
                f,
                "unexpected answer from {url}: {detail} (is it a refold of the same version as this command?)"
            ),
        }
    }
}

impl std::error::Error for ApiError {}

/// The innermost cause: reqwest's own message is "error sending request".
fn root_cause(e: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// A printable start of a body that is not the JSON expected.
fn snippet(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim();
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

impl Api {
    /// A client for the refold at `url` (like `http://127.0.0.1:8080`).
    pub fn new(url: &str) -> anyhow::Result<Self> {
        // `localhost:8080` means http://localhost:8080.
        let full = match url.contains("://") {
            true => url.to_string(),
            false => format!("http://{url}"),
        };
        let base = Url::parse(&full)
            .with_context(|| format!("--url {url:?} is not a URL like http://127.0.0.1:8080"))?;
        if base.scheme() != "http" {
            bail!(
                "--url {url}: only http:// is supported (refold serves plain HTTP; this client has no TLS)"
            );
        }
        if base.cannot_be_a_base() || base.host().is_none() {
            bail!("--url {url:?} is not a URL like http://127.0.0.1:8080");
        }
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("refold-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("cannot set up the HTTP client")?;
        Ok(Self {
            base,
            shown: full.trim_end_matches('/').to_string(),
            http,
            key: None,
        })
    }

    /// Presents `key` (an API key of the server's `api_keys`) on every request.
    pub fn with_key(mut self, key: Option<crate::config::Secret>) -> anyhow::Result<Self> {
        if key
            .as_ref()
            .is_some_and(|k| !k.0.bytes().all(|b| b.is_ascii_graphic()))
        {
            bail!("--api-key: keys are printable ASCII without spaces");
        }
        self.key = key;
        Ok(self)
    }

    /// The URL of `segments` under the base (each segment percent-encoded).
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("checked in Api::new")
            .pop_if_empty()
            .extend(segments);
        url
    }

    pub async fn get(&self, segments: &[&str]) -> Result<Reply, ApiError> {
        self.send(Method::GET, segments, None).await
    }

    /// POST with an optional `(content type, body)`.
    pub async fn post(
        &self,
        segments: &[&str],
        body: Option<(&'static str, Vec<u8>)>,
    ) -> Result<Reply, ApiError> {
        self.send(Method::POST, segments, body).await
    }

    /// Reads a reply body as `T`.
    pub fn parse<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        body: Value,
    ) -> Result<T, ApiError> {
        serde_json::from_value(body).map_err(|e| ApiError::BadReply {
            url: self.url(segments).to_string(),
            detail: e.to_string(),
        })
    }

    pub async fn send(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<(&'static str, Vec<u8>)>,
    ) -> Result<Reply, ApiError> {
        let url = self.url(segments).to_string();
        let mut req = self.http.request(method.clone(), &url);
        if let Some(key) = &self.key {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", key.0))
                .expect("checked in Api::with_key");
            value.set_sensitive(true);
            req = req.header(reqwest::header::AUTHORIZATION, value);
        }
        if let Some((content_type, bytes)) = body {
            req = req.header(CONTENT_TYPE, content_type).body(bytes);
        }
        let transport = |e: reqwest::Error| {
            if e.is_connect() {
                ApiError::Unreachable {
                    base: self.shown.clone(),
                    detail: root_cause(&e),
                }
            } else {
                ApiError::Transport {
                    method: method.clone(),
                    url: url.clone(),
                    detail: root_cause(&e),
                    timeout: e.is_timeout(),
                }
            }
        };
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = resp.bytes().await.map_err(transport)?;
        let json: Option<Value> = serde_json::from_slice(&bytes).ok();
        if status.is_success() {
            return match json {
                Some(body) => Ok(Reply { status, body }),
                None => Err(ApiError::BadReply {
                    url,
                    detail: format!(
                        "{status} with a body that is not JSON: {:?}",
                        snippet(&bytes)
                    ),
                }),
            };
        }
        let error = json.as_ref().and_then(|j| j.get("error"));
        let code = error
            .and_then(|e| e.get("code"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let message = error
            .and_then(|e| e.get("message"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| {
                let s = snippet(&bytes);
                if s.is_empty() {
                    status
                        .canonical_reason()
                        .unwrap_or("no message")
                        .to_string()
                } else {
                    s
                }
            });
        Err(ApiError::Server {
            method,
            url,
            status,
            code,
            message,
            retry_after,
        })
    }
}
