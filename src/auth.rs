//! API keys with scopes.
//!
//! `api_keys` (`REFOLD_API_KEYS`) lists keys as `SCOPES:KEY` entries separated by
//! `;`, scopes separated by `,`: `append,read:3f9c…;admin,read:b71e…`. Scopes are
//! `append` (POST events), `read` (views, stream history, projection status,
//! metrics) and `admin` (start and cancel replays, and everything else); each
//! route needs one, and a key holds the scopes it lists (admin implies the others). `/healthz`, `/readyz` and
//! `/openapi.json` are open. With no keys configured every route is open.
//!
//! A request presents its key as `Authorization: Bearer KEY` or `X-API-Key: KEY`.
//! Missing or unknown keys get 401, a key without the route's scope 403. The
//! presented key is compared with every configured key in time that depends only
//! on the presented key's length, and keys never reach a log or an error.

use std::fmt;

use axum::http::HeaderMap;

use crate::error::ApiError;

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Append,
    Read,
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Append, Scope::Read, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Append => "append",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }
}

/// The shortest key accepted: a guessable key is no key.
pub const MIN_KEY_LEN: usize = 16;

struct Key {
    secret: Vec<u8>,
    scopes: Vec<Scope>,
}

/// The configured keys; empty means the API is open.
#[derive(Default)]
pub struct ApiKeys {
    keys: Vec<Key>,
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scopes: Vec<Vec<&str>> = self
            .keys
            .iter()
            .map(|k| k.scopes.iter().map(|s| s.as_str()).collect())
            .collect();
        f.debug_struct("ApiKeys")
            .field("scopes_per_key", &scopes)
            .finish()
    }
}

impl ApiKeys {
    /// Parses `SCOPES:KEY;SCOPES:KEY`; errors name the entry by position and
    /// scopes, never by key.
    pub fn parse(spec: &str) -> Result<ApiKeys, String> {
        let mut keys = Vec::new();
        for (i, entry) in spec
            .split([';', '\n'])
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .enumerate()
        {
            let n = i + 1;
            let Some((scopes, secret)) = entry.split_once(':') else {
                return Err(format!(
                    "api_keys entry {n} is not SCOPES:KEY (like `append,read:KEY`)"
                ));
            };
            let scopes = scopes
                .split(',')
                .map(str::trim)
                .map(|s| {
                    Scope::ALL
                        .into_iter()
                        .find(|k| k.as_str() == s)
                        .ok_or_else(|| {
                            format!(
                                "api_keys entry {n}: unknown scope {s:?}; scopes are append, read and admin"
                            )
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let secret = secret.trim();
            if secret.len() < MIN_KEY_LEN {
                return Err(format!(
                    "api_keys entry {n}: the key is {} characters; use at least {MIN_KEY_LEN} (e.g. `openssl rand -hex 32`)",
                    secret.len()
                ));
            }
            if secret.bytes().any(|b| !b.is_ascii_graphic()) {
                return Err(format!(
                    "api_keys entry {n}: keys are printable ASCII without spaces (they travel in a header)"
                ));
            }
            if keys.iter().any(|k: &Key| k.secret == secret.as_bytes()) {
                return Err(format!(
                    "api_keys entry {n} repeats an earlier key: give each key all its scopes in one entry"
                ));
            }
            keys.push(Key {
                secret: secret.as_bytes().to_vec(),
                scopes,
            });
        }
        Ok(ApiKeys { keys })
    }

    pub fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    /// Admits a request to a route that needs `scope` (`None`: an open route).
    pub fn check(&self, headers: &HeaderMap, scope: Option<Scope>) -> Result<(), ApiError> {
        let Some(scope) = scope else { return Ok(()) };
        if self.is_open() {
            return Ok(());
        }
        let Some(given) = presented(headers) else {
            return Err(ApiError::Unauthorized(
                "this endpoint needs an API key: send `Authorization: Bearer KEY` or `X-API-Key: KEY`"
                    .into(),
            ));
        };
        // Every key is compared, whichever matches.
        let mut found: Option<&Key> = None;
        for k in &self.keys {
            if same(given, &k.secret) {
                found = Some(k);
            }
        }
        match found {
            None => Err(ApiError::Unauthorized("the API key is not valid".into())),
            Some(k) if k.scopes.contains(&scope) || k.scopes.contains(&Scope::Admin) => Ok(()),
            Some(_) => Err(ApiError::Forbidden {
                scope: scope.as_str(),
            }),
        }
    }
}

/// The key a request presents, if any.
fn presented(headers: &HeaderMap) -> Option<&[u8]> {
    let scheme = b"bearer ";
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .filter(|v| v.len() > scheme.len() && v[..scheme.len()].eq_ignore_ascii_case(scheme))
        .map(|v| v[scheme.len()..].trim_ascii());
    // Another scheme (say Basic, added by a proxy) does not hide X-API-Key.
    bearer.or_else(|| headers.get("x-api-key").map(|v| v.as_bytes().trim_ascii()))
}

/// Equality in time that depends on `given`'s length only.
fn same(given: &[u8], secret: &[u8]) -> bool {
    let mut diff = given.len() ^ secret.len();
    for (i, g) in given.iter().enumerate() {
        diff |= usize::from(g ^ secret[i % secret.len()]);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const K1: &str = "append-key-0123456789";
    const K2: &str = "admin-key-0123456789ab";

    fn headers(name: &'static str, v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn keys_grant_exactly_their_scopes() {
        let keys = ApiKeys::parse(&format!("append,read:{K1}; admin:{K2}")).unwrap();
        let bearer = |k: &str| headers("authorization", &format!("Bearer {k}"));
        assert!(keys.check(&bearer(K1), Some(Scope::Append)).is_ok());
        assert!(keys.check(&bearer(K1), Some(Scope::Read)).is_ok());
        assert!(matches!(
            keys.check(&bearer(K1), Some(Scope::Admin)),
            Err(ApiError::Forbidden { scope: "admin" })
        ));
        for scope in Scope::ALL {
            assert!(
                keys.check(&headers("x-api-key", K2), Some(scope)).is_ok(),
                "admin implies {scope:?}"
            );
        }
        let reader = ApiKeys::parse(&format!("read:{K1}")).unwrap();
        assert!(matches!(
            reader.check(&bearer(K1), Some(Scope::Append)),
            Err(ApiError::Forbidden { scope: "append" })
        ));
        assert!(matches!(
            keys.check(&HeaderMap::new(), Some(Scope::Read)),
            Err(ApiError::Unauthorized(_))
        ));
        // A prefix, an extension or another scheme of a valid key is no key.
        for wrong in [&K1[..K1.len() - 1], &format!("{K1}x")] {
            assert!(matches!(
                keys.check(&bearer(wrong), Some(Scope::Read)),
                Err(ApiError::Unauthorized(_))
            ));
        }
        assert!(
            keys.check(
                &headers("authorization", &format!("Basic {K1}")),
                Some(Scope::Read)
            )
            .is_err()
        );
        // A Basic header (say from a proxy) does not hide X-API-Key.
        let mut both = headers("x-api-key", K1);
        both.insert("authorization", HeaderValue::from_static("Basic dTpw"));
        assert!(keys.check(&both, Some(Scope::Read)).is_ok());
        assert!(keys.check(&HeaderMap::new(), None).is_ok(), "open route");
        assert!(
            ApiKeys::default()
                .check(&HeaderMap::new(), Some(Scope::Admin))
                .is_ok(),
            "no keys: open"
        );
    }

    #[test]
    fn bad_key_lists_are_refused_without_echoing_keys() {
        for (spec, says) in [
            ("read", "not SCOPES:KEY"),
            ("write:0123456789abcdefgh", "unknown scope \"write\""),
            ("read:short", "at least 16"),
            ("read:0123456789 abcdefgh", "printable ASCII"),
            (
                "read:0123456789abcdefgh;append:0123456789abcdefgh",
                "repeats",
            ),
        ] {
            let err = ApiKeys::parse(spec).unwrap_err();
            assert!(err.contains(says), "{spec}: {err}");
            assert!(!err.contains("0123456789"), "{err}");
        }
        let keys = ApiKeys::parse(&format!("read:{K1}")).unwrap();
        assert!(!format!("{keys:?}").contains(K1));
    }
}
