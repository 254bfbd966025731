//! Batch receipts and `POST /v1/batch/status` against real Postgres and SQLite, in-process:
//! a committed batch is listed, nothing else is, receipts are per project, committed exactly
//! with the batch's events, and deleted after their time to live.

#[macro_use]
mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use chrono::{Duration, Utc};
use common::*;
use serde_json::json;
use tracklet_collector::config::ServeConfig;
use tracklet_collector::receipts::remove_expired;
use tracklet_collector::shutdown::Shutdown;
use tracklet_collector::store::{BatchReceipt, Project};

const SENT: u64 = 1_763_800_005_000;
const A: &str = "0190b6f0-aaaa-4000-8000-00000000000a";
const B: &str = "0190b6f0-bbbb-4000-8000-00000000000b";
const C: &str = "0190b6f0-cccc-4000-8000-00000000000c";
const D: &str = "0190b6f0-dddd-4000-8000-00000000000d";
const E: &str = "0190b6f0-eeee-4000-8000-00000000000e";

fn arrived(a: &Answer) -> Vec<String> {
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    serde_json::from_value(a.json["arrived"].clone()).expect("an `arrived` list")
}

on_both_backends!(
    committed_batches_are_listed_and_nothing_else,
    |backend| async move {
        let app = app(backend).await;
        let events: Vec<_> = (0..3).map(event).collect();
        let a = app
            .post(gzip(&batch_with_id(SENT, A, events.clone())))
            .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        assert_eq!(a.json["accepted"], 3);

        let s = app.status(&[A, B]).await;
        assert_eq!(arrived(&s), [A], "B was never sent");
        assert_eq!(s.headers["access-control-allow-origin"], ORIGIN);

        // A batch without batch_id works as before.
        let plain = app.post(batch(SENT, vec![event(10)])).await;
        assert_eq!(plain.json["accepted"], 1, "{}", plain.text);

        // Sent again (the beacon did arrive): duplicates, and the receipt stays.
        let again = app.post(batch_with_id(SENT + 60_000, A, events)).await;
        assert_eq!(again.json["duplicates"], 3, "{}", again.text);
        // All events rejected, no events, all events duplicates: each batch still arrived.
        let rejected = app
            .post(batch_with_id(SENT, C, vec![json!({"id": 1})]))
            .await;
        assert_eq!(rejected.json["accepted"], 0, "{}", rejected.text);
        assert_eq!(rejected.json["rejected"].as_array().unwrap().len(), 1);
        let empty = app.post(batch_with_id(SENT, D, vec![])).await;
        assert_eq!(empty.status, StatusCode::OK, "{}", empty.text);
        let dup = app.post(batch_with_id(SENT, E, vec![event(0)])).await;
        assert_eq!(dup.json["duplicates"], 1, "{}", dup.text);

        // Each arrived id once, in the order asked.
        let s = app.status(&[D, C, B, A, A, E]).await;
        assert_eq!(arrived(&s), [D, C, A, E]);
        assert_eq!(arrived(&app.status(&[]).await), Vec::<String>::new());
        assert_eq!(app.stored().await, 4);
    }
);

on_both_backends!(
    another_projects_key_does_not_see_receipts,
    |backend| async move {
        let app = app(backend).await;
        let other = Project::new("other", vec![ORIGIN.to_owned()], None);
        app.store.add_project(&other).await.unwrap();
        app.wait_until_known(&other.write_key).await;
        let other_status = |ids: &[&str]| {
            Request::post(format!("/v1/batch/status?key={}", other.write_key))
                .header("content-type", "text/plain")
                .body(Body::from(json!({ "batch_ids": ids }).to_string()))
                .unwrap()
        };
        assert_eq!(
            app.post(batch_with_id(SENT, A, vec![event(1)]))
                .await
                .status,
            StatusCode::OK
        );
        assert_eq!(
            arrived(&app.send(other_status(&[A])).await),
            Vec::<String>::new()
        );
        // The same batch id sent by the other project is its own receipt.
        let mut e = event(2);
        e["id"] = json!("0190b6f0-0000-7000-8000-999999999999");
        let sent = app
            .send(
                Request::post(format!("/v1/batch?key={}", other.write_key))
                    .body(Body::from(batch_with_id(SENT, A, vec![e])))
                    .unwrap(),
            )
            .await;
        assert_eq!(sent.json["accepted"], 1, "{}", sent.text);
        assert_eq!(arrived(&app.send(other_status(&[A, B])).await), [A]);
        assert_eq!(arrived(&app.status(&[A, B]).await), [A]);
        // The read key is not a write key.
        let read = app
            .send(
                Request::post(format!("/v1/batch/status?key={}", app.project.read_key))
                    .body(Body::from(r#"{"batch_ids":[]}"#))
                    .unwrap(),
            )
            .await;
        assert_eq!(read.status, StatusCode::UNAUTHORIZED);
    }
);

on_both_backends!(
    unusable_batch_ids_are_ignored_not_rejected,
    |backend| async move {
        let app = app(backend).await;
        let too_long = "x".repeat(65);
        let longest = "é".repeat(64);
        for (n, id) in [
            json!(5),
            json!(""),
            json!(too_long),
            json!("a\u{0}b"),
            json!({"id": A}),
            json!(null),
            json!(longest),
        ]
        .into_iter()
        .enumerate()
        {
            let a = app
                .post(batch_with_id(SENT, id.clone(), vec![event(n as u64)]))
                .await;
            assert_eq!(a.status, StatusCode::OK, "{id} -> {}", a.text);
            assert_eq!(a.json["accepted"], 1, "{id}");
        }
        // Asking about such ids is no error: they simply never arrived.
        let s = app.status(&["", &too_long, "a\u{0}b", "5", &longest]).await;
        assert_eq!(arrived(&s), [longest]);
    }
);

on_both_backends!(
    batches_committed_together_each_leave_a_receipt,
    |backend| async move {
        let app = app(backend).await;
        let ids: Vec<String> = (0..20).map(|r| format!("batch-{r}")).collect();
        let mut bodies = Vec::new();
        for (r, id) in ids.iter().enumerate() {
            // Every batch is sent twice at once, as a beacon and a resend racing.
            for copy in 0..2 {
                let events = (0..5).map(|i| event(r as u64 * 100 + i)).collect();
                bodies.push(batch_with_id(SENT + copy, id.as_str(), events));
            }
        }
        for a in app.post_concurrently(bodies).await {
            assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        }
        let asked: Vec<&str> = ids.iter().map(String::as_str).collect();
        assert_eq!(arrived(&app.status(&asked).await), asked);
        assert_eq!(app.stored().await, 100);
    }
);

on_both_backends!(
    receipt_is_committed_iff_the_events_are,
    |backend| async move {
        let app = app(backend).await;
        // The database refuses events named "boom" and the batch id "poison" (constraints an
        // operator added: the server's doing, so 503 and the SDK keeps the events).
        match backend {
            Backend::Postgres => {
                app.execute("ALTER TABLE events ADD CONSTRAINT no_boom CHECK (name <> 'boom')")
                    .await;
                app.execute(
                "ALTER TABLE batch_receipts ADD CONSTRAINT no_poison CHECK (batch_id <> 'poison')",
            )
            .await;
            }
            Backend::Sqlite => {
                app.execute(
                    "CREATE TRIGGER no_boom BEFORE INSERT ON events WHEN NEW.name = 'boom' \
                 BEGIN SELECT RAISE(ABORT, 'boom'); END",
                )
                .await;
                app.execute(
                    "CREATE TRIGGER no_poison BEFORE INSERT ON batch_receipts \
                 WHEN NEW.batch_id = 'poison' BEGIN SELECT RAISE(ABORT, 'poison'); END",
                )
                .await;
            }
        }
        let mut boom = event(2);
        boom["name"] = json!("boom");
        let refused = app.post(batch_with_id(SENT, A, vec![event(1), boom])).await;
        assert_eq!(
            refused.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            refused.text
        );
        let poisoned = app
            .post(batch_with_id(SENT, "poison", vec![event(3)]))
            .await;
        assert_eq!(
            poisoned.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            poisoned.text
        );
        assert_eq!(
            app.stored().await,
            0,
            "no event of a refused batch is stored"
        );
        assert_eq!(
            arrived(&app.status(&[A, "poison"]).await),
            Vec::<String>::new()
        );

        let fine = app.post(batch_with_id(SENT, B, vec![event(4)])).await;
        assert_eq!(fine.json["accepted"], 1, "{}", fine.text);
        assert_eq!(arrived(&app.status(&[A, B, "poison"]).await), [B]);
    }
);

on_both_backends!(
    receipts_older_than_the_ttl_are_deleted,
    |backend| async move {
        let app = app(backend).await;
        let now = Utc::now();
        let ttl = Duration::days(30);
        let receipt = |batch_id: String, age: Duration| BatchReceipt {
            project_id: app.project.id,
            batch_id,
            received_at: now - age,
        };
        let mut receipts: Vec<_> = (0..5)
            .map(|i| receipt(format!("old-{i}"), ttl + Duration::hours(1 + i)))
            .collect();
        receipts.push(receipt("young".into(), ttl - Duration::hours(1)));
        receipts.push(receipt("new".into(), Duration::zero()));
        app.store.insert_events(&[], &receipts).await.unwrap();
        let all: Vec<&str> = receipts.iter().map(|r| r.batch_id.as_str()).collect();
        assert_eq!(arrived(&app.status(&all).await).len(), 7);

        // Two at a time: the cleanup goes on until no expired receipt is left.
        let shutdown = Shutdown::new();
        let deleted = remove_expired(app.store.as_ref(), now - ttl, 2, &shutdown)
            .await
            .unwrap();
        assert_eq!(deleted, 5);
        assert_eq!(arrived(&app.status(&all).await), ["young", "new"]);
        assert_eq!(
            remove_expired(app.store.as_ref(), now - ttl, 2, &shutdown)
                .await
                .unwrap(),
            0
        );
        // Once shutdown has begun, the cleanup stops.
        shutdown.trigger();
        let later = now + Duration::days(365);
        assert_eq!(
            remove_expired(app.store.as_ref(), later, 2, &shutdown)
                .await
                .unwrap(),
            0
        );
    }
);

fn error_code(a: &Answer) -> &str {
    a.json["error"].as_str().unwrap_or("<no error code>")
}

#[tokio::test]
async fn bad_status_queries_get_a_clear_4xx() {
    let app = app(Backend::Postgres).await;
    for body in [
        b"{not json".to_vec(),
        br#"{"batch_ids": "a"}"#.to_vec(),
        br#"{"batch_ids": [1]}"#.to_vec(),
        br#"{"ids": ["a"]}"#.to_vec(),
        br#"["a"]"#.to_vec(),
        b"{\"batch_ids\": [\"\xff\"]}".to_vec(),
        Vec::new(),
    ] {
        let a = app.post_to(&app.status_uri(), body.clone()).await;
        assert_eq!(
            a.status,
            StatusCode::BAD_REQUEST,
            "{:?} -> {}",
            String::from_utf8_lossy(&body),
            a.text
        );
        assert_eq!(error_code(&a), "malformed");
        assert_eq!(a.headers["access-control-allow-origin"], ORIGIN);
    }
    let a = app.post_to(&app.status_uri(), b"{}".to_vec()).await;
    assert!(
        a.json["message"]
            .as_str()
            .unwrap()
            .starts_with("malformed batch status query: missing field `batch_ids`"),
        "{}",
        a.text
    );

    // At most 100 ids: 101 is a 413, like more than 1,000 events in a batch.
    let ids: Vec<String> = (0..101).map(|i| format!("{A}-{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let a = app.status(&ids).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", a.text);
    assert_eq!(error_code(&a), "too_large");
    assert_eq!(
        arrived(&app.status(&ids[..100]).await),
        Vec::<String>::new()
    );

    // More than 16 KiB of body, plain or once inflated: 413.
    let padded = format!(r#"{{"batch_ids":[]{}}}"#, " ".repeat(16 * 1024));
    let a = app
        .post_to(&app.status_uri(), padded.clone().into_bytes())
        .await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", a.text);
    let a = app
        .post_to(&app.status_uri(), gzip(padded.as_bytes()))
        .await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", a.text);
    // gzip is optional and understood.
    app.post(batch_with_id(SENT, A, vec![event(1)])).await;
    let body = json!({ "batch_ids": [A, B] }).to_string();
    let a = app.post_to(&app.status_uri(), gzip(body.as_bytes())).await;
    assert_eq!(arrived(&a), [A]);
    let a = app
        .send(
            Request::post(app.status_uri())
                .header("content-encoding", "br")
                .body(Body::from(body.clone()))
                .unwrap(),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(error_code(&a), "unsupported_encoding");
}

#[tokio::test]
async fn status_queries_are_authenticated_like_batches() {
    let app = app(Backend::Postgres).await;
    app.post(batch_with_id(SENT, A, vec![event(1)])).await;
    let body = json!({ "batch_ids": [A] }).to_string();
    let query = |uri: &str, origin: Option<&str>| {
        let mut req = Request::post(uri).header("content-type", "text/plain");
        if let Some(origin) = origin {
            req = req.header("origin", origin);
        }
        req.body(Body::from(body.clone())).unwrap()
    };
    for uri in ["/v1/batch/status", "/v1/batch/status?key=wk_nope"] {
        let a = app.send(query(uri, Some(ORIGIN))).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{uri}");
        assert_eq!(error_code(&a), "unauthorized");
    }
    let a = app
        .send(query(&app.status_uri(), Some("https://evil.example")))
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(error_code(&a), "origin_not_allowed");
    assert!(a.headers.get("access-control-allow-origin").is_none());

    let a = app.send(query(&app.status_uri(), Some(ORIGIN))).await;
    assert_eq!(arrived(&a), [A]);
    assert_eq!(a.headers["access-control-allow-origin"], ORIGIN);
    assert_eq!(a.headers["vary"], "Origin");
    assert_eq!(a.headers["access-control-expose-headers"], "Retry-After");
    // No Origin (a server): accepted; the key may come as a bearer token.
    let a = app
        .send(
            Request::post("/v1/batch/status")
                .header("authorization", format!("Bearer {}", app.project.write_key))
                .body(Body::from(body.clone()))
                .unwrap(),
        )
        .await;
    assert_eq!(arrived(&a), [A]);
    assert!(a.headers.get("access-control-allow-origin").is_none());

    // Preflight, as for /v1/batch.
    app.check_preflight(&app.status_uri()).await;
    // GET is not a route.
    let a = app.get(&app.status_uri()).await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn status_queries_are_rate_limited_like_batches() {
    // One event per second, a bucket of two; a query costs one.
    let app = app_with(Backend::Postgres, ServeConfig::default(), Some(1)).await;
    assert_eq!(arrived(&app.status(&[A]).await), Vec::<String>::new());
    assert_eq!(arrived(&app.status(&[A]).await), Vec::<String>::new());
    let a = app.status(&[A]).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.text);
    assert_eq!(error_code(&a), "rate_limited");
    assert!(a.headers.get("retry-after").is_some());
    assert_eq!(a.headers["access-control-allow-origin"], ORIGIN);
}

#[tokio::test]
async fn a_database_failure_is_503_never_4xx() {
    let app = app(Backend::Postgres).await;
    // Not an outage but a statement the database refuses: still the collector's fault.
    app.execute("DROP TABLE batch_receipts").await;
    let a = app.status(&[A]).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text);
    assert_eq!(error_code(&a), "unavailable");
    assert!(a.headers.get("retry-after").is_some());
    assert_eq!(a.headers["access-control-allow-origin"], ORIGIN);
}

#[tokio::test]
async fn status_queries_are_counted_in_metrics() {
    let app = app(Backend::Sqlite).await;
    app.post(batch_with_id(SENT, A, vec![event(1)])).await;
    assert_eq!(arrived(&app.status(&[A, B]).await), [A]);
    let m = app.get("/metrics").await;
    for name in [
        "tracklet_batch_status_queries_total",
        "tracklet_batch_status_ids_total{outcome=\"arrived\"}",
        "tracklet_batch_status_ids_total{outcome=\"not_found\"}",
        "tracklet_http_requests_total{route=\"/v1/batch/status\",method=\"POST\",status=\"200\"}",
    ] {
        assert!(
            m.text.contains(name),
            "metric {name} missing from:\n{}",
            m.text
        );
    }
}
