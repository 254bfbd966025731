//! Ingest health: per project and hour, what became of the batches (`GET /v1/stats/health`,
//! see `docs/stats-api.md`).
//!
//! The batch pipeline counts into [`IngestHealth`] (a mutex-guarded map: a few hash updates
//! per batch, no I/O); a background task ([`IngestHealth::start_flushing`]) moves the counts
//! into the `ingest_health` table once a second, one upsert per (project, hour, counter). The
//! request never waits for the table, and a database outage only delays the counts (they are
//! kept and added again at the next flush).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::analytics::{Builder, Dialect, Query, Statement};
use crate::store::EventStore;

/// How often the counts are written to the store.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// What is counted, per project and hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Counter {
    /// Events newly stored.
    Accepted,
    /// Events already stored (a retry), or repeated within their batch.
    Duplicates,
    /// Events refused by validation, by the rejection's reason code.
    Rejected(&'static str),
    /// Whole batches refused for their content (413, 400, ...), by the answer's error code.
    BatchRejected(&'static str),
    /// Events the SDK dropped for space before sending (the batches' `dropped`).
    SdkDropped,
    /// Batches refused with 429 by the rate limits.
    RateLimited,
}

impl Counter {
    /// The `counter` column's text.
    pub fn name(self) -> String {
        match self {
            Counter::Accepted => "accepted".to_owned(),
            Counter::Duplicates => "duplicates".to_owned(),
            Counter::Rejected(reason) => format!("rejected:{reason}"),
            Counter::BatchRejected(code) => format!("batch_rejected:{code}"),
            Counter::SdkDropped => "sdk_dropped".to_owned(),
            Counter::RateLimited => "rate_limited".to_owned(),
        }
    }
}

/// One row to add to the `ingest_health` table.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCount {
    pub project_id: Uuid,
    /// Start of the hour (UTC).
    pub hour: DateTime<Utc>,
    pub counter: String,
    pub count: i64,
}

/// A pending count: (project, hour start in seconds since the epoch, counter) and the count.
type Pending = ((Uuid, i64, Counter), i64);

/// Counts not yet written to the store.
#[derive(Debug, Default)]
pub struct IngestHealth {
    pending: Mutex<HashMap<(Uuid, i64, Counter), i64>>,
}

impl IngestHealth {
    /// Adds `n` to `counter` of `project_id` for the hour holding `at`.
    pub fn add(&self, project_id: Uuid, at: DateTime<Utc>, counter: Counter, n: u64) {
        if n == 0 {
            return;
        }
        let hour = at.timestamp().div_euclid(3600) * 3600;
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        if let Ok(mut pending) = self.pending.lock() {
            let c = pending.entry((project_id, hour, counter)).or_default();
            *c = c.saturating_add(n);
        }
    }

    /// Takes every pending count.
    fn take(&self) -> Vec<Pending> {
        match self.pending.lock() {
            Ok(mut pending) => std::mem::take(&mut *pending).into_iter().collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Puts counts back after a failed write (added to what came meanwhile).
    fn restore(&self, counts: Vec<Pending>) {
        let Ok(mut pending) = self.pending.lock() else {
            return;
        };
        for (key, count) in counts {
            let c = pending.entry(key).or_default();
            *c = c.saturating_add(count);
        }
    }

    /// Writes the pending counts now (a failure keeps them for the next flush).
    pub async fn flush(&self, store: &dyn EventStore) {
        let taken = self.take();
        if taken.is_empty() {
            return;
        }
        let rows: Vec<HealthCount> = taken
            .iter()
            .filter_map(|&((project_id, hour, counter), count)| {
                Some(HealthCount {
                    project_id,
                    hour: DateTime::from_timestamp(hour, 0)?,
                    counter: counter.name(),
                    count,
                })
            })
            .collect();
        if let Err(e) = store.record_ingest_health(&rows).await {
            tracing::warn!(error = %e, "ingest health counts not written; kept for the next flush");
            self.restore(taken);
        }
    }

    /// Flushes every [`FLUSH_INTERVAL`] until this is the last handle on `health`, then
    /// flushes once more and ends.
    pub fn start_flushing(
        health: Arc<IngestHealth>,
        store: Arc<dyn EventStore>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FLUSH_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                health.flush(store.as_ref()).await;
                if Arc::strong_count(&health) == 1 {
                    break;
                }
            }
        })
    }
}

/// Rows (hour start in seconds since the epoch, counter, count) of the project in the
/// query's range, by hour.
pub fn health_sql(dialect: Dialect, q: &Query) -> Statement {
    let mut b = Builder::new(dialect);
    let project = b.bind(crate::analytics::Value::Project(q.project_id));
    let from = b.bind(crate::analytics::Value::Time(q.from));
    let to = b.bind(crate::analytics::Value::Time(q.to));
    let hour = match dialect {
        Dialect::Postgres => "extract(epoch FROM hour)::int8",
        Dialect::Sqlite => "hour / 1000",
    };
    let sql = format!(
        "SELECT {hour} AS h, counter, count FROM ingest_health \
         WHERE project_id = {project} AND hour >= {from} AND hour < {to} \
         ORDER BY h, counter"
    );
    b.finish(sql)
}

/// One hour of counts.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct HealthHour {
    /// Hour start, RFC 3339, UTC (absent in `totals`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub t: Option<DateTime<Utc>>,
    pub accepted: i64,
    pub duplicates: i64,
    /// Events rejected, in all and by reason code.
    pub rejected: i64,
    pub rejected_by_reason: std::collections::BTreeMap<String, i64>,
    /// Whole batches refused for their content, in all and by error code.
    pub batches_rejected: i64,
    pub batches_rejected_by_reason: std::collections::BTreeMap<String, i64>,
    pub sdk_dropped: i64,
    pub rate_limited: i64,
}

impl HealthHour {
    fn add(&mut self, counter: &str, count: i64) {
        match counter {
            "accepted" => self.accepted += count,
            "duplicates" => self.duplicates += count,
            "sdk_dropped" => self.sdk_dropped += count,
            "rate_limited" => self.rate_limited += count,
            other => {
                if let Some(reason) = other.strip_prefix("rejected:") {
                    self.rejected += count;
                    *self
                        .rejected_by_reason
                        .entry(reason.to_owned())
                        .or_default() += count;
                } else if let Some(code) = other.strip_prefix("batch_rejected:") {
                    self.batches_rejected += count;
                    *self
                        .batches_rejected_by_reason
                        .entry(code.to_owned())
                        .or_default() += count;
                }
            }
        }
    }
}

/// Answer of `GET /v1/stats/health`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Health {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// Hours with any count, oldest first.
    pub hours: Vec<HealthHour>,
    pub totals: HealthHour,
    /// Rows this collector process has accepted but not yet committed (all projects).
    pub queue_depth: usize,
    /// When this collector process last committed (any project); `null` before the first.
    pub last_commit: Option<DateTime<Utc>>,
    /// With `serve --queue`: how far the sinks are behind (all projects); `null` without a
    /// queue, or when the lag cannot be read (NATS away, no sink has run yet).
    pub queue_lag: Option<crate::queue::Lag>,
}

impl Health {
    /// Assembles the answer from [`health_sql`]'s rows and the committer's state.
    pub fn assemble(
        q: &Query,
        rows: &[(i64, String, i64)],
        queue_depth: usize,
        last_commit: Option<DateTime<Utc>>,
    ) -> Health {
        let mut hours: Vec<HealthHour> = Vec::new();
        let mut totals = HealthHour::default();
        for (h, counter, count) in rows {
            let t = DateTime::from_timestamp(*h, 0);
            if hours.last().map(|x| x.t) != Some(t) {
                hours.push(HealthHour {
                    t,
                    ..HealthHour::default()
                });
            }
            if let Some(hour) = hours.last_mut() {
                hour.add(counter, *count);
            }
            totals.add(counter, *count);
        }
        Health {
            from: q.from,
            to: q.to,
            hours,
            totals,
            queue_depth,
            last_commit,
            queue_lag: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_per_hour_and_go_back_after_a_failed_write() {
        let health = IngestHealth::default();
        let p = Uuid::nil();
        let t = DateTime::parse_from_rfc3339("2026-11-22T10:59:59Z")
            .unwrap()
            .with_timezone(&Utc);
        health.add(p, t, Counter::Accepted, 3);
        health.add(p, t, Counter::Accepted, 2);
        health.add(p, t + chrono::Duration::seconds(1), Counter::Accepted, 1);
        health.add(p, t, Counter::Rejected("too_large"), 1);
        health.add(p, t, Counter::SdkDropped, 0);
        let mut taken = health.take();
        taken.sort_by_key(|((_, hour, counter), _)| (*hour, counter.name()));
        let got: Vec<_> = taken
            .iter()
            .map(|((_, hour, counter), count)| (*hour % 86_400, counter.name(), *count))
            .collect();
        assert_eq!(
            got,
            vec![
                (36_000, "accepted".to_owned(), 5),
                (36_000, "rejected:too_large".to_owned(), 1),
                (39_600, "accepted".to_owned(), 1),
            ]
        );
        assert!(health.take().is_empty());
        health.add(p, t, Counter::Accepted, 1);
        health.restore(taken);
        let back: i64 = health
            .take()
            .iter()
            .filter(|((_, _, counter), _)| *counter == Counter::Accepted)
            .map(|(_, count)| count)
            .sum();
        assert_eq!(back, 7);
    }
}
