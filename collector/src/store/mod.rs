//! Where events and projects live: one trait, [`EventStore`], with two backends.
//!
//! Postgres ([`postgres`]) is the production store (partitioned, shared by many collectors);
//! SQLite ([`sqlite`]) is the embedded default so a newcomer needs no server. Both dedupe on
//! (project, event id) with `INSERT ... ON CONFLICT DO NOTHING` and report which rows were new.

pub mod postgres;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::analytics::{Dimension, Interval, Query, SummaryRow};
use crate::config::DbConfig;
use crate::enrich::Enrichment;
use crate::export::StoredEvent;

/// A stream that owns what it reads from.
pub type BoxStream<'a, T> = futures_util::stream::BoxStream<'a, T>;

/// A project: who may write (write key, origins), who may read (read key), and how fast.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Project {
    pub id: Uuid,
    pub name: String,
    pub write_key: String,
    pub read_key: String,
    /// Allowed `Origin` values (exact match; `*` allows any).
    pub origins: Vec<String>,
    /// Events per second the project may send; `None` is unlimited.
    pub rate_limit: Option<u32>,
}

impl Project {
    /// A new project with fresh random keys.
    pub fn new(name: &str, origins: Vec<String>, rate_limit: Option<u32>) -> Project {
        Project {
            id: Uuid::now_v7(),
            name: name.to_owned(),
            write_key: format!("wk_{}", Uuid::new_v4().simple()),
            read_key: format!("rk_{}", Uuid::new_v4().simple()),
            origins,
            rate_limit,
        }
    }
}

/// Which of a project's keys is presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyKind {
    /// Sends events (`POST /v1/batch`).
    Write,
    /// Reads stats (`GET /v1/stats`).
    Read,
}

impl KeyKind {
    /// The `projects` column holding this key.
    pub(crate) fn column(self) -> &'static str {
        match self {
            KeyKind::Write => "write_key",
            KeyKind::Read => "read_key",
        }
    }
}

/// One validated, enriched event, ready to be stored.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub project_id: Uuid,
    pub id: Uuid,
    pub name: String,
    /// Client clock when the event happened (also the Postgres partition key).
    pub ts: DateTime<Utc>,
    /// Client clock when the batch was sent.
    pub sent_at: DateTime<Utc>,
    /// Server clock when the batch arrived.
    pub received_at: DateTime<Utc>,
    /// Skew-corrected event time: `received_at - (sent_at - ts)`, never after `received_at`.
    pub time: DateTime<Utc>,
    pub anonymous_id: String,
    pub session_id: String,
    pub user_id: Option<String>,
    /// Raw JSON object text, as sent (checked by `validate::check_raw_object`).
    pub props: Option<Box<serde_json::value::RawValue>>,
    pub context: Option<Box<serde_json::value::RawValue>>,
    /// Usually shared by every event of a request.
    pub enrichment: Arc<Enrichment>,
}

impl EventRow {
    /// Bytes this row holds in memory, roughly: its strings and raw JSON plus a fixed part
    /// for the rest (the commit queue is bounded by this as well as by rows).
    pub fn approx_bytes(&self) -> usize {
        const FIXED: usize = std::mem::size_of::<EventRow>();
        FIXED
            + self.name.len()
            + self.anonymous_id.len()
            + self.session_id.len()
            + self.user_id.as_ref().map_or(0, String::len)
            + self.props.as_ref().map_or(0, |r| r.get().len())
            + self.context.as_ref().map_or(0, |r| r.get().len())
    }
}

/// "This batch arrived": committed in the same transaction as the batch's event rows, so a
/// receipt exists exactly when the batch's rows are committed. Kept for
/// `--batch-receipt-ttl-days` (see [`crate::receipts`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BatchReceipt {
    pub project_id: Uuid,
    /// The batch's `batch_id` (checked by `tracklet_wire::is_valid_batch_id`).
    pub batch_id: String,
    /// Server clock when the batch arrived (the first time, when it is sent again).
    pub received_at: DateTime<Utc>,
}

/// Answer of `GET /v1/stats`.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct Stats {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub total_events: i64,
    pub unique_visitors: i64,
    pub unique_sessions: i64,
    pub events_by_name: Vec<NameCount>,
    pub events_per_day: Vec<DayCount>,
}

impl Stats {
    /// Assembles the answer from the three queries every backend runs.
    pub(crate) fn assemble(
        (from, to): (DateTime<Utc>, DateTime<Utc>),
        (total_events, unique_visitors, unique_sessions): (i64, i64, i64),
        by_name: Vec<(String, i64)>,
        per_day: Vec<(String, i64)>,
    ) -> Stats {
        Stats {
            from,
            to,
            total_events,
            unique_visitors,
            unique_sessions,
            events_by_name: by_name
                .into_iter()
                .map(|(name, events)| NameCount { name, events })
                .collect(),
            events_per_day: per_day
                .into_iter()
                .map(|(day, events)| DayCount { day, events })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NameCount {
    pub name: String,
    pub events: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DayCount {
    /// `YYYY-MM-DD`, UTC.
    pub day: String,
    pub events: i64,
}

/// What [`EventStore::maintain_partitions`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PartitionReport {
    pub created: Vec<String>,
    pub dropped: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or cannot serve anyone now (down, pool exhausted,
    /// connection lost, shutting down, out of resources, serialization failure): retry the
    /// same statement later.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// The database answered this statement with an error that does not blame the data: a
    /// read-only standby after failover (25006), a statement or lock timeout (57014, 55P03),
    /// an I/O error (58030), a missing privilege (42501), a constraint added by an operator,
    /// a row routed to a partition being attached at that moment, an unexpected answer.
    /// The server's fault, not the client's: answered 503 with `Retry-After`.
    #[error("database failed: {0}")]
    Failed(#[source] sqlx::Error),
    /// The database refused the data itself (Postgres SQLSTATE class 22, "data exception":
    /// a value the column or `jsonb` cannot hold; SQLite "string or blob too big"). The same
    /// rows would fail again; validation is meant to catch these first.
    #[error("the database refused the data: {0}")]
    Refused(#[source] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("a project named {0:?} already exists")]
    ProjectExists(String),
    #[error("{0}")]
    Configuration(String),
}

impl StoreError {
    /// True unless the failure is proven to be the data's fault: retrying later may succeed,
    /// and the client must not be told its request was bad (503, never 400).
    pub fn is_transient(&self) -> bool {
        !matches!(self, StoreError::Refused(_) | StoreError::ProjectExists(_))
    }

    /// True when the database itself is out of reach: every statement would fail alike, so
    /// a failed group commit is not retried request by request.
    pub fn is_outage(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e),
            sqlx::Error::Database(db) if is_unavailable_sqlstate(db.code().as_deref()) => {
                StoreError::Unavailable(e)
            }
            sqlx::Error::Database(db) if refuses_the_data(db.as_ref()) => StoreError::Refused(e),
            _ => StoreError::Failed(e),
        }
    }
}

/// SQLSTATE classes meaning "the server cannot serve you now" rather than "this statement
/// failed": 08 connection exception, 53 insufficient resources, 57P0x shutdown/cannot
/// connect now, 40001/40P01 serialization failure/deadlock; SQLite busy/locked (5, 6).
fn is_unavailable_sqlstate(code: Option<&str>) -> bool {
    match code {
        Some(c) => {
            c.starts_with("08")
                || c.starts_with("53")
                || c.starts_with("57P0")
                || c == "40001"
                || c == "40P01"
                || c == "5"
                || c == "6"
        }
        None => false,
    }
}

/// Whether a database error blames the data sent rather than the server. Only Postgres'
/// class 22 (data exception: numeric out of range, invalid text for a type, an unsupported
/// Unicode escape in `jsonb`, ...) and SQLite's SQLITE_TOOBIG (18) do; everything else is
/// the server's.
fn refuses_the_data(db: &dyn sqlx::error::DatabaseError) -> bool {
    if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        return pg.code().starts_with("22");
    }
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        // Extended result codes keep the primary code in the low byte.
        return db
            .code()
            .and_then(|c| c.parse::<u32>().ok())
            .is_some_and(|c| c & 0xff == 18);
    }
    false
}

#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// `"postgres"` or `"sqlite"`.
    fn backend(&self) -> &'static str;
    /// Applies the embedded migrations of this backend.
    async fn migrate(&self) -> Result<(), StoreError>;
    /// Cheap round trip proving the database answers.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Stores `rows` and `receipts` in one transaction, skipping (project_id, id) and
    /// (project_id, batch_id) already stored. Returns, for each row, whether it was newly
    /// stored; of repeats within `rows`, only the first can be.
    async fn insert_events(
        &self,
        rows: &[EventRow],
        receipts: &[BatchReceipt],
    ) -> Result<Vec<bool>, StoreError>;
    /// Those of `batch_ids` that have a receipt for `project_id` (in no particular order).
    async fn arrived_batches(
        &self,
        project_id: Uuid,
        batch_ids: &[String],
    ) -> Result<Vec<String>, StoreError>;
    /// Deletes at most `limit` receipts received before `before`; returns how many it deleted.
    async fn delete_receipts_before(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError>;
    async fn add_project(&self, project: &Project) -> Result<(), StoreError>;
    async fn list_projects(&self) -> Result<Vec<Project>, StoreError>;
    /// Removes the project whose name or id is `name_or_id`; false when none matched.
    async fn remove_project(&self, name_or_id: &str) -> Result<bool, StoreError>;
    /// The project whose write or read key is `key`.
    async fn project_by_key(&self, kind: KeyKind, key: &str)
        -> Result<Option<Project>, StoreError>;
    /// The webhook delivery queue kept in this database (see [`crate::webhooks`]); `None`
    /// for a store without one.
    fn deliveries(&self) -> Option<Arc<dyn crate::webhooks::DeliveryStore>> {
        None
    }
    /// Signals "the projects table may have changed", when the backend can tell (Postgres:
    /// `NOTIFY` from a trigger); `None` when it cannot, and projects are then only reloaded
    /// every `--projects-refresh-ms`.
    async fn project_changes(&self) -> Option<tokio::sync::mpsc::Receiver<()>> {
        None
    }
    async fn stats(
        &self,
        project_id: Uuid,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Stats, StoreError>;
    /// Stats API summary (see [`crate::analytics::summary_sql`]).
    async fn analytics_summary(&self, q: &Query) -> Result<SummaryRow, StoreError>;
    /// Stats API timeseries rows (see [`crate::analytics::timeseries_sql`]).
    async fn analytics_timeseries(
        &self,
        q: &Query,
        interval: Interval,
    ) -> Result<Vec<(i64, i64, i64)>, StoreError>;
    /// Stats API breakdown rows (see [`crate::analytics::breakdown_sql`]).
    async fn analytics_breakdown(
        &self,
        q: &Query,
        by: &Dimension,
        limit: u32,
    ) -> Result<Vec<(String, i64, i64)>, StoreError>;
    /// The project's events with `from <= ts < to`, in `ts` order (then id), read from a
    /// cursor as the stream is polled (constant memory whatever the count). Owns what it
    /// needs: the stream may outlive the call (an HTTP body).
    fn export_events(
        &self,
        project_id: Uuid,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> BoxStream<'static, Result<StoredEvent, StoreError>>;
    /// Funnel rows (see [`crate::funnel::funnel_sql`]).
    async fn analytics_funnel(
        &self,
        q: &Query,
        steps: &[crate::funnel::Step],
    ) -> Result<Vec<(i64, i64, i64)>, StoreError>;
    /// Adds the counts to the `ingest_health` table (one upsert per row; see
    /// [`crate::health`]).
    async fn record_ingest_health(
        &self,
        counts: &[crate::health::HealthCount],
    ) -> Result<(), StoreError>;
    /// Ingest health rows of the query's project and range (see
    /// [`crate::health::health_sql`]).
    async fn analytics_health(&self, q: &Query) -> Result<Vec<(i64, String, i64)>, StoreError>;
    /// Distinct visitors and the newest `limit` events of the query's range, for the live
    /// view (see [`crate::live::recent_sql`]).
    async fn analytics_live(
        &self,
        q: &Query,
        limit: u32,
    ) -> Result<(i64, Vec<crate::live::RecentRow>), StoreError>;
    /// Creates monthly partitions from last month to `months_ahead` after `now`'s month, and
    /// drops data older than `retention_months` full months (0 keeps everything).
    async fn maintain_partitions(
        &self,
        now: DateTime<Utc>,
        months_ahead: u32,
        retention_months: u32,
    ) -> Result<PartitionReport, StoreError>;
    /// Counts events committed since the last call into the rollups (at most
    /// [`crate::rollup::DRAIN_BATCH`]); returns how many. Only Postgres has rollups.
    async fn drain_rollups(&self) -> Result<i64, StoreError> {
        Ok(0)
    }
}

/// Opens the store the configuration names: Postgres when a database URL is given, else the
/// embedded SQLite file. Does not migrate.
pub async fn open(db: &DbConfig) -> Result<Arc<dyn EventStore>, StoreError> {
    match db.database_url.as_deref() {
        Some(url) if url.starts_with("postgres:") || url.starts_with("postgresql:") => Ok(
            Arc::new(postgres::PgStore::connect(url, db.max_connections).await?),
        ),
        Some(url) if url.starts_with("sqlite:") => {
            Ok(Arc::new(sqlite::SqliteStore::open_url(url).await?))
        }
        Some(other) => Err(StoreError::Configuration(format!(
            "unsupported database URL scheme in {:?} (use postgres:// or sqlite:)",
            other.split(':').next().unwrap_or_default()
        ))),
        None => Ok(Arc::new(
            sqlite::SqliteStore::open_path(&db.sqlite_path).await?,
        )),
    }
}

/// Maps each row to "newly stored" given the set of keys the database reported inserted: the
/// first row with an inserted key claims it, later repeats are duplicates.
pub(crate) fn claim_inserted(
    rows: &[EventRow],
    mut inserted: std::collections::HashSet<(Uuid, Uuid)>,
) -> Vec<bool> {
    rows.iter()
        .map(|r| inserted.remove(&(r.project_id, r.id)))
        .collect()
}

/// The receipts in key order without repeats (a batch sent twice in one group commit), so
/// concurrent transactions take their locks in one order.
pub(crate) fn sorted_receipts(receipts: &[BatchReceipt]) -> Vec<&BatchReceipt> {
    let mut sorted: Vec<&BatchReceipt> = receipts.iter().collect();
    sorted.sort_unstable();
    sorted.dedup_by(|a, b| (a.project_id, &a.batch_id) == (b.project_id, &b.batch_id));
    sorted
}

/// Runs `rows` (a cursor borrowing `pool`) on a task of its own that owns `pool`, handing
/// the rows over through a small bounded channel: the stream returned owns everything it
/// needs, and the cursor advances only as fast as the stream is read. Dropping the stream
/// stops the task.
pub(crate) fn owned_stream<P, F>(
    pool: P,
    rows: F,
) -> BoxStream<'static, Result<StoredEvent, StoreError>>
where
    P: Send + Sync + 'static,
    F: for<'p> FnOnce(&'p P) -> BoxStream<'p, Result<StoredEvent, StoreError>> + Send + 'static,
{
    let (sender, receiver) = tokio::sync::mpsc::channel(256);
    tokio::spawn(async move {
        use futures_util::StreamExt;
        let mut rows = rows(&pool);
        while let Some(row) = rows.next().await {
            let failed = row.is_err();
            if sender.send(row).await.is_err() || failed {
                break;
            }
        }
    });
    Box::pin(futures_util::stream::unfold(receiver, |mut r| async move {
        r.recv().await.map(|row| (row, r))
    }))
}

/// The enrichment columns of an `events` row (same names and types in both backends).
pub(crate) fn enrichment_from_row<'r, R>(row: &'r R) -> Result<Enrichment, sqlx::Error>
where
    R: sqlx::Row,
    &'r str: sqlx::ColumnIndex<R>,
    Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    bool: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(Enrichment {
        browser: row.try_get("browser")?,
        browser_version: row.try_get("browser_version")?,
        os: row.try_get("os")?,
        device_type: row.try_get("device_type")?,
        is_bot: row.try_get("is_bot")?,
        bot_reason: row.try_get("bot_reason")?,
        ip: row.try_get("ip")?,
        country: row.try_get("country")?,
        city: row.try_get("city")?,
    })
}

/// First instant of the month `offset` months after the month of `t` (negative: before).
pub fn month_start(t: DateTime<Utc>, offset: i32) -> DateTime<Utc> {
    use chrono::{Datelike, TimeZone};
    let months = t.year() * 12 + t.month0() as i32 + offset;
    let (year, month0) = (months.div_euclid(12), months.rem_euclid(12) as u32);
    Utc.with_ymd_and_hms(year, month0 + 1, 1, 0, 0, 0)
        .single()
        .unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn month_start_crosses_years() {
        let t = DateTime::parse_from_rfc3339("2026-11-22T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(month_start(t, 0).to_rfc3339(), "2026-11-01T00:00:00+00:00");
        assert_eq!(month_start(t, 2).to_rfc3339(), "2027-01-01T00:00:00+00:00");
        assert_eq!(
            month_start(t, -11).to_rfc3339(),
            "2025-12-01T00:00:00+00:00"
        );
    }
}
