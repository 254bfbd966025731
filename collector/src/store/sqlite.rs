//! The embedded store: one SQLite file, so trying the collector needs no database server.
//!
//! Same columns and dedupe key as Postgres (times as ms since the epoch, JSON as text); no
//! partitions, retention deletes old rows instead. Writes are serialised by SQLite itself.

use std::collections::HashSet;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde_json::value::RawValue;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::Row;
use uuid::Uuid;

use crate::analytics::{self, Dialect, Dimension, Interval, Query, Statement, SummaryRow, Value};
use crate::export::StoredEvent;

use super::{
    claim_inserted, enrichment_from_row, month_start, owned_stream, sorted_receipts, BatchReceipt,
    BoxStream, EventRow, EventStore, KeyKind, PartitionReport, Project, Stats, StoreError,
};

pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    pub async fn open_path(path: &Path) -> Result<SqliteStore, StoreError> {
        Self::open_with(SqliteConnectOptions::new().filename(path)).await
    }

    pub async fn open_url(url: &str) -> Result<SqliteStore, StoreError> {
        Self::open_with(SqliteConnectOptions::from_str(url)?).await
    }

    async fn open_with(options: SqliteConnectOptions) -> Result<SqliteStore, StoreError> {
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        Ok(SqliteStore { pool })
    }
}

impl SqliteStore {
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Runs one stats API statement (the handler's timeout bounds it).
    async fn analytics_rows<T>(&self, statement: Statement) -> Result<Vec<T>, StoreError>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow> + Send + Unpin,
    {
        let mut query = sqlx::query_as::<_, T>(&statement.sql);
        for value in statement.values {
            query = match value {
                Value::Project(id) => query.bind(id.to_string()),
                Value::Time(t) => query.bind(ms(t)),
                Value::Text(s) => query.bind(s),
                Value::Int(n) => query.bind(n),
            };
        }
        Ok(query.fetch_all(&self.pool).await?)
    }
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn project_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Project, sqlx::Error> {
    let id: String = row.try_get("id")?;
    let origins: String = row.try_get("origins")?;
    Ok(Project {
        id: Uuid::parse_str(&id).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        name: row.try_get("name")?,
        write_key: row.try_get("write_key")?,
        read_key: row.try_get("read_key")?,
        origins: serde_json::from_str(&origins).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        rate_limit: row
            .try_get::<Option<i64>, _>("rate_limit")?
            .map(|r| r.clamp(0, u32::MAX as i64) as u32),
    })
}

const PROJECT_COLUMNS: &str = "id, name, write_key, read_key, origins, rate_limit";

#[async_trait]
impl EventStore for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations/sqlite")
            .run(&self.pool)
            .await?;
        Ok(())
    }

    fn deliveries(&self) -> Option<std::sync::Arc<dyn crate::webhooks::DeliveryStore>> {
        Some(std::sync::Arc::new(SqliteStore {
            pool: self.pool.clone(),
        }))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn insert_events(
        &self,
        rows: &[EventRow],
        receipts: &[BatchReceipt],
    ) -> Result<Vec<bool>, StoreError> {
        let mut inserted = HashSet::new();
        let mut tx = self.pool.begin().await?;
        for r in rows {
            let e = &r.enrichment;
            let result = sqlx::query(
                "INSERT INTO events (project_id, id, ts, name, anonymous_id, session_id, \
                     user_id, props, context, sent_at, received_at, time, browser, \
                     browser_version, os, device_type, is_bot, bot_reason, ip, country, city) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(r.project_id.to_string())
            .bind(r.id.to_string())
            .bind(ms(r.ts))
            .bind(&r.name)
            .bind(&r.anonymous_id)
            .bind(&r.session_id)
            .bind(&r.user_id)
            .bind(r.props.as_ref().map(|v| v.get()))
            .bind(r.context.as_ref().map(|v| v.get()))
            .bind(ms(r.sent_at))
            .bind(ms(r.received_at))
            .bind(ms(r.time))
            .bind(&e.browser)
            .bind(&e.browser_version)
            .bind(&e.os)
            .bind(&e.device_type)
            .bind(e.is_bot)
            .bind(&e.bot_reason)
            .bind(&e.ip)
            .bind(&e.country)
            .bind(&e.city)
            .execute(&mut *tx)
            .await?;
            if result.rows_affected() > 0 {
                inserted.insert((r.project_id, r.id));
            }
        }
        for r in sorted_receipts(receipts) {
            sqlx::query(
                "INSERT INTO batch_receipts (project_id, batch_id, received_at) VALUES (?, ?, ?) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(r.project_id.to_string())
            .bind(&r.batch_id)
            .bind(ms(r.received_at))
            .execute(&mut *tx)
            .await?;
        }
        let new = claim_inserted(rows, inserted);
        // The outbox: webhook deliveries of the new events, in the same transaction.
        crate::webhooks::outbox::enqueue_sqlite(&mut tx, rows, &new, Utc::now()).await?;
        tx.commit().await?;
        Ok(new)
    }

    async fn arrived_batches(
        &self,
        project_id: Uuid,
        batch_ids: &[String],
    ) -> Result<Vec<String>, StoreError> {
        if batch_ids.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders = vec!["?"; batch_ids.len()].join(", ");
        let sql = format!(
            "SELECT batch_id FROM batch_receipts WHERE project_id = ? AND batch_id IN ({placeholders})"
        );
        let mut query = sqlx::query_scalar(&sql).bind(project_id.to_string());
        for id in batch_ids {
            query = query.bind(id);
        }
        Ok(query.fetch_all(&self.pool).await?)
    }

    async fn delete_receipts_before(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let result = sqlx::query(
            "DELETE FROM batch_receipts WHERE (project_id, batch_id) IN \
             (SELECT project_id, batch_id FROM batch_receipts WHERE received_at < ? LIMIT ?)",
        )
        .bind(ms(before))
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected())
    }

    async fn add_project(&self, p: &Project) -> Result<(), StoreError> {
        let origins = serde_json::Value::from(p.origins.clone()).to_string();
        let result = sqlx::query(
            "INSERT INTO projects (id, name, write_key, read_key, origins, rate_limit) \
             VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
        )
        .bind(p.id.to_string())
        .bind(&p.name)
        .bind(&p.write_key)
        .bind(&p.read_key)
        .bind(origins)
        .bind(p.rate_limit.map(i64::from))
        .execute(&self.pool)
        .await?;
        if result.rows_affected() == 0 {
            return Err(StoreError::ProjectExists(p.name.clone()));
        }
        Ok(())
    }

    async fn list_projects(&self) -> Result<Vec<Project>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {PROJECT_COLUMNS} FROM projects ORDER BY created_at, name"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(project_from_row)
            .collect::<Result<_, _>>()?)
    }

    async fn remove_project(&self, name_or_id: &str) -> Result<bool, StoreError> {
        let result = sqlx::query("DELETE FROM projects WHERE name = ?1 OR id = ?1")
            .bind(name_or_id)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() > 0)
    }

    async fn project_by_key(
        &self,
        kind: KeyKind,
        key: &str,
    ) -> Result<Option<Project>, StoreError> {
        let column = kind.column();
        let row = sqlx::query(&format!(
            "SELECT {PROJECT_COLUMNS} FROM projects WHERE {column} = ?"
        ))
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(project_from_row).transpose()?)
    }

    async fn stats(
        &self,
        project_id: Uuid,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Stats, StoreError> {
        let pid = project_id.to_string();
        let totals: (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT anonymous_id), count(DISTINCT session_id) \
             FROM events WHERE project_id = ? AND time >= ? AND time < ?",
        )
        .bind(&pid)
        .bind(ms(from))
        .bind(ms(to))
        .fetch_one(&self.pool)
        .await?;
        let by_name: Vec<(String, i64)> = sqlx::query_as(
            "SELECT name, count(*) FROM events WHERE project_id = ? AND time >= ? AND time < ? \
             GROUP BY name ORDER BY count(*) DESC, name LIMIT 1000",
        )
        .bind(&pid)
        .bind(ms(from))
        .bind(ms(to))
        .fetch_all(&self.pool)
        .await?;
        let per_day: Vec<(String, i64)> = sqlx::query_as(
            "SELECT strftime('%Y-%m-%d', time / 1000, 'unixepoch') AS day, count(*) FROM events \
             WHERE project_id = ? AND time >= ? AND time < ? GROUP BY day ORDER BY day",
        )
        .bind(&pid)
        .bind(ms(from))
        .bind(ms(to))
        .fetch_all(&self.pool)
        .await?;
        Ok(Stats::assemble((from, to), totals, by_name, per_day))
    }

    async fn analytics_summary(&self, q: &Query) -> Result<SummaryRow, StoreError> {
        let rows = self
            .analytics_rows(analytics::summary_sql(Dialect::Sqlite, q))
            .await?;
        Ok(rows.into_iter().next().unwrap_or_default())
    }

    async fn analytics_timeseries(
        &self,
        q: &Query,
        interval: Interval,
    ) -> Result<Vec<(i64, i64, i64)>, StoreError> {
        self.analytics_rows(analytics::timeseries_sql(Dialect::Sqlite, q, interval))
            .await
    }

    async fn analytics_breakdown(
        &self,
        q: &Query,
        by: &Dimension,
        limit: u32,
    ) -> Result<Vec<(String, i64, i64)>, StoreError> {
        self.analytics_rows(analytics::breakdown_sql(Dialect::Sqlite, q, by, limit))
            .await
    }

    fn export_events(
        &self,
        project_id: Uuid,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> BoxStream<'static, Result<StoredEvent, StoreError>> {
        owned_stream(self.pool.clone(), move |pool: &SqlitePool| {
            sqlx::query(
                "SELECT id, name, ts, time, sent_at, received_at, anonymous_id, session_id, \
                     user_id, props, context, browser, browser_version, os, device_type, \
                     is_bot, bot_reason, ip, country, city \
                 FROM events WHERE project_id = ? AND ts >= ? AND ts < ? ORDER BY ts, id",
            )
            .bind(project_id.to_string())
            .bind(ms(from))
            .bind(ms(to))
            .fetch(pool)
            .map(|row| Ok(stored_event_from_row(&row?)?))
            .boxed()
        })
    }

    async fn analytics_funnel(
        &self,
        q: &Query,
        steps: &[crate::funnel::Step],
    ) -> Result<Vec<(i64, i64, i64)>, StoreError> {
        self.analytics_rows(crate::funnel::funnel_sql(Dialect::Sqlite, q, steps))
            .await
    }

    async fn record_ingest_health(
        &self,
        counts: &[crate::health::HealthCount],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for c in counts {
            sqlx::query(
                "INSERT INTO ingest_health (project_id, hour, counter, count) \
                 VALUES (?, ?, ?, ?) \
                 ON CONFLICT (project_id, hour, counter) \
                 DO UPDATE SET count = count + excluded.count",
            )
            .bind(c.project_id.to_string())
            .bind(ms(c.hour))
            .bind(&c.counter)
            .bind(c.count)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn analytics_health(&self, q: &Query) -> Result<Vec<(i64, String, i64)>, StoreError> {
        self.analytics_rows(crate::health::health_sql(Dialect::Sqlite, q))
            .await
    }

    async fn analytics_live(
        &self,
        q: &Query,
        limit: u32,
    ) -> Result<(i64, Vec<crate::live::RecentRow>), StoreError> {
        let visitors: Vec<(i64,)> = self
            .analytics_rows(crate::live::visitors_sql(Dialect::Sqlite, q))
            .await?;
        let recent = self
            .analytics_rows(crate::live::recent_sql(Dialect::Sqlite, q, limit))
            .await?;
        Ok((visitors.first().map_or(0, |v| v.0), recent))
    }

    async fn maintain_partitions(
        &self,
        now: DateTime<Utc>,
        _months_ahead: u32,
        retention_months: u32,
    ) -> Result<PartitionReport, StoreError> {
        if retention_months > 0 {
            let cutoff = month_start(now, -(retention_months as i32));
            sqlx::query("DELETE FROM events WHERE ts < ?")
                .bind(ms(cutoff))
                .execute(&self.pool)
                .await?;
        }
        Ok(PartitionReport::default())
    }
}

fn stored_event_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<StoredEvent, sqlx::Error> {
    let decode = |e: Box<dyn std::error::Error + Send + Sync>| sqlx::Error::Decode(e);
    let time = |column: &str| -> Result<DateTime<Utc>, sqlx::Error> {
        let ms: i64 = row.try_get(column)?;
        DateTime::from_timestamp_millis(ms)
            .ok_or_else(|| decode(format!("{column} out of range").into()))
    };
    let json = |column: &str| -> Result<Option<Box<RawValue>>, sqlx::Error> {
        row.try_get::<Option<String>, _>(column)?
            .map(|text| RawValue::from_string(text).map_err(|e| decode(Box::new(e))))
            .transpose()
    };
    let id: String = row.try_get("id")?;
    Ok(StoredEvent {
        id: Uuid::parse_str(&id).map_err(|e| decode(Box::new(e)))?,
        name: row.try_get("name")?,
        ts: time("ts")?,
        time: time("time")?,
        sent_at: time("sent_at")?,
        received_at: time("received_at")?,
        anonymous_id: row.try_get("anonymous_id")?,
        session_id: row.try_get("session_id")?,
        user_id: row.try_get("user_id")?,
        props: json("props")?,
        context: json("context")?,
        enrichment: enrichment_from_row(row)?,
    })
}
