//! The dashboard's stats API: `GET /v1/stats/summary`, `/v1/stats/timeseries` and
//! `/v1/stats/breakdown` (see `docs/stats-api.md`).
//!
//! Owns the one definition of what may be asked — the [`Dimension`]s (`by=` names, and the
//! filter parameters, which are a subset of them), the [`Filters`], the range clamp — and the
//! SQL of the three queries, written once with the few expressions that differ per backend
//! taken from [`Dialect`]. Every value from the request (filter values, prop names, limits,
//! times) is a bind parameter ([`Value`]); the only text put into the SQL comes from this
//! module's own constants. The backends bind the values and run the statement (Postgres
//! inside a transaction with a statement timeout).
//!
//! Bot events (`is_bot`) are left out of every figure.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::error::ApiError;

/// Longest range one stats API query covers: a longer range is clamped (its `from` moved
/// forward), not refused.
pub const MAX_RANGE_DAYS: i64 = 400;
/// Statement timeout of every stats API query on Postgres.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time the handler waits for the store's answer (both backends) before answering 503.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(6);
/// Rows a breakdown returns unless `limit` says otherwise, and the most it may ask.
pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 1000;
/// Longest filter value accepted (longer: 400).
const MAX_FILTER_VALUE: usize = 2048;
/// Range up to which the timeseries uses hour buckets.
const HOURLY_UP_TO: chrono::Duration = chrono::Duration::days(2);
/// Name of the page view event.
pub(crate) const PAGE_VIEW: &str = "page_view";

/// What a breakdown groups by, and what a filter matches on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dimension {
    /// `context.path`.
    Page,
    /// Path of the first `page_view` of each session.
    EntryPage,
    /// Path of the last `page_view` of each session.
    ExitPage,
    /// Host of `context.referrer` (lower case); `(direct)` when empty or missing.
    Referrer,
    Browser,
    Os,
    Device,
    Country,
    /// Event name.
    Event,
    /// `utm_source`, `utm_medium`, `utm_campaign` of the query string of `context.url` (the
    /// first occurrence, before any `#`; as written in the URL, not percent-decoded). Only
    /// events whose URL carries the parameter have a value (usually a session's landing page).
    UtmSource,
    UtmMedium,
    UtmCampaign,
    /// `props.<name>` as text; names are `[A-Za-z0-9_ .-]{1,64}`.
    Prop(String),
}

/// Value of the referrer dimension when an event has no (usable) referrer.
pub const DIRECT: &str = "(direct)";

impl FromStr for Dimension {
    type Err = ApiError;

    fn from_str(s: &str) -> Result<Dimension, ApiError> {
        Ok(match s {
            "page" => Dimension::Page,
            "entry_page" => Dimension::EntryPage,
            "exit_page" => Dimension::ExitPage,
            "referrer" => Dimension::Referrer,
            "browser" => Dimension::Browser,
            "os" => Dimension::Os,
            "device" => Dimension::Device,
            "country" => Dimension::Country,
            "event" => Dimension::Event,
            "utm_source" => Dimension::UtmSource,
            "utm_medium" => Dimension::UtmMedium,
            "utm_campaign" => Dimension::UtmCampaign,
            _ => match s.strip_prefix("prop:") {
                Some(name) if is_prop_name(name) => Dimension::Prop(name.to_owned()),
                Some(name) => {
                    return Err(ApiError::BadQuery(format!(
                        "prop name {name:?}: 1 to 64 of A-Z a-z 0-9 _ . - and space"
                    )))
                }
                None => {
                    return Err(ApiError::BadQuery(format!(
                        "unknown by={s:?}: one of page, entry_page, exit_page, referrer, \
                         browser, os, device, country, event, utm_source, utm_medium, utm_campaign, \
                         prop:<name>"
                    )))
                }
            },
        })
    }
}

fn is_prop_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b' ' | b'.' | b'-'))
}

/// The filter query parameters and the dimension each matches (exactly) on.
pub const FILTER_PARAMS: [(&str, Dimension); 10] = [
    ("page", Dimension::Page),
    ("event", Dimension::Event),
    ("browser", Dimension::Browser),
    ("os", Dimension::Os),
    ("device", Dimension::Device),
    ("country", Dimension::Country),
    ("referrer", Dimension::Referrer),
    ("utm_source", Dimension::UtmSource),
    ("utm_medium", Dimension::UtmMedium),
    ("utm_campaign", Dimension::UtmCampaign),
];

/// Filters of a query: each keeps the events whose dimension equals the value (all must hold).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filters(pub Vec<(Dimension, String)>);

impl Filters {
    /// The filters among the query parameters (read with `param`).
    pub fn from_params(param: impl Fn(&str) -> Option<String>) -> Result<Filters, ApiError> {
        let mut filters = Vec::new();
        for (name, dimension) in FILTER_PARAMS {
            if let Some(value) = param(name) {
                if value.len() > MAX_FILTER_VALUE {
                    return Err(ApiError::BadQuery(format!(
                        "{name} longer than {MAX_FILTER_VALUE} bytes"
                    )));
                }
                filters.push((dimension, value));
            }
        }
        Ok(Filters(filters))
    }
}

/// One query of the stats API: a project, a range `[from, to)` of skew-corrected time, filters.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub project_id: Uuid,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub filters: Filters,
}

/// The range clamped to [`MAX_RANGE_DAYS`] (the end is kept).
pub fn clamp_range(from: DateTime<Utc>, to: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    (from.max(to - chrono::Duration::days(MAX_RANGE_DAYS)), to)
}

/// The breakdown limit from the `limit` parameter (default 100, at most 1000).
pub fn limit(value: Option<&str>) -> Result<u32, ApiError> {
    match value {
        None => Ok(DEFAULT_LIMIT),
        Some(v) => match v.parse::<u32>() {
            Ok(n) if n >= 1 => Ok(n.min(MAX_LIMIT)),
            _ => Err(ApiError::BadQuery(format!(
                "limit {v:?}: a whole number from 1 to {MAX_LIMIT}"
            ))),
        },
    }
}

/// Bucket width of a timeseries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Interval {
    Hour,
    Day,
}

impl Interval {
    /// Hours for ranges up to two days, else days.
    pub fn for_range(from: DateTime<Utc>, to: DateTime<Utc>) -> Interval {
        if to - from <= HOURLY_UP_TO {
            Interval::Hour
        } else {
            Interval::Day
        }
    }

    pub fn seconds(self) -> i64 {
        match self {
            Interval::Hour => 3600,
            Interval::Day => 86_400,
        }
    }
}

/// Answer of `GET /v1/stats/summary`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub visitors: i64,
    pub sessions: i64,
    pub pageviews: i64,
    pub events: i64,
    pub bounce_rate: f64,
    pub avg_session_seconds: f64,
}

/// What the summary statement returns: visitors, sessions, pageviews, events, sessions
/// counted for session figures, bounced sessions, summed session seconds.
pub type SummaryRow = (i64, i64, i64, i64, i64, i64, Option<f64>);

impl Summary {
    pub fn from_row(q: &Query, row: SummaryRow) -> Summary {
        let (visitors, sessions, pageviews, events, counted, bounced, seconds) = row;
        let share = |x: f64| if counted > 0 { x / counted as f64 } else { 0.0 };
        Summary {
            from: q.from,
            to: q.to,
            visitors,
            sessions,
            pageviews,
            events,
            bounce_rate: share(bounced as f64),
            avg_session_seconds: share(seconds.unwrap_or(0.0)),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Bucket {
    /// Bucket start, RFC 3339, UTC.
    pub t: DateTime<Utc>,
    pub visitors: i64,
    pub pageviews: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Series {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub buckets: Vec<Bucket>,
}

/// Answer of `GET /v1/stats/timeseries`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Timeseries {
    pub interval: Interval,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub buckets: Vec<Bucket>,
    /// The period of equal length just before.
    pub previous: Series,
}

/// Every bucket of `[from, to)` (empty ones too) from the rows the store found: (bucket
/// start in seconds since the epoch, visitors, pageviews).
pub fn fill_buckets(
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    interval: Interval,
    rows: &[(i64, i64, i64)],
) -> Vec<Bucket> {
    let width = interval.seconds();
    let first = from.timestamp().div_euclid(width) * width;
    let mut buckets = Vec::new();
    let mut start = first;
    while start.saturating_mul(1000) < to.timestamp_millis() {
        let (visitors, pageviews) = rows
            .iter()
            .find(|r| r.0 == start)
            .map_or((0, 0), |r| (r.1, r.2));
        if let chrono::LocalResult::Single(t) = Utc.timestamp_opt(start, 0) {
            buckets.push(Bucket {
                t,
                visitors,
                pageviews,
            });
        }
        start += width;
    }
    buckets
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BreakdownRow {
    pub key: String,
    pub visitors: i64,
    pub events: i64,
}

/// Answer of `GET /v1/stats/breakdown`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Breakdown {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub rows: Vec<BreakdownRow>,
}

/// A value to bind, in the order of the statement's numbered parameters (`$n` / `?n`).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Project(Uuid),
    Time(DateTime<Utc>),
    Text(String),
    Int(i64),
}

/// The backend an SQL text is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Sqlite,
}

/// A statement and its values.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    pub sql: String,
    pub values: Vec<Value>,
}

/// Builds one statement: numbered parameters, shared WHERE clauses (also used by
/// [`crate::funnel`], and [`crate::rollup`] for the raw-event parts of its statements).
pub(crate) struct Builder {
    dialect: Dialect,
    values: Vec<Value>,
}

impl Builder {
    pub(crate) fn new(dialect: Dialect) -> Builder {
        Builder {
            dialect,
            values: Vec::new(),
        }
    }

    /// Adds a value; its placeholder.
    pub(crate) fn bind(&mut self, value: Value) -> String {
        self.values.push(value);
        let n = self.values.len();
        match self.dialect {
            Dialect::Postgres => format!("${n}"),
            Dialect::Sqlite => format!("?{n}"),
        }
    }

    /// `context.<field>` as text (`field` is one of this module's constants).
    pub(crate) fn context_field(&self, field: &str) -> String {
        match self.dialect {
            Dialect::Postgres => format!("(context ->> '{field}')"),
            Dialect::Sqlite => format!("CAST(json_extract(context, '$.{field}') AS TEXT)"),
        }
    }

    /// The per-event expression of a dimension (entry and exit pages: the path).
    pub(crate) fn expr(&mut self, dimension: &Dimension) -> String {
        match dimension {
            Dimension::Page | Dimension::EntryPage | Dimension::ExitPage => {
                self.context_field("path")
            }
            Dimension::Referrer => {
                let r = self.context_field("referrer");
                // Host: what follows the first "://" up to "/", "?", "#" or ":".
                let host = match self.dialect {
                    Dialect::Postgres => format!("substring({r} from '://([^/?#:]*)')"),
                    Dialect::Sqlite => {
                        let after = format!("substr({r}, instr({r}, '://') + 3)");
                        format!(
                            "CASE WHEN instr({r}, '://') > 0 THEN substr({after}, 1, \
                             instr(replace(replace(replace({after}, '?', '/'), '#', '/'), \
                             ':', '/') || '/', '/') - 1) END"
                        )
                    }
                };
                format!("coalesce(nullif(lower({host}), ''), '{DIRECT}')")
            }
            Dimension::Browser => "browser".to_owned(),
            Dimension::Os => "os".to_owned(),
            Dimension::Device => "device_type".to_owned(),
            Dimension::Country => "country".to_owned(),
            Dimension::Event => "name".to_owned(),
            Dimension::UtmSource => self.url_param("utm_source"),
            Dimension::UtmMedium => self.url_param("utm_medium"),
            Dimension::UtmCampaign => self.url_param("utm_campaign"),
            Dimension::Prop(name) => match self.dialect {
                Dialect::Postgres => {
                    let p = self.bind(Value::Text(name.clone()));
                    format!("(props ->> {p})")
                }
                Dialect::Sqlite => {
                    // The name is checked ([A-Za-z0-9_ .-]) and quoted, and still bound.
                    let p = self.bind(Value::Text(format!("$.\"{name}\"")));
                    format!("CAST(json_extract(props, {p}) AS TEXT)")
                }
            },
        }
    }

    /// The value of query parameter `name` (one of this module's constants, `[a-z_]`) in
    /// `context.url`: the first `name=` after the `?` and before any `#`, up to the next
    /// `&`; NULL when absent or empty. Written with string functions both backends share
    /// (SQLite has no regular expressions).
    fn url_param(&self, name: &str) -> String {
        let find = |hay: &str, needle: &str| match self.dialect {
            Dialect::Postgres => format!("strpos({hay}, {needle})"),
            Dialect::Sqlite => format!("instr({hay}, {needle})"),
        };
        let url = self.context_field("url");
        let hash = find(&url, "'#'");
        let no_fragment =
            format!("(CASE WHEN {hash} > 0 THEN substr({url}, 1, {hash} - 1) ELSE {url} END)");
        let mark = find(&no_fragment, "'?'");
        // The query string with a leading '&', so every parameter starts with '&'.
        let query =
            format!("(CASE WHEN {mark} > 0 THEN '&' || substr({no_fragment}, {mark} + 1) END)");
        let needle = format!("'&{name}='");
        let at = find(&query, &needle);
        let rest = format!("substr({query}, {at} + {})", name.len() + 2);
        let end = find(&format!("({rest} || '&')"), "'&'");
        // Most URLs carry no such parameter: one cheap search first (the rollups compute
        // this for every committed event).
        let anywhere = find(&url, &format!("'{name}='"));
        format!(
            "CASE WHEN {anywhere} > 0 THEN \
             nullif(CASE WHEN {at} > 0 THEN substr({rest}, 1, {end} - 1) END, '') END"
        )
    }

    /// Project, range and no bots: what every event read satisfies.
    pub(crate) fn base(&mut self, q: &Query) -> String {
        let project = self.bind(Value::Project(q.project_id));
        let from = self.bind(Value::Time(q.from));
        let to = self.bind(Value::Time(q.to));
        format!("project_id = {project} AND time >= {from} AND time < {to} AND NOT is_bot")
    }

    /// `base` and the filters.
    pub(crate) fn selected(&mut self, q: &Query) -> String {
        let mut sql = self.base(q);
        for (dimension, value) in &q.filters.0 {
            let expr = self.expr(dimension);
            let v = self.bind(Value::Text(value.clone()));
            sql.push_str(&format!(" AND {expr} = {v}"));
        }
        sql
    }

    /// Seconds between two times; on Postgres an exact `numeric` (microseconds), so a sum of
    /// them is exact and rounds once, as the rollups' does ([`Builder::float_sum`]).
    fn seconds_between(&self, later: &str, earlier: &str) -> String {
        match self.dialect {
            Dialect::Postgres => format!("extract(epoch FROM {later} - {earlier})"),
            Dialect::Sqlite => format!("({later} - {earlier}) / 1000.0"),
        }
    }

    /// `sum(x)` as a float.
    fn float_sum(&self, x: &str) -> String {
        match self.dialect {
            Dialect::Postgres => format!("sum({x})::float8"),
            Dialect::Sqlite => format!("sum({x})"),
        }
    }

    pub(crate) fn finish(self, sql: String) -> Statement {
        Statement {
            sql,
            values: self.values,
        }
    }
}

/// Byte order for keys on both backends.
pub(crate) fn key_order(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::Postgres => "key COLLATE \"C\"",
        Dialect::Sqlite => "key",
    }
}

/// Summary: counts over the selected events; bounce and duration over whole sessions
/// (all their events in the range) that have a selected event. Returns a [`SummaryRow`].
pub fn summary_sql(dialect: Dialect, q: &Query) -> Statement {
    let mut b = Builder::new(dialect);
    let selected = b.selected(q);
    let base = b.base(q);
    let seconds = b.seconds_between("max(time)", "min(time)");
    let total = b.float_sum("secs");
    let sql = format!(
        "WITH ev AS (SELECT anonymous_id, session_id, name FROM events WHERE {selected}), \
         sess AS (SELECT count(*) AS n, count(*) FILTER (WHERE name = '{PAGE_VIEW}') AS pv, \
             {seconds} AS secs \
             FROM events WHERE {base} AND session_id IN (SELECT session_id FROM ev) \
             GROUP BY session_id) \
         SELECT (SELECT count(DISTINCT anonymous_id) FROM ev), \
             (SELECT count(DISTINCT session_id) FROM ev), \
             (SELECT count(*) FROM ev WHERE name = '{PAGE_VIEW}'), \
             (SELECT count(*) FROM ev), \
             (SELECT count(*) FROM sess), \
             (SELECT count(*) FROM sess WHERE n = 1 AND pv = 1), \
             (SELECT {total} FROM sess)"
    );
    b.finish(sql)
}

/// Timeseries rows: (bucket start in seconds since the epoch, visitors, pageviews), only
/// buckets with events.
pub fn timeseries_sql(dialect: Dialect, q: &Query, interval: Interval) -> Statement {
    let mut b = Builder::new(dialect);
    let selected = b.selected(q);
    let width = interval.seconds();
    let bucket = match dialect {
        Dialect::Postgres => {
            format!("(floor(extract(epoch FROM events.time) / {width}))::int8 * {width}")
        }
        Dialect::Sqlite => format!("(time / {}) * {width}", width * 1000),
    };
    let sql = format!(
        "SELECT {bucket} AS bucket, count(DISTINCT anonymous_id), \
             count(*) FILTER (WHERE name = '{PAGE_VIEW}') \
         FROM events WHERE {selected} GROUP BY bucket ORDER BY bucket"
    );
    b.finish(sql)
}

/// Breakdown rows: (key, visitors, events), best first, at most `limit`. Events without a
/// value for the dimension are left out (the referrer's is `(direct)`). Entry and exit
/// pages: one row per session that has a selected event (its first or last page view in
/// the range); `events` counts those sessions.
pub fn breakdown_sql(dialect: Dialect, q: &Query, by: &Dimension, limit: u32) -> Statement {
    let mut b = Builder::new(dialect);
    let order = key_order(dialect);
    let rows = match by {
        Dimension::EntryPage | Dimension::ExitPage => {
            let selected = b.selected(q);
            let base = b.base(q);
            let path = b.expr(by);
            let direction = if *by == Dimension::EntryPage {
                "ASC"
            } else {
                "DESC"
            };
            format!(
                "SELECT {path} AS key, anonymous_id, row_number() OVER (PARTITION BY session_id \
                     ORDER BY time {direction}, id {direction}) AS rn \
                 FROM events WHERE {base} AND name = '{PAGE_VIEW}' \
                     AND session_id IN (SELECT session_id FROM events WHERE {selected})"
            )
        }
        _ => {
            let selected = b.selected(q);
            let key = b.expr(by);
            format!("SELECT {key} AS key, anonymous_id, 1 AS rn FROM events WHERE {selected}")
        }
    };
    let limit = b.bind(Value::Int(i64::from(limit)));
    let sql = format!(
        "SELECT key, count(DISTINCT anonymous_id) AS visitors, count(*) AS events \
         FROM ({rows}) AS e WHERE rn = 1 AND key IS NOT NULL \
         GROUP BY key ORDER BY visitors DESC, events DESC, {order} LIMIT {limit}"
    );
    b.finish(sql)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn dimensions_parse() {
        assert_eq!("page".parse::<Dimension>().unwrap(), Dimension::Page);
        assert_eq!(
            "prop:title".parse::<Dimension>().unwrap(),
            Dimension::Prop("title".into())
        );
        assert!("prop:a'b".parse::<Dimension>().is_err());
        assert!("prop:".parse::<Dimension>().is_err());
        assert!("pages".parse::<Dimension>().is_err());
    }

    #[test]
    fn ranges_clamp_and_pick_their_interval() {
        let to = t("2026-11-22T00:00:00Z");
        let (from, _) = clamp_range(to - chrono::Duration::days(1000), to);
        assert_eq!(to - from, chrono::Duration::days(MAX_RANGE_DAYS));
        assert_eq!(
            Interval::for_range(to - chrono::Duration::days(2), to),
            Interval::Hour
        );
        assert_eq!(
            Interval::for_range(to - chrono::Duration::hours(49), to),
            Interval::Day
        );
    }

    #[test]
    fn buckets_include_empty_ones() {
        let from = t("2026-11-22T10:30:00Z");
        let to = t("2026-11-22T13:00:00Z");
        let rows = [(t("2026-11-22T11:00:00Z").timestamp(), 2, 5)];
        let b = fill_buckets(from, to, Interval::Hour, &rows);
        assert_eq!(b.len(), 3);
        assert_eq!(b[0].t, t("2026-11-22T10:00:00Z"));
        assert_eq!((b[1].visitors, b[1].pageviews), (2, 5));
        assert_eq!((b[2].visitors, b[2].pageviews), (0, 0));
    }

    #[test]
    fn limits() {
        assert_eq!(limit(None).unwrap(), 100);
        assert_eq!(limit(Some("5000")).unwrap(), 1000);
        assert!(limit(Some("0")).is_err());
        assert!(limit(Some("x")).is_err());
    }

    #[test]
    fn user_values_are_bound_never_written_into_the_sql() {
        let q = Query {
            project_id: Uuid::nil(),
            from: t("2026-11-01T00:00:00Z"),
            to: t("2026-11-22T00:00:00Z"),
            filters: Filters(vec![(Dimension::Page, "'; DROP TABLE events; --".into())]),
        };
        for dialect in [Dialect::Postgres, Dialect::Sqlite] {
            let s = breakdown_sql(dialect, &q, &Dimension::Prop("ti tle".into()), 10);
            assert!(!s.sql.contains("DROP"), "{}", s.sql);
            assert!(!s.sql.contains("ti tle"), "{}", s.sql);
        }
    }
}
