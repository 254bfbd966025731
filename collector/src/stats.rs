//! `GET /v1/stats`: what a project's read key may see, aggregated over a time range.
//!
//! Owns the parsing of `from`/`to` (ms since the epoch, RFC 3339, or `YYYY-MM-DD`, UTC) and
//! the defaults (the last 30 days); the counting itself is the store's.

use chrono::{DateTime, Duration, NaiveDate, Utc};

use crate::error::ApiError;

/// Longest range one stats query may cover.
const MAX_RANGE_DAYS: i64 = 3660;

/// Parses one bound of the range.
pub fn parse_time(value: &str) -> Result<DateTime<Utc>, ApiError> {
    let bad = || {
        ApiError::BadQuery(format!(
            "cannot read {value:?} as a time (ms since epoch, RFC 3339 or YYYY-MM-DD)"
        ))
    };
    if let Ok(ms) = value.parse::<i64>() {
        return DateTime::from_timestamp_millis(ms).ok_or_else(bad);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(value) {
        return Ok(t.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(value, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
        .ok_or_else(bad)
}

/// The range `[from, to)` from optional query values, of any length (the stats API clamps
/// it; see [`crate::analytics::clamp_range`]).
pub fn unbounded_range(
    from: Option<&str>,
    to: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(DateTime<Utc>, DateTime<Utc>), ApiError> {
    let to = to.map(parse_time).transpose()?.unwrap_or(now);
    let from = from
        .map(parse_time)
        .transpose()?
        .unwrap_or(to - Duration::days(30));
    if from > to {
        return Err(ApiError::BadQuery("from is after to".into()));
    }
    Ok((from, to))
}

/// The range `[from, to)` from optional query values, at most [`MAX_RANGE_DAYS`] long.
pub fn range(
    from: Option<&str>,
    to: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(DateTime<Utc>, DateTime<Utc>), ApiError> {
    let (from, to) = unbounded_range(from, to, now)?;
    if to - from > Duration::days(MAX_RANGE_DAYS) {
        return Err(ApiError::BadQuery(format!(
            "range longer than {MAX_RANGE_DAYS} days"
        )));
    }
    Ok((from, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_in_three_formats() {
        assert_eq!(parse_time("0").unwrap().timestamp(), 0);
        assert_eq!(
            parse_time("2026-11-22").unwrap().to_rfc3339(),
            "2026-11-22T00:00:00+00:00"
        );
        assert_eq!(
            parse_time("2026-11-22T01:00:00+01:00")
                .unwrap()
                .to_rfc3339(),
            "2026-11-22T00:00:00+00:00"
        );
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn default_range_is_thirty_days() {
        let now = parse_time("2026-11-22").unwrap();
        let (from, to) = range(None, None, now).unwrap();
        assert_eq!((to - from).num_days(), 30);
        assert!(range(Some("2026-11-23"), Some("2026-11-22"), now).is_err());
    }
}
