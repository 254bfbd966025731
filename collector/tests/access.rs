//! Who may send, how fast, and what happens when the database is away; plus the operational
//! endpoints and Postgres partition upkeep.

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use chrono::{TimeZone, Utc};
use common::*;
use tracklet_collector::config::{CommitConfig, ServeConfig};
use tracklet_collector::http::{router, AppState};
use tracklet_collector::store::postgres::PgStore;
use tracklet_collector::store::EventStore;

const SENT: u64 = 1_763_800_005_000;

#[tokio::test]
async fn unknown_or_missing_key_is_401() {
    let app = app(Backend::Postgres).await;
    let body = batch(SENT, vec![event(1)]);
    let a = app
        .send(
            Request::post("/v1/batch?key=wk_nope")
                .body(Body::from(body.clone()))
                .unwrap(),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.json["error"], "unauthorized");
    let a = app
        .send(
            Request::post("/v1/batch")
                .body(Body::from(body.clone()))
                .unwrap(),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    // The key may come as a bearer token instead.
    let bearer = format!("Bearer {}", app.project.write_key);
    let a = app
        .send(
            Request::post("/v1/batch")
                .header("authorization", bearer)
                .body(Body::from(body))
                .unwrap(),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(app.stored().await, 1);
}

/// `GET /v1/project` names the project of a read key (the dashboard's sign-in and picker);
/// a write key or an unknown key reads nothing.
#[tokio::test]
async fn a_read_key_names_its_project() {
    let app = app(Backend::Sqlite).await;
    let a = app
        .send(
            Request::get("/v1/project")
                .header("authorization", format!("Bearer {}", app.project.read_key))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.json["name"], app.project.name.as_str());
    assert_eq!(a.json["id"], app.project.id.to_string());
    for key in [app.project.write_key.as_str(), "rk_nope"] {
        let a = app.get(&format!("/v1/project?key={key}")).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{key}: {}", a.text);
        assert!(a.json.get("name").is_none());
    }
}

#[tokio::test]
async fn wrong_origin_is_403_and_allowed_origin_gets_cors_headers() {
    let app = app(Backend::Postgres).await;
    let body = batch(SENT, vec![event(1)]);
    let from = |origin: &str| {
        Request::post(app.batch_uri())
            .header("origin", origin)
            .header("content-type", "text/plain")
            .body(Body::from(body.clone()))
            .unwrap()
    };
    let a = app.send(from("https://evil.example")).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(a.json["error"], "origin_not_allowed");
    assert!(a.headers.get("access-control-allow-origin").is_none());
    assert_eq!(app.stored().await, 0);

    let a = app.send(from(ORIGIN)).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.headers["access-control-allow-origin"], ORIGIN);
    assert_eq!(a.headers["vary"], "Origin");
    assert_eq!(a.headers["access-control-expose-headers"], "Retry-After");

    // No Origin (server-to-server): accepted.
    let a = app
        .send(
            Request::post(app.batch_uri())
                .body(Body::from(batch(SENT, vec![event(2)])))
                .unwrap(),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);

    app.check_preflight(&app.batch_uri()).await;
}

#[tokio::test]
async fn rate_limit_is_429_with_retry_after() {
    let app = app_with(Backend::Postgres, ServeConfig::default(), Some(5)).await;
    // The bucket holds two seconds (10 events).
    let a = app.post(batch(SENT, (0..10).map(event).collect())).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let a = app.post(batch(SENT, (10..15).map(event).collect())).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(a.json["error"], "rate_limited");
    let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    // Readable by the page, so the SDK can honour Retry-After.
    assert_eq!(a.headers["access-control-allow-origin"], ORIGIN);
    assert_eq!(app.stored().await, 10);
}

#[tokio::test]
async fn database_down_at_start_means_no_server() {
    // A pool pointed at a closed port stands in for a Postgres outage: without its projects
    // the collector would refuse every key, so it does not start.
    let store = PgStore::connect_lazy("postgres://postgres@127.0.0.1:1/none", 2).unwrap();
    let store: Arc<dyn EventStore> = Arc::new(store);
    let started = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        AppState::new(ServeConfig::default(), store),
    )
    .await
    .expect("gives up within the pool's acquire timeout");
    let error = started.err().expect("no state without projects");
    assert!(error.to_string().contains("projects"), "{error}");
}

#[tokio::test]
async fn database_down_is_503_with_retry_after_and_keys_still_checked() {
    let db = TestDb::create().await;
    let store = Arc::new(PgStore::connect(&db.url, 2).await.unwrap());
    store.migrate().await.unwrap();
    let project = tracklet_collector::store::Project::new("p", vec![], None);
    store.add_project(&project).await.unwrap();
    let (state, _task) = AppState::new(ServeConfig::default(), store.clone())
        .await
        .unwrap();
    let app = router(state);
    // The outage.
    store.pool().close().await;
    use tower::ServiceExt;
    let req = Request::post(format!("/v1/batch?key={}", project.write_key))
        .body(Body::from(batch(SENT, vec![event(1)])))
        .unwrap();
    let response = app.clone().oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().get("retry-after").is_some());
    // Keys are known without the database: an unknown one is still 401, not 503.
    let req = Request::post("/v1/batch?key=wk_any")
        .body(Body::from(batch(SENT, vec![event(1)])))
        .unwrap();
    let response = app.clone().oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let ready = app
        .clone()
        .oneshot(Request::get("/readyz").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let health = app
        .oneshot(Request::get("/healthz").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
}

#[tokio::test]
async fn full_commit_queue_is_503_instead_of_growing() {
    let config = ServeConfig {
        commit: CommitConfig {
            queue_capacity_rows: 3,
            high_water_rows: 2,
            ..Default::default()
        },
        ..Default::default()
    };
    let app = app_with(Backend::Postgres, config, None).await;
    let a = app.post(batch(SENT, (0..4).map(event).collect())).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text);
    assert_eq!(a.json["error"], "unavailable");
    assert!(a.headers.get("retry-after").is_some());
    let a = app.post(batch(SENT, (0..3).map(event).collect())).await;
    assert_eq!(a.status, StatusCode::OK);
}

#[tokio::test]
async fn too_many_batches_in_progress_is_503() {
    let config = ServeConfig {
        max_inflight_batches: 0,
        ..Default::default()
    };
    let app = app_with(Backend::Sqlite, config, None).await;
    let a = app.post(batch(SENT, vec![event(1)])).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text);
    assert!(a.headers.get("retry-after").is_some());
}

#[tokio::test]
async fn health_ready_and_metrics() {
    let app = app(Backend::Postgres).await;
    assert_eq!(app.get("/healthz").await.status, StatusCode::OK);
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text);
    assert_eq!(ready.json["backend"], "postgres");
    let mut bad = event(2);
    bad["id"] = serde_json::json!("x");
    app.post(batch(SENT, vec![event(1), bad])).await;
    let m = app.get("/metrics").await;
    assert_eq!(m.status, StatusCode::OK);
    for name in [
        "tracklet_events_total{outcome=\"accepted\"}",
        "tracklet_events_total{outcome=\"rejected\",reason=\"invalid_id\"}",
        "tracklet_http_requests_total",
        "tracklet_http_request_duration_seconds",
        "tracklet_batch_events",
        "tracklet_commit_duration_seconds",
        "tracklet_commit_queue_rows",
    ] {
        assert!(
            m.text.contains(name),
            "metric {name} missing from:\n{}",
            m.text
        );
    }
    assert!(app
        .get("/readyz")
        .await
        .headers
        .get("x-request-id")
        .is_some());
}

#[tokio::test]
async fn enrichment_truncates_ip_and_flags_bots() {
    let config = ServeConfig {
        trust_forwarded_for: true,
        ..Default::default()
    };
    let app = app_with(Backend::Postgres, config, None).await;
    let mut e = event(1);
    e["context"] = serde_json::json!({"webdriver": true});
    let req = Request::post(app.batch_uri())
        .header("x-forwarded-for", "203.0.113.77")
        .header("user-agent", "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36")
        .body(Body::from(batch(SENT, vec![e, event(2)])))
        .unwrap();
    assert_eq!(app.send(req).await.json["accepted"], 2);
    let url = &app.db.as_ref().unwrap().url;
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    type Row = (String, Option<String>, Option<String>, bool, Option<String>);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT ip, browser, device_type, is_bot, bot_reason FROM events ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        rows[0],
        (
            "203.0.113.0".into(),
            Some("Chrome".into()),
            Some("desktop".into()),
            true,
            Some("webdriver".into())
        )
    );
    assert!(!rows[1].3, "no bot signal on the second event");
    pool.close().await;
}

#[tokio::test]
async fn geo_lookup_fills_country_and_city_from_a_maxmind_file() {
    // tests/fixtures/geo-test.mmdb (see make-geo-test-mmdb.py next to it): 203.0.113.0/24
    // is Amsterdam, NL; 2001:db8::/32 is Berlin, DE; nothing else.
    let config = ServeConfig {
        trust_forwarded_for: true,
        geoip_db: Some(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/geo-test.mmdb"),
        ),
        ..Default::default()
    };
    let app = app_with(Backend::Postgres, config, None).await;
    for (n, ip) in [
        (1, "203.0.113.77"),
        (2, "2001:db8:1234:5678::9"),
        (3, "198.51.100.7"),
    ] {
        let req = Request::post(app.batch_uri())
            .header("x-forwarded-for", ip)
            .body(Body::from(batch(SENT, vec![event(n)])))
            .unwrap();
        assert_eq!(app.send(req).await.json["accepted"], 1);
    }
    let pool = sqlx::PgPool::connect(&app.db.as_ref().unwrap().url)
        .await
        .unwrap();
    let rows: Vec<(String, Option<String>, Option<String>)> =
        sqlx::query_as("SELECT ip, country, city FROM events ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        rows,
        vec![
            (
                "203.0.113.0".into(),
                Some("NL".into()),
                Some("Amsterdam".into())
            ),
            (
                "2001:db8:1234::".into(),
                Some("DE".into()),
                Some("Berlin".into())
            ),
            ("198.51.100.0".into(), None, None),
        ],
        "looked up on the full address, stored truncated"
    );
    pool.close().await;
}

#[tokio::test]
async fn partitions_are_created_ahead_and_dropped_after_retention() {
    let db = TestDb::create().await;
    let store = PgStore::connect(&db.url, 2).await.unwrap();
    store.migrate().await.unwrap();
    let pool = store.pool().clone();
    let partitions = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'events' ORDER BY 1",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    let now = Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0).unwrap();
    let report = store.maintain_partitions(now, 2, 0).await.unwrap();
    assert_eq!(
        report.created,
        [
            "events_y2026m10",
            "events_y2026m11",
            "events_y2026m12",
            "events_y2027m01"
        ]
    );
    assert_eq!(
        partitions().await,
        [
            "events_default",
            "events_y2026m10",
            "events_y2026m11",
            "events_y2026m12",
            "events_y2027m01"
        ]
    );
    // Idempotent.
    assert!(store
        .maintain_partitions(now, 2, 0)
        .await
        .unwrap()
        .created
        .is_empty());

    // An event from a client whose clock says March 2027 lands in the default partition...
    let project = tracklet_collector::store::Project::new("p", vec![], None);
    store.add_project(&project).await.unwrap();
    let (state, _task) = AppState::new(
        ServeConfig::default(),
        Arc::new(PgStore::connect(&db.url, 2).await.unwrap()),
    )
    .await
    .unwrap();
    let app = router(state);
    let march = Utc
        .with_ymd_and_hms(2027, 3, 10, 0, 0, 0)
        .unwrap()
        .timestamp_millis() as u64;
    let mut e = event(1);
    e["ts"] = serde_json::json!(march);
    let post = |sent_at: u64| {
        Request::post(format!("/v1/batch?key={}", project.write_key))
            .body(Body::from(batch(sent_at, vec![e.clone()])))
            .unwrap()
    };
    use tower::ServiceExt;
    assert_eq!(
        app.clone()
            .oneshot(post(march + 1000))
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let in_default: i64 = sqlx::query_scalar("SELECT count(*) FROM events_default")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(in_default, 1);
    // ...and moves into its month's partition when that is created; dedupe still holds.
    let later = Utc.with_ymd_and_hms(2027, 2, 1, 0, 0, 0).unwrap();
    let report = store.maintain_partitions(later, 1, 0).await.unwrap();
    assert_eq!(report.created, ["events_y2027m02", "events_y2027m03"]);
    let in_march: i64 = sqlx::query_scalar("SELECT count(*) FROM events_y2027m03")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(in_march, 1);
    let retry = app.clone().oneshot(post(march + 90_000)).await.unwrap();
    assert_eq!(retry.status(), StatusCode::OK);
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(total, 1, "a retry with a new sent_at stores nothing twice");

    // Retention of 2 months at 2027-02: October and November 2026 go, December stays.
    let report = store.maintain_partitions(later, 1, 2).await.unwrap();
    assert_eq!(report.dropped, ["events_y2026m10", "events_y2026m11"]);
    let left = partitions().await;
    assert!(
        left.contains(&"events_y2026m12".to_owned())
            && !left.contains(&"events_y2026m11".to_owned()),
        "{left:?}"
    );
    pool.close().await;
}
