//! Keys are checked against the projects kept in memory (a flood of unknown keys never reaches
//! the database), projects added while serving are seen after the reload interval, and rate
//! limits charge every event, per project and per client address, refusing before the body
//! when they can.

#[macro_use]
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use chrono::{DateTime, Utc};
use common::*;
use tracklet_collector::analytics;
use tracklet_collector::config::{RateLimitConfig, ServeConfig};
use tracklet_collector::http::{router, AppState};
use tracklet_collector::store::{
    BatchReceipt, EventRow, EventStore, KeyKind, PartitionReport, Project, Stats, StoreError,
};
use uuid::Uuid;

const SENT: u64 = 1_763_800_005_000;

/// A store that counts the project queries it answers and can be made to fail reloads.
struct Counting {
    inner: Arc<dyn EventStore>,
    key_lookups: AtomicU64,
    project_lists: AtomicU64,
    fail_lists: AtomicBool,
}

#[async_trait]
impl EventStore for Counting {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn migrate(&self) -> Result<(), StoreError> {
        self.inner.migrate().await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    async fn insert_events(
        &self,
        rows: &[EventRow],
        receipts: &[BatchReceipt],
    ) -> Result<Vec<bool>, StoreError> {
        self.inner.insert_events(rows, receipts).await
    }
    async fn arrived_batches(
        &self,
        project_id: Uuid,
        batch_ids: &[String],
    ) -> Result<Vec<String>, StoreError> {
        self.inner.arrived_batches(project_id, batch_ids).await
    }
    async fn delete_receipts_before(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError> {
        self.inner.delete_receipts_before(before, limit).await
    }
    async fn add_project(&self, project: &Project) -> Result<(), StoreError> {
        self.inner.add_project(project).await
    }
    async fn list_projects(&self) -> Result<Vec<Project>, StoreError> {
        self.project_lists.fetch_add(1, Ordering::SeqCst);
        if self.fail_lists.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut));
        }
        self.inner.list_projects().await
    }
    async fn remove_project(&self, name_or_id: &str) -> Result<bool, StoreError> {
        self.inner.remove_project(name_or_id).await
    }
    async fn project_by_key(
        &self,
        kind: KeyKind,
        key: &str,
    ) -> Result<Option<Project>, StoreError> {
        self.key_lookups.fetch_add(1, Ordering::SeqCst);
        self.inner.project_by_key(kind, key).await
    }
    async fn stats(
        &self,
        project_id: Uuid,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Stats, StoreError> {
        self.inner.stats(project_id, from, to).await
    }
    async fn analytics_summary(
        &self,
        q: &analytics::Query,
    ) -> Result<analytics::SummaryRow, StoreError> {
        self.inner.analytics_summary(q).await
    }
    async fn analytics_timeseries(
        &self,
        q: &analytics::Query,
        interval: analytics::Interval,
    ) -> Result<Vec<(i64, i64, i64)>, StoreError> {
        self.inner.analytics_timeseries(q, interval).await
    }
    async fn analytics_breakdown(
        &self,
        q: &analytics::Query,
        by: &analytics::Dimension,
        limit: u32,
    ) -> Result<Vec<(String, i64, i64)>, StoreError> {
        self.inner.analytics_breakdown(q, by, limit).await
    }
    async fn analytics_funnel(
        &self,
        q: &analytics::Query,
        steps: &[tracklet_collector::funnel::Step],
    ) -> Result<Vec<(i64, i64, i64)>, StoreError> {
        self.inner.analytics_funnel(q, steps).await
    }
    async fn record_ingest_health(
        &self,
        counts: &[tracklet_collector::health::HealthCount],
    ) -> Result<(), StoreError> {
        self.inner.record_ingest_health(counts).await
    }
    async fn analytics_health(
        &self,
        q: &analytics::Query,
    ) -> Result<Vec<(i64, String, i64)>, StoreError> {
        self.inner.analytics_health(q).await
    }
    async fn analytics_live(
        &self,
        q: &analytics::Query,
        limit: u32,
    ) -> Result<(i64, Vec<tracklet_collector::live::RecentRow>), StoreError> {
        self.inner.analytics_live(q, limit).await
    }
    async fn maintain_partitions(
        &self,
        now: DateTime<Utc>,
        months_ahead: u32,
        retention_months: u32,
    ) -> Result<PartitionReport, StoreError> {
        self.inner
            .maintain_partitions(now, months_ahead, retention_months)
            .await
    }
    fn export_events(
        &self,
        project_id: Uuid,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> tracklet_collector::store::BoxStream<
        'static,
        Result<tracklet_collector::export::StoredEvent, StoreError>,
    > {
        self.inner.export_events(project_id, from, to)
    }
}

/// A collector over a [`Counting`] store, reloading projects every `refresh`.
async fn counted_app(backend: Backend, refresh: Duration) -> (TestApp, Arc<Counting>) {
    let (store, db, sqlite_file) = open_store(backend).await;
    let project = Project::new("shop", vec![ORIGIN.to_owned()], None);
    store.add_project(&project).await.unwrap();
    let counting = Arc::new(Counting {
        inner: store.clone(),
        key_lookups: AtomicU64::new(0),
        project_lists: AtomicU64::new(0),
        fail_lists: AtomicBool::new(false),
    });
    let config = ServeConfig {
        projects_refresh_interval: refresh,
        ..ServeConfig::default()
    };
    let (state, _task) = AppState::new(config, counting.clone()).await.unwrap();
    let app = TestApp {
        router: router(state),
        store,
        project,
        db,
        sqlite_file,
    };
    (app, counting)
}

on_both_backends!(
    a_flood_of_unknown_keys_never_reaches_the_database,
    |backend| async move {
        let refresh = Duration::from_millis(100);
        let (app, counting) = counted_app(backend, refresh).await;
        let started = Instant::now();
        let unknown = |n: usize| {
            let mut req = Request::post(format!("/v1/batch?key=wk_{}", Uuid::new_v4().simple()));
            if n % 2 == 1 {
                // Half through the header, half through the query.
                req = Request::post("/v1/batch").header(
                    "authorization",
                    format!("Bearer wk_{}", Uuid::new_v4().simple()),
                );
            }
            req.header("origin", ORIGIN)
                .body(Body::from(batch(SENT, vec![event(n as u64)])))
                .unwrap()
        };
        let mut stored = 0;
        for round in 0..20 {
            // 100 unknown keys at once, with a valid batch in the middle of them.
            let flood = futures_util::future::join_all((0..100).map(|n| app.send(unknown(n))));
            let valid = app.post(batch(SENT, vec![event(10_000 + round)]));
            let (answers, valid) = tokio::join!(flood, valid);
            for a in answers {
                assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{}", a.text);
            }
            assert_eq!(valid.status, StatusCode::OK, "{}", valid.text);
            stored += 1;
        }
        // Read keys too (stats).
        for _ in 0..20 {
            let a = app
                .get(&format!("/v1/stats?key=rk_{}", Uuid::new_v4().simple()))
                .await;
            assert_eq!(a.status, StatusCode::UNAUTHORIZED);
        }
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_secs(30), "flood took {elapsed:?}");
        assert_eq!(counting.key_lookups.load(Ordering::SeqCst), 0);
        // Only the load at start and the periodic reloads read the projects table.
        let lists = counting.project_lists.load(Ordering::SeqCst);
        let allowed = 2 + elapsed.as_millis() as u64 / refresh.as_millis() as u64;
        assert!(lists <= allowed, "{lists} reloads in {elapsed:?}");
        assert_eq!(app.stored().await, stored);
    }
);

on_both_backends!(
    a_project_added_while_serving_is_seen_after_the_reload,
    |backend| async move {
        let refresh = Duration::from_millis(200);
        let (app, counting) = counted_app(backend, refresh).await;
        let other = Project::new("other", vec![ORIGIN.to_owned()], None);
        app.store.add_project(&other).await.unwrap();
        let started = Instant::now();
        let uri = format!("/v1/batch?key={}", other.write_key);
        loop {
            let a = app.post_to(&uri, batch(SENT, vec![event(1)])).await;
            if a.status == StatusCode::OK {
                break;
            }
            assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{}", a.text);
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the new project was not seen"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(counting.key_lookups.load(Ordering::SeqCst), 0);

        // A reload that fails keeps the projects loaded before.
        counting.fail_lists.store(true, Ordering::SeqCst);
        let before = counting.project_lists.load(Ordering::SeqCst);
        tokio::time::sleep(refresh * 3).await;
        assert!(counting.project_lists.load(Ordering::SeqCst) > before);
        let a = app.post_to(&uri, batch(SENT, vec![event(2)])).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        let a = app.post(batch(SENT, vec![event(3)])).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    }
);

#[tokio::test]
async fn postgres_tells_the_collector_of_project_changes_at_once() {
    // A reload interval far longer than the test: only the NOTIFY can make the change seen.
    let config = ServeConfig {
        projects_refresh_interval: Duration::from_secs(600),
        ..ServeConfig::default()
    };
    let app = app_with(Backend::Postgres, config, None).await;
    let other = Project::new("other", vec![ORIGIN.to_owned()], None);
    let uri = format!("/v1/batch?key={}", other.write_key);
    let a = app.post_to(&uri, batch(SENT, vec![event(1)])).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{}", a.text);
    app.store.add_project(&other).await.unwrap();
    let started = Instant::now();
    loop {
        let a = app.post_to(&uri, batch(SENT, vec![event(1)])).await;
        if a.status == StatusCode::OK {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the new project was not seen: {}",
            a.text
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Removed: refused again.
    assert!(app.store.remove_project("other").await.unwrap());
    let started = Instant::now();
    while app.post_to(&uri, batch(SENT, vec![event(2)])).await.status != StatusCode::UNAUTHORIZED {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the removed project is still accepted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_batch_costs_its_full_event_count() {
    // 500 events/s: a bucket of 1,000. 600 pass, another 600 do not (400 left).
    let app = app_with(Backend::Postgres, ServeConfig::default(), Some(500)).await;
    let a = app.post(batch(SENT, (0..600).map(event).collect())).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let a = app
        .post(batch(SENT, (600..1200).map(event).collect()))
        .await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.text);
    assert_eq!(a.json["error"], "rate_limited");
    assert!(a.headers.get("retry-after").is_some());
    assert_eq!(app.stored().await, 600);
}

#[tokio::test]
async fn a_batch_larger_than_the_bucket_passes_then_leaves_debt() {
    // 100 events/s, a bucket of 200: a full batch of 1,000 still gets through (the SDK sends
    // such batches), and the project then waits for the 800 events of debt.
    let app = app_with(Backend::Postgres, ServeConfig::default(), Some(100)).await;
    let a = app.post(batch(SENT, (0..1000).map(event).collect())).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let a = app.post(batch(SENT, vec![event(5000)])).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.text);
    let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((7..=9).contains(&retry), "Retry-After {retry}");
    assert_eq!(app.stored().await, 1000);
}

#[tokio::test]
async fn projects_without_a_limit_get_the_default() {
    let config = ServeConfig {
        rate_limit: RateLimitConfig {
            project_default: 5,
            per_ip: 0,
        },
        ..ServeConfig::default()
    };
    // 5 events/s, a bucket of 10; the second batch would need two more seconds.
    let app = app_with(Backend::Sqlite, config, None).await;
    let a = app.post(batch(SENT, (0..10).map(event).collect())).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let a = app.post(batch(SENT, (10..20).map(event).collect())).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.text);
}

#[tokio::test]
async fn the_per_address_limit_separates_clients() {
    let config = ServeConfig {
        trust_forwarded_for: true,
        rate_limit: RateLimitConfig {
            project_default: 0,
            per_ip: 5,
        },
        ..ServeConfig::default()
    };
    let app = app_with(Backend::Postgres, config, None).await;
    let from = |ip: &str, events: std::ops::Range<u64>| {
        Request::post(app.batch_uri())
            .header("origin", ORIGIN)
            .header("x-forwarded-for", format!("203.0.113.9, {ip}"))
            .body(Body::from(batch(SENT, events.map(event).collect())))
            .unwrap()
    };
    // Each address has a bucket of 10 events (5/s); a second 10 would need two seconds.
    let a = app.send(from("198.51.100.1", 0..10)).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let a = app.send(from("198.51.100.1", 100..110)).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.text);
    assert!(a.headers.get("retry-after").is_some());
    let a = app.send(from("198.51.100.2", 200..210)).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    // The project itself is unlimited here: another address still passes.
    let a = app.send(from("2001:db8::1", 300..301)).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(app.stored().await, 21);
}

#[tokio::test]
async fn an_empty_bucket_refuses_before_reading_the_body() {
    // 1 event/s, a bucket of 2: a batch of 10 leaves 8 s of debt.
    let app = app_with(Backend::Sqlite, ServeConfig::default(), Some(1)).await;
    let a = app.post(batch(SENT, (0..10).map(event).collect())).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    // A body that starts and never ends: waiting for it would take the body timeout (10 s).
    let never_ends = futures_util::stream::StreamExt::chain(
        futures_util::stream::once(async {
            Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"{\"sent_at\":"))
        }),
        futures_util::stream::pending(),
    );
    let request = Request::post(app.batch_uri())
        .header("origin", ORIGIN)
        .body(Body::from_stream(never_ends))
        .unwrap();
    let a = tokio::time::timeout(Duration::from_secs(2), app.send(request))
        .await
        .expect("refused without waiting for the body");
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.text);
    assert!(a.headers.get("retry-after").is_some());
    assert_eq!(a.headers["access-control-allow-origin"], ORIGIN);
}
