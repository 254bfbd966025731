//! `POST /v1/batch` against real Postgres and SQLite, driven in-process.

#[macro_use]
mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;

const SENT: u64 = 1_763_800_005_000;

on_both_backends!(
    accepts_then_dedupes_a_retry_with_new_sent_at,
    |backend| async move {
        let app = app(backend).await;
        let events: Vec<_> = (0..5).map(event).collect();
        let first = app.post(gzip(&batch(SENT, events.clone()))).await;
        assert_eq!(first.status, StatusCode::OK, "{}", first.text);
        assert_eq!(first.json["accepted"], 5);
        assert_eq!(first.json["duplicates"], 0);
        // The SDK retries the same events later: new sent_at, same ids and ts.
        let retry = app.post(gzip(&batch(SENT + 60_000, events))).await;
        assert_eq!(retry.status, StatusCode::OK);
        assert_eq!(retry.json["accepted"], 0);
        assert_eq!(retry.json["duplicates"], 5);
        assert_eq!(app.stored().await, 5);
    }
);

on_both_backends!(
    duplicate_ids_inside_one_batch_are_stored_once,
    |backend| async move {
        let app = app(backend).await;
        let a = app
            .post(batch(SENT, vec![event(1), event(1), event(2)]))
            .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        assert_eq!(a.json["accepted"], 2);
        assert_eq!(a.json["duplicates"], 1);
        assert_eq!(app.stored().await, 2);
    }
);

on_both_backends!(bad_events_reject_only_themselves, |backend| async move {
    let app = app(backend).await;
    let mut wrong_type = event(10);
    wrong_type["ts"] = serde_json::json!("yesterday");
    let mut missing = event(11);
    missing.as_object_mut().unwrap().remove("session_id");
    let mut bad_id = event(12);
    bad_id["id"] = serde_json::json!("not-a-uuid");
    let mut unknown_field = event(13);
    unknown_field["from_the_future"] = serde_json::json!({"x": 1});
    let events = vec![
        event(1),
        wrong_type,
        missing,
        bad_id,
        unknown_field,
        serde_json::json!(42),
    ];
    let a = app.post(batch(SENT, events)).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.json["accepted"], 2);
    let rejected = a.json["rejected"].as_array().unwrap();
    let indexes: Vec<u64> = rejected
        .iter()
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, vec![1, 2, 3, 5]);
    assert_eq!(rejected[2]["id"], "not-a-uuid");
    assert!(rejected[2]["reason"]
        .as_str()
        .unwrap()
        .starts_with("invalid_id"));
    assert_eq!(app.stored().await, 2);

    // A batch with only invalid events is still a 200, every event rejected.
    let all_bad = app
        .post(batch(
            SENT,
            vec![serde_json::json!({"id": 1}), serde_json::json!([])],
        ))
        .await;
    assert_eq!(all_bad.status, StatusCode::OK);
    assert_eq!(all_bad.json["accepted"], 0);
    assert_eq!(all_bad.json["rejected"].as_array().unwrap().len(), 2);
});

on_both_backends!(
    numbers_jsonb_refuses_reject_only_their_event,
    |backend| async move {
        let app = app(backend).await;
        // `1e-20000` is a finite f64 (0.0) but Postgres' numeric keeps at most 16383 digits
        // after the point: sent with other batches in one group commit, it must reject only
        // its own event, not fail the transaction for everyone.
        let tiny = |n: u64, number: &str| {
            let mut body = String::from_utf8(batch(SENT, vec![event(n)])).unwrap();
            body = body.replacen(&format!(r#""n":{n}"#), &format!(r#""n":{number}"#), 1);
            assert!(body.contains(number), "{body}");
            body.into_bytes()
        };
        let bodies = vec![
            batch(SENT, vec![event(1), event(2)]),
            tiny(3, "1e-20000"),
            tiny(4, "1e-16383"),
            batch(SENT, vec![event(5)]),
        ];
        let answers = app.post_concurrently(bodies).await;
        for a in &answers {
            assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        }
        assert_eq!(answers[1].json["accepted"], 0, "{}", answers[1].text);
        assert!(answers[1].json["rejected"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("number out of range"));
        assert_eq!(answers[2].json["accepted"], 1, "{}", answers[2].text);
        assert_eq!(app.stored().await, 4);
    }
);

on_both_backends!(
    sql_looking_strings_are_stored_literally,
    |backend| async move {
        let app = app(backend).await;
        let nasty = "'; DROP TABLE events; --";
        let mut e = event(1);
        e["name"] = serde_json::json!(nasty);
        e["props"] = serde_json::json!({"q": "1' OR '1'='1", "\"k": "\\"});
        let a = app.post(batch(SENT, vec![e])).await;
        assert_eq!(a.json["accepted"], 1, "{}", a.text);
        let stats = app
            .store
            .stats(
                app.project.id,
                chrono::DateTime::UNIX_EPOCH,
                chrono::Utc::now() + chrono::Duration::days(1),
            )
            .await
            .unwrap();
        assert_eq!(stats.events_by_name[0].name, nasty);
        // The table is still there and still answers.
        assert_eq!(
            app.post(batch(SENT, vec![event(2)])).await.json["accepted"],
            1
        );
    }
);

on_both_backends!(
    stats_count_events_visitors_sessions_and_days,
    |backend| async move {
        let app = app(backend).await;
        let mut events: Vec<_> = (0..6).map(event).collect();
        events[5]["name"] = serde_json::json!("signup");
        // sent_at = now so skew correction puts the events at about now.
        let now = chrono::Utc::now().timestamp_millis() as u64;
        for e in &mut events {
            e["ts"] = serde_json::json!(now - 1000);
        }
        assert_eq!(app.post(batch(now, events)).await.json["accepted"], 6);
        let missing = app.get("/v1/stats").await;
        assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
        let wrong = app
            .get(&format!("/v1/stats?key={}", app.project.write_key))
            .await;
        assert_eq!(
            wrong.status,
            StatusCode::UNAUTHORIZED,
            "the write key does not read"
        );
        let s = app
            .get(&format!("/v1/stats?key={}", app.project.read_key))
            .await;
        assert_eq!(s.status, StatusCode::OK, "{}", s.text);
        assert_eq!(s.json["total_events"], 6);
        assert_eq!(s.json["unique_visitors"], 3);
        assert_eq!(s.json["unique_sessions"], 2);
        assert_eq!(
            s.json["events_by_name"][0],
            serde_json::json!({"name": "page_view", "events": 5})
        );
        assert_eq!(
            s.json["events_by_name"][1],
            serde_json::json!({"name": "signup", "events": 1})
        );
        let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
        let days = s.json["events_per_day"].as_array().unwrap();
        assert!(
            days.iter()
                .any(|d| d["day"] == today.as_str() && d["events"] == 6),
            "{days:?}"
        );
        let empty = app
            .get(&format!(
                "/v1/stats?key={}&from=2020-01-01&to=2020-02-01",
                app.project.read_key
            ))
            .await;
        assert_eq!(empty.json["total_events"], 0);
        let bad = app
            .get(&format!(
                "/v1/stats?key={}&from=whenever",
                app.project.read_key
            ))
            .await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    }
);

on_both_backends!(
    concurrent_requests_are_group_committed,
    |backend| async move {
        let app = app(backend).await;
        let bodies = (0..20u64)
            .map(|r| gzip(&batch(SENT, (0..20).map(|i| event(r * 100 + i)).collect())))
            .collect();
        for a in app.post_concurrently(bodies).await {
            assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        }
        assert_eq!(app.stored().await, 400);
    }
);

fn error_code(a: &Answer) -> &str {
    a.json["error"].as_str().unwrap_or("<no error code>")
}

#[tokio::test]
async fn malformed_bodies_are_400_with_json_error() {
    let app = app(Backend::Postgres).await;
    for body in [
        b"{not json".to_vec(),
        b"{\"sent_at\": 1, \"events\": [\"\xff\xfe\"]}".to_vec(),
        br#"{"sent_at": "now", "events": []}"#.to_vec(),
        br#"{"sent_at": 1}"#.to_vec(),
        br#"{"sent_at": 1, "events": {}}"#.to_vec(),
        br#"[]"#.to_vec(),
        Vec::new(),
    ] {
        let a = app.post(body.clone()).await;
        assert_eq!(
            a.status,
            StatusCode::BAD_REQUEST,
            "{:?} -> {}",
            String::from_utf8_lossy(&body),
            a.text
        );
        assert_eq!(error_code(&a), "malformed");
        assert!(a.json["message"].is_string());
    }
    // Corrupt gzip (magic bytes, then garbage).
    let a = app.post(vec![0x1f, 0x8b, 8, 0, 1, 2, 3]).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn gzip_bomb_is_413_without_inflating_it() {
    let app = app(Backend::Postgres).await;
    // ~100 MiB of JSON whitespace inside a valid envelope start, compressed to ~100 KiB.
    let mut raw = b"{\"sent_at\":1,\"events\":[".to_vec();
    raw.resize(100 * 1024 * 1024, b' ');
    let bomb = gzip(&raw);
    drop(raw);
    assert!(bomb.len() < tracklet_wire::MAX_BODY_BYTES);
    let a = app.post(bomb).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", a.text);
    assert_eq!(error_code(&a), "too_large");
}

#[tokio::test]
async fn oversized_bodies_and_batches_are_413() {
    let app = app(Backend::Postgres).await;
    let too_many = batch(SENT, (0..1001).map(event).collect());
    let a = app.post(gzip(&too_many)).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", a.text);
    let huge = vec![b' '; tracklet_wire::MAX_BODY_BYTES + 1];
    let a = app.post(huge).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_code(&a), "too_large");
    // An oversized event is rejected alone.
    let mut big = event(2);
    big["props"] = serde_json::json!({"blob": "x".repeat(tracklet_wire::MAX_EVENT_BYTES)});
    let a = app.post(batch(SENT, vec![event(1), big])).await;
    assert_eq!(a.json["accepted"], 1);
    assert!(a.json["rejected"][0]["reason"]
        .as_str()
        .unwrap()
        .starts_with("too_large"));
}

#[tokio::test]
async fn unsupported_encoding_is_415_and_gzip_header_is_honoured() {
    let app = app(Backend::Postgres).await;
    let req = |enc: &str, body: Vec<u8>| {
        Request::post(app.batch_uri())
            .header("content-encoding", enc)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap()
    };
    let a = app.send(req("br", batch(SENT, vec![event(1)]))).await;
    assert_eq!(a.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(error_code(&a), "unsupported_encoding");
    let a = app
        .send(req("gzip", gzip(&batch(SENT, vec![event(1)]))))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.json["accepted"], 1);
}

#[tokio::test]
async fn slow_body_is_408() {
    let config = tracklet_collector::config::ServeConfig {
        body_read_timeout: std::time::Duration::from_millis(300),
        ..Default::default()
    };
    let app = app_with(Backend::Postgres, config, None).await;
    let a = app
        .send(Request::post(app.batch_uri()).body(stalled_body()).unwrap())
        .await;
    assert_eq!(a.status, StatusCode::REQUEST_TIMEOUT, "{}", a.text);
    assert_eq!(error_code(&a), "timeout");
}

/// A body that sends a few bytes and then never finishes.
fn stalled_body() -> Body {
    use futures_util::StreamExt;
    let first = futures_util::stream::once(async {
        Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"{\"sent_at\":"))
    });
    Body::from_stream(first.chain(futures_util::stream::pending()))
}

/// Concurrent group-commit transactions (several in flight) over overlapping ids, sent in
/// opposite orders: no deadlock, every id stored once, and the per-request counts add up.
#[tokio::test]
async fn overlapping_concurrent_requests_count_each_event_once() {
    use tracklet_collector::config::{CommitConfig, ServeConfig};
    let config = ServeConfig {
        commit: CommitConfig {
            max_delay: std::time::Duration::ZERO,
            max_rows: 30,
            concurrency: 4,
            ..Default::default()
        },
        ..Default::default()
    };
    let app = app_with(Backend::Postgres, config, None).await;
    let mut tasks = Vec::new();
    for r in 0..40u64 {
        let router = app.router.clone();
        let uri = app.batch_uri();
        tasks.push(tokio::spawn(async move {
            use http_body_util::BodyExt;
            use tower::ServiceExt;
            let mut ids: Vec<u64> = ((r % 5) * 10..(r % 5) * 10 + 20).collect();
            if r % 2 == 1 {
                ids.reverse();
            }
            let body = batch(SENT, ids.into_iter().map(event).collect());
            let req = Request::post(uri).body(Body::from(gzip(&body))).unwrap();
            let response = router.oneshot(req).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            let answer: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            (
                answer["accepted"].as_u64().unwrap(),
                answer["duplicates"].as_u64().unwrap(),
            )
        }));
    }
    let (mut accepted, mut duplicates) = (0, 0);
    for t in tasks {
        let (a, d) = t.await.unwrap();
        accepted += a;
        duplicates += d;
    }
    // Ids 0..60 across all requests; 40 requests x 20 events.
    assert_eq!(accepted, 60);
    assert_eq!(duplicates, 40 * 20 - 60);
    assert_eq!(app.stored().await, 60);
}
