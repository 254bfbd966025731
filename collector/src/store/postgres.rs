//! The production store: Postgres, `events` partitioned by month of the client timestamp.
//!
//! Owns the SQL for Postgres: batched inserts via `UNNEST` with `ON CONFLICT DO NOTHING
//! RETURNING` (dedupe and "what was new" in one round trip), and monthly partition upkeep.

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Datelike, Utc};
use futures_util::StreamExt;
use serde_json::value::RawValue;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use sqlx::Row;
use uuid::Uuid;

use crate::analytics::{self, Dialect, Dimension, Interval, Query, Statement, SummaryRow, Value};
use crate::export::StoredEvent;
use crate::rollup;

use super::{
    claim_inserted, enrichment_from_row, month_start, owned_stream, sorted_receipts, BatchReceipt,
    BoxStream, EventRow, EventStore, KeyKind, PartitionReport, Project, Stats, StoreError,
};

pub struct PgStore {
    pool: PgPool,
    /// Whether the stats API reads (and inserts update) the rollups (see [`crate::rollup`]).
    rollups: rollup::Availability,
}

/// Channel notified by the `projects_changed` trigger (migration 0003).
const PROJECTS_CHANNEL: &str = "tracklet_projects";

/// Lock id serialising partition maintenance across collectors sharing one database.
const PARTITION_LOCK_ID: i64 = 0x7472_6163_6b6c_6574; // "tracklet"

impl PgStore {
    fn pool_options(max_connections: u32) -> PgPoolOptions {
        PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            // Fail fast when the database is down: the request gets a 503 + Retry-After.
            .acquire_timeout(Duration::from_secs(3))
    }

    /// Connects now (fails when the database is unreachable).
    pub async fn connect(url: &str, max_connections: u32) -> Result<PgStore, StoreError> {
        let pool = Self::pool_options(max_connections).connect(url).await?;
        Ok(PgStore::from_pool(pool))
    }

    /// Connects on first use; the pool reconnects by itself after an outage.
    pub fn connect_lazy(url: &str, max_connections: u32) -> Result<PgStore, StoreError> {
        let pool = Self::pool_options(max_connections).connect_lazy(url)?;
        Ok(PgStore::from_pool(pool))
    }

    /// Wraps an existing pool (tests, tools).
    pub fn from_pool(pool: PgPool) -> PgStore {
        PgStore {
            pool,
            rollups: rollup::Availability::default(),
        }
    }

    /// A store that never uses the rollups: stats from raw events, inserts that leave the
    /// rollups alone (tests compare the two ways).
    pub fn without_rollups(pool: PgPool) -> PgStore {
        PgStore {
            pool,
            rollups: rollup::Availability::off(),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The rollup statement for a stats query, when the rollups are on and can answer it;
    /// the events committed before it are drained into them first.
    async fn with_rollups(
        &self,
        statement: impl FnOnce() -> Option<Statement>,
    ) -> Result<Option<Statement>, StoreError> {
        if !self.rollups.on(&self.pool).await? {
            return Ok(None);
        }
        let Some(statement) = statement() else {
            return Ok(None);
        };
        rollup::drain_for_query(&self.pool).await?;
        Ok(Some(statement))
    }

    /// Runs one stats API statement in a read-only transaction with a statement timeout.
    async fn analytics_rows<T>(&self, statement: Statement) -> Result<Vec<T>, StoreError>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
    {
        // One round trip; the timeout is a constant of ours, not user input (SET takes no
        // parameters). JIT: compiling these short aggregate queries costs more than it
        // saves. Custom plans: the statements are prepared and kept per connection, and
        // after five executions Postgres may switch to a generic plan, blind to the range
        // and project; at ten million events the entry and exit pages then went from 70 ms
        // to the 5 s timeout (2026-12-01).
        let begin = format!(
            "BEGIN READ ONLY; SET LOCAL statement_timeout = {}; SET LOCAL jit = off; \
             SET LOCAL plan_cache_mode = force_custom_plan",
            analytics::STATEMENT_TIMEOUT.as_millis()
        );
        let mut tx = self.pool.begin_with(begin).await?;
        let mut query = sqlx::query_as::<_, T>(&statement.sql);
        for value in statement.values {
            query = match value {
                Value::Project(id) => query.bind(id),
                Value::Time(t) => query.bind(t),
                Value::Text(s) => query.bind(s),
                Value::Int(n) => query.bind(n),
            };
        }
        let rows = query.fetch_all(&mut *tx).await?;
        tx.commit().await?;
        Ok(rows)
    }
}

fn project_from_row(row: &sqlx::postgres::PgRow) -> Result<Project, sqlx::Error> {
    Ok(Project {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        write_key: row.try_get("write_key")?,
        read_key: row.try_get("read_key")?,
        origins: row.try_get("origins")?,
        rate_limit: row
            .try_get::<Option<i32>, _>("rate_limit")?
            .map(|r| r.max(0) as u32),
    })
}

const PROJECT_COLUMNS: &str = "id, name, write_key, read_key, origins, rate_limit";

/// The receipts of an insert, as a `WITH` item (see `insert_events`).
const INSERT_RECEIPTS: &str = "receipts AS (\
     INSERT INTO batch_receipts (project_id, batch_id, received_at) \
     SELECT * FROM UNNEST($22::uuid[], $23::text[], $24::timestamptz[]) \
     ON CONFLICT DO NOTHING)";

/// The events of an insert, without `RETURNING` (see `insert_events`).
const INSERT_EVENTS: &str = "INSERT INTO events (project_id, id, ts, name, anonymous_id, \
         session_id, user_id, props, context, sent_at, received_at, time, browser, \
         browser_version, os, device_type, is_bot, bot_reason, ip, country, city) \
     SELECT project_id, id, ts, name, anonymous_id, session_id, user_id, \
         props::jsonb, context::jsonb, sent_at, received_at, time, browser, \
         browser_version, os, device_type, is_bot, bot_reason, ip, country, city \
     FROM UNNEST($1::uuid[], $2::uuid[], $3::timestamptz[], $4::text[], \
         $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], \
         $10::timestamptz[], $11::timestamptz[], $12::timestamptz[], $13::text[], \
         $14::text[], $15::text[], $16::text[], $17::bool[], $18::text[], $19::text[], \
         $20::text[], $21::text[]) \
         AS u(project_id, id, ts, name, anonymous_id, session_id, user_id, props, \
         context, sent_at, received_at, time, browser, browser_version, os, \
         device_type, is_bot, bot_reason, ip, country, city) \
     ON CONFLICT DO NOTHING";

/// `events_y2026m11` for November 2026.
pub fn partition_name(month: DateTime<Utc>) -> String {
    format!("events_y{:04}m{:02}", month.year(), month.month())
}

/// Inverse of [`partition_name`]: the month a partition holds.
fn partition_month(name: &str) -> Option<DateTime<Utc>> {
    use chrono::TimeZone;
    let rest = name.strip_prefix("events_y")?;
    let (y, m) = rest.split_once('m')?;
    Utc.with_ymd_and_hms(y.parse().ok()?, m.parse().ok()?, 1, 0, 0, 0)
        .single()
}

#[async_trait]
impl EventStore for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations/postgres")
            .run(&self.pool)
            .await?;
        // A migration that changed what the rollups hold asked for them to be refilled.
        if let Some(counted) = rollup::rebuild_if_requested(&self.pool).await? {
            tracing::info!(events = counted, "rollups filled from the stored events");
        }
        Ok(())
    }

    fn deliveries(&self) -> Option<std::sync::Arc<dyn crate::webhooks::DeliveryStore>> {
        Some(std::sync::Arc::new(PgStore::from_pool(self.pool.clone())))
    }

    async fn project_changes(&self) -> Option<tokio::sync::mpsc::Receiver<()>> {
        // A connection of its own, outside the pool the requests use.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(3))
            .connect_lazy_with((*self.pool.connect_options()).clone());
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for project changes; reloading them periodically only");
                return None;
            }
        };
        if let Err(e) = listener.listen(PROJECTS_CHANNEL).await {
            tracing::warn!(error = %e, "cannot listen for project changes; reloading them periodically only");
            return None;
        }
        let (changed, changes) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            loop {
                let received = tokio::select! {
                    _ = changed.closed() => return,
                    received = listener.try_recv() => received,
                };
                match received {
                    // A notice, or the connection was lost (notices may have been missed; the
                    // next call reconnects): reload either way.
                    Ok(_) => {
                        let _ = changed.try_send(());
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "project change listener reconnecting");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Some(changes)
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
        if rows.is_empty() && receipts.is_empty() {
            return Ok(Vec::new());
        }
        let n = rows.len();
        let mut project_id = Vec::with_capacity(n);
        let mut id = Vec::with_capacity(n);
        let mut ts = Vec::with_capacity(n);
        let mut name = Vec::with_capacity(n);
        let mut anonymous_id = Vec::with_capacity(n);
        let mut session_id = Vec::with_capacity(n);
        let mut user_id = Vec::with_capacity(n);
        let mut props = Vec::with_capacity(n);
        let mut context = Vec::with_capacity(n);
        let mut sent_at = Vec::with_capacity(n);
        let mut received_at = Vec::with_capacity(n);
        let mut time = Vec::with_capacity(n);
        let mut browser = Vec::with_capacity(n);
        let mut browser_version = Vec::with_capacity(n);
        let mut os = Vec::with_capacity(n);
        let mut device_type = Vec::with_capacity(n);
        let mut is_bot = Vec::with_capacity(n);
        let mut bot_reason = Vec::with_capacity(n);
        let mut ip = Vec::with_capacity(n);
        let mut country = Vec::with_capacity(n);
        let mut city = Vec::with_capacity(n);
        // Key order: concurrent group commits sharing a key then wait for one another instead
        // of deadlocking (the later one sees a duplicate).
        let mut order: Vec<&EventRow> = rows.iter().collect();
        order.sort_unstable_by_key(|r| (r.project_id, r.id, r.ts));
        for r in order {
            let e = &r.enrichment;
            project_id.push(r.project_id);
            id.push(r.id);
            ts.push(r.ts);
            name.push(r.name.as_str());
            anonymous_id.push(r.anonymous_id.as_str());
            session_id.push(r.session_id.as_str());
            user_id.push(r.user_id.as_deref());
            props.push(r.props.as_deref().map(RawValue::get));
            context.push(r.context.as_deref().map(RawValue::get));
            sent_at.push(r.sent_at);
            received_at.push(r.received_at);
            time.push(r.time);
            browser.push(e.browser.as_deref());
            browser_version.push(e.browser_version.as_deref());
            os.push(e.os.as_deref());
            device_type.push(e.device_type.as_deref());
            is_bot.push(e.is_bot);
            bot_reason.push(e.bot_reason.as_deref());
            ip.push(e.ip.as_deref());
            country.push(e.country.as_deref());
            city.push(e.city.as_deref());
        }
        let receipts = sorted_receipts(receipts);
        let receipt_project: Vec<Uuid> = receipts.iter().map(|r| r.project_id).collect();
        let receipt_batch: Vec<&str> = receipts.iter().map(|r| r.batch_id.as_str()).collect();
        let receipt_received: Vec<DateTime<Utc>> = receipts.iter().map(|r| r.received_at).collect();
        // One statement for the events, their receipts (in the data-modifying WITH, which
        // Postgres runs to completion after the events) and, with rollups, the aggregates;
        // then the webhook deliveries of the new events (the outbox), in the same transaction.
        let sql = if self.rollups.on(&self.pool).await? {
            rollup::insert_sql(INSERT_RECEIPTS, INSERT_EVENTS)
        } else {
            format!("WITH {INSERT_RECEIPTS} {INSERT_EVENTS} RETURNING project_id, id")
        };
        let mut tx = self.pool.begin().await?;
        let inserted: Vec<(Uuid, Uuid)> = sqlx::query_as(&sql)
            .bind(&project_id)
            .bind(&id)
            .bind(&ts)
            .bind(&name)
            .bind(&anonymous_id)
            .bind(&session_id)
            .bind(&user_id)
            .bind(&props)
            .bind(&context)
            .bind(&sent_at)
            .bind(&received_at)
            .bind(&time)
            .bind(&browser)
            .bind(&browser_version)
            .bind(&os)
            .bind(&device_type)
            .bind(&is_bot)
            .bind(&bot_reason)
            .bind(&ip)
            .bind(&country)
            .bind(&city)
            .bind(&receipt_project)
            .bind(&receipt_batch)
            .bind(&receipt_received)
            .fetch_all(&mut *tx)
            .await?;
        let new = claim_inserted(rows, inserted.into_iter().collect::<HashSet<_>>());
        crate::webhooks::outbox::enqueue_postgres(&mut tx, rows, &new, Utc::now()).await?;
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
        Ok(sqlx::query_scalar(
            "SELECT batch_id FROM batch_receipts WHERE project_id = $1 AND batch_id = ANY($2)",
        )
        .bind(project_id)
        .bind(batch_ids)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn delete_receipts_before(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let result = sqlx::query(
            "DELETE FROM batch_receipts WHERE (project_id, batch_id) IN \
             (SELECT project_id, batch_id FROM batch_receipts WHERE received_at < $1 LIMIT $2)",
        )
        .bind(before)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected())
    }

    async fn add_project(&self, p: &Project) -> Result<(), StoreError> {
        let result = sqlx::query(
            "INSERT INTO projects (id, name, write_key, read_key, origins, rate_limit) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING",
        )
        .bind(p.id)
        .bind(&p.name)
        .bind(&p.write_key)
        .bind(&p.read_key)
        .bind(&p.origins)
        .bind(p.rate_limit.map(|r| r.min(i32::MAX as u32) as i32))
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
        let id = Uuid::parse_str(name_or_id).ok();
        let result = sqlx::query("DELETE FROM projects WHERE name = $1 OR id = $2")
            .bind(name_or_id)
            .bind(id)
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
            "SELECT {PROJECT_COLUMNS} FROM projects WHERE {column} = $1"
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
        let totals: (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT anonymous_id), count(DISTINCT session_id) \
             FROM events WHERE project_id = $1 AND time >= $2 AND time < $3",
        )
        .bind(project_id)
        .bind(from)
        .bind(to)
        .fetch_one(&self.pool)
        .await?;
        let by_name: Vec<(String, i64)> = sqlx::query_as(
            "SELECT name, count(*) FROM events \
             WHERE project_id = $1 AND time >= $2 AND time < $3 \
             GROUP BY name ORDER BY count(*) DESC, name LIMIT 1000",
        )
        .bind(project_id)
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        let per_day: Vec<(String, i64)> = sqlx::query_as(
            "SELECT to_char(time AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, count(*) FROM events \
             WHERE project_id = $1 AND time >= $2 AND time < $3 GROUP BY day ORDER BY day",
        )
        .bind(project_id)
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        Ok(Stats::assemble((from, to), totals, by_name, per_day))
    }

    async fn analytics_summary(&self, q: &Query) -> Result<SummaryRow, StoreError> {
        let statement = self.with_rollups(|| rollup::summary_sql(q)).await?;
        let rows = self
            .analytics_rows(
                statement.unwrap_or_else(|| analytics::summary_sql(Dialect::Postgres, q)),
            )
            .await?;
        Ok(rows.into_iter().next().unwrap_or_default())
    }

    async fn analytics_timeseries(
        &self,
        q: &Query,
        interval: Interval,
    ) -> Result<Vec<(i64, i64, i64)>, StoreError> {
        let statement = self
            .with_rollups(|| rollup::timeseries_sql(q, interval))
            .await?;
        self.analytics_rows(
            statement.unwrap_or_else(|| analytics::timeseries_sql(Dialect::Postgres, q, interval)),
        )
        .await
    }

    async fn analytics_breakdown(
        &self,
        q: &Query,
        by: &Dimension,
        limit: u32,
    ) -> Result<Vec<(String, i64, i64)>, StoreError> {
        let statement = self
            .with_rollups(|| rollup::breakdown_sql(q, by, limit))
            .await?;
        self.analytics_rows(
            statement.unwrap_or_else(|| analytics::breakdown_sql(Dialect::Postgres, q, by, limit)),
        )
        .await
    }

    fn export_events(
        &self,
        project_id: Uuid,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> BoxStream<'static, Result<StoredEvent, StoreError>> {
        owned_stream(self.pool.clone(), move |pool: &PgPool| {
            sqlx::query(
                "SELECT id, name, ts, time, sent_at, received_at, anonymous_id, session_id, \
                     user_id, props::text AS props, context::text AS context, browser, \
                     browser_version, os, device_type, is_bot, bot_reason, ip, country, city \
                 FROM events WHERE project_id = $1 AND ts >= $2 AND ts < $3 ORDER BY ts, id",
            )
            .bind(project_id)
            .bind(from)
            .bind(to)
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
        self.analytics_rows(crate::funnel::funnel_sql(Dialect::Postgres, q, steps))
            .await
    }

    async fn record_ingest_health(
        &self,
        counts: &[crate::health::HealthCount],
    ) -> Result<(), StoreError> {
        let projects: Vec<Uuid> = counts.iter().map(|c| c.project_id).collect();
        let hours: Vec<DateTime<Utc>> = counts.iter().map(|c| c.hour).collect();
        let counters: Vec<&str> = counts.iter().map(|c| c.counter.as_str()).collect();
        let values: Vec<i64> = counts.iter().map(|c| c.count).collect();
        sqlx::query(
            "INSERT INTO ingest_health (project_id, hour, counter, count) \
             SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[], $4::int8[]) \
             ON CONFLICT (project_id, hour, counter) \
             DO UPDATE SET count = ingest_health.count + EXCLUDED.count",
        )
        .bind(projects)
        .bind(hours)
        .bind(counters)
        .bind(values)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn analytics_health(&self, q: &Query) -> Result<Vec<(i64, String, i64)>, StoreError> {
        self.analytics_rows(crate::health::health_sql(Dialect::Postgres, q))
            .await
    }

    async fn analytics_live(
        &self,
        q: &Query,
        limit: u32,
    ) -> Result<(i64, Vec<crate::live::RecentRow>), StoreError> {
        let visitors: Vec<(i64,)> = self
            .analytics_rows(crate::live::visitors_sql(Dialect::Postgres, q))
            .await?;
        let recent = self
            .analytics_rows(crate::live::recent_sql(Dialect::Postgres, q, limit))
            .await?;
        Ok((visitors.first().map_or(0, |v| v.0), recent))
    }

    async fn maintain_partitions(
        &self,
        now: DateTime<Utc>,
        months_ahead: u32,
        retention_months: u32,
    ) -> Result<PartitionReport, StoreError> {
        let mut report = PartitionReport::default();
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(PARTITION_LOCK_ID)
            .execute(&mut *tx)
            .await?;
        let existing: Vec<String> = sqlx::query_scalar(
            "SELECT c.relname::text FROM pg_inherits i \
             JOIN pg_class c ON c.oid = i.inhrelid \
             JOIN pg_class p ON p.oid = i.inhparent \
             WHERE p.relname = 'events' AND p.relnamespace = to_regnamespace(current_schema()) \
             ORDER BY 1",
        )
        .fetch_all(&mut *tx)
        .await?;

        for offset in -1..=(months_ahead as i32) {
            let start = month_start(now, offset);
            let end = month_start(now, offset + 1);
            let name = partition_name(start);
            if existing.contains(&name) {
                continue;
            }
            // Rows that landed in the default partition for this month move into the new
            // partition; attaching would otherwise fail on them.
            sqlx::query(&format!(
                "CREATE TABLE {name} (LIKE events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
            ))
            .execute(&mut *tx)
            .await?;
            sqlx::query(&format!(
                "WITH moved AS (DELETE FROM events_default WHERE ts >= $1 AND ts < $2 \
                 RETURNING *) INSERT INTO {name} SELECT * FROM moved"
            ))
            .bind(start)
            .bind(end)
            .execute(&mut *tx)
            .await?;
            sqlx::query(&format!(
                "ALTER TABLE events ATTACH PARTITION {name} FOR VALUES FROM ('{}') TO ('{}')",
                start.to_rfc3339(),
                end.to_rfc3339()
            ))
            .execute(&mut *tx)
            .await?;
            report.created.push(name);
        }

        if retention_months > 0 {
            let cutoff = month_start(now, -(retention_months as i32));
            for name in &existing {
                let Some(month) = partition_month(name) else {
                    continue;
                };
                if month_start(month, 1) <= cutoff {
                    sqlx::query(&format!("DROP TABLE {name}"))
                        .execute(&mut *tx)
                        .await?;
                    report.dropped.push(name.clone());
                }
            }
            sqlx::query("DELETE FROM events_default WHERE ts < $1")
                .bind(cutoff)
                .execute(&mut *tx)
                .await?;
            if self.rollups.on(&self.pool).await? {
                rollup::forget_before(&mut tx, cutoff).await?;
            }
        }
        tx.commit().await?;
        Ok(report)
    }

    async fn drain_rollups(&self) -> Result<i64, StoreError> {
        if !self.rollups.on(&self.pool).await? {
            return Ok(0);
        }
        rollup::drain(&self.pool, rollup::DRAIN_BATCH).await
    }
}

fn stored_event_from_row(row: &sqlx::postgres::PgRow) -> Result<StoredEvent, sqlx::Error> {
    let json = |column: &str| -> Result<Option<Box<RawValue>>, sqlx::Error> {
        row.try_get::<Option<String>, _>(column)?
            .map(|text| RawValue::from_string(text).map_err(|e| sqlx::Error::Decode(Box::new(e))))
            .transpose()
    };
    Ok(StoredEvent {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        ts: row.try_get("ts")?,
        time: row.try_get("time")?,
        sent_at: row.try_get("sent_at")?,
        received_at: row.try_get("received_at")?,
        anonymous_id: row.try_get("anonymous_id")?,
        session_id: row.try_get("session_id")?,
        user_id: row.try_get("user_id")?,
        props: json("props")?,
        context: json("context")?,
        enrichment: enrichment_from_row(row)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_round_trip() {
        let m = month_start(Utc::now(), 3);
        assert_eq!(partition_month(&partition_name(m)), Some(m));
        assert_eq!(partition_month("events_default"), None);
    }
}
