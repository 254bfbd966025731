//! Who is sending: the key (query `key=` or `Authorization: Bearer`) names a project, and
//! the `Origin` header must be one the project allows.
//!
//! Browsers do not stop `text/plain` POSTs with CORS, so the origin check must happen here.
//! Projects are cached briefly so a burst of batches costs one database lookup.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap, Uri};

use crate::store::{EventStore, KeyKind, Project, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing key: pass ?key=... or Authorization: Bearer ...")]
    MissingKey,
    #[error("unknown key")]
    UnknownKey,
    #[error("origin {0:?} is not allowed for this project")]
    OriginNotAllowed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The key of a request: `?key=` first, then `Authorization: Bearer`.
pub fn request_key(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    let from_query = query_param(uri, tracklet_wire::KEY_PARAM);
    let from_header = || {
        headers
            .get(header::AUTHORIZATION)?
            .to_str()
            .ok()?
            .strip_prefix("Bearer ")
            .map(|k| k.trim().to_owned())
    };
    from_query.or_else(from_header).filter(|k| !k.is_empty())
}

/// The (decoded) value of the first query parameter called `name`.
pub fn query_param(uri: &Uri, name: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|pair| {
        let (n, value) = pair.split_once('=')?;
        (n == name).then(|| percent_decode(value))
    })
}

/// Minimal `%XX`/`+` decoding for a query value (keys are ASCII; anything odd just won't match).
fn percent_decode(value: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes.get(i..i + 3) {
            Some([b'%', hi, lo]) => hex(*hi).zip(hex(*lo)).map(|(h, l)| h * 16 + l),
            _ => None,
        };
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `origin` may send for `project`. Requests without `Origin` (servers, curl) pass.
pub fn check_origin(project: &Project, origin: Option<&str>) -> Result<(), AuthError> {
    match origin {
        None => Ok(()),
        Some(o)
            if project
                .origins
                .iter()
                .any(|allowed| allowed == "*" || allowed == o) =>
        {
            Ok(())
        }
        Some(o) => Err(AuthError::OriginNotAllowed(o.chars().take(200).collect())),
    }
}

/// Looks projects up by key, remembering answers for a short while (known keys longer than
/// unknown ones, so a project added with the CLI is usable within seconds).
pub struct ProjectCache {
    store: Arc<dyn EventStore>,
    entries: Mutex<CachedProjects>,
}

/// Per (key kind, key): when it was looked up, and what was found.
type CachedProjects = HashMap<(KeyKind, String), (Instant, Option<Project>)>;

const KNOWN_TTL: Duration = Duration::from_secs(30);
const UNKNOWN_TTL: Duration = Duration::from_secs(2);
/// Bound on cached keys (unknown keys are attacker-chosen).
const MAX_ENTRIES: usize = 10_000;

impl ProjectCache {
    pub fn new(store: Arc<dyn EventStore>) -> ProjectCache {
        ProjectCache {
            store,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The project whose write key is `key`.
    pub async fn by_write_key(&self, key: &str) -> Result<Project, AuthError> {
        self.lookup(KeyKind::Write, key).await
    }

    /// The project whose read key is `key`.
    pub async fn by_read_key(&self, key: &str) -> Result<Project, AuthError> {
        self.lookup(KeyKind::Read, key).await
    }

    async fn lookup(&self, kind: KeyKind, key: &str) -> Result<Project, AuthError> {
        if key.len() > 200 {
            return Err(AuthError::UnknownKey);
        }
        let cache_key = (kind, key.to_owned());
        if let Some((at, found)) = self.lock().get(&cache_key) {
            let ttl = if found.is_some() {
                KNOWN_TTL
            } else {
                UNKNOWN_TTL
            };
            if at.elapsed() < ttl {
                return found.clone().ok_or(AuthError::UnknownKey);
            }
        }
        let found = self.store.project_by_key(kind, key).await?;
        let mut entries = self.lock();
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(cache_key, (Instant::now(), found.clone()));
        found.ok_or(AuthError::UnknownKey)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CachedProjects> {
        // A panic while holding this lock cannot leave the map inconsistent: keep using it.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_from_query_or_bearer() {
        let mut headers = HeaderMap::new();
        let uri: Uri = "/v1/batch?x=1&key=wk_abc%5F".parse().unwrap();
        assert_eq!(request_key(&uri, &headers).as_deref(), Some("wk_abc_"));
        let uri: Uri = "/v1/batch".parse().unwrap();
        assert_eq!(request_key(&uri, &headers), None);
        headers.insert(header::AUTHORIZATION, "Bearer wk_h".parse().unwrap());
        assert_eq!(request_key(&uri, &headers).as_deref(), Some("wk_h"));
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("a%2"), "a%2");
    }

    #[test]
    fn origins_are_matched_exactly() {
        let p = Project::new("p", vec!["https://a.example".into()], None);
        assert!(check_origin(&p, None).is_ok());
        assert!(check_origin(&p, Some("https://a.example")).is_ok());
        assert!(check_origin(&p, Some("https://a.example.evil")).is_err());
    }
}
