//! Who is sending: the key (query `key=` or `Authorization: Bearer`) names a project, and
//! the `Origin` header must be one the project allows.
//!
//! Browsers do not stop `text/plain` POSTs with CORS, so the origin check must happen here.
//! Projects are kept in memory ([`ProjectDirectory`]): no request ever looks a key up in the
//! database, so unknown keys cost nothing but a hash lookup.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use axum::http::{header, HeaderMap, Uri};

use crate::store::{EventStore, Project, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing key: pass ?key=... or Authorization: Bearer ...")]
    MissingKey,
    #[error("unknown key")]
    UnknownKey,
    #[error("origin {0:?} is not allowed for this project")]
    OriginNotAllowed(String),
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

/// The projects table, kept in memory: loaded when the server starts, then reloaded every
/// `--projects-refresh-ms` by a background task (see [`ProjectDirectory::start`]), and at once
/// on a change notice from the database where there is one (Postgres). Lookups
/// are hash lookups on an immutable snapshot and never touch the database, so a flood of
/// unknown keys costs nothing but a hash. A failed reload keeps the last snapshot.
pub struct ProjectDirectory {
    store: Arc<dyn EventStore>,
    snapshot: RwLock<Arc<Snapshot>>,
    /// Stops the refresh task (also stopped when the directory is dropped).
    stop: tokio::sync::watch::Sender<bool>,
}

/// Every project, by write key and by read key.
#[derive(Default)]
struct Snapshot {
    by_write_key: HashMap<String, Project>,
    by_read_key: HashMap<String, Project>,
}

impl Snapshot {
    fn of(projects: Vec<Project>) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for p in projects {
            snapshot.by_read_key.insert(p.read_key.clone(), p.clone());
            snapshot.by_write_key.insert(p.write_key.clone(), p);
        }
        snapshot
    }
}

/// Longest wait for one reload of the projects table.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

impl ProjectDirectory {
    /// Loads every project (fails when the database cannot be read: the server must not start
    /// without them) and starts reloading them every `refresh` in a background task. The task
    /// ends on [`ProjectDirectory::stop`] or once the directory is dropped.
    pub async fn start(
        store: Arc<dyn EventStore>,
        refresh: Duration,
    ) -> Result<Arc<ProjectDirectory>, StoreError> {
        let projects = store.list_projects().await?;
        tracing::debug!(projects = projects.len(), "projects loaded");
        let changes = store.project_changes().await;
        let directory = Arc::new(ProjectDirectory {
            store,
            snapshot: RwLock::new(Arc::new(Snapshot::of(projects))),
            stop: tokio::sync::watch::Sender::new(false),
        });
        tokio::spawn(refresh_loop(
            Arc::downgrade(&directory),
            directory.stop.subscribe(),
            refresh.max(Duration::from_millis(10)),
            changes,
        ));
        Ok(directory)
    }

    /// Reloads the projects table now; on failure the last snapshot stays.
    pub async fn reload(&self) -> Result<(), StoreError> {
        let projects = match tokio::time::timeout(RELOAD_TIMEOUT, self.store.list_projects()).await
        {
            Ok(result) => result?,
            Err(_) => {
                return Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut));
            }
        };
        let snapshot = Arc::new(Snapshot::of(projects));
        *self
            .snapshot
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = snapshot;
        Ok(())
    }

    /// Stops the refresh task.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// The project whose write key is `key`.
    pub fn by_write_key(&self, key: &str) -> Result<Project, AuthError> {
        self.current()
            .by_write_key
            .get(key)
            .cloned()
            .ok_or(AuthError::UnknownKey)
    }

    /// The project whose read key is `key`.
    pub fn by_read_key(&self, key: &str) -> Result<Project, AuthError> {
        self.current()
            .by_read_key
            .get(key)
            .cloned()
            .ok_or(AuthError::UnknownKey)
    }

    /// Number of projects in the current snapshot.
    pub fn len(&self) -> usize {
        self.current().by_write_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn current(&self) -> Arc<Snapshot> {
        // The lock only guards swapping an Arc: a panic cannot leave it inconsistent.
        self.snapshot
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// Reloads the projects every `every`, and at once when `changes` signals a change, until
/// stopped or the directory is gone.
async fn refresh_loop(
    directory: Weak<ProjectDirectory>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    every: Duration,
    mut changes: Option<tokio::sync::mpsc::Receiver<()>>,
) {
    loop {
        let notifier_gone = tokio::select! {
            _ = tokio::time::sleep(every) => false,
            changed = async {
                match changes.as_mut() {
                    Some(changes) => changes.recv().await,
                    None => std::future::pending().await,
                }
            } => changed.is_none(),
            // Stopped, or the sender (the directory) is gone.
            _ = stop.wait_for(|stopped| *stopped) => return,
        };
        if notifier_gone {
            changes = None;
            continue;
        }
        let Some(directory) = directory.upgrade() else {
            return;
        };
        if let Err(e) = directory.reload().await {
            tracing::warn!(error = %e, "cannot reload projects; keeping the last ones loaded");
        }
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
