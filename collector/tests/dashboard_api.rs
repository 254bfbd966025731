//! The dashboard's newer stats API parts on both backends — UTM breakdowns, funnels, ingest
//! health, the live feed — with a small data set sent through the real batch pipeline and
//! every figure checked against hand counts.
//!
//! Data set (times are seconds before the batch's `sent_at`; `url` is the page's full URL as
//! the SDK stores it in `context.url`):
//!
//! | session | visitor | events |
//! |---|---|---|
//! | s1 | A | pv /landing `?utm_source=news&utm_medium=email&utm_campaign=fall#top` @600, pv /pricing @500, Signup @400, pv /thanks @300 |
//! | s2 | B | pv /landing `?ref=x&utm_source=news` @550, pv /pricing @540 |
//! | s3 | C | pv /pricing `?utm_source=ads&utm_medium=cpc&utm_campaign=` @450, Signup (same URL) @440 |
//! | s4 | A | Signup @350, pv /landing `#x?utm_source=nope` @340, pv /pricing @330 |
//! | s5 | D | pv /landing `?utm_source=` @200, Signup @190 |
//! | s6 | E (Googlebot) | pv /landing `?utm_source=news` @100, pv /pricing @90, Signup @80 — a bot, left out |

#[macro_use]
mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use chrono::Utc;
use common::*;
use serde_json::{json, Value};

const GOOGLEBOT: &str = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)";
const SITE: &str = "https://shop.example";

/// One event `secs_ago` seconds before `sent_at`, on the page `path` (URL `SITE + path +
/// tail`).
fn ev(
    n: u64,
    sent_at: u64,
    secs_ago: u64,
    (anon, session): (&str, &str),
    name: &str,
    (path, tail): (&str, &str),
) -> Value {
    json!({
        "id": format!("0190b6f0-0000-7000-8000-{n:012}"),
        "name": name,
        "ts": sent_at - secs_ago * 1000,
        "anonymous_id": anon,
        "session_id": session,
        "context": {"path": path, "url": format!("{SITE}{path}{tail}")},
    })
}

/// Sends the data set; returns `sent_at` (about now).
async fn load(app: &TestApp) -> u64 {
    let s = Utc::now().timestamp_millis() as u64;
    let (pv, signup) = ("page_view", "Signup");
    let (s1, s2, s3, s4, s5) = (
        ("A", "s1"),
        ("B", "s2"),
        ("C", "s3"),
        ("A", "s4"),
        ("D", "s5"),
    );
    let ads = "?utm_source=ads&utm_medium=cpc&utm_campaign=";
    post_as(
        app,
        None,
        s,
        vec![
            ev(
                1,
                s,
                600,
                s1,
                pv,
                (
                    "/landing",
                    "?utm_source=news&utm_medium=email&utm_campaign=fall#top",
                ),
            ),
            ev(2, s, 500, s1, pv, ("/pricing", "")),
            ev(3, s, 400, s1, signup, ("/pricing", "")),
            ev(4, s, 300, s1, pv, ("/thanks", "")),
            ev(5, s, 550, s2, pv, ("/landing", "?ref=x&utm_source=news")),
            ev(6, s, 540, s2, pv, ("/pricing", "")),
            ev(7, s, 450, s3, pv, ("/pricing", ads)),
            ev(8, s, 440, s3, signup, ("/pricing", ads)),
            ev(9, s, 350, s4, signup, ("/docs", "")),
            ev(10, s, 340, s4, pv, ("/landing", "#x?utm_source=nope")),
            ev(11, s, 330, s4, pv, ("/pricing", "")),
            ev(12, s, 200, s5, pv, ("/landing", "?utm_source=")),
            ev(13, s, 190, s5, signup, ("/landing", "?utm_source=")),
        ],
    )
    .await;
    let bot = ("E", "s6");
    post_as(
        app,
        Some(GOOGLEBOT),
        s,
        vec![
            ev(14, s, 100, bot, pv, ("/landing", "?utm_source=news")),
            ev(15, s, 90, bot, pv, ("/pricing", "")),
            ev(16, s, 80, bot, signup, ("/pricing", "")),
        ],
    )
    .await;
    s
}

on_both_backends!(utm_breakdowns_match_hand_counts, |backend| async move {
    let app = app(backend).await;
    let s = load(&app).await;
    let range = last_day(s);
    let by = |by: &str| format!("{range}&by={by}");
    // s1 and s2 landed from "news" (the bot's visit is left out); s3's page view and its
    // signup on the same URL from "ads"; s4's parameter is in the fragment, s5's is empty.
    assert_eq!(
        breakdown(&app, &by("utm_source")).await,
        json!([["news", 2, 2], ["ads", 1, 2]])
    );
    assert_eq!(
        breakdown(&app, &by("utm_medium")).await,
        json!([["cpc", 1, 2], ["email", 1, 1]])
    );
    assert_eq!(
        breakdown(&app, &by("utm_campaign")).await,
        json!([["fall", 1, 1]])
    );
    // UTM values filter like any other dimension.
    assert_eq!(
        breakdown(&app, &format!("{}&utm_source=ads", by("page"))).await,
        json!([["/pricing", 1, 2]])
    );
    let a = get(
        &app,
        "/v1/stats/summary",
        &format!("{range}&utm_source=news"),
    )
    .await;
    // Sessions s1 (600 to 300 s: 300 s) and s2 (10 s), neither a bounce.
    assert_eq!(
        json!([
            a.json["visitors"],
            a.json["sessions"],
            a.json["pageviews"],
            a.json["bounce_rate"],
            a.json["avg_session_seconds"]
        ]),
        json!([2, 2, 2, 0.0, 155.0])
    );
    // Entry and exit pages over the same data.
    assert_eq!(
        breakdown(&app, &by("entry_page")).await,
        json!([["/landing", 3, 4], ["/pricing", 1, 1]])
    );
    assert_eq!(
        breakdown(&app, &by("exit_page")).await,
        json!([["/pricing", 3, 3], ["/landing", 1, 1], ["/thanks", 1, 1]])
    );
});

/// Funnel steps as `[step, sessions, visitors, conversion, conversion_from_first]`.
async fn funnel(app: &TestApp, query: &str) -> Value {
    let a = get(app, "/v1/stats/funnel", query).await;
    a.json["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            json!([
                s["step"],
                s["sessions"],
                s["visitors"],
                s["conversion"],
                s["conversion_from_first"]
            ])
        })
        .collect()
}

on_both_backends!(funnels_match_hand_counts, |backend| async move {
    let app = app(backend).await;
    let s = load(&app).await;
    let range = last_day(s);
    // /landing: s1, s2, s4, s5 (A, B, A, D); then /pricing after it: s1, s2, s4 (s5 never
    // sees /pricing); then Signup after that: s1 only (s4 signed up before landing). The bot
    // went through all three and is left out.
    assert_eq!(
        funnel(
            &app,
            &format!("{range}&steps=page:/landing,page:/pricing,event:Signup")
        )
        .await,
        json!([
            ["page:/landing", 4, 3, 1.0, 1.0],
            ["page:/pricing", 3, 2, 0.75, 0.75],
            ["event:Signup", 1, 1, 1.0 / 3.0, 0.25]
        ])
    );
    // Signup: s1, s3, s4, s5 (A, C, A, D); /thanks after it: s1.
    assert_eq!(
        funnel(&app, &format!("{range}&steps=event:Signup,page:/thanks")).await,
        json!([
            ["event:Signup", 4, 3, 1.0, 1.0],
            ["page:/thanks", 1, 1, 0.25, 0.25]
        ])
    );
    // One event never counts for two steps: no session viewed /pricing twice.
    assert_eq!(
        funnel(&app, &format!("{range}&steps=page:/pricing,page:/pricing")).await,
        json!([
            ["page:/pricing", 4, 3, 1.0, 1.0],
            ["page:/pricing", 0, 0, 0.0, 0.0]
        ])
    );
    // Filters choose the sessions: only s3 came from "ads".
    assert_eq!(
        funnel(
            &app,
            &format!("{range}&utm_source=ads&steps=page:/pricing,event:Signup")
        )
        .await,
        json!([
            ["page:/pricing", 1, 1, 1.0, 1.0],
            ["event:Signup", 1, 1, 1.0, 1.0]
        ])
    );
    // An earlier range holds nothing: zeros, not an error.
    let before = format!("from={}&to={}", s - 2 * 86_400_000, s - 86_400_000);
    assert_eq!(
        funnel(&app, &format!("{before}&steps=page:/landing,event:Signup")).await,
        json!([
            ["page:/landing", 0, 0, 1.0, 0.0],
            ["event:Signup", 0, 0, 0.0, 0.0]
        ])
    );
    // Malformed steps are 400 with a message; no key is 401.
    let key = &app.project.read_key;
    for steps in [
        "",
        "steps=page:/only",
        "steps=page:/a,page:/b,page:/c,page:/d,page:/e,page:/f",
        "steps=page:/a,url:/b",
    ] {
        let a = app
            .get(&format!("/v1/stats/funnel?key={key}&{steps}"))
            .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{steps}: {}", a.text);
        assert!(a.json["message"].as_str().unwrap().contains("step"));
    }
    let a = app.get("/v1/stats/funnel?steps=page:/a,page:/b").await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
});

/// Polls `GET /v1/stats/health` (counts are flushed about once a second) until `done`.
async fn health_until(app: &TestApp, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let a = get(app, "/v1/stats/health", "").await;
        if done(&a.json) {
            return a.json;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "health never got there: {}",
            a.text
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

on_both_backends!(ingest_health_counts_each_outcome, |backend| async move {
    // 1 event/s, a bucket of 2: the first (full-bucket) batch of 33 passes and leaves 31 s of
    // debt, so the next two batches are refused with 429.
    let app = app_with(
        backend,
        tracklet_collector::config::ServeConfig::default(),
        Some(1),
    )
    .await;
    let sent_at = Utc::now().timestamp_millis() as u64;
    // A body that is not a batch: refused whole (before the rate limit charges anything).
    let a = app.post(b"not a batch".to_vec()).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.text);
    let mut events: Vec<Value> = (0..30).map(event).collect();
    events.push(event(0)); // a repeat within the batch: a duplicate
    let mut bad_id = event(100);
    bad_id["id"] = json!("not-a-uuid");
    let mut no_name = event(101);
    no_name["name"] = json!("");
    events.extend([bad_id, no_name]);
    let body =
        serde_json::to_vec(&json!({"sent_at": sent_at, "dropped": 7, "events": events})).unwrap();
    let a = app.post(body).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(
        (&a.json["accepted"], &a.json["duplicates"]),
        (&json!(30), &json!(1))
    );
    for n in 0..2 {
        let a = app.post(batch(sent_at, vec![event(200 + n)])).await;
        assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.text);
    }

    let h = health_until(&app, |h| h["totals"]["rate_limited"] == 2).await;
    assert_eq!(
        h["totals"],
        json!({
            "accepted": 30,
            "duplicates": 1,
            "rejected": 2,
            "rejected_by_reason": {"empty_field": 1, "invalid_id": 1},
            "batches_rejected": 1,
            "batches_rejected_by_reason": {"malformed": 1},
            "sdk_dropped": 7,
            "rate_limited": 2
        })
    );
    // Per hour (one, or two when the test crossed an hour), adding up to the totals.
    let hours = h["hours"].as_array().unwrap();
    assert!((1..=2).contains(&hours.len()), "{h}");
    let accepted: i64 = hours.iter().map(|x| x["accepted"].as_i64().unwrap()).sum();
    assert_eq!(accepted, 30);
    assert!(hours[0]["t"].as_str().unwrap().ends_with(":00:00Z"), "{h}");
    assert_eq!(h["queue_depth"], 0);
    let last = chrono::DateTime::parse_from_rfc3339(h["last_commit"].as_str().unwrap()).unwrap();
    assert!((Utc::now() - last.with_timezone(&Utc)).num_seconds() < 60);

    // Counts add up across flushes (upserted, not replaced).
    let a = app
        .send(
            Request::post(app.batch_uri())
                .header("content-type", "text/plain")
                .body(Body::from(batch(sent_at, vec![event(300)])))
                .unwrap(),
        )
        .await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.text);
    health_until(&app, |h| h["totals"]["rate_limited"] == 3).await;

    // A range before any batch: nothing; the write key does not read it.
    let a = get(&app, "/v1/stats/health", "from=2020-01-01&to=2020-02-01").await;
    assert_eq!(a.json["hours"], json!([]));
    assert_eq!(a.json["totals"]["accepted"], 0);
    let a = app
        .get(&format!("/v1/stats/health?key={}", app.project.write_key))
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
});

/// Reads a Server-Sent Events body.
struct SseReader {
    body: axum::body::Body,
    buffer: String,
    /// The last `visitors` count received.
    visitors: Option<Value>,
}

impl SseReader {
    /// The next message that is not a `visitors` recount (those are kept in `visitors`:
    /// they come whenever the count changes).
    async fn next(&mut self) -> (String, Value) {
        loop {
            let (name, data) = self.next_any().await;
            if name != "visitors" {
                return (name, data);
            }
            self.visitors = Some(data["visitors"].clone());
        }
    }

    /// The next `(event, data)` that is not a keep-alive.
    async fn next_any(&mut self) -> (String, Value) {
        use http_body_util::BodyExt;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut name, mut data) = (String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        name = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                if !name.is_empty() {
                    return (name, serde_json::from_str(&data).unwrap());
                }
                continue;
            }
            let frame = tokio::time::timeout(std::time::Duration::from_secs(10), self.body.frame())
                .await
                .expect("an event within 10 s")
                .expect("the stream goes on")
                .unwrap();
            if let Ok(bytes) = frame.into_data() {
                self.buffer.push_str(std::str::from_utf8(&bytes).unwrap());
            }
        }
    }
}

on_both_backends!(
    live_sends_the_last_30_minutes_then_each_commit,
    |backend| async move {
        use tower::ServiceExt;
        let app = app(backend).await;
        let s = Utc::now().timestamp_millis() as u64;
        let visit =
            |n, secs, anon: &str, name: &str| ev(n, s, secs, (anon, "s-live"), name, ("/live", ""));
        // Two visitors in the last 30 minutes, one an hour ago; a bot now.
        post_as(
            &app,
            None,
            s,
            vec![
                visit(1, 3600, "old", "page_view"),
                visit(2, 600, "A", "page_view"),
                visit(3, 60, "B", "page_view"),
                visit(4, 30, "B", "Clicked"),
            ],
        )
        .await;
        post_as(
            &app,
            Some(GOOGLEBOT),
            s,
            vec![visit(5, 10, "bot", "page_view")],
        )
        .await;

        let response = app
            .router
            .clone()
            .oneshot(
                Request::get(format!("/v1/stats/live?key={}", app.project.read_key))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let mut sse = SseReader {
            body: response.into_body(),
            buffer: String::new(),
            visitors: None,
        };
        let (name, snapshot) = sse.next().await;
        assert_eq!(name, "snapshot");
        assert_eq!(snapshot["visitors"], 2);
        assert_eq!(snapshot["window_minutes"], 30);
        let names: Vec<_> = snapshot["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["name"].clone(),
                    e["anonymous_id"].clone(),
                    e["path"].clone(),
                )
            })
            .collect();
        assert_eq!(
            names,
            vec![
                (json!("Clicked"), json!("B"), json!("/live")),
                (json!("page_view"), json!("B"), json!("/live")),
                (json!("page_view"), json!("A"), json!("/live")),
            ]
        );

        // Committed after the stream started: a bot's event is not sent, the next one is.
        let s2 = Utc::now().timestamp_millis() as u64;
        post_as(
            &app,
            Some(GOOGLEBOT),
            s2,
            vec![ev(6, s2, 1, ("bot", "s-bot"), "page_view", ("/x", ""))],
        )
        .await;
        post_as(
            &app,
            None,
            s2,
            vec![ev(7, s2, 1, ("C", "s-c"), "Signup", ("/pricing", ""))],
        )
        .await;
        let (name, event) = sse.next().await;
        assert_eq!(name, "event");
        assert_eq!(event["id"], "0190b6f0-0000-7000-8000-000000000007");
        assert_eq!(
            (&event["name"], &event["path"], &event["anonymous_id"]),
            (&json!("Signup"), &json!("/pricing"), &json!("C"))
        );
        // A retry of the same event is a duplicate: not sent again. The next new one is.
        let a = app
            .post(batch(
                s2,
                vec![ev(7, s2, 1, ("C", "s-c"), "Signup", ("/pricing", ""))],
            ))
            .await;
        assert_eq!(a.json["duplicates"], 1, "{}", a.text);
        post_as(
            &app,
            None,
            s2,
            vec![ev(8, s2, 0, ("C", "s-c"), "page_view", ("/thanks", ""))],
        )
        .await;
        let (name, event) = sse.next().await;
        assert_eq!(
            (name.as_str(), &event["path"]),
            ("event", &json!("/thanks"))
        );
        // Visitor C came: "visitors now" is counted again (A, B and C; the bot never).
        while sse.visitors != Some(json!(3)) {
            let (name, data) = sse.next_any().await;
            assert_eq!(name, "visitors", "{data}");
            sse.visitors = Some(data["visitors"].clone());
        }

        // The write key, or none, is refused before any stream.
        for key in [format!("key={}", app.project.write_key), String::new()] {
            let a = app.get(&format!("/v1/stats/live?{key}")).await;
            assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{}", a.text);
        }
    }
);

/// A funnel, a health read and a live view stuck behind locks are stopped by the statement
/// timeout: 503 with Retry-After (never a 4xx, never a stream), and served again after.
#[tokio::test]
async fn new_endpoints_answer_503_past_the_statement_timeout() {
    use sqlx::Connection;
    let app = app(Backend::Postgres).await;
    let url = &app.db.as_ref().unwrap().url;
    let mut locker = sqlx::PgConnection::connect(url).await.unwrap();
    let mut tx = locker.begin().await.unwrap();
    sqlx::query("LOCK TABLE events, ingest_health IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    let key = &app.project.read_key;
    let uris = [
        format!("/v1/stats/funnel?key={key}&steps=page:/a,event:b"),
        format!("/v1/stats/health?key={key}"),
        format!("/v1/stats/live?key={key}"),
    ];
    let answers = futures_util::future::join_all(uris.iter().map(|u| app.get(u))).await;
    for (uri, a) in uris.iter().zip(&answers) {
        assert_eq!(
            a.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{uri}: {}",
            a.text
        );
        assert_eq!(a.json["error"], "unavailable", "{uri}");
        assert!(a.headers.get("retry-after").is_some(), "{uri}");
    }
    tx.rollback().await.unwrap();
    for uri in &uris[..2] {
        assert_eq!(app.get(uri).await.status, StatusCode::OK, "{uri}");
    }
}
