//! Rollups on Postgres: what keeps the stats API fast on millions of events.
//!
//! Two tables (migration 0004): `rollup_hourly`, per project, dimension value and hour, the
//! events, page views and a HyperLogLog of the visitors (`hll` extension); and
//! `rollup_sessions`, one row per session (first and last event time, events, page views,
//! entry and exit page view).
//! The statement that inserts events updates both from the rows it actually inserted
//! ([`insert_sql`]), so they are committed exactly when the events are and a duplicate never
//! counts twice. [`rebuild`] fills them from stored events with the same SQL.
//!
//! A query is answered from them when they can answer it exactly as the raw-event SQL of
//! [`crate::analytics`] would (visitors aside, which HyperLogLog estimates: exact for small
//! sets, about 2 % off beyond a few hundred): the whole hours of the range come from the
//! rollups, the partial hours at its ends from raw events, and sessions that cross either
//! end are recomputed from their raw events in the range. Session figures (summary, entry
//! and exit pages) read one `rollup_sessions` index entry per session of the range, so they
//! grow with the sessions (about 0.4 s for a million on two cores); the hourly figures do
//! not. Whatever else (filters the rollups do not hold, props) gets `None` here and runs
//! the raw SQL. Without the extension (no tables) everything runs the raw SQL;
//! [`Availability`] says which.

use std::sync::atomic::{AtomicU8, Ordering};

use chrono::{DateTime, Duration, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::analytics::{
    key_order, Builder, Dialect, Dimension, Interval, Query, Statement, Value, PAGE_VIEW,
};
use crate::store::StoreError;

/// The dimensions `rollup_hourly` holds, by their `dim` code (0 is the total, key `''`).
pub const DIMENSIONS: [(i16, Dimension); 7] = [
    (1, Dimension::Page),
    (2, Dimension::Referrer),
    (3, Dimension::Browser),
    (4, Dimension::Os),
    (5, Dimension::Device),
    (6, Dimension::Country),
    (7, Dimension::Event),
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

/// The statements that add the events of `source` (a relation with [`SOURCE_COLUMNS`]) to
/// the rollups: two data-modifying `WITH` items, `rollup_hours` and `rollup_sessions_seen`.
/// Rows are upserted in key order, so concurrent commits lock them in one order.
pub fn upsert_ctes(source: &str) -> String {
    let mut b = Builder::new(Dialect::Postgres);
    let keys: Vec<String> = DIMENSIONS
        .iter()
        .map(|(code, d)| format!("({code}, {})", b.expr(d)))
        .collect();
    let keys = keys.join(", ");
    let (ends, ends_agg, ends_set) = session_ends();
    format!(
        "rollup_hours AS (\
             INSERT INTO rollup_hourly AS r (project_id, dim, hour, key, events, pageviews, \
                 visitors) \
             SELECT project_id, d.dim, {HOUR}, d.key, count(*), \
                 count(*) FILTER (WHERE name = '{PAGE_VIEW}'), hll_add_agg({VISITOR_HASH}) \
             FROM {source} CROSS JOIN LATERAL (VALUES (0::int2, ''), {keys}) AS d(dim, key) \
             WHERE NOT is_bot AND d.key IS NOT NULL \
             GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4 \
             ON CONFLICT (project_id, dim, hour, key) DO UPDATE SET \
                 events = r.events + excluded.events, \
                 pageviews = r.pageviews + excluded.pageviews, \
                 visitors = hll_union(r.visitors, excluded.visitors)), \
         rollup_sessions_seen AS (\
             INSERT INTO rollup_sessions AS s (project_id, session_id, first_time, last_time, \
                 events, pageviews, {ends}) \
             SELECT project_id, session_id, min(time), max(time), count(*), \
                 count(*) FILTER (WHERE name = '{PAGE_VIEW}'), {ends_agg} \
             FROM {source} WHERE NOT is_bot \
             GROUP BY 1, 2 ORDER BY 1, 2 \
             ON CONFLICT (project_id, session_id) DO UPDATE SET \
                 first_time = least(s.first_time, excluded.first_time), \
                 last_time = greatest(s.last_time, excluded.last_time), \
                 events = s.events + excluded.events, \
                 pageviews = s.pageviews + excluded.pageviews, {ends_set})"
    )
}

/// A session's entry and exit page views: (column prefix, order, comparison that makes
/// the new one replace the stored one).
const ENDS: [(&str, &str, &str); 2] = [("entry", "ASC", "<"), ("exit", "DESC", ">")];
/// Column list, aggregates and upsert assignments of the session ends, for [`upsert_ctes`].
fn session_ends() -> (String, String, String) {
    let path = Builder::new(Dialect::Postgres).expr(&Dimension::Page);
    // The columns of each end, and what they hold for its page view.
    let end_columns = [
        ("time", "time"),
        ("id", "id"),
        ("page", path.as_str()),
        ("visitor", "anonymous_id"),
    ];
    let (mut columns, mut aggregates, mut assignments) = (Vec::new(), Vec::new(), Vec::new());
    for (end, order, newer) in ENDS {
        let replaces = format!(
            "excluded.{end}_time IS NOT NULL AND (s.{end}_time IS NULL \
             OR (excluded.{end}_time, excluded.{end}_id) {newer} (s.{end}_time, s.{end}_id))"
        );
        for (column, value) in end_columns {
            columns.push(format!("{end}_{column}"));
            aggregates.push(format!(
                "(array_agg({value} ORDER BY time {order}, id {order}) \
                 FILTER (WHERE name = '{PAGE_VIEW}'))[1]"
            ));
            assignments.push(format!(
                "{end}_{column} = CASE WHEN {replaces} THEN excluded.{end}_{column} \
                 ELSE s.{end}_{column} END"
            ));
        }
    }
    (
        columns.join(", "),
        aggregates.join(", "),
        assignments.join(", "),
    )
}

/// The event insert of the commit path with the rollups updated in the same statement:
/// `with` are its leading `WITH` items (without the keyword), `insert` its
/// `INSERT ... ON CONFLICT DO NOTHING` (without `RETURNING`). Returns the inserted
/// `(project_id, id)` like the plain statement.
pub fn insert_sql(with: &str, insert: &str) -> String {
    format!(
        "WITH {with}, ins AS ({insert} RETURNING {SOURCE_COLUMNS}), {} \
         SELECT project_id, id FROM ins",
        upsert_ctes("ins")
    )
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
             AND to_regclass('rollup_sessions') IS NOT NULL",
    )
    .fetch_one(pool)
    .await?)
}

/// Refills the rollups of `project` (every project: `None`) from its stored events, a day
/// of event time per statement, with the commit path's SQL. Inserts wait meanwhile (the
/// events table is share-locked), so nothing is counted twice; the tables are analyzed
/// after. Returns the events counted.
pub async fn rebuild(pool: &PgPool, project: Option<Uuid>) -> Result<i64, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("LOCK TABLE events IN SHARE MODE")
        .execute(&mut *tx)
        .await?;
    for table in ["rollup_hourly", "rollup_sessions"] {
        sqlx::query(&format!(
            "DELETE FROM {table} WHERE $1::uuid IS NULL OR project_id = $1"
        ))
        .bind(project)
        .execute(&mut *tx)
        .await?;
    }
    let (first, last): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT min(time), max(time) FROM events WHERE $1::uuid IS NULL OR project_id = $1",
    )
    .bind(project)
    .fetch_one(&mut *tx)
    .await?;
    let mut counted = 0;
    if let (Some(first), Some(last)) = (first, last) {
        let sql = format!(
            "WITH src AS (SELECT {SOURCE_COLUMNS} FROM events \
                 WHERE ($1::uuid IS NULL OR project_id = $1) AND time >= $2 AND time < $3), \
             {} SELECT count(*) FROM src",
            upsert_ctes("src")
        );
        let mut start = floor_hour(first);
        while start <= last {
            let end = start + Duration::days(1);
            let n: i64 = sqlx::query_scalar(&sql)
                .bind(project)
                .bind(start)
                .bind(end)
                .fetch_one(&mut *tx)
                .await?;
            counted += n;
            start = end;
        }
    }
    tx.commit().await?;
    // Planner statistics for the tables just filled (and events, often bulk-loaded before).
    sqlx::query("ANALYZE events, rollup_hourly, rollup_sessions")
        .execute(pool)
        .await?;
    Ok(counted)
}

/// Deletes the rollups of hours (and sessions ending) before `cutoff`: retention drops the
/// events of whole months, and the figures must not outlive them.
pub async fn forget_before(
    conn: &mut sqlx::PgConnection,
    cutoff: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM rollup_hourly WHERE hour < $1")
        .bind(cutoff)
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM rollup_sessions WHERE last_time < $1")
        .bind(cutoff)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Whether the tables exist (before migrating: to know whether they are new).
pub async fn exist(pool: &PgPool) -> Result<bool, StoreError> {
    tables_exist(pool).await
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
    // One pass over the sessions ending in or after the range (an index-only scan): those
    // entirely in the range are summed; those with events on both sides of an end are
    // recomputed from their events in the range, which lie between `from` and the latest end
    // of those crossing it, or between the earliest start of those crossing `to` and `to`
    // (so only the ends of the range are scanned).
    let sql = format!(
        "WITH hours AS (SELECT events, pageviews, visitors FROM rollup_hourly \
             WHERE project_id = {p} AND dim = 0 AND key = '' AND hour >= {m1} AND hour < {m2}), \
         edge AS (SELECT anonymous_id, name FROM events \
             WHERE {events} AND (time < {m1} OR time >= {m2})), \
         sess AS (SELECT count(*) FILTER (WHERE inside) AS n, \
                 count(*) FILTER (WHERE inside AND events = 1 AND pageviews = 1) AS bounced, \
                 coalesce(sum(date_part('epoch', last_time - first_time)) \
                     FILTER (WHERE inside), 0) AS secs, \
                 coalesce(array_agg(session_id) FILTER (WHERE NOT inside), '{{}}') AS crossing, \
                 max(last_time) FILTER (WHERE first_time < {from}) AS lo, \
                 min(first_time) FILTER (WHERE last_time >= {to}) AS hi \
             FROM (SELECT session_id, first_time, last_time, events, pageviews, \
                     first_time >= {from} AND last_time < {to} AS inside \
                 FROM rollup_sessions WHERE project_id = {p} AND last_time >= {from} \
                     AND first_time < {to}) AS s), \
         crossing AS (SELECT count(*) AS n, count(*) FILTER (WHERE name = '{PAGE_VIEW}') AS pv, \
                 extract(epoch FROM max(time) - min(time))::float8 AS secs \
             FROM events WHERE {events} \
                 AND (time <= (SELECT lo FROM sess) OR time >= (SELECT hi FROM sess)) \
                 AND session_id = ANY ((SELECT crossing FROM sess)::text[]) \
             GROUP BY session_id), \
         sessions AS (SELECT (SELECT n FROM sess) + (SELECT count(*) FROM crossing) AS n) \
         SELECT (SELECT {VISITORS} FROM (SELECT visitors AS v FROM hours UNION ALL \
                 SELECT hll_add_agg({VISITOR_HASH}) FROM edge) AS vs), \
             (SELECT n FROM sessions), \
             (SELECT coalesce(sum(pageviews), 0)::int8 FROM hours) \
                 + (SELECT count(*) FROM edge WHERE name = '{PAGE_VIEW}'), \
             (SELECT coalesce(sum(events), 0)::int8 FROM hours) + (SELECT count(*) FROM edge), \
             (SELECT n FROM sessions), \
             (SELECT bounced FROM sess) \
                 + (SELECT count(*) FROM crossing WHERE n = 1 AND pv = 1), \
             (SELECT secs FROM sess) + (SELECT coalesce(sum(secs), 0) FROM crossing)"
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

/// Entry or exit page breakdown from `rollup_sessions` (see
/// [`crate::analytics::breakdown_sql`]); `None` with filters. Sessions crossing an end of the
/// range are recomputed from their page views in the range, as in [`summary_sql`].
fn session_ends_sql(q: &Query, by: &Dimension, limit: u32) -> Option<Statement> {
    if !q.filters.0.is_empty() {
        return None;
    }
    let (end, direction) = if *by == Dimension::EntryPage {
        ("entry", "ASC")
    } else {
        ("exit", "DESC")
    };
    let mut b = Builder::new(Dialect::Postgres);
    let events = b.base(q);
    let path = b.expr(by);
    let p = b.bind(Value::Project(q.project_id));
    let (from, to) = (b.bind(Value::Time(q.from)), b.bind(Value::Time(q.to)));
    let limit = b.bind(Value::Int(i64::from(limit)));
    let order = key_order(Dialect::Postgres);
    let sql = format!(
        "WITH crossing AS MATERIALIZED (SELECT session_id, first_time, last_time \
             FROM rollup_sessions WHERE project_id = {p} AND last_time >= {from} \
                 AND first_time < {to} AND (first_time < {from} OR last_time >= {to})), \
         parts AS (\
             SELECT {end}_page AS key, {end}_visitor AS visitor FROM rollup_sessions \
             WHERE project_id = {p} AND last_time >= {from} AND last_time < {to} \
                 AND first_time >= {from} AND {end}_page IS NOT NULL \
             UNION ALL \
             SELECT key, anonymous_id FROM (\
                 SELECT {path} AS key, anonymous_id, row_number() OVER (\
                     PARTITION BY session_id ORDER BY time {direction}, id {direction}) AS rn \
                 FROM events WHERE {events} AND name = '{PAGE_VIEW}' \
                     AND (time <= (SELECT max(last_time) FROM crossing \
                             WHERE first_time < {from}) \
                         OR time >= (SELECT min(first_time) FROM crossing \
                             WHERE last_time >= {to})) \
                     AND session_id IN (SELECT session_id FROM crossing)) AS c \
             WHERE rn = 1 AND key IS NOT NULL) \
         SELECT key, coalesce(round(hll_cardinality(hll_add_agg({VISITOR}))), 0)::int8 \
                 AS visitors, count(*) AS events \
         FROM parts GROUP BY key ORDER BY visitors DESC, events DESC, {order} LIMIT {limit}",
        VISITOR = "hll_hash_text(visitor)"
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
