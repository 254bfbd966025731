//! What was just committed: the committer's last commit time (for `GET /v1/stats/health`) and
//! a bounded broadcast of the newly stored events (for `GET /v1/stats/live`, Server-Sent
//! Events; see `docs/stats-api.md`).
//!
//! The group committer calls [`CommitFeed::committed`] after each successful commit. Sending
//! on a tokio broadcast channel never waits: a listener that falls more than
//! [`LIVE_CAPACITY`] events behind loses the oldest ones (and is told so), so a slow
//! dashboard can never hold ingest back. Events are built only for projects someone is
//! watching; with no listener, nothing is built at all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::response::sse::Event as SseEvent;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::{broadcast, watch};
use uuid::Uuid;

use crate::analytics::{Builder, Dialect, Query, Statement, Value};
use crate::store::{EventRow, EventStore};

/// Events the live channel holds for its slowest listener.
pub const LIVE_CAPACITY: usize = 1024;

/// One committed event as the live view shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LiveEvent {
    #[serde(skip)]
    pub project_id: Uuid,
    pub id: Uuid,
    pub name: String,
    /// Skew-corrected time.
    pub time: DateTime<Utc>,
    pub anonymous_id: String,
    pub session_id: String,
    pub path: Option<String>,
    pub browser: Option<String>,
    pub os: Option<String>,
    pub device: Option<String>,
    pub country: Option<String>,
}

/// `context.path`, read without building the rest of the context.
#[derive(serde::Deserialize)]
struct ContextPath<'a> {
    #[serde(borrow)]
    path: Option<std::borrow::Cow<'a, str>>,
}

impl LiveEvent {
    pub fn from_row(row: &EventRow) -> LiveEvent {
        let path = row.context.as_ref().and_then(|c| {
            serde_json::from_str::<ContextPath>(c.get())
                .ok()?
                .path
                .map(|p| p.into_owned())
        });
        let e = &row.enrichment;
        LiveEvent {
            project_id: row.project_id,
            id: row.id,
            name: row.name.clone(),
            time: row.time,
            anonymous_id: row.anonymous_id.clone(),
            session_id: row.session_id.clone(),
            path,
            browser: e.browser.clone(),
            os: e.os.clone(),
            device: e.device_type.clone(),
            country: e.country.clone(),
        }
    }
}

/// Shared by the group committer (writes) and the handlers (read, subscribe).
#[derive(Debug)]
pub struct CommitFeed {
    /// ms since the epoch of the last successful commit; 0 before the first.
    last_commit_ms: AtomicI64,
    sender: broadcast::Sender<Arc<LiveEvent>>,
    /// Set at shutdown: every live stream ends, so connections can close.
    closed: watch::Sender<bool>,
    /// Open live streams per project (only these projects' events are built and sent).
    watched: Mutex<HashMap<Uuid, usize>>,
}

impl Default for CommitFeed {
    fn default() -> Self {
        CommitFeed {
            last_commit_ms: AtomicI64::new(0),
            sender: broadcast::channel(LIVE_CAPACITY).0,
            closed: watch::Sender::new(false),
            watched: Mutex::new(HashMap::new()),
        }
    }
}

impl CommitFeed {
    /// Called after `rows` were committed; `inserted[i]` tells whether `rows[i]` was new.
    /// Bots are not sent (the stats leave them out too).
    pub fn committed(&self, rows: &[EventRow], inserted: &[bool]) {
        self.last_commit_ms
            .store(Utc::now().timestamp_millis(), Ordering::Relaxed);
        if self.sender.receiver_count() == 0 {
            return;
        }
        let Ok(watched) = self.watched.lock() else {
            return;
        };
        for (row, new) in rows.iter().zip(inserted) {
            if *new && !row.enrichment.is_bot && watched.contains_key(&row.project_id) {
                // Err only means nobody listens any more.
                let _ = self.sender.send(Arc::new(LiveEvent::from_row(row)));
            }
        }
    }

    /// When this process last committed, if it has.
    pub fn last_commit(&self) -> Option<DateTime<Utc>> {
        match self.last_commit_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => DateTime::from_timestamp_millis(ms),
        }
    }

    /// Every event committed from now on (all projects; the listener picks its own).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<LiveEvent>> {
        self.sender.subscribe()
    }

    /// Ends every live stream (at shutdown: a stream never ends by itself).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }
}

/// A recent event as [`recent_sql`] returns it: id, name, time (ms since the epoch), anonymous
/// id, session id, path, browser, OS, device, country.
pub type RecentRow = (
    String,
    String,
    i64,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// The project's newest events of the query's range (bots left out), newest first, at most
/// `limit`; times and ids in one spelling on both backends.
pub fn recent_sql(dialect: Dialect, q: &Query, limit: u32) -> Statement {
    let mut b = Builder::new(dialect);
    let base = b.base(q);
    let path = b.context_field("path");
    let (id, ms) = match dialect {
        Dialect::Postgres => ("id::text", "(extract(epoch FROM time) * 1000)::int8"),
        Dialect::Sqlite => ("id", "time"),
    };
    let limit = b.bind(Value::Int(i64::from(limit)));
    let sql = format!(
        "SELECT {id}, name, {ms}, anonymous_id, session_id, {path}, browser, os, device_type, \
             country \
         FROM events WHERE {base} ORDER BY time DESC, id DESC LIMIT {limit}"
    );
    b.finish(sql)
}

/// Distinct visitors of the query's range (bots left out), as one row.
pub fn visitors_sql(dialect: Dialect, q: &Query) -> Statement {
    let mut b = Builder::new(dialect);
    let base = b.base(q);
    b.finish(format!(
        "SELECT count(DISTINCT anonymous_id) FROM events WHERE {base}"
    ))
}

impl LiveEvent {
    /// A [`RecentRow`] of `project_id` (None when its id or time cannot be read).
    pub fn from_recent(project_id: Uuid, row: RecentRow) -> Option<LiveEvent> {
        let (id, name, time, anonymous_id, session_id, path, browser, os, device, country) = row;
        Some(LiveEvent {
            project_id,
            id: id.parse().ok()?,
            name,
            time: DateTime::from_timestamp_millis(time)?,
            anonymous_id,
            session_id,
            path,
            browser,
            os,
            device,
            country,
        })
    }
}

/// How far back the live view starts, and what "visitors now" counts.
pub const LIVE_WINDOW: chrono::Duration = chrono::Duration::minutes(30);
/// Events sent in the first message.
pub const RECENT_EVENTS: u32 = 50;
/// How often "visitors now" may be counted again (when events came) ...
const RECOUNT_EVERY: Duration = Duration::from_secs(2);
/// ... and at least this often (visitors leave the window).
const RECOUNT_AT_LEAST: Duration = Duration::from_secs(60);

/// The live view's range: the last [`LIVE_WINDOW`] up to a moment from now.
pub fn live_query(project_id: Uuid, now: DateTime<Utc>) -> Query {
    Query {
        project_id,
        from: now - LIVE_WINDOW,
        to: now + chrono::Duration::seconds(1),
        filters: crate::analytics::Filters::default(),
    }
}

/// The first message: visitors of the last 30 minutes and the newest events, newest first.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Snapshot {
    pub visitors: i64,
    pub window_minutes: i64,
    pub events: Vec<LiveEvent>,
}

/// What a live stream needs besides its snapshot.
pub struct LiveSource {
    pub project_id: Uuid,
    pub events: broadcast::Receiver<Arc<LiveEvent>>,
    pub closed: watch::Receiver<bool>,
    pub store: Arc<dyn EventStore>,
    /// Counted in `feed.watched` while this lives.
    feed: Arc<CommitFeed>,
}

impl Drop for LiveSource {
    fn drop(&mut self) {
        if let Ok(mut watched) = self.feed.watched.lock() {
            if let Some(n) = watched.get_mut(&self.project_id) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    watched.remove(&self.project_id);
                }
            }
        }
    }
}

impl CommitFeed {
    /// A source for one live stream of `project_id` (subscribe before reading the snapshot,
    /// so no event committed meanwhile is missed; one may come twice: the page dedupes by id).
    pub fn source(self: &Arc<Self>, project_id: Uuid, store: Arc<dyn EventStore>) -> LiveSource {
        if let Ok(mut watched) = self.watched.lock() {
            *watched.entry(project_id).or_default() += 1;
        }
        LiveSource {
            project_id,
            events: self.subscribe(),
            closed: self.closed.subscribe(),
            store,
            feed: self.clone(),
        }
    }

    /// Projects with an open live stream.
    pub fn watched_projects(&self) -> usize {
        self.watched.lock().map_or(0, |w| w.len())
    }
}

struct StreamState {
    source: LiveSource,
    first: Option<Snapshot>,
    visitors: i64,
    recount: tokio::time::Interval,
    dirty: bool,
    counted_at: tokio::time::Instant,
}

/// The Server-Sent Events of one live view: `snapshot` first, then one `event` per committed
/// event of the project, `visitors` when the count of the last 30 minutes changes, `lagged`
/// (with the number missed) when this listener fell behind. Ends at shutdown.
pub fn sse_events(
    snapshot: Snapshot,
    source: LiveSource,
) -> impl futures_util::Stream<Item = Result<SseEvent, std::convert::Infallible>> + Send {
    let mut recount = tokio::time::interval(RECOUNT_EVERY);
    recount.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = StreamState {
        source,
        visitors: snapshot.visitors,
        first: Some(snapshot),
        recount,
        dirty: false,
        counted_at: tokio::time::Instant::now(),
    };
    futures_util::stream::unfold(state, |mut s| async move {
        if let Some(first) = s.first.take() {
            return Some((Ok(json_event("snapshot", &first)), s));
        }
        loop {
            let closed = *s.source.closed.borrow_and_update();
            if closed {
                return None;
            }
            tokio::select! {
                received = s.source.events.recv() => match received {
                    Ok(event) if event.project_id == s.source.project_id => {
                        s.dirty = true;
                        return Some((Ok(json_event("event", event.as_ref())), s));
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        s.dirty = true;
                        let missed = serde_json::json!({ "missed": missed });
                        return Some((Ok(json_event("lagged", &missed)), s));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                _ = s.recount.tick() => {
                    if !s.dirty && s.counted_at.elapsed() < RECOUNT_AT_LEAST {
                        continue;
                    }
                    s.dirty = false;
                    s.counted_at = tokio::time::Instant::now();
                    let q = live_query(s.source.project_id, Utc::now());
                    let counted = tokio::time::timeout(
                        crate::analytics::QUERY_TIMEOUT,
                        s.source.store.analytics_live(&q, 1),
                    )
                    .await;
                    // A failed count keeps the last one (the page shows no database error).
                    if let Ok(Ok((visitors, _))) = counted {
                        if visitors != s.visitors {
                            s.visitors = visitors;
                            let v = serde_json::json!({ "visitors": visitors });
                            return Some((Ok(json_event("visitors", &v)), s));
                        }
                    }
                }
                changed = s.source.closed.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
            }
        }
    })
}

fn json_event(name: &str, data: &impl Serialize) -> SseEvent {
    let event = SseEvent::default().event(name);
    match event.clone().json_data(data) {
        Ok(e) => e,
        Err(_) => event.data("{}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(project_id: Uuid, n: u128, is_bot: bool) -> EventRow {
        let t = Utc::now();
        EventRow {
            project_id,
            id: Uuid::from_u128(n),
            name: format!("e{n}"),
            ts: t,
            sent_at: t,
            received_at: t,
            time: t,
            anonymous_id: "a".into(),
            session_id: "s".into(),
            user_id: None,
            props: None,
            context: serde_json::value::RawValue::from_string(r#"{"path":"/p"}"#.into()).ok(),
            enrichment: Arc::new(crate::enrich::Enrichment {
                is_bot,
                ..Default::default()
            }),
        }
    }

    #[tokio::test]
    async fn only_watched_projects_new_human_events_are_sent() {
        let store: Arc<dyn EventStore> = Arc::new(
            crate::store::sqlite::SqliteStore::open_url("sqlite::memory:")
                .await
                .unwrap(),
        );
        let feed = Arc::new(CommitFeed::default());
        assert_eq!(feed.last_commit(), None);
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let mut source = feed.source(a, store.clone());
        let rows = [
            row(b, 10, false),
            row(a, 11, true),
            row(a, 12, false),
            row(a, 13, false),
        ];
        feed.committed(&rows, &[true, true, false, true]);
        assert!(feed.last_commit().is_some());
        let got = source.events.try_recv().unwrap();
        assert_eq!(
            (got.id, got.path.as_deref()),
            (Uuid::from_u128(13), Some("/p"))
        );
        assert!(
            source.events.try_recv().is_err(),
            "b's, the bot's and the duplicate are not sent"
        );
        assert_eq!(feed.watched_projects(), 1);
        let second = feed.source(a, store);
        drop(source);
        assert_eq!(feed.watched_projects(), 1);
        drop(second);
        assert_eq!(feed.watched_projects(), 0);
    }
}
