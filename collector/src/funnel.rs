//! `GET /v1/stats/funnel?steps=page:/pricing,event:Signup`: how many sessions went through
//! two to five steps in order (see `docs/stats-api.md`).
//!
//! Owns the steps' syntax ([`Step`], [`parse_steps`]) and the one SQL statement for both
//! backends, built with [`analytics::Builder`] so it shares the stats API's range, bot and
//! filter clauses and binds every value. Each step is a chain link: a session reaches step
//! k at its first event matching step k that comes after (time, then id) the event where it
//! reached step k - 1, so one event never counts for two steps.

use serde::Serialize;

use crate::analytics::{self, Builder, Dialect, Query, Statement, Value};
use crate::error::ApiError;

/// Fewest and most steps a funnel has.
pub const MIN_STEPS: usize = 2;
pub const MAX_STEPS: usize = 5;
/// Longest step value (a path or an event name).
const MAX_STEP_VALUE: usize = 1024;

/// One step: a page view of a path, or an event by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `page:<path>`: a `page_view` whose `context.path` equals the path.
    Page(String),
    /// `event:<name>`: an event with that name.
    Event(String),
}

impl Step {
    /// The step as written in `steps=` (and echoed in the answer).
    pub fn label(&self) -> String {
        match self {
            Step::Page(path) => format!("page:{path}"),
            Step::Event(name) => format!("event:{name}"),
        }
    }
}

/// The steps of `steps=` (comma-separated `page:<path>` or `event:<name>`, 2 to 5).
pub fn parse_steps(value: Option<&str>) -> Result<Vec<Step>, ApiError> {
    let value = value.ok_or_else(|| {
        ApiError::BadQuery("steps is required: e.g. steps=page:/pricing,event:Signup".into())
    })?;
    let steps = value
        .split(',')
        .map(|s| {
            let (kind, v) = s.split_once(':').unwrap_or((s, ""));
            if v.is_empty() || v.len() > MAX_STEP_VALUE {
                return Err(ApiError::BadQuery(format!(
                    "step {s:?}: page:<path> or event:<name>, 1 to {MAX_STEP_VALUE} bytes"
                )));
            }
            match kind {
                "page" => Ok(Step::Page(v.to_owned())),
                "event" => Ok(Step::Event(v.to_owned())),
                _ => Err(ApiError::BadQuery(format!(
                    "step {s:?}: page:<path> or event:<name>"
                ))),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    if !(MIN_STEPS..=MAX_STEPS).contains(&steps.len()) {
        return Err(ApiError::BadQuery(format!(
            "steps: {MIN_STEPS} to {MAX_STEPS} steps, separated by commas (got {})",
            steps.len()
        )));
    }
    Ok(steps)
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FunnelStep {
    pub step: String,
    /// Sessions that reached this step (in order).
    pub sessions: i64,
    /// Distinct visitors of those sessions.
    pub visitors: i64,
    /// `sessions` over the previous step's (1 for the first step; 0 when the previous has none).
    pub conversion: f64,
    /// `sessions` over the first step's.
    pub conversion_from_first: f64,
}

/// Answer of `GET /v1/stats/funnel`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Funnel {
    pub from: chrono::DateTime<chrono::Utc>,
    pub to: chrono::DateTime<chrono::Utc>,
    pub steps: Vec<FunnelStep>,
}

/// Assembles the answer from the statement's rows: (step number from 1, sessions, visitors).
pub fn assemble(q: &Query, steps: &[Step], rows: &[(i64, i64, i64)]) -> Funnel {
    let counts: Vec<(i64, i64)> = (1..=steps.len() as i64)
        .map(|n| {
            rows.iter()
                .find(|r| r.0 == n)
                .map_or((0, 0), |r| (r.1, r.2))
        })
        .collect();
    let share = |x: i64, of: i64| if of > 0 { x as f64 / of as f64 } else { 0.0 };
    let first = counts.first().map_or(0, |c| c.0);
    Funnel {
        from: q.from,
        to: q.to,
        steps: steps
            .iter()
            .zip(&counts)
            .enumerate()
            .map(|(i, (step, &(sessions, visitors)))| FunnelStep {
                step: step.label(),
                sessions,
                visitors,
                conversion: match i {
                    0 => 1.0,
                    _ => share(sessions, counts[i - 1].0),
                },
                conversion_from_first: share(sessions, first),
            })
            .collect(),
    }
}

/// Rows (step number from 1, sessions, visitors), for steps some session reached. Sessions
/// count when they have a selected event (the filters) in the range; their steps are
/// matched among all their events in the range (bots left out).
pub fn funnel_sql(dialect: Dialect, q: &Query, steps: &[Step]) -> Statement {
    let mut b = Builder::new(dialect);
    let mut ctes = Vec::new();
    if !q.filters.0.is_empty() {
        let selected = b.selected(q);
        ctes.push(format!(
            "chosen AS (SELECT DISTINCT session_id FROM events WHERE {selected})"
        ));
    }
    let in_chosen = if q.filters.0.is_empty() {
        ""
    } else {
        " AND session_id IN (SELECT session_id FROM chosen)"
    };
    let mut selects = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let n = i + 1;
        let base = b.base(q);
        let matches = match step {
            Step::Page(path) => {
                let p = b.bind(Value::Text(path.clone()));
                let path_expr = b.context_field("path");
                format!("name = '{}' AND {path_expr} = {p}", analytics::PAGE_VIEW)
            }
            Step::Event(name) => {
                let v = b.bind(Value::Text(name.clone()));
                format!("name = {v}")
            }
        };
        // The earliest matching event per session (after the previous step's, from step 2).
        let inner = if n == 1 {
            format!(
                "SELECT session_id AS sid, anonymous_id AS anon, time AS t, id AS eid, \
                     row_number() OVER (PARTITION BY session_id ORDER BY time, id) AS rn \
                 FROM events WHERE {base} AND {matches}{in_chosen}"
            )
        } else {
            format!(
                "SELECT p.sid, p.anon, e.time AS t, e.id AS eid, \
                     row_number() OVER (PARTITION BY p.sid ORDER BY e.time, e.id) AS rn \
                 FROM events AS e JOIN step{prev} AS p ON e.session_id = p.sid \
                 WHERE {base} AND {matches} \
                     AND (e.time > p.t OR (e.time = p.t AND e.id > p.eid))",
                prev = n - 1
            )
        };
        ctes.push(format!(
            "step{n} AS (SELECT sid, anon, t, eid FROM ({inner}) AS x WHERE rn = 1)"
        ));
        selects.push(format!(
            "SELECT CAST({n} AS BIGINT) AS n, count(*) AS sessions, count(DISTINCT anon) AS visitors FROM step{n}"
        ));
    }
    let sql = format!(
        "WITH {} SELECT n, sessions, visitors FROM ({}) AS f ORDER BY n",
        ctes.join(", "),
        selects.join(" UNION ALL ")
    );
    b.finish(sql)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_parse() {
        assert_eq!(
            parse_steps(Some("page:/pricing,event:Signup")).unwrap(),
            vec![Step::Page("/pricing".into()), Step::Event("Signup".into())]
        );
        assert_eq!(
            parse_steps(Some("event:a:b,page:/x?y")).unwrap()[0],
            Step::Event("a:b".into())
        );
        for bad in [
            None,
            Some("page:/only"),
            Some("page:/a,page:/b,page:/c,page:/d,page:/e,page:/f"),
            Some("page:/a,url:/b"),
            Some("page:/a,event:"),
            Some("page:/a,,page:/b"),
        ] {
            assert!(parse_steps(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn conversions() {
        let q = Query {
            project_id: uuid::Uuid::nil(),
            from: chrono::DateTime::UNIX_EPOCH,
            to: chrono::DateTime::UNIX_EPOCH,
            filters: analytics::Filters::default(),
        };
        let steps = parse_steps(Some("page:/a,page:/b,event:c")).unwrap();
        let f = assemble(&q, &steps, &[(1, 4, 3), (2, 2, 2)]);
        let got: Vec<_> = f
            .steps
            .iter()
            .map(|s| (s.sessions, s.conversion, s.conversion_from_first))
            .collect();
        assert_eq!(got, vec![(4, 1.0, 1.0), (2, 0.5, 0.5), (0, 0.0, 0.0)]);
        assert_eq!(f.steps[2].step, "event:c");
    }

    #[test]
    fn step_values_are_bound() {
        let q = Query {
            project_id: uuid::Uuid::nil(),
            from: chrono::DateTime::UNIX_EPOCH,
            to: chrono::DateTime::UNIX_EPOCH,
            filters: analytics::Filters::default(),
        };
        let steps = parse_steps(Some("page:'; DROP TABLE events; --,event:x")).unwrap();
        for dialect in [Dialect::Postgres, Dialect::Sqlite] {
            assert!(!funnel_sql(dialect, &q, &steps).sql.contains("DROP"));
        }
    }
}
