//! Rollups on Postgres: what keeps the stats API fast on millions of events.
//!
//! Tables (migrations 0004 and 0007): `rollup_hourly`, per project, dimension value and
//! hour, the events, page views and a HyperLogLog of the visitors (`hll` extension);
//! `rollup_sessions`, one row per session (first and last event time, events, page views,
//! entry and exit page view); `rollup_session_hours` and `rollup_session_ends`, per hour of
//! a session's start, its sessions, bounces and length, and per entry and exit page its
//! sessions and visitors; and `rollup_inbox`, the committed events not yet counted.
//!
//! The statement that inserts events only adds the rows it stored to the inbox
//! ([`insert_sql`]), so the rollups cost a group commit one narrow insert. [`drain`] counts
//! the inbox in bulk under an advisory lock, deleting what it counts in the same
//! transaction: every committed event is counted exactly once, whichever collector drains,
//! and a duplicate never reaches the inbox. It moves a changed session's contribution
//! between hours and pages (the old figures out, the new in). `serve` and `sink` drain every
//! [`DRAIN_INTERVAL`] ([`keep_drained`]); a stats query drains first, so it sees every event
//! committed before it. [`rebuild`] fills the tables from stored events.
//!
//! A query is answered from them when they can answer it exactly as the raw-event SQL of
//! [`crate::analytics`] would (visitors aside, which HyperLogLog estimates: exact for small
//! sets, about 2 % off beyond a few hundred): the whole hours of the range come from the
//! rollups, the partial hours at its ends from raw events; sessions come from the per-hour
//! session rollups, but those near the range's ends come one row each from
//! `rollup_sessions` and those crossing an end are recomputed from their raw events in the
//! range ([`session_parts`]). Whatever else (filters the rollups do not hold, props) gets
//! `None` here and runs the raw SQL. Without the extension (no tables) everything runs the
//! raw SQL; [`Availability`] says which.

use std::sync::atomic::{AtomicU8, Ordering};

use chrono::{DateTime, Duration, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::analytics::{
    key_order, Builder, Dialect, Dimension, Interval, Query, Statement, Value, PAGE_VIEW,
};
use crate::store::StoreError;

/// The dimensions `rollup_hourly` holds, by their `dim` code (0 is the total, key `''`).
/// A change here owes a rebuild: add a migration that inserts a row into
/// `rollup_rebuild_requests` (as 0009 did for the UTM dimensions).
pub const DIMENSIONS: [(i16, Dimension); 10] = [
    (1, Dimension::Page),
    (2, Dimension::Referrer),
    (3, Dimension::Browser),
    (4, Dimension::Os),
    (5, Dimension::Device),
    (6, Dimension::Country),
    (7, Dimension::Event),
    (8, Dimension::UtmSource),
    (9, Dimension::UtmMedium),
    (10, Dimension::UtmCampaign),
];

/// The columns of inserted events the rollups are computed from (`RETURNING` list).
pub const SOURCE_COLUMNS: &str = "project_id, id, time, name, anonymous_id, session_id, context, \
     browser, os, device_type, country, is_bot";

/// Start of the hour of `time` (UTC), in SQL.
const HOUR: &str = "date_bin('1 hour', time, TIMESTAMPTZ '2000-01-01 00:00:00+00')";
/// The HyperLogLog of one event's visitor, in SQL (aggregate it with `hll_add_agg`).
const VISITOR_HASH: &str = "hll_hash_text(anonymous_id)";

fn code(dimension: &Dimension) -> Option<i16> {
    DIMENSIONS
        .iter()
        .find(|(_, d)| d == dimension)
        .map(|(code, _)| *code)
}

/// The columns of `rollup_sessions` a session's contribution to the per-hour session
/// rollups is computed from.
const SESSION_FIGURES: &str = "project_id, session_id, first_time, last_time, events, pageviews, \
     entry_page, entry_visitor, exit_page, exit_visitor";
/// A session's length in microseconds, in SQL (exact, so contributions move exactly).
const MICROS: &str = "(extract(epoch FROM last_time - first_time) * 1000000)::int8";

/// Start of the hour of timestamp column `column` (UTC), in SQL.
fn hour_of(column: &str) -> String {
    format!("date_bin('1 hour', {column}, TIMESTAMPTZ '2000-01-01 00:00:00+00')")
}

/// The statements that add the events of `source` (a relation with [`SOURCE_COLUMNS`]) to
/// the rollups: data-modifying `WITH` items for `rollup_hourly` and `rollup_sessions`, and,
/// with `moves`, for the per-hour session rollups: each changed session's previous figures
/// (read before its upsert) are taken out of them and its new ones put in. Without `moves`
/// (the rebuild) those are filled afterwards from `rollup_sessions` ([`fill_session_sql`]).
/// Rows are upserted in key order, so concurrent writers lock them in one order.
pub fn upsert_ctes(source: &str, moves: bool) -> String {
    let mut b = Builder::new(Dialect::Postgres);
    // The events are first grouped by visitor, hour and every dimension's key (computed
    // once per event here), then each group is spread over the dimensions by a VALUES
    // list of plain column references. Events that share all of these (a visitor's clicks
    // and scrolls on one page) become one row before the spreading and the HyperLogLog, and
    // no long expression sits in the VALUES list, whose expression state Postgres builds
    // each time it reads a row (nodeValuesscan.c): on 200,000 events the UTM keys inline
    // took 13.8 s against 1.0 s computed once per event; on 50,000 events the grouping
    // took the hourly upsert from 400 to 280 ms (5,000 visitors, 50 pages) or 190 ms (128
    // visitors, one page), 2026-12-01.
    let key_columns: Vec<String> = DIMENSIONS
        .iter()
        .map(|(code, d)| format!("{} AS key_{code}", b.expr(d)))
        .collect();
    let keys: Vec<String> = DIMENSIONS
        .iter()
        .map(|(code, _)| format!("({code}, key_{code})"))
        .collect();
    let keys = keys.join(", ");
    let grouped_by: Vec<String> = (1..=3 + DIMENSIONS.len()).map(|n| n.to_string()).collect();
    let grouped = format!(
        "(SELECT project_id, {HOUR} AS hour, anonymous_id, {}, count(*) AS n, \
             count(*) FILTER (WHERE name = '{PAGE_VIEW}') AS pv \
         FROM {source} WHERE NOT is_bot GROUP BY {}) AS g",
        key_columns.join(", "),
        grouped_by.join(", ")
    );
    let (ends, ends_agg, ends_set) = session_ends();
    let ends_join = session_ends_join(source);
    let first_hour = hour_of("first_time");
    let (old, returning, moved) = if moves {
        (
            format!(
                "sessions_old AS MATERIALIZED (SELECT {SESSION_FIGURES} FROM rollup_sessions \
                     WHERE (project_id, session_id) IN \
                         (SELECT project_id, session_id FROM {source} WHERE NOT is_bot)), "
            ),
            format!(" RETURNING {SESSION_FIGURES}"),
            format!(
                ", session_moves AS (SELECT -1 AS sign, {SESSION_FIGURES} FROM sessions_old \
                     UNION ALL SELECT 1, {SESSION_FIGURES} FROM rollup_sessions_seen), \
                 rollup_session_hours_moved AS (\
                     INSERT INTO rollup_session_hours AS h (project_id, hour, sessions, bounces, \
                         micros, max_micros) \
                     SELECT project_id, {first_hour}, sum(sign)::int8, \
                         sum(sign * (events = 1 AND pageviews = 1)::int)::int8, \
                         sum(sign * {MICROS})::int8, \
                         coalesce(max({MICROS}) FILTER (WHERE sign > 0), 0) \
                     FROM session_moves GROUP BY 1, 2 ORDER BY 1, 2 \
                     ON CONFLICT (project_id, hour) DO UPDATE SET \
                         sessions = h.sessions + excluded.sessions, \
                         bounces = h.bounces + excluded.bounces, \
                         micros = h.micros + excluded.micros, \
                         max_micros = greatest(h.max_micros, excluded.max_micros)), \
                 end_moves AS (\
                     SELECT project_id, 0::int2 AS kind, {first_hour} AS hour, \
                         entry_page AS page, entry_visitor AS visitor, sign \
                     FROM session_moves WHERE entry_page IS NOT NULL \
                     UNION ALL SELECT project_id, 1::int2, {first_hour}, exit_page, \
                         exit_visitor, sign \
                     FROM session_moves WHERE exit_page IS NOT NULL), \
                 end_net AS (SELECT project_id, kind, hour, page, visitor, sum(sign) AS n \
                     FROM end_moves GROUP BY 1, 2, 3, 4, 5 HAVING sum(sign) <> 0), \
                 rollup_session_ends_moved AS (\
                     INSERT INTO rollup_session_ends AS r (project_id, kind, hour, page, \
                         sessions, visitors, stale) \
                     SELECT project_id, kind, hour, page, sum(n)::int8, \
                         coalesce(hll_add_agg(hll_hash_text(visitor)) FILTER (WHERE n > 0), \
                             hll_empty()), \
                         bool_or(n < 0) \
                     FROM end_net GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4 \
                     ON CONFLICT (project_id, kind, hour, page) DO UPDATE SET \
                         sessions = r.sessions + excluded.sessions, \
                         visitors = hll_union(r.visitors, excluded.visitors), \
                         stale = r.stale OR excluded.stale)"
            ),
        )
    } else {
        (String::new(), String::new(), String::new())
    };
    format!(
        "rollup_hours AS (\
             INSERT INTO rollup_hourly AS r (project_id, dim, hour, key, events, pageviews, \
                 visitors) \
             SELECT project_id, d.dim, hour, d.key, sum(n)::int8, sum(pv)::int8, \
                 hll_add_agg({VISITOR_HASH}) \
             FROM {grouped} CROSS JOIN LATERAL (VALUES (0::int2, ''), {keys}) AS d(dim, key) \
             WHERE d.key IS NOT NULL \
             GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4 \
             ON CONFLICT (project_id, dim, hour, key) DO UPDATE SET \
                 events = r.events + excluded.events, \
                 pageviews = r.pageviews + excluded.pageviews, \
                 visitors = hll_union(r.visitors, excluded.visitors)), \
         {old}rollup_sessions_seen AS (\
             INSERT INTO rollup_sessions AS s (project_id, session_id, first_time, last_time, \
                 events, pageviews, {ends}) \
             SELECT g.project_id, g.session_id, first_time, last_time, events, pageviews, \
                 {ends_agg} \
             FROM (SELECT project_id, session_id, min(time) AS first_time, \
                     max(time) AS last_time, count(*) AS events, \
                     count(*) FILTER (WHERE name = '{PAGE_VIEW}') AS pageviews \
                 FROM {source} WHERE NOT is_bot GROUP BY 1, 2) AS g \
             {ends_join} \
             ORDER BY 1, 2 \
             ON CONFLICT (project_id, session_id) DO UPDATE SET \
                 first_time = least(s.first_time, excluded.first_time), \
                 last_time = greatest(s.last_time, excluded.last_time), \
                 events = s.events + excluded.events, \
                 pageviews = s.pageviews + excluded.pageviews, {ends_set}{returning}){moved}"
    )
}

/// The statements that fill the per-hour session rollups of `$1` (every project: NULL) from
/// `rollup_sessions` (the rebuild).
fn fill_session_sql() -> [String; 2] {
    let first_hour = hour_of("first_time");
    let project = "($1::uuid IS NULL OR project_id = $1)";
    [
        format!(
            "INSERT INTO rollup_session_hours (project_id, hour, sessions, bounces, micros, \
                 max_micros) \
             SELECT project_id, {first_hour}, count(*), \
                 count(*) FILTER (WHERE events = 1 AND pageviews = 1), \
                 coalesce(sum({MICROS}), 0)::int8, coalesce(max({MICROS}), 0) \
             FROM rollup_sessions WHERE {project} GROUP BY 1, 2"
        ),
        format!(
            "INSERT INTO rollup_session_ends (project_id, kind, hour, page, sessions, visitors) \
             SELECT project_id, 0, {first_hour}, entry_page, count(*), \
                 hll_add_agg(hll_hash_text(entry_visitor)) \
             FROM rollup_sessions WHERE {project} AND entry_page IS NOT NULL \
             GROUP BY 1, 2, 3, 4 \
             UNION ALL \
             SELECT project_id, 1, {first_hour}, exit_page, count(*), \
                 hll_add_agg(hll_hash_text(exit_visitor)) \
             FROM rollup_sessions WHERE {project} AND exit_page IS NOT NULL \
             GROUP BY 1, 2, 3, 4"
        ),
    ]
}

/// A session's entry and exit page views: (column prefix and alias, order, comparison that
/// makes the new one replace the stored one).
const ENDS: [(&str, &str, &str); 2] = [("entry", "ASC", "<"), ("exit", "DESC", ">")];
/// The columns of each end, and what they hold for its page view.
const END_COLUMNS: [(&str, &str); 4] = [
    ("time", "time"),
    ("id", "id"),
    ("page", "page"),
    ("visitor", "anonymous_id"),
];

/// Column list, values (from [`session_ends_join`]) and upsert assignments of the session
/// ends, for [`upsert_ctes`].
fn session_ends() -> (String, String, String) {
    let (mut columns, mut values, mut assignments) = (Vec::new(), Vec::new(), Vec::new());
    for (end, _, newer) in ENDS {
        let replaces = format!(
            "excluded.{end}_time IS NOT NULL AND (s.{end}_time IS NULL \
             OR (excluded.{end}_time, excluded.{end}_id) {newer} (s.{end}_time, s.{end}_id))"
        );
        for (column, _) in END_COLUMNS {
            columns.push(format!("{end}_{column}"));
            values.push(format!("{end}.{column}"));
            assignments.push(format!(
                "{end}_{column} = CASE WHEN {replaces} THEN excluded.{end}_{column} \
                 ELSE s.{end}_{column} END"
            ));
        }
    }
    (
        columns.join(", "),
        values.join(", "),
        assignments.join(", "),
    )
}

/// The first and last page view of each session of `source` (one sort each, `DISTINCT ON`),
/// joined to the sessions `g`.
fn session_ends_join(source: &str) -> String {
    let path = Builder::new(Dialect::Postgres).expr(&Dimension::Page);
    let mut joins = Vec::new();
    for (end, order, _) in ENDS {
        let values: Vec<String> = END_COLUMNS
            .iter()
            .map(|(column, value)| {
                let value = if *column == "page" {
                    path.as_str()
                } else {
                    value
                };
                format!("{value} AS {column}")
            })
            .collect();
        joins.push(format!(
            "LEFT JOIN (SELECT DISTINCT ON (project_id, session_id) project_id, session_id, {} \
                 FROM {source} WHERE NOT is_bot AND name = '{PAGE_VIEW}' \
                 ORDER BY project_id, session_id, time {order}, id {order}) AS {end} \
             ON {end}.project_id = g.project_id AND {end}.session_id = g.session_id",
            values.join(", ")
        ));
    }
    joins.join(" ")
}

/// The event insert of the commit path with the rollups on: `with` are its leading `WITH`
/// items (without the keyword), `insert` its `INSERT ... ON CONFLICT DO NOTHING` (without
/// `RETURNING`). The events it stored (bots aside) are added to `rollup_inbox` in the same
/// statement, for [`drain`]; the rollups themselves are not touched here. Returns the
/// inserted `(project_id, id)` like the plain statement.
pub fn insert_sql(with: &str, insert: &str) -> String {
    format!(
        "WITH {with}, ins AS ({insert} RETURNING {SOURCE_COLUMNS}), \
         inbox AS (INSERT INTO rollup_inbox ({INBOX_COLUMNS}) \
             SELECT {INBOX_COLUMNS} FROM ins WHERE NOT is_bot) \
         SELECT project_id, id FROM ins"
    )
}

/// The columns of `rollup_inbox`: [`SOURCE_COLUMNS`] but `is_bot` (bots are not counted).
const INBOX_COLUMNS: &str = "project_id, id, time, name, anonymous_id, session_id, context, \
     browser, os, device_type, country";

/// Advisory lock held by whoever changes the rollups ([`drain`], [`rebuild`],
/// [`forget_before`]): one writer at a time, so a session's previous figures read by a drain
/// are still its figures when the drain moves them.
const ROLLUP_LOCK_ID: i64 = 0x726f_6c6c_7570_7331; // "rollups1"
/// How often `serve` and `sink` drain the inbox ([`keep_drained`]).
pub const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);
/// Events a drain counts per transaction.
pub const DRAIN_BATCH: i64 = 50_000;
/// Stale entry/exit rows a drain recomputes per transaction.
const STALE_BATCH: i64 = 500;
/// Most events a stats query drains before it answers (a larger backlog is left to the
/// rollup task, and the answer misses what is left).
pub const STATS_DRAIN_MAX: i64 = 200_000;

/// The drain statement: takes up to `$1` events out of `rollup_inbox` and counts them into
/// the rollups; returns how many events it counted.
fn drain_sql() -> String {
    format!(
        "WITH src AS (DELETE FROM rollup_inbox \
             WHERE ctid = ANY (ARRAY(SELECT ctid FROM rollup_inbox LIMIT $1)) \
             RETURNING {INBOX_COLUMNS}, false AS is_bot), \
         {} SELECT count(*) FROM src",
        upsert_ctes("src", true)
    )
}

/// Whether committed events wait in `rollup_inbox`. A drain that has taken them but not
/// committed yet still shows them, so "no" means every committed event is in the rollups.
async fn pending(pool: &PgPool) -> Result<bool, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM rollup_inbox)")
            .fetch_one(pool)
            .await?,
    )
}

/// Counts the events waiting in `rollup_inbox` into the rollups, at most `max_events`
/// ([`DRAIN_BATCH`] per transaction), and recomputes stale entry/exit rows. Each transaction
/// deletes what it counts, under [`ROLLUP_LOCK_ID`], so every committed event is counted
/// exactly once whichever collector drains it, and a collector dying mid-drain leaves its
/// events in the inbox. Returns the events counted.
pub async fn drain(pool: &PgPool, max_events: i64) -> Result<i64, StoreError> {
    let sql = drain_sql();
    let mut counted = 0;
    loop {
        let batch = DRAIN_BATCH.min(max_events - counted);
        if batch <= 0 {
            return Ok(counted);
        }
        let mut tx = pool.begin().await?;
        lock(&mut tx).await?;
        // The drain's sorts and aggregates over tens of thousands of events stay in memory.
        sqlx::query("SET LOCAL work_mem = '64MB'")
            .execute(&mut *tx)
            .await?;
        let n: i64 = sqlx::query_scalar(&sql)
            .bind(batch)
            .fetch_one(&mut *tx)
            .await?;
        refresh_stale(&mut tx).await?;
        tx.commit().await?;
        counted += n;
        if n < batch {
            return Ok(counted);
        }
    }
}

/// Drains before a stats query: what was committed before it is in its answer.
pub async fn drain_for_query(pool: &PgPool) -> Result<(), StoreError> {
    if pending(pool).await? {
        drain(pool, STATS_DRAIN_MAX).await?;
    }
    Ok(())
}

/// Recomputes the visitors of up to [`STALE_BATCH`] stale entry/exit rows from
/// `rollup_sessions` (rows left without sessions are deleted).
async fn refresh_stale(conn: &mut sqlx::PgConnection) -> Result<(), StoreError> {
    sqlx::query(&format!(
        "WITH picked AS (SELECT project_id, kind, hour, page FROM rollup_session_ends \
             WHERE stale LIMIT {STALE_BATCH}), \
         gone AS (DELETE FROM rollup_session_ends r USING picked p \
             WHERE (r.project_id, r.kind, r.hour, r.page) = (p.project_id, p.kind, p.hour, p.page) \
                 AND r.sessions = 0) \
         UPDATE rollup_session_ends r SET stale = false, visitors = {} \
         FROM picked p \
         WHERE (r.project_id, r.kind, r.hour, r.page) = (p.project_id, p.kind, p.hour, p.page) \
             AND r.sessions <> 0",
        stale_visitors("r")
    ))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The visitors of stale entry/exit row `r`, from `rollup_sessions`, in SQL.
fn stale_visitors(r: &str) -> String {
    format!(
        "coalesce((SELECT hll_add_agg(hll_hash_text(CASE WHEN {r}.kind = 0 \
             THEN s.entry_visitor ELSE s.exit_visitor END)) \
         FROM rollup_sessions s WHERE s.project_id = {r}.project_id \
             AND s.first_time >= {r}.hour AND s.first_time < {r}.hour + interval '1 hour' \
             AND (CASE WHEN {r}.kind = 0 THEN s.entry_page ELSE s.exit_page END) = {r}.page), \
         hll_empty())"
    )
}

/// Keeps `rollup_inbox` drained (about every `every`) until shutdown: `serve` and `sink`
/// run it, so several collectors share the work (one at a time holds the lock).
pub async fn keep_drained(
    store: std::sync::Arc<dyn crate::store::EventStore>,
    every: std::time::Duration,
    shutdown: crate::shutdown::Shutdown,
) {
    loop {
        let full = match store.drain_rollups().await {
            Ok(n) => n >= DRAIN_BATCH,
            Err(e) => {
                tracing::warn!(error = %e, "draining the rollup inbox failed; will retry");
                false
            }
        };
        if !full {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.wait() => return,
            }
        } else if shutdown.is_triggered() {
            return;
        }
    }
}

/// Whether this database has the rollups (checked once per process, on first use).
#[derive(Debug, Default)]
pub struct Availability(AtomicU8);

const UNKNOWN: u8 = 0;
const ON: u8 = 1;
const OFF: u8 = 2;

impl Availability {
    /// Never use the rollups: stats from raw events, inserts without rollups.
    pub fn off() -> Availability {
        Availability(AtomicU8::new(OFF))
    }

    pub async fn on(&self, pool: &PgPool) -> Result<bool, StoreError> {
        match self.0.load(Ordering::Relaxed) {
            ON => return Ok(true),
            OFF => return Ok(false),
            _ => {}
        }
        let on = tables_exist(pool).await?;
        let previous = self.0.swap(if on { ON } else { OFF }, Ordering::Relaxed);
        if previous == UNKNOWN && !on {
            tracing::warn!(
                "the hll extension was not available when the database was migrated: no \
                 rollups, the stats API scans raw events (see docs/collector.md, \"Rollups\")"
            );
        }
        Ok(on)
    }
}

async fn tables_exist(pool: &PgPool) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT to_regclass('rollup_hourly') IS NOT NULL \
             AND to_regclass('rollup_sessions') IS NOT NULL \
             AND to_regclass('rollup_inbox') IS NOT NULL \
             AND to_regclass('rollup_session_hours') IS NOT NULL \
             AND to_regclass('rollup_session_ends') IS NOT NULL",
    )
    .fetch_one(pool)
    .await?)
}

/// Refills the rollups of `project` (every project: `None`) from its stored events, a day
/// of event time per statement, with the drain's SQL; then the per-hour session rollups from
/// `rollup_sessions`. Inserts wait meanwhile (the events table is share-locked) and the
/// inbox of those events is emptied, so nothing is counted twice; the tables are analyzed
/// after. Returns the events counted.
pub async fn rebuild(pool: &PgPool, project: Option<Uuid>) -> Result<i64, StoreError> {
    let mut tx = pool.begin().await?;
    lock(&mut tx).await?;
    let counted = refill(&mut tx, project).await?;
    tx.commit().await?;
    analyze(pool).await?;
    Ok(counted)
}

/// Rebuilds every project's rollups if a migration asked for it (a row in
/// `rollup_rebuild_requests`), and deletes the requests in the same transaction: of
/// collectors starting together, the first to take the rollup lock rebuilds, the others
/// then find nothing owed. `None` when nothing was owed or there are no rollups.
pub async fn rebuild_if_requested(pool: &PgPool) -> Result<Option<i64>, StoreError> {
    if !tables_exist(pool).await? || !rebuild_requested(pool).await? {
        return Ok(None);
    }
    let mut tx = pool.begin().await?;
    lock(&mut tx).await?;
    if !rebuild_requested(&mut *tx).await? {
        return Ok(None);
    }
    let counted = refill(&mut tx, None).await?;
    sqlx::query("DELETE FROM rollup_rebuild_requests")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    analyze(pool).await?;
    Ok(Some(counted))
}

async fn rebuild_requested<'c>(conn: impl sqlx::PgExecutor<'c>) -> Result<bool, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM rollup_rebuild_requests)")
            .fetch_one(conn)
            .await?,
    )
}

/// Takes the rollup lock for the rest of the transaction.
async fn lock(conn: &mut sqlx::PgConnection) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(ROLLUP_LOCK_ID)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The body of [`rebuild`], in a transaction holding the rollup lock.
async fn refill(conn: &mut sqlx::PgConnection, project: Option<Uuid>) -> Result<i64, StoreError> {
    sqlx::query("LOCK TABLE events IN SHARE MODE")
        .execute(&mut *conn)
        .await?;
    for table in [
        "rollup_inbox",
        "rollup_hourly",
        "rollup_sessions",
        "rollup_session_hours",
        "rollup_session_ends",
    ] {
        sqlx::query(&format!(
            "DELETE FROM {table} WHERE $1::uuid IS NULL OR project_id = $1"
        ))
        .bind(project)
        .execute(&mut *conn)
        .await?;
    }
    let (first, last): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT min(time), max(time) FROM events WHERE $1::uuid IS NULL OR project_id = $1",
    )
    .bind(project)
    .fetch_one(&mut *conn)
    .await?;
    let mut counted = 0;
    if let (Some(first), Some(last)) = (first, last) {
        let sql = format!(
            "WITH src AS (SELECT {SOURCE_COLUMNS} FROM events \
                 WHERE ($1::uuid IS NULL OR project_id = $1) AND time >= $2 AND time < $3), \
             {} SELECT count(*) FROM src",
            upsert_ctes("src", false)
        );
        let mut start = floor_hour(first);
        while start <= last {
            let end = start + Duration::days(1);
            let n: i64 = sqlx::query_scalar(&sql)
                .bind(project)
                .bind(start)
                .bind(end)
                .fetch_one(&mut *conn)
                .await?;
            counted += n;
            start = end;
        }
    }
    for sql in fill_session_sql() {
        sqlx::query(&sql).bind(project).execute(&mut *conn).await?;
    }
    Ok(counted)
}

/// Planner statistics for the tables just filled (and events, often bulk-loaded before).
async fn analyze(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::query(
        "ANALYZE events, rollup_hourly, rollup_sessions, rollup_session_hours, \
         rollup_session_ends",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Deletes the rollups of hours (and sessions ending) before `cutoff`: retention drops the
/// events of whole months, and the figures must not outlive them. An hour's session figures
/// go once every session starting in it has ended before `cutoff` (so the sessions that
/// cross `cutoff` can still be found from their hour).
pub async fn forget_before(
    conn: &mut sqlx::PgConnection,
    cutoff: DateTime<Utc>,
) -> Result<(), StoreError> {
    lock(conn).await?;
    for sql in [
        "DELETE FROM rollup_hourly WHERE hour < $1",
        "DELETE FROM rollup_sessions WHERE last_time < $1",
        "DELETE FROM rollup_session_hours WHERE hour < $1 \
         AND hour + interval '1 hour' + max_micros * interval '1 microsecond' <= $1",
        "DELETE FROM rollup_session_ends e WHERE hour < $1 AND NOT EXISTS \
         (SELECT 1 FROM rollup_session_hours h \
             WHERE h.project_id = e.project_id AND h.hour = e.hour)",
    ] {
        sqlx::query(sql).bind(cutoff).execute(&mut *conn).await?;
    }
    Ok(())
}

fn floor_hour(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(t.timestamp().div_euclid(3600) * 3600, 0).unwrap_or(t)
}

/// The whole hours of `[from, to)`: `[m1, m2)` (empty when `m1 >= m2`). Events before `m1`
/// or from `m2` on are read raw.
fn whole_hours(from: DateTime<Utc>, to: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let floor = floor_hour(from);
    let m1 = if floor == from {
        from
    } else {
        floor + Duration::hours(1)
    };
    (m1, floor_hour(to))
}

/// `count(DISTINCT anonymous_id)` from HyperLogLogs `v`.
const VISITORS: &str = "coalesce(round(hll_cardinality(hll_union_agg(v))), 0)::int8";

/// The sessions of `[from, to)` are read in two parts (binds `p`, `from`, `to`, and `m1`,
/// the first whole hour). `span` finds `lo`, the earliest hour a session crossing `from`
/// can start in, and `c`, the hour from which on sessions may cross `to` (at most the end
/// of the whole hours), from each hour's longest session. Sessions starting in
/// `[m1, c)` lie entirely in the range: their figures come from the per-hour session rollups.
/// `rows` are the other sessions with events in the range, one `rollup_sessions` row each
/// (starting in `[lo, m1)` or `[c, to)`: the partial hours and the ends), `inside` when all
/// their events are in the range; those that are not are recomputed from raw events.
fn session_parts(p: &str, from: &str, to: &str, m1: &str, m2: &str) -> String {
    let one = "interval '1 hour' + max_micros * interval '1 microsecond'";
    let row = |range: &str| {
        format!(
            "SELECT session_id, first_time, last_time, events, pageviews, entry_page, \
                 entry_visitor, exit_page, exit_visitor, \
                 first_time >= {from} AND last_time < {to} AS inside \
             FROM rollup_sessions WHERE project_id = {p} AND last_time >= {from} \
                 AND {range}"
        )
    };
    format!(
        "span AS (SELECT least({from}, min(hour) FILTER (WHERE hour < {from} \
                 AND hour + {one} > {from})) AS lo, \
             least({m2}, min(hour) FILTER (WHERE hour + {one} > {to})) AS c \
             FROM rollup_session_hours WHERE project_id = {p} AND hour < {to}), \
         rows AS ({} UNION ALL {}), ",
        row(&format!(
            "first_time >= (SELECT lo FROM span) AND first_time < least({m1}, {to})"
        )),
        row(&format!(
            "first_time >= greatest((SELECT c FROM span), {m1}) AND first_time < {to}"
        ))
    )
}

/// The summary from the rollups (see [`crate::analytics::summary_sql`] for what it means);
/// `None` when the query has filters.
pub fn summary_sql(q: &Query) -> Option<Statement> {
    if !q.filters.0.is_empty() {
        return None;
    }
    let mut b = Builder::new(Dialect::Postgres);
    let events = b.base(q);
    let p = b.bind(Value::Project(q.project_id));
    let (from, to) = (b.bind(Value::Time(q.from)), b.bind(Value::Time(q.to)));
    let (m1, m2) = whole_hours(q.from, q.to);
    let (m1, m2) = (b.bind(Value::Time(m1)), b.bind(Value::Time(m2)));
    let parts = session_parts(&p, &from, &to, &m1, &m2);
    // Session lengths are summed exactly (microseconds, numeric) and rounded once, as the
    // raw SQL does. Sessions entirely in the range are summed (per hour, or per row at the ends); those
    // with events on both sides of an end are recomputed from their events in the range,
    // which lie between `from` and the latest end of those crossing it, or between the
    // earliest start of those crossing `to` and `to` (so only the ends of the range are
    // scanned).
    let sql = format!(
        "WITH hours AS (SELECT events, pageviews, visitors FROM rollup_hourly \
             WHERE project_id = {p} AND dim = 0 AND key = '' AND hour >= {m1} AND hour < {m2}), \
         edge AS (SELECT anonymous_id, name FROM events \
             WHERE {events} AND (time < {m1} OR time >= {m2})), \
         {parts}\
         agg AS (SELECT coalesce(sum(sessions), 0)::int8 AS n, \
                 coalesce(sum(bounces), 0)::int8 AS bounced, \
                 coalesce(sum(micros), 0)::int8 AS micros \
             FROM rollup_session_hours \
             WHERE project_id = {p} AND hour >= {m1} AND hour < (SELECT c FROM span)), \
         sess AS (SELECT count(*) FILTER (WHERE inside) AS n, \
                 count(*) FILTER (WHERE inside AND events = 1 AND pageviews = 1) AS bounced, \
                 coalesce(sum({MICROS}) FILTER (WHERE inside), 0)::int8 AS micros, \
                 coalesce(array_agg(session_id) FILTER (WHERE NOT inside), '{{}}') AS crossing, \
                 max(last_time) FILTER (WHERE first_time < {from}) AS lo, \
                 min(first_time) FILTER (WHERE last_time >= {to}) AS hi \
             FROM rows), \
         crossing AS (SELECT count(*) AS n, count(*) FILTER (WHERE name = '{PAGE_VIEW}') AS pv, \
                 extract(epoch FROM max(time) - min(time)) AS secs \
             FROM events WHERE {events} \
                 AND (time <= (SELECT lo FROM sess) OR time >= (SELECT hi FROM sess)) \
                 AND session_id = ANY ((SELECT crossing FROM sess)::text[]) \
             GROUP BY session_id), \
         sessions AS (SELECT (SELECT n FROM agg) + (SELECT n FROM sess) \
             + (SELECT count(*) FROM crossing) AS n) \
         SELECT (SELECT {VISITORS} FROM (SELECT visitors AS v FROM hours UNION ALL \
                 SELECT hll_add_agg({VISITOR_HASH}) FROM edge) AS vs), \
             (SELECT n FROM sessions), \
             (SELECT coalesce(sum(pageviews), 0)::int8 FROM hours) \
                 + (SELECT count(*) FROM edge WHERE name = '{PAGE_VIEW}'), \
             (SELECT coalesce(sum(events), 0)::int8 FROM hours) + (SELECT count(*) FROM edge), \
             (SELECT n FROM sessions), \
             (SELECT bounced FROM agg) + (SELECT bounced FROM sess) \
                 + (SELECT count(*) FROM crossing WHERE n = 1 AND pv = 1), \
             CASE WHEN (SELECT n FROM sessions) > 0 THEN \
                 (((SELECT micros FROM agg) + (SELECT micros FROM sess)) / 1000000.0 \
                 + (SELECT coalesce(sum(secs), 0) FROM crossing))::float8 END"
    );
    Some(b.finish(sql))
}

/// The rollup rows a query's filters select: `(dim, key)`, when there is at most one filter
/// and the rollups hold its dimension (no filter: the total).
fn one_filter(q: &Query) -> Option<(i16, Option<&str>)> {
    match q.filters.0.as_slice() {
        [] => Some((0, None)),
        [(dimension, value)] => Some((code(dimension)?, Some(value.as_str()))),
        _ => None,
    }
}

/// Timeseries rows from the rollups (see [`crate::analytics::timeseries_sql`]); `None` with
/// more than one filter or a filter the rollups do not hold.
pub fn timeseries_sql(q: &Query, interval: Interval) -> Option<Statement> {
    let (dim, key) = one_filter(q)?;
    let mut b = Builder::new(Dialect::Postgres);
    let selected = b.selected(q);
    let p = b.bind(Value::Project(q.project_id));
    let (m1, m2) = whole_hours(q.from, q.to);
    let (m1, m2) = (b.bind(Value::Time(m1)), b.bind(Value::Time(m2)));
    let key = b.bind(Value::Text(key.unwrap_or_default().to_owned()));
    let width = interval.seconds();
    let sql = format!(
        "WITH parts AS (\
             SELECT hour AS t, pageviews AS pv, visitors AS v FROM rollup_hourly \
             WHERE project_id = {p} AND dim = {dim} AND key = {key} \
                 AND hour >= {m1} AND hour < {m2} \
             UNION ALL \
             SELECT {HOUR}, count(*) FILTER (WHERE name = '{PAGE_VIEW}'), \
                 hll_add_agg({VISITOR_HASH}) \
             FROM events WHERE {selected} AND (time < {m1} OR time >= {m2}) GROUP BY 1) \
         SELECT (floor(extract(epoch FROM t) / {width}))::int8 * {width} AS bucket, \
             {VISITORS}, coalesce(sum(pv), 0)::int8 \
         FROM parts GROUP BY bucket ORDER BY bucket"
    );
    Some(b.finish(sql))
}

/// Breakdown rows from the rollups (see [`crate::analytics::breakdown_sql`]); `None` for a
/// dimension they do not hold, or with a filter on another dimension.
pub fn breakdown_sql(q: &Query, by: &Dimension, limit: u32) -> Option<Statement> {
    if matches!(by, Dimension::EntryPage | Dimension::ExitPage) {
        return session_ends_sql(q, by, limit);
    }
    let dim = code(by)?;
    let key_filter = match q.filters.0.as_slice() {
        [] => None,
        [(dimension, value)] if dimension == by => Some(value.clone()),
        _ => return None,
    };
    let mut b = Builder::new(Dialect::Postgres);
    let selected = b.selected(q);
    let expr = b.expr(by);
    let p = b.bind(Value::Project(q.project_id));
    let (m1, m2) = whole_hours(q.from, q.to);
    let (m1, m2) = (b.bind(Value::Time(m1)), b.bind(Value::Time(m2)));
    let key_filter = match key_filter {
        Some(value) => format!("AND key = {}", b.bind(Value::Text(value))),
        None => String::new(),
    };
    let limit = b.bind(Value::Int(i64::from(limit)));
    let order = key_order(Dialect::Postgres);
    let sql = format!(
        "WITH parts AS (\
             SELECT key, events AS n, visitors AS v FROM rollup_hourly \
             WHERE project_id = {p} AND dim = {dim} AND hour >= {m1} AND hour < {m2} \
                 {key_filter} \
             UNION ALL \
             SELECT {expr}, count(*), hll_add_agg({VISITOR_HASH}) \
             FROM events WHERE {selected} AND (time < {m1} OR time >= {m2}) GROUP BY 1) \
         SELECT key, {VISITORS} AS visitors, sum(n)::int8 AS events \
         FROM parts WHERE key IS NOT NULL \
         GROUP BY key ORDER BY visitors DESC, events DESC, {order} LIMIT {limit}"
    );
    Some(b.finish(sql))
}

/// Entry or exit page breakdown from the per-hour session rollups (see
/// [`crate::analytics::breakdown_sql`]); `None` with filters. The sessions are read as in
/// [`summary_sql`] (see [`session_parts`]); the visitors of a stale hour row are recomputed
/// from its sessions; sessions crossing an end of the range are recomputed from their page
/// views in the range.
fn session_ends_sql(q: &Query, by: &Dimension, limit: u32) -> Option<Statement> {
    if !q.filters.0.is_empty() {
        return None;
    }
    let (end, kind, direction) = if *by == Dimension::EntryPage {
        ("entry", 0, "ASC")
    } else {
        ("exit", 1, "DESC")
    };
    let mut b = Builder::new(Dialect::Postgres);
    let events = b.base(q);
    let path = b.expr(by);
    let p = b.bind(Value::Project(q.project_id));
    let (from, to) = (b.bind(Value::Time(q.from)), b.bind(Value::Time(q.to)));
    let (m1, m2) = whole_hours(q.from, q.to);
    let (m1, m2) = (b.bind(Value::Time(m1)), b.bind(Value::Time(m2)));
    let limit = b.bind(Value::Int(i64::from(limit)));
    let order = key_order(Dialect::Postgres);
    let parts = session_parts(&p, &from, &to, &m1, &m2);
    let stale = stale_visitors("e");
    let sql = format!(
        "WITH {parts}\
         crossing AS MATERIALIZED (SELECT session_id, first_time, last_time FROM rows \
             WHERE NOT inside), \
         parts AS (\
             SELECT page AS key, sessions AS n, \
                 CASE WHEN stale THEN {stale} ELSE visitors END AS v \
             FROM rollup_session_ends e WHERE e.project_id = {p} AND kind = {kind} \
                 AND hour >= {m1} AND hour < (SELECT c FROM span) AND sessions > 0 \
             UNION ALL \
             SELECT {end}_page, count(*), hll_add_agg(hll_hash_text({end}_visitor)) FROM rows \
             WHERE inside AND {end}_page IS NOT NULL GROUP BY 1 \
             UNION ALL \
             SELECT key, count(*), hll_add_agg(hll_hash_text(anonymous_id)) FROM (\
                 SELECT {path} AS key, anonymous_id, row_number() OVER (\
                     PARTITION BY session_id ORDER BY time {direction}, id {direction}) AS rn \
                 FROM events WHERE {events} AND name = '{PAGE_VIEW}' \
                     AND (time <= (SELECT max(last_time) FROM crossing \
                             WHERE first_time < {from}) \
                         OR time >= (SELECT min(first_time) FROM crossing \
                             WHERE last_time >= {to})) \
                     AND session_id IN (SELECT session_id FROM crossing)) AS c \
             WHERE rn = 1 AND key IS NOT NULL GROUP BY 1) \
         SELECT key, {VISITORS} AS visitors, sum(n)::int8 AS events \
         FROM parts GROUP BY key ORDER BY visitors DESC, events DESC, {order} LIMIT {limit}"
    );
    Some(b.finish(sql))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytics::Filters;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn whole_hours_of_a_range() {
        let (m1, m2) = whole_hours(t("2026-11-22T10:30:00Z"), t("2026-11-22T13:15:00Z"));
        assert_eq!(
            (m1, m2),
            (t("2026-11-22T11:00:00Z"), t("2026-11-22T13:00:00Z"))
        );
        let (m1, m2) = whole_hours(t("2026-11-22T10:00:00Z"), t("2026-11-22T12:00:00Z"));
        assert_eq!(
            (m1, m2),
            (t("2026-11-22T10:00:00Z"), t("2026-11-22T12:00:00Z"))
        );
        // Within one hour: no whole hour, all raw.
        let (m1, m2) = whole_hours(t("2026-11-22T10:10:00Z"), t("2026-11-22T10:50:00Z"));
        assert!(m1 >= m2);
    }

    #[test]
    fn what_the_rollups_answer() {
        let mut q = Query {
            project_id: Uuid::nil(),
            from: t("2026-11-01T00:00:00Z"),
            to: t("2026-11-22T00:00:00Z"),
            filters: Filters::default(),
        };
        assert!(summary_sql(&q).is_some());
        assert!(breakdown_sql(&q, &Dimension::Page, 10).is_some());
        assert!(breakdown_sql(&q, &Dimension::EntryPage, 10).is_some());
        assert!(breakdown_sql(&q, &Dimension::Prop("title".into()), 10).is_none());
        q.filters = Filters(vec![(Dimension::Browser, "Chrome".into())]);
        assert!(summary_sql(&q).is_none());
        assert!(timeseries_sql(&q, Interval::Day).is_some());
        assert!(breakdown_sql(&q, &Dimension::Browser, 10).is_some());
        assert!(breakdown_sql(&q, &Dimension::Page, 10).is_none());
        assert!(breakdown_sql(&q, &Dimension::ExitPage, 10).is_none());
        q.filters.0.push((Dimension::Page, "/".into()));
        assert!(timeseries_sql(&q, Interval::Day).is_none());
    }

    #[test]
    fn filter_values_are_bound() {
        let q = Query {
            project_id: Uuid::nil(),
            from: t("2026-11-01T00:00:00Z"),
            to: t("2026-11-22T00:00:00Z"),
            filters: Filters(vec![(Dimension::Page, "'; DROP TABLE events; --".into())]),
        };
        let s = breakdown_sql(&q, &Dimension::Page, 10).unwrap();
        assert!(!s.sql.contains("DROP"), "{}", s.sql);
        let s = timeseries_sql(&q, Interval::Hour).unwrap();
        assert!(!s.sql.contains("DROP"), "{}", s.sql);
    }
}
