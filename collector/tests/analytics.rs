//! The stats API (`/v1/stats/summary`, `/timeseries`, `/breakdown`) on both backends: a small
//! data set sent through the real batch pipeline, every figure checked against hand counts.
//!
//! Data set (times are seconds before the batch's `sent_at`; skew correction keeps the
//! durations within a batch exactly):
//!
//! | session | visitor | events |
//! |---|---|---|
//! | s1 | A | page_view /home (ref www.google.com) @600, page_view /pricing (ref "") @540, signup /pricing {title: Pro} @500 |
//! | s2 | A | page_view /home (no ref) @300, page_view /docs @240 |
//! | s3 | B | page_view /home (ref News.ycombinator.com) @200 — bounces |
//! | s4 | C (Chrome) | page_view /pricing (ref www.google.com) @120, signup /pricing {title: Basic} @90, page_view /docs @60 |
//! | s5 | D (Googlebot) | page_view /home @100 — a bot, left out everywhere |
//! | s6 | E | page_view /old @30 hours — only in the previous day |
//!
//! Over the last day: 3 visitors, 4 sessions, 7 page views, 9 events, bounce rate 1/4,
//! session lengths 100, 60, 0 and 60 s (mean 55).

#[macro_use]
mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use chrono::{DateTime, Duration, Utc};
use common::*;
use serde_json::{json, Value};

const CHROME: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36";
const GOOGLEBOT: &str = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)";

/// One event `secs_ago` seconds before `sent_at`.
fn ev(
    n: u64,
    sent_at: u64,
    secs_ago: u64,
    (anon, session): (&str, &str),
    name: &str,
    context: Value,
    props: Option<Value>,
) -> Value {
    let mut e = json!({
        "id": format!("0190b6f0-0000-7000-8000-{n:012}"),
        "name": name,
        "ts": sent_at - secs_ago * 1000,
        "anonymous_id": anon,
        "session_id": session,
        "context": context,
    });
    if let Some(p) = props {
        e["props"] = p;
    }
    e
}

/// Sends the data set; returns `sent_at` (about now).
async fn load(app: &TestApp) -> u64 {
    let s = Utc::now().timestamp_millis() as u64;
    let pv = "page_view";
    let (a1, a2, b3) = (("A", "s1"), ("A", "s2"), ("B", "s3"));
    post_as(
        app,
        None,
        s,
        vec![
            ev(
                1,
                s,
                600,
                a1,
                pv,
                json!({"path": "/home", "referrer": "https://www.google.com/search?q=x"}),
                None,
            ),
            ev(
                2,
                s,
                540,
                a1,
                pv,
                json!({"path": "/pricing", "referrer": ""}),
                None,
            ),
            ev(
                3,
                s,
                500,
                a1,
                "signup",
                json!({"path": "/pricing"}),
                Some(json!({"title": "Pro", "plan": "pro"})),
            ),
            ev(4, s, 300, a2, pv, json!({"path": "/home"}), None),
            ev(5, s, 240, a2, pv, json!({"path": "/docs"}), None),
            ev(
                6,
                s,
                200,
                b3,
                pv,
                json!({"path": "/home", "referrer": "https://News.ycombinator.com:443/item?id=1"}),
                None,
            ),
            ev(
                7,
                s,
                30 * 3600,
                ("E", "s6"),
                pv,
                json!({"path": "/old"}),
                None,
            ),
        ],
    )
    .await;
    let c4 = ("C", "s4");
    post_as(
        app,
        Some(CHROME),
        s,
        vec![
            ev(
                8,
                s,
                120,
                c4,
                pv,
                json!({"path": "/pricing", "referrer": "https://www.google.com/"}),
                None,
            ),
            ev(
                9,
                s,
                90,
                c4,
                "signup",
                json!({"path": "/pricing"}),
                Some(json!({"title": "Basic"})),
            ),
            ev(10, s, 60, c4, pv, json!({"path": "/docs"}), None),
        ],
    )
    .await;
    post_as(
        app,
        Some(GOOGLEBOT),
        s,
        vec![ev(
            11,
            s,
            100,
            ("D", "s5"),
            pv,
            json!({"path": "/home"}),
            None,
        )],
    )
    .await;
    s
}

async fn summary(app: &TestApp, query: &str) -> Value {
    let a = get(app, "/v1/stats/summary", query).await;
    let j = &a.json;
    json!([
        j["visitors"],
        j["sessions"],
        j["pageviews"],
        j["events"],
        j["bounce_rate"],
        j["avg_session_seconds"]
    ])
}

on_both_backends!(summary_counts_match_hand_counts, |backend| async move {
    let app = app(backend).await;
    let s = load(&app).await;
    let range = last_day(s);
    assert_eq!(summary(&app, &range).await, json!([3, 4, 7, 9, 0.25, 55.0]));
    // Filters combine: /pricing signups are s1 and s4 (whole sessions: 100 s and 60 s).
    assert_eq!(
        summary(&app, &format!("{range}&page=/pricing&event=signup")).await,
        json!([2, 2, 0, 2, 0.0, 80.0])
    );
    assert_eq!(
        summary(&app, &format!("{range}&browser=Chrome")).await,
        json!([1, 1, 2, 3, 0.0, 60.0])
    );
    assert_eq!(
        summary(
            &app,
            &format!("{range}&browser=Chrome&os=Windows%2010&device=desktop")
        )
        .await,
        json!([1, 1, 2, 3, 0.0, 60.0])
    );
    assert_eq!(
        summary(&app, &format!("{range}&referrer=news.ycombinator.com")).await,
        json!([1, 1, 1, 1, 1.0, 0.0])
    );
    assert_eq!(
        summary(&app, &format!("{range}&country=NZ")).await,
        json!([0, 0, 0, 0, 0.0, 0.0])
    );
    // The day before holds only s6.
    let before = format!("from={}&to={}", s - 2 * 86_400_000, s - 86_400_000);
    assert_eq!(summary(&app, &before).await, json!([1, 1, 1, 1, 1.0, 0.0]));
});

on_both_backends!(breakdowns_match_hand_counts, |backend| async move {
    let app = app(backend).await;
    let s = load(&app).await;
    let range = last_day(s);
    let by = |by: &str| format!("{range}&by={by}");
    assert_eq!(
        breakdown(&app, &by("page")).await,
        json!([["/pricing", 2, 4], ["/home", 2, 3], ["/docs", 2, 2]])
    );
    assert_eq!(
        breakdown(&app, &by("entry_page")).await,
        json!([["/home", 2, 3], ["/pricing", 1, 1]])
    );
    assert_eq!(
        breakdown(&app, &by("exit_page")).await,
        json!([["/docs", 2, 2], ["/home", 1, 1], ["/pricing", 1, 1]])
    );
    assert_eq!(
        breakdown(&app, &by("referrer")).await,
        json!([
            ["(direct)", 2, 6],
            ["www.google.com", 2, 2],
            ["news.ycombinator.com", 1, 1]
        ])
    );
    assert_eq!(
        breakdown(&app, &by("event")).await,
        json!([["page_view", 3, 7], ["signup", 2, 2]])
    );
    assert_eq!(
        breakdown(&app, &by("prop:title")).await,
        json!([["Basic", 1, 1], ["Pro", 1, 1]])
    );
    assert_eq!(
        breakdown(&app, &by("browser")).await,
        json!([["Chrome", 1, 3]])
    );
    assert_eq!(
        breakdown(&app, &by("device")).await,
        json!([["desktop", 1, 3]])
    );
    // Filters apply to breakdowns too.
    assert_eq!(
        breakdown(&app, &format!("{}&referrer=%28direct%29", by("event"))).await,
        json!([["page_view", 2, 4], ["signup", 2, 2]])
    );
    assert_eq!(
        breakdown(&app, &format!("{}&page=/docs", by("entry_page"))).await,
        json!([["/home", 1, 1], ["/pricing", 1, 1]])
    );
    assert_eq!(
        breakdown(
            &app,
            &format!("{}&page=/pricing&event=signup", by("prop:title"))
        )
        .await,
        json!([["Basic", 1, 1], ["Pro", 1, 1]])
    );
    // limit.
    assert_eq!(
        breakdown(&app, &format!("{}&limit=1", by("page"))).await,
        json!([["/pricing", 2, 4]])
    );
    // A filter value that looks like SQL is only a value.
    assert_eq!(
        breakdown(
            &app,
            &format!("{}&page=%27%20OR%20%271%27%3D%271", by("page"))
        )
        .await,
        json!([])
    );
});

/// Bucket starts of an answer's series.
fn starts(series: &Value) -> Vec<DateTime<Utc>> {
    series["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            DateTime::parse_from_rfc3339(b["t"].as_str().unwrap())
                .unwrap()
                .with_timezone(&Utc)
        })
        .collect()
}

fn total(series: &Value, field: &str) -> i64 {
    series["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b[field].as_i64().unwrap())
        .sum()
}

/// Buckets of `width` seconds from the one holding `from` to the last starting before `to`.
fn expected_starts(from: i64, to: i64, width: i64) -> Vec<DateTime<Utc>> {
    let mut t = from.div_euclid(width) * width;
    let mut out = Vec::new();
    while t * 1000 < to {
        out.push(DateTime::from_timestamp(t, 0).unwrap());
        t += width;
    }
    out
}

on_both_backends!(timeseries_buckets_hours_and_days, |backend| async move {
    let app = app(backend).await;
    let s = load(&app).await as i64;

    // One day (and an hour): hour buckets, empty ones included, and the day before.
    let (from, to) = (s - 86_400_000, s + 3_600_000);
    let a = get(
        &app,
        "/v1/stats/timeseries",
        &format!("from={from}&to={to}"),
    )
    .await;
    assert_eq!(a.json["interval"], "hour");
    assert_eq!(starts(&a.json), expected_starts(from / 1000, to, 3600));
    assert_eq!(total(&a.json, "pageviews"), 7);
    let busy = a.json["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["pageviews"] != 0)
        .count();
    assert!((1..=2).contains(&busy), "the events span ten minutes");
    let prev = &a.json["previous"];
    let prev_from = from - (to - from);
    assert_eq!(starts(prev), expected_starts(prev_from / 1000, from, 3600));
    assert_eq!(total(prev, "pageviews"), 1);
    assert_eq!(total(prev, "visitors"), 1);

    // Ten days: day buckets (UTC midnights).
    let from = s - 10 * 86_400_000;
    let a = get(
        &app,
        "/v1/stats/timeseries",
        &format!("from={from}&to={to}"),
    )
    .await;
    assert_eq!(a.json["interval"], "day");
    let days = starts(&a.json);
    assert_eq!(days, expected_starts(from / 1000, to, 86_400));
    assert!(days.iter().all(|d| d.timestamp() % 86_400 == 0));
    assert_eq!(total(&a.json, "pageviews"), 8);
    assert_eq!(starts(&a.json["previous"]).len(), days.len());

    // Exactly two days is still hours; a filter narrows the series.
    let a = get(
        &app,
        "/v1/stats/timeseries",
        &format!("from={}&to={to}&event=signup", to - 2 * 86_400_000),
    )
    .await;
    assert_eq!(a.json["interval"], "hour");
    assert_eq!(total(&a.json, "pageviews"), 0);
    assert_eq!(
        a.json["buckets"].as_array().unwrap().len(),
        48 + usize::from(to % 3_600_000 != 0)
    );
});

on_both_backends!(keys_queries_and_ranges_are_checked, |backend| async move {
    let app = app(backend).await;
    for path in ["summary", "timeseries", "breakdown"] {
        let uri = format!("/v1/stats/{path}?by=page");
        assert_eq!(
            app.get(&uri).await.status,
            StatusCode::UNAUTHORIZED,
            "{uri}"
        );
        let with_write = format!("{uri}&key={}", app.project.write_key);
        assert_eq!(
            app.get(&with_write).await.status,
            StatusCode::UNAUTHORIZED,
            "the write key does not read: {uri}"
        );
        // The read key in the Authorization header; CORS for the project's origin.
        let a = app
            .send(
                Request::get(&uri)
                    .header("authorization", format!("Bearer {}", app.project.read_key))
                    .header("origin", ORIGIN)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(a.status, StatusCode::OK, "{uri}: {}", a.text);
        assert_eq!(a.headers["access-control-allow-origin"], ORIGIN);
    }
    let key = &app.project.read_key;
    for (query, needle) in [
        ("by=pages", "unknown by"),
        ("", "by is required"),
        ("by=prop:a%27b", "prop name"),
        ("by=page&limit=0", "limit"),
        ("by=page&from=whenever", "cannot read"),
    ] {
        let a = app
            .get(&format!("/v1/stats/breakdown?key={key}&{query}"))
            .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{query}: {}", a.text);
        assert_eq!(a.json["error"], "malformed");
        assert!(
            a.json["message"].as_str().unwrap().contains(needle),
            "{query}: {}",
            a.text
        );
    }
    // A range longer than 400 days is clamped (its end kept).
    let a = get(&app, "/v1/stats/summary", "from=2020-01-01&to=2026-01-01").await;
    let from = DateTime::parse_from_rfc3339(a.json["from"].as_str().unwrap()).unwrap();
    let to = DateTime::parse_from_rfc3339(a.json["to"].as_str().unwrap()).unwrap();
    assert_eq!(to - from, Duration::days(400));
    assert_eq!(to.to_rfc3339(), "2026-01-01T00:00:00+00:00");
    // Even from the epoch (longer than `/v1/stats` takes).
    let a = get(&app, "/v1/stats/summary", "from=0&to=2026-01-01").await;
    assert_eq!(a.json["from"], "2024-11-27T00:00:00Z");
    // Preflight for the stats API uses the read key.
    app.check_preflight(&format!("/v1/stats/summary?key={key}"))
        .await;
});

/// A query stuck behind a lock is stopped by the statement timeout: 503 with Retry-After,
/// in about five seconds, and the next query is answered again.
#[tokio::test]
async fn a_query_past_its_statement_timeout_is_503() {
    use sqlx::Connection;
    let app = app(Backend::Postgres).await;
    let url = &app.db.as_ref().unwrap().url;
    let mut locker = sqlx::PgConnection::connect(url).await.unwrap();
    let mut tx = locker.begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let a = app
        .get(&format!("/v1/stats/summary?key={}", app.project.read_key))
        .await;
    let waited = started.elapsed();
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text);
    assert_eq!(a.json["error"], "unavailable");
    assert!(a.headers.get("retry-after").is_some());
    assert!(
        waited >= std::time::Duration::from_secs(4) && waited < std::time::Duration::from_secs(7),
        "{waited:?}"
    );
    tx.rollback().await.unwrap();
    get(&app, "/v1/stats/summary", "").await;
}
