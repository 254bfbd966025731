//! The delivery queue on Postgres. Claims take a transaction-scoped advisory lock (claims
//! of all collectors run one at a time, so the per-destination in-flight count they read is
//! exact) and `FOR UPDATE SKIP LOCKED` (a delivery whose outcome is being written is never
//! claimed under it). A worker's round is one transaction: the outcomes that came in since
//! the last round in one statement (which takes the lock), then the claim.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

use super::{
    Claimed, DeliveryStore, Destination, DestinationStatus, Finish, NewDestination, Outcome,
};
use crate::store::postgres::PgStore;
use crate::store::StoreError;

/// Lock id serialising delivery claims across collectors ("trkhooks").
const CLAIM_LOCK_ID: i64 = 0x7472_6b68_6f6f_6b73;

fn lease_interval(lease: Duration) -> chrono::Duration {
    chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::seconds(60))
}

fn destination_from_row(row: &PgRow) -> Result<Destination, sqlx::Error> {
    Ok(Destination {
        id: row.try_get("id")?,
        project_id: row.try_get("project_id")?,
        project: row.try_get("project")?,
        url: row.try_get("url")?,
        events: row.try_get("events")?,
        batch_size: row.try_get::<i32, _>("batch_size")?.max(1) as u32,
        enabled: row.try_get("enabled")?,
        disabled_reason: row.try_get("disabled_reason")?,
        created_at: row.try_get("created_at")?,
    })
}

/// (state, status, error, next attempt) an outcome is recorded as.
pub(super) fn finish_columns(
    finish: &Finish,
) -> (
    &'static str,
    Option<i32>,
    Option<&str>,
    Option<DateTime<Utc>>,
) {
    match finish {
        Finish::Delivered { status } => ("delivered", Some(i32::from(*status)), None, None),
        Finish::Retry { at, status, error } => {
            ("pending", status.map(i32::from), Some(error), Some(*at))
        }
        Finish::Failed { status, error } => ("failed", status.map(i32::from), Some(error), None),
        Finish::Gone { error } => ("failed", Some(410), Some(error), None),
    }
}

/// Begins a worker's transaction. Its statements run on generic plans: Postgres kept
/// planning the claim afresh on every execution (a custom plan, about twice the time of the
/// execution itself); the claimed ids are picked in an `ARRAY(...)` so that the generic
/// plan fetches them by primary key whatever `LIMIT` the parameters say.
const BEGIN_GENERIC: &str = "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan";

/// Claims up to `max` due deliveries (see [`DeliveryStore::claim`]) in `tx`, which holds
/// the claims' advisory lock.
async fn claim_locked(
    tx: &mut sqlx::PgConnection,
    owner: Uuid,
    now: DateTime<Utc>,
    max: u32,
    per_destination: u32,
    lease: Duration,
) -> Result<Vec<Claimed>, StoreError> {
    let rows = sqlx::query(
        "UPDATE webhook_deliveries AS w \
         SET lease_owner = $1, lease_until = $2, attempts = w.attempts + 1, \
             last_attempt_at = $3 \
         FROM webhook_destinations AS d JOIN projects AS p ON p.id = d.project_id \
         WHERE d.id = w.destination_id AND w.id = ANY(ARRAY( \
             SELECT picked.id FROM webhook_destinations d \
             CROSS JOIN LATERAL (SELECT count(*) AS busy FROM webhook_deliveries y \
                 WHERE y.destination_id = d.id AND y.state = 'pending' \
                   AND y.lease_until > $3) b \
             CROSS JOIN LATERAL (SELECT x.id FROM webhook_deliveries x \
                 WHERE x.destination_id = d.id AND x.state = 'pending' \
                   AND x.next_attempt_at <= $3 \
                   AND (x.lease_until IS NULL OR x.lease_until <= $3) \
                 ORDER BY x.next_attempt_at \
                 LIMIT greatest(0, $4 - b.busy) \
                 FOR UPDATE SKIP LOCKED) picked \
             WHERE d.enabled \
             LIMIT $5)) \
         RETURNING w.id, w.destination_id, w.attempts, w.events, w.created_at, d.url, \
             d.secret, CASE WHEN d.previous_secret_until > $3 THEN d.previous_secret END \
             AS previous_secret, p.name AS project",
    )
    .bind(owner)
    .bind(now + lease_interval(lease))
    .bind(now)
    .bind(i64::from(per_destination))
    .bind(i64::from(max))
    .fetch_all(&mut *tx)
    .await?;
    let claimed = rows
        .iter()
        .map(|row| {
            let mut secrets = vec![row.try_get::<String, _>("secret")?];
            secrets.extend(row.try_get::<Option<String>, _>("previous_secret")?);
            Ok::<_, sqlx::Error>(Claimed {
                id: row.try_get("id")?,
                destination_id: row.try_get("destination_id")?,
                url: row.try_get("url")?,
                secrets,
                project: row.try_get("project")?,
                events: row.try_get("events")?,
                created_at: row.try_get("created_at")?,
                attempt: row.try_get::<i32, _>("attempts")?.max(1) as u32,
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(claimed)
}

#[async_trait]
impl DeliveryStore for PgStore {
    async fn add_destination(&self, d: &NewDestination) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO webhook_destinations (id, project_id, url, events, batch_size, secret) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(d.id)
        .bind(d.project_id)
        .bind(&d.url)
        .bind(&d.events)
        .bind(d.batch_size.min(i32::MAX as u32) as i32)
        .bind(&d.secret)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn list_destinations(&self) -> Result<Vec<Destination>, StoreError> {
        let rows = sqlx::query(
            "SELECT d.id, d.project_id, p.name AS project, d.url, d.events, d.batch_size, \
                 d.enabled, d.disabled_reason, d.created_at \
             FROM webhook_destinations d JOIN projects p ON p.id = d.project_id \
             ORDER BY d.created_at, d.id",
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .map(destination_from_row)
            .collect::<Result<_, _>>()?)
    }

    async fn remove_destination(&self, id: Uuid) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM webhook_destinations WHERE id = $1")
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn set_enabled(
        &self,
        id: Uuid,
        enabled: bool,
        reason: Option<&str>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE webhook_destinations SET enabled = $2, disabled_reason = $3 WHERE id = $1",
        )
        .bind(id)
        .bind(enabled)
        .bind(if enabled { None } else { reason })
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn rotate_secret(
        &self,
        id: Uuid,
        secret: &str,
        previous_until: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE webhook_destinations SET previous_secret = secret, \
                 previous_secret_until = $3, secret = $2 WHERE id = $1",
        )
        .bind(id)
        .bind(secret)
        .bind(previous_until)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn claim(
        &self,
        owner: Uuid,
        now: DateTime<Utc>,
        max: u32,
        per_destination: u32,
        lease: Duration,
    ) -> Result<Vec<Claimed>, StoreError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let mut tx = self.pool().begin_with(BEGIN_GENERIC).await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(CLAIM_LOCK_ID)
            .execute(&mut *tx)
            .await?;
        let claimed = claim_locked(&mut tx, owner, now, max, per_destination, lease).await?;
        tx.commit().await?;
        Ok(claimed)
    }

    async fn finish(&self, outcome: &Outcome, owner: Uuid) -> Result<bool, StoreError> {
        let recorded = self
            .finish_and_claim(
                std::slice::from_ref(outcome),
                owner,
                outcome.at,
                0,
                0,
                Duration::ZERO,
            )
            .await?
            .0;
        Ok(recorded.first().copied().unwrap_or(false))
    }

    async fn finish_and_claim(
        &self,
        outcomes: &[Outcome],
        owner: Uuid,
        now: DateTime<Utc>,
        max: u32,
        per_destination: u32,
        lease: Duration,
    ) -> Result<(Vec<bool>, Vec<Claimed>), StoreError> {
        if outcomes.is_empty() {
            let claimed = self.claim(owner, now, max, per_destination, lease).await?;
            return Ok((Vec::new(), claimed));
        }
        let columns: Vec<_> = outcomes.iter().map(|o| finish_columns(&o.finish)).collect();
        let ids: Vec<Uuid> = outcomes.iter().map(|o| o.delivery).collect();
        let attempts: Vec<i32> = outcomes.iter().map(|o| o.attempt as i32).collect();
        let ats: Vec<DateTime<Utc>> = outcomes.iter().map(|o| o.at).collect();
        let states: Vec<&str> = columns.iter().map(|c| c.0).collect();
        let statuses: Vec<Option<i32>> = columns.iter().map(|c| c.1).collect();
        let errors: Vec<Option<&str>> = columns.iter().map(|c| c.2).collect();
        let nexts: Vec<Option<DateTime<Utc>>> = columns.iter().map(|c| c.3).collect();
        let mut tx = self.pool().begin_with(BEGIN_GENERIC).await?;
        // One statement records every outcome and, when a claim follows, takes the claims'
        // lock: the claim's statement, after it, sees the recorded outcomes and every
        // other collector's committed claims.
        let recorded: Vec<Uuid> = sqlx::query_scalar(
            "WITH lock AS MATERIALIZED (SELECT pg_advisory_xact_lock($1) WHERE $2), \
             done AS (UPDATE webhook_deliveries AS w SET state = u.state, \
                     last_status = u.status, last_error = u.error, \
                     next_attempt_at = COALESCE(u.next, w.next_attempt_at), lease_owner = NULL, \
                     lease_until = NULL, \
                     finished_at = CASE WHEN u.state = 'pending' THEN NULL ELSE u.at END \
                 FROM UNNEST($3::uuid[], $4::int[], $5::text[], $6::int[], $7::text[], \
                     $8::timestamptz[], $9::timestamptz[]) \
                     AS u(id, attempt, state, status, error, next, at) \
                 WHERE w.id = u.id AND w.lease_owner = $10 AND w.attempts = u.attempt \
                     AND w.state = 'pending' \
                 RETURNING w.id) \
             SELECT array(SELECT id FROM done) FROM (SELECT count(*) FROM lock) AS locked",
        )
        .bind(CLAIM_LOCK_ID)
        .bind(max > 0)
        .bind(&ids)
        .bind(&attempts)
        .bind(&states)
        .bind(&statuses)
        .bind(&errors)
        .bind(&nexts)
        .bind(&ats)
        .bind(owner)
        .fetch_one(&mut *tx)
        .await?;
        let recorded: Vec<bool> = ids.iter().map(|id| recorded.contains(id)).collect();
        // The destination's last error (and a 410's disabling), in the order they happened.
        for ((outcome, (_, _, error, _)), done) in outcomes.iter().zip(&columns).zip(&recorded) {
            let (Some(error), true) = (error, done) else {
                continue;
            };
            let disable = matches!(outcome.finish, Finish::Gone { .. });
            sqlx::query(
                "UPDATE webhook_destinations SET last_error = $2, last_error_at = $3, \
                     enabled = enabled AND NOT $4, \
                     disabled_reason = CASE WHEN $4 THEN $2 ELSE disabled_reason END \
                 WHERE id = $1",
            )
            .bind(outcome.destination_id)
            .bind(error)
            .bind(outcome.at)
            .bind(disable)
            .execute(&mut *tx)
            .await?;
        }
        let claimed = if max > 0 {
            claim_locked(&mut tx, owner, now, max, per_destination, lease).await?
        } else {
            Vec::new()
        };
        tx.commit().await?;
        Ok((recorded, claimed))
    }

    async fn replay(
        &self,
        destination: Uuid,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE webhook_deliveries SET state = 'pending', attempts = 0, next_attempt_at = $4, \
                 finished_at = NULL, lease_owner = NULL, lease_until = NULL \
             WHERE destination_id = $1 AND state = 'failed' AND created_at >= $2 \
                 AND created_at < $3",
        )
        .bind(destination)
        .bind(from)
        .bind(to)
        .bind(now)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }

    async fn status(
        &self,
        project: Option<Uuid>,
        now: DateTime<Utc>,
    ) -> Result<Vec<DestinationStatus>, StoreError> {
        let rows = sqlx::query(
            "SELECT d.id, p.name AS project, d.url, d.enabled, d.disabled_reason, d.last_error, \
                 d.last_error_at, \
                 count(w.id) FILTER (WHERE w.state = 'pending' \
                     AND (w.lease_until IS NULL OR w.lease_until <= $2)) AS pending, \
                 count(w.id) FILTER (WHERE w.state = 'pending' AND w.lease_until > $2) \
                     AS in_flight, \
                 count(w.id) FILTER (WHERE w.state = 'delivered') AS delivered, \
                 count(w.id) FILTER (WHERE w.state = 'failed') AS failed, \
                 min(w.next_attempt_at) FILTER (WHERE w.state = 'pending') AS next_attempt_at \
             FROM webhook_destinations d JOIN projects p ON p.id = d.project_id \
             LEFT JOIN webhook_deliveries w ON w.destination_id = d.id \
             WHERE $1::uuid IS NULL OR d.project_id = $1 \
             GROUP BY d.id, p.name ORDER BY d.created_at, d.id",
        )
        .bind(project)
        .bind(now)
        .fetch_all(self.pool())
        .await?;
        let status = rows
            .iter()
            .map(|row| {
                Ok::<_, sqlx::Error>(DestinationStatus {
                    id: row.try_get("id")?,
                    project: row.try_get("project")?,
                    url: row.try_get("url")?,
                    enabled: row.try_get("enabled")?,
                    disabled_reason: row.try_get("disabled_reason")?,
                    pending: row.try_get("pending")?,
                    in_flight: row.try_get("in_flight")?,
                    delivered: row.try_get("delivered")?,
                    failed: row.try_get("failed")?,
                    last_error: row.try_get("last_error")?,
                    last_error_at: row.try_get("last_error_at")?,
                    next_attempt_at: row.try_get("next_attempt_at")?,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(status)
    }

    async fn queue_depth(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries WHERE state = 'pending'")
                .fetch_one(self.pool())
                .await?,
        )
    }

    async fn delete_delivered_before(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM webhook_deliveries WHERE id IN (SELECT id FROM webhook_deliveries \
                 WHERE state = 'delivered' AND finished_at < $1 LIMIT $2)",
        )
        .bind(before)
        .bind(i64::from(limit))
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }
}
