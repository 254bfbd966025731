//! The delivery queue on the embedded SQLite store: one collector process owns the file, so
//! a claim is a single `UPDATE ... RETURNING` (SQLite runs writes one at a time); times in
//! ms since the epoch, as in the rest of the SQLite schema.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use uuid::Uuid;

use super::postgres::finish_columns;
use super::{
    Claimed, DeliveryStore, Destination, DestinationStatus, Finish, NewDestination, Outcome,
};
use crate::store::sqlite::SqliteStore;
use crate::store::StoreError;

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn decode(e: impl std::error::Error + Send + Sync + 'static) -> sqlx::Error {
    sqlx::Error::Decode(Box::new(e))
}

fn uuid(row: &SqliteRow, column: &str) -> Result<Uuid, sqlx::Error> {
    Uuid::parse_str(&row.try_get::<String, _>(column)?).map_err(decode)
}

fn time(row: &SqliteRow, column: &str) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    Ok(row
        .try_get::<Option<i64>, _>(column)?
        .and_then(DateTime::from_timestamp_millis))
}

fn destination_from_row(row: &SqliteRow) -> Result<Destination, sqlx::Error> {
    let events: String = row.try_get("events")?;
    Ok(Destination {
        id: uuid(row, "id")?,
        project_id: uuid(row, "project_id")?,
        project: row.try_get("project")?,
        url: row.try_get("url")?,
        events: serde_json::from_str(&events).map_err(decode)?,
        batch_size: row
            .try_get::<i64, _>("batch_size")?
            .clamp(1, i64::from(u32::MAX)) as u32,
        enabled: row.try_get("enabled")?,
        disabled_reason: row.try_get("disabled_reason")?,
        created_at: time(row, "created_at")?.unwrap_or_default(),
    })
}

#[async_trait]
impl DeliveryStore for SqliteStore {
    async fn add_destination(&self, d: &NewDestination) -> Result<(), StoreError> {
        let events = serde_json::Value::from(d.events.clone()).to_string();
        sqlx::query(
            "INSERT INTO webhook_destinations (id, project_id, url, events, batch_size, secret, \
                 created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(d.id.to_string())
        .bind(d.project_id.to_string())
        .bind(&d.url)
        .bind(events)
        .bind(i64::from(d.batch_size))
        .bind(&d.secret)
        .bind(ms(Utc::now()))
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
        let done = sqlx::query("DELETE FROM webhook_destinations WHERE id = ?")
            .bind(id.to_string())
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
            "UPDATE webhook_destinations SET enabled = ?, disabled_reason = ? WHERE id = ?",
        )
        .bind(enabled)
        .bind(if enabled { None } else { reason })
        .bind(id.to_string())
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
                 previous_secret_until = ?, secret = ? WHERE id = ?",
        )
        .bind(ms(previous_until))
        .bind(secret)
        .bind(id.to_string())
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
        let now_ms = ms(now);
        let lease_until = now_ms.saturating_add(lease.as_millis().min(i64::MAX as u128) as i64);
        let mut tx = self.pool().begin().await?;
        let rows = sqlx::query(
            "UPDATE webhook_deliveries \
             SET lease_owner = ?1, lease_until = ?2, attempts = attempts + 1, \
                 last_attempt_at = ?3 \
             WHERE id IN (SELECT id FROM ( \
                 SELECT x.id, x.next_attempt_at, \
                     row_number() OVER (PARTITION BY x.destination_id \
                         ORDER BY x.next_attempt_at) AS n, \
                     (SELECT count(*) FROM webhook_deliveries y \
                         WHERE y.destination_id = x.destination_id AND y.state = 'pending' \
                           AND y.lease_until > ?3) AS busy \
                 FROM webhook_deliveries x \
                 JOIN webhook_destinations d ON d.id = x.destination_id AND d.enabled \
                 WHERE x.state = 'pending' AND x.next_attempt_at <= ?3 \
                   AND (x.lease_until IS NULL OR x.lease_until <= ?3)) \
               WHERE n + busy <= ?4 ORDER BY next_attempt_at LIMIT ?5) \
             RETURNING id, destination_id, attempts, events, created_at",
        )
        .bind(owner.to_string())
        .bind(lease_until)
        .bind(now_ms)
        .bind(i64::from(per_destination))
        .bind(i64::from(max))
        .fetch_all(&mut *tx)
        .await?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in &rows {
            let destination_id = uuid(row, "destination_id")?;
            let d = sqlx::query(
                "SELECT d.url, d.secret, CASE WHEN d.previous_secret_until > ? \
                     THEN d.previous_secret END AS previous_secret, p.name AS project \
                 FROM webhook_destinations d JOIN projects p ON p.id = d.project_id \
                 WHERE d.id = ?",
            )
            .bind(now_ms)
            .bind(destination_id.to_string())
            .fetch_one(&mut *tx)
            .await?;
            let mut secrets = vec![d.try_get::<String, _>("secret")?];
            secrets.extend(d.try_get::<Option<String>, _>("previous_secret")?);
            claimed.push(Claimed {
                id: uuid(row, "id")?,
                destination_id,
                url: d.try_get("url")?,
                secrets,
                project: d.try_get("project")?,
                events: row.try_get("events")?,
                created_at: time(row, "created_at")?.unwrap_or(now),
                attempt: row
                    .try_get::<i64, _>("attempts")?
                    .clamp(1, i64::from(u32::MAX)) as u32,
            });
        }
        tx.commit().await?;
        Ok(claimed)
    }

    async fn finish(&self, outcome: &Outcome, owner: Uuid) -> Result<bool, StoreError> {
        let (finish, now) = (&outcome.finish, outcome.at);
        let (state, status, error, next) = finish_columns(finish);
        let mut tx = self.pool().begin().await?;
        let done = sqlx::query(
            "UPDATE webhook_deliveries SET state = ?4, last_status = ?5, last_error = ?6, \
                 next_attempt_at = COALESCE(?7, next_attempt_at), lease_owner = NULL, \
                 lease_until = NULL, finished_at = CASE WHEN ?4 = 'pending' THEN NULL ELSE ?8 END \
             WHERE id = ?1 AND lease_owner = ?2 AND attempts = ?3 AND state = 'pending'",
        )
        .bind(outcome.delivery.to_string())
        .bind(owner.to_string())
        .bind(i64::from(outcome.attempt))
        .bind(state)
        .bind(status)
        .bind(error)
        .bind(next.map(ms))
        .bind(ms(now))
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        if let Some(error) = error {
            let disable = matches!(finish, Finish::Gone { .. });
            sqlx::query(
                "UPDATE webhook_destinations SET last_error = ?2, last_error_at = ?3, \
                     enabled = enabled AND NOT ?4, \
                     disabled_reason = CASE WHEN ?4 THEN ?2 ELSE disabled_reason END \
                 WHERE id = ?1",
            )
            .bind(outcome.destination_id.to_string())
            .bind(error)
            .bind(ms(now))
            .bind(disable)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn replay(
        &self,
        destination: Uuid,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE webhook_deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?4, \
                 finished_at = NULL, lease_owner = NULL, lease_until = NULL \
             WHERE destination_id = ?1 AND state = 'failed' AND created_at >= ?2 \
                 AND created_at < ?3",
        )
        .bind(destination.to_string())
        .bind(ms(from))
        .bind(ms(to))
        .bind(ms(now))
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
                     AND (w.lease_until IS NULL OR w.lease_until <= ?2)) AS pending, \
                 count(w.id) FILTER (WHERE w.state = 'pending' AND w.lease_until > ?2) \
                     AS in_flight, \
                 count(w.id) FILTER (WHERE w.state = 'delivered') AS delivered, \
                 count(w.id) FILTER (WHERE w.state = 'failed') AS failed, \
                 min(w.next_attempt_at) FILTER (WHERE w.state = 'pending') AS next_attempt_at \
             FROM webhook_destinations d JOIN projects p ON p.id = d.project_id \
             LEFT JOIN webhook_deliveries w ON w.destination_id = d.id \
             WHERE ?1 IS NULL OR d.project_id = ?1 \
             GROUP BY d.id ORDER BY d.created_at, d.id",
        )
        .bind(project.map(|p| p.to_string()))
        .bind(ms(now))
        .fetch_all(self.pool())
        .await?;
        let status = rows
            .iter()
            .map(|row| {
                Ok::<_, sqlx::Error>(DestinationStatus {
                    id: uuid(row, "id")?,
                    project: row.try_get("project")?,
                    url: row.try_get("url")?,
                    enabled: row.try_get("enabled")?,
                    disabled_reason: row.try_get("disabled_reason")?,
                    pending: row.try_get("pending")?,
                    in_flight: row.try_get("in_flight")?,
                    delivered: row.try_get("delivered")?,
                    failed: row.try_get("failed")?,
                    last_error: row.try_get("last_error")?,
                    last_error_at: time(row, "last_error_at")?,
                    next_attempt_at: time(row, "next_attempt_at")?,
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
                 WHERE state = 'delivered' AND finished_at < ? LIMIT ?)",
        )
        .bind(ms(before))
        .bind(i64::from(limit))
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }
}
